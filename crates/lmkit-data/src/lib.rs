//! Corpus preparation: ingest (txt, jsonl, directories, gzip, zstd, standard input) → normalize (NFKC, whitespace,
//! controls, optional dates) → quality filters → language identification → personal-data
//! masking → exact and MinHash near-duplicate removal →
//! deterministic train/validation split → JSONL shards and a report of what was dropped and why.
#![forbid(unsafe_code)]

pub mod c4;
pub mod dates;
pub mod error;
pub mod filters;
pub mod html;
pub mod ingest;
pub mod lang;
pub mod minhash;
pub mod mojibake;
pub mod normalize;
pub mod pii;
pub mod shards;
pub mod stats;
pub mod warc;

pub use error::{DataError, Result};
pub use filters::{DropReason, FilterOptions};
pub use ingest::{collect_inputs, Doc, IngestOptions, TxtUnit};
pub use minhash::{MinHashOptions, Shingle};
pub use normalize::NormalizeOptions;

use rayon::prelude::*;
use rustc_hash::FxHashSet;
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
    /// Share of documents sent to the validation split (by content hash).
    pub val_fraction: f64,
    pub split_seed: u64,
    pub shard_docs: usize,
    /// Start a new shard after about this many bytes of JSONL (0: no limit).
    pub shard_bytes: u64,
    pub compression: shards::Compression,
    /// How many examples of each kind of removal go into the report.
    pub report_samples: usize,
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
            val_fraction: 0.01,
            split_seed: 0,
            shard_docs: 100_000,
            shard_bytes: 0,
            compression: shards::Compression::None,
            report_samples: 10,
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
    pub train: SplitReport,
    pub validation: SplitReport,
    pub options: Option<PrepareOptions>,
    pub seconds: f64,
}

struct Processed {
    text: String,
    c4_lines: usize,
    mojibake: bool,
    language: Option<&'static str>,
    pii: Option<[u32; 5]>,
    changed: bool,
    dates: usize,
    drop: Option<DropReason>,
    exact: u128,
    signature: Option<Vec<u32>>,
}

fn preview(text: &str) -> String {
    let mut s: String = text.chars().take(120).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

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
    }
    if o.shard_docs == 0 {
        return bad("shard_docs", "0".into(), "must be at least 1");
    }
    Ok(())
}

/// The files `prepare` writes: its shards and report (replaced by a new run into the directory).
fn is_prepare_output(name: &str) -> bool {
    name == "report.json"
        || ((name.starts_with("train-") || name.starts_with("val-"))
            && [".jsonl", ".jsonl.gz", ".jsonl.zst"]
                .iter()
                .any(|s| name.ends_with(s)))
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
    let out_dir = output.path();
    let ingest = IngestOptions {
        txt_unit: opts.txt_unit,
        text_field: opts.text_field.clone(),
        skip_bad: opts.skip_bad,
        url_field: (!opts.url_blocklist.is_empty()).then(|| opts.url_field.clone()),
    };
    let hasher = opts.near_dedup.clone().map(minhash::MinHasher::new);
    let mut index = opts
        .near_dedup
        .as_ref()
        .map(|m| minhash::LshIndex::new(m.num_perm, m.threshold));
    let mut st = State {
        report: Report {
            inputs: inputs.to_vec(),
            options: Some(opts.clone()),
            ..Default::default()
        },
        exact_seen: FxHashSet::default(),
        exact_first: rustc_hash::FxHashMap::default(),
        kept_meta: Vec::new(),
        train: shards::ShardWriter::with(
            out_dir,
            "train",
            opts.shard_docs,
            opts.shard_bytes,
            opts.compression,
        ),
        val: shards::ShardWriter::with(
            out_dir,
            "val",
            opts.shard_docs,
            opts.shard_bytes,
            opts.compression,
        ),
    };
    st.report.lsh_bands_rows = index.as_ref().map(|i| i.bands_rows());
    // Compressed input and standard input have no known length to show progress against.
    let any_gz = inputs
        .iter()
        .any(|p| p.as_os_str() == "-" || p.extension().is_some_and(|e| e == "gz" || e == "zst"));
    let total: u64 = inputs
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    st.report.input_bytes = total;
    progress.begin("preparing", if any_gz { 0 } else { total }, Unit::Bytes);

    const BATCH: usize = 4096;
    let mut batch: Vec<Doc> = Vec::with_capacity(BATCH);
    for path in inputs {
        let (mut bad, mut bad_samples) = (0u64, Vec::new());
        let (mut web, mut web_samples) = (BTreeMap::<&'static str, u64>::new(), Vec::new());
        let room = opts
            .report_samples
            .saturating_sub(st.report.skipped_samples.len());
        let web_room = opts
            .report_samples
            .saturating_sub(st.report.web_skipped_samples.len());
        ingest::read_docs(
            path,
            &ingest,
            &mut |n| progress.advance(n),
            &mut |s| {
                if s.is_bad() {
                    bad += 1;
                    if bad_samples.len() < room {
                        bad_samples.push(s);
                    }
                } else {
                    *web.entry(s.kind).or_default() += 1;
                    if web_samples.len() < web_room {
                        web_samples.push(s);
                    }
                }
            },
            &mut |doc| {
                batch.push(doc);
                if batch.len() >= BATCH {
                    st.process(
                        std::mem::take(&mut batch),
                        opts,
                        hasher.as_ref(),
                        index.as_mut(),
                    )?;
                }
                Ok(())
            },
        )?;
        st.report.skipped_bad += bad;
        st.report.skipped_samples.extend(bad_samples);
        for (k, n) in web {
            *st.report.web_skipped.entry(k.to_string()).or_default() += n;
        }
        st.report.web_skipped_samples.extend(web_samples);
    }
    st.process(batch, opts, hasher.as_ref(), index.as_mut())?;
    progress.finish();
    if st.report.read.docs == 0 {
        let what = inputs
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(DataError::EmptyInput { what });
    }
    st.train.finish()?;
    st.val.finish()?;
    let mut report = st.report;
    let finals = |paths: Vec<PathBuf>| paths.iter().map(|p| output.final_path(p)).collect();
    report.train = SplitReport {
        docs: st.train.docs,
        bytes: st.train.bytes,
        shards: finals(st.train.paths),
    };
    report.validation = SplitReport {
        docs: st.val.docs,
        bytes: st.val.bytes,
        shards: finals(st.val.paths),
    };
    report.seconds = t0.elapsed().as_secs_f64();
    let report_path = out_dir.join("report.json");
    let json =
        serde_json::to_vec_pretty(&report).map_err(|e| DataError::io(&report_path, e.into()))?;
    lmkit_core::write_atomic_bytes(&report_path, &json)?;
    output.commit()?;
    Ok(report)
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

struct State {
    report: Report,
    exact_seen: FxHashSet<u128>,
    /// Source and preview of the first document with each content hash (for report samples).
    exact_first: rustc_hash::FxHashMap<u128, (String, String)>,
    /// Source and preview of each document in the near-duplicate index, by index id.
    kept_meta: Vec<(String, String)>,
    train: shards::ShardWriter,
    val: shards::ShardWriter,
}

impl State {
    fn process(
        &mut self,
        batch: Vec<Doc>,
        opts: &PrepareOptions,
        hasher: Option<&minhash::MinHasher>,
        mut index: Option<&mut minhash::LshIndex>,
    ) -> Result<()> {
        // The per-document work runs on all cores; decisions that depend on earlier documents
        // (deduplication) are taken in input order below, so the output is deterministic.
        let done: Vec<Processed> = batch
            .par_iter()
            .map(|d| {
                let repaired = if opts.normalize.fix_mojibake {
                    mojibake::fix(&d.text)
                } else {
                    None
                };
                let (mut text, dates) =
                    normalize::normalize(repaired.as_deref().unwrap_or(&d.text), &opts.normalize);
                let changed = text != d.text;
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
                let signature = match (drop, hasher) {
                    (None, Some(h)) => Some(h.signature(&text)),
                    _ => None,
                };
                Processed {
                    c4_lines,
                    mojibake: repaired.is_some(),
                    changed,
                    language,
                    pii,
                    exact: xxh3_128(text.as_bytes()),
                    text,
                    dates,
                    drop,
                    signature,
                }
            })
            .collect();
        let samples = opts.report_samples;
        for (doc, p) in batch.iter().zip(done) {
            let r = &mut self.report;
            r.read.add(doc.text.len());
            r.normalized_changed_docs += u64::from(p.changed);
            r.mojibake_fixed_docs += u64::from(p.mojibake);
            if p.drop.is_none() {
                r.c4_lines_removed += p.c4_lines as u64;
            }
            r.dates_rewritten += p.dates as u64;
            if let Some(code) = p.language {
                r.languages
                    .entry(code.to_string())
                    .or_default()
                    .add(p.text.len());
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
                        source: doc.source.clone(),
                        text: preview(&p.text),
                    });
                }
            }
            if let Some(reason) = p.drop {
                let key = serde_json::to_value(reason)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                r.filtered.entry(key.clone()).or_default().add(p.text.len());
                let examples = r.filtered_samples.entry(key).or_default();
                if examples.len() < samples {
                    examples.push(FilteredSample {
                        source: doc.source.clone(),
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
                    let e = &mut r.exact_duplicates;
                    e.removed.add(p.text.len());
                    if e.samples.len() < samples {
                        let (kept, kept_text) =
                            self.exact_first.get(&p.exact).cloned().unwrap_or_default();
                        e.samples.push(DupSample {
                            removed: doc.source.clone(),
                            kept,
                            jaccard: 1.0,
                            removed_text: preview(&p.text),
                            kept_text,
                        });
                    }
                    continue;
                }
                if self.exact_first.len() < 100_000 {
                    self.exact_first
                        .insert(p.exact, (doc.source.clone(), preview(&p.text)));
                }
            }
            if let (Some(idx), Some(sig)) = (index.as_deref_mut(), p.signature.as_ref()) {
                if let Some((id, j)) = idx.query_or_insert(sig) {
                    let n = &mut r.near_duplicates;
                    n.removed.add(p.text.len());
                    if n.samples.len() < samples {
                        let (kept, kept_text) =
                            self.kept_meta.get(id as usize).cloned().unwrap_or_default();
                        n.samples.push(DupSample {
                            removed: doc.source.clone(),
                            kept,
                            jaccard: j,
                            removed_text: preview(&p.text),
                            kept_text,
                        });
                    }
                    continue;
                }
                self.kept_meta.push((doc.source.clone(), preview(&p.text)));
            }
            let bucket = xxh3_64_with_seed(p.text.as_bytes(), opts.split_seed) % 1_000_000;
            if (bucket as f64) < opts.val_fraction * 1_000_000.0 {
                self.val.write(&p.text, &doc.source)?;
            } else {
                self.train.write(&p.text, &doc.source)?;
            }
        }
        Ok(())
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
