//! Arrow IPC files: documents read from one string column (and an optional URL column) of an
//! Arrow stream (`.arrow` as Hugging Face `datasets` saves them with `save_to_disk`, `.arrows`) or
//! an Arrow/Feather v2 file (`.arrow`, `.feather`), with LZ4 or Zstandard compressed buffers.

use crate::error::{DataError, Result};
use crate::ingest::{Columns, Doc, Skipped};
use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use arrow_ipc::reader::{FileReader, StreamReader};
use std::io::{BufRead, BufReader};
use std::path::Path;

fn bad(path: &Path, msg: String) -> DataError {
    DataError::BadFile {
        path: path.to_path_buf(),
        msg,
    }
}

/// The magic bytes that open (and close) the Arrow IPC *file* format; a stream has none.
const FILE_MAGIC: &[u8] = b"ARROW1";

/// Streams the documents of an Arrow IPC stream or file read from `reader`: the string column
/// `cols.text` of each row (source `path:row`), with `cols.url` as its URL when asked for. A null
/// or non-text value is a bad record (skipped and counted under `cols.skip_bad`). The file format
/// needs seeking, so it is read from `path` itself when `seekable` (not compressed, not stdin).
pub fn read_docs(
    path: &Path,
    reader: &mut dyn BufRead,
    seekable: bool,
    cols: Columns,
    on_bytes: &mut dyn FnMut(u64),
    skipped: &mut dyn FnMut(Skipped),
    f: &mut dyn FnMut(Doc) -> Result<()>,
) -> Result<()> {
    let head = reader.fill_buf().map_err(|e| DataError::io(path, e))?;
    let mut table = Table { path, cols, row: 0 };
    if head.starts_with(FILE_MAGIC) {
        if !seekable {
            return Err(bad(
                path,
                "an Arrow IPC file (not a stream) is read by seeking in it: decompress it first, \
                 or write it as an Arrow stream"
                    .into(),
            ));
        }
        let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
        let batches = FileReader::try_new_buffered(file, None)
            .map_err(|e| bad(path, format!("not a readable Arrow IPC file: {e}")))?;
        let schema = batches.schema();
        table.check(&schema)?;
        for batch in batches {
            let batch = batch.map_err(|e| bad(path, format!("damaged Arrow record batch: {e}")))?;
            table.batch(&batch, on_bytes, skipped, f)?;
        }
        return Ok(());
    }
    if head.is_empty() {
        return Err(bad(path, "empty file: not an Arrow IPC stream".into()));
    }
    let batches = StreamReader::try_new(BufReader::new(reader), None)
        .map_err(|e| bad(path, format!("not a readable Arrow IPC stream: {e}")))?;
    table.check(&batches.schema())?;
    for batch in batches {
        let batch = batch.map_err(|e| bad(path, format!("damaged Arrow record batch: {e}")))?;
        table.batch(&batch, on_bytes, skipped, f)?;
    }
    Ok(())
}

/// An Arrow file being read: where its text and URL are, and the rows so far.
struct Table<'a> {
    path: &'a Path,
    cols: Columns<'a>,
    row: u64,
}

impl Table<'_> {
    fn check(&self, schema: &arrow_schema::Schema) -> Result<()> {
        if schema.column_with_name(self.cols.text).is_none() {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(self.cols.missing(self.path, &names));
        }
        Ok(())
    }

    fn batch(
        &mut self,
        batch: &RecordBatch,
        on_bytes: &mut dyn FnMut(u64),
        skipped: &mut dyn FnMut(Skipped),
        f: &mut dyn FnMut(Doc) -> Result<()>,
    ) -> Result<()> {
        let text = batch
            .column_by_name(self.cols.text)
            .ok_or_else(|| bad(self.path, format!("no column `{}`", self.cols.text)))?;
        let text = Strings::of(text.as_ref());
        let url = self
            .cols
            .url
            .and_then(|u| batch.column_by_name(u))
            .map(|c| Strings::of(c.as_ref()));
        for i in 0..batch.num_rows() {
            self.row += 1;
            let got = text.get(i).map(|t| {
                let url = url.as_ref().and_then(|u| u.get(i).ok()).map(str::to_string);
                (t.to_string(), url)
            });
            self.cols
                .deliver(self.path, self.row, got, on_bytes, skipped, f)?;
        }
        Ok(())
    }
}

/// A column read as text: any of Arrow's string layouts, or binary holding UTF-8.
enum Strings<'a> {
    Utf8(&'a arrow_array::StringArray),
    LargeUtf8(&'a arrow_array::LargeStringArray),
    View(&'a arrow_array::StringViewArray),
    Binary(&'a arrow_array::BinaryArray),
    LargeBinary(&'a arrow_array::LargeBinaryArray),
    Other(&'a dyn Array),
}

impl<'a> Strings<'a> {
    fn of(a: &'a dyn Array) -> Strings<'a> {
        if let Some(s) = a.as_string_opt::<i32>() {
            Strings::Utf8(s)
        } else if let Some(s) = a.as_string_opt::<i64>() {
            Strings::LargeUtf8(s)
        } else if let Some(s) = a.as_string_view_opt() {
            Strings::View(s)
        } else if let Some(b) = a.as_binary_opt::<i32>() {
            Strings::Binary(b)
        } else if let Some(b) = a.as_binary_opt::<i64>() {
            Strings::LargeBinary(b)
        } else {
            Strings::Other(a)
        }
    }

    /// Row `i`'s text, or what it is instead ("null", "not UTF-8", "of type …").
    fn get(&self, i: usize) -> std::result::Result<&'a str, String> {
        fn present(a: &dyn Array, i: usize) -> std::result::Result<(), String> {
            if a.is_null(i) {
                Err("null".into())
            } else {
                Ok(())
            }
        }
        let utf8 = |b: &'a [u8]| std::str::from_utf8(b).map_err(|_| "not UTF-8".to_string());
        match self {
            Strings::Utf8(a) => present(*a, i).map(|()| a.value(i)),
            Strings::LargeUtf8(a) => present(*a, i).map(|()| a.value(i)),
            Strings::View(a) => present(*a, i).map(|()| a.value(i)),
            Strings::Binary(a) => present(*a, i).and_then(|()| utf8(a.value(i))),
            Strings::LargeBinary(a) => present(*a, i).and_then(|()| utf8(a.value(i))),
            Strings::Other(a) => Err(format!("of type {}", a.data_type())),
        }
    }
}
