//! Runnel's storage engine: one segmented, append-only log per partition.
//!
//! Where it sits on the data path: the broker's produce handler hands a
//! validated batch to [`Log::append_as_leader`]; fetch handlers and replica
//! fetchers read whole stored batches back with [`Log::read`] as
//! [`bytes::Bytes`] slices, without re-encoding. Nothing here touches the
//! network or Raft.
//!
//! Layout
//! - [`batch`]: the record-batch binary format (I/O-free codec).
//! - [`log`]: a partition's log: segments, roll, retention, truncation.
//! - `segment`, `offset_index`, `time_index`: one segment's files.
//! - `epoch`: the leader-epoch checkpoint (epoch → start offset).
//! - [`manager`]: every partition log under a data directory.
//! - [`error`]: [`StorageError`].

pub mod batch;
pub mod error;
pub mod log;
pub mod manager;

mod epoch;
mod offset_index;
mod segment;
mod time_index;

pub use batch::{BatchBuilder, Header, Record, RecordBatch};
pub use error::StorageError;
pub use log::{AppendInfo, FlushPolicy, Log, LogConfig, ReadResult, TimestampType};
pub use manager::LogManager;

/// Result alias for this crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
