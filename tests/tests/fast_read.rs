//! The fast READ end to end over real packets: a server with an XDP hot-page store answers
//! INLINE READs of hot pages (whole, or short ranges) from XDP (the client sees INLINE
//! replies, the program's counters move), byte for byte what the worker would send; a page
//! written meanwhile is never served torn or stale (a reader checks every page it gets against
//! a per-page checksum and the writer's last acknowledged value); pages move in and out of a
//! small store under load with every byte right; a freed hot page gets STALE_HANDLE, never its
//! old bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bluebridge_client::ClientError;
use bluebridge_ebpf::HOT_SLOT_SIZE;
use bluebridge_proto::PAGE_SIZE;
use bluebridge_server::hot::HotCounter;
use bluebridge_tests::{Rig, RigOptions, SERVER, pair_client};

fn pattern(seed: u64) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| (i as u64).wrapping_mul(31).wrapping_add(seed * 7) as u8)
        .collect()
}

/// The server's hot-page counters as its workers last published them (every 100 ms).
fn hot_counter(rig: &Rig, c: HotCounter) -> u64 {
    rig.server().stats().handler.hot(c)
}

/// Waits until `f` holds (the server publishes its hot counters every 100 ms).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(5), "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cached(slots: u64) -> RigOptions {
    RigOptions {
        xdp_cache_bytes: slots * HOT_SLOT_SIZE as u64,
        ..RigOptions::default()
    }
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_hot_page_is_served_from_xdp_and_a_freed_one_never_is() {
    let mut rig = Rig::new(&cached(64));
    assert_eq!(rig.server().info().hot_slots, 64);
    let a = rig.client.alloc(SERVER, false).unwrap();
    let b = rig.client.alloc(SERVER, false).unwrap();
    rig.client.write(a, 0, &pattern(1)).unwrap();
    rig.client.write(b, 0, &pattern(2)).unwrap();
    let steer0 = rig.server().stats().steer;
    let s0 = rig.client.stats();
    // The first READ reaches the worker (XDP misses) and promotes the page; the next ones are
    // answered by XDP.
    assert_eq!(rig.client.read(a).unwrap(), pattern(1));
    for _ in 0..20 {
        assert_eq!(rig.client.read(a).unwrap(), pattern(1));
    }
    let s1 = rig.client.stats();
    assert_eq!(
        s1.inline_sent - s0.inline_sent,
        21,
        "whole-page READs go INLINE"
    );
    let steer1 = rig.server().stats().steer;
    assert_eq!(steer1.fast_missed - steer0.fast_missed, 1, "{steer1:?}");
    assert_eq!(steer1.fast_served - steer0.fast_served, 20, "{steer1:?}");
    assert_eq!(s1.inline_served - s0.inline_served, 20);
    eventually("the promotion is counted", || {
        hot_counter(&rig, HotCounter::Promoted) == 1 && hot_counter(&rig, HotCounter::Pages) == 1
    });
    // A write goes through the worker; every READ after its acknowledgement has the new bytes
    // (the slot is rewritten after the batch that changed it).
    for v in 3..8 {
        rig.client.write(a, 0, &pattern(v)).unwrap();
        for _ in 0..5 {
            assert_eq!(rig.client.read(a).unwrap(), pattern(v), "after write {v}");
        }
        rig.client.write(a, 100, &[0xee; 8]).unwrap();
        let mut want = pattern(v);
        want[100..108].fill(0xee);
        assert_eq!(rig.client.read(a).unwrap(), want, "after a partial write");
    }
    let steer2 = rig.server().stats().steer;
    assert!(
        steer2.fast_served - steer1.fast_served >= 10,
        "rewritten slots are served again: {steer2:?}"
    );
    // Short ranges of a hot page come from XDP too; longer ones from the worker.
    assert_eq!(rig.client.read(b).unwrap(), pattern(2)); // promotes b
    let s2 = rig.client.stats();
    for (o, l) in [(8u16, 100u16), (4095, 1), (777, 512), (1, 7)] {
        let (ou, lu) = (usize::from(o), usize::from(l));
        assert_eq!(
            rig.client.read_range(b, o, l).unwrap(),
            pattern(2)[ou..ou + lu]
        );
    }
    assert_eq!(rig.client.stats().inline_served - s2.inline_served, 4);
    assert_eq!(
        rig.client.read_range(b, 8, 1000).unwrap(),
        pattern(2)[8..1008]
    );
    assert_eq!(rig.client.stats().inline_served - s2.inline_served, 4);
    // FREE: the handle is stale at once, through XDP too.
    let served = rig.server().stats().steer.fast_served;
    rig.client.free(a).unwrap();
    for _ in 0..5 {
        assert!(
            matches!(rig.client.read(a), Err(ClientError::StaleHandle)),
            "a freed hot page is never served"
        );
    }
    assert_eq!(rig.server().stats().steer.fast_served, served);
    eventually("the freed page left the store", || {
        hot_counter(&rig, HotCounter::Demoted) == 1 && hot_counter(&rig, HotCounter::Pages) == 1
    });
    // A new page in the same slot of the arena gets a new handle; the old one stays stale.
    let c = rig.client.alloc(SERVER, false).unwrap();
    assert_eq!(rig.client.read(c).unwrap(), vec![0u8; PAGE_SIZE]);
    assert_eq!(rig.client.read(c).unwrap(), vec![0u8; PAGE_SIZE]);
    assert!(matches!(rig.client.read(a), Err(ClientError::StaleHandle)));
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn pages_move_through_a_small_store_under_load_with_every_byte_right() {
    // Four slots; two pages read all the time, twelve others in turn.
    let mut rig = Rig::new(&cached(4));
    let pages: Vec<_> = (0..14)
        .map(|i| {
            let p = rig.client.alloc(SERVER, false).unwrap();
            rig.client.write(p, 0, &pattern(100 + i)).unwrap();
            p
        })
        .collect();
    let s0 = rig.client.stats();
    for round in 0..30 {
        for (i, &p) in pages.iter().enumerate().skip(2) {
            for (j, &hot) in pages[..2].iter().enumerate() {
                assert_eq!(
                    rig.client.read(hot).unwrap(),
                    pattern(100 + j as u64),
                    "hot {j}"
                );
            }
            assert_eq!(
                rig.client.read(p).unwrap(),
                pattern(100 + i as u64),
                "page {i} in round {round}"
            );
        }
    }
    let served = rig.client.stats().inline_served - s0.inline_served;
    assert!(
        served > 30 * 12,
        "the hot pages stay in the store: {served} served"
    );
    eventually("pages were promoted and demoted", || {
        hot_counter(&rig, HotCounter::Promoted) > 4 && hot_counter(&rig, HotCounter::Demoted) > 0
    });
    assert!(hot_counter(&rig, HotCounter::Pages) <= 4);
}

/// An XDP program on the kernel-UDP client's veth that passes everything: veth hands a peer
/// the frames an XDP program sent back with XDP_TX (the fast READ's replies) only when the
/// peer runs one too (otherwise they wait in its ring until other traffic wakes it; docs/
/// running.md). The steering program with no prefix of its own passes every frame.
fn pass_program(rig: &Rig) -> bluebridge_ebpf::Steer {
    let (ns, ifname) = (&rig.pair.client.ns, &rig.pair.client.ifname);
    bluebridge_topology::run_in(ns, || {
        let mut s = bluebridge_ebpf::Steer::load().expect("loading the steering program");
        s.attach(ifname, false)
            .expect("attaching it to the client's veth");
        s
    })
    .expect("entering the client namespace")
}

/// Every 8-byte word of the page holds `v`, but the last, which holds the sum of the others:
/// a torn page fails the check.
fn stamped(v: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(PAGE_SIZE);
    for i in 0..PAGE_SIZE / 8 - 1 {
        p.extend_from_slice(&(v ^ (i as u64) << 40).to_le_bytes());
    }
    let sum = p
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
        .fold(0u64, u64::wrapping_add);
    p.extend_from_slice(&sum.to_le_bytes());
    p
}

/// The value a stamped page holds, if it is whole.
fn stamp_of(p: &[u8]) -> Option<u64> {
    let words: Vec<u64> = p
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
        .collect();
    let (last, rest) = words.split_last()?;
    let v = rest[0];
    let whole = rest
        .iter()
        .enumerate()
        .all(|(i, &w)| w == v ^ (i as u64) << 40)
        && rest.iter().fold(0u64, |a, &w| a.wrapping_add(w)) == *last;
    whole.then_some(v)
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_page_written_continuously_is_never_served_torn_or_stale() {
    // Kernel UDP clients (two endpoints of one address, so both own the page); the server's
    // XDP program answers them all the same.
    let o = RigOptions {
        client_udp: true,
        ..cached(16)
    };
    let mut rig = Rig::new(&o);
    let _pass = pass_program(&rig);
    let page = rig.client.alloc(SERVER, false).unwrap();
    rig.client.write(page, 0, &stamped(1)).unwrap();
    let mut writer = pair_client(&rig.pair, &o);
    let acked = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (acked, stop) = (acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut v = 1;
            while !stop.load(Ordering::Relaxed) {
                v += 1;
                writer.write(page, 0, &stamped(v)).expect("a write");
                acked.store(v, Ordering::Release);
                if v % 4 == 0 {
                    // Room between writes, so the slot is whole again and XDP serves.
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            v
        })
    };
    let steer0 = rig.server().stats().steer;
    let s0 = rig.client.stats();
    let (mut last, mut reads) = (1, 0u64);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        let floor = acked.load(Ordering::Acquire);
        let got = rig.client.read(page).unwrap();
        let v = stamp_of(&got).unwrap_or_else(|| panic!("read {reads}: a torn page"));
        assert!(
            v >= floor,
            "read {reads}: {v} older than the acknowledged {floor}"
        );
        assert!(v >= last, "read {reads}: {v} after {last}");
        last = v;
        reads += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let writes = w.join().unwrap();
    let served = rig.client.stats().inline_served - s0.inline_served;
    let steer = rig.server().stats().steer;
    println!(
        "{reads} reads ({served} from XDP) during {writes} writes; torn-retried {} passed {}",
        steer.fast_torn - steer0.fast_torn,
        steer.fast_passed - steer0.fast_passed
    );
    assert!(
        writes > 100 && reads > 100,
        "{writes} writes, {reads} reads"
    );
    assert!(
        served > 0,
        "some reads came from XDP while the page was written"
    );
    assert!(served < reads, "and some from the worker");
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn each_shard_serves_its_own_pages_from_its_own_slots() {
    // Two workers, eight slots: four each.
    let mut rig = Rig::new(&RigOptions {
        queues: 2,
        ..cached(8)
    });
    // One ALLOC after another: the client spreads host operations over the queues.
    let pages: Vec<_> = (0..8)
        .map(|_| rig.client.alloc(SERVER, false).unwrap())
        .collect();
    for (i, &p) in pages.iter().enumerate() {
        rig.client.write(p, 0, &pattern(200 + i as u64)).unwrap();
    }
    let shards: std::collections::BTreeSet<u8> =
        pages.iter().map(|p| p.handle().shard_field()).collect();
    assert_eq!(shards.len(), 2, "the pages are on both shards");
    let s0 = rig.client.stats();
    for round in 0..5 {
        for (i, &p) in pages.iter().enumerate() {
            assert_eq!(
                rig.client.read(p).unwrap(),
                pattern(200 + i as u64),
                "{round}"
            );
        }
    }
    let served = rig.client.stats().inline_served - s0.inline_served;
    assert!(served >= 8 * 3, "{served} of 40 READs from XDP");
    eventually("both shards promoted pages into their own slots", || {
        let st = rig.server().stats();
        st.shards
            .iter()
            .all(|s| s.hot(HotCounter::Promoted) > 0 && s.hot(HotCounter::Pages) <= 4)
    });
}
