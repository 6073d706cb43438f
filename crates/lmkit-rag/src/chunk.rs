//! Cutting documents into chunks of at most `max_tokens` tokens (as the embedding model counts
//! them) that end at sentence or paragraph ends, with `overlap` tokens of whole sentences repeated
//! from one chunk into the next. Sentences end at `.`, `!`, `?` (and their full-width forms,
//! `…`), optionally followed by closing quotes or brackets, before whitespace; Korean sentences
//! end the same way (`…이다.`). A line end is also a unit end, and a blank line ends a paragraph:
//! a chunk at least half full ends at a paragraph end rather than take only part of the next
//! paragraph. A sentence longer than a whole chunk is cut at word ends.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkOptions {
    pub max_tokens: usize,
    pub overlap: usize,
}

impl Default for ChunkOptions {
    fn default() -> Self {
        ChunkOptions {
            max_tokens: 200,
            overlap: 40,
        }
    }
}

impl ChunkOptions {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_tokens < 8 {
            return Err(format!(
                "chunk size {} tokens is too small (at least 8)",
                self.max_tokens
            ));
        }
        if self.overlap >= self.max_tokens / 2 {
            return Err(format!(
                "overlap {} must be under half the chunk size ({})",
                self.overlap, self.max_tokens
            ));
        }
        Ok(())
    }
}

/// A chunk: its text and the lines it came from (1-based, inclusive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub text: String,
    pub first_line: usize,
    pub last_line: usize,
}

/// What separates a unit from the one before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gap {
    Space,
    Line,
    Paragraph,
}

struct Unit<'a> {
    text: &'a str,
    line: usize,
    paragraph: usize,
    gap: Gap,
    tokens: usize,
}

const ENDS: &[char] = &['.', '!', '?', '。', '！', '？', '…'];
const CLOSERS: &[char] = &['"', '\'', '”', '’', ')', ']', '」', '』', '》', '〉'];

/// The sentences of one line, trimmed.
fn sentences(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut chars = line.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        if !ENDS.contains(&c) {
            continue;
        }
        while let Some(&(_, n)) = chars.peek() {
            if ENDS.contains(&n) || CLOSERS.contains(&n) {
                chars.next();
            } else {
                break;
            }
        }
        match chars.peek() {
            Some(&(j, n)) if n.is_whitespace() => {
                out.push(line[start..j].trim());
                start = j;
            }
            _ => {}
        }
    }
    out.push(line[start..].trim());
    out.retain(|s| !s.is_empty());
    out
}

/// Cuts a sentence of more than `max` tokens into pieces of at most about `max` tokens at word
/// ends (or inside a word, for a single word longer than that).
fn split_long<'a>(s: &'a str, max: usize, count: &mut dyn FnMut(&str) -> usize) -> Vec<&'a str> {
    let mut words: Vec<(usize, usize)> = Vec::new(); // byte ranges
    let mut begin = None;
    for (i, c) in s.char_indices() {
        match (c.is_whitespace(), begin) {
            (false, None) => begin = Some(i),
            (true, Some(b)) => {
                words.push((b, i));
                begin = None;
            }
            _ => {}
        }
    }
    if let Some(b) = begin {
        words.push((b, s.len()));
    }
    let mut out = Vec::new();
    let (mut from, mut used) = (None::<usize>, 0usize);
    for &(b, e) in &words {
        let n = count(&s[b..e]).max(1);
        if n > max {
            if let Some(f) = from.take() {
                out.push(s[f..b].trim_end());
            }
            used = 0;
            // One huge word: equal character runs of about `max` tokens each.
            let mut at: Vec<usize> = s[b..e].char_indices().map(|(i, _)| b + i).collect();
            let chars = at.len();
            at.push(e);
            let per = chars.div_ceil(n.div_ceil(max) + 1).max(1);
            for k in (0..chars).step_by(per) {
                out.push(&s[at[k]..at[(k + per).min(chars)]]);
            }
            continue;
        }
        if used + n > max {
            if let Some(f) = from.take() {
                out.push(s[f..b].trim_end());
            }
            used = 0;
        }
        from.get_or_insert(b);
        used += n;
    }
    if let Some(f) = from {
        out.push(&s[f..]);
    }
    out.retain(|p| !p.is_empty());
    out
}

/// The chunks of `text`, whose first line is line `first_line` of its file. `count` gives the
/// number of tokens of a piece of text.
pub fn chunk(
    text: &str,
    first_line: usize,
    count: &mut dyn FnMut(&str) -> usize,
    opts: ChunkOptions,
) -> Vec<Piece> {
    let max = opts.max_tokens.max(1);
    let mut units: Vec<Unit> = Vec::new();
    let (mut paragraph, mut blank) = (0usize, false);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            blank = true;
            continue;
        }
        if blank && !units.is_empty() {
            paragraph += 1;
        }
        let mut gap = match (units.is_empty(), blank) {
            (true, _) => Gap::Line,
            (false, true) => Gap::Paragraph,
            (false, false) => Gap::Line,
        };
        blank = false;
        for s in sentences(line) {
            let n = count(s);
            let parts = if n > max {
                split_long(s, max, count)
            } else {
                vec![s]
            };
            for p in parts {
                let tokens = if n <= max { n } else { count(p) };
                units.push(Unit {
                    text: p,
                    line: first_line + i,
                    paragraph,
                    gap,
                    tokens,
                });
                gap = Gap::Space;
            }
        }
    }
    // Tokens in each paragraph, to keep paragraphs whole where they fit.
    let mut para_tokens = vec![0usize; paragraph + 1];
    for u in &units {
        para_tokens[u.paragraph] += u.tokens;
    }
    let mut out = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut used = 0usize;
    for (i, u) in units.iter().enumerate() {
        if !cur.is_empty() {
            let starts_paragraph = u.gap == Gap::Paragraph;
            let full = used + u.tokens > max;
            let break_here =
                starts_paragraph && used * 2 >= max && para_tokens[u.paragraph] > max - used;
            if full || break_here {
                out.push(piece(&units, &cur));
                // Carry whole sentences from the end of the chunk, within the same paragraph.
                let mut keep = Vec::new();
                let mut kept = 0;
                if !starts_paragraph {
                    for &j in cur.iter().rev() {
                        let t = units[j].tokens;
                        if kept + t > opts.overlap || kept + t + u.tokens > max {
                            break;
                        }
                        kept += t;
                        keep.push(j);
                    }
                }
                keep.reverse();
                if keep.len() == cur.len() {
                    keep.clear();
                    kept = 0;
                }
                cur = keep;
                used = kept;
            }
        }
        cur.push(i);
        used += u.tokens;
    }
    if !cur.is_empty() {
        out.push(piece(&units, &cur));
    }
    out
}

fn piece(units: &[Unit], idx: &[usize]) -> Piece {
    let mut text = String::new();
    for (k, &i) in idx.iter().enumerate() {
        if k > 0 {
            text.push_str(match units[i].gap {
                Gap::Space => " ",
                Gap::Line => "\n",
                Gap::Paragraph => "\n\n",
            });
        }
        text.push_str(units[i].text);
    }
    Piece {
        text,
        first_line: units[idx[0]].line,
        last_line: units[idx[idx.len() - 1]].line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    #[test]
    fn sentences_end_at_marks_before_whitespace() {
        assert_eq!(
            sentences("He said \"go.\" Then 3.5 left! 대한민국은 민주공화국이다. 끝"),
            vec![
                "He said \"go.\"",
                "Then 3.5 left!",
                "대한민국은 민주공화국이다.",
                "끝"
            ]
        );
    }

    #[test]
    fn chunks_hold_whole_sentences_and_overlap() {
        let text = (1..=30)
            .map(|i| format!("Sentence number {i} is here."))
            .collect::<Vec<_>>()
            .join(" ");
        let opts = ChunkOptions {
            max_tokens: 20,
            overlap: 5,
        };
        let c = chunk(&text, 1, &mut words, opts);
        assert!(c.len() > 5);
        for p in &c {
            assert!(words(&p.text) <= 20, "{}", p.text);
            assert!(p.text.ends_with("here."), "{}", p.text);
        }
        // Each chunk after the first starts with the last sentence of the one before.
        for w in c.windows(2) {
            let last = w[0].text.rsplit(" Sentence").next().unwrap();
            assert!(w[1].text.contains(last.trim_start_matches(' ')));
        }
    }

    #[test]
    fn line_ranges_and_paragraph_ends() {
        let text = "one two three.\nfour five.\n\nsix seven eight nine ten.\neleven.";
        let opts = ChunkOptions {
            max_tokens: 8,
            overlap: 2,
        };
        let c = chunk(text, 10, &mut words, opts);
        assert_eq!(c[0].text, "one two three.\nfour five.");
        assert_eq!((c[0].first_line, c[0].last_line), (10, 11));
        assert_eq!(c[1].text, "six seven eight nine ten.\neleven.");
        assert_eq!((c[1].first_line, c[1].last_line), (13, 14));
    }

    #[test]
    fn long_sentences_are_cut_at_words() {
        let text = (0..50)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let opts = ChunkOptions {
            max_tokens: 16,
            overlap: 0,
        };
        let c = chunk(&text, 1, &mut words, opts);
        let all: Vec<&str> = c.iter().flat_map(|p| p.text.split_whitespace()).collect();
        assert_eq!(all.len(), 50);
        assert!(c.iter().all(|p| words(&p.text) <= 16));
        // A single word longer than a chunk is cut inside.
        let mut chars = |s: &str| s.chars().count();
        let long = "x".repeat(100);
        let c = chunk(&long, 1, &mut chars, opts);
        assert_eq!(c.iter().map(|p| p.text.len()).sum::<usize>(), 100);
        assert!(c.iter().all(|p| p.text.len() <= 16), "{c:?}");
    }
}
