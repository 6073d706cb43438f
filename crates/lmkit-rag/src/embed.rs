//! Sentence embeddings for the index: a BERT-family encoder pooled as its sentence-transformers
//! configuration says, batched by length (little padding) and always unit length, so that inner
//! product is cosine similarity.

use crate::{RagError, Result};
use lmkit_models::bert::Bert;
use lmkit_models::Device;
use std::path::{Path, PathBuf};

pub struct Embedder {
    model: Bert,
    tk: lmkit_tokenize::Tokenizer,
    dev: Device,
    pub dir: PathBuf,
    /// Text tokens read per text (the model's limit less its special tokens).
    pub max_tokens: usize,
    pub dim: usize,
    /// A hash of the configuration, tokenizer and weight files: an index answers queries
    /// only with the model that built it.
    pub fingerprint: String,
}

fn model_err(dir: &Path, e: impl std::fmt::Display) -> RagError {
    RagError::Model(format!("{}: {e}", dir.display()))
}

/// xxh3 of the files that decide the vectors.
fn fingerprint(dir: &Path) -> Result<String> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut names: Vec<PathBuf> = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| lmkit_core::PathError::new(dir, e))? {
        let p = e.map_err(|e| lmkit_core::PathError::new(dir, e))?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".safetensors")
            || matches!(
                name,
                "config.json" | "tokenizer.json" | "modules.json" | "sentence_bert_config.json"
            )
        {
            names.push(p);
        }
    }
    let pooling = dir.join("1_Pooling").join("config.json");
    if pooling.exists() {
        names.push(pooling);
    }
    names.sort();
    for p in names {
        let bytes = lmkit_core::mmap::map_readonly(&p)?;
        h.update(
            p.file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
        h.update(&bytes);
    }
    Ok(format!("{:016x}", h.digest()))
}

impl Embedder {
    pub fn load(dir: &Path) -> Result<Embedder> {
        let dir = lmkit_models::resolve_checkpoint(dir);
        let dev = Device::Cpu;
        let model = Bert::load(&dir, &dev).map_err(|e| model_err(&dir, e))?;
        let tk = lmkit_tokenize::load(&dir).map_err(|e| model_err(&dir, e))?;
        let limit = model
            .pooling
            .max_seq_length
            .unwrap_or(usize::MAX)
            .min(model.cfg.max_tokens());
        let specials = lmkit_tokenize::encode_with_specials(&tk, &[String::new()], limit)
            .map_err(|e| model_err(&dir, e))?[0]
            .len();
        if limit <= specials + 8 {
            return Err(model_err(
                &dir,
                format!("reads only {limit} tokens per text"),
            ));
        }
        Ok(Embedder {
            dim: model.cfg.hidden_size,
            fingerprint: fingerprint(&dir)?,
            max_tokens: limit - specials,
            model,
            tk,
            dev,
            dir,
        })
    }

    /// Tokens of `text` without special tokens.
    pub fn count(&self, text: &str) -> usize {
        self.tk
            .encode(text, false)
            .map(|e| e.len())
            .unwrap_or(text.len())
    }

    /// Unit vectors for `texts`, in order, `batch` texts per forward pass (sorted by length);
    /// `progress` is told how many are done after each batch.
    pub fn embed(
        &self,
        texts: &[String],
        batch: usize,
        progress: &(dyn Fn(usize) + Sync),
    ) -> Result<Vec<Vec<f32>>> {
        let mut out =
            lmkit_infer::embed_batched(&self.model, &self.tk, texts, batch, &self.dev, progress)
                .map_err(|e| model_err(&self.dir, e))?;
        out.iter_mut().for_each(|v| normalize(v));
        Ok(out)
    }
}

/// Scales `v` to unit length (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

impl Embedder {
    /// The model that built `manifest`'s index: `override_dir` if given, else the path the
    /// manifest records; refused unless its fingerprint matches.
    pub fn for_index(manifest: &crate::Manifest, override_dir: Option<&Path>) -> Result<Embedder> {
        let dir = match override_dir {
            Some(d) => d.to_path_buf(),
            None => {
                let d = PathBuf::from(&manifest.model.path);
                if !d.exists() {
                    return Err(RagError::Model(format!(
                        "{}: the index's embedding model is not there any more; give its new place with --embedding-model",
                        d.display()
                    )));
                }
                d
            }
        };
        let e = Embedder::load(&dir)?;
        if e.fingerprint != manifest.model.fingerprint {
            return Err(RagError::Model(format!(
                "{}: not the model that built the index (fingerprint {} here, {} in the index's manifest, built with {}); queries must be embedded by the same model",
                e.dir.display(),
                e.fingerprint,
                manifest.model.fingerprint,
                manifest.model.path
            )));
        }
        Ok(e)
    }

    /// The manifest's description of this model.
    pub fn info(&self) -> crate::index::ModelInfo {
        let path = std::fs::canonicalize(&self.dir).unwrap_or_else(|_| self.dir.clone());
        crate::index::ModelInfo {
            path: path.display().to_string(),
            fingerprint: self.fingerprint.clone(),
            dim: self.dim,
        }
    }

    /// The unit vector of one query.
    pub fn query(&self, text: &str) -> Result<Vec<f32>> {
        Ok(self.embed(&[text.to_string()], 1, &|_| {})?.remove(0))
    }
}
