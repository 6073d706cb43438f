//! The `.lmkb` binary model: one little-endian image that is memory-mapped and queried in place.
//!
//! Layout (every section starts at a multiple of 8):
//! ```text
//! header (192 bytes): magic "LMKB", version, order, flags (bit 0: character tokens),
//!   vocab size, ids of <unk> <s> </s>, vocab hash slots, per order (1..=8) entry count and hash slots,
//!   total file length, FNV-1a checksum of the preceding header bytes, checksum of everything
//!   after the header ([`body_checksum`]; 0 in files written before it existed: not checked)
//! vocab offsets   (vocab size + 1) × u32, into the vocab bytes
//! vocab bytes     UTF-8 words, concatenated
//! vocab table     slots × (u64 hash, u32 id, u32 unused)      open addressing, linear probing
//! order n table   slots × (u64 n-gram hash, f32 log10 prob, f32 log10 back-off), for n = 1..=order
//! ```
//! A second layout, the trie (flag bit 1; bits 8..15 of the flags hold the quantization bits, 0 for
//! f32 values), keeps the header and vocabulary sections and replaces the hash tables with
//! quantization tables and one bit-packed section per order ([`crate::trie`]); the per-order
//! header field that holds the hash slots then holds the section's byte length. Version 3 adds
//! pointer compression to the trie (flag bit 2; bits 16..23 hold the most bits a pointer table
//! may take); files without it are written as version 2.
//! N-grams are keyed by a 64-bit hash of their ids, as in KenLM's probing structure: collisions
//! between distinct n-grams are possible in principle and negligible in practice (2^-64 per pair).

use crate::count::MAX_ORDER;
use crate::error::{NgramError, Result};
use crate::tables::NgramTables;
use crate::tokenize::{Tokenization, BOS, EOS, UNK};
use std::path::Path;

pub const MAGIC: &[u8; 4] = b"LMKB";
/// Version 2 sizes its hash tables exactly (see [`Slots`]); version 1 files still load.
pub const VERSION: u32 = 2;
/// The version of tries with compressed pointers (older builds refuse them by their version).
pub const VERSION_POINTERS: u32 = 3;
pub const HEADER_LEN: usize = 192;
const CHECKSUM_AT: usize = 176;
const BODY_CHECKSUM_AT: usize = 184;
pub const SLOT_LEN: usize = 16;

/// The hash of the tables: splitmix64's output function (part of the file format).
pub(crate) use lmkit_core::rng::finalize as mix;

/// Hash of the 1-gram `w`; extend it leftwards word by word with [`extend_hash`].
pub(crate) fn start_hash(w: u32) -> u64 {
    mix(u64::from(w) ^ 0x9e37_79b9_7f4a_7c15)
}

pub(crate) fn extend_hash(h: u64, w: u32) -> u64 {
    mix(h.rotate_left(17) ^ u64::from(w).wrapping_add(0x632b_e59b_d9b4_e019))
}

/// Stored hashes are never 0: 0 marks an empty slot.
pub(crate) fn nonzero(h: u64) -> u64 {
    h.max(1)
}

/// Hash of a key in word order (hashed from its last word to its first).
pub(crate) fn ngram_hash(key: &[u32]) -> u64 {
    let mut it = key.iter().rev();
    let mut h = start_hash(*it.next().unwrap_or(&0));
    for &w in it {
        h = extend_hash(h, w);
    }
    nonzero(h)
}

pub(crate) fn word_hash(word: &[u8]) -> u64 {
    nonzero(mix(fnv(word)))
}

/// Bytes per chunk of [`body_checksum`].
const CHECKSUM_CHUNK: usize = 1 << 20;
const CHECKSUM_SEED: u64 = 0x243f_6a88_85a3_08d3;

/// The hash of one chunk: its 8-byte words, then its remaining bytes, through [`mix`].
fn chunk_hash(chunk: &[u8]) -> u64 {
    let mut words = chunk.chunks_exact(8);
    let mut h = CHECKSUM_SEED;
    for w in &mut words {
        h = mix(h ^ u64::from_le_bytes(w.try_into().expect("8-byte chunk")));
    }
    for &b in words.remainder() {
        h = mix(h ^ u64::from(b));
    }
    h
}

/// [`chunk_hash`] of four whole chunks at once: four independent chains in one loop keep the
/// multiplier busy where one chain waits on each step (same values).
fn chunk_hashes4(c: [&[u8]; 4]) -> [u64; 4] {
    let mut h = [CHECKSUM_SEED; 4];
    let word = |chunk: &[u8], i: usize| {
        u64::from_le_bytes(chunk[8 * i..8 * i + 8].try_into().expect("8-byte word"))
    };
    for i in 0..CHECKSUM_CHUNK / 8 {
        for lane in 0..4 {
            h[lane] = mix(h[lane] ^ word(c[lane], i));
        }
    }
    h
}

/// The checksum of an image's body (its bytes after the header): each 1 MiB chunk hashed 8 bytes
/// at a time through [`mix`] (chunks in parallel), the chunk hashes then mixed in order; never 0.
pub(crate) fn body_checksum(body: &[u8]) -> u64 {
    use rayon::prelude::*;
    let hashes: Vec<u64> = body
        .par_chunks(4 * CHECKSUM_CHUNK)
        .flat_map_iter(|group| {
            let chunks: Vec<&[u8]> = group.chunks(CHECKSUM_CHUNK).collect();
            match <[&[u8]; 4]>::try_from(chunks.as_slice()) {
                Ok(four) if group.len() == 4 * CHECKSUM_CHUNK => chunk_hashes4(four).to_vec(),
                _ => chunks.iter().map(|c| chunk_hash(c)).collect(),
            }
        })
        .collect();
    nonzero(hashes.iter().fold(body.len() as u64, |h, &c| mix(h ^ c)))
}

pub(crate) fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Hash-table size for `n` entries: load factor at most 2/3 (version 1: rounded up to a power
/// of two, which made tables up to twice that).
pub(crate) fn slots_for(n: usize, exact: bool) -> usize {
    let s = n + n / 2 + 1;
    if exact {
        s
    } else {
        s.next_power_of_two()
    }
}

/// How a hash table's slots are addressed. Version 2: any size, the home slot the hash's high
/// bits scaled to it (multiply-shift); version 1: a power of two, the hash's low bits. Linear
/// probing from there, wrapping at the end.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Slots {
    pub count: usize,
    pub exact: bool,
}

impl Slots {
    #[inline(always)]
    pub fn home(self, h: u64) -> usize {
        if self.exact {
            ((u128::from(h) * self.count as u128) >> 64) as usize
        } else {
            (h as usize) & (self.count - 1)
        }
    }

    #[inline(always)]
    pub fn next(self, i: usize) -> usize {
        if i + 1 == self.count {
            0
        } else {
            i + 1
        }
    }
}

pub(crate) fn align8(x: usize) -> usize {
    (x + 7) & !7
}

/// Section offsets of an image, derived from its header values.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Layout {
    pub vocab_offsets: usize,
    pub vocab_bytes: usize,
    pub vocab_table: usize,
    /// Quantization tables (trie layout; empty otherwise).
    pub quant: usize,
    pub order_tables: Vec<usize>,
    pub total: usize,
}

impl Layout {
    /// `section_lens`: the byte length of each order's section; `quant_len`: of the
    /// quantization tables before them.
    pub fn new(
        vocab_size: usize,
        vocab_bytes_len: usize,
        vocab_slots: usize,
        quant_len: usize,
        section_lens: &[usize],
    ) -> Option<Self> {
        let vocab_offsets = HEADER_LEN;
        let vocab_bytes =
            align8(vocab_offsets.checked_add((vocab_size.checked_add(1)?).checked_mul(4)?)?);
        let vocab_table = align8(vocab_bytes.checked_add(vocab_bytes_len)?);
        let quant = vocab_table.checked_add(vocab_slots.checked_mul(SLOT_LEN)?)?;
        let mut at = align8(quant.checked_add(quant_len)?);
        let mut order_tables = Vec::new();
        for &len in section_lens {
            order_tables.push(at);
            at = align8(at.checked_add(len)?);
        }
        Some(Layout {
            vocab_offsets,
            vocab_bytes,
            vocab_table,
            quant,
            order_tables,
            total: at,
        })
    }
}

/// How a binary model stores its n-grams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BinaryLayout {
    /// Hash tables: the fastest to query.
    #[default]
    Probing,
    /// A bit-packed trie, probabilities and back-offs quantized to `bits` bits (0: kept as f32),
    /// first-child pointers compressed with tables of at most `pointer_bits` bits (0: not, as
    /// KenLM's `build_binary -a`): the smallest.
    Trie { bits: u32, pointer_bits: u32 },
}

/// Builds the binary image of `tables` in the probing layout.
pub fn build_image(tables: &NgramTables) -> Vec<u8> {
    build_image_as(tables, BinaryLayout::Probing, Path::new("(in memory)"))
        .expect("the probing layout takes any tables")
}

/// Builds the binary image of `tables` in `kind`'s layout; errors name `path`, where it is to be
/// written. A trie needs every n-gram's suffix to be stored (lmplz's and lmkit's models have
/// them); tables without are an error.
pub fn build_image_as(tables: &NgramTables, kind: BinaryLayout, path: &Path) -> Result<Vec<u8>> {
    build_image_version(tables, kind, VERSION, path)
}

/// [`build_image_as`] in format `version` (1 or 2; writing 1 is kept for the test that old files
/// still load).
pub(crate) fn build_image_version(
    tables: &NgramTables,
    kind: BinaryLayout,
    version: u32,
    path: &Path,
) -> Result<Vec<u8>> {
    let exact = version >= 2;
    let order = tables.order();
    let words_len: usize = tables.vocab.iter().map(|w| w.len()).sum();
    let vocab_slots = slots_for(tables.vocab.len(), exact);
    let (flags, order_fields, quant_len, trie) = match kind {
        BinaryLayout::Probing => {
            let slots: Vec<usize> = tables
                .orders
                .iter()
                .map(|o| slots_for(o.len(), exact))
                .collect();
            (0u32, slots, 0, None)
        }
        BinaryLayout::Trie { bits, pointer_bits } => {
            if bits > MAX_QUANT_BITS {
                return Err(NgramError::BadOption {
                    option: "quantize",
                    msg: format!("{bits} bits; use 1..={MAX_QUANT_BITS} (or 0 for f32 values)"),
                });
            }
            if pointer_bits > crate::trie::MAX_POINTER_BITS {
                return Err(NgramError::BadOption {
                    option: "pointer-bits",
                    msg: format!(
                        "{pointer_bits} bits; use 0..={}",
                        crate::trie::MAX_POINTER_BITS
                    ),
                });
            }
            let (quant, sections) = crate::trie::build_sections(tables, bits, pointer_bits, path)?;
            let pointers = if pointer_bits > 0 {
                4 | (pointer_bits << 16)
            } else {
                0
            };
            (
                2 | (bits << 8) | pointers,
                sections.iter().map(Vec::len).collect(),
                quant.len(),
                Some((quant, sections)),
            )
        }
    };
    let section_lens: Vec<usize> = if trie.is_some() {
        order_fields.clone()
    } else {
        order_fields.iter().map(|s| s * SLOT_LEN).collect()
    };
    let layout = Layout::new(
        tables.vocab.len(),
        words_len,
        vocab_slots,
        quant_len,
        &section_lens,
    )
    .expect("model sizes overflow usize"); // only for absurd in-memory sizes
    let mut img = vec![0u8; layout.total];
    let id_of = |w: &str| tables.id_of(w).unwrap_or(u32::MAX);

    let put32 =
        |img: &mut Vec<u8>, at: usize, v: u32| img[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |img: &mut Vec<u8>, at: usize, v: u64| img[at..at + 8].copy_from_slice(&v.to_le_bytes());
    img[0..4].copy_from_slice(MAGIC);
    let version = if flags & 4 != 0 {
        VERSION_POINTERS
    } else {
        version
    };
    put32(&mut img, 4, version);
    put32(&mut img, 8, order as u32);
    put32(
        &mut img,
        12,
        u32::from(tables.tokenization == Tokenization::Chars) | flags,
    );
    put32(&mut img, 16, tables.vocab.len() as u32);
    put32(&mut img, 20, id_of(UNK));
    put32(&mut img, 24, id_of(BOS));
    put32(&mut img, 28, id_of(EOS));
    put64(&mut img, 32, vocab_slots as u64);
    for (i, o) in tables.orders.iter().enumerate() {
        put64(&mut img, 40 + 16 * i, o.len() as u64);
        put64(&mut img, 48 + 16 * i, order_fields[i] as u64);
    }
    put64(&mut img, 168, layout.total as u64);
    let checksum = fnv(&img[..CHECKSUM_AT]);
    put64(&mut img, CHECKSUM_AT, checksum);

    let mut off = 0u32;
    for (i, w) in tables.vocab.iter().enumerate() {
        put32(&mut img, layout.vocab_offsets + 4 * i, off);
        let at = layout.vocab_bytes + off as usize;
        img[at..at + w.len()].copy_from_slice(w.as_bytes());
        off += w.len() as u32;
    }
    put32(&mut img, layout.vocab_offsets + 4 * tables.vocab.len(), off);

    for (id, w) in tables.vocab.iter().enumerate() {
        let h = word_hash(w.as_bytes());
        let slot = free_slot(
            &img,
            layout.vocab_table,
            Slots {
                count: vocab_slots,
                exact,
            },
            h,
        );
        put64(&mut img, slot, h);
        put32(&mut img, slot + 8, id as u32);
    }
    if let Some((quant, sections)) = trie {
        img[layout.quant..layout.quant + quant.len()].copy_from_slice(&quant);
        for (sec, &at) in sections.iter().zip(&layout.order_tables) {
            img[at..at + sec.len()].copy_from_slice(sec);
        }
    } else {
        fill_hash_tables(&mut img, tables, &layout, &order_fields, exact);
    }
    let body = body_checksum(&img[HEADER_LEN..]);
    put64(&mut img, BODY_CHECKSUM_AT, body);
    Ok(img)
}

/// Writes every n-gram of `tables` into its order's hash table in `img` (the orders' tables in
/// parallel: they are disjoint).
fn fill_hash_tables(
    img: &mut [u8],
    tables: &NgramTables,
    layout: &Layout,
    slots: &[usize],
    exact: bool,
) {
    use rayon::prelude::*;
    let mut parts: Vec<&mut [u8]> = Vec::with_capacity(slots.len());
    let mut rest = img;
    let mut consumed = 0;
    for (&base, &count) in layout.order_tables.iter().zip(slots) {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(base - consumed);
        let (part, tail) = tail.split_at_mut(count * SLOT_LEN);
        parts.push(part);
        rest = tail;
        consumed = base + count * SLOT_LEN;
    }
    parts
        .into_par_iter()
        .zip(&tables.orders)
        .zip(slots)
        .for_each(|((table, o), &count)| {
            let slots = Slots { count, exact };
            for i in 0..o.len() {
                let h = ngram_hash(&tables.key(o.n, i));
                let slot = free_slot(table, 0, slots, h);
                table[slot..slot + 8].copy_from_slice(&h.to_le_bytes());
                table[slot + 8..slot + 12].copy_from_slice(&o.log10_prob[i].to_le_bytes());
                table[slot + 12..slot + 16]
                    .copy_from_slice(&o.log10_backoff.get(i).unwrap_or(0.0).to_le_bytes());
            }
        });
}

/// First slot at or after `h`'s home slot that is empty or already holds `h`.
fn free_slot(img: &[u8], base: usize, slots: Slots, h: u64) -> usize {
    let mut i = slots.home(h);
    loop {
        let at = base + i * SLOT_LEN;
        let stored = u64::from_le_bytes(img[at..at + 8].try_into().expect("8-byte slice"));
        if stored == 0 || stored == h {
            return at;
        }
        i = slots.next(i);
    }
}

/// Writes `tables` as a `.lmkb` file atomically, in `kind`'s layout.
pub fn save_binary(tables: &NgramTables, path: &Path, kind: BinaryLayout) -> Result<()> {
    let img = build_image_as(tables, kind, path)?;
    Ok(lmkit_core::write_atomic_bytes(path, &img)?)
}

pub use crate::trie::MAX_POINTER_BITS;
/// Most bits a quantized value may take.
pub const MAX_QUANT_BITS: u32 = 16;

/// Header values of an image, checked against its length.
#[derive(Clone, Debug)]
pub(crate) struct Header {
    pub order: usize,
    pub tokenization: Tokenization,
    pub vocab_size: usize,
    pub unk: u32,
    pub bos: u32,
    pub eos: u32,
    pub vocab_slots: usize,
    /// Version 2's exactly sized tables ([`Slots`]).
    pub exact_slots: bool,
    pub counts: Vec<u64>,
    /// Hash slots per order (probing layout).
    pub order_slots: Vec<usize>,
    /// Quantization bits of the trie layout (`None`: probing).
    pub trie_bits: Option<u32>,
    /// The most bits a trie's pointer tables take (0: no pointer compression).
    pub trie_pointer_bits: u32,
    pub layout: Layout,
}

/// Checks the body against the checksum the header stores (files written before it existed
/// store 0 and are not checked): a corrupted table would otherwise give wrong probabilities, or
/// an infinite perplexity, with no error.
pub(crate) fn check_body(img: &[u8], path: &Path) -> Result<()> {
    let stored = u64::from_le_bytes(
        img[BODY_CHECKSUM_AT..BODY_CHECKSUM_AT + 8]
            .try_into()
            .expect("8-byte slice"),
    );
    if stored != 0 && stored != body_checksum(&img[HEADER_LEN..]) {
        return Err(NgramError::Binary {
            path: path.to_path_buf(),
            msg: "body checksum mismatch (file corrupt); write it again with `lmkit ngram train` or `lmkit ngram convert`".into(),
        });
    }
    Ok(())
}

pub(crate) fn parse_header(img: &[u8], path: &Path) -> Result<Header> {
    let bad = |msg: String| NgramError::Binary {
        path: path.to_path_buf(),
        msg,
    };
    if img.len() < HEADER_LEN || &img[0..4] != MAGIC {
        return Err(bad(
            "missing LMKB magic bytes (not an lmkit binary model, or truncated)".into(),
        ));
    }
    let r32 = |at: usize| u32::from_le_bytes(img[at..at + 4].try_into().expect("4-byte slice"));
    let r64 = |at: usize| u64::from_le_bytes(img[at..at + 8].try_into().expect("8-byte slice"));
    let version = r32(4);
    if !(1..=VERSION_POINTERS).contains(&version) {
        return Err(bad(format!(
            "format version {version} is not supported (this build reads 1 to {VERSION_POINTERS})"
        )));
    }
    let exact_slots = version >= 2;
    if r64(CHECKSUM_AT) != fnv(&img[..CHECKSUM_AT]) {
        return Err(bad("header checksum mismatch (file corrupt)".into()));
    }
    let order = r32(8) as usize;
    if order == 0 || order > MAX_ORDER {
        return Err(bad(format!("order {order} out of range 1..={MAX_ORDER}")));
    }
    let flags = r32(12);
    let tokenization = if flags & 1 == 1 {
        Tokenization::Chars
    } else {
        Tokenization::Words
    };
    let trie_bits = (flags & 2 != 0).then_some((flags >> 8) & 0xff);
    let trie_pointer_bits = if flags & 4 != 0 {
        (flags >> 16) & 0xff
    } else {
        0
    };
    let known = if version >= VERSION_POINTERS {
        0xff_ff07
    } else {
        0xff03
    };
    if trie_bits.is_some_and(|b| b > MAX_QUANT_BITS)
        || flags & !known != 0
        || (flags & 4 != 0 && (trie_bits.is_none() || trie_pointer_bits == 0))
        || trie_pointer_bits > crate::trie::MAX_POINTER_BITS
    {
        return Err(bad(format!("unknown flags {flags:#x}")));
    }
    let vocab_size = r32(16) as usize;
    let (unk, bos, eos) = (r32(20), r32(24), r32(28));
    if [unk, bos, eos].iter().any(|&id| id as usize >= vocab_size) {
        return Err(bad("special token ids out of range".into()));
    }
    let usize_of = |v: u64| usize::try_from(v).map_err(|_| bad(format!("size {v} too large")));
    let pow2 = |s: usize, what: &str| {
        if exact_slots || s.is_power_of_two() {
            Ok(s)
        } else {
            Err(bad(format!(
                "{what} hash table size {s} is not a power of two"
            )))
        }
    };
    let vocab_slots = pow2(usize_of(r64(32))?, "vocabulary")?;
    let mut counts = Vec::new();
    let mut order_slots = Vec::new();
    for i in 0..order {
        counts.push(r64(40 + 16 * i));
        if trie_bits.is_some() {
            order_slots.push(usize_of(r64(48 + 16 * i))?);
            continue;
        }
        order_slots.push(pow2(usize_of(r64(48 + 16 * i))?, "n-gram")?);
        if counts[i] as usize >= order_slots[i] {
            return Err(bad(format!(
                "order {} has more entries than hash slots",
                i + 1
            )));
        }
    }
    let (quant_len, section_lens) = match trie_bits {
        None => (
            0,
            order_slots
                .iter()
                .map(|s| s.checked_mul(SLOT_LEN))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("section sizes overflow".into()))?,
        ),
        Some(bits) => {
            if counts[0] != vocab_size as u64 {
                return Err(bad("the trie has not one unigram per word".into()));
            }
            let lens =
                crate::trie::section_lens(&counts, vocab_size as u64, bits, trie_pointer_bits)
                    .ok_or_else(|| bad("section sizes overflow".into()))?;
            if lens != order_slots {
                return Err(bad(
                    "trie section lengths do not match the n-gram counts".into()
                ));
            }
            (crate::trie::quant_len(order, bits), lens)
        }
    };
    if vocab_size >= vocab_slots {
        return Err(bad("vocabulary larger than its hash table".into()));
    }
    let total = usize_of(r64(168))?;
    if img.len() != total {
        return Err(bad(format!(
            "file is {} bytes but the header says {total} (truncated or corrupt)",
            img.len()
        )));
    }
    // The word bytes length is the last vocab offset; the offsets section must be in bounds first.
    let offsets_end = HEADER_LEN + 4 * (vocab_size + 1);
    if offsets_end > img.len() {
        return Err(bad("vocabulary offsets run past the end of the file".into()));
    }
    let words_len = r32(HEADER_LEN + 4 * vocab_size) as usize;
    let layout = Layout::new(vocab_size, words_len, vocab_slots, quant_len, &section_lens)
        .ok_or_else(|| bad("section sizes overflow".into()))?;
    if layout.total != total {
        return Err(bad(format!(
            "sections add up to {} bytes, file has {total}",
            layout.total
        )));
    }
    let mut prev = 0u32;
    for i in 0..=vocab_size {
        let o = r32(HEADER_LEN + 4 * i);
        if o < prev || o as usize > words_len {
            return Err(bad(format!(
                "vocabulary offset {i} out of order or out of bounds"
            )));
        }
        if i > 0 {
            let word = &img[layout.vocab_bytes + prev as usize..layout.vocab_bytes + o as usize];
            if std::str::from_utf8(word).is_err() {
                return Err(bad(format!("vocabulary word {} is not valid UTF-8", i - 1)));
            }
        }
        prev = o;
    }
    Ok(Header {
        order,
        tokenization,
        vocab_size,
        unk,
        bos,
        eos,
        vocab_slots,
        exact_slots,
        counts,
        order_slots,
        trie_bits,
        trie_pointer_bits,
        layout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interleaved_checksum_equals_one_chunk_at_a_time() {
        // The definition: every 1 MiB chunk on its own, in order.
        let reference = |body: &[u8]| {
            let hashes: Vec<u64> = body.chunks(CHECKSUM_CHUNK).map(chunk_hash).collect();
            nonzero(hashes.iter().fold(body.len() as u64, |h, &c| mix(h ^ c)))
        };
        let mut x: u64 = 1;
        let data: Vec<u8> = (0..9 * CHECKSUM_CHUNK + 12_345)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        for len in [
            0,
            5,
            CHECKSUM_CHUNK,
            4 * CHECKSUM_CHUNK,
            4 * CHECKSUM_CHUNK + 9,
            data.len(),
        ] {
            assert_eq!(
                body_checksum(&data[..len]),
                reference(&data[..len]),
                "{len}"
            );
        }
    }
}
