//! Reading text lines from a file or standard input, with errors naming the line.

use anyhow::{Context, Result};
use lmkit_tokenize::CHUNK_BYTES;
use std::io::BufRead;
use std::path::Path;

/// Lines of `path` (or stdin), with a clear error on invalid UTF-8.
pub fn read_lines(path: Option<&Path>) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for_line_chunks(path, usize::MAX, |chunk| {
        out.extend(chunk);
        Ok(())
    })?;
    Ok(out)
}

/// Streams the lines of `path` (or stdin) to `f`, `chunk` lines (or [`CHUNK_BYTES`] of text) at a
/// time, so that a large input is never held whole; invalid UTF-8 and a line over
/// [`lmkit_core::MAX_LINE_BYTES`] are errors naming the line.
pub fn for_line_chunks(
    path: Option<&Path>,
    chunk: usize,
    f: impl FnMut(Vec<String>) -> Result<()>,
) -> Result<()> {
    let (reader, name): (Box<dyn BufRead>, String) = match path {
        Some(p) => (
            Box::new(std::io::BufReader::with_capacity(
                1 << 20,
                std::fs::File::open(p).with_context(|| format!("{}", p.display()))?,
            )),
            p.display().to_string(),
        ),
        None => (Box::new(std::io::stdin().lock()), "<stdin>".to_string()),
    };
    line_chunks(reader, &name, chunk, lmkit_core::MAX_LINE_BYTES, f)
}

/// [`for_line_chunks`] on `reader` (called `name` in errors), its lines at most `max_line` bytes.
fn line_chunks(
    mut reader: impl BufRead,
    name: &str,
    chunk: usize,
    max_line: usize,
    mut f: impl FnMut(Vec<String>) -> Result<()>,
) -> Result<()> {
    let mut buf = Vec::new();
    let mut buffered = 0;
    for i in 1.. {
        let mut bytes = Vec::new();
        let n = lmkit_core::read_line_within(&mut reader, &mut bytes, max_line)
            .with_context(|| format!("{name}:{i}"))?;
        if n == 0 {
            break;
        }
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        let mut s = String::from_utf8(bytes).map_err(|e| {
            anyhow::anyhow!(
                "{name}:{i}: line is not valid UTF-8 (byte {})",
                e.utf8_error().valid_up_to()
            )
        })?;
        if s.ends_with('\r') {
            s.pop();
        }
        buffered += s.len();
        buf.push(s);
        if buf.len() >= chunk || buffered >= CHUNK_BYTES {
            buffered = 0;
            f(std::mem::take(&mut buf))?;
        }
    }
    if !buf.is_empty() {
        f(buf)?;
    }
    Ok(())
}

/// `lmkit ngram rank` / `lmkit eval rank`: candidates from the arguments and `input` (non-empty
/// lines), scored by `log10`, printed most likely first as `rank<TAB>log10 p<TAB>sentence`.
pub fn rank(
    mut candidates: Vec<String>,
    input: Option<&Path>,
    mut log10: impl FnMut(&str) -> Result<f64>,
) -> Result<()> {
    if let Some(p) = input {
        candidates.extend(
            read_lines(Some(p))?
                .into_iter()
                .filter(|l| !l.trim().is_empty()),
        );
    }
    if candidates.is_empty() {
        anyhow::bail!("no candidates: give sentences as arguments or --input FILE");
    }
    let mut scored = Vec::with_capacity(candidates.len());
    for (i, c) in candidates.iter().enumerate() {
        scored.push((log10(c)?, i, c));
    }
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    for (rank, (lp, _, c)) in scored.iter().enumerate() {
        println!("{}\t{:.6}\t{}", rank + 1, lp, c);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(reader: impl BufRead, max_line: usize) -> Result<Vec<String>> {
        let mut out = Vec::new();
        line_chunks(reader, "in.txt", 2, max_line, |c| {
            out.extend(c);
            Ok(())
        })?;
        Ok(out)
    }

    /// Lines as `split(b'\n')` gives them (a last line without its end, `\r\n` ends), up to the
    /// longest line allowed; an endless line (/dev/zero) is an error naming the line, where it
    /// grew the buffer until the allocation aborted.
    #[test]
    fn lines_end_at_newlines_and_an_endless_one_is_an_error() {
        let read = |text: &str| lines(text.as_bytes(), 4).unwrap();
        assert_eq!(read("ab\r\ncd\n\nefgh"), ["ab", "cd", "", "efgh"]);
        assert_eq!(read("abcd\n"), ["abcd"]);
        assert_eq!(read(""), Vec::<String>::new());
        let e = format!("{:#}", lines("abcde\n".as_bytes(), 4).unwrap_err());
        assert!(e.starts_with("in.txt:1: line is longer than"), "{e}");
        let endless = std::io::Read::chain("ab\n".as_bytes(), std::io::repeat(0));
        let endless = std::io::BufReader::new(endless);
        let e = format!("{:#}", lines(endless, 1 << 20).unwrap_err());
        assert!(e.starts_with("in.txt:2: line is longer than 1 MiB"), "{e}");
        let e = lines(&b"ok\n\xff\n"[..], 4).unwrap_err().to_string();
        assert!(e.contains("in.txt:2: line is not valid UTF-8"), "{e}");
    }
}
