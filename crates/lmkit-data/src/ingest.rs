//! Reading documents from text and JSONL files, plain or gzip-compressed, one file or directories.

use crate::error::{DataError, Result};
use lmkit_core::decompress::Compression;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// How a `.txt` file is cut into documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TxtUnit {
    /// Each non-blank line is a document.
    #[default]
    Line,
    /// Blank lines separate documents.
    Paragraph,
    /// The whole file is one document.
    File,
}

/// The longest document that a paragraph or a whole file makes (`--unit`); a longer one is a
/// bad record, as a line over [`lmkit_core::MAX_LINE_BYTES`] is. (An HTML page over
/// [`crate::warc::MAX_RECORD`] is passed over as too large, as a WARC record is.)
pub const MAX_DOC_BYTES: usize = lmkit_core::MAX_LINE_BYTES;

#[derive(Clone, Debug)]
pub struct IngestOptions {
    pub txt_unit: TxtUnit,
    /// JSON field holding the text in `.jsonl` files.
    pub text_field: String,
    /// Skip (and count) invalid records instead of failing.
    pub skip_bad: bool,
    /// JSON field holding the document's URL in `.jsonl` files (read when set).
    pub url_field: Option<String>,
    /// Parse JSON lines in blocks on rayon's global pool. Only for a caller whose own rayon work
    /// never waits on the documents being read (a pool thread blocked on them would leave the
    /// parse without a thread: a deadlock).
    pub parallel_json: bool,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            txt_unit: TxtUnit::Line,
            text_field: "text".into(),
            skip_bad: false,
            url_field: None,
            parallel_json: false,
        }
    }
}

/// Which columns of a table file (Parquet, Arrow) hold a document's text and URL.
#[derive(Clone, Copy, Debug)]
pub struct Columns<'a> {
    pub text: &'a str,
    pub url: Option<&'a str>,
    /// Skip (and count) rows whose text column holds no text, instead of failing.
    pub skip_bad: bool,
}

impl Columns<'_> {
    /// The error for a table of `path` without the text column (`names`: its columns).
    pub(crate) fn missing(&self, path: &Path, names: &[&str]) -> DataError {
        DataError::BadFile {
            path: path.to_path_buf(),
            msg: format!(
                "no column `{}` (columns: {}); choose the text column with --text-field",
                self.text,
                names.join(", ")
            ),
        }
    }

    /// Passes row `row` (1-based) of `path` on: its text (and URL) to `f` as a document, or, where
    /// the text column holds something else (`Err`: "null", "not UTF-8"...), an error naming the
    /// row — or a skipped bad record under `skip_bad`.
    pub(crate) fn deliver(
        &self,
        path: &Path,
        row: u64,
        got: std::result::Result<TextUrl, String>,
        on_bytes: &mut dyn FnMut(u64),
        skipped: &mut dyn FnMut(Skipped),
        f: &mut dyn FnMut(Doc) -> Result<()>,
    ) -> Result<()> {
        let source = format!("{}:{row}", path.display());
        match got {
            Ok((text, url)) => {
                on_bytes(text.len() as u64);
                f(Doc { text, source, url })
            }
            Err(kind) => {
                let reason = format!("column `{}` is {kind}, not text", self.text);
                if !self.skip_bad {
                    return Err(DataError::BadFile {
                        path: path.to_path_buf(),
                        msg: format!(
                            "row {row}: {reason} (use --skip-bad to skip and count such rows)"
                        ),
                    });
                }
                skipped(Skipped {
                    source,
                    reason,
                    kind: "bad",
                });
                Ok(())
            }
        }
    }
}

/// One document and where it came from (`path:line`).
#[derive(Clone, Debug, PartialEq)]
pub struct Doc {
    pub text: String,
    pub source: String,
    /// The URL it was fetched from, when the input says (`url_field`).
    pub url: Option<String>,
}

/// A record that gave no document: a bad record skipped under `skip_bad` (`kind` "bad"), or a
/// web page that holds none (`not-html`, `http-status`, `no-main-text`, `too-large`, `bad-http`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    pub source: String,
    pub reason: String,
    #[serde(skip)]
    pub kind: &'static str,
}

impl Skipped {
    /// A malformed record (counted as bad; only skipped under `skip_bad`).
    pub fn is_bad(&self) -> bool {
        self.kind == "bad"
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Txt,
    Jsonl,
    /// WARC or WET: one document per page ([`crate::warc`]).
    Warc,
    /// One HTML page: its main text is one document.
    Html,
    /// Parquet: a document per row ([`crate::parquet_io`]).
    Parquet,
    /// Arrow IPC stream or file: a document per row ([`crate::arrow_io`]).
    Arrow,
}

fn format_of(path: &Path) -> Option<(Format, Compression)> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    let (stem, c) = Compression::split(&name);
    if stem.ends_with(".txt") {
        Some((Format::Txt, c))
    } else if stem.ends_with(".jsonl") || stem.ends_with(".json") {
        Some((Format::Jsonl, c))
    } else if stem.ends_with(".warc") || stem.ends_with(".wet") {
        Some((Format::Warc, c))
    } else if stem.ends_with(".html") || stem.ends_with(".htm") {
        Some((Format::Html, c))
    } else if stem.ends_with(".parquet") && c == Compression::None {
        Some((Format::Parquet, c))
    } else if stem.ends_with(".arrow") || stem.ends_with(".arrows") || stem.ends_with(".feather") {
        Some((Format::Arrow, c))
    } else {
        None
    }
}

/// Whether the size of `path` is the size of its text (not compressed, not Parquet or Arrow, not
/// standard input), so progress can be shown against it.
pub(crate) fn size_is_text(path: &Path) -> bool {
    path != Path::new("-")
        && format_of(path).is_none_or(|(f, c)| {
            c == Compression::None && !matches!(f, Format::Parquet | Format::Arrow)
        })
}

/// The whole decoded text of a plain, `.gz` or `.zst` file.
pub fn read_text(path: &Path) -> Result<String> {
    let (_, compression) = format_of(path).unwrap_or((Format::Txt, Compression::None));
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut r = decoded(path, Box::new(file), compression)?;
    let mut s = String::new();
    r.read_to_string(&mut s)
        .map_err(|e| DataError::io(path, e))?;
    Ok(s)
}

/// The decompressed content of `file` (read from `path`).
fn decoded(path: &Path, file: Box<dyn Read>, c: Compression) -> Result<Box<dyn Read>> {
    c.decode(file).map_err(|e| DataError::BadRecord {
        path: path.to_path_buf(),
        line: 1,
        msg: e.to_string(),
    })
}

/// The input files under `path`: the file itself (read as JSONL if named .json/.jsonl, WARC/WET if
/// named .warc/.wet, a page if .html/.htm, Parquet if .parquet, Arrow IPC if .arrow/.arrows/.feather,
/// else as text), or every such file (plain, .gz or .zst; Parquet compresses inside) below a
/// directory except .json (a `datasets` directory saved with `save_to_disk` reads as its .arrow
/// files); `-` is standard input.
pub fn collect_inputs(path: &Path) -> Result<Vec<PathBuf>> {
    if path == Path::new("-") {
        return Ok(vec![path.to_path_buf()]);
    }
    Ok(lmkit_core::collect_inputs(
        path,
        "a directory is searched recursively for .txt, .jsonl, .warc, .wet, .html, .htm, .arrow, .arrows, .feather (and their .gz and .zst) and .parquet",
        |name| {
            // In a directory `.json` files are metadata, such as the report.json that `lmkit data
            // prepare` writes, not documents; so is the clusters.jsonl it writes beside them.
            let n = name.to_ascii_lowercase();
            let stem = n
                .strip_suffix(".gz")
                .or_else(|| n.strip_suffix(".zst"))
                .unwrap_or(&n);
            format_of(Path::new(name)).is_some()
                && !stem.ends_with(".json")
                && name != crate::CLUSTERS_FILE
        },
    )?)
}

/// Streams the documents of one file to `f`, in order. Bad records are an error, or passed to
/// `skipped` when `opts.skip_bad`.
pub fn read_docs(
    path: &Path,
    opts: &IngestOptions,
    on_bytes: &mut dyn FnMut(u64),
    skipped: &mut dyn FnMut(Skipped),
    f: &mut dyn FnMut(Doc) -> Result<()>,
) -> Result<()> {
    read_docs_in(path, opts, None, on_bytes, skipped, f)
}

/// Whether a file can be read in byte ranges ([`read_docs_in`]): a plain (not compressed) file of
/// lines, each a document — JSON Lines, or text with a document per line.
pub fn splittable(path: &Path, opts: &IngestOptions) -> bool {
    path != Path::new("-")
        && match format_of(path).unwrap_or((Format::Txt, Compression::None)) {
            (Format::Jsonl, Compression::None) => true,
            (Format::Txt, Compression::None) => opts.txt_unit == TxtUnit::Line,
            _ => false,
        }
}

/// Reads past the rest of a line without keeping it (it may be as long as the file): the bytes
/// read, and whether a line end ended them.
fn skip_line(r: &mut impl BufRead) -> std::io::Result<(u64, bool)> {
    let mut n = 0u64;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok((n, false));
        }
        let (take, ended) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        r.consume(take);
        n += take as u64;
        if ended {
            return Ok((n, true));
        }
    }
}

/// The first line that starts at or after byte `start` of `file`: its offset and how many lines
/// come before it. (A line belongs to the range its first byte is in.)
fn first_line_from(file: &mut File, path: &Path, start: u64) -> Result<(u64, u64)> {
    use std::io::{Seek, SeekFrom};
    if start == 0 {
        return Ok((0, 0));
    }
    file.seek(SeekFrom::Start(0))
        .map_err(|e| DataError::io(path, e))?;
    let mut r = BufReader::with_capacity(1 << 20, &mut *file);
    let mut lines = 0u64;
    let mut pos = 0u64;
    let mut last = b'\n';
    // Count the line ends before `start`...
    while pos < start {
        let buf = r.fill_buf().map_err(|e| DataError::io(path, e))?;
        if buf.is_empty() {
            return Ok((pos, lines));
        }
        let take = buf.len().min((start - pos) as usize);
        lines += buf[..take].iter().filter(|&&b| b == b'\n').count() as u64;
        last = buf[take - 1];
        r.consume(take);
        pos += take as u64;
    }
    // ... and, when `start` is inside a line, skip to its end.
    if last != b'\n' {
        let (n, ended) = skip_line(&mut r).map_err(|e| DataError::io(path, e))?;
        pos += n;
        lines += u64::from(ended);
    }
    Ok((pos, lines))
}

/// [`read_docs`], of the lines that start within `range` bytes of the file only (a file that is
/// [`splittable`]): reading every range of a cut of the file gives each document once, with the
/// source (`path:line`) a whole read gives it.
pub fn read_docs_in(
    path: &Path,
    opts: &IngestOptions,
    range: Option<std::ops::Range<u64>>,
    on_bytes: &mut dyn FnMut(u64),
    skipped: &mut dyn FnMut(Skipped),
    f: &mut dyn FnMut(Doc) -> Result<()>,
) -> Result<()> {
    if range.is_some() && !splittable(path, opts) {
        return Err(DataError::BadFile {
            path: path.to_path_buf(),
            msg: "only plain .txt (a document per line) and .jsonl files can be read in parts"
                .into(),
        });
    }
    let stdin = path == Path::new("-");
    let (mut format, compression) = format_of(path).unwrap_or((Format::Txt, Compression::None));
    let columns = Columns {
        text: &opts.text_field,
        url: opts.url_field.as_deref(),
        skip_bad: opts.skip_bad,
    };
    if format == Format::Parquet {
        return crate::parquet_io::read_docs(path, columns, on_bytes, skipped, f);
    }
    // Where reading starts and stops (for a range), and the lines before the start.
    let mut line_no = 0u64;
    let mut pos = 0u64;
    let end = range.as_ref().map_or(u64::MAX, |r| r.end);
    let file: Box<dyn Read> = if stdin {
        Box::new(std::io::stdin().lock())
    } else {
        let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
        if let Some(r) = &range {
            use std::io::{Seek, SeekFrom};
            (pos, line_no) = first_line_from(&mut file, path, r.start)?;
            file.seek(SeekFrom::Start(pos))
                .map_err(|e| DataError::io(path, e))?;
        }
        Box::new(file)
    };
    let raw = decoded(path, file, compression)?;
    let gz = compression != Compression::None;
    let mut reader = BufReader::with_capacity(1 << 20, raw);
    if stdin {
        // Standard input is JSON Lines when its first non-blank byte opens an object.
        let head = reader.fill_buf().map_err(|e| DataError::io(path, e))?;
        if head.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
            format = Format::Jsonl;
        }
    }
    let display = path.display().to_string();
    match format {
        Format::Arrow => {
            return crate::arrow_io::read_docs(
                path,
                &mut reader,
                !stdin && !gz,
                columns,
                on_bytes,
                skipped,
                f,
            )
        }
        Format::Warc => return read_warc(&mut reader, path, on_bytes, skipped, f),
        Format::Html => {
            // A page over MAX_RECORD is passed over and counted, as a WARC record is.
            let limit = crate::warc::MAX_RECORD;
            let mut bytes = Vec::new();
            (&mut reader)
                .take(limit + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| DataError::io(path, e))?;
            on_bytes(bytes.len() as u64);
            let content = if bytes.len() as u64 > limit {
                let rest = std::io::copy(&mut reader, &mut std::io::sink())
                    .map_err(|e| DataError::io(path, e))?;
                on_bytes(rest);
                let reason = format!("page over {} MiB", limit >> 20);
                crate::warc::Content::Skipped("too-large", reason)
            } else {
                crate::warc::html_doc(&bytes, None)
            };
            return deliver(content, display, None, skipped, f);
        }
        Format::Txt | Format::Jsonl | Format::Parquet => {}
    }
    let mut buf = Vec::new();
    let mut json = JsonBlock::default();
    let mut pending = String::new(); // paragraph/file accumulation
    let mut pending_start = 0u64;
    // The paragraph or file being read is over MAX_DOC_BYTES: its lines are passed over.
    let mut overlong = false;
    while pos < end {
        buf.clear();
        // A line over MAX_LINE_BYTES (a file without line ends, an endless stream) is a bad
        // record, not a buffer that grows until an allocation aborts: an error naming it, or
        // with `skip_bad` read past and counted.
        let n =
            match lmkit_core::read_line_within(&mut reader, &mut buf, lmkit_core::MAX_LINE_BYTES) {
                Err(e) if buf.len() > lmkit_core::MAX_LINE_BYTES => {
                    line_no += 1;
                    if opts.skip_bad {
                        let (rest, _) =
                            skip_line(&mut reader).map_err(|e| DataError::io(path, e))?;
                        let n = buf.len() as u64 + rest;
                        pos += n;
                        on_bytes(n);
                    }
                    bad_line(path, line_no, e.to_string(), opts.skip_bad, skipped)?;
                    continue;
                }
                r => r,
            }
            .map_err(|e| {
                if gz {
                    DataError::BadRecord {
                        path: path.to_path_buf(),
                        line: line_no + 1,
                        msg: format!(
                            "{} stream is corrupt or truncated: {e}",
                            if compression == Compression::Gzip {
                                "gzip"
                            } else {
                                "Zstandard"
                            }
                        ),
                    }
                } else {
                    DataError::io(path, e)
                }
            })?;
        if n == 0 {
            break;
        }
        pos += n as u64;
        line_no += 1;
        on_bytes(n as u64);
        if format == Format::Jsonl {
            // Parsed a block at a time, in parallel (see `JsonBlock`).
            json.push(line_no, &buf);
            if json.is_full() {
                json.deliver(path, opts, skipped, f)?;
            }
            continue;
        }
        let text = match std::str::from_utf8(&buf) {
            Ok(t) => t.trim_end_matches(['\n', '\r']),
            Err(e) => {
                bad_line(path, line_no, not_utf8(&e), opts.skip_bad, skipped)?;
                continue;
            }
        };
        // Text (the other formats were read above).
        match opts.txt_unit {
            TxtUnit::Line => {
                if !text.trim().is_empty() {
                    f(Doc {
                        text: text.to_string(),
                        source: source_at(&display, line_no),
                        url: None,
                    })?;
                }
            }
            TxtUnit::Paragraph | TxtUnit::File => {
                if text.trim().is_empty() && opts.txt_unit == TxtUnit::Paragraph {
                    if !pending.trim().is_empty() {
                        f(Doc {
                            text: std::mem::take(&mut pending),
                            source: source_at(&display, pending_start),
                            url: None,
                        })?;
                    }
                    pending.clear();
                    overlong = false;
                    continue;
                }
                if overlong {
                    // The rest of a document too long to keep.
                    continue;
                }
                if pending.is_empty() {
                    pending_start = line_no;
                }
                // A document over MAX_DOC_BYTES (a file without blank lines read as paragraphs,
                // an endless stream as one file) is a bad record like an over-long line, not a
                // string that grows until an allocation aborts.
                if pending.len() + 1 + text.len() > MAX_DOC_BYTES {
                    pending = String::new();
                    overlong = true;
                    let unit = match opts.txt_unit {
                        TxtUnit::Paragraph => "paragraph",
                        _ => "file (one document with --unit file)",
                    };
                    let msg = format!("{unit} is longer than {} MiB", MAX_DOC_BYTES >> 20);
                    bad_line(path, pending_start, msg, opts.skip_bad, skipped)?;
                    continue;
                }
                if !pending.is_empty() {
                    pending.push('\n');
                }
                pending.push_str(text);
            }
        }
    }
    json.deliver(path, opts, skipped, f)?;
    if !pending.trim().is_empty() {
        f(Doc {
            text: pending,
            source: source_at(&display, pending_start),
            url: None,
        })?;
    }
    Ok(())
}

/// The pages of a WARC/WET stream, one document each (source `path#record`, URL from the record).
fn read_warc(
    reader: &mut dyn BufRead,
    path: &Path,
    on_bytes: &mut dyn FnMut(u64),
    skipped: &mut dyn FnMut(Skipped),
    f: &mut dyn FnMut(Doc) -> Result<()>,
) -> Result<()> {
    use crate::warc::{content, next_record};
    let display = path.display();
    let mut number = 0u64;
    loop {
        let rec = next_record(reader, number + 1).map_err(|msg| DataError::BadFile {
            path: path.to_path_buf(),
            msg: format!("malformed WARC: {msg}"),
        })?;
        let Some(rec) = rec else {
            return Ok(());
        };
        number += 1;
        on_bytes(rec.bytes);
        let source = format!("{display}#{number}");
        deliver(content(&rec), source, rec.uri, skipped, f)?;
    }
}

/// Passes what a web page gave on: a document to `f`, a page without one to `skipped`.
fn deliver(
    content: crate::warc::Content,
    source: String,
    url: Option<String>,
    skipped: &mut dyn FnMut(Skipped),
    f: &mut dyn FnMut(Doc) -> Result<()>,
) -> Result<()> {
    match content {
        crate::warc::Content::Text(text) => f(Doc { text, source, url }),
        crate::warc::Content::Skipped(kind, reason) => {
            skipped(Skipped {
                source,
                reason,
                kind,
            });
            Ok(())
        }
        crate::warc::Content::Ignored => Ok(()),
    }
}

/// A document's text and URL.
type TextUrl = (String, Option<String>);

/// A line of `path` that gives no document: with `skip_bad` passed to `skipped` as a bad record,
/// otherwise the error naming the file and line.
fn bad_line(
    path: &Path,
    line: u64,
    msg: String,
    skip_bad: bool,
    skipped: &mut dyn FnMut(Skipped),
) -> Result<()> {
    if !skip_bad {
        return Err(DataError::BadRecord {
            path: path.to_path_buf(),
            line,
            msg,
        });
    }
    skipped(Skipped {
        source: format!("{}:{line}", path.display()),
        reason: msg,
        kind: "bad",
    });
    Ok(())
}

/// A document's source: `path:line`.
fn source_at(path: &str, line: u64) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(path.len() + 12);
    s.push_str(path);
    // Writing to a String cannot fail.
    let _ = write!(s, ":{line}");
    s
}

/// What a line that is not UTF-8 is reported as.
fn not_utf8(e: &std::str::Utf8Error) -> String {
    format!("line is not valid UTF-8 (byte {})", e.valid_up_to())
}

/// JSON lines gathered to be parsed together: reading is one thread, but parsing (UTF-8 checks,
/// unescaping) is most of its work and runs over the block in parallel; documents and errors are
/// then passed on in line order.
#[derive(Default)]
struct JsonBlock {
    bytes: Vec<u8>,
    /// (line number, start, end) in `bytes`, end of line removed.
    lines: Vec<(u64, usize, usize)>,
}

impl JsonBlock {
    const LINES: usize = 512;
    const BYTES: usize = 8 << 20;

    fn push(&mut self, line_no: u64, line: &[u8]) {
        let start = self.bytes.len();
        let mut line = line;
        while let [rest @ .., b'\n' | b'\r'] = line {
            line = rest;
        }
        self.bytes.extend_from_slice(line);
        self.lines.push((line_no, start, self.bytes.len()));
    }

    fn is_full(&self) -> bool {
        self.lines.len() >= Self::LINES || self.bytes.len() >= Self::BYTES
    }

    /// Parses the block's lines and passes them on in order.
    fn deliver(
        &mut self,
        path: &Path,
        opts: &IngestOptions,
        skipped: &mut dyn FnMut(Skipped),
        f: &mut dyn FnMut(Doc) -> Result<()>,
    ) -> Result<()> {
        use rayon::prelude::*;
        let parse = |&(_, a, b): &(u64, usize, usize)| {
            let line = &self.bytes[a..b];
            if line.iter().all(u8::is_ascii_whitespace) {
                return Ok(None);
            }
            json_text(line, &opts.text_field, opts.url_field.as_deref()).map(Some)
        };
        let parsed: Vec<std::result::Result<Option<TextUrl>, String>> = if opts.parallel_json {
            self.lines.par_iter().map(parse).collect()
        } else {
            self.lines.iter().map(parse).collect()
        };
        let display = path.display().to_string();
        for (&(line_no, _, _), got) in self.lines.iter().zip(parsed) {
            match got {
                Ok(None) => {}
                Ok(Some((text, url))) => f(Doc {
                    text,
                    source: source_at(&display, line_no),
                    url,
                })?,
                Err(msg) => bad_line(path, line_no, msg, opts.skip_bad, skipped)?,
            }
        }
        self.bytes.clear();
        self.lines.clear();
        Ok(())
    }
}

/// The text (and URL) fields of one JSON object, the other fields passed over without being
/// built (and the line's UTF-8 checked only where the parser reads strings). A flat object is
/// read by [`crate::flat_json`]; anything else, errors included, by `serde_json`.
fn json_text(
    line: &[u8],
    field: &str,
    url_field: Option<&str>,
) -> std::result::Result<TextUrl, String> {
    match crate::flat_json::text_and_url(line, field, url_field) {
        Some(got) => Ok(got),
        None => json_text_parsed(line, field, url_field),
    }
}

/// [`json_text`] through `serde_json`, for every JSON line.
pub(crate) fn json_text_parsed(
    line: &[u8],
    field: &str,
    url_field: Option<&str>,
) -> std::result::Result<TextUrl, String> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_slice(line);
    let (text, url) = Fields { field, url_field }
        .deserialize(&mut de)
        .and_then(|got| de.end().map(|()| got))
        .map_err(|e| match std::str::from_utf8(line) {
            Err(u) => not_utf8(&u),
            Ok(_) => format!("malformed JSON: {e}"),
        })?;
    match text {
        Some(serde_json::Value::String(s)) => Ok((s, url)),
        Some(other) => Err(format!(
            "field `{field}` is not a string (found {})",
            json_kind(&other)
        )),
        None => Err(format!(
            "missing field `{field}` (choose the text field with --text-field)"
        )),
    }
}

/// Picks `field` (as a JSON value, to name its type when it is not a string) and `url_field` (when
/// a string) out of a JSON object.
struct Fields<'a> {
    field: &'a str,
    url_field: Option<&'a str>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Fields<'_> {
    type Value = (Option<serde_json::Value>, Option<String>);

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Fields<'_> {
    type Value = (Option<serde_json::Value>, Option<String>);

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let (mut text, mut url) = (None, None);
        while let Some(key) = map.next_key::<Key<'de>>()? {
            if *key.0 == *self.field {
                text = Some(map.next_value::<serde_json::Value>()?);
            } else if Some(&*key.0) == self.url_field {
                url = match map.next_value::<serde_json::Value>()? {
                    serde_json::Value::String(s) => Some(s),
                    _ => None,
                };
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok((text, url))
    }
}

/// An object key, borrowed from the line unless it has escapes.
struct Key<'de>(std::borrow::Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> std::result::Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(path: &Path, range: Option<std::ops::Range<u64>>) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let opts = IngestOptions::default();
        read_docs_in(path, &opts, range, &mut |_| {}, &mut |_| {}, &mut |d| {
            out.push((d.text, d.source));
            Ok(())
        })
        .unwrap();
        out
    }

    /// What reading `path` (the part `range`) gives: its result, the documents' texts, what was
    /// skipped and the bytes counted.
    fn read_all(
        path: &Path,
        opts: &IngestOptions,
        range: Option<std::ops::Range<u64>>,
    ) -> (
        std::result::Result<(), String>,
        Vec<String>,
        Vec<Skipped>,
        u64,
    ) {
        let (mut got, mut skipped, mut bytes) = (Vec::new(), Vec::new(), 0u64);
        let r = read_docs_in(
            path,
            opts,
            range,
            &mut |n| bytes += n,
            &mut |s| skipped.push(s),
            &mut |d| {
                got.push(d.text);
                Ok(())
            },
        );
        (r.map_err(|e| e.to_string()), got, skipped, bytes)
    }

    /// A paragraph or a whole file over `MAX_DOC_BYTES`, each of its lines within the line limit,
    /// is an error naming where it starts; with `skip_bad` it is passed over and counted, and the
    /// paragraphs after it are read.
    #[test]
    fn an_overlong_paragraph_or_file_is_a_bad_record() {
        use std::io::{Seek, SeekFrom, Write};
        // Lines of 200 and 100 MiB (holes of NUL bytes), each within the line limit, make a
        // paragraph (line 3) over MAX_DOC_BYTES.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.txt");
        let mut f = File::create(&path).unwrap();
        f.write_all(b"first\n\n").unwrap();
        for (hole, after) in [(200u64 << 20, &b"\n"[..]), (100 << 20, b"\n\nafter\n")] {
            f.seek(SeekFrom::Current(hole as i64)).unwrap();
            f.write_all(after).unwrap();
        }
        drop(f);
        let read = |txt_unit: TxtUnit, skip_bad: bool| {
            let opts = IngestOptions {
                txt_unit,
                skip_bad,
                ..Default::default()
            };
            let (r, got, bad, _) = read_all(&path, &opts, None);
            (r, got, bad)
        };
        let (r, got, _) = read(TxtUnit::Paragraph, false);
        let e = r.unwrap_err();
        assert!(
            e.contains("t.txt:3") && e.contains("paragraph is longer than 256 MiB"),
            "{e}"
        );
        assert_eq!(got, ["first"]);
        let (r, got, bad) = read(TxtUnit::Paragraph, true);
        r.unwrap();
        assert_eq!(got, ["first", "after"]);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].source.ends_with("t.txt:3"), "{:?}", bad[0].source);
        let (r, got, _) = read(TxtUnit::File, false);
        let e = r.unwrap_err();
        assert!(
            e.contains("t.txt:1") && e.contains("file (one document"),
            "{e}"
        );
        assert!(got.is_empty());
        let (r, got, bad) = read(TxtUnit::File, true);
        r.unwrap();
        assert!(got.is_empty());
        assert_eq!(bad.len(), 1);
    }

    /// An HTML page over `MAX_RECORD` is passed over as too large, as a WARC record is, and its
    /// bytes are counted.
    #[test]
    fn an_html_page_over_the_record_limit_is_passed_over() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.html");
        let mut f = File::create(&path).unwrap();
        f.write_all(b"<html><body><p>text</p>").unwrap();
        let len = crate::warc::MAX_RECORD + 100;
        f.set_len(len).unwrap();
        drop(f);
        let (r, got, skipped, bytes) = read_all(&path, &IngestOptions::default(), None);
        r.unwrap();
        assert!(got.is_empty());
        let skipped: Vec<_> = skipped
            .iter()
            .map(|s| (s.kind, s.reason.as_str()))
            .collect();
        assert_eq!(skipped, [("too-large", "page over 64 MiB")]);
        assert_eq!(bytes, len);
    }

    /// A line over `MAX_LINE_BYTES` (here a sparse file of zeros without a line end) is an error
    /// naming its line, not a buffer grown until an allocation aborts; with `skip_bad` it is
    /// read past and counted, and the lines after it are read, in a range read too.
    #[test]
    fn an_overlong_line_is_a_bad_record() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.txt");
        let mut f = File::create(&path).unwrap();
        f.write_all(b"first\n").unwrap();
        f.set_len(6 + lmkit_core::MAX_LINE_BYTES as u64 + 10)
            .unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"\nafter\n").unwrap();
        let read = |skip_bad: bool, range: Option<std::ops::Range<u64>>| {
            let opts = IngestOptions {
                skip_bad,
                ..Default::default()
            };
            let (r, got, bad, _) = read_all(&path, &opts, range);
            (r, got, bad)
        };
        let (r, got, _) = read(false, None);
        let e = r.unwrap_err();
        assert!(
            e.contains("t.txt") && e.contains(":2") && e.contains("longer than 256 MiB"),
            "{e}"
        );
        assert_eq!(got, ["first"]);
        let (r, got, bad) = read(true, None);
        r.unwrap();
        assert_eq!(
            (got, bad.len()),
            (vec!["first".to_string(), "after".to_string()], 1)
        );
        assert!(bad[0].source.ends_with("t.txt:2"), "{:?}", bad[0].source);
        // A range that starts inside the long line reads from the next one.
        let (r, got, _) = read(false, Some(100..u64::MAX));
        r.unwrap();
        assert_eq!(got, ["after"]);
    }

    /// The field picker reads what a full parse would, and fails where it fails.
    #[test]
    fn json_fields_as_a_full_parse_reads_them() {
        let ok = [
            (
                r#"{"id": 1, "text": "a\nb", "url": "http://x"}"#,
                "a\nb",
                Some("http://x"),
            ),
            (
                r#"{"meta": {"text": "inner", "l": [1, {"a": null}]}, "text": "outer"}"#,
                "outer",
                None,
            ),
            (
                r#"{"te\u0078t": "escaped key", "url": 3}"#,
                "escaped key",
                None,
            ),
            (r#"  {"text": "가나\"다"}  "#, "가나\"다", None),
        ];
        for (line, text, url) in ok {
            let (t, u) = json_text(line.as_bytes(), "text", Some("url")).unwrap();
            assert_eq!((t.as_str(), u.as_deref()), (text, url), "{line}");
        }
        for (line, want) in [
            (r#"{"text": 5}"#, "not a string (found a number)"),
            (r#"{"text": null}"#, "not a string (found null)"),
            (r#"{"body": "x"}"#, "missing field `text`"),
            (r#"{"text": "x"} extra"#, "malformed JSON"),
            (r#"{"text": "x""#, "malformed JSON"),
            (r#"["text"]"#, "malformed JSON"),
            (r#""text""#, "malformed JSON"),
        ] {
            let e = json_text(line.as_bytes(), "text", None).unwrap_err();
            assert!(e.contains(want), "{line}: {e}");
        }
        let e = json_text(b"{\"text\": \"ab\xff\"}", "text", None).unwrap_err();
        assert!(e.contains("not valid UTF-8 (byte 12)"), "{e}");
    }

    /// Cut anywhere into two or three ranges, a file gives each document once, with its line.
    #[test]
    fn ranges_of_a_file_give_its_documents_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let text =
            "first line\n\nthird, after a blank\r\nfourth 가나다\n\n\nseventh\nlast without end";
        let jsonl = "{\"text\": \"a\"}\n\n{\"text\": \"b가\"}\r\n{\"text\": \"c\"}\n";
        for (name, body) in [("t.txt", text), ("j.jsonl", jsonl)] {
            let path = dir.path().join(name);
            std::fs::write(&path, body).unwrap();
            let len = body.len() as u64;
            let whole = docs(&path, None);
            assert_eq!(docs(&path, Some(0..len)), whole);
            assert!(whole.len() >= 3);
            for a in 0..=len {
                for b in a..=len {
                    let mut got = docs(&path, Some(0..a));
                    got.extend(docs(&path, Some(a..b)));
                    got.extend(docs(&path, Some(b..len)));
                    assert_eq!(got, whole, "{name} cut at {a}, {b}");
                }
            }
            assert!(docs(&path, Some(len..len + 10)).is_empty());
        }
        // Gzip, paragraphs: not splittable.
        let path = dir.path().join("t.txt");
        let paragraphs = IngestOptions {
            txt_unit: TxtUnit::Paragraph,
            ..Default::default()
        };
        assert!(!splittable(&path, &paragraphs));
        assert!(!splittable(
            &dir.path().join("t.txt.gz"),
            &IngestOptions::default()
        ));
        let e = read_docs_in(
            &path,
            &paragraphs,
            Some(0..4),
            &mut |_| {},
            &mut |_| {},
            &mut |_| Ok(()),
        );
        assert!(e.is_err());
    }
}
