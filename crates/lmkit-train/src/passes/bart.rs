//! The encoder-decoder's training pass written out by hand (transformers' BART layout:
//! post-norm layers, learned positions, a bidirectional encoder, a decoder with causal
//! self-attention and cross-attention, the output layer tied to the token embeddings plus
//! `final_logits_bias`): forward, cross-entropy and backward over plain buffers with BLAS
//! products, no autograd graph. Each sequence attends over its own real tokens only, so padding
//! costs no attention work. The tests below hold every gradient to the autograd path's in f64.

use super::params::{with_params, Params, Registry};
use super::post_norm::{EmbedIdx, LayerIdx, NormIdx, Seqs};
use super::{Act, LossAndGrads};
use crate::seq2seq::PairBatch;
use candle_core::Tensor;
use lmkit_kernels::blas::{self, BlasFloat};
use lmkit_models::bart::{Bart, StackParts};

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
    let scale_e = parts.embed_scale;
    let (Some(encoder), Some(decoder)) = (
        StackIdx::new(&mut reg, parts.shared, scale_e, &parts.encoder, ne, ne),
        StackIdx::new(&mut reg, parts.shared, scale_e, &parts.decoder, nd, ne),
    ) else {
        return Ok(None);
    };
    if reg.tensors.iter().any(|t| t.dtype() != dtype) {
        return Ok(None);
    }
    let m = ModelIdx {
        shared,
        bias,
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

struct StackIdx {
    embed: EmbedIdx,
    layers: Vec<LayerIdx>,
}

impl StackIdx {
    /// A stack over `rows` rows (cross-attention keys over `memory_rows`).
    fn new<'a>(
        reg: &mut Registry<'a>,
        shared: &'a Tensor,
        embed_scale: f64,
        s: &StackParts<'a>,
        rows: usize,
        memory_rows: usize,
    ) -> Option<StackIdx> {
        let embed = EmbedIdx {
            word: reg.add(shared),
            positions: reg.add(s.positions),
            token_type: None,
            norm: NormIdx::new(reg, s.norm),
            scale: embed_scale,
        };
        let layers = s
            .layers
            .iter()
            .map(|l| LayerIdx::new(reg, l, rows, memory_rows))
            .collect::<Option<Vec<_>>>()?;
        Some(StackIdx { embed, layers })
    }
}

struct ModelIdx {
    shared: usize,
    bias: usize,
    act: Act,
    encoder: StackIdx,
    decoder: StackIdx,
}

/// A stack's positions: row r of a sequence of `seqs.rows` reads position row r + 2.
fn positions(n: usize, seqs: Seqs) -> Vec<usize> {
    (0..n).map(|r| r % seqs.rows + 2).collect()
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
    let c = p.data[m.encoder.embed.norm.w].len();
    let v = p.data[m.shared].len() / c.max(1);

    // Forward: the encoder, then the decoder over its output.
    let enc_pos = positions(batch.src.len(), enc);
    let (enc_pre, mut x) = m.encoder.embed.forward(p, &batch.src, &enc_pos);
    let mut enc_saved = Vec::with_capacity(m.encoder.layers.len());
    for l in &m.encoder.layers {
        let (out, s) = l.forward(p, m.act, x, enc, None)?;
        enc_saved.push(s);
        x = out;
    }
    let memory = x;
    let dec_pos = positions(batch.dec_in.len(), dec);
    let (dec_pre, mut z) = m.decoder.embed.forward(p, &batch.dec_in, &dec_pos);
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
    m.decoder
        .embed
        .backward(p, &batch.dec_in, &dec_pos, &dec_pre, &dz, &mut dshared);
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
    m.encoder
        .embed
        .backward(p, &batch.src, &enc_pos, &enc_pre, &dx, &mut dshared);
    p.add_grad(m.shared, dshared);
    // Summed in row order: the same total every run.
    Ok(losses.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::testing::{assert_matches_graph, randomize};
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
        randomize(&vm, dtype);
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
        assert_matches_graph(&ours, loss, scale, &vm, tol, act);
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
