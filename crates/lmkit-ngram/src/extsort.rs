//! Sorting fixed-width records of `u32` words within a memory budget: records are buffered up to
//! the budget, sorted and written to anonymous temporary files as sorted runs, and the runs are
//! merged (k-way) when read back. Where everything fits, nothing touches the disk.

use crate::error::{NgramError, Result};
use rayon::slice::ParallelSliceMut;
use std::cmp::Ordering;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Most runs merged at once; more are first merged into longer runs (each open run holds a read
/// buffer).
const MAX_FAN_IN: usize = 128;
/// Read buffer of one run while merging.
const RUN_BUFFER: usize = 1 << 15;

/// How records compare: by their first `n` words (an n-gram's key in word order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyOrder {
    /// First word first: the n-grams sharing a context are together (context order).
    Forward(usize),
    /// Last word first: the n-grams sharing a suffix are together (suffix order, the order
    /// counting and the adjusted counts give).
    Reversed(usize),
}

impl KeyOrder {
    #[inline]
    pub fn cmp(self, a: &[u32], b: &[u32]) -> Ordering {
        match self {
            KeyOrder::Forward(n) => a[..n].cmp(&b[..n]),
            KeyOrder::Reversed(n) => a[..n].iter().rev().cmp(b[..n].iter().rev()),
        }
    }
}

/// A run written to disk, and the buffer it was written from.
type WrittenRun = (File, Vec<u32>);

/// Records pushed in any order, read back sorted by [`KeyOrder`]. A full buffer is sorted and
/// written on a thread of its own while the next one fills (each is half the budget).
pub struct Sorter {
    width: usize,
    order: KeyOrder,
    buf: Vec<u32>,
    /// Records buffered before a run is written.
    capacity: usize,
    runs: Vec<File>,
    /// The run being sorted and written, and the buffer it gives back.
    writing: Option<std::thread::JoinHandle<Result<WrittenRun>>>,
    dir: PathBuf,
    len: u64,
}

impl Sorter {
    /// Records of `width` words (1..=16) sorted by `order`, buffering at most about
    /// `memory_bytes` before writing a run in `dir`.
    pub fn new(width: usize, order: KeyOrder, memory_bytes: usize, dir: &Path) -> Self {
        assert!((1..=16).contains(&width), "records of {width} words");
        let capacity = (memory_bytes / 2 / (4 * width)).max(1024);
        Sorter {
            width,
            order,
            buf: Vec::new(),
            capacity,
            runs: Vec::new(),
            writing: None,
            dir: dir.to_path_buf(),
            len: 0,
        }
    }

    pub fn push(&mut self, rec: &[u32]) -> Result<()> {
        debug_assert_eq!(rec.len(), self.width);
        if self.buf.capacity() == 0 {
            // Reserved once (a buffer that grows by doubling holds two copies at its peak).
            let _ = self.buf.try_reserve_exact(self.capacity * self.width);
        }
        self.buf.extend_from_slice(rec);
        self.len += 1;
        if self.buf.len() >= self.capacity * self.width {
            self.spill()?;
        }
        Ok(())
    }

    /// Records pushed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Waits for the run being written; gives back its buffer.
    fn written(&mut self) -> Result<Option<Vec<u32>>> {
        let Some(h) = self.writing.take() else {
            return Ok(None);
        };
        let (file, buf) = h.join().map_err(|_| {
            NgramError::io(
                &self.dir,
                std::io::Error::other("the thread writing a sorted run failed"),
            )
        })??;
        self.runs.push(file);
        Ok(Some(buf))
    }

    /// Hands the full buffer to a thread that sorts it and writes it as a run.
    fn spill(&mut self) -> Result<()> {
        let spare = self.written()?.unwrap_or_default();
        let mut buf = std::mem::replace(&mut self.buf, spare);
        self.buf.clear();
        let (width, order, dir) = (self.width, self.order, self.dir.clone());
        self.writing = Some(std::thread::spawn(move || {
            sort(&mut buf, width, order);
            let mut out = RunWriter::new(&dir)?;
            out.write(&buf)?;
            Ok((out.finish()?, buf))
        }));
        Ok(())
    }

    /// The records, sorted.
    pub fn finish(mut self) -> Result<Sorted> {
        let (width, order, len) = (self.width, self.order, self.len);
        self.written()?;
        if self.runs.is_empty() {
            sort(&mut self.buf, width, order);
            return Ok(Sorted {
                width,
                len,
                source: Source::Memory {
                    buf: std::mem::take(&mut self.buf),
                    at: 0,
                },
            });
        }
        if !self.buf.is_empty() {
            self.spill()?;
            self.written()?;
        }
        self.buf = Vec::new();
        let dir = self.dir;
        let mut runs = self.runs;
        // Too many runs to merge at once: merge them in groups into longer runs first.
        while runs.len() > MAX_FAN_IN {
            let group: Vec<File> = runs.drain(..MAX_FAN_IN).collect();
            let mut merge = Merge::new(group, width, order, &dir)?;
            let mut out = RunWriter::new(&dir)?;
            while let Some(rec) = merge.next()? {
                out.write(rec)?;
            }
            runs.push(out.finish()?);
        }
        Ok(Sorted {
            width,
            len,
            source: Source::Merge(Merge::new(runs, width, order, &dir)?),
        })
    }
}

/// Sorts `buf`, records of `width` words, by `order`.
fn sort(buf: &mut [u32], width: usize, order: KeyOrder) {
    macro_rules! widths {
        ($($w:literal)*) => {
            match width {
                $($w => sort_records::<$w>(buf, order),)*
                w => unreachable!("records of {w} words"),
            }
        };
    }
    widths!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16)
}

/// Sorts `buf`, records of `W` words, by `order`.
fn sort_records<const W: usize>(buf: &mut [u32], order: KeyOrder) {
    let (records, rest) = buf.as_chunks_mut::<W>();
    debug_assert!(rest.is_empty());
    match order {
        KeyOrder::Forward(n) => records.par_sort_unstable_by(|a, b| a[..n].cmp(&b[..n])),
        KeyOrder::Reversed(n) => {
            records.par_sort_unstable_by(|a, b| a[..n].iter().rev().cmp(b[..n].iter().rev()))
        }
    }
}

/// Writes records to an anonymous temporary file.
pub struct RunWriter {
    w: BufWriter<File>,
    dir: PathBuf,
    bytes: Vec<u8>,
}

impl RunWriter {
    pub fn new(dir: &Path) -> Result<Self> {
        let file = temp_file(dir)?;
        Ok(RunWriter {
            w: BufWriter::with_capacity(1 << 20, file),
            dir: dir.to_path_buf(),
            bytes: Vec::new(),
        })
    }

    /// Writes `words` (one record or several).
    pub fn write(&mut self, words: &[u32]) -> Result<()> {
        for part in words.chunks(1 << 14) {
            self.bytes.clear();
            part.iter()
                .for_each(|x| self.bytes.extend_from_slice(&x.to_le_bytes()));
            self.w
                .write_all(&self.bytes)
                .map_err(|e| NgramError::io(&self.dir, e))?;
        }
        Ok(())
    }

    /// The file, rewound for reading.
    pub fn finish(self) -> Result<File> {
        let dir = self.dir;
        let mut file = self
            .w
            .into_inner()
            .map_err(|e| NgramError::io(&dir, e.into_error()))?;
        file.rewind().map_err(|e| NgramError::io(&dir, e))?;
        Ok(file)
    }

    /// The file as a stream of `width`-word records.
    pub fn into_reader(self, width: usize) -> Result<RunReader> {
        let dir = self.dir.clone();
        RunReader::new(self.finish()?, width, &dir)
    }
}

/// An anonymous temporary file in `dir` (deleted when closed, whatever happens to the process).
pub(crate) fn temp_file(dir: &Path) -> Result<File> {
    tempfile::tempfile_in(dir).map_err(|e| {
        NgramError::io(
            dir,
            std::io::Error::new(
                e.kind(),
                format!("{e} (creating a temporary file; --temp-dir chooses where they go)"),
            ),
        )
    })
}

/// Reads back what a [`RunWriter`] wrote, a record at a time.
pub struct RunReader {
    r: BufReader<File>,
    dir: PathBuf,
    bytes: Vec<u8>,
    rec: Vec<u32>,
}

impl RunReader {
    fn new(file: File, width: usize, dir: &Path) -> Result<Self> {
        Ok(RunReader {
            r: BufReader::with_capacity(RUN_BUFFER, file),
            dir: dir.to_path_buf(),
            bytes: vec![0; width * 4],
            rec: vec![0; width],
        })
    }

    /// Reads the next record (then [`RunReader::rec`]); false at the end.
    pub fn advance(&mut self) -> Result<bool> {
        match self.r.read_exact(&mut self.bytes) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(NgramError::io(&self.dir, e)),
        }
        for (x, b) in self.rec.iter_mut().zip(self.bytes.chunks_exact(4)) {
            *x = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(true)
    }

    /// The record the last [`RunReader::advance`] read.
    pub fn rec(&self) -> &[u32] {
        &self.rec
    }
}

/// k-way merge of sorted runs (a binary heap of run indices ordered by their head records).
struct Merge {
    runs: Vec<RunReader>,
    heap: Vec<usize>,
    order: KeyOrder,
    /// The run whose head was returned last: it advances before the next record.
    pending: Option<usize>,
}

impl Merge {
    fn new(files: Vec<File>, width: usize, order: KeyOrder, dir: &Path) -> Result<Self> {
        let mut runs = Vec::with_capacity(files.len());
        let mut heap = Vec::with_capacity(files.len());
        for f in files {
            let mut r = RunReader::new(f, width, dir)?;
            if r.advance()? {
                heap.push(runs.len());
            }
            runs.push(r);
        }
        let mut m = Merge {
            runs,
            heap,
            order,
            pending: None,
        };
        for i in (0..m.heap.len() / 2).rev() {
            m.sift_down(i);
        }
        Ok(m)
    }

    fn less(&self, a: usize, b: usize) -> bool {
        self.order.cmp(&self.runs[a].rec, &self.runs[b].rec) == Ordering::Less
    }

    fn sift_down(&mut self, mut i: usize) {
        let n = self.heap.len();
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut m = i;
            if l < n && self.less(self.heap[l], self.heap[m]) {
                m = l;
            }
            if r < n && self.less(self.heap[r], self.heap[m]) {
                m = r;
            }
            if m == i {
                return;
            }
            self.heap.swap(i, m);
            i = m;
        }
    }

    fn next(&mut self) -> Result<Option<&[u32]>> {
        if let Some(top) = self.pending.take() {
            if !self.runs[top].advance()? {
                let last = self.heap.pop().expect("the pending run is in the heap");
                if self.heap.is_empty() {
                    return Ok(None);
                }
                self.heap[0] = last;
            }
            self.sift_down(0);
        }
        let Some(&top) = self.heap.first() else {
            return Ok(None);
        };
        self.pending = Some(top);
        Ok(Some(&self.runs[top].rec))
    }
}

enum Source {
    Memory { buf: Vec<u32>, at: usize },
    Merge(Merge),
}

/// A [`Sorter`]'s records in sorted order.
pub struct Sorted {
    width: usize,
    len: u64,
    source: Source,
}

impl Sorted {
    /// Number of records.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn next(&mut self) -> Result<Option<&[u32]>> {
        let w = self.width;
        match &mut self.source {
            Source::Memory { buf, at } => {
                let Some(rec) = buf.get(*at..*at + w) else {
                    return Ok(None);
                };
                *at += w;
                Ok(Some(rec))
            }
            Source::Merge(m) => m.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(n: usize, width: usize) -> Vec<Vec<u32>> {
        let mut x = 12345u32;
        (0..n)
            .map(|_| {
                (0..width)
                    .map(|_| {
                        x = x.wrapping_mul(1103515245).wrapping_add(12345);
                        (x >> 16) % 7
                    })
                    .collect()
            })
            .collect()
    }

    /// Whatever the budget (everything in memory, a few runs, more runs than one merge takes),
    /// the records come back in key order (equal keys in any order).
    #[test]
    fn records_come_back_sorted_in_and_out_of_memory() {
        let dir = std::env::temp_dir();
        for order in [KeyOrder::Forward(3), KeyOrder::Reversed(3)] {
            for (n, memory) in [(0, 1 << 20), (5000, 1 << 20), (5000, 0), (300_000, 0)] {
                let recs = records(n, 4);
                let mut s = Sorter::new(4, order, memory, &dir);
                for r in &recs {
                    s.push(r).unwrap();
                }
                let mut want = recs.clone();
                want.sort_by(|a, b| order.cmp(a, b).then(a[3].cmp(&b[3])));
                let mut sorted = s.finish().unwrap();
                assert_eq!(sorted.len(), n as u64);
                let mut got = Vec::new();
                while let Some(r) = sorted.next().unwrap() {
                    got.push(r.to_vec());
                }
                // Equal keys may come in any order: compare with the payload as a tie-break.
                got.sort_by(|a, b| order.cmp(a, b).then(a[3].cmp(&b[3])));
                assert_eq!(got, want, "{order:?}, {n} records, {memory} bytes");
            }
        }
    }

    #[test]
    fn merged_runs_are_in_key_order() {
        let dir = std::env::temp_dir();
        let order = KeyOrder::Reversed(2);
        let recs = records(200_000, 2);
        let mut s = Sorter::new(2, order, 0, &dir); // 1,024 records a run: 196 runs
        for r in &recs {
            s.push(r).unwrap();
        }
        let mut sorted = s.finish().unwrap();
        let mut prev: Option<Vec<u32>> = None;
        let mut count = 0;
        while let Some(r) = sorted.next().unwrap() {
            if let Some(p) = &prev {
                assert_ne!(order.cmp(p, r), Ordering::Greater);
            }
            prev = Some(r.to_vec());
            count += 1;
        }
        assert_eq!(count, 200_000);
    }
}
