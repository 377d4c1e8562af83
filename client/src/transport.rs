//! Transports move the engine's frames. [`XdpTransport`] is the product: AF_XDP sockets on
//! the client's interface (one per queue) behind our own steering program, sending to the
//! configured next-hop MAC (no neighbour discovery, no kernel state per remote page). A request
//! for a page leaves on the queue of the page's shard (its handle's shard field), so on a link
//! that keeps queue numbers (veth) it reaches the server worker that owns the page.

use std::net::{Ipv6Addr, SocketAddrV6};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bluebridge_ebpf::{AttachMode, Steer, SteerCounters, SteerError};
use bluebridge_proto::segment::{max_data_per_frame, max_frame_for_mtu};
use bluebridge_xsk::{LinkError, Xsk, XskConfig, XskError, XskStats};

use bluebridge_proto::frame::{Endpoints, FrameSink};
use bluebridge_proto::{
    BbRepr, HostId, MacAddr, NetPrefix, PAGE_SIZE, PageHandle, SESSION_SLOT_BITS,
};

use crate::engine::{Engine, EngineConfig};
use crate::udp::UdpTransport;

/// Something that carries an engine's frames.
pub trait Transport {
    /// Sends what the engine has queued.
    fn transmit(&mut self, engine: &mut Engine, now: Instant);
    /// Hands received frames to the engine; returns how many.
    fn receive(&mut self, engine: &mut Engine, now: Instant) -> usize;
    /// Descriptors that become readable when frames arrive (for a thread that sleeps in
    /// `poll` between requests, e.g. a coherent region's handler waiting for notices). None
    /// by default: such a thread then wakes on its timer only.
    fn poll_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        Vec::new()
    }
    /// Frames the transport took and could not hand to the kernel (dropped; a request's
    /// retransmission covers it). None by default: a transport that cannot send a frame
    /// leaves it queued instead.
    fn tx_dropped(&self) -> u64 {
        0
    }
}

/// Either transport, chosen at run time.
#[derive(Debug)]
pub enum AnyTransport {
    /// AF_XDP (boxed: the socket state is large).
    Xdp(Box<XdpTransport>),
    /// Kernel UDP (boxed, like the other).
    Udp(Box<UdpTransport>),
}

impl AnyTransport {
    /// The AF_XDP transport, if that is what this is.
    pub fn xdp_mut(&mut self) -> Option<&mut XdpTransport> {
        match self {
            AnyTransport::Xdp(x) => Some(x),
            AnyTransport::Udp(_) => None,
        }
    }
}

impl Transport for AnyTransport {
    fn transmit(&mut self, engine: &mut Engine, now: Instant) {
        match self {
            AnyTransport::Xdp(t) => t.transmit(engine, now),
            AnyTransport::Udp(t) => t.transmit(engine, now),
        }
    }

    fn receive(&mut self, engine: &mut Engine, now: Instant) -> usize {
        match self {
            AnyTransport::Xdp(t) => t.receive(engine, now),
            AnyTransport::Udp(t) => t.receive(engine, now),
        }
    }

    fn poll_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        match self {
            AnyTransport::Xdp(t) => t.poll_fds(),
            AnyTransport::Udp(t) => t.poll_fds(),
        }
    }

    fn tx_dropped(&self) -> u64 {
        match self {
            AnyTransport::Xdp(t) => t.tx_dropped(),
            AnyTransport::Udp(t) => t.tx_dropped(),
        }
    }
}

/// Which transport to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportKind {
    /// AF_XDP behind our steering program (root).
    Xdp,
    /// A kernel UDP socket: the baseline; no root.
    Udp,
}

/// What opening a transport and configuring its engine needs.
#[derive(Debug, Clone)]
pub struct Connect {
    /// Which transport.
    pub kind: TransportKind,
    /// Interface (its MTU sizes segments; AF_XDP runs on it).
    pub ifname: String,
    /// This client's address.
    pub local: Ipv6Addr,
    /// The next hop's MAC (AF_XDP only).
    pub next_hop_mac: Option<MacAddr>,
    /// The deployment's prefix.
    pub prefix: NetPrefix,
    /// Carry pages as segments even where one frame would do (AF_XDP).
    pub segments: bool,
}

/// Opening a transport by [`Connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The client's address is not one a client may have (§1: inside its host's /48 of the
    /// deployment prefix, not the anycast host).
    #[error("--local {local}: {why}")]
    BadLocal {
        /// The address.
        local: Ipv6Addr,
        /// What is wrong with it.
        why: String,
    },
    /// AF_XDP needs the next hop's MAC.
    #[error("the AF_XDP transport needs the next hop's MAC")]
    NoNextHop,
    /// The AF_XDP transport failed.
    #[error(transparent)]
    Xdp(#[from] TransportError),
    /// The UDP socket could not be bound.
    #[error("binding a UDP socket to {addr} (is the address assigned?): {source}")]
    Udp {
        /// The address.
        addr: Ipv6Addr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl Connect {
    /// Opens the transport and returns it with an engine configuration that matches it (local
    /// port, MACs, page bytes per frame); timeouts are left at their defaults. AF_XDP opens a
    /// socket on every RX queue of the interface and sends each request on its page's shard's.
    pub fn open(&self) -> Result<(AnyTransport, EngineConfig), ConnectError> {
        self.check_local()?;
        match self.kind {
            TransportKind::Xdp => {
                let n =
                    bluebridge_xsk::rx_queue_count(&self.ifname).map_err(TransportError::from)?;
                self.open_xdp((0..n.max(1)).collect(), None)
            }
            TransportKind::Udp => self.open_on(0, None),
        }
    }

    /// Like [`Connect::open`], on RX queue `queue`. An AF_XDP transport joins `shared` (the
    /// steering program another transport already attached to this interface, see
    /// [`XdpTransport::steer`]) instead of loading its own: one program per interface, one
    /// socket per queue. UDP ignores both.
    pub fn open_on(
        &self,
        queue: u32,
        shared: Option<&SharedSteer>,
    ) -> Result<(AnyTransport, EngineConfig), ConnectError> {
        self.check_local()?;
        match self.kind {
            TransportKind::Xdp => self.open_xdp(vec![queue], shared),
            TransportKind::Udp => {
                let mtu = bluebridge_xsk::link_mtu(&self.ifname).map_err(TransportError::from)?;
                let data =
                    max_data_per_frame(max_frame_for_mtu(mtu)).ok_or(TransportError::Mtu {
                        ifname: self.ifname.clone(),
                        mtu,
                    })?;
                let t = UdpTransport::open(SocketAddrV6::new(self.local, 0, 0, 0)).map_err(
                    |source| ConnectError::Udp {
                        addr: self.local,
                        source,
                    },
                )?;
                let mut ec = EngineConfig::new(
                    self.prefix,
                    self.local,
                    MacAddr::default(),
                    MacAddr::default(),
                );
                ec.local_port = t.local().port();
                ec.seg_max = data;
                ec.max_request_data = data;
                ec.inline_reads = usize::from(data) >= PAGE_SIZE;
                Ok((AnyTransport::Udp(Box::new(t)), ec))
            }
        }
    }
}

impl Connect {
    /// Refuses a local address outside the deployment prefix (replies would never route
    /// back) or in the anycast host, before anything is attached.
    fn check_local(&self) -> Result<(), ConnectError> {
        let bad = |why: String| ConnectError::BadLocal {
            local: self.local,
            why,
        };
        if !self.prefix.contains(self.local) {
            return Err(bad(format!(
                "outside the deployment prefix {}",
                self.prefix
            )));
        }
        let host = u16::from_be_bytes([self.local.octets()[4], self.local.octets()[5]]);
        if HostId(host).is_any() {
            return Err(bad(
                "host id 0xffff is the anycast host, not a client's".into()
            ));
        }
        Ok(())
    }

    fn open_xdp(
        &self,
        queues: Vec<u32>,
        shared: Option<&SharedSteer>,
    ) -> Result<(AnyTransport, EngineConfig), ConnectError> {
        let next_hop = self.next_hop_mac.ok_or(ConnectError::NoNextHop)?;
        let mut xc = XdpConfig::new(&self.ifname, self.local);
        xc.multi_buffer = !self.segments;
        // The default 16 MiB of UMEM shared out between the sockets, 2 MiB each at least.
        xc.frames = (xc.frames / queues.len().max(1) as u32)
            .next_power_of_two()
            .max(512);
        xc.queues = queues;
        let t = match shared {
            Some(steer) => XdpTransport::open_with(&xc, steer.clone())?,
            None => XdpTransport::open(&xc)?,
        };
        let mut ec = EngineConfig::new(self.prefix, self.local, MacAddr(t.mac()), next_hop);
        ec.seg_max = t.frame_data();
        ec.max_request_data = t.frame_data();
        ec.inline_reads = usize::from(t.frame_data()) >= PAGE_SIZE;
        Ok((AnyTransport::Xdp(Box::new(t)), ec))
    }
}

/// The command-line options every BlueBridge client tool shares (flatten into a clap parser).
#[derive(Debug, Clone, clap::Args)]
pub struct NetArgs {
    /// Network interface to send and receive on.
    #[arg(short, long, value_name = "IFACE")]
    pub iface: String,
    /// `xdp` (AF_XDP with our steering program; root) or `udp` (a kernel UDP socket: the
    /// baseline, no root; --local must be assigned and the prefix routed by the kernel).
    #[arg(long, value_enum, default_value_t = TransportKind::Xdp)]
    pub transport: TransportKind,
    /// This client's IPv6 address (inside its host's /48 of the prefix).
    #[arg(long, default_value = "fd00:bb:1::1")]
    pub local: Ipv6Addr,
    /// MAC address of the next hop (the server on a direct link, the switch in a rack); needed
    /// with the AF_XDP transport.
    #[arg(long, value_name = "MAC")]
    pub next_hop_mac: Option<MacAddr>,
    /// The deployment's network prefix (a /32).
    #[arg(long, default_value = "fd00:bb::/32")]
    pub prefix: NetPrefix,
    /// Send pages as MTU-sized segments even where one multi-buffer frame would fit (AF_XDP).
    #[arg(long)]
    pub segments: bool,
    /// Retransmission timeout in microseconds (10 to 100000; adapts to the measured round
    /// trip and backs off on retries, up to 64 times this).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=100_000))]
    pub rto_us: u64,
    /// Retransmissions before a request fails with a timeout (0 to 100).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub retries: u32,
    /// Send READs plain instead of INLINE (padded to the reply's size so a server with
    /// `--xdp-cache` can answer them in XDP; the default for READs of a whole page or of at
    /// most 512 bytes, where a page fits one frame).
    #[arg(long)]
    pub no_inline_reads: bool,
}

impl NetArgs {
    /// What these options ask to open.
    pub fn connect(&self) -> Connect {
        Connect {
            kind: self.transport,
            ifname: self.iface.clone(),
            local: self.local,
            next_hop_mac: self.next_hop_mac,
            prefix: self.prefix,
            segments: self.segments,
        }
    }

    /// Opens the transport (AF_XDP: a socket on every queue); the engine configuration
    /// carries the timeout and retry budget.
    pub fn open(&self) -> Result<(AnyTransport, EngineConfig), ConnectError> {
        let (t, mut ec) = self.connect().open()?;
        self.tune(&mut ec);
        Ok((t, ec))
    }

    /// Opens on RX queue `queue`, joining a shared steering program (see [`Connect::open_on`]).
    pub fn open_on(
        &self,
        queue: u32,
        shared: Option<&SharedSteer>,
    ) -> Result<(AnyTransport, EngineConfig), ConnectError> {
        let (t, mut ec) = self.connect().open_on(queue, shared)?;
        self.tune(&mut ec);
        Ok((t, ec))
    }

    /// What these options change in an engine's configuration.
    fn tune(&self, ec: &mut EngineConfig) {
        ec.rto = std::time::Duration::from_micros(self.rto_us);
        ec.retries = self.retries;
        ec.inline_reads &= !self.no_inline_reads;
    }
}

impl AnyTransport {
    /// One line saying what this is (for banners).
    pub fn describe(&self) -> String {
        match self {
            AnyTransport::Xdp(t) => format!(
                "XDP {:?} | {} queue(s) | MTU {} | {}",
                t.attach_mode(),
                t.queues().len(),
                t.mtu(),
                if t.multi_buffer() {
                    "one frame per page".to_owned()
                } else {
                    format!("segments of {} B", t.frame_data())
                }
            ),
            AnyTransport::Udp(t) => format!("kernel UDP from port {}", t.local().port()),
        }
    }
}

/// Opening a transport failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Loading or attaching the steering program failed.
    #[error(transparent)]
    Steer(#[from] SteerError),
    /// The AF_XDP socket could not be opened.
    #[error(transparent)]
    Xsk(#[from] XskError),
    /// The interface could not be read.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The interface's MTU is below what BlueBridge needs.
    #[error("{ifname} has MTU {mtu}; BlueBridge needs at least 1280")]
    Mtu {
        /// Interface.
        ifname: String,
        /// Its MTU.
        mtu: u16,
    },
}

/// How to open an [`XdpTransport`].
#[derive(Debug, Clone)]
pub struct XdpConfig {
    /// Interface.
    pub ifname: String,
    /// RX queues, a socket on each (requests for a page of shard `s` leave on the `s`-th,
    /// modulo their number).
    pub queues: Vec<u32>,
    /// This client's address: the steering program sends frames to it into the socket.
    pub local: Ipv6Addr,
    /// One frame per page where the MTU allows (multi-buffer), else segments.
    pub multi_buffer: bool,
    /// UMEM frames.
    pub frames: u32,
    /// Attach in generic mode instead of trying driver mode first.
    pub force_generic: bool,
}

impl XdpConfig {
    /// Defaults for `ifname` queue 0.
    pub fn new(ifname: &str, local: Ipv6Addr) -> Self {
        XdpConfig {
            ifname: ifname.into(),
            queues: vec![0],
            local,
            multi_buffer: true,
            frames: 4096,
            force_generic: false,
        }
    }
}

/// One interface's steering program, shared by the transports on its queues; detached when the
/// last of them is dropped.
pub type SharedSteer = Arc<Mutex<Steer>>;

/// The AF_XDP transport.
#[derive(Debug)]
pub struct XdpTransport {
    xsks: Vec<Xsk>,
    queues: Vec<u32>,
    steer: SharedSteer,
    mtu: u16,
    mac: [u8; 6],
    frame_data: u16,
}

impl XdpTransport {
    /// Loads the steering program for `cfg.local`/128 on the interface, opens the socket and
    /// registers it. Multi-buffer is used only if asked and the MTU carries a page per frame.
    pub fn open(cfg: &XdpConfig) -> Result<Self, TransportError> {
        let mut steer = Steer::load()?;
        steer.add_prefix(cfg.local, 128)?;
        steer.attach(&cfg.ifname, cfg.force_generic)?;
        steer.set_own_mac(bluebridge_xsk::link_mac(&cfg.ifname)?)?;
        Self::open_with(cfg, Arc::new(Mutex::new(steer)))
    }

    /// Opens a socket on each of `cfg.queues` and registers it with `steer`, a program already
    /// steering `cfg.local` on this interface (another transport's [`XdpTransport::steer`]).
    pub fn open_with(cfg: &XdpConfig, steer: SharedSteer) -> Result<Self, TransportError> {
        let mtu = bluebridge_xsk::link_mtu(&cfg.ifname)?;
        if mtu < bluebridge_proto::MIN_MTU {
            return Err(TransportError::Mtu {
                ifname: cfg.ifname.clone(),
                mtu,
            });
        }
        let mac = bluebridge_xsk::link_mac(&cfg.ifname)?;
        let multi_buffer = cfg.multi_buffer && mtu >= bluebridge_proto::PAGE_MTU;
        let mut xsks = Vec::with_capacity(cfg.queues.len());
        for &queue in &cfg.queues {
            let xsk = Xsk::new(&XskConfig {
                ifname: cfg.ifname.clone(),
                queue,
                frames: cfg.frames,
                multi_buffer,
                hugepages: true,
                zero_copy: true,
                busy_poll: None,
            })?;
            steer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .set_socket(queue, xsk.fd())?;
            xsks.push(xsk);
        }
        let chunk = xsks.first().map_or(usize::MAX, Xsk::chunk_len);
        let max_frame = if multi_buffer {
            max_frame_for_mtu(mtu)
        } else {
            max_frame_for_mtu(mtu).min(chunk)
        };
        let frame_data = max_data_per_frame(max_frame).expect("MTU checked above");
        Ok(XdpTransport {
            xsks,
            queues: cfg.queues.clone(),
            steer,
            mtu,
            mac,
            frame_data,
        })
    }

    /// Page bytes per frame this transport sends and takes.
    pub fn frame_data(&self) -> u16 {
        self.frame_data
    }

    /// The interface's MTU.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// The interface's MAC.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Whether whole pages travel in one (multi-buffer) frame.
    pub fn multi_buffer(&self) -> bool {
        self.xsks[0].multi_buffer()
    }

    /// The RX queues it has a socket on.
    pub fn queues(&self) -> &[u32] {
        &self.queues
    }

    /// How the program is attached.
    pub fn attach_mode(&self) -> Option<AttachMode> {
        self.steer_lock().attached().map(|(_, m)| m)
    }

    /// The steering program, to open more sockets on other queues of this interface.
    pub fn steer(&self) -> SharedSteer {
        self.steer.clone()
    }

    fn steer_lock(&self) -> std::sync::MutexGuard<'_, Steer> {
        self.steer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Socket counters, summed over the queues.
    pub fn xsk_stats(&self) -> XskStats {
        let mut t = XskStats::default();
        for x in &self.xsks {
            t.add(&x.stats());
        }
        t
    }

    /// Sends one frame as given on the first queue (for diagnostics and tests: malformed or
    /// foreign frames). Returns false if no TX frame was free.
    pub fn send_raw(&mut self, frame: &[u8]) -> bool {
        self.send_raw_on(0, frame)
    }

    /// Like [`XdpTransport::send_raw`], on the `i`-th of [`XdpTransport::queues`].
    pub fn send_raw_on(&mut self, i: usize, frame: &[u8]) -> bool {
        let xsk = &mut self.xsks[i];
        let ok = xsk
            .tx()
            .send_with(frame.len(), |b| b.copy_from_slice(frame));
        xsk.flush();
        ok
    }

    /// Receives frames on every queue without the engine (for diagnostics and tests); returns
    /// how many.
    pub fn recv_raw(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        for xsk in &mut self.xsks {
            n += xsk.recv(|frame, _| f(frame));
            xsk.flush();
        }
        n
    }

    /// Steering program counters.
    pub fn steer_counters(&self) -> Result<SteerCounters, SteerError> {
        self.steer_lock().counters()
    }
}

/// Sends each frame on the socket of its page's shard.
struct ShardedTx<'a> {
    xsks: &'a mut [Xsk],
}

impl FrameSink for ShardedTx<'_> {
    fn send(&mut self, ep: &Endpoints, header: &BbRepr, payload: &[u8]) -> bool {
        let n = self.xsks.len();
        let i = if n == 1 {
            0
        } else {
            queue_for(ep.dst, header.request_id, n)
        };
        self.xsks[i].tx().send(ep, header, payload)
    }
}

/// The index (of `n` queues) a request to `dst` leaves on: its page's shard, or for a host
/// operation (no page) one picked by its request id, which a retransmission keeps (so it
/// reaches the same shard, whose session recognises it).
pub fn queue_for(dst: Ipv6Addr, request_id: u64, n: usize) -> usize {
    let o = dst.octets();
    let handle = PageHandle::from_bits(u64::from_be_bytes(o[6..14].try_into().expect("8 bytes")));
    // Slot and sequence both: a client making one call at a time reuses one slot, and its
    // sequence walks the queues.
    handle
        .shard(n)
        .unwrap_or(((request_id ^ request_id >> SESSION_SLOT_BITS) % n as u64) as usize)
}

impl Transport for XdpTransport {
    fn transmit(&mut self, engine: &mut Engine, now: Instant) {
        engine.transmit(
            now,
            &mut ShardedTx {
                xsks: &mut self.xsks,
            },
        );
        for xsk in &mut self.xsks {
            xsk.flush();
        }
    }

    fn receive(&mut self, engine: &mut Engine, now: Instant) -> usize {
        let mut n = 0;
        for xsk in &mut self.xsks {
            n += xsk.recv_summed(|frame, sum, _| engine.handle_frame_summed(frame, sum, now));
            if xsk.tx_in_flight() > 0 {
                xsk.flush();
            }
        }
        n
    }

    fn poll_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.xsks.iter().map(|x| x.as_fd()).collect()
    }
}
