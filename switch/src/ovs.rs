//! The Open vSwitch backend: the controller's routes and source filters become OpenFlow flows
//! in one bridge of an `ovs-vswitchd` (the userspace `netdev` datapath works, so no kernel
//! module is needed), installed with `ovs-ofctl` over the bridge's management socket, one
//! bundle (applied atomically) per batch; ports join with `ovs-vsctl`.
//!
//! Two tables, as the XDP switch has two steps:
//! - table 0, the source filter: `in_port=P, ipv6_src=NET/LEN, ipv6_dst=PREFIX/32` goes on to
//!   table 1 for every source allowed on port P; any other frame to the deployment's prefix is
//!   dropped as spoofed (priority 10); anything else, not BlueBridge, is dropped (priority 0);
//! - table 1, the routes: `ipv6_dst=NET/LEN` (priority 1000 + LEN, so a migrated page's /112
//!   sits above its host's /48) sets the Ethernet source to the egress port's MAC and the
//!   destination to the host's, decrements the hop limit and outputs to the port (a withdrawn
//!   route drops); a miss is dropped (priority 0).
//!
//! A route's flow carries its counter id as its cookie; `bluebridge-ctl counters` reads the
//! flows' and ports' statistics back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bluebridge_ebpf::{Route, TorCounters, TrafficCounters};
use bluebridge_proto::{MacAddr, NetPrefix};

use crate::CtlError;
use crate::fabric::Fabric;

/// Priority of a route's flow in table 1.
fn route_priority(len: u8) -> u32 {
    1000 + u32::from(len)
}

/// Priority of an allowed source's flow in table 0.
fn source_priority(len: u8) -> u32 {
    100 + u32::from(len)
}

/// An Open vSwitch bridge's flow tables (see the module's documentation).
#[derive(Debug)]
pub struct OvsFabric {
    bridge: String,
    rundir: PathBuf,
    prefix: NetPrefix,
    /// Interface name → OpenFlow port number (= its interface index, requested at add-port).
    ports: HashMap<String, u32>,
    routes: BTreeMap<(Ipv6Addr, u8), Route>,
    sources: BTreeSet<(u32, Ipv6Addr, u8)>,
    /// Flow changes waiting for the next commit, in `ovs-ofctl add-flows` syntax.
    pending: Vec<String>,
}

fn failed(what: &str, out: &std::process::Output) -> CtlError {
    CtlError::Invalid(format!(
        "{what}: {} ({})",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// One flow's statistics from `ovs-ofctl dump-flows`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct FlowStats {
    cookie: u64,
    table: u32,
    priority: u32,
    packets: u64,
    bytes: u64,
}

/// Parses `dump-flows` lines (`cookie=0x2, duration=1.2s, table=1, n_packets=3, n_bytes=4,
/// ..., priority=1048,ipv6,... actions=...`).
fn parse_flows(text: &str) -> Vec<FlowStats> {
    text.lines()
        .filter(|l| l.trim_start().starts_with("cookie="))
        .map(|l| {
            let mut f = FlowStats::default();
            let fields = l.split(" actions=").next().unwrap_or(l);
            for kv in fields.split([',', ' ']).filter(|s| !s.is_empty()) {
                let Some((k, v)) = kv.split_once('=') else {
                    continue;
                };
                let num = |v: &str| v.parse::<u64>().unwrap_or(0);
                match k {
                    "cookie" => {
                        f.cookie = u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap_or(0)
                    }
                    "table" => f.table = num(v) as u32,
                    "priority" => f.priority = num(v) as u32,
                    "n_packets" => f.packets = num(v),
                    "n_bytes" => f.bytes = num(v),
                    _ => {}
                }
            }
            f
        })
        .collect()
}

/// Parses `dump-ports` into port → (received, sent).
fn parse_ports(text: &str) -> HashMap<u32, (TrafficCounters, TrafficCounters)> {
    let mut out: HashMap<u32, (TrafficCounters, TrafficCounters)> = HashMap::new();
    let mut current: Option<u32> = None;
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("port") {
            let num: String = rest
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            current = num.parse().ok();
        }
        let Some(p) = current else { continue };
        for (key, rx) in [("rx pkts=", true), ("tx pkts=", false)] {
            let Some(at) = l.find(key) else { continue };
            let part = &l[at + 3..];
            let field = |k: &str| {
                part.split([',', ' '])
                    .find_map(|kv| kv.strip_prefix(k))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let c = TrafficCounters {
                packets: field("pkts="),
                bytes: field("bytes="),
            };
            let e = out.entry(p).or_default();
            if rx {
                e.0 = c;
            } else {
                e.1 = c;
            }
        }
    }
    out
}

impl OvsFabric {
    /// Takes over `bridge` of the `ovs-vswitchd` whose run directory is `rundir` (its
    /// `BRIDGE.mgmt` and `db.sock` are there): replaces every flow with the two tables' default
    /// drops. The deployment's prefix is `prefix`.
    pub fn new(bridge: &str, rundir: &Path, prefix: NetPrefix) -> Result<Self, CtlError> {
        let mut f = OvsFabric {
            bridge: bridge.to_owned(),
            rundir: rundir.to_owned(),
            prefix,
            ports: HashMap::new(),
            routes: BTreeMap::new(),
            sources: BTreeSet::new(),
            pending: Vec::new(),
        };
        f.ofctl(&["del-flows"], None)?;
        let (net, len) = f.prefix_net();
        f.pending.extend([
            "add table=0,priority=0,actions=drop".to_owned(),
            format!("add table=0,priority=10,ipv6,ipv6_dst={net}/{len},actions=drop"),
            "add table=1,priority=0,actions=drop".to_owned(),
        ]);
        f.commit()?;
        Ok(f)
    }

    fn prefix_net(&self) -> (Ipv6Addr, u8) {
        (self.prefix.network(), 32)
    }

    fn target(&self) -> String {
        format!(
            "unix:{}",
            self.rundir.join(format!("{}.mgmt", self.bridge)).display()
        )
    }

    /// `ovs-ofctl -O OpenFlow15 CMD unix:RUNDIR/BRIDGE.mgmt [-]`, `input` on its stdin.
    fn ofctl(&self, args: &[&str], input: Option<&str>) -> Result<String, CtlError> {
        let (cmd, rest) = args.split_first().expect("a command");
        let mut c = Command::new("ovs-ofctl");
        c.args(["-O", "OpenFlow15"])
            .args(rest.iter().filter(|a| a.starts_with("--")))
            .arg(cmd)
            .arg(self.target())
            .args(rest.iter().filter(|a| !a.starts_with("--")))
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("ovs-ofctl {cmd} on {}", self.bridge);
        let mut child = c
            .spawn()
            .map_err(|e| CtlError::Invalid(format!("{what}: {e} (is Open vSwitch installed?)")))?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(text.as_bytes())
                .map_err(|e| CtlError::Invalid(format!("{what}: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| CtlError::Invalid(format!("{what}: {e}")))?;
        if !out.status.success() {
            return Err(failed(&what, &out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn vsctl(&self, args: &[&str]) -> Result<String, CtlError> {
        let out = Command::new("ovs-vsctl")
            .arg(format!(
                "--db=unix:{}",
                self.rundir.join("db.sock").display()
            ))
            .args(args)
            .output()
            .map_err(|e| {
                CtlError::Invalid(format!("ovs-vsctl: {e} (is Open vSwitch installed?)"))
            })?;
        if !out.status.success() {
            return Err(failed(&format!("ovs-vsctl {}", args.join(" ")), &out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn route_match(net: Ipv6Addr, len: u8) -> String {
        format!(
            "table=1,priority={},ipv6,ipv6_dst={net}/{len}",
            route_priority(len)
        )
    }

    fn source_match(&self, port: u32, net: Ipv6Addr, len: u8) -> String {
        let (p, plen) = self.prefix_net();
        format!(
            "table=0,priority={},in_port={port},ipv6,ipv6_src={net}/{len},ipv6_dst={p}/{plen}",
            source_priority(len)
        )
    }

    fn flows(&self) -> Result<Vec<FlowStats>, CtlError> {
        Ok(parse_flows(&self.ofctl(&["dump-flows"], None)?))
    }
}

impl Fabric for OvsFabric {
    fn kind(&self) -> &'static str {
        "ovs"
    }

    fn add_port(&mut self, ifname: &str, _force_generic: bool) -> Result<u32, CtlError> {
        if let Some(&p) = self.ports.get(ifname) {
            return Ok(p);
        }
        let idx = bluebridge_ebpf::ifindex(ifname)?;
        if !(1..0xff00).contains(&idx) {
            return Err(CtlError::Invalid(format!(
                "{ifname}: interface index {idx} is not an OpenFlow port number"
            )));
        }
        let req = format!("ofport_request={idx}");
        self.vsctl(&[
            "--may-exist",
            "add-port",
            &self.bridge,
            ifname,
            "--",
            "set",
            "Interface",
            ifname,
            &req,
        ])?;
        let got = self.vsctl(&["get", "Interface", ifname, "ofport"])?;
        if got != idx.to_string() {
            return Err(CtlError::Invalid(format!(
                "{ifname} joined {} as OpenFlow port {got}, not {idx}",
                self.bridge
            )));
        }
        self.ports.insert(ifname.to_owned(), idx);
        Ok(idx)
    }

    fn allow_source(&mut self, port: u32, net: Ipv6Addr, len: u8) -> Result<(), CtlError> {
        if self.sources.insert((port, net, len)) {
            let m = self.source_match(port, net, len);
            self.pending.push(format!("add {m},actions=goto_table:1"));
        }
        Ok(())
    }

    fn disallow_source(&mut self, port: u32, net: Ipv6Addr, len: u8) -> Result<(), CtlError> {
        if self.sources.remove(&(port, net, len)) {
            let m = self.source_match(port, net, len);
            self.pending.push(format!("delete_strict {m}"));
        }
        Ok(())
    }

    fn add_route(&mut self, net: Ipv6Addr, len: u8, r: Route) -> Result<(), CtlError> {
        let actions = if r.reject {
            "drop".to_owned()
        } else {
            format!(
                "set_field:{}->eth_src,set_field:{}->eth_dst,dec_ttl,output:{}",
                MacAddr(r.src_mac),
                MacAddr(r.dst_mac),
                r.ifindex
            )
        };
        self.pending.push(format!(
            "add {},cookie={:#x},actions={actions}",
            Self::route_match(net, len),
            r.id
        ));
        self.routes.insert((net, len), r);
        Ok(())
    }

    fn remove_route(&mut self, net: Ipv6Addr, len: u8) -> Result<(), CtlError> {
        if self.routes.remove(&(net, len)).is_some() {
            self.pending
                .push(format!("delete_strict {}", Self::route_match(net, len)));
        }
        Ok(())
    }

    fn routes(&self) -> Result<Vec<(Ipv6Addr, u8, Route)>, CtlError> {
        Ok(self.routes.iter().map(|(&(n, l), &r)| (n, l, r)).collect())
    }

    fn commit(&mut self) -> Result<(), CtlError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut text = std::mem::take(&mut self.pending).join("\n");
        text.push('\n');
        self.ofctl(&["add-flows", "--bundle", "-"], Some(&text))
            .map(drop)
    }

    fn counters(&self) -> Result<TorCounters, CtlError> {
        let mut c = TorCounters::default();
        for f in self.flows()? {
            match (f.table, f.priority) {
                (0, 0) => c.other_dropped += f.packets,
                (0, 10) => c.spoofed += f.packets,
                (1, 0) => c.no_route += f.packets,
                (1, _) => c.forwarded += f.packets,
                _ => {}
            }
        }
        Ok(c)
    }

    fn route_counters(&self, id: u32) -> Result<TrafficCounters, CtlError> {
        let mut t = TrafficCounters::default();
        for f in self.flows()? {
            if f.table == 1 && f.priority > 0 && f.cookie == u64::from(id) {
                t.packets += f.packets;
                t.bytes += f.bytes;
            }
        }
        Ok(t)
    }

    fn port_counters(&self, port: u32) -> Result<(TrafficCounters, TrafficCounters), CtlError> {
        let text = self.ofctl(&["dump-ports", &port.to_string()], None)?;
        Ok(parse_ports(&text).remove(&port).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_parse_with_their_cookies_and_counts() {
        let text = "OFPST_FLOW reply (OF1.5) (xid=0x2):\n cookie=0x2, duration=0.008s, table=1, n_packets=5, n_bytes=4200, idle_age=0, priority=1048,ipv6,ipv6_dst=fd00:bb:1::/48 actions=set_field:02:00:00:00:00:01->eth_src,dec_ttl,output:7\n cookie=0x0, duration=1s, table=0, n_packets=3, n_bytes=9, priority=10,ipv6,ipv6_dst=fd00:bb::/32 actions=drop\n";
        let f = parse_flows(text);
        assert_eq!(f.len(), 2);
        assert_eq!(
            f[0],
            FlowStats {
                cookie: 2,
                table: 1,
                priority: 1048,
                packets: 5,
                bytes: 4200
            }
        );
        assert_eq!((f[1].table, f[1].priority, f[1].packets), (0, 10, 3));
    }

    #[test]
    fn ports_parse_both_directions() {
        let text = "OFPST_PORT reply (OF1.5) (xid=0x2): 1 ports\n  port  7: rx pkts=12, bytes=3400, drop=0, errs=0, frame=0, over=0, crc=0\n           tx pkts=10, bytes=2000, drop=0, errs=0, coll=0\n           duration=5.1s\n";
        let p = parse_ports(text);
        let (rx, tx) = p[&7];
        assert_eq!((rx.packets, rx.bytes), (12, 3400));
        assert_eq!((tx.packets, tx.bytes), (10, 2000));
    }
}
