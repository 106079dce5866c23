//! CRC32C (Castagnoli) of record batches, the one checksum the log format
//! uses.
//!
//! Every produced batch is checksummed by the producer and checked by the
//! leader and by every follower, so this runs over every byte several
//! times. The `crc32c` crate runs the SSE 4.2 `crc32` instruction three
//! streams at a time, about 8 bytes a cycle. On x86-64 machines with
//! AVX-512 and `VPCLMULQDQ`, runs of 256 bytes or more are folded here
//! with carry-less multiplies instead, 256 bytes per loop (Intel's "Fast
//! CRC Computation for Generic Polynomials Using PCLMULQDQ" method, on
//! 512-bit registers), and the last 16 bytes of the fold are reduced with
//! the `crc32` instruction. Everywhere else, and for short inputs and
//! tails, the `crc32c` crate computes it; tests check the two agree.

/// CRC32C of `data`.
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

/// CRC32C of the bytes whose CRC32C so far is `crc`, followed by `data`
/// (the same contract as [`crc32c::crc32c_append`]).
#[inline]
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if data.len() >= fold::MIN_BYTES && fold::available() {
        // SAFETY: `available` has checked that this CPU has every target
        // feature `fold::crc32c_append` is compiled with.
        #[allow(unsafe_code)]
        return unsafe { fold::crc32c_append(crc, data) };
    }
    crc32c::crc32c_append(crc, data)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod fold {
    //! The carry-less multiply fold.
    //!
    //! Conventions (reflected CRC): 16 message bytes loaded little-endian
    //! into a 128-bit register form a polynomial whose register bit `j` is
    //! the coefficient of `x^(127 - j)`; earlier bytes are higher powers.
    //! Moving such a block `d` bytes further down the message multiplies
    //! it by `x^(8d)`: its low 64-bit lane (the higher powers) by
    //! `x^(8d + 64)`, its high lane by `x^(8d)`, each reduced modulo the
    //! CRC polynomial P to 32 bits. A carry-less multiply of two reflected
    //! 64-bit values lands its product one bit short of a reflected 128-bit
    //! result, so the keys are one power lower: `x^(8d + 63)` and
    //! `x^(8d - 1)`. The products fit in 96 bits, and XORed with the block
    //! found `d` bytes on they are congruent to both together.

    use std::arch::x86_64::{
        __m128i, __m512i, _mm512_broadcast_i32x4, _mm512_clmulepi64_epi128,
        _mm512_extracti32x4_epi32, _mm512_loadu_si512, _mm512_set_epi64, _mm512_ternarylogic_epi64,
        _mm512_xor_si512, _mm_clmulepi64_si128, _mm_crc32_u64, _mm_cvtsi128_si64,
        _mm_extract_epi64, _mm_loadu_si128, _mm_set_epi64x, _mm_xor_si128,
    };

    /// Shortest input folded (one 256-byte block for the four registers).
    pub(super) const MIN_BYTES: usize = 256;

    /// CRC32C's generator polynomial, x^32 + ... + 1 (not reflected).
    const POLY: u64 = 0x1_1EDC_6F41;

    /// `x^n mod P`, bit `e` the coefficient of `x^e` (not reflected).
    const fn x_pow_mod_p(n: u32) -> u32 {
        let mut r: u64 = 1;
        let mut i = 0;
        while i < n {
            r <<= 1;
            if r & (1 << 32) != 0 {
                r ^= POLY;
            }
            i += 1;
        }
        r as u32
    }

    /// A degree < 32 polynomial as a reflected 64-bit operand (the
    /// coefficient of `x^e` at bit `63 - e`).
    const fn reflected(p: u32) -> u64 {
        (p.reverse_bits() as u64) << 32
    }

    /// Keys that move a 128-bit block `bytes` further on: (low lane's,
    /// high lane's).
    const fn keys(bytes: u32) -> (u64, u64) {
        (
            reflected(x_pow_mod_p(8 * bytes + 63)),
            reflected(x_pow_mod_p(8 * bytes - 1)),
        )
    }

    const K256: (u64, u64) = keys(256);
    const K64: (u64, u64) = keys(64);
    const K48: (u64, u64) = keys(48);
    const K32: (u64, u64) = keys(32);
    const K16: (u64, u64) = keys(16);

    pub(super) fn available() -> bool {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("vpclmulqdq")
            && std::is_x86_feature_detected!("pclmulqdq")
            && std::is_x86_feature_detected!("sse4.2")
    }

    #[inline]
    #[target_feature(enable = "sse2")]
    fn key128(k: (u64, u64)) -> __m128i {
        _mm_set_epi64x(k.1 as i64, k.0 as i64)
    }

    /// `x` moved on by the distance `k` was made for.
    #[inline]
    #[target_feature(enable = "pclmulqdq")]
    fn fold128(x: __m128i, k: __m128i) -> __m128i {
        _mm_xor_si128(
            _mm_clmulepi64_si128::<0x00>(x, k),
            _mm_clmulepi64_si128::<0x11>(x, k),
        )
    }

    /// Each of `x`'s four blocks moved on by `k`'s distance, XORed with
    /// the four blocks of `next`.
    #[inline]
    #[target_feature(enable = "avx512f,vpclmulqdq")]
    fn fold512(x: __m512i, k: __m512i, next: __m512i) -> __m512i {
        _mm512_ternarylogic_epi64::<0x96>(
            _mm512_clmulepi64_epi128::<0x00>(x, k),
            _mm512_clmulepi64_epi128::<0x11>(x, k),
            next,
        )
    }

    /// # Safety
    /// The CPU must have every feature [`available`] checks, and
    /// `data.len() >= MIN_BYTES`.
    #[target_feature(enable = "avx512f,vpclmulqdq,pclmulqdq,sse4.2,sse4.1")]
    pub(super) unsafe fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
        assert!(data.len() >= MIN_BYTES);
        let load512 = |at: usize| -> __m512i {
            let block = &data[at..at + 64];
            // SAFETY: `block` is 64 readable bytes; the load is unaligned.
            unsafe { _mm512_loadu_si512(block.as_ptr().cast()) }
        };
        let load128 = |at: usize| -> __m128i {
            let block = &data[at..at + 16];
            // SAFETY: `block` is 16 readable bytes; the load is unaligned.
            unsafe { _mm_loadu_si128(block.as_ptr().cast()) }
        };
        // The running CRC enters as its inverse XORed into the first four
        // bytes, as the `crc32` instruction takes it.
        let start = _mm512_set_epi64(0, 0, 0, 0, 0, 0, 0, i64::from(!crc));
        let mut x0 = _mm512_xor_si512(load512(0), start);
        let mut x1 = load512(64);
        let mut x2 = load512(128);
        let mut x3 = load512(192);
        let mut at = 256;
        let k256 = _mm512_broadcast_i32x4(key128(K256));
        while data.len() - at >= 256 {
            x0 = fold512(x0, k256, load512(at));
            x1 = fold512(x1, k256, load512(at + 64));
            x2 = fold512(x2, k256, load512(at + 128));
            x3 = fold512(x3, k256, load512(at + 192));
            at += 256;
        }
        // Four registers into one, then the whole 64 bytes that are left.
        let k64 = _mm512_broadcast_i32x4(key128(K64));
        x1 = fold512(x0, k64, x1);
        x2 = fold512(x1, k64, x2);
        let mut x = fold512(x2, k64, x3);
        while data.len() - at >= 64 {
            x = fold512(x, k64, load512(at));
            at += 64;
        }
        // Its four 16-byte blocks into one, then the whole 16 bytes left.
        let mut r = _mm_xor_si128(
            _mm512_extracti32x4_epi32::<3>(x),
            _mm_xor_si128(
                fold128(_mm512_extracti32x4_epi32::<0>(x), key128(K48)),
                _mm_xor_si128(
                    fold128(_mm512_extracti32x4_epi32::<1>(x), key128(K32)),
                    fold128(_mm512_extracti32x4_epi32::<2>(x), key128(K16)),
                ),
            ),
        );
        let k16 = key128(K16);
        while data.len() - at >= 16 {
            r = _mm_xor_si128(fold128(r, k16), load128(at));
            at += 16;
        }
        // The last block as 16 message bytes after a zero CRC state.
        let state = _mm_crc32_u64(0, _mm_cvtsi128_si64(r) as u64);
        let state = _mm_crc32_u64(state, _mm_extract_epi64::<1>(r) as u64) as u32;
        crc32c::crc32c_append(!state, &data[at..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn matches_the_crc32c_crate_at_every_length_around_the_fold_sizes() {
        let data = bytes(4096 + 64, 7);
        for len in (0..1100).chain(4000..4096 + 64) {
            for skip in [0, 1, 3] {
                let d = &data[skip..skip + len.min(data.len() - skip)];
                assert_eq!(crc32c(d), crc32c::crc32c(d), "len {} skip {skip}", d.len());
            }
        }
    }

    #[test]
    fn known_answer() {
        // RFC 3720, B.4: 32 bytes of zeros, and 32 of 0xff.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        // And long enough to be folded.
        let long = vec![0xffu8; 4096];
        assert_eq!(crc32c(&long), crc32c::crc32c(&long));
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_fold_itself_matches_where_the_cpu_has_it() {
        if !fold::available() {
            eprintln!("no AVX-512 VPCLMULQDQ here: only the crate's path is checked");
            return;
        }
        let data = bytes(70_000, 11);
        for len in [256, 257, 300, 511, 512, 1000, 16_384, 65_536, 69_999] {
            for crc in [0, 1, 0xdead_beef] {
                // SAFETY: the features were checked above; len >= 256.
                #[allow(unsafe_code)]
                let got = unsafe { fold::crc32c_append(crc, &data[..len]) };
                assert_eq!(got, crc32c::crc32c_append(crc, &data[..len]), "len {len}");
            }
        }
    }

    proptest! {
        #[test]
        fn appending_in_pieces_matches_the_crate(
            data in proptest::collection::vec(any::<u8>(), 0..3000),
            cut in 0usize..3000,
            crc in any::<u32>(),
        ) {
            let cut = cut.min(data.len());
            let whole = crc32c_append(crc, &data);
            prop_assert_eq!(whole, crc32c::crc32c_append(crc, &data));
            let pieces = crc32c_append(crc32c_append(crc, &data[..cut]), &data[cut..]);
            prop_assert_eq!(pieces, whole);
        }
    }
}
