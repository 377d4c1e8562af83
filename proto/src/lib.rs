//! BlueBridge wire protocol: the address codec (a remote page and an operation as one IPv6
//! address) and the frame format (Ethernet / IPv6 / UDP / BlueBridge header / payload).
//!
//! `docs/protocol.md` is the specification this crate implements; every other crate of the
//! project speaks through it. `no_std`, no allocation, no unsafe.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

pub mod addr;
pub mod checksum;
pub mod codes;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod message;
pub mod replication;
pub mod segment;
pub mod wire;

pub use addr::{AddrError, HostId, NetPrefix, PageHandle, RemoteAddr};
pub use codes::{HeaderFlags, OpFlags, Opcode, Status};
pub use frame::{Endpoints, Envelope, Frame, FrameError, FrameSink};
pub use message::{Request, RequestError};
pub use segment::{Reassembly, SegmentError, Segments};
pub use wire::ethernet::MacAddr;
pub use wire::header::BbRepr;

/// The protocol version this crate speaks (header byte 0).
pub const VERSION: u8 = 1;
/// The UDP port servers listen on; requests go to it, replies come from it.
pub const UDP_PORT: u16 = 0xbb00;
/// Size of a remote page.
pub const PAGE_SIZE: usize = 4096;
/// Bytes in front of the payload: Ethernet 14 + IPv6 40 + UDP 8 + BlueBridge 48.
pub const FRAME_OVERHEAD: usize = wire::ethernet::HEADER_LEN
    + wire::ipv6::HEADER_LEN
    + wire::udp::HEADER_LEN
    + wire::header::HEADER_LEN;
/// Most items one bulk request may name.
pub const MAX_BULK: u16 = 128;
/// The smallest `seg_max` a request may ask for (other than 0, "no limit").
pub const MIN_SEG_MAX: u16 = 512;
/// The smallest link MTU BlueBridge runs on (the IPv6 minimum).
pub const MIN_MTU: u16 = 1280;
/// The longest range, other than a whole page, that the reference server answers in place
/// from its XDP hot-page store (docs/protocol.md §6.1): the reference client sends INLINE the
/// READs of a whole page or of at most this many bytes.
pub const INLINE_RANGE_MAX: u16 = 512;

/// Whether a READ of `length` bytes at `offset` is one the reference server may answer in
/// place from its XDP hot-page store: a whole page, or at most [`INLINE_RANGE_MAX`] bytes (the
/// XDP program checks the range against the page itself).
pub fn inline_range(offset: u16, length: u16) -> bool {
    (offset, usize::from(length)) == (0, PAGE_SIZE) || length <= INLINE_RANGE_MAX
}
/// The smallest MTU at which one frame carries a whole page.
pub const PAGE_MTU: u16 = (FRAME_OVERHEAD - wire::ethernet::HEADER_LEN + PAGE_SIZE) as u16;
/// Bits of a request id that name the client's session slot (docs/protocol.md §8): the low
/// 7 bits; the rest is a sequence number the client raises each time it reuses the slot.
pub const SESSION_SLOT_BITS: u32 = 7;
/// Slots of a client session: the most non-idempotent requests one client endpoint (address
/// and port) has outstanding at a server shard at once.
pub const SESSION_SLOTS: usize = 1 << SESSION_SLOT_BITS;
