//! A rack whose switch is run by the controller (`bluebridge_switch::Controller`) with its own
//! link: hosts registered, optionally supervised (health checks, placement, invalidation),
//! servers started on demand. For the tests that migrate pages or watch the controller.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bluebridge_client::{AnyTransport, Client, ClientError};
use bluebridge_proto::{HostId, NetPrefix, PAGE_SIZE};
use bluebridge_server::{Server, ServerConfig};
use bluebridge_switch::ovs::OvsFabric;
use bluebridge_switch::{Controller, HostSpec, LinkSpec, Migration, SuperviseConfig, supervise};
use bluebridge_topology::ovs::OvsSwitch;
use bluebridge_topology::{Rack, RackHost, fmt_mac, unique};

use crate::{rack_client, rack_client_net, start_server};

/// How to build a [`ControlledRack`].
#[derive(Debug, Clone, Copy)]
pub struct RackOptions {
    /// Hosts in the rack.
    pub hosts: usize,
    /// Hosts (from the first) whose client link is registered with the controller.
    pub clients: usize,
    /// Supervise (health checks, placement, invalidation) every `interval`; `None`: never.
    pub interval: Option<Duration>,
    /// Program the switch namespace's kernel forwarding table instead of the XDP switch.
    pub kernel: bool,
    /// Run an Open vSwitch (userspace datapath) in the switch namespace and program its
    /// OpenFlow tables instead of the XDP switch.
    pub ovs: bool,
    /// Workers (shards) per server.
    pub queues: u32,
    /// Pin the switch (under [`bluebridge_topology::PIN_BASE`]) so the controller can be
    /// killed and restarted ([`ControlledRack::restart_controller`]).
    pub pinned: bool,
    /// The registered clients' links pass through relays (`rack.relays`, unimpaired until
    /// set) that can lose, duplicate and reorder their frames.
    pub relayed: bool,
    /// Copies of every host's pages (1: none, 2: a backup each; docs/switch.md
    /// "Replication").
    pub replicas: u8,
    /// Health checks missed in a row before a host is declared dead.
    pub misses: u32,
}

impl Default for RackOptions {
    fn default() -> Self {
        RackOptions {
            hosts: 3,
            clients: 1,
            interval: None,
            kernel: false,
            ovs: false,
            queues: 1,
            pinned: false,
            relayed: false,
            replicas: 1,
            misses: 2,
        }
    }
}

/// A rack run by a controller; the supervisor (if any) stops when it is dropped, the topology
/// goes after it.
#[derive(Debug)]
pub struct ControlledRack {
    /// The controller (the supervisor thread shares it).
    pub ctl: Arc<Mutex<Controller>>,
    stop: Arc<AtomicBool>,
    supervisor: Option<std::thread::JoinHandle<()>>,
    /// The Open vSwitch of [`RackOptions::ovs`] (stopped before the namespaces go).
    pub ovs: Option<OvsSwitch>,
    /// The topology.
    pub rack: Rack,
    opts: RackOptions,
}

/// What [`ControlledRack::restart_controller`] saw.
#[derive(Debug)]
pub struct Restart {
    /// What the new controller adopted.
    pub adoption: bluebridge_switch::Adoption,
    /// The switch's routes when the old one died.
    pub routes: Vec<bluebridge_switch::RouteInfo>,
    /// Where new pages went then.
    pub placement: Option<u16>,
}

/// The controller's registration of rack host `h`, with its client link if `client`.
pub fn host_spec(h: &RackHost, client: bool) -> HostSpec {
    HostSpec {
        id: h.host_id,
        server_port: h.server_port.clone(),
        server_mac: fmt_mac(h.server_mac),
        client_port: client.then(|| h.client_port.clone()),
        client_mac: client.then(|| fmt_mac(h.client_mac)),
        client_net: client.then(|| format!("{}/64", rack_client_net(HostId(h.host_id)))),
        replicas: None,
    }
}

impl ControlledRack {
    /// Builds the rack, registers its hosts and attaches the controller's link.
    pub fn new(o: RackOptions) -> ControlledRack {
        let relayed = if o.relayed { o.clients } else { 0 };
        let rack = Rack::create_relayed(&unique("bbt"), o.hosts, 9000, o.queues, relayed, 7)
            .expect("creating the rack (needs root)");
        let stop = Arc::new(AtomicBool::new(false));
        let ovs = o.ovs.then(|| {
            let dir = std::env::temp_dir().join(format!("{}-ovs", rack.switch));
            OvsSwitch::start(&rack.switch, "bbr0", &dir).expect("Open vSwitch (openvswitch-switch)")
        });
        let (ctl, supervisor, adopted) = start_controller(&rack, o, &stop, ovs.as_ref());
        assert!(adopted.is_none(), "a new rack's pin directory was empty");
        ControlledRack {
            ctl,
            stop,
            supervisor,
            ovs,
            rack,
            opts: o,
        }
    }

    /// The pinned switch's directory.
    pub fn pin_dir(&self) -> std::path::PathBuf {
        pin_dir(&self.rack)
    }

    /// Kills the controller as a crash would (its supervisor stops, the process's part of the
    /// switch goes, the pinned switch stays), leaves the rack without one for `downtime`, and
    /// starts a new controller, which adopts the pinned switch. Every other handle on
    /// [`ControlledRack::ctl`] must be dropped first.
    pub fn restart_controller(&mut self, downtime: Duration) -> Restart {
        assert!(self.opts.pinned, "restarting needs RackOptions::pinned");
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.supervisor.take() {
            t.join().expect("the supervisor");
        }
        let detached = Controller::detached(NetPrefix::DEFAULT);
        let old = std::mem::replace(&mut self.ctl, Arc::new(Mutex::new(detached)));
        let mut old = Arc::try_unwrap(old)
            .expect("no other handle on the controller")
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let routes = old.routes().expect("the old controller's routes");
        let placement = old.status().iter().find(|s| s.placement).map(|s| s.id);
        old.keep_forwarding();
        drop(old);
        std::thread::sleep(downtime);
        self.stop = Arc::new(AtomicBool::new(false));
        let (ctl, supervisor, adopted) =
            start_controller(&self.rack, self.opts, &self.stop, self.ovs.as_ref());
        self.ctl = ctl;
        self.supervisor = supervisor;
        Restart {
            adoption: adopted.expect("the pinned switch was adopted"),
            routes,
            placement,
        }
    }

    /// A server on host index `i` (accepting what the switch routes to it).
    pub fn server(&self, i: usize) -> Server {
        start_server(&self.rack.hosts[i].ns, &self.server_config(i))
    }

    /// How [`ControlledRack::server`] configures host `i`'s server.
    pub fn server_config(&self, i: usize) -> ServerConfig {
        let h = &self.rack.hosts[i];
        ServerConfig {
            arena_bytes: 16 << 20,
            idle: true,
            sched_idle: false,
            hugepages: false,
            accept_routed: true,
            queues: (0..self.opts.queues).collect(),
            ..ServerConfig::new(&h.server_if, HostId(h.host_id))
        }
    }

    /// The first host's client (the calling thread moves into its namespace).
    pub fn client(&self, retries: u32) -> Client<AnyTransport> {
        self.client_on(0, retries)
    }

    /// Host `i`'s client (the calling thread moves into its namespace); its client link must
    /// be registered ([`RackOptions::clients`]).
    pub fn client_on(&self, i: usize, retries: u32) -> Client<AnyTransport> {
        rack_client(&self.rack, i, retries)
    }

    /// Waits (5 s at most) for `f` to hold of the controller.
    pub fn wait_for(&self, what: &str, f: &dyn Fn(&Controller) -> bool) {
        let t = std::time::Instant::now();
        while !f(&self.ctl.lock().unwrap()) {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "waiting for {what}: {:?}",
                self.ctl.lock().unwrap().status()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn pin_dir(rack: &Rack) -> std::path::PathBuf {
    std::path::Path::new(bluebridge_topology::PIN_BASE).join(&rack.switch)
}

type Started = (
    Arc<Mutex<Controller>>,
    Option<std::thread::JoinHandle<()>>,
    Option<bluebridge_switch::Adoption>,
);

/// Starts a controller for `rack` in its switch namespace: a new one registers the hosts, one
/// that adopted a pinned switch keeps what it found; either attaches its link and (with an
/// interval) supervises until `stop`.
fn start_controller(
    rack: &Rack,
    o: RackOptions,
    stop: &Arc<AtomicBool>,
    ovs: Option<&OvsSwitch>,
) -> Started {
    let ovs = ovs.map(|s| (s.bridge.clone(), s.rundir.clone()));
    let (ctl_tx, ctl_rx) = std::sync::mpsc::channel();
    let (sw, hosts, stop2) = (rack.switch.clone(), rack.hosts.clone(), stop.clone());
    let link = LinkSpec {
        ifname: rack.controller_if.clone(),
        port: rack.controller_port.clone(),
    };
    let pins = o.pinned.then(|| {
        bluebridge_topology::ensure_pin_base().expect("a bpf filesystem for the pins");
        pin_dir(rack)
    });
    // The supervisor must live in the switch namespace, so it is this thread.
    let thread = std::thread::spawn(move || {
        bluebridge_topology::enter(&sw).expect("entering the switch namespace");
        let (mut ctl, adopted) = match (&pins, o.kernel) {
            _ if ovs.is_some() => {
                let (bridge, dir) = ovs.as_ref().expect("checked");
                let f = OvsFabric::new(bridge, dir, NetPrefix::DEFAULT).expect("the OVS backend");
                (Controller::new_ovs(NetPrefix::DEFAULT, f), None)
            }
            (_, true) => (
                Controller::new_kernel(NetPrefix::DEFAULT).expect("the kernel backend"),
                None,
            ),
            (Some(dir), false) => Controller::new_pinned(NetPrefix::DEFAULT, false, false, dir)
                .expect("the pinned XDP switch"),
            (None, false) => (
                Controller::new(NetPrefix::DEFAULT, false, false).expect("the XDP switch"),
                None,
            ),
        };
        ctl.set_replicas(o.replicas).expect("1 or 2 replicas");
        if adopted.is_none() {
            for (i, h) in hosts.iter().enumerate() {
                ctl.register(host_spec(h, i < o.clients))
                    .expect("registering a host");
            }
        }
        ctl.set_misses_allowed(o.misses);
        ctl.attach_link(&link).expect("the controller's link");
        ctl.commit().expect("the routes in the forwarding plane");
        let ctl = Arc::new(Mutex::new(ctl));
        ctl_tx
            .send((ctl.clone(), adopted))
            .expect("the test thread");
        if let Some(interval) = o.interval {
            supervise(&ctl, SuperviseConfig { interval }, &stop2);
        }
    });
    let (ctl, adopted) = ctl_rx.recv().expect("the controller's set-up");
    let supervisor = if o.interval.is_some() {
        Some(thread)
    } else {
        thread.join().expect("the controller's set-up");
        None
    };
    (ctl, supervisor, adopted)
}

impl Drop for ControlledRack {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.supervisor.take() {
            let _ = t.join();
        }
    }
}

/// A page moves host 2 → 3 → 2 (home) → 3 while host 1's client writes a counter into it
/// and reads it back: nothing acknowledged is lost, requests that met a cut-over were
/// retried (MOVED), and the switch routes the page's /112 to host 3 in the end.
pub fn migrate_under_writes(o: RackOptions) {
    let rig = ControlledRack::new(o);
    let servers = [rig.server(1), rig.server(2)];
    let mut c = rig.client(12);
    let p = c.alloc(HostId(2), false).unwrap();
    let page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7) as u8).collect();
    c.write(p, 0, &page).unwrap();

    // Host 2 → 3 → 2 (home) → 3, while the client writes a counter and reads it back.
    let done = Arc::new(AtomicBool::new(false));
    let mover = {
        let (ctl, done) = (rig.ctl.clone(), done.clone());
        let addr = p.to_ipv6().to_string();
        std::thread::spawn(move || {
            let mut moves: Vec<Migration> = Vec::new();
            for to in [3u16, 2, 3] {
                std::thread::sleep(Duration::from_millis(30));
                moves
                    .push(bluebridge_switch::actions::migrate(&ctl, &addr, to).expect("migration"));
            }
            std::thread::sleep(Duration::from_millis(30));
            done.store(true, Ordering::Relaxed);
            moves
        })
    };
    let mut last = 0u64;
    while !done.load(Ordering::Relaxed) {
        last += 1;
        c.write(p, 0, &last.to_le_bytes())
            .unwrap_or_else(|e| panic!("write {last}: {e}"));
        let back = c.read_range(p, 0, 8).unwrap();
        assert_eq!(
            u64::from_le_bytes(back.try_into().unwrap()),
            last,
            "read after write {last}"
        );
    }
    let moves = mover.join().unwrap();
    assert_eq!(
        moves.iter().map(|m| (m.from, m.to)).collect::<Vec<_>>(),
        [(2, 3), (3, 2), (2, 3)]
    );
    // Nothing acknowledged was lost, nothing else changed.
    let data = c.read(p).unwrap();
    assert_eq!(u64::from_le_bytes(data[..8].try_into().unwrap()), last);
    assert_eq!(&data[8..], &page[8..]);
    let st = c.stats();
    assert!(
        st.moved_retries > 0,
        "requests met a cut-over and were retried: {st:?}"
    );
    assert_eq!(st.timeouts, 0);
    // The switch holds the page's /112 to host 3.
    let routes = rig.ctl.lock().unwrap().routes().unwrap();
    let r = routes
        .iter()
        .find(|r| r.prefix == format!("{}/112", p.to_ipv6()))
        .expect("the page's route");
    assert_eq!(r.port, rig.rack.hosts[2].server_port);
    // It is host 3's now: freed there, a typed error after.
    c.free(p).unwrap();
    assert!(matches!(c.read(p), Err(ClientError::StaleHandle)));
    eprintln!("{last} writes; migrations: {moves:?}");
    drop(servers);
}
