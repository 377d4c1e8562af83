//! The page store: a hugepage-backed arena of 4 KiB pages, 16 bytes of metadata per page, and
//! handles that the server validates on every use.
//!
//! A server has one store per shard (worker); each owns its own arena, metadata and free list
//! and is touched by its shard's thread only. A handle carries the shard in the clear in its
//! top byte ([`PageHandle::shard_field`]: 1 + the shard index), so the NIC or the client can
//! steer a page's requests to its shard; the other 56 bits are a keyed permutation (a 4-round
//! Feistel network of 28-bit halves with SipHash-1-3 rounds) of (page index, generation).
//! Generations start at a random value per page and advance on every FREE, so a freed handle
//! decodes to an older generation (STALE_HANDLE) and a guessed one almost never decodes to a
//! live page (INVALID_HANDLE or STALE_HANDLE).

use bluebridge_proto::{PAGE_SIZE, PageHandle, Status};
use memmap2::{MmapMut, MmapOptions};

use crate::hot::{HOT_COUNTERS, HotShard};
use crate::keyed::Feistel;

/// Index of a page in the arena.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct PageIdx(pub u32);

const ALLOCATED: u16 = 1;
const SHARED: u16 = 2;
const MOVED: u16 = 4;
const DETACHED: u16 = 8;
const NO_PAGE: u32 = u32::MAX;
/// Bits of each Feistel half: page index and generation.
const HALF_BITS: u32 = 28;
const HALF_MASK: u32 = (1 << HALF_BITS) - 1;
/// Pages one shard can hold (2^28: 1 TiB).
pub const MAX_SHARD_PAGES: u64 = 1 << HALF_BITS;

/// Per-page metadata: 16 bytes.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
#[repr(C)]
struct PageMeta {
    /// Advances on FREE.
    generation: u32,
    /// The allocating client's id in the handler's owner table.
    owner: u32,
    /// ALLOCATED, SHARED, MOVED, DETACHED.
    flags: u16,
    /// Lease slot + 1, or 0.
    lease: u16,
    /// Free-list link while the page is free.
    next_free: u32,
}

const _: () = assert!(size_of::<PageMeta>() == 16);

/// Errors creating a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The arena size is not a positive multiple of 2 MiB, or holds more pages than handles
    /// can name.
    #[error(
        "arena size {0} bytes per shard: must be a positive multiple of 2 MiB and at most 1 TiB"
    )]
    BadSize(u64),
    /// The shard index does not fit a handle's shard field.
    #[error("shard {0}: a server has at most 255 shards")]
    BadShard(usize),
    /// The memory could not be mapped at all.
    #[error("mapping a {bytes}-byte arena: {source}")]
    Map {
        /// Size asked for.
        bytes: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No randomness for the handle key.
    #[error("reading random bytes for the handle key: {0}")]
    Random(getrandom::Error),
}

/// What backs the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// 2 MiB hugepages (MAP_HUGETLB).
    Huge2M,
    /// Ordinary 4 KiB pages (hugepages were not available).
    Normal,
}

/// The page store.
pub struct Store {
    shard: u8,
    mem: MmapMut,
    backing: Backing,
    meta: Vec<PageMeta>,
    free_head: u32,
    used: u32,
    codec: HandleCodec,
    /// The codec's key: a replica of this store (§5.19) is made under the same one, so it
    /// hands out and accepts the same handles.
    key: [u8; 32],
    /// A copy of the pages to a new backup under way.
    copy: Option<Box<Copying>>,
    /// This shard's slots of the XDP hot-page store, if the server has one: every change
    /// to a page's bytes or access goes through here first.
    hot: Option<Box<HotShard>>,
}

/// The pages' metadata as a replica's snapshot carries it: the slots that differ from a fresh
/// store's (the twin's store is made under the same key, so it starts from the same).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct StoreState {
    pages: u32,
    changed: Vec<(u32, PageMeta)>,
    free_head: u32,
    used: u32,
}

/// A copy of the pages under way (docs/protocol.md §5.19): every page allocated when it began
/// goes to the new backup once, either by the background walk or, if a request is about to
/// change it first, as it was just before that change.
#[derive(Debug)]
struct Copying {
    /// A bit per slot: its bytes are on their way.
    sent: Vec<u64>,
    /// Pages taken just before a change, to go into the stream ahead of the request.
    taken: Vec<(u32, Box<[u8; PAGE_SIZE]>)>,
    /// Where the background walk stands.
    cursor: u32,
    /// Pages allocated when the copy began, and those of them not yet on their way.
    total: u32,
    left: u32,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("shard", &self.shard)
            .field("pages", &self.meta.len())
            .field("used", &self.used)
            .field("backing", &self.backing)
            .finish_non_exhaustive()
    }
}

const HUGE: u64 = 2 << 20;

impl Store {
    /// The store of a server with one shard: [`Store::for_shard`] of shard 0.
    pub fn new(arena_bytes: u64, try_huge: bool) -> Result<Self, StoreError> {
        Self::for_shard(0, arena_bytes, try_huge)
    }

    /// The store of shard `shard` (its handles carry it): `arena_bytes` (a multiple of 2 MiB),
    /// on hugepages when `try_huge` and the kernel has them reserved, else on ordinary pages
    /// with a warning. All memory is touched up front (MAP_POPULATE), so a request never faults.
    pub fn for_shard(shard: usize, arena_bytes: u64, try_huge: bool) -> Result<Self, StoreError> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(StoreError::Random)?;
        Self::with_key(shard, arena_bytes, try_huge, key)
    }

    /// Like [`Store::for_shard`], under a given handle key: the replica of another server's
    /// shard (docs/protocol.md §5.19), whose handles must be that server's.
    pub fn with_key(
        shard: usize,
        arena_bytes: u64,
        try_huge: bool,
        key: [u8; 32],
    ) -> Result<Self, StoreError> {
        let shard = u8::try_from(shard)
            .ok()
            .filter(|&s| usize::from(s) < bluebridge_proto::addr::MAX_SHARDS)
            .ok_or(StoreError::BadShard(shard))?;
        let pages = arena_bytes / PAGE_SIZE as u64;
        if arena_bytes == 0 || !arena_bytes.is_multiple_of(HUGE) || pages > MAX_SHARD_PAGES {
            return Err(StoreError::BadSize(arena_bytes));
        }
        let len = usize::try_from(arena_bytes).map_err(|_| StoreError::BadSize(arena_bytes))?;
        let huge = try_huge.then(|| {
            MmapOptions::new()
                .len(len)
                .huge(Some(21))
                .populate()
                .map_anon()
        });
        let (mem, backing) = match huge {
            Some(Ok(m)) => (m, Backing::Huge2M),
            other => {
                if let Some(Err(e)) = other {
                    tracing::warn!(
                        error = %e, bytes = arena_bytes,
                        "no 2 MiB hugepages for the arena (reserve them in \
                         /proc/sys/vm/nr_hugepages); using ordinary pages"
                    );
                }
                let m = MmapOptions::new()
                    .len(len)
                    .populate()
                    .map_anon()
                    .map_err(|source| StoreError::Map {
                        bytes: arena_bytes,
                        source,
                    })?;
                (m, Backing::Normal)
            }
        };
        let codec = HandleCodec::new(key);
        let n = pages as u32;
        let meta = (0..n)
            .map(|i| PageMeta {
                generation: codec.initial_generation(i),
                next_free: if i + 1 < n { i + 1 } else { NO_PAGE },
                ..PageMeta::default()
            })
            .collect();
        Ok(Store {
            shard,
            mem,
            backing,
            meta,
            free_head: 0,
            used: 0,
            codec,
            key,
            copy: None,
            hot: None,
        })
    }

    /// Slot `i`'s metadata in a fresh store of `n` pages.
    fn fresh_meta(&self, i: u32, n: u32) -> PageMeta {
        PageMeta {
            generation: self.codec.initial_generation(i),
            next_free: if i + 1 < n { i + 1 } else { NO_PAGE },
            ..PageMeta::default()
        }
    }

    /// The metadata, for a replica's snapshot.
    pub(crate) fn state(&self) -> StoreState {
        let n = self.meta.len() as u32;
        let changed = (0..n)
            .filter_map(|i| {
                let (m, f) = (self.meta[i as usize], self.fresh_meta(i, n));
                let same = (m.generation, m.owner, m.flags, m.lease, m.next_free)
                    == (f.generation, f.owner, f.flags, f.lease, f.next_free);
                (!same).then_some((i, m))
            })
            .collect();
        StoreState {
            pages: n,
            changed,
            free_head: self.free_head,
            used: self.used,
        }
    }

    /// Takes a snapshot's metadata (this store must be fresh, under the snapshot's key);
    /// `false` if it is not one of this size.
    pub(crate) fn set_state(&mut self, s: StoreState) -> bool {
        if s.pages as usize != self.meta.len()
            || s.changed
                .iter()
                .any(|(i, _)| *i as usize >= self.meta.len())
        {
            return false;
        }
        if let Some(h) = self.hot.as_deref_mut() {
            h.clear();
        }
        for (i, m) in s.changed {
            self.meta[i as usize] = m;
        }
        self.free_head = s.free_head;
        self.used = s.used;
        true
    }

    /// Starts copying the pages to a new backup (see [`Store::next_to_copy`] and
    /// [`Store::take_changed`]); a copy already under way starts over.
    pub(crate) fn start_copy(&mut self) {
        let n = self.meta.len();
        let total = self
            .meta
            .iter()
            .filter(|m| m.flags & ALLOCATED != 0)
            .count() as u32;
        self.copy = Some(Box::new(Copying {
            sent: vec![0; n.div_ceil(64)],
            taken: Vec::new(),
            cursor: 0,
            total,
            left: total,
        }));
    }

    /// Stops copying.
    pub(crate) fn end_copy(&mut self) {
        self.copy = None;
    }

    /// (pages not yet copied, pages to copy) of the copy under way.
    pub(crate) fn copy_progress(&self) -> Option<(u32, u32)> {
        self.copy.as_ref().map(|c| (c.left, c.total))
    }

    /// The next page of the background walk not yet copied (marked copied now), or `None`
    /// when the walk is done.
    pub(crate) fn next_to_copy(&mut self) -> Option<PageIdx> {
        let c = self.copy.as_deref_mut()?;
        while (c.cursor as usize) < self.meta.len() {
            let i = c.cursor;
            c.cursor += 1;
            if self.meta[i as usize].flags & ALLOCATED != 0 && !mark_sent(c, i) {
                return Some(PageIdx(i));
            }
        }
        None
    }

    /// The pages taken just before a change since the last call (slot, bytes before it).
    pub(crate) fn take_changed(&mut self) -> Vec<(u32, Box<[u8; PAGE_SIZE]>)> {
        self.copy
            .as_deref_mut()
            .map(|c| std::mem::take(&mut c.taken))
            .unwrap_or_default()
    }

    /// Writes a page's bytes as a replica's stream carries them (no copy is taken).
    pub(crate) fn install_page(&mut self, p: PageIdx, bytes: &[u8]) -> bool {
        if let Some(h) = self.hot.as_deref_mut() {
            h.evict(p);
        }
        let at = p.0 as usize * PAGE_SIZE;
        match self.mem.get_mut(at..at + PAGE_SIZE) {
            Some(dst) if bytes.len() == PAGE_SIZE => {
                dst.copy_from_slice(bytes);
                true
            }
            _ => false,
        }
    }

    /// The handle key (for a replica's INIT record, §5.19).
    pub fn key(&self) -> [u8; 32] {
        self.key
    }

    /// Bytes in the arena.
    pub fn arena_bytes(&self) -> u64 {
        self.meta.len() as u64 * PAGE_SIZE as u64
    }

    /// The shard this store belongs to.
    pub fn shard(&self) -> usize {
        usize::from(self.shard)
    }

    /// What backs the arena.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// Pages in the arena.
    pub fn pages_total(&self) -> u32 {
        self.meta.len() as u32
    }

    /// Pages allocated now.
    pub fn pages_used(&self) -> u32 {
        self.used
    }

    /// Bytes of metadata (for the memory report).
    pub fn meta_bytes(&self) -> usize {
        self.meta.capacity() * size_of::<PageMeta>()
    }

    /// Allocates a zeroed page owned by `owner` (an id of the caller's choosing).
    pub fn alloc(&mut self, owner: u32, shared: bool) -> Result<(PageIdx, PageHandle), Status> {
        let i = self.free_head;
        if i == NO_PAGE {
            return Err(Status::OUT_OF_MEMORY);
        }
        let m = &mut self.meta[i as usize];
        self.free_head = m.next_free;
        m.next_free = NO_PAGE;
        m.flags = ALLOCATED | if shared { SHARED } else { 0 };
        m.lease = 0;
        m.owner = owner;
        let h = self.codec.encode(self.shard, i, m.generation);
        self.used += 1;
        Ok((PageIdx(i), h))
    }

    /// Whether `n` pages can be allocated now.
    pub fn can_alloc(&self, n: u32) -> bool {
        self.pages_total() - self.used >= n
    }

    /// The page a handle names, if it is live: INVALID_HANDLE for a handle this store never
    /// made, STALE_HANDLE for one whose page has been freed since.
    pub fn resolve(&self, h: PageHandle) -> Result<PageIdx, Status> {
        if h.shard_field() != self.shard + 1 {
            return Err(Status::INVALID_HANDLE);
        }
        let (i, generation) = self.codec.decode(h);
        let Some(m) = self.meta.get(i as usize) else {
            return Err(Status::INVALID_HANDLE);
        };
        if m.generation == generation && m.flags & ALLOCATED != 0 {
            return Ok(PageIdx(i));
        }
        // Generations before the current one (within half the circle) were freed.
        let behind = m.generation.wrapping_sub(generation) & HALF_MASK;
        if behind != 0 && behind < 1 << (HALF_BITS - 1) {
            Err(Status::STALE_HANDLE)
        } else {
            Err(Status::INVALID_HANDLE)
        }
    }

    /// The handle of a live page.
    pub fn handle_of(&self, p: PageIdx) -> PageHandle {
        self.codec
            .encode(self.shard, p.0, self.meta[p.0 as usize].generation)
    }

    /// Zeroes and frees a live page; its handle becomes stale.
    pub fn free(&mut self, p: PageIdx) {
        if let Some(h) = self.hot.as_deref_mut() {
            h.evict(p); // before its handle goes stale: XDP never serves it again
        }
        self.page_mut(p).fill(0);
        let m = &mut self.meta[p.0 as usize];
        debug_assert!(m.flags & ALLOCATED != 0);
        m.generation = m.generation.wrapping_add(1) & HALF_MASK;
        m.flags = 0;
        m.lease = 0;
        m.owner = 0;
        m.next_free = self.free_head;
        self.free_head = p.0;
        self.used -= 1;
    }

    /// The page's bytes.
    pub fn page(&self, p: PageIdx) -> &[u8] {
        let at = p.0 as usize * PAGE_SIZE;
        &self.mem[at..at + PAGE_SIZE]
    }

    /// The page's bytes, writable. While a copy to a new backup is under way, a page not yet
    /// copied is taken as it is first ([`Store::take_changed`]).
    pub fn page_mut(&mut self, p: PageIdx) -> &mut [u8] {
        if let Some(h) = self.hot.as_deref_mut() {
            h.changing(p);
        }
        let at = p.0 as usize * PAGE_SIZE;
        if let Some(c) = self.copy.as_deref_mut()
            && self.meta[p.0 as usize].flags & ALLOCATED != 0
            && !mark_sent(c, p.0)
        {
            let mut b = Box::new([0u8; PAGE_SIZE]);
            b.copy_from_slice(&self.mem[at..at + PAGE_SIZE]);
            c.taken.push((p.0, b));
        }
        &mut self.mem[at..at + PAGE_SIZE]
    }

    /// Gives the store its slots of the XDP hot-page store.
    pub fn set_hot(&mut self, hot: HotShard) {
        self.hot = Some(Box::new(hot));
    }

    /// Whether the store has slots in the XDP hot-page store.
    pub fn has_hot(&self) -> bool {
        self.hot.is_some()
    }

    /// Copies live page `p` into the hot-page store, where XDP finds it under `key` (its
    /// address's page part), for `owner` (unless shared).
    pub fn promote_hot(&mut self, p: PageIdx, key: bluebridge_ebpf::HotKey, owner: [u8; 16]) {
        let shared = self.is_shared(p);
        let at = p.0 as usize * PAGE_SIZE;
        if let Some(h) = self.hot.as_deref_mut()
            && self.meta[p.0 as usize].flags & (ALLOCATED | MOVED) == ALLOCATED
        {
            h.promote(p, key, owner, shared, &self.mem[at..at + PAGE_SIZE]);
        }
    }

    /// Copies the hot pages changed since the last call into their slots (XDP serves them
    /// again).
    pub fn publish_hot(&mut self) {
        let Some(h) = self.hot.as_deref_mut() else {
            return;
        };
        let (mem, meta) = (&self.mem, &self.meta);
        h.publish(|p| {
            let at = p.0 as usize * PAGE_SIZE;
            (
                &mem[at..at + PAGE_SIZE],
                meta[p.0 as usize].flags & SHARED != 0,
            )
        });
    }

    /// Every page leaves the hot-page store.
    pub fn clear_hot(&mut self) {
        if let Some(h) = self.hot.as_deref_mut() {
            h.clear();
        }
    }

    /// Calls `heard` with the owner of every private hot page XDP served since the last call.
    pub fn hot_served_owners(&mut self, heard: impl FnMut(&[u8; 16])) {
        let meta = &self.meta;
        if let Some(h) = self.hot.as_deref_mut() {
            h.served_owners(|p| meta[p.0 as usize].flags & SHARED != 0, heard);
        }
    }

    /// The hot-page counters by [`HotCounter`] (zeros without a hot store).
    pub fn hot_counters(&self) -> [u64; HOT_COUNTERS.len()] {
        self.hot
            .as_deref()
            .map(HotShard::counters)
            .unwrap_or_default()
    }

    /// The lease slot + 1 recorded for the page (0 = none).
    pub fn lease_slot(&self, p: PageIdx) -> u16 {
        self.meta[p.0 as usize].lease
    }

    /// Records the page's lease slot + 1 (0 = none).
    pub fn set_lease_slot(&mut self, p: PageIdx, slot: u16) {
        self.meta[p.0 as usize].lease = slot;
    }

    /// Whether the page was allocated with SHARED or shared since.
    pub fn is_shared(&self, p: PageIdx) -> bool {
        self.meta[p.0 as usize].flags & SHARED != 0
    }

    /// Lets every client use the page.
    pub fn share(&mut self, p: PageIdx) {
        if let Some(h) = self.hot.as_deref_mut() {
            h.changing(p); // its slot's flags follow at the next publish
        }
        self.meta[p.0 as usize].flags |= SHARED;
    }

    /// Marks the page as migrated away: requests for it are answered MOVED. It stays allocated
    /// (its handle must keep answering MOVED rather than STALE_HANDLE) until freed.
    pub fn mark_moved(&mut self, p: PageIdx) {
        if let Some(h) = self.hot.as_deref_mut() {
            h.evict(p); // its holder answers for it now
        }
        self.meta[p.0 as usize].flags |= MOVED;
    }

    /// The page is back (migrated home again).
    pub fn unmark_moved(&mut self, p: PageIdx) {
        self.meta[p.0 as usize].flags &= !MOVED;
    }

    /// Whether the page was migrated away.
    pub fn is_moved(&self, p: PageIdx) -> bool {
        self.meta[p.0 as usize].flags & MOVED != 0
    }

    /// The owner id given at allocation.
    pub fn owner(&self, p: PageIdx) -> u32 {
        self.meta[p.0 as usize].owner
    }

    /// Keeps the page when its owner falls silent (it stays until freed).
    pub fn detach(&mut self, p: PageIdx) {
        self.meta[p.0 as usize].flags |= DETACHED;
    }

    /// The owner of slot `p` if it holds a live page here; `None` for a free slot, one past
    /// the arena, or a page migrated away (its holder answers for it). With `exempt_too`
    /// false, also `None` for the pages an owner's silence does not reclaim: shared and
    /// detached ones.
    pub fn owner_of_slot(&self, p: PageIdx, exempt_too: bool) -> Option<u32> {
        let m = self.meta.get(p.0 as usize)?;
        let exempt = m.flags & (SHARED | DETACHED) != 0;
        let here = m.flags & (ALLOCATED | MOVED) == ALLOCATED;
        (here && (exempt_too || !exempt)).then_some(m.owner)
    }
}

/// Marks slot `i` copied; whether it was already. A slot allocated when the copy began counts
/// down what is left.
fn mark_sent(c: &mut Copying, i: u32) -> bool {
    let (w, b) = (i as usize / 64, 1u64 << (i % 64));
    let was = c.sent[w] & b != 0;
    if !was {
        c.sent[w] |= b;
        c.left = c.left.saturating_sub(1);
    }
    was
}

/// The keyed permutation between (index, generation) and handles.
struct HandleCodec(Feistel);

impl HandleCodec {
    fn new(key: [u8; 32]) -> Self {
        HandleCodec(Feistel::new(key, HALF_BITS))
    }

    fn initial_generation(&self, i: u32) -> u32 {
        self.0.hash(u64::from(i) | 1 << 63)
    }

    /// The handle of (index, generation), both below 2^28, on `shard`. Never handle 0: the
    /// shard field is at least 1.
    fn encode(&self, shard: u8, index: u32, generation: u32) -> PageHandle {
        let (l, r) = self.0.encrypt(index, generation);
        PageHandle::with_shard(shard, u64::from(l) << HALF_BITS | u64::from(r))
    }

    /// (index, generation) of a handle's opaque bits (the shard field is the caller's to check).
    fn decode(&self, h: PageHandle) -> (u32, u32) {
        let b = h.to_bits();
        self.0
            .decrypt((b >> HALF_BITS) as u32 & HALF_MASK, b as u32 & HALF_MASK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        Store::new(2 << 20, false).unwrap()
    }

    #[test]
    fn codec_is_a_permutation() {
        let c = HandleCodec::new([7; 32]);
        for (i, g) in [(0, 0), (1, 0), (0, 1), (HALF_MASK, HALF_MASK), (12345, 678)] {
            for shard in [0, 3, 254] {
                let h = c.encode(shard, i, g);
                assert_eq!(c.decode(h), (i, g));
                assert_eq!(h.shard_field(), shard + 1);
                assert!(!h.is_none());
            }
        }
    }

    #[test]
    fn alloc_free_resolve() {
        let mut s = store();
        assert_eq!(s.pages_total(), 512);
        let (p, h) = s.alloc(1, false).unwrap();
        assert_eq!(s.resolve(h), Ok(p));
        assert_eq!(s.handle_of(p), h);
        assert!(s.page(p).iter().all(|&b| b == 0));
        s.page_mut(p)[..4].copy_from_slice(b"data");
        s.free(p);
        assert_eq!(s.resolve(h), Err(Status::STALE_HANDLE));
        // The page comes back zeroed, under a new handle; the old one stays stale.
        let (p2, h2) = s.alloc(1, true).unwrap();
        assert_eq!(p2, p);
        assert_ne!(h2, h);
        assert!(s.page(p2).iter().all(|&b| b == 0));
        assert!(s.is_shared(p2));
        assert_eq!(s.resolve(h), Err(Status::STALE_HANDLE));
        assert_eq!(s.resolve(h2), Ok(p2));
    }

    #[test]
    fn exhaustion_and_reuse() {
        let mut s = store();
        let all: Vec<_> = (0..512).map(|_| s.alloc(1, false).unwrap()).collect();
        assert_eq!(s.alloc(1, false), Err(Status::OUT_OF_MEMORY));
        assert!(!s.can_alloc(1));
        s.free(all[7].0);
        assert!(s.can_alloc(1));
        assert_eq!(s.alloc(1, false).unwrap().0, all[7].0);
    }

    #[test]
    fn random_handles_are_rejected() {
        let mut s = store();
        let live: Vec<_> = (0..256).map(|_| s.alloc(1, false).unwrap().1).collect();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let h = PageHandle::from_bits(rng);
            if live.contains(&h) {
                continue;
            }
            assert!(s.resolve(h).is_err(), "random handle {h:?} resolved");
        }
    }

    #[test]
    fn handles_carry_their_shard() {
        let mut a = Store::for_shard(0, 2 << 20, false).unwrap();
        let mut b = Store::for_shard(3, 2 << 20, false).unwrap();
        let (_, ha) = a.alloc(1, false).unwrap();
        let (pb, hb) = b.alloc(1, false).unwrap();
        assert_eq!(ha.shard(4), Some(0));
        assert_eq!(hb.shard(4), Some(3));
        assert_eq!(b.resolve(hb), Ok(pb));
        // A handle of another shard is none of this store's, whatever its other bits say.
        assert_eq!(a.resolve(hb), Err(Status::INVALID_HANDLE));
        assert_eq!(b.resolve(ha), Err(Status::INVALID_HANDLE));
        assert!(matches!(
            Store::for_shard(255, 2 << 20, false),
            Err(StoreError::BadShard(255))
        ));
    }

    #[test]
    fn bad_sizes() {
        assert!(matches!(Store::new(0, false), Err(StoreError::BadSize(0))));
        assert!(matches!(
            Store::new(4096, false),
            Err(StoreError::BadSize(4096))
        ));
    }
}
