//! Loss, duplication and reordering on the wire (an impairment relay between the hosts: the
//! kernel here has no netem, and AF_XDP transmission bypasses qdiscs anyway).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bluebridge_client::ClientError;
use bluebridge_proto::{PAGE_SIZE, RemoteAddr};
use bluebridge_tests::{Rig, RigOptions, SERVER};
use bluebridge_topology::Impairment;

fn pattern(seed: u32) -> Vec<u8> {
    (0..PAGE_SIZE as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 24) as u8)
        .collect()
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// 5% loss, 1% duplication, 10% reordering (up to 1 ms) both ways.
fn impair(rig: &Rig) {
    rig.pair.relay.as_ref().unwrap().set(Impairment {
        loss: 0.05,
        duplicate: 0.01,
        reorder: 0.10,
        max_delay: Duration::from_millis(1),
    });
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn every_operation_survives_loss_duplication_and_reordering() {
    let mut rig = Rig::new(&RigOptions {
        relay_seed: Some(7),
        arena_bytes: 16 << 20,
        ..RigOptions::default()
    });
    impair(&rig);
    let c = &mut rig.client;
    let counter = c.alloc(SERVER, false).unwrap();
    let leased = c.alloc(SERVER, false).unwrap();
    let blind = c.alloc(SERVER, false).unwrap();
    let pages: Vec<RemoteAddr> = c.alloc_bulk(SERVER, 8, false).unwrap();
    let mut last_write: HashMap<RemoteAddr, u32> = HashMap::new();
    let (mut adds, mut cas_wins, mut commits) = (0u64, 0u64, 0u64);
    let mut live: Vec<RemoteAddr> = Vec::new();
    let mut rng = Rng(0x5eed);
    let t = Instant::now();
    let ops = 1000;
    for i in 0..ops {
        match rng.below(12) {
            0 | 1 => {
                c.fetch_add(counter, 0, 1).unwrap();
                adds += 1;
            }
            2 => {
                let v =
                    u64::from_le_bytes(c.read_range(counter, 8, 8).unwrap().try_into().unwrap());
                if c.cas(counter, 8, v, v + 1).unwrap() == v {
                    cas_wins += 1;
                }
            }
            3 | 4 => {
                let p = pages[rng.below(8) as usize];
                let seed = i as u32;
                c.write(p, 0, &pattern(seed)).unwrap();
                last_write.insert(p, seed);
            }
            5 => {
                let p = pages[rng.below(8) as usize];
                let d = c.read(p).unwrap();
                if let Some(&seed) = last_write.get(&p) {
                    assert!(
                        d == pattern(seed),
                        "a read returns the last acknowledged write"
                    );
                }
            }
            6 => {
                let (lease, cur) = c.update_acquire(leased, 0, 8, 0).unwrap();
                let v = u64::from_le_bytes(cur.try_into().unwrap()) + 1;
                c.update_commit(leased, lease, 0, &v.to_le_bytes()).unwrap();
                commits += 1;
            }
            7 => live.push(c.alloc(SERVER, rng.below(2) == 0).unwrap()),
            8 if !live.is_empty() => {
                let p = live.swap_remove(rng.below(live.len() as u64) as usize);
                c.free(p).unwrap();
                assert_eq!(c.read_range(p, 0, 1), Err(ClientError::StaleHandle));
            }
            9 => {
                let bulk = c.alloc_bulk(SERVER, 3, false).unwrap();
                let writes: Vec<(RemoteAddr, u16, &[u8])> =
                    bulk.iter().map(|&p| (p, 0, &b"bulk"[..])).collect();
                assert!(c.write_bulk(&writes).unwrap().iter().all(Result::is_ok));
                for r in c.read_bulk(&bulk, 0, 4).unwrap() {
                    assert_eq!(r.unwrap(), b"bulk");
                }
                assert!(c.free_bulk(&bulk).unwrap().iter().all(Result::is_ok));
            }
            10 => {
                c.write_blind(blind, 4000, b"blind").unwrap();
            }
            _ => {
                c.ping(SERVER).unwrap();
            }
        }
    }
    let elapsed = t.elapsed();
    // Every acknowledged increment counted exactly once: nothing executed twice.
    let words = c.read_range(counter, 0, 16).unwrap();
    assert_eq!(
        u64::from_le_bytes(words[..8].try_into().unwrap()),
        adds,
        "FETCH_ADD"
    );
    assert_eq!(
        u64::from_le_bytes(words[8..].try_into().unwrap()),
        cas_wins,
        "CAS"
    );
    assert_eq!(
        c.read_range(leased, 0, 8).unwrap(),
        commits.to_le_bytes(),
        "UPDATE"
    );
    // No ALLOC or FREE ran twice: the server holds exactly the pages acknowledged as live.
    let st = c.stat(SERVER).unwrap();
    assert_eq!(st.pages_used, 3 + 8 + live.len() as u64);
    for (p, seed) in last_write {
        assert!(
            c.read(p).unwrap() == pattern(seed),
            "an acknowledged write was lost"
        );
    }
    let cs = c.stats();
    let relay = rig.pair.relay.as_ref().unwrap();
    let load = |i: usize| {
        let k = &relay.counters[i];
        use std::sync::atomic::Ordering::Relaxed;
        (
            k.frames.load(Relaxed),
            k.lost.load(Relaxed),
            k.duplicated.load(Relaxed),
            k.delayed.load(Relaxed),
        )
    };
    let server = rig.server().stats();
    println!(
        "{ops} operations in {elapsed:?}: requests {}, retransmissions {}, timeouts {}, stray replies {}; \
         server duplicates answered from the table {}; relay client→server (frames, lost, duplicated, delayed) {:?}, \
         server→client {:?}",
        cs.submitted,
        cs.retransmits,
        cs.timeouts,
        cs.stray,
        server.handler.duplicates,
        load(0),
        load(1)
    );
    assert!(
        cs.retransmits > 0 && server.handler.duplicates > 0,
        "the relay did impair the link"
    );
    assert_eq!(cs.timeouts, 0);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_dead_link_times_out_only_after_the_retry_budget() {
    let rto = Duration::from_millis(2);
    let mut rig = Rig::new(&RigOptions {
        relay_seed: Some(1),
        rto,
        retries: 6,
        ..RigOptions::default()
    });
    rig.client.ping(SERVER).unwrap();
    rig.pair.relay.as_ref().unwrap().set(Impairment {
        loss: 1.0,
        ..Impairment::NONE
    });
    let before = rig.client.stats().retransmits;
    let t = Instant::now();
    assert_eq!(
        rig.client.ping(SERVER).map(drop),
        Err(ClientError::Timeout { tries: 7 })
    );
    // Backoff doubles: 2+4+8+16+32+32+32 ms before giving up.
    let budget = rto * (1 + 2 + 4 + 8 + 16 + 16 + 16);
    assert!(t.elapsed() >= budget, "{:?} < {budget:?}", t.elapsed());
    assert_eq!(rig.client.stats().retransmits - before, 6);
    // The link comes back: so does service.
    rig.pair.relay.as_ref().unwrap().set(Impairment::NONE);
    rig.client.ping(SERVER).unwrap();
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_kernel_udp_client_that_cannot_send_counts_its_drops() {
    let mut rig = Rig::new(&RigOptions {
        client_udp: true,
        rto: Duration::from_millis(2),
        retries: 3,
        ..RigOptions::default()
    });
    rig.client.ping(SERVER).unwrap();
    assert_eq!(rig.client.stats().tx_dropped, 0);
    // No route to the prefix: every sendmmsg fails (ENETUNREACH).
    let ns = rig.pair.client_ns().name().to_owned();
    let route = ["-6", "route", "del", "fd00:bb::/32"];
    bluebridge_topology::ip_in(&ns, &route).expect("removing the client's route");
    assert_eq!(
        rig.client.ping(SERVER).map(drop),
        Err(ClientError::Timeout { tries: 4 })
    );
    assert_eq!(
        rig.client.stats().tx_dropped,
        4,
        "every transmission counted"
    );
    // The route comes back: so does service, and the count stays.
    let ifname = rig.pair.client.ifname.clone();
    let route = [
        "-6",
        "route",
        "add",
        "fd00:bb::/32",
        "via",
        "fe80::bb:2",
        "dev",
        &ifname,
    ];
    bluebridge_topology::ip_in(&ns, &route).expect("restoring the client's route");
    rig.client.ping(SERVER).unwrap();
    assert_eq!(rig.client.stats().tx_dropped, 4);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn atomics_across_shards_run_once_under_loss_and_hand_offs() {
    // Two shards behind the impairment relay: the relay's frames land on either server queue,
    // so requests are handed between the workers, while 5% of frames are lost, 1% duplicated
    // and 10% reordered. Every acknowledged FETCH_ADD and won CAS counts exactly once.
    let mut rig = Rig::new(&RigOptions {
        relay_seed: Some(11),
        queues: 2,
        ..RigOptions::default()
    });
    impair(&rig);
    let c = &mut rig.client;
    // Pages of both shards where the relay's queue choice allows (an ALLOC is served by the
    // shard whose queue it arrives on); four at least.
    let mut pages: Vec<RemoteAddr> = Vec::new();
    for _ in 0..64 {
        let p = c.alloc(SERVER, false).unwrap();
        let f = p.handle().shard_field();
        if pages.len() < 4 || !pages.iter().any(|q| q.handle().shard_field() == f) {
            pages.push(p);
        }
        if pages.len() >= 4 && pages.iter().any(|q| q.handle().shard_field() != f) {
            break;
        }
    }
    let mut rng = Rng(0xfeed);
    let (mut adds, mut cas_wins) = (vec![0u64; pages.len()], vec![0u64; pages.len()]);
    for _ in 0..400 {
        let i = rng.below(pages.len() as u64) as usize;
        let p = pages[i];
        if rng.below(3) == 0 {
            let v = u64::from_le_bytes(c.read_range(p, 8, 8).unwrap().try_into().unwrap());
            if c.cas(p, 8, v, v + 1).unwrap() == v {
                cas_wins[i] += 1;
            }
        } else {
            c.fetch_add(p, 0, 3).unwrap();
            adds[i] += 3;
        }
    }
    for (i, &p) in pages.iter().enumerate() {
        let mut word = |o| u64::from_le_bytes(c.read_range(p, o, 8).unwrap().try_into().unwrap());
        assert_eq!(word(0), adds[i], "page {i}: adds");
        assert_eq!(word(8), cas_wins[i], "page {i}: CAS increments");
    }
    let relay = rig.pair.relay.as_ref().unwrap();
    let lost: u64 = relay
        .counters
        .iter()
        .map(|c| c.lost.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let s = rig.server().stats();
    assert!(lost > 0, "the relay lost frames");
    assert!(
        s.handler.duplicates > 0,
        "retransmissions were answered from the sessions"
    );
    assert!(
        s.handler.handoffs > 0,
        "requests arrived on the other shard's queue"
    );
    assert_eq!(s.handler.handoff_dropped, 0);
}
