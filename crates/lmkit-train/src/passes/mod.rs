//! Hand-written training passes: forward, loss and backward of a whole model over plain
//! buffers, without candle's autograd graph. Each is checked against the graph's gradients in its
//! tests. [`for_model`] picks the [`TrainPass`] of a decoder trained on token streams (GPT-2, the
//! Llama family; or none: the graph is differentiated); the objectives whose batches are not
//! (ids, next ids) call their pass directly: [`bert::loss_and_grads`] (masked LM),
//! [`bart::loss_and_grads`] (source/target pairs), [`rnn::loss_and_grads`] (a stream with the
//! recurrent state carried between windows) and [`llama::scored_rows`] (fine-tuning, DPO, RL).

pub mod bart;
pub mod bert;
pub mod gpt2;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
// With only `cuda-emu`, the passes are reached from their tests alone.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod gpt2_cuda;
pub mod llama;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
// With only `cuda-emu`, the passes are reached from their tests alone.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod llama_cuda;
mod params;
mod post_norm;
pub mod rnn;

use candle_core::{Layout, Storage, Tensor, WithDType};
use lmkit_kernels::blas::{self, plain, transposed, Blas, BlasFloat};
use lmkit_models::CausalLm;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// The mean next-token cross-entropy of a batch and the gradient of every parameter tensor.
pub struct LossAndGrads {
    pub loss: f64,
    /// (parameter, gradient) pairs; a tied output layer's gradient is in the embedding's.
    pub grads: Vec<(Tensor, Tensor)>,
}

/// A model's training pass.
pub trait TrainPass {
    /// The mean next-token cross-entropy of `ids` → `targets` (both [batch, seq], u32) and every
    /// parameter's gradient times `scale`; `None` where the pass does not apply to these tensors
    /// (device, dtype, no BLAS), and the caller differentiates the graph instead.
    fn loss_and_grads(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        scale: f64,
    ) -> candle_core::Result<Option<LossAndGrads>>;
}

/// How gradients are computed (`train.backward`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backward {
    /// A hand-written pass where the model has one, the autograd graph elsewhere.
    #[default]
    Auto,
    /// Always candle's autograd graph (to check or compare the hand-written passes).
    Autograd,
}

/// An activation the passes compute with a fused kernel.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Act {
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// The exact GELU x·Φ(x) (`gelu`).
    GeluErf,
    Relu,
}

impl Act {
    /// The activation a config names; `None` for one without a fused kernel (SiLU).
    pub(crate) fn named(name: &str) -> Option<Act> {
        match name {
            "relu" => Some(Act::Relu),
            "gelu" => Some(Act::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Act::GeluTanh),
            _ => None,
        }
    }

    pub(crate) fn forward<T: BlasFloat>(self, h: &[T]) -> Vec<T> {
        match self {
            Act::GeluTanh => lmkit_kernels::fused::gelu(h),
            Act::GeluErf => lmkit_kernels::fused::gelu_erf_fwd(h),
            Act::Relu => h
                .par_iter()
                .map(|&v| num_traits::Float::max(v, T::zero()))
                .collect(),
        }
    }

    pub(crate) fn backward<T: BlasFloat>(self, h: &[T], dg: &[T]) -> Vec<T> {
        match self {
            Act::GeluTanh => lmkit_kernels::fused::gelu_bwd(h, dg),
            Act::GeluErf => lmkit_kernels::fused::gelu_erf_bwd(h, dg),
            Act::Relu => h
                .par_iter()
                .zip(dg.par_iter())
                .map(|(&v, &g)| if v > T::zero() { g } else { T::zero() })
                .collect(),
        }
    }
}

/// The hand-written pass for `model`, if it has one and `backward` allows it.
pub fn for_model(model: &CausalLm, backward: Backward) -> Option<Box<dyn TrainPass + '_>> {
    match (backward, model) {
        (Backward::Auto, CausalLm::Gpt2(m)) => Some(Box::new(gpt2::Gpt2Pass(m))),
        (Backward::Auto, CausalLm::Llama(m)) => Some(Box::new(llama::LlamaPass(m))),
        _ => None,
    }
}

/// The output layer and cross-entropy of hidden rows `h` [n, c] against `targets` through the
/// weight `lm` [v, c], `chunk` rows at a time (the logits [chunk, v] are turned into their
/// gradient in place): each row's loss, in order; the rows' gradient into `dh` [n, c]; the
/// weight's added to `dlm` [v, c] when given. Row i's gradient is scaled by `scale_of(i, loss)`.
/// With `bias` [v] the logits are h·lmᵀ + bias, and the bias's gradient is added to `dbias`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn output_cross_entropy<T: BlasFloat>(
    blas: &Blas,
    h: &[T],
    (lm, bias): (&[T], Option<&[T]>),
    targets: &[u32],
    chunk: usize,
    scale_of: &(dyn Fn(usize, f64) -> T + Sync),
    dh: &mut [T],
    (mut dlm, mut dbias): (Option<&mut [T]>, Option<&mut [T]>),
) -> candle_core::Result<Vec<f64>> {
    let n = targets.len();
    let c = h.len() / n.max(1);
    let v = lm.len() / c.max(1);
    // The logits of one chunk, made by the first chunk's product (no zero fill: the product
    // writes every value) or from the bias rows, and reused by the next chunks.
    let mut logits: Vec<T> = Vec::new();
    let mut losses = Vec::with_capacity(n);
    for r0 in (0..n).step_by(chunk.max(1)) {
        let rows = chunk.min(n - r0);
        let hc = &h[r0 * c..(r0 + rows) * c];
        let mnk = (rows, v, c);
        let (a, b) = (plain(hc, c), transposed(lm, c));
        match bias {
            None if logits.len() < rows * v => logits = blas::product(blas, mnk, a, b)?,
            None => blas::gemm_par(blas, mnk, a, b, &mut logits[..rows * v], false)?,
            Some(bias) => {
                logits.resize(rows * v, T::zero());
                let lg = &mut logits[..rows * v];
                lg.par_chunks_mut(v).for_each(|r| r.copy_from_slice(bias));
                blas::gemm_par(blas, mnk, a, b, lg, true)?;
            }
        }
        let lg = &mut logits[..rows * v];
        let row_losses: Vec<f64> = lg
            .par_chunks_mut(v)
            .zip(&targets[r0..r0 + rows])
            .enumerate()
            .map(|(i, (r, &y))| {
                let scale = |loss: T| scale_of(r0 + i, WithDType::to_f64(loss));
                WithDType::to_f64(lmkit_kernels::fused::ce_row_weighted_in_place(
                    r, y as usize, scale,
                ))
            })
            .collect();
        losses.extend(row_losses);
        if let Some(db) = dbias.as_deref_mut() {
            let sums = lmkit_kernels::fused::column_sums(lg, v);
            db.iter_mut().zip(sums).for_each(|(o, g)| *o += g);
        }
        let d = &mut dh[r0 * c..(r0 + rows) * c];
        blas::gemm_par(blas, (rows, c, v), plain(lg, v), plain(lm, c), d, false)?;
        if let Some(dlm) = dlm.as_deref_mut() {
            let lgt = transposed(&*lg, v);
            blas::gemm_par(blas, (v, c, rows), lgt, plain(hc, c), dlm, true)?;
        }
    }
    Ok(losses)
}

/// Adds row r of `rows` ([n, width]) to row `ids[r]` of `table`, in row order: an embedding
/// table's gradient from its outputs'.
pub(crate) fn add_rows_by_id<T: BlasFloat>(table: &mut [T], ids: &[u32], rows: &[T], width: usize) {
    for (&id, row) in ids.iter().zip(rows.chunks(width.max(1))) {
        let o = &mut table[id as usize * width..(id as usize + 1) * width];
        o.iter_mut().zip(row).for_each(|(o, &d)| *o += d);
    }
}

/// A tensor's elements as a slice of `T`, from its storage guard and layout; `None` for a tensor
/// not on the CPU, of another dtype or not contiguous (the graph path reports or handles those).
pub(crate) fn cpu_slice<'a, T: BlasFloat>(
    storage: &'a Storage,
    layout: &Layout,
) -> Option<&'a [T]> {
    let Storage::Cpu(cs) = storage else {
        return None;
    };
    let all = T::cpu_storage_as_slice(cs).ok()?;
    let (start, end) = layout.contiguous_offsets()?;
    Some(&all[start..end])
}

/// Token ids and next-token targets, flattened, with (batch, seq).
type FlatBatch = (Vec<u32>, Vec<u32>, (usize, usize));

/// Token ids and next-token targets of a [batch, seq] pair of u32 tensors, flattened, with
/// (batch, seq); targets of another shape are an error naming `model`.
pub(crate) fn ids_and_targets(
    model: &str,
    ids: &Tensor,
    targets: &Tensor,
) -> candle_core::Result<FlatBatch> {
    let (b, t) = ids.dims2()?;
    if targets.dims() != [b, t] {
        candle_core::bail!(
            "{model} loss: targets {:?} do not match the inputs {:?}",
            targets.dims(),
            ids.dims()
        );
    }
    Ok((
        ids.flatten_all()?.to_vec1()?,
        targets.flatten_all()?.to_vec1()?,
        (b, t),
    ))
}

/// What the passes' tests share.
#[cfg(test)]
pub(crate) mod testing {
    use super::LossAndGrads;
    use candle_core::{DType, Tensor};
    use candle_nn::VarMap;

    /// The GPU (see `lmkit_kernels::testing::gpu_device`: the emulated one with `cuda-emu`).
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    pub(crate) use lmkit_kernels::testing::gpu_device as gpu;

    /// Held by each test that sets the process-wide GPU switches (TF32, bf16 products, flash
    /// attention) for its whole run, so that two such tests running at once do not change each
    /// other's settings mid-pass.
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    pub(crate) fn gpu_switches() -> std::sync::MutexGuard<'static, ()> {
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `count` token ids below `vocab` from a fixed generator seeded with `seed`.
    pub(crate) fn tokens(count: usize, vocab: u64, seed: u64) -> Vec<u32> {
        let mut s = seed;
        (0..count)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) % vocab) as u32
            })
            .collect()
    }

    /// Every variable random (N(0, 0.5²)): defaults leave norms at 0 and biases at 0. Drawn in
    /// the names' order, so the same weights every run.
    pub(crate) fn randomize(vm: &VarMap, dtype: DType) {
        let dev = candle_core::Device::Cpu;
        for (_, var) in lmkit_kernels::testing::vars_by_name(vm) {
            let r = lmkit_kernels::testing::randn(0.0, 0.5, var.shape(), &dev).unwrap();
            var.set(&r.to_dtype(dtype).unwrap()).unwrap();
        }
    }

    /// The pass's loss and gradients (of `scale` × loss) equal the graph's `loss` and its
    /// autograd gradients for every variable of `vm` within `tol`.
    pub(crate) fn assert_matches_graph(
        ours: &LossAndGrads,
        loss: Tensor,
        scale: f64,
        vm: &VarMap,
        tol: f64,
        what: &str,
    ) {
        let want = loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            (ours.loss - want).abs() <= tol * want.abs().max(1.0),
            "{what}: loss {} vs {want}",
            ours.loss
        );
        let g = (loss * scale).unwrap().backward().unwrap();
        let vars = vm.all_vars();
        assert_eq!(
            ours.grads.len(),
            vars.len(),
            "{what}: one gradient per parameter"
        );
        for var in &vars {
            let (_, got) = ours
                .grads
                .iter()
                .find(|(t, _)| t.id() == var.as_tensor().id())
                .expect("a gradient for every parameter");
            let want = g.get(var.as_tensor()).expect("a reference gradient");
            super::gpt2::tests::assert_gradient_close(got, want, tol);
        }
    }
}
