//! Read-only memory maps of files that lmkit writes (n-gram binaries, token shards).
//!
//! This module is the one place outside `lmkit-kernels` with `unsafe` code: the n-gram and
//! tokenizer crates map files without depending on the tensor library that the kernels crate
//! stands on.
#![allow(unsafe_code)]

use crate::error::{PathError, PathResultExt};
use std::path::Path;

/// Maps `path` read-only.
pub fn map_readonly(path: &Path) -> Result<memmap2::Mmap, PathError> {
    let file = std::fs::File::open(path).at(path)?;
    // SAFETY: the map is read-only, and lmkit never rewrites these files in place: it replaces
    // them by atomic rename (see `atomic`), which leaves the mapped inode unchanged. A file
    // truncated by another program while mapped would fault, as it would for any reader.
    unsafe { memmap2::Mmap::map(&file) }.at(path)
}
