//! The fault handler's kernel calls failing: every failure of `UFFDIO_COPY`,
//! `UFFDIO_WRITEPROTECT` or `UFFDIO_POISON` ends with the faulting thread out of its fault —
//! the page installed (EAGAIN retried, a failed poison retried as a new fault, a writer woken to
//! retry) or poisoned (the access gets EFAULT/SIGBUS) — never a hang. The failures are injected
//! in front of the real ioctls of a region over pages in memory; the access runs under a
//! watchdog that aborts the test binary if it does not come back.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bluebridge_client::RegionOptions;
use bluebridge_client::region::{
    AlignedPage, Backing, BackingError, HandlerCpu, KernelCall, PagedRegion,
};
use bluebridge_proto::PAGE_SIZE;

const EAGAIN: i32 = 11;
const ENOMEM: i32 = 12;
const EFAULT: i32 = 14;
const PAGES: usize = 8;

/// Pages in memory, each filled with its own byte; `fail_fetch` makes the next fetch fail.
#[derive(Clone, Default)]
struct Memory {
    pages: Arc<Mutex<Vec<Vec<u8>>>>,
    fail_fetch: Arc<AtomicBool>,
    fetches: Arc<AtomicUsize>,
}

fn byte(page: usize) -> u8 {
    0x40 + page as u8
}

impl Memory {
    fn new() -> Self {
        let m = Memory::default();
        *m.pages.lock().unwrap() = (0..PAGES).map(|p| vec![byte(p); PAGE_SIZE]).collect();
        m
    }
}

impl Backing for Memory {
    fn fetch(&mut self, index: usize, page: &mut AlignedPage) -> Result<(), BackingError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        if self.fail_fetch.swap(false, Ordering::Relaxed) {
            return Err("injected fetch failure".into());
        }
        page.0.copy_from_slice(&self.pages.lock().unwrap()[index]);
        Ok(())
    }
    fn store(&mut self, index: usize, page: &AlignedPage) -> Result<(), BackingError> {
        self.pages.lock().unwrap()[index].copy_from_slice(&page.0);
        Ok(())
    }
    fn close(&mut self, _free: bool) -> Result<(), BackingError> {
        Ok(())
    }
}

fn region(memory: &Memory) -> PagedRegion<Memory> {
    PagedRegion::with_backing(
        memory.clone(),
        PAGES,
        RegionOptions {
            handler_cpu: HandlerCpu::Any,
            ..RegionOptions::default()
        },
    )
    .expect("region (needs root or vm.unprivileged_userfaultfd=1)")
}

/// Runs `f`; if it has not returned in 20 s the faulting thread hangs: the binary aborts,
/// loudly (a hung fault cannot be unwound).
fn within<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let what2 = what.to_owned();
    std::thread::spawn(move || {
        for _ in 0..200 {
            std::thread::sleep(Duration::from_millis(100));
            if done2.load(Ordering::Relaxed) {
                return;
            }
        }
        // Straight to stderr: the test harness's capture would die with the process.
        let _ = writeln!(
            std::io::stderr(),
            "{what2}: the faulting thread hung for 20 s"
        );
        std::process::abort();
    });
    let r = f();
    done.store(true, Ordering::Relaxed);
    r
}

/// Copies page `page` of `r` out with write(2): the kernel reads it (EFAULT if poisoned).
fn write_out(r: &PagedRegion<Memory>, page: usize) -> std::io::Result<usize> {
    let path = std::env::temp_dir().join(format!("bb-fault-path-{}-{page}", std::process::id()));
    let mut file = std::fs::File::create(&path).unwrap();
    let res = file.write(&r.as_slice()[page * PAGE_SIZE..(page + 1) * PAGE_SIZE]);
    let _ = std::fs::remove_file(&path);
    res
}

fn page_is(r: &PagedRegion<Memory>, page: usize, b: u8) -> bool {
    r.as_slice()[page * PAGE_SIZE..(page + 1) * PAGE_SIZE]
        .iter()
        .all(|&x| x == b)
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (userfaultfd with kernel faults): run as root or `cargo xtask test`"
)]
fn eagain_from_every_call_is_retried() {
    let m = Memory::new();
    let mut r = region(&m);
    r.inject_failure(KernelCall::Copy, EAGAIN, 5);
    assert!(within("COPY EAGAIN", || page_is(&r, 0, byte(0))));
    // Read in clean (write-protected): the write takes a write-protect fault.
    r.inject_failure(KernelCall::WriteProtect, EAGAIN, 5);
    within("WRITEPROTECT EAGAIN", || r.as_mut_slice()[1] = 0xee);
    assert_eq!(r.as_slice()[1], 0xee);
    m.fail_fetch.store(true, Ordering::Relaxed);
    r.inject_failure(KernelCall::Poison, EAGAIN, 5);
    let e = within("POISON EAGAIN", || write_out(&r, 1)).expect_err("poisoned");
    assert_eq!(e.raw_os_error(), Some(EFAULT), "{e}");
    let st = r.stats();
    assert_eq!(st.errors, 1, "only the fetch failed: {:?}", r.last_error());
    assert_eq!(st.write_faults, 1);
    // The injected failures were used up by the retries: the next page comes in at once.
    assert!(page_is(&r, 2, byte(2)));
    assert_eq!(r.stats().errors, 1);
    r.flush().unwrap();
    assert_eq!(m.pages.lock().unwrap()[0][1], 0xee, "the write went back");
    r.close().unwrap();
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (userfaultfd with kernel faults): run as root or `cargo xtask test`"
)]
fn a_page_the_kernel_will_not_install_is_poisoned_not_hung() {
    let m = Memory::new();
    let r = region(&m);
    r.inject_failure(KernelCall::Copy, ENOMEM, 1);
    let e = within("COPY ENOMEM", || write_out(&r, 3)).expect_err("poisoned");
    assert_eq!(e.raw_os_error(), Some(EFAULT), "{e}");
    let last = r.last_error().unwrap();
    assert!(last.contains("UFFDIO_COPY"), "{last}");
    assert_eq!(r.stats().errors, 1);
    assert_eq!(r.stats().resident, 0, "the page is not counted resident");
    // The next page comes in as usual, and a write to it goes back.
    assert!(page_is(&r, 4, byte(4)));
    assert_eq!(r.stats().resident, 1);
    r.close().unwrap();
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (userfaultfd with kernel faults): run as root or `cargo xtask test`"
)]
fn a_failed_poison_wakes_the_thread_to_fault_again() {
    let m = Memory::new();
    let mut r = region(&m);
    // The fetch fails, and so does the poison: the thread is woken, faults again, and the
    // second fetch brings the page in.
    m.fail_fetch.store(true, Ordering::Relaxed);
    r.inject_failure(KernelCall::Poison, ENOMEM, 1);
    assert!(within("fetch + POISON", || page_is(&r, 5, byte(5))));
    assert_eq!(m.fetches.load(Ordering::Relaxed), 2);
    assert_eq!(r.stats().errors, 2, "{:?}", r.last_error());
    // The install fails, and so does the poison: the same.
    r.inject_failure(KernelCall::Copy, ENOMEM, 1);
    r.inject_failure(KernelCall::Poison, ENOMEM, 1);
    let mut got = vec![0u8; PAGE_SIZE];
    let n = within("COPY + POISON", || {
        // A syscall writing into the page takes the fault in the kernel.
        let mut f = std::fs::File::open("/dev/zero").unwrap();
        f.read(&mut r.as_mut_slice()[6 * PAGE_SIZE..7 * PAGE_SIZE])
    })
    .unwrap();
    assert_eq!(n, PAGE_SIZE);
    got.copy_from_slice(&r.as_slice()[6 * PAGE_SIZE..7 * PAGE_SIZE]);
    assert!(got.iter().all(|&b| b == 0), "read(2) filled it");
    assert_eq!(r.stats().errors, 4, "{:?}", r.last_error());
    r.flush().unwrap();
    assert!(m.pages.lock().unwrap()[6].iter().all(|&b| b == 0));
    r.close().unwrap();
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (userfaultfd with kernel faults): run as root or `cargo xtask test`"
)]
fn a_writer_whose_page_stays_protected_is_woken_to_retry() {
    let m = Memory::new();
    let mut r = region(&m);
    assert!(page_is(&r, 7, byte(7)));
    r.inject_failure(KernelCall::WriteProtect, ENOMEM, 2);
    within("WRITEPROTECT ENOMEM", || {
        r.as_mut_slice()[7 * PAGE_SIZE] = 1
    });
    assert_eq!(r.as_slice()[7 * PAGE_SIZE], 1);
    let st = r.stats();
    assert_eq!(st.errors, 2, "{:?}", r.last_error());
    assert!(r.last_error().unwrap().contains("UFFDIO_WRITEPROTECT"));
    r.flush().unwrap();
    assert_eq!(m.pages.lock().unwrap()[7][0], 1, "the write went back");
    r.close().unwrap();
}
