//! The BlueBridge page server.
//!
//! - [`store`]: the hugepage-backed page arena and handle validation; [`hot`]: its hot pages
//!   copied where the XDP program answers INLINE READs from.
//! - [`lease`], [`session`]: UPDATE leases and at-most-once execution; [`liveness`]: when
//!   each client was last heard (what reclaims a dead owner's pages); [`keyed`]: the keyed
//!   permutation behind unguessable handles and lease ids.
//! - [`coherence`]: the directory of coherent copies (one writer or many readers per page).
//! - [`handler`]: request handling as pure code — frames in, frames out.
//! - [`stats`]: the counters a running server shows.
//! - [`runtime`]: the steering program, AF_XDP sockets and pinned workers, one shard each;
//!   [`handoff`]: frames passed between shards.
#![forbid(unsafe_code)]

pub mod access;
pub mod coherence;
#[doc(hidden)]
pub mod fuzzing;
pub mod handler;
pub mod handoff;
pub mod hot;
pub mod keyed;
pub mod lease;
pub mod liveness;
mod metrics;
pub mod replication;
pub mod runtime;
pub mod session;
pub mod staging;
pub mod stats;
pub mod store;
pub mod udp;

pub use handler::{DEFAULT_GRACE_MS, Handler, HandlerConfig};
pub use runtime::{Framing, Server, ServerConfig, ServerStats, TransportKind};
pub use stats::Stats;
pub use store::{Backing, Store, StoreError};
