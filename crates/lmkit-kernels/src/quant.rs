//! Products with block-quantized weights in GGML's layouts, against activations quantized to
//! 8 bits per block as llama.cpp quantizes them, with AVX2 dot products chosen at run time, on
//! lmkit's thread pool: Q4_1 (4-bit values with a scale and a minimum per block of 32; candle
//! multiplies these one value at a time) and Q8_0 (8-bit values with a scale; candle's kernel
//! runs on a second thread pool that competes with lmkit's for the cores). On CPUs with AMX
//! tiles, products of [`TILE_MIN_ROWS`] rows or more (prompts, scoring windows, decoding rounds of
//! many streams) run on the tiles instead: the weights dequantized and rounded to bf16 as they
//! are packed, the inputs rounded to bf16, the sums f32 ([`crate::amx::quant_product`]) — closer
//! to the exact product than 8-bit activations, and several times faster.

use candle_core::{Device, Tensor};
use half::f16;

/// Values per block.
pub const QK: usize = 32;

/// How far ahead of the block being multiplied the weight bytes are fetched into cache: a
/// decoding step reads each weight once, from memory, and with the hardware prefetcher alone
/// the dot products wait on it (measured: fetching 2 KiB ahead halved the time of [1536, 576]
/// and [576, 1536] Q4_1 products whose weights were not in cache).
const PREFETCH: usize = 2048;
/// Bytes of one Q4_1 block: scale d (f16), minimum m (f16), 16 bytes of nibbles (value j in the
/// low nibble of byte j, value j+16 in its high nibble); a value is d·q + m.
pub const Q4_1_BYTES: usize = 20;

/// Bytes of one Q8_0 block: scale d (f16), 32 signed bytes; a value is d·q.
pub const Q8_0_BYTES: usize = 34;

/// The weight types this module multiplies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QType {
    Q4_1,
    Q8_0,
}

impl QType {
    /// The GGML types with these kernels; `None` for the others.
    pub fn of(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as T;
        match dtype {
            T::Q4_1 => Some(QType::Q4_1),
            T::Q8_0 => Some(QType::Q8_0),
            _ => None,
        }
    }

    /// Bytes per block of 32 values.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q4_1 => Q4_1_BYTES,
            QType::Q8_0 => Q8_0_BYTES,
        }
    }
}

/// One quantized activation block: scale d, d times the sum of the quantized values, 32 signed
/// bytes (ggml's Q8_1; Q8_0 is the same without the sum).
#[derive(Clone, Copy)]
pub(crate) struct Q8_1 {
    pub(crate) d: f32,
    pub(crate) s: f32,
    pub(crate) qs: [i8; QK],
}

impl Q8_1 {
    const ZERO: Q8_1 = Q8_1 {
        d: 0.0,
        s: 0.0,
        qs: [0; QK],
    };
}

/// ggml's `quantize_row_q8_1_ref`: per block, d = max|x|/127, q = round(x/d), and s = d·Σq,
/// with d and s rounded to f16 as the format stores them; `out` replaced by `x`'s blocks.
/// (llama.cpp's AVX2 code rounds ties to even instead; on the teacher-forcing test's text that
/// agreed less often with llama.cpp's top-1 choices, 96.5% against 97.7%, so the reference
/// rounding stays.)
#[cfg(test)]
pub(crate) fn quantize_q8_1(x: &[f32], out: &mut Vec<Q8_1>) {
    out.clear();
    out.resize(x.len() / QK, Q8_1::ZERO);
    quantize_q8_1_into(x, out);
}

/// [`quantize_q8_1`] into `out`, a block for each 32 values of `x`: on AVX-512 where the CPU has
/// it (the same bytes and scales).
fn quantize_q8_1_into(x: &[f32], out: &mut [Q8_1]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::simd_level() == 2 {
        for (block, q) in x.chunks_exact(QK).zip(out) {
            // SAFETY: level 2 means the CPU has AVX-512 F, BW, DQ and VL.
            let (d, sum, qs) = unsafe { avx512::q8_1_block(block) };
            *q = q8_1_scales(d, sum, qs);
        }
        return;
    }
    quantize_q8_1_values(x, out);
}

crate::simd::simd_versions! {
    /// [`quantize_q8_1_into`] one value at a time (compiled for AVX2 too, where the compiler
    /// vectorises what it can).
    fn quantize_q8_1_values(x: &[f32], out: &mut [Q8_1]) {
        for (block, q) in x.chunks_exact(QK).zip(out) {
            let (d, sum, qs) = q8_1_block(block);
            *q = q8_1_scales(d, sum, qs);
        }
    }
}

/// One Q8_1 block's d, Σq and bytes, one value at a time: the reference the vector code equals,
/// NaN, infinite and subnormal values included (as Rust's casts treat them).
#[inline(always)]
pub(crate) fn q8_1_block(block: &[f32]) -> (f32, i32, [i8; QK]) {
    let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    for (q, v) in qs.iter_mut().zip(block) {
        *q = (v * id).round() as i8;
    }
    (d, qs.iter().map(|&q| q as i32).sum(), qs)
}

/// A block from its d, Σq and bytes: d and s = d·Σq rounded to f16 as the format stores them.
fn q8_1_scales(d: f32, sum: i32, qs: [i8; QK]) -> Q8_1 {
    Q8_1 {
        d: f16::from_f32(d).to_f32(),
        s: f16::from_f32(sum as f32 * d).to_f32(),
        qs,
    }
}

/// Every row of `xs` (rows of `k` values, k whole blocks) quantized by [`quantize_q8_1`], the
/// rows' blocks one after another (rows of a prompt on the team's threads).
pub(crate) fn quantize_rows_q8_1(xs: &[f32], k: usize) -> Vec<Q8_1> {
    let mut q = vec![Q8_1::ZERO; xs.len() / QK];
    by_rows(xs, k, &mut q, k / QK, quantize_q8_1_into);
    q
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::QK;
    use crate::quant_dots::avx512::load16;
    use std::arch::x86_64::*;

    /// [`super::q8_1_block`] 16 values an instruction: the largest magnitude by `vmaxps` (which,
    /// as `f32::max`, passes over NaN), each value rounded half away from zero (its truncation,
    /// plus ±1 where the part cut off is at least a half: exact), clamped to the i8 range (Rust's
    /// saturating cast; NaN to 0).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, DQ and VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(crate) unsafe fn q8_1_block(block: &[f32]) -> (f32, i32, [i8; QK]) {
        let x = [load16(block, 0), load16(block, 1)];
        // max(NaN, top) is `top`: the second operand.
        let top = _mm512_max_ps(_mm512_abs_ps(x[0]), _mm512_setzero_ps());
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x[1]), top));
        let d = amax / 127.0;
        let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let (half, one) = (_mm512_set1_ps(0.5), _mm512_set1_ps(1.0));
        let (low, high) = (_mm512_set1_ps(-128.0), _mm512_set1_ps(127.0));
        let sign = _mm512_set1_epi32(i32::MIN);
        let mut qs = [0i8; QK];
        let mut sum = _mm512_setzero_si512();
        for (i, x) in x.into_iter().enumerate() {
            let v = _mm512_mul_ps(x, id);
            let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
            let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(_mm512_sub_ps(v, t)), half);
            // ±1 with v's sign.
            let step = _mm512_castsi512_ps(_mm512_or_si512(
                _mm512_castps_si512(one),
                _mm512_and_si512(_mm512_castps_si512(v), sign),
            ));
            let r = _mm512_mask_add_ps(t, up, t, step);
            let r = _mm512_min_ps(_mm512_max_ps(r, low), high);
            let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v);
            let q = _mm512_maskz_mov_epi32(ordered, _mm512_cvttps_epi32(r));
            sum = _mm512_add_epi32(sum, q);
            let out = &mut qs[16 * i..16 * i + 16];
            // SAFETY: `out` holds 16 bytes.
            unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(q)) };
        }
        (d, _mm512_reduce_add_epi32(sum), qs)
    }
}

/// Values of activations [`by_rows`] quantizes on one thread: the team's hand-off costs more
/// than this (about 10 µs a row of 2,048 on one core, one value at a time).
const QUANTIZE_SERIAL_VALUES: usize = 1 << 14;

/// `f(rows of xs, their outputs)` for every row of `xs` (`k` values each; `per_row` outputs
/// each, in `out`): in pieces on the team's threads where there are more values than
/// [`QUANTIZE_SERIAL_VALUES`], else at once.
pub(crate) fn by_rows<T: Send>(
    xs: &[f32],
    k: usize,
    out: &mut [T],
    per_row: usize,
    f: impl Fn(&[f32], &mut [T]) + Sync,
) {
    let m = xs.len() / k.max(1);
    if xs.len() <= QUANTIZE_SERIAL_VALUES || m < 2 || per_row == 0 {
        f(xs, out);
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    // A few pieces a thread, each of whole rows.
    let rows = m.div_ceil(4 * threads).max(1);
    crate::team::for_each_chunk_mut(out, rows * per_row, |i, piece: &mut [T]| {
        let first = i * rows * k;
        f(&xs[first..first + piece.len() / per_row * k], piece)
    });
}

/// An f16's bits as f32, in integer and scalar float operations, inline: for one value per block
/// in the dot products' loops. F16C converts in a vector register, and a 16-bit value reaches one
/// by an insert that keeps the register's other lanes: the compiler picked the accumulator's
/// register, and each block then waited for the sum of the one before (measured: 2–3x slower).
#[inline(always)]
pub(crate) fn widen_f16(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let rest = (h & 0x7FFF) as u32;
    let v = if rest >= 0x7C00 {
        // Infinity and NaN keep their payload.
        f32::from_bits((rest << 13) | 0x7F80_0000)
    } else {
        // Exponent and mantissa moved into place, the exponent's bias moved from 15 to 127 by
        // a multiplication by 2^112 (exact; it also normalizes subnormal values).
        f32::from_bits(rest << 13) * f32::from_bits(0x7780_0000)
    };
    f32::from_bits(v.to_bits() | sign)
}

pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Σ over blocks of one Q4_1 row · one Q8_1 row, one value at a time.
fn dot_scalar(w: &[u8], x: &[Q8_1]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(Q4_1_BYTES).zip(x) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            let q = b[4 + j];
            sumi += (q & 0x0F) as i32 * y.qs[j] as i32 + (q >> 4) as i32 * y.qs[j + QK / 2] as i32;
        }
        acc += sumi as f32 * d * y.d + m * y.s;
    }
    acc
}

/// Σ over blocks of one Q8_0 row · one activation row, one value at a time.
fn dot_q8_0_scalar(w: &[u8], x: &[Q8_1]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(Q8_0_BYTES).zip(x) {
        let d = f16_at(b, 0);
        let sumi: i32 = b[2..]
            .iter()
            .zip(&y.qs)
            .map(|(&q, &v)| q as i8 as i32 * v as i32)
            .sum();
        acc += sumi as f32 * d * y.d;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{PREFETCH, Q4_1_BYTES, Q8_0_BYTES, Q8_1, QK};
    use crate::simd::prefetch;
    use std::arch::x86_64::*;

    /// A Q4_1 block's scale d and minimum m: two f16 at its start, widened together.
    #[target_feature(enable = "avx2,f16c")]
    fn q4_1_scales(b: &[u8]) -> (f32, f32) {
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
            b[0], b[1], b[2], b[3],
        ])));
        (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1)))
    }

    /// A Q8_0 block's scale d (an f16 at its start).
    #[target_feature(enable = "avx2,f16c")]
    fn q8_0_scale(b: &[u8]) -> f32 {
        super::widen_f16(u16::from_le_bytes([b[0], b[1]]))
    }

    /// A Q4_1 block's 32 values as bytes (nibbles of bytes 4..20: low ones first).
    #[target_feature(enable = "avx2")]
    fn q4_1_values(b: &[u8]) -> __m256i {
        // SAFETY: a Q4_1 block holds 4 + 16 bytes: the 16-byte load at 4 stays inside.
        let packed = unsafe { _mm_loadu_si128(b[4..Q4_1_BYTES].as_ptr() as *const __m128i) };
        _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed),
            _mm256_set1_epi8(0x0F),
        )
    }

    /// As `dot_scalar`, 32 values per step: nibbles widened to bytes, byte products summed in
    /// pairs (`maddubs`), then in fours, scaled and accumulated in f32 lanes.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot(w: &[u8], x: &[Q8_1]) -> f32 {
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for (b, y) in w.chunks_exact(Q4_1_BYTES).zip(x) {
            prefetch(b.as_ptr().wrapping_add(PREFETCH));
            let (d, m) = q4_1_scales(b);
            mins += m * y.s;
            // SAFETY: `y.qs` holds 32 bytes.
            let qy = unsafe { _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i) };
            let pairs = _mm256_maddubs_epi16(q4_1_values(b), qy);
            let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), sums, acc);
        }
        hsum(acc) + mins
    }

    /// As `dot_q8_0_scalar`: signed byte products through `maddubs` (|w| times x with w's sign).
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q8_0(w: &[u8], x: &[Q8_1]) -> f32 {
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        for (b, y) in w.chunks_exact(Q8_0_BYTES).zip(x) {
            prefetch(b.as_ptr().wrapping_add(PREFETCH));
            let d = q8_0_scale(b);
            // SAFETY: `b` holds 2 + 32 bytes, `y.qs` 32: the loads stay inside.
            let (qw, qy) = unsafe {
                (
                    _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i),
                    _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i),
                )
            };
            let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qy, qw));
            let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), sums, acc);
        }
        hsum(acc)
    }

    /// `dot` of one Q4_1 row against four activation rows: each weight block is widened once.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot4(w: &[u8], x: [&[Q8_1]; 4]) -> [f32; 4] {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut mins = [0f32; 4];
        for (i, b) in w.chunks_exact(Q4_1_BYTES).enumerate() {
            prefetch(b.as_ptr().wrapping_add(PREFETCH));
            let (d, m) = q4_1_scales(b);
            let qx = q4_1_values(b);
            for r in 0..4 {
                let y = &x[r][i];
                mins[r] += m * y.s;
                // SAFETY: `y.qs` holds 32 bytes.
                let qy = unsafe { _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i) };
                let sums =
                    _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(qx, qy), ones));
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), sums, acc[r]);
            }
        }
        [
            hsum(acc[0]) + mins[0],
            hsum(acc[1]) + mins[1],
            hsum(acc[2]) + mins[2],
            hsum(acc[3]) + mins[3],
        ]
    }

    /// `dot_q8_0` of one Q8_0 row against four activation rows.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot4_q8_0(w: &[u8], x: [&[Q8_1]; 4]) -> [f32; 4] {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 4];
        for (i, b) in w.chunks_exact(Q8_0_BYTES).enumerate() {
            prefetch(b.as_ptr().wrapping_add(PREFETCH));
            let d = q8_0_scale(b);
            // SAFETY: `b` holds 2 + 32 bytes.
            let qw = unsafe { _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i) };
            let aw = _mm256_sign_epi8(qw, qw);
            for r in 0..4 {
                let y = &x[r][i];
                // SAFETY: `y.qs` holds 32 bytes.
                let qy = unsafe { _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i) };
                let pairs = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(qy, qw));
                let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), sums, acc[r]);
            }
        }
        [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
    }

    #[target_feature(enable = "avx2")]
    pub(crate) fn hsum(acc: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(acc, 1);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), hi);
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        _mm_cvtss_f32(s1)
    }

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    const _: () = assert!(QK == 32);
}

/// Whether the AVX2 dot products run on this CPU (checked once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn vector() -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(avx2::available)
}

fn dot(ty: QType, w: &[u8], x: &[Q8_1]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if vector() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
            return unsafe {
                match ty {
                    QType::Q4_1 => avx2::dot(w, x),
                    QType::Q8_0 => avx2::dot_q8_0(w, x),
                }
            };
        }
    }
    match ty {
        QType::Q4_1 => dot_scalar(w, x),
        QType::Q8_0 => dot_q8_0_scalar(w, x),
    }
}

/// `dot` of one weight row against four activation rows.
fn dot4(ty: QType, w: &[u8], x: [&[Q8_1]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        if vector() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
            return unsafe {
                match ty {
                    QType::Q4_1 => avx2::dot4(w, x),
                    QType::Q8_0 => avx2::dot4_q8_0(w, x),
                }
            };
        }
    }
    x.map(|r| dot(ty, w, r))
}

/// Output columns one parallel task computes (for every row of the input).
const COLUMNS_PER_TASK: usize = 32;
/// Products (rows × columns × depth) below which one thread does the whole product.
const PARALLEL_MIN_PRODUCTS: usize = 1 << 16;

/// x [.., k] (f32, CPU) times a weight [n, k] of type `ty` (its raw blocks, row-major)ᵀ: [.., n].
pub fn quant_matmul(
    x: &Tensor,
    w: &[u8],
    ty: QType,
    n: usize,
    k: usize,
) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.last() != Some(&k) || !k.is_multiple_of(QK) || w.len() != n * k / QK * ty.block_bytes()
    {
        candle_core::bail!(
            "{ty:?} product: input {dims:?} against a [{n}, {k}] weight of {} bytes",
            w.len()
        );
    }
    if !matches!(x.device(), Device::Cpu) {
        candle_core::bail!("{ty:?} product: the input must be on the CPU");
    }
    let xs = x
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let y = quant_product(&xs, w, ty, n, k);
    let mut out_dims = dims;
    *out_dims.last_mut().expect("checked non-empty") = n;
    Tensor::from_vec(y, out_dims, x.device())
}

/// Input rows from which a product runs on the AMX tiles where the CPU has them
/// ([`crate::amx::quant_product`]: inputs and dequantized weights rounded to bf16, f32 sums)
/// rather than against 8-bit activations. Packing the weight costs about as much as 4–8 rows of
/// 8-bit dot products (the tiles' time hardly grows up to 32 rows); from 16 rows the tiles took a
/// third of the time on SmolLM2's Q4_1 shapes. Decoding steps of fewer streams keep the 8-bit dot
/// products, which read each weight byte once.
pub const TILE_MIN_ROWS: usize = 16;

/// Rows of `xs` (each of `k` values) times a weight [n, k] of type `ty` (its raw blocks)ᵀ: the
/// rows' outputs, n values each. The caller checks the sizes (see [`quant_matmul`]). From
/// [`TILE_MIN_ROWS`] rows on CPUs with AMX tiles, the product of the bf16-rounded values;
/// otherwise against activations quantized to 8 bits as llama.cpp quantizes them.
pub fn quant_product(xs: &[f32], w: &[u8], ty: QType, n: usize, k: usize) -> Vec<f32> {
    let m = xs.len() / k.max(1);
    if m >= TILE_MIN_ROWS {
        let w = crate::amx::QuantRows::Stored(w);
        if let Some(y) = crate::amx::quant_product(xs, w, ty, (m, n, k)) {
            return y;
        }
    }
    q8_product(xs, w, ty, n, k)
}

/// Rows of `xs` (each of `k` values) times a weight [n, k] of any block-quantized GGML type
/// `dtype` (as `w` holds its blocks)ᵀ on AMX tiles from [`TILE_MIN_ROWS`] rows: each weight value
/// dequantized (Q4_1 and Q8_0 by lmkit's packers, the other types as candle's code does), then
/// rounded to bf16 as the inputs are, f32 sums. `None` elsewhere (fewer rows, no tiles, a type
/// that is not block-quantized, sizes that disagree).
pub fn tiles_product(
    xs: &[f32],
    w: crate::amx::QuantRows,
    dtype: candle_core::quantized::GgmlDType,
    n: usize,
    k: usize,
) -> Option<Vec<f32>> {
    let m = xs.len() / k.max(1);
    if m < TILE_MIN_ROWS {
        return None;
    }
    match QType::of(dtype) {
        Some(ty) => crate::amx::quant_product(xs, w, ty, (m, n, k)),
        None => crate::amx::dequant_product(xs, w, &Dequantizer::of(dtype)?, (m, n, k)),
    }
}

/// Rows of `g` (each of `n` values) times a weight [n, k] of any block-quantized GGML type
/// `dtype` (its raw blocks) as it is stored: the rows' results, k values each — a frozen
/// quantized layer's input gradient. On AMX tiles from [`TILE_MIN_ROWS`] rows, rounded and summed
/// as the forward product there (Q4_1 and Q8_0 packed from their blocks, the other types
/// dequantized by candle's code as packed); `None` elsewhere (and for sizes that disagree), for
/// the caller to multiply the dequantized weight.
pub fn ggml_product_nk(
    g: &[f32],
    w: crate::amx::QuantRows,
    dtype: candle_core::quantized::GgmlDType,
    n: usize,
    k: usize,
) -> Option<Vec<f32>> {
    let m = g.len() / n.max(1);
    if m < TILE_MIN_ROWS {
        return None;
    }
    match QType::of(dtype) {
        Some(ty) => crate::amx::quant_product_nk(g, w, ty, (m, n, k)),
        None => crate::amx::dequant_product_nk(g, w, &Dequantizer::of(dtype)?, (m, n, k)),
    }
}

/// Rows of `xs` (each of `k` values) times a weight [n, k] of GGML type `dtype` (its raw blocks)ᵀ
/// on lmkit's kernels: Q4_1 and Q8_0 as [`quant_product`]; the other block types on AMX tiles
/// from [`TILE_MIN_ROWS`] rows ([`tiles_product`]), and below that (or without tiles) against
/// 8-bit activations where [`crate::quant_dots`] has their dot products (every other block type).
/// `None` for unquantized types and for sizes that disagree, for the caller to use candle's
/// product (each path checks the sizes: the tiles' `amx::quant_fits`, [`eight_bit_product`]'s
/// [`sizes_fit`]).
pub fn ggml_product(
    xs: &[f32],
    w: &[u8],
    dtype: candle_core::quantized::GgmlDType,
    n: usize,
    k: usize,
) -> Option<Vec<f32>> {
    tiles_product(xs, crate::amx::QuantRows::Stored(w), dtype, n, k)
        .or_else(|| eight_bit_product(xs, w, dtype, n, k))
}

/// Whether `xs` is whole rows of k (whole blocks of `dtype`) and `w` n rows of them.
fn sizes_fit(
    xs: &[f32],
    w: &[u8],
    dtype: candle_core::quantized::GgmlDType,
    n: usize,
    k: usize,
) -> bool {
    let values = dtype.block_size();
    k > 0
        && k.is_multiple_of(values)
        && xs.len().is_multiple_of(k)
        && w.len() == n * (k / values) * dtype.type_size()
}

/// Rows of `xs` times a weight [n, k] of GGML type `dtype` (its raw blocks)ᵀ against 8-bit
/// activations whatever the rows and the CPU (no tiles): Q4_1 and Q8_0 by [`q8_product`], the
/// types [`crate::quant_dots`] has by its dot products. `None` for other types and for sizes that
/// disagree.
pub(crate) fn eight_bit_product(
    xs: &[f32],
    w: &[u8],
    dtype: candle_core::quantized::GgmlDType,
    n: usize,
    k: usize,
) -> Option<Vec<f32>> {
    if !sizes_fit(xs, w, dtype, n, k) {
        return None;
    }
    if let Some(ty) = QType::of(dtype) {
        return Some(q8_product(xs, w, ty, n, k));
    }
    let ty = crate::quant_dots::DotType::of(dtype)?;
    Some(crate::quant_dots::dot_product(xs, w, ty, n, k))
}

/// A GGML block type's dequantization (candle's, block by block): any type a GGUF file holds
/// can go to [`crate::amx::dequant_product`] through one.
#[derive(Clone, Copy)]
pub struct Dequantizer {
    /// Values per block.
    pub block_values: usize,
    /// Bytes per block.
    pub block_bytes: usize,
    to_float: fn(&[u8], &mut [f32]),
}

impl Dequantizer {
    /// The block-quantized types (not F32, F16 or BF16); `None` for the others.
    pub fn of(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::k_quants::*;
        use candle_core::quantized::GgmlDType as T;
        fn make<B: GgmlType>() -> Dequantizer {
            Dequantizer {
                block_values: B::BLCK_SIZE,
                block_bytes: std::mem::size_of::<B>(),
                to_float: to_float_of::<B>,
            }
        }
        let d = match dtype {
            T::Q4_0 => make::<BlockQ4_0>(),
            T::Q4_1 => make::<BlockQ4_1>(),
            T::Q5_0 => make::<BlockQ5_0>(),
            T::Q5_1 => make::<BlockQ5_1>(),
            T::Q8_0 => make::<BlockQ8_0>(),
            T::Q2K => make::<BlockQ2K>(),
            T::Q3K => make::<BlockQ3K>(),
            T::Q4K => make::<BlockQ4K>(),
            T::Q5K => make::<BlockQ5K>(),
            T::Q6K => make::<BlockQ6K>(),
            _ => return None,
        };
        (d.block_bytes == dtype.type_size() && d.block_values == dtype.block_size()).then_some(d)
    }

    /// `blocks` (whole blocks of the type) dequantized into `out`, `block_values` a block.
    pub fn to_f32(&self, blocks: &[u8], out: &mut [f32]) {
        (self.to_float)(blocks, out)
    }
}

/// candle's `to_float` over whole blocks of `B` given as bytes (copied to `B`'s alignment where
/// they are not on it).
fn to_float_of<B: candle_core::quantized::k_quants::GgmlType>(bytes: &[u8], out: &mut [f32]) {
    let size = std::mem::size_of::<B>();
    let count = bytes.len() / size;
    let out = &mut out[..count * B::BLCK_SIZE];
    // SAFETY: the block types are plain values (f16 and integer fields) for which any bytes are
    // valid; `align_to` gives whole, aligned values only.
    let (head, blocks, _) = unsafe { bytes[..count * size].align_to::<B>() };
    if head.is_empty() && blocks.len() == count {
        B::to_float(blocks, out);
        return;
    }
    let mut aligned: Vec<B> = Vec::with_capacity(count);
    // SAFETY: `aligned` has room for count values, filled with the bytes of count blocks (any
    // bytes being valid) before its length covers them.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            aligned.as_mut_ptr().cast::<u8>(),
            count * size,
        );
        aligned.set_len(count);
    }
    B::to_float(&aligned, out);
}

/// [`quant_product`] against activations quantized to 8 bits per block (ggml's Q8_1), whatever
/// the rows and the CPU: llama.cpp's arithmetic.
pub fn q8_product(xs: &[f32], w: &[u8], ty: QType, n: usize, k: usize) -> Vec<f32> {
    let blocks = k / QK;
    let q = quantize_rows_q8_1(xs, k);
    let rows: Vec<&[Q8_1]> = q.chunks_exact(blocks).collect();
    let row_bytes = blocks * ty.block_bytes();
    tiled_product(
        &rows,
        w,
        (row_bytes, n, k),
        |wr, x| dot(ty, wr, x),
        |wr, x| dot4(ty, wr, x),
    )
}

/// The outputs [m, n] of `rows` (m rows of quantized activations, each for a depth of `k`) against
/// the n weight rows of `w` (`row_bytes` each), by `dot` (one weight row, one input row) and `dot4`
/// (one weight row, four input rows), in column tiles on lmkit's threads.
pub(crate) fn tiled_product<A: Sync>(
    rows: &[&[A]],
    w: &[u8],
    (row_bytes, n, k): (usize, usize, usize),
    dot: impl Fn(&[u8], &[A]) -> f32 + Sync,
    dot4: impl Fn(&[u8], [&[A]; 4]) -> [f32; 4] + Sync,
) -> Vec<f32> {
    let m = rows.len();
    // Column-major tiles: each task computes COLUMNS_PER_TASK outputs (a tile of weight rows)
    // for every input row, row-major into `out`, so its weight rows stay in cache while the
    // inputs stream past.
    let tile = |tile: &[u8], out: &mut [f32]| {
        let cols = tile.len() / row_bytes;
        // Four input rows at a time share each weight block's decoding.
        let mut i = 0;
        while i + 4 <= m {
            let four = [rows[i], rows[i + 1], rows[i + 2], rows[i + 3]];
            for (c, wr) in tile.chunks_exact(row_bytes).enumerate() {
                for (r, v) in dot4(wr, four).into_iter().enumerate() {
                    out[(i + r) * cols + c] = v;
                }
            }
            i += 4;
        }
        for (i, xq) in rows.iter().enumerate().skip(i) {
            for (c, wr) in tile.chunks_exact(row_bytes).enumerate() {
                out[i * cols + c] = dot(wr, xq);
            }
        }
    };
    let chunk = row_bytes * COLUMNS_PER_TASK;
    let weights = |t: usize| &w[t * chunk..((t + 1) * chunk).min(w.len())];
    column_tasks((m, n, k), COLUMNS_PER_TASK, |t, out| tile(weights(t), out))
}

/// The outputs [m, n] of a product split into tasks of `per_task` consecutive output columns
/// (the last may have fewer): task t computes its columns for every input row into `out`,
/// row-major [m, its columns], by `tile(t, out)`. One input row (a decoding step): each task
/// writes its slice of the result, on the polling team — these products come a hundred or more
/// to a step, and waking rayon's sleeping threads for each costs more than the split gains. More
/// rows: the tasks' outputs are gathered, on the team too (prompts' products on rayon's pool,
/// while the team's helpers still polled from the activations' quantization or a step before,
/// ran at 0.6x: the two pools' threads took turns on the cores). Small products run on one
/// thread.
pub(crate) fn column_tasks(
    (m, n, k): (usize, usize, usize),
    per_task: usize,
    tile: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    // Small products cost less than handing out their tiles.
    let serial = m * n * k < PARALLEL_MIN_PRODUCTS;
    let mut y = vec![0f32; m * n];
    if m == 1 {
        if serial {
            y.chunks_mut(per_task)
                .enumerate()
                .for_each(|(t, out)| tile(t, out));
        } else {
            crate::team::for_each_chunk_mut(&mut y, per_task, &tile);
        }
        return y;
    }
    let tasks = n.div_ceil(per_task);
    let make = |t: usize| {
        let cols = per_task.min(n - t * per_task);
        let mut out = vec![0f32; m * cols];
        tile(t, &mut out);
        out
    };
    let tiles: Vec<Vec<f32>> = if serial {
        (0..tasks).map(make).collect()
    } else {
        crate::team::map(tasks, make)
    };
    for (t, tile) in tiles.iter().enumerate() {
        let c0 = t * per_task;
        let cols = tile.len() / m.max(1);
        for i in 0..m {
            y[i * n + c0..i * n + c0 + cols].copy_from_slice(&tile[i * cols..(i + 1) * cols]);
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Module;

    #[test]
    fn matches_candle_s_q4_1_product() {
        let dev = Device::Cpu;
        let (m, n, k) = (7, 70, 96);
        let w = crate::testing::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let x = crate::testing::randn(0f32, 1.0, (1, m, k), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let bytes = q.data().unwrap().to_vec();
        let wq = q.dequantize(&dev).unwrap();
        let ours = quant_matmul(&x, &bytes, QType::Q4_1, n, k).unwrap();
        let theirs = candle_core::quantized::QMatMul::from_qtensor(q)
            .unwrap()
            .forward(&x)
            .unwrap();
        assert_eq!(ours.dims(), [1, m, n]);
        // Outputs are sums of 96 products of N(0, 1) values (about ±10); quantizing the
        // activations to 8 bits moves them by up to ~0.15 (candle's product too). Candle stores
        // the Q8_1 block sums rounded twice (f16(Σq)·f16(d)); llama.cpp and this kernel round
        // once (f16(Σq·d)), which moves the results apart by a few hundredths.
        let exact = x.matmul(&wq.t().unwrap().unsqueeze(0).unwrap()).unwrap();
        assert!(crate::testing::max_diff(&ours, &exact) < 0.25);
        let d = crate::testing::max_diff(&ours, &theirs);
        assert!(d < 0.06, "{d}");
        // The scalar and vector dot products agree.
        let mut xq = Vec::new();
        quantize_q8_1(
            &x.flatten_all().unwrap().to_vec1::<f32>().unwrap()[..k],
            &mut xq,
        );
        let row = &bytes[..k / QK * Q4_1_BYTES];
        assert!((dot(QType::Q4_1, row, &xq) - dot_scalar(row, &xq)).abs() < 1e-3);
    }

    /// Every f16 bit pattern widens as `half` widens it (NaNs as NaNs with their payload).
    #[test]
    fn f16_scales_widen_exactly() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            let got = widen_f16(h);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{h:#06x}: {got:e} against {want:e}"
            );
        }
    }

    /// However a product is split (one thread, the team by tiles of the result, the team or
    /// rayon's pool by tiles of every row), each output is the same dot product.
    #[test]
    fn every_split_gives_the_row_by_row_dot_products() {
        let dev = Device::Cpu;
        let (n, k) = (300, 256);
        for (ty, dtype) in [
            (QType::Q4_1, GgmlDType::Q4_1),
            (QType::Q8_0, GgmlDType::Q8_0),
        ] {
            let w = crate::testing::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let bytes = QTensor::quantize(&w, dtype)
                .unwrap()
                .data()
                .unwrap()
                .to_vec();
            let row_bytes = k / QK * ty.block_bytes();
            // 1 row: serial below PARALLEL_MIN_PRODUCTS at n = 200, the team above; 3 and 9
            // rows: the team; 40 rows: rayon's pool.
            for (m, cols) in [(1, 200), (1, n), (3, n), (9, n), (40, n)] {
                let xs = crate::testing::randn(0f32, 1.0, m * k, &dev)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let got = q8_product(&xs, &bytes[..cols * row_bytes], ty, cols, k);
                let mut xq = Vec::new();
                for (i, x) in xs.chunks_exact(k).enumerate() {
                    quantize_q8_1(x, &mut xq);
                    for (c, wr) in bytes[..cols * row_bytes]
                        .chunks_exact(row_bytes)
                        .enumerate()
                    {
                        let (g, want) = (got[i * cols + c], dot(ty, wr, &xq));
                        if i < m / 4 * 4 {
                            // Rows taken four at a time (`dot4`) may sum in another order.
                            assert!((g - want).abs() < 1e-3, "{ty:?} m={m} row {i} column {c}");
                        } else {
                            assert_eq!(g, want, "{ty:?} m={m} row {i} column {c}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matches_candle_s_q8_0_product() {
        let dev = Device::Cpu;
        let (m, n, k) = (6, 37, 128);
        let w = crate::testing::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let x = crate::testing::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let bytes = q.data().unwrap().to_vec();
        let ours = quant_matmul(&x, &bytes, QType::Q8_0, n, k).unwrap();
        let theirs = candle_core::quantized::QMatMul::from_qtensor(q)
            .unwrap()
            .forward(&x)
            .unwrap();
        // Same activation quantization and the same integer sums: equal up to float order.
        let d = crate::testing::max_diff(&ours, &theirs);
        assert!(d < 1e-3, "{d}");
        let mut xq = Vec::new();
        quantize_q8_1(
            &x.flatten_all().unwrap().to_vec1::<f32>().unwrap()[..k],
            &mut xq,
        );
        let row = &bytes[..k / QK * Q8_0_BYTES];
        assert!((dot(QType::Q8_0, row, &xq) - dot_q8_0_scalar(row, &xq)).abs() < 1e-3);
    }

    /// On AMX tiles, products from TILE_MIN_ROWS rows equal the f64 product of the inputs and
    /// dequantized weights (as candle dequantizes them, to an ulp) rounded to bf16, up to the f32 sums' order:
    /// rows and columns past whole blocks, depths past one packed block (512); and the products
    /// by the weight as stored (a gradient through the layer), whose depth is its rows.
    #[test]
    fn tile_products_equal_the_product_of_the_rounded_dequantized_values() {
        if !crate::amx::available() {
            eprintln!("no AMX tiles on this CPU: the tile products are not tested here");
            return;
        }
        let dev = Device::Cpu;
        let round = |v: f32| half::bf16::from_f32(v).to_f32();
        for (ty, dtype) in [
            (QType::Q4_1, GgmlDType::Q4_1),
            (QType::Q8_0, GgmlDType::Q8_0),
        ] {
            for (m, n, k) in [(32, 16, 32), (45, 50, 608), (70, 97, 96), (16, 600, 64)] {
                let w = crate::testing::randn(0f32, 1.0, (n, k), &dev).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let bytes = q.data().unwrap().to_vec();
                let theirs = q.dequantize(&dev).unwrap().flatten_all().unwrap();
                let mut ours = vec![0f32; n * k];
                crate::amx::dequantize(ty, &bytes, &mut ours);
                // Q4_1's d·q + m here is one fused multiply-add: within an ulp of candle's.
                let ulps = ours
                    .iter()
                    .zip(theirs.to_vec1::<f32>().unwrap())
                    .fold(0f32, |a, (&o, t)| {
                        a.max((o - t).abs() / o.abs().max(t.abs()).max(f32::MIN_POSITIVE))
                    });
                assert!(ulps <= 2.0 * f32::EPSILON, "{ty:?}: {ulps}");
                let wq: Vec<&[f32]> = ours.chunks_exact(k).collect();
                let xs = crate::testing::randn(0f32, 1.0, m * k, &dev)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let close = |got: f32, terms: &mut dyn Iterator<Item = (f32, f32)>, at: &str| {
                    let (mut want, mut scale) = (0f64, 0f64);
                    for (a, b) in terms {
                        let t = f64::from(round(a)) * f64::from(round(b));
                        want += t;
                        scale += t.abs();
                    }
                    let got = f64::from(got);
                    assert!(
                        (got - want).abs() <= 1e-5 * scale + 1e-6,
                        "{ty:?} [{m}, {n}, {k}] {at}: {got} against {want}"
                    );
                };
                // x [m, k] · wᵀ.
                let got = quant_product(&xs, &bytes, ty, n, k);
                assert_eq!(got.len(), m * n);
                for (i, x) in xs.chunks_exact(k).enumerate() {
                    for (j, wr) in wq.iter().enumerate() {
                        let mut terms = x.iter().copied().zip(wr.iter().copied());
                        close(
                            got[i * n + j],
                            &mut terms,
                            &format!("x·wᵀ row {i} column {j}"),
                        );
                    }
                }
                // g [m, n] · w (a gradient through the layer).
                let gs = crate::testing::randn(0f32, 1.0, m * n, &dev)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let gs = gs.as_slice();
                let stored = crate::amx::QuantRows::Stored(&bytes);
                let got = ggml_product_nk(gs, stored, dtype, n, k).expect("tiles");
                assert_eq!(got.len(), m * k);
                for (i, g) in gs.chunks_exact(n).enumerate() {
                    for c in 0..k {
                        let mut terms = g.iter().copied().zip(wq.iter().map(|r| r[c]));
                        close(
                            got[i * k + c],
                            &mut terms,
                            &format!("g·w row {i} column {c}"),
                        );
                    }
                }
            }
        }
    }

    /// Any block-quantized GGML type (here Q4_0, Q5_0, Q4_K and Q6_K) on the tiles through its
    /// [`Dequantizer`]: candle's dequantization, and products equal to the f64 product of the
    /// inputs and dequantized weights rounded to bf16, up to the f32 sums' order.
    #[test]
    fn any_block_type_multiplies_on_the_tiles_as_dequantized() {
        let dev = Device::Cpu;
        assert!(Dequantizer::of(GgmlDType::F16).is_none());
        let round = |v: f32| half::bf16::from_f32(v).to_f32();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q5_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let deq = Dequantizer::of(dtype).expect("a block type");
            let (m, n, k) = (37, 41, 768);
            let w = crate::testing::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let bytes = q.data().unwrap().to_vec();
            let theirs = q
                .dequantize(&dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            // From bytes off the blocks' alignment too.
            let mut shifted = vec![0u8; bytes.len() + 1];
            shifted[1..].copy_from_slice(&bytes);
            let mut ours = vec![0f32; n * k];
            deq.to_f32(&shifted[1..], &mut ours);
            assert_eq!(ours, theirs, "{dtype:?}");
            let xs = crate::testing::randn(0f32, 1.0, m * k, &dev)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let stored = crate::amx::QuantRows::Stored(&bytes);
            let Some(got) = crate::amx::dequant_product(&xs, stored, &deq, (m, n, k)) else {
                assert!(!crate::amx::available());
                eprintln!("no AMX tiles on this CPU: the tile products are not tested here");
                return;
            };
            for (i, x) in xs.chunks_exact(k).enumerate() {
                for (j, wr) in theirs.chunks_exact(k).enumerate() {
                    let (mut want, mut scale) = (0f64, 0f64);
                    for (&a, &b) in x.iter().zip(wr) {
                        let t = f64::from(round(a)) * f64::from(round(b));
                        want += t;
                        scale += t.abs();
                    }
                    let g = f64::from(got[i * n + j]);
                    assert!(
                        (g - want).abs() <= 1e-5 * scale + 1e-6,
                        "{dtype:?} row {i} column {j}: {g} against {want}"
                    );
                }
            }
            // g · W as W is stored (a frozen layer's input gradient): the depth is W's 41 rows
            // (padded), the columns its 768 values (tasks' columns crossing super-blocks).
            let gs = crate::testing::randn(0f32, 1.0, m * n, &dev)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = crate::amx::dequant_product_nk(&gs, stored, &deq, (m, n, k)).unwrap();
            assert_eq!(got.len(), m * k);
            for (i, g) in gs.chunks_exact(n).enumerate() {
                for j in 0..k {
                    let (mut want, mut scale) = (0f64, 0f64);
                    for (d, &a) in g.iter().enumerate() {
                        let t = f64::from(round(a)) * f64::from(round(theirs[d * k + j]));
                        want += t;
                        scale += t.abs();
                    }
                    let v = f64::from(got[i * k + j]);
                    assert!(
                        (v - want).abs() <= 1e-5 * scale + 1e-6,
                        "{dtype:?} g·w row {i} column {j}: {v} against {want}"
                    );
                }
            }
        }
    }
}
