//! Wire codes: opcodes, statuses and flag bytes. Newtypes over the integer so that unknown
//! values survive a round trip and are reported, never a panic.

use core::fmt;

macro_rules! wire_code {
    (
        $(#[$meta:meta])*
        $name:ident($int:ty) {
            $( $(#[$cmeta:meta])* $konst:ident = $value:expr, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        #[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
        pub struct $name(pub $int);

        impl $name {
            $( $(#[$cmeta])* pub const $konst: $name = $name($value); )*

            /// Every value with a name, in wire order.
            pub const ALL: &'static [$name] = &[$($name::$konst),*];

            /// The constant's name, or `None` for a value this version does not know.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 {
                    $( $value => Some(stringify!($konst)), )*
                    _ => None,
                }
            }

            /// Whether this version of the protocol knows the value.
            pub const fn is_known(self) -> bool {
                self.name().is_some()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "{}({:#x})", stringify!($name), self.0),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }

        impl From<$int> for $name {
            fn from(v: $int) -> Self {
                $name(v)
            }
        }

        impl From<$name> for $int {
            fn from(v: $name) -> Self {
                v.0
            }
        }
    };
}

wire_code! {
    /// What a request asks for: byte 14 of the destination address (and of the reply's source).
    Opcode(u8) {
        /// Liveness probe; the reply echoes the request.
        PING = 0x01,
        /// Server statistics; the reply carries the STAT record.
        STAT = 0x02,
        /// Allocate one zeroed page; the reply comes from the new page's address.
        ALLOC = 0x10,
        /// Allocate one page and fill a range of it, in one round trip.
        ALLOC_WRITE = 0x11,
        /// Allocate `count` pages; the reply lists their handles.
        ALLOC_BULK = 0x12,
        /// Read a byte range of a page (the whole page: offset 0, length 4096).
        READ = 0x20,
        /// Read the same range of several pages of one host.
        READ_BULK = 0x21,
        /// Write a byte range of a page; acknowledged.
        WRITE = 0x30,
        /// Write a byte range of a page; never answered.
        WRITE_BLIND = 0x31,
        /// Write ranges of several pages of one host, in one frame.
        WRITE_BULK = 0x32,
        /// Acquire the page's exclusive lease and read it.
        UPDATE_ACQUIRE = 0x40,
        /// Write back under the lease; releases it unless the MORE flag is set.
        UPDATE_COMMIT = 0x41,
        /// Give the lease back without writing.
        UPDATE_RELEASE = 0x42,
        /// Free the page; later use of the handle is an error.
        FREE = 0x50,
        /// Free several pages of one host.
        FREE_BULK = 0x51,
        /// Compare-and-swap of an aligned 8-byte word.
        CAS = 0x60,
        /// Fetch-and-add on an aligned 8-byte word.
        FETCH_ADD = 0x61,
        /// Let every client use the page (by default only the allocating client may).
        SHARE = 0x70,
        /// Keep the page when its owner falls silent: a server frees the pages of an owner it
        /// has not heard from for its grace period (§5.17), except shared and detached ones.
        /// Only the owner may detach a page; a detached page stays until freed. Idempotent.
        DETACH = 0x71,
        /// Controller only: freeze the page for migration and return it. From now on this
        /// server answers MOVED for it; the reply carries the page (like a READ of 0..4096),
        /// its owner's address in operand0 (high half) and operand1, and SHARED if shared.
        MIGRATE_OUT = 0x80,
        /// Controller only, to the destination host: adopt a page migrating here. `count` is the
        /// page's original host id, `lease` its original handle, operand0/operand1 its owner's
        /// address, SHARED whether it is shared; the payload is the whole page (offset 0,
        /// length 4096, one frame). The host then answers for that address.
        MIGRATE_IN = 0x81,
        /// Controller only, to a host address: list one shard's page owners. `lease` selects
        /// the shard (a handle-shaped value whose shard field names it), operand0 is the
        /// first owner number to list (0 to start). The reply's payload is `count` 24-byte
        /// entries (address, pages held, milliseconds since last heard); its operand0 is the
        /// owner number to ask for next, 0 when the list is complete.
        OWNERS = 0x82,
        /// Controller only, to a host address: free every page the owner operand0/operand1
        /// (its address, high half first) holds on the shard `lease` selects, shared and
        /// detached ones included (not pages migrated away: their new holder has them). The
        /// reply's operand0 is how many pages were freed.
        RECLAIM = 0x83,
        /// Controller → clients, a notice rather than a request: reply-shaped (REPLY set,
        /// status OK, request id 0), from the controller's host address with this opcode,
        /// payload the 16-byte address of a page that was freed. Clients fail later requests
        /// for that page at once (`Invalidated`).
        INVALIDATE = 0x90,
        /// Coherence (§5.18): fetch a read copy of a range of the page, registering the
        /// requester as a reader. The reply carries the range like a READ, the copy's
        /// generation in `lease` and the copy lease (ms) in operand0; RECALLING while a
        /// writer is being recalled.
        GET_SHARED = 0xa0,
        /// Coherence (§5.18): fetch the write copy. `lease` = the generation of the read copy
        /// the requester holds (0: none). The home revokes every other copy first (RECALLING
        /// meanwhile); the reply carries the range (or no bytes when the requester's copy is
        /// current), the new generation in `lease`, the copy lease in operand0.
        GET_EXCLUSIVE = 0xa1,
        /// Coherence (§5.18): give a copy back or keep less of it. `lease` = the copy's
        /// generation, operand0 = what the requester keeps (0 nothing, 1 a read copy, 2 the
        /// write copy), and from the writer the page bytes of a range (its write-back).
        PUT = 0xa2,
        /// Coherence (§5.18): renew the requester's copy lease at the page's shard (any page
        /// of it). The reply's operand0 is the lease, ms.
        RENEW = 0xa3,
        /// Home → client, a notice rather than a request (§5.18): reply-shaped (REPLY set,
        /// status OK, request id 0), from the page's address with this opcode; `lease` = the
        /// generation of the copies revoked, operand0 = what the holder may keep (0 nothing,
        /// 1 a read copy). The holder answers with a PUT.
        REVOKE = 0xa4,
        /// Home → client, a notice (§5.18): reply-shaped, from the page's address with this
        /// opcode, to the last requester the home answered RECALLING: the copies in its way
        /// are gone, ask again now. A hint: losing it costs only the requester's back-off.
        READY = 0xa5,
        /// Replication (§5.19), primary → backup: one frame of a primary shard's replication
        /// stream, to the backup's host address with the stream's shard field in the handle
        /// (its other bits 0). `request_id` = the frame's sequence number (from 1), `lease` =
        /// the stream's epoch, payload = records. The backup answers with the highest
        /// sequence it has applied in order (`request_id` of a reply with this opcode), or
        /// FENCED once the epoch is over.
        REPLICATE = 0xb0,
        /// Controller only, to the address of the host whose pages are to be replicated (its
        /// holder answers): replicate them to host `operand0` (0: to nobody) under epoch
        /// `lease`. Idempotent.
        BACKUP = 0xb1,
        /// Controller only, to the backup's host address: accept the replication stream of
        /// host `operand0` under epoch `lease` (an epoch of 0 forgets that host's replica).
        /// Idempotent.
        REPLICA = 0xb2,
        /// Controller only, to the backup's host address: take over the pages of host
        /// `operand0`, whose holder died, as their holder under epoch `lease`: from now on the
        /// backup answers for them and refuses the old stream (FENCED). BUSY until every
        /// shard has taken over; LEASE_EXPIRED if the replica is not in step. Idempotent.
        PROMOTE = 0xb3,
    }
}

impl Opcode {
    /// Whether executing the request twice differs from executing it once. The server answers a
    /// retransmission of such a request from its table of recent replies.
    pub const fn is_idempotent(self) -> bool {
        matches!(
            self,
            Opcode::PING
                | Opcode::STAT
                | Opcode::READ
                | Opcode::READ_BULK
                | Opcode::WRITE
                | Opcode::WRITE_BLIND
                | Opcode::WRITE_BULK
                | Opcode::SHARE
                | Opcode::DETACH
                | Opcode::MIGRATE_OUT
                | Opcode::OWNERS
                | Opcode::GET_SHARED
                | Opcode::GET_EXCLUSIVE
                | Opcode::RENEW
                | Opcode::BACKUP
                | Opcode::REPLICA
                | Opcode::PROMOTE
        )
    }

    /// Whether a client may send this opcode as a request: known, not a notice (INVALIDATE
    /// travels only from the controller to clients) and not a replication stream frame
    /// (REPLICATE travels between servers, §5.19).
    pub const fn is_request(self) -> bool {
        self.is_known() && !self.is_notice() && self.0 != Opcode::REPLICATE.0
    }

    /// Whether the opcode names a notice a server or the controller sends to clients
    /// (INVALIDATE, REVOKE, READY), never a request.
    pub const fn is_notice(self) -> bool {
        matches!(self, Opcode::INVALIDATE | Opcode::REVOKE | Opcode::READY)
    }

    /// Whether the request names no range: offset and length must be 0.
    pub const fn takes_no_range(self) -> bool {
        matches!(
            self,
            Opcode::PING
                | Opcode::STAT
                | Opcode::ALLOC
                | Opcode::ALLOC_BULK
                | Opcode::FREE
                | Opcode::FREE_BULK
                | Opcode::SHARE
                | Opcode::DETACH
                | Opcode::UPDATE_RELEASE
                | Opcode::OWNERS
                | Opcode::RECLAIM
                | Opcode::RENEW
                | Opcode::BACKUP
                | Opcode::REPLICA
                | Opcode::PROMOTE
        )
    }

    /// Whether the request's `count` field counts items (1..=128); every other request but
    /// MIGRATE_IN (where it is the page's original host) carries count 1.
    pub const fn is_bulk(self) -> bool {
        matches!(
            self,
            Opcode::ALLOC_BULK | Opcode::READ_BULK | Opcode::WRITE_BULK | Opcode::FREE_BULK
        )
    }

    /// Whether the request addresses a host rather than a page (its handle is zero).
    pub const fn is_host_op(self) -> bool {
        matches!(
            self,
            Opcode::PING
                | Opcode::STAT
                | Opcode::ALLOC
                | Opcode::ALLOC_WRITE
                | Opcode::ALLOC_BULK
                | Opcode::MIGRATE_IN
                | Opcode::OWNERS
                | Opcode::RECLAIM
                | Opcode::BACKUP
                | Opcode::REPLICA
                | Opcode::PROMOTE
        )
    }

    /// Whether the request changes nothing a later request could observe, so a replicating
    /// server need not send it to its backup (§5.19): PING, STAT, READ, READ_BULK, OWNERS
    /// (and the notices and replication's own messages, which never reach a shard's state).
    pub const fn is_pure_read(self) -> bool {
        matches!(
            self,
            Opcode::PING | Opcode::STAT | Opcode::READ | Opcode::READ_BULK | Opcode::OWNERS
        )
    }

    /// Whether the opcode is one of replication's own (§5.19): the stream and the
    /// controller's orders. None of them is replicated.
    pub const fn is_replication(self) -> bool {
        matches!(
            self,
            Opcode::REPLICATE | Opcode::BACKUP | Opcode::REPLICA | Opcode::PROMOTE
        )
    }

    /// Whether the request frame carries page data (`offset`/`length` and that many bytes).
    pub const fn request_carries_data(self) -> bool {
        matches!(
            self,
            Opcode::ALLOC_WRITE
                | Opcode::WRITE
                | Opcode::WRITE_BLIND
                | Opcode::UPDATE_COMMIT
                | Opcode::MIGRATE_IN
                | Opcode::PUT
        )
    }

    /// Whether the reply frames carry page data.
    pub const fn reply_carries_data(self) -> bool {
        matches!(
            self,
            Opcode::READ
                | Opcode::READ_BULK
                | Opcode::UPDATE_ACQUIRE
                | Opcode::MIGRATE_OUT
                | Opcode::GET_SHARED
                | Opcode::GET_EXCLUSIVE
        )
    }

    /// Whether the server answers at all.
    pub const fn expects_reply(self) -> bool {
        !matches!(self, Opcode::WRITE_BLIND)
    }
}

wire_code! {
    /// The outcome of a request, carried in every reply.
    Status(u16) {
        /// Done.
        OK = 0,
        /// The request is not well formed (lengths, reserved fields, payload shape).
        MALFORMED = 1,
        /// The opcode is not one this server knows.
        UNKNOWN_OPCODE = 2,
        /// The handle names no page this server ever handed out.
        INVALID_HANDLE = 3,
        /// The handle named a page that has since been freed.
        STALE_HANDLE = 4,
        /// The byte range reaches past the page, or is empty where it may not be.
        OUT_OF_RANGE = 5,
        /// No free page left.
        OUT_OF_MEMORY = 6,
        /// Another client holds the page's lease.
        LEASE_HELD = 7,
        /// The lease ran out before the commit arrived; nothing was written.
        LEASE_EXPIRED = 8,
        /// No lease, or another lease id, was presented.
        LEASE_INVALID = 9,
        /// The client may not use this page (or this server).
        FORBIDDEN = 10,
        /// The page lives elsewhere now; retry the same address (the route has changed).
        MOVED = 11,
        /// The header's version is not one the server speaks; the reply carries its own.
        UNSUPPORTED_VERSION = 12,
        /// An atomic operation's offset is not 8-byte aligned or its length is not 8.
        MISALIGNED = 13,
        /// A bulk request asks for more items than allowed.
        TOO_MANY = 14,
        /// The server cannot take the request now; retry later.
        BUSY = 15,
        /// The server failed in a way that is not the client's fault.
        INTERNAL = 16,
        /// No live server holds this address: the controller withdrew its host after failed
        /// health checks. Sent by the switch, not by a server.
        UNREACHABLE = 17,
        /// A bulk item's handle belongs to another shard of the server than the request's
        /// first page: send it in a bulk request of its own (docs/protocol.md §5.16).
        OTHER_SHARD = 18,
        /// Coherence (§5.18): the page's other copies are being revoked for this request (the
        /// home has sent their holders REVOKE notices); ask again shortly.
        RECALLING = 19,
        /// Replication (§5.19): the stream's epoch is over — another server holds the pages
        /// now (the backup was promoted, or the controller moved the stream elsewhere). The
        /// primary stops answering for them.
        FENCED = 20,
    }
}

impl Status {
    /// Whether the status means success.
    pub const fn is_ok(self) -> bool {
        self.0 == Status::OK.0
    }
}

/// The flag byte of the address (byte 15): an argument of the operation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct OpFlags(pub u8);

impl OpFlags {
    /// No flags.
    pub const NONE: OpFlags = OpFlags(0);
}

/// The flags field of the BlueBridge header.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct HeaderFlags(pub u8);

impl HeaderFlags {
    /// No flags.
    pub const NONE: HeaderFlags = HeaderFlags(0);
    /// The frame is a reply.
    pub const REPLY: HeaderFlags = HeaderFlags(0x01);
    /// ALLOC*: other clients may use the new pages (by default only the allocating client may).
    pub const SHARED: HeaderFlags = HeaderFlags(0x02);
    /// UPDATE_COMMIT: more commit frames follow; keep the lease after this one.
    pub const MORE: HeaderFlags = HeaderFlags(0x04);
    /// Set by a client on a retransmission (informational, for counters and captures).
    pub const RETRY: HeaderFlags = HeaderFlags(0x08);
    /// READ: the request is padded with `length` zero bytes, so the reply fits in its frame
    /// and a server may answer it in place (in XDP, from its hot-page store); in a reply:
    /// answered that way (docs/protocol.md §6.1).
    pub const INLINE: HeaderFlags = HeaderFlags(0x10);
    /// Every flag this version defines; the other bits are reserved (sent as zero, ignored).
    pub const DEFINED: HeaderFlags = HeaderFlags(0x1f);

    /// Whether every flag of `other` is set in `self`.
    pub const fn contains(self, other: HeaderFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// `self` with the flags of `other` added.
    #[must_use]
    pub const fn with(self, other: HeaderFlags) -> HeaderFlags {
        HeaderFlags(self.0 | other.0)
    }

    /// `self` with the flags of `other` removed.
    #[must_use]
    pub const fn without(self, other: HeaderFlags) -> HeaderFlags {
        HeaderFlags(self.0 & !other.0)
    }
}

impl core::ops::BitOr for HeaderFlags {
    type Output = HeaderFlags;
    fn bitor(self, rhs: HeaderFlags) -> HeaderFlags {
        self.with(rhs)
    }
}

impl fmt::Debug for HeaderFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(HeaderFlags, &str); 5] = [
            (HeaderFlags::REPLY, "REPLY"),
            (HeaderFlags::SHARED, "SHARED"),
            (HeaderFlags::MORE, "MORE"),
            (HeaderFlags::RETRY, "RETRY"),
            (HeaderFlags::INLINE, "INLINE"),
        ];
        let mut first = true;
        for (flag, name) in NAMES {
            if self.contains(flag) {
                f.write_str(if first { "" } else { "|" })?;
                f.write_str(name)?;
                first = false;
            }
        }
        let rest = self.0 & !HeaderFlags::DEFINED.0;
        if rest != 0 || first {
            if !first {
                f.write_str("|")?;
            }
            write!(f, "{rest:#04x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::format;

    use super::*;

    #[test]
    fn unknown_values_round_trip_and_are_reported() {
        let op = Opcode::from(0xee);
        assert!(!op.is_known());
        assert_eq!(u8::from(op), 0xee);
        assert_eq!(format!("{op:?}"), "Opcode(0xee)");
        let st = Status::from(999);
        assert!(!st.is_known());
        assert_eq!(u16::from(st), 999);
        assert_eq!(format!("{st}"), "Status(0x3e7)");
    }

    #[test]
    fn names_are_unique_and_known() {
        for (i, a) in Opcode::ALL.iter().enumerate() {
            assert!(a.is_known());
            assert!(Opcode::ALL[i + 1..].iter().all(|b| a != b));
        }
        for (i, a) in Status::ALL.iter().enumerate() {
            assert!(a.is_known());
            assert!(Status::ALL[i + 1..].iter().all(|b| a != b));
        }
        assert_eq!(format!("{:?}", Opcode::FETCH_ADD), "FETCH_ADD");
        assert_eq!(format!("{}", Status::LEASE_EXPIRED), "LEASE_EXPIRED");
    }

    #[test]
    fn header_flags_debug() {
        assert_eq!(format!("{:?}", HeaderFlags::NONE), "0x00");
        assert_eq!(
            format!("{:?}", HeaderFlags::REPLY | HeaderFlags::MORE),
            "REPLY|MORE"
        );
        assert_eq!(format!("{:?}", HeaderFlags(0x81)), "REPLY|0x80");
    }
}
