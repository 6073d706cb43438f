//! BERT's masked-LM training pass written out by hand (transformers' `BertForMaskedLM` and
//! `RobertaForMaskedLM` layouts: word, position and token-type embeddings, post-norm layers,
//! the head's dense layer, activation and norm, the output layer tied to the word embeddings
//! plus its bias): forward, cross-entropy at the masked positions and backward over plain
//! buffers with BLAS products, no autograd graph. The tests below hold every gradient to the
//! autograd path's in f64.

use super::params::{with_params, LinIdx, Params, Registry};
use super::post_norm::{EmbedIdx, LayerIdx, NormIdx, Seqs};
use super::{Act, LossAndGrads};
use lmkit_kernels::blas::{self, BlasFloat};
use lmkit_models::bert::Bert;

/// Rows of the output layer's logits computed at a time (a few in tests, so that they cover the
/// accumulation over chunks).
const LOSS_ROWS: usize = if cfg!(test) { 3 } else { 512 };

/// A masked-LM batch: the (corrupted) input ids [b, t], the flattened positions to predict and
/// the ids to predict there.
pub struct Masked<'a> {
    pub ids: &'a [u32],
    pub b: usize,
    pub t: usize,
    pub rows: &'a [u32],
    pub targets: &'a [u32],
}

/// The mean cross-entropy at the batch's positions and every parameter's gradient times `scale`.
/// `None` where the pass does not apply — not on the CPU, not f32/f64, no BLAS library, an
/// activation without a fused kernel, quantized weights, no masked-LM head — and the caller
/// differentiates the graph instead.
pub fn loss_and_grads(
    model: &Bert,
    batch: &Masked,
    scale: f64,
) -> candle_core::Result<Option<LossAndGrads>> {
    let Some(parts) = model.parts() else {
        return Ok(None);
    };
    let Some(head) = &parts.head else {
        return Ok(None);
    };
    let (Some(act), Some(head_act)) = (Act::named(parts.activation), Act::named(head.activation))
    else {
        return Ok(None);
    };
    let dtype = parts.word.dtype();
    if !parts.word.device().is_cpu() || !blas::available() {
        return Ok(None);
    }
    check_batch(model, batch)?;
    let (n, cnt) = (batch.b * batch.t, batch.rows.len());
    let mut reg = Registry::default();
    let embed = EmbedIdx {
        word: reg.add(parts.word),
        positions: reg.add(parts.position),
        token_type: Some(reg.add(parts.token_type)),
        norm: NormIdx::new(&mut reg, parts.emb_norm),
        scale: 1.0,
    };
    let layers: Option<Vec<LayerIdx>> = parts
        .layers
        .iter()
        .map(|l| LayerIdx::new(&mut reg, l, n, n))
        .collect();
    let (Some(layers), Some(dense), Some(decoder_w)) = (
        layers,
        LinIdx::new(&mut reg, head.dense, cnt),
        head.decoder.dense_weight(),
    ) else {
        return Ok(None);
    };
    let Some(decoder_b) = head.decoder.bias() else {
        return Ok(None);
    };
    let m = ModelIdx {
        embed,
        layers,
        act,
        dense,
        head_act,
        head_norm: NormIdx::new(&mut reg, head.norm),
        decoder_w: reg.add(decoder_w),
        decoder_b: reg.add(decoder_b),
    };
    if reg.tensors.iter().any(|t| t.dtype() != dtype) {
        return Ok(None);
    }
    let pos: Vec<usize> = model
        .position_ids(batch.ids, batch.t)
        .into_iter()
        .map(|p| p as usize)
        .collect();
    let wants = vec![true; reg.tensors.len()];
    let blas = blas::require("BERT training pass")?;
    let per_row = scale / cnt.max(1) as f64;
    let r = match dtype {
        candle_core::DType::F32 => with_params::<f32, _>(&reg, &wants, blas, |p| {
            backprop(p, &m, batch, &pos, per_row)
        })?,
        candle_core::DType::F64 => with_params::<f64, _>(&reg, &wants, blas, |p| {
            backprop(p, &m, batch, &pos, per_row)
        })?,
        _ => return Ok(None),
    };
    Ok(r.map(|(loss, grads)| LossAndGrads {
        loss: loss / cnt.max(1) as f64,
        grads,
    }))
}

/// Ids within the vocabulary, rows within the batch, sequences within the positions.
fn check_batch(model: &Bert, b: &Masked) -> candle_core::Result<()> {
    let cfg = &model.cfg;
    let (v, n) = (cfg.vocab_size, b.b * b.t);
    if b.ids.len() != n || b.rows.len() != b.targets.len() || b.rows.is_empty() {
        candle_core::bail!(
            "masked-LM loss: {} ids for [{}, {}], {} positions for {} targets",
            b.ids.len(),
            b.b,
            b.t,
            b.rows.len(),
            b.targets.len()
        );
    }
    if b.t > cfg.max_tokens() {
        candle_core::bail!(
            "{} tokens exceed the {} this model reads (max_position_embeddings {})",
            b.t,
            cfg.max_tokens(),
            cfg.max_position_embeddings
        );
    }
    for (what, list) in [("token id", b.ids), ("target", b.targets)] {
        if let Some(bad) = list.iter().find(|&&i| i as usize >= v) {
            candle_core::bail!("BERT: {what} {bad} is outside the vocabulary of {v}");
        }
    }
    if let Some(bad) = b.rows.iter().find(|&&r| r as usize >= n) {
        candle_core::bail!("masked-LM loss: position {bad} is outside the batch's {n}");
    }
    Ok(())
}

struct ModelIdx {
    embed: EmbedIdx,
    layers: Vec<LayerIdx>,
    act: Act,
    /// The head: dense layer, activation, norm, output layer.
    dense: LinIdx,
    head_act: Act,
    head_norm: NormIdx,
    decoder_w: usize,
    decoder_b: usize,
}

/// The pass itself: the summed loss; gradients (times `scale`) into `p.grads`.
fn backprop<T: BlasFloat>(
    p: &mut Params<'_, T>,
    m: &ModelIdx,
    batch: &Masked,
    pos: &[usize],
    scale: f64,
) -> candle_core::Result<f64> {
    let lens = vec![batch.t; batch.b];
    let seqs = Seqs {
        rows: batch.t,
        lens: &lens,
    };
    let c = p.data[m.embed.norm.w].len();
    let v = p.data[m.embed.word].len() / c.max(1);
    let cnt = batch.rows.len();

    // Forward: embeddings, layers, the head over the predicted positions.
    let (pre, mut x) = m.embed.forward(p, batch.ids, pos);
    let mut saved = Vec::with_capacity(m.layers.len());
    for l in &m.layers {
        let (out, s) = l.forward(p, m.act, x, seqs, None)?;
        saved.push(s);
        x = out;
    }
    let hs: Vec<T> = batch
        .rows
        .iter()
        .flat_map(|&r| x[r as usize * c..(r as usize + 1) * c].iter().copied())
        .collect();
    let (u, lora) = m.dense.forward_new(p, &hs, cnt, None)?;
    let a = m.head_act.forward(&u);
    let hn = m.head_norm.forward(p, &a);

    // Output layer and cross-entropy.
    let mut dhn = vec![T::zero(); hn.len()];
    let mut dw = vec![T::zero(); v * c];
    let mut db = vec![T::zero(); v];
    let sc = T::from(scale).unwrap_or_else(T::zero);
    let losses = super::output_cross_entropy(
        p.blas,
        &hn,
        (p.data[m.decoder_w], Some(p.data[m.decoder_b])),
        batch.targets,
        LOSS_ROWS,
        &|_, _| sc,
        &mut dhn,
        (Some(&mut dw[..]), Some(&mut db[..])),
    )?;
    p.add_grad(m.decoder_b, db);

    // Backward: the head, the layers, the embeddings (the word rows' gradient joins the output
    // layer's when they are tied).
    let mut da = vec![T::zero(); a.len()];
    m.head_norm.backward(p, &a, &dhn, &mut da, false);
    drop(dhn);
    let du = m.head_act.backward(&u, &da);
    drop(da);
    let mut dhs = Vec::new();
    let sums = || lmkit_kernels::fused::column_sums(&du, c);
    m.dense
        .backward(p, (&du, c), &hs, lora.as_ref(), sums, &mut dhs)?;
    let mut dx = vec![T::zero(); x.len()];
    for (&r, d) in batch.rows.iter().zip(dhs.chunks(c)) {
        let row = &mut dx[r as usize * c..(r as usize + 1) * c];
        row.iter_mut().zip(d).for_each(|(o, &g)| *o += g);
    }
    drop(dhs);
    for l in m.layers.iter().rev() {
        let s = saved.pop().expect("one saved entry per layer");
        dx = l.backward(p, m.act, s, &dx, seqs, None)?;
    }
    let tied = m.decoder_w == m.embed.word;
    let mut dword = if tied {
        std::mem::take(&mut dw)
    } else {
        vec![T::zero(); v * c]
    };
    m.embed.backward(p, batch.ids, pos, &pre, &dx, &mut dword);
    p.add_grad(m.embed.word, dword);
    if !tied {
        p.add_grad(m.decoder_w, dw);
    }
    // Summed in row order: the same total every run.
    Ok(losses.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::testing::{assert_matches_graph, randomize};
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};
    use lmkit_models::bert::BertConfig;

    fn model(model_type: &str, act: &str, tied: bool, dtype: DType) -> (Bert, VarMap) {
        let cfg = BertConfig::from_json(
            serde_json::json!({
                "model_type": model_type, "vocab_size": 31, "hidden_size": 8,
                "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 12,
                "max_position_embeddings": 20, "hidden_act": act, "pad_token_id": 1,
                "tie_word_embeddings": tied,
            }),
            std::path::Path::new("config.json"),
        )
        .unwrap();
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let m = Bert::new(&cfg, VarBuilder::from_varmap(&vm, dtype, &dev)).unwrap();
        randomize(&vm, dtype);
        (m, vm)
    }

    fn compare(model_type: &str, act: &str, tied: bool, dtype: DType, tol: f64) {
        if !lmkit_kernels::blas::available() {
            return;
        }
        let (m, vm) = model(model_type, act, tied, dtype);
        let (b, t) = (2, 7);
        // Padding ids (1) in the second row: RoBERTa's positions skip them.
        let ids: Vec<u32> = (0..(b * t) as u32)
            .map(|i| if i > 11 { 1 } else { 3 + (i * 5) % 27 })
            .collect();
        let rows = [0u32, 3, 4, 8, 13];
        let targets = [5u32, 9, 30, 2, 7];
        let batch = Masked {
            ids: &ids,
            b,
            t,
            rows: &rows,
            targets: &targets,
        };
        let scale = 0.5;
        let ours = loss_and_grads(&m, &batch, scale)
            .unwrap()
            .expect("the pass applies");
        let dev = Device::Cpu;
        let x = Tensor::from_slice(&ids, (b, t), &dev).unwrap();
        let h = m.hidden(&x, None).unwrap().reshape((b * t, 8)).unwrap();
        let h = h
            .index_select(&Tensor::new(&rows, &dev).unwrap(), 0)
            .unwrap();
        let logits = m.mlm_logits(&h).unwrap();
        let loss =
            candle_nn::loss::cross_entropy(&logits, &Tensor::new(&targets, &dev).unwrap()).unwrap();
        let what = format!("{model_type} {act}");
        assert_matches_graph(&ours, loss, scale, &vm, tol, &what);
    }

    /// Every gradient equals candle's autograd over the model's graph: BERT and RoBERTa
    /// (positions after padding, its head's exact GELU), tied and untied output layers, the
    /// exact and tanh GELU, f64 and f32.
    #[test]
    fn hand_written_pass_equals_autograd() {
        compare("bert", "gelu", true, DType::F64, 1e-10);
        compare("bert", "gelu_new", false, DType::F64, 1e-10);
        compare("roberta", "relu", true, DType::F64, 1e-10);
        compare("bert", "gelu", true, DType::F32, 2e-4);
    }

    #[test]
    fn bad_batches_are_reported() {
        if !lmkit_kernels::blas::available() {
            return;
        }
        let (m, _) = model("bert", "gelu", true, DType::F32);
        let ids = [3u32; 6];
        let bad = |rows: &[u32], targets: &[u32], t: usize| {
            let batch = Masked {
                ids: &ids[..2 * t],
                b: 2,
                t,
                rows,
                targets,
            };
            loss_and_grads(&m, &batch, 1.0).err().unwrap().to_string()
        };
        let e = bad(&[1], &[40], 3);
        assert!(
            e.contains("target 40 is outside the vocabulary of 31"),
            "{e}"
        );
        let e = bad(&[6], &[4], 3);
        assert!(e.contains("position 6 is outside the batch's 6"), "{e}");
    }
}
