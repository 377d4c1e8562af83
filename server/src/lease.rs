//! UPDATE leases: a fixed table of exclusive, expiring locks on pages.
//!
//! A lease id is the keyed permutation ([`Feistel`], a random key per table) of (slot,
//! generation, 16 zero check bits): unguessable, and every id handed out names its slot and
//! that slot's generation, which advances on every grant. A guessed id decodes to a live
//! lease with probability about 2^-48. An id is valid only from its holder (address and
//! port) for its page; anyone else presenting it gets LEASE_INVALID, as for a made-up id,
//! whether or not it has expired (no hint).
//!
//! Slots of leases that ran out are reclaimed ([`Leases::reclaim_expired`]: an expiry heap,
//! so the cost is O(log n) per lease), so a table cannot be filled for good by leases nobody
//! commits. A reclaimed slot keeps its last lease's record until it is granted again (slots
//! are reused oldest first), so the holder's late commit is told LEASE_EXPIRED rather than
//! LEASE_INVALID for as long as possible.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use bluebridge_proto::Status;

use bluebridge_proto::message::Bytes;

use crate::keyed::Feistel;
use crate::staging::Stages;
use crate::store::{PageIdx, Store};

/// Who holds a lease: the client's address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ClientKey {
    /// Client IPv6 address.
    pub addr: [u8; 16],
    /// Client UDP port.
    pub port: u16,
}

/// Where a slot's last lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum State {
    /// Never granted.
    Unused,
    /// Granted and not ended: the page's lease (it may have run out, not yet reclaimed).
    Granted,
    /// Ran out and reclaimed.
    Expired,
    /// Committed, released, or its page freed.
    Ended,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Slot {
    generation: u32,
    state: State,
    page: PageIdx,
    holder: ClientKey,
    acquire_request: u64,
    expires_ns: u64,
    /// The staging buffer of a commit in several frames.
    stage: Option<u16>,
}

/// What an acquire found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// The lease id.
    pub id: u64,
    /// Milliseconds it is valid for, from now.
    pub ms: u64,
}

/// The lease table as a replica's snapshot carries it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct LeasesState {
    capacity: u16,
    /// The slots ever granted (the others are as new).
    slots: Vec<(u16, Slot)>,
    /// The free slots: those from `fresh_from` up, in order, then `free`.
    fresh_from: u16,
    free: Vec<u16>,
    expiries: Vec<(u64, u16, u32)>,
    granted: u64,
    stages: crate::staging::StagesState,
}

/// The lease table.
#[derive(Debug)]
pub struct Leases {
    slots: Vec<Slot>,
    /// Free slots, oldest first.
    free: VecDeque<u16>,
    /// (expiry, slot, generation) of every grant not known to be over.
    expiries: BinaryHeap<Reverse<(u64, u16, u32)>>,
    granted: u64,
    ids: Feistel,
    default_ms: u64,
    max_ms: u64,
    stages: Stages,
    key: [u8; 32],
}

/// The longest lease a table grants, whatever it is configured with (one day).
pub const LEASE_MS_LIMIT: u64 = 86_400_000;

impl Leases {
    /// A table of `capacity` (≤ 65535) leases; leases last `default_ms` unless asked otherwise,
    /// and at most `max_ms` (both capped at [`LEASE_MS_LIMIT`]). The id key is random.
    pub fn new(capacity: u16, default_ms: u64, max_ms: u64) -> Self {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("random bytes for the lease-id key");
        Self::with_key(capacity, default_ms, max_ms, key)
    }

    /// Like [`Leases::new`], under a given id key: a replica's table (docs/protocol.md §5.19)
    /// must name its leases as the primary's does.
    pub fn with_key(capacity: u16, default_ms: u64, max_ms: u64, key: [u8; 32]) -> Self {
        let ids = Feistel::new(key, 32);
        let unused = Slot {
            generation: 0,
            state: State::Unused,
            page: PageIdx(0),
            holder: ClientKey {
                addr: [0; 16],
                port: 0,
            },
            acquire_request: 0,
            expires_ns: 0,
            stage: None,
        };
        let max_ms = max_ms.clamp(1, LEASE_MS_LIMIT);
        Leases {
            slots: vec![unused; usize::from(capacity)],
            free: (0..capacity).collect(),
            expiries: BinaryHeap::new(),
            granted: 0,
            ids,
            default_ms: default_ms.clamp(1, max_ms),
            max_ms,
            stages: Stages::new(),
            key,
        }
    }

    /// The table, for a replica's snapshot (§5.19).
    pub(crate) fn state(&self) -> LeasesState {
        let cap = self.slots.len() as u16;
        // The free deque is the never-granted slots in order (a fresh table's), then the
        // ones given back: only the latter need listing.
        let fresh_from = match self.free.front() {
            Some(&x)
                if self
                    .free
                    .iter()
                    .take(usize::from(cap - x))
                    .copied()
                    .eq(x..cap) =>
            {
                x
            }
            _ => cap,
        };
        let skip = usize::from(cap - fresh_from);
        LeasesState {
            capacity: cap,
            slots: self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.state != State::Unused)
                .map(|(i, s)| (i as u16, *s))
                .collect(),
            fresh_from,
            free: self.free.iter().skip(skip).copied().collect(),
            expiries: self.expiries.iter().map(|r| r.0).collect(),
            granted: self.granted,
            stages: self.stages.state(),
        }
    }

    /// Takes a snapshot's table; `false` if it is not one of this size.
    pub(crate) fn set_state(&mut self, s: LeasesState) -> bool {
        if usize::from(s.capacity) != self.slots.len()
            || s.slots.iter().any(|(i, _)| *i >= s.capacity)
            || s.fresh_from > s.capacity
        {
            return false;
        }
        for (i, slot) in s.slots {
            self.slots[usize::from(i)] = slot;
        }
        self.free = (s.fresh_from..s.capacity).chain(s.free).collect();
        self.expiries = s.expiries.into_iter().map(Reverse).collect();
        self.granted = s.granted;
        self.stages.set_state(s.stages)
    }

    /// The id key (for a replica's INIT record).
    pub fn key(&self) -> [u8; 32] {
        self.key
    }

    fn id_of(&self, slot: u16, generation: u32) -> u64 {
        let (l, r) = self.ids.encrypt(u32::from(slot) << 16, generation);
        u64::from(l) << 32 | u64::from(r)
    }

    /// The slot an id names, if it is one this table made (check bits 0, slot in range,
    /// the slot's current generation).
    fn slot_of(&self, id: u64) -> Option<u16> {
        let (l, generation) = self.ids.decrypt((id >> 32) as u32, id as u32);
        let slot = (l >> 16) as u16;
        let s = self.slots.get(usize::from(slot))?;
        (l & 0xffff == 0 && s.generation == generation && s.state != State::Unused).then_some(slot)
    }

    /// The page's lease while it lives.
    fn live(&self, store: &Store, p: PageIdx, now_ns: u64) -> Option<&Slot> {
        let slot = store.lease_slot(p).checked_sub(1)?;
        let l = &self.slots[usize::from(slot)];
        (l.state == State::Granted && l.expires_ns > now_ns).then_some(l)
    }

    /// Ends the page's lease, if it has one, marking the slot `to` and freeing it.
    fn end(&mut self, store: &mut Store, p: PageIdx, to: State) {
        if let Some(slot) = store.lease_slot(p).checked_sub(1) {
            let s = &mut self.slots[usize::from(slot)];
            if s.state == State::Granted {
                s.state = to;
                self.free.push_back(slot);
                self.granted -= 1;
            }
            if let Some(i) = s.stage.take() {
                self.stages.give_back(i); // staged frames of an unfinished commit: dropped
            }
            store.set_lease_slot(p, 0);
        }
    }

    /// Reclaims the slots of leases that ran out by `now_ns`: their pages have no lease
    /// from now on and the slots are free.
    pub fn reclaim_expired(&mut self, store: &mut Store, now_ns: u64) {
        while let Some(&Reverse((t, slot, generation))) = self.expiries.peek() {
            if t > now_ns {
                break;
            }
            self.expiries.pop();
            let s = self.slots[usize::from(slot)];
            if s.generation == generation && s.state == State::Granted {
                self.end(store, s.page, State::Expired);
            }
        }
    }

    /// Whether `who` may modify the page: no live lease, or theirs.
    pub fn check_writer(
        &self,
        store: &Store,
        p: PageIdx,
        who: ClientKey,
        now_ns: u64,
    ) -> Result<(), Status> {
        match self.live(store, p, now_ns) {
            Some(l) if l.holder != who => Err(Status::LEASE_HELD),
            _ => Ok(()),
        }
    }

    /// Grants the page's lease to `who`, or returns the one it already holds for this same
    /// request (a retransmitted ACQUIRE). BUSY when every slot holds a live lease.
    pub fn acquire(
        &mut self,
        store: &mut Store,
        p: PageIdx,
        who: ClientKey,
        request: u64,
        ms: u64,
        now_ns: u64,
    ) -> Result<Granted, Status> {
        self.reclaim_expired(store, now_ns);
        if let Some(l) = self.live(store, p, now_ns) {
            if l.holder == who && l.acquire_request == request {
                let slot = store.lease_slot(p) - 1;
                return Ok(Granted {
                    id: self.id_of(slot, l.generation),
                    ms: (l.expires_ns - now_ns).div_ceil(1_000_000),
                });
            }
            return Err(Status::LEASE_HELD);
        }
        self.end(store, p, State::Expired); // run out, not yet reclaimed
        let Some(slot) = self.free.pop_front() else {
            return Err(Status::BUSY);
        };
        let ms = if ms == 0 {
            self.default_ms
        } else {
            ms.min(self.max_ms)
        };
        let expires_ns = now_ns.saturating_add(ms * 1_000_000);
        let s = &mut self.slots[usize::from(slot)];
        let mut generation = s.generation.wrapping_add(1);
        let mut id = self.id_of(slot, generation);
        if id == 0 {
            // 0 names no lease (§5.8); one generation on never maps to 0 as well.
            generation = generation.wrapping_add(1);
            id = self.id_of(slot, generation);
        }
        self.slots[usize::from(slot)] = Slot {
            generation,
            state: State::Granted,
            page: p,
            holder: who,
            acquire_request: request,
            expires_ns,
            stage: None,
        };
        self.granted += 1;
        self.expiries.push(Reverse((expires_ns, slot, generation)));
        if self.expiries.len() > 2 * self.slots.len() + 16 {
            self.compact_expiries();
        }
        store.set_lease_slot(p, slot + 1);
        Ok(Granted { id, ms })
    }

    /// Drops the heap entries of leases that ended early (amortised: runs after as many
    /// grants as there are slots).
    fn compact_expiries(&mut self) {
        let slots = &self.slots;
        self.expiries.retain(|Reverse((_, slot, g))| {
            let s = &slots[usize::from(*slot)];
            s.generation == *g && s.state == State::Granted
        });
    }

    /// Checks that `id` is the page's live lease and `who` its holder (for COMMIT and
    /// RELEASE). LEASE_EXPIRED only to the holder of that page's lease once it ran out;
    /// LEASE_INVALID for anything else: 0, a made-up id, another page's, another client's.
    pub fn check(
        &self,
        store: &Store,
        p: PageIdx,
        id: u64,
        who: ClientKey,
        now_ns: u64,
    ) -> Result<(), Status> {
        let Some(slot) = (id != 0).then(|| self.slot_of(id)).flatten() else {
            return Err(Status::LEASE_INVALID);
        };
        let s = &self.slots[usize::from(slot)];
        if s.page != p || s.holder != who {
            return Err(Status::LEASE_INVALID);
        }
        match s.state {
            State::Granted if store.lease_slot(p) == slot + 1 => {
                if s.expires_ns > now_ns {
                    Ok(())
                } else {
                    Err(Status::LEASE_EXPIRED)
                }
            }
            State::Expired => Err(Status::LEASE_EXPIRED),
            _ => Err(Status::LEASE_INVALID),
        }
    }

    /// Stages a COMMIT+MORE frame of the page's lease (which the caller checked) until the
    /// final COMMIT; BUSY when no staging buffer is free.
    pub fn stage(
        &mut self,
        store: &Store,
        p: PageIdx,
        offset: usize,
        data: &Bytes<'_>,
    ) -> Result<(), Status> {
        let slot = store
            .lease_slot(p)
            .checked_sub(1)
            .ok_or(Status::LEASE_INVALID)?;
        let s = &mut self.slots[usize::from(slot)];
        let i = match s.stage {
            Some(i) => i,
            None => {
                let i = self.stages.take().ok_or(Status::BUSY)?;
                s.stage = Some(i);
                i
            }
        };
        self.stages.put(i, offset, data);
        Ok(())
    }

    /// Writes what the page's lease staged into the page (the final COMMIT, before its own
    /// frame and the release).
    pub fn apply_staged(&self, store: &mut Store, p: PageIdx) {
        if let Some(slot) = store.lease_slot(p).checked_sub(1)
            && let Some(i) = self.slots[usize::from(slot)].stage
        {
            self.stages.apply(i, store.page_mut(p));
        }
    }

    /// Ends the page's lease (commit, release, or the page being freed).
    pub fn release(&mut self, store: &mut Store, p: PageIdx) {
        self.end(store, p, State::Ended);
    }

    /// Leases granted and not yet committed, released or reclaimed (after
    /// [`Leases::reclaim_expired`], the live ones).
    pub fn in_use(&self) -> u64 {
        self.granted
    }

    /// Live leases.
    pub fn held(&self, now_ns: u64) -> u64 {
        self.slots
            .iter()
            .filter(|l| l.state == State::Granted && l.expires_ns > now_ns)
            .count() as u64
    }

    /// Bytes the table takes (for the memory report).
    pub fn bytes(&self) -> usize {
        self.slots.capacity() * size_of::<Slot>()
            + self.stages.bytes()
            + self.free.capacity() * 2
            + (2 * self.slots.len() + 16) * size_of::<Reverse<(u64, u16, u32)>>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: ClientKey = ClientKey {
        addr: [1; 16],
        port: 1,
    };
    const B: ClientKey = ClientKey {
        addr: [2; 16],
        port: 1,
    };
    const MS: u64 = 1_000_000;

    fn store() -> Store {
        Store::new(2 << 20, false).unwrap()
    }

    #[test]
    fn acquire_commit_expire() {
        let mut s = store();
        let (p, _) = s.alloc(1, true).unwrap();
        let mut l = Leases::new(4, 100, 1000);
        let now = 5 * MS;
        let g = l.acquire(&mut s, p, A, 1, 0, now).unwrap();
        assert_eq!(g.ms, 100);
        assert_ne!(g.id, 0);
        // A retransmitted acquire gets the same lease; anyone else is refused.
        assert_eq!(l.acquire(&mut s, p, A, 1, 0, now + MS).unwrap().id, g.id);
        assert_eq!(l.acquire(&mut s, p, A, 2, 0, now), Err(Status::LEASE_HELD));
        assert_eq!(l.acquire(&mut s, p, B, 1, 0, now), Err(Status::LEASE_HELD));
        assert_eq!(l.check_writer(&s, p, B, now), Err(Status::LEASE_HELD));
        assert_eq!(l.check_writer(&s, p, A, now), Ok(()));
        assert_eq!(l.check(&s, p, g.id, A, now), Ok(()));
        assert_eq!(l.check(&s, p, g.id + 1, A, now), Err(Status::LEASE_INVALID));
        assert_eq!(l.held(now), 1);
        // After expiry: the holder's late commit is rejected as expired, others may acquire.
        let late = now + 101 * MS;
        assert_eq!(l.check(&s, p, g.id, A, late), Err(Status::LEASE_EXPIRED));
        assert_eq!(l.check_writer(&s, p, B, late), Ok(()));
        let g2 = l.acquire(&mut s, p, B, 9, 5000, late).unwrap();
        assert_eq!(g2.ms, 1000);
        assert_ne!(g2.id, g.id);
        assert_eq!(l.check(&s, p, g.id, A, late), Err(Status::LEASE_EXPIRED));
        l.release(&mut s, p);
        assert_eq!(l.held(late), 0);
        assert_eq!(l.check(&s, p, g2.id, B, late), Err(Status::LEASE_INVALID));
    }

    /// §5.8: 0 and made-up ids are LEASE_INVALID, on a page with a lease or without one.
    #[test]
    fn zero_and_made_up_ids_are_invalid() {
        let mut s = store();
        let (p, _) = s.alloc(1, true).unwrap();
        let (q, _) = s.alloc(1, true).unwrap();
        let mut l = Leases::new(4, 100, 1000);
        for id in [0, 1, 1 << 24 | 1, u64::MAX] {
            assert_eq!(l.check(&s, p, id, A, 0), Err(Status::LEASE_INVALID));
        }
        let g = l.acquire(&mut s, p, A, 1, 0, 0).unwrap();
        // Someone else's page.
        assert_eq!(l.check(&s, q, g.id, A, 0), Err(Status::LEASE_INVALID));
        // Far in the future: still no hint.
        assert_eq!(
            l.check(&s, q, g.id, A, u64::MAX),
            Err(Status::LEASE_INVALID)
        );
    }

    /// The hijack: another client presenting the holder's id (guessed or seen) gets
    /// LEASE_INVALID, live or expired; guessing the id is hopeless.
    #[test]
    fn ids_are_bound_to_the_holder_and_unguessable() {
        let mut s = store();
        let (p, _) = s.alloc(1, true).unwrap();
        let mut l = Leases::new(64, 100, 1000);
        let g = l.acquire(&mut s, p, A, 1, 0, 0).unwrap();
        assert_eq!(l.check(&s, p, g.id, B, 0), Err(Status::LEASE_INVALID));
        let other_port = ClientKey { port: 2, ..A };
        assert_eq!(
            l.check(&s, p, g.id, other_port, 0),
            Err(Status::LEASE_INVALID)
        );
        assert_eq!(
            l.check(&s, p, g.id, B, 200 * MS),
            Err(Status::LEASE_INVALID)
        );
        // Ids of consecutive grants share nothing an attacker could step along.
        let mut ids = vec![];
        for i in 0..32 {
            l.release(&mut s, p);
            ids.push(l.acquire(&mut s, p, A, 10 + i, 0, 0).unwrap().id);
        }
        let live = *ids.last().unwrap();
        for w in ids.windows(2) {
            assert!(
                (w[1] ^ w[0]).count_ones() > 8,
                "{:#x} then {:#x}",
                w[0],
                w[1]
            );
        }
        // Neighbours of the live id, earlier ids and random guesses: none is accepted.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let guesses = (1..=1000u64)
            .flat_map(|d| [live.wrapping_add(d), live.wrapping_sub(d), live ^ d << 3])
            .chain(ids[..31].iter().copied())
            .chain((0..100_000).map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            }));
        for guess in guesses {
            assert_eq!(
                l.check(&s, p, guess, A, 0),
                Err(Status::LEASE_INVALID),
                "{guess:#x}"
            );
        }
        assert_eq!(l.check(&s, p, live, A, 0), Ok(()));
    }

    /// Leases that run out free their slots: a full table of abandoned leases takes new ones
    /// once they expire, and stops counting them as held.
    #[test]
    fn expired_leases_free_their_slots() {
        let mut s = store();
        let mut l = Leases::new(8, 100, 1000);
        let pages: Vec<_> = (0..9).map(|_| s.alloc(1, true).unwrap().0).collect();
        for (i, &p) in pages[..8].iter().enumerate() {
            l.acquire(&mut s, p, A, i as u64, 50, 0).unwrap();
        }
        assert_eq!(
            l.acquire(&mut s, pages[8], B, 1, 0, 10 * MS),
            Err(Status::BUSY)
        );
        assert_eq!(l.in_use(), 8);
        l.reclaim_expired(&mut s, 51 * MS);
        assert_eq!(l.in_use(), 0);
        assert!(pages.iter().all(|&p| s.lease_slot(p) == 0));
        for (i, &p) in pages[1..].iter().enumerate() {
            l.acquire(&mut s, p, B, 100 + i as u64, 0, 52 * MS).unwrap();
        }
        assert_eq!(l.in_use(), 8);
        // Committed leases leave nothing behind in the expiry heap for long.
        for round in 0..100u64 {
            for (i, &p) in pages[1..].iter().enumerate() {
                l.release(&mut s, p);
                l.acquire(&mut s, p, B, 1000 * round + i as u64, 0, 52 * MS)
                    .unwrap();
            }
        }
        assert!(l.expiries.len() <= 2 * 8 + 16 + 1, "{}", l.expiries.len());
    }

    #[test]
    fn table_full_is_busy() {
        let mut s = store();
        let mut l = Leases::new(1, 100, 1000);
        let (p, _) = s.alloc(1, true).unwrap();
        let (q, _) = s.alloc(1, true).unwrap();
        l.acquire(&mut s, p, A, 1, 0, 0).unwrap();
        assert_eq!(l.acquire(&mut s, q, A, 2, 0, 0), Err(Status::BUSY));
        l.release(&mut s, p);
        l.acquire(&mut s, q, A, 2, 0, 0).unwrap();
    }

    #[test]
    fn huge_lease_times_are_capped() {
        let mut s = store();
        let (p, _) = s.alloc(1, true).unwrap();
        let mut l = Leases::new(1, u64::MAX, u64::MAX);
        let now = 7 * MS;
        let g = l.acquire(&mut s, p, A, 1, u64::MAX, now).unwrap();
        assert_eq!(g.ms, LEASE_MS_LIMIT);
        assert_eq!(l.check(&s, p, g.id, A, now + MS), Ok(()));
    }
}
