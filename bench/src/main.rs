//! `bluebridge-bench`: closed-loop load against a BlueBridge server.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bluebridge_bench::{Access, Latencies, Mix, Report};
use bluebridge_client::{Client, NetArgs, Request};
use bluebridge_proto::{HostId, MacAddr, Opcode, PAGE_SIZE, RemoteAddr};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{RngExt, SeedableRng};

/// Closed-loop load: one pinned thread keeps `--window` requests in flight for `--seconds`
/// (after `--warmup`), drawing operations from `--mix` over a working set of `--pages` pages,
/// and reports per-operation latency percentiles (HdrHistogram), the achieved rate, and
/// retransmissions, timeouts and errors — as a table, and as JSON with `--json`.
#[derive(Parser, Debug)]
#[command(name = "bluebridge-bench", version)]
struct Args {
    #[command(flatten)]
    net: NetArgs,
    /// Server host id (decimal or 0x-hex).
    #[arg(long)]
    host: HostId,
    /// CPU to pin the load thread to.
    #[arg(long)]
    core: Option<usize>,
    /// Requests kept in flight.
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// Operation mix, OP=WEIGHT comma-separated; OP is read, write, write_blind, fetch_add,
    /// cas or ping.
    #[arg(long, default_value = "read=100")]
    mix: Mix,
    /// Pages in the working set (allocated before, freed after).
    #[arg(long, default_value_t = 1024)]
    pages: usize,
    /// Bytes each read or write moves (8 to 4096; atomics always use 8).
    #[arg(long, default_value_t = 4096)]
    payload: u16,
    /// Zipf exponent of page popularity (0: uniform).
    #[arg(long, default_value_t = 0.0)]
    zipf: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Bare-echo baseline: against a `bluebridge-server --echo`, time raw frames of 110 +
    /// `--payload` bytes bounced back unparsed (window 1; AF_XDP only). BASELINES-style
    /// ratios compare the operations against this, measured in the same run.
    #[arg(long)]
    echo: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    ensure!(a.window >= 1, "--window must be at least 1");
    ensure!(
        (8..=PAGE_SIZE as u16).contains(&a.payload),
        "--payload must be 8 to 4096 bytes"
    );
    ensure!(
        a.seconds > 0.0 && a.warmup >= 0.0,
        "--seconds must be positive and --warmup non-negative"
    );
    let access = Access::new(a.pages, a.zipf).map_err(anyhow::Error::msg)?;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    bluebridge_xsk::busy_poll_thread(a.core, true).context("setting up the load thread")?;

    let mtu = bluebridge_xsk::link_mtu(&a.net.iface)
        .with_context(|| format!("reading {}", a.net.iface))?;
    let (transport, ec) = a.net.open().with_context(|| {
        format!(
            "opening the {:?} transport on {}",
            a.net.transport, a.net.iface
        )
    })?;
    let segment = ec.max_request_data;
    let mut c = Client::new(ec, transport);
    let host = a.host;
    if a.echo {
        return echo(&mut c, &a, host, mtu, cpus);
    }

    // The working set.
    let mut pages: Vec<RemoteAddr> = Vec::with_capacity(a.pages);
    while pages.len() < a.pages {
        let n = (a.pages - pages.len()).min(128) as u16;
        pages.extend(
            c.alloc_bulk(host, n, false)
                .context("allocating the working set")?,
        );
    }
    let payload = vec![0xa5u8; usize::from(a.payload)];
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0x5eed);

    let warmup = Duration::from_secs_f64(a.warmup);
    let measure = Duration::from_secs_f64(a.seconds);
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((a.warmup + a.seconds).ceil() as u64).with_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} s").expect("template"),
        )
    };
    bar.set_message("warming up");
    let mut lat = Latencies::default();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let start = Instant::now();
    let (mut measuring_since, mut done) = (None, 0u64);
    loop {
        let elapsed = start.elapsed();
        if measuring_since.is_none() && elapsed >= warmup {
            measuring_since = Some((Instant::now(), c.stats()));
            bar.set_message("measuring");
        }
        bar.set_position(elapsed.as_secs());
        let finished = elapsed >= warmup + measure;
        while !finished && c.in_flight() < a.window {
            let op = a.mix.pick(rng.random::<f64>());
            let page = pages[access.sample(&mut rng)];
            let req = match op {
                Opcode::READ => Request::new(op, page).range(0, a.payload),
                Opcode::WRITE | Opcode::WRITE_BLIND => {
                    // One request frame per segment: a larger write is several requests.
                    let len = a.payload.min(segment);
                    Request::new(op, page)
                        .range(0, len)
                        .payload(payload[..usize::from(len)].to_vec())
                }
                Opcode::FETCH_ADD | Opcode::CAS => {
                    let mut r = Request::new(op, page).range(8 * (rng.random_range(0..8u16)), 8);
                    r.operand0 = 1;
                    r
                }
                _ => Request::new(
                    Opcode::PING,
                    RemoteAddr::host_op(a.net.prefix, host, Opcode::PING),
                ),
            };
            // The tag carries the operation back with the completion.
            c.submit(req.tag(u64::from(op.0)));
        }
        while let Some(comp) = c.poll() {
            let op = Opcode(comp.tag as u8);
            if measuring_since.is_none() {
                continue;
            }
            done += 1;
            match comp.result {
                // A blind write completes when sent: counted, no latency to report.
                Ok(_) if op == Opcode::WRITE_BLIND => {}
                Ok(_) => lat.record(op, comp.latency.as_nanos() as u64),
                Err(e) => *errors.entry(format!("{e}")).or_default() += 1,
            }
        }
        if finished && c.in_flight() == 0 {
            break;
        }
    }
    bar.finish_and_clear();
    let (since, stats_at) = measuring_since.expect("measured");
    let secs = since.elapsed().as_secs_f64().min(a.seconds.max(1e-9) + 1.0);
    let after = c.stats();
    for chunk in pages.chunks(128) {
        for r in c.free_bulk(chunk)? {
            r?;
        }
    }
    let report = Report {
        config: serde_json::json!({
            "transport": format!("{:?}", a.net.transport).to_lowercase(), "window": a.window, "mix": a.mix.to_string(),
            "pages": a.pages, "payload_bytes": a.payload, "zipf": a.zipf, "seconds": a.seconds, "warmup": a.warmup,
            "segments": a.net.segments, "rto_us": a.net.rto_us, "retries": a.net.retries, "core": a.core,
        }),
        environment: serde_json::json!({
            "iface": a.net.iface, "mtu": mtu, "cpus": cpus,
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        }),
        seconds: secs,
        ops_per_second: done as f64 / secs,
        latency: lat.percentiles(),
        errors,
        retransmissions: after.retransmits - stats_at.retransmits,
        timeouts: after.timeouts - stats_at.timeouts,
    };
    finish(&report, a.json.as_deref())
}

fn print_table(r: &Report) {
    println!(
        "{:.0} ops/s over {:.2} s | retransmissions {} | timeouts {}",
        r.ops_per_second, r.seconds, r.retransmissions, r.timeouts
    );
    println!("| operation | count | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs |");
    println!("|---|---|---|---|---|---|---|");
    for (op, p) in &r.latency {
        println!(
            "| {op} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            p.count, p.p50_us, p.p90_us, p.p99_us, p.p999_us, p.max_us
        );
    }
    for (e, n) in &r.errors {
        println!("error: {e}: {n}");
    }
}

/// The bare-echo baseline: one raw frame at a time, timed from send to the first frame back.
fn echo(
    c: &mut Client<bluebridge_client::AnyTransport>,
    a: &Args,
    host: HostId,
    mtu: u16,
    cpus: usize,
) -> Result<()> {
    let next_hop = a.net.next_hop_mac.context("--echo needs --next-hop-mac")?;
    let x = c
        .transport_mut()
        .xdp_mut()
        .context("--echo needs the AF_XDP transport")?;
    let ep = bluebridge_proto::frame::Endpoints {
        src_mac: MacAddr(x.mac()),
        dst_mac: next_hop,
        src: a.net.local,
        dst: RemoteAddr::host_op(a.net.prefix, host, Opcode::PING).to_ipv6(),
        src_port: 40000,
        dst_port: bluebridge_proto::UDP_PORT,
    };
    let payload = vec![0x5au8; usize::from(a.payload)];
    let mut frame = vec![0u8; bluebridge_proto::FRAME_OVERHEAD + payload.len()];
    let header = bluebridge_proto::BbRepr {
        count: 1,
        ..Default::default()
    };
    bluebridge_proto::frame::build(&mut frame, &ep, &header, &payload)?;
    let mut lat = Latencies::default();
    let (warmup, measure) = (
        Duration::from_secs_f64(a.warmup),
        Duration::from_secs_f64(a.seconds),
    );
    let start = Instant::now();
    let (mut done, mut lost) = (0u64, 0u64);
    let mut since = None;
    while start.elapsed() < warmup + measure {
        if since.is_none() && start.elapsed() >= warmup {
            since = Some(Instant::now());
        }
        let t = Instant::now();
        while !x.send_raw(&frame) {
            x.recv_raw(|_| {});
        }
        let mut back = false;
        while !back && t.elapsed() < Duration::from_secs(1) {
            x.recv_raw(|_| back = true);
        }
        if since.is_some() {
            if back {
                done += 1;
                lat.record(bluebridge_bench::ECHO, t.elapsed().as_nanos() as u64);
            } else {
                lost += 1;
            }
        }
    }
    let secs = since.map_or(0.0, |s| s.elapsed().as_secs_f64()).max(1e-9);
    let mut errors = BTreeMap::new();
    if lost > 0 {
        errors.insert("no echo within 1 s".to_owned(), lost);
    }
    let report = Report {
        config: serde_json::json!({
            "transport": "xdp", "echo": true, "frame_bytes": frame.len(), "seconds": a.seconds,
            "warmup": a.warmup, "core": a.core,
        }),
        environment: serde_json::json!({ "iface": a.net.iface, "mtu": mtu, "cpus": cpus }),
        seconds: secs,
        ops_per_second: done as f64 / secs,
        latency: lat.percentiles(),
        errors,
        retransmissions: 0,
        timeouts: lost,
    };
    finish(&report, a.json.as_deref())
}

/// Prints the report, writes the JSON, and fails if there were errors.
fn finish(report: &Report, json: Option<&std::path::Path>) -> Result<()> {
    print_table(report);
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    if !report.errors.is_empty() {
        bail!("the run saw errors: {:?}", report.errors);
    }
    Ok(())
}
