//! Batched kernel UDP I/O over IPv6 (`recvmmsg`/`sendmmsg`) for the kernel-UDP baseline, with
//! `IPV6_PKTINFO` per message: a server answers each request from the page address it was
//! sent to, so every datagram of a batch carries its own source address. (nix's `sendmmsg`
//! shares one set of control messages across a batch, hence these wrappers.)
//!
//! All buffers are allocated once, at construction.

use std::io;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};

/// Largest datagram handled.
pub const MAX_DATAGRAM: usize = 9000;

const PKTINFO_SPACE: usize = 64; // ≥ CMSG_SPACE(sizeof(struct in6_pktinfo)) = 40 on Linux

/// Makes the kernel send this socket's datagrams with IPv6 flow label 0, as the protocol
/// says senders do (docs/protocol.md §2.2), instead of a label hashed from the flow
/// (`net.ipv6.auto_flowlabels`).
pub fn zero_flow_labels(sock: &std::net::UdpSocket) -> io::Result<()> {
    let off: libc::c_int = 0;
    set_option(sock, libc::IPPROTO_IPV6, libc::IPV6_AUTOFLOWLABEL, &off)
}

/// `setsockopt(level, name, value)` for an option whose value is a plain `T` (no pointers the
/// kernel would follow beyond the call).
fn set_option<T>(
    sock: &std::net::UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: a valid socket; `value` points at `size_of::<T>()` readable bytes for the call.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes the kernel say which datagrams it reassembled from IPv6 fragments
/// ([`Received::fragmented`]): the AF_XDP path never sees those as UDP (a fragment's next
/// header is 44), so a server on this socket drops them too.
pub fn report_fragments(sock: &std::net::UdpSocket) -> io::Result<()> {
    let on: libc::c_int = 1;
    set_option(sock, libc::IPPROTO_IPV6, libc::IPV6_RECVFRAGSIZE, &on)
}

/// Makes the kernel hand this (server) socket only what the AF_XDP path would take: a
/// datagram whose IPv6 header is followed straight by UDP (no extension header) and whose UDP
/// length is not 0 (which the kernel would read as "the rest of the packet"). Others arrive
/// cut to no payload at all (a socket filter may trim, not count), so the server counts them
/// as malformed like the AF_XDP path does, instead of executing them.
pub fn accept_only_plain_udp(sock: &std::net::UdpSocket) -> io::Result<()> {
    // Classic BPF over the datagram as the UDP socket sees it: offset 0 is the UDP header.
    const UDP_LEN: u32 = 4;
    let next_header = (libc::SKF_NET_OFF + 6) as u32;
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let prog = [
        op(libc::BPF_LD | libc::BPF_H | libc::BPF_ABS, 0, 0, UDP_LEN),
        op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 2, 0, 0), // length 0: cut
        op(
            libc::BPF_LD | libc::BPF_B | libc::BPF_ABS,
            0,
            0,
            next_header,
        ),
        op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 1, 0, 17), // UDP: keep
        op(libc::BPF_RET | libc::BPF_K, 0, 0, 8),                  // cut to the UDP header
        op(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX),           // keep it all
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr().cast_mut(),
    };
    // `fprog` points at `prog`, alive for the call (the kernel copies the program).
    set_option(sock, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog)
}

fn zero_sockaddr() -> libc::sockaddr_in6 {
    // SAFETY: sockaddr_in6 is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

fn to_sockaddr(a: SocketAddrV6) -> libc::sockaddr_in6 {
    let mut s = zero_sockaddr();
    s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    s.sin6_port = a.port().to_be();
    s.sin6_addr.s6_addr = a.ip().octets();
    s.sin6_scope_id = a.scope_id();
    s
}

fn from_sockaddr(s: &libc::sockaddr_in6) -> SocketAddrV6 {
    SocketAddrV6::new(
        Ipv6Addr::from(s.sin6_addr.s6_addr),
        u16::from_be(s.sin6_port),
        0,
        s.sin6_scope_id,
    )
}

/// One datagram to send: `head` then `body` (header and payload, without copying them
/// together), to `dst`, from `src` when given.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// Destination.
    pub dst: SocketAddrV6,
    /// Source address (IPV6_PKTINFO); `None`: the kernel chooses.
    pub src: Option<Ipv6Addr>,
    /// First part.
    pub head: &'a [u8],
    /// Second part.
    pub body: &'a [u8],
}

/// Sends batches with one `sendmmsg`.
pub struct UdpSender {
    addrs: Vec<libc::sockaddr_in6>,
    iovs: Vec<[libc::iovec; 2]>,
    cmsgs: Vec<[u8; PKTINFO_SPACE]>,
    hdrs: Vec<libc::mmsghdr>,
}

impl std::fmt::Debug for UdpSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpSender")
            .field("batch", &self.hdrs.len())
            .finish()
    }
}

// SAFETY: the raw pointers inside the preallocated headers are only set and used within
// `send`, which takes `&mut self`; between calls they dangle harmlessly and are never read.
unsafe impl Send for UdpSender {}

impl UdpSender {
    /// A sender for batches of up to `batch` datagrams.
    pub fn new(batch: usize) -> Self {
        // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
        let hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
        let iov = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        UdpSender {
            addrs: vec![zero_sockaddr(); batch],
            iovs: vec![[iov, iov]; batch],
            cmsgs: vec![[0u8; PKTINFO_SPACE]; batch],
            hdrs: vec![hdr; batch],
        }
    }

    /// Sends up to one batch of `msgs`; returns how many the kernel took.
    pub fn send(&mut self, fd: BorrowedFd<'_>, msgs: &[Datagram<'_>]) -> io::Result<usize> {
        let n = msgs.len().min(self.hdrs.len());
        for (i, m) in msgs[..n].iter().enumerate() {
            self.addrs[i] = to_sockaddr(m.dst);
            self.iovs[i] = [
                libc::iovec {
                    iov_base: m.head.as_ptr().cast_mut().cast(),
                    iov_len: m.head.len(),
                },
                libc::iovec {
                    iov_base: m.body.as_ptr().cast_mut().cast(),
                    iov_len: m.body.len(),
                },
            ];
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in6).cast();
            h.msg_namelen = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            h.msg_iov = self.iovs[i].as_mut_ptr();
            h.msg_iovlen = 2;
            h.msg_flags = 0;
            match m.src {
                Some(src) => {
                    let buf = &mut self.cmsgs[i];
                    h.msg_control = buf.as_mut_ptr().cast();
                    h.msg_controllen = buf.len() as _;
                    // SAFETY: msg_control points at a buffer of PKTINFO_SPACE bytes, enough
                    // for one in6_pktinfo control message; CMSG_FIRSTHDR reads only the header.
                    let c = unsafe { libc::CMSG_FIRSTHDR(h) };
                    let info = libc::in6_pktinfo {
                        ipi6_addr: libc::in6_addr {
                            s6_addr: src.octets(),
                        },
                        ipi6_ifindex: 0,
                    };
                    // SAFETY: `c` is the first control header inside `buf`, non-null because the
                    // buffer is large enough, and nothing else references it.
                    let hdr = unsafe { &mut *c };
                    hdr.cmsg_level = libc::IPPROTO_IPV6;
                    hdr.cmsg_type = libc::IPV6_PKTINFO;
                    // SAFETY: pure size computation.
                    hdr.cmsg_len =
                        unsafe { libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32) } as _;
                    // SAFETY: `c` is a valid control header (above).
                    let data = unsafe { libc::CMSG_DATA(c) };
                    // SAFETY: CMSG_SPACE reserved room for one in6_pktinfo after the header; the
                    // data may be unaligned.
                    unsafe { std::ptr::write_unaligned(data.cast(), info) };
                    // SAFETY: pure size computation.
                    h.msg_controllen =
                        unsafe { libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32) } as _;
                }
                None => {
                    h.msg_control = std::ptr::null_mut();
                    h.msg_controllen = 0;
                }
            }
        }
        // SAFETY: the first `n` headers point at live addresses, iovecs (borrowing `msgs` for
        // the duration of this call) and control buffers owned by `self`.
        let r = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                n as u32,
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        Ok(r as usize)
    }
}

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    /// Sender.
    pub src: SocketAddrV6,
    /// The address it was sent to (IPV6_PKTINFO; needs IPV6_RECVPKTINFO on the socket), or
    /// unspecified.
    pub dst: Ipv6Addr,
    /// Contents.
    pub data: &'a [u8],
    /// The kernel reassembled it from IPv6 fragments (IPV6_RECVFRAGSIZE; needs
    /// [`report_fragments`] on the socket).
    pub fragmented: bool,
}

/// Receives batches with one `recvmmsg`.
pub struct UdpReceiver {
    bufs: Vec<Box<[u8; MAX_DATAGRAM]>>,
    addrs: Vec<libc::sockaddr_in6>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<[u8; PKTINFO_SPACE]>,
    hdrs: Vec<libc::mmsghdr>,
}

impl std::fmt::Debug for UdpReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpReceiver")
            .field("batch", &self.hdrs.len())
            .finish()
    }
}

// SAFETY: as for UdpSender: pointers are set and used only inside `recv` (`&mut self`).
unsafe impl Send for UdpReceiver {}

impl UdpReceiver {
    /// A receiver for batches of up to `batch` datagrams.
    pub fn new(batch: usize) -> Self {
        // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
        let hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
        UdpReceiver {
            bufs: (0..batch).map(|_| Box::new([0u8; MAX_DATAGRAM])).collect(),
            addrs: vec![zero_sockaddr(); batch],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                batch
            ],
            cmsgs: vec![[0u8; PKTINFO_SPACE]; batch],
            hdrs: vec![hdr; batch],
        }
    }

    /// Receives what is waiting (without blocking) and calls `f` for each datagram; returns
    /// how many.
    pub fn recv(
        &mut self,
        fd: BorrowedFd<'_>,
        mut f: impl FnMut(Received<'_>),
    ) -> io::Result<usize> {
        let n = self.hdrs.len();
        for i in 0..n {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: MAX_DATAGRAM,
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in6).cast();
            h.msg_namelen = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.cmsgs[i].as_mut_ptr().cast();
            h.msg_controllen = PKTINFO_SPACE as _;
            h.msg_flags = 0;
        }
        // SAFETY: every header points at buffers owned by `self` of the sizes given.
        let r = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                n as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        let got = r as usize;
        for i in 0..got {
            let h = &self.hdrs[i].msg_hdr;
            let mut dst = Ipv6Addr::UNSPECIFIED;
            let mut fragmented = false;
            // SAFETY: the kernel filled msg_control/msg_controllen; CMSG_FIRSTHDR/NXTHDR walk
            // only within that length.
            let mut c = unsafe { libc::CMSG_FIRSTHDR(h) };
            while !c.is_null() {
                // SAFETY: `c` is a valid control header inside the buffer (see above).
                let hdr = unsafe { &*c };
                if hdr.cmsg_level == libc::IPPROTO_IPV6 && hdr.cmsg_type == libc::IPV6_PKTINFO {
                    // SAFETY: `c` is a valid control header.
                    let data = unsafe { libc::CMSG_DATA(c) };
                    // SAFETY: an IPV6_PKTINFO message carries one in6_pktinfo; it may be
                    // unaligned in the buffer.
                    let info: libc::in6_pktinfo = unsafe { std::ptr::read_unaligned(data.cast()) };
                    dst = Ipv6Addr::from(info.ipi6_addr.s6_addr);
                }
                fragmented |= hdr.cmsg_level == libc::IPPROTO_IPV6
                    && hdr.cmsg_type == libc::IPV6_RECVFRAGSIZE;
                // SAFETY: as above.
                c = unsafe { libc::CMSG_NXTHDR(h, c) };
            }
            let len = (self.hdrs[i].msg_len as usize).min(MAX_DATAGRAM);
            f(Received {
                src: from_sockaddr(&self.addrs[i]),
                dst,
                data: &self.bufs[i][..len],
                fragmented,
            });
        }
        Ok(got)
    }
}

/// Collects BlueBridge messages (header and payload; the kernel adds UDP, IPv6, Ethernet) as a
/// [`FrameSink`], then sends them with one `sendmmsg` per batch. Each message goes to its
/// endpoints' destination and port, from its endpoints' source address (IPV6_PKTINFO).
pub struct DatagramBatch {
    sock: std::net::UdpSocket,
    arena: Vec<u8>,
    entries: Vec<(SocketAddrV6, Ipv6Addr, usize, usize)>,
    sender: UdpSender,
    with_source: bool,
    /// Messages the kernel refused or that did not fit.
    pub dropped: u64,
}

impl std::fmt::Debug for DatagramBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatagramBatch")
            .field("queued", &self.entries.len())
            .finish()
    }
}

/// Messages per batch.
pub const BATCH: usize = 64;

impl DatagramBatch {
    /// A batch sending on `sock`; `with_source`: set each message's source address (a server
    /// answering from page addresses), else let the kernel choose (a client).
    pub fn new(sock: &std::net::UdpSocket, with_source: bool) -> io::Result<Self> {
        Ok(DatagramBatch {
            sock: sock.try_clone()?,
            arena: Vec::with_capacity(
                BATCH * (bluebridge_proto::wire::header::HEADER_LEN + bluebridge_proto::PAGE_SIZE),
            ),
            entries: Vec::with_capacity(BATCH),
            sender: UdpSender::new(BATCH),
            with_source,
            dropped: 0,
        })
    }

    /// Messages waiting to be sent.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sends everything queued (retrying while the kernel takes part of a batch); messages the
    /// kernel refuses are dropped and counted (the client's retransmission recovers them).
    pub fn flush(&mut self) {
        use std::os::fd::AsFd;
        let fd = self.sock.as_fd();
        let mut done = 0;
        while done < self.entries.len() {
            let msgs: Vec<Datagram<'_>> = self.entries[done..]
                .iter()
                .take(BATCH)
                .map(|&(dst, src, at, len)| Datagram {
                    dst,
                    src: self.with_source.then_some(src),
                    head: &self.arena[at..at + len],
                    body: &[],
                })
                .collect();
            match self.sender.send(fd, &msgs) {
                Ok(0) | Err(_) => {
                    self.dropped += (self.entries.len() - done) as u64;
                    break;
                }
                Ok(n) => done += n,
            }
        }
        self.entries.clear();
        self.arena.clear();
    }
}

impl bluebridge_proto::frame::FrameSink for DatagramBatch {
    fn send(
        &mut self,
        ep: &bluebridge_proto::frame::Endpoints,
        header: &bluebridge_proto::BbRepr,
        payload: &[u8],
    ) -> bool {
        use bluebridge_proto::wire::header::{BbPacket, HEADER_LEN};
        if self.entries.len() >= BATCH
            || self.arena.len() + HEADER_LEN + payload.len() > self.arena.capacity()
        {
            self.flush();
        }
        if HEADER_LEN + payload.len() > self.arena.capacity() {
            self.dropped += 1;
            return false;
        }
        let at = self.arena.len();
        self.arena.resize(at + HEADER_LEN, 0);
        header.emit(&mut BbPacket::new_unchecked(&mut self.arena[at..]));
        self.arena.extend_from_slice(payload);
        let dst = SocketAddrV6::new(ep.dst, ep.dst_port, 0, 0);
        self.entries
            .push((dst, ep.src, at, HEADER_LEN + payload.len()));
        true
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn batch_round_trip_with_pktinfo_on_loopback() {
        let a = UdpSocket::bind("[::1]:0").unwrap();
        let b = UdpSocket::bind("[::1]:0").unwrap();
        nix::sys::socket::setsockopt(&b, nix::sys::socket::sockopt::Ipv6RecvPacketInfo, &true)
            .unwrap();
        let dst = match b.local_addr().unwrap() {
            std::net::SocketAddr::V6(v) => v,
            _ => unreachable!(),
        };
        let mut s = UdpSender::new(8);
        let bodies: Vec<[u8; 1]> = (0..5u8).map(|i| [i]).collect();
        let msgs: Vec<Datagram<'_>> = bodies
            .iter()
            .map(|b| Datagram {
                dst,
                src: Some(Ipv6Addr::LOCALHOST),
                head: &[1, 2],
                body: b,
            })
            .collect();
        assert_eq!(s.send(a.as_fd(), &msgs).unwrap(), 5);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut r = UdpReceiver::new(8);
        let mut got = Vec::new();
        r.recv(b.as_fd(), |m| got.push((m.src, m.dst, m.data.to_vec())))
            .unwrap();
        assert_eq!(got.len(), 5);
        for (i, (src, dst, data)) in got.into_iter().enumerate() {
            assert_eq!(*src.ip(), Ipv6Addr::LOCALHOST);
            assert_eq!(dst, Ipv6Addr::LOCALHOST);
            assert_eq!(data, [1, 2, i as u8]);
        }
        assert_eq!(r.recv(b.as_fd(), |_| panic!("nothing more")).unwrap(), 0);
    }
}
