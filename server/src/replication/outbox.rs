//! The primary's side of a replication stream: records appended as the shard runs requests,
//! cut into REPLICATE frames, sent in order, retransmitted until the backup acknowledges them
//! (go-back-N: the backup applies frames in order only), and the replies that depend on them
//! held until it has.

use std::collections::VecDeque;
use std::net::Ipv6Addr;

use bluebridge_proto::frame::{Endpoints, FrameSink};
use bluebridge_proto::replication::{REQUEST, REQUEST_PREFIX, Record};
use bluebridge_proto::wire::header::{BbPacket, HEADER_LEN};
use bluebridge_proto::{BbRepr, HostId, NetPrefix, OpFlags, Opcode, PageHandle, RemoteAddr};

use super::Target;

/// Stream bytes not yet acknowledged beyond which the shard takes no request that must be
/// replicated (it drops them, counted: the clients retransmit).
pub const WINDOW_BYTES: u64 = 8 << 20;
/// The same while a stream copies a shard's state to a new backup: requests are not held then,
/// so the stream may run further ahead.
pub const COPY_WINDOW_BYTES: u64 = 64 << 20;
/// The background copy of pages adds to the stream only while less than this is
/// unacknowledged, so the requests' own records never wait behind a long queue of pages.
const COPY_AHEAD_BYTES: u64 = 2 << 20;
/// The copy's pace when the order names none: 256 MiB/s.
pub const DEFAULT_COPY_RATE: u64 = 256 << 20;
/// Frames in flight at most.
const MAX_UNACKED: usize = 2048;
/// First retransmission timeout; doubled per timeout up to [`RTO_MAX_NS`].
const RTO_MIN_NS: u64 = 2_000_000;
const RTO_MAX_NS: u64 = 64_000_000;

#[derive(Debug)]
struct Sent {
    seq: u64,
    start: u64,
    bytes: Vec<u8>,
}

/// A reply frame held until the stream's first `until` bytes are acknowledged.
#[derive(Debug)]
pub struct Held {
    until: u64,
    ep: Endpoints,
    header: BbRepr,
    payload: Vec<u8>,
}

/// A sink that keeps every frame sent through it, for [`Outbox::hold`].
#[derive(Debug)]
pub struct Capture<'a> {
    /// The frames kept.
    pub frames: &'a mut Vec<Held>,
    /// Buffers to reuse.
    pub spare: &'a mut Vec<Vec<u8>>,
    /// The stream offset they wait for.
    pub until: u64,
}

impl FrameSink for Capture<'_> {
    fn send(&mut self, ep: &Endpoints, header: &BbRepr, payload: &[u8]) -> bool {
        let mut v = self.spare.pop().unwrap_or_default();
        v.clear();
        v.extend_from_slice(payload);
        self.frames.push(Held {
            until: self.until,
            ep: *ep,
            header: *header,
            payload: v,
        });
        true
    }
}

/// One shard's stream to its backup.
#[derive(Debug)]
pub struct Outbox {
    target: Target,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    max_payload: usize,
    /// Appended, not yet cut into frames.
    pending: Vec<u8>,
    /// Stream bytes appended in all.
    appended: u64,
    /// Stream bytes cut into frames.
    framed: u64,
    next_seq: u64,
    unacked: VecDeque<Sent>,
    /// Stream bytes the backup has applied.
    acked: u64,
    rto_ns: u64,
    resend_at_ns: u64,
    fenced: bool,
    held: VecDeque<Held>,
    /// Taken by [`Outbox::capture_parts`] while a request runs.
    captured: Vec<Held>,
    spare: Vec<Vec<u8>>,
    /// Frames sent, retransmissions included.
    pub frames: u64,
    /// Frames sent again after a timeout.
    pub retransmits: u64,
    /// Every acknowledged change is at the backup: from SYNCED on (or from the start, for a
    /// stream of a shard's first state). Before, replies are not held.
    synced: bool,
    /// The copy's tokens (bytes it may still send now) and when they were last topped up.
    tokens: f64,
    topped_ns: u64,
}

impl Outbox {
    /// A stream from shard `shard` (its handles' shard field) of host `me` to `target`,
    /// frames of at most `max_payload` bytes of records.
    pub fn new(
        prefix: NetPrefix,
        me: HostId,
        shard: usize,
        target: Target,
        max_payload: usize,
    ) -> Self {
        let field = PageHandle::with_shard(shard as u8, 0);
        let at = |host| RemoteAddr::new(prefix, host, field, Opcode::REPLICATE, OpFlags::NONE);
        Outbox {
            target,
            src: at(me).to_ipv6(),
            dst: at(target.host).to_ipv6(),
            max_payload: max_payload.max(64),
            pending: Vec::new(),
            appended: 0,
            framed: 0,
            next_seq: 1,
            unacked: VecDeque::new(),
            acked: 0,
            rto_ns: RTO_MIN_NS,
            resend_at_ns: 0,
            fenced: false,
            held: VecDeque::new(),
            captured: Vec::new(),
            spare: Vec::new(),
            frames: 0,
            retransmits: 0,
            synced: true,
            tokens: 0.0,
            topped_ns: 0,
        }
    }

    /// Whether frames are out and not acknowledged (or replies held, or records not yet sent).
    pub fn waiting(&self) -> bool {
        !self.unacked.is_empty() || !self.held.is_empty() || !self.pending.is_empty()
    }

    /// The stream copies the shard's state first: replies are not held until
    /// [`Outbox::set_synced`].
    pub fn start_copy(&mut self) {
        self.synced = false;
    }

    /// SYNCED is in the stream: from here on every reply waits for the backup.
    pub fn set_synced(&mut self) {
        self.synced = true;
    }

    /// Whether replies wait for the backup (see [`Outbox::start_copy`]).
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// Whether the background copy may add one more page of `len` bytes now: within the
    /// order's rate, and not far ahead of the backup.
    pub fn copy_budget(&mut self, now_ns: u64, len: usize) -> bool {
        let rate = match self.target.rate {
            0 => DEFAULT_COPY_RATE,
            r => r,
        } as f64;
        let dt = now_ns.saturating_sub(self.topped_ns) as f64 / 1e9;
        self.topped_ns = now_ns;
        // A burst of at most 64 pages' worth.
        self.tokens = (self.tokens + dt * rate).min(64.0 * 4096.0 + len as f64);
        if self.tokens < len as f64 || self.lag_bytes() >= COPY_AHEAD_BYTES {
            return false;
        }
        self.tokens -= len as f64;
        true
    }

    /// Where it goes.
    pub fn target(&self) -> Target {
        self.target
    }

    /// Whether the backup said the stream's epoch is over: the pages are someone else's.
    pub fn fenced(&self) -> bool {
        self.fenced
    }

    /// Whether another record may be appended (the bytes not yet acknowledged are within the
    /// window).
    pub fn has_room(&self) -> bool {
        let window = if self.synced {
            WINDOW_BYTES
        } else {
            COPY_WINDOW_BYTES
        };
        self.appended - self.acked < window && !self.fenced
    }

    /// Stream bytes appended and not yet acknowledged.
    pub fn lag_bytes(&self) -> u64 {
        self.appended - self.acked
    }

    /// Replies held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Appends a record; returns the stream offset at its end.
    pub fn append(&mut self, r: &Record<'_>) -> u64 {
        let at = self.pending.len();
        self.pending.resize(at + r.len(), 0);
        r.emit(&mut self.pending[at..]);
        self.appended += r.len() as u64;
        self.appended
    }

    /// Appends the REQUEST record of a request run at `now_ns`: its endpoints, header and
    /// payload (in one or two pieces). Returns the stream offset at its end.
    pub fn append_request(
        &mut self,
        now_ns: u64,
        ep: &Endpoints,
        header: &BbRepr,
        payload: &[u8],
        tail: &[u8],
    ) -> u64 {
        let head = Record::Request {
            now_ns,
            endpoints: *ep,
            message: &[],
        };
        let at = self.pending.len();
        let n = head.len() + HEADER_LEN + payload.len() + tail.len();
        self.pending.resize(at + head.len(), 0);
        head.emit(&mut self.pending[at..]);
        // The length covers the message too.
        let body = (n - 4) as u32;
        self.pending[at..at + 4].copy_from_slice(&body.to_be_bytes());
        debug_assert_eq!(self.pending[at + 4], REQUEST);
        debug_assert_eq!(head.len(), 5 + REQUEST_PREFIX);
        let h_at = self.pending.len();
        self.pending.resize(h_at + HEADER_LEN, 0);
        header.emit(&mut BbPacket::new_unchecked(&mut self.pending[h_at..]));
        self.pending.extend_from_slice(payload);
        self.pending.extend_from_slice(tail);
        self.appended += n as u64;
        self.appended
    }

    /// Whether replies must wait: the stream is in step and records are not yet acknowledged.
    pub fn behind(&self) -> bool {
        self.synced && self.acked < self.appended
    }

    /// The offset replies of the request just appended wait for.
    pub fn appended(&self) -> u64 {
        self.appended
    }

    /// What a [`Capture`] needs, taken out of the outbox while a request runs (give them back
    /// with [`Outbox::hold`]).
    pub fn capture_parts(&mut self) -> (Vec<Held>, Vec<Vec<u8>>) {
        (
            std::mem::take(&mut self.captured),
            std::mem::take(&mut self.spare),
        )
    }

    /// Holds the frames a [`Capture`] kept (they go out once the backup has what they wait
    /// for), and takes the buffers back.
    pub fn hold(&mut self, mut frames: Vec<Held>, spare: Vec<Vec<u8>>) {
        self.spare = spare;
        self.held.extend(frames.drain(..));
        self.captured = frames;
    }

    /// Gives up waiting for the backup (the controller stopped the stream): everything
    /// appended counts as acknowledged, so what was held goes out.
    pub fn release_all(&mut self) {
        self.acked = self.appended;
        self.pending.clear();
        self.spare.extend(self.unacked.drain(..).map(|s| s.bytes));
    }

    /// The backup acknowledged every frame up to `seq` (or said FENCED).
    pub fn on_ack(&mut self, seq: u64, fenced: bool, now_ns: u64) {
        if fenced {
            if !self.fenced {
                tracing::warn!(backup = %self.target.host, epoch = self.target.epoch, "replication stream fenced: another server holds these pages now");
            }
            self.fenced = true;
            return;
        }
        let mut moved = false;
        while let Some(f) = self.unacked.front() {
            if f.seq > seq {
                break;
            }
            let f = self.unacked.pop_front().expect("front");
            self.acked = f.start + f.bytes.len() as u64;
            self.spare.push(f.bytes);
            moved = true;
        }
        if moved {
            self.rto_ns = RTO_MIN_NS;
            self.resend_at_ns = now_ns + self.rto_ns;
        }
    }

    /// Sends what is due: new frames (within the window), everything unacknowledged again
    /// after a timeout, and the held replies whose records the backup has. Returns frames
    /// sent.
    pub fn poll(&mut self, now_ns: u64, sink: &mut impl FrameSink) -> usize {
        if self.fenced {
            // Nothing it held may go out: the backup never took it.
            self.spare.extend(self.held.drain(..).map(|h| h.payload));
            self.pending.clear();
            return 0;
        }
        let mut n = 0;
        if !self.unacked.is_empty() && now_ns >= self.resend_at_ns {
            for i in 0..self.unacked.len() {
                let (seq, start) = (self.unacked[i].seq, self.unacked[i].start);
                let bytes = std::mem::take(&mut self.unacked[i].bytes);
                let ok = self.send_frame(seq, start, &bytes, sink);
                self.unacked[i].bytes = bytes;
                if !ok {
                    break;
                }
                self.retransmits += 1;
                n += 1;
            }
            self.rto_ns = (self.rto_ns * 2).min(RTO_MAX_NS);
            self.resend_at_ns = now_ns + self.rto_ns;
        }
        while !self.pending.is_empty() && self.unacked.len() < MAX_UNACKED {
            let take = self.pending.len().min(self.max_payload);
            let mut bytes = self.spare.pop().unwrap_or_default();
            bytes.clear();
            bytes.extend_from_slice(&self.pending[..take]);
            let (seq, start) = (self.next_seq, self.framed);
            if !self.send_frame(seq, start, &bytes, sink) {
                self.spare.push(bytes);
                break;
            }
            self.pending.drain(..take);
            self.next_seq += 1;
            self.framed += take as u64;
            if self.unacked.is_empty() {
                self.resend_at_ns = now_ns + self.rto_ns;
            }
            self.unacked.push_back(Sent { seq, start, bytes });
            n += 1;
        }
        while let Some(h) = self.held.front() {
            if h.until > self.acked || !sink.send(&h.ep, &h.header, &h.payload) {
                break;
            }
            let h = self.held.pop_front().expect("front");
            self.spare.push(h.payload);
        }
        n
    }

    fn send_frame(
        &mut self,
        seq: u64,
        start: u64,
        bytes: &[u8],
        sink: &mut impl FrameSink,
    ) -> bool {
        let ep = Endpoints {
            src_mac: self.target.own_mac,
            dst_mac: self.target.next_hop,
            src: self.src,
            dst: self.dst,
            src_port: bluebridge_proto::UDP_PORT,
            dst_port: bluebridge_proto::UDP_PORT,
        };
        let h = BbRepr {
            count: 1,
            request_id: seq,
            lease: u64::from(self.target.epoch),
            operand0: start,
            ..BbRepr::default()
        };
        let ok = sink.send(&ep, &h, bytes);
        self.frames += u64::from(ok);
        ok
    }
}
