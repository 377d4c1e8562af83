//! A private region's fault path, pipelined (docs/paging.md, "How it works"):
//!
//! - **Transfers in flight.** A fault starts its page's fetch and the handler goes back to
//!   work: more faults, prefetches, write-backs and their replies are served while it is in
//!   flight. It spins on the network only while some thread waits for a page in flight.
//! - **Prefetching.** Each missing-page fault goes through the trend detector (`prefetch`);
//!   the pages it predicts are fetched and installed as they arrive, with
//!   `UFFDIO_COPY_MODE_DONTWAKE` when nobody waits for them. A stream's marker page is held
//!   back on arrival so the program's arrival there is seen.
//! - **Eviction by CLOCK.** A page is *referenced* when it comes in and when a thread faults on
//!   it (missing, write-protect, in flight or held back) since the hand last passed; the hand
//!   skips a referenced page once, clearing the bit.
//! - **Pipelined write-back.** An evicted dirty page is write-protected, copied into the
//!   WRITE's payload and stays resident (write-protected) until the WRITE is acknowledged;
//!   only then is it dropped. A write meanwhile faults: the page is dirty again and stays, and
//!   the write-back in flight is merely early.
//! - **Writable on a guess.** When most pages fetched for reading were written afterwards (a
//!   write-protect fault each), pages are installed writable and their fetched bytes kept as a
//!   twin: eviction compares, and an unchanged page is dropped without a WRITE.

mod direct;
mod evict;

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use bluebridge_proto::PAGE_SIZE;

use super::prefetch::{Advice, Detector};
use super::{Backing, Direction, Eviction, FaultTrace, Handler, PageState, RegionError, Transfer};
use direct::{Direct, mode};
use evict::Evicted;

/// Per-page flags of a private region.
mod flag {
    /// Faulted on (missing or write-protect) since the CLOCK hand last passed.
    pub(super) const REF: u8 = 1;
    /// Brought in by the prefetcher; no use seen yet.
    pub(super) const PREFETCHED: u8 = 2;
    /// A thread waits for the fetch in flight.
    pub(super) const WAITED: u8 = 4;
    /// ... and it writes: install writable.
    pub(super) const WRITE: u8 = 8;
    /// A stream's marker: held back on arrival unless a thread waits for it.
    pub(super) const MARKER: u8 = 16;
    /// Installed writable on a guess; its fetched bytes are kept as a twin.
    pub(super) const TWIN: u8 = 32;
    /// The write-back in flight is an eviction: drop the page when it is acknowledged.
    pub(super) const EVICT: u8 = 64;
    /// A write-back of the page is in flight (a second one waits for it).
    pub(super) const STORING: u8 = 128;
}

/// Eviction write-backs kept in flight at most.
const WRITEBACK_WINDOW: usize = 32;
/// Marker pages held back at most (a stream left behind keeps one).
const MAX_STAGED: usize = 2 * super::prefetch::STREAMS;
/// Hints kept at most (the oldest is forgotten first).
const MAX_HINTS: usize = 64;
/// Bounds of the write score (see [`Paging::write_score`]).
const WRITE_SCORE: i32 = 32;

/// The state of a private region's pipelined fault path.
pub(super) struct Paging {
    flags: Vec<u8>,
    detector: Detector,
    hints: Vec<(Range<usize>, Advice)>,
    /// Pages predicted and not yet fetched, with whether each is a marker.
    queue: VecDeque<(usize, bool)>,
    staged: HashMap<usize, Vec<u8>>,
    /// Staged pages, oldest first.
    staged_order: VecDeque<usize>,
    twins: HashMap<usize, Vec<u8>>,
    fetching: usize,
    storing: usize,
    /// Eviction write-backs in flight (their pages are out of the CLOCK ring).
    evicting: usize,
    /// Pages in flight some thread waits for.
    waiters: usize,
    /// Finished transfers of a backing without a pipeline (done on the spot).
    done: VecDeque<Transfer>,
    /// Pages fetched for reading and then written (+1) against pages dropped unwritten (−1):
    /// above 0, pages are installed writable on a guess.
    write_score: i32,
    eviction: Eviction,
    budget: usize,
    /// Pages kept free ahead of faults (evictions started early).
    slack: usize,
    /// When each fault waiting for its fetch came in and its page was located (traces).
    started: HashMap<usize, (Instant, Instant)>,
    /// The first error of the flush in progress.
    flush_error: Option<RegionError>,
    predicted: Vec<usize>,
    /// Pages given up whose memory is still to be dropped (one `madvise` per run of them).
    discards: Vec<usize>,
    /// The one-copy path, when the backing offers it.
    direct: Option<Arc<Direct>>,
}

impl Paging {
    pub(super) fn new(pages: usize, budget: usize, prefetch: usize, eviction: Eviction) -> Self {
        Paging {
            flags: vec![0; pages],
            detector: Detector::new(pages, prefetch),
            hints: Vec::new(),
            queue: VecDeque::new(),
            staged: HashMap::new(),
            staged_order: VecDeque::new(),
            twins: HashMap::new(),
            fetching: 0,
            storing: 0,
            evicting: 0,
            waiters: 0,
            done: VecDeque::new(),
            write_score: 0,
            eviction,
            budget,
            slack: (budget / 16).clamp(1, 16),
            started: HashMap::new(),
            flush_error: None,
            predicted: Vec::new(),
            discards: Vec::new(),
            direct: None,
        }
    }

    /// Transfers in flight.
    pub(super) fn in_flight(&self) -> usize {
        self.fetching + self.storing + self.done.len()
    }

    /// Whether a thread waits for a transfer in flight.
    pub(super) fn waiting(&self) -> bool {
        self.waiters > 0
    }

    fn hint(&self, page: usize) -> Advice {
        self.hints
            .iter()
            .rev()
            .find(|(r, _)| r.contains(&page))
            .map_or(Advice::Normal, |&(_, a)| a)
    }

    fn score(&mut self, written: bool) {
        self.write_score =
            (self.write_score + if written { 1 } else { -1 }).clamp(-WRITE_SCORE, WRITE_SCORE);
    }
}

impl<B: Backing> Handler<B> {
    /// Pages resident, in flight or held back: what the budget bounds.
    fn committed(&self) -> usize {
        self.resident.len() + self.paging.evicting + self.paging.fetching + self.paging.staged.len()
    }

    fn publish(&self) {
        self.counters
            .resident
            .store((self.resident.len() + self.paging.evicting) as u64, Relaxed);
    }

    /// A missing-page fault on `page` of a private region.
    pub(super) fn missing_private(&mut self, page: usize, write: bool) {
        let entered = Instant::now();
        match self.state[page] {
            PageState::Missing => {}
            PageState::Fetching => {
                // A prefetch in flight (or another thread's fault): wait for it.
                let f = &mut self.paging.flags[page];
                *f |= flag::REF;
                if *f & flag::WAITED == 0 {
                    *f |= flag::WAITED;
                    self.paging.waiters += 1;
                    self.counters.faults.fetch_add(1, Relaxed);
                }
                if write {
                    *f |= flag::WRITE;
                }
                if *f & flag::PREFETCHED != 0 {
                    self.counters.prefetch_late.fetch_add(1, Relaxed);
                    self.prefetch_used(page);
                }
                self.paging.set_mode(page);
                self.predict(page);
                return;
            }
            PageState::Staged => {
                self.counters.faults.fetch_add(1, Relaxed);
                let data = self.paging.staged.remove(&page).expect("staged bytes");
                self.paging.staged_order.retain(|&p| p != page);
                self.prefetch_used(page);
                self.paging.flags[page] |= flag::REF | if write { flag::WRITE } else { 0 };
                self.predict(page);
                self.install_fetched(page, data, true, None);
                return;
            }
            // Installed (another thread's fault), poisoned: the thread retries.
            _ => {
                let r = self.faults.wake(&self.mapping, page);
                self.kernel("UFFDIO_WAKE", page, r);
                return;
            }
        }
        self.counters.faults.fetch_add(1, Relaxed);
        self.counters.prefetch_misses.fetch_add(1, Relaxed);
        self.make_room();
        if let Err(source) = self.backing.locate(page) {
            self.report(RegionError::Fetch { page, source });
            self.poison(page);
            return;
        }
        if self.traces.is_some() {
            self.paging.started.insert(page, (entered, Instant::now()));
        }
        self.paging.flags[page] = flag::REF | flag::WAITED | if write { flag::WRITE } else { 0 };
        self.paging.waiters += 1;
        self.start_fetch(page);
        self.predict(page);
    }

    /// Prefetched `page` was used.
    fn prefetch_used(&mut self, page: usize) {
        let f = &mut self.paging.flags[page];
        if *f & flag::PREFETCHED != 0 {
            *f &= !flag::PREFETCHED;
            self.counters.prefetch_hits.fetch_add(1, Relaxed);
            self.paging.detector.used();
        }
    }

    /// Feeds a fault on `page` to the trend detector and fetches what it predicts.
    fn predict(&mut self, page: usize) {
        let advice = self.paging.hint(page);
        let mut predicted = std::mem::take(&mut self.paging.predicted);
        predicted.clear();
        if let Some((last, stride)) = self.paging.detector.fault(page, advice, &mut predicted) {
            // The stream passed over the pages between its last fault and this one.
            let mut q = last as i64 + stride;
            while q != page as i64 && q >= 0 && (q as usize) < self.state.len() {
                self.prefetch_used(q as usize);
                q += stride;
            }
        }
        let mut first = true;
        for &q in &predicted {
            if self.state[q] == PageState::Missing {
                self.paging.queue.push_back((q, first));
                first = false;
            }
        }
        self.paging.predicted = predicted;
        // Predictions waiting for room: the newest count, a quarter of the budget at most.
        while self.paging.queue.len() > (self.paging.budget / 4).max(1) {
            self.paging.queue.pop_front();
        }
        self.issue_prefetches();
    }

    /// Fetches queued predictions as far as the budget has room for them, evicting for them
    /// in one go (the pages dropped with few `madvise` calls).
    fn issue_prefetches(&mut self) {
        let state = &self.state;
        self.paging
            .queue
            .retain(|&(p, _)| state[p] == PageState::Missing);
        let want = self.paging.queue.len().min((self.paging.budget / 4).max(1));
        if want == 0 {
            return;
        }
        // Evictions in flight count as room made: wait for them rather than start more.
        while self.committed() - self.paging.evicting + want > self.paging.budget
            && self.paging.evicting < WRITEBACK_WINDOW
            && self.evict_private(true) != Evicted::Nothing
        {}
        self.flush_discards();
        while self.committed() < self.paging.budget {
            let Some((page, marker)) = self.paging.queue.pop_front() else {
                return;
            };
            if self.state[page] != PageState::Missing {
                continue; // queued twice, or fetched meanwhile
            }
            if self.backing.locate(page).is_err() {
                continue; // a prefetch is a guess: the fault will find out
            }
            self.paging.flags[page] = flag::PREFETCHED | if marker { flag::MARKER } else { 0 };
            self.counters.prefetches.fetch_add(1, Relaxed);
            self.start_fetch(page);
        }
    }

    /// Applies a hint (see `PagedRegion::advise`).
    pub(super) fn advise(&mut self, pages: Range<usize>, advice: Advice) {
        if self.shared.is_some() {
            return;
        }
        if self.paging.hints.len() >= MAX_HINTS {
            self.paging.hints.remove(0);
        }
        self.paging.hints.push((pages.clone(), advice));
        if advice == Advice::WillNeed && self.backing.pipeline().is_some() {
            let most = (self.paging.budget / 4).max(1);
            for p in pages.take(most) {
                if self.state[p] == PageState::Missing {
                    self.paging.queue.push_back((p, false));
                }
            }
            self.issue_prefetches();
        }
    }

    fn start_fetch(&mut self, page: usize) {
        // A page given up is dropped before anything can be installed in its place.
        self.flush_discards();
        self.state[page] = PageState::Fetching;
        self.paging.fetching += 1;
        self.paging.set_mode(page);
        match self.backing.pipeline() {
            Some(p) => p.start_fetch(page),
            None => {
                let result = self
                    .backing
                    .fetch(page, &mut self.buf)
                    .map(|()| self.buf.0.to_vec());
                self.paging.done.push_back(Transfer {
                    page,
                    direction: Direction::Fetch,
                    result,
                });
            }
        }
    }

    fn start_store(&mut self, page: usize, data: Vec<u8>) {
        self.paging.storing += 1;
        self.paging.flags[page] |= flag::STORING;
        match self.backing.pipeline() {
            Some(p) => p.start_store(page, data),
            None => {
                self.buf.0.copy_from_slice(&data);
                let result = self.backing.store(page, &self.buf).map(|()| data);
                self.paging.done.push_back(Transfer {
                    page,
                    direction: Direction::Store,
                    result,
                });
            }
        }
    }

    /// Takes in finished transfers (installing fetched pages, dropping written-back ones),
    /// then fetches queued predictions and starts early evictions.
    pub(super) fn pump(&mut self) {
        self.take_finished();
        self.issue_prefetches();
        // Keep a few slots free ahead of faults: evictions (and their write-backs) start early.
        while self.committed() - self.paging.evicting + self.paging.slack > self.paging.budget
            && self.paging.evicting < WRITEBACK_WINDOW
            && self.evict_private(false) != Evicted::Nothing
        {}
        self.flush_discards();
    }

    fn take_finished(&mut self) {
        if let Some(p) = self.backing.pipeline() {
            p.progress();
        }
        loop {
            let t = match self.paging.done.pop_front() {
                Some(t) => t,
                None => match self.backing.pipeline().and_then(|p| p.finished()) {
                    Some(t) => t,
                    None => break,
                },
            };
            match t.direction {
                Direction::Fetch => self.fetched(t.page, t.result),
                Direction::Store => self.stored(t.page, t.result),
            }
        }
        self.flush_discards();
    }

    /// Waits until no transfer is in flight.
    pub(super) fn drain(&mut self) {
        while self.paging.in_flight() > 0 {
            self.take_finished();
        }
        self.paging.queue.clear();
        self.flush_discards();
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        if let Some(p) = self.backing.pipeline() {
            p.recycle(buf);
        }
    }

    /// Page `page`'s fetch finished.
    fn fetched(&mut self, page: usize, result: Result<Vec<u8>, super::BackingError>) {
        self.paging.fetching -= 1;
        if self.state[page] != PageState::Fetching {
            return; // not ours (cannot happen: only this thread starts fetches)
        }
        let arrived = Instant::now();
        let waited = self.paging.flags[page] & flag::WAITED != 0;
        if waited {
            self.paging.waiters -= 1;
        }
        self.paging.flags[page] &= !flag::WAITED;
        let m = self.paging.take_mode(page);
        if m & mode::INSTALLED != 0 {
            return self.installed_directly(page, m, waited, arrived);
        }
        let data = match result {
            Ok(d) if d.len() == PAGE_SIZE => d,
            r => {
                let source = match r {
                    Ok(d) => format!("the backing returned {} bytes for a page", d.len()).into(),
                    Err(e) => e,
                };
                self.paging.started.remove(&page);
                if waited {
                    self.report(RegionError::Fetch { page, source });
                    self.poison(page);
                } else {
                    // A prefetch is a guess: the page's own fault will fetch it again.
                    tracing::debug!(page, error = %source, "prefetch failed");
                    self.state[page] = PageState::Missing;
                    self.paging.flags[page] = 0;
                    self.counters.prefetch_wasted.fetch_add(1, Relaxed);
                }
                return;
            }
        };
        if !waited && self.paging.flags[page] & flag::MARKER != 0 {
            if self.paging.staged.len() >= MAX_STAGED {
                // The oldest marker's stream has moved on: install it like any prefetch.
                while let Some(old) = self.paging.staged_order.pop_front() {
                    if let Some(d) = self.paging.staged.remove(&old) {
                        self.install_fetched(old, d, false, None);
                        break;
                    }
                }
            }
            self.state[page] = PageState::Staged;
            self.paging.staged.insert(page, data);
            self.paging.staged_order.push_back(page);
            return;
        }
        self.install_fetched(page, data, waited, Some(arrived));
    }

    /// Installs fetched `page` (waking its threads if `wake`): writable if a writer waits or
    /// writes are likely (keeping the bytes as a twin then), else write-protected.
    fn install_fetched(
        &mut self,
        page: usize,
        data: Vec<u8>,
        wake: bool,
        arrived: Option<Instant>,
    ) {
        let write = self.paging.flags[page] & flag::WRITE != 0;
        let guess = !write && self.paging.write_score > 0;
        // Book-keeping first: installing wakes the faulting thread, which may look at the
        // counters at once.
        self.came_in(page, write || guess);
        if let Err(errno) = self
            .faults
            .install(&self.mapping, page, &data, !(write || guess), wake)
        {
            self.state[page] = PageState::Missing;
            self.resident.pop_back();
            self.publish();
            self.paging.started.remove(&page);
            self.recycle(data);
            if wake {
                self.report(RegionError::Kernel {
                    call: "UFFDIO_COPY",
                    page,
                    errno,
                });
                self.poison(page);
            } else {
                // Nobody waits: the page's own fault will fetch it again.
                tracing::debug!(page, %errno, "installing a prefetched page failed");
                self.paging.flags[page] = 0;
                self.counters.prefetch_wasted.fetch_add(1, Relaxed);
            }
            return;
        }
        if guess {
            self.paging.flags[page] |= flag::TWIN;
            if let Some(old) = self.paging.twins.insert(page, data) {
                self.recycle(old);
            }
        } else {
            self.recycle(data);
        }
        self.trace_fault(page, arrived, Instant::now());
    }

    /// The books of `page` coming in: resident (last in the CLOCK ring), writable (dirty) or
    /// write-protected (clean), and referenced — a prefetched page not yet reached is not the
    /// first to go.
    fn came_in(&mut self, page: usize, writable: bool) {
        self.paging.flags[page] &= !(flag::WRITE | flag::MARKER | flag::TWIN);
        self.paging.flags[page] |= flag::REF;
        self.state[page] = if writable {
            PageState::Dirty
        } else {
            PageState::Clean
        };
        self.resident.push_back(page);
        self.publish();
    }

    /// Files the trace of the fault that waited for `page`, if it is traced: its data arrived
    /// at `fetched` (unknown: when it was located), it was installed at `installed`.
    fn trace_fault(&mut self, page: usize, fetched: Option<Instant>, installed: Instant) {
        if let Some((entered, located)) = self.paging.started.remove(&page) {
            self.trace(FaultTrace {
                page,
                entered,
                located,
                fetched: fetched.unwrap_or(located),
                installed,
            });
        }
    }
}
