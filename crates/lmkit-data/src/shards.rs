//! Shard writer: `{prefix}-00000.jsonl` (or `.jsonl.gz`, `.jsonl.zst`, `.parquet`), ... with at
//! most `shard_docs` documents and about `shard_bytes` bytes of JSONL (for Parquet: of text and
//! source) each; every shard is written to a temporary file, fsynced and renamed into place when
//! complete.

use crate::error::{DataError, Result};
use lmkit_core::AtomicFile;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Record<'a> {
    pub text: &'a str,
    pub source: &'a str,
}

/// A document's line in JSONL shards (`{"text", "source"}` and a newline).
pub fn json_line(text: &str, source: &str) -> Vec<u8> {
    let mut line = Vec::with_capacity(text.len() + source.len() + 32);
    json_line_into(&mut line, text, source);
    line
}

/// [`json_line`], appended to `line`: what `serde_json` writes for a [`Record`], byte for byte.
fn json_line_into(line: &mut Vec<u8>, text: &str, source: &str) {
    line.extend_from_slice(b"{\"text\":");
    json_string_into(line, text);
    line.extend_from_slice(b",\"source\":");
    json_string_into(line, source);
    line.extend_from_slice(b"}\n");
}

/// `s` as a JSON string, escaped as `serde_json` escapes it (quotes, backslashes and controls
/// below U+0020: `\n`, `\t`, ... or `\u00XX`). Runs that need no escape are copied whole, found
/// eight bytes at a time.
fn json_string_into(line: &mut Vec<u8>, s: &str) {
    use crate::swar::{find, is_json_special, json_special};
    let b = s.as_bytes();
    line.reserve(b.len() + 2);
    line.push(b'"');
    let mut copied = 0;
    loop {
        let i = find(b, copied, json_special, is_json_special);
        line.extend_from_slice(&b[copied..i]);
        let Some(&c) = b.get(i) else { break };
        let escape: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\t' => b"\\t",
            b'\r' => b"\\r",
            0x08 => b"\\b",
            0x0C => b"\\f",
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                line.extend_from_slice(b"\\u00");
                line.push(HEX[usize::from(c >> 4)]);
                line.push(HEX[usize::from(c & 15)]);
                copied = i + 1;
                continue;
            }
        };
        line.extend_from_slice(escape);
        copied = i + 1;
    }
    line.push(b'"');
}

/// What shards are: JSON Lines, plain or compressed, or Parquet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    #[default]
    None,
    Gzip,
    /// Zstandard, one frame per [`ZSTD_FRAME_BYTES`] of JSONL (any zstd reader reads the
    /// frames as one stream).
    Zstd,
    /// Parquet files (`text`, `source` string columns; zstd-compressed pages).
    Parquet,
}

impl Compression {
    pub const ALL: [Compression; 4] = [
        Compression::None,
        Compression::Gzip,
        Compression::Zstd,
        Compression::Parquet,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            Compression::None => ".jsonl",
            Compression::Gzip => ".jsonl.gz",
            Compression::Zstd => ".jsonl.zst",
            Compression::Parquet => ".parquet",
        }
    }
}

pub const ZSTD_FRAME_BYTES: usize = 4 << 20;

enum Sink {
    Plain(AtomicFile),
    Gzip(flate2::write::GzEncoder<AtomicFile>),
    Zstd(AtomicFile, Vec<u8>),
    Parquet(Box<crate::parquet_io::ShardFile>),
}

fn parquet_error(e: parquet::errors::ParquetError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl Sink {
    fn new(dir: &Path, c: Compression) -> Result<Sink> {
        let f = AtomicFile::create_in(dir)?;
        Ok(match c {
            Compression::None => Sink::Plain(f),
            Compression::Gzip => Sink::Gzip(flate2::write::GzEncoder::new(
                f,
                flate2::Compression::default(),
            )),
            Compression::Zstd => Sink::Zstd(f, Vec::with_capacity(ZSTD_FRAME_BYTES)),
            Compression::Parquet => Sink::Parquet(Box::new(
                crate::parquet_io::ShardFile::new(f)
                    .map_err(|e| DataError::io(dir, parquet_error(e)))?,
            )),
        })
    }

    fn write_doc(&mut self, text: &str, source: &str, line: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Parquet(p) => p.write(text, source).map_err(parquet_error),
            _ => self.write_all(line),
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Plain(f) => f.write_all(bytes),
            Sink::Gzip(g) => g.write_all(bytes),
            Sink::Zstd(f, buf) => {
                buf.extend_from_slice(bytes);
                if buf.len() >= ZSTD_FRAME_BYTES {
                    flush_frame(f, buf)?;
                }
                Ok(())
            }
            Sink::Parquet(_) => unreachable!("Parquet shards take documents, not bytes"),
        }
    }

    fn into_file(self) -> std::io::Result<AtomicFile> {
        match self {
            Sink::Plain(f) => Ok(f),
            Sink::Gzip(g) => g.finish(),
            Sink::Zstd(mut f, mut buf) => {
                flush_frame(&mut f, &mut buf)?;
                Ok(f)
            }
            Sink::Parquet(p) => p.finish().map_err(parquet_error),
        }
    }
}

fn flush_frame(f: &mut AtomicFile, buf: &mut Vec<u8>) -> std::io::Result<()> {
    if !buf.is_empty() {
        let frame = ruzstd::encoding::compress_to_vec(
            &buf[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        f.write_all(&frame)?;
        buf.clear();
    }
    Ok(())
}

pub struct ShardWriter {
    dir: PathBuf,
    prefix: String,
    shard_docs: usize,
    shard_bytes: u64,
    compression: Compression,
    /// The open shard, its documents and JSONL bytes.
    current: Option<(Sink, usize, u64)>,
    line: Vec<u8>,
    pub paths: Vec<PathBuf>,
    pub docs: u64,
    pub bytes: u64,
}

impl ShardWriter {
    pub fn new(dir: &Path, prefix: &str, shard_docs: usize) -> Self {
        Self::with(dir, prefix, shard_docs, 0, Compression::None)
    }

    /// `shard_bytes`: start a new shard once this many bytes of JSONL (before compression) are
    /// in the current one (0: no limit).
    pub fn with(
        dir: &Path,
        prefix: &str,
        shard_docs: usize,
        shard_bytes: u64,
        compression: Compression,
    ) -> Self {
        ShardWriter {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            shard_docs: shard_docs.max(1),
            shard_bytes,
            compression,
            current: None,
            line: Vec::new(),
            paths: Vec::new(),
            docs: 0,
            bytes: 0,
        }
    }

    pub fn write(&mut self, text: &str, source: &str) -> Result<()> {
        self.write_with(text, source, None)
    }

    /// [`ShardWriter::write`], with the document's JSON line when it was made already
    /// ([`json_line`]; used unless the shards are Parquet).
    pub fn write_with(&mut self, text: &str, source: &str, json: Option<&[u8]>) -> Result<()> {
        let dir = self.dir.clone();
        let io = |e| DataError::io(&dir, e);
        if self.current.is_none() {
            self.current = Some((Sink::new(&self.dir, self.compression)?, 0, 0));
        }
        self.line.clear();
        let json = match json {
            _ if self.compression == Compression::Parquet => &[][..],
            Some(line) => line,
            None => {
                json_line_into(&mut self.line, text, source);
                &self.line
            }
        };
        let size = if self.compression == Compression::Parquet {
            (text.len() + source.len()) as u64
        } else {
            json.len() as u64
        };
        let full = match self.current.as_mut() {
            Some((w, n, b)) => {
                w.write_doc(text, source, json).map_err(io)?;
                *n += 1;
                *b += size;
                *n >= self.shard_docs || (self.shard_bytes > 0 && *b >= self.shard_bytes)
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
        if let Some((sink, _, _)) = self.current.take() {
            let path = self.dir.join(format!(
                "{}-{:05}{}",
                self.prefix,
                self.paths.len(),
                self.compression.suffix()
            ));
            let file = sink.into_file().map_err(|e| DataError::io(&path, e))?;
            file.commit(&path)?;
            self.paths.push(path);
        }
        Ok(())
    }

    pub fn finish(&mut self) -> Result<()> {
        self.close_shard()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The line is what `serde_json` writes: every control byte, quotes, backslashes, characters
    /// of every UTF-8 length, at every position of an eight-byte word.
    #[test]
    fn json_lines_equal_serde_json() {
        use lmkit_core::rng::Random;
        let mut pieces: Vec<String> = (0u8..0x20).map(|b| char::from(b).to_string()).collect();
        pieces.extend(
            [
                "\"", "\\", "/", "\u{7F}", "a", "bcdefgh", " ", "é", "가", "😀", "\u{2028}",
            ]
            .map(String::from),
        );
        let mut rng = lmkit_core::rng::SplitMix64::new(4);
        let mut pick = || {
            let n = rng.next_u64() % 40;
            (0..n)
                .map(|_| pieces[(rng.next_u64() % pieces.len() as u64) as usize].as_str())
                .collect::<String>()
        };
        for _ in 0..20_000 {
            let (text, source) = (pick(), pick());
            let mut want = serde_json::to_vec(&Record {
                text: &text,
                source: &source,
            })
            .unwrap();
            want.push(b'\n');
            assert_eq!(json_line(&text, &source), want, "{text:?} {source:?}");
        }
    }
}
