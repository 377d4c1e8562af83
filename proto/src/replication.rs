//! The replication stream (docs/protocol.md §5.19): what a primary shard sends its backup.
//!
//! The stream is a byte stream of records, cut into REPLICATE frames in order (each frame's
//! `request_id` is its sequence number, its `operand0` the stream offset of its first byte),
//! so a record may span frames. A record is a 4-byte big-endian length (of what follows), a
//! kind byte and the kind's body:
//!
//! | kind | body |
//! |---|---|
//! | [`INIT`] | the shard's configuration and keys ([`Init`]): always the first record |
//! | [`REQUEST`] | `now_ns` (8), the request's endpoints (MACs 6 + 6, addresses 16 + 16, ports 2 + 2), its BlueBridge message (header and payload) |
//! | [`RECLAIM`] | `now_ns` (8), a page slot (4) freed by the primary's own reclamation of a silent owner's pages |
//! | [`SNAPSHOT`] | the shard's state but its pages' bytes, when the stream starts from a shard that has run requests (an encoding private to the server) |
//! | [`PAGE`] | a page slot (4) and its 4096 bytes: the copy of a page for a stream that began with a SNAPSHOT |
//! | [`SYNCED`] | nothing: every page of the SNAPSHOT has been sent; the backup is in step from here |
//!
//! The backup runs every REQUEST as the primary did, at the primary's time: the state it
//! reaches is the primary's, the same handles, leases, sessions and stored replies.

use core::net::Ipv6Addr;

use crate::frame::Endpoints;
use crate::wire::ethernet::MacAddr;

/// The shard's configuration and keys.
pub const INIT: u8 = 1;
/// A request the primary ran.
pub const REQUEST: u8 = 2;
/// A page the primary reclaimed on its own.
pub const RECLAIM: u8 = 3;
/// The shard's state (all but its pages' bytes) when the stream starts from a shard with state.
pub const SNAPSHOT: u8 = 4;
/// A page's bytes, copied to a backup that joined a shard with state.
pub const PAGE: u8 = 5;
/// Every page of the SNAPSHOT has been copied.
pub const SYNCED: u8 = 6;

/// Bytes before a record's body: length (4) and kind (1).
pub const RECORD_HEADER: usize = 5;
/// Bytes of a REQUEST body before the message: time and endpoints.
pub const REQUEST_PREFIX: usize = 8 + 6 + 6 + 16 + 16 + 2 + 2;
/// Most client prefixes an INIT carries.
pub const MAX_ALLOWED: usize = 32;

/// What a replica needs to be the primary shard's twin: everything that decides how a request
/// runs. Fixed layout, big-endian (see [`Init::LEN`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Init {
    /// The primary's host id.
    pub host: u16,
    /// This shard's index.
    pub shard: u16,
    /// The primary's shards.
    pub shards: u16,
    /// The shard's arena, bytes.
    pub arena_bytes: u64,
    /// Page bytes per reply frame.
    pub max_reply_data: u16,
    /// Sessions of the shard, their idle time (ms), bulk payloads, bulk per session, per
    /// address.
    pub sessions: u32,
    /// See [`Init::sessions`].
    pub session_idle_ms: u64,
    /// See [`Init::sessions`].
    pub bulk_payloads: u32,
    /// See [`Init::sessions`].
    pub bulk_per_session: u16,
    /// See [`Init::sessions`].
    pub sessions_per_address: u16,
    /// Lease table size, default and longest lease (ms).
    pub lease_capacity: u16,
    /// See [`Init::lease_capacity`].
    pub lease_default_ms: u64,
    /// See [`Init::lease_capacity`].
    pub lease_max_ms: u64,
    /// Distinct page owners.
    pub max_owners: u32,
    /// Grace period of silent owners, ms.
    pub orphan_grace_ms: u64,
    /// Copy lease, ms.
    pub copy_lease_ms: u64,
    /// The handle key.
    pub handle_key: [u8; 32],
    /// The lease-id key.
    pub lease_key: [u8; 32],
    /// Client prefixes allowed (address, length); the first `allowed_len` count.
    pub allowed: [([u8; 16], u8); MAX_ALLOWED],
    /// How many of `allowed` count (0: anyone may use the server).
    pub allowed_len: u8,
    /// 1: the shard has state, a SNAPSHOT, its pages and SYNCED follow; 0: the stream starts
    /// from the shard's first state, and the backup is in step at once.
    pub copying: u8,
}

impl Init {
    /// Bytes of the body.
    pub const LEN: usize =
        2 * 3 + 8 + 2 + 4 + 8 + 4 + 2 + 2 + 2 + 8 + 8 + 4 + 8 + 8 + 64 + 1 + MAX_ALLOWED * 17 + 1;

    /// Writes the body into `buf` (at least [`Init::LEN`] bytes).
    pub fn emit(&self, buf: &mut [u8]) {
        let mut w = Writer { buf, at: 0 };
        w.u16(self.host);
        w.u16(self.shard);
        w.u16(self.shards);
        w.u64(self.arena_bytes);
        w.u16(self.max_reply_data);
        w.u32(self.sessions);
        w.u64(self.session_idle_ms);
        w.u32(self.bulk_payloads);
        w.u16(self.bulk_per_session);
        w.u16(self.sessions_per_address);
        w.u16(self.lease_capacity);
        w.u64(self.lease_default_ms);
        w.u64(self.lease_max_ms);
        w.u32(self.max_owners);
        w.u64(self.orphan_grace_ms);
        w.u64(self.copy_lease_ms);
        w.bytes(&self.handle_key);
        w.bytes(&self.lease_key);
        w.bytes(&[self.allowed_len]);
        for (a, l) in &self.allowed {
            w.bytes(a);
            w.bytes(&[*l]);
        }
        w.bytes(&[self.copying]);
    }

    /// Reads a body; `None` if it is not [`Init::LEN`] bytes or names more prefixes than fit.
    pub fn parse(buf: &[u8]) -> Option<Init> {
        if buf.len() != Self::LEN {
            return None;
        }
        let mut r = Reader { buf, at: 0 };
        let mut i = Init {
            host: r.u16(),
            shard: r.u16(),
            shards: r.u16(),
            arena_bytes: r.u64(),
            max_reply_data: r.u16(),
            sessions: r.u32(),
            session_idle_ms: r.u64(),
            bulk_payloads: r.u32(),
            bulk_per_session: r.u16(),
            sessions_per_address: r.u16(),
            lease_capacity: r.u16(),
            lease_default_ms: r.u64(),
            lease_max_ms: r.u64(),
            max_owners: r.u32(),
            orphan_grace_ms: r.u64(),
            copy_lease_ms: r.u64(),
            handle_key: r.array(),
            lease_key: r.array(),
            allowed: [([0; 16], 0); MAX_ALLOWED],
            allowed_len: r.array::<1>()[0],
            copying: 0,
        };
        for slot in &mut i.allowed {
            *slot = (r.array(), r.array::<1>()[0]);
        }
        i.copying = r.array::<1>()[0];
        (usize::from(i.allowed_len) <= MAX_ALLOWED && i.shard < i.shards).then_some(i)
    }
}

/// One record of the stream, borrowed from where it lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "a record lives on the stack for the moment it is read or written; INIT comes once per stream"
)]
pub enum Record<'a> {
    /// The shard's configuration and keys.
    Init(Init),
    /// A request the primary ran at `now_ns`.
    Request {
        /// The primary's clock when it ran the request (ns since it started).
        now_ns: u64,
        /// Where the request came from and went.
        endpoints: Endpoints,
        /// Its BlueBridge message: header and payload.
        message: &'a [u8],
    },
    /// A page slot the primary freed on its own at `now_ns` (a silent owner's).
    Reclaim {
        /// The primary's clock.
        now_ns: u64,
        /// The slot.
        slot: u32,
    },
    /// The shard's state but its pages' bytes (the server's own encoding).
    Snapshot(&'a [u8]),
    /// A page's bytes (4096).
    Page {
        /// The slot.
        slot: u32,
        /// Its bytes.
        bytes: &'a [u8],
    },
    /// Every page of the SNAPSHOT has been sent.
    Synced,
}

/// Why a record could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    /// A kind this version does not know.
    UnknownKind(u8),
    /// A body of the wrong length for its kind.
    BadLength(u8),
}

impl<'a> Record<'a> {
    /// Bytes the record takes in the stream, header included.
    pub fn len(&self) -> usize {
        RECORD_HEADER
            + match self {
                Record::Init(_) => Init::LEN,
                Record::Request { message, .. } => REQUEST_PREFIX + message.len(),
                Record::Reclaim { .. } => 12,
                Record::Snapshot(b) => b.len(),
                Record::Page { bytes, .. } => 4 + bytes.len(),
                Record::Synced => 0,
            }
    }

    /// Never: a record always has its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the record into `buf` (at least [`Record::len`] bytes); returns its length.
    pub fn emit(&self, buf: &mut [u8]) -> usize {
        let n = self.len();
        let body = (n - RECORD_HEADER) as u32 + 1;
        buf[..4].copy_from_slice(&body.to_be_bytes());
        let mut w = Writer {
            buf: &mut buf[4..n],
            at: 0,
        };
        match self {
            Record::Init(i) => {
                w.bytes(&[INIT]);
                i.emit(&mut w.buf[1..]);
            }
            Record::Request {
                now_ns,
                endpoints: e,
                message,
            } => {
                w.bytes(&[REQUEST]);
                w.u64(*now_ns);
                w.bytes(&e.src_mac.0);
                w.bytes(&e.dst_mac.0);
                w.bytes(&e.src.octets());
                w.bytes(&e.dst.octets());
                w.u16(e.src_port);
                w.u16(e.dst_port);
                w.bytes(message);
            }
            Record::Reclaim { now_ns, slot } => {
                w.bytes(&[RECLAIM]);
                w.u64(*now_ns);
                w.u32(*slot);
            }
            Record::Snapshot(b) => {
                w.bytes(&[SNAPSHOT]);
                w.bytes(b);
            }
            Record::Page { slot, bytes } => {
                w.bytes(&[PAGE]);
                w.u32(*slot);
                w.bytes(bytes);
            }
            Record::Synced => w.bytes(&[SYNCED]),
        }
        n
    }

    /// The first record in `buf`: the record and the bytes it took, `Ok(None)` if `buf`
    /// does not hold a whole one yet.
    pub fn parse(buf: &'a [u8]) -> Result<Option<(Record<'a>, usize)>, RecordError> {
        let Some(len) = buf.get(..4) else {
            return Ok(None);
        };
        let body = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if body == 0 {
            return Err(RecordError::BadLength(0));
        }
        let Some(rec) = buf.get(4..4 + body) else {
            return Ok(None);
        };
        let (kind, body) = (rec[0], &rec[1..]);
        let mut r = Reader { buf: body, at: 0 };
        let record = match kind {
            INIT => Record::Init(Init::parse(body).ok_or(RecordError::BadLength(kind))?),
            REQUEST if body.len() >= REQUEST_PREFIX => Record::Request {
                now_ns: r.u64(),
                endpoints: Endpoints {
                    src_mac: MacAddr(r.array()),
                    dst_mac: MacAddr(r.array()),
                    src: Ipv6Addr::from(r.array::<16>()),
                    dst: Ipv6Addr::from(r.array::<16>()),
                    src_port: r.u16(),
                    dst_port: r.u16(),
                },
                message: &body[REQUEST_PREFIX..],
            },
            RECLAIM if body.len() == 12 => Record::Reclaim {
                now_ns: r.u64(),
                slot: r.u32(),
            },
            SNAPSHOT => Record::Snapshot(body),
            PAGE if body.len() == 4 + crate::PAGE_SIZE => Record::Page {
                slot: r.u32(),
                bytes: &body[4..],
            },
            SYNCED if body.is_empty() => Record::Synced,
            REQUEST | RECLAIM | PAGE | SYNCED => return Err(RecordError::BadLength(kind)),
            k => return Err(RecordError::UnknownKind(k)),
        };
        Ok(Some((record, 4 + rec.len())))
    }
}

struct Writer<'b> {
    buf: &'b mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_be_bytes());
    }
}

/// Reads fixed-size fields; the caller has checked the length.
struct Reader<'b> {
    buf: &'b [u8],
    at: usize,
}

impl Reader<'_> {
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&self.buf[self.at..self.at + N]);
        self.at += N;
        a
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.array())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.array())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.array())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init() -> Init {
        let mut allowed = [([0; 16], 0); MAX_ALLOWED];
        allowed[0] = ([0xfd; 16], 48);
        Init {
            host: 7,
            shard: 1,
            shards: 2,
            arena_bytes: 4 << 20,
            max_reply_data: 4096,
            sessions: 512,
            session_idle_ms: 10_000,
            bulk_payloads: 256,
            bulk_per_session: 8,
            sessions_per_address: 64,
            lease_capacity: 100,
            lease_default_ms: 1000,
            lease_max_ms: 60_000,
            max_owners: 1 << 16,
            orphan_grace_ms: 300_000,
            copy_lease_ms: 1000,
            handle_key: [3; 32],
            lease_key: [4; 32],
            allowed,
            allowed_len: 1,
            copying: 1,
        }
    }

    #[test]
    fn records_round_trip_across_any_cut() {
        let ep = Endpoints {
            src_mac: MacAddr([1, 2, 3, 4, 5, 6]),
            dst_mac: MacAddr([6, 5, 4, 3, 2, 1]),
            src: Ipv6Addr::new(0xfd00, 0xbb, 1, 0xffff, 0, 0, 0, 1),
            dst: Ipv6Addr::new(0xfd00, 0xbb, 2, 0x100, 0, 0, 7, 0x3000),
            src_port: 40000,
            dst_port: 0xbb00,
        };
        let msg = [9u8; 60];
        let records = [
            Record::Init(init()),
            Record::Request {
                now_ns: 123_456,
                endpoints: ep,
                message: &msg,
            },
            Record::Reclaim {
                now_ns: 99,
                slot: 17,
            },
            Record::Snapshot(&[1, 2, 3]),
            Record::Page {
                slot: 3,
                bytes: &[7; crate::PAGE_SIZE],
            },
            Record::Synced,
        ];
        let mut stream = [0u8; 8192];
        let mut n = 0;
        for r in &records {
            n += r.emit(&mut stream[n..]);
        }
        // Cut short anywhere: a partial record is "not yet", never an error.
        for cut in 0..n {
            let mut at = 0;
            while let Some((_, used)) = Record::parse(&stream[at..cut]).unwrap() {
                at += used;
            }
            assert!(at <= cut);
        }
        let mut at = 0;
        for r in &records {
            let (got, used) = Record::parse(&stream[at..n]).unwrap().unwrap();
            assert_eq!(&got, r);
            assert_eq!(used, r.len());
            at += used;
        }
        assert_eq!(at, n);
    }

    #[test]
    fn bad_records_are_errors() {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&2u32.to_be_bytes());
        b[4] = 0x77;
        assert_eq!(Record::parse(&b), Err(RecordError::UnknownKind(0x77)));
        b[4] = RECLAIM;
        assert_eq!(Record::parse(&b), Err(RecordError::BadLength(RECLAIM)));
        assert_eq!(Record::parse(&[0; 8]), Err(RecordError::BadLength(0)));
    }
}
