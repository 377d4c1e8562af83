//! The check behind the `handler` fuzz target, here so the unit tests replay the saved corpus
//! on stable Rust. Not a public API.
//!
//! The input drives a small interpreter: each step is either a raw frame or a request built
//! from the input's bytes (any opcode, handles the server handed out or made up, ranges,
//! leases, request ids from a small space so retransmissions happen, two clients, time moving
//! forward). After every step: each reply parses as a well-formed reply to the client that
//! asked, from this server's /48; a freshly allocated page is zero; pages in use never exceed
//! the arena; and against a plain reference model ([`shadow`]): every byte a reply carries and
//! every byte of every live page is what the acknowledged requests wrote, and the store holds
//! exactly the pages the model does.

mod shadow;

use bluebridge_proto::frame::{Endpoints, Frame, FrameSink, build};
use bluebridge_proto::{
    BbRepr, FRAME_OVERHEAD, HeaderFlags, HostId, MacAddr, NetPrefix, OpFlags, Opcode, PAGE_SIZE,
    PageHandle, RemoteAddr, Status, UDP_PORT,
};

use crate::handler::{Handler, HandlerConfig};
use crate::store::Store;

const HOST: HostId = HostId(2);

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u16())
            | u64::from(self.u16()) << 16
            | u64::from(self.u16()) << 32
            | u64::from(self.u16()) << 48
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
}

struct Replies(Vec<Vec<u8>>);

impl FrameSink for Replies {
    fn send(&mut self, ep: &Endpoints, h: &BbRepr, payload: &[u8]) -> bool {
        let mut b = vec![0u8; FRAME_OVERHEAD + payload.len()];
        build(&mut b, ep, h, payload).expect("a reply always fits a 64 KiB frame");
        self.0.push(b);
        true
    }
}

fn client(i: u8) -> (std::net::Ipv6Addr, u16) {
    (
        format!("fd00:bb:1::{}", 1 + i % 2)
            .parse()
            .expect("literal"),
        40000 + u16::from(i % 2),
    )
}

/// Runs the interpreter over `data`; panics when an invariant breaks. Returns how many replies
/// were OK, by opcode (what the input reached).
pub fn check_requests(data: &[u8]) -> [u32; 256] {
    let mut ok_by_op = [0u32; 256];
    let mut cfg = HandlerConfig::new(NetPrefix::DEFAULT, HOST, 1184 + 8 * 64);
    cfg.sessions = crate::session::SessionConfig {
        sessions: 2,
        idle_ms: 50,
        bulk_payloads: 2,
        bulk_per_session: 1,
        per_address: 2,
    };
    cfg.lease_capacity = 4;
    let store = Store::new(2 << 20, false).expect("a 2 MiB store");
    let total = store.pages_total();
    let mut h = Handler::new(cfg, store);
    let mut c = Cursor(data);
    let mut handles: Vec<PageHandle> = Vec::new();
    let mut leases: Vec<u64> = Vec::new();
    let mut now_ns = 0u64;
    let mut steps = 0;
    let mut model = shadow::Shadow::default();
    while !c.0.is_empty() && steps < 256 {
        steps += 1;
        now_ns += u64::from(c.u8()) * 1_000_000;
        let kind = c.u8();
        let who = c.u8();
        let (src, port) = client(who);
        let frame = if kind % 8 == 0 {
            let n = usize::from(c.u16() % 600);
            c.bytes(n)
        } else {
            let op = if kind & 0x80 != 0 {
                Opcode(c.u8())
            } else {
                Opcode::ALL[usize::from(c.u8()) % Opcode::ALL.len()]
            };
            // Every field reads the same number of bytes whatever it picks, so a seed's layout
            // does not shift with the state (handles known, leases held).
            let (sel, idx, made_up) = (c.u8(), c.u8(), c.u64());
            let handle = match sel % 4 {
                0 => PageHandle::NONE,
                1 => PageHandle::from_bits(made_up),
                _ if !handles.is_empty() => handles[usize::from(idx) % handles.len()],
                _ => PageHandle::NONE,
            };
            let (sel, other) = (c.u8(), c.u16());
            let host = if sel % 16 == 0 { HostId(other) } else { HOST };
            let dst = RemoteAddr::new(NetPrefix::DEFAULT, host, handle, op, OpFlags::NONE);
            let (sel, a, b) = (c.u8(), c.u16(), c.u16());
            let (offset, length) = match sel % 5 {
                0 => (0, PAGE_SIZE as u16),
                1 => ((a % 512) * 8, 8),
                2 => (a % 4200, b % 4200),
                3 => (a % 256, b % 256),
                _ => (0, 0),
            };
            let (sel, n) = (c.u8(), c.u16());
            let count = match sel % 3 {
                0 => 1,
                1 => n % 8,
                _ => n % 200,
            };
            let (sel, made_up) = (c.u8(), c.u64());
            let lease = if !leases.is_empty() && sel % 2 == 0 {
                leases[leases.len() - 1]
            } else {
                made_up % 4
            };
            let hdr = BbRepr {
                flags: HeaderFlags(c.u8() & 0x0f),
                count,
                // Eight slots; their sequence advances every 16 steps, so ids are new,
                // retransmitted and stale in turn.
                request_id: u64::from(c.u8() % 8)
                    | (steps as u64 / 16) << bluebridge_proto::SESSION_SLOT_BITS,
                offset,
                length,
                seg_max: [0, 512, 1184, c.u16()][usize::from(c.u8() % 4)],
                lease,
                operand0: c.u64(),
                operand1: c.u64(),
                ..BbRepr::default()
            };
            let (sel, fill, n) = (c.u8(), c.u8(), c.u8());
            let payload = match sel % 4 {
                0 => vec![fill; usize::from(length).min(4096)],
                1 => handles
                    .iter()
                    .take(usize::from(count))
                    .flat_map(|h| h.to_bits().to_be_bytes())
                    .collect(),
                2 => c.bytes(usize::from(n)),
                _ => Vec::new(),
            };
            let ep = Endpoints {
                src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
                dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
                src,
                dst: dst.to_ipv6(),
                src_port: port,
                dst_port: UDP_PORT,
            };
            let mut b = vec![0u8; FRAME_OVERHEAD + payload.len()];
            build(&mut b, &ep, &hdr, &payload).expect("sized");
            b
        };
        let mut out = Replies(Vec::new());
        let dups = h.stats().duplicates;
        let oks = h.stats().replies(Status::OK);
        if steps % 3 == 0 && frame.len() > FRAME_OVERHEAD + 1 {
            // Every third frame arrives in two pieces, split somewhere after its headers.
            let at = FRAME_OVERHEAD + (steps * 37) % (frame.len() - FRAME_OVERHEAD);
            let (head, tail) = frame.split_at(at);
            let mut sum = bluebridge_proto::checksum::Checksum::new();
            sum.add_bytes(&head[bluebridge_proto::frame::UDP_START..])
                .add_bytes(tail);
            h.handle_parts(head, tail, &sum, now_ns, &mut out);
        } else {
            h.handle_frame(&frame, now_ns, &mut out);
        }
        let replayed = h.stats().duplicates != dups;
        let blind_ok = out.0.is_empty() && h.stats().replies(Status::OK) == oks + 1;
        let parsed: Vec<Frame<'_>> = out
            .0
            .iter()
            .map(|r| Frame::parse(r).expect("every reply is a well-formed frame"))
            .collect();
        for f in &parsed {
            assert!(f.is_reply());
            assert_eq!(f.endpoints.src_port, UDP_PORT);
            let from = RemoteAddr::from_ipv6(f.endpoints.src, NetPrefix::DEFAULT)
                .expect("from our prefix");
            assert_eq!(from.host_id(), HOST, "replies come from this server's /48");
            let op = from.opcode();
            if f.header.status.is_ok() {
                ok_by_op[usize::from(op.0)] += 1;
            }
            if f.header.status.is_ok()
                && matches!(op, Opcode::ALLOC | Opcode::ALLOC_BULK | Opcode::ALLOC_WRITE)
            {
                for chunk in f.payload.chunks_exact(8) {
                    let handle =
                        PageHandle::from_bits(u64::from_be_bytes(chunk.try_into().expect("8")));
                    let p = h.store().resolve(handle);
                    if !replayed && op != Opcode::ALLOC_WRITE {
                        let p = p.expect("a handle just handed out resolves");
                        assert!(
                            h.store().page(p).iter().all(|&b| b == 0),
                            "new pages are zero"
                        );
                    }
                    if handles.len() < 64 {
                        handles.push(handle);
                    }
                }
            }
            if op == Opcode::UPDATE_ACQUIRE && f.header.status == Status::OK {
                leases.push(f.header.lease);
            }
        }
        model.step(&frame, &parsed, replayed, blind_ok);
        model.check(h.store());
        assert!(h.store().pages_used() <= total);
        let rec = h.stat_record(now_ns);
        assert_eq!(rec.pages_used, u64::from(h.store().pages_used()));
    }
    ok_by_op
}

/// One well-formed step of the interpreter's input (see [`check_requests`] for the fields).
#[cfg(test)]
#[derive(Clone, Copy)]
struct SeedStep {
    op: Opcode,
    /// 0: handle 0; 2: the `handle`-th handle handed out so far.
    handle_sel: u8,
    handle: u8,
    /// Range: 3 = (offset, length) below 256; 4 = none; 0 = the whole page.
    range_sel: u8,
    offset: u16,
    length: u16,
    count: u16,
    /// Session slot of the request id.
    slot: u8,
    /// Present the latest lease granted (else a made-up one).
    lease: bool,
    /// Payload: 0 = `length` bytes of `fill`; 1 = the handles; 3 = none.
    payload_sel: u8,
    fill: u8,
}

#[cfg(test)]
impl SeedStep {
    fn new(op: Opcode, slot: u8) -> Self {
        SeedStep {
            op,
            handle_sel: 0,
            handle: 0,
            range_sel: 4,
            offset: 0,
            length: 0,
            count: 1,
            slot,
            lease: false,
            payload_sel: 3,
            fill: 0,
        }
    }

    fn page(self, i: u8) -> Self {
        SeedStep {
            handle_sel: 2,
            handle: i,
            ..self
        }
    }

    fn range(self, offset: u16, length: u16) -> Self {
        SeedStep {
            range_sel: 3,
            offset,
            length,
            ..self
        }
    }

    fn with_lease(self) -> Self {
        SeedStep {
            lease: true,
            ..self
        }
    }

    fn data(self, fill: u8) -> Self {
        SeedStep {
            payload_sel: 0,
            fill,
            ..self
        }
    }

    fn bytes(self) -> Vec<u8> {
        let idx = Opcode::ALL
            .iter()
            .position(|&o| o == self.op)
            .expect("known") as u8;
        let mut v = vec![1, 1, 0, idx, self.handle_sel, self.handle];
        v.extend([0; 8]); // made-up handle
        v.extend([1, 0, 0]); // this host
        v.push(self.range_sel);
        v.extend(self.offset.to_le_bytes());
        v.extend(self.length.to_le_bytes());
        v.push(if self.count == 1 { 0 } else { 2 });
        v.extend(self.count.to_le_bytes());
        v.push(u8::from(!self.lease)); // 0: the latest lease granted; 1: a made-up one
        v.extend([0; 8]);
        v.extend([0, self.slot]); // flags, request id slot
        v.extend([0, 0, 0]); // seg_max 0
        v.extend([0; 16]); // operands
        v.extend([self.payload_sel, self.fill, 0]);
        v
    }
}

/// Inputs that walk through every operation, to seed the fuzzer.
#[cfg(test)]
pub(crate) fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let step = SeedStep::new;
    // Every opcode once, well formed, on the first page (or the host); the frees last.
    let mut ops: Vec<Opcode> = Opcode::ALL.to_vec();
    ops.sort_by_key(|&op| matches!(op, Opcode::FREE | Opcode::FREE_BULK));
    let mut every = vec![step(Opcode::ALLOC, 0)];
    for (i, &op) in ops.iter().enumerate() {
        let mut s = step(op, 1 + (i % 100) as u8);
        if !op.is_host_op() {
            s = s.page(0);
        }
        s = if op.request_carries_data() {
            s.range(0, 64).data(7)
        } else if op.takes_no_range() {
            s
        } else {
            s.range(0, 8)
        };
        match op {
            Opcode::ALLOC_BULK => s.count = 2,
            Opcode::READ_BULK | Opcode::FREE_BULK => s.payload_sel = 1,
            Opcode::UPDATE_COMMIT | Opcode::UPDATE_RELEASE => s.lease = true,
            _ => {}
        }
        every.push(s);
    }
    let walk = [
        step(Opcode::ALLOC, 0),
        step(Opcode::WRITE, 1).page(0).range(8, 64).data(0x5a),
        step(Opcode::READ, 2).page(0).range(0, 128),
        step(Opcode::UPDATE_ACQUIRE, 3).page(0).range(0, 16),
        step(Opcode::UPDATE_COMMIT, 4)
            .page(0)
            .range(0, 16)
            .data(0xa5)
            .with_lease(),
        step(Opcode::FETCH_ADD, 5).page(0).range(64, 8),
        step(Opcode::READ, 6).page(0).range(0, 128),
        step(Opcode::FREE, 7).page(0),
    ];
    vec![
        ("every-op", every.iter().flat_map(|s| s.bytes()).collect()),
        (
            "alloc-read-free",
            walk.iter().flat_map(|s| s.bytes()).collect(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn corpus() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/handler")
    }

    /// The seeds are committed (`BLUEBRIDGE_WRITE_SEEDS=1` rewrites them).
    #[test]
    fn seeds_are_committed() {
        for (name, bytes) in seeds() {
            let path = corpus().join(format!("seed-{name}"));
            if std::env::var_os("BLUEBRIDGE_WRITE_SEEDS").is_some() {
                std::fs::create_dir_all(corpus()).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            }
            assert_eq!(
                std::fs::read(&path).unwrap_or_default(),
                bytes,
                "{} is stale",
                path.display()
            );
        }
    }

    /// Replays the saved corpus through the check.
    #[test]
    fn corpus_replays() {
        let mut n = 0;
        for entry in std::fs::read_dir(corpus()).expect("the corpus directory exists") {
            check_requests(&std::fs::read(entry.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n >= 2);
    }

    /// The seeds get past validation into the store: their allocations, writes, reads,
    /// updates and frees are answered OK (and checked against the model on the way).
    #[test]
    fn seeds_reach_the_store() {
        let (_, walk) = seeds()
            .into_iter()
            .find(|s| s.0 == "alloc-read-free")
            .unwrap();
        let ok = check_requests(&walk);
        for op in [
            Opcode::ALLOC,
            Opcode::WRITE,
            Opcode::READ,
            Opcode::UPDATE_ACQUIRE,
            Opcode::UPDATE_COMMIT,
            Opcode::FETCH_ADD,
            Opcode::FREE,
        ] {
            assert!(
                ok[usize::from(op.0)] >= 1,
                "{op:?} never answered OK: {:?}",
                &ok[..]
            );
        }
        let (_, every) = seeds().into_iter().find(|s| s.0 == "every-op").unwrap();
        let ok = check_requests(&every);
        assert!(ok.iter().filter(|&&n| n > 0).count() >= 12, "{:?}", &ok[..]);
    }
}
