//! Requests: the per-operation rules of `docs/protocol.md` §5, checked once so that request
//! handling can trust what it is given. Also the payload formats (handle lists, bulk write
//! entries, bulk statuses, the STAT record).

use crate::addr::{NetPrefix, PageHandle, RemoteAddr};
use crate::codes::{HeaderFlags, Opcode, Status};
use crate::frame::{Endpoints, Frame};
use crate::wire::header::BbRepr;
use crate::wire::{be16, be64, put16, put64};
use crate::{MAX_BULK, MIN_SEG_MAX, PAGE_SIZE};

/// PUT's operand0 and REVOKE's: the holder keeps nothing (§5.18).
pub const KEEP_NONE: u64 = 0;
/// PUT's operand0 and REVOKE's: the holder keeps (or may keep) a read copy.
pub const KEEP_READ: u64 = 1;
/// PUT's operand0: the writer keeps its write copy (a write-back that is not a release).
pub const KEEP_WRITE: u64 = 2;

/// Why a request is refused before it reaches the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The frame is a reply; a server drops it without answering.
    #[error("a reply, not a request")]
    NotARequest,
    /// The destination lies outside the network prefix; dropped without answering.
    #[error("destination outside the network prefix")]
    OutsidePrefix,
    /// The opcode is unknown.
    #[error("unknown opcode {0:?}")]
    UnknownOpcode(Opcode),
    /// A rule of the operation's format is broken.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The byte range is empty where it may not be, or reaches past the page.
    #[error("range {offset}+{length} is not inside the page")]
    OutOfRange {
        /// Range offset.
        offset: u16,
        /// Range length.
        length: u16,
    },
    /// An atomic's range is not one aligned 8-byte word.
    #[error("atomic range {offset}+{length} is not an aligned 8-byte word")]
    Misaligned {
        /// Range offset.
        offset: u16,
        /// Range length.
        length: u16,
    },
    /// A bulk request names more items than [`MAX_BULK`].
    #[error("{0} items, more than a bulk request may carry")]
    TooMany(u16),
    /// A page operation names handle 0.
    #[error("page operation without a handle")]
    NoHandle,
}

impl RequestError {
    /// The status to answer with, or `None` when the frame is dropped without a reply.
    pub const fn status(self) -> Option<Status> {
        Some(match self {
            RequestError::NotARequest | RequestError::OutsidePrefix => return None,
            RequestError::UnknownOpcode(_) => Status::UNKNOWN_OPCODE,
            RequestError::Malformed(_) => Status::MALFORMED,
            RequestError::OutOfRange { .. } => Status::OUT_OF_RANGE,
            RequestError::Misaligned { .. } => Status::MISALIGNED,
            RequestError::TooMany(_) => Status::TOO_MANY,
            RequestError::NoHandle => Status::INVALID_HANDLE,
        })
    }
}

/// Page bytes of a request, in one piece or in two (a frame received as two buffers, whose
/// payload was never copied together).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bytes<'a> {
    /// The first piece.
    pub head: &'a [u8],
    /// The rest (empty for a frame in one piece).
    pub tail: &'a [u8],
}

impl Bytes<'_> {
    /// Bytes in all.
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies them into `dst`, which must be exactly [`Bytes::len`] long.
    pub fn copy_to(&self, dst: &mut [u8]) {
        let (a, b) = dst.split_at_mut(self.head.len());
        a.copy_from_slice(self.head);
        b.copy_from_slice(self.tail);
    }
}

/// What a request carries after its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body<'a> {
    /// Nothing.
    Empty,
    /// Page bytes for `header.offset .. header.offset + header.length`.
    Data(Bytes<'a>),
    /// READ_BULK, FREE_BULK: the pages.
    Handles(HandleList<'a>),
    /// WRITE_BULK: the writes.
    Writes(WriteEntries<'a>),
}

/// A validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// Addresses and ports, as received.
    pub endpoints: Endpoints,
    /// The destination: host, page and operation (op flags cleared: reserved, §1).
    pub target: RemoteAddr,
    /// The header.
    pub header: BbRepr,
    /// The payload, interpreted.
    pub body: Body<'a>,
}

impl<'a> Request<'a> {
    /// The operation.
    pub fn op(&self) -> Opcode {
        self.target.opcode()
    }

    /// Checks a parsed frame against the rules of its operation.
    pub fn parse(frame: &Frame<'a>, prefix: NetPrefix) -> Result<Self, RequestError> {
        let h = frame.header;
        if h.flags.contains(HeaderFlags::REPLY) {
            return Err(RequestError::NotARequest);
        }
        let target = RemoteAddr::from_ipv6(frame.endpoints.dst, prefix)
            .map_err(|_| RequestError::OutsidePrefix)?;
        let op = target.opcode();
        // The op flags are reserved in version 1: ignored, and 0 in the replies' sources.
        let target = target.with_op(op, crate::OpFlags::NONE);
        if !op.is_request() {
            return Err(RequestError::UnknownOpcode(op));
        }
        if h.status != Status::OK {
            return Err(RequestError::Malformed("status must be 0 in a request"));
        }
        if h.seg_max != 0 && h.seg_max < MIN_SEG_MAX {
            return Err(RequestError::Malformed("seg_max below the minimum"));
        }
        // MIGRATE_OUT to a host's address names the page by `count` and `lease` (§5.14).
        let to_holder = op == Opcode::MIGRATE_OUT && target.handle().is_none();
        if op.is_host_op() {
            if !target.handle().is_none() {
                return Err(RequestError::Malformed("host operation with a page handle"));
            }
        } else if target.handle().is_none() && !to_holder {
            return Err(RequestError::NoHandle);
        }
        if !op.is_bulk() && op != Opcode::MIGRATE_IN && !to_holder && h.count != 1 {
            return Err(RequestError::Malformed("count must be 1"));
        }
        if op.takes_no_range() && (h.offset, h.length) != (0, 0) {
            return Err(RequestError::Malformed("this operation takes no range"));
        }
        let p = frame.payload;
        let tail = frame.payload_tail;
        let range = |allow_empty: bool| -> Result<(), RequestError> {
            let end = usize::from(h.offset) + usize::from(h.length);
            if (h.length == 0 && !allow_empty) || end > PAGE_SIZE {
                return Err(RequestError::OutOfRange {
                    offset: h.offset,
                    length: h.length,
                });
            }
            Ok(())
        };
        let data = || -> Result<Body<'a>, RequestError> {
            range(false)?;
            if p.len() + tail.len() != usize::from(h.length) {
                return Err(RequestError::Malformed(
                    "payload length differs from range length",
                ));
            }
            Ok(Body::Data(Bytes { head: p, tail }))
        };
        // An INLINE READ carries `length` bytes of padding (§6.1), in pieces like page data.
        let inline_read = op == Opcode::READ && h.flags.contains(HeaderFlags::INLINE);
        if !tail.is_empty() && !op.request_carries_data() && !inline_read {
            // Only page data may arrive in two pieces (handle lists and write entries are
            // parsed in place).
            return Err(RequestError::Malformed(
                "a payload in pieces for this operation",
            ));
        }
        let empty = |body_ok: bool| -> Result<Body<'a>, RequestError> {
            if !body_ok || !p.is_empty() {
                return Err(RequestError::Malformed("unexpected payload"));
            }
            Ok(Body::Empty)
        };
        let bulk_count = || -> Result<u16, RequestError> {
            match h.count {
                0 => Err(RequestError::Malformed("bulk count 0")),
                n if n > MAX_BULK => Err(RequestError::TooMany(n)),
                n => Ok(n),
            }
        };
        let handles = |n: u16| -> Result<Body<'a>, RequestError> {
            if p.len() != usize::from(n) * 8 {
                return Err(RequestError::Malformed(
                    "handle list length differs from count",
                ));
            }
            let list = HandleList(p);
            if list.get(0) != Some(target.handle()) {
                return Err(RequestError::Malformed(
                    "a bulk request goes to its first item's page",
                ));
            }
            Ok(Body::Handles(list))
        };
        let body = match op {
            Opcode::PING | Opcode::STAT => empty(true)?,
            Opcode::ALLOC => empty(true)?,
            Opcode::ALLOC_BULK => {
                bulk_count()?;
                empty(true)?
            }
            Opcode::ALLOC_WRITE => data()?,
            Opcode::READ if inline_read => {
                range(false)?;
                if p.len() + tail.len() != usize::from(h.length) {
                    return Err(RequestError::Malformed(
                        "an INLINE READ is padded with exactly its length",
                    ));
                }
                Body::Empty // the padding's contents mean nothing
            }
            Opcode::READ => {
                range(false)?;
                empty(true)?
            }
            Opcode::MIGRATE_OUT => {
                if (h.offset, h.length) != (0, PAGE_SIZE as u16) {
                    return Err(RequestError::Malformed("MIGRATE_OUT takes the whole page"));
                }
                if to_holder && names_no_page(&h) {
                    return Err(RequestError::Malformed(
                        "MIGRATE_OUT to a host needs the page's original host and handle",
                    ));
                }
                empty(true)?
            }
            Opcode::MIGRATE_IN => {
                if (h.offset, h.length) != (0, PAGE_SIZE as u16) {
                    return Err(RequestError::Malformed(
                        "MIGRATE_IN carries the whole page in one frame",
                    ));
                }
                if names_no_page(&h) {
                    return Err(RequestError::Malformed(
                        "MIGRATE_IN needs the page's original host and handle",
                    ));
                }
                data()?
            }
            Opcode::UPDATE_ACQUIRE => {
                range(true)?;
                empty(true)?
            }
            Opcode::WRITE | Opcode::WRITE_BLIND => data()?,
            // A lease id of 0 names no lease: LEASE_INVALID, from the lease check.
            Opcode::UPDATE_COMMIT => {
                if h.length == 0 && !h.flags.contains(HeaderFlags::MORE) {
                    range(true)?;
                    empty(true)?
                } else {
                    data()?
                }
            }
            Opcode::UPDATE_RELEASE
            | Opcode::FREE
            | Opcode::SHARE
            | Opcode::DETACH
            | Opcode::RENEW
            | Opcode::BACKUP
            | Opcode::REPLICA
            | Opcode::PROMOTE => empty(true)?,
            Opcode::GET_SHARED | Opcode::GET_EXCLUSIVE => {
                range(false)?;
                empty(true)?
            }
            Opcode::PUT => {
                if h.operand0 > KEEP_WRITE {
                    return Err(RequestError::Malformed(
                        "PUT keeps nothing (0), a read copy (1) or the write copy (2)",
                    ));
                }
                if h.length == 0 {
                    range(true)?;
                    empty(true)?
                } else {
                    data()?
                }
            }
            Opcode::OWNERS | Opcode::RECLAIM => {
                if PageHandle::from_bits(h.lease).shard_field() == 0 {
                    return Err(RequestError::Malformed(
                        "an owner operation names its shard in `lease`",
                    ));
                }
                empty(true)?
            }
            Opcode::READ_BULK => {
                range(false)?;
                let n = bulk_count()?;
                handles(n)?
            }
            Opcode::FREE_BULK => {
                let n = bulk_count()?;
                handles(n)?
            }
            Opcode::WRITE_BULK => {
                let n = bulk_count()?;
                let w = WriteEntries::check(p, n)?;
                if w.iter().next().map(|e| e.handle) != Some(target.handle()) {
                    return Err(RequestError::Malformed(
                        "a bulk request goes to its first item's page",
                    ));
                }
                Body::Writes(w)
            }
            Opcode::CAS | Opcode::FETCH_ADD => {
                // One word inside the page, or MISALIGNED (§5.11); OUT_OF_RANGE only when the
                // offset is past the page.
                if usize::from(h.offset) >= PAGE_SIZE {
                    return Err(RequestError::OutOfRange {
                        offset: h.offset,
                        length: h.length,
                    });
                }
                if h.length != 8 || !h.offset.is_multiple_of(8) {
                    return Err(RequestError::Misaligned {
                        offset: h.offset,
                        length: h.length,
                    });
                }
                empty(true)?
            }
            // REPLICATE frames are a replication stream (§5.19), taken by a server before it
            // parses requests; anything else is unknown.
            _ => return Err(RequestError::UnknownOpcode(op)),
        };
        Ok(Request {
            endpoints: frame.endpoints,
            target,
            header: h,
            body,
        })
    }
}

/// A list of big-endian 64-bit page handles (READ_BULK, FREE_BULK requests; ALLOC* replies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandleList<'a>(&'a [u8]);

impl<'a> HandleList<'a> {
    /// Wraps a payload; `None` unless its length is a multiple of 8.
    pub fn new(payload: &'a [u8]) -> Option<Self> {
        payload
            .len()
            .is_multiple_of(8)
            .then_some(HandleList(payload))
    }

    /// Number of handles.
    pub fn len(&self) -> usize {
        self.0.len() / 8
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The handles in order.
    pub fn iter(&self) -> impl Iterator<Item = PageHandle> + 'a {
        self.0
            .chunks_exact(8)
            .map(|c| PageHandle::from_bits(be64(c, 0)))
    }

    /// The i-th handle.
    pub fn get(&self, i: usize) -> Option<PageHandle> {
        self.0
            .get(i * 8..i * 8 + 8)
            .map(|c| PageHandle::from_bits(be64(c, 0)))
    }
}

/// Writes `handles` as a handle list into `buf`; returns the bytes written.
pub fn put_handles(buf: &mut [u8], handles: impl IntoIterator<Item = PageHandle>) -> usize {
    let mut n = 0;
    for h in handles {
        put64(buf, n, h.to_bits());
        n += 8;
    }
    n
}

/// Length of a WRITE_BULK entry header.
pub const WRITE_ENTRY_HEADER_LEN: usize = 16;

/// One write of a WRITE_BULK request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteEntry<'a> {
    /// The page.
    pub handle: PageHandle,
    /// First byte written.
    pub offset: u16,
    /// The bytes.
    pub data: &'a [u8],
}

impl WriteEntry<'_> {
    /// Whether the entry may be applied (§5.7): a handle (INVALID_HANDLE for 0), and a range
    /// of at least one byte inside the page (OUT_OF_RANGE). A failed entry gets its status in
    /// the reply; the others are applied.
    pub fn check(&self) -> Result<(), Status> {
        if self.handle.is_none() {
            return Err(Status::INVALID_HANDLE);
        }
        if self.data.is_empty() || usize::from(self.offset) + self.data.len() > PAGE_SIZE {
            return Err(Status::OUT_OF_RANGE);
        }
        Ok(())
    }
}

/// The entries of a WRITE_BULK payload, checked for shape: exactly `count` entries fill the
/// payload, each padded to 8 bytes. Each entry's own rules are [`WriteEntry::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteEntries<'a> {
    payload: &'a [u8],
    count: u16,
}

impl<'a> WriteEntries<'a> {
    fn check(payload: &'a [u8], count: u16) -> Result<Self, RequestError> {
        let e = WriteEntries { payload, count };
        let mut seen = 0u16;
        let mut rest = payload;
        while !rest.is_empty() {
            let (_, next) =
                split_entry(rest).ok_or(RequestError::Malformed("WRITE_BULK entry truncated"))?;
            seen = seen.saturating_add(1);
            rest = next;
        }
        if seen != count {
            return Err(RequestError::Malformed(
                "WRITE_BULK entries differ from count",
            ));
        }
        Ok(e)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The entries in order.
    pub fn iter(&self) -> impl Iterator<Item = WriteEntry<'a>> + 'a {
        let mut rest = self.payload;
        core::iter::from_fn(move || {
            let (e, next) = split_entry(rest)?;
            rest = next;
            Some(e)
        })
    }
}

/// Whether a MIGRATE_IN, or a MIGRATE_OUT sent to the holder's host address, fails to name a
/// page by its original host (`count`) and handle (`lease`).
fn names_no_page(h: &BbRepr) -> bool {
    h.lease == 0 || h.count == 0 || h.count == 0xffff
}

fn split_entry(b: &[u8]) -> Option<(WriteEntry<'_>, &[u8])> {
    let hdr = b.get(..WRITE_ENTRY_HEADER_LEN)?;
    let handle = PageHandle::from_bits(be64(hdr, 0));
    let offset = be16(hdr, 8);
    let len = usize::from(be16(hdr, 10));
    let padded = len.next_multiple_of(8);
    let data = b.get(WRITE_ENTRY_HEADER_LEN..WRITE_ENTRY_HEADER_LEN + len)?;
    let next = b.get(WRITE_ENTRY_HEADER_LEN + padded..)?;
    Some((
        WriteEntry {
            handle,
            offset,
            data,
        },
        next,
    ))
}

/// Bytes a WRITE_BULK entry of `len` data bytes takes.
pub const fn write_entry_len(len: usize) -> usize {
    WRITE_ENTRY_HEADER_LEN + len.next_multiple_of(8)
}

/// Appends a WRITE_BULK entry at `buf[at..]`; returns the new end, or `None` if it does not fit.
pub fn put_write_entry(buf: &mut [u8], at: usize, e: &WriteEntry<'_>) -> Option<usize> {
    let end = at + write_entry_len(e.data.len());
    let len = u16::try_from(e.data.len()).ok()?;
    let out = buf.get_mut(at..end)?;
    put64(out, 0, e.handle.to_bits());
    put16(out, 8, e.offset);
    put16(out, 10, len);
    out[12..16].fill(0);
    out[16..16 + e.data.len()].copy_from_slice(e.data);
    out[16 + e.data.len()..].fill(0);
    Some(end)
}

/// Reads the i-th status of a FREE_BULK / WRITE_BULK reply payload.
pub fn bulk_status(payload: &[u8], i: usize) -> Option<Status> {
    payload.get(i * 2..i * 2 + 2).map(|b| Status(be16(b, 0)))
}

/// Writes per-item statuses as a bulk reply payload; returns the bytes written.
pub fn put_bulk_statuses(buf: &mut [u8], statuses: impl IntoIterator<Item = Status>) -> usize {
    let mut n = 0;
    for s in statuses {
        put16(buf, n, s.0);
        n += 2;
    }
    n
}

/// The STAT reply payload: a server's counters, fixed order, big-endian u64 each. Later
/// versions only append fields; readers ignore bytes past the ones they know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatRecord {
    /// Pages the arena holds.
    pub pages_total: u64,
    /// Pages allocated now.
    pub pages_used: u64,
    /// Requests handled (all workers).
    pub requests: u64,
    /// Requests answered with a status other than OK.
    pub errors: u64,
    /// Retransmissions answered from the session table (not executed again).
    pub duplicates: u64,
    /// Frames dropped as malformed.
    pub malformed: u64,
    /// Leases held now.
    pub leases_held: u64,
    /// Milliseconds since the server started.
    pub uptime_ms: u64,
    /// Shards (workers each owning a part of the pages) the server runs; 0 from a server
    /// that does not say.
    pub shards: u64,
    /// Frames a shard received for another shard's page and handed to it.
    pub handoffs: u64,
    /// Shards whose AF_XDP socket runs in zero-copy mode (the rest copy).
    pub zero_copy: u64,
    /// Old retransmissions of requests their clients had finished with, dropped unexecuted.
    pub stale: u64,
    /// Frames for another shard dropped because its hand-off channel was full.
    pub handoff_dropped: u64,
    /// Frames the kernel dropped for the server's AF_XDP sockets (RX ring full, invalid).
    pub kernel_dropped: u64,
    /// Requests dropped for their source (§9): outside the deployment prefix, one of the
    /// server's own addresses or the anycast /48, multicast, loopback, unspecified, or a
    /// multicast MAC.
    pub bad_source: u64,
    /// Pages the server freed without a FREE: of owners silent past the grace period, or by
    /// a controller's RECLAIM (§5.17).
    pub reclaimed: u64,
    /// How long an owner may stay silent before its pages are reclaimed, ms; 0: never.
    pub orphan_grace_ms: u64,
    /// The copy lease the server grants coherent copies (§5.18), ms.
    pub copy_lease_ms: u64,
    /// Coherent copies granted (GET_SHARED and GET_EXCLUSIVE answered OK).
    pub copy_grants: u64,
    /// REVOKE notices sent to copy holders.
    pub revokes: u64,
    /// Coherence requests answered RECALLING (waiting for other copies to go).
    pub recalling: u64,
    /// Replication (§5.19): the host the answering holder replicates the asked host's pages
    /// to (0: none).
    pub backup: u64,
    /// The epoch of that stream.
    pub backup_epoch: u64,
    /// Stream bytes the backup has not acknowledged yet (all shards).
    pub repl_lag_bytes: u64,
    /// Replies held now, waiting for the backup.
    pub repl_held: u64,
    /// Requests dropped because a stream's window was full.
    pub repl_window_full: u64,
    /// Replica shards this server keeps for other hosts, in step with their streams.
    pub replica_shards: u64,
    /// Pages of the asked host still to be copied to a new backup (all shards).
    pub repl_copy_left: u64,
    /// Pages of that copy in all (0: no copy under way).
    pub repl_copy_total: u64,
}

impl StatRecord {
    /// Length of the record a server sends.
    pub const LEN: usize = 232;
    /// Length of the oldest record (the first eight fields); later fields read as 0 when
    /// absent.
    pub const MIN_LEN: usize = 64;

    /// Writes the record into `buf` (at least [`StatRecord::LEN`] bytes).
    pub fn emit(&self, buf: &mut [u8]) {
        let f = [
            self.pages_total,
            self.pages_used,
            self.requests,
            self.errors,
            self.duplicates,
            self.malformed,
            self.leases_held,
            self.uptime_ms,
            self.shards,
            self.handoffs,
            self.zero_copy,
            self.stale,
            self.handoff_dropped,
            self.kernel_dropped,
            self.bad_source,
            self.reclaimed,
            self.orphan_grace_ms,
            self.copy_lease_ms,
            self.copy_grants,
            self.revokes,
            self.recalling,
            self.backup,
            self.backup_epoch,
            self.repl_lag_bytes,
            self.repl_held,
            self.repl_window_full,
            self.replica_shards,
            self.repl_copy_left,
            self.repl_copy_total,
        ];
        for (i, v) in f.into_iter().enumerate() {
            put64(buf, i * 8, v);
        }
    }

    /// Reads a record; `None` if the payload is shorter than [`StatRecord::MIN_LEN`].
    pub fn parse(buf: &[u8]) -> Option<Self> {
        buf.get(..Self::MIN_LEN)?;
        let g = |i: usize| buf.get(i * 8..i * 8 + 8).map_or(0, |_| be64(buf, i * 8));
        Some(StatRecord {
            pages_total: g(0),
            pages_used: g(1),
            requests: g(2),
            errors: g(3),
            duplicates: g(4),
            malformed: g(5),
            leases_held: g(6),
            uptime_ms: g(7),
            shards: g(8),
            handoffs: g(9),
            zero_copy: g(10),
            stale: g(11),
            handoff_dropped: g(12),
            kernel_dropped: g(13),
            bad_source: g(14),
            reclaimed: g(15),
            orphan_grace_ms: g(16),
            copy_lease_ms: g(17),
            copy_grants: g(18),
            revokes: g(19),
            recalling: g(20),
            backup: g(21),
            backup_epoch: g(22),
            repl_lag_bytes: g(23),
            repl_held: g(24),
            repl_window_full: g(25),
            replica_shards: g(26),
            repl_copy_left: g(27),
            repl_copy_total: g(28),
        })
    }
}

/// One entry of an OWNERS reply: a client address that holds pages on the shard asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnerEntry {
    /// The owner's IPv6 address.
    pub addr: [u8; 16],
    /// Pages it holds on that shard.
    pub pages: u32,
    /// Milliseconds since the server last heard from the address (saturating).
    pub silent_ms: u32,
}

impl OwnerEntry {
    /// Bytes per entry on the wire.
    pub const LEN: usize = 24;

    /// Writes the entry into `buf` (at least [`OwnerEntry::LEN`] bytes).
    pub fn emit(&self, buf: &mut [u8]) {
        buf[..16].copy_from_slice(&self.addr);
        buf[16..20].copy_from_slice(&self.pages.to_be_bytes());
        buf[20..24].copy_from_slice(&self.silent_ms.to_be_bytes());
    }

    /// The entries of an OWNERS reply payload; `None` if it is not a whole number of them.
    pub fn parse_list(buf: &[u8]) -> Option<impl Iterator<Item = OwnerEntry> + '_> {
        buf.len().is_multiple_of(Self::LEN).then(|| {
            buf.chunks_exact(Self::LEN).map(|c| {
                let mut addr = [0u8; 16];
                addr.copy_from_slice(&c[..16]);
                OwnerEntry {
                    addr,
                    pages: u32::from_be_bytes([c[16], c[17], c[18], c[19]]),
                    silent_ms: u32::from_be_bytes([c[20], c[21], c[22], c[23]]),
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{self, Frame};
    use crate::{HostId, OpFlags};

    const PREFIX: NetPrefix = NetPrefix::DEFAULT;

    fn frame_bytes(op: Opcode, handle: u64, h: BbRepr, payload: &[u8]) -> ([u8; 4400], usize) {
        let mut ep = frame::tests::endpoints();
        ep.dst = RemoteAddr::new(
            PREFIX,
            HostId(2),
            PageHandle::from_bits(handle),
            op,
            OpFlags::NONE,
        )
        .to_ipv6();
        let mut buf = [0u8; 4400];
        let n = frame::build(&mut buf, &ep, &h, payload).unwrap();
        (buf, n)
    }

    fn check(
        op: Opcode,
        handle: u64,
        h: BbRepr,
        payload: &[u8],
    ) -> Result<Body<'static>, RequestError> {
        let (buf, n) = frame_bytes(op, handle, h, payload);
        let f = Frame::parse(&buf[..n]).unwrap();
        // Leak-free 'static: re-derive the body's shape without borrowing the local buffer.
        Request::parse(&f, PREFIX).map(|r| match r.body {
            Body::Empty => Body::Empty,
            Body::Data(_) => Body::Data(Bytes::default()),
            Body::Handles(_) => Body::Handles(HandleList(&[])),
            Body::Writes(_) => Body::Writes(WriteEntries {
                payload: &[],
                count: 0,
            }),
        })
    }

    fn hdr(offset: u16, length: u16) -> BbRepr {
        BbRepr {
            count: 1,
            request_id: 1,
            offset,
            length,
            ..BbRepr::default()
        }
    }

    #[test]
    fn an_inline_read_is_padded_with_exactly_its_length() {
        let inline = |offset, length| BbRepr {
            flags: HeaderFlags::INLINE,
            ..hdr(offset, length)
        };
        assert_eq!(
            check(Opcode::READ, 5, inline(0, 4096), &[0; 4096]),
            Ok(Body::Empty)
        );
        assert_eq!(
            check(Opcode::READ, 5, inline(8, 100), &[0; 100]),
            Ok(Body::Empty)
        );
        for (pad, why) in [(0, "none"), (99, "short"), (101, "long")] {
            assert_eq!(
                check(Opcode::READ, 5, inline(8, 100), &[0; 101][..pad]),
                Err(RequestError::Malformed(
                    "an INLINE READ is padded with exactly its length"
                )),
                "{why}"
            );
        }
        // In two pieces, as a multi-buffer frame arrives.
        let (buf, n) = frame_bytes(Opcode::READ, 5, inline(0, 4096), &[0; 4096]);
        let f = Frame::parse(&buf[..n]).unwrap();
        let split = Frame {
            payload: &f.payload[..1000],
            payload_tail: &f.payload[1000..],
            ..f
        };
        assert_eq!(Request::parse(&split, PREFIX).unwrap().body, Body::Empty);
        // Without the flag a READ still takes no payload.
        assert_eq!(
            check(Opcode::READ, 5, hdr(0, 100), &[0; 100]),
            Err(RequestError::Malformed("unexpected payload"))
        );
    }

    #[test]
    fn page_data_may_come_in_two_pieces_and_nothing_else_may() {
        let data = [7u8; 4096];
        let h = hdr(0, 4096);
        let (buf, n) = frame_bytes(Opcode::WRITE, 5, h, &data);
        let whole = Frame::parse(&buf[..n]).unwrap();
        let split = Frame {
            payload: &whole.payload[..1000],
            payload_tail: &whole.payload[1000..],
            ..whole
        };
        match Request::parse(&split, PREFIX).unwrap().body {
            Body::Data(b) => {
                assert_eq!((b.head.len(), b.tail.len(), b.len()), (1000, 3096, 4096));
                let mut out = [0u8; 4096];
                b.copy_to(&mut out);
                assert_eq!(out, data);
            }
            other => panic!("{other:?}"),
        }
        let short = Frame {
            payload_tail: &whole.payload[1000..4000],
            ..split
        };
        assert!(
            Request::parse(&short, PREFIX).is_err(),
            "lengths still add up"
        );
        let handles = [0u8; 16];
        let mut h2 = hdr(0, 0);
        h2.count = 2;
        let (buf, n) = frame_bytes(Opcode::FREE_BULK, 5, h2, &handles);
        let f = Frame::parse(&buf[..n]).unwrap();
        let pieces = Frame {
            payload: &f.payload[..8],
            payload_tail: &f.payload[8..],
            ..f
        };
        assert_eq!(
            Request::parse(&pieces, PREFIX),
            Err(RequestError::Malformed(
                "a payload in pieces for this operation"
            ))
        );
    }

    #[test]
    fn valid_requests() {
        assert_eq!(check(Opcode::READ, 5, hdr(0, 4096), &[]), Ok(Body::Empty));
        assert_eq!(
            check(Opcode::WRITE, 5, hdr(4092, 4), &[1; 4]),
            Ok(Body::Data(Bytes::default()))
        );
        assert_eq!(check(Opcode::ALLOC, 0, hdr(0, 0), &[]), Ok(Body::Empty));
        assert_eq!(check(Opcode::CAS, 5, hdr(4088, 8), &[]), Ok(Body::Empty));
        assert_eq!(
            check(Opcode::UPDATE_ACQUIRE, 5, hdr(0, 0), &[]),
            Ok(Body::Empty)
        );
        let h = BbRepr {
            count: 2,
            ..hdr(0, 4096)
        };
        let mut list = [0u8; 16];
        put_handles(
            &mut list,
            [PageHandle::from_bits(5), PageHandle::from_bits(6)],
        );
        assert!(matches!(
            check(Opcode::READ_BULK, 5, h, &list),
            Ok(Body::Handles(_))
        ));
    }

    #[test]
    fn unknown_opcode() {
        assert_eq!(
            check(Opcode(0xee), 5, hdr(0, 4096), &[]),
            Err(RequestError::UnknownOpcode(Opcode(0xee)))
        );
        assert_eq!(
            RequestError::UnknownOpcode(Opcode(0xee)).status(),
            Some(Status::UNKNOWN_OPCODE)
        );
    }

    #[test]
    fn range_beyond_page() {
        assert_eq!(
            check(Opcode::READ, 5, hdr(4000, 97), &[]),
            Err(RequestError::OutOfRange {
                offset: 4000,
                length: 97
            })
        );
        assert_eq!(
            check(Opcode::READ, 5, hdr(0, 0), &[]),
            Err(RequestError::OutOfRange {
                offset: 0,
                length: 0
            })
        );
        assert_eq!(
            check(Opcode::WRITE, 5, hdr(4095, 2), &[0; 2]),
            Err(RequestError::OutOfRange {
                offset: 4095,
                length: 2
            })
        );
        assert_eq!(
            check(Opcode::READ, 5, hdr(u16::MAX, u16::MAX), &[]),
            Err(RequestError::OutOfRange {
                offset: u16::MAX,
                length: u16::MAX
            })
        );
        assert_eq!(
            RequestError::OutOfRange {
                offset: 0,
                length: 0
            }
            .status(),
            Some(Status::OUT_OF_RANGE)
        );
    }

    #[test]
    fn malformed_requests() {
        assert_eq!(
            check(Opcode::WRITE, 5, hdr(0, 8), &[0; 4]),
            Err(RequestError::Malformed(
                "payload length differs from range length"
            ))
        );
        assert_eq!(
            check(Opcode::READ, 5, hdr(0, 4096), &[0; 4]),
            Err(RequestError::Malformed("unexpected payload"))
        );
        assert_eq!(
            check(Opcode::ALLOC, 7, hdr(0, 0), &[]),
            Err(RequestError::Malformed("host operation with a page handle"))
        );
        assert_eq!(
            check(Opcode::READ, 0, hdr(0, 4096), &[]),
            Err(RequestError::NoHandle)
        );
        assert_eq!(
            check(
                Opcode::READ,
                5,
                BbRepr {
                    seg_max: 100,
                    ..hdr(0, 4096)
                },
                &[]
            ),
            Err(RequestError::Malformed("seg_max below the minimum"))
        );
        assert_eq!(
            check(
                Opcode::READ,
                5,
                BbRepr {
                    status: Status::MOVED,
                    ..hdr(0, 4096)
                },
                &[]
            ),
            Err(RequestError::Malformed("status must be 0 in a request"))
        );
        // Lease 0 is a lease check's business (LEASE_INVALID), not the format's.
        assert_eq!(
            check(Opcode::UPDATE_COMMIT, 5, hdr(0, 4), &[0; 4]),
            Ok(Body::Data(Bytes::default()))
        );
        assert_eq!(
            check(Opcode::UPDATE_RELEASE, 5, hdr(0, 0), &[]),
            Ok(Body::Empty)
        );
        assert_eq!(
            check(
                Opcode::READ,
                5,
                BbRepr {
                    flags: HeaderFlags::REPLY,
                    ..hdr(0, 4096)
                },
                &[]
            ),
            Err(RequestError::NotARequest)
        );
        assert_eq!(RequestError::NotARequest.status(), None);
    }

    #[test]
    fn atomics_must_be_aligned_words() {
        assert_eq!(
            check(Opcode::FETCH_ADD, 5, hdr(4, 8), &[]),
            Err(RequestError::Misaligned {
                offset: 4,
                length: 8
            })
        );
        assert_eq!(
            check(Opcode::CAS, 5, hdr(8, 4), &[]),
            Err(RequestError::Misaligned {
                offset: 8,
                length: 4
            })
        );
        assert_eq!(
            check(Opcode::CAS, 5, hdr(4096, 8), &[]),
            Err(RequestError::OutOfRange {
                offset: 4096,
                length: 8
            })
        );
        // §5.11: inside the page, anything but one aligned word is MISALIGNED, even where the
        // word would reach past the page or is empty.
        for (offset, length) in [(4092, 8), (0, 0), (4088, 0), (4095, 1)] {
            assert_eq!(
                check(Opcode::CAS, 5, hdr(offset, length), &[]),
                Err(RequestError::Misaligned { offset, length }),
                "{offset}+{length}"
            );
        }
    }

    /// §2.4 `count`: 1 in every request but the bulk ones and MIGRATE_IN.
    #[test]
    fn count_must_be_one_outside_bulk_requests() {
        let cases: [(Opcode, u64, BbRepr); 11] = [
            (Opcode::PING, 0, hdr(0, 0)),
            (Opcode::STAT, 0, hdr(0, 0)),
            (Opcode::ALLOC, 0, hdr(0, 0)),
            (Opcode::READ, 5, hdr(0, 8)),
            (Opcode::CAS, 5, hdr(0, 8)),
            (Opcode::FETCH_ADD, 5, hdr(0, 8)),
            (Opcode::SHARE, 5, hdr(0, 0)),
            (Opcode::UPDATE_ACQUIRE, 5, hdr(0, 8)),
            (Opcode::UPDATE_RELEASE, 5, hdr(0, 0)),
            (Opcode::FREE, 5, hdr(0, 0)),
            (Opcode::MIGRATE_OUT, 5, hdr(0, 4096)),
        ];
        for (op, handle, h) in cases {
            assert!(check(op, handle, h, &[]).is_ok(), "{op:?} count 1");
            for count in [0, 2, u16::MAX] {
                assert_eq!(
                    check(op, handle, BbRepr { count, ..h }, &[]),
                    Err(RequestError::Malformed("count must be 1")),
                    "{op:?} count {count}"
                );
            }
        }
        let two = BbRepr {
            count: 2,
            ..hdr(0, 8)
        };
        assert_eq!(
            check(Opcode::WRITE, 5, two, &[0; 8]),
            Err(RequestError::Malformed("count must be 1"))
        );
    }

    /// §5.14: MIGRATE_OUT to a page's address, or to its holder's host address naming the
    /// page by its original host and handle.
    #[test]
    fn migrate_out_goes_to_a_page_or_to_its_holder() {
        let whole = hdr(0, 4096);
        let named = BbRepr {
            count: 3,
            lease: 5,
            ..whole
        };
        assert_eq!(check(Opcode::MIGRATE_OUT, 5, whole, &[]), Ok(Body::Empty));
        assert_eq!(check(Opcode::MIGRATE_OUT, 0, named, &[]), Ok(Body::Empty));
        let nameless = Err(RequestError::Malformed(
            "MIGRATE_OUT to a host needs the page's original host and handle",
        ));
        for h in [
            whole,
            BbRepr { lease: 0, ..named },
            BbRepr { count: 0, ..named },
            BbRepr {
                count: 0xffff,
                ..named
            },
        ] {
            assert_eq!(check(Opcode::MIGRATE_OUT, 0, h, &[]), nameless, "{h:?}");
        }
        // The page form keeps count 1; either form takes the whole page and no payload.
        assert_eq!(
            check(Opcode::MIGRATE_OUT, 5, named, &[]),
            Err(RequestError::Malformed("count must be 1"))
        );
        assert_eq!(
            check(Opcode::MIGRATE_OUT, 0, BbRepr { length: 8, ..named }, &[]),
            Err(RequestError::Malformed("MIGRATE_OUT takes the whole page"))
        );
        assert_eq!(
            check(Opcode::MIGRATE_OUT, 0, named, &[1]),
            Err(RequestError::Malformed("unexpected payload"))
        );
    }

    /// §5.1, §5.9, §5.12, §5.8: operations without a range carry offset 0 and length 0.
    #[test]
    fn operations_without_a_range_refuse_one() {
        for (op, handle) in [
            (Opcode::PING, 0),
            (Opcode::FREE, 5),
            (Opcode::SHARE, 5),
            (Opcode::UPDATE_RELEASE, 5),
        ] {
            assert_eq!(
                check(op, handle, hdr(0, 8), &[]),
                Err(RequestError::Malformed("this operation takes no range")),
                "{op:?}"
            );
            assert_eq!(
                check(op, handle, hdr(8, 0), &[]),
                Err(RequestError::Malformed("this operation takes no range")),
                "{op:?}"
            );
        }
    }

    /// §4: INVALIDATE, REVOKE and READY are notices, never requests: UNKNOWN_OPCODE whatever they
    /// are sent to.
    #[test]
    fn notices_are_not_requests() {
        for op in [Opcode::INVALIDATE, Opcode::REVOKE, Opcode::READY] {
            for handle in [0, 5] {
                assert_eq!(
                    check(op, handle, hdr(0, 0), &[]),
                    Err(RequestError::UnknownOpcode(op))
                );
            }
        }
    }

    /// §5.18: the coherence requests' shapes.
    #[test]
    fn coherence_requests() {
        for op in [Opcode::GET_SHARED, Opcode::GET_EXCLUSIVE] {
            assert!(check(op, 5, hdr(0, 4096), &[]).is_ok(), "{op:?}");
            assert_eq!(
                check(op, 5, hdr(0, 0), &[]),
                Err(RequestError::OutOfRange {
                    offset: 0,
                    length: 0
                })
            );
            assert_eq!(
                check(op, 5, hdr(0, 8), &[1; 8]),
                Err(RequestError::Malformed("unexpected payload"))
            );
            assert_eq!(check(op, 0, hdr(0, 8), &[]), Err(RequestError::NoHandle));
        }
        // PUT: a pure release, or a write-back with its bytes; keep is 0, 1 or 2.
        assert!(check(Opcode::PUT, 5, hdr(0, 0), &[]).is_ok());
        assert!(check(Opcode::PUT, 5, hdr(8, 4), &[1; 4]).is_ok());
        assert_eq!(
            check(Opcode::PUT, 5, hdr(8, 4), &[1; 3]),
            Err(RequestError::Malformed(
                "payload length differs from range length"
            ))
        );
        let keep3 = BbRepr {
            operand0: 3,
            ..hdr(0, 0)
        };
        assert_eq!(
            check(Opcode::PUT, 5, keep3, &[]),
            Err(RequestError::Malformed(
                "PUT keeps nothing (0), a read copy (1) or the write copy (2)"
            ))
        );
        assert!(check(Opcode::RENEW, 5, hdr(0, 0), &[]).is_ok());
        assert_eq!(
            check(Opcode::RENEW, 5, hdr(0, 8), &[]),
            Err(RequestError::Malformed("this operation takes no range"))
        );
    }

    #[test]
    fn bulk_limits() {
        let h = BbRepr {
            count: MAX_BULK + 1,
            ..hdr(0, 0)
        };
        assert_eq!(
            check(Opcode::ALLOC_BULK, 0, h, &[]),
            Err(RequestError::TooMany(MAX_BULK + 1))
        );
        let h = BbRepr {
            count: 0,
            ..hdr(0, 0)
        };
        assert_eq!(
            check(Opcode::FREE_BULK, 5, h, &[]),
            Err(RequestError::Malformed("bulk count 0"))
        );
        let h = BbRepr {
            count: 2,
            ..hdr(0, 0)
        };
        assert_eq!(
            check(Opcode::FREE_BULK, 5, h, &[0; 8]),
            Err(RequestError::Malformed(
                "handle list length differs from count"
            ))
        );
        // Handle 0 among the items is that item's INVALID_HANDLE, not the request's (§5.5).
        let mut list = [0u8; 16];
        put_handles(&mut list, [PageHandle::from_bits(5), PageHandle::NONE]);
        assert!(matches!(
            check(Opcode::FREE_BULK, 5, h, &list),
            Ok(Body::Handles(_))
        ));
        // The request goes to its first item's page (which decides the route and the shard).
        assert_eq!(
            check(Opcode::FREE_BULK, 6, h, &list),
            Err(RequestError::Malformed(
                "a bulk request goes to its first item's page"
            ))
        );
        assert_eq!(RequestError::TooMany(200).status(), Some(Status::TOO_MANY));
    }

    #[test]
    fn write_bulk_entries() {
        let mut buf = [0u8; 128];
        let a = WriteEntry {
            handle: PageHandle::from_bits(5),
            offset: 100,
            data: &[1, 2, 3],
        };
        let b = WriteEntry {
            handle: PageHandle::from_bits(6),
            offset: 0,
            data: &[9; 8],
        };
        let end = put_write_entry(&mut buf, 0, &a).unwrap();
        assert_eq!(end, 24);
        assert_eq!(
            &buf[..24],
            &[
                0, 0, 0, 0, 0, 0, 0, 5, 0, 100, 0, 3, 0, 0, 0, 0, 1, 2, 3, 0, 0, 0, 0, 0
            ]
        );
        let end = put_write_entry(&mut buf, end, &b).unwrap();
        let (f, n) = frame_bytes(
            Opcode::WRITE_BULK,
            5,
            BbRepr {
                count: 2,
                ..hdr(0, 0)
            },
            &buf[..end],
        );
        let fr = Frame::parse(&f[..n]).unwrap();
        let r = Request::parse(&fr, PREFIX).unwrap();
        let Body::Writes(w) = r.body else {
            panic!("not writes")
        };
        let mut it = w.iter();
        assert_eq!(it.next(), Some(a));
        assert_eq!(it.next(), Some(b));
        assert_eq!(it.next(), None);
        assert_eq!(
            check(
                Opcode::WRITE_BULK,
                5,
                BbRepr {
                    count: 3,
                    ..hdr(0, 0)
                },
                &buf[..end]
            ),
            Err(RequestError::Malformed(
                "WRITE_BULK entries differ from count"
            ))
        );
        assert_eq!(
            check(
                Opcode::WRITE_BULK,
                5,
                BbRepr {
                    count: 2,
                    ..hdr(0, 0)
                },
                &buf[..end - 1]
            ),
            Err(RequestError::Malformed("WRITE_BULK entry truncated"))
        );
        let far = WriteEntry {
            handle: PageHandle::from_bits(5),
            offset: 4090,
            data: &[0; 8],
        };
        // A bad entry is that entry's status (§5.7): the request parses.
        let end = put_write_entry(&mut buf, 0, &far).unwrap();
        assert!(matches!(
            check(
                Opcode::WRITE_BULK,
                5,
                BbRepr {
                    count: 1,
                    ..hdr(0, 0)
                },
                &buf[..end]
            ),
            Ok(Body::Writes(_))
        ));
        assert_eq!(far.check(), Err(Status::OUT_OF_RANGE));
        let empty = WriteEntry { data: &[], ..a };
        assert_eq!(empty.check(), Err(Status::OUT_OF_RANGE));
        let nothing = WriteEntry {
            handle: PageHandle::NONE,
            ..a
        };
        assert_eq!(nothing.check(), Err(Status::INVALID_HANDLE));
        assert_eq!(a.check(), Ok(()));
    }

    #[test]
    fn stat_record_round_trip() {
        let s = StatRecord {
            pages_total: 1,
            pages_used: 2,
            requests: 3,
            errors: 4,
            duplicates: 5,
            malformed: 6,
            leases_held: 7,
            uptime_ms: 8,
            shards: 9,
            handoffs: 10,
            zero_copy: 11,
            stale: 12,
            handoff_dropped: 13,
            kernel_dropped: 14,
            bad_source: 15,
            reclaimed: 16,
            orphan_grace_ms: 17,
            copy_lease_ms: 18,
            copy_grants: 19,
            revokes: 20,
            recalling: 21,
            backup: 22,
            backup_epoch: 23,
            repl_lag_bytes: 24,
            repl_held: 25,
            repl_window_full: 26,
            replica_shards: 27,
            repl_copy_left: 28,
            repl_copy_total: 29,
        };
        let mut b = [0u8; StatRecord::LEN + 8];
        s.emit(&mut b);
        let e = OwnerEntry {
            addr: [7; 16],
            pages: 3,
            silent_ms: 250,
        };
        let mut list = [0u8; 2 * OwnerEntry::LEN];
        e.emit(&mut list[OwnerEntry::LEN..]);
        let mut back = OwnerEntry::parse_list(&list).unwrap();
        assert_eq!(back.next().map(|b| b.pages), Some(0));
        assert_eq!(back.next(), Some(e));
        assert_eq!(back.next(), None);
        assert!(OwnerEntry::parse_list(&list[1..]).is_none());
        assert_eq!(&b[..16], &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2]);
        assert_eq!(StatRecord::parse(&b), Some(s));
        // An older server's record: the fields it does not have read as 0.
        let old = StatRecord::parse(&b[..StatRecord::MIN_LEN]).unwrap();
        assert_eq!((old.uptime_ms, old.shards, old.handoffs), (8, 0, 0));
        assert_eq!(StatRecord::parse(&b[..63]), None);
        let mut st = [0u8; 4];
        assert_eq!(
            put_bulk_statuses(&mut st, [Status::OK, Status::STALE_HANDLE]),
            4
        );
        assert_eq!(st, [0, 0, 0, 4]);
        assert_eq!(bulk_status(&st, 1), Some(Status::STALE_HANDLE));
        assert_eq!(bulk_status(&st, 2), None);
    }
}
