//! Local topologies for BlueBridge: network namespaces joined by veth pairs, created with
//! iproute2 and removed when their guard is dropped — also when a test panics.
//!
//! Links are configured for BlueBridge's data path: no IPv6 address generation (so no
//! link-local address, no DAD, no router solicitations), NOARP (so the kernel never sends a
//! neighbour solicitation on them), and the MTU asked for.
#![forbid(unsafe_code)]

use std::fs::File;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};

mod daemon;
pub mod frr;
mod impair;
mod leafspine;
mod ndp;
pub mod ovs;
mod rack;
pub use daemon::Daemon;
pub use impair::{Impairment, Relay, RelayCounters};
pub use leafspine::{LeafSpine, SPINE_ASN};
pub use ndp::NdpResponder;
pub use rack::{Rack, RackHost, rack_client_addr, rack_client_net};

/// A topology step failed.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// An `ip` command failed.
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it printed.
        stderr: String,
    },
    /// Entering a namespace failed.
    #[error("entering network namespace {ns}: {source}")]
    Enter {
        /// Namespace.
        ns: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Runs a command, failing with its stderr.
pub fn run(cmd: &mut Command) -> Result<String, TopologyError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|e| TopologyError::Command {
        cmd: shown.clone(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(TopologyError::Command {
            cmd: shown,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where controllers pin their switches: a bpf filesystem mounted in the host's mount
/// namespace, so pins made by a daemon inside `ip netns exec` outlive it.
pub const PIN_BASE: &str = "/run/bluebridge/bpf";

/// Mounts a bpf filesystem at [`PIN_BASE`] unless one is there; returns the path. The mount
/// stays (it is shared by every rack; each controller's pins live in its own directory and go
/// with it).
pub fn ensure_pin_base() -> Result<std::path::PathBuf, TopologyError> {
    let base = std::path::PathBuf::from(PIN_BASE);
    let failed = |stderr: String| TopologyError::Command {
        cmd: format!("mount -t bpf bpf {PIN_BASE}"),
        stderr,
    };
    std::fs::create_dir_all(&base).map_err(|e| failed(e.to_string()))?;
    let fs = nix::sys::statfs::statfs(&base).map_err(|e| failed(e.to_string()))?;
    if fs.filesystem_type() != nix::sys::statfs::BPF_FS_MAGIC {
        run(Command::new("mount").args(["-t", "bpf", "bpf", PIN_BASE]))?;
    }
    Ok(base)
}

fn ip(args: &[&str]) -> Result<String, TopologyError> {
    run(Command::new("ip").args(args))
}

/// `ip -n NS …`.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<String, TopologyError> {
    run(Command::new("ip").arg("-n").arg(ns).args(args))
}

/// A network namespace, deleted on drop (with every interface in it).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `name` (which must not exist) with its loopback up.
    pub fn create(name: &str) -> Result<Self, TopologyError> {
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_owned(),
        };
        ip_in(name, &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Moves the calling thread into this namespace (for the rest of the thread's life).
    pub fn enter(&self) -> Result<(), TopologyError> {
        enter(&self.name)
    }

    /// The number of entries in this namespace's IPv6 neighbour table.
    pub fn neighbour_count(&self) -> Result<usize, TopologyError> {
        Ok(ip_in(&self.name, &["-6", "neigh", "show"])?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            tracing::warn!(ns = %self.name, error = %e, "removing network namespace");
        }
    }
}

/// Moves the calling thread into network namespace `name`.
pub fn enter(name: &str) -> Result<(), TopologyError> {
    let f =
        File::open(format!("/var/run/netns/{name}")).map_err(|source| TopologyError::Enter {
            ns: name.into(),
            source,
        })?;
    setns(&f, CloneFlags::CLONE_NEWNET).map_err(|e| TopologyError::Enter {
        ns: name.into(),
        source: e.into(),
    })
}

/// Runs `f` on a thread of its own inside network namespace `name` and returns what it
/// returned; the calling thread stays where it is (a panic in `f` is the caller's).
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T, TopologyError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(name)?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// One end of a link.
#[derive(Debug, Clone)]
pub struct End {
    /// Namespace it is in.
    pub ns: String,
    /// Interface name.
    pub ifname: String,
    /// Its MAC address.
    pub mac: [u8; 6],
}

/// Two namespaces joined by a veth pair: the simplest BlueBridge topology, a client host and
/// a server host directly linked.
#[derive(Debug)]
pub struct Pair {
    /// The client side.
    pub client: End,
    /// The server side.
    pub server: End,
    /// With [`Pair::create_impaired`]: the relay between them (stopped before the namespaces
    /// go).
    pub relay: Option<Relay>,
    _middle_ns: Option<Netns>,
    // Dropped after the ends' descriptions, deleting the namespaces (and the veth with them).
    _client_ns: Netns,
    _server_ns: Netns,
}

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A name prefix unique to this process and call, e.g. `bbt1234x7`: for tests running in
/// parallel.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// Fixed, locally administered MACs so captures are readable: 02:bb:00:00:<side>:<n>.
fn mac_for(side: u8, n: u8) -> [u8; 6] {
    [0x02, 0xbb, 0, 0, side, n]
}

impl Pair {
    /// Creates namespaces `<name>-c` and `<name>-s` joined by veth `<name>c` ⇄ `<name>s` (the
    /// interface names stay within 15 bytes for names up to 14 bytes), links up at `mtu`.
    pub fn create(name: &str, mtu: u16) -> Result<Self, TopologyError> {
        Self::create_multiqueue(name, mtu, 1)
    }

    /// Like [`Pair::create`], with `queues` RX and TX queues on each end. A frame sent on TX
    /// queue `q` of one end arrives on RX queue `q` of the other (with an XDP program attached
    /// there), so a client picks the server queue, and with it the shard, that gets a request.
    pub fn create_multiqueue(name: &str, mtu: u16, queues: u32) -> Result<Self, TopologyError> {
        let client_ns = Netns::create(&format!("{name}-c"))?;
        let server_ns = Netns::create(&format!("{name}-s"))?;
        let (cif, sif) = (format!("{name}c"), format!("{name}s"));
        let (cmac, smac) = (mac_for(1, 1), mac_for(2, 1));
        veth(
            VethEnd {
                ns: client_ns.name(),
                ifname: &cif,
                mac: cmac,
            },
            VethEnd {
                ns: server_ns.name(),
                ifname: &sif,
                mac: smac,
            },
            queues,
            mtu,
        )?;
        Ok(Pair {
            client: End {
                ns: client_ns.name().into(),
                ifname: cif,
                mac: cmac,
            },
            server: End {
                ns: server_ns.name().into(),
                ifname: sif,
                mac: smac,
            },
            relay: None,
            _middle_ns: None,
            _client_ns: client_ns,
            _server_ns: server_ns,
        })
    }

    /// Like [`Pair::create`], but the two hosts are joined through a middle namespace
    /// `<name>-m` whose [`Relay`] forwards every frame and can lose, duplicate and reorder them
    /// (set with `pair.relay.as_ref().unwrap().set(...)`; it starts unimpaired).
    pub fn create_impaired(name: &str, mtu: u16, seed: u64) -> Result<Self, TopologyError> {
        Self::create_impaired_multiqueue(name, mtu, seed, 1)
    }

    /// Like [`Pair::create_impaired`], with `server_queues` queues on the server's link: the
    /// relay's frames reach whichever queue the middle kernel picks for them (by its CPU), so
    /// a multi-queue server gets requests on queues other than their pages' shards.
    pub fn create_impaired_multiqueue(
        name: &str,
        mtu: u16,
        seed: u64,
        server_queues: u32,
    ) -> Result<Self, TopologyError> {
        let middle = Netns::create(&format!("{name}-m"))?;
        let client_ns = Netns::create(&format!("{name}-c"))?;
        let server_ns = Netns::create(&format!("{name}-s"))?;
        let (cif, sif) = (format!("{name}c"), format!("{name}s"));
        let (ma, mb) = (format!("{name}a"), format!("{name}b"));
        let (cmac, smac) = (mac_for(1, 1), mac_for(2, 1));
        for (end, ns, mac, peer, pmac, queues) in [
            (&cif, client_ns.name(), cmac, &ma, mac_for(3, 1), 1),
            (
                &sif,
                server_ns.name(),
                smac,
                &mb,
                mac_for(3, 2),
                server_queues,
            ),
        ] {
            veth(
                VethEnd {
                    ns,
                    ifname: end,
                    mac,
                },
                VethEnd {
                    ns: middle.name(),
                    ifname: peer,
                    mac: pmac,
                },
                queues,
                mtu,
            )?;
        }
        let relay = Relay::start(middle.name(), &ma, cmac, &mb, smac, seed)?;
        Ok(Pair {
            client: End {
                ns: client_ns.name().into(),
                ifname: cif,
                mac: cmac,
            },
            server: End {
                ns: server_ns.name().into(),
                ifname: sif,
                mac: smac,
            },
            relay: Some(relay),
            _middle_ns: Some(middle),
            _client_ns: client_ns,
            _server_ns: server_ns,
        })
    }

    /// What both kernel-routed configurations share: checksums computed by the kernel (veth
    /// would otherwise hand unfinished checksums to an AF_XDP peer), ARP on (a NOARP device
    /// addresses frames to its own MAC), the client's address assigned, the server's /48
    /// delivered locally ("AnyIP") and the client's /48 routed back via a next hop with one
    /// permanent neighbour entry.
    fn prepare_kernel_routing(
        &self,
        client_addr: &str,
        client_net: &str,
        server_net: &str,
    ) -> Result<(), TopologyError> {
        let (c, s) = (&self.client, &self.server);
        for e in [c, s] {
            run(Command::new("ip").args([
                "netns", "exec", &e.ns, "ethtool", "-K", &e.ifname, "tx", "off",
            ]))?;
            ip_in(&e.ns, &["link", "set", "dev", &e.ifname, "arp", "on"])?;
        }
        ip_in(
            &c.ns,
            &[
                "-6",
                "addr",
                "add",
                &format!("{client_addr}/128"),
                "dev",
                &c.ifname,
                "nodad",
            ],
        )?;
        ip_in(
            &s.ns,
            &["-6", "route", "add", "local", server_net, "dev", "lo"],
        )?;
        let lladdr = fmt_mac(c.mac);
        let neigh = [
            "-6",
            "neigh",
            "replace",
            "fe80::bb:1",
            "lladdr",
            &lladdr,
            "dev",
            &s.ifname,
            "nud",
            "permanent",
        ];
        ip_in(&s.ns, &neigh)?;
        ip_in(
            &s.ns,
            &[
                "-6",
                "route",
                "add",
                client_net,
                "via",
                "fe80::bb:1",
                "dev",
                &s.ifname,
            ],
        )?;
        Ok(())
    }

    /// Lets the two kernels carry BlueBridge over UDP (the baseline transport) with one
    /// permanent neighbour entry per host and no neighbour discovery: the client routes the
    /// whole `prefix` via a link-local next hop whose MAC is the server's (see also
    /// `prepare_kernel_routing`).
    pub fn route_kernel_udp(
        &self,
        prefix: &str,
        client_addr: &str,
        client_net: &str,
        server_net: &str,
    ) -> Result<(), TopologyError> {
        self.prepare_kernel_routing(client_addr, client_net, server_net)?;
        let (c, s) = (&self.client, &self.server);
        let lladdr = fmt_mac(s.mac);
        let neigh = [
            "-6",
            "neigh",
            "replace",
            "fe80::bb:2",
            "lladdr",
            &lladdr,
            "dev",
            &c.ifname,
            "nud",
            "permanent",
        ];
        ip_in(&c.ns, &neigh)?;
        ip_in(
            &c.ns,
            &[
                "-6",
                "route",
                "add",
                prefix,
                "via",
                "fe80::bb:2",
                "dev",
                &c.ifname,
            ],
        )?;
        Ok(())
    }

    /// The 2017 prototype's configuration, for demonstrating its failure: like
    /// [`Pair::route_kernel_udp`], except that the client routes the server's /48 *on-link*
    /// (`ip -6 route add <server_net> dev <if>`), so its kernel resolves every page address with
    /// neighbour discovery; an [`NdpResponder`] (returned; keep it alive) answers for all of
    /// them as the prototype's proxy did.
    pub fn route_prototype(
        &self,
        client_addr: &str,
        client_net: &str,
        server_net: &str,
    ) -> Result<NdpResponder, TopologyError> {
        self.prepare_kernel_routing(client_addr, client_net, server_net)?;
        let (c, s) = (&self.client, &self.server);
        ip_in(&c.ns, &["-6", "route", "add", server_net, "dev", &c.ifname])?;
        let bad = |what: String| TopologyError::Command {
            cmd: "route_prototype".into(),
            stderr: what,
        };
        let (net, len) = server_net
            .split_once('/')
            .ok_or_else(|| bad(format!("{server_net} is not NETWORK/LENGTH")))?;
        let net: std::net::Ipv6Addr = net
            .parse()
            .map_err(|_| bad(format!("{net} is not an IPv6 address")))?;
        let len: u8 = len
            .parse()
            .map_err(|_| bad(format!("{len} is not a prefix length")))?;
        NdpResponder::start(&s.ns, &s.ifname, s.mac, net, len)
    }

    /// The client's namespace.
    pub fn client_ns(&self) -> &Netns {
        &self._client_ns
    }

    /// The server's namespace.
    pub fn server_ns(&self) -> &Netns {
        &self._server_ns
    }
}

/// One end of a veth pair to create: namespace, interface name, MAC.
pub(crate) struct VethEnd<'a> {
    pub ns: &'a str,
    pub ifname: &'a str,
    pub mac: [u8; 6],
}

/// Creates a veth pair with `queues` TX and RX queues on each end, then configures both
/// ends ([`configure_link`]).
pub(crate) fn veth(
    a: VethEnd<'_>,
    b: VethEnd<'_>,
    queues: u32,
    mtu: u16,
) -> Result<(), TopologyError> {
    let q = queues.max(1).to_string();
    let (amac, bmac) = (fmt_mac(a.mac), fmt_mac(b.mac));
    ip(&[
        "link",
        "add",
        a.ifname,
        "netns",
        a.ns,
        "address",
        &amac,
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
        "type",
        "veth",
        "peer",
        "name",
        b.ifname,
        "netns",
        b.ns,
        "address",
        &bmac,
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
    ])?;
    configure_link(a.ns, a.ifname, mtu)?;
    configure_link(b.ns, b.ifname, mtu)
}

/// No IPv6 address generation (no link-local, no DAD, no RS), NOARP (no neighbour
/// discovery), MTU, up.
pub fn configure_link(ns: &str, ifname: &str, mtu: u16) -> Result<(), TopologyError> {
    ip_in(ns, &["link", "set", "dev", ifname, "addrgenmode", "none"])?;
    ip_in(
        ns,
        &[
            "link",
            "set",
            "dev",
            ifname,
            "arp",
            "off",
            "mtu",
            &mtu.to_string(),
            "up",
        ],
    )?;
    Ok(())
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// Network namespaces whose names start with `prefix` (to check nothing was left behind).
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}
