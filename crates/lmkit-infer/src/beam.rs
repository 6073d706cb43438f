//! Beam search as transformers' `generate(num_beams=…)` runs it (its vectorised beam search of
//! 4.5x), for one input: each step keeps the `2·num_beams` best continuations of all beams by summed
//! log-probability, continues the best `num_beams` that did not end, and files those among the
//! first `num_beams` that ended (end-of-sequence or the length limit) as finished hypotheses scored
//! by summed log-probability / length^`length_penalty`. The best finished hypothesis is the result.

/// When beam search stops (transformers' `early_stopping`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EarlyStopping {
    /// `false`: stop when no running beam can beat the worst finished one at its current length.
    Heuristic,
    /// `true`: stop as soon as `num_beams` hypotheses have finished.
    OnFull,
    /// `"never"`: as `false`, but with a positive length penalty the running beams are credited
    /// with the longest length they could reach.
    Never,
}

impl std::str::FromStr for EarlyStopping {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "false" => Ok(EarlyStopping::Heuristic),
            "true" => Ok(EarlyStopping::OnFull),
            "never" => Ok(EarlyStopping::Never),
            _ => Err(format!("`{s}`: expected true, false or never")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BeamSettings {
    pub num_beams: usize,
    /// Finished hypotheses are scored by sum of log-probs / length^length_penalty.
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    /// New tokens at most (the prompt not counted).
    pub max_new_tokens: usize,
    /// Tokens that end a hypothesis.
    pub eos: Vec<u32>,
}

/// A candidate or hypothesis: summed log-probability (or finished score) and its sequence.
#[derive(Clone)]
struct Hyp {
    score: f32,
    seq: Vec<u32>,
    finished: bool,
}

/// Indices of the `k` largest `values`, largest first (ties: the lower index first).
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let order = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..values.len()).collect();
    if k < idx.len() {
        // The k first of the total order, then only those sorted (the vocabulary is not).
        idx.select_nth_unstable_by(k, order);
        idx.truncate(k);
    }
    idx.sort_by(order);
    idx
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&l| (l as f64 - lse) as f32).collect()
}

/// Searches from `prompt` (the decoder's first tokens). `step(parents, sequences)` returns the
/// next-token logits of each running sequence (`num_beams` of them, all of one length); `parents`
/// says which sequence of the previous call each one continues (`None` on the first call, when all
/// are the prompt), so that a caller's cache can follow them. Returns the best hypothesis's tokens
/// after the prompt (ending with its end-of-sequence token when it has one).
pub fn beam_search<E>(
    settings: &BeamSettings,
    prompt: &[u32],
    mut step: impl FnMut(Option<&[u32]>, &[Vec<u32>]) -> Result<Vec<Vec<f32>>, E>,
) -> Result<Vec<u32>, E> {
    const FAR: f32 = -1.0e9;
    let nb = settings.num_beams.max(1);
    let p = prompt.len();
    let max_length = p + settings.max_new_tokens;
    let keep = 2usize.max(1 + settings.eos.len()) * nb;
    let lp = settings.length_penalty;
    let mut running: Vec<Vec<u32>> = vec![prompt.to_vec(); nb];
    let mut running_scores: Vec<f32> = (0..nb).map(|b| if b == 0 { 0.0 } else { FAR }).collect();
    let mut done: Vec<Hyp> = vec![
        Hyp {
            score: FAR,
            seq: prompt.to_vec(),
            finished: false,
        };
        nb
    ];
    let mut unsatisfied = true;
    let mut parents: Option<Vec<u32>> = None;
    let mut cur_len = p;
    if settings.max_new_tokens == 0 {
        return Ok(Vec::new());
    }
    loop {
        let logits = step(parents.as_deref(), &running)?;
        let vocab = logits.first().map_or(0, Vec::len);
        let mut flat = Vec::with_capacity(nb * vocab);
        for (b, row) in logits.iter().enumerate() {
            flat.extend(log_softmax(row).into_iter().map(|l| l + running_scores[b]));
        }
        let cands: Vec<(f32, usize, u32)> = top_k(&flat, keep)
            .into_iter()
            .map(|i| (flat[i], i / vocab, (i % vocab) as u32))
            .collect();
        let seqs: Vec<Vec<u32>> = cands
            .iter()
            .map(|&(_, b, t)| {
                let mut s = running[b].clone();
                s.push(t);
                s
            })
            .collect();
        let hits: Vec<bool> = cands
            .iter()
            .zip(&seqs)
            .map(|(&(_, _, t), s)| settings.eos.contains(&t) || s.len() >= max_length)
            .collect();
        // The best unfinished continuations run on.
        let run_values: Vec<f32> = cands
            .iter()
            .zip(&hits)
            .map(|(c, &h)| c.0 + if h { FAR } else { 0.0 })
            .collect();
        let next = top_k(&run_values, nb);
        // Those among the first `nb` that ended join the finished hypotheses if they score better.
        let length = ((cur_len + 1 - p) as f64).powf(lp as f64) as f32;
        let full =
            done.iter().all(|h| h.finished) && settings.early_stopping == EarlyStopping::OnFull;
        let mut merged = done.clone();
        for (c, ((cand, seq), &hit)) in cands.iter().zip(&seqs).zip(&hits).enumerate() {
            let just_finished = hit && c < nb;
            let mut score = cand.0 / length;
            if full {
                score += FAR;
            }
            if !unsatisfied {
                score += FAR;
            }
            if !just_finished {
                score += FAR;
            }
            merged.push(Hyp {
                score,
                seq: seq.clone(),
                finished: just_finished,
            });
        }
        let scores: Vec<f32> = merged.iter().map(|h| h.score).collect();
        done = top_k(&scores, nb)
            .into_iter()
            .map(|i| merged[i].clone())
            .collect();
        parents = Some(next.iter().map(|&c| cands[c].1 as u32).collect());
        running = next.iter().map(|&c| seqs[c].clone()).collect();
        running_scores = next.iter().map(|&c| run_values[c]).collect();
        cur_len += 1;
        // Could a running beam still beat the finished ones?
        let best_len = if settings.early_stopping == EarlyStopping::Never && lp > 0.0 {
            max_length - p
        } else {
            cur_len - p
        };
        let best_possible = running_scores[0] / ((best_len as f64).powf(lp as f64) as f32);
        let worst = done.iter().map(|h| h.score).fold(f32::INFINITY, f32::min);
        unsatisfied = unsatisfied
            && done
                .iter()
                .any(|h| best_possible > if h.finished { worst } else { FAR });
        let all_finished = done.iter().all(|h| h.finished);
        let stop = !unsatisfied
            || (all_finished && settings.early_stopping == EarlyStopping::OnFull)
            || hits.iter().all(|&h| h);
        if stop {
            break;
        }
    }
    Ok(done[0].seq[p..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Logits = Result<Vec<Vec<f32>>, ()>;

    /// A toy model: next-token log-probabilities depend on the last token only.
    fn markov(table: &[[f32; 4]]) -> impl FnMut(Option<&[u32]>, &[Vec<u32>]) -> Logits + '_ {
        move |_, seqs| {
            Ok(seqs
                .iter()
                .map(|s| {
                    table[*s.last().unwrap() as usize]
                        .iter()
                        .map(|p| p.ln())
                        .collect()
                })
                .collect())
        }
    }

    fn settings(num_beams: usize) -> BeamSettings {
        BeamSettings {
            num_beams,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
            max_new_tokens: 5,
            eos: vec![3],
        }
    }

    /// Greedy takes token 1 (0.6) and then a flat continuation; two beams find 2 → 3 (0.4 · 0.9).
    #[test]
    fn beams_find_what_greedy_misses() {
        let table = [
            [0.0, 0.6, 0.4, 0.0],
            [0.3, 0.3, 0.1, 0.3],
            [0.05, 0.025, 0.025, 0.9],
            [0.25, 0.25, 0.25, 0.25],
        ];
        let greedy = beam_search(&settings(1), &[0], markov(&table)).unwrap();
        assert_eq!(greedy[0], 1);
        let beams = beam_search(&settings(2), &[0], markov(&table)).unwrap();
        assert_eq!(beams, vec![2, 3]);
    }

    /// Without an end token every hypothesis runs to the length limit.
    #[test]
    fn hypotheses_end_at_the_length_limit() {
        let table = [[0.7, 0.2, 0.1, 0.0]; 4];
        let mut s = settings(3);
        s.eos.clear();
        let out = beam_search(&s, &[1], markov(&table)).unwrap();
        assert_eq!(out, vec![0; 5]);
    }
}
