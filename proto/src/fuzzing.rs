//! The checks behind the fuzz targets, here so that the unit tests replay the saved corpus on
//! stable Rust with exactly what the fuzzer runs. Not a public API.

use crate::frame::{self, Envelope, Frame};
use crate::message::{Body, Request};
use crate::segment::{Reassembly, Segments};
use crate::{NetPrefix, PAGE_SIZE};

/// Largest frame a UDP length field can describe, plus the lower headers.
const MAX_FRAME: usize = 65_535 + 54;

/// Parses arbitrary bytes as a frame and checks every invariant that must hold for whatever was
/// accepted. Panics (the fuzzer's finding) when one does not.
pub fn check_frame(data: &[u8]) {
    let env = Envelope::parse(data);
    let Ok(f) = Frame::parse(data) else {
        return;
    };
    assert!(env.is_ok(), "a frame parsed whose envelope did not");
    // Re-emitting what was parsed gives a frame that parses to the same thing.
    let mut buf = [0u8; MAX_FRAME];
    let n = frame::build(&mut buf, &f.endpoints, &f.header, f.payload).expect("fits");
    let g = Frame::parse(&buf[..n]).expect("re-emitted frame parses");
    assert_eq!(g, f);

    match Request::parse(&f, NetPrefix::DEFAULT) {
        Ok(r) => {
            let h = r.header;
            match r.body {
                Body::Data(d) => {
                    assert_eq!(d.len(), usize::from(h.length));
                    assert!(usize::from(h.offset) + d.len() <= PAGE_SIZE);
                }
                Body::Handles(list) => {
                    // Items may be bad (each fails alone), but the first is the destination.
                    assert_eq!(list.len(), usize::from(h.count));
                    assert_eq!(list.get(0), Some(r.target.handle()));
                }
                Body::Writes(w) => {
                    let mut n = 0;
                    for e in w.iter() {
                        if n == 0 {
                            assert_eq!(e.handle, r.target.handle());
                        }
                        if e.check().is_ok() {
                            assert!(usize::from(e.offset) + e.data.len() <= PAGE_SIZE);
                            assert!(!e.handle.is_none() && !e.data.is_empty());
                        }
                        n += 1;
                    }
                    assert_eq!(n, w.len());
                }
                Body::Empty => {}
            }
            if r.op().reply_carries_data() || r.op().request_carries_data() {
                let max = if h.seg_max == 0 {
                    PAGE_SIZE as u16
                } else {
                    h.seg_max
                };
                if let Ok(mut re) = Reassembly::new(h.offset, h.length) {
                    for (o, l) in Segments::new(h.offset, h.length, max) {
                        re.accept(o, l).expect("segments of a range never collide");
                    }
                    re.finish().expect("segments cover their range");
                }
            }
        }
        Err(e) => {
            let _ = e.status();
        }
    }
}

/// Frames of every operation, valid or nearly so, to seed the fuzzer.
#[cfg(test)]
pub(crate) fn seeds() -> impl Iterator<Item = (&'static str, std::vec::Vec<u8>)> {
    use crate::codes::{HeaderFlags, OpFlags, Opcode};
    use crate::frame::tests::endpoints;
    use crate::wire::header::BbRepr;
    use crate::{HostId, PageHandle, RemoteAddr};

    // INVALIDATE and REVOKE are notices to clients, REPLICATE a stream between servers: not
    // requests.
    Opcode::ALL
        .iter()
        .filter(|&&op| op.is_request())
        .map(|&op| {
            let mut ep = endpoints();
            let handle = if op.is_host_op() {
                PageHandle::NONE
            } else {
                PageHandle::from_bits(0x1_0000_0007)
            };
            ep.dst =
                RemoteAddr::new(NetPrefix::DEFAULT, HostId(2), handle, op, OpFlags::NONE).to_ipv6();
            let (offset, length) = match op {
                Opcode::CAS | Opcode::FETCH_ADD => (64, 8),
                Opcode::WRITE
                | Opcode::WRITE_BLIND
                | Opcode::ALLOC_WRITE
                | Opcode::UPDATE_COMMIT
                | Opcode::PUT => (0, 64),
                Opcode::READ
                | Opcode::READ_BULK
                | Opcode::UPDATE_ACQUIRE
                | Opcode::MIGRATE_OUT
                | Opcode::MIGRATE_IN
                | Opcode::GET_SHARED
                | Opcode::GET_EXCLUSIVE => (0, 4096),
                _ => (0, 0),
            };
            let mut payload = std::vec![0u8; 0];
            // MIGRATE_IN: `count` is the page's original host.
            let mut count = if op == Opcode::MIGRATE_IN { 3 } else { 1 };
            if op.request_carries_data() {
                payload = (0..length).map(|i| i as u8).collect();
            }
            if matches!(op, Opcode::READ_BULK | Opcode::FREE_BULK) {
                count = 2;
                payload = std::vec![0u8; 16];
                crate::message::put_handles(&mut payload, [handle, PageHandle::from_bits(9)]);
            }
            if op == Opcode::WRITE_BULK {
                payload = std::vec![0u8; 32];
                let e = crate::message::WriteEntry {
                    handle,
                    offset: 8,
                    data: &[1, 2, 3, 4, 5],
                };
                let end = crate::message::put_write_entry(&mut payload, 0, &e).unwrap();
                payload.truncate(end);
            }
            let h = BbRepr {
                flags: if op == Opcode::UPDATE_COMMIT {
                    HeaderFlags::MORE
                } else {
                    HeaderFlags::NONE
                },
                count,
                request_id: 0x55,
                offset,
                length,
                seg_max: 1184,
                // OWNERS and RECLAIM name a shard in `lease`.
                lease: if matches!(op, Opcode::OWNERS | Opcode::RECLAIM) {
                    PageHandle::with_shard(0, 0).to_bits()
                } else {
                    7
                },
                operand0: 1,
                operand1: 2,
                ..BbRepr::default()
            };
            let mut buf = std::vec![0u8; 4400];
            let n = frame::build(&mut buf, &ep, &h, &payload).unwrap();
            buf.truncate(n);
            (op.name().unwrap(), buf)
        })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::{format, fs};

    use super::*;

    fn corpus() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frame")
    }

    /// Every seed is a valid request and is in the committed corpus (set
    /// `BLUEBRIDGE_WRITE_SEEDS=1` to write them after a format change).
    #[test]
    fn seeds_are_valid_and_committed() {
        for (name, bytes) in seeds() {
            let f = Frame::parse(&bytes).unwrap();
            Request::parse(&f, NetPrefix::DEFAULT).unwrap_or_else(|e| panic!("{name}: {e}"));
            let path = corpus().join(format!("seed-{name}"));
            if std::env::var_os("BLUEBRIDGE_WRITE_SEEDS").is_some() {
                fs::create_dir_all(corpus()).unwrap();
                fs::write(&path, &bytes).unwrap();
            }
            assert_eq!(
                fs::read(&path).unwrap_or_default(),
                bytes,
                "{} is stale",
                path.display()
            );
        }
    }

    /// Replays the whole saved corpus (seeds and whatever the fuzzer kept) through the check.
    #[test]
    fn corpus_replays() {
        let mut n = 0;
        for entry in fs::read_dir(corpus()).expect("the corpus directory exists") {
            let bytes = fs::read(entry.unwrap().path()).unwrap();
            check_frame(&bytes);
            n += 1;
        }
        assert!(n >= seeds().count(), "only {n} corpus entries");
    }
}
