//! The BlueBridge C API: `libbluebridge` (`cdylib` and `staticlib`) and `bluebridge.h`,
//! generated from this crate by cbindgen (`cargo xtask capi`). docs/c-api.md is the guide.
//!
//! Conventions, for every function:
//! - It returns a [`bb_status`]: `BB_OK`, one of the protocol's statuses (docs/protocol.md §3)
//!   with the same number, or one of the local failures from 256 up (`BB_TIMEOUT`, ...).
//!   [`bb_last_error`] describes the calling thread's last failure in words.
//! - No Rust panic crosses the boundary: one is caught and returned as `BB_PANIC`.
//! - Objects (`bb_client`, `bb_region`) are created by the library and given back with their
//!   close function; a null pointer is `BB_INVALID_ARGUMENT`, never a crash. A `bb_client` is
//!   used by one thread at a time; a region's memory by any thread.
//! - Memory passed in is borrowed for the call only, except where a function says otherwise
//!   (a pipelined read's buffer: until its completion is returned).
//!
//! This crate is the project's FFI boundary: its unsafe code turns C pointers into Rust
//! references, each under the preconditions its function's `# Safety` section states.

#![allow(
    non_camel_case_types,
    reason = "the C API's names: bb_client, bb_status, BB_OK"
)]

mod client;
mod region;

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

use bluebridge_client::ClientError;

pub use client::*;
pub use region::*;

/// What a call did: `BB_OK`, a server's status (the protocol's number, docs/protocol.md §3),
/// or a local failure (256 and up).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum bb_status {
    /// Done.
    BB_OK = 0,
    /// The server found the request malformed.
    BB_MALFORMED = 1,
    /// The server does not know the operation.
    BB_UNKNOWN_OPCODE = 2,
    /// The handle never named a page of that server.
    BB_INVALID_HANDLE = 3,
    /// The page was freed.
    BB_STALE_HANDLE = 4,
    /// The byte range is outside the page.
    BB_OUT_OF_RANGE = 5,
    /// The server has no free pages.
    BB_OUT_OF_MEMORY = 6,
    /// Another client holds the page's update lease.
    BB_LEASE_HELD = 7,
    /// The update lease ran out; nothing was written.
    BB_LEASE_EXPIRED = 8,
    /// No such lease on the page.
    BB_LEASE_INVALID = 9,
    /// This client may not use the page or the server.
    BB_FORBIDDEN = 10,
    /// The page moved and the route did not follow within the retry budget.
    BB_MOVED = 11,
    /// The server speaks another protocol version.
    BB_UNSUPPORTED_VERSION = 12,
    /// An atomic's range is not one 8-byte word at an 8-aligned offset.
    BB_MISALIGNED = 13,
    /// Too many items in one bulk request.
    BB_TOO_MANY = 14,
    /// The server is busy; try again after a back-off.
    BB_BUSY = 15,
    /// The server failed internally.
    BB_INTERNAL = 16,
    /// The page's host is down (withdrawn by the controller).
    BB_UNREACHABLE = 17,
    /// A bulk item named a page of another shard.
    BB_OTHER_SHARD = 18,
    /// The page's other copies are being recalled; ask again shortly.
    BB_RECALLING = 19,
    /// The pages are held by another server now.
    BB_FENCED = 20,
    /// No reply within the retry budget (`bb_options.rto_us` × `retries`).
    BB_TIMEOUT = 256,
    /// The controller reported the page freed (an INVALIDATE notice); nothing was sent.
    BB_INVALIDATED = 257,
    /// A null pointer, a bad option or address, a range the call cannot take.
    BB_INVALID_ARGUMENT = 258,
    /// A server answered with a status this library does not know, or broke the protocol.
    BB_BAD_REPLY = 259,
    /// Opening the transport or setting up a region failed (see `bb_last_error`).
    BB_SETUP_FAILED = 260,
    /// A bug in the library: a panic, caught at the boundary (see `bb_last_error`).
    BB_PANIC = 261,
}

impl bb_status {
    /// The status a client error stands for.
    fn of(e: &ClientError) -> bb_status {
        use bb_status::*;
        match e {
            ClientError::Malformed => BB_MALFORMED,
            ClientError::UnknownOpcode => BB_UNKNOWN_OPCODE,
            ClientError::InvalidHandle => BB_INVALID_HANDLE,
            ClientError::StaleHandle => BB_STALE_HANDLE,
            ClientError::OutOfRange => BB_OUT_OF_RANGE,
            ClientError::OutOfMemory => BB_OUT_OF_MEMORY,
            ClientError::LeaseHeld => BB_LEASE_HELD,
            ClientError::LeaseExpired => BB_LEASE_EXPIRED,
            ClientError::LeaseInvalid => BB_LEASE_INVALID,
            ClientError::Forbidden => BB_FORBIDDEN,
            ClientError::Moved => BB_MOVED,
            ClientError::UnsupportedVersion => BB_UNSUPPORTED_VERSION,
            ClientError::Misaligned => BB_MISALIGNED,
            ClientError::TooMany => BB_TOO_MANY,
            ClientError::Busy => BB_BUSY,
            ClientError::Internal => BB_INTERNAL,
            ClientError::Unreachable => BB_UNREACHABLE,
            ClientError::OtherShard => BB_OTHER_SHARD,
            ClientError::Recalling => BB_RECALLING,
            ClientError::Fenced => BB_FENCED,
            ClientError::Invalidated => BB_INVALIDATED,
            ClientError::Timeout { .. } => BB_TIMEOUT,
            ClientError::Invalid(_) => BB_INVALID_ARGUMENT,
            ClientError::UnknownStatus(_) | ClientError::BadReply(_) => BB_BAD_REPLY,
        }
    }

    /// Its name, as in the header.
    fn name(self) -> &'static CStr {
        use bb_status::*;
        match self {
            BB_OK => c"BB_OK",
            BB_MALFORMED => c"BB_MALFORMED",
            BB_UNKNOWN_OPCODE => c"BB_UNKNOWN_OPCODE",
            BB_INVALID_HANDLE => c"BB_INVALID_HANDLE",
            BB_STALE_HANDLE => c"BB_STALE_HANDLE",
            BB_OUT_OF_RANGE => c"BB_OUT_OF_RANGE",
            BB_OUT_OF_MEMORY => c"BB_OUT_OF_MEMORY",
            BB_LEASE_HELD => c"BB_LEASE_HELD",
            BB_LEASE_EXPIRED => c"BB_LEASE_EXPIRED",
            BB_LEASE_INVALID => c"BB_LEASE_INVALID",
            BB_FORBIDDEN => c"BB_FORBIDDEN",
            BB_MOVED => c"BB_MOVED",
            BB_UNSUPPORTED_VERSION => c"BB_UNSUPPORTED_VERSION",
            BB_MISALIGNED => c"BB_MISALIGNED",
            BB_TOO_MANY => c"BB_TOO_MANY",
            BB_BUSY => c"BB_BUSY",
            BB_INTERNAL => c"BB_INTERNAL",
            BB_UNREACHABLE => c"BB_UNREACHABLE",
            BB_OTHER_SHARD => c"BB_OTHER_SHARD",
            BB_RECALLING => c"BB_RECALLING",
            BB_FENCED => c"BB_FENCED",
            BB_TIMEOUT => c"BB_TIMEOUT",
            BB_INVALIDATED => c"BB_INVALIDATED",
            BB_INVALID_ARGUMENT => c"BB_INVALID_ARGUMENT",
            BB_BAD_REPLY => c"BB_BAD_REPLY",
            BB_SETUP_FAILED => c"BB_SETUP_FAILED",
            BB_PANIC => c"BB_PANIC",
        }
    }
}

/// A failed call: its status and what to tell `bb_last_error`.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) status: bb_status,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn invalid(message: impl Into<String>) -> Failure {
        Failure {
            status: bb_status::BB_INVALID_ARGUMENT,
            message: message.into(),
        }
    }

    pub(crate) fn setup(message: impl Into<String>) -> Failure {
        Failure {
            status: bb_status::BB_SETUP_FAILED,
            message: message.into(),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        Failure {
            status: bb_status::of(&e),
            message: e.to_string(),
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs a call's body: its failure becomes its status and `bb_last_error`, a panic
/// `BB_PANIC`.
pub(crate) fn guard(body: impl FnOnce() -> Result<(), Failure>) -> bb_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => bb_status::BB_OK,
        Ok(Err(f)) => {
            set_last_error(&f.message);
            f.status
        }
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            set_last_error(&format!("bug in libbluebridge: {what}"));
            bb_status::BB_PANIC
        }
    }
}

/// A NUL-terminated string argument, or `None` for a null pointer.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that lives through the call.
pub(crate) unsafe fn opt_str<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null, and the caller promises a NUL-terminated string alive for the call.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(Some)
        .map_err(|_| Failure::invalid(format!("{what} is not UTF-8")))
}

/// Every status, for [`bb_status_name`].
const ALL: [bb_status; 27] = {
    use bb_status::*;
    [
        BB_OK,
        BB_MALFORMED,
        BB_UNKNOWN_OPCODE,
        BB_INVALID_HANDLE,
        BB_STALE_HANDLE,
        BB_OUT_OF_RANGE,
        BB_OUT_OF_MEMORY,
        BB_LEASE_HELD,
        BB_LEASE_EXPIRED,
        BB_LEASE_INVALID,
        BB_FORBIDDEN,
        BB_MOVED,
        BB_UNSUPPORTED_VERSION,
        BB_MISALIGNED,
        BB_TOO_MANY,
        BB_BUSY,
        BB_INTERNAL,
        BB_UNREACHABLE,
        BB_OTHER_SHARD,
        BB_RECALLING,
        BB_FENCED,
        BB_TIMEOUT,
        BB_INVALIDATED,
        BB_INVALID_ARGUMENT,
        BB_BAD_REPLY,
        BB_SETUP_FAILED,
        BB_PANIC,
    ]
};

/// The name of a status value (`"BB_STALE_HANDLE"`), or `"BB_UNKNOWN"` for a number that is
/// none. The string is static: never freed.
#[unsafe(no_mangle)]
pub extern "C" fn bb_status_name(status: i32) -> *const c_char {
    ALL.iter()
        .find(|&&s| s as i32 == status)
        .map_or(c"BB_UNKNOWN", |s| s.name())
        .as_ptr()
}

/// The calling thread's last failure in words (empty if none yet). The string belongs to the
/// library and stays valid until the thread's next failing call; copy it to keep it.
#[unsafe(no_mangle)]
pub extern "C" fn bb_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_server_status_has_its_protocol_number() {
        for &s in bluebridge_proto::Status::ALL {
            if s.is_ok() {
                continue;
            }
            let e = ClientError::from_status(s);
            assert_eq!(bb_status::of(&e) as u16, s.0, "{s:?}");
            let name = bb_status::of(&e).name().to_str().unwrap();
            assert_eq!(name, format!("BB_{}", s.name().unwrap()), "{s:?}");
        }
    }

    #[test]
    fn a_panic_is_a_status_and_a_message() {
        let st = guard(|| panic!("on purpose"));
        assert_eq!(st, bb_status::BB_PANIC);
        // SAFETY: bb_last_error returns a NUL-terminated string alive until the next failure.
        let msg = unsafe { CStr::from_ptr(bb_last_error()) };
        assert_eq!(msg.to_str().unwrap(), "bug in libbluebridge: on purpose");
        assert_eq!(guard(|| Ok(())), bb_status::BB_OK);
    }

    #[test]
    fn names_by_number() {
        let name = |n: i32| {
            // SAFETY: bb_status_name returns a static NUL-terminated string.
            unsafe { CStr::from_ptr(bb_status_name(n)) }
                .to_str()
                .unwrap()
        };
        assert_eq!(name(0), "BB_OK");
        assert_eq!(name(4), "BB_STALE_HANDLE");
        assert_eq!(name(256), "BB_TIMEOUT");
        assert_eq!(name(21), "BB_UNKNOWN");
        assert_eq!(name(-1), "BB_UNKNOWN");
        assert_eq!(ALL.len(), 27);
    }
}
