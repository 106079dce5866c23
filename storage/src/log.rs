//! A partition's log: an ordered list of segments, the last one active.
//!
//! Where it sits on the data path: produce → [`Log::append_as_leader`];
//! replica fetchers → [`Log::append_as_follower`]; fetch → [`Log::read`];
//! replication drives [`Log::set_high_watermark`], [`Log::truncate_to`] and
//! [`Log::end_offset_for_epoch`].
//!
//! Concurrency: one writer at a time (the `writer` mutex serialises
//! appends, rolls, truncation, retention and flushes); readers take an
//! `Arc` snapshot of the segment list and atomics, never the writer lock.
//! Bytes are written first, then the segment's size and the log end offset
//! are published, so a reader never sees a half-written batch.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};

use crate::batch::{self, HeaderView, RecordBatch};
use crate::checkpoint;
use crate::epoch::EpochCache;
use crate::index_file::io_err;
use crate::producer_state::{self, ProducerStates, SequenceCheck};
use crate::segment::{self, OpenMode, Segment};
use crate::spare::{self, Spare};
use crate::{Result, StorageError};

/// Which timestamp a record carries in the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TimestampType {
    /// The producer's timestamp is kept.
    #[default]
    CreateTime,
    /// The broker stamps the append time (max_timestamp, attribute bit).
    LogAppendTime,
}

/// When appended bytes are fsync'd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushPolicy {
    /// fsync before `append_*` returns.
    EveryBatch,
    /// fsync once this many messages or ms have passed since the last flush
    /// (checked on append and by `Log::tick`); None disables that trigger.
    Interval {
        messages: Option<u64>,
        ms: Option<u64>,
    },
}

/// Per-log settings (the topic configs that storage understands).
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// segment.bytes: roll when the active segment would exceed this.
    pub segment_bytes_max: u64,
    /// segment.ms: roll when the active segment's first batch is older.
    pub segment_ms_max: Option<u64>,
    /// index.interval.bytes: bytes between sparse index entries.
    pub index_interval_bytes: u32,
    /// Preallocated size of each index file.
    pub index_bytes_max: u32,
    /// retention.bytes: delete oldest segments while the log is larger.
    pub retention_bytes_max: Option<u64>,
    /// retention.ms: delete segments whose newest record is older.
    pub retention_ms_max: Option<u64>,
    /// max.message.bytes: largest batch accepted.
    pub message_bytes_max: u32,
    /// message.timestamp.type.
    pub timestamp_type: TimestampType,
    /// flush.messages / flush.ms.
    pub flush: FlushPolicy,
    /// producer.id.expiration.ms: an idempotent producer's state is
    /// dropped once its last batch is this old.
    pub producer_id_expiration_ms: u64,
    /// preallocate: reserve disk blocks ahead of the active segment's
    /// appends (see `Segment::preallocate`), and the whole next segment
    /// in the background once the active one is half full (`spare`).
    pub preallocate: bool,
}

impl Default for LogConfig {
    /// Kafka-like defaults.
    fn default() -> Self {
        LogConfig {
            segment_bytes_max: 1 << 30,
            segment_ms_max: None,
            index_interval_bytes: 4096,
            index_bytes_max: 10 << 20,
            retention_bytes_max: None,
            retention_ms_max: Some(7 * 24 * 60 * 60 * 1000),
            message_bytes_max: 1_048_588,
            timestamp_type: TimestampType::CreateTime,
            flush: FlushPolicy::Interval {
                messages: None,
                ms: Some(1000),
            },
            producer_id_expiration_ms: 24 * 60 * 60 * 1000,
            preallocate: true,
        }
    }
}

/// What an append did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendInfo {
    pub base_offset: i64,
    pub last_offset: i64,
    /// Set when the log uses LogAppendTime, else -1.
    pub log_append_time_ms: i64,
    pub record_count: i32,
    /// The batch was a retry of one already in the log (same producer id,
    /// epoch and sequences): nothing was written and the offsets are the
    /// original ones.
    pub duplicate: bool,
}

/// Bytes read from one segment: whole batches, concatenated.
#[derive(Clone, Debug, Default)]
pub struct ReadResult {
    /// Whole batches; the first may start before the requested offset.
    pub batches: Bytes,
    /// Log start offset at read time.
    pub log_start_offset: i64,
    /// Log end offset at read time.
    pub log_end_offset: i64,
    /// High watermark at read time.
    pub high_watermark: i64,
}

type Segments = Arc<Vec<Arc<Segment>>>;

/// Bytes appended within a second that make a partition hot: its next
/// segment is reserved at once, and a segment that reserves on the append
/// path rolls as soon as that reservation is ready (`wants_spare`).
const HOT_BYTES: u64 = 8 << 20;

/// How many times a read retries after racing with a truncation.
const READ_RETRIES_MAX: usize = 16;

/// State only the writer touches.
#[derive(Debug)]
struct Writer {
    /// Messages appended since the last flush.
    unflushed_messages: u64,
    /// Wall-clock ms of the last flush.
    last_flush_ms: i64,
    /// The persisted recovery point.
    recovery_point: i64,
    /// Bumped when a segment file is created or removed; the directory
    /// is synced up to `Log::dir_synced`.
    dir_changes: u64,
    /// Bumped by every truncation or reset, so a flush that ran without
    /// the lock knows whether the end it synced still stands.
    truncations: u64,
    closed: bool,
    /// (active segment's base, wall-clock ms, its size then): where the
    /// current one-second window of appends started (`wants_spare`).
    hot_window: (i64, i64, u64),
}

/// One partition's log. `Send + Sync`: one writer at a time (appends
/// serialise internally), reads from any number of threads without waiting
/// for the writer.
#[derive(Debug)]
pub struct Log {
    dir: PathBuf,
    config: RwLock<LogConfig>,
    /// Ordered by base offset; the last is the active segment. Replaced
    /// wholesale (copy on write) on roll, truncation and deletion.
    segments: RwLock<Segments>,
    writer: Mutex<Writer>,
    /// The checkpoints' lock, holding the high watermark in its file.
    /// Every write of the high-watermark and recovery-point checkpoints
    /// happens under it. Taken before the writer lock and never inside
    /// it: a checkpoint write fsyncs, and under write-back an fsync takes
    /// tens of ms, which held every append (and so every acks=all answer)
    /// behind it when it ran under the writer lock. Truncations take it
    /// too, so no checkpoint write straddles one.
    checkpoints: Mutex<i64>,
    epochs: RwLock<EpochCache>,
    /// Idempotent producers' state; locked inside the writer lock.
    producers: Mutex<ProducerStates>,
    log_start_offset: AtomicI64,
    log_end_offset: AtomicI64,
    high_watermark: AtomicI64,
    closed: AtomicBool,
    /// Closed by [`Log::fail`], not by a close or a deletion.
    failed: AtomicBool,
    /// Leader appends with an epoch below this are refused: this replica
    /// follows (or waits for) the leader of that epoch
    /// ([`Log::fence_leader_appends`]).
    leader_fence: AtomicI32,
    /// The `Writer::dir_changes` count the last directory fsync that
    /// succeeded started from: a sync that must cover a change waits for
    /// its own fsync even while another thread's is under way.
    dir_synced: AtomicU64,
    /// Follower writes for a leader epoch at or below this are refused:
    /// this replica led in that epoch ([`Log::fence_follower_writes`]).
    follower_fence: AtomicI32,
    /// The next segment's file, reserved in the background (`spare`).
    spare: Arc<Spare>,
    /// Files renamed to `<name>.deleted` under the writer lock, to be
    /// unlinked without it (`empty_trash`).
    trash: Mutex<Vec<PathBuf>>,
    /// The log start moved and its checkpoint is not written yet
    /// (`advance_log_start`).
    log_start_unpersisted: AtomicBool,
    /// The directory was created by `open` and its entry in the parent
    /// directory is not known durable yet (`sync_dir`).
    parent_unsynced: AtomicBool,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Files a crashed run may leave behind that are never valid state.
fn is_leftover(name: &str) -> bool {
    name.ends_with(".swap")
        || name.ends_with(".tmp")
        || name.ends_with(segment::TRASH_SUFFIX)
        || name == spare::SPARE_NAME
}

impl Log {
    /// Opens (creating if absent) the log in `dir`, recovering the tail.
    pub fn open(dir: impl Into<PathBuf>, config: LogConfig) -> Result<Log> {
        let dir = dir.into();
        // A brand-new partition has nothing to make durable yet: if a
        // crash loses its directory, the broker creates it again from
        // metadata. Its directory entries (its own, in the data directory,
        // and its first segment's) are made durable by the first flush,
        // with the records that need them; skipping the fsyncs here keeps
        // creating many partitions fast.
        let fresh = !dir.exists();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut bases = Vec::new();
        let mut index_files = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(base) = segment::parse_log_name(name) {
                bases.push(base);
            } else if is_leftover(name) {
                let _ = std::fs::remove_file(entry.path());
            } else if name.ends_with(".index") || name.ends_with(".timeindex") {
                index_files.push(entry.path());
            }
        }
        bases.sort_unstable();
        // Indexes without a log file are orphans.
        for path in index_files {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            if !dir.join(format!("{stem}.log")).exists() {
                let _ = std::fs::remove_file(&path);
            }
        }
        let clean = dir.join(checkpoint::CLEAN_SHUTDOWN).exists();
        let recovery_point_stored = checkpoint::read_offset(&dir, checkpoint::RECOVERY_POINT)?;
        let recovery_point = recovery_point_stored.unwrap_or(0);
        let scan_from = if clean {
            bases.len()
        } else {
            bases
                .partition_point(|&b| b <= recovery_point)
                .saturating_sub(1)
        };
        let mut segments: Vec<Arc<Segment>> = Vec::with_capacity(bases.len());
        for (i, &base) in bases.iter().enumerate() {
            let mode = if i < scan_from {
                OpenMode::Trusted
            } else {
                OpenMode::Recover
            };
            // Segments follow on without a gap: each starts where the
            // one before ends. A crash can break that in the unflushed
            // tail (a rolled segment's last batches lost, the next one's
            // file kept); the records after the gap cannot be served as
            // if they came next, so they go as a torn tail does.
            if mode == OpenMode::Recover {
                if let Some(prev) = segments.last() {
                    if prev.next_offset() != base {
                        tracing::warn!(dir = %dir.display(), expected = prev.next_offset(), base, "segment does not follow on from the one before: removing it and the ones after");
                        for &later in &bases[i..] {
                            segment::delete_files(&dir, later)?;
                        }
                        break;
                    }
                }
            }
            let (seg, truncated) = Segment::open(&dir, base, &config, mode)?;
            segments.push(Arc::new(seg));
            if truncated {
                for &later in &bases[i + 1..] {
                    segment::delete_files(&dir, later)?;
                }
                break;
            }
        }
        let lso_checkpoint = checkpoint::read_offset(&dir, checkpoint::LOG_START_OFFSET)?;
        if segments.is_empty() {
            let base = lso_checkpoint.unwrap_or(0).max(0);
            segments.push(Arc::new(Segment::create(&dir, base, &config)?));
        }
        let last = segments.len() - 1;
        for seg in &segments[..last] {
            seg.seal()?;
            // A crash may have left blocks reserved past its end.
            seg.release_reserved()?;
        }
        segments[last].make_active(&config)?;
        let log_end_offset = segments[last].next_offset();
        let log_start_offset = lso_checkpoint
            .unwrap_or(i64::MIN)
            .max(segments[0].base_offset())
            .min(log_end_offset);
        let high_watermark = checkpoint::read_offset(&dir, checkpoint::HIGH_WATERMARK)?
            .unwrap_or(log_start_offset)
            .clamp(log_start_offset, log_end_offset);
        let mut epochs = EpochCache::load(&dir)?;
        epochs.truncate_from_end(log_end_offset)?;
        epochs.truncate_from_start(log_start_offset)?;
        if !clean && !fresh {
            // Everything scanned is now known good; make it durable and
            // move the recovery point to the end.
            for seg in &segments[scan_from.min(last)..] {
                seg.sync_all()?;
            }
        }
        // Rewritten only when it moves (a clean open finds it at the end
        // already, written by the close): each write is two fsyncs and a
        // rename, and a broker opens its partitions one after another.
        if !fresh && recovery_point_stored != Some(log_end_offset) {
            checkpoint::write_offset(&dir, checkpoint::RECOVERY_POINT, log_end_offset)?;
        }
        if clean {
            // Must be durable before any append: a stale marker would skip
            // recovery of a torn tail after the next crash.
            let marker = dir.join(checkpoint::CLEAN_SHUTDOWN);
            std::fs::remove_file(&marker).map_err(io_err(&marker))?;
        }
        if !fresh {
            checkpoint::sync_dir(&dir)?;
        }
        tracing::debug!(dir = %dir.display(), log_start_offset, log_end_offset, clean, segments = segments.len(), "opened log");
        let log = Log {
            spare: Spare::new(&dir),
            dir,
            config: RwLock::new(config),
            segments: RwLock::new(Arc::new(segments)),
            writer: Mutex::new(Writer {
                unflushed_messages: 0,
                last_flush_ms: now_ms(),
                recovery_point: log_end_offset,
                dir_changes: u64::from(fresh),
                truncations: 0,
                closed: false,
                hot_window: (-1, 0, 0),
            }),
            checkpoints: Mutex::new(high_watermark),
            epochs: RwLock::new(epochs),
            producers: Mutex::new(ProducerStates::default()),
            log_start_offset: AtomicI64::new(log_start_offset),
            log_end_offset: AtomicI64::new(log_end_offset),
            high_watermark: AtomicI64::new(high_watermark),
            closed: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            leader_fence: AtomicI32::new(i32::MIN),
            follower_fence: AtomicI32::new(i32::MIN),
            dir_synced: AtomicU64::new(0),
            trash: Mutex::new(Vec::new()),
            log_start_unpersisted: AtomicBool::new(false),
            parent_unsynced: AtomicBool::new(fresh),
        };
        {
            let mut w = log.lock_writer()?;
            log.rebuild_producer_states(&mut w)?;
        }
        Ok(log)
    }

    fn lock_producers(&self) -> MutexGuard<'_, ProducerStates> {
        self.producers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writer only: rebuilds the producer states from the newest snapshot
    /// at or below the log end plus the batch headers after it, deleting
    /// snapshots of truncated history.
    fn rebuild_producer_states(&self, _w: &mut Writer) -> Result<()> {
        let log_start_offset = self.log_start_offset();
        let log_end_offset = self.log_end_offset();
        producer_state::delete_snapshots_above(&self.dir, log_end_offset)?;
        let (mut offset, mut states) =
            producer_state::load_latest(&self.dir, log_start_offset, log_end_offset)?
                .unwrap_or((log_start_offset, ProducerStates::default()));
        let from = offset;
        let mut scanned = 0usize;
        // Seen now, as far as expiry goes: the batches' own timestamps are
        // the clients'.
        let opened_ms = now_ms();
        while offset < log_end_offset {
            let read = self.read(offset, 1 << 20, log_end_offset)?;
            if read.batches.is_empty() {
                break;
            }
            let before = offset;
            let mut buf = &read.batches[..];
            while let Some(header) = HeaderView::read(buf) {
                let last = header.last_offset();
                if last >= offset {
                    states.record(
                        &header.producer_batch(),
                        header.base_offset,
                        last,
                        opened_ms,
                    );
                    offset = last + 1;
                    scanned += 1;
                }
                buf = &buf[header.total_len.min(buf.len())..];
            }
            if offset == before {
                break;
            }
        }
        let mut current = self.lock_producers();
        states.keep_older(&current, from);
        if scanned > 0 || !states.is_empty() {
            tracing::debug!(dir = %self.dir.display(), from, batches = scanned, producers = states.len(), "rebuilt producer state");
        }
        *current = states;
        Ok(())
    }

    /// The idempotence state of `producer_id` here: (epoch, last sequence,
    /// last offset), if known (tests, tools).
    pub fn producer_state(&self, producer_id: i64) -> Option<(i16, i32, i64)> {
        let states = self.lock_producers();
        let e = states.get(producer_id)?;
        let last = e.batches.back()?;
        Some((e.epoch, last.last_seq, last.last_offset))
    }

    /// Number of producers with state in this partition (metrics).
    pub fn producer_count(&self) -> usize {
        self.lock_producers().len()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn config(&self) -> LogConfig {
        self.config.read().expect("config lock").clone()
    }
    /// Whether an append may fsync before it returns (flush per batch, or
    /// a flush.messages threshold). Appends that cannot only copy into the
    /// page cache, so a caller may run them without a blocking-pool hop.
    pub fn append_may_sync(&self) -> bool {
        match self.config.read().expect("config lock").flush {
            FlushPolicy::EveryBatch => true,
            FlushPolicy::Interval { messages, .. } => messages.is_some(),
        }
    }
    /// Replace the config (alter topic config); takes effect from now.
    pub fn set_config(&self, config: LogConfig) {
        *self.config.write().expect("config lock") = config;
    }

    fn snapshot(&self) -> Segments {
        self.segments.read().expect("segments lock").clone()
    }

    fn publish(&self, segments: Vec<Arc<Segment>>) {
        *self.segments.write().expect("segments lock") = Arc::new(segments);
    }

    fn closed_error(&self) -> StorageError {
        StorageError::Closed {
            dir: self.dir.clone(),
        }
    }

    /// The checkpoints' lock (guarding the persisted high watermark);
    /// before the writer lock.
    fn lock_checkpoints(&self) -> MutexGuard<'_, i64> {
        self.checkpoints.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_trash(&self) -> MutexGuard<'_, Vec<PathBuf>> {
        self.trash.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Unlinks the files that retention and rolls set aside. They are
    /// renamed under the writer lock and unlinked here, without it: on a
    /// file system mounted with `discard` an unlink waits for the device
    /// to discard the file's blocks (22 – 25 ms for one 4 KiB producer
    /// snapshot here, RESULTS session 11), and every append queued behind
    /// the writer lock waited with it.
    fn empty_trash(&self) -> Result<()> {
        let paths = std::mem::take(&mut *self.lock_trash());
        segment::remove_files(&paths).inspect_err(|_| {
            // Tried again next time (those already gone are skipped).
            self.lock_trash().extend(paths.iter().cloned());
        })
    }

    fn lock_writer(&self) -> Result<MutexGuard<'_, Writer>> {
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if w.closed {
            return Err(self.closed_error());
        }
        Ok(w)
    }

    /// Validates, assigns offsets from the log end, stamps `leader_epoch`
    /// (and log-append time), writes. Returns the assigned offsets.
    ///
    /// The batch is validated once ([`batch::validate_batch`]: CRC and a
    /// light walk of the record framing) and then written as it is: the
    /// base offset and leader epoch live in the header outside the CRC, so
    /// only a copy of the 61-byte header is rewritten and the body is
    /// written from the caller's buffer, never copied (except with
    /// LogAppendTime, whose timestamp rewrite changes the CRC).
    pub fn append_as_leader(
        &self,
        batch: impl Into<Bytes>,
        leader_epoch: i32,
    ) -> Result<AppendInfo> {
        let batch: Bytes = batch.into();
        let config = self.config();
        if batch.len() > config.message_bytes_max as usize {
            return Err(StorageError::RecordTooLarge {
                size: batch.len(),
                max: config.message_bytes_max as usize,
            });
        }
        let record_count = batch::validate_batch(&batch)?;
        let mut head = [0u8; batch::HEADER_LEN];
        head.copy_from_slice(&batch[..batch::HEADER_LEN]);
        let producer = HeaderView::read(&head)
            .expect("validated batch has a header")
            .producer_batch();
        let mut w = self.lock_writer()?;
        let fence = self.leader_fence.load(Ordering::Acquire);
        if leader_epoch < fence {
            return Err(StorageError::FencedLeaderEpoch {
                epoch: leader_epoch,
                fence,
            });
        }
        // A replication round of an earlier epoch still under way must
        // not cut or extend what this leader writes. (A load first: the
        // fence is nearly always raised already, and this is every
        // append.)
        if self.follower_fence.load(Ordering::Acquire) < leader_epoch {
            self.follower_fence
                .fetch_max(leader_epoch, Ordering::AcqRel);
        }
        if let SequenceCheck::Duplicate(dup) = self.lock_producers().check(&producer)? {
            // With LogAppendTime, the time the first copy was stamped with,
            // as Kafka answers (read back from the log: reads take no
            // writer lock); it was -1, which says CreateTime.
            let log_append_time_ms = if config.timestamp_type == TimestampType::LogAppendTime {
                self.read(dup.first_offset, 1, i64::MAX)
                    .ok()
                    .and_then(|r| RecordBatch::parse_all(r.batches).ok())
                    .and_then(|b| b.into_iter().find(|b| b.base_offset() == dup.first_offset))
                    .map_or(-1, |b| b.max_timestamp())
            } else {
                -1
            };
            return Ok(AppendInfo {
                base_offset: dup.first_offset,
                last_offset: dup.last_offset,
                log_append_time_ms,
                record_count,
                duplicate: true,
            });
        }
        let base_offset = self.log_end_offset();
        batch::set_base_offset(&mut head, base_offset);
        batch::set_leader_epoch(&mut head, leader_epoch);
        let mut log_append_time_ms = -1;
        let mut stamped = None;
        if config.timestamp_type == TimestampType::LogAppendTime {
            log_append_time_ms = now_ms();
            let mut whole = BytesMut::from(&batch[..]);
            whole[..batch::HEADER_LEN].copy_from_slice(&head);
            batch::set_log_append_time(&mut whole, log_append_time_ms);
            head.copy_from_slice(&whole[..batch::HEADER_LEN]);
            stamped = Some(whole);
        }
        let body = stamped.as_deref().unwrap_or(&batch[..]);
        let header = HeaderView::read(&head).expect("validated batch has a header");
        self.note_epoch(leader_epoch, base_offset)?;
        self.append_locked(
            &mut w,
            &config,
            &[&head, &body[batch::HEADER_LEN..]],
            &header,
        )?;
        self.lock_producers()
            .record(&producer, base_offset, header.last_offset(), now_ms());
        self.after_append(&mut w, &config, i64::from(record_count) as u64)
            .map_err(|e| StorageError::FailedAfterWrite(Box::new(e)))?;
        Ok(AppendInfo {
            base_offset,
            last_offset: header.last_offset(),
            log_append_time_ms,
            record_count,
            duplicate: false,
        })
    }

    /// From now on, refuses leader appends with an epoch below
    /// `leader_epoch`; for a replica that stopped leading, with the epoch
    /// of the leader it now follows. Takes the writer lock, so an append
    /// under way lands before the fence (and the follower's truncation to
    /// the new leader's log, which comes after, removes it) and none after
    /// it: a produce request that was checked against the old metadata
    /// and queued for the writer (or for the blocking pool) cannot then
    /// write old-epoch records after that truncation, which a follower
    /// would keep as its own divergent history. Only ever raises the
    /// fence.
    pub fn fence_leader_appends(&self, leader_epoch: i32) {
        // Already there (every metadata change of a partition this
        // replica leads asks again): no wait for the writer.
        if self.leader_fence.load(Ordering::Acquire) >= leader_epoch {
            return;
        }
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.leader_fence.fetch_max(leader_epoch, Ordering::AcqRel);
    }

    /// From now on, refuses follower writes (appends, truncations and
    /// resets for a leader epoch, [`Log::append_following`] and the
    /// others) for `leader_epoch` and earlier ones: this replica leads
    /// in `leader_epoch` (or follows in the next one), and a replication
    /// round of an earlier epoch still under way must not cut or extend
    /// its log. Takes the writer
    /// lock, so a follower write under way lands before it. Leader
    /// appends raise it too. Only ever raises the fence.
    pub fn fence_follower_writes(&self, leader_epoch: i32) {
        // Already there (every metadata change of a partition this replica
        // leads asks again): no wait for the writer.
        if self.follower_fence.load(Ordering::Acquire) >= leader_epoch {
            return;
        }
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.follower_fence
            .fetch_max(leader_epoch, Ordering::AcqRel);
    }

    /// Writer only: refuses a follower write for `leader_epoch` when this
    /// replica has led in that epoch or a later one.
    fn check_following(&self, leader_epoch: i32) -> Result<()> {
        let fence = self.follower_fence.load(Ordering::Acquire);
        if leader_epoch <= fence {
            return Err(StorageError::FencedFollowerEpoch {
                epoch: leader_epoch,
                fence,
            });
        }
        Ok(())
    }

    /// [`Log::append_as_follower`] for a replica that follows the leader
    /// of `leader_epoch`: refused once it has led in that epoch or later.
    pub fn append_following(&self, leader_epoch: i32, batches: Bytes) -> Result<AppendInfo> {
        self.append_follower(batches, Some(leader_epoch))
    }

    /// [`Log::truncate_to`] for a replica that follows the leader of
    /// `leader_epoch` (see [`Log::append_following`]).
    pub fn truncate_following(&self, leader_epoch: i32, offset: i64) -> Result<()> {
        let mut persisted = self.lock_checkpoints();
        let mut w = self.lock_writer()?;
        self.check_following(leader_epoch)?;
        let mut touched = false;
        let result = self.truncate_locked(&mut w, &mut persisted, offset, &mut touched);
        if let (Err(e), true) = (&result, touched) {
            self.fail(&mut w, "truncation", e);
        }
        result
    }

    /// [`Log::reset_to`] for a replica that follows the leader of
    /// `leader_epoch` (see [`Log::append_following`]).
    pub fn reset_following(&self, leader_epoch: i32, offset: i64) -> Result<()> {
        let mut persisted = self.lock_checkpoints();
        let mut w = self.lock_writer()?;
        self.check_following(leader_epoch)?;
        self.reset_locked(&mut w, &mut persisted, offset)
            .inspect_err(|e| self.fail(&mut w, "reset", e))
    }

    /// Appends batches that already carry offsets and epochs (replication).
    pub fn append_as_follower(&self, batches: Bytes) -> Result<AppendInfo> {
        self.append_follower(batches, None)
    }

    fn append_follower(&self, batches: Bytes, following: Option<i32>) -> Result<AppendInfo> {
        let config = self.config();
        let parsed = RecordBatch::parse_all(batches)?;
        let mut w = self.lock_writer()?;
        if let Some(epoch) = following {
            self.check_following(epoch)?;
        }
        let log_end_offset = self.log_end_offset();
        let Some(first) = parsed.first() else {
            return Err(StorageError::EmptyBatch);
        };
        let mut expected = log_end_offset;
        let mut record_count: i32 = 0;
        for b in &parsed {
            if b.base_offset() != expected {
                return Err(StorageError::NonContiguous {
                    base_offset: b.base_offset(),
                    log_end_offset: expected,
                });
            }
            if b.record_count() <= 0 || b.last_offset_delta() < 0 {
                return Err(StorageError::EmptyBatch);
            }
            expected = b.last_offset() + 1;
            record_count = record_count.saturating_add(b.record_count());
        }
        let base_offset = first.base_offset();
        // One clock reading for the whole round's batches.
        let seen_ms = now_ms();
        let mut written: u64 = 0;
        for b in &parsed {
            let header = HeaderView::read(b.as_bytes()).expect("parsed batch has a header");
            let appended = self
                .note_epoch(b.leader_epoch(), b.base_offset())
                .and_then(|()| self.append_locked(&mut w, &config, &[b.as_bytes()], &header));
            if let Err(e) = appended {
                // The batches before it are in the log, and the leader
                // learns so from the next fetch: flushed as the policy
                // says (flush.messages=1 left them unsynced while the
                // leader counted them towards the high watermark).
                if written > 0 {
                    self.after_append(&mut w, &config, written)?;
                }
                return Err(e);
            }
            self.lock_producers().record(
                &header.producer_batch(),
                header.base_offset,
                header.last_offset(),
                seen_ms,
            );
            written += b.record_count().max(0) as u64;
        }
        self.after_append(&mut w, &config, written)?;
        Ok(AppendInfo {
            base_offset,
            last_offset: expected - 1,
            log_append_time_ms: -1,
            record_count,
            duplicate: false,
        })
    }

    /// Writer only: rolls if needed, writes one batch (given in parts that
    /// are written back to back), publishes the end.
    fn append_locked(
        &self,
        w: &mut Writer,
        config: &LogConfig,
        parts: &[&[u8]],
        header: &HeaderView,
    ) -> Result<()> {
        let segments = self.snapshot();
        let mut active = segments.last().expect("always one segment").clone();
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let now = now_ms();
        if self.should_roll(
            &active,
            config,
            len as u64,
            (header.last_offset(), header.max_timestamp),
            now,
        ) || self.should_roll_early(&active, config)
        {
            active = self.roll(w, config, header.base_offset)?;
        }
        active.append(parts, header, config)?;
        self.log_end_offset
            .store(header.last_offset() + 1, Ordering::Release);
        if config.preallocate && self.wants_spare(w, &active, config, now) {
            self.spare
                .prepare(config.segment_bytes_max.min(u64::from(u32::MAX)));
        }
        Ok(())
    }

    /// Writer only: whether the next segment should be reserved now
    /// (`spare`): once the active segment is half full, or, for a segment
    /// that reserves on the append path (not born from a spare), as soon
    /// as the partition is hot: [`HOT_BYTES`] appended within a second.
    fn wants_spare(&self, w: &mut Writer, active: &Segment, config: &LogConfig, now: i64) -> bool {
        let size = active.size();
        if size.saturating_mul(2) >= config.segment_bytes_max {
            return true;
        }
        if active.born_reserved() || config.segment_bytes_max < 4 * HOT_BYTES {
            return false;
        }
        let (base, since, from) = &mut w.hot_window;
        if *base != active.base_offset() || now.saturating_sub(*since) > 1000 {
            (*base, *since, *from) = (active.base_offset(), now, size);
            return false;
        }
        size.saturating_sub(*from) >= HOT_BYTES
    }

    /// A hot partition's segment that reserves on the append path rolls
    /// as soon as its spare is ready, so that the rest of the partition's
    /// appends go into reserved segments: the first segment of a busy
    /// partition ends after a few MiB instead of at `segment.bytes`.
    fn should_roll_early(&self, active: &Segment, config: &LogConfig) -> bool {
        let size = active.size();
        config.preallocate
            && !active.born_reserved()
            && size >= HOT_BYTES
            && size.saturating_mul(2) < config.segment_bytes_max
            && self.spare.is_ready()
    }

    /// Writer only: records that `epoch` starts at `offset` if it is
    /// newer than the latest. Looks first under the read lock, which
    /// `persist_log_start` holds through its fsync: only a new epoch
    /// waits for that.
    fn note_epoch(&self, epoch: i32, offset: i64) -> Result<()> {
        let known = epoch < 0
            || self
                .epochs
                .read()
                .expect("epochs lock")
                .latest()
                .is_some_and(|(latest, _)| latest >= epoch);
        if !known {
            self.epochs
                .write()
                .expect("epochs lock")
                .assign(epoch, offset)?;
        }
        Ok(())
    }

    fn should_roll(
        &self,
        active: &Segment,
        config: &LogConfig,
        len: u64,
        (last_offset, max_timestamp): (i64, i64),
        now_ms: i64,
    ) -> bool {
        let size = active.size();
        if size == 0 {
            return false;
        }
        let too_big = size + len > config.segment_bytes_max || size + len > u64::from(u32::MAX);
        // As Kafka's: the batch's timestamp against the segment's first
        // batch's, or the wall clock since the first append when the
        // segment has no timestamp. Not the wall clock against record
        // timestamps: a backfill of old records would roll a segment per
        // append.
        let too_old = config.segment_ms_max.is_some_and(|ms| {
            let first = active.first_timestamp();
            let waited = if first >= 0 {
                max_timestamp.saturating_sub(first)
            } else {
                now_ms.saturating_sub(active.first_append_ms())
            };
            waited > ms as i64
        });
        let offsets_overflow = last_offset - active.base_offset() > i64::from(u32::MAX);
        too_big || too_old || offsets_overflow || active.indexes_full()
    }

    /// Writer only: seals the active segment and starts one at `base`.
    fn roll(&self, w: &mut Writer, config: &LogConfig, base: i64) -> Result<Arc<Segment>> {
        let segments = self.snapshot();
        let old = segments.last().expect("always one segment");
        let base = base.max(old.next_offset());
        old.seal()?;
        // The state covering everything below the new segment, so a rebuild
        // scans at most the active segment.
        // No fsync here: the tick's flush of rolled segments syncs the
        // snapshot with them (`flush_rolled`).
        let states = self.lock_producers().clone();
        let bases: Vec<i64> = segments
            .iter()
            .map(|s| s.base_offset())
            .chain(std::iter::once(base))
            .collect();
        let superseded = producer_state::write_snapshot_unsynced(&self.dir, base, &states, &bases)?;
        {
            let mut trash = self.lock_trash();
            for path in superseded {
                trash.extend(segment::move_to_trash(&path)?);
            }
        }
        let spare = if config.preallocate {
            self.spare
                .take(&self.dir.join(segment::file_name(base, "log")))
        } else {
            self.spare.discard()?;
            None
        };
        let new = Arc::new(match spare {
            Some((file, reserved)) => Segment::create_in(&self.dir, base, config, file, reserved)?,
            None => Segment::create(&self.dir, base, config)?,
        });
        let mut list = segments.as_ref().clone();
        list.push(new.clone());
        self.publish(list);
        w.dir_changes += 1;
        tracing::debug!(dir = %self.dir.display(), base, "rolled segment");
        Ok(new)
    }

    fn after_append(&self, w: &mut Writer, config: &LogConfig, messages: u64) -> Result<()> {
        w.unflushed_messages += messages;
        self.flush_after_append(w, config)
            .inspect_err(|e| self.fail(w, "fsync", e))
    }

    fn flush_after_append(&self, w: &mut Writer, config: &LogConfig) -> Result<()> {
        match config.flush {
            FlushPolicy::EveryBatch => self.sync_segments(w),
            FlushPolicy::Interval { messages, .. } => {
                // flush.messages is honoured on the append itself: the
                // bytes are fsynced before it returns. The recovery
                // point moves with the next roll or flush.ms flush, which
                // write its checkpoint without holding up appends (the
                // segment holding the recovery point is scanned on
                // recovery anyway). flush.ms is honoured by `tick`, whose
                // fsyncs run without the writer lock (an fsync of a
                // second's worth of writes inside an append stalled every
                // producer behind it).
                if messages.is_some_and(|m| w.unflushed_messages >= m) {
                    self.sync_segments(w)?;
                    w.last_flush_ms = now_ms();
                }
                Ok(())
            }
        }
    }

    /// fsyncs the log's directory, and the first time for a log `open`
    /// created, the directory holding it (whose new entry it is).
    fn sync_dir(&self) -> Result<()> {
        checkpoint::sync_dir(&self.dir)?;
        if self.parent_unsynced.load(Ordering::Acquire) {
            if let Some(parent) = self.dir.parent() {
                checkpoint::sync_dir(parent)?;
            }
            self.parent_unsynced.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// fsyncs every dirty segment's bytes (and the directory if segments
    /// were created); does not move the recovery point.
    fn sync_segments(&self, w: &mut Writer) -> Result<()> {
        for seg in self.snapshot().iter() {
            seg.sync_data()?;
        }
        self.sync_dir_to(Self::dir_target(w, &self.dir_synced))?;
        w.unflushed_messages = 0;
        Ok(())
    }

    /// The directory changes a sync must cover, if some are not synced.
    fn dir_target(w: &Writer, dir_synced: &AtomicU64) -> Option<u64> {
        (dir_synced.load(Ordering::Acquire) < w.dir_changes).then_some(w.dir_changes)
    }

    /// fsyncs the directory when `target` changes are to be covered, and
    /// records them as synced once that succeeded.
    fn sync_dir_to(&self, target: Option<u64>) -> Result<()> {
        if let Some(target) = target {
            self.sync_dir()?;
            self.dir_synced.fetch_max(target, Ordering::AcqRel);
        }
        Ok(())
    }

    /// fsyncs everything and records the recovery point; the caller
    /// holds the checkpoints lock (taken before `w`).
    fn flush_locked(&self, w: &mut Writer, now: i64) -> Result<()> {
        let log_end_offset = self.log_end_offset();
        self.sync_for_recovery_point(
            &self.snapshot(),
            w.recovery_point,
            log_end_offset,
            Self::dir_target(w, &self.dir_synced),
        )?;
        if w.recovery_point != log_end_offset {
            checkpoint::write_offset(&self.dir, checkpoint::RECOVERY_POINT, log_end_offset)?;
            w.recovery_point = log_end_offset;
        }
        w.unflushed_messages = 0;
        w.last_flush_ms = now;
        Ok(())
    }

    /// Writes the high-watermark checkpoint if the high watermark moved,
    /// without the writer lock (appends go on meanwhile).
    fn persist_high_watermark(&self) -> Result<()> {
        self.persist_high_watermark_locked(&mut self.lock_checkpoints())
    }

    fn persist_high_watermark_locked(&self, persisted: &mut i64) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let hw = self.high_watermark();
        if hw != *persisted {
            checkpoint::write_offset(&self.dir, checkpoint::HIGH_WATERMARK, hw)?;
            *persisted = hw;
        }
        Ok(())
    }

    /// Reads whole batches from the segment holding `offset`, up to
    /// `max_bytes` (at least one batch), only batches whose last offset is
    /// below `upper_bound` (exclusive, e.g. the high watermark).
    pub fn read(&self, offset: i64, max_bytes: usize, upper_bound: i64) -> Result<ReadResult> {
        if self.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        let mut attempt = 0;
        loop {
            let log_end_offset = self.log_end_offset();
            let high_watermark = self.high_watermark();
            // Taken after loading the log end, so a segment rolled for any
            // offset below that end is in the list.
            let segments = self.snapshot();
            // Loaded after the list: retention and deletion move the log
            // start before they drop segments, so a list that has lost
            // `offset`'s segment comes with a log start past it (loaded
            // before, it let the read return the first surviving batch,
            // past `offset`, as if it held `offset`).
            let log_start_offset = self.log_start_offset();
            if offset < log_start_offset || offset > log_end_offset {
                return Err(StorageError::OffsetOutOfRange {
                    offset,
                    log_start_offset,
                    log_end_offset,
                });
            }
            let mut result = ReadResult {
                batches: Bytes::new(),
                log_start_offset,
                log_end_offset,
                high_watermark,
            };
            if offset == log_end_offset || offset >= upper_bound {
                return Ok(result);
            }
            let first = segments
                .partition_point(|s| s.base_offset() <= offset)
                .saturating_sub(1);
            let mut raced = false;
            for seg in &segments[first..] {
                if offset >= seg.next_offset() {
                    continue; // empty segment or a gap: try the next one
                }
                let read = seg.read(offset.max(seg.base_offset()), max_bytes, upper_bound);
                if seg.is_retired() {
                    raced = true;
                    break;
                }
                result.batches = read?;
                return Ok(result);
            }
            if !raced || attempt >= READ_RETRIES_MAX {
                return Ok(result);
            }
            attempt += 1;
        }
    }

    pub fn log_start_offset(&self) -> i64 {
        self.log_start_offset.load(Ordering::Acquire)
    }
    pub fn log_end_offset(&self) -> i64 {
        self.log_end_offset.load(Ordering::Acquire)
    }
    pub fn high_watermark(&self) -> i64 {
        self.high_watermark.load(Ordering::Acquire)
    }
    /// Replication's hook: sets the high watermark (clamped to
    /// [log_start_offset, log_end_offset]) and persists it lazily.
    pub fn set_high_watermark(&self, offset: i64) {
        loop {
            // (A reset moves the log start before the log end: never
            // clamped to an empty range, which panics.)
            let start = self.log_start_offset();
            let clamped = offset.clamp(start, self.log_end_offset().max(start));
            self.high_watermark.store(clamped, Ordering::Release);
            // A truncation or reset (which move the log end before the
            // high watermark) between the loads and the store would leave
            // it outside the log: clamped again to the bounds as they are
            // now. Without a writer lock: this is on every acks=all path.
            let start = self.log_start_offset();
            if (start..=self.log_end_offset().max(start)).contains(&clamped) {
                return;
            }
        }
    }

    /// First (offset, timestamp) whose timestamp >= `timestamp_ms`.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<(i64, i64)>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        for _ in 0..READ_RETRIES_MAX {
            let log_start_offset = self.log_start_offset();
            let mut found = None;
            let mut raced = false;
            for seg in self.snapshot().iter() {
                if seg.max_timestamp() < timestamp_ms || seg.next_offset() <= log_start_offset {
                    continue;
                }
                let r = seg.find_timestamp(timestamp_ms, log_start_offset);
                if seg.is_retired() {
                    raced = true;
                    break;
                }
                if let Some(hit) = r? {
                    found = Some(hit);
                    break;
                }
            }
            if !raced {
                return Ok(found);
            }
        }
        Ok(None)
    }

    /// Writer only: after a truncation or reset failed part-way. By then
    /// it may have unlinked segment files that the published list still
    /// holds, so appends would go into a file no reopen finds, and be lost
    /// though acknowledged. The log refuses all further work instead
    /// (`Closed`), as Kafka takes a log directory offline after an I/O
    /// error; reopening it (a broker restart) recovers from what is on
    /// disk, which is the log cut somewhere between before and after.
    fn fail(&self, w: &mut Writer, what: &str, error: &StorageError) {
        tracing::error!(dir = %self.dir.display(), %error, "{what} failed part-way: the log refuses further work until it is reopened");
        w.closed = true;
        self.failed.store(true, Ordering::Release);
        self.closed.store(true, Ordering::Release);
    }

    /// Whether the log closed itself after an I/O error (a failed fsync,
    /// truncation or reset): it refuses all work until it is reopened,
    /// which recovers it from what is on disk.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Removes every record at or after `offset`.
    pub fn truncate_to(&self, offset: i64) -> Result<()> {
        let mut persisted = self.lock_checkpoints();
        let mut w = self.lock_writer()?;
        let mut touched = false;
        let result = self.truncate_locked(&mut w, &mut persisted, offset, &mut touched);
        if let (Err(e), true) = (&result, touched) {
            self.fail(&mut w, "truncation", e);
        }
        result
    }

    /// `touched`: set once something was removed; an error before leaves
    /// the log as it was, and the caller does not fail it.
    fn truncate_locked(
        &self,
        w: &mut Writer,
        persisted: &mut i64,
        offset: i64,
        touched: &mut bool,
    ) -> Result<()> {
        let config = self.config();
        if offset >= self.log_end_offset() {
            return Ok(());
        }
        let segments = self.snapshot();
        let log_start_offset = self.log_start_offset();
        let mut kept: Vec<Arc<Segment>>;
        let doomed: Vec<Arc<Segment>>;
        if offset <= log_start_offset || offset <= segments[0].base_offset() {
            // Nothing survives: start over at `offset`.
            let new_start = offset.max(0);
            doomed = segments.iter().rev().cloned().collect();
            *touched = true;
            for seg in &doomed {
                seg.delete_files()?;
            }
            kept = vec![Arc::new(Segment::create(&self.dir, new_start, &config)?)];
            checkpoint::write_offset(&self.dir, checkpoint::LOG_START_OFFSET, new_start)?;
            self.log_start_offset.store(new_start, Ordering::Release);
        } else {
            let i = segments.partition_point(|s| s.base_offset() <= offset) - 1;
            let cut = segments[i].prepare_truncation(offset)?;
            doomed = segments[i + 1..].iter().rev().cloned().collect();
            *touched = true;
            for seg in &doomed {
                seg.delete_files()?;
            }
            let replacement = Arc::new(segments[i].truncate_to(&self.dir, &config, cut)?);
            kept = segments[..i].to_vec();
            kept.push(replacement);
        }
        let log_end_offset = kept.last().expect("one segment").next_offset();
        self.publish(kept);
        w.dir_changes += 1;
        w.truncations += 1;
        self.log_end_offset.store(log_end_offset, Ordering::Release);
        if self.log_start_offset() > log_end_offset {
            // The batch holding the log start went too (truncation is by
            // whole batches): the log is now empty at its end.
            checkpoint::write_offset(&self.dir, checkpoint::LOG_START_OFFSET, log_end_offset)?;
            self.log_start_offset
                .store(log_end_offset, Ordering::Release);
        }
        self.high_watermark
            .fetch_min(log_end_offset, Ordering::AcqRel);
        if w.recovery_point > log_end_offset {
            checkpoint::write_offset(&self.dir, checkpoint::RECOVERY_POINT, log_end_offset)?;
            w.recovery_point = log_end_offset;
        }
        self.epochs
            .write()
            .expect("epochs lock")
            .truncate_from_end(log_end_offset)?;
        self.rebuild_producer_states(w)?;
        self.snapshot_producers_past_log_start(w)?;
        self.sync_dir_to(Some(w.dir_changes))?;
        self.persist_high_watermark_locked(persisted)?;
        tracing::info!(dir = %self.dir.display(), offset, log_end_offset, removed_segments = doomed.len(), "truncated log");
        Ok(())
    }

    /// Drops every segment and starts an empty log at `offset`, with the
    /// epoch cache cleared (Kafka's truncate-fully-and-start-at). For a
    /// follower whose log ends below the leader's log start: it copies the
    /// partition from there.
    pub fn reset_to(&self, offset: i64) -> Result<()> {
        let mut persisted = self.lock_checkpoints();
        let mut w = self.lock_writer()?;
        self.reset_locked(&mut w, &mut persisted, offset)
            .inspect_err(|e| self.fail(&mut w, "reset", e))
    }

    fn reset_locked(&self, w: &mut Writer, persisted: &mut i64, offset: i64) -> Result<()> {
        let config = self.config();
        let offset = offset.max(0);
        let segments = self.snapshot();
        for seg in segments.iter().rev() {
            seg.delete_files()?;
        }
        self.publish(vec![Arc::new(Segment::create(&self.dir, offset, &config)?)]);
        w.dir_changes += 1;
        w.truncations += 1;
        checkpoint::write_offset(&self.dir, checkpoint::LOG_START_OFFSET, offset)?;
        self.log_start_offset.store(offset, Ordering::Release);
        self.log_end_offset.store(offset, Ordering::Release);
        self.high_watermark.store(offset, Ordering::Release);
        checkpoint::write_offset(&self.dir, checkpoint::RECOVERY_POINT, offset)?;
        w.recovery_point = offset;
        self.persist_high_watermark_locked(persisted)?;
        self.epochs
            .write()
            .expect("epochs lock")
            .truncate_from_end(i64::MIN)?;
        // The producers' history is gone with the segments.
        producer_state::delete_snapshots_above(&self.dir, i64::MIN)?;
        *self.lock_producers() = ProducerStates::default();
        self.sync_dir_to(Some(w.dir_changes))?;
        tracing::info!(dir = %self.dir.display(), offset, removed_segments = segments.len(), "reset log");
        Ok(())
    }

    /// Advances the log start offset to `offset`, deleting whole segments
    /// below it. Returns the new log start offset. `offset` may not pass
    /// the high watermark: records above it may not be on every in-sync
    /// replica yet, and the log start would pull the high watermark past
    /// them.
    pub fn delete_records_before(&self, offset: i64) -> Result<i64> {
        let mut w = self.lock_writer()?;
        let log_start_offset = self.log_start_offset();
        let high_watermark = self.high_watermark();
        if offset > high_watermark {
            return Err(StorageError::AboveHighWatermark {
                offset,
                high_watermark,
            });
        }
        if offset <= log_start_offset {
            // Durable before the caller hears, this time too: a first
            // call that moved the start but failed to persist it was
            // answered with an error, and its retry lands here.
            drop(w);
            self.persist_log_start()?;
            return Ok(log_start_offset);
        }
        self.advance_log_start(offset);
        let segments = self.snapshot();
        let expired = segments[..segments.len() - 1]
            .iter()
            .take_while(|s| s.next_offset() <= offset)
            .count();
        self.delete_oldest(&mut w, expired)?;
        self.snapshot_producers_past_log_start(&mut w)?;
        drop(w);
        self.empty_trash()?;
        // Durable before the caller hears the records are gone.
        self.persist_log_start()?;
        Ok(offset)
    }

    /// Writer only: with the log start past the newest producer snapshot
    /// (DeleteRecords inside the active segment, or a truncation below
    /// every snapshot after it), a rebuild at open would scan from the log
    /// start and forget the producers whose batches all lie below it. A
    /// snapshot at the log end keeps them. Rare (admin calls), so synced.
    fn snapshot_producers_past_log_start(&self, _w: &mut Writer) -> Result<()> {
        let newest = producer_state::snapshot_offsets(&self.dir)?.last().copied();
        if newest.is_some_and(|n| n >= self.log_start_offset()) {
            return Ok(());
        }
        let states = self.lock_producers().clone();
        if states.is_empty() {
            return Ok(());
        }
        producer_state::write_snapshot(
            &self.dir,
            self.log_end_offset(),
            &states,
            &self.segment_bases(),
        )
    }

    /// The base offsets of the segments, ascending.
    fn segment_bases(&self) -> Vec<i64> {
        self.snapshot().iter().map(|s| s.base_offset()).collect()
    }

    /// Writer only: moves the log start to `offset` in memory; the
    /// log-start checkpoint and the epoch cache trimmed to it are written
    /// by `persist_log_start`, without the writer lock. Both fsync, and
    /// under write-back an fsync takes tens of ms: retention used to hold
    /// every append behind two of them (Kafka moved its epoch-cache flush
    /// off the log lock for the same reason, KAFKA-15046). Until then a
    /// crash loses nothing: an open takes the log start as at least the
    /// first segment's base and trims the epoch cache to it.
    fn advance_log_start(&self, offset: i64) {
        self.log_start_offset.store(offset, Ordering::Release);
        self.high_watermark.fetch_max(offset, Ordering::AcqRel);
        self.epochs
            .write()
            .expect("epochs lock")
            .truncate_from_start_unpersisted(offset);
        self.log_start_unpersisted.store(true, Ordering::Release);
    }

    /// Makes the log start (and the epoch cache) durable if it moved since
    /// last time. Takes the checkpoints lock: never call with the writer
    /// lock held.
    fn persist_log_start(&self) -> Result<()> {
        if !self.log_start_unpersisted.load(Ordering::Acquire) {
            return Ok(());
        }
        let _checkpoints = self.lock_checkpoints();
        self.persist_log_start_locked()
    }

    /// `persist_log_start` with the checkpoints lock held by the caller.
    fn persist_log_start_locked(&self) -> Result<()> {
        // A log closed for deletion writes nothing: its directory path
        // may already name the partition created again.
        // `close_for_delete` takes the checkpoints lock, held here.
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        if !self.log_start_unpersisted.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let written = checkpoint::write_offset(
            &self.dir,
            checkpoint::LOG_START_OFFSET,
            self.log_start_offset(),
        )
        // Under the read lock, so a newer state (a new epoch, a
        // truncation: both take the write lock) is written after this one.
        .and_then(|()| self.epochs.read().expect("epochs lock").persist());
        if written.is_err() {
            self.log_start_unpersisted.store(true, Ordering::Release);
        }
        written
    }

    /// Writer only: deletes the `count` oldest segments (never the active
    /// one), moving the log start offset past them.
    fn delete_oldest(&self, w: &mut Writer, count: usize) -> Result<usize> {
        let segments = self.snapshot();
        let count = count.min(segments.len() - 1);
        if count == 0 {
            return Ok(0);
        }
        let new_start = segments[count].base_offset();
        if new_start > self.log_start_offset() {
            self.advance_log_start(new_start);
        }
        self.publish(segments[count..].to_vec());
        {
            let mut trash = self.lock_trash();
            for seg in &segments[..count] {
                seg.move_to_trash(&mut trash)?;
            }
        }
        w.dir_changes += 1;
        tracing::debug!(dir = %self.dir.display(), count, log_start_offset = self.log_start_offset(), "deleted segments");
        // The log start may now be past every producer snapshot (those at
        // the later segments' bases lost in a crash before their fsync):
        // a rebuild from it would forget the producers whose batches were
        // just deleted. (Failed, the next deletion tries again.)
        if let Err(error) = self.snapshot_producers_past_log_start(w) {
            tracing::warn!(dir = %self.dir.display(), %error, "cannot snapshot the producers past the new log start");
        }
        Ok(count)
    }

    /// Latest (epoch, start offset) in the leader-epoch checkpoint.
    pub fn latest_epoch(&self) -> Option<(i32, i64)> {
        self.epochs.read().expect("epochs lock").latest()
    }
    /// Earliest (epoch, start offset) in the leader-epoch checkpoint.
    pub fn earliest_epoch(&self) -> Option<(i32, i64)> {
        self.epochs.read().expect("epochs lock").earliest()
    }
    /// End offset of `epoch`: (largest epoch <= `epoch`, start of the next
    /// epoch or the log end).
    pub fn end_offset_for_epoch(&self, epoch: i32) -> Option<(i32, i64)> {
        self.epochs
            .read()
            .expect("epochs lock")
            .end_offset_for(epoch, self.log_end_offset())
    }

    /// Periodic work: roll by age, retention by size and age, interval
    /// flush. Returns the number of segments deleted.
    pub fn tick(&self, now_ms: i64) -> Result<usize> {
        let mut w = self.lock_writer()?;
        let config = self.config();
        let segments = self.snapshot();
        let active = segments.last().expect("one segment");
        let too_old = config.segment_ms_max.is_some_and(|ms| {
            active.size() > 0 && now_ms.saturating_sub(active.first_append_ms()) > ms as i64
        });
        // Every step runs whatever the ones before did, and the first
        // error is returned at the end: a roll failing on a full disk
        // (its producer snapshot needs a new file) stopped retention,
        // which is what frees the disk, on every tick; and a failed
        // cleanup stopped the flush.ms fsync and the checkpoints.
        let mut failed: Option<StorageError> = None;
        if too_old {
            if let Err(e) = self.roll(&mut w, &config, active.next_offset()) {
                failed.get_or_insert(e);
            }
        }
        let segments = self.snapshot();
        let mut expired = Self::expired_segments(
            &segments,
            &config,
            self.high_watermark(),
            self.log_start_offset(),
            now_ms,
        );
        if expired == segments.len() {
            // The active segment is due too (its records all expired, or
            // past the size limit, and all of them replicated): rolled,
            // then deleted with the others, as in Kafka. Kept, the
            // records of a quiet topic stayed readable until the segment
            // rolled by age (segment.ms, a week) whatever retention.ms
            // said.
            let active = segments.last().expect("one segment");
            if let Err(e) = self.roll(&mut w, &config, active.next_offset()) {
                failed.get_or_insert(e);
                expired -= 1;
            }
        }
        let deleted = self.delete_oldest(&mut w, expired).unwrap_or_else(|e| {
            failed.get_or_insert(e);
            0
        });
        let gone = self
            .lock_producers()
            .expire(now_ms, config.producer_id_expiration_ms as i64);
        if gone > 0 {
            tracing::debug!(dir = %self.dir.display(), producers = gone, "expired producer state");
        }
        // With EveryBatch the data is already durable: this only moves
        // the recovery point, lazily.
        let flush_due = config.flush == FlushPolicy::EveryBatch
            || matches!(config.flush, FlushPolicy::Interval { ms: Some(ms), .. }
            if now_ms.saturating_sub(w.last_flush_ms) >= ms as i64);
        drop(w);
        let steps = [
            self.empty_trash(),
            self.persist_log_start(),
            if flush_due {
                self.flush_concurrently(now_ms)
            } else {
                self.flush_rolled()
            },
            self.persist_high_watermark(),
        ];
        for step in steps {
            if let Err(e) = step {
                failed.get_or_insert(e);
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(deleted),
        }
    }

    /// How many of `segments`, oldest first, retention deletes: those wholly
    /// below the high watermark (records no follower has yet are not deleted,
    /// and deleting them would move the log start, and with it the high
    /// watermark, past records an acks=all producer is still waiting on),
    /// the active one included (then the caller rolls first), that are
    /// older than `retention.ms`, or that the log can lose and still hold
    /// `retention.bytes`, or that lie wholly below the log start (records
    /// deleted by DeleteRecords, in a segment that rolled since).
    fn expired_segments(
        segments: &[Arc<Segment>],
        config: &LogConfig,
        high_watermark: i64,
        log_start_offset: i64,
        now_ms: i64,
    ) -> usize {
        let candidates = segments
            .iter()
            .take_while(|s| s.size() > 0 && s.next_offset() <= high_watermark)
            .count();
        let candidates = &segments[..candidates];
        let mut expired = candidates
            .iter()
            .take_while(|s| s.next_offset() <= log_start_offset)
            .count();
        if let Some(ms) = config.retention_ms_max {
            let cutoff = now_ms.saturating_sub(ms as i64);
            expired = expired.max(
                candidates
                    .iter()
                    .take_while(|s| s.retention_time_ms() < cutoff)
                    .count(),
            );
        }
        if let Some(bytes_max) = config.retention_bytes_max {
            let mut total: u64 = segments.iter().map(|s| s.size()).sum();
            let mut by_size = 0;
            for s in candidates {
                if total.saturating_sub(s.size()) < bytes_max || total <= bytes_max {
                    break;
                }
                total -= s.size();
                by_size += 1;
            }
            expired = expired.max(by_size);
        }
        expired
    }

    /// Kafka's flush on roll, off the append path: fsyncs the segments
    /// that rolled since the recovery point (with their rolls' producer
    /// snapshots and the directory), then moves the recovery point to the
    /// active segment's base. Whatever
    /// the flush policy (flush.ms = -1 included), a restart after a crash
    /// then scans only the active segment, and recovery time does not
    /// grow with the log. The fsyncs run without the writer lock.
    fn flush_rolled(&self) -> Result<()> {
        let (rolled, from, target, dir, truncations) = {
            let w = self.lock_writer()?;
            let segments = self.snapshot();
            let active_base = segments.last().expect("one segment").base_offset();
            if w.recovery_point >= active_base {
                return Ok(());
            }
            let rolled: Vec<Arc<Segment>> = segments[..segments.len() - 1]
                .iter()
                .filter(|s| s.next_offset() > w.recovery_point)
                .cloned()
                .collect();
            (
                rolled,
                w.recovery_point,
                active_base,
                Self::dir_target(&w, &self.dir_synced),
                w.truncations,
            )
        };
        self.sync_then_advance(&rolled, from, target, dir, truncations)
            .map(drop)
    }

    /// Like `flush`, but the fsyncs run without the writer lock, so
    /// appends go on meanwhile; only the bookkeeping takes the lock. The
    /// recovery point moves to the log end seen before the fsyncs, unless
    /// the log was truncated in between.
    fn flush_concurrently(&self, now: i64) -> Result<()> {
        let (segments, from, log_end_offset, dir, messages, truncations) = {
            let w = self.lock_writer()?;
            (
                self.snapshot(),
                w.recovery_point,
                self.log_end_offset(),
                Self::dir_target(&w, &self.dir_synced),
                w.unflushed_messages,
                w.truncations,
            )
        };
        let mut w = self.sync_then_advance(&segments, from, log_end_offset, dir, truncations)?;
        w.unflushed_messages = w.unflushed_messages.saturating_sub(messages);
        w.last_flush_ms = now;
        Ok(())
    }

    /// What every flush syncs before the recovery point may move from
    /// `from` to `to`: `segments`, the producer snapshots written by rolls
    /// in between (a roll does not fsync its snapshot), and the directory
    /// up to `dir` changes.
    fn sync_for_recovery_point(
        &self,
        segments: &[Arc<Segment>],
        from: i64,
        to: i64,
        dir: Option<u64>,
    ) -> Result<()> {
        for seg in segments {
            // Rolled segments give back the blocks reserved past their
            // end here, off the append path (`Segment::seal` says why);
            // the active one keeps its reservation.
            seg.release_reserved()?;
            seg.sync_all()?;
        }
        producer_state::sync_snapshots(&self.dir, from, to)?;
        self.sync_dir_to(dir)
    }

    /// A background flush after its bookkeeping was read: the fsyncs run
    /// without the writer lock (appends go on), then the recovery point
    /// moves to `to` unless the log was truncated in between
    /// (`truncations` changed). Its checkpoint is written under the
    /// checkpoints lock alone, so appends go on then too. A failed fsync
    /// closes the log (see [`Log::fail`]). Returns the writer lock.
    fn sync_then_advance(
        &self,
        segments: &[Arc<Segment>],
        from: i64,
        to: i64,
        dir: Option<u64>,
        truncations: u64,
    ) -> Result<MutexGuard<'_, Writer>> {
        let synced = self.sync_for_recovery_point(segments, from, to, dir);
        let _checkpoints = self.lock_checkpoints();
        let advance = {
            let mut w = self.lock_writer()?;
            if let Err(e) = synced {
                self.fail(&mut w, "fsync", &e);
                return Err(e);
            }
            w.truncations == truncations && w.recovery_point < to
        };
        if advance {
            // Truncations take the checkpoints lock first, so none can
            // run between this check and the write.
            checkpoint::write_offset(&self.dir, checkpoint::RECOVERY_POINT, to)?;
        }
        let mut w = self.lock_writer()?;
        if advance {
            w.recovery_point = to;
        }
        Ok(w)
    }

    /// Starts write-back of what was appended to the active segment since
    /// the last call, without waiting for it or taking the writer lock.
    /// Called often (a few times a second), this keeps each partition's
    /// dirty pages to a fraction of a second of appends: left to the
    /// kernel, they pile up to its background threshold (gigabytes) and
    /// are then written back in bursts during which appends to the same
    /// file wait on its block-mapping lock, tens of ms at a time. No
    /// durability is implied; that is what flushes are for.
    pub fn start_writeback(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        self.snapshot()
            .last()
            .expect("always one segment")
            .start_writeback()
    }

    /// fsyncs everything written and records the recovery point.
    pub fn flush(&self) -> Result<()> {
        let mut persisted = self.lock_checkpoints();
        {
            let mut w = self.lock_writer()?;
            self.flush_locked(&mut w, now_ms())?;
        }
        self.persist_high_watermark_locked(&mut persisted)
    }

    /// Total bytes of all segment files.
    pub fn size_bytes(&self) -> u64 {
        self.snapshot().iter().map(|s| s.size()).sum()
    }

    /// Flushes and closes; later calls fail with `Closed`.
    pub fn close(&self) -> Result<()> {
        let mut persisted = self.lock_checkpoints();
        let mut w = self.lock_writer()?;
        self.flush_locked(&mut w, now_ms())?;
        self.persist_high_watermark_locked(&mut persisted)?;
        let segments = self.snapshot();
        segments.last().expect("one segment").seal()?;
        for seg in segments.iter() {
            seg.release_reserved()?;
            seg.sync_all()?;
        }
        // Also when there is no producer (12 bytes): without a snapshot at
        // the log end, the next open rebuilds the state by reading the
        // whole active segment, on every clean restart of every partition.
        let states = self.lock_producers().clone();
        producer_state::write_snapshot(
            &self.dir,
            self.log_end_offset(),
            &states,
            &self.segment_bases(),
        )?;
        let marker = self.dir.join(checkpoint::CLEAN_SHUTDOWN);
        self.spare.close(true)?;
        self.empty_trash()?;
        self.persist_log_start_locked()?;
        std::fs::File::create(&marker).map_err(io_err(&marker))?;
        if let Err(e) = self.sync_dir() {
            // Not closed cleanly after all: the marker would let the next
            // open trust segments that later appends (the log stayed
            // writable) and a crash left torn.
            let _ = std::fs::remove_file(&marker);
            self.fail(&mut w, "close", &e);
            return Err(e);
        }
        w.closed = true;
        self.closed.store(true, Ordering::Release);
        Ok(())
    }

    /// Closes a log whose directory is being deleted: appends and reads
    /// fail with `Closed` from now on, nothing is flushed or checkpointed,
    /// and a spare reservation still queued is dropped. One already under
    /// way is left to [`Log::wait_out_spare`], on the deleting thread.
    pub(crate) fn close_for_delete(&self) {
        // Checkpoint writes hold this lock from their `closed` check to
        // the write: none is under way once the directory is renamed.
        let _checkpoints = self.lock_checkpoints();
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        w.closed = true;
        self.closed.store(true, Ordering::Release);
        drop(w);
        self.spare.stop();
    }

    /// Waits out a spare reservation under way in this (closed) log's
    /// directory and drops the spare.
    pub(crate) fn wait_out_spare(&self) {
        if let Err(error) = self.spare.close(false) {
            tracing::debug!(dir = %self.dir.display(), %error, "closing the spare of a deleted log");
        }
    }

    /// Closes without the clean-shutdown marker or a final flush, as a
    /// crash would leave it (tests and tools). Later calls fail with
    /// `Closed`.
    pub fn close_unclean(&self) {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        // As a crash would: the spare stays for the next open to delete.
        let _ = self.spare.close(false);
        w.closed = true;
        self.closed.store(true, Ordering::Release);
    }

    /// Number of segments (tests, metrics).
    pub fn segment_count(&self) -> usize {
        self.snapshot().len()
    }

    /// Base offsets of the segments, oldest first (tests, metrics).
    pub fn segment_base_offsets(&self) -> Vec<i64> {
        self.snapshot().iter().map(|s| s.base_offset()).collect()
    }

    /// Path of the `.log` file of the segment holding `offset` (tools).
    pub fn segment_path_for(&self, offset: i64) -> Option<PathBuf> {
        let segments = self.snapshot();
        let i = segments
            .partition_point(|s| s.base_offset() <= offset)
            .checked_sub(1)?;
        Some(segments[i].log_path().to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::BatchBuilder;

    fn batch() -> BytesMut {
        let mut b = BatchBuilder::new();
        b.push(0, None, Some(b"value"), &[]);
        b.build()
    }

    /// Bytes of disk allocated to `path` (reserved blocks included).
    fn allocated(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    /// Segments larger than the first reservation an append makes for
    /// itself (1 MiB), so a segment born from a spare tells itself apart.
    fn spare_config() -> LogConfig {
        LogConfig {
            segment_bytes_max: 8 << 20,
            ..LogConfig::default()
        }
    }

    /// Appends one record with a 1 KiB value.
    fn append_kib(log: &Log) {
        let mut b = BatchBuilder::new();
        b.push(0, None, Some(&[7u8; 1024]), &[]);
        log.append_as_leader(b.build(), 0).unwrap();
    }

    /// Appends 1 KiB values until the active segment holds at least
    /// `bytes`; returns how many records went in.
    fn fill(log: &Log, bytes: u64) -> i64 {
        let mut records = 0;
        while log.snapshot().last().unwrap().size() < bytes {
            append_kib(log);
            records += 1;
        }
        records
    }

    /// Appends 1 KiB values until the log rolls; returns how many.
    fn fill_to_roll(log: &Log) -> i64 {
        let segments = log.segment_count();
        let mut records = 0;
        while log.segment_count() == segments {
            append_kib(log);
            records += 1;
        }
        records
    }

    /// Reopened after a clean close, the closed segments' indexes are
    /// taken as they are: sealing them again counted them as written,
    /// and the next close fsynced two index files per segment.
    #[test]
    fn a_clean_reopen_leaves_closed_segments_indexes_synced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        let config = LogConfig {
            segment_bytes_max: 64 << 10,
            index_interval_bytes: 4096,
            preallocate: false,
            ..LogConfig::default()
        };
        let log = Log::open(&path, config.clone()).unwrap();
        for _ in 0..3 {
            fill_to_roll(&log);
        }
        log.close().unwrap();
        let log = Log::open(&path, config).unwrap();
        let segments = log.snapshot();
        assert!(segments.len() >= 4);
        for seg in &segments[..segments.len() - 1] {
            assert!(!seg.indexes_unsynced(), "segment {}", seg.base_offset());
        }
        log.close().unwrap();
    }

    /// Once the active segment is half full, the next segment's file is
    /// created and reserved whole in the background; the roll renames it
    /// into place, so the new segment's appends never reserve blocks
    /// themselves.
    #[test]
    fn the_roll_takes_a_spare_reserved_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        let config = spare_config();
        let log = Log::open(&path, config.clone()).unwrap();
        let spare_path = path.join(spare::SPARE_NAME);
        let before = fill(&log, config.segment_bytes_max / 2 - 4096);
        assert!(
            !spare_path.exists(),
            "no spare before the segment is half full"
        );
        let mut records = before + fill(&log, config.segment_bytes_max / 2);
        if !log.spare.wait_ready() {
            // This file system cannot reserve blocks: rolls create files.
            assert!(!spare_path.exists());
            return;
        }
        assert_eq!(std::fs::metadata(&spare_path).unwrap().len(), 0);
        assert!(allocated(&spare_path) >= config.segment_bytes_max);
        records += fill_to_roll(&log);
        assert!(!spare_path.exists(), "the roll renamed the spare");
        let active = log.snapshot().last().unwrap().clone();
        assert_eq!(active.preallocated_to(), config.segment_bytes_max);
        assert!(allocated(active.log_path()) >= config.segment_bytes_max);
        assert_eq!(
            std::fs::metadata(active.log_path()).unwrap().len(),
            active.size(),
            "the file's length is what was appended"
        );
        // Every record is there, across the roll, after a reopen too.
        log.close().unwrap();
        let log = Log::open(&path, config).unwrap();
        assert_eq!(log.log_end_offset(), records);
        let mut offset = 0;
        while offset < records {
            let read = log.read(offset, 1 << 20, records).unwrap();
            for batch in RecordBatch::parse_all(read.batches).unwrap() {
                assert_eq!(batch.base_offset(), offset);
                assert_eq!(
                    batch.records().unwrap()[0].value.as_deref(),
                    Some(&[7u8; 1024][..])
                );
                offset = batch.last_offset() + 1;
            }
        }
    }

    /// A hot partition (8 MiB within a second) gets its spare at once,
    /// and a segment that reserves for itself then rolls early, so the
    /// rest of the appends go into reserved segments; one born from a
    /// spare never rolls early.
    #[test]
    fn a_hot_partition_rolls_early_into_a_reserved_segment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        let config = LogConfig {
            segment_bytes_max: 64 << 20,
            ..LogConfig::default()
        };
        // Filled with reservations off: on the wall clock this fill is
        // itself hot, and its spare could roll it early at any moment.
        let log = Log::open(
            &path,
            LogConfig {
                preallocate: false,
                ..config.clone()
            },
        )
        .unwrap();
        fill(&log, HOT_BYTES + 4096);
        assert_eq!(log.segment_count(), 1);
        assert!(!log.spare.wait_ready(), "no spare without preallocate");
        log.set_config(config.clone());
        let first = log.snapshot().last().unwrap().clone();
        {
            // The one-second window, with the clock given.
            let mut w = log.lock_writer().unwrap();
            w.hot_window = (0, 1_000, 0);
            assert!(log.wants_spare(&mut w, &first, &config, 1_900));
            w.hot_window = (0, 1_000, first.size() - HOT_BYTES + 1);
            assert!(
                !log.wants_spare(&mut w, &first, &config, 1_900),
                "< 8 MiB in the window"
            );
            w.hot_window = (0, 1_000, 0);
            assert!(
                !log.wants_spare(&mut w, &first, &config, 2_100),
                "the window is over"
            );
            assert_eq!(w.hot_window, (0, 2_100, first.size()), "a new one starts");
        }
        log.spare.prepare(config.segment_bytes_max);
        if !log.spare.wait_ready() {
            return; // cannot reserve here: no spare, no early roll
        }
        append_kib(&log);
        assert_eq!(
            log.segment_count(),
            2,
            "rolled as soon as the spare was ready"
        );
        assert!(first.size() < config.segment_bytes_max / 2);
        let second = log.snapshot().last().unwrap().clone();
        assert!(second.born_reserved());
        assert_eq!(second.preallocated_to(), config.segment_bytes_max);

        fill(&log, HOT_BYTES + 4096);
        log.spare.prepare(config.segment_bytes_max);
        assert!(log.spare.wait_ready());
        append_kib(&log);
        assert_eq!(log.segment_count(), 2, "a reserved segment fills up");
        log.close().unwrap();
    }

    /// A spare is never data: a clean close deletes it, a crash leaves it
    /// and the next open deletes it, and a log deleted with one is gone.
    #[test]
    fn a_spare_does_not_outlive_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        let spare_path = path.join(spare::SPARE_NAME);
        let config = spare_config();

        let log = Log::open(&path, config.clone()).unwrap();
        fill(&log, config.segment_bytes_max / 2);
        if !log.spare.wait_ready() {
            return; // cannot reserve here; nothing is created
        }
        assert!(spare_path.exists());
        log.close().unwrap();
        assert!(!spare_path.exists(), "a clean close deletes the spare");

        let log = Log::open(&path, config.clone()).unwrap();
        fill(&log, config.segment_bytes_max / 2 + 4096);
        assert!(log.spare.wait_ready());
        log.close_unclean();
        assert!(spare_path.exists(), "a crash leaves the spare");
        let end = log.log_end_offset();
        let log = Log::open(&path, config.clone()).unwrap();
        assert!(!spare_path.exists(), "opening deletes a leftover spare");
        assert_eq!(log.log_end_offset(), end);
        log.close().unwrap();

        let manager = crate::LogManager::open(dir.path(), config.clone()).unwrap();
        let log = manager.get_or_create("t", 0, config.clone()).unwrap();
        append_kib(&log); // over half full already: asks for a spare
        assert!(log.spare.wait_ready());
        manager.delete("t", 0).unwrap();
        assert!(!path.exists());
        crate::manager::wait_for_deletions();
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// With `preallocate` turned off, a ready spare is dropped at the
    /// next roll and the new segment reserves nothing.
    #[test]
    fn preallocate_off_drops_the_spare() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        let config = spare_config();
        let log = Log::open(&path, config.clone()).unwrap();
        fill(&log, config.segment_bytes_max / 2);
        if !log.spare.wait_ready() {
            return;
        }
        log.set_config(LogConfig {
            preallocate: false,
            ..config
        });
        fill_to_roll(&log);
        assert!(!path.join(spare::SPARE_NAME).exists());
        let active = log.snapshot().last().unwrap().clone();
        assert_eq!(active.preallocated_to(), 0);
        fill(&log, log.config().segment_bytes_max / 2 + 4096);
        assert!(!log.spare.wait_ready(), "no spare is asked for");
        log.close().unwrap();
    }

    fn names_ending(dir: &Path, suffix: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(suffix))
            .collect();
        names.sort();
        names
    }

    /// Rolls and retention only rename what they delete; the unlinks
    /// (which may wait for the device to discard blocks) happen in the
    /// tick, without the writer lock. A crash's leftovers go at open.
    #[test]
    fn deleted_files_are_unlinked_off_the_append_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        let config = LogConfig {
            segment_bytes_max: 100, // every batch rolls
            ..LogConfig::default()
        };
        let log = Log::open(&path, config.clone()).unwrap();
        for _ in 0..5 {
            log.append_as_leader(batch(), 0).unwrap();
        }
        assert_eq!(log.segment_count(), 5);
        // One producer snapshot per rolled-to segment base, none
        // superseded while their segments stay.
        assert_eq!(names_ending(&path, ".snapshot").len(), 4);
        assert!(names_ending(&path, ".snapshot.deleted").is_empty());

        log.set_config(LogConfig {
            retention_bytes_max: Some(1),
            // By size only: the records' 1970 timestamps would expire
            // the active segment too.
            retention_ms_max: None,
            ..config.clone()
        });
        log.set_high_watermark(log.log_end_offset());
        assert_eq!(log.tick(now_ms()).unwrap(), 4);
        assert_eq!(log.segment_count(), 1);
        assert_eq!(names_ending(&path, ".deleted"), Vec::<String>::new());
        assert_eq!(names_ending(&path, ".log").len(), 1);
        assert_eq!(log.log_start_offset(), 4);

        // Rolls: trash again, the snapshots of the deleted segments
        // among it.
        log.append_as_leader(batch(), 0).unwrap();
        assert_eq!(names_ending(&path, ".snapshot.deleted").len(), 3);
        log.close_unclean();
        std::fs::write(path.join("00000000000000000001.log.deleted"), b"x").unwrap();
        let log = Log::open(&path, config).unwrap();
        assert_eq!(names_ending(&path, ".deleted"), Vec::<String>::new());
        assert_eq!((log.log_start_offset(), log.log_end_offset()), (4, 6));
        log.close().unwrap();
    }

    #[test]
    fn writeback_covers_each_append_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path().join("t-0"), LogConfig::default()).unwrap();
        let active = || log.snapshot().last().unwrap().clone();
        log.start_writeback().unwrap();
        assert_eq!(active().writeback_from(), 0, "nothing appended yet");
        log.append_as_leader(batch(), 0).unwrap();
        let first = active().size();
        log.start_writeback().unwrap();
        assert_eq!(active().writeback_from(), first);
        log.append_as_leader(batch(), 0).unwrap();
        log.append_as_leader(batch(), 0).unwrap();
        assert_eq!(active().writeback_from(), first, "started only when asked");
        log.start_writeback().unwrap();
        assert_eq!(active().writeback_from(), active().size());
        assert!(active().size() > first);
        log.truncate_to(1).unwrap();
        log.start_writeback().unwrap();
        assert_eq!(
            active().writeback_from(),
            first,
            "a truncated tail is not written back"
        );
        log.close().unwrap();
        log.start_writeback().unwrap();
    }

    /// Under write-back an fsync takes tens of ms; the high-watermark
    /// checkpoint's used to run under the writer lock, so every append
    /// (and every acks=all answer) waited for it once a second.
    #[test]
    fn appends_go_on_while_the_high_watermark_checkpoint_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(Log::open(dir.path().join("t-0"), LogConfig::default()).unwrap());
        log.append_as_leader(batch(), 0).unwrap();
        log.set_high_watermark(log.log_end_offset());

        // With the checkpoint under the writer lock this append waits for
        // the held fsync, and the wait times out.
        let info = append_while_checkpoint_held(&log, checkpoint::HIGH_WATERMARK, now_ms())
            .expect("the append waited for the high-watermark checkpoint's fsync");
        assert_eq!(info.base_offset, 1);
        assert_eq!(
            checkpoint::read_offset(log.dir(), checkpoint::HIGH_WATERMARK).unwrap(),
            Some(1)
        );
    }

    #[test]
    fn the_first_flush_of_a_new_log_makes_its_directory_entries_durable() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let dir = data.join("t-0");
        let synced = Arc::new(Mutex::new(Vec::<PathBuf>::new()));
        {
            let synced = synced.clone();
            let root = tmp.path().to_path_buf();
            checkpoint::BEFORE_SYNC
                .write()
                .unwrap()
                .push(Box::new(move |path: &Path| {
                    if path.starts_with(&root) {
                        synced.lock().unwrap().push(path.to_path_buf());
                    }
                }));
        }
        let config = LogConfig {
            flush: FlushPolicy::EveryBatch,
            ..LogConfig::default()
        };
        let log = Log::open(&dir, config).unwrap();
        assert_eq!(*synced.lock().unwrap(), Vec::<PathBuf>::new());
        // The append is acknowledged once durable: so must be the names
        // that lead to its bytes.
        log.append_as_leader(batch(), 0).unwrap();
        let seen = synced.lock().unwrap().clone();
        assert!(seen.contains(&dir), "{seen:?}");
        assert!(seen.contains(&data), "{seen:?}");
        // Once is enough for the parent.
        synced.lock().unwrap().clear();
        log.append_as_leader(batch(), 0).unwrap();
        let seen = synced.lock().unwrap().clone();
        assert!(!seen.contains(&data), "{seen:?}");
    }

    /// Holds the next write (only that one) of `dir`'s checkpoint `name`
    /// just before its fsync: the first channel says it got there, a send
    /// on the second lets it go on.
    fn hold_checkpoint_sync(dir: &Path, name: &str) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let watched = dir.join(format!("{name}.tmp"));
        let held = std::sync::atomic::AtomicBool::new(false);
        checkpoint::BEFORE_SYNC
            .write()
            .unwrap()
            .push(Box::new(move |path: &Path| {
                if path == watched && !held.swap(true, Ordering::SeqCst) {
                    let _ = entered_tx.send(());
                    let _ = release_rx
                        .lock()
                        .unwrap()
                        .recv_timeout(Duration::from_secs(30));
                }
            }));
        (entered, release)
    }

    /// Runs `log.tick(tick_ms)` until it holds the write of checkpoint
    /// `name` just before its fsync, then appends from another thread:
    /// `Err` if the append did not finish within 10 s while the fsync was
    /// held. The tick is released and joined either way.
    fn append_while_checkpoint_held(
        log: &Arc<Log>,
        name: &str,
        tick_ms: i64,
    ) -> std::result::Result<AppendInfo, ()> {
        let (entered, release) = hold_checkpoint_sync(log.dir(), name);
        let ticking = {
            let log = log.clone();
            std::thread::spawn(move || log.tick(tick_ms))
        };
        entered
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the tick did not write {name}"));
        let (done_tx, done) = mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                let _ = done_tx.send(log.append_as_leader(batch(), 0));
            });
        }
        let appended = done.recv_timeout(Duration::from_secs(10));
        release.send(()).unwrap();
        ticking.join().unwrap().unwrap();
        appended.map(|r| r.unwrap()).map_err(drop)
    }

    /// Retention wrote the log-start and leader-epoch checkpoints (an
    /// fsync each) under the writer lock, so appends waited for both.
    #[test]
    fn appends_go_on_while_retention_writes_its_checkpoints() {
        for name in [checkpoint::LOG_START_OFFSET, checkpoint::LEADER_EPOCH] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("t-0");
            let config = LogConfig {
                segment_bytes_max: 100, // every batch rolls
                ..LogConfig::default()
            };
            let log = Arc::new(Log::open(&path, config.clone()).unwrap());
            log.append_as_leader(batch(), 0).unwrap();
            log.append_as_leader(batch(), 0).unwrap();
            log.set_high_watermark(log.log_end_offset());
            log.set_config(LogConfig {
                retention_bytes_max: Some(1),
                // By size only: the records' 1970 timestamps would
                // expire the active segment too.
                retention_ms_max: None,
                ..config.clone()
            });
            let info = append_while_checkpoint_held(&log, name, now_ms())
                .unwrap_or_else(|()| panic!("the append waited for {name}'s fsync"));
            assert_eq!(info.base_offset, 2);
            assert_eq!(log.log_start_offset(), 1);
            assert_eq!(
                checkpoint::read_offset(&path, checkpoint::LOG_START_OFFSET).unwrap(),
                Some(1)
            );
            assert_eq!(log.end_offset_for_epoch(0), Some((0, 3)));
            // The trimmed epoch cache is what a reopen finds.
            log.close().unwrap();
            let epochs = EpochCache::load(&path).unwrap();
            assert_eq!(epochs.latest(), Some((0, 1)));
        }
    }

    /// The recovery-point checkpoint, written by the tick's flush (each
    /// flush.ms, or lazily with fsync per batch) and after a roll, used
    /// to be written under the writer lock, so an append waited for its
    /// fsync.
    #[test]
    fn appends_go_on_while_the_recovery_point_checkpoint_syncs() {
        for flush in [
            FlushPolicy::Interval {
                messages: None,
                ms: Some(1),
            },
            FlushPolicy::EveryBatch,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let config = LogConfig {
                flush,
                ..LogConfig::default()
            };
            let log = Arc::new(Log::open(dir.path().join("t-0"), config).unwrap());
            log.append_as_leader(batch(), 0).unwrap();
            let info =
                append_while_checkpoint_held(&log, checkpoint::RECOVERY_POINT, now_ms() + 1000)
                    .unwrap_or_else(|()| {
                        panic!("{flush:?}: the append waited for the recovery point's fsync")
                    });
            assert_eq!(info.base_offset, 1);
            // The flush covered what was there when it started.
            assert_eq!(
                checkpoint::read_offset(log.dir(), checkpoint::RECOVERY_POINT).unwrap(),
                Some(1)
            );
            log.flush().unwrap();
            assert_eq!(
                checkpoint::read_offset(log.dir(), checkpoint::RECOVERY_POINT).unwrap(),
                Some(2)
            );
        }
    }
}
