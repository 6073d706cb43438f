//! The interleaved kernels on CPUs with AVX2 (and FMA, F16C) but not AVX-512 VNNI: the same
//! layout, each 64-byte run read as two halves of 32 bytes (rows 0..8 and 8..16 of a group,
//! one pass over the weight each). Where the CPU has AVX-VNNI (Intel's cores from Alder Lake on,
//! AMD's from Zen 5), `vpdpbusd` on 256-bit vectors sums the unsigned weight bytes' products
//! with the signed activation bytes 4 at a time in each row's i32 lane, as in the AVX-512
//! kernels, and `vpmulld` scales the sums. Without it, `vpmaddubsw` multiplies them and sums
//! adjacent pairs in 16 bits, several of those are summed in 16 bits as far as they cannot
//! overflow (the bounds are at each kernel), and `vpmaddwd` widens the pairs to i32 — against
//! ones, or straight against the scale of their sub-block (the scale in both halves of each
//! row's lane: scale·(both halves) in one instruction). Q8_0's values, unsigned with an offset
//! of 128, would overflow `vpmaddubsw`'s 16 bits and are widened to 16 bits there instead.
//! `LMKIT_AVX_VNNI=0` turns AVX-VNNI off (to run as on a CPU without it, Zen 3 or Haswell).
//!
//! The integer sums are those of the AVX-512 kernels, and the f32 steps the same, lane by lane:
//! the outputs equal theirs to the bit. Terms taken off for an offset of the values (Q3_K's 4,
//! Q6_K's 32) are summed once a block, Σ scale_g·(activations' sum of group g) by `vpmaddwd` of
//! the scales against the groups' sums in 16-bit pairs ([`super::block_terms`] pairs them as Q2_K's
//! minimums' for these kernels: [`terms_kind`]).
//!
//! Each kernel's body is written once (`DP`: `vpdpbusd` or not) and compiled in two functions,
//! with and without the AVX-VNNI feature (`compiled!`).

use super::{Kind, GROUP_ROWS};
use crate::quant::{Q8_1, QK};
use crate::quant_dots::Q8K;
use std::arch::x86_64::*;

/// Rows of a group a pass reads (one 256-bit vector's 32-bit lanes).
const HALF: usize = 8;

/// Activation rows a pass (each weight block decoded once for them), with AVX-VNNI or without:
/// measured on 128 rows, the best of 4, 6 and 8 (more rows than the 16 registers hold spill, but
/// the weights' decoding is shared by more).
pub(super) fn rows_a_pass(kind: Kind) -> usize {
    match (kind, avx_vnni()) {
        (Kind::Q4_0 | Kind::Q4_1 | Kind::Q2K | Kind::Q6K, _) => 4,
        (Kind::Q5_0 | Kind::Q5_1 | Kind::Q8_0, false) => 4,
        (Kind::Q4K, _) | (Kind::Q5K, false) => 6,
        _ => 8,
    }
}

/// The kind whose [`super::block_terms`] these kernels take for `kind`: Q3_K and Q6_K take
/// Q2_K's (the groups' activation sums as 16-bit pairs, to meet their scales by `vpmaddwd`).
pub(super) fn terms_kind(kind: Kind) -> Kind {
    match kind {
        Kind::Q3K | Kind::Q6K => Kind::Q2K,
        k => k,
    }
}

/// Whether this CPU runs these kernels (AVX2, FMA and F16C: `simd_level` 1 or more).
fn supported() -> bool {
    crate::simd::simd_level() >= 1
}

/// Whether the kernels use AVX-VNNI's `vpdpbusd`: the CPU has it and `LMKIT_AVX_VNNI` does not
/// turn it off (`0` or `off`).
pub fn avx_vnni() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| {
        has_avx_vnni() && !crate::amx::turned_off(std::env::var("LMKIT_AVX_VNNI").ok())
    })
}

/// Whether the CPU has AVX-VNNI.
pub(super) fn has_avx_vnni() -> bool {
    std::arch::is_x86_feature_detected!("avxvnni")
}

/// One group's 16 outputs for each of 1–8 activation rows (as the AVX-512 kernels' `group`).
pub(super) fn group(kind: Kind, w: &[u8], acts: &[(&[Q8_1], &[i32])], out: &mut [[f32; 16]]) {
    group_as(avx_vnni(), kind, w, acts, out)
}

/// [`group`] with AVX-VNNI (`dp`) or without.
pub(super) fn group_as(
    dp: bool,
    kind: Kind,
    w: &[u8],
    acts: &[(&[Q8_1], &[i32])],
    out: &mut [[f32; 16]],
) {
    assert!(supported(), "the interleaved kernels need AVX2");
    assert!(!dp || has_avx_vnni(), "this CPU lacks AVX-VNNI");
    let rows = acts.len();
    macro_rules! rows {
        ($k:literal) => {
            // SAFETY: checked above: the CPU has AVX2, FMA and F16C, and AVX-VNNI where `dp`.
            unsafe {
                if dp {
                    by_rows!(one, [true, $k], rows, w, acts, out)
                } else {
                    by_rows!(one, [false, $k], rows, w, acts, out)
                }
            }
        };
    }
    match kind {
        Kind::Q4_0 => rows!(0),
        Kind::Q4_1 => rows!(1),
        Kind::Q5_0 => rows!(2),
        Kind::Q5_1 => rows!(3),
        Kind::Q8_0 => rows!(4),
        _ => unreachable!("{kind:?} takes Q8_K activations"),
    }
}

/// One group's 16 outputs of a K-quant type for each of 1–8 activation rows (`acts`: Q8_K
/// super-blocks and their [`super::block_terms`] of [`terms_kind`]).
pub(super) fn group_k(
    kind: Kind,
    w: &[u8],
    acts: &[(&[Q8K], &[[i32; 16]])],
    out: &mut [[f32; 16]],
) {
    group_k_as(avx_vnni(), kind, w, acts, out)
}

/// [`group_k`] with AVX-VNNI (`dp`) or without.
pub(super) fn group_k_as(
    dp: bool,
    kind: Kind,
    w: &[u8],
    acts: &[(&[Q8K], &[[i32; 16]])],
    out: &mut [[f32; 16]],
) {
    assert!(supported(), "the interleaved kernels need AVX2");
    assert!(!dp || has_avx_vnni(), "this CPU lacks AVX-VNNI");
    let rows = acts.len();
    macro_rules! rows {
        ($f:ident $(, $c:literal)?) => {
            // SAFETY: as in `group_as`.
            unsafe {
                if dp {
                    by_rows!($f, [true $(, $c)?], rows, w, acts, out)
                } else {
                    by_rows!($f, [false $(, $c)?], rows, w, acts, out)
                }
            }
        };
    }
    match kind {
        Kind::Q4K => rows!(q45_k, false),
        Kind::Q5K => rows!(q45_k, true),
        Kind::Q6K => rows!(q6_k),
        Kind::Q2K => rows!(q23_k, false),
        Kind::Q3K => rows!(q23_k, true),
        _ => unreachable!("{kind:?} takes Q8_1 activations"),
    }
}

/// `unsafe fn $name<const DP: bool, consts..>(w, acts, out)`: the body `$body` compiled for
/// AVX2, FMA and F16C, and with AVX-VNNI where `DP` (the body, `#[inline(always)]`, takes the
/// features of the function it is compiled into).
macro_rules! compiled {
    ($name:ident, $body:ident, <$($c:ident: $ct:ty),*>, $acts:ty) => {
        /// # Safety
        /// The CPU must have AVX2, FMA and F16C, and AVX-VNNI where `DP`.
        unsafe fn $name<const DP: bool, $(const $c: $ct),*>(
            w: &[u8],
            acts: $acts,
            out: &mut [[f32; 16]],
        ) {
            #[target_feature(enable = "avx2,fma,f16c")]
            fn plain<$(const $c: $ct),*>(w: &[u8], acts: $acts, out: &mut [[f32; 16]]) {
                // SAFETY: this function has the features the body's intrinsics need.
                unsafe { $body::<false, $($c),*>(w, acts, out) }
            }
            #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
            fn vnni<$(const $c: $ct),*>(w: &[u8], acts: $acts, out: &mut [[f32; 16]]) {
                // SAFETY: as above, AVX-VNNI included.
                unsafe { $body::<true, $($c),*>(w, acts, out) }
            }
            // SAFETY: the caller checked that the CPU has AVX2, FMA and F16C (and AVX-VNNI
            // where `DP`).
            unsafe {
                if DP {
                    vnni::<$($c),*>(w, acts, out)
                } else {
                    plain::<$($c),*>(w, acts, out)
                }
            }
        }
    };
}

compiled!(one, one_body, <K: u8, R: usize>, &[(&[Q8_1], &[i32])]);
compiled!(q45_k, q45_k_body, <FIVE: bool, R: usize>, &[(&[Q8K], &[[i32; 16]])]);
compiled!(q6_k, q6_k_body, <R: usize>, &[(&[Q8K], &[[i32; 16]])]);
compiled!(q23_k, q23_k_body, <THREE: bool, R: usize>, &[(&[Q8K], &[[i32; 16]])]);

/// `acc` plus the products of the unsigned bytes `v` with the signed bytes `x`: with `DP`,
/// `vpdpbusd` (4 a lane, in i32); without, `vpmaddubsw` (pairs, in 16 bits).
///
/// # Safety
/// The CPU must have AVX2, and AVX-VNNI where `DP`.
#[inline(always)]
unsafe fn dot<const DP: bool>(acc: __m256i, v: __m256i, x: __m256i) -> __m256i {
    // SAFETY: as the caller says.
    unsafe {
        if DP {
            dp4(acc, v, x)
        } else {
            _mm256_add_epi16(acc, pairs(v, x))
        }
    }
}

/// `vpdpbusd` on 256 bits.
#[target_feature(enable = "avx2,avxvnni")]
fn dp4(acc: __m256i, v: __m256i, x: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(acc, v, x)
}

/// A scale (each lane's i32, within ±2¹⁵) as [`scaled`] takes it: as it is with `DP`, in both
/// 16-bit halves of each lane without.
///
/// # Safety
/// The CPU must have AVX2.
#[inline(always)]
unsafe fn scale_for<const DP: bool>(v: __m256i) -> __m256i {
    // SAFETY: as the caller says.
    unsafe {
        if DP {
            v
        } else {
            both_halves(v)
        }
    }
}

/// [`dot`]'s sums, each row's in i32, times a scale of [`scale_for`]: with `DP` by `vpmulld`,
/// without by `vpmaddwd`.
///
/// # Safety
/// The CPU must have AVX2.
#[inline(always)]
unsafe fn scaled<const DP: bool>(acc: __m256i, scale: __m256i) -> __m256i {
    // SAFETY: as the caller says.
    unsafe {
        if DP {
            _mm256_mullo_epi32(acc, scale)
        } else {
            widen(acc, scale)
        }
    }
}

/// 32 bytes of `b` from `at`.
#[target_feature(enable = "avx2")]
fn load32(b: &[u8], at: usize) -> __m256i {
    let b = &b[at..at + 32];
    // SAFETY: `b` holds 32 bytes.
    unsafe { _mm256_loadu_si256(b.as_ptr() as *const __m256i) }
}

/// 8 f16 at `b[at..at + 16]`, widened.
#[target_feature(enable = "avx2,f16c")]
fn halves8(b: &[u8], at: usize) -> __m256 {
    let b = &b[at..at + 16];
    // SAFETY: `b` holds 16 bytes.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(b.as_ptr() as *const __m128i) })
}

/// The little-endian u32 at `b[at..at + 4]`.
fn word(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Activation bytes at..at + 4 in every 32-bit lane.
#[target_feature(enable = "avx2")]
fn quad_at(qs: &[i8], at: usize) -> __m256i {
    let q = &qs[at..at + 4];
    _mm256_set1_epi32(i32::from_le_bytes([
        q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8,
    ]))
}

/// Unsigned bytes `u` times signed bytes `s`, adjacent pairs summed in 16 bits (exact for the
/// values here: at most 2·63·128 in magnitude).
#[target_feature(enable = "avx2")]
fn pairs(u: __m256i, s: __m256i) -> __m256i {
    _mm256_maddubs_epi16(u, s)
}

/// Each 32-bit lane's two 16-bit halves summed, times `scale`'s (in both halves).
#[target_feature(enable = "avx2")]
fn widen(v: __m256i, scale: __m256i) -> __m256i {
    _mm256_madd_epi16(v, scale)
}

/// Each lane's i32 (within ±2¹⁵) in both of its 16-bit halves: a scale for [`widen`].
#[target_feature(enable = "avx2")]
fn both_halves(v: __m256i) -> __m256i {
    _mm256_or_si256(
        _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF)),
        _mm256_slli_epi32::<16>(v),
    )
}

/// Bits 0..32 of `m` as bytes: byte i `value` where bit i is set, 0 where not.
#[target_feature(enable = "avx2")]
fn bit_bytes(m: u32, value: i8) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(m as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(value))
}

/// Byte `byte` (0..4) of each 32-bit lane, zero-extended.
#[target_feature(enable = "avx2")]
fn lane_byte(v: __m256i, byte: usize) -> __m256i {
    let shifted = _mm256_srl_epi32(v, _mm_cvtsi32_si128(8 * byte as i32));
    _mm256_and_si256(shifted, _mm256_set1_epi32(0xFF))
}

/// Signed bytes as [`mins_dot`]'s pairs: pair 0 bytes 0 and 2 of each lane, pair 1 bytes 1 and
/// 3, sign-extended to 16 bits.
#[target_feature(enable = "avx2")]
fn signed_pairs(v: __m256i) -> [__m256i; 2] {
    [
        _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(v)),
        _mm256_srai_epi16::<8>(v),
    ]
}

/// Unsigned bytes as [`mins_dot`]'s pairs (as [`signed_pairs`], zero-extended).
#[target_feature(enable = "avx2")]
fn unsigned_pairs(v: __m256i) -> [__m256i; 2] {
    [
        _mm256_and_si256(v, _mm256_set1_epi32(0x00FF_00FF)),
        _mm256_srli_epi16::<8>(v),
    ]
}

/// Σ_p pairs[p]·sums[p] in each row's lane (`vpmaddwd` of each pair against the activations'
/// sums paired the same way, [`super::block_terms`]).
#[target_feature(enable = "avx2")]
fn mins_dot(pairs: &[__m256i], sums: &[i32; 16]) -> __m256i {
    let mut m = _mm256_setzero_si256();
    for (p, &s) in pairs.iter().zip(sums) {
        m = _mm256_add_epi32(m, _mm256_madd_epi16(*p, _mm256_set1_epi32(s)));
    }
    m
}

/// Lanes 0, 2, 4, 6 of `a` summed with 1, 3, 5, 7 (rows 0..4) then `b`'s (rows 4..8): one i32
/// a row, in order.
#[target_feature(enable = "avx2")]
fn row_sums(a: __m256i, b: __m256i) -> __m256i {
    _mm256_permute4x64_epi64::<0xD8>(_mm256_hadd_epi32(a, b))
}

/// Stores half `half`'s 8 outputs of each row.
#[target_feature(enable = "avx2")]
fn store<const R: usize>(acc: &[__m256; R], out: &mut [[f32; 16]], half: usize) {
    for r in 0..R {
        let o = &mut out[r][HALF * half..HALF * half + HALF];
        // SAFETY: `o` holds 8 f32.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), acc[r]) };
    }
}

/// The 32-value types (as the AVX-512 `one`): per block, the unsigned values' products with
/// the activations (with `DP` by `vpdpbusd`, in i32; without, in 16 bits: Q4_0/Q4_1 all 8 of a
/// row's pair sums, ≤ 8·2·15·128, Q5_0/Q5_1 4, ≤ 4·2·31·128, then widened), from −offset·the
/// activations' sum; without `DP`, Q8_0's values widened to 16 bits and multiplied by
/// `vpmaddwd` (each row's two pairs summed at the block's end); then d·y.d·sums (+ m·y.s).
///
/// # Safety
/// Only compiled into the functions of `compiled!`, called where the CPU has their features.
#[inline(always)]
unsafe fn one_body<const DP: bool, const K: u8, const R: usize>(
    w: &[u8],
    acts: &[(&[Q8_1], &[i32])],
    out: &mut [[f32; 16]],
) {
    // SAFETY: the body runs only compiled into the functions of `compiled!`, which have
    // the features its intrinsics need (the caller checked the CPU has them).
    unsafe {
        let kind = super::kind_of(K);
        let bb = GROUP_ROWS * kind.block_bytes();
        let acts: [(&[Q8_1], &[i32]); R] = std::array::from_fn(|r| acts[r]);
        let blocks = acts
            .iter()
            .fold(w.len() / bb, |b, (x, s)| b.min(x.len()).min(s.len()));
        let at = if kind.has_min() { 64 } else { 32 };
        let m4 = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        for half in 0..2 {
            let o = 32 * half;
            let mut acc = [_mm256_setzero_ps(); R];
            for (b, block) in w.chunks_exact(bb).take(blocks).enumerate() {
                if half == 0 {
                    // (The second pass reads the lines again from the cache.)
                    super::kernels::prefetch_block(block);
                }
                let mut sums = [_mm256_setzero_si256(); R];
                if kind == Kind::Q8_0 && DP {
                    for j in 0..8 {
                        let v = load32(block, at + 64 * j + o);
                        for r in 0..R {
                            sums[r] = dp4(sums[r], v, quad_at(&acts[r].0[b].qs, 4 * j));
                        }
                    }
                } else if kind == Kind::Q8_0 {
                    // Each row's 32 activations widened to 16 bits, once a block.
                    let mut wide = [[0i16; QK]; R];
                    for (wide, a) in wide.iter_mut().zip(&acts) {
                        widened(&a.0[b].qs, wide);
                    }
                    let mut lo = [_mm256_setzero_si256(); R];
                    let mut hi = [_mm256_setzero_si256(); R];
                    for j in 0..8 {
                        let v = load32(block, at + 64 * j + o);
                        let v0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(v));
                        let v1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256::<1>(v));
                        for r in 0..R {
                            let x = quad16(&wide[r], 4 * j);
                            lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(v0, x));
                            hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(v1, x));
                        }
                    }
                    for r in 0..R {
                        sums[r] = row_sums(lo[r], hi[r]);
                    }
                } else {
                    let mut p = [_mm256_setzero_si256(); R];
                    for t in 0..4 {
                        let v = load32(block, at + 64 * t + o);
                        let mut lo = _mm256_and_si256(v, m4);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                        if kind.fifth_bit() {
                            let mask = |j: usize| word(block, at + 256 + 8 * j + 4 * half);
                            lo = _mm256_add_epi8(lo, bit_bytes(mask(t), 16));
                            hi = _mm256_add_epi8(hi, bit_bytes(mask(t + 4), 16));
                        }
                        for r in 0..R {
                            let y = &acts[r].0[b].qs;
                            p[r] = dot::<DP>(p[r], lo, quad_at(y, 4 * t));
                            p[r] = dot::<DP>(p[r], hi, quad_at(y, 16 + 4 * t));
                        }
                        if DP || !kind.fifth_bit() && t < 3 || kind.fifth_bit() && t % 2 == 0 {
                            continue;
                        }
                        for r in 0..R {
                            sums[r] = _mm256_add_epi32(sums[r], widen(p[r], ones));
                            p[r] = _mm256_setzero_si256();
                        }
                    }
                    if DP {
                        sums = p;
                    }
                }
                let d = halves8(block, 16 * half);
                let mins = if kind.has_min() {
                    halves8(block, 32 + 16 * half)
                } else {
                    _mm256_setzero_ps()
                };
                for r in 0..R {
                    let y = &acts[r].0[b];
                    let s = _mm256_add_epi32(sums[r], _mm256_set1_epi32(acts[r].1[b]));
                    let s = _mm256_cvtepi32_ps(s);
                    acc[r] = _mm256_fmadd_ps(s, _mm256_mul_ps(d, _mm256_set1_ps(y.d)), acc[r]);
                    if kind.has_min() {
                        acc[r] = _mm256_fmadd_ps(mins, _mm256_set1_ps(y.s), acc[r]);
                    }
                }
            }
            store(&acc, out, half);
        }
    }
}

/// Q4_K (Q5_K: `FIVE`): per 32-value sub-block, each row's products summed in 16 bits (Q4_K:
/// all 8 runs, ≤ 8·2·15·128; Q5_K: 4, ≤ 4·2·31·128) and widened against the sub-block's 6-bit
/// scale (with `DP`: summed by `vpdpbusd` in i32, times the scale by `vpmulld`); the mins'
/// term by `vpmaddwd` of the mins against the activations' sub-block sums in 16-bit pairs;
/// then d·y.d·sums − dmin·y.d·mins (as the AVX-512 `q45_k`).
///
/// # Safety
/// Only compiled into the functions of `compiled!`, called where the CPU has their features.
#[inline(always)]
unsafe fn q45_k_body<const DP: bool, const FIVE: bool, const R: usize>(
    w: &[u8],
    acts: &[(&[Q8K], &[[i32; 16]])],
    out: &mut [[f32; 16]],
) {
    // SAFETY: the body runs only compiled into the functions of `compiled!`, which have
    // the features its intrinsics need (the caller checked the CPU has them).
    unsafe {
        let bb = GROUP_ROWS * if FIVE { 176 } else { 144 };
        let (acts, terms, blocks) = super::super_rows::<R>(acts, w.len() / bb);
        let (m4, m6, m30) = (
            _mm256_set1_epi8(0x0F),
            _mm256_set1_epi8(63),
            _mm256_set1_epi8(0x30),
        );
        // (vpdpbusd's sums are i32: a flush a sub-block.)
        let flush = if FIVE && !DP { 4 } else { 8 };
        for half in 0..2 {
            let o = 32 * half;
            let mut acc = [_mm256_setzero_ps(); R];
            for (b, block) in w.chunks_exact(bb).take(blocks).enumerate() {
                if half == 0 {
                    // (The second pass reads the lines again from the cache.)
                    super::kernels::prefetch_block(block);
                }
                // The 6-bit scales and mins of sub-blocks 0..4 and 4..8, a byte each in each lane.
                let (s0, s1, s2) = (
                    load32(block, 64 + o),
                    load32(block, 128 + o),
                    load32(block, 192 + o),
                );
                let scales = [
                    _mm256_and_si256(s0, m6),
                    _mm256_or_si256(
                        _mm256_and_si256(s2, m4),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(s0), m30),
                    ),
                ];
                let mins = [
                    _mm256_and_si256(s1, m6),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(s2), m4),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(s1), m30),
                    ),
                ];
                let mut sums = [_mm256_setzero_si256(); R];
                for c in 0..4 {
                    let sl = scale_for::<DP>(lane_byte(scales[c / 2], (2 * c) % 4));
                    let sh = scale_for::<DP>(lane_byte(scales[c / 2], (2 * c) % 4 + 1));
                    let mut lo_s = [_mm256_setzero_si256(); R];
                    let mut hi_s = [_mm256_setzero_si256(); R];
                    for t in 0..8 {
                        let v = load32(block, 256 + 64 * (8 * c + t) + o);
                        let mut lo = _mm256_and_si256(v, m4);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                        if FIVE {
                            let mask = |j: usize| word(block, 2304 + 8 * j + 4 * half);
                            lo = _mm256_add_epi8(lo, bit_bytes(mask(16 * c + 2 * t), 16));
                            hi = _mm256_add_epi8(hi, bit_bytes(mask(16 * c + 2 * t + 1), 16));
                        }
                        for r in 0..R {
                            let y = &acts[r][b].qs;
                            lo_s[r] = dot::<DP>(lo_s[r], lo, quad_at(y, 64 * c + 4 * t));
                            hi_s[r] = dot::<DP>(hi_s[r], hi, quad_at(y, 64 * c + 32 + 4 * t));
                        }
                        if t % flush == flush - 1 {
                            for r in 0..R {
                                let p = _mm256_add_epi32(
                                    scaled::<DP>(lo_s[r], sl),
                                    scaled::<DP>(hi_s[r], sh),
                                );
                                sums[r] = _mm256_add_epi32(sums[r], p);
                                lo_s[r] = _mm256_setzero_si256();
                                hi_s[r] = _mm256_setzero_si256();
                            }
                        }
                    }
                }
                let d = halves8(block, 16 * half);
                let dmin = halves8(block, 32 + 16 * half);
                let [p0, p1] = unsigned_pairs(mins[0]);
                let [p2, p3] = unsigned_pairs(mins[1]);
                let min_pairs = [p0, p1, p2, p3];
                for r in 0..R {
                    let y = &acts[r][b];
                    let m = mins_dot(&min_pairs, &terms[r][b]);
                    let yd = _mm256_set1_ps(y.d);
                    let s = _mm256_cvtepi32_ps(sums[r]);
                    acc[r] = _mm256_fmadd_ps(s, _mm256_mul_ps(d, yd), acc[r]);
                    acc[r] =
                        _mm256_fnmadd_ps(_mm256_cvtepi32_ps(m), _mm256_mul_ps(dmin, yd), acc[r]);
                }
            }
            store(&acc, out, half);
        }
    }
}

/// Q6_K: per 16-value group, each row's products of the unsigned 6-bit values summed in 16 bits
/// (2 runs at a time, ≤ 2·2·63·128) and widened against the group's signed scale (with `DP`:
/// `vpdpbusd` and `vpmulld`); the offset's
/// term −32·Σ_g scale_g·(the activations' sum of group g) by `vpmaddwd` of the scales against
/// the sums in 16-bit pairs; then d·y.d·sums (as the AVX-512 `q6_k`).
///
/// # Safety
/// Only compiled into the functions of `compiled!`, called where the CPU has their features.
#[inline(always)]
unsafe fn q6_k_body<const DP: bool, const R: usize>(
    w: &[u8],
    acts: &[(&[Q8K], &[[i32; 16]])],
    out: &mut [[f32; 16]],
) {
    // SAFETY: the body runs only compiled into the functions of `compiled!`, which have
    // the features its intrinsics need (the caller checked the CPU has them).
    unsafe {
        let bb = GROUP_ROWS * 210;
        let (acts, terms, blocks) = super::super_rows::<R>(acts, w.len() / bb);
        let (m4, m30) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
        for half in 0..2 {
            let o = 32 * half;
            let mut acc = [_mm256_setzero_ps(); R];
            for (b, block) in w.chunks_exact(bb).take(blocks).enumerate() {
                if half == 0 {
                    // (The second pass reads the lines again from the cache.)
                    super::kernels::prefetch_block(block);
                }
                let mut sums = [_mm256_setzero_si256(); R];
                // Values 128h + 32q + 4t .. + 4 (q = 0..4; group 8h + 2q + t / 4): low nibbles of
                // the runs at 4t and 32 + 4t of half h's 64 bytes, bit pairs from its high bits' run
                // at 4t (as the AVX-512 `q6_values`).
                for h in 0..2 {
                    for part in 0..2 {
                        // The 4 groups' scales (signed), as `scaled` takes them.
                        let mut scales = [_mm256_setzero_si256(); 4];
                        for (q, sc) in scales.iter_mut().enumerate() {
                            let g = 8 * h + 2 * q + part;
                            let run = load32(block, 32 + 64 * (g / 4) + o);
                            let v = _mm256_srai_epi32::<24>(_mm256_sll_epi32(
                                run,
                                _mm_cvtsi32_si128(8 * (3 - g % 4) as i32),
                            ));
                            *sc = scale_for::<DP>(v);
                        }
                        let mut p = [[_mm256_setzero_si256(); 4]; R];
                        for t in 4 * part..4 * part + 4 {
                            let a = load32(block, 288 + 64 * (16 * h + t) + o);
                            let c = load32(block, 288 + 64 * (16 * h + 8 + t) + o);
                            let bits = load32(block, 2336 + 64 * (8 * h + t) + o);
                            let low = [a, c, _mm256_srli_epi16::<4>(a), _mm256_srli_epi16::<4>(c)];
                            let top = [
                                _mm256_slli_epi16::<4>(bits),
                                _mm256_slli_epi16::<2>(bits),
                                bits,
                                _mm256_srli_epi16::<2>(bits),
                            ];
                            let mut v = [_mm256_setzero_si256(); 4];
                            for ((v, low), top) in v.iter_mut().zip(low).zip(top) {
                                *v = _mm256_or_si256(
                                    _mm256_and_si256(low, m4),
                                    _mm256_and_si256(top, m30),
                                );
                            }
                            for r in 0..R {
                                let y = &acts[r][b].qs;
                                for q in 0..4 {
                                    let x = quad_at(y, 128 * h + 32 * q + 4 * t);
                                    p[r][q] = dot::<DP>(p[r][q], v[q], x);
                                }
                            }
                            // (vpdpbusd's sums are i32: a flush a group.)
                            if t % 2 == 1 && (!DP || t % 4 == 3) {
                                for r in 0..R {
                                    for q in 0..4 {
                                        let s = scaled::<DP>(p[r][q], scales[q]);
                                        sums[r] = _mm256_add_epi32(sums[r], s);
                                        p[r][q] = _mm256_setzero_si256();
                                    }
                                }
                            }
                        }
                    }
                }
                // The offset's term: the scales (signed bytes, 4 groups a run) in pairs.
                let mut scale_pairs = [_mm256_setzero_si256(); 8];
                for (i, p) in scale_pairs.chunks_exact_mut(2).enumerate() {
                    let [a, c] = signed_pairs(load32(block, 32 + 64 * i + o));
                    p[0] = a;
                    p[1] = c;
                }
                let d = halves8(block, 16 * half);
                for r in 0..R {
                    let off = mins_dot(&scale_pairs, &terms[r][b]);
                    let s = _mm256_sub_epi32(sums[r], _mm256_slli_epi32::<5>(off));
                    let yd = _mm256_set1_ps(acts[r][b].d);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, yd), acc[r]);
                }
            }
            store(&acc, out, half);
        }
    }
}

/// Q2_K (Q3_K: `THREE`): per 16-value group, each row's products of the unsigned 2-bit (3-bit)
/// values summed in 16 bits (4 runs, ≤ 4·2·7·128) and widened against the group's scale (Q3_K's
/// less 32; with `DP`: `vpdpbusd` and `vpmulld`); Q3_K's offset's term −4·Σ_g scale_g·(the
/// activations' sum of group g) and Q2_K's mins' term by `vpmaddwd` of the scales (mins)
/// against the sums in 16-bit pairs; then d·y.d·sums (− dmin·y.d·mins), as the AVX-512
/// `q23_k`.
///
/// # Safety
/// Only compiled into the functions of `compiled!`, called where the CPU has their features.
#[inline(always)]
unsafe fn q23_k_body<const DP: bool, const THREE: bool, const R: usize>(
    w: &[u8],
    acts: &[(&[Q8K], &[[i32; 16]])],
    out: &mut [[f32; 16]],
) {
    // SAFETY: the body runs only compiled into the functions of `compiled!`, which have
    // the features its intrinsics need (the caller checked the CPU has them).
    unsafe {
        let bb = GROUP_ROWS * if THREE { 110 } else { 84 };
        let (acts, terms, blocks) = super::super_rows::<R>(acts, w.len() / bb);
        let (m3, m4) = (_mm256_set1_epi8(3), _mm256_set1_epi8(0x0F));
        for half in 0..2 {
            let o = 32 * half;
            let mut acc = [_mm256_setzero_ps(); R];
            for (b, block) in w.chunks_exact(bb).take(blocks).enumerate() {
                if half == 0 {
                    // (The second pass reads the lines again from the cache.)
                    super::kernels::prefetch_block(block);
                }
                // The scales, 4 groups a run (group g at byte g % 4 of run g / 4): Q2_K's 4-bit
                // scale and min a byte, Q3_K's 6-bit scales less 32 (signed bytes).
                let mut scales = [_mm256_setzero_si256(); 4];
                if THREE {
                    let (s0, s1, s2) = (
                        load32(block, 32 + o),
                        load32(block, 96 + o),
                        load32(block, 160 + o),
                    );
                    scales = [
                        q3_scales(s0, _mm256_slli_epi16::<4>(s2)),
                        q3_scales(s1, _mm256_slli_epi16::<2>(s2)),
                        q3_scales(_mm256_srli_epi16::<4>(s0), s2),
                        q3_scales(_mm256_srli_epi16::<4>(s1), _mm256_srli_epi16::<2>(s2)),
                    ];
                } else {
                    for (q, s) in scales.iter_mut().enumerate() {
                        *s = load32(block, 64 + 64 * q + o);
                    }
                }
                let mut sums = [_mm256_setzero_si256(); R];
                // Runs 8n + 4s .. + 4: values 128n + 32j + 16s .. + 16 (bits 2j), group 8n + 2j + s.
                for n in 0..2 {
                    for s in 0..2 {
                        let mut runs = [_mm256_setzero_si256(); 4];
                        for (i, run) in runs.iter_mut().enumerate() {
                            let u = 8 * n + 4 * s + i;
                            *run = load32(block, if THREE { 224 } else { 320 } + 64 * u + o);
                        }
                        for j in 0..4 {
                            let g = 8 * n + 2 * j + s;
                            let sc = lane_byte(scales[g / 4], g % 4);
                            let sc = scale_for::<DP>(if THREE {
                                // The signed byte, sign-extended.
                                _mm256_srai_epi32::<24>(_mm256_slli_epi32::<24>(sc))
                            } else {
                                _mm256_and_si256(sc, _mm256_set1_epi32(0x0F))
                            });
                            let mut p = [_mm256_setzero_si256(); R];
                            for (i, &run) in runs.iter().enumerate() {
                                let u = 8 * n + 4 * s + i;
                                let shifted =
                                    _mm256_srl_epi32(run, _mm_cvtsi32_si128(2 * j as i32));
                                let mut v = _mm256_and_si256(shifted, m3);
                                if THREE {
                                    let mask = word(block, 1248 + 8 * (4 * u + j) + 4 * half);
                                    v = _mm256_add_epi8(v, bit_bytes(mask, 4));
                                }
                                for r in 0..R {
                                    let x = quad_at(&acts[r][b].qs, 16 * g + 4 * i);
                                    p[r] = dot::<DP>(p[r], v, x);
                                }
                            }
                            for r in 0..R {
                                sums[r] = _mm256_add_epi32(sums[r], scaled::<DP>(p[r], sc));
                            }
                        }
                    }
                }
                let d = halves8(block, 16 * half);
                // Q3_K's scales (signed) or Q2_K's mins (the high nibbles) in pairs.
                let mut pairs8 = [_mm256_setzero_si256(); 8];
                for (p, sc) in pairs8.chunks_exact_mut(2).zip(scales) {
                    let [a, c] = if THREE {
                        signed_pairs(sc)
                    } else {
                        unsigned_pairs(_mm256_and_si256(_mm256_srli_epi16::<4>(sc), m4))
                    };
                    p[0] = a;
                    p[1] = c;
                }
                let dmin = if THREE {
                    _mm256_setzero_ps()
                } else {
                    halves8(block, 32 + 16 * half)
                };
                for r in 0..R {
                    let y = &acts[r][b];
                    let yd = _mm256_set1_ps(y.d);
                    let m = mins_dot(&pairs8, &terms[r][b]);
                    let s = if THREE {
                        _mm256_sub_epi32(sums[r], _mm256_slli_epi32::<2>(m))
                    } else {
                        sums[r]
                    };
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, yd), acc[r]);
                    if !THREE {
                        acc[r] = _mm256_fnmadd_ps(
                            _mm256_cvtepi32_ps(m),
                            _mm256_mul_ps(dmin, yd),
                            acc[r],
                        );
                    }
                }
            }
            store(&acc, out, half);
        }
    }
}

/// 32 activation bytes widened to i16.
#[target_feature(enable = "avx2")]
fn widened(q: &[i8; QK], out: &mut [i16; QK]) {
    // SAFETY: `q` holds 32 bytes, `out` 32 i16 (two vectors).
    unsafe {
        let v = _mm256_loadu_si256(q.as_ptr() as *const __m256i);
        let p = out.as_mut_ptr() as *mut __m256i;
        _mm256_storeu_si256(p, _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v)));
        let high = _mm256_extracti128_si256::<1>(v);
        _mm256_storeu_si256(p.add(1), _mm256_cvtepi8_epi16(high));
    }
}

/// Widened activations at..at + 4 (8 bytes) in every 64-bit lane.
#[target_feature(enable = "avx2")]
fn quad16(wide: &[i16], at: usize) -> __m256i {
    let q = &wide[at..at + 4];
    // SAFETY: `q` holds 8 bytes.
    _mm256_broadcastq_epi64(unsafe { _mm_loadl_epi64(q.as_ptr() as *const __m128i) })
}

/// Q3_K's 6-bit scales less 32, as signed bytes: the low nibbles of `low`, bits 4 and 5 of
/// `top`'s bytes.
#[target_feature(enable = "avx2")]
fn q3_scales(low: __m256i, top: __m256i) -> __m256i {
    let (m4, m30) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
    _mm256_sub_epi8(
        _mm256_or_si256(_mm256_and_si256(low, m4), _mm256_and_si256(top, m30)),
        _mm256_set1_epi8(32),
    )
}

const _: () = assert!(QK == 32 && GROUP_ROWS == 2 * HALF);
