//! The controller's decisions without a switch or a network (no root): health, placement and
//! migrations against an in-memory fabric; and the control API answering while the link is
//! busy (network I/O never holds the controller's lock).

use std::collections::BTreeMap;
use std::net::Ipv6Addr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bluebridge_client::ClientError;
use bluebridge_ebpf::Route;
use bluebridge_proto::message::StatRecord;
use bluebridge_proto::{NetPrefix, OpFlags, Opcode, PageHandle, RemoteAddr};

use crate::fabric::Fabric;
use crate::{Controller, CtlError, HostSpec, MigrationPlan};

/// Routes in a map; ports numbered from 10.
#[derive(Default)]
struct MemFabric {
    ports: u32,
    routes: BTreeMap<(Ipv6Addr, u8), Route>,
}

impl Fabric for MemFabric {
    fn kind(&self) -> &'static str {
        "memory"
    }
    fn add_port(&mut self, _ifname: &str, _force_generic: bool) -> Result<u32, CtlError> {
        self.ports += 1;
        Ok(9 + self.ports)
    }
    fn allow_source(&mut self, _port: u32, _net: Ipv6Addr, _len: u8) -> Result<(), CtlError> {
        Ok(())
    }
    fn disallow_source(&mut self, _port: u32, _net: Ipv6Addr, _len: u8) -> Result<(), CtlError> {
        Ok(())
    }
    fn add_route(&mut self, net: Ipv6Addr, len: u8, r: Route) -> Result<(), CtlError> {
        self.routes.insert((net, len), r);
        Ok(())
    }
    fn remove_route(&mut self, net: Ipv6Addr, len: u8) -> Result<(), CtlError> {
        self.routes.remove(&(net, len));
        Ok(())
    }
    fn routes(&self) -> Result<Vec<(Ipv6Addr, u8, Route)>, CtlError> {
        Ok(self.routes.iter().map(|(&(n, l), &r)| (n, l, r)).collect())
    }
    fn answers_for_withdrawn(&self) -> bool {
        true
    }
}

/// A controller over a memory fabric with hosts 1, 2 and 3 (their ports are `lo`: a name
/// every machine has, whose MAC the registration reads).
fn controller() -> Controller {
    let mut c = Controller::with_fabric(NetPrefix::DEFAULT, Box::new(MemFabric::default()), false);
    for id in 1..=3 {
        c.register(HostSpec {
            id,
            server_port: "lo".into(),
            server_mac: format!("02:00:00:00:00:{id:02x}"),
            client_port: None,
            client_mac: None,
            client_net: None,
            replicas: None,
        })
        .unwrap();
    }
    c
}

fn stat(used: u64, total: u64) -> Result<StatRecord, ClientError> {
    Ok(StatRecord {
        pages_used: used,
        pages_total: total,
        ..StatRecord::default()
    })
}

fn timeout() -> Result<StatRecord, ClientError> {
    Err(ClientError::Timeout { tries: 4 })
}

fn placement(c: &Controller) -> Option<u16> {
    c.status().iter().find(|h| h.placement).map(|h| h.id)
}

fn down(c: &Controller, id: u16) -> bool {
    c.status().iter().any(|h| h.id == id && h.health.down)
}

#[test]
fn placement_follows_occupancy_and_avoids_dead_hosts() {
    let mut c = controller();
    assert_eq!(placement(&c), None, "no host has answered yet");
    c.health_result(1, stat(80, 100)).unwrap();
    c.health_result(2, stat(10, 100)).unwrap();
    c.health_result(3, stat(50, 100)).unwrap();
    assert_eq!(placement(&c), Some(2));
    // Host 2 stops answering: after the allowed misses it is withdrawn (its /48 rejects) and
    // placement moves to the emptiest live host.
    for _ in 0..2 {
        c.health_result(2, timeout()).unwrap();
        assert!(!down(&c, 2));
    }
    c.health_result(2, timeout()).unwrap();
    assert!(down(&c, 2));
    assert_eq!(placement(&c), Some(3));
    let net = NetPrefix::DEFAULT.host_network(bluebridge_proto::HostId(2));
    let r = c.fabric.routes().unwrap();
    assert!(r.iter().any(|&(n, l, r)| (n, l) == (net, 48) && r.reject));
    // It answers again: restored.
    c.health_result(2, stat(10, 100)).unwrap();
    assert!(!down(&c, 2));
    assert_eq!(placement(&c), Some(2));
}

fn page_on(host: u16) -> RemoteAddr {
    RemoteAddr::new(
        NetPrefix::DEFAULT,
        bluebridge_proto::HostId(host),
        PageHandle::from_bits(0x0100_0000_0000_0042),
        Opcode(0),
        OpFlags::NONE,
    )
}

#[test]
fn migrations_are_checked_then_routed() {
    let mut c = controller();
    let page = page_on(2).to_ipv6().to_string();
    // Refused before any I/O: no link yet, unknown or same host, down host, not a page.
    let e = |r: Result<MigrationPlan, CtlError>| r.unwrap_err().to_string();
    assert!(e(c.plan_migration(&page, 3)).contains("no link"));
    assert!(e(c.plan_migration(&page, 9)).contains("not registered"));
    assert!(e(c.plan_migration(&page, 2)).contains("already"));
    let host = NetPrefix::DEFAULT.host_network(bluebridge_proto::HostId(2));
    assert!(e(c.plan_migration(&host.to_string(), 3)).contains("names a host"));
    for _ in 0..3 {
        c.health_result(3, timeout()).unwrap();
    }
    assert!(e(c.plan_migration(&page, 3)).contains("down"));
    // A copy that succeeded: the page's /112 goes to its new holder; back home, it goes away.
    let key = page_on(2).to_ipv6();
    let plan = |from, to| MigrationPlan {
        page: page_on(2),
        key,
        home: 2,
        from,
        to,
        prefix: NetPrefix::DEFAULT,
    };
    c.finish_migration(&plan(2, 1)).unwrap();
    let routes = c.fabric.routes().unwrap();
    let r = routes
        .iter()
        .find(|(n, l, _)| (*n, *l) == (key, 112))
        .unwrap();
    assert_eq!(r.2.dst_mac, [2, 0, 0, 0, 0, 1]);
    c.finish_migration(&plan(1, 2)).unwrap();
    assert!(
        !c.fabric
            .routes()
            .unwrap()
            .iter()
            .any(|(n, l, _)| (*n, *l) == (key, 112))
    );
}

/// The point of the split: a health check or migration waiting on the network holds the link,
/// not the controller; the API answers meanwhile.
#[test]
fn the_api_answers_while_the_link_is_busy() {
    let ctl = Mutex::new(controller());
    let link = ctl.lock().unwrap().link();
    let busy = link.lock().unwrap(); // as a dead host's health check would, for ~75 ms
    let t = Instant::now();
    let answer = crate::api::answer(&ctl, r#"{"cmd":"status"}"#);
    assert!(matches!(answer, crate::api::Response::Ok(_)), "{answer:?}");
    assert!(t.elapsed() < Duration::from_secs(1));
    drop(busy);
}

fn replication(c: &Controller, id: u16) -> crate::Replication {
    c.status()
        .into_iter()
        .find(|h| h.id == id)
        .unwrap()
        .replication
}

/// Replicated hosts (docs/switch.md "Replication"): paired once they have answered, each
/// with the live host keeping the fewest twins; a dead host's backup is promoted instead of
/// the host being withdrawn; the /48 (and the /112 of a page the dead host held) move to the
/// backup's link; the dead server backs nobody up any more; a failed promotion withdraws.
#[test]
fn replicated_hosts_fail_over_to_their_backups() {
    let mut c = controller();
    c.set_replicas(2).unwrap();
    assert!(c.set_replicas(3).is_err());
    for id in 1..=3 {
        // Registered before the switch to two copies: re-register to take the default.
        let spec = c.hosts().into_iter().find(|h| h.id == id).unwrap();
        c.register(spec).unwrap();
    }
    assert!(c.plan_pairings().is_empty(), "nobody has answered yet");
    for id in 1..=3 {
        c.health_result(id, stat(0, 100)).unwrap();
    }
    let plans = c.plan_pairings();
    let pairs: Vec<(u16, u16)> = plans.iter().map(|p| (p.host, p.backup)).collect();
    assert_eq!(pairs, [(1, 2), (2, 3), (3, 1)], "a ring: one twin each");
    for p in &plans {
        c.finish_pairing(p, Ok(()));
    }
    assert!(c.plan_pairings().is_empty());
    assert!(replication(&c, 1).paired);
    // A page of host 1 migrated to host 3 and back to... host 1 holds a page of host 2.
    let key = page_on(2).to_ipv6();
    c.finish_migration(&MigrationPlan {
        page: page_on(2),
        key,
        home: 2,
        from: 2,
        to: 1,
        prefix: NetPrefix::DEFAULT,
    })
    .unwrap();
    // Host 1 dies: no withdrawal; its backup (2) is to take over.
    for _ in 0..3 {
        c.health_result(1, timeout()).unwrap();
    }
    assert!(
        !down(&c, 1),
        "a replicated host fails over instead of being withdrawn"
    );
    let plans = c.plan_failovers();
    assert_eq!(plans.len(), 1);
    let p = &plans[0];
    assert_eq!((p.host, p.from, p.to, p.epoch), (1, 1, 2, 2));
    let stops = c.finish_failover(p, 100.0).unwrap();
    assert_eq!(
        stops,
        [3],
        "host 3's backup was host 1: its stream must stop"
    );
    c.stream_stopped(3, true);
    let routes = c.fabric.routes().unwrap();
    let net1 = NetPrefix::DEFAULT.host_network(bluebridge_proto::HostId(1));
    let r = routes
        .iter()
        .find(|(n, l, _)| (*n, *l) == (net1, 48))
        .unwrap();
    assert_eq!((r.2.dst_mac, r.2.reject), ([2, 0, 0, 0, 0, 2], false));
    let r = routes
        .iter()
        .find(|(n, l, _)| (*n, *l) == (key, 112))
        .unwrap();
    assert_eq!(r.2.dst_mac, [2, 0, 0, 0, 0, 2], "the migrated page follows");
    let r1 = replication(&c, 1);
    assert_eq!(
        (r1.holder, r1.backup, r1.epoch, r1.failovers),
        (2, None, 2, 1)
    );
    assert_eq!(c.failovers().len(), 1);
    assert!(replication(&c, 3).backup.is_none());
    // Host 1 now answers through host 2: health checks reach host 2, nothing is withdrawn.
    c.health_result(1, stat(1, 100)).unwrap();
    assert!(!down(&c, 1));
    // The next round finds new backups: for host 1 (held by 2) one that is not 2, for host 3
    // (whose backup died) one that is alive; each a new stream (a later epoch).
    let plans = c.plan_pairings();
    let pairs: Vec<(u16, u16, u32)> = plans.iter().map(|p| (p.host, p.backup, p.epoch)).collect();
    assert_eq!(pairs, [(1, 3, 3), (3, 2, 2)]);
    for p in &plans {
        c.finish_pairing(p, Err("not now".into()));
    }
    assert!(replication(&c, 1).note.is_some());
    assert!(
        c.plan_pairings().is_empty(),
        "a refused pairing is not retried every round"
    );
    // Host 2 (holding 1 and 2) dies with no backup in step for either: both withdrawn, and
    // both /48s reject at host 2's link.
    for _ in 0..3 {
        c.health_result(1, timeout()).unwrap();
        c.health_result(2, timeout()).unwrap();
    }
    let due = c.plan_failovers();
    assert_eq!(due.len(), 1, "host 2 still had its backup (3): {due:?}");
    c.abandon_failover(&due[0], "LEASE_EXPIRED").unwrap();
    assert!(down(&c, 1) && down(&c, 2));
    let routes = c.fabric.routes().unwrap();
    let r = routes
        .iter()
        .find(|(n, l, _)| (*n, *l) == (net1, 48))
        .unwrap();
    assert!(r.2.reject && r.2.dst_mac == [2, 0, 0, 0, 0, 2]);
}

/// Servers rarely die together: a round in which hosts of several servers are silent at once
/// (a stalled machine) is not counted, for a while; one server's silence is.
#[test]
fn several_servers_silent_at_once_are_not_dead_yet() {
    let mut c = controller();
    for id in 1..=3 {
        c.health_result(id, stat(0, 100)).unwrap();
    }
    let round = |c: &mut Controller, silent: &[u16]| {
        let r = (1..=3)
            .map(|id| {
                (
                    id,
                    if silent.contains(&id) {
                        timeout()
                    } else {
                        stat(0, 100)
                    },
                )
            })
            .collect();
        c.health_round(r).unwrap();
    };
    for _ in 0..10 {
        round(&mut c, &[1, 2]);
    }
    assert!(!down(&c, 1) && !down(&c, 2), "a stall is not a death");
    for _ in 0..3 {
        round(&mut c, &[2]);
    }
    assert!(down(&c, 2), "one silent server is withdrawn");
    for _ in 0..crate::STALLED_ROUNDS_MAX + 3 {
        round(&mut c, &[1, 3]);
    }
    assert!(
        down(&c, 1) && down(&c, 3),
        "servers that did die together, in the end"
    );
}
