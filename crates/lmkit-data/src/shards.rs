//! JSONL shard writer: `{prefix}-00000.jsonl`, ... with at most `shard_docs` documents each; every
//! shard is written to a temporary file, fsynced and renamed into place when complete.

use crate::error::{DataError, Result};
use lmkit_core::AtomicFile;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Record<'a> {
    pub text: &'a str,
    pub source: &'a str,
}

pub struct ShardWriter {
    dir: PathBuf,
    prefix: String,
    shard_docs: usize,
    current: Option<(AtomicFile, usize)>,
    pub paths: Vec<PathBuf>,
    pub docs: u64,
    pub bytes: u64,
}

impl ShardWriter {
    pub fn new(dir: &Path, prefix: &str, shard_docs: usize) -> Self {
        ShardWriter {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            shard_docs: shard_docs.max(1),
            current: None,
            paths: Vec::new(),
            docs: 0,
            bytes: 0,
        }
    }

    pub fn write(&mut self, text: &str, source: &str) -> Result<()> {
        let io = |e| DataError::io(&self.dir, e);
        if self.current.is_none() {
            self.current = Some((AtomicFile::create_in(&self.dir)?, 0));
        }
        let full = match self.current.as_mut() {
            Some((w, n)) => {
                serde_json::to_writer(&mut *w, &Record { text, source })
                    .map_err(|e| io(e.into()))?;
                w.write_all(b"\n").map_err(io)?;
                *n += 1;
                *n >= self.shard_docs
            }
            None => false,
        };
        self.docs += 1;
        self.bytes += text.len() as u64;
        if full {
            self.close_shard()?;
        }
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some((file, _)) = self.current.take() {
            let path = self
                .dir
                .join(format!("{}-{:05}.jsonl", self.prefix, self.paths.len()));
            file.commit(&path)?;
            self.paths.push(path);
        }
        Ok(())
    }

    pub fn finish(&mut self) -> Result<()> {
        self.close_shard()
    }
}
