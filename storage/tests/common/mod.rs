//! Helpers shared by the storage integration tests.
#![allow(dead_code)]

use bytes::BytesMut;
use runnel_storage::{BatchBuilder, FlushPolicy, LogConfig, RecordBatch};

/// Builds a batch of `n` records whose values are `tag:i` and whose
/// timestamps are `ts + i`.
pub fn batch(tag: u64, n: usize, ts: i64) -> BytesMut {
    let mut b = BatchBuilder::new();
    for i in 0..n {
        let value = format!("{tag}:{i}");
        b.push(
            ts + i as i64,
            Some(format!("k{i}").as_bytes()),
            Some(value.as_bytes()),
            &[],
        );
    }
    b.build()
}

/// A config with small segments and dense indexes, no fsync.
pub fn small_config(segment_bytes_max: u64) -> LogConfig {
    LogConfig {
        segment_bytes_max,
        index_interval_bytes: 128,
        index_bytes_max: 4096,
        retention_ms_max: None,
        flush: FlushPolicy::Interval {
            messages: None,
            ms: None,
        },
        ..LogConfig::default()
    }
}

/// (offset, value) of every record in concatenated batches.
pub fn values(bytes: bytes::Bytes) -> Vec<(i64, Vec<u8>)> {
    RecordBatch::parse_all(bytes)
        .unwrap()
        .iter()
        .flat_map(|b| b.records().unwrap())
        .map(|r| (r.offset, r.value.unwrap().to_vec()))
        .collect()
}

/// Reads every record from `from` to the log end, one call per segment.
pub fn read_all(log: &runnel_storage::Log, from: i64) -> Vec<(i64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut offset = from;
    let end = log.log_end_offset();
    while offset < end {
        let r = log.read(offset, 1 << 20, i64::MAX).unwrap();
        let batch = values(r.batches);
        assert!(!batch.is_empty(), "empty read at {offset} below end {end}");
        offset = batch.last().unwrap().0 + 1;
        out.extend(batch.into_iter().filter(|(o, _)| *o >= from));
    }
    out
}
