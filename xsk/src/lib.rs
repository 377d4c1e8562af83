//! AF_XDP I/O shared by the server and the client.
//!
//! One [`Xsk`] is one AF_XDP socket on one RX queue with its own UMEM (xsk-rs 0.11, libxdp with
//! `XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD`: our own XDP program owns the interface and puts the
//! socket in its XSKMAP). The UMEM's frames are split in two fixed pools: RX frames circulate
//! fill ring → RX ring → back to the fill ring after processing; TX frames circulate free list
//! → TX ring → completion ring → free list. Nothing is allocated after start-up.
//!
//! Frames larger than one UMEM chunk (a whole page: 4206 bytes, with 3840 bytes per chunk in
//! copy mode) travel as multi-buffer chains (`XDP_USE_SG`, `XDP_PKT_CONTD` on every descriptor
//! but the last); on receive a chain is copied into one contiguous buffer before parsing.
//!
//! All unsafe code of the data path is in this crate: ring and UMEM access through xsk-rs, and
//! the mapping of the XDP program's hot-page store ([`shared_map`]).

pub mod cli;
mod link;
pub mod mmsg;
pub mod shared_map;
mod thread;

use bluebridge_proto::checksum::Checksum;
use bluebridge_proto::frame::{self, Endpoints, FrameSink};
use bluebridge_proto::{BbRepr, FRAME_OVERHEAD};

use std::num::NonZeroU32;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

pub use link::{FlowRules, LinkError, link_index, link_mac, link_mtu, rx_queue_count};
pub use thread::{BusyPollError, busy_poll_thread, current_tid, leave_sched_idle};
use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig,
};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

/// `XDP_PKT_CONTD`: more descriptors of this packet follow.
const XDP_PKT_CONTD: u32 = 1;
/// UMEM chunk size.
pub const CHUNK: u32 = 4096;
/// The fewest frame bytes one chunk holds (the chunk less the kernel's XDP headroom): a frame
/// longer than this may need a multi-buffer socket.
pub const CHUNK_DATA_MIN: usize = CHUNK as usize - 256;
/// Frames descriptors are moved in, per ring operation.
const BATCH: usize = 64;
/// Largest frame the layer handles (a jumbo MTU of 9000 plus the Ethernet header).
pub const MAX_FRAME: usize = 9014;

/// How to open a socket.
#[derive(Debug, Clone)]
pub struct XskConfig {
    /// Interface name.
    pub ifname: String,
    /// RX queue index.
    pub queue: u32,
    /// UMEM frames (chunks of 4096 bytes), half for RX, half for TX; a power of two.
    pub frames: u32,
    /// Accept and send multi-buffer frames (`XDP_USE_SG`).
    pub multi_buffer: bool,
    /// Put the UMEM on 2 MiB hugepages if the kernel has them (falls back with a warning).
    pub hugepages: bool,
    /// Ask for zero-copy first and fall back to copy mode (with a log line) when the driver
    /// cannot; `false` binds in copy mode straight away.
    pub zero_copy: bool,
    /// Preferred busy polling (`SO_PREFER_BUSY_POLL`, `SO_BUSY_POLL`, `SO_BUSY_POLL_BUDGET`):
    /// the application's own ring polls drive the NIC queue's NAPI instead of interrupts. For
    /// NICs with `napi_defer_hard_irqs` and `gro_flush_timeout` set (docs/running.md).
    pub busy_poll: Option<BusyPoll>,
}

/// Preferred busy-polling settings of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusyPoll {
    /// `SO_BUSY_POLL`: microseconds a busy poll may spin in the kernel.
    pub usecs: u32,
    /// `SO_BUSY_POLL_BUDGET`: packets one busy poll may process.
    pub budget: u16,
}

/// How a socket got bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct XskMode {
    /// Zero-copy (the NIC writes into the UMEM) rather than copy mode.
    pub zero_copy: bool,
    /// `XDP_USE_NEED_WAKEUP`: the kernel says when it needs a system call to go on.
    pub need_wakeup: bool,
    /// Preferred busy polling is on.
    pub busy_poll: bool,
}

impl XskConfig {
    /// Defaults: 4096 frames (16 MiB of UMEM), hugepages, single-buffer.
    pub fn new(ifname: &str, queue: u32) -> Self {
        XskConfig {
            ifname: ifname.into(),
            queue,
            frames: 4096,
            multi_buffer: false,
            hugepages: true,
            zero_copy: true,
            busy_poll: None,
        }
    }
}

/// Errors opening a socket.
#[derive(Debug, thiserror::Error)]
pub enum XskError {
    /// A configuration value is not usable.
    #[error("bad AF_XDP configuration: {0}")]
    Config(String),
    /// The UMEM could not be created.
    #[error("creating the UMEM: {0}")]
    Umem(String),
    /// The socket could not be created or bound (no such interface or queue, no XDP program
    /// with a matching XSKMAP, multi-buffer unsupported by the driver, not root, ...).
    #[error("creating the AF_XDP socket on {ifname} queue {queue}: {reason}")]
    Socket {
        /// Interface.
        ifname: String,
        /// Queue.
        queue: u32,
        /// What the kernel or libxdp said.
        reason: String,
    },
    /// The socket came without its fill and completion rings.
    #[error("the socket came without fill/completion rings")]
    NoRings,
}

/// Counters of one socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct XskStats {
    /// Frames received (a multi-buffer chain counts once).
    pub rx_frames: u64,
    /// Multi-buffer chains received.
    pub rx_chains: u64,
    /// Frames queued for sending.
    pub tx_frames: u64,
    /// Frames not sent: no free TX frame, or larger than the socket can send.
    pub tx_dropped: u64,
    /// Wake-up system calls made for TX.
    pub tx_kicks: u64,
    /// Received chains dropped for being longer than [`MAX_FRAME`].
    pub rx_oversize: u64,
    /// Times received chunks had to wait to go back to the fill ring.
    pub fill_deferred: u64,
    /// System calls made because the fill ring asked for a wake-up (need-wakeup mode) or to
    /// drive preferred busy polling.
    pub rx_kicks: u64,
    /// Frames the kernel dropped for this socket (XDP_STATISTICS `rx_dropped`: no room, or
    /// invalid).
    pub kernel_rx_dropped: u64,
    /// Frames the kernel dropped because the RX ring was full (the worker fell behind).
    pub kernel_rx_ring_full: u64,
    /// Times the kernel found the fill ring empty.
    pub kernel_fill_ring_empty: u64,
    /// Replies held back because the TX backlog reached its bound (the worker stopped
    /// taking requests until the kernel caught up).
    pub tx_backpressure: u64,
    /// Chains handed over in place, as two pieces ([`Xsk::recv_parts`]): never copied
    /// together.
    pub rx_in_place: u64,
}

impl XskStats {
    /// Frames the kernel dropped for the socket, all reasons: `rx_dropped` (no fill buffer,
    /// too large, invalid) and `rx_ring_full` are separate counts of distinct drops.
    pub fn kernel_drops(&self) -> u64 {
        self.kernel_rx_dropped + self.kernel_rx_ring_full
    }

    /// The number of counters.
    pub const LEN: usize = 13;

    /// The counters in declaration order.
    pub fn to_array(&self) -> [u64; Self::LEN] {
        [
            self.rx_frames,
            self.rx_chains,
            self.tx_frames,
            self.tx_dropped,
            self.tx_kicks,
            self.rx_oversize,
            self.fill_deferred,
            self.rx_kicks,
            self.kernel_rx_dropped,
            self.kernel_rx_ring_full,
            self.kernel_fill_ring_empty,
            self.tx_backpressure,
            self.rx_in_place,
        ]
    }

    /// The counters from [`XskStats::to_array`]'s order.
    pub fn from_array(a: [u64; Self::LEN]) -> Self {
        let [
            rx_frames,
            rx_chains,
            tx_frames,
            tx_dropped,
            tx_kicks,
            rx_oversize,
            fill_deferred,
            rx_kicks,
            kernel_rx_dropped,
            kernel_rx_ring_full,
            kernel_fill_ring_empty,
            tx_backpressure,
            rx_in_place,
        ] = a;
        XskStats {
            rx_frames,
            rx_chains,
            tx_frames,
            tx_dropped,
            tx_kicks,
            rx_oversize,
            fill_deferred,
            rx_kicks,
            kernel_rx_dropped,
            kernel_rx_ring_full,
            kernel_fill_ring_empty,
            tx_backpressure,
            rx_in_place,
        }
    }

    /// Adds another socket's counters.
    pub fn add(&mut self, o: &XskStats) {
        let (a, b) = (self.to_array(), o.to_array());
        *self = Self::from_array(std::array::from_fn(|i| a[i] + b[i]));
    }
}

/// TX frames of the UMEM that are not in the kernel's hands, and frames written but not yet
/// queued.
struct TxPool {
    free: Vec<FrameDesc>,
    pending: Vec<FrameDesc>,
    scratch: Vec<u8>,
    chunk: usize,
    multi_buffer: bool,
    frames: u64,
    dropped: u64,
    /// TX frames in flight at which the worker stops receiving (see [`Xsk::tx_backed_up`]).
    bound: usize,
}

/// Where a frame is written before it is sent: TX frames of the UMEM.
pub struct Tx<'a> {
    umem: &'a Umem,
    pool: &'a mut TxPool,
}

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("free", &self.pool.free.len())
            .finish_non_exhaustive()
    }
}

impl Tx<'_> {
    /// Most bytes one frame may have: one chunk, or (multi-buffer) [`MAX_FRAME`].
    pub fn max_frame(&self) -> usize {
        if self.pool.multi_buffer {
            MAX_FRAME
        } else {
            self.pool.chunk
        }
    }

    /// Sends a frame of `len` bytes written by `write`. Returns false (and counts a drop) if
    /// there is no free TX frame or `len` is larger than [`Tx::max_frame`].
    pub fn send_with(&mut self, len: usize, write: impl FnOnce(&mut [u8])) -> bool {
        let max = self.max_frame();
        let p = &mut *self.pool;
        let parts = len.div_ceil(p.chunk).max(1);
        if len > max || p.free.len() < parts {
            p.dropped += 1;
            return false;
        }
        if parts == 1 {
            let mut desc = p.free.pop().expect("checked");
            // SAFETY: `desc` is a TX frame of this UMEM taken from the free list: the kernel
            // has completed it (or never had it), and no other reference to it exists.
            let mut data = unsafe { self.umem.data_mut(&mut desc) };
            data.cursor().set_pos(len);
            write(data.contents_mut());
            desc.set_options(0);
            p.pending.push(desc);
        } else {
            // A chain: write contiguously, then spread over chunks.
            write(&mut p.scratch[..len]);
            for (i, part) in p.scratch[..len].chunks(p.chunk).enumerate() {
                let mut desc = p.free.pop().expect("checked");
                // SAFETY: as above, a free TX frame of this UMEM.
                let mut data = unsafe { self.umem.data_mut(&mut desc) };
                data.cursor().set_pos(part.len());
                data.contents_mut().copy_from_slice(part);
                desc.set_options(if i + 1 < parts { XDP_PKT_CONTD } else { 0 });
                p.pending.push(desc);
            }
        }
        p.frames += 1;
        true
    }
}

impl FrameSink for Tx<'_> {
    /// Builds the frame straight into its UMEM chunk, or chain of chunks: headers into the
    /// first, the payload copied once across them with its checksum summed on the way, and the
    /// checksum put into the first chunk last. No staging buffer.
    fn send(&mut self, ep: &Endpoints, header: &BbRepr, payload: &[u8]) -> bool {
        let len = FRAME_OVERHEAD + payload.len();
        let max = self.max_frame();
        let p = &mut *self.pool;
        let parts = len.div_ceil(p.chunk).max(1);
        if len > max || p.free.len() < parts || p.chunk < FRAME_OVERHEAD {
            p.dropped += 1;
            return false;
        }
        let first_at = p.pending.len();
        let mut rest = payload;
        let mut writer = None;
        for i in 0..parts {
            let mut desc = p.free.pop().expect("checked");
            let here = (len - i * p.chunk).min(p.chunk);
            // SAFETY: `desc` is a TX frame of this UMEM taken from the free list: the kernel
            // has completed it (or never had it), and no other reference to it exists.
            let mut data = unsafe { self.umem.data_mut(&mut desc) };
            data.cursor().set_pos(here);
            let buf = data.contents_mut();
            let body = if i == 0 {
                writer = Some(
                    frame::FrameWriter::start(buf, ep, header, payload.len())
                        .expect("a chunk holds the headers and the length was checked"),
                );
                &mut buf[FRAME_OVERHEAD..]
            } else {
                buf
            };
            let (now, later) = rest.split_at(body.len());
            writer
                .as_mut()
                .expect("set by the first part")
                .payload(body, now);
            rest = later;
            desc.set_options(if i + 1 < parts { XDP_PKT_CONTD } else { 0 });
            p.pending.push(desc);
        }
        let mut first = p.pending[first_at];
        // SAFETY: the first descriptor of this frame, written above and not yet handed to the
        // kernel (it is still in `pending`); no other reference to its chunk exists now.
        let mut data = unsafe { self.umem.data_mut(&mut first) };
        writer
            .expect("one part at least")
            .finish(data.contents_mut());
        p.frames += 1;
        true
    }
}

/// A received frame, as [`Xsk::recv_parts`] hands it over.
#[derive(Debug, Clone, Copy)]
pub enum Rx<'a> {
    /// In one piece, with the sum of its bytes from the UDP header on when it was copied
    /// together from a chain.
    Whole(&'a [u8], Option<&'a Checksum>),
    /// In two pieces where they arrived, and the sum of their bytes from the UDP header on.
    Parts(&'a [u8], &'a [u8], &'a Checksum),
}

/// One AF_XDP socket with its UMEM and rings.
pub struct Xsk {
    mode: XskMode,
    umem: Umem,
    tx: TxQueue,
    rx: RxQueue,
    fq: FillQueue,
    cq: CompQueue,
    pool: TxPool,
    tx_outstanding: usize,
    batch: Vec<FrameDesc>,
    fill_backlog: Vec<FrameDesc>,
    /// A chain being put together: `assembled` bytes of `assemble` (MAX_FRAME long), and the
    /// sum of those from the UDP header on, taken while copying.
    assemble: Vec<u8>,
    assembled: usize,
    assembled_sum: Checksum,
    assembling: bool,
    oversize: bool,
    hugepages: bool,
    stats: XskStats,
}

impl std::fmt::Debug for Xsk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xsk")
            .field("chunk", &self.pool.chunk)
            .field("multi_buffer", &self.pool.multi_buffer)
            .field("hugepages", &self.hugepages)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Xsk {
    /// Opens a socket on `cfg.ifname` queue `cfg.queue`. The interface must already run an
    /// XDP program that redirects into an XSKMAP; register [`Xsk::fd`] there.
    pub fn new(cfg: &XskConfig) -> Result<Self, XskError> {
        if !cfg.frames.is_power_of_two() || cfg.frames < 2 * BATCH as u32 {
            return Err(XskError::Config(format!(
                "frames {} must be a power of two ≥ 128",
                cfg.frames
            )));
        }
        let mut flags = BindFlags::XDP_USE_NEED_WAKEUP;
        if cfg.multi_buffer {
            flags |= BindFlags::XDP_USE_SG;
        }
        // Zero-copy where the driver has it, else copy mode; need-wakeup where the kernel
        // knows it (every kernel with multi-buffer does), else without.
        let mut tries = Vec::new();
        if cfg.zero_copy {
            tries.push(flags | BindFlags::XDP_ZEROCOPY);
        }
        tries.push(flags | BindFlags::XDP_COPY);
        tries.push((flags - BindFlags::XDP_USE_NEED_WAKEUP) | BindFlags::XDP_COPY);
        let mut last = None;
        for (k, bind) in tries.iter().enumerate() {
            match Self::bind(cfg, *bind) {
                Ok(x) => {
                    tracing::info!(
                        ifname = %cfg.ifname, queue = cfg.queue,
                        zero_copy = x.mode.zero_copy, need_wakeup = x.mode.need_wakeup,
                        busy_poll = x.mode.busy_poll,
                        "AF_XDP socket bound in {} mode",
                        if x.mode.zero_copy { "zero-copy" } else { "copy" }
                    );
                    return Ok(x);
                }
                Err(e @ XskError::Socket { .. }) if k + 1 < tries.len() => {
                    tracing::debug!(error = %e, ?bind, "binding refused; trying the next mode");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one try"))
    }

    /// A UMEM and a socket bound with `bind`.
    fn bind(cfg: &XskConfig, bind: BindFlags) -> Result<Self, XskError> {
        let half = cfg.frames / 2;
        let q = |n: u32| QueueSize::new(n).map_err(|e| XskError::Config(e.to_string()));
        let umem_cfg = UmemConfig::builder()
            .frame_size(FrameSize::new(CHUNK).map_err(|e| XskError::Config(e.to_string()))?)
            .fill_queue_size(q(half)?)
            .comp_queue_size(q(half)?)
            .build()
            .map_err(|e| XskError::Config(e.to_string()))?;
        let count = NonZeroU32::new(cfg.frames).expect("checked by new");
        let (umem, descs, hugepages) = match Umem::new(umem_cfg, count, cfg.hugepages) {
            Ok((u, d)) => (u, d, cfg.hugepages),
            Err(e) if cfg.hugepages => {
                tracing::warn!(error = %e, "no hugepages for the UMEM; using ordinary pages");
                let (u, d) =
                    Umem::new(umem_cfg, count, false).map_err(|e| XskError::Umem(e.to_string()))?;
                (u, d, false)
            }
            Err(e) => return Err(XskError::Umem(e.to_string())),
        };
        let sock_cfg = SocketConfig::builder()
            .rx_queue_size(q(half)?)
            .tx_queue_size(q(half)?)
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(bind)
            .build();
        let ifname: Interface = cfg
            .ifname
            .parse()
            .map_err(|_| XskError::Config("interface name has a NUL".into()))?;
        // SAFETY: the UMEM is new and used by this one socket only, so the shared-UMEM
        // requirement of `Socket::new` (INHIBIT_PROG_LOAD when rebinding a pair) does not arise;
        // we set that flag anyway because our own program owns the interface.
        let made = unsafe { Socket::new(sock_cfg, &umem, &ifname, cfg.queue) };
        let (tx, rx, rings) = made.map_err(|e| XskError::Socket {
            ifname: cfg.ifname.clone(),
            queue: cfg.queue,
            reason: format!("{e}{}", e.source_text()),
        })?;
        let mut mode = XskMode {
            zero_copy: bind.contains(BindFlags::XDP_ZEROCOPY),
            need_wakeup: bind.contains(BindFlags::XDP_USE_NEED_WAKEUP),
            busy_poll: false,
        };
        if let Some(bp) = cfg.busy_poll {
            set_busy_poll(rx.fd().as_raw_fd(), bp).map_err(|e| {
                XskError::Config(format!(
                    "preferred busy polling on {} queue {}: {e}",
                    cfg.ifname, cfg.queue
                ))
            })?;
            mode.busy_poll = true;
        }
        let (mut fq, cq) = rings.ok_or(XskError::NoRings)?;
        let (rx_descs, tx_free) = descs.split_at(half as usize);
        // SAFETY: the RX half of the frames is handed to the kernel once; we touch them again
        // only after they come back on the RX ring.
        let given = unsafe { fq.produce(rx_descs) };
        if given != rx_descs.len() {
            return Err(XskError::Config(format!(
                "fill ring took {given} of {} frames",
                rx_descs.len()
            )));
        }
        let chunk = (CHUNK - umem_cfg.xdp_headroom() - umem_cfg.frame_headroom()) as usize;
        Ok(Xsk {
            mode,
            umem,
            tx,
            rx,
            fq,
            cq,
            pool: TxPool {
                free: tx_free.to_vec(),
                pending: Vec::with_capacity(half as usize),
                scratch: vec![0u8; MAX_FRAME],
                chunk,
                multi_buffer: cfg.multi_buffer,
                frames: 0,
                dropped: 0,
                bound: (half as usize / 4).max(BATCH),
            },
            tx_outstanding: 0,
            batch: vec![FrameDesc::default(); BATCH],
            fill_backlog: Vec::with_capacity(half as usize),
            assemble: vec![0; MAX_FRAME],
            assembled: 0,
            assembled_sum: Checksum::new(),
            assembling: false,
            oversize: false,
            hugepages,
            stats: XskStats::default(),
        })
    }

    /// The socket's file descriptor, for the XSKMAP.
    pub fn fd(&self) -> RawFd {
        self.rx.fd().as_raw_fd()
    }

    /// Bytes of packet data one UMEM chunk holds (3840 in copy mode).
    pub fn chunk_len(&self) -> usize {
        self.pool.chunk
    }

    /// Whether multi-buffer frames are on.
    pub fn multi_buffer(&self) -> bool {
        self.pool.multi_buffer
    }

    /// Whether the UMEM is on hugepages.
    pub fn hugepages(&self) -> bool {
        self.hugepages
    }

    /// How the socket got bound (zero-copy or copy, need-wakeup, busy polling).
    pub fn mode(&self) -> XskMode {
        self.mode
    }

    /// Counters, with the kernel's own for this socket (a `getsockopt`: call it now and then,
    /// not per frame).
    pub fn stats(&self) -> XskStats {
        let k = self.rx.fd().xdp_statistics().ok();
        XskStats {
            tx_frames: self.pool.frames,
            tx_dropped: self.pool.dropped,
            kernel_rx_dropped: k.as_ref().map_or(0, |k| k.rx_dropped()),
            kernel_rx_ring_full: k.as_ref().map_or(0, |k| k.rx_ring_full()),
            kernel_fill_ring_empty: k.as_ref().map_or(0, |k| k.rx_fill_ring_empty_descs()),
            ..self.stats
        }
    }

    /// Frames written but not yet on the TX ring.
    pub fn tx_backlog(&self) -> usize {
        self.pool.pending.len()
    }

    /// Whether the TX frames not yet completed by the kernel (queued, or on the ring) have
    /// reached their bound, a quarter of the TX frames: a worker should stop taking requests
    /// and only flush until the kernel catches up, so replies are neither stranded nor built
    /// without room to send them. Counts each time it says so.
    pub fn tx_backed_up(&mut self) -> bool {
        let full = self.tx_in_flight() >= self.pool.bound;
        if full {
            self.stats.tx_backpressure += 1;
        }
        full
    }

    /// A writer for frames to send; they go out at the next [`Xsk::flush`].
    pub fn tx(&mut self) -> Tx<'_> {
        Tx {
            umem: &self.umem,
            pool: &mut self.pool,
        }
    }

    /// Takes up to one batch of received descriptors and calls `f` for every complete frame
    /// (chains assembled) with a [`Tx`] to answer through. The frames' UMEM chunks go back to
    /// the fill ring afterwards. Returns the number of frames handled.
    pub fn recv(&mut self, mut f: impl FnMut(&[u8], &mut Tx<'_>)) -> usize {
        self.recv_summed(|frame, _, tx| f(frame, tx))
    }

    /// Like [`Xsk::recv_summed`], except that a frame of exactly two descriptors that arrived
    /// in one batch is handed over where it lies, as its two pieces and the sum of their bytes
    /// from the UDP header on ([`Rx::Parts`]; see `Frame::parse_parts`): nothing is copied
    /// together. Longer chains, and chains split across batches, are copied together as
    /// before ([`Rx::Whole`]).
    pub fn recv_parts(&mut self, mut f: impl FnMut(Rx<'_>, &mut Tx<'_>)) -> usize {
        self.recv_inner(true, &mut f)
    }

    /// Like [`Xsk::recv`], and for a frame that came as a chain the one's-complement sum of its
    /// bytes from the UDP header on ([`frame::UDP_START`]), taken while the chain was copied
    /// together: a parser can check the UDP checksum without another pass
    /// ([`frame::Frame::parse_summed`]).
    pub fn recv_summed(
        &mut self,
        mut f: impl FnMut(&[u8], Option<&Checksum>, &mut Tx<'_>),
    ) -> usize {
        self.recv_inner(false, &mut |rx, tx| match rx {
            Rx::Whole(frame, sum) => f(frame, sum, tx),
            Rx::Parts(..) => unreachable!("not asked for"),
        })
    }

    fn recv_inner(&mut self, parts: bool, f: &mut impl FnMut(Rx<'_>, &mut Tx<'_>)) -> usize {
        // SAFETY: `batch` is scratch space for descriptors; consuming writes only into it.
        let n = unsafe { self.rx.consume(&mut self.batch) };
        if n == 0 {
            self.kick_rx();
            return 0;
        }
        let mut frames = 0;
        let mut tx = Tx {
            umem: &self.umem,
            pool: &mut self.pool,
        };
        let mut k = 0;
        while k < n {
            let desc = &self.batch[k];
            k += 1;
            // SAFETY: the descriptor came from the RX ring of this socket, so it names a
            // chunk of this UMEM that the kernel has filled and will not touch until we give it
            // back through the fill ring below.
            let data = unsafe { self.umem.data(desc) };
            let more = desc.options() & XDP_PKT_CONTD != 0;
            if !self.assembling && !more {
                frames += 1;
                f(Rx::Whole(data.contents(), None), &mut tx);
                continue;
            }
            if parts
                && !self.assembling
                && k < n
                && self.batch[k].options() & XDP_PKT_CONTD == 0
                && data.contents().len() >= FRAME_OVERHEAD
            {
                // A two-descriptor frame, both here, its headers in the first: hand it over
                // in place.
                // SAFETY: as above, the next descriptor of the same RX batch.
                let second = unsafe { self.umem.data(&self.batch[k]) };
                k += 1;
                let (head, tail) = (data.contents(), second.contents());
                let mut sum = Checksum::new();
                sum.add_bytes(&head[frame::UDP_START..]).add_bytes(tail);
                frames += 1;
                self.stats.rx_chains += 1;
                self.stats.rx_in_place += 1;
                f(Rx::Parts(head, tail, &sum), &mut tx);
                continue;
            }
            // Part of a chain (possibly split across batches): collect it, unless it has
            // already grown past MAX_FRAME, in which case the rest is skipped and it is dropped.
            let part = data.contents();
            let at = self.assembled;
            if !self.oversize && at + part.len() <= MAX_FRAME {
                let dst = &mut self.assemble[at..at + part.len()];
                let plain = frame::UDP_START.saturating_sub(at).min(part.len());
                dst[..plain].copy_from_slice(&part[..plain]);
                self.assembled_sum
                    .copy_and_add(&mut dst[plain..], &part[plain..]);
                self.assembled += part.len();
            } else if !self.oversize {
                self.oversize = true;
                self.stats.rx_oversize += 1;
            }
            self.assembling = more;
            if !more {
                if !self.oversize {
                    frames += 1;
                    self.stats.rx_chains += 1;
                    f(
                        Rx::Whole(&self.assemble[..self.assembled], Some(&self.assembled_sum)),
                        &mut tx,
                    );
                }
                self.assembled = 0;
                self.assembled_sum = Checksum::new();
                self.oversize = false;
            }
        }
        self.stats.rx_frames += frames;
        // These chunks were received above and are no longer referenced (`f` got them by
        // shared borrow for the duration of its call only): back to the kernel.
        self.fill_backlog.extend_from_slice(&self.batch[..n]);
        self.refill();
        frames as usize
    }

    /// Gives received chunks back to the kernel through the fill ring. The kernel publishes
    /// its consumer index on the fill ring lazily, so the ring can look full although the
    /// chunks we hold have already left it: what does not fit now waits in the backlog and is
    /// offered again on every `recv` and `flush`, so no chunk ever drops out of circulation.
    fn refill(&mut self) {
        while !self.fill_backlog.is_empty() {
            let room = self.fq.nb_free(self.fill_backlog.len() as u32) as usize;
            let take = room.min(self.fill_backlog.len());
            if take == 0 {
                self.stats.fill_deferred += 1;
                return;
            }
            // SAFETY: backlog chunks are RX chunks of this UMEM that we no longer reference.
            let given = unsafe { self.fq.produce(&self.fill_backlog[..take]) };
            if given == 0 {
                self.stats.fill_deferred += 1;
                return;
            }
            self.fill_backlog.drain(..given);
        }
    }

    /// With nothing received (call it when [`Xsk::rx_ready`] says so): a system call when the kernel asked for one on the fill ring
    /// (need-wakeup: the driver stopped for want of fill descriptors) or to drive preferred busy
    /// polling (the call runs the queue's NAPI poll).
    pub fn kick_rx(&mut self) {
        let asked = self.mode.need_wakeup && self.mode.zero_copy && self.fq.needs_wakeup();
        if asked || self.mode.busy_poll {
            self.stats.rx_kicks += 1;
            let fd = self.rx.fd().as_raw_fd();
            // SAFETY: a zero-length, non-blocking recvfrom on our own AF_XDP socket with no
            // buffer and no address: the kernel reads and writes no user memory.
            let _ = unsafe {
                libc::recvfrom(
                    fd,
                    std::ptr::null_mut(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
        }
    }

    /// Reclaims completed TX frames, queues pending frames on the TX ring and kicks the kernel
    /// while any are outstanding and it needs a kick: always in copy mode (where the system
    /// call does the sending, at most 32 descriptors per call, so the kick repeats on every
    /// flush until all have completed), only when the ring asks for one in zero-copy
    /// need-wakeup mode.
    pub fn flush(&mut self) {
        self.refill();
        loop {
            // SAFETY: `batch` is scratch space; completed descriptors are TX frames of this
            // UMEM that the kernel no longer uses.
            let c = unsafe { self.cq.consume(&mut self.batch) };
            if c == 0 {
                break;
            }
            self.tx_outstanding -= c;
            self.pool.free.extend_from_slice(&self.batch[..c]);
        }
        let pending = &mut self.pool.pending;
        if !pending.is_empty() {
            // The producer reserves all or nothing; cut at a packet boundary that fits.
            let room = self.tx.nb_free(pending.len() as u32) as usize;
            let mut take = room.min(pending.len());
            while take > 0 && pending[take - 1].options() & XDP_PKT_CONTD != 0 {
                take -= 1;
            }
            // SAFETY: pending descriptors are TX frames we wrote and no longer reference.
            let sent = unsafe { self.tx.produce(&pending[..take]) };
            pending.drain(..sent);
            self.tx_outstanding += sent;
        }
        let needed = !self.mode.zero_copy || !self.mode.need_wakeup || self.tx.needs_wakeup();
        if self.tx_outstanding > 0 && needed {
            self.stats.tx_kicks += 1;
            if let Err(e) = self.tx.wakeup() {
                // EAGAIN/EBUSY/ENOBUFS: the kernel is busy; the next flush kicks again.
                tracing::trace!(error = %e, "tx wakeup");
            }
        }
    }

    /// Whether received frames are waiting (a peek; nothing is consumed).
    pub fn rx_ready(&mut self) -> bool {
        self.rx.nb_avail(1) > 0
    }

    /// Frames sent but not yet completed, plus those not yet on the ring.
    pub fn tx_in_flight(&self) -> usize {
        self.tx_outstanding + self.pool.pending.len()
    }
}

impl AsFd for Xsk {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor is owned by the socket, which lives as long as `self`.
        unsafe { BorrowedFd::borrow_raw(self.fd()) }
    }
}

/// `SO_PREFER_BUSY_POLL`, `SO_BUSY_POLL` and `SO_BUSY_POLL_BUDGET` on an AF_XDP socket.
fn set_busy_poll(fd: RawFd, bp: BusyPoll) -> std::io::Result<()> {
    let set = |opt: libc::c_int, v: libc::c_int| -> std::io::Result<()> {
        // SAFETY: `v` is a live c_int and its exact size is passed; setsockopt only reads it.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&raw const v).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    set(libc::SO_PREFER_BUSY_POLL, 1)?;
    set(libc::SO_BUSY_POLL, bp.usecs as libc::c_int)?;
    set(libc::SO_BUSY_POLL_BUDGET, libc::c_int::from(bp.budget))
}

trait SourceText {
    fn source_text(&self) -> String;
}

impl<E: std::error::Error> SourceText for E {
    fn source_text(&self) -> String {
        self.source().map(|s| format!(": {s}")).unwrap_or_default()
    }
}
