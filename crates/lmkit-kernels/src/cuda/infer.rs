//! Inference's steps on the GPU that candle's ops take in several launches: a linear layer's
//! product with its bias and the residual added in cuBLASLt's epilogue, and SwiGLU.

use super::{plain, transposed, Added, Data, Gpu, Mat};
use candle_core::{DType, Layout, Result, Tensor};

/// The rows of a tensor whose last dimension is contiguous and whose other dimensions step
/// evenly (a view of whole rows of a wider matrix): (rows, the elements between rows, at least
/// a row's: no broadcast rows).
fn even_rows(layout: &Layout) -> Option<(usize, usize)> {
    let (dims, strides) = (layout.dims(), layout.stride());
    let (&cols, outer) = dims.split_last()?;
    if strides.last() != Some(&1) {
        return None;
    }
    let rows: usize = outer.iter().product();
    let mut ld = None;
    let mut span = 1;
    for (&d, &s) in outer.iter().zip(strides).rev() {
        if d == 1 {
            continue;
        }
        match ld {
            None => ld = Some(s),
            Some(_) if s == span => {}
            Some(_) => return None,
        }
        span = s * d;
    }
    let ld = ld.unwrap_or(cols);
    (rows <= 1 || ld >= cols).then_some((rows, ld))
}

/// `x·w + b + r` (b and r each optional) on the GPU (with `cuda-emu` alone, the emulated GPU of
/// CPU tensors): one product with the bias and the residual added by cuBLASLt's epilogue where
/// the GPU's run-time check trusts it ([`Gpu::linear`]), in f32 or TF32 as candle's products
/// run ([`super::tf32_products`]), or in bf16 (f32 sums, the result rounded once). x [.., k]
/// (rows of one stride), w [k, n] (row-major, or the transpose of a row-major [n, k]: a weight
/// stored [out, in]), b [n], r of the output's shape (contiguous). `None` where they are not
/// all f32 or all bf16 tensors of one GPU, track gradients (no backward pass here) or are not
/// laid out so.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    r: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let Some(mut gpu) = Gpu::of(x.device()) else {
        return Ok(None);
    };
    gpu.bf16 = false;
    gpu.tf32 = super::tf32_products();
    let dtype = x.dtype();
    let operands = [Some(x), Some(w), b, r];
    let fits =
        |t: &Tensor| t.dtype() == dtype && t.device().same_device(x.device()) && !t.track_op();
    if !matches!(dtype, DType::F32 | DType::BF16)
        || !operands.iter().flatten().all(|t| fits(t))
        || w.rank() != 2
    {
        return Ok(None);
    }
    let (k, n) = w.dims2()?;
    let mut dims = x.dims().to_vec();
    match dims.last_mut() {
        Some(last) if *last == k && k > 0 && n > 0 => *last = n,
        _ => return Ok(None),
    }
    if b.is_some_and(|b| b.dims() != [n]) || r.is_some_and(|r| r.dims() != dims.as_slice()) {
        return Ok(None);
    }
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let Some((rows, ld_x)) = even_rows(xl) else {
        return Ok(None);
    };
    let (Some(xd), Some(wd)) = (Gpu::region_data(&xs, xl), Gpu::region_data(&ws, wl)) else {
        return Ok(None);
    };
    let w_mat: Mat = match *wl.stride() {
        [s0, 1] => plain(wd, if k > 1 { s0 } else { n }),
        [1, s1] => transposed(wd, if n > 1 { s1 } else { k }),
        _ => return Ok(None),
    };
    let contiguous = |t: Option<&Tensor>| -> Option<Option<Data>> {
        match t {
            None => Some(None),
            Some(t) => {
                let (s, l) = t.storage_and_layout();
                Gpu::view_data(&s, l).map(Some)
            }
        }
    };
    let (Some(bias), Some(residual)) = (contiguous(b), contiguous(r)) else {
        return Ok(None);
    };
    if rows == 0 {
        return Ok(None);
    }
    let out = gpu.stored(dtype == DType::BF16, rows * n)?;
    gpu.linear(
        (rows, n, k),
        plain(xd, ld_x),
        w_mat,
        Added { bias, residual },
        out.data(),
    )?;
    drop((xs, ws));
    gpu.stored_tensor(out, dims).map(Some)
}

/// silu(gate)·up in one launch on the GPU (with `cuda-emu` alone, the emulated GPU of CPU
/// tensors), gate and up read in place (the halves of a stacked gate|up projection), the
/// product in f32 (bf16 inputs give a bf16 output, rounded once); `None` where they are not
/// tensors of one shape and type (f32 or bf16) on a GPU, track gradients (the kernel has no
/// backward pass) or are not rows this reads.
pub fn swiglu_rows(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    let Some(gpu) = Gpu::of(gate.device()) else {
        return Ok(None);
    };
    let fits = matches!(gate.dtype(), DType::F32 | DType::BF16)
        && up.dtype() == gate.dtype()
        && up.dims() == gate.dims()
        && up.device().same_device(gate.device())
        && !gate.track_op()
        && !up.track_op();
    if !fits {
        return Ok(None);
    }
    let (gs, gl) = gate.storage_and_layout();
    let (us, ul) = up.storage_and_layout();
    let (Some((rows, ld_gate)), Some((_, ld_up))) = (even_rows(gl), even_rows(ul)) else {
        return Ok(None);
    };
    let (Some(g), Some(u)) = (Gpu::region_data(&gs, gl), Gpu::region_data(&us, ul)) else {
        return Ok(None);
    };
    let cols = gate.dim(candle_core::D::Minus1)?;
    let out = gpu.stored(gate.dtype() == DType::BF16, rows * cols)?;
    gpu.swiglu_rows(out.data(), (g, ld_gate), (u, ld_up), (rows, cols))?;
    drop((gs, us));
    gpu.stored_tensor(out, gate.dims()).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_diff, randn};

    /// No addend, the bias, the residual, both.
    fn addends<'a>(b: &'a Tensor, r: &'a Tensor) -> [(Option<&'a Tensor>, Option<&'a Tensor>); 4] {
        [
            (None, None),
            (Some(b), None),
            (None, Some(r)),
            (Some(b), Some(r)),
        ]
    }

    /// The f32 `product` plus b and r (each optional) in f32.
    fn plus(product: &Tensor, b: Option<&Tensor>, r: Option<&Tensor>) -> Tensor {
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let mut sum = product.clone();
        if let Some(b) = b {
            sum = sum.broadcast_add(&f32_of(b)).unwrap();
        }
        if let Some(r) = r {
            sum = (sum + f32_of(r)).unwrap();
        }
        sum
    }

    /// x·w + b + r against tensor ops, with and without the bias and the residual: a weight
    /// stored [out, in] (read transposed), one stored [in, out] and one of wider rows, x as rows
    /// of a wider matrix; a weight with neither axis contiguous and a tensor that tracks
    /// gradients are left to the caller.
    #[test]
    fn gpu_linear_equals_the_product_plus_bias_and_residual() {
        let Some(dev) = crate::testing::gpu_device() else {
            return;
        };
        let r = |s: &[usize]| randn(0f32, 1.0, s, &dev).unwrap();
        let (k, n) = (24, 40);
        let wide = r(&[2, 3, 2 * k]);
        let x = wide.narrow(2, k, k).unwrap();
        let w_out_in = r(&[n, k]);
        let bias = r(&[n]);
        let res = r(&[2, 3, n]);
        for w in [
            w_out_in.t().unwrap(),
            w_out_in.t().unwrap().contiguous().unwrap(),
        ] {
            // Contiguous operands: candle's CUDA products take no other layout.
            let product = x
                .contiguous()
                .unwrap()
                .broadcast_matmul(&w.contiguous().unwrap())
                .unwrap();
            for (b, rr) in addends(&bias, &res) {
                let want = plus(&product, b, rr);
                let got = linear(&x, &w, b, rr).unwrap().expect("f32 rows of the GPU");
                assert_eq!(got.dims(), [2, 3, n]);
                let d = max_diff(&got, &want);
                assert!(
                    d < 1e-4,
                    "bias {}, residual {}: {d}",
                    b.is_some(),
                    rr.is_some()
                );
            }
        }
        // Rows of a wider matrix as the weight: read in place.
        let rows = r(&[k, 2, n]).narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
        let got = linear(&x, &rows, None, None)
            .unwrap()
            .expect("rows of one stride");
        let want = x
            .contiguous()
            .unwrap()
            .broadcast_matmul(&rows.contiguous().unwrap())
            .unwrap();
        let d = max_diff(&got, &want);
        assert!(d < 1e-4, "a weight of wider rows: {d}");
        // Neither axis contiguous.
        let strided = r(&[k, n, 2]).narrow(2, 0, 1).unwrap().squeeze(2).unwrap();
        assert!(linear(&x, &strided, None, None).unwrap().is_none());
        let tracked = candle_core::Var::from_tensor(&x).unwrap();
        assert!(
            linear(tracked.as_tensor(), &w_out_in.t().unwrap(), None, None)
                .unwrap()
                .is_none()
        );
    }

    /// The halves of a stacked projection ([2, 3, 2·cols], and one row), up contiguous beside
    /// gate's wider rows; a transposed view that is not rows of one stride, broadcast rows and a
    /// tensor that tracks gradients are left to the caller.
    #[test]
    fn gpu_swiglu_rows_equals_silu_times_up() {
        let Some(dev) = crate::testing::gpu_device() else {
            return;
        };
        for dims in [[2usize, 3, 40], [1, 1, 24]] {
            let cols = dims[2];
            let gu = randn(0f32, 2.0, &[dims[0], dims[1], 2 * cols], &dev).unwrap();
            let (gate, up) = (
                gu.narrow(2, 0, cols).unwrap(),
                gu.narrow(2, cols, cols).unwrap(),
            );
            let got = swiglu_rows(&gate, &up).unwrap().expect("rows of the GPU");
            let want = (candle_nn::ops::silu(&gate).unwrap() * &up).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(max_diff(&got, &want) < 1e-6, "{dims:?}");
            // Rows of other strides: up contiguous.
            let up = up.contiguous().unwrap();
            let got = swiglu_rows(&gate, &up).unwrap().expect("rows of the GPU");
            assert!(max_diff(&got, &want) < 1e-6, "{dims:?}, up contiguous");
        }
        let x = randn(0f32, 1.0, &[4, 6], &dev).unwrap();
        assert!(swiglu_rows(&x.t().unwrap(), &x).unwrap().is_none());
        let row = randn(0f32, 1.0, &[1, 6], &dev).unwrap();
        let broadcast = row.broadcast_as((4, 6)).unwrap();
        assert!(swiglu_rows(&broadcast, &x).unwrap().is_none());
        let tracked = candle_core::Var::from_tensor(&x).unwrap();
        assert!(swiglu_rows(tracked.as_tensor(), &x).unwrap().is_none());
    }

    /// How far `got` (bf16) lies outside one bf16 rounding of `want` (f32): the largest
    /// |got − want| − |want|/256 (≤ 0 within it).
    fn past_one_rounding(got: &Tensor, want: &Tensor) -> f64 {
        assert_eq!(got.dtype(), DType::BF16);
        let got = got.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let want = want.flatten_all().unwrap();
        let (got, want) = (
            got.to_vec1::<f32>().unwrap(),
            want.to_vec1::<f32>().unwrap(),
        );
        got.iter()
            .zip(&want)
            .map(|(g, w)| ((g - w).abs() - w.abs() / 256.0) as f64)
            .fold(f64::NEG_INFINITY, f64::max)
    }

    /// bf16 tensors give bf16 outputs: x·w + b + r and silu(gate)·up summed in f32 from the bf16
    /// values and rounded once (within one bf16 rounding of the f32 result on those values),
    /// views read in place; mixed types are left to the caller.
    #[test]
    fn gpu_bf16_linear_and_swiglu_round_the_f32_results_once() {
        let Some(dev) = crate::testing::gpu_device() else {
            return;
        };
        let r = |s: &[usize]| {
            randn(0f32, 1.0, s, &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let (k, n) = (40, 24);
        let wide = r(&[2, 3, 2 * k]);
        let x = wide.narrow(2, k, k).unwrap();
        let w = r(&[n, k]).t().unwrap();
        let (bias, res) = (r(&[n]), r(&[2, 3, n]));
        let product = f32_of(&x).broadcast_matmul(&f32_of(&w)).unwrap();
        for (b, rr) in addends(&bias, &res) {
            let want = plus(&product, b, rr);
            let got = linear(&x, &w, b, rr)
                .unwrap()
                .expect("bf16 rows of the GPU");
            assert_eq!(got.dims(), [2, 3, n]);
            let past = past_one_rounding(&got, &want);
            assert!(
                past < 1e-6,
                "bias {}, residual {}: {past}",
                b.is_some(),
                rr.is_some()
            );
        }
        let res32 = f32_of(&res);
        assert!(linear(&x, &w, None, Some(&res32)).unwrap().is_none());
        let gu = r(&[2, 3, 2 * n]);
        let (gate, up) = (gu.narrow(2, 0, n).unwrap(), gu.narrow(2, n, n).unwrap());
        let got = swiglu_rows(&gate, &up)
            .unwrap()
            .expect("bf16 rows of the GPU");
        let want = (candle_nn::ops::silu(&f32_of(&gate)).unwrap() * f32_of(&up)).unwrap();
        let past = past_one_rounding(&got, &want);
        assert!(past < 1e-6, "swiglu: {past}");
        assert!(swiglu_rows(&gate, &f32_of(&up)).unwrap().is_none());
    }
}
