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

use crate::adjust::CountTable;
use crate::tables::{find_sorted, sorted_order, NgramTables, OrderEntries};
use crate::tokenize::Tokenization;
use crate::vocab::{BOS_ID, UNK_ID};
use rayon::prelude::*;

/// log10 probability KenLM gives `<s>` (it is never predicted).
pub const BOS_LOG10_PROB: f32 = -99.0;
/// Discounts used when the count-of-counts cannot give valid ones (tiny corpora), as KenLM's
/// `--discount_fallback`.
pub const FALLBACK_DISCOUNTS: [f64; 3] = [0.5, 1.0, 1.5];

#[derive(Clone, Debug, PartialEq)]
pub struct Discounts {
    /// D1, D2, D3+.
    pub d: [f64; 3],
    /// Number of n-grams with adjusted count 1, 2, 3 and 4.
    pub count_of_counts: [u64; 4],
    /// True when the estimate was out of range and [`FALLBACK_DISCOUNTS`] were used.
    pub fallback: bool,
}

impl Discounts {
    /// Chen & Goodman eq. 26: Y = t1/(t1+2t2), Dk = k - (k+1)·Y·t(k+1)/tk.
    pub fn from_count_of_counts(t: [u64; 4]) -> Self {
        let [t1, t2, t3, t4] = t.map(|x| x as f64);
        let y = t1 / (t1 + 2.0 * t2);
        let d = [
            1.0 - 2.0 * y * t2 / t1,
            2.0 - 3.0 * y * t3 / t2,
            3.0 - 4.0 * y * t4 / t3,
        ];
        let valid = d
            .iter()
            .enumerate()
            .all(|(k, &dk)| dk.is_finite() && dk > 0.0 && dk <= (k + 1) as f64);
        if valid {
            Discounts {
                d,
                count_of_counts: t,
                fallback: false,
            }
        } else {
            Discounts {
                d: FALLBACK_DISCOUNTS,
                count_of_counts: t,
                fallback: true,
            }
        }
    }

    pub fn of(counts: &[u64]) -> Self {
        let mut t = [0u64; 4];
        for &c in counts {
            if (1..=4).contains(&c) {
                t[c as usize - 1] += 1;
            }
        }
        Self::from_count_of_counts(t)
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

/// Turns adjusted counts (one table per order, any key order) into a back-off model.
pub fn estimate(
    mut counts: Vec<CountTable>,
    vocab: Vec<String>,
    tokenization: Tokenization,
) -> Estimate {
    let order = counts.len();
    let discounts: Vec<Discounts> = counts.iter().map(|t| Discounts::of(&t.counts)).collect();

    // <s> and <unk> are unigrams even when never predicted (adjusted count 0).
    let uni = &mut counts[0];
    for id in [BOS_ID, UNK_ID] {
        if !uni.keys.contains(&id) {
            uni.keys.push(id);
            uni.counts.push(0);
        }
    }
    let counts: Vec<CountTable> = counts.into_iter().map(sort_table).collect();

    let mut probs: Vec<Vec<f64>> = Vec::with_capacity(order);
    let mut gammas: Vec<Vec<Option<f64>>> = counts.iter().map(|t| vec![None; t.len()]).collect();
    for n in 1..=order {
        let t = &counts[n - 1];
        let disc = &discounts[n - 1];
        // Groups of entries sharing their context (the first n-1 words).
        let mut groups: Vec<(usize, usize, f64, f64)> = Vec::new(); // start, end, Σa, γ
        let mut start = 0;
        while start < t.len() {
            let ctx = &t.key(start)[..n - 1];
            let mut end = start;
            let (mut sum, mut mass) = (0u64, 0.0f64);
            while end < t.len() && &t.key(end)[..n - 1] == ctx {
                let is_bos_unigram = n == 1 && t.key(end)[0] == BOS_ID;
                if !is_bos_unigram {
                    sum += t.counts[end];
                    mass += disc.discount(t.counts[end]);
                }
                end += 1;
            }
            let sum = sum as f64;
            groups.push((start, end, sum, if sum > 0.0 { mass / sum } else { 0.0 }));
            start = end;
        }
        let mut p = vec![0.0f64; t.len()];
        let lower = if n > 1 {
            Some((&counts[n - 2], &probs[n - 2]))
        } else {
            None
        };
        let uniform = 1.0 / (t.len() as f64 - 1.0); // |V| without <s>
                                                    // Which group each entry is in; then one parallel pass over all entries (a pass per
                                                    // group handed ~1.5 M tiny jobs to the thread pool, most of the time spent waking it).
        let mut group_of = vec![0u32; t.len()];
        for (g, &(s, e, _, gamma)) in groups.iter().enumerate() {
            group_of[s..e].fill(g as u32);
            if let Some((lt, _)) = lower {
                if let Some(i) = find_sorted(&lt.keys, n - 1, &t.key(s)[..n - 1]) {
                    gammas[n - 2][i] = Some(gamma);
                }
            }
        }
        p.par_iter_mut()
            .with_min_len(1 << 12)
            .enumerate()
            .for_each(|(i, pk)| {
                let (_, _, sum, gamma) = groups[group_of[i] as usize];
                let a = t.counts[i];
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
                *pk = u + gamma * backed_off;
            });
        probs.push(p);
    }

    let orders = counts
        .iter()
        .zip(probs)
        .zip(gammas)
        .map(|((t, p), g)| {
            let log10_prob = p
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    if t.n == 1 && t.keys[i] == BOS_ID {
                        BOS_LOG10_PROB
                    } else {
                        x.log10() as f32
                    }
                })
                .collect();
            let log10_backoff = g.iter().map(|x| x.map(|v| v.log10() as f32)).collect();
            OrderEntries {
                n: t.n,
                keys: t.keys.clone(),
                log10_prob,
                log10_backoff,
            }
        })
        .collect();
    Estimate {
        tables: NgramTables {
            vocab,
            orders,
            tokenization,
        },
        discounts,
    }
}

fn sort_table(t: CountTable) -> CountTable {
    let idx = sorted_order(&t.keys, t.n);
    let mut keys = Vec::with_capacity(t.keys.len());
    for &i in &idx {
        keys.extend_from_slice(t.key(i));
    }
    let counts = idx.iter().map(|&i| t.counts[i]).collect();
    CountTable {
        n: t.n,
        keys,
        counts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discounts_follow_chen_goodman_eq_26() {
        let d = Discounts::from_count_of_counts([100, 40, 20, 10]);
        let y = 100.0 / 180.0;
        assert!(!d.fallback);
        assert!((d.d[0] - (1.0 - 2.0 * y * 40.0 / 100.0)).abs() < 1e-12);
        assert!((d.d[1] - (2.0 - 3.0 * y * 20.0 / 40.0)).abs() < 1e-12);
        assert!((d.d[2] - (3.0 - 4.0 * y * 10.0 / 20.0)).abs() < 1e-12);
    }

    #[test]
    fn missing_count_of_counts_fall_back() {
        let d = Discounts::from_count_of_counts([5, 0, 0, 0]);
        assert!(d.fallback);
        assert_eq!(d.d, FALLBACK_DISCOUNTS);
    }
}
