//! Products with half-precision (bf16 or f16) weights on the CPU, for models loaded in a half
//! type: the weight's rows are widened to f32 a block at a time, each block while the core
//! that multiplies it has it in cache, instead of the whole matrix into a new f32 copy for
//! every product (which doubled the memory the half type saves and made a decoding step of a
//! 135M-parameter model spend most of its time writing and reading that copy). Products
//! accumulate in f32 and the result is rounded once, as PyTorch's CPU products in these types.

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
    let m = x.elem_count() / k;
    let y = x
        .reshape((m, k))?
        .contiguous()?
        .apply_op2_no_bwd(&w, &HalfProduct)?;
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    y.reshape(dims).map(Some)
}

/// [m, k] · [n, k]ᵀ → [m, n], all in one half type (see [`product`]).
struct HalfProduct;

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
        let slices = |a: &Layout, b: &Layout| match (a.contiguous_offsets(), b.contiguous_offsets())
        {
            (Some(a), Some(b)) => Ok((a.0..a.1, b.0..b.1)),
            _ => candle_core::bail!("half-weight product: operands must be contiguous"),
        };
        let (r1, r2) = slices(l1, l2)?;
        let y = match (s1, s2) {
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => {
                CpuStorage::BF16(multiply(&x[r1], &w[r2], (m, n, k))?)
            }
            (CpuStorage::F16(x), CpuStorage::F16(w)) => {
                CpuStorage::F16(multiply(&x[r1], &w[r2], (m, n, k))?)
            }
            _ => candle_core::bail!("half-weight product: operands of one half type expected"),
        };
        Ok((y, Shape::from((m, n))))
    }
}

/// A half type: widened to f32 and rounded back.
trait Half: crate::few_rows::WeightValue {
    fn widen_all(src: &[Self], dst: &mut [f32]);
    fn narrow(v: f32) -> Self;
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
}

impl Half for half::f16 {
    fn widen_all(src: &[Self], dst: &mut [f32]) {
        // The F16C instructions where the CPU has them.
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
    }

    fn narrow(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

/// x [m, k] · w [n, k]ᵀ in f32, rounded to `T` once.
fn multiply<T: Half>(x: &[T], w: &[T], dims: (usize, usize, usize)) -> candle_core::Result<Vec<T>> {
    multiply_with(crate::blas::loaded_blas(), x, w, dims)
}

/// [`multiply`] with `blas` for products of more rows than a serving round's.
fn multiply_with<T: Half>(
    blas: Option<&crate::blas::Blas>,
    x: &[T],
    w: &[T],
    (m, n, k): (usize, usize, usize),
) -> candle_core::Result<Vec<T>> {
    use crate::few_rows::FEW_ROWS;
    let mut xf = vec![0.0f32; m * k];
    T::widen_all(x, &mut xf);
    if m <= FEW_ROWS {
        return Ok(few_rows(&xf, w, (m, n, k)));
    }
    // More rows go through BLAS: blocks of w's rows widened over rayon's threads, each
    // multiplied while its core has it in cache; without BLAS, FEW_ROWS rows at a time.
    let Some(blas) = blas else {
        return Ok(xf
            .chunks(FEW_ROWS * k)
            .flat_map(|rows| few_rows(rows, w, (rows.len() / k, n, k)))
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
    let mut out = vec![T::narrow(0.0); m * n];
    for (b, y) in blocks.iter().enumerate() {
        let (j0, nb) = (b * BLOCK, BLOCK.min(n - b * BLOCK));
        for (i, row) in y.chunks_exact(nb).enumerate() {
            for (o, &v) in out[i * n + j0..i * n + j0 + nb].iter_mut().zip(row) {
                *o = T::narrow(v);
            }
        }
    }
    Ok(out)
}

/// The few-row product (a decoding step's rows, a serving round's): tasks of
/// [`crate::few_rows::COLS_PER_TASK`] of w's rows on the polling team, each read once from
/// memory in its half type and widened in registers as the few-row kernel multiplies it
/// (widening each block into an f32 copy first took more of a decoding step than the
/// products: `lmkit generate --dtype bf16` on SmolLM2-135M 35.9 tokens/s, f32 47.6).
fn few_rows<T: Half>(xf: &[f32], w: &[T], (m, n, k): (usize, usize, usize)) -> Vec<T> {
    use crate::few_rows::COLS_PER_TASK as COLS;
    let mut out = vec![T::narrow(0.0); m * n];
    let dst = crate::blas::SharedOut(out.as_mut_ptr());
    crate::team::for_each(n.div_ceil(COLS), &|t| {
        let (j0, cols) = (t * COLS, COLS.min(n - t * COLS));
        let mut tile = [0f32; crate::few_rows::FEW_ROWS * COLS];
        let tile = &mut tile[..m * cols];
        crate::few_rows::dot_tile(xf, k, m, &w[j0 * k..], k, cols, k, tile, true);
        for (i, row) in tile.chunks_exact(cols).enumerate() {
            // SAFETY: task t alone writes columns j0..j0 + cols of the m rows of `out`, which
            // outlives the loop.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.at(i * n + j0), cols) };
            for (o, &v) in o.iter_mut().zip(row) {
                *o = T::narrow(v);
            }
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
                let step = if dtype == DType::BF16 {
                    1.0 / 256.0
                } else {
                    1.0 / 2048.0
                };
                assert!(
                    err <= step * size,
                    "{dtype:?} {rows}x{k}x{n}: {err} of {size}"
                );
            }
        }
        // More rows than the few-row kernel takes, without BLAS: a few rows at a time.
        let (m, n, k) = (crate::few_rows::FEW_ROWS * 2 + 3, 70, 45);
        let x: Vec<half::bf16> = (0..m * k)
            .map(|i| half::bf16::from_f32((i % 7) as f32 - 3.0))
            .collect();
        let w: Vec<half::bf16> = (0..n * k)
            .map(|i| half::bf16::from_f32((i % 5) as f32 * 0.5))
            .collect();
        let got = multiply_with(None, &x, &w, (m, n, k)).unwrap();
        let want = multiply_with(crate::blas::loaded_blas(), &x, &w, (m, n, k)).unwrap();
        assert_eq!(got.len(), m * n);
        for (i, g) in got.iter().enumerate() {
            let (r, j) = (i / n, i % n);
            let sum: f32 = (0..k)
                .map(|q| x[r * k + q].to_f32() * w[j * k + q].to_f32())
                .sum();
            // Small integers and halves: every sum is exact, and so is its rounding.
            assert_eq!(
                g.to_f32(),
                half::bf16::from_f32(sum).to_f32(),
                "row {r}, column {j}"
            );
        }
        assert_eq!(got, want);
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
}
