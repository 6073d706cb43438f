//! From files to chunks ready to add: read, cut by the embedding model's token count, embed.

use crate::chunk::{chunk, ChunkOptions};
use crate::embed::Embedder;
use crate::index::NewChunk;
use crate::sources::Document;
use crate::Result;
use rayon::prelude::*;
use serde_json::{Map, Value};

/// The chunks of `docs` (texts only, not yet embedded), in order; `extra` metadata is added to
/// each (a document's own fields win).
pub fn cut(
    embedder: &Embedder,
    docs: &[Document],
    opts: ChunkOptions,
    extra: &Map<String, Value>,
) -> Vec<NewChunk> {
    docs.par_iter()
        .map(|d| {
            let mut meta = extra.clone();
            meta.extend(d.meta.iter().map(|(k, v)| (k.clone(), v.clone())));
            let mut count = |s: &str| embedder.count(s);
            chunk(&d.text, d.first_line, &mut count, opts)
                .into_iter()
                .map(|p| NewChunk {
                    source: d.source.clone(),
                    lines: [p.first_line, p.last_line],
                    meta: meta.clone(),
                    text: p.text,
                    vector: Vec::new(),
                })
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .into_iter()
        .flatten()
        .collect()
}

/// Fills in the vectors of `chunks`, `batch` texts per forward pass.
pub fn embed(
    embedder: &Embedder,
    chunks: &mut [NewChunk],
    batch: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<()> {
    let texts: Vec<String> = chunks.iter().map(|c| c.text.clone()).collect();
    let vectors = embedder.embed(&texts, batch, progress)?;
    for (c, v) in chunks.iter_mut().zip(vectors) {
        c.vector = v;
    }
    Ok(())
}
