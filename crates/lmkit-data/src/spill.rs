//! Sorted runs on disk for deduplication under a memory cap (`--memory`).
//!
//! The dedup indexes (content hashes, LSH band keys) grow with the corpus. Under a cap, what is in
//! memory is written out as a sorted run of fixed-size records when the cap is reached, and looked
//! up there by binary search in a memory map. When more than [`MAX_RUNS`] runs exist they are merged
//! into one (a k-way merge, streaming), so a lookup touches few files. Records are compared as bytes:
//! their fields are written big-endian, so byte order is numeric order.

use crate::error::{DataError, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Runs kept before they are merged into one.
pub const MAX_RUNS: usize = 8;

/// The elements a buffer is counted for in a memory estimate: its capacity until the index first
/// spills (buffers that grew left their predecessors with the allocator), what it holds after (a
/// spill keeps the buffers, which refill to their first size).
pub fn counted(spilled: bool, capacity: usize, len: usize) -> usize {
    if spilled {
        len
    } else {
        capacity
    }
}

/// Sorted runs of `rec`-byte records whose first `key` bytes are the lookup key.
pub struct Runs {
    dir: PathBuf,
    name: &'static str,
    rec: usize,
    key: usize,
    runs: Vec<(PathBuf, memmap2::Mmap)>,
    written: usize,
}

impl Runs {
    pub fn new(dir: &Path, name: &'static str, rec: usize, key: usize) -> Runs {
        Runs {
            dir: dir.to_path_buf(),
            name,
            rec,
            key,
            runs: Vec::new(),
            written: 0,
        }
    }

    /// Records on disk.
    pub fn len(&self) -> usize {
        self.runs.iter().map(|(_, m)| m.len() / self.rec).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    fn next_path(&mut self) -> PathBuf {
        self.written += 1;
        self.dir
            .join(format!("{}-{:05}.run", self.name, self.written))
    }

    /// Adds a run of sorted records (concatenated).
    pub fn add(&mut self, sorted: &[u8]) -> Result<()> {
        debug_assert!(sorted.len().is_multiple_of(self.rec));
        if sorted.is_empty() {
            return Ok(());
        }
        let path = self.next_path();
        std::fs::write(&path, sorted).map_err(|e| DataError::io(&path, e))?;
        let map = lmkit_core::mmap::map_readonly(&path)?;
        self.runs.push((path, map));
        if self.runs.len() > MAX_RUNS {
            self.merge()?;
        }
        Ok(())
    }

    /// Merges every run into one.
    fn merge(&mut self) -> Result<()> {
        let path = self.next_path();
        let file = std::fs::File::create(&path).map_err(|e| DataError::io(&path, e))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let rec = self.rec;
        let mut heap = std::collections::BinaryHeap::new();
        for (i, (_, m)) in self.runs.iter().enumerate() {
            if !m.is_empty() {
                heap.push(std::cmp::Reverse((&m[..rec], i, 0usize)));
            }
        }
        while let Some(std::cmp::Reverse((r, i, at))) = heap.pop() {
            out.write_all(r).map_err(|e| DataError::io(&path, e))?;
            let m = &self.runs[i].1;
            let next = at + rec;
            if next < m.len() {
                heap.push(std::cmp::Reverse((&m[next..next + rec], i, next)));
            }
        }
        out.flush().map_err(|e| DataError::io(&path, e))?;
        drop(out);
        for (old, _) in std::mem::take(&mut self.runs) {
            let _ = std::fs::remove_file(old);
        }
        let map = lmkit_core::mmap::map_readonly(&path)?;
        self.runs.push((path, map));
        Ok(())
    }

    /// Calls `f` with every record whose key equals `key`.
    pub fn find(&self, key: &[u8], mut f: impl FnMut(&[u8])) {
        debug_assert_eq!(key.len(), self.key);
        let (rec, k) = (self.rec, self.key);
        for (_, m) in &self.runs {
            let n = m.len() / rec;
            let at = |i: usize| &m[i * rec..i * rec + k];
            // First record with key ≥ `key`.
            let (mut lo, mut hi) = (0, n);
            while lo < hi {
                let mid = (lo + hi) / 2;
                if at(mid) < key {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            while lo < n && at(lo) == key {
                f(&m[lo * rec..(lo + 1) * rec]);
                lo += 1;
            }
        }
    }

    /// Whether a record with this key exists.
    pub fn contains(&self, key: &[u8]) -> bool {
        let mut found = false;
        self.find(key, |_| found = true);
        found
    }
}

/// Fixed-size rows numbered from 0, written in blocks and read by number (signatures of kept
/// documents).
pub struct Blocks {
    dir: PathBuf,
    name: String,
    row: usize,
    /// (first row, map) of each block, in order.
    blocks: Vec<(usize, memmap2::Mmap)>,
    rows: usize,
}

impl Blocks {
    pub fn new(dir: &Path, name: &str, row: usize) -> Blocks {
        Blocks {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            row,
            blocks: Vec::new(),
            rows: 0,
        }
    }

    /// Rows on disk.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Appends rows (concatenated) as a new block.
    pub fn add(&mut self, rows: &[u8]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let path = self
            .dir
            .join(format!("{}-{:05}.bin", self.name, self.blocks.len() + 1));
        std::fs::write(&path, rows).map_err(|e| DataError::io(&path, e))?;
        let map = lmkit_core::mmap::map_readonly(&path)?;
        self.blocks.push((self.rows, map));
        self.rows += rows.len() / self.row;
        Ok(())
    }

    /// Row `i` (< [`Blocks::rows`]).
    pub fn get(&self, i: usize) -> &[u8] {
        self.span(i, 1)
    }

    /// Rows `i..i + n`, which were added in one block.
    fn span(&self, i: usize, n: usize) -> &[u8] {
        let b = self.blocks.partition_point(|(first, _)| *first <= i) - 1;
        let (first, m) = &self.blocks[b];
        let at = (i - first) * self.row;
        &m[at..at + n * self.row]
    }
}

/// Variable-length rows numbered from 0 (source and preview of kept documents), written in blocks.
pub struct Texts {
    /// Bytes of the rows, one block per [`Texts::add_block`].
    data: Blocks,
    /// (start byte, length) of each row, little-endian u64s.
    offsets: Blocks,
}

impl Texts {
    pub fn new(dir: &Path, name: &str) -> Texts {
        Texts {
            data: Blocks::new(dir, name, 1),
            offsets: Blocks::new(dir, &format!("{name}-offsets"), 16),
        }
    }

    /// Adds rows in order, numbered on from the last.
    pub fn add_block<'a>(&mut self, rows: impl IntoIterator<Item = &'a [u8]>) -> Result<()> {
        let base = self.data.rows();
        let (mut data, mut offsets) = (Vec::new(), Vec::new());
        for r in rows {
            offsets.extend_from_slice(&((base + data.len()) as u64).to_le_bytes());
            offsets.extend_from_slice(&(r.len() as u64).to_le_bytes());
            data.extend_from_slice(r);
        }
        self.data.add(&data)?;
        self.offsets.add(&offsets)
    }

    pub fn rows(&self) -> usize {
        self.offsets.rows()
    }

    pub fn get(&self, i: usize) -> &[u8] {
        let o = self.offsets.get(i);
        let start = u64::from_le_bytes(o[..8].try_into().unwrap()) as usize;
        let len = u64::from_le_bytes(o[8..].try_into().unwrap()) as usize;
        if len == 0 {
            return &[];
        }
        self.data.span(start, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_find_every_match_across_merges() {
        let dir = tempfile::tempdir().unwrap();
        let mut runs = Runs::new(dir.path(), "t", 6, 2);
        let mut all = Vec::new();
        for r in 0..20u16 {
            let mut recs: Vec<[u8; 6]> = (0..50u16)
                .map(|i| {
                    let key = (i * 7 + r) % 40;
                    let mut rec = [0u8; 6];
                    rec[..2].copy_from_slice(&key.to_be_bytes());
                    rec[2..4].copy_from_slice(&r.to_be_bytes());
                    rec[4..].copy_from_slice(&i.to_be_bytes());
                    rec
                })
                .collect();
            recs.sort();
            all.extend(recs.iter().copied());
            runs.add(&recs.concat()).unwrap();
            assert!(runs.runs.len() <= MAX_RUNS);
        }
        assert_eq!(runs.len(), 1000);
        for key in 0..41u16 {
            let mut got = Vec::new();
            runs.find(&key.to_be_bytes(), |r| got.push(r.to_vec()));
            got.sort();
            let mut want: Vec<Vec<u8>> = all
                .iter()
                .filter(|r| r[..2] == key.to_be_bytes())
                .map(|r| r.to_vec())
                .collect();
            want.sort();
            assert_eq!(got, want, "key {key}");
            assert_eq!(runs.contains(&key.to_be_bytes()), key < 40);
        }
    }

    #[test]
    fn blocks_and_texts_read_back_by_number() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Blocks::new(dir.path(), "b", 4);
        b.add(&[0, 0, 0, 1, 0, 0, 0, 2]).unwrap();
        b.add(&[0, 0, 0, 3]).unwrap();
        assert_eq!(b.rows(), 3);
        assert_eq!(b.get(2), &[0, 0, 0, 3]);
        assert_eq!(b.get(1), &[0, 0, 0, 2]);
        let mut t = Texts::new(dir.path(), "t");
        t.add_block(["ab".as_bytes(), b"", b"cde"]).unwrap();
        t.add_block(["한국".as_bytes()]).unwrap();
        assert_eq!(t.rows(), 4);
        assert_eq!(t.get(0), b"ab");
        assert_eq!(t.get(1), b"");
        assert_eq!(t.get(2), b"cde");
        assert_eq!(t.get(3), "한국".as_bytes());
    }
}
