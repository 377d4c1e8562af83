//! A userspace impairment relay: the link-layer equivalent of `tc netem` for this project's
//! tests. This kernel is built without `sch_netem`, and AF_XDP copy-mode transmission
//! bypasses qdiscs anyway, so a middle namespace forwards every frame between the client side
//! and the server side itself, dropping, duplicating and delaying (hence reordering) frames
//! with a seeded random generator.

use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pnet_datalink::{Channel, Config, NetworkInterface};

use crate::TopologyError;

/// What happens to frames crossing the relay (each direction independently).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// Fraction of frames dropped.
    pub loss: f64,
    /// Fraction of frames sent twice.
    pub duplicate: f64,
    /// Fraction of frames held back by a random delay in `0..=max_delay`, so later frames
    /// overtake them.
    pub reorder: f64,
    /// Longest hold-back.
    pub max_delay: Duration,
}

impl Impairment {
    /// Frames pass untouched.
    pub const NONE: Impairment = Impairment {
        loss: 0.0,
        duplicate: 0.0,
        reorder: 0.0,
        max_delay: Duration::ZERO,
    };
}

/// Frames seen and what was done to them, per direction.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Frames received from the sender's side.
    pub frames: AtomicU64,
    /// Dropped.
    pub lost: AtomicU64,
    /// Sent twice.
    pub duplicated: AtomicU64,
    /// Held back.
    pub delayed: AtomicU64,
}

/// The running relay; stopped on drop.
#[derive(Debug)]
pub struct Relay {
    stop: Arc<AtomicBool>,
    impairment: Arc<Mutex<Impairment>>,
    /// Client → server, server → client.
    pub counters: [Arc<RelayCounters>; 2],
    threads: Vec<JoinHandle<()>>,
}

/// xorshift64: deterministic for a seed.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % 1_000_000) as f64 / 1_000_000.0
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

struct Held {
    at: Instant,
    frame: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.at.cmp(&self.at) // earliest first out of the max-heap
    }
}

fn interface(name: &str) -> Result<NetworkInterface, TopologyError> {
    pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.name == name)
        .ok_or_else(|| TopologyError::Command {
            cmd: format!("finding interface {name}"),
            stderr: "no such interface in this namespace".into(),
        })
}

impl Relay {
    /// Starts relaying in namespace `ns` between `a` (towards the host with MAC `a_mac`) and
    /// `b` (towards `b_mac`). Each direction forwards only frames from the host on its side.
    pub fn start(
        ns: &str,
        a: &str,
        a_mac: [u8; 6],
        b: &str,
        b_mac: [u8; 6],
        seed: u64,
    ) -> Result<Relay, TopologyError> {
        let stop = Arc::new(AtomicBool::new(false));
        let impairment = Arc::new(Mutex::new(Impairment::NONE));
        let counters = [
            Arc::new(RelayCounters::default()),
            Arc::new(RelayCounters::default()),
        ];
        let mut threads = Vec::new();
        for (dir, (from, from_mac, to)) in [(a, a_mac, b), (b, b_mac, a)].into_iter().enumerate() {
            let (ns, from, to) = (ns.to_owned(), from.to_owned(), to.to_owned());
            let (stop, imp, cnt) = (stop.clone(), impairment.clone(), counters[dir].clone());
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            threads.push(std::thread::spawn(move || {
                let setup = || -> Result<_, TopologyError> {
                    crate::enter(&ns)?;
                    let cfg = Config {
                        read_timeout: Some(Duration::from_micros(100)),
                        read_buffer_size: 16384,
                        write_buffer_size: 16384,
                        ..Config::default()
                    };
                    let open = |name: &str| match pnet_datalink::channel(&interface(name)?, cfg) {
                        Ok(Channel::Ethernet(tx, rx)) => Ok((tx, rx)),
                        Ok(_) => Err(TopologyError::Command {
                            cmd: format!("raw socket on {name}"),
                            stderr: "unknown channel".into(),
                        }),
                        Err(e) => Err(TopologyError::Command {
                            cmd: format!("raw socket on {name}"),
                            stderr: e.to_string(),
                        }),
                    };
                    let (_, rx) = open(&from)?;
                    let (tx, _) = open(&to)?;
                    Ok((rx, tx))
                };
                let (mut rx, mut tx) = match setup() {
                    Ok(x) => {
                        let _ = ready_tx.send(Ok(()));
                        x
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut rng = Rng(seed ^ (dir as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
                let mut held: BinaryHeap<Held> = BinaryHeap::new();
                while !stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    while held.peek().is_some_and(|h| h.at <= now) {
                        let h = held.pop().expect("peeked");
                        let _ = tx.send_to(&h.frame, None);
                    }
                    let Ok(frame) = rx.next() else { continue };
                    // Only what the host on this side sent (not our own transmissions).
                    if frame.len() < 14 || frame[6..12] != from_mac {
                        continue;
                    }
                    cnt.frames.fetch_add(1, Ordering::Relaxed);
                    let imp = *imp.lock().expect("poisoned");
                    if rng.chance(imp.loss) {
                        cnt.lost.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let copies = if rng.chance(imp.duplicate) {
                        cnt.duplicated.fetch_add(1, Ordering::Relaxed);
                        2
                    } else {
                        1
                    };
                    for _ in 0..copies {
                        if rng.chance(imp.reorder) && imp.max_delay > Duration::ZERO {
                            cnt.delayed.fetch_add(1, Ordering::Relaxed);
                            let at = now + imp.max_delay.mul_f64(rng.unit());
                            held.push(Held {
                                at,
                                frame: frame.to_vec(),
                            });
                        } else {
                            let _ = tx.send_to(frame, None);
                        }
                    }
                }
            }));
            ready_rx.recv().map_err(|_| TopologyError::Command {
                cmd: "relay thread".into(),
                stderr: "died".into(),
            })??;
        }
        Ok(Relay {
            stop,
            impairment,
            counters,
            threads,
        })
    }

    /// Changes the impairment (both directions).
    pub fn set(&self, i: Impairment) {
        *self.impairment.lock().expect("poisoned") = i;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
