//! Arbitrary bytes into the record-batch decoder: must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runnel_storage::RecordBatch;

fuzz_target!(|data: &[u8]| {
    let _ = runnel_storage::batch::batch_len(data);
    if let Ok(batches) = RecordBatch::parse_all(bytes::Bytes::copy_from_slice(data)) {
        for batch in batches {
            let _ = batch.records();
        }
    }
});
