//! Model-based test: random sequences of append (rolling small segments),
//! truncate, delete_records_before, tick retention and reopen (clean and
//! unclean) keep the log's content equal to a simple in-memory model.

mod common;

use common::{read_all, small_config};
use proptest::prelude::*;
use runnel_storage::{BatchBuilder, Log, LogConfig};

#[derive(Clone, Debug)]
enum Op {
    /// Append a batch with these (timestamp, value length) records.
    Append(Vec<(i64, usize)>),
    /// Truncate at this fraction between log start and log end.
    Truncate(f64),
    /// delete_records_before at this fraction between start and end.
    DeleteBefore(f64),
    /// Reopen; `clean` closes first, otherwise it is dropped as if crashed.
    Reopen { clean: bool },
    /// First offset at or after this timestamp.
    Lookup(i64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => proptest::collection::vec((0i64..1000, 0usize..300), 1..6).prop_map(Op::Append),
        1 => (0.0..1.0f64).prop_map(Op::Truncate),
        1 => (0.0..1.0f64).prop_map(Op::DeleteBefore),
        1 => any::<bool>().prop_map(|clean| Op::Reopen { clean }),
        1 => (0i64..1100).prop_map(Op::Lookup),
    ]
}

/// One modelled batch: base offset and (timestamp, value) per record.
type ModelBatch = (i64, Vec<(i64, Vec<u8>)>);

/// The model: batches as (base offset, [(timestamp, value)]), plus the log
/// start and end offsets.
#[derive(Debug, Default)]
struct Model {
    batches: Vec<ModelBatch>,
    start: i64,
    end: i64,
}

impl Model {
    fn records(&self) -> impl Iterator<Item = (i64, i64, &Vec<u8>)> {
        self.batches.iter().flat_map(|(base, rs)| {
            rs.iter()
                .enumerate()
                .map(move |(i, (ts, v))| (base + i as i64, *ts, v))
        })
    }
}

fn config() -> LogConfig {
    small_config(1024)
}

fn check(log: &Log, model: &Model) {
    assert_eq!(log.log_start_offset(), model.start);
    assert_eq!(log.log_end_offset(), model.end);
    let want: Vec<(i64, Vec<u8>)> = model
        .records()
        .filter(|(o, _, _)| *o >= model.start)
        .map(|(o, _, v)| (o, v.clone()))
        .collect();
    assert_eq!(read_all(log, model.start), want);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_2026), ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), config()).unwrap();
        let mut model = Model::default();
        let mut tag = 0u64;
        for op in ops {
            match op {
                Op::Append(records) => {
                    let mut b = BatchBuilder::new();
                    let mut kept = Vec::new();
                    for (ts, len) in records {
                        tag += 1;
                        let value: Vec<u8> = format!("{tag}|").bytes().cycle().take(len.max(4)).collect();
                        b.push(ts, None, Some(&value), &[]);
                        kept.push((ts, value));
                    }
                    let info = log.append_as_leader(b.build(), 1).unwrap();
                    prop_assert_eq!(info.base_offset, model.end);
                    model.end += kept.len() as i64;
                    model.batches.push((info.base_offset, kept));
                }
                Op::Truncate(f) => {
                    let t = model.start + ((model.end - model.start) as f64 * f) as i64;
                    log.truncate_to(t).unwrap();
                    if t < model.end {
                        if t <= model.start {
                            model.batches.clear();
                            model.start = t;
                            model.end = t;
                        } else {
                            // Truncation is by whole batches: the log now
                            // ends where the first removed batch began.
                            let cut = model
                                .batches
                                .iter()
                                .position(|(base, rs)| base + rs.len() as i64 > t)
                                .expect("t is below the end");
                            model.end = model.batches[cut].0;
                            model.batches.truncate(cut);
                            model.start = model.start.min(model.end);
                        }
                    }
                }
                Op::DeleteBefore(f) => {
                    let d = model.start + ((model.end - model.start) as f64 * f) as i64;
                    // Deletion stops at the high watermark.
                    log.set_high_watermark(log.log_end_offset());
                    prop_assert_eq!(log.delete_records_before(d).unwrap(), d.max(model.start));
                    model.start = d.max(model.start);
                }
                Op::Reopen { clean } => {
                    if clean {
                        log.close().unwrap();
                    } else {
                        log.close_unclean();
                    }
                    drop(log);
                    log = Log::open(dir.path(), config()).unwrap();
                }
                Op::Lookup(ts) => {
                    let want = model
                        .records()
                        .find(|(o, t, _)| *o >= model.start && *t >= ts)
                        .map(|(o, t, _)| (o, t));
                    prop_assert_eq!(log.offset_for_timestamp(ts).unwrap(), want);
                }
            }
            check(&log, &model);
        }
        // Retention by size never deletes the active segment or data
        // beyond it, and the log start moves to a segment boundary.
        log.set_config(LogConfig { retention_bytes_max: Some(0), ..config() });
        // Retention deletes only below the high watermark.
        log.set_high_watermark(log.log_end_offset());
        log.tick(0).unwrap();
        prop_assert_eq!(log.segment_count(), 1);
        model.start = model.start.max(log.segment_base_offsets()[0]).min(model.end);
        check(&log, &model);
    }
}
