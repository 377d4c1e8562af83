//! Remote memory mapped into the process: a [`RemoteRegion`] is a range of ordinary virtual
//! memory whose pages live on BlueBridge servers and come in on first touch.
//!
//! How it works (see `docs/paging.md`):
//! - The range is reserved with `mmap` and registered with userfaultfd for missing-page and
//!   write-protect faults. One handler thread, pinned by default to the CPU of the thread that
//!   created the region, owns the client and resolves every fault.
//! - A missing-page fault READs the page and installs it with `UFFDIO_COPY`; a read installs it
//!   write-protected (clean), a write installs it writable (dirty). In a private region the
//!   READ is one of many in flight (`private`): faults, prefetches of the pages a trend detector
//!   predicts (`prefetch`) and write-backs are served together, and a page that arrives in one
//!   frame is installed straight from it.
//! - The first write to a clean page takes a write-protect fault: the page becomes dirty and
//!   writable. (Synchronous write-protect faults: `WP_ASYNC` with `PAGEMAP_SCAN` would avoid
//!   that fault, but leaves no way to stop a write racing the eviction of the page it lands
//!   on; this is the variant that cannot lose a write.)
//! - Beyond the resident budget a page is evicted (CLOCK over faults seen, or FIFO): a dirty
//!   one is write-protected first (writers now wait), written back, and only then dropped with
//!   `MADV_DONTNEED`; a clean one is dropped directly. The next access faults it in again.
//! - A fetch that fails (server gone, timeout, an error status) is reported to the error
//!   callback and recorded, and the page is poisoned (`UFFDIO_POISON`): the faulting access
//!   gets **SIGBUS** (a syscall reading or writing it gets `EFAULT`) instead of waiting
//!   forever or seeing zeros.
//! - So does a page the kernel will not install: every failure of `UFFDIO_COPY`,
//!   `UFFDIO_WRITEPROTECT` or `UFFDIO_POISON` is reported and ends with the faulting thread
//!   woken, the page installed or poisoned (EAGAIN, which the kernel returns while the address
//!   space is changing, is retried for up to a second). If even poisoning fails, the thread is
//!   woken to fault again and the page is tried anew; a writer whose page cannot be made
//!   writable is woken to retry its write.
//!
//! Rules for the application: don't `munmap`, `mremap` or `madvise` the region yourself, and
//! pin the threads that touch it (a same-CPU fault costs a few µs, a cross-CPU wake-up tens).

mod backing;
mod file;
mod handler;
mod inject;
mod options;
mod prefetch;
mod private;
mod remote;
mod shared;
mod stats;
#[allow(
    unsafe_code,
    reason = "mmap, userfaultfd ioctls and madvise: the region's only unsafe code besides the views of the mapping and the write-back copies, which keep the preconditions stated there"
)]
mod sys;

use std::collections::VecDeque;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;

use bluebridge_proto::PAGE_SIZE;
use nix::sys::eventfd::{EfdFlags, EventFd};

pub use backing::{Backing, BackingError, DirectSink, Direction, Pipeline, Transfer};
pub use file::FileBacking;
pub use inject::KernelCall;
pub use options::{
    DEFAULT_PREFETCH, ErrorCallback, Eviction, HandlerCpu, IDLE_TICK, OnClose, RegionError,
    RegionOptions,
};
pub use prefetch::Advice;
pub use remote::{Directory, RemoteBacking, RemoteRegion};
pub use shared::{Coherence, Copies, CopyGrant, MIN_HOLD};
pub use stats::{FaultTrace, RegionStats};
pub use sys::AlignedPage;
/// vm-memory's volatile view ([`PagedRegion::as_volatile`]) and its I/O traits.
pub use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use handler::{Handler, PageState};
use inject::Injected;
use stats::Counters;
use sys::{Faults, Mapping};

enum Command {
    Flush(mpsc::Sender<Result<u64, RegionError>>),
    Advise(Range<usize>, Advice, mpsc::Sender<Result<(), RegionError>>),
    Close(mpsc::Sender<Result<(), RegionError>>),
}

/// Memory backed by pages elsewhere, paged in by a userfaultfd handler thread.
pub struct PagedRegion<B: Backing> {
    mapping: Arc<Mapping>,
    handler: Option<JoinHandle<B>>,
    commands: mpsc::Sender<Command>,
    wake: Arc<EventFd>,
    counters: Arc<Counters>,
    last_error: Arc<Mutex<Option<String>>>,
    traces: Arc<Mutex<Vec<FaultTrace>>>,
    injected: Arc<Injected>,
    /// Coherent copies ([`Coherence::Shared`]).
    shared: bool,
    closed: bool,
}

impl<B: Backing> fmt::Debug for PagedRegion<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagedRegion")
            .field("base", &self.mapping.base())
            .field("pages", &self.pages())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<B: Backing> PagedRegion<B> {
    /// Reserves `pages` pages backed by `backing` and starts the fault handler.
    pub fn with_backing(
        backing: B,
        pages: usize,
        options: RegionOptions,
    ) -> Result<Self, RegionError> {
        let setup = |what: &str, e: &dyn fmt::Display| RegionError::Setup(format!("{what}: {e}"));
        let mapping = Arc::new(Mapping::reserve(pages).map_err(|e| setup("mmap", &e))?);
        let injected = Arc::new(Injected::default());
        let faults = Faults::register(&mapping, injected.clone())
            .map(Arc::new)
            .map_err(|e| {
                setup(
                    "userfaultfd (needs Linux 5.7+ and root, or vm.unprivileged_userfaultfd=1)",
                    &e,
                )
            })?;
        let wake =
            Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).map_err(|e| setup("eventfd", &e))?);
        let cpu = match options.handler_cpu {
            HandlerCpu::Caller => sys::current_cpu(),
            HandlerCpu::Cpu(c) => Some(c),
            HandlerCpu::Any => None,
        };
        let (commands, rx) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let last_error = Arc::new(Mutex::new(None));
        let traces = Arc::new(Mutex::new(Vec::new()));
        let budget = if options.resident_pages == 0 {
            pages
        } else {
            options.resident_pages.min(pages)
        };
        let mut backing = backing;
        let shared = match options.coherence {
            Coherence::Private => None,
            Coherence::Shared => match backing.copies() {
                Some(_) => Some(shared::Shared::new(pages, options.copy_wait)),
                None => {
                    return Err(RegionError::Setup(
                        "a shared region needs a backing with coherent copies (a remote one)"
                            .into(),
                    ));
                }
            },
        };
        let pipelined = backing.pipeline().is_some();
        let prefetch = if pipelined && shared.is_none() {
            options.prefetch.min(budget / 4)
        } else {
            0
        };
        let mut paging = private::Paging::new(pages, budget, prefetch, options.eviction);
        if shared.is_none() {
            paging.go_direct(&mut backing, &mapping, &faults, &counters, options.trace);
        }
        let handler = Handler {
            paging,
            shared,
            mapping: mapping.clone(),
            faults,
            backing,
            state: vec![PageState::Missing; pages],
            resident: VecDeque::with_capacity(budget),
            budget,
            buf: AlignedPage::boxed(),
            counters: counters.clone(),
            last_error: last_error.clone(),
            traces: options.trace.then(|| traces.clone()),
            on_error: options.on_error,
            on_close: options.on_close,
        };
        let wake2 = wake.clone();
        let thread = std::thread::Builder::new()
            .name("bb-uffd".into())
            .spawn(move || {
                if let Some(c) = cpu {
                    core_affinity::set_for_current(core_affinity::CoreId { id: c });
                }
                sys::precise_timers();
                handler.run(&rx, &wake2)
            })
            .map_err(|e| setup("spawning the handler", &e))?;
        Ok(PagedRegion {
            mapping,
            handler: Some(thread),
            commands,
            wake,
            counters,
            last_error,
            traces,
            injected,
            shared: options.coherence == Coherence::Shared,
            closed: false,
        })
    }

    /// For tests of the fault path: the handler's next `times` calls of `call` fail with
    /// the error number `errno` (`libc::ENOMEM`, …) as if the kernel had refused them (EAGAIN
    /// ones are retried like real ones). Whatever fails, the faulting thread must come out of
    /// its fault: that is what the injected failures check.
    pub fn inject_failure(&self, call: KernelCall, errno: i32, times: u32) {
        self.injected
            .set(call, nix::errno::Errno::from_raw(errno), times);
    }

    /// The first byte of the region.
    pub fn as_ptr(&self) -> *mut u8 {
        self.mapping.base()
    }

    /// Bytes in the region.
    pub fn len(&self) -> usize {
        self.mapping.len()
    }

    /// Never: a region has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Pages in the region.
    pub fn pages(&self) -> usize {
        self.mapping.len() / PAGE_SIZE
    }

    /// The region as a byte slice: touching a page faults it in. A page whose fetch failed
    /// raises SIGBUS.
    ///
    /// Why a plain `&[u8]` is sound here although the handler thread drops and refills pages
    /// under it: in a private region the bytes change only through this process's own writes.
    /// Eviction writes a page back and drops it, and the next access faults the same bytes in
    /// again; the handler reads a page only while it is write-protected (no write through any
    /// borrow can run meanwhile) and never writes one that is mapped — it installs bytes only
    /// into a missing page, with `UFFDIO_COPY`, before the access that wanted it continues.
    /// So for the program the memory behaves like ordinary memory that only it writes.
    ///
    /// # Panics
    /// On a shared region ([`Coherence::Shared`]): other hosts' writes change its bytes at any
    /// moment, which a `&[u8]` promises cannot happen. Use [`PagedRegion::as_volatile`] or
    /// [`PagedRegion::as_atomic_words`] there.
    #[track_caller]
    pub fn as_slice(&self) -> &[u8] {
        self.assert_private("as_slice");
        #[allow(unsafe_code, reason = "a view of the mapping tied to this borrow")]
        // SAFETY: borrowed from `self`, so it cannot outlive the mapping; mutable slices need
        // `&mut self`, so none coexists with this one; the region is private, so its bytes
        // change only through this process's writes (see above).
        unsafe {
            self.mapping.slice()
        }
    }

    /// The region as a mutable byte slice (split it, e.g. with `chunks_mut`, to write from
    /// several threads). Sound for the reasons [`PagedRegion::as_slice`] gives: the handler
    /// reads a page only while no write can reach it, and writes none that is mapped.
    ///
    /// # Panics
    /// On a shared region, as [`PagedRegion::as_slice`].
    #[track_caller]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.assert_private("as_mut_slice");
        #[allow(unsafe_code, reason = "a view of the mapping tied to this borrow")]
        // SAFETY: the exclusive borrow of `self` makes this the only slice, and it cannot
        // outlive the mapping; the region is private (see `as_slice`).
        unsafe {
            self.mapping.slice_mut()
        }
    }

    /// The region as volatile memory (vm-memory's `VolatileSlice`: every access a volatile
    /// load or store, none cached by the compiler): how to read and write a shared region's
    /// bytes, which other hosts' writes change at any moment. Works on any region.
    pub fn as_volatile(&self) -> VolatileSlice<'_> {
        #[allow(
            unsafe_code,
            reason = "a volatile view of the mapping tied to this borrow"
        )]
        // SAFETY: `len` bytes mapped at `base` for as long as `self` is borrowed; the other
        // users of the memory are the kernel (copies into missing pages), the handler (reads of
        // write-protected pages) and the program's own volatile or atomic accesses (plain
        // slices of a shared region are refused above).
        unsafe {
            VolatileSlice::new(self.mapping.base(), self.mapping.len())
        }
    }

    #[track_caller]
    fn assert_private(&self, what: &str) {
        assert!(
            !self.shared,
            "{what} on a shared region: other hosts' writes change its bytes under a plain \
             slice; use as_volatile() or as_atomic_words()"
        );
    }

    /// The region as 64-bit atomic words: what threads — and, in a shared region, processes
    /// on other hosts — use to synchronise through it (a lock word, a flag, a counter).
    /// Touching a word faults its page in like any access; an atomic write to a read copy
    /// takes the write copy first.
    pub fn as_atomic_words(&self) -> &[AtomicU64] {
        #[allow(unsafe_code, reason = "a view of the mapping tied to this borrow")]
        // SAFETY: borrowed from `self`, so it cannot outlive the mapping; the mutable byte
        // slice needs `&mut self`, so none coexists with this view.
        unsafe {
            self.mapping.words()
        }
    }

    /// Counters, now.
    pub fn stats(&self) -> RegionStats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RegionStats {
            faults: g(&c.faults),
            write_faults: g(&c.write_faults),
            evictions: g(&c.evictions),
            writebacks: g(&c.writebacks),
            errors: g(&c.errors),
            resident: g(&c.resident),
            upgrades: g(&c.upgrades),
            recalls: g(&c.recalls),
            revokes: g(&c.revokes),
            lost_writes: g(&c.lost_writes),
            lapses: g(&c.lapses),
            prefetches: g(&c.prefetches),
            prefetch_hits: g(&c.prefetch_hits),
            prefetch_late: g(&c.prefetch_late),
            prefetch_misses: g(&c.prefetch_misses),
            prefetch_wasted: g(&c.prefetch_wasted),
            unchanged: g(&c.unchanged),
        }
    }

    /// The most recent error, as text.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The fault traces recorded so far (with [`RegionOptions::trace`]), emptied.
    pub fn take_traces(&self) -> Vec<FaultTrace> {
        std::mem::take(&mut *self.traces.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn command<R>(
        &self,
        make: impl FnOnce(mpsc::Sender<Result<R, RegionError>>) -> Command,
    ) -> Result<R, RegionError> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send(make(tx))
            .map_err(|_| RegionError::HandlerGone)?;
        self.wake.write(1).map_err(|_| RegionError::HandlerGone)?;
        rx.recv().map_err(|_| RegionError::HandlerGone)?
    }

    /// Tells the prefetcher how pages `pages` (indices) will be used, like `madvise`:
    /// [`Advice::Sequential`], [`Advice::Random`], [`Advice::WillNeed`] (fetch them now, as
    /// far as a quarter of the resident budget goes) or [`Advice::Normal`]. A later hint over
    /// a page overrides an earlier one. Private regions only (a shared one takes no hints).
    pub fn advise(&self, pages: Range<usize>, advice: Advice) -> Result<(), RegionError> {
        if pages.start >= pages.end || pages.end > self.pages() {
            return Err(RegionError::Setup(format!(
                "advise: pages {pages:?} are not a non-empty range inside the region's {}",
                self.pages()
            )));
        }
        self.command(|tx| Command::Advise(pages, advice, tx))
    }

    /// Writes every dirty page back (they stay resident, clean); returns how many.
    pub fn flush(&self) -> Result<u64, RegionError> {
        self.command(Command::Flush)
    }

    /// Closes the region as configured ([`OnClose`]) and returns the backing.
    pub fn close(mut self) -> Result<B, RegionError> {
        self.close_inner()?;
        self.handler
            .take()
            .ok_or(RegionError::HandlerGone)?
            .join()
            .map_err(|_| RegionError::HandlerGone)
    }

    fn close_inner(&mut self) -> Result<(), RegionError> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.command(Command::Close)
    }
}

impl<B: Backing> Drop for PagedRegion<B> {
    fn drop(&mut self) {
        if let Err(e) = self.close_inner() {
            tracing::warn!(error = %e, "closing a remote region");
        }
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
    }
}
