//! n-gram language models: streaming counting, interpolated modified Kneser-Ney estimation, ARPA
//! files (KenLM-compatible) and a memory-mapped binary format, sentence scoring and perplexity.
//!
//! ```no_run
//! use lmkit_ngram::{train, Model, TrainOptions, NoProgress};
//! let est = train(&["corpus.txt".into()], &TrainOptions::default(), &NoProgress).unwrap();
//! lmkit_ngram::arpa::save_arpa(&est.tables, "model.arpa".as_ref()).unwrap();
//! let model = Model::from_tables(&est.tables, "model.arpa".as_ref());
//! println!("{}", model.score_line("the cat sat").log10_prob);
//! ```

pub mod adjust;
pub mod arpa;
mod atomic;
pub mod binary;
pub mod count;
pub mod error;
pub mod kneser_ney;
pub mod model;
pub mod tables;
pub mod tokenize;
pub mod vocab;

pub use count::{CorpusStats, MAX_ORDER};
pub use error::{NgramError, Result};
pub use kneser_ney::{Discounts, Estimate};
pub use model::{Model, Perplexity, SentenceScore, WordScore};
pub use tables::NgramTables;
pub use tokenize::Tokenization;

use std::path::{Path, PathBuf};

/// Progress reports from long-running work; the library never prints.
pub trait Progress: Sync {
    /// A stage starts; `total` is in the stage's units (bytes for counting), 0 when unknown.
    fn begin(&self, _stage: &str, _total: u64) {}
    fn advance(&self, _n: u64) {}
    fn finish(&self) {}
}

/// Reports nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

pub type TrainOptions = count::CountOptions;

/// A trained model with what was learnt about the corpus on the way.
pub struct Trained {
    pub tables: NgramTables,
    pub discounts: Vec<Discounts>,
    pub stats: CorpusStats,
}

/// Counts `inputs` and estimates an interpolated modified Kneser-Ney model.
pub fn train(inputs: &[PathBuf], opts: &TrainOptions, progress: &dyn Progress) -> Result<Trained> {
    if opts.order == 0 || opts.order > MAX_ORDER {
        return Err(NgramError::BadOrder {
            order: opts.order,
            max: MAX_ORDER,
        });
    }
    let mut adjuster = adjust::Adjuster::new(opts.order);
    let (vocab, stats) =
        count::count_ngrams(inputs, opts, progress, &mut |rec, c| adjuster.push(rec, c))?;
    progress.begin("estimating", 0);
    let counts = adjuster.finish();
    let est = kneser_ney::estimate(counts, vocab.into_words(), opts.tokenization);
    progress.finish();
    Ok(Trained {
        tables: est.tables,
        discounts: est.discounts,
        stats,
    })
}

/// The files under `path`: the file itself, or every `*.txt` below a directory, sorted by path.
pub fn collect_inputs(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).map_err(|e| NgramError::io(path, e))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| NgramError::io(&dir, e))? {
            let p = entry.map_err(|e| NgramError::io(&dir, e))?.path();
            if p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "txt") {
                out.push(p);
            }
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(NgramError::NoInputFiles {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

/// Saves `tables` as ARPA (`.arpa`) or binary (`.lmkb`), chosen by the file extension.
pub fn save(tables: &NgramTables, path: &Path) -> Result<()> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("arpa") => arpa::save_arpa(tables, path),
        Some("lmkb") => binary::save_binary(tables, path),
        _ => Err(NgramError::UnknownFormat {
            path: path.to_path_buf(),
        }),
    }
}

/// Converts an ARPA file to the binary format.
pub fn convert(arpa_path: &Path, out: &Path, tokenization: Tokenization) -> Result<NgramTables> {
    let file = std::fs::File::open(arpa_path).map_err(|e| NgramError::io(arpa_path, e))?;
    let tables = arpa::read_arpa(
        std::io::BufReader::with_capacity(1 << 20, file),
        arpa_path,
        tokenization,
    )?;
    save(&tables, out)?;
    Ok(tables)
}
