//! `bluebridge-ctl daemon --metrics ADDR:PORT`: the controller's and the switch's counters as
//! Prometheus metrics.
//!
//! Each scrape takes the controller's lock for as long as [`Controller::counters`] reads the
//! forwarding plane (the XDP switch's per-CPU maps; `ovs-ofctl` for Open vSwitch): the switch
//! itself forwards meanwhile, and the controller's network I/O (health checks, migrations)
//! holds the link's lock, not this one.

use std::sync::{Arc, Mutex, PoisonError};

use bluebridge_metrics::Family;
use bluebridge_metrics::prometheus_client::collector::Collector;
use bluebridge_metrics::prometheus_client::encoding::DescriptorEncoder;

use crate::{Controller, Counters, HostStatus, Traffic};

/// Reads the controller on each scrape.
pub struct ControllerCollector {
    ctl: Arc<Mutex<Controller>>,
}

impl ControllerCollector {
    /// Collects from `ctl`.
    pub fn new(ctl: Arc<Mutex<Controller>>) -> Self {
        ControllerCollector { ctl }
    }
}

impl std::fmt::Debug for ControllerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerCollector")
            .finish_non_exhaustive()
    }
}

impl Collector for ControllerCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let (counters, status, failovers, backend) = {
            let c = self.ctl.lock().unwrap_or_else(PoisonError::into_inner);
            (c.counters(), c.status(), c.failovers().len(), c.backend())
        };
        let mut f = Family::new(&mut enc);
        f.gauges(
            "bluebridge_ctl_info",
            "The controller's forwarding backend (value 1).",
            [([("backend", backend)], 1.0)],
        )?;
        f.gauge(
            "bluebridge_ctl_counters_readable",
            "1 if this scrape read the forwarding plane's counters, 0 if it failed (logged).",
            f64::from(u8::from(counters.is_ok())),
        )?;
        hosts(&mut f, &status)?;
        f.counter(
            "bluebridge_ctl_failovers",
            "Failovers: replicated hosts whose backup took their pages over.",
            failovers as u64,
        )?;
        match counters {
            Ok(c) => encode(&mut f, &c),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: reading the switch's counters");
                Ok(())
            }
        }
    }
}

/// Each registered host's state.
fn hosts(f: &mut Family<'_, '_>, status: &[HostStatus]) -> std::fmt::Result {
    let id = |h: &HostStatus| h.id.to_string();
    f.gauges(
        "bluebridge_ctl_host_up",
        "1 if the host answers its health checks, 0 if withdrawn.",
        status
            .iter()
            .map(|h| ([("host", id(h))], f64::from(u8::from(!h.health.down)))),
    )?;
    f.gauges(
        "bluebridge_ctl_host_pages_used",
        "Pages in use on the host at its last health check.",
        status
            .iter()
            .map(|h| ([("host", id(h))], h.health.pages_used as f64)),
    )?;
    f.gauges(
        "bluebridge_ctl_host_pages_total",
        "Pages in the host's arena (0: it never answered).",
        status
            .iter()
            .map(|h| ([("host", id(h))], h.health.pages_total as f64)),
    )?;
    f.gauges(
        "bluebridge_ctl_host_placement",
        "1 for the host that anycast ALLOCs go to now.",
        status
            .iter()
            .map(|h| ([("host", id(h))], f64::from(u8::from(h.placement)))),
    )
}

fn encode(f: &mut Family<'_, '_>, c: &Counters) -> std::fmt::Result {
    let s = &c.switch;
    f.counters(
        "bluebridge_ctl_switch_frames",
        "The switch's verdicts: forwarded, answered UNREACHABLE for a withdrawn host, or \
         dropped (by reason); other traffic passed to the switch's kernel.",
        [
            ("forwarded", s.forwarded),
            ("rejected_unreachable", s.rejected),
            ("drop_no_route", s.no_route),
            ("drop_spoofed", s.spoofed),
            ("drop_malformed", s.malformed),
            ("drop_hop_limit", s.hop_limit),
            ("drop_no_port", s.no_port),
            ("drop_other", s.other_dropped),
            ("pass_other", s.other_passed),
        ]
        .map(|(v, n)| ([("verdict", v)], n)),
    )?;
    f.counter(
        "bluebridge_ctl_freed_reports_lost",
        "Freed-page reports the switch lost because the controller had not drained them.",
        s.freed_lost,
    )?;
    f.counter(
        "bluebridge_ctl_freed_reports_repeated",
        "Freed-page reports of a page already notified (a retransmitted FREE), ignored.",
        c.freed_repeats,
    )?;
    f.counter(
        "bluebridge_ctl_invalidations",
        "Freed pages the controller told the clients about (INVALIDATE).",
        c.invalidations,
    )?;
    f.counter(
        "bluebridge_ctl_migrations",
        "Page migrations finished.",
        c.migrations,
    )?;
    f.counter(
        "bluebridge_ctl_migrations_abandoned",
        "Page migrations given up (the page stayed where it was).",
        c.migrations_abandoned,
    )?;
    let u = &c.route_updates;
    f.counter(
        "bluebridge_ctl_route_update_batches",
        "Batches of route and source-filter changes applied to the forwarding plane.",
        u.batches,
    )?;
    f.counter(
        "bluebridge_ctl_route_update_changes",
        "Route and source-filter changes in those batches.",
        u.changes,
    )?;
    f.counter(
        "bluebridge_ctl_route_update_failures",
        "Batches the forwarding plane refused (logged).",
        u.failed,
    )?;
    f.gauges(
        "bluebridge_ctl_route_update_seconds",
        "Batch latency, first change to applied, over the last 4,096 batches.",
        [("p50", u.p50_us), ("p99", u.p99_us), ("max", u.max_us)]
            .map(|(q, us)| ([("stat", q)], us as f64 / 1e6)),
    )?;
    // Per host: its routes (to its server's and its client's port) and its ports' ingress.
    let per = |pick: fn(&crate::HostCounters) -> (Traffic, Traffic, Traffic, Traffic),
               bytes: bool| {
        c.hosts.iter().flat_map(move |h| {
            let (a, b, x, y) = pick(h);
            let id = h.id.to_string();
            [
                ("route", "server", a),
                ("route", "client", b),
                ("port", "server", x),
                ("port", "client", y),
            ]
            .map(|(what, side, t)| {
                (
                    [
                        ("host", id.clone()),
                        ("counted_at", what.to_owned()),
                        ("side", side.to_owned()),
                    ],
                    if bytes { t.bytes } else { t.packets },
                )
            })
        })
    };
    let pick = |h: &crate::HostCounters| (h.to_server, h.to_client, h.from_server, h.from_client);
    f.counters(
        "bluebridge_ctl_host_frames",
        "Per host: frames routed to its server's or client's port (counted_at=route), and \
         BlueBridge frames its server's or client's port sent in (counted_at=port).",
        per(pick, false),
    )?;
    f.counters(
        "bluebridge_ctl_host_bytes",
        "The same, in bytes.",
        per(pick, true),
    )
}
