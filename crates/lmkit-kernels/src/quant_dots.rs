//! 8-bit dot products for the GGUF block types besides Q4_1 and Q8_0 (those are in
//! [`crate::quant`]), as llama.cpp computes them: Q4_0 and Q5_0 against activations in ggml's
//! Q8_0 blocks, Q5_1 against Q8_1, and the K-quants Q2_K to Q6_K against Q8_K
//! super-blocks (256 values, one f32 scale, the sums of each 16). AVX2 where the CPU has it,
//! one value at a time elsewhere; on lmkit's threads through [`crate::quant`]'s column tiles.
//!
//! These are the types of llama.cpp's Q2_K, Q3_K_M, Q4_K_M and Q5_K_M files (with Q5_0/Q5_1
//! where a tensor's rows are not whole 256-value super-blocks). Decoding steps multiply a few rows, where the
//! tiles do not pay ([`crate::quant::TILE_MIN_ROWS`]). Candle's quantized product runs on a
//! thread pool of its own, which competes with lmkit's for the cores: a Q4_K_M file decoded at a
//! fifth of llama.cpp's speed on it (see README).

use crate::quant::{f16_at, tiled_product, Q8_1, QK};
use candle_core::quantized::GgmlDType;

/// Values per K-quant super-block.
pub const QK_K: usize = 256;

/// The block types with dot products here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DotType {
    /// d (f16), 16 bytes of nibbles; a value is d·(q − 8).
    Q4_0,
    /// d (f16), 32 fifth bits, 16 bytes of nibbles; a value is d·(q − 16).
    Q5_0,
    /// d, m (f16), 32 fifth bits, 16 bytes of nibbles; a value is d·q + m.
    Q5_1,
    /// d, dmin (f16), 8 six-bit scales and mins, 128 bytes of nibbles; a value is
    /// d·scale·q − dmin·min of its 32-value sub-block.
    Q4K,
    /// As Q4_K with a fifth bit per value (32 bytes before the nibbles).
    Q5K,
    /// 128 bytes of low nibbles, 64 of high bit pairs, 16 signed 8-bit scales, d (f16); a value
    /// is d·scale·(q − 32) of its 16-value group.
    Q6K,
    /// 16 bytes of 4-bit scales (low nibbles) and mins (high), 64 bytes of 2-bit values, d and
    /// dmin (f16); a value is d·scale·q − dmin·min of its 16-value group.
    Q2K,
    /// 32 bytes of high bits, 64 of 2-bit low values, 12 bytes of 16 six-bit scales, d (f16); a
    /// value is d·(scale − 32)·(q − 4) of its 16-value group (q: 3 bits).
    Q3K,
}

impl DotType {
    /// The GGML types this module multiplies; `None` for the others.
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => DotType::Q4_0,
            GgmlDType::Q5_0 => DotType::Q5_0,
            GgmlDType::Q5_1 => DotType::Q5_1,
            GgmlDType::Q4K => DotType::Q4K,
            GgmlDType::Q5K => DotType::Q5K,
            GgmlDType::Q6K => DotType::Q6K,
            GgmlDType::Q2K => DotType::Q2K,
            GgmlDType::Q3K => DotType::Q3K,
            _ => return None,
        })
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            DotType::Q4_0 | DotType::Q5_0 | DotType::Q5_1 => QK,
            _ => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DotType::Q4_0 => 18,
            DotType::Q5_0 => 22,
            DotType::Q5_1 => 24,
            DotType::Q4K => 144,
            DotType::Q5K => 176,
            DotType::Q6K => 210,
            DotType::Q2K => 84,
            DotType::Q3K => 110,
        }
    }

    fn super_blocks(self) -> bool {
        self.block_values() == QK_K
    }
}

/// One activation super-block (ggml's Q8_K): scale d, 256 signed bytes, the sums of each 16.
#[derive(Clone, Copy)]
pub(crate) struct Q8K {
    pub(crate) d: f32,
    pub(crate) qs: [i8; QK_K],
    pub(crate) bsums: [i16; QK_K / 16],
}

impl Q8K {
    const ZERO: Q8K = Q8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
}

/// ggml's `quantize_row_q8_K_ref`, appending to `out`: per super-block, the value of largest
/// magnitude maps to −127, q = round-half-even(−127·x/max) (at most 127), d = −max/127 (f32).
#[cfg(test)]
pub(crate) fn quantize_q8_k(x: &[f32], out: &mut Vec<Q8K>) {
    let start = out.len();
    out.resize(start + x.len() / QK_K, Q8K::ZERO);
    quantize_q8_k_into(x, &mut out[start..]);
}

/// [`quantize_q8_k`] into `out`, a super-block for each 256 values of `x`: on AVX-512 where the
/// CPU has it (the same bytes and scales).
fn quantize_q8_k_into(x: &[f32], out: &mut [Q8K]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::simd_level() == 2 {
        for (block, q) in x.chunks_exact(QK_K).zip(out) {
            // SAFETY: level 2 means the CPU has AVX-512 F, BW, DQ and VL.
            *q = unsafe { avx512::q8_k_block(block) };
        }
        return;
    }
    quantize_q8_k_values(x, out);
}

crate::simd::simd_versions! {
    /// [`quantize_q8_k_into`] one value at a time (compiled for AVX2 too, where the compiler
    /// vectorises the rounding: without SSE4.1 it is a library call per value).
    fn quantize_q8_k_values(x: &[f32], out: &mut [Q8K]) {
        for (block, q) in x.chunks_exact(QK_K).zip(out) {
            *q = q8_k_block(block);
        }
    }
}

/// One Q8_K super-block, one value at a time: the reference the vector code equals, NaN, infinite
/// and subnormal values included (as Rust's casts treat them).
#[inline(always)]
fn q8_k_block(block: &[f32]) -> Q8K {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in block {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let mut b = Q8K::ZERO;
    if amax != 0.0 {
        let iscale = -127.0 / max;
        for (q, &v) in b.qs.iter_mut().zip(block) {
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
        for (s, g) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *s = g.iter().map(|&q| q as i16).sum();
        }
        b.d = 1.0 / iscale;
    }
    b
}

/// Rows of `xs` (each of `k` values, a multiple of 256) quantized to Q8_K super-blocks, row after
/// row (rows of a prompt on the team's threads).
pub(crate) fn quantize_rows_q8_k(xs: &[f32], k: usize) -> Vec<Q8K> {
    let mut q = vec![Q8K::ZERO; xs.len() / QK_K];
    crate::quant::by_rows(xs, k, &mut q, k / QK_K, quantize_q8_k_into);
    q
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::{Q8K, QK_K};
    use std::arch::x86_64::*;

    /// [`super::q8_k_block`] 16 values an instruction: the largest magnitude by `vmaxps` (which,
    /// as the reference's comparison, passes over NaN), the first value of that magnitude, then
    /// each value's rounding to nearest-even in the float range of an i32 (Rust's saturating
    /// cast), at most 127, and its low byte (Rust's `as i8`).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, DQ and VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(super) unsafe fn q8_k_block(block: &[f32]) -> Q8K {
        let block = &block[..QK_K];
        let mut top = _mm512_setzero_ps();
        for i in 0..16 {
            // max(NaN, top) is `top`: the second operand.
            top = _mm512_max_ps(_mm512_abs_ps(load16(block, i)), top);
        }
        let amax = _mm512_reduce_max_ps(top);
        let mut b = Q8K::ZERO;
        if amax == 0.0 {
            return b;
        }
        let mut max = 0f32;
        let wanted = _mm512_set1_ps(amax);
        for i in 0..16 {
            let hit = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(load16(block, i)), wanted);
            if hit != 0 {
                max = block[16 * i + hit.trailing_zeros() as usize];
                break;
            }
        }
        let iscale = -127.0 / max;
        let scale = _mm512_set1_ps(iscale);
        let (low, high) = (_mm512_set1_ps(-2147483648.0), _mm512_set1_ps(2147483520.0));
        let top_q = _mm512_set1_epi32(127);
        for i in 0..16 {
            let x = _mm512_mul_ps(scale, load16(block, i));
            // NaN becomes −2³¹ here (`vmaxps` returns its second operand), whose low byte is
            // the reference's 0.
            let x = _mm512_min_ps(_mm512_max_ps(x, low), high);
            let q =
                _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
            let q = _mm512_min_epi32(q, top_q);
            let bytes = _mm512_cvtepi32_epi8(q);
            let out = &mut b.qs[16 * i..16 * i + 16];
            // SAFETY: `out` holds 16 bytes.
            unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), bytes) };
            // The low bytes' sum, as the reference sums the stored bytes.
            b.bsums[i] = _mm512_reduce_add_epi32(_mm512_cvtepi8_epi32(bytes)) as i16;
        }
        b.d = 1.0 / iscale;
        b
    }

    /// Values 16i .. 16i + 16 of `x`.
    #[target_feature(enable = "avx512f")]
    pub(crate) fn load16(x: &[f32], i: usize) -> __m512 {
        let v = &x[16 * i..16 * i + 16];
        // SAFETY: `v` holds 16 f32.
        unsafe { _mm512_loadu_ps(v.as_ptr()) }
    }
}

/// Rows of `xs` (each of `k` values) times a weight [n, k] of type `ty` (its raw blocks)ᵀ against
/// activations quantized as llama.cpp quantizes them for the type: the rows' outputs, n values
/// each. The caller checks the sizes (k a whole number of blocks, `w` n rows of them).
pub fn dot_product(xs: &[f32], w: &[u8], ty: DotType, n: usize, k: usize) -> Vec<f32> {
    let blocks = k / ty.block_values();
    let row_bytes = blocks * ty.block_bytes();
    let sizes = (row_bytes, n, k);
    if ty.super_blocks() {
        let q = quantize_rows_q8_k(xs, k);
        let rows: Vec<&[Q8K]> = q.chunks_exact(blocks).collect();
        let one = |wr: &[u8], x: &[Q8K]| dots_k(ty, wr, [x])[0];
        return tiled_product(&rows, w, sizes, one, |wr, x| dots_k(ty, wr, x));
    }
    let q = crate::quant::quantize_rows_q8_1(xs, k);
    let rows: Vec<&[Q8_1]> = q.chunks_exact(blocks).collect();
    let one = |wr: &[u8], x: &[Q8_1]| dots_32(ty, wr, [x])[0];
    tiled_product(&rows, w, sizes, one, |wr, x| dots_32(ty, wr, x))
}

/// One weight row of a 32-value type against `R` activation rows (1 or 4: with 4, each weight
/// block decoded once).
fn dots_32<const R: usize>(ty: DotType, w: &[u8], x: [&[Q8_1]; R]) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::quant::vector() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked by `vector`).
            return unsafe { avx2::dots_32(ty, w, x) };
        }
    }
    x.map(|r| dot_32_scalar(ty, w, r))
}

/// One weight row of a K-quant type against `R` activation rows (as [`dots_32`]).
fn dots_k<const R: usize>(ty: DotType, w: &[u8], x: [&[Q8K]; R]) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::quant::vector() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked by `vector`).
            return unsafe {
                match ty {
                    DotType::Q6K => avx2::q6_k(w, x),
                    DotType::Q2K => avx2::q23_k(false, w, x),
                    DotType::Q3K => avx2::q23_k(true, w, x),
                    _ => avx2::q45_k(ty == DotType::Q5K, w, x),
                }
            };
        }
    }
    x.map(|r| dot_k_scalar(ty, w, r))
}

/// A 32-value block's quantized values: signed (Q4_0, Q5_0: offsets applied) or unsigned
/// (Q5_1, 0..=31), each fitting a byte.
fn values_32(ty: DotType, b: &[u8]) -> [i32; QK] {
    let (qh, qs) = match ty {
        DotType::Q4_0 => (0, &b[2..18]),
        DotType::Q5_0 => (u32::from_le_bytes([b[2], b[3], b[4], b[5]]), &b[6..22]),
        _ => (u32::from_le_bytes([b[4], b[5], b[6], b[7]]), &b[8..24]),
    };
    let mut v = [0i32; QK];
    for j in 0..QK / 2 {
        let (lo, hi) = ((qs[j] & 0x0F) as i32, (qs[j] >> 4) as i32);
        v[j] = lo | (((qh >> j) & 1) << 4) as i32;
        v[j + QK / 2] = hi | (((qh >> (j + QK / 2)) & 1) << 4) as i32;
    }
    let offset = match ty {
        DotType::Q4_0 => 8,
        DotType::Q5_0 => 16,
        _ => 0,
    };
    v.map(|q| q - offset)
}

/// One row of a 32-value type against one activation row, one value at a time.
fn dot_32_scalar(ty: DotType, w: &[u8], x: &[Q8_1]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(ty.block_bytes()).zip(x) {
        let sumi: i32 = values_32(ty, b)
            .iter()
            .zip(&y.qs)
            .map(|(&q, &v)| q * v as i32)
            .sum();
        acc += sumi as f32 * f16_at(b, 0) * y.d;
        if ty == DotType::Q5_1 {
            acc += f16_at(b, 2) * y.s;
        }
    }
    acc
}

/// Q4_K's and Q5_K's eight 6-bit scales and eight 6-bit mins, packed in 12 bytes.
fn k4_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// Q3_K's sixteen 6-bit scales (before their offset of 32), packed in 12 bytes: the low
/// nibbles of bytes 0..8 then their high nibbles, the top bit pairs in bytes 8..12.
#[inline(always)]
fn q3_scales(s: &[u8]) -> [u8; 16] {
    let mut sc = [0u8; 16];
    for (g, sc) in sc.iter_mut().enumerate() {
        let (q, i) = (g / 4, g % 4);
        let low = s[4 * (q % 2) + i] >> (4 * (q / 2)) & 0x0F;
        *sc = low | ((s[8 + i] >> (2 * q)) & 3) << 4;
    }
    sc
}

/// A K-quant super-block's 256 unsigned quantized values (before Q6_K's offset of 32 and Q3_K's
/// of 4).
fn values_k(ty: DotType, b: &[u8]) -> [i32; QK_K] {
    let mut v = [0i32; QK_K];
    match ty {
        DotType::Q2K | DotType::Q3K => {
            // Value 128n + 32j + l' (l' < 32): bits 2j of byte 32n + l' of the 2-bit values;
            // Q3_K's third bit is bit 4n + j of high-bit byte l'.
            let (hm, qs) = if ty == DotType::Q3K {
                (&b[..32], &b[32..96])
            } else {
                (&b[..0], &b[16..80])
            };
            for n in 0..2 {
                for j in 0..4 {
                    for l in 0..32 {
                        let low = (qs[32 * n + l] >> (2 * j)) & 3;
                        let high = hm.get(l).map_or(0, |h| (h >> (4 * n + j)) & 1);
                        v[128 * n + 32 * j + l] = (low | high << 2) as i32;
                    }
                }
            }
        }
        DotType::Q6K => {
            let (ql, qh) = (&b[..128], &b[128..192]);
            for half in 0..2 {
                let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
                let v = &mut v[128 * half..];
                for l in 0..32 {
                    v[l] = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32;
                    v[l + 32] = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32;
                    v[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32;
                    v[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32;
                }
            }
        }
        _ => {
            let five = ty == DotType::Q5K;
            let (qh, qs) = if five {
                (&b[16..48], &b[48..176])
            } else {
                (&b[..0], &b[16..144])
            };
            for c in 0..4 {
                for l in 0..32 {
                    let q = qs[32 * c + l];
                    let (hl, hh) = if five {
                        ((qh[l] >> (2 * c)) & 1, (qh[l] >> (2 * c + 1)) & 1)
                    } else {
                        (0, 0)
                    };
                    v[64 * c + l] = ((q & 0x0F) | (hl << 4)) as i32;
                    v[64 * c + 32 + l] = ((q >> 4) | (hh << 4)) as i32;
                }
            }
        }
    }
    v
}

/// One row of a K-quant type against one activation row, one value at a time.
fn dot_k_scalar(ty: DotType, w: &[u8], x: &[Q8K]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(ty.block_bytes()).zip(x) {
        let v = values_k(ty, b);
        let sums = |g: usize, len: usize| -> i32 {
            (g * len..(g + 1) * len)
                .map(|i| v[i] * y.qs[i] as i32)
                .sum()
        };
        if ty == DotType::Q2K {
            let sc = &b[..16];
            let sumi: i32 = (0..16).map(|g| (sc[g] & 0x0F) as i32 * sums(g, 16)).sum();
            let summ: i32 = (0..16)
                .map(|g| (sc[g] >> 4) as i32 * y.bsums[g] as i32)
                .sum();
            acc += f16_at(b, 80) * y.d * sumi as f32 - f16_at(b, 82) * y.d * summ as f32;
        } else if ty == DotType::Q3K {
            let sc = q3_scales(&b[96..108]);
            let sumi: i32 = (0..16)
                .map(|g| (sc[g] as i32 - 32) * (sums(g, 16) - 4 * y.bsums[g] as i32))
                .sum();
            acc += f16_at(b, 108) * y.d * sumi as f32;
        } else if ty == DotType::Q6K {
            let sc = &b[192..208];
            let sumi: i32 = (0..16)
                .map(|g| sc[g] as i8 as i32 * (sums(g, 16) - 32 * y.bsums[g] as i32))
                .sum();
            acc += f16_at(b, 208) * y.d * sumi as f32;
        } else {
            let (sc, mn) = k4_scales(&b[4..16]);
            let sumi: i32 = (0..8).map(|j| sc[j] as i32 * sums(j, 32)).sum();
            let summ: i32 = (0..8)
                .map(|j| mn[j] as i32 * (y.bsums[2 * j] as i32 + y.bsums[2 * j + 1] as i32))
                .sum();
            acc += f16_at(b, 0) * y.d * sumi as f32 - f16_at(b, 2) * y.d * summ as f32;
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{k4_scales, DotType, Q8K, QK_K};
    use crate::quant::avx2::hsum;
    use crate::quant::{widen_f16, Q8_1};
    use crate::simd::prefetch;
    use std::arch::x86_64::*;

    /// Bytes of weights fetched ahead of the block being multiplied (see `quant::PREFETCH`).
    const PREFETCH: usize = 2048;

    /// The two f16 at bytes `at..at + 4` of `b`, widened (see `quant::widen_f16`).
    #[inline(always)]
    fn f16_pair(b: &[u8], at: usize) -> (f32, f32) {
        (
            widen_f16(u16::from_le_bytes([b[at], b[at + 1]])),
            widen_f16(u16::from_le_bytes([b[at + 2], b[at + 3]])),
        )
    }

    /// 32 bytes from the start of `b` (at least 32 long).
    #[target_feature(enable = "avx2")]
    fn load32(b: &[u8]) -> __m256i {
        let b = &b[..32];
        // SAFETY: `b` holds 32 bytes.
        unsafe { _mm256_loadu_si256(b.as_ptr() as *const __m256i) }
    }

    /// 32 signed bytes.
    #[target_feature(enable = "avx2")]
    fn load32_i8(q: &[i8]) -> __m256i {
        let q = &q[..32];
        // SAFETY: `q` holds 32 bytes.
        unsafe { _mm256_loadu_si256(q.as_ptr() as *const __m256i) }
    }

    /// 16 bytes of nibbles as 32 bytes: the low nibbles first, then the high ones.
    #[target_feature(enable = "avx2")]
    fn nibbles(b: &[u8]) -> __m256i {
        let b = &b[..16];
        // SAFETY: `b` holds 16 bytes.
        let packed = unsafe { _mm_loadu_si128(b.as_ptr() as *const __m128i) };
        _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed),
            _mm256_set1_epi8(0x0F),
        )
    }

    /// Byte j all ones where bit j of `bits` is set, zero elsewhere.
    #[target_feature(enable = "avx2")]
    fn bit_bytes(bits: u32) -> __m256i {
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits as i32),
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        // Byte i of each 8 has every bit but bit i set: the OR is all ones where bit i is.
        let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
        _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
    }

    /// The sums of four products of bytes, as f32: `q` unsigned, `y` signed.
    #[target_feature(enable = "avx2")]
    fn byte_sums(q: __m256i, y: __m256i) -> __m256 {
        let pairs = _mm256_maddubs_epi16(q, y);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// `super::dot_32_scalar` of one weight row against `R` activation rows, 32 values per step.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dots_32<const R: usize>(
        ty: DotType,
        w: &[u8],
        x: [&[Q8_1]; R],
    ) -> [f32; R] {
        // One loop per type: the type's decoding is not chosen again for each block.
        // SAFETY: as this function's.
        unsafe {
            match ty {
                DotType::Q4_0 => blocks_32::<0, R>(w, x),
                DotType::Q5_0 => blocks_32::<1, R>(w, x),
                _ => blocks_32::<2, R>(w, x),
            }
        }
    }

    /// One row of Q4_0 (`T` 0), Q5_0 (1) or Q5_1 (2) blocks against `R` activation rows.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn blocks_32<const T: u8, const R: usize>(w: &[u8], x: [&[Q8_1]; R]) -> [f32; R] {
        let bytes = [18, 22, 24][T as usize];
        let blocks = x.iter().fold(w.len() / bytes, |n, r| n.min(r.len()));
        let x = x.map(|r| &r[..blocks]);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut mins = [0f32; R];
        for (i, b) in w.chunks_exact(bytes).take(blocks).enumerate() {
            prefetch(b.as_ptr().wrapping_add(PREFETCH));
            let (d, m) = f16_pair(b, 0);
            // Q4_0 and Q5_0 values are signed: |q| times y with q's sign. Q5_1's are not.
            let q = match T {
                0 => _mm256_sub_epi8(nibbles(&b[2..]), _mm256_set1_epi8(8)),
                1 => {
                    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                    // Values without their fifth bit are q − 16: the nibble with 0xF0 above.
                    let low = _mm256_andnot_si256(bit_bytes(qh), _mm256_set1_epi8(0xF0u8 as i8));
                    _mm256_or_si256(nibbles(&b[6..]), low)
                }
                _ => {
                    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                    let high = _mm256_and_si256(bit_bytes(qh), _mm256_set1_epi8(0x10));
                    _mm256_or_si256(nibbles(&b[8..]), high)
                }
            };
            let signed = T < 2;
            let aq = if signed { _mm256_sign_epi8(q, q) } else { q };
            for r in 0..R {
                let y = &x[r][i];
                let qy = load32_i8(&y.qs);
                let qy = if signed { _mm256_sign_epi8(qy, q) } else { qy };
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), byte_sums(aq, qy), acc[r]);
                if !signed {
                    mins[r] += m * y.s;
                }
            }
        }
        std::array::from_fn(|r| hsum(acc[r]) + mins[r])
    }

    /// 16 in byte j where byte j of `qh` has `bit` set, 0 elsewhere.
    #[target_feature(enable = "avx2")]
    fn fifth_bits(qh: __m256i, bit: u8) -> __m256i {
        let bit = _mm256_set1_epi8(bit as i8);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(16))
    }

    /// The low two bits of each byte of `bits`, as bits 4 and 5.
    #[target_feature(enable = "avx2")]
    fn bit_pairs(bits: __m256i) -> __m256i {
        _mm256_slli_epi16(_mm256_and_si256(bits, _mm256_set1_epi8(3)), 4)
    }

    /// Q4_K (`five` false) or Q5_K against Q8_K, one weight row against `R` activation rows:
    /// per 64 values, the nibbles of 32 bytes (and the fifth bits), decoded once, times each
    /// row's activations in byte pairs, times the sub-blocks' scales in i32 lanes; the mins
    /// through the activations' sums of 16.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q45_k<const R: usize>(five: bool, w: &[u8], x: [&[Q8K]; R]) -> [f32; R] {
        let bytes = if five { 176 } else { 144 };
        let blocks = x.iter().fold(w.len() / bytes, |n, r| n.min(r.len()));
        let x = x.map(|r| &r[..blocks]);
        let m4 = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut mins = [0f32; R];
        for (i, b) in w.chunks_exact(bytes).take(blocks).enumerate() {
            prefetch(b.as_ptr().wrapping_add(PREFETCH));
            let (sc, mn) = k4_scales(&b[4..16]);
            let (d, dmin) = f16_pair(b, 0);
            let qs = if five { &b[48..176] } else { &b[16..144] };
            let qh = if five {
                load32(&b[16..48])
            } else {
                _mm256_setzero_si256()
            };
            let mut sumi = [_mm256_setzero_si256(); R];
            for c in 0..4 {
                let bits = load32(&qs[32 * c..]);
                let mut lo = _mm256_and_si256(bits, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                if five {
                    lo = _mm256_or_si256(lo, fifth_bits(qh, 1 << (2 * c)));
                    hi = _mm256_or_si256(hi, fifth_bits(qh, 2 << (2 * c)));
                }
                let (sl, sh) = (
                    _mm256_set1_epi16(sc[2 * c] as i16),
                    _mm256_set1_epi16(sc[2 * c + 1] as i16),
                );
                for r in 0..R {
                    let y = &x[r][i];
                    let yl = load32_i8(&y.qs[64 * c..]);
                    let yh = load32_i8(&y.qs[64 * c + 32..]);
                    let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, yl), sl);
                    let ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, yh), sh);
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(pl, ph));
                }
            }
            for r in 0..R {
                let y = &x[r][i];
                let summ: i32 = (0..8)
                    .map(|j| mn[j] as i32 * (y.bsums[2 * j] as i32 + y.bsums[2 * j + 1] as i32))
                    .sum();
                mins[r] += dmin * y.d * summ as f32;
                let sums = _mm256_cvtepi32_ps(sumi[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), sums, acc[r]);
            }
        }
        std::array::from_fn(|r| hsum(acc[r]) - mins[r])
    }

    /// Q6_K against Q8_K, one weight row against `R` activation rows: per 128 values, four
    /// vectors of 6-bit values (nibbles and bit pairs), decoded once, times each row's
    /// activations in byte pairs, times two groups' scales in i32 lanes; the offset of 32
    /// through the activations' sums of 16.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q6_k<const R: usize>(w: &[u8], x: [&[Q8K]; R]) -> [f32; R] {
        let blocks = x.iter().fold(w.len() / 210, |n, r| n.min(r.len()));
        let x = x.map(|r| &r[..blocks]);
        let m4 = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut offsets = [0f32; R];
        for (i, b) in w.chunks_exact(210).take(blocks).enumerate() {
            prefetch(b.as_ptr().wrapping_add(PREFETCH));
            let sc = &b[192..208];
            let mut sumi = [_mm256_setzero_si256(); R];
            for half in 0..2 {
                let ql0 = load32(&b[64 * half..]);
                let ql1 = load32(&b[64 * half + 32..]);
                let qh = load32(&b[128 + 32 * half..]);
                let q = [
                    _mm256_or_si256(_mm256_and_si256(ql0, m4), bit_pairs(qh)),
                    _mm256_or_si256(
                        _mm256_and_si256(ql1, m4),
                        bit_pairs(_mm256_srli_epi16(qh, 2)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                        bit_pairs(_mm256_srli_epi16(qh, 4)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                        bit_pairs(_mm256_srli_epi16(qh, 6)),
                    ),
                ];
                for (t, q) in q.into_iter().enumerate() {
                    let g = 8 * half + 2 * t;
                    let scales = _mm256_set_m128i(
                        _mm_set1_epi16(sc[g + 1] as i8 as i16),
                        _mm_set1_epi16(sc[g] as i8 as i16),
                    );
                    for r in 0..R {
                        let yv = load32_i8(&x[r][i].qs[128 * half + 32 * t..]);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, yv), scales);
                        sumi[r] = _mm256_add_epi32(sumi[r], p);
                    }
                }
            }
            let d = f16_pair(b, 206).1;
            for r in 0..R {
                let y = &x[r][i];
                let offset: i32 = (0..16)
                    .map(|g| sc[g] as i8 as i32 * y.bsums[g] as i32)
                    .sum();
                let sums = _mm256_cvtepi32_ps(sumi[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), sums, acc[r]);
                offsets[r] += d * y.d * offset as f32;
            }
        }
        std::array::from_fn(|r| hsum(acc[r]) - 32.0 * offsets[r])
    }

    /// Q2_K (`three` false) or Q3_K against Q8_K, one weight row against `R` activation rows:
    /// per 32 values (2 bits of 32 bytes, and Q3_K's third bits), decoded once, times each row's
    /// activations in byte pairs, times two groups' scales in i32 lanes; Q2_K's mins and Q3_K's
    /// offset of 4 through the activations' sums of 16.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q23_k<const R: usize>(three: bool, w: &[u8], x: [&[Q8K]; R]) -> [f32; R] {
        let bytes = if three { 110 } else { 84 };
        let blocks = x.iter().fold(w.len() / bytes, |n, r| n.min(r.len()));
        let x = x.map(|r| &r[..blocks]);
        let m2 = _mm256_set1_epi8(3);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut after = [0f32; R];
        for (i, b) in w.chunks_exact(bytes).take(blocks).enumerate() {
            prefetch(b.as_ptr().wrapping_add(PREFETCH));
            // Scales (Q3_K's less 32) and Q2_K's mins, per 16-value group (loops, not `map`:
            // a closure here would not be inlined into this function's target features).
            let (mut sc, mut mn) = ([0i16; 16], [0i16; 16]);
            if three {
                // The 6-bit scales as 4 words of 4 bytes: low nibbles of words 0 and 1, then
                // their high nibbles; the top bit pairs from word 2.
                // (No closure here: it would not take this function's target features.)
                let mut words = [0u32; 3];
                for (i, w) in words.iter_mut().enumerate() {
                    *w = u32::from_le_bytes(b[96 + 4 * i..100 + 4 * i].try_into().expect("4"));
                }
                let [a0, a1, top] = words;
                let (m4, m2) = (0x0F0F_0F0F, 0x0303_0303);
                let words = _mm_set_epi32(
                    (((a1 >> 4) & m4) | ((top >> 6) & m2) << 4) as i32,
                    (((a0 >> 4) & m4) | ((top >> 4) & m2) << 4) as i32,
                    ((a1 & m4) | ((top >> 2) & m2) << 4) as i32,
                    ((a0 & m4) | (top & m2) << 4) as i32,
                );
                let scales = _mm256_sub_epi16(_mm256_cvtepu8_epi16(words), _mm256_set1_epi16(32));
                // SAFETY: `sc` holds 16 i16.
                unsafe { _mm256_storeu_si256(sc.as_mut_ptr() as *mut __m256i, scales) };
            } else {
                // SAFETY: `b` holds the block's 84 bytes, the scales its first 16.
                let bytes = unsafe { _mm_loadu_si128(b.as_ptr() as *const __m128i) };
                let m4 = _mm_set1_epi8(0x0F);
                let low = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, m4));
                let high = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), m4));
                // SAFETY: each array holds 16 i16.
                unsafe {
                    _mm256_storeu_si256(sc.as_mut_ptr() as *mut __m256i, low);
                    _mm256_storeu_si256(mn.as_mut_ptr() as *mut __m256i, high);
                }
            }
            let (d, dmin) = if three {
                (f16_pair(b, 106).1, 0.0)
            } else {
                f16_pair(b, 80)
            };
            let qs = if three { &b[32..96] } else { &b[16..80] };
            let hm = if three {
                load32(&b[..32])
            } else {
                _mm256_setzero_si256()
            };
            let mut sumi = [_mm256_setzero_si256(); R];
            for n in 0..2 {
                let bits = load32(&qs[32 * n..]);
                for j in 0..4 {
                    let shift = _mm_cvtsi32_si128(2 * j as i32);
                    let mut q = _mm256_and_si256(_mm256_srl_epi16(bits, shift), m2);
                    if three {
                        let bit = _mm256_set1_epi8(1 << (4 * n + j));
                        let set = _mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit);
                        q = _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(4)));
                    }
                    let g = 8 * n + 2 * j;
                    let scales = _mm256_set_m128i(_mm_set1_epi16(sc[g + 1]), _mm_set1_epi16(sc[g]));
                    for r in 0..R {
                        let yv = load32_i8(&x[r][i].qs[128 * n + 32 * j..]);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, yv), scales);
                        sumi[r] = _mm256_add_epi32(sumi[r], p);
                    }
                }
            }
            for r in 0..R {
                let y = &x[r][i];
                let sums = _mm256_cvtepi32_ps(sumi[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), sums, acc[r]);
                // Q2_K: Σ min·(sum of 16); Q3_K: 4·Σ scale·(sum of 16).
                let by = if three { &sc } else { &mn };
                // SAFETY: both hold 16 i16.
                let s = unsafe {
                    let by = _mm256_loadu_si256(by.as_ptr() as *const __m256i);
                    let sums = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
                    hsum(_mm256_cvtepi32_ps(_mm256_madd_epi16(by, sums)))
                };
                after[r] += if three { 4.0 * d } else { dmin } * y.d * s;
            }
        }
        std::array::from_fn(|r| hsum(acc[r]) - after[r])
    }

    const _: () = assert!(QK_K == 256);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize_q8_1;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Module, Tensor};

    const TYPES: [(DotType, GgmlDType); 8] = [
        (DotType::Q4_0, GgmlDType::Q4_0),
        (DotType::Q5_0, GgmlDType::Q5_0),
        (DotType::Q5_1, GgmlDType::Q5_1),
        (DotType::Q4K, GgmlDType::Q4K),
        (DotType::Q5K, GgmlDType::Q5K),
        (DotType::Q6K, GgmlDType::Q6K),
        (DotType::Q2K, GgmlDType::Q2K),
        (DotType::Q3K, GgmlDType::Q3K),
    ];

    /// Weights [n, k] with an offset (so minimums matter), quantized by candle: (bytes, the
    /// dequantized values).
    fn weights(dtype: GgmlDType, n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
        let dev = Device::Cpu;
        let w = crate::testing::randn(0.3f32, 1.0, (n, k), &dev).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let values = q
            .dequantize(&dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        (q.data().unwrap().to_vec(), values)
    }

    /// The activations as the products see them: each row quantized for the type, dequantized.
    fn quantized_rows(ty: DotType, xs: &[f32], k: usize) -> Vec<f64> {
        let mut out = Vec::new();
        for r in xs.chunks_exact(k) {
            if ty.super_blocks() {
                let mut q = Vec::new();
                quantize_q8_k(r, &mut q);
                for b in &q {
                    out.extend(b.qs.iter().map(|&v| b.d as f64 * v as f64));
                }
            } else {
                let mut q = Vec::new();
                quantize_q8_1(r, &mut q);
                for b in &q {
                    out.extend(b.qs.iter().map(|&v| b.d as f64 * v as f64));
                }
            }
        }
        out
    }

    /// Σ over the blocks of weight row `c` of its minimum times (the activation block's stored
    /// sum − its exact one) for input row `i`.
    fn q5_1_sums_rounding(bytes: &[u8], xs: &[f32], (i, c): (usize, usize), k: usize) -> f64 {
        let mut q = Vec::new();
        quantize_q8_1(&xs[i * k..(i + 1) * k], &mut q);
        let row = &bytes[c * k / QK * 24..(c + 1) * k / QK * 24];
        row.chunks_exact(24)
            .zip(&q)
            .map(|(b, y)| {
                let exact: f64 = y.qs.iter().map(|&v| y.d as f64 * v as f64).sum();
                f16_at(b, 2) as f64 * (y.s as f64 - exact)
            })
            .sum()
    }

    /// Each output is the f64 product of candle's dequantized weights and the 8-bit activations:
    /// only the order of f32 sums differs. Row counts cover one row (the team's slices), fewer
    /// and more than four (`dot4`'s groups) and a serial product; depths several blocks.
    #[test]
    fn dot_products_equal_the_dequantized_product_of_the_8_bit_activations() {
        for (ty, dtype) in TYPES {
            let k = 2 * QK_K;
            for (m, n) in [(1, 70), (3, 40), (6, 300)] {
                let (bytes, wv) = weights(dtype, n, k);
                let xs: Vec<f32> = crate::testing::randn(0f32, 1.0, m * k, &Device::Cpu)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let y = dot_product(&xs, &bytes, ty, n, k);
                let xq = quantized_rows(ty, &xs, k);
                for i in 0..m {
                    for c in 0..n {
                        let (x, w) = (&xq[i * k..(i + 1) * k], &wv[c * k..(c + 1) * k]);
                        let mut want: f64 = x.iter().zip(w).map(|(a, &b)| a * b as f64).sum();
                        if ty == DotType::Q5_1 {
                            // Minimums multiply the activations' block sums as stored: rounded
                            // to f16 (ggml's Q8_1).
                            want += q5_1_sums_rounding(&bytes, &xs, (i, c), k);
                        }
                        let size: f64 = x.iter().zip(w).map(|(a, &b)| (a * b as f64).abs()).sum();
                        let got = y[i * n + c] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * size,
                            "{ty:?} [{m}, {n}] at ({i}, {c}): {got} against {want}"
                        );
                    }
                }
                // The vector and scalar dot products agree.
                let row = &bytes[..k / ty.block_values() * ty.block_bytes()];
                let (a, b) = if ty.super_blocks() {
                    let mut q = Vec::new();
                    quantize_q8_k(&xs[..k], &mut q);
                    (dots_k(ty, row, [&q])[0], dot_k_scalar(ty, row, &q))
                } else {
                    let mut q = Vec::new();
                    quantize_q8_1(&xs[..k], &mut q);
                    (dots_32(ty, row, [&q])[0], dot_32_scalar(ty, row, &q))
                };
                assert!(
                    (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                    "{ty:?}: {a} against {b}"
                );
            }
        }
    }

    /// Against candle's own quantized product (its kernels quantize the activations the same
    /// way, up to rounding details): outputs within the 8-bit activations' error of each other.
    #[test]
    fn products_follow_candle_s() {
        let dev = Device::Cpu;
        let (m, n, k) = (2, 64, QK_K * 3);
        for (ty, dtype) in TYPES {
            let w = crate::testing::randn(0.3f32, 1.0, (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let bytes = q.data().unwrap().to_vec();
            let x = crate::testing::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let theirs = candle_core::quantized::QMatMul::from_qtensor(q)
                .unwrap()
                .forward(&x)
                .unwrap();
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let ours = Tensor::from_vec(dot_product(&xs, &bytes, ty, n, k), (m, n), &dev).unwrap();
            // Outputs are sums of 768 products of N(0.3, 1) and N(0, 1) values (about ±30).
            let d = crate::testing::max_diff(&ours, &theirs);
            assert!(d < 0.2, "{ty:?}: {d}");
        }
    }

    /// Q8_K: the value of largest magnitude is ∓127, every value within half a step, and the
    /// sums of 16 are the sums of their bytes.
    #[test]
    fn activation_super_blocks_are_ggml_s_q8_k() {
        let xs: Vec<f32> = crate::testing::randn(0f32, 1.0, 2 * QK_K, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut q = Vec::new();
        quantize_q8_k(&xs, &mut q);
        quantize_q8_k(&[0.0; QK_K], &mut q);
        assert_eq!(q.len(), 3);
        for (b, x) in q[..2].iter().zip(xs.chunks_exact(QK_K)) {
            let at = (0..QK_K)
                .max_by(|&i, &j| x[i].abs().total_cmp(&x[j].abs()))
                .unwrap();
            assert_eq!(b.qs[at], -127);
            for (&v, &xv) in b.qs.iter().zip(x) {
                assert!((b.d * v as f32 - xv).abs() <= b.d.abs() * 0.5 + 1e-6);
            }
            for (g, &s) in b.bsums.iter().enumerate() {
                assert_eq!(
                    s as i32,
                    b.qs[16 * g..16 * g + 16]
                        .iter()
                        .map(|&v| v as i32)
                        .sum::<i32>()
                );
            }
        }
        assert!(q[2].d == 0.0 && q[2].qs.iter().all(|&v| v == 0));
    }

    /// Blocks that reach every branch of the activation quantizers: normal values, ties (every
    /// value a half step apart with a largest magnitude of 127, so the scale is ±1), the largest
    /// magnitude twice with both signs, zeros, NaN and infinite values, subnormal values (the
    /// scale's inverse infinite), `blocks` of 256.
    fn awkward_activations(blocks: usize) -> Vec<f32> {
        let mut x: Vec<f32> = crate::testing::randn(0f32, 1.0, blocks * QK_K, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let special: [&dyn Fn(usize) -> f32; 7] = [
            &|i| (i as f32 - 128.0) * 0.5 + if i % 32 == 3 { 1000.0 } else { 0.0 },
            &|i| match i {
                2 => 3.0,
                10 => -3.0,
                _ => (i % 7) as f32 * 0.25,
            },
            &|_| 0.0,
            &|i| match i % 50 {
                0 => f32::NAN,
                1 => -f32::INFINITY,
                _ => i as f32,
            },
            &|i| (i as f32 - 100.0) * 1e-41,
            &|i| {
                if i == 77 {
                    f32::INFINITY
                } else {
                    i as f32 - 3.0
                }
            },
            // NaN in the lane (of 16) where the largest magnitude is, before and after it.
            &|i| match i {
                16 => -50.0,
                _ if i % 32 == 0 => f32::NAN,
                _ => 1.0,
            },
        ];
        for (b, f) in special.iter().enumerate() {
            for i in 0..QK_K {
                x[b * QK_K + i] = f(i);
            }
        }
        // The ties' block: values 127 (its 32-value blocks' largest) and halves.
        for v in &mut x[..QK_K] {
            if *v > 900.0 {
                *v = 127.0;
            }
        }
        x
    }

    /// The AVX-512 activation quantizers give the reference's bytes, sums and scales to the bit,
    /// on every kind of block (`awkward_activations`), and quantizing many rows on the team's
    /// threads gives what row after row gives.
    #[test]
    fn vector_activation_quantizers_equal_the_reference() {
        let x = awkward_activations(10);
        #[cfg(target_arch = "x86_64")]
        if crate::simd::simd_level() == 2 {
            for block in x.chunks_exact(QK_K) {
                let (a, b) = (q8_k_block(block), unsafe { avx512::q8_k_block(block) });
                assert_eq!(a.d.to_bits(), b.d.to_bits(), "{:?}", &block[..8]);
                assert_eq!(a.qs, b.qs, "{:?}", &block[..8]);
                assert_eq!(a.bsums, b.bsums);
            }
            for block in x.chunks_exact(QK) {
                let (a, b) = (crate::quant::q8_1_block(block), unsafe {
                    crate::quant::avx512::q8_1_block(block)
                });
                assert_eq!(a.0.to_bits(), b.0.to_bits(), "{block:?}");
                assert_eq!((a.1, a.2), (b.1, b.2), "{block:?}");
            }
        } else {
            eprintln!("no AVX-512: the vector quantizers were not compared");
        }
        // Rows: 40 of 512 values (more than one thread's share).
        let k = 2 * QK_K;
        let rows = crate::testing::randn(0f32, 1.0, 40 * k, &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let all = quantize_rows_q8_k(&rows, k);
        let all_1 = crate::quant::quantize_rows_q8_1(&rows, k);
        let (mut one, mut one_1) = (Vec::new(), Vec::new());
        for r in rows.chunks_exact(k) {
            quantize_q8_k(r, &mut one);
            let mut q = Vec::new();
            quantize_q8_1(r, &mut q);
            one_1.extend(q);
        }
        assert_eq!(all.len(), one.len());
        for (a, b) in all.iter().zip(&one) {
            assert_eq!(
                (a.d.to_bits(), a.qs, a.bsums),
                (b.d.to_bits(), b.qs, b.bsums)
            );
        }
        assert_eq!(all_1.len(), one_1.len());
        for (a, b) in all_1.iter().zip(&one_1) {
            assert_eq!(
                (a.d.to_bits(), a.s.to_bits(), a.qs),
                (b.d.to_bits(), b.s.to_bits(), b.qs)
            );
        }
    }
}
