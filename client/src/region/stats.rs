//! A region's counters (kept by the handler, read by `stats()`) and fault traces.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

/// Counters of a region, readable while it runs.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) faults: AtomicU64,
    pub(super) write_faults: AtomicU64,
    pub(super) evictions: AtomicU64,
    pub(super) writebacks: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) resident: AtomicU64,
    pub(super) upgrades: AtomicU64,
    pub(super) recalls: AtomicU64,
    pub(super) revokes: AtomicU64,
    pub(super) lost_writes: AtomicU64,
    pub(super) lapses: AtomicU64,
    pub(super) prefetches: AtomicU64,
    pub(super) prefetch_hits: AtomicU64,
    pub(super) prefetch_late: AtomicU64,
    pub(super) prefetch_misses: AtomicU64,
    pub(super) prefetch_wasted: AtomicU64,
    pub(super) unchanged: AtomicU64,
}

/// A snapshot of a region's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegionStats {
    /// Missing-page faults resolved by fetching (or poisoning) a page.
    pub faults: u64,
    /// Write-protect faults: first writes to clean pages.
    pub write_faults: u64,
    /// Pages evicted to stay within the budget.
    pub evictions: u64,
    /// Dirty pages written back (on eviction, flush or detach).
    pub writebacks: u64,
    /// Errors met (failed fetches, failed write-backs).
    pub errors: u64,
    /// Pages resident now.
    pub resident: u64,
    /// Shared regions: read copies upgraded to the write copy.
    pub upgrades: u64,
    /// Shared regions: RECALLING answers waited through (the home was recalling other copies).
    pub recalls: u64,
    /// Shared regions: REVOKE notices answered.
    pub revokes: u64,
    /// Shared regions: dirty copies whose write-back the home refused or never got (their
    /// writes are lost; each is also an error).
    pub lost_writes: u64,
    /// Shared regions: copy leases that ran out unrenewed (their copies were dropped).
    pub lapses: u64,
    /// Pages fetched ahead of any fault by the prefetcher.
    pub prefetches: u64,
    /// Prefetched pages the program used: it faulted on one still in flight or held back, wrote
    /// to one, or a stream of its faults passed over one.
    pub prefetch_hits: u64,
    /// Of the hits, faults that waited for a prefetch still in flight.
    pub prefetch_late: u64,
    /// Missing-page faults on pages the prefetcher had not fetched (the thread waited for a
    /// whole fetch).
    pub prefetch_misses: u64,
    /// Prefetched pages evicted with no use seen, or whose prefetch failed.
    pub prefetch_wasted: u64,
    /// Pages installed writable on a guess (most pages read were then written) that were
    /// evicted unchanged, so not written back.
    pub unchanged: u64,
}

/// Timestamps of one missing-page fault, as the handler saw it.
#[derive(Debug, Clone, Copy)]
pub struct FaultTrace {
    /// Page index.
    pub page: usize,
    /// The handler read the fault.
    pub entered: Instant,
    /// The page was located (after the directory step, if any).
    pub located: Instant,
    /// The page's data arrived.
    pub fetched: Instant,
    /// The page was installed and the faulting thread woken.
    pub installed: Instant,
}
