//! Distributed shared memory over coherent `RemoteRegion`s (docs/paging.md "Sharing"): the
//! litmus suite, a lock-protected counter, a parallel job, and the coherence latencies, each
//! run by every host at once on its own region over the same pages. Used by `bluebridge-dsm`
//! (`cargo xtask dsm`) and by the privileged tests.
//!
//! Every function takes the host's index (hosts 1 and 2 play the two parts of a two-party
//! litmus test; host 0 keeps the barrier), the region's atomic words and a barrier shared by
//! all hosts. Waits give up after [`SPIN_LIMIT`] and count the run as failed, so a broken
//! protocol shows up as a count, not a hang.

use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use bluebridge_proto::PAGE_SIZE;

use crate::Latencies;

/// 64-bit words per page.
pub const WORDS: usize = PAGE_SIZE / 8;
/// The longest a host waits for another's write before it counts the run as failed.
pub const SPIN_LIMIT: Duration = Duration::from_secs(30);

/// Waits until `word` holds `value`; false if it never did within [`SPIN_LIMIT`].
pub fn spin_until(word: &AtomicU64, value: u64) -> bool {
    let start = Instant::now();
    while word.load(SeqCst) != value {
        if start.elapsed() > SPIN_LIMIT {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

/// The outcome of one litmus test on one host: runs, and runs that showed the forbidden
/// outcome (or failed to finish), as this host can tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Litmus {
    /// Runs made.
    pub runs: u64,
    /// Runs with a forbidden outcome.
    pub forbidden: u64,
}

/// Message passing on pages 0 (data, a whole page), 1 (flag) and 2 (acknowledgement): host 1
/// writes the data, then the flag; host 2 waits for the flag and must then see all the data.
/// Needs 3 pages.
pub fn message_passing(host: usize, w: &[AtomicU64], runs: u64) -> Litmus {
    let (flag, ack) = (&w[WORDS], &w[2 * WORDS]);
    let mut out = Litmus::default();
    for run in 1..=runs {
        match host {
            1 => {
                for x in &w[..WORDS] {
                    x.store(run * 1000 + 7, SeqCst);
                }
                flag.store(run, SeqCst);
                if !spin_until(ack, run) {
                    out.forbidden += 1;
                }
            }
            2 => {
                let bad = !spin_until(flag, run)
                    || w[..WORDS].iter().any(|x| x.load(SeqCst) != run * 1000 + 7);
                out.forbidden += u64::from(bad);
                ack.store(run, SeqCst);
            }
            _ => continue,
        }
        out.runs += 1;
    }
    out
}

/// Store buffering and load buffering on words of pages 0 (x) and 1 (y), hosts 1 and 2:
/// per run, whether this host saw the old value after its own store (SB) and whether it saw
/// the other's later store before its own (LB). A run is forbidden when both hosts say yes
/// ([`forbidden_runs`]). Needs 2 pages.
pub fn store_and_load_buffering(
    host: usize,
    w: &[AtomicU64],
    barrier: &Barrier,
    runs: u64,
) -> (Vec<bool>, Vec<bool>) {
    let (x, y) = (&w[0], &w[WORDS]);
    let (mut sb, mut lb) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        barrier.wait();
        let seen = match host {
            1 => {
                x.store(2 * run, SeqCst);
                y.load(SeqCst)
            }
            2 => {
                y.store(2 * run, SeqCst);
                x.load(SeqCst)
            }
            _ => 2 * run,
        };
        sb.push(seen < 2 * run);
        barrier.wait();
        let seen = match host {
            1 => {
                let r = x.load(SeqCst);
                y.store(2 * run + 1, SeqCst);
                r
            }
            2 => {
                let r = y.load(SeqCst);
                x.store(2 * run + 1, SeqCst);
                r
            }
            _ => 0,
        };
        lb.push(seen == 2 * run + 1);
        barrier.wait();
    }
    (sb, lb)
}

/// Runs where both hosts' flags are set: the forbidden outcomes of a two-party test.
pub fn forbidden_runs(a: &[bool], b: &[bool]) -> u64 {
    a.iter().zip(b).filter(|(x, y)| **x && **y).count() as u64
}

/// Write-write on one word (page 0): every host writes it at once, four times; afterwards
/// each reads it. Returns what this host read per run; all hosts must agree, on some host's
/// last write ([`write_write_forbidden`]). Needs 1 page.
pub fn write_write(host: usize, w: &[AtomicU64], barrier: &Barrier, runs: u64) -> Vec<u64> {
    let word = &w[0];
    let mut finals = Vec::new();
    for run in 1..=runs {
        barrier.wait();
        for k in 0..4 {
            word.store(run << 8 | (host as u64) << 4 | k, SeqCst);
        }
        barrier.wait();
        finals.push(word.load(SeqCst));
        barrier.wait();
    }
    finals
}

/// Runs in which the hosts' final reads of [`write_write`] disagree, or are no host's last
/// write of that run.
pub fn write_write_forbidden(per_host: &[Vec<u64>]) -> u64 {
    let runs = per_host.first().map_or(0, Vec::len);
    (0..runs)
        .filter(|&r| {
            let v = per_host[0][r];
            per_host.iter().any(|h| h[r] != v) || v >> 8 != r as u64 + 1 || v & 0xf != 3
        })
        .count() as u64
}

/// A lock word (page 0) taken with compare-and-swap guards a plain read-modify-write of a
/// counter (page 1): `rounds` increments per host. Returns the counter as this host reads it
/// once every host is done (every host must read `hosts × rounds`), or `None` if the lock
/// never came. Needs 2 pages.
pub fn lock_counter(host: usize, w: &[AtomicU64], barrier: &Barrier, rounds: u64) -> Option<u64> {
    let (lock, counter) = (&w[0], &w[WORDS]);
    barrier.wait();
    let mut ok = true;
    for _ in 0..rounds {
        let start = Instant::now();
        // Test, then test-and-set: waiting on a read copy costs no write copy, so waiters do
        // not pass the lock's page back and forth while it is held.
        loop {
            if lock.load(SeqCst) == 0
                && lock
                    .compare_exchange(0, host as u64 + 1, SeqCst, SeqCst)
                    .is_ok()
            {
                break;
            }
            if start.elapsed() > SPIN_LIMIT {
                ok = false;
                break;
            }
            std::thread::yield_now();
        }
        if !ok {
            break;
        }
        let v = counter.load(SeqCst);
        counter.store(v + 1, SeqCst);
        lock.store(0, SeqCst);
    }
    barrier.wait();
    ok.then(|| counter.load(SeqCst))
}

/// The byte a parallel job writes at offset `i` of page `page`.
pub fn cell(page: usize, i: usize) -> u8 {
    ((page * 131 + i * 7) ^ (i >> 5)) as u8
}

/// A parallel job: of `hosts × per_host` pages, each host fills its own part (page by page,
/// word by word), then checks every byte of the whole array. Returns the bytes that differ.
pub fn parallel_fill(
    host: usize,
    hosts: usize,
    per_host: usize,
    w: &[AtomicU64],
    barrier: &Barrier,
) -> usize {
    for page in host * per_host..(host + 1) * per_host {
        for k in 0..WORDS {
            let mut word = [0u8; 8];
            for (j, b) in word.iter_mut().enumerate() {
                *b = cell(page, k * 8 + j);
            }
            w[page * WORDS + k].store(u64::from_le_bytes(word), SeqCst);
        }
    }
    barrier.wait();
    let mut bad = 0;
    for page in 0..hosts * per_host {
        for k in 0..WORDS {
            let word = w[page * WORDS + k].load(SeqCst).to_le_bytes();
            bad += (0..8).filter(|&j| word[j] != cell(page, k * 8 + j)).count();
        }
    }
    barrier.wait();
    bad
}

/// Labels of [`coherence_latencies`].
pub const READ_FAULT: &str = "shared read fault";
/// Upgrade of a read copy with 0, 1, 2 other readers.
pub const UPGRADE: [&str; 3] = [
    "upgrade, 0 other readers",
    "upgrade, 1 other reader",
    "upgrade, 2 other readers",
];
/// A write fault that recalls another host's dirty copy.
pub const RECALL: &str = "write fault recalling a dirty copy";
/// One hand-over of a page between two writers taking turns.
pub const PING_PONG: &str = "ping-pong hand-over";

fn timed(l: &mut Latencies, label: &'static str, f: impl FnOnce()) {
    let t = Instant::now();
    f();
    l.record(label, t.elapsed().as_nanos() as u64);
}

/// The coherence latencies, measured on host 0 with hosts 1 and 2 helping: `samples` of
/// each, every sample on a page of its own ([`latency_pages`]: the last is the ping-pong
/// page). Returns host 0's histograms (the helpers' are empty).
pub fn coherence_latencies(
    host: usize,
    w: &[AtomicU64],
    barrier: &Barrier,
    samples: usize,
) -> Latencies {
    let mut l = Latencies::default();
    let page = |k: usize| &w[k * WORDS];
    // A read fault on a page nobody holds.
    for s in 0..samples {
        if host == 0 {
            timed(&mut l, READ_FAULT, || {
                page(s).load(SeqCst);
            });
        }
    }
    barrier.wait();
    // Upgrades: host 0 holds a read copy (from above) and `others` hosts read it too.
    for s in 0..samples {
        let others = s % 3;
        if (1..=others).contains(&host) {
            page(s).load(SeqCst);
        }
        barrier.wait();
        if host == 0 {
            timed(&mut l, UPGRADE[others], || page(s).store(1, SeqCst));
        }
        barrier.wait();
    }
    // A write that recalls host 1's dirty copy.
    for s in 0..samples {
        let p = samples + s;
        if host == 1 {
            page(p).store(7, SeqCst);
        }
        barrier.wait();
        if host == 0 {
            timed(&mut l, RECALL, || page(p).store(8, SeqCst));
        }
        barrier.wait();
    }
    // Ping-pong: hosts 0 and 1 take turns incrementing one word.
    let word = page(2 * samples);
    barrier.wait();
    if host <= 1 {
        let mut last = Instant::now();
        for turn in 0..2 * samples as u64 {
            if turn % 2 != host as u64 {
                continue;
            }
            if !spin_until(word, turn) {
                break;
            }
            if host == 0 && turn > 0 {
                // From our last store to the other's answer: two hand-overs.
                l.record(PING_PONG, last.elapsed().as_nanos() as u64 / 2);
            }
            word.store(turn + 1, SeqCst);
            last = Instant::now();
        }
    }
    barrier.wait();
    l
}

/// Pages [`coherence_latencies`] uses.
pub fn latency_pages(samples: usize) -> usize {
    2 * samples + 1
}
