//! Corpus preparation: ingest (txt, jsonl, directories, gzip, zstd, standard input) → normalize (NFKC, whitespace,
//! controls, optional dates) → quality filters → language identification → personal-data
//! masking → exact and MinHash near-duplicate removal →
//! deterministic train/validation split → JSONL shards and a report of what was dropped and why.
#![forbid(unsafe_code)]

pub mod arrow_io;
pub mod c4;
pub mod dates;
pub mod dedup;
pub mod error;
pub mod filters;
mod flat_json;
pub mod html;
pub mod ingest;
pub mod lang;
pub mod minhash;
pub mod mojibake;
pub mod normalize;
pub mod parquet_io;
pub mod pii;
pub mod shards;
pub mod spill;
pub mod stats;
mod swar;
pub mod task;
pub mod warc;

pub use error::{DataError, Result};
pub use filters::{DropReason, FilterOptions};
pub use ingest::{collect_inputs, Doc, IngestOptions, TxtUnit};
pub use minhash::{MinHashOptions, Shingle};
pub use normalize::NormalizeOptions;

use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::{xxh3_128, xxh3_64_with_seed};

pub use lmkit_core::{NoProgress, Progress, Unit};

#[derive(Clone, Debug, Serialize)]
pub struct PrepareOptions {
    pub txt_unit: TxtUnit,
    pub text_field: String,
    pub skip_bad: bool,
    pub normalize: NormalizeOptions,
    /// `None` switches all quality filters off.
    pub filters: Option<FilterOptions>,
    /// Keep only these languages (`None`: no language identification).
    pub language: Option<lang::LanguageOptions>,
    /// Mask personal data (`None`: off).
    pub pii: Option<pii::PiiOptions>,
    /// C4's line rules and document rules for web text (see [`c4`]).
    pub c4: bool,
    /// Drop documents whose URL (the JSONL field `url_field`) is on one of these domains or
    /// their subdomains (lower case).
    pub url_blocklist: Vec<String>,
    pub url_field: String,
    pub exact_dedup: bool,
    /// `None` switches near-duplicate removal off.
    pub near_dedup: Option<MinHashOptions>,
    /// Cap on the memory of the deduplication indexes in bytes: beyond it they move to sorted
    /// runs on disk, with the same result (`None`: in memory).
    pub memory: Option<u64>,
    /// Share of documents sent to the validation split (by content hash).
    pub val_fraction: f64,
    pub split_seed: u64,
    pub shard_docs: usize,
    /// Start a new shard after about this many bytes of JSONL (0: no limit).
    pub shard_bytes: u64,
    pub compression: shards::Compression,
    /// How many examples of each kind of removal go into the report.
    pub report_samples: usize,
    /// Write `clusters.jsonl`: each removed duplicate with the kept document whose cluster it
    /// joins (needs near-duplicate removal).
    pub clusters: bool,
    /// In a run split over tasks ([`task`]): plain .txt (a document per line) and .jsonl files
    /// larger than this many bytes (at least 64 KiB) are cut into byte ranges that tasks read
    /// separately.
    pub task_split_bytes: u64,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        let ingest = IngestOptions::default();
        PrepareOptions {
            txt_unit: ingest.txt_unit,
            text_field: ingest.text_field.clone(),
            skip_bad: ingest.skip_bad,
            normalize: NormalizeOptions::default(),
            filters: Some(FilterOptions::default()),
            language: None,
            pii: None,
            c4: false,
            url_blocklist: Vec::new(),
            url_field: "url".into(),
            exact_dedup: true,
            near_dedup: Some(MinHashOptions::default()),
            memory: None,
            val_fraction: 0.01,
            split_seed: 0,
            shard_docs: 100_000,
            shard_bytes: 0,
            compression: shards::Compression::None,
            report_samples: 10,
            clusters: false,
            task_split_bytes: 256_000_000,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Tally {
    pub docs: u64,
    pub bytes: u64,
}

impl Tally {
    pub(crate) fn add(&mut self, bytes: usize) {
        self.docs += 1;
        self.bytes += bytes as u64;
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct DupSample {
    pub removed: String,
    pub kept: String,
    /// Estimated Jaccard similarity (1 for exact duplicates).
    pub jaccard: f64,
    pub removed_text: String,
    pub kept_text: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct FilteredSample {
    pub source: String,
    pub text: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DedupReport {
    pub removed: Tally,
    pub samples: Vec<DupSample>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SplitReport {
    pub docs: u64,
    pub bytes: u64,
    pub shards: Vec<PathBuf>,
}

/// What every step kept and dropped, and why (written as `report.json`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub inputs: Vec<PathBuf>,
    pub input_bytes: u64,
    /// Documents read (bytes: their text before normalization).
    pub read: Tally,
    pub skipped_bad: u64,
    pub skipped_samples: Vec<ingest::Skipped>,
    /// Web records (WARC) and pages that gave no document, by why: `not-html`, `http-status`
    /// (not 2xx), `no-main-text`, `too-large`, `bad-http`.
    pub web_skipped: BTreeMap<String, u64>,
    pub web_skipped_samples: Vec<ingest::Skipped>,
    pub normalized_changed_docs: u64,
    /// Documents whose mojibake was repaired (`--fix-mojibake`).
    pub mojibake_fixed_docs: u64,
    pub dates_rewritten: u64,
    pub filtered: BTreeMap<String, Tally>,
    /// A few dropped documents for each filter.
    pub filtered_samples: BTreeMap<String, Vec<FilteredSample>>,
    /// With language identification: the documents that passed the quality filters, by the
    /// language found (ISO 639-3; `und` when undetermined), kept or not.
    pub languages: BTreeMap<String, Tally>,
    /// With masking: how many matches of each kind were masked, in how many documents, and a few
    /// masked documents.
    pub pii_masked: BTreeMap<String, u64>,
    pub pii_docs: u64,
    pub pii_samples: Vec<FilteredSample>,
    /// With C4's rules: lines removed from documents that were kept.
    pub c4_lines_removed: u64,
    pub exact_duplicates: DedupReport,
    pub near_duplicates: DedupReport,
    /// LSH bands × rows used for near-duplicate candidates.
    pub lsh_bands_rows: Option<(usize, usize)>,
    /// Times the deduplication indexes reached `--memory` and moved to disk.
    pub dedup_spills: u64,
    pub train: SplitReport,
    pub validation: SplitReport,
    pub options: Option<PrepareOptions>,
    pub seconds: f64,
}

/// One document after the per-document steps (everything but deduplication and the split).
pub(crate) struct Processed {
    pub(crate) source: String,
    /// Bytes of its text as read.
    pub(crate) read_bytes: u64,
    pub(crate) text: String,
    /// Bytes of the whole text where `text` holds only its beginning (a dropped document read
    /// back from a part file: what the report needs is its length and its preview).
    pub(crate) full_len: Option<usize>,
    pub(crate) c4_lines: u32,
    pub(crate) mojibake: bool,
    pub(crate) language: Option<&'static str>,
    pub(crate) pii: Option<[u32; 5]>,
    pub(crate) changed: bool,
    pub(crate) dates: u32,
    pub(crate) drop: Option<DropReason>,
    pub(crate) exact: u128,
    pub(crate) signature: Option<Vec<u32>>,
    /// Its line in JSONL shards, made beside the other per-document work when it may be kept.
    pub(crate) json: Option<Vec<u8>>,
}

/// Characters of a document shown in the report's samples (more are marked with "…").
pub(crate) const PREVIEW_CHARS: usize = 120;

impl Processed {
    /// Bytes of the document's text.
    fn len(&self) -> usize {
        self.full_len.unwrap_or(self.text.len())
    }
}

fn preview(text: &str) -> String {
    let mut s: String = text.chars().take(PREVIEW_CHARS).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

/// The most MinHash permutations a document's signature may have (each a u64 a document).
const MAX_PERMUTATIONS: usize = 8192;

fn validate(o: &PrepareOptions) -> Result<()> {
    let bad = |name, value: String, msg: &str| {
        Err(DataError::BadOption {
            name,
            value,
            msg: msg.into(),
        })
    };
    if !(0.0..1.0).contains(&o.val_fraction) {
        return bad(
            "val_fraction",
            o.val_fraction.to_string(),
            "must be in [0, 1)",
        );
    }
    if let Some(m) = &o.near_dedup {
        if !(m.threshold > 0.0 && m.threshold <= 1.0) {
            return bad("jaccard", m.threshold.to_string(), "must be in (0, 1]");
        }
        if m.num_perm == 0 || m.shingle_size == 0 {
            return bad(
                "num_perm/shingle_size",
                format!("{}/{}", m.num_perm, m.shingle_size),
                "must be at least 1",
            );
        }
        if m.num_perm > MAX_PERMUTATIONS {
            // Each document keeps a signature of num_perm hashes.
            return bad(
                "num_perm",
                m.num_perm.to_string(),
                &format!("must be at most {MAX_PERMUTATIONS} (128 is the usual choice)"),
            );
        }
    }
    if o.shard_docs == 0 {
        return bad("shard_docs", "0".into(), "must be at least 1");
    }
    if o.clusters && o.near_dedup.is_none() {
        return bad(
            "clusters",
            "true".into(),
            "clusters are those of near-duplicate removal: drop --no-near-dedup",
        );
    }
    Ok(())
}

/// The files `prepare` writes: its shards and report (replaced by a new run into the directory).
fn is_prepare_output(name: &str) -> bool {
    name == "report.json"
        || name == CLUSTERS_FILE
        || ((name.starts_with("train-") || name.starts_with("val-"))
            && shards::Compression::ALL
                .iter()
                .any(|c| name.ends_with(c.suffix())))
}

/// What reading one input file gave besides its documents: bad records (under `skip_bad`) and
/// web pages without a document, counted, with a few samples.
#[derive(Default, Serialize, serde::Deserialize)]
pub(crate) struct FileNotes {
    pub(crate) bad: u64,
    pub(crate) bad_samples: Vec<ingest::Skipped>,
    pub(crate) web: BTreeMap<String, u64>,
    pub(crate) web_samples: Vec<ingest::Skipped>,
}

/// Documents go through the per-document steps this many at a time, on all cores (up to four
/// batches are in flight between reading and writing).
const BATCH: usize = 512;

/// The per-document steps: normalization, filters, language, masking, hashes and signatures.
pub(crate) struct Analyzer<'a> {
    opts: &'a PrepareOptions,
    ingest: IngestOptions,
    hasher: Option<minhash::MinHasher>,
    /// Make each document's JSONL shard line beside the rest of its work (in parallel).
    pub(crate) json_lines: bool,
}

/// How `prepare` reads its inputs.
pub(crate) fn ingest_options(opts: &PrepareOptions) -> IngestOptions {
    IngestOptions {
        txt_unit: opts.txt_unit,
        text_field: opts.text_field.clone(),
        skip_bad: opts.skip_bad,
        url_field: (!opts.url_blocklist.is_empty()).then(|| opts.url_field.clone()),
        // The per-document work runs on the pool too, but never waits on reading.
        parallel_json: true,
    }
}

impl<'a> Analyzer<'a> {
    pub(crate) fn new(opts: &'a PrepareOptions) -> Self {
        Analyzer {
            opts,
            ingest: ingest_options(opts),
            hasher: opts.near_dedup.clone().map(minhash::MinHasher::new),
            json_lines: opts.compression != shards::Compression::Parquet,
        }
    }

    /// Reads one input file and passes its documents, after the per-document steps, to `out` in
    /// batches, in order. (Reading on a thread of its own, a batch ahead, was tried: no faster on
    /// 2 cores, where it competes with the per-document work for the same cores.)
    pub(crate) fn read_file(
        &self,
        path: &Path,
        range: Option<std::ops::Range<u64>>,
        progress: &dyn Progress,
        out: &mut dyn FnMut(Vec<Processed>) -> Result<()>,
    ) -> Result<FileNotes> {
        let samples = self.opts.report_samples;
        let mut notes = FileNotes::default();
        let mut batch: Vec<Doc> = Vec::with_capacity(BATCH);
        ingest::read_docs_in(
            path,
            &self.ingest,
            range,
            &mut |n| progress.advance(n),
            &mut |s| {
                if s.is_bad() {
                    notes.bad += 1;
                    if notes.bad_samples.len() < samples {
                        notes.bad_samples.push(s);
                    }
                } else {
                    *notes.web.entry(s.kind.to_string()).or_default() += 1;
                    if notes.web_samples.len() < samples {
                        notes.web_samples.push(s);
                    }
                }
            },
            &mut |doc| {
                batch.push(doc);
                if batch.len() >= BATCH {
                    out(self.analyze(std::mem::take(&mut batch)))?;
                }
                Ok(())
            },
        )?;
        if !batch.is_empty() {
            out(self.analyze(batch))?;
        }
        Ok(notes)
    }

    fn analyze(&self, batch: Vec<Doc>) -> Vec<Processed> {
        let opts = self.opts;
        batch
            .into_par_iter()
            .map(|d| {
                let repaired = if opts.normalize.fix_mojibake {
                    mojibake::fix(&d.text)
                } else {
                    None
                };
                let read_bytes = d.text.len() as u64;
                let (mut text, changed, dates) = match &repaired {
                    Some(r) => {
                        let (t, n) = normalize::normalize(r, &opts.normalize);
                        let changed = t != d.text;
                        (t, changed, n)
                    }
                    None => normalize::normalize_owned(d.text, &opts.normalize),
                };
                let mut c4_lines = 0;
                let mut drop = None;
                if opts.c4 {
                    match c4::apply(&text) {
                        Ok((t, n)) => {
                            text = t;
                            c4_lines = n;
                        }
                        Err(r) => drop = Some(r),
                    }
                }
                let mut drop =
                    drop.or_else(|| opts.filters.as_ref().and_then(|f| filters::check(&text, f)));
                if drop.is_none() && blocked(d.url.as_deref(), &opts.url_blocklist) {
                    drop = Some(DropReason::BlockedUrl);
                }
                let mut language = None;
                if let (None, Some(l)) = (drop, &opts.language) {
                    let (code, confidence) = lang::identify(&text);
                    language = Some(code);
                    if confidence < l.min_confidence || !l.keep.iter().any(|k| k == code) {
                        drop = Some(DropReason::Language);
                    }
                }
                let mut pii = None;
                if let (None, Some(p)) = (drop, &opts.pii) {
                    let (masked, counts) = pii::mask(&text, p);
                    if let Some(m) = masked {
                        text = m;
                        pii = Some(counts);
                    }
                }
                let signature = match (drop, &self.hasher) {
                    (None, Some(h)) => Some(h.signature(&text)),
                    _ => None,
                };
                let json = (drop.is_none() && self.json_lines)
                    .then(|| shards::json_line(&text, &d.source));
                Processed {
                    source: d.source,
                    read_bytes,
                    c4_lines: c4_lines as u32,
                    mojibake: repaired.is_some(),
                    changed,
                    language,
                    pii,
                    exact: xxh3_128(text.as_bytes()),
                    text,
                    full_len: None,
                    dates: dates as u32,
                    drop,
                    signature,
                    json,
                }
            })
            .collect()
    }
}

/// Bytes to show progress against (0 when any input is compressed, Parquet or standard input:
/// the length of their text is not known), and the inputs' size.
fn input_total(inputs: &[PathBuf]) -> (u64, u64) {
    let compressed = !inputs.iter().all(|p| ingest::size_is_text(p));
    let total: u64 = inputs
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    (if compressed { 0 } else { total }, total)
}

/// Runs the whole preparation of `inputs` into `out_dir` and returns (and writes) the report.
/// The directory is filled as a whole when the run succeeds (see [`lmkit_core::OutputDir`]).
pub fn prepare(
    inputs: &[PathBuf],
    out_dir: &Path,
    opts: &PrepareOptions,
    progress: &dyn Progress,
) -> Result<Report> {
    validate(opts)?;
    let t0 = std::time::Instant::now();
    let output = lmkit_core::OutputDir::create(
        out_dir,
        "an output of `lmkit data prepare`",
        is_prepare_output,
    )?;
    let analyzer = Analyzer::new(opts);
    let mut st = State::new(inputs, output.path(), opts)?;
    let (shown, total) = input_total(inputs);
    st.report.input_bytes = total;
    progress.begin("preparing", shown, Unit::Bytes);
    // Reading and the per-document work run on a thread of their own, a few batches ahead of the
    // decisions in input order (deduplication, the split) and the writing, which run here.
    enum Msg {
        Batch(Vec<Processed>),
        Notes(FileNotes),
    }
    let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(2);
    let analyzer = &analyzer;
    std::thread::scope(|scope| -> Result<()> {
        let reader = scope.spawn(move || -> Result<()> {
            for path in inputs {
                let notes = analyzer.read_file(path, None, progress, &mut |b| {
                    // A closed channel: the writing side failed, and says why.
                    tx.send(Msg::Batch(b)).map_err(|_| DataError::Stopped)
                })?;
                tx.send(Msg::Notes(notes)).map_err(|_| DataError::Stopped)?;
            }
            Ok(())
        });
        let mut written = Ok(());
        for msg in rx.iter() {
            written = match msg {
                Msg::Batch(b) => st.decide(b, opts),
                Msg::Notes(notes) => {
                    st.add_notes(notes, opts.report_samples);
                    Ok(())
                }
            };
            if written.is_err() {
                break;
            }
        }
        drop(rx);
        let read = reader.join().unwrap_or(Err(DataError::Stopped));
        written?;
        read
    })?;
    progress.finish();
    st.finish(output, inputs, t0)
}

/// The host of a URL (`https://user@Sub.Example.com:8080/x` → `sub.example.com`).
fn host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.chars().all(|c| c.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether the URL is on a blocked domain or one of its subdomains.
fn blocked(url: Option<&str>, list: &[String]) -> bool {
    let Some(url) = url.filter(|_| !list.is_empty()) else {
        return false;
    };
    let h = host(url);
    list.iter().any(|d| {
        h == *d
            || (h.len() > d.len()
                && h.ends_with(d.as_str())
                && h.as_bytes()[h.len() - d.len() - 1] == b'.')
    })
}

/// Where `--clusters` lists the removed duplicates, in the output directory.
pub const CLUSTERS_FILE: &str = "clusters.jsonl";

/// One line of [`CLUSTERS_FILE`]: a removed document and the kept one whose cluster it joins.
#[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
pub struct ClusterMember {
    /// The removed document (`path:line`).
    pub source: String,
    /// The kept document (`path:line`, as in the shards): the cluster's id.
    pub cluster: String,
    /// `exact` (the same text as an earlier document) or `near`.
    pub kind: String,
    /// Estimated Jaccard similarity to the kept document.
    pub jaccard: f64,
}

/// The decisions that depend on earlier documents (deduplication) and the output: documents
/// arrive in input order, so the result does not depend on how the per-document work was spread.
pub(crate) struct State {
    report: Report,
    /// `clusters.jsonl` being written (with `--clusters`).
    clusters: Option<(PathBuf, std::io::BufWriter<std::fs::File>)>,
    index: Option<minhash::LshIndex>,
    exact_seen: dedup::ExactSet,
    /// Source and preview of the first document with each content hash (for report samples).
    exact_first: rustc_hash::FxHashMap<u128, (String, String)>,
    exact_first_cap: usize,
    /// Source and preview of each document in the near-duplicate index, by index id.
    kept_meta: dedup::KeptMeta,
    /// Where the deduplication indexes go when they reach `--memory` (removed at the end).
    spill_dir: PathBuf,
    train: shards::ShardWriter,
    val: shards::ShardWriter,
}

impl State {
    pub(crate) fn new(inputs: &[PathBuf], out_dir: &Path, opts: &PrepareOptions) -> Result<State> {
        let clusters = if opts.clusters {
            let path = out_dir.join(CLUSTERS_FILE);
            let file = std::fs::File::create(&path).map_err(|e| DataError::io(&path, e))?;
            Some((path, std::io::BufWriter::with_capacity(1 << 16, file)))
        } else {
            None
        };
        let index = opts
            .near_dedup
            .as_ref()
            .map(|m| minhash::LshIndex::new(m.num_perm, m.threshold));
        let shards = |name| {
            shards::ShardWriter::with(
                out_dir,
                name,
                opts.shard_docs,
                opts.shard_bytes,
                opts.compression,
            )
        };
        Ok(State {
            clusters,
            report: Report {
                inputs: inputs.to_vec(),
                options: Some(opts.clone()),
                lsh_bands_rows: index.as_ref().map(|i| i.bands_rows()),
                ..Default::default()
            },
            index,
            exact_seen: dedup::ExactSet::default(),
            exact_first: rustc_hash::FxHashMap::default(),
            exact_first_cap: opts
                .memory
                .map_or(100_000, |m| (m / 4096).clamp(100, 100_000) as usize),
            kept_meta: dedup::KeptMeta::default(),
            spill_dir: out_dir.join(".dedup"),
            train: shards("train"),
            val: shards("val"),
        })
    }

    /// Adds a line to `clusters.jsonl` (when asked for): `source` joins the cluster of kept
    /// document `id`.
    fn cluster_member(&mut self, source: &str, id: u32, kind: &str, jaccard: f64) -> Result<()> {
        use std::io::Write;
        if self.clusters.is_none() {
            return Ok(());
        }
        let line = ClusterMember {
            source: source.to_string(),
            cluster: self.kept_meta.get(id).0,
            kind: kind.to_string(),
            jaccard,
        };
        let Some((path, w)) = self.clusters.as_mut() else {
            return Ok(());
        };
        serde_json::to_writer(&mut *w, &line)
            .map_err(std::io::Error::from)
            .and_then(|()| w.write_all(b"\n"))
            .map_err(|e| DataError::io(&*path, e))
    }

    /// Counts what reading a file gave besides documents (after its documents).
    pub(crate) fn add_notes(&mut self, notes: FileNotes, samples: usize) {
        let r = &mut self.report;
        r.skipped_bad += notes.bad;
        let room = samples.saturating_sub(r.skipped_samples.len());
        r.skipped_samples
            .extend(notes.bad_samples.into_iter().take(room));
        for (k, n) in notes.web {
            *r.web_skipped.entry(k).or_default() += n;
        }
        let room = samples.saturating_sub(r.web_skipped_samples.len());
        r.web_skipped_samples
            .extend(notes.web_samples.into_iter().take(room));
    }

    /// Deduplicates a batch of documents in order and writes the ones kept.
    pub(crate) fn decide(&mut self, batch: Vec<Processed>, opts: &PrepareOptions) -> Result<()> {
        let samples = opts.report_samples;
        for p in batch {
            let r = &mut self.report;
            r.read.add(p.read_bytes as usize);
            r.normalized_changed_docs += u64::from(p.changed);
            r.mojibake_fixed_docs += u64::from(p.mojibake);
            if p.drop.is_none() {
                r.c4_lines_removed += u64::from(p.c4_lines);
            }
            r.dates_rewritten += u64::from(p.dates);
            if let Some(code) = p.language {
                r.languages
                    .entry(code.to_string())
                    .or_default()
                    .add(p.len());
            }
            if let Some(counts) = p.pii {
                r.pii_docs += 1;
                for k in pii::Kind::ALL {
                    if counts[k as usize] > 0 {
                        *r.pii_masked.entry(k.name().to_string()).or_default() +=
                            counts[k as usize] as u64;
                    }
                }
                if r.pii_samples.len() < samples {
                    r.pii_samples.push(FilteredSample {
                        source: p.source.clone(),
                        text: preview(&p.text),
                    });
                }
            }
            if let Some(reason) = p.drop {
                let key = reason.key();
                r.filtered.entry(key.clone()).or_default().add(p.len());
                let examples = r.filtered_samples.entry(key).or_default();
                if examples.len() < samples {
                    examples.push(FilteredSample {
                        source: p.source.clone(),
                        text: preview(&p.text),
                    });
                }
                continue;
            }
            if p.text.is_empty() {
                r.filtered.entry("empty".into()).or_default().add(0);
                continue;
            }
            if opts.exact_dedup {
                if !self.exact_seen.insert(p.exact) {
                    // Its first copy is in the index, or was removed as a duplicate of a document
                    // there: the same signature finds that cluster again.
                    let found = self
                        .clusters
                        .as_ref()
                        .and(self.index.as_ref())
                        .zip(p.signature.as_ref());
                    if let Some((id, j)) = found.and_then(|(idx, sig)| idx.query(sig)) {
                        self.cluster_member(&p.source, id, "exact", j)?;
                    }
                    let r = &mut self.report;
                    let e = &mut r.exact_duplicates;
                    e.removed.add(p.len());
                    if e.samples.len() < samples {
                        let (kept, kept_text) =
                            self.exact_first.get(&p.exact).cloned().unwrap_or_default();
                        if e.samples.len() + 1 == samples {
                            self.exact_first = Default::default();
                        }
                        e.samples.push(DupSample {
                            removed: p.source.clone(),
                            kept,
                            jaccard: 1.0,
                            removed_text: preview(&p.text),
                            kept_text,
                        });
                    }
                    continue;
                }
                // Only read for the report's samples: not kept once they are all there.
                let sampling = self.report.exact_duplicates.samples.len() < samples;
                if sampling && self.exact_first.len() < self.exact_first_cap {
                    self.exact_first
                        .insert(p.exact, (p.source.clone(), preview(&p.text)));
                }
            }
            if let (Some(idx), Some(sig)) = (self.index.as_mut(), p.signature.as_ref()) {
                if let Some((id, j)) = idx.query_or_insert(sig) {
                    self.cluster_member(&p.source, id, "near", j)?;
                    let r = &mut self.report;
                    let n = &mut r.near_duplicates;
                    n.removed.add(p.len());
                    if n.samples.len() < samples {
                        let (kept, kept_text) = self.kept_meta.get(id);
                        n.samples.push(DupSample {
                            removed: p.source.clone(),
                            kept,
                            jaccard: j,
                            removed_text: preview(&p.text),
                            kept_text,
                        });
                    }
                    continue;
                }
                self.kept_meta.push(p.source.clone(), preview(&p.text));
            }
            // The split is by content: a hash of the content hash (the text is not read again).
            let bucket = xxh3_64_with_seed(&p.exact.to_le_bytes(), opts.split_seed) % 1_000_000;
            if (bucket as f64) < opts.val_fraction * 1_000_000.0 {
                self.val.write_with(&p.text, &p.source, p.json.as_deref())?;
            } else {
                self.train
                    .write_with(&p.text, &p.source, p.json.as_deref())?;
            }
        }
        if let Some(cap) = opts.memory {
            let used = self.exact_seen.memory_bytes()
                + self.kept_meta.memory_bytes()
                + self.index.as_ref().map_or(0, |i| i.memory_bytes());
            // The rest of the cap is left for the batch in flight and the report's samples.
            if used as u64 > cap / 10 * 9 {
                std::fs::create_dir_all(&self.spill_dir)
                    .map_err(|e| DataError::io(&self.spill_dir, e))?;
                self.exact_seen.spill_to(&self.spill_dir)?;
                self.kept_meta.spill_to(&self.spill_dir)?;
                if let Some(i) = self.index.as_mut() {
                    i.spill_to(&self.spill_dir)?;
                }
                self.report.dedup_spills += 1;
            }
        }
        Ok(())
    }

    /// Writes the last shards and the report, and puts the output directory in place.
    pub(crate) fn finish(
        mut self,
        output: lmkit_core::OutputDir,
        inputs: &[PathBuf],
        t0: std::time::Instant,
    ) -> Result<Report> {
        if self.report.read.docs == 0 {
            let what = inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(DataError::EmptyInput { what });
        }
        self.train.finish()?;
        self.val.finish()?;
        if let Some((path, w)) = self.clusters.take() {
            w.into_inner()
                .map_err(|e| e.into_error())
                .and_then(|f| f.sync_all())
                .map_err(|e| DataError::io(&path, e))?;
        }
        // The on-disk indexes are mapped: unmap them before removing their files.
        self.index = None;
        self.exact_seen = dedup::ExactSet::default();
        self.kept_meta = dedup::KeptMeta::default();
        if self.spill_dir.exists() {
            std::fs::remove_dir_all(&self.spill_dir)
                .map_err(|e| DataError::io(&self.spill_dir, e))?;
        }
        let mut report = self.report;
        let finals = |paths: Vec<PathBuf>| paths.iter().map(|p| output.final_path(p)).collect();
        report.train = SplitReport {
            docs: self.train.docs,
            bytes: self.train.bytes,
            shards: finals(self.train.paths),
        };
        report.validation = SplitReport {
            docs: self.val.docs,
            bytes: self.val.bytes,
            shards: finals(self.val.paths),
        };
        report.seconds = t0.elapsed().as_secs_f64();
        let report_path = output.path().join("report.json");
        let json = serde_json::to_vec_pretty(&report)
            .map_err(|e| DataError::io(&report_path, e.into()))?;
        lmkit_core::write_atomic_bytes(&report_path, &json)?;
        output.commit()?;
        Ok(report)
    }
}

#[cfg(test)]
mod url_tests {
    use super::*;

    #[test]
    fn hosts_and_blocked_domains() {
        assert_eq!(
            host("https://user@Sub.Example.com:8080/x?y"),
            "sub.example.com"
        );
        assert_eq!(host("example.org/path"), "example.org");
        let list = vec!["example.com".to_string()];
        assert!(blocked(Some("http://example.com/a"), &list));
        assert!(blocked(Some("https://news.example.com"), &list));
        assert!(!blocked(Some("https://notexample.com"), &list));
        assert!(!blocked(Some("https://example.com.evil.org"), &list));
        assert!(!blocked(None, &list));
    }
}
