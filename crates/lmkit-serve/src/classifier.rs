//! A small trained moderation classifier: two character n-gram language models (modified
//! Kneser-Ney, lmkit-ngram), one trained on examples to flag and one on examples to allow. A text
//! is flagged when its log-likelihood ratio per character, log10 p_flag(text) − log10 p_allow(text)
//! over its length, exceeds a threshold chosen by cross-validation on the training examples.

use lmkit_ngram::{Model, NgramTables, Tokenization};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ClassifierError {
    #[error("{path}: {msg}")]
    Data { path: PathBuf, msg: String },
    #[error(transparent)]
    Ngram(#[from] lmkit_ngram::NgramError),
}

type Result<T> = std::result::Result<T, ClassifierError>;

/// What `classifier.json` holds: the decision rule and how well it did in cross-validation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClassifierInfo {
    pub category: String,
    pub order: usize,
    pub threshold: f64,
    pub folds: usize,
    pub flagged_examples: usize,
    pub allowed_examples: usize,
    /// Cross-validated accuracy, precision and recall of the flag decision.
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
}

pub struct Classifier {
    flagged: Model,
    allowed: Model,
    pub info: ClassifierInfo,
}

fn normalize(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

fn read_examples(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|e| ClassifierError::Data {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let text = String::from_utf8(bytes).map_err(|e| ClassifierError::Data {
        path: path.to_path_buf(),
        msg: format!("not valid UTF-8 ({e})"),
    })?;
    let lines: Vec<String> = text
        .lines()
        .map(normalize)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.len() < 4 {
        return Err(ClassifierError::Data {
            path: path.to_path_buf(),
            msg: format!("{} examples; give at least 4 (one per line)", lines.len()),
        });
    }
    Ok(lines)
}

fn train_tables(lines: &[&String], order: usize, tmp: &Path, name: &str) -> Result<NgramTables> {
    let path = tmp.join(name);
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).map_err(|e| ClassifierError::Data {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let opts = lmkit_ngram::TrainOptions {
        order,
        tokenization: Tokenization::Chars,
        memory_bytes: 64 << 20,
        temp_dir: Some(tmp.to_path_buf()),
        // Folds of small labelled sets can lack the counts the estimate needs.
        estimation: lmkit_ngram::EstimateOptions {
            fallback: Some(lmkit_ngram::FALLBACK_DISCOUNTS),
            ..Default::default()
        },
        ..Default::default()
    };
    Ok(lmkit_ngram::train(&[path], &opts, &lmkit_ngram::NoProgress)?.tables)
}

fn ratio(flagged: &Model, allowed: &Model, text: &str) -> f64 {
    let text = normalize(text);
    if text.is_empty() {
        return f64::NEG_INFINITY;
    }
    let f = flagged.score_line(&text);
    let a = allowed.score_line(&text);
    (f.log10_prob as f64 - a.log10_prob as f64) / f.words.len().max(1) as f64
}

/// The threshold with the best accuracy on `scored` (score, is_flagged), and that accuracy.
fn best_threshold(scored: &mut [(f64, bool)]) -> (f64, f64) {
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = scored.len() as f64;
    let positives = scored.iter().filter(|s| s.1).count();
    // Threshold below everything: all flagged.
    let mut correct = positives;
    let mut best = (scored[0].0 - 1.0, correct);
    for i in 0..scored.len() {
        // Moving the threshold to scored[i] un-flags it.
        if scored[i].1 {
            correct -= 1;
        } else {
            correct += 1;
        }
        let t = match scored.get(i + 1) {
            Some(next) => (scored[i].0 + next.0) / 2.0,
            None => scored[i].0 + 1.0,
        };
        if correct > best.1 {
            best = (t, correct);
        }
    }
    (best.0, best.1 as f64 / n)
}

/// Trains on `flagged_path` and `allowed_path` (one example per line), picks the threshold by
/// `folds`-fold cross-validation, and writes `out/flagged.lmkb`, `out/allowed.lmkb` and
/// `out/classifier.json`.
pub fn train(
    flagged_path: &Path,
    allowed_path: &Path,
    out: &Path,
    order: usize,
    category: &str,
    folds: usize,
) -> Result<ClassifierInfo> {
    let flagged = read_examples(flagged_path)?;
    let allowed = read_examples(allowed_path)?;
    let folds = folds.clamp(2, flagged.len().min(allowed.len()));
    let tmp = tempfile::tempdir().map_err(|e| ClassifierError::Data {
        path: std::env::temp_dir(),
        msg: e.to_string(),
    })?;
    let mut scored: Vec<(f64, bool)> = Vec::new();
    for k in 0..folds {
        fn part(v: &[String], folds: usize, k: usize, held: bool) -> Vec<&String> {
            v.iter()
                .enumerate()
                .filter(|(i, _)| (i % folds == k) == held)
                .map(|(_, s)| s)
                .collect()
        }
        let fm = train_tables(&part(&flagged, folds, k, false), order, tmp.path(), "f.txt")?;
        let am = train_tables(&part(&allowed, folds, k, false), order, tmp.path(), "a.txt")?;
        let (fm, am) = (
            Model::from_tables(&fm, Path::new("flagged")),
            Model::from_tables(&am, Path::new("allowed")),
        );
        scored.extend(
            part(&flagged, folds, k, true)
                .iter()
                .map(|t| (ratio(&fm, &am, t), true)),
        );
        scored.extend(
            part(&allowed, folds, k, true)
                .iter()
                .map(|t| (ratio(&fm, &am, t), false)),
        );
    }
    let (threshold, accuracy) = best_threshold(&mut scored);
    let tp = scored.iter().filter(|s| s.1 && s.0 > threshold).count() as f64;
    let fp = scored.iter().filter(|s| !s.1 && s.0 > threshold).count() as f64;
    let info = ClassifierInfo {
        category: category.to_string(),
        order,
        threshold,
        folds,
        flagged_examples: flagged.len(),
        allowed_examples: allowed.len(),
        accuracy,
        precision: if tp + fp > 0.0 { tp / (tp + fp) } else { 0.0 },
        recall: tp / flagged.len() as f64,
    };
    std::fs::create_dir_all(out).map_err(|e| ClassifierError::Data {
        path: out.to_path_buf(),
        msg: e.to_string(),
    })?;
    lmkit_ngram::save(
        &train_tables(
            &flagged.iter().collect::<Vec<_>>(),
            order,
            tmp.path(),
            "f.txt",
        )?,
        &out.join("flagged.lmkb"),
    )?;
    lmkit_ngram::save(
        &train_tables(
            &allowed.iter().collect::<Vec<_>>(),
            order,
            tmp.path(),
            "a.txt",
        )?,
        &out.join("allowed.lmkb"),
    )?;
    let json = serde_json::to_string_pretty(&info).unwrap_or_default();
    let path = out.join("classifier.json");
    lmkit_core::write_atomic_bytes(&path, json.as_bytes()).map_err(|e| ClassifierError::Data {
        path: path.clone(),
        msg: e.io_error().to_string(),
    })?;
    Ok(info)
}

impl Classifier {
    /// Loads a directory written by `train`.
    pub fn load(dir: &Path) -> Result<Classifier> {
        let path = dir.join("classifier.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ClassifierError::Data {
            path: path.clone(),
            msg: format!("{e} (train one with `lmkit moderation train`)"),
        })?;
        let info: ClassifierInfo =
            serde_json::from_str(&text).map_err(|e| ClassifierError::Data {
                path: path.clone(),
                msg: format!("bad classifier.json: {e}"),
            })?;
        Ok(Classifier {
            flagged: Model::open(&dir.join("flagged.lmkb"), Tokenization::Chars)?,
            allowed: Model::open(&dir.join("allowed.lmkb"), Tokenization::Chars)?,
            info,
        })
    }

    /// Log-likelihood ratio per character (higher: more like the flagged examples).
    pub fn score(&self, text: &str) -> f64 {
        ratio(&self.flagged, &self.allowed, text)
    }

    pub fn flags(&self, text: &str) -> bool {
        self.score(text) > self.info.threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_search_finds_the_separating_cut() {
        let mut s = vec![
            (0.1, false),
            (0.9, true),
            (0.2, false),
            (0.8, true),
            (0.5, true),
        ];
        let (t, acc) = best_threshold(&mut s);
        assert_eq!(acc, 1.0);
        assert!(t > 0.2 && t < 0.5, "{t}");
        let mut s = vec![(0.3, true), (0.1, false)];
        assert_eq!(best_threshold(&mut s).1, 1.0);
    }
}
