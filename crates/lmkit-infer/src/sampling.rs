//! Choosing the next token from logits: repetition penalty (Keskar et al. 2019, as transformers
//! applies it), temperature, top-k, nucleus/top-p (Holtzman et al. 2020), and a seeded RNG so that
//! a run can be repeated exactly.

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
/// (ties by token id) with one uniform draw. Only the head the cut and the draw reach is put in
/// order — found by selection, a few hundred tokens at a time — instead of sorting the whole
/// vocabulary for every token.
pub fn sample(logits: &[f32], history: &[u32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    let mut l = logits.to_vec();
    apply_repetition_penalty(&mut l, history, p.repetition_penalty);
    if p.temperature == 0.0 {
        return argmax(&l);
    }
    let mut order = Ranked::new(&l);
    let n = p.top_k.map_or(l.len(), |k| order.take(k.max(1)));
    let max = l[order.at(0)] as f64;
    let weight = |i: usize| ((l[i] as f64 - max) / p.temperature as f64).exp();
    let total: f64 = order.idx[..n].iter().map(|&i| weight(i as usize)).sum();
    let prob = |i: usize| weight(i) / total;
    let mut keep = n;
    if let Some(top_p) = p.top_p {
        let mut cum = 0.0;
        for r in 0..n {
            cum += prob(order.at(r));
            if cum >= top_p as f64 {
                keep = r + 1;
                break;
            }
        }
    }
    // Nothing cut: the probabilities sum to 1 (up to rounding, which the walk's last step
    // absorbs).
    let kept: f64 = if keep == n {
        1.0
    } else {
        (0..keep).map(|r| prob(order.at(r))).sum()
    };
    let mut r = rng.next_f64() * kept;
    for k in 0..keep {
        let x = prob(order.at(k));
        if r < x {
            return order.at(k) as u32;
        }
        r -= x;
    }
    order.at(keep - 1) as u32
}

/// Token ids in descending order of their logits (ties by id), put in order only as far as
/// asked: `at(r)` sorts the next block of the head (found by selection) when r reaches it.
struct Ranked<'a> {
    l: &'a [f32],
    idx: Vec<u32>,
    /// `idx[..sorted]` is the head in order; the rest follow it, unordered.
    sorted: usize,
}

impl<'a> Ranked<'a> {
    /// Tokens put in order at the first call, then 4 times more at each later one.
    const FIRST_BLOCK: usize = 256;

    fn new(l: &'a [f32]) -> Ranked<'a> {
        Ranked {
            l,
            idx: (0..l.len() as u32).collect(),
            sorted: 0,
        }
    }

    fn before(l: &[f32], a: u32, b: u32) -> std::cmp::Ordering {
        l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b))
    }

    /// The token at rank r.
    fn at(&mut self, r: usize) -> usize {
        if r >= self.sorted {
            let want = (r + 1)
                .max(4 * self.sorted)
                .max(Self::FIRST_BLOCK)
                .min(self.idx.len());
            let l = self.l;
            let rest = &mut self.idx[self.sorted..];
            let m = want - self.sorted;
            if m < rest.len() {
                rest.select_nth_unstable_by(m - 1, |&a, &b| Self::before(l, a, b));
            }
            rest[..m].sort_unstable_by(|&a, &b| Self::before(l, a, b));
            self.sorted = want;
        }
        self.idx[r] as usize
    }

    /// Keeps only the k first (all if fewer); returns how many are kept.
    fn take(&mut self, k: usize) -> usize {
        let k = k.min(self.idx.len());
        if k < self.idx.len() {
            self.at(k - 1);
            self.idx.truncate(k);
            self.sorted = self.sorted.min(k);
        }
        k
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
                            repetition_penalty: 1.3,
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
}
