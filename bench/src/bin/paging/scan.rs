//! The scans: a region four times its resident budget read in order and at random, timed
//! against the same work in local memory and against the READ rates of the same client in the
//! same run (one READ at a time, and pipelined).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bluebridge_bench::paging::{ScanReport, Summary, Workload};
use bluebridge_client::region::{OnClose, RegionStats};
use bluebridge_client::{AnyTransport, Client, RegionOptions, RemoteRegion, Request};
use bluebridge_proto::segment::Segments;
use bluebridge_proto::{HostId, Opcode, PAGE_SIZE, RemoteAddr};
use rand::SeedableRng;
use rand::seq::SliceRandom;

/// READs kept in flight for the pipelined rate.
const WINDOW: usize = 32;
/// Window-1 READs timed.
const SINGLE_READS: usize = 2000;

/// Word `w` of page `p`'s pattern.
fn word(p: usize, w: usize) -> u64 {
    ((p as u64) << 32) | w as u64 | 0x5a00_0000_0000_0000
}

fn page_pattern(p: usize) -> Vec<u8> {
    (0..PAGE_SIZE / 8)
        .flat_map(|w| word(p, w).to_ne_bytes())
        .collect()
}

/// The sum of page `p`'s words, as the scan computes it.
fn page_sum(bytes: &[u8]) -> u64 {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
        .fold(0u64, u64::wrapping_add)
}

/// Runs the scans over `4 × budget` fresh pages on `host` (freed afterwards, also on error)
/// and gives the client back.
pub(crate) fn run(
    mut client: Client<AnyTransport>,
    host: HostId,
    budget: usize,
    stop: &dyn Fn() -> Result<()>,
) -> Result<(ScanReport, Client<AnyTransport>)> {
    let n = 4 * budget;
    let pages = super::alloc(&mut client, host, n)?;
    let baselines = fill(&mut client, &pages).and_then(|writes| {
        stop()?;
        reads(&mut client, &pages).map(|(w1, r)| (w1, r, writes))
    });
    let (read_window1, pipelined_reads_per_s, pipelined_writes_per_s) = match baselines {
        Ok(b) => b,
        Err(e) => {
            let _ = client.free_all(&pages);
            return Err(e);
        }
    };
    // The region frees the pages when it closes (also when dropped on an error).
    let mut region = RemoteRegion::attach(
        client,
        pages,
        RegionOptions {
            resident_pages: budget,
            on_close: OnClose::Free,
            trace: true,
            ..RegionOptions::default()
        },
    )?;
    let (sequential, random, random_fault) = scans(&mut region, n, budget, stop)?;
    let client = region.close()?.into_client();
    Ok((
        ScanReport {
            read_window1,
            pipelined_reads_per_s,
            pipelined_writes_per_s,
            pipeline_window: WINDOW,
            sequential,
            random,
            random_fault,
        },
        client,
    ))
}

/// Writes every page's pattern, `WINDOW` WRITEs in flight (a page that does not fit one frame
/// is a WRITE per segment); returns the pages written per second: the pipelined WRITE rate.
fn fill(client: &mut Client<AnyTransport>, pages: &[RemoteAddr]) -> Result<f64> {
    let seg = client.max_request_data();
    let mut writes: Vec<Request> = Vec::new();
    for (p, &a) in pages.iter().enumerate() {
        let data = page_pattern(p);
        for (o, l) in Segments::new(0, PAGE_SIZE as u16, seg) {
            let at = usize::from(o);
            writes.push(
                Request::new(Opcode::WRITE, a)
                    .range(o, l)
                    .payload(data[at..at + usize::from(l)].to_vec()),
            );
        }
    }
    let took = in_flight(client, writes, "writing the scan's pages")?;
    Ok(pages.len() as f64 / took.as_secs_f64())
}

/// Runs `requests` with `WINDOW` of them in flight (replies' buffers go back to the engine);
/// returns how long they took. The first failure ends it (`what` failed).
fn in_flight(
    client: &mut Client<AnyTransport>,
    requests: impl IntoIterator<Item = Request>,
    what: &'static str,
) -> Result<Duration> {
    let mut requests = requests.into_iter();
    let mut left = 0usize;
    let t = Instant::now();
    loop {
        while client.in_flight() < WINDOW
            && let Some(r) = requests.next()
        {
            client.submit(r);
            left += 1;
        }
        if left == 0 {
            return Ok(t.elapsed());
        }
        if let Some(c) = client.poll() {
            client.recycle(c.result.context(what)?.data);
            left -= 1;
        }
    }
}

/// The READ baselines: window-1 latency, and the pipelined rate over every page twice.
fn reads(client: &mut Client<AnyTransport>, pages: &[RemoteAddr]) -> Result<(Summary, f64)> {
    let mut buf = vec![0u8; PAGE_SIZE];
    let mut ns = Vec::with_capacity(SINGLE_READS);
    for i in 0..SINGLE_READS {
        let t = Instant::now();
        client
            .read_into(pages[i % pages.len()], 0, &mut buf)
            .context("window-1 READ")?;
        ns.push(t.elapsed().as_nanos() as u64);
    }
    let reads = pages
        .iter()
        .chain(pages)
        .map(|&a| Request::new(Opcode::READ, a).range(0, PAGE_SIZE as u16));
    let took = in_flight(client, reads, "pipelined READ")?;
    Ok((
        Summary::of(ns),
        (2 * pages.len()) as f64 / took.as_secs_f64(),
    ))
}

fn workload(
    name: &str,
    pages: usize,
    budget: usize,
    local: Duration,
    remote: Duration,
    before: RegionStats,
    after: RegionStats,
) -> Workload {
    Workload {
        name: name.into(),
        pages,
        resident_pages: budget,
        local_ms: local.as_secs_f64() * 1e3,
        remote_ms: remote.as_secs_f64() * 1e3,
        faults: after.faults - before.faults,
        fetches: (after.prefetch_misses + after.prefetches)
            - (before.prefetch_misses + before.prefetches),
        prefetches: after.prefetches - before.prefetches,
        prefetch_hits: after.prefetch_hits - before.prefetch_hits,
        prefetch_wasted: after.prefetch_wasted - before.prefetch_wasted,
        evictions: after.evictions - before.evictions,
        writebacks: after.writebacks - before.writebacks,
    }
}

/// The sequential scan (every page summed whole, checked against its pattern) and the random
/// one (one word of every page, shuffled, each access timed), in the region and locally.
fn scans(
    region: &mut RemoteRegion<AnyTransport>,
    n: usize,
    budget: usize,
    stop: &dyn Fn() -> Result<()>,
) -> Result<(Workload, Workload, Summary)> {
    let local: Vec<u8> = (0..n).flat_map(page_pattern).collect();
    let expected: Vec<u64> = local.chunks(PAGE_SIZE).map(page_sum).collect();

    let t = Instant::now();
    let sums: Vec<u64> = local.chunks(PAGE_SIZE).map(page_sum).collect();
    let local_seq = t.elapsed();
    ensure!(std::hint::black_box(sums) == expected, "local sums differ");
    stop()?;
    let before = region.stats();
    let t = Instant::now();
    let sums: Vec<u64> = region.as_slice().chunks(PAGE_SIZE).map(page_sum).collect();
    let remote_seq = t.elapsed();
    let after = region.stats();
    if let Some(p) = (0..n).find(|&p| sums[p] != expected[p]) {
        bail!("sequential scan: page {p} does not hold what was written");
    }
    let sequential = workload(
        "sequential scan (whole pages, in order)",
        n,
        budget,
        local_seq,
        remote_seq,
        before,
        after,
    );
    stop()?;

    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(9));
    let probe = |mem: &[u8], p: usize| {
        let at = p * PAGE_SIZE + 8 * (p % (PAGE_SIZE / 8));
        u64::from_ne_bytes(mem[at..at + 8].try_into().expect("8 bytes"))
    };
    let t = Instant::now();
    for &p in &order {
        std::hint::black_box(probe(&local, p));
    }
    let local_rand = t.elapsed();
    let _ = region.take_traces();
    let before = region.stats();
    let mem = region.as_slice();
    let mut times = Vec::with_capacity(n);
    let t = Instant::now();
    for &p in &order {
        let t0 = Instant::now();
        let v = probe(mem, p);
        times.push((p, t0.elapsed().as_nanos() as u64, v));
    }
    let remote_rand = t.elapsed();
    let after = region.stats();
    for &(p, _, v) in &times {
        ensure!(
            v == word(p, p % (PAGE_SIZE / 8)),
            "random scan: page {p} does not hold what was written"
        );
    }
    // The accesses that faulted: the pages the handler fetched for a fault (traced).
    let faulted: std::collections::HashSet<usize> =
        region.take_traces().iter().map(|t| t.page).collect();
    let fault_ns: Vec<u64> = times
        .iter()
        .filter(|(p, ..)| faulted.contains(p))
        .map(|&(_, ns, _)| ns)
        .collect();
    ensure!(!fault_ns.is_empty(), "the random scan took no fault");
    let random = workload(
        "random scan (one word per page, shuffled)",
        n,
        budget,
        local_rand,
        remote_rand,
        before,
        after,
    );
    Ok((sequential, random, Summary::of(fault_ns)))
}
