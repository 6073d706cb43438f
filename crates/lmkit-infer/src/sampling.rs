//! Choosing the next token from logits: repetition penalty (Keskar et al. 2019, as transformers
//! applies it), temperature, top-k, nucleus/top-p (Holtzman et al. 2020), and a seeded RNG so that
//! a run can be repeated exactly.

use lmkit_kernels::sampling::{exp_nonpositive, exp_weights, id, rank_keys};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    /// 1 means off; > 1 discourages tokens already in the sequence.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: None,
            top_p: Some(0.95),
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be ≥ 0, got {}", self.temperature));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("top_p must be in (0, 1], got {p}"));
            }
        }
        if self.top_k == Some(0) {
            return Err("top_k must be ≥ 1".into());
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// OpenAI's adjustments of the logits before sampling: a frequency and a presence penalty over
/// the tokens generated so far (not the prompt) — l\[t\] −= frequency·count(t) + presence where
/// count(t) is not 0 — and a bias added to chosen tokens' logits (`logit_bias`, −100 bans a token
/// and 100 forces it in practice).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogitAdjust {
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// (token id, bias) pairs.
    pub logit_bias: Vec<(u32, f32)>,
}

impl LogitAdjust {
    /// Whether it changes nothing.
    pub fn is_noop(&self) -> bool {
        self.frequency_penalty == 0.0 && self.presence_penalty == 0.0 && self.logit_bias.is_empty()
    }

    /// Adjusts `logits` in place for the tokens `generated` so far (ids outside the logits are
    /// left alone).
    pub fn apply(&self, logits: &mut [f32], generated: &[u32]) {
        if self.frequency_penalty != 0.0 || self.presence_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in generated {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= self.frequency_penalty * c as f32 + self.presence_penalty;
                }
            }
        }
        for &(t, b) in &self.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
    }
}

/// The generator sampling draws from (splitmix64: the same sequence on every platform).
pub type Rng = lmkit_core::rng::SplitMix64;
pub use lmkit_core::rng::Random;

/// Divides positive logits and multiplies negative ones of tokens in `history` by `penalty`.
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &t in history {
        if let Some(s) = seen.get_mut(t as usize) {
            *s = true;
        }
    }
    for (l, s) in logits.iter_mut().zip(seen) {
        if s {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

fn argmax(xs: &[f32]) -> u32 {
    // The first maximum, as torch.argmax returns.
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// The next token for `logits` given the sequence so far (`history`): the logits after the
/// repetition penalty, scaled by 1/temperature, cut to the `top_k` largest and then to the
/// smallest head whose probability reaches `top_p`, and walked from the most probable down
/// (ties by token id) with one uniform draw. Neither the cut nor the walk sorts the vocabulary:
/// each finds its rank by halving the candidates around their median (selection) and summing
/// the better half's weights, and puts only the last few hundred in order ([`reach`]).
pub fn sample(logits: &[f32], history: &[u32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.temperature == 0.0 {
        let mut l = logits.to_vec();
        apply_repetition_penalty(&mut l, history, p.repetition_penalty);
        return argmax(&l);
    }
    // The buffers are the vocabulary's size: kept per thread, not allocated (and paged in)
    // again for every token.
    SCRATCH.with(|scratch| {
        let scratch = &mut *scratch.borrow_mut();
        draw(logits, history, p, rng, scratch)
    })
}

/// A thread's buffers for [`sample`]: the logits after a repetition penalty, the candidates' rank keys
/// and the weights by token id.
#[derive(Default)]
struct Scratch {
    l: Vec<f32>,
    keys: Vec<u64>,
    w: Vec<f64>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

fn draw(
    logits: &[f32],
    history: &[u32],
    p: &SamplingParams,
    rng: &mut Rng,
    Scratch { l, keys, w }: &mut Scratch,
) -> u32 {
    // The logits themselves, or a copy with the repetition penalty applied.
    let l: &[f32] = if p.repetition_penalty == 1.0 {
        logits
    } else {
        l.clear();
        l.extend_from_slice(logits);
        apply_repetition_penalty(l, history, p.repetition_penalty);
        l
    };
    // Candidates as rank keys: ascending key = descending logit, then ascending id.
    let Some(best) = rank_keys(keys, l) else {
        return 0; // no logits: nothing to choose from
    };
    // (The best key is among the top k.)
    if let Some(k) = p.top_k {
        let k = k.max(1);
        if k < keys.len() {
            keys.select_nth_unstable(k - 1);
            keys.truncate(k);
        }
    }
    let max = l[id(best)] as f64;
    let t = p.temperature as f64;
    // Weights by token id (the candidates' only), exp((l - max) / T): probabilities unscaled.
    // With every token a candidate, in the vocabulary's order (a vector loop). Only the
    // candidates' entries are written and read: the others keep an earlier draw's values.
    w.resize(l.len(), 0.0);
    let total: f64 = if keys.len() == l.len() {
        exp_weights(w, l, max, t)
    } else {
        for &k in keys.iter() {
            w[id(k)] = exp_nonpositive((l[id(k)] as f64 - max) / t);
        }
        keys.iter().map(|&k| w[id(k)]).sum()
    };
    let (keep, kept) = match p.top_p {
        Some(top_p) => {
            let target = top_p as f64 * total;
            let (r, through) = reach(keys, w, |cum| cum >= target);
            (r + 1, through)
        }
        None => (keys.len(), total),
    };
    // The walk: the first rank whose cumulative weight passes the draw.
    let r = rng.next_f64() * kept;
    let (k, _) = reach(&mut keys[..keep], w, |cum| cum > r);
    id(keys[k]) as u32
}

/// The first rank r (in ascending key order) whose cumulative weight — the weights of ranks 0..=r
/// summed — `passes`, and that sum; the last rank and the total where none does. Reorders `keys`
/// so that ranks before r come first (unordered, but for the last block: in order) and r is
/// at its place. Halves the range around its median by selection while it is longer than a
/// block, going into the better half where its weight already passes: ≈ 2n steps instead of
/// sorting n keys (the first split is after one block: one selection where the head passes).
fn reach(keys: &mut [u64], w: &[f64], passes: impl Fn(f64) -> bool) -> (usize, f64) {
    const BLOCK: usize = 256;
    let (mut lo, mut hi, mut before) = (0, keys.len(), 0f64);
    // The first split at one block: where a few tokens hold most of the probability (a trained
    // model's logits) the rank is there, found with one selection.
    let mut split = BLOCK;
    while hi - lo > BLOCK {
        let mid = split.min(lo + (hi - lo) / 2);
        split = usize::MAX;
        keys[lo..hi].select_nth_unstable(mid - lo);
        let better: f64 = keys[lo..mid].iter().map(|&k| w[id(k)]).sum();
        if passes(before + better) {
            hi = mid;
        } else {
            before += better;
            lo = mid;
        }
    }
    keys[lo..hi].sort_unstable();
    for (r, &k) in keys.iter().enumerate().take(hi).skip(lo) {
        let through = before + w[id(k)];
        if passes(through) {
            return (r, through);
        }
        before = through;
    }
    (hi.max(1) - 1, before)
}

/// A chosen token's log-probability under the model and the most likely tokens' at its position
/// (OpenAI's `logprobs`): the log-softmax of the logits as the model gives them, before
/// temperature, penalties, top-k/top-p and grammars (vLLM's default, `raw_logprobs`).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// Up to the number asked for, most likely first (ties: the lower id first).
    pub top: Vec<(u32, f32)>,
}

/// [`TokenLogprobs`] of `token` and the `top` most likely tokens from `logits` (the normaliser
/// as lmkit's scoring takes it, [`lmkit_kernels::fused::log_sum_exp`]: f32 sums in lanes).
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let lse = lmkit_kernels::fused::log_sum_exp(logits);
    let lp = |x: f32| x - lse;
    // The `top` largest, kept sorted (`top` is small: OpenAI allows 20).
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &x) in logits.iter().enumerate() {
            if best.len() == top && best.last().is_some_and(|&(_, y)| x.total_cmp(&y).is_le()) {
                continue;
            }
            let at = best.partition_point(|&(_, y)| y.total_cmp(&x).is_ge());
            best.insert(at, (i as u32, x));
            best.truncate(top);
        }
    }
    TokenLogprobs {
        token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&x| lp(x)),
        top: best.into_iter().map(|(i, x)| (i, lp(x))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vocabulary sorted whole for every token: what [`sample`] must draw alike.
    fn sample_by_sorting(
        logits: &[f32],
        history: &[u32],
        p: &SamplingParams,
        rng: &mut Rng,
    ) -> u32 {
        let mut l = logits.to_vec();
        apply_repetition_penalty(&mut l, history, p.repetition_penalty);
        if p.temperature == 0.0 {
            return argmax(&l);
        }
        // Candidates sorted by logit, highest first; then top-k, softmax, top-p.
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        if let Some(k) = p.top_k {
            idx.truncate(k.max(1));
        }
        let max = l[idx[0]] as f64;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| ((l[i] as f64 - max) / p.temperature as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if let Some(top_p) = p.top_p {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, &x) in probs.iter().enumerate() {
                cum += x;
                if cum >= top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = rng.next_f64() * total;
        for (&i, &x) in idx.iter().zip(&probs) {
            if r < x {
                return i as u32;
            }
            r -= x;
        }
        idx[idx.len() - 1] as u32
    }

    #[test]
    fn greedy_and_degenerate_settings_pick_the_argmax() {
        let logits = [0.1, 2.0, -1.0, 1.9];
        let mut rng = Rng::new(1);
        assert_eq!(sample(&logits, &[], &SamplingParams::greedy(), &mut rng), 1);
        let top1 = SamplingParams {
            top_k: Some(1),
            ..Default::default()
        };
        let tiny_p = SamplingParams {
            top_p: Some(1e-6),
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &[], &top1, &mut rng), 1);
            assert_eq!(sample(&logits, &[], &tiny_p, &mut rng), 1);
        }
    }

    #[test]
    fn repetition_penalty_follows_ctrl() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
        let greedy_pen = SamplingParams {
            repetition_penalty: 3.0,
            ..SamplingParams::greedy()
        };
        assert_eq!(sample(&[2.0, 1.0], &[0], &greedy_pen, &mut Rng::new(0)), 1);
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        // softmax([ln 1, ln 3]) = [0.25, 0.75]
        let logits = [0.0f32, 3f32.ln()];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 7,
        };
        let mut rng = Rng::new(p.seed);
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| sample(&logits, &[], &p, &mut rng) == 1)
            .count();
        let share = ones as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.02, "{share}");
        let run = |seed| {
            let mut r = Rng::new(seed);
            (0..50)
                .map(|_| sample(&logits, &[], &p, &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn draws_equal_sorting_the_whole_vocabulary() {
        let mut state = 7u64;
        let mut uniform = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut draws = 0;
        for (vocab, scale, step) in [
            (7, 1.0, 0.0),
            (300, 3.0, 0.0),
            (5000, 1.0, 0.0),
            (5000, 12.0, 0.0),
            // Many equal logits (ties go by token id) and masked tokens.
            (3000, 4.0, 0.5),
        ] {
            let logits: Vec<f32> = (0..vocab)
                .map(|i| {
                    let x = ((uniform() * 2.0 - 1.0) * scale) as f32;
                    match (step > 0.0, i % 5) {
                        (true, 0) => f32::NEG_INFINITY,
                        (true, _) => (x / step as f32).round() * step as f32,
                        _ => x,
                    }
                })
                .collect();
            for top_k in [None, Some(1), Some(40), Some(vocab / 2), Some(vocab + 3)] {
                for top_p in [None, Some(0.5), Some(0.95), Some(1.0)] {
                    for temperature in [0.7, 1.0, 1.5] {
                        let p = SamplingParams {
                            temperature,
                            top_k,
                            top_p,
                            // The logits read as they are, or a penalised copy.
                            repetition_penalty: if temperature == 1.0 { 1.0 } else { 1.3 },
                            seed: 0,
                        };
                        let history = [3u32, 5, 5, 1];
                        let (mut a, mut b) = (Rng::new(draws), Rng::new(draws));
                        for _ in 0..20 {
                            let want = sample_by_sorting(&logits, &history, &p, &mut a);
                            let got = sample(&logits, &history, &p, &mut b);
                            assert_eq!(got, want, "vocab {vocab}, {p:?}");
                            draws += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(draws, 5 * 5 * 4 * 3 * 20);
    }

    #[test]
    fn top_p_cuts_the_tail() {
        // probabilities ≈ [0.6, 0.3, 0.1]; top_p 0.8 keeps the first two.
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.8),
            repetition_penalty: 1.0,
            seed: 1,
        };
        let mut rng = Rng::new(1);
        assert!((0..5000).all(|_| sample(&logits, &[], &p, &mut rng) != 2));
    }

    #[test]
    fn logprobs_are_the_log_softmax_and_its_largest_values() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5, 2.0];
        let lse = logits.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        let want = |i: usize| (logits[i] as f64 - lse) as f32;
        let got = logprobs(&logits, 4, 3);
        assert_eq!(got.token, 4);
        assert!((got.logprob - want(4)).abs() < 1e-6);
        let ids: Vec<u32> = got.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 5], "most likely first, ties by id");
        for (i, lp) in &got.top {
            assert!((lp - want(*i as usize)).abs() < 1e-6);
        }
        assert!(logprobs(&logits, 0, 0).top.is_empty());
        assert_eq!(logprobs(&logits, 0, 10).top.len(), logits.len());
        // Large logits do not overflow (the normaliser is an f32 near 1000: steps of 6e-5).
        let big = [1000.0f32, 1000.0];
        assert!((logprobs(&big, 1, 1).logprob - (0.5f32).ln()).abs() < 1e-4);
    }

    #[test]
    fn logit_adjustments_follow_openai_s_formula() {
        let a = LogitAdjust {
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            logit_bias: vec![(3, 10.0), (99, 1.0)],
        };
        let mut l = [1.0f32, 1.0, 1.0, 1.0];
        a.apply(&mut l, &[0, 2, 0, 0]);
        assert_eq!(l, [1.0 - 1.5 - 0.25, 1.0, 1.0 - 0.5 - 0.25, 11.0]);
        assert!(LogitAdjust::default().is_noop() && !a.is_noop());
    }
}
