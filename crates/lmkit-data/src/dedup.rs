//! The state of deduplication that grows with the corpus: the content hashes seen, and the source
//! and preview of each kept document (for the report's samples). Both can move to disk
//! ([`crate::spill`]) when a memory cap is reached, and answer the same afterwards.

use crate::spill::{Runs, Texts};
use crate::Result;
use rustc_hash::FxHashSet;
use std::path::Path;

/// Bytes of one slot of the hash set (hash and control byte).
const SLOT_BYTES: usize = 17;

/// Content hashes of documents kept so far.
#[derive(Default)]
pub struct ExactSet {
    mem: FxHashSet<u128>,
    disk: Option<Runs>,
}

impl ExactSet {
    /// Adds `h`; false when it was already there.
    pub fn insert(&mut self, h: u128) -> bool {
        if self
            .disk
            .as_ref()
            .is_some_and(|d| d.contains(&h.to_be_bytes()))
        {
            return false;
        }
        self.mem.insert(h)
    }

    /// Estimated bytes taken from the allocator (counted as in
    /// [`crate::minhash::LshIndex::memory_bytes`]: allocated until the first spill, used after).
    pub fn memory_bytes(&self) -> usize {
        let slots = crate::spill::counted(self.disk.is_some(), self.mem.capacity(), self.mem.len());
        2 * slots * 8 / 7 * SLOT_BYTES
    }

    pub fn spill_to(&mut self, dir: &Path) -> Result<()> {
        let disk = self
            .disk
            .get_or_insert_with(|| Runs::new(dir, "exact", 16, 16));
        let mut hashes: Vec<u128> = self.mem.drain().collect();
        hashes.sort_unstable();
        let bytes: Vec<u8> = hashes.iter().flat_map(|h| h.to_be_bytes()).collect();
        disk.add(&bytes)
    }
}

/// Source and preview of each kept document, by the number the near-duplicate index gave it.
#[derive(Default)]
pub struct KeptMeta {
    mem: Vec<(String, String)>,
    mem_bytes: usize,
    disk: Option<Texts>,
}

impl KeptMeta {
    pub fn push(&mut self, source: String, preview: String) {
        self.mem_bytes += source.len() + preview.len() + 56;
        self.mem.push((source, preview));
    }

    pub fn get(&self, id: u32) -> (String, String) {
        let on_disk = self.disk.as_ref().map_or(0, Texts::rows);
        let id = id as usize;
        if id >= on_disk {
            return self.mem.get(id - on_disk).cloned().unwrap_or_default();
        }
        let row = self.disk.as_ref().map(|d| d.get(id)).unwrap_or_default();
        let row = String::from_utf8_lossy(row);
        let (source, preview) = row.split_once('\0').unwrap_or((&row, ""));
        (source.to_string(), preview.to_string())
    }

    pub fn memory_bytes(&self) -> usize {
        self.mem_bytes
    }

    pub fn spill_to(&mut self, dir: &Path) -> Result<()> {
        let disk = self.disk.get_or_insert_with(|| Texts::new(dir, "kept"));
        let rows: Vec<Vec<u8>> = std::mem::take(&mut self.mem)
            .into_iter()
            .map(|(s, p)| format!("{s}\0{p}").into_bytes())
            .collect();
        self.mem_bytes = 0;
        disk.add_block(rows.iter().map(Vec::as_slice))
    }
}
