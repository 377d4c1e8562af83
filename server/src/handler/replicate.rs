//! Replication at the handler (docs/protocol.md §5.19): the stream a shard sends its backup,
//! the replicas a shard keeps for other hosts, and the controller's orders.

use bluebridge_proto::frame::{Frame, FrameSink};
use bluebridge_proto::replication::{Init, MAX_ALLOWED, Record};
use bluebridge_proto::{BbRepr, HeaderFlags, HostId, Opcode, RemoteAddr, Request, Status};

use super::{Handler, HandlerConfig, send};
use crate::access::{AccessState, ClientPrefix};
use crate::coherence::DirectoryState;
use crate::lease::Leases;
use crate::lease::LeasesState;
use crate::replication::{Accept, Applied, Capture, Outbox, Replica, Target};
use crate::session::SessionConfig;
use crate::session::SessionsState;
use crate::stats::ReplCounter;
use crate::store::StoreState;
use crate::store::{PageIdx, Store, StoreError};

/// A shard's state but its pages' bytes: what a SNAPSHOT record carries (postcard).
#[derive(serde::Serialize, serde::Deserialize)]
struct ShardState {
    store: StoreState,
    leases: LeasesState,
    sessions: SessionsState,
    access: AccessState,
    directory: DirectoryState,
    adopted: std::collections::HashMap<(u16, u64), bluebridge_proto::PageHandle>,
}

impl Handler {
    /// The shard's state but its pages' bytes, encoded for a SNAPSHOT record.
    fn snapshot(&self) -> Vec<u8> {
        let s = ShardState {
            store: self.store.state(),
            leases: self.leases.state(),
            sessions: self.sessions.state(),
            access: self.access.state(),
            directory: self.directory.state(),
            adopted: self.adopted.clone(),
        };
        postcard::to_allocvec(&s).expect("encoding into memory")
    }

    /// Takes a SNAPSHOT record's state (a twin's); `false` if it does not fit this shard.
    pub(crate) fn restore(&mut self, bytes: &[u8]) -> bool {
        let Ok(s) = postcard::from_bytes::<ShardState>(bytes) else {
            return false;
        };
        let ok = self.store.set_state(s.store)
            && self.leases.set_state(s.leases)
            && self.sessions.set_state(s.sessions)
            && self.directory.set_state(s.directory);
        self.access.set_state(s.access);
        self.adopted = s.adopted;
        ok
    }

    /// A PAGE record: slot `slot`'s bytes (a twin's).
    pub(crate) fn install_page(&mut self, slot: u32, bytes: &[u8]) -> bool {
        slot < self.store.pages_total() && self.store.install_page(PageIdx(slot), bytes)
    }

    /// Puts the pages a request (or a reclamation) is about to change, as they were before,
    /// into the stream ahead of its record: a copy to a new backup is under way and they had
    /// not been copied yet.
    fn flush_changed(&mut self) {
        let changed = self.store.take_changed();
        if let Some(o) = self.outbox.as_deref_mut() {
            for (slot, bytes) in &changed {
                o.append(&Record::Page {
                    slot: *slot,
                    bytes: &bytes[..],
                });
            }
        }
    }

    /// The twin of another server's shard, from the INIT record of its stream: the same
    /// configuration and keys, so it runs the stream to the same state. `base` is this
    /// server's configuration (prefix, orders, the liveness table, frame size).
    pub fn from_init(init: &Init, base: &HandlerConfig) -> Result<Handler, StoreError> {
        let store = Store::with_key(
            usize::from(init.shard),
            init.arena_bytes,
            true,
            init.handle_key,
        )?;
        let cfg = HandlerConfig {
            host: HostId(init.host),
            max_reply_data: init.max_reply_data,
            shards: usize::from(init.shards),
            sessions: SessionConfig {
                sessions: init.sessions as usize,
                idle_ms: init.session_idle_ms,
                bulk_payloads: init.bulk_payloads as usize,
                bulk_per_session: init.bulk_per_session,
                per_address: init.sessions_per_address,
            },
            lease_capacity: init.lease_capacity,
            lease_default_ms: init.lease_default_ms,
            lease_max_ms: init.lease_max_ms,
            allowed_clients: init.allowed[..usize::from(init.allowed_len)]
                .iter()
                .map(|(a, l)| ClientPrefix {
                    network: (*a).into(),
                    len: *l,
                })
                .collect(),
            max_owners: init.max_owners as usize,
            orphan_grace_ms: init.orphan_grace_ms,
            copy_lease_ms: init.copy_lease_ms,
            // A table of its own: the twin runs on the primary's clock, which is not this
            // server's (stamps from it would look ancient, or from the future, to this
            // server's own shards, and their owners silent for ever).
            liveness: std::sync::Arc::new(
                crate::liveness::Liveness::random().map_err(StoreError::Random)?,
            ),
            ..base.clone()
        };
        let leases = Leases::with_key(
            cfg.lease_capacity,
            cfg.lease_default_ms,
            cfg.lease_max_ms,
            init.lease_key,
        );
        let counters = std::sync::Arc::new(crate::stats::HostCounters::new(cfg.shards));
        Ok(Self::build(cfg, store, counters, leases))
    }

    /// The INIT record of this shard's stream: what a twin needs.
    pub fn init_record(&self) -> Init {
        let c = &self.cfg;
        let mut allowed = [([0u8; 16], 0u8); MAX_ALLOWED];
        for (slot, p) in allowed.iter_mut().zip(&c.allowed_clients) {
            *slot = (p.network.octets(), p.len);
        }
        Init {
            host: c.host.0,
            shard: self.shard as u16,
            shards: c.shards as u16,
            arena_bytes: self.store.arena_bytes(),
            max_reply_data: c.max_reply_data,
            sessions: c.sessions.sessions as u32,
            session_idle_ms: c.sessions.idle_ms,
            bulk_payloads: c.sessions.bulk_payloads as u32,
            bulk_per_session: c.sessions.bulk_per_session,
            sessions_per_address: c.sessions.per_address,
            lease_capacity: c.lease_capacity,
            lease_default_ms: c.lease_default_ms,
            lease_max_ms: c.lease_max_ms,
            max_owners: c.max_owners as u32,
            orphan_grace_ms: c.orphan_grace_ms,
            copy_lease_ms: c.copy_lease_ms,
            handle_key: self.store.key(),
            lease_key: self.leases.key(),
            allowed,
            allowed_len: c.allowed_clients.len().min(MAX_ALLOWED) as u8,
            copying: 0,
        }
    }

    /// Housekeeping of the twins that took over, each on its own clock.
    pub(super) fn housekeep_taken_over(&mut self, now_ns: u64) {
        for r in &mut self.replicas {
            if let Some((h, now)) = r.taken_over(now_ns) {
                h.housekeep(now);
            }
        }
    }

    /// A twin takes over at `now_ns`: every page owner counts as heard now.
    pub(crate) fn taken_over(&mut self, now_ns: u64) {
        let now_ms = now_ns / 1_000_000;
        for id in 1..self.access.id_limit() {
            if let Some((addr, _)) = self.access.owner(id) {
                self.cfg.liveness.heard(&addr, now_ms);
            }
        }
    }

    /// Frees page slot `slot` if it holds a page (a RECLAIM record: the primary's own
    /// reclamation).
    pub(crate) fn reclaim_slot(&mut self, slot: u32) {
        let p = PageIdx(slot);
        if self.store.owner_of_slot(p, true).is_some() {
            self.reclaim_page(p);
        }
    }

    /// Notes a page the shard reclaimed on its own in its stream.
    pub(super) fn log_reclaim(&mut self, p: PageIdx, now_ns: u64) {
        self.flush_changed();
        if let Some(o) = self.outbox.as_deref_mut() {
            o.append(&Record::Reclaim { now_ns, slot: p.0 });
        }
    }

    /// Replication's own frames: the stream (a backup's part) and its acknowledgements (a
    /// primary's). Returns false for anything else.
    pub(super) fn replication_frame(
        &mut self,
        f: &Frame<'_>,
        now_ns: u64,
        sink: &mut impl FrameSink,
    ) -> bool {
        let Ok(dst) = RemoteAddr::from_ipv6(f.endpoints.dst, self.cfg.prefix) else {
            return false;
        };
        if dst.opcode() != Opcode::REPLICATE || dst.host_id() != self.cfg.host {
            return false;
        }
        let Ok(src) = RemoteAddr::from_ipv6(f.endpoints.src, self.cfg.prefix) else {
            self.c().repl[ReplCounter::StreamDropped as usize].inc();
            return true;
        };
        // Both ends of a stream are a server's stream address: a shard field and nothing else
        // in the handle, opcode REPLICATE. Nothing else in the host's /48 — its clients' /64
        // included, whose handle bits are never of that form — may speak for its stream.
        let stream_address = |a: &RemoteAddr| {
            a.opcode() == Opcode::REPLICATE
                && a.handle().shard_field() != 0
                && a.handle().to_bits() & ((1 << 56) - 1) == 0
        };
        if !stream_address(&src) || !stream_address(&dst) {
            self.c().repl[ReplCounter::StreamDropped as usize].inc();
            return true;
        }
        let h = f.header;
        if f.is_reply() {
            let fenced = h.status == Status::FENCED;
            match self.outbox.as_deref_mut() {
                Some(o)
                    if o.target().host == src.host_id()
                        && dst.handle().shard_field() == self.shard as u8 + 1 =>
                {
                    o.on_ack(h.request_id, fenced, now_ns);
                }
                _ => self.c().repl[ReplCounter::StreamDropped as usize].inc(),
            }
            return true;
        }
        // A stream frame from `src`'s shard, for the twin of it this shard keeps.
        let shard = src.handle().shard_field().wrapping_sub(1);
        let epoch = h.lease as u32;
        let accept = self
            .cfg
            .replication
            .orders()
            .accepts
            .get(&src.host_id().0)
            .copied();
        let Some(accept) = accept.filter(|a| a.epoch != 0) else {
            self.c().repl[ReplCounter::StreamDropped as usize].inc();
            return true;
        };
        let i = match self
            .replicas
            .iter()
            .position(|r| r.primary == src.host_id() && r.shard == u16::from(shard))
        {
            Some(i) => i,
            None if epoch == accept.epoch && h.request_id == 1 => {
                self.replicas
                    .push(Replica::new(src.host_id(), u16::from(shard), epoch));
                self.replicas.len() - 1
            }
            None => {
                self.c().repl[ReplCounter::StreamDropped as usize].inc();
                return true;
            }
        };
        if self.replicas[i].epoch < accept.epoch && epoch == accept.epoch && h.request_id == 1 {
            // A new stream of a later epoch: the twin starts over.
            self.replicas[i] = Replica::new(src.host_id(), u16::from(shard), epoch);
        }
        // A segmented frame's payload comes in two pieces; the records want one.
        let payload = if f.payload_tail.is_empty() {
            std::borrow::Cow::Borrowed(f.payload)
        } else {
            std::borrow::Cow::Owned([f.payload, f.payload_tail].concat())
        };
        let applied = {
            let base = &self.cfg;
            self.replicas[i].on_frame(h.request_id, epoch, h.operand0, &payload, now_ns, base)
        };
        let mut reply = BbRepr {
            flags: HeaderFlags::REPLY,
            count: 1,
            lease: h.lease,
            ..BbRepr::default()
        };
        match applied {
            Applied::Ack(seq) => {
                reply.request_id = seq;
                self.c().repl[ReplCounter::StreamApplied as usize].inc();
            }
            Applied::Fenced => {
                reply.request_id = h.request_id;
                reply.status = Status::FENCED;
            }
        }
        send(
            self.counters.shard(self.shard),
            sink,
            &f.endpoints.reply_from(f.endpoints.dst),
            &reply,
            &[],
        );
        true
    }

    /// A request for a host this shard took over (a promoted twin's): run by the twin at its
    /// clock. False if no twin here answers for it.
    pub(super) fn taken_over_frame(
        &mut self,
        f: &Frame<'_>,
        now_ns: u64,
        sink: &mut impl FrameSink,
    ) -> bool {
        let Ok(dst) = RemoteAddr::from_ipv6(f.endpoints.dst, self.cfg.prefix) else {
            return false;
        };
        let field = dst.handle().shard_field();
        let Some(r) = self.replicas.iter_mut().find(|r| {
            r.promoted()
                && r.primary == dst.host_id()
                && (field == 0 || u16::from(field) == r.shard + 1)
        }) else {
            return false;
        };
        if let Some((h, now)) = r.taken_over(now_ns) {
            h.handle_message(f, now, sink);
        }
        true
    }

    /// BACKUP, REPLICA, PROMOTE: the controller's orders.
    pub(super) fn order(&mut self, req: &Request<'_>, now_ns: u64, sink: &mut impl FrameSink) {
        let base = Self::reply_header(&req.header, Status::OK);
        if !self.sent_by_controller(req) {
            return self.reply_status(req, req.target, base, Status::FORBIDDEN, sink);
        }
        let h = &req.header;
        let other = u16::try_from(h.operand0)
            .ok()
            .filter(|&o| o != 0 && !HostId(o).is_any());
        let epoch = u32::try_from(h.lease).unwrap_or(0);
        let host = self.cfg.host.0;
        let st = match req.op() {
            Opcode::BACKUP => {
                let target = other.map(|o| Target {
                    host: HostId(o),
                    epoch,
                    own_mac: req.endpoints.dst_mac,
                    next_hop: req.endpoints.src_mac,
                    rate: h.operand1,
                });
                let current = self.cfg.replication.orders().backups.get(&host).copied();
                let key = |t: Option<Target>| t.map(|t| (t.host, t.epoch));
                if target.is_some_and(|t| t.host == self.cfg.host)
                    || (other.is_some() && epoch == 0)
                {
                    Status::MALFORMED
                } else if key(current) == key(target) {
                    Status::OK // a repeated order: the stream goes on as it is
                } else {
                    self.cfg.replication.update(|o| match target {
                        Some(t) => {
                            o.backups.insert(host, t);
                        }
                        None => {
                            o.backups.remove(&host);
                        }
                    });
                    self.reconcile(now_ns);
                    Status::OK
                }
            }
            Opcode::REPLICA => match other {
                Some(p) => {
                    self.cfg.replication.update(|o| {
                        if epoch == 0 {
                            o.accepts.remove(&p);
                        } else {
                            let a = o.accepts.entry(p).or_default();
                            if a.epoch != epoch {
                                *a = Accept { epoch, promote: 0 };
                            }
                        }
                    });
                    self.reconcile(now_ns);
                    Status::OK
                }
                None => Status::MALFORMED,
            },
            Opcode::PROMOTE => match other {
                Some(p) => self.promote_order(p, epoch, now_ns),
                None => Status::MALFORMED,
            },
            op => unreachable!("{op:?} is not an order"),
        };
        self.reply_status(req, req.target, base, st, sink);
    }

    fn promote_order(&mut self, p: u16, epoch: u32, now_ns: u64) -> Status {
        let shared = self.cfg.replication.clone();
        let Some(a) = shared.orders().accepts.get(&p).copied() else {
            return Status::LEASE_EXPIRED; // no replica of that host here
        };
        if epoch <= a.epoch && a.promote != epoch {
            return Status::MALFORMED; // a promotion takes a later epoch than the stream's
        }
        // Only a replica in step may take over; one that is not is never ordered to (it would
        // take over later, unasked, when it gets there).
        let Some(state) = shared.replica_state(p).filter(|s| {
            s.epoch == a.epoch && s.broken == 0 && s.shards > 0 && s.in_step >= s.shards
        }) else {
            return Status::LEASE_EXPIRED;
        };
        shared.update(|o| {
            if let Some(a) = o.accepts.get_mut(&p) {
                a.promote = epoch;
            }
        });
        self.reconcile(now_ns);
        if shared.promoted_shards(p, epoch) >= state.shards {
            Status::OK
        } else {
            Status::BUSY
        }
    }

    /// Acts on orders that changed since this shard last looked: starts or stops its
    /// stream, drops replicas no longer wanted, promotes the ones ordered to take over.
    pub(super) fn reconcile(&mut self, now_ns: u64) {
        // One load per turn of the worker's loop when nothing changed.
        let v = self.cfg.replication.version();
        if v == self.orders_seen {
            return;
        }
        self.orders_seen = v;
        let shared = self.cfg.replication.clone();
        let orders = shared.orders();
        let want = orders.backups.get(&self.cfg.host.0).copied();
        let have = self.outbox.as_deref().map(Outbox::target);
        if want != have {
            if let Some(o) = self.outbox.take() {
                // Stopped (or moved elsewhere, which starts from INIT again): what waited for
                // the old backup goes now, unless it was fenced.
                let mut o = o;
                if !o.fenced() {
                    o.release_all();
                }
                self.orphaned = Some(o);
            }
            self.store.end_copy();
            if let Some(t) = want {
                // XDP could show a READ what the backup does not hold yet: no hot pages
                // while the shard replicates.
                self.store.clear_hot();
                let mut o = Box::new(Outbox::new(
                    self.cfg.prefix,
                    self.cfg.host,
                    self.shard,
                    t,
                    usize::from(self.cfg.max_frame_data),
                ));
                let mut init = self.init_record();
                // A shard with state starts its stream with a copy of it: the state but the
                // pages' bytes now, the pages while the stream goes on (§5.19).
                init.copying = u8::from(!self.pristine);
                o.append(&Record::Init(init));
                if !self.pristine {
                    o.append(&Record::Snapshot(&self.snapshot()));
                    self.store.start_copy();
                    o.start_copy();
                }
                tracing::info!(shard = self.shard, backup = %t.host, epoch = t.epoch, copy = !self.pristine, "replicating to a backup");
                self.outbox = Some(o);
            }
        }
        self.replicas.retain(|r| {
            orders
                .accepts
                .get(&r.primary.0)
                .is_some_and(|a| a.epoch == r.epoch || r.promoted())
        });
        for r in &mut self.replicas {
            let Some(a) = orders.accepts.get(&r.primary.0) else {
                continue;
            };
            if a.promote != 0 && !r.promoted() && r.promote(now_ns) {
                tracing::warn!(primary = %r.primary, shard = r.shard, epoch = a.promote, "replica took over its primary's pages");
                shared.promoted(r.primary.0, a.promote);
            }
        }
    }

    /// Sends what replication has due: stream frames (new and retransmitted), held replies
    /// whose records the backup has; the orders are looked at first. Cheap when there is
    /// nothing to do. Call it once per turn of the worker's loop.
    pub fn poll_replication(&mut self, now_ns: u64, sink: &mut impl FrameSink) -> usize {
        self.reconcile(now_ns);
        if self.outbox.is_none() && self.orphaned.is_none() && self.replicas.is_empty() {
            return 0;
        }
        let mut n = 0;
        if let Some(o) = self.orphaned.as_deref_mut() {
            n += o.poll(now_ns, sink);
            if o.held() == 0 {
                self.orphaned = None;
            }
        }
        if self.outbox.as_deref().is_some_and(|o| !o.synced()) {
            self.copy_pages(now_ns);
        }
        if let Some(o) = self.outbox.as_deref_mut() {
            let (frames, retransmits) = (o.frames, o.retransmits);
            n += o.poll(now_ns, sink);
            let c = self.counters.shard(self.shard);
            c.repl[ReplCounter::Frames as usize].add(o.frames - frames);
            c.repl[ReplCounter::Retransmits as usize].add(o.retransmits - retransmits);
            c.repl[ReplCounter::Held as usize].set(o.held() as u64);
            c.repl[ReplCounter::LagBytes as usize].set(o.lag_bytes());
            let (left, total) = self.store.copy_progress().unwrap_or((0, 0));
            c.repl[ReplCounter::CopyLeft as usize].set(u64::from(left));
            c.repl[ReplCounter::CopyTotal as usize].set(u64::from(total));
        }
        for r in &mut self.replicas {
            if let Some((h, now)) = r.taken_over(now_ns) {
                n += h.poll_replication(now, sink);
            }
        }
        n
    }

    /// The background part of a copy to a new backup: the next pages not yet copied, as fast
    /// as the order's rate allows; when none is left, SYNCED, and from then on replies wait
    /// for the backup.
    fn copy_pages(&mut self, now_ns: u64) {
        let record_len =
            bluebridge_proto::replication::RECORD_HEADER + 4 + bluebridge_proto::PAGE_SIZE;
        loop {
            let Some(o) = self.outbox.as_deref_mut() else {
                return;
            };
            if !o.copy_budget(now_ns, record_len) {
                return;
            }
            match self.store.next_to_copy() {
                Some(p) => {
                    let bytes = self.store.page(p);
                    if let Some(o) = self.outbox.as_deref_mut() {
                        o.append(&Record::Page { slot: p.0, bytes });
                    }
                }
                None => {
                    o.append(&Record::Synced);
                    o.set_synced();
                    self.store.end_copy();
                    tracing::info!(shard = self.shard, backup = %o.target().host, "every page copied to the backup: in step");
                    return;
                }
            }
        }
    }

    /// Whether the shard waits on its backup (stream frames sent and not yet acknowledged).
    /// An idle worker then sleeps at once rather than spinning — on a machine short of cores
    /// a spinning primary keeps its backup off the CPU it needs to answer — but no longer than
    /// [`crate::replication::WAIT_SLEEP_MS`], the retransmission timer's scale.
    pub fn replication_waiting(&self) -> bool {
        self.outbox.as_deref().is_some_and(Outbox::waiting)
            || self.orphaned.as_deref().is_some_and(Outbox::waiting)
            || self.replicas.iter().any(Replica::waiting)
    }

    /// Runs a request under replication: a request that changes state is appended to the
    /// stream first (dropped, counted, when the stream's window is full: the client
    /// retransmits), and its replies — and those of any request while the backup lags — are
    /// held until the backup has applied the stream that far.
    pub(super) fn replicated(
        &mut self,
        f: &Frame<'_>,
        req: &Request<'_>,
        who: crate::lease::ClientKey,
        now_ns: u64,
        sink: &mut impl FrameSink,
    ) {
        if req.op().is_replication() {
            // The controller's orders depend on no page: never held.
            return self.dispatch(req, who, now_ns, sink);
        }
        let changes = !req.op().is_pure_read();
        let Some(o) = self.outbox.as_deref_mut() else {
            self.pristine &= !changes;
            return self.dispatch(req, who, now_ns, sink);
        };
        if o.fenced() {
            // The pages are another server's now: nothing is answered for them.
            self.c().repl[ReplCounter::Fenced as usize].inc();
            return;
        }
        if changes && !o.has_room() {
            self.c().repl[ReplCounter::WindowFull as usize].inc();
            return;
        }
        self.pristine &= !changes;
        if !o.synced() {
            // Copying the shard to a new backup: nothing is held (the backup is not in step
            // yet); the request runs first, so the pages it changes are taken as they were
            // and go into the stream ahead of its record.
            self.dispatch(req, who, now_ns, sink);
            if changes {
                self.flush_changed();
                if let Some(o) = self.outbox.as_deref_mut() {
                    o.append_request(now_ns, &f.endpoints, &f.header, f.payload, f.payload_tail);
                }
            }
            return;
        }
        // A read of pages shows what the stream may not have delivered yet: it waits too. PING,
        // STAT and OWNERS show no page and are never held (a server whose backup died must
        // still answer the controller's health checks).
        let reads_pages = matches!(req.op(), Opcode::READ | Opcode::READ_BULK);
        let until = if changes {
            Some(o.append_request(now_ns, &f.endpoints, &f.header, f.payload, f.payload_tail))
        } else {
            (reads_pages && o.behind()).then(|| o.appended())
        };
        let Some(until) = until else {
            return self.dispatch(req, who, now_ns, sink);
        };
        let (mut frames, mut spare) = o.capture_parts();
        let mut cap = Capture {
            frames: &mut frames,
            spare: &mut spare,
            until,
        };
        self.dispatch(req, who, now_ns, &mut cap);
        if let Some(o) = self.outbox.as_deref_mut() {
            o.hold(frames, spare);
        }
    }
}
