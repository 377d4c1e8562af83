//! `cargo xtask bench [--quick]`: one topology that carries both transports, the server pinned
//! on one core and `bluebridge-bench` on the other, the standard scenarios for AF_XDP and the
//! kernel-UDP baseline back to back, JSON reports in `results/`, and the comparison printed.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use bluebridge_topology::{Pair, fmt_mac, namespaces_with_prefix};

use crate::lab::{self, ServerProc};
use crate::root;
use crate::stage::{self, Stages};

/// Options of the bench run.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// A smoke run (about a minute): short measurements, same scenarios.
    #[arg(long)]
    quick: bool,
    /// Where the JSON reports go.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Do not check or install Debian packages.
    #[arg(long)]
    no_packages: bool,
}

const NAME: &str = "bbbench";

/// (name, mix, window): READ and WRITE latency at window 1, pipelined READ throughput.
const SCENARIOS: [(&str, &str, usize); 3] = [
    ("read-w1", "read=100", 1),
    ("write-w1", "write=100", 1),
    ("read-w32", "read=100", 32),
];
const TRANSPORTS: [&str; 2] = ["xdp", "udp"];
/// (name, payload bytes) of the bare-echo baseline: a small frame and a whole page.
const ECHOES: [(&str, u16); 2] = [("echo-small", 8), ("echo-page", 4096)];

/// The topology and binaries of one run, and how to start a server and a load in it.
struct Lab<'a> {
    pair: Pair,
    bin: PathBuf,
    interrupted: &'a AtomicBool,
    cores: (usize, usize),
    seconds: &'static str,
    warmup: &'static str,
}

impl Lab<'_> {
    /// Starts `bluebridge-server <extra> …` pinned to the server CPU.
    fn server(&self, s: &mut Stages, extra: &[&str]) -> Result<ServerProc> {
        let server_core = self.cores.1.to_string();
        let mut args: Vec<String> = extra.iter().map(|x| (*x).to_owned()).collect();
        for x in [
            "--iface",
            &self.pair.server.ifname,
            "--host-id",
            "2",
            "--cores",
            &server_core,
            "--stats-interval",
            "0",
        ] {
            args.push(x.to_owned());
        }
        let mut proc = None;
        s.run(
            &format!(
                "start bluebridge-server {} (CPU {server_core})",
                extra.join(" ")
            ),
            || {
                proc = Some(ServerProc::start(
                    &self.pair.server.ns,
                    &self.bin.join("bluebridge-server"),
                    &args,
                    self.interrupted,
                )?);
                Ok(())
            },
        )?;
        Ok(proc.expect("started"))
    }

    /// Runs `bluebridge-bench <args> …` pinned to the client CPU, writing `json`.
    fn load(
        &self,
        s: &mut Stages,
        label: &str,
        args: &[&str],
        json: &std::path::Path,
    ) -> Result<()> {
        s.run(&format!("{label} ({} s)", self.seconds), || {
            stage::status(
                Command::new("ip")
                    .args(["netns", "exec", &self.pair.client.ns])
                    .arg(self.bin.join("bluebridge-bench"))
                    .args(args)
                    .args([
                        "--iface",
                        &self.pair.client.ifname,
                        "--next-hop-mac",
                        &fmt_mac(self.pair.server.mac),
                    ])
                    .args(["--host", "2", "--core", &self.cores.0.to_string()])
                    .args([
                        "--seconds",
                        self.seconds,
                        "--warmup",
                        self.warmup,
                        "--quiet",
                        "--json",
                    ])
                    .arg(json),
            )
        })
    }
}

pub(crate) fn run(a: &BenchArgs) -> Result<()> {
    let interrupted = lab::interrupt_flag()?;
    let mut s = Stages::new();
    let _huge = lab::prepare(
        &mut s,
        a.no_packages,
        &["bluebridge-server", "bluebridge-bench"],
        NAME,
        64 + 2 * 8 + 4,
    )?;
    let out = root().join(&a.out);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut pair = None;
    s.run(
        &format!("topology: {NAME}-c ⇄ {NAME}-s, MTU 9000, kernel routes for the UDP baseline"),
        || {
            let p = Pair::create(NAME, 9000)?;
            p.route_kernel_udp(
                "fd00:bb::/32",
                "fd00:bb:1::1",
                "fd00:bb:1::/48",
                "fd00:bb:2::/48",
            )?;
            pair = Some(p);
            Ok(())
        },
    )?;
    let (seconds, warmup) = if a.quick { ("1", "0.5") } else { ("5", "1") };
    let lab = Lab {
        pair: pair.expect("created"),
        bin: root().join("target/release"),
        interrupted: &interrupted,
        cores: lab::cores(),
        seconds,
        warmup,
    };

    for transport in TRANSPORTS {
        if interrupted.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let server = lab.server(&mut s, &["--transport", transport, "--arena", "128MiB"])?;
        for (name, mix, window) in SCENARIOS {
            let json = out.join(format!("{transport}-{name}.json"));
            let w = window.to_string();
            let label = format!("{transport}: {name} ({mix}, window {window})");
            lab.load(
                &mut s,
                &label,
                &["--transport", transport, "--mix", mix, "--window", &w],
                &json,
            )?;
        }
        s.run(&format!("stop the {transport} server"), || server.stop())?;
    }
    // The bare AF_XDP echo (frames bounced unparsed), in the same run, for the ratios.
    let server = lab.server(&mut s, &["--echo", "--arena", "2MiB"])?;
    for (name, payload) in ECHOES {
        let json = out.join(format!("xdp-{name}.json"));
        let label = format!("bare echo: {name} ({} B frames, window 1)", 110 + payload);
        lab.load(
            &mut s,
            &label,
            &["--echo", "--payload", &payload.to_string()],
            &json,
        )?;
    }
    s.run("stop the echo server", || server.stop())?;
    drop(lab);
    let left = namespaces_with_prefix(NAME);
    if !left.is_empty() {
        bail!("namespaces left behind: {left:?}");
    }
    print_comparison(&out)?;
    s.finish();
    Ok(())
}

fn load(out: &std::path::Path, transport: &str, name: &str) -> Result<serde_json::Value> {
    let p = out.join(format!("{transport}-{name}.json"));
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn print_comparison(out: &std::path::Path) -> Result<()> {
    println!(
        "\nAF_XDP against the kernel-UDP baseline, measured in this run (reports in {}):",
        out.display()
    );
    println!(
        "| scenario | AF_XDP p50 / p99 µs | kernel UDP p50 / p99 µs | p50 ratio | AF_XDP ops/s | UDP ops/s | rate ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, mix, _) in SCENARIOS {
        let op = if mix.starts_with("read") {
            "READ"
        } else {
            "WRITE"
        };
        let x = load(out, "xdp", name)?;
        let u = load(out, "udp", name)?;
        let f = |v: &serde_json::Value, k: &str| v["latency"][op][k].as_f64().unwrap_or(f64::NAN);
        let r = |v: &serde_json::Value| v["ops_per_second"].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {name} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2}× | {:.0} | {:.0} | {:.2}× |",
            f(&x, "p50_us"),
            f(&x, "p99_us"),
            f(&u, "p50_us"),
            f(&u, "p99_us"),
            f(&u, "p50_us") / f(&x, "p50_us"),
            r(&x),
            r(&u),
            r(&x) / r(&u),
        );
    }
    let p50 = |t: &str, name: &str, op: &str| -> Result<f64> {
        Ok(load(out, t, name)?["latency"][op]["p50_us"]
            .as_f64()
            .unwrap_or(f64::NAN))
    };
    let (small, page) = (
        p50("xdp", "echo-small", "ECHO")?,
        p50("xdp", "echo-page", "ECHO")?,
    );
    let echo_rate = load(out, "xdp", "echo-page")?["ops_per_second"]
        .as_f64()
        .unwrap_or(f64::NAN);
    println!(
        "\nAgainst the bare AF_XDP echo of this run (118 B frames p50 {small:.2} µs; 4,206 B page frames p50 {page:.2} µs, {echo_rate:.0}/s at window 1):"
    );
    println!(
        "- READ 4 KiB p50 / page-echo p50: {:.2}×",
        p50("xdp", "read-w1", "READ")? / page
    );
    println!(
        "- WRITE 4 KiB p50 / page-echo p50: {:.2}×",
        p50("xdp", "write-w1", "WRITE")? / page
    );
    Ok(())
}
