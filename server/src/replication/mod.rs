//! Replicated pages (docs/protocol.md §5.19): each shard of a primary sends its backup a
//! stream of the requests it ran ([`Outbox`]), and holds every reply that depends on them
//! until the backup has applied them; a backup runs the stream on a twin of the shard
//! ([`Replica`]) and takes the pages over when the controller promotes it.
//!
//! What the controller orders (BACKUP, REPLICA, PROMOTE) reaches one shard; it lands in the
//! server's [`Orders`], which every shard reads when their version changes.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bluebridge_proto::{HostId, MacAddr};

mod outbox;
mod replica;

/// The longest an idle worker waiting on its backup sleeps (see
/// `Handler::replication_waiting`): the acknowledgement wakes it, this is for a lost one.
pub const WAIT_SLEEP_MS: u16 = 1;

pub use outbox::{COPY_WINDOW_BYTES, Capture, DEFAULT_COPY_RATE, Held, Outbox, WINDOW_BYTES};
pub use replica::{Applied, Replica};

/// Where a host's pages are replicated to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// The backup's host id.
    pub host: HostId,
    /// The epoch of the stream (the controller's count of holders of these pages).
    pub epoch: u32,
    /// The MAC this server sends from (the one the order arrived at).
    pub own_mac: MacAddr,
    /// The next hop's MAC (where the order came from).
    pub next_hop: MacAddr,
    /// How fast a copy of the shard's state may go, bytes/s (0: the default).
    pub rate: u64,
}

/// A stream this server accepts as a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Accept {
    /// The epoch of the stream it takes.
    pub epoch: u32,
    /// Ordered to take the pages over under this (later) epoch; 0: not ordered.
    pub promote: u32,
}

/// Where the replica shards of one host stand on this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaState {
    /// The stream's epoch they count for.
    pub epoch: u32,
    /// The primary's shards (from its INIT; 0 before any arrived).
    pub shards: u16,
    /// Shards whose INIT arrived.
    pub in_step: u16,
    /// Shards whose stream broke (an unreadable record, a twin that could not be made).
    pub broken: u16,
}

/// The controller's standing orders to this server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Orders {
    /// Hosts whose pages this server holds and replicates: host → backup.
    pub backups: BTreeMap<u16, Target>,
    /// Streams this server takes: primary host → acceptance.
    pub accepts: BTreeMap<u16, Accept>,
}

/// The orders, shared by the shards of one server.
#[derive(Debug, Default)]
pub struct Shared {
    version: AtomicU64,
    orders: Mutex<Orders>,
    /// Replica shards that have taken over, per host (each shard counts itself once).
    promoted: Mutex<BTreeMap<u16, (u32, u16)>>,
    /// The replica shards of each host.
    replicas: Mutex<BTreeMap<u16, ReplicaState>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// Changes the orders; every shard sees the change at its next [`Shared::version`] check.
    pub fn update(&self, f: impl FnOnce(&mut Orders)) {
        let mut o = lock(&self.orders);
        let before = o.clone();
        f(&mut o);
        if *o != before {
            // Release: a shard that sees the new version (Acquire) sees the orders too (it
            // reads them under the lock anyway).
            self.version.fetch_add(1, Ordering::Release);
        }
    }

    /// The orders' version: changes whenever they do.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// A copy of the orders.
    pub fn orders(&self) -> Orders {
        lock(&self.orders).clone()
    }

    /// A replica shard of `host` (epoch `epoch`, of a primary with `shards` shards) got its
    /// INIT (`ok`), or broke.
    pub fn replica_made(&self, host: u16, epoch: u32, shards: u16, ok: bool) {
        let mut r = lock(&self.replicas);
        let e = r.entry(host).or_default();
        if e.epoch != epoch {
            *e = ReplicaState {
                epoch,
                ..ReplicaState::default()
            };
        }
        e.shards = e.shards.max(shards);
        if ok {
            e.in_step += 1;
        } else {
            e.broken += 1;
        }
    }

    /// Where the replica shards of every host stand.
    pub fn replica_states(&self) -> Vec<ReplicaState> {
        lock(&self.replicas).values().copied().collect()
    }

    /// Where the replica shards of `host` stand.
    pub fn replica_state(&self, host: u16) -> Option<ReplicaState> {
        lock(&self.replicas).get(&host).copied()
    }

    /// A replica shard of `host` took over at `epoch`.
    pub fn promoted(&self, host: u16, epoch: u32) {
        let mut p = lock(&self.promoted);
        let e = p.entry(host).or_insert((epoch, 0));
        if e.0 != epoch {
            *e = (epoch, 0);
        }
        e.1 += 1;
    }

    /// How many replica shards of `host` have taken over at `epoch`.
    pub fn promoted_shards(&self, host: u16, epoch: u32) -> u16 {
        let p = lock(&self.promoted);
        p.get(&host).filter(|e| e.0 == epoch).map_or(0, |e| e.1)
    }
}
