//! How long route changes take to reach the forwarding plane, for every backend: [`Recorded`]
//! wraps a [`Fabric`] and times each batch, from its first change to the end of its commit
//! (the XDP and kernel backends apply each change at once and commit nothing; the BGP and OVS
//! ones apply the whole batch at the commit).

use std::collections::VecDeque;
use std::net::Ipv6Addr;
use std::time::Instant;

use bluebridge_ebpf::{PageTraffic, Route, TorCounters, TrafficCounters};
use serde::{Deserialize, Serialize};

use crate::CtlError;
use crate::fabric::Fabric;

/// Batches kept for the percentiles.
const KEPT: usize = 4096;

/// Route updates so far (`bluebridge-ctl counters`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteUpdates {
    /// Batches applied (one per controller operation that changed the fabric).
    pub batches: u64,
    /// Changes in them: routes and source filters added or removed.
    pub changes: u64,
    /// Batches the fabric refused (logged; the controller's view may be ahead of it).
    pub failed: u64,
    /// Batch latency, first change to applied, median of the last 4,096, µs.
    pub p50_us: u64,
    /// ... 99th percentile.
    pub p99_us: u64,
    /// ... the largest.
    pub max_us: u64,
}

/// A fabric whose batches are timed.
pub(crate) struct Recorded {
    inner: Box<dyn Fabric>,
    since: Option<Instant>,
    changes: u64,
    batches: u64,
    failed: u64,
    recent: VecDeque<u64>,
}

impl Recorded {
    pub(crate) fn new(inner: Box<dyn Fabric>) -> Self {
        Recorded {
            inner,
            since: None,
            changes: 0,
            batches: 0,
            failed: 0,
            recent: VecDeque::new(),
        }
    }

    fn changing(&mut self) {
        self.since.get_or_insert_with(Instant::now);
        self.changes += 1;
    }

    /// The counts and percentiles.
    pub(crate) fn updates(&self) -> RouteUpdates {
        let mut v: Vec<u64> = self.recent.iter().copied().collect();
        v.sort_unstable();
        let at = |q: f64| {
            if v.is_empty() {
                0
            } else {
                v[((v.len() - 1) as f64 * q).round() as usize]
            }
        };
        RouteUpdates {
            batches: self.batches,
            changes: self.changes,
            failed: self.failed,
            p50_us: at(0.5),
            p99_us: at(0.99),
            max_us: v.last().copied().unwrap_or(0),
        }
    }
}

impl Fabric for Recorded {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn add_port(&mut self, ifname: &str, force_generic: bool) -> Result<u32, CtlError> {
        self.inner.add_port(ifname, force_generic)
    }
    fn port_mac(&self, name: &str) -> Result<[u8; 6], CtlError> {
        self.inner.port_mac(name)
    }
    fn commit(&mut self) -> Result<(), CtlError> {
        let Some(since) = self.since.take() else {
            return Ok(());
        };
        let r = self.inner.commit();
        if r.is_err() {
            self.failed += 1;
        }
        self.batches += 1;
        if self.recent.len() == KEPT {
            self.recent.pop_front();
        }
        self.recent
            .push_back(since.elapsed().as_micros().try_into().unwrap_or(u64::MAX));
        r
    }
    fn allow_source(&mut self, port: u32, net: Ipv6Addr, len: u8) -> Result<(), CtlError> {
        self.changing();
        self.inner.allow_source(port, net, len)
    }
    fn disallow_source(&mut self, port: u32, net: Ipv6Addr, len: u8) -> Result<(), CtlError> {
        self.changing();
        self.inner.disallow_source(port, net, len)
    }
    fn add_route(&mut self, net: Ipv6Addr, len: u8, r: Route) -> Result<(), CtlError> {
        self.changing();
        self.inner.add_route(net, len, r)
    }
    fn remove_route(&mut self, net: Ipv6Addr, len: u8) -> Result<(), CtlError> {
        self.changing();
        self.inner.remove_route(net, len)
    }
    fn routes(&self) -> Result<Vec<(Ipv6Addr, u8, Route)>, CtlError> {
        self.inner.routes()
    }
    fn answers_for_withdrawn(&self) -> bool {
        self.inner.answers_for_withdrawn()
    }
    fn set_controller_port(&mut self, port: u32) -> Result<(), CtlError> {
        self.inner.set_controller_port(port)
    }
    fn take_freed(&mut self) -> Vec<Ipv6Addr> {
        self.inner.take_freed()
    }
    fn counters(&self) -> Result<TorCounters, CtlError> {
        self.inner.counters()
    }
    fn route_counters(&self, id: u32) -> Result<TrafficCounters, CtlError> {
        self.inner.route_counters(id)
    }
    fn port_counters(&self, port: u32) -> Result<(TrafficCounters, TrafficCounters), CtlError> {
        self.inner.port_counters(port)
    }
    fn hot_pages(&self, top: usize) -> Result<Vec<(Ipv6Addr, PageTraffic)>, CtlError> {
        self.inner.hot_pages(top)
    }
    fn ports(&self) -> Vec<(String, u32)> {
        self.inner.ports()
    }
    fn keep_forwarding(&mut self) {
        self.inner.keep_forwarding();
    }
}
