//! Coherent copies (§5.18) through the handler over real frames: readers share, a writer
//! revokes them with REVOKE notices to their endpoints, write-backs land, plain writes wait for
//! copies, a silent holder blocks no longer than its copy lease.

mod common;

use bluebridge_proto::message::{KEEP_NONE, KEEP_READ, KEEP_WRITE};
use common::*;

/// Every frame one request produced: replies to the requester and notices to others.
fn run(r: &mut Rig, port: u16, op: Opcode, p: PageHandle, h: BbRepr, data: &[u8]) -> Vec<Reply> {
    r.port = port;
    let f = r.frame(op, p, h, data);
    let mut sink = VecSink(Vec::new(), usize::MAX);
    r.handler.handle_frame(&f, r.now, &mut sink);
    sink.0
        .iter()
        .map(|b| {
            let f = Frame::parse(b).unwrap();
            assert!(f.is_reply());
            Reply {
                src: RemoteAddr::from_ipv6(f.endpoints.src, NetPrefix::DEFAULT).unwrap(),
                dst: f.endpoints.dst,
                h: BbRepr {
                    // The destination port, for the test to see who it went to.
                    item: f.endpoints.dst_port,
                    ..f.header
                },
                payload: f.payload.to_vec(),
            }
        })
        .collect()
}

/// A pure release from `port`: PUT of its copy of generation `g`, keep nothing, no bytes; the
/// reply's status.
fn release(r: &mut Rig, port: u16, p: PageHandle, g: u64) -> Status {
    run(r, port, Opcode::PUT, p, with(g, KEEP_NONE, hdr(0, 0)), &[])[0]
        .h
        .status
}

fn with(lease: u64, keep: u64, h: BbRepr) -> BbRepr {
    BbRepr {
        lease,
        operand0: keep,
        ..h
    }
}

#[test]
fn readers_share_and_a_writer_revokes_them() {
    let mut r = rig();
    let p = r.alloc_shared();
    let (a, b, w) = (40001, 40002, 40003);
    // Two read copies of the same generation, with the page's bytes and the copy lease.
    let ra = run(&mut r, a, Opcode::GET_SHARED, p, hdr(0, 4096), &[]);
    let rb = run(&mut r, b, Opcode::GET_SHARED, p, hdr(0, 4096), &[]);
    assert_eq!((ra.len(), rb.len()), (1, 1));
    let g = ra[0].h.lease;
    assert_eq!(
        (ra[0].h.status, rb[0].h.lease, ra[0].h.operand0),
        (Status::OK, g, 1000)
    );
    assert_eq!(ra[0].payload, vec![0; 4096]);
    // The writer: RECALLING, and one REVOKE (keep nothing) to each reader's endpoint, from the
    // page's address.
    let out = run(&mut r, w, Opcode::GET_EXCLUSIVE, p, hdr(0, 4096), &[]);
    let (replies, notices): (Vec<_>, Vec<_>) = out.iter().partition(|x| x.h.item == w);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].h.status, Status::RECALLING);
    let mut to: Vec<u16> = notices.iter().map(|n| n.h.item).collect();
    to.sort();
    assert_eq!(to, [a, b]);
    for n in &notices {
        assert_eq!(n.src.opcode(), Opcode::REVOKE);
        assert_eq!(n.src.handle(), p);
        assert_eq!((n.h.request_id, n.h.lease, n.h.operand0), (0, g, KEEP_NONE));
    }
    // Plain writes wait while copies live.
    r.port = a;
    assert_eq!(
        r.status(Opcode::WRITE, p, hdr(0, 4), &[1; 4]),
        Status::LEASE_HELD
    );
    // The readers give their copies up; the writer's next try gets the page.
    for port in [a, b] {
        assert_eq!(release(&mut r, port, p, g), Status::OK);
    }
    let got = run(&mut r, w, Opcode::GET_EXCLUSIVE, p, hdr(0, 4096), &[]);
    assert_eq!(got.len(), 1);
    let wg = got[0].h.lease;
    assert_eq!(got[0].h.status, Status::OK);
    assert_ne!(wg, g);
    // A reader now recalls the writer, which may keep a read copy.
    let out = run(&mut r, a, Opcode::GET_SHARED, p, hdr(0, 4096), &[]);
    let notice = out
        .iter()
        .find(|x| x.h.item == w)
        .expect("a REVOKE to the writer");
    assert_eq!((notice.h.lease, notice.h.operand0), (wg, KEEP_READ));
    assert_eq!(
        out.iter().find(|x| x.h.item == a).unwrap().h.status,
        Status::RECALLING
    );
    // The writer writes back and downgrades: its read copy has a new generation.
    let data = pattern(5);
    let put = run(
        &mut r,
        w,
        Opcode::PUT,
        p,
        with(wg, KEEP_READ, hdr(0, 4096)),
        &data,
    );
    assert_eq!(put[0].h.status, Status::OK);
    let rg = put[0].h.lease;
    assert_ne!(rg, wg);
    let ra = run(&mut r, a, Opcode::GET_SHARED, p, hdr(0, 4096), &[]);
    assert_eq!((ra[0].h.status, ra[0].h.lease), (Status::OK, rg));
    assert_eq!(ra[0].payload, data);
    let s = r.handler.stat_record(r.now);
    assert_eq!((s.copy_grants, s.revokes, s.recalling), (4, 3, 2));
    assert_eq!(s.copy_lease_ms, 1000);
}

#[test]
fn an_upgrade_keeps_the_copy_and_a_stale_put_changes_nothing() {
    let mut r = rig();
    let p = r.alloc_shared();
    let g = run(&mut r, 40001, Opcode::GET_SHARED, p, hdr(0, 4096), &[])[0]
        .h
        .lease;
    // The sole reader upgrades: no bytes (its copy is current), a new generation.
    let up = run(
        &mut r,
        40001,
        Opcode::GET_EXCLUSIVE,
        p,
        with(g, 0, hdr(0, 4096)),
        &[],
    );
    assert_eq!(up.len(), 1);
    assert_eq!((up[0].h.status, up[0].h.length), (Status::OK, 0));
    let w = up[0].h.lease;
    assert_ne!(w, g);
    // A write-back that keeps the write copy (a flush).
    let data = pattern(7);
    let put = run(
        &mut r,
        40001,
        Opcode::PUT,
        p,
        with(w, KEEP_WRITE, hdr(0, 4096)),
        &data,
    );
    assert_eq!((put[0].h.status, put[0].h.lease), (Status::OK, w));
    // Its retransmission is answered from the session table, not run again.
    let again = BbRepr {
        request_id: r.next_id - 1,
        ..with(w, KEEP_WRITE, hdr(0, 4096))
    };
    let dup = run(&mut r, 40001, Opcode::PUT, p, again, &data);
    assert_eq!(dup[0].h.status, Status::OK);
    assert_eq!(r.handler.stats().duplicates, 1);
    // Another endpoint's write-back, or one for an old generation, writes nothing.
    let other = run(
        &mut r,
        40002,
        Opcode::PUT,
        p,
        with(w, KEEP_NONE, hdr(0, 4)),
        &[9; 4],
    );
    assert_eq!(other[0].h.status, Status::LEASE_EXPIRED);
    let old = run(
        &mut r,
        40001,
        Opcode::PUT,
        p,
        with(g, KEEP_NONE, hdr(0, 4)),
        &[9; 4],
    );
    assert_eq!(old[0].h.status, Status::LEASE_EXPIRED);
    assert_eq!(r.read(p, 0, 4096), data);
    // A reader cannot write back.
    let put = run(
        &mut r,
        40001,
        Opcode::PUT,
        p,
        with(w, KEEP_READ, hdr(0, 0)),
        &[],
    );
    let rg = put[0].h.lease;
    let bad = run(
        &mut r,
        40001,
        Opcode::PUT,
        p,
        with(rg, KEEP_READ, hdr(0, 4)),
        &[1; 4],
    );
    assert_eq!(bad[0].h.status, Status::LEASE_INVALID);
}

#[test]
fn a_silent_holder_blocks_writers_only_for_its_lease() {
    let mut r = rig_with(2 << 20, 4096, |c| c.copy_lease_ms = 200);
    let p = r.alloc_shared();
    let w = run(&mut r, 40001, Opcode::GET_EXCLUSIVE, p, hdr(0, 4096), &[]);
    assert_eq!(w[0].h.operand0, 200);
    // Another writer waits, FREE waits, UPDATE waits, migration waits.
    let out = run(&mut r, 40002, Opcode::GET_EXCLUSIVE, p, hdr(0, 4096), &[]);
    assert!(out.iter().any(|x| x.h.status == Status::RECALLING));
    r.port = 40002;
    assert_eq!(
        r.status(Opcode::FREE, p, hdr(0, 0), &[]),
        Status::LEASE_HELD
    );
    assert_eq!(
        r.status(Opcode::UPDATE_ACQUIRE, p, hdr(0, 8), &[]),
        Status::LEASE_HELD
    );
    // RENEW keeps the holder's lease going; then it falls silent.
    r.now += 150 * MS;
    let renew = run(&mut r, 40001, Opcode::RENEW, p, hdr(0, 0), &[]);
    assert_eq!((renew[0].h.status, renew[0].h.operand0), (Status::OK, 200));
    r.now += 150 * MS;
    let out = run(&mut r, 40002, Opcode::GET_EXCLUSIVE, p, hdr(0, 4096), &[]);
    assert!(out.iter().any(|x| x.h.status == Status::RECALLING));
    r.now += 60 * MS;
    let got = run(&mut r, 40002, Opcode::GET_EXCLUSIVE, p, hdr(0, 4096), &[]);
    assert_eq!((got.len(), got[0].h.status), (1, Status::OK));
    // The late write-back of the silent holder is refused.
    let late = run(
        &mut r,
        40001,
        Opcode::PUT,
        p,
        with(w[0].h.lease, 0, hdr(0, 4)),
        &[1; 4],
    );
    assert_eq!(late[0].h.status, Status::LEASE_EXPIRED);
    // An endpoint with no copy lease learns so from RENEW.
    let none = run(&mut r, 40009, Opcode::RENEW, p, hdr(0, 0), &[]);
    assert_eq!(none[0].h.status, Status::LEASE_EXPIRED);
    // Once the new writer gives the page up, plain writes and FREE go through.
    assert_eq!(release(&mut r, 40002, p, got[0].h.lease), Status::OK);
    r.port = 40002;
    assert_eq!(r.status(Opcode::WRITE, p, hdr(0, 4), &[1; 4]), Status::OK);
    assert_eq!(r.status(Opcode::FREE, p, hdr(0, 0), &[]), Status::OK);
    let gone = run(&mut r, 40001, Opcode::GET_SHARED, p, hdr(0, 4096), &[]);
    assert_eq!(gone[0].h.status, Status::STALE_HANDLE);
}

#[test]
fn a_page_migrates_only_once_its_copies_are_back_and_none_is_granted_meanwhile() {
    let mut r = rig();
    let p = r.alloc_shared();
    let owner = r.client;
    let controller: Ipv6Addr = "fd00:bb:7fff::1".parse().unwrap();
    let (a, b, ctl) = (40001, 40002, 40100);
    let ra = run(&mut r, a, Opcode::GET_SHARED, p, hdr(0, 4096), &[]);
    run(&mut r, b, Opcode::GET_SHARED, p, hdr(0, 4096), &[]);
    let g = ra[0].h.lease;
    // The controller asks to move it: LEASE_HELD, and a REVOKE (keep nothing) to each holder.
    r.client = controller;
    let out = run(&mut r, ctl, Opcode::MIGRATE_OUT, p, hdr(0, 4096), &[]);
    let (replies, notices): (Vec<_>, Vec<_>) = out.iter().partition(|x| x.h.item == ctl);
    assert_eq!(replies[0].h.status, Status::LEASE_HELD);
    let mut to: Vec<u16> = notices.iter().map(|n| n.h.item).collect();
    to.sort();
    assert_eq!(to, [a, b]);
    assert!(
        notices
            .iter()
            .all(|n| (n.h.lease, n.h.operand0) == (g, KEEP_NONE))
    );
    // Meanwhile nobody gets a copy: not a new reader, not a holder upgrading, so the copies
    // drain however busy the page is.
    r.client = owner;
    let newcomer = run(&mut r, 40003, Opcode::GET_SHARED, p, hdr(0, 4096), &[]);
    assert_eq!(newcomer[0].h.status, Status::RECALLING);
    let upgrade = run(
        &mut r,
        a,
        Opcode::GET_EXCLUSIVE,
        p,
        with(g, 0, hdr(0, 4096)),
        &[],
    );
    assert_eq!(upgrade[0].h.status, Status::RECALLING);
    for port in [a, b] {
        assert_eq!(release(&mut r, port, p, g), Status::OK);
    }
    // Then it leaves with its bytes, and answers MOVED here from now on.
    r.client = controller;
    let out = run(&mut r, ctl, Opcode::MIGRATE_OUT, p, hdr(0, 4096), &[]);
    assert_eq!((out.len(), out[0].h.status), (1, Status::OK));
    assert_eq!(out[0].payload.len(), 4096);
    r.client = owner;
    let late = run(&mut r, 40003, Opcode::GET_SHARED, p, hdr(0, 4096), &[]);
    assert_eq!(late[0].h.status, Status::MOVED);
}

#[test]
fn pages_of_another_owner_need_sharing_first() {
    let mut r = rig();
    let p = r.alloc(); // not shared
    r.client = "fd00:bb:1::9".parse().unwrap();
    let out = run(&mut r, 40001, Opcode::GET_SHARED, p, hdr(0, 4096), &[]);
    assert_eq!(out[0].h.status, Status::FORBIDDEN);
}
