//! The rig the handler tests share: a handler, a clock and a client, over real frames.
#![allow(
    dead_code,
    unused_imports,
    reason = "each test file uses part of the rig"
)]

pub(crate) use std::net::Ipv6Addr;

pub(crate) use bluebridge_proto::frame::{Endpoints, Frame, FrameSink, build};
pub(crate) use bluebridge_proto::message::{
    StatRecord, WriteEntry, bulk_status, put_handles, put_write_entry,
};
pub(crate) use bluebridge_proto::{
    BbRepr, HeaderFlags, HostId, MacAddr, NetPrefix, OpFlags, Opcode, PAGE_SIZE, PageHandle,
    RemoteAddr, Status, UDP_PORT,
};
pub(crate) use bluebridge_server::{Handler, HandlerConfig, Store};

pub(crate) const HOST: HostId = HostId(2);
pub(crate) const MS: u64 = 1_000_000;

pub(crate) struct VecSink(pub(crate) Vec<Vec<u8>>, pub(crate) usize);

impl FrameSink for VecSink {
    fn send(&mut self, ep: &Endpoints, header: &BbRepr, payload: &[u8]) -> bool {
        if self.0.len() >= self.1 {
            return false;
        }
        let mut buf = vec![0u8; 9000];
        let n = build(&mut buf, ep, header, payload).unwrap();
        buf.truncate(n);
        self.0.push(buf);
        true
    }
}

#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) src: RemoteAddr,
    pub(crate) dst: Ipv6Addr,
    pub(crate) h: BbRepr,
    pub(crate) payload: Vec<u8>,
}

pub(crate) struct Rig {
    pub(crate) handler: Handler,
    pub(crate) now: u64,
    pub(crate) client: Ipv6Addr,
    pub(crate) port: u16,
    pub(crate) next_id: u64,
    pub(crate) room: usize,
}

pub(crate) fn rig_with(
    arena: u64,
    max_reply_data: u16,
    tweak: impl FnOnce(&mut HandlerConfig),
) -> Rig {
    let mut cfg = HandlerConfig::new(NetPrefix::DEFAULT, HOST, max_reply_data);
    tweak(&mut cfg);
    Rig {
        handler: Handler::new(cfg, Store::new(arena, false).unwrap()),
        now: 1_000 * MS,
        client: "fd00:bb:1::1".parse().unwrap(),
        port: 40000,
        next_id: 1,
        room: usize::MAX,
    }
}

pub(crate) fn rig() -> Rig {
    rig_with(2 << 20, 4096, |_| {})
}

pub(crate) fn hdr(offset: u16, length: u16) -> BbRepr {
    BbRepr {
        count: 1,
        offset,
        length,
        ..BbRepr::default()
    }
}

impl Rig {
    pub(crate) fn frame(
        &mut self,
        op: Opcode,
        handle: PageHandle,
        h: BbRepr,
        payload: &[u8],
    ) -> Vec<u8> {
        let dst = RemoteAddr::new(NetPrefix::DEFAULT, HOST, handle, op, OpFlags::NONE);
        self.frame_to(dst, h, payload)
    }

    /// A request frame from this rig's client to any address (a request id is assigned when
    /// `h` has none).
    pub(crate) fn frame_to(&mut self, dst: RemoteAddr, mut h: BbRepr, payload: &[u8]) -> Vec<u8> {
        if h.request_id == 0 {
            h.request_id = self.next_id;
            self.next_id += 1;
        }
        let ep = Endpoints {
            src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            src: self.client,
            dst: dst.to_ipv6(),
            src_port: self.port,
            dst_port: UDP_PORT,
        };
        let mut buf = vec![0u8; 9000];
        let n = build(&mut buf, &ep, &h, payload).unwrap();
        buf.truncate(n);
        buf
    }

    pub(crate) fn raw(&mut self, frame: &[u8]) -> Vec<Reply> {
        let mut sink = VecSink(Vec::new(), self.room);
        self.handler.handle_frame(frame, self.now, &mut sink);
        sink.0
            .iter()
            .map(|b| {
                let f = Frame::parse(b).expect("replies are well-formed frames");
                assert!(f.is_reply());
                assert_eq!(f.endpoints.src_port, UDP_PORT);
                assert_eq!(f.endpoints.dst_port, self.port);
                assert_eq!(f.endpoints.dst_mac, MacAddr([2, 0, 0, 0, 0, 1]));
                Reply {
                    src: RemoteAddr::from_ipv6(f.endpoints.src, NetPrefix::DEFAULT).unwrap(),
                    dst: f.endpoints.dst,
                    h: f.header,
                    payload: f.payload.to_vec(),
                }
            })
            .collect()
    }

    pub(crate) fn req(
        &mut self,
        op: Opcode,
        handle: PageHandle,
        h: BbRepr,
        payload: &[u8],
    ) -> Vec<Reply> {
        let f = self.frame(op, handle, h, payload);
        let r = self.raw(&f);
        for x in &r {
            assert_eq!(x.dst, self.client);
        }
        r
    }

    /// A request answered by exactly one frame: returns it.
    pub(crate) fn one(
        &mut self,
        op: Opcode,
        handle: PageHandle,
        h: BbRepr,
        payload: &[u8],
    ) -> Reply {
        let mut r = self.req(op, handle, h, payload);
        assert_eq!(r.len(), 1, "{op:?}: {r:?}");
        r.pop().unwrap()
    }

    pub(crate) fn status(
        &mut self,
        op: Opcode,
        handle: PageHandle,
        h: BbRepr,
        payload: &[u8],
    ) -> Status {
        self.one(op, handle, h, payload).h.status
    }

    pub(crate) fn alloc(&mut self) -> PageHandle {
        let r = self.one(Opcode::ALLOC, PageHandle::NONE, hdr(0, 0), &[]);
        assert_eq!(r.h.status, Status::OK);
        assert_eq!(r.src.opcode(), Opcode::ALLOC);
        assert_eq!(r.src.host_id(), HOST);
        assert_eq!(r.payload, r.src.handle().to_bits().to_be_bytes());
        r.src.handle()
    }

    /// A page allocated with SHARED (any client may use it).
    pub(crate) fn alloc_shared(&mut self) -> PageHandle {
        let a = self.one(
            Opcode::ALLOC,
            PageHandle::NONE,
            BbRepr {
                flags: HeaderFlags::SHARED,
                ..hdr(0, 0)
            },
            &[],
        );
        assert_eq!(a.h.status, Status::OK);
        a.src.handle()
    }

    pub(crate) fn read(&mut self, p: PageHandle, offset: u16, length: u16) -> Vec<u8> {
        let replies = self.req(Opcode::READ, p, hdr(offset, length), &[]);
        let mut out = vec![0u8; usize::from(length)];
        for r in replies {
            assert_eq!(r.h.status, Status::OK);
            assert_eq!(r.src.handle(), p);
            let at = usize::from(r.h.offset - offset);
            out[at..at + r.payload.len()].copy_from_slice(&r.payload);
        }
        out
    }
}

pub(crate) fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

pub(crate) fn slot_id(slot: u64, seq: u64) -> u64 {
    seq << bluebridge_proto::SESSION_SLOT_BITS | slot
}
