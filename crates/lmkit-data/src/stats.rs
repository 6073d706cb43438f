//! Statistics of a prepared corpus (`lmkit data stats`): kept documents per source file, length
//! and language histograms, and what each step removed (from `report.json`), with an SVG chart.

use crate::{DataError, Result, Tally};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Upper bounds (characters) of the length histogram's buckets; the last is open.
pub const LENGTH_BUCKETS: [usize; 6] = [100, 300, 1_000, 3_000, 10_000, 30_000];

#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// Kept documents and bytes per source file, by split.
    pub sources: BTreeMap<String, BTreeMap<String, Tally>>,
    /// Kept documents by length in characters (`<100`, `<300`, ..., `>=30000`).
    pub lengths: Vec<(String, u64)>,
    /// Kept documents by identified language (ISO 639-3).
    pub languages: BTreeMap<String, u64>,
    /// Documents removed by each step, and kept, from `report.json`.
    pub removed: Vec<(String, u64)>,
    pub kept: u64,
}

fn bucket_name(i: usize) -> String {
    match LENGTH_BUCKETS.get(i) {
        Some(b) => format!("<{b}"),
        None => format!(">={}", LENGTH_BUCKETS[LENGTH_BUCKETS.len() - 1]),
    }
}

/// Reads a `lmkit data prepare` output directory.
pub fn stats(dir: &Path, languages: bool) -> Result<Stats> {
    let report_path = dir.join("report.json");
    let text = std::fs::read_to_string(&report_path).map_err(|e| DataError::io(&report_path, e))?;
    let report: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| DataError::BadRecord {
            path: report_path.clone(),
            line: e.line() as u64,
            msg: format!("not a report of `lmkit data prepare`: {e}"),
        })?;
    let mut st = Stats::default();
    let docs = |v: &serde_json::Value| v["docs"].as_u64().unwrap_or(0);
    if let Some(f) = report["filtered"].as_object() {
        for (why, t) in f {
            st.removed.push((why.clone(), docs(t)));
        }
    }
    st.removed.push((
        "exact_duplicate".into(),
        docs(&report["exact_duplicates"]["removed"]),
    ));
    st.removed.push((
        "near_duplicate".into(),
        docs(&report["near_duplicates"]["removed"]),
    ));
    st.removed.retain(|(_, n)| *n > 0);
    st.removed.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let mut lengths = vec![0u64; LENGTH_BUCKETS.len() + 1];
    for (split, key) in [("train", "train"), ("validation", "validation")] {
        let Some(shards) = report[key]["shards"].as_array() else {
            continue;
        };
        for s in shards.iter().filter_map(|s| s.as_str()) {
            let name = Path::new(s)
                .file_name()
                .map(|n| dir.join(n))
                .unwrap_or_default();
            let rows: Vec<(String, String)> = if s.ends_with(".parquet") {
                let mut rows = Vec::new();
                let cols = crate::ingest::Columns {
                    text: "text",
                    url: Some("source"),
                    skip_bad: false,
                };
                crate::parquet_io::read_docs(&name, cols, &mut |_| {}, &mut |_| {}, &mut |d| {
                    rows.push((source_file(d.url.as_deref().unwrap_or_default()), d.text));
                    Ok(())
                })?;
                rows
            } else {
                let body = crate::ingest::read_text(&name)?;
                body.lines()
                    .enumerate()
                    .map(|(i, l)| {
                        let v: serde_json::Value =
                            serde_json::from_str(l).map_err(|e| DataError::BadRecord {
                                path: name.clone(),
                                line: i as u64 + 1,
                                msg: format!("not a prepared document: {e}"),
                            })?;
                        let text = v["text"].as_str().unwrap_or_default().to_string();
                        Ok((source_file(v["source"].as_str().unwrap_or_default()), text))
                    })
                    .collect::<Result<_>>()?
            };
            let langs: Vec<&'static str> = if languages {
                rows.par_iter()
                    .map(|(_, t)| crate::lang::identify(t).0)
                    .collect()
            } else {
                Vec::new()
            };
            for (i, (file, t)) in rows.iter().enumerate() {
                st.sources
                    .entry(split.to_string())
                    .or_default()
                    .entry(file.clone())
                    .or_default()
                    .add(t.len());
                let n = t.chars().count();
                let b = LENGTH_BUCKETS
                    .iter()
                    .position(|&b| n < b)
                    .unwrap_or(LENGTH_BUCKETS.len());
                lengths[b] += 1;
                if let Some(l) = langs.get(i) {
                    *st.languages.entry(l.to_string()).or_default() += 1;
                }
                st.kept += 1;
            }
        }
    }
    st.lengths = lengths
        .into_iter()
        .enumerate()
        .map(|(i, n)| (bucket_name(i), n))
        .collect();
    Ok(st)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal bar chart of what each step removed, and what was kept.
pub fn removal_svg(st: &Stats) -> String {
    let mut bars: Vec<(String, u64)> = st.removed.clone();
    bars.push(("kept".into(), st.kept));
    let max = bars.iter().map(|b| b.1).max().unwrap_or(1).max(1) as f64;
    let (row, left, width) = (26.0, 170.0, 420.0);
    let height = 50.0 + row * bars.len() as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"13\">\n\
         <text x=\"10\" y=\"22\" font-size=\"15\">Documents removed by each step (lmkit data prepare)</text>\n",
        left + width + 110.0
    );
    for (i, (label, n)) in bars.iter().enumerate() {
        let y = 40.0 + row * i as f64;
        let w = width * *n as f64 / max;
        let color = if label == "kept" { "#4a9" } else { "#d65" };
        s.push_str(&format!(
            "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"end\">{}</text>\
             <rect x=\"{left}\" y=\"{:.0}\" width=\"{w:.1}\" height=\"18\" fill=\"{color}\"/>\
             <text x=\"{:.1}\" y=\"{:.0}\">{n}</text>\n",
            left - 8.0,
            y + 14.0,
            escape(label),
            y,
            left + w + 6.0,
            y + 14.0
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// The statistics as Markdown tables.
pub fn markdown(st: &Stats) -> String {
    let mut s = String::from("| split | source | documents | MB |\n|---|---|---|---|\n");
    for (split, files) in &st.sources {
        for (f, t) in files {
            s.push_str(&format!(
                "| {split} | {f} | {} | {:.2} |\n",
                t.docs,
                t.bytes as f64 / 1e6
            ));
        }
    }
    s.push_str("\n| length (characters) | documents |\n|---|---|\n");
    for (b, n) in &st.lengths {
        s.push_str(&format!("| {b} | {n} |\n"));
    }
    if !st.languages.is_empty() {
        let mut langs: Vec<(&String, &u64)> = st.languages.iter().collect();
        langs.sort_by_key(|(_, n)| std::cmp::Reverse(**n));
        s.push_str("\n| language | documents |\n|---|---|\n");
        for (l, n) in langs {
            s.push_str(&format!("| {l} | {n} |\n"));
        }
    }
    s.push_str("\n| removed by | documents |\n|---|---|\n");
    for (why, n) in &st.removed {
        s.push_str(&format!("| {why} | {n} |\n"));
    }
    s.push_str(&format!("| (kept) | {} |\n", st.kept));
    s
}

/// The file a document came from: its source without `:line`, `:row` or `#record`.
fn source_file(source: &str) -> String {
    for sep in ['#', ':'] {
        if let Some((file, n)) = source.rsplit_once(sep) {
            if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
                return file.to_string();
            }
        }
    }
    source.to_string()
}
