//! Reading text that may be compressed: the compression is named by the file's extension (`.gz`,
//! `.zst`), and `-` is standard input (read as it comes, uncompressed).

use crate::PathError;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression `name` (a file name) says, and the name without that extension.
    pub fn split(name: &str) -> (&str, Compression) {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".gz") {
            (&name[..name.len() - 3], Compression::Gzip)
        } else if lower.ends_with(".zst") {
            (&name[..name.len() - 4], Compression::Zstd)
        } else {
            (name, Compression::None)
        }
    }

    /// The compression of `path`, by its extension.
    pub fn of(path: &Path) -> Compression {
        path.file_name()
            .and_then(|n| n.to_str())
            .map_or(Compression::None, |n| Self::split(n).1)
    }

    /// `r` decompressed.
    pub fn decode<'a>(self, r: Box<dyn Read + 'a>) -> std::io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::None => r,
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
            Compression::Zstd => Box::new(ZstdFrames::new(BufReader::with_capacity(1 << 16, r))?),
        })
    }
}

/// `path` opened for reading, decompressed by its extension; `-` is standard input.
pub fn open_text(path: &Path) -> Result<Box<dyn BufRead>, PathError> {
    if path == Path::new("-") {
        return Ok(Box::new(BufReader::with_capacity(
            1 << 20,
            std::io::stdin(),
        )));
    }
    let file = File::open(path).map_err(|e| PathError::new(path, e))?;
    let r = Compression::of(path)
        .decode(Box::new(file))
        .map_err(|e| PathError::new(path, e))?;
    Ok(Box::new(BufReader::with_capacity(1 << 20, r)))
}

/// A Zstandard stream of one or more frames, decoded as one.
pub struct ZstdFrames<R: BufRead> {
    decoder: Option<ruzstd::decoding::StreamingDecoder<R, ruzstd::decoding::FrameDecoder>>,
}

fn invalid(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("not a Zstandard stream: {e}"),
    )
}

impl<R: BufRead> ZstdFrames<R> {
    pub fn new(r: R) -> std::io::Result<Self> {
        let d = ruzstd::decoding::StreamingDecoder::new(r).map_err(invalid)?;
        Ok(ZstdFrames { decoder: Some(d) })
    }
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let Some(d) = self.decoder.as_mut() else {
                return Ok(0);
            };
            let n = d.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // This frame is done: another may follow.
            let mut inner = self.decoder.take().expect("checked above").into_inner();
            if inner.fill_buf()?.is_empty() {
                return Ok(0);
            }
            self.decoder = Some(ruzstd::decoding::StreamingDecoder::new(inner).map_err(invalid)?);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn gzip_and_zstd_files_read_as_their_text() {
        let dir = tempfile::tempdir().unwrap();
        let text = "one line\nanother\n";
        let gz = dir.path().join("a.txt.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(text.as_bytes()).unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        let zst = dir.path().join("a.TXT.ZST");
        // Two frames: decoded as one stream.
        let mut z = ruzstd::encoding::compress_to_vec(
            &b"one line\n"[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        z.extend(ruzstd::encoding::compress_to_vec(
            &b"another\n"[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        ));
        std::fs::write(&zst, z).unwrap();
        for p in [&gz, &zst] {
            let mut s = String::new();
            open_text(p).unwrap().read_to_string(&mut s).unwrap();
            assert_eq!(s, text, "{}", p.display());
        }
        assert_eq!(
            Compression::split("x.jsonl.gz"),
            ("x.jsonl", Compression::Gzip)
        );
        let bad = dir.path().join("bad.zst");
        std::fs::write(&bad, b"plain text").unwrap();
        let err = open_text(&bad).err().unwrap().to_string();
        assert!(
            err.contains("bad.zst") && err.contains("Zstandard"),
            "{err}"
        );
    }
}
