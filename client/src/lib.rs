//! The BlueBridge client library.
//!
//! - [`engine`]: the sans-IO core (request ids, retransmission, reassembly, matching).
//! - [`transport`]: moving frames; [`XdpTransport`] over AF_XDP.
//! - [`Client`]: blocking calls for every operation and a pipelined submit/poll interface;
//!   [`copies`]: coherent copies (GET_SHARED, GET_EXCLUSIVE, PUT, RENEW, REVOKE notices).
//! - [`ClientError`]: one variant per error status, plus timeouts.
//! - [`region`]: remote memory mapped into the process ([`RemoteRegion`], userfaultfd paging);
//!   the only module with unsafe code (in `region::sys`).
#![deny(unsafe_code)]

pub mod admin;
mod client;
pub mod copies;
pub mod engine;
pub mod error;
mod pending;
pub mod region;
pub mod transport;
mod udp;

pub use client::{Client, Lease};
pub use copies::{Grant, Keep};
pub use engine::{Completion, Engine, EngineConfig, PageSink, Reply, Request, Revoke};
pub use error::ClientError;
pub use region::{RegionOptions, RemoteRegion};
pub use transport::{
    AnyTransport, Connect, ConnectError, NetArgs, SharedSteer, Transport, TransportError,
    TransportKind, XdpConfig, XdpTransport,
};
pub use udp::UdpTransport;

/// Logs of a BlueBridge command-line tool: `tracing` to standard error, filtered by `RUST_LOG`
/// (`default` when it is unset, e.g. `"warn"`).
pub fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
