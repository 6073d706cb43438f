//! Inference's element-wise steps on the GPU that candle's ops take in several launches.

use super::Gpu;
use candle_core::{DType, Layout, Result, Tensor};

/// The rows of a tensor whose last dimension is contiguous and whose other dimensions step
/// evenly (a view of whole rows of a wider matrix): (rows, the elements between rows).
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
    Some((rows, ld.unwrap_or(cols)))
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

    /// The halves of a stacked projection ([2, 3, 2·cols], and one row), up contiguous beside
    /// gate's wider rows; a transposed view that is not rows of one stride and a tensor that
    /// tracks gradients are left to the caller.
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
        let tracked = candle_core::Var::from_tensor(&x).unwrap();
        assert!(swiglu_rows(tracked.as_tensor(), &x).unwrap().is_none());
    }
}
