//! Crash recovery: damage the tail of the active segment (truncate it or
//! scribble on it at a seeded random position), reopen without a clean
//! shutdown, and check that recovery keeps every batch written wholly
//! before the damage and nothing after it.

mod common;

use common::{batch, read_all, small_config};
use proptest::prelude::*;
use runnel_storage::{Log, RecordBatch};

/// (start position, end position, last offset) of each batch in a file.
fn batch_spans(file: &[u8]) -> Vec<(usize, usize, i64)> {
    let batches = RecordBatch::parse_all(bytes::Bytes::copy_from_slice(file)).unwrap();
    let mut position = 0;
    batches
        .iter()
        .map(|b| {
            let span = (position, position + b.size_bytes(), b.last_offset());
            position += b.size_bytes();
            span
        })
        .collect()
}

#[derive(Clone, Debug)]
enum Damage {
    /// Cut the file at this fraction of its length.
    Truncate(f64),
    /// XOR up to 8 bytes at this fraction with a non-zero pattern.
    Scribble(f64, u8),
}

fn run(batch_count: usize, flush_after: usize, damage: Damage) {
    let dir = tempfile::tempdir().unwrap();
    let one = batch(0, 3, 0).len() as u64;
    let config = small_config(one * 8);
    let log = Log::open(dir.path(), config.clone()).unwrap();
    for i in 0..batch_count {
        log.append_as_leader(batch(i as u64, 3, i as i64), 2)
            .unwrap();
        if i + 1 == flush_after {
            log.flush().unwrap();
        }
    }
    let before = read_all(&log, 0);
    let active_base = *log.segment_base_offsets().last().unwrap();
    let active = log.segment_path_for(active_base).unwrap();
    log.close_unclean();
    drop(log);

    let mut file = std::fs::read(&active).unwrap();
    let spans = batch_spans(&file);
    let cut = match damage {
        Damage::Truncate(f) => {
            let at = ((file.len() as f64) * f) as usize;
            file.truncate(at);
            at
        }
        Damage::Scribble(f, pattern) => {
            let at = (((file.len() - 1) as f64) * f) as usize;
            let end = (at + 8).min(file.len());
            for b in &mut file[at..end] {
                *b ^= pattern | 1;
            }
            at
        }
    };
    std::fs::write(&active, &file).unwrap();
    // Every batch ending at or before the damage survives; none after.
    let last_kept = spans
        .iter()
        .take_while(|(_, end, _)| *end <= cut)
        .last()
        .map_or(active_base - 1, |s| s.2);
    let log = Log::open(dir.path(), config.clone()).unwrap();
    assert_eq!(
        log.log_end_offset(),
        last_kept + 1,
        "damage at {cut} of {}",
        spans.last().unwrap().1
    );
    let expected: Vec<_> = before
        .iter()
        .filter(|(o, _)| *o <= last_kept)
        .cloned()
        .collect();
    assert_eq!(read_all(&log, 0), expected);
    // The log keeps working after recovery, across another reopen.
    let next = log.append_as_leader(batch(999, 2, 0), 3).unwrap();
    assert_eq!(next.base_offset, last_kept + 1);
    log.close_unclean();
    drop(log);
    let log = Log::open(dir.path(), config).unwrap();
    assert_eq!(log.log_end_offset(), last_kept + 3);
    assert_eq!(read_all(&log, 0).len(), expected.len() + 2);
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (0.0..1.0f64).prop_map(Damage::Truncate),
        (0.0..1.0f64, any::<u8>()).prop_map(|(f, p)| Damage::Scribble(f, p)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_2026), ..ProptestConfig::default() })]

    #[test]
    fn recovery_keeps_exactly_the_whole_batches_before_damage(
        batch_count in 1usize..30,
        flush_after in 0usize..30,
        damage in damage(),
    ) {
        run(batch_count, flush_after, damage);
    }
}

#[test]
fn every_position_of_a_small_tail() {
    // Deterministic sweep: cut the active segment every few bytes over its
    // last two batches, and at every byte of the last batch's header.
    let one = batch(0, 3, 0).len();
    let positions = (0..=2 * one).step_by(7).chain(one - 70..one - 50);
    for k in positions {
        let total = one * 5;
        run(21, 0, Damage::Truncate((total - k) as f64 / total as f64));
    }
}

/// A crash that loses a rolled segment's last batches but keeps the next
/// segment's file leaves a gap in the offsets. Recovery ends the log at
/// the gap: the records after it were served as if they came next, and
/// a follower's append there was refused for good.
#[test]
fn a_gap_between_unflushed_segments_ends_the_log_there() {
    let dir = tempfile::tempdir().unwrap();
    let one = batch(0, 3, 0).len() as u64;
    let config = small_config(one * 4);
    let log = Log::open(dir.path(), config.clone()).unwrap();
    for i in 0..10 {
        log.append_as_leader(batch(i, 3, i as i64), 2).unwrap();
    }
    let bases = log.segment_base_offsets();
    assert!(bases.len() >= 3, "{bases:?}");
    let second = log.segment_path_for(bases[1]).unwrap();
    log.close_unclean();
    drop(log);
    // The second segment loses its last batch, a whole one.
    let file = std::fs::read(&second).unwrap();
    let spans = batch_spans(&file);
    let (cut, _, _) = *spans.last().unwrap();
    std::fs::write(&second, &file[..cut]).unwrap();
    let end = spans[spans.len() - 2].2 + 1;

    let log = Log::open(dir.path(), config).unwrap();
    assert_eq!(log.log_end_offset(), end);
    let offsets: Vec<i64> = read_all(&log, 0).iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (0..end).collect::<Vec<_>>());
    let next = log.append_as_leader(batch(99, 1, 0), 3).unwrap();
    assert_eq!(next.base_offset, end);
}
