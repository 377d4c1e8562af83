//! The prefetcher's trend detector: which pages a region will fault on next, from the faults
//! it has seen.
//!
//! It keeps a few **streams** (the last [`STREAMS`] places faults happened). A fault within
//! [`MAX_STRIDE`] pages of a stream's last one gives the stream its stride (+1 sequential, −1
//! reverse, ±k strided); a fault that lands where a stream was heading — one of the pages it
//! prefetched, or the first page past them — *continues* it. A continued stream doubles its
//! depth (up to the region's adaptive cap) and asks for the pages up to `depth` strides past
//! the fault. Several streams at once cover interleaved patterns: a partition scanning from
//! both ends of an array is two streams, +1 and −1; Leap's single majority trend would see
//! noise there.
//!
//! Pages the program reads from a prefetched page raise no fault, so the detector cannot see a
//! stream advance through them. The first page of every batch it asks for is therefore a
//! **marker**: the handler keeps its bytes without installing them, so the program's arrival
//! there faults (cheaply: the bytes are at hand) and continues the stream while the rest of
//! the batch still lies ahead — the pipe stays full instead of draining once per batch.
//!
//! The cap adapts: a prefetched page used raises it by one, one evicted unused (wasted)
//! lowers it by one, between 2 and the limit the region sets (a quarter of the resident
//! budget at most, so prefetching cannot flush what the program works on).

/// Streams tracked at once.
pub(super) const STREAMS: usize = 8;
/// The largest stride (in pages) a stream may have.
pub(super) const MAX_STRIDE: i64 = 8;
/// The depth a new stream starts with.
const START_DEPTH: usize = 2;

#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    /// The page of the stream's last fault.
    last: i64,
    /// Pages between accesses (0: one fault seen, stride unknown).
    stride: i64,
    /// The next page it would prefetch.
    next: i64,
    /// Strides ahead of the last fault it prefetches.
    depth: usize,
    /// When it last saw a fault (for replacing the least recent).
    seen: u64,
    /// In use.
    live: bool,
}

/// Hints on how a range of the region will be used (see `PagedRegion::advise`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// Read in order: the first fault in the range starts a +1 stream at full depth.
    Sequential,
    /// No order: faults in the range never start or continue a stream.
    Random,
    /// The whole range will be needed soon: fetch it now (as much as a quarter of the
    /// resident budget allows).
    WillNeed,
    /// Forget the hints given for the range.
    Normal,
}

/// The trend detector of one region.
#[derive(Debug)]
pub(super) struct Detector {
    streams: [Stream; STREAMS],
    clock: u64,
    pages: i64,
    /// Most strides ahead a stream may prefetch now (adapts between 2 and `limit`).
    cap: usize,
    limit: usize,
}

impl Detector {
    /// A detector for a region of `pages` pages prefetching at most `limit` pages ahead per
    /// stream (0: never).
    pub(super) fn new(pages: usize, limit: usize) -> Self {
        Detector {
            streams: [Stream::default(); STREAMS],
            clock: 0,
            pages: pages as i64,
            cap: limit.min(8),
            limit,
        }
    }

    /// The current cap on a stream's depth.
    #[cfg(test)]
    fn cap(&self) -> usize {
        self.cap
    }

    /// A prefetched page was used: the cap grows.
    pub(super) fn used(&mut self) {
        self.cap = (self.cap + 1).min(self.limit);
    }

    /// A prefetched page was evicted unused: the cap shrinks.
    pub(super) fn wasted(&mut self) {
        self.cap = self.cap.saturating_sub(1).max(START_DEPTH.min(self.limit));
    }

    /// A fault on `page`; `advice` is the hint for its range. Pushes the pages to prefetch,
    /// nearest first, onto `out` (some may be resident or in flight already: the caller skips
    /// those). When the fault continued a stream (it was predicted) returns the stream's
    /// previous fault and its stride: the pages between were passed through.
    pub(super) fn fault(
        &mut self,
        page: usize,
        advice: Advice,
        out: &mut Vec<usize>,
    ) -> Option<(usize, i64)> {
        if self.limit == 0 || advice == Advice::Random {
            return None;
        }
        self.clock += 1;
        let p = page as i64;
        let clock = self.clock;
        // A stream heading here: its prefetched pages, or the first page past them.
        let continued = self.streams.iter().position(|s| {
            if !s.live || s.stride == 0 {
                return false;
            }
            let d = p - s.last;
            if d % s.stride != 0 {
                return false;
            }
            let k = d / s.stride;
            let ahead = ((s.next - s.last) / s.stride).max(1);
            k >= 1 && k <= ahead + 1
        });
        if let Some(i) = continued {
            let cap = self.cap;
            let s = &mut self.streams[i];
            let passed = (s.last as usize, s.stride);
            s.last = p;
            s.seen = clock;
            s.depth = (s.depth * 2).min(cap).max(1);
            if (s.next - p) / s.stride < 1 {
                s.next = p + s.stride;
            }
            self.extend(i, out);
            return Some(passed);
        }
        // A stream with one fault seen, near this one: its stride is found.
        let near = self
            .streams
            .iter()
            .enumerate()
            .filter(|(_, s)| s.live && s.stride == 0 && s.last != p)
            .filter(|(_, s)| (p - s.last).abs() <= MAX_STRIDE)
            .min_by_key(|(_, s)| (p - s.last).abs())
            .map(|(i, _)| i);
        if let Some(i) = near {
            let s = &mut self.streams[i];
            s.stride = p - s.last;
            s.last = p;
            s.next = p + s.stride;
            s.depth = START_DEPTH.min(self.cap);
            s.seen = clock;
            self.extend(i, out);
            return None;
        }
        // Somewhere new: it replaces the least recent stream.
        let i = self
            .streams
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| if s.live { s.seen } else { 0 })
            .map_or(0, |(i, _)| i);
        self.streams[i] = Stream {
            last: p,
            stride: 0,
            next: p,
            depth: START_DEPTH,
            seen: clock,
            live: true,
        };
        if advice == Advice::Sequential {
            let s = &mut self.streams[i];
            s.stride = 1;
            s.next = p + 1;
            s.depth = self.cap;
            self.extend(i, out);
        }
        None
    }

    /// Pushes stream `i`'s pages from its `next` up to `depth` strides past its last fault.
    fn extend(&mut self, i: usize, out: &mut Vec<usize>) {
        let pages = self.pages;
        let s = &mut self.streams[i];
        let end = s.last + s.stride * s.depth as i64;
        while (s.stride > 0 && s.next <= end) || (s.stride < 0 && s.next >= end) {
            if s.next < 0 || s.next >= pages {
                break;
            }
            out.push(s.next as usize);
            s.next += s.stride;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults(d: &mut Detector, pages: &[usize]) -> Vec<usize> {
        let mut out = Vec::new();
        for &p in pages {
            d.fault(p, Advice::Normal, &mut out);
        }
        out
    }

    #[test]
    fn sequential_stream_is_found_and_deepens() {
        let mut d = Detector::new(1000, 16);
        assert!(faults(&mut d, &[10]).is_empty());
        let mut out = Vec::new();
        assert!(d.fault(11, Advice::Normal, &mut out).is_none());
        assert_eq!(out, vec![12, 13]);
        out.clear();
        // The marker (12) faults: the stream continues and goes deeper.
        assert_eq!(d.fault(12, Advice::Normal, &mut out), Some((11, 1)));
        assert_eq!(out, vec![14, 15, 16]);
    }

    #[test]
    fn reverse_and_strided_streams() {
        let mut d = Detector::new(1000, 8);
        assert_eq!(faults(&mut d, &[500, 499]), vec![498, 497]);
        let mut d = Detector::new(1000, 8);
        assert_eq!(faults(&mut d, &[100, 104]), vec![108, 112]);
    }

    #[test]
    fn two_interleaved_streams_from_both_ends() {
        let mut d = Detector::new(1000, 8);
        let out = faults(&mut d, &[0, 999, 1, 998]);
        assert_eq!(out, vec![2, 3, 997, 996]);
        let mut out = Vec::new();
        assert!(d.fault(2, Advice::Normal, &mut out).is_some());
        assert_eq!(d.fault(997, Advice::Normal, &mut out), Some((998, -1)));
        assert!(out.contains(&4) && out.contains(&995));
    }

    #[test]
    fn random_faults_prefetch_little_and_random_advice_nothing() {
        let mut d = Detector::new(100_000, 16);
        let mut x = 12345u64;
        let mut out = Vec::new();
        let mut predicted = 0;
        for _ in 0..1000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            predicted += usize::from(
                d.fault((x >> 33) as usize % 100_000, Advice::Normal, &mut out)
                    .is_some(),
            );
        }
        assert!(
            out.len() < 50,
            "{} pages prefetched for random faults",
            out.len()
        );
        assert!(predicted < 10);
        let mut d = Detector::new(1000, 16);
        out.clear();
        for p in 0..10 {
            d.fault(p, Advice::Random, &mut out);
        }
        assert!(out.is_empty());
    }

    #[test]
    fn sequential_advice_starts_at_full_depth_and_stays_inside() {
        let mut d = Detector::new(20, 8);
        let mut out = Vec::new();
        d.fault(15, Advice::Sequential, &mut out);
        assert_eq!(out, vec![16, 17, 18, 19]);
    }

    #[test]
    fn cap_adapts_within_bounds() {
        let mut d = Detector::new(100, 16);
        for _ in 0..100 {
            d.wasted();
        }
        assert_eq!(d.cap(), 2);
        for _ in 0..100 {
            d.used();
        }
        assert_eq!(d.cap(), 16);
        let mut d = Detector::new(100, 0);
        let mut out = Vec::new();
        assert!(d.fault(1, Advice::Sequential, &mut out).is_none());
        assert!(out.is_empty());
    }
}
