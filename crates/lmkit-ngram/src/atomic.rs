//! Atomic file writes: write a temporary file beside the target, fsync it, rename it over the target.

use crate::error::{NgramError, Result};
use std::io::{BufWriter, Write};
use std::path::Path;

pub fn write_atomic(
    path: &Path,
    f: impl FnOnce(&mut BufWriter<&std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let io = |e| NgramError::io(path, e);
    let tmp = tempfile::Builder::new()
        .prefix(".lmkit-tmp-")
        .tempfile_in(dir)
        .map_err(io)?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
        f(&mut w).map_err(io)?;
        w.flush().map_err(io)?;
    }
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}
