//! The storage crate's one error enum.

use std::path::PathBuf;

/// Everything that can go wrong in storage. Variants carry the numbers
/// needed to debug them.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An I/O call failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A batch's bytes are malformed (bad length, magic, CRC, or records).
    #[error("corrupt batch: {reason}")]
    CorruptBatch { reason: String },
    /// Corruption found in a closed segment at a known place.
    #[error("corrupt segment {path} at position {position}: {reason}")]
    CorruptSegment {
        path: PathBuf,
        position: u64,
        reason: String,
    },
    /// The batch exceeds max.message.bytes.
    #[error("batch of {size} bytes exceeds max.message.bytes {max}")]
    RecordTooLarge { size: usize, max: usize },
    /// Requested offset outside [log_start_offset, log_end_offset].
    #[error("offset {offset} out of range [{log_start_offset}, {log_end_offset}]")]
    OffsetOutOfRange {
        offset: i64,
        log_start_offset: i64,
        log_end_offset: i64,
    },
    /// Records may be deleted only below the high watermark: above it
    /// they are not yet on every in-sync replica (Kafka refuses such a
    /// DeleteRecords the same way).
    #[error("cannot delete records below {offset}: above the high watermark {high_watermark}")]
    AboveHighWatermark { offset: i64, high_watermark: i64 },
    /// A follower append whose first offset is not the log end offset.
    #[error("non-contiguous append: batch starts at {base_offset}, log ends at {log_end_offset}")]
    NonContiguous {
        base_offset: i64,
        log_end_offset: i64,
    },
    /// A batch with no records.
    #[error("empty batch")]
    EmptyBatch,
    /// The log was deleted or closed.
    #[error("log {dir} is closed")]
    Closed { dir: PathBuf },
    /// An idempotent producer's batch does not follow its last one.
    #[error("out of order sequence for producer {producer_id}: expected {expected}, got {got}")]
    OutOfOrderSequence {
        producer_id: i64,
        expected: i32,
        got: i32,
    },
    /// A producer with this id and a newer epoch exists.
    #[error("producer {producer_id} epoch {epoch} is fenced by epoch {current_epoch}")]
    ProducerFenced {
        producer_id: i64,
        epoch: i16,
        current_epoch: i16,
    },
    /// A producer this partition has no state for sent a sequence other
    /// than 0 (its state expired, or the id was never used here).
    #[error(
        "unknown producer id {producer_id} (sequence {sequence}; state expired or never seen)"
    )]
    UnknownProducerId { producer_id: i64, sequence: i32 },
    /// A leader append from a leader epoch this replica has moved past
    /// (it follows the leader of `fence` now).
    #[error("leader epoch {epoch} is fenced: this replica follows the leader of epoch {fence}")]
    FencedLeaderEpoch { epoch: i32, fence: i32 },
    /// A follower write for a leader epoch in which (or after which) this
    /// replica led: a replication round that outlived its epoch.
    #[error(
        "follower write for leader epoch {epoch} is fenced: this replica led in epoch {fence}"
    )]
    FencedFollowerEpoch { epoch: i32, fence: i32 },
    /// A topic name or partition number that cannot name a directory.
    #[error("invalid partition {topic}-{partition}")]
    InvalidPartition { topic: String, partition: i32 },
    /// The batch was written (and readers may have seen it), then what
    /// the append does after the write failed (the fsync of
    /// `flush.messages`): it may be stored, and the log is closed.
    #[error("the batch was written, then: {0}")]
    FailedAfterWrite(Box<StorageError>),
}
