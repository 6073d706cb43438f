//! Inference in a half type (bf16, f16) on the CPU for the fused element-wise and row-wise
//! kernels (SwiGLU, the GELUs, sums, RMSNorm, LayerNorm, rotary embedding) and the conversions
//! to and from f32: each task widens its tile of the inputs into f32, runs the f32 kernel of
//! [`crate::fused`] on it and rounds the result once. candle's ops in these types are a chain of composed ops, each
//! converting element by element and rounding its output (a bf16 prompt of SmolLM2-135M spent
//! about a fifth of its time in them and in candle's single-threaded conversions).
//!
//! Each entry point returns `None` (the caller composes the op another way) unless every operand
//! is in one half type on the CPU and none tracks a gradient: these have no backward pass.

use crate::half_weights::Half;
use candle_core::{DType, Device, Storage, Tensor, D};
use rayon::prelude::*;

/// Values per task (whole rows: at least one row).
const TILE: usize = 1 << 13;

/// Whether `x` and `others` are one half type on the CPU, tracking no gradient.
fn half_inference(x: &Tensor, others: &[&Tensor]) -> bool {
    let fits = |t: &Tensor| t.dtype() == x.dtype() && t.device().is_cpu() && !t.track_op();
    matches!(x.dtype(), DType::BF16 | DType::F16) && fits(x) && others.iter().all(|t| fits(t))
}

/// The contiguous values of CPU tensors of type `T`, handed to `f`.
fn with_values<T: Half, R>(ts: &[&Tensor], f: impl FnOnce(&[&[T]]) -> R) -> candle_core::Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut values = Vec::with_capacity(ts.len());
    for (storage, layout) in &guards {
        let (Storage::Cpu(s), Some((a, b))) = (&**storage, layout.contiguous_offsets()) else {
            candle_core::bail!("half-type kernel: contiguous CPU tensors expected");
        };
        values.push(&s.as_slice::<T>()?[a..b]);
    }
    Ok(f(&values))
}

/// A new `T` vector of `xs[0]`'s length: tasks of whole rows of `width` values, each widening
/// its rows of every input into f32, calling `f(first row, inputs, output)` and rounding the
/// output once.
fn through_f32<T: Half>(
    xs: &[&[T]],
    width: usize,
    f: impl Fn(usize, &[Vec<f32>], &mut [f32]) + Sync,
) -> Vec<T> {
    let len = xs.first().map_or(0, |x| x.len());
    let rows = (TILE / width.max(1)).max(1);
    let chunk = rows * width.max(1);
    let mut out = vec![T::narrow(0.0); len];
    out.par_chunks_mut(chunk).enumerate().for_each(|(i, o)| {
        let at = i * chunk..i * chunk + o.len();
        let inputs: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| {
                let mut b = vec![0f32; o.len()];
                T::widen_all(&x[at.clone()], &mut b);
                b
            })
            .collect();
        let mut y = vec![0f32; o.len()];
        f(i * rows, &inputs, &mut y);
        T::narrow_all(&y, o);
    });
    out
}

/// `x` widened (f32) or rounded (a half type) into `dtype`, in parallel tiles; `None` where `x`
/// is not a CPU tensor tracking no gradient, or the conversion is not between f32 and a half
/// type.
pub fn convert(x: &Tensor, dtype: DType) -> candle_core::Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.track_op() {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let shape = x.shape().clone();
    let y = match (x.dtype(), dtype) {
        (DType::BF16, DType::F32) => widen::<half::bf16>(&x)?,
        (DType::F16, DType::F32) => widen::<half::f16>(&x)?,
        (DType::F32, DType::BF16) => narrow::<half::bf16>(&x)?,
        (DType::F32, DType::F16) => narrow::<half::f16>(&x)?,
        _ => return Ok(None),
    };
    y.reshape(shape).map(Some)
}

fn widen<T: Half>(x: &Tensor) -> candle_core::Result<Tensor> {
    let v = with_values::<T, _>(&[x], |v| {
        let mut out = vec![0f32; v[0].len()];
        out.par_chunks_mut(TILE)
            .zip(v[0].par_chunks(TILE))
            .for_each(|(o, x)| T::widen_all(x, o));
        out
    })?;
    Tensor::from_vec(v, x.elem_count(), &Device::Cpu)
}

fn narrow<T: Half>(x: &Tensor) -> candle_core::Result<Tensor> {
    let v = {
        let (storage, layout) = x.storage_and_layout();
        let (Storage::Cpu(s), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
            candle_core::bail!("half-type kernel: a contiguous CPU tensor expected");
        };
        let x = &s.as_slice::<f32>()?[a..b];
        let mut out = vec![T::narrow(0.0); x.len()];
        out.par_chunks_mut(TILE)
            .zip(x.par_chunks(TILE))
            .for_each(|(o, x)| T::narrow_all(x, o));
        out
    };
    Tensor::from_vec(v, x.elem_count(), &Device::Cpu)
}

/// `f` of `x` widened to f32, its result rounded back to `x`'s half type: for a half-type tensor
/// on the CPU tracking no gradient, so that an f32-only kernel (the scoring passes' attention
/// straight from the projections) serves a half-type model too. `None` for other tensors, or
/// where `f` gives `None`.
pub fn in_f32(
    x: &Tensor,
    f: impl FnOnce(&Tensor) -> candle_core::Result<Option<Tensor>>,
) -> candle_core::Result<Option<Tensor>> {
    if !half_inference(x, &[]) {
        return Ok(None);
    }
    let Some(wide) = convert(x, DType::F32)? else {
        return Ok(None);
    };
    match f(&wide)? {
        Some(y) => convert(&y, x.dtype()),
        None => Ok(None),
    }
}

/// Runs `go::<bf16>` or `go::<f16>` by `x`'s type and shapes the result as `x`.
macro_rules! by_type {
    ($x:expr, $go:ident ( $($arg:expr),* )) => {{
        let v = match $x.dtype() {
            DType::BF16 => Tensor::from_vec($go::<half::bf16>($($arg),*)?, $x.shape(), &Device::Cpu)?,
            DType::F16 => Tensor::from_vec($go::<half::f16>($($arg),*)?, $x.shape(), &Device::Cpu)?,
            _ => return Ok(None),
        };
        Ok(Some(v))
    }};
}

/// silu(gate)·up, rounded once (see [`crate::fused::swiglu`]).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !half_inference(gate, &[up]) || up.dims() != gate.dims() {
        return Ok(None);
    }
    let (g, u) = (gate.contiguous()?, up.contiguous()?);
    fn go<T: Half>(g: &Tensor, u: &Tensor) -> candle_core::Result<Vec<T>> {
        with_values::<T, _>(&[g, u], |v| {
            through_f32(v, 1, |_, x, o| crate::fused::swiglu_block(&x[0], &x[1], o))
        })
    }
    by_type!(gate, go(&g, &u))
}

/// RMSNorm over the last dim with weight `w` [n] (see [`crate::fused::rms_norm`]).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Option<Tensor>> {
    let n = x.dim(D::Minus1)?;
    if !half_inference(x, &[w]) || w.dims() != [n] || n == 0 {
        return Ok(None);
    }
    let (xc, wc) = (x.contiguous()?, w.contiguous()?);
    fn go<T: Half>(x: &Tensor, w: &Tensor, n: usize, eps: f64) -> candle_core::Result<Vec<T>> {
        with_values::<T, _>(&[x, w], |v| {
            let mut wf = vec![0f32; n];
            T::widen_all(v[1], &mut wf);
            through_f32(&v[..1], n, |_, x, o| {
                crate::fused::rms_norm_block(o, &x[0], &wf, eps as f32)
            })
        })
    }
    by_type!(x, go(&xc, &wc, n, eps))
}

/// The tanh GELU (see [`crate::fused::gelu_tanh`]).
pub fn gelu_tanh(x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    elementwise(x, crate::fused::gelu_block)
}

/// The exact GELU (see [`crate::fused::gelu_erf`]).
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    elementwise(x, crate::fused::gelu_erf_block)
}

/// `f` (an f32 block kernel) on every value of `x`.
fn elementwise(x: &Tensor, f: fn(&[f32], &mut [f32])) -> candle_core::Result<Option<Tensor>> {
    if !half_inference(x, &[]) {
        return Ok(None);
    }
    let xc = x.contiguous()?;
    fn go<T: Half>(x: &Tensor, f: fn(&[f32], &mut [f32])) -> candle_core::Result<Vec<T>> {
        with_values::<T, _>(&[x], |v| through_f32(v, 1, |_, x, o| f(&x[0], o)))
    }
    by_type!(x, go(&xc, f))
}

/// `a + b` (same shapes), the sum rounded once.
pub fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !half_inference(a, &[b]) || a.dims() != b.dims() {
        return Ok(None);
    }
    let (ac, bc) = (a.contiguous()?, b.contiguous()?);
    fn go<T: Half>(a: &Tensor, b: &Tensor) -> candle_core::Result<Vec<T>> {
        with_values::<T, _>(&[a, b], |v| {
            through_f32(v, 1, |_, x, o| {
                for ((o, &p), &q) in o.iter_mut().zip(&x[0]).zip(&x[1]) {
                    *o = p + q;
                }
            })
        })
    }
    by_type!(a, go(&ac, &bc))
}

/// LayerNorm over the last dim with weight `w` and bias `b` [n] (see
/// [`crate::fused::layer_norm`]).
pub fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> candle_core::Result<Option<Tensor>> {
    let n = x.dim(D::Minus1)?;
    if !half_inference(x, &[w, b]) || w.dims() != [n] || b.dims() != [n] || n == 0 {
        return Ok(None);
    }
    let (xc, wc, bc) = (x.contiguous()?, w.contiguous()?, b.contiguous()?);
    fn go<T: Half>(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        n: usize,
        eps: f64,
    ) -> candle_core::Result<Vec<T>> {
        with_values::<T, _>(&[x, w, b], |v| {
            let (mut wf, mut bf) = (vec![0f32; n], vec![0f32; n]);
            T::widen_all(v[1], &mut wf);
            T::widen_all(v[2], &mut bf);
            through_f32(&v[..1], n, |_, x, o| {
                crate::fused::layer_norm_block(o, &x[0], &wf, &bf, eps as f32)
            })
        })
    }
    by_type!(x, go(&xc, &wc, &bc, n, eps))
}

/// Rotary embedding of x [.., t, d] with cos/sin [t, d/2] (see [`crate::fused::rope`]).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let dims = x.dims();
    let (r, d) = (dims.len(), *dims.last().unwrap_or(&0));
    if !half_inference(x, &[cos, sin]) || r < 2 || d == 0 || d % 2 != 0 {
        return Ok(None);
    }
    let t = dims[r - 2];
    if [cos, sin].iter().any(|c| c.dims() != [t, d / 2]) {
        return Ok(None);
    }
    let (xc, cc, sc) = (x.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    fn go<T: Half>(
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        (t, d): (usize, usize),
    ) -> candle_core::Result<Vec<T>> {
        with_values::<T, _>(&[x, cos, sin], |v| {
            let table = |s: &[T]| {
                let mut f = vec![0f32; s.len()];
                T::widen_all(s, &mut f);
                f
            };
            let (c, s) = (table(v[1]), table(v[2]));
            through_f32(&v[..1], d, |row, x, o| {
                crate::fused::rope_block(o, &x[0], &c, &s, t, row, 1.0)
            })
        })
    }
    by_type!(x, go(&xc, &cc, &sc, (t, d)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::values;

    fn rounded(t: &Tensor, dtype: DType) -> Tensor {
        t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap()
    }

    /// Each op on half-type inputs equals the f32 fused kernel on the same (rounded) inputs,
    /// rounded once: within one rounding step of the type. Shapes with several tasks' rows and a
    /// partial last task, both types; rope's rows see their own positions.
    #[test]
    fn half_type_ops_equal_the_f32_kernels_rounded_once() {
        let dev = Device::Cpu;
        for dtype in [DType::BF16, DType::F16] {
            let step = crate::testing::rounding_step(dtype);
            let check = |got: Option<Tensor>, want: Tensor, what: &str| {
                let got = got.expect(what);
                assert_eq!(got.dtype(), dtype, "{what}");
                assert_eq!(got.dims(), want.dims(), "{what}");
                for (i, (g, w)) in values(&got).iter().zip(values(&want)).enumerate() {
                    assert!(
                        // f16's subnormals are 2⁻²⁴ apart.
                        (g - w).abs() <= w.abs() * step + 6e-8,
                        "{dtype:?} {what} [{i}]: {g} against {w}"
                    );
                }
            };
            let x = Tensor::randn(0f32, 2.0, (3, 37, 1000), &dev).unwrap();
            let u = Tensor::randn(0f32, 1.0, (3, 37, 1000), &dev).unwrap();
            let (xh, uh) = (x.to_dtype(dtype).unwrap(), u.to_dtype(dtype).unwrap());
            let (xr, ur) = (rounded(&x, dtype), rounded(&u, dtype));
            check(
                swiglu(&xh, &uh).unwrap(),
                crate::fused::swiglu(&xr, &ur).unwrap(),
                "swiglu",
            );
            check(
                gelu_tanh(&xh).unwrap(),
                crate::fused::gelu_tanh(&xr).unwrap(),
                "gelu_tanh",
            );
            check(
                gelu_erf(&xh).unwrap(),
                crate::fused::gelu_erf(&xr).unwrap(),
                "gelu_erf",
            );
            check(add(&xh, &uh).unwrap(), (&xr + &ur).unwrap(), "add");
            let w = Tensor::randn(1f32, 0.3, 1000, &dev).unwrap();
            let b = Tensor::randn(0f32, 0.3, 1000, &dev).unwrap();
            check(
                layer_norm(
                    &xh,
                    &w.to_dtype(dtype).unwrap(),
                    &b.to_dtype(dtype).unwrap(),
                    1e-5,
                )
                .unwrap(),
                crate::fused::layer_norm(&xr, &rounded(&w, dtype), &rounded(&b, dtype), 1e-5)
                    .unwrap()
                    .unwrap(),
                "layer_norm",
            );
            check(
                rms_norm(&xh, &w.to_dtype(dtype).unwrap(), 1e-5).unwrap(),
                crate::fused::rms_norm(&xr, &rounded(&w, dtype), 1e-5)
                    .unwrap()
                    .unwrap(),
                "rms_norm",
            );
            let (t, d) = (37, 64);
            let q = Tensor::randn(0f32, 1.0, (2, 5, t, d), &dev).unwrap();
            let theta = Tensor::randn(0f32, 3.0, (t, d / 2), &dev).unwrap();
            let (cos, sin) = (theta.cos().unwrap(), theta.sin().unwrap());
            let h = |t: &Tensor| t.to_dtype(dtype).unwrap();
            check(
                rope(&h(&q), &h(&cos), &h(&sin)).unwrap(),
                crate::fused::rope(
                    &rounded(&q, dtype),
                    &rounded(&cos, dtype),
                    &rounded(&sin, dtype),
                )
                .unwrap()
                .unwrap(),
                "rope",
            );
            // Conversions: widening is exact, rounding as candle's.
            let wide = convert(&xh, DType::F32).unwrap().unwrap();
            assert_eq!(wide.dtype(), DType::F32);
            assert_eq!(values(&wide), values(&xh));
            let narrow = convert(&x, dtype).unwrap().unwrap();
            assert_eq!(narrow.dims(), x.dims());
            assert_eq!(values(&narrow), values(&xh));
        }
    }

    /// f32 inputs, mixed types, mismatched shapes and tracked tensors are left to the caller.
    #[test]
    fn what_the_half_type_ops_do_not_take() {
        let dev = Device::Cpu;
        let x = Tensor::ones((4, 8), DType::F32, &dev).unwrap();
        let xh = x.to_dtype(DType::BF16).unwrap();
        let w = Tensor::ones(8, DType::BF16, &dev).unwrap();
        assert!(swiglu(&x, &x).unwrap().is_none());
        assert!(swiglu(&xh, &x).unwrap().is_none());
        assert!(swiglu(&xh, &xh.narrow(1, 0, 4).unwrap()).unwrap().is_none());
        assert!(rms_norm(&xh, &w.narrow(0, 0, 4).unwrap(), 1e-5)
            .unwrap()
            .is_none());
        assert!(rms_norm(&xh, &w.to_dtype(DType::F16).unwrap(), 1e-5)
            .unwrap()
            .is_none());
        let tracked = candle_core::Var::from_tensor(&xh).unwrap();
        assert!(swiglu(tracked.as_tensor(), &xh).unwrap().is_none());
        assert!(convert(tracked.as_tensor(), DType::F32).unwrap().is_none());
        assert!(convert(&xh, DType::F16).unwrap().is_none());
        let cs = Tensor::ones((4, 3), DType::BF16, &dev).unwrap();
        assert!(rope(&xh, &cs, &cs).unwrap().is_none());
    }
}
