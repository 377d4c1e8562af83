//! The request handler over real frames, without sockets: every operation, every status the
//! server produces, duplicates, leases over time, and malformed input.

mod common;

use common::*;

#[test]
fn ping_and_stat() {
    let mut r = rig();
    let h = BbRepr {
        operand0: 7,
        operand1: 8,
        ..hdr(0, 0)
    };
    let p = r.one(Opcode::PING, PageHandle::NONE, h, &[]);
    assert_eq!((p.h.status, p.h.operand0, p.h.operand1), (Status::OK, 7, 8));
    r.alloc();
    let s = r.one(Opcode::STAT, PageHandle::NONE, hdr(0, 0), &[]);
    let rec = StatRecord::parse(&s.payload).unwrap();
    assert_eq!(
        (rec.pages_total, rec.pages_used, rec.uptime_ms),
        (512, 1, 1000)
    );
    assert_eq!(rec.requests, 3);
}

#[test]
fn alloc_write_read_free() {
    let mut r = rig();
    let p = r.alloc();
    assert!(
        r.read(p, 0, 4096).iter().all(|&b| b == 0),
        "new pages are zero"
    );
    let data = pattern(1);
    let w = r.one(Opcode::WRITE, p, hdr(0, 4096), &data);
    assert_eq!((w.h.status, w.h.offset, w.h.length), (Status::OK, 0, 4096));
    assert_eq!(w.src.opcode(), Opcode::WRITE);
    assert_eq!(r.read(p, 0, 4096), data);
    assert_eq!(r.read(p, 100, 50), data[100..150]);
    assert_eq!(r.status(Opcode::FREE, p, hdr(0, 0), &[]), Status::OK);
    assert_eq!(
        r.status(Opcode::READ, p, hdr(0, 4096), &[]),
        Status::STALE_HANDLE
    );
    assert_eq!(
        r.status(Opcode::WRITE, p, hdr(0, 4), &[1; 4]),
        Status::STALE_HANDLE
    );
    assert_eq!(
        r.status(Opcode::FREE, p, hdr(0, 0), &[]),
        Status::STALE_HANDLE
    );
    // The page is reused zeroed.
    let q = r.alloc();
    assert_ne!(q, p);
    assert!(r.read(q, 0, 4096).iter().all(|&b| b == 0));
}

#[test]
fn reads_are_segmented() {
    let mut r = rig_with(2 << 20, 4096, |_| {});
    let p = r.alloc();
    let data = pattern(2);
    r.one(Opcode::WRITE, p, hdr(0, 4096), &data);
    let frames = r.req(Opcode::READ, p, hdr(0, 4096), &[]);
    assert_eq!(frames.len(), 1, "whole page in one frame");
    // The client's seg_max limits the frames: four 1024-byte segments.
    let h = BbRepr {
        seg_max: 1184,
        ..hdr(0, 4096)
    };
    let frames = r.req(Opcode::READ, p, h, &[]);
    let ranges: Vec<_> = frames.iter().map(|f| (f.h.offset, f.h.length)).collect();
    assert_eq!(
        ranges,
        [(0, 1024), (1024, 1024), (2048, 1024), (3072, 1024)]
    );
    // So does the server's own limit (two halves for one copy-mode chunk).
    let mut r2 = rig_with(2 << 20, 3728, |_| {});
    let p2 = r2.alloc();
    r2.one(Opcode::WRITE, p2, hdr(0, 4096), &data);
    let frames = r2.req(Opcode::READ, p2, hdr(0, 4096), &[]);
    assert_eq!(
        frames.iter().map(|f| f.h.length).collect::<Vec<_>>(),
        [2048, 2048]
    );
    assert_eq!(r2.read(p2, 0, 4096), data);
}

#[test]
fn segmented_writes_assemble_a_page() {
    let mut r = rig();
    let p = r.alloc();
    let data = pattern(3);
    for (o, l) in bluebridge_proto::Segments::new(0, 4096, 1184) {
        let (o8, l8) = (usize::from(o), usize::from(l));
        assert_eq!(
            r.status(Opcode::WRITE, p, hdr(o, l), &data[o8..o8 + l8]),
            Status::OK
        );
    }
    assert_eq!(r.read(p, 0, 4096), data);
}

#[test]
fn write_blind_is_never_answered() {
    let mut r = rig();
    let p = r.alloc();
    assert!(r.req(Opcode::WRITE_BLIND, p, hdr(8, 4), b"abcd").is_empty());
    assert_eq!(&r.read(p, 8, 4), b"abcd");
    // Not even an error, but the error is counted.
    let before = r.handler.stats().errors();
    assert!(
        r.req(
            Opcode::WRITE_BLIND,
            PageHandle::from_bits(1),
            hdr(0, 4),
            b"abcd"
        )
        .is_empty()
    );
    assert!(
        r.req(Opcode::WRITE_BLIND, p, hdr(4094, 4), b"abcd")
            .is_empty()
    );
    assert_eq!(r.handler.stats().errors(), before + 2);
}

#[test]
fn alloc_write_fills_a_range() {
    let mut r = rig();
    let a = r.one(Opcode::ALLOC_WRITE, PageHandle::NONE, hdr(16, 5), b"hello");
    assert_eq!(a.h.status, Status::OK);
    assert_eq!(a.src.opcode(), Opcode::ALLOC_WRITE);
    let p = a.src.handle();
    let page = r.read(p, 0, 4096);
    assert_eq!(&page[16..21], b"hello");
    assert!(page[..16].iter().chain(&page[21..]).all(|&b| b == 0));
}

#[test]
fn bulk_alloc_read_write_free() {
    let mut r = rig();
    let a = r.one(
        Opcode::ALLOC_BULK,
        PageHandle::NONE,
        BbRepr {
            count: 3,
            ..hdr(0, 0)
        },
        &[],
    );
    assert_eq!((a.h.status, a.h.count), (Status::OK, 3));
    let handles: Vec<_> = a
        .payload
        .chunks(8)
        .map(|c| PageHandle::from_bits(u64::from_be_bytes(c.try_into().unwrap())))
        .collect();
    assert_eq!(handles.len(), 3);
    assert_eq!(a.src.handle(), handles[0]);

    // WRITE_BULK: one frame, three writes and one bad handle; per-entry statuses.
    let mut buf = vec![0u8; 512];
    let mut end = 0;
    for (i, h) in handles.iter().enumerate() {
        let data = [i as u8 + 1; 16];
        end = put_write_entry(
            &mut buf,
            end,
            &WriteEntry {
                handle: *h,
                offset: 32,
                data: &data,
            },
        )
        .unwrap();
    }
    let bogus = PageHandle::from_bits(0xdead_beef);
    end = put_write_entry(
        &mut buf,
        end,
        &WriteEntry {
            handle: bogus,
            offset: 0,
            data: &[1],
        },
    )
    .unwrap();
    let w = r.one(
        Opcode::WRITE_BULK,
        handles[0],
        BbRepr {
            count: 4,
            ..hdr(0, 0)
        },
        &buf[..end],
    );
    assert_eq!(w.h.status, Status::OK);
    let st: Vec<_> = (0..4)
        .map(|i| bulk_status(&w.payload, i).unwrap())
        .collect();
    assert_eq!(st[..3], [Status::OK; 3]);
    assert!(matches!(
        st[3],
        Status::INVALID_HANDLE | Status::STALE_HANDLE
    ));

    // READ_BULK: each item's range comes from its own page address.
    let mut list = vec![0u8; 32];
    put_handles(&mut list, handles.iter().copied().chain([bogus]));
    let frames = r.req(
        Opcode::READ_BULK,
        handles[0],
        BbRepr {
            count: 4,
            ..hdr(32, 16)
        },
        &list,
    );
    assert_eq!(frames.len(), 4);
    for f in &frames[..3] {
        let i = usize::from(f.h.item);
        assert_eq!(f.src.handle(), handles[i]);
        assert_eq!(f.h.status, Status::OK);
        assert_eq!(f.payload, [i as u8 + 1; 16]);
    }
    assert_eq!(frames[3].h.item, 3);
    assert!(!frames[3].h.status.is_ok());
    assert_eq!(frames[3].src.handle(), bogus);

    // FREE_BULK: per-item statuses; freeing twice is stale.
    let mut list = vec![0u8; 16];
    put_handles(&mut list, handles[..2].iter().copied());
    let f = r.one(
        Opcode::FREE_BULK,
        handles[0],
        BbRepr {
            count: 2,
            ..hdr(0, 0)
        },
        &list,
    );
    assert_eq!(
        (bulk_status(&f.payload, 0), bulk_status(&f.payload, 1)),
        (Some(Status::OK), Some(Status::OK))
    );
    let f = r.one(
        Opcode::FREE_BULK,
        handles[0],
        BbRepr {
            count: 2,
            ..hdr(0, 0)
        },
        &list,
    );
    assert_eq!(bulk_status(&f.payload, 0), Some(Status::STALE_HANDLE));
    assert_eq!(
        r.status(Opcode::READ, handles[2], hdr(32, 16), &[]),
        Status::OK
    );
}

#[test]
fn atomics() {
    let mut r = rig();
    let p = r.alloc();
    let fa = |r: &mut Rig, add: u64| {
        let x = r.one(
            Opcode::FETCH_ADD,
            p,
            BbRepr {
                operand0: add,
                ..hdr(64, 8)
            },
            &[],
        );
        assert_eq!(x.h.status, Status::OK);
        x.h.operand0
    };
    assert_eq!(fa(&mut r, 5), 0);
    assert_eq!(fa(&mut r, u64::MAX), 5); // wrapping: 5 + (2^64 - 1) = 4
    assert_eq!(fa(&mut r, 0), 4);
    // The word is little-endian in the page.
    assert_eq!(r.read(p, 64, 8), 4u64.to_le_bytes());
    let cas = |r: &mut Rig, expect: u64, new: u64| {
        let x = r.one(
            Opcode::CAS,
            p,
            BbRepr {
                operand0: expect,
                operand1: new,
                ..hdr(64, 8)
            },
            &[],
        );
        x.h.operand0
    };
    assert_eq!(
        cas(&mut r, 3, 100),
        4,
        "failed CAS returns the current value"
    );
    assert_eq!(
        cas(&mut r, 4, 100),
        4,
        "successful CAS returns the old value"
    );
    assert_eq!(r.read(p, 64, 8), 100u64.to_le_bytes());
    assert_eq!(
        r.status(Opcode::CAS, p, hdr(60, 8), &[]),
        Status::MISALIGNED
    );
    assert_eq!(
        r.status(Opcode::FETCH_ADD, p, hdr(64, 4), &[]),
        Status::MISALIGNED
    );
    assert_eq!(
        r.status(Opcode::FETCH_ADD, p, hdr(4096, 8), &[]),
        Status::OUT_OF_RANGE
    );
}

#[test]
fn retransmissions_execute_once() {
    let mut r = rig();
    let p = r.alloc();
    // FETCH_ADD sent three times with one request id adds once and answers the same each time.
    let f = r.frame(
        Opcode::FETCH_ADD,
        p,
        BbRepr {
            operand0: 10,
            request_id: 777,
            ..hdr(0, 8)
        },
        &[],
    );
    let first = r.raw(&f);
    let again = r.raw(&f);
    let third = r.raw(&f);
    assert_eq!(first[0].h, again[0].h);
    assert_eq!(first[0].h, third[0].h);
    assert_eq!(r.read(p, 0, 8), 10u64.to_le_bytes());
    assert_eq!(r.handler.stats().duplicates, 2);
    // ALLOC retransmitted: the same page, not a second one.
    let f = r.frame(
        Opcode::ALLOC,
        PageHandle::NONE,
        BbRepr {
            request_id: 778,
            ..hdr(0, 0)
        },
        &[],
    );
    let a = r.raw(&f);
    let b = r.raw(&f);
    assert_eq!(a[0].src, b[0].src);
    assert_eq!(r.handler.store().pages_used(), 2);
    // ALLOC_BULK retransmitted: the same handles (the payload is remembered too).
    let f = r.frame(
        Opcode::ALLOC_BULK,
        PageHandle::NONE,
        BbRepr {
            count: 4,
            request_id: 779,
            ..hdr(0, 0)
        },
        &[],
    );
    let a = r.raw(&f);
    let b = r.raw(&f);
    assert_eq!(a[0].payload, b[0].payload);
    assert_eq!(r.handler.store().pages_used(), 6);
    // FREE retransmitted: OK again, not STALE.
    let f = r.frame(
        Opcode::FREE,
        p,
        BbRepr {
            request_id: 780,
            ..hdr(0, 0)
        },
        &[],
    );
    assert_eq!(r.raw(&f)[0].h.status, Status::OK);
    assert_eq!(r.raw(&f)[0].h.status, Status::OK);
    // The same id from another port is another request.
    r.port += 1;
    let f = r.frame(
        Opcode::FREE,
        p,
        BbRepr {
            request_id: 780,
            ..hdr(0, 0)
        },
        &[],
    );
    assert_eq!(r.raw(&f)[0].h.status, Status::STALE_HANDLE);
}

#[test]
fn update_leases() {
    let mut r = rig();
    let p = r.alloc();
    r.one(Opcode::WRITE, p, hdr(0, 4), b"v1..");
    let acq = |r: &mut Rig, id: u64, ms: u64| {
        r.req(
            Opcode::UPDATE_ACQUIRE,
            p,
            BbRepr {
                request_id: id,
                operand0: ms,
                ..hdr(0, 4)
            },
            &[],
        )
    };
    let a = acq(&mut r, 50, 200);
    assert_eq!((a[0].h.status, a[0].h.operand0), (Status::OK, 200));
    assert_eq!(a[0].payload, b"v1..");
    let lease = a[0].h.lease;
    assert_ne!(lease, 0);
    // A retransmitted acquire gets the same lease.
    assert_eq!(acq(&mut r, 50, 200)[0].h.lease, lease);
    // Another client: refused to acquire or write; reading is fine.
    r.port += 1;
    assert_eq!(acq(&mut r, 51, 0)[0].h.status, Status::LEASE_HELD);
    assert_eq!(
        r.status(Opcode::WRITE, p, hdr(0, 4), b"xxxx"),
        Status::LEASE_HELD
    );
    assert_eq!(
        r.status(Opcode::FETCH_ADD, p, hdr(8, 8), &[]),
        Status::LEASE_HELD
    );
    assert_eq!(
        r.status(Opcode::FREE, p, hdr(0, 0), &[]),
        Status::LEASE_HELD
    );
    assert_eq!(r.read(p, 0, 4), b"v1..");
    r.port -= 1;
    // Commit with the wrong id; then a partial commit (MORE) keeps the lease, the final one
    // releases it.
    let commit = |r: &mut Rig, lease: u64, more: bool, o: u16, d: &[u8]| {
        let flags = if more {
            HeaderFlags::MORE
        } else {
            HeaderFlags::NONE
        };
        r.status(
            Opcode::UPDATE_COMMIT,
            p,
            BbRepr {
                lease,
                flags,
                ..hdr(o, d.len() as u16)
            },
            d,
        )
    };
    assert_eq!(
        commit(&mut r, lease + 1, false, 0, b"v2.."),
        Status::LEASE_INVALID
    );
    assert_eq!(commit(&mut r, lease, true, 0, b"v2"), Status::OK);
    assert_eq!(commit(&mut r, lease, false, 2, b"!!"), Status::OK);
    assert_eq!(r.read(p, 0, 4), b"v2!!");
    // After the final commit the id is no lease any more.
    assert_eq!(
        commit(&mut r, lease, false, 0, b"late"),
        Status::LEASE_INVALID
    );
    // A holder that disappears: its lease expires and its late write is rejected.
    let a = acq(&mut r, 60, 100);
    let lease = a[0].h.lease;
    r.now += 101 * MS;
    r.port += 1;
    let b = acq(&mut r, 61, 0);
    assert_eq!(
        b[0].h.status,
        Status::OK,
        "the page is usable again after expiry"
    );
    r.port -= 1;
    assert_eq!(
        commit(&mut r, lease, false, 0, b"late"),
        Status::LEASE_EXPIRED
    );
    assert_eq!(r.read(p, 0, 4), b"v2!!");
    // Release without writing.
    r.port += 1;
    let rel = r.status(
        Opcode::UPDATE_RELEASE,
        p,
        BbRepr {
            lease: b[0].h.lease,
            ..hdr(0, 0)
        },
        &[],
    );
    assert_eq!(rel, Status::OK);
    assert_eq!(r.status(Opcode::WRITE, p, hdr(0, 4), b"free"), Status::OK);
}

#[test]
fn a_late_duplicate_acquire_grants_no_second_lease() {
    // Found by the fault test: a duplicate ACQUIRE arriving after the commit re-acquired the
    // page for a lease nobody would commit, so the client's next ACQUIRE got LEASE_HELD.
    let mut r = rig();
    let p = r.alloc();
    let acquire = r.frame(
        Opcode::UPDATE_ACQUIRE,
        p,
        BbRepr {
            request_id: 900,
            ..hdr(0, 8)
        },
        &[],
    );
    let lease = r.raw(&acquire)[0].h.lease;
    // A retransmission while the lease lives: the same lease, the current bytes.
    let again = r.raw(&acquire);
    assert_eq!((again[0].h.status, again[0].h.lease), (Status::OK, lease));
    let commit = BbRepr { lease, ..hdr(0, 8) };
    assert_eq!(
        r.status(Opcode::UPDATE_COMMIT, p, commit, &[1; 8]),
        Status::OK
    );
    // The late duplicate: refused, and the page stays free.
    let late = r.raw(&acquire);
    assert_eq!(late[0].h.status, Status::LEASE_EXPIRED);
    assert_eq!(
        r.status(Opcode::UPDATE_ACQUIRE, p, hdr(0, 8), &[]),
        Status::OK
    );
    assert_eq!(r.handler.stats().duplicates, 2);
}

#[test]
fn lease_table_full_is_busy() {
    let mut r = rig_with(2 << 20, 4096, |c| c.lease_capacity = 1);
    let p = r.alloc();
    let q = r.alloc();
    assert_eq!(
        r.status(Opcode::UPDATE_ACQUIRE, p, hdr(0, 0), &[]),
        Status::OK
    );
    assert_eq!(
        r.status(Opcode::UPDATE_ACQUIRE, q, hdr(0, 0), &[]),
        Status::BUSY
    );
}

#[test]
fn out_of_memory() {
    let mut r = rig();
    let a = r.one(
        Opcode::ALLOC_BULK,
        PageHandle::NONE,
        BbRepr {
            count: 128,
            ..hdr(0, 0)
        },
        &[],
    );
    assert_eq!(a.h.status, Status::OK);
    for _ in 0..3 {
        r.one(
            Opcode::ALLOC_BULK,
            PageHandle::NONE,
            BbRepr {
                count: 128,
                ..hdr(0, 0)
            },
            &[],
        );
    }
    assert_eq!(r.handler.store().pages_used(), 512);
    assert_eq!(
        r.status(Opcode::ALLOC, PageHandle::NONE, hdr(0, 0), &[]),
        Status::OUT_OF_MEMORY
    );
    let b = r.one(
        Opcode::ALLOC_BULK,
        PageHandle::NONE,
        BbRepr {
            count: 2,
            ..hdr(0, 0)
        },
        &[],
    );
    assert_eq!((b.h.status, b.payload.len()), (Status::OUT_OF_MEMORY, 0));
    assert_eq!(
        r.status(Opcode::ALLOC_WRITE, PageHandle::NONE, hdr(0, 1), &[1]),
        Status::OUT_OF_MEMORY
    );
}

#[test]
fn request_errors_come_back_as_statuses() {
    let mut r = rig();
    let p = r.alloc();
    assert_eq!(
        r.status(Opcode(0xee), p, hdr(0, 0), &[]),
        Status::UNKNOWN_OPCODE
    );
    assert_eq!(
        r.status(Opcode::READ, p, hdr(4000, 97), &[]),
        Status::OUT_OF_RANGE
    );
    assert_eq!(
        r.status(Opcode::READ, p, hdr(0, 0), &[]),
        Status::OUT_OF_RANGE
    );
    assert_eq!(
        r.status(Opcode::WRITE, p, hdr(0, 8), &[0; 4]),
        Status::MALFORMED
    );
    assert_eq!(
        r.status(Opcode::READ, PageHandle::NONE, hdr(0, 1), &[]),
        Status::INVALID_HANDLE
    );
    let guessed = r.status(Opcode::READ, PageHandle::from_bits(42), hdr(0, 1), &[]);
    assert!(
        matches!(guessed, Status::INVALID_HANDLE | Status::STALE_HANDLE),
        "{guessed:?}"
    );
    let too_many = BbRepr {
        count: 129,
        ..hdr(0, 0)
    };
    assert_eq!(
        r.status(Opcode::ALLOC_BULK, PageHandle::NONE, too_many, &[]),
        Status::TOO_MANY
    );
    // The error reply comes from the address asked, echoing id and range.
    let e = r.one(
        Opcode::READ,
        p,
        BbRepr {
            request_id: 99,
            ..hdr(4000, 97)
        },
        &[],
    );
    assert_eq!((e.src.handle(), e.src.opcode()), (p, Opcode::READ));
    assert_eq!((e.h.request_id, e.h.offset, e.h.length), (99, 4000, 97));
    assert!(e.payload.is_empty());
}

#[test]
fn unsupported_version_is_answered_with_the_request_id() {
    let mut r = rig();
    let mut f = r.frame(
        Opcode::PING,
        PageHandle::NONE,
        BbRepr {
            request_id: 4242,
            ..hdr(0, 0)
        },
        &[],
    );
    f[62] = 2;
    // Fix the UDP checksum for the changed byte.
    let ep_src: Ipv6Addr = r.client;
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&f[38..54]).unwrap());
    let mut u = bluebridge_proto::wire::udp::UdpPacket::new_unchecked(&mut f[54..]);
    u.fill_checksum(ep_src, dst);
    let rep = r.raw(&f);
    assert_eq!(rep.len(), 1);
    assert_eq!(
        (rep[0].h.status, rep[0].h.request_id),
        (Status::UNSUPPORTED_VERSION, 4242)
    );
}

#[test]
fn malformed_frames_are_counted_and_dropped() {
    let mut r = rig();
    let p = r.alloc();
    let good = r.frame(Opcode::READ, p, hdr(0, 4096), &[]);
    let mut bad_sum = good.clone();
    bad_sum[100] ^= 1;
    assert!(r.raw(&bad_sum).is_empty());
    for len in 0..good.len() {
        assert!(r.raw(&good[..len]).is_empty(), "truncated at {len}");
    }
    assert!(r.raw(&[0xff; 200]).is_empty());
    let s = r.handler.stats();
    assert_eq!(s.malformed[6], 1, "bad checksum");
    assert!(s.malformed_total() >= good.len() as u64 + 2);
    // Replies and other hosts' requests are dropped without an answer.
    let reply = r.frame(
        Opcode::READ,
        p,
        BbRepr {
            flags: HeaderFlags::REPLY,
            ..hdr(0, 1)
        },
        &[],
    );
    assert!(r.raw(&reply).is_empty());
    let before = r.handler.stats().dropped_not_for_us;
    let other = RemoteAddr::new(
        NetPrefix::DEFAULT,
        HostId(9),
        p,
        Opcode::READ,
        OpFlags::NONE,
    );
    let f = r.frame_to(other, hdr(0, 1), &[]);
    assert!(r.raw(&f).is_empty());
    assert_eq!(r.handler.stats().dropped_not_for_us, before + 1);
    // And the good request still works.
    assert_eq!(r.raw(&good).len(), 1);
}

#[test]
fn pages_belong_to_their_allocating_client() {
    let mut r = rig();
    let mine = r.alloc();
    r.one(Opcode::WRITE, mine, hdr(0, 4), b"mine");
    let shared = r.alloc_shared();
    // Another client (address) is refused every page operation on a page it does not own...
    let owner = r.client;
    r.client = "fd00:bb:1::99".parse().unwrap();
    for (op, h, payload) in [
        (Opcode::READ, hdr(0, 4), &[][..]),
        (Opcode::WRITE, hdr(0, 4), &b"evil"[..]),
        (Opcode::UPDATE_ACQUIRE, hdr(0, 4), &[][..]),
        (Opcode::CAS, hdr(8, 8), &[][..]),
        (Opcode::FETCH_ADD, hdr(8, 8), &[][..]),
        (Opcode::SHARE, hdr(0, 0), &[][..]),
        (Opcode::FREE, hdr(0, 0), &[][..]),
    ] {
        assert_eq!(r.status(op, mine, h, payload), Status::FORBIDDEN, "{op:?}");
    }
    let mut list = [0u8; 16];
    put_handles(&mut list, [mine, shared]);
    let items = r.req(
        Opcode::READ_BULK,
        mine,
        BbRepr {
            count: 2,
            ..hdr(0, 4)
        },
        &list,
    );
    assert_eq!(
        items.iter().find(|f| f.h.item == 0).unwrap().h.status,
        Status::FORBIDDEN
    );
    assert_eq!(
        items.iter().find(|f| f.h.item == 1).unwrap().h.status,
        Status::OK
    );
    assert!(
        r.req(Opcode::WRITE_BLIND, mine, hdr(0, 4), b"evil")
            .is_empty()
    );
    // ...but may use shared pages fully.
    assert_eq!(
        r.status(Opcode::WRITE, shared, hdr(0, 5), b"ours!"),
        Status::OK
    );
    // The owner shares its page; from then on anyone may use it.
    r.client = owner;
    assert_eq!(
        &r.read(mine, 0, 4),
        b"mine",
        "the blind write was refused too"
    );
    assert_eq!(r.status(Opcode::SHARE, mine, hdr(0, 0), &[]), Status::OK);
    r.client = "fd00:bb:1::99".parse().unwrap();
    assert_eq!(&r.read(mine, 0, 4), b"mine");
    assert_eq!(r.status(Opcode::FREE, mine, hdr(0, 0), &[]), Status::OK);
    // Ownership goes by address: the same address from another port is the same owner.
    r.client = owner;
    let p = r.alloc();
    r.port += 7;
    assert_eq!(r.status(Opcode::READ, p, hdr(0, 8), &[]), Status::OK);
}

#[test]
fn servers_may_be_restricted_to_client_prefixes() {
    let mut r = rig_with(2 << 20, 4096, |c| {
        c.allowed_clients = vec!["fd00:bb:1::/48".parse().unwrap()]
    });
    let p = r.alloc();
    r.client = "fd00:bb:7::1".parse().unwrap();
    assert_eq!(
        r.status(Opcode::PING, PageHandle::NONE, hdr(0, 0), &[]),
        Status::FORBIDDEN
    );
    assert_eq!(
        r.status(Opcode::ALLOC, PageHandle::NONE, hdr(0, 0), &[]),
        Status::FORBIDDEN
    );
    assert_eq!(r.status(Opcode::READ, p, hdr(0, 8), &[]), Status::FORBIDDEN);
    assert_eq!(r.handler.store().pages_used(), 1);
}

#[test]
fn owner_table_full_is_busy() {
    let mut r = rig_with(2 << 20, 4096, |c| c.max_owners = 1);
    r.alloc();
    r.client = "fd00:bb:1::2".parse().unwrap();
    assert_eq!(
        r.status(Opcode::ALLOC, PageHandle::NONE, hdr(0, 0), &[]),
        Status::BUSY
    );
    let b = r.one(
        Opcode::ALLOC_BULK,
        PageHandle::NONE,
        BbRepr {
            count: 3,
            ..hdr(0, 0)
        },
        &[],
    );
    assert_eq!((b.h.status, b.payload.len()), (Status::BUSY, 0));
}

#[test]
fn nothing_is_answered_for_another_host() {
    // Found by the handler fuzzer: a malformed request to another host's address got an error
    // reply claiming to come from that host.
    let mut r = rig();
    let other = RemoteAddr::new(
        NetPrefix::DEFAULT,
        HostId(0),
        PageHandle::from_bits(5),
        Opcode(0xee),
        OpFlags::NONE,
    );
    let f = r.frame_to(other, hdr(4000, 200), &[1, 2, 3]);
    assert!(r.raw(&f).is_empty());
    let mut v2 = r.frame_to(other.with_op(Opcode::PING, OpFlags::NONE), hdr(0, 0), &[]);
    v2[62] = 2;
    let (src, dst) = (r.client, other.to_ipv6());
    bluebridge_proto::wire::udp::UdpPacket::new_unchecked(&mut v2[54..]).fill_checksum(src, dst);
    assert!(r.raw(&v2).is_empty());
    assert_eq!(r.handler.stats().requests, 0);
    // An anycast request's error comes from this host's own address.
    let any = RemoteAddr::host_op(NetPrefix::DEFAULT, HostId::ANY, Opcode::ALLOC);
    let f = r.frame_to(
        any,
        BbRepr {
            count: 2,
            ..hdr(0, 0)
        },
        &[],
    );
    let rep = r.raw(&f);
    assert_eq!(rep[0].h.status, Status::MALFORMED);
    assert_eq!(rep[0].src.host_id(), HOST);
}

#[test]
fn anycast_alloc_is_served() {
    let mut r = rig();
    let dst = RemoteAddr::host_op(NetPrefix::DEFAULT, HostId::ANY, Opcode::ALLOC);
    let f = r.frame_to(dst, hdr(0, 0), &[]);
    let rep = r.raw(&f);
    assert_eq!(rep[0].h.status, Status::OK);
    assert_eq!(
        rep[0].src.host_id(),
        HOST,
        "the reply comes from the real host"
    );
}

#[test]
fn full_tx_drops_and_counts() {
    let mut r = rig();
    let p = r.alloc();
    r.room = 1;
    let frames = r.req(
        Opcode::READ,
        p,
        BbRepr {
            seg_max: 1184,
            ..hdr(0, 4096)
        },
        &[],
    );
    assert_eq!(frames.len(), 1);
    assert_eq!(r.handler.stats().tx_dropped, 1);
}

#[test]
fn memory_overhead_fits_the_budget() {
    // Metadata is 16 bytes a page: a 4 GiB arena's 1 Mi pages take 16 MiB; the tables are
    // sized at start-up. Measured on a small arena and scaled.
    let r = rig_with(2 << 20, 4096, |c| {
        *c = HandlerConfig::new(NetPrefix::DEFAULT, HOST, 4096)
    });
    let fixed = r.handler.overhead_bytes() - 512 * 16;
    let at_4g = fixed + (4 << 30) / PAGE_SIZE * 16;
    assert!(at_4g < 64 << 20, "{at_4g} bytes");
}

#[test]
fn pages_migrate_out_and_in_only_for_the_controller() {
    let controller: Ipv6Addr = "fd00:bb:7fff::1".parse().unwrap();
    let user: Ipv6Addr = "fd00:bb:1::1".parse().unwrap();
    // Host 2 holds a page written by the user.
    let mut a = rig();
    let p = a.alloc();
    let data = pattern(9);
    assert_eq!(a.status(Opcode::WRITE, p, hdr(0, 4096), &data), Status::OK);
    // Nobody but the controller may move it.
    assert_eq!(
        a.status(Opcode::MIGRATE_OUT, p, hdr(0, 4096), &[]),
        Status::FORBIDDEN
    );
    a.client = controller;
    let out = a.one(Opcode::MIGRATE_OUT, p, hdr(0, 4096), &[]);
    assert_eq!(out.h.status, Status::OK);
    assert_eq!(out.payload, data, "the page, in one frame");
    let mut owner = [0u8; 16];
    owner[..8].copy_from_slice(&out.h.operand0.to_be_bytes());
    owner[8..].copy_from_slice(&out.h.operand1.to_be_bytes());
    assert_eq!(Ipv6Addr::from(owner), user);
    // Frozen: its owner now gets MOVED (and retries elsewhere), nothing is written here.
    a.client = user;
    assert_eq!(
        a.status(Opcode::WRITE, p, hdr(0, 8), &[1; 8]),
        Status::MOVED
    );
    assert_eq!(a.status(Opcode::READ, p, hdr(0, 8), &[]), Status::MOVED);

    // Host 3 adopts it and answers for host 2's address.
    let mut b = rig_with(2 << 20, 4096, |c| c.host = HostId(3));
    let page_addr = RemoteAddr::new(NetPrefix::DEFAULT, HOST, p, Opcode::READ, OpFlags::NONE);
    let adopt = |b: &mut Rig| {
        let h = BbRepr {
            count: HOST.0,
            lease: p.to_bits(),
            operand0: out.h.operand0,
            operand1: out.h.operand1,
            offset: 0,
            length: 4096,
            ..BbRepr::default()
        };
        let f = b.frame_to(
            RemoteAddr::host_op(NetPrefix::DEFAULT, HostId(3), Opcode::MIGRATE_IN),
            h,
            &out.payload,
        );
        b.raw(&f).pop().unwrap().h.status
    };
    b.client = user;
    assert_eq!(adopt(&mut b), Status::FORBIDDEN);
    // Not adopted: host 2's address is not ours, nothing is answered.
    let f = b.frame_to(page_addr, hdr(0, 8), &[]);
    assert!(b.raw(&f).is_empty());
    b.client = controller;
    assert_eq!(adopt(&mut b), Status::OK);
    b.client = user;
    let f = b.frame_to(page_addr, hdr(0, 4096), &[]);
    let r = b.raw(&f);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].h.status, Status::OK);
    assert_eq!(r[0].src, page_addr, "answered from the page's own address");
    assert_eq!(r[0].payload, data);
    // Its owner kept: another client is refused.
    b.client = "fd00:bb:9::9".parse().unwrap();
    let f = b.frame_to(page_addr, hdr(0, 8), &[]);
    assert_eq!(b.raw(&f)[0].h.status, Status::FORBIDDEN);

    // The holder form: MIGRATE_OUT to host 3's own address names the page by its original
    // host and handle, so it reaches host 3 however the page's address is routed meanwhile.
    let mut newest = data.clone();
    newest[..4].copy_from_slice(b"host");
    b.client = user;
    let write = page_addr.with_op(Opcode::WRITE, OpFlags::NONE);
    let f = b.frame_to(write, hdr(0, 4), &newest[..4]);
    assert_eq!(b.raw(&f)[0].h.status, Status::OK);
    let holder = RemoteAddr::host_op(NetPrefix::DEFAULT, HostId(3), Opcode::MIGRATE_OUT);
    let named = |count: u16, lease: u64| BbRepr {
        count,
        lease,
        ..hdr(0, 4096)
    };
    let f = b.frame_to(holder, named(HOST.0, p.to_bits()), &[]);
    assert_eq!(
        b.raw(&f)[0].h.status,
        Status::FORBIDDEN,
        "not the controller"
    );
    b.client = controller;
    for (count, lease) in [(HOST.0, p.to_bits() ^ 1), (7, p.to_bits())] {
        let f = b.frame_to(holder, named(count, lease), &[]);
        assert_eq!(b.raw(&f)[0].h.status, Status::INVALID_HANDLE, "not here");
    }
    let f = b.frame_to(holder, named(HOST.0, p.to_bits()), &[]);
    let r = b.raw(&f);
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].h.status, r[0].src), (Status::OK, holder));
    assert_eq!(
        r[0].payload, newest,
        "the holder's copy, with the last write"
    );
    assert_eq!(
        (r[0].h.operand0, r[0].h.operand1),
        (out.h.operand0, out.h.operand1)
    );
    b.client = user;
    let f = b.frame_to(write, hdr(0, 4), b"late");
    assert_eq!(b.raw(&f)[0].h.status, Status::MOVED, "frozen at host 3 too");
    // Coming home: host 2 takes it back and answers again.
    a.client = controller;
    let h = BbRepr {
        count: HOST.0,
        lease: p.to_bits(),
        offset: 0,
        length: 4096,
        ..BbRepr::default()
    };
    let mut newer = data.clone();
    newer[0] = 0xee;
    let f = a.frame_to(
        RemoteAddr::host_op(NetPrefix::DEFAULT, HOST, Opcode::MIGRATE_IN),
        h,
        &newer,
    );
    assert_eq!(a.raw(&f).pop().unwrap().h.status, Status::OK);
    a.client = user;
    assert_eq!(a.read(p, 0, 4096), newer);
}

/// A request id in session slot `slot`, sequence `seq` (docs/protocol.md §8).

#[test]
fn at_most_once_holds_against_a_flood_of_other_clients() {
    // One client's FETCH_ADDs lose their replies and are retransmitted only after a flood of
    // requests from more distinct clients than the old global table (131,072 entries) held.
    let mut r = rig();
    let p = r.alloc();
    let victim = (r.client, r.port);
    let add = |r: &mut Rig, id: u64| {
        let h = BbRepr {
            request_id: id,
            operand0: 1,
            ..hdr(0, 8)
        };
        let reply = r.one(Opcode::FETCH_ADD, p, h, &[]);
        assert_eq!(reply.h.status, Status::OK);
        reply.h.operand0
    };
    const ROUNDS: u64 = 20;
    const FLOOD: u64 = 7_500;
    let mut flooders = 0u64;
    for round in 0..ROUNDS {
        let id = slot_id(round % 4, 1 + round / 4);
        (r.client, r.port) = victim;
        let first = add(&mut r, id); // its reply is "lost"
        assert_eq!(first, round, "executed once per round");
        for _ in 0..FLOOD {
            flooders += 1;
            let mut a = [0xfd, 0, 0, 0xbb, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            a[8..].copy_from_slice(&flooders.to_be_bytes());
            r.client = Ipv6Addr::from(a);
            let st = r.status(Opcode::FREE, p, hdr(0, 0), &[]);
            // Refused: not theirs, or no session left for them; never run on the victim's.
            assert!(matches!(st, Status::FORBIDDEN | Status::BUSY), "{st:?}");
        }
        (r.client, r.port) = victim;
        assert_eq!(
            add(&mut r, id),
            first,
            "the retransmission gets the stored reply"
        );
    }
    assert!(flooders > 131_072);
    assert_eq!(
        u64::from_le_bytes(r.read(p, 0, 8).try_into().unwrap()),
        ROUNDS,
        "no FETCH_ADD ran twice"
    );
    let s = r.handler.stats();
    assert_eq!(s.duplicates, ROUNDS);
    assert!(
        s.replies(Status::BUSY) > 0,
        "the flood was refused, not remembered"
    );
    // An old retransmission, after its slot moved on, is dropped unexecuted.
    let h = BbRepr {
        request_id: slot_id(0, 1),
        operand0: 1,
        ..hdr(0, 8)
    };
    assert!(r.req(Opcode::FETCH_ADD, p, h, &[]).is_empty());
    assert_eq!(r.handler.stats().stale, 1);
    assert_eq!(r.handler.stat_record(r.now).stale, 1, "and STAT says so");
    assert_eq!(
        u64::from_le_bytes(r.read(p, 0, 8).try_into().unwrap()),
        ROUNDS
    );
}

#[test]
fn a_migrated_page_lands_on_the_shard_its_address_names() {
    use bluebridge_proto::frame::request_shard;
    use bluebridge_server::stats::HostCounters;
    use std::sync::Arc;
    // A server of two shards (what the runtime builds): each handler owns one store.
    let counters = Arc::new(HostCounters::new(2));
    let mut shards: Vec<Rig> = (0..2)
        .map(|i| {
            let mut cfg = HandlerConfig::new(NetPrefix::DEFAULT, HostId(3), 4096);
            cfg.shards = 2;
            let store = Store::for_shard(i, 2 << 20, false).unwrap();
            Rig {
                handler: Handler::with_counters(cfg, store, counters.clone()),
                ..rig()
            }
        })
        .collect();
    // A page of host 2 whose handle names shard 1 (shard field 2) migrates to host 3.
    let original = PageHandle::from_bits(0x0200_1234_5678_9abc);
    assert_eq!(original.shard(2), Some(1));
    let data = pattern(4);
    let user = shards[1].client.octets();
    let h = BbRepr {
        count: HOST.0,
        lease: original.to_bits(),
        operand0: u64::from_be_bytes(user[..8].try_into().unwrap()),
        operand1: u64::from_be_bytes(user[8..].try_into().unwrap()),
        offset: 0,
        length: 4096,
        ..BbRepr::default()
    };
    let controller: Ipv6Addr = "fd00:bb:7fff::1".parse().unwrap();
    shards[0].client = controller;
    let f = shards[0].frame_to(
        RemoteAddr::host_op(NetPrefix::DEFAULT, HostId(3), Opcode::MIGRATE_IN),
        h,
        &data,
    );
    // The runtime reads the original handle out of the frame and hands it to shard 1.
    let owner = request_shard(&f, 2).expect("MIGRATE_IN names its page's shard");
    assert_eq!(owner, 1);
    assert_eq!(shards[owner].raw(&f).pop().unwrap().h.status, Status::OK);
    // Requests to the page's original address are steered to shard 1, which answers them.
    let addr = RemoteAddr::new(
        NetPrefix::DEFAULT,
        HOST,
        original,
        Opcode::READ,
        OpFlags::NONE,
    );
    let f = shards[1].frame_to(addr, hdr(0, 4096), &[]);
    assert_eq!(request_shard(&f, 2), Some(1));
    let r = shards[1].raw(&f);
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].h.status, r[0].src), (Status::OK, addr));
    assert_eq!(r[0].payload, data);
    // So is a MIGRATE_OUT sent to host 3's own address naming the page.
    shards[1].client = controller;
    let out = BbRepr {
        count: HOST.0,
        lease: original.to_bits(),
        ..hdr(0, 4096)
    };
    let holder = RemoteAddr::host_op(NetPrefix::DEFAULT, HostId(3), Opcode::MIGRATE_OUT);
    let f = shards[1].frame_to(holder, out, &[]);
    assert_eq!(request_shard(&f, 2), Some(1));
    let r = shards[1].raw(&f);
    assert_eq!((r[0].h.status, &r[0].payload), (Status::OK, &data));
    // The STAT of either shard sums both.
    assert_eq!(shards[0].handler.stat_record(0).pages_used, 1);
    assert_eq!(shards[0].handler.stat_record(0).shards, 2);
}

#[test]
fn a_write_in_two_pieces_goes_straight_into_the_page() {
    use bluebridge_proto::checksum::Checksum;
    let sum = |a: &[u8], b: &[u8]| {
        let mut c = Checksum::new();
        c.add_bytes(&a[bluebridge_proto::frame::UDP_START..])
            .add_bytes(b);
        c
    };
    let mut r = rig();
    let p = r.alloc();
    let data = pattern(5);
    let f = r.frame(Opcode::WRITE, p, hdr(0, 4096), &data);
    let (a, b) = f.split_at(3840);
    let mut sink = VecSink(Vec::new(), usize::MAX);
    r.handler.handle_parts(a, b, &sum(a, b), r.now, &mut sink);
    assert_eq!(sink.0.len(), 1);
    assert_eq!(Frame::parse(&sink.0[0]).unwrap().header.status, Status::OK);
    assert_eq!(r.read(p, 0, 4096), data);
    // Split inside its headers (no NIC does that, but nothing may go wrong if one did): copied
    // together, checked whole, written.
    let other = pattern(8);
    let f = r.frame(Opcode::WRITE, p, hdr(0, 4096), &other);
    let (a, b) = f.split_at(40);
    let mut wrong = Checksum::new();
    wrong.add_bytes(b);
    let mut sink = VecSink(Vec::new(), usize::MAX);
    r.handler.handle_parts(a, b, &wrong, r.now, &mut sink);
    assert_eq!(Frame::parse(&sink.0[0]).unwrap().header.status, Status::OK);
    assert_eq!(r.read(p, 0, 4096), other);
    let f = r.frame(Opcode::WRITE, p, hdr(0, 4096), &data);
    let (a, b) = f.split_at(3840);
    let mut sink = VecSink(Vec::new(), usize::MAX);
    r.handler.handle_parts(a, b, &sum(a, b), r.now, &mut sink);
    assert_eq!(r.read(p, 0, 4096), data);
    // Corrupted in its second piece: dropped as malformed, the page untouched.
    let before = r.handler.stats().malformed_total();
    let mut bad = r.frame(Opcode::WRITE, p, hdr(0, 4096), &pattern(6));
    bad[4000] ^= 1;
    let (a, b) = bad.split_at(3840);
    let mut sink = VecSink(Vec::new(), usize::MAX);
    r.handler.handle_parts(a, b, &sum(a, b), r.now, &mut sink);
    assert!(sink.0.is_empty());
    assert_eq!(r.handler.stats().malformed_total(), before + 1);
    assert_eq!(r.read(p, 0, 4096), data);
    // Anything else in pieces (a handle list) is copied together and served as usual.
    let q = r.alloc();
    let mut list = [0u8; 16];
    put_handles(&mut list, [p, q]);
    let h = BbRepr {
        count: 2,
        ..hdr(0, 0)
    };
    let f = r.frame(Opcode::FREE_BULK, p, h, &list);
    let (a, b) = f.split_at(f.len() - 5);
    let mut sink = VecSink(Vec::new(), usize::MAX);
    r.handler.handle_parts(a, b, &sum(a, b), r.now, &mut sink);
    let reply = Frame::parse(&sink.0[0]).unwrap();
    assert_eq!(reply.header.status, Status::OK);
    assert_eq!(bulk_status(reply.payload, 0), Some(Status::OK));
    assert_eq!(bulk_status(reply.payload, 1), Some(Status::OK));
    assert_eq!(
        r.status(Opcode::READ, p, hdr(0, 8), &[]),
        Status::STALE_HANDLE
    );
}
