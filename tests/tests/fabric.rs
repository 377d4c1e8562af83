//! The BGP backend over real packets on a leaf-spine fabric: two racks whose switches are FRR
//! routers (the kernel's forwarding table as data plane) and a spine, eBGP between them. The
//! controller, in rack 1's router, hands every host's routes to its rack's router as static
//! routes, and BGP carries them to the other rack: pages are used across racks, a page
//! migrates between the racks under writes, a down host's /48 leaves the fabric and returns.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bluebridge_client::ClientError;
use bluebridge_proto::{HostId, NetPrefix, PAGE_SIZE};
use bluebridge_server::Server;
use bluebridge_switch::bgp::BgpFabric;
use bluebridge_switch::{Controller, HostSpec, LinkSpec};
use bluebridge_tests::{rack_client, rack_client_net, start_server};
use bluebridge_topology::{LeafSpine, fmt_mac, ip_in, unique};

/// A fabric of 2 racks of 2 hosts (ids 1, 2 and 3, 4), its controller and a server on every
/// host.
struct Fabric {
    servers: Vec<Server>,
    ctl: Arc<Mutex<Controller>>,
    net: LeafSpine,
}

impl Fabric {
    fn new() -> Fabric {
        let net = LeafSpine::create(&unique("bt"), 2, 2, 9000)
            .expect("creating the fabric (needs root and FRR)");
        let r1 = &net.racks[0];
        let rack1 = (
            r1.switch.clone(),
            r1.controller_if.clone(),
            r1.controller_port.clone(),
        );
        let hosts: Vec<(String, HostSpec)> = net
            .racks
            .iter()
            .flat_map(|r| {
                r.hosts.iter().map(move |h| {
                    let spec = HostSpec {
                        id: h.host_id,
                        server_port: format!("{}/{}", r.switch, h.server_port),
                        server_mac: fmt_mac(h.server_mac),
                        client_port: Some(format!("{}/{}", r.switch, h.client_port)),
                        client_mac: Some(fmt_mac(h.client_mac)),
                        client_net: Some(format!("{}/64", rack_client_net(HostId(h.host_id)))),
                        replicas: None,
                    };
                    (r.switch.clone(), spec)
                })
            })
            .collect();
        // The controller's link is in rack 1's router namespace: set up from a thread there.
        let ctl = std::thread::spawn(move || {
            bluebridge_topology::enter(&rack1.0).expect("entering rack 1's router");
            let f = BgpFabric::new(Some(rack1.0.clone())).expect("FRR's vtysh");
            let mut ctl = Controller::new_bgp(NetPrefix::DEFAULT, f);
            for (_, spec) in hosts {
                ctl.register(spec).expect("registering a host");
            }
            ctl.set_misses_allowed(2);
            ctl.attach_link(&LinkSpec {
                ifname: rack1.1,
                port: rack1.2,
            })
            .expect("the controller's link");
            ctl.commit().expect("FRR took the routes");
            ctl
        })
        .join()
        .expect("the controller's set-up");
        let servers = net
            .racks
            .iter()
            .flat_map(|r| r.hosts.iter())
            .map(|h| {
                start_server(
                    &h.ns,
                    &bluebridge_server::ServerConfig {
                        arena_bytes: 16 << 20,
                        idle: true,
                        sched_idle: false,
                        hugepages: false,
                        accept_routed: true,
                        ..bluebridge_server::ServerConfig::new(&h.server_if, HostId(h.host_id))
                    },
                )
            })
            .collect();
        let f = Fabric {
            servers,
            ctl: Arc::new(Mutex::new(ctl)),
            net,
        };
        for r in 0..2 {
            for id in 1..=4 {
                f.wait_route(r, &format!("{}/48", net_of(id)), true);
            }
        }
        f
    }

    /// Waits (10 s at most) until rack `r`'s router has (or has not) a route for `prefix`;
    /// returns its line.
    fn wait_route(&self, r: usize, prefix: &str, present: bool) -> String {
        let t = Instant::now();
        loop {
            let line = ip_in(&self.net.racks[r].switch, &["-6", "route", "show", prefix])
                .expect("ip route show")
                .trim()
                .to_owned();
            if line.is_empty() != present {
                return line;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "rack {}'s router: {prefix} {} after 10 s",
                r + 1,
                if present { "missing" } else { "still there" }
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn net_of(id: u16) -> std::net::Ipv6Addr {
    NetPrefix::DEFAULT.host_network(HostId(id))
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP, FRR): run as root or `cargo xtask test`"
)]
fn pages_and_a_migration_cross_racks_over_bgp() {
    let f = Fabric::new();
    // Rack 1 learned rack 2's hosts over BGP (from the spine), and holds one neighbour entry
    // per link, none per page.
    let learned = f.wait_route(0, &format!("{}/48", net_of(3)), true);
    assert!(learned.contains("proto bgp"), "{learned}");
    let data: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 3) as u8).collect();
    let mut c1 = rack_client(&f.net.racks[0], 0, 200);
    let mut c3 = rack_client(&f.net.racks[1], 0, 200);
    let mut pages = Vec::new();
    for (from, host) in [(1, 3u16), (1, 4), (3, 2)] {
        let c = if from == 1 { &mut c1 } else { &mut c3 };
        let p = c
            .alloc(HostId(host), false)
            .expect("ALLOC across the racks");
        c.write(p, 0, &data).unwrap();
        assert_eq!(
            c.read(p).unwrap(),
            data,
            "host {from} to host {host} and back"
        );
        pages.push((from, p));
    }
    let neigh = ip_in(&f.net.racks[0].switch, &["-6", "neigh", "show"]).unwrap();
    let per_port = neigh
        .lines()
        .filter(|l| l.starts_with("fe80::bb:1 "))
        .count();
    // Rack 1's ports: 2 server links, 2 client links, the controller's link.
    assert_eq!(per_port, 5, "{neigh}");

    // A page of host 2 (rack 1) moves to host 3 (rack 2), home, and to host 4, while host 1's
    // client writes a counter into it and reads it back.
    let p = c1.alloc(HostId(2), false).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let mover = {
        let (ctl, done) = (f.ctl.clone(), done.clone());
        let addr = p.to_ipv6().to_string();
        std::thread::spawn(move || {
            let mut moves = Vec::new();
            for to in [3u16, 2, 4] {
                std::thread::sleep(Duration::from_millis(100));
                let m = bluebridge_switch::actions::migrate(&ctl, &addr, to).expect("migration");
                moves.push((m.from, m.to));
            }
            // Long enough for the last change to reach rack 1.
            std::thread::sleep(Duration::from_millis(600));
            done.store(true, Ordering::Relaxed);
            moves
        })
    };
    let mut last = 0u64;
    while !done.load(Ordering::Relaxed) {
        last += 1;
        c1.write(p, 0, &last.to_le_bytes())
            .unwrap_or_else(|e| panic!("write {last}: {e}"));
        let back = c1.read_range(p, 0, 8).unwrap();
        assert_eq!(back, last.to_le_bytes(), "read after write {last}");
    }
    assert_eq!(mover.join().unwrap(), [(2, 3), (3, 2), (2, 4)]);
    let st = c1.stats();
    assert!(st.moved_retries > 0, "requests met a cut-over: {st:?}");
    assert_eq!(st.timeouts, 0, "{st:?}");
    // Rack 1 reaches it at host 4 through BGP's /112.
    let route = f.wait_route(0, &format!("{}/112", p.to_ipv6()), true);
    assert!(route.contains("proto bgp"), "{route}");
    c1.free(p).unwrap();
    assert!(matches!(c1.read(p), Err(ClientError::StaleHandle)));
    for (from, p) in pages {
        let c = if from == 1 { &mut c1 } else { &mut c3 };
        c.free(p).unwrap();
    }
    let u = f.ctl.lock().unwrap().counters().unwrap().route_updates;
    assert!(u.batches >= 4 && u.failed == 0, "{u:?}");
    drop(f.servers);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP, FRR): run as root or `cargo xtask test`"
)]
fn a_down_host_leaves_the_fabric_and_returns() {
    let f = Fabric::new();
    let mut c1 = rack_client(&f.net.racks[0], 0, 4);
    let p = c1.alloc(HostId(4), false).unwrap();
    c1.write(p, 0, b"still here").unwrap();
    let net = format!("{}/48", net_of(4));
    let ops = format!("{}/112", net_of(4));
    {
        let mut ctl = f.ctl.lock().unwrap();
        ctl.health_missed(4).unwrap();
        ctl.health_missed(4).unwrap();
        ctl.commit().unwrap();
    }
    // Withdrawn from both racks; its host operations' /112 stays announced for the checks.
    f.wait_route(0, &net, false);
    f.wait_route(1, &net, false);
    assert!(f.wait_route(0, &ops, true).contains("proto bgp"));
    assert!(matches!(
        c1.read_range(p, 0, 10),
        Err(ClientError::Timeout { .. })
    ));
    {
        let mut ctl = f.ctl.lock().unwrap();
        ctl.health_ok(4, 1, 4096).unwrap();
        ctl.commit().unwrap();
    }
    f.wait_route(0, &net, true);
    f.wait_route(0, &ops, false);
    assert_eq!(c1.read_range(p, 0, 10).unwrap(), b"still here");
    c1.free(p).unwrap();
    drop(f.servers);
}
