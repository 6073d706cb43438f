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
use crate::tables::{find_sorted, sorted_order, NgramTables, OrderEntries};
use crate::tokenize::{Tokenization, BOS, EOS, UNK};
use crate::vocab::{BOS_ID, EOS_ID, UNK_ID};
use rayon::prelude::*;
use rustc_hash::FxHashMap;

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
        let t = table.count_of_counts();
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

/// Turns adjusted counts (one table per order, any key order) into a back-off model. The tables
/// carry raw counts too when `opts` prunes.
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

    // <s> and <unk> are unigrams even when never predicted (adjusted count 0).
    let uni = &mut counts[0];
    for id in [BOS_ID, UNK_ID] {
        if !uni.keys.contains(&id) {
            uni.keys.push(id);
            uni.counts.push(0);
            if prunes {
                uni.raw.push(0);
            }
        }
    }
    let mut counts: Vec<CountTable> = counts.into_iter().map(sort_table).collect();
    lmkit_kernels::system::return_free_memory();

    // Which entries pruning leaves out: seen at most the order's threshold, or holding a word
    // outside the allowed vocabulary; never the special unigrams.
    let allowed: Option<Vec<bool>> = opts.limit_vocab.as_ref().map(|words| {
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
    });
    let marked: Vec<Vec<bool>> = counts
        .iter()
        .enumerate()
        .map(|(o, t)| {
            if !prunes {
                return Vec::new();
            }
            (0..t.len())
                .into_par_iter()
                .with_min_len(1 << 12)
                .map(|i| {
                    let key = t.key(i);
                    if o == 0 && key[0] <= EOS_ID {
                        return false;
                    }
                    t.raw.get(i) <= thresholds[o]
                        || allowed
                            .as_ref()
                            .is_some_and(|ok| key.iter().any(|&w| !ok[w as usize]))
                })
                .collect()
        })
        .collect();
    let is_marked = |o: usize, i: usize| prunes && marked[o][i];

    // Probabilities in f64 for the order being computed and the one below it (all that the
    // interpolation needs); every order's log10 values in f32 as they are written. Back-offs as
    // log10 f32, NaN where the n-gram is no context.
    let mut lower_p: Vec<f64> = Vec::new();
    // The unigrams' uniform share: |V| without <s>, counting only the words pruning keeps (so
    // the unigrams sum to one over the model's own vocabulary, as lmplz has it).
    let kept_words = (0..counts[0].len()).filter(|&i| !is_marked(0, i)).count();
    let uniform = 1.0 / (kept_words as f64 - 1.0);
    let mut log_probs: Vec<Vec<f32>> = Vec::with_capacity(order);
    // (The highest order is no context: it has none.)
    let mut gammas: Vec<Vec<f32>> = counts[..order - 1]
        .iter()
        .map(|t| vec![f32::NAN; t.len()])
        .chain([Vec::new()])
        .collect();
    for n in 1..=order {
        let t = &counts[n - 1];
        let disc = &discounts[n - 1];
        // Groups of entries sharing their context (the first n-1 words). The back-off mass of a
        // group is the discounted mass of its kept entries plus all of its pruned entries' mass.
        // `group(s)`: the end of the group starting at entry s, its Σa and its γ.
        let group = |start: usize| -> (usize, f64, f64) {
            let ctx = &t.key(start)[..n - 1];
            let mut end = start;
            let (mut sum, mut mass) = (0u64, 0.0f64);
            while end < t.len() && &t.key(end)[..n - 1] == ctx {
                let is_bos_unigram = n == 1 && t.key(end)[0] == BOS_ID;
                if !is_bos_unigram {
                    let a = t.counts.get(end);
                    sum += a;
                    mass += if is_marked(n - 1, end) {
                        a as f64
                    } else {
                        disc.discount(a)
                    };
                }
                end += 1;
            }
            let sum = sum as f64;
            (end, sum, if sum > 0.0 { mass / sum } else { 0.0 })
        };
        let lower = if n > 1 {
            Some((&counts[n - 2], &lower_p))
        } else {
            None
        };
        // The groups' γ are the back-off weights of the order below.
        if let Some((lt, _)) = lower {
            let mut start = 0;
            while start < t.len() {
                let (end, _, gamma) = group(start);
                if let Some(i) = find_sorted(&lt.keys, n - 1, &t.key(start)[..n - 1]) {
                    gammas[n - 2][i] = gamma.log10() as f32;
                }
                start = end;
            }
        }
        // Then the probabilities in parallel, over chunks of whole groups (each group's Σa and γ
        // found again inside its chunk: no per-group or per-entry table of them is kept, and a
        // job per group handed ~1.5 M tiny jobs to the thread pool).
        let mut starts = vec![0];
        let step = (t.len() / 256).max(1 << 12);
        let mut at = step;
        while at < t.len() {
            let ctx = &t.key(at - 1)[..n - 1];
            while at < t.len() && &t.key(at)[..n - 1] == ctx {
                at += 1;
            }
            if at < t.len() {
                starts.push(at);
            }
            at += step;
        }
        let mut p = vec![0.0f64; t.len()];
        let mut chunks: Vec<(usize, &mut [f64])> = Vec::with_capacity(starts.len());
        let mut rest: &mut [f64] = &mut p;
        for (k, &s0) in starts.iter().enumerate() {
            let len = starts.get(k + 1).map_or(rest.len(), |&s1| s1 - s0);
            let (head, tail) = rest.split_at_mut(len);
            chunks.push((s0, head));
            rest = tail;
        }
        chunks.into_par_iter().for_each(|(s0, out)| {
            let mut start = s0;
            while start < s0 + out.len() {
                let (end, sum, gamma) = group(start);
                for i in start..end {
                    let a = t.counts.get(i);
                    let u = if sum > 0.0 {
                        (a as f64 - disc.discount(a)) / sum
                    } else {
                        0.0
                    };
                    let backed_off = match lower {
                        None => uniform,
                        Some((lt, lp)) => {
                            find_sorted(&lt.keys, n - 1, &t.key(i)[1..]).map_or(0.0, |j| lp[j])
                        }
                    };
                    out[i - s0] = u + gamma * backed_off;
                }
                start = end;
            }
        });
        log_probs.push(
            p.par_iter()
                .enumerate()
                .map(|(i, &x)| {
                    if n == 1 && t.keys[i] == BOS_ID {
                        BOS_LOG10_PROB
                    } else {
                        x.log10() as f32
                    }
                })
                .collect(),
        );
        lower_p = p;
        // This order's counts are used up (its keys stay: they are the model's).
        counts[n - 1].counts = Counts::default();
        counts[n - 1].raw = Counts::default();
        lmkit_kernels::system::return_free_memory();
    }
    drop(lower_p);

    let backoff = |x: f32| (!x.is_nan()).then_some(x);
    let mut orders: Vec<OrderEntries> = Vec::with_capacity(order);
    for (o, ((t, lp), g)) in counts.into_iter().zip(log_probs).zip(gammas).enumerate() {
        if !prunes {
            // Everything is kept: the keys move over.
            let log10_backoff = if g.is_empty() {
                (0..lp.len()).map(|_| None).collect()
            } else {
                g.into_iter().map(backoff).collect()
            };
            orders.push(OrderEntries {
                n: t.n,
                keys: t.keys,
                log10_prob: lp,
                log10_backoff,
            });
            continue;
        }
        let kept = |i: &usize| !is_marked(o, *i);
        let mut keys = Vec::with_capacity(t.keys.len());
        (0..t.len())
            .filter(kept)
            .for_each(|i| keys.extend_from_slice(t.key(i)));
        orders.push(OrderEntries {
            n: t.n,
            keys,
            log10_prob: (0..t.len()).filter(kept).map(|i| lp[i]).collect(),
            log10_backoff: (0..t.len())
                .filter(kept)
                .map(|i| g.get(i).copied().and_then(backoff))
                .collect(),
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

/// Renumbers the words so the vocabulary holds only the words that kept their unigram (in the same
/// order, so sorted tables stay sorted).
fn drop_pruned_words(orders: &mut [OrderEntries], vocab: Vec<String>) -> Vec<String> {
    let mut new_id = vec![u32::MAX; vocab.len()];
    let mut vocab: Vec<Option<String>> = vocab.into_iter().map(Some).collect();
    let mut words = Vec::with_capacity(orders[0].len());
    for &w in &orders[0].keys {
        new_id[w as usize] = words.len() as u32;
        words.push(vocab[w as usize].take().expect("each unigram once"));
    }
    for o in orders.iter_mut() {
        o.keys.iter_mut().for_each(|w| *w = new_id[*w as usize]);
    }
    words
}

/// The table in word order, sorted in place. Keys with 4-byte counts and no raw counts (the
/// usual case) are widened by one word that carries the count and sorted as records in
/// parallel; others go through a sorted index and [`CountTable::permute`].
fn sort_table(mut t: CountTable) -> CountTable {
    t.last_in_statistics = None;
    if !matches!(t.counts, Counts::Narrow(_)) || !t.raw.is_empty() {
        let idx = sorted_order(&t.keys, t.n);
        t.permute(&idx);
        return t;
    }
    macro_rules! dispatch {
        ($(($n:literal, $w:literal))*) => {
            match t.n {
                $($n => sort_records::<$n, $w>(&mut t),)*
                n => unreachable!("{n}-grams are not counted"),
            }
        };
    }
    dispatch!((1, 2)(2, 3)(3, 4)(4, 5)(5, 6)(6, 7)(7, 8)(8, 9));
    t
}

/// [`sort_table`] for N-word keys: in the keys' own buffer, record i (W = N + 1 words: its key,
/// then its count) is spread out from the last to the first, the records are sorted, the counts
/// taken out and the keys closed up again — no second table and no index is ever built.
fn sort_records<const N: usize, const W: usize>(t: &mut CountTable) {
    debug_assert_eq!(W, N + 1);
    let Counts::Narrow(counts) = std::mem::take(&mut t.counts) else {
        unreachable!("checked by sort_table")
    };
    let len = counts.len();
    let mut keys = std::mem::take(&mut t.keys);
    keys.resize(len * W, 0);
    for i in (0..len).rev() {
        let key: [u32; N] = keys[i * N..i * N + N].try_into().expect("N words");
        keys[i * W..i * W + N].copy_from_slice(&key);
        keys[i * W + N] = counts[i];
    }
    drop(counts);
    let records = keys.as_chunks_mut::<W>().0;
    records.par_sort_unstable_by(|a, b| a[..N].cmp(&b[..N]));
    let counts: Vec<u32> = records.iter().map(|r| r[N]).collect();
    for i in 0..len {
        let key: [u32; N] = keys[i * W..i * W + N].try_into().expect("N words");
        keys[i * N..i * N + N].copy_from_slice(&key);
    }
    keys.truncate(len * N);
    keys.shrink_to_fit();
    t.keys = keys;
    t.counts = Counts::Narrow(counts);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(counts: &[u64]) -> CountTable {
        CountTable {
            n: 1,
            keys: vec![0; counts.len()],
            counts: Counts::from(counts.to_vec()),
            ..Default::default()
        }
    }

    /// Both ways of sorting a table (records with their counts; an index and a permutation)
    /// give the table in word order with each count beside its key.
    #[test]
    fn tables_sort_the_same_either_way() {
        for n in 1..=4usize {
            let len = 500;
            // Distinct keys in a scrambled order, each count derived from its key.
            let keys: Vec<u32> = (0..len as u32)
                .flat_map(|i| {
                    let k = (i * 7919) % len as u32;
                    (0..n as u32).map(move |w| {
                        if w + 1 == n as u32 {
                            k
                        } else {
                            (k * (w + 3)) % 11
                        }
                    })
                })
                .collect();
            let count = |key: &[u32]| key.iter().fold(1u64, |a, &w| a * 31 + w as u64);
            let counts: Vec<u64> = keys.chunks(n).map(count).collect();
            let table = |raw: Counts| CountTable {
                n,
                keys: keys.clone(),
                counts: Counts::from(counts.clone()),
                raw,
                last_in_statistics: Some(3),
            };
            let by_records = sort_table(table(Counts::default()));
            let by_index = sort_table(table(Counts::from(counts.clone())));
            assert_eq!(by_records.keys, by_index.keys);
            assert_eq!(by_records.counts.to_vec(), by_index.counts.to_vec());
            assert!(by_records
                .keys
                .chunks(n)
                .zip(by_records.keys.chunks(n).skip(1))
                .all(|(a, b)| a < b));
            for (k, c) in by_records.keys.chunks(n).zip(by_records.counts.iter()) {
                assert_eq!(c, count(k));
            }
            assert_eq!(by_records.last_in_statistics, None);
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
