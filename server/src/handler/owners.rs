//! Page owners as a whole (§5.17 of the protocol): reclaiming the pages of owners that fell
//! silent, and the controller's OWNERS and RECLAIM.
//!
//! Every accepted request stamps its source address in the shared [`Liveness`] table (any
//! shard, any port). [`Handler::housekeep`], which the worker calls between batches, checks a
//! slice of the owner table at a time; an owner silent for longer than the grace period is
//! marked orphan, and a pass over the shard's page table (a slice per call, so a worker never
//! stalls) frees its pages that are not shared, detached or migrated away. An owner heard
//! again before a page is reached keeps it: each page's owner is checked once more as it is
//! freed.
//!
//! [`Liveness`]: crate::liveness::Liveness

use bluebridge_proto::message::OwnerEntry;
use bluebridge_proto::{BbRepr, FrameSink, Opcode, PageHandle, Request, Status};

use super::{Handler, Outcome, send};
use crate::store::PageIdx;

/// The grace period a server gives a silent owner by default: 5 minutes.
pub const DEFAULT_GRACE_MS: u64 = 300_000;
/// Owners checked per [`Handler::housekeep`] call.
const OWNERS_PER_CALL: u32 = 1024;
/// Page slots looked at per [`Handler::housekeep`] call during a pass.
const SLOTS_PER_CALL: u32 = 4096;

/// Where reclamation stands.
#[derive(Debug, Default)]
pub(super) struct Sweep {
    /// When the owner table is next checked, ns.
    next_check_ns: u64,
    /// The next owner id to check.
    owner_cursor: u32,
    /// The next page slot to look at.
    slot_cursor: u32,
    /// Slots left in the current pass (0: no pass).
    pass_left: u32,
}

/// How often the hot-page store's hits are turned into liveness stamps and counters.
const HOT_LOOK_NS: u64 = 100_000_000;

impl Handler {
    /// The hot-page store's periodic work: copies pages changed since the last batch, and
    /// every [`HOT_LOOK_NS`] stamps the owners whose pages XDP served as heard (those READs
    /// never reached the worker) and publishes its counters.
    fn housekeep_hot(&mut self, now_ns: u64) {
        if !self.store.has_hot() {
            return;
        }
        self.store.publish_hot();
        if now_ns < self.hot_next_ns {
            return;
        }
        self.hot_next_ns = now_ns + HOT_LOOK_NS;
        let now_ms = now_ns / 1_000_000;
        let liveness = &self.cfg.liveness;
        self.store.hot_served_owners(|a| liveness.heard(a, now_ms));
        self.publish_hot_counters();
    }

    /// Publishes the hot-page store's counters to the shard's (done every 100 ms while the
    /// worker runs, and once as it stops).
    pub fn publish_hot_counters(&self) {
        let c = self.store.hot_counters();
        let sc = self.counters.shard(self.shard);
        for (slot, v) in sc.hot.iter().zip(c) {
            slot.set(v);
        }
    }

    /// Copies the hot pages changed by the last batch into their slots, so XDP serves them
    /// again (until then it leaves their READs to the worker). Cheap when none changed.
    pub fn publish_hot(&mut self) {
        self.store.publish_hot();
    }

    /// Periodic work that no request triggers: frees the pages of owners silent past the
    /// grace period. Cheap when there is nothing to do (a comparison); call it between
    /// batches and when idle.
    pub fn housekeep(&mut self, now_ns: u64) {
        self.housekeep_taken_over(now_ns);
        self.housekeep_hot(now_ns);
        let grace = self.cfg.orphan_grace_ms;
        if grace == 0 {
            return;
        }
        let now_ms = now_ns / 1_000_000;
        let paused = self.cfg.liveness.tick(now_ms);
        if paused > 0 {
            tracing::warn!(
                paused_ms = paused,
                "the server stood still: that time does not count as its clients' silence"
            );
        }
        if now_ns >= self.sweep.next_check_ns {
            // The whole table is checked every grace/8 (at least every 10 ms, at most 1 s).
            let every_ms = (grace / 8).clamp(10, 1_000);
            self.check_owners(now_ms, grace);
            let done = self.sweep.owner_cursor == 0;
            self.sweep.next_check_ns = if done {
                now_ns + every_ms * 1_000_000
            } else {
                now_ns // more owners to check: next call
            };
        }
        if self.sweep.pass_left > 0 {
            if self.access.orphans() == 0 {
                self.sweep.pass_left = 0;
            } else {
                self.sweep_slots(now_ms, grace);
            }
        }
    }

    /// Checks the next slice of owners; an owner newly found silent starts a pass.
    fn check_owners(&mut self, now_ms: u64, grace: u64) {
        let limit = self.access.id_limit();
        let start = self.sweep.owner_cursor.max(1);
        let end = start.saturating_add(OWNERS_PER_CALL).min(limit);
        for id in start..end {
            let Some((addr, _)) = self.access.owner(id) else {
                continue;
            };
            let silent = self.cfg.liveness.silent_ms(&addr, now_ms) > grace;
            if self.access.set_orphan(id, silent) {
                tracing::info!(
                    owner = %std::net::Ipv6Addr::from(addr),
                    shard = self.shard,
                    "page owner silent past the grace period: reclaiming its pages"
                );
                self.sweep.pass_left = self.store.pages_total();
            }
        }
        self.sweep.owner_cursor = if end >= limit { 0 } else { end };
    }

    /// Looks at the next slice of page slots of a pass and frees the silent owners' pages.
    fn sweep_slots(&mut self, now_ms: u64, grace: u64) {
        let total = self.store.pages_total();
        let n = SLOTS_PER_CALL.min(self.sweep.pass_left);
        for _ in 0..n {
            let p = PageIdx(self.sweep.slot_cursor);
            self.sweep.slot_cursor = (self.sweep.slot_cursor + 1) % total.max(1);
            let Some(owner) = self.store.owner_of_slot(p, false) else {
                continue;
            };
            if !self.access.is_orphan(owner) {
                continue;
            }
            // Heard again since it was marked: it keeps its pages.
            let still_silent = self
                .access
                .owner(owner)
                .is_some_and(|(addr, _)| self.cfg.liveness.silent_ms(&addr, now_ms) > grace);
            if still_silent {
                self.reclaim_page(p);
                self.log_reclaim(p, now_ms * 1_000_000);
            } else {
                self.access.set_orphan(owner, false);
            }
        }
        self.sweep.pass_left -= n;
        self.c().pages_used.set(u64::from(self.store.pages_used()));
    }

    /// Frees a live page without a FREE (its lease, if any, ends with it).
    pub(super) fn reclaim_page(&mut self, p: PageIdx) {
        self.free_page(p);
        self.c().reclaimed.inc();
    }

    /// OWNERS: the next owners of this shard, as many as one reply frame holds.
    pub(super) fn list_owners(
        &mut self,
        req: &Request<'_>,
        now_ns: u64,
        sink: &mut impl FrameSink,
    ) {
        let base = Self::reply_header(&req.header, Status::OK);
        if !self.sent_by_controller(req) {
            return self.reply_status(req, req.target, base, Status::FORBIDDEN, sink);
        }
        let room = usize::from(self.cfg.max_reply_data).min(self.scratch.len()) / OwnerEntry::LEN;
        let limit = self.access.id_limit();
        let now_ms = now_ns / 1_000_000;
        let mut id = u32::try_from(req.header.operand0)
            .unwrap_or(u32::MAX)
            .max(1);
        let mut n = 0;
        while id < limit && n < room {
            if let Some((addr, pages)) = self.access.owner(id) {
                OwnerEntry {
                    addr,
                    pages: u32::try_from(pages).unwrap_or(u32::MAX),
                    silent_ms: u32::try_from(self.cfg.liveness.silent_ms(&addr, now_ms))
                        .unwrap_or(u32::MAX),
                }
                .emit(&mut self.scratch[n * OwnerEntry::LEN..]);
                n += 1;
            }
            id += 1;
        }
        let h = BbRepr {
            count: n as u16,
            operand0: if id < limit { u64::from(id) } else { 0 },
            ..base
        };
        let ep = req.endpoints.reply_from(req.target.to_ipv6());
        send(
            self.counters.shard(self.shard),
            sink,
            &ep,
            &h,
            &self.scratch[..n * OwnerEntry::LEN],
        );
    }

    /// RECLAIM: frees every page the named owner holds on this shard.
    pub(super) fn reclaim_owner(&mut self, req: &Request<'_>) -> Outcome {
        if !self.sent_by_controller(req) {
            return Outcome::status(Status::FORBIDDEN, PageHandle::NONE);
        }
        let addr = req.header.operand_addr();
        let mut freed = 0u64;
        if let Some(id) = self.access.id_of(&addr) {
            for i in 0..self.store.pages_total() {
                if self.store.owner_of_slot(PageIdx(i), true) == Some(id) {
                    self.reclaim_page(PageIdx(i));
                    freed += 1;
                }
            }
            tracing::info!(owner = %std::net::Ipv6Addr::from(addr), shard = self.shard, pages = freed, "owner's pages reclaimed by the controller");
        }
        Outcome {
            operand0: freed,
            ..Outcome::status(Status::OK, PageHandle::NONE)
        }
    }
}

const _: () = assert!(Opcode::OWNERS.is_idempotent() && !Opcode::RECLAIM.is_idempotent());
