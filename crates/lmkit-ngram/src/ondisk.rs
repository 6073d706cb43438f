//! Estimation on disk, for models whose n-grams do not fit in memory: the same interpolated
//! modified Kneser-Ney estimate as [`kneser_ney::estimate`](crate::kneser_ney::estimate), written
//! as an ARPA file, with every order above the unigrams streamed through sorted files (as KenLM's
//! lmplz does) so that memory stays within a budget whatever the corpus.
//!
//! 1. The adjusting pass writes each order's n-grams (whole keys, adjusted and raw counts) to a
//!    [`Sorter`] in context order (first word first).
//! 2. From the highest order down, each order is read in context order: a context's n-grams are
//!    together, so each group gives its members' discounted probabilities u(w|h) and its context's
//!    back-off γ(h). The back-offs of this order's own n-grams (as contexts, from the order above,
//!    which come in the same order) are joined on the way. The results are sorted back into suffix
//!    order.
//! 3. From the bigrams up, each order is read in suffix order beside the order below's
//!    probabilities (also in suffix order: an n-gram's suffix comes in the same order as the
//!    n-grams): p(w|h) = u(w|h) + γ(h)·p(w|h'), and its ARPA lines are written.
//!
//! Unigrams (one per word: the vocabulary is in memory anyway) stay in memory. The arithmetic is
//! the in-memory estimate's, step for step, so both give the same file byte for byte.

use crate::adjust::{CountOfCounts, Emit, Tables};
use crate::arpa::{push_line, write_header};
use crate::error::{NgramError, Result};
use crate::extsort::{KeyOrder, RunReader, RunWriter, Sorter};
use crate::kneser_ney::{
    allowed_words, interpolate, log10_prob, Discounts, EstimateOptions, GroupSum, BOS_LOG10_PROB,
};
use crate::tables::{backoff_bits, backoff_of_bits};
use crate::vocab::{BOS_ID, EOS_ID};
use crate::{Progress, Unit};
use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

/// Words after the key in the adjusting pass's records: the adjusted count, then the raw count
/// where pruning needs it (u64 each).
fn count_words(keep_raw: bool) -> usize {
    2 + 2 * usize::from(keep_raw)
}

/// Words after the key in the estimate's records: u (f64), γ of the context (f64), the n-gram's
/// own back-off (as [`backoff_bits`] keeps it), then whether it is pruned where anything is.
fn estimate_words(prunes: bool) -> usize {
    5 + usize::from(prunes)
}

/// ARPA lines handed to the formatting thread at a time.
const LINE_BLOCK: usize = 1 << 13;

fn push_u64(rec: &mut Vec<u32>, x: u64) {
    rec.push(x as u32);
    rec.push((x >> 32) as u32);
}

fn get_u64(rec: &[u32], i: usize) -> u64 {
    u64::from(rec[i]) | (u64::from(rec[i + 1]) << 32)
}

/// What a model written by [`OnDisk::estimate`] holds.
#[derive(Clone, Debug)]
pub struct ArpaSummary {
    /// Number of n-grams of each order (`counts[n - 1]` for order n).
    pub counts: Vec<u64>,
    /// `discounts[n - 1]` for order n.
    pub discounts: Vec<Discounts>,
}

/// Receives the adjusting pass's n-grams ([`Emit`]): unigrams in memory, every higher order into
/// a sorter.
pub struct OnDisk {
    unigrams: Tables,
    /// Orders 2..=N, in context order.
    sorters: Vec<Sorter>,
    /// Orders 2..=N.
    stats: Vec<CountOfCounts>,
    keep_raw: bool,
    rec: Vec<u32>,
    error: Option<NgramError>,
    dir: PathBuf,
    /// Memory of each sorter.
    share: usize,
}

impl OnDisk {
    /// For a model of `order` (at least 2); `keep_raw` as [`Tables::new`]; sorters write their
    /// runs in `dir` and buffer `memory_bytes` in all.
    pub fn new(order: usize, keep_raw: bool, memory_bytes: usize, dir: &Path) -> Self {
        assert!(order >= 2, "unigram models are estimated in memory");
        // Each order above the unigrams has two sorters at a time (its counts, then its
        // estimate), and they may all hold their last buffer at once.
        let share = memory_bytes / (2 * (order - 1));
        OnDisk {
            unigrams: Tables::new(1, keep_raw),
            sorters: (2..=order)
                .map(|n| Sorter::new(n + count_words(keep_raw), KeyOrder::Forward(n), share, dir))
                .collect(),
            stats: vec![CountOfCounts::default(); order - 1],
            keep_raw,
            rec: Vec::new(),
            error: None,
            dir: dir.to_path_buf(),
            share,
        }
    }
}

impl Emit for OnDisk {
    fn emit(&mut self, n: usize, reversed: &[u32], count: u64, raw: u64) {
        if n == 1 {
            self.unigrams.emit(1, reversed, count, raw);
            return;
        }
        self.stats[n - 2].add(count);
        if self.error.is_some() {
            return;
        }
        self.rec.clear();
        self.rec.extend(reversed[..n].iter().rev());
        push_u64(&mut self.rec, count);
        if self.keep_raw {
            push_u64(&mut self.rec, raw);
        }
        if let Err(e) = self.sorters[n - 2].push(&self.rec) {
            self.error = Some(e);
        }
    }

    fn last_in_statistics(&mut self, n: usize, raw: u64) {
        match n {
            1 => self.unigrams.last_in_statistics(1, raw),
            _ => self.stats[n - 2].last_in_statistics(raw),
        }
    }
}

impl OnDisk {
    /// Estimates the model from the counts received and writes it to `path` as ARPA (atomically),
    /// as [`kneser_ney::estimate`](crate::kneser_ney::estimate) and
    /// [`save_arpa`](crate::arpa::save_arpa) would.
    pub fn estimate(
        mut self,
        vocab: &[String],
        opts: &EstimateOptions,
        path: &Path,
        progress: &dyn Progress,
    ) -> Result<ArpaSummary> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let order = self.sorters.len() + 1;
        let thresholds = opts.thresholds(order)?;
        let prunes = opts.prunes();
        assert!(
            self.keep_raw || !prunes,
            "pruning needs the raw counts (OnDisk::new with keep_raw)"
        );
        let uni = self
            .unigrams
            .into_tables()
            .pop()
            .expect("the unigram table");
        let mut discounts = vec![Discounts::of(&uni, 1, opts)?];
        for (i, s) in self.stats.iter().enumerate() {
            discounts.push(Discounts::from_count_of_counts(s.get(), i + 2, opts)?);
        }
        let allowed = allowed_words(opts, vocab);
        let outside =
            |key: &[u32]| matches!(&allowed, Some(ok) if key.iter().any(|&w| !ok[w as usize]));
        let marked =
            |n: usize, key: &[u32], raw: u64| prunes && (raw <= thresholds[n - 1] || outside(key));

        // Unigrams (in memory): one group under the empty context.
        let uni_marked: Vec<bool> = (0..uni.len())
            .map(|e| {
                prunes && uni.first[e] > EOS_ID && marked(1, &uni.first[e..e + 1], uni.raw.get(e))
            })
            .collect();
        let kept_words = uni_marked.iter().filter(|&&m| !m).count();
        let uniform = 1.0 / (kept_words as f64 - 1.0);
        let d1 = &discounts[0];
        let mut g = GroupSum::default();
        for (e, &m) in uni_marked.iter().enumerate() {
            if uni.first[e] != BOS_ID {
                g.add(d1, uni.counts.get(e), m);
            }
        }
        let gamma = g.gamma();
        let uni_p: Vec<f32> = (0..uni.len())
            .map(|e| interpolate(g.discounted(d1, uni.counts.get(e)), gamma, uniform))
            .collect();
        let mut entry_of = vec![u32::MAX; vocab.len()];
        for (e, &w) in uni.first.iter().enumerate() {
            entry_of[w as usize] = e as u32;
        }
        let mut uni_backoff = vec![backoff_bits(None); uni.len()];

        // Step 2, from the highest order down: u and γ by context groups.
        let dir = self.dir.clone();
        let mut estimated: Vec<Sorter> = Vec::with_capacity(order - 1);
        // Back-offs of the current order's n-grams, from the groups of the order above.
        let mut backoffs_above: Option<RunReader> = None;
        while let Some(counts) = self.sorters.pop() {
            let n = self.sorters.len() + 2;
            let d = &discounts[n - 1];
            progress.begin(
                &format!("estimating {n}-grams on disk"),
                counts.len(),
                Unit::Items,
            );
            let mut input = counts.finish()?;
            let mut out = Sorter::new(
                n + estimate_words(prunes),
                KeyOrder::Reversed(n),
                self.share,
                &dir,
            );
            let mut contexts = if n > 2 {
                Some(RunWriter::new(&dir)?)
            } else {
                None
            };
            let mut above = backoffs_above.take();
            let mut above_read = false;
            // One context's n-grams: they differ in their last word, so a group holds at most one
            // record per vocabulary word (the vocabulary is in memory anyway).
            let mut group: Vec<u32> = Vec::new();
            let mut rec: Vec<u32> = Vec::with_capacity(n + estimate_words(prunes));
            let w = n + count_words(self.keep_raw);
            let mut done = 0u64;
            loop {
                let next = input.next()?;
                let ends = match next {
                    None => !group.is_empty(),
                    Some(r) => !group.is_empty() && group[..n - 1] != r[..n - 1],
                };
                if ends {
                    // One context's group: its back-off, its members' discounted probabilities.
                    let mut g = GroupSum::default();
                    for m in group.chunks_exact(w) {
                        let pruned = prunes && marked(n, &m[..n], get_u64(m, n + 2));
                        g.add(d, get_u64(m, n), pruned);
                    }
                    let gamma = g.gamma();
                    let gamma_bits = backoff_bits(Some(gamma.log10() as f32));
                    match &mut contexts {
                        Some(c) => {
                            rec.clear();
                            rec.extend_from_slice(&group[..n - 1]);
                            rec.push(gamma_bits);
                            c.write(&rec)?;
                        }
                        None => uni_backoff[entry_of[group[0] as usize] as usize] = gamma_bits,
                    }
                    for m in group.chunks_exact(w) {
                        let u = g.discounted(d, get_u64(m, n));
                        // This n-gram's own back-off: the order above's groups come in the same
                        // (context) order, each one's context an n-gram of this order.
                        let mut own = backoff_bits(None);
                        if let Some(r) = &mut above {
                            loop {
                                if !above_read {
                                    above_read = r.advance()?;
                                    if !above_read {
                                        above = None;
                                        break;
                                    }
                                }
                                match r.rec()[..n].cmp(&m[..n]) {
                                    std::cmp::Ordering::Less => above_read = false,
                                    std::cmp::Ordering::Equal => {
                                        own = r.rec()[n];
                                        above_read = false;
                                        break;
                                    }
                                    std::cmp::Ordering::Greater => break,
                                }
                            }
                        }
                        rec.clear();
                        rec.extend_from_slice(&m[..n]);
                        push_u64(&mut rec, u.to_bits());
                        push_u64(&mut rec, gamma.to_bits());
                        rec.push(own);
                        if prunes {
                            rec.push(u32::from(marked(n, &m[..n], get_u64(m, n + 2))));
                        }
                        out.push(&rec)?;
                    }
                    done += (group.len() / w) as u64;
                    progress.advance((group.len() / w) as u64);
                    group.clear();
                }
                match next {
                    Some(r) => group.extend_from_slice(r),
                    None => break,
                }
            }
            debug_assert_eq!(done, input.len());
            drop(input);
            progress.finish();
            backoffs_above = contexts.map(|c| c.into_reader(n)).transpose()?;
            estimated.push(out);
        }
        drop(backoffs_above);

        // Step 3, from the bigrams up: interpolation, and each order's ARPA lines.
        let mut counts = vec![kept_words as u64];
        let mut sections: Vec<File> = Vec::with_capacity(order - 1);
        // The order below's linear probabilities, in suffix order, with their keys.
        let mut lower: Option<RunReader> = None;
        let mut line = String::new();
        for n in 2..=order {
            let sorted = estimated.pop().expect("an estimate per order");
            progress.begin(
                &format!("interpolating {n}-grams"),
                sorted.len(),
                Unit::Items,
            );
            let mut input = sorted.finish()?;
            let mut probs = if n < order {
                Some(RunWriter::new(&dir)?)
            } else {
                None
            };
            let file = crate::extsort::temp_file(&dir)?;
            let mut kept = 0u64;
            let mut lower_read = false;
            let mut rec: Vec<u32> = Vec::with_capacity(n + 1);
            let mut since = 0u64;
            // The ARPA lines are made on a thread of their own, from blocks of records
            // [probability, back-off, key] (as bits).
            let width = n + 2;
            let block_len = LINE_BLOCK * width;
            let (section, lines) = std::thread::scope(|scope| -> Result<(File, Result<()>)> {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u32>>(4);
                let writer = scope.spawn(|| -> Result<File> {
                    let mut text = BufWriter::with_capacity(1 << 20, file);
                    let mut line = String::new();
                    for block in rx {
                        for r in block.chunks_exact(width) {
                            line.clear();
                            let p = log10_prob(f32::from_bits(r[0]));
                            push_line(&mut line, p, &r[2..], vocab, backoff_of_bits(r[1]));
                            text.write_all(line.as_bytes())
                                .map_err(|e| NgramError::io(&dir, e))?;
                        }
                    }
                    let mut file = text
                        .into_inner()
                        .map_err(|e| NgramError::io(&dir, e.into_error()))?;
                    file.rewind().map_err(|e| NgramError::io(&dir, e))?;
                    Ok(file)
                });
                let mut block: Vec<u32> = Vec::with_capacity(block_len);
                let mut read = || -> Result<()> {
                    while let Some(r) = input.next()? {
                        let key = &r[..n];
                        let u = f64::from_bits(get_u64(r, n));
                        let gamma = f64::from_bits(get_u64(r, n + 2));
                        let own = if n < order {
                            r[n + 4]
                        } else {
                            backoff_bits(None)
                        };
                        let is_marked = prunes && r[n + 5] != 0;
                        let lower_p = match &mut lower {
                            None => uni_p[entry_of[key[1] as usize] as usize],
                            Some(low) => {
                                // The suffix key[1..] of an n-gram is among the order below's,
                                // which come in the same (suffix) order.
                                while !(lower_read && low.rec()[..n - 1] == key[1..]) {
                                    lower_read = low.advance()?;
                                    assert!(lower_read, "every n-gram's suffix was estimated");
                                }
                                f32::from_bits(low.rec()[n - 1])
                            }
                        };
                        let p = interpolate(u, gamma, lower_p as f64);
                        if let Some(w) = &mut probs {
                            rec.clear();
                            rec.extend_from_slice(key);
                            rec.push(p.to_bits());
                            w.write(&rec)?;
                        }
                        if !is_marked {
                            kept += 1;
                            block.push(p.to_bits());
                            block.push(own);
                            block.extend_from_slice(key);
                            if block.len() >= block_len {
                                let full =
                                    std::mem::replace(&mut block, Vec::with_capacity(block_len));
                                if tx.send(full).is_err() {
                                    return Ok(()); // the writer failed: its error is reported
                                }
                            }
                        }
                        since += 1;
                        if since == 1 << 16 {
                            progress.advance(since);
                            since = 0;
                        }
                    }
                    if !block.is_empty() {
                        let _ = tx.send(std::mem::take(&mut block));
                    }
                    Ok(())
                };
                let read = read();
                drop(tx);
                let file = writer.join().map_err(|_| {
                    NgramError::io(
                        &dir,
                        std::io::Error::other("the thread writing ARPA lines failed"),
                    )
                })??;
                Ok((file, read))
            })?;
            lines?;
            progress.advance(since);
            progress.finish();
            drop(input);
            lower = probs.map(|w| w.into_reader(n + 1)).transpose()?;
            sections.push(section);
            counts.push(kept);
        }
        drop(lower);

        lmkit_core::write_atomic(path, |w| {
            write_header(w, counts.iter().copied())?;
            writeln!(w, "\n\\1-grams:")?;
            for e in 0..uni.len() {
                if uni_marked[e] {
                    continue;
                }
                let p = if uni.first[e] == BOS_ID {
                    BOS_LOG10_PROB
                } else {
                    log10_prob(uni_p[e])
                };
                line.clear();
                let own = backoff_of_bits(uni_backoff[e]);
                push_line(&mut line, p, &uni.first[e..e + 1], vocab, own);
                w.write_all(line.as_bytes())?;
            }
            for (n, mut section) in (2..).zip(sections) {
                writeln!(w, "\n\\{n}-grams:")?;
                std::io::copy(&mut section, w)?;
            }
            writeln!(w, "\n\\end\\")
        })?;
        Ok(ArpaSummary { counts, discounts })
    }
}
