//! A memory-mapped file of fixed-width entries: the shared mechanics of
//! the sparse offset index and the time index.
//!
//! The active segment's index is preallocated to `index_bytes_max` and
//! mapped read-write; on roll or close it is trimmed to its entries and
//! remapped read-only. Files are never shrunk while another mapping of them
//! may be alive: replacing an index unlinks the old file first.
//!
//! A new index creates its file only with its first entry: a fresh
//! partition (one empty segment) then costs two inodes (its directory and
//! log file) instead of four, and creating thousands of partitions is
//! bound by inode creation. A segment whose index never got an entry has
//! no index file; opening it rebuilds the (empty) index from its log.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapMut};

use crate::{Result, StorageError};

#[derive(Debug)]
enum Map {
    /// No mapping (zero-length file).
    Empty,
    ReadOnly(Mmap),
    Writable(MmapMut),
}

#[derive(Debug)]
pub(crate) struct IndexFile {
    path: PathBuf,
    /// `None` until the first entry of a new index is pushed.
    file: Option<File>,
    /// What a not yet created file is preallocated to.
    bytes_max: u32,
    map: Map,
    entry_len: usize,
    /// Entries written.
    count: usize,
    /// Capacity of the current mapping, in entries.
    count_max: usize,
    /// A map or resize failed: no entries are kept from then on (they
    /// are hints; lookups scan the segment from its start), and the
    /// index does not count as full. Counted full, it rolled its segment,
    /// and the next segment's index failed the same way at its first
    /// entry: with the process out of mappings, a new segment (and a
    /// producer snapshot) every few KiB.
    broken: bool,
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl IndexFile {
    /// Replaces any file at `path` (unlinking it, so live mappings of the
    /// old file stay valid) with an empty writable index; its file,
    /// preallocated to `bytes_max`, is created with the first entry.
    pub(crate) fn create(path: &Path, entry_len: usize, bytes_max: u32) -> Result<IndexFile> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path)(e)),
        }
        Ok(IndexFile {
            path: path.to_path_buf(),
            file: None,
            bytes_max,
            map: Map::Empty,
            entry_len,
            count: 0,
            count_max: Self::capacity(bytes_max, entry_len, 0) as usize / entry_len,
            broken: false,
        })
    }

    /// `bytes_max` rounded down to whole entries, never below `used`.
    fn capacity(bytes_max: u32, entry_len: usize, used: u64) -> u64 {
        (u64::from(bytes_max) / entry_len as u64 * entry_len as u64).max(used)
    }

    /// Creates the file of a new index and maps it for appends.
    fn materialize(&mut self) -> Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&self.path)
            .map_err(io_err(&self.path))?;
        self.file = Some(file);
        self.make_writable(self.bytes_max)
    }

    /// Opens an existing index read-only, taking every whole entry in the
    /// file as written. `None` if the file is missing or not a whole number
    /// of entries (the caller rebuilds it).
    pub(crate) fn open(path: &Path, entry_len: usize) -> Result<Option<IndexFile>> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(path)(e)),
        };
        let len = file.metadata().map_err(io_err(path))?.len();
        if len % entry_len as u64 != 0 || len > u64::from(u32::MAX) {
            return Ok(None);
        }
        let count = (len / entry_len as u64) as usize;
        let mut index = IndexFile {
            path: path.to_path_buf(),
            file: Some(file),
            bytes_max: 0,
            map: Map::Empty,
            entry_len,
            count,
            count_max: count,
            broken: false,
        };
        match Self::map_read_only(index.file.as_ref().expect("set above"), path, len) {
            Ok(map) => index.map = map,
            // Out of mappings (tens of thousands of segments): no entries,
            // lookups scan, rather than a log that cannot be opened.
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot map the index; lookups scan the segment");
                index.forget_entries();
            }
        }
        Ok(Some(index))
    }

    #[allow(unsafe_code)]
    fn map_read_only(file: &File, path: &Path, len: u64) -> Result<Map> {
        if len == 0 {
            return Ok(Map::Empty);
        }
        // SAFETY: the mapping covers exactly the file's current length. This
        // crate is the only writer of index files and never shrinks an index
        // file that is mapped: trimming happens only on a writable index
        // after its own mapping is dropped, and replacement unlinks the file
        // instead of truncating it, so the mapped pages stay valid.
        let map = unsafe { Mmap::map(file) }.map_err(io_err(path))?;
        Ok(Map::ReadOnly(map))
    }

    /// Grows the file to `bytes_max` (never shrinking below the entries)
    /// and maps it read-write for appends.
    #[allow(unsafe_code)]
    pub(crate) fn make_writable(&mut self, bytes_max: u32) -> Result<()> {
        let used = (self.count * self.entry_len) as u64;
        let len = Self::capacity(bytes_max, self.entry_len, used);
        self.bytes_max = bytes_max;
        self.count_max = (len / self.entry_len as u64) as usize;
        let Some(file) = &self.file else {
            // Not created yet: `push` creates it at this size.
            return Ok(());
        };
        self.map = Map::Empty;
        let mapped = file.set_len(len).and_then(|()| {
            if len == 0 {
                return Ok(None);
            }
            // SAFETY: the file was just sized to `len` by us; only this
            // struct writes it while it is writable, and the file is shrunk
            // (in `trim`) only after this mapping is dropped.
            let map = unsafe { MmapMut::map_mut(file) }?;
            // Entries are appended a page at a time into a preallocated,
            // mostly-hole file; without this hint each first touch of a
            // page reads ahead (zero-fills) a whole window of holes, which
            // cost about 9% of append time in `storage/examples` profiles.
            // Lookups are binary searches, which readahead does not help.
            map.advise(memmap2::Advice::Random)?;
            Ok(Some(map))
        });
        match mapped {
            Ok(map) => {
                if let Some(map) = map {
                    self.map = Map::Writable(map);
                }
                Ok(())
            }
            Err(e) => {
                self.forget_entries();
                Err(io_err(&self.path)(e))
            }
        }
    }

    /// After a failed resize or map: no entries in memory (they are only
    /// hints: lookups then scan from the segment's start), and no more
    /// pushes. Counted entries without a mapping made every lookup, and
    /// the next roll's time-index push under its lock, slice past an
    /// empty map and panic (poisoning the lock for good).
    fn forget_entries(&mut self) {
        self.map = Map::Empty;
        self.count = 0;
        self.count_max = 0;
        self.broken = true;
    }

    fn bytes(&self) -> &[u8] {
        match &self.map {
            Map::Empty => &[],
            Map::ReadOnly(m) => m,
            Map::Writable(m) => m,
        }
    }

    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// Trimmed and mapped read-only already (an index opened trusted, or
    /// trimmed before): trimming it again would change nothing.
    pub(crate) fn is_sealed(&self) -> bool {
        matches!(self.map, Map::ReadOnly(_))
    }

    pub(crate) fn is_full(&self) -> bool {
        if self.broken {
            return false;
        }
        if self.file.is_none() {
            return self.count >= self.count_max;
        }
        !matches!(self.map, Map::Writable(_)) || self.count >= self.count_max
    }

    /// Entry `i` (< count).
    pub(crate) fn entry(&self, i: usize) -> &[u8] {
        &self.bytes()[i * self.entry_len..(i + 1) * self.entry_len]
    }

    /// Appends one entry; false when full or read-only.
    pub(crate) fn push(&mut self, entry: &[u8]) -> bool {
        debug_assert_eq!(entry.len(), self.entry_len);
        if self.broken || self.is_full() {
            return false;
        }
        if self.file.is_none() {
            if let Err(error) = self.materialize() {
                // Entries are sparse hints: without this one, lookups scan
                // from an earlier entry. A map that failed (`broken`)
                // takes no more; a failed create, the next push tries
                // again.
                tracing::warn!(path = %self.path.display(), %error, "could not create index file");
                self.file = None;
                self.map = Map::Empty;
                let _ = std::fs::remove_file(&self.path);
                return false;
            }
        }
        let at = self.count * self.entry_len;
        if let Map::Writable(m) = &mut self.map {
            m[at..at + self.entry_len].copy_from_slice(entry);
        }
        self.count += 1;
        true
    }

    /// Shrinks the file to its entries and remaps it read-only.
    ///
    /// Nothing is synced here: unmapping keeps the entries written
    /// through the mapping as dirty page-cache pages, which the read-only
    /// mapping sees, and `flush` (the tick's flush of rolled segments,
    /// `close`) makes them and the new length durable. A roll trims both
    /// indexes under the log's writer lock, and an `msync` there waited
    /// for the index's write-back: 22 ms on the append path at every roll
    /// (benches/RESULTS.md, session 9).
    pub(crate) fn trim(&mut self) -> Result<()> {
        if self.broken {
            // Its entries were forgotten, not its file: cut to none, a
            // file that could not be mapped lost its entries on disk too.
            return Ok(());
        }
        let Some(file) = &self.file else {
            // Never written: no file, and read-only from now on.
            self.count_max = self.count;
            return Ok(());
        };
        self.map = Map::Empty;
        let len = (self.count * self.entry_len) as u64;
        let mapped = file
            .set_len(len)
            .map_err(io_err(&self.path))
            .and_then(|()| Self::map_read_only(file, &self.path, len));
        match mapped {
            Ok(map) => {
                self.count_max = self.count;
                self.map = map;
                Ok(())
            }
            Err(e) => {
                self.forget_entries();
                Err(e)
            }
        }
    }

    /// Starts the mapping's write-back and returns a handle of the file
    /// whose fsync ([`IndexSync::finish`]) makes it durable, so that the
    /// caller can drop the index's lock first: an fsync under it held up
    /// every append (which takes the lock to add an entry) and, behind
    /// that waiting writer, every read. On Linux the page cache is
    /// shared, and fsync writes back pages dirtied through the mapping.
    pub(crate) fn sync_handle(&self) -> Result<Option<IndexSync>> {
        let Some(file) = &self.file else {
            return Ok(None);
        };
        if let Map::Writable(m) = &self.map {
            m.flush_async().map_err(io_err(&self.path))?;
        }
        let file = file.try_clone().map_err(io_err(&self.path))?;
        Ok(Some(IndexSync {
            file,
            path: self.path.clone(),
        }))
    }

    /// Binary search: the last entry `i` with `key(entry(i)) <= target`.
    pub(crate) fn floor_by<K: Ord>(&self, target: &K, key: impl Fn(&[u8]) -> K) -> Option<usize> {
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if key(self.entry(mid)) <= *target {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo.checked_sub(1)
    }
}

/// An index file to fsync once its lock is dropped
/// ([`IndexFile::sync_handle`]).
pub(crate) struct IndexSync {
    file: File,
    path: PathBuf,
}

impl IndexSync {
    /// fsyncs the file (its length and the pages written through the
    /// mapping).
    pub(crate) fn finish(self) -> Result<()> {
        self.file.sync_all().map_err(io_err(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_trim_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.index");
        let mut idx = IndexFile::create(&path, 8, 80).unwrap();
        for i in 0..10u64 {
            assert!(idx.push(&i.to_be_bytes()));
        }
        assert!(!idx.push(&11u64.to_be_bytes()));
        idx.truncate_for_test(4);
        idx.trim().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 32);
        let idx = IndexFile::open(&path, 8).unwrap().unwrap();
        assert_eq!(idx.count(), 4);
        assert_eq!(idx.entry(3), &3u64.to_be_bytes());
        let key = |e: &[u8]| u64::from_be_bytes(e.try_into().unwrap());
        assert_eq!(idx.floor_by(&2, key), Some(2));
        assert_eq!(idx.floor_by(&100, key), Some(3));
        std::fs::write(&path, [0u8; 5]).unwrap();
        assert!(IndexFile::open(&path, 8).unwrap().is_none());
    }

    #[test]
    fn the_file_is_created_with_the_first_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("y.index");
        let mut idx = IndexFile::create(&path, 8, 80).unwrap();
        assert!(!path.exists(), "a new index must not create its file");
        assert!(!idx.is_full());
        assert!(idx.sync_handle().unwrap().is_none(), "nothing to sync");
        assert!(idx.push(&7u64.to_be_bytes()));
        idx.sync_handle()
            .unwrap()
            .expect("a file")
            .finish()
            .unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 80);
        assert_eq!(idx.entry(0), &7u64.to_be_bytes());
        idx.trim().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8);

        // Sealed without an entry: still no file, and no more entries.
        let empty = dir.path().join("z.index");
        let mut idx = IndexFile::create(&empty, 8, 80).unwrap();
        idx.make_writable(160).unwrap();
        idx.trim().unwrap();
        assert!(idx.is_full());
        assert!(!idx.push(&1u64.to_be_bytes()));
        assert!(!empty.exists());
        assert!(IndexFile::open(&empty, 8).unwrap().is_none());
    }

    /// An index whose map failed keeps no entries and does not count as
    /// full: full, it rolled its segment, and with the process out of
    /// mappings every new segment rolled again at its first entry.
    #[test]
    fn an_index_that_cannot_map_is_not_full() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.index");
        let mut idx = IndexFile::create(&path, 8, 80).unwrap();
        assert!(idx.push(&1u64.to_be_bytes()));
        // What a failed map or resize does.
        idx.forget_entries();
        assert!(!idx.is_full());
        for k in 0..20u64 {
            assert!(!idx.push(&k.to_be_bytes()), "nothing is kept");
        }
        assert_eq!(idx.count(), 0);
        assert_eq!(
            idx.floor_by(&5u64, |e| u64::from_be_bytes(e.try_into().unwrap())),
            None
        );
    }

    impl IndexFile {
        fn truncate_for_test(&mut self, count: usize) {
            self.count = count;
        }
    }
}
