//! Evaluation for every model kind lmkit makes: perplexity and bits per byte on a text file
//! (comparable across tokenizers, and between n-gram and neural models), sentence scoring and
//! ranking, and log-likelihood multiple-choice tasks in the style of lm-evaluation-harness.
#![forbid(unsafe_code)]

pub mod encoders;
mod generate;
pub mod harness;
pub mod metrics;
pub mod pyrandom;
pub mod tasks;

use candle_core::{DType, Device, Tensor, D};
use lmkit_models::{CausalLm, KvCache};
use lmkit_ngram::{Model as NgramModel, Tokenization};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Model(#[from] lmkit_models::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Ngram(#[from] lmkit_ngram::NgramError),
    #[error(transparent)]
    Tokenize(#[from] lmkit_tokenize::TokenizeError),
    #[error("{path}: {msg}")]
    Input { path: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, EvalError>;

pub use lmkit_core::{NoProgress, Progress, Unit};

/// A neural causal LM with its tokenizer.
pub struct Neural {
    pub model: CausalLm,
    pub tokenizer: lmkit_tokenize::Tokenizer,
    /// The document separator.
    pub eot: u32,
    /// The context of a text's first token: the tokenizer's BOS when it names one (as
    /// lm-evaluation-harness's `prefix_token_id`), else `eot`.
    pub prefix: u32,
    pub context: usize,
    /// End-of-sequence ids that end generation (config and generation config).
    pub stop_ids: Vec<u32>,
}

/// Any model that gives text a probability.
pub enum Scorer {
    Neural(Box<Neural>),
    Ngram(Box<NgramModel>),
    /// BERT: pseudo-log-likelihood.
    Masked(Box<encoders::Masked>),
    /// Encoder-decoder: log p(target | source).
    Seq2seq(Box<encoders::Seq2seq>),
}

/// Totals of one evaluation over a text.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct TextEval {
    pub lines: u64,
    /// UTF-8 bytes of the text, one newline per line included.
    pub bytes: u64,
    /// Tokens predicted (each line's tokens and its end-of-line / end-of-text token).
    pub tokens: u64,
    /// Negative log-likelihood of all predicted tokens, in nats.
    pub nll: f64,
    /// n-gram models: tokens outside the vocabulary (scored as `<unk>`).
    pub oov: u64,
}

impl TextEval {
    pub fn perplexity(&self) -> f64 {
        (self.nll / self.tokens.max(1) as f64).exp()
    }
    pub fn bits_per_token(&self) -> f64 {
        self.nll / std::f64::consts::LN_2 / self.tokens.max(1) as f64
    }
    pub fn bits_per_byte(&self) -> f64 {
        self.nll / std::f64::consts::LN_2 / self.bytes.max(1) as f64
    }
}

impl Scorer {
    /// A checkpoint directory or GGUF file (neural) or an `.arpa`/`.lmkb` file (n-gram; `chars`
    /// for ARPA models of characters).
    /// With `adapter`, a LoRA adapter directory is added to a causal model; `dtype` is the type a
    /// causal model's weights are read into and computed in (its logits widened to f32 for
    /// scoring); the other models take f32 only.
    pub fn load(
        path: &Path,
        device: &Device,
        chars: bool,
        adapter: Option<&Path>,
        dtype: DType,
    ) -> Result<Scorer> {
        let only_f32 = |what: &str| -> Result<()> {
            if dtype == DType::F32 {
                return Ok(());
            }
            Err(EvalError::Invalid(format!(
                "{}: {what} are scored in f32 (--dtype {} is for decoder checkpoints)",
                path.display(),
                dtype.as_str()
            )))
        };
        if adapter.is_some() && (path.is_file() && !lmkit_models::gguf::is_gguf(path)) {
            return Err(EvalError::Invalid(format!(
                "{}: --adapter is for neural models, not n-gram files",
                path.display()
            )));
        }
        if path.is_file() && !lmkit_models::gguf::is_gguf(path) {
            only_f32("n-gram models")?;
            let tok = if chars {
                Tokenization::Chars
            } else {
                Tokenization::Words
            };
            return Ok(Scorer::Ngram(Box::new(NgramModel::open(path, tok)?)));
        }
        let dir = lmkit_models::resolve_checkpoint(path);
        let kind = lmkit_models::kind_of(&dir)?;
        if kind == lmkit_models::Kind::Masked {
            only_f32("masked (BERT-style) models")?;
            let tokenizer = lmkit_tokenize::load(&dir)?;
            let mask_id = lmkit_core::tokens::MASK_TOKENS
                .iter()
                .find_map(|t| tokenizer.token_to_id(t))
                .ok_or_else(|| EvalError::Input {
                    path: dir.clone(),
                    msg: "the tokenizer has no mask token".into(),
                })?;
            return Ok(Scorer::Masked(Box::new(encoders::Masked {
                model: lmkit_models::bert::Bert::load(&dir, device)?,
                tokenizer,
                mask_id,
            })));
        }
        if kind == lmkit_models::Kind::Seq2seq {
            only_f32("encoder-decoders")?;
            let tokenizer = lmkit_tokenize::load(&dir)?;
            let model = lmkit_models::bart::Bart::load(&dir, device)?;
            let eot = tokenizer
                .token_to_id(lmkit_tokenize::ENDOFTEXT)
                .or(model.cfg.eos_token_id)
                .unwrap_or(2);
            return Ok(Scorer::Seq2seq(Box::new(encoders::Seq2seq {
                model,
                tokenizer,
                eot,
            })));
        }
        let (model, cfg) = CausalLm::load_adapted(&dir, adapter, device, dtype)?;
        let tokenizer = lmkit_tokenize::load(&dir)?;
        let eot = tokenizer
            .token_to_id(lmkit_tokenize::ENDOFTEXT)
            .or(cfg.eos_token_id())
            .ok_or_else(|| EvalError::Input {
                path: dir.clone(),
                msg: "the tokenizer has no <|endoftext|> and config.json no eos_token_id".into(),
            })?;
        let prefix = lmkit_tokenize::chat::special_tokens(&dir)?
            .bos
            .and_then(|t| tokenizer.token_to_id(&t))
            .unwrap_or(eot);
        Ok(Scorer::Neural(Box::new(Neural {
            model,
            tokenizer,
            eot,
            prefix,
            context: cfg.max_positions(),
            stop_ids: lmkit_models::stop_token_ids(&dir)
                .unwrap_or_default()
                .into_iter()
                .filter(|&i| (i as usize) < cfg.vocab_size())
                .collect(),
        })))
    }

    /// Perplexity and bits per byte of `lines` (each line a document). Neural models read the
    /// text as one stream (the prefix token first, `<|endoftext|>` after each line) in windows
    /// of the model's context, advancing by `stride` tokens (default: half the context) so that
    /// every token after the first window sees at least `context - stride` tokens of history.
    /// Recurrent models read it once, their state carried from window to window (no stride).
    pub fn eval_text(
        &self,
        lines: &[String],
        stride: Option<usize>,
        progress: &dyn Progress,
    ) -> Result<TextEval> {
        let mut e = TextEval {
            lines: lines.len() as u64,
            bytes: lines.iter().map(|l| l.len() as u64 + 1).sum(),
            ..Default::default()
        };
        match self {
            Scorer::Ngram(m) => {
                progress.begin("scoring", lines.len() as u64, Unit::Items);
                for l in lines {
                    let s = m.score_line(l);
                    e.nll -= s.log10_prob as f64 * std::f64::consts::LN_10;
                    e.tokens += s.words.len() as u64;
                    e.oov += s.words.iter().filter(|w| w.oov).count() as u64;
                    progress.advance(1);
                }
            }
            Scorer::Neural(n) => {
                let enc = lmkit_tokenize::encode_batch(&n.tokenizer, lines)?;
                let mut ids = vec![n.prefix];
                for l in enc {
                    ids.extend(l);
                    ids.push(n.eot);
                }
                let lp = n.token_logprobs(&ids, stride, progress)?;
                e.tokens = lp.len() as u64;
                e.nll = -lp.iter().map(|&x| x as f64).sum::<f64>();
            }
            Scorer::Masked(m) => {
                progress.begin("scoring", lines.len() as u64, Unit::Items);
                for l in lines {
                    let lp = m.token_logprobs(l)?;
                    e.tokens += lp.len() as u64;
                    e.nll -= lp.iter().map(|&x| x as f64).sum::<f64>();
                    progress.advance(1);
                }
            }
            Scorer::Seq2seq(m) => {
                progress.begin("scoring", lines.len() as u64, Unit::Items);
                e.bytes = 0;
                for l in lines {
                    let (src, tgt) = encoders::Seq2seq::split_line(l)?;
                    e.bytes += tgt.len() as u64 + 1;
                    let lp = m.token_logprobs(&src, &tgt)?;
                    e.tokens += lp.len() as u64;
                    e.nll -= lp.iter().map(|&x| x as f64).sum::<f64>();
                    progress.advance(1);
                }
            }
        }
        progress.finish();
        Ok(e)
    }

    /// log10 probability of a sentence on its own (from the start of a text to its end), as
    /// `lmkit ngram rank` scores it.
    pub fn sentence_log10(&self, s: &str) -> Result<f64> {
        match self {
            Scorer::Ngram(m) => Ok(m.score_line(s).log10_prob as f64),
            Scorer::Neural(n) => {
                let mut ids = vec![n.prefix];
                ids.extend(lmkit_tokenize::encode_batch(&n.tokenizer, &[s.to_string()])?.remove(0));
                ids.push(n.eot);
                let lp = n.token_logprobs(&ids, None, &NoProgress)?;
                Ok(lp.iter().map(|&x| x as f64).sum::<f64>() / std::f64::consts::LN_10)
            }
            Scorer::Masked(m) => Ok(m.token_logprobs(s)?.iter().map(|&x| x as f64).sum::<f64>()
                / std::f64::consts::LN_10),
            Scorer::Seq2seq(m) => {
                let (src, tgt) = encoders::Seq2seq::split_line(s)?;
                Ok(m.token_logprobs(&src, &tgt)?
                    .iter()
                    .map(|&x| x as f64)
                    .sum::<f64>()
                    / std::f64::consts::LN_10)
            }
        }
    }

    /// Natural-log probability of `continuation` after `context`.
    pub fn loglikelihood(&self, context: &str, continuation: &str) -> Result<f64> {
        match self {
            Scorer::Ngram(m) => {
                let t = m.tokenization();
                let joined = format!("{context}{continuation}");
                let full = lmkit_ngram::tokenize::tokens(&joined, t);
                let ctx = lmkit_ngram::tokenize::tokens(context, t);
                let a = m.score_tokens(&full, true, false).log10_prob as f64;
                let b = m.score_tokens(&ctx, true, false).log10_prob as f64;
                Ok((a - b) * std::f64::consts::LN_10)
            }
            Scorer::Neural(n) => n.loglikelihood(context, continuation),
            // The context is the source; the choice is scored as the target (without the end).
            Scorer::Seq2seq(m) => {
                let lp = m.token_logprobs(context, continuation)?;
                Ok(lp[..lp.len() - 1].iter().map(|&x| x as f64).sum())
            }
            Scorer::Masked(_) => Err(EvalError::Invalid(
                "log-likelihood tasks need a causal or encoder-decoder model, not BERT".into(),
            )),
        }
    }
}

impl Neural {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        Ok(lmkit_tokenize::encode_batch(&self.tokenizer, &[text.to_string()])?.remove(0))
    }

    /// As lm-evaluation-harness does: spaces ending the context move to the continuation; the
    /// two are tokenized separately; an empty context becomes the prefix token (BOS, else
    /// `<|endoftext|>`); the input is cut from the left to the model's context.
    pub fn loglikelihood(&self, context: &str, continuation: &str) -> Result<f64> {
        let trimmed = context.trim_end_matches(' ');
        let moved = &context[trimmed.len()..];
        let cont = self.encode(&format!("{moved}{continuation}"))?;
        if cont.is_empty() {
            return Err(EvalError::Invalid(format!(
                "the continuation {continuation:?} is empty"
            )));
        }
        let mut ctx = self.encode(trimmed)?;
        if ctx.is_empty() {
            ctx.push(self.prefix);
        }
        let mut all = ctx;
        all.extend(&cont);
        let keep = (self.context + 1).min(all.len());
        let all = &all[all.len() - keep..];
        let n = cont.len().min(all.len() - 1);
        let picked = self.picked(
            &all[..all.len() - 1],
            all.len() - 1 - n,
            &all[all.len() - n..],
        )?;
        Ok(picked.iter().map(|&x| x as f64).sum())
    }

    /// Positions scored through the output layer at once: a long window's logits
    /// ([positions, vocab], f32) are never all in memory.
    const LOGIT_ROWS: usize = 512;

    /// log p(targets[j] | ids[..first + j + 1]) for each j: one pass over `ids`, then the output
    /// layer and log-softmax on the scored positions only, a block of rows at a time.
    fn picked(&self, ids: &[u32], first: usize, targets: &[u32]) -> Result<Vec<f32>> {
        self.picked_from(&mut self.model.single_pass_cache(), ids, first, targets)
    }

    /// [`Self::picked`] continuing from the state in `cache` (and leaving it after `ids`).
    fn picked_from(
        &self,
        cache: &mut KvCache,
        ids: &[u32],
        first: usize,
        targets: &[u32],
    ) -> Result<Vec<f32>> {
        let x = Tensor::new(ids, self.model.device())?.unsqueeze(0)?;
        let hidden = self.model.hidden(&x, cache)?.squeeze(0)?;
        let mut out = Vec::with_capacity(targets.len());
        for (b, chunk) in targets.chunks(Self::LOGIT_ROWS).enumerate() {
            let rows = hidden.narrow(0, first + b * Self::LOGIT_ROWS, chunk.len())?;
            let logits =
                candle_nn::Module::forward(self.model.output(), &rows)?.to_dtype(DType::F32)?;
            if logits.device().is_cpu() {
                out.extend(lmkit_models::layers::ops::target_log_probs(&logits, chunk)?);
                continue;
            }
            let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let t = Tensor::new(chunk, lp.device())?.unsqueeze(1)?;
            out.extend(lp.gather(&t, 1)?.squeeze(1)?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// log p(ids[i] | ids[..i]) for i ≥ 1, with strided windows over long inputs.
    pub fn token_logprobs(
        &self,
        ids: &[u32],
        stride: Option<usize>,
        progress: &dyn Progress,
    ) -> Result<Vec<f32>> {
        let ctx = self.context;
        let mut out = Vec::with_capacity(ids.len().saturating_sub(1));
        progress.begin("scoring", ids.len().saturating_sub(1) as u64, Unit::Items);
        if self.model.is_recurrent() {
            // A recurrent model reads the stream once, its state carried from one window to
            // the next, as it was trained: every token sees the whole text before it, and no
            // window starts from a zero state in the middle of the text.
            let mut cache = self.model.single_pass_cache();
            let mut begin = 0usize;
            while begin + 1 < ids.len() {
                let end = (begin + ctx).min(ids.len() - 1);
                out.extend(self.picked_from(
                    &mut cache,
                    &ids[begin..end],
                    0,
                    &ids[begin + 1..end + 1],
                )?);
                progress.advance((end - begin) as u64);
                begin = end;
            }
            return Ok(out);
        }
        let stride = stride.unwrap_or(ctx / 2).clamp(1, ctx);
        // `done`: tokens ids[1..=done] are scored.
        let mut done = 0usize;
        let mut begin = 0usize;
        while done + 1 < ids.len() {
            let end = (begin + ctx).min(ids.len());
            let window = &ids[begin..end];
            // Position j of the window predicts ids[begin + j + 1]; score the new ones.
            let first = done - begin; // predicts ids[done + 1]
            let n = end - 1 - done;
            out.extend(self.picked(window, first, &ids[done + 1..end])?);
            progress.advance(n as u64);
            done = end - 1;
            if end == ids.len() {
                break;
            }
            begin = (begin + stride).min(done);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmkit_models::DecoderConfig;

    /// A random model of `config` (every variable N(0, 0.5²)) reading `context` tokens at once.
    fn neural(config: &str, context: usize) -> Neural {
        let v: serde_json::Value = serde_json::from_str(config).unwrap();
        let cfg = DecoderConfig::from_json(v, Path::new("config.json")).unwrap();
        let vm = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let model = CausalLm::from_var_builder(&cfg, vb, Path::new("random")).unwrap();
        for (_, var) in lmkit_kernels::testing::vars_by_name(&vm) {
            let t = lmkit_kernels::testing::randn(0f32, 0.5, var.shape(), &Device::Cpu).unwrap();
            var.set(&t).unwrap();
        }
        let tokenizer: lmkit_tokenize::Tokenizer =
            r#"{"version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [], "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": null, "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}"#
                .parse()
                .unwrap();
        Neural {
            model,
            tokenizer,
            eot: 0,
            prefix: 0,
            context,
            stop_ids: Vec::new(),
        }
    }

    /// A recurrent model scores a stream longer than its context as one pass would, its state
    /// carried across windows (as it trained), whatever the stride asked for.
    #[test]
    fn a_recurrent_model_scores_a_long_stream_as_one_pass() {
        let config = r#"{"model_type": "lmkit_rnn", "cell": "rnn", "vocab_size": 61, "hidden_size": 20,
            "num_layers": 2, "max_position_embeddings": 8}"#;
        let ids: Vec<u32> = (0..47u32).map(|i| (i * 17 + 3) % 61).collect();
        let mut n = neural(config, 64);
        let whole = n.token_logprobs(&ids, None, &NoProgress).unwrap();
        assert_eq!(whole.len(), ids.len() - 1);
        n.context = 8;
        for stride in [None, Some(3), Some(8)] {
            let got = n.token_logprobs(&ids, stride, &NoProgress).unwrap();
            assert_eq!(got.len(), whole.len());
            for (j, (a, b)) in got.iter().zip(&whole).enumerate() {
                assert!(
                    (a - b).abs() < 1e-4,
                    "token {j}, stride {stride:?}: {a} vs {b}"
                );
            }
        }
    }
}
