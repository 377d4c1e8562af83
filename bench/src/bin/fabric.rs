//! `bluebridge-fabric`: route changes on a leaf-spine fabric built by `cargo xtask fabric`,
//! seen from the racks. A page is migrated between a host in rack 1 and hosts in rack 2, back
//! and forth, while a client in each rack writes it and reads it back; each move's convergence
//! is the time from the controller's route change (the migration answered) to the first
//! answer through the new path at each rack. Then a host's server is stopped (SIGSTOP) until
//! the controller withdraws its /48 from the fabric, and continued (SIGCONT) until the route
//! returns: the withdrawal is timed to the route leaving the other rack's forwarding table, the
//! return to the first answer from the other rack.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bluebridge_bench::rack_host::{open_client, read_layout};
use bluebridge_bench::{Latencies, Percentiles};
use bluebridge_client::ClientError;
use bluebridge_proto::{HostId, RemoteAddr};
use bluebridge_switch::api::{self, Request as CtlRequest};
use bluebridge_switch::{HostStatus, Migration};
use bluebridge_topology::RackHost;
use clap::Parser;
use serde::Serialize;

/// Drives the fabric of `cargo xtask fabric` (its layout lists rack 1's hosts, then rack 2's).
/// Needs root.
#[derive(Parser, Debug)]
#[command(name = "bluebridge-fabric", version)]
struct Args {
    /// The fabric's layout (JSON: every host as `bluebridge_topology::RackHost`, rack by rack).
    #[arg(long)]
    layout: PathBuf,
    /// Hosts per rack (2 racks: the layout's first half is rack 1).
    #[arg(long, value_parser = bluebridge_xsk::cli::count(2, 1000))]
    rack_size: usize,
    /// The controller's control socket.
    #[arg(long)]
    controller: PathBuf,
    /// The top-of-rack routers' namespaces, rack 1's first (comma-separated).
    #[arg(long, value_delimiter = ',', required = true)]
    routers: Vec<String>,
    /// Migrations of the page, alternately into rack 2 and back to rack 1.
    #[arg(long, default_value_t = 10, value_parser = bluebridge_xsk::cli::count(1, 10_000))]
    migrations: usize,
    /// A host of rack 2 whose /48 is withdrawn and returns (its server stopped with SIGSTOP,
    /// then continued): needs --victim-pid.
    #[arg(long, requires = "victim_pid")]
    victim: Option<u16>,
    /// The victim's server process.
    #[arg(long)]
    victim_pid: Option<u32>,
    /// Client retransmission timeout, µs: a request answered MOVED (the route is changing) is
    /// asked again after this long, so it is also the resolution of the convergence times.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(100..=100_000))]
    rto_us: u64,
    /// Client retransmissions (MOVED answers included) before an operation fails: with
    /// --rto-us, how long a route change may take.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    retries: u32,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One migration, timed.
#[derive(Debug, Serialize)]
struct Move {
    from: u16,
    to: u16,
    /// The controller's route change (`route_update_us` of the migration).
    route_update_us: f64,
    /// From the migration's answer to the first answer through the new path, per rack.
    first_answer_us: [f64; 2],
}

/// The withdrawal and return of a host's /48.
#[derive(Debug, Serialize)]
struct Withdrawal {
    host: u16,
    /// SIGSTOP → the controller marks it down (health checks).
    detected_ms: f64,
    /// Marked down → its /48 gone from the other rack's forwarding table.
    withdrawn_us: f64,
    /// SIGCONT → the controller marks it up.
    recovered_ms: f64,
    /// Marked up → the first answer from the other rack.
    returned_us: f64,
}

/// First answers through the new path after one kind of route change, per rack.
#[derive(Debug, Default, Serialize)]
struct Convergence {
    /// Rack 1's client (the page's home rack).
    rack1_us: Percentiles,
    /// Rack 2's client.
    rack2_us: Percentiles,
}

#[derive(Debug, Serialize)]
struct Report {
    moves: Vec<Move>,
    /// Moves into rack 2: the page's /112 announced by rack 2's router (seen at once in rack
    /// 2, over BGP through the spine in rack 1).
    announced: Convergence,
    /// Moves back home: the /112 withdrawn by rack 2's router (rack 1 falls back to the home
    /// /48 when the withdrawal reaches it; until then frames for the page loop between the
    /// routers whose tables disagree).
    withdrawn: Convergence,
    route_update_us: Percentiles,
    writes: u64,
    moved_retries: u64,
    errors: u64,
    withdrawal: Option<Withdrawal>,
}

/// A client in one rack writing the page and reading it back until told to stop.
struct Writer {
    /// The first answer since the last reset: ns since the run's epoch, plus one (0: none).
    first: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Result<(u64, u64)>>,
}

fn spawn_writer(
    h: RackHost,
    page: RemoteAddr,
    slot: u16,
    a: &Args,
    epoch: Instant,
    stop: Arc<AtomicBool>,
) -> Writer {
    let first = Arc::new(AtomicU64::new(0));
    let (rto, retries) = (Duration::from_micros(a.rto_us), a.retries);
    let thread = {
        let first = first.clone();
        std::thread::spawn(move || -> Result<(u64, u64)> {
            let mut c = open_client(&h, rto, retries)?;
            let answered = || {
                let now = epoch.elapsed().as_nanos() as u64 + 1;
                let _ = first.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
            };
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let v = (u64::from(h.host_id) << 48) | n;
                c.write(page, 8 * slot, &v.to_le_bytes())
                    .with_context(|| format!("host {}: write {n}", h.host_id))?;
                answered();
                let back = c.read_range(page, 8 * slot, 8)?;
                ensure!(
                    back == v.to_le_bytes(),
                    "host {}: read back another value than the acknowledged write {n}",
                    h.host_id
                );
                answered();
            }
            Ok((n, c.stats().moved_retries))
        })
    };
    Writer { first, thread }
}

/// Waits until `w` is answered after `since` (reset just before); returns when (60 s at
/// most, or until the writer fails).
fn first_answer(w: &Writer, epoch: Instant, since: Instant) -> Result<Instant> {
    let t = Instant::now();
    loop {
        let at = w.first.load(Ordering::Relaxed);
        if at != 0 {
            return Ok((epoch + Duration::from_nanos(at - 1)).max(since));
        }
        if w.thread.is_finished() {
            bail!("the writer stopped");
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("no answer within 60 s");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn status(socket: &std::path::Path, id: u16) -> Result<HostStatus> {
    let v = api::call(socket, &CtlRequest::Status)?;
    let all: Vec<HostStatus> = serde_json::from_value(v)?;
    all.into_iter()
        .find(|h| h.id == id)
        .with_context(|| format!("host {id} is not registered"))
}

/// Waits until the controller has host `id` down (or up); returns when.
fn wait_health(socket: &std::path::Path, id: u16, down: bool) -> Result<Instant> {
    let t = Instant::now();
    while status(socket, id)?.health.down != down {
        if t.elapsed() > Duration::from_secs(30) {
            bail!(
                "host {id} not marked {} within 30 s",
                if down { "down" } else { "up" }
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(Instant::now())
}

/// Whether `router`'s kernel forwarding table has a route for `net`.
fn has_route(router: &str, net: &str) -> Result<bool> {
    let o = Command::new("ip")
        .args(["-n", router, "-6", "route", "show", net])
        .output()?;
    ensure!(o.status.success(), "ip -n {router} route show failed");
    Ok(!o.stdout.trim_ascii().is_empty())
}

fn signal(pid: u32, sig: &str) -> Result<()> {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()?;
    ensure!(st.success(), "kill -{sig} {pid} failed");
    Ok(())
}

/// Stops the victim's server until its /48 leaves rack 1's routers, continues it until rack
/// 1's client is answered again.
fn withdraw_and_return(a: &Args, hosts: &[RackHost], victim: u16, pid: u32) -> Result<Withdrawal> {
    let socket = &a.controller;
    let net = format!(
        "{}/48",
        bluebridge_proto::NetPrefix::DEFAULT.host_network(HostId(victim))
    );
    let other = &a.routers[0];
    let h = hosts[0].clone();
    let (tx, rx) = std::sync::mpsc::channel::<Option<Instant>>();
    let (back_tx, back_rx) = std::sync::mpsc::channel::<Result<Instant>>();
    // Rack 1's client: a page on the victim, then (when told) READs of it every millisecond
    // until one is answered.
    let prober = std::thread::spawn(move || -> Result<()> {
        let mut c = open_client(&h, Duration::from_millis(2), 3)?;
        let page = c.alloc(HostId(victim), false)?;
        c.write(page, 0, b"withdrawn")?;
        while let Ok(Some(since)) = rx.recv() {
            let r = loop {
                match c.read_range(page, 0, 9) {
                    Ok(data) if data == b"withdrawn" => break Ok(Instant::now()),
                    Ok(_) => break Err(anyhow::anyhow!("the page came back changed")),
                    Err(ClientError::Timeout { .. })
                        if since.elapsed() < Duration::from_secs(30) =>
                    {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => break Err(e.into()),
                }
            };
            back_tx.send(r)?;
        }
        c.free(page)?;
        Ok(())
    });
    // The page is there before the server stops.
    tx.send(Some(Instant::now()))?;
    back_rx
        .recv()?
        .context("reading the victim's page before the withdrawal")?;
    let stopped = Instant::now();
    signal(pid, "STOP")?;
    let result = (|| -> Result<Withdrawal> {
        let down = wait_health(socket, victim, true)?;
        while has_route(other, &net)? {
            ensure!(
                down.elapsed() < Duration::from_secs(30),
                "{net} still in {other} after 30 s"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        let gone = Instant::now();
        let continued = Instant::now();
        signal(pid, "CONT")?;
        let up = wait_health(socket, victim, false)?;
        tx.send(Some(up))?;
        let answered = back_rx
            .recv()?
            .context("reading the victim's page after its return")?;
        Ok(Withdrawal {
            host: victim,
            detected_ms: (down - stopped).as_secs_f64() * 1e3,
            withdrawn_us: (gone - down).as_secs_f64() * 1e6,
            recovered_ms: (up - continued).as_secs_f64() * 1e3,
            returned_us: answered.saturating_duration_since(up).as_secs_f64() * 1e6,
        })
    })();
    // Never leave the server stopped.
    let _ = signal(pid, "CONT");
    let _ = tx.send(None);
    prober
        .join()
        .map_err(|_| anyhow::anyhow!("the prober panicked"))??;
    result
}

fn main() -> Result<()> {
    bluebridge_client::init_logging("warn");
    let a = Args::parse();
    ensure!(
        a.routers.len() == 2,
        "--routers: the two racks' routers, not {}",
        a.routers.len()
    );
    let hosts = read_layout(&a.layout)?;
    ensure!(
        hosts.len() == 2 * a.rack_size,
        "the layout has {} hosts, not 2 racks of {}",
        hosts.len(),
        a.rack_size
    );
    let (rack1, rack2) = hosts.split_at(a.rack_size);
    // The page: on rack 1's second host, allocated (shared: every client may use it) by rack
    // 1's first host's client.
    let home = rack1[1].host_id;
    let page = {
        let h = rack1[0].clone();
        let (rto, retries) = (Duration::from_micros(a.rto_us), a.retries);
        std::thread::spawn(move || -> Result<RemoteAddr> {
            let mut c = open_client(&h, rto, retries)?;
            Ok(c.alloc(HostId(home), true)?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("allocating panicked"))??
    };
    let stop = Arc::new(AtomicBool::new(false));
    let epoch = Instant::now();
    let writers = [
        spawn_writer(rack1[0].clone(), page, 0, &a, epoch, stop.clone()),
        spawn_writer(rack2[0].clone(), page, 1, &a, epoch, stop.clone()),
    ];
    for w in &writers {
        if let Err(e) = first_answer(w, epoch, epoch) {
            stop.store(true, Ordering::Relaxed);
            for w in writers {
                if let Ok(Err(why)) = w.thread.join() {
                    eprintln!("writer: {why:#}");
                }
            }
            return Err(e.context("a writer never got going"));
        }
    }
    println!("page {page} on host {home} (rack 1); a client in each rack writes and reads it back");
    let mut moves = Vec::new();
    let mut errors = 0u64;
    let mut at = home;
    for i in 0..a.migrations {
        let to = if i % 2 == 0 {
            rack2[i / 2 % rack2.len()].host_id
        } else {
            home
        };
        let r = api::call(
            &a.controller,
            &CtlRequest::Migrate {
                page: page.to_ipv6().to_string(),
                to,
            },
        );
        let done = Instant::now();
        for w in &writers {
            w.first.store(0, Ordering::Relaxed);
        }
        let m: Migration = match r {
            Ok(v) => serde_json::from_value(v)?,
            Err(e) => {
                eprintln!("migration {i} of the page to host {to}: {e}");
                errors += 1;
                continue;
            }
        };
        let mut first = [0.0; 2];
        for (k, w) in writers.iter().enumerate() {
            first[k] = (first_answer(w, epoch, done)? - done).as_secs_f64() * 1e6;
        }
        println!(
            "  move {}: host {at} → {to}: route change {:.1} ms; first answer through the new path: rack 1 {:.1} ms, rack 2 {:.1} ms",
            i + 1,
            m.route_update_us / 1e3,
            first[0] / 1e3,
            first[1] / 1e3
        );
        moves.push(Move {
            from: at,
            to,
            route_update_us: m.route_update_us,
            first_answer_us: first,
        });
        at = to;
        // Let the fabric settle before the next change.
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let (mut writes, mut moved_retries) = (0, 0);
    for w in writers {
        match w
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("a writer panicked"))?
        {
            Ok((n, m)) => {
                writes += n;
                moved_retries += m;
            }
            Err(e) => {
                eprintln!("writer: {e:#}");
                errors += 1;
            }
        }
    }
    let mut lat = Latencies::default();
    for m in &moves {
        let us = |x: f64| (x * 1e3) as u64;
        let (r1, r2) = if m.to == home {
            ("withdrawn rack 1", "withdrawn rack 2")
        } else {
            ("announced rack 1", "announced rack 2")
        };
        lat.record(r1, us(m.first_answer_us[0]));
        lat.record(r2, us(m.first_answer_us[1]));
        lat.record("route", us(m.route_update_us));
    }
    let mut p = lat.percentiles();
    let mut take = |k: &str| p.remove(k).unwrap_or_default();
    let announced = Convergence {
        rack1_us: take("announced rack 1"),
        rack2_us: take("announced rack 2"),
    };
    let withdrawn = Convergence {
        rack1_us: take("withdrawn rack 1"),
        rack2_us: take("withdrawn rack 2"),
    };
    let route_update_us = take("route");
    let withdrawal = match (a.victim, a.victim_pid) {
        (Some(v), Some(pid)) => {
            ensure!(
                rack2.iter().any(|h| h.host_id == v),
                "--victim {v} is not in rack 2"
            );
            let w = withdraw_and_return(&a, &hosts, v, pid)?;
            println!(
                "host {v}: stopped, marked down after {:.0} ms; its /48 left rack 1's router {:.1} ms later; continued, marked up after {:.0} ms; rack 1 answered {:.1} ms later",
                w.detected_ms,
                w.withdrawn_us / 1e3,
                w.recovered_ms,
                w.returned_us / 1e3
            );
            Some(w)
        }
        _ => None,
    };
    let report = Report {
        announced,
        withdrawn,
        route_update_us,
        moves,
        writes,
        moved_retries,
        errors,
        withdrawal,
    };
    let ms =
        |p: &Percentiles| format!("p50 {:.1} ms, max {:.1} ms", p.p50_us / 1e3, p.max_us / 1e3);
    println!(
        "migrations: {} moves, {} writes acknowledged and read back, {} MOVED retries, {} errors; the controller's route change (vtysh) {}",
        report.moves.len(),
        report.writes,
        report.moved_retries,
        report.errors,
        ms(&report.route_update_us)
    );
    println!(
        "first answer through the new path after the change: /112 announced in rack 2: rack 2 {}; rack 1 (over BGP) {}",
        ms(&report.announced.rack2_us),
        ms(&report.announced.rack1_us)
    );
    println!(
        "  /112 withdrawn in rack 2 (page home in rack 1): rack 1 (over BGP) {}; rack 2 {}",
        ms(&report.withdrawn.rack1_us),
        ms(&report.withdrawn.rack2_us)
    );
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    if report.errors > 0 {
        bail!("{} errors", report.errors);
    }
    Ok(())
}
