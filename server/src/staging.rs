//! Staged commits: the frames of a multi-frame UPDATE_COMMIT (COMMIT+MORE, docs/protocol.md
//! §5.8) are held aside and written into the page together with the final frame, so a reader
//! never sees a transaction half applied, and a lease that runs out or is released before its
//! final frame leaves the page untouched.
//!
//! A bounded pool of page-sized buffers, each with a byte mask of what was staged, taken on a
//! lease's first MORE frame and returned when the lease ends. Buffers are allocated on first
//! use, up to [`STAGES_MAX`] per shard; a MORE frame finding none free is answered BUSY (nothing
//! is staged, the client retries).

use bluebridge_proto::PAGE_SIZE;
use bluebridge_proto::message::Bytes;

/// Commits in flight (with staged frames) one shard holds at once.
pub const STAGES_MAX: usize = 256;

struct Stage {
    buf: Box<[u8; PAGE_SIZE]>,
    /// Bit `i` set: byte `i` of `buf` was staged.
    mask: [u64; PAGE_SIZE / 64],
}

/// The pool as a replica's snapshot carries it: each buffer's bytes and mask.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct StagesState {
    stages: Vec<(Vec<u8>, Vec<u64>)>,
    free: Vec<u16>,
}

/// The pool of staging buffers.
pub struct Stages {
    stages: Vec<Stage>,
    free: Vec<u16>,
}

impl std::fmt::Debug for Stages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stages")
            .field("allocated", &self.stages.len())
            .field("free", &self.free.len())
            .finish()
    }
}

impl Default for Stages {
    fn default() -> Self {
        Self::new()
    }
}

impl Stages {
    /// An empty pool.
    pub fn new() -> Self {
        Stages {
            stages: Vec::new(),
            free: Vec::new(),
        }
    }

    /// The pool, for a replica's snapshot (§5.19).
    pub(crate) fn state(&self) -> StagesState {
        StagesState {
            stages: self
                .stages
                .iter()
                .map(|s| (s.buf.to_vec(), s.mask.to_vec()))
                .collect(),
            free: self.free.clone(),
        }
    }

    /// Takes a snapshot's pool; `false` if a buffer is not page-sized.
    pub(crate) fn set_state(&mut self, s: StagesState) -> bool {
        let mut stages = Vec::with_capacity(s.stages.len());
        for (buf, mask) in s.stages {
            let (Ok(buf), Ok(mask)) = (
                <Box<[u8; PAGE_SIZE]>>::try_from(buf.into_boxed_slice()),
                <[u64; PAGE_SIZE / 64]>::try_from(mask),
            ) else {
                return false;
            };
            stages.push(Stage { buf, mask });
        }
        self.stages = stages;
        self.free = s.free;
        true
    }

    /// A clear buffer, or `None` when [`STAGES_MAX`] are in use.
    pub fn take(&mut self) -> Option<u16> {
        if let Some(i) = self.free.pop() {
            return Some(i);
        }
        if self.stages.len() >= STAGES_MAX {
            return None;
        }
        self.stages.push(Stage {
            buf: Box::new([0; PAGE_SIZE]),
            mask: [0; PAGE_SIZE / 64],
        });
        Some((self.stages.len() - 1) as u16)
    }

    /// Stages `data` at `offset` (inside the page: the request was checked) in buffer `i`.
    pub fn put(&mut self, i: u16, offset: usize, data: &Bytes<'_>) {
        let s = &mut self.stages[usize::from(i)];
        data.copy_to(&mut s.buf[offset..offset + data.len()]);
        for b in offset..offset + data.len() {
            s.mask[b / 64] |= 1 << (b % 64);
        }
    }

    /// Writes what buffer `i` staged into `page`.
    pub fn apply(&self, i: u16, page: &mut [u8]) {
        let s = &self.stages[usize::from(i)];
        for (w, &m) in s.mask.iter().enumerate() {
            if m == u64::MAX {
                page[w * 64..w * 64 + 64].copy_from_slice(&s.buf[w * 64..w * 64 + 64]);
            } else if m != 0 {
                for b in 0..64 {
                    if m & 1 << b != 0 {
                        page[w * 64 + b] = s.buf[w * 64 + b];
                    }
                }
            }
        }
    }

    /// Returns buffer `i` to the pool, cleared.
    pub fn give_back(&mut self, i: u16) {
        self.stages[usize::from(i)].mask = [0; PAGE_SIZE / 64];
        self.free.push(i);
    }

    /// Bytes allocated (for the memory report).
    pub fn bytes(&self) -> usize {
        self.stages.capacity() * size_of::<Stage>() + self.stages.len() * PAGE_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_ranges_apply_over_the_page() {
        let mut s = Stages::new();
        let i = s.take().unwrap();
        s.put(
            i,
            10,
            &Bytes {
                head: b"abc",
                tail: b"de",
            },
        );
        s.put(
            i,
            64,
            &Bytes {
                head: &[7; 64],
                tail: &[],
            },
        );
        let mut page = [1u8; PAGE_SIZE];
        s.apply(i, &mut page);
        assert_eq!(&page[8..16], b"\x01\x01abcde\x01");
        assert!(page[64..128].iter().all(|&b| b == 7) && page[128] == 1);
        s.give_back(i);
        let j = s.take().unwrap();
        assert_eq!(i, j);
        let mut page = [1u8; PAGE_SIZE];
        s.apply(j, &mut page);
        assert!(page.iter().all(|&b| b == 1), "given back clear");
    }

    #[test]
    fn the_pool_is_bounded() {
        let mut s = Stages::new();
        for _ in 0..STAGES_MAX {
            s.take().unwrap();
        }
        assert_eq!(s.take(), None);
        s.give_back(3);
        assert_eq!(s.take(), Some(3));
    }
}
