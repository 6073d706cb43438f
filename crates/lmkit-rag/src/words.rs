//! Arrays of plain numbers that are either built in memory or read from a memory-mapped file
//! (checked once on opening: a length that is not a whole number of elements is refused).

use crate::{RagError, Result};
use std::path::Path;

pub enum Array<T: bytemuck::Pod> {
    Owned(Vec<T>),
    Mapped(memmap2::Mmap),
}

/// `u32` words (graph, BM25 postings).
pub type Words = Array<u32>;

impl<T: bytemuck::Pod> Array<T> {
    /// Maps `path`, checking that it holds whole elements.
    pub fn map(path: &Path) -> Result<Array<T>> {
        let m = lmkit_core::mmap::map_readonly(path)?;
        if bytemuck::try_cast_slice::<u8, T>(&m).is_err() {
            return Err(RagError::corrupt(
                path,
                format!(
                    "{} bytes is not a whole number of {}-byte values",
                    m.len(),
                    std::mem::size_of::<T>()
                ),
            ));
        }
        Ok(Array::Mapped(m))
    }

    pub fn get(&self) -> &[T] {
        match self {
            Array::Owned(v) => v,
            // Checked on mapping (a map starts on a page boundary, so it is aligned).
            Array::Mapped(m) => bytemuck::cast_slice(m),
        }
    }

    /// The values as an owned vector (copied out of a map).
    pub fn into_vec(self) -> Vec<T> {
        match self {
            Array::Owned(v) => v,
            Array::Mapped(m) => bytemuck::cast_slice(&m).to_vec(),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(self.get())
    }
}
