//! The controller's own traffic: a STAT to every registered host each round, which is both the
//! health check (a host that misses enough in a row is withdrawn; one that answers again is
//! restored) and the occupancy that placement needs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bluebridge_client::{AnyTransport, Client};
use bluebridge_proto::HostId;

use crate::Controller;

/// How often and how strictly.
#[derive(Debug, Clone, Copy)]
pub struct SuperviseConfig {
    /// Time between rounds.
    pub interval: Duration,
}

/// Runs rounds until `stop` is set.
pub fn supervise(
    ctl: &Mutex<Controller>,
    client: &mut Client<AnyTransport>,
    cfg: SuperviseConfig,
    stop: &AtomicBool,
) {
    let lock = || ctl.lock().unwrap_or_else(PoisonError::into_inner);
    while !stop.load(Ordering::Relaxed) {
        let ids = lock().host_ids();
        for id in ids {
            let r = client.stat(HostId(id));
            let mut c = lock();
            let done = match r {
                Ok(s) => c.health_ok(id, s.pages_used, s.pages_total),
                Err(e) => {
                    tracing::debug!(host = id, error = %e, "health check missed");
                    c.health_missed(id)
                }
            };
            if let Err(e) = done.and_then(|()| c.place().map(|_| ())) {
                tracing::error!(error = %e, "updating the switch after a health check");
            }
        }
        std::thread::sleep(cfg.interval);
    }
}
