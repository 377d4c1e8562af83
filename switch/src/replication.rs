//! Replicated hosts, the state's part (docs/switch.md "Replication"): which host backs up
//! which, when a dead host's backup takes over, and the switch's side of a failover (the
//! host's routes and source filter move to the new holder). [`crate::actions`] sends the
//! orders (REPLICA, BACKUP, PROMOTE; docs/protocol.md §5.19) without holding the lock.

use std::net::Ipv6Addr;

use crate::fabric::Fabric as _;
use bluebridge_proto::HostId;
use serde::{Deserialize, Serialize};

use crate::{Controller, CtlError, Link};

/// What the controller knows of a host's replication.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replication {
    /// Copies of its pages wanted: 1 (none) or 2 (one backup).
    pub replicas: u8,
    /// The registered host whose server holds its pages: itself until a failover.
    pub holder: u16,
    /// The host whose server keeps the twin of its pages (once ordered).
    pub backup: Option<u16>,
    /// The epoch of its stream (raised by every failover).
    pub epoch: u32,
    /// Both servers took the pairing orders: every acknowledged change is at the backup.
    pub paired: bool,
    /// Why it is not replicated although it should be.
    pub note: Option<String>,
    /// Stream bytes its holder's backup had not acknowledged at the last health check.
    pub lag_bytes: u64,
    /// Replies its holder held for the backup at the last health check.
    pub held: u64,
    /// Pages still to copy to a new backup, and in all, at the last health check (a backup
    /// that joined a host with pages gets a copy of them first; 0 of 0: in step).
    #[serde(default)]
    pub copy_left: u64,
    /// See [`Replication::copy_left`].
    #[serde(default)]
    pub copy_total: u64,
    /// Failovers of its pages so far.
    pub failovers: u32,
    /// Declared dead; its backup is being promoted.
    #[serde(skip)]
    pub(crate) failover_due: bool,
    /// When the last pairing was refused (another is tried a second later).
    #[serde(skip)]
    pub(crate) refused_at: Option<std::time::Instant>,
}

/// How long after a refused pairing the next is tried.
const PAIRING_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

impl Replication {
    /// A newly registered host `id` wanting `replicas` copies.
    pub fn new(id: u16, replicas: u8) -> Self {
        Replication {
            replicas,
            holder: id,
            ..Replication::default()
        }
    }
}

/// One failover: what was measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailoverReport {
    /// The host whose pages moved.
    pub host: u16,
    /// The server that held them (dead).
    pub from: u16,
    /// The backup that holds them now.
    pub to: u16,
    /// The new epoch.
    pub epoch: u32,
    /// From the first missed health check to the host declared dead, ms.
    pub detect_ms: f64,
    /// PROMOTE until every twin had taken over, µs.
    pub promote_us: f64,
    /// The switch's routes and source filters moved, µs.
    pub route_us: f64,
}

/// Pairing orders to send: REPLICA to `backup`, then BACKUP to `host`'s address.
#[derive(Debug, Clone)]
pub(crate) struct PairPlan {
    pub(crate) host: u16,
    pub(crate) backup: u16,
    pub(crate) epoch: u32,
}

/// A failover to carry out: PROMOTE at `to`, then the switch.
#[derive(Debug, Clone)]
pub(crate) struct FailoverPlan {
    pub(crate) host: u16,
    pub(crate) from: u16,
    pub(crate) to: u16,
    pub(crate) epoch: u32,
    pub(crate) detect_ms: f64,
}

impl Controller {
    /// Copies of a host's pages when its registration does not say (1 or 2).
    pub fn set_replicas(&mut self, n: u8) -> Result<(), CtlError> {
        if !(1..=2).contains(&n) {
            return Err(CtlError::Invalid(format!(
                "--replicas {n}: 1 (no backup) or 2 (one backup)"
            )));
        }
        self.replicas = n;
        // Hosts adopted from a pinned switch (or registered without saying) take it too.
        for h in self.hosts.values_mut() {
            if h.spec.replicas.is_none() {
                h.repl.replicas = n;
            }
        }
        Ok(())
    }

    /// The server link that serves host `id`'s /48 now (its holder's).
    pub(crate) fn holder_link(&self, id: u16) -> Option<Link> {
        let holder = self.hosts.get(&id)?.repl.holder;
        self.hosts.get(&holder).map(|h| h.server.clone())
    }

    /// Whether server `id` can keep or take pages: registered, not dead, answering.
    pub(crate) fn server_alive(&self, id: u16) -> bool {
        self.hosts
            .get(&id)
            .is_some_and(|h| !h.dead && !h.health.down && !h.repl.failover_due)
    }

    /// Whether host `id` has a backup in step that can take over.
    pub(crate) fn can_fail_over(&self, id: u16) -> bool {
        let Some(h) = self.hosts.get(&id) else {
            return false;
        };
        h.repl.paired && h.repl.backup.is_some_and(|b| self.server_alive(b))
    }

    /// A health check's STAT names the holder's backup for the host: after a controller
    /// restart this is how the pairing is learnt again.
    pub(crate) fn note_replication(&mut self, id: u16, s: &bluebridge_proto::message::StatRecord) {
        let Some(h) = self.hosts.get_mut(&id) else {
            return;
        };
        h.repl.lag_bytes = s.repl_lag_bytes;
        h.repl.held = s.repl_held;
        h.repl.copy_left = s.repl_copy_left;
        h.repl.copy_total = s.repl_copy_total;
        let backup = u16::try_from(s.backup).ok().filter(|&b| b != 0);
        if backup.is_some() && !h.repl.paired && h.repl.backup.is_none() {
            h.repl.replicas = h.repl.replicas.max(2);
            h.repl.backup = backup;
            h.repl.epoch = h.repl.epoch.max(s.backup_epoch as u32);
            h.repl.paired = true;
            tracing::info!(host = id, backup = ?backup, "replication learnt from the host's STAT");
        }
    }

    /// Hosts that want a backup and have none, each with the live server that keeps the
    /// fewest twins (the next one after it in id order on a tie): the pairings to order.
    pub(crate) fn plan_pairings(&mut self) -> Vec<PairPlan> {
        let mut plans = Vec::new();
        let ids: Vec<u16> = self.hosts.keys().copied().collect();
        for &id in &ids {
            let h = &self.hosts[&id];
            if h.repl.replicas < 2
                || h.repl.backup.is_some()
                || h.repl
                    .refused_at
                    .is_some_and(|t| t.elapsed() < PAIRING_RETRY)
                || h.repl.failover_due
                || !self.server_alive(h.repl.holder)
                || h.health.pages_total == 0
            {
                continue;
            }
            let holder = h.repl.holder;
            let load = |b: u16| {
                self.hosts
                    .values()
                    .filter(|x| x.repl.backup == Some(b))
                    .count()
            };
            let after = |b: u16| b.wrapping_sub(id).wrapping_sub(1);
            let Some(backup) = ids
                .iter()
                .copied()
                .filter(|&b| {
                    b != holder && self.server_alive(b) && self.hosts[&b].health.pages_total > 0
                })
                .min_by_key(|&b| (load(b), after(b)))
            else {
                continue;
            };
            let h = self.hosts.get_mut(&id).expect("listed");
            h.repl.backup = Some(backup);
            // Every stream has an epoch of its own: a backup never takes a new stream for an
            // old one.
            h.repl.epoch += 1;
            plans.push(PairPlan {
                host: id,
                backup,
                epoch: h.repl.epoch,
            });
        }
        plans
    }

    /// A pairing's orders were answered: `Ok` both took them, `Err` why not.
    pub(crate) fn finish_pairing(&mut self, p: &PairPlan, r: Result<(), String>) {
        let Some(h) = self.hosts.get_mut(&p.host) else {
            return;
        };
        if h.repl.backup != Some(p.backup) {
            return; // changed meanwhile
        }
        match r {
            Ok(()) => {
                h.repl.paired = true;
                h.repl.note = None;
                h.repl.refused_at = None;
                tracing::info!(
                    host = p.host,
                    backup = p.backup,
                    epoch = p.epoch,
                    "host replicated"
                );
            }
            Err(why) => {
                tracing::warn!(host = p.host, backup = p.backup, %why, "host not replicated");
                h.repl.backup = None;
                h.repl.paired = false;
                h.repl.note = Some(why);
                h.repl.refused_at = Some(std::time::Instant::now());
            }
        }
    }

    /// Hosts declared dead whose backup is to take over.
    pub(crate) fn plan_failovers(&mut self) -> Vec<FailoverPlan> {
        let mut v = Vec::new();
        for (&id, h) in &self.hosts {
            if !h.repl.failover_due {
                continue;
            }
            let Some(to) = h.repl.backup else { continue };
            v.push(FailoverPlan {
                host: id,
                from: h.repl.holder,
                to,
                epoch: h.repl.epoch + 1,
                detect_ms: h
                    .first_miss
                    .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3),
            });
        }
        v
    }

    /// The backup took over (`promote_us` after it was asked): the host's /48, its pages'
    /// /112s and their sources move to the backup's port; the dead server is dead for good,
    /// and every host it backed up loses its backup. Returns the streams that must stop
    /// (hosts whose backup the dead server was).
    pub(crate) fn finish_failover(
        &mut self,
        p: &FailoverPlan,
        promote_us: f64,
    ) -> Result<Vec<u16>, CtlError> {
        let t = std::time::Instant::now();
        let to = self
            .hosts
            .get(&p.to)
            .cloned()
            .ok_or_else(|| CtlError::Invalid(format!("host {} was unregistered", p.to)))?;
        let from_port = self.hosts.get(&p.from).map(|h| h.server.ifindex);
        let net = self.prefix.host_network(HostId(p.host));
        self.fabric.add_route(
            net,
            48,
            Self::link_route(&to.server, 2 * u32::from(p.host), false),
        )?;
        self.fabric.allow_source(to.server.ifindex, net, 48)?;
        if let Some(port) = from_port {
            // Fenced at the switch too: nothing from the old holder claims these addresses.
            self.fabric.disallow_source(port, net, 48)?;
        }
        let moved: Vec<Ipv6Addr> = self
            .page_routes
            .iter()
            .filter(|(_, holder)| **holder == p.host)
            .map(|(page, _)| *page)
            .collect();
        for page in moved {
            self.fabric
                .add_route(page, 112, Self::link_route(&to.server, u32::MAX, false))?;
            self.fabric.allow_source(to.server.ifindex, page, 112)?;
            if let Some(port) = from_port {
                self.fabric.disallow_source(port, page, 112)?;
            }
        }
        let route_us = t.elapsed().as_secs_f64() * 1e6;
        if let Some(h) = self.hosts.get_mut(&p.host) {
            h.repl.holder = p.to;
            h.repl.backup = None;
            h.repl.paired = false;
            h.repl.epoch = p.epoch;
            h.repl.failover_due = false;
            h.repl.failovers += 1;
            h.repl.note = None;
            h.health.misses = 0;
            h.first_miss = None;
        }
        if let Some(dead) = self.hosts.get_mut(&p.from) {
            dead.dead = true;
        }
        let orphaned: Vec<u16> = self
            .hosts
            .iter()
            .filter(|(_, h)| h.repl.backup == Some(p.from))
            .map(|(&id, _)| id)
            .collect();
        let report = FailoverReport {
            host: p.host,
            from: p.from,
            to: p.to,
            epoch: p.epoch,
            detect_ms: p.detect_ms,
            promote_us,
            route_us,
        };
        tracing::warn!(
            host = p.host,
            from = p.from,
            to = p.to,
            epoch = p.epoch,
            detect_ms = p.detect_ms,
            promote_us,
            route_us,
            "failed over"
        );
        self.failovers.push(report);
        Ok(orphaned)
    }

    /// The backup could not take over: the host is withdrawn as one without a backup.
    pub(crate) fn abandon_failover(&mut self, p: &FailoverPlan, why: &str) -> Result<(), CtlError> {
        tracing::error!(host = p.host, backup = p.to, %why, "failover failed: withdrawing the host");
        let allowed = self.misses_allowed;
        if let Some(h) = self.hosts.get_mut(&p.host) {
            h.repl.failover_due = false;
            h.repl.paired = false;
            h.repl.backup = None;
            h.repl.note = Some(format!("failover to host {} failed: {why}", p.to));
            h.health.misses = allowed - 1;
        }
        self.health_missed(p.host)
    }

    /// A host whose backup died runs without one now (its stream was stopped, or could not
    /// be: `ok` false); a new backup is found for it in the same round if one is free.
    pub(crate) fn stream_stopped(&mut self, id: u16, ok: bool) {
        if let Some(h) = self.hosts.get_mut(&id) {
            h.repl.backup = None;
            h.repl.paired = false;
            if !ok {
                tracing::warn!(
                    host = id,
                    "its backup died and its holder did not answer the order to stop waiting for it"
                );
            }
        }
    }

    /// How fast a new backup gets its copy of a host's pages, bytes/s (`--copy-rate-mib`).
    pub fn set_copy_rate(&mut self, bytes_per_s: u64) {
        self.copy_rate = bytes_per_s;
    }

    /// See [`Controller::set_copy_rate`].
    pub(crate) fn copy_rate(&self) -> u64 {
        self.copy_rate
    }

    /// The failovers so far.
    pub fn failovers(&self) -> Vec<FailoverReport> {
        self.failovers.clone()
    }

    /// The controller's prefix (for orders built outside the lock).
    pub(crate) fn prefix(&self) -> bluebridge_proto::NetPrefix {
        self.prefix
    }
}
