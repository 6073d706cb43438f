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
/// time, so that a large input is never held whole; invalid UTF-8 is an error naming the line.
pub fn for_line_chunks(
    path: Option<&Path>,
    chunk: usize,
    mut f: impl FnMut(Vec<String>) -> Result<()>,
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
    let mut buf = Vec::new();
    let mut buffered = 0;
    for (i, line) in reader.split(b'\n').enumerate() {
        let bytes = line.with_context(|| name.clone())?;
        let mut s = String::from_utf8(bytes).map_err(|e| {
            anyhow::anyhow!(
                "{name}:{}: line is not valid UTF-8 (byte {})",
                i + 1,
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
