//! The built-in matrix product: f32/f64 GEMM and GEMV with the CBLAS calling convention, used
//! when no BLAS library is installed (or `LMKIT_BLAS=builtin`).
//!
//! The product follows the BLIS design. op(B) is packed in panels of up to `KC` rows × `NC`
//! columns, cut into strips `NR` columns wide; op(A) in blocks of `MC` rows × the same depth, cut
//! into strips `MR` rows high; a register-blocked micro-kernel multiplies one A strip by one B
//! strip, its MR × NR accumulators held in vector registers over the whole depth, and adds the
//! tile into C once per depth block. One B strip serves every A strip of a block from L1/L2
//! while they stream past it. Micro-kernels exist for AVX-512 (f32 14 × 32, f64 12 × 16) and AVX2
//! with FMA (f32 6 × 16, f64 6 × 8), chosen at run time; elsewhere there is no built-in product
//! and lmkit uses candle's.
//!
//! Each call runs on the calling thread, as lmkit uses a BLAS library: the callers split products
//! into pieces of rows or columns over rayon's threads. Packing buffers are per thread and reused.

use crate::blas::{holds, Gemm, Gemv};
use num_traits::Float;
use std::cell::RefCell;

const ROW_MAJOR: i32 = 101;
const TRANS: i32 = 112;
const CONJ_TRANS: i32 = 113;

/// Depth of a packed panel: the micro-kernel's loop length between two visits to C.
const KC: usize = 384;
/// Rows of A packed at once (a multiple of every MR): the block that stays in L2.
const MC: usize = 168;
/// Columns of B packed at once.
const NC: usize = 4096;

/// One micro-kernel: C[MR × NR] (rows `ldc` apart) = alpha · Ap · Bp + beta · C, where Ap is a
/// packed A strip (kc steps of MR values) and Bp a packed B strip (kc steps of NR values). With
/// beta = 0, C is not read (it may be uninitialised).
type Tile<T> =
    unsafe fn(kc: usize, a: *const T, b: *const T, c: *mut T, ldc: usize, alpha: T, beta: T);

/// A micro-kernel and its tile size.
#[derive(Clone, Copy)]
#[doc(hidden)]
pub struct Kernel<T> {
    tile: Tile<T>,
    mr: usize,
    nr: usize,
}

/// Which instruction set the built-in product uses on this CPU, if any.
pub fn isa() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        match crate::simd::simd_level() {
            2 => return Some("AVX-512"),
            1 => return Some("AVX2"),
            _ => {}
        }
    }
    None
}

/// The built-in CBLAS-style functions (sgemm, dgemm, sgemv, dgemv; row-major only) for this CPU,
/// if it has a micro-kernel.
pub fn functions() -> Option<Cblas> {
    isa()?;
    Some(Cblas {
        sgemm: cblas_gemm::<f32>,
        dgemm: cblas_gemm::<f64>,
        sgemv: cblas_gemv::<f32>,
        dgemv: cblas_gemv::<f64>,
    })
}

/// The CBLAS-style entry points of the built-in product.
pub struct Cblas {
    pub sgemm: Gemm<f32>,
    pub dgemm: Gemm<f64>,
    pub sgemv: Gemv<f32>,
    pub dgemv: Gemv<f64>,
}

/// How many of a type's micro-kernels (listed by SIMD level) this CPU runs.
fn levels() -> usize {
    #[cfg(target_arch = "x86_64")]
    return usize::from(crate::simd::simd_level()) + 1;
    #[cfg(not(target_arch = "x86_64"))]
    1
}

/// f32 micro-kernels by SIMD level: portable, then (x86-64) AVX2 with FMA, AVX-512.
static F32_KERNELS: &[Kernel<f32>] = &[
    Kernel {
        tile: tile_generic::<f32, 4, 8>,
        mr: 4,
        nr: 8,
    },
    #[cfg(target_arch = "x86_64")]
    Kernel {
        tile: x86::f32_avx2,
        mr: 6,
        nr: 16,
    },
    #[cfg(target_arch = "x86_64")]
    Kernel {
        tile: x86::f32_avx512,
        mr: 14,
        nr: 32,
    },
];

/// f64 micro-kernels by SIMD level, as [`F32_KERNELS`].
static F64_KERNELS: &[Kernel<f64>] = &[
    Kernel {
        tile: tile_generic::<f64, 4, 4>,
        mr: 4,
        nr: 4,
    },
    #[cfg(target_arch = "x86_64")]
    Kernel {
        tile: x86::f64_avx2,
        mr: 6,
        nr: 8,
    },
    #[cfg(target_arch = "x86_64")]
    Kernel {
        tile: x86::f64_avx512,
        mr: 12,
        nr: 16,
    },
];

/// A portable micro-kernel (tests compare the vector ones against it).
///
/// # Safety
/// As [`Tile`]: `a` holds kc·MR and `b` kc·NR values; C's MR rows of NR values are writable
/// (and initialised when beta ≠ 0).
unsafe fn tile_generic<T: Float, const MR: usize, const NR: usize>(
    kc: usize,
    a: *const T,
    b: *const T,
    c: *mut T,
    ldc: usize,
    alpha: T,
    beta: T,
) {
    let mut acc = [[T::zero(); NR]; MR];
    for p in 0..kc {
        // SAFETY: step p of the strips lies within the kc·MR and kc·NR values the caller
        // provides.
        let (ap, bp) = unsafe {
            (
                std::slice::from_raw_parts(a.add(p * MR), MR),
                std::slice::from_raw_parts(b.add(p * NR), NR),
            )
        };
        for (row, &x) in acc.iter_mut().zip(ap) {
            for (s, &y) in row.iter_mut().zip(bp) {
                *s = x.mul_add(y, *s);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, &s) in row.iter().enumerate() {
            // SAFETY: (i, j) is within the MR × NR tile the caller provides.
            unsafe {
                let dst = c.add(i * ldc + j);
                *dst = if beta == T::zero() {
                    alpha * s
                } else {
                    alpha * s + beta * *dst
                };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// Defines an AVX micro-kernel of MR rows × (NV vectors of LANES) columns.
    macro_rules! tile {
        ($name:ident, $t:ty, $feat:literal, $mr:literal, $nv:literal, $lanes:literal,
         $zero:ident, $load:ident, $store:ident, $set1:ident, $fma:ident, $mul:ident) => {
            /// # Safety
            /// The CPU has the features enabled; `a` holds kc·MR and `b` kc·NR values (NR =
            /// NV·LANES); C's MR rows of NR values are writable (initialised when beta ≠ 0).
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name(
                kc: usize,
                a: *const $t,
                b: *const $t,
                c: *mut $t,
                ldc: usize,
                alpha: $t,
                beta: $t,
            ) {
                const MR: usize = $mr;
                const NV: usize = $nv;
                const NR: usize = NV * $lanes;
                let mut acc = [[$zero(); NV]; MR];
                // C's tile is read (or written) only after the loop: fetch its lines meanwhile.
                // Into L2 only: rows of a wide C lie 4 KiB multiples apart and would evict each
                // other from L1's few ways.
                for i in 0..MR {
                    for at in [i * ldc, i * ldc + NR - 1] {
                        _mm_prefetch::<_MM_HINT_T1>(c.wrapping_add(at) as *const i8);
                    }
                }
                let (mut a, mut b) = (a, b);
                for _ in 0..kc {
                    crate::simd::prefetch(b.wrapping_add(8 * NR));
                    // SAFETY: each step reads NR values of the B strip and MR of the A strip,
                    // within the kc steps the caller provides.
                    unsafe {
                        let mut bv = [$zero(); NV];
                        for (v, x) in bv.iter_mut().enumerate() {
                            *x = $load(b.add(v * $lanes));
                        }
                        for (i, row) in acc.iter_mut().enumerate() {
                            let x = $set1(*a.add(i));
                            for (s, y) in row.iter_mut().zip(bv) {
                                *s = $fma(x, y, *s);
                            }
                        }
                        a = a.add(MR);
                        b = b.add(NR);
                    }
                }
                let al = $set1(alpha);
                let be = $set1(beta);
                for (i, row) in acc.iter().enumerate() {
                    for (v, &s) in row.iter().enumerate() {
                        // SAFETY: row i, vector v lies within the MR × NR tile of C.
                        unsafe {
                            let dst = c.add(i * ldc + v * $lanes);
                            let r = if beta == 0.0 {
                                $mul(s, al)
                            } else {
                                $fma(s, al, $mul($load(dst), be))
                            };
                            $store(dst, r);
                        }
                    }
                }
            }
        };
    }

    /// strip[p·w + i] = base[i·ld + p] for rows i < w (w ≤ 32) and steps p < depth, f32: a
    /// strip of A (or of op(B)ᵀ) from rows whose steps are contiguous, 16 steps at a time through
    /// 16 × 16 transposes in registers.
    ///
    /// # Safety
    /// The CPU has AVX-512F; (i, p) for i < w, p < depth lie at base + i·ld + p; `strip` holds
    /// w·depth writable values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_rows_f32(
        base: *const f32,
        ld: usize,
        depth: usize,
        w: usize,
        strip: *mut f32,
    ) {
        let mut p = 0;
        while p + 16 <= depth {
            let mut i0 = 0;
            while i0 < w {
                let rows = (w - i0).min(16);
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, v) in r.iter_mut().enumerate() {
                    if i < rows {
                        // SAFETY: row i0 + i < w, steps p .. p + 16 ≤ depth.
                        *v = unsafe { _mm512_loadu_ps(base.add((i0 + i) * ld + p)) };
                    }
                }
                let r = transpose16(r);
                let mask: __mmask16 = if rows == 16 { 0xffff } else { (1 << rows) - 1 };
                for (q, v) in r.into_iter().enumerate() {
                    // SAFETY: step p + q < depth, values i0 .. i0 + rows ≤ w of it.
                    unsafe { _mm512_mask_storeu_ps(strip.add((p + q) * w + i0), mask, v) };
                }
                i0 += 16;
            }
            p += 16;
        }
        for p in p..depth {
            for i in 0..w {
                // SAFETY: as above, one value at a time.
                unsafe { *strip.add(p * w + i) = *base.add(i * ld + p) };
            }
        }
    }

    /// [`pack_rows_f32`] on AVX2 for strips of 6 or 16 rows (the AVX2 micro-kernel's A and B
    /// strips): 8 steps at a time through 8 × 8 transposes in registers, a strip of 6 rows
    /// through an 8 × 8 block whose last two rows are zero, stored 4 + 2 values per step.
    ///
    /// # Safety
    /// The CPU has AVX2; w is 6 or 16; (i, p) for i < w, p < depth lie at base + i·ld + p;
    /// `strip` holds w·depth writable values.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn pack_rows_f32_avx2(
        base: *const f32,
        ld: usize,
        depth: usize,
        w: usize,
        strip: *mut f32,
    ) {
        assert!(w == 6 || w == 16, "no AVX2 strip is {w} wide");
        let mut p = 0;
        while p + 8 <= depth {
            let mut i0 = 0;
            while i0 < w {
                let rows = (w - i0).min(8);
                let mut r = [_mm256_setzero_ps(); 8];
                for (i, v) in r.iter_mut().enumerate().take(rows) {
                    // SAFETY: row i0 + i < w, steps p .. p + 8 ≤ depth.
                    *v = unsafe { _mm256_loadu_ps(base.add((i0 + i) * ld + p)) };
                }
                let r = transpose8(r);
                for (q, v) in r.into_iter().enumerate() {
                    let d = strip.wrapping_add((p + q) * w + i0);
                    // SAFETY: step p + q < depth, values i0 .. i0 + rows ≤ w of it.
                    unsafe {
                        if rows == 8 {
                            _mm256_storeu_ps(d, v);
                        } else {
                            // rows = 6: four values, then two.
                            _mm_storeu_ps(d, _mm256_castps256_ps128(v));
                            _mm_storel_pd(
                                d.add(4).cast(),
                                _mm_castps_pd(_mm256_extractf128_ps::<1>(v)),
                            );
                        }
                    }
                }
                i0 += rows;
            }
            p += 8;
        }
        for p in p..depth {
            for i in 0..w {
                // SAFETY: as above, one value at a time.
                unsafe { *strip.add(p * w + i) = *base.add(i * ld + p) };
            }
        }
    }

    /// The transpose of an 8 × 8 block of f32 (row i in r[i]).
    #[target_feature(enable = "avx2")]
    fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        // Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves.
        let mut t = [_mm256_setzero_ps(); 8];
        for k in 0..4 {
            t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
            t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
        }
        let mut u = [_mm256_setzero_ps(); 8];
        for k in 0..2 {
            let b = 4 * k;
            u[b] = _mm256_shuffle_ps::<0x44>(t[b], t[b + 2]);
            u[b + 1] = _mm256_shuffle_ps::<0xee>(t[b], t[b + 2]);
            u[b + 2] = _mm256_shuffle_ps::<0x44>(t[b + 1], t[b + 3]);
            u[b + 3] = _mm256_shuffle_ps::<0xee>(t[b + 1], t[b + 3]);
        }
        for j in 0..4 {
            t[j] = _mm256_permute2f128_ps::<0x20>(u[j], u[4 + j]);
            t[4 + j] = _mm256_permute2f128_ps::<0x31>(u[j], u[4 + j]);
        }
        t
    }

    /// The transpose of a 16 × 16 block of f32 (row i in r[i]).
    #[target_feature(enable = "avx512f")]
    pub(crate) fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        // Pairs of rows interleaved, then pairs of pairs, then 128-bit lanes twice.
        let mut t = [_mm512_setzero_ps(); 16];
        for k in 0..8 {
            t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
            t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
        }
        let mut u = [_mm512_setzero_ps(); 16];
        for k in 0..4 {
            let b = 4 * k;
            u[b] = _mm512_shuffle_ps::<0x44>(t[b], t[b + 2]);
            u[b + 1] = _mm512_shuffle_ps::<0xee>(t[b], t[b + 2]);
            u[b + 2] = _mm512_shuffle_ps::<0x44>(t[b + 1], t[b + 3]);
            u[b + 3] = _mm512_shuffle_ps::<0xee>(t[b + 1], t[b + 3]);
        }
        for k in 0..2 {
            let b = 8 * k;
            for j in 0..4 {
                t[b + j] = _mm512_shuffle_f32x4::<0x88>(u[b + j], u[b + 4 + j]);
                t[b + 4 + j] = _mm512_shuffle_f32x4::<0xdd>(u[b + j], u[b + 4 + j]);
            }
        }
        for j in 0..8 {
            u[j] = _mm512_shuffle_f32x4::<0x88>(t[j], t[8 + j]);
            u[8 + j] = _mm512_shuffle_f32x4::<0xdd>(t[j], t[8 + j]);
        }
        u
    }

    tile!(
        f32_avx512,
        f32,
        "avx512f",
        14,
        2,
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_mul_ps
    );
    tile!(
        f64_avx512,
        f64,
        "avx512f",
        12,
        2,
        8,
        _mm512_setzero_pd,
        _mm512_loadu_pd,
        _mm512_storeu_pd,
        _mm512_set1_pd,
        _mm512_fmadd_pd,
        _mm512_mul_pd
    );
    tile!(
        f32_avx2,
        f32,
        "avx2,fma",
        6,
        2,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_mul_ps
    );
    tile!(
        f64_avx2,
        f64,
        "avx2,fma",
        6,
        2,
        4,
        _mm256_setzero_pd,
        _mm256_loadu_pd,
        _mm256_storeu_pd,
        _mm256_set1_pd,
        _mm256_fmadd_pd,
        _mm256_mul_pd
    );
}

/// A matrix operand: element (i, j) of op(X) at `p[i·ld + j]`, or at `p[j·ld + i]` when `trans`.
#[derive(Clone, Copy)]
struct View<T> {
    p: *const T,
    ld: usize,
    trans: bool,
}

impl<T> View<T> {
    /// The view of the sub-matrix from (i, j).
    fn from(&self, i: usize, j: usize) -> View<T> {
        let o = if self.trans {
            j * self.ld + i
        } else {
            i * self.ld + j
        };
        View {
            p: self.p.wrapping_add(o),
            ..*self
        }
    }
}

/// Packs rows 0..rows, columns 0..depth of op(X) into strips of `w` rows: strip s holds, for each
/// step p < depth, the values of rows s·w .. s·w + w at column p (zero past `rows`). A packs
/// this way as is; B packs this way as its transpose (strips of columns).
///
/// # Safety
/// Every (i, p) with i < rows and p < depth lies within `x`.
unsafe fn pack<T: Buffers>(x: View<T>, rows: usize, depth: usize, w: usize, dst: &mut [T]) {
    // SAFETY (all arms): the caller's guarantee, passed on.
    unsafe {
        match w {
            4 => pack_w::<T, 4>(x, rows, depth, dst),
            6 => pack_w::<T, 6>(x, rows, depth, dst),
            8 => pack_w::<T, 8>(x, rows, depth, dst),
            12 => pack_w::<T, 12>(x, rows, depth, dst),
            14 => pack_w::<T, 14>(x, rows, depth, dst),
            16 => pack_w::<T, 16>(x, rows, depth, dst),
            32 => pack_w::<T, 32>(x, rows, depth, dst),
            _ => unreachable!("no micro-kernel is {w} wide"),
        }
    }
}

/// [`pack`] for strips of W rows (a constant, so a step's W values move as one block).
///
/// # Safety
/// As [`pack`].
unsafe fn pack_w<T: Buffers, const W: usize>(x: View<T>, rows: usize, depth: usize, dst: &mut [T]) {
    for (s, strip) in dst[..rows.div_ceil(W) * W * depth]
        .chunks_exact_mut(W * depth)
        .enumerate()
    {
        let r0 = s * W;
        let full = (rows - r0).min(W);
        // Whole strips of rows whose steps are contiguous: through vector transposes where the
        // type and CPU have them.
        // SAFETY: (r0 + i, p) lies within `x` for i < W, p < depth; the strip holds W·depth.
        if !x.trans
            && full == W
            && unsafe { T::pack_rows(x.from(r0, 0).p, x.ld, depth, W, strip.as_mut_ptr()) }
        {
            continue;
        }
        let steps = strip.as_chunks_mut::<W>().0;
        if x.trans {
            // Row i of op(X) is column i of the storage: for each step the strip's values are
            // contiguous.
            for (p, d) in steps.iter_mut().enumerate() {
                let src = x.p.wrapping_add(p * x.ld + r0);
                if full == W {
                    // SAFETY: elements (r0 .. r0 + W, p) lie within `x` (the caller's guarantee),
                    // contiguous in a transposed view.
                    *d = unsafe { src.cast::<[T; W]>().read_unaligned() };
                } else {
                    // SAFETY: as above, for the `full` rows there are.
                    let src = unsafe { std::slice::from_raw_parts(src, full) };
                    d[..full].copy_from_slice(src);
                    d[full..].fill(T::zero());
                }
            }
        } else if full == W {
            // Each row's steps are contiguous: gather step p of the W rows, write the step at
            // once.
            let base = x.from(r0, 0).p;
            for (p, d) in steps.iter_mut().enumerate() {
                // SAFETY: (r0 + i, p) lies within `x` for i < W.
                *d = std::array::from_fn(|i| unsafe { *base.add(i * x.ld + p) });
            }
        } else {
            for (p, d) in steps.iter_mut().enumerate() {
                for (i, v) in d.iter_mut().enumerate() {
                    *v = if i < full {
                        // SAFETY: (r0 + i, p) lies within `x` for i < full.
                        unsafe { *x.p.add((r0 + i) * x.ld + p) }
                    } else {
                        T::zero()
                    };
                }
            }
        }
    }
}

/// Per-thread packing buffers, reused across calls (f32 and f64 calls each keep their own).
#[doc(hidden)]
pub struct Scratch<T> {
    a: Vec<T>,
    b: Vec<T>,
    /// One tile, for the partial tiles at C's edges.
    edge: Vec<T>,
}

/// f32 and f64: the element types of the built-in product (its per-thread buffers and kernel).
pub trait Buffers: Float + Send + Sync + 'static {
    #[doc(hidden)]
    fn with_scratch<R>(f: impl FnOnce(&mut Scratch<Self>) -> R) -> R;
    #[doc(hidden)]
    fn kernel() -> Kernel<Self>;
    /// strip[p·w + i] = base[i·ld + p] (i < w, p < depth) through vector transposes where this
    /// type and CPU have them; false when not done.
    ///
    /// # Safety
    /// As `x86::pack_rows_f32`, without the CPU requirement.
    #[doc(hidden)]
    unsafe fn pack_rows(
        _base: *const Self,
        _ld: usize,
        _depth: usize,
        _w: usize,
        _strip: *mut Self,
    ) -> bool {
        false
    }
}

thread_local! {
    static SCRATCH_F32: RefCell<Scratch<f32>> = const { RefCell::new(Scratch { a: Vec::new(), b: Vec::new(), edge: Vec::new() }) };
    static SCRATCH_F64: RefCell<Scratch<f64>> = const { RefCell::new(Scratch { a: Vec::new(), b: Vec::new(), edge: Vec::new() }) };
}

impl Buffers for f32 {
    fn with_scratch<R>(f: impl FnOnce(&mut Scratch<f32>) -> R) -> R {
        SCRATCH_F32.with(|s| f(&mut s.borrow_mut()))
    }
    fn kernel() -> Kernel<f32> {
        F32_KERNELS[levels().min(F32_KERNELS.len()) - 1]
    }
    unsafe fn pack_rows(
        base: *const f32,
        ld: usize,
        depth: usize,
        w: usize,
        strip: *mut f32,
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        match crate::simd::simd_level() {
            2 if w <= 32 => {
                // SAFETY: the CPU has AVX-512F; the caller's guarantee on the operands.
                unsafe { x86::pack_rows_f32(base, ld, depth, w, strip) };
                return true;
            }
            1 if w == 6 || w == 16 => {
                // SAFETY: the CPU has AVX2; the caller's guarantee on the operands.
                unsafe { x86::pack_rows_f32_avx2(base, ld, depth, w, strip) };
                return true;
            }
            _ => {}
        }
        let _ = (base, ld, depth, w, strip);
        false
    }
}

impl Buffers for f64 {
    fn with_scratch<R>(f: impl FnOnce(&mut Scratch<f64>) -> R) -> R {
        SCRATCH_F64.with(|s| f(&mut s.borrow_mut()))
    }
    fn kernel() -> Kernel<f64> {
        F64_KERNELS[levels().min(F64_KERNELS.len()) - 1]
    }
}

/// Where the product's op(B) panels come from.
#[derive(Clone, Copy)]
enum Panels<'a, T> {
    /// Packed from this view as the product goes.
    Pack(View<T>),
    /// Packed already, in the product's order (see [`PackedB`]).
    Packed(&'a [T]),
}

/// The depth of each block of a product of depth k: equal blocks of at most `KC` (384 = 2 × 192,
/// not 256 + 128), so C is visited once per block.
fn depth_block(k: usize) -> usize {
    k.div_ceil(k.div_ceil(KC)).max(1)
}

/// Values of the packed op(B) panel of `nc` columns × `kc` rows (whole strips of `nr`).
fn panel_len(nc: usize, kc: usize, nr: usize) -> usize {
    nc.div_ceil(nr) * nr * kc
}

/// C[m×n] (rows `ldc` apart) = alpha · op(A) · op(B) + beta · C, on the calling thread.
///
/// # Safety
/// op(A) (m × k) and op(B) (k × n) must lie within their views (a packed B: packed for k × n with
/// this kernel); C's m rows of n values writable (initialised when beta ≠ 0).
#[allow(clippy::too_many_arguments)]
unsafe fn product<T: Buffers>(
    (m, n, k): (usize, usize, usize),
    alpha: T,
    a: View<T>,
    b: Panels<T>,
    beta: T,
    c: *mut T,
    ldc: usize,
    kernel: Kernel<T>,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 || alpha == T::zero() {
        for i in 0..m {
            // SAFETY: row i of C is writable (and initialised when beta ≠ 0).
            let row = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n) };
            for v in row {
                *v = if beta == T::zero() {
                    T::zero()
                } else {
                    beta * *v
                };
            }
        }
        return;
    }
    let Kernel { mr, nr, .. } = kernel;
    let kc_even = depth_block(k);
    // Packed blocks hold whole strips: the last one is zero-padded to MR rows / NR columns.
    let mc_max = m.min(MC).div_ceil(mr) * mr;
    let nc_max = n.min(NC).div_ceil(nr) * nr;
    T::with_scratch(|s| {
        if s.a.len() < mc_max * kc_even {
            s.a.resize(mc_max * kc_even, T::zero());
        }
        if matches!(b, Panels::Pack(_)) && s.b.len() < nc_max * kc_even {
            s.b.resize(nc_max * kc_even, T::zero());
        }
        if s.edge.len() < mr * nr {
            s.edge.resize(mr * nr, T::zero());
        }
        // Offset of the next panel in a packed B.
        let mut next = 0;
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(kc_even) {
                let kc = kc_even.min(k - pc);
                let panel: *const T = match b {
                    Panels::Pack(b) => {
                        // B's columns jc.. are the rows of op(B)ᵀ: a transposed view of B flips
                        // `trans`.
                        let bt = View {
                            trans: !b.trans,
                            ..b.from(pc, jc)
                        };
                        // SAFETY: op(B)ᵀ rows jc .. jc + nc, columns pc .. pc + kc lie within B.
                        unsafe { pack(bt, nc, kc, nr, &mut s.b) };
                        s.b.as_ptr()
                    }
                    Panels::Packed(d) => {
                        let p = d[next..next + panel_len(nc, kc, nr)].as_ptr();
                        next += panel_len(nc, kc, nr);
                        p
                    }
                };
                let beta = if pc == 0 { beta } else { T::one() };
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    // SAFETY: op(A) rows ic .. ic + mc, columns pc .. pc + kc lie within A.
                    unsafe { pack(a.from(ic, pc), mc, kc, mr, &mut s.a) };
                    for jr in (0..nc).step_by(nr) {
                        let bp = panel.wrapping_add(jr * kc);
                        let cols = nr.min(nc - jr);
                        for ir in (0..mc).step_by(mr) {
                            let ap = s.a[ir * kc..].as_ptr();
                            let rows = mr.min(mc - ir);
                            let dst = c.wrapping_add((ic + ir) * ldc + jc + jr);
                            // SAFETY: the strips hold kc steps each (the panel holds its strips
                            // whole); the tile's rows × cols lie within the m × n of C.
                            unsafe {
                                tile_into(
                                    kernel,
                                    (kc, ap, bp),
                                    (dst, ldc),
                                    (rows, cols),
                                    (alpha, beta),
                                    &mut s.edge,
                                )
                            };
                        }
                    }
                }
            }
        }
    })
}

/// C[i, j] = v(i, j) + beta · C[i, j] over a rows × cols tile of C (rows `ldc` apart; C not
/// read where beta = 0): a partial tile at C's edges.
///
/// # Safety
/// The tile's elements are writable (and initialised when beta ≠ 0).
unsafe fn store_tile<T: Float>(
    c: *mut T,
    ldc: usize,
    (rows, cols): (usize, usize),
    beta: T,
    v: impl Fn(usize, usize) -> T,
) {
    for i in 0..rows {
        for j in 0..cols {
            // SAFETY: (i, j) is within the tile (the caller's guarantee).
            unsafe {
                let d = c.add(i * ldc + j);
                *d = if beta == T::zero() {
                    v(i, j)
                } else {
                    v(i, j) + beta * *d
                };
            }
        }
    }
}

/// One micro-kernel call for a tile of C of rows × cols (at most MR × NR): straight into C when
/// the tile is whole, else into `edge` (one whole tile) and from there the part within C.
///
/// # Safety
/// As [`Tile`]: the strips at `a` and `b` hold kc steps; C's rows × cols (rows `ldc` apart)
/// writable, and initialised when beta ≠ 0; `edge` holds MR·NR values.
#[inline(always)]
unsafe fn tile_into<T: Float>(
    kernel: Kernel<T>,
    (kc, a, b): (usize, *const T, *const T),
    (c, ldc): (*mut T, usize),
    (rows, cols): (usize, usize),
    (alpha, beta): (T, T),
    edge: &mut [T],
) {
    let Kernel { tile, mr, nr } = kernel;
    if rows == mr && cols == nr {
        // SAFETY: the caller's guarantee.
        unsafe { tile(kc, a, b, c, ldc, alpha, beta) };
        return;
    }
    // SAFETY: the strips as above, into a buffer of one whole tile.
    unsafe { tile(kc, a, b, edge.as_mut_ptr(), nr, T::one(), T::zero()) };
    // SAFETY: the tile's rows × cols within C (the caller's guarantee).
    unsafe { store_tile(c, ldc, (rows, cols), beta, |i, j| alpha * edge[i * nr + j]) };
}

/// An op(B) [k × n] packed once for many products with it — a recurrent weight used at every
/// step — in the built-in product's panel order (so those products skip packing it).
pub struct PackedB<T> {
    data: Vec<T>,
    k: usize,
    n: usize,
}

/// Packs op(B) [k × n] (`b` row-major with leading dimension `ld`, used transposed when
/// `trans`) for [`product_packed`]; `None` where this CPU has no built-in micro-kernel.
pub fn pack_b<T: Buffers>(
    (k, n): (usize, usize),
    b: &[T],
    ld: usize,
    trans: bool,
) -> candle_core::Result<Option<PackedB<T>>> {
    isa().map(|_| pack_b_with((k, n), b, ld, trans)).transpose()
}

fn pack_b_with<T: Buffers>(
    (k, n): (usize, usize),
    b: &[T],
    ld: usize,
    trans: bool,
) -> candle_core::Result<PackedB<T>> {
    let stored = if trans { (n, k) } else { (k, n) };
    if !holds(b.len(), stored, ld) {
        candle_core::bail!(
            "packed product: B of {} values does not hold {k}×{n}",
            b.len()
        );
    }
    let nr = T::kernel().nr;
    let kc_even = depth_block(k);
    let mut data = Vec::new();
    let view = View {
        p: b.as_ptr(),
        ld,
        trans,
    };
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(kc_even) {
            let kc = kc_even.min(k - pc);
            let at = data.len();
            data.resize(at + panel_len(nc, kc, nr), T::zero());
            let bt = View {
                trans: !view.trans,
                ..view.from(pc, jc)
            };
            // SAFETY: the extent check above: op(B)ᵀ rows jc .. jc + nc, columns pc .. pc + kc
            // lie within `b`.
            unsafe { pack(bt, nc, kc, nr, &mut data[at..]) };
        }
    }
    Ok(PackedB { data, k, n })
}

/// C [m × n] (rows `ldc` apart in `c`) = op(A) [m × k] · B + C when `accumulate`, else without
/// C's contents; A row-major with leading dimension `lda` (transposed when `a_trans`). On the
/// calling thread.
pub fn product_packed<T: Buffers>(
    m: usize,
    (a, lda, a_trans): (&[T], usize, bool),
    b: &PackedB<T>,
    (c, ldc): (&mut [T], usize),
    accumulate: bool,
) -> candle_core::Result<()> {
    let (k, n) = (b.k, b.n);
    let stored = if a_trans { (k, m) } else { (m, k) };
    if !holds(a.len(), stored, lda) {
        candle_core::bail!(
            "packed product: A of {} values does not hold {m}×{k}",
            a.len()
        );
    }
    if !holds(c.len(), (m, n), ldc) {
        candle_core::bail!(
            "packed product: C of {} values does not hold {m}×{n}",
            c.len()
        );
    }
    let a = View {
        p: a.as_ptr(),
        ld: lda,
        trans: a_trans,
    };
    let beta = if accumulate { T::one() } else { T::zero() };
    // SAFETY: the checks above: op(A) and C within their slices, B packed for k × n by
    // `pack_b_with` with this kernel (the same `T::kernel()`).
    unsafe {
        product(
            (m, n, k),
            T::one(),
            a,
            Panels::Packed(&b.data),
            beta,
            c.as_mut_ptr(),
            ldc,
            T::kernel(),
        )
    };
    Ok(())
}

/// The strip widths (MR, NR) of this type's micro-kernel on this CPU.
pub fn strip_widths<T: Buffers>() -> (usize, usize) {
    let k = T::kernel();
    (k.mr, k.nr)
}

/// An operand packed once for many products over parts of it (attention: a head's keys serve
/// every block of its queries). [`Strips::pack_a`] packs op(A)'s rows in strips of the micro-
/// kernel's MR rows, [`Strips::pack_b`] op(B)'s columns in strips of NR; each strip holds every
/// step (column of op(A), row of op(B)) contiguously, so a product may use any contiguous range
/// of the steps ([`strip_product`]). The buffer is reused by the next pack.
#[derive(Default)]
pub struct Strips<T> {
    data: Vec<T>,
    /// Strip width (MR or NR), steps per strip, rows (columns of op(B)) packed.
    w: usize,
    depth: usize,
    rows: usize,
}

impl<T: Buffers> Strips<T> {
    /// Packs op(X) [rows × depth] for the A side; X row-major with leading dimension `ld`,
    /// op(X) = Xᵀ when `trans`.
    pub fn pack_a(
        &mut self,
        x: &[T],
        ld: usize,
        trans: bool,
        (rows, depth): (usize, usize),
    ) -> candle_core::Result<()> {
        self.pack(x, ld, trans, (rows, depth), T::kernel().mr, None)
    }

    /// [`Strips::pack_a`] of only the steps a [`strip_product`] from row 0 over steps
    /// 0..depth with `part` reads of each strip (causal attention's triangles: about half); the
    /// other steps are left as they were, so only such products may use these strips.
    pub fn pack_a_part(
        &mut self,
        x: &[T],
        ld: usize,
        trans: bool,
        (rows, depth): (usize, usize),
        part: Part,
    ) -> candle_core::Result<()> {
        self.pack(x, ld, trans, (rows, depth), T::kernel().mr, Some(part))
    }

    /// Packs op(X) [depth × cols] for the B side (as [`Strips::pack_a`] packs its transpose).
    pub fn pack_b(
        &mut self,
        x: &[T],
        ld: usize,
        trans: bool,
        (depth, cols): (usize, usize),
    ) -> candle_core::Result<()> {
        self.pack(x, ld, !trans, (cols, depth), T::kernel().nr, None)
    }

    fn pack(
        &mut self,
        x: &[T],
        ld: usize,
        trans: bool,
        (rows, depth): (usize, usize),
        w: usize,
        part: Option<Part>,
    ) -> candle_core::Result<()> {
        let stored = if trans { (depth, rows) } else { (rows, depth) };
        if !holds(x.len(), stored, ld) {
            candle_core::bail!(
                "packed strips: {} values do not hold {rows}×{depth} (ld {ld})",
                x.len()
            );
        }
        let len = rows.div_ceil(w) * w * depth;
        if self.data.len() < len {
            self.data.resize(len, T::zero());
        }
        (self.w, self.depth, self.rows) = (w, depth, rows);
        let view = View {
            p: x.as_ptr(),
            ld,
            trans,
        };
        let Some(part) = part else {
            // SAFETY: the extent check above: (i, p) for i < rows, p < depth lie within `x`;
            // the buffer holds the whole strips.
            unsafe { pack(view, rows, depth, w, &mut self.data[..len]) };
            return Ok(());
        };
        for (s, strip) in self.data[..len].chunks_exact_mut(w * depth).enumerate() {
            let r0 = s * w;
            let steps = part.steps(0..depth, r0, w.min(rows - r0));
            if steps.is_empty() {
                continue;
            }
            // SAFETY: as above, for rows r0 .. r0 + w (or to `rows`) and the steps of this
            // strip that `part` reads; step p of the strip lies at p·w.
            unsafe {
                pack(
                    view.from(r0, steps.start),
                    w.min(rows - r0),
                    steps.len(),
                    w,
                    &mut strip[steps.start * w..steps.end * w],
                )
            };
        }
        Ok(())
    }

    /// The start of strip s at step p.
    fn at(&self, s: usize, p: usize) -> *const T {
        self.data[(s * self.depth + p) * self.w..].as_ptr()
    }
}

/// Which part of a [`strip_product`] each strip of A's rows takes, for causal attention's
/// triangular operands (counted within the product: row i is A's row a0 + i).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Part {
    /// Rows i .. i + r (a strip) take the columns before `offset + i + r` only, rounded up to
    /// whole strips of B (the others are left as they are).
    ColumnsBefore(usize),
    /// Rows i .. i + r take the steps before `offset + i + r` only.
    StepsBefore(usize),
    /// Rows i .. i + r take the steps from `offset + i` on only.
    StepsFrom(usize),
}

impl Part {
    /// The steps rows i .. i + r take of `steps`.
    fn steps(self, steps: std::ops::Range<usize>, i: usize, r: usize) -> std::ops::Range<usize> {
        match self {
            Part::ColumnsBefore(_) => steps,
            Part::StepsBefore(o) => steps.start..steps.end.min(o + i + r),
            Part::StepsFrom(o) => steps.start.max(o + i)..steps.end,
        }
    }
}

/// C[m × n] (rows `ldc` apart) = alpha · A · B + beta · C with A = op(A)[a0 .. a0 + m, steps]
/// and B = op(B)[steps, b0 .. b0 + n], from operands packed by [`Strips::pack_a`] and
/// [`Strips::pack_b`] with this type's kernel, each strip of A's rows taking the `part` of the
/// columns and steps it needs; `a0` and `b0` start strips (multiples of MR and NR). Rows and
/// columns may run on to the end of their last strip, where the operand is zero. Each strip of
/// B stays in cache while every strip of A passes it. On the calling thread.
///
/// # Safety
/// C's m rows of n values (row i at c + i·ldc) writable, and initialised when beta ≠ 0.
///
/// # Panics
/// Where the rows, columns or steps lie outside what was packed, or `a0`/`b0` do not start a
/// strip (a caller's bug).
#[allow(clippy::too_many_arguments)]
pub unsafe fn strip_product<T: Buffers>(
    (a, a0): (&Strips<T>, usize),
    (b, b0): (&Strips<T>, usize),
    (m, n): (usize, usize),
    steps: std::ops::Range<usize>,
    part: Part,
    (alpha, beta): (T, T),
    c: *mut T,
    ldc: usize,
) {
    let kernel = T::kernel();
    let Kernel { mr, nr, .. } = kernel;
    assert!(a.w == mr && b.w == nr, "strips packed for another kernel");
    assert!(
        a0.is_multiple_of(mr) && b0.is_multiple_of(nr),
        "not the start of a strip"
    );
    let padded = |x: &Strips<T>| x.rows.next_multiple_of(x.w);
    assert!(
        a0 + m <= padded(a) && b0 + n <= padded(b),
        "rows or columns outside the strips"
    );
    assert!(
        steps.end <= a.depth && steps.end <= b.depth,
        "steps outside the strips"
    );
    T::with_scratch(|s| {
        if s.edge.len() < mr * nr {
            s.edge.resize(mr * nr, T::zero());
        }
        for jr in (0..n).step_by(nr) {
            let cols = nr.min(n - jr);
            for ir in (0..m).step_by(mr) {
                let rows = mr.min(m - ir);
                let range = part.steps(steps.clone(), ir, rows);
                if let Part::ColumnsBefore(o) = part {
                    if jr >= o + ir + rows {
                        continue;
                    }
                }
                let dst = c.wrapping_add(ir * ldc + jr);
                if range.is_empty() {
                    // SAFETY: the tile's rows × cols lie within the m × n of C.
                    unsafe { store_tile(dst, ldc, (rows, cols), beta, |_, _| T::zero()) };
                    continue;
                }
                // Depth blocks of at most KC steps, each visiting C once.
                let kc_even = depth_block(range.len());
                for p0 in range.clone().step_by(kc_even) {
                    let kc = kc_even.min(range.end - p0);
                    let beta = if p0 == range.start { beta } else { T::one() };
                    let ap = a.at((a0 + ir) / mr, p0);
                    let bp = b.at((b0 + jr) / nr, p0);
                    // SAFETY: each strip holds `depth` ≥ p0 + kc steps (checked above); the
                    // tile's rows × cols lie within C (the caller's guarantee).
                    unsafe {
                        tile_into(
                            kernel,
                            (kc, ap, bp),
                            (dst, ldc),
                            (rows, cols),
                            (alpha, beta),
                            &mut s.edge,
                        )
                    };
                }
            }
        }
    })
}

/// The CBLAS gemm entry point (row-major only: lmkit passes nothing else), `sgemm`/`dgemm` as
/// `cblas_gemm::<f32>`/`::<f64>`.
///
/// # Safety
/// As `cblas_?gemm`: the operands hold what their dimensions and leading dimensions span.
#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn cblas_gemm<T: Buffers>(
    layout: i32,
    trans_a: i32,
    trans_b: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: T,
    a: *const T,
    lda: i32,
    b: *const T,
    ldb: i32,
    beta: T,
    c: *mut T,
    ldc: i32,
) {
    assert_eq!(
        layout, ROW_MAJOR,
        "the built-in gemm takes row-major operands only"
    );
    let tr = |t: i32| t == TRANS || t == CONJ_TRANS;
    let u = |v: i32| v.max(0) as usize;
    let a = View {
        p: a,
        ld: u(lda),
        trans: tr(trans_a),
    };
    let b = View {
        p: b,
        ld: u(ldb),
        trans: tr(trans_b),
    };
    // SAFETY: the caller's guarantee.
    unsafe {
        product(
            (u(m), u(n), u(k)),
            alpha,
            a,
            Panels::Pack(b),
            beta,
            c,
            u(ldc),
            T::kernel(),
        )
    }
}

/// The CBLAS gemv entry point (row-major only): y = alpha · op(A) · x + beta · y for A [m × n].
///
/// # Safety
/// As `cblas_?gemv`.
#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn cblas_gemv<T: Buffers>(
    layout: i32,
    trans: i32,
    m: i32,
    n: i32,
    alpha: T,
    a: *const T,
    lda: i32,
    x: *const T,
    incx: i32,
    beta: T,
    y: *mut T,
    incy: i32,
) {
    assert_eq!(
        layout, ROW_MAJOR,
        "the built-in gemv takes row-major operands only"
    );
    let u = |v: i32| v.max(0) as usize;
    let (m, n, lda) = (u(m), u(n), u(lda));
    let t = trans == TRANS || trans == CONJ_TRANS;
    let (incx, incy) = (u(incx).max(1), u(incy).max(1));
    // x has n (not transposed) or m (transposed) values; y the other count.
    let (nx, ny) = if t { (m, n) } else { (n, m) };
    if ny == 0 {
        return;
    }
    // x and y are used in place when their values are contiguous (decoding's case), else
    // through copies.
    let xs: std::borrow::Cow<[T]> = if incx == 1 {
        // SAFETY: x holds nx values (the CBLAS contract).
        unsafe { std::slice::from_raw_parts(x, nx) }.into()
    } else {
        // SAFETY: x holds nx values incx apart.
        (0..nx).map(|i| unsafe { *x.add(i * incx) }).collect()
    };
    let mut copy: Vec<T>;
    let ys: &mut [T] = if incy == 1 {
        if beta == T::zero() {
            // SAFETY: y holds ny writable values (maybe uninitialised: beta = 0 reads none);
            // all-zero bits are 0.0 in f32 and f64.
            unsafe { std::ptr::write_bytes(y, 0, ny) };
        }
        // SAFETY: y holds ny values, initialised (above, or by the caller when beta ≠ 0), not
        // overlapping A or x (the CBLAS contract).
        let ys = unsafe { std::slice::from_raw_parts_mut(y, ny) };
        if beta != T::zero() {
            ys.iter_mut().for_each(|v| *v = beta * *v);
        }
        ys
    } else {
        copy = (0..ny)
            // SAFETY: y holds ny values incy apart, initialised when beta ≠ 0.
            .map(|i| {
                if beta == T::zero() {
                    T::zero()
                } else {
                    beta * unsafe { *y.add(i * incy) }
                }
            })
            .collect();
        &mut copy
    };
    // SAFETY: row r < m of A holds n values (lda ≥ n by the CBLAS contract).
    let row = |r: usize| unsafe { std::slice::from_raw_parts(a.add(r * lda), n) };
    // Four rows at a time: four streams from memory in flight, and (transposed) y read and
    // written once per four rows.
    let mut r = 0;
    while r + 4 <= m {
        let rows = [row(r), row(r + 1), row(r + 2), row(r + 3)];
        if t {
            let s = [0, 1, 2, 3].map(|i| alpha * xs[r + i]);
            axpy4(s, rows, ys);
        } else {
            for (i, d) in dot4(rows, &xs).into_iter().enumerate() {
                ys[r + i] = ys[r + i] + alpha * d;
            }
        }
        r += 4;
    }
    for r in r..m {
        if t {
            axpy4(
                [alpha * xs[r], T::zero(), T::zero(), T::zero()],
                [row(r); 4],
                ys,
            );
        } else {
            ys[r] = ys[r] + alpha * dot4([row(r); 4], &xs)[0];
        }
    }
    if incy != 1 {
        for (i, &v) in ys.iter().enumerate() {
            // SAFETY: y holds ny values incy apart.
            unsafe { *y.add(i * incy) = v };
        }
    }
}

crate::simd::simd_versions! {
    /// Σ rows[i][j]·x[j] for four rows, each over 16 independent partial sums (so the loop
    /// vectorises).
    fn dot4<T: Float>(rows: [&[T]; 4], x: &[T]) -> [T; 4] {
        const L: usize = 16;
        let n = x.len();
        let (xc, xr) = x.as_chunks::<L>();
        let [(c0, r0), (c1, r1), (c2, r2), (c3, r3)] = rows.map(|r| r[..n].as_chunks::<L>());
        let (mut a0, mut a1, mut a2, mut a3) = ([T::zero(); L], [T::zero(); L], [T::zero(); L], [T::zero(); L]);
        for ((((xv, v0), v1), v2), v3) in xc.iter().zip(c0).zip(c1).zip(c2).zip(c3) {
            for l in 0..L {
                a0[l] = a0[l] + v0[l] * xv[l];
                a1[l] = a1[l] + v1[l] * xv[l];
                a2[l] = a2[l] + v2[l] * xv[l];
                a3[l] = a3[l] + v3[l] * xv[l];
            }
        }
        let sum = |acc: [T; L], rest: &[T]| {
            let s = acc.iter().fold(T::zero(), |s, &v| s + v);
            rest.iter().zip(xr).fold(s, |s, (&r, &x)| s + r * x)
        };
        [sum(a0, r0), sum(a1, r1), sum(a2, r2), sum(a3, r3)]
    }
}

crate::simd::simd_versions! {
    /// y += Σ s[i] · rows[i].
    fn axpy4<T: Float>(s: [T; 4], rows: [&[T]; 4], y: &mut [T]) {
        let n = y.len();
        let [r0, r1, r2, r3] = rows.map(|r| &r[..n]);
        for j in 0..n {
            y[j] = y[j] + s[0] * r0[j] + s[1] * r1[j] + s[2] * r2[j] + s[3] * r3[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// n seeded normal draws.
    fn randn(n: usize, seed: u64) -> Vec<f32> {
        use lmkit_core::rng::{Random, SplitMix64};
        let mut rng = SplitMix64::new(seed);
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// op(A)·op(B) in f64 by the definition.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        (m, n, k): (usize, usize, usize),
        a: &[f64],
        (lda, ta): (usize, bool),
        b: &[f64],
        (ldb, tb): (usize, bool),
    ) -> Vec<f64> {
        let at = |i: usize, p: usize| if ta { a[p * lda + i] } else { a[i * lda + p] };
        let bt = |p: usize, j: usize| if tb { b[j * ldb + p] } else { b[p * ldb + j] };
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
            }
        }
        c
    }

    /// C (rows `ldc` apart, holding its start values) = alpha · op(A) · op(B) + beta · C through
    /// [`product`] with `kern`, B packed on the fly; the operands' extents checked first.
    fn run<T: Buffers>(
        kern: Kernel<T>,
        (m, n, k): (usize, usize, usize),
        alpha: T,
        (a, lda, ta): (&[T], usize, bool),
        (b, ldb, tb): (&[T], usize, bool),
        beta: T,
        (c, ldc): (&mut [T], usize),
    ) {
        assert!(holds(a.len(), if ta { (k, m) } else { (m, k) }, lda));
        assert!(holds(b.len(), if tb { (n, k) } else { (k, n) }, ldb));
        assert!(holds(c.len(), (m, n), ldc));
        let (a, b) = (
            View {
                p: a.as_ptr(),
                ld: lda,
                trans: ta,
            },
            View {
                p: b.as_ptr(),
                ld: ldb,
                trans: tb,
            },
        );
        // SAFETY: the extents are checked above.
        unsafe {
            product(
                (m, n, k),
                alpha,
                a,
                Panels::Pack(b),
                beta,
                c.as_mut_ptr(),
                ldc,
                kern,
            )
        };
    }

    /// Every kernel this CPU runs.
    fn kernels_f32() -> &'static [Kernel<f32>] {
        &F32_KERNELS[..levels().min(F32_KERNELS.len())]
    }

    fn kernels_f64() -> &'static [Kernel<f64>] {
        &F64_KERNELS[..levels().min(F64_KERNELS.len())]
    }

    /// Shapes around every blocking size (MR, NR, MC, KC, NC edges), both transposes, padded
    /// leading dimensions (3 past the columns), alpha and beta.
    fn cases() -> Vec<((usize, usize, usize), bool, bool)> {
        let mut v = Vec::new();
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 5, 7),
            (12, 32, 16),
            (13, 33, 17),
            (25, 70, 300),
            (200, 40, 257),
            (7, 4100, 9),
            (50, 50, 600),
        ] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                v.push(((m, n, k), ta, tb));
            }
        }
        v
    }

    /// The AVX2 transposing pack gives each strip the gathered values, for every depth
    /// remainder and both strip widths it serves (run wherever the CPU has AVX2, whatever
    /// kernel the product picks there).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_transposing_pack_equals_the_gather() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        for w in [6, 16] {
            for depth in [0, 1, 7, 8, 9, 16, 23, 64, 101] {
                let ld = depth + 5;
                let base = randn(w * ld, (w * 1000 + depth) as u64);
                let mut strip = vec![f32::NAN; w * depth + 3];
                // SAFETY: AVX2 is present; rows i < w of `depth` steps lie within `base`
                // (ld ≥ depth); the strip holds w·depth values.
                unsafe { x86::pack_rows_f32_avx2(base.as_ptr(), ld, depth, w, strip.as_mut_ptr()) };
                for p in 0..depth {
                    for i in 0..w {
                        assert_eq!(
                            strip[p * w + i],
                            base[i * ld + p],
                            "w {w} depth {depth}: ({i}, {p})"
                        );
                    }
                }
                assert!(
                    strip[w * depth..].iter().all(|v| v.is_nan()),
                    "wrote past the strip"
                );
            }
        }
    }

    #[test]
    fn products_equal_the_definition() {
        let mut seed = 1;
        for ((m, n, k), ta, tb) in cases() {
            let pad = 3;
            let (ar, ac) = if ta { (k, m) } else { (m, k) };
            let (br, bc) = if tb { (n, k) } else { (k, n) };
            let (lda, ldb, ldc) = (ac + pad, bc + pad, n + pad);
            seed += 1;
            let a = randn(ar * lda, seed);
            let b = randn(br * ldb, seed + 100);
            let c0 = randn(m * ldc, seed + 200);
            let a64: Vec<f64> = a.iter().map(|&v| v as f64).collect();
            let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
            let want = reference((m, n, k), &a64, (lda, ta), &b64, (ldb, tb));
            for (alpha, beta) in [(1.0, 0.0), (0.5, 1.0), (-2.0, 0.25)] {
                let expect =
                    |i: usize, j: usize| alpha * want[i * n + j] + beta * c0[i * ldc + j] as f64;
                for &kern in kernels_f32() {
                    let mut c = c0.clone();
                    run(
                        kern,
                        (m, n, k),
                        alpha as f32,
                        (&a, lda, ta),
                        (&b, ldb, tb),
                        beta as f32,
                        (&mut c, ldc),
                    );
                    for i in 0..m {
                        for j in 0..ldc {
                            let got = c[i * ldc + j] as f64;
                            if j >= n {
                                assert_eq!(got, c0[i * ldc + j] as f64, "padding written");
                                continue;
                            }
                            let tol = 1e-4 * (1.0 + (k as f64).sqrt()) * (1.0 + alpha.abs());
                            assert!(
                                (got - expect(i, j)).abs() < tol,
                                "f32 {m}x{n}x{k} ta={ta} tb={tb} mr={}: ({i},{j}) {got} vs {}",
                                kern.mr,
                                expect(i, j)
                            );
                        }
                    }
                }
                for &kern in kernels_f64() {
                    let mut c: Vec<f64> = c0.iter().map(|&v| v as f64).collect();
                    run(
                        kern,
                        (m, n, k),
                        alpha,
                        (&a64, lda, ta),
                        (&b64, ldb, tb),
                        beta,
                        (&mut c, ldc),
                    );
                    for i in 0..m {
                        for j in 0..n {
                            let got = c[i * ldc + j];
                            assert!(
                                (got - expect(i, j)).abs() < 1e-10 * (1.0 + k as f64),
                                "f64 {m}x{n}x{k} ta={ta} tb={tb} mr={}: ({i},{j})",
                                kern.mr
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_prepacked_operand_gives_the_same_products() {
        for &((m, n, k), ta, tb) in &[
            ((9, 70, 33), false, true),
            ((3, 4100, 20), true, false),
            ((30, 40, 800), false, false),
        ] {
            let (lda, ldb) = (if ta { m } else { k } + 2, if tb { k } else { n } + 1);
            let a = randn(if ta { k } else { m } * lda, 3);
            let b = randn(if tb { n } else { k } * ldb, 4);
            let c0 = randn(m * (n + 5), 5);
            let Some(packed) = pack_b((k, n), &b, ldb, tb).unwrap() else {
                return;
            };
            for accumulate in [false, true] {
                let mut want = c0.clone();
                let beta = if accumulate { 1.0 } else { 0.0 };
                let k32 = f32::kernel();
                run(
                    k32,
                    (m, n, k),
                    1.0,
                    (&a, lda, ta),
                    (&b, ldb, tb),
                    beta,
                    (&mut want, n + 5),
                );
                let mut got = c0.clone();
                product_packed(m, (&a, lda, ta), &packed, (&mut got, n + 5), accumulate).unwrap();
                assert_eq!(
                    got, want,
                    "{m}x{n}x{k} ta={ta} tb={tb} accumulate={accumulate}"
                );
            }
            // Operands that do not hold the shapes are refused, not read past.
            assert!(product_packed(
                m,
                (&a[..a.len() - 3], lda, ta),
                &packed,
                (&mut c0.clone(), n + 5),
                false
            )
            .is_err());
            assert!(pack_b((k, n), &b[..b.len() - ldb], ldb, tb).is_err());
        }
    }

    #[test]
    fn strips_packed_on_one_side_of_the_diagonal_give_the_same_products() {
        if isa().is_none() {
            return;
        }
        // A square operand (rows = steps, as attention's [t, t] ones), stored plain or
        // transposed; the strips first hold NaN, so a step the partial pack skipped and the
        // product read would show.
        for (t, hd, trans) in [(13, 5, false), (13, 5, true), (40, 16, true), (7, 3, false)] {
            let a = randn(t * (t + 3), 11);
            let b = randn(t * hd, 12);
            let (mut bs, mut whole, mut part) =
                (Strips::default(), Strips::default(), Strips::default());
            bs.pack_b(&b, hd, false, (t, hd)).unwrap();
            for p in [Part::StepsFrom(0), Part::StepsBefore(0)] {
                whole.pack_a(&a, t + 3, trans, (t, t)).unwrap();
                part.pack_a(&vec![f32::NAN; t * (t + 3)], t + 3, trans, (t, t))
                    .unwrap();
                part.pack_a_part(&a, t + 3, trans, (t, t), p).unwrap();
                let (mut want, mut got) = (vec![0f32; t * hd], vec![0f32; t * hd]);
                // SAFETY: C holds t rows of hd.
                unsafe {
                    strip_product(
                        (&whole, 0),
                        (&bs, 0),
                        (t, hd),
                        0..t,
                        p,
                        (1.0, 0.0),
                        want.as_mut_ptr(),
                        hd,
                    );
                    strip_product(
                        (&part, 0),
                        (&bs, 0),
                        (t, hd),
                        0..t,
                        p,
                        (1.0, 0.0),
                        got.as_mut_ptr(),
                        hd,
                    );
                }
                assert_eq!(got, want, "t={t} hd={hd} trans={trans} {p:?}");
            }
        }
    }

    #[test]
    fn cblas_entry_points_follow_the_convention() {
        // gemm with k = 0 and beta = 0 writes zeros over garbage; beta scales.
        let mut c = vec![f32::NAN; 6];
        // SAFETY: no operand element is read (k = 0); C holds 2×3.
        unsafe {
            cblas_gemm::<f32>(
                101,
                111,
                111,
                2,
                3,
                0,
                1.0,
                [].as_ptr(),
                1,
                [].as_ptr(),
                3,
                0.0,
                c.as_mut_ptr(),
                3,
            )
        };
        assert!(c.iter().all(|&v| v == 0.0));
        // gemv both ways, with strided x and y (used through copies) and with contiguous ones
        // (used in place; beta = 0 over garbage), against the definition.
        let (m, n) = (37, 53);
        let a = randn(m * n, 7);
        let x = randn(2 * m.max(n), 8);
        for trans in [111, 112] {
            for (incx, incy, beta) in [(2, 3, 2.0), (1, 1, 2.0), (1, 1, 0.0)] {
                let (nx, ny) = if trans == 112 { (m, n) } else { (n, m) };
                let y0 = randn(3 * ny, 9);
                let mut y = y0.clone();
                if beta == 0.0 {
                    y[..ny].fill(f32::NAN);
                }
                // SAFETY: A is m×n (lda n), x holds nx values incx apart, y ny values incy apart.
                unsafe {
                    cblas_gemv::<f32>(
                        101,
                        trans,
                        m as i32,
                        n as i32,
                        0.5,
                        a.as_ptr(),
                        n as i32,
                        x.as_ptr(),
                        incx as i32,
                        beta,
                        y.as_mut_ptr(),
                        incy as i32,
                    )
                };
                for i in 0..ny {
                    let dot: f64 = (0..nx)
                        .map(|j| {
                            let av = if trans == 112 {
                                a[j * n + i]
                            } else {
                                a[i * n + j]
                            };
                            av as f64 * x[incx * j] as f64
                        })
                        .sum();
                    let want = 0.5 * dot + beta as f64 * y0[incy * i] as f64;
                    assert!(
                        (y[incy * i] as f64 - want).abs() < 1e-4,
                        "trans {trans} incx {incx} incy {incy} beta {beta} row {i}"
                    );
                    if incy > 1 {
                        assert_eq!(y[incy * i + 1], y0[incy * i + 1], "y's gaps are left alone");
                    }
                }
                assert_eq!(y[ny * incy..], y0[ny * incy..], "past y is left alone");
            }
        }
    }
}
