//! `bluebridge-bench`: closed- and open-loop load against a BlueBridge server.

mod load;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bluebridge_bench::{Access, Arrival, ECHO, Latencies, Mix, PAPER_TABLE1, Report, Run, plot};
use bluebridge_client::{NetArgs, TransportKind};
use bluebridge_proto::{HostId, MacAddr, Opcode, PAGE_SIZE, RemoteAddr};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use crate::load::{Group, Load, Part, Plan};

/// Load against a BlueBridge server, with per-operation latency percentiles (HdrHistogram).
///
/// Closed loop (default): each of `--threads` pinned threads keeps `--window` requests in
/// flight. Open loop (`--rate`): requests are offered at a fixed rate, Poisson or evenly
/// spaced, and latency is measured from each request's intended send time, so a stall counts
/// against every request it delayed (no coordinated omission). `--sweep` steps the open-loop
/// rate and reports the highest one whose p99 meets `--p99-target-us`. `--compare` runs the
/// same load over AF_XDP and then kernel UDP and prints the ratios. `--table1` reproduces the
/// BlueBridge paper's Table 1. Results print as a table; `--json` and `--plot` write them.
#[derive(Parser, Debug)]
#[command(name = "bluebridge-bench", version)]
struct Args {
    #[command(flatten)]
    net: NetArgs,
    /// Server host id (decimal or 0x-hex).
    #[arg(long)]
    host: HostId,
    /// With --compare: the host id the kernel-UDP run goes to (a `bluebridge-server
    /// --transport udp` in the same topology); default --host.
    #[arg(long)]
    udp_host: Option<HostId>,
    /// CPUs for the load threads, comma-separated; thread i runs on the i-th (cycling).
    /// Unset: unpinned (expect wake-up noise).
    #[arg(long, alias = "core", value_delimiter = ',', value_parser = bluebridge_xsk::cli::cpu)]
    cores: Vec<usize>,
    /// Load threads, each with its own socket (AF_XDP: on RX queue i, so the interface needs
    /// that many queues) and its share of the working set (1 to 64).
    #[arg(long, default_value_t = 1, value_parser = bluebridge_xsk::cli::count(1, 64))]
    threads: usize,
    /// Closed loop: requests each thread keeps in flight (1 to 128).
    #[arg(long, default_value_t = 1, value_parser = bluebridge_xsk::cli::count(1, 128))]
    window: usize,
    /// Open loop: offered requests per second, all threads together (more than 0).
    #[arg(long, conflicts_with = "sweep", value_parser = bluebridge_xsk::cli::non_negative)]
    rate: Option<f64>,
    /// Open loop: how requests are spaced.
    #[arg(long, value_enum, default_value_t = Arrival::Poisson)]
    arrival: Arrival,
    /// Open loop: most requests a thread has outstanding; requests falling due beyond it wait
    /// (and their wait counts in their latency). 1 to 128.
    #[arg(long, default_value_t = 64, value_parser = bluebridge_xsk::cli::count(1, 128))]
    max_in_flight: usize,
    /// Open-loop rate sweep FROM:TO:STEP in requests per second (e.g. 50000:400000:50000);
    /// each rate runs --warmup + --seconds; stops after two rates in a row miss the target.
    #[arg(long)]
    sweep: Option<Sweep>,
    /// Sweep target: a rate meets it if its p99 (the worst operation's) is at most this, it
    /// achieved 95% of the offered rate, and nothing failed.
    #[arg(long, default_value_t = 100.0, value_parser = bluebridge_xsk::cli::non_negative)]
    p99_target_us: f64,
    /// Run the load over AF_XDP, then over kernel UDP, in this topology; print the ratios.
    #[arg(long, conflicts_with = "echo")]
    compare: bool,
    /// Operation mix, OP=WEIGHT comma-separated; OP is read, write, write_blind, fetch_add,
    /// cas or ping.
    #[arg(long, default_value = "read=100")]
    mix: Mix,
    /// Pages in the working set, split evenly among the threads (allocated before, freed
    /// after; 1 to 16777216).
    #[arg(long, default_value_t = 1024, value_parser = bluebridge_xsk::cli::count(1, 1 << 24))]
    pages: usize,
    /// Bytes each read or write moves (8 to 4096; atomics always use 8).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u16).range(8..=4096))]
    payload: u16,
    /// Zipf exponent of page popularity (0: uniform).
    #[arg(long, default_value_t = 0.0, value_parser = bluebridge_xsk::cli::non_negative)]
    zipf: f64,
    /// Seconds measured (per rate, when sweeping; more than 0, at most 86400).
    #[arg(long, default_value_t = 5.0, value_parser = bluebridge_xsk::cli::positive_seconds)]
    seconds: f64,
    /// Seconds of load before measuring (0 to 86400).
    #[arg(long, default_value_t = 1.0, value_parser = bluebridge_xsk::cli::seconds)]
    warmup: f64,
    /// The paper's Table 1: --ops each of ALLOC, READ (4 KiB), UPDATE (acquire + commit of a
    /// page) and FREE, one at a time; median and p95 next to the paper's UDP and RDMA columns.
    #[arg(long, conflicts_with_all = ["echo", "rate", "sweep"])]
    table1: bool,
    /// With --table1: operations of each kind (1 to 10000000).
    #[arg(long, default_value_t = 1500, value_parser = bluebridge_xsk::cli::count(1, 10_000_000))]
    ops: usize,
    /// Bare-echo baseline: against a `bluebridge-server --echo` (or `--xdp-bounce`), time raw
    /// frames of 110 + `--payload` bytes bounced back unparsed, `--window` of them in flight,
    /// or with `--rate` one at a time at that rate (AF_XDP only).
    /// BASELINES-style ratios compare the operations against this, measured in the same run.
    #[arg(long)]
    echo: bool,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the report as SVG to this file: latency CDFs, or throughput against latency for
    /// a sweep.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// A sweep's rates.
#[derive(Debug, Clone, Copy)]
struct Sweep {
    from: f64,
    to: f64,
    step: f64,
}

impl FromStr for Sweep {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let v: Vec<f64> = s
            .split(':')
            .map(|x| x.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|_| format!("`{s}` is not FROM:TO:STEP (e.g. 50000:400000:50000)"))?;
        match v[..] {
            [from, to, step]
                if from > 0.0 && to >= from && step > 0.0 && to.is_finite() && step.is_finite() =>
            {
                Ok(Sweep { from, to, step })
            }
            [_, _, _] => Err(format!("`{s}`: need 0 < FROM <= TO and STEP > 0")),
            _ => Err(format!(
                "`{s}` is not FROM:TO:STEP (e.g. 50000:400000:50000)"
            )),
        }
    }
}

impl Sweep {
    fn rates(&self) -> Vec<f64> {
        let n = ((self.to - self.from) / self.step).floor() as usize + 1;
        (0..n.min(1000))
            .map(|i| self.from + i as f64 * self.step)
            .collect()
    }
}

fn main() -> Result<()> {
    bluebridge_client::init_logging("warn");
    let a = Args::parse();
    // The ranges of the number flags are clap's (one line each, before anything runs).
    if let Some(r) = a.rate {
        ensure!(
            r > 0.0,
            "--rate must be a positive number of requests per second"
        );
    }
    ensure!(
        !a.echo || a.rate.is_none() || a.window == 1,
        "--echo --rate sends one frame at a time, evenly spaced: it needs --window 1"
    );
    load::catch_interrupts()?;
    let ncpu = std::thread::available_parallelism().map_or(0, |n| n.get());
    // Where the results go must be writable before the run, not found out after it.
    for (flag, path) in [("--json", &a.json), ("--plot", &a.plot)] {
        if let Some(p) = path {
            let existed = p.exists();
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(p)
                .with_context(|| format!("{flag} {}: cannot write there", p.display()))?;
            if !existed {
                let _ = std::fs::remove_file(p); // written after the run
            }
        }
    }
    let access = Access::new(a.pages.div_ceil(a.threads), a.zipf).map_err(anyhow::Error::msg)?;
    let mtu = bluebridge_xsk::link_mtu(&a.net.iface)
        .with_context(|| format!("reading {}", a.net.iface))?;
    let noisy = bluebridge_bench::noisy_kernel_threads();
    if !noisy.is_empty() && !a.quiet {
        eprintln!(
            "note: {} running; it preempts busy-polling CPUs for ~1 ms at a time, which shows in the tail",
            noisy.join(", ")
        );
    }
    let environment = serde_json::json!({
        "iface": a.net.iface, "mtu": mtu, "cpus": ncpu,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "noisy_kernel_threads": noisy,
    });
    let transports = if a.compare {
        vec![TransportKind::Xdp, TransportKind::Udp]
    } else {
        vec![a.net.transport]
    };
    if a.echo {
        return echo(&a, mtu, environment);
    }
    let plan = |kind: TransportKind| Plan {
        connect: bluebridge_client::Connect {
            kind,
            ..a.net.connect()
        },
        rto: Duration::from_micros(a.net.rto_us),
        retries: a.net.retries,
        cores: a.cores.clone(),
        host: match kind {
            TransportKind::Udp => a.udp_host.unwrap_or(a.host),
            TransportKind::Xdp => a.host,
        },
        prefix: a.net.prefix,
        mix: a.mix.clone(),
        access: access.clone(),
        pages: a.pages.div_ceil(a.threads),
        payload: a.payload,
        window: a.window,
        max_in_flight: a.max_in_flight,
        arrival: a.arrival,
        warmup: Duration::from_secs_f64(a.warmup),
        measure: Duration::from_secs_f64(a.seconds),
    };
    let mut report = Report {
        config: config(&a),
        environment,
        runs: Vec::new(),
        best_rate: BTreeMap::new(),
    };
    if a.table1 {
        for &kind in &transports {
            report.runs.push(table1(&a, &plan(kind))?);
        }
        print_table1(&report);
        return finish(&a, &report);
    }

    let phases: Vec<Option<f64>> = match (a.sweep, a.rate) {
        (Some(s), _) => s.rates().into_iter().map(Some).collect(),
        (None, Some(r)) => vec![Some(r)],
        (None, None) => vec![None],
    };
    let per_phase = a.warmup + a.seconds;
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((per_phase * (phases.len() * transports.len()) as f64).ceil() as u64)
            .with_style(
                ProgressStyle::with_template("{msg:32} [{bar:30}] {pos}/{len} s (at most)")
                    .expect("template"),
            )
    };
    let started = Instant::now();
    for &kind in &transports {
        let name = transport_name(kind);
        let plan = Arc::new(plan(kind));
        bar.set_message(format!("{name}: starting {} threads", a.threads));
        let group = Group::start(&plan, a.threads)?;
        let mut misses = 0;
        for rate in &phases {
            if load::interrupted() {
                break;
            }
            bar.set_message(match rate {
                Some(r) => format!("{name}: {r:.0} requests/s offered"),
                None => format!("{name}: window {} × {} threads", a.window, a.threads),
            });
            let load = rate.map_or(Load::Closed, |r| Load::Open(r / a.threads as f64));
            let part = group.run(load, || bar.set_position(started.elapsed().as_secs()))?;
            let run = to_run(name, a.threads, *rate, a.seconds, part);
            if a.sweep.is_some() {
                misses = if run.meets(a.p99_target_us) {
                    0
                } else {
                    misses + 1
                };
            }
            report.runs.push(run);
            if misses >= 2 {
                break;
            }
        }
        group.finish()?;
        if load::interrupted() {
            break;
        }
        if a.sweep.is_some() {
            let best = report
                .runs
                .iter()
                .filter(|r| r.transport == name && r.meets(a.p99_target_us))
                .filter_map(|r| r.offered_rate)
                .fold(None, |b: Option<f64>, r| Some(b.map_or(r, |b| b.max(r))));
            report.best_rate.insert(name.to_owned(), best);
        }
    }
    bar.finish_and_clear();
    print_runs(&report);
    if load::interrupted() {
        bail!("interrupted: the results above are partial; every page the run allocated was freed");
    }
    if a.sweep.is_some() {
        for (t, best) in &report.best_rate {
            match best {
                Some(r) => println!(
                    "{t}: highest offered rate meeting p99 ≤ {} µs: {r:.0} requests/s",
                    a.p99_target_us
                ),
                None => println!("{t}: no rate in the sweep met p99 ≤ {} µs", a.p99_target_us),
            }
        }
    }
    if a.compare {
        print_ratios(&report);
    }
    finish(&a, &report)
}

fn transport_name(kind: TransportKind) -> &'static str {
    match kind {
        TransportKind::Xdp => "xdp",
        TransportKind::Udp => "udp",
    }
}

fn config(a: &Args) -> serde_json::Value {
    serde_json::json!({
        "transport": if a.compare { "compare".to_owned() } else { transport_name(a.net.transport).to_owned() },
        "host": a.host.to_string(), "udp_host": a.udp_host.map(|h| h.to_string()),
        "threads": a.threads, "cores": a.cores, "window": a.window, "mix": a.mix.to_string(),
        "rate": a.rate, "arrival": a.arrival, "max_in_flight": a.max_in_flight,
        "sweep": a.sweep.map(|s| [s.from, s.to, s.step]), "p99_target_us": a.p99_target_us,
        "pages": a.pages, "payload_bytes": a.payload, "zipf": a.zipf, "seconds": a.seconds,
        "warmup": a.warmup, "segments": a.net.segments, "rto_us": a.net.rto_us,
        "retries": a.net.retries, "table1": a.table1, "ops": a.ops, "echo": a.echo,
    })
}

fn to_run(transport: &str, threads: usize, offered: Option<f64>, secs: f64, p: Part) -> Run {
    Run {
        transport: transport.to_owned(),
        threads,
        offered_rate: offered,
        seconds: secs,
        ops_per_second: p.done as f64 / secs,
        latency: p.lat.percentiles(),
        cdf: p.lat.cdf(200),
        errors: p.errors,
        unsent: p.unsent,
        retransmissions: p.retransmits,
        timeouts: p.timeouts,
        inline_sent: p.inline_sent,
        inline_served: p.inline_served,
        late_replies: p.late_replies,
        tx_dropped: p.tx_dropped,
    }
}

fn print_runs(r: &Report) {
    println!(
        "| transport | offered/s | achieved/s | operation | count | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | retx | timeouts |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for run in &r.runs {
        let offered = run
            .offered_rate
            .map_or("closed".to_owned(), |o| format!("{o:.0}"));
        for (op, p) in &run.latency {
            println!(
                "| {} | {offered} | {:.0} | {op} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
                run.transport,
                run.ops_per_second,
                p.count,
                p.p50_us,
                p.p90_us,
                p.p99_us,
                p.p999_us,
                p.max_us,
                run.retransmissions,
                run.timeouts
            );
        }
        for (e, n) in &run.errors {
            println!("  {} at {offered}: {e}: {n}", run.transport);
        }
        if run.timeouts > 0 {
            println!(
                "  {} at {offered}: late replies (answers to a copy already answered or to a \
                 request already given up: a slow server or path, not a silent one): {}",
                run.transport, run.late_replies
            );
        }
        if run.tx_dropped > 0 {
            println!(
                "  {} at {offered}: requests the client could not send (dropped, sent again after \
                 a timeout): {}",
                run.transport, run.tx_dropped
            );
        }
        if run.unsent > 0 {
            println!(
                "  {} at {offered}: {} requests fell due but were never sent: the load outran the system",
                run.transport, run.unsent
            );
        }
    }
}

fn print_ratios(r: &Report) {
    let (Some(x), Some(u)) = (r.run("xdp"), r.run("udp")) else {
        return;
    };
    println!("\nAF_XDP against kernel UDP, this run:");
    if r.is_sweep() {
        let best = |t: &str| r.best_rate.get(t).copied().flatten();
        if let (Some(bx), Some(bu)) = (best("xdp"), best("udp")) {
            println!("- highest rate meeting the p99 target: {:.2}×", bx / bu);
        }
        return;
    }
    println!(
        "- operations per second: AF_XDP {:.0}, UDP {:.0} (AF_XDP / UDP {:.2}×)",
        x.ops_per_second,
        u.ops_per_second,
        x.ops_per_second / u.ops_per_second
    );
    for (op, px) in &x.latency {
        if let Some(pu) = u.latency.get(op) {
            println!(
                "- {op} p50 AF_XDP {:.2} µs, UDP {:.2} µs (UDP / AF_XDP {:.2}×); p99 {:.2} µs, {:.2} µs ({:.2}×)",
                px.p50_us,
                pu.p50_us,
                pu.p50_us / px.p50_us,
                px.p99_us,
                pu.p99_us,
                pu.p99_us / px.p99_us
            );
        }
    }
}

/// Table 1: one thread, one operation at a time, after a short untimed warm-up.
/// Table 1's operations, one at a time; `live` holds the pages allocated and not yet freed.
fn table1_ops(
    a: &Args,
    plan: &Plan,
    c: &mut bluebridge_client::Client<bluebridge_client::AnyTransport>,
    bar: &ProgressBar,
    lat: &mut Latencies,
    live: &mut Vec<RemoteAddr>,
) -> Result<()> {
    let name = transport_name(plan.connect.kind);
    let host = plan.host;
    let page = vec![0x3cu8; PAGE_SIZE];
    let check = || -> Result<()> {
        ensure!(!load::interrupted(), "interrupted");
        Ok(())
    };
    for _ in 0..200.min(a.ops) {
        check()?;
        live.push(c.alloc(host, false)?);
        c.read(live[0])?;
        c.free(live[0])?;
        live.clear();
    }
    let mut time = |label: &'static str, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        let t = Instant::now();
        f()?;
        lat.record(label, t.elapsed().as_nanos() as u64);
        bar.inc(1);
        Ok(())
    };
    bar.set_message(format!("{name}: ALLOC"));
    for _ in 0..a.ops {
        check()?;
        time("ALLOC", &mut || {
            live.push(c.alloc(host, false)?);
            Ok(())
        })?;
    }
    bar.set_message(format!("{name}: READ"));
    for &p in live.iter() {
        check()?;
        time("READ", &mut || {
            ensure!(c.read(p)?.len() == PAGE_SIZE, "short read");
            Ok(())
        })?;
    }
    bar.set_message(format!("{name}: UPDATE"));
    for &p in live.iter() {
        check()?;
        time("UPDATE", &mut || {
            let (lease, old) = c.update_acquire(p, 0, PAGE_SIZE as u16, 0)?;
            ensure!(old.len() == PAGE_SIZE, "short acquire");
            c.update_commit(p, lease, 0, &page)?;
            Ok(())
        })?;
    }
    bar.set_message(format!("{name}: FREE"));
    while let Some(&p) = live.last() {
        check()?;
        time("FREE", &mut || Ok(c.free(p)?))?;
        live.pop();
    }
    Ok(())
}

fn table1(a: &Args, plan: &Plan) -> Result<Run> {
    let name = transport_name(plan.connect.kind);
    bluebridge_xsk::busy_poll_thread(a.cores.first().copied(), true)
        .context("setting up the load thread")?;
    let mut c = load::client(plan, 0, None)?;
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(4 * a.ops as u64).with_style(
            ProgressStyle::with_template("{msg:24} [{bar:30}] {pos}/{len}").expect("template"),
        )
    };
    bar.set_message(format!("{name}: warming up"));
    let mut lat = Latencies::default();
    let start = Instant::now();
    // Every page allocated is in `live` until freed, so an error (or Ctrl-C) on the way frees
    // the rest.
    let mut live: Vec<RemoteAddr> = Vec::with_capacity(a.ops);
    let outcome = table1_ops(a, plan, &mut c, &bar, &mut lat, &mut live);
    let failed = c.free_all(&live);
    outcome?;
    if let Some((p, e)) = failed.first() {
        bail!("{} pages not freed (first: {p}: {e})", failed.len());
    }
    let secs = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let stats = c.stats();
    Ok(Run {
        transport: name.to_owned(),
        threads: 1,
        offered_rate: None,
        seconds: secs,
        ops_per_second: lat.count() as f64 / secs,
        latency: lat.percentiles(),
        cdf: lat.cdf(200),
        errors: BTreeMap::new(),
        unsent: 0,
        retransmissions: stats.retransmits,
        timeouts: stats.timeouts,
        inline_sent: stats.inline_sent,
        inline_served: stats.inline_served,
        late_replies: stats.stray,
        tx_dropped: stats.tx_dropped,
    })
}

fn print_table1(r: &Report) {
    let mut head = String::from("| operation |");
    let mut rule = String::from("|---|");
    for run in &r.runs {
        head += &format!(" {} median / p95 µs |", run.transport);
        rule += "---|";
    }
    println!("{head} paper UDP median µs | paper RDMA median µs |\n{rule}---|---|");
    for (op, udp, rdma) in PAPER_TABLE1 {
        let mut row = format!("| {op} |");
        for run in &r.runs {
            match run.latency.get(op) {
                Some(p) => row += &format!(" {:.2} / {:.2} |", p.p50_us, p.p95_us),
                None => row += " – |",
            }
        }
        println!("{row} {udp:.1} | {rdma:.2} |");
    }
}

/// The bare-echo baseline: one raw frame at a time, timed from send to the first frame back.
fn echo(a: &Args, mtu: u16, environment: serde_json::Value) -> Result<()> {
    bluebridge_xsk::busy_poll_thread(a.cores.first().copied(), true)
        .context("setting up the load thread")?;
    let next_hop = a.net.next_hop_mac.context("--echo needs --next-hop-mac")?;
    ensure!(
        a.net.transport == TransportKind::Xdp,
        "--echo needs the AF_XDP transport"
    );
    let (mut transport, _) = a.net.open()?;
    let x = transport.xdp_mut().context("--echo needs AF_XDP")?;
    let ep = bluebridge_proto::frame::Endpoints {
        src_mac: MacAddr(x.mac()),
        dst_mac: next_hop,
        src: a.net.local,
        dst: RemoteAddr::host_op(a.net.prefix, a.host, Opcode::PING).to_ipv6(),
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
    // An echo comes back as sent (endpoints swapped): same length, no REPLY flag, the payload
    // intact. A BlueBridge server answers a REPLY instead: that is not a baseline.
    let len = frame.len();
    let is_echo = move |f: &[u8]| {
        f.len() == len
            && f[62 + 1] & bluebridge_proto::HeaderFlags::REPLY.0 == 0
            && f[bluebridge_proto::FRAME_OVERHEAD..]
                .iter()
                .all(|&b| b == 0x5a)
    };
    let not_echo = || {
        anyhow::anyhow!(
            "a frame came back that is not an echo of ours: is host {} a `bluebridge-server \
             --echo`?",
            a.host
        )
    };
    let mut lat = Latencies::default();
    let (warmup, measure) = (
        Duration::from_secs_f64(a.warmup),
        Duration::from_secs_f64(a.seconds),
    );
    let start = Instant::now();
    let (mut done, mut lost) = (0u64, 0u64);
    let mut since = None;
    if a.window > 1 {
        // Pipelined: `window` frames in flight, each numbered in its request-id field (the
        // echo bounces frames unparsed, so the checksum is left as built); a frame back is
        // timed against its own send and replaced by the next one.
        const ID_AT: usize = 62 + 8;
        let w = a.window as u64;
        let mut sent_at = vec![Instant::now(); a.window];
        let mut next = 0u64;
        // Sends frame `next` (spinning while the TX ring is full: each try reclaims
        // completions) and notes when.
        let send = |x: &mut bluebridge_client::XdpTransport,
                    frame: &mut [u8],
                    sent_at: &mut [Instant],
                    next: &mut u64| {
            frame[ID_AT..ID_AT + 8].copy_from_slice(&next.to_be_bytes());
            while !x.send_raw(frame) {}
            sent_at[(*next % w) as usize] = Instant::now();
            *next += 1;
        };
        while next < w {
            send(x, &mut frame, &mut sent_at, &mut next);
        }
        let mut last_back = Instant::now();
        while start.elapsed() < warmup + measure {
            if since.is_none() && start.elapsed() >= warmup {
                since = Some(Instant::now());
            }
            let mut back = Vec::new();
            let mut foreign = false;
            x.recv_raw(|f| {
                if !is_echo(f) {
                    foreign = true;
                } else if let Some(id) = f.get(ID_AT..ID_AT + 8) {
                    back.push(u64::from_be_bytes(id.try_into().expect("8 bytes")));
                }
            });
            if foreign {
                return Err(not_echo());
            }
            if back.is_empty() {
                if last_back.elapsed() > Duration::from_secs(1) {
                    bail!(
                        "the echo stopped answering with {} frames in flight",
                        a.window
                    );
                }
                continue;
            }
            last_back = Instant::now();
            for id in back {
                if since.is_some() {
                    done += 1;
                    let t = sent_at[(id % w) as usize];
                    lat.record(ECHO, t.elapsed().as_nanos() as u64);
                }
                send(x, &mut frame, &mut sent_at, &mut next);
            }
        }
    }
    // With --rate: one frame every 1/rate, evenly (an idle path between frames, as a light
    // load sees it).
    let gap = a.rate.map(|r| Duration::from_secs_f64(1.0 / r)); // > 0: checked in main
    let mut due = Instant::now();
    while a.window <= 1 && start.elapsed() < warmup + measure {
        if since.is_none() && start.elapsed() >= warmup {
            since = Some(Instant::now());
        }
        if let Some(g) = gap {
            while Instant::now() < due {
                std::hint::spin_loop();
            }
            due += g;
        }
        let t = Instant::now();
        while !x.send_raw(&frame) {
            x.recv_raw(|_| {});
        }
        let (mut back, mut foreign) = (false, false);
        while !back && !foreign && t.elapsed() < Duration::from_secs(1) {
            x.recv_raw(|f| {
                back = true;
                foreign |= !is_echo(f);
            });
        }
        if foreign {
            return Err(not_echo());
        }
        if since.is_some() {
            if back {
                done += 1;
                lat.record(ECHO, t.elapsed().as_nanos() as u64);
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
    let mut config = config(a);
    config["frame_bytes"] = frame.len().into();
    config["mtu"] = mtu.into();
    let report = Report {
        config,
        environment,
        runs: vec![Run {
            transport: "xdp".into(),
            threads: 1,
            offered_rate: None,
            seconds: secs,
            ops_per_second: done as f64 / secs,
            latency: lat.percentiles(),
            cdf: lat.cdf(200),
            errors,
            unsent: 0,
            retransmissions: 0,
            timeouts: lost,
            inline_sent: 0,
            inline_served: 0,
            late_replies: 0,
            tx_dropped: 0,
        }],
        best_rate: BTreeMap::new(),
    };
    print_runs(&report);
    finish(a, &report)
}

/// Writes the JSON and the plot, and fails if a run that was not a sweep saw errors (a sweep
/// is expected to overload the system at its top rates).
fn finish(a: &Args, report: &Report) -> Result<()> {
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    if let Some(path) = &a.plot {
        plot::write(report, path)?;
        println!("plot written to {}", path.display());
    }
    let failed: Vec<_> = report
        .runs
        .iter()
        .filter(|r| !r.errors.is_empty())
        .collect();
    if !report.is_sweep() && !failed.is_empty() {
        let e: Vec<_> = failed.iter().map(|r| (&r.transport, &r.errors)).collect();
        bail!("the run saw errors: {e:?}");
    }
    Ok(())
}
