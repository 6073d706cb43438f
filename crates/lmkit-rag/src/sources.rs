//! Reading the documents to index: text files (`.txt`, `.md`, `.markdown`, `.rst`, `.text`; a
//! file is one document, its line numbers kept) and JSONL (`.jsonl`: an object per line, the
//! text in `text_field`, its other string, number and boolean fields kept as metadata), plain or
//! gzip-compressed (`.gz`).

use crate::{RagError, Result};
use lmkit_core::PathError;
use serde_json::{Map, Value};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

pub struct Document {
    /// The file the document came from.
    pub source: String,
    /// The line of the file where the text starts (1-based).
    pub first_line: usize,
    pub text: String,
    pub meta: Map<String, Value>,
}

const TEXT: &[&str] = &[".txt", ".md", ".markdown", ".rst", ".text"];

fn kind(name: &str) -> Option<bool> {
    let name = name.to_ascii_lowercase();
    let stem = name.strip_suffix(".gz").unwrap_or(&name);
    if stem.ends_with(".jsonl") {
        Some(true)
    } else if TEXT.iter().any(|e| stem.ends_with(e)) {
        Some(false)
    } else {
        None
    }
}

/// The files below `paths` that can be indexed, in order, without repeats.
pub fn collect(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        let found = lmkit_core::collect_inputs(
            p,
            "a directory is searched for .txt, .md, .rst and .jsonl files (plain or .gz)",
            |name| kind(name).is_some(),
        )
        .map_err(|e| RagError::Invalid(e.to_string()))?;
        for f in found {
            if !out.contains(&f) {
                out.push(f);
            }
        }
    }
    Ok(out)
}

fn open(path: &Path) -> Result<Box<dyn BufRead>> {
    Ok(lmkit_core::decompress::open_text(path)?)
}

/// The documents of one file. A file named on the command line that is neither text nor JSONL
/// is read as text.
pub fn read(path: &Path, text_field: &str) -> Result<Vec<Document>> {
    let source = path.display().to_string();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut r = open(path)?;
    if kind(&name) != Some(true) {
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes)
            .map_err(|e| PathError::new(path, e))?;
        let text = String::from_utf8(bytes).map_err(|e| RagError::Input {
            path: path.to_path_buf(),
            line: 1,
            what: format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        })?;
        return Ok(vec![Document {
            source,
            first_line: 1,
            text,
            meta: Map::new(),
        }]);
    }
    let mut out = Vec::new();
    for (i, line) in lmkit_core::lines_within(r).enumerate() {
        let bad = |what: String| RagError::Input {
            path: path.to_path_buf(),
            line: i + 1,
            what,
        };
        let line = line.map_err(|e| bad(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(&line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let Value::Object(mut obj) = v else {
            return Err(bad("expected a JSON object".into()));
        };
        let text = match obj.remove(text_field) {
            Some(Value::String(s)) => s,
            Some(_) => return Err(bad(format!("`{text_field}` is not a string"))),
            None => {
                return Err(bad(format!(
                    "no `{text_field}` field (choose the text field with --text-field)"
                )))
            }
        };
        let meta = obj
            .into_iter()
            .filter(|(_, v)| matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_)))
            .collect();
        out.push(Document {
            source: source.clone(),
            first_line: i + 1,
            text,
            meta,
        });
    }
    Ok(out)
}
