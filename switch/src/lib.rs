//! The BlueBridge controller. It owns the tables of the XDP top-of-rack switch (`tor.bpf.c`,
//! loaded through [`bluebridge_ebpf::Tor`]): it registers hosts (host id → switch port and MAC),
//! installs their routes proactively (the host's /48 to its server link, its client prefix to its
//! client link), restricts each port to the sources it may use, and reports counters per host,
//! per port and per hot page. [`api`] serves it on a Unix socket; `bluebridge-ctl` is the daemon
//! and its command-line client.
#![forbid(unsafe_code)]

pub mod api;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv6Addr;

use bluebridge_ebpf::{Route, Tor, TorCounters, TrafficCounters, XdpError};
use bluebridge_proto::{HostId, MacAddr, NetPrefix};
use serde::{Deserialize, Serialize};

/// A host to register: its server link and, optionally, its client link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSpec {
    /// The host id its server serves (its /48).
    pub id: u16,
    /// The switch port its server is cabled to (an interface in the switch namespace).
    pub server_port: String,
    /// The server interface's MAC (the next hop the switch writes into frames for it).
    pub server_mac: String,
    /// The switch port of its client link, if it has a separate one.
    #[serde(default)]
    pub client_port: Option<String>,
    /// The client interface's MAC.
    #[serde(default)]
    pub client_mac: Option<String>,
    /// The client link's prefix, `network/len` (inside the host's /48, e.g.
    /// `fd00:bb:5:ffff::/64`).
    #[serde(default)]
    pub client_net: Option<String>,
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The switch program refused.
    #[error(transparent)]
    Switch(#[from] XdpError),
    /// A request that makes no sense.
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone)]
struct Link {
    ifindex: u32,
    mac: [u8; 6],
    port_mac: [u8; 6],
    net: Ipv6Addr,
    len: u8,
}

#[derive(Debug, Clone)]
struct Host {
    spec: HostSpec,
    server: Link,
    client: Option<Link>,
}

/// One installed route, for listings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteInfo {
    /// `network/len`.
    pub prefix: String,
    /// Egress port.
    pub port: String,
    /// Next hop MAC.
    pub next_hop: String,
    /// Counter id.
    pub id: u32,
}

/// Frames and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Frames.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

impl From<TrafficCounters> for Traffic {
    fn from(t: TrafficCounters) -> Self {
        Traffic {
            packets: t.packets,
            bytes: t.bytes,
        }
    }
}

/// A host's counters at the switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCounters {
    /// Host id.
    pub id: u16,
    /// Requests routed to its server (its /48 route).
    pub to_server: Traffic,
    /// Frames routed to its client link.
    pub to_client: Traffic,
    /// BlueBridge frames its server port received (the server's replies).
    pub from_server: Traffic,
    /// BlueBridge frames its client port received (the client's requests).
    pub from_client: Traffic,
}

/// The switch's verdicts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchCounters {
    /// Routed and sent.
    pub forwarded: u64,
    /// No route: dropped.
    pub no_route: u64,
    /// Source not allowed on its port: dropped.
    pub spoofed: u64,
    /// Not BlueBridge: dropped.
    pub other_dropped: u64,
    /// Not BlueBridge: passed to the switch's kernel.
    pub other_passed: u64,
    /// Malformed: dropped.
    pub malformed: u64,
    /// Hop limit exhausted: dropped.
    pub hop_limit: u64,
    /// Egress port missing: dropped.
    pub no_port: u64,
}

impl From<TorCounters> for SwitchCounters {
    fn from(c: TorCounters) -> Self {
        SwitchCounters {
            forwarded: c.forwarded,
            no_route: c.no_route,
            spoofed: c.spoofed,
            other_dropped: c.other_dropped,
            other_passed: c.other_passed,
            malformed: c.malformed,
            hop_limit: c.hop_limit,
            no_port: c.no_port,
        }
    }
}

/// Everything the switch counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Verdicts.
    pub switch: SwitchCounters,
    /// Per registered host.
    pub hosts: Vec<HostCounters>,
}

/// A page that received many requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotPage {
    /// The page's address (opcode and flags zero).
    pub page: String,
    /// Its host.
    pub host: u16,
    /// Requests to it.
    pub requests: Traffic,
}

/// The controller's state: the switch program and the registered hosts.
#[derive(Debug)]
pub struct Controller {
    tor: Tor,
    prefix: NetPrefix,
    force_generic: bool,
    ports: HashMap<String, u32>,
    hosts: BTreeMap<u16, Host>,
}

fn parse_mac(s: &str) -> Result<[u8; 6], CtlError> {
    s.parse::<MacAddr>()
        .map(|m| m.0)
        .map_err(|_| CtlError::Invalid(format!("`{s}` is not a MAC address")))
}

fn parse_net(s: &str) -> Result<(Ipv6Addr, u8), CtlError> {
    let bad = || CtlError::Invalid(format!("`{s}` is not NETWORK/LENGTH"));
    let (n, l) = s.split_once('/').ok_or_else(bad)?;
    let n: Ipv6Addr = n.parse().map_err(|_| bad())?;
    let l: u8 = l.parse().map_err(|_| bad())?;
    if l > 128 {
        return Err(bad());
    }
    Ok((n, l))
}

fn mac_text(m: [u8; 6]) -> String {
    MacAddr(m).to_string()
}

impl Controller {
    /// Loads the switch program (the calling thread must be in the switch's namespace for
    /// ports to be found). `pass_other`: hand non-BlueBridge frames to the switch's kernel
    /// instead of dropping them.
    pub fn new(prefix: NetPrefix, pass_other: bool, force_generic: bool) -> Result<Self, CtlError> {
        let mut tor = Tor::load()?;
        tor.set_pass_other(pass_other)?;
        Ok(Controller {
            tor,
            prefix,
            force_generic,
            ports: HashMap::new(),
            hosts: BTreeMap::new(),
        })
    }

    /// The switch program (for tests and diagnostics).
    pub fn tor(&mut self) -> &mut Tor {
        &mut self.tor
    }

    fn port(&mut self, name: &str) -> Result<u32, CtlError> {
        if let Some(&i) = self.ports.get(name) {
            return Ok(i);
        }
        let i = self.tor.add_port(name, self.force_generic)?;
        self.ports.insert(name.to_owned(), i);
        Ok(i)
    }

    /// The MAC of interface `name` in this thread's namespace (from the kernel over netlink, not
    /// /sys, which shows the namespace it was mounted in).
    fn port_mac(name: &str) -> Result<[u8; 6], CtlError> {
        let addrs = nix::ifaddrs::getifaddrs()
            .map_err(|e| CtlError::Invalid(format!("listing interfaces: {e}")))?;
        addrs
            .filter(|a| a.interface_name == name)
            .find_map(|a| a.address?.as_link_addr()?.addr())
            .ok_or_else(|| {
                CtlError::Invalid(format!("no interface {name} with a MAC in this namespace"))
            })
    }

    /// Registers (or re-registers) a host: its ports join the switch, its sources are allowed
    /// and its routes installed. Route counter ids: 2 × id (server), 2 × id + 1 (client).
    pub fn register(&mut self, spec: HostSpec) -> Result<(), CtlError> {
        let id = HostId(spec.id);
        if spec.id == 0 || id.is_any() || spec.id >= 0x8000 {
            return Err(CtlError::Invalid(format!(
                "host id {} is reserved or too large (1 to 32767)",
                spec.id
            )));
        }
        if self.hosts.contains_key(&spec.id) {
            self.unregister(spec.id)?;
        }
        let server = Link {
            ifindex: self.port(&spec.server_port)?,
            port_mac: Self::port_mac(&spec.server_port)?,
            mac: parse_mac(&spec.server_mac)?,
            net: self.prefix.host_network(id),
            len: 48,
        };
        let client = match (&spec.client_port, &spec.client_mac, &spec.client_net) {
            (None, None, None) => None,
            (Some(port), Some(mac), Some(net)) => {
                let (net, len) = parse_net(net)?;
                Some(Link {
                    ifindex: self.port(port)?,
                    port_mac: Self::port_mac(port)?,
                    mac: parse_mac(mac)?,
                    net,
                    len,
                })
            }
            _ => {
                return Err(CtlError::Invalid(
                    "a client link needs its port, MAC and prefix together".into(),
                ));
            }
        };
        for (link, rid) in [
            (Some(&server), 2 * u32::from(spec.id)),
            (client.as_ref(), 2 * u32::from(spec.id) + 1),
        ] {
            let Some(l) = link else { continue };
            self.tor.allow_source(l.ifindex, l.net, l.len)?;
            self.tor.add_route(
                l.net,
                l.len,
                Route {
                    ifindex: l.ifindex,
                    dst_mac: l.mac,
                    src_mac: l.port_mac,
                    id: rid,
                },
            )?;
        }
        tracing::info!(host = spec.id, server_port = %spec.server_port, "host registered");
        self.hosts.insert(
            spec.id,
            Host {
                spec,
                server,
                client,
            },
        );
        Ok(())
    }

    /// Withdraws a host's routes and sources.
    pub fn unregister(&mut self, id: u16) -> Result<(), CtlError> {
        let h = self
            .hosts
            .remove(&id)
            .ok_or_else(|| CtlError::Invalid(format!("host {id} is not registered")))?;
        for l in std::iter::once(&h.server).chain(h.client.as_ref()) {
            self.tor.remove_route(l.net, l.len)?;
            self.tor.disallow_source(l.ifindex, l.net, l.len)?;
        }
        tracing::info!(host = id, "host unregistered");
        Ok(())
    }

    /// The registered hosts.
    pub fn hosts(&self) -> Vec<HostSpec> {
        self.hosts.values().map(|h| h.spec.clone()).collect()
    }

    /// Every route in the switch.
    pub fn routes(&self) -> Result<Vec<RouteInfo>, CtlError> {
        let names: HashMap<u32, &str> = self.ports.iter().map(|(n, i)| (*i, n.as_str())).collect();
        let mut v: Vec<RouteInfo> = self
            .tor
            .routes()?
            .into_iter()
            .map(|(net, len, r)| RouteInfo {
                prefix: format!("{net}/{len}"),
                port: names
                    .get(&r.ifindex)
                    .map_or_else(|| r.ifindex.to_string(), |n| (*n).to_owned()),
                next_hop: mac_text(r.dst_mac),
                id: r.id,
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id).then_with(|| a.prefix.cmp(&b.prefix)));
        Ok(v)
    }

    /// The switch's counters, per host.
    pub fn counters(&self) -> Result<Counters, CtlError> {
        let mut hosts = Vec::new();
        for (&id, h) in &self.hosts {
            let (from_server, _) = self.tor.port_counters(h.server.ifindex)?;
            let from_client = match &h.client {
                Some(c) => self.tor.port_counters(c.ifindex)?.0.into(),
                None => Traffic::default(),
            };
            hosts.push(HostCounters {
                id,
                to_server: self.tor.route_counters(2 * u32::from(id))?.into(),
                to_client: self.tor.route_counters(2 * u32::from(id) + 1)?.into(),
                from_server: from_server.into(),
                from_client,
            });
        }
        Ok(Counters {
            switch: self.tor.counters()?.into(),
            hosts,
        })
    }

    /// The `top` pages with the most requests.
    pub fn hot_pages(&self, top: usize) -> Result<Vec<HotPage>, CtlError> {
        Ok(self
            .tor
            .hot_pages(top)?
            .into_iter()
            .map(|(a, t)| {
                let o = a.octets();
                HotPage {
                    page: a.to_string(),
                    host: u16::from_be_bytes([o[4], o[5]]),
                    requests: t.into(),
                }
            })
            .collect())
    }
}
