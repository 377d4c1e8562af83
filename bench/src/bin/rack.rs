//! `bluebridge-rack`: the BlueBridge paper's failed experiment, run. Every host of a rack has
//! a client; in each iteration all of them at once allocate a page on a random other host,
//! write it, read it back (byte for byte) and free it; then one client does the same alone for
//! many more iterations. Reports completion, errors and per-operation latency.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bluebridge_bench::rack_host::open_client;
use bluebridge_bench::{Latencies, Percentiles};
use bluebridge_client::{AnyTransport, Client};
use bluebridge_proto::{HostId, PAGE_SIZE};
use bluebridge_topology::RackHost;
use clap::Parser;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

/// Drives the clients of a rack built by `cargo xtask rack` (its layout file names every
/// host's namespace, client interface and switch port). Needs root.
#[derive(Parser, Debug)]
#[command(name = "bluebridge-rack", version)]
struct Args {
    /// The rack layout (JSON: the hosts as `bluebridge_topology::RackHost`).
    #[arg(long)]
    layout: PathBuf,
    /// Iterations in which every host's client works at once.
    #[arg(long, default_value_t = 100, value_parser = bluebridge_xsk::cli::count(1, 1_000_000))]
    iterations: usize,
    /// Iterations of host 0's client alone afterwards.
    #[arg(long, default_value_t = 1000, value_parser = bluebridge_xsk::cli::count(1, 10_000_000))]
    single: usize,
    /// Random seed (targets, page contents).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Migrations under load: host 1's client keeps writing and reading back a set of pages
    /// while the controller (at --controller) moves them between hosts this many times.
    #[arg(long, default_value_t = 0, value_parser = bluebridge_xsk::cli::count(0, 1_000_000))]
    migrations: usize,
    /// The controller's control socket (for --migrations).
    #[arg(long)]
    controller: Option<PathBuf>,
    /// Client retransmission timeout, µs (the minimum; it adapts).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=100_000))]
    rto_us: u64,
    /// Client retransmissions before an operation fails.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(0..=100))]
    retries: u32,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The report.
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    hosts: usize,
    iterations: usize,
    single: usize,
    /// Phase name → results.
    phases: BTreeMap<String, Phase>,
    /// The migration run, if any.
    #[serde(default)]
    migration: Option<MigrationRun>,
}

/// Pages moved between hosts while a client writes and reads them back.
#[derive(Debug, Serialize, Deserialize)]
struct MigrationRun {
    pages: usize,
    migrations: usize,
    /// Writes acknowledged during the run; each was read back before the next.
    writes: u64,
    /// Requests that met a cut-over (MOVED) and were retried.
    moved_retries: u64,
    errors: u64,
    cutover_us: Percentiles,
    route_update_us: Percentiles,
}

#[derive(Debug, Serialize, Deserialize)]
struct Phase {
    cycles: u64,
    operations: u64,
    errors: BTreeMap<String, u64>,
    seconds: f64,
    latency: BTreeMap<String, Percentiles>,
    retransmissions: u64,
    timeouts: u64,
}

/// One cycle's results.
struct Cycle {
    lat: Latencies,
    errors: Vec<String>,
    retransmissions: u64,
    timeouts: u64,
}

/// Where a client thread gets its work: (target host, seed) per cycle.
type Targets = mpsc::Sender<(u16, u64)>;

/// A client thread on `h`: waits for targets, runs one cycle per target.
fn spawn_client(
    h: RackHost,
    a: &Args,
    results: mpsc::Sender<(usize, Cycle)>,
    idx: usize,
) -> Result<(Targets, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<(u16, u64)>();
    let (rto, retries) = (Duration::from_micros(a.rto_us), a.retries);
    let (ready_tx, ready_rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("rack-client-{}", h.host_id))
        .spawn(move || {
            let mut c = match open_client(&h, rto, retries) {
                Ok(c) => {
                    let _ = ready_tx.send(Ok(()));
                    c
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while let Ok((target, seed)) = rx.recv() {
                let cycle = run_cycle(&mut c, HostId(target), seed);
                if results.send((idx, cycle)).is_err() {
                    break;
                }
            }
        })?;
    ready_rx
        .recv()
        .context("a client thread died")?
        .with_context(|| format!("opening host {}'s client", idx + 1))?;
    Ok((tx, thread))
}

/// ALLOC on `target`, WRITE a page, READ it back and compare, FREE.
fn run_cycle(c: &mut Client<AnyTransport>, target: HostId, seed: u64) -> Cycle {
    let before = c.stats();
    let mut lat = Latencies::default();
    let mut errors = Vec::new();
    let data: Vec<u8> = {
        let mut r = rand::rngs::SmallRng::seed_from_u64(seed);
        (0..PAGE_SIZE).map(|_| r.random()).collect()
    };
    let mut timed =
        |label: &'static str, t: Instant| lat.record(label, t.elapsed().as_nanos() as u64);
    let t = Instant::now();
    match c.alloc(target, false) {
        Err(e) => errors.push(format!("ALLOC on host {target}: {e}")),
        Ok(p) => {
            timed("ALLOC", t);
            let t = Instant::now();
            match c.write(p, 0, &data) {
                Err(e) => errors.push(format!("WRITE: {e}")),
                Ok(()) => timed("WRITE", t),
            }
            let t = Instant::now();
            match c.read(p) {
                Err(e) => errors.push(format!("READ: {e}")),
                Ok(d) if d != data => {
                    errors.push("READ: the page differs from what was written".into())
                }
                Ok(_) => timed("READ", t),
            }
            let t = Instant::now();
            match c.free(p) {
                Err(e) => errors.push(format!("FREE: {e}")),
                Ok(()) => timed("FREE", t),
            }
        }
    }
    let after = c.stats();
    Cycle {
        lat,
        errors,
        retransmissions: after.retransmits - before.retransmits,
        timeouts: after.timeouts - before.timeouts,
    }
}

fn phase(cycles: Vec<Cycle>, seconds: f64) -> Phase {
    let mut lat = Latencies::default();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let (mut retx, mut to) = (0, 0);
    let n = cycles.len() as u64;
    for c in cycles {
        lat.merge(&c.lat);
        for e in c.errors {
            *errors.entry(e).or_default() += 1;
        }
        retx += c.retransmissions;
        to += c.timeouts;
    }
    Phase {
        cycles: n,
        operations: lat.count(),
        errors,
        seconds,
        latency: lat.percentiles(),
        retransmissions: retx,
        timeouts: to,
    }
}

fn print_phase(name: &str, p: &Phase) {
    println!(
        "{name}: {} cycles, {} operations acknowledged in {:.2} s, {} errors, {} retransmissions, {} timeouts",
        p.cycles,
        p.operations,
        p.seconds,
        p.errors.values().sum::<u64>(),
        p.retransmissions,
        p.timeouts
    );
    println!("| operation | count | p50 µs | p99 µs | max µs |\n|---|---|---|---|---|");
    for (op, l) in &p.latency {
        println!(
            "| {op} | {} | {:.1} | {:.1} | {:.1} |",
            l.count, l.p50_us, l.p99_us, l.max_us
        );
    }
    for (e, n) in &p.errors {
        println!("error ×{n}: {e}");
    }
}

/// Host 1's client writes a counter into each of `PAGES` pages in turn and reads it back,
/// while another thread asks the controller to move a random page to a random other host,
/// `a.migrations` times. Every write must be acknowledged and read back exactly.
fn migrate_under_load(
    hosts: &[RackHost],
    a: &Args,
    socket: &std::path::Path,
) -> Result<MigrationRun> {
    use bluebridge_switch::Migration;
    use bluebridge_switch::api::{self, Request};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    const PAGES: usize = 16;
    let h = hosts[0].clone();
    let (rto, retries) = (Duration::from_micros(a.rto_us), a.retries);
    let done = Arc::new(AtomicBool::new(false));
    let (page_tx, page_rx) = mpsc::channel();
    let writer = {
        let (done, hosts) = (done.clone(), hosts.to_vec());
        std::thread::spawn(move || -> Result<(u64, u64)> {
            let mut c = open_client(&h, rto, retries)?;
            let pages: Vec<_> = (0..PAGES)
                .map(|i| c.alloc(HostId(hosts[1 + i % (hosts.len() - 1)].host_id), false))
                .collect::<Result<_, _>>()?;
            page_tx.send(pages.clone())?;
            let mut writes = 0u64;
            while !done.load(Ordering::Relaxed) {
                for (i, &p) in pages.iter().enumerate() {
                    writes += 1;
                    c.write(p, 8 * (i as u16 % 8), &writes.to_le_bytes())
                        .with_context(|| format!("write {writes}"))?;
                    let back = c.read_range(p, 8 * (i as u16 % 8), 8)?;
                    ensure!(
                        back == writes.to_le_bytes(),
                        "page {i}: read back another value than the acknowledged write {writes}"
                    );
                }
            }
            for p in &pages {
                c.free(*p)?;
            }
            Ok((writes, c.stats().moved_retries))
        })
    };
    let pages = match page_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(p) => p,
        Err(_) => {
            let why = match writer.join() {
                Ok(Err(e)) => format!("{e:#}"),
                _ => "it died".into(),
            };
            bail!("the migration run's writer did not start: {why}");
        }
    };
    let mut rng = rand::rngs::SmallRng::seed_from_u64(a.seed ^ 0x316);
    let mut moves: Vec<Migration> = Vec::new();
    let mut errors = 0u64;
    let mut at: Vec<u16> = pages.iter().map(|p| p.host_id().0).collect();
    for _ in 0..a.migrations {
        std::thread::sleep(Duration::from_millis(5));
        let i = rng.random_range(0..pages.len());
        let to = loop {
            let t = hosts[rng.random_range(0..hosts.len())].host_id;
            if t != at[i] {
                break t;
            }
        };
        match api::call(
            socket,
            &Request::Migrate {
                page: pages[i].to_ipv6().to_string(),
                to,
            },
        ) {
            Ok(v) => {
                moves.push(serde_json::from_value(v)?);
                at[i] = to;
            }
            Err(e) => {
                eprintln!("migration of page {i} to host {to}: {e}");
                errors += 1;
            }
        }
    }
    done.store(true, Ordering::Relaxed);
    let (writes, moved_retries) = match writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer panicked"))?
    {
        Ok(x) => x,
        Err(e) => {
            eprintln!("writer: {e:#}");
            errors += 1;
            (0, 0)
        }
    };
    let mut cut = Latencies::default();
    let mut route = Latencies::default();
    for m in &moves {
        cut.record("cut-over", (m.cutover_us * 1000.0) as u64);
        route.record("route", (m.route_update_us * 1000.0) as u64);
    }
    Ok(MigrationRun {
        pages: pages.len(),
        migrations: moves.len(),
        writes,
        moved_retries,
        errors,
        cutover_us: cut.percentiles().remove("cut-over").unwrap_or_default(),
        route_update_us: route.percentiles().remove("route").unwrap_or_default(),
    })
}

fn main() -> Result<()> {
    bluebridge_client::init_logging("warn");
    let a = Args::parse();
    let hosts = bluebridge_bench::rack_host::read_layout(&a.layout)?;
    ensure!(hosts.len() >= 2, "a rack run needs at least two hosts");
    let (res_tx, res_rx) = mpsc::channel();
    let mut clients = Vec::new();
    let mut threads = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let (tx, t) = spawn_client(h.clone(), &a, res_tx.clone(), i)?;
        clients.push(tx);
        threads.push(t);
    }
    println!(
        "{} clients open (one per host, AF_XDP through the switch)",
        clients.len()
    );
    let mut rng = rand::rngs::SmallRng::seed_from_u64(a.seed);
    let mut pick = |me: usize| loop {
        let t = rng.random_range(0..hosts.len());
        if t != me {
            return (hosts[t].host_id, rng.random::<u64>());
        }
    };

    let mut report = Report {
        hosts: hosts.len(),
        iterations: a.iterations,
        single: a.single,
        phases: BTreeMap::new(),
        migration: None,
    };
    let t = Instant::now();
    let mut all = Vec::new();
    for it in 0..a.iterations {
        for (i, c) in clients.iter().enumerate() {
            c.send(pick(i)).context("a client thread exited")?;
        }
        for _ in 0..clients.len() {
            let (_, cycle) = res_rx
                .recv_timeout(Duration::from_secs(60))
                .with_context(|| format!("iteration {it}: a client did not finish within 60 s"))?;
            all.push(cycle);
        }
    }
    let p = phase(all, t.elapsed().as_secs_f64());
    print_phase(&format!("all {} hosts at once", hosts.len()), &p);
    report.phases.insert("all".into(), p);

    let t = Instant::now();
    let mut one = Vec::new();
    for _ in 0..a.single {
        clients[0].send(pick(0)).context("host 1's client exited")?;
        one.push(res_rx.recv_timeout(Duration::from_secs(60))?.1);
    }
    let p = phase(one, t.elapsed().as_secs_f64());
    print_phase("host 1's client alone", &p);
    report.phases.insert("single".into(), p);
    // Each client's steering program leaves its interface when its thread ends.
    drop(clients);
    for t in threads {
        let _ = t.join();
    }
    if a.migrations > 0 {
        let socket = a
            .controller
            .as_deref()
            .context("--migrations needs --controller")?;
        let m = migrate_under_load(&hosts, &a, socket)?;
        println!(
            "migrations under load: {} moves of {} pages while {} writes were acknowledged and read back; {} requests met a cut-over and were retried; {} errors",
            m.migrations, m.pages, m.writes, m.moved_retries, m.errors
        );
        println!(
            "cut-over p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs; switch route update p50 {:.1} µs, max {:.1} µs",
            m.cutover_us.p50_us,
            m.cutover_us.p99_us,
            m.cutover_us.max_us,
            m.route_update_us.p50_us,
            m.route_update_us.max_us
        );
        let errors = m.errors;
        report.migration = Some(m);
        if errors > 0 {
            bail!("{errors} errors during the migrations");
        }
    }

    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    let errors: u64 = report
        .phases
        .values()
        .map(|p| p.errors.values().sum::<u64>())
        .sum();
    if errors > 0 {
        bail!("{errors} operations failed");
    }
    Ok(())
}
