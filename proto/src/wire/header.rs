//! The BlueBridge header: 48 bytes right after the UDP header.
//!
//! ```text
//!  0  version     u8    protocol version (1)
//!  1  flags       u8    HeaderFlags: REPLY, SHARED, MORE, RETRY
//!  2  status      u16   Status (0 in requests)
//!  4  item        u16   bulk: index of the item this frame is about
//!  6  count       u16   ALLOC_BULK: pages asked; other bulk: items in the payload; else 1
//!  8  request_id  u64   chosen by the client, echoed in the reply
//! 16  offset      u16   first page byte this frame's range covers
//! 18  length      u16   bytes of the range
//! 20  seg_max     u16   requests: most page bytes per reply frame the client takes (0 = any)
//! 22  reserved    u16   sent as zero, ignored
//! 24  lease       u64   UPDATE: lease id
//! 32  operand0    u64   CAS: expected; FETCH_ADD: addend; ACQUIRE: lease ms; replies: old value
//! 40  operand1    u64   CAS: new value
//! ```
//! All integers big-endian.

use super::{be16, be64, put16, put64};
use crate::codes::{HeaderFlags, Status};
use crate::wire::Layer;
use crate::{FrameError, VERSION};

pub(crate) mod field {
    pub(crate) const VERSION: usize = 0;
    pub(crate) const FLAGS: usize = 1;
    pub(crate) const STATUS: usize = 2;
    pub(crate) const ITEM: usize = 4;
    pub(crate) const COUNT: usize = 6;
    pub(crate) const REQUEST_ID: usize = 8;
    pub(crate) const OFFSET: usize = 16;
    pub(crate) const LENGTH: usize = 18;
    pub(crate) const SEG_MAX: usize = 20;
    pub(crate) const RESERVED: usize = 22;
    pub(crate) const LEASE: usize = 24;
    pub(crate) const OPERAND0: usize = 32;
    pub(crate) const OPERAND1: usize = 40;
    pub(crate) const PAYLOAD: usize = 48;
}

/// Length of the BlueBridge header.
pub const HEADER_LEN: usize = field::PAYLOAD;

/// A view of a BlueBridge message (header and payload: the UDP payload).
#[derive(Debug, Clone)]
pub struct BbPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> BbPacket<T> {
    /// Wraps a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Self {
        BbPacket { buffer }
    }

    /// Wraps a buffer, checking that it holds a whole header.
    pub fn new_checked(buffer: T) -> Result<Self, FrameError> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// Checks that the buffer holds a whole header.
    pub fn check_len(&self) -> Result<(), FrameError> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            return Err(FrameError::Truncated(Layer::BlueBridge));
        }
        Ok(())
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// Protocol version.
    pub fn version(&self) -> u8 {
        self.b()[field::VERSION]
    }
    /// Flags.
    pub fn flags(&self) -> HeaderFlags {
        HeaderFlags(self.b()[field::FLAGS])
    }
    /// Status.
    pub fn status(&self) -> Status {
        Status(be16(self.b(), field::STATUS))
    }
    /// Bulk item index.
    pub fn item(&self) -> u16 {
        be16(self.b(), field::ITEM)
    }
    /// Item or page count.
    pub fn count(&self) -> u16 {
        be16(self.b(), field::COUNT)
    }
    /// Request id.
    pub fn request_id(&self) -> u64 {
        be64(self.b(), field::REQUEST_ID)
    }
    /// First page byte of the range.
    pub fn offset(&self) -> u16 {
        be16(self.b(), field::OFFSET)
    }
    /// Length of the range.
    pub fn length(&self) -> u16 {
        be16(self.b(), field::LENGTH)
    }
    /// Most page bytes per reply frame.
    pub fn seg_max(&self) -> u16 {
        be16(self.b(), field::SEG_MAX)
    }
    /// Reserved field.
    pub fn reserved(&self) -> u16 {
        be16(self.b(), field::RESERVED)
    }
    /// Lease id.
    pub fn lease(&self) -> u64 {
        be64(self.b(), field::LEASE)
    }
    /// First operand.
    pub fn operand0(&self) -> u64 {
        be64(self.b(), field::OPERAND0)
    }
    /// Second operand.
    pub fn operand1(&self) -> u64 {
        be64(self.b(), field::OPERAND1)
    }
    /// What follows the header.
    pub fn payload(&self) -> &[u8] {
        &self.b()[field::PAYLOAD..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> BbPacket<T> {
    fn m(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }
    /// Sets the version.
    pub fn set_version(&mut self, v: u8) {
        self.m()[field::VERSION] = v;
    }
    /// Sets the flags.
    pub fn set_flags(&mut self, v: HeaderFlags) {
        self.m()[field::FLAGS] = v.0;
    }
    /// Sets the status.
    pub fn set_status(&mut self, v: Status) {
        put16(self.m(), field::STATUS, v.0);
    }
    /// Sets the bulk item index.
    pub fn set_item(&mut self, v: u16) {
        put16(self.m(), field::ITEM, v);
    }
    /// Sets the count.
    pub fn set_count(&mut self, v: u16) {
        put16(self.m(), field::COUNT, v);
    }
    /// Sets the request id.
    pub fn set_request_id(&mut self, v: u64) {
        put64(self.m(), field::REQUEST_ID, v);
    }
    /// Sets the range offset.
    pub fn set_offset(&mut self, v: u16) {
        put16(self.m(), field::OFFSET, v);
    }
    /// Sets the range length.
    pub fn set_length(&mut self, v: u16) {
        put16(self.m(), field::LENGTH, v);
    }
    /// Sets the most page bytes per reply frame.
    pub fn set_seg_max(&mut self, v: u16) {
        put16(self.m(), field::SEG_MAX, v);
    }
    /// Sets the reserved field.
    pub fn set_reserved(&mut self, v: u16) {
        put16(self.m(), field::RESERVED, v);
    }
    /// Sets the lease id.
    pub fn set_lease(&mut self, v: u64) {
        put64(self.m(), field::LEASE, v);
    }
    /// Sets the first operand.
    pub fn set_operand0(&mut self, v: u64) {
        put64(self.m(), field::OPERAND0, v);
    }
    /// Sets the second operand.
    pub fn set_operand1(&mut self, v: u64) {
        put64(self.m(), field::OPERAND1, v);
    }
    /// What follows the header, writable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.m()[field::PAYLOAD..]
    }
}

/// A parsed BlueBridge header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BbRepr {
    /// Flags.
    pub flags: HeaderFlags,
    /// Status (OK in requests).
    pub status: Status,
    /// Bulk item index.
    pub item: u16,
    /// Item or page count.
    pub count: u16,
    /// Request id.
    pub request_id: u64,
    /// First page byte of the range.
    pub offset: u16,
    /// Length of the range.
    pub length: u16,
    /// Most page bytes per reply frame (requests; 0 = any).
    pub seg_max: u16,
    /// Lease id.
    pub lease: u64,
    /// First operand.
    pub operand0: u64,
    /// Second operand.
    pub operand1: u64,
}

impl BbRepr {
    /// Reads a checked header. Another version is an error; reserved bits are ignored.
    pub fn parse<T: AsRef<[u8]>>(p: &BbPacket<T>) -> Result<Self, FrameError> {
        if p.version() != VERSION {
            return Err(FrameError::UnsupportedVersion(p.version()));
        }
        Ok(BbRepr {
            flags: p.flags(),
            status: p.status(),
            item: p.item(),
            count: p.count(),
            request_id: p.request_id(),
            offset: p.offset(),
            length: p.length(),
            seg_max: p.seg_max(),
            lease: p.lease(),
            operand0: p.operand0(),
            operand1: p.operand1(),
        })
    }

    /// Writes the header (version [`VERSION`], reserved zero).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut BbPacket<T>) {
        p.set_version(VERSION);
        p.set_flags(self.flags);
        p.set_status(self.status);
        p.set_item(self.item);
        p.set_count(self.count);
        p.set_request_id(self.request_id);
        p.set_offset(self.offset);
        p.set_length(self.length);
        p.set_seg_max(self.seg_max);
        p.set_reserved(0);
        p.set_lease(self.lease);
        p.set_operand0(self.operand0);
        p.set_operand1(self.operand1);
    }

    /// Whether the frame is a reply.
    pub fn is_reply(&self) -> bool {
        self.flags.contains(HeaderFlags::REPLY)
    }

    /// The IPv6 address carried in `operand0` (high 8 bytes) and `operand1`: a page's owner in
    /// MIGRATE_OUT replies and MIGRATE_IN requests, the owner RECLAIM names.
    pub fn operand_addr(&self) -> [u8; 16] {
        ((u128::from(self.operand0) << 64) | u128::from(self.operand1)).to_be_bytes()
    }

    /// Puts `addr` in `operand0` (high 8 bytes) and `operand1`.
    pub fn set_operand_addr(&mut self, addr: [u8; 16]) {
        let a = u128::from_be_bytes(addr);
        self.operand0 = (a >> 64) as u64;
        self.operand1 = a as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BYTES: [u8; 48] = [
        0x01, // version
        0x01, // REPLY
        0x00, 0x07, // LEASE_HELD
        0x00, 0x02, // item
        0x00, 0x05, // count
        0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // request id
        0x08, 0x00, // offset 2048
        0x08, 0x00, // length 2048
        0x0f, 0x00, // seg_max 3840
        0x00, 0x00, // reserved
        0x00, 0x00, 0x00, 0x00, 0xca, 0xfe, 0xf0, 0x0d, // lease
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, // operand0
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x2a, // operand1
    ];

    #[test]
    fn an_address_in_the_operands_is_high_half_first() {
        let addr: [u8; 16] = core::array::from_fn(|i| i as u8 + 1);
        let mut h = BbRepr::default();
        h.set_operand_addr(addr);
        assert_eq!(h.operand0, 0x0102_0304_0506_0708);
        assert_eq!(h.operand1, 0x090a_0b0c_0d0e_0f10);
        assert_eq!(h.operand_addr(), addr);
    }

    const REPR: BbRepr = BbRepr {
        flags: HeaderFlags::REPLY,
        status: Status::LEASE_HELD,
        item: 2,
        count: 5,
        request_id: 0x0102_0304_0506_0708,
        offset: 2048,
        length: 2048,
        seg_max: 3840,
        lease: 0xcafe_f00d,
        operand0: u64::MAX - 1,
        operand1: 42,
    };

    #[test]
    fn test_deconstruct() {
        let p = BbPacket::new_checked(&BYTES[..]).unwrap();
        assert_eq!(BbRepr::parse(&p).unwrap(), REPR);
        assert!(p.payload().is_empty());
    }

    #[test]
    fn test_construct() {
        let mut buf = [0xffu8; 48];
        REPR.emit(&mut BbPacket::new_unchecked(&mut buf[..]));
        assert_eq!(buf, BYTES);
    }

    #[test]
    fn truncated_and_version() {
        for len in 0..HEADER_LEN {
            assert_eq!(
                BbPacket::new_checked(&BYTES[..len]).unwrap_err(),
                FrameError::Truncated(Layer::BlueBridge)
            );
        }
        let mut v2 = BYTES;
        v2[0] = 2;
        assert_eq!(
            BbRepr::parse(&BbPacket::new_checked(&v2[..]).unwrap()),
            Err(FrameError::UnsupportedVersion(2))
        );
    }

    proptest! {
        #[test]
        fn round_trip(flags in any::<u8>(), status in any::<u16>(), item in any::<u16>(),
                      count in any::<u16>(), id in any::<u64>(), offset in any::<u16>(),
                      length in any::<u16>(), seg_max in any::<u16>(), lease in any::<u64>(),
                      a in any::<u64>(), b in any::<u64>()) {
            let r = BbRepr { flags: HeaderFlags(flags), status: Status(status), item, count,
                             request_id: id, offset, length, seg_max, lease,
                             operand0: a, operand1: b };
            let mut buf = [0u8; HEADER_LEN];
            r.emit(&mut BbPacket::new_unchecked(&mut buf[..]));
            prop_assert_eq!(BbRepr::parse(&BbPacket::new_checked(&buf[..]).unwrap()).unwrap(), r);
        }
    }
}
