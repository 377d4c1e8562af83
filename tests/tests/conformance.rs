//! Conformance over real sockets, on both server transports (AF_XDP and kernel UDP): raw
//! request frames from an AF_XDP client, the statuses of the replies compared with
//! docs/protocol.md. One test per section and transport (`af_xdp::s5_5_…`, `kernel_udp::s5_5_…`),
//! named by its section; server/tests/conformance.rs holds the same rules in depth against the
//! request handler both transports run.

use std::time::{Duration, Instant};

use bluebridge_proto::frame::Frame;
use bluebridge_proto::message::{
    StatRecord, WriteEntry, bulk_status, put_handles, put_write_entry,
};
use bluebridge_proto::{
    BbRepr, NetPrefix, OpFlags, Opcode, PageHandle, RemoteAddr, Status, UDP_PORT,
};
use bluebridge_server::TransportKind;
use bluebridge_tests::{Rig, RigOptions, SERVER};

/// Raw requests from their own client port (their own session: the engine's sequences are
/// left alone).
struct Probe {
    rig: Rig,
    next: u64,
}

const PORT: u16 = 41000;

/// A reply: its header, its source address, its payload.
type Answer = (BbRepr, RemoteAddr, Vec<u8>);

impl Probe {
    fn new(transport: TransportKind) -> Probe {
        Probe {
            rig: Rig::new(&RigOptions {
                server_transport: transport,
                ..RigOptions::default()
            }),
            next: 1 << bluebridge_proto::SESSION_SLOT_BITS,
        }
    }

    /// Sends one request to `dst` and returns what came back within 300 ms (stopping 50 ms
    /// after the last reply).
    fn ask(
        &mut self,
        dst: RemoteAddr,
        mut h: BbRepr,
        payload: &[u8],
        edit: impl FnOnce(&mut Vec<u8>),
    ) -> Vec<Answer> {
        h.request_id = self.next;
        self.next += 1 << bluebridge_proto::SESSION_SLOT_BITS;
        let (mut f, ep) = self.rig.raw_request(dst, &h, payload);
        f[54..56].copy_from_slice(&PORT.to_be_bytes());
        edit(&mut f);
        let src: std::net::Ipv6Addr = <[u8; 16]>::try_from(&f[22..38]).unwrap().into();
        bluebridge_proto::wire::udp::UdpPacket::new_unchecked(&mut f[54..])
            .fill_checksum(src, ep.dst);
        assert!(self.rig.xdp().send_raw(&f));
        self.collect()
    }

    /// What came back to the probe's port within 300 ms (stopping 50 ms after the last reply).
    fn collect(&mut self) -> Vec<Answer> {
        let (start, mut last) = (Instant::now(), None::<Instant>);
        let mut out = Vec::new();
        while start.elapsed() < Duration::from_millis(300)
            && last.is_none_or(|t| t.elapsed() < Duration::from_millis(50))
        {
            self.rig.xdp().recv_raw(|r| {
                if let Ok(fr) = Frame::parse(r)
                    && fr.endpoints.dst_port == PORT
                    && fr.endpoints.src_port == UDP_PORT
                {
                    let from = RemoteAddr::from_ipv6(fr.endpoints.src, NetPrefix::DEFAULT).unwrap();
                    out.push((fr.header, from, fr.payload.to_vec()));
                    last = Some(Instant::now());
                }
            });
        }
        out
    }

    fn status(&mut self, dst: RemoteAddr, h: BbRepr, payload: &[u8]) -> Status {
        let r = self.ask(dst, h, payload, |_| {});
        assert_eq!(r.len(), 1, "{:?} to {dst}: {r:?}", dst.opcode());
        r[0].0.status
    }
}

fn hdr(offset: u16, length: u16) -> BbRepr {
    BbRepr {
        count: 1,
        offset,
        length,
        ..BbRepr::default()
    }
}

fn host(op: Opcode) -> RemoteAddr {
    RemoteAddr::host_op(NetPrefix::DEFAULT, SERVER, op)
}

/// A probe on `transport` and a page its client allocated.
fn probe_with_page(transport: TransportKind) -> (Probe, RemoteAddr) {
    let mut p = Probe::new(transport);
    let page = p.rig.client.alloc(SERVER, false).unwrap();
    (p, page)
}

fn at(page: RemoteAddr, op: Opcode) -> RemoteAddr {
    page.with_op(op, OpFlags::NONE)
}

/// Rewrites a raw request's source address.
fn from(src: &str) -> impl FnOnce(&mut Vec<u8>) {
    let a: std::net::Ipv6Addr = src.parse().unwrap();
    move |f: &mut Vec<u8>| f[22..38].copy_from_slice(&a.octets())
}

fn s1_replies_carry_op_flags_0(t: TransportKind) {
    let mut p = Probe::new(t);
    let r = p.ask(
        host(Opcode::PING).with_op(Opcode::PING, OpFlags(0x5a)),
        hdr(0, 0),
        &[],
        |_| {},
    );
    assert_eq!((r.len(), r[0].1.flags()), (1, OpFlags::NONE), "{t:?} §1");
}

fn s2_4_count_is_1_outside_the_bulk_requests(t: TransportKind) {
    let (mut p, page) = probe_with_page(t);
    for count in [0, 2] {
        let h = BbRepr { count, ..hdr(0, 0) };
        assert_eq!(
            p.status(host(Opcode::PING), h, &[]),
            Status::MALFORMED,
            "{t:?} §2.4"
        );
        let h = BbRepr { count, ..hdr(0, 8) };
        assert_eq!(
            p.status(at(page, Opcode::READ), h, &[]),
            Status::MALFORMED,
            "{t:?} §2.4"
        );
    }
}

fn s4_invalidate_is_no_request(t: TransportKind) {
    let (mut p, page) = probe_with_page(t);
    for dst in [host(Opcode::INVALIDATE), at(page, Opcode::INVALIDATE)] {
        assert_eq!(
            p.status(dst, hdr(0, 0), &[]),
            Status::UNKNOWN_OPCODE,
            "{t:?} §4"
        );
    }
}

fn s5_5_a_bad_read_bulk_item_fails_alone(t: TransportKind) {
    let (mut p, page) = probe_with_page(t);
    let mut list = [0u8; 24];
    put_handles(&mut list, [page.handle(), PageHandle::NONE, page.handle()]);
    let h = BbRepr {
        count: 3,
        ..hdr(0, 8)
    };
    let mut items: Vec<(u16, Status)> = p
        .ask(at(page, Opcode::READ_BULK), h, &list, |_| {})
        .iter()
        .map(|a| (a.0.item, a.0.status))
        .collect();
    items.sort();
    assert_eq!(
        items,
        [
            (0, Status::OK),
            (1, Status::INVALID_HANDLE),
            (2, Status::OK)
        ],
        "{t:?} §5.5"
    );
}

fn s5_7_a_bad_write_bulk_entry_fails_alone(t: TransportKind) {
    let (mut p, page) = probe_with_page(t);
    let mut buf = [0u8; 64];
    let mut end = 0;
    for e in [
        WriteEntry {
            handle: page.handle(),
            offset: 0,
            data: b"good",
        },
        WriteEntry {
            handle: page.handle(),
            offset: 4090,
            data: &[1; 10],
        },
    ] {
        end = put_write_entry(&mut buf, end, &e).unwrap();
    }
    let h = BbRepr {
        count: 2,
        ..hdr(0, 0)
    };
    let r = p.ask(at(page, Opcode::WRITE_BULK), h, &buf[..end], |_| {});
    assert_eq!(r.len(), 1, "{t:?} §5.7");
    let st: Vec<_> = (0..2).map(|i| bulk_status(&r[0].2, i).unwrap()).collect();
    assert_eq!(st, [Status::OK, Status::OUT_OF_RANGE], "{t:?} §5.7");
    assert_eq!(
        p.rig.client.read_range(page, 0, 4).unwrap(),
        b"good",
        "{t:?} §5.7"
    );
}

fn s5_8_lease_0_names_no_lease(t: TransportKind) {
    let (mut p, page) = probe_with_page(t);
    let h = BbRepr {
        lease: 0,
        ..hdr(0, 4)
    };
    assert_eq!(
        p.status(at(page, Opcode::UPDATE_COMMIT), h, b"evil"),
        Status::LEASE_INVALID,
        "{t:?} §5.8"
    );
}

fn s5_10_the_stat_record_has_every_field(t: TransportKind) {
    let mut p = Probe::new(t);
    let r = p.ask(host(Opcode::STAT), hdr(0, 0), &[], |_| {});
    assert_eq!((r.len(), r[0].2.len()), (1, StatRecord::LEN), "{t:?} §5.10");
    let s = StatRecord::parse(&r[0].2).unwrap();
    assert_eq!(
        (s.shards, s.orphan_grace_ms),
        (1, bluebridge_server::DEFAULT_GRACE_MS),
        "{t:?} §5.10"
    );
}

fn s5_11_atomics_are_one_aligned_word(t: TransportKind) {
    let (mut p, page) = probe_with_page(t);
    assert_eq!(
        p.status(at(page, Opcode::CAS), hdr(4092, 8), &[]),
        Status::MISALIGNED,
        "{t:?} §5.11"
    );
    assert_eq!(
        p.status(at(page, Opcode::CAS), hdr(4096, 8), &[]),
        Status::OUT_OF_RANGE,
        "{t:?} §5.11"
    );
}

fn s5_17_detach_takes_no_range_and_only_the_controller_lists(t: TransportKind) {
    let (mut p, page) = probe_with_page(t);
    assert_eq!(
        p.status(at(page, Opcode::DETACH), hdr(0, 0), &[]),
        Status::OK,
        "{t:?} §5.17"
    );
    // A range is MALFORMED (DETACH takes none); another owner's DETACH is FORBIDDEN
    // (server/tests/conformance.rs: this probe's replies reach only its own address).
    assert_eq!(
        p.status(at(page, Opcode::DETACH), hdr(0, 8), &[]),
        Status::MALFORMED,
        "{t:?} §5.17"
    );
    // OWNERS and RECLAIM name a shard (else MALFORMED) and are the controller's alone.
    let shard0 = BbRepr {
        lease: PageHandle::with_shard(0, 0).to_bits(),
        ..hdr(0, 0)
    };
    for op in [Opcode::OWNERS, Opcode::RECLAIM] {
        assert_eq!(
            p.status(host(op), hdr(0, 0), &[]),
            Status::MALFORMED,
            "{t:?} §5.17 {op:?}"
        );
        assert_eq!(
            p.status(host(op), shard0, &[]),
            Status::FORBIDDEN,
            "{t:?} §5.17 {op:?}"
        );
    }
    assert_eq!(p.rig.client.read_range(page, 0, 1).unwrap(), [0]);
}

fn s7_another_version_is_answered(t: TransportKind) {
    let mut p = Probe::new(t);
    let r = p.ask(host(Opcode::PING), hdr(0, 0), &[], |f| f[62] = 2);
    assert_eq!(r.len(), 1, "{t:?} §7");
    assert_eq!(r[0].0.status, Status::UNSUPPORTED_VERSION, "{t:?} §7");
}

/// §9 (the AF_XDP path takes only IPv6 followed straight by UDP): a request in two IPv6
/// fragments is not answered by either transport, though the kernel reassembles it for the UDP
/// socket; the kernel-UDP server counts it as malformed.
fn s9_fragmented_requests_get_no_reply(t: TransportKind) {
    let mut p = Probe::new(t);
    let h = BbRepr {
        request_id: p.next,
        ..hdr(0, 0)
    };
    p.next += 1 << bluebridge_proto::SESSION_SLOT_BITS;
    let (mut f, ep) = p.rig.raw_request(host(Opcode::PING), &h, &[]);
    f[54..56].copy_from_slice(&PORT.to_be_bytes());
    bluebridge_proto::wire::udp::UdpPacket::new_unchecked(&mut f[54..])
        .fill_checksum(bluebridge_tests::client_addr(), ep.dst);
    let udp = f[54..].to_vec(); // 8 + 48 bytes
    let before = p.rig.server().stats().handler.malformed_total();
    for (offset, part, more) in [(0usize, &udp[..32], true), (32, &udp[32..], false)] {
        let mut frag = f[..54].to_vec();
        frag[18..20].copy_from_slice(&((8 + part.len()) as u16).to_be_bytes());
        frag[20] = 44; // next header: fragment
        frag.extend_from_slice(&[17, 0]);
        frag.extend_from_slice(&((offset as u16) | u16::from(more)).to_be_bytes());
        frag.extend_from_slice(&0x0bb1_f7a9u32.to_be_bytes());
        frag.extend_from_slice(part);
        assert!(p.rig.xdp().send_raw(&frag));
    }
    let r = p.collect();
    assert!(
        r.is_empty(),
        "{t:?} §9: a fragmented request was answered: {r:?}"
    );
    if t == TransportKind::Udp {
        let t0 = Instant::now();
        while p.rig.server().stats().handler.malformed_total() == before {
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "{t:?} §9: not counted"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // The same request whole is answered.
    let r = p.ask(host(Opcode::PING), hdr(0, 0), &[], |_| {});
    assert_eq!((r.len(), r[0].0.status), (1, Status::OK), "{t:?} §9");
}

fn s9_no_reply_to_unanswerable_sources(t: TransportKind) {
    let mut p = Probe::new(t);
    for src in ["ff02::1", "2001:db8::1", "fd00:bb:2::100"] {
        let r = p.ask(host(Opcode::PING), hdr(0, 0), &[], from(src));
        assert!(r.is_empty(), "{t:?} §9: {src} answered");
    }
}

/// One test per section check on `transport`, in module `$module`.
macro_rules! on_transport {
    ($module:ident, $transport:ident, $($check:ident),*) => {
        mod $module {
            $(
                #[test]
                #[cfg_attr(
                    unprivileged,
                    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
                )]
                fn $check() {
                    super::$check(bluebridge_server::TransportKind::$transport);
                }
            )*
        }
    };
}

/// One test per section check and transport.
macro_rules! on_both_transports {
    ($($check:ident),* $(,)?) => {
        on_transport!(af_xdp, Xdp, $($check),*);
        on_transport!(kernel_udp, Udp, $($check),*);
    };
}

on_both_transports!(
    s1_replies_carry_op_flags_0,
    s2_4_count_is_1_outside_the_bulk_requests,
    s4_invalidate_is_no_request,
    s5_5_a_bad_read_bulk_item_fails_alone,
    s5_7_a_bad_write_bulk_entry_fails_alone,
    s5_8_lease_0_names_no_lease,
    s5_10_the_stat_record_has_every_field,
    s5_11_atomics_are_one_aligned_word,
    s5_17_detach_takes_no_range_and_only_the_controller_lists,
    s7_another_version_is_answered,
    s9_no_reply_to_unanswerable_sources,
    s9_fragmented_requests_get_no_reply,
);
