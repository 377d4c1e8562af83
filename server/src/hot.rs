//! The hot-page store, the server's side: copies of hot pages in slots `steer.bpf.c` answers
//! INLINE READs from (docs/protocol.md §6.1, docs/running.md "Hot pages in XDP").
//!
//! The slots are one `BPF_F_MMAPABLE` array the server maps ([`HotStore`]); each shard owns
//! a fixed range of them ([`HotShard`], inside its [`Store`](crate::store::Store)) and is
//! their only writer, so no lock is shared between workers. A slot is written under its
//! seqlock: its sequence turns odd before anything in it changes and even once it is whole
//! again; XDP serves from a slot only if it read the same even sequence before and after
//! copying. The store turns a hot page's slot odd the moment anything may change the page
//! ([`HotShard::changing`], called by every write path through `Store::page_mut`), so from
//! then on XDP leaves the page's READs to the worker, which answers from the page itself; the
//! worker copies the new bytes in ([`HotShard::publish`]) after the request, before its next
//! batch. A page freed, migrated away or restored from a snapshot leaves the store
//! ([`HotShard::evict`]).
//!
//! Which pages: a page is promoted when the worker answers an INLINE READ of it (XDP missed
//! it: the client asks for the fast path and the page is being read); when its range is full
//! the slot not hit since the clock hand last passed is given up (CLOCK), and if every slot
//! was hit since, the page waits for the next READ (counted `refused`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use bluebridge_ebpf::{HotIndex, HotKey, consts, hot_page_sum};
use bluebridge_proto::PAGE_SIZE;
use bluebridge_xsk::shared_map::SharedMap;

use crate::store::PageIdx;

const SLOT: usize = consts::BB_HOT_SLOT_SIZE as usize;
const OFF_FLAGS: usize = consts::BB_HOT_SLOT_OFF_FLAGS as usize;
const OFF_SUM: usize = consts::BB_HOT_SLOT_OFF_SUM as usize;
const OFF_HITS: usize = consts::BB_HOT_SLOT_OFF_HITS as usize;
const OFF_KEY: usize = consts::BB_HOT_SLOT_OFF_KEY as usize;
const OFF_DATA: usize = consts::BB_HOT_SLOT_OFF_DATA as usize;
/// The clock hand looks at no more slots than this for one promotion.
const CLOCK_STEPS: usize = 64;

/// The hot-page counters, in [`HotShard::counters`] by this index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HotCounter {
    /// Pages copied into a slot.
    Promoted,
    /// Pages that left the store (evicted for another, freed, migrated away).
    Demoted,
    /// Hot pages written: their slot copied again.
    Updated,
    /// Promotions given up: every slot of the shard was hit since the clock hand passed.
    Refused,
    /// Pages in the store now (a gauge).
    Pages,
    /// Index updates the kernel refused (the page stays out of the store).
    IndexErrors,
}

/// The names of [`HotCounter`]s, in order.
pub const HOT_COUNTERS: [&str; 6] = [
    "hot_promoted",
    "hot_demoted",
    "hot_updated",
    "hot_refused",
    "hot_pages",
    "hot_index_errors",
];

/// The mapped slot array, shared by the shards (each writes its own range).
#[derive(Debug)]
pub struct HotStore {
    map: SharedMap,
    slots: u32,
}

impl HotStore {
    /// Maps `slots` slots of the array behind `fd`.
    pub fn map(fd: std::os::fd::OwnedFd, slots: u32) -> std::io::Result<Self> {
        let len = (slots as usize * SLOT).next_multiple_of(4096);
        Ok(HotStore {
            map: SharedMap::map(fd, len)?,
            slots,
        })
    }

    /// Shard `i` of `n`'s range of slots.
    pub fn range(&self, i: usize, n: usize) -> std::ops::Range<u32> {
        let at = |k: usize| (self.slots as u64 * k as u64 / n as u64) as u32;
        at(i)..at(i + 1)
    }

    fn base(slot: u32) -> usize {
        slot as usize * SLOT
    }

    fn seq(&self, slot: u32) -> &std::sync::atomic::AtomicU32 {
        self.map.u32_at(Self::base(slot))
    }

    /// Turns the slot's sequence odd (nothing in it may change before): XDP leaves it alone
    /// from now on.
    fn begin(&self, slot: u32) {
        let seq = self.seq(slot);
        let s = seq.load(Ordering::Relaxed);
        if s & 1 == 0 {
            seq.store(s.wrapping_add(1), Ordering::Relaxed);
            // The odd sequence is visible before any of the writes that follow.
            fence(Ordering::Release);
        }
    }

    /// The slot is whole again: its sequence turns even, after everything written before.
    fn end(&self, slot: u32) {
        let seq = self.seq(slot);
        let s = seq.load(Ordering::Relaxed);
        seq.store((s | 1).wrapping_add(1), Ordering::Release);
    }

    fn set_u32(&self, slot: u32, off: usize, v: u32) {
        self.map
            .u32_at(Self::base(slot) + off)
            .store(v, Ordering::Relaxed);
    }

    fn write(&self, slot: u32, off: usize, bytes: &[u8]) {
        let words = self.map.u64s(Self::base(slot) + off, bytes.len() / 8);
        for (w, b) in words.iter().zip(bytes.chunks_exact(8)) {
            w.store(
                u64::from_ne_bytes(b.try_into().expect("8 bytes")),
                Ordering::Relaxed,
            );
        }
    }

    /// READs XDP served from the slot so far.
    fn hits(&self, slot: u32) -> u64 {
        self.map.u64s(Self::base(slot) + OFF_HITS, 1)[0].load(Ordering::Relaxed)
    }

    /// Writes the page's bytes, sum and flags (the slot is odd: between begin and end).
    fn fill(&self, slot: u32, data: &[u8], shared: bool) {
        self.write(slot, OFF_DATA, data);
        self.set_u32(slot, OFF_SUM, hot_page_sum(data));
        let flags = consts::BB_HOT_VALID | if shared { consts::BB_HOT_SHARED } else { 0 };
        self.set_u32(slot, OFF_FLAGS, flags);
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct SlotUse {
    page: Option<PageIdx>,
    key: HotKey,
    owner: [u8; 16],
    /// Hits when the clock hand last passed (second chance) and when liveness last looked.
    clock_hits: u64,
    heard_hits: u64,
    /// Odd since the page changed; copied again at the next publish.
    dirty: bool,
}

/// One shard's slots.
pub struct HotShard {
    store: Arc<HotStore>,
    first: u32,
    slots: Vec<SlotUse>,
    by_page: HashMap<PageIdx, u32>,
    index: HotIndex,
    free: Vec<u32>,
    dirty: Vec<u32>,
    hand: usize,
    counters: [u64; HOT_COUNTERS.len()],
}

impl std::fmt::Debug for HotShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotShard")
            .field("first", &self.first)
            .field("slots", &self.slots.len())
            .field("pages", &self.by_page.len())
            .finish_non_exhaustive()
    }
}

impl HotShard {
    /// The shard's slots `range` of `store`, indexed through `index`. The slots are cleared.
    pub fn new(store: Arc<HotStore>, range: std::ops::Range<u32>, index: HotIndex) -> Self {
        let n = range.len();
        for s in range.clone() {
            store.begin(s);
            store.set_u32(s, OFF_FLAGS, 0);
            store.end(s);
        }
        HotShard {
            store,
            first: range.start,
            slots: vec![SlotUse::default(); n],
            by_page: HashMap::with_capacity(n),
            index,
            free: (0..n as u32).rev().collect(),
            dirty: Vec::new(),
            hand: 0,
            counters: [0; HOT_COUNTERS.len()],
        }
    }

    /// The counters, by [`HotCounter`].
    pub fn counters(&self) -> [u64; HOT_COUNTERS.len()] {
        let mut c = self.counters;
        c[HotCounter::Pages as usize] = self.by_page.len() as u64;
        c
    }

    fn count(&mut self, c: HotCounter) {
        self.counters[c as usize] += 1;
    }

    /// Copies page `p` (`data`) into a slot XDP finds under `key`, readable by `owner` only
    /// unless `shared`. Nothing if it is there already or no slot can be had.
    pub fn promote(&mut self, p: PageIdx, key: HotKey, owner: [u8; 16], shared: bool, data: &[u8]) {
        debug_assert_eq!(data.len(), PAGE_SIZE);
        if self.by_page.contains_key(&p) || self.slots.is_empty() {
            return;
        }
        let Some(local) = self.free.pop().or_else(|| self.victim()) else {
            self.count(HotCounter::Refused);
            return;
        };
        let slot = self.first + local;
        let st = &self.store;
        st.begin(slot);
        let mut head = [0u8; 32];
        head[..16].copy_from_slice(&key);
        head[16..].copy_from_slice(&owner);
        st.write(slot, OFF_KEY, &head);
        st.fill(slot, data, shared);
        st.end(slot);
        if let Err(e) = self.index.insert(&key, slot) {
            tracing::warn!(slot, error = %e, "indexing a hot page failed: it stays out");
            self.count(HotCounter::IndexErrors);
            self.clear_slot(local);
            self.free.push(local);
            return;
        }
        let hits = st.hits(slot);
        self.slots[local as usize] = SlotUse {
            page: Some(p),
            key,
            owner,
            clock_hits: hits,
            heard_hits: hits,
            dirty: false,
        };
        self.by_page.insert(p, local);
        self.count(HotCounter::Promoted);
    }

    /// A slot not hit since the clock hand last passed it, emptied; `None` if the hand went
    /// [`CLOCK_STEPS`] slots without finding one.
    fn victim(&mut self) -> Option<u32> {
        for _ in 0..CLOCK_STEPS.min(self.slots.len() * 2) {
            let local = self.hand as u32;
            self.hand = (self.hand + 1) % self.slots.len();
            let u = self.slots[local as usize];
            let Some(p) = u.page else {
                return Some(local);
            };
            if u.dirty {
                continue; // being written: not now
            }
            let hits = self.store.hits(self.first + local);
            if hits != u.clock_hits {
                self.slots[local as usize].clock_hits = hits;
                continue;
            }
            self.evict(p); // puts it on the free list, last
            return self.free.pop();
        }
        None
    }

    /// Page `p` is about to change: its slot (if any) turns odd until the next
    /// [`HotShard::publish`].
    pub fn changing(&mut self, p: PageIdx) {
        let Some(&local) = self.by_page.get(&p) else {
            return;
        };
        let u = &mut self.slots[local as usize];
        if !u.dirty {
            u.dirty = true;
            self.store.begin(self.first + local);
            self.dirty.push(local);
        }
    }

    /// Copies the pages changed since the last call into their slots (`page(p)`: its bytes
    /// and whether it is shared now).
    pub fn publish<'a>(&mut self, page: impl Fn(PageIdx) -> (&'a [u8], bool)) {
        while let Some(local) = self.dirty.pop() {
            let u = &mut self.slots[local as usize];
            u.dirty = false;
            let Some(p) = u.page else { continue };
            let (data, shared) = page(p);
            let slot = self.first + local;
            self.store.fill(slot, data, shared);
            self.store.end(slot);
            self.counters[HotCounter::Updated as usize] += 1;
        }
    }

    /// Page `p` leaves the store (freed, migrated away, evicted): XDP stops serving it
    /// before this returns.
    pub fn evict(&mut self, p: PageIdx) {
        let Some(local) = self.by_page.remove(&p) else {
            return;
        };
        self.clear_slot(local);
        let key = self.slots[local as usize].key;
        if let Err(e) = self.index.remove(&key) {
            // The slot no longer holds the page, so the entry only costs XDP a lookup.
            tracing::warn!(error = %e, "removing a hot page from the index failed");
            self.count(HotCounter::IndexErrors);
        }
        if self.slots[local as usize].dirty {
            self.dirty.retain(|&d| d != local);
        }
        self.slots[local as usize] = SlotUse::default();
        self.free.push(local);
        self.count(HotCounter::Demoted);
    }

    fn clear_slot(&self, local: u32) {
        let slot = self.first + local;
        self.store.begin(slot);
        self.store.set_u32(slot, OFF_FLAGS, 0);
        self.store.end(slot);
    }

    /// Every page leaves the store.
    pub fn clear(&mut self) {
        let pages: Vec<PageIdx> = self.by_page.keys().copied().collect();
        for p in pages {
            self.evict(p);
        }
    }

    /// Calls `heard` with the owner of every page XDP served since the last call (and that
    /// only its owner may read): the worker never saw those READs, yet they are its owner's
    /// sign of life (docs/protocol.md §5.17).
    pub fn served_owners(
        &mut self,
        shared: impl Fn(PageIdx) -> bool,
        mut heard: impl FnMut(&[u8; 16]),
    ) {
        for (local, u) in self.slots.iter_mut().enumerate() {
            let Some(p) = u.page else { continue };
            let hits = self.store.hits(self.first + local as u32);
            if hits != u.heard_hits {
                u.heard_hits = hits;
                if !shared(p) {
                    heard(&u.owner);
                }
            }
        }
    }
}
