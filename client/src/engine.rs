//! The sans-IO request engine: request ids, retransmission, reassembly of segmented replies,
//! matching replies to requests. It knows nothing of sockets or clocks: time comes in as
//! `Instant`s, frames go out through a [`FrameSink`] and come in as byte slices, so it is
//! tested deterministically over a simulated lossy link.

use std::collections::VecDeque;
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use bluebridge_proto::frame::{Endpoints, Frame, FrameSink};
use bluebridge_proto::segment::{Reassembly, SegmentError};
use bluebridge_proto::{
    BbRepr, HeaderFlags, HostId, MacAddr, NetPrefix, OpFlags, Opcode, PAGE_SIZE, RemoteAddr,
    SESSION_SLOT_BITS, SESSION_SLOTS, Status, UDP_PORT,
};

use crate::error::ClientError;
use crate::pending::{Deadlines, Slab};

/// The padding of INLINE READs.
static ZEROS: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// How an engine talks.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The deployment's prefix.
    pub prefix: NetPrefix,
    /// This client's address (inside its host's /48).
    pub local: Ipv6Addr,
    /// This client's UDP port.
    pub local_port: u16,
    /// This client's MAC.
    pub local_mac: MacAddr,
    /// The next hop's MAC: the server on a direct link, the switch in a rack.
    pub next_hop_mac: MacAddr,
    /// The least time before the first retransmission, and the time used until a round trip
    /// has been measured. Past that the timeout follows the measured round trips (RFC 6298:
    /// smoothed RTT + 4 × its variation, at most 64× this), so queueing under load does not
    /// trigger spurious retransmissions; it doubles with every retry (up to 16×).
    pub rto: Duration,
    /// Retransmissions before a request fails with [`ClientError::Timeout`].
    pub retries: u32,
    /// The longest wait before a retransmission, backoff included (`None`: 16 × the current
    /// timeout). A client that must notice quickly when a failed-over page answers again
    /// (docs/switch.md "Replication") caps it.
    pub max_rto: Option<Duration>,
    /// Most page bytes per reply frame this client can take (0 = any).
    pub seg_max: u16,
    /// Most page bytes this client puts in one request frame.
    pub max_request_data: u16,
    /// READs of a whole page or of a short range ([`bluebridge_proto::inline_range`]) go
    /// INLINE (docs/protocol.md §6.1): padded to the reply's size, so a server with a hot-page
    /// store can answer them in XDP. Only when a whole page fits one request frame
    /// (`max_request_data` ≥ 4096); set by the transports for such links.
    pub inline_reads: bool,
}

impl EngineConfig {
    /// Defaults: RTO 1 ms, 8 retries, whole pages in one frame.
    pub fn new(
        prefix: NetPrefix,
        local: Ipv6Addr,
        local_mac: MacAddr,
        next_hop_mac: MacAddr,
    ) -> Self {
        EngineConfig {
            prefix,
            local,
            local_port: 40000,
            local_mac,
            next_hop_mac,
            rto: Duration::from_millis(1),
            retries: 8,
            max_rto: None,
            seg_max: 0,
            max_request_data: PAGE_SIZE as u16,
            inline_reads: false,
        }
    }
}

/// A request to send.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The operation.
    pub op: Opcode,
    /// The page (or host) it is for; its opcode byte is replaced by `op`.
    pub target: Option<RemoteAddr>,
    /// Header flags (SHARED, MORE).
    pub flags: HeaderFlags,
    /// Count (bulk operations; 1 otherwise).
    pub count: u16,
    /// Range offset.
    pub offset: u16,
    /// Range length.
    pub length: u16,
    /// Lease id.
    pub lease: u64,
    /// operand0.
    pub operand0: u64,
    /// operand1.
    pub operand1: u64,
    /// Payload (page bytes, handle list, write entries).
    pub payload: Vec<u8>,
    /// A value of the caller's, returned with the completion.
    pub tag: u64,
    /// Fail with [`ClientError::Timeout`] this long after the first transmission even if
    /// retries are left (a health check that must end within its round); `None`: only the
    /// retry budget ends it.
    pub timeout: Option<Duration>,
    /// A READ whose reply, arriving whole in one frame, is offered to the engine's
    /// [`PageSink`] straight from the receive buffer (no copy); the sink took it if its
    /// completion's data is empty.
    pub direct: bool,
}

/// Takes a READ's bytes straight from the frame they arrived in (`tag`: the request's tag);
/// returns whether it took them (if not, the engine copies them into the reply as usual).
pub type PageSink = Box<dyn FnMut(u64, &[u8]) -> bool + Send>;

impl Request {
    /// A request of `op` to `target` with count 1.
    pub fn new(op: Opcode, target: RemoteAddr) -> Self {
        Request {
            op,
            target: Some(target),
            count: 1,
            ..Request::default()
        }
    }

    /// With a range.
    #[must_use]
    pub fn range(mut self, offset: u16, length: u16) -> Self {
        self.offset = offset;
        self.length = length;
        self
    }

    /// With a payload.
    #[must_use]
    pub fn payload(mut self, p: Vec<u8>) -> Self {
        self.payload = p;
        self
    }

    /// With a tag.
    #[must_use]
    pub fn tag(mut self, tag: u64) -> Self {
        self.tag = tag;
        self
    }

    /// Offered to the engine's [`PageSink`] when its reply arrives whole in one frame.
    #[must_use]
    pub fn direct(mut self) -> Self {
        self.direct = true;
        self
    }

    /// Failing with a timeout `t` after its first transmission at the latest.
    #[must_use]
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }
}

/// One item of a READ_BULK reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The item's page address (the frames' source).
    pub src: Option<RemoteAddr>,
    /// Its status.
    pub status: Status,
    /// Its bytes (the requested range) when OK.
    pub data: Vec<u8>,
}

/// A successful reply.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Source address of the (first) reply frame: for ALLOC the new page.
    pub src: RemoteAddr,
    /// Header of the (first) reply frame.
    pub header: BbRepr,
    /// READ/ACQUIRE: the range's bytes; otherwise the reply's payload.
    pub data: Vec<u8>,
    /// READ_BULK: the items.
    pub items: Vec<Item>,
}

/// A finished request.
#[derive(Debug, Clone)]
pub struct Completion {
    /// Its id (as [`Engine::submit`] returned it; not the request id on the wire).
    pub id: u64,
    /// The caller's tag.
    pub tag: u64,
    /// The outcome.
    pub result: Result<Reply, ClientError>,
    /// Transmissions after the first.
    pub retransmits: u32,
    /// From first transmission to completion.
    pub latency: Duration,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineStats {
    /// Requests submitted.
    pub submitted: u64,
    /// Frames sent (first transmissions).
    pub sent: u64,
    /// Retransmissions.
    pub retransmits: u64,
    /// Requests that timed out.
    pub timeouts: u64,
    /// Reply frames matched to a request.
    pub replies: u64,
    /// Reply frames that matched nothing outstanding (late duplicates).
    pub stray: u64,
    /// Frames that did not parse, or replies that broke the protocol.
    pub malformed: u64,
    /// MOVED answers that led to a retry.
    pub moved_retries: u64,
    /// Pages the controller reported freed (INVALIDATE notices).
    pub invalidations: u64,
    /// Keep-alive PINGs the engine sent on its own ([`Engine::keep_alive`]; not in
    /// `submitted`, in `sent`).
    pub keepalives: u64,
    /// REVOKE notices received from homes (§5.18), kept for [`Engine::take_revoke`].
    pub revokes: u64,
    /// REVOKE notices dropped because [`REVOKES_MAX`] were waiting (the home sends them again
    /// while its requester keeps asking).
    pub revokes_dropped: u64,
    /// READY notices received (§5.18: a hint to ask again now; its arrival wakes a handler
    /// waiting in `poll`, nothing more is done with it).
    pub ready: u64,
    /// READ replies a [`PageSink`] took straight from the receive buffer.
    pub direct: u64,
    /// READs sent INLINE ([`EngineConfig::inline_reads`]).
    pub inline_sent: u64,
    /// READ replies that came back INLINE: answered by the server's XDP program from its
    /// hot-page store.
    pub inline_served: u64,
    /// Frames the transport could not hand to the kernel
    /// ([`Transport::tx_dropped`](crate::transport::Transport::tx_dropped); kernel
    /// UDP: `sendmmsg` failed): filled in by [`Client::stats`](crate::Client::stats), 0 from
    /// [`Engine::stats`].
    pub tx_dropped: u64,
}

/// A REVOKE notice (§5.18): the home of `page` wants the copies of generation `generation`
/// back; the holder may keep `keep` ([`bluebridge_proto::message::KEEP_NONE`] or `KEEP_READ`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoke {
    /// The page (opcode and flags cleared).
    pub page: RemoteAddr,
    /// The generation of the copies revoked.
    pub generation: u64,
    /// What the holder may keep.
    pub keep: u64,
}

/// REVOKE notices kept waiting for [`Engine::take_revoke`], at most.
pub const REVOKES_MAX: usize = 4096;

/// Data buffers kept for reuse, at most.
const BUFFER_POOL: usize = 256;

/// Pages remembered as freed, at most (the oldest are forgotten first).
const INVALIDATED_MAX: usize = 1 << 16;
/// How long the engine lets a host it allocated pages on go without a request before it
/// pings it, so the server keeps hearing from it (docs/protocol.md §5.17; servers wait at
/// least 2 s, 5 minutes by default).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How often [`Engine::keep_alive`] looks at the hosts.
const KEEPALIVE_CHECK: Duration = Duration::from_millis(250);

/// A host this engine allocated pages on.
#[derive(Debug, Clone, Copy)]
struct HeldHost {
    host: HostId,
    /// When a request last went to it.
    last_sent: Instant,
    /// A keep-alive to it is on its way.
    pinging: bool,
}

/// A page's identity: its address without opcode and flags.
fn page_key(a: RemoteAddr) -> [u8; 14] {
    let o = a.to_ipv6().octets();
    o[..14].try_into().expect("14 bytes")
}

#[expect(
    clippy::large_enum_variant,
    reason = "requests live in the engine's slab, allocated once; boxing the reassembly state would allocate per READ"
)]
enum Collect {
    /// One reply frame completes the request.
    Single,
    /// A page range, reassembled from segments.
    Range {
        reasm: Reassembly,
        data: Vec<u8>,
        first: Option<(RemoteAddr, BbRepr)>,
    },
    /// READ_BULK: one range per item.
    Bulk {
        items: Vec<(Option<Reassembly>, Item)>,
        left: usize,
        first: Option<(RemoteAddr, BbRepr)>,
    },
}

struct Pending {
    req: Request,
    /// The request id on the wire: the session slot in the low bits, that slot's sequence
    /// above (`None` until a slot is free for it).
    wire_id: Option<u64>,
    /// Whether it waits in a send queue.
    queued: bool,
    target: RemoteAddr,
    first_sent: Option<Instant>,
    deadline: Instant,
    tries: u32,
    /// A server answered MOVED: the retry waits an RTO, and running out of tries is `Moved`.
    moved: bool,
    /// A keep-alive the engine sent on its own: it completes without a [`Completion`].
    internal: bool,
    collect: Collect,
}

/// One session slot: the request using it (0: free) and the sequence its next use gets.
#[derive(Debug, Clone, Copy)]
struct Slot {
    ticket: u64,
    seq: u64,
}

/// The engine.
///
/// Request ids on the wire follow the server's session slots (docs/protocol.md §8): a request
/// takes a free slot of [`SESSION_SLOTS`] when it is first sent and keeps it until it completes
/// or fails, and every use of a slot carries a higher sequence number, so a server can tell a
/// retransmission from a new request exactly. At most [`SESSION_SLOTS`] requests are on the
/// wire at once; more wait in order for a slot.
pub struct Engine {
    cfg: EngineConfig,
    pending: Slab<Pending>,
    deadlines: Deadlines,
    /// Requests to send the first time (they need a slot), and retransmissions (they have one).
    queue: VecDeque<u64>,
    retx: VecDeque<u64>,
    /// Data buffers handed back with [`Engine::recycle`], reused for the next reads.
    buffers: Vec<Vec<u8>>,
    slots: Vec<Slot>,
    free_slots: Vec<u16>,
    done: VecDeque<Completion>,
    stats: EngineStats,
    /// Smoothed round-trip time and its variation, from requests answered at the first try.
    srtt: Option<Duration>,
    rttvar: Duration,
    /// Pages the controller reported freed, and their order (to forget the oldest).
    invalidated: std::collections::HashSet<[u8; 14]>,
    invalidated_order: VecDeque<[u8; 14]>,
    /// Hosts this engine allocated pages on (kept alive with PINGs).
    held_hosts: Vec<HeldHost>,
    next_keepalive: Option<Instant>,
    /// Keep-alives in `pending`.
    internal_pending: usize,
    /// REVOKE notices not yet taken.
    revokes: VecDeque<Revoke>,
    /// Where [`Request::direct`] replies go.
    sink: Option<PageSink>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("in_flight", &self.pending.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine. Slot sequences start at the wall clock in microseconds, so a restarted
    /// client on the same address and port continues above its predecessor's (a slot is used
    /// at most once per round trip, far less than once a microsecond) and its first requests
    /// are new to the server, never taken for old retransmissions.
    pub fn new(cfg: EngineConfig) -> Self {
        let seq0 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64
            & (u64::MAX >> SESSION_SLOT_BITS);
        Engine {
            cfg,
            pending: Slab::with_capacity(1024),
            deadlines: Deadlines::default(),
            queue: VecDeque::with_capacity(1024),
            retx: VecDeque::with_capacity(SESSION_SLOTS),
            buffers: Vec::with_capacity(BUFFER_POOL),
            slots: vec![
                Slot {
                    ticket: 0,
                    seq: seq0
                };
                SESSION_SLOTS
            ],
            free_slots: (0..SESSION_SLOTS as u16).rev().collect(),
            done: VecDeque::with_capacity(1024),
            stats: EngineStats::default(),
            srtt: None,
            rttvar: Duration::ZERO,
            invalidated: std::collections::HashSet::new(),
            invalidated_order: VecDeque::new(),
            held_hosts: Vec::new(),
            next_keepalive: None,
            internal_pending: 0,
            revokes: VecDeque::new(),
            sink: None,
        }
    }

    /// The oldest REVOKE notice not yet taken (a coherent region's handler answers them).
    pub fn take_revoke(&mut self) -> Option<Revoke> {
        self.revokes.pop_front()
    }

    /// Whether the controller reported `page` freed (requests for it fail with
    /// [`ClientError::Invalidated`] without being sent).
    pub fn is_invalidated(&self, page: RemoteAddr) -> bool {
        self.invalidated.contains(&page_key(page))
    }

    /// An INVALIDATE notice: remember the page, fail what is waiting for it.
    fn invalidate(&mut self, page: RemoteAddr, now: Instant) {
        let key = page_key(page);
        self.stats.invalidations += 1;
        if self.invalidated.insert(key) {
            self.invalidated_order.push_back(key);
            if self.invalidated_order.len() > INVALIDATED_MAX
                && let Some(old) = self.invalidated_order.pop_front()
            {
                self.invalidated.remove(&old);
            }
        }
        // A FREE of the page is what set the notice off (ours or another client's): it finishes
        // as the server answers it, not as invalidated.
        let gone: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                !p.req.op.is_host_op()
                    && !matches!(p.req.op, Opcode::FREE | Opcode::FREE_BULK)
                    && page_key(p.target) == key
            })
            .map(|(id, _)| id)
            .collect();
        for id in gone {
            let p = self.finish(id);
            self.fail(
                id,
                p.req.tag,
                p.first_sent,
                p.tries,
                ClientError::Invalidated,
                now,
            );
        }
    }

    /// Removes a finished request and frees its slot (its queue entries are skipped later).
    fn finish(&mut self, id: u64) -> Pending {
        let p = self.pending.remove(id).expect("present");
        if p.internal {
            self.internal_pending -= 1;
            if let Some(h) = self.held_host(p.target.host_id()) {
                h.pinging = false;
            }
        }
        if let Some(w) = p.wire_id {
            let i = (w % SESSION_SLOTS as u64) as usize;
            let slot = &mut self.slots[i];
            debug_assert_eq!(slot.ticket, id);
            slot.ticket = 0;
            slot.seq += 1;
            self.free_slots.push(i as u16);
        }
        p
    }

    /// The request a reply's wire id names, if it is still waiting.
    fn ticket_of(&self, wire_id: u64) -> Option<u64> {
        let slot = self.slots[(wire_id % SESSION_SLOTS as u64) as usize];
        let p = self.pending.get(slot.ticket)?;
        (slot.ticket != 0 && p.wire_id == Some(wire_id)).then_some(slot.ticket)
    }

    /// Caps the wait before a retransmission (see [`EngineConfig::max_rto`]).
    pub fn set_max_rto(&mut self, max: Option<Duration>) {
        self.cfg.max_rto = max;
    }

    /// Turns INLINE READs on or off (see [`EngineConfig::inline_reads`]; on has effect only
    /// where a page fits one request frame).
    pub fn set_inline_reads(&mut self, on: bool) {
        self.cfg.inline_reads = on;
    }

    /// The current retransmission timeout (before any backoff).
    pub fn rto(&self) -> Duration {
        match self.srtt {
            None => self.cfg.rto,
            Some(srtt) => (srtt + 4 * self.rttvar).clamp(self.cfg.rto, self.cfg.rto * 64),
        }
    }

    /// Takes one round-trip sample (RFC 6298 §2; Karn: only from requests sent once).
    fn sample_rtt(&mut self, r: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(srtt) => {
                self.rttvar = (self.rttvar * 3 + srtt.abs_diff(r)) / 4;
                self.srtt = Some((srtt * 7 + r) / 8);
            }
        }
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Requests submitted and not completed (keep-alives not counted).
    pub fn in_flight(&self) -> usize {
        self.pending.len() - self.internal_pending
    }

    /// Hosts this engine allocated pages on: the ones [`Engine::keep_alive`] pings.
    pub fn held_hosts(&self) -> impl Iterator<Item = HostId> + '_ {
        self.held_hosts.iter().map(|h| h.host)
    }

    fn held_host(&mut self, host: HostId) -> Option<&mut HeldHost> {
        self.held_hosts.iter_mut().find(|h| h.host == host)
    }

    /// Queues a PING to every host this engine allocated pages on that has had no request
    /// from it for [`KEEPALIVE_INTERVAL`] (one at a time per host), so servers keep hearing
    /// from it while it holds pages (a server frees the pages of an owner it has not heard
    /// from for its grace period, §5.17). Their replies produce no [`Completion`] and their
    /// failures no error; a busy client sends none.
    pub fn keep_alive(&mut self, now: Instant) {
        if self.held_hosts.is_empty() || self.next_keepalive.is_some_and(|t| now < t) {
            return;
        }
        self.next_keepalive = Some(now + KEEPALIVE_CHECK);
        for i in 0..self.held_hosts.len() {
            let h = self.held_hosts[i];
            if h.pinging || now.saturating_duration_since(h.last_sent) < KEEPALIVE_INTERVAL {
                continue;
            }
            let target = RemoteAddr::host_op(self.cfg.prefix, h.host, Opcode::PING);
            let id = self.submit(Request::new(Opcode::PING, target), now);
            self.stats.submitted -= 1;
            if let Some(p) = self.pending.get_mut(id) {
                p.internal = true;
                self.internal_pending += 1;
                self.stats.keepalives += 1;
                self.held_hosts[i].pinging = true;
            }
        }
    }

    /// Keeps `host` hearing from this engine from now on: called for the host of every
    /// allocation's reply, and for pages another client allocated and this one uses (e.g. a
    /// region attached to).
    pub fn hold(&mut self, host: HostId, now: Instant) {
        if !host.is_any() && self.held_host(host).is_none() {
            self.held_hosts.push(HeldHost {
                host,
                last_sent: now,
                pinging: false,
            });
            self.next_keepalive.get_or_insert(now + KEEPALIVE_CHECK);
        }
    }

    /// Sets where [`Request::direct`] replies go (`None`: nowhere; they are copied).
    pub fn set_page_sink(&mut self, sink: Option<PageSink>) {
        self.sink = sink;
    }

    /// Hands back a reply's data buffer (a READ's bytes) once read, so the next read fills it
    /// instead of allocating a new one.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.buffers.len() < BUFFER_POOL && buf.capacity() >= PAGE_SIZE {
            buf.clear();
            self.buffers.push(buf);
        }
    }

    /// A zeroed buffer of `len` bytes (at most a page), from the pool if it has one.
    fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut b = self
            .buffers
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(PAGE_SIZE));
        b.resize(len, 0);
        b
    }

    /// Queues a request; it leaves at the next [`Engine::transmit`]. Returns its id.
    pub fn submit(&mut self, req: Request, now: Instant) -> u64 {
        self.stats.submitted += 1;
        let Some(target) = req.target else {
            let id = self.pending.spare_ticket();
            self.fail(
                id,
                req.tag,
                None,
                0,
                ClientError::Invalid("no target address"),
                now,
            );
            return id;
        };
        if let Err(e) = self.check(&req) {
            let id = self.pending.spare_ticket();
            self.fail(id, req.tag, None, 0, e, now);
            return id;
        }
        if !req.op.is_host_op() && self.invalidated.contains(&page_key(target)) {
            let id = self.pending.spare_ticket();
            self.fail(id, req.tag, None, 0, ClientError::Invalidated, now);
            return id;
        }
        if !self.held_hosts.is_empty()
            && let Some(h) = self.held_host(target.host_id())
        {
            h.last_sent = now; // the server hears from us anyway
        }
        let collect = match req.op {
            Opcode::READ
            | Opcode::UPDATE_ACQUIRE
            | Opcode::MIGRATE_OUT
            | Opcode::GET_SHARED
            | Opcode::GET_EXCLUSIVE
                if req.length > 0 =>
            {
                Collect::Range {
                    reasm: Reassembly::new(req.offset, req.length).expect("checked"),
                    data: self.buffer(usize::from(req.length)),
                    first: None,
                }
            }
            Opcode::READ_BULK => {
                let items = (0..req.count)
                    .map(|_| {
                        let r = Reassembly::new(req.offset, req.length).expect("checked");
                        (
                            Some(r),
                            Item {
                                src: None,
                                status: Status::OK,
                                data: vec![0u8; usize::from(req.length)],
                            },
                        )
                    })
                    .collect();
                Collect::Bulk {
                    items,
                    left: usize::from(req.count),
                    first: None,
                }
            }
            _ => Collect::Single,
        };
        let target = target.with_op(req.op, OpFlags::NONE);
        let mut req = req;
        if self.inline(&req) {
            req.flags = req.flags | HeaderFlags::INLINE;
            self.stats.inline_sent += 1;
        }
        let id = self.pending.insert(Pending {
            req,
            wire_id: None,
            queued: true,
            target,
            first_sent: None,
            deadline: now,
            tries: 0,
            moved: false,
            internal: false,
            collect,
        });
        self.queue.push_back(id);
        id
    }

    /// Whether `req` goes INLINE: a READ of a whole page or of a short range (what the
    /// reference server answers in place), on a link where a page fits one frame.
    fn inline(&self, req: &Request) -> bool {
        self.cfg.inline_reads
            && req.op == Opcode::READ
            && bluebridge_proto::inline_range(req.offset, req.length)
            && usize::from(self.cfg.max_request_data) >= PAGE_SIZE
    }

    /// Refuses only what cannot be framed or reassembled; everything else is the server's to
    /// judge (its answer comes back as a typed error).
    fn check(&self, req: &Request) -> Result<(), ClientError> {
        let end = usize::from(req.offset) + usize::from(req.length);
        let collects = matches!(
            req.op,
            Opcode::READ
                | Opcode::READ_BULK
                | Opcode::UPDATE_ACQUIRE
                | Opcode::GET_SHARED
                | Opcode::GET_EXCLUSIVE
        );
        if collects && end > PAGE_SIZE {
            return Err(ClientError::Invalid("range past the end of the page"));
        }
        if matches!(
            req.op,
            Opcode::READ | Opcode::READ_BULK | Opcode::GET_SHARED | Opcode::GET_EXCLUSIVE
        ) && req.length == 0
        {
            return Err(ClientError::Invalid("empty read"));
        }
        if req.op.request_carries_data()
            && req.payload.len() > usize::from(self.cfg.max_request_data)
        {
            return Err(ClientError::Invalid(
                "payload larger than one request frame",
            ));
        }
        if req.op == Opcode::READ_BULK && req.count == 0 {
            return Err(ClientError::Invalid("bulk read of no pages"));
        }
        Ok(())
    }

    fn fail(
        &mut self,
        id: u64,
        tag: u64,
        sent: Option<Instant>,
        tries: u32,
        e: ClientError,
        now: Instant,
    ) {
        let latency = sent
            .map(|s| now.saturating_duration_since(s))
            .unwrap_or_default();
        self.done.push_back(Completion {
            id,
            tag,
            result: Err(e),
            retransmits: tries.saturating_sub(1),
            latency,
        });
    }

    /// Sends queued requests (retransmissions first, then new ones while session slots are
    /// free) until the sink is full.
    pub fn transmit(&mut self, now: Instant, sink: &mut impl FrameSink) {
        let rto = self.rto();
        loop {
            let (id, retry) = if let Some(&id) = self.retx.front() {
                (id, true)
            } else if let Some(&id) = self.queue.front() {
                (id, false)
            } else {
                break;
            };
            let queue = if retry {
                &mut self.retx
            } else {
                &mut self.queue
            };
            let Some(p) = self.pending.get_mut(id).filter(|p| p.queued) else {
                queue.pop_front(); // finished while queued
                continue;
            };
            let wire_id = match p.wire_id {
                Some(w) => w,
                None => {
                    let Some(slot) = self.free_slots.pop() else {
                        break; // every slot is on the wire: wait for a completion
                    };
                    let s = &mut self.slots[usize::from(slot)];
                    s.ticket = id;
                    let w = s.seq << SESSION_SLOT_BITS | u64::from(slot);
                    p.wire_id = Some(w);
                    w
                }
            };
            let h = BbRepr {
                flags: if p.tries > 0 {
                    p.req.flags | HeaderFlags::RETRY
                } else {
                    p.req.flags
                },
                status: Status::OK,
                item: 0,
                count: p.req.count,
                request_id: wire_id,
                offset: p.req.offset,
                length: p.req.length,
                seg_max: self.cfg.seg_max,
                lease: p.req.lease,
                operand0: p.req.operand0,
                operand1: p.req.operand1,
            };
            let ep = Endpoints {
                src_mac: self.cfg.local_mac,
                dst_mac: self.cfg.next_hop_mac,
                src: self.cfg.local,
                dst: p.target.to_ipv6(),
                src_port: self.cfg.local_port,
                dst_port: UDP_PORT,
            };
            // An INLINE READ is padded with zeros to its reply's size (§6.1).
            let payload = if p.req.op == Opcode::READ && p.req.flags.contains(HeaderFlags::INLINE) {
                &ZEROS[..usize::from(p.req.length)]
            } else {
                &p.req.payload[..]
            };
            if !sink.send(&ep, &h, payload) {
                break;
            }
            queue.pop_front();
            p.queued = false;
            if p.tries > 0 {
                self.stats.retransmits += 1;
            } else {
                self.stats.sent += 1;
                p.first_sent = Some(now);
            }
            p.tries += 1;
            let backoff = 1u32 << (p.tries - 1).min(4);
            let wait = match self.cfg.max_rto {
                Some(max) => (rto * backoff).min(max),
                None => rto * backoff,
            };
            p.deadline = now + wait;
            if let (Some(t), Some(first)) = (p.req.timeout, p.first_sent) {
                p.deadline = p.deadline.min(first + t);
            }
            self.deadlines.push(p.deadline, id);
            if p.req.op == Opcode::WRITE_BLIND {
                let p = self.finish(id);
                self.done.push_back(Completion {
                    id,
                    tag: p.req.tag,
                    result: Ok(Reply {
                        src: p.target,
                        header: h,
                        data: Vec::new(),
                        items: Vec::new(),
                    }),
                    retransmits: 0,
                    latency: Duration::ZERO,
                });
            }
        }
    }

    /// The earliest retransmission deadline, if any request is waiting for a reply (a heap's
    /// top: no scan; possibly a deadline since made stale, never later than the real one).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.earliest()
    }

    /// Whether a noted deadline is still the request's own.
    fn deadline_holds(pending: &Slab<Pending>, at: Instant, id: u64) -> bool {
        pending
            .get(id)
            .is_some_and(|p| p.tries > 0 && p.deadline == at)
    }

    /// Retransmits requests whose deadline has passed, or fails them once the retry budget is
    /// spent.
    pub fn handle_timeouts(&mut self, now: Instant) {
        while let Some((at, id)) = self.deadlines.pop_due(now) {
            if !Self::deadline_holds(&self.pending, at, id) {
                continue; // answered since, or its deadline moved
            }
            let p = self.pending.get_mut(id).expect("deadline_holds");
            let out_of_time = p
                .req
                .timeout
                .zip(p.first_sent)
                .is_some_and(|(t, first)| now >= first + t);
            if p.tries > self.cfg.retries || out_of_time {
                let p = self.finish(id);
                if p.internal {
                    continue; // a keep-alive: the next one goes out in a second
                }
                let e = if p.moved {
                    ClientError::Moved
                } else {
                    self.stats.timeouts += 1;
                    ClientError::Timeout { tries: p.tries }
                };
                self.fail(id, p.req.tag, p.first_sent, p.tries, e, now);
            } else if !p.queued {
                // Not sendable again until queued; the deadline moves when it is sent.
                p.deadline = now + self.cfg.rto * 64;
                p.queued = true;
                self.deadlines.push(p.deadline, id);
                self.retx.push_back(id);
            }
        }
        let pending = &self.pending;
        self.deadlines
            .trim(|at, id| Self::deadline_holds(pending, at, id));
    }

    /// Takes one received frame.
    pub fn handle_frame(&mut self, buf: &[u8], now: Instant) {
        self.handle_frame_summed(buf, None, now);
    }

    /// Like [`Engine::handle_frame`], with the sum of the frame's bytes from the UDP header on
    /// already taken (see [`Frame::parse_summed`]).
    pub fn handle_frame_summed(
        &mut self,
        buf: &[u8],
        tail_sum: Option<&bluebridge_proto::checksum::Checksum>,
        now: Instant,
    ) {
        match Frame::parse_summed(buf, tail_sum) {
            Ok(f) => self.handle_reply(&f, now),
            Err(_) => self.stats.malformed += 1,
        }
    }

    /// Takes one BlueBridge message a kernel UDP socket received (`ep`: from where, to whom;
    /// MACs unused).
    pub fn handle_datagram(&mut self, ep: Endpoints, data: &[u8], now: Instant) {
        match Frame::from_message(ep, data) {
            Ok(f) => self.handle_reply(&f, now),
            Err(_) => self.stats.malformed += 1,
        }
    }

    /// Takes one parsed reply (from a frame, or a kernel socket's datagram).
    pub fn handle_reply(&mut self, f: &Frame<'_>, now: Instant) {
        let h = f.header;
        if !h.is_reply() {
            self.stats.malformed += 1;
            return;
        }
        let Ok(src) = RemoteAddr::from_ipv6(f.endpoints.src, self.cfg.prefix) else {
            self.stats.malformed += 1;
            return;
        };
        if src.opcode() == Opcode::INVALIDATE
            && src.host_id() == HostId::CONTROLLER
            && h.request_id == 0
        {
            let page = <[u8; 16]>::try_from(f.payload)
                .ok()
                .and_then(|b| RemoteAddr::from_ipv6(b.into(), self.cfg.prefix).ok());
            match page {
                Some(p) => self.invalidate(p, now),
                None => self.stats.malformed += 1,
            }
            return;
        }
        if src.opcode() == Opcode::READY && h.request_id == 0 {
            self.stats.ready += 1;
            return;
        }
        if src.opcode() == Opcode::REVOKE && h.request_id == 0 {
            // From the page's own address: only its home can send it (the switch filters
            // sources), so no notice can name another host's page.
            if !h.status.is_ok() || !f.payload.is_empty() || src.handle().is_none() {
                self.stats.malformed += 1;
                return;
            }
            self.stats.revokes += 1;
            if self.revokes.len() >= REVOKES_MAX {
                self.stats.revokes_dropped += 1;
                return;
            }
            self.revokes.push_back(Revoke {
                page: src.with_op(Opcode(0), OpFlags::NONE),
                generation: h.lease,
                keep: h.operand0,
            });
            return;
        }
        let Some(id) = self.ticket_of(h.request_id) else {
            self.stats.stray += 1;
            return;
        };
        let p = self.pending.get_mut(id).expect("ticket_of found it");
        if p.tries == 0 {
            // A reply to a request not yet (re)sent: an old duplicate of a reused id.
            self.stats.stray += 1;
            return;
        }
        // Replies come from the host asked (any host for an anycast ALLOC).
        if src.host_id() != p.target.host_id() && !p.target.host_id().is_any() {
            self.stats.malformed += 1;
            return;
        }
        self.stats.replies += 1;
        if h.flags.contains(HeaderFlags::INLINE) {
            self.stats.inline_served += 1;
        }
        if h.status == Status::MOVED {
            // The route is changing: ask the same address again (a retransmission, counted
            // against the budget) after an RTO that doubles with every try, up to 32× (or
            // `max_rto`), so a route that takes longer than the budget of plain RTOs to follow
            // a migration (Open vSwitch ~20 ms, a BGP fabric ~170 ms) is still waited for.
            self.stats.moved_retries += 1;
            p.moved = true;
            let wait = self.cfg.rto * (1u32 << p.tries.saturating_sub(1).min(5));
            p.deadline = now + self.cfg.max_rto.map_or(wait, |m| wait.min(m));
            self.deadlines.push(p.deadline, id);
            return;
        }
        let finished = match &mut p.collect {
            Collect::Single => Some(Ok(Reply {
                src,
                header: h,
                data: f.payload.to_vec(),
                items: Vec::new(),
            })),
            Collect::Range { reasm, data, first } => {
                if !h.status.is_ok() {
                    Some(Err(ClientError::from_status(h.status)))
                } else if h.length == 0 && p.req.op == Opcode::GET_EXCLUSIVE {
                    // An upgrade of a current read copy: granted without bytes (§5.18).
                    data.clear();
                    Some(Ok(Reply {
                        src,
                        header: h,
                        data: std::mem::take(data),
                        items: Vec::new(),
                    }))
                } else if p.req.direct
                    && first.is_none()
                    && h.offset == p.req.offset
                    && f.payload.len() == usize::from(p.req.length)
                    && self
                        .sink
                        .as_mut()
                        .is_some_and(|sink| sink(p.req.tag, f.payload))
                {
                    // The whole range in one frame, taken where it lies; its buffer goes back.
                    self.stats.direct += 1;
                    if self.buffers.len() < BUFFER_POOL {
                        let mut b = std::mem::take(data);
                        b.clear();
                        self.buffers.push(b);
                    }
                    Some(Ok(Reply {
                        src,
                        header: h,
                        data: Vec::new(),
                        items: Vec::new(),
                    }))
                } else {
                    match take_segment(reasm, data, p.req.offset, &h, f.payload) {
                        Ok(()) => {
                            first.get_or_insert((src, h));
                            reasm.is_complete().then(|| {
                                let (src, header) = first.expect("set above");
                                Ok(Reply {
                                    src,
                                    header,
                                    data: std::mem::take(data),
                                    items: Vec::new(),
                                })
                            })
                        }
                        Err(SegmentError::Duplicate { .. }) => None,
                        Err(_) => {
                            self.stats.malformed += 1;
                            None
                        }
                    }
                }
            }
            Collect::Bulk { items, left, first } => {
                first.get_or_insert((src, h));
                match items.get_mut(usize::from(h.item)) {
                    None => {
                        self.stats.malformed += 1;
                        None
                    }
                    Some((reasm, item)) => {
                        let Some(r) = reasm else { return }; // item already complete
                        item.src = Some(src);
                        let complete = if !h.status.is_ok() {
                            item.status = h.status;
                            item.data.clear();
                            true
                        } else {
                            match take_segment(r, &mut item.data, p.req.offset, &h, f.payload) {
                                Ok(()) => r.is_complete(),
                                Err(SegmentError::Duplicate { .. }) => false,
                                Err(_) => {
                                    self.stats.malformed += 1;
                                    false
                                }
                            }
                        };
                        if complete {
                            *reasm = None;
                            *left -= 1;
                        }
                        (*left == 0).then(|| {
                            let (src, header) = first.expect("set above");
                            let items = items.drain(..).map(|(_, i)| i).collect();
                            Ok(Reply {
                                src,
                                header,
                                data: Vec::new(),
                                items,
                            })
                        })
                    }
                }
            }
        };
        let Some(result) = finished else { return };
        let p = self.finish(id);
        if p.internal {
            return;
        }
        if let Ok(r) = &result
            && r.header.status.is_ok()
            && matches!(
                p.req.op,
                Opcode::ALLOC | Opcode::ALLOC_WRITE | Opcode::ALLOC_BULK
            )
        {
            self.hold(r.src.host_id(), now);
        }
        let result = match result {
            Ok(r) if !r.header.status.is_ok() && p.req.op != Opcode::READ_BULK => {
                Err(ClientError::from_status(r.header.status))
            }
            other => other,
        };
        let latency = p
            .first_sent
            .map(|s| now.saturating_duration_since(s))
            .unwrap_or_default();
        if p.tries == 1 {
            self.sample_rtt(latency);
        }
        self.done.push_back(Completion {
            id,
            tag: p.req.tag,
            result,
            retransmits: p.tries - 1,
            latency,
        });
    }

    /// The next finished request.
    pub fn poll_completion(&mut self) -> Option<Completion> {
        self.done.pop_front()
    }
}

/// Accepts one segment of a range into `data` (which holds the range starting at `base`).
fn take_segment(
    reasm: &mut Reassembly,
    data: &mut [u8],
    base: u16,
    h: &BbRepr,
    payload: &[u8],
) -> Result<(), SegmentError> {
    if payload.len() != usize::from(h.length) {
        return Err(SegmentError::LengthMismatch {
            declared: h.length,
            carried: payload.len(),
        });
    }
    reasm.accept(h.offset, h.length)?;
    let at = usize::from(h.offset - base);
    data[at..at + payload.len()].copy_from_slice(payload);
    Ok(())
}
