//! A finished back-off model as plain tables: what ARPA files hold, what estimation produces and
//! what the binary format is built from.

use crate::count::MAX_ORDER;
use crate::tokenize::Tokenization;

/// The n-grams of one order: their keys, log10 probabilities and log10 back-off weights (`None`
/// when the n-gram is never a context).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OrderEntries {
    pub n: usize,
    pub keys: Keys,
    pub log10_prob: Vec<f32>,
    pub log10_backoff: Backoffs,
}

/// The keys of one order's n-grams.
#[derive(Clone, Debug, PartialEq)]
pub enum Keys {
    /// `n` ids per entry in word order, one entry after another (as an ARPA file lists them).
    Flat(Vec<u32>),
    /// Each entry's key is its first word followed by the key of an entry of the order below (its
    /// suffix: the n-gram without its first word) — 8 bytes an entry whatever the order, as
    /// estimation builds them. `suffix` is empty for unigrams. Entries are sorted by (suffix,
    /// first): by their keys read from the last word to the first.
    Linked { first: Vec<u32>, suffix: Vec<u32> },
}

impl Default for Keys {
    fn default() -> Self {
        Keys::Flat(Vec::new())
    }
}

/// One n-gram's ids in word order, held by value (a key of linked tables is assembled from
/// several orders).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    ids: [u32; MAX_ORDER],
    len: usize,
}

impl std::ops::Deref for Key {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.ids[..self.len]
    }
}

impl Keys {
    /// The first word of entry `i` (of an order of `n`-word keys).
    pub fn first_word(&self, n: usize, i: usize) -> u32 {
        match self {
            Keys::Flat(k) => k[i * n],
            Keys::Linked { first, .. } => first[i],
        }
    }
}

impl Key {
    /// The key of entry `i` of order `n`, where `level(k)` gives order k's keys.
    pub fn of<'a>(n: usize, i: usize, level: impl Fn(usize) -> &'a Keys) -> Key {
        match level(n) {
            Keys::Flat(k) => {
                let mut key = Key {
                    ids: [0; MAX_ORDER],
                    len: n,
                };
                key.ids[..n].copy_from_slice(&k[i * n..(i + 1) * n]);
                key
            }
            Keys::Linked { .. } => Key::linked(n, i, |m| match level(m) {
                Keys::Linked { first, suffix } => (first, suffix),
                Keys::Flat(_) => panic!("linked keys of order {n} above flat ones"),
            }),
        }
    }

    /// The key of entry `i` of order `n` of linked tables, where `level(k)` gives order k's first
    /// words and suffix links: the entry's first word, then its suffix's key.
    pub fn linked<'a>(n: usize, i: usize, level: impl Fn(usize) -> (&'a [u32], &'a [u32])) -> Key {
        let mut key = Key {
            ids: [0; MAX_ORDER],
            len: n,
        };
        let mut at = i;
        for (j, slot) in key.ids[..n].iter_mut().enumerate() {
            let (first, suffix) = level(n - j);
            *slot = first[at];
            if j + 1 < n {
                at = suffix[at] as usize;
            }
        }
        key
    }
}

/// The log10 back-off weights of an order's n-grams, 4 bytes each (an `Option<f32>` takes 8):
/// `None` (the n-gram is never a context) is kept as a NaN bit pattern that no weight has. An
/// order without any weight (the highest) keeps only its length.
#[derive(Clone, Debug, Default)]
pub struct Backoffs(Repr);

#[derive(Clone, Debug)]
enum Repr {
    Each(Vec<u32>),
    None(usize),
}

impl Default for Repr {
    fn default() -> Self {
        Repr::Each(Vec::new())
    }
}

impl PartialEq for Backoffs {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

/// The bits of a missing back-off weight.
const NO_BACKOFF: u32 = u32::MAX;

/// How a back-off weight (or its absence) is stored.
pub(crate) fn backoff_bits(b: Option<f32>) -> u32 {
    b.map_or(NO_BACKOFF, f32::to_bits)
}

/// The back-off weight (or its absence) stored as `bits` by [`backoff_bits`].
pub(crate) fn backoff_of_bits(bits: u32) -> Option<f32> {
    (bits != NO_BACKOFF).then(|| f32::from_bits(bits))
}

impl Backoffs {
    /// `len` n-grams, none of them a context.
    pub fn none(len: usize) -> Self {
        Backoffs(Repr::None(len))
    }

    /// From weights as [`backoff_bits`] stores them.
    pub(crate) fn from_bits(bits: Vec<u32>) -> Self {
        Backoffs(Repr::Each(bits))
    }

    pub fn get(&self, i: usize) -> Option<f32> {
        match &self.0 {
            Repr::Each(v) => backoff_of_bits(v[i]),
            Repr::None(len) => {
                assert!(i < *len, "back-off {i} of {len}");
                None
            }
        }
    }

    pub fn push(&mut self, b: Option<f32>) {
        match (&mut self.0, b) {
            (Repr::None(len), None) => *len += 1,
            (Repr::None(len), Some(_)) => {
                let mut v = vec![NO_BACKOFF; *len];
                v.push(backoff_bits(b));
                self.0 = Repr::Each(v);
            }
            (Repr::Each(v), _) => v.push(backoff_bits(b)),
        }
    }

    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::Each(v) => v.len(),
            Repr::None(len) => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = Option<f32>> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }
}

impl FromIterator<Option<f32>> for Backoffs {
    fn from_iter<I: IntoIterator<Item = Option<f32>>>(it: I) -> Self {
        Backoffs::from_bits(it.into_iter().map(backoff_bits).collect())
    }
}

impl OrderEntries {
    pub fn len(&self) -> usize {
        self.log10_prob.len()
    }

    pub fn is_empty(&self) -> bool {
        self.log10_prob.is_empty()
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

    /// The key of entry `i` of order `n`.
    pub fn key(&self, n: usize, i: usize) -> Key {
        Key::of(n, i, |k| &self.orders[k - 1].keys)
    }

    pub fn id_of(&self, word: &str) -> Option<u32> {
        self.vocab.iter().position(|w| w == word).map(|i| i as u32)
    }
}
