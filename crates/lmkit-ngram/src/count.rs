//! Streaming n-gram counting for corpora larger than memory: n-gram records are buffered up to a
//! memory budget, sorted (in parallel) and written to anonymous temporary files as sorted runs, then
//! the runs are merged (k-way) into one sorted stream of unique n-grams with their counts.
//!
//! A record is the longest n-gram (at most `order` words) ending at each predicted token of a
//! sentence `<s> w1 .. wm </s>`. Records near the sentence start are shorter and begin with `<s>`.
//! Records are stored *reversed* (last word first) and padded with [`NONE`], so that sorting them
//! groups every suffix together: that is the order the adjusted-count pass needs (as in KenLM's lmplz).

use crate::error::{NgramError, Result};
use crate::tokenize::{for_each_token, Tokenization, BOS, EOS, UNK};
use crate::vocab::{Vocab, BOS_ID, EOS_ID};
use crate::{Progress, Unit};
use lmkit_core::decompress::{open_text, Compression};
use rayon::slice::ParallelSliceMut;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Padding in a reversed record shorter than the model order.
pub const NONE: u32 = u32::MAX;

/// Bytes of sorted records handed to the sink between two releases of consumed memory.
const RELEASE_BYTES: usize = 32 << 20;

/// Highest supported model order.
pub const MAX_ORDER: usize = 8;

#[derive(Clone, Debug)]
pub struct CountOptions {
    pub order: usize,
    pub tokenization: Tokenization,
    /// Budget for the in-memory record buffer; past it, sorted runs go to disk.
    pub memory_bytes: usize,
    /// Where sorted runs are written (default: the system temporary directory).
    pub temp_dir: Option<PathBuf>,
    /// Drop `<s>`, `</s>` and `<unk>` found in the text (lmplz's `--skip_symbols`) instead of
    /// refusing the corpus.
    pub skip_symbols: bool,
    /// How the counts become probabilities (pruning, discounts).
    pub estimation: crate::kneser_ney::EstimateOptions,
}

impl Default for CountOptions {
    fn default() -> Self {
        CountOptions {
            order: 3,
            tokenization: Tokenization::Words,
            memory_bytes: 1 << 30,
            temp_dir: None,
            skip_symbols: false,
            estimation: Default::default(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CorpusStats {
    pub files: usize,
    pub bytes: u64,
    pub lines: u64,
    /// Lines without a token: each is an empty sentence `<s> </s>`, as lmplz counts it.
    pub blank_lines: u64,
    pub sentences: u64,
    /// `<s>`, `</s>` and `<unk>` dropped from the text (with `skip_symbols`).
    pub skipped_symbols: u64,
    pub tokens: u64,
    /// Number of sorted runs spilled to disk (0 when everything fit in memory).
    pub runs_on_disk: usize,
}

/// What receives the counted n-grams.
pub trait CountSink {
    /// Called once, before the first n-gram, with the number of sorted runs counting wrote to
    /// disk (0 when the records fit in the memory budget).
    fn begin(&mut self, _runs_on_disk: usize) -> Result<()> {
        Ok(())
    }
    /// Each unique reversed record and its count, in sorted order.
    fn push(&mut self, rec: &[u32], count: u64);
}

impl<F: FnMut(&[u32], u64)> CountSink for F {
    fn push(&mut self, rec: &[u32], count: u64) {
        self(rec, count)
    }
}

/// Counts the n-grams of `inputs`; `sink` receives each unique reversed record and its count,
/// in sorted order.
pub fn count_ngrams(
    inputs: &[PathBuf],
    opts: &CountOptions,
    progress: &dyn Progress,
    sink: &mut dyn CountSink,
) -> Result<(Vocab, CorpusStats)> {
    macro_rules! dispatch {
        ($($n:literal)*) => {
            match opts.order {
                $($n => count_impl::<$n>(inputs, opts, progress, sink),)*
                order => Err(NgramError::BadOrder { order, max: MAX_ORDER }),
            }
        };
    }
    dispatch!(1 2 3 4 5 6 7 8)
}

fn count_impl<const N: usize>(
    inputs: &[PathBuf],
    opts: &CountOptions,
    progress: &dyn Progress,
    sink: &mut dyn CountSink,
) -> Result<(Vocab, CorpusStats)> {
    let record_bytes = std::mem::size_of::<[u32; N]>();
    let capacity = (opts.memory_bytes / record_bytes).max(1024);
    let temp_dir = opts.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let mut vocab = Vocab::default();
    let mut stats = CorpusStats {
        files: inputs.len(),
        ..Default::default()
    };
    // The whole budget is reserved at once (address space: pages count only once written), so
    // the buffer never grows by copying itself — which held the old and the new copy at once, and
    // left the old one with the allocator. Where the reservation is refused, it grows as needed.
    let mut buf: Vec<[u32; N]> = Vec::new();
    let _ = buf.try_reserve_exact(capacity);
    let mut runs: Vec<File> = Vec::new();
    let mut sentence: Vec<u32> = Vec::new();
    let mut line = Vec::new();

    // Progress against the input sizes where they are the text's size (not standard input, not
    // compressed).
    let plain = |p: &PathBuf| p != Path::new("-") && Compression::of(p) == Compression::None;
    let total: u64 = if inputs.iter().all(plain) {
        inputs
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    } else {
        0
    };
    progress.begin("counting n-grams", total, Unit::Bytes);
    for path in inputs {
        let mut reader = open_text(path)?;
        let mut line_no = 0u64;
        loop {
            line.clear();
            let n =
                lmkit_core::read_line_within(&mut reader, &mut line, lmkit_core::MAX_LINE_BYTES)
                    .map_err(|e| NgramError::io(path, e))?;
            if n == 0 {
                break;
            }
            line_no += 1;
            stats.bytes += n as u64;
            progress.advance(n as u64);
            let text = std::str::from_utf8(&line).map_err(|e| NgramError::InvalidUtf8 {
                path: path.clone(),
                line: line_no,
                byte: e.valid_up_to(),
            })?;
            let text = text.strip_suffix('\n').unwrap_or(text);
            sentence.clear();
            sentence.push(BOS_ID);
            let mut reserved = None;
            let mut push = |tok: &str| {
                if tok == BOS || tok == EOS || tok == UNK {
                    if opts.skip_symbols {
                        stats.skipped_symbols += 1;
                    } else {
                        reserved.get_or_insert(tok.to_string());
                    }
                    return;
                }
                sentence.push(vocab.insert(tok));
            };
            for_each_token(text, opts.tokenization, &mut push);
            if let Some(token) = reserved {
                return Err(NgramError::ReservedToken {
                    path: path.clone(),
                    line: line_no,
                    token,
                });
            }
            if sentence.len() == 1 {
                stats.blank_lines += 1;
            }
            sentence.push(EOS_ID);
            stats.sentences += 1;
            stats.tokens += sentence.len() as u64 - 2;
            for i in 1..sentence.len() {
                let len = N.min(i + 1);
                let mut rec = [NONE; N];
                for (j, slot) in rec.iter_mut().take(len).enumerate() {
                    *slot = sentence[i - j];
                }
                buf.push(rec);
            }
            if buf.len() >= capacity {
                runs.push(write_run(&mut buf, &temp_dir)?);
            }
        }
        stats.lines += line_no;
    }
    progress.finish();
    if stats.tokens == 0 {
        let what = inputs
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(NgramError::EmptyCorpus {
            what: format!("no non-blank line in {what}"),
        });
    }

    if runs.is_empty() {
        sink.begin(0)?;
        buf.par_sort_unstable();
        // The sorted records go to the sink a block at a time, each block's memory released
        // once consumed: the count tables the sink builds grow while the buffer shrinks,
        // instead of both being whole at the end.
        let block = (RELEASE_BYTES / record_bytes).max(1);
        let mut start = 0;
        while start < buf.len() {
            let mut end = (start + block).min(buf.len());
            // A block ends after a whole run of equal records (one n-gram and its count).
            while end < buf.len() && buf[end] == buf[end - 1] {
                end += 1;
            }
            for_each_unique(&buf[start..end], |rec, c| sink.push(rec, c));
            lmkit_kernels::system::release(&mut buf, start..end);
            start = end;
        }
        drop(buf);
        lmkit_kernels::system::return_free_memory();
    } else {
        if !buf.is_empty() {
            runs.push(write_run(&mut buf, &temp_dir)?);
        }
        stats.runs_on_disk = runs.len();
        drop(buf);
        sink.begin(runs.len())?;
        merge_runs::<N>(runs, &temp_dir, sink)?;
    }
    Ok((vocab, stats))
}

/// Calls `f` once per distinct record of a sorted slice, with its multiplicity.
fn for_each_unique<const N: usize>(sorted: &[[u32; N]], mut f: impl FnMut(&[u32; N], u64)) {
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i + 1;
        while j < sorted.len() && sorted[j] == sorted[i] {
            j += 1;
        }
        f(&sorted[i], (j - i) as u64);
        i = j;
    }
}

fn write_run<const N: usize>(buf: &mut Vec<[u32; N]>, dir: &Path) -> Result<File> {
    buf.par_sort_unstable();
    let file = crate::extsort::temp_file(dir)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut res = Ok(());
    for_each_unique(buf, |rec, c| {
        if res.is_ok() {
            res = write_record(&mut w, rec, c);
        }
    });
    res.map_err(|e| NgramError::io(dir, e))?;
    let mut file = w
        .into_inner()
        .map_err(|e| NgramError::io(dir, e.into_error()))?;
    file.rewind().map_err(|e| NgramError::io(dir, e))?;
    buf.clear();
    Ok(file)
}

fn write_record<const N: usize>(
    w: &mut impl Write,
    rec: &[u32; N],
    count: u64,
) -> std::io::Result<()> {
    for id in rec {
        w.write_all(&id.to_le_bytes())?;
    }
    w.write_all(&count.to_le_bytes())
}

fn read_record<const N: usize>(r: &mut impl Read) -> std::io::Result<Option<([u32; N], u64)>> {
    let mut rec = [0u32; N];
    let mut b4 = [0u8; 4];
    for (i, slot) in rec.iter_mut().enumerate() {
        match r.read_exact(&mut b4) {
            Ok(()) => *slot = u32::from_le_bytes(b4),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && i == 0 => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    let mut b8 = [0u8; 8];
    r.read_exact(&mut b8)?;
    Ok(Some((rec, u64::from_le_bytes(b8))))
}

/// k-way merge of sorted runs, summing the counts of equal records.
fn merge_runs<const N: usize>(runs: Vec<File>, dir: &Path, sink: &mut dyn CountSink) -> Result<()> {
    let io = |e| NgramError::io(dir, e);
    let mut readers: Vec<_> = runs
        .into_iter()
        .map(|f| BufReader::with_capacity(1 << 16, f))
        .collect();
    let mut heads: Vec<u64> = vec![0; readers.len()];
    let mut heap = BinaryHeap::new();
    for (i, r) in readers.iter_mut().enumerate() {
        if let Some((rec, c)) = read_record::<N>(r).map_err(io)? {
            heads[i] = c;
            heap.push(Reverse((rec, i)));
        }
    }
    let mut current: Option<([u32; N], u64)> = None;
    while let Some(Reverse((rec, i))) = heap.pop() {
        let c = heads[i];
        match &mut current {
            Some((cur, total)) if *cur == rec => *total += c,
            _ => {
                if let Some((cur, total)) = current.take() {
                    sink.push(&cur, total);
                }
                current = Some((rec, c));
            }
        }
        if let Some((next, c)) = read_record::<N>(&mut readers[i]).map_err(io)? {
            heads[i] = c;
            heap.push(Reverse((next, i)));
        }
    }
    if let Some((cur, total)) = current {
        sink.push(&cur, total);
    }
    Ok(())
}
