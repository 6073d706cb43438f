//! Parquet files: documents read from one text column (and an optional URL column) of any
//! Parquet file (the format Hugging Face datasets and FineWeb publish; snappy, gzip, zstd, lz4
//! and uncompressed pages), and shards written as Parquet (`text`, `source` string columns, zstd).

use crate::error::{DataError, Result};
use crate::ingest::{Columns, Doc, Skipped};
use parquet::basic::{Compression, ZstdLevel};
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::record::Field;
use parquet::schema::types::Type;
use std::path::Path;
use std::sync::Arc;

fn bad(path: &Path, msg: String) -> DataError {
    DataError::BadFile {
        path: path.to_path_buf(),
        msg,
    }
}

/// Streams the documents of a Parquet file: the string column `cols.text` of each row (source
/// `path:row`), with `cols.url` as its URL when asked for. A null or non-string value is a bad
/// record (skipped and counted under `cols.skip_bad`).
pub fn read_docs(
    path: &Path,
    cols: Columns,
    on_bytes: &mut dyn FnMut(u64),
    skipped: &mut dyn FnMut(Skipped),
    f: &mut dyn FnMut(Doc) -> Result<()>,
) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| bad(path, format!("not a readable Parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema();
    let fields = schema.get_fields();
    if !fields.iter().any(|t| t.name() == cols.text) {
        let names: Vec<&str> = fields.iter().map(|t| t.name()).collect();
        return Err(cols.missing(path, &names));
    }
    // The projection keeps the file's column order and root name, as the reader requires.
    let projected: Vec<_> = fields
        .iter()
        .filter(|t| t.name() == cols.text || Some(t.name()) == cols.url)
        .cloned()
        .collect();
    let projection = Type::group_type_builder(schema.name())
        .with_fields(projected)
        .build()
        .map_err(|e| bad(path, e.to_string()))?;
    let rows = reader
        .get_row_iter(Some(projection))
        .map_err(|e| bad(path, format!("cannot read column `{}`: {e}", cols.text)))?;
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| bad(path, format!("row {}: {e}", i + 1)))?;
        let mut text = None;
        let mut url = None;
        for (name, field) in row.get_column_iter() {
            let value = match field {
                Field::Str(s) => Some(s.clone()),
                Field::Bytes(b) => std::str::from_utf8(b.data()).ok().map(str::to_string),
                _ => None,
            };
            if name == cols.text {
                text = Some(value.ok_or_else(|| field_kind(field).to_string()));
            } else {
                url = value;
            }
        }
        let got = text
            .unwrap_or_else(|| Err("missing".to_string()))
            .map(|t| (t, url));
        cols.deliver(path, i as u64 + 1, got, on_bytes, skipped, f)?;
    }
    Ok(())
}

fn field_kind(f: &Field) -> &'static str {
    match f {
        Field::Null => "null",
        Field::Str(_) | Field::Bytes(_) => "not UTF-8",
        Field::Group(_) => "a group",
        Field::ListInternal(_) => "a list",
        Field::MapInternal(_) => "a map",
        _ => "a number or other scalar",
    }
}

/// Rows are written in row groups of at most this many documents.
const ROW_GROUP_DOCS: usize = 16_384;
/// ... or this many bytes of text.
const ROW_GROUP_BYTES: usize = 64 << 20;

/// One Parquet shard being written: rows are gathered into row groups.
pub struct ShardFile {
    writer: SerializedFileWriter<lmkit_core::AtomicFile>,
    texts: Vec<ByteArray>,
    sources: Vec<ByteArray>,
    bytes: usize,
}

impl ShardFile {
    pub fn new(file: lmkit_core::AtomicFile) -> parquet::errors::Result<ShardFile> {
        let schema = Arc::new(parquet::schema::parser::parse_message_type(
            "message document { required binary text (STRING); required binary source (STRING); }",
        )?);
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_created_by("lmkit".into())
            .build();
        Ok(ShardFile {
            writer: SerializedFileWriter::new(file, schema, Arc::new(props))?,
            texts: Vec::new(),
            sources: Vec::new(),
            bytes: 0,
        })
    }

    pub fn write(&mut self, text: &str, source: &str) -> parquet::errors::Result<()> {
        self.texts.push(ByteArray::from(text.as_bytes().to_vec()));
        self.sources
            .push(ByteArray::from(source.as_bytes().to_vec()));
        self.bytes += text.len() + source.len();
        if self.texts.len() >= ROW_GROUP_DOCS || self.bytes >= ROW_GROUP_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> parquet::errors::Result<()> {
        if self.texts.is_empty() {
            return Ok(());
        }
        let mut group = self.writer.next_row_group()?;
        for values in [&self.texts, &self.sources] {
            let Some(mut col) = group.next_column()? else {
                break;
            };
            col.typed::<ByteArrayType>()
                .write_batch(values, None, None)?;
            col.close()?;
        }
        group.close()?;
        self.texts.clear();
        self.sources.clear();
        self.bytes = 0;
        Ok(())
    }

    /// Writes the last row group and the footer.
    pub fn finish(mut self) -> parquet::errors::Result<lmkit_core::AtomicFile> {
        self.flush()?;
        self.writer.into_inner()
    }
}
