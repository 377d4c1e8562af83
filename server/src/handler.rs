//! Request handling as pure code: a frame (or a BlueBridge message from a kernel socket) and
//! the time go in, reply frames come out through a [`FrameSink`]. No sockets, no clocks, no
//! allocation per request: every table is sized when the handler is made (the table of pages
//! migrated here grows with migrations, which the controller drives, not clients).

use std::collections::HashMap;
use std::sync::Arc;

use bluebridge_proto::frame::{Endpoints, Envelope, Frame, FrameError, FrameSink};
use bluebridge_proto::message::{
    Body, HandleList, Request, StatRecord, WriteEntries, put_bulk_statuses, put_handles,
};
use bluebridge_proto::segment::Segments;
use bluebridge_proto::{
    BbRepr, HeaderFlags, HostId, NetPrefix, OpFlags, Opcode, PageHandle, RemoteAddr, Status,
};

use crate::access::{Access, ClientPrefix};
use crate::coherence::{DEFAULT_COPY_LEASE_MS, Directory};
use crate::lease::{ClientKey, Leases};
use crate::liveness::Liveness;
use crate::session::{BULK_PAYLOAD_MAX, Lookup, SessionConfig, Sessions, StoredReply};
use crate::stats::{HostCounters, ReplCounter, ShardCounters, Stats};
use crate::store::{PageIdx, Store};

mod copies;
mod owners;
mod replicate;

pub use owners::DEFAULT_GRACE_MS;

/// Sends one reply and counts it.
fn send(
    stats: &ShardCounters,
    sink: &mut impl FrameSink,
    ep: &Endpoints,
    h: &BbRepr,
    payload: &[u8],
) -> bool {
    stats.count_reply(h.status);
    let ok = sink.send(ep, h, payload);
    if !ok {
        stats.tx_dropped.inc();
    }
    ok
}

/// The largest frame [`Handler::handle_parts`] copies together (a jumbo MTU of 9000 plus the
/// Ethernet header).
const JOINED_MAX: usize = 9014;

/// How a handler is set up.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    /// The deployment's network prefix.
    pub prefix: NetPrefix,
    /// This server's host id.
    pub host: HostId,
    /// Most page bytes one reply frame carries (from the MTU and framing mode).
    pub max_reply_data: u16,
    /// Shards of the server (this handler is the one its store belongs to).
    pub shards: usize,
    /// The session table for at-most-once execution.
    pub sessions: SessionConfig,
    /// Leases that may be held at once (≤ 65535).
    pub lease_capacity: u16,
    /// Lease time when a client asks for none, ms.
    pub lease_default_ms: u64,
    /// Longest lease granted, ms.
    pub lease_max_ms: u64,
    /// Client prefixes allowed to use the server (empty: anyone).
    pub allowed_clients: Vec<ClientPrefix>,
    /// Distinct client addresses that may own pages.
    pub max_owners: usize,
    /// How long an owner may stay silent before [`Handler::housekeep`] frees its pages
    /// (except shared and detached ones), ms; 0: never.
    pub orphan_grace_ms: u64,
    /// When each client address was last heard: one table for every shard of a server (the
    /// handlers of one server share it through clones of this configuration).
    pub liveness: Arc<Liveness>,
    /// How long a coherent copy lasts without renewal (§5.18), ms.
    pub copy_lease_ms: u64,
    /// The controller's replication orders, shared by the handlers of one server (§5.19).
    pub replication: Arc<crate::replication::Shared>,
    /// Most bytes of records one replication frame carries (from the MTU).
    pub max_frame_data: u16,
}

impl HandlerConfig {
    /// Defaults for a server of `host` under `prefix`.
    pub fn new(prefix: NetPrefix, host: HostId, max_reply_data: u16) -> Self {
        HandlerConfig {
            prefix,
            host,
            max_reply_data,
            shards: 1,
            sessions: SessionConfig::DEFAULT,
            lease_capacity: u16::MAX,
            lease_default_ms: 1_000,
            lease_max_ms: 60_000,
            allowed_clients: Vec::new(),
            max_owners: 1 << 16,
            orphan_grace_ms: DEFAULT_GRACE_MS,
            // As for the lease-id key (lease.rs): no entropy, no server.
            liveness: Arc::new(Liveness::random().expect("random bytes for the liveness key")),
            copy_lease_ms: DEFAULT_COPY_LEASE_MS,
            replication: Arc::default(),
            max_frame_data: max_reply_data,
        }
    }
}

/// The outcome of a non-idempotent operation: what the reply says and what the session table
/// remembers.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    status: Status,
    handle: PageHandle,
    lease: u64,
    operand0: u64,
    count: u16,
    payload_len: usize,
}

impl Outcome {
    fn status(status: Status, handle: PageHandle) -> Self {
        Outcome {
            status,
            handle,
            lease: 0,
            operand0: 0,
            count: 1,
            payload_len: 0,
        }
    }
}

/// The request handler of one shard: its store, leases, sessions, owners and counters. Only its
/// worker's thread touches it.
#[derive(Debug)]
pub struct Handler {
    cfg: HandlerConfig,
    shard: usize,
    store: Store,
    leases: Leases,
    sessions: Sessions,
    access: Access,
    counters: Arc<HostCounters>,
    scratch: [u8; BULK_PAYLOAD_MAX],
    /// Where a frame that arrived in pieces is copied together when it must be.
    joined: Vec<u8>,
    /// Pages migrated here from other hosts: (original host, original handle) → local handle.
    adopted: HashMap<(u16, u64), PageHandle>,
    /// The host the request being handled is addressed to (ours, or an adopted page's).
    addressed: HostId,
    /// Where the reclamation of silent owners' pages stands.
    sweep: owners::Sweep,
    /// Who holds coherent copies of which page (§5.18).
    directory: Directory,
    /// A READY notice due after the reply being sent (a PUT cleared a waiter's way).
    ready: Option<(RemoteAddr, u64)>,
    /// This shard's replication stream to its backup (§5.19).
    outbox: Option<Box<crate::replication::Outbox>>,
    /// A stream the controller stopped, until the replies it held have gone.
    orphaned: Option<Box<crate::replication::Outbox>>,
    /// When the hot-page store's hits are next turned into liveness stamps.
    hot_next_ns: u64,
    /// Twins of other servers' shards this shard keeps as their backup.
    replicas: Vec<crate::replication::Replica>,
    /// The version of the orders last acted on.
    orders_seen: u64,
    /// No request that changes state has run yet: a stream can start from scratch.
    pristine: bool,
}

impl Handler {
    /// A handler over `store`, counting into counters of its own.
    pub fn new(cfg: HandlerConfig, store: Store) -> Self {
        let counters = Arc::new(HostCounters::new(cfg.shards.max(store.shard() + 1)));
        Self::with_counters(cfg, store, counters)
    }

    /// The handler of `store`'s shard, counting into that shard's entry of `counters` (which
    /// the STAT reply sums over every shard).
    pub fn with_counters(cfg: HandlerConfig, store: Store, counters: Arc<HostCounters>) -> Self {
        let leases = Leases::new(cfg.lease_capacity, cfg.lease_default_ms, cfg.lease_max_ms);
        Self::build(cfg, store, counters, leases)
    }

    fn build(
        cfg: HandlerConfig,
        store: Store,
        counters: Arc<HostCounters>,
        leases: Leases,
    ) -> Self {
        let shard = store.shard();
        assert!(shard < counters.len(), "counters for shard {shard}");
        let c = counters.shard(shard);
        c.pages_total.set(u64::from(store.pages_total()));
        c.pages_used.set(u64::from(store.pages_used()));
        Handler {
            leases,
            sessions: Sessions::new(cfg.sessions),
            access: Access::new(cfg.allowed_clients.clone(), cfg.max_owners),
            directory: Directory::new(store.pages_total() as usize, cfg.copy_lease_ms),
            ready: None,
            shard,
            cfg,
            store,
            counters,
            scratch: [0; BULK_PAYLOAD_MAX],
            joined: vec![0; JOINED_MAX],
            adopted: HashMap::new(),
            addressed: HostId(0),
            sweep: owners::Sweep::default(),
            outbox: None,
            orphaned: None,
            hot_next_ns: 0,
            replicas: Vec::new(),
            orders_seen: 0,
            pristine: true,
        }
    }

    /// This shard's counters.
    fn c(&self) -> &ShardCounters {
        self.counters.shard(self.shard)
    }

    /// A snapshot of this shard's counters.
    pub fn stats(&self) -> Stats {
        self.c().snapshot()
    }

    /// The shard this handler serves.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// Whether `handle` belongs to another shard of this server (a bulk item that must be
    /// sent in a request of its own).
    fn other_shard(&self, handle: PageHandle) -> bool {
        handle
            .shard(self.cfg.shards)
            .is_some_and(|s| s != self.shard)
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Bytes of server memory besides the arena: page metadata, leases, sessions, owners.
    pub fn overhead_bytes(&self) -> usize {
        self.store.meta_bytes()
            + self.leases.bytes()
            + self.sessions.bytes()
            + self.access.bytes()
            + self.directory.bytes()
            + self.cfg.liveness.bytes() / self.cfg.shards.max(1)
            + size_of::<Self>()
    }

    /// The STAT record of the whole server (every shard's counters summed) as of `now_ns`.
    pub fn stat_record(&self, now_ns: u64) -> StatRecord {
        let t = self.counters.total();
        let backup = self
            .cfg
            .replication
            .orders()
            .backups
            .get(&self.cfg.host.0)
            .copied();
        StatRecord {
            pages_total: t.pages_total,
            pages_used: t.pages_used,
            requests: t.requests,
            errors: t.errors(),
            duplicates: t.duplicates,
            malformed: t.malformed_total(),
            leases_held: t.leases_held,
            uptime_ms: now_ns / 1_000_000,
            shards: self.counters.len() as u64,
            handoffs: t.handoffs,
            zero_copy: t.zero_copy,
            stale: t.stale,
            handoff_dropped: t.handoff_dropped,
            kernel_dropped: self.counters.xsk_total().kernel_drops(),
            bad_source: t.bad_source,
            reclaimed: t.reclaimed,
            orphan_grace_ms: self.cfg.orphan_grace_ms,
            copy_lease_ms: self.directory.lease_ms(),
            copy_grants: t.copy_grants,
            revokes: t.revokes,
            recalling: t.recalling,
            backup: backup.map_or(0, |b| u64::from(b.host.0)),
            backup_epoch: backup.map_or(0, |b| u64::from(b.epoch)),
            repl_lag_bytes: t.repl(ReplCounter::LagBytes),
            repl_held: t.repl(ReplCounter::Held),
            repl_window_full: t.repl(ReplCounter::WindowFull),
            replica_shards: self
                .cfg
                .replication
                .replica_states()
                .iter()
                .map(|s| u64::from(s.in_step))
                .sum(),
            repl_copy_left: t.repl(ReplCounter::CopyLeft),
            repl_copy_total: t.repl(ReplCounter::CopyTotal),
        }
    }

    /// Handles one Ethernet frame received at `now_ns` (nanoseconds since the server started).
    pub fn handle_frame(&mut self, buf: &[u8], now_ns: u64, sink: &mut impl FrameSink) {
        self.handle_frame_summed(buf, None, now_ns, sink);
    }

    /// Like [`Handler::handle_frame`], with the sum of the frame's bytes from the UDP header
    /// on already taken (see [`Frame::parse_summed`]).
    pub fn handle_frame_summed(
        &mut self,
        buf: &[u8],
        tail_sum: Option<&bluebridge_proto::checksum::Checksum>,
        now_ns: u64,
        sink: &mut impl FrameSink,
    ) {
        match Frame::parse_summed(buf, tail_sum) {
            Ok(f) => self.handle_message(&f, now_ns, sink),
            Err(FrameError::UnsupportedVersion(v)) => {
                let answered =
                    Envelope::parse(buf).is_ok_and(|env| self.reject_version(&env, sink));
                if !answered {
                    self.c().count_malformed(FrameError::UnsupportedVersion(v));
                }
            }
            Err(e) => self.c().count_malformed(e),
        }
    }

    /// Like [`Handler::handle_frame_summed`], for a frame received in two pieces (see
    /// [`Frame::parse_parts`]): page data is copied from where it arrived straight into the
    /// page. Anything else that came in pieces (a bulk list, an unparsable frame) is copied
    /// together first and handled as usual. `tail_sum` is the sum of `head[UDP_START..]` and
    /// `tail` (unused when `head` is shorter than that).
    pub fn handle_parts(
        &mut self,
        head: &[u8],
        tail: &[u8],
        tail_sum: &bluebridge_proto::checksum::Checksum,
        now_ns: u64,
        sink: &mut impl FrameSink,
    ) {
        if let Ok(f) = Frame::parse_parts(head, tail, tail_sum)
            && RemoteAddr::from_ipv6(f.endpoints.dst, self.cfg.prefix)
                .is_ok_and(|a| a.opcode().request_carries_data())
        {
            return self.handle_message(&f, now_ns, sink);
        }
        let n = head.len() + tail.len();
        if n > self.joined.len() {
            // Larger than any frame the link carries: malformed.
            return self
                .c()
                .count_malformed(FrameError::BadLength(bluebridge_proto::wire::Layer::Ipv6));
        }
        let mut joined = std::mem::take(&mut self.joined);
        joined[..head.len()].copy_from_slice(head);
        joined[head.len()..n].copy_from_slice(tail);
        // The sum covers the bytes from the UDP header on only if the head holds that header.
        let sum = (head.len() >= bluebridge_proto::frame::UDP_START).then_some(tail_sum);
        self.handle_frame_summed(&joined[..n], sum, now_ns, sink);
        self.joined = joined;
    }

    /// Counts a frame dropped before it reached the handler (the transports' own checks).
    pub(crate) fn count_malformed(&self, e: FrameError) {
        self.c().count_malformed(e);
    }

    /// Handles one BlueBridge message that a kernel UDP socket received (`ep` says from where
    /// and to which address; MACs are unused).
    pub fn handle_datagram(
        &mut self,
        ep: Endpoints,
        data: &[u8],
        now_ns: u64,
        sink: &mut impl FrameSink,
    ) {
        match Frame::from_message(ep, data) {
            Ok(f) => self.handle_message(&f, now_ns, sink),
            Err(FrameError::UnsupportedVersion(v)) => {
                let env = Envelope {
                    endpoints: ep,
                    hop_limit: 64,
                    udp_payload: data,
                };
                if !self.reject_version(&env, sink) {
                    self.c().count_malformed(FrameError::UnsupportedVersion(v));
                }
            }
            Err(e) => self.c().count_malformed(e),
        }
    }

    /// Answers a message of another protocol version: one version-1 header with
    /// UNSUPPORTED_VERSION and the request id (docs/protocol.md §7). Counted as a request
    /// answered with that status; `false` (nothing sent, the caller counts a drop) when it
    /// is not a request to this server. A request from a source nobody may be answered at is
    /// counted as `bad_source` (and `true` returned: it is counted).
    pub fn reject_version(&mut self, env: &Envelope<'_>, sink: &mut impl FrameSink) -> bool {
        let Some(request_id) = env.request_id_any_version() else {
            return false;
        };
        // Only answer what looks like a request to this server (its port, its /48).
        if env.endpoints.dst_port != bluebridge_proto::UDP_PORT {
            return false;
        }
        let Some(from) = self.answering_address(env.endpoints.dst) else {
            return false;
        };
        if !self.answerable_source(&env.endpoints) {
            self.c().bad_source.inc();
            return true; // counted as that, not as malformed
        }
        self.c().requests.inc();
        let h = BbRepr {
            flags: HeaderFlags::REPLY,
            status: Status::UNSUPPORTED_VERSION,
            request_id,
            ..BbRepr::default()
        };
        send(
            self.counters.shard(self.shard),
            sink,
            &env.endpoints.reply_from(from.to_ipv6()),
            &h,
            &[],
        );
        true
    }

    /// The address this server answers a request to `dst` from: `dst` itself when it is in
    /// this host's /48, this host's own address for an anycast ALLOC, `None` when the request
    /// is not this server's to answer. The op flags are reserved: replies carry 0 there
    /// whatever the request had (§1).
    fn answering_address(&self, dst: std::net::Ipv6Addr) -> Option<RemoteAddr> {
        let a = RemoteAddr::from_ipv6(dst, self.cfg.prefix).ok()?;
        let a = a.with_op(a.opcode(), OpFlags::NONE);
        let alloc = matches!(
            a.opcode(),
            Opcode::ALLOC | Opcode::ALLOC_WRITE | Opcode::ALLOC_BULK
        );
        if a.host_id() == self.cfg.host {
            Some(a)
        } else if self
            .adopted
            .contains_key(&(a.host_id().0, a.handle().to_bits()))
        {
            // A page migrated here: answered from its own (original) address.
            Some(a)
        } else if a.host_id().is_any() && alloc {
            Some(RemoteAddr::new(
                self.cfg.prefix,
                self.cfg.host,
                a.handle(),
                a.opcode(),
                a.flags(),
            ))
        } else {
            None
        }
    }

    /// Whether a reply may go to this request's source (§9): a unicast address inside the
    /// deployment prefix, not in the anycast /48 and not one of this server's own addresses
    /// (the one the request was sent to, its host address, its host-operation addresses); a
    /// client on this very host, inside its /48 (§1), is answered. From a unicast MAC (a
    /// kernel socket gives no MACs: zero). Both transports apply the same rule.
    fn answerable_source(&self, ep: &Endpoints) -> bool {
        let src = ep.src;
        if ep.src_mac.0[0] & 1 != 0
            || src.is_multicast()
            || src.is_unspecified()
            || src.is_loopback()
            || src == ep.dst
        {
            return false;
        }
        let Ok(a) = RemoteAddr::from_ipv6(src, self.cfg.prefix) else {
            return false; // outside the deployment prefix
        };
        if a.host_id().is_any() {
            return false;
        }
        let own_host_address = a.host_id() == self.cfg.host
            && a.handle().is_none()
            && (a.opcode().is_known() || (a.opcode().0, a.flags().0) == (0, 0));
        !own_host_address
    }

    fn addr(&self, handle: PageHandle, op: Opcode) -> RemoteAddr {
        RemoteAddr::new(self.cfg.prefix, self.cfg.host, handle, op, OpFlags::NONE)
    }

    fn reply_header(req: &BbRepr, status: Status) -> BbRepr {
        BbRepr {
            flags: HeaderFlags::REPLY,
            status,
            item: req.item,
            count: req.count,
            request_id: req.request_id,
            offset: req.offset,
            length: req.length,
            seg_max: 0,
            lease: 0,
            operand0: 0,
            operand1: 0,
        }
    }

    /// Handles one parsed message.
    pub fn handle_message(&mut self, f: &Frame<'_>, now_ns: u64, sink: &mut impl FrameSink) {
        if self.replication_frame(f, now_ns, sink) {
            return;
        }
        // First: is it ours? Nothing — not even an error — is answered for another host's
        // address, or a reply would claim to come from that host (unless this server took
        // that host's pages over: then its twin answers).
        let Some(from) = self.answering_address(f.endpoints.dst) else {
            if !self.taken_over_frame(f, now_ns, sink) {
                self.c().dropped_not_for_us.inc();
            }
            return;
        };
        if !f.is_reply() && !self.answerable_source(&f.endpoints) {
            // No reply may go there: it would be reflected at someone who did not ask.
            self.c().bad_source.inc();
            return;
        }
        let req = match Request::parse(f, self.cfg.prefix) {
            Ok(r) => r,
            Err(e) => {
                match e.status() {
                    None => self.c().dropped_not_for_us.inc(),
                    Some(st) => {
                        self.c().requests.inc();
                        if from.opcode() == Opcode::WRITE_BLIND {
                            self.c().count_reply(st); // counted, never answered
                            return;
                        }
                        let h = Self::reply_header(&f.header, st);
                        send(
                            self.counters.shard(self.shard),
                            sink,
                            &f.endpoints.reply_from(from.to_ipv6()),
                            &h,
                            &[],
                        );
                    }
                }
                return;
            }
        };
        let op = req.op();
        self.c().requests.inc();
        self.c().ops[usize::from(op.0)].inc();
        // Leases that ran out free their slots (and stop counting as held) before anything
        // looks at them: O(1) when none is due.
        self.leases.reclaim_expired(&mut self.store, now_ns);
        self.c().leases_held.set(self.leases.in_use());
        self.addressed = if req.target.host_id().is_any() {
            self.cfg.host
        } else {
            req.target.host_id()
        };
        let who = ClientKey {
            addr: req.endpoints.src.octets(),
            port: req.endpoints.src_port,
        };
        if !self.access.client_allowed(req.endpoints.src) {
            if op == Opcode::WRITE_BLIND {
                self.c().count_reply(Status::FORBIDDEN);
            } else {
                let h = Self::reply_header(&req.header, Status::FORBIDDEN);
                send(
                    self.counters.shard(self.shard),
                    sink,
                    &req.endpoints.reply_from(from.to_ipv6()),
                    &h,
                    &[],
                );
            }
            return;
        }
        self.cfg.liveness.heard(&who.addr, now_ns / 1_000_000);
        self.replicated(f, &req, who, now_ns, sink);
        let c = self.c();
        c.pages_used.set(u64::from(self.store.pages_used()));
        c.leases_held.set(self.leases.in_use());
    }

    /// Runs a request that passed the common checks.
    fn dispatch(
        &mut self,
        req: &Request<'_>,
        who: ClientKey,
        now_ns: u64,
        sink: &mut impl FrameSink,
    ) {
        let op = req.op();
        if op.is_idempotent() {
            self.idempotent(req, who, now_ns, sink);
        } else if op == Opcode::UPDATE_ACQUIRE {
            self.acquire(req, who, now_ns, sink);
        } else {
            self.at_most_once(req, who, now_ns, sink);
        }
    }

    /// A non-idempotent request other than UPDATE_ACQUIRE: run once, its reply kept in the
    /// client's session slot for retransmissions.
    fn at_most_once(
        &mut self,
        req: &Request<'_>,
        who: ClientKey,
        now_ns: u64,
        sink: &mut impl FrameSink,
    ) {
        let op = req.op();
        let bulk = matches!(op, Opcode::ALLOC_BULK | Opcode::FREE_BULK);
        let at = match self
            .sessions
            .lookup(who, req.header.request_id, bulk, now_ns)
        {
            Lookup::New(at) => at,
            Lookup::Duplicate(stored, payload) => {
                self.counters.shard(self.shard).duplicates.inc();
                let n = payload.len();
                self.scratch[..n].copy_from_slice(payload);
                let o = Outcome {
                    status: stored.status,
                    handle: stored.handle,
                    lease: stored.lease,
                    operand0: stored.operand0,
                    count: stored.count,
                    payload_len: n,
                };
                return self.reply_outcome(req, op, o, sink);
            }
            Lookup::Stale => return self.c().stale.inc(),
            Lookup::Busy => {
                let base = Self::reply_header(&req.header, Status::OK);
                return self.reply_status(req, req.target, base, Status::BUSY, sink);
            }
        };
        let o = self.execute(req, who, now_ns);
        let stored = StoredReply {
            status: o.status,
            handle: o.handle,
            lease: o.lease,
            operand0: o.operand0,
            count: o.count,
        };
        self.sessions
            .record(at, stored, &self.scratch[..o.payload_len]);
        self.reply_outcome(req, op, o, sink);
        self.send_ready(sink);
    }

    fn reply_outcome(
        &mut self,
        req: &Request<'_>,
        op: Opcode,
        o: Outcome,
        sink: &mut impl FrameSink,
    ) {
        let mut h = Self::reply_header(&req.header, o.status);
        h.lease = o.lease;
        h.operand0 = o.operand0;
        h.count = o.count;
        // The address asked answers (an adopted page's is another host's); a new page's
        // own address answers for ALLOC.
        let src = if o.handle.is_none() || o.handle == req.target.handle() {
            req.target
        } else {
            self.addr(o.handle, op)
        };
        let ep = req.endpoints.reply_from(src.to_ipv6());
        // ALLOC and ALLOC_WRITE: the one handle is the payload as well as the source address.
        let mut one = [0u8; 8];
        let payload: &[u8] =
            if matches!(op, Opcode::ALLOC | Opcode::ALLOC_WRITE) && o.status.is_ok() {
                put_handles(&mut one, [o.handle]);
                &one
            } else {
                &self.scratch[..o.payload_len]
            };
        send(self.counters.shard(self.shard), sink, &ep, &h, payload);
    }

    /// Sends the frames of a page range (READ, READ_BULK items, UPDATE_ACQUIRE) with header `h`
    /// from `src`. Returns false if the sink ran out of room.
    fn send_range(
        &mut self,
        req: &Request<'_>,
        p: PageIdx,
        src: RemoteAddr,
        mut h: BbRepr,
        sink: &mut impl FrameSink,
    ) -> bool {
        let ep = req.endpoints.reply_from(src.to_ipv6());
        let (offset, length) = (req.header.offset, req.header.length);
        if length == 0 {
            h.offset = offset;
            h.length = 0;
            return send(self.counters.shard(self.shard), sink, &ep, &h, &[]);
        }
        let max = match req.header.seg_max {
            0 => self.cfg.max_reply_data,
            m => m.min(self.cfg.max_reply_data),
        };
        let page = self.store.page(p);
        for (o, l) in Segments::new(offset, length, max) {
            h.offset = o;
            h.length = l;
            let data = &page[usize::from(o)..usize::from(o) + usize::from(l)];
            if !send(self.counters.shard(self.shard), sink, &ep, &h, data) {
                return false;
            }
        }
        true
    }

    /// An INLINE READ XDP could have answered reached the worker: XDP did not have the page,
    /// so it goes into the hot-page store (if this shard has one). Not while the shard
    /// replicates: a READ must not show what its backup may not hold yet (§5.19), and XDP
    /// cannot wait.
    fn maybe_promote(&mut self, req: &Request<'_>, p: PageIdx) {
        let h = &req.header;
        // Only what XDP answers: a whole page or a short range, in one reply frame.
        if !h.flags.contains(HeaderFlags::INLINE)
            || !bluebridge_proto::inline_range(h.offset, h.length)
            || (h.seg_max != 0 && h.seg_max < h.length)
            || !self.store.has_hot()
            || self.outbox.is_some()
            || self.orphaned.is_some()
        {
            return;
        }
        let Some(owner) = self.access.owner_addr(self.store.owner(p)) else {
            return;
        };
        let key = bluebridge_ebpf::hot_key(&req.target.to_ipv6());
        self.store.promote_hot(p, key, owner);
    }

    /// Sends a one-frame reply without payload: an error, or the OK of a WRITE.
    fn reply_status(
        &mut self,
        req: &Request<'_>,
        src: RemoteAddr,
        h: BbRepr,
        st: Status,
        sink: &mut impl FrameSink,
    ) {
        let h = BbRepr {
            status: st,
            lease: 0,
            operand0: 0,
            ..h
        };
        send(
            self.counters.shard(self.shard),
            sink,
            &req.endpoints.reply_from(src.to_ipv6()),
            &h,
            &[],
        );
    }

    /// Operations that may run twice: executed every time, nothing remembered.
    fn idempotent(
        &mut self,
        req: &Request<'_>,
        who: ClientKey,
        now_ns: u64,
        sink: &mut impl FrameSink,
    ) {
        let op = req.op();
        let base = Self::reply_header(&req.header, Status::OK);
        let target = req.target;
        match op {
            Opcode::PING => {
                let h = BbRepr {
                    operand0: req.header.operand0,
                    operand1: req.header.operand1,
                    ..base
                };
                send(
                    self.counters.shard(self.shard),
                    sink,
                    &req.endpoints.reply_from(target.to_ipv6()),
                    &h,
                    &[],
                );
            }
            Opcode::STAT => {
                let mut rec = [0u8; StatRecord::LEN];
                self.stat_record(now_ns).emit(&mut rec);
                send(
                    self.counters.shard(self.shard),
                    sink,
                    &req.endpoints.reply_from(target.to_ipv6()),
                    &base,
                    &rec,
                );
            }
            Opcode::READ => match self.page_for(target.handle(), who) {
                Ok(p) => {
                    self.send_range(req, p, target, base, sink);
                    self.maybe_promote(req, p);
                }
                Err(st) => self.reply_status(req, target, base, st, sink),
            },
            Opcode::READ_BULK => {
                let Body::Handles(list) = req.body else {
                    return;
                };
                for (i, handle) in list.iter().enumerate() {
                    let src = target.with_handle(handle);
                    let h = BbRepr {
                        item: i as u16,
                        ..base
                    };
                    if self.other_shard(handle) {
                        self.reply_status(req, src, h, Status::OTHER_SHARD, sink);
                        continue;
                    }
                    match self.page_for(handle, who) {
                        Ok(p) => {
                            if !self.send_range(req, p, src, h, sink) {
                                return;
                            }
                        }
                        Err(st) => self.reply_status(req, src, h, st, sink),
                    }
                }
            }
            Opcode::WRITE | Opcode::WRITE_BLIND => {
                let Body::Data(data) = req.body else { return };
                let r = self.page_for(target.handle(), who).and_then(|p| {
                    self.leases.check_writer(&self.store, p, who, now_ns)?;
                    self.check_no_copies(p, now_ns)?;
                    let o = usize::from(req.header.offset);
                    data.copy_to(&mut self.store.page_mut(p)[o..o + data.len()]);
                    Ok(())
                });
                let st = r.err().unwrap_or(Status::OK);
                if op == Opcode::WRITE_BLIND {
                    self.c().count_reply(st); // counted, never answered
                } else {
                    self.reply_status(req, target, base, st, sink);
                }
            }
            Opcode::WRITE_BULK => {
                let Body::Writes(entries) = req.body else {
                    return;
                };
                let n = self.write_bulk(entries, who, now_ns);
                let h = BbRepr {
                    count: entries.len() as u16,
                    ..base
                };
                let ep = req.endpoints.reply_from(target.to_ipv6());
                send(
                    self.counters.shard(self.shard),
                    sink,
                    &ep,
                    &h,
                    &self.scratch[..n],
                );
            }
            Opcode::SHARE | Opcode::DETACH => {
                let r = self.page_for(target.handle(), who).map(|p| {
                    if op == Opcode::SHARE {
                        self.store.share(p)
                    } else {
                        self.store.detach(p)
                    }
                });
                let st = r.err().unwrap_or(Status::OK);
                self.reply_status(req, target, base, st, sink);
            }
            Opcode::MIGRATE_OUT => self.migrate_out(req, now_ns, sink),
            Opcode::GET_SHARED | Opcode::GET_EXCLUSIVE => self.get_copy(req, who, now_ns, sink),
            Opcode::RENEW => self.renew_copies(req, who, now_ns, sink),
            Opcode::OWNERS => self.list_owners(req, now_ns, sink),
            Opcode::BACKUP | Opcode::REPLICA | Opcode::PROMOTE => self.order(req, now_ns, sink),
            _ => unreachable!("{op:?} is not idempotent"),
        }
    }

    /// UPDATE_ACQUIRE, executed at most once: a retransmission (same client and request id)
    /// gets the same lease and the page's current bytes while that lease lives; once it is
    /// gone (committed, released, expired) only a stray duplicate can be asking, and it gets
    /// LEASE_EXPIRED rather than a second lease nobody would commit.
    fn acquire(
        &mut self,
        req: &Request<'_>,
        who: ClientKey,
        now_ns: u64,
        sink: &mut impl FrameSink,
    ) {
        let target = req.target;
        let base = Self::reply_header(&req.header, Status::OK);
        let granted = match self
            .sessions
            .lookup(who, req.header.request_id, false, now_ns)
        {
            Lookup::Stale => return self.c().stale.inc(),
            Lookup::Busy => return self.reply_status(req, target, base, Status::BUSY, sink),
            Lookup::Duplicate(stored, _) => {
                self.c().duplicates.inc();
                if !stored.status.is_ok() {
                    Err(stored.status)
                } else {
                    self.page_for(target.handle(), who).and_then(|p| {
                        self.leases
                            .check(&self.store, p, stored.lease, who, now_ns)
                            .map_err(|_| Status::LEASE_EXPIRED)?;
                        Ok((p, stored.lease, stored.operand0))
                    })
                }
            }
            Lookup::New(at) => {
                let r = self.page_for(target.handle(), who).and_then(|p| {
                    self.check_no_copies(p, now_ns)?;
                    let g = self.leases.acquire(
                        &mut self.store,
                        p,
                        who,
                        req.header.request_id,
                        req.header.operand0,
                        now_ns,
                    )?;
                    Ok((p, g.id, g.ms))
                });
                let (status, lease, operand0) = match r {
                    Ok((_, id, ms)) => (Status::OK, id, ms),
                    Err(st) => (st, 0, 0),
                };
                let stored = StoredReply {
                    status,
                    handle: target.handle(),
                    lease,
                    operand0,
                    count: 1,
                };
                self.sessions.record(at, stored, &[]);
                r
            }
        };
        match granted {
            Ok((p, lease, ms)) => {
                let h = BbRepr {
                    lease,
                    operand0: ms,
                    ..base
                };
                self.send_range(req, p, target, h, sink);
            }
            Err(st) => self.reply_status(req, target, base, st, sink),
        }
    }

    fn write_bulk(&mut self, entries: WriteEntries<'_>, who: ClientKey, now_ns: u64) -> usize {
        let mut statuses = [Status::OK; bluebridge_proto::MAX_BULK as usize];
        for (i, e) in entries.iter().enumerate() {
            if self.other_shard(e.handle) {
                statuses[i] = Status::OTHER_SHARD;
                continue;
            }
            let r = e
                .check()
                .and_then(|()| self.page_for(e.handle, who))
                .and_then(|p| {
                    self.leases.check_writer(&self.store, p, who, now_ns)?;
                    self.check_no_copies(p, now_ns)?;
                    let o = usize::from(e.offset);
                    self.store.page_mut(p)[o..o + e.data.len()].copy_from_slice(e.data);
                    Ok(())
                });
            statuses[i] = r.err().unwrap_or(Status::OK);
        }
        put_bulk_statuses(&mut self.scratch, statuses[..entries.len()].iter().copied())
    }

    /// Non-idempotent operations: run once; the outcome is remembered by the caller.
    fn execute(&mut self, req: &Request<'_>, who: ClientKey, now_ns: u64) -> Outcome {
        let h = &req.header;
        let target = req.target.handle();
        let shared = h.flags.contains(HeaderFlags::SHARED);
        if matches!(
            req.op(),
            Opcode::ALLOC | Opcode::ALLOC_WRITE | Opcode::ALLOC_BULK
        ) {
            return match self.access.owner_id(who.addr) {
                Ok(owner) => {
                    let o = self.allocate(req, owner, shared);
                    let n = if o.status.is_ok() { o.count } else { 0 };
                    self.access.pages_added(owner, u64::from(n));
                    o
                }
                Err(st) => Outcome {
                    count: 0,
                    ..Outcome::status(st, PageHandle::NONE)
                },
            };
        }
        match req.op() {
            Opcode::UPDATE_COMMIT => {
                let r = self.page_for(target, who).and_then(|p| {
                    self.leases.check(&self.store, p, h.lease, who, now_ns)?;
                    let o = usize::from(h.offset);
                    if h.flags.contains(HeaderFlags::MORE) {
                        // Held aside until the final frame: the commit is one transaction.
                        if let Body::Data(data) = req.body {
                            self.leases.stage(&self.store, p, o, &data)?;
                        }
                        return Ok(());
                    }
                    self.leases.apply_staged(&mut self.store, p);
                    if let Body::Data(data) = req.body {
                        data.copy_to(&mut self.store.page_mut(p)[o..o + data.len()]);
                    }
                    self.leases.release(&mut self.store, p);
                    Ok(())
                });
                Outcome::status(r.err().unwrap_or(Status::OK), target)
            }
            Opcode::UPDATE_RELEASE => {
                let r = self.page_for(target, who).and_then(|p| {
                    self.leases.check(&self.store, p, h.lease, who, now_ns)?;
                    self.leases.release(&mut self.store, p);
                    Ok(())
                });
                Outcome::status(r.err().unwrap_or(Status::OK), target)
            }
            Opcode::FREE => Outcome::status(self.free(target, who, now_ns), target),
            Opcode::PUT => self.put_copy(req, who, now_ns),
            Opcode::MIGRATE_IN => Outcome::status(self.migrate_in(req, now_ns), PageHandle::NONE),
            Opcode::RECLAIM => self.reclaim_owner(req),
            Opcode::FREE_BULK => {
                let Body::Handles(list) = req.body else {
                    unreachable!("validated")
                };
                let n = self.free_bulk(list, who, now_ns);
                Outcome {
                    count: list.len() as u16,
                    payload_len: n,
                    ..Outcome::status(Status::OK, target)
                }
            }
            Opcode::CAS | Opcode::FETCH_ADD => {
                let r = self.page_for(target, who).and_then(|p| {
                    self.leases.check_writer(&self.store, p, who, now_ns)?;
                    self.check_no_copies(p, now_ns)?;
                    let o = usize::from(h.offset);
                    let word: &mut [u8; 8] = (&mut self.store.page_mut(p)[o..o + 8])
                        .try_into()
                        .expect("8 bytes");
                    let old = u64::from_le_bytes(*word);
                    let new = if req.op() == Opcode::CAS {
                        if old == h.operand0 { h.operand1 } else { old }
                    } else {
                        old.wrapping_add(h.operand0)
                    };
                    *word = new.to_le_bytes();
                    Ok(old)
                });
                match r {
                    Ok(old) => Outcome {
                        operand0: old,
                        ..Outcome::status(Status::OK, target)
                    },
                    Err(st) => Outcome::status(st, target),
                }
            }
            op => unreachable!("{op:?} is idempotent"),
        }
    }

    /// ALLOC, ALLOC_WRITE, ALLOC_BULK for `owner`.
    fn allocate(&mut self, req: &Request<'_>, owner: u32, shared: bool) -> Outcome {
        let h = &req.header;
        match req.op() {
            Opcode::ALLOC => match self.store.alloc(owner, shared) {
                Ok((_, handle)) => Outcome::status(Status::OK, handle),
                Err(st) => Outcome::status(st, PageHandle::NONE),
            },
            Opcode::ALLOC_WRITE => {
                let Body::Data(data) = req.body else {
                    unreachable!("validated")
                };
                match self.store.alloc(owner, shared) {
                    Ok((p, handle)) => {
                        let o = usize::from(h.offset);
                        data.copy_to(&mut self.store.page_mut(p)[o..o + data.len()]);
                        Outcome::status(Status::OK, handle)
                    }
                    Err(st) => Outcome::status(st, PageHandle::NONE),
                }
            }
            Opcode::ALLOC_BULK => {
                let n = h.count;
                if !self.store.can_alloc(u32::from(n)) {
                    return Outcome {
                        count: 0,
                        ..Outcome::status(Status::OUT_OF_MEMORY, PageHandle::NONE)
                    };
                }
                let mut handles = [PageHandle::NONE; bluebridge_proto::MAX_BULK as usize];
                for slot in &mut handles[..usize::from(n)] {
                    *slot = self
                        .store
                        .alloc(owner, shared)
                        .expect("checked can_alloc")
                        .1;
                }
                let len = put_handles(&mut self.scratch, handles[..usize::from(n)].iter().copied());
                Outcome {
                    count: n,
                    payload_len: len,
                    ..Outcome::status(Status::OK, handles[0])
                }
            }
            op => unreachable!("{op:?} allocates nothing"),
        }
    }

    /// The slot `handle` names on the host the request is addressed to (ours, or an adopted
    /// page's original host), moved or not.
    fn resolve_addressed(&self, handle: PageHandle) -> Result<PageIdx, Status> {
        self.resolve_original(self.addressed.0, handle)
    }

    /// The slot of the page whose original host and handle are `host` and `handle`: one of
    /// ours, or one adopted here; moved or not.
    fn resolve_original(&self, host: u16, handle: PageHandle) -> Result<PageIdx, Status> {
        let local = if host == self.cfg.host.0 {
            handle
        } else {
            *self
                .adopted
                .get(&(host, handle.to_bits()))
                .ok_or(Status::INVALID_HANDLE)?
        };
        self.store.resolve(local)
    }

    /// The live page `handle` names, if `who` may use it; MOVED once it migrated away.
    fn page_for(&self, handle: PageHandle, who: ClientKey) -> Result<PageIdx, Status> {
        let p = self.resolve_addressed(handle)?;
        if self.store.is_moved(p) {
            return Err(Status::MOVED);
        }
        self.access.check(&self.store, p, who.addr)?;
        Ok(p)
    }

    fn free(&mut self, handle: PageHandle, who: ClientKey, now_ns: u64) -> Status {
        let r = self.page_for(handle, who).and_then(|p| {
            self.leases.check_writer(&self.store, p, who, now_ns)?;
            self.check_no_copies(p, now_ns)?;
            self.free_page(p);
            Ok(())
        });
        // An adopted page keeps its entry: its local handle is stale now, so later requests get
        // STALE_HANDLE rather than silence.
        r.err().unwrap_or(Status::OK)
    }

    /// Frees a live page: its lease (if any) ends, it is zeroed, its handle goes stale, and
    /// its owner holds one page fewer.
    fn free_page(&mut self, p: PageIdx) {
        self.leases.release(&mut self.store, p);
        self.directory.reset(p);
        let owner = self.store.owner(p);
        self.store.free(p);
        self.access.page_freed(owner);
    }

    /// Whether the request comes from the controller's /48 (the switch lets no one else use
    /// those sources).
    fn sent_by_controller(&self, req: &Request<'_>) -> bool {
        let c = self.cfg.prefix.host_network(HostId::CONTROLLER).octets();
        req.endpoints.src.octets()[..6] == c[..6]
    }

    /// MIGRATE_OUT: freeze the page (MOVED from now on) and send it with its owner and flags.
    /// Sent to the page's address, or to this host's address naming the page by its original
    /// host (`count`) and handle (`lease`): the form a controller uses while a fabric's routes
    /// may still lead the page's address to a former, frozen holder (§5.14).
    fn migrate_out(&mut self, req: &Request<'_>, now_ns: u64, sink: &mut impl FrameSink) {
        let target = req.target;
        let base = Self::reply_header(&req.header, Status::OK);
        if !self.sent_by_controller(req) {
            return self.reply_status(req, target, base, Status::FORBIDDEN, sink);
        }
        let (page, p) = if target.handle().is_none() {
            let h = &req.header;
            let original = PageHandle::from_bits(h.lease);
            let page = RemoteAddr::new(
                self.cfg.prefix,
                HostId(h.count),
                original,
                Opcode::MIGRATE_OUT,
                OpFlags::NONE,
            );
            (page, self.resolve_original(h.count, original))
        } else {
            (target, self.resolve_addressed(target.handle()))
        };
        let p = match p {
            Ok(p) => p,
            Err(st) => return self.reply_status(req, target, base, st, sink),
        };
        if self.store.lease_slot(p) != 0 || self.revoke_for_migration(page, p, now_ns, sink) {
            // Someone is mid-update, or holds a copy (told to give it up): the controller tries
            // again later.
            return self.reply_status(req, target, base, Status::LEASE_HELD, sink);
        }
        self.store.mark_moved(p);
        self.directory.migrated_out(p);
        let owner = self
            .access
            .owner_addr(self.store.owner(p))
            .unwrap_or([0; 16]);
        let mut h = base;
        h.set_operand_addr(owner);
        if self.store.is_shared(p) {
            h.flags = h.flags.with(HeaderFlags::SHARED);
        }
        self.send_range(req, p, target, h, sink);
    }

    /// MIGRATE_IN: adopt a page migrating here (or take back one of ours that comes home).
    fn migrate_in(&mut self, req: &Request<'_>, now_ns: u64) -> Status {
        if !self.sent_by_controller(req) {
            return Status::FORBIDDEN;
        }
        let h = &req.header;
        let Body::Data(data) = req.body else {
            return Status::MALFORMED;
        };
        let key = (h.count, h.lease);
        if h.count == self.cfg.host.0 {
            // One of ours, back from elsewhere: the slot kept answering MOVED until now.
            return match self.store.resolve(PageHandle::from_bits(h.lease)) {
                Ok(p) => {
                    data.copy_to(self.store.page_mut(p));
                    self.store.unmark_moved(p);
                    self.directory.restart(p, now_ns);
                    Status::OK
                }
                Err(st) => st,
            };
        }
        if let Some(&local) = self.adopted.get(&key) {
            // Here before (it moved on and comes back, or a retransmission from a session
            // reclaimed since): take the data and answer for it again.
            if let Ok(p) = self.store.resolve(local) {
                data.copy_to(self.store.page_mut(p));
                self.store.unmark_moved(p);
                self.directory.restart(p, now_ns);
            }
            return Status::OK;
        }
        let owner = match self.access.owner_id(h.operand_addr()) {
            Ok(o) => o,
            Err(st) => return st,
        };
        let r = self
            .store
            .alloc(owner, h.flags.contains(HeaderFlags::SHARED));
        self.access.pages_added(owner, u64::from(r.is_ok()));
        match r {
            Ok((p, local)) => {
                data.copy_to(self.store.page_mut(p));
                self.directory.restart(p, now_ns);
                // Its owner keeps its home host alive, not this one (§5.17).
                self.store.detach(p);
                self.adopted.insert(key, local);
                Status::OK
            }
            Err(st) => st,
        }
    }

    fn free_bulk(&mut self, list: HandleList<'_>, who: ClientKey, now_ns: u64) -> usize {
        let mut statuses = [Status::OK; bluebridge_proto::MAX_BULK as usize];
        for (i, handle) in list.iter().enumerate() {
            statuses[i] = if self.other_shard(handle) {
                Status::OTHER_SHARD
            } else {
                self.free(handle, who, now_ns)
            };
        }
        put_bulk_statuses(&mut self.scratch, statuses[..list.len()].iter().copied())
    }
}
