//! The fast READ of steer.bpf.c through BPF_PROG_TEST_RUN: an INLINE READ of a page, or of a
//! short range of it, in the hot-page store is answered in place (hit), and every case it must
//! leave to the server goes on untouched and counted (miss, torn slot, another client's page, a
//! long range, segments, bad padding). Needs root (or CAP_BPF); fails, never skips, without it.

use std::net::Ipv6Addr;

use bluebridge_ebpf::consts::*;
use bluebridge_ebpf::{HOT_SLOT_SIZE, Steer, SteerCounters, XdpAction, hot_key, hot_page_sum};
use bluebridge_proto::frame::{Endpoints, Frame, build};
use bluebridge_proto::{
    BbRepr, HeaderFlags, HostId, MacAddr, NetPrefix, OpFlags, Opcode, PAGE_SIZE, PageHandle,
    RemoteAddr, UDP_PORT,
};

const CLIENT: &str = "fd00:bb:1::1";
const OTHER: &str = "fd00:bb:1::2";

fn page(op_flags: u8) -> Ipv6Addr {
    RemoteAddr::new(
        NetPrefix::DEFAULT,
        HostId(2),
        PageHandle::from_bits(0x0100_0000_0000_0007),
        Opcode::READ,
        OpFlags(op_flags),
    )
    .to_ipv6()
}

/// An INLINE READ from `src` of `length` bytes at `offset`, padded with `pad`.
fn inline_read(src: &str, offset: u16, length: u16, seg_max: u16, pad: &[u8]) -> Vec<u8> {
    let ep = Endpoints {
        src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
        dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
        src: src.parse().unwrap(),
        dst: page(0),
        src_port: 40000,
        dst_port: UDP_PORT,
    };
    let h = BbRepr {
        flags: HeaderFlags::INLINE,
        count: 1,
        request_id: 0x1234_5678_9abc_def0,
        offset,
        length,
        seg_max,
        ..Default::default()
    };
    let mut buf = vec![0u8; 4400];
    let n = build(&mut buf, &ep, &h, pad).unwrap();
    buf.truncate(n);
    buf
}

fn whole_page_read(src: &str) -> Vec<u8> {
    inline_read(src, 0, PAGE_SIZE as u16, 0, &[0; PAGE_SIZE])
}

fn data() -> Vec<u8> {
    (0..PAGE_SIZE).map(|i| (i * 7 + i / 256) as u8).collect()
}

/// A slot holding `data` for the page, owned by CLIENT, at sequence `seq`.
fn slot(seq: u32, flags: u32, key: Ipv6Addr, data: &[u8]) -> [u8; HOT_SLOT_SIZE] {
    let mut s = [0u8; HOT_SLOT_SIZE];
    let at = |o: u32| o as usize;
    s[0..4].copy_from_slice(&seq.to_ne_bytes());
    s[at(BB_HOT_SLOT_OFF_FLAGS)..][..4].copy_from_slice(&flags.to_ne_bytes());
    s[at(BB_HOT_SLOT_OFF_SUM)..][..4].copy_from_slice(&hot_page_sum(data).to_ne_bytes());
    s[at(BB_HOT_SLOT_OFF_KEY)..][..16].copy_from_slice(&hot_key(&key));
    let owner: Ipv6Addr = CLIENT.parse().unwrap();
    s[at(BB_HOT_SLOT_OFF_OWNER)..][..16].copy_from_slice(&owner.octets());
    s[at(BB_HOT_SLOT_OFF_DATA)..][..PAGE_SIZE].copy_from_slice(data);
    s
}

fn hits(s: &Steer, i: u32) -> u64 {
    let b = s.read_hot_slot(i).unwrap();
    u64::from_ne_bytes(b[BB_HOT_SLOT_OFF_HITS as usize..][..8].try_into().unwrap())
}

/// A steer program with a 4-slot store, the page in slot 1.
fn steer_with(slot_bytes: [u8; HOT_SLOT_SIZE]) -> Steer {
    let mut s = Steer::load_with_hot_slots(4)
        .unwrap_or_else(|e| panic!("these tests load BPF programs and need root or CAP_BPF: {e}"));
    s.add_prefix(NetPrefix::DEFAULT.host_network(HostId(2)), 48)
        .unwrap();
    s.write_hot_slot(1, &slot_bytes).unwrap();
    s.hot_index()
        .unwrap()
        .insert(&hot_key(&page(0)), 1)
        .unwrap();
    s
}

fn fast(c: SteerCounters) -> [u64; 4] {
    [c.fast_served, c.fast_missed, c.fast_torn, c.fast_passed]
}

/// Runs `frame`; returns the verdict, the frame after, and which fast counters moved.
fn run(s: &mut Steer, frame: &[u8]) -> (XdpAction, Vec<u8>, [u64; 4]) {
    let before = fast(s.counters().unwrap());
    let (a, out) = s.test_run_frame(frame).unwrap();
    let after = fast(s.counters().unwrap());
    (a, out, std::array::from_fn(|i| after[i] - before[i]))
}

const SERVED: [u64; 4] = [1, 0, 0, 0];
const MISSED: [u64; 4] = [0, 1, 0, 0];
const TORN: [u64; 4] = [0, 0, 1, 0];
const PASSED: [u64; 4] = [0, 0, 0, 1];

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_hot_page_is_answered_in_place() {
    let d = data();
    let mut s = steer_with(slot(4, BB_HOT_VALID, page(0), &d));
    let req = whole_page_read(CLIENT);
    let (a, out, moved) = run(&mut s, &req);
    assert_eq!((a, moved), (XdpAction::Tx, SERVED));
    // A valid reply (UDP checksum included) from the page's address to the client.
    let f = Frame::parse(&out).expect("the reply parses, checksum and lengths too");
    assert_eq!(f.endpoints.src, page(0));
    assert_eq!(f.endpoints.dst, CLIENT.parse::<Ipv6Addr>().unwrap());
    assert_eq!(
        (f.endpoints.src_port, f.endpoints.dst_port),
        (UDP_PORT, 40000)
    );
    assert_eq!(f.endpoints.dst_mac, MacAddr([2, 0, 0, 0, 0, 1]));
    assert_eq!(f.endpoints.src_mac, MacAddr([2, 0, 0, 0, 0, 2]));
    assert_eq!(f.header.flags, HeaderFlags::REPLY | HeaderFlags::INLINE);
    assert_eq!(f.header.request_id, 0x1234_5678_9abc_def0);
    assert_eq!((f.header.offset, f.header.length), (0, PAGE_SIZE as u16));
    assert_eq!((f.header.count, f.header.status.0), (1, 0));
    let mut got = f.payload.to_vec();
    got.extend_from_slice(f.payload_tail);
    assert_eq!(got, d, "the slot's page, byte for byte");
    assert_eq!(hits(&s, 1), 1);
    // A shared page is answered for anyone; the op-flag byte of the request is not echoed.
    s.write_hot_slot(1, &slot(6, BB_HOT_VALID | BB_HOT_SHARED, page(0), &d))
        .unwrap();
    let mut other = whole_page_read(OTHER);
    other[22 + 16 + 15] = 0x5; // op flags (reserved, ignored): byte 15 of the destination
    let sum = fix_checksum(&mut other);
    assert!(sum);
    let (a, out, moved) = run(&mut s, &other);
    assert_eq!((a, moved), (XdpAction::Tx, SERVED));
    let f = Frame::parse(&out).expect("a valid reply");
    assert_eq!(f.endpoints.src, page(0));
    assert_eq!(f.endpoints.dst, OTHER.parse::<Ipv6Addr>().unwrap());
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn short_ranges_of_a_hot_page_are_answered_in_place() {
    let d = data();
    let mut s = steer_with(slot(4, BB_HOT_VALID, page(0), &d));
    // Odd and even offsets and lengths, every piece size, the page's last byte, the longest.
    for (offset, length) in [
        (8u16, 8u16),
        (8, 100),
        (1, 3),
        (3, 1),
        (4095, 1),
        (4093, 3),
        (0, 511),
        (1, 512),
        (3584, 512),
        (777, 333),
    ] {
        let pad = vec![0u8; usize::from(length)];
        let req = inline_read(CLIENT, offset, length, 0, &pad);
        let (a, out, moved) = run(&mut s, &req);
        let what = format!("{offset}+{length}");
        assert_eq!((a, moved), (XdpAction::Tx, SERVED), "{what}");
        let f = Frame::parse(&out).unwrap_or_else(|e| panic!("{what}: the reply parses: {e:?}"));
        assert_eq!(
            (f.header.offset, f.header.length),
            (offset, length),
            "{what}"
        );
        assert_eq!(f.header.flags, HeaderFlags::REPLY | HeaderFlags::INLINE);
        let mut got = f.payload.to_vec();
        got.extend_from_slice(f.payload_tail);
        let (o, l) = (usize::from(offset), usize::from(length));
        assert_eq!(got, d[o..o + l], "{what}: the slot's bytes");
    }
    // A torn slot: the short padding goes back to zeros too.
    s.write_hot_slot(1, &slot(5, BB_HOT_VALID, page(0), &d))
        .unwrap();
    let req = inline_read(CLIENT, 5, 77, 0, &[0; 77]);
    let (a, out, moved) = run(&mut s, &req);
    assert_eq!((a, moved), (XdpAction::Pass, TORN));
    assert_eq!(out, req);
}

/// Recomputes the UDP checksum of a frame built by `build` after an edit.
fn fix_checksum(frame: &mut [u8]) -> bool {
    use bluebridge_proto::checksum::{Checksum, udp_field};
    frame[60..62].fill(0);
    let src: [u8; 16] = frame[22..38].try_into().unwrap();
    let dst: [u8; 16] = frame[38..54].try_into().unwrap();
    let len = (frame.len() - 54) as u32;
    let mut c = Checksum::new();
    c.add_pseudo_header(src.into(), dst.into(), 17, len);
    c.add_bytes(&frame[54..]);
    frame[60..62].copy_from_slice(&udp_field(&c).to_be_bytes());
    true
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn what_xdp_cannot_answer_goes_on_untouched() {
    let d = data();
    let mut s = steer_with(slot(4, BB_HOT_VALID, page(0), &d));
    let check = |s: &mut Steer, frame: &[u8], want: [u64; 4], why: &str| {
        let (a, out, moved) = run(s, frame);
        // No socket on the queue in a test run: what goes on to the socket is passed.
        assert_eq!((a, moved), (XdpAction::Pass, want), "{why}");
        assert_eq!(out, frame, "{why}: the frame is left as it came");
    };
    // Another client's page: the server answers FORBIDDEN.
    check(&mut s, &whole_page_read(OTHER), PASSED, "owner");
    // A range longer than the fast path takes, one past the page's end (OUT_OF_RANGE), or a
    // client asking for segments: the server's.
    check(
        &mut s,
        &inline_read(CLIENT, 8, 513, 0, &[0; 513]),
        PASSED,
        "long range",
    );
    check(
        &mut s,
        &inline_read(CLIENT, 4000, 97, 0, &[0; 97]),
        PASSED,
        "past the end",
    );
    check(
        &mut s,
        &inline_read(CLIENT, 0, 4096, 2048, &[0; 4096]),
        PASSED,
        "seg_max",
    );
    // Padding that is not zeros: the request's checksum cannot be vouched for here.
    check(
        &mut s,
        &inline_read(CLIENT, 0, 4096, 0, &[1; 4096]),
        PASSED,
        "padding",
    );
    // Damaged in flight: the socket's checksum check drops it.
    let mut bad = whole_page_read(CLIENT);
    bad[62 + 8] ^= 0x40;
    check(&mut s, &bad, PASSED, "checksum");
    // Not in the index; in the index but the slot holds another page, or none.
    let mut other_page = whole_page_read(CLIENT);
    other_page[38 + 13] ^= 1;
    fix_checksum(&mut other_page);
    check(&mut s, &other_page, MISSED, "not indexed");
    let elsewhere = RemoteAddr::new(
        NetPrefix::DEFAULT,
        HostId(2),
        PageHandle::from_bits(0x0100_0000_0000_0008),
        Opcode::READ,
        OpFlags::NONE,
    )
    .to_ipv6();
    s.write_hot_slot(1, &slot(4, BB_HOT_VALID, elsewhere, &d))
        .unwrap();
    check(
        &mut s,
        &whole_page_read(CLIENT),
        MISSED,
        "slot of another page",
    );
    s.write_hot_slot(1, &slot(4, 0, page(0), &d)).unwrap();
    check(&mut s, &whole_page_read(CLIENT), MISSED, "slot not valid");
    // Being written (odd sequence) through both tries: torn, and the padding is zeros again.
    s.write_hot_slot(1, &slot(5, BB_HOT_VALID, page(0), &d))
        .unwrap();
    check(&mut s, &whole_page_read(CLIENT), TORN, "torn");
    // No checksum (0 is invalid in IPv6): the socket's to judge.
    let mut zero = whole_page_read(CLIENT);
    zero[60..62].fill(0);
    check(&mut s, &zero, PASSED, "checksum 0");
    // Not sent to the BlueBridge port (a frame from it, to another): not a request at all.
    let mut to_other_port = whole_page_read(CLIENT);
    to_other_port[54..56].copy_from_slice(&UDP_PORT.to_be_bytes());
    to_other_port[56..58].copy_from_slice(&40000u16.to_be_bytes());
    fix_checksum(&mut to_other_port);
    check(&mut s, &to_other_port, [0; 4], "destination port");
    // A plain READ is not the fast path's at all.
    let plain = {
        let mut f = inline_read(CLIENT, 0, 4096, 0, &[]);
        f[62 + 1] = 0; // flags: no INLINE
        fix_checksum(&mut f);
        f
    };
    check(&mut s, &plain, [0; 4], "plain READ");
    assert_eq!(hits(&s, 1), 0, "nothing was served");
}
