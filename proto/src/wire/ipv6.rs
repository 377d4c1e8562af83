//! IPv6 fixed header. BlueBridge frames carry no extension headers: next header is UDP.

use core::net::Ipv6Addr;

use super::{be16, be32, put16, put32};
use crate::FrameError;
use crate::wire::Layer;

pub(crate) mod field {
    use core::ops::Range;
    pub(crate) const VER_TC_FLOW: usize = 0;
    pub(crate) const PAYLOAD_LEN: usize = 4;
    pub(crate) const NEXT_HEADER: usize = 6;
    pub(crate) const HOP_LIMIT: usize = 7;
    pub(crate) const SRC: Range<usize> = 8..24;
    pub(crate) const DST: Range<usize> = 24..40;
    pub(crate) const PAYLOAD: usize = 40;
}

/// Length of the IPv6 fixed header.
pub const HEADER_LEN: usize = field::PAYLOAD;
/// Next-header value of UDP.
pub const NEXT_HEADER_UDP: u8 = 17;
/// Hop limit BlueBridge senders use.
pub const DEFAULT_HOP_LIMIT: u8 = 64;

/// A view of an IPv6 packet.
#[derive(Debug, Clone)]
pub struct Ipv6Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// Wraps a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Self {
        Ipv6Packet { buffer }
    }

    /// Wraps a buffer, checking the header and that the payload length fits the buffer.
    pub fn new_checked(buffer: T) -> Result<Self, FrameError> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// Checks that the buffer holds the header and the payload it announces (a longer buffer,
    /// such as Ethernet padding, is allowed).
    pub fn check_len(&self) -> Result<(), FrameError> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN || len < HEADER_LEN + usize::from(self.payload_len()) {
            return Err(FrameError::Truncated(Layer::Ipv6));
        }
        Ok(())
    }

    /// IP version (6 for a valid packet).
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_TC_FLOW] >> 4
    }

    /// Traffic class.
    pub fn traffic_class(&self) -> u8 {
        ((be32(self.buffer.as_ref(), field::VER_TC_FLOW) >> 20) & 0xff) as u8
    }

    /// Flow label.
    pub fn flow_label(&self) -> u32 {
        be32(self.buffer.as_ref(), field::VER_TC_FLOW) & 0x000f_ffff
    }

    /// Payload length.
    pub fn payload_len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::PAYLOAD_LEN)
    }

    /// Next header.
    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[field::NEXT_HEADER]
    }

    /// Hop limit.
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::HOP_LIMIT]
    }

    /// Source address.
    pub fn src(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buffer.as_ref()[field::SRC]);
        Ipv6Addr::from(a)
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buffer.as_ref()[field::DST]);
        Ipv6Addr::from(a)
    }

    /// The payload, as long as the header says (padding after it is not included).
    pub fn payload(&self) -> &[u8] {
        let end = HEADER_LEN + usize::from(self.payload_len());
        &self.buffer.as_ref()[field::PAYLOAD..end]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    /// Sets version 6, traffic class and flow label.
    pub fn set_ver_tc_flow(&mut self, traffic_class: u8, flow_label: u32) {
        let v = (6u32 << 28) | (u32::from(traffic_class) << 20) | (flow_label & 0x000f_ffff);
        put32(self.buffer.as_mut(), field::VER_TC_FLOW, v);
    }

    /// Sets the payload length.
    pub fn set_payload_len(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::PAYLOAD_LEN, v);
    }

    /// Sets the next header.
    pub fn set_next_header(&mut self, v: u8) {
        self.buffer.as_mut()[field::NEXT_HEADER] = v;
    }

    /// Sets the hop limit.
    pub fn set_hop_limit(&mut self, v: u8) {
        self.buffer.as_mut()[field::HOP_LIMIT] = v;
    }

    /// Sets the source address.
    pub fn set_src(&mut self, a: Ipv6Addr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&a.octets());
    }

    /// Sets the destination address.
    pub fn set_dst(&mut self, a: Ipv6Addr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&a.octets());
    }

    /// The payload, writable (as long as the header says).
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = HEADER_LEN + usize::from(self.payload_len());
        &mut self.buffer.as_mut()[field::PAYLOAD..end]
    }
}

/// A parsed IPv6 header (the fields BlueBridge uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Repr {
    /// Source address.
    pub src: Ipv6Addr,
    /// Destination address.
    pub dst: Ipv6Addr,
    /// Next header.
    pub next_header: u8,
    /// Payload length.
    pub payload_len: u16,
    /// Hop limit.
    pub hop_limit: u8,
}

impl Ipv6Repr {
    /// Reads a checked packet; anything but version 6 is an error.
    pub fn parse<T: AsRef<[u8]>>(p: &Ipv6Packet<T>) -> Result<Self, FrameError> {
        if p.version() != 6 {
            return Err(FrameError::BadIpVersion(p.version()));
        }
        Ok(Ipv6Repr {
            src: p.src(),
            dst: p.dst(),
            next_header: p.next_header(),
            payload_len: p.payload_len(),
            hop_limit: p.hop_limit(),
        })
    }

    /// Writes the header (traffic class and flow label zero).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut Ipv6Packet<T>) {
        p.set_ver_tc_flow(0, 0);
        p.set_payload_len(self.payload_len);
        p.set_next_header(self.next_header);
        p.set_hop_limit(self.hop_limit);
        p.set_src(self.src);
        p.set_dst(self.dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BYTES: [u8; 44] = [
        0x60, 0x00, 0x00, 0x00, // version 6, tc 0, flow 0
        0x00, 0x04, // payload length
        0x11, // UDP
        0x40, // hop limit
        0xfd, 0x00, 0x00, 0xbb, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // src
        0xfd, 0x00, 0x00, 0xbb, 0x00, 0x02, 0, 0, 0, 0, 0, 0, 0, 0x07, 0x20, 0x00, // dst
        0xde, 0xad, 0xbe, 0xef, // payload
    ];

    fn repr() -> Ipv6Repr {
        Ipv6Repr {
            src: "fd00:bb:1::1".parse().unwrap(),
            dst: "fd00:bb:2::7:2000".parse().unwrap(),
            next_header: NEXT_HEADER_UDP,
            payload_len: 4,
            hop_limit: 64,
        }
    }

    #[test]
    fn test_deconstruct() {
        let p = Ipv6Packet::new_checked(&BYTES[..]).unwrap();
        assert_eq!(Ipv6Repr::parse(&p).unwrap(), repr());
        assert_eq!(p.payload(), &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(p.traffic_class(), 0);
        assert_eq!(p.flow_label(), 0);
    }

    #[test]
    fn test_construct() {
        let mut buf = [0u8; 44];
        buf[40..].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        repr().emit(&mut Ipv6Packet::new_unchecked(&mut buf[..]));
        assert_eq!(buf, BYTES);
    }

    #[test]
    fn padding_is_not_payload() {
        let mut buf = [0u8; 50];
        buf[..44].copy_from_slice(&BYTES);
        let p = Ipv6Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.payload().len(), 4);
    }

    #[test]
    fn truncated_and_bad_version() {
        for len in 0..BYTES.len() {
            assert_eq!(
                Ipv6Packet::new_checked(&BYTES[..len]).unwrap_err(),
                FrameError::Truncated(Layer::Ipv6)
            );
        }
        let mut v4 = BYTES;
        v4[0] = 0x45;
        let p = Ipv6Packet::new_checked(&v4[..]).unwrap();
        assert_eq!(Ipv6Repr::parse(&p), Err(FrameError::BadIpVersion(4)));
    }
}
