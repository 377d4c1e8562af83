//! Pages in a file: the local-disk comparison of the paging benchmark (the paper's "local
//! disk" fault), with `O_DIRECT` (the disk itself) or through the page cache.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::{AlignedPage, Backing, BackingError};

/// Region page `i` is the 4 KiB at byte `offsets[i]` of a file.
#[derive(Debug)]
pub struct FileBacking {
    file: File,
    offsets: Vec<u64>,
}

impl FileBacking {
    /// Opens `path` read-write; `direct` bypasses the page cache (`O_DIRECT`: every fetch is a
    /// disk read). Offsets must be multiples of 4,096 inside the file.
    pub fn open(path: &Path, offsets: Vec<u64>, direct: bool) -> std::io::Result<Self> {
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        if let Some(bad) = offsets.iter().find(|&&x| x % 4096 != 0) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("offset {bad} is not page-aligned"),
            ));
        }
        Ok(FileBacking {
            file: o.open(path)?,
            offsets,
        })
    }
}

impl Backing for FileBacking {
    fn fetch(&mut self, index: usize, page: &mut AlignedPage) -> Result<(), BackingError> {
        Ok(self.file.read_exact_at(&mut page.0, self.offsets[index])?)
    }

    fn store(&mut self, index: usize, page: &AlignedPage) -> Result<(), BackingError> {
        Ok(self.file.write_all_at(&page.0, self.offsets[index])?)
    }

    fn close(&mut self, _free: bool) -> Result<(), BackingError> {
        Ok(self.file.sync_data()?)
    }
}
