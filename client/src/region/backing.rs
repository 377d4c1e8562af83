//! Where a region's pages live: the [`Backing`] trait, and the [`Pipeline`] of transfers a
//! backing may keep in flight.

use std::os::fd::BorrowedFd;
use std::time::Instant;

use super::shared::Copies;
use super::sys::AlignedPage;

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
    /// The handler has had no fault for [`IDLE_TICK`](super::IDLE_TICK): time for housekeeping (a remote
    /// backing lets its servers hear from it, so they keep its pages). The default does
    /// nothing.
    fn idle(&mut self) {}
    /// The coherent copies of a shared region's pages ([`Coherence::Shared`](super::Coherence::Shared)); `None` (the
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
