//! Replicated hosts over real packets (docs/switch.md "Replication", docs/protocol.md §5.19):
//! a rack of 4 hosts whose controller pairs every host with a backup; a primary dies while a
//! client writes pages and counts with FETCH_ADD, and its backup takes over: every
//! acknowledged write is read back, the counter is exact, the client saw retransmissions and
//! no error. The same under 5% loss on the client's link. A primary cut off from the switch
//! (alive) is fenced: when it comes back nothing it sends reaches anyone.

use std::time::{Duration, Instant};

use bluebridge_proto::{HostId, PAGE_SIZE, RemoteAddr};
use bluebridge_server::Server;
use bluebridge_switch::{Controller, HostStatus};
use bluebridge_tests::controlled::{ControlledRack, RackOptions};

/// The tests of this file run one at a time: four racks of four busy servers at once on two
/// vCPUs keep servers off their CPUs for longer than the health checks allow, and they fail
/// over hosts that are alive (nothing is lost then either, but the tests count failovers).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn status(c: &Controller, id: u16) -> HostStatus {
    c.status().into_iter().find(|h| h.id == id).unwrap()
}

/// A rack of 4 hosts, every host's pages replicated, checked every 10 ms (8 misses in a row:
/// dead; with fewer, a server that the busy 2-vCPU VM (4 servers, a busy-polling client, the
/// relay's threads) keeps off its CPU for a few tens of ms now and then looks dead), a server
/// on every host, all paired.
fn replicated_rack(relayed: bool) -> (ControlledRack, Vec<Option<Server>>) {
    let rig = ControlledRack::new(RackOptions {
        hosts: 4,
        interval: Some(Duration::from_millis(10)),
        replicas: 2,
        misses: 8,
        relayed,
        ..RackOptions::default()
    });
    let servers = (0..4).map(|i| Some(rig.server(i))).collect();
    rig.wait_for("every host paired with a backup", &|c| {
        (1..=4).all(|id| status(c, id).replication.paired)
    });
    (rig, servers)
}

/// The page bytes written in round `k`: `k` in the first word, a pattern after it.
fn round_bytes(k: u64) -> Vec<u8> {
    let mut b: Vec<u8> = (0..PAGE_SIZE).map(|i| (i as u64 * 13 + k) as u8).collect();
    b[..8].copy_from_slice(&k.to_le_bytes());
    b
}

/// Writes `pages` round after round and counts on `counter`; host index `victim`'s server
/// dies after `before` rounds (`kill` does it); checks that after `after` more rounds every
/// page reads back as last acknowledged and the counter as often added. Returns the client's
/// retransmissions.
fn write_through_a_failover(
    rig: &ControlledRack,
    servers: &mut [Option<Server>],
    victim: usize,
    kill: &dyn Fn(&mut Option<Server>),
) -> u64 {
    let victim_id = rig.rack.hosts[victim].host_id;
    let backup = status(&rig.ctl.lock().unwrap(), victim_id)
        .replication
        .backup
        .expect("paired");
    let mut c = rig.client(40);
    // Its CPU goes to the servers between polls: 4 servers and a client share 2 vCPUs.
    c.set_yield_when_idle(true);
    let pages: Vec<RemoteAddr> = (0..8)
        .map(|_| c.alloc(HostId(victim_id), false).expect("ALLOC"))
        .collect();
    let counter = c.alloc(HostId(victim_id), false).expect("ALLOC");
    let mut last = vec![None; pages.len()];
    let mut adds = 0u64;
    let (before, after) = (150u64, 250u64);
    let mut killed_at = None;
    for k in 0..before + after {
        if k == before {
            kill(&mut servers[victim]);
            killed_at = Some(Instant::now());
        }
        let i = (k as usize) % pages.len();
        c.write(pages[i], 0, &round_bytes(k)).unwrap_or_else(|e| {
            panic!(
                "round {k}: WRITE failed across the failover: {e}; {:?}",
                rig.ctl.lock().unwrap().status()
            )
        });
        last[i] = Some(k);
        let old = c
            .fetch_add(counter, 0, 1)
            .unwrap_or_else(|e| panic!("round {k}: FETCH_ADD failed across the failover: {e}"));
        assert_eq!(old, adds, "round {k}: FETCH_ADD ran twice or was lost");
        adds += 1;
    }
    let window = killed_at.unwrap().elapsed();
    for (i, p) in pages.iter().enumerate() {
        let want = round_bytes(last[i].unwrap());
        assert_eq!(
            c.read(*p).expect("READ from the backup"),
            want,
            "page {i}: the last acknowledged write"
        );
    }
    let mut word = [0u8; 8];
    word.copy_from_slice(&c.read_range(counter, 0, 8).unwrap());
    assert_eq!(u64::from_le_bytes(word), adds, "the counter is exact");
    let ctl = rig.ctl.lock().unwrap();
    let f = ctl.failovers();
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!((f[0].host, f[0].to), (victim_id, backup));
    let s = status(&ctl, victim_id);
    assert_eq!(s.replication.holder, backup);
    assert!(!s.health.down, "failed over, not withdrawn: {s:?}");
    let st = c.stats();
    println!(
        "failover of host {victim_id} to host {backup}: detection {:.1} ms, promotion {:.0} µs, \
         route change {:.0} µs; {after} rounds after the kill took {:.0} ms; client: {} \
         retransmissions, {} timeouts",
        f[0].detect_ms,
        f[0].promote_us,
        f[0].route_us,
        window.as_secs_f64() * 1e3,
        st.retransmits,
        st.timeouts
    );
    assert_eq!(st.timeouts, 0);
    st.retransmits
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_dead_primarys_backup_takes_over_with_every_acknowledged_write() {
    let _serial = serial();
    let (rig, mut servers) = replicated_rack(false);
    let retransmits = write_through_a_failover(&rig, &mut servers, 2, &|s| drop(s.take()));
    assert!(
        retransmits > 0,
        "the client must have waited out the failover"
    );
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_failover_under_loss_costs_retransmissions_only() {
    let _serial = serial();
    let (rig, mut servers) = replicated_rack(true);
    rig.rack.relays[0].set(bluebridge_topology::Impairment {
        loss: 0.05,
        ..bluebridge_topology::Impairment::NONE
    });
    write_through_a_failover(&rig, &mut servers, 3, &|s| drop(s.take()));
    let lost: u64 = rig.rack.relays[0]
        .counters
        .iter()
        .map(|c| c.lost.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert!(lost > 0, "the relay lost frames");
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_cut_off_primary_is_fenced_when_it_comes_back() {
    let _serial = serial();
    use bluebridge_client::{Connect, TransportKind};
    use bluebridge_proto::frame::{Endpoints, build};
    use bluebridge_proto::{BbRepr, HeaderFlags, MacAddr, NetPrefix, Opcode, PageHandle};

    let (rig, mut servers) = replicated_rack(false);
    let victim = 1;
    let h = rig.rack.hosts[victim].clone();
    let sw = rig.rack.switch.clone();
    let link = |state: &str| {
        bluebridge_topology::ip_in(&sw, &["link", "set", "dev", &h.server_port, state]).unwrap();
    };
    // Cut off, not dead: its health checks go unanswered and its backup takes over.
    write_through_a_failover(&rig, &mut servers, victim, &|_| link("down"));
    // It comes back and answers for one of its old pages as if it still held it (its
    // socket taken over here to say exactly that): the switch lets none of it through.
    drop(servers[victim].take());
    link("up");
    let spoofed = || rig.ctl.lock().unwrap().counters().unwrap().switch.spoofed;
    let before = spoofed();
    rig.rack.host_ns(victim).enter().unwrap();
    let (mut t, _) = Connect {
        kind: TransportKind::Xdp,
        ifname: h.server_if.clone(),
        local: NetPrefix::DEFAULT.host_network(HostId(h.host_id)),
        next_hop_mac: Some(MacAddr(h.server_port_mac)),
        prefix: NetPrefix::DEFAULT,
        segments: false,
    }
    .open()
    .expect("a socket on the old primary's link");
    let x = t.xdp_mut().expect("AF_XDP");
    let page = RemoteAddr::new(
        NetPrefix::DEFAULT,
        HostId(h.host_id),
        PageHandle::from_bits(0x0100_0000_0000_0001),
        Opcode::READ,
        bluebridge_proto::OpFlags::NONE,
    );
    let ep = Endpoints {
        src_mac: MacAddr(x.mac()),
        dst_mac: MacAddr(h.server_port_mac),
        src: page.to_ipv6(),
        dst: bluebridge_tests::rack_client_addr(HostId(rig.rack.hosts[0].host_id)),
        src_port: bluebridge_proto::UDP_PORT,
        dst_port: 40000,
    };
    let hdr = BbRepr {
        flags: HeaderFlags::REPLY,
        count: 1,
        request_id: 1 << 7,
        length: 8,
        ..BbRepr::default()
    };
    let mut frame = vec![0u8; 256];
    let n = build(&mut frame, &ep, &hdr, &[0xee; 8]).unwrap();
    for _ in 0..10 {
        assert!(x.send_raw(&frame[..n]));
    }
    let t0 = Instant::now();
    while spoofed() < before + 10 {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "the old primary's frames got through the switch: spoofed {before} → {}",
            spoofed()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_host_re_replicated_after_a_failover_survives_a_second_one() {
    let _serial = serial();
    let (rig, mut servers) = replicated_rack(false);
    let index = |id: u16| rig.rack.hosts.iter().position(|h| h.host_id == id).unwrap();
    let p = rig.rack.hosts[2].host_id;
    let mut c = rig.client(40);
    c.set_yield_when_idle(true);
    let pages: Vec<RemoteAddr> = (0..8).map(|_| c.alloc(HostId(p), false).unwrap()).collect();
    let counter = c.alloc(HostId(p), false).unwrap();
    let mut adds = 0;
    let mut round = |c: &mut bluebridge_client::Client<_>, k: u64| {
        for (i, page) in pages.iter().enumerate() {
            c.write(*page, 0, &round_bytes(k + i as u64))
                .unwrap_or_else(|e| panic!("round {k}: {e}"));
        }
        assert_eq!(c.fetch_add(counter, 0, 1).unwrap(), adds);
        adds += 1;
    };
    round(&mut c, 0);
    // The primary dies; its backup takes over, then copies the pages to a new backup in the
    // background while the client goes on.
    let first = status(&rig.ctl.lock().unwrap(), p)
        .replication
        .backup
        .unwrap();
    drop(servers[2].take());
    for k in 1..20 {
        round(&mut c, k * 100);
    }
    rig.wait_for("the pages re-replicated from their new holder", &|ctl| {
        let r = status(ctl, p).replication;
        r.holder == first && r.paired && r.backup.is_some_and(|b| b != first) && r.copy_total == 0
    });
    std::thread::sleep(Duration::from_millis(100));
    let second = status(&rig.ctl.lock().unwrap(), p)
        .replication
        .backup
        .unwrap();
    round(&mut c, 5000);
    // The new holder dies too: the copy takes over.
    drop(servers[index(first)].take());
    round(&mut c, 6000);
    for (i, page) in pages.iter().enumerate() {
        assert_eq!(
            c.read(*page).unwrap(),
            round_bytes(6000 + i as u64),
            "page {i}"
        );
    }
    let mut word = [0u8; 8];
    word.copy_from_slice(&c.read_range(counter, 0, 8).unwrap());
    assert_eq!(u64::from_le_bytes(word), adds);
    let ctl = rig.ctl.lock().unwrap();
    let f: Vec<(u16, u16)> = ctl
        .failovers()
        .iter()
        .filter(|f| f.host == p)
        .map(|f| (f.from, f.to))
        .collect();
    assert_eq!(f, [(p, first), (first, second)]);
    assert_eq!(c.stats().timeouts, 0);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_restarted_controller_learns_the_pairings_and_fails_over() {
    let _serial = serial();
    let mut rig = ControlledRack::new(RackOptions {
        hosts: 4,
        interval: Some(Duration::from_millis(10)),
        replicas: 2,
        misses: 8,
        pinned: true,
        ..RackOptions::default()
    });
    let mut servers: Vec<Option<Server>> = (0..4).map(|i| Some(rig.server(i))).collect();
    rig.wait_for("every host paired with a backup", &|c| {
        (1..=4).all(|id| status(c, id).replication.paired)
    });
    let before: Vec<(u16, Option<u16>)> = {
        let c = rig.ctl.lock().unwrap();
        (1..=4)
            .map(|id| (id, status(&c, id).replication.backup))
            .collect()
    };
    // The controller dies and comes back: the pairings live on in the servers, and the new
    // controller reads them from their STAT answers.
    let restart = rig.restart_controller(Duration::from_millis(200));
    assert_eq!(restart.adoption.hosts, 4);
    rig.wait_for("the pairings learnt again", &|c| {
        (1..=4).all(|id| {
            let r = status(c, id).replication;
            r.paired && r.replicas == 2 && before.contains(&(id, r.backup))
        })
    });
    // And it fails a dead primary over to the backup it learnt.
    write_through_a_failover(&rig, &mut servers, 2, &|s| drop(s.take()));
}
