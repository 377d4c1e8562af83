//! `cargo xtask fabric`: BlueBridge across racks on real routing software. Two racks, each a
//! top-of-rack router (FRR: zebra, staticd, bgpd; the kernel's forwarding table is the data
//! plane) with hosts around it, and a spine router, talking eBGP with private AS numbers
//! (RFC 7938). One controller (`bluebridge-ctl daemon --backend bgp`, in rack 1) hands every
//! host's routes to its rack's router, which announces them. Then: every client allocates,
//! writes, reads back and frees pages on hosts of both racks (`bluebridge-rack`); a page is
//! migrated between the racks while a client in each writes and reads it back, and a host of
//! rack 2 is stopped until its /48 is withdrawn and continued until it returns
//! (`bluebridge-fabric`), each route change timed from the controller to the other rack.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bluebridge_topology::{LeafSpine, namespaces_with_prefix};

use crate::lab::{self, ServerProc};
use crate::rack::{Daemon, DaemonAt, ctl, print_route_updates, register, start_servers};
use crate::root;
use crate::stage::{self, Stages};

/// Options of the fabric run.
#[derive(Debug, clap::Args)]
pub(crate) struct FabricArgs {
    /// Hosts in each of the two racks (each runs a server and a client).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=50))]
    hosts_per_rack: u16,
    /// Iterations in which every client works at once (ALLOC, WRITE, READ back, FREE on a
    /// random other host, in either rack).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    iterations: u32,
    /// Iterations of one client alone afterwards.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    single: u32,
    /// Migrations of a page between the racks (alternately into rack 2 and back), each
    /// timed to the first answer through the new path in both racks.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    migrations: u32,
    /// The controller's health checks: a STAT to every host this often, ms (a stopped host is
    /// withdrawn after --health-misses of them).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(5..=60_000))]
    health_interval_ms: u64,
    /// Checks missed in a row before a host's /48 is withdrawn.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    health_misses: u32,
    /// Where the JSON reports go.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Do not check or install Debian packages.
    #[arg(long)]
    no_packages: bool,
}

const NAME: &str = "bbfab";

/// Everything brought up; dropped in this order on every exit path.
struct FabricLab {
    servers: Vec<Option<ServerProc>>,
    daemon: Option<Daemon>,
    fabric: LeafSpine,
    socket: PathBuf,
}

/// Waits until `router`'s forwarding table holds every host's /48 (announced by the other
/// rack's router through the spine, or installed by the controller locally).
fn wait_routes(router: &str, hosts: &[u16], timeout: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        let table = bluebridge_topology::ip_in(router, &["-6", "route", "show"])?;
        let missing: Vec<u16> = hosts
            .iter()
            .copied()
            .filter(|&id| {
                let net =
                    bluebridge_proto::NetPrefix::DEFAULT.host_network(bluebridge_proto::HostId(id));
                !table.contains(&format!("{net}/48"))
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if t.elapsed() > timeout {
            bail!("{router} has no route to hosts {missing:?} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until every host has answered the controller's health checks.
fn wait_answered(bin: &Path, socket: &Path, timeout: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        let o = ctl(bin, socket, &["--json", "status"]).output()?;
        if !o.status.success() {
            bail!("bluebridge-ctl status failed");
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        let silent: Vec<u64> = v
            .as_array()
            .context("status: a list")?
            .iter()
            .filter(|h| h["health"]["pages_total"].as_u64().unwrap_or(0) == 0)
            .filter_map(|h| h["id"].as_u64())
            .collect();
        if silent.is_empty() {
            return Ok(());
        }
        if t.elapsed() > timeout {
            bail!("hosts {silent:?} never answered the controller");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(crate) fn run(a: &FabricArgs) -> Result<()> {
    let interrupted = lab::interrupt_flag()?;
    let mut s = Stages::new();
    let hosts = 2 * a.hosts_per_rack;
    let _huge = lab::prepare(
        &mut s,
        a.no_packages,
        &["bluebridge-server", "bluebridge-switch", "bluebridge-bench"],
        NAME,
        8 * u64::from(hosts),
    )?;
    let bin = root().join("target/release");
    let out = root().join(&a.out);
    std::fs::create_dir_all(&out)?;
    let per = usize::from(a.hosts_per_rack);
    let mut fabric = None;
    s.run(
        &format!(
            "fabric: 2 racks of {per} hosts, each rack's switch an FRR router (zebra, staticd, bgpd; AS 65101, 65102), a spine FRR router (AS 65000), eBGP up"
        ),
        || {
            let t = Instant::now();
            fabric = Some(LeafSpine::create(NAME, 2, per, 9000)?);
            println!(
                "      routers up and BGP sessions established in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            Ok(())
        },
    )?;
    let fabric = fabric.expect("created");
    let socket = std::env::temp_dir().join(format!("{NAME}-{}.sock", std::process::id()));
    let mut lab = FabricLab {
        servers: Vec::new(),
        daemon: None,
        fabric,
        socket,
    };
    let routers: Vec<String> = lab.fabric.racks.iter().map(|r| r.switch.clone()).collect();
    let all = lab.fabric.hosts();
    let ids: Vec<u16> = all.iter().map(|h| h.host_id).collect();
    s.run(
        &format!(
            "controller: bluebridge-ctl daemon --backend bgp in {} (routes to FRR with vtysh; health checks every {} ms)",
            routers[0], a.health_interval_ms
        ),
        || {
            let rack1 = &lab.fabric.racks[0];
            let at = DaemonAt {
                ns: &rack1.switch,
                link_if: &rack1.controller_if,
                link_port: &rack1.controller_port,
            };
            let extra = [
                "--frr-instance".to_owned(),
                rack1.switch.clone(),
                "--health-interval-ms".to_owned(),
                a.health_interval_ms.to_string(),
                "--health-misses".to_owned(),
                a.health_misses.to_string(),
            ];
            lab.daemon = Some(Daemon::start(&bin, &at, &lab.socket, "bgp", &extra)?.0);
            Ok(())
        },
    )?;
    s.run(
        &format!("start {hosts} servers (idle mode, 16 MiB arena each)"),
        || {
            lab.servers = start_servers(&all, &bin, &interrupted)?;
            Ok(())
        },
    )?;
    s.run(
        &format!(
            "register {hosts} hosts: each one's /48 and client /64 a static route on its rack's router"
        ),
        || {
            for h in &all {
                let router = lab
                    .fabric
                    .router_of(h.host_id)
                    .context("a host outside the racks")?;
                register(&bin, &lab.socket, h, &format!("{router}/"), false)?;
            }
            Ok(())
        },
    )?;
    s.run(
        "BGP: every host's /48 in both racks' forwarding tables, every host answering the controller",
        || {
            let t = Instant::now();
            for r in &routers {
                wait_routes(r, &ids, Duration::from_secs(30))?;
            }
            let routed = t.elapsed();
            wait_answered(&bin, &lab.socket, Duration::from_secs(30))?;
            println!(
                "      routes everywhere {:.0} ms after the last registration; every host answering after {:.0} ms",
                routed.as_secs_f64() * 1e3,
                t.elapsed().as_secs_f64() * 1e3
            );
            Ok(())
        },
    )?;
    let layout = out.join("fabric-layout.json");
    std::fs::write(&layout, serde_json::to_string_pretty(&all)?)?;
    s.run(
        &format!(
            "workload: {} iterations of all {hosts} clients at once, then {} of one client (ALLOC, WRITE, READ back, FREE on a random other host in either rack)",
            a.iterations, a.single
        ),
        || {
            stage::status(
                Command::new(bin.join("bluebridge-rack"))
                    .arg("--layout")
                    .arg(&layout)
                    .args(["--iterations", &a.iterations.to_string()])
                    .args(["--single", &a.single.to_string()])
                    .arg("--json")
                    .arg(out.join("fabric-rack.json")),
            )
        },
    )?;
    let victim = *ids.last().expect("hosts");
    let victim_pid = lab
        .servers
        .last()
        .and_then(Option::as_ref)
        .context("the victim's server is not running")?
        .pid();
    s.run(
        &format!(
            "route changes: {} migrations of a page between the racks while a client in each writes and reads it back; host {victim} stopped until its /48 is withdrawn, continued until it returns",
            a.migrations
        ),
        || {
            stage::status(
                Command::new(bin.join("bluebridge-fabric"))
                    .arg("--layout")
                    .arg(&layout)
                    .args(["--rack-size", &per.to_string()])
                    .arg("--controller")
                    .arg(&lab.socket)
                    .arg("--routers")
                    .arg(routers.join(","))
                    .args(["--migrations", &a.migrations.to_string()])
                    .args(["--victim", &victim.to_string()])
                    .args(["--victim-pid", &victim_pid.to_string()])
                    .arg("--json")
                    .arg(out.join("fabric.json")),
            )
        },
    )?;
    s.run(
        "route updates (bluebridge-ctl counters) and the routers' tables",
        || {
            let o = ctl(&bin, &lab.socket, &["--json", "counters"]).output()?;
            if !o.status.success() {
                bail!("bluebridge-ctl counters failed");
            }
            std::fs::write(out.join("fabric-switch.json"), &o.stdout)?;
            let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
            let u = &v["route_updates"];
            print_route_updates(u, "bgp: controller → FRR with vtysh");
            if u["failed"].as_u64() != Some(0) {
                bail!("FRR refused route changes");
            }
            for r in routers.iter().chain(std::iter::once(&lab.fabric.spine)) {
                let count = |what: &str| -> Result<usize> {
                    let t = bluebridge_topology::ip_in(r, &["-6", what, "show"])?;
                    Ok(t.lines()
                        .filter(|l| l.contains("fd00:bb") || what == "neigh")
                        .count())
                };
                println!(
                    "      {r}: {} BlueBridge routes, {} neighbour entries",
                    count("route")?,
                    count("neigh")?
                );
            }
            Ok(())
        },
    )?;
    s.run("stop the servers, the controller and the routers", || {
        for p in lab.servers.drain(..).flatten() {
            p.stop()?;
        }
        drop(lab.daemon.take());
        Ok(())
    })?;
    drop(lab);
    let left = namespaces_with_prefix(NAME);
    if !left.is_empty() {
        bail!("namespaces left behind: {left:?}");
    }
    s.finish();
    Ok(())
}
