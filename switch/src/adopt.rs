//! A controller that outlives itself: the XDP switch is loaded with its maps and port links
//! pinned on a bpf filesystem ([`Tor::load_pinned`]), so a controller that dies leaves the
//! switch forwarding exactly as it was, and the next one adopts it. Its state is rebuilt from
//! the switch's own tables — the routes name every host's server port and MAC (route id
//! 2 × host), its client link (2 × host + 1), the placement (the "any server" route), the
//! withdrawn hosts (reject routes) and the migrated pages (/112 routes) — and from the hosts'
//! STAT answers to the first health checks (occupancy). Nothing is written to the switch while
//! adopting: traffic does not notice.
//!
//! Lost with the old process: a migration it had under way (its page stays frozen at the old
//! holder, answered MOVED, until the page is migrated again), health-check miss counts, and
//! the count of invalidation notices sent.

use std::net::Ipv6Addr;
use std::path::Path;
use std::time::Instant;

use bluebridge_ebpf::{Route, Tor};
use bluebridge_proto::{HostId, NetPrefix};
use serde::{Deserialize, Serialize};

use crate::fabric::Fabric as _;
use crate::{ANY_ROUTE_ID, CONTROLLER_HOST, Controller, CtlError, Health, Host, HostSpec, Link};

/// What a controller found in the switch it adopted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Adoption {
    /// Hosts rebuilt from their routes.
    pub hosts: usize,
    /// Of which withdrawn (their /48 answers UNREACHABLE).
    pub withdrawn: usize,
    /// Client links rebuilt.
    pub client_links: usize,
    /// Migrated pages (their /112 routes).
    pub page_routes: usize,
    /// Ports whose links were switched to the new program.
    pub ports: usize,
    /// Where new pages go, as the switch had it.
    pub placement: Option<u16>,
    /// Loading the program, switching the links and rebuilding the state, µs.
    pub elapsed_us: f64,
}

impl Controller {
    /// Loads the XDP switch pinned in `dir` (see [`Tor::load_pinned`]); if `dir` holds a switch
    /// an earlier controller left, adopts it and rebuilds the state from its tables (returned
    /// as `Some`).
    pub fn new_pinned(
        prefix: NetPrefix,
        pass_other: bool,
        force_generic: bool,
        dir: &Path,
    ) -> Result<(Self, Option<Adoption>), CtlError> {
        let t = Instant::now();
        let (mut tor, adopted) = Tor::load_pinned(dir)?;
        tor.set_pass_other(pass_other)?;
        let mut ctl = Self::with_fabric(prefix, Box::new(tor), force_generic);
        if !adopted {
            return Ok((ctl, None));
        }
        let mut a = ctl.rebuild()?;
        a.elapsed_us = t.elapsed().as_secs_f64() * 1e6;
        tracing::info!(
            hosts = a.hosts,
            withdrawn = a.withdrawn,
            page_routes = a.page_routes,
            ports = a.ports,
            elapsed_us = a.elapsed_us,
            "adopted the pinned switch"
        );
        Ok((ctl, Some(a)))
    }

    /// Leaves the switch forwarding after this controller is gone (a pinned XDP switch; the
    /// kernel backend always does): for a controller restart that must not touch traffic.
    pub fn keep_forwarding(&mut self) {
        self.fabric.keep_forwarding();
    }

    /// The state, from the adopted switch's ports and routes.
    fn rebuild(&mut self) -> Result<Adoption, CtlError> {
        let ports = self.fabric.ports();
        self.ports = ports.iter().cloned().collect();
        let name = |ifindex: u32| {
            ports
                .iter()
                .find(|(_, i)| *i == ifindex)
                .map(|(n, _)| n.clone())
        };
        let mut any = None;
        let mut pages = Vec::new();
        let mut clients = Vec::new();
        for (net, len, r) in self.fabric.routes()? {
            let host = r.id / 2;
            if r.id == ANY_ROUTE_ID {
                any = Some(r);
            } else if r.id == u32::MAX && len == 112 {
                pages.push((net, r));
            } else if host == u32::from(CONTROLLER_HOST.0) {
                // attach_link installs it again.
            } else if let (Ok(id), Some(port)) = (u16::try_from(host), name(r.ifindex)) {
                if r.id % 2 == 1 {
                    clients.push((id, port, net, len, r));
                } else if len == 48 && net == self.prefix.host_network(HostId(id)) {
                    self.adopt_server(id, port, net, r);
                } else {
                    tracing::warn!(%net, len, id = r.id, "an adopted route fits no host; left as it is");
                }
            } else {
                tracing::warn!(%net, len, id = r.id, "an adopted route fits no port; left as it is");
            }
        }
        let mut client_links = 0;
        for (id, port, net, len, r) in clients {
            let Some(h) = self.hosts.get_mut(&id) else {
                tracing::warn!(host = id, %net, "an adopted client route has no server route");
                continue;
            };
            h.spec.client_port = Some(port);
            h.spec.client_mac = Some(crate::mac_text(r.dst_mac));
            h.spec.client_net = Some(format!("{net}/{len}"));
            h.client = Some(link(r, net, len));
            client_links += 1;
        }
        let holder = |hosts: &std::collections::BTreeMap<u16, Host>, ifindex: u32| {
            hosts
                .iter()
                .find(|(_, h)| h.server.ifindex == ifindex)
                .map(|(&id, _)| id)
        };
        for (net, r) in pages {
            match holder(&self.hosts, r.ifindex) {
                Some(id) => {
                    self.page_routes.insert(net, id);
                }
                None => tracing::warn!(%net, "an adopted page route leads to no host"),
            }
        }
        self.placement = any
            .filter(|r| !r.reject)
            .and_then(|r| holder(&self.hosts, r.ifindex));
        self.settling = true;
        Ok(Adoption {
            hosts: self.hosts.len(),
            withdrawn: self.hosts.values().filter(|h| h.health.down).count(),
            client_links,
            page_routes: self.page_routes.len(),
            ports: ports.len(),
            placement: self.placement,
            elapsed_us: 0.0,
        })
    }

    fn adopt_server(&mut self, id: u16, port: String, net: Ipv6Addr, r: Route) {
        let spec = HostSpec {
            id,
            server_port: port,
            server_mac: crate::mac_text(r.dst_mac),
            client_port: None,
            client_mac: None,
            client_net: None,
            replicas: None,
        };
        let health = Health {
            down: r.reject,
            ..Health::default()
        };
        self.hosts.insert(
            id,
            Host {
                spec,
                server: link(r, net, 48),
                client: None,
                health,
                repl: crate::Replication::new(id, self.replicas),
                dead: false,
                first_miss: None,
            },
        );
    }
}

fn link(r: Route, net: Ipv6Addr, len: u8) -> Link {
    Link {
        ifindex: r.ifindex,
        mac: r.dst_mac,
        port_mac: r.src_mac,
        net,
        len,
    }
}
