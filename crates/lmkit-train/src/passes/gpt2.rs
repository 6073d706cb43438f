//! GPT-2's training pass written out by hand: forward, cross-entropy and backward over plain
//! buffers, with the BLAS products and fused kernels the graph path uses, but no autograd graph.
//!
//! candle's backward pass accumulates every gradient contribution of every node as a fresh
//! zero-filled tensor plus an add, and each activation is a separate tensor; for a GPT-2 step
//! that was ~15% of the cycles beside the matrix products. Here each activation is computed once
//! into a buffer kept for the backward pass, residual adds and biases are folded into the
//! products (BLAS's beta = 1), and each gradient is written once, into the field of
//! [`Gpt2Params`] named for its parameter. The tests below hold every gradient to the autograd
//! path's (which lmkit-models' tests/gradients.rs holds to finite differences).

use super::{Act, LossAndGrads, TrainPass};
use candle_core::Tensor;
use lmkit_kernels::blas::{self, plain, transposed, Blas, BlasFloat, Heads};
use lmkit_kernels::buffers::{self, rows_of};
use lmkit_kernels::fused;
use lmkit_models::gpt2::{Gpt2, Gpt2BlockParams, Gpt2Params};
use rayon::prelude::*;

/// Rows of the output layer's logits computed at a time: [rows, vocab] stays small (a few rows
/// in tests, so that they cover the accumulation over chunks).
const LOSS_ROWS: usize = if cfg!(test) { 8 } else { 512 };

/// The hand-written pass over a GPT-2 model.
pub struct Gpt2Pass<'a>(pub &'a Gpt2);

/// One block's activations, kept from the forward pass for the backward pass.
struct Saved<T> {
    /// Block input (residual stream), LayerNorm 1 output, packed q|k|v, attention output.
    x: Vec<T>,
    a1: Vec<T>,
    qkv: Vec<T>,
    y: Vec<T>,
    /// Residual stream after attention, LayerNorm 2 output, MLP pre-activation and activation.
    xm: Vec<T>,
    a2: Vec<T>,
    h: Vec<T>,
    g: Vec<T>,
}

impl TrainPass for Gpt2Pass<'_> {
    /// `None` where the pass does not apply — tensors not on the CPU or not f32/f64, no BLAS
    /// library, an activation other than the tanh GELU or ReLU — and the caller differentiates
    /// the graph instead.
    fn loss_and_grads(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        scale: f64,
    ) -> candle_core::Result<Option<LossAndGrads>> {
        let model = self.0;
        let Some(act) = Act::named(&model.cfg.activation_function) else {
            return Ok(None); // SiLU: no fused kernel
        };
        let params = model.params();
        let on_cpu = params.wte.device().is_cpu();
        if (on_cpu && !blas::available()) || (!on_cpu && !cfg!(feature = "cuda")) {
            return Ok(None);
        }
        let (ids, targets, (b, t)) = super::ids_and_targets("GPT-2", ids, targets)?;
        let batch = Batch {
            ids: &ids,
            targets: &targets,
            b,
            t,
        };
        check_batch(model, &batch)?;
        if !on_cpu {
            #[cfg(feature = "cuda")]
            if params.wte.dtype() == candle_core::DType::F32 && act != Act::GeluErf {
                let gelu = act == Act::GeluTanh;
                return super::gpt2_cuda::pass(model, &params, gelu, &ids, &targets, (b, t), scale);
            }
            return Ok(None);
        }
        let blas = blas::require("GPT-2 training pass")?;
        match params.wte.dtype() {
            candle_core::DType::F32 => pass::<f32>(model, &params, blas, act, &batch, scale),
            candle_core::DType::F64 => pass::<f64>(model, &params, blas, act, &batch, scale),
            _ => Ok(None),
        }
    }
}

/// Sequences longer than the model's positions and ids outside its vocabulary are errors.
fn check_batch(model: &Gpt2, batch: &Batch) -> candle_core::Result<()> {
    let cfg = &model.cfg;
    let v = cfg.vocab_size;
    if batch.t > cfg.n_positions {
        candle_core::bail!(
            "GPT-2: a sequence of {} tokens is longer than n_positions ({})",
            batch.t,
            cfg.n_positions
        );
    }
    for (what, list) in [("token id", batch.ids), ("target", batch.targets)] {
        if let Some(bad) = list.iter().find(|&&i| i as usize >= v) {
            candle_core::bail!("GPT-2: {what} {bad} is outside the vocabulary of {v}");
        }
    }
    Ok(())
}

/// Token ids and next-token targets, [b, t] each, flattened.
struct Batch<'a> {
    ids: &'a [u32],
    targets: &'a [u32],
    b: usize,
    t: usize,
}

fn pass<T: BlasFloat>(
    model: &Gpt2,
    tensors: &Gpt2Params<&Tensor>,
    blas: &Blas,
    act: Act,
    batch: &Batch,
    scale: f64,
) -> candle_core::Result<Option<LossAndGrads>> {
    let guards = tensors.clone().map(|p| p.storage_and_layout());
    let data = (guards.as_ref()).try_map(|(st, l)| super::cpu_slice::<T>(st, l).ok_or(()));
    let Ok(data) = data else {
        return Ok(None);
    };
    let (loss, grads) = backprop(model, blas, act, &data, batch, scale)?;
    drop(data);
    drop(guards);
    let dev = candle_core::Device::Cpu;
    let tensors = tensors.clone().into_vec();
    let grads = tensors
        .into_iter()
        .zip(grads.into_vec())
        .map(|(p, g)| Ok((p.clone(), Tensor::from_vec(g, p.shape(), &dev)?)))
        .collect::<candle_core::Result<_>>()?;
    Ok(Some(LossAndGrads { loss, grads }))
}

/// The pass itself over the parameters' data: the mean loss and the gradients (times `scale`),
/// each in the field of its parameter.
fn backprop<T: BlasFloat>(
    model: &Gpt2,
    blas: &Blas,
    act: Act,
    p: &Gpt2Params<&[T]>,
    batch: &Batch,
    scale: f64,
) -> candle_core::Result<(f64, Gpt2Params<Vec<T>>)> {
    let cfg = &model.cfg;
    let (c, hid, v, eps) = (
        cfg.n_embd,
        cfg.n_inner(),
        cfg.vocab_size,
        cfg.layer_norm_epsilon,
    );
    let (ids, targets, b, t) = (batch.ids, batch.targets, batch.b, batch.t);
    let n = b * t;
    let heads = Heads {
        b,
        t,
        heads: cfg.n_head,
        hd: c / cfg.n_head,
    };
    let attn_gemm = T::attention_gemm(blas);
    let lm = p.lm_head.unwrap_or(p.wte);

    // Forward. Embeddings: x = wte[id] + wpe[position].
    let mut x = buffers::par_filled(n * c, c, |r, row: &mut [T]| {
        let (id, pos) = (ids[r] as usize, r % t);
        let e = &p.wte[id * c..(id + 1) * c];
        let q = &p.wpe[pos * c..(pos + 1) * c];
        for ((o, &a), &bb) in row.iter_mut().zip(e).zip(q) {
            *o = a + bb;
        }
    });
    let mut saved = Vec::with_capacity(p.blocks.len());
    for w in &p.blocks {
        let a1 = fused::layer_norm_rows(&x, w.ln_1_w, w.ln_1_b, eps);
        let mut qkv = rows_of(w.c_attn_b, n);
        let w_attn = plain(w.c_attn_w, 3 * c);
        blas::gemm_par(blas, (n, 3 * c, c), plain(&a1, c), w_attn, &mut qkv, true)?;
        let y = blas::attention_fwd(attn_gemm, &qkv, heads)?;
        let mut xm = fused::add_rows(&x, w.attn_proj_b);
        let w_o = plain(w.attn_proj_w, c);
        blas::gemm_par(blas, (n, c, c), plain(&y, c), w_o, &mut xm, true)?;
        let a2 = fused::layer_norm_rows(&xm, w.ln_2_w, w.ln_2_b, eps);
        let mut h = rows_of(w.c_fc_b, n);
        let w_fc = plain(w.c_fc_w, hid);
        blas::gemm_par(blas, (n, hid, c), plain(&a2, c), w_fc, &mut h, true)?;
        let g = act.forward(&h);
        let mut xo = fused::add_rows(&xm, w.mlp_proj_b);
        let w_proj = plain(w.mlp_proj_w, c);
        blas::gemm_par(blas, (n, c, hid), plain(&g, hid), w_proj, &mut xo, true)?;
        saved.push(Saved {
            x: std::mem::replace(&mut x, xo),
            a1,
            qkv,
            y,
            xm,
            a2,
            h,
            g,
        });
    }
    let hf = fused::layer_norm_rows(&x, p.ln_f_w, p.ln_f_b, eps);

    // Output layer and cross-entropy, a chunk of rows at a time: the logits are turned into
    // their gradient in place, then give the hidden states' and the output weights'.
    let sc = T::from(scale / n as f64).unwrap_or_else(T::zero);
    let mut dhf = buffers::zeros(n * c);
    let mut dlm = buffers::zeros(v * c);
    let row_losses = super::output_cross_entropy(
        blas,
        &hf,
        (lm, None),
        targets,
        LOSS_ROWS,
        &|_, _| sc,
        &mut dhf,
        (Some(&mut dlm[..]), None),
    )?;
    // Summed in row order: the same total every run.
    let loss: f64 = row_losses.iter().sum();
    let loss = loss / n as f64;

    // Backward.
    let mut grads: Gpt2Params<Vec<T>> = Gpt2Params {
        blocks: vec![Gpt2BlockParams::default(); p.blocks.len()],
        ..Default::default()
    };
    let mut dx = buffers::zeros(n * c);
    let d = fused::layer_norm_bwd_into(&x, p.ln_f_w, &dhf, eps, &mut dx, false);
    drop(dhf);
    grads.ln_f_w = d[..c].to_vec();
    grads.ln_f_b = d[c..].to_vec();
    for (w, g) in p.blocks.iter().zip(grads.blocks.iter_mut()).rev() {
        let s = saved.pop().expect("one saved entry per block");
        // xo = xm + act(h)·W_proj + b_proj
        g.mlp_proj_b = fused::column_sums(&dx, c);
        let gt = transposed(&s.g, hid);
        g.mlp_proj_w = blas::product(blas, (hid, c, n), gt, plain(&dx, c))?;
        let w_proj_t = transposed(w.mlp_proj_w, c);
        let dg = blas::product(blas, (n, hid, c), plain(&dx, c), w_proj_t)?;
        let dh = act.backward(&s.h, &dg);
        drop(dg);
        // h = LN2(xm)·W_fc + b_fc
        g.c_fc_b = fused::column_sums(&dh, hid);
        let a2t = transposed(&s.a2, c);
        g.c_fc_w = blas::product(blas, (c, hid, n), a2t, plain(&dh, hid))?;
        let w_fc_t = transposed(w.c_fc_w, hid);
        let da2 = blas::product(blas, (n, c, hid), plain(&dh, hid), w_fc_t)?;
        drop(dh);
        let d = fused::layer_norm_bwd_into(&s.xm, w.ln_2_w, &da2, eps, &mut dx, true);
        g.ln_2_w = d[..c].to_vec();
        g.ln_2_b = d[c..].to_vec();
        // xm = x + attention(qkv)·W_o + b_o
        g.attn_proj_b = fused::column_sums(&dx, c);
        let yt = transposed(&s.y, c);
        g.attn_proj_w = blas::product(blas, (c, c, n), yt, plain(&dx, c))?;
        let w_o_t = transposed(w.attn_proj_w, c);
        let dy = blas::product(blas, (n, c, c), plain(&dx, c), w_o_t)?;
        let dqkv = blas::attention_bwd(attn_gemm, &s.qkv, &dy, heads)?;
        drop(dy);
        // qkv = LN1(x)·W_attn + b_attn
        g.c_attn_b = fused::column_sums(&dqkv, 3 * c);
        let a1t = transposed(&s.a1, c);
        g.c_attn_w = blas::product(blas, (c, 3 * c, n), a1t, plain(&dqkv, 3 * c))?;
        let w_attn_t = transposed(w.c_attn_w, 3 * c);
        let da1 = blas::product(blas, (n, c, 3 * c), plain(&dqkv, 3 * c), w_attn_t)?;
        let d = fused::layer_norm_bwd_into(&s.x, w.ln_1_w, &da1, eps, &mut dx, true);
        g.ln_1_w = d[..c].to_vec();
        g.ln_1_b = d[c..].to_vec();
    }

    // Embeddings: rows of dx back to their token's and position's rows.
    let tied = p.lm_head.is_none();
    let mut dwte = if tied {
        std::mem::take(&mut dlm)
    } else {
        vec![T::zero(); v * c]
    };
    super::add_rows_by_id(&mut dwte, ids, &dx, c);
    let mut dwpe = vec![T::zero(); cfg.n_positions * c];
    dwpe[..t * c]
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(pos, o)| {
            for bi in 0..b {
                let row = &dx[(bi * t + pos) * c..(bi * t + pos + 1) * c];
                for (o, &d) in o.iter_mut().zip(row) {
                    *o += d;
                }
            }
        });
    grads.wte = dwte;
    grads.wpe = dwpe;
    grads.lm_head = (!tied).then_some(dlm);
    Ok((loss, grads))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::Gpt2Pass;
    use crate::passes::TrainPass;
    use candle_core::backprop::GradStore;
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};
    use lmkit_kernels::testing::max_diff;
    use lmkit_models::gpt2::Gpt2;
    use lmkit_models::{Gpt2Config, KvCache};

    fn config(tied: bool, act: &str) -> Gpt2Config {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 37, "n_positions": 12, "n_embd": 16, "n_layer": 2, "n_head": 4,
            "n_inner": 24, "activation_function": act, "tie_word_embeddings": tied,
        }))
        .unwrap()
    }

    /// candle's autograd through the model's graph (fused ops), the reference the hand-written
    /// passes are held to: the mean next-token cross-entropy of `x` → `y` and the gradients of
    /// that loss times `scale`.
    pub(crate) fn autograd_reference(
        model: &Gpt2,
        x: &Tensor,
        y: &Tensor,
        scale: f64,
    ) -> (f64, GradStore) {
        let (b, t) = x.dims2().unwrap();
        let h = model
            .hidden(x, &mut [&mut KvCache::single_pass(b)])
            .unwrap()
            .reshape((b * t, model.cfg.n_embd))
            .unwrap();
        let logits = h.matmul(&model.lm_head().t().unwrap()).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &y.flatten_all().unwrap()).unwrap();
        let value = loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        (value, (loss * scale).unwrap().backward().unwrap())
    }

    /// `got` within `tol`·max(1, max |want|) of `want`; a zero `want` is refused (it tests
    /// nothing).
    pub(crate) fn assert_gradient_close(got: &Tensor, want: &Tensor, tol: f64) {
        assert_eq!(got.dims(), want.dims());
        let diff = max_diff(got, want);
        let size = max_diff(want, &want.zeros_like().unwrap());
        assert!(
            size > 0.0,
            "a zero gradient tests nothing ({:?})",
            want.dims()
        );
        assert!(
            diff <= tol * size.max(1.0),
            "gradient of {:?}: max diff {diff} (max {size})",
            want.dims()
        );
    }

    /// Random tokens and next tokens, [2, 9].
    fn batch(dev: &Device) -> (Tensor, Tensor) {
        let mut ids = crate::passes::testing::tokens(36, 37, 7);
        let tg = ids.split_off(18);
        (
            Tensor::from_vec(ids, (2, 9), dev).unwrap(),
            Tensor::from_vec(tg, (2, 9), dev).unwrap(),
        )
    }

    /// The hand-written pass against candle's autograd through the model's graph (fused ops).
    fn compare(dtype: DType, tied: bool, act: &str, tol: f64) {
        if !lmkit_kernels::blas::available() {
            assert!(
                std::env::var_os("LMKIT_REQUIRE_BLAS").is_none(),
                "LMKIT_REQUIRE_BLAS is set but no BLAS library loaded"
            );
            return;
        }
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let cfg = config(tied, act);
        let model = Gpt2::new(&cfg, VarBuilder::from_varmap(&vm, dtype, &dev)).unwrap();
        // Every parameter random (VarBuilder's defaults leave weights and norms at 0).
        for (_, var) in lmkit_kernels::testing::vars_by_name(&vm) {
            let r = lmkit_kernels::testing::randn(0.0, 0.5, var.shape(), &dev).unwrap();
            var.set(&r.to_dtype(dtype).unwrap()).unwrap();
        }
        let (x, y) = batch(&dev);
        let scale = 0.5;
        let ours = Gpt2Pass(&model)
            .loss_and_grads(&x, &y, scale)
            .unwrap()
            .expect("fast path applies");

        let (want_loss, g) = autograd_reference(&model, &x, &y, scale);
        assert!(
            (ours.loss - want_loss).abs() < tol,
            "loss {} vs {want_loss}",
            ours.loss
        );
        let expected = if tied { 2 + 12 * 2 + 2 } else { 2 + 12 * 2 + 3 };
        assert_eq!(ours.grads.len(), expected);
        assert_eq!(vm.all_vars().len(), expected);
        for (p, ours_g) in &ours.grads {
            let want = g.get(p).expect("every parameter has a gradient");
            assert_gradient_close(ours_g, want, tol);
        }
    }

    #[test]
    fn hand_written_pass_equals_autograd_f64() {
        compare(DType::F64, true, "gelu_new", 1e-10);
        compare(DType::F64, false, "gelu_new", 1e-10);
        compare(DType::F64, true, "relu", 1e-10);
    }

    #[test]
    fn hand_written_pass_equals_autograd_f32() {
        compare(DType::F32, true, "gelu_new", 1e-4);
    }

    #[test]
    fn bad_batches_are_reported() {
        if !lmkit_kernels::blas::available() {
            return;
        }
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let model = Gpt2::new(
            &config(true, "gelu_new"),
            VarBuilder::from_varmap(&vm, DType::F32, &dev),
        )
        .unwrap();
        let ids = Tensor::from_vec(vec![1u32, 40, 2], (1, 3), &dev).unwrap();
        let pass = Gpt2Pass(&model);
        let err = pass
            .loss_and_grads(&ids, &ids.zeros_like().unwrap(), 1.0)
            .err()
            .expect("id 40 is outside the vocabulary");
        assert!(err.to_string().contains("token id 40"), "{err}");
        let long = Tensor::zeros((1, 13), DType::U32, &dev).unwrap();
        let err = pass.loss_and_grads(&long, &long, 1.0).err().unwrap();
        assert!(err.to_string().contains("n_positions"), "{err}");
        let short = Tensor::zeros((1, 2), DType::U32, &dev).unwrap();
        assert!(pass.loss_and_grads(&ids, &short, 1.0).is_err());
    }
}
