//! BM25 over the chunks (Robertson & Zaragoza 2009, with Lucene's idf
//! ln(1 + (N − df + 0.5)/(df + 0.5)); k1 = 1.2, b = 0.75). Terms are lowercased runs of letters
//! and digits; a run with Hangul, kana or Han characters also gives its character bigrams, so
//! that a Korean query word matches the same word with a particle attached (국민 ~ 국민은).

use crate::words::Words;
use crate::{RagError, Result};
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use std::io::Write;
use std::path::Path;

pub const K1: f32 = 1.2;
pub const B: f32 = 0.75;
const MAGIC: u32 = u32::from_le_bytes(*b"LMKB");
const VERSION: u32 = 1;

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0xAC00..=0xD7A3 | 0x1100..=0x11FF | 0x3130..=0x318F // Hangul
        | 0x3040..=0x30FF // kana
        | 0x4E00..=0x9FFF | 0x3400..=0x4DBF) // Han
}

/// The terms of `text`, in order (with repeats).
pub fn terms(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let push_run = |run: &str, out: &mut Vec<String>| {
        if run.is_empty() {
            return;
        }
        out.push(run.to_string());
        if run.chars().any(is_cjk) {
            let cs: Vec<char> = run.chars().collect();
            if cs.len() > 2 {
                for w in cs.windows(2) {
                    out.push(w.iter().collect());
                }
            }
        }
    };
    let lower = text.to_lowercase();
    let mut start = None;
    for (i, c) in lower.char_indices() {
        match (c.is_alphanumeric(), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                push_run(&lower[s..i], &mut out);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        push_run(&lower[s..], &mut out);
    }
    out
}

/// An inverted index: for each term, the (document, term frequency) pairs, documents ascending.
pub struct Bm25 {
    terms: FxHashMap<String, u32>,
    names: Vec<String>,
    /// Header, document lengths, posting offsets (terms + 1), then (doc, tf) pairs.
    words: Words,
    docs: usize,
    avg_len: f32,
}

const HEADER: usize = 4;

impl Bm25 {
    /// The index of `texts` (document i is texts[i]).
    pub fn build<S: AsRef<str> + Sync>(texts: &[S]) -> Bm25 {
        let per_doc: Vec<FxHashMap<String, u32>> = texts
            .par_iter()
            .map(|t| {
                let mut m = FxHashMap::default();
                for term in terms(t.as_ref()) {
                    *m.entry(term).or_insert(0) += 1;
                }
                m
            })
            .collect();
        let mut lists: FxHashMap<String, Vec<(u32, u32)>> = FxHashMap::default();
        let mut lens = Vec::with_capacity(texts.len());
        for (d, m) in per_doc.into_iter().enumerate() {
            lens.push(m.values().sum::<u32>());
            for (term, tf) in m {
                lists.entry(term).or_default().push((d as u32, tf));
            }
        }
        let mut names: Vec<String> = lists.keys().cloned().collect();
        names.sort_unstable();
        let mut w = vec![MAGIC, VERSION, texts.len() as u32, names.len() as u32];
        w.extend(&lens);
        let mut at = 0u32;
        w.push(0);
        for n in &names {
            at += lists[n].len() as u32;
            w.push(at);
        }
        for n in &names {
            for &(d, tf) in &lists[n] {
                w.extend([d, tf]);
            }
        }
        Self::from_parts(names, Words::Owned(w), Path::new("(in memory)"))
            .expect("an index just built is well formed")
    }

    fn from_parts(names: Vec<String>, words: Words, path: &Path) -> Result<Bm25> {
        let bad = |what: String| RagError::corrupt(path, what);
        let w = words.get();
        if w.len() < HEADER || w[0] != MAGIC || w[1] != VERSION {
            return Err(bad("not an lmkit BM25 index of this version".into()));
        }
        let (docs, nt) = (w[2] as usize, w[3] as usize);
        if nt != names.len() {
            return Err(bad(format!("{nt} terms, but {} term names", names.len())));
        }
        let post = HEADER + docs + nt + 1;
        if w.len() < post {
            return Err(bad("cut short".into()));
        }
        let offsets = &w[HEADER + docs..post];
        let total = *offsets.last().unwrap_or(&0) as usize;
        if offsets[0] != 0
            || offsets.windows(2).any(|p| p[1] < p[0])
            || w.len() != post + 2 * total
            || w[post..].chunks(2).any(|p| p[0] as usize >= docs)
        {
            return Err(bad("posting lists out of range".into()));
        }
        let lens = &w[HEADER..HEADER + docs];
        let avg_len = if docs == 0 {
            1.0
        } else {
            (lens.iter().map(|&l| l as f64).sum::<f64>() / docs as f64).max(1.0) as f32
        };
        let terms = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as u32))
            .collect();
        Ok(Bm25 {
            terms,
            names,
            words,
            docs,
            avg_len,
        })
    }

    pub fn docs(&self) -> usize {
        self.docs
    }

    /// Writes `bm25.u32` and `bm25-terms.txt` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        lmkit_core::write_atomic_bytes(&dir.join("bm25.u32"), self.words.bytes())?;
        let p = dir.join("bm25-terms.txt");
        lmkit_core::write_atomic(&p, |w| {
            for n in &self.names {
                writeln!(w, "{n}")?;
            }
            Ok(())
        })?;
        Ok(())
    }

    pub fn open(dir: &Path) -> Result<Bm25> {
        let p = dir.join("bm25-terms.txt");
        let text = std::fs::read_to_string(&p).map_err(|e| lmkit_core::PathError::new(&p, e))?;
        let names: Vec<String> = text.lines().map(str::to_string).collect();
        let wp = dir.join("bm25.u32");
        Self::from_parts(names, Words::map(&wp)?, &wp)
    }

    /// The `k` best documents for `query` among those `allow` admits, best first, with scores.
    pub fn search(
        &self,
        query: &str,
        k: usize,
        allow: Option<&dyn Fn(u32) -> bool>,
    ) -> Vec<(u32, f32)> {
        let w = self.words.get();
        let lens = &w[HEADER..HEADER + self.docs];
        let nt = self.names.len();
        let offsets = &w[HEADER + self.docs..HEADER + self.docs + nt + 1];
        let post = &w[HEADER + self.docs + nt + 1..];
        let mut q = terms(query);
        q.sort_unstable();
        q.dedup();
        let mut score = vec![0f32; self.docs];
        let n = self.docs as f32;
        for t in &q {
            let Some(&ti) = self.terms.get(t) else {
                continue;
            };
            let (a, b) = (
                offsets[ti as usize] as usize,
                offsets[ti as usize + 1] as usize,
            );
            let df = (b - a) as f32;
            let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
            for p in post[2 * a..2 * b].chunks_exact(2) {
                let (d, tf) = (p[0] as usize, p[1] as f32);
                let norm = K1 * (1.0 - B + B * lens[d] as f32 / self.avg_len);
                score[d] += idf * tf * (K1 + 1.0) / (tf + norm);
            }
        }
        let mut hits: Vec<(u32, f32)> = score
            .iter()
            .enumerate()
            .filter(|&(d, &s)| s > 0.0 && allow.is_none_or(|f| f(d as u32)))
            .map(|(d, &s)| (d as u32, s))
            .collect();
        hits.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        hits.truncate(k);
        hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_lowercase_and_korean_bigrams() {
        assert_eq!(terms("Hello, World-2!"), vec!["hello", "world", "2"]);
        assert_eq!(terms("국민은 법"), vec!["국민은", "국민", "민은", "법"]);
    }

    #[test]
    fn scores_follow_the_formula() {
        let docs = ["the cat sat", "the dog sat on the cat", "a bird"];
        let ix = Bm25::build(&docs);
        let hits = ix.search("cat", 10, None);
        // Both cat documents, the shorter first; scores by hand.
        let avg = (3.0 + 6.0 + 2.0) / 3.0f32;
        let idf = (1.0f32 + (3.0 - 2.0 + 0.5) / (2.0 + 0.5)).ln();
        let s = |len: f32| idf * 2.2 / (1.0 + 1.2 * (0.25 + 0.75 * len / avg));
        assert_eq!(hits.len(), 2);
        assert_eq!(hits[0].0, 0);
        assert!((hits[0].1 - s(3.0)).abs() < 1e-5);
        assert!((hits[1].1 - s(6.0)).abs() < 1e-5);
        assert_eq!(ix.search("cat", 10, Some(&|d| d != 0))[0].0, 1);
        assert!(ix.search("zebra", 10, None).is_empty());
    }

    #[test]
    fn saves_and_refuses_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let ix = Bm25::build(&["alpha beta", "beta gamma"]);
        ix.save(dir.path()).unwrap();
        let again = Bm25::open(dir.path()).unwrap();
        assert_eq!(again.search("beta", 5, None), ix.search("beta", 5, None));
        let p = dir.path().join("bm25.u32");
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        b[n - 8] = 200; // a posting for document 200 of 2
        std::fs::write(&p, &b).unwrap();
        assert!(Bm25::open(dir.path()).is_err());
    }
}
