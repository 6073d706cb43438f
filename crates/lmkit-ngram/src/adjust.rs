//! Kneser-Ney adjusted counts, computed in one streaming pass over the suffix-sorted records.
//!
//! For the highest order, and for n-grams that begin with `<s>` (they cannot be extended to the
//! left), the adjusted count is the raw count. For every other n-gram `g` of a lower order it is the
//! continuation count N1+(• g): the number of distinct words seen right before `g` (Kneser & Ney
//! 1995; Chen & Goodman 1998, §3.5).

use crate::count::NONE;
use crate::tables::Key;
use crate::vocab::{BOS_ID, UNK_ID};

/// Counts of a table's n-grams: 4 bytes each, until one exceeds `u32::MAX` (a raw count in a
/// corpus of billions of tokens) and all become 8 bytes.
#[derive(Clone, Debug)]
pub enum Counts {
    Narrow(Vec<u32>),
    Wide(Vec<u64>),
}

impl Default for Counts {
    fn default() -> Self {
        Counts::Narrow(Vec::new())
    }
}

impl Counts {
    pub fn len(&self) -> usize {
        match self {
            Counts::Narrow(v) => v.len(),
            Counts::Wide(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    pub fn get(&self, i: usize) -> u64 {
        match self {
            Counts::Narrow(v) => v[i] as u64,
            Counts::Wide(v) => v[i],
        }
    }

    pub fn last(&self) -> Option<u64> {
        self.len().checked_sub(1).map(|i| self.get(i))
    }

    pub fn push(&mut self, c: u64) {
        match self {
            Counts::Narrow(v) => match u32::try_from(c) {
                Ok(c) => v.push(c),
                Err(_) => {
                    let mut wide: Vec<u64> = v.iter().map(|&x| x as u64).collect();
                    wide.push(c);
                    *self = Counts::Wide(wide);
                }
            },
            Counts::Wide(v) => v.push(c),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    pub fn to_vec(&self) -> Vec<u64> {
        self.iter().collect()
    }
}

impl From<Vec<u64>> for Counts {
    fn from(v: Vec<u64>) -> Self {
        let mut c = Counts::default();
        v.into_iter().for_each(|x| c.push(x));
        c
    }
}

/// The n-grams of one order with their adjusted counts, in the order the adjusting pass finds
/// them: by their keys read from the last word to the first. Entry i's key is `first[i]` followed
/// by the key of entry `suffix[i]` of the order below (`suffix` is empty for unigrams), so a key
/// takes 8 bytes whatever the order.
#[derive(Clone, Debug, Default)]
pub struct CountTable {
    pub n: usize,
    pub first: Vec<u32>,
    pub suffix: Vec<u32>,
    pub counts: Counts,
    /// How often each n-gram occurs in the text (kept only when asked: pruning needs it).
    pub raw: Counts,
    /// The count the discount statistics take for the table's last entry (see
    /// [`CountTable::count_of_counts`]).
    pub last_in_statistics: Option<u64>,
}

impl CountTable {
    /// How many n-grams have adjusted count 1, 2, 3 and 4 — as lmplz counts them: it takes the
    /// *raw* count for the last n-gram of each lower order in suffix order (the groups still open
    /// when its adjusting pass ends), so this does too; otherwise the discounts of a small corpus
    /// differ from lmplz's by up to ~1e-3 (and by ~1e-7 on a few MB of text).
    pub fn count_of_counts(&self) -> [u64; 4] {
        let mut t = CountOfCounts::default();
        self.counts.iter().for_each(|c| t.add(c));
        if let Some(raw) = self.last_in_statistics {
            t.last_in_statistics(raw);
        }
        t.get()
    }

    pub fn len(&self) -> usize {
        self.first.len()
    }

    pub fn is_empty(&self) -> bool {
        self.first.is_empty()
    }
}

/// How many n-grams of an order have adjusted count 1, 2, 3 and 4, tallied as they come, with
/// lmplz's rule for the order's last n-gram ([`CountTable::count_of_counts`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct CountOfCounts {
    t: [u64; 4],
    last: Option<u64>,
    last_raw: Option<u64>,
}

impl CountOfCounts {
    fn tally(&mut self, c: u64, by: i64) {
        if (1..=4).contains(&c) {
            self.t[c as usize - 1] = self.t[c as usize - 1].wrapping_add_signed(by);
        }
    }

    /// The next n-gram's adjusted count.
    pub fn add(&mut self, c: u64) {
        self.tally(c, 1);
        self.last = Some(c);
    }

    /// The raw count the statistics take for the order's last n-gram instead of its adjusted count.
    pub fn last_in_statistics(&mut self, raw: u64) {
        self.last_raw = Some(raw);
    }

    pub fn get(&self) -> [u64; 4] {
        let mut s = *self;
        if let (Some(raw), Some(last)) = (self.last_raw, self.last) {
            s.tally(last, -1);
            s.tally(raw, 1);
        }
        s.t
    }
}

/// The key (in word order) of entry `i` of order `n` of `tables` (one table per order, from 1).
pub fn key(tables: &[CountTable], n: usize, i: usize) -> Key {
    Key::linked(n, i, |m| (&tables[m - 1].first, &tables[m - 1].suffix))
}

struct Group {
    /// Reversed suffix of the open group (empty when none is open).
    key: Vec<u32>,
    count: u64,
    raw: u64,
    last_ext: u32,
}

/// Where the adjusting pass puts each n-gram it completes.
pub trait Emit {
    /// Order `n`'s next n-gram, in suffix order: its key read backwards (`reversed[..n]`, last
    /// word first), its adjusted count and its raw count.
    fn emit(&mut self, n: usize, reversed: &[u32], count: u64, raw: u64);
    /// Called before order `n`'s last n-gram is emitted, with its raw count: lmplz's discount
    /// statistics take that instead of its adjusted count (see [`CountTable::count_of_counts`]).
    fn last_in_statistics(&mut self, n: usize, raw: u64);
}

/// A [`CountTable`] per order, in memory.
pub struct Tables {
    tables: Vec<CountTable>,
    keep_raw: bool,
}

impl Tables {
    /// Tables for orders 1..=`order`; `keep_raw`: also record each n-gram's raw count.
    pub fn new(order: usize, keep_raw: bool) -> Self {
        let mut tables: Vec<CountTable> = (1..=order)
            .map(|n| CountTable {
                n,
                ..Default::default()
            })
            .collect();
        // <unk> and <s> are unigrams though never predicted (adjusted count 0); they have the
        // lowest ids, so they come first.
        for id in [UNK_ID, BOS_ID] {
            tables[0].first.push(id);
            tables[0].counts.push(0);
            if keep_raw {
                tables[0].raw.push(0);
            }
        }
        Tables { tables, keep_raw }
    }

    pub fn into_tables(self) -> Vec<CountTable> {
        self.tables
    }
}

impl Emit for Tables {
    fn emit(&mut self, n: usize, reversed: &[u32], count: u64, raw: u64) {
        if n > 1 {
            // The suffix is still open (groups close longest first): it is the next entry of
            // the order below.
            let suffix = self.tables[n - 2].len() as u32;
            self.tables[n - 1].suffix.push(suffix);
        }
        let t = &mut self.tables[n - 1];
        t.first.push(reversed[n - 1]);
        t.counts.push(count);
        if self.keep_raw {
            t.raw.push(raw);
        }
    }

    fn last_in_statistics(&mut self, n: usize, raw: u64) {
        self.tables[n - 1].last_in_statistics = Some(raw);
    }
}

impl<E: Emit> crate::count::CountSink for Adjuster<E> {
    fn push(&mut self, rec: &[u32], count: u64) {
        Adjuster::push(self, rec, count)
    }
}

/// Consumes reversed records in sorted order and hands each n-gram of every order, with its
/// adjusted count, to an [`Emit`] (by default, [`Tables`]: a [`CountTable`] per order).
pub struct Adjuster<E: Emit = Tables> {
    order: usize,
    groups: Vec<Group>,
    out: E,
}

impl Adjuster<Tables> {
    /// `keep_raw`: also record each n-gram's raw count ([`CountTable::raw`]).
    pub fn new(order: usize, keep_raw: bool) -> Self {
        Adjuster::with(order, Tables::new(order, keep_raw))
    }

    pub fn finish(self) -> Vec<CountTable> {
        self.finish_into().into_tables()
    }
}

impl<E: Emit> Adjuster<E> {
    pub fn with(order: usize, out: E) -> Self {
        Adjuster {
            order,
            groups: (0..order)
                .map(|_| Group {
                    key: Vec::new(),
                    count: 0,
                    raw: 0,
                    last_ext: NONE,
                })
                .collect(),
            out,
        }
    }

    /// One unique reversed record (last word first, `NONE`-padded) and its raw count. Records
    /// come in sorted order; none ends in `<unk>` or `<s>`.
    pub fn push(&mut self, rec: &[u32], count: u64) {
        let len = rec.iter().position(|&x| x == NONE).unwrap_or(self.order);
        debug_assert!(len > 0 && rec[0] > BOS_ID, "a record ending in {}", rec[0]);
        // The shortest open group this record leaves is complete, and so is every longer one:
        // they are written longest first, so that each one's suffix (the group one shorter) is
        // still open and its index known.
        if let Some(m) = (1..=len).find(|&n| self.groups[n - 1].key.as_slice() != &rec[..n]) {
            for n in (m..=self.order).rev() {
                self.flush(n);
            }
            for n in m..=len {
                self.groups[n - 1].key.extend_from_slice(&rec[..n]);
            }
        }
        // Group i holds the (i + 1)-gram; rec[i + 1] is the word to its left.
        for (i, g) in self.groups[..len].iter_mut().enumerate() {
            g.raw += count;
            if i + 1 == len {
                g.count += count; // highest order, or begins with <s>: raw count
            } else if rec[i + 1] != g.last_ext {
                g.count += 1; // a new distinct left extension
                g.last_ext = rec[i + 1];
            }
        }
    }

    fn flush(&mut self, n: usize) {
        if self.groups[n - 1].key.is_empty() {
            return;
        }
        debug_assert!(
            n == 1 || !self.groups[n - 2].key.is_empty(),
            "a suffix is open"
        );
        let g = &mut self.groups[n - 1];
        self.out.emit(n, &g.key, g.count, g.raw);
        g.key.clear();
        g.count = 0;
        g.raw = 0;
        g.last_ext = NONE;
    }

    /// Completes the groups still open; gives back the emitter.
    pub fn finish_into(mut self) -> E {
        for n in 1..self.order {
            if !self.groups[n - 1].key.is_empty() {
                self.out.last_in_statistics(n, self.groups[n - 1].raw);
            }
        }
        for n in (1..=self.order).rev() {
            self.flush(n);
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuation_counts_count_distinct_left_words() {
        // order 2 records (reversed): "a b" twice, "c b" once, "<s> b" (raw) once; ids a=3 b=4 c=5
        let mut recs = [vec![4u32, 3], vec![4, 5], vec![4, 1]];
        recs.sort();
        let counts = [2u64, 1, 1];
        let mut adj = Adjuster::new(2, true);
        for (r, c) in recs.iter().zip(counts) {
            adj.push(r, c);
        }
        let t = adj.finish();
        // <unk> and <s> first, with count 0.
        assert_eq!(t[0].first, vec![UNK_ID, BOS_ID, 4]);
        assert_eq!(t[0].counts.to_vec(), vec![0, 0, 3]); // left words of b: <s>, a, c
        assert_eq!(t[0].raw.to_vec(), vec![0, 0, 4]); // b occurs 4 times
        assert_eq!(t[1].len(), 3);
        let keys: Vec<Vec<u32>> = (0..3).map(|i| key(&t, 2, i).to_vec()).collect();
        assert_eq!(keys, vec![vec![1, 4], vec![3, 4], vec![5, 4]]);
    }

    /// Every entry links to its suffix, and each table lists its n-grams by their keys read
    /// backwards, whatever the mix of record lengths (records shorter than the order begin with
    /// <s> and leave longer groups open).
    #[test]
    fn tables_link_each_ngram_to_its_suffix_in_reversed_key_order() {
        let order = 4;
        // Sentences over words 3..7 as the counter makes records of them.
        let mut recs: Vec<Vec<u32>> = Vec::new();
        let mut x = 7u32;
        for _ in 0..60 {
            let mut sent = vec![BOS_ID];
            for _ in 0..(x % 6) {
                x = x.wrapping_mul(1103515245).wrapping_add(12345);
                sent.push(3 + (x >> 16) % 5);
            }
            sent.push(crate::vocab::EOS_ID);
            for i in 1..sent.len() {
                let mut r = vec![NONE; order];
                for j in 0..order.min(i + 1) {
                    r[j] = sent[i - j];
                }
                recs.push(r);
            }
            x = x.wrapping_mul(69069).wrapping_add(1);
        }
        recs.sort();
        let mut adj = Adjuster::new(order, false);
        let mut i = 0;
        while i < recs.len() {
            let j = (i..recs.len())
                .find(|&j| recs[j] != recs[i])
                .unwrap_or(recs.len());
            adj.push(&recs[i], (j - i) as u64);
            i = j;
        }
        let t = adj.finish();
        // The n-grams each order should hold: every record's suffixes (in word order).
        for n in 1..=order {
            let mut want: Vec<Vec<u32>> = recs
                .iter()
                .filter(|r| r.iter().take(n).all(|&w| w != NONE))
                .map(|r| r[..n].iter().rev().copied().collect())
                .collect();
            if n == 1 {
                want.extend([vec![UNK_ID], vec![BOS_ID]]);
            }
            want.sort_by(|a, b| a.iter().rev().cmp(b.iter().rev()));
            want.dedup();
            let got: Vec<Vec<u32>> = (0..t[n - 1].len())
                .map(|i| key(&t, n, i).to_vec())
                .collect();
            assert_eq!(got, want, "order {n}");
        }
    }

    #[test]
    fn a_count_past_u32_widens_the_column() {
        let mut c = Counts::default();
        c.push(5);
        assert!(matches!(c, Counts::Narrow(_)));
        c.push(u32::MAX as u64 + 7);
        c.push(2);
        assert!(matches!(c, Counts::Wide(_)));
        assert_eq!(c.to_vec(), vec![5, u32::MAX as u64 + 7, 2]);
    }
}
