//! Behaviour of one partition's `Log` through its public API: append,
//! read, roll, indexes, timestamps, truncation, retention, checkpoints.

mod common;

use bytes::Bytes;
use common::{batch, read_all, small_config, values};
use runnel_storage::{FlushPolicy, Log, LogConfig, RecordBatch, StorageError, TimestampType};

#[test]
fn append_read_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config(1 << 20)).unwrap();
    for i in 0..10 {
        let info = log.append_as_leader(batch(i, 3, 1000), 1).unwrap();
        assert_eq!(info.base_offset, i as i64 * 3);
        assert_eq!(info.last_offset, i as i64 * 3 + 2);
        assert_eq!(info.record_count, 3);
        assert_eq!(info.log_append_time_ms, -1);
    }
    assert_eq!(log.log_end_offset(), 30);
    let all = read_all(&log, 0);
    assert_eq!(all.len(), 30);
    assert_eq!(all[7], (7, b"2:1".to_vec()));
    log.close().unwrap();
    assert!(matches!(
        log.read(0, 1, 1),
        Err(StorageError::Closed { .. })
    ));
    drop(log);
    let log = Log::open(dir.path(), small_config(1 << 20)).unwrap();
    assert_eq!(log.log_end_offset(), 30);
    assert_eq!(read_all(&log, 0), all);
    // Appends continue after a clean reopen.
    assert_eq!(
        log.append_as_leader(batch(99, 1, 5), 1)
            .unwrap()
            .base_offset,
        30
    );
}

#[test]
fn read_bounds_and_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config(1 << 20)).unwrap();
    for i in 0..5 {
        log.append_as_leader(batch(i, 2, 0), 0).unwrap();
    }
    let out_of_range = log.read(11, 100, i64::MAX);
    assert!(matches!(
        out_of_range,
        Err(StorageError::OffsetOutOfRange {
            offset: 11,
            log_start_offset: 0,
            log_end_offset: 10
        })
    ));
    assert!(log.read(10, 100, i64::MAX).unwrap().batches.is_empty());
    // At least one batch even when max_bytes is tiny; starts at the batch
    // holding the offset.
    let one = RecordBatch::parse_all(log.read(3, 1, i64::MAX).unwrap().batches).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].base_offset(), 2);
    // Upper bound is exclusive on each batch's last offset.
    let bounded = RecordBatch::parse_all(log.read(0, 1 << 20, 5).unwrap().batches).unwrap();
    assert_eq!(bounded.last().unwrap().last_offset(), 3);
    assert!(log.read(4, 1 << 20, 5).unwrap().batches.is_empty());
    let r = log.read(0, 1 << 20, i64::MAX).unwrap();
    assert_eq!((r.log_start_offset, r.log_end_offset), (0, 10));
    assert_eq!(RecordBatch::parse_all(r.batches).unwrap().len(), 5);
}

#[test]
fn rolls_by_size_and_reads_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let one = batch(0, 4, 0).len() as u64;
    let log = Log::open(dir.path(), small_config(one * 3)).unwrap();
    for i in 0..10 {
        log.append_as_leader(batch(i, 4, i as i64 * 10), 0).unwrap();
    }
    // Three batches fit exactly; the fourth rolls.
    assert_eq!(log.segment_base_offsets(), vec![0, 12, 24, 36]);
    assert_eq!(log.size_bytes(), one * 10);
    let r = RecordBatch::parse_all(log.read(13, 1 << 20, i64::MAX).unwrap().batches).unwrap();
    assert_eq!(
        r.iter().map(|b| b.base_offset()).collect::<Vec<_>>(),
        vec![12, 16, 20]
    );
    assert_eq!(read_all(&log, 0).len(), 40);
    // An oversized batch still goes into an empty segment.
    let big = small_config(10);
    log.set_config(big);
    log.append_as_leader(batch(11, 4, 0), 0).unwrap();
    log.append_as_leader(batch(12, 4, 0), 0).unwrap();
    assert_eq!(log.segment_count(), 6);
    log.close().unwrap();
    let log = Log::open(dir.path(), small_config(one * 3)).unwrap();
    assert_eq!(log.segment_count(), 6);
    assert_eq!(read_all(&log, 0).len(), 48);
}

#[test]
fn offset_for_timestamp_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let one = batch(0, 4, 0).len() as u64;
    let log = Log::open(dir.path(), small_config(one * 2)).unwrap();
    for i in 0..10 {
        log.append_as_leader(batch(i, 4, 1000 + i as i64 * 10), 0)
            .unwrap();
    }
    assert_eq!(log.offset_for_timestamp(0).unwrap(), Some((0, 1000)));
    assert_eq!(log.offset_for_timestamp(1042).unwrap(), Some((18, 1042)));
    assert_eq!(log.offset_for_timestamp(1045).unwrap(), Some((20, 1050)));
    assert_eq!(log.offset_for_timestamp(1093).unwrap(), Some((39, 1093)));
    assert_eq!(log.offset_for_timestamp(1094).unwrap(), None);
    log.close().unwrap();
    let log = Log::open(dir.path(), small_config(one * 2)).unwrap();
    assert_eq!(log.offset_for_timestamp(1045).unwrap(), Some((20, 1050)));
}

#[test]
fn log_append_time_stamps_batches() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        timestamp_type: TimestampType::LogAppendTime,
        ..small_config(1 << 20)
    };
    let log = Log::open(dir.path(), config).unwrap();
    let info = log.append_as_leader(batch(0, 3, 5), 0).unwrap();
    assert!(info.log_append_time_ms > 1_600_000_000_000);
    let b = RecordBatch::parse_all(log.read(0, 1 << 20, i64::MAX).unwrap().batches).unwrap();
    assert!(b[0].is_log_append_time());
    assert_eq!(b[0].max_timestamp(), info.log_append_time_ms);
    assert!(b[0]
        .records()
        .unwrap()
        .iter()
        .all(|r| r.timestamp_ms == info.log_append_time_ms));
}

#[test]
fn leader_validation_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        message_bytes_max: 200,
        ..small_config(1 << 20)
    };
    let log = Log::open(dir.path(), config).unwrap();
    let big = batch(0, 50, 0);
    assert!(matches!(
        log.append_as_leader(big, 0),
        Err(StorageError::RecordTooLarge { max: 200, .. })
    ));
    assert!(matches!(
        log.append_as_leader(runnel_storage::BatchBuilder::new().build(), 0),
        Err(StorageError::EmptyBatch)
    ));
    let mut bad = batch(0, 2, 0);
    let at = bad.len() - 1;
    bad[at] ^= 0xff;
    assert!(matches!(
        log.append_as_leader(bad, 0),
        Err(StorageError::CorruptBatch { .. })
    ));
    let mut short = batch(0, 2, 0);
    short.truncate(40);
    assert!(matches!(
        log.append_as_leader(short, 0),
        Err(StorageError::CorruptBatch { .. })
    ));
    assert_eq!(log.log_end_offset(), 0);
}

#[test]
fn follower_appends_must_be_contiguous_and_track_epochs() {
    let leader_dir = tempfile::tempdir().unwrap();
    let follower_dir = tempfile::tempdir().unwrap();
    let leader = Log::open(leader_dir.path(), small_config(1 << 20)).unwrap();
    let follower = Log::open(follower_dir.path(), small_config(1 << 20)).unwrap();
    leader.append_as_leader(batch(0, 2, 0), 1).unwrap();
    leader.append_as_leader(batch(1, 2, 0), 1).unwrap();
    leader.append_as_leader(batch(2, 2, 0), 3).unwrap();
    let all = leader.read(0, 1 << 20, i64::MAX).unwrap().batches;
    let tail = leader.read(2, 1 << 20, i64::MAX).unwrap().batches;
    assert!(matches!(
        follower.append_as_follower(tail),
        Err(StorageError::NonContiguous {
            base_offset: 2,
            log_end_offset: 0
        })
    ));
    let info = follower.append_as_follower(all).unwrap();
    assert_eq!(
        (info.base_offset, info.last_offset, info.record_count),
        (0, 5, 6)
    );
    assert_eq!(follower.latest_epoch(), Some((3, 4)));
    assert_eq!(follower.end_offset_for_epoch(1), Some((1, 4)));
    assert_eq!(follower.end_offset_for_epoch(2), Some((1, 4)));
    assert_eq!(follower.end_offset_for_epoch(3), Some((3, 6)));
    assert_eq!(follower.end_offset_for_epoch(0), None);
    assert!(matches!(
        follower.append_as_follower(Bytes::new()),
        Err(StorageError::EmptyBatch)
    ));
    // Divergence: truncate to the end of epoch 1, epochs follow.
    follower.truncate_to(4).unwrap();
    assert_eq!(follower.log_end_offset(), 4);
    assert_eq!(follower.latest_epoch(), Some((1, 0)));
    follower.close().unwrap();
    let follower = Log::open(follower_dir.path(), small_config(1 << 20)).unwrap();
    assert_eq!(follower.latest_epoch(), Some((1, 0)));
    assert_eq!(follower.log_end_offset(), 4);
}

#[test]
fn truncate_mid_batch_and_across_closed_segments() {
    let dir = tempfile::tempdir().unwrap();
    let one = batch(0, 3, 0).len() as u64;
    let log = Log::open(dir.path(), small_config(one * 2)).unwrap();
    for i in 0..8 {
        log.append_as_leader(batch(i, 3, 0), 0).unwrap();
    }
    assert_eq!(log.segment_base_offsets(), vec![0, 6, 12, 18]);
    // Hold a zero-copy slice of a closed segment across the truncation.
    let held = log.read(6, 1 << 20, i64::MAX).unwrap().batches;
    log.set_high_watermark(100);
    assert_eq!(log.high_watermark(), 24);
    log.truncate_to(10).unwrap();
    // Offset 10 is inside batch 9..=11: the whole batch goes.
    assert_eq!(log.log_end_offset(), 9);
    assert_eq!(log.high_watermark(), 9);
    assert_eq!(log.segment_base_offsets(), vec![0, 6]);
    assert_eq!(values(held).len(), 6);
    assert_eq!(read_all(&log, 0).len(), 9);
    log.append_as_leader(batch(50, 3, 0), 0).unwrap();
    assert_eq!(read_all(&log, 0)[9], (9, b"50:0".to_vec()));
    log.close().unwrap();
    let log = Log::open(dir.path(), small_config(one * 2)).unwrap();
    assert_eq!(log.log_end_offset(), 12);
    assert_eq!(read_all(&log, 0)[9], (9, b"50:0".to_vec()));
    // Truncating below the start empties the log and restarts it there.
    log.truncate_to(0).unwrap();
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (0, 0));
    assert!(log.read(0, 100, i64::MAX).unwrap().batches.is_empty());
}

#[test]
fn delete_records_before_and_retention() {
    let dir = tempfile::tempdir().unwrap();
    let one = batch(0, 2, 0).len() as u64;
    let log = Log::open(dir.path(), small_config(one * 2)).unwrap();
    for i in 0..10 {
        log.append_as_leader(batch(i, 2, 1000 + i as i64), 0)
            .unwrap();
    }
    assert_eq!(log.segment_count(), 5);
    // Not above the high watermark.
    log.set_high_watermark(5);
    assert!(matches!(
        log.delete_records_before(6),
        Err(StorageError::AboveHighWatermark {
            offset: 6,
            high_watermark: 5
        })
    ));
    assert_eq!(log.log_start_offset(), 0);
    assert_eq!(log.delete_records_before(5).unwrap(), 5);
    assert_eq!(log.log_start_offset(), 5);
    assert_eq!(log.segment_base_offsets(), vec![4, 8, 12, 16]);
    assert!(matches!(
        log.read(4, 10, i64::MAX),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    // Reading at the start inside a batch returns that batch.
    assert_eq!(values(log.read(5, 1, i64::MAX).unwrap().batches)[0].0, 4);
    assert!(log.delete_records_before(21).is_err());
    assert_eq!(log.delete_records_before(3).unwrap(), 5);
    // Retention only deletes segments wholly below the high watermark.
    // Here retention by bytes would delete segments 4..8 and 8..12: none
    // while the high watermark is inside the first, that one once it has
    // reached its end, the second once it is at the log end.
    log.set_config(LogConfig {
        retention_bytes_max: Some(one * 3),
        ..small_config(one * 2)
    });
    log.set_high_watermark(7);
    assert_eq!(log.tick(0).unwrap(), 0);
    log.set_high_watermark(8);
    assert_eq!(log.tick(0).unwrap(), 1);
    assert_eq!(log.log_start_offset(), 8);
    assert_eq!(log.high_watermark(), 8);
    log.set_high_watermark(log.log_end_offset());
    assert_eq!(log.tick(0).unwrap(), 1);
    assert_eq!(log.segment_base_offsets(), vec![12, 16]);
    // What retention by time finds below.
    let log = {
        log.close().unwrap();
        let _ = std::fs::remove_dir_all(dir.path());
        let log = Log::open(dir.path(), small_config(one * 2)).unwrap();
        for i in 0..10 {
            log.append_as_leader(batch(i, 2, 1000 + i as i64), 0)
                .unwrap();
        }
        log.set_high_watermark(log.log_end_offset());
        log.delete_records_before(5).unwrap();
        log
    };
    log.set_config(LogConfig {
        retention_bytes_max: Some(one * 5),
        ..small_config(one * 2)
    });
    assert_eq!(log.tick(0).unwrap(), 1);
    assert_eq!(log.segment_base_offsets(), vec![8, 12, 16]);
    assert_eq!(log.log_start_offset(), 8);
    // Retention by time uses each segment's largest timestamp.
    log.set_config(LogConfig {
        retention_ms_max: Some(100),
        ..small_config(one * 2)
    });
    assert_eq!(log.tick(1107).unwrap(), 1); // segment 8..12 max ts 1005+1
    assert_eq!(log.segment_base_offsets(), vec![12, 16]);
    // The active segment too, once every segment before it went and its
    // own records expired (all replicated): it is rolled and deleted, as
    // in Kafka (it used to stay until it rolled by age).
    log.set_high_watermark(18);
    assert_eq!(log.tick(1_000_000).unwrap(), 1, "not all replicated");
    assert_eq!(log.segment_base_offsets(), vec![16]);
    log.set_high_watermark(20);
    assert_eq!(log.tick(1_000_000).unwrap(), 1);
    assert_eq!(log.segment_base_offsets(), vec![20]);
    assert_eq!(log.log_start_offset(), 20);
    assert_eq!(log.log_end_offset(), 20);
    log.close().unwrap();
    let log = Log::open(dir.path(), small_config(one * 2)).unwrap();
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (20, 20));
    assert_eq!(
        log.append_as_leader(batch(20, 2, 2000), 0)
            .unwrap()
            .base_offset,
        20
    );
}

/// Records without timestamps (-1, as a raw client batch may carry) are
/// judged by retention.ms from their segment file's last write, as in
/// Kafka: such segments were deleted at the first tick after they
/// rolled, whatever retention.ms said.
#[test]
fn retention_by_time_of_records_without_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let one = batch(0, 2, -1).len() as u64;
    let log = Log::open(dir.path(), small_config(one * 2)).unwrap();
    for i in 0..6 {
        let mut b = runnel_storage::BatchBuilder::new();
        b.push(-1, None, Some(format!("v{i}").as_bytes()), &[]);
        b.push(-1, None, Some(b"w"), &[]);
        log.append_as_leader(b.build().freeze(), 0).unwrap();
    }
    log.set_high_watermark(log.log_end_offset());
    let segments = log.segment_count();
    assert!(segments > 1);
    log.set_config(LogConfig {
        retention_ms_max: Some(3_600_000),
        ..small_config(one * 2)
    });
    assert_eq!(log.tick(now_ms()).unwrap(), 0, "written just now");
    assert_eq!(log.segment_count(), segments);
    // The active segment too: its file was last written as long ago.
    assert_eq!(log.tick(now_ms() + 7_200_000).unwrap(), segments);
    assert_eq!(log.log_start_offset(), log.log_end_offset());
}

#[test]
fn roll_by_age_on_tick_and_append() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_ms_max: Some(50),
        ..small_config(1 << 20)
    };
    let log = Log::open(dir.path(), config).unwrap();
    // Age is wall-clock time since the segment's first append, whatever
    // the records' timestamps: here a backfill stamped in 1970, which
    // rolled a segment per append when age was measured from them.
    let before = now_ms();
    log.append_as_leader(batch(0, 1, 1000), 0).unwrap();
    let after = now_ms();
    log.append_as_leader(batch(1, 1, 1000), 0).unwrap();
    assert_eq!(log.segment_count(), 1);
    assert_eq!(log.tick(before + 40).unwrap(), 0);
    assert_eq!(log.segment_count(), 1);
    log.tick(after + 51).unwrap();
    assert_eq!(log.segment_base_offsets(), vec![0, 2]);
    // An empty active segment never rolls.
    log.tick(after + 10_000).unwrap();
    assert_eq!(log.segment_count(), 2);
}

/// A segment wholly below the log start (its records deleted by
/// DeleteRecords after it was written) is removed by the next tick, the
/// active one too (rolled first): it used to stay until time or size
/// retention took it.
#[test]
fn segments_below_the_log_start_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let one = batch(0, 2, 1000).len() as u64;
    let log = Log::open(dir.path(), small_config(one * 2)).unwrap();
    for i in 0..5 {
        log.append_as_leader(batch(i, 2, now_ms()), 0).unwrap();
    }
    log.set_high_watermark(log.log_end_offset());
    assert_eq!(log.segment_base_offsets(), vec![0, 4, 8]);
    assert_eq!(log.delete_records_before(10).unwrap(), 10);
    assert_eq!(log.segment_base_offsets(), vec![8]);
    assert_eq!(log.tick(now_ms()).unwrap(), 1);
    assert_eq!(log.segment_base_offsets(), vec![10]);
    assert_eq!(log.log_start_offset(), 10);
}

/// A roll by age that fails (here its producer snapshot cannot be
/// written: a directory holds its name, as a full disk would refuse the
/// file) does not stop the tick's retention, which frees the disk: the
/// tick used to return at the roll's error, on every tick.
#[test]
fn a_failed_roll_does_not_stop_retention() {
    let dir = tempfile::tempdir().unwrap();
    let one = batch(0, 2, 1000).len() as u64;
    let config = LogConfig {
        segment_ms_max: Some(50),
        ..small_config(one * 2)
    };
    let log = Log::open(dir.path(), config.clone()).unwrap();
    for i in 0..5 {
        log.append_as_leader(batch(i, 2, 1000 + i as i64), 0)
            .unwrap();
    }
    log.set_high_watermark(log.log_end_offset());
    assert_eq!(log.segment_base_offsets(), vec![0, 4, 8]);
    // The active segment (8..10) is due to roll at 10.
    std::fs::create_dir(dir.path().join(format!("{:020}.snapshot", 10))).unwrap();
    log.set_config(LogConfig {
        retention_ms_max: Some(100),
        ..config
    });
    assert!(log.tick(now_ms() + 60_000).is_err(), "the roll failed");
    assert_eq!(log.segment_base_offsets(), vec![8], "retention ran");
    assert_eq!(log.log_start_offset(), 8);
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn high_watermark_and_recovery_point_persist() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        flush: FlushPolicy::EveryBatch,
        ..small_config(1 << 20)
    };
    let log = Log::open(dir.path(), config.clone()).unwrap();
    for i in 0..4 {
        log.append_as_leader(batch(i, 1, 0), 0).unwrap();
    }
    log.set_high_watermark(-5);
    assert_eq!(log.high_watermark(), 0);
    log.set_high_watermark(3);
    log.flush().unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("recovery-point")).unwrap(),
        "0\n4\n"
    );
    log.close_unclean();
    drop(log);
    let log = Log::open(dir.path(), config).unwrap();
    assert_eq!(log.high_watermark(), 3);
    assert_eq!(log.log_end_offset(), 4);
}

#[test]
fn interval_flush_runs_in_tick_and_moves_the_recovery_point() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        flush: FlushPolicy::Interval {
            messages: None,
            ms: Some(1000),
        },
        ..small_config(1 << 20)
    };
    let log = Log::open(dir.path(), config).unwrap();
    for i in 0..4 {
        log.append_as_leader(batch(i, 1, 0), 0).unwrap();
    }
    let recovery_point = || std::fs::read_to_string(dir.path().join("recovery-point")).ok();
    // Appends never fsync for flush.ms themselves.
    assert_ne!(recovery_point().as_deref(), Some("0\n4\n"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    log.tick(now + 500).unwrap();
    assert_ne!(recovery_point().as_deref(), Some("0\n4\n"), "flushed early");
    log.tick(now + 2_000).unwrap();
    assert_eq!(recovery_point().as_deref(), Some("0\n4\n"));
    // A truncation after the flush keeps the recovery point at the end.
    log.truncate_to(2).unwrap();
    log.tick(now + 4_000).unwrap();
    assert_eq!(recovery_point().as_deref(), Some("0\n2\n"));
}

#[test]
fn rolled_segments_are_flushed_in_tick_whatever_the_flush_policy() {
    // flush.ms = -1 (small_config's policy): no interval flush ever runs,
    // yet tick flushes what has rolled and moves the recovery point to the
    // active segment, so a crash restart scans only the active segment.
    let dir = tempfile::tempdir().unwrap();
    let one = batch(0, 2, 0).len() as u64;
    let config = small_config(one * 4);
    let log = Log::open(dir.path(), config.clone()).unwrap();
    for i in 0..10 {
        log.append_as_leader(batch(i * 2, 2, 0), 0).unwrap();
    }
    let bases = log.segment_base_offsets();
    assert!(bases.len() >= 3, "{bases:?}");
    let active = *bases.last().unwrap();
    let recovery_point = || std::fs::read_to_string(dir.path().join("recovery-point")).ok();
    assert_eq!(
        recovery_point().as_deref(),
        Some("0\n0\n"),
        "appends do not flush"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    log.tick(now).unwrap();
    assert_eq!(recovery_point(), Some(format!("0\n{active}\n")));
    log.close_unclean();
    drop(log);
    // Damage inside the first, flushed segment. A restart trusts it (a
    // read reports it), rather than scanning it and cutting the log there.
    let path = dir.path().join("00000000000000000000.log");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(2 * one - 2) as usize] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();
    let log = Log::open(dir.path(), config).unwrap();
    assert_eq!(log.log_end_offset(), 20);
    assert!(matches!(
        log.read(2, 1 << 20, i64::MAX),
        Err(StorageError::CorruptSegment { .. })
    ));
}

#[test]
fn a_rolled_segment_gives_back_its_reserved_blocks_in_tick_not_in_the_roll() {
    // Freeing blocks can wait for the device (a file system mounted with
    // `discard`), and a roll runs inside an append: the rolled segment
    // keeps the blocks reserved past its end until the tick's flush. A
    // segment rolled by age holds most of its 1 MiB first reservation.
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        preallocate: true,
        segment_ms_max: Some(60_000),
        ..small_config(64 << 20)
    };
    let log = Log::open(dir.path(), config).unwrap();
    let path = dir.path().join("00000000000000000000.log");
    let allocated = || std::fs::metadata(&path).unwrap().blocks() * 512;
    // The next append is stamped 61 s after the first: too old.
    log.append_as_leader(batch(0, 50, 0), 0).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    if allocated() < len + (512 << 10) {
        return; // this file system does not reserve blocks (no fallocate)
    }
    log.append_as_leader(batch(1, 50, 61_000), 0).unwrap();
    assert_eq!(log.segment_count(), 2, "rolled by age");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
    assert!(
        allocated() >= len + (512 << 10),
        "the roll kept the reservation: {} bytes allocated for {len}",
        allocated()
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    log.tick(now).unwrap();
    assert!(
        allocated() < len + (64 << 10),
        "{} bytes allocated for {len}",
        allocated()
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
    assert_eq!(read_all(&log, 0).len(), 100);
}

#[test]
fn corrupt_closed_segment_is_reported_with_path_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let one = batch(0, 2, 0).len() as u64;
    let log = Log::open(dir.path(), small_config(one * 4)).unwrap();
    for i in 0..8 {
        log.append_as_leader(batch(i, 2, 0), 0).unwrap();
    }
    log.close().unwrap();
    drop(log);
    let path = dir.path().join("00000000000000000000.log");
    let mut bytes = std::fs::read(&path).unwrap();
    // Flip a value byte inside the third batch (offsets 4..=5).
    let position = 2 * one;
    bytes[(position + one - 2) as usize] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();
    let log = Log::open(dir.path(), small_config(one * 4)).unwrap();
    assert_eq!(log.log_end_offset(), 16);
    match log.read(4, 1 << 20, i64::MAX) {
        Err(StorageError::CorruptSegment {
            path: p,
            position: pos,
            ..
        }) => {
            assert_eq!(p, path);
            assert_eq!(pos, position);
        }
        other => panic!("expected CorruptSegment, got {other:?}"),
    }
    // Other batches stay readable; a read from before the corrupt batch
    // gets the batches up to it (it failed as a whole, so a consumer or
    // follower could not even reach the damage).
    assert_eq!(values(log.read(0, 1, i64::MAX).unwrap().batches).len(), 2);
    assert_eq!(
        values(log.read(0, 1 << 20, i64::MAX).unwrap().batches).len(),
        4
    );
    assert_eq!(
        values(log.read(8, 1 << 20, i64::MAX).unwrap().batches).len(),
        8
    );
}

#[test]
fn missing_or_garbage_indexes_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let one = batch(0, 2, 0).len() as u64;
    let log = Log::open(dir.path(), small_config(one * 10)).unwrap();
    for i in 0..30 {
        log.append_as_leader(batch(i, 2, 100 + i as i64), 0)
            .unwrap();
    }
    log.close().unwrap();
    drop(log);
    std::fs::remove_file(dir.path().join("00000000000000000000.index")).unwrap();
    std::fs::write(dir.path().join("00000000000000000020.index"), [0xffu8; 24]).unwrap();
    std::fs::write(
        dir.path().join("00000000000000000020.timeindex"),
        [0x1u8; 7],
    )
    .unwrap();
    let log = Log::open(dir.path(), small_config(one * 10)).unwrap();
    assert_eq!(log.log_end_offset(), 60);
    assert_eq!(read_all(&log, 0).len(), 60);
    assert_eq!(values(log.read(25, 1, i64::MAX).unwrap().batches)[0].0, 24);
    assert_eq!(log.offset_for_timestamp(113).unwrap(), Some((25, 113)));
}

#[test]
fn reset_to_starts_an_empty_log_at_the_offset_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config(4096)).unwrap();
    for i in 0..200 {
        log.append_as_leader(batch(i, 5, 1_000), 3).unwrap();
    }
    log.set_high_watermark(100);
    assert!(log.segment_count() > 1);
    log.reset_to(5000).unwrap();
    assert_eq!(
        (
            log.log_start_offset(),
            log.log_end_offset(),
            log.high_watermark()
        ),
        (5000, 5000, 5000)
    );
    assert_eq!(log.latest_epoch(), None);
    assert_eq!(log.segment_base_offsets(), vec![5000]);
    // A follower append continues at the new start.
    let mut b = batch(99, 2, 2_000);
    runnel_storage::batch::set_base_offset(&mut b, 5000);
    runnel_storage::batch::set_leader_epoch(&mut b, 7);
    log.append_as_follower(b.freeze()).unwrap();
    assert_eq!(log.log_end_offset(), 5002);
    assert_eq!(log.latest_epoch(), Some((7, 5000)));
    log.close().unwrap();
    let log = Log::open(dir.path(), small_config(4096)).unwrap();
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (5000, 5002));
    assert_eq!(read_all(&log, 5000).len(), 2);
    assert!(matches!(
        log.read(4999, 1024, 5002),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
}

/// A replica that stopped leading refuses leader appends from its old
/// epoch (a produce request queued before the change), and takes them
/// again only from a newer epoch.
#[test]
fn leader_appends_below_the_fence_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config(1 << 20)).unwrap();
    log.append_as_leader(batch(0, 2, 1000), 3).unwrap();
    log.fence_leader_appends(4);
    assert!(matches!(
        log.append_as_leader(batch(1, 2, 1000), 3),
        Err(StorageError::FencedLeaderEpoch { epoch: 3, fence: 4 })
    ));
    assert_eq!(log.log_end_offset(), 2);
    // Only ever raised.
    log.fence_leader_appends(2);
    assert!(log.append_as_leader(batch(1, 2, 1000), 3).is_err());
    // Leading again, in a newer epoch.
    assert_eq!(
        log.append_as_leader(batch(2, 2, 1000), 5)
            .unwrap()
            .base_offset,
        2
    );
    // Followers' appends are not leader appends.
    let follower = tempfile::tempdir().unwrap();
    let copy = Log::open(follower.path(), small_config(1 << 20)).unwrap();
    copy.fence_leader_appends(9);
    let read = log.read(0, 1 << 20, i64::MAX).unwrap();
    copy.append_as_follower(read.batches).unwrap();
    assert_eq!(copy.log_end_offset(), 4);
}

/// A replication round of the epoch a replica followed in must not cut
/// or extend its log once it leads: truncating a new leader to the old
/// leader's epoch end lost what it had appended.
#[test]
fn follower_writes_of_an_epoch_the_replica_led_in_are_refused() {
    let source_dir = tempfile::tempdir().unwrap();
    let source = Log::open(source_dir.path(), small_config(1 << 20)).unwrap();
    source.append_as_leader(batch(0, 2, 1000), 1).unwrap();
    let from_source = source.read(0, 1 << 20, i64::MAX).unwrap().batches;

    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config(1 << 20)).unwrap();
    // Following the leader of epoch 1.
    log.append_following(1, from_source.clone()).unwrap();
    assert_eq!(log.log_end_offset(), 2);
    // Leading in epoch 2.
    log.fence_follower_writes(2);
    log.append_as_leader(batch(1, 2, 1000), 2).unwrap();
    for epoch in [1, 2] {
        assert!(matches!(
            log.truncate_following(epoch, 2),
            Err(StorageError::FencedFollowerEpoch { fence: 2, .. })
        ));
        assert!(matches!(
            log.reset_following(epoch, 0),
            Err(StorageError::FencedFollowerEpoch { fence: 2, .. })
        ));
    }
    assert_eq!(log.log_end_offset(), 4, "nothing cut");
    // A leader append raises the fence by itself (produce may run before
    // the role change is applied).
    log.append_as_leader(batch(2, 2, 1000), 3).unwrap();
    assert!(matches!(
        log.truncate_following(3, 4),
        Err(StorageError::FencedFollowerEpoch { epoch: 3, fence: 3 })
    ));
    // Following a later leader again: allowed.
    log.truncate_following(4, 4).unwrap();
    assert_eq!(log.log_end_offset(), 4);
    let fresh = tempfile::tempdir().unwrap();
    let copy = Log::open(fresh.path(), small_config(1 << 20)).unwrap();
    copy.fence_follower_writes(1);
    assert!(matches!(
        copy.append_following(1, from_source.clone()),
        Err(StorageError::FencedFollowerEpoch { epoch: 1, fence: 1 })
    ));
    copy.append_following(5, from_source).unwrap();
}

/// An offset index whose middle entry points past the batch it names
/// (a corrupt entry; an open checks only the first and the last) is not
/// trusted for that read: the segment is scanned from its start instead.
/// Trusted, the read began at a later batch and a reader skipped the
/// records in between without a word.
#[test]
fn an_index_entry_pointing_too_far_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let one = batch(0, 2, 0).len() as u64;
    let config = || small_config(1 << 20);
    let log = Log::open(dir.path(), config()).unwrap();
    for i in 0..30 {
        log.append_as_leader(batch(i, 2, 100 + i as i64), 0)
            .unwrap();
    }
    log.close().unwrap();
    drop(log);
    let path = dir.path().join("00000000000000000000.index");
    let mut index = std::fs::read(&path).unwrap();
    let entries: Vec<(u32, u32)> = index
        .chunks_exact(8)
        .map(|e| {
            (
                u32::from_be_bytes(e[..4].try_into().unwrap()),
                u32::from_be_bytes(e[4..].try_into().unwrap()),
            )
        })
        .enumerate()
        .take_while(|(i, e)| *i == 0 || *e != (0, 0))
        .map(|(_, e)| e)
        .collect();
    assert!(entries.len() > 4, "{entries:?} ({one} bytes a batch)");
    // The third entry points at the fifth one's batch.
    let (_, later) = entries[4];
    index[2 * 8 + 4..2 * 8 + 8].copy_from_slice(&later.to_be_bytes());
    std::fs::write(&path, index).unwrap();
    let log = Log::open(dir.path(), config()).unwrap();
    let wanted = i64::from(entries[2].0);
    let read = values(log.read(wanted, 1, i64::MAX).unwrap().batches);
    assert!(
        read.first().is_some_and(|(o, _)| *o <= wanted),
        "asked {wanted}, read from {:?}",
        read.first()
    );
    assert_eq!(read_all(&log, 0).len(), 60);
}

/// A clean open finds the recovery point at the log end (the close wrote
/// it) and leaves the file alone: rewritten, each open of each partition
/// cost two fsyncs and a rename, one partition after another.
#[test]
fn a_clean_open_does_not_rewrite_the_recovery_point() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config(1 << 20)).unwrap();
    for i in 0..4 {
        log.append_as_leader(batch(i, 1, 0), 0).unwrap();
    }
    log.close().unwrap();
    drop(log);
    let path = dir.path().join("recovery-point");
    let inode = std::fs::metadata(&path).unwrap().ino();
    let log = Log::open(dir.path(), small_config(1 << 20)).unwrap();
    assert_eq!(log.log_end_offset(), 4);
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "0\n4\n");
}
