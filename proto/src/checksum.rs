//! The Internet checksum (RFC 1071) and the IPv6 pseudo-header (RFC 8200 §8.1).
//!
//! The sum is accumulated 8 bytes at a time into a u128-free 64-bit accumulator with end-around
//! carry, which is fast enough that checksumming a 4 KiB page costs well under a microsecond.

use core::net::Ipv6Addr;

/// An incremental one's-complement sum over a sequence of byte slices.
///
/// Slices may have odd lengths: the byte position carries over, so feeding a buffer in pieces
/// gives the same result as feeding it whole (needed for multi-buffer frames).
#[derive(Debug, Clone, Copy, Default)]
pub struct Checksum {
    sum: u64,
    odd: bool,
}

impl Checksum {
    /// An empty sum.
    pub const fn new() -> Self {
        Checksum { sum: 0, odd: false }
    }

    /// Adds a big-endian 16-bit word at an even position.
    pub fn add_u16(&mut self, v: u16) -> &mut Self {
        let v = if self.odd { v.rotate_left(8) } else { v };
        self.add64(u64::from(v));
        self
    }

    /// Adds a big-endian 32-bit word at an even position.
    pub fn add_u32(&mut self, v: u32) -> &mut Self {
        self.add_u16((v >> 16) as u16).add_u16(v as u16)
    }

    fn add64(&mut self, v: u64) {
        let (s, carry) = self.sum.overflowing_add(v);
        self.sum = s + u64::from(carry);
    }

    /// Adds `data`, continuing at the byte position where the previous slice ended.
    pub fn add_bytes(&mut self, mut data: &[u8]) -> &mut Self {
        if self.odd
            && let Some((&b, rest)) = data.split_first()
        {
            self.add64(u64::from(b));
            self.odd = false;
            data = rest;
        }
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            // Fold the 64-bit word into the sum: one's-complement addition is associative over
            // any multiple of 16 bits, so summing 64-bit words with end-around carry is exact.
            self.add64(w);
        }
        let mut rest = chunks.remainder();
        while rest.len() >= 2 {
            self.add64(u64::from(u16::from_be_bytes([rest[0], rest[1]])));
            rest = &rest[2..];
        }
        if let [b] = rest {
            self.add64(u64::from(*b) << 8);
            self.odd = true;
        }
        self
    }

    /// Copies `src` into `dst` (of the same length) and adds it, in one pass: each 8-byte word
    /// is loaded once, stored and summed, so a page reply costs one read of the page instead
    /// of a copy and a checksum pass.
    pub fn copy_and_add(&mut self, dst: &mut [u8], src: &[u8]) -> &mut Self {
        assert_eq!(dst.len(), src.len(), "copy_and_add: lengths differ");
        let skip = usize::from(self.odd && !src.is_empty());
        if skip == 1 {
            dst[0] = src[0];
            self.add64(u64::from(src[0]));
            self.odd = false;
        }
        let (dst, src) = (&mut dst[skip..], &src[skip..]);
        let mut s = src.chunks_exact(8);
        let mut d = dst.chunks_exact_mut(8);
        for (dc, sc) in (&mut d).zip(&mut s) {
            let w: [u8; 8] = sc.try_into().expect("8 bytes");
            dc.copy_from_slice(&w);
            self.add64(u64::from_be_bytes(w));
        }
        let rest = s.remainder();
        d.into_remainder().copy_from_slice(rest);
        self.add_bytes(rest)
    }

    /// Adds the IPv6 pseudo-header for an upper-layer packet of `len` bytes.
    pub fn add_pseudo_header(
        &mut self,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        next_header: u8,
        len: u32,
    ) -> &mut Self {
        debug_assert!(!self.odd, "the pseudo-header starts a checksum");
        self.add_bytes(&src.octets())
            .add_bytes(&dst.octets())
            .add_u32(len)
            .add_u32(u32::from(next_header))
    }

    /// This sum followed by `other` (which must start at an even position).
    pub fn combine(&self, other: &Checksum) -> Checksum {
        debug_assert!(!self.odd, "combine after an even number of bytes");
        let mut c = *self;
        c.add64(other.sum);
        c.odd = other.odd;
        c
    }

    /// The folded 16-bit one's-complement sum (not yet complemented).
    pub fn sum16(&self) -> u16 {
        let mut s = self.sum;
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    /// The checksum to put in a header: the complement of the sum.
    pub fn finish(&self) -> u16 {
        !self.sum16()
    }
}

/// The UDP checksum field for a datagram with the given sum: 0 is sent as 0xffff (RFC 768/8200).
pub fn udp_field(c: &Checksum) -> u16 {
    match c.finish() {
        0 => 0xffff,
        v => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Copy-and-add over any split gives the copy and the same sum as adding alone.
        #[test]
        fn copy_and_add_is_a_copy_and_a_sum(
            data in proptest::collection::vec(any::<u8>(), 0..600),
            a in 0usize..600,
            b in 0usize..600,
        ) {
            let (a, b) = (a.min(data.len()), b.min(data.len()));
            let (a, b) = (a.min(b), a.max(b));
            let mut plain = Checksum::new();
            plain.add_bytes(&data);
            let mut fused = Checksum::new();
            let mut out = std::vec![0u8; data.len()];
            let (o1, rest) = out.split_at_mut(a);
            let (o2, o3) = rest.split_at_mut(b - a);
            fused.copy_and_add(o1, &data[..a]);
            fused.copy_and_add(o2, &data[a..b]);
            fused.copy_and_add(o3, &data[b..]);
            prop_assert_eq!(&out, &data);
            prop_assert_eq!(fused.finish(), plain.finish());
        }
    }

    /// The textbook sum, 16 bits at a time.
    fn reference(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from(c[0]) << 8
            };
            s += u32::from(w);
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the sum of 00 01 f2 03 f4 f5 f6 f7 is ddf2.
        let mut c = Checksum::new();
        c.add_bytes(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]);
        assert_eq!(c.sum16(), 0xddf2);
        assert_eq!(c.finish(), !0xddf2);
    }

    proptest! {
        #[test]
        fn matches_reference_in_any_split(data in proptest::collection::vec(any::<u8>(), 0..600),
                                          cut1 in 0usize..600, cut2 in 0usize..600) {
            let a = cut1.min(data.len());
            let b = cut2.min(data.len()).max(a);
            let mut c = Checksum::new();
            c.add_bytes(&data[..a]).add_bytes(&data[a..b]).add_bytes(&data[b..]);
            prop_assert_eq!(c.sum16(), reference(&data));
        }
    }
}
