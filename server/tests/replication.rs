//! Replication at the handler (docs/protocol.md §5.19), over real frames without sockets: a
//! primary, its backup and a little network between them that can lose frames; the
//! controller's orders; replies held until the backup has the request; the backup taking over
//! with the primary's handles, bytes, counters and stored replies; the primary fenced.

mod common;

use common::*;

const P: HostId = HostId(2);
const B: HostId = HostId(3);

fn controller() -> Ipv6Addr {
    "fd00:bb:7fff::1".parse().unwrap()
}

fn client() -> Ipv6Addr {
    "fd00:bb:1::1".parse().unwrap()
}

/// A primary, its backup, and the frames in flight between them and the clients.
struct Net {
    p: Handler,
    b: Handler,
    now: u64,
    /// Where host P's /48 goes: false to the primary, true to the backup (after failover).
    rerouted: bool,
    /// Frames for clients (and the controller), in arrival order.
    inbox: Vec<Vec<u8>>,
    /// Drop every stream frame (primary → backup) while set.
    cut: bool,
    next_id: u64,
    /// How far the backup's clock is behind the primary's (servers start at different times).
    b_lag: u64,
}

fn handler(host: HostId) -> Handler {
    let cfg = HandlerConfig::new(NetPrefix::DEFAULT, host, 4096);
    Handler::new(cfg, Store::new(4 << 20, false).unwrap())
}

impl Net {
    fn new() -> Net {
        Net {
            p: handler(P),
            b: handler(B),
            now: 1_000 * MS,
            rerouted: false,
            inbox: Vec::new(),
            cut: false,
            next_id: 1,
            b_lag: 0,
        }
    }

    /// Delivers `frames` and everything they cause until nothing moves.
    fn run(&mut self, mut frames: Vec<Vec<u8>>) {
        for _ in 0..64 {
            let mut out = VecSink(Vec::new(), usize::MAX);
            self.p.poll_replication(self.now, &mut out);
            self.b.poll_replication(self.now - self.b_lag, &mut out);
            frames.extend(out.0);
            if frames.is_empty() {
                return;
            }
            let mut next = VecSink(Vec::new(), usize::MAX);
            for f in frames.drain(..) {
                let parsed = Frame::parse(&f).unwrap();
                let dst = RemoteAddr::from_ipv6(parsed.endpoints.dst, NetPrefix::DEFAULT).unwrap();
                let stream = dst.opcode() == Opcode::REPLICATE && !parsed.is_reply();
                match dst.host_id() {
                    h if h == P && !self.rerouted => self.p.handle_frame(&f, self.now, &mut next),
                    h if h == P || h == B => {
                        if !(stream && self.cut) {
                            self.b.handle_frame(&f, self.now - self.b_lag, &mut next);
                        }
                    }
                    _ => self.inbox.push(f),
                }
            }
            frames = next.0;
        }
        panic!("frames still moving after 64 rounds");
    }

    fn request(&mut self, from: Ipv6Addr, dst: RemoteAddr, h: BbRepr, payload: &[u8]) -> Vec<u8> {
        let mut h = h;
        if h.request_id == 0 {
            h.request_id = self.next_id << 7;
            self.next_id += 1;
        }
        let ep = Endpoints {
            src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            src: from,
            dst: dst.to_ipv6(),
            src_port: 40000,
            dst_port: UDP_PORT,
        };
        let mut buf = vec![0u8; 9000];
        let n = build(&mut buf, &ep, &h, payload).unwrap();
        buf.truncate(n);
        buf
    }

    /// Sends a request and returns the replies that came back (for its request id).
    fn call(
        &mut self,
        from: Ipv6Addr,
        dst: RemoteAddr,
        h: BbRepr,
        payload: &[u8],
    ) -> Vec<(BbRepr, RemoteAddr, Vec<u8>)> {
        let f = self.request(from, dst, h, payload);
        let id = Frame::parse(&f).unwrap().header.request_id;
        self.run(vec![f]);
        let mut got = Vec::new();
        self.inbox.retain(|b| {
            let f = Frame::parse(b).unwrap();
            if f.header.request_id == id && f.endpoints.dst == from {
                let src = RemoteAddr::from_ipv6(f.endpoints.src, NetPrefix::DEFAULT).unwrap();
                got.push((f.header, src, f.payload.to_vec()));
                false
            } else {
                true
            }
        });
        got
    }

    fn order(&mut self, op: Opcode, to: HostId, other: u16, epoch: u32) -> Status {
        self.order_at(op, to, other, epoch, 0)
    }

    /// An order with `operand1` (BACKUP: the copy's rate, bytes/s).
    fn order_at(
        &mut self,
        op: Opcode,
        to: HostId,
        other: u16,
        epoch: u32,
        operand1: u64,
    ) -> Status {
        let dst = RemoteAddr::host_op(NetPrefix::DEFAULT, to, op);
        let h = BbRepr {
            operand0: u64::from(other),
            operand1,
            lease: u64::from(epoch),
            ..hdr(0, 0)
        };
        let r = self.call(controller(), dst, h, &[]);
        assert_eq!(r.len(), 1, "{op:?}: {r:?}");
        r[0].0.status
    }

    fn page(&self, handle: PageHandle, op: Opcode) -> RemoteAddr {
        RemoteAddr::new(NetPrefix::DEFAULT, P, handle, op, OpFlags::NONE)
    }

    fn one(&mut self, dst: RemoteAddr, h: BbRepr, payload: &[u8]) -> (BbRepr, RemoteAddr, Vec<u8>) {
        let mut r = self.call(client(), dst, h, payload);
        assert_eq!(r.len(), 1, "{:?}: {r:?}", dst.opcode());
        r.pop().unwrap()
    }

    fn paired() -> Net {
        let mut n = Net::new();
        assert_eq!(n.order(Opcode::REPLICA, B, P.0, 1), Status::OK);
        assert_eq!(n.order(Opcode::BACKUP, P, B.0, 1), Status::OK);
        n
    }
}

fn atomic(offset: u16, operand0: u64) -> BbRepr {
    BbRepr {
        operand0,
        ..hdr(offset, 8)
    }
}

#[test]
fn the_backup_takes_over_with_everything_acknowledged() {
    let mut n = Net::paired();
    let alloc = RemoteAddr::host_op(NetPrefix::DEFAULT, P, Opcode::ALLOC);
    let (h, src, _) = n.one(alloc, hdr(0, 0), &[]);
    assert_eq!(h.status, Status::OK);
    let page = src.handle();
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(
        n.one(n.page(page, Opcode::WRITE), hdr(0, 4096), &data)
            .0
            .status,
        Status::OK
    );
    for _ in 0..5 {
        let (h, ..) = n.one(n.page(page, Opcode::FETCH_ADD), atomic(8, 3), &[]);
        assert_eq!(h.status, Status::OK);
    }
    // A FETCH_ADD whose reply the client never got: its retransmission must get the same
    // reply from whichever holder answers it.
    let lost = BbRepr {
        request_id: 999 << 7 | 5,
        ..atomic(8, 100)
    };
    let (first, ..) = n.one(n.page(page, Opcode::FETCH_ADD), lost, &[]);
    // A page freed: its handle stays stale at the backup.
    let (h, src, _) = n.one(alloc, hdr(0, 0), &[]);
    assert_eq!(h.status, Status::OK);
    let freed = src.handle();
    assert_eq!(
        n.one(n.page(freed, Opcode::FREE), hdr(0, 0), &[]).0.status,
        Status::OK
    );
    let stats = n.p.stats();
    assert!(stats.repl(bluebridge_server::stats::ReplCounter::Frames) > 0);

    // The primary dies; the controller promotes the backup and re-routes P's /48 to it.
    assert_eq!(n.order(Opcode::PROMOTE, B, P.0, 2), Status::OK);
    n.rerouted = true;
    let (h, _, bytes) = n.one(n.page(page, Opcode::READ), hdr(0, 4096), &[]);
    assert_eq!(h.status, Status::OK);
    let mut want = data.clone();
    want[8..16].copy_from_slice(
        &(u64::from_le_bytes(data[8..16].try_into().unwrap()).wrapping_add(115)).to_le_bytes(),
    );
    assert_eq!(bytes, want, "every acknowledged write, at the same handle");
    let (again, src, _) = n.one(n.page(page, Opcode::FETCH_ADD), lost, &[]);
    assert_eq!(
        (again.status, again.operand0),
        (Status::OK, first.operand0),
        "the stored reply travelled"
    );
    assert_eq!(
        src.host_id(),
        P,
        "the backup answers from the page's own address"
    );
    let (h, ..) = n.one(n.page(page, Opcode::FETCH_ADD), atomic(8, 1), &[]);
    assert_eq!(h.operand0, first.operand0 + 100, "the counter goes on");
    assert_eq!(
        n.one(n.page(freed, Opcode::READ), hdr(0, 8), &[]).0.status,
        Status::STALE_HANDLE
    );
    // New pages at the old address keep coming, from the backup.
    let (h, src, _) = n.one(alloc, hdr(0, 0), &[]);
    assert_eq!((h.status, src.host_id()), (Status::OK, P));
    assert_ne!(src.handle(), page);
}

#[test]
fn replies_wait_for_the_backup_and_survive_lost_stream_frames() {
    let mut n = Net::paired();
    let alloc = RemoteAddr::host_op(NetPrefix::DEFAULT, P, Opcode::ALLOC);
    let (_, src, _) = n.one(alloc, hdr(0, 0), &[]);
    let page = src.handle();
    // Cut the stream: the write runs at the primary but is not acknowledged.
    n.cut = true;
    let r = n.call(client(), n.page(page, Opcode::WRITE), hdr(0, 4), b"abcd");
    assert!(r.is_empty(), "acknowledged before the backup had it: {r:?}");
    // A read of the page waits too (it would show what the backup may not have).
    let r = n.call(client(), n.page(page, Opcode::READ), hdr(0, 4), &[]);
    assert!(r.is_empty());
    assert!(
        n.p.stats()
            .repl(bluebridge_server::stats::ReplCounter::Held)
            >= 2
    );
    // The link comes back; the stream is sent again after its timeout and the replies go.
    n.cut = false;
    n.now += 100 * MS;
    n.run(Vec::new());
    let statuses: Vec<_> = n
        .inbox
        .drain(..)
        .map(|b| Frame::parse(&b).unwrap().header.status)
        .collect();
    assert_eq!(statuses, [Status::OK, Status::OK]);
    assert!(
        n.p.stats()
            .repl(bluebridge_server::stats::ReplCounter::Retransmits)
            > 0
    );
    // Promoted, the backup has the write.
    assert_eq!(n.order(Opcode::PROMOTE, B, P.0, 2), Status::OK);
    n.rerouted = true;
    let (h, _, bytes) = n.one(n.page(page, Opcode::READ), hdr(0, 4), &[]);
    assert_eq!((h.status, &bytes[..]), (Status::OK, &b"abcd"[..]));
}

#[test]
fn a_fenced_primary_answers_nothing_more() {
    let mut n = Net::paired();
    let alloc = RemoteAddr::host_op(NetPrefix::DEFAULT, P, Opcode::ALLOC);
    let (_, src, _) = n.one(alloc, hdr(0, 0), &[]);
    let page = src.handle();
    assert_eq!(n.order(Opcode::PROMOTE, B, P.0, 2), Status::OK);
    // The primary was only cut off, not dead: a write reaching it cannot be acknowledged
    // (the backup refuses its stream: FENCED), and from then on it answers nothing.
    let r = n.call(client(), n.page(page, Opcode::WRITE), hdr(0, 4), b"late");
    assert!(r.is_empty(), "a fenced primary acknowledged a write: {r:?}");
    let r = n.call(client(), n.page(page, Opcode::READ), hdr(0, 4), &[]);
    assert!(r.is_empty(), "a fenced primary answered a read: {r:?}");
    assert!(
        n.p.stats()
            .repl(bluebridge_server::stats::ReplCounter::Fenced)
            >= 1
    );
    n.rerouted = true;
    let (h, _, bytes) = n.one(n.page(page, Opcode::READ), hdr(0, 4), &[]);
    assert_eq!(
        (h.status, &bytes[..]),
        (Status::OK, &[0u8; 4][..]),
        "the unacknowledged write is not at the backup"
    );
}

#[test]
fn orders_are_the_controllers() {
    let mut n = Net::new();
    // From a client: FORBIDDEN.
    let dst = RemoteAddr::host_op(NetPrefix::DEFAULT, P, Opcode::BACKUP);
    let h = BbRepr {
        operand0: 3,
        lease: 1,
        ..hdr(0, 0)
    };
    let r = n.call(client(), dst, h, &[]);
    assert_eq!(r[0].0.status, Status::FORBIDDEN);
    // A stream nobody ordered the backup to take is dropped, unanswered.
    assert_eq!(n.order(Opcode::BACKUP, P, B.0, 1), Status::OK);
    let alloc = RemoteAddr::host_op(NetPrefix::DEFAULT, P, Opcode::ALLOC);
    assert!(n.call(client(), alloc, hdr(0, 0), &[]).is_empty());
    assert!(
        n.b.stats()
            .repl(bluebridge_server::stats::ReplCounter::StreamDropped)
            > 0
    );
    // Promoting a host the backup has no replica of: LEASE_EXPIRED.
    assert_eq!(n.order(Opcode::PROMOTE, B, 9, 2), Status::LEASE_EXPIRED);
    // Stopping replication (backup 0) lets held replies go.
    assert_eq!(n.order(Opcode::BACKUP, P, 0, 0), Status::OK);
    n.run(Vec::new());
    assert!(
        n.inbox
            .iter()
            .any(|b| Frame::parse(b).unwrap().header.status == Status::OK)
    );
}

#[test]
fn a_backup_that_joins_later_gets_a_copy_of_everything() {
    use bluebridge_server::stats::ReplCounter;
    let mut n = Net::new();
    let alloc = RemoteAddr::host_op(NetPrefix::DEFAULT, P, Opcode::ALLOC);
    // State before any backup: pages with bytes, a counter, a stored reply, a freed page.
    let mut pages = Vec::new();
    for i in 0..12u8 {
        let (h, src, _) = n.one(alloc, hdr(0, 0), &[]);
        assert_eq!(h.status, Status::OK);
        let page = src.handle();
        assert_eq!(
            n.one(n.page(page, Opcode::WRITE), hdr(0, 4096), &[i; 4096])
                .0
                .status,
            Status::OK
        );
        pages.push((page, vec![i; 4096]));
    }
    let counter = pages[0].0;
    let lost = BbRepr {
        request_id: 777 << 7 | 9,
        ..atomic(8, 40)
    };
    let (first, ..) = n.one(n.page(counter, Opcode::FETCH_ADD), lost, &[]);
    let word = u64::from_le_bytes(pages[0].1[8..16].try_into().unwrap()) + 40;
    pages[0].1[8..16].copy_from_slice(&word.to_le_bytes());
    let (_, src, _) = n.one(alloc, hdr(0, 0), &[]);
    let freed = src.handle();
    assert_eq!(
        n.one(n.page(freed, Opcode::FREE), hdr(0, 0), &[]).0.status,
        Status::OK
    );

    // A backup joins: a copy at 3 pages a second of the clock here, so it takes several
    // turns; meanwhile clients keep writing, replies are not held (the backup is not in
    // step yet), and pages changed before the walk reached them go as they were first.
    assert_eq!(n.order(Opcode::REPLICA, B, P.0, 1), Status::OK);
    assert_eq!(n.order_at(Opcode::BACKUP, P, B.0, 1, 3 * 4200), Status::OK);
    assert!(
        n.p.stats().repl(ReplCounter::CopyTotal) > 0,
        "a copy is under way"
    );
    for (k, i) in [11usize, 10, 3].into_iter().enumerate() {
        let bytes = vec![0xa0 + k as u8; 4096];
        let r = n.one(n.page(pages[i].0, Opcode::WRITE), hdr(0, 4096), &bytes);
        assert_eq!(r.0.status, Status::OK, "not held while copying");
        pages[i].1 = bytes;
        n.now += 300 * MS;
        n.run(Vec::new());
    }
    assert_eq!(
        n.order(Opcode::PROMOTE, B, P.0, 2),
        Status::LEASE_EXPIRED,
        "not in step before every page is there"
    );
    for _ in 0..100 {
        if n.p.stats().repl(ReplCounter::CopyTotal) == 0 {
            break;
        }
        n.now += 300 * MS;
        n.run(Vec::new());
    }
    assert_eq!(
        n.p.stats().repl(ReplCounter::CopyTotal),
        0,
        "the copy ended"
    );
    // In step: a write now waits for the backup again.
    n.cut = true;
    let r = n.call(
        client(),
        n.page(pages[5].0, Opcode::WRITE),
        hdr(0, 4),
        b"held",
    );
    assert!(r.is_empty(), "in step, replies wait for the backup: {r:?}");
    n.cut = false;
    n.now += 100 * MS;
    n.run(Vec::new());
    assert_eq!(n.inbox.drain(..).count(), 1);
    pages[5].1[..4].copy_from_slice(b"held");

    assert_eq!(n.order(Opcode::PROMOTE, B, P.0, 2), Status::OK);
    n.rerouted = true;
    for (i, (page, want)) in pages.iter().enumerate() {
        let (h, _, bytes) = n.one(n.page(*page, Opcode::READ), hdr(0, 4096), &[]);
        assert_eq!(h.status, Status::OK, "page {i}");
        assert_eq!(&bytes, want, "page {i}");
    }
    let (again, ..) = n.one(n.page(counter, Opcode::FETCH_ADD), lost, &[]);
    assert_eq!(
        again.operand0, first.operand0,
        "the stored reply came in the snapshot"
    );
    assert_eq!(
        n.one(n.page(freed, Opcode::READ), hdr(0, 8), &[]).0.status,
        Status::STALE_HANDLE
    );
}

/// A twin runs on its primary's clock, which is not its server's: what it hears must not make
/// the server's own clients look silent (a stamp from "the future" reads as ancient, and their
/// pages were reclaimed while they used them).
#[test]
fn a_replica_on_another_clock_leaves_its_servers_own_owners_alone() {
    let mut n = Net::new();
    n.b_lag = 600_000 * MS; // the backup started ten minutes after the primary
    n.now += n.b_lag;
    let alloc_b = RemoteAddr::host_op(NetPrefix::DEFAULT, B, Opcode::ALLOC);
    let (h, src, _) = n.one(alloc_b, hdr(0, 0), &[]);
    assert_eq!((h.status, src.host_id()), (Status::OK, B));
    let own = src.handle();
    assert_eq!(n.order(Opcode::REPLICA, B, P.0, 1), Status::OK);
    assert_eq!(n.order(Opcode::BACKUP, P, B.0, 1), Status::OK);
    // The same client uses the primary: its twin at the backup hears it at the primary's time.
    let alloc_p = RemoteAddr::host_op(NetPrefix::DEFAULT, P, Opcode::ALLOC);
    for _ in 0..3 {
        assert_eq!(n.one(alloc_p, hdr(0, 0), &[]).0.status, Status::OK);
    }
    for _ in 0..20 {
        n.now += 500 * MS;
        n.b.housekeep(n.now - n.b_lag);
    }
    let page = RemoteAddr::new(NetPrefix::DEFAULT, B, own, Opcode::READ, OpFlags::NONE);
    assert_eq!(
        n.one(page, hdr(0, 8), &[]).0.status,
        Status::OK,
        "the backup's own client's page was reclaimed"
    );
    assert_eq!(n.b.stats().reclaimed, 0);
}

/// Only a server's stream address speaks for its stream: a client inside the primary's /48
/// (its client /64), or any other address there, cannot feed the backup's twin.
#[test]
fn a_stream_from_anywhere_else_in_the_primarys_48_is_dropped() {
    use bluebridge_server::stats::ReplCounter;
    let mut n = Net::new();
    assert_eq!(n.order(Opcode::REPLICA, B, P.0, 1), Status::OK);
    let to = RemoteAddr::new(
        NetPrefix::DEFAULT,
        B,
        PageHandle::with_shard(0, 0),
        Opcode::REPLICATE,
        OpFlags::NONE,
    );
    let h = BbRepr {
        request_id: 1,
        lease: 1,
        ..hdr(0, 0)
    };
    for from in [
        "fd00:bb:2:ffff::1",
        "fd00:bb:2:100:0:0:5:b000",
        "fd00:bb:2::b000",
    ] {
        let f = n.request(from.parse().unwrap(), to, h, &[0; 64]);
        n.run(vec![f]);
    }
    assert_eq!(n.b.stats().repl(ReplCounter::StreamDropped), 3);
    assert_eq!(n.b.stats().repl(ReplCounter::StreamApplied), 0);
    assert!(n.inbox.is_empty(), "nothing is answered");
}
