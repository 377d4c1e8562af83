//! `cargo xtask demo`: build, make a client and a server namespace joined by a veth pair,
//! reserve hugepages, run the server pinned on one core and a client workload on the other,
//! print what happened, and undo everything — also on failure or Ctrl-C.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bluebridge_topology::{Pair, fmt_mac, namespaces_with_prefix};

use crate::stage::{self, Stages};
use crate::{cargo, packages, root};

/// Options of the demo.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Link MTU: 9000 carries a page in one multi-buffer frame; 1500 or less uses segments.
    #[arg(long, default_value_t = 9000)]
    mtu: u16,
    /// Send pages as segments even where one frame would carry them.
    #[arg(long)]
    segments: bool,
    /// Server arena size.
    #[arg(long, default_value = "256MiB")]
    arena: bytesize::ByteSize,
    /// Round trips measured at window 1, per kind.
    #[arg(long, default_value_t = 20_000)]
    samples: u32,
    /// Seconds of pipelined reads.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Requests in flight in the pipelined phase.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Do not check or install Debian packages.
    #[arg(long)]
    no_packages: bool,
}

const NAME: &str = "bbdemo";
const HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Raises the hugepage reservation and puts the old value back on drop.
struct Hugepages {
    before: u64,
}

impl Hugepages {
    fn reserve(extra: u64) -> Result<Self> {
        let before: u64 = std::fs::read_to_string(HUGEPAGES)?.trim().parse()?;
        std::fs::write(HUGEPAGES, (before + extra).to_string()).context("reserving hugepages")?;
        let now: u64 = std::fs::read_to_string(HUGEPAGES)?.trim().parse()?;
        println!(
            "      hugepages: {before} -> {now} reserved (asked {}){}",
            before + extra,
            if now < before + extra {
                "; the rest falls back to ordinary pages"
            } else {
                ""
            }
        );
        Ok(Hugepages { before })
    }
}

impl Drop for Hugepages {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(HUGEPAGES, self.before.to_string()) {
            eprintln!("xtask: restoring {HUGEPAGES} to {}: {e}", self.before);
        }
    }
}

/// The server process; interrupted (then killed) on drop.
struct ServerProc {
    child: Child,
    output: mpsc::Receiver<String>,
}

impl ServerProc {
    fn interrupt(&mut self, wait: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < wait {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.interrupt(Duration::from_secs(5));
        }
    }
}

pub(crate) fn run(a: &DemoArgs) -> Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, interrupted.clone())?;
    }
    let mut s = Stages::new();
    if !a.no_packages {
        s.run("debian packages", packages::ensure)?;
    }
    s.run(
        "build bluebridge-server and bluebridge-client (release)",
        || {
            stage::status(cargo().args([
                "build",
                "--release",
                "--locked",
                "-p",
                "bluebridge-server",
                "-p",
                "bluebridge-client",
            ]))
        },
    )?;
    let bin = root().join("target/release");

    // Leftovers of an earlier run that was killed outright.
    for ns in namespaces_with_prefix(NAME) {
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    }
    let arena_pages = a.arena.as_u64().div_ceil(2 << 20);
    let _huge = Hugepages::reserve(arena_pages + 2 * 8 + 4)?;
    let mut pair = None;
    s.run(
        &format!(
            "topology: namespaces {NAME}-c, {NAME}-s joined by a veth pair, MTU {}",
            a.mtu
        ),
        || {
            pair = Some(Pair::create(NAME, a.mtu)?);
            Ok(())
        },
    )?;
    let pair = pair.expect("created");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (client_core, server_core) = if cores >= 2 { (0, 1) } else { (0, 0) };

    let mut server = None;
    s.run(
        &format!("start bluebridge-server in {NAME}-s, pinned to CPU {server_core}"),
        || {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &pair.server.ns])
                .arg(bin.join("bluebridge-server"))
                .args([
                    "--iface",
                    &pair.server.ifname,
                    "--host-id",
                    "2",
                    "--cores",
                    &server_core.to_string(),
                ])
                .args(["--arena", &a.arena.to_string().replace(' ', "")])
                .args(["--framing", if a.segments { "segments" } else { "auto" }])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut child = cmd.spawn().context("starting the server")?;
            let out = child.stdout.take().expect("piped");
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    println!("      server | {line}");
                    let _ = tx.send(line);
                }
            });
            let mut p = ServerProc { child, output: rx };
            let t = Instant::now();
            loop {
                if let Ok(line) = p.output.recv_timeout(Duration::from_millis(100))
                    && line.starts_with("bluebridge-server:")
                {
                    break;
                }
                if let Ok(Some(st)) = p.child.try_wait() {
                    bail!("the server exited during start-up: {st}");
                }
                if t.elapsed() > Duration::from_secs(30) || interrupted.load(Ordering::Relaxed) {
                    bail!("the server did not come up");
                }
            }
            server = Some(p);
            Ok(())
        },
    )?;
    let mut server = server.expect("started");

    let client_ok = s.run(
        &format!("client workload in {NAME}-c, pinned to CPU {client_core}"),
        || {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &pair.client.ns])
                .arg(bin.join("bluebridge-client"))
                .args([
                    "--iface",
                    &pair.client.ifname,
                    "--next-hop-mac",
                    &fmt_mac(pair.server.mac),
                ])
                .args(["--core", &client_core.to_string()]);
            if a.segments {
                cmd.arg("--segments");
            }
            cmd.args(["demo", "--host", "2", "--samples", &a.samples.to_string()])
                .args([
                    "--seconds",
                    &a.seconds.to_string(),
                    "--window",
                    &a.window.to_string(),
                ]);
            stage::status(&mut cmd)
        },
    );
    let stopped = s.run("stop the server (SIGINT) and tear down", || {
        match server.interrupt(Duration::from_secs(10)) {
            Some(st) if st.success() => {}
            Some(st) => bail!("the server exited with {st}"),
            None => bail!("the server did not stop on SIGINT; killed"),
        }
        while let Ok(line) = server.output.try_recv() {
            let _ = line;
        }
        drop(pair);
        let left = namespaces_with_prefix(NAME);
        if !left.is_empty() {
            bail!("namespaces left behind: {left:?}");
        }
        Ok(())
    });
    client_ok?;
    stopped?;
    if interrupted.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    s.finish();
    Ok(())
}
