//! `cargo xtask …`: the project's entry points. Every stage prints one line saying what it does
//! and one saying how it ended; any failure ends the run with a non-zero exit.
#![forbid(unsafe_code)]

mod bench;
mod capi;
mod demo;
mod dsm;
mod fabric;
mod lab;
mod packages;
mod rack;
mod stage;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use stage::Stages;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "BlueBridge build, test and demo entry points"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install missing Debian packages, build, create a client and a server namespace joined
    /// by a veth pair, run the server (pinned) and a client workload (pinned), print the
    /// results, tear everything down. Needs root.
    Demo(demo::DemoArgs),
    /// Benchmark AF_XDP against the kernel-UDP baseline in one run: the paper's Table 1, READ
    /// and WRITE latency at window 1, pipelined READ throughput at window 32, small-request
    /// rate, an open-loop rate sweep, and the bare AF_XDP echo; JSON reports and SVG plots in
    /// results/ and the comparison printed. `--quick` is the smoke run CI does; `--table1`
    /// runs only Table 1. Needs root.
    Bench(bench::BenchArgs),
    /// A rack on this machine: a switch namespace running the XDP top-of-rack switch and its
    /// controller (bluebridge-ctl), N hosts each with a server (idle mode) and a client; then
    /// the paper's failed 42-host experiment: all clients allocate, write, read back and free
    /// pages on random other hosts for 100 iterations, then one client for 1,000. Reports
    /// completion, errors, latency and switch counters (results/rack*.json). Needs root.
    Rack(rack::RackArgs),
    /// Two racks on real routing software: each rack's switch an FRR router (the kernel's
    /// forwarding table as data plane) with hosts around it, a spine FRR router, eBGP between
    /// them (private AS numbers); the controller (`--backend bgp`) hands every host's routes
    /// to its rack's router. Runs the rack workload across both racks, migrates a page between
    /// them under load and withdraws and returns a host's /48, timing each route change as
    /// seen from the other rack (results/fabric*.json). Needs root.
    Fabric(fabric::FabricArgs),
    /// Distributed shared memory on a 3-host rack: the clients of all hosts map the same
    /// pages of one server as coherent regions and run the litmus suite (message passing,
    /// store and load buffering, write-write), a lock-protected counter, a parallel job and
    /// the coherence latencies against a private fault; prints `litmus: passed/run runs,
    /// forbidden outcomes N` and `lock counter: expected N, got N`; fails on any violation
    /// (results/dsm.json). `--quick` is the CI's short run. Needs root.
    Dsm(dsm::DsmArgs),
    /// The C API: regenerate capi/include/bluebridge.h with cbindgen (`--check`: fail if it
    /// is stale instead), build libbluebridge.a, write bluebridge.pc and build examples/c
    /// with the system C compiler (target/<profile>/examples-c/); `--install PREFIX` installs
    /// library, header and pkg-config file.
    Capi(capi::CapiArgs),
    /// The 2017 prototype's failure reproduced and cured: with kernel UDP and page addresses
    /// on-link, touch 1,000, 2,000 and 5,000 page addresses and watch the neighbour table fill
    /// and requests fail; with BlueBridge's data path, touch 1,000,000 and watch nothing grow.
    /// Prints both tables. Needs root.
    Ndp {
        /// Do not check or install Debian packages.
        #[arg(long)]
        no_packages: bool,
    },
    /// Install missing Debian packages, then run every check: rustfmt, clippy, unit and
    /// property tests, fuzz corpus replay and a short fuzz run.
    Test {
        /// Seconds each fuzz target runs for (0 skips the live fuzz run; the saved corpus is
        /// still replayed by the unit tests).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        fuzz_seconds: u64,
        /// Do not check or install Debian packages.
        #[arg(long)]
        no_packages: bool,
    },
    /// Run every fuzz target for a bounded time (needs root for nothing; installs cargo-fuzz
    /// when missing and uses the nightly toolchain that libFuzzer's instrumentation needs).
    Fuzz {
        /// Seconds each target runs for.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        seconds: u64,
        /// Run only this target (default: all of them).
        #[arg(long)]
        target: Option<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Demo(a) => demo::run(&a),
        Cmd::Bench(a) => bench::run(&a),
        Cmd::Rack(a) => rack::run(&a),
        Cmd::Fabric(a) => fabric::run(&a),
        Cmd::Dsm(a) => dsm::run(&a),
        Cmd::Capi(a) => capi::run(&a),
        Cmd::Ndp { no_packages } => ndp(no_packages),
        Cmd::Test {
            fuzz_seconds,
            no_packages,
        } => test(fuzz_seconds, no_packages),
        Cmd::Fuzz { seconds, target } => {
            let mut stages = Stages::new();
            fuzz(&mut stages, seconds, target.as_deref())
        }
    };
    if let Err(e) = result {
        eprintln!("xtask: FAILED: {e:#}");
        std::process::exit(1);
    }
}

/// The workspace root (the parent of this crate's directory).
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .into()
}

pub(crate) fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn test(fuzz_seconds: u64, no_packages: bool) -> Result<()> {
    let mut s = Stages::new();
    if !no_packages {
        s.run("debian packages", packages::ensure)?;
    }
    s.run("cargo fmt --check", || {
        stage::status(cargo().args(["fmt", "--all", "--", "--check"]))
    })?;
    s.run("cargo clippy --all-targets -D warnings", || {
        stage::status(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    s.run(
        "unit and property tests, XDP program tests (incl. fuzz corpus replay)",
        || {
            stage::status(cargo().args([
                "test",
                "--workspace",
                "--locked",
                "--exclude",
                "bluebridge-tests",
            ]))
        },
    )?;
    // The privileged tests run the C examples against a real server.
    capi::build(&mut s, true, false)?;
    s.run(
        "privileged end-to-end tests (namespaces, veth, XDP, AF_XDP)",
        || {
            // The lifecycle tests run the real server and client binaries, the sharing tests
            // the shared_counter example.
            stage::status(cargo().args([
                "build",
                "--locked",
                "-p",
                "bluebridge-server",
                "-p",
                "bluebridge-client",
                "--bins",
                "--examples",
            ]))?;
            stage::status(cargo().args(["test", "--locked", "-p", "bluebridge-tests"]))
        },
    )?;
    s.run(
        "benchmark smoke run (cargo xtask bench --quick; no timing assertions)",
        || {
            stage::status(cargo().args([
                "xtask",
                "bench",
                "--quick",
                "--no-packages",
                "--out",
                "target/bench-smoke",
            ]))
        },
    )?;
    s.run(
        "fast-READ smoke run (cargo xtask bench --xdp-fast --quick: XDP must answer the READs of hot pages; no timing assertions)",
        || {
            stage::status(cargo().args([
                "xtask",
                "bench",
                "--xdp-fast",
                "--quick",
                "--no-packages",
                "--out",
                "target/bench-smoke",
            ]))
        },
    )?;
    s.run(
        "shared-memory smoke run (cargo xtask dsm --quick: litmus suite, lock counter, parallel job on 3 hosts)",
        || {
            stage::status(cargo().args([
                "xtask",
                "dsm",
                "--quick",
                "--no-packages",
                "--out",
                "target/dsm-smoke",
            ]))
        },
    )?;
    s.run(
        "rack smoke run (cargo xtask rack --hosts 4 --replicas 2 --kill-primary: all clients at once, migrations, the controller killed and restarted under load, a primary killed under load)",
        || {
            stage::status(cargo().args([
                "xtask",
                "rack",
                "--hosts",
                "4",
                "--replicas",
                "2",
                "--kill-primary",
                "--kill-seconds",
                "2",
                "--iterations",
                "100",
                "--single",
                "100",
                "--migrations",
                "20",
                "--no-packages",
                "--out",
                "target/rack-smoke",
            ]))
        },
    )?;
    s.run(
        "Open vSwitch smoke run (cargo xtask rack --backend ovs --hosts 6: the paper's workload and migrations through OpenFlow flows on the userspace datapath)",
        || {
            stage::status(cargo().args([
                "xtask",
                "rack",
                "--backend",
                "ovs",
                "--hosts",
                "6",
                "--iterations",
                "50",
                "--single",
                "100",
                "--migrations",
                "20",
                "--no-packages",
                "--out",
                "target/ovs-smoke",
            ]))
        },
    )?;
    s.run(
        "fabric smoke run (cargo xtask fabric: 2 racks of 3 hosts on FRR routers and a spine, eBGP; the workload across racks, migrations between them, a host withdrawn and back)",
        || {
            stage::status(cargo().args([
                "xtask",
                "fabric",
                "--iterations",
                "30",
                "--single",
                "100",
                "--migrations",
                "6",
                "--no-packages",
                "--out",
                "target/fabric-smoke",
            ]))
        },
    )?;
    if fuzz_seconds > 0 {
        fuzz(&mut s, fuzz_seconds, None)?;
    }
    s.finish();
    Ok(())
}

fn ndp(no_packages: bool) -> Result<()> {
    let mut s = Stages::new();
    if !no_packages {
        s.run("debian packages", packages::ensure)?;
    }
    s.run(
        "the prototype's neighbour-table failure, and BlueBridge's cure",
        || {
            stage::status(cargo().args([
                "test",
                "--locked",
                "-p",
                "bluebridge-tests",
                "--test",
                "ndp",
                "--",
                "--nocapture",
            ]))
        },
    )?;
    s.finish();
    Ok(())
}

/// The fuzz workspaces and their targets.
const FUZZ: &[(&str, &[&str])] = &[("proto/fuzz", &["frame"]), ("server/fuzz", &["handler"])];

fn fuzz(s: &mut Stages, seconds: u64, only: Option<&str>) -> Result<()> {
    s.run("cargo-fuzz and a nightly toolchain", ensure_cargo_fuzz)?;
    let mut ran = 0;
    for (dir, targets) in FUZZ {
        for target in targets.iter().filter(|t| only.is_none_or(|o| o == **t)) {
            ran += 1;
            s.run(&format!("fuzz {dir} {target} for {seconds} s"), || {
                // libFuzzer adds new inputs to its first corpus directory: a scratch one, so a
                // CI run never dirties the tree. cargo-fuzz appends the committed corpus
                // (`<dir>/corpus/<target>`) after it, which seeds the run.
                let scratch = root().join("target").join("fuzz-corpus").join(target);
                std::fs::create_dir_all(&scratch)?;
                stage::status(
                    Command::new("cargo")
                        .current_dir(root().join(dir))
                        .args(["+nightly", "fuzz", "run", target, "--"])
                        .arg(format!("-max_total_time={seconds}"))
                        .arg("-print_final_stats=1")
                        .arg(&scratch),
                )
            })?;
        }
    }
    if ran == 0 {
        bail!("no fuzz target named {}", only.unwrap_or_default());
    }
    Ok(())
}

fn ensure_cargo_fuzz() -> Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .context("running rustup")?;
    if !nightly.status.success() {
        bail!(
            "libFuzzer needs a nightly toolchain (for -Zsanitizer) and `rustup run nightly` \
             found none; install it with `rustup toolchain install nightly`"
        );
    }
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        println!("      installing cargo-fuzz from crates.io");
        stage::status(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}
