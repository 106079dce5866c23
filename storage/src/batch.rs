//! The record-batch format (modelled on Kafka's v2 batch), I/O-free.
//! See storage/README.md for the byte layout.
//!
//! Where it sits on the data path: the produce handler validates a batch
//! once ([`validate_for_append`] via `Log::append_as_leader`); the log then
//! rewrites only the base offset and leader epoch (neither covered by the
//! CRC) and stores and serves the bytes as they are.
//!
//! Every decoder here is total: lengths are checked before use and no
//! allocation is sized from an unchecked length.

use bytes::{BufMut, Bytes, BytesMut};

use crate::varint::{put_varint, put_varlong, read_varint, read_varlong, varint_len, varlong_len};
use crate::{Result, StorageError};

/// Size of the fixed batch header.
pub const HEADER_LEN: usize = 61;
/// The only batch format version.
pub const MAGIC: u8 = 2;

/// Byte positions of the header fields (big-endian).
pub mod field {
    pub const BASE_OFFSET: usize = 0;
    pub const BATCH_LENGTH: usize = 8;
    /// Bytes before and including `batch_length`: total = this + batch_length.
    pub const LOG_OVERHEAD: usize = 12;
    pub const PARTITION_LEADER_EPOCH: usize = 12;
    pub const MAGIC: usize = 16;
    pub const CRC: usize = 17;
    /// The CRC covers `[CRC_START..end]`.
    pub const CRC_START: usize = 21;
    pub const ATTRIBUTES: usize = 21;
    pub const LAST_OFFSET_DELTA: usize = 23;
    pub const BASE_TIMESTAMP: usize = 27;
    pub const MAX_TIMESTAMP: usize = 35;
    pub const PRODUCER_ID: usize = 43;
    pub const PRODUCER_EPOCH: usize = 51;
    pub const BASE_SEQUENCE: usize = 53;
    pub const RECORDS_COUNT: usize = 57;
}

/// Attribute bits 0-2: compression codec (only 0 = none is supported).
pub const ATTR_COMPRESSION_MASK: i16 = 0x07;
/// Attribute bit 3: timestamps are the broker's log-append time.
pub const ATTR_LOG_APPEND_TIME: i16 = 0x08;
/// Attribute bit 4: transactional (reserved).
pub const ATTR_TRANSACTIONAL: i16 = 0x10;
/// Attribute bit 5: control batch (reserved).
pub const ATTR_CONTROL: i16 = 0x20;

/// Smallest encoded record: seven one-byte varints/fields.
const RECORD_BYTES_MIN: usize = 7;

/// Result of the cheap hot-path framing check [`batch_len`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decode {
    /// A whole batch of this many bytes starts the buffer.
    Complete(usize),
    /// The buffer holds a prefix; at least this many bytes are needed in
    /// total (the whole batch once the length field is readable).
    Incomplete(usize),
    /// The framing is invalid (length or magic).
    Invalid(&'static str),
}

fn be_i16(buf: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([buf[at], buf[at + 1]])
}
fn be_i32(buf: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}
fn be_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}
fn be_i64(buf: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Frames the batch at the start of `buf` from its length field and magic
/// only (no CRC). Never panics.
pub fn batch_len(buf: &[u8]) -> Decode {
    if buf.len() < field::LOG_OVERHEAD {
        return Decode::Incomplete(field::LOG_OVERHEAD);
    }
    let batch_length = be_i32(buf, field::BATCH_LENGTH);
    if batch_length < (HEADER_LEN - field::LOG_OVERHEAD) as i32 {
        return Decode::Invalid("batch length smaller than the header");
    }
    let total = field::LOG_OVERHEAD + batch_length as usize;
    if buf.len() > field::MAGIC && buf[field::MAGIC] != MAGIC {
        return Decode::Invalid("unknown magic");
    }
    if buf.len() < total {
        return Decode::Incomplete(total);
    }
    Decode::Complete(total)
}

/// The hot-path check: frames the first batch in `buf` and verifies its
/// CRC. Returns the batch's total length.
pub fn check_batch(buf: &[u8]) -> Result<usize> {
    let total = match batch_len(buf) {
        Decode::Complete(total) => total,
        Decode::Incomplete(needed) => {
            return Err(corrupt(format!(
                "truncated batch: {} bytes of {needed}",
                buf.len()
            )))
        }
        Decode::Invalid(reason) => return Err(corrupt(reason.to_string())),
    };
    let stored = be_u32(buf, field::CRC);
    let computed = crate::crc::crc32c(&buf[field::CRC_START..total]);
    if stored != computed {
        return Err(corrupt(format!(
            "crc mismatch: stored {stored:#010x}, computed {computed:#010x}"
        )));
    }
    Ok(total)
}

/// The first record's key of the one batch `batch` holds (None for a
/// null key or no records), framed without a CRC check: where a batch
/// whose producer named no partition is routed, before the append checks
/// it whole (a CRC pass here would be a second one).
pub fn first_record_key(batch: &Bytes) -> Result<Option<Bytes>> {
    match batch_len(batch) {
        Decode::Complete(total) if total == batch.len() => {}
        Decode::Complete(total) => {
            return Err(corrupt(format!(
                "batch length {total} but {} bytes given",
                batch.len()
            )))
        }
        Decode::Incomplete(needed) => {
            return Err(corrupt(format!(
                "truncated batch: {} bytes of {needed}",
                batch.len()
            )))
        }
        Decode::Invalid(reason) => return Err(corrupt(reason.to_string())),
    }
    RecordBatch {
        bytes: batch.clone(),
    }
    .first_key()
}

fn corrupt(reason: String) -> StorageError {
    StorageError::CorruptBatch { reason }
}

/// Header fields read without CRC verification (for scans over trusted,
/// already-framed bytes). `buf` must hold at least [`HEADER_LEN`] bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HeaderView {
    pub base_offset: i64,
    pub total_len: usize,
    pub last_offset_delta: i32,
    pub max_timestamp: i64,
    pub leader_epoch: i32,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
}

impl HeaderView {
    /// Reads a header, checking the framing; `None` if `buf` is short or
    /// the framing is invalid.
    pub(crate) fn read(buf: &[u8]) -> Option<HeaderView> {
        if buf.len() < HEADER_LEN {
            return None;
        }
        let total_len = match batch_len(&buf[..field::LOG_OVERHEAD]) {
            Decode::Incomplete(total) if total >= HEADER_LEN => total,
            _ => return None,
        };
        if buf[field::MAGIC] != MAGIC {
            return None;
        }
        Some(HeaderView {
            base_offset: be_i64(buf, field::BASE_OFFSET),
            total_len,
            last_offset_delta: be_i32(buf, field::LAST_OFFSET_DELTA),
            max_timestamp: be_i64(buf, field::MAX_TIMESTAMP),
            leader_epoch: be_i32(buf, field::PARTITION_LEADER_EPOCH),
            producer_id: be_i64(buf, field::PRODUCER_ID),
            producer_epoch: be_i16(buf, field::PRODUCER_EPOCH),
            base_sequence: be_i32(buf, field::BASE_SEQUENCE),
        })
    }

    /// The producer fields, for idempotence bookkeeping.
    pub(crate) fn producer_batch(&self) -> crate::producer_state::ProducerBatch {
        crate::producer_state::ProducerBatch {
            producer_id: self.producer_id,
            epoch: self.producer_epoch,
            first_seq: self.base_sequence,
            last_offset_delta: self.last_offset_delta,
            max_timestamp_ms: self.max_timestamp,
        }
    }

    pub(crate) fn last_offset(&self) -> i64 {
        self.base_offset
            .saturating_add(i64::from(self.last_offset_delta))
    }
}

/// Rewrites the base offset (not covered by the CRC).
pub fn set_base_offset(batch: &mut [u8], base_offset: i64) {
    batch[field::BASE_OFFSET..field::BASE_OFFSET + 8].copy_from_slice(&base_offset.to_be_bytes());
}

/// Rewrites the partition leader epoch (not covered by the CRC).
pub fn set_leader_epoch(batch: &mut [u8], leader_epoch: i32) {
    let at = field::PARTITION_LEADER_EPOCH;
    batch[at..at + 4].copy_from_slice(&leader_epoch.to_be_bytes());
}

/// The producer id, producer epoch and base sequence of a framed batch,
/// or `None` if `batch` does not start with a valid batch header.
pub fn producer_fields(batch: &[u8]) -> Option<(i64, i16, i32)> {
    HeaderView::read(batch).map(|h| (h.producer_id, h.producer_epoch, h.base_sequence))
}

/// How many sequence numbers a framed batch takes (`last_offset_delta +
/// 1`: the broker counts a batch's sequences as it counts its offsets),
/// or `None` if `batch` does not start with a valid batch header.
pub fn sequence_count(batch: &[u8]) -> Option<i32> {
    HeaderView::read(batch).map(|h| h.last_offset_delta.saturating_add(1))
}

/// Computes the CRC of a whole, framed batch and writes it in.
fn seal_crc(batch: &mut [u8]) {
    let crc = crate::crc::crc32c(&batch[field::CRC_START..]);
    batch[field::CRC..field::CRC + 4].copy_from_slice(&crc.to_be_bytes());
}

/// Rewrites the base sequence and recomputes the CRC (a producer
/// restarting its sequence on a partition that forgot it). `batch` must
/// be one whole, framed batch.
pub fn set_base_sequence(batch: &mut [u8], base_sequence: i32) {
    let at = field::BASE_SEQUENCE;
    batch[at..at + 4].copy_from_slice(&base_sequence.to_be_bytes());
    seal_crc(batch);
}

/// Rewrites the producer epoch and base sequence and recomputes the CRC
/// (a producer restarting its sequence under a new epoch). `batch` must
/// be one whole, framed batch.
pub fn set_producer_epoch_and_sequence(batch: &mut [u8], epoch: i16, base_sequence: i32) {
    let at = field::PRODUCER_EPOCH;
    batch[at..at + 2].copy_from_slice(&epoch.to_be_bytes());
    set_base_sequence(batch, base_sequence);
}

/// Marks the batch as log-append-time stamped at `now_ms` and recomputes
/// the CRC. `batch` must be one whole, framed batch.
pub fn set_log_append_time(batch: &mut [u8], now_ms: i64) {
    let attributes = be_i16(batch, field::ATTRIBUTES) | ATTR_LOG_APPEND_TIME;
    batch[field::ATTRIBUTES..field::ATTRIBUTES + 2].copy_from_slice(&attributes.to_be_bytes());
    batch[field::MAX_TIMESTAMP..field::MAX_TIMESTAMP + 8].copy_from_slice(&now_ms.to_be_bytes());
    seal_crc(batch);
}

/// Full validation a leader does once before storing a producer's batch:
/// framing, magic, CRC, no compression, record count matching the decoded
/// records, offset deltas exactly `0..n`, and a max timestamp equal to the
/// largest record timestamp (create time). Returns the parsed batch.
///
/// The same checks as [`validate_batch`], which the log uses; this form
/// keeps the parsed batch for callers that decode it next.
pub fn validate_for_append(bytes: Bytes) -> Result<RecordBatch> {
    validate_batch(&bytes)?;
    Ok(RecordBatch { bytes })
}

/// The leader's once-per-batch check, without materialising records: one
/// CRC pass over the batch, then a walk over the record framing (lengths,
/// varints, offset deltas `0..n`, header keys UTF-8, timestamps) that
/// allocates nothing. Accepts exactly the batches the full decoder
/// ([`RecordBatch::parse`] + [`RecordBatch::records`]) accepts with a
/// consistent count, deltas and max timestamp. Returns the record count.
pub fn validate_batch(buf: &[u8]) -> Result<i32> {
    let total = check_batch(buf)?;
    if total != buf.len() {
        return Err(corrupt(format!(
            "batch length {total} but {} bytes given",
            buf.len()
        )));
    }
    let count = be_i32(buf, field::RECORDS_COUNT);
    let last_offset_delta = be_i32(buf, field::LAST_OFFSET_DELTA);
    if count < 0 {
        return Err(corrupt(format!("negative record count {count}")));
    }
    if count == 0 {
        return Err(StorageError::EmptyBatch);
    }
    if last_offset_delta != count - 1 {
        return Err(corrupt(format!(
            "last offset delta {last_offset_delta} with {count} records"
        )));
    }
    let attributes = be_i16(buf, field::ATTRIBUTES);
    let codec = attributes & ATTR_COMPRESSION_MASK;
    if codec != 0 {
        return Err(corrupt(format!("unsupported compression codec {codec}")));
    }
    let log_append_time = attributes & ATTR_LOG_APPEND_TIME != 0;
    let base_offset = be_i64(buf, field::BASE_OFFSET);
    let base_timestamp = be_i64(buf, field::BASE_TIMESTAMP);
    let max_timestamp = be_i64(buf, field::MAX_TIMESTAMP);
    let body = &buf[HEADER_LEN..];
    let mut position = 0;
    // Deltas are added to the base once, after the walk: a timestamp
    // overflows for some record exactly when it does for the smallest or
    // the largest delta.
    let (mut delta_min, mut delta_max) = (i64::MAX, i64::MIN);
    let mut hint = LengthHint::default();
    let mut last_used = 0;
    let mut index = 0;
    while index < count {
        let rest = &body[position..];
        let (timestamp_delta, offset_delta, used) = walk_record(rest, &mut hint)
            .map_err(|reason| corrupt(format!("record {index}: {reason}")))?;
        position += used;
        delta_min = delta_min.min(timestamp_delta);
        delta_max = delta_max.max(timestamp_delta);
        if offset_delta != index {
            return Err(corrupt(format!(
                "record {index} has offset delta {offset_delta}"
            )));
        }
        index += 1;
        // The second of two records of one size: the records after it
        // that are laid out the same are checked against it with a few
        // masked compares. The first that is not (or that has a wrong
        // offset delta, to report it) comes back to the walk above. In a
        // batch of records of many sizes a shape would rarely match, so
        // none is learned.
        if used == last_used && index < count {
            let run = RecordShape::run_after(&rest[..used], &body[position..], index, count);
            position += run.bytes;
            index += run.records;
            delta_min = delta_min.min(run.timestamp_delta_min);
            delta_max = delta_max.max(run.timestamp_delta_max);
        }
        last_used = used;
    }
    // The deltas are 0..count, so the last offset is the largest.
    if base_offset.checked_add(i64::from(count - 1)).is_none() {
        return Err(corrupt(format!(
            "offset overflow: base {base_offset} with {count} records"
        )));
    }
    if position != body.len() {
        return Err(corrupt(format!(
            "{} trailing bytes after {count} records",
            body.len() - position
        )));
    }
    let timestamp_max = if log_append_time {
        max_timestamp
    } else {
        base_timestamp
            .checked_add(delta_min)
            .and(base_timestamp.checked_add(delta_max))
            .ok_or_else(|| corrupt("timestamp overflow".to_string()))?
    };
    if !log_append_time && max_timestamp != timestamp_max {
        return Err(corrupt(format!(
            "max timestamp {max_timestamp} but largest record timestamp {timestamp_max}"
        )));
    }
    Ok(count)
}

/// Walks one length-prefixed record at the start of `buf` without
/// decoding its fields into values: returns (timestamp delta, offset
/// delta, bytes used). Fails exactly where [`Cursor::record`] fails.
fn walk_record(buf: &[u8], hint: &mut LengthHint) -> Result<(i64, i32, usize), &'static str> {
    let (len, used) = match buf {
        [b0, b1, ..] if [*b0, *b1] == hint.head => (hint.len, hint.used),
        _ => {
            let (len, used) = read_varint(buf).ok_or("bad varint")?;
            let len = usize::try_from(len).map_err(|_| "negative record length")?;
            if let ([b0, b1, ..], 1..=2) = (buf, used) {
                *hint = LengthHint {
                    head: [*b0, *b1],
                    len,
                    used,
                };
            }
            (len, used)
        }
    };
    if len > buf.len() - used {
        return Err("record length beyond batch");
    }
    let record = &buf[used..used + len];
    if let Some((timestamp_delta, offset_delta)) = common_record(record) {
        return Ok((timestamp_delta, offset_delta, used + len));
    }
    if record.is_empty() {
        return Err("record length does not match its fields");
    }
    let mut at = 1; // attributes (unused)
    let (timestamp_delta, n) =
        read_varlong(record.get(at..).unwrap_or_default()).ok_or("bad varlong")?;
    at += n;
    let offset_delta = next_varint(record, &mut at)?;
    skip_bytes(record, &mut at)?; // key
    skip_bytes(record, &mut at)?; // value
    let header_count = next_varint(record, &mut at)?;
    let header_count = usize::try_from(header_count).map_err(|_| "negative header count")?;
    for _ in 0..header_count {
        let start = skip_bytes(record, &mut at)?.ok_or("null header key")?;
        std::str::from_utf8(&record[start..at]).map_err(|_| "header key not utf-8")?;
        skip_bytes(record, &mut at)?;
    }
    if at != record.len() {
        return Err("record length does not match its fields");
    }
    Ok((timestamp_delta, offset_delta, used + len))
}

/// The fields of a record of the common shape, or `None` for any other
/// (which the general walk then decides on): timestamp and offset deltas
/// and key and value lengths of one or two bytes each, and no headers.
/// Accepts only records the general walk accepts, with the same deltas.
/// It reads the first eight bytes once and decodes from them with
/// predicted branches, where the general walk's bounds-checked reads
/// chain each field's position through a conditional move.
#[inline(always)]
fn common_record(record: &[u8]) -> Option<(i64, i32)> {
    let layout = CommonLayout::of(record)?;
    Some((
        zigzag64(layout.timestamp_raw.into()),
        zigzag32(layout.offset_raw),
    ))
}

/// Where the fields of a record of the common shape sit (positions from
/// the attributes byte, the length varint not included), and its two
/// deltas before zigzag.
#[derive(Clone, Copy, Debug)]
struct CommonLayout {
    timestamp_raw: u32,
    timestamp_bytes: usize,
    offset_raw: u32,
    offset_bytes: usize,
    /// The key length varint: where and how long.
    key_at: usize,
    key_bytes: usize,
    /// The value length varint: where and how long.
    value_at: usize,
    value_bytes: usize,
}

impl CommonLayout {
    /// The layout of `record` (from its attributes byte to its end) if it
    /// is of the common shape (see [`common_record`]).
    #[inline(always)]
    fn of(record: &[u8]) -> Option<CommonLayout> {
        let head: [u8; 8] = record.get(..8)?.try_into().ok()?;
        // head[0] is the attributes byte (unused).
        let (timestamp_raw, timestamp_bytes) = short_varint(head[1], head[2])?;
        let mut at = 1 + timestamp_bytes;
        let (offset_raw, offset_bytes) = short_varint(head[at], head[at + 1])?;
        at += offset_bytes;
        let key_at = at;
        let (key_raw, key_bytes) = short_varint(head[at], head[at + 1])?;
        at += key_bytes;
        // Zigzag: 1 is -1 (null), even values are lengths.
        if key_raw != 1 {
            if key_raw & 1 != 0 {
                return None;
            }
            at += (key_raw >> 1) as usize;
        }
        let value_at = at;
        let (value_raw, value_bytes) = match record.get(at..at + 2)? {
            [b0, b1] => short_varint(*b0, *b1)?,
            _ => return None,
        };
        at += value_bytes;
        if value_raw != 1 {
            if value_raw & 1 != 0 {
                return None;
            }
            at += (value_raw >> 1) as usize;
        }
        // The header count, zero, is the last byte.
        if at + 1 != record.len() || record[at] != 0 {
            return None;
        }
        Some(CommonLayout {
            timestamp_raw,
            timestamp_bytes,
            offset_raw,
            offset_bytes,
            key_at,
            key_bytes,
            value_at,
            value_bytes,
        })
    }
}

#[inline(always)]
fn zigzag64(raw: u64) -> i64 {
    (raw >> 1) as i64 ^ -((raw & 1) as i64)
}

#[inline(always)]
fn zigzag32(raw: u32) -> i32 {
    (raw >> 1) as i32 ^ -((raw & 1) as i32)
}

/// A one- or two-byte varint starting with `b0, b1`, unsigned (before
/// zigzag), and its length; `None` if it is longer.
#[inline(always)]
fn short_varint(b0: u8, b1: u8) -> Option<(u32, usize)> {
    if b0 < 0x80 {
        Some((u32::from(b0), 1))
    } else if b1 < 0x80 {
        Some((u32::from(b0 & 0x7f) | u32::from(b1) << 7, 2))
    } else {
        None
    }
}

/// The layout of a record of the common shape (see [`common_record`]),
/// learned from one the walk accepted, so that the records after it can
/// be checked with a few masked compares instead of decoded field by
/// field. A record matches when it has the same length varint, timestamp
/// and offset delta varints of the same sizes, the same key and value
/// length varints, and a zero header count as its last byte: then every
/// field sits where it sat in the learned record, so the general walk
/// would accept it too and decode the same deltas. In a batch of
/// same-sized records this holds from record to record except where a
/// delta's varint grows a byte (offset delta 64, for one), where the walk
/// takes over for one record and learns the new layout.
#[derive(Clone, Copy, Debug)]
struct RecordShape {
    /// The whole record's size, its length varint included (at least 8).
    len: usize,
    /// The first eight bytes' expected bits under `head_mask`: the length
    /// varint, the deltas' continuation bits and the key length varint.
    head: u64,
    head_mask: u64,
    /// Bit position in the first eight bytes of the timestamp delta's
    /// first byte, and 0x7f if its varint has a second byte (else 0).
    timestamp_shift: u32,
    timestamp_high: u64,
    /// The same for the offset delta.
    offset_shift: u32,
    offset_high: u64,
    /// Where the value length varint starts, its two bytes' expected bits
    /// (little-endian) and which of them it covers.
    value_at: usize,
    value: u16,
    value_mask: u16,
}

impl RecordShape {
    /// The shape of `record` (its length varint included, nothing after
    /// it), or `None` if it is not of the common shape with the fields up
    /// to the key length in its first eight bytes.
    fn learn(record: &[u8]) -> Option<RecordShape> {
        let head = u64::from_le_bytes(record.get(..8)?.try_into().ok()?);
        let (_, prefix) = short_varint(*record.first()?, *record.get(1)?)?;
        let layout = CommonLayout::of(&record[prefix..])?;
        // The bits of `n` bytes from `at` (from the record's start).
        let span = |at: usize, n: usize| ((1u64 << (8 * n)) - 1) << (8 * at);
        // A delta varint's continuation bits (set on the first of two
        // bytes, clear on the last): the value bits may differ.
        let continuation = |at: usize, n: usize| span(at, n) & 0x8080_8080_8080_8080;
        let timestamp_at = prefix + 1;
        let offset_at = timestamp_at + layout.timestamp_bytes;
        let key_at = prefix + layout.key_at;
        // The length varint and attributes take at most three bytes and
        // each delta at most two, so both deltas are in the first eight;
        // the key length may not be.
        if key_at + layout.key_bytes > 8 {
            return None;
        }
        let mask = span(0, prefix)
            | continuation(timestamp_at, layout.timestamp_bytes)
            | continuation(offset_at, layout.offset_bytes)
            | span(key_at, layout.key_bytes);
        let value_at = prefix + layout.value_at;
        let high = |n: usize| if n == 2 { 0x7f } else { 0 };
        Some(RecordShape {
            len: record.len(),
            head: head & mask,
            head_mask: mask,
            timestamp_shift: 8 * timestamp_at as u32,
            timestamp_high: high(layout.timestamp_bytes),
            offset_shift: 8 * offset_at as u32,
            offset_high: high(layout.offset_bytes),
            value_at,
            value: u16::from_le_bytes([record[value_at], record[value_at + 1]]),
            value_mask: span(0, layout.value_bytes) as u16,
        })
    }

    /// [`RecordShape::run`] with the shape of `record`, if it has one.
    #[cold]
    #[inline(never)]
    fn run_after(record: &[u8], rest: &[u8], first: i32, count: i32) -> ShapeRun {
        match RecordShape::learn(record) {
            Some(shape) => shape.run(rest, first, count),
            None => ShapeRun {
                bytes: 0,
                records: 0,
                timestamp_delta_min: i64::MAX,
                timestamp_delta_max: i64::MIN,
            },
        }
    }

    /// Checks the records at the start of `rest`, which should have
    /// offset deltas `first, first + 1, ..` up to `count - 1`, against
    /// this shape; stops at the first that does not match it or has
    /// another offset delta.
    #[inline(always)]
    fn run(&self, rest: &[u8], first: i32, count: i32) -> ShapeRun {
        let shape = *self;
        let mut run = ShapeRun {
            bytes: 0,
            records: 0,
            timestamp_delta_min: i64::MAX,
            timestamp_delta_max: i64::MIN,
        };
        let mut index = first;
        while index < count {
            match shape.decode(&rest[run.bytes..]) {
                Some((timestamp_delta, offset_delta)) if offset_delta == index => {
                    run.bytes += shape.len;
                    run.timestamp_delta_min = run.timestamp_delta_min.min(timestamp_delta);
                    run.timestamp_delta_max = run.timestamp_delta_max.max(timestamp_delta);
                    index += 1;
                }
                _ => break,
            }
        }
        run.records = index - first;
        run
    }

    /// The timestamp and offset deltas of the record at the start of
    /// `rest` if it has this shape, else `None`.
    #[inline(always)]
    fn decode(&self, rest: &[u8]) -> Option<(i64, i32)> {
        let record = rest.get(..self.len)?;
        let head = u64::from_le_bytes(record.get(..8)?.try_into().ok()?);
        if (head ^ self.head) & self.head_mask != 0 {
            return None;
        }
        let value =
            u16::from_le_bytes([*record.get(self.value_at)?, *record.get(self.value_at + 1)?]);
        if (value ^ self.value) & self.value_mask != 0 || record[self.len - 1] != 0 {
            return None;
        }
        let raw =
            |shift: u32, high: u64| (head >> shift) & 0x7f | ((head >> (shift + 8)) & high) << 7;
        Some((
            zigzag64(raw(self.timestamp_shift, self.timestamp_high)),
            zigzag32(raw(self.offset_shift, self.offset_high) as u32),
        ))
    }
}

/// What [`RecordShape::run`] checked.
struct ShapeRun {
    bytes: usize,
    records: i32,
    timestamp_delta_min: i64,
    timestamp_delta_max: i64,
}

/// The previous record's first two bytes and the length varint they
/// start with. Records of a batch are mostly the same length, and when
/// the next record starts with the same two bytes its length is known
/// without decoding: the walk's next position then does not wait for
/// the decode, only a (predicted) comparison does. The two bytes hold the
/// whole varint when it is one or two bytes long, which is all a record
/// under 8 KiB needs.
#[derive(Clone, Copy, Debug)]
struct LengthHint {
    head: [u8; 2],
    len: usize,
    used: usize,
}

impl Default for LengthHint {
    /// Matches no record: `[0xff, 0xff]` starts a varint longer than two
    /// bytes, and only one- and two-byte varints are hinted.
    fn default() -> Self {
        LengthHint {
            head: [0xff, 0xff],
            len: 0,
            used: 0,
        }
    }
}

/// The varint at `*at` in `record`; advances `at` past it.
#[inline(always)]
fn next_varint(record: &[u8], at: &mut usize) -> Result<i32, &'static str> {
    let (v, n) = read_varint(record.get(*at..).unwrap_or_default()).ok_or("bad varint")?;
    *at += n;
    Ok(v)
}

/// Skips a length-prefixed byte string (-1 is null) at `*at`; returns
/// where its bytes start, or `None` for null.
#[inline(always)]
fn skip_bytes(record: &[u8], at: &mut usize) -> Result<Option<usize>, &'static str> {
    let n = next_varint(record, at)?;
    if n == -1 {
        return Ok(None);
    }
    let n = usize::try_from(n).map_err(|_| "negative length")?;
    if n > record.len().saturating_sub(*at) {
        return Err("length beyond record");
    }
    *at += n;
    Ok(Some(*at - n))
}

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
#[derive(Debug)]
pub struct BatchBuilder {
    /// The batch: room for the header, then the encoded records.
    body: BytesMut,
    count: i32,
    /// First record's timestamp; deltas are relative to it.
    base_timestamp: i64,
    max_timestamp: i64,
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

fn put_bytes_field(out: &mut BytesMut, value: Option<&[u8]>) {
    match value {
        None => put_varint(out, -1),
        Some(v) => {
            put_varint(out, v.len() as i32);
            out.put_slice(v);
        }
    }
}

impl BatchBuilder {
    pub fn new() -> Self {
        Self::with_capacity(0)
    }
    /// A builder whose body buffer holds `bytes` before it must grow (a
    /// producer passes its batch size, so filling a batch never copies).
    pub fn with_capacity(bytes: usize) -> Self {
        let mut body = BytesMut::with_capacity(bytes.max(HEADER_LEN));
        body.resize(HEADER_LEN, 0); // the header, filled in by `build`
        BatchBuilder {
            body,
            count: 0,
            base_timestamp: -1,
            max_timestamp: -1,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
        }
    }
    /// Producer identity for idempotence; default -1/-1/-1.
    pub fn producer(mut self, producer_id: i64, producer_epoch: i16, base_sequence: i32) -> Self {
        self.producer_id = producer_id;
        self.producer_epoch = producer_epoch;
        self.base_sequence = base_sequence;
        self
    }
    pub fn push(
        &mut self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
    ) {
        if self.count == 0 {
            self.base_timestamp = timestamp_ms;
            self.max_timestamp = timestamp_ms;
        }
        self.max_timestamp = self.max_timestamp.max(timestamp_ms);
        // Encoded straight into the body: the record's length prefix is
        // computed from the field sizes first, so nothing is staged.
        let timestamp_delta = timestamp_ms.wrapping_sub(self.base_timestamp);
        let field_len = |v: Option<&[u8]>| v.map_or(1, |v| varint_len(v.len() as i32) + v.len());
        let mut len = 1
            + varlong_len(timestamp_delta)
            + varint_len(self.count)
            + field_len(key)
            + field_len(value)
            + varint_len(headers.len() as i32);
        for (hkey, hvalue) in headers {
            len += field_len(Some(hkey.as_bytes())) + field_len(*hvalue);
        }
        let out = &mut self.body;
        out.reserve(varint_len(len as i32) + len);
        put_varint(out, len as i32);
        out.put_i8(0); // record attributes (unused)
        put_varlong(out, timestamp_delta);
        put_varint(out, self.count);
        put_bytes_field(out, key);
        put_bytes_field(out, value);
        put_varint(out, headers.len() as i32);
        for (hkey, hvalue) in headers {
            put_bytes_field(out, Some(hkey.as_bytes()));
            put_bytes_field(out, *hvalue);
        }
        self.count += 1;
    }
    pub fn len(&self) -> usize {
        self.count as usize
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// Encoded size so far (header included).
    pub fn size_bytes(&self) -> usize {
        self.body.len()
    }
    pub fn build(self) -> BytesMut {
        let total = self.size_bytes();
        let mut out = self.body;
        let mut header = &mut out[..HEADER_LEN];
        header.put_i64(0); // base offset, assigned by the log
        header.put_i32((total - field::LOG_OVERHEAD) as i32);
        header.put_i32(-1); // partition leader epoch, stamped by the log
        header.put_u8(MAGIC);
        header.put_u32(0); // crc, filled below
        header.put_i16(0); // attributes
        header.put_i32(self.count - 1);
        header.put_i64(self.base_timestamp);
        header.put_i64(self.max_timestamp);
        header.put_i64(self.producer_id);
        header.put_i16(self.producer_epoch);
        header.put_i32(self.base_sequence);
        header.put_i32(self.count);
        debug_assert!(header.is_empty());
        seal_crc(&mut out);
        out
    }
}

/// A validated batch: header fields readable, CRC checked.
#[derive(Clone, Debug)]
pub struct RecordBatch {
    bytes: Bytes,
}

impl RecordBatch {
    /// Validates one whole batch (length, magic, CRC); `bytes` must hold
    /// exactly one batch.
    pub fn parse(bytes: Bytes) -> Result<RecordBatch> {
        let total = check_batch(&bytes)?;
        if total != bytes.len() {
            return Err(corrupt(format!(
                "batch length {total} but {} bytes given",
                bytes.len()
            )));
        }
        let batch = RecordBatch { bytes };
        batch.check_header()?;
        Ok(batch)
    }
    /// Splits concatenated batches (as returned by `Log::read`); a trailing
    /// partial batch is an error.
    pub fn parse_all(bytes: Bytes) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        let mut position = 0;
        while position < bytes.len() {
            let batch = RecordBatch::parse_prefix(&bytes, position).map_err(|e| match e {
                StorageError::CorruptBatch { reason } => {
                    corrupt(format!("at byte {position}: {reason}"))
                }
                other => other,
            })?;
            position += batch.size_bytes();
            out.push(batch);
        }
        Ok(out)
    }

    /// Splits concatenated batches that were already CRC-checked (what
    /// `Log::read` returns: the log verifies each batch it serves), checking
    /// framing and header sanity only; a trailing partial batch is an
    /// error. For the broker's fetch path, which must not pay for a second
    /// CRC pass.
    pub fn split_checked(bytes: Bytes) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        let mut position = 0;
        while position < bytes.len() {
            let total = match batch_len(&bytes[position..]) {
                Decode::Complete(total) => total,
                Decode::Incomplete(needed) => {
                    return Err(corrupt(format!(
                        "at byte {position}: truncated batch: {} bytes of {needed}",
                        bytes.len() - position
                    )))
                }
                Decode::Invalid(reason) => {
                    return Err(corrupt(format!("at byte {position}: {reason}")))
                }
            };
            let batch = RecordBatch {
                bytes: bytes.slice(position..position + total),
            };
            batch.check_header()?;
            position += total;
            out.push(batch);
        }
        Ok(out)
    }

    /// Validates the batch starting at `position` of `bytes` (length,
    /// magic, CRC once, header sanity) and returns it as a slice.
    fn parse_prefix(bytes: &Bytes, position: usize) -> Result<RecordBatch> {
        let total = check_batch(&bytes[position..])?;
        let batch = RecordBatch {
            bytes: bytes.slice(position..position + total),
        };
        batch.check_header()?;
        Ok(batch)
    }

    fn check_header(&self) -> Result<()> {
        if self.record_count() < 0 {
            return Err(corrupt(format!(
                "negative record count {}",
                self.record_count()
            )));
        }
        if self.last_offset_delta() < 0 && self.record_count() > 0 {
            return Err(corrupt(format!(
                "negative last offset delta {}",
                self.last_offset_delta()
            )));
        }
        Ok(())
    }

    pub fn base_offset(&self) -> i64 {
        be_i64(&self.bytes, field::BASE_OFFSET)
    }
    pub fn last_offset(&self) -> i64 {
        self.base_offset()
            .saturating_add(i64::from(self.last_offset_delta()))
    }
    /// `last_offset - base_offset`.
    pub fn last_offset_delta(&self) -> i32 {
        be_i32(&self.bytes, field::LAST_OFFSET_DELTA)
    }
    pub fn record_count(&self) -> i32 {
        be_i32(&self.bytes, field::RECORDS_COUNT)
    }
    pub fn leader_epoch(&self) -> i32 {
        be_i32(&self.bytes, field::PARTITION_LEADER_EPOCH)
    }
    pub fn attributes(&self) -> i16 {
        be_i16(&self.bytes, field::ATTRIBUTES)
    }
    /// True when the broker stamped the batch with log-append time.
    pub fn is_log_append_time(&self) -> bool {
        self.attributes() & ATTR_LOG_APPEND_TIME != 0
    }
    pub fn base_timestamp(&self) -> i64 {
        be_i64(&self.bytes, field::BASE_TIMESTAMP)
    }
    pub fn max_timestamp(&self) -> i64 {
        be_i64(&self.bytes, field::MAX_TIMESTAMP)
    }
    pub fn producer_id(&self) -> i64 {
        be_i64(&self.bytes, field::PRODUCER_ID)
    }
    pub fn producer_epoch(&self) -> i16 {
        be_i16(&self.bytes, field::PRODUCER_EPOCH)
    }
    pub fn base_sequence(&self) -> i32 {
        be_i32(&self.bytes, field::BASE_SEQUENCE)
    }
    pub fn size_bytes(&self) -> usize {
        self.bytes.len()
    }
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }
    /// The first record's key (None for a null key or no records),
    /// decoding that record only: where a batch whose producer named no
    /// partition is routed.
    fn first_key(&self) -> Result<Option<Bytes>> {
        let codec = self.attributes() & ATTR_COMPRESSION_MASK;
        if codec != 0 {
            return Err(corrupt(format!("unsupported compression codec {codec}")));
        }
        if self.record_count() <= 0 {
            return Ok(None);
        }
        let body = self.bytes.slice(HEADER_LEN..);
        let mut cursor = Cursor {
            buf: &body,
            position: 0,
        };
        let record = cursor
            .record(self.base_offset(), self.base_timestamp(), None)
            .map_err(|reason| corrupt(format!("record 0: {reason}")))?;
        Ok(record.key)
    }

    /// Decodes the records, zero-copy.
    pub fn records(&self) -> Result<Vec<Record>> {
        // Never trust the count for allocation: bound it by what the bytes
        // could possibly hold.
        let bound = usize::try_from(self.record_count())
            .unwrap_or(0)
            .min(self.bytes.len().saturating_sub(HEADER_LEN) / RECORD_BYTES_MIN);
        let mut records = Vec::with_capacity(bound);
        self.for_each_record_from(i64::MIN, |r| {
            records.push(r);
            true
        })?;
        Ok(records)
    }

    /// The records at or after `from_offset`, one at a time, until `each`
    /// returns false. Records below `from_offset` are skipped by their
    /// length (their key, value and headers are not decoded), and nothing
    /// is collected: a reader wanting a few records from the middle of a
    /// large batch does not decode, nor hold, the whole of it. Checked as
    /// [`RecordBatch::records`] checks what it reads (the trailing bytes
    /// only when it reached the end).
    pub fn for_each_record_from(
        &self,
        from_offset: i64,
        mut each: impl FnMut(Record) -> bool,
    ) -> Result<()> {
        let codec = self.attributes() & ATTR_COMPRESSION_MASK;
        if codec != 0 {
            return Err(corrupt(format!("unsupported compression codec {codec}")));
        }
        let count = self.record_count();
        let body = self.bytes.slice(HEADER_LEN..);
        let count_usize = usize::try_from(count)
            .map_err(|_| corrupt(format!("negative record count {count}")))?;
        let mut cursor = Cursor {
            buf: &body,
            position: 0,
        };
        let log_append_time = self.is_log_append_time().then(|| self.max_timestamp());
        // Offsets grow within a batch: once one record is at or past
        // `from_offset`, the rest are too (and none is skipped when the
        // batch starts there).
        let mut skipping = from_offset > self.base_offset();
        for index in 0..count_usize {
            if skipping {
                let skipped = cursor
                    .skip_below(self.base_offset(), from_offset)
                    .map_err(|reason| corrupt(format!("record {index}: {reason}")))?;
                if skipped {
                    continue;
                }
                skipping = false;
            }
            let record = cursor
                .record(self.base_offset(), self.base_timestamp(), log_append_time)
                .map_err(|reason| corrupt(format!("record {index}: {reason}")))?;
            if !each(record) {
                return Ok(());
            }
        }
        if cursor.position != body.len() {
            return Err(corrupt(format!(
                "{} trailing bytes after {count} records",
                body.len() - cursor.position
            )));
        }
        Ok(())
    }
}

/// A bounds-checked reader over a batch body.
struct Cursor<'a> {
    buf: &'a Bytes,
    position: usize,
}

impl Cursor<'_> {
    fn varint(&mut self) -> Result<i32, &'static str> {
        let (v, used) = read_varint(&self.buf[self.position..]).ok_or("bad varint")?;
        self.position += used;
        Ok(v)
    }
    fn varlong(&mut self) -> Result<i64, &'static str> {
        let (v, used) = read_varlong(&self.buf[self.position..]).ok_or("bad varlong")?;
        self.position += used;
        Ok(v)
    }
    fn i8(&mut self) -> Result<i8, &'static str> {
        let b = *self.buf.get(self.position).ok_or("truncated")?;
        self.position += 1;
        Ok(b as i8)
    }
    /// A length-prefixed byte field; -1 means null.
    fn bytes(&mut self, end: usize) -> Result<Option<Bytes>, &'static str> {
        let len = self.varint()?;
        if len == -1 {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| "negative length")?;
        if len > end.saturating_sub(self.position) {
            return Err("length beyond record");
        }
        let out = self.buf.slice(self.position..self.position + len);
        self.position += len;
        Ok(Some(out))
    }
    /// A record's length and the fields before its key: (where the record
    /// ends, timestamp delta, offset delta). Attributes are unused.
    fn record_head(&mut self) -> Result<(usize, i64, i32), &'static str> {
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| "negative record length")?;
        if len > self.buf.len() - self.position {
            return Err("record length beyond batch");
        }
        let end = self.position + len;
        let _attributes = self.i8()?;
        let timestamp_delta = self.varlong()?;
        let offset_delta = self.varint()?;
        Ok((end, timestamp_delta, offset_delta))
    }

    /// Skips the next record when its offset is below `from`, reading only
    /// its length and the fields before its offset delta; whether it did
    /// (if not, the cursor is where it was).
    fn skip_below(&mut self, base_offset: i64, from: i64) -> Result<bool, &'static str> {
        let start = self.position;
        let (end, _, offset_delta) = self.record_head()?;
        if self.position > end {
            return Err("record length does not match its fields");
        }
        let offset = base_offset
            .checked_add(i64::from(offset_delta))
            .ok_or("offset overflow")?;
        if offset < from {
            self.position = end;
            Ok(true)
        } else {
            self.position = start;
            Ok(false)
        }
    }

    fn record(
        &mut self,
        base_offset: i64,
        base_timestamp: i64,
        log_append_time: Option<i64>,
    ) -> Result<Record, &'static str> {
        let (end, timestamp_delta, offset_delta) = self.record_head()?;
        let key = self.bytes(end)?;
        let value = self.bytes(end)?;
        let header_count = self.varint()?;
        let header_count = usize::try_from(header_count).map_err(|_| "negative header count")?;
        // Each header takes at least two bytes.
        let mut headers =
            Vec::with_capacity(header_count.min(end.saturating_sub(self.position) / 2));
        for _ in 0..header_count {
            let key = self.bytes(end)?.ok_or("null header key")?;
            let key = String::from_utf8(key.to_vec()).map_err(|_| "header key not utf-8")?;
            let value = self.bytes(end)?;
            headers.push(Header { key, value });
        }
        if self.position != end {
            return Err("record length does not match its fields");
        }
        let timestamp_ms = match log_append_time {
            Some(t) => t,
            None => base_timestamp
                .checked_add(timestamp_delta)
                .ok_or("timestamp overflow")?,
        };
        Ok(Record {
            offset: base_offset
                .checked_add(i64::from(offset_delta))
                .ok_or("offset overflow")?,
            timestamp_ms,
            key,
            value,
            headers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BytesMut {
        let mut b = BatchBuilder::new().producer(7, 1, 3);
        b.push(
            1000,
            Some(b"k1"),
            Some(b"v1"),
            &[("h", Some(b"x")), ("n", None)],
        );
        b.push(990, None, Some(b"v2"), &[]);
        b.push(1010, Some(b""), None, &[]);
        b.build()
    }

    /// Records from an offset, one at a time, stopping when asked: the
    /// same records `records` gives from there.
    #[test]
    fn records_from_an_offset_skip_and_stop() {
        let batch = RecordBatch::parse(sample().freeze()).unwrap();
        let all = batch.records().unwrap();
        for from in 0..4 {
            let mut seen = Vec::new();
            batch
                .for_each_record_from(from, |r| {
                    seen.push(r);
                    true
                })
                .unwrap();
            assert_eq!(seen, all[from.min(3) as usize..].to_vec(), "from {from}");
        }
        let mut first = Vec::new();
        batch
            .for_each_record_from(1, |r| {
                first.push(r);
                false
            })
            .unwrap();
        assert_eq!(first, all[1..2].to_vec());
    }

    #[test]
    fn builds_and_decodes() {
        let bytes = sample().freeze();
        let batch = RecordBatch::parse(bytes.clone()).unwrap();
        assert_eq!(batch.size_bytes(), bytes.len());
        assert_eq!(batch.record_count(), 3);
        assert_eq!(batch.last_offset(), 2);
        assert_eq!(batch.max_timestamp(), 1010);
        assert_eq!(batch.producer_id(), 7);
        let records = batch.records().unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[0].key.as_deref(), Some(&b"k1"[..]));
        assert_eq!(records[0].headers[0].key, "h");
        assert_eq!(records[0].headers[1].value, None);
        assert_eq!(records[1].timestamp_ms, 990);
        assert_eq!(records[1].key, None);
        assert_eq!(records[2].value, None);
        assert_eq!(records[2].offset, 2);
        validate_for_append(bytes).unwrap();
    }

    #[test]
    fn offset_and_epoch_rewrite_keep_crc() {
        let mut b = sample();
        set_base_offset(&mut b, 100);
        set_leader_epoch(&mut b, 9);
        let batch = RecordBatch::parse(b.freeze()).unwrap();
        assert_eq!(batch.base_offset(), 100);
        assert_eq!(batch.leader_epoch(), 9);
        assert_eq!(batch.records().unwrap()[2].offset, 102);
    }

    /// Negative lengths other than -1 (null) are refused by the common
    /// layout's fast path as by the general walk, even where the bytes
    /// after them would line up as a record.
    #[test]
    fn odd_lengths_in_the_common_layout_are_refused() {
        let mut builder = BatchBuilder::new();
        builder.push(5, Some(b"k"), Some(b"v"), &[]);
        let good = builder.build().to_vec();
        // [length, attributes, timestamp delta, offset delta, key length,
        //  'k', value length, 'v', header count]
        let record = &good[HEADER_LEN..];
        assert_eq!(record, [0x10, 0, 0, 0, 0x02, b'k', 0x02, b'v', 0]);
        assert_eq!(validate_batch(&good).unwrap(), 1);
        // Key length -2 or -3, value length -2, header count -1.
        for (at, byte) in [(4, 0x03), (4, 0x05), (6, 0x03), (8, 0x01)] {
            let mut b = good.clone();
            b[HEADER_LEN + at] = byte;
            fix_crc(&mut b);
            assert!(validate_batch(&b).is_err(), "byte {at} = {byte:#x}");
            let full = RecordBatch::parse(Bytes::from(b)).and_then(|b| b.records());
            assert!(full.is_err(), "byte {at} = {byte:#x}");
        }
    }

    #[test]
    fn base_sequence_rewrite_keeps_the_batch_valid() {
        let mut b = BatchBuilder::new().producer(7, 2, 40);
        b.push(1, None, Some(b"a"), &[]);
        b.push(2, None, Some(b"b"), &[]);
        let mut b = b.build();
        assert_eq!(producer_fields(&b), Some((7, 2, 40)));
        set_base_sequence(&mut b, 3);
        assert_eq!(producer_fields(&b), Some((7, 2, 3)));
        assert_eq!(validate_batch(&b).unwrap(), 2);
        assert_eq!(producer_fields(&b[..HEADER_LEN - 1]), None);
    }

    #[test]
    fn log_append_time_overrides_timestamps() {
        let mut b = sample();
        set_log_append_time(&mut b, 5555);
        let batch = RecordBatch::parse(b.freeze()).unwrap();
        assert!(batch.is_log_append_time());
        assert!(batch
            .records()
            .unwrap()
            .iter()
            .all(|r| r.timestamp_ms == 5555));
    }

    #[test]
    fn framing_states() {
        let b = sample();
        assert_eq!(batch_len(&b[..5]), Decode::Incomplete(12));
        assert_eq!(batch_len(&b[..20]), Decode::Incomplete(b.len()));
        assert_eq!(batch_len(&b), Decode::Complete(b.len()));
        let mut bad = b.clone();
        bad[field::MAGIC] = 1;
        assert_eq!(batch_len(&bad), Decode::Invalid("unknown magic"));
        let mut bad = b.clone();
        bad[8..12].copy_from_slice(&3i32.to_be_bytes());
        assert!(matches!(batch_len(&bad), Decode::Invalid(_)));
    }

    #[test]
    fn crc_flip_is_detected() {
        let mut b = sample();
        let last = b.len() - 1;
        b[last] ^= 1;
        assert!(matches!(
            RecordBatch::parse(b.freeze()),
            Err(StorageError::CorruptBatch { .. })
        ));
    }

    #[test]
    fn huge_record_count_does_not_allocate() {
        let mut b = sample();
        b[field::RECORDS_COUNT..field::RECORDS_COUNT + 4].copy_from_slice(&i32::MAX.to_be_bytes());
        fix_crc(&mut b);
        let batch = RecordBatch::parse(b.freeze()).unwrap();
        assert!(matches!(
            batch.records(),
            Err(StorageError::CorruptBatch { .. })
        ));
    }

    #[test]
    fn validation_rejects_bad_counts_and_empty() {
        let empty = BatchBuilder::new().build().freeze();
        assert!(matches!(
            validate_for_append(empty),
            Err(StorageError::EmptyBatch)
        ));
        let mut b = sample();
        b[field::LAST_OFFSET_DELTA..field::LAST_OFFSET_DELTA + 4]
            .copy_from_slice(&5i32.to_be_bytes());
        fix_crc(&mut b);
        assert!(matches!(
            validate_for_append(b.freeze()),
            Err(StorageError::CorruptBatch { .. })
        ));
    }

    /// Re-signs `b` after a test edit.
    fn fix_crc(b: &mut [u8]) {
        super::seal_crc(b);
    }

    #[test]
    fn light_validation_counts_and_rejects() {
        assert_eq!(validate_batch(&sample()).unwrap(), 3);
        assert!(matches!(
            validate_batch(&BatchBuilder::new().build()),
            Err(StorageError::EmptyBatch)
        ));
        // CRC still checked.
        let mut b = sample();
        let last = b.len() - 1;
        b[last] ^= 1;
        assert!(validate_batch(&b).is_err());
        // A max timestamp that is not the largest record timestamp.
        let mut b = sample();
        b[field::MAX_TIMESTAMP..field::MAX_TIMESTAMP + 8].copy_from_slice(&999i64.to_be_bytes());
        fix_crc(&mut b);
        assert!(validate_batch(&b).is_err());
        // ... unless the batch carries log-append time.
        set_log_append_time(&mut b, 999);
        assert_eq!(validate_batch(&b).unwrap(), 3);
        // Compression is not supported.
        let mut b = sample();
        b[field::ATTRIBUTES + 1] |= 1;
        fix_crc(&mut b);
        assert!(validate_batch(&b).is_err());
        // A count that disagrees with the records (and the delta).
        let mut b = sample();
        b[field::RECORDS_COUNT..field::RECORDS_COUNT + 4].copy_from_slice(&2i32.to_be_bytes());
        b[field::LAST_OFFSET_DELTA..field::LAST_OFFSET_DELTA + 4]
            .copy_from_slice(&1i32.to_be_bytes());
        fix_crc(&mut b);
        assert!(validate_batch(&b)
            .unwrap_err()
            .to_string()
            .contains("trailing bytes"));
        // Offset deltas must be 0..n: swap the first record's delta.
        let mut one = BatchBuilder::new();
        one.push(5, None, Some(b"v"), &[]);
        let mut b = one.build();
        // header | len | attrs | ts delta | offset delta (0 -> 1)
        b[HEADER_LEN + 3] = 2;
        fix_crc(&mut b);
        assert!(validate_batch(&b)
            .unwrap_err()
            .to_string()
            .contains("offset delta"));
        // A header key that is not UTF-8.
        let mut h = BatchBuilder::new();
        h.push(5, None, None, &[("k", None)]);
        let mut b = h.build();
        let at = b.iter().rposition(|&c| c == b'k').unwrap();
        b[at] = 0xff;
        fix_crc(&mut b);
        assert!(validate_batch(&b)
            .unwrap_err()
            .to_string()
            .contains("utf-8"));
        assert!(RecordBatch::parse(b.freeze()).unwrap().records().is_err());
    }

    #[test]
    fn builder_capacity_does_not_change_the_bytes() {
        let mut small = BatchBuilder::new().producer(7, 1, 3);
        let mut big = BatchBuilder::with_capacity(1 << 16).producer(7, 1, 3);
        for b in [&mut small, &mut big] {
            b.push(1000, Some(b"k"), Some(&[9u8; 300]), &[("h", Some(b"x"))]);
            b.push(1001, None, None, &[]);
        }
        assert_eq!(small.size_bytes(), big.size_bytes());
        let (small, big) = (small.build(), big.build());
        assert_eq!(small, big);
        assert_eq!(
            small.len(),
            RecordBatch::parse(small.freeze()).unwrap().size_bytes()
        );
    }

    #[test]
    fn split_checked_frames_without_crc() {
        let mut two = BytesMut::new();
        two.extend_from_slice(&sample());
        two.extend_from_slice(&sample());
        let split = RecordBatch::split_checked(two.clone().freeze()).unwrap();
        assert_eq!(split.len(), 2);
        assert_eq!(split[1].records().unwrap().len(), 3);
        // No CRC pass: the caller (Log::read) did that already.
        let last = two.len() - 1;
        two[last] ^= 1;
        assert_eq!(
            RecordBatch::split_checked(two.clone().freeze())
                .unwrap()
                .len(),
            2
        );
        assert!(RecordBatch::parse_all(two.clone().freeze()).is_err());
        // But framing is checked.
        two.extend_from_slice(&sample()[..30]);
        assert!(RecordBatch::split_checked(two.freeze()).is_err());
    }

    #[test]
    fn parse_all_splits_and_rejects_partial_tail() {
        let one = sample();
        let mut two = BytesMut::new();
        two.extend_from_slice(&one);
        two.extend_from_slice(&one);
        assert_eq!(
            RecordBatch::parse_all(two.clone().freeze()).unwrap().len(),
            2
        );
        two.extend_from_slice(&one[..30]);
        assert!(RecordBatch::parse_all(two.freeze()).is_err());
    }
}
