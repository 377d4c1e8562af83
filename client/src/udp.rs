//! The kernel-UDP transport: the baseline, and for use without root. Requests leave through an
//! ordinary UDP socket (batched with sendmmsg), replies come back through it (recvmmsg). The
//! kernel must route the deployment's prefix towards the servers — one route via one next hop
//! with one (permanent) neighbour entry, so nothing grows with the number of pages.

use std::net::{SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::AsFd;
use std::time::Instant;

use bluebridge_proto::MacAddr;
use bluebridge_proto::frame::Endpoints;
use bluebridge_xsk::mmsg::{BATCH, DatagramBatch, UdpReceiver};

use crate::engine::Engine;
use crate::transport::Transport;

/// The kernel-UDP transport.
#[derive(Debug)]
pub struct UdpTransport {
    sock: UdpSocket,
    local: SocketAddrV6,
    rx: UdpReceiver,
    tx: DatagramBatch,
}

impl UdpTransport {
    /// Binds `local` (the client's address, which must be assigned to an interface; port 0
    /// picks one).
    pub fn open(local: SocketAddrV6) -> std::io::Result<Self> {
        let sock = UdpSocket::bind(local)?;
        sock.set_nonblocking(true)?;
        bluebridge_xsk::mmsg::zero_flow_labels(&sock)?;
        let local = match sock.local_addr()? {
            SocketAddr::V6(a) => a,
            SocketAddr::V4(_) => unreachable!("bound to an IPv6 address"),
        };
        let tx = DatagramBatch::new(&sock, false)?;
        Ok(UdpTransport {
            sock,
            local,
            rx: UdpReceiver::new(BATCH),
            tx,
        })
    }

    /// The bound address and port (the engine's `local` and `local_port` must match).
    pub fn local(&self) -> SocketAddrV6 {
        self.local
    }
}

impl Transport for UdpTransport {
    fn transmit(&mut self, engine: &mut Engine, now: Instant) {
        engine.transmit(now, &mut self.tx);
        if !self.tx.is_empty() {
            self.tx.flush();
        }
    }

    fn receive(&mut self, engine: &mut Engine, now: Instant) -> usize {
        let local = self.local;
        self.rx
            .recv(self.sock.as_fd(), |m| {
                let ep = Endpoints {
                    src_mac: MacAddr::default(),
                    dst_mac: MacAddr::default(),
                    src: *m.src.ip(),
                    dst: *local.ip(),
                    src_port: m.src.port(),
                    dst_port: local.port(),
                };
                engine.handle_datagram(ep, m.data, now);
            })
            .unwrap_or(0)
    }

    fn poll_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        vec![self.sock.as_fd()]
    }

    /// Datagrams `sendmmsg` refused (a full socket buffer, an unreachable route).
    fn tx_dropped(&self) -> u64 {
        self.tx.dropped
    }
}
