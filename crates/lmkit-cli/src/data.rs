//! `lmkit data ...`: corpus preparation.

use crate::progress::Bar;
use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use lmkit_data::{
    FilterOptions, MinHashOptions, NormalizeOptions, PrepareOptions, Shingle, TxtUnit,
};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Clean, filter, deduplicate and split a corpus into JSONL shards with a report
    #[command(
        after_help = "Examples:\n  lmkit data prepare --input data/en data/ko --output prepared/\n  \
        lmkit data prepare --input dump.jsonl.gz --text-field content --dates --jaccard 0.7 --output out/\n  \
        lmkit data prepare --input crawl/ --languages en,ko --pii --output out/\n  \
        lmkit data prepare --input CC-MAIN-*.warc.gz --c4-filters --languages en --output web/\n\n\
        Split over tasks (a Slurm array job, or any scheduler that gives an index):\n  \
        sbatch --array=0-15 --wrap 'lmkit data prepare --input crawl/ --output out/ --tasks 16'\n  \
        lmkit data prepare --input crawl/ --output out/ --tasks 16 --merge\n\n\
        Writes OUTPUT/train-00000.jsonl..., OUTPUT/val-00000.jsonl... ({\"text\", \"source\"} per line)\n\
        and OUTPUT/report.json; a summary goes to stderr."
    )]
    Prepare(Box<PrepareArgs>),
    /// Statistics of a prepared corpus: documents per source, length and language histograms,
    /// what each step removed (and an SVG chart of it)
    #[command(
        after_help = "Example:\n  lmkit data prepare --input data/en data/ko --output prepared/\n  \
        lmkit data stats prepared/ --svg prepared/removed.svg\n\n\
        Prints Markdown tables (or JSON with --json)."
    )]
    Stats {
        /// The output directory of `lmkit data prepare`
        dir: PathBuf,
        /// Write a bar chart of what each step removed (SVG)
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
        /// Leave out language identification (faster)
        #[arg(long)]
        no_languages: bool,
        #[arg(long)]
        json: bool,
    },
    /// Write the preference pairs people picked on `lmkit serve`'s review page as JSONL
    #[command(
        after_help = "Example:\n  lmkit data export-preferences --db lmkit-completions.sqlite --output prefs.jsonl\n\n\
        Each line is {\"prompt\", \"chosen\", \"rejected\"}, the shape preference tuning (DPO, reward models) reads."
    )]
    ExportPreferences {
        /// The server's SQLite database
        #[arg(long)]
        db: std::path::PathBuf,
        /// Output JSONL file (written atomically)
        #[arg(long)]
        output: std::path::PathBuf,
    },
    /// Write the completions people rated on `lmkit serve`'s review page (thumbs up or down) as
    /// JSONL
    #[command(
        after_help = "Example:\n  lmkit data export-ratings --db lmkit-completions.sqlite --output ratings.jsonl\n\n\
        Each line is {\"prompt\", \"completion\", \"label\"} (label: rated above 0), the unpaired rows\n\
        `lmkit dpo` reads with dpo.loss = \"kto\"."
    )]
    ExportRatings {
        /// The server's SQLite database
        #[arg(long)]
        db: std::path::PathBuf,
        /// Output JSONL file (written atomically)
        #[arg(long)]
        output: std::path::PathBuf,
    },
    /// Write the answers people corrected on `lmkit serve`'s review page as fine-tuning JSONL
    #[command(
        after_help = "Example:\n  lmkit data export-corrections --db lmkit-completions.sqlite --output sft.jsonl\n\n\
        Chat completions become {\"messages\": [...]} rows ending with the corrected assistant answer,\n\
        others {\"prompt\", \"completion\"}: the rows `lmkit finetune` reads."
    )]
    ExportCorrections {
        /// The server's SQLite database
        #[arg(long)]
        db: std::path::PathBuf,
        /// Output JSONL file (written atomically)
        #[arg(long)]
        output: std::path::PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Unit {
    Line,
    Paragraph,
    File,
}

#[derive(Clone, Copy, ValueEnum)]
enum CompressArg {
    Gzip,
    Zstd,
}

#[derive(Clone, Copy, ValueEnum)]
enum ShingleArg {
    Chars,
    Words,
}

#[derive(Args)]
pub struct PrepareArgs {
    /// Input files or directories (.txt, .jsonl, WARC/WET (.warc, .wet: each HTML page's main
    /// text, boilerplate removed), .html/.htm pages, Arrow IPC streams and files (.arrow as
    /// `datasets`' save_to_disk writes them, .arrows, .feather: the --text-field column), and
    /// their .gz and .zst; .parquet (the --text-field column); directories are searched
    /// recursively); `-` reads standard input
    /// (JSON Lines when it starts with `{`, else text)
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Output directory
    #[arg(long)]
    output: PathBuf,
    /// JSON field (.jsonl) or column (.parquet, .arrow) holding the text
    #[arg(long, default_value = "text")]
    text_field: String,
    /// What a document is in .txt inputs
    #[arg(long, value_enum, default_value = "line")]
    unit: Unit,
    /// Skip (and count in the report) invalid UTF-8 and broken JSONL lines instead of failing
    #[arg(long)]
    skip_bad: bool,
    /// Keep text as it is instead of applying Unicode NFKC
    #[arg(long)]
    no_nfkc: bool,
    /// Rewrite English and Korean dates as YYYY-MM-DD
    #[arg(long)]
    dates: bool,
    /// Repair mojibake: UTF-8 text once decoded as Windows-1252 (`cafÃ©` → `café`)
    #[arg(long)]
    fix_mojibake: bool,
    /// Switch every quality filter off
    #[arg(long)]
    no_filters: bool,
    /// Minimum document length in characters (0: off)
    #[arg(long, default_value_t = FilterOptions::default().min_chars)]
    min_chars: usize,
    /// Maximum document length in characters (0: off)
    #[arg(long, default_value_t = FilterOptions::default().max_chars)]
    max_chars: usize,
    /// Minimum number of words (0: off)
    #[arg(long, default_value_t = FilterOptions::default().min_words)]
    min_words: usize,
    /// Minimum share of letters among non-space characters (0: off)
    #[arg(long, default_value_t = FilterOptions::default().min_letter_ratio)]
    min_letter_ratio: f64,
    /// Maximum share of repeated lines (1: off)
    #[arg(long, default_value_t = FilterOptions::default().max_dup_line_ratio)]
    max_dup_line_ratio: f64,
    /// Maximum share of characters in the most repeated word bigram (1: off)
    #[arg(long, default_value_t = FilterOptions::default().max_top_bigram_ratio)]
    max_top_bigram_ratio: f64,
    /// Maximum share of boilerplate lines (cookie/legal/navigation text) (1: off)
    #[arg(long, default_value_t = FilterOptions::default().max_boilerplate_ratio)]
    max_boilerplate_ratio: f64,
    /// FineWeb's line rules for web documents: enough lines ending in punctuation, not mostly
    /// short lines, few characters in repeated lines, prose rather than lists
    #[arg(long)]
    fineweb_filters: bool,
    /// C4's rules for web text: remove lines without terminal punctuation, of fewer than 3 words,
    /// or about JavaScript and policies; drop documents with "lorem ipsum", a curly bracket, or
    /// fewer than 5 sentences left
    #[arg(long)]
    c4_filters: bool,
    /// Drop documents containing any word or phrase of this file (one per line, any case;
    /// `#` comments)
    #[arg(long, value_name = "FILE")]
    banned_words: Option<PathBuf>,
    /// Drop documents whose URL is on a domain of this file (one per line; subdomains too; `#`
    /// comments). The URL of a .jsonl document is its --url-field; of a WARC page, its target URI
    #[arg(long, value_name = "FILE")]
    url_blocklist: Option<PathBuf>,
    /// With --url-blocklist: the JSON field (.jsonl) or column (.parquet, .arrow) holding each
    /// document's URL
    #[arg(long, default_value = "url", requires = "url_blocklist")]
    url_field: String,
    /// Keep only documents in these languages, identified offline (ISO codes, comma-separated:
    /// en,ko)
    #[arg(long, value_name = "CODES")]
    languages: Option<String>,
    /// With --languages: the least confidence (0-1: how far the best language is ahead of the
    /// next) to keep a document; 0 keeps every document whose best language is asked for
    #[arg(long, default_value_t = 0.0, requires = "languages")]
    lang_threshold: f64,
    /// Mask personal data: e-mail addresses, phone numbers, IP addresses, Korean resident
    /// registration numbers, card numbers (Luhn-checked)
    #[arg(long)]
    pii: bool,
    /// With --pii: only these kinds (comma-separated: email,phone,ip,rrn,card)
    #[arg(long, value_name = "KINDS", requires = "pii")]
    pii_kinds: Option<String>,
    /// With --pii: one replacement for every kind (default: <EMAIL>, <PHONE>, <IP>, <RRN>, <CARD>)
    #[arg(long, value_name = "TEXT", requires = "pii")]
    pii_replacement: Option<String>,
    /// Keep exact duplicates
    #[arg(long)]
    no_exact_dedup: bool,
    /// Keep near duplicates (no MinHash deduplication)
    #[arg(long)]
    no_near_dedup: bool,
    /// Also write clusters.jsonl: every removed duplicate (exact or near) with the kept document
    /// whose cluster it joins (its `source` in the shards) and the estimated Jaccard similarity
    #[arg(long, conflicts_with = "no_near_dedup")]
    clusters: bool,
    /// Jaccard similarity at which a document counts as a near duplicate
    #[arg(long, default_value_t = MinHashOptions::default().threshold)]
    jaccard: f64,
    /// Shingles for MinHash
    #[arg(long, value_enum, default_value = "chars")]
    shingle: ShingleArg,
    /// Shingle length (characters or words)
    #[arg(long, default_value_t = MinHashOptions::default().shingle_size)]
    shingle_size: usize,
    /// Number of MinHash permutations
    #[arg(long, default_value_t = MinHashOptions::default().num_perm)]
    num_perm: usize,
    /// Memory cap in MiB for the deduplication indexes (content hashes, MinHash signatures, LSH
    /// buckets); beyond it they move to sorted runs on disk in the output's temporary directory,
    /// with the same result
    #[arg(long = "memory-mb", alias = "memory", default_value_t = 4096)]
    memory_mb: u64,
    /// Share of documents for the validation split
    #[arg(long, default_value_t = 0.01)]
    val_fraction: f64,
    /// Seed of the split hash (change it for a different split)
    #[arg(long, default_value_t = 0)]
    split_seed: u64,
    /// Documents per output shard
    #[arg(long, default_value_t = 100_000)]
    shard_docs: usize,
    /// Also start a new shard after this many megabytes of JSONL (before compression)
    #[arg(long, value_name = "MB")]
    shard_mb: Option<f64>,
    /// Compress the shards: gzip (.jsonl.gz) or zstd (.jsonl.zst)
    #[arg(long, value_enum)]
    compress: Option<CompressArg>,
    /// Write the shards as Parquet (.parquet: `text` and `source` string columns, zstd pages)
    /// instead of JSON Lines
    #[arg(long, conflicts_with = "compress")]
    parquet: bool,
    /// Split the run over N independent tasks (array jobs): each runs with --task I, then one
    /// run with --merge writes the output, the same as a single run would
    #[arg(long, value_name = "N")]
    tasks: Option<usize>,
    /// With --tasks: which task this is, 0-based (default: from Slurm's SLURM_ARRAY_TASK_ID
    /// minus SLURM_ARRAY_TASK_MIN, or LMKIT_TASK)
    #[arg(long, value_name = "I", requires = "tasks", conflicts_with = "merge")]
    task: Option<usize>,
    /// With --tasks: merge the finished tasks' parts into --output (and remove them)
    #[arg(long, requires = "tasks")]
    merge: bool,
    /// With --tasks: where the tasks keep their parts (default: OUTPUT.tasks beside --output;
    /// every task and the merge must see it)
    #[arg(long, value_name = "DIR", requires = "tasks")]
    tasks_dir: Option<PathBuf>,
    /// With --tasks: plain .txt (a document per line) and .jsonl files larger than this are cut
    /// into pieces of at most this size that tasks read separately (every task and the merge
    /// must be given the same value)
    #[arg(long, value_name = "MB", default_value_t = 256.0, requires = "tasks")]
    task_split_mb: f64,
}

/// The task index from the scheduler's environment: Slurm's array index (relative to the
/// array's first index), or LMKIT_TASK.
fn task_from_env() -> Result<usize> {
    let var = |k: &str| std::env::var(k).ok();
    let parse = |k: &str, v: String| -> Result<usize> {
        v.trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{k}={v:?} is not a task index"))
    };
    if let Some(id) = var("SLURM_ARRAY_TASK_ID") {
        let id = parse("SLURM_ARRAY_TASK_ID", id)?;
        let min = match var("SLURM_ARRAY_TASK_MIN") {
            Some(m) => parse("SLURM_ARRAY_TASK_MIN", m)?,
            None => 0,
        };
        return id.checked_sub(min).ok_or_else(|| {
            anyhow::anyhow!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}")
        });
    }
    if let Some(id) = var("LMKIT_TASK") {
        return parse("LMKIT_TASK", id);
    }
    anyhow::bail!(
        "--tasks needs --task I (0-based), --merge, or a scheduler's index: run as a Slurm array \
         job (sbatch --array=0-N-1) or set LMKIT_TASK (e.g. LMKIT_TASK=$PBS_ARRAY_INDEX)"
    )
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Prepare(a) => prepare(*a),
        DataCommand::Stats {
            dir,
            svg,
            no_languages,
            json,
        } => {
            let st = lmkit_data::stats::stats(&dir, !no_languages)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{}", lmkit_data::stats::markdown(&st));
            }
            if let Some(p) = svg {
                lmkit_core::write_atomic_bytes(&p, lmkit_data::stats::removal_svg(&st).as_bytes())?;
                eprintln!("wrote {}", p.display());
            }
            Ok(())
        }
        DataCommand::ExportPreferences { db, output } => {
            export(&db, &output, "preference pairs", |s, w| {
                s.export_preferences(w)
            })
        }
        DataCommand::ExportRatings { db, output } => {
            export(&db, &output, "rated completions", |s, w| {
                s.export_ratings(w)
            })
        }
        DataCommand::ExportCorrections { db, output } => {
            export(&db, &output, "corrected answers", |s, w| {
                s.export_corrections(w)
            })
        }
    }
}

/// Writes `what` from the server's store `db` to `output` (atomically) with `write`.
fn export(
    db: &std::path::Path,
    output: &std::path::Path,
    what: &str,
    write: impl FnOnce(
        &lmkit_serve::store::Store,
        &mut dyn std::io::Write,
    ) -> Result<usize, lmkit_serve::store::StoreError>,
) -> Result<()> {
    use std::io::Write;
    if !db.exists() {
        anyhow::bail!(
            "{}: no such database (give the --db that `lmkit serve` wrote)",
            db.display()
        );
    }
    let store = lmkit_serve::store::Store::open(db)?;
    let dir = output
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut file = lmkit_core::AtomicFile::create_for(output)?;
    let n = write(&store, file.writer())?;
    file.commit(output)?;
    std::io::stderr().flush().ok();
    eprintln!("wrote {n} {what} to {}", output.display());
    Ok(())
}

/// The entries of a list file (one per line, `#` comments, blank lines skipped), normalised;
/// empty without a file.
fn read_list(
    path: Option<&std::path::Path>,
    what: &str,
    normalise: impl Fn(&str) -> String,
) -> Result<Vec<String>> {
    let Some(p) = path else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(p)
        .map_err(|e| anyhow::anyhow!("{}: cannot read the {what}: {e}", p.display()))?;
    let list: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(normalise)
        .filter(|l| !l.is_empty())
        .collect();
    if list.is_empty() {
        anyhow::bail!("{}: no {what} in the file (one per line)", p.display());
    }
    Ok(list)
}

fn prepare(a: PrepareArgs) -> Result<()> {
    let mut inputs = Vec::new();
    for p in &a.input {
        inputs.extend(lmkit_data::collect_inputs(p)?);
    }
    let banned = read_list(a.banned_words.as_deref(), "banned words", |l| {
        l.to_lowercase()
    })?;
    let url_blocklist = read_list(a.url_blocklist.as_deref(), "domains", |l| {
        l.trim_start_matches("*.")
            .trim_end_matches('.')
            .to_ascii_lowercase()
    })?;
    if a.no_filters && (a.fineweb_filters || !banned.is_empty()) {
        anyhow::bail!("--no-filters switches every filter off: leave it out to use --fineweb-filters or --banned-words");
    }
    let filters = (!a.no_filters).then_some(FilterOptions {
        min_chars: a.min_chars,
        max_chars: a.max_chars,
        min_words: a.min_words,
        min_letter_ratio: a.min_letter_ratio,
        max_dup_line_ratio: a.max_dup_line_ratio,
        max_top_bigram_ratio: a.max_top_bigram_ratio,
        max_boilerplate_ratio: a.max_boilerplate_ratio,
        fineweb: a.fineweb_filters,
        banned_words: banned.clone(),
    });
    if !(0.0..=1.0).contains(&a.lang_threshold) {
        anyhow::bail!(
            "--lang-threshold must be from 0 to 1, not {}",
            a.lang_threshold
        );
    }
    let language = a
        .languages
        .as_deref()
        .map(|l| -> Result<lmkit_data::lang::LanguageOptions> {
            Ok(lmkit_data::lang::LanguageOptions {
                keep: lmkit_data::lang::parse_codes(l)?,
                min_confidence: a.lang_threshold,
            })
        })
        .transpose()?;
    let pii = if a.pii {
        use lmkit_data::pii::Kind;
        let kinds = match &a.pii_kinds {
            None => Kind::ALL.to_vec(),
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    Kind::ALL
                        .into_iter()
                        .find(|k| k.name() == s)
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "--pii-kinds: `{s}` is not one of email, phone, ip, rrn, card"
                            )
                        })
                })
                .collect::<Result<Vec<_>>>()?,
        };
        Some(lmkit_data::pii::PiiOptions {
            kinds,
            replacement: a.pii_replacement.clone(),
        })
    } else {
        None
    };
    let near = (!a.no_near_dedup).then(|| MinHashOptions {
        shingle: match a.shingle {
            ShingleArg::Chars => Shingle::Chars,
            ShingleArg::Words => Shingle::Words,
        },
        shingle_size: a.shingle_size,
        num_perm: a.num_perm,
        threshold: a.jaccard,
        ..Default::default()
    });
    let opts = PrepareOptions {
        txt_unit: match a.unit {
            Unit::Line => TxtUnit::Line,
            Unit::Paragraph => TxtUnit::Paragraph,
            Unit::File => TxtUnit::File,
        },
        text_field: a.text_field,
        skip_bad: a.skip_bad,
        normalize: NormalizeOptions {
            nfkc: !a.no_nfkc,
            dates: a.dates,
            fix_mojibake: a.fix_mojibake,
        },
        filters,
        language,
        pii,
        url_blocklist,
        url_field: a.url_field.clone(),
        c4: a.c4_filters,
        exact_dedup: !a.no_exact_dedup,
        near_dedup: near,
        clusters: a.clusters,
        task_split_bytes: match a.task_split_mb {
            mb if mb.is_finite() && mb > 0.0 => ((mb * 1e6) as u64).max(1),
            mb => anyhow::bail!("--task-split-mb must be a positive number, not {mb}"),
        },
        memory: Some(a.memory_mb.saturating_mul(1 << 20)),
        val_fraction: a.val_fraction,
        split_seed: a.split_seed,
        shard_docs: a.shard_docs,
        shard_bytes: match a.shard_mb {
            Some(mb) if mb.is_finite() && mb > 0.0 => (mb * 1e6) as u64,
            Some(mb) => anyhow::bail!("--shard-mb must be a positive number, not {mb}"),
            None => 0,
        },
        compression: match a.compress {
            None if a.parquet => lmkit_data::shards::Compression::Parquet,
            None => lmkit_data::shards::Compression::None,
            Some(CompressArg::Gzip) => lmkit_data::shards::Compression::Gzip,
            Some(CompressArg::Zstd) => lmkit_data::shards::Compression::Zstd,
        },
        ..Default::default()
    };
    let r = match a.tasks {
        None => lmkit_data::prepare(&inputs, &a.output, &opts, &Bar::default())?,
        Some(tasks) => {
            let dir = a.tasks_dir.clone().unwrap_or_else(|| {
                let mut name = a.output.file_name().unwrap_or_default().to_os_string();
                name.push(".tasks");
                a.output.with_file_name(name)
            });
            if !a.merge {
                let task = match a.task {
                    Some(t) => t,
                    None => task_from_env()?,
                };
                let spec = lmkit_data::task::TaskSpec { task, tasks, dir };
                let t = lmkit_data::task::run_task(&inputs, &spec, &opts, &Bar::default())?;
                eprintln!(
                    "task {} of {}: {} piece(s) read, {} done before, {} docs in {:.2}s; \
                     merge with --merge once every task is done",
                    t.task, t.tasks, t.pieces_done, t.pieces_resumed, t.docs, t.seconds
                );
                return Ok(());
            }
            lmkit_data::task::merge(&inputs, &dir, tasks, &a.output, &opts, &Bar::default())?
        }
    };
    let mb = |b: u64| b as f64 / 1e6;
    eprintln!(
        "read        {:>9} docs {:>9.2} MB from {} file(s) in {:.2}s ({:.1} MB/s)",
        r.read.docs,
        mb(r.read.bytes),
        r.inputs.len(),
        r.seconds,
        mb(r.input_bytes) / r.seconds.max(1e-9)
    );
    if r.skipped_bad > 0 {
        eprintln!(
            "skipped bad {:>9} records (see report.json for examples)",
            r.skipped_bad
        );
    }
    if !r.web_skipped.is_empty() {
        let kinds: Vec<String> = r
            .web_skipped
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        eprintln!(
            "web pages   {:>9} gave no document ({})",
            r.web_skipped.values().sum::<u64>(),
            kinds.join(", ")
        );
    }
    eprintln!(
        "normalized  {:>9} docs changed, {} dates rewritten",
        r.normalized_changed_docs, r.dates_rewritten
    );
    if r.c4_lines_removed > 0 {
        eprintln!(
            "c4 lines    {:>9} removed from kept documents",
            r.c4_lines_removed
        );
    }
    if r.mojibake_fixed_docs > 0 {
        eprintln!("mojibake    {:>9} docs repaired", r.mojibake_fixed_docs);
    }
    for (why, t) in &r.filtered {
        eprintln!(
            "filtered    {:>9} docs {:>9.2} MB  {why}",
            t.docs,
            mb(t.bytes)
        );
    }
    if !r.languages.is_empty() {
        let mut langs: Vec<(&String, &lmkit_data::Tally)> = r.languages.iter().collect();
        langs.sort_by_key(|(_, t)| std::cmp::Reverse(t.docs));
        let top: Vec<String> = langs
            .iter()
            .take(6)
            .map(|(l, t)| format!("{l} {}", t.docs))
            .collect();
        eprintln!("languages   {}", top.join(", "));
    }
    if !r.pii_masked.is_empty() {
        let kinds: Vec<String> = r
            .pii_masked
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        eprintln!("pii masked  {:>9} docs  ({})", r.pii_docs, kinds.join(", "));
    }
    eprintln!(
        "exact dups  {:>9} docs {:>9.2} MB",
        r.exact_duplicates.removed.docs,
        mb(r.exact_duplicates.removed.bytes)
    );
    if r.dedup_spills > 0 {
        eprintln!(
            "dedup index {:>9} times moved to disk (--memory-mb)",
            r.dedup_spills
        );
    }
    if let Some((b, rows)) = r.lsh_bands_rows {
        eprintln!(
            "near dups   {:>9} docs {:>9.2} MB  (MinHash LSH {b} bands x {rows} rows)",
            r.near_duplicates.removed.docs,
            mb(r.near_duplicates.removed.bytes)
        );
    }
    eprintln!(
        "train       {:>9} docs {:>9.2} MB in {} shard(s)",
        r.train.docs,
        mb(r.train.bytes),
        r.train.shards.len()
    );
    eprintln!(
        "validation  {:>9} docs {:>9.2} MB in {} shard(s)",
        r.validation.docs,
        mb(r.validation.bytes),
        r.validation.shards.len()
    );
    if a.clusters {
        let path = a.output.join(lmkit_data::CLUSTERS_FILE);
        eprintln!("clusters    {}", path.display());
    }
    eprintln!("report      {}", a.output.join("report.json").display());
    Ok(())
}
