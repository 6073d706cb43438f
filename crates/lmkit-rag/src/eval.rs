//! Retrieval quality on a question set: hit@k (a relevant chunk among the first k) and MRR (the
//! mean of 1/rank of the first relevant chunk, 0 when none is found in the depth searched).
//!
//! Questions are JSONL rows `{"question", "source", "lines": [first, last]}`: a chunk is relevant
//! when it comes from `source` (the path as the index records it, or a path ending with it) and
//! its line range overlaps `lines`.

use crate::{Found, RagError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Question {
    pub question: String,
    pub source: String,
    pub lines: [usize; 2],
    #[serde(default)]
    pub lang: Option<String>,
}

/// Reads a question set, naming the file and line of a bad row.
pub fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let f = std::fs::File::open(path).map_err(|e| lmkit_core::PathError::new(path, e))?;
    let mut out = Vec::new();
    for (i, line) in lmkit_core::lines_within(std::io::BufReader::new(f)).enumerate() {
        let line = line.map_err(|e| RagError::Input {
            path: path.to_path_buf(),
            line: i + 1,
            what: e.to_string(),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let q: Question = serde_json::from_str(&line).map_err(|e| RagError::Input {
            path: path.to_path_buf(),
            line: i + 1,
            what: format!("{e} (expected {{\"question\", \"source\", \"lines\": [first, last]}})"),
        })?;
        if q.lines[0] > q.lines[1] {
            return Err(RagError::Input {
                path: path.to_path_buf(),
                line: i + 1,
                what: format!("lines {:?}: the first is after the last", q.lines),
            });
        }
        out.push(q);
    }
    if out.is_empty() {
        return Err(RagError::Invalid(format!(
            "{}: no questions",
            path.display()
        )));
    }
    Ok(out)
}

/// Whether a result answers `q`.
pub fn relevant(f: &Found, q: &Question) -> bool {
    let same = f.source == q.source
        || f.source
            .ends_with(&format!("/{}", q.source.trim_start_matches("./")));
    same && f.lines[0] <= q.lines[1] && q.lines[0] <= f.lines[1]
}

/// The rank (1-based) of the first relevant result.
pub fn first_relevant(found: &[Found], q: &Question) -> Option<usize> {
    found.iter().position(|f| relevant(f, q)).map(|i| i + 1)
}

/// Hit rates and MRR over ranks (None: not found within the depth searched).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Scores {
    pub questions: usize,
    pub hit_at_1: f64,
    pub hit_at_5: f64,
    pub hit_at_k: f64,
    pub mrr: f64,
}

pub fn score(ranks: &[Option<usize>], k: usize) -> Scores {
    let n = ranks.len().max(1) as f64;
    let hit = |at: usize| ranks.iter().filter(|r| r.is_some_and(|r| r <= at)).count() as f64 / n;
    Scores {
        questions: ranks.len(),
        hit_at_1: hit(1),
        hit_at_5: hit(5),
        hit_at_k: hit(k),
        mrr: ranks
            .iter()
            .map(|r| r.map_or(0.0, |r| 1.0 / r as f64))
            .sum::<f64>()
            / n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A question file without line ends (here a sparse file of zeros) is an error naming its
    /// line, not a buffer grown until an allocation aborts.
    #[test]
    fn a_question_file_without_line_ends_is_an_error_naming_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.jsonl");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(lmkit_core::MAX_LINE_BYTES as u64 + 10).unwrap();
        let e = read_questions(&path).unwrap_err().to_string();
        assert!(
            e.contains("q.jsonl") && e.contains(":1") && e.contains("longer than 256 MiB"),
            "{e}"
        );
    }

    #[test]
    fn hit_rates_and_reciprocal_ranks() {
        let s = score(&[Some(1), Some(3), None, Some(10)], 10);
        assert_eq!(s.hit_at_1, 0.25);
        assert_eq!(s.hit_at_5, 0.5);
        assert_eq!(s.hit_at_k, 0.75);
        assert!((s.mrr - (1.0 + 1.0 / 3.0 + 0.1) / 4.0).abs() < 1e-12);
    }
}
