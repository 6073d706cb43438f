//! Token shards: flat little-endian token ids (`tokens-00000.bin`, u16 when the vocabulary fits,
//! else u32) with a JSON header beside each (`tokens-00000.json`: vocab size, dtype, count,
//! documents). Written atomically; read by memory map.

use crate::error::{Result, TokenizeError};
use lmkit_core::AtomicFile;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    U16,
    U32,
}

impl Dtype {
    pub fn for_vocab(vocab_size: usize) -> Dtype {
        if vocab_size <= 1 << 16 {
            Dtype::U16
        } else {
            Dtype::U32
        }
    }
    pub fn width(self) -> usize {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardHeader {
    pub format: String,
    pub vocab_size: usize,
    pub dtype: Dtype,
    pub count: u64,
    pub documents: u64,
    /// The id appended after each document, if any.
    pub eot_id: Option<u32>,
}

pub const FORMAT: &str = "lmkit-tokens-v1";

/// Writes shards of at most `shard_tokens` tokens.
pub struct ShardWriter {
    dir: PathBuf,
    vocab_size: usize,
    dtype: Dtype,
    eot_id: Option<u32>,
    shard_tokens: u64,
    current: Option<(AtomicFile, u64, u64)>,
    pub paths: Vec<PathBuf>,
    pub tokens: u64,
    pub documents: u64,
}

impl ShardWriter {
    pub fn new(
        dir: &Path,
        vocab_size: usize,
        eot_id: Option<u32>,
        shard_tokens: u64,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| TokenizeError::io(dir, e))?;
        Ok(ShardWriter {
            dir: dir.to_path_buf(),
            vocab_size,
            dtype: Dtype::for_vocab(vocab_size),
            eot_id,
            shard_tokens: shard_tokens.max(1),
            current: None,
            paths: Vec::new(),
            tokens: 0,
            documents: 0,
        })
    }

    /// Appends one document's ids (and the end-of-text id).
    pub fn write_document(&mut self, ids: &[u32]) -> Result<()> {
        self.write_ids(ids)?;
        self.end_document()
    }

    /// Appends ids to the document being written (a document may come in parts: see
    /// [`crate::encode_each`]); [`Self::end_document`] ends it.
    pub fn write_ids(&mut self, ids: &[u32]) -> Result<()> {
        if self.current.is_none() {
            self.current = Some((AtomicFile::create_in(&self.dir)?, 0, 0));
        }
        let dir = &self.dir;
        if let Some((w, count, _)) = self.current.as_mut() {
            let width = if self.dtype == Dtype::U16 { 2 } else { 4 };
            let mut bytes = Vec::with_capacity(ids.len() * width);
            for &id in ids {
                match self.dtype {
                    Dtype::U16 => bytes.extend_from_slice(&(id as u16).to_le_bytes()),
                    Dtype::U32 => bytes.extend_from_slice(&id.to_le_bytes()),
                }
            }
            w.write_all(&bytes).map_err(|e| TokenizeError::io(dir, e))?;
            *count += ids.len() as u64;
        }
        self.tokens += ids.len() as u64;
        Ok(())
    }

    /// Ends the document being written: appends the end-of-text id, and closes the shard once
    /// it holds `shard_tokens` tokens (shards end at document ends).
    pub fn end_document(&mut self) -> Result<()> {
        let eot = self.eot_id;
        self.write_ids(eot.as_slice())?;
        let full = match self.current.as_mut() {
            Some((_, count, docs)) => {
                *docs += 1;
                *count >= self.shard_tokens
            }
            None => false,
        };
        self.documents += 1;
        if full {
            self.close_shard()?;
        }
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some((file, count, docs)) = self.current.take() {
            let stem = format!("tokens-{:05}", self.paths.len());
            let bin = self.dir.join(format!("{stem}.bin"));
            let header = ShardHeader {
                format: FORMAT.into(),
                vocab_size: self.vocab_size,
                dtype: self.dtype,
                count,
                documents: docs,
                eot_id: self.eot_id,
            };
            let json = serde_json::to_vec_pretty(&header)
                .map_err(|e| TokenizeError::Tokenizer(e.to_string()))?;
            // The header goes last: a shard without one is incomplete and is not read.
            file.commit(&bin)?;
            lmkit_core::write_atomic_bytes(&self.dir.join(format!("{stem}.json")), &json)?;
            self.paths.push(bin);
        }
        Ok(())
    }

    pub fn finish(&mut self) -> Result<()> {
        self.close_shard()
    }
}

/// One memory-mapped shard.
pub struct TokenShard {
    map: memmap2::Mmap,
    pub header: ShardHeader,
    pub path: PathBuf,
}

impl TokenShard {
    /// Opens `tokens-N.bin` with its `tokens-N.json` header, checking that they agree.
    pub fn open(bin: &Path) -> Result<TokenShard> {
        let head_path = bin.with_extension("json");
        let bad = |msg: String| TokenizeError::Shard {
            path: bin.to_path_buf(),
            msg,
        };
        let text =
            std::fs::read_to_string(&head_path).map_err(|e| TokenizeError::io(&head_path, e))?;
        let header: ShardHeader =
            serde_json::from_str(&text).map_err(|e| TokenizeError::Shard {
                path: head_path.clone(),
                msg: format!("bad shard header: {e}"),
            })?;
        if header.format != FORMAT {
            return Err(bad(format!(
                "unknown shard format `{}` (expected {FORMAT})",
                header.format
            )));
        }
        let map = lmkit_core::mmap::map_readonly(bin)?;
        let want = header.count * header.dtype.width() as u64;
        if map.len() as u64 != want {
            return Err(bad(format!(
                "file has {} bytes but the header says {} {:?} tokens ({want} bytes): truncated or corrupt",
                map.len(),
                header.count,
                header.dtype
            )));
        }
        let shard = TokenShard {
            map,
            header,
            path: bin.to_path_buf(),
        };
        // Every id inside the vocabulary the header names (a scan of the mapped file: a corrupt
        // or foreign shard fails here, naming itself, not deep inside a training step).
        let vocab = shard.header.vocab_size as u64;
        if let Some(i) = (0..shard.len()).find(|&i| u64::from(shard.get(i)) >= vocab) {
            return Err(bad(format!(
                "token {i} is id {} but the vocabulary has {vocab} ids: corrupt, or written for another tokenizer",
                shard.get(i)
            )));
        }
        Ok(shard)
    }

    pub fn len(&self) -> usize {
        self.header.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.header.count == 0
    }

    pub fn get(&self, i: usize) -> u32 {
        match self.header.dtype {
            Dtype::U16 => u32::from(u16::from_le_bytes([self.map[2 * i], self.map[2 * i + 1]])),
            Dtype::U32 => u32::from_le_bytes([
                self.map[4 * i],
                self.map[4 * i + 1],
                self.map[4 * i + 2],
                self.map[4 * i + 3],
            ]),
        }
    }

    /// Tokens `start..start+len` (clamped to the shard).
    pub fn slice(&self, start: usize, len: usize) -> Vec<u32> {
        let end = (start + len).min(self.len());
        (start.min(end)..end).map(|i| self.get(i)).collect()
    }
}

/// All shards of a directory, read as one token stream.
pub struct TokenDataset {
    pub shards: Vec<TokenShard>,
    starts: Vec<u64>,
    total: u64,
}

impl TokenDataset {
    pub fn open_dir(dir: &Path) -> Result<TokenDataset> {
        let mut bins: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| TokenizeError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|e| e == "bin")
                    && p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("tokens-"))
            })
            .collect();
        bins.sort();
        if bins.is_empty() {
            return Err(TokenizeError::Shard {
                path: dir.to_path_buf(),
                msg: "no tokens-*.bin shards here".into(),
            });
        }
        let shards: Vec<TokenShard> = bins
            .iter()
            .map(|b| TokenShard::open(b))
            .collect::<Result<_>>()?;
        let vocab = shards[0].header.vocab_size;
        if let Some(s) = shards.iter().find(|s| s.header.vocab_size != vocab) {
            return Err(TokenizeError::Shard {
                path: s.path.clone(),
                msg: format!(
                    "vocab size {} differs from the first shard's {vocab}",
                    s.header.vocab_size
                ),
            });
        }
        let mut starts = Vec::with_capacity(shards.len());
        let mut total = 0u64;
        for s in &shards {
            starts.push(total);
            total += s.header.count;
        }
        Ok(TokenDataset {
            shards,
            starts,
            total,
        })
    }

    pub fn len(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    pub fn vocab_size(&self) -> usize {
        self.shards[0].header.vocab_size
    }

    /// `len` tokens starting at global position `start` (crossing shard boundaries; clamped at the end).
    pub fn window(&self, start: u64, len: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(len);
        let mut pos = start;
        while out.len() < len && pos < self.total {
            let k = self.starts.partition_point(|&s| s <= pos) - 1;
            let shard = &self.shards[k];
            let local = (pos - self.starts[k]) as usize;
            let take = (len - out.len()).min(shard.len() - local);
            out.extend(shard.slice(local, take));
            pos += take as u64;
        }
        out
    }
}
