//! A leaf-spine fabric on one machine (RFC 7938 style): racks, each a [`Rack`] whose switch
//! namespace is a top-of-rack router running FRR (its kernel forwarding table is the data
//! plane), and a spine namespace running FRR, every top-of-rack router cabled to the spine and
//! talking eBGP to it with private AS numbers (spine 65000, rack i 65100 + i). The top-of-rack
//! routers announce their static routes (what a controller installs with
//! `bluebridge-ctl daemon --backend bgp`); the spine passes them on. Everything is stopped and
//! removed on drop.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::frr::{BgpPeer, FrrRouter, RouterConfig};
use crate::rack::mac;
use crate::{Netns, Rack, RackHost, TopologyError, VethEnd, ip_in, veth};

/// The spine's AS number.
pub const SPINE_ASN: u32 = 65000;

/// Uplink `rack`'s /64 (outside any BlueBridge prefix): `fdff:<rack>::/64`, the top-of-rack
/// router `::1`, the spine `::2`.
fn uplink_addr(rack: usize, side: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfdff, rack as u16, 0, 0, 0, 0, 0, side)
}

/// A leaf-spine fabric.
#[derive(Debug)]
pub struct LeafSpine {
    // Dropped first: the routers, then the racks and the spine's namespace.
    routers: Vec<FrrRouter>,
    /// The racks, in order; rack i's hosts have ids `i × per_rack + 1` on.
    pub racks: Vec<Rack>,
    /// The spine's namespace.
    pub spine: String,
    _spine_ns: Netns,
}

impl LeafSpine {
    /// Creates `racks` racks of `per_rack` hosts (namespaces `<name><i>-sw`, `<name><i>-h<j>`,
    /// `<name>-sp`; `name` short enough for `<name><i>s<j>` to fit in 15 bytes), links at `mtu`, starts the routers and waits until
    /// every BGP session is up.
    pub fn create(
        name: &str,
        racks: usize,
        per_rack: usize,
        mtu: u16,
    ) -> Result<LeafSpine, TopologyError> {
        // Interface names (`<name><rack>s<host>`) must fit in 15 bytes.
        let longest = name.len() + 2 + per_rack.saturating_sub(1).to_string().len() + 1;
        if !(1..=9).contains(&racks) || per_rack == 0 || longest > 15 {
            return Err(TopologyError::Command {
                cmd: "LeafSpine::create".into(),
                stderr: format!(
                    "{racks} racks of {per_rack} hosts named {name}: 1 to 9 racks, interface names over 15 bytes"
                ),
            });
        }
        let spine_ns = Netns::create(&format!("{name}-sp"))?;
        let mut f = LeafSpine {
            routers: Vec::new(),
            racks: Vec::new(),
            spine: spine_ns.name().to_owned(),
            _spine_ns: spine_ns,
        };
        for i in 1..=racks {
            let first = ((i - 1) * per_rack + 1) as u16;
            let rack = Rack::create_numbered(&format!("{name}{i}"), per_rack, mtu, 1, first)?;
            let (up, down) = (format!("{name}{i}u"), format!("{name}{i}U"));
            veth(
                VethEnd {
                    ns: &rack.switch,
                    ifname: &up,
                    mac: mac(5, i, 1),
                },
                VethEnd {
                    ns: &f.spine,
                    ifname: &down,
                    mac: mac(5, i, 2),
                },
                1,
                mtu,
            )?;
            // Routers resolve each other's addresses: neighbour discovery on, one entry per
            // uplink. bgpd also wants a link-local address on the interface of a session.
            for (ns, ifname, side) in [(&rack.switch, &up, 1), (&f.spine, &down, 2)] {
                ip_in(ns, &["link", "set", "dev", ifname, "arp", "on"])?;
                let global = format!("{}/64", uplink_addr(i, side));
                let local = format!("{}/64", Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, side));
                for a in [global, local] {
                    ip_in(ns, &["-6", "addr", "add", &a, "dev", ifname, "nodad"])?;
                }
            }
            f.racks.push(rack);
        }
        for (i, rack) in f.racks.iter().enumerate() {
            let config = RouterConfig {
                asn: 65100 + i as u32 + 1,
                router_id: Ipv4Addr::new(10, 0, 0, i as u8 + 1),
                peers: vec![BgpPeer {
                    addr: uplink_addr(i + 1, 2),
                    asn: SPINE_ASN,
                }],
                redistribute_static: true,
            };
            f.routers.push(FrrRouter::start(&rack.switch, &config)?);
        }
        let spine = RouterConfig {
            asn: SPINE_ASN,
            router_id: Ipv4Addr::new(10, 0, 0, 254),
            peers: (0..racks)
                .map(|i| BgpPeer {
                    addr: uplink_addr(i + 1, 1),
                    asn: 65100 + i as u32 + 1,
                })
                .collect(),
            redistribute_static: false,
        };
        f.routers.push(FrrRouter::start(&f.spine, &spine)?);
        for r in &mut f.routers {
            r.wait_established(Duration::from_secs(60))?;
        }
        Ok(f)
    }

    /// Every host of every rack, in rack order.
    pub fn hosts(&self) -> Vec<RackHost> {
        self.racks.iter().flat_map(|r| r.hosts.clone()).collect()
    }

    /// The top-of-rack router (its namespace and FRR instance) of host `id`.
    pub fn router_of(&self, id: u16) -> Option<&str> {
        self.racks
            .iter()
            .find(|r| r.hosts.iter().any(|h| h.host_id == id))
            .map(|r| r.switch.as_str())
    }

    /// The FRR routers: the top-of-rack ones in rack order, then the spine.
    pub fn routers(&self) -> &[FrrRouter] {
        &self.routers
    }

    /// Fails if a router's daemon has exited.
    pub fn check(&mut self) -> Result<(), TopologyError> {
        self.routers.iter_mut().try_for_each(FrrRouter::check)
    }
}
