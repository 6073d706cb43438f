//! What is minimised: next-token cross-entropy (decoders, recurrent models), masked-LM
//! cross-entropy (BERT) or target-given-source cross-entropy (the encoder-decoder).

use crate::error::{Result, TrainError};
use crate::seq2seq;
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use lmkit_core::rng::{mix, MixChain, Random};
use lmkit_models::bart::Bart;
use lmkit_models::bert::Bert;
use lmkit_models::{CausalLm, KvCache, ModelConfig};
use std::path::Path;

/// The model being trained, with what its objective needs.
pub(crate) enum Net {
    Causal(CausalLm),
    Masked {
        bert: Bert,
        mask_id: u32,
        /// Tokens never masked (special tokens).
        keep: Vec<u32>,
    },
    Seq2seq {
        bart: Bart,
        start: u32,
        end: u32,
        pad: u32,
    },
}

impl Net {
    pub(crate) fn set_training(&self, on: bool) {
        if let Net::Causal(m) = self {
            m.set_training(on);
        }
    }

    /// The batch's loss: next-token cross-entropy, or masked-LM cross-entropy with masks drawn
    /// from `seed`.
    pub(crate) fn loss(&self, x: &Tensor, y: &Tensor, seed: u64) -> Result<Tensor> {
        match self {
            Net::Causal(m) => loss_of(m, x, y),
            Net::Masked {
                bert,
                mask_id,
                keep,
            } => mlm_graph_loss(bert, &mlm_batch(bert, x, *mask_id, keep, seed)?),
            Net::Seq2seq { .. } => Err(TrainError::Data(
                "an encoder-decoder model trains on source/target pairs".into(),
            )),
        }
    }
}

/// A masked-LM batch (Devlin et al. 2019): 15% of the tokens are picked (80% masked, 10%
/// random, 10% kept) and predicted from both sides.
pub(crate) struct MlmBatch {
    /// The corrupted inputs [b, t], flattened.
    pub(crate) input: Vec<u32>,
    pub(crate) b: usize,
    pub(crate) t: usize,
    /// The flattened positions picked and the ids to predict there.
    pub(crate) rows: Vec<u32>,
    pub(crate) want: Vec<u32>,
}

impl MlmBatch {
    /// The batch as the hand-written pass reads it.
    pub(crate) fn masked(&self) -> crate::passes::bert::Masked<'_> {
        crate::passes::bert::Masked {
            ids: &self.input,
            b: self.b,
            t: self.t,
            rows: &self.rows,
            targets: &self.want,
        }
    }
}

/// The masked-LM batch of `x` [b, t] with positions picked by `seed`.
pub(crate) fn mlm_batch(
    bert: &Bert,
    x: &Tensor,
    mask_id: u32,
    keep: &[u32],
    seed: u64,
) -> Result<MlmBatch> {
    let (b, t) = x.dims2()?;
    let ids: Vec<u32> = x.flatten_all()?.to_vec1()?;
    let mut rng = MixChain::new(mix(seed));
    let vocab = bert.cfg.vocab_size as u32;
    let (input, targets) =
        lmkit_models::bert::mask_tokens(&ids, mask_id, vocab, keep, &mut || rng.uniform_open());
    let (mut rows, mut want) = (Vec::new(), Vec::new());
    for (i, tg) in targets.iter().enumerate() {
        if let Some(id) = tg {
            rows.push(i as u32);
            want.push(*id);
        }
    }
    if rows.is_empty() {
        // Nothing picked in this (tiny) batch: predict the first token instead.
        rows.push(0);
        want.push(ids[0]);
    }
    Ok(MlmBatch {
        input,
        b,
        t,
        rows,
        want,
    })
}

/// The masked-LM cross-entropy of a batch through the graph.
pub(crate) fn mlm_graph_loss(bert: &Bert, mb: &MlmBatch) -> Result<Tensor> {
    let dev = bert.word_device();
    let h = bert.hidden(&Tensor::from_slice(&mb.input, (mb.b, mb.t), dev)?, None)?;
    let h = h
        .reshape((mb.b * mb.t, h.dim(2)?))?
        .index_select(&Tensor::new(mb.rows.as_slice(), dev)?, 0)?;
    let logits = bert.mlm_logits(&h)?;
    Ok(candle_nn::loss::cross_entropy(
        &logits,
        &Tensor::new(mb.want.as_slice(), dev)?,
    )?)
}

/// An encoder-decoder and a batch of `batch` pairs drawn (with replacement) by `seed`.
pub(crate) fn pair_batch<'a>(
    net: &'a Net,
    pairs: &[seq2seq::Pair],
    seed: u64,
    batch: usize,
) -> Result<(&'a Bart, seq2seq::PairBatch)> {
    let Net::Seq2seq {
        bart,
        start,
        end,
        pad,
    } = net
    else {
        return Err(TrainError::Data(
            "source/target pairs need an encoder-decoder model (model_type = \"bart\")".into(),
        ));
    };
    let mut rng = MixChain::new(mix(seed));
    let b = seq2seq::batch(
        pairs,
        batch,
        &mut || rng.next_u64() as usize,
        *start,
        *end,
        *pad,
    );
    Ok((bart, b))
}

/// An encoder-decoder's loss on `batch` pairs drawn (with replacement) by `seed`, and the
/// number of real tokens the batch held.
pub(crate) fn pair_loss(
    net: &Net,
    pairs: &[seq2seq::Pair],
    seed: u64,
    batch: usize,
) -> Result<(Tensor, u64)> {
    let (bart, b) = pair_batch(net, pairs, seed, batch)?;
    Ok((seq2seq::loss(bart, &b)?, b.tokens as u64))
}

/// Rows of logits computed at a time in the loss: at most 512, and few enough that a [rows,
/// vocab] f32 temporary stays under 24 MiB. Larger blocks are mapped fresh from the kernel at
/// every allocation (the allocator's mmap threshold is 32 MiB), and faulting and zeroing their
/// pages took a quarter of a fine-tuning step with a 49k vocabulary.
fn loss_chunk_rows(vocab: usize) -> usize {
    ((24 << 20) / (4 * vocab.max(1))).clamp(16, 512)
}

/// The summed cross-entropy of predicting `targets` [n] from final hidden states `h` [n, c]
/// through the output layer, computed a chunk of rows at a time.
pub(crate) fn output_loss_sum(
    output: &lmkit_models::layers::linear::Linear,
    h: &Tensor,
    targets: &Tensor,
) -> Result<Tensor> {
    let n = h.dim(0)?;
    let rows = loss_chunk_rows(output.dims()?.0);
    let mut total: Option<Tensor> = None;
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let logits = output.forward(&h.narrow(0, start, len)?)?;
        let part =
            lmkit_kernels::fused::cross_entropy_sum(&logits, &targets.narrow(0, start, len)?)?;
        total = Some(match total {
            Some(t) => (t + part)?,
            None => part,
        });
    }
    total.ok_or_else(|| TrainError::Data("empty batch".into()))
}

/// Mean cross-entropy of next-token predictions, computed over row chunks of the output layer.
pub(crate) fn loss_of(model: &CausalLm, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    loss_with(model, x, y, &mut model.single_pass_cache())
}

/// `loss_of` continuing from (and updating) `cache`: the carried state of recurrent models.
pub(crate) fn loss_with(
    model: &CausalLm,
    x: &Tensor,
    y: &Tensor,
    cache: &mut KvCache,
) -> Result<Tensor> {
    let h = model.hidden(x, cache)?;
    let (b, t, c) = h.dims3()?;
    let n = b * t;
    let (h, y) = (h.reshape((n, c))?, y.reshape(n)?);
    let total = output_loss_sum(model.output(), &h, &y)?;
    Ok((total / n as f64)?)
}

/// Validation loss of a recurrent model read as it trains: `windows` windows of up to `batch`
/// streams taken in order through `split`, the state carried from each window into the next
/// (from zero at the start; random windows from a zero state would measure a model it never was).
pub(crate) fn stream_loss(
    model: &CausalLm,
    split: &crate::data::Split,
    (batch, seq): (usize, usize),
    windows: usize,
    dev: &candle_core::Device,
) -> Result<f64> {
    // Streams of at least one window each (the split holds at least seq + 1 tokens).
    let rows = batch.min((split.len / (seq as u64 + 1)) as usize).max(1);
    let mut cache = model.new_cache();
    let mut total = 0.0;
    for k in 0..windows.max(1) {
        let (x, y, fresh) = split.stream_batch(k as u64, rows, seq, dev)?;
        if fresh {
            cache.clear();
        }
        total += loss_with(model, &x, &y, &mut cache)?.to_scalar::<f32>()? as f64;
    }
    Ok(total / windows.max(1) as f64)
}

impl Net {
    /// A new model of `cfg` on the variables of `vb`, with what its objective needs from the
    /// tokenizer (at `tk_path`, named in errors).
    pub(crate) fn build(
        cfg: &ModelConfig,
        vb: VarBuilder,
        tokenizer: &lmkit_tokenize::Tokenizer,
        tk_path: &Path,
    ) -> Result<Net> {
        Ok(match cfg {
            ModelConfig::Bert(c) => {
                let mask_id = tokenizer
                    .token_to_id(lmkit_core::tokens::MASK)
                    .ok_or_else(|| {
                        TrainError::Data(format!(
                            "{}: masked-LM training needs a <|mask|> token in the tokenizer",
                            tk_path.display()
                        ))
                    })?;
                let keep = lmkit_tokenize::DEFAULT_SPECIAL_TOKENS
                    .iter()
                    .filter_map(|t| tokenizer.token_to_id(t))
                    .collect();
                Net::Masked {
                    bert: Bert::new(c, vb)
                        .map_err(|e| TrainError::Data(format!("[model]: {e}")))?,
                    mask_id,
                    keep,
                }
            }
            ModelConfig::Bart(c) => Net::Seq2seq {
                bart: Bart::new(c, vb).map_err(|e| TrainError::Data(format!("[model]: {e}")))?,
                start: c.start_token(),
                end: c.eos_token_id.unwrap_or(2),
                pad: c.pad_token_id.unwrap_or(0),
            },
            causal => {
                let Some(c) = causal.clone().into_decoder() else {
                    return Err(TrainError::Data(format!(
                        "[model]: no training objective for a {:?} model",
                        causal.kind()
                    )));
                };
                Net::Causal(CausalLm::from_var_builder(&c, vb, Path::new("[model]"))?)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Validation of a recurrent model carries the state through its windows: four windows of
    /// ten tokens in three streams score as one pass over forty tokens a stream.
    #[test]
    fn recurrent_validation_reads_its_streams_as_one_pass() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = lmkit_tokenize::ShardWriter::new(dir.path(), 61, None, 1 << 20).unwrap();
        let doc: Vec<u32> = (0..150u32).map(|i| (i * 17 + 3) % 61).collect();
        w.write_document(&doc).unwrap();
        w.finish().unwrap();
        let ds = lmkit_tokenize::TokenDataset::open_dir(dir.path()).unwrap();
        let split = crate::data::Split {
            ds: &ds,
            start: 0,
            len: ds.len(),
        };
        let cfg = lmkit_models::DecoderConfig::from_json(
            serde_json::json!({"model_type": "lmkit_rnn", "cell": "rnn", "vocab_size": 61,
                               "hidden_size": 16, "num_layers": 2}),
            Path::new("config.json"),
        )
        .unwrap();
        let vm = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let model = CausalLm::from_var_builder(&cfg, vb, Path::new("random")).unwrap();
        crate::passes::testing::randomize(&vm, DType::F32);
        let dev = Device::Cpu;
        let got = stream_loss(&model, &split, (3, 10), 4, &dev).unwrap();
        // Each stream r starts at r · (150 / 3) and reads 4 × 10 tokens in one pass.
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for r in 0..3u64 {
            let win = ds.window(r * 50, 41);
            x.extend_from_slice(&win[..40]);
            y.extend_from_slice(&win[1..]);
        }
        let x = Tensor::from_vec(x, (3, 40), &dev).unwrap();
        let y = Tensor::from_vec(y, (3, 40), &dev).unwrap();
        let want = loss_of(&model, &x, &y).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
}
