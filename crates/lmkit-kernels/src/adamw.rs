//! The AdamW update (Loshchilov & Hutter 2019, Algorithm 2; bias-corrected moments, Kingma & Ba
//! 2015) as in-place CPU passes, and the global gradient norm. The optimizer's state and its
//! composed fallback for other devices live in `lmkit_train::adamw`.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Storage, Tensor};
use rayon::prelude::*;

/// The coefficients of one update step.
pub struct Coeffs {
    pub beta1: f64,
    pub beta2: f64,
    pub bc1: f64,
    pub bc2: f64,
    pub eps: f64,
    pub lr: f64,
    /// 1 − lr·weight decay (1 for parameters without decay).
    pub keep: f64,
    /// Factor on the gradient (clipping).
    pub grad_scale: f64,
}

/// The contiguous f32 data of a CPU storage.
fn f32_data<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("adamw: contiguous f32 tensors only"),
    }
}

fn f32_data_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("adamw: contiguous f32 tensors only"),
    }
}

/// Elements per parallel task of the optimizer's passes.
const BLOCK: usize = 1 << 14;

/// In place: m ← β·m + (1 − β)·(s·g), or with (s·g)² for the second moment.
struct Moment {
    beta: f32,
    scale: f32,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "lmkit-adamw-moment"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (m, g) = (f32_data_mut(s1, l1)?, f32_data(s2, l2)?);
        let (b, ib, s) = (self.beta, 1.0 - self.beta, self.scale);
        m.par_chunks_mut(BLOCK)
            .zip(g.par_chunks(BLOCK))
            .for_each(|(m, g)| {
                if self.square {
                    m.iter_mut()
                        .zip(g)
                        .for_each(|(m, &g)| *m = b * *m + ib * ((s * g) * (s * g)));
                } else {
                    m.iter_mut()
                        .zip(g)
                        .for_each(|(m, &g)| *m = b * *m + ib * (s * g));
                }
            });
        Ok(())
    }
}

/// In place: θ ← keep·θ − lr·(m/bc1) / (√(v/bc2) + ε).
struct Apply {
    keep: f32,
    lr: f32,
    ibc1: f32,
    ibc2: f32,
    eps: f32,
}

impl InplaceOp3 for Apply {
    fn name(&self) -> &'static str {
        "lmkit-adamw-apply"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let th = f32_data_mut(s1, l1)?;
        let (m, v) = (f32_data(s2, l2)?, f32_data(s3, l3)?);
        th.par_chunks_mut(BLOCK)
            .zip(m.par_chunks(BLOCK).zip(v.par_chunks(BLOCK)))
            .for_each(|(th, (m, v))| {
                for ((t, &m), &v) in th.iter_mut().zip(m).zip(v) {
                    let update = (m * self.ibc1) / ((v * self.ibc2).sqrt() + self.eps);
                    *t = *t * self.keep - self.lr * update;
                }
            });
        Ok(())
    }
}

/// The AdamW update of one f32 CPU parameter as three in-place parallel passes (moments, then
/// θ) — no temporaries, where the composed version (`lmkit_train::adamw`) makes ~14 full-size ones per
/// parameter. `false` (nothing done) for other dtypes, devices or layouts.
pub fn fused_update(
    theta: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    k: &Coeffs,
) -> candle_core::Result<bool> {
    let n = theta.elem_count();
    let fits = [theta, g, m, v].iter().all(|t| {
        t.device().is_cpu()
            && t.dtype() == candle_core::DType::F32
            && t.is_contiguous()
            && t.elem_count() == n
    });
    if !fits {
        return Ok(false);
    }
    let scale = k.grad_scale as f32;
    let first = Moment {
        beta: k.beta1 as f32,
        scale,
        square: false,
    };
    m.inplace_op2(g, &first)?;
    let second = Moment {
        beta: k.beta2 as f32,
        scale,
        square: true,
    };
    v.inplace_op2(g, &second)?;
    let apply = Apply {
        keep: k.keep as f32,
        lr: k.lr as f32,
        ibc1: (1.0 / k.bc1) as f32,
        ibc2: (1.0 / k.bc2) as f32,
        eps: k.eps as f32,
    };
    theta.inplace_op3(m, v, &apply)?;
    Ok(true)
}

/// The global L2 norm of `grads` (summed in a fixed order: the same value every run).
pub fn grad_norm(grads: &[Tensor]) -> candle_core::Result<f64> {
    let mut total = 0.0f64;
    for g in grads {
        let fast = (g.device().is_cpu() && g.dtype() == candle_core::DType::F32).then(|| {
            let (st, l) = g.storage_and_layout();
            let Storage::Cpu(cs) = &*st else {
                return None;
            };
            let x = f32_data(cs, l).ok()?;
            let parts: Vec<f64> = x
                .par_chunks(BLOCK)
                .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
                .collect();
            Some(parts.iter().sum::<f64>())
        });
        total += match fast.flatten() {
            Some(s) => s,
            None => g
                .to_dtype(candle_core::DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?,
        };
    }
    Ok(total.sqrt())
}
