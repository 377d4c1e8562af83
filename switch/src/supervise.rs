//! The controller's own traffic: a STAT to every registered host each round, all at once,
//! which is both the health check (a host that misses enough in a row fails over to its backup
//! if it has one, or is withdrawn; one that answers again is restored) and the occupancy that
//! placement needs; then replication's orders (failovers, pairings); and, every millisecond,
//! the pages the switch saw freed, which it invalidates.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::Controller;

/// How often and how strictly.
#[derive(Debug, Clone, Copy)]
pub struct SuperviseConfig {
    /// Time between rounds.
    pub interval: Duration,
}

/// Runs rounds until `stop` is set.
pub fn supervise(ctl: &Mutex<Controller>, cfg: SuperviseConfig, stop: &AtomicBool) {
    let lock = || crate::actions::lock(ctl);
    let drain = || {
        if let Err(e) = crate::actions::drain_freed(ctl) {
            tracing::error!(error = %e, "invalidating freed pages");
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let start = std::time::Instant::now();
        let (ids, interval) = {
            let c = lock();
            (c.host_ids(), c.health_config().0.unwrap_or(cfg.interval))
        };
        // Every host at once; a round lasts at most one interval however many are dead. The
        // controller's lock is not held while the checks wait for their answers.
        if let Err(e) = crate::actions::check_hosts(ctl, &ids, interval) {
            tracing::error!(error = %e, "updating the switch after a health check");
        }
        drain();
        if let Err(e) = crate::actions::replication_round(ctl) {
            tracing::error!(error = %e, "replication");
        }
        // Freed pages are reported within a millisecond, health checks once per interval (a
        // round that waited out a dead host's check took the interval already).
        let until = start + interval;
        while std::time::Instant::now() < until && !stop.load(Ordering::Relaxed) {
            drain();
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
