//! The engine's bookkeeping of requests in flight: a slab keyed by ticket (index and
//! generation: found without hashing, never confused with an earlier request in the same
//! place) and a heap of retransmission deadlines (the earliest found without a scan; entries
//! made stale by a reply or a later deadline are skipped when they come up).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

struct Entry<T> {
    generation: u32,
    value: Option<T>,
}

/// Values by ticket. A ticket is never 0.
pub(crate) struct Slab<T> {
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Slab<T> {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Slab {
            entries: Vec::with_capacity(n),
            free: Vec::with_capacity(n),
            len: 0,
        }
    }

    fn split(ticket: u64) -> (usize, u32) {
        ((ticket & 0xffff_ffff) as usize, (ticket >> 32) as u32)
    }

    /// A free place (or a new one) with its generation advanced: its next ticket. Generations
    /// start at 1, so no ticket is 0.
    fn take_place(&mut self) -> (u32, u64) {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.entries.push(Entry {
                    generation: 0,
                    value: None,
                });
                (self.entries.len() - 1) as u32
            }
        };
        let e = &mut self.entries[index as usize];
        e.generation = e.generation.wrapping_add(1).max(1);
        (index, u64::from(e.generation) << 32 | u64::from(index))
    }

    /// Stores `v`; returns its ticket.
    pub(crate) fn insert(&mut self, v: T) -> u64 {
        let (index, ticket) = self.take_place();
        self.entries[index as usize].value = Some(v);
        self.len += 1;
        ticket
    }

    /// A ticket no value will ever have (for a request that fails before it is stored).
    pub(crate) fn spare_ticket(&mut self) -> u64 {
        let (index, ticket) = self.take_place();
        self.free.push(index);
        ticket
    }

    pub(crate) fn get(&self, ticket: u64) -> Option<&T> {
        let (i, g) = Self::split(ticket);
        let e = self.entries.get(i)?;
        if e.generation == g {
            e.value.as_ref()
        } else {
            None
        }
    }

    pub(crate) fn get_mut(&mut self, ticket: u64) -> Option<&mut T> {
        let (i, g) = Self::split(ticket);
        let e = self.entries.get_mut(i)?;
        if e.generation == g {
            e.value.as_mut()
        } else {
            None
        }
    }

    pub(crate) fn remove(&mut self, ticket: u64) -> Option<T> {
        let (i, g) = Self::split(ticket);
        let e = self.entries.get_mut(i)?;
        if e.generation != g {
            return None;
        }
        let v = e.value.take()?;
        self.free.push(i as u32);
        self.len -= 1;
        Some(v)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Every stored value with its ticket.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.entries.iter().enumerate().filter_map(|(i, e)| {
            e.value
                .as_ref()
                .map(|v| (u64::from(e.generation) << 32 | i as u64, v))
        })
    }
}

/// Retransmission deadlines, earliest first. An entry is a hint: the engine checks it against
/// the request's current deadline when it comes up.
#[derive(Debug, Default)]
pub(crate) struct Deadlines {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
}

impl Deadlines {
    pub(crate) fn push(&mut self, at: Instant, ticket: u64) {
        self.heap.push(Reverse((at, ticket)));
    }

    /// The earliest deadline noted (possibly stale, so never later than the true earliest).
    pub(crate) fn earliest(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// The next entry due by `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(Instant, u64)> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }

    /// Drops stale entries at the top (those `live` says no longer hold).
    pub(crate) fn trim(&mut self, mut live: impl FnMut(Instant, u64) -> bool) {
        while let Some(Reverse((at, t))) = self.heap.peek() {
            if live(*at, *t) {
                break;
            }
            self.heap.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn tickets_are_unique_and_never_zero() {
        let mut s = Slab::with_capacity(2);
        let a = s.insert("a");
        let b = s.insert("b");
        assert!(a != 0 && b != 0 && a != b);
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.get(a), None);
        let c = s.insert("c");
        assert_ne!(c, a, "the same place, another generation");
        assert_eq!(s.get(a), None);
        assert_eq!(s.get(c), Some(&"c"));
        assert_eq!(s.len(), 2);
        assert_eq!(s.iter().count(), 2);
        assert_eq!(s.remove(a), None);
        let spare = s.spare_ticket();
        assert!(spare != a && spare != b && spare != c);
        let d = s.insert("d");
        assert_ne!(d, spare);
        assert_eq!(s.get(spare), None);
    }

    #[test]
    fn deadlines_come_up_in_order() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        for (ms, t) in [(5, 1), (1, 2), (3, 3)] {
            d.push(t0 + Duration::from_millis(ms), t);
        }
        assert_eq!(d.earliest(), Some(t0 + Duration::from_millis(1)));
        let now = t0 + Duration::from_millis(4);
        let due: Vec<u64> = std::iter::from_fn(|| d.pop_due(now).map(|e| e.1)).collect();
        assert_eq!(due, [2, 3]);
        d.trim(|_, t| t != 1);
        assert_eq!(d.earliest(), None);
    }
}
