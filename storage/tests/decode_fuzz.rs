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
