//! Scoring with the non-causal families. BERT: pseudo-log-likelihood (Salazar et al. 2020) —
//! each token scored with itself masked and both sides visible. Encoder-decoder: log p(target |
//! source), each line being a `{"source", "target"}` JSON object or plain text (then the source is
//! empty: the end-of-text token alone).

use crate::{EvalError, Result};
use candle_core::{Tensor, D};
use lmkit_models::bart::Bart;
use lmkit_models::bert::Bert;

pub struct Masked {
    pub model: Bert,
    pub tokenizer: lmkit_tokenize::Tokenizer,
    pub mask_id: u32,
}

pub struct Seq2seq {
    pub model: Bart,
    pub tokenizer: lmkit_tokenize::Tokenizer,
    pub eot: u32,
}

fn encode(tk: &lmkit_tokenize::Tokenizer, text: &str) -> Result<Vec<u32>> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    Ok(lmkit_tokenize::encode_batch(tk, &[text.to_string()])?.remove(0))
}

fn pick(logits: &Tensor, rows: &[u32], targets: &[u32]) -> Result<Vec<f32>> {
    let dev = logits.device();
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let lp = lp.index_select(&Tensor::new(rows, dev)?, 0)?;
    let t = Tensor::new(targets, dev)?.unsqueeze(1)?;
    Ok(lp.gather(&t, 1)?.squeeze(1)?.to_vec1()?)
}

impl Masked {
    /// Natural-log pseudo-likelihood of every token of `text` (cut to the model's positions).
    pub fn token_logprobs(&self, text: &str) -> Result<Vec<f32>> {
        let mut ids = encode(&self.tokenizer, text)?;
        ids.truncate(self.model.cfg.max_position_embeddings);
        let n = ids.len();
        let mut out = Vec::with_capacity(n);
        // One row per position, that position masked; rows in chunks to bound memory.
        for start in (0..n).step_by(32) {
            let rows = (n - start).min(32);
            let mut batch = Vec::with_capacity(rows * n);
            for r in 0..rows {
                let mut x = ids.clone();
                x[start + r] = self.mask_id;
                batch.extend(x);
            }
            let x = Tensor::from_vec(batch, (rows, n), self.model.word_device())?;
            let logits = self.model.mlm_logits(&self.model.hidden(&x, None)?)?;
            let v = logits.dim(2)?;
            let flat = logits.reshape((rows * n, v))?;
            let idx: Vec<u32> = (0..rows).map(|r| (r * n + start + r) as u32).collect();
            let tg: Vec<u32> = (0..rows).map(|r| ids[start + r]).collect();
            out.extend(pick(&flat, &idx, &tg)?);
        }
        Ok(out)
    }
}

impl Seq2seq {
    /// A line as (source, target): JSON `{"source", "target"}`, or plain text as the target.
    pub fn split_line(line: &str) -> Result<(String, String)> {
        if line.trim_start().starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| EvalError::Invalid(format!("not valid JSON: {e}")))?;
            let get = |k: &str| {
                v.get(k)
                    .and_then(|s| s.as_str())
                    .map(String::from)
                    .ok_or_else(|| {
                        EvalError::Invalid(format!("a JSON line needs `{k}` (a string)"))
                    })
            };
            return Ok((get("source")?, get("target")?));
        }
        Ok((String::new(), line.to_string()))
    }

    /// log p(target tokens, then end-of-text | source), natural log, one value per token.
    pub fn token_logprobs(&self, source: &str, target: &str) -> Result<Vec<f32>> {
        let max = self.model.cfg.max_position_embeddings;
        let mut src = encode(&self.tokenizer, source)?;
        if src.is_empty() {
            src.push(self.eot);
        }
        src.truncate(max);
        let mut tgt = encode(&self.tokenizer, target)?;
        tgt.truncate(max - 1);
        tgt.push(self.model.cfg.eos_token_id.unwrap_or(self.eot));
        let dev = self.model.word_device();
        let memory = self
            .model
            .encode(&Tensor::new(src.as_slice(), dev)?.unsqueeze(0)?, None)?;
        let mut inp = vec![self.model.cfg.start_token()];
        inp.extend(&tgt[..tgt.len() - 1]);
        let logits = self
            .model
            .decode(
                &Tensor::new(inp.as_slice(), dev)?.unsqueeze(0)?,
                &memory,
                None,
            )?
            .squeeze(0)?;
        let rows: Vec<u32> = (0..tgt.len() as u32).collect();
        pick(&logits, &rows, &tgt)
    }
}
