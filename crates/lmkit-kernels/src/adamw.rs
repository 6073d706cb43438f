//! The AdamW update (Loshchilov & Hutter 2019, Algorithm 2; bias-corrected moments, Kingma & Ba
//! 2015) as in-place passes (CPU, and CUDA kernels with the `cuda` feature), and the global
//! gradient norm. The optimizer's state and its composed fallback for other devices live in
//! `lmkit_train::adamw`.

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
    /// 1 − lr·weight decay: the factor on the parameters with weight decay (the others keep 1).
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

/// `f(x, g)` for each element x of the first storage and its g in the second (contiguous f32 of
/// one length), in parallel blocks.
fn with_each_pair(
    (s1, l1): (&mut CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f: impl Fn(&mut f32, f32) + Sync,
) -> candle_core::Result<()> {
    let (x, g) = (f32_data_mut(s1, l1)?, f32_data(s2, l2)?);
    x.par_chunks_mut(BLOCK)
        .zip(g.par_chunks(BLOCK))
        .for_each(|(x, g)| x.iter_mut().zip(g).for_each(|(x, &g)| f(x, g)));
    Ok(())
}

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
        let (b, ib, s) = (self.beta, 1.0 - self.beta, self.scale);
        if self.square {
            with_each_pair((s1, l1), (s2, l2), |m, g| {
                *m = b * *m + ib * ((s * g) * (s * g))
            })
        } else {
            with_each_pair((s1, l1), (s2, l2), |m, g| *m = b * *m + ib * (s * g))
        }
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

/// In place: acc ← acc + s·g (summing a step's gradients).
struct AddScaled(f32);

impl InplaceOp2 for AddScaled {
    fn name(&self) -> &'static str {
        "lmkit-add-scaled"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let s = self.0;
        with_each_pair((s1, l1), (s2, l2), |a, g| *a += s * g)
    }
}

/// acc ← acc + scale·g in one pass over `acc`'s own memory, for summing a step's gradients
/// without a new full-size tensor per addition (and per scaling). `acc` must be a tensor nothing
/// else holds. `false` (nothing done) unless both are contiguous f32 CPU tensors of one size.
pub fn add_scaled_in_place(acc: &Tensor, g: &Tensor, scale: f64) -> candle_core::Result<bool> {
    let fits = [acc, g]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous())
        && acc.shape() == g.shape()
        && !acc.track_op();
    if !fits {
        return Ok(false);
    }
    acc.inplace_op2(g, &AddScaled(scale as f32))?;
    Ok(true)
}

/// One parameter's operands of an update: θ, its gradient, the two moments, and whether the
/// weight decay applies to it.
pub struct Operands<'a> {
    pub theta: &'a Tensor,
    pub g: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub decay: bool,
}

impl Operands<'_> {
    /// Contiguous f32 tensors of one size on θ's device.
    fn fit(&self) -> bool {
        let n = self.theta.elem_count();
        [self.theta, self.g, self.m, self.v].iter().all(|t| {
            t.device().same_device(self.theta.device())
                && t.dtype() == candle_core::DType::F32
                && t.is_contiguous()
                && t.elem_count() == n
        })
    }
}

/// The AdamW update of every parameter that is f32 on the CPU (three in-place passes each: the
/// moments, then θ — no temporaries, where the composed version in `lmkit_train::adamw` makes ~14
/// full-size ones per parameter) or on a CUDA GPU with the `cuda` feature (every parameter of
/// that GPU in one kernel launch). `k.keep` is the decayed parameters' factor; the others keep
/// theirs. Returns which parameters were updated: the caller updates the rest (other dtypes,
/// devices or layouts) itself.
pub fn fused_update_all(ops: &[Operands], k: &Coeffs) -> candle_core::Result<Vec<bool>> {
    let mut done: Vec<bool> = vec![false; ops.len()];
    #[cfg(feature = "cuda")]
    cuda_update_all(ops, k, &mut done)?;
    for (o, done) in ops.iter().zip(done.iter_mut()) {
        if *done || !o.theta.device().is_cpu() || !o.fit() {
            continue;
        }
        let keep = if o.decay { k.keep } else { 1.0 };
        cpu_update(o, k, keep as f32)?;
        *done = true;
    }
    Ok(done)
}

/// One f32 CPU parameter's update: the moments, then θ.
fn cpu_update(o: &Operands, k: &Coeffs, keep: f32) -> candle_core::Result<()> {
    let scale = k.grad_scale as f32;
    let first = Moment {
        beta: k.beta1 as f32,
        scale,
        square: false,
    };
    o.m.inplace_op2(o.g, &first)?;
    let second = Moment {
        beta: k.beta2 as f32,
        scale,
        square: true,
    };
    o.v.inplace_op2(o.g, &second)?;
    let apply = Apply {
        keep,
        lr: k.lr as f32,
        ibc1: (1.0 / k.bc1) as f32,
        ibc2: (1.0 / k.bc2) as f32,
        eps: k.eps as f32,
    };
    o.theta.inplace_op3(o.m, o.v, &apply)
}

/// The parameters that fit on the GPU of the first CUDA one, in one launch; marks them done.
#[cfg(feature = "cuda")]
fn cuda_update_all(ops: &[Operands], k: &Coeffs, done: &mut [bool]) -> candle_core::Result<()> {
    use crate::cuda::{AdamParam, AdamStep, Gpu};
    let Some(first) = ops.iter().find(|o| o.theta.device().is_cuda()) else {
        return Ok(());
    };
    let device = first.theta.device().clone();
    let Some(gpu) = Gpu::of(&device) else {
        return Ok(());
    };
    let chosen: Vec<usize> = (0..ops.len())
        .filter(|&i| ops[i].theta.device().same_device(&device) && ops[i].fit())
        .collect();
    let mut guards = Vec::with_capacity(chosen.len());
    let mut params = Vec::with_capacity(chosen.len());
    for &i in &chosen {
        let o = &ops[i];
        let g4 = [o.theta, o.g, o.m, o.v].map(|t| t.storage_and_layout());
        let view = |j: usize| {
            let (st, l) = &g4[j];
            Gpu::view(st, l).ok_or_else(|| {
                candle_core::Error::Msg("adamw: operands not contiguous f32 on the GPU".into())
            })
        };
        params.push(AdamParam {
            theta: view(0)?,
            g: view(1)?,
            m: view(2)?,
            v: view(3)?,
            keep: if o.decay { k.keep as f32 } else { 1.0 },
        });
        guards.push(g4);
    }
    let step = AdamStep {
        beta1: k.beta1 as f32,
        beta2: k.beta2 as f32,
        scale: k.grad_scale as f32,
        lr: k.lr as f32,
        ibc1: (1.0 / k.bc1) as f32,
        ibc2: (1.0 / k.bc2) as f32,
        eps: k.eps as f32,
    };
    gpu.adam(&params, step)?;
    drop(guards);
    for i in chosen {
        done[i] = true;
    }
    Ok(())
}

/// Σ v² in f64, over eight running sums (independent additions the compiler vectorizes; one
/// sum is a chain of dependent additions, a quarter of the speed), added in a fixed order.
fn sum_of_squares(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (v as f64) * (v as f64);
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// The global L2 norm of `grads` (summed in a fixed order: the same value every run).
pub fn grad_norm(grads: &[Tensor]) -> candle_core::Result<f64> {
    #[cfg(feature = "cuda")]
    if let Some(n) = cuda_grad_norm(grads)? {
        return Ok(n);
    }
    let mut total = 0.0f64;
    for g in grads {
        let fast = (g.device().is_cpu() && g.dtype() == candle_core::DType::F32).then(|| {
            let (st, l) = g.storage_and_layout();
            let Storage::Cpu(cs) = &*st else {
                return None;
            };
            let x = f32_data(cs, l).ok()?;
            let parts: Vec<f64> = x.par_chunks(BLOCK).map(sum_of_squares).collect();
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

/// The global norm of gradients that all live on one GPU as contiguous f32 tensors, with one copy
/// back to the host; `None` otherwise.
#[cfg(feature = "cuda")]
fn cuda_grad_norm(grads: &[Tensor]) -> candle_core::Result<Option<f64>> {
    use crate::cuda::Gpu;
    let Some(first) = grads.first() else {
        return Ok(None);
    };
    let Some(gpu) = Gpu::of(first.device()) else {
        return Ok(None);
    };
    let guards: Vec<_> = grads.iter().map(|g| g.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(grads.len());
    for (g, (st, l)) in grads.iter().zip(&guards) {
        let storage: &Storage = st;
        match (
            g.device().same_device(first.device()),
            Gpu::view(storage, l),
        ) {
            (true, Some(v)) => views.push(v),
            _ => return Ok(None),
        }
    }
    let total = gpu.sum_of_squares(&views)?;
    drop(guards);
    Ok(Some(total.sqrt()))
}

#[cfg(all(test, feature = "cuda"))]
mod cuda_tests {
    use super::*;
    use crate::testing::{max_diff, randn};
    use candle_core::{Device, Var};

    /// The in-place update and the gradient norm on a GPU equal the CPU's: two parameters, one
    /// decayed, one over two of the kernels' chunks.
    #[test]
    fn gpu_update_and_norm_equal_the_cpu() {
        let Some(gpu) = crate::testing::gpu_device() else {
            return;
        };
        let cpu = Device::Cpu;
        let shapes: [candle_core::Shape; 2] = [(37, 129).into(), 70_001.into()];
        let inputs: Vec<[Tensor; 4]> = shapes
            .iter()
            .map(|s| {
                let [th, g, m, v] = [0, 1, 2, 3].map(|_| randn(0.0f32, 1.0, s, &cpu).unwrap());
                [th, g, m, v.abs().unwrap()]
            })
            .collect();
        let k = Coeffs {
            beta1: 0.9,
            beta2: 0.95,
            bc1: 0.1,
            bc2: 0.05,
            eps: 1e-8,
            lr: 1e-2,
            keep: 0.999,
            grad_scale: 0.7,
        };
        let on = |d: &Device| {
            let vars: Vec<[Var; 4]> = inputs
                .iter()
                .map(|x| {
                    x.clone()
                        .map(|x| Var::from_tensor(&x.to_device(d).unwrap()).unwrap())
                })
                .collect();
            let ops: Vec<Operands> = vars
                .iter()
                .zip([true, false])
                .map(|(t, decay)| Operands {
                    theta: &t[0],
                    g: &t[1],
                    m: &t[2],
                    v: &t[3],
                    decay,
                })
                .collect();
            assert_eq!(fused_update_all(&ops, &k).unwrap(), [true, true]);
            vars.iter()
                .flat_map(|t| t.clone().map(|x| x.as_tensor().to_device(&cpu).unwrap()))
                .collect::<Vec<_>>()
        };
        let (a, b) = (on(&cpu), on(&gpu));
        for (x, y) in a.iter().zip(&b) {
            assert!(max_diff(x, y) < 1e-5, "{}", max_diff(x, y));
        }
        assert!(
            max_diff(&a[0], &inputs[0][0]) > 1e-4,
            "the update changed nothing"
        );
        let flat: Vec<Tensor> = inputs.iter().flatten().cloned().collect();
        let on_gpu: Vec<Tensor> = flat.iter().map(|x| x.to_device(&gpu).unwrap()).collect();
        let cpu_norm = grad_norm(&flat).unwrap();
        let gpu_norm = grad_norm(&on_gpu).unwrap();
        assert!(
            (cpu_norm - gpu_norm).abs() < 1e-9 * cpu_norm,
            "{cpu_norm} vs {gpu_norm}"
        );
    }
}

#[cfg(test)]
mod cpu_tests {
    use super::*;

    #[test]
    fn adding_in_place_equals_the_composed_sum() {
        let dev = candle_core::Device::Cpu;
        let acc = crate::testing::randn(0f32, 1.0, (3, 50_000), &dev).unwrap();
        let before = acc.copy().unwrap();
        let g = crate::testing::randn(0f32, 1.0, (3, 50_000), &dev).unwrap();
        assert!(add_scaled_in_place(&acc, &g, -0.25).unwrap());
        let want = (&before + (&g * -0.25).unwrap()).unwrap();
        let d = (acc - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
        // Another dtype or shape: nothing done.
        let g64 = g.to_dtype(candle_core::DType::F64).unwrap();
        assert!(!add_scaled_in_place(&before, &g64, 1.0).unwrap());
        let short = g.narrow(1, 0, 10).unwrap().contiguous().unwrap();
        assert!(!add_scaled_in_place(&before, &short, 1.0).unwrap());
    }

    #[test]
    fn the_norm_of_f32_gradients_is_the_definition() {
        let dev = candle_core::Device::Cpu;
        // Lengths with every remainder of the eight running sums, and one over many blocks.
        let lens = (0..20).chain([BLOCK * 3 + 5]);
        let grads: Vec<Tensor> = lens
            .map(|n| crate::testing::randn(0f32, 1.0, n, &dev).unwrap())
            .collect();
        let want: f64 = grads
            .iter()
            .flat_map(|g| g.to_vec1::<f32>().unwrap())
            .map(|v| (v as f64) * (v as f64))
            .sum::<f64>()
            .sqrt();
        let got = grad_norm(&grads).unwrap();
        assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
    }
}
