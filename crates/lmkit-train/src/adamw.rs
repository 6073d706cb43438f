//! AdamW with decoupled weight decay (Loshchilov & Hutter 2019, Algorithm 2) and bias-corrected
//! moments (Kingma & Ba 2015). Its state (moments, step) is plain tensors so that a checkpoint can
//! save and restore it exactly.

use candle_core::{Tensor, Var};
pub use lmkit_kernels::adamw::grad_norm;
use lmkit_kernels::adamw::{fused_update_all, Coeffs, Operands};

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

    /// One update with gradients `grads` (aligned with `params`) times `grad_scale` (the
    /// clipping factor, 1 for none) at learning rate `lr`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64) -> candle_core::Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        let k = Coeffs {
            beta1: self.beta1,
            beta2: self.beta2,
            bc1,
            bc2,
            eps: self.eps,
            lr,
            keep: 1.0 - lr * self.weight_decay,
            grad_scale,
        };
        let ops: Vec<Operands> = self
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| Operands {
                theta: p.var.as_tensor(),
                g: &grads[i],
                m: &self.m[i],
                v: &self.v[i],
                decay: p.decay,
            })
            .collect();
        let fused = fused_update_all(&ops, &k)?;
        drop(ops);
        for (i, p) in self.params.iter().enumerate() {
            if fused[i] {
                continue;
            }
            // Gradients come out of backward with the op graph of the whole step attached;
            // moments built on them would keep every step's activations alive. Detach.
            let g = &(grads[i].detach() * grad_scale)?;
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

/// The factor that brings gradients of global norm `norm` down to at most `max_norm` (1 when
/// they are within it, or `max_norm` ≤ 0: no clipping).
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
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
        // f32 on the CPU takes the fused kernel, f64 the composed tensor ops: same trajectory,
        // with a gradient factor (clipping) that changes from step to step.
        let dev = Device::Cpu;
        let init = lmkit_kernels::testing::randn(0f32, 1.0, (40_000,), &dev).unwrap();
        let run = |dtype: candle_core::DType, scaled: bool| {
            let var = Var::from_tensor(&init.to_dtype(dtype).unwrap()).unwrap();
            let mut opt = one_param(&var, 0.95);
            for s in 0..5 {
                let g =
                    ((var.as_tensor().sin().unwrap() * (s as f64 + 1.0)).unwrap() + 0.01).unwrap();
                let scale = if scaled {
                    1.0 / (1.0 + s as f64).powi(3)
                } else {
                    1.0
                };
                opt.step(&[g], 1e-2, scale).unwrap();
            }
            let w = var.as_tensor().to_dtype(candle_core::DType::F64).unwrap();
            let m = opt.m[0].to_dtype(candle_core::DType::F64).unwrap();
            (w, m, opt.m[0].dtype())
        };
        let max_diff = |a: Tensor, b: Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let (w32, m32, d32) = run(candle_core::DType::F32, true);
        let (w64, m64, _) = run(candle_core::DType::F64, true);
        assert_eq!(d32, candle_core::DType::F32);
        for (a, b) in [(w32.clone(), w64), (m32, m64)] {
            let d = max_diff(a, b);
            assert!(d < 1e-5, "fused vs composed: {d}");
        }
        let (w_unscaled, _, _) = run(candle_core::DType::F32, false);
        assert!(
            max_diff(w32, w_unscaled) > 1e-4,
            "the gradient factor had no effect"
        );
    }

    #[test]
    fn adamw_matches_the_closed_form_first_step() {
        // After one step, m̂ = g and v̂ = g², so θ ← θ(1 - lr·wd) - lr·g/(|g| + eps).
        let dev = Device::Cpu;
        let var = Var::from_vec(vec![1.0f32, -2.0, 3.0], 3, &dev).unwrap();
        let mut opt = one_param(&var, 0.999);
        let g = Tensor::new(&[0.5f32, -0.25, 0.0], &dev).unwrap();
        opt.step(&[g], 0.01, 1.0).unwrap();
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
    fn only_decayed_parameters_shrink() {
        // With a zero gradient the moments stay 0 and the update is 0: θ changes by the decay.
        let dev = Device::Cpu;
        let vars = [true, false].map(|_| Var::from_vec(vec![2.0f32, -4.0], 2, &dev).unwrap());
        let params = vars
            .iter()
            .zip([true, false])
            .map(|(var, decay)| Param {
                name: format!("{decay}"),
                var: var.clone(),
                decay,
            })
            .collect();
        let mut opt = AdamW::new(params, 0.9, 0.999, 1e-8, 0.5).unwrap();
        let zero = Tensor::zeros(2, candle_core::DType::F32, &dev).unwrap();
        opt.step(&[zero.clone(), zero], 0.1, 1.0).unwrap();
        let got = vars.map(|v| v.as_tensor().to_vec1::<f32>().unwrap());
        assert_eq!(got, [vec![2.0 * 0.95, -4.0 * 0.95], vec![2.0, -4.0]]);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let dev = Device::Cpu;
        let g = vec![
            Tensor::new(&[3.0f32], &dev).unwrap(),
            Tensor::new(&[4.0f32], &dev).unwrap(),
        ];
        let before = grad_norm(&g).unwrap();
        assert!((before - 5.0).abs() < 1e-6);
        let s = clip_scale(before, 1.0);
        let scaled: Vec<Tensor> = g.iter().map(|t| (t * s).unwrap()).collect();
        assert!((grad_norm(&scaled).unwrap() - 1.0).abs() < 1e-4);
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        assert_eq!(clip_scale(50.0, 0.0), 1.0);
    }
}
