//! A region's settings and errors.

use std::fmt;

use super::backing::BackingError;
use super::shared::Coherence;

/// How long the handler waits for a fault before it calls [`Backing::idle`](super::Backing::idle).
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
    /// Record a [`FaultTrace`](super::FaultTrace) per missing-page fault (for the paging benchmark).
    pub trace: bool,
    /// Called on the handler thread for every error it meets (a failed fetch, a failed write
    /// back); the error is also counted and kept as [`RemoteRegion::last_error`](super::PagedRegion::last_error).
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
