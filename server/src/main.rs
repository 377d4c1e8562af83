//! `bluebridge-server`: serves remote pages on an interface over XDP + AF_XDP.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bluebridge_proto::{HostId, NetPrefix};
use bluebridge_server::{Framing, Server, ServerConfig, ServerStats};
use clap::Parser;

/// Serve BlueBridge remote memory on a network interface.
///
/// Loads the steering XDP program on IFACE (frames for <prefix>:<host-id>::/48 go to AF_XDP
/// sockets, everything else to the kernel), runs one pinned busy-polling worker per RX queue
/// over a hugepage-backed page arena, prints a stats line every interval, and detaches
/// everything on SIGINT/SIGTERM with a final summary. Needs root (or CAP_BPF, CAP_NET_ADMIN,
/// CAP_NET_RAW, CAP_IPC_LOCK).
#[derive(Parser, Debug)]
#[command(name = "bluebridge-server", version)]
struct Args {
    /// How to receive and send: `xdp` (XDP steering into AF_XDP sockets, the product) or
    /// `udp` (kernel UDP sockets, the baseline; needs the host's /48 routed locally:
    /// `ip -6 route add local <prefix>:<host-id>::/48 dev lo`).
    #[arg(long, value_enum, default_value_t = bluebridge_server::TransportKind::Xdp)]
    transport: bluebridge_server::TransportKind,
    /// Network interface to serve on.
    #[arg(short, long, value_name = "IFACE")]
    iface: String,
    /// This server's host id (decimal or 0x-hex, not 0xffff): it answers for
    /// <prefix>:<host-id>::/48.
    #[arg(long, value_parser = parse_host)]
    host_id: u16,
    /// The deployment's network prefix (a /32).
    #[arg(long, default_value = "fd00:bb::/32")]
    prefix: NetPrefix,
    /// RX queues to serve, one worker and one shard of the pages each (comma-separated, at
    /// most 255). A page's requests belong to the shard in its handle; install NIC rules that
    /// steer them to its queue (docs/running.md), frames on another queue are handed over.
    #[arg(long, value_delimiter = ',', default_value = "0", value_parser = clap::value_parser!(u32).range(0..=4095))]
    queues: Vec<u32>,
    /// CPU cores to pin the workers to, one per queue in the same order (comma-separated).
    /// Without it workers are not pinned (slower: waking an idle vCPU costs 15-60 µs). Each
    /// must be a CPU this process may run on.
    #[arg(long, value_delimiter = ',', value_parser = bluebridge_xsk::cli::cpu)]
    cores: Vec<usize>,
    /// Size of the page arena, e.g. 256MiB or 4GiB, split evenly between the workers (a
    /// multiple of 2 MiB per worker).
    #[arg(long, default_value = "256MiB")]
    arena: bytesize::ByteSize,
    /// How pages travel: one multi-buffer frame per page (MTU ≥ 4192) or MTU-sized segments.
    #[arg(long, value_enum, default_value_t = Framing::Auto)]
    framing: Framing,
    /// After a burst of empty polls, sleep in poll() until frames arrive (for machines that host
    /// many servers); default is pure busy-polling.
    #[arg(long)]
    idle: bool,
    /// Run workers at normal priority from the start. By default they run under SCHED_IDLE, so
    /// the kernel's softirq work on their core preempts them at once (a better tail on veth and
    /// in copy mode), and a worker that a CPU-bound neighbour starves for 20 ms moves itself to
    /// normal priority (logged, counted as `priority fallbacks`).
    #[arg(long)]
    normal_priority: bool,
    /// UMEM frames per socket (4 KiB each, a power of two from 128 to 262144; half RX, half
    /// TX).
    #[arg(long, default_value_t = 2048, value_parser = parse_frames)]
    frames: u32,
    /// Attach XDP in generic (SKB) mode instead of trying driver mode first.
    #[arg(long)]
    generic: bool,
    /// Bind the AF_XDP sockets in copy mode without asking for zero-copy first (by default
    /// zero-copy is tried and copy mode taken, with a log line, where the driver has none).
    #[arg(long)]
    copy: bool,
    /// Preferred busy polling: each worker's ring polls drive its queue's NAPI for up to this
    /// many microseconds (SO_PREFER_BUSY_POLL + SO_BUSY_POLL; 0: off). For NICs with
    /// napi_defer_hard_irqs and gro_flush_timeout set (docs/running.md).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    busy_poll_us: u32,
    /// Packets one busy poll may process (SO_BUSY_POLL_BUDGET), with --busy-poll-us.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    busy_poll_budget: u16,
    /// Do not install NIC flow rules (ethtool ntuple) steering each worker's pages to its
    /// queue; with more than one queue the server tries by default and falls back to handing
    /// requests between workers when the NIC refuses.
    #[arg(long)]
    no_flow_rules: bool,
    /// Do not try 2 MiB hugepages for the arena and UMEM.
    #[arg(long)]
    no_hugepages: bool,
    /// Leases (UPDATE) that may be held at once (1-65535), split evenly between the workers;
    /// more acquires get BUSY. Leases nobody commits free their slot when they run out.
    #[arg(long, default_value_t = u16::MAX, value_parser = clap::value_parser!(u16).range(1..))]
    max_leases: u16,
    /// Lease time in ms when a client asks for none (1 to 86400000, at most --lease-max-ms).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    lease_default_ms: u64,
    /// Longest lease granted, in ms (1 to 86400000, one day; longer requests are cut to this).
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    lease_max_ms: u64,
    /// Client sessions per worker for at-most-once execution of ALLOC, FREE, atomics and
    /// UPDATE (one per client address and port, each remembering its 128 latest such
    /// requests, 6 KiB each). A new client finding none free or idle gets BUSY.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    sessions: u32,
    /// Milliseconds a session must be unused before a new client may take it over (clients
    /// must retransmit sooner than this).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    session_idle_ms: u64,
    /// Sessions (client ports) one client address may hold per worker; more get BUSY, so no
    /// one host can take them all.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    sessions_per_address: u16,
    /// Only clients inside these prefixes may use the server (comma-separated ADDRESS/LENGTH,
    /// e.g. fd00:bb:1::/48); others get FORBIDDEN. Default: any client.
    #[arg(long, value_delimiter = ',')]
    allow_clients: Vec<bluebridge_server::access::ClientPrefix>,
    /// Distinct client addresses that may own pages at once, per worker (1 to 1048576; an
    /// allocation by one more gets BUSY; an address is forgotten when its last page is freed).
    #[arg(long, default_value_t = 1 << 16, value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    max_owners: u32,
    /// Milliseconds a page owner may stay silent before the server frees its pages (0: never;
    /// else 2000 to 86400000). Shared and detached pages stay. Any request from the owner's
    /// address counts; the reference client pings each host it holds pages on when it has sent
    /// it nothing for a second.
    #[arg(long, default_value_t = bluebridge_server::handler::DEFAULT_GRACE_MS, value_parser = parse_grace)]
    orphan_grace_ms: u64,
    /// Milliseconds a coherent copy (docs/protocol.md §5.18) lasts without renewal, 100 to
    /// 60000: the longest a dead or cut-off holder can hold up a writer. Clients renew at
    /// half of it.
    #[arg(long, default_value_t = bluebridge_server::coherence::DEFAULT_COPY_LEASE_MS, value_parser = clap::value_parser!(u64).range(bluebridge_server::coherence::MIN_COPY_LEASE_MS..=bluebridge_server::coherence::MAX_COPY_LEASE_MS))]
    copy_lease_ms: u64,
    /// Behind a BlueBridge switch: serve every BlueBridge frame the switch delivers here, so
    /// pages migrated to this host from others are answered (the switch decides what arrives).
    #[arg(long)]
    accept_routed: bool,
    /// Bare-echo baseline for benchmarks: bounce every steered frame back with its endpoints
    /// swapped, without parsing it or touching the store (AF_XDP only).
    #[arg(long, conflicts_with = "xdp_bounce")]
    echo: bool,
    /// XDP bounce baseline for benchmarks: the steering program sends every frame of ours
    /// straight back (XDP_TX, endpoints swapped) without userspace: the floor of the path
    /// (AF_XDP only).
    #[arg(long)]
    xdp_bounce: bool,
    /// Kernel memory for the XDP hot-page store, e.g. 64MiB (0: none): copies of pages read
    /// with the INLINE flag, answered by the XDP program itself without waking a worker
    /// (docs/running.md "Hot pages in XDP"). 4160 bytes per page; split between the workers.
    /// AF_XDP only; not with --allow-clients.
    #[arg(long, value_name = "SIZE", default_value = "0")]
    xdp_cache: bytesize::ByteSize,
    /// Seconds between stats lines (0: none; at most 86400).
    #[arg(long, default_value_t = 1.0, value_parser = bluebridge_xsk::cli::seconds)]
    stats_interval: f64,
    /// Serve Prometheus metrics over HTTP at ADDR:PORT, path /metrics (e.g. 127.0.0.1:9464 or
    /// [::]:9464): requests by opcode, replies by status, drops by reason, pages, leases,
    /// XDP steering and socket counters. Read on each scrape without stopping a worker.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
}

fn parse_frames(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !(128..=1 << 18).contains(&n) || !n.is_power_of_two() {
        return Err(format!("{n}: must be a power of two from 128 to 262144"));
    }
    Ok(n)
}

fn parse_grace(s: &str) -> Result<u64, String> {
    let n: u64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number of ms"))?;
    if n != 0 && !(2_000..=86_400_000).contains(&n) {
        return Err(format!("{n}: must be 0 (never) or 2000 to 86400000 ms"));
    }
    Ok(n)
}

fn parse_host(s: &str) -> Result<u16, String> {
    let h: HostId = s.parse().map_err(|e| format!("`{s}`: {e}"))?;
    if h.is_any() {
        return Err("0xffff is reserved for anycast ALLOC".into());
    }
    Ok(h.0)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    if a.lease_default_ms > a.lease_max_ms {
        bail!(
            "--lease-default-ms {} is longer than --lease-max-ms {}",
            a.lease_default_ms,
            a.lease_max_ms
        );
    }

    let cfg = ServerConfig {
        transport: a.transport,
        ifname: a.iface.clone(),
        prefix: a.prefix,
        host: HostId(a.host_id),
        queues: a.queues,
        cores: a.cores,
        arena_bytes: a.arena.as_u64(),
        framing: a.framing,
        idle: a.idle,
        sched_idle: !a.normal_priority,
        frames: a.frames,
        force_generic: a.generic,
        zero_copy: !a.copy,
        flow_rules: !a.no_flow_rules,
        busy_poll: (a.busy_poll_us > 0).then_some(bluebridge_xsk::BusyPoll {
            usecs: a.busy_poll_us,
            budget: a.busy_poll_budget,
        }),
        hugepages: !a.no_hugepages,
        max_leases: a.max_leases,
        lease_default_ms: a.lease_default_ms,
        lease_max_ms: a.lease_max_ms,
        sessions: a.sessions as usize,
        session_idle_ms: a.session_idle_ms,
        sessions_per_address: a.sessions_per_address,
        handoff_depth: 64,
        allowed_clients: a.allow_clients,
        echo: a.echo,
        xdp_bounce: a.xdp_bounce,
        xdp_cache_bytes: a.xdp_cache.as_u64(),
        max_owners: a.max_owners as usize,
        orphan_grace_ms: a.orphan_grace_ms,
        copy_lease_ms: a.copy_lease_ms,
        accept_routed: a.accept_routed,
        metrics: a.metrics,
    };
    let stop = Arc::new(AtomicBool::new(false));
    bluebridge_xsk::cli::stop_on_signals(&stop).context("installing signal handlers")?;
    let server = Server::start(&cfg).with_context(|| format!("starting on {}", a.iface))?;
    let i = server.info();
    println!(
        "bluebridge-server: {} host {:#06x} prefix {} | {} | {} pages ({:?}) | {} | MTU {} | \
         {} worker(s), one shard each, {} NIC flow rule(s) | AF_XDP {} | memory besides arena: {:.1} MiB tables + \
         {:.1} MiB UMEM",
        a.iface,
        a.host_id,
        a.prefix,
        i.attach
            .map_or("kernel UDP sockets".to_owned(), |m| format!("XDP {m:?}")),
        i.pages,
        i.backing,
        if i.multi_buffer {
            "one frame per page".to_owned()
        } else {
            format!("segments of {} B", i.frame_data)
        },
        i.mtu,
        i.shards,
        i.flow_rules,
        socket_modes(&i.sockets),
        i.overhead_bytes as f64 / 1048576.0,
        i.umem_bytes as f64 / 1048576.0,
    );
    if let Some(m) = server.metrics_addr() {
        println!("bluebridge-server: Prometheus metrics at http://{m}/metrics");
    }
    if i.hot_slots > 0 {
        println!(
            "bluebridge-server: XDP hot-page store of {} pages ({:.1} MiB of kernel memory): \
             INLINE READs of hot pages are answered in XDP",
            i.hot_slots,
            f64::from(i.hot_slots) * bluebridge_ebpf::HOT_SLOT_SIZE as f64 / 1048576.0
        );
    }
    let interval = Duration::from_secs_f64(a.stats_interval);
    let started = Instant::now();
    let mut last = server.stats();
    let mut last_t = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        if !server.healthy() {
            bail!("a worker stopped unexpectedly");
        }
        if interval > Duration::ZERO && last_t.elapsed() >= interval {
            let now = server.stats();
            println!("{}", line(&last, &now, last_t.elapsed()));
            last = now;
            last_t = Instant::now();
        }
    }
    let elapsed = started.elapsed();
    let xdp = server.info().attach.is_some();
    let s = server.stop();
    println!(
        "bluebridge-server: stopped after {:.1} s{}",
        elapsed.as_secs_f64(),
        if xdp { "; XDP detached" } else { "" }
    );
    println!("{}", summary(&s));
    Ok(())
}

/// "zero-copy" / "copy" (per socket if they differ), need-wakeup and busy polling.
fn socket_modes(m: &[bluebridge_xsk::XskMode]) -> String {
    if m.is_empty() {
        return "none (kernel UDP)".into();
    }
    let zc = m.iter().filter(|m| m.zero_copy).count();
    let mut s = match zc {
        0 => "copy mode".to_owned(),
        z if z == m.len() => "zero-copy".to_owned(),
        z => format!("zero-copy on {z} of {} sockets, copy on the rest", m.len()),
    };
    if m.iter().all(|m| m.need_wakeup) {
        s += ", need-wakeup";
    }
    if m.iter().any(|m| m.busy_poll) {
        s += ", preferred busy polling";
    }
    s
}

fn line(a: &ServerStats, b: &ServerStats, dt: Duration) -> String {
    let rate = |x: u64, y: u64| (y - x) as f64 / dt.as_secs_f64();
    let mut ops: Vec<String> = b
        .handler
        .ops_by_name()
        .filter_map(|(op, n)| {
            let d = n - a.handler.ops[usize::from(op.0)];
            (d > 0).then(|| format!("{op:?}={:.0}", d as f64 / dt.as_secs_f64()))
        })
        .collect();
    if ops.is_empty() {
        ops.push("idle".into());
    }
    format!(
        "ops/s {} | total {:.0}/s | per shard {} | errors {} | dup {} | stale {} | handoffs {} \
         (dropped {}) | malformed {} | bad source {} | tx drops {} | kernel drops {} | \
         longest stall {} µs ({} over 1 ms, priority fallbacks {}) | pages {} (reclaimed {})",
        ops.join(" "),
        rate(a.handler.requests, b.handler.requests),
        a.shards
            .iter()
            .zip(&b.shards)
            .map(|(x, y)| format!("{:.0}", rate(x.requests, y.requests)))
            .collect::<Vec<_>>()
            .join("/"),
        b.handler.errors() - a.handler.errors(),
        b.handler.duplicates - a.handler.duplicates,
        b.handler.stale - a.handler.stale,
        b.handler.handoffs - a.handler.handoffs,
        b.handler.handoff_dropped - a.handler.handoff_dropped,
        b.handler.malformed_total() - a.handler.malformed_total(),
        b.handler.bad_source + b.steer.dropped_source + b.steer.dropped_mac
            - a.handler.bad_source
            - a.steer.dropped_source
            - a.steer.dropped_mac,
        b.xsk.tx_dropped + b.handler.tx_dropped - a.xsk.tx_dropped - a.handler.tx_dropped,
        b.xsk.kernel_drops() - a.xsk.kernel_drops(),
        b.handler.loop_gap_max_ns / 1000,
        b.handler.stalls - a.handler.stalls,
        b.handler.priority_fallbacks,
        b.pages_used,
        b.handler.reclaimed - a.handler.reclaimed,
    ) + &replication_text(&a.handler, &b.handler)
}

/// The replication counters (docs/protocol.md §5.19) moved between `a` and `b` (gauges as in
/// `b`), or nothing when this server takes no part in replication.
fn replication_text(a: &bluebridge_server::Stats, b: &bluebridge_server::Stats) -> String {
    use bluebridge_server::stats::{REPL_COUNTERS, ReplCounter};
    if b.repl.iter().all(|&n| n == 0) {
        return String::new();
    }
    let gauges = [
        ReplCounter::Held,
        ReplCounter::LagBytes,
        ReplCounter::CopyLeft,
        ReplCounter::CopyTotal,
    ];
    let parts: Vec<String> = REPL_COUNTERS
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let gauge = gauges.iter().any(|g| *g as usize == i);
            let v = if gauge {
                b.repl[i]
            } else {
                b.repl[i] - a.repl[i]
            };
            format!("{name} {v}")
        })
        .collect();
    format!(" | {}", parts.join(", "))
}

fn summary(s: &ServerStats) -> String {
    let mut out = format!(
        "requests {} | frames rx {} tx {} | system calls: tx kicks {} rx kicks {} | pages in use {} (reclaimed {}) | duplicates answered {} | stale \
         dropped {} | handed off {} (dropped {}) | tx drops {} | bad sources {} | loop stalls over 1 ms {} (longest {:.1} ms) | priority fallbacks {}\n",
        s.handler.requests,
        s.xsk.rx_frames,
        s.xsk.tx_frames,
        s.xsk.tx_kicks,
        s.xsk.rx_kicks,
        s.pages_used,
        s.handler.reclaimed,
        s.handler.duplicates,
        s.handler.stale,
        s.handler.handoffs,
        s.handler.handoff_dropped,
        s.xsk.tx_dropped + s.handler.tx_dropped,
        s.handler.bad_source + s.steer.dropped_source + s.steer.dropped_mac,
        s.handler.stalls,
        s.handler.stall_longest_ns as f64 / 1e6,
        s.handler.priority_fallbacks
    );
    out += &format!(
        "AF_XDP: kernel drops {} (RX ring full {}, fill ring empty {} times); TX backlog bound \
         reached {} times; chains {} ({} served where they arrived)\n",
        s.xsk.kernel_rx_dropped,
        s.xsk.kernel_rx_ring_full,
        s.xsk.kernel_fill_ring_empty,
        s.xsk.tx_backpressure,
        s.xsk.rx_chains,
        s.xsk.rx_in_place
    );
    let repl = replication_text(&bluebridge_server::Stats::default(), &s.handler);
    if !repl.is_empty() {
        out += &format!("replication:{}\n", repl.trim_start_matches(" |"));
    }
    out += &format!(
        "requests by shard: {}\n",
        s.shards
            .iter()
            .map(|x| x.requests.to_string())
            .collect::<Vec<_>>()
            .join(" / ")
    );
    let ops: Vec<String> = s
        .handler
        .ops_by_name()
        .map(|(op, n)| format!("{op:?} {n}"))
        .collect();
    out += &format!(
        "by operation: {}\n",
        if ops.is_empty() {
            "none".into()
        } else {
            ops.join(", ")
        }
    );
    let errs: Vec<String> = s
        .handler
        .errors_by_status()
        .map(|(st, n)| format!("{st:?} {n}"))
        .collect();
    out += &format!(
        "errors: {}\n",
        if errs.is_empty() {
            "none".into()
        } else {
            errs.join(", ")
        }
    );
    let mal: Vec<String> = bluebridge_server::stats::MALFORMED_REASONS
        .iter()
        .zip(s.handler.malformed)
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    out += &format!(
        "malformed frames dropped: {}\n",
        if mal.is_empty() {
            "none".into()
        } else {
            mal.join(", ")
        }
    );
    use bluebridge_server::hot::HotCounter as H;
    let hot = |c| s.handler.hot(c);
    if s.handler.hot.iter().any(|&n| n > 0) || s.steer.fast_served + s.steer.fast_missed > 0 {
        out += &format!(
            "XDP fast READ: served {}, missed {}, torn {}, passed {} | hot pages {} (promoted {}, \
             demoted {}, updated {}, refused {}, index errors {})\n",
            s.steer.fast_served,
            s.steer.fast_missed,
            s.steer.fast_torn,
            s.steer.fast_passed,
            hot(H::Pages),
            hot(H::Promoted),
            hot(H::Demoted),
            hot(H::Updated),
            hot(H::Refused),
            hot(H::IndexErrors)
        );
    }
    out += &format!(
        "XDP steering: redirected {}, passed {} (not IPv6 {}, not UDP {}, other port {}, other prefix {}), \
         malformed {}, no socket {}, bounced {}",
        s.steer.redirected,
        s.steer.pass_not_ipv6 + s.steer.pass_not_udp + s.steer.pass_port + s.steer.pass_prefix,
        s.steer.pass_not_ipv6,
        s.steer.pass_not_udp,
        s.steer.pass_port,
        s.steer.pass_prefix,
        s.steer.malformed,
        s.steer.no_socket,
        s.steer.bounced
    );
    out
}
