//! The fault handler thread: its loop (faults, commands, replies, timers), and the fault path
//! of a shared region (a private region's is in `private`).

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::Instant;

use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sys::eventfd::EventFd;
use nix::sys::time::TimeSpec;

use super::stats::Counters;
use super::sys::{AlignedPage, FaultEvent, Faults, Mapping};
use super::{
    Backing, Command, ErrorCallback, FaultTrace, IDLE_TICK, OnClose, RegionError, private, shared,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PageState {
    /// No memory: the next access faults.
    Missing,
    /// Resident and write-protected: matches the backing.
    Clean,
    /// Resident and writable: differs from the backing (or may).
    Dirty,
    /// Its fetch failed: accesses raise SIGBUS.
    Poisoned,
    /// Private regions: a fetch is in flight (a fault's or the prefetcher's).
    Fetching,
    /// Private regions: fetched by the prefetcher and held back uninstalled (a stream's marker,
    /// see `prefetch`): its fault is served from the bytes at hand.
    Staged,
    /// Private regions: resident and write-protected while its write-back is in flight; a
    /// write makes it dirty again (and keeps it resident).
    WritingBack,
}

pub(super) struct Handler<B: Backing> {
    /// A shared region's coherence state (`None`: private).
    pub(super) shared: Option<shared::Shared>,
    pub(super) mapping: Arc<Mapping>,
    pub(super) faults: Arc<Faults>,
    pub(super) backing: B,
    pub(super) state: Vec<PageState>,
    /// Resident pages in eviction order: the front is next (a private region's CLOCK hand;
    /// FIFO in a shared one). Pages whose eviction write-back is in flight are not in it.
    pub(super) resident: VecDeque<usize>,
    /// A private region's pipelined fault path: prefetching, transfers in flight.
    pub(super) paging: private::Paging,
    pub(super) budget: usize,
    pub(super) buf: Box<AlignedPage>,
    pub(super) counters: Arc<Counters>,
    pub(super) last_error: Arc<Mutex<Option<String>>>,
    pub(super) traces: Option<Arc<Mutex<Vec<FaultTrace>>>>,
    pub(super) on_error: Option<ErrorCallback>,
    pub(super) on_close: OnClose,
}

impl<B: Backing> Handler<B> {
    pub(super) fn run(mut self, commands: &mpsc::Receiver<Command>, wake: &EventFd) -> B {
        let mut events = userfaultfd::EventBuffer::new(64);
        let mut pending = Vec::with_capacity(64);
        loop {
            let busy = self.paging.in_flight() > 0;
            // A thread waits for a fetch in flight: spin on the network (a sleep and wake-up
            // would add tens of µs to its fault). Otherwise sleep until a fault, a command, a
            // reply or a timer.
            let spin = self.paging.waiting();
            let mut tick = IDLE_TICK;
            if let Some(t) = self.shared.as_ref().and_then(shared::Shared::next_timer) {
                let left = t.saturating_duration_since(Instant::now());
                tick = tick.min(left.max(std::time::Duration::from_micros(1)));
            }
            if busy && let Some(t) = self.backing.pipeline_ref().and_then(|p| p.next_deadline()) {
                let left = t.saturating_duration_since(Instant::now());
                tick = tick.min(left.max(std::time::Duration::from_micros(1)));
            }
            if spin {
                tick = std::time::Duration::ZERO;
            }
            let polled = {
                let mut fds = vec![
                    PollFd::new(self.faults.as_fd(), PollFlags::POLLIN),
                    PollFd::new(wake.as_fd(), PollFlags::POLLIN),
                ];
                if let Some(c) = self.backing.copies_ref().filter(|_| self.shared.is_some()) {
                    fds.extend(
                        c.poll_fds()
                            .into_iter()
                            .map(|fd| PollFd::new(fd, PollFlags::POLLIN)),
                    );
                } else if busy
                    && !spin
                    && let Some(p) = self.backing.pipeline_ref()
                {
                    fds.extend(
                        p.poll_fds()
                            .into_iter()
                            .map(|fd| PollFd::new(fd, PollFlags::POLLIN)),
                    );
                }
                // ppoll: microsecond timeouts (a deferred notice is due in tens of them).
                ppoll(&mut fds, Some(TimeSpec::from_duration(tick)), None).map(|n| {
                    let ready = |i: usize| {
                        fds[i]
                            .revents()
                            .is_some_and(|r| r.contains(PollFlags::POLLIN))
                    };
                    (n, ready(0), ready(1))
                })
            };
            if self.shared.is_some() {
                self.tend_copies();
            }
            let (faulted, commanded) = match polled {
                Ok((0, ..)) => {
                    if !busy {
                        // Cheap when there is nothing to do (the keep-alive looks at its own
                        // clock), so also on the shorter timer ticks of a shared region.
                        self.backing.idle();
                    }
                    (false, false)
                }
                Ok((_, f, c)) => (f, c),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "poll on the userfaultfd failed; the handler stops");
                    return self.backing;
                }
            };
            if faulted {
                pending.clear();
                if let Err(e) = self.faults.read(&self.mapping, &mut events, &mut pending) {
                    tracing::error!(error = %e, "reading userfaultfd events");
                }
                for &ev in &pending {
                    match ev {
                        FaultEvent::Missing { page, write } => self.missing(page, write),
                        FaultEvent::WriteProtect { page } => self.write_protect_fault(page),
                    }
                }
            }
            if self.paging.in_flight() > 0 {
                // Once per round: take in the replies (and retransmit what is due), and send
                // what the faults just started (prefetches nobody spins for included).
                self.pump();
            }
            if commanded {
                let _ = wake.read();
                while let Ok(cmd) = commands.try_recv() {
                    match cmd {
                        Command::Flush(reply) => {
                            let _ = reply.send(self.flush());
                        }
                        Command::Advise(pages, advice, reply) => {
                            self.advise(pages, advice);
                            let _ = reply.send(Ok(()));
                        }
                        Command::Close(reply) => {
                            let r = self.close();
                            let _ = reply.send(r);
                            return self.backing;
                        }
                    }
                }
            }
        }
    }

    pub(super) fn publish_resident(&self) {
        self.counters
            .resident
            .store(self.resident.len() as u64, Ordering::Relaxed);
    }

    pub(super) fn report(&self, e: RegionError) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "remote region");
        if let Some(cb) = &self.on_error {
            cb(&e);
        }
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
    }

    pub(super) fn kernel(&self, call: &'static str, page: usize, r: Result<(), nix::errno::Errno>) {
        if let Err(errno) = r {
            self.report(RegionError::Kernel { call, page, errno });
        }
    }

    /// A missing-page fault on `page`.
    pub(super) fn missing(&mut self, page: usize, write: bool) {
        if self.shared.is_none() {
            return self.missing_private(page, write);
        }
        match self.state[page] {
            PageState::Missing => {}
            // A second thread's fault on a page the first one's brought in, or on a page
            // already poisoned: let it retry.
            _ => {
                let r = self.faults.wake(&self.mapping, page);
                self.kernel("UFFDIO_WAKE", page, r);
                return;
            }
        }
        let entered = Instant::now();
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        while self.resident.len() >= self.budget {
            if !self.evict_one() {
                break;
            }
        }
        let located = match self.fetch_copy(page, write).map(|()| Instant::now()) {
            Ok(t) => t,
            Err(e) => {
                self.report(e);
                self.poison(page);
                return;
            }
        };
        let fetched = Instant::now();
        // Book-keeping first: installing wakes the faulting thread, which may look at the
        // counters at once. A write fault installs the page writable and dirty (no second
        // fault for it); a read installs it write-protected and clean.
        self.state[page] = if write {
            PageState::Dirty
        } else {
            PageState::Clean
        };
        self.resident.push_back(page);
        self.counters
            .resident
            .store(self.resident.len() as u64, Ordering::Relaxed);
        if let Err(errno) = self
            .faults
            .install(&self.mapping, page, &self.buf.0, !write, true)
        {
            self.state[page] = PageState::Missing;
            self.resident.pop_back();
            self.counters
                .resident
                .store(self.resident.len() as u64, Ordering::Relaxed);
            self.report(RegionError::Kernel {
                call: "UFFDIO_COPY",
                page,
                errno,
            });
            self.poison(page);
            return;
        }
        self.trace(FaultTrace {
            page,
            entered,
            located,
            fetched,
            installed: Instant::now(),
        });
    }

    /// Files a fault's trace (with [`RegionOptions::trace`](super::RegionOptions::trace)).
    pub(super) fn trace(&self, t: FaultTrace) {
        if let Some(traces) = &self.traces {
            traces
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(t);
        }
    }

    /// The resident pages that are dirty.
    pub(super) fn dirty_pages(&self) -> Vec<usize> {
        self.resident
            .iter()
            .copied()
            .filter(|&p| self.state[p] == PageState::Dirty)
            .collect()
    }

    /// Missing `page` could not be fetched or installed: it is poisoned, so the access fails
    /// (SIGBUS, EFAULT in a syscall) instead of waiting for ever. If even that fails, the
    /// waiting threads are woken to fault again, and the page is tried anew.
    pub(super) fn poison(&mut self, page: usize) {
        self.state[page] = PageState::Poisoned;
        if let Err(errno) = self.faults.poison(&self.mapping, page) {
            self.state[page] = PageState::Missing;
            self.refused("UFFDIO_POISON", page, errno);
        }
    }

    /// Makes resident `page` writable for the writer waiting on it; if that fails the writer is
    /// woken anyway, retries its write and faults again.
    pub(super) fn unprotect(&mut self, page: usize) {
        if let Err(errno) = self.faults.unprotect(&self.mapping, page) {
            self.refused("UFFDIO_WRITEPROTECT", page, errno);
        }
    }

    /// The kernel refused `call` for `page`, which left its waiting threads asleep: reported,
    /// and they are woken to retry the access.
    pub(super) fn refused(&mut self, call: &'static str, page: usize, errno: nix::errno::Errno) {
        self.report(RegionError::Kernel { call, page, errno });
        let r = self.faults.wake(&self.mapping, page);
        self.kernel("UFFDIO_WAKE", page, r);
    }

    /// Write-protects resident `page` (writers then wait for the handler).
    pub(super) fn protect(&self, page: usize) -> Result<(), RegionError> {
        self.faults
            .protect(&self.mapping, page)
            .map_err(|errno| RegionError::Kernel {
                call: "UFFDIO_WRITEPROTECT",
                page,
                errno,
            })
    }

    /// A write to a write-protected page.
    pub(super) fn write_protect_fault(&mut self, page: usize) {
        if self.shared.is_none() {
            return self.write_protect_private(page);
        }
        if self.state[page] == PageState::Clean {
            return self.upgrade(page);
        }
        match self.state[page] {
            PageState::Clean | PageState::Dirty => {
                if self.state[page] == PageState::Clean {
                    self.counters.write_faults.fetch_add(1, Ordering::Relaxed);
                }
                self.state[page] = PageState::Dirty;
                self.unprotect(page);
            }
            // Evicted (or poisoned) while the writer waited: it retries and faults anew.
            _ => {
                let r = self.faults.wake(&self.mapping, page);
                self.kernel("UFFDIO_WAKE", page, r);
            }
        }
    }

    /// Writes a shared region's dirty `page` back to its home, keeping the write copy, leaving
    /// it resident, clean and write-protected. On failure it stays dirty (and write-protected:
    /// a write faults and makes it writable again).
    pub(super) fn write_back(&mut self, page: usize) -> Result<(), RegionError> {
        // Protect first: from here on no write can slip in between the copy and the store.
        self.protect(page)?;
        // SAFETY: resident (the handler's bookkeeping) and write-protected just now.
        #[allow(unsafe_code, reason = "the copy's preconditions hold: see above")]
        unsafe {
            self.mapping.read_present(page, &mut self.buf.0);
        }
        self.store_copy(page)?;
        self.state[page] = PageState::Clean;
        self.counters.writebacks.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Evicts a shared region's oldest copy (given back to its home); false if none.
    pub(super) fn evict_one(&mut self) -> bool {
        let Some(&victim) = self.resident.front() else {
            return false;
        };
        let generation = self.shared_generation(victim);
        self.give_back(victim, generation, crate::copies::Keep::Nothing);
        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        true
    }

    pub(super) fn flush(&mut self) -> Result<u64, RegionError> {
        if self.shared.is_none() {
            return self.flush_private();
        }
        let dirty = self.dirty_pages();
        let mut first = Ok(());
        for &p in &dirty {
            if let Err(e) = self.write_back(p) {
                if first.is_ok() {
                    first = Err(RegionError::WriteBack {
                        page: p,
                        source: e.to_string().into(),
                    });
                }
                self.report(e);
            }
        }
        first.map(|()| dirty.len() as u64)
    }

    pub(super) fn close(&mut self) -> Result<(), RegionError> {
        if self.shared.is_some() {
            // Every copy goes back to its home (dirty ones written back), whatever happens to
            // the pages next.
            self.release_all();
        } else {
            // Transfers in flight finish first (prefetched pages are installed, evictions'
            // write-backs acknowledged).
            self.drain();
        }
        let flushed = match self.on_close {
            OnClose::Detach => self.flush().map(|_| ()),
            OnClose::Free => Ok(()),
        };
        // Faults stop here: threads that touch the region afterwards see zero pages.
        let r = self.faults.unregister(&self.mapping);
        self.kernel("UFFDIO_UNREGISTER", 0, r);
        let closed = self
            .backing
            .close(self.on_close == OnClose::Free)
            .map_err(RegionError::Close);
        flushed.and(closed)
    }
}
