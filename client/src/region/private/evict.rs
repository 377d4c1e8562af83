//! A private region's evictions and write-backs: the CLOCK hand (or FIFO), write-backs kept in
//! flight until acknowledged, pages dropped in batches, flushes, and the write-protect faults
//! that make a page dirty again.

use std::sync::atomic::Ordering::Relaxed;

use bluebridge_proto::PAGE_SIZE;

use super::flag;
use crate::region::{Backing, BackingError, Eviction, Handler, PageState, RegionError};

/// What [`Handler::evict_private`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Evicted {
    /// A page is gone: its slot is free.
    Freed,
    /// A dirty page's write-back started: its slot frees when it is acknowledged.
    Started,
    /// Nothing could be evicted now.
    Nothing,
}

impl<B: Backing> Handler<B> {
    /// Drops the memory of the pages given up, one `madvise` per run of adjacent ones. A page
    /// the kernel will not drop stays resident (clean) and is reported.
    pub(super) fn flush_discards(&mut self) {
        if self.paging.discards.is_empty() {
            return;
        }
        let mut pages = std::mem::take(&mut self.paging.discards);
        pages.sort_unstable();
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && pages[j] == pages[j - 1] + 1 {
                j += 1;
            }
            if self.mapping.discard_run(pages[i], j - i).is_err() {
                for &p in &pages[i..j] {
                    if let Err(e) = self.mapping.discard(p) {
                        self.report(RegionError::Kernel {
                            call: "madvise(MADV_DONTNEED)",
                            page: p,
                            errno: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                        });
                        self.state[p] = PageState::Clean;
                        self.resident.push_back(p);
                        self.counters.evictions.fetch_sub(1, Relaxed);
                    }
                }
            }
            i = j;
        }
        pages.clear();
        self.paging.discards = pages;
        self.publish();
    }

    /// Page `page`'s write-back finished.
    pub(super) fn stored(&mut self, page: usize, result: Result<Vec<u8>, BackingError>) {
        self.paging.storing -= 1;
        let evict = self.paging.flags[page] & flag::EVICT != 0;
        self.paging.flags[page] &= !(flag::EVICT | flag::STORING);
        if evict {
            self.paging.evicting -= 1;
        }
        match result {
            Ok(buf) => {
                self.recycle(buf);
                self.counters.writebacks.fetch_add(1, Relaxed);
                if self.state[page] != PageState::WritingBack {
                    return; // written again meanwhile: dirty, resident, in the ring
                }
                if evict {
                    self.discard(page);
                } else {
                    self.state[page] = PageState::Clean;
                }
            }
            Err(source) => {
                let e = RegionError::WriteBack { page, source };
                if !evict {
                    self.flush_failed(page, &e);
                }
                self.report(e);
                if self.state[page] == PageState::WritingBack {
                    // Still dirty, still write-protected (a write faults and unprotects it).
                    self.state[page] = PageState::Dirty;
                    if evict {
                        self.resident.push_back(page);
                    }
                }
            }
        }
        self.publish();
    }

    /// Gives resident `page` up: it is missing from now on (its memory is dropped by the next
    /// [`Handler::flush_discards`], before anything can be installed in its place).
    pub(super) fn discard(&mut self, page: usize) {
        if self.paging.flags[page] & flag::PREFETCHED != 0 {
            self.counters.prefetch_wasted.fetch_add(1, Relaxed);
            self.paging.detector.wasted();
        }
        if let Some(t) = self.paging.twins.remove(&page) {
            self.recycle(t);
        }
        self.paging.flags[page] = 0;
        self.state[page] = PageState::Missing;
        self.paging.discards.push(page);
        self.counters.evictions.fetch_add(1, Relaxed);
    }

    /// Makes room for a faulting page: starts the evictions it needs (counting those in flight
    /// as done) and waits for them. Over the budget only when nothing can be evicted
    /// (write-backs failing).
    pub(super) fn make_room(&mut self) {
        loop {
            while self.committed() - self.paging.evicting >= self.paging.budget {
                if self.evict_private(false) == Evicted::Nothing {
                    break;
                }
            }
            if self.committed() < self.paging.budget
                || self.paging.evicting + self.paging.fetching == 0
            {
                return;
            }
            self.take_finished();
        }
    }

    /// Evicts the page under the CLOCK hand (or the oldest, FIFO). For a prefetch
    /// (`prefetching`) the hand goes round once at most: a page referenced since it last
    /// passed is not given up for a guess.
    pub(super) fn evict_private(&mut self, prefetching: bool) -> Evicted {
        let turns = if prefetching { 1 } else { 2 } * self.resident.len() + 1;
        for _ in 0..turns {
            let Some(victim) = self.resident.pop_front() else {
                return Evicted::Nothing;
            };
            let f = &mut self.paging.flags[victim];
            if self.paging.eviction == Eviction::Clock && *f & flag::REF != 0 {
                *f &= !flag::REF;
                self.resident.push_back(victim);
                continue;
            }
            match self.state[victim] {
                PageState::Clean => {
                    self.paging.score(false);
                    self.discard(victim);
                    return Evicted::Freed;
                }
                // Its last write-back is still in flight: not yet.
                PageState::Dirty if *f & flag::STORING != 0 => {
                    self.resident.push_back(victim);
                }
                PageState::Dirty => return self.write_back_evicting(victim),
                // Not resident (cannot be in the ring): forget it.
                _ => continue,
            }
        }
        Evicted::Nothing
    }

    /// Starts evicting dirty `page`: protected, compared with its twin (dropped if unchanged),
    /// else copied into a WRITE that drops it when acknowledged.
    fn write_back_evicting(&mut self, page: usize) -> Evicted {
        if let Err(e) = self.protect(page) {
            self.report(e);
            self.resident.push_back(page);
            return Evicted::Nothing;
        }
        let Some(payload) = self.write_back_copy(page) else {
            // Unchanged since it was fetched: nothing to write.
            self.discard(page);
            return Evicted::Freed;
        };
        self.state[page] = PageState::WritingBack;
        self.paging.flags[page] |= flag::EVICT;
        self.paging.evicting += 1;
        self.start_store(page, payload);
        Evicted::Started
    }

    /// The bytes to write back for dirty `page`, which the caller has just write-protected;
    /// `None` if it was installed writable on a guess and is unchanged (it is clean then).
    fn write_back_copy(&mut self, page: usize) -> Option<Vec<u8>> {
        let twin = if self.paging.flags[page] & flag::TWIN != 0 {
            self.paging.flags[page] &= !flag::TWIN;
            self.paging.twins.remove(&page)
        } else {
            None
        };
        let mut payload = match twin {
            Some(t) => {
                #[allow(unsafe_code, reason = "the comparison's preconditions hold: see below")]
                // SAFETY: resident (the handler's bookkeeping) and write-protected by the caller.
                let same = unsafe { self.mapping.present_equals(page, &t) };
                self.paging.score(!same);
                if same {
                    self.counters.unchanged.fetch_add(1, Relaxed);
                    self.state[page] = PageState::Clean;
                    self.recycle(t);
                    return None;
                }
                t // written over below
            }
            None => vec![0; PAGE_SIZE],
        };
        #[allow(unsafe_code, reason = "the copy's preconditions hold: see below")]
        // SAFETY: resident (the handler's bookkeeping) and write-protected by the caller.
        unsafe {
            self.mapping.read_present(page, &mut payload);
        }
        Some(payload)
    }

    /// A write to a write-protected page of a private region.
    pub(in crate::region) fn write_protect_private(&mut self, page: usize) {
        match self.state[page] {
            PageState::Clean => {
                self.counters.write_faults.fetch_add(1, Relaxed);
                self.paging.score(true);
                self.prefetch_used(page);
            }
            PageState::Dirty => {}
            PageState::WritingBack => {
                // Written again while its write-back is in flight: it stays, dirty (the
                // write-back in flight is merely early).
                if self.paging.flags[page] & flag::EVICT != 0 {
                    self.paging.flags[page] &= !flag::EVICT;
                    self.paging.evicting -= 1;
                    self.resident.push_back(page);
                }
            }
            // Evicted (or poisoned) while the writer waited: it retries and faults anew.
            _ => {
                let r = self.faults.wake(&self.mapping, page);
                self.kernel("UFFDIO_WAKE", page, r);
                return;
            }
        }
        self.paging.flags[page] |= flag::REF;
        self.state[page] = PageState::Dirty;
        self.unprotect(page);
    }

    /// Writes every dirty page back, pipelined (they stay resident, clean); returns how many.
    pub(in crate::region) fn flush_private(&mut self) -> Result<u64, RegionError> {
        self.drain();
        self.paging.flush_error = None;
        let mut written = 0;
        for p in self.dirty_pages() {
            if let Err(e) = self.protect(p) {
                self.flush_failed(p, &e);
                self.report(e);
                continue;
            }
            if let Some(payload) = self.write_back_copy(p) {
                self.state[p] = PageState::WritingBack;
                self.start_store(p, payload);
                written += 1;
            }
        }
        self.drain();
        match self.paging.flush_error.take() {
            Some(e) => Err(e),
            None => Ok(written),
        }
    }

    /// Keeps the first failure of the flush in progress (page `page`: `e`) as its result.
    fn flush_failed(&mut self, page: usize, e: &RegionError) {
        if self.paging.flush_error.is_none() {
            self.paging.flush_error = Some(RegionError::WriteBack {
                page,
                source: e.to_string().into(),
            });
        }
    }
}
