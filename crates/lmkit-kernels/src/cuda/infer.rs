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
/// run ([`super::tf32_products`]). x [.., k] (rows of one stride), w [k, n] (row-major, or the
/// transpose of a row-major [n, k]: a weight stored [out, in]), b [n], r of the output's shape
/// (contiguous). `None` where they are not f32 tensors of one GPU, track gradients (no backward
/// pass here) or are not laid out so.
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
    let operands = [Some(x), Some(w), b, r];
    let fits =
        |t: &Tensor| t.dtype() == DType::F32 && t.device().same_device(x.device()) && !t.track_op();
    if !operands.iter().flatten().all(|t| fits(t)) || w.rank() != 2 {
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
    let (Some(xd), Some(wd)) = (Gpu::region(&xs, xl), Gpu::region(&ws, wl)) else {
        return Ok(None);
    };
    let w_mat: Mat = match *wl.stride() {
        [s0, 1] => plain(wd, if k > 1 { s0 } else { n }),
        [1, s1] => transposed(wd, if n > 1 { s1 } else { k }),
        _ => return Ok(None),
    };
    let contiguous = |t: Option<&Tensor>| -> Option<Option<super::Dev<f32>>> {
        match t {
            None => Some(None),
            Some(t) => {
                let (s, l) = t.storage_and_layout();
                Gpu::view(&s, l).map(Some)
            }
        }
    };
    let (Some(bias), Some(residual)) = (contiguous(b), contiguous(r)) else {
        return Ok(None);
    };
    if rows == 0 {
        return Ok(None);
    }
    let out = gpu.uninit(rows * n)?;
    gpu.linear(
        (rows, n, k),
        plain(xd, ld_x),
        w_mat,
        Added { bias, residual },
        Data::F32(out.dev()),
    )?;
    drop((xs, ws));
    gpu.into_tensor(out, dims).map(Some)
}

/// silu(gate)·up in one launch on the GPU (with `cuda-emu` alone, the emulated GPU of CPU
/// tensors), gate and up read in place (the halves of a stacked gate|up projection); `None`
/// where they are not f32 tensors of one shape on a GPU, track gradients (the kernel has no
/// backward pass) or are not rows this reads.
pub fn swiglu_rows(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    let Some(gpu) = Gpu::of(gate.device()) else {
        return Ok(None);
    };
    let fits = gate.dtype() == DType::F32
        && up.dtype() == DType::F32
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
    let (Some(g), Some(u)) = (Gpu::region(&gs, gl), Gpu::region(&us, ul)) else {
        return Ok(None);
    };
    let cols = gate.dim(candle_core::D::Minus1)?;
    let out = gpu.uninit(rows * cols)?;
    gpu.swiglu_rows(out.dev(), (g, ld_gate), (u, ld_up), (rows, cols))?;
    drop((gs, us));
    gpu.into_tensor(out, gate.dims()).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_diff, randn};

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
            let product = x.broadcast_matmul(&w).unwrap();
            for (b, rr) in [
                (None, None),
                (Some(&bias), None),
                (None, Some(&res)),
                (Some(&bias), Some(&res)),
            ] {
                let mut want = product.clone();
                if let Some(b) = b {
                    want = want.broadcast_add(b).unwrap();
                }
                if let Some(rr) = rr {
                    want = (want + rr).unwrap();
                }
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
        let d = max_diff(&got, &x.broadcast_matmul(&rows).unwrap());
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
}
