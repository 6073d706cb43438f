//! Products with half-precision (bf16 or f16) weights on the CPU, for models loaded in a half
//! type: the weight's rows are widened to f32 a block at a time, each block while the core
//! that multiplies it has it in cache, instead of the whole matrix into a new f32 copy for
//! every product (which doubled the memory the half type saves and made a decoding step of a
//! 135M-parameter model spend most of its time writing and reading that copy). Products
//! accumulate in f32 and the result is rounded once, as PyTorch's CPU products in these types.
//! On a CPU with AMX tiles, bf16 products of more rows than a serving round's run on them
//! ([`crate::amx`]) with no f32 copy of either operand.

use crate::blas::{plain, transposed};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// Rows of the weight (output columns) per task: their f32 copy (at most 128 · k values)
/// stays in the core's cache while every input row reads it.
const BLOCK: usize = 128;

/// `x · wt` for `x` [.., k] and `wt` [k, n] the transposed view of a contiguous half-precision
/// weight W [n, k] (how a linear layer hands its weight to the product), both of one half type
/// on the CPU and without gradients: [.., n] in that type. `None` where the operands are not
/// that (the caller multiplies them another way).
pub fn product(x: &Tensor, wt: &Tensor) -> candle_core::Result<Option<Tensor>> {
    product_with(x, wt, None, None)
}

/// `x · wt + b` (a linear layer with a bias [n]), the sum rounded once: [`product`] with the bias
/// added before the rounding. `None` where the operands are not those.
pub fn product_bias(x: &Tensor, wt: &Tensor, b: &Tensor) -> candle_core::Result<Option<Tensor>> {
    product_with(x, wt, Some(b), None)
}

/// `r + x · wt` (a residual connection after a linear layer without bias), the sum rounded once:
/// [`product`] with `r` of the output's shape and type added before the rounding. `None` where
/// the operands are not those.
pub fn product_add(x: &Tensor, wt: &Tensor, r: &Tensor) -> candle_core::Result<Option<Tensor>> {
    product_with(x, wt, None, Some(r))
}

fn product_with(
    x: &Tensor,
    wt: &Tensor,
    b: Option<&Tensor>,
    r: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    let dtype = x.dtype();
    let here = |t: &Tensor| t.dtype() == dtype && t.device().is_cpu() && !t.track_op();
    if !matches!(dtype, DType::BF16 | DType::F16) || !here(x) || !here(wt) || wt.rank() != 2 {
        return Ok(None);
    }
    let (k, n) = wt.dims2()?;
    let w = wt.t()?;
    if x.rank() < 1 || x.dim(D::Minus1)? != k || !w.is_contiguous() || k == 0 || n == 0 {
        return Ok(None);
    }
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    let m = x.elem_count() / k;
    let residual = match r {
        Some(r) if !here(r) || r.dims() != dims.as_slice() => return Ok(None),
        Some(r) => Some(r.reshape((m, n))?.contiguous()?),
        None => None,
    };
    let bias = match b {
        Some(b) if !here(b) || b.dims() != [n] => return Ok(None),
        Some(b) => Some(b.contiguous()?),
        None => None,
    };
    let y = x
        .reshape((m, k))?
        .contiguous()?
        .apply_op2_no_bwd(&w, &HalfProduct { bias, residual })?;
    y.reshape(dims).map(Some)
}

/// [m, k] · [n, k]ᵀ (+ a bias [n]) (+ a residual [m, n]) → [m, n], all in one half type (see
/// [`product`]).
struct HalfProduct {
    bias: Option<Tensor>,
    residual: Option<Tensor>,
}

impl CustomOp2 for HalfProduct {
    fn name(&self) -> &'static str {
        "half-weight-product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("half-weight product: [{m}, {k}] · [{n}, {k2}]ᵀ");
        }
        let range = |l: &Layout| match l.contiguous_offsets() {
            Some((a, b)) => Ok(a..b),
            None => candle_core::bail!("half-weight product: operands must be contiguous"),
        };
        let (r1, r2) = (range(l1)?, range(l2)?);
        // The addends' values: a bias [n] and a residual [m, n], on the CPU.
        let (bias, residual) = (
            self.bias.as_ref().map(|t| t.storage_and_layout()),
            self.residual.as_ref().map(|t| t.storage_and_layout()),
        );
        let (bias, residual) = (addend(&bias, &[n])?, addend(&residual, &[m, n])?);
        fn values<'a, T: candle_core::WithDType>(
            a: &Option<(&'a CpuStorage, std::ops::Range<usize>)>,
        ) -> candle_core::Result<Option<&'a [T]>> {
            a.as_ref()
                .map(|(s, at)| s.as_slice::<T>().map(|v| &v[at.clone()]))
                .transpose()
        }
        let y = match (s1, s2) {
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => {
                let add = Addends {
                    bias: values(&bias)?,
                    residual: values(&residual)?,
                };
                CpuStorage::BF16(multiply(&x[r1], &w[r2], add, (m, n, k))?)
            }
            (CpuStorage::F16(x), CpuStorage::F16(w)) => {
                let add = Addends {
                    bias: values(&bias)?,
                    residual: values(&residual)?,
                };
                CpuStorage::F16(multiply(&x[r1], &w[r2], add, (m, n, k))?)
            }
            _ => candle_core::bail!("half-weight product: operands of one half type expected"),
        };
        Ok((y, Shape::from((m, n))))
    }
}

/// A half type: widened to f32 and rounded back (to nearest, ties to even, as PyTorch rounds).
pub(crate) trait Half: crate::few_rows::WeightValue + candle_core::WithDType {
    fn widen_all(src: &[Self], dst: &mut [f32]);
    fn narrow(v: f32) -> Self;
    /// `dst[i] = narrow(src[i])` for the shorter of the two.
    fn narrow_all(src: &[f32], dst: &mut [Self]);
    /// `dst[i] = narrow(src[i])` for the shorter of the two, into memory not yet written.
    fn narrow_into(src: &[f32], dst: &mut [std::mem::MaybeUninit<Self>]);
    /// The values as bf16 (`None` for another type).
    fn bf16s(x: &[Self]) -> Option<&[half::bf16]>;
}

impl Half for half::bf16 {
    fn widen_all(src: &[Self], dst: &mut [f32]) {
        // A shift each (vectorises).
        for (d, s) in dst.iter_mut().zip(src) {
            *d = crate::few_rows::WeightValue::widen(*s);
        }
    }

    fn narrow(v: f32) -> Self {
        half::bf16::from_f32(v)
    }

    fn narrow_all(src: &[f32], dst: &mut [Self]) {
        narrow_bf16(src, dst)
    }

    fn narrow_into(src: &[f32], dst: &mut [std::mem::MaybeUninit<Self>]) {
        narrow_bf16_into(src, dst)
    }

    fn bf16s(x: &[Self]) -> Option<&[half::bf16]> {
        Some(x)
    }
}

/// f32 → bf16 without branches, so that it vectorises: `half::bf16::from_f32`'s rounding (to
/// nearest, ties to even; a NaN stays a quiet NaN of its sign).
pub(crate) fn narrow_bf16(src: &[f32], dst: &mut [half::bf16]) {
    // SAFETY: MaybeUninit<bf16> has bf16's layout, and only initialised values are written.
    let dst =
        unsafe { &mut *(dst as *mut [half::bf16] as *mut [std::mem::MaybeUninit<half::bf16>]) };
    narrow_bf16_into(src, dst)
}

/// A new vector of `src` rounded to bf16 as [`narrow_bf16`] rounds, each value written once.
pub(crate) fn narrowed_bf16(src: &[f32]) -> Vec<half::bf16> {
    let mut out = Vec::with_capacity(src.len());
    narrow_bf16_into(src, &mut out.spare_capacity_mut()[..src.len()]);
    // SAFETY: `narrow_bf16_into` wrote all src.len() values just above.
    unsafe { out.set_len(src.len()) };
    out
}

crate::simd::simd_versions! {
    /// [`narrow_bf16`] into `dst`'s first `src.len()` values, which need not be initialised.
    pub(crate) fn narrow_bf16_into(src: &[f32], dst: &mut [std::mem::MaybeUninit<half::bf16>]) {
        for (d, &v) in dst.iter_mut().zip(src) {
            d.write(half::bf16::from_bits(round_bf16(v)));
        }
    }
}

/// `v` rounded to bf16's bits, as [`narrow_bf16`] rounds (both results computed, then one
/// chosen: no branch).
#[inline(always)]
pub(crate) fn round_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x40;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

impl Half for half::f16 {
    fn widen_all(src: &[Self], dst: &mut [f32]) {
        // The F16C instructions where the CPU has them.
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
    }

    fn narrow(v: f32) -> Self {
        half::f16::from_f32(v)
    }

    fn narrow_all(src: &[f32], dst: &mut [Self]) {
        let n = src.len().min(dst.len());
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut dst[..n], &src[..n]);
    }

    fn narrow_into(src: &[f32], dst: &mut [std::mem::MaybeUninit<Self>]) {
        for (d, &v) in dst.iter_mut().zip(src) {
            d.write(half::f16::from_f32(v));
        }
    }

    fn bf16s(_: &[Self]) -> Option<&[half::bf16]> {
        None
    }
}

/// A held tensor's CPU storage and the range of its contiguous values, checked to be `dims`.
#[allow(clippy::type_complexity)]
fn addend<'a, G: std::ops::Deref<Target = candle_core::Storage>>(
    held: &'a Option<(G, &Layout)>,
    dims: &[usize],
) -> candle_core::Result<Option<(&'a CpuStorage, std::ops::Range<usize>)>> {
    let Some((s, l)) = held else {
        return Ok(None);
    };
    match (&**s, l.contiguous_offsets()) {
        (candle_core::Storage::Cpu(s), Some((a, b))) if l.dims() == dims => Ok(Some((s, a..b))),
        _ => candle_core::bail!(
            "half-weight product: an addend must be a contiguous {dims:?} on the CPU"
        ),
    }
}

/// What a product adds to its f32 sums before their one rounding: a bias [n] on every row, and
/// a residual [m, n].
#[derive(Clone, Copy)]
struct Addends<'a, T> {
    bias: Option<&'a [T]>,
    residual: Option<&'a [T]>,
}

impl<T: Half> Addends<'_, T> {
    /// Adds columns j0.. of row i (rows of n) to `sums`.
    fn add_to(&self, sums: &mut [f32], i: usize, j0: usize, n: usize) {
        let at = j0..j0 + sums.len();
        if let Some(b) = self.bias {
            add_widened(sums, &b[at.clone()]);
        }
        if let Some(r) = self.residual {
            add_widened(sums, &r[i * n..][at]);
        }
    }

    /// The addends of rows i0.. .
    fn rows_after(self, i0: usize, n: usize) -> Self {
        Addends {
            bias: self.bias,
            residual: self.residual.map(|r| &r[i0 * n..]),
        }
    }
}

/// x [m, k] · w [n, k]ᵀ (+ the addends) in f32, rounded to `T` once.
fn multiply<T: Half>(
    x: &[T],
    w: &[T],
    add: Addends<T>,
    dims: (usize, usize, usize),
) -> candle_core::Result<Vec<T>> {
    multiply_with(
        crate::amx::available(),
        crate::blas::loaded_blas(),
        x,
        w,
        add,
        dims,
    )
}

/// [`multiply`] with AMX tiles where `tiles` (the CPU has them) and the operands are bf16, else
/// with `blas`, for products of more rows than a serving round's.
fn multiply_with<T: Half>(
    tiles: bool,
    blas: Option<&crate::blas::Blas>,
    x: &[T],
    w: &[T],
    add: Addends<T>,
    (m, n, k): (usize, usize, usize),
) -> candle_core::Result<Vec<T>> {
    use crate::few_rows::FEW_ROWS;
    if add.residual.is_some_and(|r| r.len() != m * n) || add.bias.is_some_and(|b| b.len() != n) {
        candle_core::bail!("half-weight product: the addends must hold {n} and {m} × {n} values");
    }
    if m > FEW_ROWS && tiles {
        if let (Some(xb), Some(wb)) = (T::bf16s(x), T::bf16s(w)) {
            let (ld, width) = (n.next_multiple_of(32), crate::amx::task_width(n));
            if let Some(mut sums) = crate::amx::product(xb, wb, (m, n, k), width) {
                // Each value of the output written once (not zeroed first).
                let mut out = Vec::with_capacity(m * n);
                out.spare_capacity_mut()[..m * n]
                    .par_chunks_mut(n)
                    .zip(sums.par_chunks_mut(ld))
                    .enumerate()
                    .for_each(|(i, (o, s))| {
                        add.add_to(&mut s[..n], i, 0, n);
                        T::narrow_into(&s[..n], o);
                    });
                // SAFETY: each of the m rows of n values was written above (`sums` holds at
                // least m rows of ld ≥ n, so every chunk of `out` had its row of sums).
                unsafe { out.set_len(m * n) };
                return Ok(out);
            }
        }
    }
    let mut xf = vec![0.0f32; m * k];
    T::widen_all(x, &mut xf);
    if m <= FEW_ROWS {
        return Ok(few_rows(&xf, w, add, (m, n, k)));
    }
    // More rows go through BLAS: blocks of w's rows widened over rayon's threads, each
    // multiplied while its core has it in cache; without BLAS, FEW_ROWS rows at a time.
    let Some(blas) = blas else {
        return Ok(xf
            .chunks(FEW_ROWS * k)
            .enumerate()
            .flat_map(|(i, rows)| {
                few_rows(
                    rows,
                    w,
                    add.rows_after(i * FEW_ROWS, n),
                    (rows.len() / k, n, k),
                )
            })
            .collect());
    };
    let blocks: Vec<Vec<f32>> = (0..n.div_ceil(BLOCK))
        .into_par_iter()
        .map(|b| {
            let (j0, nb) = (b * BLOCK, BLOCK.min(n - b * BLOCK));
            let mut wf = vec![0.0f32; nb * k];
            T::widen_all(&w[j0 * k..(j0 + nb) * k], &mut wf);
            crate::blas::product(blas, (m, nb, k), plain(&xf, k), transposed(&wf, k))
        })
        .collect::<candle_core::Result<_>>()?;
    // Each output row gathered from the blocks, the residual added, and rounded.
    let mut out = vec![T::narrow(0.0); m * n];
    out.par_chunks_mut(n).enumerate().for_each(|(i, o)| {
        let mut row = vec![0f32; n];
        for (b, y) in blocks.iter().enumerate() {
            let (j0, nb) = (b * BLOCK, BLOCK.min(n - b * BLOCK));
            row[j0..j0 + nb].copy_from_slice(&y[i * nb..(i + 1) * nb]);
        }
        add.add_to(&mut row, i, 0, n);
        T::narrow_all(&row, o);
    });
    Ok(out)
}

/// `acc[i] += r[i]` widened.
fn add_widened<T: Half>(acc: &mut [f32], r: &[T]) {
    for (a, &v) in acc.iter_mut().zip(r) {
        *a += v.widen();
    }
}

/// The few-row product (a decoding step's rows, a serving round's): tasks of
/// [`crate::few_rows::COLS_PER_TASK`] of w's rows on the polling team, each read once from
/// memory in its half type and widened in registers as the few-row kernel multiplies it
/// (widening each block into an f32 copy first took more of a decoding step than the
/// products: `lmkit generate --dtype bf16` on SmolLM2-135M 35.9 tokens/s, f32 47.6).
fn few_rows<T: Half>(
    xf: &[f32],
    w: &[T],
    add: Addends<T>,
    (m, n, k): (usize, usize, usize),
) -> Vec<T> {
    use crate::few_rows::COLS_PER_TASK as COLS;
    let mut out = vec![T::narrow(0.0); m * n];
    let dst = crate::blas::SharedOut(out.as_mut_ptr());
    crate::team::for_each(n.div_ceil(COLS), &|t| {
        let (j0, cols) = (t * COLS, COLS.min(n - t * COLS));
        let mut tile = [0f32; crate::few_rows::FEW_ROWS * COLS];
        let tile = &mut tile[..m * cols];
        crate::few_rows::dot_tile(xf, k, m, &w[j0 * k..], k, cols, k, tile, true);
        for (i, row) in tile.chunks_exact_mut(cols).enumerate() {
            add.add_to(row, i, j0, n);
            // SAFETY: task t alone writes columns j0..j0 + cols of the m rows of `out`, which
            // outlives the loop.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.at(i * n + j0), cols) };
            T::narrow_all(row, o);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The block product equals the widened operands' product rounded once, for both half types,
    /// shapes that leave partial blocks, one row, a few (the few-row kernel) and more (BLAS
    /// where loaded), and a batch axis; other operands are left to the caller.
    #[test]
    fn half_weight_products_equal_the_widened_product_rounded() {
        let dev = Device::Cpu;
        for dtype in [DType::BF16, DType::F16] {
            for (rows, k, n) in [(1, 37, 300), (5, 64, 129), (9, 130, 7), (40, 50, 130)] {
                let x = Tensor::randn(0f32, 1.0, (1, rows, k), &dev).unwrap();
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
                let (xh, wh) = (x.to_dtype(dtype).unwrap(), w.to_dtype(dtype).unwrap());
                let got = product(&xh, &wh.t().unwrap()).unwrap().expect("taken");
                assert_eq!(got.dims(), [1, rows, n]);
                assert_eq!(got.dtype(), dtype);
                let xw = xh.to_dtype(DType::F64).unwrap();
                let ww = wh.to_dtype(DType::F64).unwrap();
                let want = xw.broadcast_matmul(&ww.t().unwrap()).unwrap();
                let got = got.to_dtype(DType::F64).unwrap();
                let err: f64 = (got - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                let size: f64 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                // One rounding to the half type (bf16: 2⁻⁸ relative, f16: 2⁻¹¹) and f32 sums.
                let step = crate::testing::rounding_step(dtype);
                assert!(
                    err <= step * size,
                    "{dtype:?} {rows}x{k}x{n}: {err} of {size}"
                );
            }
        }
        // More rows than the few-row kernel takes, without BLAS (a few rows at a time), with
        // it and on AMX tiles (where the CPU has them; rows over more than one block of 32);
        // and a few rows; each with and without a residual added before the rounding.
        for m in [crate::few_rows::FEW_ROWS * 2 + 3, 37, 3] {
            let (n, k) = (70, 45);
            let x: Vec<half::bf16> = (0..m * k)
                .map(|i| half::bf16::from_f32((i % 7) as f32 - 3.0))
                .collect();
            let w: Vec<half::bf16> = (0..n * k)
                .map(|i| half::bf16::from_f32((i % 5) as f32 * 0.5))
                .collect();
            let r: Vec<half::bf16> = (0..m * n)
                .map(|i| half::bf16::from_f32((i % 11) as f32 * 0.25 - 1.0))
                .collect();
            let bias: Vec<half::bf16> = (0..n)
                .map(|j| half::bf16::from_f32((j % 3) as f32 - 1.0))
                .collect();
            let (b, rr) = (Some(&bias[..]), Some(&r[..]));
            for (bias, residual) in [(None, None), (None, rr), (b, rr), (b, None)] {
                let add = Addends { bias, residual };
                let got = multiply_with(false, None, &x, &w, add, (m, n, k)).unwrap();
                let blas = crate::blas::loaded_blas();
                let want = multiply_with(false, blas, &x, &w, add, (m, n, k)).unwrap();
                // Where the CPU has no AMX, the same way as `want`.
                let tiles = multiply_with(true, blas, &x, &w, add, (m, n, k)).unwrap();
                assert_eq!(got, tiles);
                assert_eq!(got.len(), m * n);
                for (i, g) in got.iter().enumerate() {
                    let (row, j) = (i / n, i % n);
                    let sum: f32 = (0..k)
                        .map(|q| x[row * k + q].to_f32() * w[j * k + q].to_f32())
                        .sum::<f32>()
                        + bias.map_or(0.0, |b| b[j].to_f32())
                        + residual.map_or(0.0, |r| r[i].to_f32());
                    // Small integers, halves and quarters: every sum is exact, and so is its
                    // rounding.
                    assert_eq!(
                        g.to_f32(),
                        half::bf16::from_f32(sum).to_f32(),
                        "{m} rows: row {row}, column {j}, bias {}, residual {}",
                        bias.is_some(),
                        residual.is_some()
                    );
                }
                assert_eq!(got, want);
            }
        }
        // Through the tensor entry point: r + x·wᵀ rounded once, and r of another shape
        // not taken.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 40), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (24, 40), &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (2, 3, 24), &dev).unwrap();
        let h = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let got = product_add(&h(&x), &h(&w).t().unwrap(), &h(&r))
            .unwrap()
            .expect("taken");
        let f = |t: &Tensor| h(t).to_dtype(DType::F32).unwrap();
        let want = (f(&x).broadcast_matmul(&f(&w).t().unwrap()).unwrap() + f(&r)).unwrap();
        let (got, want) = (
            got.flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= w.abs() / 256.0 + 1e-5, "{g} against {w}");
        }
        // And x·wᵀ + b.
        let b = Tensor::randn(0f32, 1.0, 24, &dev).unwrap();
        let got = product_bias(&h(&x), &h(&w).t().unwrap(), &h(&b))
            .unwrap()
            .expect("taken");
        let want = f(&x)
            .broadcast_matmul(&f(&w).t().unwrap())
            .unwrap()
            .broadcast_add(&f(&b))
            .unwrap();
        let got = got.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
        let want = want.flatten_all().unwrap();
        for (g, w) in got
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(want.to_vec1::<f32>().unwrap())
        {
            assert!((g - w).abs() <= w.abs() / 256.0 + 1e-5, "{g} against {w}");
        }
        let b2 = h(&b).narrow(0, 0, 20).unwrap();
        assert!(product_bias(&h(&x), &h(&w).t().unwrap(), &b2)
            .unwrap()
            .is_none());
        let r2 = h(&r).narrow(2, 0, 20).unwrap();
        assert!(product_add(&h(&x), &h(&w).t().unwrap(), &r2)
            .unwrap()
            .is_none());
        // Not a transposed contiguous weight, f32, or tracked: not taken.
        let x = Tensor::ones((2, 8), DType::BF16, &dev).unwrap();
        let w = Tensor::ones((8, 3), DType::BF16, &dev).unwrap();
        assert!(product(&x, &w).unwrap().is_none());
        let (x32, w32) = (
            x.to_dtype(DType::F32).unwrap(),
            w.to_dtype(DType::F32).unwrap(),
        );
        assert!(product(&x32, &w32.t().unwrap().t().unwrap())
            .unwrap()
            .is_none());
    }

    /// The vectorised bf16 rounding equals `half`'s, bit for bit: ties both ways, values next
    /// to the largest, infinities, subnormals, NaNs of both signs and a sweep of bit patterns.
    #[test]
    fn bf16_rounding_equals_half_s() {
        let mut bits: Vec<u32> = vec![
            0,
            0x8000_0000,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_8001,
            0x7f7f_ffff,
            0x7f7f_7fff,
            0xff7f_ffff,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0xffc0_0001,
            0x7f80_0001,
            0xff80_0001,
            0x0000_8000,
            0x0001_8000,
            0x8000_7fff,
        ];
        bits.extend((0..200_000u32).map(|i| i.wrapping_mul(2_654_435_761)));
        let src: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let mut got = vec![half::bf16::ZERO; src.len()];
        half::bf16::narrow_all(&src, &mut got);
        for (v, g) in src.iter().zip(&got) {
            assert_eq!(
                g.to_bits(),
                half::bf16::from_f32(*v).to_bits(),
                "{:#010x}",
                v.to_bits()
            );
        }
    }
}
