//! Harness for the privileged end-to-end tests in `tests/`: a client namespace and a server
//! namespace joined by a veth pair, a real server (steering program, AF_XDP sockets, worker)
//! in one, a real client (its own steering program and socket) in the other. Everything is
//! removed when the [`Rig`] is dropped, also when a test fails.
#![forbid(unsafe_code)]

use std::net::Ipv6Addr;
use std::sync::mpsc;
use std::time::Duration;

use bluebridge_client::{
    AnyTransport, Client, Connect, TransportKind as ClientTransport, XdpTransport,
};
use bluebridge_proto::frame::{Endpoints, build};
use bluebridge_proto::{BbRepr, FRAME_OVERHEAD, HostId, MacAddr, NetPrefix, RemoteAddr, UDP_PORT};
use bluebridge_server::{Framing, Server, ServerConfig, TransportKind};
use bluebridge_topology::{NdpResponder, Pair, unique};

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
            None => Pair::create(&name, o.mtu),
            Some(seed) => Pair::create_impaired(&name, o.mtu, seed),
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
        let client = Client::new(ec, transport);
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

/// Starts a server inside namespace `ns` (from a helper thread, so the caller's namespace does
/// not change).
fn start_server(ns: &str, cfg: &ServerConfig) -> Server {
    let (ns, cfg) = (ns.to_owned(), cfg.clone());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = bluebridge_topology::enter(&ns)
            .map_err(|e| e.to_string())
            .and_then(|()| Server::start(&cfg).map_err(|e| format!("{e:#}")));
        tx.send(r).expect("the caller waits");
    });
    rx.recv()
        .expect("server thread")
        .unwrap_or_else(|e| panic!("starting the server: {e}"))
}
