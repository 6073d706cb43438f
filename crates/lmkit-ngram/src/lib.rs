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
#![forbid(unsafe_code)]

pub mod adjust;
pub mod arpa;
pub mod binary;
pub mod count;
pub mod error;
mod extsort;
pub mod kneser_ney;
pub mod model;
pub mod ondisk;
pub mod tables;
pub mod tokenize;
mod trie;
pub mod vocab;

pub use binary::BinaryLayout;
pub use count::{CorpusStats, MAX_ORDER};
pub use error::{NgramError, Result};
pub use kneser_ney::{DiscountSource, Discounts, Estimate, EstimateOptions, FALLBACK_DISCOUNTS};
pub use model::{Model, Perplexity, SentenceScore, WordScore};
pub use tables::NgramTables;
pub use tokenize::Tokenization;

use std::path::{Path, PathBuf};

pub use lmkit_core::{NoProgress, Progress, Unit};

pub type TrainOptions = count::CountOptions;

/// A trained model with what was learnt about the corpus on the way.
pub struct Trained {
    pub tables: NgramTables,
    pub discounts: Vec<Discounts>,
    pub stats: CorpusStats,
}

/// Counts `inputs` and estimates an interpolated modified Kneser-Ney model.
pub fn train(inputs: &[PathBuf], opts: &TrainOptions, progress: &dyn Progress) -> Result<Trained> {
    check_options(opts)?;
    let mut adjuster = adjust::Adjuster::new(opts.order, opts.estimation.prunes());
    let (vocab, stats) = count::count_ngrams(inputs, opts, progress, &mut adjuster)?;
    estimate_in_memory(adjuster, vocab.into_words(), stats, opts, progress)
}

/// Rejects a bad order or bad pruning options before time is spent on counting.
fn check_options(opts: &TrainOptions) -> Result<()> {
    if opts.order == 0 || opts.order > MAX_ORDER {
        return Err(NgramError::BadOrder {
            order: opts.order,
            max: MAX_ORDER,
        });
    }
    opts.estimation.thresholds(opts.order)?;
    Ok(())
}

/// The model from the adjusted counts of `adjuster`, estimated in memory.
fn estimate_in_memory(
    adjuster: adjust::Adjuster,
    vocab: Vec<String>,
    stats: CorpusStats,
    opts: &TrainOptions,
    progress: &dyn Progress,
) -> Result<Trained> {
    progress.begin("estimating", 0, Unit::Items);
    let est = kneser_ney::estimate(
        adjuster.finish(),
        vocab,
        opts.tokenization,
        &opts.estimation,
    )?;
    progress.finish();
    Ok(Trained {
        tables: est.tables,
        discounts: est.discounts,
        stats,
    })
}

/// What [`train_arpa`] wrote, and what was learnt about the corpus on the way.
#[derive(Clone, Debug)]
pub struct ArpaTrained {
    /// Number of n-grams of each order (`counts[n - 1]` for order n).
    pub counts: Vec<u64>,
    pub discounts: Vec<Discounts>,
    pub stats: CorpusStats,
    /// Whether estimation went through sorted files on disk (counting did not fit in the memory
    /// budget).
    pub on_disk: bool,
}

/// Counts `inputs`, estimates an interpolated modified Kneser-Ney model and writes it to `path` as
/// ARPA. Where counting does not fit in `opts.memory_bytes` (it wrote sorted runs to disk), the
/// estimate goes through sorted files too ([`ondisk`]), so that memory stays within the budget
/// however many n-grams there are; otherwise it is [`train`] and [`arpa::save_arpa`]. Both give
/// the same file.
pub fn train_arpa(
    inputs: &[PathBuf],
    opts: &TrainOptions,
    path: &Path,
    progress: &dyn Progress,
) -> Result<ArpaTrained> {
    check_options(opts)?;
    enum Sink<'a> {
        Pending(&'a TrainOptions),
        Memory(adjust::Adjuster),
        Disk(adjust::Adjuster<ondisk::OnDisk>),
    }
    impl count::CountSink for Sink<'_> {
        fn begin(&mut self, runs_on_disk: usize) -> Result<()> {
            if let Sink::Pending(opts) = self {
                let keep_raw = opts.estimation.prunes();
                *self = if runs_on_disk > 0 && opts.order > 1 {
                    let dir = opts.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
                    let out = ondisk::OnDisk::new(opts.order, keep_raw, opts.memory_bytes, &dir);
                    Sink::Disk(adjust::Adjuster::with(opts.order, out))
                } else {
                    Sink::Memory(adjust::Adjuster::new(opts.order, keep_raw))
                };
            }
            Ok(())
        }

        fn push(&mut self, rec: &[u32], count: u64) {
            match self {
                Sink::Memory(a) => a.push(rec, count),
                Sink::Disk(a) => a.push(rec, count),
                Sink::Pending(_) => unreachable!("begin chooses the sink"),
            }
        }
    }
    let mut sink = Sink::Pending(opts);
    let (vocab, stats) = count::count_ngrams(inputs, opts, progress, &mut sink)?;
    let vocab = vocab.into_words();
    match sink {
        Sink::Disk(a) => {
            let summary = a
                .finish_into()
                .estimate(&vocab, &opts.estimation, path, progress)?;
            Ok(ArpaTrained {
                counts: summary.counts,
                discounts: summary.discounts,
                stats,
                on_disk: true,
            })
        }
        Sink::Memory(a) => {
            let t = estimate_in_memory(a, vocab, stats, opts, progress)?;
            arpa::save_arpa(&t.tables, path)?;
            Ok(ArpaTrained {
                counts: t.tables.orders.iter().map(|o| o.len() as u64).collect(),
                discounts: t.discounts,
                stats: t.stats,
                on_disk: false,
            })
        }
        Sink::Pending(_) => unreachable!("counting begins the sink"),
    }
}

/// The files under `path`: the file itself, or every `*.txt` (plain, `.gz` or `.zst`) below a
/// directory, sorted by path; `-` is standard input.
pub fn collect_inputs(path: &Path) -> Result<Vec<PathBuf>> {
    if path == Path::new("-") {
        return Ok(vec![path.to_path_buf()]);
    }
    Ok(lmkit_core::collect_inputs(
        path,
        "a directory is searched recursively for *.txt, *.txt.gz and *.txt.zst files",
        |name| {
            lmkit_core::decompress::Compression::split(name)
                .0
                .ends_with(".txt")
        },
    )?)
}

/// Saves `tables` as ARPA (`.arpa`) or binary (`.lmkb`, probing layout), chosen by the file
/// extension.
pub fn save(tables: &NgramTables, path: &Path) -> Result<()> {
    save_as(tables, path, binary::BinaryLayout::Probing)
}

/// [`save`], with the layout a `.lmkb` file takes.
pub fn save_as(tables: &NgramTables, path: &Path, layout: binary::BinaryLayout) -> Result<()> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("arpa") => arpa::save_arpa(tables, path),
        Some("lmkb") => binary::save_binary(tables, path, layout),
        _ => Err(NgramError::UnknownFormat {
            path: path.to_path_buf(),
        }),
    }
}

/// Converts an ARPA file to the binary format.
pub fn convert(
    arpa_path: &Path,
    out: &Path,
    tokenization: Tokenization,
    layout: binary::BinaryLayout,
) -> Result<NgramTables> {
    let file = std::fs::File::open(arpa_path).map_err(|e| NgramError::io(arpa_path, e))?;
    let tables = arpa::read_arpa(
        std::io::BufReader::with_capacity(1 << 20, file),
        arpa_path,
        tokenization,
    )?;
    save_as(&tables, out, layout)?;
    Ok(tables)
}
