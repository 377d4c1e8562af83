//! The check behind the `handler` fuzz target, here so the unit tests replay the saved corpus
//! on stable Rust. Not a public API.
//!
//! The input drives a small interpreter: each step is either a raw frame or a request built
//! from the input's bytes (any opcode, handles the server handed out or made up, ranges,
//! leases, request ids from a small space so retransmissions happen, two clients, time moving
//! forward). After every step: each reply parses as a well-formed reply to the client that
//! asked, from this server's /48; a freshly allocated page is zero; pages in use never exceed
//! the arena.

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

/// Runs the interpreter over `data`; panics when an invariant breaks.
pub fn check_requests(data: &[u8]) {
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
            let handle = match c.u8() % 4 {
                0 => PageHandle::NONE,
                1 => PageHandle::from_bits(c.u64()),
                _ if !handles.is_empty() => handles[usize::from(c.u8()) % handles.len()],
                _ => PageHandle::NONE,
            };
            let host = if c.u8() % 16 == 0 {
                HostId(c.u16())
            } else {
                HOST
            };
            let dst = RemoteAddr::new(NetPrefix::DEFAULT, host, handle, op, OpFlags::NONE);
            let sel = c.u8();
            let (offset, length) = match sel % 4 {
                0 => (0, PAGE_SIZE as u16),
                1 => (u16::from(c.u8()) * 8, 8),
                2 => (c.u16() % 4200, c.u16() % 4200),
                _ => (u16::from(c.u8()), u16::from(c.u8())),
            };
            let count = match c.u8() % 3 {
                0 => 1,
                1 => u16::from(c.u8() % 8),
                _ => c.u16() % 200,
            };
            let lease = if !leases.is_empty() && c.u8() % 2 == 0 {
                leases[leases.len() - 1]
            } else {
                c.u64() % 4
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
            let payload = match c.u8() % 4 {
                0 => vec![c.u8(); usize::from(length).min(4096)],
                1 => handles
                    .iter()
                    .take(usize::from(count))
                    .flat_map(|h| h.to_bits().to_be_bytes())
                    .collect(),
                2 => {
                    let n = usize::from(c.u8());
                    c.bytes(n)
                }
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
        for r in &out.0 {
            let f = Frame::parse(r).expect("every reply is a well-formed frame");
            assert!(f.is_reply());
            assert_eq!(f.endpoints.src_port, UDP_PORT);
            let from = RemoteAddr::from_ipv6(f.endpoints.src, NetPrefix::DEFAULT)
                .expect("from our prefix");
            assert_eq!(from.host_id(), HOST, "replies come from this server's /48");
            let op = from.opcode();
            if f.header.status.is_ok() && matches!(op, Opcode::ALLOC | Opcode::ALLOC_BULK) {
                for chunk in f.payload.chunks_exact(8) {
                    let handle =
                        PageHandle::from_bits(u64::from_be_bytes(chunk.try_into().expect("8")));
                    let p = h.store().resolve(handle);
                    if !replayed {
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
        assert!(h.store().pages_used() <= total);
        let rec = h.stat_record(now_ns);
        assert_eq!(rec.pages_used, u64::from(h.store().pages_used()));
    }
}

/// Inputs that walk through every operation, to seed the fuzzer.
#[cfg(test)]
pub(crate) fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    // Step: [time, kind, who, op index, handle sel, host sel, range sel, ..., count sel, ...]
    let step = |op: u8, handle_sel: u8, range: u8, payload_sel: u8| -> Vec<u8> {
        vec![
            1,
            1,
            0,
            op,
            handle_sel,
            1,
            0,
            range,
            0,
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            payload_sel,
            7,
        ]
    };
    let idx = |op: Opcode| Opcode::ALL.iter().position(|&o| o == op).expect("known") as u8;
    let mut all = Vec::new();
    all.extend(step(idx(Opcode::ALLOC), 0, 0, 3));
    for op in Opcode::ALL {
        all.extend(step(idx(*op), 2, 0, 0));
    }
    vec![
        ("every-op", all),
        (
            "alloc-read-free",
            [
                step(idx(Opcode::ALLOC), 0, 0, 3),
                step(idx(Opcode::WRITE), 2, 0, 0),
                step(idx(Opcode::READ), 2, 0, 3),
                step(idx(Opcode::UPDATE_ACQUIRE), 2, 0, 3),
                step(idx(Opcode::UPDATE_COMMIT), 2, 0, 0),
                step(idx(Opcode::FREE), 2, 0, 3),
            ]
            .concat(),
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

    #[test]
    fn seeds_reach_the_store() {
        for (_, s) in seeds() {
            check_requests(&s);
        }
    }
}
