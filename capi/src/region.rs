//! `bb_region`: remote memory mapped into the process (a `RemoteRegion`, docs/paging.md):
//! ordinary memory whose pages live on servers and come in on first touch.

use std::ffi::c_void;

use bluebridge_client::region::OnClose;
use bluebridge_client::{AnyTransport, Client, RegionOptions, RemoteRegion};
use bluebridge_proto::{HostId, NetPrefix};

use crate::client::{page_addr, page_of, take_client, wrap_client};
use crate::{Failure, bb_client, bb_page, bb_status, guard};

/// How a region pages. Fill it with [`bb_region_options_init`] first.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bb_region_options {
    /// Pages resident at once; beyond that the least recently faulted are written back and
    /// dropped (0: no limit).
    pub resident_pages: usize,
    /// At [`bb_region_close`], write dirty pages back and keep the pages on their servers
    /// (detached, so they stay after this process; attach them again with
    /// [`bb_region_attach`]) instead of freeing them.
    pub keep_pages: bool,
    /// Pages a stream of faults prefetches ahead (0: none; default 64).
    pub prefetch: usize,
}

/// A mapped region and the client that pages it.
pub struct bb_region {
    region: RemoteRegion<AnyTransport>,
    prefix: NetPrefix,
}

impl std::fmt::Debug for bb_region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("bb_region")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// Fills `o` with the defaults: no resident limit, pages freed at close, prefetch 64.
///
/// # Safety
/// `o` is null (nothing happens) or valid for a write of a `bb_region_options`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_region_options_init(o: *mut bb_region_options) {
    if !o.is_null() {
        let d = bb_region_options {
            resident_pages: 0,
            keep_pages: false,
            prefetch: bluebridge_client::region::DEFAULT_PREFETCH,
        };
        // SAFETY: non-null, and the caller promises it is valid for a write.
        unsafe { o.write(d) };
    }
}

fn options(o: Option<&bb_region_options>) -> RegionOptions {
    let o = o.copied().unwrap_or(bb_region_options {
        resident_pages: 0,
        keep_pages: false,
        prefetch: bluebridge_client::region::DEFAULT_PREFETCH,
    });
    RegionOptions {
        resident_pages: o.resident_pages,
        on_close: if o.keep_pages {
            OnClose::Detach
        } else {
            OnClose::Free
        },
        prefetch: o.prefetch,
        ..RegionOptions::default()
    }
}

/// The part of [`bb_region_create`] and [`bb_region_attach`] they share: takes the client
/// out of `*client` (set to null whatever happens: the region owns it from now on), makes the
/// region with `make` (given the client, its prefix and the options) and stores it in `*out`.
///
/// # Safety
/// `client` is valid for reads and writes and `*client` a live client from `bb_open`; `o` is
/// null or valid; `out` is null or valid for a write.
unsafe fn make_region(
    client: *mut *mut bb_client,
    o: *const bb_region_options,
    out: *mut *mut bb_region,
    make: impl FnOnce(
        Client<AnyTransport>,
        NetPrefix,
        RegionOptions,
    ) -> Result<RemoteRegion<AnyTransport>, Failure>,
) -> Result<(), Failure> {
    if client.is_null() {
        return Err(Failure::invalid("client is null"));
    }
    // SAFETY: non-null and valid for a read and a write (the caller's promise).
    let c = unsafe { client.replace(std::ptr::null_mut()) };
    if c.is_null() {
        return Err(Failure::invalid("*client is null"));
    }
    // SAFETY: a live client from bb_open, taken out of the caller's hands above.
    let (c, prefix) = unsafe { take_client(c) };
    if out.is_null() {
        return Err(Failure::invalid("out is null"));
    }
    // SAFETY: null or a valid options struct (the caller's promise).
    let opts = options(unsafe { o.as_ref() });
    let region = make(c, prefix, opts)?;
    // SAFETY: checked non-null; the caller promises it is valid for a write.
    unsafe { out.write(Box::into_raw(Box::new(bb_region { region, prefix }))) };
    Ok(())
}

/// Allocates `pages` pages round-robin on the `n_hosts` servers of `hosts` and maps them
/// (they read as zeros), and stores the region in `*out`. Takes the client: `*client` is set
/// to null whatever happens (a region is paged by its own client; [`bb_region_close`] can
/// give it back). `o` null: the defaults. Nothing stays allocated when this fails.
///
/// # Safety
/// `client` points to a live client from `bb_open`; `hosts` to `n_hosts` host ids; `o` is
/// null or valid; `out` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_region_create(
    client: *mut *mut bb_client,
    hosts: *const u16,
    n_hosts: usize,
    pages: usize,
    o: *const bb_region_options,
    out: *mut *mut bb_region,
) -> bb_status {
    guard(|| {
        let make = |c: Client<AnyTransport>, _: NetPrefix, opts: RegionOptions| {
            if hosts.is_null() || n_hosts == 0 || pages == 0 {
                return Err(Failure::invalid(
                    "hosts must not be null, n_hosts and pages not 0",
                ));
            }
            // SAFETY: `hosts` holds `n_hosts` ids (the caller's promise).
            let ids: Vec<HostId> = unsafe { std::slice::from_raw_parts(hosts, n_hosts) }
                .iter()
                .map(|&h| HostId(h))
                .collect();
            RemoteRegion::new(c, pages, &ids, opts)
                .map_err(|e| Failure::setup(format!("creating the region: {e}")))
        };
        // SAFETY: the caller's promise.
        unsafe { make_region(client, o, out, make) }
    })
}

/// Maps the `n` existing pages of `pages` (e.g. a region closed with `keep_pages`) in that
/// order, and stores the region in `*out`. Takes the client like [`bb_region_create`].
///
/// # Safety
/// `client` points to a live client from `bb_open`; `pages` to `n` pages; `o` is null or
/// valid; `out` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_region_attach(
    client: *mut *mut bb_client,
    pages: *const bb_page,
    n: usize,
    o: *const bb_region_options,
    out: *mut *mut bb_region,
) -> bb_status {
    guard(|| {
        let make = |c: Client<AnyTransport>, prefix: NetPrefix, opts: RegionOptions| {
            if pages.is_null() || n == 0 {
                return Err(Failure::invalid("pages must not be null, n not 0"));
            }
            // SAFETY: `pages` holds `n` pages (the caller's promise).
            let addrs = unsafe { std::slice::from_raw_parts(pages, n) }
                .iter()
                .map(|&p| page_addr(p, prefix))
                .collect::<Result<Vec<_>, _>>()?;
            RemoteRegion::attach(c, addrs, opts)
                .map_err(|e| Failure::setup(format!("attaching the region: {e}")))
        };
        // SAFETY: the caller's promise.
        unsafe { make_region(client, o, out, make) }
    })
}

/// The region's first byte (page-aligned; null for a null region). Valid until
/// [`bb_region_close`]; never `munmap`, `mremap` or `madvise` it yourself.
///
/// # Safety
/// `r` is null or a live region.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_region_ptr(r: *const bb_region) -> *mut c_void {
    // SAFETY: null or a live region (the caller's promise).
    unsafe { r.as_ref() }.map_or(std::ptr::null_mut(), |r| r.region.as_ptr().cast())
}

/// The region's length in bytes (pages × 4096; 0 for a null region).
///
/// # Safety
/// `r` is null or a live region.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_region_len(r: *const bb_region) -> usize {
    // SAFETY: null or a live region (the caller's promise).
    unsafe { r.as_ref() }.map_or(0, |r| r.region.len())
}

/// Writes every dirty page back now (they stay resident); the pages written go to `*written`
/// (if not null).
///
/// # Safety
/// `r` is a live region; `written` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_region_flush(r: *mut bb_region, written: *mut u64) -> bb_status {
    guard(|| {
        // SAFETY: null or a live region (the caller's promise).
        let r = unsafe { r.as_ref() }.ok_or_else(|| Failure::invalid("the region is null"))?;
        let n = r
            .region
            .flush()
            .map_err(|e| Failure::setup(format!("flushing: {e}")))?;
        if !written.is_null() {
            // SAFETY: non-null, and the caller promises it is valid for a write.
            unsafe { written.write(n) };
        }
        Ok(())
    })
}

/// Unmaps the region and frees its pages, or with `keep_pages` writes dirty pages back and
/// keeps them. The region is gone afterwards, also when this fails. If `pages` is not null,
/// up to `max` of the region's pages (in order) are stored there and their total number in
/// `*n` (to attach them later). If `client` is not null the region's client is given back in
/// `*client` (close it with `bb_close`), otherwise it is closed.
///
/// # Safety
/// `r` is a live region, not used afterwards; `pages` is null or valid for writes of `max`
/// pages; `n` null or valid for a write; `client` null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bb_region_close(
    r: *mut bb_region,
    pages: *mut bb_page,
    max: usize,
    n: *mut usize,
    client: *mut *mut bb_client,
) -> bb_status {
    guard(|| {
        if r.is_null() {
            return Err(Failure::invalid("the region is null"));
        }
        // SAFETY: a live region from bb_region_create/attach, closed once (the caller's
        // promise).
        let r = unsafe { Box::from_raw(r) };
        let prefix = r.prefix;
        let backing = r
            .region
            .close()
            .map_err(|e| Failure::setup(format!("closing the region: {e}")))?;
        let list = backing.pages();
        if !pages.is_null() {
            for (i, &p) in list.iter().take(max).enumerate() {
                let page = page_of(p);
                // SAFETY: `i < max`, and `pages` holds `max` pages (the caller's promise).
                let slot = unsafe { pages.add(i) };
                // SAFETY: as above: a valid slot for a write.
                unsafe { slot.write(page) };
            }
        }
        if !n.is_null() {
            // SAFETY: non-null, and the caller promises it is valid for a write.
            unsafe { n.write(list.len()) };
        }
        if !client.is_null() {
            let c = wrap_client(backing.into_client(), prefix);
            // SAFETY: non-null, and the caller promises it is valid for a write.
            unsafe { client.write(c) };
        }
        Ok(())
    })
}
