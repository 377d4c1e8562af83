//! Pages on BlueBridge servers: [`RemoteBacking`] and the [`RemoteRegion`] built on it, plus a
//! [`Directory`] for reproducing the 2017 prototype's directory-service round trip.

use std::collections::HashMap;
use std::time::Duration;

use bluebridge_proto::{HostId, PAGE_SIZE, RemoteAddr};

use super::shared::{Coherence, Copies, CopyGrant};
use super::{
    AlignedPage, Backing, BackingError, Direction, OnClose, PagedRegion, Pipeline, RegionError,
    RegionOptions, Transfer,
};
use crate::copies::Keep;
use crate::{Client, ClientError, Request, Transport};
use bluebridge_proto::Opcode;
use bluebridge_proto::segment::Segments;

/// Tags of the region's own pipelined requests: the marker bit, the direction, the page.
const TAG_MINE: u64 = 1 << 63;
const TAG_STORE: u64 = 1 << 62;
const TAG_PAGE: u64 = TAG_STORE - 1;

/// Bytes of one directory entry: the page's address.
const ENTRY: usize = 16;
/// Entries per directory page.
const PER_PAGE: usize = PAGE_SIZE / ENTRY;

/// A directory service: a table on a server mapping region page index → page address, read
/// with one small READ before every fetch. BlueBridge needs none (the address is the route);
/// this exists to measure what the prototype's "remote with directory service" paid.
#[derive(Debug, Clone)]
pub struct Directory {
    table: Vec<RemoteAddr>,
}

impl Directory {
    /// Writes the entries for `pages` into freshly allocated pages on `host`.
    pub fn publish<T: Transport>(
        client: &mut Client<T>,
        host: HostId,
        pages: &[RemoteAddr],
    ) -> Result<Directory, ClientError> {
        let mut table = Vec::new();
        for chunk in pages.chunks(PER_PAGE) {
            let mut data = Vec::with_capacity(PAGE_SIZE);
            for p in chunk {
                data.extend_from_slice(&p.to_ipv6().octets());
            }
            let written = client.alloc(host, false).and_then(|d| {
                table.push(d);
                client.write(d, 0, &data)
            });
            if let Err(e) = written {
                let _ = client.free_all(&table); // nothing half-published stays behind
                return Err(e);
            }
        }
        Ok(Directory { table })
    }

    /// The pages the directory itself takes.
    pub fn pages(&self) -> &[RemoteAddr] {
        &self.table
    }

    /// Looks page `index` up (one READ of its 16-byte entry).
    fn lookup<T: Transport>(
        &self,
        client: &mut Client<T>,
        index: usize,
    ) -> Result<RemoteAddr, BackingError> {
        let page = self.table[index / PER_PAGE];
        let at = ((index % PER_PAGE) * ENTRY) as u16;
        let e = client.read_range(page, at, ENTRY as u16)?;
        let octets: [u8; ENTRY] = e
            .as_slice()
            .try_into()
            .map_err(|_| "short directory entry")?;
        let prefix = client.prefix();
        Ok(RemoteAddr::from_ipv6(octets.into(), prefix)
            .map_err(|e| format!("directory entry {index}: {e}"))?)
    }
}

/// Pages on BlueBridge servers, reached through a [`Client`].
#[derive(Debug)]
pub struct RemoteBacking<T: Transport> {
    client: Client<T>,
    pages: Vec<RemoteAddr>,
    directory: Option<Directory>,
    /// The page [`Backing::locate`] found last, and its address.
    located: Option<(usize, RemoteAddr)>,
    /// For a shared region: page → index, and each page's lease group.
    copies: Option<CopyIndex>,
    /// Pipelined write-backs: segments left and the first error, by page.
    stores: HashMap<usize, (usize, Option<ClientError>)>,
}

/// A page's identity in notices: its address without opcode and flags.
fn page_key(a: RemoteAddr) -> [u8; 14] {
    a.to_ipv6().octets()[..14].try_into().expect("14 bytes")
}

/// What a shared region's backing looks pages up by: page → index.
#[derive(Debug)]
struct CopyIndex {
    by_page: HashMap<[u8; 14], usize>,
}

impl CopyIndex {
    fn new(pages: &[RemoteAddr]) -> Self {
        CopyIndex {
            by_page: pages
                .iter()
                .enumerate()
                .map(|(i, &p)| (page_key(p), i))
                .collect(),
        }
    }
}

impl<T: Transport> RemoteBacking<T> {
    /// Pages `pages` (region page i is `pages[i]`), through `client`.
    pub fn new(client: Client<T>, pages: Vec<RemoteAddr>) -> Self {
        RemoteBacking {
            client,
            pages,
            directory: None,
            located: None,
            copies: None,
            stores: HashMap::new(),
        }
    }

    /// Looks every page up in `directory` before fetching it (the prototype's way).
    pub fn with_directory(mut self, directory: Directory) -> Self {
        self.directory = Some(directory);
        self
    }

    /// The page addresses (to attach another region to them later).
    pub fn pages(&self) -> &[RemoteAddr] {
        &self.pages
    }

    /// The client (for other requests once the region is closed).
    pub fn into_client(self) -> Client<T> {
        self.client
    }

    /// The client, borrowed.
    pub fn client_mut(&mut self) -> &mut Client<T> {
        &mut self.client
    }
}

impl<T: Transport + Send + 'static> Backing for RemoteBacking<T> {
    fn idle(&mut self) {
        self.client.keep_alive();
    }

    fn copies(&mut self) -> Option<&mut dyn Copies> {
        if self.copies.is_none() {
            self.copies = Some(CopyIndex::new(&self.pages));
        }
        Some(self)
    }

    fn copies_ref(&self) -> Option<&dyn Copies> {
        self.copies.as_ref().map(|_| self as &dyn Copies)
    }

    fn locate(&mut self, index: usize) -> Result<(), BackingError> {
        self.located = Some((
            index,
            match &self.directory {
                Some(d) => d.lookup(&mut self.client, index)?,
                None => self.pages[index],
            },
        ));
        Ok(())
    }

    fn pipeline(&mut self) -> Option<&mut dyn Pipeline> {
        Some(self)
    }

    fn pipeline_ref(&self) -> Option<&dyn Pipeline> {
        Some(self)
    }

    fn fetch(&mut self, index: usize, page: &mut AlignedPage) -> Result<(), BackingError> {
        let addr = self.address(index);
        let data = self.client.read(addr)?;
        if data.len() != PAGE_SIZE {
            return Err(format!("READ returned {} bytes", data.len()).into());
        }
        page.0.copy_from_slice(&data);
        Ok(())
    }

    fn store(&mut self, index: usize, page: &AlignedPage) -> Result<(), BackingError> {
        Ok(self.client.write(self.pages[index], 0, &page.0)?)
    }

    fn close(&mut self, free: bool) -> Result<(), BackingError> {
        if !free {
            // Kept for a later attach (detached on the servers when the region was made).
            return Ok(());
        }
        let dir = self.directory.take().map(|d| d.table).unwrap_or_default();
        for chunk in self.pages.chunks(128).chain(dir.chunks(128)) {
            for r in self.client.free_bulk(chunk)? {
                r?;
            }
        }
        Ok(())
    }
}

impl<T: Transport> RemoteBacking<T> {
    /// Page `index`'s address: the one located for it, or its own.
    fn address(&mut self, index: usize) -> RemoteAddr {
        match self.located.take() {
            Some((i, a)) if i == index => a,
            _ => self.pages[index],
        }
    }
}

impl<T: Transport + Send + 'static> Pipeline for RemoteBacking<T> {
    fn start_fetch(&mut self, page: usize) {
        let addr = self.address(page);
        self.client.submit(
            Request::new(Opcode::READ, addr)
                .range(0, PAGE_SIZE as u16)
                .tag(TAG_MINE | page as u64)
                .direct(),
        );
    }

    fn start_store(&mut self, page: usize, data: Vec<u8>) {
        let addr = self.pages[page];
        let tag = TAG_MINE | TAG_STORE | page as u64;
        let seg = self.client.max_request_data();
        if data.len() <= usize::from(seg) {
            self.stores.insert(page, (1, None));
            let len = data.len() as u16;
            self.client.submit(
                Request::new(Opcode::WRITE, addr)
                    .range(0, len)
                    .payload(data)
                    .tag(tag),
            );
            return;
        }
        let segments: Vec<(u16, u16)> = Segments::new(0, data.len() as u16, seg).collect();
        self.stores.insert(page, (segments.len(), None));
        for (o, l) in segments {
            let (o, l) = (usize::from(o), usize::from(l));
            let part = data[o..o + l].to_vec();
            self.client.submit(
                Request::new(Opcode::WRITE, addr)
                    .range(o as u16, l as u16)
                    .payload(part)
                    .tag(tag),
            );
        }
    }

    fn progress(&mut self) {
        self.client.progress();
    }

    fn finished(&mut self) -> Option<Transfer> {
        loop {
            let c = self.client.poll()?;
            if c.tag & TAG_MINE == 0 {
                continue; // not a transfer of the region's (nothing else is pipelined)
            }
            let page = (c.tag & TAG_PAGE) as usize;
            if c.tag & TAG_STORE == 0 {
                return Some(Transfer {
                    page,
                    direction: Direction::Fetch,
                    result: c.result.map(|r| r.data).map_err(Into::into),
                });
            }
            let Some((left, first)) = self.stores.get_mut(&page) else {
                continue;
            };
            *left -= 1;
            if let Err(e) = c.result
                && first.is_none()
            {
                *first = Some(e);
            }
            if *left == 0 {
                let (_, first) = self.stores.remove(&page).expect("present");
                return Some(Transfer {
                    page,
                    direction: Direction::Store,
                    result: match first {
                        Some(e) => Err(e.into()),
                        None => Ok(Vec::new()),
                    },
                });
            }
        }
    }

    fn poll_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        self.client.transport().poll_fds()
    }

    fn next_deadline(&self) -> Option<std::time::Instant> {
        self.client.next_deadline()
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        self.client.recycle(buf);
    }

    fn set_direct(&mut self, mut sink: super::DirectSink) -> bool {
        self.client.set_page_sink(Some(Box::new(move |tag, data| {
            tag & (TAG_MINE | TAG_STORE) == TAG_MINE && sink((tag & TAG_PAGE) as usize, data)
        })));
        true
    }
}

impl<T: Transport + Send + 'static> Copies for RemoteBacking<T> {
    fn get(
        &mut self,
        index: usize,
        exclusive: bool,
        held: u64,
        page: &mut AlignedPage,
    ) -> Result<Option<CopyGrant>, ClientError> {
        let addr = self.pages[index];
        let r = if exclusive {
            self.client.get_exclusive(addr, held)
        } else {
            self.client.get_shared(addr)
        };
        let g = match r {
            Ok(g) => g,
            Err(ClientError::Recalling) => return Ok(None),
            Err(e) => return Err(e),
        };
        let data = match g.data {
            Some(d) => {
                page.0.copy_from_slice(&d);
                self.client.recycle(d);
                true
            }
            None => false,
        };
        Ok(Some(CopyGrant {
            generation: g.generation,
            lease: g.lease,
            asked: g.asked,
            data,
            home: g.home,
        }))
    }

    fn put(
        &mut self,
        index: usize,
        generation: u64,
        keep: Keep,
        data: Option<&AlignedPage>,
    ) -> Result<u64, ClientError> {
        self.client
            .put_copy(self.pages[index], generation, keep, data.map(|d| &d.0))
    }

    fn renew(&mut self, index: usize) -> Result<(Duration, u32), ClientError> {
        self.client.renew_copies(self.pages[index])
    }

    fn pump(&mut self) {
        self.client.progress();
    }

    fn take_revoke(&mut self) -> Option<(usize, u64, Keep)> {
        let index = self.copies.as_ref()?;
        while let Some(r) = self.client.take_revoke() {
            // A notice about a page of another region of this client is not this one's.
            if let Some(&i) = index.by_page.get(&page_key(r.page)) {
                return Some((i, r.generation, Keep::from_notice(&r)));
            }
        }
        None
    }

    fn poll_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        self.client.transport().poll_fds()
    }

    fn readies(&self) -> u64 {
        self.client.stats().ready
    }
}

/// A region of remote pages.
pub type RemoteRegion<T> = PagedRegion<RemoteBacking<T>>;

impl<T: Transport + Send + 'static> PagedRegion<RemoteBacking<T>> {
    /// Allocates `pages` remote pages round-robin across `hosts` and maps them (fresh pages
    /// read as zeros). With [`OnClose::Detach`] the pages are detached on their servers
    /// (docs/protocol.md §5.17), so they stay when this client stops, until someone frees
    /// them; otherwise they go when the client has been silent for a server's grace period.
    pub fn new(
        mut client: Client<T>,
        pages: usize,
        hosts: &[HostId],
        options: RegionOptions,
    ) -> Result<Self, RegionError> {
        if hosts.is_empty() || pages == 0 {
            return Err(RegionError::Setup(
                "a region needs at least one page and one host".into(),
            ));
        }
        let mut addrs = Vec::with_capacity(pages);
        let per_host = pages.div_ceil(hosts.len());
        for (i, &h) in hosts.iter().enumerate() {
            let want = per_host.min(pages - (i * per_host).min(pages));
            let mut got = 0;
            while got < want {
                let n = (want - got).min(128) as u16;
                // A shared region's pages are usable by other clients (§5.12).
                let shared = options.coherence == Coherence::Shared;
                let a = match client.alloc_bulk(h, n, shared) {
                    Ok(a) => a,
                    Err(e) => {
                        let _ = client.free_all(&addrs); // nothing half-made stays behind
                        return Err(RegionError::Setup(format!("allocating on host {h}: {e}")));
                    }
                };
                got += a.len();
                addrs.extend(a);
            }
        }
        // Interleave the hosts page by page.
        let mut ordered = Vec::with_capacity(pages);
        for k in 0..per_host {
            for h in 0..hosts.len() {
                if let Some(&a) = addrs.get(h * per_host + k) {
                    ordered.push(a);
                }
            }
        }
        ordered.truncate(pages);
        if options.on_close == OnClose::Detach {
            // Pages kept past this process: the servers must keep them when this client falls
            // silent (docs/protocol.md §5.17).
            if let Err(e) = client.detach_all(&ordered) {
                let _ = client.free_all(&ordered);
                return Err(RegionError::Setup(format!("detaching the pages: {e}")));
            }
        }
        Self::with_backing(RemoteBacking::new(client, ordered), pages, options)
    }

    /// Maps existing remote pages (e.g. a detached region's, from [`RemoteBacking::pages`]);
    /// the client keeps their servers hearing from it while the region lives.
    pub fn attach(
        mut client: Client<T>,
        pages: Vec<RemoteAddr>,
        options: RegionOptions,
    ) -> Result<Self, RegionError> {
        let n = pages.len();
        for p in &pages {
            client.hold(p.host_id()); // their servers keep hearing from this client (§5.17)
        }
        Self::with_backing(RemoteBacking::new(client, pages), n, options)
    }
}
