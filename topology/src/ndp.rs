//! An NDP proxy for the prototype's configuration (every page address on-link): answers every
//! neighbour solicitation for an address in a prefix with its own MAC — as the 2017
//! prototype's proxy did, which is exactly what made the client's neighbour table grow by one
//! entry per page address.

use std::net::Ipv6Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use bluebridge_proto::checksum::Checksum;
use pnet_datalink::{Channel, Config};

use crate::TopologyError;

const ICMPV6: u8 = 58;
const NS: u8 = 135;
const NA: u8 = 136;

/// The running responder; stopped on drop.
#[derive(Debug)]
pub struct NdpResponder {
    stop: Arc<AtomicBool>,
    /// Neighbour advertisements sent.
    pub answered: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// The neighbour advertisement answering `ns` (an Ethernet frame holding a neighbour
/// solicitation) for a target inside `prefix`/`len`, from `mac`; `None` for anything else.
pub(crate) fn answer(ns: &[u8], mac: [u8; 6], prefix: Ipv6Addr, len: u8) -> Option<Vec<u8>> {
    // Ethernet 14 + IPv6 40 + ICMPv6 NS 24 (type, code, checksum, reserved, target).
    if ns.len() < 78 || ns[12..14] != [0x86, 0xdd] || ns[20] != ICMPV6 || ns[54] != NS {
        return None;
    }
    let src_mac: [u8; 6] = ns[6..12].try_into().ok()?;
    let asker = Ipv6Addr::from(<[u8; 16]>::try_from(&ns[22..38]).ok()?);
    let target = Ipv6Addr::from(<[u8; 16]>::try_from(&ns[62..78]).ok()?);
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    if u128::from(target) & mask != u128::from(prefix) & mask || asker.is_unspecified() {
        return None;
    }
    let mut f = vec![0u8; 14 + 40 + 32];
    f[0..6].copy_from_slice(&src_mac);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&[0x86, 0xdd]);
    f[14] = 0x60;
    f[18..20].copy_from_slice(&32u16.to_be_bytes());
    f[20] = ICMPV6;
    f[21] = 255;
    f[22..38].copy_from_slice(&target.octets());
    f[38..54].copy_from_slice(&asker.octets());
    let icmp = &mut f[54..];
    icmp[0] = NA;
    icmp[4] = 0x60; // Solicited, Override
    icmp[8..24].copy_from_slice(&target.octets());
    icmp[24] = 2; // target link-layer address option
    icmp[25] = 1;
    icmp[26..32].copy_from_slice(&mac);
    let mut c = Checksum::new();
    c.add_pseudo_header(target, asker, ICMPV6, 32)
        .add_bytes(icmp);
    let sum = c.finish();
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    Some(f)
}

impl NdpResponder {
    /// Answers, on `ifname` in namespace `ns`, every solicitation for `prefix`/`len` with `mac`.
    pub fn start(
        ns: &str,
        ifname: &str,
        mac: [u8; 6],
        prefix: Ipv6Addr,
        len: u8,
    ) -> Result<Self, TopologyError> {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let (ns, ifname) = (ns.to_owned(), ifname.to_owned());
        let (st, an) = (stop.clone(), answered.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let open = || -> Result<_, TopologyError> {
                crate::enter(&ns)?;
                let iface = pnet_datalink::interfaces()
                    .into_iter()
                    .find(|i| i.name == ifname)
                    .ok_or_else(|| TopologyError::Command {
                        cmd: format!("finding {ifname}"),
                        stderr: "no such interface".into(),
                    })?;
                let cfg = Config {
                    read_timeout: Some(Duration::from_millis(20)),
                    ..Config::default()
                };
                match pnet_datalink::channel(&iface, cfg) {
                    Ok(Channel::Ethernet(tx, rx)) => Ok((tx, rx)),
                    Ok(_) => Err(TopologyError::Command {
                        cmd: "raw socket".into(),
                        stderr: "unknown channel".into(),
                    }),
                    Err(e) => Err(TopologyError::Command {
                        cmd: "raw socket".into(),
                        stderr: e.to_string(),
                    }),
                }
            };
            let (mut tx, mut rx) = match open() {
                Ok(x) => {
                    let _ = ready_tx.send(Ok(()));
                    x
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while !st.load(Ordering::Relaxed) {
                let Ok(frame) = rx.next() else { continue };
                if let Some(na) = answer(frame, mac, prefix, len) {
                    let _ = tx.send_to(&na, None);
                    an.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        ready_rx.recv().map_err(|_| TopologyError::Command {
            cmd: "NDP responder".into(),
            stderr: "died".into(),
        })??;
        Ok(NdpResponder {
            stop,
            answered,
            thread: Some(thread),
        })
    }
}

impl Drop for NdpResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_solicitations_for_the_prefix_only() {
        let mut ns = vec![0u8; 86];
        ns[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        ns[12..14].copy_from_slice(&[0x86, 0xdd]);
        ns[14] = 0x60;
        ns[20] = ICMPV6;
        ns[22..38].copy_from_slice(&"fd00:bb:1::1".parse::<Ipv6Addr>().unwrap().octets());
        ns[54] = NS;
        let target: Ipv6Addr = "fd00:bb:2:0:1:2:3:2000".parse().unwrap();
        ns[62..78].copy_from_slice(&target.octets());
        let na = answer(&ns, [2, 0, 0, 0, 0, 2], "fd00:bb:2::".parse().unwrap(), 48).unwrap();
        assert_eq!(&na[0..6], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(na[54], NA);
        assert_eq!(&na[62..78], &target.octets());
        assert_eq!(&na[80..86], &[2, 0, 0, 0, 0, 2]);
        // The checksum verifies: the sum over pseudo-header and message is all ones.
        let mut c = Checksum::new();
        c.add_pseudo_header(target, "fd00:bb:1::1".parse().unwrap(), ICMPV6, 32)
            .add_bytes(&na[54..]);
        assert_eq!(c.sum16(), 0xffff);
        assert!(answer(&ns, [2; 6], "fd00:bb:3::".parse().unwrap(), 48).is_none());
    }
}
