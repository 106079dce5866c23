//! One writer, several readers: readers must only ever see whole, valid
//! (CRC-checked), contiguous batches with the content the writer wrote at
//! those offsets, while the writer appends, rolls segments and deletes old
//! ones.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use runnel_storage::{BatchBuilder, Log, RecordBatch, StorageError};

fn batch_at(base: i64, n: usize) -> bytes::BytesMut {
    let mut b = BatchBuilder::new();
    for i in 0..n {
        let offset = base + i as i64;
        let value = format!("o{offset}").repeat(1 + (offset % 7) as usize);
        b.push(offset, None, Some(value.as_bytes()), &[]);
    }
    b.build()
}

#[test]
fn readers_see_only_whole_contiguous_batches() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), common::small_config(16 * 1024)).unwrap();
    let done = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    std::thread::scope(|s| {
        for reader in 0..3u64 {
            let (log, done, reads) = (&log, &done, &reads);
            s.spawn(move || {
                let mut state = reader.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                while !done.load(Ordering::Acquire) {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    // The start first: read after the end, it could be
                    // past it (the writer appended and deleted records in
                    // between), and the range below divided by zero.
                    let start = log.log_start_offset();
                    let end = log.log_end_offset();
                    if end < start {
                        continue;
                    }
                    let offset = start + (state % (end - start + 1) as u64) as i64;
                    let bound = if state % 3 == 0 {
                        log.high_watermark()
                    } else {
                        i64::MAX
                    };
                    let r = match log.read(offset, (state % 8192) as usize, bound) {
                        Ok(r) => r,
                        // Retention or truncation raced with the choice of offset.
                        Err(StorageError::OffsetOutOfRange { .. }) => continue,
                        Err(e) => panic!("read({offset}) failed: {e}"),
                    };
                    let batches = RecordBatch::parse_all(r.batches).expect("whole, valid batches");
                    let mut expected = None;
                    for b in &batches {
                        assert!(b.last_offset() < bound);
                        if let Some(e) = expected {
                            assert_eq!(b.base_offset(), e, "contiguous");
                        } else {
                            assert!(
                                b.base_offset() <= offset && offset <= b.last_offset(),
                                "first batch holds {offset}"
                            );
                        }
                        expected = Some(b.last_offset() + 1);
                        for rec in b.records().unwrap() {
                            let want =
                                format!("o{}", rec.offset).repeat(1 + (rec.offset % 7) as usize);
                            assert_eq!(rec.value.as_deref(), Some(want.as_bytes()));
                        }
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        for i in 0..3000usize {
            let base = log.log_end_offset();
            log.append_as_leader(batch_at(base, 1 + i % 9), 1).unwrap();
            if i % 10 == 0 {
                log.set_high_watermark(log.log_end_offset() - 3);
            }
            if i % 170 == 169 {
                // A leader change: drop the last few records (maybe a
                // whole closed segment's tail) and write them again.
                log.truncate_to(log.log_end_offset() - 12).unwrap();
            }
            if i % 300 == 299 {
                let keep_from = log.log_end_offset() - 200;
                log.delete_records_before(keep_from).unwrap();
            }
        }
        done.store(true, Ordering::Release);
    });
    assert!(reads.load(Ordering::Relaxed) > 0);
    // Segments were rolled and old ones deleted under the readers.
    assert!(log.segment_base_offsets()[0] > 0);
}
