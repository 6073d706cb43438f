//! Post-norm Transformer layers (BERT's encoder, BART's encoder and decoder) for the
//! hand-written passes: each norm follows its residual add; self-attention over each sequence's
//! real rows (bidirectional or causal), cross-attention to an encoder's output; forward, and
//! backward from the gradient of a layer's output.

use super::params::{LinIdx, LoraSaved, Params, Registry};
use super::Act;
use lmkit_kernels::blas::BlasFloat;
use lmkit_kernels::fused;
use lmkit_kernels::padded_attention::{masked_attention_bwd, masked_attention_fwd, Padded};
use lmkit_models::layers::ops::LayerNorm;
use lmkit_models::layers::parts::{AttentionParts, LayerParts};
use rayon::prelude::*;

/// A layer norm's weight and bias.
pub(crate) struct NormIdx {
    pub(crate) w: usize,
    pub(crate) b: usize,
    pub(crate) eps: f64,
}

impl NormIdx {
    pub(crate) fn new<'a>(reg: &mut Registry<'a>, n: &'a LayerNorm) -> NormIdx {
        NormIdx {
            w: reg.add(n.weight()),
            b: reg.add(n.bias()),
            eps: n.eps(),
        }
    }

    pub(crate) fn forward<T: BlasFloat>(&self, p: &Params<'_, T>, x: &[T]) -> Vec<T> {
        fused::layer_norm_rows(x, p.data[self.w], p.data[self.b], self.eps)
    }

    /// The gradient of the norm's input `x` from that of its output (written into `dx`, or
    /// added when `accumulate`); the weight's and bias's gradients gathered.
    pub(crate) fn backward<T: BlasFloat>(
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
pub(crate) struct AttnIdx {
    pub(crate) q: LinIdx,
    pub(crate) k: LinIdx,
    pub(crate) v: LinIdx,
    pub(crate) out: LinIdx,
    pub(crate) heads: usize,
}

impl LayerIdx {
    /// A layer over `rows` rows (cross-attention keys over `memory_rows`); `None` for one the
    /// pass cannot run (quantized weights).
    pub(crate) fn new<'a>(
        reg: &mut Registry<'a>,
        l: &LayerParts<'a>,
        rows: usize,
        memory_rows: usize,
    ) -> Option<LayerIdx> {
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
    }
}

impl AttnIdx {
    /// `rows` query rows, `kv_rows` key/value rows (the same for self-attention).
    pub(crate) fn new<'a>(
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

pub(crate) struct LayerIdx {
    pub(crate) self_attn: AttnIdx,
    pub(crate) self_norm: NormIdx,
    pub(crate) cross: Option<(AttnIdx, NormIdx)>,
    pub(crate) fc1: LinIdx,
    pub(crate) fc2: LinIdx,
    pub(crate) final_norm: NormIdx,
}

/// The saved values of several layers' adapters.
pub(crate) type Adapters<T> = Vec<Option<LoraSaved<T>>>;

/// Linear layers applied to the same input `x` [n, in], their outputs side by side in one
/// buffer [n, Σ out] (q|k|v of self-attention, k|v of cross-attention).
pub(crate) fn project<T: BlasFloat>(
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
        saved.push(part.forward(p, x, n, (&mut out[col..], w), part.bias.is_some(), None)?);
        col += part.out;
    }
    Ok((out, saved))
}

/// The backward of [`project`]: from the gradient `d` of the side-by-side outputs, the layers'
/// gradients and dx = Σ d_i·W_i added to `dx` (written as a new buffer when it is empty).
pub(crate) fn project_bwd<T: BlasFloat>(
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
pub(crate) fn residual<T: BlasFloat>(p: &Params<'_, T>, x: &[T], l: &LinIdx) -> Vec<T> {
    match l.bias {
        Some(b) => fused::add_rows(x, p.data[b]),
        None => x.to_vec(),
    }
}

/// What an attention block keeps from the forward pass.
pub(crate) struct AttnSaved<T> {
    /// The queries (q|k|v side by side for self-attention), the keys and values of
    /// cross-attention, the attention output, and the adapters' values.
    pub(crate) q: Vec<T>,
    pub(crate) kv: Option<Vec<T>>,
    pub(crate) y: Vec<T>,
    pub(crate) lora_q: Vec<Option<LoraSaved<T>>>,
    pub(crate) lora_kv: Vec<Option<LoraSaved<T>>>,
    pub(crate) lora_out: Option<LoraSaved<T>>,
    /// The residual sum before the block's norm.
    pub(crate) r: Vec<T>,
}

/// Where a stack's rows are: sequences of `rows` positions, the first `lens[i]` real.
#[derive(Clone, Copy)]
pub(crate) struct Seqs<'a> {
    pub(crate) rows: usize,
    pub(crate) lens: &'a [usize],
}

impl AttnIdx {
    pub(crate) fn hd(&self) -> usize {
        self.q.out / self.heads.max(1)
    }

    /// Self-attention over `x` (rows as `seqs`) or cross-attention to `memory`, the residual
    /// add: the sum before the block's norm and what the backward pass needs.
    pub(crate) fn forward<T: BlasFloat>(
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
        let lora_out = self.out.forward(p, &y, n, (&mut r, c), true, None)?;
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
    pub(crate) fn cross<'a>(&self, seqs: Seqs<'a>, ms: Seqs<'a>) -> Padded<'a> {
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
    pub(crate) fn backward<T: BlasFloat>(
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
pub(crate) struct LayerSaved<T> {
    /// The layer's input, the self-attention block, its norm's output.
    pub(crate) x: Vec<T>,
    pub(crate) attn: AttnSaved<T>,
    pub(crate) x1: Vec<T>,
    /// The cross-attention block and its norm's output (decoder layers).
    pub(crate) cross: Option<(AttnSaved<T>, Vec<T>)>,
    /// The feed-forward block's pre-activation, activation and residual sum.
    pub(crate) h: Vec<T>,
    pub(crate) g: Vec<T>,
    pub(crate) r: Vec<T>,
    pub(crate) lora_fc: [Option<LoraSaved<T>>; 2],
}

impl LayerIdx {
    /// The layer's output and what its backward pass needs.
    pub(crate) fn forward<T: BlasFloat>(
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
        let (h, l1) = self.fc1.forward_new(p, &xf, n, None)?;
        let g = act.forward(&h);
        let mut r = residual(p, &xf, &self.fc2);
        let l2 = self
            .fc2
            .forward(p, &g, n, (&mut r, self.fc2.out), true, None)?;
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
    pub(crate) fn backward<T: BlasFloat>(
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

/// Embeddings: a token's row (times `scale`) plus its position's row (plus token type 0's row
/// when the model has token types), then a norm.
pub(crate) struct EmbedIdx {
    pub(crate) word: usize,
    pub(crate) positions: usize,
    pub(crate) token_type: Option<usize>,
    pub(crate) norm: NormIdx,
    pub(crate) scale: f64,
}

impl EmbedIdx {
    /// The sum before the norm and the norm's output for `ids` at positions `pos`.
    pub(crate) fn forward<T: BlasFloat>(
        &self,
        p: &Params<'_, T>,
        ids: &[u32],
        pos: &[usize],
    ) -> (Vec<T>, Vec<T>) {
        let (e, pt) = (p.data[self.word], p.data[self.positions]);
        let c = p.data[self.norm.w].len();
        let tt = self.token_type.map(|i| &p.data[i][..c]);
        let sc = T::from(self.scale).unwrap_or_else(T::one);
        let mut pre = vec![T::zero(); ids.len() * c];
        pre.par_chunks_mut(c)
            .zip(ids.par_iter().zip(pos))
            .for_each(|(row, (&id, &at))| {
                let er = &e[id as usize * c..(id as usize + 1) * c];
                let pr = &pt[at * c..(at + 1) * c];
                for ((o, &a), &b) in row.iter_mut().zip(er).zip(pr) {
                    *o = sc * a + b;
                }
                if let Some(tt) = tt {
                    row.iter_mut().zip(tt).for_each(|(o, &v)| *o += v);
                }
            });
        let x = self.norm.forward(p, &pre);
        (pre, x)
    }

    /// The backward of [`EmbedIdx::forward`]: the norm's, the positions' and the token type's
    /// gradients, the token rows' added to `dword`.
    pub(crate) fn backward<T: BlasFloat>(
        &self,
        p: &mut Params<'_, T>,
        ids: &[u32],
        pos: &[usize],
        pre: &[T],
        dx: &[T],
        dword: &mut [T],
    ) {
        let c = p.data[self.norm.w].len();
        let mut dpre = vec![T::zero(); dx.len()];
        self.norm.backward(p, pre, dx, &mut dpre, false);
        let sc = T::from(self.scale).unwrap_or_else(T::one);
        let mut dpos = vec![T::zero(); p.data[self.positions].len()];
        for ((row, &id), &at) in dpre.chunks(c).zip(ids).zip(pos) {
            let o = &mut dpos[at * c..(at + 1) * c];
            o.iter_mut().zip(row).for_each(|(o, &d)| *o += d);
            let o = &mut dword[id as usize * c..(id as usize + 1) * c];
            o.iter_mut().zip(row).for_each(|(o, &d)| *o += sc * d);
        }
        p.add_grad(self.positions, dpos);
        if let Some(tt) = self.token_type {
            let mut dt = vec![T::zero(); p.data[tt].len()];
            dt[..c].copy_from_slice(&fused::column_sums(&dpre, c));
            p.add_grad(tt, dt);
        }
    }
}
