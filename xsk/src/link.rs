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
    }
}
