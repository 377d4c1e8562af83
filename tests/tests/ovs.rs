//! The Open vSwitch backend over real packets: an `ovs-vswitchd` on the userspace datapath in
//! the switch namespace, programmed by the controller over OpenFlow. Pages travel by the
//! longest-prefix match of its flows; spoofed sources and destinations without a route are
//! dropped and counted by their flows; a page migrates under writes; a down host's /48 is
//! withdrawn and returns.

use std::time::{Duration, Instant};

use bluebridge_client::ClientError;
use bluebridge_proto::{HostId, NetPrefix, PAGE_SIZE};
use bluebridge_switch::Controller;
use bluebridge_tests::bare_frame;
use bluebridge_tests::controlled::{ControlledRack, RackOptions, migrate_under_writes};

fn ovs() -> RackOptions {
    RackOptions {
        ovs: true,
        ..RackOptions::default()
    }
}

/// Waits (3 s at most: the datapath's statistics reach the flows in the background) until
/// `f` of the controller's counters is `want`, and returns the last value seen.
fn settle(rig: &ControlledRack, want: u64, f: impl Fn(&Controller) -> u64) -> u64 {
    let t = Instant::now();
    loop {
        let v = f(&rig.ctl.lock().unwrap());
        if v == want || t.elapsed() > Duration::from_secs(3) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP, Open vSwitch): run as root or `cargo xtask test`"
)]
fn a_page_migrates_through_open_vswitch() {
    migrate_under_writes(ovs());
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP, Open vSwitch): run as root or `cargo xtask test`"
)]
fn open_vswitch_routes_filters_counts_and_withdraws() {
    let rig = ControlledRack::new(ovs());
    assert_eq!(rig.ctl.lock().unwrap().backend(), "ovs");
    let servers = [rig.server(1), rig.server(2)];
    let mut c = rig.client(6);
    let data: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 5) as u8).collect();
    let mut on = Vec::new();
    for host in [HostId(2), HostId(3)] {
        let p = c.alloc(host, false).expect("ALLOC through Open vSwitch");
        c.write(p, 0, &data).unwrap();
        assert_eq!(c.read(p).unwrap(), data, "a whole page each way");
        on.push(p);
    }

    // The flows counted what they carried: 3 requests to each server, a page among them.
    for id in [2u16, 3] {
        let to_server = |c: &Controller| {
            c.counters().unwrap().hosts[usize::from(id) - 1]
                .to_server
                .packets
        };
        assert!(settle(&rig, 3, to_server) >= 3, "host {id}'s route");
        let h = &rig.ctl.lock().unwrap().counters().unwrap().hosts[usize::from(id) - 1];
        assert!(h.to_server.bytes > PAGE_SIZE as u64, "{h:?}");
        assert!(h.from_server.packets >= 3, "its replies at its port: {h:?}");
    }

    // No route for host 9: every transmission dropped by table 1's miss flow.
    let no_route = |c: &Controller| c.counters().unwrap().switch.no_route;
    let n0 = no_route(&rig.ctl.lock().unwrap());
    match c.alloc(HostId(9), false) {
        Err(ClientError::Timeout { tries }) => {
            assert_eq!(
                settle(&rig, n0 + u64::from(tries), no_route),
                n0 + u64::from(tries)
            );
        }
        other => panic!("expected a timeout, got {other:?}"),
    }

    // A spoofed source (host 7's prefix from host 1's client port) never reaches a server.
    let spoofed = |c: &Controller| c.counters().unwrap().switch.spoofed;
    let s0 = spoofed(&rig.ctl.lock().unwrap());
    let frame = bare_frame(
        NetPrefix::DEFAULT.host_network(HostId(7)),
        NetPrefix::DEFAULT.host_network(HostId(2)),
        false,
    );
    assert!(c.transport_mut().xdp_mut().unwrap().send_raw(&frame));
    assert_eq!(settle(&rig, s0 + 1, spoofed), s0 + 1);

    // Host 3 down: its /48 goes, only its host operations' /112 stays (for the checks).
    {
        let mut ctl = rig.ctl.lock().unwrap();
        ctl.health_missed(3).unwrap();
        ctl.health_missed(3).unwrap();
        ctl.commit().unwrap();
        let routes: Vec<String> = ctl
            .routes()
            .unwrap()
            .into_iter()
            .map(|r| r.prefix)
            .collect();
        assert!(!routes.contains(&"fd00:bb:3::/48".to_owned()), "{routes:?}");
        assert!(routes.contains(&"fd00:bb:3::/112".to_owned()), "{routes:?}");
    }
    // The bundle changed the tables; the datapath's cached flow for host 3 goes at the
    // revalidator round the change triggers (milliseconds, later on a loaded machine).
    rig.ovs.as_ref().unwrap().revalidator_wait().unwrap();
    assert!(matches!(c.read(on[1]), Err(ClientError::Timeout { .. })));
    assert_eq!(c.read(on[0]).unwrap(), data, "host 2 unaffected");
    // It answers again: its /48 returns with its pages.
    {
        let mut ctl = rig.ctl.lock().unwrap();
        ctl.health_ok(3, 1, 4096).unwrap();
        ctl.commit().unwrap();
    }
    assert_eq!(
        c.read(on[1]).unwrap(),
        data,
        "host 3's page after its return"
    );
    for p in on {
        c.free(p).unwrap();
    }
    let u = rig.ctl.lock().unwrap().counters().unwrap().route_updates;
    assert!(u.batches >= 3 && u.failed == 0, "{u:?}");
    drop(servers);
}
