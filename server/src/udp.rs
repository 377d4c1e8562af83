//! The kernel-UDP baseline: the same handler behind a kernel UDP socket (recvmmsg/sendmmsg),
//! no XDP. The socket listens on `[::]:47872`; the host's /48 must be local to the kernel
//! ("AnyIP": `ip -6 route add local <prefix>:<host>::/48 dev lo`) so that datagrams to every page
//! address are delivered to it, and each reply is sent from the page address it answers
//! (IPV6_PKTINFO).

use std::net::{Ipv6Addr, SocketAddrV6, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

use bluebridge_proto::frame::{Endpoints, FrameError};
use bluebridge_proto::{MacAddr, UDP_PORT};
use bluebridge_xsk::XskStats;
use bluebridge_xsk::mmsg::{DatagramBatch, UdpReceiver};
use nix::sys::socket::{setsockopt, sockopt};

use crate::runtime::{IDLE_SLEEP_MS, IDLE_SPINS, ServerConfig, StartError, WorkerCommon};

/// IPv6's fragment extension header.
const FRAGMENT_HEADER: u8 = 44;

/// Binds the server's UDP socket and checks, with a datagram to an address of the host's /48,
/// that the kernel delivers that /48 to it.
pub(crate) fn bind(cfg: &ServerConfig) -> Result<UdpSocket, StartError> {
    let err = |what: &str, e: &dyn std::fmt::Display| StartError::Config(format!("{what}: {e}"));
    let sock = UdpSocket::bind(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, UDP_PORT, 0, 0))
        .map_err(|e| err(&format!("binding UDP port {UDP_PORT}"), &e))?;
    setsockopt(&sock, sockopt::Ipv6RecvPacketInfo, &true)
        .map_err(|e| err("IPV6_RECVPKTINFO", &e))?;
    bluebridge_xsk::mmsg::zero_flow_labels(&sock).map_err(|e| err("IPV6_AUTOFLOWLABEL", &e))?;
    // The same frames as the AF_XDP path: no extension headers, no UDP length 0 (§2.2, §2.3).
    bluebridge_xsk::mmsg::accept_only_plain_udp(&sock).map_err(|e| err("SO_ATTACH_FILTER", &e))?;
    bluebridge_xsk::mmsg::report_fragments(&sock).map_err(|e| err("IPV6_RECVFRAGSIZE", &e))?;
    // Replies leave from page addresses, which are routed locally but assigned nowhere.
    setsockopt(&sock, sockopt::IpFreebind, &true).map_err(|e| err("IP_FREEBIND", &e))?;
    let net = cfg.prefix.host_network(cfg.host);
    let probe = {
        let mut o = net.octets();
        o[15] = 0xb1;
        Ipv6Addr::from(o)
    };
    let token = *b"bluebridge local-route probe";
    let delivered = (|| -> std::io::Result<bool> {
        let tx = UdpSocket::bind("[::]:0")?;
        tx.send_to(&token, SocketAddrV6::new(probe, UDP_PORT, 0, 0))?;
        sock.set_read_timeout(Some(std::time::Duration::from_millis(200)))?;
        let mut buf = [0u8; 64];
        loop {
            match sock.recv_from(&mut buf) {
                Ok((n, _)) if buf[..n] == token => return Ok(true),
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
    })()
    .unwrap_or(false);
    if !delivered {
        return Err(StartError::Config(format!(
            "datagrams to {net}/48 are not delivered locally; for the UDP transport run \
             `ip -6 route add local {net}/48 dev lo` (and keep lo up)"
        )));
    }
    sock.set_read_timeout(None)
        .map_err(|e| err("socket timeout", &e))?;
    sock.set_nonblocking(true)
        .map_err(|e| err("non-blocking socket", &e))?;
    Ok(sock)
}

/// The worker of the UDP transport.
pub(crate) struct UdpWorker {
    sock: UdpSocket,
    rx: UdpReceiver,
    tx: DatagramBatch,
    common: WorkerCommon,
}

impl UdpWorker {
    pub(crate) fn new(sock: UdpSocket, common: WorkerCommon) -> std::io::Result<Self> {
        let tx = DatagramBatch::new(&sock, true)?;
        Ok(UdpWorker {
            sock,
            rx: UdpReceiver::new(bluebridge_xsk::mmsg::BATCH),
            tx,
            common,
        })
    }

    pub(crate) fn run(mut self) {
        self.common.set_up_thread();
        let mut stats = XskStats::default();
        let mut empty = 0u32;
        let mut meter = crate::stats::StallMeter::new(self.common.started);
        while !self.common.stop.load(Ordering::Relaxed) {
            meter.tick(self.common.counters());
            let now = self.common.now_ns();
            let h = &mut self.common.handler;
            let tx = &mut self.tx;
            let n = self
                .rx
                .recv(self.sock.as_fd(), |m| {
                    if m.fragmented {
                        // The AF_XDP path takes no fragments (next header 44): neither do we.
                        return h.count_malformed(FrameError::NotUdp(FRAGMENT_HEADER));
                    }
                    let ep = Endpoints {
                        src_mac: MacAddr::default(),
                        dst_mac: MacAddr::default(),
                        src: *m.src.ip(),
                        dst: m.dst,
                        src_port: m.src.port(),
                        dst_port: UDP_PORT,
                    };
                    h.handle_datagram(ep, m.data, now, tx);
                })
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "recvmmsg");
                    0
                });
            self.common.handler.poll_replication(now, &mut self.tx);
            if !self.tx.is_empty() {
                stats.tx_frames += self.tx.len() as u64;
                self.tx.flush();
            }
            stats.rx_frames += n as u64;
            stats.tx_dropped = self.tx.dropped;
            self.common.handler.housekeep(now);
            if n == 0 {
                empty += 1;
                let waiting = self.common.handler.replication_waiting();
                if self.common.idle && (empty >= IDLE_SPINS || waiting) {
                    let mut fds = [nix::poll::PollFd::new(
                        self.sock.as_fd(),
                        nix::poll::PollFlags::POLLIN,
                    )];
                    meter.pause(self.common.counters());
                    let longest = if waiting {
                        crate::replication::WAIT_SLEEP_MS
                    } else {
                        IDLE_SLEEP_MS
                    };
                    let _ = nix::poll::poll(&mut fds, longest);
                    meter.resume(self.common.counters());
                    empty = 0;
                }
            } else {
                empty = 0;
                self.common.counters().publish_xsk(&stats);
            }
        }
        self.common.counters().publish_xsk(&stats);
    }
}
