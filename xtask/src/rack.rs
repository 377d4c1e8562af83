//! `cargo xtask rack --hosts N`: a switch namespace with the XDP top-of-rack switch and its
//! controller, N hosts around it each running a server (idle mode) and a client, and the
//! paper's 42-host experiment: every client allocates, writes, reads back and frees pages on
//! random other hosts, all at once for 100 iterations, then one client alone for 1,000.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bluebridge_topology::{Rack, fmt_mac, namespaces_with_prefix};

use crate::lab::{self, ServerProc};
use crate::root;
use crate::stage::{self, Stages};

/// Options of the rack run.
#[derive(Debug, clap::Args)]
pub(crate) struct RackArgs {
    /// Hosts in the rack (each runs a server and a client).
    #[arg(long, default_value_t = 42, value_parser = clap::value_parser!(u16).range(1..=1000))]
    hosts: u16,
    /// Iterations in which every client works at once.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    iterations: u32,
    /// Iterations of one client alone afterwards.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    single: u32,
    /// Then page migrations under load: one client keeps writing and reading back 16 pages
    /// while the controller moves them between hosts this many times.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    migrations: u32,
    /// What forwards in the switch namespace: `xdp` (the XDP switch) or `kernel` (its own IPv6
    /// forwarding table, programmed by the controller over rtnetlink).
    #[arg(long, default_value = "xdp", value_parser = ["xdp", "kernel"])]
    backend: String,
    /// Where the JSON reports go.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Do not check or install Debian packages.
    #[arg(long)]
    no_packages: bool,
}

const NAME: &str = "bbrack";

/// The controller daemon; interrupted on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ctl(bin: &Path, socket: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin.join("bluebridge-ctl"));
    c.arg("--socket").arg(socket).args(args);
    c
}

pub(crate) fn run(a: &RackArgs) -> Result<()> {
    if !(2..=200).contains(&a.hosts) {
        bail!("--hosts must be 2 to 200");
    }
    let interrupted = lab::interrupt_flag()?;
    let mut s = Stages::new();
    let _huge = lab::prepare(
        &mut s,
        a.no_packages,
        &["bluebridge-server", "bluebridge-switch", "bluebridge-bench"],
        NAME,
        // The clients' UMEMs: 16 MiB each.
        8 * a.hosts as u64,
    )?;
    let bin = root().join("target/release");
    let out = root().join(&a.out);
    std::fs::create_dir_all(&out)?;
    let mut rack = None;
    s.run(
        &format!(
            "topology: switch namespace {NAME}-sw, {} hosts with a server and a client link each",
            a.hosts
        ),
        || {
            rack = Some(Rack::create(NAME, usize::from(a.hosts), 9000)?);
            Ok(())
        },
    )?;
    let rack = rack.expect("created");
    let socket = std::env::temp_dir().join(format!("{NAME}-{}.sock", std::process::id()));
    let mut daemon = None;
    s.run(
        &format!(
            "controller: bluebridge-ctl daemon in the switch namespace ({} backend; health checks, placement)",
            a.backend
        ),
        || {
            let child = Command::new("ip")
                .args(["netns", "exec", &rack.switch])
                .arg(bin.join("bluebridge-ctl"))
                .arg("--socket")
                .arg(&socket)
                .arg("daemon")
                .args(["--backend", &a.backend])
                .args([
                    "--link",
                    &rack.controller_if,
                    "--link-port",
                    &rack.controller_port,
                ])
                .stdout(Stdio::inherit())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting bluebridge-ctl")?;
            daemon = Some(Daemon(child));
            let t = Instant::now();
            loop {
                let ok = ctl(&bin, &socket, &["ping"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()?
                    .success();
                if ok {
                    return Ok(());
                }
                if t.elapsed() > Duration::from_secs(20) {
                    bail!("the controller did not come up");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        },
    )?;
    let _daemon = daemon.expect("started");
    // Servers first, so the controller's first health checks find them up.
    let mut servers: Vec<ServerProc> = Vec::new();
    s.run(
        &format!("start {} servers (idle mode, 16 MiB arena each)", a.hosts),
        || {
            for h in &rack.hosts {
                if interrupted.load(Ordering::Relaxed) {
                    bail!("interrupted");
                }
                let args: Vec<String> = [
                    "--iface",
                    &h.server_if,
                    "--host-id",
                    &h.host_id.to_string(),
                    "--arena",
                    "16MiB",
                    "--frames",
                    "1024",
                    "--idle",
                    "--normal-priority",
                    "--no-hugepages",
                    "--accept-routed",
                    "--sessions",
                    "128",
                    "--max-owners",
                    "1024",
                    "--stats-interval",
                    "0",
                ]
                .iter()
                .map(|x| (*x).to_owned())
                .collect();
                servers.push(ServerProc::start_quiet(
                    &h.ns,
                    &bin.join("bluebridge-server"),
                    &args,
                    &interrupted,
                )?);
            }
            Ok(())
        },
    )?;
    s.run(
        &format!(
            "register {} hosts: /48 → server port, client /64 → client port",
            a.hosts
        ),
        || {
            for h in &rack.hosts {
                let id = h.host_id.to_string();
                let net = format!(
                    "{}/64",
                    bluebridge_topology::rack_client_net(bluebridge_proto::HostId(h.host_id))
                );
                stage::status(&mut ctl(
                    &bin,
                    &socket,
                    &[
                        "register-host",
                        "--id",
                        &id,
                        "--server-port",
                        &h.server_port,
                        "--server-mac",
                        &fmt_mac(h.server_mac),
                        "--client-port",
                        &h.client_port,
                        "--client-mac",
                        &fmt_mac(h.client_mac),
                        "--client-net",
                        &net,
                    ],
                ))?;
            }
            Ok(())
        },
    )?;
    let layout = out.join("rack-layout.json");
    std::fs::write(&layout, serde_json::to_string_pretty(&rack.hosts)?)?;
    let report = out.join(format!("rack-{}.json", a.backend));
    s.run(
        &format!(
            "workload: {} iterations of all {} clients at once, then {} of one client (ALLOC, WRITE, READ back, FREE on a random other host each), then {} page migrations under load",
            a.iterations, a.hosts, a.single, a.migrations
        ),
        || {
            stage::status(
                Command::new(bin.join("bluebridge-rack"))
                    .arg("--layout")
                    .arg(&layout)
                    .args(["--iterations", &a.iterations.to_string()])
                    .args(["--single", &a.single.to_string()])
                    .args(["--migrations", &a.migrations.to_string()])
                    .arg("--controller")
                    .arg(&socket)
                    .arg("--json")
                    .arg(&report),
            )
        },
    )?;
    s.run("host status (bluebridge-ctl status)", || {
        stage::status(&mut ctl(&bin, &socket, &["status"]))
    })?;
    s.run("switch counters (bluebridge-ctl counters)", || {
        let o = ctl(&bin, &socket, &["--json", "counters"]).output()?;
        if !o.status.success() {
            bail!("bluebridge-ctl counters failed");
        }
        std::fs::write(
            out.join(format!("rack-{}-switch.json", a.backend)),
            &o.stdout,
        )?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        println!("      switch: {}", v["switch"]);
        Ok(())
    })?;
    if a.backend == "kernel" {
        s.run("the switch kernel's tables (ip -6 route / neigh)", || {
            let count = |what: &str| -> Result<usize> {
                let t = bluebridge_topology::ip_in(&rack.switch, &["-6", what, "show"])?;
                Ok(t.lines().filter(|l| !l.trim().is_empty()).count())
            };
            println!(
                "      {} routes, {} neighbour entries (one per link: {} hosts × 2 + the controller's), after every page above",
                count("route")?,
                count("neigh")?,
                a.hosts
            );
            Ok(())
        })?;
    }
    s.run("stop the servers", || {
        for p in servers.drain(..) {
            p.stop()?;
        }
        Ok(())
    })?;
    drop(_daemon);
    drop(rack);
    let left = namespaces_with_prefix(NAME);
    if !left.is_empty() {
        bail!("namespaces left behind: {left:?}");
    }
    s.finish();
    Ok(())
}
