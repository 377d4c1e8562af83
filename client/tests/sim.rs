//! The engine against the real request handler over a simulated link that loses, duplicates
//! and reorders frames in both directions. Deterministic: time is simulated, randomness seeded.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bluebridge_client::ClientError;
use bluebridge_client::engine::{Completion, Engine, EngineConfig, Request};
use bluebridge_proto::frame::{Endpoints, FrameSink, build};
use bluebridge_proto::{
    BbRepr, HeaderFlags, HostId, MacAddr, NetPrefix, OpFlags, Opcode, PageHandle, RemoteAddr,
    UDP_PORT,
};
use bluebridge_server::{Handler, HandlerConfig, Store};

const HOST: HostId = HostId(2);

#[derive(Default)]
struct Frames(Vec<Vec<u8>>);

impl FrameSink for Frames {
    fn send(&mut self, ep: &Endpoints, h: &BbRepr, payload: &[u8]) -> bool {
        let mut b = vec![0u8; bluebridge_proto::FRAME_OVERHEAD + payload.len()];
        build(&mut b, ep, h, payload).unwrap();
        self.0.push(b);
        true
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() % 1_000_000) as f64 / 1_000_000.0 < p
    }
}

struct Link {
    loss: f64,
    dup: f64,
    reorder: f64,
    rng: Rng,
    carried: u64,
    lost: u64,
}

impl Link {
    fn new(loss: f64, dup: f64, reorder: f64, seed: u64) -> Self {
        Link {
            loss,
            dup,
            reorder,
            rng: Rng(seed),
            carried: 0,
            lost: 0,
        }
    }
    fn carry(&mut self, frames: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for f in frames {
            self.carried += 1;
            if self.rng.chance(self.loss) {
                self.lost += 1;
                continue;
            }
            if self.rng.chance(self.dup) {
                out.push(f.clone());
            }
            out.push(f);
        }
        for i in 1..out.len() {
            if self.rng.chance(self.reorder) {
                out.swap(i - 1, i);
            }
        }
        out
    }
}

struct Sim {
    engine: Engine,
    server: Handler,
    up: Link,
    down: Link,
    base: Instant,
    t: Duration,
    done: HashMap<u64, Completion>,
}

fn prefix() -> NetPrefix {
    NetPrefix::DEFAULT
}

impl Sim {
    fn new(loss: f64, dup: f64, reorder: f64, seg: u16) -> Self {
        Self::with(loss, dup, reorder, seg, |_| {})
    }

    fn with(
        loss: f64,
        dup: f64,
        reorder: f64,
        seg: u16,
        tune: impl FnOnce(&mut EngineConfig),
    ) -> Self {
        let mut cfg = EngineConfig::new(
            prefix(),
            "fd00:bb:1::1".parse().unwrap(),
            MacAddr([2, 0, 0, 0, 0, 1]),
            MacAddr([2, 0, 0, 0, 0, 2]),
        );
        cfg.rto = Duration::from_micros(200);
        cfg.retries = 12;
        cfg.seg_max = seg;
        cfg.max_request_data = seg;
        tune(&mut cfg);
        Sim {
            engine: Engine::new(cfg),
            server: Handler::new(
                HandlerConfig::new(prefix(), HOST, 4096),
                Store::new(4 << 20, false).unwrap(),
            ),
            up: Link::new(loss, dup, reorder, 0x1234_5678),
            down: Link::new(loss, dup, reorder, 0x8765_4321),
            base: Instant::now(),
            t: Duration::ZERO,
            done: HashMap::new(),
        }
    }

    fn now(&self) -> Instant {
        self.base + self.t
    }

    fn step(&mut self) {
        let now = self.now();
        let mut out = Frames::default();
        self.engine.transmit(now, &mut out);
        let mut replies = Frames::default();
        for f in self.up.carry(out.0) {
            self.server
                .handle_frame(&f, self.t.as_nanos() as u64, &mut replies);
        }
        for f in self.down.carry(replies.0) {
            self.engine.handle_frame(&f, now);
        }
        self.engine.handle_timeouts(now);
        while let Some(c) = self.engine.poll_completion() {
            self.done.insert(c.id, c);
        }
        self.t += Duration::from_micros(50);
    }

    fn submit(&mut self, r: Request) -> u64 {
        let now = self.now();
        self.engine.submit(r, now)
    }

    /// A new page holding `data` (a whole page, written in one frame).
    fn written_page(&mut self, data: &[u8]) -> RemoteAddr {
        let p = page(&self.run(Request::new(Opcode::ALLOC, host_addr(Opcode::ALLOC))));
        self.run(
            Request::new(Opcode::WRITE, p)
                .range(0, 4096)
                .payload(data.to_vec()),
        )
        .result
        .unwrap();
        p
    }

    fn run(&mut self, r: Request) -> Completion {
        let id = self.submit(r);
        loop {
            if let Some(c) = self.done.remove(&id) {
                return c;
            }
            self.step();
        }
    }
}

fn host_addr(op: Opcode) -> RemoteAddr {
    RemoteAddr::host_op(prefix(), HOST, op)
}

fn page(c: &Completion) -> RemoteAddr {
    c.result
        .as_ref()
        .unwrap()
        .src
        .with_op(Opcode(0), OpFlags::NONE)
}

#[test]
fn segmented_page_round_trip() {
    let mut s = Sim::new(0.0, 0.0, 0.0, 1184);
    let p = page(&s.run(Request::new(Opcode::ALLOC, host_addr(Opcode::ALLOC))));
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    // One WRITE per segment, as the client library sends them.
    let ids: Vec<u64> = bluebridge_proto::Segments::new(0, 4096, 1184)
        .map(|(o, l)| {
            let d = data[usize::from(o)..usize::from(o + l)].to_vec();
            s.submit(Request::new(Opcode::WRITE, p).range(o, l).payload(d))
        })
        .collect();
    for id in ids {
        while !s.done.contains_key(&id) {
            s.step();
        }
        s.done.remove(&id).unwrap().result.unwrap();
    }
    let r = s.run(Request::new(Opcode::READ, p).range(0, 4096));
    assert_eq!(r.result.unwrap().data, data);
    assert_eq!(s.engine.stats().retransmits, 0);
}

#[test]
fn page_and_short_reads_go_inline_where_a_page_fits_one_frame() {
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 13 % 253) as u8).collect();
    let mut s = Sim::with(0.05, 0.02, 0.05, 4096, |c| c.inline_reads = true);
    let p = s.written_page(&data);
    // Through a lossy link, retransmissions included: the handler answers them as READs.
    for _ in 0..20 {
        let r = s.run(Request::new(Opcode::READ, p).range(0, 4096));
        assert_eq!(r.result.unwrap().data, data);
    }
    let r = s.run(Request::new(Opcode::READ, p).range(8, 100));
    assert_eq!(r.result.unwrap().data, data[8..108]);
    assert_eq!(
        s.engine.stats().inline_sent,
        21,
        "whole pages and short ranges"
    );
    let r = s.run(Request::new(Opcode::READ, p).range(8, 1000));
    assert_eq!(r.result.unwrap().data, data[8..1008]);
    assert_eq!(s.engine.stats().inline_sent, 21, "longer ranges stay plain");
    // On the wire: the flag, and the page's worth of zeros after the header.
    s.submit(Request::new(Opcode::READ, p).range(0, 4096));
    let mut out = Frames::default();
    s.engine.transmit(s.now(), &mut out);
    let f = bluebridge_proto::frame::Frame::parse(&out.0[0]).unwrap();
    assert!(f.header.flags.contains(HeaderFlags::INLINE));
    assert_eq!(f.payload.len() + f.payload_tail.len(), 4096);
    assert!(f.payload.iter().chain(f.payload_tail).all(|&b| b == 0));
    // Where a page does not fit one request frame, READs stay plain.
    let mut s = Sim::with(0.0, 0.0, 0.0, 1184, |c| c.inline_reads = true);
    let p = page(&s.run(Request::new(Opcode::ALLOC, host_addr(Opcode::ALLOC))));
    s.run(Request::new(Opcode::READ, p).range(0, 4096))
        .result
        .unwrap();
    assert_eq!(s.engine.stats().inline_sent, 0);
}

#[test]
fn lossy_link_mixed_workload_executes_once() {
    let mut s = Sim::new(0.05, 0.01, 0.1, 1184);
    let counter = page(&s.run(Request::new(Opcode::ALLOC, host_addr(Opcode::ALLOC))));
    let pages: Vec<RemoteAddr> = (0..8)
        .map(|_| page(&s.run(Request::new(Opcode::ALLOC, host_addr(Opcode::ALLOC)))))
        .collect();
    let mut acked_adds = 0u64;
    let mut last_write: HashMap<RemoteAddr, u8> = HashMap::new();
    let mut allocs = 0;
    let mut tag_ops: HashMap<u64, (Opcode, Option<RemoteAddr>, u8)> = HashMap::new();
    let mut rng = Rng(99);
    // 2,000 operations, 16 in flight.
    let mut submitted = 0;
    while submitted < 2000 || s.engine.in_flight() > 0 {
        while submitted < 2000 && s.engine.in_flight() < 16 {
            submitted += 1;
            let k = rng.next() % 10;
            let page_i = pages[(rng.next() % 8) as usize];
            let (req, kind) = match k {
                0..=3 => {
                    let mut r = Request::new(Opcode::FETCH_ADD, counter).range(0, 8);
                    r.operand0 = 1;
                    (r, (Opcode::FETCH_ADD, None, 0))
                }
                4..=5 => {
                    // Writes to one page are serialised (one in flight per page) so the last
                    // acknowledged write is well defined.
                    if tag_ops.values().any(|(_, p, _)| *p == Some(page_i)) {
                        submitted -= 1;
                        continue;
                    }
                    let v = (rng.next() % 250) as u8 + 1;
                    (
                        Request::new(Opcode::WRITE, page_i)
                            .range(0, 1024)
                            .payload(vec![v; 1024]),
                        (Opcode::WRITE, Some(page_i), v),
                    )
                }
                6..=7 => (
                    Request::new(Opcode::READ, page_i).range(0, 4096),
                    (Opcode::READ, None, 0),
                ),
                _ => (
                    Request::new(Opcode::ALLOC, host_addr(Opcode::ALLOC)),
                    (Opcode::ALLOC, None, 0),
                ),
            };
            let id = s.submit(req);
            tag_ops.insert(id, kind);
        }
        s.step();
        for (id, c) in std::mem::take(&mut s.done) {
            let (op, p, v) = tag_ops.remove(&id).unwrap();
            let r = c.result.unwrap_or_else(|e| panic!("{op:?} failed: {e}"));
            match op {
                Opcode::FETCH_ADD => acked_adds += 1,
                Opcode::WRITE => {
                    last_write.insert(p.unwrap(), v);
                }
                Opcode::ALLOC => allocs += 1,
                Opcode::READ => assert_eq!(r.data.len(), 4096),
                _ => unreachable!(),
            }
        }
    }
    // Every acknowledged increment counted exactly once: no FETCH_ADD ran twice.
    let c = s
        .run(Request::new(Opcode::READ, counter).range(0, 8))
        .result
        .unwrap();
    assert_eq!(
        u64::from_le_bytes(c.data[..8].try_into().unwrap()),
        acked_adds
    );
    // No ALLOC ran twice: the server holds exactly the pages acknowledged.
    assert_eq!(s.server.store().pages_used(), 1 + 8 + allocs);
    // Every acknowledged write reads back intact.
    for (p, v) in last_write {
        let d = s
            .run(Request::new(Opcode::READ, p).range(0, 1024))
            .result
            .unwrap()
            .data;
        assert!(d.iter().all(|&b| b == v));
    }
    let st = s.engine.stats();
    println!(
        "ops 2000, adds {acked_adds}, allocs {allocs}; frames up {} (lost {}), down {} (lost {}); \
         retransmits {}, duplicates suppressed by the server {}, stray replies {}, timeouts {}",
        s.up.carried,
        s.up.lost,
        s.down.carried,
        s.down.lost,
        st.retransmits,
        s.server.stats().duplicates,
        st.stray,
        st.timeouts
    );
    assert!(
        st.retransmits > 0 && s.server.stats().duplicates > 0,
        "the link did lose frames"
    );
    assert_eq!(st.timeouts, 0);
}

#[test]
fn dead_link_times_out_after_the_budget() {
    let mut s = Sim::new(1.0, 0.0, 0.0, 4096);
    let t0 = s.t;
    let c = s.run(Request::new(Opcode::PING, host_addr(Opcode::PING)));
    assert_eq!(c.result.unwrap_err(), ClientError::Timeout { tries: 13 });
    assert_eq!(s.up.carried, 13, "1 transmission + 12 retries");
    assert_eq!(c.retransmits, 12);
    // Backoff: 200 µs doubling to 16×, so 0.2+0.4+0.8+1.6+3.2×9 ms at least.
    assert!(s.t - t0 >= Duration::from_micros(200 + 400 + 800 + 1600 + 3200 * 9));
}

#[test]
fn stray_and_foreign_replies_are_ignored() {
    let mut s = Sim::new(0.0, 0.0, 0.0, 4096);
    let p = page(&s.run(Request::new(Opcode::ALLOC, host_addr(Opcode::ALLOC))));
    // A reply to an id never sent.
    let ep = Endpoints {
        src_mac: MacAddr([2, 0, 0, 0, 0, 2]),
        dst_mac: MacAddr([2, 0, 0, 0, 0, 1]),
        src: p.to_ipv6(),
        dst: "fd00:bb:1::1".parse().unwrap(),
        src_port: UDP_PORT,
        dst_port: 40000,
    };
    let mut f = Frames::default();
    f.send(
        &ep,
        &BbRepr {
            flags: HeaderFlags::REPLY,
            request_id: 5,
            ..BbRepr::default()
        },
        &[],
    );
    let now = s.now();
    s.engine.handle_frame(&f.0[0], now);
    assert_eq!(s.engine.stats().stray, 1);
    // Garbage.
    s.engine.handle_frame(&[0u8; 60], now);
    assert_eq!(s.engine.stats().malformed, 1);
    // A request whose range cannot be read fails locally, without sending.
    let c = s.run(Request::new(Opcode::READ, p).range(4000, 200));
    assert!(matches!(c.result, Err(ClientError::Invalid(_))));
    // Errors from the server arrive typed.
    let c = s.run(Request::new(Opcode::READ, p.with_handle(PageHandle::from_bits(77))).range(0, 8));
    assert!(matches!(
        c.result,
        Err(ClientError::InvalidHandle | ClientError::StaleHandle)
    ));
}

#[test]
fn the_timeout_follows_growing_queueing_delay() {
    // Replies come back later and later (queueing: 100 µs growing to 4 ms, one request at a
    // time, time checked every 50 µs). A fixed 1 ms timeout would retransmit every request
    // from the 10th on; the adaptive one stays ahead of the delay and retransmits nothing.
    let mut s = Sim::new(0.0, 0.0, 0.0, 4096);
    let mut cfg = s.engine.config().clone();
    cfg.rto = Duration::from_millis(1);
    s.engine = Engine::new(cfg);
    for i in 1..=40u64 {
        let delay = Duration::from_micros(100 * i);
        let id = s.submit(Request::new(Opcode::PING, host_addr(Opcode::PING)));
        let mut out = Frames::default();
        s.engine.transmit(s.now(), &mut out);
        let mut replies = Frames::default();
        for f in out.0 {
            s.server
                .handle_frame(&f, s.t.as_nanos() as u64, &mut replies);
        }
        let arrive = s.t + delay;
        while s.t < arrive {
            s.t += Duration::from_micros(50);
            s.engine.handle_timeouts(s.now());
            s.engine.transmit(s.now(), &mut Frames::default());
        }
        for f in replies.0 {
            s.engine.handle_frame(&f, s.now());
        }
        let c = s.engine.poll_completion().expect("answered");
        assert_eq!(c.id, id);
        assert!(c.result.is_ok());
        assert_eq!(
            c.retransmits, 0,
            "request {i} ({delay:?}) was retransmitted"
        );
    }
    assert_eq!(s.engine.stats().retransmits, 0);
    assert!(
        s.engine.rto() > Duration::from_millis(4),
        "{:?}",
        s.engine.rto()
    );
}

/// An INVALIDATE notice for `page`, as the controller sends it.
fn notice(page: RemoteAddr) -> Vec<u8> {
    let ep = Endpoints {
        src_mac: MacAddr([2, 0, 0, 0, 0, 9]),
        dst_mac: MacAddr([2, 0, 0, 0, 0, 1]),
        src: RemoteAddr::host_op(prefix(), HostId::CONTROLLER, Opcode::INVALIDATE).to_ipv6(),
        dst: "fd00:bb:1::1".parse().unwrap(),
        src_port: UDP_PORT,
        dst_port: 40000,
    };
    let h = BbRepr {
        flags: HeaderFlags::REPLY,
        count: 1,
        ..BbRepr::default()
    };
    let mut f = vec![0u8; 200];
    let n = build(&mut f, &ep, &h, &page.to_ipv6().octets()).unwrap();
    f.truncate(n);
    f
}

#[test]
fn an_invalidated_page_fails_fast_but_its_own_free_completes() {
    let mut s = Sim::new(0.0, 0.0, 0.0, 4096);
    let p = page(&s.run(Request::new(Opcode::ALLOC, host_addr(Opcode::ALLOC))));
    // A READ and the FREE in flight when the controller's notice comes in (the FREE's reply
    // is still on its way: the notice can overtake it).
    let read =
        s.submit(Request::new(Opcode::READ, p.with_op(Opcode::READ, OpFlags::NONE)).range(0, 8));
    let free = s.submit(Request::new(
        Opcode::FREE,
        p.with_op(Opcode::FREE, OpFlags::NONE),
    ));
    let now = s.now();
    s.engine.handle_frame(&notice(p), now);
    assert!(s.engine.is_invalidated(p));
    let c = s.engine.poll_completion().expect("the READ fails at once");
    assert_eq!(
        (c.id, c.result.unwrap_err()),
        (read, ClientError::Invalidated)
    );
    // The FREE goes on and completes as the server answers it.
    loop {
        if let Some(c) = s.done.remove(&free) {
            assert!(c.result.is_ok(), "{:?}", c.result);
            break;
        }
        s.step();
    }
    // Later requests for the page are not sent at all.
    let sent = s.engine.stats().sent;
    let c = s.run(Request::new(Opcode::READ, p.with_op(Opcode::READ, OpFlags::NONE)).range(0, 8));
    assert_eq!(c.result.unwrap_err(), ClientError::Invalidated);
    assert_eq!(s.engine.stats().sent, sent);
    assert_eq!(s.engine.stats().invalidations, 1);
    // A notice from anyone but the controller is ignored.
    let mut forged = notice(p.with_handle(PageHandle::from_bits(77)));
    forged[22 + 4..22 + 6].copy_from_slice(&5u16.to_be_bytes());
    let src = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&forged[22..38]).unwrap());
    bluebridge_proto::wire::udp::UdpPacket::new_unchecked(&mut forged[54..])
        .fill_checksum(src, "fd00:bb:1::1".parse().unwrap());
    let before = s.engine.stats();
    s.engine.handle_frame(&forged, now);
    let after = s.engine.stats();
    assert_eq!(after.invalidations, before.invalidations);
    assert_eq!(after.stray, before.stray + 1, "a reply to nothing, ignored");
}

#[test]
fn more_requests_than_session_slots_wait_for_one_and_each_runs_once() {
    // 1,000 FETCH_ADDs submitted at once on a lossy, duplicating link: at most 128 are on the
    // wire at a time (one per session slot), every one completes, and the word counts each
    // exactly once.
    let mut s = Sim::new(0.05, 0.02, 0.1, 4096);
    let p = page(&s.run(Request::new(Opcode::ALLOC, host_addr(Opcode::ALLOC))));
    let ids: Vec<u64> = (0..1000)
        .map(|_| {
            let mut r = Request::new(Opcode::FETCH_ADD, p).range(0, 8);
            r.operand0 = 1;
            s.submit(r)
        })
        .collect();
    let sent = s.engine.stats().sent;
    s.step();
    assert_eq!(
        s.engine.stats().sent - sent,
        bluebridge_proto::SESSION_SLOTS as u64,
        "one slot each"
    );
    while ids.iter().any(|id| !s.done.contains_key(id)) {
        s.step();
    }
    let mut olds: Vec<u64> = ids
        .iter()
        .map(|id| s.done[id].result.as_ref().unwrap().header.operand0)
        .collect();
    olds.sort_unstable();
    assert_eq!(
        olds,
        (0..1000).collect::<Vec<u64>>(),
        "each add saw a distinct old value"
    );
    let r = s.run(Request::new(Opcode::READ, p).range(0, 8));
    assert_eq!(r.result.unwrap().data, 1000u64.to_le_bytes());
    assert!(s.engine.stats().retransmits > 0, "the link lost some");
}

#[test]
fn a_recycled_buffer_carries_the_next_read() {
    let mut s = Sim::new(0.0, 0.0, 0.0, 4096);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 13 % 251) as u8).collect();
    let p = s.written_page(&data);
    let first = s
        .run(Request::new(Opcode::READ, p).range(0, 4096))
        .result
        .unwrap()
        .data;
    let at = first.as_ptr();
    s.engine.recycle(first);
    let again = s
        .run(Request::new(Opcode::READ, p).range(8, 100))
        .result
        .unwrap()
        .data;
    assert_eq!(
        again.as_ptr(),
        at,
        "the pool's buffer, not a new allocation"
    );
    assert_eq!(
        again,
        &data[8..108],
        "this read's bytes, where the last read's were"
    );
}

/// §5.17: an engine that holds pages pings their host only when it has sent it nothing for a
/// second; the pings surface nowhere (no completion, not in flight), and they are what keeps
/// a server with a short grace period from reclaiming the pages.
#[test]
fn an_idle_engine_keeps_its_pages_alive_with_pings_nobody_sees() {
    let mut s = Sim::new(0.0, 0.0, 0.0, 4096);
    s.server = Handler::new(
        HandlerConfig {
            orphan_grace_ms: 2_000,
            ..HandlerConfig::new(prefix(), HOST, 4096)
        },
        Store::new(4 << 20, false).unwrap(),
    );
    let p = page(&s.run(Request::new(Opcode::ALLOC, host_addr(Opcode::ALLOC))));
    // Lets `ms` pass a millisecond at a time, the server housekeeping as a worker does.
    let pass = |s: &mut Sim, ms: u64, alive: bool, busy: bool| {
        for i in 0..ms {
            if busy && i % 100 == 0 {
                s.submit(Request::new(Opcode::READ, p).range(0, 8));
            }
            if alive {
                let now = s.now();
                s.engine.keep_alive(now);
            }
            s.step();
            s.t += Duration::from_millis(1);
            let t = s.t.as_nanos() as u64;
            s.server.housekeep(t);
        }
    };
    // Busy for 1.5 s: its requests are enough, no ping.
    pass(&mut s, 1_500, true, true);
    assert_eq!(s.engine.stats().keepalives, 0);
    assert_eq!(s.done.len(), 15);
    s.done.clear();
    // Idle for 3.5 s, past the grace period: a ping a second, nothing else visible.
    pass(&mut s, 3_500, true, false);
    let st = s.engine.stats();
    assert!((3..=4).contains(&st.keepalives), "{st:?}");
    assert_eq!(st.submitted, 16, "the pings are not counted as submitted");
    assert!(s.done.is_empty(), "no completion for a ping");
    assert!(s.engine.in_flight() == 0 && s.engine.poll_completion().is_none());
    assert_eq!(s.server.store().pages_used(), 1, "kept alive");
    // Silent for 3 s: the page goes.
    pass(&mut s, 3_000, false, false);
    assert_eq!(s.server.store().pages_used(), 0, "reclaimed");
    let r = s.run(Request::new(Opcode::READ, p).range(0, 8));
    assert_eq!(r.result.unwrap_err(), ClientError::StaleHandle);
}

/// A host held without an allocation (pages another client allocated) is pinged the same way.
#[test]
fn a_held_host_is_pinged_without_an_allocation() {
    let mut s = Sim::new(0.0, 0.0, 0.0, 4096);
    let now = s.now();
    s.engine.hold(HOST, now);
    s.engine.hold(HOST, now); // once is enough
    assert_eq!(s.engine.held_hosts().collect::<Vec<_>>(), [HOST]);
    for _ in 0..2_500 {
        let now = s.now();
        s.engine.keep_alive(now);
        s.step();
        s.t += Duration::from_millis(1);
    }
    let st = s.engine.stats();
    assert!((2..=3).contains(&st.keepalives), "{st:?}");
    assert_eq!((st.submitted, st.replies), (0, st.keepalives));
    assert!(s.done.is_empty());
}
