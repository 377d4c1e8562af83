//! `--metrics ADDR:PORT`: the server's counters as Prometheus metrics.
//!
//! On each scrape the collector reads the shards' counters (atomics each worker writes alone)
//! and the steering program's per-CPU map, exactly as the stats line does: no worker waits
//! for a scrape, and a scrape sees at most a turn-old count. Names and meanings are in
//! docs/running.md ("Prometheus metrics").

use std::sync::Arc;

use bluebridge_ebpf::Steer;
use bluebridge_metrics::Family;
use bluebridge_metrics::prometheus_client::collector::Collector;
use bluebridge_metrics::prometheus_client::encoding::DescriptorEncoder;
use bluebridge_proto::{Opcode, Status};

use crate::hot::{HOT_COUNTERS, HotCounter};
use crate::runtime::{ServerStats, snapshot};
use crate::stats::{HostCounters, MALFORMED_REASONS, REPL_COUNTERS, ReplCounter};

/// Reads a running server's counters on each scrape.
pub(crate) struct ServerCollector {
    pub(crate) counters: Arc<HostCounters>,
    pub(crate) steer: Option<Arc<Steer>>,
}

impl std::fmt::Debug for ServerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCollector")
            .field("shards", &self.counters.len())
            .finish()
    }
}

impl Collector for ServerCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let s = snapshot(&self.counters, self.steer.as_deref());
        encode(&mut Family::new(&mut enc), &s)
    }
}

/// Replication counters that are gauges (the rest count up).
const REPL_GAUGES: [ReplCounter; 4] = [
    ReplCounter::Held,
    ReplCounter::LagBytes,
    ReplCounter::CopyLeft,
    ReplCounter::CopyTotal,
];

/// One series `bluebridge_<name>` per name with its value: a gauge for the indices in
/// `gauges`, a counter for the rest.
fn series(
    f: &mut Family<'_, '_>,
    names: &[&str],
    values: &[u64],
    gauges: &[usize],
    help: &str,
) -> std::fmt::Result {
    for (i, (name, &v)) in names.iter().zip(values).enumerate() {
        let name = format!("bluebridge_{name}");
        if gauges.contains(&i) {
            f.gauge(&name, help, v as f64)?;
        } else {
            f.counter(&name, help, v)?;
        }
    }
    Ok(())
}

fn encode(f: &mut Family<'_, '_>, s: &ServerStats) -> std::fmt::Result {
    let h = &s.handler;
    f.counters(
        "bluebridge_requests",
        "Requests handled, valid or answered with an error, by opcode.",
        Opcode::ALL
            .iter()
            .filter(|op| op.is_request())
            .filter_map(|&op| Some(([("opcode", op.name()?)], h.ops[usize::from(op.0)]))),
    )?;
    f.counters(
        "bluebridge_replies",
        "Replies (and blind writes' outcomes) by status; errors are every status but OK.",
        Status::ALL
            .iter()
            .filter_map(|&st| Some(([("status", st.name()?)], h.replies(st)))),
    )?;
    f.counter(
        "bluebridge_duplicates",
        "Retransmissions answered from the session table, not executed again.",
        h.duplicates,
    )?;
    f.counters(
        "bluebridge_malformed",
        "Frames dropped as malformed, by reason.",
        MALFORMED_REASONS
            .iter()
            .zip(h.malformed)
            .map(|(&r, n)| ([("reason", r)], n)),
    )?;
    f.counters(
        "bluebridge_dropped",
        "Frames dropped unanswered, by reason (malformed ones are bluebridge_malformed).",
        [
            ("not_for_us", h.dropped_not_for_us),
            ("bad_source", h.bad_source),
            ("tx_full", h.tx_dropped),
            ("stale_retransmission", h.stale),
            ("handoff_full", h.handoff_dropped),
        ]
        .map(|(r, n)| ([("reason", r)], n)),
    )?;
    f.counter(
        "bluebridge_handoffs",
        "Frames a shard received for another shard's page and handed to it.",
        h.handoffs,
    )?;
    f.gauge(
        "bluebridge_pages_used",
        "Pages allocated now.",
        h.pages_used as f64,
    )?;
    f.gauge(
        "bluebridge_pages_total",
        "Pages the arena holds.",
        h.pages_total as f64,
    )?;
    f.gauge(
        "bluebridge_leases_held",
        "Update leases granted and not yet committed, released or reclaimed.",
        h.leases_held as f64,
    )?;
    f.gauge(
        "bluebridge_copy_clients",
        "Clients holding live coherent-copy leases.",
        h.copy_clients as f64,
    )?;
    f.counter(
        "bluebridge_copy_grants",
        "Coherent copies granted.",
        h.copy_grants,
    )?;
    f.counter(
        "bluebridge_revokes",
        "REVOKE notices sent to copy holders.",
        h.revokes,
    )?;
    f.counter(
        "bluebridge_recalling",
        "Coherence requests answered RECALLING.",
        h.recalling,
    )?;
    f.counter(
        "bluebridge_reclaimed_pages",
        "Pages freed without a FREE: owners silent past the grace period, or RECLAIM.",
        h.reclaimed,
    )?;
    f.counter(
        "bluebridge_stalls",
        "Gaps over 1 ms between two turns of a worker's loop.",
        h.stalls,
    )?;
    f.gauge(
        "bluebridge_loop_gap_max_seconds",
        "The longest gap between two turns of a worker's loop in its last second.",
        h.loop_gap_max_ns as f64 / 1e9,
    )?;
    f.gauge(
        "bluebridge_stall_longest_seconds",
        "The longest gap between two turns of a worker's loop since the server started.",
        h.stall_longest_ns as f64 / 1e9,
    )?;
    f.counter(
        "bluebridge_priority_fallbacks",
        "Workers starved under SCHED_IDLE that moved to normal priority.",
        h.priority_fallbacks,
    )?;
    f.gauge(
        "bluebridge_zero_copy_shards",
        "Shards whose AF_XDP socket is in zero-copy mode.",
        h.zero_copy as f64,
    )?;
    let gauges = REPL_GAUGES.map(|g| g as usize);
    let help = "Replication (docs/protocol.md §5.19); see docs/running.md.";
    series(f, &REPL_COUNTERS, &h.repl, &gauges, help)?;
    f.counters(
        "bluebridge_shard_requests",
        "Requests handled, by shard (worker).",
        s.shards
            .iter()
            .enumerate()
            .map(|(i, sh)| ([("shard", i.to_string())], sh.requests)),
    )?;
    f.gauges(
        "bluebridge_shard_pages_used",
        "Pages allocated now, by shard.",
        s.shards
            .iter()
            .enumerate()
            .map(|(i, sh)| ([("shard", i.to_string())], sh.pages_used as f64)),
    )?;
    let st = &s.steer;
    f.counters(
        "bluebridge_xdp_steer_frames",
        "The steering XDP program's verdicts: redirected to a worker's socket, passed to the \
         kernel (by reason), dropped (by reason), bounced (--xdp-bounce).",
        [
            ("redirected", st.redirected),
            ("pass_not_ipv6", st.pass_not_ipv6),
            ("pass_not_udp", st.pass_not_udp),
            ("pass_other_port", st.pass_port),
            ("pass_other_prefix", st.pass_prefix),
            ("pass_malformed", st.malformed),
            ("pass_no_socket", st.no_socket),
            ("drop_bad_source", st.dropped_source),
            ("drop_other_mac", st.dropped_mac),
            ("bounced", st.bounced),
        ]
        .map(|(v, n)| ([("verdict", v)], n)),
    )?;
    f.counters(
        "bluebridge_xdp_fast_reads",
        "INLINE READs by what the XDP program did with them: served from the hot-page store, \
         missed (page not there), torn (slot changing), passed (left to a worker).",
        [
            ("served", st.fast_served),
            ("missed", st.fast_missed),
            ("torn", st.fast_torn),
            ("passed", st.fast_passed),
        ]
        .map(|(v, n)| ([("outcome", v)], n)),
    )?;
    let help = "The XDP hot-page store (docs/running.md \"Hot pages in XDP\").";
    series(
        f,
        &HOT_COUNTERS,
        &h.hot,
        &[HotCounter::Pages as usize],
        help,
    )?;
    let x = &s.xsk;
    f.counters(
        "bluebridge_xsk_frames",
        "AF_XDP sockets, summed over workers: frames received and sent, and frames lost \
         (by where).",
        [
            ("rx", x.rx_frames),
            ("tx", x.tx_frames),
            ("tx_dropped", x.tx_dropped),
            ("rx_oversize", x.rx_oversize),
            ("kernel_rx_dropped", x.kernel_rx_dropped),
            ("kernel_rx_ring_full", x.kernel_rx_ring_full),
        ]
        .map(|(v, n)| ([("kind", v)], n)),
    )?;
    f.counters(
        "bluebridge_xsk_events",
        "AF_XDP sockets, summed over workers: wake-up system calls, fill-ring waits, TX \
         back-pressure.",
        [
            ("tx_kicks", x.tx_kicks),
            ("rx_kicks", x.rx_kicks),
            ("fill_deferred", x.fill_deferred),
            ("kernel_fill_ring_empty", x.kernel_fill_ring_empty),
            ("tx_backpressure", x.tx_backpressure),
        ]
        .map(|(v, n)| ([("kind", v)], n)),
    )
}
