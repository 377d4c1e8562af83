//! The pipelined fault path under prefetching, over real packets: data comes back byte for byte
//! whatever the access pattern (forward, reverse, strided, two streams from both ends) while
//! pages are prefetched, evicted and written back, with CLOCK and with FIFO, in whole frames
//! (installed from them) and in segments; writers on the
//! *same* pages from several threads lose no increment; hints do what they say.

use bluebridge_client::region::{Advice, Eviction, OnClose, RegionStats};
use bluebridge_client::{AnyTransport, Client, RegionOptions, RemoteRegion};
use bluebridge_proto::{PAGE_SIZE, RemoteAddr};
use bluebridge_tests::{Rig, RigOptions, SERVER};

fn pattern(page: usize, i: usize, round: u8) -> u8 {
    ((page * 131 + i * 13) as u8) ^ round.wrapping_mul(0x3d)
}

fn options(budget: usize, on_close: OnClose) -> RegionOptions {
    RegionOptions {
        resident_pages: budget,
        on_close,
        ..RegionOptions::default()
    }
}

/// Checks `page` (one page of bytes, region page `p`) against round `round`'s pattern.
fn check(page: &[u8], p: usize, round: u8) {
    let bad = page
        .iter()
        .enumerate()
        .find(|&(i, &b)| b != pattern(p, i, round));
    assert!(bad.is_none(), "page {p}: first difference at {bad:?}");
}

fn pages_in(order: &str, n: usize) -> Vec<usize> {
    match order {
        "forward" => (0..n).collect(),
        "reverse" => (0..n).rev().collect(),
        // Stride 3 through the region, three times over (every page once).
        "strided" => (0..3).flat_map(|k| (k..n).step_by(3)).collect(),
        // Two streams from both ends meeting in the middle (a partition's pattern).
        "both ends" => (0..n / 2).flat_map(|i| [i, n - 1 - i]).collect(),
        other => panic!("unknown order {other}"),
    }
}

/// Reads every page from the server directly, then frees them.
fn server_pages(mut client: Client<AnyTransport>, pages: &[RemoteAddr]) -> Vec<Vec<u8>> {
    let data = pages.iter().map(|&a| client.read(a).unwrap()).collect();
    for chunk in pages.chunks(128) {
        for r in client.free_bulk(chunk).unwrap() {
            r.unwrap();
        }
    }
    data
}

/// Writes every page in each order and reads it back in the next, through a region an eighth
/// of the data; the server holds the last round. `whole_frames`: pages arrive in one frame each
/// (and are installed from it).
fn round_trips(eviction: Eviction, rig: &RigOptions, whole_frames: bool) {
    const PAGES: usize = 192;
    const BUDGET: usize = 24;
    let rig = Rig::new(rig);
    let mut region = RemoteRegion::new(
        rig.client,
        PAGES,
        &[SERVER],
        RegionOptions {
            eviction,
            ..options(BUDGET, OnClose::Detach)
        },
    )
    .unwrap();
    let orders = ["forward", "reverse", "strided", "both ends"];
    for (k, order) in orders.iter().enumerate() {
        let round = k as u8 + 1;
        let mem = region.as_mut_slice();
        for p in pages_in(order, PAGES) {
            for (i, b) in mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
                .iter_mut()
                .enumerate()
            {
                *b = pattern(p, i, round);
            }
        }
        let before = region.stats();
        let next = orders[(k + 1) % orders.len()];
        let mem = region.as_slice();
        for p in pages_in(next, PAGES) {
            check(&mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], p, round);
        }
        let st = region.stats();
        assert_eq!(st.errors, 0, "{st:?}");
        assert!(
            st.prefetches - before.prefetches > PAGES as u64 / 2,
            "{eviction:?}, written {order}, read {next}: most pages prefetched: {st:?}"
        );
        assert!(
            st.resident <= BUDGET as u64,
            "the budget holds under prefetching: {st:?}"
        );
    }
    let mut backing = region
        .close()
        .expect("detach writes the resident pages back");
    let direct = backing.client_mut().stats().direct;
    if whole_frames {
        assert!(
            direct > PAGES as u64,
            "pages came in whole frames and were installed from them (one copy): {direct}"
        );
    } else {
        assert_eq!(direct, 0, "segmented pages are reassembled, then installed");
    }
    let pages = backing.pages().to_vec();
    for (p, data) in server_pages(backing.into_client(), &pages)
        .iter()
        .enumerate()
    {
        check(data, p, orders.len() as u8);
    }
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn data_comes_back_byte_for_byte_under_prefetching_and_clock_eviction() {
    round_trips(Eviction::Clock, &RigOptions::default(), true);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn data_comes_back_byte_for_byte_when_pages_travel_in_segments() {
    // MTU 1500: every READ reply and every write-back is several frames.
    let o = RigOptions {
        mtu: 1500,
        ..RigOptions::default()
    };
    round_trips(Eviction::Clock, &o, false);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn data_comes_back_byte_for_byte_under_prefetching_and_fifo_eviction() {
    round_trips(Eviction::Fifo, &RigOptions::default(), true);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn writers_sweeping_the_same_pages_lose_no_increment() {
    const PAGES: usize = 96;
    const THREADS: usize = 4;
    const ROUNDS: u64 = 3;
    let rig = Rig::new(&RigOptions::default());
    let region =
        RemoteRegion::new(rig.client, PAGES, &[SERVER], options(12, OnClose::Detach)).unwrap();
    let words = region.as_atomic_words();
    let per_page = PAGE_SIZE / 8;
    std::thread::scope(|s| {
        for (t, order) in ["forward", "reverse", "strided", "both ends"]
            .iter()
            .enumerate()
        {
            s.spawn(move || {
                for round in 0..ROUNDS {
                    for p in pages_in(order, PAGES) {
                        // Thread t owns word t of every page; the page is everybody's.
                        let w = &words[p * per_page + t];
                        let seen = w.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        assert_eq!(seen, round, "thread {t}, page {p}: an increment was lost");
                    }
                }
            });
        }
    });
    let st: RegionStats = region.stats();
    assert_eq!(st.errors, 0, "{st:?}");
    assert!(st.prefetches > 0 && st.writebacks > 0, "{st:?}");
    let backing = region.close().expect("detach");
    let pages = backing.pages().to_vec();
    for (p, data) in server_pages(backing.into_client(), &pages)
        .iter()
        .enumerate()
    {
        for t in 0..THREADS {
            let v = u64::from_ne_bytes(data[8 * t..8 * t + 8].try_into().unwrap());
            assert_eq!(v, ROUNDS, "page {p}, thread {t}'s word on the server");
        }
    }
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn hints_steer_the_prefetcher() {
    const PAGES: usize = 128;
    let rig = Rig::new(&RigOptions::default());
    let region =
        RemoteRegion::new(rig.client, PAGES, &[SERVER], options(64, OnClose::Free)).unwrap();
    let mem = region.as_slice();
    // Random: a forward scan of the first quarter fetches only what it touches.
    region.advise(0..32, Advice::Random).unwrap();
    let sum: u64 = (0..32).map(|p| u64::from(mem[p * PAGE_SIZE])).sum();
    assert_eq!(sum, 0);
    let st = region.stats();
    assert_eq!((st.prefetches, st.faults), (0, 32), "{st:?}");
    // WillNeed: the second quarter comes in before anything touches it.
    region.advise(32..48, Advice::WillNeed).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while region.stats().prefetches < 16 && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
    let before = region.stats();
    assert_eq!(before.prefetches, 16, "{before:?}");
    let sum: u64 = (32..48).map(|p| u64::from(mem[p * PAGE_SIZE])).sum();
    assert_eq!(sum, 0);
    let after = region.stats();
    assert_eq!(after.prefetch_misses, before.prefetch_misses, "{after:?}");
    // Sequential: the first fault in the range starts a stream at once.
    region.advise(64..128, Advice::Sequential).unwrap();
    std::hint::black_box(mem[64 * PAGE_SIZE]);
    let st = region.stats();
    assert!(st.prefetches > after.prefetches, "{st:?}");
    assert!(region.advise(0..0, Advice::Normal).is_err());
    assert!(region.advise(100..200, Advice::Normal).is_err());
    assert_eq!(region.stats().errors, 0);
}
