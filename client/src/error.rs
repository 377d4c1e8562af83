//! Typed errors: one variant per status a server can answer, plus timeouts and local failures.

use bluebridge_proto::Status;

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// MALFORMED: the server found the request ill-formed.
    #[error("the server found the request malformed")]
    Malformed,
    /// UNKNOWN_OPCODE.
    #[error("the server does not know this operation")]
    UnknownOpcode,
    /// INVALID_HANDLE: no such page was ever handed out.
    #[error("invalid page handle")]
    InvalidHandle,
    /// STALE_HANDLE: the page was freed.
    #[error("stale page handle (the page was freed)")]
    StaleHandle,
    /// OUT_OF_RANGE.
    #[error("byte range outside the page")]
    OutOfRange,
    /// OUT_OF_MEMORY.
    #[error("the server has no free pages")]
    OutOfMemory,
    /// LEASE_HELD: another client holds the page's lease.
    #[error("another client holds the page's lease")]
    LeaseHeld,
    /// LEASE_EXPIRED: the lease ran out; nothing was written.
    #[error("the lease expired; nothing was written")]
    LeaseExpired,
    /// LEASE_INVALID.
    #[error("no such lease on this page")]
    LeaseInvalid,
    /// FORBIDDEN.
    #[error("this client may not use the page")]
    Forbidden,
    /// MOVED, still after every retry.
    #[error("the page moved and the route did not follow within the retry budget")]
    Moved,
    /// UNSUPPORTED_VERSION.
    #[error("the server speaks another protocol version")]
    UnsupportedVersion,
    /// MISALIGNED.
    #[error("an atomic needs an 8-byte aligned word")]
    Misaligned,
    /// TOO_MANY.
    #[error("too many items in one bulk request")]
    TooMany,
    /// BUSY.
    #[error("the server is busy")]
    Busy,
    /// INTERNAL.
    #[error("the server failed internally")]
    Internal,
    /// The controller reported the page freed (an INVALIDATE notice); not sent.
    #[error("the page was freed (the controller's notice)")]
    Invalidated,
    /// UNREACHABLE: the switch answered for a host the controller took out of service.
    #[error("the page's host is down (withdrawn by the controller)")]
    Unreachable,
    /// OTHER_SHARD: a bulk item named a page of another shard of the server than the
    /// request's first page (the client's bulk calls split by shard, so this means a bug).
    #[error("a bulk item's page is on another shard of the server")]
    OtherShard,
    /// RECALLING: the page's other copies are being revoked for this request (§5.18); ask
    /// again shortly.
    #[error("the page's other copies are being recalled")]
    Recalling,
    /// FENCED: the replication stream's epoch is over (§5.19); servers answer it to each
    /// other, a client sees it only from a misdirected frame.
    #[error("the pages are held by another server now (fenced)")]
    Fenced,
    /// A status this client does not know.
    #[error("unknown status {0}")]
    UnknownStatus(u16),
    /// No (complete) reply within the retry budget.
    #[error("no reply after {tries} transmissions")]
    Timeout {
        /// Transmissions made.
        tries: u32,
    },
    /// The request cannot be sent as asked (too large for a frame, bad range, ...).
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// A reply broke the protocol.
    #[error("bad reply: {0}")]
    BadReply(&'static str),
}

impl ClientError {
    /// The error for a non-OK status.
    pub fn from_status(s: Status) -> Self {
        match s {
            Status::MALFORMED => ClientError::Malformed,
            Status::UNKNOWN_OPCODE => ClientError::UnknownOpcode,
            Status::INVALID_HANDLE => ClientError::InvalidHandle,
            Status::STALE_HANDLE => ClientError::StaleHandle,
            Status::OUT_OF_RANGE => ClientError::OutOfRange,
            Status::OUT_OF_MEMORY => ClientError::OutOfMemory,
            Status::LEASE_HELD => ClientError::LeaseHeld,
            Status::LEASE_EXPIRED => ClientError::LeaseExpired,
            Status::LEASE_INVALID => ClientError::LeaseInvalid,
            Status::FORBIDDEN => ClientError::Forbidden,
            Status::MOVED => ClientError::Moved,
            Status::UNSUPPORTED_VERSION => ClientError::UnsupportedVersion,
            Status::MISALIGNED => ClientError::Misaligned,
            Status::TOO_MANY => ClientError::TooMany,
            Status::BUSY => ClientError::Busy,
            Status::INTERNAL => ClientError::Internal,
            Status::UNREACHABLE => ClientError::Unreachable,
            Status::OTHER_SHARD => ClientError::OtherShard,
            Status::RECALLING => ClientError::Recalling,
            Status::FENCED => ClientError::Fenced,
            other => ClientError::UnknownStatus(other.0),
        }
    }

    /// The status this error stands for, if it came from a server.
    pub fn status(&self) -> Option<Status> {
        Status::ALL
            .iter()
            .copied()
            .find(|&s| !s.is_ok() && ClientError::from_status(s) == *self)
    }
}

/// Result of a status: `Ok` for OK, the typed error otherwise.
pub fn check(s: Status) -> Result<(), ClientError> {
    if s.is_ok() {
        Ok(())
    } else {
        Err(ClientError::from_status(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_status_has_its_variant() {
        for &s in Status::ALL.iter().filter(|s| !s.is_ok()) {
            let e = ClientError::from_status(s);
            assert!(!matches!(e, ClientError::UnknownStatus(_)), "{s:?}");
            assert_eq!(e.status(), Some(s));
        }
        assert_eq!(
            ClientError::from_status(Status(999)),
            ClientError::UnknownStatus(999)
        );
        assert_eq!(check(Status::OK), Ok(()));
    }
}
