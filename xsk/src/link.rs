//! What the kernel says about an interface (sysfs).

use std::fs;

/// Reading an interface's attributes failed.
#[derive(Debug, thiserror::Error)]
#[error("interface {ifname}: {what}")]
pub struct LinkError {
    ifname: String,
    what: String,
}

fn attr(ifname: &str, name: &str) -> Result<String, LinkError> {
    let path = format!("/sys/class/net/{ifname}/{name}");
    fs::read_to_string(&path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| LinkError {
            ifname: ifname.into(),
            what: format!("reading {path}: {e}"),
        })
}

/// The interface's MTU.
pub fn link_mtu(ifname: &str) -> Result<u16, LinkError> {
    let s = attr(ifname, "mtu")?;
    s.parse().map_err(|_| LinkError {
        ifname: ifname.into(),
        what: format!("MTU {s:?}"),
    })
}

/// The interface's MAC address.
pub fn link_mac(ifname: &str) -> Result<[u8; 6], LinkError> {
    let s = attr(ifname, "address")?;
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next().unwrap_or("");
        *b = u8::from_str_radix(p, 16).map_err(|_| LinkError {
            ifname: ifname.into(),
            what: format!("MAC {s:?}"),
        })?;
    }
    Ok(out)
}

/// How many RX queues the interface has.
pub fn rx_queue_count(ifname: &str) -> Result<u32, LinkError> {
    let path = format!("/sys/class/net/{ifname}/queues");
    let dir = fs::read_dir(&path).map_err(|e| LinkError {
        ifname: ifname.into(),
        what: format!("reading {path}: {e}"),
    })?;
    Ok(dir
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
        .count() as u32)
}
