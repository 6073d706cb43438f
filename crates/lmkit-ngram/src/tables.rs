//! A finished back-off model as plain tables: what ARPA files hold, what estimation produces and
//! what the binary format is built from.

use crate::tokenize::Tokenization;

/// The n-grams of one order: keys flattened in word order (`n` ids each), log10 probabilities and
/// log10 back-off weights (`None` when the n-gram is never a context).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OrderEntries {
    pub n: usize,
    pub keys: Vec<u32>,
    pub log10_prob: Vec<f32>,
    pub log10_backoff: Vec<Option<f32>>,
}

impl OrderEntries {
    pub fn len(&self) -> usize {
        self.log10_prob.len()
    }

    pub fn is_empty(&self) -> bool {
        self.log10_prob.is_empty()
    }

    pub fn key(&self, i: usize) -> &[u32] {
        &self.keys[i * self.n..(i + 1) * self.n]
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct NgramTables {
    /// Id → word. Must contain `<s>`, `</s>` and `<unk>`.
    pub vocab: Vec<String>,
    /// `orders[n - 1]` holds the n-grams.
    pub orders: Vec<OrderEntries>,
    pub tokenization: Tokenization,
}

impl NgramTables {
    pub fn order(&self) -> usize {
        self.orders.len()
    }

    pub fn id_of(&self, word: &str) -> Option<u32> {
        self.vocab.iter().position(|w| w == word).map(|i| i as u32)
    }
}

/// Index of `key` in a table of `n`-id keys sorted in word order.
pub fn find_sorted(keys: &[u32], n: usize, key: &[u32]) -> Option<usize> {
    let (mut lo, mut hi) = (0usize, keys.len() / n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        match keys[mid * n..mid * n + n].cmp(key) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return Some(mid),
        }
    }
    None
}

/// Permutation that sorts a table of `n`-id keys in word order.
pub fn sorted_order(keys: &[u32], n: usize) -> Vec<usize> {
    use rayon::slice::ParallelSliceMut;
    let mut idx: Vec<usize> = (0..keys.len() / n).collect();
    idx.par_sort_unstable_by(|&a, &b| keys[a * n..a * n + n].cmp(&keys[b * n..b * n + n]));
    idx
}
