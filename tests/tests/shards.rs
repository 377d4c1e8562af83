//! A server with several workers, each owning one shard of the pages, over multi-queue veth
//! pairs: every operation on pages of every shard, requests sent on the wrong queue (handed to
//! the owning shard and answered), retransmissions across queues executed once, and atomics
//! from many concurrent clients with exact totals.

use std::time::{Duration, Instant};

use bluebridge_client::{AnyTransport, Client, ClientError, Connect, TransportKind};
use bluebridge_proto::frame::Frame;
use bluebridge_proto::{BbRepr, MacAddr, NetPrefix, Opcode, PAGE_SIZE, RemoteAddr, Status};
use bluebridge_tests::{Rig, RigOptions, SERVER, client_addr};

fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Allocates pages until every one of `shards` shards holds at least `each` of them (ALLOCs
/// are host operations: each lands on the shard whose queue the client picked for it).
fn pages_on_every_shard(
    c: &mut Client<AnyTransport>,
    shards: usize,
    each: usize,
    shared: bool,
) -> Vec<Vec<RemoteAddr>> {
    let mut by_shard = vec![Vec::new(); shards];
    for _ in 0..64 * shards * each {
        if by_shard.iter().all(|v: &Vec<_>| v.len() >= each) {
            return by_shard;
        }
        let p = c.alloc(SERVER, shared).unwrap();
        let s = p
            .handle()
            .shard(shards)
            .expect("a page handle names its shard");
        assert!(
            usize::from(p.handle().shard_field()) <= shards,
            "a shard field past the server's shards: {p:?}"
        );
        by_shard[s].push(p);
    }
    panic!(
        "ALLOCs never reached every shard: {:?}",
        by_shard.iter().map(Vec::len).collect::<Vec<_>>()
    );
}

fn every_operation_on_every_shard(queues: u32) {
    let mut rig = Rig::new(&RigOptions {
        queues,
        ..RigOptions::default()
    });
    let n = queues as usize;
    assert_eq!(rig.server().info().shards, n);
    // veth has no zero-copy: every socket fell back to copy mode, with need-wakeup.
    let modes = &rig.server().info().sockets;
    assert_eq!(modes.len(), n);
    assert!(
        modes.iter().all(|m| !m.zero_copy && m.need_wakeup),
        "{modes:?}"
    );
    // Nor ntuple filters: the server tried, was refused, and steers by hand-off.
    assert_eq!(rig.server().info().flow_rules, 0);
    assert_eq!(rig.xdp().queues().len(), n, "a client socket per queue");
    let c = &mut rig.client;
    let by_shard = pages_on_every_shard(c, n, 2, false);
    let all: Vec<RemoteAddr> = by_shard.iter().flatten().copied().collect();
    for (i, &p) in all.iter().enumerate() {
        assert_eq!(c.read(p).unwrap(), vec![0; PAGE_SIZE], "new pages are zero");
        c.write(p, 0, &pattern(i as u8)).unwrap();
    }
    for (i, &p) in all.iter().enumerate() {
        assert_eq!(c.read(p).unwrap(), pattern(i as u8));
        assert_eq!(
            c.read_range(p, 100, 50).unwrap(),
            &pattern(i as u8)[100..150]
        );
        let word = u64::from_le_bytes(pattern(i as u8)[64..72].try_into().unwrap());
        assert_eq!(c.fetch_add(p, 64, 3).unwrap(), word);
        assert_eq!(c.cas(p, 64, word + 3, 77).unwrap(), word + 3);
        let (lease, old) = c.update_acquire(p, 0, 8, 0).unwrap();
        assert_eq!(old, &pattern(i as u8)[..8]);
        c.update_commit(p, lease, 0, &[i as u8; 8]).unwrap();
        assert_eq!(c.read_range(p, 0, 8).unwrap(), [i as u8; 8]);
        assert_eq!(c.read_range(p, 64, 8).unwrap(), 77u64.to_le_bytes());
    }
    // Bulk requests over pages of every shard: the client sends one per shard.
    let writes: Vec<(RemoteAddr, u16, Vec<u8>)> = all
        .iter()
        .enumerate()
        .map(|(i, &p)| (p, 200, vec![0xa0 + i as u8; 16]))
        .collect();
    let w = bluebridge_tests::borrowed_writes(&writes);
    assert!(c.write_bulk(&w).unwrap().iter().all(Result::is_ok));
    let reads = c.read_bulk(&all, 200, 16).unwrap();
    for (i, r) in reads.iter().enumerate() {
        assert_eq!(r.as_ref().unwrap(), &vec![0xa0 + i as u8; 16]);
    }
    // A bulk allocation lands on one shard, and its pages can be freed in bulk with others.
    let bulk = c.alloc_bulk(SERVER, 4, false).unwrap();
    let shard = bulk[0].handle().shard_field();
    assert!(bulk.iter().all(|p| p.handle().shard_field() == shard));
    let st = c.stat(SERVER).unwrap();
    assert_eq!(st.shards, n as u64);
    assert_eq!(st.zero_copy, 0);
    assert_eq!(st.pages_used, (all.len() + 4) as u64);
    let mut gone = all.clone();
    gone.extend(&bulk);
    assert!(c.free_bulk(&gone).unwrap().iter().all(Result::is_ok));
    for &p in &gone {
        assert_eq!(c.read(p), Err(ClientError::StaleHandle));
    }
    assert_eq!(c.stat(SERVER).unwrap().pages_used, 0);
    assert_eq!(c.stats().timeouts, 0);
    let s = rig.server().stats();
    for (i, sh) in s.shards.iter().enumerate() {
        assert!(
            sh.requests > 0,
            "shard {i} served nothing: {:?}",
            sh.requests
        );
    }
    assert_eq!(
        s.handler.handoffs, 0,
        "the client sent every request on its page's queue, and veth kept the queue number"
    );
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn every_operation_on_every_shard_of_two() {
    every_operation_on_every_shard(2);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn every_operation_on_every_shard_of_four() {
    every_operation_on_every_shard(4);
}

/// Sends `frame` on the client's `queue`-th socket and waits for the reply to `request_id`.
fn raw_call(rig: &mut Rig, queue: usize, frame: &[u8], request_id: u64) -> (BbRepr, Vec<u8>) {
    assert!(rig.xdp().send_raw_on(queue, frame));
    let t = Instant::now();
    let mut got = None;
    while got.is_none() {
        assert!(t.elapsed() < Duration::from_secs(5), "no reply");
        rig.xdp().recv_raw(|f| {
            if let Ok(f) = Frame::parse(f)
                && f.header.request_id == request_id
            {
                got = Some((f.header, f.payload.to_vec()));
            }
        });
    }
    got.expect("set above")
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn requests_on_the_wrong_queue_are_handed_to_their_shard() {
    let mut rig = Rig::new(&RigOptions {
        queues: 4,
        ..RigOptions::default()
    });
    let by_shard = pages_on_every_shard(&mut rig.client, 4, 1, false);
    for (s, pages) in by_shard.iter().enumerate() {
        rig.client.write(pages[0], 0, &pattern(s as u8)).unwrap();
    }
    let before = rig.server().stats().handler;
    let mut sent = 0;
    for (s, pages) in by_shard.iter().enumerate() {
        let wrong = (s + 1) % 4;
        let h = BbRepr {
            request_id: 0x5000 + s as u64,
            count: 1,
            offset: 0,
            length: PAGE_SIZE as u16,
            ..BbRepr::default()
        };
        let dst = pages[0].with_op(Opcode::READ, Default::default());
        let (frame, _) = rig.raw_request(dst, &h, &[]);
        let (reply, data) = raw_call(&mut rig, wrong, &frame, h.request_id);
        assert_eq!(reply.status, Status::OK);
        assert_eq!(
            data,
            pattern(s as u8),
            "shard {s}'s page, asked on queue {wrong}"
        );
        sent += 1;
    }
    // A FETCH_ADD, then its retransmission on yet another queue: run once, answered twice.
    let p = by_shard[2][0];
    let h = BbRepr {
        request_id: 0x6001,
        count: 1,
        offset: 128,
        length: 8,
        operand0: 5,
        ..BbRepr::default()
    };
    let (frame, _) = rig.raw_request(p.with_op(Opcode::FETCH_ADD, Default::default()), &h, &[]);
    let old = u64::from_le_bytes(pattern(2)[128..136].try_into().unwrap());
    let (r1, _) = raw_call(&mut rig, 0, &frame, h.request_id);
    let (r2, _) = raw_call(&mut rig, 3, &frame, h.request_id);
    assert_eq!((r1.status, r1.operand0), (Status::OK, old));
    assert_eq!(
        (r2.status, r2.operand0),
        (Status::OK, old),
        "the stored reply"
    );
    assert_eq!(
        rig.client.read_range(p, 128, 8).unwrap(),
        (old + 5).to_le_bytes(),
        "added once"
    );
    let after = rig.server().stats().handler;
    assert_eq!(after.handoffs - before.handoffs, sent + 2);
    assert_eq!(after.duplicates - before.duplicates, 1);
    assert_eq!(after.handoff_dropped, 0);
    let st = rig.client.stat(SERVER).unwrap();
    assert!(st.handoffs >= sent + 2, "STAT reports the hand-offs");
    assert_eq!((st.handoff_dropped, st.kernel_dropped), (0, 0));
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn concurrent_atomics_from_many_clients_across_shards_are_exact() {
    // Kernel-UDP clients: the kernel spreads their flows over the veth queues, so most
    // requests arrive on another shard's queue and are handed over.
    let rig = Rig::new(&RigOptions {
        queues: 4,
        client_udp: true,
        ..RigOptions::default()
    });
    let xdp = Connect {
        kind: TransportKind::Xdp,
        ifname: rig.pair.client.ifname.clone(),
        local: client_addr(),
        next_hop_mac: Some(MacAddr(rig.pair.server.mac)),
        prefix: NetPrefix::DEFAULT,
        segments: false,
    };
    let (t, ec) = xdp.open().expect("an AF_XDP client beside the UDP ones");
    let mut steering = Client::new(ec, t);
    let by_shard = pages_on_every_shard(&mut steering, 4, 1, true);
    let pages: Vec<RemoteAddr> = by_shard.iter().map(|v| v[0]).collect();
    const THREADS: usize = 4;
    const ROUNDS: u64 = 300;
    // The UDP clients need an address of their own: the AF_XDP client's steering program
    // takes every frame to `client_addr()`.
    let udp_addr: std::net::Ipv6Addr = "fd00:bb:1::2".parse().unwrap();
    bluebridge_topology::ip_in(
        &rig.pair.client.ns,
        &[
            "-6",
            "addr",
            "add",
            &format!("{udp_addr}/128"),
            "dev",
            &rig.pair.client.ifname,
            "nodad",
        ],
    )
    .expect("a second client address");
    let udp = Connect {
        kind: TransportKind::Udp,
        local: udp_addr,
        ..xdp.clone()
    };
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (udp, pages) = (udp.clone(), pages.clone());
            std::thread::spawn(move || {
                let (tr, mut ec) = udp.open().expect("a UDP client");
                ec.rto = Duration::from_millis(5);
                ec.retries = 10;
                let mut c = Client::new(ec, tr);
                let mut cas_wins = 0u64;
                for r in 0..ROUNDS {
                    let p = pages[(r as usize + t) % pages.len()];
                    c.fetch_add(p, 0, t as u64 + 1).expect("fetch_add");
                    // A CAS increment of the word at 8, retried until it wins.
                    loop {
                        let cur =
                            u64::from_le_bytes(c.read_range(p, 8, 8).unwrap().try_into().unwrap());
                        if c.cas(p, 8, cur, cur + 1).expect("cas") == cur {
                            cas_wins += 1;
                            break;
                        }
                    }
                }
                cas_wins
            })
        })
        .collect();
    // The AF_XDP client adds too, on its own queues, at the same time.
    for r in 0..ROUNDS {
        steering.fetch_add(pages[r as usize % 4], 0, 100).unwrap();
    }
    let cas_total: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(cas_total, THREADS as u64 * ROUNDS);
    let mut adds = 0u64;
    let mut incs = 0u64;
    for &p in &pages {
        adds += u64::from_le_bytes(steering.read_range(p, 0, 8).unwrap().try_into().unwrap());
        incs += u64::from_le_bytes(steering.read_range(p, 8, 8).unwrap().try_into().unwrap());
    }
    let want: u64 = (0..THREADS as u64).map(|t| (t + 1) * ROUNDS).sum::<u64>() + 100 * ROUNDS;
    assert_eq!(adds, want, "every acknowledged FETCH_ADD ran exactly once");
    assert_eq!(incs, cas_total, "every won CAS ran exactly once");
    let s = rig.server().stats();
    assert!(
        s.handler.handoffs > 0,
        "the kernel's queue choice sent some requests to other shards"
    );
    assert_eq!(s.handler.handoff_dropped, 0);
    for (i, sh) in s.shards.iter().enumerate() {
        assert!(sh.requests > 0, "shard {i} served nothing");
    }
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_server_with_preferred_busy_polling_serves_every_shard() {
    let mut rig = Rig::new(&RigOptions {
        queues: 2,
        busy_poll: Some(bluebridge_xsk::BusyPoll {
            usecs: 20,
            budget: 16,
        }),
        ..RigOptions::default()
    });
    assert!(rig.server().info().sockets.iter().all(|m| m.busy_poll));
    let by_shard = pages_on_every_shard(&mut rig.client, 2, 1, false);
    for (s, pages) in by_shard.iter().enumerate() {
        rig.client.write(pages[0], 0, &pattern(s as u8)).unwrap();
        assert_eq!(rig.client.read(pages[0]).unwrap(), pattern(s as u8));
    }
    // Idle polls went to the kernel to drive NAPI (the stats are published when idle).
    std::thread::sleep(Duration::from_millis(50));
    assert!(rig.server().stats().xsk.rx_kicks > 0);
}
