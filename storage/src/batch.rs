//! The record-batch format (modelled on Kafka's v2 batch), I/O-free.
//! See storage/README.md for the byte layout.

use bytes::{Bytes, BytesMut};

use crate::Result;

/// Size of the fixed batch header.
pub const HEADER_LEN: usize = 61;
/// The only batch format version.
pub const MAGIC: u8 = 2;

/// One record header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub key: String,
    pub value: Option<Bytes>,
}

/// A decoded record; key, value and header values are slices of the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Absolute offset (batch base offset + delta).
    pub offset: i64,
    /// Absolute timestamp in ms (batch base timestamp + delta, or the
    /// batch's max timestamp when the batch uses log-append time).
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
}

/// Builds one batch from records, base offset 0, CRC set.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    _todo: (),
}

impl BatchBuilder {
    pub fn new() -> Self {
        todo!()
    }
    /// Producer identity for idempotence; default -1/-1/-1.
    pub fn producer(self, _producer_id: i64, _producer_epoch: i16, _base_sequence: i32) -> Self {
        todo!()
    }
    pub fn push(
        &mut self,
        _timestamp_ms: i64,
        _key: Option<&[u8]>,
        _value: Option<&[u8]>,
        _headers: &[(&str, Option<&[u8]>)],
    ) {
        todo!()
    }
    pub fn len(&self) -> usize {
        todo!()
    }
    pub fn is_empty(&self) -> bool {
        todo!()
    }
    /// Encoded size so far (header included).
    pub fn size_bytes(&self) -> usize {
        todo!()
    }
    pub fn build(self) -> BytesMut {
        todo!()
    }
}

/// A validated batch: header fields readable, CRC checked.
#[derive(Clone, Debug)]
pub struct RecordBatch {
    _bytes: Bytes,
}

impl RecordBatch {
    /// Validates one whole batch (length, magic, CRC); `bytes` must hold
    /// exactly one batch.
    pub fn parse(_bytes: Bytes) -> Result<RecordBatch> {
        todo!()
    }
    /// Splits concatenated batches (as returned by `Log::read`); a trailing
    /// partial batch is an error.
    pub fn parse_all(_bytes: Bytes) -> Result<Vec<RecordBatch>> {
        todo!()
    }
    pub fn base_offset(&self) -> i64 {
        todo!()
    }
    pub fn last_offset(&self) -> i64 {
        todo!()
    }
    pub fn record_count(&self) -> i32 {
        todo!()
    }
    pub fn leader_epoch(&self) -> i32 {
        todo!()
    }
    pub fn max_timestamp(&self) -> i64 {
        todo!()
    }
    pub fn producer_id(&self) -> i64 {
        todo!()
    }
    pub fn size_bytes(&self) -> usize {
        todo!()
    }
    pub fn as_bytes(&self) -> &Bytes {
        todo!()
    }
    /// Decodes the records, zero-copy.
    pub fn records(&self) -> Result<Vec<Record>> {
        todo!()
    }
}
