//! The running server: the steering program on the interface, one AF_XDP socket and one pinned
//! worker per RX queue, all sharing one request handler.
//!
//! Workers busy-poll their socket in batches; the handler is locked once per received batch,
//! not per frame. With `idle`, a worker that found nothing for a while sleeps in `poll()` until
//! a frame arrives, so many servers can share a machine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use bluebridge_ebpf::{AttachMode, Steer, SteerCounters};
use bluebridge_proto::addr::HOST_PREFIX_LEN;
use bluebridge_proto::segment::{max_data_per_frame, max_frame_for_mtu};
use bluebridge_proto::{HostId, NetPrefix};
use bluebridge_xsk::{Xsk, XskConfig, XskStats};

use crate::handler::{Handler, HandlerConfig};
use crate::stats::Stats;
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
    /// RX queues to serve, one worker each.
    pub queues: Vec<u32>,
    /// CPU per worker (same order as `queues`); empty: unpinned.
    pub cores: Vec<usize>,
    /// Arena size in bytes (a multiple of 2 MiB).
    pub arena_bytes: u64,
    /// Framing of pages.
    pub framing: Framing,
    /// Sleep in poll() after a run of empty polls.
    pub idle: bool,
    /// Run workers under SCHED_IDLE so kernel work on their CPU is never starved
    /// (see [`bluebridge_xsk::busy_poll_thread`]).
    pub sched_idle: bool,
    /// UMEM frames per socket.
    pub frames: u32,
    /// Attach XDP in generic mode.
    pub force_generic: bool,
    /// Put the arena and UMEM on hugepages when available.
    pub hugepages: bool,
    /// Bare-echo baseline: bounce every steered frame back (endpoints swapped) without
    /// parsing it or touching the store (AF_XDP only; for benchmarks).
    pub echo: bool,
    /// Leases that may be held at once.
    pub max_leases: u16,
    /// Lease time when a client asks for none, ms.
    pub lease_default_ms: u64,
    /// Longest lease granted, ms.
    pub lease_max_ms: u64,
    /// Replies remembered for at-most-once execution (its horizon: that many non-idempotent
    /// requests).
    pub dedup_entries: usize,
    /// Client prefixes allowed to use the server (empty: anyone).
    pub allowed_clients: Vec<crate::access::ClientPrefix>,
    /// Distinct client addresses that may own pages.
    pub max_owners: usize,
    /// Behind a BlueBridge switch: take every BlueBridge frame the switch delivers (the
    /// whole deployment prefix), so pages migrated here from other hosts are served. Without
    /// it only this host's /48 (and the any-server /48) is steered.
    pub accept_routed: bool,
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
            hugepages: true,
            echo: false,
            max_leases: u16::MAX,
            lease_default_ms: 1_000,
            lease_max_ms: 60_000,
            dedup_entries: 1 << 17,
            allowed_clients: Vec::new(),
            max_owners: 1 << 16,
            accept_routed: false,
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
}

/// The sockets workers serve.
enum Sockets {
    Xdp(Vec<Xsk>),
    Udp(std::net::UdpSocket),
}

/// Counters of the whole server, for the periodic line and the summary.
#[derive(Debug, Clone)]
pub struct ServerStats {
    /// Request handling.
    pub handler: Stats,
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
    steer: Option<Steer>,
    handler: Arc<Mutex<Handler>>,
    xsk_stats: Vec<Arc<Mutex<XskStats>>>,
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
    /// Pages in the arena.
    pub pages: u32,
    /// Whether pages travel as one multi-buffer frame.
    pub multi_buffer: bool,
    /// Page bytes per reply frame.
    pub frame_data: u16,
    /// MTU.
    pub mtu: u16,
    /// Memory besides the arena and the UMEMs: metadata and tables.
    pub overhead_bytes: usize,
    /// UMEM bytes over all sockets.
    pub umem_bytes: usize,
}

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
        if cfg.max_leases == 0
            || cfg.dedup_entries == 0
            || cfg.lease_default_ms == 0
            || cfg.max_owners == 0
        {
            return Err(StartError::Config(
                "lease and duplicate-table sizes and times must be positive".into(),
            ));
        }
        if cfg.lease_default_ms > cfg.lease_max_ms {
            return Err(StartError::Config(
                "the default lease time exceeds the longest lease".into(),
            ));
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

        let store = Store::new(cfg.arena_bytes, cfg.hugepages)?;
        let backing = store.backing();
        let pages = store.pages_total();

        let (steer, attach, sockets, frame_data) = match cfg.transport {
            TransportKind::Xdp => {
                let mut steer = Steer::load()?;
                steer.add_prefix(cfg.prefix.host_network(cfg.host), HOST_PREFIX_LEN)?;
                // Anycast ALLOCs (host 0xffff) routed here by a switch.
                steer.add_prefix(cfg.prefix.host_network(HostId::ANY), HOST_PREFIX_LEN)?;
                if cfg.accept_routed {
                    steer.add_prefix(cfg.prefix.network(), 32)?;
                }
                let attach = steer.attach(&cfg.ifname, cfg.force_generic)?;

                let mut sockets = Vec::new();
                for &q in &cfg.queues {
                    let xsk = Xsk::new(&XskConfig {
                        ifname: cfg.ifname.clone(),
                        queue: q,
                        frames: cfg.frames,
                        multi_buffer,
                        hugepages: cfg.hugepages,
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
                (Some(steer), Some(attach), Sockets::Xdp(sockets), frame_data)
            }
            TransportKind::Udp => {
                let sock = crate::udp::bind(cfg)?;
                let frame_data = max_data_per_frame(max_frame_for_mtu(mtu)).expect("MTU checked");
                (None, None, Sockets::Udp(sock), frame_data)
            }
        };
        let mut hc = HandlerConfig::new(cfg.prefix, cfg.host, frame_data);
        hc.lease_capacity = cfg.max_leases;
        hc.lease_default_ms = cfg.lease_default_ms;
        hc.lease_max_ms = cfg.lease_max_ms;
        hc.dedup_capacity = cfg.dedup_entries;
        hc.allowed_clients = cfg.allowed_clients.clone();
        hc.max_owners = cfg.max_owners;
        let handler = Handler::new(hc, store);
        let overhead_bytes = handler.overhead_bytes();
        let handler = Arc::new(Mutex::new(handler));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let mut workers = Vec::new();
        let mut xsk_stats = Vec::new();
        let mut spawn = |name: String, f: Box<dyn FnOnce() + Send>| -> Result<(), StartError> {
            let t = std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(|e| StartError::Config(format!("spawning a worker: {e}")))?;
            workers.push(t);
            Ok(())
        };
        let common = |published, core| WorkerCommon {
            handler: handler.clone(),
            stop: stop.clone(),
            published,
            started,
            idle: cfg.idle,
            sched_idle: cfg.sched_idle,
            core,
        };
        let umem_bytes = match sockets {
            Sockets::Xdp(sockets) => {
                let n = sockets.len();
                for (i, xsk) in sockets.into_iter().enumerate() {
                    let published = Arc::new(Mutex::new(XskStats::default()));
                    xsk_stats.push(published.clone());
                    let w = Worker {
                        xsk,
                        common: common(published, cfg.cores.get(i).copied()),
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
                let published = Arc::new(Mutex::new(XskStats::default()));
                xsk_stats.push(published.clone());
                let w =
                    crate::udp::UdpWorker::new(sock, common(published, cfg.cores.first().copied()))
                        .map_err(|e| StartError::Config(format!("UDP socket: {e}")))?;
                spawn("bb-worker-udp".into(), Box::new(move || w.run()))?;
                0
            }
        };
        let info = ServerInfo {
            attach,
            backing,
            pages,
            multi_buffer,
            frame_data,
            mtu,
            overhead_bytes,
            umem_bytes,
        };
        tracing::info!(
            ifname = %cfg.ifname, host = %cfg.host, prefix = %cfg.prefix, ?attach, ?backing, pages,
            multi_buffer, frame_data, mtu, workers = workers.len(), "serving"
        );
        Ok(Server {
            steer,
            handler,
            xsk_stats,
            workers,
            stop,
            info,
        })
    }

    /// What it started with.
    pub fn info(&self) -> &ServerInfo {
        &self.info
    }

    /// A snapshot of every counter.
    pub fn stats(&self) -> ServerStats {
        let (handler, pages_used) = {
            let h = self
                .handler
                .lock()
                .expect("a worker panicked holding the handler");
            (h.stats().clone(), h.store().pages_used())
        };
        let mut xsk = XskStats::default();
        for s in &self.xsk_stats {
            let s = *s.lock().expect("poisoned");
            xsk.rx_frames += s.rx_frames;
            xsk.rx_chains += s.rx_chains;
            xsk.tx_frames += s.tx_frames;
            xsk.tx_dropped += s.tx_dropped;
            xsk.tx_kicks += s.tx_kicks;
            xsk.rx_oversize += s.rx_oversize;
            xsk.fill_deferred += s.fill_deferred;
        }
        ServerStats {
            handler,
            pages_used,
            xsk,
            steer: self
                .steer
                .as_ref()
                .and_then(|s| s.counters().ok())
                .unwrap_or_default(),
        }
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
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                tracing::error!("a worker panicked");
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What every worker (AF_XDP or UDP) shares with the server and how it runs.
pub(crate) struct WorkerCommon {
    pub(crate) handler: Arc<Mutex<Handler>>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) published: Arc<Mutex<XskStats>>,
    pub(crate) started: Instant,
    pub(crate) idle: bool,
    pub(crate) sched_idle: bool,
    pub(crate) core: Option<usize>,
}

impl WorkerCommon {
    /// Pins the calling thread and sets its scheduling policy (see
    /// [`bluebridge_xsk::busy_poll_thread`]).
    pub(crate) fn set_up_thread(&self) {
        if let Err(e) = bluebridge_xsk::busy_poll_thread(self.core, self.sched_idle) {
            tracing::warn!(error = %e, "worker set-up incomplete; running anyway");
        }
    }
}

struct Worker {
    xsk: Xsk,
    common: WorkerCommon,
    echo: bool,
}

/// Empty polls before an idle worker sleeps.
pub(crate) const IDLE_SPINS: u32 = 20_000;
/// Longest sleep, so the stop flag is seen.
pub(crate) const IDLE_SLEEP_MS: u16 = 100;

impl Worker {
    fn run(mut self) {
        self.common.set_up_thread();
        let c = &self.common;
        let mut empty = 0u32;
        let mut loops = 0u32;
        while !c.stop.load(Ordering::Relaxed) {
            let n = if self.echo {
                self.xsk.recv(|frame, tx| {
                    tx.send_with(frame.len(), |b| {
                        b.copy_from_slice(frame);
                        // Not an IPv6/UDP frame: it goes back as it came.
                        let _ = bluebridge_proto::frame::swap_endpoints(b);
                    });
                })
            } else if self.xsk.rx_ready() {
                let mut h = c.handler.lock().expect("poisoned");
                let now = c.started.elapsed().as_nanos() as u64;
                self.xsk.recv(|frame, tx| h.handle_frame(frame, now, tx))
            } else {
                0
            };
            if n > 0 || self.xsk.tx_in_flight() > 0 {
                self.xsk.flush();
            }
            if n == 0 {
                empty += 1;
                if c.idle && empty >= IDLE_SPINS && self.xsk.tx_in_flight() == 0 {
                    self.xsk.wait(i32::from(IDLE_SLEEP_MS));
                    empty = 0;
                }
            } else {
                empty = 0;
            }
            loops = loops.wrapping_add(1);
            if loops.is_multiple_of(4096) || n == 0 && empty == 1 {
                *c.published.lock().expect("poisoned") = self.xsk.stats();
            }
        }
        *c.published.lock().expect("poisoned") = self.xsk.stats();
    }
}
