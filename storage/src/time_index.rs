//! The sparse time index of one segment (`<base>.timeindex`): entries of
//! (max timestamp so far as i64, offset − base_offset as u32), big-endian,
//! timestamps strictly increasing. An entry (t, o) promises that every
//! record up to the batch holding offset o has a timestamp <= t.

use std::path::Path;

use crate::index_file::IndexFile;
use crate::Result;

/// Bytes per entry.
pub(crate) const ENTRY_LEN: usize = 12;

#[derive(Debug)]
pub(crate) struct TimeIndex {
    base_offset: i64,
    file: IndexFile,
}

impl TimeIndex {
    pub(crate) fn create(path: &Path, base_offset: i64, bytes_max: u32) -> Result<TimeIndex> {
        Ok(TimeIndex {
            base_offset,
            file: IndexFile::create(path, ENTRY_LEN, bytes_max)?,
        })
    }

    /// Opens and sanity-checks an existing time index (first and last
    /// entries only); `None` when missing or invalid.
    pub(crate) fn open_checked(path: &Path, base_offset: i64) -> Result<Option<TimeIndex>> {
        let Some(file) = IndexFile::open(path, ENTRY_LEN)? else {
            return Ok(None);
        };
        let index = TimeIndex { base_offset, file };
        let n = index.file.count();
        let sane = n <= 1 || {
            let (t0, o0) = index.entry(0);
            let (t1, o1) = index.entry(n - 1);
            t1 > t0 && o1 >= o0
        };
        Ok(sane.then_some(index))
    }

    fn entry(&self, i: usize) -> (i64, i64) {
        let e = self.file.entry(i);
        let timestamp = i64::from_be_bytes(e[0..8].try_into().expect("8 bytes"));
        let relative = u32::from_be_bytes(e[8..12].try_into().expect("4 bytes"));
        (timestamp, self.base_offset + i64::from(relative))
    }

    pub(crate) fn last(&self) -> Option<(i64, i64)> {
        self.file.count().checked_sub(1).map(|i| self.entry(i))
    }

    /// The offset of the last entry whose timestamp is < `timestamp_ms`:
    /// everything up to that offset's batch is older than the target.
    pub(crate) fn last_older_than(&self, timestamp_ms: i64) -> Option<i64> {
        let target = timestamp_ms.checked_sub(1)?;
        let found = self.file.floor_by(&target, |e| {
            i64::from_be_bytes(e[0..8].try_into().expect("8 bytes"))
        })?;
        Some(self.entry(found).1)
    }

    /// Appends (timestamp, offset) if the timestamp is newer than the last
    /// entry's; false when it was not appended.
    pub(crate) fn maybe_push(&mut self, timestamp_ms: i64, offset: i64) -> bool {
        if self.last().is_some_and(|(t, _)| t >= timestamp_ms) {
            return false;
        }
        let Ok(relative) = u32::try_from(offset - self.base_offset) else {
            return false;
        };
        let mut e = [0u8; ENTRY_LEN];
        e[0..8].copy_from_slice(&timestamp_ms.to_be_bytes());
        e[8..12].copy_from_slice(&relative.to_be_bytes());
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
    fn monotonic_entries_and_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000000000000000010.timeindex");
        let mut idx = TimeIndex::create(&path, 10, 1200).unwrap();
        assert!(idx.maybe_push(100, 12));
        assert!(!idx.maybe_push(100, 13));
        assert!(!idx.maybe_push(90, 13));
        assert!(idx.maybe_push(200, 20));
        assert_eq!(idx.last_older_than(100), None);
        assert_eq!(idx.last_older_than(101), Some(12));
        assert_eq!(idx.last_older_than(200), Some(12));
        assert_eq!(idx.last_older_than(201), Some(20));
        idx.file().trim().unwrap();
        drop(idx);
        let idx = TimeIndex::open_checked(&path, 10).unwrap().unwrap();
        assert_eq!(idx.last(), Some((200, 20)));
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(1200).unwrap();
        assert!(TimeIndex::open_checked(&path, 10).unwrap().is_none());
    }
}
