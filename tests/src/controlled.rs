//! A rack whose switch is run by the controller (`bluebridge_switch::Controller`) with its own
//! link: hosts registered, optionally supervised (health checks, placement, invalidation),
//! servers started on demand. For the tests that migrate pages or watch the controller.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bluebridge_client::{AnyTransport, Client};
use bluebridge_proto::{HostId, NetPrefix};
use bluebridge_server::{Server, ServerConfig};
use bluebridge_switch::{Controller, HostSpec, LinkSpec, SuperviseConfig, supervise};
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
    /// Workers (shards) per server.
    pub queues: u32,
}

impl Default for RackOptions {
    fn default() -> Self {
        RackOptions {
            hosts: 3,
            clients: 1,
            interval: None,
            kernel: false,
            queues: 1,
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
    /// The topology.
    pub rack: Rack,
    queues: u32,
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
    }
}

impl ControlledRack {
    /// Builds the rack, registers its hosts and attaches the controller's link.
    pub fn new(o: RackOptions) -> ControlledRack {
        let rack = Rack::create_multiqueue(&unique("bbt"), o.hosts, 9000, o.queues)
            .expect("creating the rack (needs root)");
        let stop = Arc::new(AtomicBool::new(false));
        let (ctl_tx, ctl_rx) = std::sync::mpsc::channel();
        let (sw, hosts, stop2) = (rack.switch.clone(), rack.hosts.clone(), stop.clone());
        let link = LinkSpec {
            ifname: rack.controller_if.clone(),
            port: rack.controller_port.clone(),
        };
        // The supervisor must live in the switch namespace, so it is this thread.
        let thread = std::thread::spawn(move || {
            bluebridge_topology::enter(&sw).expect("entering the switch namespace");
            let mut ctl = if o.kernel {
                Controller::new_kernel(NetPrefix::DEFAULT).expect("the kernel backend")
            } else {
                Controller::new(NetPrefix::DEFAULT, false, false).expect("the XDP switch")
            };
            for (i, h) in hosts.iter().enumerate() {
                ctl.register(host_spec(h, i < o.clients))
                    .expect("registering a host");
            }
            ctl.set_misses_allowed(2);
            ctl.attach_link(&link).expect("the controller's link");
            let ctl = Arc::new(Mutex::new(ctl));
            ctl_tx.send(ctl.clone()).expect("the test thread");
            if let Some(interval) = o.interval {
                supervise(&ctl, SuperviseConfig { interval }, &stop2);
            }
        });
        let ctl = ctl_rx.recv().expect("the controller's set-up");
        let supervisor = if o.interval.is_some() {
            Some(thread)
        } else {
            thread.join().expect("the controller's set-up");
            None
        };
        ControlledRack {
            ctl,
            stop,
            supervisor,
            rack,
            queues: o.queues,
        }
    }

    /// A server on host index `i` (accepting what the switch routes to it).
    pub fn server(&self, i: usize) -> Server {
        let h = &self.rack.hosts[i];
        start_server(
            &h.ns,
            &ServerConfig {
                arena_bytes: 16 << 20,
                idle: true,
                sched_idle: false,
                hugepages: false,
                accept_routed: true,
                queues: (0..self.queues).collect(),
                ..ServerConfig::new(&h.server_if, HostId(h.host_id))
            },
        )
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

impl Drop for ControlledRack {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.supervisor.take() {
            let _ = t.join();
        }
    }
}
