//! The hand-off between shards: a frame that arrives on one worker's queue for a page of
//! another shard (the NIC had no rule for it, or a client sent it on the wrong queue) is copied
//! into a buffer and passed to the owning worker, which answers it through its own socket.
//!
//! One bounded single-producer single-consumer channel per ordered pair of shards, built from
//! two crossbeam `ArrayQueue`s of preallocated buffers: `free` (owned by the receiver's side
//! once drained, returned to the sender) and `full`. Nothing is allocated after start-up; a
//! full channel drops the frame (counted by the sender as `handoff_dropped`; the client
//! retransmits). The queues are lock-free and their push/pop synchronise the buffer contents
//! (release on push, acquire on pop).
//!
//! A worker that sleeps in `poll()` (idle mode) first raises its `sleeping` flag and checks its
//! inbound channels once more; a sender that then finds the flag raised writes the worker's
//! eventfd, which the sleeping `poll()` also waits on. Both sides order the flag against the
//! queue with SeqCst fences, so either the sleeper sees the frame or the sender sees the flag.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering, fence};

use crossbeam_queue::ArrayQueue;
use nix::sys::eventfd::{EfdFlags, EventFd};

/// A frame in transit.
#[derive(Debug)]
struct Buf {
    len: usize,
    data: Box<[u8]>,
}

#[derive(Debug)]
struct Channel {
    full: ArrayQueue<Buf>,
    free: ArrayQueue<Buf>,
}

/// How a worker is woken from an idle sleep.
#[derive(Debug)]
struct Waker {
    sleeping: AtomicBool,
    fd: EventFd,
}

/// Every shard's channels to every other.
#[derive(Debug)]
pub struct Handoff {
    shards: usize,
    /// `channels[from * shards + to]`; the diagonal is unused (and empty).
    channels: Vec<Channel>,
    wakers: Vec<Waker>,
    frame_bytes: usize,
    /// Buffers per channel between two different shards.
    depth: usize,
}

/// Frames one worker takes from one channel per drain (so a busy sender cannot starve the
/// worker's own queue).
const DRAIN_BATCH: usize = 64;

impl Handoff {
    /// Channels for `shards` shards, each holding up to `depth` frames of up to `frame_bytes`.
    pub fn new(shards: usize, depth: usize, frame_bytes: usize) -> std::io::Result<Self> {
        let depth = depth.max(1);
        let mut channels = Vec::with_capacity(shards * shards);
        for from in 0..shards {
            for to in 0..shards {
                let n = if from == to { 1 } else { depth };
                let free = ArrayQueue::new(n);
                if from != to {
                    for _ in 0..n {
                        let b = Buf {
                            len: 0,
                            data: vec![0u8; frame_bytes].into_boxed_slice(),
                        };
                        free.push(b).expect("sized for it");
                    }
                }
                channels.push(Channel {
                    full: ArrayQueue::new(n),
                    free,
                });
            }
        }
        let wakers = (0..shards)
            .map(|_| {
                Ok(Waker {
                    sleeping: AtomicBool::new(false),
                    fd: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
                })
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Handoff {
            shards,
            channels,
            wakers,
            frame_bytes,
            depth,
        })
    }

    fn channel(&self, from: usize, to: usize) -> &Channel {
        &self.channels[from * self.shards + to]
    }

    /// Passes `frame` from shard `from`'s worker to shard `to`. False if the channel is full or
    /// the frame too large (dropped: the sender counts it).
    pub fn send(&self, from: usize, to: usize, frame: &[u8]) -> bool {
        self.send_parts(from, to, &[frame])
    }

    /// Like [`Handoff::send`], for a frame received in pieces (copied together into the
    /// channel's buffer).
    pub fn send_parts(&self, from: usize, to: usize, parts: &[&[u8]]) -> bool {
        let ch = self.channel(from, to);
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > self.frame_bytes {
            return false;
        }
        let Some(mut b) = ch.free.pop() else {
            return false;
        };
        let mut at = 0;
        for p in parts {
            b.data[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        b.len = len;
        ch.full
            .push(b)
            .expect("a buffer from free always fits full");
        // Pairs with the fence in `sleep`: either that worker sees this frame before it sleeps,
        // or we see it asleep and wake it.
        fence(Ordering::SeqCst);
        let w = &self.wakers[to];
        if w.sleeping.load(Ordering::Relaxed) {
            // EAGAIN (the counter is saturated) still leaves it readable: it wakes either way.
            let _ = w.fd.write(1);
        }
        true
    }

    /// Whether frames wait for shard `to`.
    pub fn pending(&self, to: usize) -> bool {
        (0..self.shards).any(|from| from != to && !self.channel(from, to).full.is_empty())
    }

    /// Calls `f` for frames waiting for shard `to` (a batch per sender); returns how many.
    pub fn drain(&self, to: usize, mut f: impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        for from in (0..self.shards).filter(|&s| s != to) {
            let ch = self.channel(from, to);
            for _ in 0..DRAIN_BATCH {
                let Some(b) = ch.full.pop() else { break };
                f(&b.data[..b.len]);
                n += 1;
                ch.free.push(b).expect("every buffer has a free place");
            }
        }
        n
    }

    /// Marks shard `to`'s worker as going to sleep. False if frames are already waiting (do not
    /// sleep then); otherwise the worker must call [`Handoff::woke`] after its sleep.
    pub fn sleep(&self, to: usize) -> bool {
        self.wakers[to].sleeping.store(true, Ordering::Relaxed);
        // Pairs with the fence in `send`.
        fence(Ordering::SeqCst);
        if self.pending(to) {
            self.wakers[to].sleeping.store(false, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Shard `to`'s worker is awake again: clear the flag and the eventfd.
    pub fn woke(&self, to: usize) {
        let w = &self.wakers[to];
        w.sleeping.store(false, Ordering::Relaxed);
        // Non-blocking: EAGAIN when nobody wrote.
        let _ = w.fd.read();
    }

    /// The eventfd a sleeping shard `to` must also wait on.
    pub fn wake_fd(&self, to: usize) -> BorrowedFd<'_> {
        self.wakers[to].fd.as_fd()
    }

    /// Bytes of the buffers (for the memory report).
    pub fn bytes(&self) -> usize {
        self.shards * self.shards.saturating_sub(1) * self.depth * (self.frame_bytes + 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_reach_their_shard_in_order_and_buffers_come_back() {
        let h = Handoff::new(3, 4, 64).unwrap();
        for i in 0..4u8 {
            assert!(h.send(0, 2, &[i; 10]));
        }
        assert!(!h.send(0, 2, &[9; 10]), "the channel holds 4");
        assert!(h.send(1, 2, &[7; 3]));
        assert!(!h.send(1, 2, &[0; 65]), "larger than a buffer");
        assert!(h.pending(2) && !h.pending(0) && !h.pending(1));
        let mut got = Vec::new();
        assert_eq!(h.drain(2, |f| got.push(f.to_vec())), 5);
        let want: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 10]).chain([vec![7; 3]]).collect();
        assert_eq!(got, want);
        assert!(!h.pending(2));
        // 6 ordered pairs of different shards, 4 buffers of 64 bytes (+ bookkeeping) each.
        assert_eq!(h.bytes(), 6 * 4 * (64 + 32));
        // Every buffer went back: the channel takes 4 again.
        for _ in 0..4 {
            assert!(h.send(0, 2, &[1]));
        }
    }

    #[test]
    fn a_sleeper_is_woken_or_does_not_sleep() {
        let h = Handoff::new(2, 4, 16).unwrap();
        assert!(h.send(0, 1, b"x"));
        assert!(!h.sleep(1), "a frame is waiting: no sleep");
        h.drain(1, |_| {});
        assert!(h.sleep(1));
        assert!(h.send(0, 1, b"y"));
        // The sender saw the flag and wrote the eventfd: it reads 1.
        assert_eq!(h.wakers[1].fd.read().unwrap(), 1);
        h.woke(1);
        assert!(!h.wakers[1].sleeping.load(Ordering::Relaxed));
    }

    #[test]
    fn two_threads_hand_off_every_frame_exactly_once() {
        let h = std::sync::Arc::new(Handoff::new(2, 8, 16).unwrap());
        let n = 100_000u64;
        let tx = {
            let h = h.clone();
            std::thread::spawn(move || {
                let mut i = 0u64;
                while i < n {
                    if h.send(0, 1, &i.to_le_bytes()) {
                        i += 1;
                    } else {
                        std::thread::yield_now();
                    }
                }
            })
        };
        let mut next = 0u64;
        while next < n {
            h.drain(1, |f| {
                assert_eq!(u64::from_le_bytes(f.try_into().unwrap()), next);
                next += 1;
            });
        }
        tx.join().unwrap();
        assert!(!h.pending(1));
    }
}
