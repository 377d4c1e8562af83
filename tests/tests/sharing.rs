//! Coherent shared regions across hosts (docs/protocol.md §5.18, docs/paging.md "Sharing"),
//! over real packets in a 3-host rack around the XDP switch: one server, an AF_XDP client on
//! each host mapping the same pages. Litmus tests run many times and count forbidden
//! outcomes; a lock built from compare-and-swap in the mapped memory protects a counter; a
//! parallel job's result is checked byte for byte; a holder that dies blocks a writer only
//! for its copy lease.

use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use bluebridge_client::region::{Coherence, HandlerCpu, OnClose};
use bluebridge_client::{RegionOptions, RemoteRegion};
use bluebridge_proto::{HostId, PAGE_SIZE, RemoteAddr};
use bluebridge_tests::{RackRig, rack_client};

/// Words per page.
const WORDS: usize = PAGE_SIZE / 8;

fn shared_options() -> RegionOptions {
    RegionOptions {
        coherence: Coherence::Shared,
        // Three regions' handlers and three test threads share two CPUs.
        handler_cpu: HandlerCpu::Any,
        on_close: OnClose::Detach,
        ..RegionOptions::default()
    }
}

/// A rack of 3 hosts with a server on the first, `pages` shared pages on it, and `f` run on
/// every host at once with that host's region over the same pages. Returns what each host's
/// `f` returned, and checks that no region met an error.
fn on_three_hosts<R: Send>(
    pages: usize,
    f: impl Fn(usize, &RemoteRegion<bluebridge_client::AnyTransport>, &Barrier) -> R + Sync,
) -> Vec<R> {
    let rig = RackRig::new(3, &[0]);
    let server = HostId(rig.rack.hosts[0].host_id);
    // The pages' owner is host 0's client; its socket is closed while the regions run (one
    // AF_XDP client per link) and opened again to free them.
    let mut addrs: Vec<RemoteAddr> = Vec::new();
    {
        let mut owner = rig.client(0);
        while addrs.len() < pages {
            let n = (pages - addrs.len()).min(128) as u16;
            addrs.extend(owner.alloc_bulk(server, n, true).expect("shared pages"));
        }
    }
    let barrier = Barrier::new(3);
    let out = std::thread::scope(|s| {
        let hosts: Vec<_> = (0..3)
            .map(|i| {
                let (rack, addrs, f, barrier) = (&rig.rack, addrs.clone(), &f, &barrier);
                s.spawn(move || {
                    let client = rack_client(rack, i, 10);
                    let region = RemoteRegion::attach(client, addrs, shared_options())
                        .expect("a shared region");
                    let r = f(i, &region, barrier);
                    let st = region.stats();
                    assert_eq!(st.errors, 0, "host {i}: {:?}", region.last_error());
                    assert_eq!(st.lost_writes, 0, "host {i}");
                    region.close().expect("closing");
                    (r, st)
                })
            })
            .collect();
        hosts
            .into_iter()
            .map(|h| h.join().expect("host thread"))
            .collect::<Vec<_>>()
    });
    for (i, (_, st)) in out.iter().enumerate() {
        eprintln!("host {i}: {st:?}");
    }
    let revokes: u64 = out.iter().map(|(_, st)| st.revokes).sum();
    assert!(
        revokes > 0,
        "copies moved between hosts: {out:?}",
        out = out.iter().map(|o| o.1).collect::<Vec<_>>()
    );
    // Every copy went back at close: the pages can be freed.
    let mut owner = rig.client(0);
    let failed = owner.free_all(&addrs);
    assert!(failed.is_empty(), "freeing: {failed:?}");
    out.into_iter().map(|(r, _)| r).collect()
}

fn spin_until(word: &AtomicU64, value: u64) {
    let start = Instant::now();
    while word.load(SeqCst) != value {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "waited 30 s for {value} (have {})",
            word.load(SeqCst)
        );
        std::thread::yield_now();
    }
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn litmus_message_passing_and_write_ordering() {
    const RUNS: u64 = 150;
    // Page 0: data (the whole page), page 1: flag, page 2: acknowledgement, page 3: a word
    // every host writes at once.
    let out = on_three_hosts(4, |host, region, barrier| {
        let w = region.as_atomic_words();
        let (flag, ack, contested) = (&w[WORDS], &w[2 * WORDS], &w[3 * WORDS]);
        let mut forbidden = 0u64;
        for run in 1..=RUNS {
            match host {
                // A writes the data, then the flag; waits for B's acknowledgement.
                1 => {
                    for x in &w[..WORDS] {
                        x.store(run * 1000 + 7, SeqCst);
                    }
                    flag.store(run, SeqCst);
                    spin_until(ack, run);
                }
                // B sees the flag, then must see all of the data.
                2 => {
                    spin_until(flag, run);
                    forbidden += w[..WORDS]
                        .iter()
                        .filter(|x| x.load(SeqCst) != run * 1000 + 7)
                        .count() as u64;
                    ack.store(run, SeqCst);
                }
                _ => {}
            }
        }
        // Write-write on one word: every host writes at once; afterwards all read one value,
        // which one of them wrote.
        let mut finals = Vec::new();
        for run in 1..=RUNS / 3 {
            barrier.wait();
            for k in 0..4 {
                contested.store(run << 8 | (host as u64) << 4 | k, SeqCst);
            }
            barrier.wait();
            finals.push(contested.load(SeqCst));
            barrier.wait();
        }
        (forbidden, finals)
    });
    let forbidden: u64 = out.iter().map(|o| o.0).sum();
    assert_eq!(
        forbidden, 0,
        "message passing: B saw the flag before the data"
    );
    for run in 0..out[0].1.len() {
        let v: Vec<u64> = out.iter().map(|o| o.1[run]).collect();
        assert!(
            v.iter().all(|&x| x == v[0]),
            "run {run}: hosts disagree: {v:x?}"
        );
        assert_eq!(v[0] >> 8, run as u64 + 1);
        assert_eq!(v[0] & 0xf, 3, "the final value is some host's last write");
    }
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn litmus_store_and_load_buffering_never_show_forbidden_outcomes() {
    const RUNS: u64 = 100;
    // x on page 0, y on page 1. Hosts 1 and 2 take part; host 0 only keeps the barrier.
    let out = on_three_hosts(2, |host, region, barrier| {
        let w = region.as_atomic_words();
        let (x, y) = (&w[0], &w[WORDS]);
        // Per run: whether this host saw the old value (store buffering) and whether it saw
        // the other's later store (load buffering).
        let (mut sb, mut lb) = (Vec::new(), Vec::new());
        for run in 1..=RUNS {
            // Store buffering: each stores, then loads the other's.
            barrier.wait();
            let seen = match host {
                1 => {
                    x.store(2 * run, SeqCst);
                    y.load(SeqCst)
                }
                2 => {
                    y.store(2 * run, SeqCst);
                    x.load(SeqCst)
                }
                _ => 2 * run,
            };
            sb.push(seen < 2 * run);
            barrier.wait();
            // Load buffering: each loads the other's, then stores its own.
            let seen = match host {
                1 => {
                    let r = x.load(SeqCst);
                    y.store(2 * run + 1, SeqCst);
                    r
                }
                2 => {
                    let r = y.load(SeqCst);
                    x.store(2 * run + 1, SeqCst);
                    r
                }
                _ => 0,
            };
            lb.push(seen == 2 * run + 1);
            barrier.wait();
        }
        (sb, lb)
    });
    let runs = RUNS as usize;
    // Forbidden: both saw the old value (SB), both saw the other's later store (LB).
    let sb = (0..runs).filter(|&r| out[1].0[r] && out[2].0[r]).count();
    let lb = (0..runs).filter(|&r| out[1].1[r] && out[2].1[r]).count();
    assert_eq!(
        (sb, lb),
        (0, 0),
        "forbidden outcomes (store buffering, load buffering)"
    );
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_lock_in_shared_memory_protects_a_counter_across_hosts() {
    const ROUNDS: u64 = 100;
    // The lock word on page 0, the counter (a plain read-modify-write, not atomic) on page 1.
    on_three_hosts(2, |host, region, barrier| {
        let w = region.as_atomic_words();
        let (lock, counter) = (&w[0], &w[WORDS]);
        barrier.wait();
        for _ in 0..ROUNDS {
            let start = Instant::now();
            while lock
                .compare_exchange(0, host as u64 + 1, SeqCst, SeqCst)
                .is_err()
            {
                assert!(start.elapsed() < Duration::from_secs(30), "lock never came");
                std::thread::yield_now();
            }
            let v = counter.load(SeqCst);
            counter.store(v + 1, SeqCst);
            lock.store(0, SeqCst);
        }
        barrier.wait();
        assert_eq!(
            counter.load(SeqCst),
            3 * ROUNDS,
            "host {host}: the exact total"
        );
    });
}

fn cell(page: usize, i: usize) -> u8 {
    ((page * 131 + i * 7) ^ (i >> 5)) as u8
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_parallel_job_on_a_shared_array_is_whole_on_every_host() {
    const PER_HOST: usize = 12;
    // Each host fills its third of the array; then every host checks all of it.
    let bad = on_three_hosts(3 * PER_HOST, |host, region, barrier| {
        let w = region.as_atomic_words();
        for page in host * PER_HOST..(host + 1) * PER_HOST {
            for k in 0..WORDS {
                let mut word = [0u8; 8];
                for (j, b) in word.iter_mut().enumerate() {
                    *b = cell(page, k * 8 + j);
                }
                w[page * WORDS + k].store(u64::from_le_bytes(word), SeqCst);
            }
        }
        barrier.wait();
        let all = region.as_slice();
        (0..3 * PER_HOST)
            .flat_map(|page| (0..PAGE_SIZE).map(move |i| (page, i)))
            .filter(|&(page, i)| all[page * PAGE_SIZE + i] != cell(page, i))
            .count()
    });
    assert_eq!(bad, [0, 0, 0], "bytes that differ, per host");
}
