//! The trie layout of a `.lmkb` model (KenLM's `trie` structure, with optional quantization): the
//! n-grams of each order are stored in suffix order — an n-gram `w1 … wn` is a child of its suffix
//! `w2 … wn` and is keyed by its first word — so scoring `w` after a history walks from the unigram
//! `w` to ever longer n-grams ending in `w`, one binary search among siblings per step.
//!
//! Each order is one bit-packed array (entries of equal width, read with unaligned 64-bit loads):
//! ```text
//! order 1:      prob | back-off | first child        (indexed by word id; f32 values)
//! order 1<n<N:  word | prob | back-off | first child  (grouped by parent, sorted by word)
//! order N:      word | prob
//! ```
//! Orders below N hold one extra entry at the end whose first-child field closes the last range.
//! With quantization (`bits` = q) the probabilities and back-offs of orders ≥ 2 are q-bit codes
//! into per-order tables of centres (equal-population bins over the sorted values, each centre the
//! mean of its bin, as KenLM's `build_binary -q`); back-off 0 has its own exact code, since most
//! n-grams that are never contexts carry it.
//!
//! With pointer compression (`pointer_bits` = a > 0, as KenLM's `build_binary -a`), an order's
//! first-child pointers, which never decrease from entry to entry, keep only their low bits in the
//! entries; their `chop` high bits (at most a, as many as make the order smallest) come from a
//! table after the order's bits: `offsets[h]` (u64) is the first entry whose pointer's high bits
//! are at least h, so an entry's high bits are the number of table values after the first that
//! are at most its index.

use crate::error::{NgramError, Result};
use crate::tables::{Keys, NgramTables};
use std::borrow::Cow;
use std::path::Path;

/// How many bits hold values `0..=max`.
pub(crate) fn bits_for(max: u64) -> u32 {
    (64 - max.leading_zeros()).max(1)
}

/// Field widths of one order's entries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Widths {
    pub word: u32,
    pub prob: u32,
    pub backoff: u32,
    /// Bits of the first-child pointer stored in the entry (its low bits).
    pub child: u32,
    /// High bits of the first-child pointer kept in the order's offset table (0: none).
    pub chop: u32,
}

impl Widths {
    pub fn total(&self) -> u32 {
        self.word + self.prob + self.backoff + self.child
    }
}

/// The most pointer bits an offset table may hold (a table of 2^32 u64 would be 32 GiB).
pub const MAX_POINTER_BITS: u32 = 32;

/// How many high bits of `pointer`-bit pointers in `entries` entries go to an offset table of at
/// most `max` bits: the number that makes entries and table smallest (ties: fewer).
fn best_chop(entries: u64, pointer: u32, max: u32) -> u32 {
    let size = |k: u32| {
        let table = if k == 0 { 0 } else { 64u128 << k };
        u128::from(entries) * u128::from(pointer - k) + table
    };
    (0..=pointer.min(max).min(MAX_POINTER_BITS))
        .min_by_key(|&k| (size(k), k))
        .unwrap_or(0)
}

/// Widths of every order of a model with `counts` n-grams per order, `vocab` words,
/// `bits`-bit quantization (0: f32 values) and pointer tables of at most `pointer_bits` bits
/// (0: none).
pub(crate) fn widths(counts: &[u64], vocab: u64, bits: u32, pointer_bits: u32) -> Vec<Widths> {
    let order = counts.len();
    (0..order)
        .map(|i| {
            let value = if i == 0 || bits == 0 { 32 } else { bits };
            let last = i + 1 == order;
            let pointer = if last { 0 } else { bits_for(counts[i + 1]) };
            let chop = best_chop(entries(counts, i), pointer, pointer_bits);
            Widths {
                word: if i == 0 {
                    0
                } else {
                    bits_for(vocab.saturating_sub(1))
                },
                prob: value,
                backoff: if last { 0 } else { value },
                child: pointer - chop,
                chop,
            }
        })
        .collect()
}

/// Entries stored for order `i + 1` (one more than its n-grams below the highest order).
pub(crate) fn entries(counts: &[u64], i: usize) -> u64 {
    counts[i] + u64::from(i + 1 < counts.len())
}

/// Byte length of the entries of order `i + 1`'s section: their bits rounded up, plus 8 bytes so
/// that a 64-bit load at any entry stays inside the section, rounded to 8 (where its pointer
/// table begins).
fn entries_len(counts: &[u64], i: usize, w: &Widths) -> Option<usize> {
    let bits = entries(counts, i).checked_mul(u64::from(w.total()))?;
    let bytes = usize::try_from(bits.div_ceil(8)).ok()?.checked_add(8)?;
    Some(crate::binary::align8(bytes))
}

/// Byte length of each order's section: its entries, then its pointer table (2^chop u64).
pub(crate) fn section_lens(
    counts: &[u64],
    vocab: u64,
    bits: u32,
    pointer_bits: u32,
) -> Option<Vec<usize>> {
    widths(counts, vocab, bits, pointer_bits)
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let table = if w.chop == 0 { 0 } else { 8usize << w.chop };
            entries_len(counts, i, w)?.checked_add(table)
        })
        .collect()
}

/// Byte length of the quantization tables: for orders 2..=N a table of 2^bits prob centres, and
/// for orders 2..N one of back-off centres.
pub(crate) fn quant_len(order: usize, bits: u32) -> usize {
    if bits == 0 || order < 2 {
        return 0;
    }
    let tables = (order - 1) + (order - 2);
    tables * (4usize << bits)
}

/// Reads `width` (≤ 57) bits at bit offset `at` of `bytes`; 0 past the end (a damaged file
/// gives wrong values, never a panic).
#[inline]
pub(crate) fn get_bits(bytes: &[u8], at: u64, width: u32) -> u64 {
    let byte = (at / 8) as usize;
    let Some(chunk) = bytes.get(byte..byte + 8) else {
        return 0;
    };
    let v = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
    (v >> (at % 8)) & ((1u64 << width) - 1)
}

fn put_bits(bytes: &mut [u8], at: u64, width: u32, value: u64) {
    let byte = (at / 8) as usize;
    let shift = at % 8;
    let mut v = u64::from_le_bytes(bytes[byte..byte + 8].try_into().expect("8 bytes"));
    let mask = ((1u64 << width) - 1) << shift;
    v = (v & !mask) | ((value << shift) & mask);
    bytes[byte..byte + 8].copy_from_slice(&v.to_le_bytes());
}

/// Centres of `2^bits` equal-population bins over `values`; with `zero_code`, code 0 is exactly
/// 0.0 and the other codes share the non-zero values.
fn centres(values: impl Iterator<Item = f32>, bits: u32, zero_code: bool) -> Vec<f32> {
    let codes = 1usize << bits;
    let mut out = Vec::with_capacity(codes);
    if zero_code {
        out.push(0.0);
    }
    let mut vals: Vec<f32> = values.filter(|&v| !(zero_code && v == 0.0)).collect();
    vals.sort_by(f32::total_cmp);
    let bins = codes - out.len();
    for b in 0..bins {
        let (lo, hi) = (b * vals.len() / bins, (b + 1) * vals.len() / bins);
        let c = if lo < hi {
            (vals[lo..hi].iter().map(|&v| f64::from(v)).sum::<f64>() / (hi - lo) as f64) as f32
        } else {
            // Fewer values than bins: repeat the last centre (never chosen over an equal one).
            out.last().copied().unwrap_or(0.0)
        };
        out.push(c);
    }
    out
}

/// The `width`-bit field that stores `v`: its f32 bits (width 32) or the code of the nearest
/// centre in `table`.
fn encode(v: f32, width: u32, table: &[f32], zero_code: bool) -> u64 {
    if width == 32 {
        u64::from(v.to_bits())
    } else {
        nearest(table, v, zero_code)
    }
}

/// The code of the centre nearest to `v` (`table` as [`centres`] made it: sorted after an
/// optional leading exact 0).
fn nearest(table: &[f32], v: f32, zero_code: bool) -> u64 {
    if zero_code && v == 0.0 {
        return 0;
    }
    let start = usize::from(zero_code);
    let t = &table[start..];
    let i = t.partition_point(|&c| c < v);
    let best = if i == 0 {
        0
    } else if i == t.len() || (v - t[i - 1]) <= (t[i] - v) {
        i - 1
    } else {
        i
    };
    (start + best) as u64
}

/// The indices of a table's entries sorted by their keys read backwards (last word first): the
/// order the entries take in the trie (linked keys are in it already).
fn reversed_order(keys: &Keys, n: usize, len: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..len as u32).collect();
    if let Keys::Flat(keys) = keys {
        let key = |i: u32| keys[i as usize * n..(i as usize + 1) * n].iter().rev();
        idx.sort_unstable_by(|&a, &b| key(a).cmp(key(b)));
    }
    idx
}

/// The quantization tables and the order sections of `tables` (see the module docs; each section
/// as long as [`section_lens`] says), or an error naming `path` and an n-gram whose suffix is
/// missing (a trie needs every suffix, as KenLM's does).
pub(crate) fn build_sections(
    tables: &NgramTables,
    bits: u32,
    pointer_bits: u32,
    path: &Path,
) -> Result<(Vec<u8>, Vec<Vec<u8>>)> {
    let order = tables.order();
    let counts: Vec<u64> = tables.orders.iter().map(|o| o.len() as u64).collect();
    let vocab = tables.vocab.len() as u64;
    let w = widths(&counts, vocab, bits, pointer_bits);
    let lens = section_lens(&counts, vocab, bits, pointer_bits).expect("in-memory sizes fit");
    let bad = |msg: String| NgramError::Binary {
        path: path.to_path_buf(),
        msg,
    };
    if counts[0] != vocab {
        return Err(bad(format!(
            "{} unigrams for {} vocabulary words: a trie needs one unigram per word",
            counts[0], vocab
        )));
    }

    // Quantization tables.
    let mut quant = Vec::with_capacity(quant_len(order, bits));
    let mut prob_tables: Vec<Vec<f32>> = vec![Vec::new(); order];
    let mut backoff_tables: Vec<Vec<f32>> = vec![Vec::new(); order];
    if bits > 0 && order >= 2 {
        for (t, o) in prob_tables.iter_mut().zip(&tables.orders).skip(1) {
            *t = centres(o.log10_prob.iter().copied(), bits, false);
        }
        for (t, o) in backoff_tables
            .iter_mut()
            .zip(&tables.orders)
            .take(order - 1)
            .skip(1)
        {
            *t = centres(o.log10_backoff.iter().map(|b| b.unwrap_or(0.0)), bits, true);
        }
        for t in prob_tables[1..].iter().chain(&backoff_tables[1..order - 1]) {
            t.iter()
                .for_each(|c| quant.extend_from_slice(&c.to_le_bytes()));
        }
    }

    // Entry order per level, and each entry's rank by its reversed key.
    let perms: Vec<Vec<u32>> = tables
        .orders
        .iter()
        .map(|o| reversed_order(&o.keys, o.n, o.len()))
        .collect();
    let mut sections = Vec::with_capacity(order);
    // parent_rank[i][r]: the rank in level i-1 of the parent (suffix) of level i's entry r.
    let mut parent_rank: Vec<Cow<[u32]>> = vec![Cow::Borrowed(&[]); order];
    for i in 1..order {
        let (o, lower) = (&tables.orders[i], &tables.orders[i - 1]);
        let lower_perm = &perms[i - 1];
        let n = i + 1;
        let (keys, lower_keys) = match (&o.keys, &lower.keys) {
            // Both orders are in trie order: the suffix links are the ranks.
            (Keys::Linked { suffix, .. }, _) => {
                parent_rank[i] = Cow::Borrowed(suffix);
                continue;
            }
            (Keys::Flat(k), Keys::Flat(l)) => (k, l),
            (Keys::Flat(_), Keys::Linked { .. }) => {
                unreachable!("flat {n}-grams above linked ones")
            }
        };
        let mut ranks = Vec::with_capacity(o.len());
        for &e in &perms[i] {
            let key = &keys[e as usize * n..(e as usize + 1) * n];
            let suffix = &key[1..];
            let found = lower_perm.binary_search_by(|&j| {
                lower_keys[j as usize * (n - 1)..(j as usize + 1) * (n - 1)]
                    .iter()
                    .rev()
                    .cmp(suffix.iter().rev())
            });
            match found {
                Ok(r) => ranks.push(r as u32),
                Err(_) => {
                    let words: Vec<&str> = key
                        .iter()
                        .map(|&w| tables.vocab.get(w as usize).map_or("?", |s| s.as_str()))
                        .collect();
                    return Err(bad(format!(
                        "the {n}-gram \"{}\" has no stored suffix \"{}\"",
                        words.join(" "),
                        words[1..].join(" ")
                    )));
                }
            }
        }
        parent_rank[i] = Cow::Owned(ranks);
    }
    for i in 0..order {
        let o = &tables.orders[i];
        let wi = w[i];
        let mut sec = vec![0u8; lens[i]];
        let entry_bits = u64::from(wi.total());
        // Children of entry r of this level: [first[r], first[r + 1]) in level i + 1.
        let first: Vec<u64> = if i + 1 < order {
            let mut first = vec![0u64; o.len() + 1];
            for &p in parent_rank[i + 1].iter() {
                first[p as usize + 1] += 1;
            }
            for r in 0..o.len() {
                first[r + 1] += first[r];
            }
            first
        } else {
            Vec::new()
        };
        for (r, &e) in perms[i].iter().enumerate() {
            let e = e as usize;
            let mut at = r as u64 * entry_bits;
            if wi.word > 0 {
                put_bits(&mut sec, at, wi.word, u64::from(o.keys.first_word(o.n, e)));
                at += u64::from(wi.word);
            }
            let code = encode(o.log10_prob[e], wi.prob, &prob_tables[i], false);
            put_bits(&mut sec, at, wi.prob, code);
            at += u64::from(wi.prob);
            if wi.backoff > 0 {
                let b = o.log10_backoff.get(e).unwrap_or(0.0);
                let code = encode(b, wi.backoff, &backoff_tables[i], true);
                put_bits(&mut sec, at, wi.backoff, code);
                at += u64::from(wi.backoff);
            }
            if wi.child > 0 {
                put_bits(&mut sec, at, wi.child, first[r]);
            }
        }
        if wi.child > 0 {
            // The closing entry: only its first-child field is read.
            let at = o.len() as u64 * entry_bits + u64::from(wi.word + wi.prob + wi.backoff);
            put_bits(&mut sec, at, wi.child, first[o.len()]);
        }
        if wi.chop > 0 {
            // offsets[h]: the first entry whose pointer's high bits are at least h (the entry
            // count past the last one that has them).
            let table_at = entries_len(&counts, i, &wi).expect("in-memory sizes fit");
            let mut r = 0usize;
            for h in 0..1u64 << wi.chop {
                while r < first.len() && first[r] >> wi.child < h {
                    r += 1;
                }
                let at = table_at + 8 * h as usize;
                sec[at..at + 8].copy_from_slice(&(r as u64).to_le_bytes());
            }
        }
        sections.push(sec);
    }
    Ok((quant, sections))
}

/// Read access to a trie image's sections.
pub(crate) struct TrieView {
    pub widths: Vec<Widths>,
    /// Byte offset in each order's section of its pointer table.
    pointer_tables: Vec<usize>,
    pub counts: Vec<u64>,
    /// Byte offset of each order's section.
    pub sections: Vec<usize>,
    pub section_lens: Vec<usize>,
    /// Byte offsets of each order's prob / back-off centre tables (orders ≥ 2 when quantized).
    pub prob_table: Vec<Option<usize>>,
    pub backoff_table: Vec<Option<usize>>,
}

impl TrieView {
    /// `sections` and `section_lens`: each order's section offset and length, as the header
    /// gave and checked them.
    pub fn new(
        counts: &[u64],
        vocab: u64,
        (bits, pointer_bits): (u32, u32),
        quant_at: usize,
        sections: Vec<usize>,
        section_lens: Vec<usize>,
    ) -> Self {
        let order = counts.len();
        let widths = widths(counts, vocab, bits, pointer_bits);
        let pointer_tables = widths
            .iter()
            .enumerate()
            .map(|(i, w)| entries_len(counts, i, w).unwrap_or(0))
            .collect();
        let mut prob_table = vec![None; order];
        let mut backoff_table = vec![None; order];
        if bits > 0 {
            let size = 4usize << bits;
            let mut at = quant_at;
            for t in prob_table.iter_mut().skip(1) {
                *t = Some(at);
                at += size;
            }
            for t in backoff_table
                .iter_mut()
                .take(order.saturating_sub(1))
                .skip(1)
            {
                *t = Some(at);
                at += size;
            }
        }
        TrieView {
            widths,
            pointer_tables,
            counts: counts.to_vec(),
            section_lens,
            sections,
            prob_table,
            backoff_table,
        }
    }

    fn section<'a>(&self, data: &'a [u8], i: usize) -> &'a [u8] {
        data.get(self.sections[i]..self.sections[i] + self.section_lens[i])
            .unwrap_or(&[])
    }

    fn value(&self, data: &[u8], table: Option<usize>, code: u64) -> f32 {
        match table {
            None => f32::from_bits(code as u32),
            Some(t) => {
                let at = t + 4 * code as usize;
                data.get(at..at + 4)
                    .map_or(0.0, |b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            }
        }
    }

    /// (log10 prob, log10 back-off) of entry `r` of order `i + 1`.
    #[inline]
    pub fn values(&self, data: &[u8], i: usize, r: u64) -> (f32, f32) {
        let w = self.widths[i];
        let sec = self.section(data, i);
        let at = r * u64::from(w.total()) + u64::from(w.word);
        let p = self.value(data, self.prob_table[i], get_bits(sec, at, w.prob));
        let b = if w.backoff > 0 {
            let at = at + u64::from(w.prob);
            self.value(data, self.backoff_table[i], get_bits(sec, at, w.backoff))
        } else {
            0.0
        };
        (p, b)
    }

    /// The range of the children (in order `i + 2`) of entry `r` of order `i + 1`: read only
    /// when a walk goes on from the entry (with compressed pointers, reading one takes a search).
    #[inline]
    pub fn children(&self, data: &[u8], i: usize, r: u64) -> (u64, u64) {
        let w = self.widths[i];
        if w.child + w.chop == 0 {
            return (0, 0);
        }
        let sec = self.section(data, i);
        let at = r * u64::from(w.total()) + u64::from(w.word + w.prob + w.backoff);
        let next = at + u64::from(w.total());
        let mut lo = get_bits(sec, at, w.child);
        let mut hi = get_bits(sec, next, w.child);
        if w.chop > 0 {
            let (h_lo, h_hi) = self.high_bits(sec, i, r);
            lo |= h_lo << w.child;
            hi |= h_hi << w.child;
        }
        // A damaged file must not send a search out of the next section.
        let max = self.counts.get(i + 1).copied().unwrap_or(0);
        (lo.min(hi).min(max), hi.min(max))
    }

    /// The high bits of the first-child pointers of entries `r` and `r + 1` of order `i + 1`,
    /// from its pointer table in `sec`.
    #[inline]
    fn high_bits(&self, sec: &[u8], i: usize, r: u64) -> (u64, u64) {
        let len = 1u64 << self.widths[i].chop;
        let at = self.pointer_tables[i];
        let Some(table) = sec.get(at..at + 8 * len as usize) else {
            return (0, 0); // a damaged file
        };
        let offset = |h: u64| {
            let at = 8 * h as usize;
            u64::from_le_bytes(table[at..at + 8].try_into().expect("8 bytes"))
        };
        // The largest h in `lo..=hi` whose table value is at most `x` (`lo`'s is; the table's
        // first value is 0).
        let search = |x: u64, mut lo: u64, mut hi: u64| {
            while lo < hi {
                let mid = lo + (hi - lo).div_ceil(2);
                if offset(mid) <= x {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            lo
        };
        let h = search(r, 0, len - 1);
        // The next entry has the same high bits unless the next table value is its index.
        let h_next = if h + 1 < len && offset(h + 1) <= r + 1 {
            search(r + 1, h + 1, len - 1)
        } else {
            h
        };
        (h, h_next)
    }

    /// The index in order `i + 1` (i ≥ 1) of the child keyed by `word` within `range`.
    #[inline]
    pub fn find(&self, data: &[u8], i: usize, range: (u64, u64), word: u32) -> Option<u64> {
        let w = self.widths[i];
        let sec = self.section(data, i);
        let stride = u64::from(w.total());
        let (mut lo, mut hi) = range;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let k = get_bits(sec, mid * stride, w.word);
            match k.cmp(&u64::from(word)) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_round_trip_at_every_offset() {
        let mut buf = vec![0u8; 64];
        for (k, at) in (0..300).step_by(7).enumerate() {
            let width = 1 + (k as u32 % 33);
            let v = (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(k as u64 + 1)) & ((1 << width) - 1);
            put_bits(&mut buf, at, width, v);
            assert_eq!(get_bits(&buf, at, width), v, "at {at}, width {width}");
        }
        assert_eq!(get_bits(&buf, 8 * 60, 8), 0); // past the end: 0, no panic
    }

    #[test]
    fn quantization_keeps_zero_exact_and_picks_the_nearest_centre() {
        let v: Vec<f32> = (0..1000).map(|i| -(i as f32) / 100.0).collect();
        let t = centres(v.iter().copied(), 4, true);
        assert_eq!((t.len(), t[0]), (16, 0.0));
        assert_eq!(nearest(&t, 0.0, true), 0);
        for x in [-0.01f32, -3.3, -9.99] {
            let c = nearest(&t, x, true) as usize;
            let best = t[1..]
                .iter()
                .map(|&c| (c - x).abs())
                .fold(f32::INFINITY, f32::min);
            assert_eq!((t[c] - x).abs(), best);
        }
    }
}
