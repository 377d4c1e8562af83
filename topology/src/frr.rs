//! An FRR router in a namespace: `zebra` (the kernel's forwarding table as its data plane),
//! `staticd` and `bgpd`, one FRR instance per namespace (`-N <namespace>`, so its sockets are
//! in `/var/run/frr/<namespace>/` and `vtysh -N <namespace>` reaches it). Stopped, and its
//! directory removed, on drop.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::TopologyError;
use crate::daemon::{Daemon, wait_for};

/// Where Debian's FRR keeps its daemons.
const FRR_LIB: &str = "/usr/lib/frr";

/// An eBGP neighbour.
#[derive(Debug, Clone, Copy)]
pub struct BgpPeer {
    /// Its address on the shared link.
    pub addr: Ipv6Addr,
    /// Its AS number.
    pub asn: u32,
}

/// What a router runs.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Its AS number (private: 64512 to 65534).
    pub asn: u32,
    /// Its BGP router id.
    pub router_id: Ipv4Addr,
    /// Its neighbours.
    pub peers: Vec<BgpPeer>,
    /// Announce its static routes (a top-of-rack router holding a controller's routes).
    pub redistribute_static: bool,
}

/// A running FRR instance.
#[derive(Debug)]
pub struct FrrRouter {
    /// Its namespace, also its instance name.
    pub name: String,
    dir: PathBuf,
    peers: usize,
    // bgpd and staticd first, then zebra.
    daemons: Vec<Daemon>,
}

impl FrrRouter {
    /// Starts zebra, staticd and bgpd in namespace `ns` with `config`, and turns IPv6
    /// forwarding on there. The BGP sessions come up in the background
    /// ([`FrrRouter::wait_established`]).
    pub fn start(ns: &str, config: &RouterConfig) -> Result<FrrRouter, TopologyError> {
        let failed = |what: String, e: String| TopologyError::Command {
            cmd: what,
            stderr: e,
        };
        for d in ["zebra", "staticd", "bgpd"] {
            if !std::path::Path::new(FRR_LIB).join(d).exists() {
                return Err(failed(format!("FRR {d}"), "missing: install frr".into()));
            }
        }
        crate::run(Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.forwarding=1",
        ]))?;
        let dir = PathBuf::from("/var/run/frr").join(ns);
        crate::daemon::kill_stale(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| failed(format!("creating {}", dir.display()), e.to_string()))?;
        let mut r = FrrRouter {
            name: ns.to_owned(),
            dir: dir.clone(),
            peers: config.peers.len(),
            daemons: Vec::new(),
        };
        let log = |d: &str| format!("log file {}\n", dir.join(format!("{d}.log")).display());
        let mut bgp = format!(
            "frr defaults datacenter\nhostname {ns}\n{}router bgp {}\n bgp router-id {}\n \
             no bgp ebgp-requires-policy\n no bgp default ipv4-unicast\n",
            log("bgpd"),
            config.asn,
            config.router_id
        );
        for p in &config.peers {
            bgp += &format!(" neighbor {} remote-as {}\n", p.addr, p.asn);
        }
        bgp += " address-family ipv6 unicast\n";
        if config.redistribute_static {
            bgp += "  redistribute static\n";
        }
        for p in &config.peers {
            bgp += &format!("  neighbor {} activate\n", p.addr);
        }
        bgp += " exit-address-family\n";
        let files = [
            ("zebra", format!("hostname {ns}\n{}", log("zebra"))),
            ("staticd", format!("hostname {ns}\n{}", log("staticd"))),
            ("bgpd", bgp),
        ];
        for (d, text) in &files {
            std::fs::write(dir.join(format!("{d}.conf")), text)
                .map_err(|e| failed(format!("writing {d}.conf"), e.to_string()))?;
        }
        crate::run(Command::new("chown").args(["-R", "frr:frr"]).arg(&dir))?;
        for (d, _) in &files {
            let conf = dir.join(format!("{d}.conf")).display().to_string();
            let pid = dir.join(format!("{d}.pid")).display().to_string();
            // -P 0: no TCP vty; vtysh talks over the instance's Unix sockets.
            let daemon = Daemon::spawn(
                ns,
                &format!("{FRR_LIB}/{d}"),
                &["-N", ns, "-f", &conf, "-i", &pid, "-P", "0"],
                &[],
                &dir.join(format!("{d}.out")),
            )?;
            r.daemons.insert(0, daemon);
            let vty = dir.join(format!("{d}.vty"));
            wait_for(
                &format!("FRR {d} in {ns}"),
                Duration::from_secs(15),
                &mut r.daemons,
                || vty.exists(),
            )?;
        }
        Ok(r)
    }

    /// `vtysh -N <name> -c CMD ...`.
    pub fn vtysh(&self, commands: &[&str]) -> Result<String, TopologyError> {
        let mut c = Command::new("vtysh");
        c.args(["-N", &self.name]);
        for cmd in commands {
            c.args(["-c", cmd]);
        }
        crate::run(&mut c)
    }

    /// Waits (`timeout` at most) until every configured session is Established.
    pub fn wait_established(&mut self, timeout: Duration) -> Result<(), TopologyError> {
        let want = self.peers;
        let what = format!("BGP sessions of {}", self.name);
        let mut daemons = std::mem::take(&mut self.daemons);
        let r = wait_for(&what, timeout, &mut daemons, || {
            Self::count(&self.name, want)
        });
        self.daemons = daemons;
        r
    }

    fn count(name: &str, want: usize) -> bool {
        let out = Command::new("vtysh")
            .args(["-N", name, "-c", "show bgp ipv6 unicast summary json"])
            .output();
        out.is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .matches("\"state\":\"Established\"")
                .count()
                >= want
        })
    }

    /// Fails if a daemon has exited.
    pub fn check(&mut self) -> Result<(), TopologyError> {
        self.daemons.iter_mut().try_for_each(Daemon::check)
    }
}

impl Drop for FrrRouter {
    fn drop(&mut self) {
        self.daemons.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
