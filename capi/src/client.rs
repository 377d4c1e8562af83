//! `bb_client`: opening a client, the blocking calls, and the pipelined submit/poll API.

use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use bluebridge_client::{AnyTransport, Client, Connect, Request, TransportKind};
use bluebridge_proto::{HostId, MacAddr, NetPrefix, Opcode, PAGE_SIZE, RemoteAddr};

use crate::{Failure, bb_status, guard, opt_str};

/// How to open a client: the same choices as the command-line tools' network options
/// (`bluebridge-client --help`). Fill it with [`bb_options_init`] first, then set what
/// differs. The strings are borrowed for the call to [`bb_open`] only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bb_options {
    /// The network interface (required).
    pub iface: *const c_char,
    /// `"xdp"` (AF_XDP, needs root; the default when null) or `"udp"` (kernel sockets).
    pub transport: *const c_char,
    /// This client's IPv6 address, inside its host's /48 (null: `"fd00:bb:1::1"`).
    pub local: *const c_char,
    /// The next hop's MAC, `"02:bb:00:00:00:02"` (required for `"xdp"`).
    pub next_hop_mac: *const c_char,
    /// The deployment's prefix (null: `"fd00:bb::/32"`).
    pub prefix: *const c_char,
    /// Carry pages as MTU-sized segments even where one frame would do.
    pub segments: bool,
    /// Retransmission timeout, µs (10 to 100000; default 1000).
    pub rto_us: u32,
    /// Retransmissions before `BB_TIMEOUT` (0 to 100; default 8).
    pub retries: u32,
}

/// A client: one transport and its requests in flight. Used by one thread at a time.
pub struct bb_client {
    client: Client<AnyTransport>,
    prefix: NetPrefix,
    /// Pipelined reads in flight: where each one's bytes go.
    reads: HashMap<u64, (*mut u8, usize)>,
}

/// A page: its 16-byte IPv6 address (network order), as [`bb_alloc`] returned it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct bb_page {
    /// The address.
    pub addr: [u8; 16],
}

/// A finished pipelined request ([`bb_poll`]).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bb_completion {
    /// What [`bb_submit_read`] or [`bb_submit_write`] returned for it.
    pub ticket: u64,
    /// The caller's tag given at submit.
    pub tag: u64,
    /// Its outcome; a read's bytes are in its buffer when `BB_OK`.
    pub status: bb_status,
    /// From first transmission to completion, ns.
    pub latency_ns: u64,
}

/// Called by [`bb_update`] with the range's current bytes, to change in place: return 0 to
/// commit them, anything else to release the lease without writing.
pub type bb_update_fn =
    Option<unsafe extern "C" fn(ctx: *mut c_void, bytes: *mut u8, len: usize) -> i32>;

impl std::fmt::Debug for bb_client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("bb_client")
            .field("prefix", &self.prefix)
            .field("reads", &self.reads.len())
            .finish_non_exhaustive()
    }
}

impl bb_client {
    fn page(&self, p: bb_page) -> Result<RemoteAddr, Failure> {
        page_addr(p, self.prefix)
    }
}

/// The page `p` names, if its address lies inside `prefix`.
pub(crate) fn page_addr(p: bb_page, prefix: NetPrefix) -> Result<RemoteAddr, Failure> {
    RemoteAddr::from_ipv6(Ipv6Addr::from(p.addr), prefix)
        .map_err(|e| Failure::invalid(format!("page {}: {e}", Ipv6Addr::from(p.addr))))
}

/// The C view of a page's address.
pub(crate) fn page_of(a: RemoteAddr) -> bb_page {
    bb_page {
        addr: a.to_ipv6().octets(),
    }
}

/// The client behind `c`.
///
/// # Safety
/// `c` is null or a live client from [`bb_open`], used by no other thread meanwhile.
unsafe fn client<'a>(c: *mut bb_client) -> Result<&'a mut bb_client, Failure> {
    // SAFETY: the caller promises null or a live, unshared client.
    unsafe { c.as_mut() }.ok_or_else(|| Failure::invalid("the client is null"))
}

/// A page range's length as the protocol's u16, checked against the page.
fn range(offset: u16, len: usize) -> Result<u16, Failure> {
    if len == 0 || usize::from(offset) + len > PAGE_SIZE {
        return Err(Failure::invalid(format!(
            "range {offset}+{len} is not inside a 4096-byte page"
        )));
    }
    Ok(len as u16)
}

/// Stores `v` at `out` if `out` is not null.
///
/// # Safety
/// `out` is null or valid for a write of a `T`.
unsafe fn put<T>(out: *mut T, v: T) {
    if !out.is_null() {
        // SAFETY: non-null, and the caller promises it is valid for a write.
        unsafe { out.write(v) };
    }
}

/// Fills `o` with the defaults: every string null, no segments, `rto_us` 1000, `retries` 8.
///
/// # Safety
/// `o` is null (nothing happens) or valid for a write of a `bb_options`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_options_init(o: *mut bb_options) {
    let d = bb_options {
        iface: std::ptr::null(),
        transport: std::ptr::null(),
        local: std::ptr::null(),
        next_hop_mac: std::ptr::null(),
        prefix: std::ptr::null(),
        segments: false,
        rto_us: 1000,
        retries: 8,
    };
    // SAFETY: the caller promises null or valid for a write.
    unsafe { put(o, d) };
}

/// Opens a client as `o` says and stores it in `*out` (give it back with [`bb_close`]).
/// `BB_INVALID_ARGUMENT` for a bad option, `BB_SETUP_FAILED` if the transport cannot be
/// opened (not root, no such interface, ...); `bb_last_error` says which.
///
/// # Safety
/// `o` points to a `bb_options` whose strings are null or NUL-terminated; `out` is valid for
/// a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_open(o: *const bb_options, out: *mut *mut bb_client) -> bb_status {
    guard(|| {
        // SAFETY: the caller promises null or a valid bb_options.
        let o = unsafe { o.as_ref() }.ok_or_else(|| Failure::invalid("the options are null"))?;
        if out.is_null() {
            return Err(Failure::invalid("out is null"));
        }
        // SAFETY: each string is null or NUL-terminated (the caller's promise).
        let iface = unsafe { opt_str(o.iface, "iface") }?
            .ok_or_else(|| Failure::invalid("iface is required"))?;
        // SAFETY: as above.
        let kind = match unsafe { opt_str(o.transport, "transport") }? {
            None | Some("xdp") => TransportKind::Xdp,
            Some("udp") => TransportKind::Udp,
            Some(t) => return Err(Failure::invalid(format!("transport {t:?}: xdp or udp"))),
        };
        // SAFETY: as above.
        let local: Ipv6Addr = unsafe { opt_str(o.local, "local") }?
            .unwrap_or("fd00:bb:1::1")
            .parse()
            .map_err(|e| Failure::invalid(format!("local: {e}")))?;
        // SAFETY: as above.
        let next_hop_mac = unsafe { opt_str(o.next_hop_mac, "next_hop_mac") }?
            .map(|m| {
                m.parse::<MacAddr>()
                    .map_err(|e| Failure::invalid(format!("next_hop_mac {m:?}: {e}")))
            })
            .transpose()?;
        // SAFETY: as above.
        let prefix: NetPrefix = unsafe { opt_str(o.prefix, "prefix") }?
            .unwrap_or("fd00:bb::/32")
            .parse()
            .map_err(|e| Failure::invalid(format!("prefix: {e}")))?;
        if !(10..=100_000).contains(&o.rto_us) || o.retries > 100 {
            return Err(Failure::invalid(
                "rto_us must be 10 to 100000 and retries at most 100",
            ));
        }
        if kind == TransportKind::Xdp && next_hop_mac.is_none() {
            return Err(Failure::invalid("next_hop_mac is required for xdp"));
        }
        let connect = Connect {
            kind,
            ifname: iface.to_owned(),
            local,
            next_hop_mac,
            prefix,
            segments: o.segments,
        };
        let (t, mut ec) = connect
            .open()
            .map_err(|e| Failure::setup(format!("opening {iface}: {e}")))?;
        ec.rto = Duration::from_micros(u64::from(o.rto_us));
        ec.retries = o.retries;
        let c = Box::new(bb_client {
            client: Client::new(ec, t),
            prefix,
            reads: HashMap::new(),
        });
        // SAFETY: checked non-null; the caller promises it is valid for a write.
        unsafe { out.write(Box::into_raw(c)) };
        Ok(())
    })
}

/// Closes a client (null: nothing). Requests in flight are dropped: their buffers are not
/// written after this returns.
///
/// # Safety
/// `c` is null or a client from [`bb_open`] not closed yet; it is invalid afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_close(c: *mut bb_client) {
    if !c.is_null() {
        // SAFETY: a client from bb_open (Box::into_raw), closed once (the caller's promise).
        drop(unsafe { Box::from_raw(c) });
    }
}

/// The client inside a `bb_client` given up by its handle (for regions).
///
/// # Safety
/// `c` is a client from [`bb_open`], not used afterwards.
pub(crate) unsafe fn take_client(c: *mut bb_client) -> (Client<AnyTransport>, NetPrefix) {
    // SAFETY: a client from bb_open (Box::into_raw), given up once (the caller's promise).
    let b = unsafe { Box::from_raw(c) };
    (b.client, b.prefix)
}

/// Wraps a Rust client in a handle (a region giving its client back).
pub(crate) fn wrap_client(client: Client<AnyTransport>, prefix: NetPrefix) -> *mut bb_client {
    Box::into_raw(Box::new(bb_client {
        client,
        prefix,
        reads: HashMap::new(),
    }))
}

/// Allocates a page on server `host` (zeroed) and stores its address in `*page`. `shared`:
/// other clients may use it too. The page stays until [`bb_free`] (or until this client has
/// been silent for the server's grace period, docs/protocol.md §5.17).
///
/// # Safety
/// `c` is a live client; `page` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_alloc(
    c: *mut bb_client,
    host: u16,
    shared: bool,
    page: *mut bb_page,
) -> bb_status {
    guard(|| {
        // SAFETY: the caller's promise.
        let c = unsafe { client(c) }?;
        if page.is_null() {
            return Err(Failure::invalid("page is null"));
        }
        let a = c.client.alloc(HostId(host), shared)?;
        // SAFETY: checked non-null; the caller promises it is valid for a write.
        unsafe { page.write(page_of(a)) };
        Ok(())
    })
}

/// Reads `len` bytes of `page` at `offset` into `buf` (offset + len ≤ 4096).
///
/// # Safety
/// `c` is a live client; `buf` is valid for writes of `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_read(
    c: *mut bb_client,
    page: bb_page,
    offset: u16,
    buf: *mut c_void,
    len: usize,
) -> bb_status {
    guard(|| {
        // SAFETY: the caller's promise.
        let c = unsafe { client(c) }?;
        let n = range(offset, len)?;
        if buf.is_null() {
            return Err(Failure::invalid("buf is null"));
        }
        let p = c.page(page)?;
        let data = c.client.read_range(p, offset, n)?;
        if data.len() != len {
            return Err(Failure {
                status: bb_status::BB_BAD_REPLY,
                message: format!("{} bytes came back for {len}", data.len()),
            });
        }
        // SAFETY: the caller promises `buf` is valid for `len` bytes; `data` is a separate
        // allocation of exactly `len` bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf.cast::<u8>(), len) };
        c.client.recycle(data);
        Ok(())
    })
}

/// Writes `len` bytes from `buf` into `page` at `offset` (offset + len ≤ 4096; more than one
/// frame's worth goes as several acknowledged segments).
///
/// # Safety
/// `c` is a live client; `buf` is valid for reads of `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_write(
    c: *mut bb_client,
    page: bb_page,
    offset: u16,
    buf: *const c_void,
    len: usize,
) -> bb_status {
    guard(|| {
        // SAFETY: the caller's promise.
        let c = unsafe { client(c) }?;
        range(offset, len)?;
        if buf.is_null() {
            return Err(Failure::invalid("buf is null"));
        }
        let p = c.page(page)?;
        // SAFETY: non-null, valid for `len` bytes (the caller's promise), not written meanwhile.
        let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) };
        c.client.write(p, offset, data)?;
        Ok(())
    })
}

/// Frees a page; later requests for it get `BB_STALE_HANDLE`.
///
/// # Safety
/// `c` is a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_free(c: *mut bb_client, page: bb_page) -> bb_status {
    guard(|| {
        // SAFETY: the caller's promise.
        let c = unsafe { client(c) }?;
        let p = c.page(page)?;
        c.client.free(p)?;
        Ok(())
    })
}

/// Compare-and-swap of the 8-byte word at `offset` (8-aligned; little-endian, as the page's
/// bytes on x86): if it equals `expected` it becomes `desired`. The old value goes to `*old`
/// (if not null): equal to `expected` when the swap happened.
///
/// # Safety
/// `c` is a live client; `old` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_cas(
    c: *mut bb_client,
    page: bb_page,
    offset: u16,
    expected: u64,
    desired: u64,
    old: *mut u64,
) -> bb_status {
    guard(|| {
        // SAFETY: the caller's promise.
        let c = unsafe { client(c) }?;
        let p = c.page(page)?;
        let v = c.client.cas(p, offset, expected, desired)?;
        // SAFETY: null or valid for a write (the caller's promise).
        unsafe { put(old, v) };
        Ok(())
    })
}

/// Adds `add` to the 8-byte word at `offset` (8-aligned, wrapping); the old value goes to
/// `*old` (if not null).
///
/// # Safety
/// `c` is a live client; `old` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_fetch_add(
    c: *mut bb_client,
    page: bb_page,
    offset: u16,
    add: u64,
    old: *mut u64,
) -> bb_status {
    guard(|| {
        // SAFETY: the caller's promise.
        let c = unsafe { client(c) }?;
        let p = c.page(page)?;
        let v = c.client.fetch_add(p, offset, add)?;
        // SAFETY: null or valid for a write (the caller's promise).
        unsafe { put(old, v) };
        Ok(())
    })
}

/// A transactional update of `len` bytes at `offset`: takes the page's update lease (other
/// clients' writes wait), calls `f(ctx, bytes, len)` with the current bytes, and commits what
/// `f` left there when it returns 0 (readers see the range before or after, never between),
/// or releases the lease unchanged when it returns anything else. `BB_OK` in both cases;
/// `BB_LEASE_HELD` if another client holds the lease.
///
/// # Safety
/// `c` is a live client; `f` is a function that does not unwind and uses `bytes` only during
/// the call; `ctx` is passed through untouched.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_update(
    c: *mut bb_client,
    page: bb_page,
    offset: u16,
    len: usize,
    f: bb_update_fn,
    ctx: *mut c_void,
) -> bb_status {
    guard(|| {
        // SAFETY: the caller's promise.
        let c = unsafe { client(c) }?;
        let n = range(offset, len)?;
        let f = f.ok_or_else(|| Failure::invalid("f is null"))?;
        let p = c.page(page)?;
        let (lease, mut bytes) = c.client.update_acquire(p, offset, n, 0)?;
        if bytes.len() != len {
            let _ = c.client.update_release(p, lease);
            return Err(Failure {
                status: bb_status::BB_BAD_REPLY,
                message: format!("{} bytes came back for {len}", bytes.len()),
            });
        }
        // SAFETY: `f` is a C function (the caller's promise) given a buffer of `len` bytes
        // that lives through the call.
        let verdict = unsafe { f(ctx, bytes.as_mut_ptr(), len) };
        if verdict == 0 {
            c.client.update_commit(p, lease, offset, &bytes)?;
        } else {
            c.client.update_release(p, lease)?;
        }
        Ok(())
    })
}

/// The host id a page lives on (its address's bytes 4 and 5).
#[unsafe(no_mangle)]
pub extern "C" fn bb_page_host(page: bb_page) -> u16 {
    u16::from_be_bytes([page.addr[4], page.addr[5]])
}

/// Writes the page's address as text (`"fd00:bb:2:1b0:56e4:42c2:e828:0"`, NUL-terminated)
/// into `buf` of `len` bytes (46 always suffice).
///
/// # Safety
/// `buf` is valid for writes of `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_page_format(page: bb_page, buf: *mut c_char, len: usize) -> bb_status {
    guard(|| {
        let s = Ipv6Addr::from(page.addr).to_string();
        if buf.is_null() || len < s.len() + 1 {
            return Err(Failure::invalid(format!(
                "the buffer needs {} bytes",
                s.len() + 1
            )));
        }
        let mut bytes = s.into_bytes();
        bytes.push(0);
        // SAFETY: `buf` holds at least `bytes.len()` bytes (checked, and the caller's promise).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), bytes.len()) };
        Ok(())
    })
}

/// The most page bytes one pipelined write ([`bb_submit_write`]) may carry on this client's
/// link (one frame); 0 for a null client.
///
/// # Safety
/// `c` is null or a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_max_request_data(c: *const bb_client) -> usize {
    // SAFETY: null or a live client (the caller's promise).
    unsafe { c.as_ref() }.map_or(0, |c| usize::from(c.client.max_request_data()))
}

/// Queues a READ of `len` bytes of `page` at `offset` into `buf` without waiting; its ticket
/// goes to `*ticket`, and [`bb_poll`] returns its completion. `buf` must stay valid and
/// untouched until then (or until [`bb_close`]).
///
/// # Safety
/// `c` is a live client; `buf` is valid for writes of `len` bytes until the completion is
/// returned or the client closed; `ticket` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_submit_read(
    c: *mut bb_client,
    page: bb_page,
    offset: u16,
    buf: *mut c_void,
    len: usize,
    tag: u64,
    ticket: *mut u64,
) -> bb_status {
    guard(|| {
        // SAFETY: the caller's promise.
        let c = unsafe { client(c) }?;
        let n = range(offset, len)?;
        if buf.is_null() || ticket.is_null() {
            return Err(Failure::invalid("buf or ticket is null"));
        }
        let p = c.page(page)?;
        let mut r = Request::new(Opcode::READ, p).range(offset, n);
        r.tag = tag;
        let id = c.client.submit(r);
        c.reads.insert(id, (buf.cast::<u8>(), len));
        // SAFETY: checked non-null; the caller promises it is valid for a write.
        unsafe { ticket.write(id) };
        Ok(())
    })
}

/// Queues a WRITE of `len` bytes (at most [`bb_max_request_data`]) from `buf` into `page` at
/// `offset` without waiting; the bytes are copied, so `buf` may be reused at once.
///
/// # Safety
/// `c` is a live client; `buf` is valid for reads of `len` bytes; `ticket` is valid for a
/// write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_submit_write(
    c: *mut bb_client,
    page: bb_page,
    offset: u16,
    buf: *const c_void,
    len: usize,
    tag: u64,
    ticket: *mut u64,
) -> bb_status {
    guard(|| {
        // SAFETY: the caller's promise.
        let c = unsafe { client(c) }?;
        let n = range(offset, len)?;
        if buf.is_null() || ticket.is_null() {
            return Err(Failure::invalid("buf or ticket is null"));
        }
        if n > c.client.max_request_data() {
            return Err(Failure::invalid(format!(
                "{len} bytes: one pipelined write carries at most {} here (bb_write segments)",
                c.client.max_request_data()
            )));
        }
        let p = c.page(page)?;
        // SAFETY: non-null, valid for `len` bytes (the caller's promise), copied at once.
        let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) }.to_vec();
        let mut r = Request::new(Opcode::WRITE, p)
            .range(offset, n)
            .payload(data);
        r.tag = tag;
        let id = c.client.submit(r);
        // SAFETY: checked non-null; the caller promises it is valid for a write.
        unsafe { ticket.write(id) };
        Ok(())
    })
}

/// Requests submitted and not yet returned by [`bb_poll`] (0 for a null client).
///
/// # Safety
/// `c` is null or a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_in_flight(c: *const bb_client) -> usize {
    // SAFETY: null or a live client (the caller's promise).
    unsafe { c.as_ref() }.map_or(0, |c| c.client.in_flight())
}

/// Sends, receives and retransmits until at least one pipelined request finished or
/// `timeout_us` passed (0: look once), and stores up to `max` completions in `out`, their
/// number in `*n`. A read's bytes are in its buffer when its status is `BB_OK`.
///
/// # Safety
/// `c` is a live client; `out` is valid for writes of `max` completions; `n` for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_poll(
    c: *mut bb_client,
    out: *mut bb_completion,
    max: usize,
    timeout_us: u32,
    n: *mut usize,
) -> bb_status {
    guard(|| {
        // SAFETY: the caller's promise.
        let c = unsafe { client(c) }?;
        if out.is_null() || n.is_null() || max == 0 {
            return Err(Failure::invalid("out or n is null, or max is 0"));
        }
        let deadline = Instant::now() + Duration::from_micros(u64::from(timeout_us));
        let mut got = 0;
        loop {
            while got < max {
                let Some(done) = c.client.poll() else { break };
                let status = match (done.result, c.reads.remove(&done.id)) {
                    (Ok(reply), Some((buf, len))) if reply.data.len() == len => {
                        // SAFETY: the buffer given at submit, valid for `len` bytes until this
                        // completion is returned (the caller's promise).
                        unsafe { std::ptr::copy_nonoverlapping(reply.data.as_ptr(), buf, len) };
                        c.client.recycle(reply.data);
                        bb_status::BB_OK
                    }
                    (Ok(_), Some(_)) => bb_status::BB_BAD_REPLY,
                    (Ok(_), None) => bb_status::BB_OK,
                    (Err(e), _) => bb_status::of(&e),
                };
                let completion = bb_completion {
                    ticket: done.id,
                    tag: done.tag,
                    status,
                    latency_ns: done.latency.as_nanos() as u64,
                };
                // SAFETY: `got < max`, and `out` holds `max` completions (the caller's promise).
                let slot = unsafe { out.add(got) };
                // SAFETY: as above: a valid slot for a write.
                unsafe { slot.write(completion) };
                got += 1;
            }
            if got > 0 || Instant::now() >= deadline || c.client.in_flight() == 0 {
                break;
            }
        }
        // SAFETY: checked non-null; the caller promises it is valid for a write.
        unsafe { n.write(got) };
        Ok(())
    })
}
