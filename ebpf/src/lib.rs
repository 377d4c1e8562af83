//! The XDP programs of BlueBridge and their loaders.
//!
//! - `steer.bpf.c` runs on every host: it sends BlueBridge frames for this host's prefixes to
//!   the AF_XDP socket of their RX queue and passes everything else to the kernel untouched.
//!   [`Steer`] loads it (aya), attaches it in driver mode (generic mode as a fallback, with a
//!   warning), fills its maps, reads its counters, and detaches it when dropped.
//! - `tor.bpf.c` is the software top-of-rack switch: longest-prefix-match routing of BlueBridge
//!   frames between the ports of a switch namespace, anti-spoofing, counters. [`Tor`] loads it.
#![forbid(unsafe_code)]

mod hot;
mod tor;

mod layout;
pub use hot::{HOT_SLOT_SIZE, HotIndex, HotKey, hot_key, hot_page_sum};
pub use tor::{PageTraffic, Route, Tor, TorCounters, TrafficCounters};

use std::net::Ipv6Addr;
use std::os::fd::AsRawFd;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, MapData, PerCpuArray, XskMap};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode};
use aya::{Ebpf, EbpfError};

/// Constants shared with the C programs, generated from `include/bluebridge.h`.
#[expect(
    missing_docs,
    reason = "documented in bluebridge.h, the file they come from"
)]
pub mod consts {
    include!(concat!(env!("OUT_DIR"), "/consts.rs"));
}

static STEER_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steer.bpf.o"));

/// XDP verdicts, as `BPF_PROG_TEST_RUN` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpAction {
    /// XDP_ABORTED.
    Aborted,
    /// XDP_DROP.
    Drop,
    /// XDP_PASS: on to the kernel's stack.
    Pass,
    /// XDP_TX: back out of the same interface.
    Tx,
    /// XDP_REDIRECT: to a socket, CPU or device.
    Redirect,
    /// Anything else.
    Other(u32),
}

impl From<u32> for XdpAction {
    fn from(v: u32) -> Self {
        match v {
            0 => XdpAction::Aborted,
            1 => XdpAction::Drop,
            2 => XdpAction::Pass,
            3 => XdpAction::Tx,
            4 => XdpAction::Redirect,
            v => XdpAction::Other(v),
        }
    }
}

/// How the program got attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (native XDP): the fast path.
    Driver,
    /// Generic (SKB) XDP: works everywhere, slower; AF_XDP then runs in copy mode.
    Generic,
}

/// Errors of loading, attaching and using an XDP program.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    /// The object could not be loaded (BPF not permitted, verifier rejection, ...).
    #[error("loading {object}: {source} (needs root or CAP_BPF+CAP_NET_ADMIN)")]
    Load {
        /// Which object.
        object: &'static str,
        /// Why.
        #[source]
        source: EbpfError,
    },
    /// The kernel refused the program or an attach.
    #[error("{what}: {source}")]
    Program {
        /// What was attempted.
        what: String,
        /// Why it failed.
        #[source]
        source: ProgramError,
    },
    /// A map operation failed.
    #[error("{what}: {source}")]
    Map {
        /// What was attempted.
        what: String,
        /// Why it failed.
        #[source]
        source: aya::maps::MapError,
    },
    /// The object lacks a map or program the loader expects (a build mismatch).
    #[error("the BPF object has no {0}")]
    Missing(&'static str),
    /// A prefix length above 128.
    #[error("prefix length {0} is above 128")]
    BadPrefixLen(u8),
    /// A device-map operation failed.
    #[error("{what}: {source}")]
    DevMap {
        /// What was attempted.
        what: String,
        /// Why it failed.
        #[source]
        source: aya::maps::xdp::XdpMapError,
    },
    /// The CPUs could not be counted (for per-CPU maps).
    #[error("counting CPUs: {0}")]
    Cpus(#[source] std::io::Error),
    /// The directory for pins is not on a bpf filesystem.
    #[error(
        "{0} is not on a bpf filesystem (mount one first, from the host's mount namespace: \
         mkdir -p {0} && mount -t bpf bpf {0})"
    )]
    NotBpffs(std::path::PathBuf),
    /// Pinning or adopting a pinned object failed.
    #[error("{what}: {why}")]
    Pin {
        /// What was attempted.
        what: String,
        /// Why it failed.
        why: String,
    },
    /// An interface that does not exist (in this network namespace).
    #[error("no interface {ifname}: {source}")]
    NoInterface {
        /// Its name.
        ifname: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The steering program's errors (the crate's one error type).
pub type SteerError = XdpError;

/// Attaches `prog` to `ifname` in driver mode, or generic mode if the driver refuses (logged as
/// a warning); with `force_generic` driver mode is not tried.
fn attach_xdp(
    prog: &mut Xdp,
    name: &str,
    ifname: &str,
    force_generic: bool,
) -> Result<(AttachMode, XdpLinkId), XdpError> {
    let driver = if force_generic {
        Err(None)
    } else {
        prog.attach(ifname, XdpMode::Driver)
            .map(|id| (AttachMode::Driver, id))
            .map_err(Some)
    };
    let (mode, id) = match driver {
        Ok(m) => m,
        Err(e) => {
            if let Some(e) = e {
                tracing::warn!(
                    %ifname, error = %e,
                    "driver-mode XDP refused; falling back to generic mode (slower)"
                );
            }
            let id = prog
                .attach(ifname, XdpMode::Skb)
                .map_err(|source| XdpError::Program {
                    what: format!("attaching {name} to {ifname}"),
                    source,
                })?;
            (AttachMode::Generic, id)
        }
    };
    tracing::info!(%ifname, ?mode, "{name} attached");
    Ok((mode, id))
}

/// Runs `prog` once on `frame` with `BPF_PROG_TEST_RUN`, as if it arrived on `(ifindex,
/// queue)` if given; returns the verdict and the frame as the program left it.
fn test_run_xdp(
    prog: &mut Xdp,
    frame: &[u8],
    on: Option<(u32, u32)>,
) -> Result<(XdpAction, Vec<u8>), XdpError> {
    let mut out = vec![0u8; frame.len() + 256];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex (all u32). The kernel wants data 0 and data_end the frame length.
    let ctx: Vec<u8> = on
        .map(|(ifindex, queue)| {
            [0, frame.len() as u32, 0, ifindex, queue, 0]
                .iter()
                .flat_map(|v| v.to_ne_bytes())
                .collect()
        })
        .unwrap_or_default();
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: on.map(|_| ctx.as_slice()),
        ..Default::default()
    };
    let r = prog.test_run(opts).map_err(|source| XdpError::Program {
        what: "BPF_PROG_TEST_RUN".into(),
        source,
    })?;
    out.truncate(r.data_size_out as usize);
    Ok((XdpAction::from(r.return_value), out))
}

/// The interface index of `ifname` in this thread's network namespace.
pub fn ifindex(ifname: &str) -> Result<u32, XdpError> {
    nix::net::if_::if_nametoindex(ifname).map_err(|e| XdpError::NoInterface {
        ifname: ifname.to_owned(),
        source: e.into(),
    })
}

/// The steer program's counters, summed over CPUs. See `bluebridge.h` for each reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SteerCounters {
    /// Sent to an AF_XDP socket.
    pub redirected: u64,
    /// Passed: not IPv6.
    pub pass_not_ipv6: u64,
    /// Passed: IPv6 but not UDP.
    pub pass_not_udp: u64,
    /// Passed: UDP on other ports.
    pub pass_port: u64,
    /// Passed: BlueBridge port, destination outside our prefixes.
    pub pass_prefix: u64,
    /// Passed: headers cut short.
    pub malformed: u64,
    /// Passed: ours, but no socket on the RX queue.
    pub no_socket: u64,
    /// Dropped: ours, from an address or MAC nobody may be answered at (multicast,
    /// unspecified, loopback).
    pub dropped_source: u64,
    /// Dropped: ours, but sent to another MAC than the interface's.
    pub dropped_mac: u64,
    /// Bounced back with XDP_TX ([`Steer::set_bounce`]).
    pub bounced: u64,
    /// INLINE READs answered in XDP from the hot-page store.
    pub fast_served: u64,
    /// INLINE READs of pages not in the hot store (to the socket).
    pub fast_missed: u64,
    /// INLINE READs whose slot changed under both copies (to the socket).
    pub fast_torn: u64,
    /// INLINE READs of hot pages the program leaves to the socket (a range, segments, another
    /// client's page, a checksum or length it cannot vouch for).
    pub fast_passed: u64,
}

/// The loaded steering program, its maps, and (once attached) its link. Dropping it detaches
/// the program.
pub struct Steer {
    ebpf: Ebpf,
    xsks: XskMap<MapData>,
    prefixes: LpmTrie<MapData, [u8; 16], u32>,
    counters: PerCpuArray<MapData, u64>,
    attached: Option<(String, AttachMode)>,
    hot_slots: u32,
}

impl Steer {
    /// Loads the program into the kernel (not attached yet), with a hot-page store of one
    /// slot (no fast READ is ever served: its index stays empty).
    pub fn load() -> Result<Self, SteerError> {
        Self::load_with_hot_slots(1)
    }

    /// Loads the program with a hot-page store of `slots` slots ([`HOT_SLOT_SIZE`] bytes of
    /// kernel memory each; at least 1).
    pub fn load_with_hot_slots(slots: u32) -> Result<Self, SteerError> {
        let slots = slots.max(1);
        let mut ebpf = aya::EbpfLoader::new()
            .map_max_entries("hot_slots", slots)
            .map_max_entries("hot_index", slots)
            .load(STEER_OBJ)
            .map_err(|source| XdpError::Load {
                object: "steer.bpf.o",
                source,
            })?;
        let map = |e: &mut Ebpf, n: &'static str| e.take_map(n).ok_or(SteerError::Missing(n));
        let xsks = XskMap::try_from(map(&mut ebpf, "xsks")?).map_err(|source| SteerError::Map {
            what: "xsks map".into(),
            source,
        })?;
        let prefixes =
            LpmTrie::try_from(map(&mut ebpf, "prefixes")?).map_err(|source| SteerError::Map {
                what: "prefixes map".into(),
                source,
            })?;
        let counters =
            PerCpuArray::try_from(map(&mut ebpf, "steer_counters")?).map_err(|source| {
                SteerError::Map {
                    what: "steer_counters map".into(),
                    source,
                }
            })?;
        let mut s = Steer {
            ebpf,
            xsks,
            prefixes,
            counters,
            attached: None,
            hot_slots: slots,
        };
        s.program()?.load().map_err(|source| SteerError::Program {
            what: "loading bb_steer".into(),
            source,
        })?;
        Ok(s)
    }

    fn program(&mut self) -> Result<&mut Xdp, SteerError> {
        self.ebpf
            .program_mut("bb_steer")
            .ok_or(SteerError::Missing("program bb_steer"))?
            .try_into()
            .map_err(|source| SteerError::Program {
                what: "bb_steer type".into(),
                source,
            })
    }

    /// From now on only frames to `mac` are taken (frames of ours sent to another MAC are
    /// dropped and counted): the interface's own MAC, set by whoever attaches.
    pub fn set_own_mac(&mut self, mac: [u8; 6]) -> Result<(), SteerError> {
        let v = mac.iter().fold(0u64, |a, &b| a << 8 | u64::from(b))
            | 1u64 << consts::BB_OWN_MAC_SET_BIT;
        self.set_array("own_mac", 0, &v)
    }

    /// Writes entry `index` of the array map `name`.
    fn set_array<V: aya::Pod>(
        &mut self,
        name: &'static str,
        index: u32,
        v: &V,
    ) -> Result<(), SteerError> {
        let mut a: Array<&mut MapData, V> = Array::try_from(
            self.ebpf.map_mut(name).ok_or(SteerError::Missing(name))?,
        )
        .map_err(|source| SteerError::Map {
            what: format!("{name} map"),
            source,
        })?;
        a.set(index, v, 0).map_err(|source| SteerError::Map {
            what: format!("writing {name}[{index}]"),
            source,
        })
    }

    /// The bounce mode (a benchmark baseline): every frame of ours goes straight back out of
    /// the port it came in on with XDP_TX, endpoints swapped, instead of to a socket: the
    /// floor of the path, with no userspace in it.
    pub fn set_bounce(&mut self, on: bool) -> Result<(), SteerError> {
        let v = if on { consts::BB_STEER_MODE_BOUNCE } else { 0 };
        self.set_array("steer_mode", 0, &v)
    }

    /// Attaches to `ifname` in driver mode, or generic mode if the driver refuses (logged as a
    /// warning). With `force_generic` driver mode is not tried.
    pub fn attach(&mut self, ifname: &str, force_generic: bool) -> Result<AttachMode, SteerError> {
        let (mode, _) = attach_xdp(self.program()?, "bb_steer", ifname, force_generic)?;
        self.attached = Some((ifname.to_owned(), mode));
        Ok(mode)
    }

    /// Where the program is attached, if it is.
    pub fn attached(&self) -> Option<(&str, AttachMode)> {
        self.attached.as_ref().map(|(i, m)| (i.as_str(), *m))
    }

    /// Steers frames whose destination lies in `network/len` (e.g. the host's /48).
    pub fn add_prefix(&mut self, network: Ipv6Addr, len: u8) -> Result<(), SteerError> {
        if len > 128 {
            return Err(SteerError::BadPrefixLen(len));
        }
        let key = Key::new(u32::from(len), network.octets());
        self.prefixes
            .insert(&key, 1, 0)
            .map_err(|source| SteerError::Map {
                what: format!("adding prefix {network}/{len}"),
                source,
            })
    }

    /// Stops steering `network/len`.
    pub fn remove_prefix(&mut self, network: Ipv6Addr, len: u8) -> Result<(), SteerError> {
        let key = Key::new(u32::from(len), network.octets());
        self.prefixes
            .remove(&key)
            .map_err(|source| SteerError::Map {
                what: format!("removing prefix {network}/{len}"),
                source,
            })
    }

    /// Puts an AF_XDP socket on RX queue `queue`.
    pub fn set_socket(&mut self, queue: u32, socket: impl AsRawFd) -> Result<(), SteerError> {
        self.xsks
            .set(queue, socket, 0)
            .map_err(|source| SteerError::Map {
                what: format!("registering the AF_XDP socket of queue {queue}"),
                source,
            })
    }

    /// Removes the socket of RX queue `queue`.
    pub fn clear_socket(&mut self, queue: u32) -> Result<(), SteerError> {
        self.xsks.unset(queue).map_err(|source| SteerError::Map {
            what: format!("removing the AF_XDP socket of queue {queue}"),
            source,
        })
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<SteerCounters, SteerError> {
        let get = |i: u32| -> Result<u64, SteerError> {
            let v = self.counters.get(&i, 0).map_err(|source| SteerError::Map {
                what: "reading steer_counters".into(),
                source,
            })?;
            Ok(v.iter().sum())
        };
        Ok(SteerCounters {
            redirected: get(consts::BB_STEER_REDIRECTED)?,
            pass_not_ipv6: get(consts::BB_STEER_PASS_NOT_IPV6)?,
            pass_not_udp: get(consts::BB_STEER_PASS_NOT_UDP)?,
            pass_port: get(consts::BB_STEER_PASS_PORT)?,
            pass_prefix: get(consts::BB_STEER_PASS_PREFIX)?,
            malformed: get(consts::BB_STEER_MALFORMED)?,
            no_socket: get(consts::BB_STEER_NO_SOCKET)?,
            dropped_source: get(consts::BB_STEER_DROP_SOURCE)?,
            dropped_mac: get(consts::BB_STEER_DROP_MAC)?,
            bounced: get(consts::BB_STEER_BOUNCED)?,
            fast_served: get(consts::BB_STEER_FAST_SERVED)?,
            fast_missed: get(consts::BB_STEER_FAST_MISSED)?,
            fast_torn: get(consts::BB_STEER_FAST_TORN)?,
            fast_passed: get(consts::BB_STEER_FAST_PASSED)?,
        })
    }

    /// Runs the program once on `frame` with `BPF_PROG_TEST_RUN` (no interface needed) and
    /// returns its verdict.
    pub fn test_run(&mut self, frame: &[u8]) -> Result<XdpAction, SteerError> {
        self.run_test(frame, None)
    }

    /// Like [`Steer::test_run`], as if the frame arrived on interface `ifindex`, RX queue
    /// `queue` (so a socket registered for that queue can be the redirect target).
    pub fn test_run_on(
        &mut self,
        frame: &[u8],
        ifindex: u32,
        queue: u32,
    ) -> Result<XdpAction, SteerError> {
        self.run_test(frame, Some((ifindex, queue)))
    }

    /// Like [`Steer::test_run`], also returning the frame as the program left it.
    pub fn test_run_frame(&mut self, frame: &[u8]) -> Result<(XdpAction, Vec<u8>), SteerError> {
        test_run_xdp(self.program()?, frame, None)
    }

    fn run_test(&mut self, frame: &[u8], on: Option<(u32, u32)>) -> Result<XdpAction, SteerError> {
        Ok(test_run_xdp(self.program()?, frame, on)?.0)
    }
}

impl std::fmt::Debug for Steer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steer")
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

impl Drop for Steer {
    fn drop(&mut self) {
        if let Some((ifname, _)) = &self.attached {
            // The link is owned by the program inside `ebpf`; dropping it detaches.
            tracing::info!(%ifname, "bb_steer detached");
        }
    }
}
