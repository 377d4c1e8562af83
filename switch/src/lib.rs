//! The BlueBridge controller. It owns the tables of the XDP top-of-rack switch (`tor.bpf.c`,
//! loaded through [`bluebridge_ebpf::Tor`]): it registers hosts (host id → switch port and MAC),
//! installs their routes proactively (the host's /48 to its server link, its client prefix to its
//! client link), restricts each port to the sources it may use, and reports counters per host,
//! per port and per hot page. [`api`] serves it on a Unix socket; `bluebridge-ctl` is the daemon
//! and its command-line client.
#![forbid(unsafe_code)]

pub mod actions;
mod adopt;
pub mod api;
pub mod bgp;
pub mod fabric;
mod freed;
pub mod metrics;
pub mod ovs;
mod replication;
mod supervise;
#[cfg(test)]
mod tests;
mod updates;

pub use adopt::Adoption;
pub use replication::{FailoverReport, Replication};
pub use supervise::{SuperviseConfig, supervise};
pub use updates::RouteUpdates;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv6Addr;
use std::sync::{Arc, Mutex, PoisonError};

use bluebridge_client::{AnyTransport, Client, Connect, TransportKind};
use bluebridge_ebpf::{Route, Tor, TorCounters, TrafficCounters, XdpError};
use bluebridge_proto::{HostId, MacAddr, NetPrefix};
use fabric::Fabric;
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
    /// Copies of its pages: 1 (no backup) or 2 (a backup on another host, docs/switch.md
    /// "Replication"); absent: the daemon's `--replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u8>,
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
    health: Health,
    /// Where its pages are and who backs them up.
    repl: Replication,
    /// Its server is dead for good: its pages failed over elsewhere (or it was fenced).
    dead: bool,
    /// When it first missed a health check of the current run of misses.
    first_miss: Option<std::time::Instant>,
}

/// What the health checks know of a host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Withdrawn: its /48 answers UNREACHABLE at the switch.
    pub down: bool,
    /// Health checks missed in a row.
    pub misses: u32,
    /// Pages in use at the last check.
    pub pages_used: u64,
    /// Pages in its arena (0: never answered yet).
    pub pages_total: u64,
}

/// A host's state, for listings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    /// Host id.
    pub id: u16,
    /// Health.
    pub health: Health,
    /// Whether ALLOCs to the "any server" address go to it now.
    pub placement: bool,
    /// Replication of its pages.
    #[serde(default)]
    pub replication: Replication,
}

/// The controller's own link into the switch (both ends in the switch namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSpec {
    /// The controller's interface (its client runs AF_XDP here).
    pub ifname: String,
    /// The switch port at the other end.
    pub port: String,
}

/// The host id whose /48 the controller's own address lives in.
pub const CONTROLLER_HOST: HostId = HostId(0x7fff);
/// Counter id of the "any server" route.
const ANY_ROUTE_ID: u32 = 0xfffe;

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

/// Frames and bytes (the switch program's counters).
pub type Traffic = TrafficCounters;

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

/// The switch's verdicts (the switch program's counters).
pub type SwitchCounters = TorCounters;

/// Everything the switch counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Verdicts.
    pub switch: SwitchCounters,
    /// Freed pages the controller told the clients about.
    #[serde(default)]
    pub invalidations: u64,
    /// Per registered host.
    pub hosts: Vec<HostCounters>,
    /// Route changes and how long they took to reach the forwarding plane.
    #[serde(default)]
    pub route_updates: RouteUpdates,
    /// Page migrations finished.
    #[serde(default)]
    pub migrations: u64,
    /// Page migrations given up (the page stayed, or went back, where it was).
    #[serde(default)]
    pub migrations_abandoned: u64,
    /// Freed-page reports of a page already notified (a retransmitted FREE answered OK
    /// again), ignored.
    #[serde(default)]
    pub freed_repeats: u64,
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
    /// Its coherence messages (docs/protocol.md §5.18): GET_SHARED, GET_EXCLUSIVE, PUT and
    /// RENEW to it, REVOKE notices from its home. Hot shared pages show here.
    #[serde(default)]
    pub coherence: u64,
}

/// The controller's state: the switch program and the registered hosts.
pub struct Controller {
    fabric: updates::Recorded,
    prefix: NetPrefix,
    force_generic: bool,
    ports: HashMap<String, u32>,
    hosts: BTreeMap<u16, Host>,
    /// Where ALLOCs to the "any server" address go.
    placement: Option<u16>,
    /// Health checks missed in a row before a host is withdrawn.
    misses_allowed: u32,
    /// The controller's own client (with a link), locked on its own: network I/O (health
    /// checks, migrations, notices) holds this, never the controller's state (see
    /// [`actions`]).
    link: Arc<Mutex<Option<Client<AnyTransport>>>>,
    /// Pages with a migration under way (planned, not yet finished or abandoned).
    migrating: std::collections::BTreeSet<Ipv6Addr>,
    /// Pages migrated away from their home host: page /112 → the host holding it.
    page_routes: BTreeMap<Ipv6Addr, u16>,
    /// The controller link's switch-port MAC (its next hop), once attached.
    link_port_mac: Option<[u8; 6]>,
    /// Freed pages reported to the clients.
    invalidations: u64,
    /// Adopted a switch and not every live host has answered or missed a check yet: the
    /// adopted placement stands until then (one STAT must not move it to the only host heard).
    settling: bool,
    /// Copies of a host's pages when its registration does not say (`--replicas`).
    replicas: u8,
    /// The failovers done, newest last.
    failovers: Vec<FailoverReport>,
    /// Migrations finished, and given up.
    migrations: (u64, u64),
    /// Pages reported freed lately (a report that comes twice is acted on once).
    recently_freed: freed::RecentlyFreed,
    /// How fast a new backup gets its copy of a host's pages, bytes/s (0: the servers'
    /// default).
    copy_rate: u64,
    /// Health-check rounds in a row in which several servers were silent at once.
    stalled_rounds: u32,
    /// The health checks' interval when changed at run time.
    health_interval: Option<std::time::Duration>,
}

/// Rounds in a row in which several servers may be silent at once before their misses count.
pub const STALLED_ROUNDS_MAX: u32 = 50;

/// INVALIDATE notices to send: the pages freed and the client links to tell.
#[derive(Debug, Clone)]
pub(crate) struct Notices {
    pub(crate) pages: Vec<Ipv6Addr>,
    pub(crate) clients: Vec<Ipv6Addr>,
    pub(crate) prefix: NetPrefix,
    pub(crate) port_mac: Option<[u8; 6]>,
}

/// A migration checked against the state, to be copied over the link.
#[derive(Debug, Clone)]
pub(crate) struct MigrationPlan {
    pub(crate) page: bluebridge_proto::RemoteAddr,
    pub(crate) key: Ipv6Addr,
    pub(crate) home: u16,
    pub(crate) from: u16,
    pub(crate) to: u16,
    pub(crate) prefix: NetPrefix,
}

/// One owner of pages on one shard of a host (`bluebridge-ctl owners`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerInfo {
    /// The shard.
    pub shard: usize,
    /// The owner's address.
    pub addr: String,
    /// Pages it holds there.
    pub pages: u32,
    /// Milliseconds since the host last heard from it.
    pub silent_ms: u32,
}

/// What a RECLAIM freed (`bluebridge-ctl reclaim`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reclaimed {
    /// The host.
    pub host: u16,
    /// The owner whose pages went.
    pub owner: String,
    /// How many pages were freed.
    pub pages: u64,
}

/// What a migration did and how long its steps took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Migration {
    /// The page's address.
    pub page: String,
    /// The host that held it.
    pub from: u16,
    /// The host that holds it now.
    pub to: u16,
    /// MIGRATE_OUT: the page frozen at `from` (MOVED from then on) and copied out, µs.
    pub copy_out_us: f64,
    /// MIGRATE_IN: adopted by `to`, µs.
    pub copy_in_us: f64,
    /// The switch's route changed (a /112 installed or removed), µs.
    pub route_update_us: f64,
    /// From the freeze to the new route: how long requests for the page were answered MOVED.
    pub cutover_us: f64,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("backend", &self.fabric.kind())
            .field("hosts", &self.hosts.keys().collect::<Vec<_>>())
            .field("page_routes", &self.page_routes.len())
            .finish_non_exhaustive()
    }
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
        Ok(Self::with_fabric(prefix, Box::new(tor), force_generic))
    }

    /// A controller over the switch namespace's kernel forwarding table instead of the XDP
    /// switch (no source filters, counters, failover answers or invalidation: routes only).
    pub fn new_kernel(prefix: NetPrefix) -> Result<Self, CtlError> {
        Ok(Self::with_fabric(
            prefix,
            Box::new(fabric::KernelFabric::new()?),
            false,
        ))
    }

    /// A controller announcing its routes into FRR routers over BGP (see [`bgp::BgpFabric`]).
    pub fn new_bgp(prefix: NetPrefix, fabric: bgp::BgpFabric) -> Self {
        Self::with_fabric(prefix, Box::new(fabric), false)
    }

    /// A controller programming an Open vSwitch bridge over OpenFlow (see [`ovs::OvsFabric`]).
    pub fn new_ovs(prefix: NetPrefix, fabric: ovs::OvsFabric) -> Self {
        Self::with_fabric(prefix, Box::new(fabric), false)
    }

    /// Applies the route changes made since the last call to the forwarding plane (the BGP and
    /// OVS backends batch them; [`actions`], the API and the supervisor call this each time
    /// they release the controller).
    pub fn commit(&mut self) -> Result<(), CtlError> {
        self.fabric.commit()
    }

    /// A controller with no switch (it holds no hosts and refuses every change): what stands
    /// in for one that is being restarted.
    pub fn detached(prefix: NetPrefix) -> Self {
        Self::with_fabric(prefix, Box::new(fabric::Detached), false)
    }

    fn with_fabric(prefix: NetPrefix, fabric: Box<dyn Fabric>, force_generic: bool) -> Self {
        Controller {
            fabric: updates::Recorded::new(fabric),
            prefix,
            force_generic,
            ports: HashMap::new(),
            hosts: BTreeMap::new(),
            placement: None,
            misses_allowed: 3,
            link: Arc::new(Mutex::new(None)),
            migrating: Default::default(),
            page_routes: BTreeMap::new(),
            link_port_mac: None,
            invalidations: 0,
            settling: false,
            replicas: 1,
            failovers: Vec::new(),
            migrations: (0, 0),
            recently_freed: freed::RecentlyFreed::default(),
            copy_rate: 0,
            stalled_rounds: 0,
            health_interval: None,
        }
    }

    /// `xdp`, `kernel`, `bgp` or `ovs`.
    pub fn backend(&self) -> &'static str {
        self.fabric.kind()
    }

    /// Withdraws a host after `n` health checks in a row go unanswered (default 3).
    pub fn set_misses_allowed(&mut self, n: u32) {
        self.misses_allowed = n.max(1);
    }

    /// How often the supervisor checks every host (its STATs are given up after the same
    /// time); `None` until set, when the supervisor's own configuration stands.
    pub fn set_health_interval(&mut self, every: std::time::Duration) {
        self.health_interval = Some(every.max(std::time::Duration::from_millis(1)));
    }

    /// The health checks' interval and misses allowed (`bluebridge-ctl health`).
    pub fn health_config(&self) -> (Option<std::time::Duration>, u32) {
        (self.health_interval, self.misses_allowed)
    }

    /// Gives the controller its own address (`fd00:bb:7fff::1`) behind switch port `link.port`
    /// and opens a client on `link.ifname`, for health checks, placement and other requests it
    /// makes itself.
    pub fn attach_link(&mut self, link: &LinkSpec) -> Result<(), CtlError> {
        let port = self.port(&link.port)?;
        let port_mac = self.port_mac(&link.port)?;
        let mac = fabric::local_mac(&link.ifname)?;
        let net = self.prefix.host_network(CONTROLLER_HOST);
        self.fabric.allow_source(port, net, 48)?;
        self.fabric.set_controller_port(port)?;
        self.fabric.add_route(
            net,
            48,
            Route {
                ifindex: port,
                dst_mac: mac,
                src_mac: port_mac,
                id: 2 * u32::from(CONTROLLER_HOST.0),
                reject: false,
            },
        )?;
        let mut local = net.octets();
        local[15] = 1;
        let (t, mut ec) = Connect {
            kind: TransportKind::Xdp,
            ifname: link.ifname.clone(),
            local: local.into(),
            next_hop_mac: Some(MacAddr(port_mac)),
            prefix: self.prefix,
            segments: false,
        }
        .open()
        .map_err(|e| {
            CtlError::Invalid(format!(
                "opening the controller's client on {}: {e}",
                link.ifname
            ))
        })?;
        // Health checks: a dead host costs 5 + 10 + 20 + 40 ms per round, not a long backoff
        // (idle servers on a busy machine can take tens of ms to wake).
        ec.rto = std::time::Duration::from_millis(5);
        ec.retries = 3;
        let mut c = Client::new(ec, t);
        c.set_yield_when_idle(true);
        *self.link.lock().unwrap_or_else(PoisonError::into_inner) = Some(c);
        self.link_port_mac = Some(port_mac);
        Ok(())
    }

    /// The controller's link (its own client), for [`actions`].
    pub(crate) fn link(&self) -> Arc<Mutex<Option<Client<AnyTransport>>>> {
        self.link.clone()
    }

    /// Invalidation, the state's part: takes the pages the switch saw freed (a FREE answered
    /// OK), removes the routes of those that had migrated, and says what INVALIDATE notices to
    /// send (every registered client link, `<client prefix>::1`); [`actions::drain_freed`]
    /// sends them.
    pub(crate) fn take_freed(&mut self) -> Result<Notices, CtlError> {
        let mut pages = self.fabric.take_freed();
        // A retransmitted FREE is answered OK again (from the session table) and reported
        // again: one notice per page.
        pages.retain(|&p| self.recently_freed.first(p));
        for &page in &pages {
            if let Some(holder) = self.page_routes.remove(&page) {
                self.fabric.remove_route(page, 112)?;
                if let Some(l) = self.holder_link(holder) {
                    self.fabric.disallow_source(l.ifindex, page, 112)?;
                }
            }
            self.invalidations += 1;
        }
        let clients = self
            .hosts
            .values()
            .filter_map(|h| h.client.as_ref())
            .map(|c| {
                let mut dst = c.net.octets();
                dst[15] = 1;
                Ipv6Addr::from(dst)
            })
            .collect();
        Ok(Notices {
            pages,
            clients,
            prefix: self.prefix,
            port_mac: self.link_port_mac,
        })
    }

    /// One round of health checks (every host's STAT, or why not). A round in which hosts of
    /// more than one server went unanswered at once is not counted as misses, for a while:
    /// servers rarely die together, and a machine (or controller) too busy to answer in time
    /// looks just like that; counting it would fail over one host after another, each
    /// failover making the machine busier. After [`STALLED_ROUNDS_MAX`] such rounds in a row
    /// they count (servers that did die together).
    pub fn health_round(
        &mut self,
        results: Vec<(
            u16,
            Result<bluebridge_proto::message::StatRecord, bluebridge_client::ClientError>,
        )>,
    ) -> Result<(), CtlError> {
        let silent: std::collections::BTreeSet<u16> = results
            .iter()
            .filter(|(_, r)| r.is_err())
            .filter_map(|(id, _)| self.hosts.get(id))
            .filter(|h| !h.health.down)
            .map(|h| h.repl.holder)
            .collect();
        let stalled = silent.len() > 1;
        self.stalled_rounds = if stalled { self.stalled_rounds + 1 } else { 0 };
        for (id, r) in results {
            if r.is_err() && stalled && self.stalled_rounds <= STALLED_ROUNDS_MAX {
                continue;
            }
            self.health_result(id, r)?;
        }
        if self.stalled_rounds == 1 {
            tracing::warn!(servers = ?silent, "several servers silent at once: not counted as misses yet (a stalled machine?)");
        }
        Ok(())
    }

    /// A health check of `id` came back (`Ok`: its STAT) or not: noted, and the placement
    /// updated. Decisions only; [`actions::check_hosts`] does the asking.
    pub fn health_result(
        &mut self,
        id: u16,
        r: Result<bluebridge_proto::message::StatRecord, bluebridge_client::ClientError>,
    ) -> Result<(), CtlError> {
        match r {
            Ok(s) => {
                self.health_ok(id, s.pages_used, s.pages_total)?;
                self.note_replication(id, &s);
            }
            Err(e) => {
                tracing::debug!(host = id, error = %e, "health check missed");
                self.health_missed(id)?;
            }
        }
        self.place().map(|_| ())
    }

    /// Checks a migration of `page` (an address, any opcode) to host `to` against the state
    /// and reserves the page (one migration of a page at a time): what
    /// [`actions::migrate`] then copies without holding the controller's lock.
    pub(crate) fn plan_migration(
        &mut self,
        page: &str,
        to: u16,
    ) -> Result<MigrationPlan, CtlError> {
        use bluebridge_proto::{OpFlags, Opcode, RemoteAddr};

        let addr: Ipv6Addr = page
            .parse()
            .map_err(|_| CtlError::Invalid(format!("`{page}` is not an IPv6 address")))?;
        let page = RemoteAddr::from_ipv6(addr, self.prefix)
            .map_err(|e| CtlError::Invalid(format!("{addr}: {e}")))?
            .with_op(Opcode(0), OpFlags::NONE);
        if page.handle().is_none() {
            return Err(CtlError::Invalid(format!(
                "{addr} names a host, not a page"
            )));
        }
        let dest = self
            .hosts
            .get(&to)
            .ok_or_else(|| CtlError::Invalid(format!("host {to} is not registered")))?;
        // A host whose pages failed over lives on at its new holder.
        if dest.health.down || !self.server_alive(dest.repl.holder) {
            return Err(CtlError::Invalid(format!("host {to} is down")));
        }
        let key = page.to_ipv6();
        let home = page.host_id().0;
        let from = self.page_routes.get(&key).copied().unwrap_or(home);
        if from == to {
            return Err(CtlError::Invalid(format!(
                "the page is on host {to} already"
            )));
        }
        if self
            .link
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
        {
            return Err(CtlError::Invalid(
                "the controller has no link (start it with --link)".into(),
            ));
        }
        if !self.migrating.insert(key) {
            return Err(CtlError::Invalid(format!(
                "a migration of {key} is under way"
            )));
        }
        Ok(MigrationPlan {
            page,
            key,
            home,
            from,
            to,
            prefix: self.prefix,
        })
    }

    /// A planned migration's copy failed: the page is free to migrate again.
    pub(crate) fn abandon_migration(&mut self, plan: &MigrationPlan) {
        self.migrating.remove(&plan.key);
        self.migrations.1 += 1;
    }

    /// A planned migration's page is at `plan.to` now: the switch routes its /112 there (or
    /// drops that route when it came home) and lets the new holder send from its address.
    pub(crate) fn finish_migration(&mut self, plan: &MigrationPlan) -> Result<(), CtlError> {
        self.migrating.remove(&plan.key);
        self.migrations.0 += 1;
        let (key, home, from, to) = (plan.key, plan.home, plan.from, plan.to);
        let dest = self
            .holder_link(to)
            .ok_or_else(|| CtlError::Invalid(format!("host {to} was unregistered meanwhile")))?;
        // The holder answers from the page's address, which is outside its own /48: its port
        // must let that source through (and the previous holder's no longer).
        if from != home
            && let Some(l) = self.holder_link(from)
        {
            self.fabric.disallow_source(l.ifindex, key, 112)?;
        }
        if to != home {
            self.fabric.allow_source(dest.ifindex, key, 112)?;
        }
        if to == home {
            self.fabric.remove_route(key, 112)?;
            self.page_routes.remove(&key);
        } else {
            self.fabric.add_route(
                key,
                112,
                Route {
                    ifindex: dest.ifindex,
                    dst_mac: dest.mac,
                    src_mac: dest.port_mac,
                    // Page routes are not counted per route (the hot-page counters are).
                    id: u32::MAX,
                    reject: false,
                },
            )?;
            self.page_routes.insert(key, to);
        }
        Ok(())
    }

    /// The registered hosts' ids.
    pub fn host_ids(&self) -> Vec<u16> {
        self.hosts.keys().copied().collect()
    }

    fn server_route(h: &Host, id: u32, reject: bool) -> Route {
        Self::link_route(&h.server, id, reject)
    }

    /// The route to the far end of link `l`.
    pub(crate) fn link_route(l: &Link, id: u32, reject: bool) -> Route {
        Route {
            ifindex: l.ifindex,
            dst_mac: l.mac,
            src_mac: l.port_mac,
            id,
            reject,
        }
    }

    /// A health check of `id` answered: occupancy noted; a withdrawn host is restored.
    pub fn health_ok(
        &mut self,
        id: u16,
        pages_used: u64,
        pages_total: u64,
    ) -> Result<(), CtlError> {
        let Some(h) = self.hosts.get_mut(&id) else {
            return Ok(());
        };
        let was_down = h.health.down;
        h.first_miss = None;
        h.health = Health {
            down: false,
            misses: 0,
            pages_used,
            pages_total,
        };
        if was_down && let Some(l) = self.holder_link(id) {
            let r = Self::link_route(&l, 2 * u32::from(id), false);
            let net = self.prefix.host_network(HostId(id));
            self.fabric.add_route(net, 48, r)?;
            if !self.fabric.answers_for_withdrawn() {
                self.fabric.remove_route(net, 112)?;
            }
            tracing::warn!(host = id, "host answers again; its route is restored");
        }
        Ok(())
    }

    /// A health check of `id` went unanswered; after enough in a row its /48 is switched to
    /// answer UNREACHABLE (clients fail fast instead of timing out).
    pub fn health_missed(&mut self, id: u16) -> Result<(), CtlError> {
        let allowed = self.misses_allowed;
        let Some(h) = self.hosts.get_mut(&id) else {
            return Ok(());
        };
        h.health.misses += 1;
        h.first_miss.get_or_insert_with(std::time::Instant::now);
        if h.health.down || h.health.misses < allowed || h.repl.failover_due {
            return Ok(());
        }
        if self.can_fail_over(id) {
            // Its backup takes over (actions::replication_round): no withdrawal, clients
            // retransmit into the switch until the route moves.
            if let Some(h) = self.hosts.get_mut(&id) {
                h.repl.failover_due = true;
            }
            tracing::warn!(
                host = id,
                misses = allowed,
                "host dead: failing over to its backup"
            );
            return Ok(());
        }
        let Some(h) = self.hosts.get_mut(&id) else {
            return Ok(());
        };
        h.health.down = true;
        if !self.fabric.answers_for_withdrawn() {
            // A plain router cannot answer for it: its /48 goes (the fabric withdraws it, so
            // requests for its pages find no route anywhere) and only its host operations'
            // /112 (page handle 0) stays, for the controller's checks to see it come back.
            // Placement avoids it.
            let Some(l) = self.holder_link(id) else {
                return Ok(());
            };
            let r = Self::link_route(&l, 2 * u32::from(id), false);
            let net = self.prefix.host_network(HostId(id));
            self.fabric.add_route(net, 112, r)?;
            self.fabric.remove_route(net, 48)?;
            tracing::warn!(
                host = id,
                "host down: its /48 withdrawn (its host operations' /112 stays for the checks)"
            );
            return Ok(());
        }
        let Some(l) = self.holder_link(id) else {
            return Ok(());
        };
        let r = Self::link_route(&l, 2 * u32::from(id), true);
        let (net, misses) = (self.prefix.host_network(HostId(id)), allowed);
        self.fabric.add_route(net, 48, r)?;
        tracing::warn!(
            host = id,
            misses,
            "host withdrawn: its requests are answered UNREACHABLE"
        );
        Ok(())
    }

    /// Points the "any server" /48 at the live host with the lowest arena occupancy (or makes
    /// it answer UNREACHABLE when none is live). Returns the chosen host.
    pub fn place(&mut self) -> Result<Option<u16>, CtlError> {
        if self.settling {
            let heard = |h: &Host| h.health.down || h.health.pages_total > 0 || h.health.misses > 0;
            if !self.hosts.values().all(heard) {
                return Ok(self.placement);
            }
            self.settling = false;
        }
        let best = self
            .hosts
            .iter()
            .filter(|(_, h)| !h.health.down && h.health.pages_total > 0)
            .min_by(|(a, x), (b, y)| {
                let occ = |h: &Health| h.pages_used as f64 / h.pages_total as f64;
                occ(&x.health).total_cmp(&occ(&y.health)).then(a.cmp(b))
            })
            .map(|(&id, _)| id);
        if best == self.placement {
            return Ok(best);
        }
        let any = self.prefix.host_network(HostId::ANY);
        let target = best.or(self.hosts.keys().next().copied());
        if let Some(h) = target.and_then(|id| self.hosts.get(&id)) {
            let r = Self::server_route(h, ANY_ROUTE_ID, best.is_none());
            self.fabric.add_route(any, 48, r)?;
        }
        tracing::info!(host = ?best, "placement: new pages go to");
        self.placement = best;
        Ok(best)
    }

    /// Every host's health and whether it takes new pages.
    pub fn status(&self) -> Vec<HostStatus> {
        self.hosts
            .iter()
            .map(|(&id, h)| HostStatus {
                id,
                health: h.health,
                placement: self.placement == Some(id),
                replication: h.repl.clone(),
            })
            .collect()
    }

    fn port(&mut self, name: &str) -> Result<u32, CtlError> {
        if let Some(&i) = self.ports.get(name) {
            return Ok(i);
        }
        let i = self.fabric.add_port(name, self.force_generic)?;
        self.ports.insert(name.to_owned(), i);
        Ok(i)
    }

    /// The MAC of switch port `name`.
    fn port_mac(&self, name: &str) -> Result<[u8; 6], CtlError> {
        self.fabric.port_mac(name)
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
        let replicas = spec.replicas.unwrap_or(self.replicas);
        if !(1..=2).contains(&replicas) {
            return Err(CtlError::Invalid(format!(
                "replicas {replicas}: 1 (no backup) or 2 (one backup)"
            )));
        }
        if self.hosts.contains_key(&spec.id) {
            self.unregister(spec.id)?;
        }
        let server = Link {
            ifindex: self.port(&spec.server_port)?,
            port_mac: self.port_mac(&spec.server_port)?,
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
                    port_mac: self.port_mac(port)?,
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
            self.fabric.allow_source(l.ifindex, l.net, l.len)?;
            self.fabric.add_route(
                l.net,
                l.len,
                Route {
                    ifindex: l.ifindex,
                    dst_mac: l.mac,
                    src_mac: l.port_mac,
                    id: rid,
                    reject: false,
                },
            )?;
        }
        tracing::info!(host = spec.id, server_port = %spec.server_port, "host registered");
        let id = spec.id;
        self.hosts.insert(
            id,
            Host {
                spec,
                server,
                client,
                health: Health::default(),
                repl: Replication::new(id, replicas),
                dead: false,
                first_miss: None,
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
        // A down host behind a plain router has only its host operations' /112 left.
        let withdrawn = h.health.down && !self.fabric.answers_for_withdrawn();
        for l in std::iter::once(&h.server).chain(h.client.as_ref()) {
            let len = if withdrawn && l.net == h.server.net && l.len == 48 {
                112
            } else {
                l.len
            };
            self.fabric.remove_route(l.net, len)?;
            self.fabric.disallow_source(l.ifindex, l.net, l.len)?;
        }
        if self.placement == Some(id) {
            self.placement = None;
            let _ = self
                .fabric
                .remove_route(self.prefix.host_network(HostId::ANY), 48);
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
            .fabric
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
            let (from_server, _) = self.fabric.port_counters(h.server.ifindex)?;
            let from_client = match &h.client {
                Some(c) => self.fabric.port_counters(c.ifindex)?.0,
                None => Traffic::default(),
            };
            hosts.push(HostCounters {
                id,
                to_server: self.fabric.route_counters(2 * u32::from(id))?,
                to_client: self.fabric.route_counters(2 * u32::from(id) + 1)?,
                from_server,
                from_client,
            });
        }
        Ok(Counters {
            switch: self.fabric.counters()?,
            invalidations: self.invalidations,
            hosts,
            route_updates: self.fabric.updates(),
            migrations: self.migrations.0,
            migrations_abandoned: self.migrations.1,
            freed_repeats: self.recently_freed.repeats,
        })
    }

    /// The `top` pages with the most requests.
    pub fn hot_pages(&self, top: usize) -> Result<Vec<HotPage>, CtlError> {
        Ok(self
            .fabric
            .hot_pages(top)?
            .into_iter()
            .map(|(a, t)| {
                let o = a.octets();
                HotPage {
                    page: a.to_string(),
                    host: u16::from_be_bytes([o[4], o[5]]),
                    requests: t.requests,
                    coherence: t.coherence,
                }
            })
            .collect())
    }
}
