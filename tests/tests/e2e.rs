//! End to end over real packets: every operation in both framing modes, every error status a
//! server produces, a flood of malformed frames, and the neighbour table.

use std::time::{Duration, Instant};

use bluebridge_client::{ClientError, Request};
use bluebridge_proto::frame::Envelope;
use bluebridge_proto::{BbRepr, NetPrefix, OpFlags, Opcode, PAGE_SIZE, RemoteAddr};
use bluebridge_server::{Framing, TransportKind};
use bluebridge_tests::{Rig, RigOptions, SERVER};

fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect()
}

/// Every operation, data verified byte for byte.
fn every_operation(rig: &mut Rig) {
    let c = &mut rig.client;
    assert!(c.ping(SERVER).unwrap() < Duration::from_secs(1));
    let st = c.stat(SERVER).unwrap();
    assert_eq!(st.pages_used, 0);

    let p = c.alloc(SERVER, false).unwrap();
    assert_eq!(p.host_id(), SERVER);
    assert_eq!(
        c.read(p).unwrap(),
        vec![0u8; PAGE_SIZE],
        "new pages are zero"
    );
    let data = pattern(1);
    c.write(p, 0, &data).unwrap();
    assert_eq!(c.read(p).unwrap(), data);
    assert_eq!(c.read_range(p, 1000, 300).unwrap(), &data[1000..1300]);
    let mut into = [0u8; 300];
    c.read_into(p, 1000, &mut into).unwrap();
    assert_eq!(into, data[1000..1300]);
    c.write(p, 4000, &[7; 96]).unwrap();
    assert_eq!(c.read_range(p, 3990, 106).unwrap()[10..], [7; 96]);

    c.write_blind(p, 8, b"blind!").unwrap();
    // Blind writes are unacknowledged: poll until visible.
    let t = Instant::now();
    while c.read_range(p, 8, 6).unwrap() != b"blind!" {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "blind write never landed"
        );
    }

    let q = c.alloc_write(SERVER, 0, &pattern(2), true).unwrap();
    assert_eq!(c.read(q).unwrap(), pattern(2));

    let (lease, old) = c.update_acquire(q, 0, 4096, 0).unwrap();
    assert_eq!(old, pattern(2));
    assert!(lease.id != 0 && lease.ms > 0);
    c.update_commit(q, lease, 0, &pattern(3)).unwrap();
    assert_eq!(c.read(q).unwrap(), pattern(3));
    let (lease, _) = c.update_acquire(q, 0, 0, 0).unwrap();
    c.update_release(q, lease).unwrap();

    assert_eq!(
        c.fetch_add(p, 64, 5).unwrap(),
        u64::from_le_bytes(data[64..72].try_into().unwrap())
    );
    let now = c.fetch_add(p, 64, 0).unwrap();
    assert_eq!(c.cas(p, 64, now, 42).unwrap(), now);
    assert_eq!(c.read_range(p, 64, 8).unwrap(), 42u64.to_le_bytes());
    assert_eq!(
        c.cas(p, 64, 1, 2).unwrap(),
        42,
        "failed CAS returns the current value"
    );

    let pages = c.alloc_bulk(SERVER, 5, false).unwrap();
    assert_eq!(pages.len(), 5);
    let writes: Vec<(RemoteAddr, u16, Vec<u8>)> = pages
        .iter()
        .enumerate()
        .map(|(i, &pg)| (pg, 100, vec![i as u8 + 1; 64]))
        .collect();
    let w = bluebridge_tests::borrowed_writes(&writes);
    assert!(c.write_bulk(&w).unwrap().iter().all(Result::is_ok));
    let reads = c.read_bulk(&pages, 0, 4096).unwrap();
    for (i, r) in reads.iter().enumerate() {
        let d = r.as_ref().unwrap();
        assert_eq!(d[100..164], [i as u8 + 1; 64]);
        assert!(d[..100].iter().chain(&d[164..]).all(|&b| b == 0));
    }
    assert!(c.free_bulk(&pages[..3]).unwrap().iter().all(Result::is_ok));
    let after = c.read_bulk(&pages, 100, 1).unwrap();
    assert_eq!(after[0], Err(ClientError::StaleHandle));
    assert_eq!(after[4].as_ref().unwrap(), &[5]);

    c.free(p).unwrap();
    assert_eq!(c.read(p), Err(ClientError::StaleHandle));
    let st = c.stat(SERVER).unwrap();
    assert_eq!(st.pages_used, 1 + 2);
    assert_eq!(rig.client.stats().timeouts, 0);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn every_operation_one_frame_per_page() {
    let mut rig = Rig::new(&RigOptions::default());
    assert!(rig.server().info().multi_buffer);
    assert!(rig.xdp().multi_buffer());
    every_operation(&mut rig);
    let s = rig.server().stats();
    assert!(
        s.xsk.rx_chains > 0,
        "whole pages arrived as multi-buffer chains"
    );
    assert!(
        s.xsk.rx_in_place > 0,
        "whole-page WRITEs were taken from where they arrived, not copied together"
    );
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn every_operation_segmented() {
    let mut rig = Rig::new(&RigOptions {
        mtu: 1500,
        framing: Framing::Segments,
        client_multi_buffer: false,
        ..RigOptions::default()
    });
    assert!(!rig.server().info().multi_buffer);
    assert_eq!(rig.server().info().frame_data, 1400);
    every_operation(&mut rig);
    let s = rig.server().stats();
    assert_eq!(s.xsk.rx_chains, 0);
}

/// §6, found from outside: a server in segment framing at MTU 9000 dropped, unanswered and
/// uncounted, every request frame larger than one UMEM chunk (WRITE ≥ 3736 B, whole-page
/// WRITE and ALLOC_WRITE). It now takes multi-buffer frames whatever its reply framing.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn s6_a_segmenting_server_accepts_request_frames_up_to_its_mtu() {
    let mut rig = Rig::new(&RigOptions {
        framing: Framing::Segments,
        client_multi_buffer: true, // sends whole pages in one 4206-byte frame
        ..RigOptions::default()
    });
    let info = rig.server().info().clone();
    assert!(!info.multi_buffer);
    assert!(info.frame_data < 4096, "{}", info.frame_data);
    let c = &mut rig.client;
    let data = pattern(9);
    let p = c.alloc(SERVER, false).unwrap();
    c.write(p, 0, &data).unwrap();
    assert_eq!(c.read(p).unwrap(), data);
    let q = c.alloc_write(SERVER, 0, &data, false).unwrap();
    assert_eq!(c.read(q).unwrap(), data);
    c.write(q, 100, &data[..3800]).unwrap();
    assert_eq!(c.read_range(q, 100, 3800).unwrap(), &data[..3800]);
    let s = rig.server().stats();
    assert!(
        s.xsk.rx_chains >= 3,
        "requests arrived in pieces: {:?}",
        s.xsk
    );
    assert_eq!(s.xsk.kernel_rx_dropped, 0);
    assert_eq!(rig.client.stats().timeouts, 0);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn interop_kernel_udp_server_with_af_xdp_client() {
    let mut rig = Rig::new(&RigOptions {
        server_transport: TransportKind::Udp,
        ..RigOptions::default()
    });
    assert_eq!(rig.server().info().attach, None);
    every_operation(&mut rig);
    assert_eq!(
        rig.server().stats().steer.redirected,
        0,
        "no XDP on a UDP server"
    );
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn interop_af_xdp_server_with_kernel_udp_client() {
    let mut rig = Rig::new(&RigOptions {
        client_udp: true,
        ..RigOptions::default()
    });
    every_operation(&mut rig);
    assert!(rig.server().stats().steer.redirected > 0);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn kernel_udp_both_ends_with_segments() {
    let mut rig = Rig::new(&RigOptions {
        server_transport: TransportKind::Udp,
        client_udp: true,
        mtu: 1500,
        framing: Framing::Segments,
        ..RigOptions::default()
    });
    every_operation(&mut rig);
    // One permanent neighbour entry per host (the next hop), however many pages were used.
    assert_eq!(rig.pair.client_ns().neighbour_count().unwrap(), 1);
    assert_eq!(rig.pair.server_ns().neighbour_count().unwrap(), 1);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn every_error_status_reaches_the_client() {
    let mut rig = Rig::new(&RigOptions {
        arena_bytes: 2 << 20,
        max_leases: 1,
        ..RigOptions::default()
    });
    let c = &mut rig.client;
    let p = c.alloc(SERVER, false).unwrap();
    let raw = |c: &mut bluebridge_client::Client<_>, r: Request| {
        let id = c.submit(r);
        c.wait(id).map(drop)
    };
    // INVALID_HANDLE / STALE_HANDLE.
    let bogus = p.with_handle(bluebridge_proto::PageHandle::from_bits(
        0x1234_5678_9abc_def0,
    ));
    assert!(matches!(
        c.read(bogus),
        Err(ClientError::InvalidHandle | ClientError::StaleHandle)
    ));
    let q = c.alloc(SERVER, false).unwrap();
    c.free(q).unwrap();
    assert_eq!(c.read(q), Err(ClientError::StaleHandle));
    // OUT_OF_RANGE, MALFORMED, UNKNOWN_OPCODE, MISALIGNED, TOO_MANY: as the server sees them.
    let oor = Request::new(Opcode::WRITE, p)
        .range(4090, 10)
        .payload(vec![0; 10]);
    assert_eq!(raw(c, oor), Err(ClientError::OutOfRange));
    let bad = Request::new(Opcode::WRITE, p)
        .range(0, 10)
        .payload(vec![0; 4]);
    assert_eq!(raw(c, bad), Err(ClientError::Malformed));
    assert_eq!(
        raw(c, Request::new(Opcode(0xee), p)),
        Err(ClientError::UnknownOpcode)
    );
    assert_eq!(c.cas(p, 4, 0, 1), Err(ClientError::Misaligned));
    assert_eq!(c.alloc_bulk(SERVER, 129, false), Err(ClientError::TooMany));
    // LEASE_HELD, LEASE_INVALID, LEASE_EXPIRED.
    // Long enough that the BUSY below still finds it held on a loaded machine (a lease that
    // has run out frees its slot).
    let (lease, _) = c.update_acquire(p, 0, 0, 300).unwrap();
    assert_eq!(
        c.update_acquire(p, 0, 0, 0).map(drop),
        Err(ClientError::LeaseHeld)
    );
    let wrong = bluebridge_client::Lease {
        id: lease.id ^ 1,
        ms: 0,
    };
    assert_eq!(
        c.update_commit(p, wrong, 0, b"x"),
        Err(ClientError::LeaseInvalid)
    );
    // BUSY: the server's one lease slot is taken.
    let other = c.alloc(SERVER, false).unwrap();
    assert_eq!(
        c.update_acquire(other, 0, 0, 0).map(drop),
        Err(ClientError::Busy)
    );
    std::thread::sleep(Duration::from_millis(320));
    assert_eq!(
        c.update_commit(p, lease, 0, b"late"),
        Err(ClientError::LeaseExpired)
    );
    assert_eq!(
        c.read_range(p, 0, 4).unwrap(),
        [0; 4],
        "the late write was rejected"
    );
    // OUT_OF_MEMORY: 512 pages in a 2 MiB arena, two in use.
    for _ in 0..3 {
        c.alloc_bulk(SERVER, 128, false).unwrap();
    }
    c.alloc_bulk(SERVER, 126, false).unwrap();
    assert_eq!(c.stat(SERVER).unwrap().pages_used, 512);
    assert_eq!(c.alloc(SERVER, false), Err(ClientError::OutOfMemory));
    // UNSUPPORTED_VERSION: a version-2 request, answered with its request id.
    let dst = RemoteAddr::host_op(NetPrefix::DEFAULT, SERVER, Opcode::PING);
    let header = BbRepr {
        count: 1,
        request_id: 0xfeed,
        ..BbRepr::default()
    };
    let (mut f, ep) = rig.raw_request(dst, &header, &[]);
    f[62] = 2;
    let mut u = bluebridge_proto::wire::udp::UdpPacket::new_unchecked(&mut f[54..]);
    u.fill_checksum(ep.src, ep.dst);
    assert!(rig.xdp().send_raw(&f));
    let t = Instant::now();
    let mut answer = None;
    while answer.is_none() && t.elapsed() < Duration::from_secs(2) {
        rig.xdp().recv_raw(|fr| {
            let env = Envelope::parse(fr).unwrap();
            let status = u16::from_be_bytes([env.udp_payload[2], env.udp_payload[3]]);
            answer = Some((env.request_id_any_version(), status, env.udp_payload[0]));
        });
    }
    assert_eq!(
        answer,
        Some((
            Some(0xfeed),
            bluebridge_proto::Status::UNSUPPORTED_VERSION.0,
            1
        ))
    );
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_restricted_server_forbids_other_clients() {
    let mut rig = Rig::new(&RigOptions {
        allowed_clients: vec!["fd00:bb:9::/48".parse().unwrap()],
        ..RigOptions::default()
    });
    assert_eq!(
        rig.client.ping(SERVER).map(drop),
        Err(ClientError::Forbidden)
    );
    assert_eq!(rig.client.alloc(SERVER, false), Err(ClientError::Forbidden));
    assert_eq!(rig.server().stats().pages_used, 0);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn malformed_flood_is_counted_and_dropped() {
    let mut rig = Rig::new(&RigOptions::default());
    let p = rig.client.alloc(SERVER, false).unwrap();
    let data = pattern(9);
    rig.client.write(p, 0, &data).unwrap();
    let dst = p.with_op(Opcode::READ, OpFlags::NONE);
    let header = BbRepr {
        count: 1,
        request_id: 1,
        length: 4096,
        ..BbRepr::default()
    };
    let (good, ep) = rig.raw_request(dst, &header, &[]);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut in_xdp, mut to_user) = (0u64, 0u64);
    for i in 0..4000u64 {
        let frame: Vec<u8> = match i % 4 {
            // Truncated inside the UDP header: the XDP program passes it on (counted).
            0 => good[..14 + 40 + (next() % 8) as usize].to_vec(),
            // Bad checksum, truncated BlueBridge header, wrong version: userspace drops it.
            1 => {
                let mut f = good.clone();
                f[70 + (next() % 40) as usize] ^= 0x5a;
                f
            }
            2 => {
                let mut f = good.clone();
                let cut = 62 + (next() % 48) as usize;
                f.truncate(cut);
                f[18..20].copy_from_slice(&((cut - 54) as u16).to_be_bytes());
                f[58..60].copy_from_slice(&((cut - 54) as u16).to_be_bytes());
                let mut u = bluebridge_proto::wire::udp::UdpPacket::new_unchecked(&mut f[54..]);
                u.fill_checksum(ep.src, ep.dst);
                f
            }
            _ => {
                // Random bytes after valid lower headers (so XDP steers them to the server).
                let mut f = good[..62].to_vec();
                f.extend((0..48 + next() % 64).map(|_| next() as u8));
                f
            }
        };
        if i % 4 == 0 {
            in_xdp += 1
        } else {
            to_user += 1
        }
        while !rig.xdp().send_raw(&frame) {
            rig.xdp().recv_raw(|_| {});
        }
        if i % 100 == 0 {
            assert_eq!(
                rig.client.read(p).unwrap(),
                data,
                "valid requests keep working"
            );
        }
    }
    // Let the server drain, then count.
    let t = Instant::now();
    loop {
        let s = rig.server().stats();
        if s.handler.malformed_total() + s.steer.malformed >= in_xdp + to_user
            || t.elapsed() > Duration::from_secs(5)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = rig.server().stats();
    assert_eq!(
        s.steer.malformed, in_xdp,
        "cut inside the UDP header: counted by XDP"
    );
    // Every frame that reached userspace was dropped as malformed, except random payloads
    // that happened to parse with a bad checksum... which is also malformed. None answered.
    assert_eq!(s.handler.malformed_total(), to_user);
    assert_eq!(rig.client.read(p).unwrap(), data);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn neighbour_tables_stay_empty_with_100k_page_addresses() {
    let mut rig = Rig::new(&RigOptions {
        arena_bytes: 512 << 20,
        ..RigOptions::default()
    });
    let before = (
        rig.pair.client_ns().neighbour_count().unwrap(),
        rig.pair.server_ns().neighbour_count().unwrap(),
    );
    let mut pages = Vec::with_capacity(100_000);
    while pages.len() < 100_000 {
        let n = (100_000 - pages.len()).min(128) as u16;
        pages.extend(rig.client.alloc_bulk(SERVER, n, false).unwrap());
    }
    let distinct: std::collections::HashSet<_> = pages.iter().collect();
    assert_eq!(distinct.len(), 100_000);
    // Touch every page address with a pipelined READ (32 in flight).
    let t = Instant::now();
    let mut next = 0;
    let mut done = 0;
    while done < pages.len() {
        while next < pages.len() && rig.client.in_flight() < 32 {
            rig.client.submit(
                Request::new(Opcode::READ, pages[next])
                    .range(0, 64)
                    .tag(next as u64),
            );
            next += 1;
        }
        while let Some(c) = rig.client.poll() {
            assert_eq!(c.result.unwrap().data, vec![0u8; 64], "page {}", c.tag);
            done += 1;
        }
    }
    println!("100,000 page addresses read in {:?}", t.elapsed());
    let after = (
        rig.pair.client_ns().neighbour_count().unwrap(),
        rig.pair.server_ns().neighbour_count().unwrap(),
    );
    assert_eq!(before, (0, 0));
    assert_eq!(after, before, "no neighbour entries added");
    assert_eq!(rig.client.stats().timeouts, 0);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_reply_burst_larger_than_the_tx_ring_is_held_back_never_stranded() {
    // Eight READ_BULKs of 128 whole pages at once ask for 1,024 page frames (2,048 TX
    // descriptors, all the server socket has): the worker stops taking requests while its
    // replies wait for the kernel, and every page still arrives.
    let mut rig = Rig::new(&RigOptions {
        arena_bytes: 16 << 20,
        ..RigOptions::default()
    });
    let c = &mut rig.client;
    let pages = c.alloc_bulk(SERVER, 128, false).unwrap();
    for (i, &p) in pages.iter().enumerate() {
        c.write(p, 0, &pattern(i as u8)).unwrap();
    }
    let mut list = vec![0u8; pages.len() * 8];
    bluebridge_proto::message::put_handles(&mut list, pages.iter().map(|p| p.handle()));
    let ids: Vec<u64> = (0..8)
        .map(|_| {
            let mut r = Request::new(Opcode::READ_BULK, pages[0])
                .range(0, PAGE_SIZE as u16)
                .payload(list.clone());
            r.count = pages.len() as u16;
            c.submit(r)
        })
        .collect();
    for r in c.wait_all(&ids) {
        let items = r.unwrap().items;
        assert_eq!(items.len(), pages.len());
        for (i, item) in items.iter().enumerate() {
            assert_eq!(item.data, pattern(i as u8), "page {i}");
        }
    }
    std::thread::sleep(Duration::from_millis(50));
    let s = rig.server().stats();
    assert!(
        s.xsk.tx_backpressure > 0,
        "the TX backlog bound was reached"
    );
}

/// §2.2/§2.3, found from outside: the kernel-UDP server executed writes hidden behind an IPv6
/// extension header and accepted UDP length 0, which the AF_XDP server never takes. Both now
/// refuse them alike: nothing is written, nothing answered, the frames counted.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn s2_both_servers_refuse_extension_headers_and_udp_length_0() {
    for transport in [TransportKind::Udp, TransportKind::Xdp] {
        let mut rig = Rig::new(&RigOptions {
            server_transport: transport,
            ..RigOptions::default()
        });
        let p = rig.client.alloc(SERVER, false).unwrap();
        let dst = p.with_op(Opcode::WRITE, OpFlags::NONE);
        let header = BbRepr {
            count: 1,
            request_id: 0xbad,
            length: 4,
            ..BbRepr::default()
        };
        let (plain, ep) = rig.raw_request(dst, &header, b"evil");
        // A hop-by-hop options header (8 bytes: next header UDP, PadN) before the UDP header;
        // the UDP checksum does not change (its pseudo-header names UDP and its length).
        let mut hbh = plain[..54].to_vec();
        hbh[20] = 0; // next header: hop-by-hop options
        let pl = u16::from_be_bytes([hbh[18], hbh[19]]) + 8;
        hbh[18..20].copy_from_slice(&pl.to_be_bytes());
        hbh.extend([17, 0, 1, 4, 0, 0, 0, 0]);
        hbh.extend(&plain[54..]);
        // UDP length 0, the checksum made right for it.
        let mut zero = plain.clone();
        zero[58..60].fill(0);
        zero[60..62].fill(0);
        let mut c = bluebridge_proto::checksum::Checksum::new();
        c.add_pseudo_header(ep.src, ep.dst, 17, (zero.len() - 54) as u32);
        c.add_bytes(&zero[54..]);
        // (`fill_checksum` would read the length field, 0 here: the sum is taken by hand.)
        let sum = bluebridge_proto::checksum::udp_field(&c);
        zero[60..62].copy_from_slice(&sum.to_be_bytes());
        let before = rig.server().stats();
        for f in [&hbh, &zero] {
            assert!(rig.xdp().send_raw(f));
        }
        let t = Instant::now();
        let mut replies = 0;
        while t.elapsed() < Duration::from_millis(300) {
            rig.xdp().recv_raw(|_| replies += 1);
        }
        assert_eq!(replies, 0, "{transport:?} answered");
        assert_eq!(
            rig.client.read_range(p, 0, 4).unwrap(),
            [0; 4],
            "{transport:?} wrote"
        );
        let after = rig.server().stats();
        let malformed = after.handler.malformed_total() - before.handler.malformed_total();
        let not_udp = after.steer.pass_not_udp - before.steer.pass_not_udp;
        match transport {
            TransportKind::Udp => assert_eq!(malformed, 2, "both cut and counted"),
            _ => assert_eq!((malformed, not_udp), (1, 1), "length 0 counted, HBH passed"),
        }
    }
}

/// §2.2, found from outside: the kernel-UDP server's replies carried the kernel's hashed flow
/// labels; senders write 0.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn s2_2_kernel_udp_replies_carry_flow_label_0() {
    let mut rig = Rig::new(&RigOptions {
        server_transport: TransportKind::Udp,
        ..RigOptions::default()
    });
    let dst = RemoteAddr::host_op(NetPrefix::DEFAULT, SERVER, Opcode::PING);
    let header = BbRepr {
        count: 1,
        request_id: 0x77,
        ..BbRepr::default()
    };
    let (f, _) = rig.raw_request(dst, &header, &[]);
    let mut labels = Vec::new();
    for _ in 0..5 {
        assert!(rig.xdp().send_raw(&f));
        let t = Instant::now();
        let mut got = false;
        while !got && t.elapsed() < Duration::from_secs(2) {
            rig.xdp().recv_raw(|r| {
                got = true;
                labels.push(u32::from_be_bytes([0, r[15] & 0x0f, r[16], r[17]]));
            });
        }
        assert!(got, "no reply");
    }
    assert!(labels.iter().all(|&l| l == 0), "flow labels {labels:x?}");
}
