//! Block-quantized weights with 16 rows interleaved, for decoding steps on CPUs with AVX-512
//! VNNI: a weight of one of GGML's 32-value block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) is
//! rearranged once, when it is loaded, so that the blocks of 16 rows at one depth lie together:
//! their 16 scales side by side, then their values 4 bytes per row at a time. One 64-byte load then
//! holds 4 values of each of the 16 rows, and one `vpdpbusd` multiplies them by the same 4
//! activation bytes (broadcast), summing each row's products in its own lane: the 16 rows' dot
//! products come out in one vector, scaled by the 16 scales in one step. The weights' bytes are
//! read as one stream, and a block costs a sixteenth of the instructions of a per-row dot product.
//! The arithmetic is llama.cpp's (8-bit activations, [`crate::quant::quantize_q8_1`]); only the
//! order of the f32 sums differs from [`crate::quant::ggml_product`].
//!
//! The rearranged weight takes exactly the bytes of the original, which it replaces; products of
//! [`crate::quant::TILE_MIN_ROWS`] rows or more on CPUs with AMX tiles (prompts) run on the tiles
//! from a copy in the original layout made for the product (the tiles dequantize every block
//! anyway), as does anything that needs the original blocks ([`Interleaved::original`]).
//!
//! Layout, per group of 16 rows and block index (16 blocks' bytes in all):
//! - the 16 scales d (f16), then for Q4_1 and Q5_1 the 16 minimums m (f16);
//! - Q8_0: 8 runs of 64 bytes; run j holds values 4j..4j+4 of each row (row r at bytes
//!   4r..4r+4), each plus 128 (as unsigned bytes);
//! - the 4- and 5-bit types: 4 runs of 64 bytes; run t holds, for row r at bytes 4r..4r+4, values
//!   4t..4t+4 in the low nibbles and values 16+4t..16+4t+4 in the high ones (their low 4 bits);
//!   then for Q5_0 and Q5_1 8 masks of 64 bits: bit 4r+p of mask j is the fifth bit of value
//!   4j+p of row r.
//!
//! Values stored with an offset (Q4_0's 8, Q5_0's 16, Q8_0's 128 added here) are summed as
//! stored, and the offset times the activations' sum is taken off in the integer sums.

use crate::quant::{Q8_1, QK};
use candle_core::quantized::GgmlDType;

/// Rows per interleaved group: one 512-bit vector's 32-bit lanes.
pub const GROUP_ROWS: usize = 16;

/// The block types this layout holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
}

impl Kind {
    fn of(dtype: GgmlDType) -> Option<Kind> {
        Some(match dtype {
            GgmlDType::Q4_0 => Kind::Q4_0,
            GgmlDType::Q4_1 => Kind::Q4_1,
            GgmlDType::Q5_0 => Kind::Q5_0,
            GgmlDType::Q5_1 => Kind::Q5_1,
            GgmlDType::Q8_0 => Kind::Q8_0,
            _ => return None,
        })
    }

    fn block_bytes(self) -> usize {
        match self {
            Kind::Q4_0 => 18,
            Kind::Q4_1 => 20,
            Kind::Q5_0 => 22,
            Kind::Q5_1 => 24,
            Kind::Q8_0 => 34,
        }
    }

    /// Whether blocks hold a minimum m after d (values are v·d + m).
    fn has_min(self) -> bool {
        matches!(self, Kind::Q4_1 | Kind::Q5_1)
    }

    /// Whether values have a fifth bit (kept in a 32-bit word after the scales).
    fn fifth_bit(self) -> bool {
        matches!(self, Kind::Q5_0 | Kind::Q5_1)
    }

    /// What the values as stored here exceed the signed values by (0 for the types with a
    /// minimum, whose values are unsigned).
    fn offset(self) -> i32 {
        match self {
            Kind::Q4_0 => 8,
            Kind::Q5_0 => 16,
            Kind::Q8_0 => 128,
            Kind::Q4_1 | Kind::Q5_1 => 0,
        }
    }

    /// Bytes of scales (and minimums) at the start of each block of the original layout.
    fn scale_bytes(self) -> usize {
        if self.has_min() {
            4
        } else {
            2
        }
    }
}

/// A weight [n, k] of a 32-value GGML block type, its whole groups of 16 rows interleaved (see
/// the module's note), the rows after the last whole group as stored.
pub struct Interleaved {
    dtype: GgmlDType,
    kind: Kind,
    n: usize,
    k: usize,
    groups: Vec<u8>,
    tail: Vec<u8>,
}

impl std::fmt::Debug for Interleaved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Interleaved({:?}, [{}, {}])", self.dtype, self.n, self.k)
    }
}

/// Whether this CPU multiplies interleaved weights: AVX-512 (F, BW, VL) with VNNI, and
/// `LMKIT_SIMD` not capping the kernels below AVX-512.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *VNNI.get_or_init(|| {
            crate::simd::simd_level() >= 2 && std::arch::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

impl Interleaved {
    /// `bytes`, a weight [n, k] of type `dtype` as a GGUF file stores it, interleaved: `None`
    /// where this CPU lacks the kernels ([`available`]), for other types, for fewer than 16 rows,
    /// and for sizes that disagree.
    pub fn new(bytes: &[u8], dtype: GgmlDType, n: usize, k: usize) -> Option<Interleaved> {
        if !available() {
            return None;
        }
        Self::rearranged(bytes, dtype, n, k)
    }

    /// As [`Interleaved::new`], whatever the CPU (the layout alone).
    fn rearranged(bytes: &[u8], dtype: GgmlDType, n: usize, k: usize) -> Option<Interleaved> {
        let kind = Kind::of(dtype)?;
        let bb = kind.block_bytes();
        if n < GROUP_ROWS || k == 0 || !k.is_multiple_of(QK) || bytes.len() != n * (k / QK) * bb {
            return None;
        }
        let blocks = k / QK;
        let row_bytes = blocks * bb;
        let whole = n / GROUP_ROWS * GROUP_ROWS;
        let mut groups = vec![0u8; whole * row_bytes];
        let group_bytes = GROUP_ROWS * row_bytes;
        let at = if kind.has_min() { 64 } else { 32 };
        for (g, out) in groups.chunks_exact_mut(group_bytes).enumerate() {
            let rows = &bytes[g * group_bytes..(g + 1) * group_bytes];
            for (b, o) in out.chunks_exact_mut(GROUP_ROWS * bb).enumerate() {
                let mut masks = [0u64; 8];
                for r in 0..GROUP_ROWS {
                    let block = &rows[r * row_bytes + b * bb..][..bb];
                    o[2 * r..2 * r + 2].copy_from_slice(&block[..2]);
                    if kind.has_min() {
                        o[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&block[2..4]);
                    }
                    if kind == Kind::Q8_0 {
                        // Values 4j..4j + 4 into run j, plus 128.
                        for j in 0..8 {
                            let v = u32::from_le_bytes(
                                block[2 + 4 * j..6 + 4 * j].try_into().expect("4"),
                            );
                            o[at + 64 * j + 4 * r..][..4]
                                .copy_from_slice(&(v ^ 0x8080_8080).to_le_bytes());
                        }
                        continue;
                    }
                    let mut qs = kind.scale_bytes();
                    if kind.fifth_bit() {
                        // Bits 4j..4j + 4 of the fifth bits into bits 4r..4r + 4 of mask j.
                        let qh = u32::from_le_bytes(block[qs..qs + 4].try_into().expect("4"));
                        for (j, mask) in masks.iter_mut().enumerate() {
                            *mask |= (((qh >> (4 * j)) & 0xF) as u64) << (4 * r);
                        }
                        qs += 4;
                    }
                    // Stored byte i (values i and i + 16) into byte 4r + i % 4 of run i / 4.
                    for t in 0..4 {
                        o[at + 64 * t + 4 * r..][..4]
                            .copy_from_slice(&block[qs + 4 * t..qs + 4 * t + 4]);
                    }
                }
                if kind.fifth_bit() {
                    for (j, mask) in masks.iter().enumerate() {
                        let m = at + 256 + 8 * j;
                        o[m..m + 8].copy_from_slice(&mask.to_le_bytes());
                    }
                }
            }
        }
        Some(Interleaved {
            dtype,
            kind,
            n,
            k,
            groups,
            tail: bytes[whole * row_bytes..].to_vec(),
        })
    }

    /// The weight's type.
    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// (rows n, depth k).
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes held (as many as the original layout's).
    pub fn len(&self) -> usize {
        self.groups.len() + self.tail.len()
    }

    /// Whether the weight holds no bytes (never: it has 16 rows or more).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The weight's blocks in the original layout (as the GGUF file stored them), bit for bit.
    pub fn original(&self) -> Vec<u8> {
        let row_bytes = self.k / QK * self.kind.block_bytes();
        let mut out = vec![0u8; self.len()];
        for (j, row) in out.chunks_exact_mut(row_bytes).enumerate() {
            self.row_blocks(j, 0..self.k / QK, row);
        }
        out
    }

    /// Blocks `blocks` of row `j` in the original layout, into `out` (as many bytes).
    pub fn row_blocks(&self, j: usize, blocks: std::ops::Range<usize>, out: &mut [u8]) {
        let kind = self.kind;
        let bb = kind.block_bytes();
        let row_bytes = self.k / QK * bb;
        let whole = self.groups.len() / row_bytes;
        let out = &mut out[..blocks.len() * bb];
        if j >= whole {
            let row = &self.tail[(j - whole) * row_bytes..(j - whole + 1) * row_bytes];
            out.copy_from_slice(&row[blocks.start * bb..blocks.end * bb]);
            return;
        }
        let (g, r) = (j / GROUP_ROWS, j % GROUP_ROWS);
        let group = &self.groups[g * GROUP_ROWS * row_bytes..(g + 1) * GROUP_ROWS * row_bytes];
        let at = if kind.has_min() { 64 } else { 32 };
        let s = kind.scale_bytes();
        for (b, o) in blocks.zip(out.chunks_exact_mut(bb)) {
            let packed = &group[b * GROUP_ROWS * bb..(b + 1) * GROUP_ROWS * bb];
            o[..2].copy_from_slice(&packed[2 * r..2 * r + 2]);
            if kind.has_min() {
                o[2..4].copy_from_slice(&packed[32 + 2 * r..32 + 2 * r + 2]);
            }
            if kind == Kind::Q8_0 {
                // Values 4q..4q + 4 from run q, less the 128 added.
                for q in 0..8 {
                    let v = u32::from_le_bytes(
                        packed[at + 64 * q + 4 * r..][..4].try_into().expect("4"),
                    );
                    o[2 + 4 * q..6 + 4 * q].copy_from_slice(&(v ^ 0x8080_8080).to_le_bytes());
                }
                continue;
            }
            let mut qs = s;
            if kind.fifth_bit() {
                // The fifth bits of values 4q..4q + 4: bits 4r..4r + 4 of mask q.
                let mut qh = 0u32;
                for q in 0..8 {
                    let m = at + 256 + 8 * q;
                    let mask = u64::from_le_bytes(packed[m..m + 8].try_into().expect("8"));
                    qh |= (((mask >> (4 * r)) & 0xF) as u32) << (4 * q);
                }
                o[s..s + 4].copy_from_slice(&qh.to_le_bytes());
                qs += 4;
            }
            // Byte i of the stored nibbles holds values i and i + 16, as byte 4r + i % 4 of run
            // i / 4 does.
            for t in 0..4 {
                o[qs + 4 * t..qs + 4 * t + 4].copy_from_slice(&packed[at + 64 * t + 4 * r..][..4]);
            }
        }
    }

    /// Rows j0 .. j0 + `count`, blocks `blocks`, dequantized as candle's `to_float` dequantizes
    /// the stored blocks (to the bit): row c's values at `out[c·len..]`, len = 32 a block. Rows
    /// within one group are read straight from the interleaved runs; others are put back first.
    pub fn dequantize_rows(
        &self,
        j0: usize,
        count: usize,
        blocks: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let len = blocks.len() * QK;
        let bb = self.kind.block_bytes();
        let row_bytes = self.k / QK * bb;
        let whole = self.groups.len() / row_bytes;
        let (g, r0) = (j0 / GROUP_ROWS, j0 % GROUP_ROWS);
        if count == 0 || j0 + count > whole || r0 + count > GROUP_ROWS {
            let deq = crate::quant::Dequantizer::of(self.dtype).expect("a block type");
            let mut buf = vec![0u8; blocks.len() * bb];
            for (c, vals) in out.chunks_exact_mut(len).take(count).enumerate() {
                self.row_blocks(j0 + c, blocks.clone(), &mut buf);
                deq.to_f32(&buf, vals);
            }
            return;
        }
        let group = &self.groups[g * GROUP_ROWS * row_bytes..(g + 1) * GROUP_ROWS * row_bytes];
        let rows = r0..r0 + count;
        match self.kind {
            Kind::Q4_0 => dequantize_group::<0>(group, blocks, rows, out),
            Kind::Q4_1 => dequantize_group::<1>(group, blocks, rows, out),
            Kind::Q5_0 => dequantize_group::<2>(group, blocks, rows, out),
            Kind::Q5_1 => dequantize_group::<3>(group, blocks, rows, out),
            Kind::Q8_0 => dequantize_group::<4>(group, blocks, rows, out),
        }
    }

    /// Layers that read the same input, one above the other: one weight of all their rows, when
    /// they are all of one type and depth and every one but the last is whole groups of 16 rows.
    pub fn stacked(parts: &[&Interleaved]) -> Option<Interleaved> {
        let first = parts.first()?;
        let (last, before) = parts.split_last()?;
        if parts
            .iter()
            .any(|p| p.dtype != first.dtype || p.k != first.k)
            || before.iter().any(|p| !p.tail.is_empty())
        {
            return None;
        }
        let mut groups = Vec::with_capacity(parts.iter().map(|p| p.groups.len()).sum());
        for p in parts {
            groups.extend_from_slice(&p.groups);
        }
        Some(Interleaved {
            dtype: first.dtype,
            kind: first.kind,
            n: parts.iter().map(|p| p.n).sum(),
            k: first.k,
            groups,
            tail: last.tail.clone(),
        })
    }

    /// Rows of `xs` (each of k values) times the weightᵀ: the rows' outputs, n values each; `None`
    /// when `xs` is not whole rows. From [`crate::quant::TILE_MIN_ROWS`] rows where the CPU has
    /// AMX tiles, on the tiles ([`crate::quant::tiles_product`]: each task's blocks put back in
    /// the stored layout as it packs them); otherwise against 8-bit activations.
    pub fn product(&self, xs: &[f32]) -> Option<Vec<f32>> {
        if !xs.len().is_multiple_of(self.k) {
            return None;
        }
        let rows = crate::amx::QuantRows::Interleaved(self);
        let tiles = crate::quant::tiles_product(xs, rows, self.dtype, self.n, self.k);
        tiles.or_else(|| Some(self.dots(xs, xs.len() / self.k)))
    }

    /// The product against 8-bit activations, on the interleaved kernels (and the tail's rows
    /// on the per-row ones, [`crate::quant::eight_bit_product`]).
    fn dots(&self, xs: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let blocks = k / QK;
        let q = crate::quant::quantize_rows_q8_1(xs, k);
        let sums: Vec<i32> = q
            .iter()
            .map(|b| b.qs.iter().map(|&v| v as i32).sum())
            .collect();
        let acts: Vec<(&[Q8_1], &[i32])> = q
            .chunks_exact(blocks)
            .zip(sums.chunks_exact(blocks))
            .collect();
        let group_bytes = GROUP_ROWS * blocks * self.kind.block_bytes();
        let whole = self.groups.len() / group_bytes * GROUP_ROWS;
        let tile = |g0: usize, g1: usize, out: &mut [f32]| {
            // out: [m, (g1 - g0) · 16] row-major.
            let cols = (g1 - g0) * GROUP_ROWS;
            for g in g0..g1 {
                let w = &self.groups[g * group_bytes..(g + 1) * group_bytes];
                let mut i = 0;
                while i < m {
                    let r = (m - i).min(4);
                    let mut res = [[0f32; GROUP_ROWS]; 4];
                    kernels::group(self.kind, w, &acts[i..i + r], &mut res[..r]);
                    for (j, v) in res[..r].iter().enumerate() {
                        let at = (i + j) * cols + (g - g0) * GROUP_ROWS;
                        out[at..at + GROUP_ROWS].copy_from_slice(v);
                    }
                    i += r;
                }
            }
        };
        let per_task = GROUPS_PER_TASK * GROUP_ROWS;
        let y = crate::quant::column_tasks((m, whole, k), per_task, |t, out| {
            let g0 = t * GROUPS_PER_TASK;
            tile(g0, (g0 + GROUPS_PER_TASK).min(whole / GROUP_ROWS), out)
        });
        if whole == n {
            return y;
        }
        // The rows after the last whole group: their outputs after the groups'.
        let mut y: Vec<f32> = y
            .chunks_exact(whole)
            .flat_map(|row| {
                row.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0.0, n - whole))
            })
            .collect();
        let rest = n - whole;
        let part = crate::quant::eight_bit_product(xs, &self.tail, self.dtype, rest, k)
            .expect("the tail's type and sizes were checked when it was made");
        for i in 0..m {
            y[i * n + whole..(i + 1) * n].copy_from_slice(&part[i * rest..(i + 1) * rest]);
        }
        y
    }
}

/// The kind a constant names (in the kernels' order).
const fn kind_of(k: u8) -> Kind {
    match k {
        0 => Kind::Q4_0,
        1 => Kind::Q4_1,
        2 => Kind::Q5_0,
        3 => Kind::Q5_1,
        _ => Kind::Q8_0,
    }
}

/// [`Interleaved::dequantize_rows`] within one group (`group`: its bytes), rows `rows` of it.
fn dequantize_group<const K: u8>(
    group: &[u8],
    blocks: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let kind = kind_of(K);
    let bb = GROUP_ROWS * kind.block_bytes();
    let len = blocks.len() * QK;
    let at = if kind.has_min() { 64 } else { 32 };
    let f16 = |b: &[u8], i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    for (i, b) in blocks.enumerate() {
        let packed = &group[b * bb..(b + 1) * bb];
        for (c, r) in rows.clone().enumerate() {
            let d = f16(packed, 2 * r);
            let o = &mut out[c * len + i * QK..][..QK];
            if kind == Kind::Q8_0 {
                for q in 0..8 {
                    for p in 0..4 {
                        let v = (packed[at + 64 * q + 4 * r + p] ^ 0x80) as i8;
                        o[4 * q + p] = (v as f32) * d;
                    }
                }
                continue;
            }
            let m = if kind.has_min() {
                f16(packed, 32 + 2 * r)
            } else {
                0.0
            };
            let mut qh = 0u32;
            if kind.fifth_bit() {
                for q in 0..8 {
                    let at = at + 256 + 8 * q;
                    let mask = u64::from_le_bytes(packed[at..at + 8].try_into().expect("8"));
                    qh |= (((mask >> (4 * r)) & 0xF) as u32) << (4 * q);
                }
            }
            let off = kind.offset();
            for t in 0..4 {
                for p in 0..4 {
                    let v = 4 * t + p;
                    let byte = packed[at + 64 * t + 4 * r + p];
                    let lo = ((byte & 0x0F) as u32 | ((qh >> v) & 1) << 4) as i32 - off;
                    let hi = ((byte >> 4) as u32 | ((qh >> (v + 16)) & 1) << 4) as i32 - off;
                    // As candle's: (q as f32)·d, plus m for the types that have one.
                    if kind.has_min() {
                        o[v] = (lo as f32) * d + m;
                        o[v + 16] = (hi as f32) * d + m;
                    } else {
                        o[v] = (lo as f32) * d;
                        o[v + 16] = (hi as f32) * d;
                    }
                }
            }
        }
    }
}

/// Groups of 16 rows one parallel task multiplies (32 outputs, as `quant`'s tasks).
const GROUPS_PER_TASK: usize = 2;

#[cfg(target_arch = "x86_64")]
mod kernels {
    use super::{Kind, GROUP_ROWS};
    use crate::quant::{Q8_1, QK};
    use std::arch::x86_64::*;

    /// Weight bytes fetched ahead of the block being multiplied.
    const PREFETCH: usize = 4096;

    /// One group's 16 outputs for each of 1–4 activation rows (`acts`: each row's blocks and
    /// their sums of values), into `out` (one array per row).
    pub(super) fn group(kind: Kind, w: &[u8], acts: &[(&[Q8_1], &[i32])], out: &mut [[f32; 16]]) {
        assert!(
            super::available(),
            "the interleaved kernels need AVX-512 VNNI"
        );
        macro_rules! rows {
            ($k:literal) => {
                // SAFETY: `available` checked that the CPU has AVX-512 F, BW, VL and VNNI.
                unsafe {
                    match acts.len() {
                        1 => one::<$k, 1>(w, acts, out),
                        2 => one::<$k, 2>(w, acts, out),
                        3 => one::<$k, 3>(w, acts, out),
                        _ => one::<$k, 4>(w, acts, out),
                    }
                }
            };
        }
        match kind {
            Kind::Q4_0 => rows!(0),
            Kind::Q4_1 => rows!(1),
            Kind::Q5_0 => rows!(2),
            Kind::Q5_1 => rows!(3),
            Kind::Q8_0 => rows!(4),
        }
    }

    /// 4 activation bytes (values 4j..4j+4 of a block) in every 32-bit lane.
    #[target_feature(enable = "avx512f")]
    fn quad(y: &Q8_1, j: usize) -> __m512i {
        let q = &y.qs[4 * j..4 * j + 4];
        _mm512_set1_epi32(i32::from_le_bytes([
            q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8,
        ]))
    }

    /// 64 bytes of `b` from `at`.
    #[target_feature(enable = "avx512f")]
    fn load64(b: &[u8], at: usize) -> __m512i {
        let b = &b[at..at + 64];
        // SAFETY: `b` holds 64 bytes.
        unsafe { _mm512_loadu_si512(b.as_ptr() as *const __m512i) }
    }

    /// 16 f16 at `b[at..at + 32]`, widened.
    #[target_feature(enable = "avx512f")]
    fn halves16(b: &[u8], at: usize) -> __m512 {
        let b = &b[at..at + 32];
        // SAFETY: `b` holds 32 bytes.
        _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(b.as_ptr() as *const __m256i) })
    }

    /// The group's 16 outputs for `R` activation rows.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, VL and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn one<const K: u8, const R: usize>(
        w: &[u8],
        acts: &[(&[Q8_1], &[i32])],
        out: &mut [[f32; 16]],
    ) {
        let kind = super::kind_of(K);
        let bb = GROUP_ROWS * kind.block_bytes();
        let acts: [(&[Q8_1], &[i32]); R] = std::array::from_fn(|r| acts[r]);
        let blocks = acts
            .iter()
            .fold(w.len() / bb, |b, (x, s)| b.min(x.len()).min(s.len()));
        let at = if kind.has_min() { 64 } else { 32 };
        let m4 = _mm512_set1_epi8(0x0F);
        let sixteen = _mm512_set1_epi8(16);
        let mut acc = [_mm512_setzero_ps(); R];
        for (b, block) in w.chunks_exact(bb).take(blocks).enumerate() {
            crate::simd::prefetch(block.as_ptr().wrapping_add(PREFETCH));
            let mut even: [__m512i; R] =
                std::array::from_fn(|r| _mm512_set1_epi32(-kind.offset() * acts[r].1[b]));
            let mut odd = [_mm512_setzero_si512(); R];
            if kind == Kind::Q8_0 {
                for j in (0..8).step_by(2) {
                    let (v0, v1) = (load64(block, at + 64 * j), load64(block, at + 64 * j + 64));
                    for r in 0..R {
                        let y = &acts[r].0[b];
                        even[r] = _mm512_dpbusd_epi32(even[r], v0, quad(y, j));
                        odd[r] = _mm512_dpbusd_epi32(odd[r], v1, quad(y, j + 1));
                    }
                }
            } else {
                for t in 0..4 {
                    let v = load64(block, at + 64 * t);
                    let mut lo = _mm512_and_si512(v, m4);
                    let mut hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                    if kind.fifth_bit() {
                        let mask = |j: usize| {
                            let m = at + 256 + 8 * j;
                            u64::from_le_bytes(block[m..m + 8].try_into().expect("8 bytes"))
                        };
                        lo = _mm512_mask_add_epi8(lo, mask(t), lo, sixteen);
                        hi = _mm512_mask_add_epi8(hi, mask(t + 4), hi, sixteen);
                    }
                    for r in 0..R {
                        let y = &acts[r].0[b];
                        even[r] = _mm512_dpbusd_epi32(even[r], lo, quad(y, t));
                        odd[r] = _mm512_dpbusd_epi32(odd[r], hi, quad(y, t + 4));
                    }
                }
            }
            let d = halves16(block, 0);
            let mins = if kind.has_min() {
                halves16(block, 32)
            } else {
                _mm512_setzero_ps()
            };
            for r in 0..R {
                let y = &acts[r].0[b];
                let sums = _mm512_cvtepi32_ps(_mm512_add_epi32(even[r], odd[r]));
                acc[r] = _mm512_fmadd_ps(sums, _mm512_mul_ps(d, _mm512_set1_ps(y.d)), acc[r]);
                if kind.has_min() {
                    acc[r] = _mm512_fmadd_ps(mins, _mm512_set1_ps(y.s), acc[r]);
                }
            }
        }
        for r in 0..R {
            // SAFETY: `out[r]` holds 16 f32.
            unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
        }
    }

    const _: () = assert!(QK == 32 && GROUP_ROWS == 16);
}

#[cfg(not(target_arch = "x86_64"))]
mod kernels {
    use super::Kind;
    use crate::quant::Q8_1;

    pub(super) fn group(_: Kind, _: &[u8], _: &[(&[Q8_1], &[i32])], _: &mut [[f32; 16]]) {
        unreachable!("interleaved weights are made only where the kernels run")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amx::QuantRows;
    use candle_core::quantized::QTensor;
    use candle_core::Device;

    const TYPES: [GgmlDType; 5] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
    ];

    /// Weights [n, k] with an offset (so minimums matter), quantized by candle.
    fn weights(dtype: GgmlDType, n: usize, k: usize) -> Vec<u8> {
        let w = crate::testing::randn(0.3f32, 1.0, (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&w, dtype)
            .unwrap()
            .data()
            .unwrap()
            .to_vec()
    }

    /// m rows of k normal values.
    fn inputs(m: usize, k: usize) -> Vec<f32> {
        crate::testing::randn(0f32, 1.0, (m, k), &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Any bytes (scales that are NaN or infinite included) come back as they were: the layout
    /// only moves bits. 53 rows: three whole groups and a tail.
    #[test]
    fn original_blocks_come_back_bit_for_bit() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for dtype in TYPES {
            let (n, k) = (53, 96);
            let len = n * k / QK * Kind::of(dtype).unwrap().block_bytes();
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 24) as u8
                })
                .collect();
            let w = Interleaved::rearranged(&bytes, dtype, n, k).unwrap();
            assert_eq!(w.len(), bytes.len());
            assert_eq!(w.original(), bytes, "{dtype:?}");
            // Stacked: the parts' rows one above the other, as stored.
            let (a, b) = bytes.split_at(32 * k / QK * Kind::of(dtype).unwrap().block_bytes());
            let a = Interleaved::rearranged(a, dtype, 32, k).unwrap();
            let b = Interleaved::rearranged(b, dtype, n - 32, k).unwrap();
            let s = Interleaved::stacked(&[&a, &b]).unwrap();
            assert_eq!((s.dims(), s.original()), ((n, k), bytes.clone()));
            // A part with a tail cannot go above another.
            assert!(Interleaved::stacked(&[&b, &a]).is_none());
        }
        // Sizes that disagree, fewer than 16 rows, other types: not rearranged.
        let w = weights(GgmlDType::Q4_0, 16, 64);
        assert!(Interleaved::rearranged(&w, GgmlDType::Q4_0, 16, 64).is_some());
        assert!(Interleaved::rearranged(&w[1..], GgmlDType::Q4_0, 16, 64).is_none());
        assert!(Interleaved::rearranged(&w[..w.len() / 2], GgmlDType::Q4_0, 8, 64).is_none());
        assert!(Interleaved::rearranged(&w, GgmlDType::Q4K, 16, 64).is_none());
    }

    /// Rows dequantized straight from the interleaved runs equal candle's dequantization of the
    /// stored blocks, to the bit: rows within a group (from its start and inside it), rows of
    /// the tail and across groups (put back first), a range of blocks.
    #[test]
    fn rows_dequantize_as_candle_s() {
        for dtype in TYPES {
            let (n, k) = (53, 256);
            let bytes = weights(dtype, n, k);
            let w = Interleaved::rearranged(&bytes, dtype, n, k).unwrap();
            let deq = crate::quant::Dequantizer::of(dtype).unwrap();
            let row_bytes = bytes.len() / n;
            let bb = deq.block_bytes;
            for (j0, count, blocks) in [(0, 16, 0..8), (19, 5, 2..7), (30, 4, 1..3), (48, 5, 0..8)]
            {
                let len = blocks.len() * 32;
                let mut got = vec![f32::NAN; count * len];
                w.dequantize_rows(j0, count, blocks.clone(), &mut got);
                let mut want = vec![0f32; count * len];
                for (c, vals) in want.chunks_exact_mut(len).enumerate() {
                    let row = &bytes[(j0 + c) * row_bytes..];
                    deq.to_f32(&row[blocks.start * bb..blocks.end * bb], vals);
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{dtype:?} rows {j0}+{count}");
            }
        }
    }

    /// The interleaved kernels give the per-row 8-bit dot products' outputs (the same arithmetic)
    /// up to the order of f32 sums: 1–9 input rows (the kernels' 1–4-row passes, a serial product
    /// and the team's) and 19 (rayon's pool), whole groups and a tail of 5 rows.
    #[test]
    fn products_equal_the_per_row_dot_products() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI");
            return;
        }
        for dtype in TYPES {
            for (n, k) in [(53, 256), (96, 128)] {
                let bytes = weights(dtype, n, k);
                let w = Interleaved::new(&bytes, dtype, n, k).unwrap();
                for m in [1, 2, 3, 4, 5, 9, 19] {
                    let xs = inputs(m, k);
                    // The per-row 8-bit products whatever the rows (from 16, where the CPU has no
                    // AMX tiles, the interleaved ones take prompts too).
                    let want = crate::quant::eight_bit_product(&xs, &bytes, dtype, n, k).unwrap();
                    let got = w.dots(&xs, m);
                    let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - e).abs() <= 2e-5 * scale,
                            "{dtype:?} [{n}, {k}] m {m} output {i}: {g} against {e}"
                        );
                    }
                    assert_eq!(w.product(&xs).unwrap().len(), m * n);
                }
            }
        }
    }

    /// From 16 rows on AMX tiles, the product packs the tiles from the interleaved blocks put
    /// back per group of columns: the same values as from the stored blocks, to the bit (5 rows
    /// of tail, a depth of several packed depths); so does the input gradient's product g·W.
    #[test]
    fn tile_products_read_the_interleaved_blocks_as_stored() {
        if !available() || !crate::amx::available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI or AMX tiles");
            return;
        }
        for dtype in TYPES {
            let (n, k) = (69, 1024);
            let bytes = weights(dtype, n, k);
            let w = Interleaved::new(&bytes, dtype, n, k).unwrap();
            for m in [16, 21] {
                let xs = inputs(m, k);
                let want = crate::quant::ggml_product(&xs, &bytes, dtype, n, k).unwrap();
                assert_eq!(w.product(&xs).unwrap(), want, "{dtype:?} m {m}");
                // A frozen layer's input gradient: g [m, n] times the weight as stored.
                let g = &xs[..m * n];
                let (rows, stored) = (QuantRows::Interleaved(&w), QuantRows::Stored(&bytes));
                let want = crate::quant::ggml_product_nk(g, stored, dtype, n, k).unwrap();
                let got = crate::quant::ggml_product_nk(g, rows, dtype, n, k).unwrap();
                assert_eq!(got, want, "{dtype:?} m {m}, g·W");
            }
        }
    }
}
