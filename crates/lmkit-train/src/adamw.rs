//! AdamW with decoupled weight decay (Loshchilov & Hutter 2019, Algorithm 2) and bias-corrected
//! moments (Kingma & Ba 2015). Its state (moments, step) is plain tensors so that a checkpoint can
//! save and restore it exactly.

use candle_core::{CpuStorage, Storage, Tensor, Var};
use rayon::prelude::*;

pub struct Param {
    pub name: String,
    pub var: Var,
    pub decay: bool,
}

pub struct AdamW {
    pub params: Vec<Param>,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub step: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(
        params: Vec<Param>,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> candle_core::Result<Self> {
        let m = params
            .iter()
            .map(|p| p.var.zeros_like())
            .collect::<candle_core::Result<_>>()?;
        let v = params
            .iter()
            .map(|p| p.var.zeros_like())
            .collect::<candle_core::Result<_>>()?;
        Ok(AdamW {
            params,
            m,
            v,
            step: 0,
            beta1,
            beta2,
            eps,
            weight_decay,
        })
    }

    /// One update with gradients `grads` (aligned with `params`) at learning rate `lr`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> candle_core::Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        for (i, p) in self.params.iter().enumerate() {
            let decay = if p.decay { self.weight_decay } else { 0.0 };
            let k = Coeffs {
                beta1: self.beta1,
                beta2: self.beta2,
                bc1,
                bc2,
                eps: self.eps,
                lr,
                keep: 1.0 - lr * decay,
            };
            if let Some((theta, m, v)) =
                fused_update(p.var.as_tensor(), &grads[i], &self.m[i], &self.v[i], &k)?
            {
                p.var.set(&theta)?;
                self.m[i] = m;
                self.v[i] = v;
                continue;
            }
            // Gradients come out of backward with the op graph of the whole step attached;
            // moments built on them would keep every step's activations alive. Detach.
            let g = &grads[i].detach();
            let m = ((&self.m[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?.detach();
            let v = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?.detach();
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.eps)?)?;
            let mut theta = p.var.as_tensor().clone();
            if p.decay && self.weight_decay > 0.0 {
                theta = (&theta * (1.0 - lr * self.weight_decay))?;
            }
            p.var.set(&(theta - (update * lr)?)?.detach())?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

struct Coeffs {
    beta1: f64,
    beta2: f64,
    bc1: f64,
    bc2: f64,
    eps: f64,
    lr: f64,
    /// 1 − lr·weight decay (1 for parameters without decay).
    keep: f64,
}

/// Runs `f` on the contiguous data of each tensor when all are f32 on the CPU, of equal length.
fn with_f32_slices<const N: usize, R>(
    ts: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> R,
) -> Option<R> {
    let guards = ts.map(|t| t.storage_and_layout());
    let mut slices: [&[f32]; N] = [&[]; N];
    for (slot, (st, l)) in slices.iter_mut().zip(guards.iter()) {
        match (&**st, l.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => *slot = &v[a..b],
            _ => return None,
        }
    }
    let n = slices.first().map_or(0, |s| s.len());
    if slices.iter().any(|s| s.len() != n) {
        return None;
    }
    Some(f(slices))
}

/// The whole AdamW update of one f32 CPU parameter in one parallel pass (the composed version
/// below makes ~14 full-size temporaries per parameter): new (θ, m, v), or `None` elsewhere.
fn fused_update(
    theta: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    k: &Coeffs,
) -> candle_core::Result<Option<(Tensor, Tensor, Tensor)>> {
    let (b1, b2) = (k.beta1 as f32, k.beta2 as f32);
    let (ib1, ib2) = ((1.0 - k.beta1) as f32, (1.0 - k.beta2) as f32);
    let (ibc1, ibc2) = ((1.0 / k.bc1) as f32, (1.0 / k.bc2) as f32);
    let (eps, lr, keep) = (k.eps as f32, k.lr as f32, k.keep as f32);
    let out = with_f32_slices([theta, g, m, v], |[th, g, m, v]| {
        let n = th.len();
        let (mut th2, mut m2, mut v2) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        const BLOCK: usize = 1 << 14;
        th2.par_chunks_mut(BLOCK)
            .zip(m2.par_chunks_mut(BLOCK).zip(v2.par_chunks_mut(BLOCK)))
            .enumerate()
            .for_each(|(bi, (to, (mo, vo)))| {
                let r = bi * BLOCK..bi * BLOCK + to.len();
                let (th, g, m, v) = (&th[r.clone()], &g[r.clone()], &m[r.clone()], &v[r]);
                for j in 0..to.len() {
                    let mj = b1 * m[j] + ib1 * g[j];
                    let vj = b2 * v[j] + ib2 * (g[j] * g[j]);
                    let update = (mj * ibc1) / ((vj * ibc2).sqrt() + eps);
                    to[j] = th[j] * keep - lr * update;
                    mo[j] = mj;
                    vo[j] = vj;
                }
            });
        (th2, m2, v2)
    });
    let Some((th2, m2, v2)) = out else {
        return Ok(None);
    };
    let (shape, dev) = (theta.shape(), theta.device());
    Ok(Some((
        Tensor::from_vec(th2, shape, dev)?,
        Tensor::from_vec(m2, shape, dev)?,
        Tensor::from_vec(v2, shape, dev)?,
    )))
}

/// Learning rate at `step` (0-based): linear warmup to `lr`, then cosine decay to `min_lr` at
/// `max_steps` (Loshchilov & Hutter 2017, without restarts).
pub fn lr_at(step: usize, lr: f64, min_lr: f64, warmup: usize, max_steps: usize) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = max_steps.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Scales `grads` so that their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> candle_core::Result<f64> {
    let mut total = 0.0f64;
    for g in grads.iter() {
        let fast = with_f32_slices([g], |[x]| {
            x.par_chunks(1 << 14)
                .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
                .sum::<f64>()
        });
        total += match fast {
            Some(s) => s,
            None => g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64,
        };
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        assert!((lr_at(0, 1.0, 0.1, 10, 100) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 1.0, 0.1, 10, 100) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 1.0, 0.1, 10, 100) - 1.0).abs() < 1e-12);
        assert!((lr_at(55, 1.0, 0.1, 10, 100) - 0.55).abs() < 1e-12);
        assert!((lr_at(100, 1.0, 0.1, 10, 100) - 0.1).abs() < 1e-12);
        assert!((lr_at(500, 1.0, 0.1, 10, 100) - 0.1).abs() < 1e-12);
    }

    /// AdamW over one decayed parameter: β₁ 0.9, eps 1e-8, weight decay 0.1.
    fn one_param(var: &Var, beta2: f64) -> AdamW {
        let p = Param {
            name: "w".into(),
            var: var.clone(),
            decay: true,
        };
        AdamW::new(vec![p], 0.9, beta2, 1e-8, 0.1).unwrap()
    }

    #[test]
    fn fused_cpu_update_equals_the_composed_update() {
        // f32 on the CPU takes the fused kernel, f64 the composed tensor ops: same trajectory.
        let dev = Device::Cpu;
        let init = Tensor::randn(0f32, 1.0, (40_000,), &dev).unwrap();
        let run = |dtype: candle_core::DType| {
            let var = Var::from_tensor(&init.to_dtype(dtype).unwrap()).unwrap();
            let mut opt = one_param(&var, 0.95);
            for s in 0..5 {
                let g =
                    ((var.as_tensor().sin().unwrap() * (s as f64 + 1.0)).unwrap() + 0.01).unwrap();
                opt.step(&[g], 1e-2).unwrap();
            }
            let w = var.as_tensor().to_dtype(candle_core::DType::F64).unwrap();
            let m = opt.m[0].to_dtype(candle_core::DType::F64).unwrap();
            (w, m, opt.m[0].dtype())
        };
        let (w32, m32, d32) = run(candle_core::DType::F32);
        let (w64, m64, _) = run(candle_core::DType::F64);
        assert_eq!(d32, candle_core::DType::F32);
        for (a, b) in [(w32, w64), (m32, m64)] {
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(d < 1e-5, "fused vs composed: {d}");
        }
    }

    #[test]
    fn adamw_matches_the_closed_form_first_step() {
        // After one step, m̂ = g and v̂ = g², so θ ← θ(1 - lr·wd) - lr·g/(|g| + eps).
        let dev = Device::Cpu;
        let var = Var::from_vec(vec![1.0f32, -2.0, 3.0], 3, &dev).unwrap();
        let mut opt = one_param(&var, 0.999);
        let g = Tensor::new(&[0.5f32, -0.25, 0.0], &dev).unwrap();
        opt.step(&[g], 0.01).unwrap();
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        let want = [
            1.0 * (1.0 - 0.001) - 0.01,
            -2.0 * (1.0 - 0.001) + 0.01,
            3.0 * (1.0 - 0.001),
        ];
        for (a, b) in got.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let dev = Device::Cpu;
        let mut g = vec![
            Tensor::new(&[3.0f32], &dev).unwrap(),
            Tensor::new(&[4.0f32], &dev).unwrap(),
        ];
        let before = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((before - 5.0).abs() < 1e-6);
        let after: f32 = g
            .iter()
            .map(|t| {
                t.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .sum::<f32>()
            .sqrt();
        assert!((after - 1.0).abs() < 1e-4);
    }
}
