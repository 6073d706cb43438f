//! Interpolated modified Kneser-Ney estimation (Chen & Goodman 1998, "An Empirical Study of
//! Smoothing Techniques for Language Modeling", eqs. 17 and 26), with KenLM lmplz's conventions:
//! discounts from the count-of-counts of *adjusted* counts per order, unigrams interpolated with the
//! uniform distribution over the vocabulary (without `<s>`), `<s>` given log10 probability -99.
//!
//! For a context h and word w with adjusted count a(hw):
//!   u(w|h)  = (a(hw) - D(a(hw))) / Σ_x a(hx)
//!   γ(h)    = (D1·N1(h•) + D2·N2(h•) + D3+·N3+(h•)) / Σ_x a(hx)
//!   p(w|h)  = u(w|h) + γ(h) · p(w|h')          (h' = h without its first word; p(w|ε) = u(w) + γ(ε)/|V|)
//! Written as a back-off model, p(w|h) is the stored probability and γ(h) the back-off weight of h.

use crate::adjust::{CountTable, Counts};
use crate::error::{NgramError, Result};
use crate::tables::{backoff_bits, Backoffs, Keys, NgramTables, OrderEntries};
use crate::tokenize::{Tokenization, BOS, EOS, UNK};
use crate::vocab::{BOS_ID, EOS_ID, UNK_ID};
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// log10 probability KenLM gives `<s>` (it is never predicted).
pub const BOS_LOG10_PROB: f32 = -99.0;
/// The discounts lmplz's `--discount_fallback` uses when given no values.
pub const FALLBACK_DISCOUNTS: [f64; 3] = [0.5, 1.0, 1.5];

/// How adjusted counts become a model, beyond the method itself (lmplz's options).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EstimateOptions {
    /// Per-order count thresholds (lmplz `--prune`): an n-gram of order n seen at most
    /// `prune[n-1]` times is left out of the model and its mass goes to its context's back-off.
    /// Non-decreasing; shorter than the order means the last value repeats; empty: no pruning.
    pub prune: Vec<u64>,
    /// Only n-grams made of these words are kept (lmplz `--limit_vocab_file`); `<s>`, `</s>` and
    /// `<unk>` always are.
    pub limit_vocab: Option<Vec<String>>,
    /// Discounts for the orders whose estimate fails (lmplz `--discount_fallback`); `None`
    /// refuses such a corpus, as lmplz does.
    pub fallback: Option<[f64; 3]>,
    /// Discounts given for an order instead of estimated (`given[n-1]` for order n).
    pub given: Vec<Option<[f64; 3]>>,
}

impl EstimateOptions {
    /// The pruning threshold of each order 1..=`order`, checked as lmplz checks them.
    pub fn thresholds(&self, order: usize) -> Result<Vec<u64>> {
        if self.prune.is_empty() {
            return Ok(vec![0; order]);
        }
        let bad = |msg: String| {
            Err(NgramError::BadOption {
                option: "prune",
                msg,
            })
        };
        if self.prune.len() > order {
            return bad(format!(
                "{} thresholds given for a model of order {order}",
                self.prune.len()
            ));
        }
        if self.prune.windows(2).any(|w| w[0] > w[1]) {
            return bad("thresholds must not decrease with the order (a lower order would lose n-grams that higher ones need as contexts)".into());
        }
        let mut t = self.prune.clone();
        t.resize(order, *self.prune.last().expect("not empty"));
        Ok(t)
    }

    /// Whether anything is pruned (then raw counts are needed).
    pub fn prunes(&self) -> bool {
        self.prune.iter().any(|&t| t > 0) || self.limit_vocab.is_some()
    }
}

/// Where an order's discounts came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscountSource {
    Estimated,
    /// The estimate failed and [`EstimateOptions::fallback`] was used.
    Fallback,
    Given,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Discounts {
    /// D1, D2, D3+.
    pub d: [f64; 3],
    /// Number of n-grams with adjusted count 1, 2, 3 and 4.
    pub count_of_counts: [u64; 4],
    pub source: DiscountSource,
}

impl Discounts {
    /// Chen & Goodman eq. 26: Y = t1/(t1+2t2), Dk = k - (k+1)·Y·t(k+1)/tk, with lmplz's checks:
    /// t1, t2 and t3 must be non-zero and each Dk within [0, k]; otherwise the reason they fail.
    pub fn estimate(t: [u64; 4]) -> std::result::Result<[f64; 3], String> {
        if let Some(k) = t[..3].iter().position(|&x| x == 0) {
            return Err(format!(
                "no n-grams with adjusted count {}, which the estimate needs",
                k + 1
            ));
        }
        let [t1, t2, t3, t4] = t.map(|x| x as f64);
        let y = t1 / (t1 + 2.0 * t2);
        let d = [
            1.0 - 2.0 * y * t2 / t1,
            2.0 - 3.0 * y * t3 / t2,
            3.0 - 4.0 * y * t4 / t3,
        ];
        for (k, &dk) in d.iter().enumerate() {
            if !(0.0..=(k + 1) as f64).contains(&dk) {
                return Err(format!(
                    "the discount for count {} is {dk:.4}, outside [0, {}]",
                    k + 1,
                    k + 1
                ));
            }
        }
        Ok(d)
    }

    /// The discounts of order `n` from its adjusted counts, as `opts` says.
    pub fn of(table: &CountTable, n: usize, opts: &EstimateOptions) -> Result<Self> {
        Self::from_count_of_counts(table.count_of_counts(), n, opts)
    }

    /// The discounts of order `n` from its count-of-counts (n-grams with adjusted count 1, 2, 3
    /// and 4), as `opts` says.
    pub fn from_count_of_counts(t: [u64; 4], n: usize, opts: &EstimateOptions) -> Result<Self> {
        let (d, source) = if let Some(Some(d)) = opts.given.get(n - 1) {
            (*d, DiscountSource::Given)
        } else {
            match (Self::estimate(t), opts.fallback) {
                (Ok(d), _) => (d, DiscountSource::Estimated),
                (Err(_), Some(d)) => (d, DiscountSource::Fallback),
                (Err(why), None) => {
                    return Err(NgramError::Discounts {
                        order: n,
                        why,
                        counts: t,
                    })
                }
            }
        };
        Ok(Discounts {
            d,
            count_of_counts: t,
            source,
        })
    }

    fn discount(&self, a: u64) -> f64 {
        match a {
            0 => 0.0,
            1 => self.d[0],
            2 => self.d[1],
            _ => self.d[2],
        }
    }
}

#[derive(Clone, Debug)]
pub struct Estimate {
    pub tables: NgramTables,
    /// `discounts[n - 1]` for order n.
    pub discounts: Vec<Discounts>,
}

/// Turns adjusted counts (one table per order, as the [`Adjuster`](crate::adjust::Adjuster)
/// builds them: linked keys in suffix order, `<unk>` and `<s>` among the unigrams) into a
/// back-off model whose tables keep those keys. The tables carry raw counts too when `opts`
/// prunes.
///
/// Order by order, each n-gram's context (its first n-1 words) is found through its suffix's
/// context, the n-grams are grouped by context (a counting sort), and each group gives its
/// context's back-off weight and its members' probabilities. An order's probabilities are held as
/// f32 in its own output column until the order above has used them, then turned into log10 in
/// place: beside the model itself, the largest order's context index, grouping and the search
/// tables of the order below are all the memory this takes.
pub fn estimate(
    mut counts: Vec<CountTable>,
    vocab: Vec<String>,
    tokenization: Tokenization,
    opts: &EstimateOptions,
) -> Result<Estimate> {
    let order = counts.len();
    let thresholds = opts.thresholds(order)?;
    let prunes = opts.prunes();
    let discounts = counts
        .iter()
        .enumerate()
        .map(|(i, t)| Discounts::of(t, i + 1, opts))
        .collect::<Result<Vec<_>>>()?;
    debug_assert!(
        counts[0].first.starts_with(&[UNK_ID, BOS_ID]),
        "the unigrams list <unk> and <s>"
    );

    // Which entries pruning leaves out: seen at most the order's threshold, or holding a word
    // outside the allowed vocabulary (the word itself or one in its suffix); never the special
    // unigrams. What is kept holds each kept n-gram's suffix (it is seen at least as often and
    // has no other word), so the links stay whole.
    let allowed = allowed_words(opts, &vocab);
    let mut marked: Vec<Vec<bool>> = Vec::with_capacity(order);
    if prunes {
        let mut outside_below: Vec<bool> = Vec::new();
        for (o, t) in counts.iter().enumerate() {
            let outside: Vec<bool> = match &allowed {
                None => Vec::new(),
                Some(ok) => (0..t.len())
                    .map(|e| {
                        !ok[t.first[e] as usize] || (o > 0 && outside_below[t.suffix[e] as usize])
                    })
                    .collect(),
            };
            marked.push(
                (0..t.len())
                    .map(|e| {
                        !(o == 0 && t.first[e] <= EOS_ID)
                            && (t.raw.get(e) <= thresholds[o] || outside.get(e) == Some(&true))
                    })
                    .collect(),
            );
            outside_below = outside;
        }
    }
    let is_marked = |o: usize, i: usize| prunes && marked[o][i];

    // The unigrams' uniform share: |V| without <s>, counting only the words pruning keeps (so
    // the unigrams sum to one over the model's own vocabulary, as lmplz has it).
    let kept_words = (0..counts[0].len()).filter(|&i| !is_marked(0, i)).count();
    let uniform = 1.0 / (kept_words as f64 - 1.0);
    // probs[n - 1]: order n's probabilities, linear until order n + 1 is done, then log10.
    let mut probs: Vec<Vec<f32>> = Vec::with_capacity(order);
    // gammas[n - 1]: log10 back-off weights of order n as [`backoff_bits`] keeps them.
    let mut gammas: Vec<Vec<u32>> = Vec::with_capacity(order);
    // contexts[e]: the index in order n - 1 of the context of order n's entry e.
    let mut contexts: Vec<u32> = Vec::new();
    for n in 1..=order {
        // This order's counts turn into its probabilities in place: each is read by its own
        // group only, before the group writes its probability there.
        let cells = Cells::new(std::mem::take(&mut counts[n - 1].counts));
        let t = &counts[n - 1];
        let disc = &discounts[n - 1];
        let lower_contexts = std::mem::take(&mut contexts);
        contexts = match n {
            1 => Vec::new(),
            // A bigram's context is the unigram of its first word (unigrams are sorted by word).
            2 => t
                .first
                .par_iter()
                .map(|w| position(&counts[0].first, 0, *w))
                .collect(),
            // An n-gram w1..wn's context w1..wn-1 is the entry of order n-1 made of w1 and the
            // context of its suffix w2..wn: found among that context's extensions by w1.
            _ => {
                let lt = &counts[n - 2];
                let starts = extension_starts(&lt.suffix, counts[n - 3].len());
                (0..t.len())
                    .into_par_iter()
                    .with_min_len(1 << 12)
                    .map(|e| {
                        let x = lower_contexts[t.suffix[e] as usize] as usize;
                        let start = starts[x] as usize;
                        position(&lt.first[..starts[x + 1] as usize], start, t.first[e])
                    })
                    .collect()
            }
        };
        drop(lower_contexts);

        let lower_p: &[f32] = if n == 1 { &[] } else { &probs[n - 2] };
        // One context's group (its members): the context's back-off weight (None when it has no
        // extension), and the members' probabilities.
        let group = |m: &[u32]| -> Option<f32> {
            if m.is_empty() {
                return None;
            }
            let mut g = GroupSum::default();
            for &e in m {
                let e = e as usize;
                if n == 1 && t.first[e] == BOS_ID {
                    continue;
                }
                g.add(disc, cells.count(e), is_marked(n - 1, e));
            }
            let gamma = g.gamma();
            for &e in m {
                let e = e as usize;
                let u = g.discounted(disc, cells.count(e));
                let backed_off = if n == 1 {
                    uniform
                } else {
                    lower_p[t.suffix[e] as usize] as f64
                };
                cells.set(e, interpolate(u, gamma, backed_off));
            }
            Some(gamma.log10() as f32)
        };
        if n == 1 {
            // One group: every unigram, under the empty context.
            group(&(0..t.len() as u32).collect::<Vec<_>>());
        } else {
            let groups = counts[n - 2].len();
            let (mut g, members) = group_by(&contexts, groups);
            if n == order {
                // Only the next order looks contexts up.
                contexts = Vec::new();
            }
            // Each group's end is overwritten by its context's back-off weight (as bits): a
            // chunk of groups starts where the chunk before it ends, read before any is written.
            let chunk = (groups / 256).max(1 << 12);
            let starts: Vec<u32> = (0..groups)
                .step_by(chunk)
                .map(|c| if c == 0 { 0 } else { g[c - 1] })
                .collect();
            g.par_chunks_mut(chunk)
                .zip(starts)
                .for_each(|(slots, mut start)| {
                    for slot in slots {
                        let end = *slot;
                        *slot = backoff_bits(group(&members[start as usize..end as usize]));
                        start = end;
                    }
                });
            gammas.push(g);
        }
        // The order below is used up: its probabilities become log10.
        if n > 1 {
            to_log10(&mut probs[n - 2], n == 2);
        }
        probs.push(cells.into_probs());
        // This order's raw counts are used up (its keys stay: they are the model's).
        counts[n - 1].raw = Counts::default();
        lmkit_kernels::system::return_free_memory();
    }
    drop(contexts);
    to_log10(&mut probs[order - 1], order == 1);

    let mut orders: Vec<OrderEntries> = Vec::with_capacity(order);
    let mut gammas = gammas.into_iter();
    for (o, (t, mut lp)) in counts.into_iter().zip(probs).enumerate() {
        let (mut first, mut suffix) = (t.first, t.suffix);
        let mut g = if o + 1 < order {
            gammas.next().expect("a back-off column per context order")
        } else {
            Vec::new()
        };
        if prunes {
            if o > 0 {
                // The kept entries of the order below are renumbered.
                let mut rank = Vec::with_capacity(marked[o - 1].len());
                let mut r = 0u32;
                for &m in &marked[o - 1] {
                    rank.push(r);
                    r += u32::from(!m);
                }
                suffix.iter_mut().for_each(|s| *s = rank[*s as usize]);
                retain_kept(&mut suffix, &marked[o]);
            }
            retain_kept(&mut first, &marked[o]);
            retain_kept(&mut lp, &marked[o]);
            if !g.is_empty() {
                retain_kept(&mut g, &marked[o]);
            }
        }
        orders.push(OrderEntries {
            n: t.n,
            log10_backoff: if g.is_empty() {
                Backoffs::none(lp.len())
            } else {
                Backoffs::from_bits(g)
            },
            keys: Keys::Linked { first, suffix },
            log10_prob: lp,
        });
    }
    let vocab = if orders[0].len() < vocab.len() {
        drop_pruned_words(&mut orders, vocab)
    } else {
        vocab
    };
    Ok(Estimate {
        tables: NgramTables {
            vocab,
            orders,
            tokenization,
        },
        discounts,
    })
}

/// One context's group of n-grams, summed: their adjusted counts, and the back-off mass they
/// leave (the discounted mass of the kept ones plus all of the pruned ones' mass).
#[derive(Default)]
pub(crate) struct GroupSum {
    sum: u64,
    mass: f64,
}

impl GroupSum {
    /// A member with adjusted count `a`.
    pub(crate) fn add(&mut self, d: &Discounts, a: u64, pruned: bool) {
        self.sum += a;
        self.mass += if pruned { a as f64 } else { d.discount(a) };
    }

    /// The context's back-off weight γ(h) (linear).
    pub(crate) fn gamma(&self) -> f64 {
        let sum = self.sum as f64;
        if sum > 0.0 {
            self.mass / sum
        } else {
            0.0
        }
    }

    /// A member's discounted probability u(w|h), from its adjusted count `a`.
    pub(crate) fn discounted(&self, d: &Discounts, a: u64) -> f64 {
        let sum = self.sum as f64;
        if sum > 0.0 {
            (a as f64 - d.discount(a)) / sum
        } else {
            0.0
        }
    }
}

/// p(w|h) = u(w|h) + γ(h)·p(w|h'), as a model keeps it until written (f32).
pub(crate) fn interpolate(u: f64, gamma: f64, backed_off: f64) -> f32 {
    (u + gamma * backed_off) as f32
}

/// With `--limit-vocab`, which words (by id) n-grams may hold: the listed ones and `<s>`, `</s>`
/// and `<unk>`.
pub(crate) fn allowed_words(opts: &EstimateOptions, vocab: &[String]) -> Option<Vec<bool>> {
    opts.limit_vocab.as_ref().map(|words| {
        let ids: FxHashMap<&str, usize> = vocab
            .iter()
            .enumerate()
            .map(|(i, w)| (w.as_str(), i))
            .collect();
        let mut ok = vec![false; vocab.len()];
        for w in words.iter().map(String::as_str).chain([UNK, BOS, EOS]) {
            if let Some(&i) = ids.get(w) {
                ok[i] = true;
            }
        }
        ok
    })
}

/// An order's counts, then its probabilities (f32), in one column of cells where the counts are
/// 4 bytes; 8-byte counts stay beside it.
struct Cells {
    cells: Vec<AtomicU32>,
    wide: Vec<u64>,
}

impl Cells {
    fn new(counts: Counts) -> Self {
        match counts {
            // Converted in the same memory (same size and alignment).
            Counts::Narrow(v) => Cells {
                cells: v.into_iter().map(AtomicU32::new).collect(),
                wide: Vec::new(),
            },
            Counts::Wide(wide) => Cells {
                cells: (0..wide.len()).map(|_| AtomicU32::new(0)).collect(),
                wide,
            },
        }
    }

    /// Entry `e`'s count (before its probability is set).
    fn count(&self, e: usize) -> u64 {
        match self.wide.get(e) {
            Some(&c) => c,
            None => u64::from(self.cells[e].load(Relaxed)),
        }
    }

    fn set(&self, e: usize, p: f32) {
        self.cells[e].store(p.to_bits(), Relaxed);
    }

    fn into_probs(self) -> Vec<f32> {
        self.cells
            .into_iter()
            .map(|c| f32::from_bits(c.into_inner()))
            .collect()
    }
}

/// Drops the entries of `v` that `marked` says are pruned.
fn retain_kept<T>(v: &mut Vec<T>, marked: &[bool]) {
    let mut i = 0;
    v.retain(|_| {
        i += 1;
        !marked[i - 1]
    });
}

/// Index (from `start`) of `word` in `words[start..]`, a sorted run of an order's first words.
fn position(words: &[u32], start: usize, word: u32) -> u32 {
    let at = words[start..]
        .binary_search(&word)
        .expect("every n-gram's context was counted");
    (start + at) as u32
}

/// Where each entry's extensions begin in the order above, from that order's suffix links
/// (sorted): entry x's are `starts[x]..starts[x + 1]`.
fn extension_starts(suffix: &[u32], len: usize) -> Vec<u32> {
    let mut starts = vec![0u32; len + 1];
    for &s in suffix {
        starts[s as usize + 1] += 1;
    }
    for x in 0..len {
        starts[x + 1] += starts[x];
    }
    starts
}

/// The entries grouped by context (a counting sort): group c's entries are
/// `members[ends[c - 1]..ends[c]]` (from 0 for the first).
fn group_by(contexts: &[u32], groups: usize) -> (Vec<u32>, Vec<u32>) {
    let mut at = extension_starts(contexts, groups);
    let mut members = vec![0u32; contexts.len()];
    for (e, &c) in contexts.iter().enumerate() {
        let slot = &mut at[c as usize];
        members[*slot as usize] = e as u32;
        *slot += 1;
    }
    // Each group's start has moved to its end.
    at.pop();
    (at, members)
}

/// Linear probabilities to log10 in place (for unigrams, `<s>`'s — entry `BOS_ID`, after
/// `<unk>` — to [`BOS_LOG10_PROB`]).
fn to_log10(p: &mut [f32], unigrams: bool) {
    p.par_iter_mut().enumerate().for_each(|(i, x)| {
        *x = if unigrams && i == BOS_ID as usize {
            BOS_LOG10_PROB
        } else {
            log10_prob(*x)
        };
    });
}

/// The log10 probability a model stores for the linear probability `p`.
pub(crate) fn log10_prob(p: f32) -> f32 {
    (p as f64).log10() as f32
}

/// Renumbers the words so the vocabulary holds only the words that kept their unigram (in the same
/// order, so every table keeps its order).
fn drop_pruned_words(orders: &mut [OrderEntries], vocab: Vec<String>) -> Vec<String> {
    let mut new_id = vec![u32::MAX; vocab.len()];
    let mut vocab: Vec<Option<String>> = vocab.into_iter().map(Some).collect();
    let mut words = Vec::with_capacity(orders[0].len());
    let Keys::Linked { first, .. } = &orders[0].keys else {
        unreachable!("estimated tables are linked")
    };
    for &w in first {
        new_id[w as usize] = words.len() as u32;
        words.push(vocab[w as usize].take().expect("each unigram once"));
    }
    for o in orders.iter_mut() {
        if let Keys::Linked { first, .. } = &mut o.keys {
            first.iter_mut().for_each(|w| *w = new_id[*w as usize]);
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(counts: &[u64]) -> CountTable {
        CountTable {
            n: 1,
            first: vec![0; counts.len()],
            counts: Counts::from(counts.to_vec()),
            ..Default::default()
        }
    }

    #[test]
    fn discounts_follow_chen_goodman_eq_26() {
        let d = Discounts::of(
            &table(
                &[1; 100]
                    .iter()
                    .chain(&[2; 40])
                    .chain(&[3; 20])
                    .chain(&[4; 10])
                    .copied()
                    .collect::<Vec<_>>(),
            ),
            1,
            &EstimateOptions::default(),
        )
        .unwrap();
        let y = 100.0 / 180.0;
        assert_eq!(d.source, DiscountSource::Estimated);
        assert_eq!(d.count_of_counts, [100, 40, 20, 10]);
        assert!((d.d[0] - (1.0 - 2.0 * y * 40.0 / 100.0)).abs() < 1e-12);
        assert!((d.d[1] - (2.0 - 3.0 * y * 20.0 / 40.0)).abs() < 1e-12);
        assert!((d.d[2] - (3.0 - 4.0 * y * 10.0 / 20.0)).abs() < 1e-12);
    }

    #[test]
    fn bad_estimates_are_refused_unless_a_fallback_is_given() {
        // No count-3 n-grams: lmplz refuses, naming the order.
        let counts = [1, 1, 2];
        let err = Discounts::of(&table(&counts), 2, &EstimateOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("2-gram") && err.contains("--discount-fallback"),
            "{err}"
        );
        let opts = EstimateOptions {
            fallback: Some(FALLBACK_DISCOUNTS),
            ..Default::default()
        };
        let d = Discounts::of(&table(&counts), 2, &opts).unwrap();
        assert_eq!(
            (d.d, d.source),
            (FALLBACK_DISCOUNTS, DiscountSource::Fallback)
        );
        // Given discounts win over an estimate.
        let opts = EstimateOptions {
            given: vec![None, Some([0.1, 0.2, 0.3])],
            ..Default::default()
        };
        let d = Discounts::of(&table(&counts), 2, &opts).unwrap();
        assert_eq!((d.d, d.source), ([0.1, 0.2, 0.3], DiscountSource::Given));
        // A count-of-counts giving a discount outside [0, k] is refused too.
        assert!(Discounts::estimate([10, 1, 10, 0]).is_err()); // D2 < 0
        assert!(Discounts::estimate([10, 5, 2, 0]).is_ok()); // t4 = 0 gives D3+ = 3: allowed
    }

    #[test]
    fn pruning_thresholds_are_checked_and_padded() {
        let o = |p: &[u64]| EstimateOptions {
            prune: p.to_vec(),
            ..Default::default()
        };
        assert_eq!(o(&[]).thresholds(3).unwrap(), vec![0, 0, 0]);
        assert_eq!(o(&[0, 1]).thresholds(4).unwrap(), vec![0, 1, 1, 1]);
        assert!(o(&[0, 2, 1]).thresholds(3).is_err());
        assert!(o(&[0, 0, 0, 0]).thresholds(3).is_err());
    }
}
