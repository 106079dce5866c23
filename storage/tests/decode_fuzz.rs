//! What CI runs instead of cargo-fuzz: arbitrary and mutated bytes thrown
//! at the batch decoder must give errors, never panics or huge allocations.

use bytes::Bytes;
use proptest::prelude::*;
use runnel_storage::batch::{self, field};
use runnel_storage::{BatchBuilder, RecordBatch};

fn decode_everything(bytes: &[u8]) {
    let _ = batch::batch_len(bytes);
    let _ = batch::check_batch(bytes);
    if let Ok(batches) = RecordBatch::parse_all(Bytes::copy_from_slice(bytes)) {
        for b in batches {
            let _ = b.records();
        }
    }
    let _ = batch::validate_for_append(Bytes::copy_from_slice(bytes));
    let _ = RecordBatch::split_checked(Bytes::copy_from_slice(bytes));
    assert_same_verdict(bytes);
}

/// The leader's validation by full decoding, as it was before the light
/// walk: parse, decode every record, then check count, deltas and max
/// timestamp. The reference for `validate_batch`.
fn validate_by_decoding(bytes: &[u8]) -> Result<i32, runnel_storage::StorageError> {
    use runnel_storage::StorageError;
    let batch = RecordBatch::parse(Bytes::copy_from_slice(bytes))?;
    let count = batch.record_count();
    if count == 0 {
        return Err(StorageError::EmptyBatch);
    }
    if batch.last_offset_delta() != count - 1 {
        return Err(StorageError::CorruptBatch {
            reason: "delta".into(),
        });
    }
    let records = batch.records()?;
    let mut timestamp_max = i64::MIN;
    for (i, record) in records.iter().enumerate() {
        if record.offset - batch.base_offset() != i as i64 {
            return Err(StorageError::CorruptBatch {
                reason: "offset delta".into(),
            });
        }
        timestamp_max = timestamp_max.max(record.timestamp_ms);
    }
    if !batch.is_log_append_time() && batch.max_timestamp() != timestamp_max {
        return Err(StorageError::CorruptBatch {
            reason: "max timestamp".into(),
        });
    }
    Ok(count)
}

/// The light walk accepts exactly what full decoding accepts, with the
/// same count, and fails with the same kind of error.
fn assert_same_verdict(bytes: &[u8]) {
    let light = batch::validate_batch(bytes);
    let full = validate_by_decoding(bytes);
    match (&light, &full) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(
            std::mem::discriminant(a),
            std::mem::discriminant(b),
            "{a} vs {b}"
        ),
        _ => panic!("light {light:?} but full {full:?} for {bytes:?}"),
    }
}

fn valid_batch(values: &[Vec<u8>]) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    for (i, v) in values.iter().enumerate() {
        b.push(
            i as i64,
            Some(&v[..v.len().min(3)]),
            Some(v),
            &[("h", Some(v))],
        );
    }
    b.build().to_vec()
}

/// Every byte of a record that the validator checks against the shape of
/// the records before it, changed in a few ways with the CRC fixed up:
/// both validators agree on each. The shapes cover one- and two-byte
/// length, delta and value-length varints, null and non-empty keys, and
/// empty values.
#[test]
fn every_byte_of_a_shape_checked_record_gets_the_same_verdict() {
    let shapes: [(Option<&[u8]>, usize, i64); 6] = [
        (None, 100, 0),
        (None, 20, 1),
        (Some(b"key"), 100, -1),
        (Some(b"k"), 0, 70),
        (None, 1000, 0),
        (Some(b"a-longer-key"), 3, 0),
    ];
    for (key, value_len, timestamp_step) in shapes {
        let value = vec![b'v'; value_len];
        let mut builder = BatchBuilder::new();
        // 80 records: offset deltas from 64 on take two bytes, so the
        // shape changes once inside the batch.
        for i in 0..80 {
            builder.push(1_000_000 + timestamp_step * i, key, Some(&value), &[]);
        }
        let good = builder.build().to_vec();
        assert_eq!(batch::validate_batch(&good).unwrap(), 80);
        let record_starts: Vec<usize> = {
            let records = RecordBatch::parse(Bytes::from(good.clone()))
                .unwrap()
                .records()
                .unwrap();
            assert_eq!(records.len(), 80);
            // Same-sized records within each shape: find the starts by
            // walking the length varints.
            let mut starts = vec![];
            let mut at = batch::HEADER_LEN;
            while at < good.len() {
                starts.push(at);
                let (raw, used) = if good[at] < 0x80 {
                    (u32::from(good[at]), 1)
                } else {
                    (u32::from(good[at] & 0x7f) | u32::from(good[at + 1]) << 7, 2)
                };
                at += used + (raw >> 1) as usize;
            }
            starts
        };
        // A record checked against the first shape, the last record of
        // that shape, and one checked against the second.
        for record in [5, 63, 70] {
            let start = record_starts[record];
            let end = record_starts.get(record + 1).copied().unwrap_or(good.len());
            for at in start..end {
                for x in [0x01u8, 0x02, 0x40, 0x7f, 0x80, 0xff] {
                    let mut b = good.clone();
                    b[at] ^= x;
                    let crc = crc32c::crc32c(&b[field::CRC_START..]);
                    b[field::CRC..field::CRC + 4].copy_from_slice(&crc.to_be_bytes());
                    assert_same_verdict(&b);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_2026), ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_everything(&bytes);
    }

    /// Mutations inside a valid batch with the CRC fixed up reach the
    /// record decoder.
    #[test]
    fn mutated_records_never_panic(
        values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 1..5),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut b = valid_batch(&values);
        for (at, x) in flips {
            let i = field::ATTRIBUTES + at.index(b.len() - field::ATTRIBUTES);
            b[i] ^= x;
        }
        let crc = crc32c::crc32c(&b[field::CRC_START..]);
        b[field::CRC..field::CRC + 4].copy_from_slice(&crc.to_be_bytes());
        decode_everything(&b);
    }

    /// Batches with odd shapes (nulls, many headers, skewed timestamps)
    /// and then one mutated byte: both validators agree on every one.
    #[test]
    fn light_validation_matches_full_decoding(
        records in proptest::collection::vec(
            (any::<i16>(), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
             proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
             proptest::collection::vec(("[a-zé]{0,3}", proptest::option::of(proptest::collection::vec(any::<u8>(), 0..4))), 0..3)),
            1..6),
        flip in proptest::option::of((any::<prop::sample::Index>(), any::<u8>())),
        fix_crc in any::<bool>(),
    ) {
        let mut b = BatchBuilder::new();
        for (ts, key, value, headers) in &records {
            let headers: Vec<(&str, Option<&[u8]>)> =
                headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
            b.push(1_000_000 + i64::from(*ts), key.as_deref(), value.as_deref(), &headers);
        }
        let mut b = b.build().to_vec();
        assert_same_verdict(&b);
        prop_assert_eq!(batch::validate_batch(&b).unwrap() as usize, records.len());
        if let Some((at, x)) = flip {
            let i = at.index(b.len());
            b[i] ^= x.max(1);
            if fix_crc && b.len() > field::CRC_START {
                let crc = crc32c::crc32c(&b[field::CRC_START..]);
                b[field::CRC..field::CRC + 4].copy_from_slice(&crc.to_be_bytes());
            }
            assert_same_verdict(&b);
        }
    }

    /// Many records of one shape (the validator's fast paths: the length
    /// taken from the record before, the headerless common layout), then
    /// bytes changed with the CRC fixed up: both validators still agree.
    #[test]
    fn uniform_records_with_flips_match_full_decoding(
        count in 1usize..200,
        key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..6)),
        value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
        header in any::<bool>(),
        timestamp_step in -3i64..3,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
    ) {
        let mut b = BatchBuilder::new();
        let headers: Vec<(&str, Option<&[u8]>)> =
            if header { vec![("h", Some(b"v".as_slice()))] } else { vec![] };
        for i in 0..count {
            b.push(1_000_000 + timestamp_step * i as i64, key.as_deref(), value.as_deref(), &headers);
        }
        let mut b = b.build().to_vec();
        prop_assert_eq!(batch::validate_batch(&b).unwrap() as usize, count);
        for (at, x) in flips {
            let i = field::ATTRIBUTES + at.index(b.len() - field::ATTRIBUTES);
            b[i] ^= x.max(1);
        }
        let crc = crc32c::crc32c(&b[field::CRC_START..]);
        b[field::CRC..field::CRC + 4].copy_from_slice(&crc.to_be_bytes());
        assert_same_verdict(&b);
    }

    #[test]
    fn round_trip(values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..10)) {
        let b = valid_batch(&values);
        let batch = batch::validate_for_append(Bytes::from(b)).unwrap();
        let records = batch.records().unwrap();
        prop_assert_eq!(records.len(), values.len());
        for (r, v) in records.iter().zip(&values) {
            prop_assert_eq!(r.value.as_deref(), Some(&v[..]));
            prop_assert_eq!(r.headers[0].value.as_deref(), Some(&v[..]));
        }
    }
}
