//! The steering program's redirect verdict through BPF_PROG_TEST_RUN: needs a real AF_XDP
//! socket in the XSKMAP, so it lives with the privileged tests.

use bluebridge_ebpf::{Steer, XdpAction};
use bluebridge_proto::frame::{Endpoints, build};
use bluebridge_proto::{
    BbRepr, HostId, MacAddr, NetPrefix, OpFlags, Opcode, PageHandle, RemoteAddr, UDP_PORT,
};
use bluebridge_topology::{Pair, unique};
use bluebridge_xsk::{Xsk, XskConfig, link_index};

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn ours_with_a_socket_is_redirected() {
    let pair = Pair::create(&unique("bbt"), 1500).unwrap();
    let ns = pair.server.ns.clone();
    let ifname = pair.server.ifname.clone();
    std::thread::spawn(move || {
        bluebridge_topology::enter(&ns).unwrap();
        let mut steer = Steer::load().unwrap();
        steer
            .add_prefix(NetPrefix::DEFAULT.host_network(HostId(2)), 48)
            .unwrap();
        let xsk = Xsk::new(&XskConfig {
            frames: 256,
            hugepages: false,
            ..XskConfig::new(&ifname, 0)
        })
        .unwrap();
        let ifindex = link_index(&ifname).unwrap();
        let dst = RemoteAddr::new(
            NetPrefix::DEFAULT,
            HostId(2),
            PageHandle::from_bits(9),
            Opcode::READ,
            OpFlags::NONE,
        );
        let ep = Endpoints {
            src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            src: "fd00:bb:1::1".parse().unwrap(),
            dst: dst.to_ipv6(),
            src_port: 40000,
            dst_port: UDP_PORT,
        };
        let mut f = vec![0u8; 300];
        let n = build(
            &mut f,
            &ep,
            &BbRepr {
                count: 1,
                request_id: 1,
                length: 64,
                ..BbRepr::default()
            },
            &[],
        )
        .unwrap();
        f.truncate(n);

        // No socket on queue 0 yet: passed and counted.
        assert_eq!(steer.test_run_on(&f, ifindex, 0).unwrap(), XdpAction::Pass);
        assert_eq!(steer.counters().unwrap().no_socket, 1);
        // With the socket registered: redirected.
        steer.set_socket(0, xsk.fd()).unwrap();
        assert_eq!(
            steer.test_run_on(&f, ifindex, 0).unwrap(),
            XdpAction::Redirect
        );
        assert_eq!(steer.counters().unwrap().redirected, 1);
        // Foreign destinations still pass, socket or not.
        let mut other = f.clone();
        other[43] ^= 0x01; // host id 2 -> 3
        assert_eq!(
            steer.test_run_on(&other, ifindex, 0).unwrap(),
            XdpAction::Pass
        );
        assert_eq!(steer.counters().unwrap().pass_prefix, 1);
        steer.clear_socket(0).unwrap();
        assert_eq!(steer.test_run_on(&f, ifindex, 0).unwrap(), XdpAction::Pass);
    })
    .join()
    .unwrap();
}
