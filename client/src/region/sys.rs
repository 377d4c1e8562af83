//! The unsafe part of remote paging: the address-space reservation, its userfaultfd
//! registration, and the calls that resolve faults. The rest of `region` is safe code over
//! these, and keeps the one rule they rely on: the handler thread only reads a page it knows
//! is present (a read of a missing page would fault and wait for the handler itself).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bluebridge_proto::PAGE_SIZE;
use nix::errno::Errno;
use userfaultfd::{Event, FaultKind, FeatureFlags, ReadWrite, RegisterMode, Uffd, UffdBuilder};

use super::inject::{Injected, KernelCall};

/// How long a call that fails with EAGAIN is retried. The kernel returns EAGAIN while the
/// address space is changing under the userfaultfd (a fork, an `mremap`), which passes.
const EAGAIN_RETRY_FOR: Duration = Duration::from_secs(1);

/// Runs `f` again while it fails with EAGAIN, for up to [`EAGAIN_RETRY_FOR`].
fn retry_eagain<T>(mut f: impl FnMut() -> Result<T, Errno>) -> Result<T, Errno> {
    let start = Instant::now();
    loop {
        match f() {
            Err(Errno::EAGAIN) if start.elapsed() < EAGAIN_RETRY_FOR => std::thread::yield_now(),
            r => return r,
        }
    }
}

/// A page-aligned page buffer (`UFFDIO_COPY` and `O_DIRECT` both want alignment).
#[repr(C, align(4096))]
pub struct AlignedPage(pub [u8; PAGE_SIZE]);

impl std::fmt::Debug for AlignedPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AlignedPage(4096 bytes)")
    }
}

impl AlignedPage {
    /// A zeroed page on the heap.
    pub fn boxed() -> Box<AlignedPage> {
        Box::new(AlignedPage([0; PAGE_SIZE]))
    }
}

/// `n` pages of private anonymous address space, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    base: NonNull<u8>,
    pages: usize,
}

// SAFETY: a Mapping is an address range; it holds no references into thread-local state, and
// every access through it is either a syscall on the range or a read of a page the caller
// knows to be present.
unsafe impl Send for Mapping {}
// SAFETY: as above; the methods taking `&self` are syscalls the kernel serialises.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Reserves `pages` pages, readable and writable, with no memory behind them yet.
    pub(crate) fn reserve(pages: usize) -> io::Result<Self> {
        let len = pages
            .checked_mul(PAGE_SIZE)
            .filter(|&l| l > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad region size"))?;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing; nothing
        // else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            base: NonNull::new(p.cast()).expect("mmap never returns null on success"),
            pages,
        })
    }

    /// The first byte.
    pub(crate) fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Bytes.
    pub(crate) fn len(&self) -> usize {
        self.pages * PAGE_SIZE
    }

    /// Page `i`'s address.
    pub(crate) fn page(&self, i: usize) -> *mut libc::c_void {
        assert!(i < self.pages, "page {i} outside the region");
        // SAFETY: in bounds (checked above).
        unsafe { self.base.as_ptr().add(i * PAGE_SIZE).cast() }
    }

    /// The page index of `addr`, if it is inside.
    pub(crate) fn index_of(&self, addr: usize) -> Option<usize> {
        let off = addr.checked_sub(self.base.as_ptr() as usize)?;
        (off < self.len()).then_some(off / PAGE_SIZE)
    }

    /// Drops page `i`'s memory: its next access is a missing-page fault again.
    pub(crate) fn discard(&self, i: usize) -> io::Result<()> {
        self.discard_run(i, 1)
    }

    /// Drops the memory of pages `first .. first + n` (one `madvise`).
    pub(crate) fn discard_run(&self, first: usize, n: usize) -> io::Result<()> {
        assert!(n > 0 && first + n <= self.pages, "pages outside the region");
        // SAFETY: the pages lie inside our mapping (checked above); MADV_DONTNEED on private
        // anonymous memory only drops their contents.
        let r = unsafe { libc::madvise(self.page(first), n * PAGE_SIZE, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Copies present page `i` into `out` (a page's worth of bytes).
    ///
    /// # Safety
    /// Page `i` must be present and write-protected for the whole copy: present, or the read
    /// faults and waits for the handler, which is the caller; write-protected, or another
    /// thread's store could race the copy (a data race, and a torn page written back).
    pub(crate) unsafe fn read_present(&self, i: usize, out: &mut [u8]) {
        assert_eq!(out.len(), PAGE_SIZE, "read_present copies one page");
        // SAFETY: the page is inside the mapping (`page` checks) and, by the caller's contract,
        // present and unwritable for the copy; `out` is a distinct buffer of PAGE_SIZE bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(self.page(i).cast::<u8>(), out.as_mut_ptr(), PAGE_SIZE)
        }
    }

    /// Whether present page `i` holds exactly `bytes`.
    ///
    /// # Safety
    /// As [`Mapping::read_present`]: the page is present and write-protected while compared.
    pub(crate) unsafe fn present_equals(&self, i: usize, bytes: &[u8]) -> bool {
        // SAFETY: the caller's contract; the slice lives only for the comparison, during which
        // nobody writes the page.
        let page = unsafe { std::slice::from_raw_parts(self.page(i).cast::<u8>(), PAGE_SIZE) };
        page == bytes
    }

    /// The whole range as shared bytes.
    ///
    /// # Safety
    /// The caller must not let the slice outlive the mapping, nor let a mutable slice of the
    /// range coexist with it.
    pub(crate) unsafe fn slice<'a>(&self) -> &'a [u8] {
        // SAFETY: the caller's contract; the range is mapped readable for its whole length.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.len()) }
    }

    /// The whole range as 64-bit atomic words (the range is page-aligned, so they are aligned).
    ///
    /// # Safety
    /// The caller must not let the slice outlive the mapping, nor let a mutable byte slice of
    /// the range coexist with it.
    pub(crate) unsafe fn words<'a>(&self) -> &'a [std::sync::atomic::AtomicU64] {
        // SAFETY: the caller's contract; the range is mapped for its whole length, aligned to
        // a page, and AtomicU64 has the size and alignment of u64.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().cast(), self.len() / 8) }
    }

    /// The whole range as bytes.
    ///
    /// # Safety
    /// The caller must not let the slice outlive the mapping, nor hand out overlapping
    /// mutable slices.
    pub(crate) unsafe fn slice_mut<'a>(&self) -> &'a mut [u8] {
        // SAFETY: the caller's contract; the range is mapped readable and writable for its
        // whole length (faults are resolved by the handler, never left as holes).
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), self.len()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; slices into it do not outlive the region.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len());
        }
    }
}

/// What a fault asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultEvent {
    /// An access to a page with no memory: fetch and install it.
    Missing { page: usize, write: bool },
    /// A write to a write-protected (clean) page.
    WriteProtect { page: usize },
}

/// A userfaultfd registered over one [`Mapping`], for missing-page and write-protect faults.
#[derive(Debug)]
pub(crate) struct Faults {
    uffd: Uffd,
    injected: Arc<Injected>,
}

/// `struct uffdio_copy` (the crate's `copy` cannot ask for `UFFDIO_COPY_MODE_WP`).
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_poison` (Linux 6.6; not in the crate nor in older headers).
#[repr(C)]
struct UffdioPoison {
    start: u64,
    len: u64,
    mode: u64,
    updated: i64,
}

const UFFDIO: u8 = 0xAA;
const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
nix::ioctl_readwrite!(uffdio_copy, UFFDIO, 0x03, UffdioCopy);
nix::ioctl_readwrite!(uffdio_poison, UFFDIO, 0x08, UffdioPoison);

impl Faults {
    /// Creates the userfaultfd (kernel-mode faults included, so a syscall reading the region
    /// works too) and registers `m` for missing-page and write-protect faults.
    pub(crate) fn register(
        m: &Mapping,
        injected: Arc<Injected>,
    ) -> Result<Self, userfaultfd::Error> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(FeatureFlags::PAGEFAULT_FLAG_WP)
            .create()?;
        uffd.register_with_mode(
            m.base().cast(),
            m.len(),
            RegisterMode::MISSING | RegisterMode::WRITE_PROTECT,
        )?;
        Ok(Faults { uffd, injected })
    }

    /// Takes the pending faults (none if nothing is waiting).
    pub(crate) fn read(
        &self,
        m: &Mapping,
        buf: &mut userfaultfd::EventBuffer,
        out: &mut Vec<FaultEvent>,
    ) -> Result<(), userfaultfd::Error> {
        for e in self.uffd.read_events(buf)? {
            if let Event::Pagefault { kind, rw, addr, .. } = e? {
                let Some(page) = m.index_of(addr as usize) else {
                    continue;
                };
                out.push(match kind {
                    FaultKind::WriteProtected => FaultEvent::WriteProtect { page },
                    _ => FaultEvent::Missing {
                        page,
                        write: rw == ReadWrite::Write,
                    },
                });
            }
        }
        Ok(())
    }

    /// Installs `data` (one page of bytes, any alignment: the kernel copies them) as missing
    /// page `i`, write-protected if `protect` (writes then fault, which is how dirtiness is
    /// tracked), and wakes the threads faulting on it unless `!wake` (a prefetched page nobody
    /// waits for: `UFFDIO_COPY_MODE_DONTWAKE`). `Ok(false)`: the page was already there
    /// (another thread's fault installed it). EAGAIN is retried; on any other error nobody has
    /// been woken.
    pub(crate) fn install(
        &self,
        m: &Mapping,
        i: usize,
        data: &[u8],
        protect: bool,
        wake: bool,
    ) -> Result<bool, Errno> {
        assert_eq!(data.len(), PAGE_SIZE, "install copies one page");
        let mut mode = if protect { UFFDIO_COPY_MODE_WP } else { 0 };
        if !wake {
            mode |= UFFDIO_COPY_MODE_DONTWAKE;
        }
        let mut c = UffdioCopy {
            dst: m.page(i) as u64,
            src: data.as_ptr() as u64,
            len: PAGE_SIZE as u64,
            mode,
            copy: 0,
        };
        let r = retry_eagain(|| {
            if let Some(e) = self.injected.take(KernelCall::Copy) {
                return Err(e);
            }
            c.copy = 0;
            // SAFETY: dst is a page of the registered range, src a page of bytes we hold for
            // the call, the struct matches the kernel's `uffdio_copy`.
            unsafe { uffdio_copy(self.uffd.as_raw_fd(), &mut c) }
        });
        match r {
            Ok(_) => Ok(true),
            Err(Errno::EEXIST) => {
                if wake {
                    self.wake(m, i)?;
                }
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Makes missing page `i` raise SIGBUS on access (a syscall touching it gets EFAULT) and
    /// wakes its faulting threads: how a fetch that failed is reported to the access. EAGAIN
    /// is retried; on any other error nobody has been woken.
    pub(crate) fn poison(&self, m: &Mapping, i: usize) -> Result<(), Errno> {
        let mut p = UffdioPoison {
            start: m.page(i) as u64,
            len: PAGE_SIZE as u64,
            mode: 0,
            updated: 0,
        };
        let r = retry_eagain(|| {
            if let Some(e) = self.injected.take(KernelCall::Poison) {
                return Err(e);
            }
            p.updated = 0;
            // SAFETY: a page of the registered range; the struct matches `uffdio_poison`.
            unsafe { uffdio_poison(self.uffd.as_raw_fd(), &mut p) }
        });
        match r {
            Ok(_) => Ok(()),
            // Already present: nothing to poison, the access can proceed.
            Err(Errno::EEXIST) => self.wake(m, i),
            Err(e) => Err(e),
        }
    }

    /// Write-protects present page `i`: from now on a write faults (and waits for us).
    /// EAGAIN is retried.
    pub(crate) fn protect(&self, m: &Mapping, i: usize) -> Result<(), Errno> {
        retry_eagain(|| match self.injected.take(KernelCall::WriteProtect) {
            Some(e) => Err(e),
            None => self.uffd.write_protect(m.page(i), PAGE_SIZE).map_err(errno),
        })
    }

    /// Lifts page `i`'s write protection and wakes the writers waiting on it. EAGAIN is
    /// retried; on any other error nobody has been woken.
    pub(crate) fn unprotect(&self, m: &Mapping, i: usize) -> Result<(), Errno> {
        retry_eagain(|| match self.injected.take(KernelCall::WriteProtect) {
            Some(e) => Err(e),
            None => self
                .uffd
                .remove_write_protection(m.page(i), PAGE_SIZE, true)
                .map_err(errno),
        })
    }

    /// Wakes threads waiting on page `i` (they retry the access).
    pub(crate) fn wake(&self, m: &Mapping, i: usize) -> Result<(), Errno> {
        self.uffd.wake(m.page(i), PAGE_SIZE).map_err(errno)
    }

    /// Stops handling faults on `m` (threads then see ordinary anonymous memory).
    pub(crate) fn unregister(&self, m: &Mapping) -> Result<(), Errno> {
        self.uffd
            .unregister(m.base().cast(), m.len())
            .map_err(errno)
    }
}

impl AsFd for Faults {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor lives as long as `self.uffd`, which the borrow ties to.
        unsafe { BorrowedFd::borrow_raw(self.uffd.as_raw_fd()) }
    }
}

fn errno(e: userfaultfd::Error) -> Errno {
    match e {
        // The crate speaks an older nix: carry the number across.
        userfaultfd::Error::SystemError(e) => Errno::from_raw(e as i32),
        _ => Errno::EIO,
    }
}

/// The CPU the calling thread runs on now.
pub(crate) fn current_cpu() -> Option<usize> {
    // SAFETY: no arguments, no memory; returns -1 on failure.
    let c = unsafe { libc::sched_getcpu() };
    usize::try_from(c).ok()
}

/// Makes the calling thread's timed waits end on time: the default timer slack (50 µs) would
/// stretch the handler's microsecond timeouts.
pub(crate) fn precise_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes a number, touches no memory; failure leaves the default.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}
