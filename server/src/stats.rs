//! Counters: requests by opcode, replies by status, drops by reason, per shard.
//!
//! Each shard writes its own [`ShardCounters`] (single writer: a plain load and store per
//! increment, no locked instruction, no cache line shared with another writer); anyone may
//! read them at any time without stopping the worker, and [`HostCounters::total`] sums the
//! shards. [`Stats`] is a plain snapshot.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bluebridge_proto::frame::FrameError;
use bluebridge_proto::{Opcode, Status};
use bluebridge_xsk::XskStats;

use crate::hot::HOT_COUNTERS;

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

const STATUS_SLOTS: usize = 22;

/// Replication's counters (docs/protocol.md §5.19), in [`Stats::repl`] and
/// [`ShardCounters::repl`] by this index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplCounter {
    /// Stream frames sent to the backup, retransmissions included.
    Frames,
    /// Stream frames sent again after a timeout.
    Retransmits,
    /// Requests dropped because the stream's window was full (the client retransmits).
    WindowFull,
    /// Replies held now, waiting for the backup (a gauge).
    Held,
    /// Stream bytes not yet acknowledged by the backup (a gauge).
    LagBytes,
    /// Requests dropped because the stream was fenced (another server holds the pages).
    Fenced,
    /// Stream frames taken as a backup (acknowledged, duplicates included).
    StreamApplied,
    /// Stream frames (or acknowledgements) dropped: not ordered by the controller, not of
    /// this shard, from outside the prefix.
    StreamDropped,
    /// Pages of a copy to a new backup not yet sent (a gauge).
    CopyLeft,
    /// Pages of that copy in all (a gauge; 0: no copy under way).
    CopyTotal,
}

/// The names of [`ReplCounter`]s, in order.
pub const REPL_COUNTERS: [&str; 10] = [
    "repl_frames",
    "repl_retransmits",
    "repl_window_full",
    "repl_held",
    "repl_lag_bytes",
    "repl_fenced",
    "replica_frames",
    "replica_dropped",
    "repl_copy_left",
    "repl_copy_total",
];

/// A snapshot of counters (one shard's, or summed over shards).
#[derive(Debug, Clone)]
pub struct Stats {
    /// Requests handled (valid or answered with an error).
    pub requests: u64,
    /// Requests by opcode byte.
    pub ops: [u64; 256],
    /// Replies (and blind writes' outcomes) by status; the last slot counts unknown values.
    pub statuses: [u64; STATUS_SLOTS],
    /// Retransmissions answered from the session table.
    pub duplicates: u64,
    /// Frames dropped as malformed, by [`MALFORMED_REASONS`].
    pub malformed: [u64; MALFORMED_REASONS.len()],
    /// Valid frames not meant for this server (replies, other prefixes or hosts).
    pub dropped_not_for_us: u64,
    /// Requests from a source nobody may be answered at (§9): outside the deployment prefix,
    /// one of this server's own addresses, multicast, loopback, unspecified, or a multicast MAC.
    pub bad_source: u64,
    /// Replies that found no room to be sent.
    pub tx_dropped: u64,
    /// Old retransmissions of requests their client had finished with: dropped unexecuted.
    pub stale: u64,
    /// Frames this shard received for a page of another shard and handed to it.
    pub handoffs: u64,
    /// Frames for another shard dropped because its hand-off ring was full (the client
    /// retransmits).
    pub handoff_dropped: u64,
    /// Pages freed without a FREE: of owners silent past the grace period, or by RECLAIM.
    pub reclaimed: u64,
    /// Coherent copies granted (§5.18).
    pub copy_grants: u64,
    /// REVOKE notices sent to copy holders.
    pub revokes: u64,
    /// Coherence requests answered RECALLING.
    pub recalling: u64,
    /// Clients holding live copy leases (a gauge).
    pub copy_clients: u64,
    /// Workers that a CPU-bound neighbour starved under SCHED_IDLE and that moved to normal
    /// priority.
    pub priority_fallbacks: u64,
    /// Pages allocated now.
    pub pages_used: u64,
    /// Pages the arena holds.
    pub pages_total: u64,
    /// Leases granted and not yet committed, released or reclaimed.
    pub leases_held: u64,
    /// Shards whose AF_XDP socket is in zero-copy mode.
    pub zero_copy: u64,
    /// The longest gap between two turns of a worker's loop in its last second, ns (over
    /// shards: the longest): how long the worker was kept off its CPU or stuck.
    pub loop_gap_max_ns: u64,
    /// Gaps between two turns of a worker's loop longer than [`STALL_NS`] (a noisy neighbour,
    /// a starved SCHED_IDLE worker, a kernel thread on its core).
    pub stalls: u64,
    /// The longest of those gaps since the server started, ns (over shards: the longest): a
    /// request that arrived then waited this long for its answer.
    pub stall_longest_ns: u64,
    /// Replication, by [`ReplCounter`].
    pub repl: [u64; REPL_COUNTERS.len()],
    /// The XDP hot-page store, by [`HotCounter`](crate::hot::HotCounter).
    pub hot: [u64; HOT_COUNTERS.len()],
}

/// A gap in a worker's loop longer than this counts as a stall (1 ms).
pub const STALL_NS: u64 = 1_000_000;

/// Measures a worker's loop: call [`StallMeter::tick`] once per turn, and
/// [`StallMeter::pause`] / [`StallMeter::resume`] around a sleep on purpose (idle mode), so
/// sleeps are not stalls. Each turn is also published as [`ShardCounters::last_turn_ns`] for
/// the priority watchdog.
#[derive(Debug)]
pub(crate) struct StallMeter {
    /// When the server started: `last_turn_ns` counts from it.
    started: std::time::Instant,
    last: std::time::Instant,
    window_start: std::time::Instant,
    window_max: u64,
}

impl StallMeter {
    pub(crate) fn new(started: std::time::Instant) -> Self {
        let now = std::time::Instant::now();
        StallMeter {
            started,
            last: now,
            window_start: now,
            window_max: 0,
        }
    }

    /// Publishes `now` as the worker's last turn.
    #[inline]
    fn publish(&self, c: &ShardCounters, now: std::time::Instant) {
        c.last_turn_ns
            .set(now.duration_since(self.started).as_nanos() as u64);
    }

    #[inline]
    pub(crate) fn tick(&mut self, c: &ShardCounters) {
        let now = std::time::Instant::now();
        let gap = now.duration_since(self.last).as_nanos() as u64;
        self.last = now;
        self.publish(c, now);
        if gap > STALL_NS {
            c.stalls.inc();
            if gap > c.stall_longest_ns.get() {
                c.stall_longest_ns.set(gap);
            }
        }
        self.window_max = self.window_max.max(gap);
        if now.duration_since(self.window_start) >= std::time::Duration::from_secs(1) {
            c.loop_gap_max_ns.set(self.window_max);
            self.window_max = 0;
            self.window_start = now;
        }
    }

    /// The worker is going to sleep on purpose: not a turn the watchdog should wait for.
    pub(crate) fn pause(&self, c: &ShardCounters) {
        c.last_turn_ns.set(u64::MAX);
    }

    /// The worker woke from a sleep on purpose.
    pub(crate) fn resume(&mut self, c: &ShardCounters) {
        self.last = std::time::Instant::now();
        self.publish(c, self.last);
    }
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
            bad_source: 0,
            tx_dropped: 0,
            stale: 0,
            handoffs: 0,
            handoff_dropped: 0,
            reclaimed: 0,
            copy_grants: 0,
            revokes: 0,
            recalling: 0,
            copy_clients: 0,
            priority_fallbacks: 0,
            pages_used: 0,
            pages_total: 0,
            leases_held: 0,
            zero_copy: 0,
            loop_gap_max_ns: 0,
            stalls: 0,
            stall_longest_ns: 0,
            repl: [0; REPL_COUNTERS.len()],
            hot: [0; HOT_COUNTERS.len()],
        }
    }
}

impl Stats {
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

    /// Adds another shard's counters (for a total over shards).
    pub fn add(&mut self, o: &Stats) {
        self.requests += o.requests;
        self.duplicates += o.duplicates;
        self.dropped_not_for_us += o.dropped_not_for_us;
        self.bad_source += o.bad_source;
        self.tx_dropped += o.tx_dropped;
        self.stale += o.stale;
        self.handoffs += o.handoffs;
        self.handoff_dropped += o.handoff_dropped;
        self.reclaimed += o.reclaimed;
        self.copy_grants += o.copy_grants;
        self.revokes += o.revokes;
        self.recalling += o.recalling;
        self.copy_clients += o.copy_clients;
        self.priority_fallbacks += o.priority_fallbacks;
        self.pages_used += o.pages_used;
        self.pages_total += o.pages_total;
        self.leases_held += o.leases_held;
        self.zero_copy += o.zero_copy;
        self.loop_gap_max_ns = self.loop_gap_max_ns.max(o.loop_gap_max_ns);
        self.stalls += o.stalls;
        self.stall_longest_ns = self.stall_longest_ns.max(o.stall_longest_ns);
        self.ops.iter_mut().zip(o.ops).for_each(|(a, b)| *a += b);
        self.statuses
            .iter_mut()
            .zip(o.statuses)
            .for_each(|(a, b)| *a += b);
        self.malformed
            .iter_mut()
            .zip(o.malformed)
            .for_each(|(a, b)| *a += b);
        self.repl.iter_mut().zip(o.repl).for_each(|(a, b)| *a += b);
        self.hot.iter_mut().zip(o.hot).for_each(|(a, b)| *a += b);
    }

    /// A hot-page store counter.
    pub fn hot(&self, c: crate::hot::HotCounter) -> u64 {
        self.hot[c as usize]
    }

    /// A replication counter.
    pub fn repl(&self, c: ReplCounter) -> u64 {
        self.repl[c as usize]
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

/// A counter with one writer and any number of readers.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the counter's one writer may call this: it is a load and a store, not
    /// an atomic read-modify-write (Relaxed: readers want a recent value, not an ordering).
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Adds 1 (single writer, as [`Counter::add`]).
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// Subtracts 1 (single writer, as [`Counter::add`]).
    #[inline]
    pub fn dec(&self) {
        self.0.store(self.0.load(Relaxed).wrapping_sub(1), Relaxed);
    }

    /// Sets the value (single writer).
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }

    /// The current value.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

fn counters<const N: usize>() -> [Counter; N] {
    std::array::from_fn(|_| Counter::default())
}

fn read<const N: usize>(c: &[Counter; N]) -> [u64; N] {
    std::array::from_fn(|i| c[i].get())
}

/// One shard's counters, written by its worker only. Aligned to keep shards' counters off
/// each other's cache lines.
#[derive(Debug)]
#[repr(align(128))]
pub struct ShardCounters {
    /// Requests handled (valid or answered with an error).
    pub requests: Counter,
    /// Requests by opcode byte.
    pub ops: [Counter; 256],
    /// Replies by status (the last slot: unknown values).
    pub statuses: [Counter; STATUS_SLOTS],
    /// Retransmissions answered from the session table.
    pub duplicates: Counter,
    /// Malformed frames by [`MALFORMED_REASONS`].
    pub malformed: [Counter; MALFORMED_REASONS.len()],
    /// Valid frames not meant for this server.
    pub dropped_not_for_us: Counter,
    /// Requests from a source nobody may be answered at.
    pub bad_source: Counter,
    /// The longest loop gap of the last second, ns (a gauge).
    pub loop_gap_max_ns: Counter,
    /// Loop gaps over [`STALL_NS`].
    pub stalls: Counter,
    /// The longest loop gap since the start, ns.
    pub stall_longest_ns: Counter,
    /// Replies that found no room to be sent.
    pub tx_dropped: Counter,
    /// Old retransmissions dropped unexecuted.
    pub stale: Counter,
    /// Frames handed to another shard.
    pub handoffs: Counter,
    /// Frames for another shard dropped on a full ring.
    pub handoff_dropped: Counter,
    /// Pages freed without a FREE (silent owners, RECLAIM).
    pub reclaimed: Counter,
    /// Coherent copies granted.
    pub copy_grants: Counter,
    /// REVOKE notices sent.
    pub revokes: Counter,
    /// Coherence requests answered RECALLING.
    pub recalling: Counter,
    /// Clients holding live copy leases (a gauge).
    pub copy_clients: Counter,
    /// Set to 1 when the watchdog moved the starved worker out of SCHED_IDLE.
    pub priority_fallbacks: Counter,
    /// The worker's Linux thread id (for the priority watchdog).
    pub tid: Counter,
    /// When the worker last turned its loop, ns since the server started; `u64::MAX` while
    /// it sleeps on purpose.
    pub last_turn_ns: Counter,
    /// Pages allocated now.
    pub pages_used: Counter,
    /// Pages the shard's arena holds.
    pub pages_total: Counter,
    /// Leases granted and not yet ended.
    pub leases_held: Counter,
    /// 1 if the shard's AF_XDP socket is in zero-copy mode.
    pub zero_copy: Counter,
    /// The shard's socket counters, as its worker last published them.
    pub xsk: [Counter; XskStats::LEN],
    /// Replication, by [`ReplCounter`].
    pub repl: [Counter; REPL_COUNTERS.len()],
    /// The XDP hot-page store, by [`HotCounter`](crate::hot::HotCounter) (published by
    /// the worker every 100 ms).
    pub hot: [Counter; HOT_COUNTERS.len()],
}

impl Default for ShardCounters {
    fn default() -> Self {
        ShardCounters {
            requests: Counter::default(),
            ops: counters(),
            statuses: counters(),
            duplicates: Counter::default(),
            malformed: counters(),
            dropped_not_for_us: Counter::default(),
            bad_source: Counter::default(),
            loop_gap_max_ns: Counter::default(),
            stalls: Counter::default(),
            stall_longest_ns: Counter::default(),
            tx_dropped: Counter::default(),
            stale: Counter::default(),
            handoffs: Counter::default(),
            handoff_dropped: Counter::default(),
            reclaimed: Counter::default(),
            copy_grants: Counter::default(),
            revokes: Counter::default(),
            recalling: Counter::default(),
            copy_clients: Counter::default(),
            priority_fallbacks: Counter::default(),
            tid: Counter::default(),
            last_turn_ns: Counter::default(),
            pages_used: Counter::default(),
            pages_total: Counter::default(),
            leases_held: Counter::default(),
            zero_copy: Counter::default(),
            xsk: counters(),
            repl: counters(),
            hot: counters(),
        }
    }
}

impl ShardCounters {
    pub(crate) fn count_reply(&self, st: Status) {
        self.statuses[usize::from(st.0).min(STATUS_SLOTS - 1)].inc();
    }

    pub(crate) fn count_malformed(&self, e: FrameError) {
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
        self.malformed[i].inc();
    }

    /// A snapshot.
    pub fn snapshot(&self) -> Stats {
        Stats {
            requests: self.requests.get(),
            ops: read(&self.ops),
            statuses: read(&self.statuses),
            duplicates: self.duplicates.get(),
            malformed: read(&self.malformed),
            dropped_not_for_us: self.dropped_not_for_us.get(),
            bad_source: self.bad_source.get(),
            loop_gap_max_ns: self.loop_gap_max_ns.get(),
            stalls: self.stalls.get(),
            stall_longest_ns: self.stall_longest_ns.get(),
            tx_dropped: self.tx_dropped.get(),
            stale: self.stale.get(),
            handoffs: self.handoffs.get(),
            handoff_dropped: self.handoff_dropped.get(),
            reclaimed: self.reclaimed.get(),
            copy_grants: self.copy_grants.get(),
            revokes: self.revokes.get(),
            recalling: self.recalling.get(),
            copy_clients: self.copy_clients.get(),
            priority_fallbacks: self.priority_fallbacks.get(),
            pages_used: self.pages_used.get(),
            pages_total: self.pages_total.get(),
            leases_held: self.leases_held.get(),
            zero_copy: self.zero_copy.get(),
            repl: read(&self.repl),
            hot: read(&self.hot),
        }
    }

    /// Publishes the shard's socket counters (its worker only).
    pub fn publish_xsk(&self, s: &XskStats) {
        for (c, v) in self.xsk.iter().zip(s.to_array()) {
            c.set(v);
        }
    }

    /// The socket counters last published.
    pub fn xsk(&self) -> XskStats {
        XskStats::from_array(read(&self.xsk))
    }
}

/// The counters of every shard of a server.
#[derive(Debug)]
pub struct HostCounters {
    shards: Box<[ShardCounters]>,
}

impl HostCounters {
    /// Counters for `n` shards, all zero.
    pub fn new(n: usize) -> Self {
        HostCounters {
            shards: (0..n.max(1)).map(|_| ShardCounters::default()).collect(),
        }
    }

    /// Shard `i`'s counters.
    pub fn shard(&self, i: usize) -> &ShardCounters {
        &self.shards[i]
    }

    /// Shards.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Always false: a server has at least one shard.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// Every shard's counters summed.
    pub fn total(&self) -> Stats {
        let mut t = Stats::default();
        for s in self.shards.iter() {
            t.add(&s.snapshot());
        }
        t
    }

    /// Every shard's socket counters summed.
    pub fn xsk_total(&self) -> XskStats {
        let mut t = XskStats::default();
        for s in self.shards.iter() {
            t.add(&s.xsk());
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_in_the_loop_is_a_stall_and_shows_as_the_longest_gap() {
        let c = ShardCounters::default();
        let mut m = StallMeter::new(std::time::Instant::now());
        m.tick(&c);
        m.tick(&c);
        assert_eq!(c.stalls.get(), 0);
        std::thread::sleep(std::time::Duration::from_millis(3));
        m.tick(&c);
        assert_eq!(c.stalls.get(), 1);
        let longest = c.stall_longest_ns.get();
        assert!((3_000_000..1_000_000_000).contains(&longest), "{longest}");
        // A sleep on purpose is not a stall.
        std::thread::sleep(std::time::Duration::from_millis(3));
        m.pause(&c);
        assert_eq!(c.last_turn_ns.get(), u64::MAX);
        m.resume(&c);
        assert_ne!(c.last_turn_ns.get(), u64::MAX);
        m.tick(&c);
        assert_eq!(c.stalls.get(), 1);
        // The longest gap of the window is published once the window (1 s) is over.
        m.window_start -= std::time::Duration::from_secs(2);
        m.tick(&c);
        let g = c.snapshot().loop_gap_max_ns;
        assert!((3_000_000..1_000_000_000).contains(&g), "{g}");
        // The sleep on purpose did not become the longest stall.
        assert_eq!(c.snapshot().stall_longest_ns, longest);
    }
}
