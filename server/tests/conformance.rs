//! Conformance of the request handler to docs/protocol.md, one test per rule, named by the
//! section it checks (`s5_7_...` is §5.7). The handler is the code both transports run (AF_XDP
//! and kernel UDP); tests/tests/conformance.rs sends the same requests over real sockets.

mod common;

use bluebridge_proto::message::OwnerEntry;
use common::*;

fn stat(r: &mut Rig) -> StatRecord {
    let s = r.one(Opcode::STAT, PageHandle::NONE, hdr(0, 0), &[]);
    assert_eq!(s.h.status, Status::OK);
    StatRecord::parse(&s.payload).expect("a STAT record")
}

fn acquire(r: &mut Rig, p: PageHandle, ms: u64) -> Reply {
    r.one(
        Opcode::UPDATE_ACQUIRE,
        p,
        BbRepr {
            operand0: ms,
            ..hdr(0, 0)
        },
        &[],
    )
}

fn commit(r: &mut Rig, p: PageHandle, lease: u64, data: &[u8]) -> Status {
    r.status(
        Opcode::UPDATE_COMMIT,
        p,
        BbRepr {
            lease,
            ..hdr(0, data.len() as u16)
        },
        data,
    )
}

#[test]
fn s2_4_count_is_1_in_every_request_but_the_bulk_ones() {
    let mut r = rig();
    let p = r.alloc();
    let cases: [(Opcode, PageHandle, BbRepr, &[u8]); 11] = [
        (Opcode::PING, PageHandle::NONE, hdr(0, 0), &[]),
        (Opcode::STAT, PageHandle::NONE, hdr(0, 0), &[]),
        (Opcode::READ, p, hdr(0, 8), &[]),
        (Opcode::WRITE, p, hdr(0, 4), b"abcd"),
        (Opcode::CAS, p, hdr(8, 8), &[]),
        (Opcode::FETCH_ADD, p, hdr(8, 8), &[]),
        (Opcode::SHARE, p, hdr(0, 0), &[]),
        (Opcode::UPDATE_ACQUIRE, p, hdr(0, 8), &[]),
        (
            Opcode::UPDATE_RELEASE,
            p,
            BbRepr {
                lease: 1,
                ..hdr(0, 0)
            },
            &[],
        ),
        (Opcode::FREE, p, hdr(0, 0), &[]),
        (Opcode::ALLOC_WRITE, PageHandle::NONE, hdr(0, 1), b"x"),
    ];
    for (op, handle, h, payload) in cases {
        for count in [0, 2] {
            assert_eq!(
                r.status(op, handle, BbRepr { count, ..h }, payload),
                Status::MALFORMED,
                "{op:?} count {count}"
            );
        }
    }
    // Nothing ran: the page is live and unchanged, nothing else was allocated.
    assert_eq!(r.read(p, 0, 8), [0; 8]);
    assert_eq!(r.handler.store().pages_used(), 1);
}

#[test]
fn s5_11_atomics_inside_the_page_are_misaligned_unless_one_aligned_word() {
    let mut r = rig();
    let p = r.alloc();
    for op in [Opcode::CAS, Opcode::FETCH_ADD] {
        for (o, l) in [(4092, 8), (0, 0), (4088, 4), (4095, 1), (4, 8)] {
            assert_eq!(
                r.status(op, p, hdr(o, l), &[]),
                Status::MISALIGNED,
                "{op:?} {o}+{l}"
            );
        }
        for (o, l) in [(4096, 8), (u16::MAX, 8), (4096, 0)] {
            assert_eq!(
                r.status(op, p, hdr(o, l), &[]),
                Status::OUT_OF_RANGE,
                "{op:?} {o}+{l}"
            );
        }
        assert_eq!(r.status(op, p, hdr(4088, 8), &[]), Status::OK);
    }
}

#[test]
fn s4_invalidate_sent_as_a_request_is_an_unknown_opcode() {
    let mut r = rig();
    let p = r.alloc();
    for handle in [PageHandle::NONE, p, PageHandle::from_bits(42)] {
        assert_eq!(
            r.status(Opcode::INVALIDATE, handle, hdr(0, 0), &[]),
            Status::UNKNOWN_OPCODE
        );
    }
}

#[test]
fn s5_5_read_bulk_a_bad_item_fails_only_itself() {
    let mut r = rig();
    let p = r.alloc();
    let q = r.alloc();
    r.one(Opcode::WRITE, p, hdr(0, 4), b"pppp");
    r.one(Opcode::WRITE, q, hdr(0, 4), b"qqqq");
    let mut list = [0u8; 32];
    put_handles(
        &mut list,
        [p, PageHandle::NONE, q, PageHandle::from_bits(42)],
    );
    let replies = r.req(
        Opcode::READ_BULK,
        p,
        BbRepr {
            count: 4,
            ..hdr(0, 4)
        },
        &list,
    );
    let mut got: Vec<(u16, Status, Vec<u8>)> = replies
        .iter()
        .map(|x| (x.h.item, x.h.status, x.payload.clone()))
        .collect();
    got.sort_by_key(|g| g.0);
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(got[0], (0, Status::OK, b"pppp".to_vec()));
    assert_eq!(got[1], (1, Status::INVALID_HANDLE, vec![]));
    assert_eq!(got[2], (2, Status::OK, b"qqqq".to_vec()));
    assert!(
        matches!(got[3].1, Status::INVALID_HANDLE | Status::STALE_HANDLE),
        "{got:?}"
    );
}

#[test]
fn s5_9_free_bulk_a_bad_item_fails_only_itself() {
    let mut r = rig();
    let p = r.alloc();
    let q = r.alloc();
    let mut list = [0u8; 24];
    put_handles(&mut list, [p, PageHandle::NONE, q]);
    let rep = r.one(
        Opcode::FREE_BULK,
        p,
        BbRepr {
            count: 3,
            ..hdr(0, 0)
        },
        &list,
    );
    assert_eq!((rep.h.status, rep.h.count), (Status::OK, 3));
    let st: Vec<_> = (0..3)
        .map(|i| bulk_status(&rep.payload, i).unwrap())
        .collect();
    assert_eq!(st, [Status::OK, Status::INVALID_HANDLE, Status::OK]);
    assert_eq!(r.handler.store().pages_used(), 0);
}

#[test]
fn s5_7_write_bulk_a_failed_entry_does_not_stop_the_others() {
    let mut r = rig();
    let p = r.alloc();
    let q = r.alloc();
    let entries = [
        WriteEntry {
            handle: p,
            offset: 0,
            data: b"first",
        },
        WriteEntry {
            handle: p,
            offset: 4090,
            data: &[9; 10],
        },
        WriteEntry {
            handle: q,
            offset: 100,
            data: &[],
        },
        WriteEntry {
            handle: PageHandle::NONE,
            offset: 0,
            data: b"nobody",
        },
        WriteEntry {
            handle: q,
            offset: 8,
            data: b"last",
        },
    ];
    let mut buf = vec![0u8; 512];
    let mut end = 0;
    for e in &entries {
        end = put_write_entry(&mut buf, end, e).unwrap();
    }
    let rep = r.one(
        Opcode::WRITE_BULK,
        p,
        BbRepr {
            count: 5,
            ..hdr(0, 0)
        },
        &buf[..end],
    );
    assert_eq!((rep.h.status, rep.h.count), (Status::OK, 5));
    let st: Vec<_> = (0..5)
        .map(|i| bulk_status(&rep.payload, i).unwrap())
        .collect();
    assert_eq!(
        st,
        [
            Status::OK,
            Status::OUT_OF_RANGE,
            Status::OUT_OF_RANGE,
            Status::INVALID_HANDLE,
            Status::OK
        ]
    );
    assert_eq!(r.read(p, 0, 5), b"first");
    assert_eq!(r.read(p, 4086, 10), [0; 10]);
    assert_eq!(r.read(q, 8, 4), b"last");
}

#[test]
fn s5_5_bulk_requests_go_to_their_first_items_page() {
    let mut r = rig();
    let p = r.alloc();
    let q = r.alloc();
    let mut list = [0u8; 16];
    put_handles(&mut list, [p, q]);
    for op in [Opcode::READ_BULK, Opcode::FREE_BULK] {
        let h = BbRepr {
            count: 2,
            ..if op == Opcode::READ_BULK {
                hdr(0, 8)
            } else {
                hdr(0, 0)
            }
        };
        assert_eq!(r.status(op, q, h, &list), Status::MALFORMED, "{op:?}");
    }
    assert_eq!(r.handler.store().pages_used(), 2);
}

#[test]
fn s5_9_operations_without_a_range_refuse_one() {
    let mut r = rig();
    let p = r.alloc();
    for op in [
        Opcode::FREE,
        Opcode::SHARE,
        Opcode::UPDATE_RELEASE,
        Opcode::PING,
    ] {
        let handle = if op == Opcode::PING {
            PageHandle::NONE
        } else {
            p
        };
        let h = BbRepr {
            lease: 1,
            ..hdr(0, 8)
        };
        assert_eq!(r.status(op, handle, h, &[]), Status::MALFORMED, "{op:?}");
    }
    assert_eq!(r.handler.store().pages_used(), 1, "FREE with a range ran");
}

#[test]
fn s5_8_lease_0_and_made_up_ids_are_lease_invalid() {
    let mut r = rig();
    let p = r.alloc();
    r.one(Opcode::WRITE, p, hdr(0, 4), b"keep");
    for lease in [0, 1, 0x0000_0400_0000_0001, u64::MAX] {
        assert_eq!(
            commit(&mut r, p, lease, b"evil"),
            Status::LEASE_INVALID,
            "{lease:#x}"
        );
        let rel = BbRepr { lease, ..hdr(0, 0) };
        assert_eq!(
            r.status(Opcode::UPDATE_RELEASE, p, rel, &[]),
            Status::LEASE_INVALID
        );
    }
    assert_eq!(r.read(p, 0, 4), b"keep");
}

/// The hijack found from outside: on a shared page, another client committed with a guessed
/// lease id after 1-4 guesses. Ids are now keyed and bound to the holder's address and port.
#[test]
fn s5_8_only_the_holder_commits_with_its_lease() {
    let mut r = rig();
    let p = r.alloc_shared();
    r.one(Opcode::WRITE, p, hdr(0, 4), b"orig");
    let a = acquire(&mut r, p, 5_000);
    assert_eq!(a.h.status, Status::OK);
    let lease = a.h.lease;
    // The attacker knows the id exactly (seen on the wire), or guesses around it.
    let holder = (r.client, r.port);
    r.client = "fd00:bb:1::66".parse().unwrap();
    let guesses = [lease]
        .into_iter()
        .chain((1..=64).flat_map(|d| [lease.wrapping_add(d), lease.wrapping_sub(d)]))
        .chain((0..64).map(|b| lease ^ 1 << b));
    for g in guesses {
        assert_eq!(
            commit(&mut r, p, g, b"evil"),
            Status::LEASE_INVALID,
            "{g:#x}"
        );
    }
    // Same address, other port: another client too.
    r.client = holder.0;
    r.port = holder.1 + 1;
    assert_eq!(commit(&mut r, p, lease, b"evil"), Status::LEASE_INVALID);
    // After it ran out, the attacker still learns nothing (no LEASE_EXPIRED).
    r.now += 6_000 * MS;
    assert_eq!(commit(&mut r, p, lease, b"evil"), Status::LEASE_INVALID);
    r.port = holder.1;
    assert_eq!(commit(&mut r, p, lease, b"late"), Status::LEASE_EXPIRED);
    assert_eq!(r.read(p, 0, 4), b"orig");
    let b = acquire(&mut r, p, 0);
    assert_eq!(commit(&mut r, p, b.h.lease, b"mine"), Status::OK);
    assert_eq!(r.read(p, 0, 4), b"mine");
}

/// Found from outside: with `--max-leases 64`, 64 one-second leases nobody committed made every
/// later acquire BUSY for good while STAT said 0 held.
#[test]
fn s5_8_leases_that_run_out_free_their_slots() {
    let mut r = rig_with(2 << 20, 4096, |c| c.lease_capacity = 64);
    let pages: Vec<_> = (0..65).map(|_| r.alloc_shared()).collect();
    for &p in &pages[..64] {
        assert_eq!(acquire(&mut r, p, 1_000).h.status, Status::OK);
    }
    assert_eq!(acquire(&mut r, pages[64], 1_000).h.status, Status::BUSY);
    assert_eq!(stat(&mut r).leases_held, 64);
    r.now += 1_001 * MS;
    assert_eq!(stat(&mut r).leases_held, 0);
    for &p in &pages[1..] {
        assert_eq!(acquire(&mut r, p, 1_000).h.status, Status::OK);
    }
    assert_eq!(stat(&mut r).leases_held, 64);
}

/// Found from outside: 65,536 spoofed allocations on a full arena locked every new client out
/// for good. An owner is now an address with pages: a failed ALLOC registers nobody, and an
/// owner whose pages are all freed is forgotten.
#[test]
fn s5_13_the_owner_table_holds_only_addresses_with_pages() {
    let mut r = rig_with(2 << 20, 4096, |c| c.max_owners = 4);
    let client = |i: u16| -> Ipv6Addr { format!("fd00:bb:1::{i:x}").parse().unwrap() };
    // Fill the arena (512 pages) from one client.
    r.client = client(1);
    let mut mine: Vec<Vec<u8>> = vec![];
    for _ in 0..4 {
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
        mine.push(a.payload);
    }
    // A flood of failing allocations from made-up addresses registers nobody.
    for i in 100..200 {
        r.client = client(i);
        assert_eq!(
            r.status(Opcode::ALLOC, PageHandle::NONE, hdr(0, 0), &[]),
            Status::OUT_OF_MEMORY
        );
    }
    // Free everything: client 1 is forgotten with its last page.
    r.client = client(1);
    for list in &mine {
        let first = PageHandle::from_bits(u64::from_be_bytes(list[..8].try_into().unwrap()));
        let f = BbRepr {
            count: 128,
            ..hdr(0, 0)
        };
        assert_eq!(r.status(Opcode::FREE_BULK, first, f, list), Status::OK);
    }
    assert_eq!(r.handler.store().pages_used(), 0);
    // Four new owners fit the table; a fifth is BUSY until one of them frees its page.
    let mut held = vec![];
    for i in 2..=5 {
        r.client = client(i);
        held.push(r.alloc());
    }
    r.client = client(6);
    assert_eq!(
        r.status(Opcode::ALLOC, PageHandle::NONE, hdr(0, 0), &[]),
        Status::BUSY
    );
    r.client = client(2);
    assert_eq!(r.status(Opcode::FREE, held[0], hdr(0, 0), &[]), Status::OK);
    r.client = client(6);
    r.alloc();
    // The pages of the owners that stayed are still theirs.
    r.client = client(3);
    assert_eq!(r.read(held[1], 0, 1), [0]);
    r.client = client(6);
    assert_eq!(
        r.status(Opcode::READ, held[1], hdr(0, 1), &[]),
        Status::FORBIDDEN
    );
}

/// §7 and §5.10: a request of another version is answered, so it counts as a request
/// answered UNSUPPORTED_VERSION, not as a malformed frame dropped.
#[test]
fn s7_other_versions_are_answered_and_counted_as_errors_not_drops() {
    let mut r = rig();
    for len in [48, 16] {
        let mut f = r.frame(Opcode::PING, PageHandle::NONE, hdr(0, 0), &[]);
        f[62] = 2;
        f[62 + 8..62 + 16].copy_from_slice(&0x77u64.to_be_bytes());
        // A later version's header may be shorter: cut the frame to `len` bytes of it.
        f.truncate(62 + len);
        let n = (f.len() - 54) as u16;
        f[18..20].copy_from_slice(&n.to_be_bytes());
        f[58..60].copy_from_slice(&n.to_be_bytes());
        let ip = |a: &[u8]| Ipv6Addr::from(<[u8; 16]>::try_from(a).unwrap());
        let (src, dst) = (ip(&f[22..38]), ip(&f[38..54]));
        bluebridge_proto::wire::udp::UdpPacket::new_unchecked(&mut f[54..]).fill_checksum(src, dst);
        let rep = r.raw(&f);
        assert_eq!(rep.len(), 1, "{len}");
        assert_eq!(rep[0].h.status, Status::UNSUPPORTED_VERSION);
        assert_eq!(rep[0].h.request_id, 0x77);
    }
    let s = stat(&mut r);
    assert_eq!((s.malformed, s.errors), (0, 2));
}

/// §1: op flags are reserved; replies carry 0 there whatever the request had.
#[test]
fn s1_replies_carry_op_flags_0() {
    let mut r = rig();
    let p = r.alloc();
    for (op, handle, h) in [
        (Opcode::PING, PageHandle::NONE, hdr(0, 0)),
        (Opcode::READ, p, hdr(0, 8)),
        (Opcode::READ, p, hdr(0, 0)), // an error reply
    ] {
        let dst = RemoteAddr::new(NetPrefix::DEFAULT, HOST, handle, op, OpFlags(0x5a));
        let f = r.frame_to(dst, h, &[]);
        let rep = r.raw(&f);
        assert_eq!(rep.len(), 1);
        assert_eq!(rep[0].src.flags(), OpFlags::NONE, "{op:?}");
        assert_eq!(rep[0].src.handle(), handle);
    }
}

/// §6: a seg_max that is not a multiple of 8 counts in whole words.
#[test]
fn s6_seg_max_counts_whole_words() {
    let mut r = rig();
    let p = r.alloc();
    let h = BbRepr {
        seg_max: 1001,
        ..hdr(0, 2002)
    };
    let rep = r.req(Opcode::READ, p, h, &[]);
    let mut lens: Vec<(u16, u16)> = rep.iter().map(|x| (x.h.offset, x.h.length)).collect();
    lens.sort();
    assert_eq!(lens.iter().map(|l| l.1).sum::<u16>(), 2002);
    for &(_, l) in &lens[..lens.len() - 1] {
        assert!(l <= 1000 && l % 8 == 0, "{lens:?}");
    }
}

/// §9 (found from outside: reflection): requests from sources nobody may be answered at are
/// dropped without a reply and counted as `bad_source`, on both transports (the handler is
/// theirs to share; XDP drops some of them earlier).
#[test]
fn s9_requests_from_unanswerable_sources_get_no_reply() {
    let mut r = rig();
    let p = r.alloc();
    let sources = [
        "ff02::1",
        "::",
        "::1",
        "fd00:bb:2::",     // the server's host address
        "fd00:bb:2::100",  // its PING address
        "fd00:bb:ffff::1", // the anycast /48
        "2001:db8::1",     // outside the deployment prefix
    ];
    for (i, src) in sources.iter().enumerate() {
        r.client = src.parse().unwrap();
        for (op, handle, h, payload) in [
            (Opcode::PING, PageHandle::NONE, hdr(0, 0), &b""[..]),
            (Opcode::READ, p, hdr(0, 8), &b""[..]),
            (Opcode::WRITE, p, hdr(0, 4), &b"evil"[..]),
        ] {
            let rep = r.req(op, handle, h, payload);
            assert!(rep.is_empty(), "{src} {op:?} answered: {rep:?}");
        }
        assert_eq!(r.handler.stats().bad_source, 3 * (i as u64 + 1));
    }
    // A multicast source MAC, from a good address.
    r.client = "fd00:bb:1::1".parse().unwrap();
    let mut f = r.frame(Opcode::PING, PageHandle::NONE, hdr(0, 0), &[]);
    f[6] |= 1;
    assert!(r.raw(&f).is_empty());
    assert_eq!(r.read(p, 0, 4), [0; 4], "nothing was written");
    assert_eq!(stat(&mut r).bad_source, 22);
    // A client on the server's own host, inside its /48 (§1), is answered.
    r.client = "fd00:bb:2::1".parse().unwrap();
    assert_eq!(
        r.status(Opcode::PING, PageHandle::NONE, hdr(0, 0), &[]),
        Status::OK
    );
    r.client = "fd00:bb:2:ffff::1".parse().unwrap();
    assert_eq!(
        r.status(Opcode::PING, PageHandle::NONE, hdr(0, 0), &[]),
        Status::OK
    );
}

/// §5.8 (decided here): UPDATE promises a transaction, so a commit in several frames is
/// invisible to readers until its final frame, and a lease that ends before it (released, run
/// out) leaves the page as it was.
#[test]
fn s5_8_a_commit_in_several_frames_lands_whole_or_not_at_all() {
    let mut r = rig();
    let p = r.alloc_shared();
    r.one(Opcode::WRITE, p, hdr(0, 8), b"original");
    let more = |r: &mut Rig, lease: u64, o: u16, d: &[u8]| {
        r.status(
            Opcode::UPDATE_COMMIT,
            p,
            BbRepr {
                flags: HeaderFlags::MORE,
                lease,
                ..hdr(o, d.len() as u16)
            },
            d,
        )
    };
    let lease = acquire(&mut r, p, 5_000).h.lease;
    assert_eq!(more(&mut r, lease, 0, b"new-"), Status::OK);
    // Another client reads mid-transaction: the old bytes.
    let holder = r.client;
    r.client = "fd00:bb:1::9".parse().unwrap();
    assert_eq!(r.read(p, 0, 8), b"original");
    r.client = holder;
    assert_eq!(commit(&mut r, p, lease, b"data"[..].as_ref()), Status::OK);
    // The final frame here carried bytes 0..4: it wins over the staged ones it overlaps.
    assert_eq!(r.read(p, 0, 8), b"datainal");
    let lease = acquire(&mut r, p, 5_000).h.lease;
    assert_eq!(more(&mut r, lease, 4, b"1234"), Status::OK);
    let final_frame = BbRepr { lease, ..hdr(0, 2) };
    assert_eq!(
        r.status(Opcode::UPDATE_COMMIT, p, final_frame, b"AB"),
        Status::OK
    );
    assert_eq!(r.read(p, 0, 8), b"ABta1234");
    // Released, or run out, before the final frame: nothing staged lands.
    let lease = acquire(&mut r, p, 5_000).h.lease;
    assert_eq!(more(&mut r, lease, 0, b"lost"), Status::OK);
    let rel = BbRepr { lease, ..hdr(0, 0) };
    assert_eq!(r.status(Opcode::UPDATE_RELEASE, p, rel, &[]), Status::OK);
    let lease = acquire(&mut r, p, 100).h.lease;
    assert_eq!(more(&mut r, lease, 0, b"late"), Status::OK);
    r.now += 200 * MS;
    assert_eq!(commit(&mut r, p, lease, b"!"), Status::LEASE_EXPIRED);
    let lease = acquire(&mut r, p, 0).h.lease;
    assert_eq!(commit(&mut r, p, lease, b""), Status::OK);
    assert_eq!(r.read(p, 0, 8), b"ABta1234");
}

/// §5.17: the pages of an owner silent past the grace period are freed, except shared and
/// detached ones; an owner that keeps talking keeps its pages, whichever request it sends.
#[test]
fn s5_17_a_silent_owners_pages_are_reclaimed_but_shared_and_detached_ones_stay() {
    let mut r = rig_with(2 << 20, 4096, |c| c.orphan_grace_ms = 2_000);
    let quiet: Ipv6Addr = "fd00:bb:1::10".parse().unwrap();
    let chatty: Ipv6Addr = "fd00:bb:1::20".parse().unwrap();
    r.client = quiet;
    let lost = r.alloc();
    let shared = r.alloc_shared();
    let detached = r.alloc();
    assert_eq!(
        r.status(Opcode::WRITE, detached, hdr(0, 4), b"keep"),
        Status::OK
    );
    assert_eq!(
        r.status(Opcode::DETACH, detached, hdr(0, 0), &[]),
        Status::OK
    );
    assert_eq!(
        r.status(Opcode::DETACH, detached, hdr(0, 0), &[]),
        Status::OK,
        "idempotent"
    );
    r.client = chatty;
    let kept = r.alloc();
    // Someone else may not detach the quiet owner's page.
    assert_eq!(
        r.status(Opcode::DETACH, lost, hdr(0, 0), &[]),
        Status::FORBIDDEN
    );
    assert_eq!(r.handler.store().pages_used(), 4);
    // 3 s pass; the chatty owner pings every 500 ms (a PING is no page operation, and still
    // counts), the quiet one says nothing.
    for _ in 0..6 {
        r.now += 500 * MS;
        assert_eq!(
            r.status(Opcode::PING, PageHandle::NONE, hdr(0, 0), &[]),
            Status::OK
        );
        for _ in 0..4 {
            let now = r.now;
            r.handler.housekeep(now);
        }
    }
    assert_eq!(r.handler.store().pages_used(), 3, "one page reclaimed");
    let s = stat(&mut r);
    assert_eq!((s.reclaimed, s.orphan_grace_ms), (1, 2_000));
    assert_eq!(r.read(kept, 0, 1), [0]);
    r.client = quiet;
    assert_eq!(
        r.status(Opcode::READ, lost, hdr(0, 1), &[]),
        Status::STALE_HANDLE
    );
    assert_eq!(r.read(detached, 0, 4), *b"keep");
    assert_eq!(r.read(shared, 0, 1), [0]);
    // Within the grace period nothing more goes; once the chatty owner falls silent too, its
    // page goes, and the shared and detached pages still stay.
    for (step, left) in [(1_500, 3), (1_000, 2)] {
        run_for(&mut r, step);
        assert_eq!(r.handler.store().pages_used(), left, "after {step} ms more");
    }
}

/// Lets `ms` pass as a worker does: housekeeping every 100 ms.
fn run_for(r: &mut Rig, ms: u64) {
    for _ in 0..ms / 100 {
        r.now += 100 * MS;
        let now = r.now;
        r.handler.housekeep(now);
    }
}

/// §5.17: time the whole server stood still (stopped, its VM paused) is not its owners'
/// silence: after a pause far past the grace period they keep their pages, until they stay
/// silent for the grace period once it runs again.
#[test]
fn s5_17_a_pause_of_the_server_is_not_silence() {
    let mut r = rig_with(2 << 20, 4096, |c| c.orphan_grace_ms = 2_000);
    let p = r.alloc();
    assert_eq!(r.status(Opcode::WRITE, p, hdr(0, 2), b"ok"), Status::OK);
    run_for(&mut r, 1_000);
    r.now += 600_000 * MS; // nothing ran for 10 minutes
    run_for(&mut r, 500);
    assert_eq!(r.read(p, 0, 2), *b"ok", "kept across the pause");
    run_for(&mut r, 1_500);
    assert_eq!(r.handler.store().pages_used(), 1, "heard 1.5 s ago");
    run_for(&mut r, 1_000);
    assert_eq!(
        r.handler.store().pages_used(),
        0,
        "silent 2.5 s of running time"
    );
}

/// §5.17: a grace period of 0 reclaims nothing, however long the silence.
#[test]
fn s5_17_grace_0_never_reclaims() {
    let mut r = rig_with(2 << 20, 4096, |c| c.orphan_grace_ms = 0);
    r.alloc();
    r.now += 86_400_000 * MS;
    let now = r.now;
    r.handler.housekeep(now);
    assert_eq!(r.handler.store().pages_used(), 1);
    assert_eq!(stat(&mut r).orphan_grace_ms, 0);
}

/// §5.17: OWNERS lists a shard's owners page by page and RECLAIM frees one owner's pages
/// (shared and detached included); both are the controller's alone.
#[test]
fn s5_17_the_controller_lists_owners_and_reclaims_their_pages() {
    let mut r = rig_with(2 << 20, 200, |_| {});
    let controller: Ipv6Addr = "fd00:bb:7fff::1".parse().unwrap();
    let client = |i: u16| -> Ipv6Addr { format!("fd00:bb:1::{i:x}").parse().unwrap() };
    // 20 owners with i pages each (more than one 200-byte reply holds: 8 entries).
    for i in 1..=20u16 {
        r.client = client(i);
        for _ in 0..i {
            r.alloc();
        }
    }
    r.client = client(3);
    let p = r.alloc(); // owner 3 holds 4 pages
    assert_eq!(r.status(Opcode::DETACH, p, hdr(0, 0), &[]), Status::OK);
    let sel = BbRepr {
        lease: PageHandle::with_shard(0, 0).to_bits(),
        ..hdr(0, 0)
    };
    // Not the controller: FORBIDDEN, nothing listed or freed.
    assert_eq!(
        r.status(Opcode::OWNERS, PageHandle::NONE, sel, &[]),
        Status::FORBIDDEN
    );
    let reclaim = |addr: Ipv6Addr| {
        let mut h = sel;
        h.set_operand_addr(addr.octets());
        h
    };
    assert_eq!(
        r.status(Opcode::RECLAIM, PageHandle::NONE, reclaim(client(3)), &[]),
        Status::FORBIDDEN
    );
    // No shard selector: MALFORMED.
    r.client = controller;
    assert_eq!(
        r.status(Opcode::OWNERS, PageHandle::NONE, hdr(0, 0), &[]),
        Status::MALFORMED
    );
    let mut listed = std::collections::BTreeMap::new();
    let mut cursor = 0;
    let mut frames = 0;
    loop {
        let a = r.one(
            Opcode::OWNERS,
            PageHandle::NONE,
            BbRepr {
                operand0: cursor,
                ..sel
            },
            &[],
        );
        assert_eq!(a.h.status, Status::OK);
        let entries: Vec<_> = OwnerEntry::parse_list(&a.payload).unwrap().collect();
        assert_eq!(entries.len(), usize::from(a.h.count));
        assert!(entries.len() <= 200 / OwnerEntry::LEN);
        for e in entries {
            listed.insert(Ipv6Addr::from(e.addr), e.pages);
        }
        frames += 1;
        cursor = a.h.operand0;
        if cursor == 0 {
            break;
        }
    }
    assert_eq!(frames, 3);
    assert_eq!(listed.len(), 20);
    assert!((1..=20u16).all(|i| listed[&client(i)] == u32::from(i) + u32::from(i == 3)));
    // RECLAIM owner 3: its 4 pages, the detached one included.
    let a = r.one(Opcode::RECLAIM, PageHandle::NONE, reclaim(client(3)), &[]);
    assert_eq!((a.h.status, a.h.operand0), (Status::OK, 4));
    let a = r.one(Opcode::RECLAIM, PageHandle::NONE, reclaim(client(3)), &[]);
    assert_eq!((a.h.status, a.h.operand0), (Status::OK, 0), "nothing left");
    assert_eq!(r.handler.store().pages_used(), 210 - 3);
    r.client = client(3);
    assert_eq!(
        r.status(Opcode::READ, p, hdr(0, 1), &[]),
        Status::STALE_HANDLE
    );
    assert_eq!(stat(&mut r).reclaimed, 4);
}
