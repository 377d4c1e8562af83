//! Prometheus metrics over real packets: a server's `--metrics` exporter and the controller's
//! (built as `bluebridge-ctl daemon --metrics` builds it), scraped over HTTP inside their
//! namespaces while a client works, checked against the client's own counts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use bluebridge_metrics::{Listener, registry_of, scrape};
use bluebridge_proto::HostId;
use bluebridge_server::ServerConfig;
use bluebridge_switch::metrics::ControllerCollector;
use bluebridge_tests::controlled::{ControlledRack, RackOptions};
use bluebridge_tests::start_server;
use bluebridge_topology::run_in;

const SERVER_METRICS: &str = "127.0.0.1:9464";
const CTL_METRICS: &str = "127.0.0.1:9465";

/// `/metrics` at `addr`, scraped from inside namespace `ns` (whose loopback is up, as in
/// every namespace the topology makes).
fn scrape_in(ns: &str, addr: &str) -> BTreeMap<String, f64> {
    let addr: SocketAddr = addr.parse().unwrap();
    run_in(ns, || scrape(addr))
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `series` in `m` (0 if absent, as a counter never incremented may be).
fn v(m: &BTreeMap<String, f64>, series: &str) -> u64 {
    m.get(series).copied().unwrap_or(0.0) as u64
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn the_server_and_the_controller_count_what_the_client_did() {
    let rig = ControlledRack::new(RackOptions {
        hosts: 3,
        ..RackOptions::default()
    });
    let (h1, h2) = (&rig.rack.hosts[1], &rig.rack.hosts[2]);
    let server = start_server(
        &h1.ns,
        &ServerConfig {
            metrics: Some(SERVER_METRICS.parse().unwrap()),
            ..rig.server_config(1)
        },
    );
    assert_eq!(server.metrics_addr(), Some(SERVER_METRICS.parse().unwrap()));
    let _other = rig.server(2);
    // The controller's exporter, as `bluebridge-ctl daemon --metrics` starts it.
    let exporter = {
        let ctl = rig.ctl.clone();
        run_in(&rig.rack.switch, move || {
            Listener::bind(CTL_METRICS.parse().unwrap())
                .expect("binding the controller's metrics")
                .serve(registry_of(ControllerCollector::new(ctl)))
        })
        .unwrap()
    };
    let (sw, ns1) = (rig.rack.switch.clone(), h1.ns.clone());
    let host = HostId(h1.host_id);
    let id = h1.host_id.to_string();

    let s0 = scrape_in(&ns1, SERVER_METRICS);
    let c0 = scrape_in(&sw, CTL_METRICS);
    assert_eq!(v(&s0, "bluebridge_pages_used"), 0);
    assert!(v(&s0, "bluebridge_pages_total") >= 4096, "{s0:?}");
    assert_eq!(
        v(&c0, &format!("bluebridge_ctl_host_up{{host=\"{id}\"}}")),
        1
    );
    assert_eq!(v(&c0, "bluebridge_ctl_info{backend=\"xdp\"}"), 1);

    // A scraper polls the server while the client works: the WRITE count climbs. Every 10
    // rounds the client waits until a scrape has seen its writes so far, so scrapes land
    // during the traffic however fast either side runs.
    let done = Arc::new(AtomicBool::new(false));
    let latest = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    let poller = {
        let (ns1, done, latest) = (ns1.clone(), done.clone(), latest.clone());
        std::thread::spawn(move || {
            bluebridge_topology::enter(&ns1).unwrap();
            while !done.load(Ordering::Relaxed) {
                let m = scrape(SERVER_METRICS.parse().unwrap()).unwrap();
                let n = v(&m, "bluebridge_requests_total{opcode=\"WRITE\"}");
                latest.store(n, Ordering::Relaxed);
                tx.send(n).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let mut c = rig.client(12);
    let before = c.stats();
    let (pages, writes, reads) = (8u64, 40u64, 10u64);
    let handles: Vec<_> = (0..pages).map(|_| c.alloc(host, false).unwrap()).collect();
    for round in 0..writes {
        for &p in &handles {
            c.write(p, 0, &round.to_le_bytes()).unwrap();
        }
        if round % 10 == 9 {
            let t = std::time::Instant::now();
            while latest.load(Ordering::Relaxed) < (round + 1) * pages {
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "no scrape saw the writes"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    for _ in 0..reads {
        for &p in &handles {
            assert_eq!(c.read_range(p, 0, 8).unwrap(), (writes - 1).to_le_bytes());
        }
    }
    c.free(handles[0]).unwrap();
    assert!(c.read(handles[0]).is_err(), "a freed page");
    done.store(true, Ordering::Relaxed);
    poller.join().unwrap();
    let seen: Vec<u64> = rx.try_iter().collect();
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "a counter went back: {seen:?}"
    );
    let mut distinct = seen.clone();
    distinct.dedup();
    assert!(
        distinct.len() >= 4,
        "scrapes during the traffic saw it move: {seen:?}"
    );

    let after = c.stats();
    let frames = (after.sent + after.retransmits) - (before.sent + before.retransmits);
    let retrans = after.retransmits - before.retransmits;
    let s1 = scrape_in(&ns1, SERVER_METRICS);
    let d = |series: &str| v(&s1, series) - v(&s0, series);
    let within = |what: &str, got: u64, want: u64| {
        assert!(
            (want..=want + retrans).contains(&got),
            "{what}: {got}, the client says {want} (+{retrans} retransmissions)"
        );
    };
    within(
        "ALLOC",
        d("bluebridge_requests_total{opcode=\"ALLOC\"}"),
        pages,
    );
    within(
        "WRITE",
        d("bluebridge_requests_total{opcode=\"WRITE\"}"),
        pages * writes,
    );
    // The reads, and the read of the freed page.
    within(
        "READ",
        d("bluebridge_requests_total{opcode=\"READ\"}"),
        pages * reads + 1,
    );
    within("FREE", d("bluebridge_requests_total{opcode=\"FREE\"}"), 1);
    // Every READ (8 bytes, and the whole page of the freed one) went INLINE: the steering
    // program had no hot-page store to answer them from.
    within(
        "INLINE READs XDP missed",
        d("bluebridge_xdp_fast_reads_total{outcome=\"missed\"}"),
        pages * reads + 1,
    );
    assert_eq!(d("bluebridge_xdp_fast_reads_total{outcome=\"served\"}"), 0);
    assert_eq!(d("bluebridge_replies_total{status=\"STALE_HANDLE\"}"), 1);
    assert!(
        d("bluebridge_replies_total{status=\"OK\"}") >= pages * (writes + reads + 1),
        "{s1:?}"
    );
    assert_eq!(v(&s1, "bluebridge_pages_used"), pages - 1);
    assert!(
        d("bluebridge_xdp_steer_frames_total{verdict=\"redirected\"}") >= frames,
        "every request the client sent went through the steering program"
    );
    assert_eq!(
        d("bluebridge_malformed_total{reason=\"truncated\"}"),
        0,
        "nothing malformed"
    );

    // The switch routed every frame the client sent to host 1's /48, and its client port
    // took each one in.
    let c1 = scrape_in(&sw, CTL_METRICS);
    let dc = |series: &str| v(&c1, series) - v(&c0, series);
    let route = format!(
        "bluebridge_ctl_host_frames_total{{host=\"{id}\",counted_at=\"route\",side=\"server\"}}"
    );
    let client_id = rig.rack.hosts[0].host_id;
    let port = format!(
        "bluebridge_ctl_host_frames_total{{host=\"{client_id}\",counted_at=\"port\",side=\"client\"}}"
    );
    assert_eq!(dc(&route), frames, "{c1:?}");
    assert_eq!(dc(&port), frames, "{c1:?}");
    assert!(dc("bluebridge_ctl_switch_frames_total{verdict=\"forwarded\"}") >= 2 * frames);
    assert_eq!(
        dc("bluebridge_ctl_switch_frames_total{verdict=\"drop_spoofed\"}"),
        0
    );

    // A migration shows at the controller.
    let p = handles[1];
    let m = bluebridge_switch::actions::migrate(&rig.ctl, &p.to_ipv6().to_string(), h2.host_id)
        .expect("migration");
    assert_eq!(m.to, h2.host_id);
    assert_eq!(c.read_range(p, 0, 8).unwrap(), (writes - 1).to_le_bytes());
    let c2 = scrape_in(&sw, CTL_METRICS);
    assert_eq!(
        v(&c2, "bluebridge_ctl_migrations_total") - v(&c1, "bluebridge_ctl_migrations_total"),
        1
    );
    assert!(
        v(&c2, "bluebridge_ctl_route_update_batches_total")
            > v(&c1, "bluebridge_ctl_route_update_batches_total")
    );
    for p in &handles[1..] {
        c.free(*p).unwrap();
    }
    assert_eq!(exporter.scrapes(), 3);
    drop(exporter);
    drop(server);
}
