//! Fused CPU kernels with analytic backward passes, for ops whose candle backward is a long chain
//! of elementwise tensor ops (measured by `examples/op_bench.rs`: GELU's backward took 10x its
//! forward, softmax's 7x). Each kernel runs over rows in parallel, in f32 or f64 (bf16/f16
//! inference on the CPU through [`crate::half_ops`]); other devices and dtypes fall back to
//! composed ops. lmkit-models/tests/gradients.rs checks them against finite differences.

use crate::simd::simd_versions;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use num_traits::Float;
use rayon::prelude::*;

fn slice<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("fused kernel: the input must be contiguous"),
    }
}

fn fused_ok(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Whether candle-nn's fused forward-only kernels may take x and these parameters: on a GPU,
/// where nothing asks for their gradients (inference) — one launch instead of the several the
/// composed ops take. Those kernels have no backward pass, so a tensor that tracks gradients
/// takes the composed ops instead.
fn gpu_inference(x: &Tensor, params: &[&Tensor]) -> bool {
    let fits =
        |t: &Tensor| !t.track_op() && t.dtype() == x.dtype() && t.device().same_device(x.device());
    !x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && fits(x)
        && params.iter().all(|p| fits(p))
}

/// Applies `f` to one tensor's data (f32 or f64), producing a tensor of the same shape.
macro_rules! unary_kernel {
    ($s:expr, $l:expr, $f:expr) => {{
        let out = match $s {
            CpuStorage::F32(v) => CpuStorage::F32($f(slice(v, $l)?)),
            CpuStorage::F64(v) => CpuStorage::F64($f(slice(v, $l)?)),
            _ => candle_core::bail!("fused kernel: f32 or f64 only"),
        };
        Ok((out, $l.shape().clone()))
    }};
}

/// Applies `f` to two same-shaped tensors' data.
macro_rules! binary_kernel {
    ($s1:expr, $l1:expr, $s2:expr, $l2:expr, $f:expr) => {{
        let out = match ($s1, $s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32($f(slice(a, $l1)?, slice(b, $l2)?))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                CpuStorage::F64($f(slice(a, $l1)?, slice(b, $l2)?))
            }
            _ => candle_core::bail!("fused kernel: f32 or f64 only"),
        };
        Ok((out, $l1.shape().clone()))
    }};
}

/// Applies `f` to three tensors' data (all f32 or all f64), giving the output storage.
macro_rules! ternary_kernel {
    ($s1:expr, $l1:expr, $s2:expr, $l2:expr, $s3:expr, $l3:expr, $f:expr) => {
        match ($s1, $s2, $s3) {
            (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) => {
                CpuStorage::F32($f(slice(a, $l1)?, slice(b, $l2)?, slice(c, $l3)?))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(c)) => {
                CpuStorage::F64($f(slice(a, $l1)?, slice(b, $l2)?, slice(c, $l3)?))
            }
            _ => candle_core::bail!("fused kernel: f32 or f64 only"),
        }
    };
}

// ---------------------------------------------------------------- softmax over the last dim

/// softmax(scale·x) over the last dim; with `causal = Some(offset)`, row i of each [t, d] matrix
/// sees columns 0..=offset + i only (the rest are 0), as causal attention's mask gives — without
/// building or adding the mask, and without exponentiating the masked half.
struct Softmax {
    scale: f64,
    causal: Option<usize>,
}
struct SoftmaxBwd {
    scale: f64,
}

simd_versions! {
    /// In place: row[..seen] ← softmax(scale·row[..seen]) (scale > 0), row[seen..] ← 0.
    pub fn softmax_row<T: FastMath>(row: &mut [T], seen: usize, scale: T) {
        let (seen, masked) = row.split_at_mut(seen);
        let m = max_of(seen) * scale;
        let inv = T::one() / exp_sum(seen, scale, m);
        seen.iter_mut().for_each(|v| *v = *v * inv);
        masked.iter_mut().for_each(|v| *v = T::zero());
    }
}

simd_versions! {
    /// In place on Sᵀ [nk, nq] (row k holds key k's scores for every query): each column i ←
    /// softmax(scale·column) over the keys query i sees — all of them, or with `causal` keys
    /// 0..=i (the others ← 0). Vectorised across queries: every step is an elementwise pass over
    /// one key's row. `stats` holds 2·nq scratch values.
    pub fn softmax_columns<T: FastMath>(
        p: &mut [T],
        nk: usize,
        nq: usize,
        causal: bool,
        scale: T,
        stats: &mut [T],
    ) {
        let (m, sum) = stats[..2 * nq].split_at_mut(nq);
        m.iter_mut().for_each(|v| *v = T::neg_infinity());
        sum.iter_mut().for_each(|v| *v = T::zero());
        // Queries 0..from(k) do not see key k.
        let from = |k: usize| if causal { k.min(nq) } else { 0 };
        for (k, row) in p[..nk * nq].chunks_exact(nq).enumerate() {
            let f = from(k);
            for (mi, &v) in m[f..].iter_mut().zip(&row[f..]) {
                *mi = if v > *mi { v } else { *mi };
            }
        }
        m.iter_mut().for_each(|v| *v = *v * scale);
        for (k, row) in p[..nk * nq].chunks_exact_mut(nq).enumerate() {
            let f = from(k);
            let (hidden, seen) = row.split_at_mut(f);
            hidden.iter_mut().for_each(|v| *v = T::zero());
            for ((v, &mi), si) in seen.iter_mut().zip(&m[f..]).zip(&mut sum[f..]) {
                *v = (*v * scale - mi).exp_fast();
                *si = *si + *v;
            }
        }
        sum.iter_mut().for_each(|v| *v = T::one() / *v);
        for (k, row) in p[..nk * nq].chunks_exact_mut(nq).enumerate() {
            let f = from(k);
            for (v, &inv) in row[f..].iter_mut().zip(&sum[f..]) {
                *v = *v * inv;
            }
        }
    }
}

simd_versions! {
    /// In place: g ← scale·y ⊙ (g − Σ_j g_j y_j), the softmax backward of one row.
    pub fn softmax_bwd_row<T: FastMath>(y: &[T], g: &mut [T], scale: T) {
        let dot = dot_of(y, g);
        for (gi, &yi) in g.iter_mut().zip(y) {
            *gi = scale * yi * (*gi - dot);
        }
    }
}

/// Independent partial results the reductions below keep, so that they vectorise (a single
/// running float sum cannot be reordered into vector lanes).
const LANES: usize = 16;

/// Σ f(x_i, y_i, z_i) over equal-length slices through LANES partial sums, in a fixed order.
/// (Slices rather than indices: bounds checks in the loop would stop it vectorising.)
#[inline(always)]
fn lane_sum3<T: Float>(x: &[T], y: &[T], z: &[T], f: impl Fn(T, T, T) -> T) -> T {
    let n = x.len().min(y.len()).min(z.len());
    let (x, y, z) = (&x[..n], &y[..n], &z[..n]);
    let mut acc = [T::zero(); LANES];
    let full = n / LANES * LANES;
    for ((xc, yc), zc) in x[..full]
        .chunks_exact(LANES)
        .zip(y[..full].chunks_exact(LANES))
        .zip(z[..full].chunks_exact(LANES))
    {
        for (((a, &xi), &yi), &zi) in acc.iter_mut().zip(xc).zip(yc).zip(zc) {
            *a = *a + f(xi, yi, zi);
        }
    }
    let mut s = T::zero();
    for ((&xi, &yi), &zi) in x[full..].iter().zip(&y[full..]).zip(&z[full..]) {
        s = s + f(xi, yi, zi);
    }
    for a in acc {
        s = s + a;
    }
    s
}

/// Σ f(x_i) (see [`lane_sum3`]).
#[inline(always)]
fn lane_sum<T: Float>(x: &[T], f: impl Fn(T) -> T) -> T {
    lane_sum3(x, x, x, |v, _, _| f(v))
}

#[inline(always)]
fn sum_of<T: Float>(x: &[T]) -> T {
    lane_sum(x, |v| v)
}

/// x ← exp(scale·x − m) in place, returning Σ x in [`sum_of`]'s order (the same value a second
/// pass would give), in one pass over the row.
#[inline(always)]
fn exp_sum<T: FastMath>(x: &mut [T], scale: T, m: T) -> T {
    let mut acc = [T::zero(); LANES];
    let full = x.len() / LANES * LANES;
    let (body, tail) = x.split_at_mut(full);
    for chunk in body.chunks_exact_mut(LANES) {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *v = (*v * scale - m).exp_fast();
            *a = *a + *v;
        }
    }
    // The tail through one padded vector too: exp_fast's scalar form costs several times a
    // lane's (a causal attention row's tail is half a vector on average).
    let mut pad = [T::zero(); LANES];
    pad[..tail.len()].copy_from_slice(tail);
    for v in &mut pad {
        *v = (*v * scale - m).exp_fast();
    }
    let mut s = T::zero();
    for (v, &e) in tail.iter_mut().zip(&pad) {
        *v = e;
        s = s + e;
    }
    for a in acc {
        s = s + a;
    }
    s
}

#[inline(always)]
fn dot_of<T: Float>(x: &[T], y: &[T]) -> T {
    lane_sum3(x, y, y, |a, b, _| a * b)
}

#[inline(always)]
fn max_of<T: Float>(x: &[T]) -> T {
    let mut acc = [T::neg_infinity(); LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let m = chunks
        .remainder()
        .iter()
        .fold(T::neg_infinity(), |a, &v| a.max(v));
    acc.iter().fold(m, |a, &v| a.max(v))
}

fn softmax_rows<T: FastMath>(
    x: &[T],
    t: usize,
    d: usize,
    scale: f64,
    causal: Option<usize>,
) -> Vec<T> {
    let scale = c::<T>(scale);
    let mut out = x.to_vec();
    out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
        let seen = causal.map_or(d, |off| (off + row % t + 1).min(d));
        softmax_row(o, seen, scale);
    });
    out
}

/// dx = scale·y ⊙ (dy − Σ_j dy_j y_j), row by row (0 where y is masked to 0).
fn softmax_bwd_rows<T: FastMath>(y: &[T], dy: &[T], d: usize, scale: f64) -> Vec<T> {
    let scale = c::<T>(scale);
    let mut out = dy.to_vec();
    out.par_chunks_mut(d)
        .zip(y.par_chunks(d))
        .for_each(|(g, yr)| softmax_bwd_row(yr, g, scale));
    out
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "lmkit-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let d = *dims.last().unwrap_or(&1);
        let t = if dims.len() >= 2 {
            dims[dims.len() - 2]
        } else {
            1
        };
        unary_kernel!(s, l, |x| softmax_rows(x, t, d, self.scale, self.causal))
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.contiguous()?.apply_op2_no_bwd(
            &dy.contiguous()?,
            &SoftmaxBwd { scale: self.scale },
        )?))
    }
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "lmkit-softmax-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = *l1.dims().last().unwrap_or(&1);
        binary_kernel!(s1, l1, s2, l2, |y, g| softmax_bwd_rows(y, g, d, self.scale))
    }
}

/// Softmax over the last dimension: the fused kernel on the CPU in f32/f64, candle-nn's on a GPU
/// where nothing tracks gradients, composed ops elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if fused_ok(x) {
        let op = Softmax {
            scale: 1.0,
            causal: None,
        };
        return x.contiguous()?.apply_op1(op);
    }
    if gpu_inference(x, &[]) {
        return candle_nn::ops::softmax_last_dim(&x.contiguous()?);
    }
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Causal attention weights from scores x [.., t, s]: softmax(scale·x) where query i (absolute
/// position s − t + i) sees keys 0..=s − t + i. The fused kernel on the CPU in f32/f64, `None`
/// elsewhere (the caller builds the mask).
pub fn causal_softmax(x: &Tensor, scale: f64) -> candle_core::Result<Option<Tensor>> {
    let (t, s) = (x.dim(D::Minus2)?, x.dim(D::Minus1)?);
    if !fused_ok(x) || s < t {
        return Ok(None);
    }
    let op = Softmax {
        scale,
        causal: Some(s - t),
    };
    x.contiguous()?.apply_op1(op).map(Some)
}

// ---------------------------------------------------------------- GELU, tanh approximation

struct Gelu;
struct GeluBwd;

fn c<T: Float>(v: f64) -> T {
    T::from(v).unwrap_or_else(T::zero)
}

/// tanh for the GELU kernels: f64 uses the exact libm function (gradient checks run in f64);
/// f32 uses a rational approximation (the one Eigen uses for floats: odd degree-13 numerator,
/// even degree-6 denominator, clamped at ±7.9053) whose loop the compiler vectorises — libm's
/// scalar `tanhf` was a tenth of a training step. Max error vs exact tanh: see the test, < 1e-6.
pub trait FastMath: Float + Send + Sync {
    fn tanh_fast(self) -> Self;
    fn exp_fast(self) -> Self;
    fn erf_fast(self) -> Self;
}

impl FastMath for f64 {
    fn tanh_fast(self) -> f64 {
        self.tanh()
    }
    fn exp_fast(self) -> f64 {
        self.exp()
    }
    fn erf_fast(self) -> f64 {
        candle_core::cpu::erf::erf_f64(self)
    }
}

impl FastMath for f32 {
    #[inline(always)]
    fn tanh_fast(self) -> f32 {
        const A: [f32; 7] = [
            4.893_524_6e-3,
            6.372_619_3e-4,
            1.485_722_4e-5,
            5.122_297e-8,
            -8.604_672e-11,
            2.000_188e-13,
            -2.760_768_5e-16,
        ];
        const B: [f32; 4] = [4.893_525e-3, 2.268_434_6e-3, 1.185_347_1e-4, 1.198_258_4e-6];
        let x = self.clamp(-7.905_311, 7.905_311);
        let x2 = x * x;
        let mut p = A[6];
        for &a in A[..6].iter().rev() {
            p = p * x2 + a; // not mul_add: without FMA in the target that is a libm call
        }
        let q = ((B[3] * x2 + B[2]) * x2 + B[1]) * x2 + B[0];
        x * p / q
    }

    /// eˣ as Cephes' `expf` computes it (x = n·ln2 + r, |r| ≤ ½ln2, degree-7 polynomial in r,
    /// 2ⁿ built from its bits), branch-free so that loops over it vectorise (libm's `expf` is a
    /// scalar call). Max relative error vs f64 exp: see the test, < 3e-7.
    #[inline(always)]
    fn exp_fast(self) -> f32 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
        let x = self.clamp(-87.336_55, 88.376_26);
        let t = x * LOG2E + ROUND;
        let n = t - ROUND;
        let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
        let r = x - n * LN2_HI - n * LN2_LO;
        let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
            * r
            + 0.166_666_65)
            * r
            + 0.5;
        let y = p * r * r + r + 1.0;
        let scaled = y * f32::from_bits(((ni + 127) as u32) << 23);
        if self < -87.336_55 {
            0.0
        } else {
            scaled
        }
    }

    /// erf x as a rational function x·P(x²)/Q(x²) on [−4, 4] (±1 beyond, to f32 precision):
    /// the approximation of Eigen's `generic_fast_erf_float` (|error| < 5e-7, see the test),
    /// branch-free so that loops over it vectorise.
    #[inline(always)]
    fn erf_fast(self) -> f32 {
        const A: [f32; 7] = [
            -2.726_142_3e-10,
            2.770_681_4e-8,
            -2.101_024e-6,
            -5.692_506_4e-5,
            -7.349_906_3e-4,
            -2.954_600_1e-3,
            -1.609_603_3e-2,
        ];
        const B: [f32; 5] = [
            -1.456_607_2e-5,
            -2.133_740_6e-4,
            -1.682_827e-3,
            -7.373_329_4e-3,
            -1.426_474e-2,
        ];
        let x = self.clamp(-4.0, 4.0);
        let x2 = x * x;
        let mut p = A[0];
        for &a in &A[1..] {
            p = p * x2 + a;
        }
        let mut q = B[0];
        for &b in &B[1..] {
            q = q * x2 + b;
        }
        x * p / q
    }
}

/// Elements per parallel task of the elementwise kernels.
const BLOCK: usize = 1 << 14;

/// A new vector holding `f(x chunk, out chunk)` for each chunk of `chunk` values of `x`,
/// chunks on the thread pool (the output's chunk zeroed first).
fn map_blocks<T: Float + Send + Sync>(
    x: &[T],
    chunk: usize,
    f: impl Fn(&[T], &mut [T]) + Sync,
) -> Vec<T> {
    crate::buffers::par_filled(x.len(), chunk, |i, o| f(&x[i * chunk..][..o.len()], o))
}

/// [`map_blocks`] over two inputs of the same length.
fn map_blocks2<T: Float + Send + Sync>(
    x: &[T],
    y: &[T],
    f: impl Fn(&[T], &[T], &mut [T]) + Sync,
) -> Vec<T> {
    let n = x.len().min(y.len());
    crate::buffers::par_filled(n, BLOCK, |i, o| {
        let at = i * BLOCK..i * BLOCK + o.len();
        f(&x[at.clone()], &y[at], o)
    })
}

/// √(2/π), 0.044715: the constants of the tanh GELU.
fn gelu_consts<T: Float>() -> (T, T) {
    (
        c::<T>((2.0 / std::f64::consts::PI).sqrt()),
        c::<T>(0.044715),
    )
}

simd_versions! {
    /// One block of the GELU forward: o = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³).
    pub(crate) fn gelu_block<T: FastMath>(x: &[T], o: &mut [T]) {
        let (k, a) = gelu_consts::<T>();
        let half = c::<T>(0.5);
        for (o, &v) in o.iter_mut().zip(x) {
            *o = half * v * (T::one() + (k * (v + a * v * v * v)).tanh_fast());
        }
    }
}

simd_versions! {
    /// One block of the GELU backward: o = g · [½(1 + tanh u) + ½x(1 − tanh²u)·√(2/π)(1 + 3·0.044715x²)].
    fn gelu_bwd_block<T: FastMath>(x: &[T], g: &[T], o: &mut [T]) {
        let (k, a) = gelu_consts::<T>();
        let (half, three) = (c::<T>(0.5), c::<T>(3.0));
        for ((o, &v), &gi) in o.iter_mut().zip(x).zip(g) {
            let t = (k * (v + a * v * v * v)).tanh_fast();
            let d = half * (T::one() + t)
                + half * v * (T::one() - t * t) * k * (T::one() + three * a * v * v);
            *o = gi * d;
        }
    }
}

/// y = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³) — transformers' `gelu_new` (Hendrycks & Gimpel 2016).
pub fn gelu<T: FastMath + Default>(x: &[T]) -> Vec<T> {
    map_blocks(x, BLOCK, gelu_block)
}

/// dy/dx · g for the tanh GELU.
pub fn gelu_bwd<T: FastMath + Default>(x: &[T], g: &[T]) -> Vec<T> {
    map_blocks2(x, g, gelu_bwd_block)
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "lmkit-gelu-tanh"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        unary_kernel!(s, l, gelu)
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            x.contiguous()?
                .apply_op2_no_bwd(&dy.contiguous()?, &GeluBwd)?,
        ))
    }
}

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "lmkit-gelu-tanh-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        binary_kernel!(s1, l1, s2, l2, gelu_bwd)
    }
}

/// GELU with the tanh approximation (the fused kernel in f32/f64 on the CPU, and for inference in
/// a half type there through [`crate::half_ops`]).
pub fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    if fused_ok(x) {
        return x.contiguous()?.apply_op1(Gelu);
    }
    if let Some(y) = crate::half_ops::gelu_tanh(x)? {
        return Ok(y);
    }
    x.gelu()
}

// ---------------------------------------------------------------- exact GELU

/// The exact GELU, x·Φ(x) = ½x(1 + erf(x/√2)) (BERT's `gelu`): candle computes it with a scalar
/// libm erf per value. Backward: Φ(x) + x·φ(x).
struct GeluErf;
struct GeluErfBwd;

simd_versions! {
    /// One block of the forward: o = ½x(1 + erf(x/√2)).
    pub(crate) fn gelu_erf_block<T: FastMath>(x: &[T], o: &mut [T]) {
        let (half, r2) = (c::<T>(0.5), c::<T>(std::f64::consts::FRAC_1_SQRT_2));
        for (o, &v) in o.iter_mut().zip(x) {
            *o = half * v * (T::one() + (v * r2).erf_fast());
        }
    }
}

simd_versions! {
    /// One block of the backward: o = g·(½(1 + erf(x/√2)) + x·e^(−x²/2)/√(2π)).
    fn gelu_erf_bwd_block<T: FastMath>(x: &[T], g: &[T], o: &mut [T]) {
        let (half, r2) = (c::<T>(0.5), c::<T>(std::f64::consts::FRAC_1_SQRT_2));
        let inv = c::<T>(1.0 / (2.0 * std::f64::consts::PI).sqrt());
        for ((o, &v), &gi) in o.iter_mut().zip(x).zip(g) {
            let d = half * (T::one() + (v * r2).erf_fast()) + v * inv * (-half * v * v).exp_fast();
            *o = gi * d;
        }
    }
}

simd_versions! {
    /// One block of the forward in place: x ← ½x(1 + erf(x/√2)).
    fn gelu_erf_in_place_block<T: FastMath>(x: &mut [T]) {
        let (half, r2) = (c::<T>(0.5), c::<T>(std::f64::consts::FRAC_1_SQRT_2));
        for v in x.iter_mut() {
            *v = half * *v * (T::one() + (*v * r2).erf_fast());
        }
    }
}

/// y = x·Φ(x).
pub fn gelu_erf_fwd<T: FastMath + Default>(x: &[T]) -> Vec<T> {
    map_blocks(x, BLOCK, gelu_erf_block)
}

/// dy/dx · g for the exact GELU.
pub fn gelu_erf_bwd<T: FastMath + Default>(x: &[T], g: &[T]) -> Vec<T> {
    map_blocks2(x, g, gelu_erf_bwd_block)
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "lmkit-gelu-erf"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        unary_kernel!(s, l, gelu_erf_fwd)
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            x.contiguous()?
                .apply_op2_no_bwd(&dy.contiguous()?, &GeluErfBwd)?,
        ))
    }
}

impl CustomOp2 for GeluErfBwd {
    fn name(&self) -> &'static str {
        "lmkit-gelu-erf-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        binary_kernel!(s1, l1, s2, l2, gelu_erf_bwd)
    }
}

/// The exact (erf) GELU (the fused kernel in f32/f64 on the CPU, and for inference in a half type
/// there through [`crate::half_ops`]).
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    if fused_ok(x) {
        return x.contiguous()?.apply_op1(GeluErf);
    }
    if let Some(y) = crate::half_ops::gelu_erf(x)? {
        return Ok(y);
    }
    x.gelu_erf()
}

/// The exact GELU written over `x` itself, for inference: no output buffer to allocate and fill.
/// Only for a tensor nothing else holds (a layer's fresh output) and no gradient passes through
/// (`x` not tracked). Returns false, leaving `x` as it is, where it does not apply (another
/// device or dtype, a non-contiguous or tracked tensor).
pub fn gelu_erf_in_place(x: &Tensor) -> candle_core::Result<bool> {
    if !fused_ok(x) || x.track_op() || !x.is_contiguous() {
        return Ok(false);
    }
    x.inplace_op1(&GeluErfInPlace)?;
    Ok(true)
}

struct GeluErfInPlace;

impl candle_core::InplaceOp1 for GeluErfInPlace {
    fn name(&self) -> &'static str {
        "lmkit-gelu-erf-in-place"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("gelu in place: the tensor must be contiguous")
        };
        match s {
            CpuStorage::F32(v) => v[a..b]
                .par_chunks_mut(BLOCK)
                .for_each(gelu_erf_in_place_block),
            CpuStorage::F64(v) => v[a..b]
                .par_chunks_mut(BLOCK)
                .for_each(gelu_erf_in_place_block),
            _ => candle_core::bail!("gelu in place: f32 or f64 only"),
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- SwiGLU

/// silu(g)·u, the gated MLP of Llama-style models (Shazeer 2020), in one pass: candle computes
/// silu with a libm exp per value, then multiplies in a second pass. Backward: du = dy·silu(g)
/// (this op again, on g and dy), dg = dy·u·σ(g)(1 + g(1 − σ(g))).
struct SwiGlu;
struct SwiGluGateGrad;

simd_versions! {
    /// One block of the forward: o = g·σ(g)·u.
    pub(crate) fn swiglu_block<T: FastMath>(g: &[T], u: &[T], o: &mut [T]) {
        for ((o, &gi), &ui) in o.iter_mut().zip(g).zip(u) {
            let s = T::one() / (T::one() + (-gi).exp_fast());
            *o = gi * s * ui;
        }
    }
}

/// The gradients of silu(g)·u by g and by u given the output's gradient dy:
/// (dy·u·σ(g)(1 + g(1 − σ(g))), dy·silu(g)).
#[inline(always)]
fn swiglu_grads<T: FastMath>(g: T, u: T, dy: T) -> (T, T) {
    let s = T::one() / (T::one() + (-g).exp_fast());
    (dy * u * s * (T::one() + g * (T::one() - s)), g * s * dy)
}

simd_versions! {
    /// One block of the gate's gradient.
    fn swiglu_gate_grad_block<T: FastMath>(g: &[T], u: &[T], dy: &[T], o: &mut [T]) {
        for (((o, &gi), &ui), &di) in o.iter_mut().zip(g).zip(u).zip(dy) {
            *o = swiglu_grads(gi, ui, di).0;
        }
    }
}

simd_versions! {
    /// One block of both gradients, written over the inputs: g ← the gate's, u ← the up
    /// projection's.
    fn swiglu_bwd_block<T: FastMath>(g: &mut [T], u: &mut [T], dy: &[T]) {
        for ((gi, ui), &di) in g.iter_mut().zip(u.iter_mut()).zip(dy) {
            (*gi, *ui) = swiglu_grads(*gi, *ui, di);
        }
    }
}

/// The gradients of silu(g)·u by g and by u, given the output's gradient `dy`, in one pass
/// written over `g` and `u` (a backward pass that no longer needs them): the same values as
/// [`swiglu_gate_grad_rows`] and `swiglu_rows(g, dy)`.
pub fn swiglu_bwd_in_place<T: FastMath>(g: &mut [T], u: &mut [T], dy: &[T]) {
    assert!(
        g.len() == u.len() && u.len() == dy.len(),
        "swiglu backward: {} gate, {} up and {} gradient values",
        g.len(),
        u.len(),
        dy.len()
    );
    g.par_chunks_mut(BLOCK)
        .zip(u.par_chunks_mut(BLOCK).zip(dy.par_chunks(BLOCK)))
        .for_each(|(g, (u, dy))| swiglu_bwd_block(g, u, dy));
}

/// silu(g)·u, element by element.
pub fn swiglu_rows<T: FastMath + Default>(g: &[T], u: &[T]) -> Vec<T> {
    map_blocks2(g, u, swiglu_block)
}

/// The gradient of silu(g)·u by g, given the output's gradient `dy` (by u it is
/// `swiglu_rows(g, dy)`).
pub fn swiglu_gate_grad_rows<T: FastMath + Default>(g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
    let mut out = vec![T::default(); g.len()];
    out.par_chunks_mut(BLOCK)
        .zip(
            g.par_chunks(BLOCK)
                .zip(u.par_chunks(BLOCK).zip(dy.par_chunks(BLOCK))),
        )
        .for_each(|(o, (g, (u, dy)))| swiglu_gate_grad_block(g, u, dy, o));
    out
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "lmkit-swiglu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        binary_kernel!(s1, l1, s2, l2, swiglu_rows)
    }
    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let du = g.apply_op2_no_bwd(&dy, &SwiGlu)?;
        let dg = g.apply_op3_no_bwd(u, &dy, &SwiGluGateGrad)?;
        Ok((Some(dg), Some(du)))
    }
}

impl CustomOp3 for SwiGluGateGrad {
    fn name(&self) -> &'static str {
        "lmkit-swiglu-gate-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = ternary_kernel!(s1, l1, s2, l2, s3, l3, swiglu_gate_grad_rows);
        Ok((out, l1.shape().clone()))
    }
}

/// silu(gate)·up: the fused kernel on the CPU in f32/f64 (same shapes) and for inference in a half
/// type there ([`crate::half_ops`]), one launch on a GPU in f32 where nothing tracks gradients
/// (`cuda::swiglu_rows`), composed ops elsewhere.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if fused_ok(gate)
        && up.dtype() == gate.dtype()
        && up.device().is_cpu()
        && up.dims() == gate.dims()
    {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu);
    }
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    if crate::cuda::layers_on(gate) {
        if let Some(y) = crate::cuda::swiglu_rows(gate, up)? {
            return Ok(y);
        }
    }
    if let Some(y) = crate::half_ops::swiglu(gate, up)? {
        return Ok(y);
    }
    candle_nn::ops::silu(gate)? * up
}

// ---------------------------------------------------------------- bias add

/// x [.., n] + b [n]; backward: dx = dy, db = the column sums of dy (one pass over contiguous
/// rows; candle's broadcast backward sums over the leading dims with strided reads).
struct AddBias;
struct ColumnSum;

/// In place: every row of `y` [.., n] plus `b` [n].
pub fn add_bias_in_place<T: Float + Send + Sync>(y: &mut [T], b: &[T]) {
    y.par_chunks_mut(b.len().max(1) * 64).for_each(|rows| {
        for r in rows.chunks_mut(b.len().max(1)) {
            for (o, &bi) in r.iter_mut().zip(b) {
                *o = *o + bi;
            }
        }
    });
}

/// `x` [.., n] plus `b` [n] on every row, as a new buffer.
pub fn add_rows<T: Float + Send + Sync>(x: &[T], b: &[T]) -> Vec<T> {
    if b.is_empty() {
        return x.to_vec();
    }
    map_blocks(x, b.len() * 64, |xs, o| {
        for (r, xr) in o.chunks_mut(b.len()).zip(xs.chunks(b.len())) {
            for ((o, &xv), &bi) in r.iter_mut().zip(xr).zip(b) {
                *o = xv + bi;
            }
        }
    })
}

pub fn column_sums<T: Float + Send + Sync>(x: &[T], n: usize) -> Vec<T> {
    let rows = x.len() / n.max(1);
    let per = rows.div_ceil(rayon::current_num_threads().max(1)).max(1);
    x.par_chunks(per * n)
        .map(|block| {
            let mut acc = vec![T::zero(); n];
            for r in block.chunks(n) {
                for (a, &v) in acc.iter_mut().zip(r) {
                    *a = *a + v;
                }
            }
            acc
        })
        .reduce(
            || vec![T::zero(); n],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x = *x + y;
                }
                a
            },
        )
}

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "lmkit-add-bias"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(b)) => {
                CpuStorage::F32(add_rows(slice(x, l1)?, slice(b, l2)?))
            }
            (CpuStorage::F64(x), CpuStorage::F64(b)) => {
                CpuStorage::F64(add_rows(slice(x, l1)?, slice(b, l2)?))
            }
            _ => candle_core::bail!("fused kernel: f32 or f64 only"),
        };
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let db = column_sum(dy)?;
        Ok((Some(dy.clone()), Some(db)))
    }
}

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "lmkit-column-sum"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = *l.dims().last().unwrap_or(&1);
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(column_sums(slice(x, l)?, n)),
            CpuStorage::F64(x) => CpuStorage::F64(column_sums(slice(x, l)?, n)),
            _ => candle_core::bail!("fused kernel: f32 or f64 only"),
        };
        Ok((out, Shape::from(n)))
    }
}

/// Column sums of `x` [.., n] → [n] (no backward): the bias gradient.
pub fn column_sum(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&ColumnSum)
}

/// `x + bias` with `bias` [n] broadcast over the rows of `x` [.., n].
pub fn add_bias(x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    if fused_ok(x) && bias.dtype() == x.dtype() && bias.device().is_cpu() && bias.rank() == 1 {
        return x.contiguous()?.apply_op2(&bias.contiguous()?, AddBias);
    }
    x.broadcast_add(bias)
}

// ---------------------------------------------------------------- layer norm

/// y = (x − mean)·rstd·w + b over the last dim, rstd = 1/√(var + eps) (Ba et al. 2016). The
/// backward pass gives dx, dw and db from one pass over the rows:
/// x̂ = (x − mean)·rstd, ĝ = dy·w, dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)), dw = Σ dy·x̂, db = Σ dy.
struct LayerNormOp {
    eps: f64,
}
/// Inputs (x, w, dy); output [dx (x's size) | dw (n) | db (n)] flattened, split by `layer_norm`.
struct LayerNormBwd {
    eps: f64,
}

/// Rows per parallel task of the layer-norm kernels.
const LN_ROWS: usize = 32;

#[inline(always)]
fn row_stats<T: Float>(r: &[T], eps: T) -> (T, T) {
    let n = T::from(r.len()).unwrap_or_else(T::one);
    let mean = sum_of(r) / n;
    let var = lane_sum(r, |v| (v - mean) * (v - mean)) / n;
    (mean, T::one() / (var + eps).sqrt())
}

simd_versions! {
    /// LayerNorm of the rows of `xs` into `o`.
    pub(crate) fn layer_norm_block<T: FastMath>(o: &mut [T], xs: &[T], w: &[T], b: &[T], eps: T) {
        let n = w.len();
        for (o, r) in o.chunks_mut(n).zip(xs.chunks(n)) {
            let (mean, rstd) = row_stats(r, eps);
            for (((o, &v), &wi), &bi) in o.iter_mut().zip(r).zip(w).zip(b) {
                *o = (v - mean) * rstd * wi + bi;
            }
        }
    }
}

simd_versions! {
    /// LayerNorm's backward over the rows of `xs`: dx into `dxs` (added to it when `add`),
    /// dw and db added to `acc` [dw | db].
    fn layer_norm_bwd_block<T: FastMath>(
        dxs: &mut [T],
        xs: &[T],
        gs: &[T],
        w: &[T],
        eps: T,
        add: bool,
        acc: &mut [T],
    ) {
        let n = w.len();
        let inv_n = T::one() / T::from(n).unwrap_or_else(T::one);
        let (dw, db) = acc.split_at_mut(n);
        let base = if add { T::one() } else { T::zero() };
        for ((dx, r), g) in dxs.chunks_mut(n).zip(xs.chunks(n)).zip(gs.chunks(n)) {
            let (mean, rstd) = row_stats(r, eps);
            let sum_g = dot_of(g, w);
            let sum_gx = lane_sum3(g, w, r, |gi, wi, v| gi * wi * ((v - mean) * rstd));
            for (((&v, &gi), dwi), dbi) in r.iter().zip(g).zip(dw.iter_mut()).zip(db.iter_mut()) {
                *dwi = *dwi + gi * ((v - mean) * rstd);
                *dbi = *dbi + gi;
            }
            let (mg, mgx) = (sum_g * inv_n, sum_gx * inv_n);
            for (((d, &v), &gi), &wi) in dx.iter_mut().zip(r).zip(g).zip(w) {
                let xh = (v - mean) * rstd;
                *d = base * *d + rstd * (gi * wi - mg - xh * mgx);
            }
        }
    }
}

pub fn layer_norm_rows<T: FastMath>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let eps = c::<T>(eps);
    norm_rows_fwd(x, w.len(), |o, xs| layer_norm_block(o, xs, w, b, eps))
}

/// A row-wise norm's forward: `block(out rows, x rows)` over blocks of LN_ROWS rows of n, in
/// parallel.
fn norm_rows_fwd<T: FastMath>(x: &[T], n: usize, block: impl Fn(&mut [T], &[T]) + Sync) -> Vec<T> {
    map_blocks(x, n * LN_ROWS, |xs, o| block(o, xs))
}

/// A row-wise norm's backward: `block(dx rows, x rows, dy rows, acc)` over blocks of LN_ROWS rows
/// of n in parallel, each block adding its parameter gradients into its own `acc_len` zeros;
/// returns those summed in block order (the same total every run).
fn norm_rows_bwd<T: FastMath>(
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    n: usize,
    acc_len: usize,
    block: impl Fn(&mut [T], &[T], &[T], &mut [T]) + Sync,
) -> Vec<T> {
    let partial: Vec<Vec<T>> = dx
        .par_chunks_mut(n * LN_ROWS)
        .zip(x.par_chunks(n * LN_ROWS).zip(dy.par_chunks(n * LN_ROWS)))
        .map(|(dxs, (xs, gs))| {
            let mut acc = vec![T::zero(); acc_len];
            block(dxs, xs, gs, &mut acc);
            acc
        })
        .collect();
    let mut out = vec![T::zero(); acc_len];
    for p in partial {
        for (o, v) in out.iter_mut().zip(p) {
            *o = *o + v;
        }
    }
    out
}

fn layer_norm_bwd_rows<T: FastMath>(x: &[T], w: &[T], dy: &[T], eps: f64) -> Vec<T> {
    let mut out = vec![T::zero(); x.len() + 2 * w.len()];
    let (dx, dwb) = out.split_at_mut(x.len());
    dwb.copy_from_slice(&layer_norm_bwd_into(x, w, dy, eps, dx, false));
    out
}

/// LayerNorm's backward over rows of x (stats recomputed): dx into `dx` (added to what it holds
/// when `add`), and the weight and bias gradients returned as [dw | db].
pub fn layer_norm_bwd_into<T: FastMath>(
    x: &[T],
    w: &[T],
    dy: &[T],
    eps: f64,
    dx: &mut [T],
    add: bool,
) -> Vec<T> {
    let eps = c::<T>(eps);
    norm_rows_bwd(x, dy, dx, w.len(), 2 * w.len(), |dxs, xs, gs, acc| {
        layer_norm_bwd_block(dxs, xs, gs, w, eps, add, acc)
    })
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "lmkit-layer-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = ternary_kernel!(s1, l1, s2, l2, s3, l3, |x, w, b| layer_norm_rows(
            x, w, b, self.eps
        ));
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = w.dim(0)?;
        let all = x.apply_op3_no_bwd(w, &dy.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        let len = x.elem_count();
        Ok((
            Some(all.narrow(0, 0, len)?.reshape(x.shape())?),
            Some(all.narrow(0, len, n)?),
            Some(all.narrow(0, len + n, n)?),
        ))
    }
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "lmkit-layer-norm-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = ternary_kernel!(s1, l1, s2, l2, s3, l3, |x, w, g| layer_norm_bwd_rows(
            x, w, g, self.eps
        ));
        let len = l1.shape().elem_count() + 2 * l2.shape().elem_count();
        Ok((out, Shape::from(len)))
    }
}

/// LayerNorm over the last dim with weight `w` and bias `b` ([n] each): the fused kernel on the
/// CPU in f32/f64 (and for inference in a half type there: [`crate::half_ops`]), candle-nn's on a
/// GPU where nothing tracks gradients, `None` elsewhere (the caller composes it from tensor ops).
pub fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> candle_core::Result<Option<Tensor>> {
    let n = x.dim(D::Minus1)?;
    if gpu_inference(x, &[w, b]) && w.dims() == [n] && b.dims() == [n] {
        let (w, b) = (w.contiguous()?, b.contiguous()?);
        return candle_nn::ops::layer_norm(&x.contiguous()?, &w, &b, eps as f32).map(Some);
    }
    let same = |t: &Tensor| t.dtype() == x.dtype() && t.device().is_cpu() && t.dims() == [n];
    if !(fused_ok(x) && same(w) && same(b)) {
        return crate::half_ops::layer_norm(x, w, b, eps);
    }
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNormOp { eps })
        .map(Some)
}

// ---------------------------------------------------------------- RMS norm

/// RMSNorm (Zhang & Sennrich 2019) over the last dim: y = x / √(mean(x²) + eps) · w.
struct RmsNormOp {
    eps: f64,
}
/// Inputs (x, w, dy); output [dx (x's size) | dw (n)] flattened, split by `rms_norm`.
struct RmsNormBwd {
    eps: f64,
}

#[inline(always)]
fn rms_rstd<T: Float>(r: &[T], eps: T) -> T {
    let n = T::from(r.len()).unwrap_or_else(T::one);
    T::one() / (lane_sum(r, |v| v * v) / n + eps).sqrt()
}

simd_versions! {
    /// RMSNorm of the rows of `xs` into `o`.
    pub(crate) fn rms_norm_block<T: FastMath>(o: &mut [T], xs: &[T], w: &[T], eps: T) {
        let n = w.len();
        for (o, r) in o.chunks_mut(n).zip(xs.chunks(n)) {
            let rstd = rms_rstd(r, eps);
            for ((o, &v), &wi) in o.iter_mut().zip(r).zip(w) {
                *o = v * rstd * wi;
            }
        }
    }
}

simd_versions! {
    /// RMSNorm's backward over the rows of `xs`: dx = rstd·(g·w − x̂·mean(g·w·x̂)) into `dxs`
    /// (added to what it holds when `add`), dw += g·x̂ into `dw` (x̂ = x·rstd).
    fn rms_norm_bwd_block<T: FastMath>(dxs: &mut [T], xs: &[T], gs: &[T], w: &[T], eps: T, add: bool, dw: &mut [T]) {
        let n = w.len();
        let inv_n = T::one() / T::from(n).unwrap_or_else(T::one);
        let base = if add { T::one() } else { T::zero() };
        for ((dx, r), g) in dxs.chunks_mut(n).zip(xs.chunks(n)).zip(gs.chunks(n)) {
            let rstd = rms_rstd(r, eps);
            let m = lane_sum3(g, w, r, |gi, wi, v| gi * wi * v) * rstd * inv_n;
            for ((&v, &gi), dwi) in r.iter().zip(g).zip(dw.iter_mut()) {
                *dwi = *dwi + gi * v * rstd;
            }
            for (((d, &v), &gi), &wi) in dx.iter_mut().zip(r).zip(g).zip(w) {
                *d = base * *d + rstd * (gi * wi - v * rstd * m);
            }
        }
    }
}

/// RMSNorm of the rows of `x` (each `w.len()` values) with weight `w`.
pub fn rms_norm_rows<T: FastMath>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let eps = c::<T>(eps);
    norm_rows_fwd(x, w.len(), |o, xs| rms_norm_block(o, xs, w, eps))
}

fn rms_norm_bwd_rows<T: FastMath>(x: &[T], w: &[T], dy: &[T], eps: f64) -> Vec<T> {
    let mut out = vec![T::zero(); x.len() + w.len()];
    let (dx, dw) = out.split_at_mut(x.len());
    dw.copy_from_slice(&rms_norm_bwd_into(x, w, dy, eps, dx, false));
    out
}

/// RMSNorm's backward over rows of x (stats recomputed): dx into `dx` (added to what it holds
/// when `add`), and the weight's gradient returned.
pub fn rms_norm_bwd_into<T: FastMath>(
    x: &[T],
    w: &[T],
    dy: &[T],
    eps: f64,
    dx: &mut [T],
    add: bool,
) -> Vec<T> {
    let n = w.len();
    let eps = c::<T>(eps);
    norm_rows_bwd(x, dy, dx, n, n, |dxs, xs, gs, acc| {
        rms_norm_bwd_block(dxs, xs, gs, w, eps, add, acc)
    })
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "lmkit-rms-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        binary_kernel!(s1, l1, s2, l2, |x, w| rms_norm_rows(x, w, self.eps))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = w.dim(0)?;
        let all = x.apply_op3_no_bwd(w, &dy.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        let len = x.elem_count();
        Ok((
            Some(all.narrow(0, 0, len)?.reshape(x.shape())?),
            Some(all.narrow(0, len, n)?),
        ))
    }
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "lmkit-rms-norm-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = ternary_kernel!(s1, l1, s2, l2, s3, l3, |x, w, g| rms_norm_bwd_rows(
            x, w, g, self.eps
        ));
        let len = l1.shape().elem_count() + l2.shape().elem_count();
        Ok((out, Shape::from(len)))
    }
}

/// RMSNorm over the last dim with weight `w` [n]: the fused kernel on the CPU in f32/f64 (and for
/// inference in a half type there: [`crate::half_ops`]), candle-nn's on a GPU where nothing tracks
/// gradients, `None` elsewhere (the caller composes it from tensor ops).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Option<Tensor>> {
    let n = x.dim(D::Minus1)?;
    if gpu_inference(x, &[w]) && w.dims() == [n] {
        return candle_nn::ops::rms_norm(&x.contiguous()?, &w.contiguous()?, eps as f32).map(Some);
    }
    if let Some(y) = crate::half_ops::rms_norm(x, w, eps)? {
        return Ok(Some(y));
    }
    if !(fused_ok(x) && w.dtype() == x.dtype() && w.device().is_cpu() && w.dims() == [n]) {
        return Ok(None);
    }
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNormOp { eps })
        .map(Some)
}

// ---------------------------------------------------------------- rotary embedding

/// Rotary embedding in the "rotate half" layout of x [.., t, d] with cos/sin [t, d/2]:
/// (x₁, x₂) → (x₁·cos − x₂·sin, x₂·cos + x₁·sin). Its backward is the rotation by −θ (`inverse`).
struct RopeOp {
    inverse: bool,
}

simd_versions! {
    /// Rotates each row of `xs` (d values, position `pos0 + row` modulo t) into `o`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rope_block<T: FastMath>(
        o: &mut [T],
        xs: &[T],
        cos: &[T],
        sin: &[T],
        t: usize,
        pos0: usize,
        sign: T,
    ) {
        let half = cos.len() / t.max(1);
        for (row, (o, x)) in o.chunks_mut(2 * half).zip(xs.chunks(2 * half)).enumerate() {
            let pos = (pos0 + row) % t;
            let (c, s) = (&cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half]);
            let (x1, x2) = x.split_at(half);
            let (o1, o2) = o.split_at_mut(half);
            for i in 0..half.min(x1.len()).min(x2.len()).min(o1.len()).min(o2.len()) {
                let si = sign * s[i];
                o1[i] = x1[i] * c[i] - x2[i] * si;
                o2[i] = x2[i] * c[i] + x1[i] * si;
            }
        }
    }
}

fn rope_rows<T: FastMath>(x: &[T], cos: &[T], sin: &[T], t: usize, inverse: bool) -> Vec<T> {
    let d = 2 * cos.len() / t.max(1);
    let sign = if inverse { -T::one() } else { T::one() };
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(d.max(1) * LN_ROWS)
        .zip(x.par_chunks(d.max(1) * LN_ROWS))
        .enumerate()
        .for_each(|(i, (o, xs))| rope_block(o, xs, cos, sin, t, i * LN_ROWS, sign));
    out
}

/// Rotary embedding, in place, of heads of `hd` values in columns `cols` of rows `width` apart
/// ("rotate half" layout), row i at position `positions[i]` of `table` [positions, hd]: each
/// row cos(θ) of the hd/2 frequencies, then their sin(θ). `inverse` rotates by −θ (the backward
/// pass).
pub fn rope_heads_in_place<T: FastMath>(
    x: &mut [T],
    width: usize,
    cols: std::ops::Range<usize>,
    hd: usize,
    positions: &[usize],
    table: &[T],
    inverse: bool,
) {
    let half = hd / 2;
    let sign = if inverse { -T::one() } else { T::one() };
    x.par_chunks_mut(width)
        .zip(positions.par_iter())
        .for_each(|(row, &pos)| {
            let (c, s) = table[pos * hd..(pos + 1) * hd].split_at(half);
            for head in row[cols.clone()].chunks_mut(hd) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b, si) = (x1[i], x2[i], sign * s[i]);
                    x1[i] = a * c[i] - b * si;
                    x2[i] = b * c[i] + a * si;
                }
            }
        });
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        "lmkit-rope"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let t = l2.dims()[0];
        let out = ternary_kernel!(s1, l1, s2, l2, s3, l3, |x, c, s| rope_rows(
            x,
            c,
            s,
            t,
            self.inverse
        ));
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inverse = RopeOp {
            inverse: !self.inverse,
        };
        let dx = dy.contiguous()?.apply_op3_no_bwd(cos, sin, &inverse)?;
        Ok((Some(dx), None, None))
    }
}

/// Rotary embedding of x [.., t, d] with cos/sin [t, d/2] ("rotate half" layout): the fused kernel
/// on the CPU in f32/f64 (gradient for x only: the tables are constants) and for inference in a
/// half type there ([`crate::half_ops`]), `None` elsewhere.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let dims = x.dims();
    let (r, d) = (dims.len(), *dims.last().unwrap_or(&0));
    let fits = fused_ok(x)
        && r >= 2
        && d % 2 == 0
        && [cos, sin].iter().all(|c| {
            c.dtype() == x.dtype() && c.device().is_cpu() && c.dims() == [dims[r - 2], d / 2]
        });
    if !fits {
        return crate::half_ops::rope(x, cos, sin);
    }
    x.contiguous()?
        .apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            RopeOp { inverse: false },
        )
        .map(Some)
}

// ---------------------------------------------------------------- cross-entropy

/// Σ over rows of −log softmax(logits)[target]; backward (softmax − one-hot)·grad in one pass.
struct CrossEntropySum;
struct CrossEntropyGrad {
    scale: f64,
}

fn targets<'a>(s: &'a CpuStorage, l: &Layout, v: usize) -> candle_core::Result<&'a [u32]> {
    let t = match s {
        CpuStorage::U32(t) => slice(t, l)?,
        _ => candle_core::bail!("cross-entropy: targets must be u32"),
    };
    if let Some(bad) = t.iter().find(|&&y| y as usize >= v) {
        candle_core::bail!("cross-entropy: target {bad} is outside the vocabulary of {v}");
    }
    Ok(t)
}

simd_versions! {
    /// log Σ exp(r), shifted by the row's max.
    pub fn log_sum_exp<T: FastMath>(r: &[T]) -> T {
        let m = max_of(r);
        m + lane_sum(r, |v| (v - m).exp_fast()).ln()
    }
}

/// log softmax(row)[target] of each row of `logits` [n, v] (f32 or f64, CPU): one pass over each
/// row with the fused log-sum-exp, rows in parallel (what scoring a text needs, without the
/// several full-size passes of a composed log-softmax and gather).
pub fn target_log_probs(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Vec<f32>> {
    let (n, v) = logits.dims2()?;
    if n != targets.len() {
        candle_core::bail!("target_log_probs: {n} rows for {} targets", targets.len());
    }
    if let Some(bad) = targets.iter().find(|&&y| y as usize >= v) {
        candle_core::bail!("target_log_probs: target {bad} is outside the vocabulary of {v}");
    }
    let x = logits
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(x.par_chunks(v.max(1))
        .zip(targets.par_iter())
        .map(|(r, &y)| r[y as usize] - log_sum_exp(r))
        .collect())
}

fn ce_sum<T: FastMath>(x: &[T], t: &[u32], v: usize) -> f64 {
    x.par_chunks(v)
        .zip(t.par_iter())
        .map(|(r, &y)| {
            (log_sum_exp(r) - r[y as usize])
                .to_f64()
                .unwrap_or(f64::NAN)
        })
        .sum()
}

fn ce_grad<T: FastMath>(x: &[T], t: &[u32], v: usize, scale: f64) -> Vec<T> {
    let scale = T::from(scale).unwrap_or_else(T::zero);
    let mut out = x.to_vec();
    out.par_chunks_mut(v).zip(t.par_iter()).for_each(|(r, &y)| {
        ce_row_in_place(r, y as usize, scale);
    });
    out
}

/// In place: logits `r` → scale·(softmax(r) − one_hot(y)); returns the row's cross-entropy
/// −log softmax(r)[y].
pub fn ce_row_in_place<T: FastMath>(r: &mut [T], y: usize, scale: T) -> T {
    ce_row_weighted_in_place(r, y, |_| scale)
}

/// As [`ce_row_in_place`], the gradient's scale given by `scale_of(loss)` (a per-token weight
/// that depends on the token's own log-probability, as RL objectives have).
pub fn ce_row_weighted_in_place<T: FastMath>(
    r: &mut [T],
    y: usize,
    scale_of: impl FnOnce(T) -> T,
) -> T {
    let target = r[y];
    // One exponential per logit: exp(r − max) is kept in place, then scaled.
    let (m, sum) = max_exp_sum_in_place(r);
    let loss = m + sum.ln() - target;
    let scale = scale_of(loss);
    scale_in_place(r, scale / sum);
    r[y] = r[y] - scale;
    loss
}

simd_versions! {
    /// In place: r ← exp(r − max r); gives (max r, Σ exp(r − max r)).
    fn max_exp_sum_in_place<T: FastMath>(r: &mut [T]) -> (T, T) {
        let m = max_of(r);
        (m, exp_sum(r, T::one(), m))
    }
}

simd_versions! {
    /// In place: r ← r·k.
    fn scale_in_place<T: FastMath>(r: &mut [T], k: T) {
        for v in r.iter_mut() {
            *v = *v * k;
        }
    }
}

impl CustomOp2 for CrossEntropySum {
    fn name(&self) -> &'static str {
        "lmkit-cross-entropy"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let v = *l1.dims().last().unwrap_or(&1);
        let t = targets(s2, l2, v)?;
        let out = match s1 {
            CpuStorage::F32(x) => CpuStorage::F32(vec![ce_sum(slice(x, l1)?, t, v) as f32]),
            CpuStorage::F64(x) => CpuStorage::F64(vec![ce_sum(slice(x, l1)?, t, v)]),
            _ => candle_core::bail!("fused kernel: f32 or f64 only"),
        };
        Ok((out, Shape::from(())))
    }
    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let scale = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let g = logits.apply_op2_no_bwd(targets, &CrossEntropyGrad { scale })?;
        Ok((Some(g), None))
    }
}

impl CustomOp2 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "lmkit-cross-entropy-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let v = *l1.dims().last().unwrap_or(&1);
        let t = targets(s2, l2, v)?;
        let out = match s1 {
            CpuStorage::F32(x) => CpuStorage::F32(ce_grad(slice(x, l1)?, t, v, self.scale)),
            CpuStorage::F64(x) => CpuStorage::F64(ce_grad(slice(x, l1)?, t, v, self.scale)),
            _ => candle_core::bail!("fused kernel: f32 or f64 only"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Summed (not averaged) cross-entropy of `logits` [n, vocab] against `targets` [n] (u32).
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    if fused_ok(logits) && targets.dtype() == DType::U32 && targets.device().is_cpu() {
        return logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, CrossEntropySum);
    }
    let n = logits.dim(0)?;
    candle_nn::loss::cross_entropy(logits, targets)? * n as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_same, max_diff};
    use candle_core::Device;

    #[test]
    fn gelu_in_place_equals_the_gelu_op() {
        let dev = Device::Cpu;
        let x = crate::testing::randn(0f32, 2.0, (3, 40_000), &dev).unwrap();
        let want = gelu_erf(&x).unwrap();
        let y = x.copy().unwrap();
        assert!(gelu_erf_in_place(&y).unwrap());
        assert_eq!(max_diff(&y, &want), 0.0);
        // A tensor a gradient passes through is left alone.
        let v = candle_core::Var::from_tensor(&x).unwrap();
        assert!(!gelu_erf_in_place(v.as_tensor()).unwrap());
        assert_eq!(max_diff(v.as_tensor(), &x), 0.0);
    }

    #[test]
    fn swiglu_backward_in_place_equals_the_two_gradients() {
        // Lengths around the block size and the vector width; f32 and f64.
        fn check<T: FastMath + Default + std::fmt::Debug>(len: usize) {
            let v = |s: usize| -> Vec<T> {
                (0..len)
                    .map(|i| T::from(((i * s) % 1000) as f64 / 100.0 - 5.0).unwrap())
                    .collect()
            };
            let (mut g, mut u, dy) = (v(7919), v(104_729), v(31));
            let (dg, du) = (swiglu_gate_grad_rows(&g, &u, &dy), swiglu_rows(&g, &dy));
            swiglu_bwd_in_place(&mut g, &mut u, &dy);
            assert_eq!(g, dg, "gate gradient, {len} values");
            assert_eq!(u, du, "up gradient, {len} values");
        }
        for len in [0, 1, 15, 17, BLOCK - 1, BLOCK + 33, 3 * BLOCK] {
            check::<f32>(len);
            check::<f64>(len);
        }
    }

    #[test]
    fn rows_plus_a_bias_equal_the_definition() {
        // Rows around the 64-row chunks each task fills; an empty bias leaves x as it is.
        for (rows, n) in [(0, 3), (1, 3), (63, 5), (65, 5), (200, 7)] {
            let x: Vec<f32> = (0..rows * n).map(|i| (i % 97) as f32 - 40.0).collect();
            let b: Vec<f32> = (0..n).map(|j| 0.5 * j as f32 + 1.0).collect();
            let want: Vec<f32> = x.iter().enumerate().map(|(i, &v)| v + b[i % n]).collect();
            assert_eq!(add_rows(&x, &b), want, "{rows} rows of {n}");
        }
        assert_eq!(add_rows(&[1.0f64, 2.0], &[]), [1.0, 2.0]);
    }

    #[test]
    fn softmax_over_columns_equals_the_row_softmax() {
        // Sᵀ's columns against S's rows, with as many, fewer and more keys than queries (the
        // causal mask then cuts rows at different places).
        for (nq, nk, causal) in [
            (37, 37, false),
            (37, 37, true),
            (5, 40, true),
            (40, 5, true),
            (3, 70, false),
        ] {
            let s: Vec<f32> = (0..nq * nk)
                .map(|i| ((i * 7919 % 1000) as f32 / 100.0 - 5.0) * (1.0 + (i % 3) as f32))
                .collect();
            let mut rows = s.clone();
            for (j, row) in rows.chunks_mut(nk).enumerate() {
                let seen = if causal { (j + 1).min(nk) } else { nk };
                softmax_row(row, seen, 0.3);
            }
            let mut cols: Vec<f32> = (0..nk * nq).map(|i| s[(i % nq) * nk + i / nq]).collect();
            let mut stats = vec![0f32; 2 * nq];
            softmax_columns(&mut cols, nk, nq, causal, 0.3, &mut stats);
            for i in 0..nq {
                for k in 0..nk {
                    let (a, b) = (rows[i * nk + k], cols[k * nq + i]);
                    assert!(
                        (a - b).abs() < 1e-6,
                        "{nq}×{nk} causal {causal}: ({i}, {k}) {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn swiglu_matches_candle_in_value_and_gradient() {
        let dev = Device::Cpu;
        let g = candle_core::Var::from_tensor(
            &crate::testing::randn(0f64, 2.0, (3, 70), &dev).unwrap(),
        )
        .unwrap();
        let u = candle_core::Var::from_tensor(
            &crate::testing::randn(0f64, 1.0, (3, 70), &dev).unwrap(),
        )
        .unwrap();
        let w = crate::testing::randn(0f64, 1.0, (3, 70), &dev).unwrap();
        let ours = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
        let theirs = (candle_nn::ops::silu(g.as_tensor()).unwrap() * u.as_tensor()).unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-9);
        let go = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gt = (theirs * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&g, &u] {
            let d = max_diff(
                go.get(v.as_tensor()).unwrap(),
                gt.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-9, "{d}");
        }
    }

    #[test]
    fn target_log_probs_equal_the_log_softmax() {
        let dev = Device::Cpu;
        let x = crate::testing::randn(0f32, 3.0, (5, 1000), &dev).unwrap();
        let t = [0u32, 999, 17, 500, 3];
        let got = target_log_probs(&x, &t).unwrap();
        let lp = candle_nn::ops::log_softmax(&x, D::Minus1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (r, (&g, &y)) in got.iter().zip(&t).enumerate() {
            assert!(
                (g - lp[r][y as usize]).abs() < 1e-4,
                "{g} vs {}",
                lp[r][y as usize]
            );
        }
        assert!(target_log_probs(&x, &[1, 2]).is_err());
        assert!(target_log_probs(&x, &[0, 0, 0, 0, 1000]).is_err());
    }

    #[test]
    fn fused_bias_add_matches_candle_in_value_and_gradient() {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(
            &crate::testing::randn(0f64, 1.0, (3, 5, 7), &dev).unwrap(),
        )
        .unwrap();
        let b = candle_core::Var::from_tensor(&crate::testing::randn(0f64, 1.0, 7, &dev).unwrap())
            .unwrap();
        let w = crate::testing::randn(0f64, 1.0, (3, 5, 7), &dev).unwrap();
        let ours = add_bias(x.as_tensor(), b.as_tensor()).unwrap();
        let reference = x.as_tensor().broadcast_add(b.as_tensor()).unwrap();
        let max = |t: Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert!(max((&ours - &reference).unwrap()) < 1e-15);
        let ga = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (reference * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &b] {
            let d = (ga.get(v.as_tensor()).unwrap() - gb.get(v.as_tensor()).unwrap()).unwrap();
            assert!(max(d) < 1e-12);
        }
    }

    #[test]
    fn causal_softmax_matches_scale_mask_softmax_in_value_and_gradient() {
        let dev = Device::Cpu;
        for (t, s) in [(5usize, 5usize), (3, 7), (1, 4)] {
            let x = candle_core::Var::from_tensor(
                &crate::testing::randn(0f64, 2.0, (2, 3, t, s), &dev).unwrap(),
            )
            .unwrap();
            let r = crate::testing::randn(0f64, 1.0, (2, 3, t, s), &dev).unwrap();
            let ours = causal_softmax(x.as_tensor(), 0.3).unwrap().expect("fused");
            let mask: Vec<f64> = (0..t)
                .flat_map(|i| {
                    (0..s).map(move |j| {
                        if j <= s - t + i {
                            0.0
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (t, s), &dev).unwrap();
            let z = (x.as_tensor() * 0.3).unwrap().broadcast_add(&mask).unwrap();
            let e = z
                .broadcast_sub(&z.max_keepdim(D::Minus1).unwrap())
                .unwrap()
                .exp()
                .unwrap();
            let reference = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
            let max = |t: Tensor| {
                t.abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            assert!(max((&ours - &reference).unwrap()) < 1e-12, "t={t} s={s}");
            let ga = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (reference * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let d = (ga.get(x.as_tensor()).unwrap() - gb.get(x.as_tensor()).unwrap()).unwrap();
            assert!(max(d) < 1e-12, "gradient t={t} s={s}");
        }
    }

    #[test]
    fn fused_rope_matches_composed_ops_in_value_and_gradient() {
        let dev = Device::Cpu;
        // 2·3·40 rows: several parallel tasks, positions wrapping within each; head dim 6.
        let x = candle_core::Var::from_tensor(
            &crate::testing::randn(0f64, 1.0, (2, 3, 40, 6), &dev).unwrap(),
        )
        .unwrap();
        let ang = crate::testing::randn(0f64, 2.0, (40, 3), &dev).unwrap();
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let ours = rope(x.as_tensor(), &cos, &sin)
            .unwrap()
            .expect("fused in f64");
        let reference = {
            let x = x.as_tensor();
            let x1 = x.narrow(D::Minus1, 0, 3).unwrap();
            let x2 = x.narrow(D::Minus1, 3, 3).unwrap();
            let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
            let c2 = Tensor::cat(&[&cos, &cos], D::Minus1).unwrap();
            let s2 = Tensor::cat(&[&sin, &sin], D::Minus1).unwrap();
            (x.broadcast_mul(&c2).unwrap() + rotated.broadcast_mul(&s2).unwrap()).unwrap()
        };
        assert_same(
            ours,
            reference.clone(),
            &[&x],
            1e-12,
            "fused_rope_matches_composed_ops_in_value_and_gradient",
        );
        // Tables that do not match the positions: not fused (the caller's composed ops report it).
        let (c39, s39) = (cos.narrow(0, 0, 39).unwrap(), sin.narrow(0, 0, 39).unwrap());
        assert!(rope(x.as_tensor(), &c39, &s39).unwrap().is_none());
        let x32 = x.as_tensor().to_dtype(DType::F32).unwrap();
        let (c32, s32) = (
            cos.to_dtype(DType::F32).unwrap(),
            sin.to_dtype(DType::F32).unwrap(),
        );
        let f32_ours = rope(&x32, &c32, &s32).unwrap().expect("fused in f32");
        let f32_ref = reference.to_dtype(DType::F32).unwrap();
        assert!(max_diff(&f32_ours, &f32_ref) < 1e-5);
    }

    /// x / sqrt(mean(x²) + 1e-6) · w in plain tensor ops: the reference for the fused RMSNorm.
    fn composed_rms_norm(x: &Tensor, w: &Tensor) -> Tensor {
        let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        x.broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w)
            .unwrap()
    }

    /// (x − mean) / sqrt(var + 1e-5) · w + b in plain tensor ops: the reference for LayerNorm.
    fn composed_layer_norm(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let v = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        xc.broadcast_div(&(v + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w)
            .unwrap()
            .broadcast_add(b)
            .unwrap()
    }

    #[test]
    fn fused_rms_norm_matches_composed_ops_in_value_and_gradient() {
        let dev = Device::Cpu;
        let var = |shape: &[usize], sd: f64| {
            candle_core::Var::from_tensor(&crate::testing::randn(0.5f64, sd, shape, &dev).unwrap())
                .unwrap()
        };
        // 70 rows: more than one parallel task, the last one partial; 19 dims: lanes + a rest.
        let (x, w) = (var(&[2, 35, 19], 2.0), var(&[19], 1.0));
        let ours = rms_norm(x.as_tensor(), w.as_tensor(), 1e-6)
            .unwrap()
            .expect("fused on the CPU in f64");
        let reference = composed_rms_norm(x.as_tensor(), w.as_tensor());
        assert_same(
            ours,
            reference.clone(),
            &[&x, &w],
            1e-11,
            "fused_rms_norm_matches_composed_ops_in_value_and_gradient",
        );
        // f32 (the training dtype; the AVX2/AVX-512 code paths) against the same composed ops.
        let f32var = |v: &candle_core::Var| {
            candle_core::Var::from_tensor(&v.as_tensor().to_dtype(DType::F32).unwrap()).unwrap()
        };
        let (x32, w32) = (f32var(&x), f32var(&w));
        let ours = rms_norm(x32.as_tensor(), w32.as_tensor(), 1e-6)
            .unwrap()
            .expect("fused on the CPU in f32");
        let reference = composed_rms_norm(x32.as_tensor(), w32.as_tensor());
        assert_same(ours, reference, &[&x32, &w32], 1e-4, "rms_norm f32");
        // Mixed dtypes are not fused (the caller composes).
        assert!(rms_norm(x32.as_tensor(), w.as_tensor(), 1e-6)
            .unwrap()
            .is_none());
    }

    #[test]
    fn fused_layer_norm_matches_composed_ops_in_value_and_gradient() {
        let dev = Device::Cpu;
        let var = |shape: &[usize], sd: f64| {
            candle_core::Var::from_tensor(&crate::testing::randn(0.5f64, sd, shape, &dev).unwrap())
                .unwrap()
        };
        // 70 rows: more than one parallel task, the last one partial.
        let (x, w, b) = (var(&[2, 35, 9], 2.0), var(&[9], 1.0), var(&[9], 1.0));
        let ours = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)
            .unwrap()
            .expect("fused on the CPU in f64");
        let reference = composed_layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor());
        assert_same(
            ours,
            reference.clone(),
            &[&x, &w, &b],
            1e-11,
            "fused_layer_norm_matches_composed_ops_in_value_and_gradient",
        );
        // f32 (the training dtype; the AVX2/AVX-512 code paths) against the same composed ops.
        let f32var = |v: &candle_core::Var| {
            candle_core::Var::from_tensor(&v.as_tensor().to_dtype(DType::F32).unwrap()).unwrap()
        };
        let (x32, w32, b32) = (f32var(&x), f32var(&w), f32var(&b));
        let ours = layer_norm(x32.as_tensor(), w32.as_tensor(), b32.as_tensor(), 1e-5)
            .unwrap()
            .expect("fused on the CPU in f32");
        let reference = composed_layer_norm(x32.as_tensor(), w32.as_tensor(), b32.as_tensor());
        assert_same(ours, reference, &[&x32, &w32, &b32], 1e-4, "layer_norm f32");
        // Mixed dtypes are not fused (the caller composes).
        assert!(
            layer_norm(x32.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn fused_cross_entropy_matches_candle_in_value_and_gradient() {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(
            &crate::testing::randn(0f64, 3.0, (9, 17), &dev).unwrap(),
        )
        .unwrap();
        let t = Tensor::new(&[0u32, 16, 3, 3, 8, 1, 15, 2, 9], &dev).unwrap();
        let ours = (cross_entropy_sum(x.as_tensor(), &t).unwrap() * 0.5).unwrap();
        let reference = (candle_nn::loss::cross_entropy(x.as_tensor(), &t).unwrap() * 4.5).unwrap();
        let (a, b) = (
            ours.to_scalar::<f64>().unwrap(),
            reference.to_scalar::<f64>().unwrap(),
        );
        assert!((a - b).abs() < 1e-10, "{a} vs {b}");
        let ga = ours.backward().unwrap();
        let gb = reference.backward().unwrap();
        let d = (ga.get(x.as_tensor()).unwrap() - gb.get(x.as_tensor()).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-12, "{d}");
        let bad = Tensor::new(&[17u32; 9], &dev).unwrap();
        let e = cross_entropy_sum(x.as_tensor(), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside the vocabulary"), "{e}");
    }

    #[test]
    fn fused_kernels_match_candle_ops() {
        let x = crate::testing::randn(0f32, 2.0, (4, 7, 33), &Device::Cpu).unwrap();
        let diff = |a: Tensor, b: Tensor| {
            a.sub(&b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(diff(gelu_tanh(&x).unwrap(), x.gelu().unwrap()) < 1e-5);
        assert!(diff(gelu_erf(&x).unwrap(), x.gelu_erf().unwrap()) < 1e-6);
        let worst_erf = (-60_000..=60_000)
            .map(|i| {
                let x = (i as f64 * 1e-4) as f32;
                (x.erf_fast() as f64 - candle_core::cpu::erf::erf_f64(x as f64)).abs()
            })
            .fold(0f64, f64::max);
        assert!(worst_erf < 5e-7, "f32 erf approximation off by {worst_erf}");
        // The backward against a central difference of the f64 forward.
        let xs: Vec<f64> = (-40..=40).map(|i| i as f64 * 0.1).collect();
        let g = gelu_erf_bwd(&xs, &vec![1.0; xs.len()]);
        for (x, d) in xs.iter().zip(g) {
            let h = 1e-6;
            let num = (gelu_erf_fwd(&[x + h])[0] - gelu_erf_fwd(&[x - h])[0]) / (2.0 * h);
            assert!((num - d).abs() < 1e-8, "x {x}: {d} vs {num}");
        }
        let worst = (-120_000..=120_000)
            .map(|i| {
                let x = i as f64 * 1e-4;
                ((x as f32).tanh_fast() as f64 - x.tanh()).abs()
            })
            .fold(0f64, f64::max);
        assert!(worst < 1e-6, "f32 tanh approximation off by {worst}");
        let worst_exp = (-870_000..=880_000)
            .map(|i| {
                let x = (i as f64 * 1e-4) as f32;
                let want = (x as f64).exp();
                (x.exp_fast() as f64 - want).abs() / want
            })
            .fold(0f64, f64::max);
        assert!(worst_exp < 3e-7, "f32 exp off by {worst_exp} (relative)");
        assert_eq!((-100f32).exp_fast(), 0.0);
        assert_eq!(0f32.exp_fast(), 1.0);
        assert!(f32::NAN.exp_fast().is_nan());
        // The vectorised reductions against plain sums, at lengths around the lane count.
        for n in [0usize, 1, 15, 16, 17, 100] {
            let v: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
            assert!((sum_of(&v) - v.iter().sum::<f64>()).abs() < 1e-12);
            assert!((dot_of(&v, &v) - v.iter().map(|a| a * a).sum::<f64>()).abs() < 1e-12);
            let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(max_of(&v), m);
        }
        assert!(
            diff(
                softmax_last_dim(&x).unwrap(),
                candle_nn::ops::softmax_last_dim(&x).unwrap()
            ) < 1e-6
        );
    }

    /// On a GPU, inference's norms and softmax take candle-nn's fused kernels and equal the CPU's
    /// fused kernels; a tensor that tracks gradients is left to the composed ops (candle-nn's
    /// kernels have no backward pass).
    #[cfg(feature = "cuda")]
    #[test]
    fn gpu_inference_norms_and_softmax_equal_the_cpu_kernels() {
        let Some(gpu) = crate::testing::gpu_device() else {
            return;
        };
        let cpu = Device::Cpu;
        let x = crate::testing::randn(0f32, 2.0, (3, 5, 576), &cpu).unwrap();
        let w = crate::testing::randn(1f32, 0.5, 576, &cpu).unwrap();
        let b = crate::testing::randn(0f32, 0.5, 576, &cpu).unwrap();
        let on = |t: &Tensor| t.to_device(&gpu).unwrap();
        let back = |t: Option<Tensor>| t.expect("fused").to_device(&cpu).unwrap();
        let rms = |x: &Tensor, w: &Tensor| rms_norm(x, w, 1e-5).unwrap();
        let d = max_diff(&back(rms(&on(&x), &on(&w))), &back(rms(&x, &w)));
        assert!(d < 1e-5, "rms norm: {d}");
        let ln = |x: &Tensor, w: &Tensor, b: &Tensor| layer_norm(x, w, b, 1e-5).unwrap();
        let d = max_diff(&back(ln(&on(&x), &on(&w), &on(&b))), &back(ln(&x, &w, &b)));
        assert!(d < 1e-5, "layer norm: {d}");
        let sm = softmax_last_dim(&on(&x)).unwrap().to_device(&cpu).unwrap();
        let d = max_diff(&sm, &softmax_last_dim(&x).unwrap());
        assert!(d < 1e-6, "softmax: {d}");
        let tracked = candle_core::Var::from_tensor(&on(&x)).unwrap();
        assert!(rms(tracked.as_tensor(), &on(&w)).is_none());
    }
}
