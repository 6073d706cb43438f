//! The encoder-decoder's training pass written out by hand (transformers' BART layout:
//! post-norm layers, learned positions, a bidirectional encoder, a decoder with causal
//! self-attention and cross-attention, the output layer tied to the token embeddings plus
//! `final_logits_bias`): forward, cross-entropy and backward over plain buffers with BLAS
//! products, no autograd graph. Each sequence attends over its own real tokens only, so padding
//! costs no attention work. The tests below hold every gradient to the autograd path's in f64.

use super::params::{with_params, LinIdx, LoraSaved, Params, Registry};
use super::{Act, LossAndGrads};
use crate::seq2seq::PairBatch;
use lmkit_kernels::blas::{self, BlasFloat};
use lmkit_kernels::fused;
use lmkit_kernels::padded_attention::{masked_attention_bwd, masked_attention_fwd, Padded};
use lmkit_models::bart::{AttentionParts, Bart, LayerParts, StackParts};
use lmkit_models::layers::ops::LayerNorm;
use rayon::prelude::*;

/// Rows of the output layer's logits computed at a time (a few in tests, so that they cover the
/// accumulation over chunks).
const LOSS_ROWS: usize = if cfg!(test) { 5 } else { 512 };

/// The mean cross-entropy of the batch's targets and every parameter's gradient times `scale`.
/// `None` where the pass does not apply — not on the CPU, not f32/f64, no BLAS library, an
/// activation without a fused kernel, quantized weights — and the caller differentiates the
/// graph instead.
pub fn loss_and_grads(
    model: &Bart,
    batch: &PairBatch,
    scale: f64,
) -> candle_core::Result<Option<LossAndGrads>> {
    let parts = model.parts();
    let Some(act) = Act::named(parts.activation) else {
        return Ok(None);
    };
    let dtype = parts.shared.dtype();
    if !parts.shared.device().is_cpu() || !blas::available() {
        return Ok(None);
    }
    check_batch(model, batch)?;
    let (ne, nd) = (batch.b * batch.s, batch.b * batch.t);
    let mut reg = Registry::default();
    let shared = reg.add(parts.shared);
    let bias = reg.add(parts.final_logits_bias);
    let (Some(encoder), Some(decoder)) = (
        StackIdx::new(&mut reg, &parts.encoder, ne, ne),
        StackIdx::new(&mut reg, &parts.decoder, nd, ne),
    ) else {
        return Ok(None);
    };
    if reg.tensors.iter().any(|t| t.dtype() != dtype) {
        return Ok(None);
    }
    let m = ModelIdx {
        shared,
        bias,
        embed_scale: parts.embed_scale,
        act,
        encoder,
        decoder,
    };
    let wants = vec![true; reg.tensors.len()];
    let blas = blas::require("encoder-decoder training pass")?;
    let cnt = batch.dec_lens.iter().sum::<usize>().max(1) as f64;
    let r = match dtype {
        candle_core::DType::F32 => {
            with_params::<f32, _>(&reg, &wants, blas, |p| backprop(p, &m, batch, scale / cnt))?
        }
        candle_core::DType::F64 => {
            with_params::<f64, _>(&reg, &wants, blas, |p| backprop(p, &m, batch, scale / cnt))?
        }
        _ => return Ok(None),
    };
    Ok(r.map(|(loss, grads)| LossAndGrads {
        loss: loss / cnt,
        grads,
    }))
}

/// Ids within the vocabulary, sequences within the positions, lengths that fit the batch.
fn check_batch(model: &Bart, b: &PairBatch) -> candle_core::Result<()> {
    let cfg = &model.cfg;
    let (v, max) = (cfg.vocab_size, cfg.max_position_embeddings);
    let shapes = b.src.len() == b.b * b.s
        && b.dec_in.len() == b.b * b.t
        && b.labels.len() == b.b * b.t
        && b.src_lens.len() == b.b
        && b.dec_lens.len() == b.b
        && b.src_lens.iter().all(|&n| n <= b.s)
        && b.dec_lens.iter().all(|&n| n <= b.t);
    if !shapes {
        candle_core::bail!(
            "encoder-decoder loss: a batch whose ids or lengths do not match [{}, {}] sources and \
             [{}, {}] targets",
            b.b,
            b.s,
            b.b,
            b.t
        );
    }
    if let Some(n) = [b.s, b.t].into_iter().find(|&n| n > max) {
        candle_core::bail!("{n} tokens exceed max_position_embeddings ({max})");
    }
    for (what, list) in [
        ("source id", &b.src),
        ("decoder input", &b.dec_in),
        ("target", &b.labels),
    ] {
        if let Some(bad) = list.iter().find(|&&i| i as usize >= v) {
            candle_core::bail!("encoder-decoder: {what} {bad} is outside the vocabulary of {v}");
        }
    }
    Ok(())
}

/// A layer norm's weight and bias.
struct NormIdx {
    w: usize,
    b: usize,
    eps: f64,
}

impl NormIdx {
    fn new<'a>(reg: &mut Registry<'a>, n: &'a LayerNorm) -> NormIdx {
        NormIdx {
            w: reg.add(n.weight()),
            b: reg.add(n.bias()),
            eps: n.eps(),
        }
    }

    fn forward<T: BlasFloat>(&self, p: &Params<'_, T>, x: &[T]) -> Vec<T> {
        fused::layer_norm_rows(x, p.data[self.w], p.data[self.b], self.eps)
    }

    /// The gradient of the norm's input `x` from that of its output (written into `dx`, or
    /// added when `accumulate`); the weight's and bias's gradients gathered.
    fn backward<T: BlasFloat>(
        &self,
        p: &mut Params<'_, T>,
        x: &[T],
        dout: &[T],
        dx: &mut [T],
        accumulate: bool,
    ) {
        let d = fused::layer_norm_bwd_into(x, p.data[self.w], dout, self.eps, dx, accumulate);
        let c = d.len() / 2;
        p.add_grad(self.w, d[..c].to_vec());
        p.add_grad(self.b, d[c..].to_vec());
    }
}

/// An attention block: its projections (q, k, v, out) and heads.
struct AttnIdx {
    q: LinIdx,
    k: LinIdx,
    v: LinIdx,
    out: LinIdx,
    heads: usize,
}

impl AttnIdx {
    /// `rows` query rows, `kv_rows` key/value rows (the same for self-attention).
    fn new<'a>(
        reg: &mut Registry<'a>,
        a: &AttentionParts<'a>,
        rows: usize,
        kv_rows: usize,
    ) -> Option<AttnIdx> {
        Some(AttnIdx {
            q: LinIdx::new(reg, a.q, rows)?,
            k: LinIdx::new(reg, a.k, kv_rows)?,
            v: LinIdx::new(reg, a.v, kv_rows)?,
            out: LinIdx::new(reg, a.out, rows)?,
            heads: a.heads,
        })
    }
}

struct LayerIdx {
    self_attn: AttnIdx,
    self_norm: NormIdx,
    cross: Option<(AttnIdx, NormIdx)>,
    fc1: LinIdx,
    fc2: LinIdx,
    final_norm: NormIdx,
}

struct StackIdx {
    positions: usize,
    norm: NormIdx,
    layers: Vec<LayerIdx>,
}

impl StackIdx {
    /// A stack over `rows` rows (cross-attention keys over `memory_rows`).
    fn new<'a>(
        reg: &mut Registry<'a>,
        s: &StackParts<'a>,
        rows: usize,
        memory_rows: usize,
    ) -> Option<StackIdx> {
        let positions = reg.add(s.positions);
        let norm = NormIdx::new(reg, s.norm);
        let layers = s
            .layers
            .iter()
            .map(|l: &LayerParts<'a>| {
                let cross = match &l.cross {
                    Some((a, n)) => Some((
                        AttnIdx::new(reg, a, rows, memory_rows)?,
                        NormIdx::new(reg, n),
                    )),
                    None => None,
                };
                Some(LayerIdx {
                    self_attn: AttnIdx::new(reg, &l.self_attn, rows, rows)?,
                    self_norm: NormIdx::new(reg, l.self_norm),
                    cross,
                    fc1: LinIdx::new(reg, l.fc1, rows)?,
                    fc2: LinIdx::new(reg, l.fc2, rows)?,
                    final_norm: NormIdx::new(reg, l.final_norm),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(StackIdx {
            positions,
            norm,
            layers,
        })
    }
}

struct ModelIdx {
    shared: usize,
    bias: usize,
    embed_scale: f64,
    act: Act,
    encoder: StackIdx,
    decoder: StackIdx,
}

/// The saved values of several layers' adapters.
type Adapters<T> = Vec<Option<LoraSaved<T>>>;

/// Linear layers applied to the same input `x` [n, in], their outputs side by side in one
/// buffer [n, Σ out] (q|k|v of self-attention, k|v of cross-attention).
fn project<T: BlasFloat>(
    p: &Params<'_, T>,
    parts: &[&LinIdx],
    x: &[T],
    n: usize,
) -> candle_core::Result<(Vec<T>, Adapters<T>)> {
    let w: usize = parts.iter().map(|l| l.out).sum();
    let mut out = vec![T::zero(); n * w];
    let mut saved = Vec::with_capacity(parts.len());
    let mut col = 0;
    for part in parts {
        if let Some(b) = part.bias {
            let bias = p.data[b];
            out.par_chunks_mut(w)
                .for_each(|row| row[col..col + part.out].copy_from_slice(bias));
        }
        saved.push(part.forward(p, x, n, (&mut out[col..], w), part.bias.is_some())?);
        col += part.out;
    }
    Ok((out, saved))
}

/// The backward of [`project`]: from the gradient `d` of the side-by-side outputs, the layers'
/// gradients and dx = Σ d_i·W_i added to `dx` (written as a new buffer when it is empty).
fn project_bwd<T: BlasFloat>(
    p: &mut Params<'_, T>,
    parts: &[&LinIdx],
    d: &[T],
    x: &[T],
    saved: &[Option<LoraSaved<T>>],
    dx: &mut Vec<T>,
) -> candle_core::Result<()> {
    let w: usize = parts.iter().map(|l| l.out).sum();
    let sums = if parts.iter().any(|l| l.bias.is_some()) {
        fused::column_sums(d, w)
    } else {
        Vec::new()
    };
    let mut col = 0;
    for (part, s) in parts.iter().zip(saved) {
        let range = col..col + part.out;
        part.backward(
            p,
            (&d[col..], w),
            x,
            s.as_ref(),
            || sums[range].to_vec(),
            dx,
        )?;
        col += part.out;
    }
    Ok(())
}

/// `x` plus a linear layer's bias (when it has one) in every row: the start of a residual add.
fn residual<T: BlasFloat>(p: &Params<'_, T>, x: &[T], l: &LinIdx) -> Vec<T> {
    match l.bias {
        Some(b) => fused::add_rows(x, p.data[b]),
        None => x.to_vec(),
    }
}

/// What an attention block keeps from the forward pass.
struct AttnSaved<T> {
    /// The queries (q|k|v side by side for self-attention), the keys and values of
    /// cross-attention, the attention output, and the adapters' values.
    q: Vec<T>,
    kv: Option<Vec<T>>,
    y: Vec<T>,
    lora_q: Vec<Option<LoraSaved<T>>>,
    lora_kv: Vec<Option<LoraSaved<T>>>,
    lora_out: Option<LoraSaved<T>>,
    /// The residual sum before the block's norm.
    r: Vec<T>,
}

/// Where a stack's rows are: sequences of `rows` positions, the first `lens[i]` real.
#[derive(Clone, Copy)]
struct Seqs<'a> {
    rows: usize,
    lens: &'a [usize],
}

impl AttnIdx {
    fn hd(&self) -> usize {
        self.q.out / self.heads.max(1)
    }

    /// Self-attention over `x` (rows as `seqs`) or cross-attention to `memory`, the residual
    /// add: the sum before the block's norm and what the backward pass needs.
    fn forward<T: BlasFloat>(
        &self,
        p: &Params<'_, T>,
        x: &[T],
        seqs: Seqs,
        memory: Option<(&[T], Seqs)>,
        causal: bool,
    ) -> candle_core::Result<AttnSaved<T>> {
        let gemm = T::gemm(p.blas);
        let c = self.q.out;
        let n = x.len() / self.q.inp.max(1);
        let hd = self.hd();
        let scale = T::one() / T::from(hd).unwrap_or_else(T::one).sqrt();
        let (q, kv, lora_q, lora_kv, y) = match memory {
            None => {
                let (qkv, saved) = project(p, &[&self.q, &self.k, &self.v], x, n)?;
                let s = Padded::packed(self.heads, hd, seqs.rows, seqs.lens, causal);
                let y = masked_attention_fwd(gemm, &qkv, &qkv, s, scale)?;
                (qkv, None, saved, Vec::new(), y)
            }
            Some((mem, ms)) => {
                let (q, lq) = project(p, &[&self.q], x, n)?;
                let (kv, lkv) = project(p, &[&self.k, &self.v], mem, mem.len() / self.k.inp)?;
                let y = masked_attention_fwd(gemm, &q, &kv, self.cross(seqs, ms), scale)?;
                (q, Some(kv), lq, lkv, y)
            }
        };
        let mut r = residual(p, x, &self.out);
        let lora_out = self.out.forward(p, &y, n, (&mut r, c), true)?;
        Ok(AttnSaved {
            q,
            kv,
            y,
            lora_q,
            lora_kv,
            lora_out,
            r,
        })
    }

    /// Cross-attention's places: queries [rows, c], keys|values [memory rows, 2c].
    fn cross<'a>(&self, seqs: Seqs<'a>, ms: Seqs<'a>) -> Padded<'a> {
        let c = self.q.out;
        Padded {
            heads: self.heads,
            hd: self.hd(),
            q_rows: seqs.rows,
            k_rows: ms.rows,
            q_lens: seqs.lens,
            k_lens: ms.lens,
            q_ld: c,
            q_col: 0,
            kv_ld: 2 * c,
            k_col: 0,
            v_col: c,
            causal: false,
        }
    }

    /// From dr, the gradient of the residual sum: the block's gradients, dx (the residual's dr
    /// plus the queries' part; also the keys' and values' for self-attention) and, for
    /// cross-attention, the memory's added to `dmem`.
    #[allow(clippy::too_many_arguments)]
    fn backward<T: BlasFloat>(
        &self,
        p: &mut Params<'_, T>,
        s: &AttnSaved<T>,
        x: &[T],
        dr: Vec<T>,
        seqs: Seqs,
        memory: Option<(&[T], Seqs, &mut Vec<T>)>,
        causal: bool,
    ) -> candle_core::Result<Vec<T>> {
        let gemm = T::gemm(p.blas);
        let c = self.q.out;
        let hd = self.hd();
        let scale = T::one() / T::from(hd).unwrap_or_else(T::one).sqrt();
        let mut dy = Vec::new();
        let sums = || fused::column_sums(&dr, c);
        self.out
            .backward(p, (&dr, c), &s.y, s.lora_out.as_ref(), sums, &mut dy)?;
        let mut dx = dr;
        match memory {
            None => {
                let sp = Padded::packed(self.heads, hd, seqs.rows, seqs.lens, causal);
                let mut dqkv = vec![T::zero(); s.q.len()];
                masked_attention_bwd(gemm, &s.q, &s.q, &dy, sp, scale, &mut dqkv, None)?;
                drop(dy);
                let parts = [&self.q, &self.k, &self.v];
                project_bwd(p, &parts, &dqkv, x, &s.lora_q, &mut dx)?;
            }
            Some((mem, ms, dmem)) => {
                let kv = s.kv.as_deref().unwrap_or_default();
                let mut dq = vec![T::zero(); s.q.len()];
                let mut dkv = vec![T::zero(); kv.len()];
                let sp = self.cross(seqs, ms);
                masked_attention_bwd(gemm, &s.q, kv, &dy, sp, scale, &mut dq, Some(&mut dkv))?;
                drop(dy);
                project_bwd(p, &[&self.q], &dq, x, &s.lora_q, &mut dx)?;
                project_bwd(p, &[&self.k, &self.v], &dkv, mem, &s.lora_kv, dmem)?;
            }
        }
        Ok(dx)
    }
}

/// What a layer keeps from the forward pass.
struct LayerSaved<T> {
    /// The layer's input, the self-attention block, its norm's output.
    x: Vec<T>,
    attn: AttnSaved<T>,
    x1: Vec<T>,
    /// The cross-attention block and its norm's output (decoder layers).
    cross: Option<(AttnSaved<T>, Vec<T>)>,
    /// The feed-forward block's pre-activation, activation and residual sum.
    h: Vec<T>,
    g: Vec<T>,
    r: Vec<T>,
    lora_fc: [Option<LoraSaved<T>>; 2],
}

impl LayerIdx {
    /// The layer's output and what its backward pass needs.
    fn forward<T: BlasFloat>(
        &self,
        p: &Params<'_, T>,
        act: Act,
        x: Vec<T>,
        seqs: Seqs,
        memory: Option<(&[T], Seqs)>,
    ) -> candle_core::Result<(Vec<T>, LayerSaved<T>)> {
        let causal = memory.is_some();
        let attn = self.self_attn.forward(p, &x, seqs, None, causal)?;
        let x1 = self.self_norm.forward(p, &attn.r);
        let (cross, xf) = match (&self.cross, memory) {
            (Some((a, norm)), Some(mem)) => {
                let s = a.forward(p, &x1, seqs, Some(mem), false)?;
                let x2 = norm.forward(p, &s.r);
                (Some((s, x2.clone())), x2)
            }
            _ => (None, x1.clone()),
        };
        let n = xf.len() / self.fc1.inp.max(1);
        let (h, l1) = self.fc1.forward_new(p, &xf, n)?;
        let g = act.forward(&h);
        let mut r = residual(p, &xf, &self.fc2);
        let l2 = self.fc2.forward(p, &g, n, (&mut r, self.fc2.out), true)?;
        let out = self.final_norm.forward(p, &r);
        Ok((
            out,
            LayerSaved {
                x,
                attn,
                x1,
                cross,
                h,
                g,
                r,
                lora_fc: [l1, l2],
            },
        ))
    }

    /// From the gradient of the layer's output, the gradient of its input (and the memory's,
    /// added to `dmem`, for decoder layers).
    fn backward<T: BlasFloat>(
        &self,
        p: &mut Params<'_, T>,
        act: Act,
        s: LayerSaved<T>,
        dout: &[T],
        seqs: Seqs,
        memory: Option<(&[T], Seqs, &mut Vec<T>)>,
    ) -> candle_core::Result<Vec<T>> {
        let causal = memory.is_some();
        let c = self.fc2.out;
        let mut dr = vec![T::zero(); dout.len()];
        self.final_norm.backward(p, &s.r, dout, &mut dr, false);
        // r = xf + act(xf·W1ᵀ + b1)·W2ᵀ + b2
        let xf = s.cross.as_ref().map_or(&s.x1, |(_, x2)| x2);
        let mut dg = Vec::new();
        let [l1, l2] = &s.lora_fc;
        let sums = || fused::column_sums(&dr, c);
        self.fc2
            .backward(p, (&dr, c), &s.g, l2.as_ref(), sums, &mut dg)?;
        let dh = act.backward(&s.h, &dg);
        drop(dg);
        let mut dxf = dr;
        let inner = self.fc1.out;
        let sums = || fused::column_sums(&dh, inner);
        self.fc1
            .backward(p, (&dh, inner), xf, l1.as_ref(), sums, &mut dxf)?;
        drop(dh);
        let dx1 = match (&self.cross, &s.cross, memory) {
            (Some((a, norm)), Some((cs, _)), Some(mem)) => {
                let mut dr2 = vec![T::zero(); dxf.len()];
                norm.backward(p, &cs.r, &dxf, &mut dr2, false);
                a.backward(p, cs, &s.x1, dr2, seqs, Some(mem), false)?
            }
            _ => dxf,
        };
        let mut dr1 = vec![T::zero(); dx1.len()];
        self.self_norm.backward(p, &s.attn.r, &dx1, &mut dr1, false);
        drop(dx1);
        self.self_attn
            .backward(p, &s.attn, &s.x, dr1, seqs, None, causal)
    }
}

/// A stack's embeddings of `ids` (rows as `seqs`): the sum before the norm
/// (scale·token + position) and the norm's output.
fn embed<T: BlasFloat>(
    p: &Params<'_, T>,
    m: &ModelIdx,
    stack: &StackIdx,
    ids: &[u32],
    seqs: Seqs,
) -> (Vec<T>, Vec<T>) {
    let (e, pos) = (p.data[m.shared], p.data[stack.positions]);
    let c = p.data[stack.norm.w].len();
    let sc = T::from(m.embed_scale).unwrap_or_else(T::one);
    let mut pre = vec![T::zero(); ids.len() * c];
    pre.par_chunks_mut(c)
        .zip(ids)
        .enumerate()
        .for_each(|(r, (row, &id))| {
            let er = &e[id as usize * c..(id as usize + 1) * c];
            let at = r % seqs.rows + 2;
            let pr = &pos[at * c..(at + 1) * c];
            for ((o, &a), &b) in row.iter_mut().zip(er).zip(pr) {
                *o = sc * a + b;
            }
        });
    let x = stack.norm.forward(p, &pre);
    (pre, x)
}

/// The backward of [`embed`]: the norm's, the positions' and the token embeddings' gradients
/// (the latter added to `dshared`).
#[allow(clippy::too_many_arguments)]
fn embed_bwd<T: BlasFloat>(
    p: &mut Params<'_, T>,
    m: &ModelIdx,
    stack: &StackIdx,
    ids: &[u32],
    seqs: Seqs,
    pre: &[T],
    dx: &[T],
    dshared: &mut [T],
) {
    let c = p.data[stack.norm.w].len();
    let mut dpre = vec![T::zero(); dx.len()];
    stack.norm.backward(p, pre, dx, &mut dpre, false);
    let sc = T::from(m.embed_scale).unwrap_or_else(T::one);
    let mut dpos = vec![T::zero(); p.data[stack.positions].len()];
    for (r, (row, &id)) in dpre.chunks(c).zip(ids).enumerate() {
        let at = r % seqs.rows + 2;
        let o = &mut dpos[at * c..(at + 1) * c];
        o.iter_mut().zip(row).for_each(|(o, &d)| *o += d);
        let o = &mut dshared[id as usize * c..(id as usize + 1) * c];
        o.iter_mut().zip(row).for_each(|(o, &d)| *o += sc * d);
    }
    p.add_grad(stack.positions, dpos);
}

/// The pass itself: the summed loss; gradients (times `scale`) into `p.grads`.
fn backprop<T: BlasFloat>(
    p: &mut Params<'_, T>,
    m: &ModelIdx,
    batch: &PairBatch,
    scale: f64,
) -> candle_core::Result<f64> {
    let blas = p.blas;
    let enc = Seqs {
        rows: batch.s,
        lens: &batch.src_lens,
    };
    let dec = Seqs {
        rows: batch.t,
        lens: &batch.dec_lens,
    };
    let c = p.data[m.encoder.norm.w].len();
    let v = p.data[m.shared].len() / c.max(1);

    // Forward: the encoder, then the decoder over its output.
    let (enc_pre, mut x) = embed(p, m, &m.encoder, &batch.src, enc);
    let mut enc_saved = Vec::with_capacity(m.encoder.layers.len());
    for l in &m.encoder.layers {
        let (out, s) = l.forward(p, m.act, x, enc, None)?;
        enc_saved.push(s);
        x = out;
    }
    let memory = x;
    let (dec_pre, mut z) = embed(p, m, &m.decoder, &batch.dec_in, dec);
    let mut dec_saved = Vec::with_capacity(m.decoder.layers.len());
    for l in &m.decoder.layers {
        let (out, s) = l.forward(p, m.act, z, dec, Some((&memory, enc)))?;
        dec_saved.push(s);
        z = out;
    }

    // Output layer and cross-entropy over the scored rows.
    let rows: Vec<usize> = batch.scored_rows().collect();
    let targets: Vec<u32> = rows.iter().map(|&r| batch.labels[r]).collect();
    let hs: Vec<T> = rows
        .iter()
        .flat_map(|&r| z[r * c..(r + 1) * c].iter().copied())
        .collect();
    drop(z);
    let mut dhs = vec![T::zero(); hs.len()];
    let mut dshared = vec![T::zero(); v * c];
    let mut dbias = vec![T::zero(); v];
    let sc = T::from(scale).unwrap_or_else(T::zero);
    let losses = super::output_cross_entropy(
        blas,
        &hs,
        (p.data[m.shared], Some(p.data[m.bias])),
        &targets,
        LOSS_ROWS,
        &|_, _| sc,
        &mut dhs,
        (Some(&mut dshared[..]), Some(&mut dbias[..])),
    )?;
    p.add_grad(m.bias, dbias);
    let mut dz = vec![T::zero(); batch.dec_in.len() * c];
    for (&r, d) in rows.iter().zip(dhs.chunks(c)) {
        dz[r * c..(r + 1) * c].copy_from_slice(d);
    }
    drop(dhs);

    // Backward: the decoder (gathering the memory's gradient), then the encoder.
    let mut dmem = Vec::new();
    for l in m.decoder.layers.iter().rev() {
        let s = dec_saved.pop().expect("one saved entry per layer");
        dz = l.backward(p, m.act, s, &dz, dec, Some((&memory, enc, &mut dmem)))?;
    }
    embed_bwd(
        p,
        m,
        &m.decoder,
        &batch.dec_in,
        dec,
        &dec_pre,
        &dz,
        &mut dshared,
    );
    drop(dz);
    let mut dx = if dmem.is_empty() {
        vec![T::zero(); memory.len()]
    } else {
        dmem
    };
    for l in m.encoder.layers.iter().rev() {
        let s = enc_saved.pop().expect("one saved entry per layer");
        dx = l.backward(p, m.act, s, &dx, enc, None)?;
    }
    embed_bwd(
        p,
        m,
        &m.encoder,
        &batch.src,
        enc,
        &enc_pre,
        &dx,
        &mut dshared,
    );
    p.add_grad(m.shared, dshared);
    // Summed in row order: the same total every run.
    Ok(losses.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::gpt2::tests::assert_gradient_close;
    use crate::seq2seq::{batch, Pair};
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};
    use lmkit_models::bart::BartConfig;

    fn model(act: &str, dtype: DType) -> (Bart, VarMap) {
        let cfg: BartConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 29, "d_model": 8, "encoder_layers": 2, "decoder_layers": 2,
            "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 12,
            "decoder_ffn_dim": 12, "max_position_embeddings": 16, "scale_embedding": true,
            "activation_function": act,
        }))
        .unwrap();
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let m = Bart::new(&cfg, VarBuilder::from_varmap(&vm, dtype, &dev)).unwrap();
        for var in vm.all_vars() {
            let r = lmkit_kernels::testing::randn(0.0, 0.5, var.shape(), &dev).unwrap();
            var.set(&r.to_dtype(dtype).unwrap()).unwrap();
        }
        (m, vm)
    }

    /// Pairs of different lengths, so that sources and targets are padded.
    fn pairs() -> Vec<Pair> {
        let seq = |n: usize, k: u32| (0..n as u32).map(|i| 3 + (i * 7 + k) % 26).collect();
        vec![
            Pair {
                source: seq(7, 1),
                target: seq(4, 2),
            },
            Pair {
                source: seq(3, 3),
                target: seq(6, 4),
            },
            Pair {
                source: seq(5, 5),
                target: seq(1, 6),
            },
        ]
    }

    fn compare(act: &str, dtype: DType, tol: f64) {
        if !lmkit_kernels::blas::available() {
            return;
        }
        let (m, vm) = model(act, dtype);
        let pairs = pairs();
        let mut i = 0;
        let b = batch(
            &pairs,
            3,
            &mut || {
                i += 1;
                i - 1
            },
            2,
            2,
            1,
        );
        assert!(
            b.src_lens != vec![b.s; 3] && b.dec_lens != vec![b.t; 3],
            "padded"
        );
        let scale = 0.5;
        let ours = loss_and_grads(&m, &b, scale)
            .unwrap()
            .expect("the pass applies");
        let loss = crate::seq2seq::loss(&m, &b).unwrap();
        let want = loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            (ours.loss - want).abs() <= tol * want.abs(),
            "loss {} vs {want}",
            ours.loss
        );
        let g = (loss * scale).unwrap().backward().unwrap();
        let vars = vm.all_vars();
        assert_eq!(ours.grads.len(), vars.len(), "one gradient per parameter");
        for var in &vars {
            let (_, got) = ours
                .grads
                .iter()
                .find(|(t, _)| t.id() == var.as_tensor().id())
                .expect("a gradient for every parameter");
            assert_gradient_close(got, g.get(var.as_tensor()).expect("a reference"), tol);
        }
    }

    /// Every gradient equals candle's autograd over the model's graph: padded sources and
    /// targets, the exact GELU, the tanh GELU and ReLU, f64 and f32.
    #[test]
    fn hand_written_pass_equals_autograd() {
        compare("gelu", DType::F64, 1e-10);
        compare("gelu_new", DType::F64, 1e-10);
        compare("relu", DType::F64, 1e-10);
        compare("gelu", DType::F32, 2e-4);
    }

    #[test]
    fn bad_batches_are_reported() {
        if !lmkit_kernels::blas::available() {
            return;
        }
        let (m, _) = model("gelu", DType::F32);
        let mut b = batch(&pairs(), 2, &mut || 0, 2, 2, 1);
        b.labels[0] = 99;
        let e = loss_and_grads(&m, &b, 1.0).err().unwrap().to_string();
        assert!(
            e.contains("target 99 is outside the vocabulary of 29"),
            "{e}"
        );
        let long = vec![Pair {
            source: vec![3; 20],
            target: vec![4],
        }];
        let b = batch(&long, 1, &mut || 0, 2, 2, 1);
        let e = loss_and_grads(&m, &b, 1.0).err().unwrap().to_string();
        assert!(
            e.contains("20 tokens exceed max_position_embeddings (16)"),
            "{e}"
        );
    }
}
