//! The BlueBridge address: a remote page, and what to do with it, as one IPv6 address.
//!
//! ```text
//! bits 0..32     network prefix   (NetPrefix, default fd00:bb::/32)
//! bits 32..48    host id          (HostId; a host owns <prefix>:<host>::/48)
//! bits 48..112   page handle      (PageHandle, opaque to clients)
//! bits 112..120  opcode           (Opcode)
//! bits 120..128  op flags         (OpFlags)
//! ```
//!
//! Every route is a plain longest prefix: a host is a /48, one page (all its operations) a /112.

use core::fmt;
use core::net::Ipv6Addr;
use core::str::FromStr;

use crate::codes::{OpFlags, Opcode};

pub(crate) mod field {
    use core::ops::Range;
    pub(crate) const PREFIX: Range<usize> = 0..4;
    pub(crate) const HOST: Range<usize> = 4..6;
    pub(crate) const HANDLE: Range<usize> = 6..14;
    pub(crate) const OPCODE: usize = 14;
    pub(crate) const FLAGS: usize = 15;
}

/// Length in bits of the network prefix.
pub const NET_PREFIX_LEN: u8 = 32;
/// Length in bits of a host's prefix (network prefix + host id).
pub const HOST_PREFIX_LEN: u8 = 48;
/// Length in bits of a page's prefix (everything but opcode and flags).
pub const PAGE_PREFIX_LEN: u8 = 112;

/// Errors of the address codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// The address does not start with the configured network prefix.
    #[error("address {addr} is outside the network prefix {prefix}")]
    OutsidePrefix {
        /// The address that was checked.
        addr: Ipv6Addr,
        /// The configured network prefix.
        prefix: NetPrefix,
    },
    /// A host id that is not a 16-bit number (decimal or 0x-hex).
    #[error("a host id is a 16-bit number, decimal or 0x-hex")]
    BadHostId,
    /// A prefix was given with a length other than /32, or with host bits set.
    #[error("a BlueBridge network prefix is an IPv6 /32 with no bits set past it")]
    BadPrefix,
}

/// The /32 network prefix all BlueBridge addresses of a deployment live in.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetPrefix([u8; 4]);

impl NetPrefix {
    /// `fd00:bb::/32`, a unique-local prefix.
    pub const DEFAULT: NetPrefix = NetPrefix([0xfd, 0x00, 0x00, 0xbb]);

    /// The prefix from its four leading address bytes.
    pub const fn from_bytes(bytes: [u8; 4]) -> Self {
        NetPrefix(bytes)
    }

    /// The four leading address bytes.
    pub const fn octets(self) -> [u8; 4] {
        self.0
    }

    /// The prefix as a network address (`fd00:bb::`).
    pub const fn network(self) -> Ipv6Addr {
        let mut o = [0u8; 16];
        o[0] = self.0[0];
        o[1] = self.0[1];
        o[2] = self.0[2];
        o[3] = self.0[3];
        Ipv6Addr::from_octets(o)
    }

    /// Whether `addr` lies inside this prefix.
    pub fn contains(self, addr: Ipv6Addr) -> bool {
        addr.octets()[field::PREFIX] == self.0
    }

    /// The /48 network of `host` inside this prefix (`fd00:bb:<host>::`).
    pub fn host_network(self, host: HostId) -> Ipv6Addr {
        let mut o = [0u8; 16];
        o[field::PREFIX].copy_from_slice(&self.0);
        o[field::HOST].copy_from_slice(&host.0.to_be_bytes());
        Ipv6Addr::from(o)
    }

    /// A prefix from a network address and length; the length must be 32 and no bit past it set.
    pub fn from_network(network: Ipv6Addr, len: u8) -> Result<Self, AddrError> {
        let o = network.octets();
        if len != NET_PREFIX_LEN || o[4..].iter().any(|&b| b != 0) {
            return Err(AddrError::BadPrefix);
        }
        Ok(NetPrefix([o[0], o[1], o[2], o[3]]))
    }
}

impl Default for NetPrefix {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for NetPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), NET_PREFIX_LEN)
    }
}

impl fmt::Debug for NetPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Parses `fd00:bb::/32` (the `/32` may be left out).
impl FromStr for NetPrefix {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (net, len) = match s.split_once('/') {
            Some((net, len)) => (net, len.parse::<u8>().map_err(|_| AddrError::BadPrefix)?),
            None => (s, NET_PREFIX_LEN),
        };
        let net = net.parse::<Ipv6Addr>().map_err(|_| AddrError::BadPrefix)?;
        Self::from_network(net, len)
    }
}

/// A host's 16-bit id: the host owns `<prefix>:<host>::/48`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostId(pub u16);

impl HostId {
    /// Reserved: "any server"; the switch picks one (anycast ALLOC).
    pub const ANY: HostId = HostId(0xffff);
    /// The controller's host id: its address is in this /48, and only requests from it may
    /// migrate pages.
    pub const CONTROLLER: HostId = HostId(0x7fff);

    /// Whether this is the reserved anycast id.
    pub const fn is_any(self) -> bool {
        self.0 == Self::ANY.0
    }
}

/// Parses `258` or `0x0102`.
impl FromStr for HostId {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(hex) => u16::from_str_radix(hex, 16),
            None => s.parse(),
        }
        .map(HostId)
        .map_err(|_| AddrError::BadHostId)
    }
}

impl fmt::Debug for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#06x}", self.0)
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A page handle: 64 bits chosen by the server, opaque to everyone else.
///
/// Handle 0 never names a page; requests that address a host rather than a page (ALLOC, STAT,
/// PING) carry it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PageHandle(u64);

/// Where a handle's shard field starts (it takes the top 8 bits).
const SHARD_SHIFT: u32 = 56;
/// The opaque bits under the shard field.
pub const SHARD_BITS_MASK: u64 = (1 << SHARD_SHIFT) - 1;
/// The most shards a server may have (the shard field is 1 + the shard index, in a byte).
pub const MAX_SHARDS: usize = 255;

impl PageHandle {
    /// The handle of no page.
    pub const NONE: PageHandle = PageHandle(0);

    /// A handle from its 64 bits.
    pub const fn from_bits(bits: u64) -> Self {
        PageHandle(bits)
    }

    /// The handle's 64 bits.
    pub const fn to_bits(self) -> u64 {
        self.0
    }

    /// Whether this is [`PageHandle::NONE`].
    pub const fn is_none(self) -> bool {
        self.0 == 0
    }

    /// The handle's shard field, in the clear in its top 8 bits (address byte 6): 1 + the
    /// index of the server shard (worker) that owns the page, or 0 for no shard (handle 0).
    /// Everything below it is opaque.
    pub const fn shard_field(self) -> u8 {
        (self.0 >> SHARD_SHIFT) as u8
    }

    /// The shard, of `shards`, that owns the page this handle names: `None` for a handle
    /// with no shard field (handle 0: host operations, served by whichever shard receives
    /// them). A field past `shards` wraps, so every handle has exactly one owner.
    pub const fn shard(self, shards: usize) -> Option<usize> {
        match self.shard_field() {
            0 => None,
            f => Some((f as usize - 1) % if shards == 0 { 1 } else { shards }),
        }
    }

    /// `bits` (at most 56 of them) under the shard field of shard `index`.
    pub const fn with_shard(index: u8, bits: u64) -> Self {
        PageHandle(((index as u64 + 1) << SHARD_SHIFT) | (bits & SHARD_BITS_MASK))
    }
}

impl fmt::Debug for PageHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#018x}", self.0)
    }
}

impl fmt::Display for PageHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A BlueBridge address: a request's IPv6 destination, a reply's IPv6 source.
///
/// Constructed only from a [`NetPrefix`] (or checked against one), so it always lies inside the
/// deployment's prefix.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RemoteAddr([u8; 16]);

impl RemoteAddr {
    /// The address of `op` on page `handle` of `host`.
    pub fn new(
        prefix: NetPrefix,
        host: HostId,
        handle: PageHandle,
        op: Opcode,
        flags: OpFlags,
    ) -> Self {
        let mut o = [0u8; 16];
        o[field::PREFIX].copy_from_slice(&prefix.0);
        o[field::HOST].copy_from_slice(&host.0.to_be_bytes());
        o[field::HANDLE].copy_from_slice(&handle.0.to_be_bytes());
        o[field::OPCODE] = op.0;
        o[field::FLAGS] = flags.0;
        RemoteAddr(o)
    }

    /// The address of a host-level operation (ALLOC, STAT, PING) on `host`.
    pub fn host_op(prefix: NetPrefix, host: HostId, op: Opcode) -> Self {
        Self::new(prefix, host, PageHandle::NONE, op, OpFlags::NONE)
    }

    /// Checks that `addr` lies inside `prefix` and wraps it.
    pub fn from_ipv6(addr: Ipv6Addr, prefix: NetPrefix) -> Result<Self, AddrError> {
        if !prefix.contains(addr) {
            return Err(AddrError::OutsidePrefix { addr, prefix });
        }
        Ok(RemoteAddr(addr.octets()))
    }

    /// The address as IPv6.
    pub const fn to_ipv6(self) -> Ipv6Addr {
        Ipv6Addr::from_octets(self.0)
    }

    /// The 16 address bytes, in network order.
    pub const fn octets(self) -> [u8; 16] {
        self.0
    }

    /// The network prefix the address lies in.
    pub fn prefix(self) -> NetPrefix {
        NetPrefix([self.0[0], self.0[1], self.0[2], self.0[3]])
    }

    /// The host that holds the page (or that is asked, for host-level operations).
    pub fn host_id(self) -> HostId {
        HostId(u16::from_be_bytes([self.0[4], self.0[5]]))
    }

    /// The page handle.
    pub fn handle(self) -> PageHandle {
        let mut h = [0u8; 8];
        h.copy_from_slice(&self.0[field::HANDLE]);
        PageHandle(u64::from_be_bytes(h))
    }

    /// The operation requested.
    pub const fn opcode(self) -> Opcode {
        Opcode(self.0[field::OPCODE])
    }

    /// The operation's flag byte.
    pub const fn flags(self) -> OpFlags {
        OpFlags(self.0[field::FLAGS])
    }

    /// The same page, another operation.
    pub const fn with_op(self, op: Opcode, flags: OpFlags) -> Self {
        let mut o = self.0;
        o[field::OPCODE] = op.0;
        o[field::FLAGS] = flags.0;
        RemoteAddr(o)
    }

    /// The same host and operation, another page.
    pub fn with_handle(self, handle: PageHandle) -> Self {
        let mut o = self.0;
        o[field::HANDLE].copy_from_slice(&handle.0.to_be_bytes());
        RemoteAddr(o)
    }

    /// The page's /112 base address (opcode and flags zero): the key of a per-page route.
    pub const fn page_base(self) -> Ipv6Addr {
        self.with_op(Opcode(0), OpFlags(0)).to_ipv6()
    }
}

impl From<RemoteAddr> for Ipv6Addr {
    fn from(a: RemoteAddr) -> Self {
        a.to_ipv6()
    }
}

impl fmt::Display for RemoteAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.to_ipv6(), f)
    }
}

impl fmt::Debug for RemoteAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "host={:?} op={:?} handle={:?}",
            self.host_id(),
            self.opcode(),
            self.handle()
        )?;
        if self.flags() != OpFlags::NONE {
            write!(f, " flags={:#04x}", self.flags().0)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::format;
    use std::string::ToString;

    use super::*;
    use proptest::prelude::*;

    const ADDR: [u8; 16] = [
        0xfd, 0x00, 0x00, 0xbb, // prefix
        0x01, 0x03, // host
        0x00, 0x00, 0x00, 0x2a, 0x00, 0x00, 0x00, 0x07, // handle
        0x20, // READ
        0x00, // flags
    ];

    #[test]
    fn test_construct() {
        let a = RemoteAddr::new(
            NetPrefix::DEFAULT,
            HostId(0x0103),
            PageHandle::from_bits(0x0000_002a_0000_0007),
            Opcode::READ,
            OpFlags::NONE,
        );
        assert_eq!(a.octets(), ADDR);
        assert_eq!(a.to_string(), "fd00:bb:103:0:2a:0:7:2000");
    }

    #[test]
    fn test_deconstruct() {
        let a = RemoteAddr::from_ipv6(Ipv6Addr::from(ADDR), NetPrefix::DEFAULT).unwrap();
        assert_eq!(a.prefix(), NetPrefix::DEFAULT);
        assert_eq!(a.host_id(), HostId(0x0103));
        assert_eq!(a.handle(), PageHandle::from_bits(0x2a_0000_0007));
        assert_eq!(a.opcode(), Opcode::READ);
        assert_eq!(a.flags(), OpFlags::NONE);
        assert_eq!(
            format!("{a:?}"),
            "host=0x0103 op=READ handle=0x0000002a00000007"
        );
        assert_eq!(
            a.page_base(),
            "fd00:bb:103:0:2a:0:7:0".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn outside_prefix_is_rejected() {
        let ip: Ipv6Addr = "fd00:bc:103::1".parse().unwrap();
        assert_eq!(
            RemoteAddr::from_ipv6(ip, NetPrefix::DEFAULT),
            Err(AddrError::OutsidePrefix {
                addr: ip,
                prefix: NetPrefix::DEFAULT
            })
        );
    }

    #[test]
    fn host_id_parsing() {
        assert_eq!("258".parse::<HostId>(), Ok(HostId(258)));
        assert_eq!("0x0102".parse::<HostId>(), Ok(HostId(0x0102)));
        assert_eq!("0XFFFF".parse::<HostId>(), Ok(HostId::ANY));
        assert_eq!("65536".parse::<HostId>(), Err(AddrError::BadHostId));
        assert_eq!("0x".parse::<HostId>(), Err(AddrError::BadHostId));
        assert_eq!("two".parse::<HostId>(), Err(AddrError::BadHostId));
    }

    #[test]
    fn prefix_parsing() {
        assert_eq!("fd00:bb::/32".parse::<NetPrefix>(), Ok(NetPrefix::DEFAULT));
        assert_eq!("fd00:bb::".parse::<NetPrefix>(), Ok(NetPrefix::DEFAULT));
        assert_eq!(NetPrefix::DEFAULT.to_string(), "fd00:bb::/32");
        assert_eq!(
            "fd00:bb::/48".parse::<NetPrefix>(),
            Err(AddrError::BadPrefix)
        );
        assert_eq!(
            "fd00:bb:1::/32".parse::<NetPrefix>(),
            Err(AddrError::BadPrefix)
        );
        assert_eq!(
            "fd00:bb::/x".parse::<NetPrefix>(),
            Err(AddrError::BadPrefix)
        );
        assert_eq!("nonsense".parse::<NetPrefix>(), Err(AddrError::BadPrefix));
        assert_eq!(
            NetPrefix::DEFAULT.host_network(HostId(7)),
            "fd00:bb:7::".parse::<Ipv6Addr>().unwrap()
        );
    }

    proptest! {
        #[test]
        fn codec_round_trip(p in any::<[u8; 4]>(), host in any::<u16>(), handle in any::<u64>(),
                            op in any::<u8>(), flags in any::<u8>()) {
            let prefix = NetPrefix::from_bytes(p);
            let a = RemoteAddr::new(prefix, HostId(host), PageHandle::from_bits(handle),
                                    Opcode(op), OpFlags(flags));
            let ip: Ipv6Addr = a.into();
            let b = RemoteAddr::from_ipv6(ip, prefix).unwrap();
            prop_assert_eq!(a, b);
            prop_assert_eq!(b.prefix(), prefix);
            prop_assert_eq!(b.host_id(), HostId(host));
            prop_assert_eq!(b.handle().to_bits(), handle);
            prop_assert_eq!(b.opcode(), Opcode(op));
            prop_assert_eq!(b.flags(), OpFlags(flags));
            prop_assert!(prefix.contains(ip));
            // Every operation on one page shares the page's /112 and the host's /48.
            prop_assert_eq!(a.with_op(Opcode::FREE, OpFlags::NONE).page_base(), a.page_base());
            prop_assert_eq!(&ip.octets()[..6], &prefix.host_network(HostId(host)).octets()[..6]);
        }

        #[test]
        fn foreign_addresses_never_decode(ip in any::<[u8; 16]>()) {
            let ip = Ipv6Addr::from(ip);
            let r = RemoteAddr::from_ipv6(ip, NetPrefix::DEFAULT);
            prop_assert_eq!(r.is_ok(), NetPrefix::DEFAULT.contains(ip));
        }
    }
}
