//! [`Tor`]: the loader of `tor.bpf.c`, the software top-of-rack switch.

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, DevMapHash, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, RingBuf};
use aya::programs::Xdp;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::{Ebpf, EbpfLoader};

use crate::{AttachMode, XdpAction, XdpError, attach_xdp, consts, ifindex, test_run_xdp};

static TOR_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tor.bpf.o"));

const ROUTE_SIZE: usize = consts::BB_TOR_ROUTE_SIZE as usize;
const OFF_ID: usize = consts::BB_TOR_ROUTE_OFF_ROUTE_ID as usize;
const OFF_DST: usize = consts::BB_TOR_ROUTE_OFF_DST_MAC as usize;
const OFF_SRC: usize = consts::BB_TOR_ROUTE_OFF_SRC_MAC as usize;
const OFF_FLAGS: usize = consts::BB_TOR_ROUTE_OFF_FLAGS as usize;

/// Where frames for a prefix go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The egress port's interface index.
    pub ifindex: u32,
    /// The next hop's MAC (the host behind the port).
    pub dst_mac: [u8; 6],
    /// The egress port's own MAC.
    pub src_mac: [u8; 6],
    /// Index of the route's counters (below `BB_TOR_MAX_ROUTE_IDS`; above: not counted).
    pub id: u32,
    /// The host is down: the switch answers requests with UNREACHABLE itself instead of
    /// forwarding them.
    pub reject: bool,
}

impl Route {
    /// `struct bb_tor_route` as bytes, at the offsets `layout` asserts.
    fn to_bytes(self) -> [u8; ROUTE_SIZE] {
        let mut b = [0u8; ROUTE_SIZE];
        b[0..4].copy_from_slice(&self.ifindex.to_ne_bytes());
        b[OFF_ID..OFF_ID + 4].copy_from_slice(&self.id.to_ne_bytes());
        b[OFF_DST..OFF_DST + 6].copy_from_slice(&self.dst_mac);
        b[OFF_SRC..OFF_SRC + 6].copy_from_slice(&self.src_mac);
        let flags = if self.reject {
            consts::BB_TOR_ROUTE_REJECT
        } else {
            0
        };
        b[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&flags.to_ne_bytes());
        b
    }

    fn from_bytes(b: [u8; ROUTE_SIZE]) -> Route {
        let u = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        Route {
            ifindex: u(0),
            id: u(OFF_ID),
            dst_mac: b[OFF_DST..OFF_DST + 6].try_into().expect("6 bytes"),
            src_mac: b[OFF_SRC..OFF_SRC + 6].try_into().expect("6 bytes"),
            reject: u(OFF_FLAGS) & consts::BB_TOR_ROUTE_REJECT != 0,
        }
    }
}

/// Packets and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrafficCounters {
    /// Frames.
    pub packets: u64,
    /// Bytes (whole frames, all buffers).
    pub bytes: u64,
}

/// One page's traffic through the switch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PageTraffic {
    /// Requests to the page.
    pub requests: TrafficCounters,
    /// Its coherence messages (docs/protocol.md §5.18): GET_SHARED, GET_EXCLUSIVE, PUT and
    /// RENEW requests to it, REVOKE notices from its home.
    pub coherence: u64,
}

/// The switch's verdict counters, summed over CPUs (see `bluebridge.h`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TorCounters {
    /// Routed and sent out of their egress port.
    pub forwarded: u64,
    /// BlueBridge frames with no route: dropped.
    pub no_route: u64,
    /// Source outside the ingress port's prefixes: dropped.
    pub spoofed: u64,
    /// Not BlueBridge: dropped.
    pub other_dropped: u64,
    /// Not BlueBridge: passed to the switch's kernel.
    pub other_passed: u64,
    /// Headers cut short: dropped.
    pub malformed: u64,
    /// Hop limit exhausted: dropped.
    pub hop_limit: u64,
    /// The route's egress port is not a switch port: dropped.
    pub no_port: u64,
    /// Requests to a withdrawn host, answered UNREACHABLE by the switch.
    pub rejected: u64,
    /// Freed-page reports lost because the controller had not drained the ring buffer.
    pub freed_lost: u64,
}

/// The switch's maps, pinned under [`Tor::load_pinned`]'s directory by these names.
const MAPS: [&str; 9] = [
    "routes",
    "sources",
    "tx_ports",
    "tor_counters",
    "route_stats",
    "port_stats",
    "page_stats",
    "freed",
    "tor_config",
];

/// Where a pinned switch keeps its pins, and whether they outlive the [`Tor`].
#[derive(Debug)]
struct Pins {
    dir: PathBuf,
    /// Keep the pins (and so the switch) when the `Tor` is dropped.
    keep: bool,
    /// An exclusive lock on `dir`: one switch per directory, released by the kernel however
    /// this process ends.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// The loaded switch program and its maps. Dropping it detaches it from every port and
/// removes its pins, unless [`Tor::keep_pinned`] said otherwise; a process that dies without
/// dropping it (SIGKILL, a crash) leaves a pinned switch forwarding.
pub struct Tor {
    ebpf: Ebpf,
    routes: LpmTrie<MapData, [u8; 16], [u8; ROUTE_SIZE]>,
    sources: LpmTrie<MapData, [u8; 20], u32>,
    tx_ports: DevMapHash<MapData>,
    counters: PerCpuArray<MapData, u64>,
    route_stats: PerCpuArray<MapData, [u64; 2]>,
    port_stats: PerCpuHashMap<MapData, u64, [u64; 2]>,
    page_stats: PerCpuHashMap<MapData, [u8; 16], [u64; 3]>,
    freed: RingBuf<MapData>,
    config: Array<MapData, u32>,
    ports: Vec<(String, u32, AttachMode)>,
    pins: Option<Pins>,
}

fn map_err(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> XdpError {
    let what = what.into();
    move |source| XdpError::Map { what, source }
}

impl Tor {
    /// Loads the program into the kernel (no port yet).
    pub fn load() -> Result<Self, XdpError> {
        Self::load_with(&mut EbpfLoader::new(), None)
    }

    /// Loads the program with its maps and port links pinned in `dir` (on a bpf filesystem),
    /// so that the switch keeps forwarding when this process dies. If `dir` holds a switch
    /// pinned earlier, it is adopted: its maps (routes, sources, counters, everything) are
    /// reused as they are and its ports' links switched atomically to the new program
    /// (`bpf_link_update`: not one frame goes unswitched). Returns the switch and whether it
    /// was adopted.
    pub fn load_pinned(dir: &Path) -> Result<(Self, bool), XdpError> {
        let pin_err = |what: String| {
            move |e: std::io::Error| XdpError::Pin {
                what,
                why: e.to_string(),
            }
        };
        std::fs::create_dir_all(dir).map_err(pin_err(format!("creating {}", dir.display())))?;
        let fs = nix::sys::statfs::statfs(dir).map_err(|e| XdpError::Pin {
            what: format!("statfs {}", dir.display()),
            why: e.to_string(),
        })?;
        if fs.filesystem_type() != nix::sys::statfs::BPF_FS_MAGIC {
            return Err(XdpError::NotBpffs(dir.to_owned()));
        }
        let lock = std::fs::File::open(dir)
            .map_err(pin_err(format!("opening {}", dir.display())))
            .and_then(|f| {
                nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
                    |(_, e)| XdpError::Pin {
                        what: format!("locking {}", dir.display()),
                        why: format!("{e}: another controller holds this switch"),
                    },
                )
            })?;
        let adopted = dir.join(MAPS[0]).exists();
        let mut loader = EbpfLoader::new();
        let paths: Vec<PathBuf> = MAPS.iter().map(|m| dir.join(m)).collect();
        for (m, p) in MAPS.iter().zip(&paths) {
            loader.map_pin_path(m, p.as_path());
        }
        let mut t = Self::load_with(
            &mut loader,
            Some(Pins {
                dir: dir.to_owned(),
                keep: false,
                _lock: lock,
            }),
        )?;
        if adopted {
            t.adopt_links(dir)?;
        }
        Ok((t, adopted))
    }

    fn load_with(loader: &mut EbpfLoader<'_>, pins: Option<Pins>) -> Result<Self, XdpError> {
        let mut ebpf = loader.load(TOR_OBJ).map_err(|source| XdpError::Load {
            object: "tor.bpf.o",
            source,
        })?;
        let mut take = |n: &'static str| ebpf.take_map(n).ok_or(XdpError::Missing(n));
        let routes = LpmTrie::try_from(take("routes")?).map_err(map_err("routes map"))?;
        let sources = LpmTrie::try_from(take("sources")?).map_err(map_err("sources map"))?;
        let tx_ports = DevMapHash::try_from(take("tx_ports")?).map_err(map_err("tx_ports map"))?;
        let counters =
            PerCpuArray::try_from(take("tor_counters")?).map_err(map_err("tor_counters map"))?;
        let route_stats =
            PerCpuArray::try_from(take("route_stats")?).map_err(map_err("route_stats map"))?;
        let port_stats =
            PerCpuHashMap::try_from(take("port_stats")?).map_err(map_err("port_stats map"))?;
        let page_stats =
            PerCpuHashMap::try_from(take("page_stats")?).map_err(map_err("page_stats map"))?;
        let freed = RingBuf::try_from(take("freed")?).map_err(map_err("freed map"))?;
        let config = Array::try_from(take("tor_config")?).map_err(map_err("tor_config map"))?;
        let mut t = Tor {
            ebpf,
            routes,
            sources,
            tx_ports,
            counters,
            route_stats,
            port_stats,
            page_stats,
            freed,
            config,
            ports: Vec::new(),
            pins,
        };
        t.program()?.load().map_err(|source| XdpError::Program {
            what: "loading bb_tor".into(),
            source,
        })?;
        Ok(t)
    }

    /// The pin of a port's link: `port_<drv|skb>_<ifname>`, each `.` of the name written
    /// `:` (bpffs refuses dots in names; interface names never hold a colon).
    fn link_pin(dir: &Path, ifname: &str, mode: AttachMode) -> PathBuf {
        let m = match mode {
            AttachMode::Driver => "drv",
            AttachMode::Generic => "skb",
        };
        dir.join(format!("port_{m}_{}", ifname.replace('.', ":")))
    }

    /// Switches every pinned port link in `dir` to this program. A link whose interface is
    /// gone is unpinned (the kernel detached it with the interface).
    fn adopt_links(&mut self, dir: &Path) -> Result<(), XdpError> {
        let entries = std::fs::read_dir(dir).map_err(|e| XdpError::Pin {
            what: format!("listing {}", dir.display()),
            why: e.to_string(),
        })?;
        let mut found = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let (mode, ifname) = if let Some(n) = name.strip_prefix("port_drv_") {
                (AttachMode::Driver, n.replace(':', "."))
            } else if let Some(n) = name.strip_prefix("port_skb_") {
                (AttachMode::Generic, n.replace(':', "."))
            } else {
                continue;
            };
            found.push((e.path(), mode, ifname));
        }
        found.sort_by(|a, b| a.2.cmp(&b.2));
        for (path, mode, ifname) in found {
            let Ok(idx) = ifindex(&ifname) else {
                tracing::warn!(%ifname, "a pinned port's interface is gone; unpinning its link");
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let pin_err = |why: String| XdpError::Pin {
                what: format!("adopting the link of port {ifname} ({})", path.display()),
                why,
            };
            let pinned = PinnedLink::from_pin(&path).map_err(|e| pin_err(why(&e)))?;
            let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| pin_err(why(&e)))?;
            self.program()?
                .attach_to_link(link)
                .map_err(|e| pin_err(why(&e)))?;
            tracing::debug!(%ifname, ?mode, "bb_tor adopted a pinned port");
            self.ports.push((ifname, idx, mode));
        }
        Ok(())
    }

    /// Leaves the switch forwarding (maps and port links pinned) after this `Tor` is dropped,
    /// for a later [`Tor::load_pinned`] to adopt. No effect on an unpinned switch.
    pub fn keep_pinned(&mut self) {
        if let Some(p) = &mut self.pins {
            p.keep = true;
        }
    }

    /// The pin directory, if pinned.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(|p| p.dir.as_path())
    }

    fn program(&mut self) -> Result<&mut Xdp, XdpError> {
        self.ebpf
            .program_mut("bb_tor")
            .ok_or(XdpError::Missing("program bb_tor"))?
            .try_into()
            .map_err(|source| XdpError::Program {
                what: "bb_tor type".into(),
                source,
            })
    }

    /// Makes `ifname` (in this thread's namespace) a switch port: frames can leave through it,
    /// and the program runs on what arrives (driver mode, generic as a fallback). Returns its
    /// interface index. Frames from it are dropped as spoofed until [`Tor::allow_source`].
    pub fn add_port(&mut self, ifname: &str, force_generic: bool) -> Result<u32, XdpError> {
        let idx = ifindex(ifname)?;
        self.tx_ports
            .insert(idx, idx, None, 0)
            .map_err(|source| XdpError::DevMap {
                what: format!("adding port {ifname}"),
                source,
            })?;
        for dir in [0u64, 1] {
            self.port_stats
                .insert(u64::from(idx) << 1 | dir, zero_stats()?, 0)
                .map_err(map_err(format!("counters of port {ifname}")))?;
        }
        let (mode, id) = attach_xdp(self.program()?, "bb_tor", ifname, force_generic)?;
        if let Some(dir) = self.pins.as_ref().map(|p| p.dir.clone()) {
            let path = Self::link_pin(&dir, ifname, mode);
            let pin_err = |why: String| XdpError::Pin {
                what: format!("pinning the link of port {ifname} at {}", path.display()),
                why,
            };
            let link = self
                .program()?
                .take_link(id)
                .map_err(|e| pin_err(why(&e)))?;
            let fd = FdLink::try_from(link).map_err(|e| pin_err(why(&e)))?;
            // The pin holds the link; the descriptor closes here.
            drop(fd.pin(&path).map_err(|e| pin_err(why(&e)))?);
        }
        self.ports.push((ifname.to_owned(), idx, mode));
        Ok(idx)
    }

    /// The ports: name, interface index, attach mode.
    pub fn ports(&self) -> &[(String, u32, AttachMode)] {
        &self.ports
    }

    /// Accepts frames arriving on port `ifindex` whose source lies in `network/len`.
    pub fn allow_source(
        &mut self,
        ifindex: u32,
        network: Ipv6Addr,
        len: u8,
    ) -> Result<(), XdpError> {
        let key = source_key(ifindex, network, len)?;
        self.sources.insert(&key, 1, 0).map_err(map_err(format!(
            "allowing {network}/{len} on port {ifindex}"
        )))
    }

    /// Stops accepting `network/len` on port `ifindex`.
    pub fn disallow_source(
        &mut self,
        ifindex: u32,
        network: Ipv6Addr,
        len: u8,
    ) -> Result<(), XdpError> {
        let key = source_key(ifindex, network, len)?;
        self.sources.remove(&key).map_err(map_err(format!(
            "disallowing {network}/{len} on port {ifindex}"
        )))
    }

    /// Installs (or replaces) the route for `network/len`.
    pub fn add_route(&mut self, network: Ipv6Addr, len: u8, route: Route) -> Result<(), XdpError> {
        if len > 128 {
            return Err(XdpError::BadPrefixLen(len));
        }
        if route.id < consts::BB_TOR_MAX_ROUTE_IDS {
            // A reused id starts from zero.
            self.route_stats
                .set(route.id, zero_stats()?, 0)
                .map_err(map_err(format!("counters of route {}", route.id)))?;
        }
        let key = Key::new(u32::from(len), network.octets());
        self.routes
            .insert(&key, route.to_bytes(), 0)
            .map_err(map_err(format!("adding route {network}/{len}")))
    }

    /// Removes the route for exactly `network/len`.
    pub fn remove_route(&mut self, network: Ipv6Addr, len: u8) -> Result<(), XdpError> {
        let key = Key::new(u32::from(len), network.octets());
        self.routes
            .remove(&key)
            .map_err(map_err(format!("removing route {network}/{len}")))
    }

    /// Every route: network, length, where to.
    pub fn routes(&self) -> Result<Vec<(Ipv6Addr, u8, Route)>, XdpError> {
        self.routes
            .iter()
            .map(|r| {
                let (k, v) = r.map_err(map_err("listing routes"))?;
                Ok((
                    Ipv6Addr::from(k.data()),
                    k.prefix_len() as u8,
                    Route::from_bytes(v),
                ))
            })
            .collect()
    }

    /// Passes non-BlueBridge frames to the switch's kernel (`true`) or drops them (the
    /// default).
    pub fn set_pass_other(&mut self, pass: bool) -> Result<(), XdpError> {
        let v = if pass { consts::BB_TOR_PASS_OTHER } else { 0 };
        self.config
            .set(consts::BB_TOR_CONFIG_FLAGS, v, 0)
            .map_err(map_err("tor_config"))
    }

    /// Marks port `ifindex` as the controller's: its requests pass through reject routes (health
    /// checks must reach a withdrawn host to see it come back).
    pub fn set_controller_port(&mut self, ifindex: u32) -> Result<(), XdpError> {
        self.config
            .set(consts::BB_TOR_CONFIG_CONTROLLER, ifindex, 0)
            .map_err(map_err("tor_config"))
    }

    /// The verdict counters, summed over CPUs.
    pub fn counters(&self) -> Result<TorCounters, XdpError> {
        let get = |i: u32| -> Result<u64, XdpError> {
            Ok(self
                .counters
                .get(&i, 0)
                .map_err(map_err("reading tor_counters"))?
                .iter()
                .sum())
        };
        Ok(TorCounters {
            forwarded: get(consts::BB_TOR_FORWARDED)?,
            no_route: get(consts::BB_TOR_NO_ROUTE)?,
            spoofed: get(consts::BB_TOR_SPOOFED)?,
            other_dropped: get(consts::BB_TOR_OTHER_DROPPED)?,
            other_passed: get(consts::BB_TOR_OTHER_PASSED)?,
            malformed: get(consts::BB_TOR_MALFORMED)?,
            hop_limit: get(consts::BB_TOR_HOP_LIMIT)?,
            no_port: get(consts::BB_TOR_NO_PORT)?,
            rejected: get(consts::BB_TOR_REJECTED)?,
            freed_lost: get(consts::BB_TOR_FREED_LOST)?,
        })
    }

    /// Frames forwarded along route `id`.
    pub fn route_counters(&self, id: u32) -> Result<TrafficCounters, XdpError> {
        let v = self
            .route_stats
            .get(&id, 0)
            .map_err(map_err(format!("reading the counters of route {id}")))?;
        Ok(sum(v.iter()))
    }

    /// BlueBridge frames received on and sent out of port `ifindex`.
    pub fn port_counters(
        &self,
        ifindex: u32,
    ) -> Result<(TrafficCounters, TrafficCounters), XdpError> {
        let get = |dir: u64| -> Result<TrafficCounters, XdpError> {
            let v = self
                .port_stats
                .get(&(u64::from(ifindex) << 1 | dir), 0)
                .map_err(map_err(format!("reading the counters of port {ifindex}")))?;
            Ok(sum(v.iter()))
        };
        Ok((get(0)?, get(1)?))
    }

    /// Pages freed since the last call (a FREE answered OK went through the switch), as page
    /// addresses (opcode and flags zero).
    pub fn take_freed(&mut self) -> Vec<Ipv6Addr> {
        let mut out = Vec::new();
        while let Some(item) = self.freed.next() {
            if let Ok(b) = <[u8; 16]>::try_from(&*item) {
                out.push(Ipv6Addr::from(b));
            }
        }
        out
    }

    /// The `top` pages that received the most requests through the switch (of the most
    /// recently used 65,536), as page addresses (opcode and flags zero) with their counters.
    pub fn hot_pages(&self, top: usize) -> Result<Vec<(Ipv6Addr, PageTraffic)>, XdpError> {
        let mut all = Vec::new();
        for e in self.page_stats.iter() {
            let (k, v) = e.map_err(map_err("reading page_stats"))?;
            let t = v.iter().fold(PageTraffic::default(), |t, c| PageTraffic {
                requests: TrafficCounters {
                    packets: t.requests.packets + c[0],
                    bytes: t.requests.bytes + c[1],
                },
                coherence: t.coherence + c[2],
            });
            all.push((Ipv6Addr::from(k), t));
        }
        all.sort_by(|a, b| {
            (b.1.requests.packets + b.1.coherence)
                .cmp(&(a.1.requests.packets + a.1.coherence))
                .then(a.0.cmp(&b.0))
        });
        all.truncate(top);
        Ok(all)
    }

    /// Runs the program once on `frame` as if it arrived on `ifindex` (no traffic needed);
    /// returns the verdict and the frame as the program left it.
    pub fn test_run(
        &mut self,
        frame: &[u8],
        ifindex: u32,
    ) -> Result<(XdpAction, Vec<u8>), XdpError> {
        test_run_xdp(self.program()?, frame, Some((ifindex, 0)))
    }
}

/// Zeroed per-CPU counters.
fn zero_stats() -> Result<PerCpuValues<[u64; 2]>, XdpError> {
    let ncpu = aya::util::nr_cpus().map_err(|(_, e)| XdpError::Cpus(e))?;
    PerCpuValues::try_from(vec![[0u64; 2]; ncpu]).map_err(XdpError::Cpus)
}

fn sum<'a>(v: impl Iterator<Item = &'a [u64; 2]>) -> TrafficCounters {
    v.fold(TrafficCounters::default(), |t, c| TrafficCounters {
        packets: t.packets + c[0],
        bytes: t.bytes + c[1],
    })
}

fn source_key(ifindex: u32, network: Ipv6Addr, len: u8) -> Result<Key<[u8; 20]>, XdpError> {
    if len > 128 {
        return Err(XdpError::BadPrefixLen(len));
    }
    let mut data = [0u8; 20];
    data[..4].copy_from_slice(&ifindex.to_be_bytes());
    data[4..].copy_from_slice(&network.octets());
    Ok(Key::new(32 + u32::from(len), data))
}

impl Drop for Tor {
    fn drop(&mut self) {
        let Some(p) = &self.pins else { return };
        if p.keep {
            tracing::info!(dir = %p.dir.display(), "switch left forwarding, pinned");
            return;
        }
        // The links detach when their last reference goes: the pin here, the program's
        // descriptor as the fields drop.
        for &(ref ifname, _, mode) in &self.ports {
            let _ = std::fs::remove_file(Self::link_pin(&p.dir, ifname, mode));
        }
        for m in MAPS {
            let _ = std::fs::remove_file(p.dir.join(m));
        }
        let _ = std::fs::remove_dir(&p.dir);
    }
}

impl std::fmt::Debug for Tor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tor")
            .field("ports", &self.ports)
            .finish_non_exhaustive()
    }
}

/// An error and its causes, for a pin that failed (aya's own text names only the syscall).
fn why(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
