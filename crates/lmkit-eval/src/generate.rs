//! Generation for `generate_until` tasks: prompts decoded together in batches, each until a stop
//! string, an end-of-sequence token or `max_gen_toks`, as lm-evaluation-harness does (prompts
//! longer than the context keep their last `context - max_gen_toks` tokens).

use crate::harness::Generation;
use crate::{EvalError, Neural, Progress, Result};
use lmkit_infer::{Decoder, GenerateOptions, SamplingParams, Step};

impl Neural {
    /// The completions of `prompts`, in order, each cut at its first stop string.
    pub fn generate_until(
        &self,
        prompts: &[String],
        g: &Generation,
        seed: u64,
        batch: usize,
        progress: &dyn Progress,
    ) -> Result<Vec<String>> {
        let max_new = g
            .max_gen_toks
            .clamp(1, self.context.saturating_sub(1).max(1));
        let keep = self.context.saturating_sub(max_new).max(1);
        let sampling = SamplingParams {
            temperature: if g.do_sample {
                g.temperature as f32
            } else {
                0.0
            },
            top_k: g.top_k,
            top_p: g.top_p.map(|p| p as f32),
            repetition_penalty: 1.0,
            seed,
        };
        let stops: Vec<&str> = g
            .until
            .iter()
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .collect();
        let cut = |text: &str| -> (usize, bool) {
            match stops.iter().filter_map(|s| text.find(s)).min() {
                Some(i) => (i, true),
                None => (text.len(), false),
            }
        };
        let mut out = vec![String::new(); prompts.len()];
        let batch = batch.max(1);
        for (b, chunk) in prompts.chunks(batch).enumerate() {
            let ids = lmkit_tokenize::encode_batch(&self.tokenizer, chunk)?;
            let mut decoders = Vec::with_capacity(chunk.len());
            for (i, mut p) in ids.into_iter().enumerate() {
                if p.is_empty() {
                    p.push(self.prefix);
                }
                if p.len() > keep {
                    p.drain(..p.len() - keep);
                }
                let opts = GenerateOptions {
                    max_tokens: max_new,
                    sampling: SamplingParams {
                        seed: seed.wrapping_add((b * batch + i) as u64),
                        ..sampling.clone()
                    },
                    stop_ids: self.stop_ids.clone(),
                    max_positions: self.context,
                };
                decoders.push(
                    Decoder::new(&self.model, &p, opts)
                        .map_err(|e| EvalError::Invalid(e.to_string()))?,
                );
            }
            let mut done = vec![false; decoders.len()];
            while done.iter().any(|d| !d) {
                let idx: Vec<usize> = (0..done.len()).filter(|&i| !done[i]).collect();
                let mut live: Vec<&mut Decoder> = decoders
                    .iter_mut()
                    .zip(&done)
                    .filter(|(_, d)| !**d)
                    .map(|(d, _)| d)
                    .collect();
                let steps =
                    Decoder::step_many(&self.model, &mut live, lmkit_infer::PACKED_PROMPT_TOKENS);
                for (i, s) in idx.into_iter().zip(steps) {
                    match s.map_err(|e| EvalError::Invalid(e.to_string()))? {
                        Step::Done(_) => done[i] = true,
                        Step::Token(_) if !stops.is_empty() => {
                            let text = self.text_of(decoders[i].generated())?;
                            if cut(&text).1 {
                                done[i] = true;
                            }
                        }
                        Step::Token(_) | Step::Pending => {}
                    }
                }
            }
            for (i, d) in decoders.iter().enumerate() {
                let text = self.text_of(d.generated())?;
                let (end, _) = cut(&text);
                out[b * batch + i] = text[..end].to_string();
            }
            progress.advance(chunk.len() as u64);
        }
        Ok(out)
    }

    /// The text of generated ids; ids the tokenizer lacks (a model's vocabulary padded past the
    /// tokenizer's) decode to nothing, as in transformers.
    fn text_of(&self, ids: &[u32]) -> Result<String> {
        let known: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&i| self.tokenizer.id_to_token(i).is_some())
            .collect();
        Ok(lmkit_tokenize::decode(&self.tokenizer, &known)?)
    }
}
