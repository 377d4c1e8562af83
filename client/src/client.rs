//! The public API: blocking calls for every operation, and a pipelined interface (submit many,
//! collect completions) over any [`Transport`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bluebridge_proto::message::{
    StatRecord, WriteEntry, bulk_status, put_handles, put_write_entry,
};
use bluebridge_proto::segment::Segments;
use bluebridge_proto::{
    HeaderFlags, HostId, MAX_BULK, OpFlags, Opcode, PAGE_SIZE, PageHandle, RemoteAddr,
};

use crate::engine::{Completion, Engine, EngineConfig, EngineStats, Reply, Request};
use crate::error::{ClientError, check};
use crate::transport::Transport;

/// A granted UPDATE lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Lease id, presented at commit or release.
    pub id: u64,
    /// Milliseconds it was granted for.
    pub ms: u64,
}

/// A BlueBridge client.
#[derive(Debug)]
pub struct Client<T: Transport> {
    engine: Engine,
    transport: T,
    stash: VecDeque<Completion>,
    yield_when_idle: bool,
}

/// A page's address with opcode and flags cleared: what the API hands out for a page.
fn page_of(a: RemoteAddr) -> RemoteAddr {
    a.with_op(Opcode(0), OpFlags::NONE)
}

fn handles_in(payload: &[u8]) -> impl Iterator<Item = PageHandle> + '_ {
    payload
        .chunks_exact(8)
        .map(|c| PageHandle::from_bits(u64::from_be_bytes(c.try_into().expect("8 bytes"))))
}

impl<T: Transport> Client<T> {
    /// A client speaking `cfg` over `transport`.
    pub fn new(cfg: EngineConfig, transport: T) -> Self {
        Client {
            engine: Engine::new(cfg),
            transport,
            stash: VecDeque::new(),
            yield_when_idle: false,
        }
    }

    /// Gives the CPU away (`sched_yield`) between polls while waiting in the blocking calls,
    /// instead of spinning. For many clients sharing few CPUs (a rack on one machine); costs
    /// latency when a client has its CPU to itself.
    pub fn set_yield_when_idle(&mut self, on: bool) {
        self.yield_when_idle = on;
    }

    /// Caps the wait before a retransmission, backoff included (see
    /// [`EngineConfig::max_rto`](crate::EngineConfig::max_rto)).
    pub fn set_max_rto(&mut self, max: Option<Duration>) {
        self.engine.set_max_rto(max);
    }

    /// Turns INLINE READs on or off (see
    /// [`EngineConfig::inline_reads`](crate::EngineConfig::inline_reads)).
    pub fn set_inline_reads(&mut self, on: bool) {
        self.engine.set_inline_reads(on);
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The transport, mutably (raw frames, counters).
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    pub(crate) fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Engine counters (sent, retransmitted, timed out, ...) and the transport's drops.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            tx_dropped: self.transport.tx_dropped(),
            ..self.engine.stats()
        }
    }

    pub(crate) fn host_addr(&self, host: HostId, op: Opcode) -> RemoteAddr {
        RemoteAddr::host_op(self.engine.config().prefix, host, op)
    }

    // ---- pipelined API ----

    /// Queues a request without waiting; its completion comes from [`Client::poll`].
    pub fn submit(&mut self, req: Request) -> u64 {
        self.engine.submit(req, Instant::now())
    }

    /// Requests submitted and not completed.
    pub fn in_flight(&self) -> usize {
        self.engine.in_flight()
    }

    /// Sends, receives and retransmits once (and pings each host this client holds pages on
    /// that it has sent nothing for a second, [`Engine::keep_alive`]).
    pub fn progress(&mut self) {
        self.engine.keep_alive(Instant::now());
        self.transport.transmit(&mut self.engine, Instant::now());
        // A fresh clock: sending can take microseconds (on veth the kick runs the peer's
        // receive path), and a reply that arrived meanwhile must not look instantaneous.
        let now = Instant::now();
        self.transport.receive(&mut self.engine, now);
        if self.engine.next_deadline().is_some_and(|d| d <= now) {
            self.engine.handle_timeouts(now);
        }
    }

    /// Sets where [`Request::direct`](crate::Request::direct) READ replies go
    /// ([`Engine::set_page_sink`]).
    pub fn set_page_sink(&mut self, sink: Option<crate::engine::PageSink>) {
        self.engine.set_page_sink(sink);
    }

    /// When the next retransmission (or timeout) of a request in flight is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.engine.next_deadline()
    }

    /// The next completion, making progress first if none is ready.
    pub fn poll(&mut self) -> Option<Completion> {
        if let Some(c) = self.stash.pop_front() {
            return Some(c);
        }
        if let Some(c) = self.engine.poll_completion() {
            return Some(c);
        }
        self.progress();
        self.engine.poll_completion()
    }

    /// Busy-polls until request `id` completes; other completions are kept for `poll`.
    pub fn wait(&mut self, id: u64) -> Result<Reply, ClientError> {
        loop {
            while let Some(c) = self.engine.poll_completion() {
                if c.id == id {
                    return c.result;
                }
                self.stash.push_back(c);
            }
            self.progress();
            if self.yield_when_idle {
                std::thread::yield_now();
            }
        }
    }

    /// Waits for every id; results in the order given.
    pub fn wait_all(&mut self, ids: &[u64]) -> Vec<Result<Reply, ClientError>> {
        let mut out: Vec<Option<Result<Reply, ClientError>>> = vec![None; ids.len()];
        let mut left = ids.len();
        while left > 0 {
            while let Some(c) = self.engine.poll_completion() {
                match ids.iter().position(|&i| i == c.id) {
                    Some(k) if out[k].is_none() => {
                        out[k] = Some(c.result);
                        left -= 1;
                    }
                    _ => self.stash.push_back(c),
                }
            }
            if left > 0 {
                self.progress();
                if self.yield_when_idle {
                    std::thread::yield_now();
                }
            }
        }
        out.into_iter().map(|r| r.expect("all collected")).collect()
    }

    pub(crate) fn call(&mut self, req: Request) -> Result<Reply, ClientError> {
        let id = self.submit(req);
        self.wait(id)
    }

    /// Whether the controller reported `page` freed: requests for it fail with
    /// [`ClientError::Invalidated`] at once. Notices arrive with the client's other traffic
    /// (any blocking call or [`Client::progress`] takes them in).
    pub fn is_invalidated(&self, page: RemoteAddr) -> bool {
        self.engine.is_invalidated(page)
    }

    /// The deployment's prefix.
    pub fn prefix(&self) -> bluebridge_proto::NetPrefix {
        self.engine.config().prefix
    }

    /// The most page bytes one request frame carries (a larger write is several requests).
    pub fn max_request_data(&self) -> u16 {
        self.engine.config().max_request_data
    }

    fn seg(&self) -> u16 {
        self.max_request_data()
    }

    // ---- blocking API ----

    /// PING a host; returns the round-trip time.
    pub fn ping(&mut self, host: HostId) -> Result<Duration, ClientError> {
        let t = Instant::now();
        self.call(Request::new(
            Opcode::PING,
            self.host_addr(host, Opcode::PING),
        ))?;
        Ok(t.elapsed())
    }

    /// A host's STAT record.
    pub fn stat(&mut self, host: HostId) -> Result<StatRecord, ClientError> {
        let r = self.call(Request::new(
            Opcode::STAT,
            self.host_addr(host, Opcode::STAT),
        ))?;
        StatRecord::parse(&r.data).ok_or(ClientError::BadReply("short STAT record"))
    }

    fn alloc_req(&self, host: HostId, op: Opcode, shared: bool) -> Request {
        let mut r = Request::new(op, self.host_addr(host, op));
        if shared {
            r.flags = HeaderFlags::SHARED;
        }
        r
    }

    /// Allocates a zeroed page on `host` (or anywhere, for [`HostId::ANY`]); returns its
    /// address. `shared`: other clients may use it too.
    pub fn alloc(&mut self, host: HostId, shared: bool) -> Result<RemoteAddr, ClientError> {
        let r = self.call(self.alloc_req(host, Opcode::ALLOC, shared))?;
        Ok(page_of(r.src))
    }

    /// Allocates `n` pages on `host` in one round trip (n ≤ 128).
    pub fn alloc_bulk(
        &mut self,
        host: HostId,
        n: u16,
        shared: bool,
    ) -> Result<Vec<RemoteAddr>, ClientError> {
        let mut req = self.alloc_req(host, Opcode::ALLOC_BULK, shared);
        req.count = n;
        let r = self.call(req)?;
        let base = page_of(r.src);
        let pages: Vec<_> = handles_in(&r.data).map(|h| base.with_handle(h)).collect();
        if pages.len() != usize::from(n) {
            return Err(ClientError::BadReply(
                "ALLOC_BULK returned another number of pages",
            ));
        }
        Ok(pages)
    }

    /// Allocates a page and writes `data` at `offset`, in one round trip when the data fits one
    /// frame (otherwise the rest follows as WRITEs).
    pub fn alloc_write(
        &mut self,
        host: HostId,
        offset: u16,
        data: &[u8],
        shared: bool,
    ) -> Result<RemoteAddr, ClientError> {
        let len = range_len(offset, data)?;
        let first = len.min(self.seg());
        let req = self
            .alloc_req(host, Opcode::ALLOC_WRITE, shared)
            .range(offset, first)
            .payload(data[..usize::from(first)].to_vec());
        let page = page_of(self.call(req)?.src);
        if first < len {
            self.write(page, offset + first, &data[usize::from(first)..])?;
        }
        Ok(page)
    }

    /// Reads the whole page.
    pub fn read(&mut self, page: RemoteAddr) -> Result<Vec<u8>, ClientError> {
        self.read_range(page, 0, PAGE_SIZE as u16)
    }

    /// Reads `length` bytes at `offset`.
    pub fn read_range(
        &mut self,
        page: RemoteAddr,
        offset: u16,
        length: u16,
    ) -> Result<Vec<u8>, ClientError> {
        Ok(self
            .call(Request::new(Opcode::READ, page).range(offset, length))?
            .data)
    }

    /// Reads `buf.len()` bytes of `page` from `offset` into `buf` (no allocation once the
    /// engine's buffer pool is warm).
    pub fn read_into(
        &mut self,
        page: RemoteAddr,
        offset: u16,
        buf: &mut [u8],
    ) -> Result<(), ClientError> {
        let len = u16::try_from(buf.len()).map_err(|_| ClientError::Invalid("more than a page"))?;
        let data = self
            .call(Request::new(Opcode::READ, page).range(offset, len))?
            .data;
        buf.copy_from_slice(&data);
        self.engine.recycle(data);
        Ok(())
    }

    /// Hands a reply's data buffer back for reuse by later reads (see [`Engine::recycle`]).
    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.engine.recycle(buf);
    }

    fn write_op(
        &mut self,
        op: Opcode,
        page: RemoteAddr,
        offset: u16,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let len = range_len(offset, data)?;
        let ids: Vec<u64> = Segments::new(offset, len, self.seg())
            .map(|(o, l)| {
                let at = usize::from(o - offset);
                let d = data[at..at + usize::from(l)].to_vec();
                self.submit(Request::new(op, page).range(o, l).payload(d))
            })
            .collect();
        for r in self.wait_all(&ids) {
            r?;
        }
        Ok(())
    }

    /// Writes `data` at `offset`, acknowledged (one WRITE per segment when it does not fit one
    /// frame; each segment is acknowledged).
    pub fn write(&mut self, page: RemoteAddr, offset: u16, data: &[u8]) -> Result<(), ClientError> {
        self.write_op(Opcode::WRITE, page, offset, data)
    }

    /// Writes without waiting for (or getting) an acknowledgement.
    pub fn write_blind(
        &mut self,
        page: RemoteAddr,
        offset: u16,
        data: &[u8],
    ) -> Result<(), ClientError> {
        self.write_op(Opcode::WRITE_BLIND, page, offset, data)
    }

    /// Acquires the page's lease for `ms` (0: the server's default) and reads `length` bytes at
    /// `offset` under it.
    pub fn update_acquire(
        &mut self,
        page: RemoteAddr,
        offset: u16,
        length: u16,
        ms: u64,
    ) -> Result<(Lease, Vec<u8>), ClientError> {
        let mut req = Request::new(Opcode::UPDATE_ACQUIRE, page).range(offset, length);
        req.operand0 = ms;
        let r = self.call(req)?;
        Ok((
            Lease {
                id: r.header.lease,
                ms: r.header.operand0,
            },
            r.data,
        ))
    }

    /// Writes `data` at `offset` under the lease and releases it. Larger than one frame: every
    /// segment but the last is committed with MORE first, then the last releases the lease.
    pub fn update_commit(
        &mut self,
        page: RemoteAddr,
        lease: Lease,
        offset: u16,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let len = if data.is_empty() {
            0
        } else {
            range_len(offset, data)?
        };
        let segs: Vec<(u16, u16)> = if len == 0 {
            vec![(offset, 0)]
        } else {
            Segments::new(offset, len, self.seg()).collect()
        };
        let (last, more) = segs.split_last().expect("at least one");
        let commit = |o: u16, l: u16, flags: HeaderFlags| {
            let at = usize::from(o - offset);
            let mut r = Request::new(Opcode::UPDATE_COMMIT, page)
                .range(o, l)
                .payload(data[at..at + usize::from(l)].to_vec());
            r.lease = lease.id;
            r.flags = flags;
            r
        };
        let ids: Vec<u64> = more
            .iter()
            .map(|&(o, l)| self.submit(commit(o, l, HeaderFlags::MORE)))
            .collect();
        for r in self.wait_all(&ids) {
            r?;
        }
        self.call(commit(last.0, last.1, HeaderFlags::NONE))
            .map(drop)
    }

    /// Gives the lease back without writing.
    pub fn update_release(&mut self, page: RemoteAddr, lease: Lease) -> Result<(), ClientError> {
        let mut r = Request::new(Opcode::UPDATE_RELEASE, page);
        r.lease = lease.id;
        self.call(r).map(drop)
    }

    /// Lets every client use a page this client allocated (by default only the allocating
    /// client may).
    pub fn share(&mut self, page: RemoteAddr) -> Result<(), ClientError> {
        self.call(Request::new(Opcode::SHARE, page)).map(drop)
    }

    /// Keeps the page when this client falls silent: servers free the pages of an owner they
    /// have not heard from for their grace period (docs/protocol.md §5.17), except shared and
    /// detached ones. A detached page stays until freed. Idempotent.
    pub fn detach(&mut self, page: RemoteAddr) -> Result<(), ClientError> {
        self.call(Request::new(Opcode::DETACH, page)).map(drop)
    }

    /// Detaches several pages, a window of requests in flight at a time; the first failure
    /// is returned (the others were still sent: DETACH is idempotent, so a caller can retry
    /// the whole list).
    pub fn detach_all(&mut self, pages: &[RemoteAddr]) -> Result<(), ClientError> {
        let mut first = Ok(());
        for chunk in pages.chunks(usize::from(MAX_BULK)) {
            let ids: Vec<u64> = chunk
                .iter()
                .map(|&p| self.submit(Request::new(Opcode::DETACH, p)))
                .collect();
            for r in self.wait_all(&ids) {
                if let (Err(e), Ok(())) = (r, &first) {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// Pings `host` like the hosts this client allocated pages on, whenever it has sent it
    /// nothing for a second ([`Engine::hold`]): for pages it uses that another client
    /// allocated.
    pub fn hold(&mut self, host: HostId) {
        self.engine.hold(host, Instant::now());
    }

    /// Lets servers hear from this client while it has nothing else to send: pings each host
    /// it holds pages on that it has sent nothing for a second, and takes in what arrived. Any blocking call does the same; call this from a thread that holds pages
    /// and may stay idle for longer than a server's grace period.
    pub fn keep_alive(&mut self) {
        self.progress();
    }

    /// Frees the page; its address becomes stale.
    pub fn free(&mut self, page: RemoteAddr) -> Result<(), ClientError> {
        self.call(Request::new(Opcode::FREE, page)).map(drop)
    }

    /// Compare-and-swap of the little-endian word at `offset`: returns the value before; the
    /// swap happened iff it equals `expected`.
    pub fn cas(
        &mut self,
        page: RemoteAddr,
        offset: u16,
        expected: u64,
        new: u64,
    ) -> Result<u64, ClientError> {
        let mut r = Request::new(Opcode::CAS, page).range(offset, 8);
        r.operand0 = expected;
        r.operand1 = new;
        Ok(self.call(r)?.header.operand0)
    }

    /// Fetch-and-add (wrapping) on the little-endian word at `offset`: returns the value before.
    pub fn fetch_add(
        &mut self,
        page: RemoteAddr,
        offset: u16,
        add: u64,
    ) -> Result<u64, ClientError> {
        let mut r = Request::new(Opcode::FETCH_ADD, page).range(offset, 8);
        r.operand0 = add;
        Ok(self.call(r)?.header.operand0)
    }

    /// Reads the same range of several pages of one host (≤ 128 pages): one request per
    /// server shard the pages are on.
    pub fn read_bulk(
        &mut self,
        pages: &[RemoteAddr],
        offset: u16,
        length: u16,
    ) -> Result<Vec<Result<Vec<u8>, ClientError>>, ClientError> {
        if let Some(groups) = shard_groups(pages) {
            return per_group(&groups, |idx| {
                let sub: Vec<RemoteAddr> = idx.iter().map(|&i| pages[i]).collect();
                self.read_bulk(&sub, offset, length)
            });
        }
        let (first, n) = bulk_of(pages)?;
        let mut list = vec![0u8; pages.len() * 8];
        put_handles(&mut list, pages.iter().map(|p| p.handle()));
        let mut req = Request::new(Opcode::READ_BULK, first)
            .range(offset, length)
            .payload(list);
        req.count = n;
        let r = self.call(req)?;
        Ok(r.items
            .into_iter()
            .map(|i| check(i.status).map(|()| i.data))
            .collect())
    }

    /// Writes ranges of several pages of one host, one frame per server shard the pages are
    /// on; a result per write.
    pub fn write_bulk(
        &mut self,
        writes: &[(RemoteAddr, u16, &[u8])],
    ) -> Result<Vec<Result<(), ClientError>>, ClientError> {
        let pages: Vec<RemoteAddr> = writes.iter().map(|w| w.0).collect();
        if let Some(groups) = shard_groups(&pages) {
            return per_group(&groups, |idx| {
                let sub: Vec<(RemoteAddr, u16, &[u8])> = idx.iter().map(|&i| writes[i]).collect();
                self.write_bulk(&sub)
            });
        }
        let (first, n) = bulk_of(&pages)?;
        let size: usize = writes
            .iter()
            .map(|w| bluebridge_proto::message::write_entry_len(w.2.len()))
            .sum();
        if size > usize::from(self.seg()) {
            return Err(ClientError::Invalid("bulk writes larger than one frame"));
        }
        let mut buf = vec![0u8; size];
        let mut end = 0;
        for &(page, offset, data) in writes {
            range_len(offset, data)?;
            end = put_write_entry(
                &mut buf,
                end,
                &WriteEntry {
                    handle: page.handle(),
                    offset,
                    data,
                },
            )
            .ok_or(ClientError::Invalid("bulk write entry does not fit"))?;
        }
        let mut req = Request::new(Opcode::WRITE_BULK, first).payload(buf);
        req.count = n;
        let r = self.call(req)?;
        (0..writes.len())
            .map(|i| {
                bulk_status(&r.data, i)
                    .ok_or(ClientError::BadReply("missing bulk status"))
                    .map(check)
            })
            .collect()
    }

    /// Frees every page of `pages`, of any hosts (a FREE_BULK per host and shard, 128 pages
    /// each), trying them all even when some fail: what a program runs on its way out, on
    /// every path. Returns the pages that could not be freed, each with why (empty: all
    /// freed).
    pub fn free_all(&mut self, pages: &[RemoteAddr]) -> Vec<(RemoteAddr, ClientError)> {
        let mut by_host: Vec<(HostId, Vec<RemoteAddr>)> = Vec::new();
        for &p in pages {
            match by_host.iter_mut().find(|(h, _)| *h == p.host_id()) {
                Some((_, v)) => v.push(p),
                None => by_host.push((p.host_id(), vec![p])),
            }
        }
        let mut failed = Vec::new();
        for (_, host_pages) in by_host {
            for chunk in host_pages.chunks(usize::from(MAX_BULK)) {
                match self.free_bulk(chunk) {
                    Ok(results) => failed.extend(
                        chunk
                            .iter()
                            .zip(results)
                            .filter_map(|(&p, r)| r.err().map(|e| (p, e))),
                    ),
                    Err(e) => failed.extend(chunk.iter().map(|&p| (p, e.clone()))),
                }
            }
        }
        failed
    }

    /// Frees several pages of one host (one request per server shard they are on); a result
    /// per page.
    pub fn free_bulk(
        &mut self,
        pages: &[RemoteAddr],
    ) -> Result<Vec<Result<(), ClientError>>, ClientError> {
        if let Some(groups) = shard_groups(pages) {
            return per_group(&groups, |idx| {
                let sub: Vec<RemoteAddr> = idx.iter().map(|&i| pages[i]).collect();
                self.free_bulk(&sub)
            });
        }
        let (first, n) = bulk_of(pages)?;
        let mut list = vec![0u8; pages.len() * 8];
        put_handles(&mut list, pages.iter().map(|p| p.handle()));
        let mut req = Request::new(Opcode::FREE_BULK, first).payload(list);
        req.count = n;
        let r = self.call(req)?;
        (0..pages.len())
            .map(|i| {
                bulk_status(&r.data, i)
                    .ok_or(ClientError::BadReply("missing bulk status"))
                    .map(check)
            })
            .collect()
    }
}

fn range_len(offset: u16, data: &[u8]) -> Result<u16, ClientError> {
    let len = u16::try_from(data.len()).map_err(|_| ClientError::Invalid("more than a page"))?;
    if len == 0 || usize::from(offset) + data.len() > PAGE_SIZE {
        return Err(ClientError::Invalid(
            "range empty or past the end of the page",
        ));
    }
    Ok(len)
}

/// The positions of `pages` by the shard field of their handles (a server takes a bulk
/// request's items on the first page's shard only), in order of first appearance; `None` when
/// they are all on one shard.
fn shard_groups(pages: &[RemoteAddr]) -> Option<Vec<Vec<usize>>> {
    let first = pages.first()?.handle().shard_field();
    if pages.iter().all(|p| p.handle().shard_field() == first) {
        return None;
    }
    let mut groups: Vec<(u8, Vec<usize>)> = Vec::new();
    for (i, p) in pages.iter().enumerate() {
        let f = p.handle().shard_field();
        match groups.iter_mut().find(|(g, _)| *g == f) {
            Some((_, idx)) => idx.push(i),
            None => groups.push((f, vec![i])),
        }
    }
    Some(groups.into_iter().map(|(_, idx)| idx).collect())
}

/// Runs `call` for every group of positions and puts its per-item results back in place.
fn per_group<R>(
    groups: &[Vec<usize>],
    mut call: impl FnMut(&[usize]) -> Result<Vec<R>, ClientError>,
) -> Result<Vec<R>, ClientError> {
    let mut out: Vec<Option<R>> = (0..groups.iter().map(Vec::len).sum())
        .map(|_| None)
        .collect();
    for idx in groups {
        for (&i, r) in idx.iter().zip(call(idx)?) {
            out[i] = Some(r);
        }
    }
    Ok(out
        .into_iter()
        .map(|r| r.expect("every position is in a group"))
        .collect())
}

/// The first page and the count of a bulk request; all pages must be on one host.
fn bulk_of(pages: &[RemoteAddr]) -> Result<(RemoteAddr, u16), ClientError> {
    let first = *pages
        .first()
        .ok_or(ClientError::Invalid("bulk request of no pages"))?;
    if pages.len() > usize::from(MAX_BULK) {
        return Err(ClientError::TooMany);
    }
    if pages.iter().any(|p| p.host_id() != first.host_id()) {
        return Err(ClientError::Invalid("bulk requests name pages of one host"));
    }
    Ok((first, pages.len() as u16))
}
