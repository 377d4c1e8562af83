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

mod file;
mod inject;
mod prefetch;
mod private;
mod remote;
mod shared;
#[allow(
    unsafe_code,
    reason = "mmap, userfaultfd ioctls and madvise: the region's only unsafe code besides the views of the mapping and the write-back copies, which keep the preconditions stated there"
)]
mod sys;

use std::collections::VecDeque;
use std::fmt;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;

use bluebridge_proto::PAGE_SIZE;
use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::time::TimeSpec;

pub use file::FileBacking;
pub use inject::KernelCall;
pub use prefetch::Advice;
pub use remote::{Directory, RemoteBacking, RemoteRegion};
pub use shared::{Coherence, Copies, CopyGrant, MIN_HOLD};
pub use sys::AlignedPage;
/// vm-memory's volatile view ([`PagedRegion::as_volatile`]) and its I/O traits.
pub use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use inject::Injected;
use sys::{FaultEvent, Faults, Mapping};

/// An error of a backing store (the network, a file), boxed.
pub type BackingError = Box<dyn std::error::Error + Send + Sync>;

/// Where a region's pages live. The handler thread calls these one at a time.
pub trait Backing: Send + 'static {
    /// Finds page `index` before [`Backing::fetch`] (a directory lookup, for backings that
    /// need one; the default does nothing). Timed apart in fault traces.
    fn locate(&mut self, index: usize) -> Result<(), BackingError> {
        let _ = index;
        Ok(())
    }
    /// Reads page `index` into `page`.
    fn fetch(&mut self, index: usize, page: &mut AlignedPage) -> Result<(), BackingError>;
    /// Writes page `index` back.
    fn store(&mut self, index: usize, page: &AlignedPage) -> Result<(), BackingError>;
    /// The region is going away: release the pages (`free`) or leave them for a later attach.
    fn close(&mut self, free: bool) -> Result<(), BackingError>;
    /// The handler has had no fault for [`IDLE_TICK`]: time for housekeeping (a remote
    /// backing lets its servers hear from it, so they keep its pages). The default does
    /// nothing.
    fn idle(&mut self) {}
    /// The coherent copies of a shared region's pages ([`Coherence::Shared`]); `None` (the
    /// default) for backings that have none.
    fn copies(&mut self) -> Option<&mut dyn Copies> {
        None
    }
    /// [`Backing::copies`], shared.
    fn copies_ref(&self) -> Option<&dyn Copies> {
        None
    }
    /// Transfers kept in flight together (a private region prefetches and writes back through
    /// them, and serves faults meanwhile); `None` (the default): [`Backing::fetch`] and
    /// [`Backing::store`] one at a time, and no prefetching.
    fn pipeline(&mut self) -> Option<&mut dyn Pipeline> {
        None
    }
    /// [`Backing::pipeline`], shared.
    fn pipeline_ref(&self) -> Option<&dyn Pipeline> {
        None
    }
}

/// Which way a [`Transfer`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A page read from the backing.
    Fetch,
    /// A page written to it.
    Store,
}

/// A finished transfer of a [`Pipeline`].
#[derive(Debug)]
pub struct Transfer {
    /// The region page.
    pub page: usize,
    /// Fetch or store.
    pub direction: Direction,
    /// A fetch: the page's bytes (one page of them); a store: the buffer it was given back,
    /// or an empty one.
    pub result: Result<Vec<u8>, BackingError>,
}

/// A backing's pipelined transfers: started now, finished later, many in flight.
pub trait Pipeline {
    /// Starts fetching page `page` (after [`Backing::locate`]).
    fn start_fetch(&mut self, page: usize);
    /// Starts writing `data` (one page of bytes) to page `page`.
    fn start_store(&mut self, page: usize, data: Vec<u8>);
    /// Sends, receives and retransmits once.
    fn progress(&mut self);
    /// A transfer that has finished, if any (making progress first when none is ready).
    fn finished(&mut self) -> Option<Transfer>;
    /// Descriptors that turn readable when a reply arrives (to sleep on).
    fn poll_fds(&self) -> Vec<BorrowedFd<'_>>;
    /// When a retransmission is due, if any is.
    fn next_deadline(&self) -> Option<Instant>;
    /// Takes a fetched page's buffer back for reuse (the default drops it).
    fn recycle(&mut self, buf: Vec<u8>) {
        drop(buf);
    }
    /// Offers each fetched page to `sink` (region page, bytes) straight from where it arrived,
    /// before any copy; a page the sink took finishes with empty bytes. Returns whether the
    /// backing can (the default cannot: pages always come as buffers).
    fn set_direct(&mut self, sink: DirectSink) -> bool {
        drop(sink);
        false
    }
}

/// Takes a fetched page's bytes where they arrived ([`Pipeline::set_direct`]): (page, bytes)
/// → whether it took them.
pub type DirectSink = Box<dyn FnMut(usize, &[u8]) -> bool + Send>;

/// How long the handler waits for a fault before it calls [`Backing::idle`].
pub const IDLE_TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// A callback for the errors the fault handler meets (it runs on the handler thread).
pub type ErrorCallback = Box<dyn Fn(&RegionError) + Send>;

/// What happens to the backing pages when the region closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnClose {
    /// Free them (dirty pages are not written back).
    Free,
    /// Write dirty pages back and keep them, to attach again later.
    Detach,
}

/// Where the fault-handling thread runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerCpu {
    /// The CPU the creating thread is on at creation (the fast case when the application's
    /// threads are pinned there: no cross-CPU wake-up per fault).
    Caller,
    /// This CPU.
    Cpu(usize),
    /// Wherever the scheduler puts it.
    Any,
}

/// Settings of a region.
pub struct RegionOptions {
    /// Most pages resident at once (0: all of them).
    pub resident_pages: usize,
    /// What closing the region does with the backing pages.
    pub on_close: OnClose,
    /// Where the handler runs.
    pub handler_cpu: HandlerCpu,
    /// Record a [`FaultTrace`] per missing-page fault (for the paging benchmark).
    pub trace: bool,
    /// Called on the handler thread for every error it meets (a failed fetch, a failed write
    /// back); the error is also counted and kept as [`RemoteRegion::last_error`].
    pub on_error: Option<ErrorCallback>,
    /// Private copies (the default) or coherent ones shared with other processes' regions
    /// over the same pages (docs/paging.md, "Sharing"); shared needs a backing with copies.
    pub coherence: Coherence,
    /// Shared regions: how long a fault waits for the home to grant a copy (while it recalls
    /// other holders' copies) before the access fails with SIGBUS.
    pub copy_wait: std::time::Duration,
    /// Private regions over a pipelined backing: the most pages a detected stream of faults
    /// prefetches ahead (0: no prefetching). The depth adapts below this, and never exceeds a
    /// quarter of the resident budget.
    pub prefetch: usize,
    /// Which resident page goes when the budget is full.
    pub eviction: Eviction,
}

/// How a private region picks the page to evict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Eviction {
    /// CLOCK (second chance): a page faulted on or written since the hand last passed is
    /// skipped once; prefetched pages nobody faulted on go first.
    #[default]
    Clock,
    /// The oldest resident page (for comparison).
    Fifo,
}

/// The default [`RegionOptions::prefetch`].
pub const DEFAULT_PREFETCH: usize = 64;

impl Default for RegionOptions {
    fn default() -> Self {
        RegionOptions {
            resident_pages: 0,
            on_close: OnClose::Free,
            handler_cpu: HandlerCpu::Caller,
            trace: false,
            on_error: None,
            coherence: Coherence::Private,
            copy_wait: std::time::Duration::from_secs(10),
            prefetch: DEFAULT_PREFETCH,
            eviction: Eviction::Clock,
        }
    }
}

impl fmt::Debug for RegionOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionOptions")
            .field("resident_pages", &self.resident_pages)
            .field("on_close", &self.on_close)
            .field("handler_cpu", &self.handler_cpu)
            .field("trace", &self.trace)
            .field("on_error", &self.on_error.is_some())
            .field("coherence", &self.coherence)
            .field("copy_wait", &self.copy_wait)
            .field("prefetch", &self.prefetch)
            .field("eviction", &self.eviction)
            .finish()
    }
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The region could not be set up.
    #[error("setting up the region: {0}")]
    Setup(String),
    /// Fetching a page failed; the access that wanted it got SIGBUS (or EFAULT).
    #[error("fetching page {page}: {source}")]
    Fetch {
        /// Page index in the region.
        page: usize,
        /// Why.
        source: BackingError,
    },
    /// Writing a dirty page back failed; the page stays resident and dirty.
    #[error("writing page {page} back: {source}")]
    WriteBack {
        /// Page index in the region.
        page: usize,
        /// Why.
        source: BackingError,
    },
    /// Releasing the backing pages failed.
    #[error("releasing the backing pages: {0}")]
    Close(BackingError),
    /// A userfaultfd call failed.
    #[error("{call} on page {page}: {errno}")]
    Kernel {
        /// Which call.
        call: &'static str,
        /// Page index.
        page: usize,
        /// The error.
        errno: nix::errno::Errno,
    },
    /// The handler thread is gone (it panicked).
    #[error("the fault handler thread is gone")]
    HandlerGone,
}

/// Counters of a region, readable while it runs.
#[derive(Debug, Default)]
struct Counters {
    faults: AtomicU64,
    write_faults: AtomicU64,
    evictions: AtomicU64,
    writebacks: AtomicU64,
    errors: AtomicU64,
    resident: AtomicU64,
    upgrades: AtomicU64,
    recalls: AtomicU64,
    revokes: AtomicU64,
    lost_writes: AtomicU64,
    lapses: AtomicU64,
    prefetches: AtomicU64,
    prefetch_hits: AtomicU64,
    prefetch_late: AtomicU64,
    prefetch_misses: AtomicU64,
    prefetch_wasted: AtomicU64,
    unchanged: AtomicU64,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageState {
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

struct Handler<B: Backing> {
    /// A shared region's coherence state (`None`: private).
    shared: Option<shared::Shared>,
    mapping: Arc<Mapping>,
    faults: Arc<Faults>,
    backing: B,
    state: Vec<PageState>,
    /// Resident pages in eviction order: the front is next (a private region's CLOCK hand;
    /// FIFO in a shared one). Pages whose eviction write-back is in flight are not in it.
    resident: VecDeque<usize>,
    /// A private region's pipelined fault path: prefetching, transfers in flight.
    paging: private::Paging,
    budget: usize,
    buf: Box<AlignedPage>,
    counters: Arc<Counters>,
    last_error: Arc<Mutex<Option<String>>>,
    traces: Option<Arc<Mutex<Vec<FaultTrace>>>>,
    on_error: Option<ErrorCallback>,
    on_close: OnClose,
}

impl<B: Backing> Handler<B> {
    fn run(mut self, commands: &mpsc::Receiver<Command>, wake: &EventFd) -> B {
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
                self.serve_revokes();
                self.check_leases();
            } else if busy {
                self.pump();
            }
            let (faulted, commanded) = match polled {
                Ok((0, ..)) => {
                    if !busy {
                        // Cheap when there is nothing to do (the keep-alive looks at its own
                        // clock), so also on the shorter timer ticks of a shared region.
                        self.backing.idle();
                    }
                    continue;
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
                // Send what the faults just started (prefetches nobody spins for included).
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

    fn publish_resident(&self) {
        self.counters
            .resident
            .store(self.resident.len() as u64, Ordering::Relaxed);
    }

    fn report(&self, e: RegionError) {
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

    fn kernel(&self, call: &'static str, page: usize, r: Result<(), nix::errno::Errno>) {
        if let Err(errno) = r {
            self.report(RegionError::Kernel { call, page, errno });
        }
    }

    /// A missing-page fault on `page`.
    fn missing(&mut self, page: usize, write: bool) {
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
        if let Some(t) = &self.traces {
            t.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(FaultTrace {
                    page,
                    entered,
                    located,
                    fetched,
                    installed: Instant::now(),
                });
        }
    }

    /// Missing `page` could not be fetched or installed: it is poisoned, so the access fails
    /// (SIGBUS, EFAULT in a syscall) instead of waiting for ever. If even that fails, the
    /// waiting threads are woken to fault again, and the page is tried anew.
    fn poison(&mut self, page: usize) {
        self.state[page] = PageState::Poisoned;
        if let Err(errno) = self.faults.poison(&self.mapping, page) {
            self.state[page] = PageState::Missing;
            self.refused("UFFDIO_POISON", page, errno);
        }
    }

    /// Makes resident `page` writable for the writer waiting on it; if that fails the writer is
    /// woken anyway, retries its write and faults again.
    fn unprotect(&mut self, page: usize) {
        if let Err(errno) = self.faults.unprotect(&self.mapping, page) {
            self.refused("UFFDIO_WRITEPROTECT", page, errno);
        }
    }

    /// The kernel refused `call` for `page`, which left its waiting threads asleep: reported,
    /// and they are woken to retry the access.
    fn refused(&mut self, call: &'static str, page: usize, errno: nix::errno::Errno) {
        self.report(RegionError::Kernel { call, page, errno });
        let r = self.faults.wake(&self.mapping, page);
        self.kernel("UFFDIO_WAKE", page, r);
    }

    /// A write to a write-protected page.
    fn write_protect_fault(&mut self, page: usize) {
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
    fn write_back(&mut self, page: usize) -> Result<(), RegionError> {
        // Protect first: from here on no write can slip in between the copy and the store.
        self.faults
            .protect(&self.mapping, page)
            .map_err(|errno| RegionError::Kernel {
                call: "UFFDIO_WRITEPROTECT",
                page,
                errno,
            })?;
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
    fn evict_one(&mut self) -> bool {
        let Some(&victim) = self.resident.front() else {
            return false;
        };
        let generation = self.shared_generation(victim);
        self.give_back(victim, generation, crate::copies::Keep::Nothing);
        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn flush(&mut self) -> Result<u64, RegionError> {
        if self.shared.is_none() {
            return self.flush_private();
        }
        let dirty: Vec<usize> = self
            .resident
            .iter()
            .copied()
            .filter(|&p| self.state[p] == PageState::Dirty)
            .collect();
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

    fn close(&mut self) -> Result<(), RegionError> {
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
