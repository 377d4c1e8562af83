//! The Rust side of the structs and numbers `include/bluebridge.h` shares with the XDP
//! programs. Each struct is mirrored `#[repr(C)]` and held at compile time to the sizes and
//! offsets the header defines (and `_Static_assert`s on its side), so a field moved on either
//! side fails the build. Map values are still written as bytes (aya's `Pod` is an unsafe trait
//! and this crate has no unsafe code), at the offsets asserted here.

use std::mem::{offset_of, size_of};

use crate::consts;

/// `struct bb_tor_route`.
#[repr(C)]
#[allow(
    dead_code,
    reason = "a layout mirror: read by the asserts below, not at run time"
)]
pub(crate) struct BbTorRoute {
    pub(crate) ifindex: u32,
    pub(crate) route_id: u32,
    pub(crate) dst_mac: [u8; 6],
    pub(crate) src_mac: [u8; 6],
    pub(crate) flags: u32,
}

/// `struct bb_tor_source_key`.
#[repr(C)]
#[allow(
    dead_code,
    reason = "a layout mirror: read by the asserts below, not at run time"
)]
pub(crate) struct BbTorSourceKey {
    pub(crate) prefixlen: u32,
    pub(crate) ifindex: u32,
    pub(crate) addr: [u8; 16],
}

/// `struct bb_tor_stats`.
#[repr(C)]
#[allow(
    dead_code,
    reason = "a layout mirror: read by the asserts below, not at run time"
)]
pub(crate) struct BbTorStats {
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
}

/// `struct bb_tor_page_stats`.
#[repr(C)]
#[allow(
    dead_code,
    reason = "a layout mirror: read by the asserts below, not at run time"
)]
pub(crate) struct BbTorPageStats {
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
    pub(crate) coherence: u64,
}

/// `struct bb_lpm_key`.
#[repr(C)]
#[allow(
    dead_code,
    reason = "a layout mirror: read by the asserts below, not at run time"
)]
pub(crate) struct BbLpmKey {
    pub(crate) prefixlen: u32,
    pub(crate) addr: [u8; 16],
}

const fn n(v: u32) -> usize {
    v as usize
}

const _: () = {
    assert!(size_of::<BbTorRoute>() == n(consts::BB_TOR_ROUTE_SIZE));
    assert!(offset_of!(BbTorRoute, route_id) == n(consts::BB_TOR_ROUTE_OFF_ROUTE_ID));
    assert!(offset_of!(BbTorRoute, dst_mac) == n(consts::BB_TOR_ROUTE_OFF_DST_MAC));
    assert!(offset_of!(BbTorRoute, src_mac) == n(consts::BB_TOR_ROUTE_OFF_SRC_MAC));
    assert!(offset_of!(BbTorRoute, flags) == n(consts::BB_TOR_ROUTE_OFF_FLAGS));
    assert!(size_of::<BbTorSourceKey>() == n(consts::BB_TOR_SOURCE_KEY_SIZE));
    assert!(offset_of!(BbTorSourceKey, ifindex) == n(consts::BB_TOR_SOURCE_KEY_OFF_IFINDEX));
    assert!(offset_of!(BbTorSourceKey, addr) == n(consts::BB_TOR_SOURCE_KEY_OFF_ADDR));
    assert!(size_of::<BbTorStats>() == n(consts::BB_TOR_STATS_SIZE));
    assert!(size_of::<BbTorPageStats>() == n(consts::BB_TOR_PAGE_STATS_SIZE));
    assert!(size_of::<BbLpmKey>() == n(consts::BB_LPM_KEY_SIZE));
    assert!(offset_of!(BbLpmKey, addr) == n(consts::BB_LPM_KEY_OFF_ADDR));
    // The aya key types carry the prefix length themselves: the data is the rest.
    assert!(n(consts::BB_TOR_SOURCE_KEY_SIZE) - 4 == 20);
    assert!(n(consts::BB_LPM_KEY_SIZE) - 4 == 16);
};

// Every number the header shares with the protocol crate, held equal.
const _: () = {
    use bluebridge_proto::{HeaderFlags, Opcode, Status};
    assert!(consts::BB_UDP_PORT == bluebridge_proto::UDP_PORT as u32);
    assert!(consts::BB_OP_FREE == Opcode::FREE.0 as u32);
    assert!(consts::BB_OP_GET_SHARED == Opcode::GET_SHARED.0 as u32);
    assert!(consts::BB_OP_RENEW == Opcode::RENEW.0 as u32);
    assert!(consts::BB_OP_GET_SHARED + 1 == Opcode::GET_EXCLUSIVE.0 as u32);
    assert!(consts::BB_OP_GET_SHARED + 2 == Opcode::PUT.0 as u32);
    assert!(consts::BB_OP_REVOKE == Opcode::REVOKE.0 as u32);
    assert!(n(consts::BB_HEADER_OFFSET) == bluebridge_proto::frame::UDP_START + 8);
    assert!(consts::BB_FLAG_REPLY == HeaderFlags::REPLY.0 as u32);
    assert!(consts::BB_STATUS_UNREACHABLE == Status::UNREACHABLE.0 as u32);
    assert!(consts::BB_OWN_MAC_SET_BIT == 48);
    assert!(consts::BB_OP_READ == Opcode::READ.0 as u32);
    assert!(consts::BB_VERSION == bluebridge_proto::VERSION as u32);
    assert!(consts::BB_FAST_RANGE_MAX == bluebridge_proto::INLINE_RANGE_MAX as u32);
    assert!(consts::BB_FLAG_INLINE == HeaderFlags::INLINE.0 as u32);
    assert!(n(consts::BB_PAGE_SIZE) == bluebridge_proto::PAGE_SIZE);
    assert!(
        n(consts::BB_HEADER_OFFSET + consts::BB_HEADER_LEN) == bluebridge_proto::FRAME_OVERHEAD
    );
    assert!(
        n(consts::BB_HOT_SLOT_OFF_DATA) + n(consts::BB_PAGE_SIZE) == n(consts::BB_HOT_SLOT_SIZE)
    );
};
