//! The Llama family's training pass written out by hand (RMSNorm, rotary embeddings, SwiGLU,
//! grouped-query attention; the layers of Llama, Mistral without a window, Qwen2, SmolLM2):
//! forward, cross-entropy and backward over plain buffers with BLAS products, no autograd graph.
//!
//! It serves pretraining (every position scored) and fine-tuning: only chosen positions scored
//! (assistant tokens), rows packed with several sequences (attention and positions restart at
//! each), LoRA adapters with their dropout, and frozen weights, which get no gradient and cost
//! no product. The tests below hold every gradient to the autograd path's in f64.

use super::params::{
    shared_lora_input_grads, shared_lora_inputs, with_params, LinIdx, LoraSaved, Params, Registry,
};
use super::{LossAndGrads, TrainPass};
use candle_core::Tensor;
use lmkit_kernels::blas::{self, Blas, BlasFloat, Gqa};
use lmkit_kernels::{buffers, fused};
use lmkit_models::layers::linear::Linear;
use lmkit_models::llama::{LayerParts, Llama};
use rayon::prelude::*;

/// Rows of the output layer's logits computed at a time (a few in tests, so that they cover the
/// accumulation over chunks).
const LOSS_ROWS: usize = if cfg!(test) { 5 } else { 512 };

/// A batch for [`scored_rows`].
pub struct Batch<'a> {
    /// Token ids [b, t], flattened.
    pub ids: &'a [u32],
    pub b: usize,
    pub t: usize,
    /// Each row's sequence lengths, in order, summing to t (packed rows); `None`: one sequence
    /// per row.
    pub segments: Option<&'a [Vec<usize>]>,
    /// The flattened positions whose next token is scored, and those tokens.
    pub rows: &'a [u32],
    pub targets: &'a [u32],
    /// The weight of scored row i's cross-entropy in the differentiated objective, given that
    /// cross-entropy (`None`: 1 for every row).
    pub weights: Option<&'a (dyn Fn(usize, f64) -> f64 + Sync)>,
}

/// What [`scored_rows`] gives: each scored row's cross-entropy, in order, and the gradients.
pub struct ScoredRows {
    pub row_losses: Vec<f64>,
    /// (parameter, gradient) pairs; a tied output layer's gradient is in the embedding's.
    pub grads: Vec<(Tensor, Tensor)>,
}

impl ScoredRows {
    /// The summed cross-entropy (added in row order: the same total every run).
    pub fn loss(&self) -> f64 {
        self.row_losses.iter().sum()
    }
}

/// The hand-written pass over a Llama-family model, as `lmkit train` uses it: every position
/// scored, every parameter trained.
pub struct LlamaPass<'a>(pub &'a Llama);

impl TrainPass for LlamaPass<'_> {
    fn loss_and_grads(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        scale: f64,
    ) -> candle_core::Result<Option<LossAndGrads>> {
        let (ids, targets, (b, t)) = super::ids_and_targets("Llama", ids, targets)?;
        let rows: Vec<u32> = (0..(b * t) as u32).collect();
        let batch = Batch {
            ids: &ids,
            b,
            t,
            segments: None,
            rows: &rows,
            targets: &targets,
            weights: None,
        };
        #[cfg(feature = "cuda")]
        if self
            .0
            .parts()
            .is_some_and(|p| p.embed_tokens.device().is_cuda())
        {
            check_batch(self.0, &batch)?;
            return super::llama_cuda::pass(self.0, &ids, &targets, (b, t), scale);
        }
        let n = (b * t).max(1) as f64;
        let r = scored_rows(self.0, &batch, scale / n, &|_| true)?;
        Ok(r.map(|r| LossAndGrads {
            loss: r.loss() / n,
            grads: r.grads,
        }))
    }
}

/// The cross-entropy of `batch.targets` at each of `batch.rows` and the gradients of their sum
/// (weighted by `batch.weights`) times `scale` for the parameters `trainable` picks (LoRA
/// matrices included; a tied output layer's gradient is in the embedding's). `None` where the
/// pass does not apply — not on the
/// CPU, not f32/f64, no BLAS library, quantized or transposed weights, Qwen3's head norms, a
/// sliding window, adapters on the output layer — and the caller differentiates the graph.
pub fn scored_rows(
    model: &Llama,
    batch: &Batch,
    scale: f64,
    trainable: &dyn Fn(&Tensor) -> bool,
) -> candle_core::Result<Option<ScoredRows>> {
    let Some(parts) = model.parts() else {
        return Ok(None);
    };
    let dtype = parts.embed_tokens.dtype();
    if !parts.embed_tokens.device().is_cpu() || !blas::available() {
        return Ok(None);
    }
    let (table, rotated) = parts.rope.table(batch.t)?;
    let hd = parts.layers.first().map_or(0, |l| l.head_dim);
    if rotated != hd || parts.lm_head.lora().is_some_and(|l| l.is_on()) {
        return Ok(None);
    }
    check_batch(model, batch)?;
    let spans = blas::sequence_spans(batch.b, batch.t, batch.segments)?;
    let n = batch.b * batch.t;

    // Every tensor the pass reads, each once (a tied output layer is the embedding).
    let mut reg = Registry::default();
    let embed = reg.add(parts.embed_tokens);
    let table = reg.add(&table);
    let mut layers = Vec::with_capacity(parts.layers.len());
    for l in &parts.layers {
        let Some(layer) = LayerIdx::new(&mut reg, l, n) else {
            return Ok(None);
        };
        layers.push(layer);
    }
    let norm = reg.add(parts.norm.weight());
    let Some(lm_head) = parts.lm_head.dense_weight() else {
        return Ok(None);
    };
    let lm_head = reg.add(lm_head);
    if reg.tensors.iter().any(|t| t.dtype() != dtype) {
        return Ok(None);
    }
    let model_idx = ModelIdx {
        embed,
        table,
        layers,
        norm,
        lm_head,
        eps: parts.norm.eps(),
    };
    let wants: Vec<bool> = reg.tensors.iter().map(|t| trainable(t)).collect();
    let blas = blas::require("Llama training pass")?;
    let grads = match dtype {
        candle_core::DType::F32 => {
            run::<f32>(&reg, &model_idx, &wants, blas, batch, &spans, scale)?
        }
        candle_core::DType::F64 => {
            run::<f64>(&reg, &model_idx, &wants, blas, batch, &spans, scale)?
        }
        _ => return Ok(None),
    };
    Ok(grads)
}

/// Ids within the vocabulary, sequences within the rope tables, rows and targets that match.
fn check_batch(model: &Llama, batch: &Batch) -> candle_core::Result<()> {
    let cfg = &model.cfg;
    let (v, n) = (cfg.vocab_size, batch.b * batch.t);
    if batch.ids.len() != n || batch.rows.len() != batch.targets.len() {
        candle_core::bail!(
            "Llama loss: {} ids for [{}, {}], {} scored rows for {} targets",
            batch.ids.len(),
            batch.b,
            batch.t,
            batch.rows.len(),
            batch.targets.len()
        );
    }
    for (what, list) in [("token id", batch.ids), ("target", batch.targets)] {
        if let Some(bad) = list.iter().find(|&&i| i as usize >= v) {
            candle_core::bail!("Llama: {what} {bad} is outside the vocabulary of {v}");
        }
    }
    if let Some(bad) = batch.rows.iter().find(|&&r| r as usize >= n) {
        candle_core::bail!("Llama loss: scored row {bad} is outside the batch's {n} positions");
    }
    Ok(())
}

struct LayerIdx {
    input_norm: usize,
    post_norm: usize,
    /// q, k, v.
    qkv: [LinIdx; 3],
    o: LinIdx,
    gate: LinIdx,
    up: LinIdx,
    down: LinIdx,
    heads: usize,
    kv_heads: usize,
    hd: usize,
}

impl LayerIdx {
    fn new<'a>(reg: &mut Registry<'a>, l: &LayerParts<'a>, rows: usize) -> Option<LayerIdx> {
        let lin = |reg: &mut Registry<'a>, x: &'a Linear| LinIdx::new(reg, x, rows);
        Some(LayerIdx {
            input_norm: reg.add(l.input_layernorm.weight()),
            post_norm: reg.add(l.post_attention_layernorm.weight()),
            qkv: [
                lin(reg, &l.qkv[0])?,
                lin(reg, &l.qkv[1])?,
                lin(reg, &l.qkv[2])?,
            ],
            o: lin(reg, l.o_proj)?,
            gate: lin(reg, &l.gate_up[0])?,
            up: lin(reg, &l.gate_up[1])?,
            down: lin(reg, l.down_proj)?,
            heads: l.n_head,
            kv_heads: l.n_kv,
            hd: l.head_dim,
        })
    }
}

struct ModelIdx {
    embed: usize,
    /// The rope table [positions, head_dim].
    table: usize,
    layers: Vec<LayerIdx>,
    norm: usize,
    lm_head: usize,
    eps: f64,
}

/// One layer's activations, kept from the forward pass for the backward pass.
struct Saved<T> {
    /// Layer input (residual stream), its norm, q|k|v after rotation, attention output.
    x: Vec<T>,
    a1: Vec<T>,
    qkv: Vec<T>,
    y: Vec<T>,
    /// Residual stream after attention, its norm, gate and up projections, silu(gate)·up.
    xm: Vec<T>,
    a2: Vec<T>,
    gate: Vec<T>,
    up: Vec<T>,
    g: Vec<T>,
    /// Adapters' saved values: q, k, v, o, gate, up, down.
    lora: [Option<LoraSaved<T>>; 7],
}

/// Runs the pass over the registry's tensors as `T`; `None` when one is not a contiguous CPU
/// tensor of `T`.
fn run<T: BlasFloat>(
    reg: &Registry<'_>,
    m: &ModelIdx,
    wants: &[bool],
    blas: &Blas,
    batch: &Batch,
    spans: &[(usize, usize)],
    scale: f64,
) -> candle_core::Result<Option<ScoredRows>> {
    let r = with_params::<T, _>(reg, wants, blas, |p| backprop(p, m, batch, spans, scale))?;
    Ok(r.map(|(row_losses, grads)| ScoredRows { row_losses, grads }))
}

/// The pass itself: each scored row's loss; gradients (times `scale`) into `p.grads`.
fn backprop<T: BlasFloat>(
    p: &mut Params<'_, T>,
    m: &ModelIdx,
    batch: &Batch,
    spans: &[(usize, usize)],
    scale: f64,
) -> candle_core::Result<Vec<f64>> {
    let blas = p.blas;
    let attn_gemm = T::attention_gemm(blas);
    let n = batch.b * batch.t;
    let c = p.data[m.norm].len();
    let v = p.data[m.embed].len() / c.max(1);
    let eps = m.eps;
    let positions = blas::span_positions(n, spans);
    let table = p.data[m.table];
    let max_pos = table.len() / m.layers.first().map_or(1, |l| l.hd).max(1);
    if let Some(&(_, len)) = spans.iter().find(|&&(_, len)| len > max_pos) {
        candle_core::bail!(
            "Llama: a sequence of {len} tokens is longer than max_position_embeddings ({max_pos})"
        );
    }

    // Forward. Embeddings.
    let e = p.data[m.embed];
    let mut x = buffers::par_filled(n * c, c, |r, row: &mut [T]| {
        let id = batch.ids[r] as usize;
        row.copy_from_slice(&e[id * c..(id + 1) * c]);
    });
    let mut saved: Vec<Saved<T>> = Vec::with_capacity(m.layers.len());
    for l in &m.layers {
        let (hd, qd, kvd) = (l.hd, l.heads * l.hd, l.kv_heads * l.hd);
        let w = qd + 2 * kvd;
        let a1 = fused::rms_norm_rows(&x, p.data[l.input_norm], eps);
        let mut qkv = buffers::zeros(n * w);
        let mut lq: [Option<LoraSaved<T>>; 3] = [None, None, None];
        let hs = shared_lora_inputs(p, &l.qkv.each_ref(), &a1, n)?;
        let mut col = 0;
        for ((part, slot), h) in l.qkv.iter().zip(lq.iter_mut()).zip(hs) {
            if let Some(b) = part.bias {
                let bias = p.data[b];
                qkv.par_chunks_mut(w)
                    .for_each(|row| row[col..col + part.out].copy_from_slice(bias));
            }
            *slot = part.forward(p, &a1, n, (&mut qkv[col..], w), part.bias.is_some(), h)?;
            col += part.out;
        }
        fused::rope_heads_in_place(&mut qkv, w, 0..qd + kvd, hd, &positions, table, false);
        let gqa = Gqa {
            spans,
            heads: l.heads,
            kv_heads: l.kv_heads,
            hd,
        };
        let y = blas::gqa_attention_fwd(attn_gemm, &qkv, gqa)?;
        let mut xm = match l.o.bias {
            Some(b) => fused::add_rows(&x, p.data[b]),
            None => x.clone(),
        };
        let lo = l.o.forward(p, &y, n, (&mut xm, c), true, None)?;
        let a2 = fused::rms_norm_rows(&xm, p.data[l.post_norm], eps);
        let mut hs = shared_lora_inputs(p, &[&l.gate, &l.up], &a2, n)?.into_iter();
        let (gate, lg) = l.gate.forward_new(p, &a2, n, hs.next().flatten())?;
        let (up, lu) = l.up.forward_new(p, &a2, n, hs.next().flatten())?;
        let g = fused::swiglu_rows(&gate, &up);
        let mut xo = match l.down.bias {
            Some(b) => fused::add_rows(&xm, p.data[b]),
            None => xm.clone(),
        };
        let ld = l.down.forward(p, &g, n, (&mut xo, c), true, None)?;
        let [q0, k0, v0] = lq;
        saved.push(Saved {
            x: std::mem::replace(&mut x, xo),
            a1,
            qkv,
            y,
            xm,
            a2,
            gate,
            up,
            g,
            lora: [q0, k0, v0, lo, lg, lu, ld],
        });
    }
    let hf = fused::rms_norm_rows(&x, p.data[m.norm], eps);

    // Output layer and cross-entropy over the scored rows, a chunk at a time: the logits are
    // turned into their gradient in place, then give the hidden states' and the output
    // weights'.
    let lm = p.data[m.lm_head];
    let cnt = batch.rows.len();
    let hs: Vec<T> = batch
        .rows
        .iter()
        .flat_map(|&r| hf[r as usize * c..(r as usize + 1) * c].iter().copied())
        .collect();
    drop(hf);
    let mut dhs = buffers::zeros(cnt * c);
    let want_lm = p.wants[m.lm_head];
    let mut dlm = if want_lm {
        p.take_grad(m.lm_head, v * c)
    } else {
        Vec::new()
    };
    let scale_of = |row: usize, loss: f64| {
        let w = batch.weights.map_or(1.0, |w| w(row, loss));
        T::from(scale * w).unwrap_or_else(T::zero)
    };
    let losses = super::output_cross_entropy(
        blas,
        &hs,
        (lm, None),
        batch.targets,
        LOSS_ROWS,
        &scale_of,
        &mut dhs,
        (want_lm.then_some(&mut dlm[..]), None),
    )?;
    if want_lm {
        p.add_grad(m.lm_head, dlm);
    }
    let mut dhf = buffers::zeros(n * c);
    for (&r, d) in batch.rows.iter().zip(dhs.chunks(c)) {
        let row = &mut dhf[r as usize * c..(r as usize + 1) * c];
        row.iter_mut().zip(d).for_each(|(o, &g)| *o += g);
    }
    drop(dhs);

    // Backward.
    let mut dx = buffers::zeros(n * c);
    let d = fused::rms_norm_bwd_into(&x, p.data[m.norm], &dhf, eps, &mut dx, false);
    drop(dhf);
    if p.wants[m.norm] {
        p.add_grad(m.norm, d);
    }
    for l in m.layers.iter().rev() {
        let mut s = saved.pop().expect("one saved entry per layer");
        let [lq, lk, lv, lo, lg, lu, ld] = &s.lora;
        let (hd, qd, kvd) = (l.hd, l.heads * l.hd, l.kv_heads * l.hd);
        let w = qd + 2 * kvd;
        let inter = l.gate.out;
        // xo = xm + (silu(gate)·up)·W_downᵀ
        let mut dg = Vec::new();
        l.down.backward(
            p,
            (&dx, c),
            &s.g,
            ld.as_ref(),
            || fused::column_sums(&dx, c),
            &mut dg,
        )?;
        // The saved gate and up projections become their gradients.
        fused::swiglu_bwd_in_place(&mut s.gate, &mut s.up, &dg);
        drop(dg);
        let (dgate, dup) = (&s.gate, &s.up);
        let mut da2 = Vec::new();
        let dh_gate = l.gate.backward_to_adapter(
            p,
            (dgate, inter),
            &s.a2,
            lg.as_ref(),
            || fused::column_sums(dgate, inter),
            &mut da2,
        )?;
        let dh_up = l.up.backward_to_adapter(
            p,
            (dup, inter),
            &s.a2,
            lu.as_ref(),
            || fused::column_sums(dup, inter),
            &mut da2,
        )?;
        shared_lora_input_grads(
            p,
            &[&l.gate, &l.up],
            &[dh_gate, dh_up],
            &[lg.as_ref(), lu.as_ref()],
            &s.a2,
            &mut da2,
        )?;
        let d = fused::rms_norm_bwd_into(&s.xm, p.data[l.post_norm], &da2, eps, &mut dx, true);
        if p.wants[l.post_norm] {
            p.add_grad(l.post_norm, d);
        }
        drop(da2);
        // xm = x + attention(qkv)·W_oᵀ
        let mut dy = Vec::new();
        l.o.backward(
            p,
            (&dx, c),
            &s.y,
            lo.as_ref(),
            || fused::column_sums(&dx, c),
            &mut dy,
        )?;
        let gqa = Gqa {
            spans,
            heads: l.heads,
            kv_heads: l.kv_heads,
            hd,
        };
        let mut dqkv = blas::gqa_attention_bwd(attn_gemm, &s.qkv, &dy, gqa)?;
        drop(dy);
        fused::rope_heads_in_place(&mut dqkv, w, 0..qd + kvd, hd, &positions, table, true);
        let has_bias = l.qkv.iter().any(|part| part.bias.is_some());
        let sums = if has_bias {
            fused::column_sums(&dqkv, w)
        } else {
            Vec::new()
        };
        let mut da1 = Vec::new();
        let mut col = 0;
        let mut dhs = Vec::with_capacity(3);
        for (part, ls) in l.qkv.iter().zip([lq, lk, lv]) {
            let range = col..col + part.out;
            dhs.push(part.backward_to_adapter(
                p,
                (&dqkv[col..], w),
                &s.a1,
                ls.as_ref(),
                || sums[range].to_vec(),
                &mut da1,
            )?);
            col += part.out;
        }
        shared_lora_input_grads(
            p,
            &l.qkv.each_ref(),
            &dhs,
            &[lq.as_ref(), lk.as_ref(), lv.as_ref()],
            &s.a1,
            &mut da1,
        )?;
        drop(dqkv);
        let d = fused::rms_norm_bwd_into(&s.x, p.data[l.input_norm], &da1, eps, &mut dx, true);
        if p.wants[l.input_norm] {
            p.add_grad(l.input_norm, d);
        }
    }

    // Embeddings: rows of dx back to their token's row.
    if p.wants[m.embed] {
        let mut de = p.take_grad(m.embed, v * c);
        super::add_rows_by_id(&mut de, batch.ids, &dx, c);
        p.add_grad(m.embed, de);
    }
    Ok(losses)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::gpt2::tests::assert_gradient_close;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};
    use lmkit_models::layers::lora::{Adapters, LoraSpec, Targets};
    use lmkit_models::{KvCache, LlamaConfig};

    /// A small model: 4 query heads sharing 2 key/value heads, attention and MLP biases when
    /// `bias`.
    fn config(tied: bool, bias: bool) -> LlamaConfig {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 37, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 16,
            "rms_norm_eps": 1e-5, "rope_theta": 100.0, "tie_word_embeddings": tied,
            "attention_bias": bias, "mlp_bias": bias,
        }))
        .unwrap()
    }

    /// A model with every parameter random (VarBuilder's defaults leave norms at 0), and its
    /// variables; adapters attached when given (also random: fresh B matrices are 0).
    fn model(cfg: &LlamaConfig, dtype: DType, adapters: Option<&Adapters>) -> (Llama, VarMap) {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let build = || {
            Llama::new(cfg, VarBuilder::from_varmap(&vm, dtype, &dev))
                .map_err(lmkit_models::ModelError::from)
        };
        let model = match adapters {
            Some(a) => a.build(build).unwrap(),
            None => build().unwrap(),
        };
        let mut vars: Vec<_> = lmkit_kernels::testing::vars_by_name(&vm)
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        if let Some(a) = adapters {
            vars.extend(a.vars().into_iter().map(|(_, v)| v));
        }
        for var in vars {
            let r = lmkit_kernels::testing::randn(0.0, 0.5, var.shape(), &dev).unwrap();
            var.set(&r.to_dtype(var.dtype()).unwrap()).unwrap();
        }
        (model, vm)
    }

    /// Token ids of the test vocabulary (37).
    fn tokens(count: usize, seed: u64) -> Vec<u32> {
        crate::passes::testing::tokens(count, 37, seed)
    }

    /// The summed loss at `batch.rows` and its gradients (times `scale`) through candle's
    /// autograd over the model's graph: the reference.
    fn autograd(
        model: &Llama,
        batch: &Batch,
        scale: f64,
    ) -> (f64, candle_core::backprop::GradStore) {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(batch.ids.to_vec(), (batch.b, batch.t), &dev).unwrap();
        let mut cache = match batch.segments {
            Some(s) => KvCache::packed(model.num_layers(), s.to_vec()),
            None => KvCache::single_pass(model.num_layers()),
        };
        let h = model.hidden(&x, &mut [&mut cache]).unwrap();
        let c = model.cfg.hidden_size;
        let rows = Tensor::from_vec(batch.rows.to_vec(), batch.rows.len(), &dev).unwrap();
        let h = h
            .reshape((batch.b * batch.t, c))
            .unwrap()
            .index_select(&rows, 0)
            .unwrap();
        let targets = Tensor::from_vec(batch.targets.to_vec(), batch.targets.len(), &dev).unwrap();
        let loss = crate::objective::output_loss_sum(model.output(), &h, &targets).unwrap();
        let value = loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        (value, (loss * scale).unwrap().backward().unwrap())
    }

    fn compare(model: &Llama, batch: &Batch, trained: &[Tensor], tol: f64) {
        let scale = 0.25;
        let ids: std::collections::HashSet<_> = trained.iter().map(|t| t.id()).collect();
        let ours = scored_rows(model, batch, scale, &|t| ids.contains(&t.id()))
            .unwrap()
            .expect("the pass applies");
        let (want, g) = autograd(model, batch, scale);
        let loss = ours.loss();
        assert!(
            (loss - want).abs() <= tol * want.abs().max(1.0),
            "loss {loss} vs {want}"
        );
        assert_eq!(
            ours.grads.len(),
            trained.len(),
            "one gradient per trained tensor"
        );
        for (p, got) in &ours.grads {
            assert!(ids.contains(&p.id()));
            assert_gradient_close(got, g.get(p).expect("a reference gradient"), tol);
        }
    }

    fn blas_or_skip() -> bool {
        let ok = lmkit_kernels::blas::available();
        assert!(
            ok || std::env::var_os("LMKIT_REQUIRE_BLAS").is_none(),
            "LMKIT_REQUIRE_BLAS is set but no BLAS library loaded"
        );
        ok
    }

    #[test]
    fn every_position_scored_equals_autograd_f64() {
        if !blas_or_skip() {
            return;
        }
        for (tied, bias) in [(false, false), (true, true)] {
            let (model, vm) = model(&config(tied, bias), DType::F64, None);
            let (b, t) = (2, 9);
            let ids = tokens(b * t, 7);
            let targets = tokens(b * t, 8);
            let rows: Vec<u32> = (0..(b * t) as u32).collect();
            let batch = Batch {
                ids: &ids,
                b,
                t,
                segments: None,
                rows: &rows,
                targets: &targets,
                weights: None,
            };
            let all: Vec<Tensor> = vm
                .all_vars()
                .iter()
                .map(|v| v.as_tensor().clone())
                .collect();
            compare(&model, &batch, &all, 1e-10);
        }
    }

    #[test]
    fn packed_rows_and_chosen_positions_equal_autograd_f64() {
        if !blas_or_skip() {
            return;
        }
        let (model, vm) = model(&config(true, true), DType::F64, None);
        let (b, t) = (2, 11);
        let ids = tokens(b * t, 3);
        let segments = vec![vec![4, 6, 1], vec![11]];
        let rows: Vec<u32> = vec![0, 2, 3, 5, 6, 7, 8, 11, 12, 20, 21];
        let targets = tokens(rows.len(), 4);
        let batch = Batch {
            ids: &ids,
            b,
            t,
            segments: Some(&segments),
            rows: &rows,
            targets: &targets,
            weights: None,
        };
        // Only some parameters trained: the others get no gradient.
        let trained: Vec<Tensor> = vm
            .all_vars()
            .iter()
            .map(|v| v.as_tensor().clone())
            .filter(|t| t.rank() == 2)
            .collect();
        compare(&model, &batch, &trained, 1e-10);
    }

    #[test]
    fn lora_adapters_with_and_without_dropout_equal_autograd() {
        if !blas_or_skip() {
            return;
        }
        // Without dropout the adapters of q, k, v (and of gate, up) run as one product;
        // with it each on its own input.
        for dropout in [0.25, 0.0] {
            lora_case(dropout);
        }
    }

    fn lora_case(dropout: f64) {
        let spec = LoraSpec {
            r: 3,
            alpha: 6.0,
            dropout,
            target_modules: Targets::One("all-linear".into()),
            ..Default::default()
        };
        let adapters = Adapters::fresh(spec, 5, &Device::Cpu);
        let (model, _) = model(&config(false, false), DType::F32, Some(&adapters));
        adapters.set_dropout_seed(Some(99));
        // B starts at zero (PEFT's initialisation), which would leave A's gradient and A's
        // part of dx at zero: give every B values.
        for (name, var) in adapters.vars() {
            if name.ends_with("B") {
                let v = lmkit_kernels::testing::randn(0f32, 0.5, var.shape(), &Device::Cpu);
                var.set(&v.unwrap()).unwrap();
            }
        }
        let (b, t) = (2, 8);
        let ids = tokens(b * t, 11);
        let rows: Vec<u32> = (3..(b * t) as u32).collect();
        let targets = tokens(rows.len(), 12);
        let batch = Batch {
            ids: &ids,
            b,
            t,
            segments: None,
            rows: &rows,
            targets: &targets,
            weights: None,
        };
        let trained: Vec<Tensor> = adapters
            .vars()
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect();
        assert_eq!(trained.len(), 2 * 7 * 2, "A and B on 7 layers of 2 blocks");
        compare(&model, &batch, &trained, 2e-4);
    }

    #[test]
    fn rows_weighted_by_their_own_loss_equal_autograd_f64() {
        if !blas_or_skip() {
            return;
        }
        let (model, vm) = model(&config(false, false), DType::F64, None);
        let (b, t) = (2, 7);
        let ids = tokens(b * t, 21);
        let rows: Vec<u32> = vec![1, 2, 4, 5, 8, 9, 10, 13];
        let targets = tokens(rows.len(), 22);
        // A weight that depends on the row and on its cross-entropy (as RL's per-token terms).
        let weight = |row: usize, ce: f64| (row as f64 - 3.0) * 0.3 + (-ce).exp();
        let batch = Batch {
            ids: &ids,
            b,
            t,
            segments: None,
            rows: &rows,
            targets: &targets,
            weights: Some(&weight),
        };
        let all: Vec<Tensor> = vm
            .all_vars()
            .iter()
            .map(|v| v.as_tensor().clone())
            .collect();
        let ids_set: std::collections::HashSet<_> = all.iter().map(|t| t.id()).collect();
        let scale = 0.5;
        let ours = scored_rows(&model, &batch, scale, &|t| ids_set.contains(&t.id()))
            .unwrap()
            .unwrap();
        // Reference: Σ w(ce_i)·ce_i with the weights held constant, differentiated.
        let dev = Device::Cpu;
        let x = Tensor::from_vec(ids.clone(), (b, t), &dev).unwrap();
        let h = model
            .hidden(&x, &mut [&mut KvCache::single_pass(model.num_layers())])
            .unwrap()
            .reshape((b * t, model.cfg.hidden_size))
            .unwrap()
            .index_select(
                &Tensor::from_vec(rows.clone(), rows.len(), &dev).unwrap(),
                0,
            )
            .unwrap();
        let logits = candle_core::Module::forward(model.output(), &h).unwrap();
        let lp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).unwrap();
        let tg = Tensor::from_vec(targets.clone(), (rows.len(), 1), &dev).unwrap();
        let ce = lp
            .gather(&tg, 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        let values: Vec<f64> = ce.to_vec1().unwrap();
        for (got, want) in ours.row_losses.iter().zip(&values) {
            assert!((got - want).abs() < 1e-10, "row loss {got} vs {want}");
        }
        let w: Vec<f64> = values
            .iter()
            .enumerate()
            .map(|(i, &c)| weight(i, c) * scale)
            .collect();
        let w = Tensor::from_vec(w, rows.len(), &dev).unwrap();
        let g = (ce * w).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(ours.grads.len(), all.len());
        for (p, got) in &ours.grads {
            assert_gradient_close(got, g.get(p).unwrap(), 1e-10);
        }
    }

    #[test]
    fn bad_batches_are_reported() {
        if !blas_or_skip() {
            return;
        }
        let (model, _) = model(&config(false, false), DType::F32, None);
        let pass = LlamaPass(&model);
        let dev = Device::Cpu;
        let ids = Tensor::from_vec(vec![1u32, 40, 2], (1, 3), &dev).unwrap();
        let err = pass
            .loss_and_grads(&ids, &ids.zeros_like().unwrap(), 1.0)
            .err()
            .expect("id 40 is outside the vocabulary");
        assert!(err.to_string().contains("token id 40"), "{err}");
        let long = Tensor::zeros((1, 17), DType::U32, &dev).unwrap();
        let err = pass.loss_and_grads(&long, &long, 1.0).err().unwrap();
        assert!(err.to_string().contains("max_position_embeddings"), "{err}");
    }
}
