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

/// A rack brought up for a run: the topology, the controller daemon (in the switch
/// namespace, the backend chosen), a server on every host (idle mode), every host registered.
pub(crate) struct RackLab {
    // Dropped in this order on every exit path: servers and controller before their
    // namespaces go.
    servers: Vec<ServerProc>,
    daemon: Option<Daemon>,
    pub(crate) rack: Rack,
    pub(crate) socket: PathBuf,
}

impl RackLab {
    /// Brings a rack of `hosts` hosts up under `name`, one stage per step.
    pub(crate) fn start(
        s: &mut Stages,
        name: &str,
        hosts: u16,
        backend: &str,
        bin: &Path,
        interrupted: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<RackLab> {
        let mut rack = None;
        s.run(
            &format!(
                "topology: switch namespace {name}-sw, {hosts} hosts with a server and a client link each"
            ),
            || {
                rack = Some(Rack::create(name, usize::from(hosts), 9000)?);
                Ok(())
            },
        )?;
        let rack = rack.expect("created");
        let socket = std::env::temp_dir().join(format!("{name}-{}.sock", std::process::id()));
        let mut daemon = None;
        s.run(
            &format!(
                "controller: bluebridge-ctl daemon in the switch namespace ({backend} backend; health checks, placement)"
            ),
            || {
                let child = Command::new("ip")
                    .args(["netns", "exec", &rack.switch])
                    .arg(bin.join("bluebridge-ctl"))
                    .arg("--socket")
                    .arg(&socket)
                    .arg("daemon")
                    .args(["--backend", backend])
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
                    let ok = ctl(bin, &socket, &["ping"])
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
        let mut lab = RackLab {
            rack,
            socket,
            daemon,
            servers: Vec::new(),
        };
        // Servers first, so the controller's first health checks find them up.
        s.run(
            &format!("start {hosts} servers (idle mode, 16 MiB arena each)"),
            || {
                for h in &lab.rack.hosts {
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
                    lab.servers.push(ServerProc::start_quiet(
                        &h.ns,
                        &bin.join("bluebridge-server"),
                        &args,
                        interrupted,
                    )?);
                }
                Ok(())
            },
        )?;
        s.run(
            &format!("register {hosts} hosts: /48 → server port, client /64 → client port"),
            || {
                for h in &lab.rack.hosts {
                    let id = h.host_id.to_string();
                    let net = format!(
                        "{}/64",
                        bluebridge_topology::rack_client_net(bluebridge_proto::HostId(h.host_id))
                    );
                    stage::status(&mut ctl(
                        bin,
                        &lab.socket,
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
        Ok(lab)
    }

    /// Stops the servers and the controller and removes the topology; fails if namespaces of
    /// `name` are left behind.
    pub(crate) fn stop(mut self, s: &mut Stages) -> Result<()> {
        s.run("stop the servers", || {
            for p in self.servers.drain(..) {
                p.stop()?;
            }
            Ok(())
        })?;
        drop(self.daemon.take());
        let name = self.rack.switch.trim_end_matches("-sw").to_owned();
        drop(self);
        let left = namespaces_with_prefix(&name);
        if !left.is_empty() {
            bail!("namespaces left behind: {left:?}");
        }
        Ok(())
    }
}

pub(crate) fn ctl(bin: &Path, socket: &Path, args: &[&str]) -> Command {
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
    let lab = RackLab::start(&mut s, NAME, a.hosts, &a.backend, &bin, &interrupted)?;
    let (rack, socket) = (&lab.rack, &lab.socket);
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
                    .arg(socket)
                    .arg("--json")
                    .arg(&report),
            )
        },
    )?;
    s.run("host status (bluebridge-ctl status)", || {
        stage::status(&mut ctl(&bin, socket, &["status"]))
    })?;
    s.run("switch counters (bluebridge-ctl counters)", || {
        let o = ctl(&bin, socket, &["--json", "counters"]).output()?;
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
    lab.stop(&mut s)?;
    let left = namespaces_with_prefix(NAME);
    if !left.is_empty() {
        bail!("namespaces left behind: {left:?}");
    }
    s.finish();
    Ok(())
}
