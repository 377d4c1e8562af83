//! UDP header, with the checksum over the IPv6 pseudo-header (mandatory in IPv6).

use core::net::Ipv6Addr;

use super::{be16, put16};
use crate::FrameError;
use crate::checksum::{self, Checksum};
use crate::wire::Layer;
use crate::wire::ipv6::NEXT_HEADER_UDP;

mod field {
    pub(crate) const SRC_PORT: usize = 0;
    pub(crate) const DST_PORT: usize = 2;
    pub(crate) const LENGTH: usize = 4;
    pub(crate) const CHECKSUM: usize = 6;
    pub(crate) const PAYLOAD: usize = 8;
}

/// Length of the UDP header.
pub const HEADER_LEN: usize = field::PAYLOAD;

/// A view of a UDP datagram.
#[derive(Debug, Clone)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// Wraps a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Self {
        UdpPacket { buffer }
    }

    /// Wraps a buffer, checking that the header and the length it announces fit.
    pub fn new_checked(buffer: T) -> Result<Self, FrameError> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// Checks the header fits and that its length field is at least the header and at most the
    /// buffer.
    pub fn check_len(&self) -> Result<(), FrameError> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(FrameError::Truncated(Layer::Udp));
        }
        let field_len = usize::from(self.len());
        if field_len > len {
            return Err(FrameError::Truncated(Layer::Udp));
        }
        if field_len < HEADER_LEN {
            return Err(FrameError::BadLength(Layer::Udp));
        }
        Ok(())
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SRC_PORT)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::DST_PORT)
    }

    /// Length field (header and payload).
    pub fn len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH)
    }

    /// Whether the datagram has no payload.
    pub fn is_empty(&self) -> bool {
        usize::from(self.len()) <= HEADER_LEN
    }

    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// The payload, as long as the length field says.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..usize::from(self.len())]
    }

    /// Whether the checksum is right for these addresses. A zero checksum is invalid in IPv6.
    pub fn verify_checksum(&self, src: Ipv6Addr, dst: Ipv6Addr) -> bool {
        if self.checksum() == 0 {
            return false;
        }
        let d = &self.buffer.as_ref()[..usize::from(self.len())];
        let mut c = Checksum::new();
        c.add_pseudo_header(src, dst, NEXT_HEADER_UDP, u32::from(self.len()))
            .add_bytes(d);
        c.sum16() == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    /// Sets the source port.
    pub fn set_src_port(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::SRC_PORT, v);
    }

    /// Sets the destination port.
    pub fn set_dst_port(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::DST_PORT, v);
    }

    /// Sets the length field.
    pub fn set_len(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::LENGTH, v);
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, v);
    }

    /// Computes and stores the checksum; the payload must already be in place.
    pub fn fill_checksum(&mut self, src: Ipv6Addr, dst: Ipv6Addr) {
        self.set_checksum(0);
        let len = self.len();
        let mut c = Checksum::new();
        c.add_pseudo_header(src, dst, NEXT_HEADER_UDP, u32::from(len))
            .add_bytes(&self.buffer.as_ref()[..usize::from(len)]);
        self.set_checksum(checksum::udp_field(&c));
    }

    /// The payload, writable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = usize::from(self.len());
        &mut self.buffer.as_mut()[field::PAYLOAD..end]
    }
}

/// A parsed UDP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpRepr {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
}

impl UdpRepr {
    /// Reads a checked datagram, verifying the checksum against the IPv6 addresses.
    pub fn parse<T: AsRef<[u8]>>(
        p: &UdpPacket<T>,
        src: Ipv6Addr,
        dst: Ipv6Addr,
    ) -> Result<Self, FrameError> {
        // Fuzzers cannot forge checksums; accept any under cfg(fuzzing) so they reach the layers
        // behind it.
        if !cfg!(fuzzing) && !p.verify_checksum(src, dst) {
            return Err(FrameError::BadChecksum);
        }
        Ok(UdpRepr {
            src_port: p.src_port(),
            dst_port: p.dst_port(),
        })
    }

    /// Writes ports and length (`HEADER_LEN + payload_len`); the checksum is filled separately
    /// once the payload is in place ([`UdpPacket::fill_checksum`]).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut UdpPacket<T>, payload_len: u16) {
        p.set_src_port(self.src_port);
        p.set_dst_port(self.dst_port);
        p.set_len(payload_len + HEADER_LEN as u16);
        p.set_checksum(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> (Ipv6Addr, Ipv6Addr) {
        (
            "fd00:bb:1::1".parse().unwrap(),
            "fd00:bb:2::7:2000".parse().unwrap(),
        )
    }

    // Checksum computed independently: pseudo-header sum (src, dst, len 12, next header 17)
    // plus header and payload, complemented.
    const BYTES: [u8; 12] = [
        0xc0, 0x00, // src port 49152
        0xbb, 0x00, // dst port 47872
        0x00, 0x0c, // length 12
        0xcb, 0xb4, // checksum
        0xde, 0xad, 0xbe, 0xef, // payload
    ];

    #[test]
    fn test_deconstruct() {
        let (s, d) = addrs();
        let p = UdpPacket::new_checked(&BYTES[..]).unwrap();
        assert_eq!(
            UdpRepr::parse(&p, s, d).unwrap(),
            UdpRepr {
                src_port: 49152,
                dst_port: 47872
            }
        );
        assert_eq!(p.payload(), &[0xde, 0xad, 0xbe, 0xef]);
    }

    #[test]
    fn test_construct() {
        let (s, d) = addrs();
        let mut buf = [0u8; 12];
        buf[8..].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        let mut p = UdpPacket::new_unchecked(&mut buf[..]);
        UdpRepr {
            src_port: 49152,
            dst_port: 47872,
        }
        .emit(&mut p, 4);
        p.fill_checksum(s, d);
        assert_eq!(buf, BYTES);
    }

    #[test]
    fn bad_checksum_and_lengths() {
        let (s, d) = addrs();
        let mut b = BYTES;
        b[11] ^= 1;
        let p = UdpPacket::new_checked(&b[..]).unwrap();
        assert_eq!(UdpRepr::parse(&p, s, d), Err(FrameError::BadChecksum));
        // The same datagram between other addresses fails too: the pseudo-header counts.
        let p = UdpPacket::new_checked(&BYTES[..]).unwrap();
        assert_eq!(
            UdpRepr::parse(&p, d, "fd00:bb:2::7:2001".parse().unwrap()),
            Err(FrameError::BadChecksum)
        );
        let mut zero = BYTES;
        zero[6] = 0;
        zero[7] = 0;
        let p = UdpPacket::new_checked(&zero[..]).unwrap();
        assert_eq!(UdpRepr::parse(&p, s, d), Err(FrameError::BadChecksum));
        for len in 0..HEADER_LEN {
            assert_eq!(
                UdpPacket::new_checked(&BYTES[..len]).unwrap_err(),
                FrameError::Truncated(Layer::Udp)
            );
        }
        let mut short = BYTES;
        short[5] = 7;
        assert_eq!(
            UdpPacket::new_checked(&short[..]).unwrap_err(),
            FrameError::BadLength(Layer::Udp)
        );
        let mut long = BYTES;
        long[5] = 13;
        assert_eq!(
            UdpPacket::new_checked(&long[..]).unwrap_err(),
            FrameError::Truncated(Layer::Udp)
        );
    }
}
