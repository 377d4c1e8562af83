//! The running server: the steering program on the interface, one AF_XDP socket, one pinned
//! worker and one shard per RX queue.
//!
//! Shards share nothing on the hot path: each worker owns its shard's handler (store, leases,
//! sessions, owners), writes only its own counters, and answers through its own socket. A frame
//! for a page of another shard (read from the handle's clear shard field) is handed to that
//! shard's worker over a lock-free channel ([`crate::handoff`]), which answers it. With `idle`,
//! a worker that found nothing for a while sleeps in `poll()` until a frame (or a hand-off)
//! arrives, so many servers can share a machine.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use bluebridge_ebpf::{AttachMode, Steer, SteerCounters};
use bluebridge_proto::addr::HOST_PREFIX_LEN;
use bluebridge_proto::segment::{max_data_per_frame, max_frame_for_mtu};
use bluebridge_proto::{HostId, NetPrefix};
use bluebridge_xsk::{Rx, Xsk, XskConfig, XskStats};

use crate::handler::{Handler, HandlerConfig};
use crate::handoff::Handoff;
use crate::hot::{HotShard, HotStore};
use crate::session::SessionConfig;
use crate::stats::{HostCounters, ShardCounters, Stats};
use crate::store::{Backing, Store};

/// How the server receives and sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportKind {
    /// XDP steering into AF_XDP sockets, busy-polled: the product.
    Xdp,
    /// Kernel UDP sockets (recvmmsg/sendmmsg): the baseline, no XDP. The host's /48 must be
    /// local (`ip -6 route add local <prefix>:<host>::/48 dev lo`).
    Udp,
}

/// How frames carry pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Framing {
    /// One multi-buffer frame per page where the MTU allows (≥ 4192), else segments.
    Auto,
    /// One multi-buffer frame per page; fails if the MTU is too small.
    MultiBuffer,
    /// Segments sized from the MTU and one UMEM chunk.
    Segments,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How frames are received and sent.
    pub transport: TransportKind,
    /// Interface.
    pub ifname: String,
    /// The deployment's prefix.
    pub prefix: NetPrefix,
    /// This host's id: the server answers for `<prefix>:<host>::/48`.
    pub host: HostId,
    /// RX queues to serve, one worker and one shard each (the UDP transport runs one).
    pub queues: Vec<u32>,
    /// CPU per worker (same order as `queues`); empty: unpinned.
    pub cores: Vec<usize>,
    /// Arena size in bytes, split evenly between the shards (a multiple of 2 MiB per shard).
    pub arena_bytes: u64,
    /// Framing of pages.
    pub framing: Framing,
    /// Sleep in poll() after a run of empty polls.
    pub idle: bool,
    /// Run workers under SCHED_IDLE (see [`bluebridge_xsk::busy_poll_thread`]), falling back to
    /// normal priority when a CPU-bound neighbour starves one; false: normal priority.
    pub sched_idle: bool,
    /// UMEM frames per socket.
    pub frames: u32,
    /// Attach XDP in generic mode.
    pub force_generic: bool,
    /// Ask for zero-copy AF_XDP sockets first (falling back to copy mode with a log line);
    /// `false`: copy mode.
    pub zero_copy: bool,
    /// Preferred busy polling on every socket (for NICs; docs/running.md).
    pub busy_poll: Option<bluebridge_xsk::BusyPoll>,
    /// With more than one queue: install NIC flow rules steering each shard's pages to its
    /// queue (removed on exit); a NIC that refuses is logged and the hand-off steers.
    pub flow_rules: bool,
    /// Put the arena and UMEM on hugepages when available.
    pub hugepages: bool,
    /// Bare-echo baseline: bounce every steered frame back (endpoints swapped) without
    /// parsing it or touching the store (AF_XDP only; for benchmarks).
    pub echo: bool,
    /// XDP bounce baseline: the steering program itself sends every frame of ours back with
    /// XDP_TX (endpoints swapped), no userspace involved: the floor of the path (AF_XDP
    /// transport only; for benchmarks).
    pub xdp_bounce: bool,
    /// Bytes of kernel memory for the XDP hot-page store (docs/running.md "Hot pages in
    /// XDP"), split evenly between the shards; 0: none (INLINE READs go to the workers).
    pub xdp_cache_bytes: u64,
    /// Leases that may be held at once (split evenly between the shards).
    pub max_leases: u16,
    /// Lease time when a client asks for none, ms.
    pub lease_default_ms: u64,
    /// Longest lease granted, ms.
    pub lease_max_ms: u64,
    /// Client sessions per shard for at-most-once execution (each remembers the replies of
    /// up to 128 outstanding requests of one client address and port).
    pub sessions: usize,
    /// A session unused this long may be given to a new client, ms.
    pub session_idle_ms: u64,
    /// Sessions one client address may hold per shard.
    pub sessions_per_address: u16,
    /// Frames each pair of shards can have in hand-off at once.
    pub handoff_depth: usize,
    /// Client prefixes allowed to use the server (empty: anyone).
    pub allowed_clients: Vec<crate::access::ClientPrefix>,
    /// Distinct client addresses that may own pages.
    pub max_owners: usize,
    /// How long a page owner may stay silent before its pages (except shared and detached
    /// ones) are freed, ms; 0: never (§5.17).
    pub orphan_grace_ms: u64,
    /// How long a coherent copy lasts without renewal, ms (§5.18).
    pub copy_lease_ms: u64,
    /// Behind a BlueBridge switch: take every BlueBridge frame the switch delivers (the
    /// whole deployment prefix), so pages migrated here from other hosts are served. Without
    /// it only this host's /48 (and the any-server /48) is steered.
    pub accept_routed: bool,
    /// Serve Prometheus metrics over HTTP at this address (`/metrics`; port 0: any free
    /// port, see [`Server::metrics_addr`]), bound before anything is attached.
    pub metrics: Option<std::net::SocketAddr>,
}

impl ServerConfig {
    /// Defaults for serving `host` on `ifname` queue 0.
    pub fn new(ifname: &str, host: HostId) -> Self {
        ServerConfig {
            transport: TransportKind::Xdp,
            ifname: ifname.into(),
            prefix: NetPrefix::DEFAULT,
            host,
            queues: vec![0],
            cores: vec![],
            arena_bytes: 256 << 20,
            framing: Framing::Auto,
            idle: false,
            sched_idle: true,
            frames: 2048,
            force_generic: false,
            zero_copy: true,
            busy_poll: None,
            flow_rules: true,
            hugepages: true,
            echo: false,
            xdp_bounce: false,
            xdp_cache_bytes: 0,
            max_leases: u16::MAX,
            lease_default_ms: 1_000,
            lease_max_ms: 60_000,
            sessions: SessionConfig::DEFAULT.sessions,
            session_idle_ms: SessionConfig::DEFAULT.idle_ms,
            sessions_per_address: SessionConfig::DEFAULT.per_address,
            handoff_depth: 64,
            allowed_clients: Vec::new(),
            max_owners: 1 << 16,
            orphan_grace_ms: crate::handler::DEFAULT_GRACE_MS,
            copy_lease_ms: crate::coherence::DEFAULT_COPY_LEASE_MS,
            accept_routed: false,
            metrics: None,
        }
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// The store could not be made.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The XDP program failed.
    #[error(transparent)]
    Steer(#[from] bluebridge_ebpf::SteerError),
    /// A socket failed.
    #[error(transparent)]
    Xsk(#[from] bluebridge_xsk::XskError),
    /// The interface could not be read.
    #[error(transparent)]
    Link(#[from] bluebridge_xsk::LinkError),
    /// The metrics address could not be bound.
    #[error(transparent)]
    Metrics(#[from] bluebridge_metrics::MetricsError),
}

/// The sockets workers serve.
enum Sockets {
    Xdp(Vec<Xsk>),
    Udp(std::net::UdpSocket),
}

/// Counters of the whole server, for the periodic line and the summary.
#[derive(Debug, Clone)]
pub struct ServerStats {
    /// Request handling, summed over shards.
    pub handler: Stats,
    /// Each shard's own (same order as the queues).
    pub shards: Vec<Stats>,
    /// Pages allocated now.
    pub pages_used: u32,
    /// Sockets, summed over workers.
    pub xsk: XskStats,
    /// The steering program.
    pub steer: SteerCounters,
}

/// A running server. Dropping it (or [`Server::stop`]) stops the workers and detaches XDP.
#[derive(Debug)]
pub struct Server {
    /// `--metrics`: stopped before anything else goes.
    metrics: Option<bluebridge_metrics::Exporter>,
    steer: Option<Arc<Steer>>,
    /// Removed when the server goes (after the workers stop).
    flow_rules: Option<bluebridge_xsk::FlowRules>,
    counters: Arc<HostCounters>,
    workers: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    info: ServerInfo,
}

/// What the server started with.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// How XDP got attached (`None`: kernel UDP transport).
    pub attach: Option<AttachMode>,
    /// The arena's backing.
    pub backing: Backing,
    /// Pages in the arena (all shards).
    pub pages: u32,
    /// Shards (workers), each owning `pages / shards` pages.
    pub shards: usize,
    /// Whether pages travel as one multi-buffer frame.
    pub multi_buffer: bool,
    /// Page bytes per reply frame.
    pub frame_data: u16,
    /// MTU.
    pub mtu: u16,
    /// Memory besides the arena and the UMEMs: metadata, tables and hand-off buffers.
    pub overhead_bytes: usize,
    /// UMEM bytes over all sockets.
    pub umem_bytes: usize,
    /// How each AF_XDP socket got bound (same order as the queues; empty for kernel UDP).
    pub sockets: Vec<bluebridge_xsk::XskMode>,
    /// NIC flow rules installed (one per shard), 0 if none (one queue, or the NIC refused).
    pub flow_rules: usize,
    /// Slots of the XDP hot-page store (0: none).
    pub hot_slots: u32,
}

/// The most pages the XDP hot-page store holds (16 Mi: 65 GiB of kernel memory).
const MAX_HOT_SLOTS: u32 = 1 << 24;

impl Server {
    /// Starts everything: store, steering program, sockets, workers.
    pub fn start(cfg: &ServerConfig) -> Result<Server, StartError> {
        if cfg.queues.is_empty() {
            return Err(StartError::Config("no queues to serve".into()));
        }
        if !cfg.cores.is_empty() && cfg.cores.len() != cfg.queues.len() {
            return Err(StartError::Config(format!(
                "{} cores for {} queues: give one core per queue (or none)",
                cfg.cores.len(),
                cfg.queues.len()
            )));
        }
        let allowed = bluebridge_xsk::cli::allowed_cpus();
        if let Some(c) = cfg.cores.iter().find(|c| !allowed.contains(c)) {
            return Err(StartError::Config(format!(
                "CPU {c} does not exist or is not allowed here (allowed: {allowed:?})"
            )));
        }
        let shards = match cfg.transport {
            TransportKind::Xdp => cfg.queues.len(),
            TransportKind::Udp => 1,
        };
        if shards > bluebridge_proto::addr::MAX_SHARDS {
            return Err(StartError::Config(format!(
                "{shards} queues: a server runs at most {} workers",
                bluebridge_proto::addr::MAX_SHARDS
            )));
        }
        if cfg.max_leases == 0
            || cfg.sessions == 0
            || cfg.session_idle_ms == 0
            || cfg.sessions_per_address == 0
            || cfg.lease_default_ms == 0
            || cfg.max_owners == 0
            || cfg.handoff_depth == 0
        {
            return Err(StartError::Config(
                "lease, session, owner and hand-off sizes and times must be positive".into(),
            ));
        }
        if usize::from(cfg.max_leases) < shards {
            return Err(StartError::Config(format!(
                "{} leases cannot be split between {shards} shards",
                cfg.max_leases
            )));
        }
        let shard_bytes = cfg.arena_bytes / shards as u64;
        if shard_bytes * shards as u64 != cfg.arena_bytes || !shard_bytes.is_multiple_of(2 << 20) {
            return Err(StartError::Config(format!(
                "an arena of {} bytes does not split into {shards} shards of a multiple of \
                 2 MiB each",
                cfg.arena_bytes
            )));
        }
        if cfg.lease_default_ms > cfg.lease_max_ms {
            return Err(StartError::Config(
                "the default lease time exceeds the longest lease".into(),
            ));
        }
        if cfg.xdp_bounce && (cfg.echo || cfg.transport != TransportKind::Xdp) {
            return Err(StartError::Config(
                "--xdp-bounce is a baseline of the AF_XDP transport, without --echo".into(),
            ));
        }
        let hot_slots = u32::try_from(cfg.xdp_cache_bytes / bluebridge_ebpf::HOT_SLOT_SIZE as u64)
            .unwrap_or(u32::MAX);
        if cfg.xdp_cache_bytes > 0 {
            if cfg.transport != TransportKind::Xdp || cfg.echo || cfg.xdp_bounce {
                return Err(StartError::Config(
                    "--xdp-cache serves pages from the XDP program: AF_XDP transport only, \
                     without --echo or --xdp-bounce"
                        .into(),
                ));
            }
            if !cfg.allowed_clients.is_empty() {
                return Err(StartError::Config(
                    "--xdp-cache cannot be combined with --allow-clients (the XDP program \
                     checks page owners, not client prefixes)"
                        .into(),
                ));
            }
            if hot_slots > MAX_HOT_SLOTS {
                return Err(StartError::Config(format!(
                    "--xdp-cache {} bytes: at most {} pages ({} GiB) of kernel memory",
                    cfg.xdp_cache_bytes,
                    MAX_HOT_SLOTS,
                    (u64::from(MAX_HOT_SLOTS) * bluebridge_ebpf::HOT_SLOT_SIZE as u64) >> 30
                )));
            }
            if (hot_slots as usize) < shards {
                return Err(StartError::Config(format!(
                    "--xdp-cache {} bytes holds {hot_slots} page slot(s) of {} bytes; each of \
                     the {shards} worker(s) needs at least one",
                    cfg.xdp_cache_bytes,
                    bluebridge_ebpf::HOT_SLOT_SIZE
                )));
            }
        }
        if cfg.echo && cfg.transport != TransportKind::Xdp {
            return Err(StartError::Config(
                "--echo is a baseline of the AF_XDP transport".into(),
            ));
        }
        if cfg.host.is_any() {
            return Err(StartError::Config(
                "host id 0xffff is reserved for anycast".into(),
            ));
        }
        let listener = cfg
            .metrics
            .map(bluebridge_metrics::Listener::bind)
            .transpose()?;
        let mtu = bluebridge_xsk::link_mtu(&cfg.ifname)?;
        if mtu < bluebridge_proto::MIN_MTU {
            return Err(StartError::Config(format!(
                "{} has MTU {mtu}; BlueBridge needs ≥ 1280",
                cfg.ifname
            )));
        }
        let queues = bluebridge_xsk::rx_queue_count(&cfg.ifname)?;
        if let Some(q) = cfg.queues.iter().find(|&&q| q >= queues) {
            return Err(StartError::Config(format!(
                "{} has {queues} RX queues; there is no queue {q}",
                cfg.ifname
            )));
        }
        let multi_buffer = match cfg.framing {
            Framing::Auto => mtu >= bluebridge_proto::PAGE_MTU,
            Framing::MultiBuffer if mtu < bluebridge_proto::PAGE_MTU => {
                return Err(StartError::Config(format!(
                    "multi-buffer framing needs MTU ≥ {}; {} has {mtu}",
                    bluebridge_proto::PAGE_MTU,
                    cfg.ifname
                )));
            }
            Framing::MultiBuffer => true,
            Framing::Segments => false,
        };

        let mut stores = (0..shards)
            .map(|i| Store::for_shard(i, shard_bytes, cfg.hugepages))
            .collect::<Result<Vec<_>, _>>()?;
        let backing = if stores.iter().all(|s| s.backing() == Backing::Huge2M) {
            Backing::Huge2M
        } else {
            Backing::Normal
        };
        let pages = stores.iter().map(Store::pages_total).sum();

        let (steer, attach, sockets, frame_data, repl_frame) = match cfg.transport {
            TransportKind::Xdp => {
                let mut steer = Steer::load_with_hot_slots(hot_slots)?;
                if cfg.xdp_cache_bytes > 0 {
                    let fd = steer.hot_slots_fd()?;
                    let hot = Arc::new(HotStore::map(fd, hot_slots).map_err(|e| {
                        StartError::Config(format!("mapping the XDP hot-page store: {e}"))
                    })?);
                    for (i, st) in stores.iter_mut().enumerate() {
                        st.set_hot(HotShard::new(
                            hot.clone(),
                            hot.range(i, shards),
                            steer.hot_index()?,
                        ));
                    }
                    tracing::info!(
                        slots = hot_slots,
                        mib = hot_slots as f64 * bluebridge_ebpf::HOT_SLOT_SIZE as f64 / 1048576.0,
                        "XDP hot-page store"
                    );
                }
                steer.add_prefix(cfg.prefix.host_network(cfg.host), HOST_PREFIX_LEN)?;
                // Anycast ALLOCs (host 0xffff) routed here by a switch.
                steer.add_prefix(cfg.prefix.host_network(HostId::ANY), HOST_PREFIX_LEN)?;
                if cfg.accept_routed {
                    steer.add_prefix(cfg.prefix.network(), 32)?;
                }
                steer.set_bounce(cfg.xdp_bounce)?;
                let attach = steer.attach(&cfg.ifname, cfg.force_generic)?;
                let mac = bluebridge_xsk::link_mac(&cfg.ifname)
                    .map_err(|e| StartError::Config(format!("reading {}: {e}", cfg.ifname)))?;
                steer.set_own_mac(mac)?;

                // Request frames up to the MTU are accepted in every framing (§6): where one
                // may not fit a UMEM chunk, the sockets take multi-buffer frames even when the
                // replies are segments of one chunk.
                let receive_sg =
                    multi_buffer || max_frame_for_mtu(mtu) > bluebridge_xsk::CHUNK_DATA_MIN;
                let mut sockets = Vec::new();
                for &q in &cfg.queues {
                    let xsk = Xsk::new(&XskConfig {
                        ifname: cfg.ifname.clone(),
                        queue: q,
                        frames: cfg.frames,
                        multi_buffer: receive_sg,
                        hugepages: cfg.hugepages,
                        zero_copy: cfg.zero_copy,
                        busy_poll: cfg.busy_poll,
                    })?;
                    steer.set_socket(q, xsk.fd())?;
                    sockets.push(xsk);
                }
                let chunk = sockets[0].chunk_len();
                let max_frame = if multi_buffer {
                    max_frame_for_mtu(mtu)
                } else {
                    max_frame_for_mtu(mtu).min(chunk)
                };
                let frame_data = max_data_per_frame(max_frame).expect("MTU checked");
                // Replication frames (§5.19) are as long as the link and the socket take.
                let repl_frame = if sockets[0].multi_buffer() {
                    max_frame_for_mtu(mtu).min(bluebridge_xsk::MAX_FRAME)
                } else {
                    max_frame_for_mtu(mtu).min(chunk)
                };
                (
                    Some(steer),
                    Some(attach),
                    Sockets::Xdp(sockets),
                    frame_data,
                    repl_frame,
                )
            }
            TransportKind::Udp => {
                let sock = crate::udp::bind(cfg)?;
                let frame_data = max_data_per_frame(max_frame_for_mtu(mtu)).expect("MTU checked");
                let repl_frame = max_frame_for_mtu(mtu);
                (None, None, Sockets::Udp(sock), frame_data, repl_frame)
            }
        };
        let mut hc = HandlerConfig::new(cfg.prefix, cfg.host, frame_data);
        hc.max_frame_data = (repl_frame - bluebridge_proto::FRAME_OVERHEAD) as u16;
        hc.shards = shards;
        hc.lease_capacity = cfg.max_leases / shards as u16;
        hc.lease_default_ms = cfg.lease_default_ms;
        hc.lease_max_ms = cfg.lease_max_ms;
        hc.sessions = SessionConfig {
            sessions: cfg.sessions,
            idle_ms: cfg.session_idle_ms,
            per_address: cfg.sessions_per_address,
            ..SessionConfig::DEFAULT
        };
        hc.allowed_clients = cfg.allowed_clients.clone();
        hc.max_owners = cfg.max_owners;
        hc.orphan_grace_ms = cfg.orphan_grace_ms;
        hc.copy_lease_ms = cfg.copy_lease_ms;
        let counters = Arc::new(HostCounters::new(shards));
        let mut handlers: Vec<Handler> = stores
            .into_iter()
            .map(|st| Handler::with_counters(hc.clone(), st, counters.clone()))
            .collect();
        let handoff = Arc::new(
            Handoff::new(
                shards,
                cfg.handoff_depth,
                usize::from(mtu) + bluebridge_proto::wire::ethernet::HEADER_LEN,
            )
            .map_err(|e| StartError::Config(format!("hand-off eventfd: {e}")))?,
        );
        let overhead_bytes =
            handlers.iter().map(Handler::overhead_bytes).sum::<usize>() + handoff.bytes();
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let mut workers = Vec::new();
        let mut spawn = |name: String, f: Box<dyn FnOnce() + Send>| -> Result<(), StartError> {
            let t = std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(|e| StartError::Config(format!("spawning a worker: {e}")))?;
            workers.push(t);
            Ok(())
        };
        let common = |handler: Handler, core| WorkerCommon {
            counters: counters.clone(),
            shard: handler.shard(),
            handler,
            stop: stop.clone(),
            started,
            idle: cfg.idle,
            sched_idle: cfg.sched_idle,
            core,
        };
        let flow_rules = match &sockets {
            Sockets::Xdp(_) if shards > 1 && cfg.flow_rules => {
                match bluebridge_xsk::FlowRules::install(
                    &cfg.ifname,
                    bluebridge_proto::UDP_PORT,
                    &cfg.queues,
                ) {
                    Ok(r) => {
                        tracing::info!(
                            rules = r.len(),
                            "NIC flow rules steer each shard's pages to its queue"
                        );
                        Some(r)
                    }
                    Err(e) => {
                        tracing::warn!(
                            error = %e,
                            "no NIC flow rules; requests that land on another shard's queue are \
                             handed between workers"
                        );
                        None
                    }
                }
            }
            _ => None,
        };
        let modes: Vec<_> = match &sockets {
            Sockets::Xdp(s) => s.iter().map(Xsk::mode).collect(),
            Sockets::Udp(_) => Vec::new(),
        };
        for (i, m) in modes.iter().enumerate() {
            counters.shard(i).zero_copy.set(u64::from(m.zero_copy));
        }
        let umem_bytes = match sockets {
            Sockets::Xdp(sockets) => {
                let n = sockets.len();
                for (i, (xsk, handler)) in sockets.into_iter().zip(handlers).enumerate() {
                    let w = Worker {
                        xsk,
                        common: common(handler, cfg.cores.get(i).copied()),
                        handoff: handoff.clone(),
                        echo: cfg.echo,
                    };
                    spawn(
                        format!("bb-worker-q{}", cfg.queues[i]),
                        Box::new(move || w.run()),
                    )?;
                }
                n * cfg.frames as usize * bluebridge_xsk::CHUNK as usize
            }
            Sockets::Udp(sock) => {
                let handler = handlers.pop().expect("one shard");
                let w =
                    crate::udp::UdpWorker::new(sock, common(handler, cfg.cores.first().copied()))
                        .map_err(|e| StartError::Config(format!("UDP socket: {e}")))?;
                spawn("bb-worker-udp".into(), Box::new(move || w.run()))?;
                0
            }
        };
        if cfg.sched_idle {
            let (counters, stop) = (counters.clone(), stop.clone());
            spawn(
                "bb-priority".into(),
                Box::new(move || priority_watchdog(&counters, started, &stop)),
            )?;
        }
        let info = ServerInfo {
            attach,
            backing,
            pages,
            shards,
            multi_buffer,
            frame_data,
            mtu,
            overhead_bytes,
            umem_bytes,
            sockets: modes,
            flow_rules: flow_rules
                .as_ref()
                .map_or(0, bluebridge_xsk::FlowRules::len),
            hot_slots,
        };
        tracing::info!(
            ifname = %cfg.ifname, host = %cfg.host, prefix = %cfg.prefix, ?attach, ?backing, pages,
            multi_buffer, frame_data, mtu, shards, "serving"
        );
        let steer = steer.map(Arc::new);
        let metrics = listener.map(|l| {
            l.serve(bluebridge_metrics::registry_of(
                crate::metrics::ServerCollector {
                    counters: counters.clone(),
                    steer: steer.clone(),
                },
            ))
        });
        Ok(Server {
            metrics,
            steer,
            flow_rules,
            counters,
            workers,
            stop,
            info,
        })
    }

    /// What it started with.
    pub fn info(&self) -> &ServerInfo {
        &self.info
    }

    /// A snapshot of every counter, read without stopping any worker (each counter is
    /// current; they are not one atomic picture).
    pub fn stats(&self) -> ServerStats {
        snapshot(&self.counters, self.steer.as_deref())
    }

    /// Where `--metrics` serves, if it does.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics
            .as_ref()
            .map(bluebridge_metrics::Exporter::local_addr)
    }

    /// Whether every worker is still running.
    pub fn healthy(&self) -> bool {
        self.workers.iter().all(|w| !w.is_finished())
    }

    /// Stops the workers, waits for them, and detaches the program.
    pub fn stop(mut self) -> ServerStats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        // The exporter first: its collector holds the steering program, which detaches when
        // the last holder lets go.
        drop(self.metrics.take());
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                tracing::error!("a worker panicked");
            }
        }
        // The NIC's rules go with the workers they steered to.
        drop(self.flow_rules.take());
    }
}

/// The server's counters now: the shards' (each read without stopping its worker), their
/// sum, the sockets' and the steering program's.
pub(crate) fn snapshot(counters: &HostCounters, steer: Option<&Steer>) -> ServerStats {
    let shards: Vec<Stats> = (0..counters.len())
        .map(|i| counters.shard(i).snapshot())
        .collect();
    let mut handler = Stats::default();
    shards.iter().for_each(|s| handler.add(s));
    ServerStats {
        pages_used: handler.pages_used as u32,
        handler,
        shards,
        xsk: counters.xsk_total(),
        steer: steer.and_then(|s| s.counters().ok()).unwrap_or_default(),
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What every worker (AF_XDP or UDP) owns or shares with the server, and how it runs.
pub(crate) struct WorkerCommon {
    /// Its shard: touched by this worker's thread only.
    pub(crate) handler: Handler,
    pub(crate) shard: usize,
    pub(crate) counters: Arc<HostCounters>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) started: Instant,
    pub(crate) idle: bool,
    pub(crate) sched_idle: bool,
    pub(crate) core: Option<usize>,
}

impl WorkerCommon {
    /// Pins the calling thread and sets its scheduling policy (see
    /// [`bluebridge_xsk::busy_poll_thread`]).
    pub(crate) fn set_up_thread(&self) {
        // The turn first: the watchdog looks at workers whose thread id it knows.
        self.counters().last_turn_ns.set(self.now_ns());
        self.counters()
            .tid
            .set(u64::from(bluebridge_xsk::current_tid().unsigned_abs()));
        if let Err(e) = bluebridge_xsk::busy_poll_thread(self.core, self.sched_idle) {
            tracing::warn!(error = %e, "worker set-up incomplete; running anyway");
        }
    }

    /// This worker's counters.
    pub(crate) fn counters(&self) -> &ShardCounters {
        self.counters.shard(self.shard)
    }

    /// Nanoseconds since the server started.
    pub(crate) fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }
}

struct Worker {
    xsk: Xsk,
    common: WorkerCommon,
    handoff: Arc<Handoff>,
    echo: bool,
}

/// A worker that has not turned its loop for this long under SCHED_IDLE has a CPU-bound
/// neighbour (kernel threads take the core for ~1 ms at most here).
const STARVED_NS: u64 = 20_000_000;

/// Watches the SCHED_IDLE workers (every 5 ms, from a thread of normal priority that sleeps
/// in between) and moves one that has not run for [`STARVED_NS`] to normal priority, for
/// good: beside a CPU-bound process a SCHED_IDLE worker would get ~0.3% of its core.
fn priority_watchdog(counters: &HostCounters, started: Instant, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(5));
        let now = started.elapsed().as_nanos() as u64;
        for shard in 0..counters.len() {
            let c = counters.shard(shard);
            let (last, tid) = (c.last_turn_ns.get(), c.tid.get());
            if c.priority_fallbacks.get() > 0 || tid == 0 || last == u64::MAX {
                continue;
            }
            if now.saturating_sub(last) < STARVED_NS {
                continue;
            }
            match bluebridge_xsk::leave_sched_idle(tid as i32) {
                Ok(()) => tracing::warn!(
                    shard,
                    starved_ms = (now - last) / 1_000_000,
                    "worker starved under SCHED_IDLE (something CPU-bound shares its core): \
                     now at normal priority; isolate the workers' cores (docs/running.md)"
                ),
                Err(e) => {
                    tracing::warn!(shard, error = %e, "a starved worker cannot leave SCHED_IDLE");
                }
            }
            c.priority_fallbacks.inc();
        }
    }
}
/// Empty polls before an idle worker sleeps.
pub(crate) const IDLE_SPINS: u32 = 20_000;
/// Longest sleep, so the stop flag is seen.
pub(crate) const IDLE_SLEEP_MS: u16 = 100;

impl Worker {
    fn run(mut self) {
        self.common.set_up_thread();
        let me = self.common.shard;
        let shards = self.common.counters.len();
        let mut empty = 0u32;
        let mut loops = 0u32;
        let mut meter = crate::stats::StallMeter::new(self.common.started);
        while !self.common.stop.load(Ordering::Relaxed) {
            // A clock read costs ~50 ns on the 2-vCPU VM: every 8th turn is enough to see a
            // 1 ms gap.
            if loops.is_multiple_of(8) {
                meter.tick(self.common.counters());
            }
            // Replies the kernel has not taken yet: take no more requests until it does.
            let backed_up = self.xsk.tx_backed_up();
            let mut n = if backed_up {
                0
            } else if self.echo {
                self.xsk.recv(|frame, tx| {
                    tx.send_with(frame.len(), |b| {
                        b.copy_from_slice(frame);
                        // Not an IPv6/UDP frame: it goes back as it came.
                        let _ = bluebridge_proto::frame::swap_endpoints(b);
                    });
                })
            } else if self.xsk.rx_ready() {
                let c = &mut self.common;
                let now = c.now_ns();
                let (handoff, counters) = (&self.handoff, c.counters.shard(me));
                let h = &mut c.handler;
                self.xsk.recv_parts(|rx, tx| {
                    let (head, tail) = match rx {
                        Rx::Whole(f, _) => (f, &[][..]),
                        Rx::Parts(a, b, _) => (a, b),
                    };
                    match bluebridge_proto::frame::request_shard(head, shards) {
                        Some(owner) if owner != me => {
                            if handoff.send_parts(me, owner, &[head, tail]) {
                                counters.handoffs.inc();
                            } else {
                                counters.handoff_dropped.inc();
                            }
                        }
                        _ => match rx {
                            Rx::Whole(f, sum) => h.handle_frame_summed(f, sum, now, tx),
                            Rx::Parts(a, b, sum) => h.handle_parts(a, b, sum, now, tx),
                        },
                    }
                })
            } else {
                self.xsk.kick_rx();
                0
            };
            if !backed_up {
                let now = self.common.now_ns();
                let mut tx = self.xsk.tx();
                n += self.common.handler.poll_replication(now, &mut tx);
            }
            if !backed_up && shards > 1 && self.handoff.pending(me) {
                let now = self.common.now_ns();
                let h = &mut self.common.handler;
                let mut tx = self.xsk.tx();
                n += self
                    .handoff
                    .drain(me, |frame| h.handle_frame(frame, now, &mut tx));
            }
            if n > 0 {
                self.common.handler.publish_hot();
            }
            if n > 0 || self.xsk.tx_in_flight() > 0 {
                self.xsk.flush();
            }
            if n == 0 {
                empty += 1;
                let waiting = self.common.handler.replication_waiting();
                if self.common.idle
                    && (empty >= IDLE_SPINS || waiting)
                    && self.xsk.tx_in_flight() == 0
                {
                    meter.pause(self.common.counters());
                    self.sleep(if waiting {
                        crate::replication::WAIT_SLEEP_MS
                    } else {
                        IDLE_SLEEP_MS
                    });
                    meter.resume(self.common.counters());
                    empty = 0;
                }
            } else {
                empty = 0;
            }
            loops = loops.wrapping_add(1);
            if loops.is_multiple_of(4096) || n == 0 && empty == 1 {
                self.common.counters().publish_xsk(&self.xsk.stats());
                let now = self.common.now_ns();
                self.common.handler.housekeep(now);
            }
        }
        self.common.counters().publish_xsk(&self.xsk.stats());
        self.common.handler.publish_hot_counters();
    }

    /// Sleeps until a frame arrives on the socket, another shard hands one over, or
    /// `longest_ms` pass (so the stop flag and timers are seen).
    fn sleep(&mut self, longest_ms: u16) {
        let me = self.common.shard;
        if !self.handoff.sleep(me) {
            return;
        }
        let mut fds = [
            nix::poll::PollFd::new(self.xsk.as_fd(), nix::poll::PollFlags::POLLIN),
            nix::poll::PollFd::new(self.handoff.wake_fd(me), nix::poll::PollFlags::POLLIN),
        ];
        let _ = nix::poll::poll(&mut fds, longest_ms);
        self.handoff.woke(me);
    }
}
