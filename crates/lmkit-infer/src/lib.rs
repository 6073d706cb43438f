//! Text generation with lmkit's decoders: KV-cached decoding, sampling, stop conditions, streaming.
#![forbid(unsafe_code)]

pub mod beam;
pub mod constrain;
pub mod sampling;

pub use sampling::{logprobs, sample, LogitAdjust, Random, Rng, SamplingParams, TokenLogprobs};

use lmkit_models::{CausalLm, ModelError, Tensor};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Candle(#[from] lmkit_models::candle_error::Error),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, InferError>;

/// Prompt tokens read per pass at most by default ([`Decoder::step_many`]): enough to share the
/// weights' reads among many short prompts, few enough that the pass's activations stay small
/// and the other sequences' next tokens are not held up long.
pub const PACKED_PROMPT_TOKENS: usize = 2048;

/// Where [`Decoder::step`]'s time went, over the process's decoding steps (one new token each;
/// prompts not counted): the host's time running the model's pass up to the read of its logits
/// (on a GPU: launching the work, which runs asynchronously), and the time that read took (on a
/// GPU: waiting for the work to finish, and the copy). Batch-1 decoding on a GPU whose steps
/// are mostly the first is held up by the host.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepClock {
    pub steps: u64,
    pub pass_secs: f64,
    pub read_secs: f64,
}

static STEP_CLOCK: std::sync::Mutex<StepClock> = std::sync::Mutex::new(StepClock {
    steps: 0,
    pass_secs: 0.0,
    read_secs: 0.0,
});

/// The [`StepClock`] of the steps so far.
pub fn step_clock() -> StepClock {
    *STEP_CLOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// The end-of-sequence token was produced.
    Eos,
    /// `max_tokens` reached.
    Length,
    /// The model's context is full.
    Context,
    /// The caller's callback asked to stop (a stop string, a closed connection...).
    Stopped,
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop at any of these tokens (not included in the output); empty: never stop on a token.
    pub stop_ids: Vec<u32>,
    /// The model's number of positions.
    pub max_positions: usize,
}

/// One sequence being decoded: its KV cache, sampler state and tokens so far. Each `step` runs
/// the model once and yields one token, so a scheduler can interleave many sequences.
pub struct Decoder {
    cache: lmkit_models::KvCache,
    rng: Rng,
    history: Vec<u32>,
    generated: Vec<u32>,
    /// Tokens not yet fed to the model: the prompt at first, then the last sampled token.
    pending: Vec<u32>,
    opts: GenerateOptions,
    /// The stop token that ended decoding, if one did.
    stopped_by: Option<u32>,
    /// A grammar the output must follow.
    constraint: Option<constrain::Constraint>,
    constraint_error: Option<String>,
    /// How many of the most likely tokens' log-probabilities to keep with each token taken
    /// (`None`: none are computed).
    logprobs: Option<usize>,
    /// The last token's, where asked for.
    last_logprobs: Option<TokenLogprobs>,
    /// Penalties and biases applied to the logits before each token is chosen.
    adjust: Option<LogitAdjust>,
}

/// What one decoding step produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Token(u32),
    Done(Finish),
    /// No token yet: part of the prompt was read, or it waits for its turn
    /// ([`Decoder::step_many`] reads long prompts in pieces).
    Pending,
}

impl Decoder {
    /// Checks the options and the prompt against the model's context.
    pub fn new(model: &CausalLm, prompt: &[u32], opts: GenerateOptions) -> Result<Decoder> {
        opts.sampling.validate().map_err(InferError::Invalid)?;
        if prompt.is_empty() {
            return Err(InferError::Invalid(
                "the prompt is empty: give at least one token".into(),
            ));
        }
        if prompt.len() >= opts.max_positions {
            return Err(InferError::Invalid(format!(
                "the prompt has {} tokens but the model's context holds {}",
                prompt.len(),
                opts.max_positions
            )));
        }
        let mut d = Decoder {
            cache: model.new_cache(),
            rng: Rng::new(opts.sampling.seed),
            history: prompt.to_vec(),
            generated: Vec::new(),
            pending: prompt.to_vec(),
            opts,
            stopped_by: None,
            constraint: None,
            constraint_error: None,
            logprobs: None,
            last_logprobs: None,
            adjust: None,
        };
        d.cache.reserve(d.most_positions());
        Ok(d)
    }

    /// Like [`Decoder::new`], starting from `cache`: the keys and values of the prompt's first
    /// `cache.len()` tokens, as another sequence that read them left them
    /// ([`lmkit_models::KvCache::prefix`]); only the rest of the prompt is read. At least the
    /// prompt's last token must be left to read (its logits give the first token).
    pub fn with_prefix(
        model: &CausalLm,
        prompt: &[u32],
        opts: GenerateOptions,
        cache: lmkit_models::KvCache,
    ) -> Result<Decoder> {
        let mut d = Decoder::new(model, prompt, opts)?;
        let n = cache.len();
        if n >= prompt.len() || cache.num_layers() != d.cache.num_layers() {
            return Err(InferError::Invalid(format!(
                "a cached prefix of {n} positions over {} layers cannot start a prompt of {} tokens for a model of {} layers",
                cache.num_layers(),
                prompt.len(),
                d.cache.num_layers()
            )));
        }
        d.cache = cache;
        d.cache.reserve(d.most_positions());
        d.pending.drain(..n);
        Ok(d)
    }

    /// The tokens whose keys and values this decoder's cache holds (its prompt and output so
    /// far, less what it has yet to read), and the cache; `None` where the two disagree (a pass
    /// that failed partway).
    pub fn cached(&self) -> Option<(&[u32], &lmkit_models::KvCache)> {
        let read = self.history.len().checked_sub(self.pending.len())?;
        (read == self.cache.len()).then(|| (&self.history[..read], &self.cache))
    }

    /// The most positions this decoder's cache can come to hold: its prompt and the tokens it
    /// may still generate, within the model's context.
    fn most_positions(&self) -> usize {
        let left = self.opts.max_tokens.saturating_sub(self.generated.len());
        self.history
            .len()
            .saturating_add(left)
            .min(self.opts.max_positions)
    }

    /// Makes every later token follow `c`.
    pub fn constrain(&mut self, c: constrain::Constraint) {
        self.constraint = Some(c);
    }

    /// Makes each token taken keep its log-probability and the `top` most likely tokens' at its
    /// position ([`Decoder::last_logprobs`]).
    pub fn keep_logprobs(&mut self, top: usize) {
        self.logprobs = Some(top);
    }

    /// Makes each token be chosen from logits adjusted by `a` (OpenAI's frequency and presence
    /// penalties over the tokens generated so far, and `logit_bias`); log-probabilities stay the
    /// model's own.
    pub fn adjust_logits(&mut self, a: LogitAdjust) {
        self.adjust = (!a.is_noop()).then_some(a);
    }

    /// The log-probabilities of the token the last step took, or of the stop token that ended
    /// decoding at the last step (`None` where not asked for with [`Decoder::keep_logprobs`] or
    /// the last step took none).
    pub fn last_logprobs(&self) -> Option<&TokenLogprobs> {
        self.last_logprobs.as_ref()
    }

    /// Why the constraint ended decoding early, if it did (an engine error).
    pub fn constraint_error(&self) -> Option<&str> {
        self.constraint_error.as_deref()
    }

    /// Whether the output so far completes its constraint (true without one).
    pub fn constraint_complete(&mut self) -> bool {
        self.constraint.as_mut().is_none_or(|c| c.is_accepting())
    }

    /// The tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// The stop token that ended decoding (not in [`Decoder::generated`]), if one did.
    pub fn stopped_by(&self) -> Option<u32> {
        self.stopped_by
    }

    /// Why decoding must end before another step, if it must.
    fn limit(&self) -> Option<Finish> {
        if self.generated.len() >= self.opts.max_tokens {
            Some(Finish::Length)
        } else if self.history.len() >= self.opts.max_positions {
            Some(Finish::Context)
        } else {
            None
        }
    }

    /// Samples from the logits of the last position and records the token.
    fn take(&mut self, last: &[f32]) -> Step {
        // The pass read every pending token: the cache holds them now.
        self.pending.clear();
        self.last_logprobs = None;
        let raw = last;
        let adjusted;
        let last = match &self.adjust {
            Some(a) => {
                adjusted = {
                    let mut l = raw.to_vec();
                    a.apply(&mut l, &self.generated);
                    l
                };
                adjusted.as_slice()
            }
            None => raw,
        };
        let next = match &mut self.constraint {
            None => sample(last, &self.history, &self.opts.sampling, &mut self.rng),
            Some(c) => {
                if c.is_stopped() {
                    // The grammar is complete and allows nothing more.
                    return Step::Done(Finish::Eos);
                }
                let mut masked = last.to_vec();
                if let Err(e) = c.mask(&mut masked) {
                    self.constraint_error = Some(e);
                    return Step::Done(Finish::Stopped);
                }
                let next = sample(&masked, &self.history, &self.opts.sampling, &mut self.rng);
                if self.opts.stop_ids.contains(&next) {
                    // Allowed only where the grammar is complete; the engine does not take it.
                } else if let Err(e) = c.consume(next) {
                    self.constraint_error = Some(e);
                    return Step::Done(Finish::Stopped);
                }
                next
            }
        };
        if self.opts.stop_ids.contains(&next) {
            self.stopped_by = Some(next);
            if let Some(top) = self.logprobs {
                self.last_logprobs = Some(logprobs(raw, next, top));
            }
            return Step::Done(Finish::Eos);
        }
        if let Some(top) = self.logprobs {
            self.last_logprobs = Some(logprobs(raw, next, top));
        }
        self.generated.push(next);
        self.history.push(next);
        self.pending.push(next);
        Step::Token(next)
    }

    /// Runs the model on the pending tokens and samples the next one.
    pub fn step(&mut self, model: &CausalLm) -> Result<Step> {
        if let Some(why) = self.limit() {
            // No token taken: none has log-probabilities.
            self.last_logprobs = None;
            return Ok(Step::Done(why));
        }
        let started = std::time::Instant::now();
        let input = Tensor::new(self.pending.as_slice(), model.device())?.unsqueeze(0)?;
        // Only the last position's logits are sampled from.
        let logits = model.forward_last(&input, &mut self.cache)?;
        let passed = std::time::Instant::now();
        let last: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        if input.elem_count() == 1 {
            let mut clock = STEP_CLOCK.lock().unwrap_or_else(|e| e.into_inner());
            clock.steps += 1;
            clock.pass_secs += (passed - started).as_secs_f64();
            clock.read_secs += passed.elapsed().as_secs_f64();
        }
        Ok(self.take(&last))
    }

    /// One step for each decoder, in one pass over the model where it can: the decoders past
    /// their prompt (one pending token each) together with up to `prompt_tokens` tokens of the
    /// prompts still to read, in their order — a prompt that does not fit is read in pieces
    /// over the next calls (its step is [`Step::Pending`] until its last piece), so that a long
    /// prompt does not hold up the others' tokens. The sequences are packed one after another,
    /// each attending only to its own cache ([`CausalLm::forward_packed_last`]); a fresh prompt
    /// equal to another in the pass is read once, its decoder starting from a copy of the
    /// other's cache. With `prompt_tokens` 0 each prompt is read whole in a pass of its own and
    /// the other decoders step together.
    pub fn step_many(
        model: &CausalLm,
        decoders: &mut [&mut Decoder],
        prompt_tokens: usize,
    ) -> Vec<Result<Step>> {
        let mut out: Vec<Option<Result<Step>>> = decoders.iter().map(|_| None).collect();
        let mut live = Vec::new();
        for (i, d) in decoders.iter_mut().enumerate() {
            match d.limit() {
                Some(why) => {
                    d.last_logprobs = None;
                    out[i] = Some(Ok(Step::Done(why)));
                }
                None => live.push(i),
            }
        }
        // Passes of (decoder, pending tokens it reads), each in increasing decoder order.
        let mut passes: Vec<Vec<(usize, usize)>> = Vec::new();
        let (steps, prompts): (Vec<usize>, Vec<usize>) = live
            .into_iter()
            .partition(|&i| decoders[i].pending.len() == 1);
        let mut pass: Vec<(usize, usize)> = steps.into_iter().map(|i| (i, 1)).collect();
        // (decoder, the decoder in the pass whose prompt and cache it takes).
        let mut copies: Vec<(usize, usize)> = Vec::new();
        if prompt_tokens == 0 {
            passes.extend(
                prompts
                    .iter()
                    .map(|&i| vec![(i, decoders[i].pending.len())]),
            );
        } else {
            let mut budget = prompt_tokens;
            for i in prompts {
                // A fresh prompt equal to one read whole in this pass (the choices of one
                // request) is not read again: its decoder starts from a copy of that one's cache.
                let d = &decoders[i];
                let twin = pass.iter().find(|&&(j, n)| {
                    let e = &decoders[j];
                    d.cache.is_empty()
                        && e.cache.is_empty()
                        && n == e.pending.len()
                        && e.pending == d.pending
                });
                if let Some(&(j, _)) = twin {
                    copies.push((i, j));
                    continue;
                }
                let n = decoders[i].pending.len().min(budget);
                if n == 0 {
                    out[i] = Some(Ok(Step::Pending));
                } else {
                    pass.push((i, n));
                    budget -= n;
                }
            }
            pass.sort_unstable();
        }
        if !pass.is_empty() {
            passes.push(pass);
        }
        // The passes' logits, and the row of them each decoder samples from.
        let mut sampled: Vec<Vec<f32>> = Vec::new();
        let mut row_of: Vec<Option<usize>> = vec![None; decoders.len()];
        for pass in passes {
            let rows: Vec<Result<Vec<f32>>> = match read_pass(model, decoders, &pass) {
                Ok(rows) => rows.into_iter().map(Ok).collect(),
                // One sequence's error (a context or window exceeded) fails the pass: read each
                // alone so that it fails only its own.
                Err(_) if pass.len() > 1 => pass
                    .iter()
                    .map(|&p| read_pass(model, decoders, &[p]).map(|mut rows| rows.remove(0)))
                    .collect(),
                Err(e) => vec![Err(e)],
            };
            for (&(i, n), row) in pass.iter().zip(rows) {
                let row = match row {
                    Ok(row) => row,
                    Err(e) => {
                        for &(c, _) in copies.iter().filter(|&&(_, j)| j == i) {
                            out[c] = Some(Err(InferError::Invalid(e.to_string())));
                        }
                        out[i] = Some(Err(e));
                        continue;
                    }
                };
                for &(c, _) in copies.iter().filter(|&&(_, j)| j == i) {
                    match decoders[i].cache.fork() {
                        Ok(cache) => {
                            let d = &mut *decoders[c];
                            d.cache = cache;
                            d.cache.reserve(d.most_positions());
                            row_of[c] = Some(sampled.len());
                        }
                        Err(e) => out[c] = Some(Err(e.into())),
                    }
                }
                let d = &mut *decoders[i];
                if n < d.pending.len() {
                    d.pending.drain(..n);
                    out[i] = Some(Ok(Step::Pending));
                } else {
                    row_of[i] = Some(sampled.len());
                }
                sampled.push(row);
            }
        }
        // Sampling: with the model on a GPU, decoders side by side on the thread pool (each
        // draws from its own generator: the same tokens as one after another) — over a large
        // vocabulary with flat logits a draw can take a millisecond or more, and 32 in a row
        // outlast a GPU's pass. With the model on the CPU one after another: its cores run the
        // passes, side by side gained nothing measurable there and the pool's threads kept
        // ≈ 30 MB more (GRPO's rollouts).
        let jobs: Vec<(usize, &mut Decoder, &[f32])> = decoders
            .iter_mut()
            .enumerate()
            .filter_map(|(i, d)| row_of[i].map(|r| (i, &mut **d, sampled[r].as_slice())))
            .collect();
        let take = |(i, d, row): (usize, &mut Decoder, &[f32])| (i, d.take(row));
        let side_by_side = !model.device().is_cpu() || DRAWS_SIDE_BY_SIDE_ON_CPU.load(SeqCst);
        let taken: Vec<(usize, Step)> = if side_by_side && jobs.len() > 1 {
            use rayon::prelude::*;
            jobs.into_par_iter().map(take).collect()
        } else {
            jobs.into_iter().map(take).collect()
        };
        for (i, step) in taken {
            out[i] = Some(Ok(step));
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Err(InferError::Invalid("decoder skipped".into()))))
            .collect()
    }
}

/// Prompt positions read a pass by [`score_prompt`]: their logits (positions × vocabulary f32)
/// stay a few tens of MB.
const SCORE_POSITIONS: usize = 256;

/// The log-probabilities of `prompt`'s tokens after the first (each under the model given the
/// tokens before it, with the `top` most likely tokens' at its position), and the cache of
/// all but its last token: [`Decoder::with_prefix`] then reads only that one to continue (what
/// `echo` with `logprobs` asks of a completion). Read in passes of a few hundred positions.
pub fn score_prompt(model: &CausalLm, prompt: &[u32], top: usize) -> Result<Scores> {
    score_prompt_in_pieces(model, prompt, top, SCORE_POSITIONS)
}

/// [`score_prompt`] reading `positions` a pass (tests of the pieces' joins).
#[doc(hidden)]
pub fn score_prompt_in_pieces(
    model: &CausalLm,
    prompt: &[u32],
    top: usize,
    positions: usize,
) -> Result<Scores> {
    let mut s = PromptScoring::new(model, prompt, top);
    s.pass = positions.max(1);
    s.advance(model, usize::MAX)?;
    Ok(s.finish())
}

/// [`score_prompt`] spread over calls: each [`PromptScoring::advance`] reads some more of the
/// prompt (a server's scoring of a long prompt between its decoding rounds).
pub struct PromptScoring {
    prompt: Vec<u32>,
    top: usize,
    /// Positions a pass reads at most.
    pass: usize,
    scores: Vec<TokenLogprobs>,
    cache: lmkit_models::KvCache,
}

impl PromptScoring {
    pub fn new(model: &CausalLm, prompt: &[u32], top: usize) -> PromptScoring {
        PromptScoring {
            prompt: prompt.to_vec(),
            top,
            pass: SCORE_POSITIONS,
            scores: Vec::with_capacity(prompt.len().saturating_sub(1)),
            cache: model.new_cache(),
        }
    }

    /// Reads up to `positions` more of the prompt's positions; true once all are read.
    pub fn advance(&mut self, model: &CausalLm, positions: usize) -> Result<bool> {
        // Position p predicts prompt[p + 1]: positions 0 .. len - 1.
        let read = self.prompt.len().saturating_sub(1);
        let end = read.min(self.scores.len().saturating_add(positions.max(1)));
        while self.scores.len() < end {
            let from = self.scores.len();
            let to = end.min(from + self.pass);
            let ids = Tensor::new(&self.prompt[from..to], model.device())?.unsqueeze(0)?;
            let rows: Vec<Vec<f32>> = model
                .forward(&ids, &mut self.cache)?
                .squeeze(0)?
                .to_vec2()?;
            let next = &self.prompt[from + 1..];
            let top = self.top;
            self.scores
                .extend(rows.iter().zip(next).map(|(row, &t)| logprobs(row, t, top)));
        }
        Ok(self.scores.len() == read)
    }

    /// The scores and the cache of the positions read (all of them once
    /// [`PromptScoring::advance`] said so).
    pub fn finish(self) -> Scores {
        (self.scores, self.cache)
    }
}

/// Prompt positions read together at most by [`score_prompts`]: their logits stay a few hundred
/// MB for a large vocabulary.
const SCORE_PACKED: usize = 1024;

/// What [`score_prompt`] gives for one prompt.
pub type Scores = (Vec<TokenLogprobs>, lmkit_models::KvCache);

/// [`score_prompt`] for several prompts (each with its number of most likely tokens), in their
/// order: prompts that fit in a thousand positions together are read in one pass (the output
/// layer's product over every position then reads its weight once for all of them, as a padded
/// batch would), a longer one alone in pieces. A pass that fails is read again prompt by prompt,
/// so that an error is only its own prompt's.
pub fn score_prompts(model: &CausalLm, prompts: &[(&[u32], usize)]) -> Vec<Result<Scores>> {
    let mut out = Vec::with_capacity(prompts.len());
    let mut group: Vec<(&[u32], usize)> = Vec::new();
    let mut used = 0;
    let flush = |group: &mut Vec<(&[u32], usize)>, out: &mut Vec<Result<Scores>>| {
        match score_together(model, group) {
            Ok(all) => out.extend(all.into_iter().map(Ok)),
            Err(_) => out.extend(group.iter().map(|&(p, top)| score_prompt(model, p, top))),
        }
        group.clear();
    };
    for &(prompt, top) in prompts {
        let read = prompt.len().saturating_sub(1);
        if read == 0 || read > SCORE_PACKED {
            flush(&mut group, &mut out);
            used = 0;
            out.push(score_prompt(model, prompt, top));
            continue;
        }
        if used + read > SCORE_PACKED {
            flush(&mut group, &mut out);
            used = 0;
        }
        group.push((prompt, top));
        used += read;
    }
    flush(&mut group, &mut out);
    out
}

/// The prompts (all but their last tokens, each at least one) read in one packed pass.
fn score_together(model: &CausalLm, prompts: &[(&[u32], usize)]) -> Result<Vec<Scores>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let seqs: Vec<&[u32]> = prompts.iter().map(|(p, _)| &p[..p.len() - 1]).collect();
    let mut caches: Vec<lmkit_models::KvCache> =
        prompts.iter().map(|_| model.new_cache()).collect();
    let rows: Vec<Vec<f32>> = {
        let mut refs: Vec<&mut lmkit_models::KvCache> = caches.iter_mut().collect();
        model.forward_packed(&seqs, &mut refs)?.to_vec2()?
    };
    let mut at = 0;
    Ok(prompts
        .iter()
        .zip(caches)
        .map(|(&(p, top), cache)| {
            use rayon::prelude::*;
            let n = p.len() - 1;
            let scores = rows[at..at + n]
                .par_iter()
                .zip(&p[1..])
                .map(|(row, &t)| logprobs(row, t, top))
                .collect();
            at += n;
            (scores, cache)
        })
        .collect())
}

/// Whether [`Decoder::step_many`] draws the tokens of a model on the CPU side by side as it does
/// on a GPU (tests of that path; see [`draw_side_by_side_on_cpu`]).
static DRAWS_SIDE_BY_SIDE_ON_CPU: AtomicBool = AtomicBool::new(false);

/// Makes [`Decoder::step_many`] draw the tokens of a model on the CPU side by side on the thread
/// pool, as it does for a model on a GPU (for tests of that path where there is no GPU).
#[doc(hidden)]
pub fn draw_side_by_side_on_cpu(on: bool) {
    DRAWS_SIDE_BY_SIDE_ON_CPU.store(on, SeqCst);
}

/// One pass over the model: decoder `i` reads its first `n` pending tokens, for each `(i, n)`
/// of `pass` (in increasing `i`); the logits of each one's last token read.
fn read_pass(
    model: &CausalLm,
    decoders: &mut [&mut Decoder],
    pass: &[(usize, usize)],
) -> Result<Vec<Vec<f32>>> {
    let seqs: Vec<Vec<u32>> = pass
        .iter()
        .map(|&(i, n)| decoders[i].pending[..n].to_vec())
        .collect();
    let seqs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let mut caches: Vec<&mut lmkit_models::KvCache> = decoders
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| pass.iter().any(|&(j, _)| j == *i))
        .map(|(_, d)| &mut d.cache)
        .collect();
    Ok(model.forward_packed_last(&seqs, &mut caches)?.to_vec2()?)
}

/// Steps the decoders not yet `done` together ([`Decoder::step_many`], prompts packed up to
/// `prompt_tokens` tokens a pass) until every one is (`done[i]` marks decoder i finished,
/// before and after); returns how many rounds it took.
pub fn finish_all(
    model: &CausalLm,
    decoders: &mut [Decoder],
    done: &mut [bool],
    prompt_tokens: usize,
) -> Result<usize> {
    let mut rounds = 0;
    while done.iter().any(|d| !d) {
        let mut live: Vec<&mut Decoder> = decoders
            .iter_mut()
            .zip(done.iter())
            .filter(|(_, d)| !**d)
            .map(|(dec, _)| dec)
            .collect();
        let stepped = Decoder::step_many(model, &mut live, prompt_tokens);
        let idx: Vec<usize> = (0..done.len()).filter(|&i| !done[i]).collect();
        for (i, s) in idx.into_iter().zip(stepped) {
            if let Step::Done(_) = s? {
                done[i] = true;
            }
        }
        rounds += 1;
    }
    Ok(rounds)
}

/// Generates up to `max_tokens` tokens after `prompt`. `on_token` sees each new token with all
/// tokens generated so far and returns false to stop. Returns the generated ids and why it stopped.
pub fn generate(
    model: &CausalLm,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(u32, &[u32]) -> bool,
) -> Result<(Vec<u32>, Finish)> {
    generate_constrained(model, prompt, opts, None, on_token)
}

/// [`generate`] with every token following `constraint` (when given). An engine failure is an
/// error; output cut by `max_tokens` may be an incomplete match.
pub fn generate_constrained(
    model: &CausalLm,
    prompt: &[u32],
    opts: &GenerateOptions,
    constraint: Option<constrain::Constraint>,
    on_token: &mut dyn FnMut(u32, &[u32]) -> bool,
) -> Result<(Vec<u32>, Finish)> {
    let mut d = Decoder::new(model, prompt, opts.clone())?;
    if let Some(c) = constraint {
        d.constrain(c);
    }
    loop {
        let step = d.step(model)?;
        if let Some(e) = d.constraint_error() {
            // The engine's first line says why; the rest is its parser's state.
            let e = e.lines().next().unwrap_or_default();
            return Err(InferError::Invalid(format!("constrained decoding: {e}")));
        }
        match step {
            Step::Done(why) => return Ok((d.generated, why)),
            Step::Token(t) => {
                if !on_token(t, &d.generated) {
                    return Ok((d.generated, Finish::Stopped));
                }
            }
            Step::Pending => {}
        }
    }
}

/// Turns a growing list of generated ids into text deltas for streaming: holds back output while
/// the text ends inside a multi-byte character, and cuts at the first stop string.
pub struct TextStream<'a> {
    tokenizer: &'a lmkit_tokenize::Tokenizer,
    stops: Vec<String>,
    emitted: usize,
    /// The length of the text of the ids of the last `push` (less an incomplete character).
    decoded: usize,
    pub stopped: bool,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a lmkit_tokenize::Tokenizer, stops: Vec<String>) -> Self {
        TextStream {
            tokenizer,
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            emitted: 0,
            decoded: 0,
            stopped: false,
        }
    }

    /// The new text since the last call (possibly empty), given all generated ids.
    pub fn push(&mut self, generated: &[u32]) -> Result<String> {
        let text = lmkit_tokenize::decode(self.tokenizer, generated)
            .map_err(|e| InferError::Invalid(e.to_string()))?;
        self.decoded = text.trim_end_matches('\u{FFFD}').len();
        let mut end = text.len();
        if let Some(cut) = self
            .stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            end = cut;
            self.stopped = true;
        } else {
            if text.ends_with('\u{FFFD}') {
                end = text.trim_end_matches('\u{FFFD}').len(); // an incomplete UTF-8 sequence so far
            }
            // Hold back a tail that could be the start of a stop string.
            let hold = self
                .stops
                .iter()
                .map(|s| longest_prefix_suffix(&text[..end], s))
                .max()
                .unwrap_or(0);
            end -= hold;
        }
        if end <= self.emitted {
            return Ok(String::new());
        }
        let delta = text[self.emitted..end].to_string();
        self.emitted = end;
        Ok(delta)
    }

    /// Where the text of the ids given to the last [`TextStream::push`] ends (before an
    /// incomplete character at its end): the next token's text starts there.
    pub fn decoded_len(&self) -> usize {
        self.decoded
    }

    /// What is left to print at the end (held-back text that turned out not to be a stop string).
    pub fn finish(&mut self, generated: &[u32]) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        let text = lmkit_tokenize::decode(self.tokenizer, generated)
            .map_err(|e| InferError::Invalid(e.to_string()))?;
        let delta = text.get(self.emitted..).unwrap_or_default().to_string();
        self.emitted = text.len();
        Ok(delta)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .find(|&n| stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

/// Sentence embeddings of many texts, in input order: batches of `batch` texts of about the same
/// number of tokens (texts are tokenized first and sorted by token count, so a batch is padded
/// little — sorting by characters pads Korean and English mixed together ~8% more), two batches
/// at a time on the thread pool (one batch's single-threaded steps then overlap the other's
/// products); `progress` gets the count done.
pub fn embed_batched(
    m: &lmkit_models::bert::Bert,
    tk: &lmkit_tokenize::Tokenizer,
    texts: &[String],
    batch: usize,
    dev: &lmkit_models::Device,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Vec<Vec<f32>>> {
    use rayon::prelude::*;
    let enc = encode_for(m, tk, texts)?;
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(enc[i].len()));
    let groups: Vec<&[usize]> = order.chunks(batch.max(1)).collect();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let mut out = vec![Vec::new(); texts.len()];
    for pair in groups.chunks(2) {
        let vectors: Vec<Vec<Vec<f32>>> = pair
            .par_iter()
            .map(|g| {
                let part: Vec<&[u32]> = g.iter().map(|&i| enc[i].as_slice()).collect();
                let v = embed_encoded(m, &part, dev)?;
                let n = done.fetch_add(g.len(), std::sync::atomic::Ordering::Relaxed) + g.len();
                progress(n);
                Ok(v)
            })
            .collect::<Result<_>>()?;
        for (g, v) in pair.iter().zip(vectors) {
            for (&i, e) in g.iter().zip(v) {
                out[i] = e;
            }
        }
    }
    Ok(out)
}

/// Mean-pooled embeddings of `texts` (padded to the longest, cut to the model's positions).
pub fn embed_texts(
    m: &lmkit_models::bert::Bert,
    tk: &lmkit_tokenize::Tokenizer,
    texts: &[String],
    dev: &lmkit_models::Device,
) -> Result<Vec<Vec<f32>>> {
    let enc = encode_for(m, tk, texts)?;
    let part: Vec<&[u32]> = enc.iter().map(Vec::as_slice).collect();
    embed_encoded(m, &part, dev)
}

/// `texts` as the embedding model reads them: with its special tokens, cut to its positions.
fn encode_for(
    m: &lmkit_models::bert::Bert,
    tk: &lmkit_tokenize::Tokenizer,
    texts: &[String],
) -> Result<Vec<Vec<u32>>> {
    let max_len = m
        .pooling
        .max_seq_length
        .unwrap_or(usize::MAX)
        .min(m.cfg.max_tokens());
    lmkit_tokenize::encode_with_specials(tk, texts, max_len)
        .map_err(|e| InferError::Invalid(e.to_string()))
}

/// Embeddings of token sequences (padded to the longest of them).
fn embed_encoded(
    m: &lmkit_models::bert::Bert,
    enc: &[&[u32]],
    dev: &lmkit_models::Device,
) -> Result<Vec<Vec<f32>>> {
    let t = enc
        .iter()
        .map(|e| e.len().clamp(1, m.cfg.max_tokens()))
        .max()
        .unwrap_or(1);
    let pad = m.cfg.pad_token_id.unwrap_or(0);
    let mut ids = Vec::with_capacity(enc.len() * t);
    let mut mask = Vec::with_capacity(enc.len() * t);
    for e in enc {
        let e = &e[..e.len().min(t)];
        ids.extend_from_slice(e);
        ids.extend(std::iter::repeat_n(pad, t - e.len()));
        mask.extend(std::iter::repeat_n(1u32, e.len().max(1)));
        mask.extend(std::iter::repeat_n(0u32, t - e.len().max(1)));
    }
    let ids = Tensor::from_vec(ids, (enc.len(), t), dev)?;
    let mask = Tensor::from_vec(mask, (enc.len(), t), dev)?;
    // Passes of at most EMBED_PASS_TOKENS positions: a batch of long texts in one pass makes
    // feed-forward temporaries of tens of MB, which the allocator maps and unmaps afresh at
    // every op (page faults, zeroing); smaller passes measured ~7% faster at batch 32.
    let rows = (EMBED_PASS_TOKENS / t).max(1);
    let mut out = Vec::with_capacity(enc.len());
    for start in (0..enc.len()).step_by(rows) {
        let n = rows.min(enc.len() - start);
        let v = m.embed(&ids.narrow(0, start, n)?, &mask.narrow(0, start, n)?)?;
        out.extend(v.to_vec2::<f32>()?);
    }
    Ok(out)
}

/// Positions (rows × padded length) one embedding pass takes at most.
const EMBED_PASS_TOKENS: usize = 4096;
