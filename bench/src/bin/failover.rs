//! `bluebridge-failover`: a replicated rack's clients through the death of a primary
//! (`cargo xtask rack --replicas 2 --kill-primary`). Every host's client writes its pages on
//! every other host round after round and counts on one counter page per host with
//! FETCH_ADD; after `READY` is printed the caller kills a server (SIGKILL), and its backup
//! takes its pages over. At the end every page is read back: a page that does not hold its
//! last acknowledged write, or a counter short of its acknowledged additions, is an
//! acknowledged write lost. The unavailability window of each page of the dead host is the
//! longest time between two answers for it. Before that, optionally, the cost of replication:
//! WRITE latency and pipelined WRITE rate to a replicated host against an unreplicated one.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bluebridge_bench::rack_host::open_client;
use bluebridge_bench::{Latencies, Percentiles};
use bluebridge_client::{AnyTransport, Client, Request};
use bluebridge_proto::{HostId, Opcode, PAGE_SIZE, RemoteAddr};
use clap::Parser;
use serde::{Deserialize, Serialize};

/// Drives a replicated rack's clients while a primary dies. Needs root.
#[derive(Parser, Debug)]
#[command(name = "bluebridge-failover", version)]
struct Args {
    /// The rack layout (JSON: the hosts as `bluebridge_topology::RackHost`).
    #[arg(long)]
    layout: PathBuf,
    /// The host whose server the caller kills after READY (its pages' windows are measured).
    #[arg(long)]
    victim: u16,
    /// Pages each client writes on each other host (plus one counter page).
    #[arg(long, default_value_t = 1, value_parser = bluebridge_xsk::cli::count(1, 1000))]
    pages: usize,
    /// How long the clients work after READY, seconds (more than 0, at most 3600).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Client retransmission timeout, µs (the minimum; it adapts).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=100_000))]
    rto_us: u64,
    /// Client retransmissions before an operation fails (enough to wait out a failover).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    retries: u32,
    /// The longest a client waits before retransmitting, µs (backoff included): how soon
    /// after the backup took over a stuck request is sent again.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=1_000_000))]
    max_rto_us: u64,
    /// First measure the cost of replication from host 1's client: WRITE latency at window 1
    /// and pipelined WRITEs (window 32) to this replicated host ...
    #[arg(long, requires = "cost_off")]
    cost_on: Option<u16>,
    /// ... against this unreplicated one, in alternating rounds.
    #[arg(long)]
    cost_off: Option<u16>,
    /// Rounds of the cost measurement (each: 2,000 WRITEs at window 1 and 0.3 s pipelined,
    /// on each host).
    #[arg(long, default_value_t = 5, value_parser = bluebridge_xsk::cli::count(1, 1000))]
    cost_rounds: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// What one run found.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Report {
    clients: usize,
    victim: u16,
    /// Pages written (all clients, all hosts) and of those on the victim.
    pages: usize,
    affected_pages: usize,
    writes_acknowledged: u64,
    adds_acknowledged: u64,
    acknowledged_writes_lost: u64,
    client_errors: u64,
    retransmissions: u64,
    /// For each of the victim's pages, from its last answer before the kill (the dead
    /// primary's) to its first after (the backup's), in ms (the fields named `_us` hold ms
    /// here).
    window_ms: Percentiles,
    /// The same for the other hosts' pages: what a round of the clients takes anyway.
    other_gap_ms: Percentiles,
    /// For each of the victim's pages, the longest one WRITE of it waited for its answer:
    /// the one sent to the dead primary waited until the backup answered (ms, as above).
    stuck_ms: Percentiles,
    errors: BTreeMap<String, u64>,
    cost: Option<Cost>,
}

/// Replication's cost: a replicated host against an unreplicated one, same client, same run.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Cost {
    on: u16,
    off: u16,
    /// WRITE 4 KiB at window 1, µs, all rounds.
    write_on_us: Percentiles,
    write_off_us: Percentiles,
    /// Pipelined WRITEs (window 32) per second: the median of the rounds.
    rate_on: f64,
    rate_off: f64,
}

/// One page a client writes: its last acknowledged round, a round whose WRITE failed (its
/// bytes may or may not have landed), its last answer before the kill and first after.
#[derive(Debug, Clone)]
struct Page {
    addr: RemoteAddr,
    acked: Option<u64>,
    uncertain: Option<u64>,
    last_before: Option<Duration>,
    first_after: Option<Duration>,
    /// The longest one WRITE of it waited for its answer.
    longest_wait: Duration,
}

/// When the caller killed the server (ns since `base`; 0: not yet), from the `KILLED` line it
/// writes to our standard input.
struct KillClock {
    base: Instant,
    at_ns: std::sync::atomic::AtomicU64,
}

impl KillClock {
    fn note(&self, p: &mut Page) {
        let now = self.base.elapsed();
        match self.at_ns.load(Ordering::Relaxed) {
            0 => p.last_before = Some(now),
            k if now.as_nanos() as u64 <= k => p.last_before = Some(now),
            _ => {
                p.first_after.get_or_insert(now);
            }
        }
    }

    /// The page's window: from its last answer before the kill to its first after.
    fn window(&self, p: &Page) -> Option<Duration> {
        Some(p.first_after? - p.last_before?)
    }
}

/// The bytes of round `k` on page `i` of client `me`: distinct everywhere.
fn round_bytes(me: u16, i: usize, k: u64) -> Vec<u8> {
    let mut b: Vec<u8> = (0..PAGE_SIZE)
        .map(|j| (j as u64 * 31 + k * 7 + i as u64 + u64::from(me)) as u8)
        .collect();
    b[..8].copy_from_slice(&k.to_le_bytes());
    b[8..10].copy_from_slice(&me.to_le_bytes());
    b
}

/// What a client thread ends with.
struct ClientRun {
    me: u16,
    pages: Vec<Page>,
    /// Counter page per host: (address, acknowledged adds, adds that failed).
    counters: Vec<(RemoteAddr, u64, u64)>,
    errors: BTreeMap<String, u64>,
    retransmissions: u64,
    writes: u64,
}

fn client_run(
    c: &mut Client<AnyTransport>,
    me: u16,
    hosts: &[u16],
    per_host: usize,
    ready: &std::sync::mpsc::Sender<()>,
    stop: &AtomicBool,
    kill: &KillClock,
) -> Result<ClientRun> {
    let mut pages = Vec::new();
    let mut counters = Vec::new();
    for &h in hosts.iter().filter(|&&h| h != me) {
        for _ in 0..per_host {
            let addr = c
                .alloc(HostId(h), false)
                .with_context(|| format!("ALLOC on host {h}"))?;
            pages.push(Page {
                addr,
                acked: None,
                uncertain: None,
                last_before: None,
                first_after: None,
                longest_wait: Duration::ZERO,
            });
        }
        counters.push((c.alloc(HostId(h), false)?, 0, 0));
    }
    let _ = ready.send(());
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut writes = 0;
    let mut k = 0u64;
    // A round: a WRITE of every page and a FETCH_ADD of every counter, all in flight at once
    // (so a page's answers are not held up by another host's), each noted as it completes.
    let mut ops: BTreeMap<u64, (bool, usize)> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        let t = Instant::now();
        for (i, p) in pages.iter().enumerate() {
            let r = Request::new(Opcode::WRITE, p.addr)
                .range(0, PAGE_SIZE as u16)
                .payload(round_bytes(me, i, k));
            ops.insert(c.submit(r), (true, i));
        }
        for (i, (addr, ..)) in counters.iter().enumerate() {
            let mut r = Request::new(Opcode::FETCH_ADD, *addr).range(0, 8);
            r.operand0 = 1;
            ops.insert(c.submit(r), (false, i));
        }
        while !ops.is_empty() {
            let Some(done) = c.poll() else {
                std::thread::yield_now();
                continue;
            };
            let Some((write, i)) = ops.remove(&done.id) else {
                continue;
            };
            match (write, done.result) {
                (true, Ok(_)) => {
                    let p = &mut pages[i];
                    p.acked = Some(k);
                    p.longest_wait = p.longest_wait.max(t.elapsed());
                    kill.note(p);
                    writes += 1;
                }
                (true, Err(e)) => {
                    pages[i].uncertain = Some(k);
                    *errors.entry(format!("WRITE: {e}")).or_default() += 1;
                }
                (false, Ok(reply)) => {
                    let (addr, acked, failed) = &mut counters[i];
                    let old = reply.header.operand0;
                    if old < *acked || old > *acked + *failed {
                        *errors
                            .entry(format!(
                                "FETCH_ADD on host {}: a count out of step",
                                addr.host_id()
                            ))
                            .or_default() += 1;
                    }
                    *acked = old + 1;
                }
                (false, Err(e)) => {
                    counters[i].2 += 1;
                    *errors.entry(format!("FETCH_ADD: {e}")).or_default() += 1;
                }
            }
        }
    }
    Ok(ClientRun {
        me,
        pages,
        counters,
        errors,
        retransmissions: c.stats().retransmits,
        writes,
    })
}

/// Reads every page back: how many acknowledged writes (and additions) are missing.
fn verify(c: &mut Client<AnyTransport>, run: &ClientRun) -> Result<(u64, Vec<String>)> {
    let mut lost = 0;
    let mut notes = Vec::new();
    for (i, p) in run.pages.iter().enumerate() {
        let got = c
            .read(p.addr)
            .with_context(|| format!("reading back page {i} on host {}", p.addr.host_id()))?;
        let ok = |k: Option<u64>| k.is_some_and(|k| got == round_bytes(run.me, i, k));
        let fine = match (p.acked, p.uncertain) {
            (None, None) => got.iter().all(|&b| b == 0),
            (a, u) if u > a => ok(a) || ok(u),
            (a, _) => ok(a),
        };
        if !fine {
            lost += 1;
            notes.push(format!(
                "client {} page {i} on host {}: not its last acknowledged write (round {:?})",
                run.me,
                p.addr.host_id(),
                p.acked
            ));
        }
    }
    for (addr, acked, failed) in &run.counters {
        let mut w = [0u8; 8];
        w.copy_from_slice(&c.read_range(*addr, 0, 8)?);
        let n = u64::from_le_bytes(w);
        if n < *acked || n > acked + failed {
            lost += acked.saturating_sub(n);
            notes.push(format!(
                "client {} counter on host {}: {n}, acknowledged {acked} (+{failed} unknown)",
                run.me,
                addr.host_id()
            ));
        }
    }
    Ok((lost, notes))
}

/// Window-1 WRITEs and pipelined WRITEs from `c` to a replicated and an unreplicated host,
/// alternating round by round (so both see the same machine).
fn measure_cost(c: &mut Client<AnyTransport>, on: u16, off: u16, rounds: usize) -> Result<Cost> {
    let pon = c.alloc(HostId(on), false)?;
    let poff = c.alloc(HostId(off), false)?;
    let data = vec![0x5a; PAGE_SIZE];
    let mut lat = Latencies::default();
    let (mut rate_on, mut rate_off) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (label, p) in [("on", pon), ("off", poff)] {
            for _ in 0..2000 {
                let t = Instant::now();
                c.write(p, 0, &data)?;
                lat.record(label, t.elapsed().as_nanos() as u64);
            }
            let rate = pipelined(c, p, &data, Duration::from_millis(300))?;
            if label == "on" {
                rate_on.push(rate);
            } else {
                rate_off.push(rate);
            }
        }
    }
    c.free(pon)?;
    c.free(poff)?;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut p = lat.percentiles();
    Ok(Cost {
        on,
        off,
        write_on_us: p.remove("on").unwrap_or_default(),
        write_off_us: p.remove("off").unwrap_or_default(),
        rate_on: median(rate_on),
        rate_off: median(rate_off),
    })
}

/// WRITEs of `page` with 32 outstanding for `span`: completions per second.
fn pipelined(
    c: &mut Client<AnyTransport>,
    page: RemoteAddr,
    data: &[u8],
    span: Duration,
) -> Result<f64> {
    let req = || {
        Request::new(Opcode::WRITE, page)
            .range(0, PAGE_SIZE as u16)
            .payload(data.to_vec())
    };
    let t = Instant::now();
    let mut done = 0u64;
    for _ in 0..32 {
        c.submit(req());
    }
    while t.elapsed() < span {
        if let Some(done_one) = c.poll() {
            done_one.result.context("a pipelined WRITE")?;
            done += 1;
            c.submit(req());
        }
    }
    let rate = done as f64 / t.elapsed().as_secs_f64();
    while c.in_flight() > 0 {
        if let Some(d) = c.poll() {
            d.result.context("a pipelined WRITE")?;
        }
    }
    Ok(rate)
}

fn main() -> Result<()> {
    bluebridge_client::init_logging("warn");
    let a = Args::parse();
    ensure!(
        a.seconds > 0.0 && a.seconds <= 3600.0,
        "--seconds must be in (0, 3600]"
    );
    let hosts = bluebridge_bench::rack_host::read_layout(&a.layout)?;
    ensure!(
        hosts.len() >= 3,
        "a failover run needs at least three hosts"
    );
    ensure!(
        hosts.iter().any(|h| h.host_id == a.victim),
        "host {} is not in the rack",
        a.victim
    );
    for h in [a.cost_on, a.cost_off].into_iter().flatten() {
        ensure!(
            hosts.iter().any(|x| x.host_id == h) && h != hosts[0].host_id,
            "--cost-on/--cost-off {h}: a host of the rack other than host {} (whose client measures)",
            hosts[0].host_id
        );
    }
    let (rto, retries) = (Duration::from_micros(a.rto_us), a.retries);
    let max_rto = Duration::from_micros(a.max_rto_us);
    let ids: Vec<u16> = hosts.iter().map(|h| h.host_id).collect();
    let mut report = Report {
        clients: hosts.len() - 1,
        victim: a.victim,
        ..Report::default()
    };
    if let (Some(on), Some(off)) = (a.cost_on, a.cost_off) {
        let h = hosts[0].clone();
        let rounds = a.cost_rounds;
        let cost = std::thread::spawn(move || -> Result<Cost> {
            let mut c = open_client(&h, rto, retries)?;
            // This client alone on the machine, giving its CPU away between polls (a backup
            // on a 2-vCPU machine needs one to answer the primary).
            c.set_yield_when_idle(true);
            measure_cost(&mut c, on, off, rounds)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the cost thread panicked"))??;
        println!(
            "replication cost (host {on} replicated, host {off} not; {rounds} alternating rounds): WRITE 4 KiB p50 {:.1} vs {:.1} µs ({:.2}×), p99 {:.1} vs {:.1} µs; pipelined WRITEs (32 in flight) {:.0} vs {:.0} /s ({:.2}×)",
            cost.write_on_us.p50_us,
            cost.write_off_us.p50_us,
            cost.write_on_us.p50_us / cost.write_off_us.p50_us,
            cost.write_on_us.p99_us,
            cost.write_off_us.p99_us,
            cost.rate_on,
            cost.rate_off,
            cost.rate_on / cost.rate_off
        );
        report.cost = Some(cost);
    }
    // Every host's client but the victim's (its own server dies; its client would lose its
    // host for nothing to measure).
    let stop = Arc::new(AtomicBool::new(false));
    let kill = Arc::new(KillClock {
        base: Instant::now(),
        at_ns: std::sync::atomic::AtomicU64::new(0),
    });
    {
        let kill = kill.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                if line.trim() == "KILLED" {
                    let ns = kill.base.elapsed().as_nanos() as u64;
                    kill.at_ns.store(ns.max(1), Ordering::Relaxed);
                }
            }
        });
    }
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut threads = Vec::new();
    for h in hosts.iter().filter(|h| h.host_id != a.victim).cloned() {
        let (stop, ready, ids, kill) = (stop.clone(), ready_tx.clone(), ids.clone(), kill.clone());
        let per_host = a.pages;
        threads.push(std::thread::spawn(
            move || -> Result<(ClientRun, u64, Vec<String>)> {
                let mut c = open_client(&h, rto, retries)?;
                c.set_max_rto(Some(max_rto));
                let run = client_run(&mut c, h.host_id, &ids, per_host, &ready, &stop, &kill)?;
                let (lost, notes) = verify(&mut c, &run)?;
                Ok((run, lost, notes))
            },
        ));
    }
    drop(ready_tx);
    for _ in 0..threads.len() {
        ready_rx
            .recv_timeout(Duration::from_secs(60))
            .context("a client did not get its pages within 60 s")?;
    }
    println!("READY: {} clients writing their pages", threads.len());
    std::io::stdout().flush()?;
    std::thread::sleep(Duration::from_secs_f64(a.seconds));
    stop.store(true, Ordering::Relaxed);
    let mut window = Latencies::default();
    let mut other = Latencies::default();
    let mut stuck = Latencies::default();
    let mut notes = Vec::new();
    for t in threads {
        let (run, lost, n) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        report.acknowledged_writes_lost += lost;
        notes.extend(n);
        report.pages += run.pages.len();
        report.writes_acknowledged += run.writes;
        report.adds_acknowledged += run.counters.iter().map(|c| c.1).sum::<u64>();
        report.retransmissions += run.retransmissions;
        for (e, n) in run.errors {
            report.client_errors += n;
            *report.errors.entry(e).or_default() += n;
        }
        for p in &run.pages {
            // Recorded in µs where the histogram takes ns: its "µs" percentiles read as ms.
            let Some(w) = kill.window(p) else { continue };
            let us = w.as_micros() as u64;
            if p.addr.host_id().0 == a.victim {
                report.affected_pages += 1;
                window.record("window", us);
                stuck.record("stuck", p.longest_wait.as_micros() as u64);
            } else {
                other.record("gap", us);
            }
        }
    }
    if kill.at_ns.load(Ordering::Relaxed) == 0 {
        bail!("no KILLED line came on standard input: no window to measure");
    }
    report.window_ms = window.percentiles().remove("window").unwrap_or_default();
    report.other_gap_ms = other.percentiles().remove("gap").unwrap_or_default();
    report.stuck_ms = stuck.percentiles().remove("stuck").unwrap_or_default();
    println!(
        "{} clients, {} pages ({} on host {}): {} writes and {} FETCH_ADDs acknowledged, {} retransmissions",
        report.clients,
        report.pages,
        report.affected_pages,
        a.victim,
        report.writes_acknowledged,
        report.adds_acknowledged,
        report.retransmissions
    );
    println!(
        "acknowledged writes lost: {}",
        report.acknowledged_writes_lost
    );
    println!("client errors: {}", report.client_errors);
    println!(
        "unavailability window over the {} pages of host {}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (per page, from its last answer before the kill, the dead primary's, to its first after, the backup's; across the kill, the other hosts' pages: p50 {:.1} ms, max {:.1} ms, a round of the clients)",
        report.affected_pages,
        a.victim,
        report.window_ms.p50_us,
        report.window_ms.p99_us,
        report.window_ms.max_us,
        report.other_gap_ms.p50_us,
        report.other_gap_ms.max_us
    );
    println!(
        "the longest one WRITE of a page of host {} waited (the one the failover caught): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        a.victim, report.stuck_ms.p50_us, report.stuck_ms.p99_us, report.stuck_ms.max_us
    );
    for (e, n) in &report.errors {
        println!("error ×{n}: {e}");
    }
    for n in notes.iter().take(20) {
        println!("lost: {n}");
    }
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    if report.acknowledged_writes_lost > 0 {
        bail!(
            "{} acknowledged writes lost",
            report.acknowledged_writes_lost
        );
    }
    Ok(())
}
