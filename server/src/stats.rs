//! Counters of a handler: requests by opcode, replies by status, drops by reason.

use bluebridge_proto::frame::FrameError;
use bluebridge_proto::{Opcode, Status};

/// Why frames were dropped as malformed.
pub const MALFORMED_REASONS: [&str; 9] = [
    "truncated",
    "bad_length",
    "not_ipv6",
    "bad_ip_version",
    "not_udp",
    "wrong_port",
    "bad_checksum",
    "unsupported_version",
    "other",
];

const STATUS_SLOTS: usize = 18;

/// The counters. Plain numbers: a worker owns its handler, a reader takes a copy.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Requests handled (valid or answered with an error).
    pub requests: u64,
    /// Requests by opcode byte.
    pub ops: [u64; 256],
    /// Replies (and blind writes' outcomes) by status; the last slot counts unknown values.
    pub statuses: [u64; STATUS_SLOTS],
    /// Retransmissions answered from the duplicate table.
    pub duplicates: u64,
    /// Frames dropped as malformed, by [`MALFORMED_REASONS`].
    pub malformed: [u64; MALFORMED_REASONS.len()],
    /// Valid frames not meant for this server (replies, other prefixes or hosts).
    pub dropped_not_for_us: u64,
    /// Replies that found no room to be sent.
    pub tx_dropped: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            requests: 0,
            ops: [0; 256],
            statuses: [0; STATUS_SLOTS],
            duplicates: 0,
            malformed: [0; MALFORMED_REASONS.len()],
            dropped_not_for_us: 0,
            tx_dropped: 0,
        }
    }
}

impl Stats {
    pub(crate) fn count_reply(&mut self, st: Status) {
        let i = usize::from(st.0).min(STATUS_SLOTS - 1);
        self.statuses[i] += 1;
    }

    pub(crate) fn count_malformed(&mut self, e: FrameError) {
        let i = match e {
            FrameError::Truncated(_) => 0,
            FrameError::BadLength(_) => 1,
            FrameError::NotIpv6(_) => 2,
            FrameError::BadIpVersion(_) => 3,
            FrameError::NotUdp(_) => 4,
            FrameError::WrongPort(..) => 5,
            FrameError::BadChecksum => 6,
            FrameError::UnsupportedVersion(_) => 7,
            _ => 8,
        };
        self.malformed[i] += 1;
    }

    /// Replies with a status other than OK.
    pub fn errors(&self) -> u64 {
        self.statuses[1..].iter().sum()
    }

    /// Replies with `st`.
    pub fn replies(&self, st: Status) -> u64 {
        self.statuses[usize::from(st.0).min(STATUS_SLOTS - 1)]
    }

    /// Malformed frames, all reasons.
    pub fn malformed_total(&self) -> u64 {
        self.malformed.iter().sum()
    }

    /// Adds another handler's counters (for a total over workers).
    pub fn add(&mut self, o: &Stats) {
        self.requests += o.requests;
        self.duplicates += o.duplicates;
        self.dropped_not_for_us += o.dropped_not_for_us;
        self.tx_dropped += o.tx_dropped;
        self.ops.iter_mut().zip(o.ops).for_each(|(a, b)| *a += b);
        self.statuses
            .iter_mut()
            .zip(o.statuses)
            .for_each(|(a, b)| *a += b);
        self.malformed
            .iter_mut()
            .zip(o.malformed)
            .for_each(|(a, b)| *a += b);
    }

    /// Opcodes with a non-zero count, by name.
    pub fn ops_by_name(&self) -> impl Iterator<Item = (Opcode, u64)> + '_ {
        self.ops
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (Opcode(i as u8), *n))
    }

    /// Statuses other than OK with a non-zero count.
    pub fn errors_by_status(&self) -> impl Iterator<Item = (Status, u64)> + '_ {
        self.statuses
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (Status(i as u16), *n))
    }
}
