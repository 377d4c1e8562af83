//! Coherent copies (§5.18 of the protocol): GET_SHARED, GET_EXCLUSIVE, PUT and RENEW, and the
//! REVOKE notices the home sends to holders. The decisions are the [`Directory`]'s; this is
//! where they meet the store and the wire.
//!
//! [`Directory`]: crate::coherence::Directory

use std::net::Ipv6Addr;

use bluebridge_proto::message::{Body, KEEP_NONE};
use bluebridge_proto::{
    BbRepr, Endpoints, FrameSink, HeaderFlags, OpFlags, Opcode, RemoteAddr, Request, Status,
    UDP_PORT,
};

use super::{Handler, Outcome, send};
use crate::coherence::Get;
use crate::lease::ClientKey;
use crate::store::PageIdx;

impl Handler {
    /// GET_SHARED and GET_EXCLUSIVE: a copy of the page for the requester, or RECALLING while
    /// the home revokes the copies in its way.
    pub(super) fn get_copy(
        &mut self,
        req: &Request<'_>,
        who: ClientKey,
        now_ns: u64,
        sink: &mut impl FrameSink,
    ) {
        let target = req.target;
        let base = Self::reply_header(&req.header, Status::OK);
        let p = match self.page_for(target.handle(), who) {
            Ok(p) => p,
            Err(st) => return self.reply_status(req, target, base, st, sink),
        };
        if self.store.lease_slot(p) != 0 {
            // Mid-update (UPDATE_ACQUIRE's lease): copies would go stale at its commit.
            return self.reply_status(req, target, base, Status::LEASE_HELD, sink);
        }
        let macs = (req.endpoints.src_mac, req.endpoints.dst_mac);
        let decided = if req.op() == Opcode::GET_SHARED {
            self.directory.get_shared(p, who, macs, now_ns)
        } else {
            self.directory
                .get_exclusive(p, who, macs, req.header.lease, now_ns)
        };
        self.c()
            .copy_clients
            .set(u64::from(self.directory.clients(now_ns)));
        match decided {
            Err(st) => self.reply_status(req, target, base, st, sink),
            Ok(Get::Recall {
                revoke,
                keep,
                generation,
            }) => {
                self.send_revokes(target, revoke, generation, keep, sink);
                self.c().recalling.inc();
                self.reply_status(req, target, base, Status::RECALLING, sink);
            }
            Ok(Get::Granted {
                generation,
                data,
                hand_on,
            }) => {
                self.c().copy_grants.inc();
                let h = BbRepr {
                    lease: u64::from(generation),
                    operand0: self.directory.lease_ms(),
                    operand1: self.home_shard(),
                    ..base
                };
                if data {
                    self.send_range(req, p, target, h, sink);
                } else {
                    // The requester's read copy is current: an upgrade carries no bytes.
                    let h = BbRepr { length: 0, ..h };
                    send(
                        self.counters.shard(self.shard),
                        sink,
                        &req.endpoints.reply_from(target.to_ipv6()),
                        &h,
                        &[],
                    );
                }
                if let Some(h) = hand_on {
                    self.send_revokes(target, h.to, generation, h.keep, sink);
                }
            }
        }
    }

    /// PUT (at most once: its outcome is kept in the session table): the requester gives up
    /// its copy or keeps less of it, writing back the bytes it carries.
    pub(super) fn put_copy(&mut self, req: &Request<'_>, who: ClientKey, now_ns: u64) -> Outcome {
        let h = &req.header;
        let target = req.target.handle();
        let r = self.page_for(target, who).and_then(|p| {
            let data = matches!(req.body, Body::Data(_));
            let (generation, ready) = self
                .directory
                .put(p, who, h.lease, h.operand0, data, now_ns)?;
            if let Body::Data(d) = req.body {
                let o = usize::from(h.offset);
                d.copy_to(&mut self.store.page_mut(p)[o..o + d.len()]);
            }
            if ready != 0 {
                self.ready = Some((req.target, ready));
            }
            Ok(generation)
        });
        match r {
            Ok(generation) => Outcome {
                lease: u64::from(generation),
                operand0: self.directory.lease_ms(),
                ..Outcome::status(Status::OK, target)
            },
            Err(st) => Outcome::status(st, target),
        }
    }

    /// RENEW: the requester's copy lease at this shard goes on.
    pub(super) fn renew_copies(
        &mut self,
        req: &Request<'_>,
        who: ClientKey,
        now_ns: u64,
        sink: &mut impl FrameSink,
    ) {
        let target = req.target;
        let base = Self::reply_header(&req.header, Status::OK);
        let r = self
            .page_for(target.handle(), who)
            .and_then(|_| self.directory.renew(who, now_ns));
        match r {
            Ok(()) => {
                let h = BbRepr {
                    operand0: self.directory.lease_ms(),
                    operand1: self.home_shard(),
                    ..base
                };
                send(
                    self.counters.shard(self.shard),
                    sink,
                    &req.endpoints.reply_from(target.to_ipv6()),
                    &h,
                    &[],
                );
            }
            Err(st) => self.reply_status(req, target, base, st, sink),
        }
    }

    /// After a PUT's reply: READY to the requester the PUT cleared the way for, so it asks
    /// again at once instead of after its back-off.
    pub(super) fn send_ready(&mut self, sink: &mut impl FrameSink) {
        if let Some((page, mask)) = self.ready.take() {
            self.send_notices(page, Opcode::READY, mask, 0, 0, sink);
        }
    }

    /// Who grants this shard's copies and leases, as replies name it: host id << 8 | shard
    /// field (1 + the shard's index).
    fn home_shard(&self) -> u64 {
        u64::from(self.cfg.host.0) << 8 | (self.shard as u64 + 1)
    }

    /// Sends REVOKE notices about `page` (generation `generation`) to the holders in `mask`.
    fn send_revokes(
        &mut self,
        page: RemoteAddr,
        mask: u64,
        generation: u32,
        keep: u64,
        sink: &mut impl FrameSink,
    ) {
        self.send_notices(page, Opcode::REVOKE, mask, generation, keep, sink);
    }

    /// Sends notice `op` about `page` to the client-table entries in `mask`.
    fn send_notices(
        &mut self,
        page: RemoteAddr,
        op: Opcode,
        mask: u64,
        generation: u32,
        keep: u64,
        sink: &mut impl FrameSink,
    ) {
        let src = page.with_op(op, OpFlags::NONE).to_ipv6();
        let h = BbRepr {
            flags: HeaderFlags::REPLY,
            status: Status::OK,
            item: 0,
            count: 1,
            request_id: 0,
            offset: 0,
            length: 0,
            seg_max: 0,
            lease: u64::from(generation),
            operand0: keep,
            operand1: 0,
        };
        let c = self.counters.shard(self.shard);
        for t in self.directory.notice_targets(mask) {
            let ep = Endpoints {
                src_mac: t.our_mac,
                dst_mac: t.mac,
                src,
                dst: Ipv6Addr::from(t.key.addr),
                src_port: UDP_PORT,
                dst_port: t.key.port,
            };
            if op == Opcode::REVOKE {
                c.revokes.inc();
            }
            if !sink.send(&ep, &h, &[]) {
                c.tx_dropped.inc(); // the requester's next try sends it again
            }
        }
    }

    /// The plain writes (WRITE, WRITE_BULK, CAS, FETCH_ADD, FREE, UPDATE_ACQUIRE) wait while
    /// live copies of the page exist: LEASE_HELD.
    pub(super) fn check_no_copies(&mut self, p: PageIdx, now_ns: u64) -> Result<(), Status> {
        self.directory.check_plain_write(p, now_ns)
    }

    /// A page about to migrate must have no copies: the live holders are told to give theirs
    /// up (REVOKE, keep nothing), no new copy is granted meanwhile, and the controller is
    /// answered LEASE_HELD until they have.
    pub(super) fn revoke_for_migration(
        &mut self,
        page: RemoteAddr,
        p: PageIdx,
        now_ns: u64,
        sink: &mut impl FrameSink,
    ) -> bool {
        let (live, generation) = self.directory.live_holders(p, now_ns);
        if live == 0 {
            return false;
        }
        self.directory.hold_for_migration(p, now_ns);
        self.send_revokes(page, live, generation, KEEP_NONE, sink);
        true
    }
}

const _: () = assert!(
    Opcode::GET_SHARED.is_idempotent()
        && Opcode::GET_EXCLUSIVE.is_idempotent()
        && Opcode::RENEW.is_idempotent()
        && !Opcode::PUT.is_idempotent()
);
