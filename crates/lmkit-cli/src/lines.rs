//! Reading text lines from a file or standard input, with errors naming the line.

use anyhow::{Context, Result};
use std::io::BufRead;
use std::path::Path;

/// Lines of `path` (or stdin), with a clear error on invalid UTF-8.
pub fn read_lines(path: Option<&Path>) -> Result<Vec<String>> {
    let (reader, name): (Box<dyn BufRead>, String) = match path {
        Some(p) => (
            Box::new(std::io::BufReader::new(
                std::fs::File::open(p).with_context(|| format!("{}", p.display()))?,
            )),
            p.display().to_string(),
        ),
        None => (Box::new(std::io::stdin().lock()), "<stdin>".to_string()),
    };
    let mut out = Vec::new();
    for (i, line) in reader.split(b'\n').enumerate() {
        let bytes = line.with_context(|| name.clone())?;
        let s = String::from_utf8(bytes).map_err(|e| {
            anyhow::anyhow!(
                "{name}:{}: line is not valid UTF-8 (byte {})",
                i + 1,
                e.utf8_error().valid_up_to()
            )
        })?;
        out.push(s.trim_end_matches('\r').to_string());
    }
    Ok(out)
}
