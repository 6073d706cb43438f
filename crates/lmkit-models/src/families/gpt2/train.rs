//! GPT-2's training pass written out by hand: forward, cross-entropy and backward over plain
//! buffers, with the BLAS products and fused kernels the graph path uses, but no autograd graph.
//!
//! candle's backward pass accumulates every gradient contribution of every node as a fresh
//! zero-filled tensor plus an add, and each activation is a separate tensor; for a GPT-2 step
//! that was ~15% of the cycles beside the matrix products. Here each activation is computed once
//! into a buffer kept for the backward pass, residual adds and biases are folded into the
//! products (BLAS's beta = 1), and each gradient is written once. The tests below hold every
//! gradient to the autograd path's (which tests/gradients.rs holds to finite differences).

use super::Gpt2;
use candle_core::{Storage, Tensor, WithDType};
use lmkit_kernels::blas::{self, plain, transposed, Blas, BlasFloat, Heads};
use lmkit_kernels::buffers::rows_of;
use lmkit_kernels::fused;
use num_traits::Float;
use rayon::prelude::*;

/// Rows of the output layer's logits computed at a time: [rows, vocab] stays small (a few rows
/// in tests, so that they cover the accumulation over chunks).
const LOSS_ROWS: usize = if cfg!(test) { 8 } else { 512 };

/// Parameter tensors per block, in the order [`Gpt2::param_tensors`] lists them.
const PER_BLOCK: usize = 12;

/// The mean next-token cross-entropy of a batch and the gradient of every parameter tensor.
pub struct LossAndGrads {
    pub loss: f64,
    /// (parameter, gradient) pairs; a tied output layer's gradient is in the embedding's.
    pub grads: Vec<(Tensor, Tensor)>,
}

#[derive(Clone, Copy)]
enum Act {
    GeluTanh,
    Relu,
}

impl Act {
    fn forward<T: BlasFloat>(self, h: &[T]) -> Vec<T> {
        match self {
            Act::GeluTanh => fused::gelu(h),
            Act::Relu => h.par_iter().map(|&v| Float::max(v, T::zero())).collect(),
        }
    }

    fn backward<T: BlasFloat>(self, h: &[T], dg: &[T]) -> Vec<T> {
        match self {
            Act::GeluTanh => fused::gelu_bwd(h, dg),
            Act::Relu => h
                .par_iter()
                .zip(dg.par_iter())
                .map(|(&v, &g)| if v > T::zero() { g } else { T::zero() })
                .collect(),
        }
    }
}

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

impl Gpt2 {
    /// Every parameter tensor, in a fixed order: wte, wpe, per block (ln_1 w/b, c_attn w/b,
    /// attn.c_proj w/b, ln_2 w/b, c_fc w/b, mlp.c_proj w/b), ln_f w/b, and lm_head when untied.
    fn param_tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![self.wte.embeddings(), self.wpe.embeddings()];
        for b in &self.blocks {
            v.extend([
                &b.ln_1.weight,
                &b.ln_1.bias,
                &b.c_attn.weight,
                &b.c_attn.bias,
                &b.attn_proj.weight,
                &b.attn_proj.bias,
                &b.ln_2.weight,
                &b.ln_2.bias,
                &b.c_fc.weight,
                &b.c_fc.bias,
                &b.mlp_proj.weight,
                &b.mlp_proj.bias,
            ]);
        }
        v.extend([&self.ln_f.weight, &self.ln_f.bias]);
        if !self.tied() {
            v.push(&self.lm_head);
        }
        v
    }

    fn tied(&self) -> bool {
        self.lm_head.id() == self.wte.embeddings().id()
    }

    /// The mean next-token cross-entropy of `ids` → `targets` (both [batch, seq], u32) and every
    /// parameter's gradient times `scale`, by the hand-written pass (no autograd graph). `None`
    /// where that pass does not apply — tensors not on the CPU or not f32/f64, no BLAS library,
    /// an activation other than the tanh GELU or ReLU, or `LMKIT_AUTOGRAD=1` — and the caller
    /// differentiates the graph instead.
    pub fn loss_and_grads(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        scale: f64,
    ) -> candle_core::Result<Option<LossAndGrads>> {
        let act = match self.cfg.activation_function.as_str() {
            "relu" => Act::Relu,
            "gelu" => return Ok(None), // erf GELU: no fused kernel
            _ => Act::GeluTanh,
        };
        let w = self.wte.embeddings();
        let autograd =
            std::env::var("LMKIT_AUTOGRAD").is_ok_and(|v| !matches!(v.as_str(), "" | "0"));
        if autograd || !w.device().is_cpu() || !blas::available() {
            return Ok(None);
        }
        let (b, t) = ids.dims2()?;
        if targets.dims() != [b, t] {
            candle_core::bail!(
                "GPT-2 loss: targets {:?} do not match the inputs {:?}",
                targets.dims(),
                ids.dims()
            );
        }
        let ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        let targets: Vec<u32> = targets.flatten_all()?.to_vec1()?;
        let blas = blas::require("GPT-2 training pass")?;
        match w.dtype() {
            candle_core::DType::F32 => self.pass::<f32>(blas, act, &ids, &targets, (b, t), scale),
            candle_core::DType::F64 => self.pass::<f64>(blas, act, &ids, &targets, (b, t), scale),
            _ => Ok(None),
        }
    }

    fn pass<T: BlasFloat>(
        &self,
        blas: &Blas,
        act: Act,
        ids: &[u32],
        targets: &[u32],
        (b, t): (usize, usize),
        scale: f64,
    ) -> candle_core::Result<Option<LossAndGrads>> {
        let cfg = &self.cfg;
        let v = cfg.vocab_size;
        if t > cfg.n_positions {
            candle_core::bail!(
                "GPT-2: a sequence of {t} tokens is longer than n_positions ({})",
                cfg.n_positions
            );
        }
        for (what, list) in [("token id", ids), ("target", targets)] {
            if let Some(bad) = list.iter().find(|&&i| i as usize >= v) {
                candle_core::bail!("GPT-2: {what} {bad} is outside the vocabulary of {v}");
            }
        }
        let tensors = self.param_tensors();
        let guards: Vec<_> = tensors.iter().map(|p| p.storage_and_layout()).collect();
        let mut params: Vec<&[T]> = Vec::with_capacity(tensors.len());
        for (st, l) in &guards {
            let Storage::Cpu(cs) = &**st else {
                return Ok(None);
            };
            let Ok(all) = T::cpu_storage_as_slice(cs) else {
                return Ok(None); // mixed dtypes: let the graph path report or handle it
            };
            let Some((start, end)) = l.contiguous_offsets() else {
                return Ok(None);
            };
            params.push(&all[start..end]);
        }
        let grads = self.backprop(blas, act, &params, ids, targets, (b, t), scale)?;
        drop(guards);
        let (loss, grads) = grads;
        let dev = candle_core::Device::Cpu;
        let grads = tensors
            .iter()
            .zip(grads)
            .map(|(p, g)| Ok(((*p).clone(), Tensor::from_vec(g, p.shape(), &dev)?)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Some(LossAndGrads { loss, grads }))
    }

    /// The pass itself over the parameters' data (`p`, in `param_tensors` order): the mean loss
    /// and the gradients (times `scale`) in the same order.
    #[allow(clippy::too_many_arguments)]
    fn backprop<T: BlasFloat>(
        &self,
        blas: &Blas,
        act: Act,
        p: &[&[T]],
        ids: &[u32],
        targets: &[u32],
        (b, t): (usize, usize),
        scale: f64,
    ) -> candle_core::Result<(f64, Vec<Vec<T>>)> {
        let cfg = &self.cfg;
        let (c, hid, v, eps) = (
            cfg.n_embd,
            cfg.n_inner(),
            cfg.vocab_size,
            cfg.layer_norm_epsilon,
        );
        let layers = self.blocks.len();
        let n = b * t;
        let heads = Heads {
            b,
            t,
            heads: cfg.n_head,
            hd: c / cfg.n_head,
        };
        let gemm = T::gemm(blas);
        let lp = |l: usize, i: usize| p[2 + PER_BLOCK * l + i];
        let (lnf_w, lnf_b) = (p[2 + PER_BLOCK * layers], p[3 + PER_BLOCK * layers]);
        let lm = if self.tied() {
            p[0]
        } else {
            p[4 + PER_BLOCK * layers]
        };

        // Forward. Embeddings: x = wte[id] + wpe[position].
        let (wte, wpe) = (p[0], p[1]);
        let mut x = vec![T::zero(); n * c];
        x.par_chunks_mut(c).enumerate().for_each(|(r, row)| {
            let (id, pos) = (ids[r] as usize, r % t);
            let (e, q) = (&wte[id * c..(id + 1) * c], &wpe[pos * c..(pos + 1) * c]);
            for ((o, &a), &bb) in row.iter_mut().zip(e).zip(q) {
                *o = a + bb;
            }
        });
        let mut saved = Vec::with_capacity(layers);
        for l in 0..layers {
            let a1 = fused::layer_norm_rows(&x, lp(l, 0), lp(l, 1), eps);
            let mut qkv = rows_of(lp(l, 3), n);
            let w_attn = plain(lp(l, 2), 3 * c);
            blas::gemm_par(blas, (n, 3 * c, c), plain(&a1, c), w_attn, &mut qkv, true)?;
            let y = blas::attention_fwd(gemm, &qkv, heads);
            let mut xm = fused::add_rows(&x, lp(l, 5));
            blas::gemm_par(
                blas,
                (n, c, c),
                plain(&y, c),
                plain(lp(l, 4), c),
                &mut xm,
                true,
            )?;
            let a2 = fused::layer_norm_rows(&xm, lp(l, 6), lp(l, 7), eps);
            let mut h = rows_of(lp(l, 9), n);
            let w_fc = plain(lp(l, 8), hid);
            blas::gemm_par(blas, (n, hid, c), plain(&a2, c), w_fc, &mut h, true)?;
            let g = act.forward(&h);
            let mut xo = fused::add_rows(&xm, lp(l, 11));
            let w_proj = plain(lp(l, 10), c);
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
        let hf = fused::layer_norm_rows(&x, lnf_w, lnf_b, eps);

        // Output layer and cross-entropy, a chunk of rows at a time: the logits are turned into
        // their gradient in place, then give the hidden states' and the output weights'.
        let sc = T::from(scale / n as f64).unwrap_or_else(T::zero);
        let mut dhf = vec![T::zero(); n * c];
        let mut dlm = vec![T::zero(); v * c];
        let mut logits = vec![T::zero(); LOSS_ROWS.min(n) * v];
        let mut loss = 0.0;
        for r0 in (0..n).step_by(LOSS_ROWS) {
            let rows = LOSS_ROWS.min(n - r0);
            let lg = &mut logits[..rows * v];
            let hc = &hf[r0 * c..(r0 + rows) * c];
            blas::gemm_par(
                blas,
                (rows, v, c),
                plain(hc, c),
                transposed(lm, c),
                lg,
                false,
            )?;
            // Row losses collected in order and summed in order: the same total every run.
            let row_losses: Vec<f64> = lg
                .par_chunks_mut(v)
                .zip(&targets[r0..r0 + rows])
                .map(|(r, &y)| WithDType::to_f64(fused::ce_row_in_place(r, y as usize, sc)))
                .collect();
            loss += row_losses.iter().sum::<f64>();
            let dh = &mut dhf[r0 * c..(r0 + rows) * c];
            blas::gemm_par(blas, (rows, c, v), plain(lg, v), plain(lm, c), dh, false)?;
            let lgt = transposed(&*lg, v);
            blas::gemm_par(blas, (v, c, rows), lgt, plain(hc, c), &mut dlm, r0 > 0)?;
        }
        drop(logits);
        let loss = loss / n as f64;

        // Backward.
        let mut grads: Vec<Vec<T>> = vec![Vec::new(); p.len()];
        let mut dx = vec![T::zero(); n * c];
        let d = fused::layer_norm_bwd_into(&x, lnf_w, &dhf, eps, &mut dx, false);
        drop(dhf);
        grads[2 + PER_BLOCK * layers] = d[..c].to_vec();
        grads[3 + PER_BLOCK * layers] = d[c..].to_vec();
        for l in (0..layers).rev() {
            let s = saved.pop().expect("one saved entry per block");
            let g = &mut grads[2 + PER_BLOCK * l..2 + PER_BLOCK * (l + 1)];
            // xo = xm + act(h)·W_proj + b_proj
            g[11] = fused::column_sums(&dx, c);
            let gt = transposed(&s.g, hid);
            g[10] = blas::product(blas, (hid, c, n), gt, plain(&dx, c))?;
            let w_proj_t = transposed(lp(l, 10), c);
            let dg = blas::product(blas, (n, hid, c), plain(&dx, c), w_proj_t)?;
            let dh = act.backward(&s.h, &dg);
            drop(dg);
            // h = LN2(xm)·W_fc + b_fc
            g[9] = fused::column_sums(&dh, hid);
            let a2t = transposed(&s.a2, c);
            g[8] = blas::product(blas, (c, hid, n), a2t, plain(&dh, hid))?;
            let w_fc_t = transposed(lp(l, 8), hid);
            let da2 = blas::product(blas, (n, c, hid), plain(&dh, hid), w_fc_t)?;
            drop(dh);
            let d = fused::layer_norm_bwd_into(&s.xm, lp(l, 6), &da2, eps, &mut dx, true);
            g[6] = d[..c].to_vec();
            g[7] = d[c..].to_vec();
            // xm = x + attention(qkv)·W_o + b_o
            g[5] = fused::column_sums(&dx, c);
            let yt = transposed(&s.y, c);
            g[4] = blas::product(blas, (c, c, n), yt, plain(&dx, c))?;
            let w_o_t = transposed(lp(l, 4), c);
            let dy = blas::product(blas, (n, c, c), plain(&dx, c), w_o_t)?;
            let dqkv = blas::attention_bwd(gemm, &s.qkv, &dy, heads);
            drop(dy);
            // qkv = LN1(x)·W_attn + b_attn
            g[3] = fused::column_sums(&dqkv, 3 * c);
            let a1t = transposed(&s.a1, c);
            g[2] = blas::product(blas, (c, 3 * c, n), a1t, plain(&dqkv, 3 * c))?;
            let w_attn_t = transposed(lp(l, 2), 3 * c);
            let da1 = blas::product(blas, (n, c, 3 * c), plain(&dqkv, 3 * c), w_attn_t)?;
            let d = fused::layer_norm_bwd_into(&s.x, lp(l, 0), &da1, eps, &mut dx, true);
            g[0] = d[..c].to_vec();
            g[1] = d[c..].to_vec();
        }

        // Embeddings: rows of dx back to their token's and position's rows.
        let mut dwte = if self.tied() {
            std::mem::take(&mut dlm)
        } else {
            vec![T::zero(); v * c]
        };
        for (r, row) in dx.chunks(c).enumerate() {
            let id = ids[r] as usize;
            for (o, &d) in dwte[id * c..(id + 1) * c].iter_mut().zip(row) {
                *o += d;
            }
        }
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
        grads[0] = dwte;
        grads[1] = dwpe;
        if !self.tied() {
            grads[4 + PER_BLOCK * layers] = dlm;
        }
        Ok((loss, grads))
    }
}

#[cfg(test)]
mod tests {
    use crate::families::gpt2::Gpt2;
    use crate::families::gpt2::Gpt2Config;
    use crate::layers::kv_cache::KvCache;
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};
    use lmkit_kernels::testing::max_diff;

    fn config(tied: bool, act: &str) -> Gpt2Config {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 37, "n_positions": 12, "n_embd": 16, "n_layer": 2, "n_head": 4,
            "n_inner": 24, "activation_function": act, "tie_word_embeddings": tied,
        }))
        .unwrap()
    }

    /// Random tokens and next tokens, [2, 9].
    fn batch(dev: &Device) -> (Tensor, Tensor) {
        let mut s = 7u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % 37) as u32
        };
        let ids: Vec<u32> = (0..18).map(|_| next()).collect();
        let tg: Vec<u32> = (0..18).map(|_| next()).collect();
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
        for var in vm.all_vars() {
            let r = Tensor::randn(0.0, 0.5, var.shape(), &dev).unwrap();
            var.set(&r.to_dtype(dtype).unwrap()).unwrap();
        }
        let (x, y) = batch(&dev);
        let scale = 0.5;
        let ours = model
            .loss_and_grads(&x, &y, scale)
            .unwrap()
            .expect("fast path applies");

        let h = model
            .hidden(&x, &mut [&mut KvCache::single_pass(2)])
            .unwrap()
            .reshape((18, 16))
            .unwrap();
        let logits = h.matmul(&model.lm_head().t().unwrap()).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &y.flatten_all().unwrap()).unwrap();
        let want_loss = loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            (ours.loss - want_loss).abs() < tol,
            "loss {} vs {want_loss}",
            ours.loss
        );
        let g = (loss * scale).unwrap().backward().unwrap();
        let expected = if tied { 2 + 12 * 2 + 2 } else { 2 + 12 * 2 + 3 };
        assert_eq!(ours.grads.len(), expected);
        assert_eq!(vm.all_vars().len(), expected);
        for (p, ours_g) in &ours.grads {
            let want = g.get(p).expect("every parameter has a gradient");
            let diff = max_diff(ours_g, want);
            let size = max_diff(want, &want.zeros_like().unwrap());
            assert!(size > 0.0, "a zero gradient tests nothing ({:?})", p.dims());
            assert!(
                diff <= tol * size.max(1.0),
                "gradient of {:?}: max diff {diff} (max {size})",
                p.dims()
            );
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
        let err = model
            .loss_and_grads(&ids, &ids.zeros_like().unwrap(), 1.0)
            .err()
            .expect("id 40 is outside the vocabulary");
        assert!(err.to_string().contains("token id 40"), "{err}");
        let long = Tensor::zeros((1, 13), DType::U32, &dev).unwrap();
        let err = model.loss_and_grads(&long, &long, 1.0).err().unwrap();
        assert!(err.to_string().contains("n_positions"), "{err}");
        let short = Tensor::zeros((1, 2), DType::U32, &dev).unwrap();
        assert!(model.loss_and_grads(&ids, &short, 1.0).is_err());
    }
}
