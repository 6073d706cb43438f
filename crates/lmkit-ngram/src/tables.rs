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
    pub log10_backoff: Backoffs,
}

/// The log10 back-off weights of an order's n-grams, 4 bytes each (an `Option<f32>` takes 8):
/// `None` (the n-gram is never a context) is kept as a NaN bit pattern that no weight has.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Backoffs(Vec<u32>);

/// The bits of a missing back-off weight.
const NO_BACKOFF: u32 = u32::MAX;

/// How a back-off weight (or its absence) is stored.
fn backoff_bits(b: Option<f32>) -> u32 {
    b.map_or(NO_BACKOFF, f32::to_bits)
}

impl Backoffs {
    pub fn get(&self, i: usize) -> Option<f32> {
        let b = self.0[i];
        (b != NO_BACKOFF).then(|| f32::from_bits(b))
    }

    pub fn push(&mut self, b: Option<f32>) {
        self.0.push(backoff_bits(b));
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = Option<f32>> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }
}

impl FromIterator<Option<f32>> for Backoffs {
    fn from_iter<I: IntoIterator<Item = Option<f32>>>(it: I) -> Self {
        Backoffs(it.into_iter().map(backoff_bits).collect())
    }
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

/// Permutation that sorts a table of `n`-id keys in word order (entry j of the sorted table is
/// entry idx[j]; tables hold fewer than 2³² entries).
pub fn sorted_order(keys: &[u32], n: usize) -> Vec<u32> {
    use rayon::slice::ParallelSliceMut;
    let len = keys.len() / n;
    assert!(len <= u32::MAX as usize, "an n-gram table of {len} entries");
    let mut idx: Vec<u32> = (0..len as u32).collect();
    let key = |i: u32| &keys[i as usize * n..i as usize * n + n];
    idx.par_sort_unstable_by(|&a, &b| key(a).cmp(key(b)));
    idx
}
