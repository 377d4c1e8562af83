//! The one-copy path: a page that arrives whole in one frame is installed by `UFFDIO_COPY`
//! straight from the receive buffer. The backing's sink (run on the handler thread, inside the
//! backing's progress) installs it as the handler said it may, and the handler does the books
//! when the transfer finishes.

use std::collections::HashMap;
use std::sync::atomic::AtomicU8;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bluebridge_proto::PAGE_SIZE;

use super::super::stats::Counters;
use super::super::sys::{Faults, Mapping};
use super::{Paging, flag};
use crate::region::{Backing, Handler};

/// How a page in flight may be installed straight from the frame it arrives in (the one-copy
/// path: `UFFDIO_COPY` from the receive buffer), set by the handler, read by the sink.
pub(super) mod mode {
    /// It may (not a marker, nor a page that keeps a twin).
    pub(in crate::region::private) const DIRECT: u8 = 1;
    /// Write-protected (clean); else writable (a writer waits).
    pub(in crate::region::private) const PROTECT: u8 = 2;
    /// A thread waits: wake it.
    pub(in crate::region::private) const WAKE: u8 = 4;
    /// Set by the sink: installed.
    pub(in crate::region::private) const INSTALLED: u8 = 8;
    /// Set by the sink: installed and its threads woken.
    pub(in crate::region::private) const WOKE: u8 = 16;
}

/// What the handler shares with the backing's direct sink (which runs on the handler thread,
/// inside the backing's progress).
pub(super) struct Direct {
    mapping: Arc<Mapping>,
    faults: Arc<Faults>,
    counters: Arc<Counters>,
    pub(super) modes: Vec<AtomicU8>,
    /// When each page installed directly arrived (for fault traces).
    pub(super) arrivals: Option<Mutex<HashMap<usize, Instant>>>,
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

impl Paging {
    /// Asks `backing` to hand fetched pages over where they arrive, to be installed from
    /// there (one copy: the kernel's).
    pub(in crate::region) fn go_direct<B: Backing>(
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
    pub(super) fn set_mode(&self, page: usize) {
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
    pub(super) fn take_mode(&self, page: usize) -> u8 {
        self.direct
            .as_ref()
            .map_or(0, |d| d.modes[page].swap(0, Relaxed))
    }
}

impl<B: Backing> Handler<B> {
    /// The books of a page the sink installed from the frame it arrived in (`m`: its mode).
    pub(super) fn installed_directly(
        &mut self,
        page: usize,
        m: u8,
        waited: bool,
        arrived: Instant,
    ) {
        self.came_in(page, m & mode::PROTECT == 0);
        if waited && m & mode::WOKE == 0 {
            // Its thread came after the bytes were installed without waking anyone.
            let r = self.faults.wake(&self.mapping, page);
            self.kernel("UFFDIO_WAKE", page, r);
        }
        // (Taken whether or not the page is traced: a prefetched page's time is not kept.)
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
        self.trace_fault(page, Some(fetched), arrived);
    }
}
