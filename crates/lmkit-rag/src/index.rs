//! The vector index on disk: a directory written as a whole (a crash leaves the old index or
//! the new one) holding
//!
//! - `manifest.json`: format, counts, embedding model (path, fingerprint), chunking and HNSW
//!   settings;
//! - `vectors.f32`: unit vectors, little-endian, one row per chunk (memory-mapped);
//! - `graph.u32`: the HNSW graph ([`crate::hnsw::Graph`], memory-mapped);
//! - `chunks.jsonl`: per chunk its id, source file, line range and metadata;
//! - `texts.bin` + `texts.u64`: the chunk texts end to end and their offsets (memory-mapped);
//! - `bm25.u32` + `bm25-terms.txt`: the BM25 index of the texts.
//!
//! Chunk ids are stable across additions and deletions; graph nodes are renumbered when chunks
//! are deleted, so that nothing deleted is kept or walked through.

use crate::bm25::Bm25;
use crate::chunk::ChunkOptions;
use crate::filter::Filter;
use crate::hnsw::{self, Builder, Graph, HnswParams, Rows};
use crate::words::{Array, Words};
use crate::{RagError, Result};
use lmkit_core::PathError;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "lmkit-index";
pub const VERSION: u32 = 1;
const FILES: &[&str] = &[
    "manifest.json",
    "vectors.f32",
    "graph.u32",
    "chunks.jsonl",
    "texts.bin",
    "texts.u64",
    "bm25.u32",
    "bm25-terms.txt",
];
/// Reciprocal rank fusion's constant (Cormack et al. 2009).
pub const RRF_K: f32 = 60.0;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    /// The embedding model's directory (absolute).
    pub path: String,
    pub fingerprint: String,
    pub dim: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub count: usize,
    pub next_id: u64,
    /// Raised by every change, so that two writers cannot silently undo each other.
    pub generation: u64,
    pub model: ModelInfo,
    pub chunking: ChunkOptions,
    pub hnsw: HnswParams,
    /// Layer-0 candidates kept by a search (at least k).
    pub ef_search: usize,
    /// Collections of at most this many chunks are searched exactly.
    pub exact_below: usize,
}

impl Manifest {
    pub fn new(model: ModelInfo, chunking: ChunkOptions, hnsw: HnswParams) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            count: 0,
            next_id: 0,
            generation: 0,
            model,
            chunking,
            hnsw,
            ef_search: 64,
            exact_below: 2000,
        }
    }

    pub fn read(dir: &Path) -> Result<Manifest> {
        let p = dir.join("manifest.json");
        let text = std::fs::read_to_string(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound && dir.is_dir() {
                RagError::Invalid(format!(
                    "{}: not an lmkit index (no manifest.json); build one with `lmkit index build`",
                    dir.display()
                ))
            } else {
                PathError::new(&p, e).into()
            }
        })?;
        let m: Manifest =
            serde_json::from_str(&text).map_err(|e| RagError::corrupt(&p, e.to_string()))?;
        if m.format != FORMAT || m.version != VERSION {
            return Err(RagError::corrupt(
                &p,
                format!(
                    "format {} version {} (this lmkit reads {FORMAT} {VERSION})",
                    m.format, m.version
                ),
            ));
        }
        m.validate().map_err(|e| RagError::corrupt(&p, e))?;
        Ok(m)
    }

    /// Settings no index could have been built with are refused.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.model.dim == 0 || self.model.dim > 65_536 {
            return Err(format!("model.dim = {}", self.model.dim));
        }
        self.hnsw.validate()?;
        self.chunking.validate()
    }
}

/// Where a chunk came from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChunkInfo {
    pub id: u64,
    pub source: String,
    /// First and last line (1-based, inclusive).
    pub lines: [usize; 2],
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub meta: Map<String, Value>,
}

/// A chunk to add (its id is given on adding).
pub struct NewChunk {
    pub source: String,
    pub lines: [usize; 2],
    pub meta: Map<String, Value>,
    pub text: String,
    pub vector: Vec<f32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Dense,
    Bm25,
    Hybrid,
}

#[derive(Clone, Debug)]
pub struct SearchOptions {
    pub k: usize,
    pub mode: Mode,
    /// Layer-0 candidates (default: the manifest's `ef_search`).
    pub ef: Option<usize>,
    /// Brute force instead of the graph.
    pub exact: bool,
    pub filter: Filter,
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions {
            k: 10,
            mode: Mode::Hybrid,
            ef: None,
            exact: false,
            filter: Filter::default(),
        }
    }
}

/// One result: the chunk's node, its score (cosine similarity, BM25 score, or fused
/// reciprocal-rank score), and its rank and score in each list it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub node: u32,
    pub score: f32,
    pub dense: Option<(usize, f32)>,
    pub bm25: Option<(usize, f32)>,
}

/// A result with its chunk, as every backend returns it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Found {
    pub id: u64,
    pub source: String,
    pub lines: [usize; 2],
    pub meta: Map<String, Value>,
    pub text: String,
    /// Cosine similarity, BM25 score or fused reciprocal-rank score, as the mode gives.
    pub score: f32,
    /// Rank and similarity in the dense list, when the chunk was in it.
    pub dense: Option<(usize, f32)>,
    /// Rank and score in the BM25 list, when the chunk was in it.
    pub bm25: Option<(usize, f32)>,
}

/// Which chunks a deletion takes: any whose source matches one of `sources` (wildcards) or is
/// one of `paths` (exactly), whose id is in `ids`, or that pass a non-empty `filter`.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    pub sources: Vec<String>,
    pub paths: Vec<String>,
    pub ids: Vec<u64>,
    pub filter: Filter,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
            && self.paths.is_empty()
            && self.ids.is_empty()
            && self.filter.is_empty()
    }

    pub fn matches(&self, c: &ChunkInfo) -> bool {
        self.paths.contains(&c.source)
            || self
                .sources
                .iter()
                .any(|s| crate::filter::glob(s, &c.source))
            || self.ids.contains(&c.id)
            || (!self.filter.is_empty() && self.filter.matches(&c.source, &c.meta))
    }
}

pub struct Index {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// The generation read from disk (None: not on disk yet).
    on_disk: Option<u64>,
    /// Saving replaces whatever index is in the directory.
    replace: bool,
    vectors: Array<f32>,
    graph: Graph,
    chunks: Vec<ChunkInfo>,
    texts: Array<u8>,
    offsets: Array<u64>,
    bm25: Bm25,
}

impl Index {
    /// A new, empty index that will live in `dir` (nothing is written until [`Index::save`]).
    pub fn new(dir: &Path, manifest: Manifest) -> Index {
        let m = manifest.hnsw.m;
        Index {
            dir: dir.to_path_buf(),
            manifest,
            on_disk: None,
            replace: false,
            vectors: Array::Owned(Vec::new()),
            graph: Graph::empty(m),
            chunks: Vec::new(),
            texts: Array::Owned(Vec::new()),
            offsets: Array::Owned(vec![0]),
            bm25: Bm25::build::<&str>(&[]),
        }
    }

    /// Opens the index in `dir`, checking that its files agree with each other.
    pub fn open(dir: &Path) -> Result<Index> {
        let manifest = Manifest::read(dir)?;
        let n = manifest.count;
        let vp = dir.join("vectors.f32");
        let vectors = Array::<f32>::map(&vp)?;
        if vectors.get().len() != n * manifest.model.dim {
            return Err(RagError::corrupt(
                &vp,
                format!(
                    "{} values for {n} chunks of {} dimensions",
                    vectors.get().len(),
                    manifest.model.dim
                ),
            ));
        }
        let gp = dir.join("graph.u32");
        let graph = Graph::from_words(Words::map(&gp)?, &gp)?;
        if graph.len() != n || graph.m() != manifest.hnsw.m {
            return Err(RagError::corrupt(
                &gp,
                format!("a graph of {} nodes for {n} chunks", graph.len()),
            ));
        }
        let cp = dir.join("chunks.jsonl");
        let f = std::fs::File::open(&cp).map_err(|e| PathError::new(&cp, e))?;
        let mut chunks = Vec::with_capacity(n);
        for (i, line) in lmkit_core::lines_within(std::io::BufReader::new(f)).enumerate() {
            let line = line.map_err(|e| RagError::corrupt(&cp, format!("line {}: {e}", i + 1)))?;
            let c: ChunkInfo = serde_json::from_str(&line)
                .map_err(|e| RagError::corrupt(&cp, format!("line {}: {e}", i + 1)))?;
            chunks.push(c);
        }
        if chunks.len() != n {
            return Err(RagError::corrupt(
                &cp,
                format!("{} chunks where the manifest says {n}", chunks.len()),
            ));
        }
        let tp = dir.join("texts.bin");
        let op = dir.join("texts.u64");
        let texts = Array::<u8>::map(&tp)?;
        let offsets = Array::<u64>::map(&op)?;
        let o = offsets.get();
        if o.len() != n + 1
            || o[0] != 0
            || o.windows(2).any(|w| w[1] < w[0])
            || o[n] != texts.get().len() as u64
        {
            return Err(RagError::corrupt(&op, "text offsets do not fit texts.bin"));
        }
        let bm25 = Bm25::open(dir)?;
        if bm25.docs() != n {
            return Err(RagError::corrupt(
                dir.join("bm25.u32"),
                format!("{} documents for {n} chunks", bm25.docs()),
            ));
        }
        Ok(Index {
            dir: dir.to_path_buf(),
            on_disk: Some(manifest.generation),
            replace: false,
            manifest,
            vectors,
            graph,
            chunks,
            texts,
            offsets,
            bm25,
        })
    }

    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    pub fn chunk(&self, node: u32) -> &ChunkInfo {
        &self.chunks[node as usize]
    }

    pub fn chunks(&self) -> &[ChunkInfo] {
        &self.chunks
    }

    /// The text of a chunk.
    pub fn text(&self, node: u32) -> Result<&str> {
        let o = self.offsets.get();
        let (a, b) = (o[node as usize] as usize, o[node as usize + 1] as usize);
        std::str::from_utf8(&self.texts.get()[a..b]).map_err(|_| {
            RagError::corrupt(
                self.dir.join("texts.bin"),
                format!("chunk {node} is not UTF-8"),
            )
        })
    }

    /// The hits with their chunks.
    pub fn found(&self, hits: &[Hit]) -> Result<Vec<Found>> {
        hits.iter()
            .map(|h| {
                let c = self.chunk(h.node);
                Ok(Found {
                    id: c.id,
                    source: c.source.clone(),
                    lines: c.lines,
                    meta: c.meta.clone(),
                    text: self.text(h.node)?.to_string(),
                    score: h.score,
                    dense: h.dense,
                    bm25: h.bm25,
                })
            })
            .collect()
    }

    /// The stored vector of a chunk.
    pub fn vector(&self, node: u32) -> &[f32] {
        self.rows().row(node)
    }

    fn rows(&self) -> Rows<'_> {
        Rows {
            data: self.vectors.get(),
            dim: self.manifest.model.dim,
        }
    }

    fn all_texts(&self) -> Result<Vec<&str>> {
        (0..self.len() as u32).map(|i| self.text(i)).collect()
    }

    /// Adds chunks (graph insertion on the current thread pool; `progress` gets inserted counts).
    /// Returns the ids given to them.
    pub fn add(
        &mut self,
        new: Vec<NewChunk>,
        progress: &(dyn Fn(usize) + Sync),
    ) -> Result<Vec<u64>> {
        let dim = self.manifest.model.dim;
        if let Some(c) = new.iter().find(|c| c.vector.len() != dim) {
            return Err(RagError::Invalid(format!(
                "{}: a vector of {} dimensions for an index of {dim}",
                c.source,
                c.vector.len()
            )));
        }
        let mut vectors = std::mem::replace(&mut self.vectors, Array::Owned(Vec::new())).into_vec();
        let mut texts = std::mem::replace(&mut self.texts, Array::Owned(Vec::new())).into_vec();
        let mut offsets = std::mem::replace(&mut self.offsets, Array::Owned(Vec::new())).into_vec();
        let mut ids = Vec::with_capacity(new.len());
        for c in new {
            let id = self.manifest.next_id;
            self.manifest.next_id += 1;
            ids.push(id);
            vectors.extend_from_slice(&c.vector);
            texts.extend_from_slice(c.text.as_bytes());
            offsets.push(texts.len() as u64);
            self.chunks.push(ChunkInfo {
                id,
                source: c.source,
                lines: c.lines,
                meta: c.meta,
            });
        }
        let mut b = Builder::from_graph(&self.graph, self.manifest.hnsw);
        b.insert_all(
            Rows {
                data: &vectors,
                dim,
            },
            progress,
        );
        self.graph = b.freeze();
        self.vectors = Array::Owned(vectors);
        self.texts = Array::Owned(texts);
        self.offsets = Array::Owned(offsets);
        self.bm25 = Bm25::build(&self.all_texts()?);
        self.manifest.count = self.chunks.len();
        Ok(ids)
    }

    /// Deletes the chunks `doomed` picks, for good (vectors, texts and graph nodes); returns how
    /// many.
    pub fn delete(&mut self, doomed: impl Fn(&ChunkInfo) -> bool) -> Result<usize> {
        let dead: Vec<bool> = self.chunks.iter().map(doomed).collect();
        let gone = dead.iter().filter(|&&d| d).count();
        if gone == 0 {
            return Ok(0);
        }
        let dim = self.manifest.model.dim;
        let (graph, _) =
            Builder::from_graph(&self.graph, self.manifest.hnsw).remove(self.rows(), &dead);
        let keep: Vec<u32> = (0..self.len() as u32)
            .filter(|&i| !dead[i as usize])
            .collect();
        let mut vectors = Vec::with_capacity(keep.len() * dim);
        let mut texts = Vec::new();
        let mut offsets = vec![0u64];
        for &i in &keep {
            vectors.extend_from_slice(self.vector(i));
            texts.extend_from_slice(self.text(i)?.as_bytes());
            offsets.push(texts.len() as u64);
        }
        self.chunks = keep
            .iter()
            .map(|&i| self.chunks[i as usize].clone())
            .collect();
        self.graph = graph;
        self.vectors = Array::Owned(vectors);
        self.texts = Array::Owned(texts);
        self.offsets = Array::Owned(offsets);
        self.bm25 = Bm25::build(&self.all_texts()?);
        self.manifest.count = self.chunks.len();
        Ok(gone)
    }

    /// Makes [`Index::save`] replace an index already in the directory (readable or not).
    pub fn replace_existing(&mut self) {
        self.replace = true;
    }

    /// Writes the index into its directory as a whole. Refuses when the index on disk changed
    /// since it was opened (another command wrote it), or when the directory holds other files.
    pub fn save(&mut self) -> Result<()> {
        if !self.replace && self.dir.join("manifest.json").exists() {
            let now = Manifest::read(&self.dir)?.generation;
            if self.on_disk != Some(now) {
                return Err(RagError::Invalid(format!(
                    "{}: the index was changed by another command while this one ran; run it again",
                    self.dir.display()
                )));
            }
        }
        let out = lmkit_core::OutputDir::create(&self.dir, "an lmkit index file", |name| {
            FILES.contains(&name)
        })
        .map_err(|e| RagError::Invalid(e.to_string()))?;
        let d = out.path();
        self.manifest.generation += 1;
        self.manifest.count = self.chunks.len();
        let io = |p: &Path, e: std::io::Error| RagError::from(PathError::new(p, e));
        lmkit_core::write_atomic_bytes(
            &d.join("vectors.f32"),
            bytemuck::cast_slice(self.vectors.get()),
        )?;
        lmkit_core::write_atomic_bytes(
            &d.join("graph.u32"),
            bytemuck::cast_slice(self.graph.words()),
        )?;
        lmkit_core::write_atomic_bytes(&d.join("texts.bin"), self.texts.get())?;
        lmkit_core::write_atomic_bytes(
            &d.join("texts.u64"),
            bytemuck::cast_slice(self.offsets.get()),
        )?;
        let cp = d.join("chunks.jsonl");
        lmkit_core::write_atomic(&cp, |w| {
            for c in &self.chunks {
                serde_json::to_writer(&mut *w, c)?;
                w.write_all(b"\n")?;
            }
            Ok(())
        })?;
        self.bm25.save(d)?;
        let mp = d.join("manifest.json");
        let text = serde_json::to_string_pretty(&self.manifest)
            .map_err(|e| io(&mp, std::io::Error::other(e)))?;
        lmkit_core::write_atomic_bytes(&mp, text.as_bytes())?;
        out.commit()?;
        self.on_disk = Some(self.manifest.generation);
        self.replace = false;
        Ok(())
    }

    /// The nodes `filter` admits (None: all) and their number, worked out once per search.
    fn admitted(&self, filter: &Filter) -> (Option<Vec<bool>>, usize) {
        if filter.is_empty() {
            return (None, self.len());
        }
        let ok: Vec<bool> = self
            .chunks
            .iter()
            .map(|c| filter.matches(&c.source, &c.meta))
            .collect();
        let n = ok.iter().filter(|&&x| x).count();
        (Some(ok), n)
    }

    /// Dense search: exact for small collections, for `exact`, and when the filter admits so few
    /// chunks that brute force over them costs less than a filtered walk (which visits about
    /// ef·2m·(n / admitted) nodes); the graph otherwise.
    fn dense(
        &self,
        q: &[f32],
        k: usize,
        ef: Option<usize>,
        exact: bool,
        (ok, admitted): (&Option<Vec<bool>>, usize),
    ) -> Vec<(u32, f32)> {
        let allow_fn = |i: u32| ok.as_ref().is_none_or(|v| v[i as usize]);
        let allow: Option<&(dyn Fn(u32) -> bool + Sync)> = ok.as_ref().map(|_| &allow_fn as _);
        let n = self.len();
        let ef = ef.unwrap_or(self.manifest.ef_search).max(k);
        let walk_cost =
            (ef as f64 * 2.0 * self.manifest.hnsw.m as f64) * (n as f64 / admitted.max(1) as f64);
        let brute = exact || n <= self.manifest.exact_below || (admitted as f64) <= walk_cost;
        let found = if brute {
            hnsw::exact(self.rows(), q, k, allow)
        } else {
            self.graph.search(self.rows(), q, k, ef, allow)
        };
        found.into_iter().map(|h| (h.id, 1.0 - h.d)).collect()
    }

    /// BM25 search over the admitted nodes.
    fn keyword(&self, query: &str, k: usize, ok: &Option<Vec<bool>>) -> Vec<(u32, f32)> {
        match ok {
            Some(v) => self.bm25.search(query, k, Some(&|i| v[i as usize])),
            None => self.bm25.search(query, k, None),
        }
    }

    /// Searches by `vector` (the embedded query; needed unless the mode is BM25) and `text`.
    /// Hybrid fuses the dense and BM25 lists, each `max(4k, 40)` deep, by reciprocal rank.
    pub fn search(
        &self,
        vector: Option<&[f32]>,
        text: &str,
        o: &SearchOptions,
    ) -> Result<Vec<Hit>> {
        let need_vector = o.mode != Mode::Bm25;
        let v = match (vector, need_vector) {
            (Some(v), _) if v.len() != self.manifest.model.dim => {
                return Err(RagError::Invalid(format!(
                    "a query vector of {} dimensions for an index of {}",
                    v.len(),
                    self.manifest.model.dim
                )))
            }
            (None, true) => {
                return Err(RagError::Invalid(
                    "dense search needs the query's vector".into(),
                ))
            }
            (v, _) => v,
        };
        // More results than chunks cannot come back (and a huge k must not size anything).
        let k = o.k.min(self.len());
        let depth = if o.mode == Mode::Hybrid {
            k.saturating_mul(4).max(40).min(self.len())
        } else {
            k
        };
        let (ok, admitted) = self.admitted(&o.filter);
        let dense = match (o.mode, v) {
            (Mode::Bm25, _) | (_, None) => Vec::new(),
            (_, Some(v)) => self.dense(v, depth, o.ef, o.exact, (&ok, admitted)),
        };
        let keyword = if o.mode == Mode::Dense {
            Vec::new()
        } else {
            self.keyword(text, depth, &ok)
        };
        let mut hits: Vec<Hit> = Vec::new();
        let mut at: rustc_hash::FxHashMap<u32, usize> = Default::default();
        for (list, is_dense) in [(&dense, true), (&keyword, false)] {
            for (rank, &(node, score)) in list.iter().enumerate() {
                let i = *at.entry(node).or_insert_with(|| {
                    hits.push(Hit {
                        node,
                        score: 0.0,
                        dense: None,
                        bm25: None,
                    });
                    hits.len() - 1
                });
                let h = &mut hits[i];
                if is_dense {
                    h.dense = Some((rank + 1, score));
                } else {
                    h.bm25 = Some((rank + 1, score));
                }
                h.score = match o.mode {
                    Mode::Hybrid => h.score + 1.0 / (RRF_K + (rank + 1) as f32),
                    _ => score,
                };
            }
        }
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.node.cmp(&b.node)));
        hits.truncate(k);
        Ok(hits)
    }
}
