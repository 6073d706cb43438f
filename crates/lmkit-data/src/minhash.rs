//! MinHash signatures (Broder 1997) and banded locality-sensitive hashing for near-duplicate
//! detection (Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3.4).
//!
//! Two documents become candidates when any band of `rows` signature values agrees, which happens
//! with probability 1 - (1 - J^rows)^bands for Jaccard similarity J; candidates are then confirmed by
//! the share of equal signature values (an unbiased estimate of J) against the threshold.

use lmkit_core::rng::{Random, SplitMix64};
use rustc_hash::FxHashMap;
use xxhash_rust::xxh3::xxh3_64_with_seed;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shingle {
    /// Character n-grams (work for any script, Korean included).
    #[default]
    Chars,
    /// Word n-grams.
    Words,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct MinHashOptions {
    pub shingle: Shingle,
    pub shingle_size: usize,
    pub num_perm: usize,
    /// Jaccard similarity at or above which a document is a near duplicate.
    pub threshold: f64,
    pub seed: u64,
}

impl Default for MinHashOptions {
    fn default() -> Self {
        MinHashOptions {
            shingle: Shingle::Chars,
            shingle_size: 5,
            num_perm: 128,
            threshold: 0.8,
            seed: 1,
        }
    }
}

pub struct MinHasher {
    opts: MinHashOptions,
    a: Vec<u64>,
    b: Vec<u64>,
}

impl MinHasher {
    pub fn new(opts: MinHashOptions) -> Self {
        let mut rng = SplitMix64::new(opts.seed);
        // Multiply-add-shift hashing (Dietzfelbinger 1996): h(x) = (a·x + b mod 2^64) >> 32, a odd.
        let a = (0..opts.num_perm).map(|_| rng.next_u64() | 1).collect();
        let b = (0..opts.num_perm).map(|_| rng.next_u64()).collect();
        MinHasher { opts, a, b }
    }

    pub fn options(&self) -> &MinHashOptions {
        &self.opts
    }

    /// The shingle hashes of `text` (a text shorter than one shingle is one shingle).
    fn shingles(&self, text: &str, mut f: impl FnMut(u64)) {
        let k = self.opts.shingle_size.max(1);
        let seed = self.opts.seed;
        match self.opts.shingle {
            Shingle::Chars => {
                let starts: Vec<usize> = text
                    .char_indices()
                    .map(|(i, _)| i)
                    .chain([text.len()])
                    .collect();
                let n = starts.len() - 1;
                if n <= k {
                    f(xxh3_64_with_seed(text.as_bytes(), seed));
                    return;
                }
                for i in 0..=n - k {
                    f(xxh3_64_with_seed(
                        &text.as_bytes()[starts[i]..starts[i + k]],
                        seed,
                    ));
                }
            }
            Shingle::Words => {
                let words: Vec<&str> = text.split_whitespace().collect();
                if words.len() <= k {
                    f(xxh3_64_with_seed(words.join(" ").as_bytes(), seed));
                    return;
                }
                for w in words.windows(k) {
                    f(xxh3_64_with_seed(w.join(" ").as_bytes(), seed));
                }
            }
        }
    }

    /// The MinHash signature of `text`: for each permutation, the minimum hash over its shingles.
    pub fn signature(&self, text: &str) -> Vec<u32> {
        let mut sig = vec![u32::MAX; self.opts.num_perm];
        self.shingles(text, |x| {
            // Branch-free so that the loop vectorizes.
            for ((s, &a), &b) in sig.iter_mut().zip(&self.a).zip(&self.b) {
                *s = (*s).min((a.wrapping_mul(x).wrapping_add(b) >> 32) as u32);
            }
        });
        sig
    }
}

/// Share of equal positions: the MinHash estimate of Jaccard similarity.
pub fn estimate_jaccard(a: &[u32], b: &[u32]) -> f64 {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / a.len().max(1) as f64
}

/// Bands × rows (bands·rows ≤ num_perm) whose S-curve 1-(1-J^r)^b crosses 1/2 nearest the threshold.
pub fn lsh_params(num_perm: usize, threshold: f64) -> (usize, usize) {
    let mut best = (1, num_perm.max(1));
    let mut best_err = f64::MAX;
    for rows in 1..=num_perm.max(1) {
        let bands = num_perm / rows;
        if bands == 0 {
            break;
        }
        // J at which the candidate probability is 1/2.
        let half = (1.0 - 0.5f64.powf(1.0 / bands as f64)).powf(1.0 / rows as f64);
        // Aim a little below the threshold so that true duplicates are rarely missed.
        let err = (half - (threshold - 0.05)).abs();
        if err < best_err {
            best_err = err;
            best = (bands, rows);
        }
    }
    best
}

/// Bytes of a bucket map's slot (key, id list, control byte) and of an id list's allocation
/// (the allocator's smallest chunk).
const BUCKET_SLOT_BYTES: usize = 33;
const ID_LIST_BYTES: usize = 32;

/// Near-duplicate index over kept documents. Kept documents are numbered in the order they were
/// kept; with [`LshIndex::spill_to`] the index can move what it holds to sorted runs on disk
/// ([`crate::spill`]) and keep answering exactly as it would from memory.
pub struct LshIndex {
    bands: usize,
    rows: usize,
    threshold: f64,
    buckets: Vec<FxHashMap<u64, Vec<u32>>>,
    /// Signatures of the documents in memory (ids from `base`).
    signatures: Vec<u32>,
    num_perm: usize,
    /// Documents whose keys and signatures are on disk (ids `0..base`).
    base: u32,
    disk: Option<DiskIndex>,
}

struct DiskIndex {
    /// (band key u64, band u16, id u32) big-endian, looked up by key and band.
    keys: crate::spill::Runs,
    signatures: crate::spill::Blocks,
}

const KEY_RECORD: usize = 14;

fn key_prefix(key: u64, band: usize) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[..8].copy_from_slice(&key.to_be_bytes());
    k[8..].copy_from_slice(&(band as u16).to_be_bytes());
    k
}

impl LshIndex {
    pub fn new(num_perm: usize, threshold: f64) -> Self {
        let (bands, rows) = lsh_params(num_perm, threshold);
        LshIndex {
            bands,
            rows,
            threshold,
            buckets: vec![FxHashMap::default(); bands],
            signatures: Vec::new(),
            num_perm,
            base: 0,
            disk: None,
        }
    }

    pub fn bands_rows(&self) -> (usize, usize) {
        (self.bands, self.rows)
    }

    fn band_key(&self, sig: &[u32], band: usize) -> u64 {
        let part = &sig[band * self.rows..(band + 1) * self.rows];
        let bytes: Vec<u8> = part.iter().flat_map(|v| v.to_le_bytes()).collect();
        xxh3_64_with_seed(&bytes, band as u64)
    }

    /// Estimated bytes the part held in memory takes from the allocator. Until the first spill:
    /// what is allocated, twice over, because each buffer that grew by doubling left its smaller
    /// predecessors behind (the allocator keeps them for reuse rather than returning them). A
    /// spill keeps the buffers; from then on what is used is counted (twice, as before), so the
    /// buffers fill to what the first round allocated and do not grow again.
    pub fn memory_bytes(&self) -> usize {
        let slot = BUCKET_SLOT_BYTES * 8 / 7;
        let maps: usize = self
            .buckets
            .iter()
            .map(|m| {
                let slots = crate::spill::counted(self.disk.is_some(), m.capacity(), m.len());
                slots * slot + m.len() * ID_LIST_BYTES
            })
            .sum();
        let sigs = crate::spill::counted(
            self.disk.is_some(),
            self.signatures.capacity(),
            self.signatures.len(),
        );
        2 * (sigs * 4 + maps)
    }

    /// Moves everything in memory to sorted runs under `dir`.
    pub fn spill_to(&mut self, dir: &std::path::Path) -> crate::Result<()> {
        let row = self.num_perm * 4;
        let disk = self.disk.get_or_insert_with(|| DiskIndex {
            keys: crate::spill::Runs::new(dir, "lsh", KEY_RECORD, 10),
            signatures: crate::spill::Blocks::new(dir, "signatures", row),
        });
        let mut recs: Vec<(u64, u16, u32)> = Vec::new();
        for (band, map) in self.buckets.iter_mut().enumerate() {
            for (key, ids) in map.drain() {
                recs.extend(ids.into_iter().map(|id| (key, band as u16, id)));
            }
        }
        recs.sort_unstable();
        let mut bytes = Vec::with_capacity(recs.len() * KEY_RECORD);
        for (key, band, id) in recs {
            bytes.extend_from_slice(&key.to_be_bytes());
            bytes.extend_from_slice(&band.to_be_bytes());
            bytes.extend_from_slice(&id.to_be_bytes());
        }
        disk.keys.add(&bytes)?;
        let sigs: Vec<u8> = self
            .signatures
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        disk.signatures.add(&sigs)?;
        self.base += (self.signatures.len() / self.num_perm) as u32;
        self.signatures.clear();
        Ok(())
    }

    /// The signature of kept document `id`.
    fn signature_of(&self, id: u32) -> std::borrow::Cow<'_, [u32]> {
        if id >= self.base {
            let at = (id - self.base) as usize * self.num_perm;
            return std::borrow::Cow::Borrowed(&self.signatures[at..at + self.num_perm]);
        }
        let row = self
            .disk
            .as_ref()
            .expect("ids below base are on disk")
            .signatures
            .get(id as usize);
        std::borrow::Cow::Owned(
            row.chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        )
    }

    /// The indexed document that `sig` duplicates most closely (id, estimated Jaccard; the lowest
    /// id among equals), if any reaches the threshold.
    pub fn query(&self, sig: &[u32]) -> Option<(u32, f64)> {
        self.query_keys(sig, &self.keys(sig))
    }

    fn keys(&self, sig: &[u32]) -> Vec<u64> {
        (0..self.bands).map(|b| self.band_key(sig, b)).collect()
    }

    fn query_keys(&self, sig: &[u32], keys: &[u64]) -> Option<(u32, f64)> {
        let mut best: Option<(u32, f64)> = None;
        let mut consider = |id: u32, j: f64| {
            if j >= self.threshold && best.is_none_or(|(bid, bj)| j > bj || (j == bj && id < bid)) {
                best = Some((id, j));
            }
        };
        for (b, key) in keys.iter().enumerate() {
            if let Some(disk) = &self.disk {
                disk.keys.find(&key_prefix(*key, b), |rec| {
                    let id = u32::from_be_bytes(rec[10..14].try_into().unwrap());
                    consider(id, estimate_jaccard(sig, &self.signature_of(id)));
                });
            }
            if let Some(ids) = self.buckets[b].get(key) {
                for &id in ids {
                    consider(id, estimate_jaccard(sig, &self.signature_of(id)));
                }
            }
        }
        best
    }

    /// The indexed document that `sig` duplicates (as [`LshIndex::query`]); otherwise `sig` is
    /// indexed as a new document and `None` is returned.
    pub fn query_or_insert(&mut self, sig: &[u32]) -> Option<(u32, f64)> {
        let keys = self.keys(sig);
        if let Some(found) = self.query_keys(sig, &keys) {
            return Some(found);
        }
        let id = self.base + (self.signatures.len() / self.num_perm) as u32;
        self.signatures.extend_from_slice(sig);
        for (b, key) in keys.into_iter().enumerate() {
            self.buckets[b].entry(key).or_default().push(id);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jaccard_exact(a: &str, b: &str, k: usize) -> f64 {
        let sh = |t: &str| -> std::collections::HashSet<String> {
            let c: Vec<char> = t.chars().collect();
            c.windows(k).map(|w| w.iter().collect()).collect()
        };
        let (x, y) = (sh(a), sh(b));
        x.intersection(&y).count() as f64 / x.union(&y).count() as f64
    }

    #[test]
    fn signature_estimates_jaccard() {
        let m = MinHasher::new(MinHashOptions {
            num_perm: 512,
            ..Default::default()
        });
        let a = "The quick brown fox jumps over the lazy dog near the river bank today.";
        let b = "The quick brown fox jumps over the lazy cat near the river bank today.";
        let c = "Completely different words about Korean tax law and its statutes.";
        let est = estimate_jaccard(&m.signature(a), &m.signature(b));
        let exact = jaccard_exact(a, b, 5);
        assert!(
            (est - exact).abs() < 0.08,
            "estimate {est} vs exact {exact}"
        );
        assert!(estimate_jaccard(&m.signature(a), &m.signature(c)) < 0.1);
        assert_eq!(m.signature(a), m.signature(a));
    }

    #[test]
    fn a_spilled_index_answers_as_the_one_in_memory() {
        let m = MinHasher::new(MinHashOptions::default());
        let texts: Vec<String> =
            (0..600)
                .map(|i| {
                    let base = i % 150; // every text has near copies elsewhere in the list
                    format!(
                    "Document {base} tells of the {} river, the {} hills and the {} road west. {}",
                    base * 7 % 31,
                    base % 11,
                    base * 3 % 17,
                    if i >= 150 { format!("edit {}", i / 150) } else { String::new() }
                )
                })
                .collect();
        let dir = tempfile::tempdir().unwrap();
        let mut mem = LshIndex::new(128, 0.7);
        let mut disk = LshIndex::new(128, 0.7);
        let mut dups = 0;
        for (i, t) in texts.iter().enumerate() {
            let sig = m.signature(t);
            let a = mem.query_or_insert(&sig);
            let b = disk.query_or_insert(&sig);
            assert_eq!(a, b, "document {i}");
            dups += usize::from(a.is_some());
            if i % 37 == 0 {
                disk.spill_to(dir.path()).unwrap();
                assert!(disk.buckets.iter().all(|b| b.is_empty()));
            }
        }
        assert!(dups > 300, "{dups}");
    }

    #[test]
    fn lsh_curve_sits_near_threshold() {
        let (b, r) = lsh_params(128, 0.8);
        assert!(b * r <= 128);
        let p = |j: f64| 1.0 - (1.0 - j.powi(r as i32)).powi(b as i32);
        assert!(p(0.9) > 0.95, "p(0.9) = {}", p(0.9));
        assert!(p(0.5) < 0.05, "p(0.5) = {}", p(0.5));
    }
}
