//! When each client address was last heard, shared by every shard of a server: what tells a
//! live page owner from a dead one (§5.17 of the protocol).
//!
//! A fixed table of 32-bit millisecond stamps, written lock-free by every worker for every
//! request it accepts. An address has two slots, chosen by a hash under a random key; hearing
//! it stamps both, and its silence is that of the older of the two. Two addresses share a
//! slot by chance, so a dead owner can look alive while a live one stamps its slots — but only
//! if *both* of its slots are shared with live addresses: with `n` live addresses in a table of
//! `s` slots the chance is about `(2n/s)²`, and the error is on the safe side (pages kept, not
//! freed). Nothing here allocates after start-up, whatever the sources.
//!
//! A stamp is written only when it is at least [`RESOLUTION_MS`] old, so a busy client costs
//! one relaxed load per request and its cache lines are not bounced between workers.
//!
//! Time the whole server stood still (stopped by a signal, its VM paused, starved of every
//! core) is not silence: nobody could have been heard. Every worker [`tick`](Liveness::tick)s
//! the table at least every 100 ms; a gap of more than [`PAUSE_MS`] between any two ticks of
//! all workers together is taken off the clock the table runs on.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Stamps closer together than this are not rewritten.
pub const RESOLUTION_MS: u32 = 16;

/// A gap between ticks longer than this is a pause of the whole server.
pub const PAUSE_MS: u64 = 1_000;

/// Slots of the table: 2^17 × 4 bytes = 512 KiB.
const SLOT_BITS: u32 = 17;

/// The last-heard table.
pub struct Liveness {
    /// `now_ms + 1` when last heard (0: never).
    slots: Box<[AtomicU32]>,
    keys: [u64; 4],
    /// The last tick, real ms + 1 (0: none yet).
    ticked_ms: AtomicU64,
    /// Pauses so far, ms: the table's clock is real time minus these.
    paused_ms: AtomicU64,
}

impl std::fmt::Debug for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Liveness { .. }") // the keys stay out of logs
    }
}

impl Liveness {
    /// An empty table under `keys`.
    pub fn with_keys(keys: [u64; 4]) -> Self {
        Liveness {
            slots: (0..1u32 << SLOT_BITS).map(|_| AtomicU32::new(0)).collect(),
            keys: keys.map(|k| k | 1),
            ticked_ms: AtomicU64::new(0),
            paused_ms: AtomicU64::new(0),
        }
    }

    /// An empty table under a fresh random key.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k)?;
        let w = |i: usize| u64::from_le_bytes(k[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        Ok(Self::with_keys([w(0), w(1), w(2), w(3)]))
    }

    fn slots_of(&self, addr: &[u8; 16]) -> [usize; 2] {
        let hi = u64::from_be_bytes(addr[..8].try_into().expect("8 bytes"));
        let lo = u64::from_be_bytes(addr[8..].try_into().expect("8 bytes"));
        let h = |a: u64, b: u64| {
            let x = (hi ^ a).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (lo ^ b).rotate_left(29);
            let x = (x ^ (x >> 32)).wrapping_mul(0xd6e8_feb8_6659_fd93);
            ((x ^ (x >> 32)) >> (64 - SLOT_BITS)) as usize
        };
        [h(self.keys[0], self.keys[1]), h(self.keys[2], self.keys[3])]
    }

    /// A worker is running at `now_ms`; returns the length of the pause this tick ends (0 if
    /// none). Only one of the workers that tick after a pause sees it.
    pub fn tick(&self, now_ms: u64) -> u64 {
        let last = self.ticked_ms.swap(now_ms + 1, Ordering::Relaxed);
        let gap = (now_ms + 1).saturating_sub(last);
        if last == 0 || gap <= PAUSE_MS {
            return 0;
        }
        self.paused_ms.fetch_add(gap, Ordering::Relaxed);
        gap
    }

    /// The table's clock at real time `now_ms`: pauses taken off.
    fn clock(&self, now_ms: u64) -> u32 {
        let c = now_ms.saturating_sub(self.paused_ms.load(Ordering::Relaxed));
        (c as u32).wrapping_add(1)
    }

    /// `addr` was heard at `now_ms` (milliseconds on the server's clock).
    pub fn heard(&self, addr: &[u8; 16], now_ms: u64) {
        let stamp = self.clock(now_ms);
        for i in self.slots_of(addr) {
            let s = &self.slots[i];
            let old = s.load(Ordering::Relaxed);
            if old == 0 || stamp.wrapping_sub(old) >= RESOLUTION_MS {
                s.store(stamp, Ordering::Relaxed);
            }
        }
    }

    /// Milliseconds since `addr` was last heard, as of `now_ms`; `u64::MAX` if never (or so
    /// long ago that the 32-bit clock wrapped, ~49 days: far past any grace period).
    pub fn silent_ms(&self, addr: &[u8; 16], now_ms: u64) -> u64 {
        let now = self.clock(now_ms);
        self.slots_of(addr)
            .into_iter()
            .map(|i| match self.slots[i].load(Ordering::Relaxed) {
                0 => u64::MAX,
                // A stamp "ahead" of now is one from before a wrap.
                t if now.wrapping_sub(t) > u32::MAX / 2 => u64::MAX,
                t => u64::from(now.wrapping_sub(t)),
            })
            .max()
            .unwrap_or(u64::MAX)
    }

    /// Bytes the table takes (for the memory report).
    pub fn bytes(&self) -> usize {
        self.slots.len() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u32) -> [u8; 16] {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[0xfd, 0, 0, 0xbb]);
        a[12..].copy_from_slice(&i.to_be_bytes());
        a
    }

    #[test]
    fn silence_counts_from_the_last_time_heard() {
        let l = Liveness::with_keys([1, 2, 3, 4]);
        assert_eq!(l.silent_ms(&addr(1), 5), u64::MAX);
        l.heard(&addr(1), 1_000);
        assert_eq!(l.silent_ms(&addr(1), 1_000), 0);
        assert_eq!(l.silent_ms(&addr(1), 4_000), 3_000);
        // Within the resolution the stamp stays; past it, it moves.
        l.heard(&addr(1), 1_010);
        assert_eq!(l.silent_ms(&addr(1), 2_000), 1_000);
        l.heard(&addr(1), 1_500);
        assert_eq!(l.silent_ms(&addr(1), 2_000), 500);
        assert_eq!(l.silent_ms(&addr(2), 2_000), u64::MAX);
        // Across the 32-bit wrap of the millisecond clock.
        let t = u64::from(u32::MAX) - 5;
        l.heard(&addr(3), t);
        assert_eq!(l.silent_ms(&addr(3), t + 100), 100);
    }

    #[test]
    fn a_pause_of_the_whole_server_is_not_silence() {
        let l = Liveness::with_keys([5, 6, 7, 8]);
        assert_eq!(l.tick(10_000), 0, "the first tick");
        l.heard(&addr(1), 10_000);
        // Two workers tick every 100 ms: no pause, silence grows.
        for t in (10_100..=12_000).step_by(100) {
            assert_eq!(l.tick(t) + l.tick(t + 50), 0);
        }
        assert_eq!(l.silent_ms(&addr(1), 12_050), 2_050);
        // Then nothing runs for 10 minutes: it counts once, for whoever ticks first.
        assert_eq!(l.tick(612_050), 600_000);
        assert_eq!(l.tick(612_060), 0);
        assert_eq!(l.silent_ms(&addr(1), 612_060), 2_060);
        l.heard(&addr(2), 612_060);
        assert_eq!(l.silent_ms(&addr(2), 612_560), 500);
    }

    #[test]
    fn a_dead_owner_is_seen_dead_among_many_live_ones() {
        let l = Liveness::with_keys([11, 12, 13, 14]);
        // 10,000 live addresses and 1,000 dead ones: a dead one looks alive only if both its
        // slots are taken by live ones (~(2·10⁴/2^17)² ≈ 2%).
        for i in 0..11_000 {
            l.heard(&addr(i), 0);
        }
        for i in 0..10_000 {
            l.heard(&addr(i), 60_000);
        }
        let alive = (10_000..11_000)
            .filter(|&i| l.silent_ms(&addr(i), 60_000) < 60_000)
            .count();
        assert!(alive < 60, "{alive} of 1000 dead owners look alive");
        assert!((0..10_000).all(|i| l.silent_ms(&addr(i), 60_000) == 0));
    }
}
