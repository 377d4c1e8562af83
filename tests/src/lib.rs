//! Harness for the privileged end-to-end tests in `tests/`: a client namespace and a server
//! namespace joined by a veth pair, a real server (steering program, AF_XDP sockets, worker)
//! in one, a real client (its own steering program and socket) in the other. Everything is
//! removed when the [`Rig`] is dropped, also when a test fails. [`RackRig`]: the same around
//! the XDP top-of-rack switch.
#![forbid(unsafe_code)]

pub mod controlled;

use std::net::Ipv6Addr;
use std::time::Duration;

use bluebridge_client::{
    AnyTransport, Client, Connect, TransportKind as ClientTransport, XdpTransport,
};
use bluebridge_ebpf::{Route, Tor};
use bluebridge_proto::frame::{Endpoints, build};
use bluebridge_proto::{BbRepr, FRAME_OVERHEAD, HostId, MacAddr, NetPrefix, RemoteAddr, UDP_PORT};
use bluebridge_server::{Framing, Server, ServerConfig, TransportKind};
use bluebridge_topology::{NdpResponder, Pair, Rack, unique};
pub use bluebridge_topology::{rack_client_addr, rack_client_net};

/// Bulk writes as `Client::write_bulk` takes them, borrowed from owned ones.
pub fn borrowed_writes(writes: &[(RemoteAddr, u16, Vec<u8>)]) -> Vec<(RemoteAddr, u16, &[u8])> {
    writes
        .iter()
        .map(|(p, o, d)| (*p, *o, d.as_slice()))
        .collect()
}

/// `target/<profile>/<path>`, a file a build step made (binaries, examples), checked to
/// exist; `how` says which step makes it.
pub fn built(path: &str, how: &str) -> std::path::PathBuf {
    // target/<profile>/deps/<test>-… → target/<profile>
    let exe = std::env::current_exe().expect("the test's path");
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("tests run from target/<profile>/deps");
    let bin = dir.join(path);
    assert!(
        bin.exists(),
        "{} is missing: {how} first (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// The server's host id in every rig.
pub const SERVER: HostId = HostId(2);
/// The client's address (host 1).
pub fn client_addr() -> Ipv6Addr {
    "fd00:bb:1::1".parse().expect("literal")
}

/// A running client/server pair. Fields drop in order: client, server (workers joined, XDP
/// detached), then the topology. A test may move `client` out (e.g. into a `RemoteRegion`);
/// the rest still cleans up.
#[derive(Debug)]
pub struct Rig {
    /// The client, in the client namespace (the test's thread is moved there).
    pub client: Client<AnyTransport>,
    /// The server; `None` once stopped.
    pub server: Option<Server>,
    /// How the server was started (for restarts).
    pub server_config: ServerConfig,
    /// The NDP proxy of the prototype configuration (dropped before the topology).
    pub ndp: Option<NdpResponder>,
    /// The topology; dropped last.
    pub pair: Pair,
}

/// Options of a rig.
#[derive(Debug, Clone)]
pub struct RigOptions {
    /// Link MTU.
    pub mtu: u16,
    /// Server framing.
    pub framing: Framing,
    /// Client multi-buffer.
    pub client_multi_buffer: bool,
    /// Arena bytes.
    pub arena_bytes: u64,
    /// Server lease table size.
    pub max_leases: u16,
    /// Client prefixes the server accepts (empty: any).
    pub allowed_clients: Vec<bluebridge_server::access::ClientPrefix>,
    /// Join the hosts through an impairment relay with this seed (see
    /// `bluebridge_topology::Relay`).
    pub relay_seed: Option<u64>,
    /// Client retransmission timeout.
    pub rto: Duration,
    /// Client retransmissions before a timeout.
    pub retries: u32,
    /// The server's transport.
    pub server_transport: TransportKind,
    /// The client uses the kernel-UDP transport instead of AF_XDP.
    pub client_udp: bool,
    /// Route like the 2017 prototype (page addresses on-link, an NDP proxy answering for all
    /// of them); needs `client_udp` and a UDP server.
    pub prototype_ndp: bool,
    /// RX/TX queues of the veth pair: the server runs one worker (shard) per queue and the
    /// AF_XDP client a socket per queue (with `relay_seed`: the server's link only).
    pub queues: u32,
    /// Preferred busy polling on the server's sockets.
    pub busy_poll: Option<bluebridge_xsk::BusyPoll>,
    /// How long the server lets a page owner stay silent before freeing its pages (ms).
    pub orphan_grace_ms: u64,
    /// The server's XDP hot-page store, bytes (0: none).
    pub xdp_cache_bytes: u64,
}

impl Default for RigOptions {
    fn default() -> Self {
        RigOptions {
            mtu: 9000,
            framing: Framing::Auto,
            client_multi_buffer: true,
            arena_bytes: 16 << 20,
            max_leases: 16,
            allowed_clients: Vec::new(),
            relay_seed: None,
            // Generous: tests share two CPUs with each other.
            rto: Duration::from_millis(5),
            retries: 10,
            server_transport: TransportKind::Xdp,
            client_udp: false,
            prototype_ndp: false,
            queues: 1,
            busy_poll: None,
            orphan_grace_ms: bluebridge_server::DEFAULT_GRACE_MS,
            xdp_cache_bytes: 0,
        }
    }
}

impl Rig {
    /// Builds the topology, starts the server in its namespace (unpinned, idle mode: tests run
    /// in parallel on few cores) and moves the calling thread into the client namespace to
    /// open the client.
    pub fn new(o: &RigOptions) -> Rig {
        let name = unique("bbt");
        let pair = match o.relay_seed {
            None => Pair::create_multiqueue(&name, o.mtu, o.queues),
            Some(seed) => Pair::create_impaired_multiqueue(&name, o.mtu, seed, o.queues),
        }
        .expect("creating namespaces and veth (needs root)");
        let cfg = ServerConfig {
            arena_bytes: o.arena_bytes,
            framing: o.framing,
            // Tests run in parallel on few cores: no pinning, sleep when idle, normal priority.
            idle: true,
            sched_idle: false,
            frames: 4096,
            hugepages: false,
            transport: o.server_transport,
            max_leases: o.max_leases,
            allowed_clients: o.allowed_clients.clone(),
            queues: (0..o.queues.max(1)).collect(),
            busy_poll: o.busy_poll,
            orphan_grace_ms: o.orphan_grace_ms,
            xdp_cache_bytes: o.xdp_cache_bytes,
            ..ServerConfig::new(&pair.server.ifname, SERVER)
        };
        let mut ndp = None;
        if o.prototype_ndp {
            assert!(
                o.client_udp && o.server_transport == TransportKind::Udp,
                "the prototype ran on kernel UDP"
            );
            ndp = Some(
                pair.route_prototype("fd00:bb:1::1", "fd00:bb:1::/48", "fd00:bb:2::/48")
                    .expect("prototype routes and NDP proxy"),
            );
        } else if o.server_transport == TransportKind::Udp || o.client_udp {
            pair.route_kernel_udp(
                "fd00:bb::/32",
                "fd00:bb:1::1",
                "fd00:bb:1::/48",
                "fd00:bb:2::/48",
            )
            .expect("kernel routes for the UDP transport");
        }
        let server = start_server(&pair.server.ns, &cfg);
        let client = pair_client(&pair, o);
        Rig {
            client,
            server: Some(server),
            server_config: cfg,
            ndp,
            pair,
        }
    }

    /// A request frame from the client to `dst`, as the client's transport would send it
    /// (for raw injection with `send_raw`), and its endpoints.
    pub fn raw_request(
        &self,
        dst: RemoteAddr,
        header: &BbRepr,
        payload: &[u8],
    ) -> (Vec<u8>, Endpoints) {
        let ep = Endpoints {
            src_mac: MacAddr(self.pair.client.mac),
            dst_mac: MacAddr(self.pair.server.mac),
            src: client_addr(),
            dst: dst.to_ipv6(),
            src_port: 40000,
            dst_port: UDP_PORT,
        };
        let mut f = vec![0u8; FRAME_OVERHEAD + payload.len()];
        build(&mut f, &ep, header, payload).expect("sized for the frame");
        (f, ep)
    }

    /// The client's AF_XDP transport (raw frames, counters); panics for a UDP client.
    pub fn xdp(&mut self) -> &mut XdpTransport {
        self.client
            .transport_mut()
            .xdp_mut()
            .expect("an AF_XDP client")
    }

    /// Stops the server (workers joined, XDP detached).
    pub fn stop_server(&mut self) {
        self.server.take();
    }

    /// Starts a new server with the same configuration (a fresh store: the old pages and
    /// handle key are gone, as after a server restart).
    pub fn start_server(&mut self) {
        assert!(self.server.is_none(), "stop the server first");
        self.server = Some(start_server(&self.pair.server.ns, &self.server_config));
    }

    /// The running server.
    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("server running")
    }
}

/// Moves the calling thread into `pair`'s client namespace and opens a client there, at
/// [`client_addr`], as `o` says (transport, multi-buffer, timeouts).
pub fn pair_client(pair: &Pair, o: &RigOptions) -> Client<AnyTransport> {
    pair.client_ns()
        .enter()
        .expect("entering the client namespace");
    let connect = Connect {
        kind: if o.client_udp {
            ClientTransport::Udp
        } else {
            ClientTransport::Xdp
        },
        ifname: pair.client.ifname.clone(),
        local: client_addr(),
        next_hop_mac: Some(MacAddr(pair.server.mac)),
        prefix: NetPrefix::DEFAULT,
        segments: !o.client_multi_buffer,
    };
    let (transport, mut ec) = connect
        .open()
        .unwrap_or_else(|e| panic!("opening the client transport: {e}"));
    ec.rto = o.rto;
    ec.retries = o.retries;
    Client::new(ec, transport)
}

/// Starts a server inside namespace `ns` (from a helper thread, so the caller's namespace does
/// not change).
pub fn start_server(ns: &str, cfg: &ServerConfig) -> Server {
    bluebridge_topology::run_in(ns, || Server::start(cfg).map_err(|e| format!("{e:#}")))
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .unwrap_or_else(|e| panic!("starting the server: {e}"))
}

/// A rack around the XDP switch: every host's server and client ports registered, each host's
/// /48 routed to its server link and its client /64 to its client link, sources restricted to
/// those prefixes; servers running on the hosts in `servers` (indices).
#[derive(Debug)]
pub struct RackRig {
    /// The switch program (its ports were set up inside the switch namespace).
    pub tor: Tor,
    /// Port interface indices per host: (server port, client port).
    pub ports: Vec<(u32, u32)>,
    /// Running servers, by host index.
    pub servers: Vec<(usize, Server)>,
    /// The topology; dropped last.
    pub rack: Rack,
}

impl RackRig {
    /// Builds a rack of `hosts` hosts (MTU 9000) and starts servers on the hosts listed.
    pub fn new(hosts: usize, servers: &[usize]) -> RackRig {
        let rack =
            Rack::create(&unique("bbt"), hosts, 9000).expect("creating the rack (needs root)");
        let (sw, hs) = (rack.switch.clone(), rack.hosts.clone());
        let (tor, ports) = std::thread::spawn(move || {
            bluebridge_topology::enter(&sw).expect("entering the switch namespace");
            let mut tor = Tor::load().expect("loading tor.bpf.o (needs root)");
            let mut ports = Vec::new();
            for h in &hs {
                let s = tor.add_port(&h.server_port, false).expect("server port");
                let c = tor.add_port(&h.client_port, false).expect("client port");
                ports.push((s, c));
            }
            (tor, ports)
        })
        .join()
        .expect("switch set-up");
        let mut rig = RackRig {
            tor,
            ports,
            servers: Vec::new(),
            rack,
        };
        for i in 0..hosts {
            rig.route_host(i);
        }
        for &i in servers {
            let h = &rig.rack.hosts[i];
            let cfg = ServerConfig {
                arena_bytes: 16 << 20,
                idle: true,
                sched_idle: false,
                frames: 4096,
                hugepages: false,
                ..ServerConfig::new(&h.server_if, HostId(h.host_id))
            };
            let server = start_server(&h.ns, &cfg);
            rig.servers.push((i, server));
        }
        rig
    }

    /// Host `i`'s routes and allowed sources: its /48 to the server link, its client /64 to
    /// the client link (route ids 2i and 2i + 1).
    pub fn route_host(&mut self, i: usize) {
        let h = self.rack.hosts[i].clone();
        let id = HostId(h.host_id);
        let (sp, cp) = self.ports[i];
        let net = NetPrefix::DEFAULT.host_network(id);
        self.tor.allow_source(sp, net, 48).expect("server source");
        self.tor
            .allow_source(cp, rack_client_net(id), 64)
            .expect("client source");
        self.tor
            .add_route(
                net,
                48,
                Route {
                    ifindex: sp,
                    dst_mac: h.server_mac,
                    src_mac: h.server_port_mac,
                    id: 2 * i as u32,
                    reject: false,
                },
            )
            .expect("host route");
        self.tor
            .add_route(
                rack_client_net(id),
                64,
                Route {
                    ifindex: cp,
                    dst_mac: h.client_mac,
                    src_mac: h.client_port_mac,
                    id: 2 * i as u32 + 1,
                    reject: false,
                },
            )
            .expect("client route");
    }

    /// A client on host `i` (the calling thread moves into its namespace).
    pub fn client(&self, i: usize) -> Client<AnyTransport> {
        rack_client(&self.rack, i, 10)
    }
}

/// An AF_XDP client on rack host `i`'s client link (the calling thread moves into the host's
/// namespace): 5 ms RTO, `retries` retries.
pub fn rack_client(rack: &Rack, i: usize, retries: u32) -> Client<AnyTransport> {
    let h = &rack.hosts[i];
    rack.host_ns(i).enter().expect("entering the host");
    let connect = Connect {
        kind: ClientTransport::Xdp,
        ifname: h.client_if.clone(),
        local: rack_client_addr(HostId(h.host_id)),
        next_hop_mac: Some(MacAddr(h.client_port_mac)),
        prefix: NetPrefix::DEFAULT,
        segments: false,
    };
    let (t, mut ec) = connect
        .open()
        .unwrap_or_else(|e| panic!("opening the client transport: {e}"));
    ec.rto = Duration::from_millis(5);
    ec.retries = retries;
    Client::new(ec, t)
}

/// A bare BlueBridge request frame (no payload) from `src` to `dst`, hop limit 1 if
/// `hop_limit_probe`: for sending raw into a switch.
pub fn bare_frame(src: Ipv6Addr, dst: Ipv6Addr, hop_limit_probe: bool) -> Vec<u8> {
    let ep = Endpoints {
        src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
        dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
        src,
        dst,
        src_port: 40000,
        dst_port: UDP_PORT,
    };
    let mut f = vec![0u8; FRAME_OVERHEAD];
    let h = BbRepr {
        count: 1,
        request_id: 99,
        ..Default::default()
    };
    build(&mut f, &ep, &h, &[]).expect("a bare frame");
    if hop_limit_probe {
        f[21] = 1;
    }
    f
}
