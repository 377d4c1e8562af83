//! The BGP backend: the controller hands its routes to FRR routers (the routing stack of SONiC
//! switches), which install them in their kernel forwarding tables and announce them to the
//! rest of the fabric over BGP.
//!
//! Each route becomes an FRR static route on the top-of-rack router its port belongs to,
//! `ipv6 route NET/LEN fe80::bb:1 PORT`, entered with `vtysh` (FRR's own configuration
//! interface; a change is one `vtysh` run per router and batch, whatever its size), and the
//! router's `redistribute static` turns it into a BGP announcement; removing it withdraws it.
//! Behind every port one permanent neighbour entry maps `fe80::bb:1` to the host's MAC: one per
//! host link, never one per page. A port is named `ROUTER/IFNAME`, where `ROUTER` is both the
//! network namespace of the top-of-rack router and the name of its FRR instance (`zebra -N
//! ROUTER`, `vtysh -N ROUTER`), or just `IFNAME` on the daemon's default router
//! (`--frr-instance`, or FRR's unnamed instance in the daemon's own namespace).
//!
//! Like the kernel backend it neither filters sources nor counts per route, and it cannot
//! answer for a withdrawn host: a down host's /48 is withdrawn from the whole fabric instead.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv6Addr;
use std::process::Command;

use bluebridge_ebpf::Route;

use crate::CtlError;
use crate::fabric::{Fabric, NEXT_HOP};

/// One port: an interface on one router.
#[derive(Debug, Clone)]
struct Port {
    name: String,
    router: Option<String>,
    ifname: String,
}

/// Routes handed to FRR routers (see the module's documentation).
#[derive(Debug)]
pub struct BgpFabric {
    default_router: Option<String>,
    /// Port number − 1 → port.
    ports: Vec<Port>,
    routes: BTreeMap<(Ipv6Addr, u8), Route>,
    /// Commands waiting for the next commit, per router.
    pending: BTreeMap<Option<String>, Vec<String>>,
    /// The neighbour entry behind each port: the MAC it maps `fe80::bb:1` to.
    neighbours: HashMap<u32, [u8; 6]>,
}

fn tool_error(what: &str, out: &std::process::Output) -> CtlError {
    let text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let text = if text.is_empty() {
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    } else {
        text
    };
    CtlError::Invalid(format!("{what}: {} ({text})", out.status))
}

fn run(what: &str, cmd: &mut Command) -> Result<std::process::Output, CtlError> {
    let out = cmd
        .output()
        .map_err(|e| CtlError::Invalid(format!("{what}: {e}")))?;
    if !out.status.success() {
        return Err(tool_error(what, &out));
    }
    Ok(out)
}

/// `ip [-n ROUTER] ARGS`.
fn ip(router: Option<&str>) -> Command {
    let mut c = Command::new("ip");
    if let Some(r) = router {
        c.args(["-n", r]);
    }
    c
}

/// The MAC of `ifname` on `router` (`ip -j link show`).
fn interface_mac(router: Option<&str>, ifname: &str) -> Result<[u8; 6], CtlError> {
    let what = format!(
        "looking up port {ifname}{}",
        router
            .map(|r| format!(" on router {r}"))
            .unwrap_or_default()
    );
    let out = run(
        &what,
        ip(router).args(["-j", "link", "show", "dev", ifname]),
    )?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| CtlError::Invalid(format!("{what}: {e}")))?;
    let mac = v[0]["address"]
        .as_str()
        .ok_or_else(|| CtlError::Invalid(format!("{what}: no MAC")))?;
    mac.parse::<bluebridge_proto::MacAddr>()
        .map(|m| m.0)
        .map_err(|_| CtlError::Invalid(format!("{what}: MAC `{mac}`")))
}

impl BgpFabric {
    /// Routes go to the FRR routers of their ports; unqualified port names are on
    /// `default_router` (`None`: FRR's unnamed instance). Checks that its `vtysh` answers.
    pub fn new(default_router: Option<String>) -> Result<Self, CtlError> {
        let f = BgpFabric {
            default_router,
            ports: Vec::new(),
            routes: BTreeMap::new(),
            pending: BTreeMap::new(),
            neighbours: HashMap::new(),
        };
        f.vtysh(f.default_router.as_deref(), &["show version"])?;
        Ok(f)
    }

    fn parse_port(&self, name: &str) -> (Option<String>, String) {
        match name.split_once('/') {
            Some((r, i)) => (Some(r.to_owned()), i.to_owned()),
            None => (self.default_router.clone(), name.to_owned()),
        }
    }

    fn port_of(&self, id: u32) -> Result<&Port, CtlError> {
        id.checked_sub(1)
            .and_then(|i| self.ports.get(i as usize))
            .ok_or_else(|| CtlError::Invalid(format!("no port {id}")))
    }

    /// Runs `commands` in one `vtysh` on `router`; fails on any command FRR refuses.
    fn vtysh(&self, router: Option<&str>, commands: &[&str]) -> Result<String, CtlError> {
        let mut c = Command::new("vtysh");
        if let Some(r) = router {
            c.args(["-N", r]);
        }
        for cmd in commands {
            c.args(["-c", cmd]);
        }
        let what = format!(
            "vtysh{} ({} command(s))",
            router.map(|r| format!(" -N {r}")).unwrap_or_default(),
            commands.len()
        );
        let out = run(&what, &mut c)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // vtysh reports a refused command on its output with a leading `%`.
        if let Some(line) = text.lines().find(|l| l.starts_with('%')) {
            return Err(CtlError::Invalid(format!("{what}: {line}")));
        }
        Ok(text)
    }

    /// The static route command for `r` (`no` form when `remove`).
    fn command(&self, net: Ipv6Addr, len: u8, r: &Route, remove: bool) -> Result<String, CtlError> {
        let target = if r.reject {
            "reject".to_owned()
        } else {
            format!("{NEXT_HOP} {}", self.port_of(r.ifindex)?.ifname)
        };
        let no = if remove { "no " } else { "" };
        Ok(format!("{no}ipv6 route {net}/{len} {target}"))
    }

    fn queue(&mut self, port: u32, cmd: String) -> Result<(), CtlError> {
        let router = self.port_of(port)?.router.clone();
        self.pending.entry(router).or_default().push(cmd);
        Ok(())
    }

    /// The permanent neighbour entry behind `port` for `mac` (once per port and MAC).
    fn neighbour(&mut self, port: u32, mac: [u8; 6]) -> Result<(), CtlError> {
        if self.neighbours.get(&port) == Some(&mac) {
            return Ok(());
        }
        let p = self.port_of(port)?.clone();
        let lladdr = bluebridge_proto::MacAddr(mac).to_string();
        run(
            &format!("adding the next hop's neighbour entry on {}", p.name),
            ip(p.router.as_deref()).args([
                "-6",
                "neigh",
                "replace",
                &NEXT_HOP.to_string(),
                "lladdr",
                &lladdr,
                "dev",
                &p.ifname,
                "nud",
                "permanent",
            ]),
        )?;
        self.neighbours.insert(port, mac);
        Ok(())
    }
}

impl Fabric for BgpFabric {
    fn kind(&self) -> &'static str {
        "bgp"
    }

    fn add_port(&mut self, name: &str, _force_generic: bool) -> Result<u32, CtlError> {
        if let Some(i) = self.ports.iter().position(|p| p.name == name) {
            return Ok(i as u32 + 1);
        }
        let (router, ifname) = self.parse_port(name);
        interface_mac(router.as_deref(), &ifname)?;
        // The neighbour entry behind the port must be used as given: the link resolves
        // addresses (ARP/ND on), though with a permanent entry it never has to.
        run(
            &format!("setting up port {name}"),
            ip(router.as_deref()).args(["link", "set", "dev", &ifname, "arp", "on"]),
        )?;
        self.ports.push(Port {
            name: name.to_owned(),
            router,
            ifname,
        });
        Ok(self.ports.len() as u32)
    }

    fn port_mac(&self, name: &str) -> Result<[u8; 6], CtlError> {
        let (router, ifname) = self.parse_port(name);
        interface_mac(router.as_deref(), &ifname)
    }

    fn allow_source(&mut self, _port: u32, _net: Ipv6Addr, _len: u8) -> Result<(), CtlError> {
        Ok(())
    }

    fn disallow_source(&mut self, _port: u32, _net: Ipv6Addr, _len: u8) -> Result<(), CtlError> {
        Ok(())
    }

    fn add_route(&mut self, net: Ipv6Addr, len: u8, r: Route) -> Result<(), CtlError> {
        if !r.reject {
            self.neighbour(r.ifindex, r.dst_mac)?;
        }
        let same = |o: &Route| o.ifindex == r.ifindex && o.reject == r.reject;
        if let Some(old) = self.routes.get(&(net, len)).copied() {
            if same(&old) {
                self.routes.insert((net, len), r);
                return Ok(());
            }
            let cmd = self.command(net, len, &old, true)?;
            self.queue(old.ifindex, cmd)?;
        }
        let cmd = self.command(net, len, &r, false)?;
        self.queue(r.ifindex, cmd)?;
        self.routes.insert((net, len), r);
        Ok(())
    }

    fn remove_route(&mut self, net: Ipv6Addr, len: u8) -> Result<(), CtlError> {
        let Some(old) = self.routes.remove(&(net, len)) else {
            return Ok(());
        };
        let cmd = self.command(net, len, &old, true)?;
        self.queue(old.ifindex, cmd)
    }

    fn routes(&self) -> Result<Vec<(Ipv6Addr, u8, Route)>, CtlError> {
        Ok(self.routes.iter().map(|(&(n, l), &r)| (n, l, r)).collect())
    }

    fn commit(&mut self) -> Result<(), CtlError> {
        let pending = std::mem::take(&mut self.pending);
        let mut first_error = None;
        for (router, cmds) in pending {
            let mut all = vec!["configure terminal"];
            all.extend(cmds.iter().map(String::as_str));
            if let Err(e) = self.vtysh(router.as_deref(), &all) {
                tracing::error!(error = %e, "FRR refused route changes");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
