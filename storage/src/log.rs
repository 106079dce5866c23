//! A partition's log: an ordered list of segments.

use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};

use crate::Result;

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
}

impl Default for LogConfig {
    fn default() -> Self {
        todo!()
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

/// One partition's log. `Send + Sync`: one writer at a time (appends
/// serialise internally), reads from any number of threads without waiting
/// for the writer.
#[derive(Debug)]
pub struct Log {
    _todo: (),
}

impl Log {
    /// Opens (creating if absent) the log in `dir`, recovering the tail.
    pub fn open(_dir: impl Into<PathBuf>, _config: LogConfig) -> Result<Log> {
        todo!()
    }
    pub fn dir(&self) -> &Path {
        todo!()
    }
    pub fn config(&self) -> LogConfig {
        todo!()
    }
    /// Replace the config (alter topic config); takes effect from now.
    pub fn set_config(&self, _config: LogConfig) {
        todo!()
    }
    /// Validates, assigns offsets from the log end, stamps `leader_epoch`
    /// (and log-append time), writes. Returns the assigned offsets.
    pub fn append_as_leader(&self, _batch: BytesMut, _leader_epoch: i32) -> Result<AppendInfo> {
        todo!()
    }
    /// Appends batches that already carry offsets and epochs (replication).
    pub fn append_as_follower(&self, _batches: Bytes) -> Result<AppendInfo> {
        todo!()
    }
    /// Reads whole batches from the segment holding `offset`, up to
    /// `max_bytes` (at least one batch), only batches whose last offset is
    /// below `upper_bound` (exclusive, e.g. the high watermark).
    pub fn read(&self, _offset: i64, _max_bytes: usize, _upper_bound: i64) -> Result<ReadResult> {
        todo!()
    }
    pub fn log_start_offset(&self) -> i64 {
        todo!()
    }
    pub fn log_end_offset(&self) -> i64 {
        todo!()
    }
    pub fn high_watermark(&self) -> i64 {
        todo!()
    }
    /// Replication's hook: sets the high watermark (clamped to
    /// [log_start_offset, log_end_offset]) and persists it lazily.
    pub fn set_high_watermark(&self, _offset: i64) {
        todo!()
    }
    /// First (offset, timestamp) whose timestamp >= `timestamp_ms`.
    pub fn offset_for_timestamp(&self, _timestamp_ms: i64) -> Result<Option<(i64, i64)>> {
        todo!()
    }
    /// Removes every record at or after `offset`.
    pub fn truncate_to(&self, _offset: i64) -> Result<()> {
        todo!()
    }
    /// Advances the log start offset to `offset`, deleting whole segments
    /// below it. Returns the new log start offset.
    pub fn delete_records_before(&self, _offset: i64) -> Result<i64> {
        todo!()
    }
    /// Latest (epoch, start offset) in the leader-epoch checkpoint.
    pub fn latest_epoch(&self) -> Option<(i32, i64)> {
        todo!()
    }
    /// End offset of `epoch`: (largest epoch <= `epoch`, start of the next
    /// epoch or the log end).
    pub fn end_offset_for_epoch(&self, _epoch: i32) -> Option<(i32, i64)> {
        todo!()
    }
    /// Periodic work: roll by age, retention by size and age, interval
    /// flush. Returns the number of segments deleted.
    pub fn tick(&self, _now_ms: i64) -> Result<usize> {
        todo!()
    }
    /// fsyncs everything written and records the recovery point.
    pub fn flush(&self) -> Result<()> {
        todo!()
    }
    /// Total bytes of all segment files.
    pub fn size_bytes(&self) -> u64 {
        todo!()
    }
    /// Flushes and closes; later calls fail with `Closed`.
    pub fn close(&self) -> Result<()> {
        todo!()
    }
}
