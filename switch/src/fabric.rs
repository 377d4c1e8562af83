//! What the controller programs: the XDP switch ([`Tor`]), the switch namespace's own kernel
//! forwarding table ([`KernelFabric`], over rtnetlink), FRR routers that announce the routes
//! over BGP ([`crate::bgp::BgpFabric`]) or an Open vSwitch bridge's OpenFlow tables
//! ([`crate::ovs::OvsFabric`]). All take the same routes; the XDP one also answers for withdrawn
//! hosts and reports freed pages, and the XDP and OVS ones filter sources and count.

use std::net::{IpAddr, Ipv6Addr};

use bluebridge_ebpf::{PageTraffic, Route, Tor, TorCounters, TrafficCounters};

use crate::CtlError;

/// A forwarding plane the controller can program.
pub trait Fabric: Send {
    /// `xdp`, `kernel`, `bgp` or `ovs`.
    fn kind(&self) -> &'static str;
    /// Makes `ifname` a port; returns its number (the interface index, or the fabric's own
    /// number when its ports are not all in this namespace).
    fn add_port(&mut self, ifname: &str, force_generic: bool) -> Result<u32, CtlError>;
    /// The MAC of port `name` (by default the interface of that name in this thread's
    /// namespace).
    fn port_mac(&self, name: &str) -> Result<[u8; 6], CtlError> {
        local_mac(name)
    }
    /// Applies the changes made since the last call, in one batch where the fabric batches
    /// (BGP, OVS); the others have applied each change at once.
    fn commit(&mut self) -> Result<(), CtlError> {
        Ok(())
    }
    /// Accepts sources in `net/len` on `port` (XDP only: the kernel fabric does not filter).
    fn allow_source(&mut self, port: u32, net: Ipv6Addr, len: u8) -> Result<(), CtlError>;
    /// Stops accepting them.
    fn disallow_source(&mut self, port: u32, net: Ipv6Addr, len: u8) -> Result<(), CtlError>;
    /// Installs or replaces the route for `net/len`.
    fn add_route(&mut self, net: Ipv6Addr, len: u8, r: Route) -> Result<(), CtlError>;
    /// Removes it.
    fn remove_route(&mut self, net: Ipv6Addr, len: u8) -> Result<(), CtlError>;
    /// The routes (kernel: the BlueBridge ones this controller installed).
    fn routes(&self) -> Result<Vec<(Ipv6Addr, u8, Route)>, CtlError>;
    /// Whether a withdrawn host's route can answer UNREACHABLE while still letting the
    /// controller's health checks through (XDP only). Otherwise a down host keeps its route:
    /// placement avoids it, clients time out.
    fn answers_for_withdrawn(&self) -> bool {
        false
    }
    /// Lets the controller's port through reject routes (XDP only).
    fn set_controller_port(&mut self, _port: u32) -> Result<(), CtlError> {
        Ok(())
    }
    /// Pages freed since the last call (XDP only).
    fn take_freed(&mut self) -> Vec<Ipv6Addr> {
        Vec::new()
    }
    /// Verdict counters (XDP only; zero otherwise).
    fn counters(&self) -> Result<TorCounters, CtlError> {
        Ok(TorCounters::default())
    }
    /// A route's counters (XDP only).
    fn route_counters(&self, _id: u32) -> Result<TrafficCounters, CtlError> {
        Ok(TrafficCounters::default())
    }
    /// A port's counters, received and sent (XDP only).
    fn port_counters(&self, _port: u32) -> Result<(TrafficCounters, TrafficCounters), CtlError> {
        Ok(Default::default())
    }
    /// The busiest pages (XDP only).
    fn hot_pages(&self, _top: usize) -> Result<Vec<(Ipv6Addr, PageTraffic)>, CtlError> {
        Ok(Vec::new())
    }
    /// The ports it holds already (a pinned XDP switch adopted from an earlier controller):
    /// name and interface index.
    fn ports(&self) -> Vec<(String, u32)> {
        Vec::new()
    }
    /// Keeps forwarding after the controller exits (a pinned XDP switch; the kernel's table
    /// always does).
    fn keep_forwarding(&mut self) {}
}

impl Fabric for Tor {
    fn kind(&self) -> &'static str {
        "xdp"
    }
    fn add_port(&mut self, ifname: &str, force_generic: bool) -> Result<u32, CtlError> {
        Ok(Tor::add_port(self, ifname, force_generic)?)
    }
    fn allow_source(&mut self, port: u32, net: Ipv6Addr, len: u8) -> Result<(), CtlError> {
        Ok(Tor::allow_source(self, port, net, len)?)
    }
    fn disallow_source(&mut self, port: u32, net: Ipv6Addr, len: u8) -> Result<(), CtlError> {
        Ok(Tor::disallow_source(self, port, net, len)?)
    }
    fn add_route(&mut self, net: Ipv6Addr, len: u8, r: Route) -> Result<(), CtlError> {
        Ok(Tor::add_route(self, net, len, r)?)
    }
    fn remove_route(&mut self, net: Ipv6Addr, len: u8) -> Result<(), CtlError> {
        Ok(Tor::remove_route(self, net, len)?)
    }
    fn routes(&self) -> Result<Vec<(Ipv6Addr, u8, Route)>, CtlError> {
        Ok(Tor::routes(self)?)
    }
    fn answers_for_withdrawn(&self) -> bool {
        true
    }
    fn set_controller_port(&mut self, port: u32) -> Result<(), CtlError> {
        Ok(Tor::set_controller_port(self, port)?)
    }
    fn take_freed(&mut self) -> Vec<Ipv6Addr> {
        Tor::take_freed(self)
    }
    fn counters(&self) -> Result<TorCounters, CtlError> {
        Ok(Tor::counters(self)?)
    }
    fn route_counters(&self, id: u32) -> Result<TrafficCounters, CtlError> {
        Ok(Tor::route_counters(self, id)?)
    }
    fn port_counters(&self, port: u32) -> Result<(TrafficCounters, TrafficCounters), CtlError> {
        Ok(Tor::port_counters(self, port)?)
    }
    fn hot_pages(&self, top: usize) -> Result<Vec<(Ipv6Addr, PageTraffic)>, CtlError> {
        Ok(Tor::hot_pages(self, top)?)
    }
    fn ports(&self) -> Vec<(String, u32)> {
        Tor::ports(self)
            .iter()
            .map(|(n, i, _)| (n.clone(), *i))
            .collect()
    }
    fn keep_forwarding(&mut self) {
        self.keep_pinned();
    }
}

/// The MAC of interface `name` in this thread's namespace (from the kernel over netlink, not
/// /sys, which shows the namespace it was mounted in).
pub fn local_mac(name: &str) -> Result<[u8; 6], CtlError> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| CtlError::Invalid(format!("listing interfaces: {e}")))?;
    addrs
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address?.as_link_addr()?.addr())
        .ok_or_else(|| {
            CtlError::Invalid(format!("no interface {name} with a MAC in this namespace"))
        })
}

/// No forwarding plane: a controller between two lives (see [`crate::Controller::detached`]).
/// It holds no routes and refuses every change.
#[derive(Debug, Default)]
pub struct Detached;

fn detached() -> CtlError {
    CtlError::Invalid("this controller has no switch".into())
}

impl Fabric for Detached {
    fn kind(&self) -> &'static str {
        "detached"
    }
    fn add_port(&mut self, _: &str, _: bool) -> Result<u32, CtlError> {
        Err(detached())
    }
    fn allow_source(&mut self, _: u32, _: Ipv6Addr, _: u8) -> Result<(), CtlError> {
        Err(detached())
    }
    fn disallow_source(&mut self, _: u32, _: Ipv6Addr, _: u8) -> Result<(), CtlError> {
        Err(detached())
    }
    fn add_route(&mut self, _: Ipv6Addr, _: u8, _: Route) -> Result<(), CtlError> {
        Err(detached())
    }
    fn remove_route(&mut self, _: Ipv6Addr, _: u8) -> Result<(), CtlError> {
        Err(detached())
    }
    fn routes(&self) -> Result<Vec<(Ipv6Addr, u8, Route)>, CtlError> {
        Ok(Vec::new())
    }
}

/// The link-local next hop the kernel and BGP fabrics use behind every port: one neighbour
/// entry per port (per host link), never one per page.
pub(crate) const NEXT_HOP: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0xbb, 1);

/// The switch namespace's kernel IPv6 forwarding table, programmed over rtnetlink: a route
/// `net/len via fe80::bb:1 dev <port>` per BlueBridge route and one permanent neighbour entry
/// per port. An ordinary router holding BlueBridge's routes.
pub struct KernelFabric {
    rt: tokio::runtime::Runtime,
    handle: rtnetlink::Handle,
    routes: std::collections::BTreeMap<(Ipv6Addr, u8), Route>,
}

impl std::fmt::Debug for KernelFabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelFabric")
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

fn netlink(what: &str, e: impl std::fmt::Display) -> CtlError {
    CtlError::Invalid(format!("{what}: {e}"))
}

impl KernelFabric {
    /// Opens an rtnetlink connection in this thread's namespace and turns IPv6 forwarding on
    /// there.
    pub fn new() -> Result<Self, CtlError> {
        std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
            .map_err(|e| netlink("turning IPv6 forwarding on", e))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| netlink("starting the netlink runtime", e))?;
        let (conn, handle, _) = rt
            .block_on(async { rtnetlink::new_connection() })
            .map_err(|e| netlink("opening rtnetlink", e))?;
        rt.spawn(conn);
        Ok(KernelFabric {
            rt,
            handle,
            routes: Default::default(),
        })
    }

    fn route_message(
        net: Ipv6Addr,
        len: u8,
        r: Option<&Route>,
    ) -> rtnetlink::packet_route::route::RouteMessage {
        let b = rtnetlink::RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(net, len);
        let b = match r {
            Some(r) if r.reject => b.kind(rtnetlink::packet_route::route::RouteType::Unreachable),
            Some(r) => b.gateway(NEXT_HOP).output_interface(r.ifindex),
            None => b,
        };
        b.build()
    }
}

impl Fabric for KernelFabric {
    fn kind(&self) -> &'static str {
        "kernel"
    }

    fn add_port(&mut self, ifname: &str, _force_generic: bool) -> Result<u32, CtlError> {
        let idx = bluebridge_ebpf::ifindex(ifname)?;
        // Neighbour entries must be used as given: the link resolves addresses (ARP/ND on),
        // though with permanent entries it never has to.
        let msg = rtnetlink::LinkUnspec::new_with_index(idx).arp(true).build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(|e| netlink(&format!("setting up port {ifname}"), e))?;
        Ok(idx)
    }

    fn allow_source(&mut self, _port: u32, _net: Ipv6Addr, _len: u8) -> Result<(), CtlError> {
        Ok(())
    }

    fn disallow_source(&mut self, _port: u32, _net: Ipv6Addr, _len: u8) -> Result<(), CtlError> {
        Ok(())
    }

    fn add_route(&mut self, net: Ipv6Addr, len: u8, r: Route) -> Result<(), CtlError> {
        if !r.reject {
            let neigh = self
                .handle
                .neighbours()
                .add(r.ifindex, IpAddr::V6(NEXT_HOP))
                .link_layer_address(&r.dst_mac)
                .replace();
            self.rt
                .block_on(neigh.execute())
                .map_err(|e| netlink("adding the next hop's neighbour entry", e))?;
        }
        let msg = Self::route_message(net, len, Some(&r));
        self.rt
            .block_on(self.handle.route().add(msg).replace().execute())
            .map_err(|e| netlink(&format!("adding route {net}/{len}"), e))?;
        self.routes.insert((net, len), r);
        Ok(())
    }

    fn remove_route(&mut self, net: Ipv6Addr, len: u8) -> Result<(), CtlError> {
        let r = self.routes.remove(&(net, len));
        let msg = Self::route_message(net, len, r.as_ref());
        self.rt
            .block_on(self.handle.route().del(msg).execute())
            .map_err(|e| netlink(&format!("removing route {net}/{len}"), e))
    }

    fn routes(&self) -> Result<Vec<(Ipv6Addr, u8, Route)>, CtlError> {
        Ok(self.routes.iter().map(|(&(n, l), &r)| (n, l, r)).collect())
    }
}
