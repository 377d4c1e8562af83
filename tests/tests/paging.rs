//! Remote memory through userfaultfd, over real packets: data written through a region larger
//! than its resident budget comes back byte for byte in a fresh region; concurrent writers on
//! distinct pages lose nothing; eviction and write-back counts match the dirty set exactly; a
//! fetch that fails reaches the access as an error, not as zeros or a hang.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bluebridge_client::region::{OnClose, RegionStats};
use bluebridge_client::{RegionOptions, RemoteRegion};
use bluebridge_proto::PAGE_SIZE;
use bluebridge_tests::{Rig, RigOptions, SERVER};

fn pattern(page: usize, i: usize, round: u8) -> u8 {
    ((page * 31 + i * 7) as u8) ^ round.wrapping_mul(0x5b)
}

fn fill(chunk: &mut [u8], page: usize, round: u8) {
    for (i, b) in chunk.iter_mut().enumerate() {
        *b = pattern(page, i, round);
    }
}

fn check(chunk: &[u8], page: usize, round: u8) {
    let bad = chunk
        .iter()
        .enumerate()
        .find(|&(i, &b)| b != pattern(page, i, round));
    assert!(bad.is_none(), "page {page}: first difference at {bad:?}");
}

/// Pages fetched: by their own faults, or by the prefetcher.
fn fetched(st: &RegionStats) -> u64 {
    st.prefetch_misses + st.prefetches
}

fn options(budget: usize, on_close: OnClose) -> RegionOptions {
    RegionOptions {
        resident_pages: budget,
        on_close,
        ..RegionOptions::default()
    }
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_region_larger_than_its_budget_comes_back_in_a_fresh_region() {
    const PAGES: usize = 64;
    let rig = Rig::new(&RigOptions::default());
    let mut region = RemoteRegion::new(rig.client, PAGES, &[SERVER], options(16, OnClose::Detach))
        .expect("region");
    // New remote pages read as zeros (pages 0 and 1 come in clean).
    assert!(region.as_slice()[..2 * PAGE_SIZE].iter().all(|&b| b == 0));
    for (p, chunk) in region.as_mut_slice().chunks_mut(PAGE_SIZE).enumerate() {
        fill(chunk, p, 1);
    }
    let st = region.stats();
    // Evictions start a few pages early (their write-backs run while the next pages come
    // in), so a page or two more than the minimum may have gone.
    assert_eq!(
        (st.evictions + st.resident, st.evictions, st.errors),
        (PAGES as u64, st.writebacks, 0),
        "every evicted page was dirty and written back once: {st:?}"
    );
    assert!(
        st.resident <= 16 && st.evictions >= PAGES as u64 - 16,
        "{st:?}"
    );
    assert_eq!(
        fetched(&st),
        PAGES as u64,
        "every page came in once, by its fault or prefetched: {st:?}"
    );
    assert!(
        st.prefetches > PAGES as u64 / 2 && st.prefetch_wasted == 0,
        "a sequential pass is prefetched, nothing wasted: {st:?}"
    );
    let backing = region
        .close()
        .expect("detach writes the 16 resident pages back");
    let pages = backing.pages().to_vec();
    let client = backing.into_client();

    let region = RemoteRegion::attach(client, pages, options(16, OnClose::Free)).expect("attach");
    for (p, chunk) in region.as_slice().chunks(PAGE_SIZE).enumerate() {
        check(chunk, p, 1);
    }
    let st = region.stats();
    assert_eq!((fetched(&st), st.writebacks), (64, 0), "{st:?}");
    assert_eq!(st.evictions + st.resident, 64, "{st:?}");
    assert!(st.resident <= 16, "{st:?}");
    let mut backing = region.close().expect("free");
    let s = backing.client_mut().stat(SERVER).expect("stat");
    assert_eq!(s.pages_used, 0, "the region's pages were freed");
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn eviction_and_write_back_counts_match_the_dirty_set() {
    const PAGES: usize = 32;
    let rig = Rig::new(&RigOptions::default());
    let mut region =
        RemoteRegion::new(rig.client, PAGES, &[SERVER], options(8, OnClose::Free)).unwrap();
    // Read every page: nothing is dirty, nothing is written back.
    let sum: u64 = region
        .as_slice()
        .chunks(PAGE_SIZE)
        .map(|c| u64::from(c[100]))
        .sum();
    assert_eq!(sum, 0);
    let st = region.stats();
    assert_eq!((fetched(&st), st.writebacks), (32, 0), "{st:?}");
    assert_eq!(st.evictions + st.resident, 32, "{st:?}");
    assert!(st.resident <= 8, "{st:?}");
    // Dirty the 16 even pages, one byte each.
    for p in (0..PAGES).step_by(2) {
        region.as_mut_slice()[p * PAGE_SIZE + 7] = p as u8 + 1;
    }
    let flushed = region.flush().unwrap();
    // (Write-backs of evicted pages may still be in flight when the flush starts: it waits for
    // them, and counts only its own.)
    assert!(flushed <= 16);
    assert_eq!(
        region.stats().writebacks,
        16,
        "each dirty page written back exactly once"
    );
    assert_eq!(region.flush().unwrap(), 0, "nothing is dirty after a flush");
    // Reading the odd pages again (evicting the flushed, clean even pages) writes nothing.
    for p in (1..PAGES).step_by(2) {
        assert_eq!(region.as_slice()[p * PAGE_SIZE + 7], 0);
    }
    assert_eq!(region.stats().writebacks, 16);
    for p in (0..PAGES).step_by(2) {
        assert_eq!(
            region.as_slice()[p * PAGE_SIZE + 7],
            p as u8 + 1,
            "page {p}"
        );
    }
    assert_eq!(region.stats().errors, 0);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn concurrent_writers_on_distinct_pages_lose_nothing() {
    const PAGES: usize = 48;
    const THREADS: usize = 4;
    let rig = Rig::new(&RigOptions::default());
    let mut region =
        RemoteRegion::new(rig.client, PAGES, &[SERVER], options(12, OnClose::Detach)).unwrap();
    for round in 1..=3u8 {
        let mut mine: Vec<Vec<(usize, &mut [u8])>> = (0..THREADS).map(|_| Vec::new()).collect();
        for (p, chunk) in region.as_mut_slice().chunks_mut(PAGE_SIZE).enumerate() {
            mine[p % THREADS].push((p, chunk));
        }
        std::thread::scope(|s| {
            for pages in mine {
                s.spawn(move || {
                    for (p, chunk) in pages {
                        fill(chunk, p, round);
                    }
                });
            }
        });
    }
    assert_eq!(region.stats().errors, 0);
    let mut backing = region.close().expect("detach");
    // What the servers hold now, read without the region.
    let pages = backing.pages().to_vec();
    for (p, &addr) in pages.iter().enumerate() {
        let data = backing.client_mut().read(addr).unwrap();
        check(&data, p, 3);
    }
    for chunk in pages.chunks(128) {
        for r in backing.client_mut().free_bulk(chunk).unwrap() {
            r.unwrap();
        }
    }
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_failed_fetch_reaches_the_access_as_an_error() {
    let mut rig = Rig::new(&RigOptions {
        rto: Duration::from_millis(2),
        retries: 2,
        ..RigOptions::default()
    });
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen2 = seen.clone();
    let region = RemoteRegion::new(
        rig.client,
        4,
        &[SERVER],
        RegionOptions {
            on_error: Some(Box::new(move |e| {
                seen2.lock().unwrap().push(e.to_string());
            })),
            ..options(0, OnClose::Detach)
        },
    )
    .unwrap();
    assert_eq!(
        region.as_slice()[0],
        0,
        "page 0 comes in while the server runs"
    );
    rig.server.take();
    // A syscall reading page 1 (write(2) to a file copies from it) gets EFAULT; a plain load
    // would get SIGBUS.
    let path = std::env::temp_dir().join(format!("bb-paging-{}", std::process::id()));
    let mut file = std::fs::File::create(&path).unwrap();
    let r = file.write(&region.as_slice()[PAGE_SIZE..2 * PAGE_SIZE]);
    let _ = std::fs::remove_file(&path);
    let e = r.expect_err("the page cannot be fetched");
    assert_eq!(e.raw_os_error(), Some(libc_efault()), "{e}");
    let errors = seen.lock().unwrap().clone();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("fetching page 1") && errors[0].contains("no reply"),
        "{errors:?}"
    );
    assert_eq!(region.stats().errors, 1);
    assert!(region.last_error().is_some());
    // Page 0 is still there; nothing is dirty, so detaching needs no server.
    assert_eq!(region.as_slice()[5], 0);
    region.close().expect("detach");
}

fn libc_efault() -> i32 {
    14
}
