//! The handler fuzzer's reference model: a plain map from handle to page bytes, updated from
//! what the server acknowledged, against which every reply's data and, after every step, the
//! whole store is compared. It models data only (which request changed which bytes); whether a
//! request should have succeeded (access, leases, sessions) is the server's to decide, and the
//! model follows the replies' statuses.

use std::collections::HashMap;

use bluebridge_proto::frame::Frame;
use bluebridge_proto::message::{Body, Request, bulk_status};
use bluebridge_proto::{HeaderFlags, NetPrefix, Opcode, PAGE_SIZE, PageHandle, RemoteAddr, Status};

use crate::store::Store;

/// What the pages should hold.
#[derive(Default)]
pub(crate) struct Shadow {
    pages: HashMap<u64, Vec<u8>>,
    /// COMMIT+MORE frames acknowledged and not yet committed, by page: (offset, bytes).
    staged: HashMap<u64, Vec<(usize, Vec<u8>)>>,
}

fn handle_at(payload: &[u8], i: usize) -> Option<PageHandle> {
    payload
        .get(i * 8..i * 8 + 8)
        .map(|b| PageHandle::from_bits(u64::from_be_bytes(b.try_into().expect("8 bytes"))))
}

impl Shadow {
    fn page(&mut self, h: PageHandle) -> &mut Vec<u8> {
        self.pages.get_mut(&h.to_bits()).unwrap_or_else(|| {
            panic!("the server acknowledged a write to {h:?}, unknown to the model")
        })
    }

    /// Follows one request (`frame`) and the replies it got. `replayed`: the session table
    /// answered it (nothing ran again); `blind_ok`: a WRITE_BLIND was counted OK.
    pub(crate) fn step(
        &mut self,
        frame: &[u8],
        replies: &[Frame<'_>],
        replayed: bool,
        blind_ok: bool,
    ) {
        let Ok(f) = Frame::parse(frame) else {
            assert!(replies.is_empty(), "an unparsable frame got a reply");
            return;
        };
        let Ok(req) = Request::parse(&f, NetPrefix::DEFAULT) else {
            return; // error replies change nothing
        };
        let (h, target) = (req.header, req.target.handle());
        let data = |body: &Body<'_>| -> Vec<u8> {
            match body {
                Body::Data(b) => {
                    let mut v = vec![0u8; b.len()];
                    b.copy_to(&mut v);
                    v
                }
                _ => Vec::new(),
            }
        };
        let ok = replies.iter().find(|r| r.header.status == Status::OK);
        match req.op() {
            Opcode::WRITE_BLIND if blind_ok => {
                let o = usize::from(h.offset);
                let d = data(&req.body);
                self.page(target)[o..o + d.len()].copy_from_slice(&d);
            }
            _ if ok.is_none() => {}
            Opcode::ALLOC | Opcode::ALLOC_WRITE if !replayed => {
                let r = ok.expect("checked");
                let new = handle_at(r.payload, 0).expect("an ALLOC reply holds its handle");
                let mut page = vec![0u8; PAGE_SIZE];
                if req.op() == Opcode::ALLOC_WRITE {
                    let d = data(&req.body);
                    let o = usize::from(h.offset);
                    page[o..o + d.len()].copy_from_slice(&d);
                }
                let old = self.pages.insert(new.to_bits(), page);
                assert!(old.is_none(), "{new:?} handed out while live");
            }
            Opcode::ALLOC_BULK if !replayed => {
                let r = ok.expect("checked");
                assert_eq!(r.payload.len(), usize::from(r.header.count) * 8);
                for i in 0..usize::from(r.header.count) {
                    let new = handle_at(r.payload, i).expect("in the payload");
                    let old = self.pages.insert(new.to_bits(), vec![0u8; PAGE_SIZE]);
                    assert!(old.is_none(), "{new:?} handed out while live");
                }
            }
            // Idempotent: a repeat writes the same bytes again, as the server does.
            Opcode::WRITE => {
                let o = usize::from(h.offset);
                let d = data(&req.body);
                self.page(target)[o..o + d.len()].copy_from_slice(&d);
            }
            // A commit in several frames lands whole with its final frame (§5.8).
            Opcode::UPDATE_COMMIT if !replayed => {
                let o = usize::from(h.offset);
                let d = data(&req.body);
                if h.flags.contains(HeaderFlags::MORE) {
                    self.staged
                        .entry(target.to_bits())
                        .or_default()
                        .push((o, d));
                } else {
                    let staged = self.staged.remove(&target.to_bits()).unwrap_or_default();
                    let page = self.page(target);
                    for (so, sd) in staged.into_iter().chain([(o, d)]) {
                        page[so..so + sd.len()].copy_from_slice(&sd);
                    }
                }
            }
            // A new lease, or one released: nothing staged before it will ever land.
            Opcode::UPDATE_ACQUIRE | Opcode::UPDATE_RELEASE if !replayed => {
                self.staged.remove(&target.to_bits());
            }
            Opcode::WRITE_BULK => {
                let r = ok.expect("checked");
                let Body::Writes(entries) = req.body else {
                    unreachable!("a parsed WRITE_BULK")
                };
                for (i, e) in entries.iter().enumerate() {
                    if bulk_status(r.payload, i) == Some(Status::OK) {
                        let o = usize::from(e.offset);
                        self.page(e.handle)[o..o + e.data.len()].copy_from_slice(e.data);
                    }
                }
            }
            Opcode::FREE if !replayed => {
                assert!(
                    self.pages.remove(&target.to_bits()).is_some(),
                    "freed an unknown page"
                );
                self.staged.remove(&target.to_bits());
            }
            Opcode::FREE_BULK if !replayed => {
                let r = ok.expect("checked");
                let Body::Handles(list) = req.body else {
                    unreachable!("a parsed FREE_BULK")
                };
                for (i, p) in list.iter().enumerate() {
                    if bulk_status(r.payload, i) == Some(Status::OK) {
                        self.pages.remove(&p.to_bits());
                        self.staged.remove(&p.to_bits());
                    }
                }
            }
            Opcode::CAS | Opcode::FETCH_ADD if !replayed => {
                let r = ok.expect("checked");
                let o = usize::from(h.offset);
                let page = self.page(target);
                let word: &mut [u8; 8] = (&mut page[o..o + 8]).try_into().expect("8 bytes");
                let old = u64::from_le_bytes(*word);
                assert_eq!(
                    r.header.operand0,
                    old,
                    "{:?} returned another old value",
                    req.op()
                );
                let new = match req.op() {
                    Opcode::CAS if old == h.operand0 => h.operand1,
                    Opcode::CAS => old,
                    _ => old.wrapping_add(h.operand0),
                };
                *word = new.to_le_bytes();
            }
            _ => {}
        }
        // Data in replies is the page's as the model has it (reads change nothing).
        if matches!(
            req.op(),
            Opcode::READ | Opcode::READ_BULK | Opcode::UPDATE_ACQUIRE
        ) {
            for r in replies.iter().filter(|r| r.header.status == Status::OK) {
                let page = RemoteAddr::from_ipv6(r.endpoints.src, NetPrefix::DEFAULT)
                    .expect("from our prefix")
                    .handle();
                let o = usize::from(r.header.offset);
                let want = &self.page(page)[o..o + r.payload.len()];
                assert_eq!(r.payload, want, "{:?} of {page:?} at {o}", req.op());
            }
        }
    }

    /// Every page the model knows is live in `store` with exactly the model's bytes, and the
    /// store holds no other.
    pub(crate) fn check(&self, store: &Store) {
        for (&bits, want) in &self.pages {
            let h = PageHandle::from_bits(bits);
            let p = store
                .resolve(h)
                .unwrap_or_else(|e| panic!("{h:?}, live in the model, resolves to {e:?}"));
            assert!(store.page(p) == &want[..], "{h:?} differs from the model");
        }
        assert_eq!(
            store.pages_used() as usize,
            self.pages.len(),
            "pages in use"
        );
    }
}
