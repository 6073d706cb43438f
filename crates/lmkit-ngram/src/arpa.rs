//! ARPA back-off model files (the text format of SRILM and KenLM), read and written.

use crate::error::{NgramError, Result};
use crate::tables::{Keys, NgramTables, OrderEntries};
use crate::tokenize::{Tokenization, BOS, EOS, UNK};
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use std::fmt::Display;
use std::io::{BufRead, Write};
use std::path::Path;

/// log10 probability given to `<unk>` when an ARPA file lacks it (as KenLM does).
pub const MISSING_UNK_LOG10_PROB: f32 = -100.0;

/// Writes `tables` as ARPA. Entries of each order are written in table order (the lines of a
/// few blocks of entries are made in parallel, then written in order).
pub fn write_arpa(tables: &NgramTables, w: &mut impl Write) -> std::io::Result<()> {
    const BLOCK: usize = 1 << 15;
    let batch = 4 * rayon::current_num_threads();
    write_header(w, tables.orders.iter().map(|o| o.len() as u64))?;
    for o in &tables.orders {
        writeln!(w, "\n\\{}-grams:", o.n)?;
        let blocks = o.len().div_ceil(BLOCK);
        for first in (0..blocks).step_by(batch) {
            let texts: Vec<String> = (first..blocks.min(first + batch))
                .into_par_iter()
                .map(|b| arpa_lines(tables, o, b * BLOCK..o.len().min((b + 1) * BLOCK)))
                .collect();
            for t in texts {
                w.write_all(t.as_bytes())?;
            }
        }
    }
    writeln!(w, "\n\\end\\")
}

/// `\data\` and the `ngram N=count` line of each order (`counts` from order 1).
pub(crate) fn write_header(
    w: &mut impl Write,
    counts: impl Iterator<Item = u64>,
) -> std::io::Result<()> {
    writeln!(w, "\\data\\")?;
    for (n, c) in (1..).zip(counts) {
        writeln!(w, "ngram {n}={c}")?;
    }
    Ok(())
}

/// Appends one entry's ARPA line to `text`: `prob TAB words [TAB back-off]`.
pub(crate) fn push_line(
    text: &mut String,
    log10_prob: f32,
    key: &[u32],
    vocab: &[String],
    log10_backoff: Option<f32>,
) {
    use std::fmt::Write as _;
    // `{}` on f32 prints the shortest text that reads back to the same f32.
    let _ = write!(text, "{log10_prob}\t");
    for (k, &id) in key.iter().enumerate() {
        if k > 0 {
            text.push(' ');
        }
        text.push_str(&vocab[id as usize]);
    }
    if let Some(b) = log10_backoff {
        let _ = write!(text, "\t{b}");
    }
    text.push('\n');
}

/// The ARPA lines of entries `range` of order `o`.
fn arpa_lines(tables: &NgramTables, o: &OrderEntries, range: std::ops::Range<usize>) -> String {
    let mut text = String::with_capacity(range.len() * (12 + 8 * o.n));
    for i in range {
        let key = tables.key(o.n, i);
        push_line(
            &mut text,
            o.log10_prob[i],
            &key,
            &tables.vocab,
            o.log10_backoff.get(i),
        );
    }
    text
}

/// Writes an ARPA file atomically (temporary file, fsync, rename).
pub fn save_arpa(tables: &NgramTables, path: &Path) -> Result<()> {
    Ok(lmkit_core::write_atomic(path, |w| write_arpa(tables, w))?)
}

struct LineReader<'a, R: BufRead> {
    r: R,
    path: &'a Path,
    line_no: u64,
    buf: String,
    /// False when the last line read had no newline: the file ended mid-line.
    complete: bool,
}

impl<'a, R: BufRead> LineReader<'a, R> {
    fn next(&mut self) -> Result<Option<&str>> {
        // The line's buffer is reused from line to line.
        let mut bytes = std::mem::take(&mut self.buf).into_bytes();
        bytes.clear();
        let n =
            match lmkit_core::read_line_within(&mut self.r, &mut bytes, lmkit_core::MAX_LINE_BYTES)
            {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    self.line_no += 1;
                    self.complete = true;
                    return Err(self.err(e.to_string()));
                }
                Err(e) => return Err(NgramError::io(self.path, e)),
            };
        if n == 0 {
            return Ok(None);
        }
        self.line_no += 1;
        self.complete = bytes.ends_with(b"\n");
        match String::from_utf8(bytes) {
            Ok(s) => self.buf = s,
            Err(e) => {
                return Err(self.err(format!(
                    "invalid UTF-8 at byte {}",
                    e.utf8_error().valid_up_to()
                )))
            }
        }
        Ok(Some(self.buf.trim_end_matches(['\n', '\r'])))
    }

    fn err(&self, msg: impl Into<String>) -> NgramError {
        self.err_at(self.line_no, msg)
    }

    /// An error at line `line` (already read).
    fn err_at(&self, line: u64, msg: impl Into<String>) -> NgramError {
        let mut msg = msg.into();
        if line == self.line_no && !self.complete {
            msg.push_str(" (the file ends mid-line: truncated?)");
        }
        NgramError::Arpa {
            path: self.path.to_path_buf(),
            line,
            msg,
        }
    }

    /// Next line that is not blank; an error at end of file.
    fn next_nonblank(&mut self, expecting: &str) -> Result<String> {
        let mut line = String::new();
        self.next_nonblank_into(&mut line, expecting)?;
        Ok(line)
    }

    /// [`LineReader::next_nonblank`] into `line` (`expecting` is only written out for an error).
    fn next_nonblank_into(&mut self, line: &mut String, expecting: impl Display) -> Result<()> {
        loop {
            match self.next()? {
                None => {
                    return Err(self.err(format!(
                        "unexpected end of file (truncated?) while expecting {expecting}"
                    )))
                }
                Some(l) if l.trim().is_empty() => continue,
                Some(l) => {
                    line.clear();
                    line.push_str(l);
                    return Ok(());
                }
            }
        }
    }
}

/// Reads an ARPA model. Text before `\data\` is ignored, as in other ARPA readers.
pub fn read_arpa(r: impl BufRead, path: &Path, tokenization: Tokenization) -> Result<NgramTables> {
    let mut lr = LineReader {
        r,
        path,
        line_no: 0,
        buf: String::new(),
        complete: true,
    };
    loop {
        match lr.next()? {
            None => return Err(lr.err("no `\\data\\` header found; is this an ARPA file?")),
            Some(l) if l.trim() == "\\data\\" => break,
            Some(_) => {}
        }
    }
    let mut declared: Vec<usize> = Vec::new();
    let first_section = loop {
        let l = lr.next_nonblank("`ngram N=count` lines")?;
        let l = l.trim();
        if let Some(rest) = l.strip_prefix("ngram ") {
            let (n, c) = rest
                .split_once('=')
                .ok_or_else(|| lr.err(format!("expected `ngram N=count`, got `{l}`")))?;
            let n: usize = n
                .trim()
                .parse()
                .map_err(|_| lr.err(format!("bad order in `{l}`")))?;
            let c: usize = c
                .trim()
                .parse()
                .map_err(|_| lr.err(format!("bad count in `{l}`")))?;
            if n != declared.len() + 1 {
                return Err(lr.err(format!("orders must be declared as 1, 2, 3...; got `{l}`")));
            }
            declared.push(c);
        } else {
            break l.to_string();
        }
    };
    if declared.is_empty() {
        return Err(lr.err("no `ngram N=count` lines after `\\data\\`"));
    }

    let mut vocab: Vec<String> = Vec::new();
    let mut ids: FxHashMap<String, u32> = FxHashMap::default();
    let mut orders = Vec::new();
    let mut header = first_section;
    for (idx, &count) in declared.iter().enumerate() {
        let n = idx + 1;
        if header.trim() != format!("\\{n}-grams:") {
            return Err(lr.err(format!("expected `\\{n}-grams:`, got `{}`", header.trim())));
        }
        let mut o = OrderEntries {
            n,
            ..Default::default()
        };
        // The declared count is not trusted for memory: a damaged header would ask for any size
        // (the entries are counted against it as they are read).
        let mut keys: Vec<u32> = Vec::with_capacity(count.min(1 << 20).saturating_mul(n));
        if n == 1 {
            // Unigrams, one line at a time: each new word gets the next id.
            let mut l = String::new();
            let mut out = Parsed::default();
            for k in 0..count {
                lr.next_nonblank_into(&mut l, format_args!("{count} {n}-grams (read {k})"))?;
                parse_entry(&l, n, &mut out, |w| {
                    let id = vocab.len() as u32;
                    if ids.insert(w.to_string(), id).is_some() {
                        return Err(format!("unigram `{w}` appears twice"));
                    }
                    vocab.push(w.to_string());
                    Ok(id)
                })
                .map_err(|msg| lr.err(msg))?;
                if out.section_ended {
                    return Err(lr.err(format!("section ended after {k} of {count} {n}-grams")));
                }
            }
            keys = out.keys;
            o.log10_prob = out.probs;
            out.backoffs
                .into_iter()
                .for_each(|b| o.log10_backoff.push(b));
        } else {
            // Higher orders: lines are read in batches and parsed in parallel (the words are
            // known by then).
            let mut read = 0usize;
            let mut text = String::new();
            let mut lines: Vec<(u64, usize)> = Vec::new();
            let mut l = String::new();
            while read < count {
                let batch = (count - read).min(ARPA_BATCH);
                text.clear();
                lines.clear();
                for k in read..read + batch {
                    lr.next_nonblank_into(&mut l, format_args!("{count} {n}-grams (read {k})"))?;
                    text.push_str(&l);
                    lines.push((lr.line_no, text.len()));
                }
                let parsed: Vec<std::result::Result<Parsed, (u64, String)>> = lines
                    .par_chunks(ARPA_PIECE)
                    .enumerate()
                    .map(|(c, piece)| {
                        let mut start = if c == 0 {
                            0
                        } else {
                            lines[c * ARPA_PIECE - 1].1
                        };
                        let mut out = Parsed::default();
                        for (i, &(line_no, end)) in piece.iter().enumerate() {
                            let k = read + c * ARPA_PIECE + i;
                            parse_entry(&text[start..end], n, &mut out, |w| {
                                ids.get(w)
                                    .copied()
                                    .ok_or_else(|| format!("word `{w}` is not among the unigrams"))
                            })
                            .map_err(|msg| (line_no, msg))?;
                            if out.section_ended {
                                return Err((
                                    line_no,
                                    format!("section ended after {k} of {count} {n}-grams"),
                                ));
                            }
                            start = end;
                        }
                        Ok(out)
                    })
                    .collect();
                for p in parsed {
                    let p = p.map_err(|(line, msg)| lr.err_at(line, msg))?;
                    keys.extend_from_slice(&p.keys);
                    o.log10_prob.extend_from_slice(&p.probs);
                    p.backoffs.into_iter().for_each(|b| o.log10_backoff.push(b));
                }
                read += batch;
            }
        }
        o.keys = Keys::Flat(keys);
        orders.push(o);
        header = lr.next_nonblank(if n == declared.len() {
            "`\\end\\`"
        } else {
            "the next section"
        })?;
    }
    if header.trim() != "\\end\\" {
        return Err(lr.err(format!("expected `\\end\\`, got `{}`", header.trim())));
    }
    for special in [BOS, EOS] {
        if !ids.contains_key(special) {
            return Err(lr.err(format!("the model has no `{special}` unigram")));
        }
    }
    if !ids.contains_key(UNK) {
        vocab.push(UNK.to_string());
        if let Keys::Flat(keys) = &mut orders[0].keys {
            keys.push(vocab.len() as u32 - 1);
        }
        orders[0].log10_prob.push(MISSING_UNK_LOG10_PROB);
        orders[0].log10_backoff.push(None);
    }
    Ok(NgramTables {
        vocab,
        orders,
        tokenization,
    })
}

/// Lines of an order above the unigrams read before they are parsed (in parallel).
const ARPA_BATCH: usize = 1 << 16;
/// Lines one parallel task parses.
const ARPA_PIECE: usize = 1 << 12;

/// Entries parsed from (a piece of) a section.
#[derive(Default)]
struct Parsed {
    keys: Vec<u32>,
    probs: Vec<f32>,
    backoffs: Vec<Option<f32>>,
    /// A line held the next section's header (fewer entries than declared).
    section_ended: bool,
}

/// Parses one entry of order `n` into `out`, each word's id given by `id_of`; an error's message.
fn parse_entry(
    l: &str,
    n: usize,
    out: &mut Parsed,
    mut id_of: impl FnMut(&str) -> std::result::Result<u32, String>,
) -> std::result::Result<(), String> {
    let mut fields = entry_fields(l);
    let f32_of = |s: Option<&str>, what: &str| {
        let s = s.ok_or_else(|| format!("missing {what}"))?;
        s.parse::<f32>().map_err(|_| format!("bad {what} `{s}`"))
    };
    let prob = f32_of(fields.next(), "probability")?;
    for _ in 0..n {
        let w = fields
            .next()
            .ok_or_else(|| format!("expected {n} words in `{l}`"))?;
        if w.starts_with('\\') {
            out.section_ended = true;
            return Ok(());
        }
        out.keys.push(id_of(w)?);
    }
    let backoff = match fields.next() {
        None => None,
        b => Some(f32_of(b, "back-off weight")?),
    };
    if fields.next().is_some() {
        return Err(format!("too many fields for a {n}-gram in `{l}`"));
    }
    out.probs.push(prob);
    out.backoffs.push(backoff);
    Ok(())
}

/// The fields of an ARPA entry: `prob TAB w1 w2 … TAB back-off`, as lmplz and SRILM write them,
/// split at the tabs and the words at single spaces — so a vertical tab or form feed inside a word
/// (lmplz keeps them there) stays in it; a line without that tab structure is split at any KenLM
/// space, as KenLM reads it.
fn entry_fields(line: &str) -> impl Iterator<Item = &str> {
    let line = line.trim_end_matches(['\r', '\n']);
    let tabs = line.bytes().filter(|&b| b == b'\t').count();
    if tabs == 1 || tabs == 2 {
        let mut parts = line.split('\t');
        let prob = parts.next();
        let words = parts.next().unwrap_or("");
        either::Either::Left(
            prob.into_iter()
                .chain(words.split(' ').filter(|w| !w.is_empty()))
                .chain(parts),
        )
    } else {
        either::Either::Right(crate::tokenize::kenlm_fields(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file without line ends (/dev/zero given as the model) is an error naming its line, not
    /// a buffer grown until the allocation aborts.
    #[test]
    fn an_endless_line_is_an_error_naming_it() {
        let endless = std::io::BufReader::new(std::io::Read::chain(
            &b"# a model\n"[..],
            std::io::repeat(0),
        ));
        let e = read_arpa(endless, Path::new("m.arpa"), Tokenization::Words).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("m.arpa") && e.contains("line is longer than 256 MiB"),
            "{e}"
        );
        assert!(e.contains('2'), "{e}");
    }

    /// A header declaring an absurd count is an error at the first missing entry, not an
    /// allocation of that size.
    #[test]
    fn a_huge_declared_count_is_not_allocated() {
        let arpa = "\\data\\\nngram 1=1000000000000\n\n\\1-grams:\n-1.0\t<s>\n\\end\\\n";
        let e = read_arpa(arpa.as_bytes(), Path::new("m.arpa"), Tokenization::Words).unwrap_err();
        assert!(e.to_string().contains("m.arpa"), "{e}");
    }

    /// Sections read in parallel pieces: entries keep their order, and an error names its own
    /// line past the first pieces and batches (blank lines counted).
    #[test]
    fn errors_in_later_pieces_name_their_line() {
        let words = 300;
        let bigrams = ARPA_BATCH + 2 * ARPA_PIECE + 7;
        let mut text = format!(
            "\\data\\\nngram 1={}\nngram 2={bigrams}\n\n\\1-grams:\n",
            words + 3
        );
        for w in ["<s>", "</s>", "<unk>"] {
            text.push_str(&format!("-1\t{w}\n"));
        }
        for w in 0..words {
            text.push_str(&format!("-2\tw{w}\t-0.5\n"));
        }
        text.push_str("\n\\2-grams:\n");
        let first_bigram_line = text.lines().count() + 1;
        for b in 0..bigrams {
            text.push_str(&format!("-{}\tw{} w{}\n", b % 7 + 1, b % words, b / words));
            if b == 10 {
                text.push('\n'); // a blank line inside the section
            }
        }
        text.push_str("\n\\end\\\n");
        let t = read_arpa(text.as_bytes(), Path::new("m.arpa"), Tokenization::Words).unwrap();
        assert_eq!(t.orders[1].len(), bigrams);
        for b in [
            0,
            11,
            ARPA_PIECE + 3,
            ARPA_BATCH + ARPA_PIECE + 5,
            bigrams - 1,
        ] {
            assert_eq!(
                t.key(2, b).to_vec(),
                vec![3 + (b % words) as u32, 3 + (b / words) as u32]
            );
            assert_eq!(t.orders[1].log10_prob[b], -((b % 7 + 1) as f32));
        }
        // A bad probability in a later batch: its line (one blank line before it).
        let bad = ARPA_BATCH + ARPA_PIECE + 5;
        let line = first_bigram_line + bad + 1;
        let lines: Vec<&str> = text.lines().collect();
        let mut damaged = lines.clone();
        damaged[line - 1] = "x\tw1 w2";
        let e = read_arpa(
            damaged.join("\n").as_bytes(),
            Path::new("m.arpa"),
            Tokenization::Words,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!("m.arpa:{line}:")) && e.contains("bad probability `x`"),
            "{e}"
        );
        // Fewer entries than declared: the next header ends the section early.
        let short = text.replace(
            &format!("ngram 2={bigrams}"),
            &format!("ngram 2={}", bigrams + 1),
        );
        let e = read_arpa(short.as_bytes(), Path::new("m.arpa"), Tokenization::Words)
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.arpa:"), "{e}");
    }

    /// KenLM's ARPA reader splits fields on ASCII spaces and tabs: a word holding a no-break space
    /// (which lmplz writes as it found it) is one word.
    #[test]
    fn words_with_unicode_spaces_load() {
        let arpa = "\\data\\\nngram 1=4\n\n\\1-grams:\n-1.0\t<s>\t-0.5\n-0.5\t</s>\n-0.7\ta\u{a0}b\t-0.1\n-2.0\t<unk>\n\n\\end\\\n";
        let t = read_arpa(arpa.as_bytes(), Path::new("m.arpa"), Tokenization::Words).unwrap();
        assert!(t.vocab.iter().any(|w| w == "a\u{a0}b"), "{:?}", t.vocab);
        assert_eq!(t.vocab.len(), 4);
    }
}
