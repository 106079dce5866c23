//! Zigzag varints (protobuf style), as used inside records. Total decoders:
//! they return `None` on truncated or over-long input instead of panicking.

use bytes::BufMut;

/// Longest varint encoding of a 32-bit value.
const VARINT_BYTES_MAX: usize = 5;
/// Longest varint encoding of a 64-bit value.
const VARLONG_BYTES_MAX: usize = 10;

#[inline(always)]
fn read_unsigned(buf: &[u8], bytes_max: usize) -> Option<(u64, usize)> {
    // Fast paths: nearly every field inside a record (attributes, small
    // deltas, null keys, lengths under 8 KiB) fits in one or two bytes,
    // and the batch validator walks every record of every produced batch.
    match *buf {
        [b0, ..] if b0 < 0x80 => Some((u64::from(b0), 1)),
        [b0, b1, ..] if b1 < 0x80 => Some((u64::from(b0 & 0x7f) | (u64::from(b1) << 7), 2)),
        _ => read_unsigned_long(buf, bytes_max),
    }
}

#[cold]
#[inline(never)]
fn read_unsigned_long(buf: &[u8], bytes_max: usize) -> Option<(u64, usize)> {
    let mut value: u64 = 0;
    for (i, &b) in buf.iter().enumerate().take(bytes_max) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Decodes a zigzag varint; returns the value and the bytes consumed.
#[inline(always)]
pub(crate) fn read_varint(buf: &[u8]) -> Option<(i32, usize)> {
    let (raw, used) = read_unsigned(buf, VARINT_BYTES_MAX)?;
    let raw = u32::try_from(raw).ok()?;
    Some((((raw >> 1) as i32) ^ -((raw & 1) as i32), used))
}

/// Decodes a zigzag varlong; returns the value and the bytes consumed.
#[inline(always)]
pub(crate) fn read_varlong(buf: &[u8]) -> Option<(i64, usize)> {
    let (raw, used) = read_unsigned(buf, VARLONG_BYTES_MAX)?;
    if used == VARLONG_BYTES_MAX && buf[VARLONG_BYTES_MAX - 1] > 1 {
        return None; // more than 64 bits
    }
    Some((((raw >> 1) as i64) ^ -((raw & 1) as i64), used))
}

fn put_unsigned(out: &mut impl BufMut, mut raw: u64) {
    while raw >= 0x80 {
        out.put_u8((raw as u8) | 0x80);
        raw >>= 7;
    }
    out.put_u8(raw as u8);
}

pub(crate) fn put_varint(out: &mut impl BufMut, value: i32) {
    put_unsigned(out, u64::from(((value << 1) ^ (value >> 31)) as u32));
}

pub(crate) fn put_varlong(out: &mut impl BufMut, value: i64) {
    put_unsigned(out, ((value << 1) ^ (value >> 63)) as u64);
}

/// Encoded size of a zigzag varint.
pub(crate) fn varint_len(value: i32) -> usize {
    unsigned_len(u64::from(((value << 1) ^ (value >> 31)) as u32))
}

/// Encoded size of a zigzag varlong.
pub(crate) fn varlong_len(value: i64) -> usize {
    unsigned_len(((value << 1) ^ (value >> 63)) as u64)
}

fn unsigned_len(mut raw: u64) -> usize {
    let mut len = 1;
    while raw >= 0x80 {
        raw >>= 7;
        len += 1;
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_edges() {
        for v in [0, 1, -1, 63, -64, 64, i32::MAX, i32::MIN] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v));
            assert_eq!(read_varint(&b), Some((v, b.len())));
        }
        for v in [0i64, -1, i64::MAX, i64::MIN, 1 << 40] {
            let mut b = Vec::new();
            put_varlong(&mut b, v);
            assert_eq!(b.len(), varlong_len(v));
            assert_eq!(read_varlong(&b), Some((v, b.len())));
        }
    }

    /// The one- and two-byte fast paths agree with the general decoder
    /// for every value that takes up to three bytes.
    #[test]
    fn fast_paths_match_the_general_decoder() {
        for v in -(1 << 20)..(1 << 20) {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            b.push(0xff); // trailing bytes are not consumed
            let raw = read_unsigned_long(&b, VARINT_BYTES_MAX).unwrap();
            assert_eq!(read_unsigned(&b, VARINT_BYTES_MAX), Some(raw));
            assert_eq!(read_varint(&b), Some((v, b.len() - 1)));
        }
        assert_eq!(read_varint(&[0x80, 0x80]), None); // truncated after two
    }

    #[test]
    fn rejects_truncated_and_overlong() {
        assert_eq!(read_varint(&[0x80]), None);
        assert_eq!(read_varint(&[]), None);
        assert_eq!(read_varint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01]), None);
        assert_eq!(read_varint(&[0xff, 0xff, 0xff, 0xff, 0x7f]), None); // > u32
        assert_eq!(read_varlong(&[0xff; 11]), None);
        assert_eq!(
            read_varlong(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]),
            None
        );
    }
}
