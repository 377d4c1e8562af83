//! Failures a test can make the fault handler's kernel calls return, to check that every
//! failure still ends with the faulting thread woken (`PagedRegion::inject_failure`).

use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use nix::errno::Errno;

/// A userfaultfd call the fault handler makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelCall {
    /// `UFFDIO_COPY`: installing a fetched page.
    Copy,
    /// `UFFDIO_WRITEPROTECT`: protecting a page, or lifting its protection for a writer.
    WriteProtect,
    /// `UFFDIO_POISON`: failing an access to a page that cannot be fetched.
    Poison,
}

/// Per call: how many more times it fails, and with what.
#[derive(Debug, Default)]
pub(crate) struct Injected {
    times: [AtomicU32; 3],
    errno: [AtomicI32; 3],
}

impl Injected {
    /// The next `times` calls of `call` fail with `errno` (before reaching the kernel).
    pub(crate) fn set(&self, call: KernelCall, errno: Errno, times: u32) {
        self.errno[call as usize].store(errno as i32, Ordering::Relaxed);
        self.times[call as usize].store(times, Ordering::Release);
    }

    /// The failure injected for this call of `call`, if any (one fewer left).
    pub(crate) fn take(&self, call: KernelCall) -> Option<Errno> {
        let times = &self.times[call as usize];
        // One relaxed load when nothing is injected: the cost on the fault path.
        if times.load(Ordering::Relaxed) == 0 {
            return None;
        }
        times
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| t.checked_sub(1))
            .ok()
            .map(|_| Errno::from_raw(self.errno[call as usize].load(Ordering::Relaxed)))
    }
}
