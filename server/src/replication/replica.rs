//! The backup's side of a replication stream: frames taken in order, records run on a twin
//! of the primary's shard at the primary's time, each frame acknowledged once applied; and,
//! when the controller promotes it, the twin answering for the primary's pages.

use bluebridge_proto::frame::{Endpoints, Frame, FrameSink};
use bluebridge_proto::replication::Record;
use bluebridge_proto::{BbRepr, HostId};

use crate::handler::{Handler, HandlerConfig};

/// A sink that sends nothing: the twin's replies (the primary sent them).
#[derive(Debug)]
struct Discard;

impl FrameSink for Discard {
    fn send(&mut self, _: &Endpoints, _: &BbRepr, _: &[u8]) -> bool {
        true
    }
}

/// What became of a stream frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Every frame up to this sequence number is applied (0: none yet).
    Ack(u64),
    /// The stream's epoch is over.
    Fenced,
}

/// A backup's twin of one primary shard.
#[derive(Debug)]
pub struct Replica {
    /// The primary's host id.
    pub primary: HostId,
    /// The primary's shard.
    pub shard: u16,
    /// The stream's epoch.
    pub epoch: u32,
    handler: Option<Box<Handler>>,
    next_seq: u64,
    offset: u64,
    buf: Vec<u8>,
    promoted: bool,
    /// The primary's shards (from its INIT).
    shards: u16,
    /// The primary's clock minus ours, at the last record.
    clock_offset: i128,
    last_now: u64,
    /// Records that could not be read or run (the stream is then not applied further).
    pub bad_records: u64,
    broken: bool,
    /// Every page of the primary's state is here (a stream of a shard's first state: from
    /// INIT; one that copies a shard with state: from SYNCED).
    synced: bool,
}

impl Replica {
    /// An empty twin of `primary`'s shard `shard`, taking the stream of `epoch`.
    pub fn new(primary: HostId, shard: u16, epoch: u32) -> Self {
        Replica {
            primary,
            shard,
            epoch,
            handler: None,
            next_seq: 1,
            offset: 0,
            buf: Vec::new(),
            promoted: false,
            shards: 0,
            clock_offset: 0,
            last_now: 0,
            bad_records: 0,
            broken: false,
            synced: false,
        }
    }

    /// Whether it has taken over.
    pub fn promoted(&self) -> bool {
        self.promoted
    }

    /// Whether it holds the shard: its INIT arrived, every page of the primary's state too,
    /// and nothing broke since.
    pub fn in_step(&self) -> bool {
        self.handler.is_some() && self.synced && !self.broken
    }

    /// Whether the twin (taken over) waits on a backup of its own.
    pub fn waiting(&self) -> bool {
        self.promoted
            && self
                .handler
                .as_deref()
                .is_some_and(Handler::replication_waiting)
    }

    /// The twin that took over, and its clock at our `now_ns` (moved on); `None` unless it
    /// was promoted.
    pub fn taken_over(&mut self, now_ns: u64) -> Option<(&mut Handler, u64)> {
        if !self.promoted {
            return None;
        }
        let now = self.now(now_ns);
        self.handler.as_deref_mut().map(|h| (h, now))
    }

    /// The twin's clock at our `now_ns`: the primary's, carried on (never backwards).
    fn now(&mut self, now_ns: u64) -> u64 {
        self.last_now = self.peek_now(now_ns);
        self.last_now
    }

    /// [`Replica::now`] without moving the clock.
    fn peek_now(&self, now_ns: u64) -> u64 {
        let t = (i128::from(now_ns) + self.clock_offset).clamp(0, i128::from(u64::MAX)) as u64;
        self.last_now.max(t)
    }

    /// Takes over: from now on the twin answers for the pages and the stream is refused.
    /// Every owner counts as heard now (the primary's record of who was heard when did not
    /// travel).
    pub fn promote(&mut self, now_ns: u64) -> bool {
        if !self.in_step() {
            return false;
        }
        let now = self.now(now_ns);
        self.promoted = true;
        if let Some(h) = self.handler.as_deref_mut() {
            h.taken_over(now);
        }
        true
    }

    /// Applies stream frame `seq` (its first byte at stream offset `start`) of epoch `epoch`,
    /// received at our `now_ns`. `base` (this server's configuration) makes the twin when its
    /// INIT arrives.
    pub fn on_frame(
        &mut self,
        seq: u64,
        epoch: u32,
        start: u64,
        payload: &[u8],
        now_ns: u64,
        base: &HandlerConfig,
    ) -> Applied {
        if self.promoted || epoch != self.epoch {
            return Applied::Fenced;
        }
        if seq != self.next_seq || start != self.offset || self.broken {
            // A duplicate, or a gap (a frame lost before it): what is applied stands.
            return Applied::Ack(self.next_seq - 1);
        }
        self.next_seq += 1;
        self.offset += payload.len() as u64;
        self.buf.extend_from_slice(payload);
        let buf = std::mem::take(&mut self.buf);
        let mut used = 0;
        loop {
            match Record::parse(&buf[used..]) {
                Ok(Some((r, n))) => {
                    used += n;
                    if !self.apply(&r, now_ns, base) {
                        self.broken = true;
                        base.replication
                            .replica_made(self.primary.0, self.epoch, 0, false);
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(primary = %self.primary, shard = self.shard, error = ?e, "unreadable replication record: this replica stops here");
                    self.bad_records += 1;
                    self.broken = true;
                    base.replication
                        .replica_made(self.primary.0, self.epoch, 0, false);
                    break;
                }
            }
        }
        self.buf = buf;
        self.buf.drain(..used);
        Applied::Ack(seq)
    }

    fn apply(&mut self, r: &Record<'_>, now_ns: u64, base: &HandlerConfig) -> bool {
        match *r {
            Record::Init(init) => {
                if init.host != self.primary.0 || init.shard != self.shard {
                    tracing::error!(primary = %self.primary, shard = self.shard, "INIT of another shard in the stream");
                    self.bad_records += 1;
                    return false;
                }
                match Handler::from_init(&init, base) {
                    Ok(h) => {
                        tracing::info!(primary = %self.primary, shard = self.shard, pages = h.store().pages_total(), copying = init.copying, "replica made");
                        self.handler = Some(Box::new(h));
                        self.shards = init.shards;
                        if init.copying == 0 {
                            self.synced = true;
                            base.replication.replica_made(
                                self.primary.0,
                                self.epoch,
                                init.shards,
                                true,
                            );
                        }
                        true
                    }
                    Err(e) => {
                        tracing::error!(primary = %self.primary, shard = self.shard, error = %e, "cannot make the replica");
                        self.bad_records += 1;
                        false
                    }
                }
            }
            Record::Request {
                now_ns: t,
                endpoints,
                message,
            } => {
                self.clock_offset = i128::from(t) - i128::from(now_ns);
                self.last_now = self.last_now.max(t);
                let Some(h) = self.handler.as_deref_mut() else {
                    self.bad_records += 1;
                    return false;
                };
                match Frame::from_message(endpoints, message) {
                    Ok(f) => {
                        h.handle_message(&f, t, &mut Discard);
                        true
                    }
                    Err(_) => {
                        self.bad_records += 1;
                        false
                    }
                }
            }
            Record::Reclaim { now_ns: t, slot } => {
                self.last_now = self.last_now.max(t);
                let Some(h) = self.handler.as_deref_mut() else {
                    self.bad_records += 1;
                    return false;
                };
                h.reclaim_slot(slot);
                true
            }
            Record::Snapshot(bytes) => {
                let ok = self
                    .handler
                    .as_deref_mut()
                    .is_some_and(|h| h.restore(bytes));
                if !ok {
                    tracing::error!(primary = %self.primary, shard = self.shard, "a snapshot this replica cannot take");
                    self.bad_records += 1;
                }
                ok
            }
            Record::Page { slot, bytes } => {
                let ok = self
                    .handler
                    .as_deref_mut()
                    .is_some_and(|h| h.install_page(slot, bytes));
                self.bad_records += u64::from(!ok);
                ok
            }
            Record::Synced => {
                if self.handler.is_none() {
                    self.bad_records += 1;
                    return false;
                }
                if !self.synced {
                    self.synced = true;
                    tracing::info!(primary = %self.primary, shard = self.shard, "replica in step: every page copied");
                    base.replication
                        .replica_made(self.primary.0, self.epoch, self.shards, true);
                }
                true
            }
        }
    }
}
