//! steer.bpf.c through BPF_PROG_TEST_RUN: fixture frames in, verdict and counters out. Needs
//! root (or CAP_BPF); fails, never skips, without it. The redirect-to-socket case needs a real
//! AF_XDP socket and is covered by the privileged end-to-end tests.

use std::net::Ipv6Addr;

use bluebridge_ebpf::{Steer, SteerCounters, XdpAction};
use bluebridge_proto::frame::{Endpoints, build};
use bluebridge_proto::{
    BbRepr, HostId, MacAddr, NetPrefix, OpFlags, Opcode, PageHandle, RemoteAddr, UDP_PORT,
};

fn request_to(dst: Ipv6Addr) -> Vec<u8> {
    let ep = Endpoints {
        src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
        dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
        src: "fd00:bb:1::1".parse().unwrap(),
        dst,
        src_port: 40000,
        dst_port: UDP_PORT,
    };
    let mut buf = vec![0u8; 4400];
    let h = BbRepr {
        count: 1,
        request_id: 1,
        length: 4096,
        ..Default::default()
    };
    let n = build(&mut buf, &ep, &h, &[]).unwrap();
    buf.truncate(n);
    buf
}

fn page_addr(host: u16) -> Ipv6Addr {
    RemoteAddr::new(
        NetPrefix::DEFAULT,
        HostId(host),
        PageHandle::from_bits(7),
        Opcode::READ,
        OpFlags::NONE,
    )
    .to_ipv6()
}

fn steer() -> Steer {
    let mut s = Steer::load()
        .unwrap_or_else(|e| panic!("these tests load BPF programs and need root or CAP_BPF: {e}"));
    s.add_prefix(NetPrefix::DEFAULT.host_network(HostId(2)), 48)
        .unwrap();
    s
}

fn delta(a: SteerCounters, b: SteerCounters) -> SteerCounters {
    SteerCounters {
        redirected: b.redirected - a.redirected,
        pass_not_ipv6: b.pass_not_ipv6 - a.pass_not_ipv6,
        pass_not_udp: b.pass_not_udp - a.pass_not_udp,
        pass_port: b.pass_port - a.pass_port,
        pass_prefix: b.pass_prefix - a.pass_prefix,
        malformed: b.malformed - a.malformed,
        no_socket: b.no_socket - a.no_socket,
        dropped_source: b.dropped_source - a.dropped_source,
        dropped_mac: b.dropped_mac - a.dropped_mac,
        bounced: b.bounced - a.bounced,
        fast_served: b.fast_served - a.fast_served,
        fast_missed: b.fast_missed - a.fast_missed,
        fast_torn: b.fast_torn - a.fast_torn,
        fast_passed: b.fast_passed - a.fast_passed,
    }
}

/// Counters where only what `set` sets has moved.
fn one(set: impl FnOnce(&mut SteerCounters)) -> SteerCounters {
    let mut c = SteerCounters::default();
    set(&mut c);
    c
}

/// Runs `frame` and checks the verdict and that exactly the expected counter moved by one.
fn expect(s: &mut Steer, frame: &[u8], action: XdpAction, moved: SteerCounters) {
    let before = s.counters().unwrap();
    assert_eq!(s.test_run(frame).unwrap(), action);
    assert_eq!(delta(before, s.counters().unwrap()), moved);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn ours_without_socket_is_counted_and_passed() {
    let mut s = steer();
    let f = request_to(page_addr(2));
    expect(&mut s, &f, XdpAction::Pass, one(|c| c.no_socket = 1));
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn other_prefix_passes() {
    let mut s = steer();
    let f = request_to(page_addr(3));
    expect(&mut s, &f, XdpAction::Pass, one(|c| c.pass_prefix = 1));
    // Adding the host's /48 makes it ours; removing it again makes it foreign again.
    s.add_prefix(NetPrefix::DEFAULT.host_network(HostId(3)), 48)
        .unwrap();
    expect(&mut s, &f, XdpAction::Pass, one(|c| c.no_socket = 1));
    s.remove_prefix(NetPrefix::DEFAULT.host_network(HostId(3)), 48)
        .unwrap();
    expect(&mut s, &f, XdpAction::Pass, one(|c| c.pass_prefix = 1));
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn non_udp_and_non_ipv6_pass() {
    let mut s = steer();
    let mut f = request_to(page_addr(2));
    f[20] = 58; // ICMPv6
    expect(&mut s, &f, XdpAction::Pass, one(|c| c.pass_not_udp = 1));
    let mut f = request_to(page_addr(2));
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes()); // ARP
    expect(&mut s, &f, XdpAction::Pass, one(|c| c.pass_not_ipv6 = 1));
    let mut f = request_to(page_addr(2));
    f[56..58].copy_from_slice(&53u16.to_be_bytes()); // dst port 53, src port 40000
    expect(&mut s, &f, XdpAction::Pass, one(|c| c.pass_port = 1));
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn replies_from_the_port_are_ours_too() {
    let mut s = steer();
    let mut f = request_to(page_addr(2));
    f[54..56].copy_from_slice(&UDP_PORT.to_be_bytes());
    f[56..58].copy_from_slice(&40000u16.to_be_bytes());
    expect(&mut s, &f, XdpAction::Pass, one(|c| c.no_socket = 1));
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn truncated_headers_are_malformed() {
    let mut s = steer();
    let f = request_to(page_addr(2));
    // BPF_PROG_TEST_RUN needs at least an Ethernet header; every cut inside IPv6 or UDP header.
    for len in [14, 20, 53, 54, 61] {
        expect(&mut s, &f[..len], XdpAction::Pass, one(|c| c.malformed = 1));
    }
    // Once the UDP header is whole the program's job is done; the rest is userspace's.
    expect(&mut s, &f[..62], XdpAction::Pass, one(|c| c.no_socket = 1));
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn prefix_length_is_checked() {
    let mut s = steer();
    assert!(s.add_prefix(Ipv6Addr::UNSPECIFIED, 129).is_err());
}

/// Issue 12, item 14: requests nobody may be answered at are dropped in XDP and counted, so no
/// reply is ever reflected at a third party.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn requests_from_unanswerable_sources_are_dropped() {
    let mut s = steer();
    let ours = page_addr(2);
    let frame = request_to(ours);
    for src in ["ff02::1", "::", "::1", "ff0e::bb"] {
        let mut f = frame.clone();
        f[22..38].copy_from_slice(&src.parse::<Ipv6Addr>().unwrap().octets());
        expect(&mut s, &f, XdpAction::Drop, one(|c| c.dropped_source = 1));
    }
    for mac in [
        [0xff; 6],
        [0x01, 0x00, 0x5e, 0, 0, 1],
        [0x33, 0x33, 0, 0, 0, 1],
    ] {
        let mut f = frame.clone();
        f[6..12].copy_from_slice(&mac);
        expect(&mut s, &f, XdpAction::Drop, one(|c| c.dropped_source = 1));
    }
    // Once the interface's MAC is known, frames of ours to another station are dropped too.
    s.set_own_mac([2, 0, 0, 0, 0, 2]).unwrap();
    expect(&mut s, &frame, XdpAction::Pass, one(|c| c.no_socket = 1));
    for mac in [[2, 0, 0, 0, 0, 3], [0xff; 6], [0x33, 0x33, 0, 0, 0, 1]] {
        let mut f = frame.clone();
        f[0..6].copy_from_slice(&mac);
        expect(&mut s, &f, XdpAction::Drop, one(|c| c.dropped_mac = 1));
    }
    // Frames that are not ours are none of this program's business, whatever their MACs.
    let mut other = request_to(page_addr(3));
    other[0..6].copy_from_slice(&[0xff; 6]);
    expect(&mut s, &other, XdpAction::Pass, one(|c| c.pass_prefix = 1));
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root or CAP_BPF (BPF_PROG_TEST_RUN): run as root or `cargo xtask test`"
)]
fn the_bounce_mode_sends_ours_back_with_endpoints_swapped() {
    let mut s = steer();
    s.set_bounce(true).unwrap();
    let frame = request_to(page_addr(2));
    let before = s.counters().unwrap();
    let (action, out) = s.test_run_frame(&frame).unwrap();
    assert_eq!(action, XdpAction::Tx);
    assert_eq!(delta(before, s.counters().unwrap()), one(|c| c.bounced = 1));
    assert_eq!(out.len(), frame.len());
    // MACs, addresses and ports swapped; everything else (the UDP checksum too) unchanged.
    assert_eq!((&out[0..6], &out[6..12]), (&frame[6..12], &frame[0..6]));
    assert_eq!(
        (&out[22..38], &out[38..54]),
        (&frame[38..54], &frame[22..38])
    );
    assert_eq!(
        (&out[54..56], &out[56..58]),
        (&frame[56..58], &frame[54..56])
    );
    assert_eq!(&out[12..22], &frame[12..22]);
    assert_eq!(&out[58..], &frame[58..]);
    let f = bluebridge_proto::frame::Frame::parse(&out).expect("a valid frame, checksum too");
    assert_eq!(f.endpoints.dst, "fd00:bb:1::1".parse::<Ipv6Addr>().unwrap());
    // Not ours: passed as before; off again: back to the sockets.
    let other = request_to(page_addr(3));
    expect(&mut s, &other, XdpAction::Pass, one(|c| c.pass_prefix = 1));
    s.set_bounce(false).unwrap();
    expect(&mut s, &frame, XdpAction::Pass, one(|c| c.no_socket = 1));
}
