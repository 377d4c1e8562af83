//! How a page range travels in frames, and putting it back together.
//!
//! A range is cut into `n = ceil(len / max)` segments of equal size rounded up to 8 bytes (the
//! last one takes the rest), so a page on a 9000-byte link without multi-buffer travels as two
//! 2048-byte halves rather than 3,730 + 366 bytes.

use crate::{FRAME_OVERHEAD, MIN_SEG_MAX, PAGE_SIZE};

/// Why a segment was refused, or a reassembly is not done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    /// The segment, or the range, reaches outside the expected range or past the page.
    #[error("segment {offset}+{len} outside the range {range_offset}+{range_len}")]
    OutOfRange {
        /// Segment offset.
        offset: u16,
        /// Segment length.
        len: u16,
        /// Expected range offset.
        range_offset: u16,
        /// Expected range length.
        range_len: u16,
    },
    /// The segment carries no bytes.
    #[error("empty segment")]
    Empty,
    /// Exactly this range was received already (a duplicate or retransmitted reply).
    #[error("duplicate segment {offset}+{len}")]
    Duplicate {
        /// Segment offset.
        offset: u16,
        /// Segment length.
        len: u16,
    },
    /// Part of the segment was received already, in another segment.
    #[error("segment {offset}+{len} overlaps one already received")]
    Overlap {
        /// Segment offset.
        offset: u16,
        /// Segment length.
        len: u16,
    },
    /// The range is not complete: this gap is the first missing part.
    #[error("bytes {offset}+{len} missing")]
    Gap {
        /// First missing byte.
        offset: u16,
        /// Length of the first gap.
        len: u16,
    },
    /// A segment's data length differs from its declared length.
    #[error("segment declares {declared} bytes but carries {carried}")]
    LengthMismatch {
        /// Declared length.
        declared: u16,
        /// Bytes carried.
        carried: usize,
    },
}

/// The most page bytes one frame of `max_frame_len` bytes (Ethernet header included, FCS not)
/// carries, rounded down to 8; `None` if that is below [`MIN_SEG_MAX`].
pub fn max_data_per_frame(max_frame_len: usize) -> Option<u16> {
    let d = max_frame_len.checked_sub(FRAME_OVERHEAD)? & !7;
    let d = d.min(PAGE_SIZE);
    (d >= usize::from(MIN_SEG_MAX)).then_some(d as u16)
}

/// The largest Ethernet frame (without FCS) a link of this MTU carries.
pub const fn max_frame_for_mtu(mtu: u16) -> usize {
    mtu as usize + crate::wire::ethernet::HEADER_LEN
}

/// The segments (offset, length) a range travels in when a frame carries at most `max` page
/// bytes.
#[derive(Debug, Clone)]
pub struct Segments {
    next: u16,
    end: u16,
    step: u16,
}

impl Segments {
    /// Segments of `offset..offset+len`, at most `max` bytes each (`max` ≥ 8).
    pub fn new(offset: u16, len: u16, max: u16) -> Self {
        // A limit that is not a multiple of 8 is rounded down to one (§6), so every segment
        // but the last is a multiple of 8 and none exceeds the limit.
        let max = (max & !7).max(8);
        let n = len.div_ceil(max).max(1);
        let step = len.div_ceil(n).next_multiple_of(8).min(max).max(1);
        Segments {
            next: offset,
            end: offset.saturating_add(len),
            step,
        }
    }

    /// How many segments are left.
    pub fn count(&self) -> usize {
        usize::from((self.end - self.next).div_ceil(self.step))
    }
}

impl Iterator for Segments {
    type Item = (u16, u16);

    fn next(&mut self) -> Option<(u16, u16)> {
        if self.next >= self.end {
            return None;
        }
        let len = self.step.min(self.end - self.next);
        let seg = (self.next, len);
        self.next += len;
        Some(seg)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = Segments::count(self);
        (n, Some(n))
    }
}

impl ExactSizeIterator for Segments {}

const WORDS: usize = PAGE_SIZE / 64;

/// Tracks which bytes of an expected range have arrived. Byte-exact, fixed size (a 4096-bit
/// map), no allocation.
#[derive(Debug, Clone)]
pub struct Reassembly {
    offset: u16,
    len: u16,
    received: u16,
    map: [u64; WORDS],
}

impl Reassembly {
    /// Expects `offset..offset+len` of a page.
    pub fn new(offset: u16, len: u16) -> Result<Self, SegmentError> {
        if len == 0 {
            return Err(SegmentError::Empty);
        }
        if usize::from(offset) + usize::from(len) > PAGE_SIZE {
            return Err(SegmentError::OutOfRange {
                offset,
                len,
                range_offset: 0,
                range_len: PAGE_SIZE as u16,
            });
        }
        Ok(Reassembly {
            offset,
            len,
            received: 0,
            map: [0; WORDS],
        })
    }

    fn mask(word: usize, a: usize, b: usize) -> u64 {
        let lo = a.max(word * 64) - word * 64;
        let hi = b.min(word * 64 + 64) - word * 64;
        if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        }
    }

    /// Records `offset..offset+len` as received. Refuses empty, out-of-range, duplicate and
    /// overlapping segments without changing anything.
    pub fn accept(&mut self, offset: u16, len: u16) -> Result<(), SegmentError> {
        if len == 0 {
            return Err(SegmentError::Empty);
        }
        let (a, b) = (usize::from(offset), usize::from(offset) + usize::from(len));
        if a < usize::from(self.offset) || b > usize::from(self.offset) + usize::from(self.len) {
            return Err(SegmentError::OutOfRange {
                offset,
                len,
                range_offset: self.offset,
                range_len: self.len,
            });
        }
        let (mut any, mut all) = (false, true);
        for w in a / 64..=(b - 1) / 64 {
            let m = Self::mask(w, a, b);
            let have = self.map[w] & m;
            any |= have != 0;
            all &= have == m;
        }
        if all {
            return Err(SegmentError::Duplicate { offset, len });
        }
        if any {
            return Err(SegmentError::Overlap { offset, len });
        }
        for w in a / 64..=(b - 1) / 64 {
            self.map[w] |= Self::mask(w, a, b);
        }
        self.received += len;
        Ok(())
    }

    /// [`Reassembly::accept`], then copies `data` into `page` (a whole 4 KiB page buffer) at
    /// `offset`.
    pub fn insert(
        &mut self,
        page: &mut [u8],
        offset: u16,
        data: &[u8],
    ) -> Result<(), SegmentError> {
        let len = u16::try_from(data.len()).map_err(|_| SegmentError::OutOfRange {
            offset,
            len: u16::MAX,
            range_offset: self.offset,
            range_len: self.len,
        })?;
        self.accept(offset, len)?;
        page[usize::from(offset)..usize::from(offset) + data.len()].copy_from_slice(data);
        Ok(())
    }

    /// Bytes received so far.
    pub fn received(&self) -> u16 {
        self.received
    }

    /// Whether every byte of the range has arrived.
    pub fn is_complete(&self) -> bool {
        self.received == self.len
    }

    /// Ok when complete, else the first gap.
    pub fn finish(&self) -> Result<(), SegmentError> {
        if self.is_complete() {
            return Ok(());
        }
        let start = usize::from(self.offset);
        let end = start + usize::from(self.len);
        let bit = |i: usize| self.map[i / 64] >> (i % 64) & 1 == 1;
        let gap_start = (start..end).find(|&i| !bit(i)).unwrap_or(end);
        let gap_end = (gap_start..end).find(|&i| bit(i)).unwrap_or(end);
        Err(SegmentError::Gap {
            offset: gap_start as u16,
            len: (gap_end - gap_start) as u16,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::vec::Vec;

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frame_budgets() {
        assert_eq!(max_data_per_frame(max_frame_for_mtu(1280)), Some(1184));
        assert_eq!(max_data_per_frame(max_frame_for_mtu(1500)), Some(1400));
        assert_eq!(max_data_per_frame(max_frame_for_mtu(9000)), Some(4096));
        assert_eq!(max_data_per_frame(3840), Some(3728)); // one AF_XDP chunk in copy mode
        assert_eq!(max_data_per_frame(600), None);
        assert_eq!(max_data_per_frame(10), None);
        assert_eq!(
            max_data_per_frame(max_frame_for_mtu(crate::PAGE_MTU)),
            Some(4096)
        );
        assert_eq!(
            max_data_per_frame(max_frame_for_mtu(crate::PAGE_MTU - 1)),
            Some(4088)
        );
    }

    #[test]
    fn page_splits() {
        let v: Vec<_> = Segments::new(0, 4096, 4096).collect();
        assert_eq!(v, [(0, 4096)]);
        let v: Vec<_> = Segments::new(0, 4096, 3728).collect();
        assert_eq!(v, [(0, 2048), (2048, 2048)]);
        let v: Vec<_> = Segments::new(0, 4096, 1400).collect();
        assert_eq!(v, [(0, 1368), (1368, 1368), (2736, 1360)]);
        let v: Vec<_> = Segments::new(0, 4096, 1184).collect();
        assert_eq!(v, [(0, 1024), (1024, 1024), (2048, 1024), (3072, 1024)]);
        let v: Vec<_> = Segments::new(100, 10, 1184).collect();
        assert_eq!(v, [(100, 10)]);
        assert_eq!(Segments::new(0, 4096, 1400).len(), 3);
    }

    #[test]
    fn reassembly_rejections() {
        let mut r = Reassembly::new(0, 4096).unwrap();
        r.accept(0, 2048).unwrap();
        assert_eq!(
            r.accept(0, 2048),
            Err(SegmentError::Duplicate {
                offset: 0,
                len: 2048
            })
        );
        assert_eq!(
            r.accept(2040, 100),
            Err(SegmentError::Overlap {
                offset: 2040,
                len: 100
            })
        );
        assert_eq!(
            r.accept(4000, 200),
            Err(SegmentError::OutOfRange {
                offset: 4000,
                len: 200,
                range_offset: 0,
                range_len: 4096
            })
        );
        assert_eq!(r.accept(4000, 0), Err(SegmentError::Empty));
        assert_eq!(
            r.finish(),
            Err(SegmentError::Gap {
                offset: 2048,
                len: 2048
            })
        );
        r.accept(3000, 1096).unwrap();
        assert_eq!(
            r.finish(),
            Err(SegmentError::Gap {
                offset: 2048,
                len: 952
            })
        );
        r.accept(2048, 952).unwrap();
        assert_eq!(r.finish(), Ok(()));
        assert!(r.is_complete());

        let mut r = Reassembly::new(100, 50).unwrap();
        assert_eq!(
            r.accept(90, 20),
            Err(SegmentError::OutOfRange {
                offset: 90,
                len: 20,
                range_offset: 100,
                range_len: 50
            })
        );
        assert_eq!(
            Reassembly::new(4000, 97).unwrap_err(),
            SegmentError::OutOfRange {
                offset: 4000,
                len: 97,
                range_offset: 0,
                range_len: 4096
            }
        );
        assert_eq!(Reassembly::new(0, 0).unwrap_err(), SegmentError::Empty);
        let mut page = [0u8; 4096];
        r.insert(&mut page, 100, &[7; 50]).unwrap();
        assert!(page[100..150].iter().all(|&b| b == 7) && page[150] == 0 && page[99] == 0);
    }

    proptest! {
        #[test]
        fn segments_cover_exactly(offset in 0u16..4096, len in 1u16..=4096, max in 8u16..=4096) {
            let len = len.min(4096 - offset).max(1);
            let offset = offset.min(4096 - len);
            let segs: Vec<_> = Segments::new(offset, len, max).collect();
            // The limit counts in whole words (§6).
            let max = (max & !7).max(8);
            prop_assert_eq!(segs.len(), len.div_ceil(max) as usize);
            for &(_, l) in &segs[..segs.len() - 1] {
                prop_assert!(l.is_multiple_of(8));
            }
            let mut r = Reassembly::new(offset, len).unwrap();
            // Any arrival order completes the range; a second copy of any segment is refused.
            for &(o, l) in segs.iter().rev() {
                prop_assert!(l <= max.max(8));
                r.accept(o, l).unwrap();
            }
            prop_assert!(r.finish().is_ok());
            for &(o, l) in &segs {
                prop_assert_eq!(r.accept(o, l), Err(SegmentError::Duplicate { offset: o, len: l }));
            }
        }
    }
}
