//! `bluebridge-ctl`: the BlueBridge controller daemon and its command-line client.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bluebridge_proto::NetPrefix;
use bluebridge_switch::api::{self, Request};
use bluebridge_switch::bgp::BgpFabric;
use bluebridge_switch::metrics::ControllerCollector;
use bluebridge_switch::ovs::OvsFabric;
use bluebridge_switch::{
    Controller, Counters, FailoverReport, HostSpec, HostStatus, HotPage, LinkSpec, Migration,
    OwnerInfo, Reclaimed, RouteInfo, SuperviseConfig, supervise,
};
use clap::{Parser, Subcommand};

/// The BlueBridge controller: `daemon` loads the XDP top-of-rack switch into the switch's
/// network namespace and serves its control API on a Unix socket; the other commands talk to
/// that daemon.
#[derive(Parser, Debug)]
#[command(name = "bluebridge-ctl", version)]
struct Cli {
    /// The control socket.
    #[arg(long, global = true, default_value = "/run/bluebridge/ctl.sock")]
    socket: PathBuf,
    /// Print answers as JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// The forwarding plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    /// The XDP top-of-rack switch.
    Xdp,
    /// The kernel's IPv6 forwarding table.
    Kernel,
    /// FRR routers: routes become static routes that their BGP announces to the fabric.
    Bgp,
    /// An Open vSwitch bridge's OpenFlow tables.
    Ovs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the controller (as root, inside the switch's network namespace, e.g. with `ip netns
    /// exec`): loads tor.bpf.c, attaches it to each port as hosts are registered, serves the
    /// control socket until SIGINT or SIGTERM (the program is detached on exit).
    Daemon {
        /// The deployment's /32 prefix.
        #[arg(long, default_value = "fd00:bb::/32")]
        prefix: NetPrefix,
        /// Pass non-BlueBridge frames to the switch's kernel instead of dropping them.
        #[arg(long)]
        pass_other: bool,
        /// Attach in generic (SKB) mode instead of trying driver mode first.
        #[arg(long)]
        generic: bool,
        /// What forwards: `xdp` (tor.bpf.c: routes, source filters, counters, failover
        /// answers, invalidation), `kernel` (the switch namespace's own IPv6 forwarding
        /// table over rtnetlink: routes and one neighbour entry per port, nothing else),
        /// `bgp` (FRR routers: each route a static route on its port's router, announced over
        /// BGP; ports are ROUTER/IFNAME; docs/switch.md "Deploying on a fabric") or `ovs` (an
        /// Open vSwitch bridge's OpenFlow flows: routes, source filters, counters).
        #[arg(long, value_enum, default_value_t = Backend::Xdp)]
        backend: Backend,
        /// --backend bgp: the FRR instance (`vtysh -N NAME`, the router's namespace) of ports
        /// given without ROUTER/; default FRR's unnamed instance.
        #[arg(long)]
        frr_instance: Option<String>,
        /// --backend ovs: the bridge.
        #[arg(long, default_value = "bbr0")]
        ovs_bridge: String,
        /// --backend ovs: the run directory of its ovs-vswitchd and ovsdb-server (where
        /// BRIDGE.mgmt and db.sock are).
        #[arg(long, default_value = "/var/run/openvswitch")]
        ovs_rundir: PathBuf,
        /// The controller's own interface (in the switch namespace) for health checks and
        /// placement; without it neither runs.
        #[arg(long, requires = "link_port")]
        link: Option<String>,
        /// The switch port cabled to --link.
        #[arg(long)]
        link_port: Option<String>,
        /// Milliseconds between health-check rounds (a STAT to every host).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=60_000))]
        health_interval_ms: u64,
        /// Health checks missed in a row before a host is declared dead: a replicated host's
        /// backup then takes its pages over; any other host is withdrawn (its requests are
        /// answered UNREACHABLE by the switch). A check is missed when its STAT is not answered
        /// within one interval, so a dead host is found after about misses × interval.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
        health_misses: u32,
        /// Copies of each host's pages unless its registration says otherwise: 1 (no backup)
        /// or 2 (every change a client is told about is also on a backup host, which takes the
        /// pages over when the host dies; docs/switch.md "Replication"). Hosts are paired at
        /// their first health check, before they serve.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        replicas: u8,
        /// How fast a backup that joins a host with pages (a new backup after a failover, or
        /// after the old backup died) gets its copy of them, MiB/s; the host's clients are
        /// served meanwhile, unreplicated until the copy ends.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        copy_rate_mib: u64,
        /// Pin the switch's maps and port links in this directory (on a bpf filesystem, which
        /// must be mounted from the host's mount namespace, not inside `ip netns exec`): if
        /// this daemon dies the switch keeps forwarding, and the next daemon started with the
        /// same directory adopts it without touching traffic. Default: /run/bluebridge/bpf/
        /// and the control socket's file name.
        #[arg(long, conflicts_with = "no_pin")]
        pin_dir: Option<PathBuf>,
        /// Do not pin: the switch goes with this daemon.
        #[arg(long)]
        no_pin: bool,
        /// On SIGINT/SIGTERM, exit leaving the pinned switch forwarding (for a restart or an
        /// upgrade of the controller) instead of detaching it and removing its pins.
        #[arg(long, conflicts_with = "no_pin")]
        keep_switch: bool,
        /// Serve Prometheus metrics over HTTP at ADDR:PORT, path /metrics (e.g.
        /// 127.0.0.1:9465): the switch's verdicts, per-host route and port counters, host
        /// health, migrations, failovers, route-update latency. In the namespace the daemon
        /// runs in.
        #[arg(long, value_name = "ADDR:PORT")]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Is the daemon there?
    Ping,
    /// Register a host: route its /48 to its server's port (and its client prefix to its
    /// client's port), allow those sources on those ports.
    RegisterHost {
        /// Host id (1 to 32767).
        #[arg(long)]
        id: u16,
        /// Switch port (interface in the switch namespace) of its server.
        #[arg(long)]
        server_port: String,
        /// The server interface's MAC.
        #[arg(long)]
        server_mac: String,
        /// Switch port of its client link.
        #[arg(long, requires_all = ["client_mac", "client_net"])]
        client_port: Option<String>,
        /// The client interface's MAC.
        #[arg(long)]
        client_mac: Option<String>,
        /// The client link's prefix, NETWORK/LEN inside the host's /48.
        #[arg(long)]
        client_net: Option<String>,
        /// Copies of this host's pages: 1 (no backup) or 2 (one backup); default: the
        /// daemon's --replicas.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
        replicas: Option<u8>,
    },
    /// Withdraw a host's routes.
    UnregisterHost {
        /// Host id.
        #[arg(long)]
        id: u16,
    },
    /// The registered hosts.
    Hosts,
    /// Health, occupancy and placement per host.
    Status,
    /// The switch's routes.
    Routes,
    /// The failovers so far: which host's pages moved where, and how long detection, the
    /// promotion and the route change took.
    Failovers,
    /// Change the health checks while the daemon runs (each flag optional; no flag: show
    /// them): a dead host is found after about misses × interval.
    Health {
        /// Milliseconds between rounds (a STAT to every host, given up after one round).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=60_000))]
        interval_ms: Option<u64>,
        /// Rounds missed in a row before a host is declared dead.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
        misses: Option<u32>,
    },
    /// The switch's verdicts and per-host traffic.
    Counters,
    /// The pages with the most requests through the switch.
    HotPages {
        /// How many.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        top: u32,
    },
    /// Move a page to another host while clients keep using its address (needs the daemon's
    /// --link).
    Migrate {
        /// The page's address (any opcode).
        #[arg(long)]
        page: String,
        /// The host to move it to.
        #[arg(long)]
        to: u16,
    },
    /// Who holds pages on a host, and for how long each has been silent (needs the daemon's
    /// --link).
    Owners {
        /// Host id.
        #[arg(long)]
        host: u16,
    },
    /// Free every page one owner holds on a host, shared and detached ones included: for a
    /// client that is gone for good (needs the daemon's --link).
    Reclaim {
        /// Host id.
        #[arg(long)]
        host: u16,
        /// The owner's IPv6 address (as `owners` lists it).
        #[arg(long)]
        owner: std::net::Ipv6Addr,
    },
}

/// One cell of the status table: where a host's pages are and who backs them up.
fn replication_text(id: u16, r: &bluebridge_switch::Replication) -> String {
    let mut t = String::new();
    if r.holder != id {
        t += &format!("held by host {} (epoch {}); ", r.holder, r.epoch);
    }
    match (r.replicas, r.backup, r.paired) {
        (_, Some(b), true) if r.copy_total > 0 => {
            t += &format!(
                "copying to backup host {b}: {} of {} pages to go",
                r.copy_left, r.copy_total
            );
        }
        (_, Some(b), true) => {
            t += &format!(
                "backup host {b} (epoch {}), {} B behind, {} replies held",
                r.epoch, r.lag_bytes, r.held
            );
        }
        (_, Some(b), false) => t += &format!("pairing with host {b}"),
        (2, None, _) => t += "no backup",
        _ => t += "not replicated",
    }
    if let Some(n) = &r.note {
        t += &format!(" ({n})");
    }
    t
}

fn main() -> Result<()> {
    bluebridge_client::init_logging("info");
    let cli = Cli::parse();
    let req = match cli.cmd {
        Cmd::Daemon {
            prefix,
            pass_other,
            generic,
            backend,
            frr_instance,
            ovs_bridge,
            ovs_rundir,
            link,
            link_port,
            health_interval_ms,
            health_misses,
            replicas,
            copy_rate_mib,
            pin_dir,
            no_pin,
            keep_switch,
            metrics,
        } => {
            // Bound first: a taken address is one line, before anything is attached.
            let listener = metrics
                .map(bluebridge_metrics::Listener::bind)
                .transpose()?;
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(sig, stop.clone())?;
            }
            let pin_dir = (backend == Backend::Xdp && !no_pin).then(|| {
                pin_dir.unwrap_or_else(|| {
                    let stem = cli.socket.file_stem().unwrap_or_default();
                    PathBuf::from("/run/bluebridge/bpf").join(stem)
                })
            });
            let mut adopted = None;
            let mut ctl = match (backend, &pin_dir) {
                (Backend::Xdp, Some(dir)) => {
                    let (c, a) = Controller::new_pinned(prefix, pass_other, generic, dir)
                        .with_context(|| {
                            format!(
                                "loading the switch program pinned in {} (needs root, in the \
                                 switch namespace; --no-pin runs without pins)",
                                dir.display()
                            )
                        })?;
                    adopted = a;
                    c
                }
                (Backend::Xdp, None) => Controller::new(prefix, pass_other, generic)
                    .context("loading the switch program (needs root, in the switch namespace)")?,
                (Backend::Kernel, _) => Controller::new_kernel(prefix)
                    .context("programming the kernel's forwarding table (needs root)")?,
                (Backend::Bgp, _) => Controller::new_bgp(
                    prefix,
                    BgpFabric::new(frr_instance)
                        .context("reaching FRR (vtysh; is FRR running, and is it root?)")?,
                ),
                (Backend::Ovs, _) => Controller::new_ovs(
                    prefix,
                    OvsFabric::new(&ovs_bridge, &ovs_rundir, prefix).with_context(|| {
                        format!(
                            "taking over Open vSwitch bridge {ovs_bridge} (run directory {})",
                            ovs_rundir.display()
                        )
                    })?,
                ),
            };
            if let Some(a) = &adopted {
                println!(
                    "bluebridge-ctl: adopted the switch pinned in {}: {} host(s) ({} withdrawn), \
                     {} client link(s), {} migrated page(s), {} port(s), in {:.1} ms",
                    pin_dir
                        .as_deref()
                        .unwrap_or(std::path::Path::new("?"))
                        .display(),
                    a.hosts,
                    a.withdrawn,
                    a.client_links,
                    a.page_routes,
                    a.ports,
                    a.elapsed_us / 1e3
                );
            }
            ctl.set_misses_allowed(health_misses);
            ctl.set_replicas(replicas)?;
            ctl.set_copy_rate(copy_rate_mib << 20);
            let linked = match (link, link_port) {
                (Some(ifname), Some(port)) => {
                    ctl.attach_link(&LinkSpec { ifname, port })
                        .context("setting up the controller's link")?;
                    ctl.commit().context("installing the controller's route")?;
                    true
                }
                _ => false,
            };
            let ctl = Arc::new(Mutex::new(ctl));
            let exporter = listener.map(|l| {
                l.serve(bluebridge_metrics::registry_of(ControllerCollector::new(
                    ctl.clone(),
                )))
            });
            if let Some(e) = &exporter {
                println!(
                    "bluebridge-ctl: Prometheus metrics at http://{}/metrics",
                    e.local_addr()
                );
            }
            let supervisor = linked.then(|| {
                let (ctl, stop) = (ctl.clone(), stop.clone());
                let cfg = SuperviseConfig {
                    interval: Duration::from_millis(health_interval_ms),
                };
                std::thread::spawn(move || supervise(&ctl, cfg, &stop))
            });
            println!(
                "bluebridge-ctl: controller ({} backend) for {prefix} on {}{}",
                ctl.lock().map(|c| c.backend()).unwrap_or("?"),
                cli.socket.display(),
                if supervisor.is_some() {
                    format!("; health checks every {health_interval_ms} ms, placement on")
                } else {
                    "; no link: no health checks or placement".into()
                }
            );
            api::serve(ctl.clone(), &cli.socket, &stop)
                .with_context(|| format!("serving {}", cli.socket.display()))?;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(s) = supervisor {
                let _ = s.join();
            }
            drop(exporter);
            if keep_switch {
                if let Ok(mut c) = ctl.lock() {
                    c.keep_forwarding();
                }
                println!(
                    "bluebridge-ctl: stopped; the switch keeps forwarding, pinned in {}",
                    pin_dir
                        .as_deref()
                        .unwrap_or(std::path::Path::new("?"))
                        .display()
                );
            } else if backend == Backend::Xdp {
                println!("bluebridge-ctl: stopped; switch program detached");
            } else {
                println!("bluebridge-ctl: stopped; the routes stay in the forwarding plane");
            }
            return Ok(());
        }
        Cmd::Ping => Request::Ping,
        Cmd::RegisterHost {
            id,
            server_port,
            server_mac,
            client_port,
            client_mac,
            client_net,
            replicas,
        } => Request::RegisterHost(HostSpec {
            id,
            server_port,
            server_mac,
            client_port,
            client_mac,
            client_net,
            replicas,
        }),
        Cmd::UnregisterHost { id } => Request::UnregisterHost { id },
        Cmd::Hosts => Request::Hosts,
        Cmd::Status => Request::Status,
        Cmd::Routes => Request::Routes,
        Cmd::Failovers => Request::Failovers,
        Cmd::Health {
            interval_ms,
            misses,
        } => Request::Health {
            interval_ms,
            misses,
        },
        Cmd::Counters => Request::Counters,
        Cmd::HotPages { top } => Request::HotPages { top: top as usize },
        Cmd::Migrate { page, to } => Request::Migrate { page, to },
        Cmd::Owners { host } => Request::Owners { host },
        Cmd::Reclaim { host, owner } => Request::Reclaim {
            host,
            owner: owner.to_string(),
        },
    };
    let v = api::call(&cli.socket, &req)?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match req {
        Request::Routes => {
            let routes: Vec<RouteInfo> = serde_json::from_value(v)?;
            println!("| prefix | port | next hop | id |\n|---|---|---|---|");
            for r in routes {
                println!("| {} | {} | {} | {} |", r.prefix, r.port, r.next_hop, r.id);
            }
        }
        Request::Counters => {
            let c: Counters = serde_json::from_value(v)?;
            let s = c.switch;
            println!(
                "switch: forwarded {} | dropped: no route {}, spoofed {}, not BlueBridge {}, malformed {}, hop limit {}, no port {} | passed to kernel {}",
                s.forwarded,
                s.no_route,
                s.spoofed,
                s.other_dropped,
                s.malformed,
                s.hop_limit,
                s.no_port,
                s.other_passed
            );
            println!(
                "controller: invalidations {} (freed reports lost {}, repeated and ignored {}) | migrations {} (abandoned {})",
                c.invalidations,
                s.freed_lost,
                c.freed_repeats,
                c.migrations,
                c.migrations_abandoned
            );
            println!(
                "| host | requests to server | replies from server | to client | from client |\n|---|---|---|---|---|"
            );
            for h in c.hosts {
                println!(
                    "| {} | {} ({} B) | {} ({} B) | {} | {} |",
                    h.id,
                    h.to_server.packets,
                    h.to_server.bytes,
                    h.from_server.packets,
                    h.from_server.bytes,
                    h.to_client.packets,
                    h.from_client.packets
                );
            }
        }
        Request::HotPages { .. } => {
            let pages: Vec<HotPage> = serde_json::from_value(v)?;
            println!(
                "| page | host | requests | bytes | coherence messages |\n|---|---|---|---|---|"
            );
            for p in pages {
                println!(
                    "| {} | {} | {} | {} | {} |",
                    p.page, p.host, p.requests.packets, p.requests.bytes, p.coherence
                );
            }
        }
        Request::Hosts => {
            let hosts: Vec<HostSpec> = serde_json::from_value(v)?;
            println!(
                "| host | server port | server MAC | client port | client prefix |\n|---|---|---|---|---|"
            );
            for h in hosts {
                println!(
                    "| {} | {} | {} | {} | {} |",
                    h.id,
                    h.server_port,
                    h.server_mac,
                    h.client_port.unwrap_or_default(),
                    h.client_net.unwrap_or_default()
                );
            }
        }
        Request::Migrate { .. } => {
            let m: Migration = serde_json::from_value(v)?;
            println!(
                "{} moved from host {} to host {}: cut-over {:.0} µs (copy out {:.0}, copy in {:.0}, route {:.0})",
                m.page, m.from, m.to, m.cutover_us, m.copy_out_us, m.copy_in_us, m.route_update_us
            );
        }
        Request::Owners { host } => {
            let owners: Vec<OwnerInfo> = serde_json::from_value(v)?;
            println!("host {host}: {} owner(s)", owners.len());
            println!("| shard | owner | pages | silent for |\n|---|---|---|---|");
            for o in owners {
                let silent = match o.silent_ms {
                    u32::MAX => "never heard".to_string(),
                    ms => format!("{:.1} s", f64::from(ms) / 1e3),
                };
                println!("| {} | {} | {} | {silent} |", o.shard, o.addr, o.pages);
            }
        }
        Request::Reclaim { .. } => {
            let r: Reclaimed = serde_json::from_value(v)?;
            println!("host {}: {} page(s) of {} freed", r.host, r.pages, r.owner);
        }
        Request::Status => {
            let hosts: Vec<HostStatus> = serde_json::from_value(v)?;
            println!(
                "| host | state | missed checks | pages used / total | new pages | replication |\n|---|---|---|---|---|---|"
            );
            for h in hosts {
                println!(
                    "| {} | {} | {} | {} / {} | {} | {} |",
                    h.id,
                    if h.health.down { "DOWN" } else { "up" },
                    h.health.misses,
                    h.health.pages_used,
                    h.health.pages_total,
                    if h.placement { "here" } else { "" },
                    replication_text(h.id, &h.replication),
                );
            }
        }
        Request::Failovers => {
            let f: Vec<FailoverReport> = serde_json::from_value(v)?;
            println!(
                "| host | from | to | epoch | detection | promotion | route change |\n|---|---|---|---|---|---|---|"
            );
            for r in f {
                println!(
                    "| {} | {} | {} | {} | {:.1} ms | {:.0} µs | {:.0} µs |",
                    r.host, r.from, r.to, r.epoch, r.detect_ms, r.promote_us, r.route_us
                );
            }
        }
        Request::Health { .. } => {
            let every = v["interval_ms"]
                .as_u64()
                .map_or("the daemon's --health-interval-ms".to_owned(), |ms| {
                    format!("{ms} ms")
                });
            println!(
                "health checks every {every}; a host is dead after {} missed in a row",
                v["misses"]
            );
        }
        _ => println!("{}", v.as_str().unwrap_or("ok")),
    }
    Ok(())
}
