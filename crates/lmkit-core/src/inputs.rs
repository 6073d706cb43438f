//! Input discovery: a file, or the files of accepted names below a directory.

use crate::error::PathError;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error(transparent)]
    Io(#[from] PathError),
    #[error("{}: symbolic link loop (it leads back to {}); remove the link or give a path below it", path.display(), ancestor.display())]
    Loop { path: PathBuf, ancestor: PathBuf },
    #[error("{}: no input files found ({what})", path.display())]
    NoInputFiles { path: PathBuf, what: String },
}

/// The longest text line the readers of line-per-document or line-per-sentence text (and of
/// ARPA files) take: an input without line ends (or an endless one, such as /dev/zero) is an
/// error, not a buffer that grows until an allocation aborts.
pub const MAX_LINE_BYTES: usize = 256 << 20;

/// Reads one line of `r` into `buf` (appending, its `\n` included) as `read_until` does, but
/// at most `max` bytes of it: a longer line is an error (`InvalidData`) that says so.
pub fn read_line_within(
    r: &mut impl std::io::BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<usize> {
    use std::io::{BufRead, Read};
    let limit = max as u64 + 1;
    let n = r.take(limit).read_until(b'\n', buf)?;
    if n as u64 == limit && buf.last() != Some(&b'\n') {
        let mib = max as f64 / (1 << 20) as f64;
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("line is longer than {mib} MiB"),
        ));
    }
    Ok(n)
}

/// The lines of `r` as [`BufRead::lines`](std::io::BufRead::lines) gives them (without their
/// `\n` or `\r\n`), each read within [`MAX_LINE_BYTES`]: a longer line is an error
/// (`InvalidData`, saying so), as a line that is not UTF-8 is. Nothing follows an error.
pub fn lines_within<R: std::io::BufRead>(
    mut r: R,
) -> impl Iterator<Item = std::io::Result<String>> {
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed {
            return None;
        }
        let mut buf = Vec::new();
        let line = match read_line_within(&mut r, &mut buf, MAX_LINE_BYTES) {
            Ok(0) => return None,
            Ok(_) => {
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                    if buf.last() == Some(&b'\r') {
                        buf.pop();
                    }
                }
                String::from_utf8(buf).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
                    )
                })
            }
            Err(e) => Err(e),
        };
        failed = line.is_err();
        Some(line)
    })
}

/// `path` itself when it is a file; otherwise every file below the directory whose name
/// `accept` takes, sorted by path. Hidden files and directories (names starting with `.`) are
/// skipped; symbolic links are followed, and a link that loops is an error. `what` describes
/// the accepted files for the error when none is found.
pub fn collect_inputs(
    path: &Path,
    what: &str,
    accept: impl Fn(&str) -> bool,
) -> Result<Vec<PathBuf>, InputError> {
    let meta = std::fs::metadata(path).map_err(|e| PathError::new(path, e))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let walk = walkdir::WalkDir::new(path)
        .follow_links(true)
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'));
    for entry in walk {
        let entry = entry.map_err(|e| {
            let at = e.path().unwrap_or(path).to_path_buf();
            if let Some(ancestor) = e.loop_ancestor() {
                return InputError::Loop {
                    path: at,
                    ancestor: ancestor.to_path_buf(),
                };
            }
            match e.into_io_error() {
                Some(io) => InputError::Io(PathError::new(at, io)),
                None => InputError::Io(PathError::new(at, std::io::Error::other("walk failed"))),
            }
        })?;
        if entry.file_type().is_file() && accept(&entry.file_name().to_string_lossy()) {
            out.push(entry.into_path());
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(InputError::NoInputFiles {
            path: path.to_path_buf(),
            what: what.to_string(),
        });
    }
    Ok(out)
}

/// Whether `path` is a GGUF file (llama.cpp's model format), by its magic bytes, whatever its name.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    if !path.is_file() {
        return false;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txt(name: &str) -> bool {
        name.ends_with(".txt")
    }

    /// `lines_within` gives what `BufRead::lines` gives, and an error (then nothing) for a line
    /// over `MAX_LINE_BYTES` (an endless input) or one that is not UTF-8.
    #[test]
    fn lines_within_are_lines_and_an_endless_line_is_an_error() {
        use std::io::{BufRead, Read};
        let text = "one\r\ntwo\n\nthree";
        let got: Vec<String> = lines_within(text.as_bytes()).map(Result::unwrap).collect();
        let want: Vec<String> = text.as_bytes().lines().map(Result::unwrap).collect();
        assert_eq!(got, want);
        let bad: Vec<_> = lines_within(&b"ok\n\xff\nafter\n"[..]).collect();
        assert_eq!(bad.len(), 2);
        assert!(bad[1]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("not UTF-8"));
        let endless =
            std::io::BufReader::new(std::io::repeat(b'a').take(MAX_LINE_BYTES as u64 + 2));
        let mut lines = lines_within(endless);
        let e = lines.next().unwrap().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("longer than 256 MiB"), "{e}");
        assert!(lines.next().is_none());
    }

    #[test]
    fn finds_accepted_files_sorted_and_skips_hidden() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("b/c")).unwrap();
        std::fs::create_dir_all(d.path().join(".git")).unwrap();
        for f in [
            "b/c/z.txt",
            "a.txt",
            "b/y.json",
            ".hidden.txt",
            ".git/x.txt",
        ] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        let got = collect_inputs(d.path(), "*.txt", txt).unwrap();
        let rel: Vec<_> = got
            .iter()
            .map(|p| {
                p.strip_prefix(d.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(rel, ["a.txt", "b/c/z.txt"]);
        let file = d.path().join("b/y.json");
        assert_eq!(collect_inputs(&file, "", txt).unwrap(), vec![file]);
    }

    #[test]
    fn empty_missing_and_looping_inputs_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let e = collect_inputs(d.path(), "*.txt", txt).unwrap_err();
        assert!(
            e.to_string().contains("no input files found (*.txt)"),
            "{e}"
        );
        let e = collect_inputs(&d.path().join("nope"), "*.txt", txt).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        #[cfg(unix)]
        {
            std::fs::create_dir(d.path().join("sub")).unwrap();
            std::os::unix::fs::symlink(d.path(), d.path().join("sub/up")).unwrap();
            let e = collect_inputs(d.path(), "*.txt", txt).unwrap_err();
            assert!(e.to_string().contains("loop"), "{e}");
        }
    }
}
