//! Runnel's storage engine: one segmented, append-only log per partition.
//!
//! Where it sits on the data path: the broker's produce handler hands a
//! validated batch to [`Log::append_as_leader`]; fetch handlers and replica
//! fetchers read whole stored batches back with [`Log::read`] as
//! [`bytes::Bytes`] slices, without re-encoding. Nothing here touches the
//! network or Raft. The byte formats are documented in `storage/README.md`.
//!
//! Layout
//! - [`batch`]: the record-batch binary format (I/O-free codec).
//! - [`log`]: a partition's log: segments, roll, retention, truncation.
//! - `segment`, `offset_index`, `time_index`, `index_file`: one segment's
//!   files; `spare`: the next segment's file, reserved in the background.
//! - `epoch`: the leader-epoch checkpoint (epoch → start offset).
//! - [`producer_state`]: idempotent producers' sequence state and its
//!   snapshots.
//! - `checkpoint`: small atomically-replaced checkpoint files.
//! - `varint`: zigzag varints used inside records.
//! - [`crc`]: CRC32C, folded with carry-less multiplies where the CPU can.
//! - [`manager`]: every partition log under a data directory.
//! - [`error`]: the one error enum, [`StorageError`].
//!
//! # Example
//!
//! ```
//! use runnel_storage::{BatchBuilder, Log, LogConfig, RecordBatch};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let log = Log::open(dir.path().join("orders-0"), LogConfig::default()).unwrap();
//! let mut batch = BatchBuilder::new();
//! batch.push(1_700_000_000_000, Some(b"k"), Some(b"hello"), &[]);
//! let info = log.append_as_leader(batch.build(), 1).unwrap();
//! assert_eq!((info.base_offset, info.last_offset), (0, 0));
//!
//! let read = log.read(0, 1 << 20, log.log_end_offset()).unwrap();
//! let batches = RecordBatch::parse_all(read.batches).unwrap();
//! let records = batches[0].records().unwrap();
//! assert_eq!(records[0].value.as_deref(), Some(&b"hello"[..]));
//! log.close().unwrap();
//! ```

pub mod batch;
pub mod crc;
pub mod error;
pub mod log;
pub mod manager;
pub mod producer_state;

mod checkpoint;
mod epoch;
mod index_file;
mod offset_index;
mod segment;
mod spare;
mod time_index;
mod varint;

pub use batch::{BatchBuilder, Decode, Header, Record, RecordBatch};
pub use error::StorageError;
pub use log::{AppendInfo, FlushPolicy, Log, LogConfig, ReadResult, TimestampType};
pub use manager::LogManager;

/// Result alias for this crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
