//! Kneser-Ney adjusted counts, computed in one streaming pass over the suffix-sorted records.
//!
//! For the highest order, and for n-grams that begin with `<s>` (they cannot be extended to the
//! left), the adjusted count is the raw count. For every other n-gram `g` of a lower order it is the
//! continuation count N1+(• g): the number of distinct words seen right before `g` (Kneser & Ney
//! 1995; Chen & Goodman 1998, §3.5).

use crate::count::NONE;

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

    /// Entry `i` takes entry `from`'s count.
    fn copy(&mut self, from: usize, i: usize) {
        match self {
            Counts::Narrow(v) => v[i] = v[from],
            Counts::Wide(v) => v[i] = v[from],
        }
    }

    /// Entry `i` takes count `c` (a count of this table, so it fits).
    fn set(&mut self, i: usize, c: u64) {
        match self {
            Counts::Narrow(v) => v[i] = c as u32,
            Counts::Wide(v) => v[i] = c,
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

/// The n-grams of one order with their adjusted counts, keys flattened in word order.
#[derive(Clone, Debug, Default)]
pub struct CountTable {
    pub n: usize,
    pub keys: Vec<u32>,
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
        let mut t = [0u64; 4];
        let mut add = |c: u64, by: i64| {
            if (1..=4).contains(&c) {
                t[c as usize - 1] = t[c as usize - 1].wrapping_add_signed(by);
            }
        };
        self.counts.iter().for_each(|c| add(c, 1));
        if let (Some(raw), Some(last)) = (self.last_in_statistics, self.counts.last()) {
            add(last, -1);
            add(raw, 1);
        }
        t
    }
}

impl CountTable {
    /// Entries (by their keys: estimation drops an order's counts once it has used them).
    pub fn len(&self) -> usize {
        self.keys.len() / self.n.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn key(&self, i: usize) -> &[u32] {
        &self.keys[i * self.n..(i + 1) * self.n]
    }

    /// Puts the entries in the order `idx` gives (entry j takes entry idx[j]) in place: the
    /// permutation is applied cycle by cycle with one entry held aside, so sorting a table costs
    /// a bitmap beside the permutation, not a second table.
    pub fn permute(&mut self, idx: &[u32]) {
        assert_eq!(
            idx.len(),
            self.len(),
            "a permutation of the table's entries"
        );
        macro_rules! dispatch {
            ($($n:literal)*) => {
                match self.n {
                    $($n => self.permute_n::<$n>(idx),)*
                    n => panic!("{n}-grams: orders above {} are not counted", crate::count::MAX_ORDER),
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8)
    }

    /// [`CountTable::permute`] with keys of N words (each moved as one array).
    fn permute_n<const N: usize>(&mut self, idx: &[u32]) {
        let keys: &mut [[u32; N]] = self.keys.as_chunks_mut::<N>().0;
        let (counts, raw) = (&mut self.counts, &mut self.raw);
        let with_raw = !raw.is_empty();
        let mut placed = vec![0u64; keys.len().div_ceil(64)];
        for start in 0..keys.len() {
            if placed[start / 64] >> (start % 64) & 1 == 1 {
                continue;
            }
            let held = (
                keys[start],
                counts.get(start),
                with_raw.then(|| raw.get(start)),
            );
            let mut j = start;
            loop {
                placed[j / 64] |= 1 << (j % 64);
                let k = idx[j] as usize;
                if k == start {
                    keys[j] = held.0;
                    counts.set(j, held.1);
                    if let Some(r) = held.2 {
                        raw.set(j, r);
                    }
                    break;
                }
                keys[j] = keys[k];
                counts.copy(k, j);
                if with_raw {
                    raw.copy(k, j);
                }
                j = k;
            }
        }
    }
}

struct Group {
    /// Reversed suffix of the open group (empty when none is open).
    key: Vec<u32>,
    count: u64,
    raw: u64,
    last_ext: u32,
}

/// Consumes reversed records in sorted order and builds a [`CountTable`] per order.
pub struct Adjuster {
    order: usize,
    keep_raw: bool,
    groups: Vec<Group>,
    tables: Vec<CountTable>,
}

impl Adjuster {
    /// `keep_raw`: also record each n-gram's raw count ([`CountTable::raw`]).
    pub fn new(order: usize, keep_raw: bool) -> Self {
        Adjuster {
            order,
            keep_raw,
            groups: (0..order)
                .map(|_| Group {
                    key: Vec::new(),
                    count: 0,
                    raw: 0,
                    last_ext: NONE,
                })
                .collect(),
            tables: (1..=order)
                .map(|n| CountTable {
                    n,
                    ..Default::default()
                })
                .collect(),
        }
    }

    /// One unique reversed record (last word first, `NONE`-padded) and its raw count.
    pub fn push(&mut self, rec: &[u32], count: u64) {
        let len = rec.iter().position(|&x| x == NONE).unwrap_or(self.order);
        for n in 1..=len {
            if self.groups[n - 1].key.as_slice() != &rec[..n] {
                self.flush(n);
                self.groups[n - 1].key.extend_from_slice(&rec[..n]);
            }
            let g = &mut self.groups[n - 1];
            g.raw += count;
            if n == len {
                g.count += count; // highest order, or begins with <s>: raw count
            } else if rec[n] != g.last_ext {
                g.count += 1; // a new distinct left extension
                g.last_ext = rec[n];
            }
        }
    }

    fn flush(&mut self, n: usize) {
        let g = &mut self.groups[n - 1];
        if g.key.is_empty() {
            return;
        }
        let t = &mut self.tables[n - 1];
        t.keys.extend(g.key.iter().rev());
        t.counts.push(g.count);
        if self.keep_raw {
            t.raw.push(g.raw);
        }
        g.key.clear();
        g.count = 0;
        g.raw = 0;
        g.last_ext = NONE;
    }

    pub fn finish(mut self) -> Vec<CountTable> {
        for n in 1..=self.order {
            let open = !self.groups[n - 1].key.is_empty();
            let raw = self.groups[n - 1].raw;
            self.flush(n);
            if open && n < self.order {
                self.tables[n - 1].last_in_statistics = Some(raw);
            }
        }
        self.tables
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
        assert_eq!(t[0].keys, vec![4]);
        assert_eq!(t[0].counts.to_vec(), vec![3]); // left words <s>, a, c
        assert_eq!(t[0].raw.to_vec(), vec![4]); // b occurs 4 times
        assert_eq!(t[1].len(), 3);
    }

    #[test]
    fn a_count_past_u32_widens_the_column_and_permuting_moves_keys_with_counts() {
        let mut c = Counts::default();
        c.push(5);
        assert!(matches!(c, Counts::Narrow(_)));
        c.push(u32::MAX as u64 + 7);
        c.push(2);
        assert!(matches!(c, Counts::Wide(_)));
        assert_eq!(c.to_vec(), vec![5, u32::MAX as u64 + 7, 2]);
        for raw in [
            Counts::default(),
            Counts::from(vec![50, 10, 40, 20, 30, 60]),
        ] {
            let mut t = CountTable {
                n: 2,
                keys: vec![5, 0, 1, 0, 4, 0, 2, 0, 3, 0, 6, 0],
                counts: Counts::from(vec![5, 1, 4, 2, 3, u32::MAX as u64 + 6]),
                raw: raw.clone(),
                last_in_statistics: None,
            };
            // Entry j takes entry idx[j]: sorted by key, a cycle of five and a fixed point.
            t.permute(&[1, 3, 4, 2, 0, 5]);
            assert_eq!(t.keys, vec![1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0]);
            assert_eq!(t.counts.to_vec(), vec![1, 2, 3, 4, 5, u32::MAX as u64 + 6]);
            if !raw.is_empty() {
                assert_eq!(t.raw.to_vec(), vec![10, 20, 30, 40, 50, 60]);
            }
        }
    }
}
