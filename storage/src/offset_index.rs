//! The sparse offset index of one segment (`<base>.index`): entries of
//! (offset − base_offset as u32, file position as u32), big-endian, one
//! every `index_interval_bytes` of log. A lookup gives the position of a
//! batch at or before the wanted offset; the reader scans forward from it.

use std::path::Path;

use crate::index_file::IndexFile;
use crate::Result;

/// Bytes per entry.
pub(crate) const ENTRY_LEN: usize = 8;

#[derive(Debug)]
pub(crate) struct OffsetIndex {
    base_offset: i64,
    file: IndexFile,
}

impl OffsetIndex {
    pub(crate) fn create(path: &Path, base_offset: i64, bytes_max: u32) -> Result<OffsetIndex> {
        Ok(OffsetIndex {
            base_offset,
            file: IndexFile::create(path, ENTRY_LEN, bytes_max)?,
        })
    }

    /// Opens an existing index and sanity-checks it against the log file
    /// size (cheap: first and last entries only). `None` when missing or
    /// invalid; the caller rebuilds.
    pub(crate) fn open_checked(
        path: &Path,
        base_offset: i64,
        log_len: u64,
    ) -> Result<Option<OffsetIndex>> {
        let Some(file) = IndexFile::open(path, ENTRY_LEN)? else {
            return Ok(None);
        };
        let index = OffsetIndex { base_offset, file };
        Ok(index.is_sane(log_len).then_some(index))
    }

    fn is_sane(&self, log_len: u64) -> bool {
        let n = self.file.count();
        if n == 0 {
            return true;
        }
        let (first_offset, first_position) = self.entry(0);
        let (last_offset, last_position) = self.entry(n - 1);
        let increasing = n == 1 || (last_offset > first_offset && last_position > first_position);
        increasing && first_offset >= self.base_offset && last_position < log_len
    }

    fn entry(&self, i: usize) -> (i64, u64) {
        let e = self.file.entry(i);
        let relative = u32::from_be_bytes(e[0..4].try_into().expect("4 bytes"));
        let position = u32::from_be_bytes(e[4..8].try_into().expect("4 bytes"));
        (self.base_offset + i64::from(relative), u64::from(position))
    }

    /// Position of the last indexed batch whose base offset is <= `offset`
    /// (0 when none).
    pub(crate) fn lookup(&self, offset: i64) -> u64 {
        let target = offset.saturating_sub(self.base_offset);
        let found = self.file.floor_by(&target, |e| {
            i64::from(u32::from_be_bytes(e[0..4].try_into().expect("4 bytes")))
        });
        found.map_or(0, |i| self.entry(i).1)
    }

    /// The last entry, if any.
    pub(crate) fn last(&self) -> Option<(i64, u64)> {
        self.file.count().checked_sub(1).map(|i| self.entry(i))
    }

    /// Appends (offset, position); false when full or not representable.
    pub(crate) fn push(&mut self, offset: i64, position: u64) -> bool {
        let (Ok(relative), Ok(position)) = (
            u32::try_from(offset - self.base_offset),
            u32::try_from(position),
        ) else {
            return false;
        };
        let mut e = [0u8; ENTRY_LEN];
        e[0..4].copy_from_slice(&relative.to_be_bytes());
        e[4..8].copy_from_slice(&position.to_be_bytes());
        self.file.push(&e)
    }

    pub(crate) fn is_full(&self) -> bool {
        self.file.is_full()
    }

    pub(crate) fn file(&mut self) -> &mut IndexFile {
        &mut self.file
    }

    /// See [`IndexFile::is_sealed`].
    pub(crate) fn is_sealed(&self) -> bool {
        self.file.is_sealed()
    }

    /// See [`crate::index_file::IndexFile::sync_handle`].
    pub(crate) fn sync_handle(&self) -> Result<Option<crate::index_file::IndexSync>> {
        self.file.sync_handle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_floor_and_sanity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000000000000000100.index");
        let mut idx = OffsetIndex::create(&path, 100, 1024).unwrap();
        assert_eq!(idx.lookup(150), 0);
        assert!(idx.push(110, 4096));
        assert!(idx.push(130, 8192));
        assert_eq!(idx.lookup(105), 0);
        assert_eq!(idx.lookup(110), 4096);
        assert_eq!(idx.lookup(129), 4096);
        assert_eq!(idx.lookup(1000), 8192);
        assert!(!idx.push(99, 0)); // below base
        idx.file().trim().unwrap();
        drop(idx);
        let idx = OffsetIndex::open_checked(&path, 100, 9000)
            .unwrap()
            .unwrap();
        assert_eq!(idx.last(), Some((130, 8192)));
        // Last position beyond the log: invalid.
        assert!(OffsetIndex::open_checked(&path, 100, 8000)
            .unwrap()
            .is_none());
        // Untrimmed (zero-padded) index after a crash: invalid.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(1024).unwrap();
        assert!(OffsetIndex::open_checked(&path, 100, 9000)
            .unwrap()
            .is_none());
    }
}
