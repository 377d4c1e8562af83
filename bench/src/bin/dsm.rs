//! `bluebridge-dsm`: distributed shared memory across the hosts of a rack built by
//! `cargo xtask dsm`. The clients of three hosts map the same pages as coherent
//! `RemoteRegion`s (`Coherence::Shared`) and run, all at once: the litmus suite (message
//! passing, store buffering, load buffering, write-write ordering), a lock-protected counter,
//! a parallel job checked byte for byte, and the coherence latencies (a shared read fault,
//! upgrades of a read copy with 0, 1 and 2 other readers, a write that recalls a dirty copy,
//! a page passed between two writers) against a private region's fault in the same run.
//! Exits non-zero on any forbidden outcome, a wrong total, a wrong byte or a region error.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bluebridge_bench::dsm::{self, Litmus, WORDS};
use bluebridge_bench::rack_host::open_client;
use bluebridge_bench::{Latencies, Percentiles};
use bluebridge_client::region::{Coherence, HandlerCpu, OnClose, RegionStats};
use bluebridge_client::{AnyTransport, Client, RegionOptions, RemoteRegion};
use bluebridge_proto::{HostId, RemoteAddr};
use clap::Parser;
use serde::Serialize;

/// Runs the shared-memory suite on three hosts of a rack (`cargo xtask dsm` builds it and
/// writes the layout). Needs root.
#[derive(Parser, Debug)]
#[command(name = "bluebridge-dsm", version)]
struct Args {
    /// The rack layout (JSON: the hosts as `bluebridge_topology::RackHost`); the first three
    /// hosts take part.
    #[arg(long)]
    layout: PathBuf,
    /// Index (in the layout) of the host whose server holds the shared pages.
    #[arg(long, default_value_t = 0, value_parser = bluebridge_xsk::cli::count(0, 1000))]
    server: usize,
    /// Runs of each litmus test.
    #[arg(long, default_value_t = 200, value_parser = bluebridge_xsk::cli::count(1, 1_000_000))]
    runs: usize,
    /// Lock-protected increments per host.
    #[arg(long, default_value_t = 200, value_parser = bluebridge_xsk::cli::count(1, 10_000_000))]
    rounds: usize,
    /// Pages each host fills in the parallel job.
    #[arg(long, default_value_t = 32, value_parser = bluebridge_xsk::cli::count(1, 4096))]
    job_pages: usize,
    /// Samples of each latency.
    #[arg(long, default_value_t = 300, value_parser = bluebridge_xsk::cli::count(3, 100_000))]
    samples: usize,
    /// Client retransmission timeout, µs (the minimum; it adapts).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..=100_000))]
    rto_us: u64,
    /// Client retransmissions before an operation fails.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(0..=100))]
    retries: u32,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Pages of each part of the shared region, in order.
struct Layout {
    mp: usize,
    buffering: usize,
    ww: usize,
    lock: usize,
    job: usize,
    latency: usize,
    total: usize,
}

impl Layout {
    fn new(job_pages: usize, samples: usize) -> Layout {
        let (mp, buffering, ww, lock) = (0, 3, 5, 6);
        let job = 8;
        let latency = job + 3 * job_pages;
        Layout {
            mp,
            buffering,
            ww,
            lock,
            job,
            latency,
            total: latency + dsm::latency_pages(samples),
        }
    }
}

/// What one host brought back.
struct HostResult {
    mp: Litmus,
    sb: Vec<bool>,
    lb: Vec<bool>,
    ww: Vec<u64>,
    lock: Option<u64>,
    job_bad: usize,
    latencies: Latencies,
    stats: RegionStats,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    hosts: usize,
    litmus_runs: u64,
    litmus_passed: u64,
    forbidden: BTreeMap<&'static str, u64>,
    lock_expected: u64,
    lock_got: Vec<Option<u64>>,
    job_bytes_wrong: usize,
    latency: BTreeMap<String, Percentiles>,
    regions: Vec<String>,
}

fn region_options(coherence: Coherence) -> RegionOptions {
    RegionOptions {
        coherence,
        handler_cpu: HandlerCpu::Any,
        on_close: OnClose::Detach,
        ..RegionOptions::default()
    }
}

/// A private region's read faults on fresh pages: the baseline.
fn private_faults(
    client: Client<AnyTransport>,
    server: HostId,
    samples: usize,
) -> Result<(Client<AnyTransport>, Latencies)> {
    let region = RemoteRegion::new(
        client,
        samples,
        &[server],
        RegionOptions {
            on_close: OnClose::Free,
            ..region_options(Coherence::Private)
        },
    )
    .context("a private region")?;
    let mut l = Latencies::default();
    let w = region.as_atomic_words();
    for p in 0..samples {
        let t = Instant::now();
        w[p * WORDS].load(std::sync::atomic::Ordering::SeqCst);
        l.record("private read fault", t.elapsed().as_nanos() as u64);
    }
    let client = region
        .close()
        .context("closing the private region")?
        .into_client();
    Ok((client, l))
}

fn main() -> Result<()> {
    bluebridge_client::init_logging("warn");
    let a = Args::parse();
    let hosts = bluebridge_bench::rack_host::read_layout(&a.layout)?;
    ensure!(
        hosts.len() >= 3,
        "the suite needs 3 hosts; the layout has {}",
        hosts.len()
    );
    ensure!(
        a.server < hosts.len(),
        "--server {} is not a host of the layout",
        a.server
    );
    let server = HostId(hosts[a.server].host_id);
    let rto = Duration::from_micros(a.rto_us);
    let mut clients = Vec::new();
    for h in &hosts[..3] {
        clients.push(
            open_client(h, rto, a.retries)
                .with_context(|| format!("opening host {}'s client", h.host_id))?,
        );
    }
    let lay = Layout::new(a.job_pages, a.samples);
    // The baseline first, on host 0's client, before it maps the shared pages.
    let first = clients.remove(0);
    let (mut first, private) = private_faults(first, server, a.samples)?;
    let mut addrs: Vec<RemoteAddr> = Vec::new();
    while addrs.len() < lay.total {
        let n = (lay.total - addrs.len()).min(128) as u16;
        addrs.extend(
            first
                .alloc_bulk(server, n, true)
                .context("allocating shared pages")?,
        );
    }
    clients.insert(0, first);
    println!(
        "      {} shared pages on host {server}; 3 hosts map them (AF_XDP clients through the switch)",
        addrs.len()
    );
    let barrier = Barrier::new(3);
    let runs = a.runs as u64;
    let results: Vec<(HostResult, Client<AnyTransport>)> = std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(host, client)| {
                let (addrs, barrier, lay, a) = (addrs.clone(), &barrier, &lay, &a);
                s.spawn(move || -> Result<(HostResult, Client<AnyTransport>)> {
                    let region =
                        RemoteRegion::attach(client, addrs, region_options(Coherence::Shared))
                            .context("a shared region")?;
                    let w = region.as_atomic_words();
                    let part = |p: usize| &w[p * WORDS..];
                    barrier.wait();
                    let mp = dsm::message_passing(host, part(lay.mp), runs);
                    barrier.wait();
                    let (sb, lb) =
                        dsm::store_and_load_buffering(host, part(lay.buffering), barrier, runs);
                    let ww = dsm::write_write(host, part(lay.ww), barrier, runs);
                    let lock = dsm::lock_counter(host, part(lay.lock), barrier, a.rounds as u64);
                    let job_bad = dsm::parallel_fill(host, 3, a.job_pages, part(lay.job), barrier);
                    let latencies =
                        dsm::coherence_latencies(host, part(lay.latency), barrier, a.samples);
                    let stats = region.stats();
                    let error = region.last_error();
                    let client = region.close().context("closing")?.into_client();
                    Ok((
                        HostResult {
                            mp,
                            sb,
                            lb,
                            ww,
                            lock,
                            job_bad,
                            latencies,
                            stats,
                            error,
                        },
                        client,
                    ))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a host thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let (results, mut clients): (Vec<HostResult>, Vec<_>) = results.into_iter().unzip();
    let failed = clients[0].free_all(&addrs);
    if let Some((p, e)) = failed.first() {
        eprintln!("warning: freeing {}: {e}", p.to_ipv6());
    }

    let mut forbidden = BTreeMap::new();
    forbidden.insert(
        "message passing",
        results.iter().map(|r| r.mp.forbidden).sum(),
    );
    forbidden.insert(
        "store buffering",
        dsm::forbidden_runs(&results[1].sb, &results[2].sb),
    );
    forbidden.insert(
        "load buffering",
        dsm::forbidden_runs(&results[1].lb, &results[2].lb),
    );
    let ww: Vec<Vec<u64>> = results.iter().map(|r| r.ww.clone()).collect();
    forbidden.insert("write-write", dsm::write_write_forbidden(&ww));
    let litmus_runs = 4 * runs;
    let bad_runs: u64 = forbidden.values().sum();
    let lock_expected = 3 * a.rounds as u64;
    let lock_got: Vec<Option<u64>> = results.iter().map(|r| r.lock).collect();
    let job_bytes_wrong: usize = results.iter().map(|r| r.job_bad).sum();
    let mut lat = private;
    for r in &results {
        lat.merge(&r.latencies);
    }
    let latency = lat.percentiles();
    println!(
        "      litmus: {}/{litmus_runs} runs, forbidden outcomes {bad_runs}",
        litmus_runs - bad_runs.min(litmus_runs)
    );
    for (k, v) in &forbidden {
        println!("        {k}: {runs} runs, forbidden {v}");
    }
    let got = lock_got[0].map_or("none (the lock never came)".into(), |v| v.to_string());
    println!("      lock counter: expected {lock_expected}, got {got}");
    println!(
        "      parallel job: {} pages by 3 hosts, bytes wrong {job_bytes_wrong}",
        3 * a.job_pages
    );
    println!(
        "      | latency ({} samples each) | p50 µs | p99 µs |\n      |---|---|---|",
        a.samples
    );
    let order = [
        "private read fault",
        dsm::READ_FAULT,
        dsm::UPGRADE[0],
        dsm::UPGRADE[1],
        dsm::UPGRADE[2],
        dsm::RECALL,
        dsm::PING_PONG,
    ];
    for k in order {
        if let Some(p) = latency.get(k) {
            println!("      | {k} | {:.1} | {:.1} |", p.p50_us, p.p99_us);
        }
    }
    let mut regions = Vec::new();
    let mut errors = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let st = r.stats;
        let line = format!(
            "host {i}: {} faults, {} upgrades, {} RECALLING waits, {} notices answered, {} write-backs, {} errors, {} lost writes",
            st.faults,
            st.upgrades,
            st.recalls,
            st.revokes,
            st.writebacks,
            st.errors,
            st.lost_writes
        );
        println!("      {line}");
        regions.push(line);
        if st.errors > 0 || st.lost_writes > 0 {
            errors.push(format!("host {i}: {}", r.error.clone().unwrap_or_default()));
        }
    }
    let report = Report {
        hosts: 3,
        litmus_runs,
        litmus_passed: litmus_runs - bad_runs.min(litmus_runs),
        forbidden,
        lock_expected,
        lock_got: lock_got.clone(),
        job_bytes_wrong,
        latency,
        regions,
    };
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if bad_runs > 0 {
        bail!("{bad_runs} litmus runs showed a forbidden outcome");
    }
    if lock_got.iter().any(|&g| g != Some(lock_expected)) {
        bail!("the lock-protected counter is wrong: {lock_got:?}, expected {lock_expected}");
    }
    if job_bytes_wrong > 0 {
        bail!("the parallel job's array has {job_bytes_wrong} wrong bytes");
    }
    if !errors.is_empty() {
        bail!("regions met errors: {errors:?}");
    }
    Ok(())
}
