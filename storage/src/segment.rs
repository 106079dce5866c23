//! One segment of a partition log: `<base>.log` plus its sparse
//! `<base>.index` and `<base>.timeindex`, named by the 20-digit base offset.
//!
//! Concurrency: only the log's writer (holding the log's writer mutex)
//! calls the mutating methods; readers use `&self` and see bytes only up to
//! `size`, which is published (Release) after the bytes are written. A
//! segment is *closed* once rolled: its file never changes again and reads
//! slice a read-only mmap of it. Truncating a closed segment writes a new
//! file and renames it over the old one, so live mappings stay valid;
//! truncating the active segment in place sets `retired` first so readers
//! that raced with it retry.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{OnceLock, RwLock};

use bytes::Bytes;
use memmap2::Mmap;

use crate::batch::{self, HeaderView, HEADER_LEN};
use crate::index_file::io_err;
use crate::offset_index::OffsetIndex;
use crate::time_index::TimeIndex;
use crate::{LogConfig, Result, StorageError};

/// Timestamp of a segment with no batches (Kafka's NO_TIMESTAMP).
pub(crate) const NO_TIMESTAMP: i64 = -1;
/// Read-ahead used by recovery scans.
const SCAN_CHUNK_BYTES: usize = 1 << 20;

pub(crate) fn file_name(base_offset: i64, suffix: &str) -> String {
    format!("{base_offset:020}.{suffix}")
}

/// Parses `<20 digits>.log` into a base offset.
pub(crate) fn parse_log_name(name: &str) -> Option<i64> {
    let stem = name.strip_suffix(".log")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// Unlinks `paths`; one already gone is not an error.
pub(crate) fn remove_files<'a>(paths: impl IntoIterator<Item = &'a PathBuf>) -> Result<()> {
    for path in paths {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path)(e)),
        }
    }
    Ok(())
}

/// Suffix of a file renamed for deletion, unlinked later off the append
/// path (`Log::empty_trash`); opening a log deletes any left by a crash.
pub(crate) const TRASH_SUFFIX: &str = ".deleted";

/// Renames `path` to `<path>.deleted`; returns the new path, or `None`
/// if there was no file.
pub(crate) fn move_to_trash(path: &Path) -> Result<Option<PathBuf>> {
    let mut trashed = path.as_os_str().to_owned();
    trashed.push(TRASH_SUFFIX);
    let trashed = PathBuf::from(trashed);
    match std::fs::rename(path, &trashed) {
        Ok(()) => Ok(Some(trashed)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Unlinks the files of the segment at `base_offset` in `dir`.
pub(crate) fn delete_files(dir: &Path, base_offset: i64) -> Result<()> {
    let (log, index, time_index) = Segment::paths(dir, base_offset);
    remove_files([&log, &index, &time_index])
}

/// Reserves disk blocks for `from..from + len` of `file` without changing
/// its length (`fallocate` with `FALLOC_FL_KEEP_SIZE`). Fails where the
/// file system cannot.
#[allow(unsafe_code)]
pub(crate) fn reserve_blocks(file: &File, from: u64, len: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    #[allow(clippy::cast_possible_wrap)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: fallocate only reads its arguments; the fd is open for
        // as long as `file` is borrowed.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                from as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, from, len);
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

#[derive(Debug)]
pub(crate) struct Segment {
    base_offset: i64,
    log_path: PathBuf,
    index_path: PathBuf,
    time_index_path: PathBuf,
    file: File,
    /// Committed bytes: everything below is whole, written batches.
    size: AtomicU64,
    /// One past the last offset stored here (== base when empty).
    next_offset: AtomicI64,
    /// Largest batch max timestamp, or NO_TIMESTAMP.
    max_timestamp: AtomicI64,
    /// Max timestamp of the first batch (roll by age), or NO_TIMESTAMP.
    first_timestamp: AtomicI64,
    /// See [`Segment::first_append_ms`].
    first_append_ms: AtomicI64,
    index: RwLock<OffsetIndex>,
    time_index: RwLock<TimeIndex>,
    /// Writer-only: log bytes appended since the last index entry.
    bytes_since_index_entry: AtomicU64,
    /// Rolled: the file is immutable and may be mmapped.
    closed: AtomicBool,
    /// Truncated in place; readers that overlapped must retry.
    retired: AtomicBool,
    /// Log bytes written but not fsync'd: appends bump `data_written`;
    /// an fsync that succeeded records in `data_synced` the count it
    /// started from. A sync returns only once the bytes written before
    /// it are synced, even while another thread's fsync is under way (a
    /// flag cleared as that fsync began let an fsync-per-batch append
    /// return before its bytes were durable), and a failed fsync leaves
    /// them unsynced.
    data_written: AtomicU64,
    data_synced: AtomicU64,
    /// Where the last `start_writeback` ended.
    writeback_from: AtomicU64,
    /// Writer only (and `release_reserved`, once sealed): blocks are
    /// reserved up to here (`fallocate` with `FALLOC_FL_KEEP_SIZE`);
    /// `u64::MAX` once reserving failed.
    preallocated_to: AtomicU64,
    /// Created from a spare with its blocks reserved (`spare`): appends
    /// never reserve for themselves.
    born_reserved: bool,
    /// `release_reserved` has measured this sealed segment and given back
    /// what was reserved past its end: later flushes skip it.
    reservation_released: AtomicBool,
    /// Index entries or file lengths changed since the last index sync
    /// (counted as `data_written` is).
    indexes_written: AtomicU64,
    indexes_synced: AtomicU64,
    /// The read-only mapping of a closed segment, made on first read.
    mmap: OnceLock<Bytes>,
    /// The bytes below this position have passed a CRC check in this
    /// process (the append's validation, a recovery scan, or an earlier
    /// read) and are not checked again when read. Everything after it is.
    /// Consumers and followers check every batch they decode anyway; this
    /// keeps the broker's own check to once per byte, not once per fetch.
    verified: AtomicU64,
    /// The log's size when this process took the segment up: every batch
    /// starting at or after it was appended (and checked) by this process,
    /// so it is not checked again either. After a clean restart `verified`
    /// starts at 0 and the append's move of it never matched, so every
    /// fetch of the active segment checked every batch again until it
    /// rolled.
    appended_from: u64,
}

/// What a scan of a segment's log found.
#[derive(Debug)]
struct Scan {
    /// Position after the last good batch.
    end: u64,
    next_offset: i64,
    max_timestamp: i64,
    first_timestamp: i64,
    bytes_since_index_entry: u64,
    /// The first bad batch: (position, reason).
    error: Option<(u64, String)>,
}

/// Sequential reader with read-ahead for scans.
struct ScanReader<'a> {
    file: &'a File,
    buf: Vec<u8>,
    buf_position: u64,
}

impl<'a> ScanReader<'a> {
    fn new(file: &'a File) -> Self {
        ScanReader {
            file,
            buf: Vec::new(),
            buf_position: 0,
        }
    }
    /// `len` (<= SCAN_CHUNK_BYTES) bytes at `position`, or fewer at EOF.
    fn slice(&mut self, position: u64, len: usize) -> std::io::Result<&[u8]> {
        let in_buf = position >= self.buf_position
            && position + len as u64 <= self.buf_position + self.buf.len() as u64;
        if !in_buf {
            self.buf.resize(SCAN_CHUNK_BYTES.max(len), 0);
            let mut filled = 0;
            while filled < self.buf.len() {
                let n = self
                    .file
                    .read_at(&mut self.buf[filled..], position + filled as u64)?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            self.buf.truncate(filled);
            self.buf_position = position;
        }
        let start = (position - self.buf_position) as usize;
        let end = (start + len).min(self.buf.len());
        Ok(&self.buf[start.min(end)..end])
    }
    /// crc32c of `[position, position + len)`.
    fn crc(&mut self, mut position: u64, mut len: u64) -> std::io::Result<Option<u32>> {
        let mut crc = 0;
        while len > 0 {
            let step = len.min(SCAN_CHUNK_BYTES as u64) as usize;
            let chunk = self.slice(position, step)?;
            if chunk.len() < step {
                return Ok(None);
            }
            crc = crate::crc::crc32c_append(crc, chunk);
            position += step as u64;
            len -= step as u64;
        }
        Ok(Some(crc))
    }
}

/// Indexing state while appending or rebuilding.
struct Indexer<'a> {
    index: &'a mut OffsetIndex,
    time_index: &'a mut TimeIndex,
    interval_bytes: u64,
}

impl Indexer<'_> {
    /// Records the batch at `position`; `bytes_since` and `max_timestamp`
    /// are the running totals (max_timestamp already includes this batch).
    fn on_batch(
        &mut self,
        header: &HeaderView,
        position: u64,
        bytes_since: &mut u64,
        max_timestamp: i64,
    ) {
        if *bytes_since >= self.interval_bytes {
            self.index.push(header.base_offset, position);
            self.time_index
                .maybe_push(max_timestamp, header.last_offset());
            *bytes_since = 0;
        }
        *bytes_since += header.total_len as u64;
    }
}

/// Walks batches from `from` (whose first batch must start at or after
/// `expected_next`) to `log_len`. With `check_crc` every batch's CRC is
/// verified. Stops at the first bad batch.
fn scan(
    file: &File,
    log_len: u64,
    from: u64,
    expected_next: i64,
    check_crc: bool,
    mut indexer: Option<Indexer<'_>>,
) -> std::io::Result<Scan> {
    let mut reader = ScanReader::new(file);
    let mut out = Scan {
        end: from,
        next_offset: expected_next,
        max_timestamp: NO_TIMESTAMP,
        first_timestamp: NO_TIMESTAMP,
        bytes_since_index_entry: 0,
        error: None,
    };
    let mut position = from;
    while position < log_len {
        let header = reader.slice(position, HEADER_LEN)?;
        let Some(h) = HeaderView::read(header) else {
            out.error = Some((position, "bad batch header (length or magic)".into()));
            break;
        };
        let stored_crc = u32::from_be_bytes(header[17..21].try_into().expect("4 bytes"));
        if position + h.total_len as u64 > log_len {
            out.error = Some((
                position,
                format!(
                    "torn batch: {} bytes past the end",
                    position + h.total_len as u64 - log_len
                ),
            ));
            break;
        }
        // Batches in a segment are contiguous (leader and follower appends
        // both enforce it), which also catches damage to the base offset,
        // a field the CRC does not cover.
        if h.last_offset_delta < 0 || h.base_offset != out.next_offset {
            out.error = Some((
                position,
                format!(
                    "batch offsets {}..={} do not follow {}",
                    h.base_offset,
                    h.last_offset(),
                    out.next_offset - 1
                ),
            ));
            break;
        }
        if check_crc {
            let crc = reader.crc(
                position + batch::field::CRC_START as u64,
                h.total_len as u64 - batch::field::CRC_START as u64,
            )?;
            if crc != Some(stored_crc) {
                out.error = Some((
                    position,
                    format!("crc mismatch: stored {stored_crc:#010x}, computed {crc:?}"),
                ));
                break;
            }
        }
        if out.first_timestamp == NO_TIMESTAMP && position == 0 {
            out.first_timestamp = h.max_timestamp;
        }
        out.max_timestamp = out.max_timestamp.max(h.max_timestamp);
        if let Some(ix) = indexer.as_mut() {
            ix.on_batch(
                &h,
                position,
                &mut out.bytes_since_index_entry,
                out.max_timestamp,
            );
        } else {
            out.bytes_since_index_entry += h.total_len as u64;
        }
        out.next_offset = h.last_offset() + 1;
        position += h.total_len as u64;
        out.end = position;
    }
    Ok(out)
}

/// How to open an existing segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpenMode {
    /// Below the recovery point: trust the bytes, sanity-check the
    /// indexes, rebuild them only if missing or invalid.
    Trusted,
    /// At or after the recovery point: CRC-check every batch, rebuild the
    /// indexes, truncate at the first bad batch.
    Recover,
}

impl Segment {
    fn paths(dir: &Path, base_offset: i64) -> (PathBuf, PathBuf, PathBuf) {
        (
            dir.join(file_name(base_offset, "log")),
            dir.join(file_name(base_offset, "index")),
            dir.join(file_name(base_offset, "timeindex")),
        )
    }

    fn open_file(path: &Path, create: bool) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(create)
            .open(path)
            .map_err(io_err(path))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        base_offset: i64,
        paths: (PathBuf, PathBuf, PathBuf),
        file: File,
        index: OffsetIndex,
        time_index: TimeIndex,
        size: u64,
        next_offset: i64,
        max_timestamp: i64,
        first_timestamp: i64,
        bytes_since_index_entry: u64,
    ) -> Segment {
        Segment {
            base_offset,
            log_path: paths.0,
            index_path: paths.1,
            time_index_path: paths.2,
            file,
            size: AtomicU64::new(size),
            next_offset: AtomicI64::new(next_offset),
            max_timestamp: AtomicI64::new(max_timestamp),
            first_timestamp: AtomicI64::new(first_timestamp),
            // A segment opened with records counts its age from the open,
            // as Kafka's does from when it loads the segment.
            first_append_ms: AtomicI64::new(if size > 0 {
                crate::log::now_ms()
            } else {
                NO_TIMESTAMP
            }),
            index: RwLock::new(index),
            time_index: RwLock::new(time_index),
            bytes_since_index_entry: AtomicU64::new(bytes_since_index_entry),
            closed: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            data_written: AtomicU64::new(0),
            data_synced: AtomicU64::new(0),
            writeback_from: AtomicU64::new(0),
            preallocated_to: AtomicU64::new(0),
            born_reserved: false,
            reservation_released: AtomicBool::new(false),
            indexes_written: AtomicU64::new(1),
            indexes_synced: AtomicU64::new(0),
            mmap: OnceLock::new(),
            verified: AtomicU64::new(0),
            appended_from: size,
        }
    }

    /// Creates a new, empty, active segment (replacing stale files).
    pub(crate) fn create(dir: &Path, base_offset: i64, config: &LogConfig) -> Result<Segment> {
        let file = Self::open_file(&Self::paths(dir, base_offset).0, true)?;
        Self::create_in(dir, base_offset, config, file, 0)
    }

    /// Like `create`, with the log file given: an empty file already at
    /// this segment's path whose first `reserved` bytes have disk blocks
    /// reserved (a spare renamed there, see `spare`). Appends up to
    /// `reserved` then never allocate.
    pub(crate) fn create_in(
        dir: &Path,
        base_offset: i64,
        config: &LogConfig,
        file: File,
        reserved: u64,
    ) -> Result<Segment> {
        let paths = Self::paths(dir, base_offset);
        let index = OffsetIndex::create(&paths.1, base_offset, config.index_bytes_max)?;
        let time_index = TimeIndex::create(&paths.2, base_offset, config.index_bytes_max)?;
        let mut seg = Self::assemble(
            base_offset,
            paths,
            file,
            index,
            time_index,
            0,
            base_offset,
            NO_TIMESTAMP,
            NO_TIMESTAMP,
            0,
        );
        seg.preallocated_to.store(reserved, Ordering::Relaxed);
        seg.born_reserved = reserved > 0;
        Ok(seg)
    }

    /// Opens an existing segment. Returns the segment and, in `Recover`
    /// mode, whether a bad tail was truncated (the caller then deletes all
    /// later segments). The indexes are left writable; call `seal` for
    /// segments that are not the active one.
    pub(crate) fn open(
        dir: &Path,
        base_offset: i64,
        config: &LogConfig,
        mode: OpenMode,
    ) -> Result<(Segment, bool)> {
        let paths = Self::paths(dir, base_offset);
        let file = Self::open_file(&paths.0, false)?;
        let log_len = file.metadata().map_err(io_err(&paths.0))?.len();
        if mode == OpenMode::Trusted {
            if let Some(segment) = Self::open_trusted(base_offset, &paths, &file, log_len)? {
                let (index, time_index, scan) = segment;
                let seg = Self::assemble(
                    base_offset,
                    paths,
                    file,
                    index,
                    time_index,
                    log_len,
                    scan.next_offset,
                    scan.max_timestamp,
                    scan.first_timestamp,
                    scan.bytes_since_index_entry,
                );
                seg.indexes_synced.store(
                    seg.indexes_written.load(Ordering::Relaxed),
                    Ordering::Relaxed,
                );
                return Ok((seg, false));
            }
        }
        // Rebuild both indexes from a scan of the whole log file.
        let mut index = OffsetIndex::create(&paths.1, base_offset, config.index_bytes_max)?;
        let mut time_index = TimeIndex::create(&paths.2, base_offset, config.index_bytes_max)?;
        let indexer = Indexer {
            index: &mut index,
            time_index: &mut time_index,
            interval_bytes: u64::from(config.index_interval_bytes),
        };
        let check_crc = mode == OpenMode::Recover;
        let scan = scan(&file, log_len, 0, base_offset, check_crc, Some(indexer))
            .map_err(io_err(&paths.0))?;
        let mut truncated = false;
        if let Some((position, reason)) = &scan.error {
            if mode == OpenMode::Trusted {
                return Err(StorageError::CorruptSegment {
                    path: paths.0.clone(),
                    position: *position,
                    reason: reason.clone(),
                });
            }
            tracing::warn!(path = %paths.0.display(), position, reason = %reason, "truncating log tail during recovery");
            file.set_len(scan.end).map_err(io_err(&paths.0))?;
            file.sync_all().map_err(io_err(&paths.0))?;
            truncated = true;
        }
        let seg = Self::assemble(
            base_offset,
            paths,
            file,
            index,
            time_index,
            scan.end,
            scan.next_offset,
            scan.max_timestamp,
            scan.first_timestamp,
            scan.bytes_since_index_entry,
        );
        if check_crc {
            // The scan checked every batch it kept.
            seg.verified.store(scan.end, Ordering::Release);
            // What the scan read after a crash may exist only in the page
            // cache (a process killed before its fsync): not durable until
            // synced. Counted as written, the recovery's sync fsyncs it
            // before the recovery point moves past it; counted as synced,
            // a power loss after the restart lost records the next open
            // trusted.
            if scan.end > 0 {
                seg.data_written.store(1, Ordering::Release);
            }
        }
        Ok((seg, truncated))
    }

    /// The cheap path: sane indexes, then a header walk from the last
    /// offset-index entry to the end of the file. `None` means rebuild.
    #[allow(clippy::type_complexity)]
    fn open_trusted(
        base_offset: i64,
        paths: &(PathBuf, PathBuf, PathBuf),
        file: &File,
        log_len: u64,
    ) -> Result<Option<(OffsetIndex, TimeIndex, Scan)>> {
        let Some(index) = OffsetIndex::open_checked(&paths.1, base_offset, log_len)? else {
            return Ok(None);
        };
        let Some(time_index) = TimeIndex::open_checked(&paths.2, base_offset)? else {
            return Ok(None);
        };
        let (from_offset, from) = index.last().unwrap_or((base_offset, 0));
        let mut scan =
            scan(file, log_len, from, from_offset, false, None).map_err(io_err(&paths.0))?;
        if scan.error.is_some() {
            return Ok(None);
        }
        if from > 0 {
            let mut first = [0u8; HEADER_LEN];
            if file.read_exact_at(&mut first, 0).is_ok() {
                scan.first_timestamp =
                    HeaderView::read(&first).map_or(NO_TIMESTAMP, |h| h.max_timestamp);
            }
        }
        if let Some((t, _)) = time_index.last() {
            scan.max_timestamp = scan.max_timestamp.max(t);
        }
        if from == 0 && log_len == 0 {
            scan.next_offset = base_offset;
        }
        Ok(Some((index, time_index, scan)))
    }

    /// Makes the indexes appendable again (the active segment after a
    /// clean open, whose indexes were trimmed at close).
    pub(crate) fn make_active(&self, config: &LogConfig) -> Result<()> {
        // An index that cannot be mapped keeps no entries (they are
        // hints: lookups scan), rather than failing the log's open (out of
        // mappings with tens of thousands of segments, every partition
        // opened after that was left out).
        let mut index = self.index.write().expect("index lock");
        if index.is_full() {
            if let Err(error) = index.file().make_writable(config.index_bytes_max) {
                tracing::warn!(path = %self.log_path.display(), %error, "cannot map the offset index; lookups scan the segment");
            }
        }
        let mut time_index = self.time_index.write().expect("time index lock");
        if time_index.is_full() {
            if let Err(error) = time_index.file().make_writable(config.index_bytes_max) {
                tracing::warn!(path = %self.log_path.display(), %error, "cannot map the time index; lookups scan the segment");
            }
        }
        Ok(())
    }

    /// Rolls this segment: a final time-index entry, indexes trimmed,
    /// then marked closed (immutable, mmap-readable). Blocks reserved past
    /// its end stay reserved until [`Segment::release_reserved`]: giving
    /// them back frees disk blocks, which on a file system mounted with
    /// `discard` waits for the device (15 ms seen here), and a roll runs
    /// on the append path.
    pub(crate) fn seal(&self) -> Result<()> {
        // Opened trusted, both indexes are trimmed and read-only already:
        // trimmed again, each was remapped and counted as written, and
        // the next close fsynced two index files per segment of the log.
        // (Sealing is the writer's, so neither changes in between.)
        let index_sealed = self.index.read().expect("index lock").is_sealed();
        let mut time_index = self.time_index.write().expect("time index lock");
        if index_sealed && time_index.is_sealed() {
            self.closed.store(true, Ordering::Release);
            return Ok(());
        }
        let max_timestamp = self.max_timestamp();
        if self.size() > 0 {
            time_index.maybe_push(max_timestamp, self.next_offset() - 1);
        }
        time_index.file().trim()?;
        drop(time_index);
        self.index.write().expect("index lock").file().trim()?;
        self.indexes_written.fetch_add(1, Ordering::AcqRel);
        self.closed.store(true, Ordering::Release);
        Ok(())
    }

    pub(crate) fn base_offset(&self) -> i64 {
        self.base_offset
    }
    pub(crate) fn next_offset(&self) -> i64 {
        self.next_offset.load(Ordering::Acquire)
    }
    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    pub(crate) fn max_timestamp(&self) -> i64 {
        self.max_timestamp.load(Ordering::Acquire)
    }
    /// The time retention.ms judges this segment by: its largest record
    /// timestamp, or, when its records carry none (-1, a raw client
    /// batch's), the log file's last modification, as Kafka does; if
    /// that cannot be read, never old.
    pub(crate) fn retention_time_ms(&self) -> i64 {
        let max = self.max_timestamp();
        if max >= 0 {
            return max;
        }
        self.file
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(i64::MAX, |d| d.as_millis() as i64)
    }
    pub(crate) fn first_timestamp(&self) -> i64 {
        self.first_timestamp.load(Ordering::Acquire)
    }
    /// Wall-clock ms of the first append in this process (or of the
    /// open, for a segment that had records): `segment.ms` counts from
    /// here.
    pub(crate) fn first_append_ms(&self) -> i64 {
        self.first_append_ms.load(Ordering::Acquire)
    }
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }
    pub(crate) fn born_reserved(&self) -> bool {
        self.born_reserved
    }
    /// Tests: where the segment's block reservation ends.
    #[cfg(test)]
    pub(crate) fn preallocated_to(&self) -> u64 {
        self.preallocated_to.load(Ordering::Relaxed)
    }
    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }
    pub(crate) fn indexes_full(&self) -> bool {
        self.index.read().expect("index lock").is_full()
            || self.time_index.read().expect("time index lock").is_full()
    }

    /// Writer only: appends one whole, checked batch, given as parts
    /// written back to back (a rewritten header and the untouched body),
    /// and publishes it.
    pub(crate) fn append(
        &self,
        parts: &[&[u8]],
        header: &HeaderView,
        config: &LogConfig,
    ) -> Result<()> {
        let position = self.size.load(Ordering::Relaxed);
        let end = position + parts.iter().map(|p| p.len() as u64).sum::<u64>();
        if config.preallocate {
            self.preallocate(position, end, config.segment_bytes_max);
        }
        if let Err(error) = write_all_vectored_at(&self.file, parts, position) {
            self.discard_from(position);
            return Err(io_err(&self.log_path)(error));
        }
        self.data_written.fetch_add(1, Ordering::AcqRel);
        let max_timestamp = self.max_timestamp().max(header.max_timestamp);
        {
            let mut index = self.index.write().expect("index lock");
            let mut time_index = self.time_index.write().expect("time index lock");
            let mut indexer = Indexer {
                index: &mut index,
                time_index: &mut time_index,
                interval_bytes: u64::from(config.index_interval_bytes),
            };
            let mut bytes_since = self.bytes_since_index_entry.load(Ordering::Relaxed);
            indexer.on_batch(header, position, &mut bytes_since, max_timestamp);
            self.bytes_since_index_entry
                .store(bytes_since, Ordering::Relaxed);
        }
        self.indexes_written.fetch_add(1, Ordering::AcqRel);
        if position == 0 {
            self.first_timestamp
                .store(header.max_timestamp, Ordering::Release);
            self.first_append_ms
                .store(crate::log::now_ms(), Ordering::Release);
        }
        self.max_timestamp.store(max_timestamp, Ordering::Release);
        self.next_offset
            .store(header.last_offset() + 1, Ordering::Release);
        self.size.store(end, Ordering::Release);
        // The batch was checked before it got here: if everything before
        // it was too, so is the segment up to its new end.
        let _ = self
            .verified
            .compare_exchange(position, end, Ordering::AcqRel, Ordering::Acquire);
        Ok(())
    }

    /// Writer only, after a write at `position` failed (a full disk, an
    /// I/O error): cuts the file back to `position`. The write may have
    /// put part of its batch there, past the committed size; left in
    /// place, it would be read as a torn batch by an open that trusts the
    /// segment (after a clean close), which then refuses the log. Cutting
    /// also frees the blocks reserved past the end, so they are reserved
    /// again before the next write. Best effort: if it fails too, the
    /// next append overwrites the same place.
    fn discard_from(&self, position: u64) {
        if let Err(error) = self.file.set_len(position) {
            tracing::error!(path = %self.log_path.display(), position, %error, "could not cut a failed write off the segment");
        }
        let _ = self
            .preallocated_to
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |to| {
                (to != u64::MAX).then_some(to.min(position))
            });
    }

    /// Writer only: makes sure disk blocks are reserved for `position..end`
    /// before they are written, in chunks that grow with the segment
    /// (1 MiB, then as much as it holds in whole MiB, up to 4 MiB, never past the
    /// segment's roll size). The reservation is beyond the file's end
    /// (`FALLOC_FL_KEEP_SIZE`): the file's length stays the committed
    /// size, so readers, recovery and a crash see nothing new.
    ///
    /// Why: a buffered write into blocks not yet allocated makes ext4
    /// reserve and map each page under the file's block-mapping lock;
    /// into reserved blocks it skips that. Plain 16 KiB writes of 1 GiB
    /// ran about 20 % faster into a reserved file here (RESULTS, session
    /// 6). A reservation costs about 3.5 µs per MiB, so 4 MiB chunks
    /// cost next to nothing and keep what an idle partition holds in
    /// reserve small. Best effort: if the filesystem cannot reserve,
    /// writes go on as before.
    fn preallocate(&self, position: u64, end: u64, segment_bytes_max: u64) {
        const CHUNK_MIN: u64 = 1 << 20;
        const CHUNK_MAX: u64 = 4 << 20;
        let reserved = self.preallocated_to.load(Ordering::Relaxed);
        if end <= reserved {
            return;
        }
        let from = reserved.max(position);
        let chunk = position.clamp(CHUNK_MIN, CHUNK_MAX).div_ceil(CHUNK_MIN) * CHUNK_MIN;
        let to = (from + chunk).min(segment_bytes_max).max(end);
        if let Err(error) = reserve_blocks(&self.file, from, to - from) {
            tracing::debug!(path = %self.log_path.display(), %error, "not preallocating this segment");
            self.preallocated_to.store(u64::MAX, Ordering::Relaxed);
            return;
        }
        self.preallocated_to.store(to, Ordering::Relaxed);
    }

    /// Gives back blocks reserved past the end of a sealed segment (one
    /// that rolled, or one left by a crash), measured rather than
    /// remembered so that a reopened segment is trimmed too. Does nothing
    /// to a segment that is not sealed: its writer may be appending. Each
    /// sealed segment is measured once (every flush passes over them all).
    pub(crate) fn release_reserved(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        if !self.closed.load(Ordering::Acquire) || self.reservation_released.load(Ordering::Acquire)
        {
            return Ok(());
        }
        let size = self.size();
        let meta = self.file.metadata().map_err(io_err(&self.log_path))?;
        let block = meta.blksize().max(512);
        if meta.blocks() * 512 > size.div_ceil(block) * block {
            // Truncating to the current length frees what lies beyond it.
            self.file.set_len(size).map_err(io_err(&self.log_path))?;
            // But it also sets the file's modification time, which is
            // what retention.ms judges a segment without record
            // timestamps by: set back, or every restart (which measures
            // reopened segments again; one with an extent-tree block
            // always counts a block more) would make them all new.
            if let Ok(modified) = meta.modified() {
                self.file
                    .set_modified(modified)
                    .map_err(io_err(&self.log_path))?;
            }
        }
        self.preallocated_to.store(0, Ordering::Relaxed);
        self.reservation_released.store(true, Ordering::Release);
        Ok(())
    }

    /// `len` bytes at `position` (< size): a slice of the mmap when closed,
    /// a positional read otherwise. May return fewer bytes if the file was
    /// truncated concurrently (the caller checks `is_retired`).
    fn read_range(&self, position: u64, len: usize) -> Result<Bytes> {
        if self.closed.load(Ordering::Acquire) {
            match self.mapped() {
                Ok(map) => {
                    let start = (position as usize).min(map.len());
                    let end = start.saturating_add(len).min(map.len());
                    return Ok(map.slice(start..end));
                }
                // No map (vm.max_map_count reached with tens of thousands
                // of segments, or no address space): read as the active
                // segment is read, instead of failing every read of it.
                Err(error) => {
                    tracing::debug!(path = %self.log_path.display(), %error, "cannot map a closed segment; reading it");
                }
            }
        }
        let buf = read_exact_at_most(&self.file, position, len).map_err(io_err(&self.log_path))?;
        Ok(Bytes::from(buf))
    }

    #[allow(unsafe_code)]
    fn mapped(&self) -> Result<Bytes> {
        if let Some(b) = self.mmap.get() {
            return Ok(b.clone());
        }
        let size = self.size();
        if size == 0 {
            return Ok(Bytes::new());
        }
        // SAFETY: the segment is closed, so this process never writes or
        // shrinks this file again: truncating a closed segment writes a new
        // file and renames it over this one, and deletion only unlinks, so
        // the mapped inode keeps its length for the mapping's lifetime. The
        // data directory is owned by this broker (external modification is
        // outside the model, as for any mmap-based store).
        let map = unsafe { Mmap::map(&self.file) }.map_err(io_err(&self.log_path))?;
        let map = Bytes::from_owner(map);
        let map = map.slice(..(size as usize).min(map.len()));
        Ok(self.mmap.get_or_init(|| map).clone())
    }

    fn corrupt(&self, position: u64, reason: impl Into<String>) -> StorageError {
        StorageError::CorruptSegment {
            path: self.log_path.clone(),
            position,
            reason: reason.into(),
        }
    }

    fn header_at(&self, position: u64, size: u64) -> Result<HeaderView> {
        let bytes = self.read_range(position, HEADER_LEN)?;
        let h =
            HeaderView::read(&bytes).ok_or_else(|| self.corrupt(position, "bad batch header"))?;
        if position + h.total_len as u64 > size {
            return Err(self.corrupt(
                position,
                format!(
                    "batch of {} bytes runs past the segment end {size}",
                    h.total_len
                ),
            ));
        }
        Ok(h)
    }

    /// Position and header of the first batch whose last offset >= `offset`,
    /// within the first `size` bytes.
    fn find(&self, offset: i64, size: u64) -> Result<Option<(u64, HeaderView)>> {
        let indexed = self.index.read().expect("index lock").lookup(offset);
        self.find_from(indexed, offset, size, indexed > 0)
    }

    /// [`Segment::find`] scanning forward from `position`. With
    /// `from_index`, `position` came from the offset index and is checked:
    /// offsets within a segment have no gaps, so a first header there that
    /// starts after `offset`, or is not one, means the entry pointed past
    /// the batch holding it (a corrupt entry; an open checks only the
    /// first and the last). Trusted, a reader skipped the records in
    /// between without a word; the segment is scanned from its start.
    fn find_from(
        &self,
        mut position: u64,
        offset: i64,
        size: u64,
        from_index: bool,
    ) -> Result<Option<(u64, HeaderView)>> {
        let mut checked = !from_index;
        while position < size {
            let header = self.header_at(position, size);
            if !checked {
                checked = true;
                if !header.as_ref().is_ok_and(|h| h.base_offset <= offset) {
                    tracing::warn!(path = %self.log_path.display(), offset, position, "offset index entry points past its batch; scanning the segment");
                    return self.find_from(0, offset, size, false);
                }
            }
            let h = header?;
            if h.last_offset() >= offset {
                return Ok(Some((position, h)));
            }
            position += h.total_len as u64;
        }
        Ok(None)
    }

    /// Whole batches starting with the one holding `offset` (or the next
    /// one), at most `max_bytes` but at least one batch, each with a last
    /// offset below `upper_bound`. CRC-checked, except the bytes this
    /// process has checked before (`verified`).
    pub(crate) fn read(&self, offset: i64, max_bytes: usize, upper_bound: i64) -> Result<Bytes> {
        let size = self.size();
        let Some((start, first)) = self.find(offset, size)? else {
            return Ok(Bytes::new());
        };
        if first.last_offset() >= upper_bound {
            return Ok(Bytes::new());
        }
        let available = (size - start) as usize;
        let len = max_bytes.min(available).max(first.total_len);
        let data = self.read_range(start, len)?;
        let verified = self.verified.load(Ordering::Acquire);
        let mut end = 0;
        while end < data.len() {
            let rest = &data[end..];
            let at = start + end as u64;
            let total = match batch::batch_len(rest) {
                batch::Decode::Complete(total)
                    if at + total as u64 <= verified || at >= self.appended_from =>
                {
                    total
                }
                batch::Decode::Incomplete(_) if end > 0 => break,
                _ => match batch::check_batch(rest) {
                    Ok(total) => total,
                    // The batches before a corrupt one are served; a
                    // read that starts at it gets the error, naming it.
                    Err(_) if end > 0 => break,
                    Err(e) => return Err(self.corrupt(at, e.to_string())),
                },
            };
            let h = HeaderView::read(rest)
                .ok_or_else(|| self.corrupt(start + end as u64, "bad batch header"))?;
            if h.last_offset() >= upper_bound {
                break;
            }
            end += total;
        }
        if start <= verified {
            // Checked from where the verified bytes end (or before) on.
            self.verified
                .fetch_max(start + end as u64, Ordering::AcqRel);
        }
        Ok(data.slice(..end))
    }

    /// First (offset, timestamp) at or after `timestamp_ms` whose offset
    /// is >= `offset_min`.
    pub(crate) fn find_timestamp(
        &self,
        timestamp_ms: i64,
        offset_min: i64,
    ) -> Result<Option<(i64, i64)>> {
        let size = self.size();
        let from_offset = self
            .time_index
            .read()
            .expect("time index lock")
            .last_older_than(timestamp_ms)
            .unwrap_or(self.base_offset)
            .max(offset_min);
        let Some((mut position, _)) = self.find(from_offset, size)? else {
            return Ok(None);
        };
        while position < size {
            let h = self.header_at(position, size)?;
            if h.max_timestamp >= timestamp_ms && h.last_offset() >= offset_min {
                let bytes = self.read_range(position, h.total_len)?;
                let batch = batch::RecordBatch::parse(bytes)
                    .map_err(|e| self.corrupt(position, e.to_string()))?;
                let records = batch
                    .records()
                    .map_err(|e| self.corrupt(position, e.to_string()))?;
                if let Some(r) = records
                    .iter()
                    .find(|r| r.timestamp_ms >= timestamp_ms && r.offset >= offset_min)
                {
                    return Ok(Some((r.offset, r.timestamp_ms)));
                }
            }
            position += h.total_len as u64;
        }
        Ok(None)
    }

    /// fsyncs appended log bytes (not the indexes): returns once every
    /// byte written before the call is durable.
    pub(crate) fn sync_data(&self) -> Result<()> {
        let written = self.data_written.load(Ordering::Acquire);
        if self.data_synced.load(Ordering::Acquire) < written {
            self.file.sync_data().map_err(io_err(&self.log_path))?;
            self.data_synced.fetch_max(written, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Starts write-back of the log bytes appended since the last call
    /// and returns without waiting for it
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`; elsewhere a no-op). See
    /// [`crate::Log::start_writeback`].
    #[allow(unsafe_code)]
    pub(crate) fn start_writeback(&self) -> Result<()> {
        let size = self.size();
        let from = self.writeback_from.load(Ordering::Acquire).min(size);
        if size == from {
            return Ok(());
        }
        #[cfg(target_os = "linux")]
        #[allow(clippy::cast_possible_wrap)]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: sync_file_range only reads its arguments; the fd is
            // open for as long as `self.file` lives.
            let rc = unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    from as libc::off64_t,
                    (size - from) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            if rc != 0 {
                return Err(io_err(&self.log_path)(std::io::Error::last_os_error()));
            }
        }
        self.writeback_from.store(size, Ordering::Release);
        Ok(())
    }

    /// Whether index entries were written since the last index fsync
    /// (tests).
    #[cfg(test)]
    pub(crate) fn indexes_unsynced(&self) -> bool {
        self.indexes_synced.load(Ordering::Acquire) < self.indexes_written.load(Ordering::Acquire)
    }

    /// Where the next `start_writeback` begins (tests).
    #[cfg(test)]
    pub(crate) fn writeback_from(&self) -> u64 {
        self.writeback_from.load(Ordering::Acquire)
    }

    /// fsyncs log bytes and both indexes.
    pub(crate) fn sync_all(&self) -> Result<()> {
        self.sync_data()?;
        let written = self.indexes_written.load(Ordering::Acquire);
        if self.indexes_synced.load(Ordering::Acquire) < written {
            // The fsyncs run with the locks dropped: appends take the
            // index's write lock, and reads wait behind a waiting writer.
            let index = self.index.read().expect("index lock").sync_handle()?;
            let time_index = self
                .time_index
                .read()
                .expect("time index lock")
                .sync_handle()?;
            for pending in [index, time_index].into_iter().flatten() {
                pending.finish()?;
            }
            self.indexes_synced.fetch_max(written, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Writer only: the position of the first batch whose last offset is
    /// >= `offset` (the truncation point), or the size.
    pub(crate) fn truncation_position(&self, offset: i64) -> Result<u64> {
        let size = self.size();
        Ok(self.find(offset, size)?.map_or(size, |(p, _)| p))
    }

    /// Writer only, the first step of cutting every batch whose last
    /// offset is >= `offset`, taken before the log removes anything: a
    /// closed segment's kept part is copied out and synced here, which
    /// needs room on disk. A copy that fails leaves the segment as it was.
    /// (Made after the later segments were unlinked, a failed copy failed
    /// the log with them gone, and the broker stopped; on its restart the
    /// same cut, and the same failure.)
    pub(crate) fn prepare_truncation(&self, offset: i64) -> Result<PreparedCut> {
        let position = self.truncation_position(offset)?;
        if !self.closed.load(Ordering::Acquire) {
            return Ok(PreparedCut {
                position,
                swap: None,
            });
        }
        // Live mmaps of this file must stay valid: the kept part is
        // copied, and the copy renamed over the file by `truncate_to`.
        let swap = self.log_path.with_extension("log.swap");
        let copied = (|| {
            let mut out = File::create(&swap)?;
            let mut src = std::io::Read::take(File::open(&self.log_path)?, position);
            std::io::copy(&mut src, &mut out)?;
            out.sync_all()
        })();
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&swap);
            return Err(io_err(&swap)(e));
        }
        Ok(PreparedCut {
            position,
            swap: Some(swap),
        })
    }

    /// Writer only: removes every batch whose last offset is >= the
    /// offset `cut` was prepared for ([`Segment::prepare_truncation`]).
    /// Returns the replacement (active) segment; `self` must be dropped
    /// from the segment list.
    pub(crate) fn truncate_to(
        &self,
        dir: &Path,
        config: &LogConfig,
        cut: PreparedCut,
    ) -> Result<Segment> {
        match cut.swap {
            Some(swap) => {
                std::fs::rename(&swap, &self.log_path).map_err(io_err(&self.log_path))?;
            }
            None => {
                self.retired.store(true, Ordering::SeqCst);
                self.file
                    .set_len(cut.position)
                    .map_err(io_err(&self.log_path))?;
                self.file.sync_all().map_err(io_err(&self.log_path))?;
            }
        }
        // The prefix is trusted data; rebuild the indexes from it.
        let (seg, _) = Segment::open(dir, self.base_offset, config, OpenMode::Recover)?;
        Ok(seg)
    }

    /// Unlinks the segment's files (open handles and mmaps stay valid).
    pub(crate) fn delete_files(&self) -> Result<()> {
        remove_files([&self.log_path, &self.index_path, &self.time_index_path])
    }

    /// Renames the segment's files to `<name>.deleted` and adds them to
    /// `trash`, for an unlink later (see `Log::empty_trash`).
    pub(crate) fn move_to_trash(&self, trash: &mut Vec<PathBuf>) -> Result<()> {
        for path in [&self.log_path, &self.index_path, &self.time_index_path] {
            if let Some(trashed) = move_to_trash(path)? {
                trash.push(trashed);
            }
        }
        Ok(())
    }
}

/// A cut of a segment prepared by [`Segment::prepare_truncation`].
#[derive(Debug)]
pub(crate) struct PreparedCut {
    /// File position of the first batch cut.
    position: u64,
    /// A closed segment's kept part, copied and synced.
    swap: Option<PathBuf>,
}

/// Up to `len` bytes at `offset` (fewer only at end of file), read into
/// a buffer that is not zeroed first: a fetch of the active segment reads
/// up to several MiB, and zero-filling them cost as much as the read.
#[allow(unsafe_code)]
fn read_exact_at_most(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let at = libc::off_t::try_from(offset + buf.len() as u64)
            .map_err(|_| std::io::Error::other("file offset beyond off_t"))?;
        let spare = buf.spare_capacity_mut();
        // SAFETY: pread writes at most `spare.len()` bytes into the
        // vector's spare capacity, which is allocated and exclusively
        // borrowed here; only the bytes it reports as read are then
        // counted as initialised.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast::<libc::c_void>(),
                spare.len(),
                at,
            )
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            break;
        }
        // SAFETY: pread initialised `n` (<= spare.len()) bytes past len.
        unsafe { buf.set_len(buf.len() + n as usize) };
    }
    Ok(buf)
}

/// Writes every byte of `parts`, in order, at `offset`: one pwritev(2)
/// call in the common case (the rewritten batch header and the body are
/// two parts; writing them with two calls cost a syscall per append).
/// Nothing is allocated: this runs once per append.
#[allow(unsafe_code)]
fn write_all_vectored_at(file: &File, parts: &[&[u8]], mut offset: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const IOV_PER_CALL: usize = 8;
    // parts[first][skip..] is the first byte not yet written.
    let (mut first, mut skip) = (0usize, 0usize);
    loop {
        while first < parts.len() && parts[first].len() == skip {
            first += 1;
            skip = 0;
        }
        if first == parts.len() {
            return Ok(());
        }
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; IOV_PER_CALL];
        let mut count = 0;
        for (i, part) in parts[first..].iter().take(IOV_PER_CALL).enumerate() {
            let part = if i == 0 { &part[skip..] } else { part };
            iov[i] = libc::iovec {
                iov_base: part.as_ptr() as *mut libc::c_void,
                iov_len: part.len(),
            };
            count = i + 1;
        }
        let at = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::other("file offset beyond off_t"))?;
        // SAFETY: the first `count` iovecs point into live slices borrowed
        // for the whole call, each with its exact length; pwritev only
        // reads them. `count` is at most IOV_PER_CALL.
        let written =
            unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), count as libc::c_int, at) };
        if written < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut written = written as usize;
        offset += written as u64;
        while written > 0 {
            let left = parts[first].len() - skip;
            if written >= left {
                written -= left;
                first += 1;
                skip = 0;
            } else {
                skip += written;
                written = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::BatchBuilder;

    /// Reads stop at end of file and return exactly the file's bytes.
    #[test]
    fn unzeroed_read_returns_the_file_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(read_exact_at_most(&file, 0, 100_000).unwrap(), data);
        assert_eq!(
            read_exact_at_most(&file, 99_990, 1000).unwrap(),
            &data[99_990..]
        );
        assert!(read_exact_at_most(&file, 200_000, 10).unwrap().is_empty());
        assert_eq!(read_exact_at_most(&file, 5, 0).unwrap(), Vec::<u8>::new());
    }

    /// More parts than one pwritev call takes, empty parts among them:
    /// every byte lands in order at the offset.
    #[test]
    fn vectored_write_writes_every_part_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("v"))
            .unwrap();
        let owned: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| vec![(i % 251) as u8; (i % 7) as usize])
            .collect();
        let parts: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
        write_all_vectored_at(&file, &parts, 5).unwrap();
        let expected: Vec<u8> = std::iter::repeat_n(0u8, 5)
            .chain(owned.iter().flatten().copied())
            .collect();
        assert_eq!(std::fs::read(dir.path().join("v")).unwrap(), expected);
    }

    fn batch(base: i64, n: usize, ts: i64) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        for i in 0..n {
            b.push(ts + i as i64, None, Some(&[7u8; 100]), &[]);
        }
        let mut bytes = b.build();
        batch::set_base_offset(&mut bytes, base);
        bytes.to_vec()
    }

    fn config() -> LogConfig {
        LogConfig {
            index_interval_bytes: 500,
            index_bytes_max: 4096,
            ..LogConfig::default()
        }
    }

    #[test]
    fn names_parse() {
        assert_eq!(file_name(5, "log"), "00000000000000000005.log");
        assert_eq!(parse_log_name("00000000000000000005.log"), Some(5));
        assert_eq!(parse_log_name("5.log"), None);
        assert_eq!(parse_log_name("0000000000000000000x.log"), None);
    }

    #[test]
    fn append_read_seal_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config();
        let seg = Segment::create(dir.path(), 10, &cfg).unwrap();
        let mut offset = 10;
        for i in 0..20 {
            let b = batch(offset, 3, 1000 + i);
            let h = HeaderView::read(&b).unwrap();
            seg.append(&[&b], &h, &cfg).unwrap();
            offset += 3;
        }
        assert_eq!(seg.next_offset(), 70);
        let got = seg.read(35, 1, i64::MAX).unwrap();
        let batches = batch::RecordBatch::parse_all(got).unwrap();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].base_offset(), 34);
        assert_eq!(seg.find_timestamp(1005, 0).unwrap(), Some((21, 1005)));
        assert_eq!(seg.find_timestamp(1015, 22).unwrap(), Some((51, 1015)));
        assert_eq!(seg.find_timestamp(5000, 0).unwrap(), None);
        assert!(seg.read(40, 10_000, 40).unwrap().is_empty());
        seg.seal().unwrap();
        let mapped = seg.read(10, 1 << 20, 43).unwrap();
        assert_eq!(batch::RecordBatch::parse_all(mapped).unwrap().len(), 11);
        drop(seg);
        let (seg, truncated) = Segment::open(dir.path(), 10, &cfg, OpenMode::Trusted).unwrap();
        assert!(!truncated);
        assert_eq!(seg.next_offset(), 70);
        assert_eq!(seg.max_timestamp(), 1021);
        assert_eq!(seg.first_timestamp(), 1002);
    }

    /// A sync covers every byte written before it, even when a sync
    /// that started earlier (a flush on another thread) is still under
    /// way: with a flag that sync cleared as it began, a sync for an
    /// fsync-per-batch append returned without syncing.
    #[test]
    fn a_sync_covers_what_was_written_before_it_whoever_syncs_too() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config();
        let seg = Segment::create(dir.path(), 0, &cfg).unwrap();
        let unsynced = |seg: &Segment| {
            seg.data_synced.load(Ordering::Acquire) < seg.data_written.load(Ordering::Acquire)
        };
        let b = batch(0, 3, 1000);
        seg.append(&[&b], &HeaderView::read(&b).unwrap(), &cfg)
            .unwrap();
        assert!(unsynced(&seg));
        // Another thread's flush begins: it syncs what was written so far.
        let theirs = seg.data_written.load(Ordering::Acquire);
        let b = batch(3, 3, 1000);
        seg.append(&[&b], &HeaderView::read(&b).unwrap(), &cfg)
            .unwrap();
        // Its fsync ends and records what it started from.
        seg.data_synced.fetch_max(theirs, Ordering::AcqRel);
        assert!(unsynced(&seg), "the second batch is not covered");
        seg.sync_data().unwrap();
        assert!(!unsynced(&seg));
    }

    /// Bytes a recovery scan kept are not taken as durable: the process
    /// that wrote them may have died before its fsync, so the recovery's
    /// sync must really fsync them.
    #[test]
    fn a_recovered_segment_is_synced_before_it_is_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config();
        {
            let seg = Segment::create(dir.path(), 0, &cfg).unwrap();
            let b = batch(0, 3, 1000);
            seg.append(&[&b], &HeaderView::read(&b).unwrap(), &cfg)
                .unwrap();
        }
        let (seg, _) = Segment::open(dir.path(), 0, &cfg, OpenMode::Recover).unwrap();
        let unsynced = |seg: &Segment| {
            seg.data_synced.load(Ordering::Acquire) < seg.data_written.load(Ordering::Acquire)
        };
        assert!(unsynced(&seg));
        seg.sync_all().unwrap();
        assert!(!unsynced(&seg));
    }

    #[test]
    fn reads_check_each_batch_once_per_process() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config();
        let seg = Segment::create(dir.path(), 0, &cfg).unwrap();
        for base in [0, 3] {
            let b = batch(base, 3, 1000);
            seg.append(&[&b], &HeaderView::read(&b).unwrap(), &cfg)
                .unwrap();
        }
        let one = batch(0, 3, 1000).len() as u64;
        assert_eq!(seg.verified.load(Ordering::Acquire), 2 * one);
        // Flip a value byte of the second batch behind the segment's back.
        let path = dir.path().join(file_name(0, "log"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, 2 * one - 2).unwrap();
        file.write_all_at(&[byte[0] ^ 0x55], 2 * one - 2).unwrap();
        // Checked when it was appended: served as stored (a consumer's or
        // follower's own check of every batch it decodes catches it).
        assert_eq!(seg.read(3, 1 << 20, i64::MAX).unwrap().len() as u64, one);
        drop(seg);

        // A new process has checked nothing of a cleanly closed segment.
        let (seg, _) = Segment::open(dir.path(), 0, &cfg, OpenMode::Trusted).unwrap();
        assert_eq!(seg.verified.load(Ordering::Acquire), 0);
        let corrupt_at = |seg: &Segment| match seg.read(3, 1 << 20, i64::MAX) {
            Err(StorageError::CorruptSegment { position, .. }) => position,
            other => panic!("expected CorruptSegment, got {other:?}"),
        };
        assert_eq!(corrupt_at(&seg), one);
        // Reading the first batch checks it; the second stays unchecked.
        assert_eq!(seg.read(0, 1, i64::MAX).unwrap().len() as u64, one);
        assert_eq!(seg.verified.load(Ordering::Acquire), one);
        assert_eq!(corrupt_at(&seg), one);
        drop(seg);

        // What this process appends after the open is not checked again.
        let (seg, _) = Segment::open(dir.path(), 0, &cfg, OpenMode::Trusted).unwrap();
        let b = batch(6, 3, 1000);
        seg.append(&[&b], &HeaderView::read(&b).unwrap(), &cfg)
            .unwrap();
        file.read_exact_at(&mut byte, 3 * one - 2).unwrap();
        file.write_all_at(&[byte[0] ^ 0x55], 3 * one - 2).unwrap();
        assert_eq!(seg.read(6, 1 << 20, i64::MAX).unwrap().len() as u64, one);
        assert_eq!(corrupt_at(&seg), one);
        drop(seg);
        let cut = OpenOptions::new().write(true).open(&path).unwrap();
        cut.set_len(2 * one).unwrap();

        // Recovery checks what it scans and truncates the corrupt tail.
        let (seg, truncated) = Segment::open(dir.path(), 0, &cfg, OpenMode::Recover).unwrap();
        assert!(truncated);
        assert_eq!(seg.verified.load(Ordering::Acquire), one);
        assert_eq!(seg.size(), one);
    }
}

#[cfg(test)]
mod preallocation_tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::BatchBuilder;

    /// Bytes of disk the file holds (allocated blocks, reserved or not).
    fn allocated(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    /// Appends one batch of one 1,000-byte record at the segment's end.
    fn append_one(seg: &Segment, cfg: &LogConfig, timestamp: i64) {
        let mut b = BatchBuilder::new();
        b.push(timestamp, None, Some(&[9u8; 1000]), &[]);
        let mut bytes = b.build();
        batch::set_base_offset(&mut bytes, seg.next_offset());
        let h = HeaderView::read(&bytes).unwrap();
        seg.append(&[&bytes], &h, cfg).unwrap();
    }

    fn append_batches(seg: &Segment, cfg: &LogConfig, count: i64) {
        for i in 0..count {
            append_one(seg, cfg, i);
            assert_eq!(seg.next_offset(), i + 1);
        }
    }

    /// The reservation lies past the file's end: the length on disk is
    /// always the committed size, and a roll gives the blocks back.
    #[test]
    fn reserved_blocks_stay_past_the_end_and_go_at_roll() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig::default();
        assert!(cfg.preallocate);
        let seg = Segment::create(dir.path(), 0, &cfg).unwrap();
        append_batches(&seg, &cfg, 10);
        let path = seg.log_path().to_path_buf();
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len, seg.size());
        if seg.preallocated_to.load(Ordering::Relaxed) == u64::MAX {
            // This filesystem cannot reserve (e.g. no fallocate); the
            // length check above is all that applies.
            return;
        }
        assert_eq!(seg.preallocated_to.load(Ordering::Relaxed), 1 << 20);
        assert!(allocated(&path) >= 1 << 20, "{} bytes", allocated(&path));
        seg.release_reserved().unwrap();
        assert!(
            allocated(&path) >= 1 << 20,
            "an active segment keeps its reservation"
        );
        assert!(!seg.reservation_released.load(Ordering::Acquire));
        seg.seal().unwrap();
        assert!(allocated(&path) >= 1 << 20, "sealing leaves it to the tick");
        // Giving the blocks back keeps the file's modification time, by
        // which retention judges segments without record timestamps.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(30 * 86_400);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        seg.release_reserved().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), old);
        assert!(seg.reservation_released.load(Ordering::Acquire));
        assert!(allocated(&path) < len + 64 * 1024, "{}", allocated(&path));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        let read = seg.read(0, 1 << 20, i64::MAX).unwrap();
        assert_eq!(batch::RecordBatch::parse_all(read).unwrap().len(), 10);
    }

    /// Chunks grow with the segment but never pass its roll size, and a
    /// segment reopened after a crash (blocks still reserved past its
    /// end) gives them back when sealed.
    #[test]
    fn chunks_grow_up_to_the_roll_size_and_a_crashed_reservation_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            segment_bytes_max: 3 << 20,
            ..LogConfig::default()
        };
        let seg = Segment::create(dir.path(), 0, &cfg).unwrap();
        append_batches(&seg, &cfg, 1);
        if seg.preallocated_to.load(Ordering::Relaxed) == u64::MAX {
            return;
        }
        // Each chunk is as large as what was written (at least 1 MiB):
        // past 1 MiB the reservation reaches 2 MiB, past 2 MiB it would
        // reach 4 MiB but stops at the 3 MiB roll size.
        let mut next = 1;
        for (past, expected) in [(1u64 << 20, 2u64 << 20), (2 << 20, 3 << 20)] {
            while seg.size() <= past {
                append_one(&seg, &cfg, next);
                next += 1;
            }
            assert_eq!(seg.preallocated_to.load(Ordering::Relaxed), expected);
        }
        let path = seg.log_path().to_path_buf();
        let len = seg.size();
        drop(seg); // a crash: no seal
        assert!(allocated(&path) >= 3 << 20);
        let (seg, truncated) = Segment::open(dir.path(), 0, &cfg, OpenMode::Recover).unwrap();
        assert!(!truncated);
        assert_eq!(seg.size(), len);
        seg.seal().unwrap();
        seg.release_reserved().unwrap();
        assert!(allocated(&path) < len + 64 * 1024, "{}", allocated(&path));
    }

    /// Past 4 MiB each chunk stays 4 MiB: reservations run 1, 2, 4, 8,
    /// then 12 MiB.
    #[test]
    fn chunks_stop_growing_at_4_mib() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig::default();
        let seg = Segment::create(dir.path(), 0, &cfg).unwrap();
        append_one(&seg, &cfg, 0);
        if seg.preallocated_to.load(Ordering::Relaxed) == u64::MAX {
            return;
        }
        let mut next = 1;
        for (past, expected) in [(1u64, 2u64), (2, 4), (4, 8), (8, 12)] {
            while seg.size() <= past << 20 {
                append_one(&seg, &cfg, next);
                next += 1;
            }
            assert_eq!(seg.preallocated_to.load(Ordering::Relaxed), expected << 20);
        }
    }

    /// With `preallocate` off nothing is reserved.
    #[test]
    fn preallocate_off_reserves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            preallocate: false,
            ..LogConfig::default()
        };
        let seg = Segment::create(dir.path(), 0, &cfg).unwrap();
        append_batches(&seg, &cfg, 3);
        assert_eq!(seg.preallocated_to.load(Ordering::Relaxed), 0);
        assert!(allocated(seg.log_path()) < seg.size() + 64 * 1024);
    }
}
