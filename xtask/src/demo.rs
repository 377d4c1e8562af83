//! `cargo xtask demo`: build, make a client and a server namespace joined by a veth pair,
//! reserve hugepages, run the server pinned on one core and a client workload on the other,
//! print what happened, and undo everything — also on failure or Ctrl-C.

use std::process::Command;
use std::sync::atomic::Ordering;

use anyhow::{Result, bail};
use bluebridge_topology::{Pair, fmt_mac, namespaces_with_prefix};

use crate::lab::{self, ServerProc};
use crate::root;
use crate::stage::{self, Stages};

/// Options of the demo.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Link MTU: 9000 carries a page in one multi-buffer frame; 1500 or less uses segments.
    #[arg(long, default_value_t = 9000, value_parser = clap::value_parser!(u16).range(1280..=9000))]
    mtu: u16,
    /// Send pages as segments even where one frame would carry them.
    #[arg(long)]
    segments: bool,
    /// Server arena size.
    #[arg(long, default_value = "256MiB")]
    arena: bytesize::ByteSize,
    /// Round trips measured at window 1, per kind.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    samples: u32,
    /// Seconds of pipelined reads.
    #[arg(long, default_value_t = 3.0, value_parser = positive_seconds)]
    seconds: f64,
    /// Requests in flight in the pipelined phase.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=128))]
    window: u16,
    /// Server workers, one shard of the pages and one veth queue each (the client opens a
    /// socket per queue and sends each request to its page's shard). More than one shares this
    /// machine's CPUs with the client, so it shows the sharding, not its speed (see
    /// `cargo xtask bench --scaling` for that).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    workers: u32,
    /// Do not check or install Debian packages.
    #[arg(long)]
    no_packages: bool,
}

const NAME: &str = "bbdemo";

pub(crate) fn run(a: &DemoArgs) -> Result<()> {
    let interrupted = lab::interrupt_flag()?;
    let mut s = Stages::new();
    let arena_pages = a.arena.as_u64().div_ceil(2 << 20);
    let _huge = lab::prepare(
        &mut s,
        a.no_packages,
        &["bluebridge-server", "bluebridge-client"],
        NAME,
        arena_pages + 2 * 8 + 4,
    )?;
    let bin = root().join("target/release");
    let mut pair = None;
    s.run(
        &format!(
            "topology: namespaces {NAME}-c, {NAME}-s joined by a veth pair, MTU {}, {} queue(s)",
            a.mtu, a.workers
        ),
        || {
            pair = Some(Pair::create_multiqueue(NAME, a.mtu, a.workers)?);
            Ok(())
        },
    )?;
    let pair = pair.expect("created");
    let (client_core, server_core) = lab::cores();

    let mut server = None;
    let placement = if a.workers == 1 {
        format!("pinned to CPU {server_core}")
    } else {
        format!(
            "{} workers on queues 0..{}, sharing CPU {server_core} (idle mode)",
            a.workers,
            a.workers - 1
        )
    };
    s.run(
        &format!("start bluebridge-server in {NAME}-s, {placement}"),
        || {
            let queues: Vec<String> = (0..a.workers).map(|q| q.to_string()).collect();
            let mut args = vec![
                "--iface".to_owned(),
                pair.server.ifname.clone(),
                "--host-id".into(),
                "2".into(),
                "--queues".into(),
                queues.join(","),
                "--arena".into(),
                a.arena.to_string().replace(' ', ""),
                "--framing".into(),
                if a.segments { "segments" } else { "auto" }.into(),
            ];
            // One worker busy-polls its own CPU; several share the server's CPU, each
            // sleeping when its queue is idle.
            let cores: Vec<String> = (0..a.workers).map(|_| server_core.to_string()).collect();
            args.extend(["--cores".into(), cores.join(",")]);
            if a.workers > 1 {
                args.push("--idle".into());
            }
            let p = ServerProc::start(
                &pair.server.ns,
                &bin.join("bluebridge-server"),
                &args,
                &interrupted,
            )?;
            server = Some(p);
            Ok(())
        },
    )?;
    let server = server.expect("started");

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
        server.stop()?;
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

/// Seconds: a finite number above 0, at most a day (the client refuses the same).
fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!(
            "`{s}` is not a number of seconds above 0 and at most 86400"
        )),
    }
}
