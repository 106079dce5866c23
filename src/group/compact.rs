//! Compaction of an offsets partition: without it `__consumer_offsets`
//! kept every commit ever made, its disk use grew for good and a new
//! coordinator replayed all of it.
//!
//! Storage has no log cleaner, so the coordinator compacts its own
//! partitions by copying: once a partition holds more than
//! `[broker] offsets_compaction_records` records (and twice what its last
//! compaction kept), [`compact`] reads it, keeps the newest record of each
//! key (a commit's `offset\0group\0topic\0partition`, a group's
//! `group\0group`), and appends those again at the log end, tombstones
//! left out, under the appender's lock so that no commit lands between the
//! read and the copy. Once every in-sync replica has the copy, the records
//! below it are deleted (DeleteRecords, which the followers follow and
//! which drops whole segments below it).
//!
//! Why that is safe: a replay from the copy's first offset ends in the
//! state a replay from the old log start did, because the copy holds the
//! newest value of every key as of the end of the log it was made from,
//! and only records after it follow. A crash or a leadership change
//! before the delete leaves copies that a replay applies again to the
//! same values; the delete comes only after the copy is committed, so a
//! new leader has it too.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use runnel_proto::v1 as pb;
use runnel_storage::{Log, Record, RecordBatch, StorageError};

use super::appender::{record_bytes, Appender, BATCH_RECORDS_MAX};
use super::coordinator::{parse_key, OFFSETS_TOPIC};
use super::record::parse_group_key;
use crate::error::BrokerError;

/// Bytes read from the log at once.
const READ_BYTES: usize = 1024 * 1024;

/// Calls `f` with every record of `log` from offset `from` up to `to`
/// (exclusive) in order, and returns the offset after the last batch
/// read.
pub(super) fn for_each_record(
    log: &Log,
    from: i64,
    to: i64,
    mut f: impl FnMut(Record),
) -> Result<i64, StorageError> {
    let mut next = from;
    while next < to {
        let read = log.read(next, READ_BYTES, to)?;
        if read.batches.is_empty() {
            break;
        }
        let at = next;
        for batch in RecordBatch::parse_all(read.batches)? {
            for r in batch.records()? {
                // The first batch may start before `at`.
                if r.offset >= at {
                    f(r);
                }
            }
            next = next.max(batch.last_offset() + 1);
        }
    }
    Ok(next)
}

/// The newest record of each key of an offsets partition, read in log
/// order.
#[derive(Debug, Default)]
pub(super) struct Live {
    /// Key → (log offset, timestamp, value; None for a tombstone).
    newest: HashMap<Bytes, (i64, i64, Option<Bytes>)>,
}

impl Live {
    /// Takes in `r` if its key is one the coordinator reads (others are
    /// skipped by a replay, and dropped here). Key and value are copied
    /// out of the read buffer, which would otherwise stay alive whole.
    pub(super) fn add(&mut self, r: &Record) {
        let Some(key) = r.key.as_deref() else {
            return;
        };
        if parse_group_key(key).is_none() && parse_key(key).is_none() {
            return;
        }
        self.newest.insert(
            Bytes::copy_from_slice(key),
            (
                r.offset,
                r.timestamp_ms,
                r.value.as_deref().map(Bytes::copy_from_slice),
            ),
        );
    }

    /// The records to append again, in the order their newest versions
    /// were written, tombstones left out; timestamps are kept.
    pub(super) fn into_records(self) -> Vec<pb::Record> {
        let mut live: Vec<(i64, pb::Record)> = self
            .newest
            .into_iter()
            .filter_map(|(key, (offset, timestamp_ms, value))| {
                let value = value?;
                Some((
                    offset,
                    pb::Record {
                        key: Some(key),
                        value: Some(value),
                        timestamp_ms,
                        ..Default::default()
                    },
                ))
            })
            .collect();
        live.sort_unstable_by_key(|(offset, _)| *offset);
        live.into_iter().map(|(_, r)| r).collect()
    }
}

/// What a compaction did.
#[derive(Debug)]
pub(super) struct Compacted {
    /// Records copied.
    pub live: u64,
    /// The partition's log start offset after it.
    pub log_start: i64,
}

/// Reads `[from, to)` of `log` into `live` on a blocking thread.
async fn scan(
    log: Arc<Log>,
    from: i64,
    to: i64,
    mut live: Live,
) -> Result<(Live, i64), BrokerError> {
    tokio::task::spawn_blocking(move || {
        let next = for_each_record(&log, from, to, |r| live.add(&r))?;
        Ok((live, next))
    })
    .await
    .map_err(|_| BrokerError::ShuttingDown)?
}

/// `records` in appends of at most [`BATCH_RECORDS_MAX`] records and
/// `bytes_max` bytes (at least one record each).
fn chunks(records: Vec<pb::Record>, bytes_max: usize) -> Vec<Vec<pb::Record>> {
    let mut out: Vec<Vec<pb::Record>> = Vec::new();
    let mut bytes = 0;
    for r in records {
        let size = record_bytes(&r);
        match out.last_mut() {
            Some(last) if last.len() < BATCH_RECORDS_MAX && bytes + size <= bytes_max => {
                bytes += size;
                last.push(r);
            }
            _ => {
                bytes = size;
                out.push(vec![r]);
            }
        }
    }
    out
}

/// Why a compaction failed, and how many records it copied if the copy
/// was appended (then the next compaction waits for twice as many: each
/// try that failed after its copy, a DeleteRecords that timed out say,
/// left another copy of the live records behind).
#[derive(Debug)]
pub(super) struct CompactError {
    pub error: BrokerError,
    pub copied: Option<u64>,
}

impl From<BrokerError> for CompactError {
    fn from(error: BrokerError) -> Self {
        Self {
            error,
            copied: None,
        }
    }
}

/// Compacts the offsets partition `appender` writes (see the module
/// docs), while `current` (asked under the appender's lock, before the
/// copy) says the appender still writes for the leadership the
/// compaction started in: one that outlived it (leadership moved away and
/// back meanwhile) would copy values read from a log since cut back or
/// written past, after newer commits made through the next appender.
/// Fails with the broker's error when this broker stops leading it
/// meanwhile, or a read, append or delete fails; what was appended by
/// then is harmless.
pub(super) async fn compact(
    appender: &Appender,
    current: impl FnOnce() -> bool,
) -> Result<Compacted, CompactError> {
    let broker = appender.broker().clone();
    let index = appender.index();
    let not_leader = || BrokerError::NotLeader {
        topic: OFFSETS_TOPIC.to_string(),
        partition: index,
        leader: String::new(),
    };
    let log: Arc<Log> = broker
        .hosted_partition(OFFSETS_TOPIC, index)
        .ok_or_else(not_leader)?
        .log
        .clone();
    let start = log.log_start_offset();
    // Most of the log is read before taking the lock: commits go on.
    let (live, scanned) = scan(log.clone(), start, log.log_end_offset(), Live::default()).await?;
    let lock = appender.exclusive().await;
    let end = log.log_end_offset();
    let (live, _) = scan(log.clone(), scanned, end, live).await?;
    if !current() {
        return Err(not_leader().into());
    }
    let records = live.into_records();
    let count = records.len() as u64;
    let mut appended = Vec::new();
    for chunk in chunks(records, appender.batch_bytes_max()) {
        let req = pb::ProduceRequest {
            topic: OFFSETS_TOPIC.to_string(),
            partition: Some(index),
            records: chunk,
            acks: pb::Acks::All as i32,
            ..Default::default()
        };
        match broker.produce_append(req).await {
            Ok(a) => appended.push(a),
            // Earlier chunks are in the log: counted, so that the next
            // try waits for twice as many records.
            Err(error) => {
                return Err(CompactError {
                    error,
                    copied: (!appended.is_empty()).then_some(count),
                })
            }
        }
    }
    drop(lock);
    let copied = |error| CompactError {
        error,
        copied: Some(count),
    };
    let mut copy_start = None;
    for a in appended {
        let r = broker.produce_complete(a).await.map_err(copied)?;
        copy_start.get_or_insert(r.base_offset);
    }
    // Nothing live (every key's newest record a tombstone): every
    // committed record may go.
    let to = copy_start.unwrap_or_else(|| end.min(log.high_watermark()));
    if to > start {
        let deleted = broker
            .delete_records(pb::DeleteRecordsRequest {
                topic: OFFSETS_TOPIC.to_string(),
                partition: index,
                offset: to,
                timeout_ms: 0,
            })
            .await;
        match deleted {
            // Deleted on the leader; the followers follow on their next
            // fetches.
            Ok(_) | Err(BrokerError::DeleteRecordsTimeout { .. }) => {}
            Err(e) => return Err(copied(e)),
        }
    }
    Ok(Compacted {
        live: count,
        log_start: to.max(start),
    })
}

/// Whether a partition holding `records` records should be compacted,
/// its last compaction having kept `live` (0 before the first) and the
/// threshold being `min` (0: never).
pub(super) fn due(records: i64, live: u64, min: u64) -> bool {
    min > 0 && records > 0 && records as u64 > min.max(live.saturating_mul(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: i64, key: &str, value: Option<&str>) -> Record {
        Record {
            offset,
            timestamp_ms: 1000 + offset,
            key: Some(Bytes::copy_from_slice(key.as_bytes())),
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            headers: Vec::new(),
        }
    }

    /// The newest record of each key survives, in the order those were
    /// written, with its timestamp; tombstones and foreign keys go.
    #[test]
    fn live_keeps_the_newest_of_each_key() {
        let mut live = Live::default();
        for r in [
            record(0, "offset\0g\0t\x000", Some("1\0")),
            record(1, "group\0g", Some("{}")),
            record(2, "offset\0g\0t\x001", Some("5\0")),
            record(3, "offset\0g\0t\x000", Some("2\0")),
            record(4, "offset\0g\0t\x001", None),
            record(5, "something else", Some("x")),
            record(6, "offset\0h\0t\x000", None),
        ] {
            live.add(&r);
        }
        let got: Vec<(String, String, i64)> = live
            .into_records()
            .into_iter()
            .map(|r| {
                (
                    String::from_utf8(r.key.unwrap().to_vec()).unwrap(),
                    String::from_utf8(r.value.unwrap().to_vec()).unwrap(),
                    r.timestamp_ms,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("group\0g".to_string(), "{}".to_string(), 1001),
                ("offset\0g\0t\x000".to_string(), "2\0".to_string(), 1003),
            ]
        );
    }

    #[test]
    fn chunks_are_capped_by_records_and_bytes() {
        let r = |n: usize| pb::Record {
            value: Some(vec![0u8; n].into()),
            ..Default::default()
        };
        let sizes = |c: &[Vec<pb::Record>]| c.iter().map(Vec::len).collect::<Vec<_>>();
        // 100 + 32 bytes each: three fit in 400.
        assert_eq!(sizes(&chunks(vec![r(100); 7], 400)), vec![3, 3, 1]);
        // One larger than the cap goes alone.
        assert_eq!(sizes(&chunks(vec![r(10), r(1000), r(10)], 400)), [1, 1, 1]);
        assert_eq!(
            sizes(&chunks(vec![r(0); BATCH_RECORDS_MAX + 1], usize::MAX)),
            vec![BATCH_RECORDS_MAX, 1]
        );
        assert!(chunks(Vec::new(), 400).is_empty());
    }

    #[test]
    fn compaction_is_due_past_the_threshold_and_twice_the_live_records() {
        assert!(!due(1_000_000, 0, 0), "0 turns it off");
        assert!(!due(100, 0, 100));
        assert!(due(101, 0, 100));
        assert!(!due(150, 80, 100), "twice the live records: 160");
        assert!(due(161, 80, 100));
    }
}
