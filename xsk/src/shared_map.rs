//! A `MAP_SHARED` mapping of a BPF array created with `BPF_F_MMAPABLE`: memory the XDP program
//! and this process read and write at the same time (the server's hot-page store). Rust sees it
//! only as atomics, so every access is defined whatever the kernel does concurrently; the
//! protocol on top (a seqlock per slot) is the caller's.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64};

use memmap2::{MmapOptions, MmapRaw};

/// The mapping; unmapped when dropped (the map lives on while the program or a descriptor
/// holds it).
pub struct SharedMap {
    map: MmapRaw,
    _fd: OwnedFd,
}

impl std::fmt::Debug for SharedMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMap")
            .field("len", &self.map.len())
            .finish()
    }
}

impl SharedMap {
    /// Maps the first `len` bytes of the map behind `fd` (readable and writable, shared).
    pub fn map(fd: OwnedFd, len: usize) -> std::io::Result<Self> {
        let map = MmapOptions::new().len(len).map_raw(fd.as_raw_fd())?;
        Ok(SharedMap { map, _fd: fd })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The 32-bit word at byte `off` (a multiple of 4 inside the mapping; panics otherwise).
    pub fn u32_at(&self, off: usize) -> &AtomicU32 {
        assert!(
            off.is_multiple_of(4) && off + 4 <= self.len(),
            "u32 at {off}"
        );
        let p = self.map.as_ptr().wrapping_add(off).cast::<AtomicU32>();
        // SAFETY: `p` is in bounds and aligned (the mapping is page-aligned; `off` a multiple
        // of 4); the memory lives as long as `self`, and AtomicU32 allows shared mutation.
        unsafe { &*p }
    }

    /// The `n` 64-bit words from byte `off` (a multiple of 8; the words inside the mapping;
    /// panics otherwise).
    pub fn u64s(&self, off: usize, n: usize) -> &[AtomicU64] {
        assert!(
            off.is_multiple_of(8) && off + n * 8 <= self.len(),
            "{n} u64s at {off}"
        );
        let p = self.map.as_ptr().wrapping_add(off).cast::<AtomicU64>();
        // SAFETY: the `n` words from `p` are in bounds and aligned as checked; the memory
        // lives as long as `self`; AtomicU64 allows shared mutation and has u64's layout.
        unsafe { std::slice::from_raw_parts(p, n) }
    }
}
