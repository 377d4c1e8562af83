//! A private region's fault path, pipelined (docs/paging.md, "How it works"):
//!
//! - **Transfers in flight.** A fault starts its page's fetch and the handler goes back to
//!   work: more faults, prefetches, write-backs and their replies are served while it is in
//!   flight. It spins on the network only while some thread waits for a page in flight.
//! - **Prefetching.** Each missing-page fault goes through the trend detector (`prefetch`);
//!   the pages it predicts are fetched and installed as they arrive, with
//!   `UFFDIO_COPY_MODE_DONTWAKE` when nobody waits for them. A stream's marker page is held
//!   back on arrival so the program's arrival there is seen.
//! - **Eviction by CLOCK.** A page is *referenced* when a thread faulted on it (missing or
//!   write-protect) since the hand last passed; the hand skips a referenced page once,
//!   clearing the bit. Prefetched pages come in unreferenced.
//! - **Pipelined write-back.** An evicted dirty page is write-protected, copied into the
//!   WRITE's payload and stays resident (write-protected) until the WRITE is acknowledged;
//!   only then is it dropped. A write meanwhile faults: the page is dirty again and stays, and
//!   the write-back in flight is merely early.
//! - **Writable on a guess.** When most pages fetched for reading were written afterwards (a
//!   write-protect fault each), pages are installed writable and their fetched bytes kept as a
//!   twin: eviction compares, and an unchanged page is dropped without a WRITE.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::AtomicU8;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bluebridge_proto::PAGE_SIZE;

use super::prefetch::{Advice, Detector};
use super::sys::{Faults, Mapping};
use super::{
    Backing, Counters, Direction, Eviction, FaultTrace, Handler, PageState, RegionError, Transfer,
};

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

/// How a page in flight may be installed straight from the frame it arrives in (the one-copy
/// path: `UFFDIO_COPY` from the receive buffer), set by the handler, read by the sink.
mod mode {
    /// It may (not a marker, nor a page that keeps a twin).
    pub(super) const DIRECT: u8 = 1;
    /// Write-protected (clean); else writable (a writer waits).
    pub(super) const PROTECT: u8 = 2;
    /// A thread waits: wake it.
    pub(super) const WAKE: u8 = 4;
    /// Set by the sink: installed.
    pub(super) const INSTALLED: u8 = 8;
    /// Set by the sink: installed and its threads woken.
    pub(super) const WOKE: u8 = 16;
}

/// What the handler shares with the backing's direct sink (which runs on the handler thread,
/// inside the backing's progress).
struct Direct {
    mapping: Arc<Mapping>,
    faults: Arc<Faults>,
    counters: Arc<Counters>,
    modes: Vec<AtomicU8>,
    /// When each page installed directly arrived (for fault traces).
    arrivals: Option<Mutex<HashMap<usize, Instant>>>,
}

impl Direct {
    /// Installs page `page` from `data` where it lies, if its mode allows.
    fn take(&self, page: usize, data: &[u8]) -> bool {
        let Some(m) = self.modes.get(page) else {
            return false;
        };
        let how = m.load(Relaxed);
        if how & mode::DIRECT == 0 || data.len() != PAGE_SIZE {
            return false;
        }
        let wake = how & mode::WAKE != 0;
        let arrived = Instant::now();
        // Counted before the install wakes anyone (the handler's books follow at once).
        self.counters.resident.fetch_add(1, Relaxed);
        let protect = how & mode::PROTECT != 0;
        if self
            .faults
            .install(&self.mapping, page, data, protect, wake)
            .is_err()
        {
            // The handler installs it from a copy, and reports what the kernel says then.
            self.counters.resident.fetch_sub(1, Relaxed);
            return false;
        }
        if let Some(a) = &self.arrivals {
            a.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(page, arrived);
        }
        m.store(
            how | mode::INSTALLED | if wake { mode::WOKE } else { 0 },
            Relaxed,
        );
        true
    }
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

    /// Asks `backing` to hand fetched pages over where they arrive, to be installed from
    /// there (one copy: the kernel's).
    pub(super) fn go_direct<B: Backing>(
        &mut self,
        backing: &mut B,
        mapping: &Arc<Mapping>,
        faults: &Arc<Faults>,
        counters: &Arc<Counters>,
        trace: bool,
    ) {
        let Some(p) = backing.pipeline() else {
            return;
        };
        let direct = Arc::new(Direct {
            mapping: mapping.clone(),
            faults: faults.clone(),
            counters: counters.clone(),
            modes: (0..self.flags.len()).map(|_| AtomicU8::new(0)).collect(),
            arrivals: trace.then(Mutex::default),
        });
        let d = direct.clone();
        if p.set_direct(Box::new(move |page, data| d.take(page, data))) {
            self.direct = Some(direct);
        }
    }

    /// Tells the sink how page `page` (in flight) may be installed, from its flags.
    fn set_mode(&self, page: usize) {
        let Some(d) = &self.direct else {
            return;
        };
        let f = self.flags[page];
        let m = if f & flag::MARKER != 0 {
            0 // held back on arrival
        } else if f & flag::WRITE != 0 {
            mode::DIRECT
        } else if self.write_score > 0 {
            0 // installed writable on a guess: keeps a twin, so a copy anyway
        } else {
            mode::DIRECT | mode::PROTECT
        };
        let wake = if f & flag::WAITED != 0 { mode::WAKE } else { 0 };
        d.modes[page].store(m | wake, Relaxed);
    }

    /// Page `page`'s mode, cleared: what the sink did with it.
    fn take_mode(&self, page: usize) -> u8 {
        self.direct
            .as_ref()
            .map_or(0, |d| d.modes[page].swap(0, Relaxed))
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

/// What [`Handler::evict_private`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Evicted {
    /// A page is gone: its slot is free.
    Freed,
    /// A dirty page's write-back started: its slot frees when it is acknowledged.
    Started,
    /// Nothing could be evicted now.
    Nothing,
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
        let keep = 4 * self.paging.detector.cap().max(1) * super::prefetch::STREAMS;
        while self.paging.queue.len() > keep {
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
        let want = self.paging.queue.len();
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

    /// Drops the memory of the pages given up, one `madvise` per run of adjacent ones. A page
    /// the kernel will not drop stays resident (clean) and is reported.
    fn flush_discards(&mut self) {
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

    /// The books of a page the sink installed from the frame it arrived in (`m`: its mode).
    fn installed_directly(&mut self, page: usize, m: u8, waited: bool, arrived: Instant) {
        self.paging.flags[page] &= !(flag::WRITE | flag::MARKER | flag::TWIN);
        self.state[page] = if m & mode::PROTECT != 0 {
            PageState::Clean
        } else {
            PageState::Dirty
        };
        self.resident.push_back(page);
        self.publish();
        if waited && m & mode::WOKE == 0 {
            // Its thread came after the bytes were installed without waking anyone.
            let r = self.faults.wake(&self.mapping, page);
            self.kernel("UFFDIO_WAKE", page, r);
        }
        let Some((entered, located)) = self.paging.started.remove(&page) else {
            return;
        };
        let fetched = self
            .paging
            .direct
            .as_ref()
            .and_then(|d| d.arrivals.as_ref())
            .and_then(|a| {
                a.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&page)
            })
            .unwrap_or(arrived);
        if let Some(t) = &self.traces {
            t.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(FaultTrace {
                    page,
                    entered,
                    located,
                    fetched,
                    installed: arrived,
                });
        }
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
        let f = self.paging.flags[page];
        let write = f & flag::WRITE != 0;
        let guess = !write && self.paging.write_score > 0;
        self.paging.flags[page] &= !(flag::WRITE | flag::MARKER | flag::TWIN);
        // Book-keeping first: installing wakes the faulting thread, which may look at the
        // counters at once.
        self.state[page] = if write || guess {
            PageState::Dirty
        } else {
            PageState::Clean
        };
        self.resident.push_back(page);
        self.publish();
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
        if let (Some(t), Some((entered, located))) =
            (&self.traces, self.paging.started.remove(&page))
        {
            t.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(FaultTrace {
                    page,
                    entered,
                    located,
                    fetched: arrived.unwrap_or(located),
                    installed: Instant::now(),
                });
        }
    }

    /// Page `page`'s write-back finished.
    fn stored(&mut self, page: usize, result: Result<Vec<u8>, super::BackingError>) {
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
                if !evict && self.paging.flush_error.is_none() {
                    self.paging.flush_error = Some(RegionError::WriteBack {
                        page,
                        source: e.to_string().into(),
                    });
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
    fn discard(&mut self, page: usize) {
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
    fn make_room(&mut self) {
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
    fn evict_private(&mut self, prefetching: bool) -> Evicted {
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
        if let Err(errno) = self.faults.protect(&self.mapping, page) {
            self.report(RegionError::Kernel {
                call: "UFFDIO_WRITEPROTECT",
                page,
                errno,
            });
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
        if let Some(t) = &twin {
            #[allow(unsafe_code, reason = "the comparison's preconditions hold: see below")]
            // SAFETY: resident (the handler's bookkeeping) and write-protected by the caller.
            let same = unsafe { self.mapping.present_equals(page, t) };
            self.paging.score(!same);
            if same {
                self.counters.unchanged.fetch_add(1, Relaxed);
                self.state[page] = PageState::Clean;
                self.recycle(twin.expect("a twin"));
                return None;
            }
        }
        let mut payload = twin.unwrap_or_else(|| vec![0; PAGE_SIZE]);
        #[allow(unsafe_code, reason = "the copy's preconditions hold: see below")]
        // SAFETY: resident (the handler's bookkeeping) and write-protected by the caller.
        unsafe {
            self.mapping.read_present(page, &mut payload);
        }
        Some(payload)
    }

    /// A write to a write-protected page of a private region.
    pub(super) fn write_protect_private(&mut self, page: usize) {
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
    pub(super) fn flush_private(&mut self) -> Result<u64, RegionError> {
        self.drain();
        self.paging.flush_error = None;
        let dirty: Vec<usize> = self
            .resident
            .iter()
            .copied()
            .filter(|&p| self.state[p] == PageState::Dirty)
            .collect();
        let mut written = 0;
        for p in dirty {
            if let Err(errno) = self.faults.protect(&self.mapping, p) {
                let e = RegionError::Kernel {
                    call: "UFFDIO_WRITEPROTECT",
                    page: p,
                    errno,
                };
                if self.paging.flush_error.is_none() {
                    self.paging.flush_error = Some(RegionError::WriteBack {
                        page: p,
                        source: e.to_string().into(),
                    });
                }
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
}
