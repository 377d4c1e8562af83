//! `cargo xtask rack --hosts N`: a switch namespace with the XDP top-of-rack switch and its
//! controller, N hosts around it each running a server (idle mode) and a client, and the
//! paper's 42-host experiment: every client allocates, writes, reads back and frees pages on
//! random other hosts, all at once for 100 iterations, then one client alone for 1,000.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bluebridge_topology::ovs::OvsSwitch;
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
    /// What forwards in the switch namespace: `xdp` (the XDP switch), `kernel` (its own IPv6
    /// forwarding table, programmed by the controller over rtnetlink) or `ovs` (an Open
    /// vSwitch bridge on the userspace datapath, started here, programmed over OpenFlow).
    #[arg(long, default_value = "xdp", value_parser = ["xdp", "kernel", "ovs"])]
    backend: String,
    /// Skip the controller restart (xdp backend): by default the controller daemon is killed
    /// with SIGKILL while every client works, left dead for 300 ms, and started again; it
    /// adopts the pinned switch and the clients must not see a single error.
    #[arg(long)]
    no_controller_restart: bool,
    /// Copies of every host's pages: 1 (none) or 2 (each host's pages also on a backup host
    /// that takes them over when the host dies; docs/switch.md "Replication").
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    replicas: u8,
    /// Last (needs --replicas 2): while every client writes and verifies its pages on every
    /// other host, kill one server with SIGKILL (--victim) and check that its backup took
    /// over: prints `acknowledged writes lost: N`, `client errors: N` and the unavailability
    /// window of the dead host's pages; first measures replication's cost (WRITE latency and
    /// pipelined WRITE rate to a replicated host against the last host, registered without a
    /// backup). Fails on any lost write or client error.
    #[arg(long, requires = "replicas")]
    kill_primary: bool,
    /// The host whose server --kill-primary kills.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=1000))]
    victim: u16,
    /// How long the clients work around the kill, seconds: above 0.5 (the kill comes 0.5 s
    /// in), at most 3600.
    #[arg(long, default_value_t = 3.0, value_parser = seconds)]
    kill_seconds: f64,
    /// For the --kill-primary run: the controller's health checks then (a STAT to every
    /// host every this many ms, given up after as long; set with `bluebridge-ctl health`
    /// before the kill, the earlier phases run with the daemon's default of 100 ms).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    health_interval_ms: u64,
    /// For the --kill-primary run: checks missed in a row before a host is declared dead
    /// (detection takes about misses × interval).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    health_misses: u32,
    /// Where the JSON reports go.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Do not check or install Debian packages.
    #[arg(long)]
    no_packages: bool,
}

const NAME: &str = "bbrack";
/// Where every server serves its Prometheus metrics, on its namespace's loopback.
pub(crate) const SERVER_METRICS: &str = "127.0.0.1:9464";
/// ... and the controller, on the switch namespace's.
pub(crate) const CTL_METRICS: &str = "127.0.0.1:9465";

/// The backend `ovs`'s bridge.
const OVS_BRIDGE: &str = "bbr0";

fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.5 && v <= 3600.0 => Ok(v),
        _ => Err(format!("`{s}`: seconds above 0.5 and at most 3600")),
    }
}

/// The controller daemon; interrupted on drop.
pub(crate) struct Daemon(Child);

/// Where a controller daemon runs: its namespace, its own interface and the switch port that
/// interface is cabled to.
pub(crate) struct DaemonAt<'a> {
    pub(crate) ns: &'a str,
    pub(crate) link_if: &'a str,
    pub(crate) link_port: &'a str,
}

impl<'a> DaemonAt<'a> {
    fn rack(rack: &'a Rack) -> Self {
        DaemonAt {
            ns: &rack.switch,
            link_if: &rack.controller_if,
            link_port: &rack.controller_port,
        }
    }
}

impl Daemon {
    /// Starts `bluebridge-ctl daemon` in the switch namespace `ns`, its link `link_if` cabled
    /// to `link_port`, and waits until it answers on `socket`; returns it and how long that
    /// took.
    pub(crate) fn start(
        bin: &Path,
        at: &DaemonAt<'_>,
        socket: &Path,
        backend: &str,
        extra: &[String],
    ) -> Result<(Daemon, Duration)> {
        let t = Instant::now();
        let child = Command::new("ip")
            .args(["netns", "exec", at.ns])
            .arg(bin.join("bluebridge-ctl"))
            .arg("--socket")
            .arg(socket)
            .arg("daemon")
            .args(["--backend", backend])
            .args(["--link", at.link_if, "--link-port", at.link_port])
            .args(["--metrics", CTL_METRICS])
            .args(extra)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting bluebridge-ctl")?;
        let mut d = Daemon(child);
        loop {
            let ok = ctl(bin, socket, &["ping"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?
                .success();
            if ok {
                return Ok((d, t.elapsed()));
            }
            if let Some(st) = d.0.try_wait()? {
                bail!("the controller exited ({st}) before answering");
            }
            if t.elapsed() > Duration::from_secs(20) {
                bail!("the controller did not come up");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it as a crash would (SIGKILL: nothing of it runs after).
    fn crash(mut self) -> Result<()> {
        self.0.kill()?;
        self.0.wait()?;
        std::mem::forget(self);
        Ok(())
    }
}

/// Where the daemon serving `socket` pins the switch (its default).
fn pin_dir(socket: &Path) -> PathBuf {
    Path::new(bluebridge_topology::PIN_BASE).join(socket.file_stem().unwrap_or_default())
}

/// Removes switches pinned by earlier runs under `name` whose xtask is gone (their
/// interfaces went with their namespaces; their maps would stay in memory).
fn remove_stale_pins(name: &str) {
    let Ok(dir) = std::fs::read_dir(bluebridge_topology::PIN_BASE) else {
        return;
    };
    for e in dir.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file.strip_prefix(&format!("{name}-")) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

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
    servers: Vec<Option<ServerProc>>,
    daemon: Option<Daemon>,
    /// The backend `ovs`'s Open vSwitch, in the switch namespace.
    pub(crate) ovs: Option<OvsSwitch>,
    pub(crate) rack: Rack,
    pub(crate) socket: PathBuf,
    /// What the daemon is started with besides its link (again on a restart).
    daemon_args: Vec<String>,
}

/// How a rack's controller runs: its backend, its own flags, and the hosts registered
/// without a backup.
#[derive(Debug, Clone, Default)]
pub(crate) struct LabOptions {
    pub(crate) backend: String,
    pub(crate) daemon_args: Vec<String>,
    pub(crate) unreplicated: Vec<u16>,
}

impl RackLab {
    /// Brings a rack of `hosts` hosts up under `name`, one stage per step.
    pub(crate) fn start(
        s: &mut Stages,
        name: &str,
        hosts: u16,
        o: &LabOptions,
        bin: &Path,
        interrupted: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<RackLab> {
        let backend = o.backend.as_str();
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
        if backend == "xdp" {
            remove_stale_pins(name);
            bluebridge_topology::ensure_pin_base()?;
        }
        let mut daemon_args = o.daemon_args.clone();
        let mut ovs = None;
        if backend == "ovs" {
            let dir = std::env::temp_dir().join(format!("{name}-ovs"));
            s.run(
                &format!(
                    "Open vSwitch in {}: ovsdb-server, ovs-vswitchd (userspace datapath), bridge {OVS_BRIDGE}, run directory {}",
                    rack.switch,
                    dir.display()
                ),
                || {
                    ovs = Some(OvsSwitch::start(&rack.switch, OVS_BRIDGE, &dir)?);
                    Ok(())
                },
            )?;
            daemon_args.extend([
                "--ovs-bridge".to_owned(),
                OVS_BRIDGE.to_owned(),
                "--ovs-rundir".to_owned(),
                dir.display().to_string(),
            ]);
        }
        let mut daemon = None;
        let pinned = if backend == "xdp" {
            format!("; the switch pinned in {}", pin_dir(&socket).display())
        } else {
            String::new()
        };
        s.run(
            &format!(
                "controller: bluebridge-ctl daemon in the switch namespace ({backend} backend; health checks, placement{pinned})"
            ),
            || {
                daemon = Some(
                    Daemon::start(bin, &DaemonAt::rack(&rack), &socket, backend, &daemon_args)?.0,
                );
                Ok(())
            },
        )?;
        let mut lab = RackLab {
            rack,
            socket,
            daemon,
            ovs,
            servers: Vec::new(),
            daemon_args,
        };
        // Servers first, so the controller's first health checks find them up.
        s.run(
            &format!("start {hosts} servers (idle mode, 16 MiB arena each)"),
            || {
                lab.servers = start_servers(&lab.rack.hosts, bin, interrupted)?;
                Ok(())
            },
        )?;
        s.run(
            &format!("register {hosts} hosts: /48 → server port, client /64 → client port"),
            || {
                for h in &lab.rack.hosts {
                    register(bin, &lab.socket, h, "", o.unreplicated.contains(&h.host_id))?;
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
            for p in self.servers.drain(..).flatten() {
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

/// Prints the controller's route updates (`route_updates` of `bluebridge-ctl counters`): how
/// long a batch of changes took to reach the `backend`'s forwarding plane.
pub(crate) fn print_route_updates(u: &serde_json::Value, backend: &str) {
    let ms = |k: &str| u[k].as_f64().unwrap_or(0.0) / 1e3;
    println!(
        "      route updates ({backend}): {} batches of {} changes, {} refused; per batch p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        u["batches"],
        u["changes"],
        u["failed"],
        ms("p50_us"),
        ms("p99_us"),
        ms("max_us")
    );
}

/// Starts a server on every host (idle mode, 16 MiB arena, routed requests accepted).
pub(crate) fn start_servers(
    hosts: &[bluebridge_topology::RackHost],
    bin: &Path,
    interrupted: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<Vec<Option<ServerProc>>> {
    let mut out = Vec::new();
    for h in hosts {
        if interrupted.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let id = h.host_id.to_string();
        let args: Vec<String> = [
            "--iface",
            &h.server_if,
            "--host-id",
            &id,
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
            "--metrics",
            SERVER_METRICS,
        ]
        .iter()
        .map(|x| (*x).to_owned())
        .collect();
        out.push(Some(ServerProc::start_quiet(
            &h.ns,
            &bin.join("bluebridge-server"),
            &args,
            interrupted,
        )?));
    }
    Ok(out)
}

/// Registers host `h` with the controller at `socket`: its ports are `<router><port>`
/// (`router` empty, or `ROUTER/` for the BGP backend's routers); `alone`: without a backup.
pub(crate) fn register(
    bin: &Path,
    socket: &Path,
    h: &bluebridge_topology::RackHost,
    router: &str,
    alone: bool,
) -> Result<()> {
    let id = h.host_id.to_string();
    let net = format!(
        "{}/64",
        bluebridge_topology::rack_client_net(bluebridge_proto::HostId(h.host_id))
    );
    let (server_port, client_port) = (
        format!("{router}{}", h.server_port),
        format!("{router}{}", h.client_port),
    );
    let alone: &[&str] = if alone { &["--replicas", "1"] } else { &[] };
    stage::status(
        ctl(
            bin,
            socket,
            &[
                "register-host",
                "--id",
                &id,
                "--server-port",
                &server_port,
                "--server-mac",
                &fmt_mac(h.server_mac),
                "--client-port",
                &client_port,
                "--client-mac",
                &fmt_mac(h.client_mac),
                "--client-net",
                &net,
            ],
        )
        .args(alone),
    )
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
    if a.kill_primary && a.replicas < 2 {
        bail!("--kill-primary needs --replicas 2 (a host without a backup just dies)");
    }
    if a.kill_primary && !(1..=a.hosts).contains(&a.victim) {
        bail!("--victim {}: the rack has hosts 1 to {}", a.victim, a.hosts);
    }
    if a.kill_primary && a.hosts < 4 {
        bail!(
            "--kill-primary needs 4 hosts at least (a victim, a backup, and one host without a backup to compare with)"
        );
    }
    let daemon_args = vec!["--replicas".to_owned(), a.replicas.to_string()];
    let opts = LabOptions {
        backend: a.backend.clone(),
        daemon_args,
        // The last host keeps no backup: replication's cost is measured against it.
        unreplicated: if a.kill_primary {
            vec![a.hosts]
        } else {
            Vec::new()
        },
    };
    let mut lab = RackLab::start(&mut s, NAME, a.hosts, &opts, &bin, &interrupted)?;
    if a.replicas > 1 {
        s.run(
            "replication: every host paired with a backup (bluebridge-ctl status)",
            || wait_paired(&lab, &bin, &opts.unreplicated),
        )?;
    }
    let socket = &lab.socket.clone();
    let layout = out.join("rack-layout.json");
    std::fs::write(&layout, serde_json::to_string_pretty(&lab.rack.hosts)?)?;
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
    if a.backend == "xdp" && !a.no_controller_restart {
        s.run(
            "controller restart under load: SIGKILL the daemon while all clients work, 300 ms without one, a new daemon adopts the pinned switch",
            || restart_under_load(&mut lab, &bin, &layout, a.iterations),
        )?;
    }
    if a.kill_primary {
        s.run(
            &format!(
                "failover: every client writes its pages on every other host while host {}'s server is killed (SIGKILL); its backup takes over",
                a.victim
            ),
            || kill_primary(&mut lab, &bin, &layout, &out, a),
        )?;
    }
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
        print_route_updates(&v["route_updates"], &a.backend);
        Ok(())
    })?;
    s.run(
        "Prometheus metrics: GET /metrics from every server (--metrics) and the controller",
        || scrape_all(&lab, &a.backend),
    )?;
    if let Some(ovs) = &lab.ovs {
        s.run("the bridge's flows (ovs-ofctl dump-flows)", || {
            let mgmt = format!(
                "unix:{}",
                ovs.rundir.join(format!("{}.mgmt", ovs.bridge)).display()
            );
            let flows = bluebridge_topology::run(
                Command::new("ovs-ofctl")
                    .env("OVS_RUNDIR", &ovs.rundir)
                    .args(["-O", "OpenFlow15", "dump-flows", &mgmt]),
            )?;
            let n = |table: &str| flows.lines().filter(|l| l.contains(table)).count();
            println!(
                "      {} flows: {} in table 0 (source filters), {} in table 1 (routes)",
                n("cookie="),
                n("table=0,"),
                n("table=1,")
            );
            Ok(())
        })?;
    }
    if a.backend == "kernel" {
        s.run("the switch kernel's tables (ip -6 route / neigh)", || {
            let count = |what: &str| -> Result<usize> {
                let t = bluebridge_topology::ip_in(&lab.rack.switch, &["-6", what, "show"])?;
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

/// Kills the controller daemon under load and starts a new one (see `--no-controller-restart`):
/// the workload (all clients at once, run after run) must see no error and the switch's routes
/// must be the same before and after.
fn restart_under_load(lab: &mut RackLab, bin: &Path, layout: &Path, iterations: u32) -> Result<()> {
    let routes = |lab: &RackLab| -> Result<Vec<u8>> {
        let o = ctl(bin, &lab.socket, &["--json", "routes"]).output()?;
        if !o.status.success() {
            bail!("bluebridge-ctl routes failed");
        }
        Ok(o.stdout)
    };
    let before = routes(lab)?;
    // Workload runs back to back until the new controller answers, so clients work
    // throughout the time without one; every run must end without an error.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (bin, layout, stop) = (bin.to_owned(), layout.to_owned(), stop.clone());
        std::thread::spawn(move || -> Result<u32> {
            let mut runs = 0;
            while runs == 0 || !stop.load(Ordering::Relaxed) {
                let st = Command::new(bin.join("bluebridge-rack"))
                    .arg("--layout")
                    .arg(&layout)
                    .args(["--iterations", &iterations.to_string(), "--single", "1"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .status()
                    .context("running the workload")?;
                runs += 1;
                if !st.success() {
                    bail!("workload run {runs} failed across the controller restart ({st})");
                }
            }
            Ok(runs)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    let crashed = lab
        .daemon
        .take()
        .context("the rack has no controller daemon")?
        .crash();
    let restarted = crashed.and_then(|()| {
        println!("      controller killed (SIGKILL)");
        std::thread::sleep(Duration::from_millis(300));
        Daemon::start(
            bin,
            &DaemonAt::rack(&lab.rack),
            &lab.socket,
            "xdp",
            &lab.daemon_args,
        )
        .map(|(d, up)| (d, up, killed.elapsed()))
    });
    stop.store(true, Ordering::Relaxed);
    let runs = load
        .join()
        .map_err(|_| anyhow::anyhow!("the workload thread panicked"))?;
    let (d, up, down) = restarted?;
    lab.daemon = Some(d);
    let runs = runs?;
    println!(
        "      new controller answering {:.0} ms after its start ({:.0} ms after the kill); {runs} workload run(s) of {iterations} iterations around it",
        up.as_secs_f64() * 1e3,
        down.as_secs_f64() * 1e3,
    );
    if routes(lab)? != before {
        bail!("the switch's routes changed across the restart");
    }
    println!("      workload: 0 errors; routes identical before and after");
    Ok(())
}

/// Waits (30 s at most) until every host but `unreplicated` is paired with a backup in step.
fn wait_paired(lab: &RackLab, bin: &Path, unreplicated: &[u16]) -> Result<()> {
    let t = Instant::now();
    loop {
        let o = ctl(bin, &lab.socket, &["--json", "status"]).output()?;
        if !o.status.success() {
            bail!("bluebridge-ctl status failed");
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        let hosts = v.as_array().context("status: a list")?;
        let pending: Vec<u64> = hosts
            .iter()
            .filter(|h| {
                let id = h["id"].as_u64().unwrap_or(0);
                let r = &h["replication"];
                let in_step =
                    r["paired"].as_bool() == Some(true) && r["copy_total"].as_u64() == Some(0);
                !(unreplicated.contains(&(id as u16)) || in_step)
            })
            .filter_map(|h| h["id"].as_u64())
            .collect();
        if pending.is_empty() {
            println!(
                "      {} hosts paired in {:.0} ms",
                hosts.len() - unreplicated.len(),
                t.elapsed().as_secs_f64() * 1e3
            );
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("hosts {pending:?} found no backup within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The failover run: `bluebridge-failover` drives every client; when it says READY the
/// victim's server is killed with SIGKILL half a second later. Fails on any acknowledged
/// write lost or client error.
fn kill_primary(
    lab: &mut RackLab,
    bin: &Path,
    layout: &Path,
    out: &Path,
    a: &RackArgs,
) -> Result<()> {
    use std::io::BufRead as _;

    let victim = lab
        .rack
        .hosts
        .iter()
        .position(|h| h.host_id == a.victim)
        .context("the victim is not in the rack")?;
    // Replication's cost from host 1's client: a replicated host that is not the victim
    // against the one without a backup.
    let cost_on = (1..a.hosts)
        .find(|&h| h != a.victim && h != 1)
        .unwrap_or(a.victim);
    let report = out.join("rack-failover.json");
    stage::status(&mut ctl(
        bin,
        &lab.socket,
        &[
            "health",
            "--interval-ms",
            &a.health_interval_ms.to_string(),
            "--misses",
            &a.health_misses.to_string(),
        ],
    ))?;
    let mut child = Command::new(bin.join("bluebridge-failover"))
        .arg("--layout")
        .arg(layout)
        .args(["--victim", &a.victim.to_string()])
        .args(["--seconds", &a.kill_seconds.to_string()])
        .args(["--cost-on", &cost_on.to_string()])
        .args(["--cost-off", &a.hosts.to_string()])
        .arg("--json")
        .arg(&report)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting bluebridge-failover")?;
    let stdout = child.stdout.take().context("its output")?;
    let mut stdin = child.stdin.take().context("its input")?;
    let mut killed = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        println!("      {line}");
        if line.starts_with("READY") && killed.is_none() {
            std::thread::sleep(Duration::from_millis(500));
            let mut p = lab.servers[victim]
                .take()
                .context("the victim's server is not running")?;
            p.kill()?;
            // The workload measures each page's window from here.
            use std::io::Write as _;
            writeln!(stdin, "KILLED")?;
            killed = Some(Instant::now());
            println!("      host {}'s server killed (SIGKILL)", a.victim);
        }
    }
    let st = child.wait()?;
    if killed.is_none() {
        bail!("bluebridge-failover never got its clients going ({st})");
    }
    let f = ctl(bin, &lab.socket, &["failovers"]).output()?;
    print!("{}", String::from_utf8_lossy(&f.stdout));
    if !st.success() {
        bail!("bluebridge-failover failed ({st})");
    }
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
    let errors = r["client_errors"].as_u64().unwrap_or(u64::MAX);
    if errors > 0 {
        bail!("{errors} client errors across the failover");
    }
    Ok(())
}

/// `GET http://ADDR/metrics` from inside namespace `ns`, parsed.
fn scrape_in(ns: &str, addr: &str) -> Result<BTreeMap<String, f64>> {
    let addr = addr.parse()?;
    bluebridge_topology::run_in(ns, || bluebridge_metrics::scrape(addr))?
        .map_err(anyhow::Error::msg)
}

/// Scrapes every running server and the controller; checks every server counted requests, the
/// controller sees those hosts up, and, where the switch counts (XDP, OVS), that it forwarded
/// at least the requests the servers took.
fn scrape_all(lab: &RackLab, backend: &str) -> Result<()> {
    let get = |m: &BTreeMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0) as u64;
    let sum = |m: &BTreeMap<String, f64>, keep: &dyn Fn(&str) -> bool| -> u64 {
        m.iter()
            .filter(|(k, _)| keep(k))
            .map(|(_, v)| *v as u64)
            .sum()
    };
    let c = scrape_in(&lab.rack.switch, CTL_METRICS).context("the controller")?;
    let (mut requests, mut live) = (0u64, 0usize);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for (h, running) in lab.rack.hosts.iter().zip(&lab.servers) {
        if running.is_none() {
            continue; // killed on purpose (--kill-primary)
        }
        live += 1;
        let m = scrape_in(&h.ns, SERVER_METRICS)
            .with_context(|| format!("host {}'s server", h.host_id))?;
        let r = sum(&m, &|k| k.starts_with("bluebridge_requests_total{"));
        if r == 0 {
            bail!("host {}'s server counted no requests", h.host_id);
        }
        let up = format!("bluebridge_ctl_host_up{{host=\"{}\"}}", h.host_id);
        if get(&c, &up) != 1 {
            bail!("the controller's metrics show host {} down", h.host_id);
        }
        requests += r;
        for (k, v) in &m {
            if let Some(st) = k
                .strip_prefix("bluebridge_replies_total{status=\"")
                .and_then(|k| k.strip_suffix("\"}"))
                .filter(|&st| st != "OK" && *v > 0.0)
            {
                *errors.entry(st.to_owned()).or_default() += *v as u64;
            }
        }
    }
    let errors = if errors.is_empty() {
        "none".to_owned()
    } else {
        let e: Vec<String> = errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
        e.join(", ")
    };
    let forwarded = get(
        &c,
        "bluebridge_ctl_switch_frames_total{verdict=\"forwarded\"}",
    );
    println!(
        "      {live} servers: {requests} requests; error statuses: {errors}; controller: those hosts up, {} migrations since it started, switch forwarded {forwarded}",
        get(&c, "bluebridge_ctl_migrations_total"),
    );
    if matches!(backend, "xdp" | "ovs") && forwarded < requests {
        bail!(
            "the switch forwarded {forwarded} frames, fewer than the {requests} requests the servers took"
        );
    }
    Ok(())
}
