//! A rack: one switch namespace and N host namespaces around it. Every host has two links to
//! the switch, one for its server and one for its client (each runs its own XDP program and
//! AF_XDP socket, and an interface holds one XDP program).

use std::net::Ipv6Addr;

use bluebridge_proto::{HostId, NetPrefix};

use crate::Relay;
use crate::{Netns, TopologyError, VethEnd, ip, veth};

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
    /// BlueBridge host id of its server (host i of the rack is id i + 1, or i + the rack's
    /// first id).
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
    /// The relays of [`Rack::create_relayed`]'s hosts, in host order: each forwards its host's
    /// client link and can lose, duplicate and reorder frames (it starts unimpaired).
    pub relays: Vec<Relay>,
    // Dropped last: the relays' threads first, then the hosts (their veths go with them), the
    // relays' namespace, the switch.
    _host_ns: Vec<Netns>,
    _relay_ns: Option<Netns>,
    _switch_ns: Netns,
}

/// `02:bb:<kind>:<i hi>:<i lo>:<side>`: readable in captures. Kind 1 server link, 2 client link,
/// 3 the controller's link, 5 a fabric's uplink (i its rack), 4 a relay's ends (side 1 towards the host, 2 towards the switch);
/// otherwise side 1 the host end, 2 the switch port.
pub(crate) fn mac(kind: u8, i: usize, side: u8) -> [u8; 6] {
    [0x02, 0xbb, kind, (i >> 8) as u8, i as u8, side]
}

impl Rack {
    /// Creates the rack: `hosts` hosts (at most 4,000), links at `mtu`. Interface names stay
    /// within 15 bytes for names up to 9 bytes.
    pub fn create(name: &str, hosts: usize, mtu: u16) -> Result<Rack, TopologyError> {
        Self::create_multiqueue(name, hosts, mtu, 1)
    }

    /// Like [`Rack::create_multiqueue`], and the client links of the first `relayed` hosts
    /// pass through a relay namespace `<name>-r`: host `i`'s client interface is cabled to
    /// `<name>r<i>a` there, whose [`Relay`] (seeded `seed + i`) forwards to `<name>r<i>b`,
    /// cabled to the client's switch port. The hosts see the same MACs and addresses as in a
    /// plain rack; [`Rack::relays`] impairs their traffic.
    pub fn create_relayed(
        name: &str,
        hosts: usize,
        mtu: u16,
        server_queues: u32,
        relayed: usize,
        seed: u64,
    ) -> Result<Rack, TopologyError> {
        let mut rack = Self::create_multiqueue(name, hosts, mtu, server_queues)?;
        if relayed == 0 {
            return Ok(rack);
        }
        if relayed > hosts {
            return Err(TopologyError::Command {
                cmd: "Rack::create_relayed".into(),
                stderr: format!("{relayed} relayed hosts of {hosts}"),
            });
        }
        let relay_ns = Netns::create(&format!("{name}-r"))?;
        for (i, h) in rack.hosts.iter().take(relayed).enumerate() {
            let (a, b) = (format!("{name}r{i}a"), format!("{name}r{i}b"));
            // Recable: the client's veth pair is replaced by two pairs through the relay.
            ip(&["-n", &h.ns, "link", "del", &h.client_if])?;
            for (end, ns, end_mac, peer, peer_mac) in [
                (&h.client_if, &h.ns, h.client_mac, &a, mac(4, i, 1)),
                (
                    &h.client_port,
                    &rack.switch,
                    h.client_port_mac,
                    &b,
                    mac(4, i, 2),
                ),
            ] {
                veth(
                    VethEnd {
                        ns,
                        ifname: end,
                        mac: end_mac,
                    },
                    VethEnd {
                        ns: relay_ns.name(),
                        ifname: peer,
                        mac: peer_mac,
                    },
                    1,
                    mtu,
                )?;
            }
            // The switch's XDP redirects into the client port reach the relay only if its end
            // runs NAPI (veth turns it on with GRO when no XDP program is attached).
            crate::run(std::process::Command::new("ip").args([
                "netns",
                "exec",
                relay_ns.name(),
                "ethtool",
                "-K",
                &b,
                "gro",
                "on",
            ]))?;
            rack.relays.push(Relay::start(
                relay_ns.name(),
                &a,
                h.client_mac,
                &b,
                h.client_port_mac,
                seed.wrapping_add(i as u64),
            )?);
        }
        rack._relay_ns = Some(relay_ns);
        Ok(rack)
    }

    /// Like [`Rack::create`], with `server_queues` queues on every host's server link (for
    /// servers with a worker per queue; the switch's redirects land on any of them).
    pub fn create_multiqueue(
        name: &str,
        hosts: usize,
        mtu: u16,
        server_queues: u32,
    ) -> Result<Rack, TopologyError> {
        Self::create_numbered(name, hosts, mtu, server_queues, 1)
    }

    /// Like [`Rack::create_multiqueue`], host ids from `first_id` on (racks of one fabric
    /// number their hosts apart).
    pub fn create_numbered(
        name: &str,
        hosts: usize,
        mtu: u16,
        server_queues: u32,
        first_id: u16,
    ) -> Result<Rack, TopologyError> {
        if hosts == 0 || hosts > 4000 || usize::from(first_id) + hosts > 0x7fff || first_id == 0 {
            return Err(TopologyError::Command {
                cmd: "Rack::create".into(),
                stderr: format!(
                    "{hosts} hosts from id {first_id}: a rack has 1 to 4,000, ids 1 to 32766"
                ),
            });
        }
        let switch_ns = Netns::create(&format!("{name}-sw"))?;
        let (controller_if, controller_port) = (format!("{name}k"), format!("{name}K"));
        veth(
            VethEnd {
                ns: switch_ns.name(),
                ifname: &controller_if,
                mac: mac(3, 0, 1),
            },
            VethEnd {
                ns: switch_ns.name(),
                ifname: &controller_port,
                mac: mac(3, 0, 2),
            },
            1,
            mtu,
        )?;
        let mut host_ns = Vec::with_capacity(hosts);
        let mut out = Vec::with_capacity(hosts);
        for i in 0..hosts {
            let ns = Netns::create(&format!("{name}-h{i}"))?;
            // Numbered across the fabric, so every MAC is unique in captures.
            let g = usize::from(first_id) - 1 + i;
            let mut links = Vec::new();
            for (kind, tag) in [(1u8, 's'), (2u8, 'c')] {
                let host_if = format!("{name}{tag}{i}");
                let port = format!("{name}{}{i}", tag.to_ascii_uppercase());
                let (hmac, pmac) = (mac(kind, g, 1), mac(kind, g, 2));
                veth(
                    VethEnd {
                        ns: ns.name(),
                        ifname: &host_if,
                        mac: hmac,
                    },
                    VethEnd {
                        ns: switch_ns.name(),
                        ifname: &port,
                        mac: pmac,
                    },
                    if kind == 1 { server_queues } else { 1 },
                    mtu,
                )?;
                links.push((host_if, hmac, port, pmac));
            }
            let [
                (server_if, server_mac, server_port, server_port_mac),
                (client_if, client_mac, client_port, client_port_mac),
            ]: [_; 2] = links.try_into().expect("two links");
            out.push(RackHost {
                host_id: first_id + i as u16,
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
            relays: Vec::new(),
            _host_ns: host_ns,
            _relay_ns: None,
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
