//! The client of a host of a rack built by `cargo xtask rack` or `cargo xtask dsm` (their
//! layout file lists every host's namespace, client link and switch port).

use std::time::Duration;

use bluebridge_client::{AnyTransport, Client, Connect, ConnectError, TransportKind};
use bluebridge_proto::{HostId, MacAddr, NetPrefix};
use bluebridge_topology::RackHost;

/// Opening a rack host's client failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The host's namespace could not be entered.
    #[error(transparent)]
    Namespace(#[from] bluebridge_topology::TopologyError),
    /// The transport did not open.
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

/// The hosts of the rack layout file `path` (as `cargo xtask rack` or `dsm` wrote it).
pub fn read_layout(path: &std::path::Path) -> anyhow::Result<Vec<RackHost>> {
    use anyhow::Context as _;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).context("parsing the layout")
}

/// Moves the calling thread into host `h`'s namespace and opens its client: AF_XDP on the
/// client link, the given retransmission timeout and retries, giving the CPU away between
/// polls (a rack's clients share this machine's CPUs).
pub fn open_client(
    h: &RackHost,
    rto: Duration,
    retries: u32,
) -> Result<Client<AnyTransport>, OpenError> {
    bluebridge_topology::enter(&h.ns)?;
    let (t, mut ec) = Connect {
        kind: TransportKind::Xdp,
        ifname: h.client_if.clone(),
        local: bluebridge_topology::rack_client_addr(HostId(h.host_id)),
        next_hop_mac: Some(MacAddr(h.client_port_mac)),
        prefix: NetPrefix::DEFAULT,
        segments: false,
    }
    .open()?;
    ec.rto = rto;
    ec.retries = retries;
    let mut c = Client::new(ec, t);
    c.set_yield_when_idle(true);
    Ok(c)
}
