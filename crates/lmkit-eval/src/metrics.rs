//! Metrics of generated text against references, computed as the reference packages do:
//! exact match (the harness's `exact_match` options), SQuAD token F1, ROUGE-1/2/L (`rouge-score`
//! without stemming), and corpus BLEU and chrF/chrF++ (`sacrebleu`'s defaults: 13a tokenisation,
//! exponential smoothing; character order 6, beta 2).
//!
//! One deliberate difference: `rouge-score` drops every character outside `[a-z0-9]`, so Korean
//! text would score 0 against anything; lmkit keeps Unicode letters and digits (equal on ASCII).

use regex::Regex;
use std::collections::HashMap;
use std::sync::LazyLock;

/// Python's `string.punctuation`.
pub const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

fn is_punct(c: char) -> bool {
    c.is_ascii() && PUNCTUATION.contains(c)
}

/// Options of the harness's `exact_match` (Hugging Face evaluate's): patterns removed from both
/// strings first, then case, punctuation and digits optionally ignored.
#[derive(Clone, Debug, Default)]
pub struct ExactMatch {
    pub regexes_to_ignore: Vec<Regex>,
    pub ignore_case: bool,
    pub ignore_punctuation: bool,
    pub ignore_numbers: bool,
}

impl ExactMatch {
    fn normalise(&self, s: &str) -> String {
        let mut s = s.to_string();
        for re in &self.regexes_to_ignore {
            s = re.replace_all(&s, "").into_owned();
        }
        if self.ignore_case {
            s = s.to_lowercase();
        }
        if self.ignore_punctuation {
            s.retain(|c| !is_punct(c));
        }
        if self.ignore_numbers {
            s.retain(|c| !c.is_ascii_digit());
        }
        s
    }

    /// 1.0 when the prediction equals any reference after normalisation, else 0.0.
    pub fn score(&self, prediction: &str, references: &[String]) -> f64 {
        let p = self.normalise(prediction);
        references.iter().any(|r| self.normalise(r) == p) as u8 as f64
    }
}

static ARTICLES: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\b(a|an|the)\b").unwrap());

/// SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces.
fn squad_tokens(s: &str) -> Vec<String> {
    let mut s = s.to_lowercase();
    s.retain(|c| !is_punct(c));
    let s = ARTICLES.replace_all(&s, " ");
    s.split_whitespace().map(str::to_string).collect()
}

fn bag<T: std::hash::Hash + Eq>(items: impl IntoIterator<Item = T>) -> HashMap<T, usize> {
    let mut m = HashMap::new();
    for x in items {
        *m.entry(x).or_insert(0) += 1;
    }
    m
}

fn overlap<T: std::hash::Hash + Eq>(a: &HashMap<T, usize>, b: &HashMap<T, usize>) -> usize {
    a.iter()
        .map(|(k, &n)| n.min(b.get(k).copied().unwrap_or(0)))
        .sum()
}

/// SQuAD token F1 (the official script's formula), the best over the references. An empty
/// answer on either side scores 1 only when both are empty (SQuAD 2.0's no-answer rule).
pub fn squad_f1(prediction: &str, references: &[String]) -> f64 {
    let p = squad_tokens(prediction);
    references
        .iter()
        .map(|r| {
            let g = squad_tokens(r);
            if p.is_empty() || g.is_empty() {
                return (p.is_empty() && g.is_empty()) as u8 as f64;
            }
            let same = overlap(&bag(p.iter()), &bag(g.iter()));
            if same == 0 {
                return 0.0;
            }
            let precision = same as f64 / p.len() as f64;
            let recall = same as f64 / g.len() as f64;
            2.0 * precision * recall / (precision + recall)
        })
        .fold(0.0, f64::max)
}

/// `rouge-score`'s tokeniser (lower case, split at anything not a letter or digit).
pub fn rouge_tokens(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

fn fmeasure(precision: f64, recall: f64) -> f64 {
    if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    }
}

/// ROUGE-N F-measure of one prediction against one reference.
pub fn rouge_n(prediction: &str, reference: &str, n: usize) -> f64 {
    let grams = |t: &[String]| bag(t.windows(n).map(|w| w.join(" ")));
    let (p, r) = (rouge_tokens(prediction), rouge_tokens(reference));
    let (pg, rg) = (grams(&p), grams(&r));
    let hits = overlap(&rg, &pg) as f64;
    let pc = pg.values().sum::<usize>().max(1) as f64;
    let rc = rg.values().sum::<usize>().max(1) as f64;
    fmeasure(hits / pc, hits / rc)
}

/// ROUGE-L (longest common subsequence) F-measure of one prediction against one reference.
pub fn rouge_l(prediction: &str, reference: &str) -> f64 {
    let (p, r) = (rouge_tokens(prediction), rouge_tokens(reference));
    if p.is_empty() || r.is_empty() {
        return 0.0;
    }
    let mut row = vec![0usize; p.len() + 1];
    for rt in &r {
        let mut diag = 0;
        for (j, pt) in p.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if rt == pt { diag + 1 } else { up.max(row[j]) };
            diag = up;
        }
    }
    let lcs = row[p.len()] as f64;
    fmeasure(lcs / p.len() as f64, lcs / r.len() as f64)
}

/// The best score of `f` over the references.
pub fn best(prediction: &str, references: &[String], f: impl Fn(&str, &str) -> f64) -> f64 {
    references
        .iter()
        .map(|r| f(prediction, r))
        .fold(0.0, f64::max)
}

static BLEU_RULES: LazyLock<[(Regex, &'static str); 4]> = LazyLock::new(|| {
    [
        (Regex::new(r"([\{-~\[-` -&\(-\+:-@/])").unwrap(), " $1 "),
        (Regex::new(r"([^0-9])([\.,])").unwrap(), "$1 $2 "),
        (Regex::new(r"([\.,])([^0-9])").unwrap(), " $1 $2"),
        (Regex::new(r"([0-9])(-)").unwrap(), "$1 $2 "),
    ]
});

/// sacrebleu's `13a` tokeniser (mteval-v13a's rules).
pub fn tokenize_13a(line: &str) -> Vec<String> {
    let mut s = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if s.contains('&') {
        s = s
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let mut s = format!(" {s} ");
    for (re, rep) in BLEU_RULES.iter() {
        s = re.replace_all(&s, *rep).into_owned();
    }
    s.split_whitespace().map(str::to_string).collect()
}

/// Corpus BLEU as `sacrebleu.corpus_bleu(predictions, [references])` computes it (0–100):
/// n-gram matches clipped by the most frequent count in any reference, the closest reference
/// length, exponential smoothing of empty orders, the brevity penalty.
pub fn corpus_bleu(predictions: &[String], references: &[Vec<String>]) -> f64 {
    const N: usize = 4;
    let (mut correct, mut total) = ([0usize; N], [0usize; N]);
    let (mut sys_len, mut ref_len) = (0usize, 0usize);
    let grams = |t: &[String]| {
        let mut m: HashMap<Vec<String>, usize> = HashMap::new();
        for n in 1..=N {
            for w in t.windows(n) {
                *m.entry(w.to_vec()).or_insert(0) += 1;
            }
        }
        m
    };
    for (p, refs) in predictions.iter().zip(references) {
        let hyp = tokenize_13a(p.trim_end());
        let mut ref_grams: HashMap<Vec<String>, usize> = HashMap::new();
        let mut lens = Vec::new();
        for r in refs {
            let t = tokenize_13a(r.trim_end());
            lens.push(t.len());
            for (g, c) in grams(&t) {
                let e = ref_grams.entry(g).or_insert(0);
                *e = (*e).max(c);
            }
        }
        // The closest reference length; the shorter one on a tie.
        let closest = lens
            .iter()
            .copied()
            .min_by_key(|&l| (l.abs_diff(hyp.len()), l))
            .unwrap_or(0);
        sys_len += hyp.len();
        ref_len += closest;
        for (g, c) in grams(&hyp) {
            total[g.len() - 1] += c;
            if let Some(&rc) = ref_grams.get(&g) {
                correct[g.len() - 1] += c.min(rc);
            }
        }
    }
    if correct.iter().all(|&c| c == 0) {
        return 0.0;
    }
    let bp = if sys_len < ref_len {
        if sys_len > 0 {
            (1.0 - ref_len as f64 / sys_len as f64).exp()
        } else {
            0.0
        }
    } else {
        1.0
    };
    let mut precisions = [0.0f64; N];
    let mut smooth = 1.0;
    for n in 0..N {
        if total[n] == 0 {
            break;
        }
        precisions[n] = if correct[n] == 0 {
            smooth *= 2.0;
            100.0 / (smooth * total[n] as f64)
        } else {
            100.0 * correct[n] as f64 / total[n] as f64
        };
    }
    let logs: f64 = precisions
        .iter()
        .map(|&p| if p == 0.0 { -9_999_999_999.0 } else { p.ln() })
        .sum();
    bp * (logs / N as f64).exp()
}

/// chrF's word split: punctuation at either end of a word becomes its own token.
fn chrf_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    for w in s.split_whitespace() {
        let chars: Vec<char> = w.chars().collect();
        if chars.len() == 1 {
            out.push(w.to_string());
        } else if is_punct(chars[chars.len() - 1]) {
            out.push(chars[..chars.len() - 1].iter().collect());
            out.push(chars[chars.len() - 1].to_string());
        } else if is_punct(chars[0]) {
            out.push(chars[0].to_string());
            out.push(chars[1..].iter().collect());
        } else {
            out.push(w.to_string());
        }
    }
    out
}

/// Counts of every character n-gram (orders 1..=`chars`, whitespace removed) and word n-gram
/// (orders 1..=`words`) of a segment.
fn chrf_grams(s: &str, chars: usize, words: usize) -> Vec<HashMap<String, usize>> {
    let c: Vec<char> = s.chars().filter(|c| !c.is_whitespace()).collect();
    let mut out: Vec<HashMap<String, usize>> = (1..=chars)
        .map(|n| bag(c.windows(n).map(|w| w.iter().collect::<String>())))
        .collect();
    if words > 0 {
        let w = chrf_words(s);
        out.extend((1..=words).map(|n| bag(w.windows(n).map(|g| g.join(" ")))));
    }
    out
}

const CHRF_BETA: f64 = 2.0;

fn chrf_score(stats: &[[usize; 3]]) -> f64 {
    let eps = 1e-16;
    let factor = CHRF_BETA * CHRF_BETA;
    let (mut avg_p, mut avg_r, mut eff) = (0.0, 0.0, 0usize);
    for &[hyp, rf, hit] in stats {
        let p = if hyp > 0 {
            hit as f64 / hyp as f64
        } else {
            eps
        };
        let r = if rf > 0 { hit as f64 / rf as f64 } else { eps };
        if hyp > 0 && rf > 0 {
            avg_p += p;
            avg_r += r;
            eff += 1;
        }
    }
    if eff == 0 {
        return 0.0;
    }
    avg_p /= eff as f64;
    avg_r /= eff as f64;
    if avg_p + avg_r == 0.0 {
        return 0.0;
    }
    100.0 * (1.0 + factor) * avg_p * avg_r / (factor * avg_p + avg_r)
}

/// Corpus chrF (`word_order` 0) or chrF++ (`word_order` 2) as `sacrebleu.corpus_chrf` computes
/// it: per segment the reference with the best sentence score, statistics summed over the corpus.
pub fn corpus_chrf(predictions: &[String], references: &[Vec<String>], word_order: usize) -> f64 {
    let orders = 6 + word_order;
    let mut sum = vec![[0usize; 3]; orders];
    for (p, refs) in predictions.iter().zip(references) {
        let hyp = chrf_grams(p, 6, word_order);
        let mut best: Option<(f64, Vec<[usize; 3]>)> = None;
        for r in refs {
            let rg = chrf_grams(r, 6, word_order);
            let stats: Vec<[usize; 3]> = hyp
                .iter()
                .zip(&rg)
                .map(|(h, r)| {
                    let hyp_n: usize = h.values().sum();
                    [
                        if r.is_empty() { 0 } else { hyp_n },
                        r.values().sum(),
                        overlap(h, r),
                    ]
                })
                .collect();
            let f = chrf_score(&stats);
            if best.as_ref().is_none_or(|(b, _)| f > *b) {
                best = Some((f, stats));
            }
        }
        if let Some((_, stats)) = best {
            for (s, x) in sum.iter_mut().zip(stats) {
                for k in 0..3 {
                    s[k] += x[k];
                }
            }
        }
    }
    chrf_score(&sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn exact_match_options() {
        let m = ExactMatch::default();
        assert_eq!(m.score("Paris", &v(&["Paris"])), 1.0);
        assert_eq!(m.score("paris.", &v(&["Paris"])), 0.0);
        let m = ExactMatch {
            ignore_case: true,
            ignore_punctuation: true,
            ..Default::default()
        };
        assert_eq!(m.score("paris.", &v(&["London", "Paris"])), 1.0);
        let m = ExactMatch {
            regexes_to_ignore: vec![Regex::new(",").unwrap(), Regex::new(r"\$").unwrap()],
            ..Default::default()
        };
        assert_eq!(m.score("$1,000", &v(&["1000"])), 1.0);
    }

    #[test]
    fn squad_f1_by_hand() {
        // "the cat sat" vs "a cat sat down": tokens [cat, sat] vs [cat, sat, down].
        let f = squad_f1("The cat sat!", &v(&["a cat sat down"]));
        let (p, r) = (1.0, 2.0 / 3.0);
        assert!((f - 2.0 * p * r / (p + r)).abs() < 1e-12);
        assert_eq!(squad_f1("", &v(&[""])), 1.0);
        assert_eq!(squad_f1("x", &v(&[""])), 0.0);
    }

    #[test]
    fn rouge_by_hand() {
        assert!(
            (rouge_n("the cat sat", "the cat sat on the mat", 1) - 2.0 * 0.5 / 1.5).abs() < 1e-12
        );
        assert_eq!(rouge_l("a b c d", "a c d"), fmeasure(3.0 / 4.0, 1.0));
        assert_eq!(rouge_tokens("Hello, World-2!"), v(&["hello", "world", "2"]));
        assert_eq!(rouge_tokens("대한민국은 좋다"), v(&["대한민국은", "좋다"]));
    }

    #[test]
    fn bleu_tokenizer_and_perfect_score() {
        assert_eq!(
            tokenize_13a("Hello, world. It costs $3.50-4."),
            v(&["Hello", ",", "world", ".", "It", "costs", "$", "3.50", "-", "4", "."])
        );
        let p = v(&["the cat is on the mat today"]);
        assert!((corpus_bleu(&p, std::slice::from_ref(&p)) - 100.0).abs() < 1e-9);
        assert_eq!(corpus_bleu(&v(&["x"]), &[v(&["y"])]), 0.0);
        assert!((corpus_chrf(&p, std::slice::from_ref(&p), 0) - 100.0).abs() < 1e-9);
    }
}
