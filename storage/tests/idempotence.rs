//! Idempotent-producer state through the `Log` API: duplicates answered
//! with their original offsets, gaps and stale epochs refused with nothing
//! written, and the state surviving reopen, truncation and replication.

mod common;

use bytes::BytesMut;
use common::{read_all, small_config};
use runnel_storage::{BatchBuilder, Log, StorageError};

/// `n` records from producer `pid`/`epoch` starting at sequence `seq`.
fn pbatch(pid: i64, epoch: i16, seq: i32, n: usize) -> BytesMut {
    let mut b = BatchBuilder::new().producer(pid, epoch, seq);
    for i in 0..n {
        let value = format!("{pid}:{}", seq as usize + i);
        b.push(1_700_000_000_000, None, Some(value.as_bytes()), &[]);
    }
    b.build()
}

/// `n` records of no producer.
fn plain(n: usize) -> BytesMut {
    let mut b = BatchBuilder::new();
    for _ in 0..n {
        b.push(1_700_000_000_000, None, Some(b"plain"), &[]);
    }
    b.build()
}

fn snapshot_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".snapshot"))
        .collect();
    names.sort();
    names
}

#[test]
fn retries_are_answered_with_original_offsets_and_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config(1 << 20)).unwrap();
    let first = log.append_as_leader(pbatch(5, 0, 0, 3), 1).unwrap();
    let second = log.append_as_leader(pbatch(5, 0, 3, 2), 1).unwrap();
    assert_eq!((second.base_offset, second.last_offset), (3, 4));
    let retry = log.append_as_leader(pbatch(5, 0, 0, 3), 1).unwrap();
    assert!(retry.duplicate);
    assert_eq!((retry.base_offset, retry.last_offset), (0, 2));
    assert!(!first.duplicate);
    assert_eq!(log.log_end_offset(), 5);
    assert_eq!(read_all(&log, 0).len(), 5);
    assert_eq!(log.producer_state(5), Some((0, 4, 4)));
}

#[test]
fn gaps_stale_epochs_and_lost_state_are_refused_with_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config(1 << 20)).unwrap();
    log.append_as_leader(pbatch(5, 2, 0, 3), 1).unwrap();
    let gap = log.append_as_leader(pbatch(5, 2, 4, 1), 1);
    assert!(
        matches!(
            gap,
            Err(StorageError::OutOfOrderSequence {
                producer_id: 5,
                expected: 3,
                got: 4
            })
        ),
        "{gap:?}"
    );
    let stale = log.append_as_leader(pbatch(5, 1, 3, 1), 1);
    assert!(
        matches!(stale, Err(StorageError::ProducerFenced { .. })),
        "{stale:?}"
    );
    let unknown = log.append_as_leader(pbatch(6, 0, 7, 1), 1);
    assert!(
        matches!(unknown, Err(StorageError::UnknownProducerId { .. })),
        "{unknown:?}"
    );
    assert_eq!(log.log_end_offset(), 3);
    // A batch without a producer id is never checked.
    log.append_as_leader(common::batch(1, 1, 0), 1).unwrap();
    assert_eq!(log.log_end_offset(), 4);
}

/// A clean close leaves the producer state at the log end even when it
/// is empty, so the next open reads no batch to rebuild it (it read the
/// whole active segment of every log without idempotent producers).
#[test]
fn a_clean_close_snapshots_an_empty_producer_state_at_the_log_end() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config(1 << 20)).unwrap();
    for _ in 0..5 {
        log.append_as_leader(common::batch(1, 3, 0), 1).unwrap();
    }
    assert_eq!(log.log_end_offset(), 15);
    log.close().unwrap();
    drop(log);
    assert_eq!(snapshot_files(dir.path()), [format!("{:020}.snapshot", 15)]);
    let log = Log::open(dir.path(), small_config(1 << 20)).unwrap();
    assert_eq!(log.log_end_offset(), 15);
    assert_eq!(log.producer_state(1), None);
}

#[test]
fn state_survives_clean_and_unclean_reopen_using_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments: many rolls, each leaving a snapshot.
    let log = Log::open(dir.path(), small_config(600)).unwrap();
    let mut seq = [0i32; 3];
    for i in 0..60 {
        let pid = (i % 3) as i64 + 10;
        let s = &mut seq[(pid - 10) as usize];
        log.append_as_leader(pbatch(pid, 0, *s, 2), 1).unwrap();
        *s += 2;
    }
    assert!(log.segment_count() > 5, "{}", log.segment_count());
    // One per segment the log rolled to.
    let snapshots = snapshot_files(dir.path());
    assert_eq!(snapshots.len(), log.segment_count() - 1, "{snapshots:?}");
    let expected: Vec<_> = (10..13).map(|pid| log.producer_state(pid)).collect();
    assert_eq!(expected[0], Some((0, 39, 115)));
    log.close_unclean();
    drop(log);

    let log = Log::open(dir.path(), small_config(600)).unwrap();
    let rebuilt: Vec<_> = (10..13).map(|pid| log.producer_state(pid)).collect();
    assert_eq!(rebuilt, expected);
    // The reopened log still deduplicates and sequences.
    assert!(
        log.append_as_leader(pbatch(10, 0, 38, 2), 1)
            .unwrap()
            .duplicate
    );
    assert_eq!(
        log.append_as_leader(pbatch(10, 0, 40, 1), 1)
            .unwrap()
            .base_offset,
        120
    );
    log.close().unwrap();
    drop(log);

    // Without any snapshot the full scan gives the same state.
    let log = Log::open(dir.path(), small_config(600)).unwrap();
    let with_snapshots: Vec<_> = (10..13).map(|pid| log.producer_state(pid)).collect();
    log.close_unclean();
    drop(log);
    for name in snapshot_files(dir.path()) {
        std::fs::remove_file(dir.path().join(name)).unwrap();
    }
    let log = Log::open(dir.path(), small_config(600)).unwrap();
    let scanned: Vec<_> = (10..13).map(|pid| log.producer_state(pid)).collect();
    assert_eq!(scanned, with_snapshots);
    assert_eq!(scanned[0], Some((0, 40, 120)));
}

#[test]
fn truncation_rolls_the_state_back_so_truncated_batches_can_be_resent() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config(600)).unwrap();
    for i in 0..20 {
        log.append_as_leader(pbatch(1, 0, i * 2, 2), 1).unwrap();
    }
    assert_eq!(log.producer_state(1), Some((0, 39, 39)));
    log.truncate_to(11).unwrap();
    assert_eq!(log.log_end_offset(), 10);
    assert_eq!(log.producer_state(1), Some((0, 9, 9)));
    // Batch 10..11 is gone: resending it appends, not a duplicate.
    let again = log.append_as_leader(pbatch(1, 0, 10, 2), 2).unwrap();
    assert!(!again.duplicate);
    assert_eq!(again.base_offset, 10);
    // Truncating below every snapshot rebuilds from the log start.
    log.truncate_to(3).unwrap();
    assert_eq!(log.producer_state(1), Some((0, 1, 1)));
    log.reset_to(50).unwrap();
    assert_eq!(log.producer_state(1), None);
    assert!(snapshot_files(dir.path()).is_empty());
}

/// DeleteRecords inside the active segment (past every snapshot), then a
/// truncation or an unclean reopen: a producer whose batches were all
/// deleted is still known (it used to be forgotten, so its next batch was
/// refused as UNKNOWN_PRODUCER_ID here and taken on other replicas).
#[test]
fn producers_below_a_deleted_log_start_survive_truncation_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config(1 << 20)).unwrap();
    log.append_as_leader(pbatch(7, 0, 0, 2), 1).unwrap();
    for _ in 0..4 {
        log.append_as_leader(plain(2), 1).unwrap();
    }
    log.set_high_watermark(log.log_end_offset());
    assert_eq!(log.delete_records_before(4).unwrap(), 4);
    let reopen = |log: Log| {
        log.close_unclean();
        drop(log);
        Log::open(dir.path(), small_config(1 << 20)).unwrap()
    };
    let log = reopen(log);
    assert_eq!(log.producer_state(7), Some((0, 1, 1)), "after reopen");
    // Truncated below the snapshot just taken (at 10): rebuilt from the
    // log start, 4.
    log.append_as_leader(plain(2), 1).unwrap();
    log.truncate_to(8).unwrap();
    assert_eq!(log.producer_state(7), Some((0, 1, 1)), "after truncation");
    let log = reopen(log);
    assert_eq!(
        log.producer_state(7),
        Some((0, 1, 1)),
        "after truncation and reopen"
    );
    let next = log.append_as_leader(pbatch(7, 0, 2, 1), 1).unwrap();
    assert!(!next.duplicate);
}

#[test]
fn followers_learn_producer_state_from_replicated_batches() {
    let leader_dir = tempfile::tempdir().unwrap();
    let follower_dir = tempfile::tempdir().unwrap();
    let leader = Log::open(leader_dir.path(), small_config(1 << 20)).unwrap();
    let follower = Log::open(follower_dir.path(), small_config(1 << 20)).unwrap();
    for i in 0..4 {
        leader.append_as_leader(pbatch(3, 1, i * 5, 5), 1).unwrap();
    }
    let bytes = leader.read(0, 1 << 20, i64::MAX).unwrap().batches;
    follower.append_as_follower(bytes).unwrap();
    assert_eq!(follower.producer_state(3), leader.producer_state(3));
    // As the new leader it answers the producer's retry as a duplicate.
    let retry = follower.append_as_leader(pbatch(3, 1, 15, 5), 2).unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.base_offset, 15);
}

#[test]
fn idle_producers_expire() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(1 << 20);
    config.producer_id_expiration_ms = 60_000;
    let log = Log::open(dir.path(), config).unwrap();
    let before = wall_ms();
    log.append_as_leader(pbatch(4, 0, 0, 1), 1).unwrap();
    let after = wall_ms();
    // Timed from the append by this clock, whatever the batch's own
    // timestamp (a backfill's records may be years old).
    log.tick(before + 59_000).unwrap();
    assert!(log.producer_state(4).is_some());
    log.tick(after + 60_000).unwrap();
    assert_eq!(log.producer_state(4), None);
    assert!(matches!(
        log.append_as_leader(pbatch(4, 0, 1, 1), 1),
        Err(StorageError::UnknownProducerId { .. })
    ));
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A retry on a LogAppendTime log is answered with the time its first
/// copy was stamped with, as Kafka answers; it was -1, which says
/// CreateTime.
#[test]
fn a_retry_on_log_append_time_gets_the_first_copys_time() {
    let dir = tempfile::tempdir().unwrap();
    let config = runnel_storage::LogConfig {
        timestamp_type: runnel_storage::TimestampType::LogAppendTime,
        ..small_config(1 << 20)
    };
    let log = Log::open(dir.path(), config).unwrap();
    let first = log.append_as_leader(pbatch(5, 0, 0, 3), 1).unwrap();
    assert!(first.log_append_time_ms > 0);
    log.append_as_leader(pbatch(5, 0, 3, 2), 1).unwrap();
    let retry = log.append_as_leader(pbatch(5, 0, 0, 3), 1).unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.log_append_time_ms, first.log_append_time_ms);
}

/// Retention that moves the log start past every producer snapshot (the
/// ones since lost: written at a roll without fsync, then a crash) writes
/// one at the log end: otherwise a rebuild from the log start forgets the
/// producers whose batches retention deleted.
#[test]
fn retention_past_every_snapshot_keeps_the_producers() {
    let dir = tempfile::tempdir().unwrap();
    let one = plain(2).len() as u64;
    let mut config = small_config(one * 2);
    let log = Log::open(dir.path(), config.clone()).unwrap();
    log.append_as_leader(pbatch(7, 0, 0, 2), 1).unwrap();
    for _ in 0..6 {
        log.append_as_leader(plain(2), 1).unwrap();
    }
    log.set_high_watermark(log.log_end_offset());
    assert!(log.segment_count() >= 3);
    log.close_unclean();
    drop(log);
    for name in snapshot_files(dir.path()) {
        std::fs::remove_file(dir.path().join(name)).unwrap();
    }
    config.retention_bytes_max = Some(1);
    let log = Log::open(dir.path(), config.clone()).unwrap();
    log.set_high_watermark(log.log_end_offset());
    assert!(
        log.tick(wall_ms()).unwrap() > 0,
        "retention deleted nothing"
    );
    assert!(log.log_start_offset() > 2);
    log.close_unclean();
    drop(log);
    let log = Log::open(dir.path(), config).unwrap();
    assert_eq!(log.producer_state(7), Some((0, 1, 1)));
}
