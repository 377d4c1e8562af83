//! A rack: one switch namespace and N host namespaces around it. Every host has two links to
//! the switch, one for its server and one for its client (each runs its own XDP program and
//! AF_XDP socket, and an interface holds one XDP program).

use std::net::Ipv6Addr;

use bluebridge_proto::{HostId, NetPrefix};

use crate::{Netns, TopologyError, configure_link, fmt_mac, ip};

/// The /64 of rack host `id`'s client link, inside its /48: `fd00:bb:<id>:ffff::/64` (the
/// switch routes it to the client link, the rest of the /48 to the server link).
pub fn rack_client_net(id: HostId) -> Ipv6Addr {
    let mut o = NetPrefix::DEFAULT.host_network(id).octets();
    o[6] = 0xff;
    o[7] = 0xff;
    Ipv6Addr::from(o)
}

/// The address of rack host `id`'s client: `fd00:bb:<id>:ffff::1`.
pub fn rack_client_addr(id: HostId) -> Ipv6Addr {
    let mut o = rack_client_net(id).octets();
    o[15] = 1;
    Ipv6Addr::from(o)
}

/// One host of a rack.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RackHost {
    /// BlueBridge host id of its server (1-based: host i of the rack is id i + 1).
    pub host_id: u16,
    /// Its namespace.
    pub ns: String,
    /// The server's interface (in `ns`).
    pub server_if: String,
    /// The server interface's MAC.
    pub server_mac: [u8; 6],
    /// The switch port the server interface is cabled to (in the switch namespace).
    pub server_port: String,
    /// That port's MAC: the server's next hop.
    pub server_port_mac: [u8; 6],
    /// The client's interface (in `ns`).
    pub client_if: String,
    /// The client interface's MAC.
    pub client_mac: [u8; 6],
    /// The switch port of the client interface.
    pub client_port: String,
    /// That port's MAC: the client's next hop.
    pub client_port_mac: [u8; 6],
}

/// A switch namespace `<name>-sw` and hosts `<name>-h<i>`; everything is removed on drop.
#[derive(Debug)]
pub struct Rack {
    /// The hosts, in order.
    pub hosts: Vec<RackHost>,
    /// The switch namespace's name.
    pub switch: String,
    /// The controller's own link, both ends in the switch namespace: its interface (where the
    /// controller's client talks to the servers) ...
    pub controller_if: String,
    /// ... and the switch port it is cabled to.
    pub controller_port: String,
    // Dropped last: hosts first (their veths go with them), then the switch.
    _host_ns: Vec<Netns>,
    _switch_ns: Netns,
}

/// `02:bb:<kind>:<i hi>:<i lo>:<side>`: readable in captures. Kind 1 server link, 2 client link,
/// 3 the controller's link; side 1 the host end, 2 the switch port.
fn mac(kind: u8, i: usize, side: u8) -> [u8; 6] {
    [0x02, 0xbb, kind, (i >> 8) as u8, i as u8, side]
}

impl Rack {
    /// Creates the rack: `hosts` hosts (at most 4,000), links at `mtu`. Interface names stay
    /// within 15 bytes for names up to 9 bytes.
    pub fn create(name: &str, hosts: usize, mtu: u16) -> Result<Rack, TopologyError> {
        Self::create_multiqueue(name, hosts, mtu, 1)
    }

    /// Like [`Rack::create`], with `server_queues` queues on every host's server link (for
    /// servers with a worker per queue; the switch's redirects land on any of them).
    pub fn create_multiqueue(
        name: &str,
        hosts: usize,
        mtu: u16,
        server_queues: u32,
    ) -> Result<Rack, TopologyError> {
        if hosts == 0 || hosts > 4000 {
            return Err(TopologyError::Command {
                cmd: "Rack::create".into(),
                stderr: format!("{hosts} hosts: a rack has 1 to 4,000"),
            });
        }
        let switch_ns = Netns::create(&format!("{name}-sw"))?;
        let (controller_if, controller_port) = (format!("{name}k"), format!("{name}K"));
        ip(&[
            "link",
            "add",
            &controller_if,
            "netns",
            switch_ns.name(),
            "address",
            &fmt_mac(mac(3, 0, 1)),
            "type",
            "veth",
            "peer",
            "name",
            &controller_port,
            "netns",
            switch_ns.name(),
            "address",
            &fmt_mac(mac(3, 0, 2)),
        ])?;
        for i in [&controller_if, &controller_port] {
            configure_link(switch_ns.name(), i, mtu)?;
        }
        let mut host_ns = Vec::with_capacity(hosts);
        let mut out = Vec::with_capacity(hosts);
        for i in 0..hosts {
            let ns = Netns::create(&format!("{name}-h{i}"))?;
            let mut links = Vec::new();
            for (kind, tag) in [(1u8, 's'), (2u8, 'c')] {
                let host_if = format!("{name}{tag}{i}");
                let port = format!("{name}{}{i}", tag.to_ascii_uppercase());
                let (hmac, pmac) = (mac(kind, i, 1), mac(kind, i, 2));
                let q = if kind == 1 { server_queues.max(1) } else { 1 }.to_string();
                ip(&[
                    "link",
                    "add",
                    &host_if,
                    "netns",
                    ns.name(),
                    "address",
                    &fmt_mac(hmac),
                    "numtxqueues",
                    &q,
                    "numrxqueues",
                    &q,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &port,
                    "netns",
                    switch_ns.name(),
                    "address",
                    &fmt_mac(pmac),
                    "numtxqueues",
                    &q,
                    "numrxqueues",
                    &q,
                ])?;
                configure_link(ns.name(), &host_if, mtu)?;
                configure_link(switch_ns.name(), &port, mtu)?;
                links.push((host_if, hmac, port, pmac));
            }
            let [
                (server_if, server_mac, server_port, server_port_mac),
                (client_if, client_mac, client_port, client_port_mac),
            ]: [_; 2] = links.try_into().expect("two links");
            out.push(RackHost {
                host_id: (i + 1) as u16,
                ns: ns.name().to_owned(),
                server_if,
                server_mac,
                server_port,
                server_port_mac,
                client_if,
                client_mac,
                client_port,
                client_port_mac,
            });
            host_ns.push(ns);
        }
        Ok(Rack {
            hosts: out,
            switch: switch_ns.name().to_owned(),
            controller_if,
            controller_port,
            _host_ns: host_ns,
            _switch_ns: switch_ns,
        })
    }

    /// The switch namespace.
    pub fn switch_ns(&self) -> &Netns {
        &self._switch_ns
    }

    /// Host `i`'s namespace.
    pub fn host_ns(&self, i: usize) -> &Netns {
        &self._host_ns[i]
    }
}
