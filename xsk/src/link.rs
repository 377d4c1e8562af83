//! What the kernel says about an interface, asked with ioctls on a socket of the calling
//! thread's network namespace. (sysfs would answer for the namespace it was mounted in, which
//! is wrong for a thread that entered another namespace with setns.)

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Asking about an interface failed.
#[derive(Debug, thiserror::Error)]
#[error("interface {ifname}: {what}: {source}")]
pub struct LinkError {
    ifname: String,
    what: &'static str,
    #[source]
    source: io::Error,
}

fn err(ifname: &str, what: &'static str, source: io::Error) -> LinkError {
    LinkError {
        ifname: ifname.into(),
        what,
        source,
    }
}

fn control_socket(ifname: &str) -> Result<OwnedFd, LinkError> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err(
            ifname,
            "opening a control socket",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` is a freshly opened descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq_for(ifname: &str) -> Result<libc::ifreq, LinkError> {
    let name = ifname.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(err(
            ifname,
            "interface name",
            io::Error::from(io::ErrorKind::InvalidInput),
        ));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

fn ioctl(
    ifname: &str,
    what: &'static str,
    request: libc::Ioctl,
    req: &mut libc::ifreq,
) -> Result<(), LinkError> {
    let sock = control_socket(ifname)?;
    // SAFETY: `req` is a valid, initialised ifreq naming the interface, and each request used
    // here reads or writes only within the ifreq (or the buffer its ifru_data points to).
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), request, req as *mut libc::ifreq) };
    if r < 0 {
        return Err(err(ifname, what, io::Error::last_os_error()));
    }
    Ok(())
}

/// The interface's index.
pub fn link_index(ifname: &str) -> Result<u32, LinkError> {
    let mut req = ifreq_for(ifname)?;
    ioctl(
        ifname,
        "reading the interface index",
        libc::SIOCGIFINDEX,
        &mut req,
    )?;
    // SAFETY: SIOCGIFINDEX filled the ifru_ifindex member of the union.
    let index = unsafe { req.ifr_ifru.ifru_ifindex };
    u32::try_from(index).map_err(|_| {
        err(
            ifname,
            "negative index",
            io::Error::from(io::ErrorKind::InvalidData),
        )
    })
}

/// The interface's MTU.
pub fn link_mtu(ifname: &str) -> Result<u16, LinkError> {
    let mut req = ifreq_for(ifname)?;
    ioctl(ifname, "reading the MTU", libc::SIOCGIFMTU, &mut req)?;
    // SAFETY: SIOCGIFMTU filled the ifru_mtu member of the union.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    // Loopback says 65536; no IPv6 packet without jumbograms is larger than 65535 anyway.
    Ok(u16::try_from(mtu.max(0)).unwrap_or(u16::MAX))
}

/// The interface's MAC address.
pub fn link_mac(ifname: &str) -> Result<[u8; 6], LinkError> {
    let mut req = ifreq_for(ifname)?;
    ioctl(
        ifname,
        "reading the MAC address",
        libc::SIOCGIFHWADDR,
        &mut req,
    )?;
    // SAFETY: SIOCGIFHWADDR filled the ifru_hwaddr member of the union.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(sa.sa_data) {
        *m = b as u8;
    }
    Ok(mac)
}

/// `struct ethtool_channels` (linux/ethtool.h).
#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

const _: () = assert!(size_of::<EthtoolChannels>() == 36);
const ETHTOOL_GCHANNELS: u32 = 0x3c;

/// How many RX queues the interface has (ethtool channels; 1 if the driver does not say).
pub fn rx_queue_count(ifname: &str) -> Result<u32, LinkError> {
    let mut ch = EthtoolChannels {
        cmd: ETHTOOL_GCHANNELS,
        ..Default::default()
    };
    let mut req = ifreq_for(ifname)?;
    req.ifr_ifru.ifru_data = (&mut ch as *mut EthtoolChannels).cast();
    match ioctl(
        ifname,
        "reading the channel count",
        libc::SIOCETHTOOL,
        &mut req,
    ) {
        Ok(()) => Ok((ch.rx_count + ch.combined_count).max(1)),
        Err(e) if e.source.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(1),
        Err(e) => Err(e),
    }
}

/// `struct ethtool_tcpip6_spec` inside `union ethtool_flow_union` (52 bytes).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FlowUnion {
    ip6src: [u8; 16],
    ip6dst: [u8; 16],
    psrc: [u8; 2],
    pdst: [u8; 2],
    tclass: u8,
    _pad: [u8; 15],
}

/// `struct ethtool_flow_ext` (20 bytes).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FlowExt {
    bytes: [u8; 20],
}

/// `struct ethtool_rx_flow_spec` (168 bytes).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RxFlowSpec {
    flow_type: u32,
    h_u: FlowUnion,
    h_ext: FlowExt,
    m_u: FlowUnion,
    m_ext: FlowExt,
    ring_cookie: u64,
    location: u32,
}

/// `struct ethtool_rxnfc` without its flexible array (192 bytes).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RxNfc {
    cmd: u32,
    flow_type: u32,
    data: u64,
    fs: RxFlowSpec,
    rule_cnt: u32,
}

const _: () = assert!(size_of::<FlowUnion>() == 52);
const _: () = assert!(size_of::<FlowExt>() == 20);
const _: () = assert!(size_of::<RxFlowSpec>() == 168);
const _: () = assert!(std::mem::offset_of!(RxFlowSpec, ring_cookie) == 152);
const _: () = assert!(std::mem::offset_of!(RxNfc, fs) == 16);
const _: () = assert!(size_of::<RxNfc>() == 192);
const ETHTOOL_SRXCLSRLDEL: u32 = 0x31;
const ETHTOOL_SRXCLSRLINS: u32 = 0x32;
const UDP_V6_FLOW: u32 = 0x06;
const RX_CLS_LOC_ANY: u32 = 0xffff_ffff;

fn rxnfc(ifname: &str, what: &'static str, nfc: &mut RxNfc) -> Result<(), LinkError> {
    let mut req = ifreq_for(ifname)?;
    req.ifr_ifru.ifru_data = (nfc as *mut RxNfc).cast();
    ioctl(ifname, what, libc::SIOCETHTOOL, &mut req)
}

/// NIC flow rules that steer each shard's pages to its queue, removed on drop.
#[derive(Debug)]
pub struct FlowRules {
    ifname: String,
    locations: Vec<u32>,
}

impl FlowRules {
    /// Installs one rule per shard on `ifname` (ethtool `SRXCLSRLINS`, in the calling thread's
    /// network namespace): UDP/IPv6 to `port` whose destination address byte 6 — the page
    /// handle's shard field — is `s + 1` goes to RX queue `queues[s]`. Every other bit is
    /// wildcarded, so host operations (byte 6 is 0) stay with RSS. Rules already installed are
    /// removed again if a later one fails; the NIC's refusal (EOPNOTSUPP on drivers without
    /// ntuple filters, such as veth; EINVAL where masked IPv6 rules or automatic locations are
    /// not supported) is the error.
    pub fn install(ifname: &str, port: u16, queues: &[u32]) -> Result<Self, LinkError> {
        let mut rules = FlowRules {
            ifname: ifname.into(),
            locations: Vec::with_capacity(queues.len()),
        };
        for (s, &q) in queues.iter().enumerate() {
            let mut nfc = RxNfc {
                cmd: ETHTOOL_SRXCLSRLINS,
                flow_type: UDP_V6_FLOW,
                ..Default::default()
            };
            nfc.fs.flow_type = UDP_V6_FLOW;
            nfc.fs.h_u.ip6dst[6] = u8::try_from(s + 1).map_err(|_| {
                err(
                    ifname,
                    "more than 255 shards",
                    io::Error::from(io::ErrorKind::InvalidInput),
                )
            })?;
            nfc.fs.m_u.ip6dst[6] = 0xff;
            nfc.fs.h_u.pdst = port.to_be_bytes();
            nfc.fs.m_u.pdst = [0xff; 2];
            nfc.fs.ring_cookie = u64::from(q);
            nfc.fs.location = RX_CLS_LOC_ANY;
            rxnfc(ifname, "installing a flow rule (ethtool -N)", &mut nfc)?;
            rules.locations.push(nfc.fs.location);
        }
        Ok(rules)
    }

    /// Rules installed.
    pub fn len(&self) -> usize {
        self.locations.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.locations.is_empty()
    }
}

impl Drop for FlowRules {
    fn drop(&mut self) {
        for &loc in &self.locations {
            let mut nfc = RxNfc {
                cmd: ETHTOOL_SRXCLSRLDEL,
                ..Default::default()
            };
            nfc.fs.location = loc;
            if let Err(e) = rxnfc(&self.ifname, "removing a flow rule", &mut nfc) {
                tracing::warn!(error = %e, location = loc, "flow rule left on the NIC");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback() {
        assert_eq!(link_mtu("lo").unwrap(), u16::MAX);
        assert_eq!(link_mac("lo").unwrap(), [0; 6]);
        assert!(rx_queue_count("lo").unwrap() >= 1);
        assert_eq!(link_index("lo").unwrap(), 1);
        assert!(link_mtu("no-such-if0").is_err());
        assert!(link_mtu("").is_err());
        // Loopback has no flow director: the refusal is an error, and nothing is left.
        assert!(FlowRules::install("lo", 47872, &[0, 1]).is_err());
    }
}
