//! Block-quantized weights with 16 rows interleaved, for decoding steps and prompts on CPUs with
//! AVX-512 VNNI, and on CPUs with AVX2 (the kernels of `avx2`, which read each run as two
//! halves, with AVX-VNNI's `vpdpbusd` where the CPU has it): a weight of one of GGML's 32-value
//! block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) or of the K-quants Q2_K to Q6_K (256-value
//! super-blocks) is rearranged once, when it is loaded,
//! so that the blocks of 16 rows at one depth lie together: their 16 scales side by side, then
//! their values 4 bytes per row at a time. One 64-byte load then holds 4 values of each of the
//! 16 rows, and one `vpdpbusd` multiplies them by the same 4 activation bytes (broadcast),
//! summing each row's products in its own lane: the 16 rows' dot products come out in one
//! vector, scaled by the 16 scales in one step. The weights' bytes are read as one stream, and a
//! block costs a sixteenth of the instructions of a per-row dot product. The arithmetic is
//! llama.cpp's (8-bit activations: [`crate::quant::quantize_q8_1`] for the 32-value types, Q8_K
//! super-blocks for the K-quants, with the same integer sums); only the order of the f32 sums
//! differs from [`crate::quant::ggml_product`]. Products of several rows (decoding rounds of
//! several streams; prompts where the CPU has no AMX tiles) decode each weight block once for up
//! to 8 rows ([`Kind::rows_a_pass`]), and what the K-quant kernels need of each activation
//! super-block's sums besides its bytes is computed once a product ([`block_terms`]).
//!
//! The rearranged weight takes exactly the bytes of the original, which it replaces; products of
//! [`crate::quant::TILE_MIN_ROWS`] rows or more on CPUs with AMX tiles (prompts) run on the tiles,
//! whose packers take each whole group's values straight from the runs (their 32-bit lanes are
//! already one row each: [`Interleaved::pack_lines`]) and the rows of a last, partial group put
//! back in the original layout, as is anything that needs the original blocks
//! ([`Interleaved::original`]).
//!
//! Layout, per group of 16 rows and block index (16 blocks' bytes in all; "runs" of 64 bytes
//! hold 4 bytes of each row, row r at bytes 4r..4r + 4):
//! - the 16 scales d (f16), then for Q4_1, Q5_1, Q4_K and Q5_K the 16 minimums m or dmin (f16);
//! - Q8_0: 8 runs; run j holds values 4j..4j+4 of each row, each plus 128 (as unsigned bytes);
//! - the 4- and 5-bit 32-value types: 4 runs; run t holds values 4t..4t+4 in the low nibbles and
//!   values 16+4t..16+4t+4 in the high ones (their low 4 bits); then for Q5_0 and Q5_1 8 masks of
//!   64 bits: bit 4r+p of mask j is the fifth bit of value 4j+p of row r;
//! - Q4_K and Q5_K: 3 runs of the 12 bytes of 6-bit scales and mins as stored, then 32 runs of
//!   the 128 bytes of nibbles as stored (run u: bytes 4u..4u + 4, whose low nibbles are values
//!   64(u / 8) + 4(u % 8).. of sub-block 2(u / 8), the high ones 32 values later, of the next
//!   sub-block); then for Q5_K 64 masks of 64 bits: bit 4r+p of mask 16c + 2t + h is the fifth
//!   bit of nibble h of byte 32c + 4t + p;
//! - Q6_K: 4 runs of the 16 signed 8-bit scales, 32 runs of the 128 bytes of low nibbles, 16
//!   runs of the 64 bytes of high bit pairs (each as stored);
//! - Q2_K: d, dmin, then 4 runs of the 16 bytes of 4-bit scales and mins, 16 runs of the 64
//!   bytes of 2-bit values (run u: bytes 4u .. 4u + 4, whose bits 2j are values 128(u / 8) + 32j
//!   + 4(u % 8) .. + 4);
//! - Q3_K: d, then 3 runs of the 12 bytes of 6-bit scales, 16 runs of the 64 bytes of low 2-bit
//!   values (as Q2_K's), then 64 masks of 64 bits: bit 4r+p of mask 4u + j is the third bit of
//!   the value at bits 2j of byte p of run u (bit 4(u / 8) + j of high-bit byte 4(u % 8) + p).
//!
//! Values stored with an offset (Q4_0's 8, Q5_0's 16, Q8_0's 128 added here, Q3_K's 4, Q6_K's 32) are
//! summed as stored, and the offset times the activations' sum is taken off in the integer sums.
//! The K-quants' sub-block scales multiply each sub-block's integer sums in i32 (`vpmulld`), and
//! Q2_K's, Q4_K's and Q5_K's minimums meet the activations' sums of each sub-block in `vpdpwssd`.

use crate::quant::{Q8_1, QK};
use crate::quant_dots::{Q8K, QK_K};
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
    Q4K,
    Q5K,
    Q6K,
    Q2K,
    Q3K,
}

/// Where a part of each stored block goes in a group's interleaved block (offsets in bytes).
#[derive(Clone, Copy)]
enum Seg {
    /// The f16 at `src`: the 16 rows' side by side at `dst`.
    Halves { src: usize, dst: usize },
    /// Bytes src .. src + len (a multiple of 4): run u, at dst + 64u, holds bytes 4u .. 4u + 4
    /// of each row (row r at 4r), each 32-bit word xor `flip`.
    Quads {
        src: usize,
        len: usize,
        dst: usize,
        flip: u32,
    },
    /// The fifth bits at `src`: `count` masks of 64 bits at `dst`, bits 4r .. 4r + 4 of mask j
    /// being row r's nibble j of [`Kind::fifth_nibbles`].
    Masks {
        src: usize,
        count: usize,
        dst: usize,
    },
}

impl Kind {
    fn of(dtype: GgmlDType) -> Option<Kind> {
        Some(match dtype {
            GgmlDType::Q4_0 => Kind::Q4_0,
            GgmlDType::Q4_1 => Kind::Q4_1,
            GgmlDType::Q5_0 => Kind::Q5_0,
            GgmlDType::Q5_1 => Kind::Q5_1,
            GgmlDType::Q8_0 => Kind::Q8_0,
            GgmlDType::Q4K => Kind::Q4K,
            GgmlDType::Q5K => Kind::Q5K,
            GgmlDType::Q6K => Kind::Q6K,
            GgmlDType::Q2K => Kind::Q2K,
            GgmlDType::Q3K => Kind::Q3K,
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
            Kind::Q4K => 144,
            Kind::Q5K => 176,
            Kind::Q6K => 210,
            Kind::Q2K => 84,
            Kind::Q3K => 110,
        }
    }

    /// Values per block: 32, or a K-quant super-block's 256.
    fn block_values(self) -> usize {
        if self.super_blocks() {
            QK_K
        } else {
            QK
        }
    }

    /// Whether blocks are K-quant super-blocks (multiplied against Q8_K activations).
    fn super_blocks(self) -> bool {
        matches!(
            self,
            Kind::Q2K | Kind::Q3K | Kind::Q4K | Kind::Q5K | Kind::Q6K
        )
    }

    /// Activation rows the kernels take a pass (each weight block decoded once for them): 8, or
    /// 4 for Q5_K and Q6_K (measured: 8 rows' sums did not fit the 32 registers of their kernels
    /// and ran 7–15% slower).
    fn rows_a_pass(self) -> usize {
        #[cfg(target_arch = "x86_64")]
        if !vnni() {
            return avx2::rows_a_pass(self);
        }
        if matches!(self, Kind::Q6K | Kind::Q5K) {
            4
        } else {
            MAX_ROWS
        }
    }

    /// The kind whose [`block_terms`] the kernels that run here take for this one.
    fn terms_kind(self) -> Kind {
        #[cfg(target_arch = "x86_64")]
        if !vnni() {
            return avx2::terms_kind(self);
        }
        self
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
            _ => 0,
        }
    }

    /// Where each part of a stored block goes (see the module's note).
    fn segments(self) -> &'static [Seg] {
        use Seg::*;
        macro_rules! quads {
            ($src:literal, $len:literal, $dst:literal) => {
                quads!($src, $len, $dst, 0)
            };
            ($src:literal, $len:literal, $dst:literal, $flip:literal) => {
                Quads {
                    src: $src,
                    len: $len,
                    dst: $dst,
                    flip: $flip,
                }
            };
        }
        macro_rules! masks {
            ($src:literal, $count:literal, $dst:literal) => {
                Masks {
                    src: $src,
                    count: $count,
                    dst: $dst,
                }
            };
        }
        const D: Seg = Halves { src: 0, dst: 0 };
        const M: Seg = Halves { src: 2, dst: 32 };
        match self {
            Kind::Q4_0 => &[D, quads!(2, 16, 32)],
            Kind::Q4_1 => &[D, M, quads!(4, 16, 64)],
            Kind::Q5_0 => &[D, quads!(6, 16, 32), masks!(2, 8, 288)],
            Kind::Q5_1 => &[D, M, quads!(8, 16, 64), masks!(4, 8, 320)],
            Kind::Q8_0 => &[D, quads!(2, 32, 32, 0x8080_8080)],
            Kind::Q4K => &[D, M, quads!(4, 12, 64), quads!(16, 128, 256)],
            Kind::Q5K => &[
                D,
                M,
                quads!(4, 12, 64),
                quads!(48, 128, 256),
                masks!(16, 64, 2304),
            ],
            Kind::Q6K => &[
                Halves { src: 208, dst: 0 },
                quads!(192, 16, 32),
                quads!(0, 128, 288),
                quads!(128, 64, 2336),
            ],
            Kind::Q2K => &[
                Halves { src: 80, dst: 0 },
                Halves { src: 82, dst: 32 },
                quads!(0, 16, 64),
                quads!(16, 64, 320),
            ],
            Kind::Q3K => &[
                Halves { src: 108, dst: 0 },
                quads!(96, 12, 32),
                quads!(32, 64, 224),
                masks!(0, 64, 1248),
            ],
        }
    }

    /// Which of Q5_K's (Q3_K's) masks holds bit b of its fifth-bit (high-bit) bytes 4t .. 4t + 4:
    /// Q5_K's 16c + 2t + h holds the fifth bits of the low (h = 0) or high (h = 1) nibbles of
    /// bytes 32c + 4t .. + 4 of its values, bit 2c + h; Q3_K's 4u + j (u = 8(b / 4) + t, j = b %
    /// 4) those of the values at bits 2j of run u, bit 4(u / 8) + j.
    fn mask_of(self, t: usize, b: usize) -> usize {
        if self == Kind::Q3K {
            32 * (b / 4) + 4 * t + b % 4
        } else {
            16 * (b / 2) + 2 * t + b % 2
        }
    }

    /// A block's fifth bits (`bits`; Q3_K's high bits) as the nibbles of its masks: bit p of
    /// nibble j goes to bit 4r + p of mask j. Q5_0's and Q5_1's nibble j is their 32-bit word's
    /// bits 4j..4j + 4 (values 4j..4j + 4); the K-quants' as [`Kind::mask_of`] says.
    fn fifth_nibbles(self, bits: &[u8], nibbles: &mut [u8]) {
        if !self.super_blocks() {
            let word = u32::from_le_bytes(bits[..4].try_into().expect("4 bytes"));
            for (j, n) in nibbles.iter_mut().take(8).enumerate() {
                *n = (word >> (4 * j)) as u8 & 0xF;
            }
            return;
        }
        for t in 0..8 {
            let word = u32::from_le_bytes(bits[4 * t..4 * t + 4].try_into().expect("4 bytes"));
            for b in 0..8 {
                // Bit b of each of the 4 bytes, gathered into bits 24..28 (no carries reach
                // them: the cross products land elsewhere, each on its own bit).
                let n = ((word >> b) & 0x0101_0101).wrapping_mul(0x0102_0408) >> 24;
                nibbles[self.mask_of(t, b)] = n as u8 & 0xF;
            }
        }
    }

    /// The inverse of [`Kind::fifth_nibbles`]: the fifth bits (`bits`, all written) from the
    /// masks' nibbles.
    fn fifth_bits(self, nibbles: &[u8], bits: &mut [u8]) {
        if !self.super_blocks() {
            let word = (0..8).fold(0u32, |w, j| w | (nibbles[j] as u32 & 0xF) << (4 * j));
            bits[..4].copy_from_slice(&word.to_le_bytes());
            return;
        }
        for t in 0..8 {
            let mut word = 0u32;
            for b in 0..8 {
                let n = nibbles[self.mask_of(t, b)] as u32 & 0xF;
                // Bit p of the nibble to bit 8p (each lands on its own bit, as above).
                word |= (n.wrapping_mul(0x0020_4081) & 0x0101_0101) << b;
            }
            bits[4 * t..4 * t + 4].copy_from_slice(&word.to_le_bytes());
        }
    }
}

/// A weight [n, k] of a GGML block type the layout holds, its whole groups of 16 rows interleaved
/// (see the module's note), the rows after the last whole group as stored.
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

/// The block types [`Interleaved::new`] rearranges (each GGUF type lmkit multiplies against
/// 8-bit activations).
pub const TYPES: [GgmlDType; 10] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// Whether this CPU multiplies interleaved weights: AVX-512 (F, BW, VL) with VNNI ([`vnni`]),
/// or AVX2 with FMA and F16C (the kernels of `avx2`), as far as `LMKIT_SIMD` allows.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::simd::simd_level() >= 1
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the products run on the AVX-512 VNNI kernels (AVX-512 F, BW, VL and VNNI, and
/// `LMKIT_SIMD` not capping the kernels below AVX-512); the AVX2 ones where not.
pub fn vnni() -> bool {
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
        let (bb, values) = (kind.block_bytes(), kind.block_values());
        if n < GROUP_ROWS
            || k == 0
            || !k.is_multiple_of(values)
            || bytes.len() != n * (k / values) * bb
        {
            return None;
        }
        let row_bytes = k / values * bb;
        let whole = n / GROUP_ROWS * GROUP_ROWS;
        let mut groups = vec![0u8; whole * row_bytes];
        let group_bytes = GROUP_ROWS * row_bytes;
        for (g, out) in groups.chunks_exact_mut(group_bytes).enumerate() {
            let rows = &bytes[g * group_bytes..(g + 1) * group_bytes];
            for (b, o) in out.chunks_exact_mut(GROUP_ROWS * bb).enumerate() {
                let blocks: [&[u8]; GROUP_ROWS] =
                    std::array::from_fn(|r| &rows[r * row_bytes + b * bb..][..bb]);
                for &seg in kind.segments() {
                    match seg {
                        Seg::Halves { src, dst } => {
                            for (r, h) in o[dst..dst + 32].chunks_exact_mut(2).enumerate() {
                                h.copy_from_slice(&blocks[r][src..src + 2]);
                            }
                        }
                        Seg::Quads {
                            src,
                            len,
                            dst,
                            flip,
                        } => {
                            // Run u: word u of each row, one run written after another.
                            let runs = o[dst..dst + 16 * len].chunks_exact_mut(64);
                            for (u, run) in runs.enumerate() {
                                for (w, block) in run.chunks_exact_mut(4).zip(&blocks) {
                                    let q = &block[src + 4 * u..src + 4 * u + 4];
                                    let v = u32::from_le_bytes(q.try_into().expect("4")) ^ flip;
                                    w.copy_from_slice(&v.to_le_bytes());
                                }
                            }
                        }
                        Seg::Masks { src, count, dst } => {
                            let mut masks = [0u64; 64];
                            let mut nibbles = [0u8; 64];
                            for (r, block) in blocks.iter().enumerate() {
                                kind.fifth_nibbles(&block[src..], &mut nibbles);
                                for (m, &n) in masks.iter_mut().zip(&nibbles[..count]) {
                                    *m |= (n as u64) << (4 * r);
                                }
                            }
                            let out = o[dst..dst + 8 * count].chunks_exact_mut(8);
                            for (m, mask) in out.zip(&masks) {
                                m.copy_from_slice(&mask.to_le_bytes());
                            }
                        }
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

    /// Bytes of one row's blocks.
    fn row_bytes(&self) -> usize {
        self.k / self.kind.block_values() * self.kind.block_bytes()
    }

    /// Rows in whole groups (interleaved; the rest are the tail).
    fn whole_rows(&self) -> usize {
        self.groups.len() / self.row_bytes()
    }

    /// The weight's blocks in the original layout (as the GGUF file stored them), bit for bit.
    pub fn original(&self) -> Vec<u8> {
        let blocks = self.k / self.kind.block_values();
        let mut out = vec![0u8; self.len()];
        for (j, row) in out.chunks_exact_mut(self.row_bytes()).enumerate() {
            self.row_blocks(j, 0..blocks, row);
        }
        out
    }

    /// Blocks `blocks` of row `j` in the original layout, into `out` (as many bytes).
    pub fn row_blocks(&self, j: usize, blocks: std::ops::Range<usize>, out: &mut [u8]) {
        let kind = self.kind;
        let bb = kind.block_bytes();
        let (row_bytes, whole) = (self.row_bytes(), self.whole_rows());
        let out = &mut out[..blocks.len() * bb];
        if j >= whole {
            let row = &self.tail[(j - whole) * row_bytes..(j - whole + 1) * row_bytes];
            out.copy_from_slice(&row[blocks.start * bb..blocks.end * bb]);
            return;
        }
        let (g, r) = (j / GROUP_ROWS, j % GROUP_ROWS);
        let group = &self.groups[g * GROUP_ROWS * row_bytes..(g + 1) * GROUP_ROWS * row_bytes];
        for (b, o) in blocks.zip(out.chunks_exact_mut(bb)) {
            let packed = &group[b * GROUP_ROWS * bb..(b + 1) * GROUP_ROWS * bb];
            for &seg in kind.segments() {
                match seg {
                    Seg::Halves { src, dst } => {
                        o[src..src + 2].copy_from_slice(&packed[dst + 2 * r..dst + 2 * r + 2])
                    }
                    Seg::Quads {
                        src,
                        len,
                        dst,
                        flip,
                    } => {
                        for (u, q) in o[src..src + len].chunks_exact_mut(4).enumerate() {
                            let v = &packed[dst + 64 * u + 4 * r..][..4];
                            let v = u32::from_le_bytes(v.try_into().expect("4")) ^ flip;
                            q.copy_from_slice(&v.to_le_bytes());
                        }
                    }
                    Seg::Masks { src, count, dst } => {
                        let mut nibbles = [0u8; 64];
                        for (j, n) in nibbles[..count].iter_mut().enumerate() {
                            let m = &packed[dst + 8 * j..dst + 8 * j + 8];
                            let mask = u64::from_le_bytes(m.try_into().expect("8"));
                            *n = (mask >> (4 * r)) as u8 & 0xF;
                        }
                        // count masks of 4 bits a row: count / 2 bytes of fifth bits.
                        kind.fifth_bits(&nibbles, &mut o[src..src + count / 2]);
                    }
                }
            }
        }
    }

    /// Rows j0 .. j0 + `count`, blocks `blocks`, dequantized as candle's `to_float` dequantizes
    /// the stored blocks (to the bit): row c's values at `out[c·len..]`, len = the values of
    /// `blocks`. A whole group of 16 rows is dequantized straight from the interleaved runs, 16
    /// rows a vector; other rows are put back first.
    pub fn dequantize_rows(
        &self,
        j0: usize,
        count: usize,
        blocks: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let len = blocks.len() * self.kind.block_values();
        if self.whole_group((j0, count), blocks.clone(), Sink::Rows(out, len)) {
            return;
        }
        let deq = crate::quant::Dequantizer::of(self.dtype).expect("a block type");
        let mut buf = vec![0u8; blocks.len() * self.kind.block_bytes()];
        for (c, vals) in out.chunks_exact_mut(len).take(count).enumerate() {
            self.row_blocks(j0 + c, blocks.clone(), &mut buf);
            deq.to_f32(&buf, vals);
        }
    }

    /// Rows j0 .. j0 + 16 (one whole group), blocks `blocks`, as the AMX tile packers lay out 16
    /// columns: line p (16 u32, one a row) holds each row's values 2p and 2p + 1 over the blocks'
    /// depth, rounded to bf16 (the first in the low half), straight from the interleaved runs,
    /// whose 32-bit lanes already hold one row each. Each value is dequantized as the tiles'
    /// packers of the stored blocks dequantize it, to the bit: Q4_1's d·q + m as one fused
    /// multiply-add and Q8_0's d·q (as `amx`'s packers), the other types as candle's `to_float`.
    /// `false`, with nothing written, for other rows (the caller puts them back or dequantizes
    /// them by [`Interleaved::dequantize_rows`]).
    pub(crate) fn pack_lines(
        &self,
        (j0, count): (usize, usize),
        blocks: std::ops::Range<usize>,
        out: &mut [u32],
    ) -> bool {
        self.whole_group((j0, count), blocks, Sink::Lines(out))
    }

    /// Rows j0 .. j0 + `count`, blocks `blocks`, into `sink` straight from the runs when they are
    /// one whole group and the sink holds all their values; `false`, with nothing written,
    /// otherwise.
    fn whole_group(
        &self,
        (j0, count): (usize, usize),
        blocks: std::ops::Range<usize>,
        sink: Sink,
    ) -> bool {
        let values = self.kind.block_values();
        let row = blocks.len() * values;
        // Room for the 16 rows' values: lines of two values a lane, or rows of `len` at least
        // `row` long.
        let room = match &sink {
            Sink::Lines(out) => out.len() >= GROUP_ROWS * row / 2,
            Sink::Rows(out, len) => *len >= row && out.len() >= GROUP_ROWS * len,
        };
        if !vnni()
            || count != GROUP_ROWS
            || !j0.is_multiple_of(GROUP_ROWS)
            || j0 + GROUP_ROWS > self.whole_rows()
            || blocks.end > self.k / values
            || !room
        {
            return false;
        }
        let group_bytes = GROUP_ROWS * self.row_bytes();
        let group = &self.groups[j0 / GROUP_ROWS * group_bytes..][..group_bytes];
        // SAFETY: `vnni` checked that the CPU has AVX-512 F and BW.
        unsafe { kernels::dequantize_group(self.kind, group, blocks, sink) };
        true
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
    /// AMX tiles, on the tiles ([`crate::quant::tiles_product`], packed by
    /// [`Interleaved::pack_lines`]); otherwise against 8-bit activations.
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
        let blocks = k / self.kind.block_values();
        let (q, sums, q_k, terms);
        let acts = if self.kind.super_blocks() {
            q_k = crate::quant_dots::quantize_rows_q8_k(xs, k);
            let of = self.kind.terms_kind();
            terms = q_k.iter().map(|y| block_terms(of, y)).collect::<Vec<_>>();
            Acts::Super(
                q_k.chunks_exact(blocks)
                    .zip(terms.chunks_exact(blocks))
                    .collect(),
            )
        } else {
            q = crate::quant::quantize_rows_q8_1(xs, k);
            sums = offset_sums(self.kind, &q);
            Acts::Small(
                q.chunks_exact(blocks)
                    .zip(sums.chunks_exact(blocks))
                    .collect(),
            )
        };
        let (group_bytes, whole) = (GROUP_ROWS * self.row_bytes(), self.whole_rows());
        let tile = |g0: usize, g1: usize, out: &mut [f32]| {
            // out: [m, (g1 - g0) · 16] row-major.
            let cols = (g1 - g0) * GROUP_ROWS;
            for g in g0..g1 {
                let w = &self.groups[g * group_bytes..(g + 1) * group_bytes];
                let mut i = 0;
                while i < m {
                    let r = (m - i).min(self.kind.rows_a_pass());
                    let mut res = [[0f32; GROUP_ROWS]; MAX_ROWS];
                    match &acts {
                        Acts::Small(a) => kernels::group(self.kind, w, &a[i..i + r], &mut res[..r]),
                        Acts::Super(a) => {
                            kernels::group_k(self.kind, w, &a[i..i + r], &mut res[..r])
                        }
                    }
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

/// Where a group's dequantized values go.
pub(crate) enum Sink<'a> {
    /// Tile lines (16 u32 a line: each row's two values of a depth pair, rounded to bf16).
    Lines(&'a mut [u32]),
    /// Rows of the given length, one after another.
    Rows(&'a mut [f32], usize),
}

/// Rows of activations quantized for a product: each row's blocks.
enum Acts<'a> {
    /// Q8_1 blocks (the 32-value types) and each block's sum of values times −(the weights'
    /// offset, [`Kind::offset`]).
    Small(Vec<(&'a [Q8_1], &'a [i32])>),
    /// Q8_K super-blocks (the K-quants) and each one's [`block_terms`].
    Super(Vec<(&'a [Q8K], &'a [[i32; 16]])>),
}

/// What a K-quant kernel needs of an activation super-block's sums of 16, computed once for
/// every group of weight rows it meets: Q4_K's and Q5_K's sums of each 32-value sub-block, Q2_K's
/// of each 16-value group, as [`kernels`]' `mins_dot` pairs them (words 2h and 2h + 1: the sums
/// of sub-blocks 4h, 4h + 2 and of 4h + 1, 4h + 3, 16 bits each); Q3_K's and Q6_K's sums of
/// each group times −4 and −32, their values' offsets.
fn block_terms(kind: Kind, y: &Q8K) -> [i32; 16] {
    let mut t = [0i32; 16];
    let mut sums = [0u32; 16];
    match kind {
        Kind::Q4K | Kind::Q5K => {
            for (j, s) in sums.iter_mut().take(8).enumerate() {
                *s = (y.bsums[2 * j] as i32 + y.bsums[2 * j + 1] as i32) as u16 as u32;
            }
        }
        Kind::Q2K => {
            for (s, &b) in sums.iter_mut().zip(&y.bsums) {
                *s = b as u16 as u32;
            }
        }
        Kind::Q3K | Kind::Q6K => {
            let offset = if kind == Kind::Q3K { -4 } else { -32 };
            for (t, &b) in t.iter_mut().zip(&y.bsums) {
                *t = offset * b as i32;
            }
            return t;
        }
        _ => return t,
    }
    let runs = if kind == Kind::Q2K { 4 } else { 2 };
    for h in 0..runs {
        let (a, c) = (4 * h, 4 * h + 1);
        t[2 * h] = (sums[a] | sums[a + 2] << 16) as i32;
        t[2 * h + 1] = (sums[c] | sums[c + 2] << 16) as i32;
    }
    t
}

/// Each Q8_1 block's sum of values times −(the weights' offset, [`Kind::offset`]): where the
/// 32-value kernels' integer sums start.
fn offset_sums(kind: Kind, q: &[Q8_1]) -> Vec<i32> {
    let offset = kind.offset();
    q.iter()
        .map(|b| -offset * b.qs.iter().map(|&v| v as i32).sum::<i32>())
        .collect()
}

/// The first `R` rows of a K-quant kernel's activations, as arrays: each row's Q8_K super-blocks
/// and their [`block_terms`], and the blocks all of them hold (at most `blocks`, the weight's).
#[allow(clippy::type_complexity)]
fn super_rows<'a, const R: usize>(
    acts: &[(&'a [Q8K], &'a [[i32; 16]])],
    blocks: usize,
) -> ([&'a [Q8K]; R], [&'a [[i32; 16]]; R], usize) {
    let terms: [&[[i32; 16]]; R] = std::array::from_fn(|r| acts[r].1);
    let rows: [&[Q8K]; R] = std::array::from_fn(|r| acts[r].0);
    let blocks = (rows.iter().zip(&terms)).fold(blocks, |b, (x, t)| b.min(x.len()).min(t.len()));
    (rows, terms, blocks)
}

/// The kind a constant names (in the kernels' order).
const fn kind_of(k: u8) -> Kind {
    match k {
        0 => Kind::Q4_0,
        1 => Kind::Q4_1,
        2 => Kind::Q5_0,
        3 => Kind::Q5_1,
        4 => Kind::Q8_0,
        5 => Kind::Q4K,
        6 => Kind::Q5K,
        _ => Kind::Q6K,
    }
}

/// The most activation rows the kernels take a pass ([`Kind::rows_a_pass`]).
const MAX_ROWS: usize = 8;

/// Groups of 16 rows one parallel task multiplies (32 outputs, as `quant`'s tasks).
const GROUPS_PER_TASK: usize = 2;

/// The `R`-row kernel `$f` (const arguments `$c` before `R`) for `$rows` rows: 1..=8
/// ([`MAX_ROWS`]), for both kernel sets.
#[cfg(target_arch = "x86_64")]
macro_rules! by_rows {
    ($f:ident, [$($c:expr),*], $rows:expr, $w:expr, $acts:expr, $out:expr) => {
        match $rows {
            1 => $f::<$($c,)* 1>($w, $acts, $out),
            2 => $f::<$($c,)* 2>($w, $acts, $out),
            3 => $f::<$($c,)* 3>($w, $acts, $out),
            4 => $f::<$($c,)* 4>($w, $acts, $out),
            5 => $f::<$($c,)* 5>($w, $acts, $out),
            6 => $f::<$($c,)* 6>($w, $acts, $out),
            7 => $f::<$($c,)* 7>($w, $acts, $out),
            _ => $f::<$($c,)* 8>($w, $acts, $out),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(target_arch = "x86_64")]
mod kernels {
    use super::{Kind, Sink, GROUP_ROWS};
    use crate::quant::{Q8_1, QK};
    use crate::quant_dots::Q8K;
    use std::arch::x86_64::*;

    /// Weight bytes fetched ahead of the block being multiplied.
    const PREFETCH: usize = 4096;

    /// Every line of the bytes `PREFETCH` after `block` (as long as `block`) fetched ahead: a
    /// group's block spans 5–53 lines, more than one prefetch a block and the hardware's (which
    /// stops at each page) keep ahead of.
    #[inline(always)]
    pub(super) fn prefetch_block(block: &[u8]) {
        let ahead = block.as_ptr().wrapping_add(PREFETCH);
        for line in (0..block.len()).step_by(64) {
            crate::simd::prefetch(ahead.wrapping_add(line));
        }
    }

    /// One group's 16 outputs for each of 1–8 activation rows (`acts`: each row's blocks and
    /// their sums of values times −the offset), into `out` (one array per row).
    pub(super) fn group(kind: Kind, w: &[u8], acts: &[(&[Q8_1], &[i32])], out: &mut [[f32; 16]]) {
        if !super::vnni() {
            return super::avx2::group(kind, w, acts, out);
        }
        macro_rules! rows {
            ($k:literal) => {
                // SAFETY: `vnni` checked that the CPU has AVX-512 F, BW, VL and VNNI.
                unsafe { by_rows!(one, [$k], acts.len(), w, acts, out) }
            };
        }
        match kind {
            Kind::Q4_0 => rows!(0),
            Kind::Q4_1 => rows!(1),
            Kind::Q5_0 => rows!(2),
            Kind::Q5_1 => rows!(3),
            Kind::Q8_0 => rows!(4),
            _ => unreachable!("{kind:?} takes Q8_K activations"),
        }
    }

    /// One group's 16 outputs of a K-quant type for each of 1–8 activation rows (`acts`: each
    /// row's Q8_K super-blocks and their [`super::block_terms`]), into `out` (one array per row).
    pub(super) fn group_k(
        kind: Kind,
        w: &[u8],
        acts: &[(&[Q8K], &[[i32; 16]])],
        out: &mut [[f32; 16]],
    ) {
        if !super::vnni() {
            return super::avx2::group_k(kind, w, acts, out);
        }
        macro_rules! rows {
            ($f:ident $(, $five:literal)?) => {
                // SAFETY: `vnni` checked that the CPU has AVX-512 F, BW, VL and VNNI.
                unsafe { by_rows!($f, [$($five)?], acts.len(), w, acts, out) }
            };
        }
        match kind {
            Kind::Q4K => rows!(q45_k, false),
            Kind::Q5K => rows!(q45_k, true),
            Kind::Q6K => rows!(q6_k),
            Kind::Q2K => rows!(q23_k, false),
            Kind::Q3K => rows!(q23_k, true),
            _ => unreachable!("{kind:?} takes Q8_1 activations"),
        }
    }

    /// Lane i of `v` shifted right by `bits`.
    #[target_feature(enable = "avx512f")]
    fn shift_right(v: __m512i, bits: usize) -> __m512i {
        _mm512_srl_epi32(v, _mm_cvtsi32_si128(bits as i32))
    }

    /// An i32 lane's byte `byte` (0..4), sign-extended.
    #[target_feature(enable = "avx512f")]
    fn signed_byte(v: __m512i, byte: usize) -> __m512i {
        _mm512_srai_epi32::<24>(_mm512_sll_epi32(
            v,
            _mm_cvtsi32_si128(8 * (3 - byte) as i32),
        ))
    }

    /// A Q4_K or Q5_K block's 6-bit scales and mins of sub-blocks 0..4 and 4..8, a byte each in
    /// each row's lane: (scales, mins). Each row's 12 bytes lie in 3 runs: bytes 0..4, 4..8 and
    /// 8..12.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn k4_scales(block: &[u8]) -> ([__m512i; 2], [__m512i; 2]) {
        let (m4, m6, m30) = (
            _mm512_set1_epi8(0x0F),
            _mm512_set1_epi8(63),
            _mm512_set1_epi8(0x30),
        );
        let (s0, s1, s2) = (load64(block, 64), load64(block, 128), load64(block, 192));
        let high = |v: __m512i, top: __m512i| {
            _mm512_or_si512(
                _mm512_and_si512(v, m4),
                _mm512_and_si512(_mm512_srli_epi16(top, 2), m30),
            )
        };
        let scales = [_mm512_and_si512(s0, m6), high(s2, s0)];
        let mins = [_mm512_and_si512(s1, m6), high(_mm512_srli_epi16(s2, 4), s1)];
        (scales, mins)
    }

    /// Sub-block j's byte of [`k4_scales`]' pair, in each row's lane.
    #[target_feature(enable = "avx512f")]
    fn k4_byte(v: [__m512i; 2], j: usize) -> __m512i {
        lane_byte(v[j / 4], j % 4)
    }

    /// Byte `byte` (0..4) of each 32-bit lane, zero-extended.
    #[target_feature(enable = "avx512f")]
    fn lane_byte(v: __m512i, byte: usize) -> __m512i {
        _mm512_and_si512(shift_right(v, 8 * byte), _mm512_set1_epi32(0xFF))
    }

    /// A block's minimums as `mins_dot` takes them: `mins[h]` holds each row's minimums 4h ..
    /// 4h + 4, a byte each; pair 2h their minimums 4h, 4h + 2 and pair 2h + 1 minimums 4h + 1,
    /// 4h + 3, as 16-bit pairs (the pairs after `2 · mins.len()` zero).
    #[target_feature(enable = "avx512f,avx512bw")]
    fn min_pairs(mins: &[__m512i]) -> [__m512i; 8] {
        let low_words = _mm512_set1_epi32(0x00FF_00FF);
        let mut pairs = [_mm512_setzero_si512(); 8];
        for (h, mn) in mins.iter().enumerate() {
            pairs[2 * h] = _mm512_and_si512(*mn, low_words);
            pairs[2 * h + 1] = _mm512_srli_epi16(*mn, 8);
        }
        pairs
    }

    /// Σ_j min_j·sums[j] in each row's lane, by `vpdpwssd` of the first `n` of [`min_pairs`]
    /// against the activations' sums of those sub-blocks (or groups) paired the same way
    /// ([`super::block_terms`]).
    #[target_feature(enable = "avx512f,avx512vnni")]
    fn mins_dot(pairs: &[__m512i; 8], n: usize, sums: &[i32; 16]) -> __m512i {
        let mut m = _mm512_setzero_si512();
        for (p, &s) in pairs.iter().zip(sums).take(n) {
            m = _mm512_dpwssd_epi32(m, *p, _mm512_set1_epi32(s));
        }
        m
    }

    /// Run 8c + t of a Q4_K (Q5_K: `FIVE`) block's values as bytes: [values 64c + 4t .. + 4
    /// of sub-block 2c, values 64c + 32 + 4t .. + 4 of sub-block 2c + 1] of each row, plus 16
    /// where a fifth bit is set.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn k4_values<const FIVE: bool>(block: &[u8], c: usize, t: usize) -> [__m512i; 2] {
        let m4 = _mm512_set1_epi8(0x0F);
        let v = load64(block, 256 + 64 * (8 * c + t));
        let mut lo = _mm512_and_si512(v, m4);
        let mut hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        if FIVE {
            let mask = |j: usize| {
                let m = 2304 + 8 * j;
                u64::from_le_bytes(block[m..m + 8].try_into().expect("8 bytes"))
            };
            let sixteen = _mm512_set1_epi8(16);
            lo = _mm512_mask_add_epi8(lo, mask(16 * c + 2 * t), lo, sixteen);
            hi = _mm512_mask_add_epi8(hi, mask(16 * c + 2 * t + 1), hi, sixteen);
        }
        [lo, hi]
    }

    /// A Q6_K block's unsigned 6-bit values 128h + 32q + 4t .. + 4 (q = 0..4) of each row, as
    /// bytes: low nibbles from the runs of half h's bytes 4t and 32 + 4t, bit pairs from its
    /// high bits' byte 4t.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn q6_values(block: &[u8], h: usize, t: usize) -> [__m512i; 4] {
        let (m4, m30) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
        let a = load64(block, 288 + 64 * (16 * h + t));
        let c = load64(block, 288 + 64 * (16 * h + 8 + t));
        let bits = load64(block, 2336 + 64 * (8 * h + t));
        let low = [a, c, _mm512_srli_epi16(a, 4), _mm512_srli_epi16(c, 4)];
        let pairs = [
            _mm512_slli_epi16(bits, 4),
            _mm512_slli_epi16(bits, 2),
            bits,
            _mm512_srli_epi16(bits, 2),
        ];
        let mut v = [_mm512_setzero_si512(); 4];
        for ((v, low), pair) in v.iter_mut().zip(low).zip(pairs) {
            // (low & 0x0F) | (pair & 0x30)
            *v = _mm512_ternarylogic_epi32::<0xF8>(_mm512_and_si512(pair, m30), low, m4);
        }
        v
    }

    /// A Q6_K block's signed scale of 16-value group g, in each row's lane.
    #[target_feature(enable = "avx512f")]
    fn q6_scale(block: &[u8], g: usize) -> __m512i {
        signed_byte(load64(block, 32 + 64 * (g / 4)), g % 4)
    }

    /// A Q2_K (Q3_K: `THREE`) block's scales, 4 groups' a run (group g at byte g % 4 of run
    /// g / 4): Q2_K's 4-bit scales and mins as stored (the scale in the low nibble); Q3_K's 6-bit
    /// scales (before their offset of 32) from its 3 runs of 12 packed bytes: the low nibbles of
    /// bytes 0..8 (groups 0..8), their high nibbles (8..16), the top bit pairs from bytes 8..12.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn k23_scales<const THREE: bool>(block: &[u8]) -> [__m512i; 4] {
        if !THREE {
            let mut runs = [_mm512_setzero_si512(); 4];
            for (q, run) in runs.iter_mut().enumerate() {
                *run = load64(block, 64 + 64 * q);
            }
            return runs;
        }
        let (m4, m30) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
        let (s0, s1, s2) = (load64(block, 32), load64(block, 96), load64(block, 160));
        let join = |low: __m512i, top: __m512i| {
            _mm512_or_si512(_mm512_and_si512(low, m4), _mm512_and_si512(top, m30))
        };
        [
            join(s0, _mm512_slli_epi16(s2, 4)),
            join(s1, _mm512_slli_epi16(s2, 2)),
            join(_mm512_srli_epi16(s0, 4), s2),
            join(_mm512_srli_epi16(s1, 4), _mm512_srli_epi16(s2, 2)),
        ]
    }

    /// Values 128n + 32j + 4(u % 8) .. + 4 of each row of a Q2_K (Q3_K: `THREE`) block, as
    /// unsigned bytes (Q3_K's 0..8, before its offset of 4): bits 2j of run u (`run`, u = 8n +
    /// ..), plus 4 where Q3_K's mask 4u + j has the value's bit.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn k23_values<const THREE: bool>(block: &[u8], run: __m512i, u: usize, j: usize) -> __m512i {
        let q = _mm512_and_si512(shift_right(run, 2 * j), _mm512_set1_epi8(3));
        if !THREE {
            return q;
        }
        let m = 1248 + 8 * (4 * u + j);
        let mask = u64::from_le_bytes(block[m..m + 8].try_into().expect("8 bytes"));
        _mm512_mask_add_epi8(q, mask, q, _mm512_set1_epi8(4))
    }

    /// Run u of a Q2_K or Q3_K block's 2-bit values.
    #[target_feature(enable = "avx512f")]
    fn k23_run<const THREE: bool>(block: &[u8], u: usize) -> __m512i {
        load64(block, if THREE { 224 } else { 320 } + 64 * u)
    }

    /// [`dequantize_group`] for one block of Q2_K or Q3_K (`THREE`; `d`: its 16 scales), its
    /// values at `first` of the depth.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn dequantize_block_23<const THREE: bool>(
        block: &[u8],
        d: __m512,
        sink: &mut Sink,
        first: usize,
    ) {
        let scales = k23_scales::<THREE>(block);
        let dmin = if THREE {
            _mm512_setzero_ps()
        } else {
            halves16(block, 32)
        };
        for u in 0..16 {
            let run = k23_run::<THREE>(block, u);
            for j in 0..4 {
                // Group 8n + 2j + s for run u = 8n + 4s + i.
                let g = 8 * (u / 8) + 2 * j + u % 8 / 4;
                let sc = lane_byte(scales[g / 4], g % 4);
                let (dl, ml) = if THREE {
                    let s = _mm512_sub_epi32(sc, _mm512_set1_epi32(32));
                    (_mm512_mul_ps(d, _mm512_cvtepi32_ps(s)), _mm512_setzero_ps())
                } else {
                    let s = _mm512_and_si512(sc, _mm512_set1_epi32(0x0F));
                    let m = _mm512_srli_epi32::<4>(sc);
                    (
                        _mm512_mul_ps(d, _mm512_cvtepi32_ps(s)),
                        _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(m)),
                    )
                };
                let v = k23_values::<THREE>(block, run, u, j);
                let offset = _mm512_set1_epi32(if THREE { 4 } else { 0 });
                let mut f = [_mm512_setzero_ps(); 4];
                for (p, f) in f.iter_mut().enumerate() {
                    let q = _mm512_cvtepi32_ps(_mm512_sub_epi32(lane_byte(v, p), offset));
                    *f = if THREE {
                        _mm512_mul_ps(dl, q)
                    } else {
                        _mm512_sub_ps(_mm512_mul_ps(dl, q), ml)
                    };
                }
                emit(sink, first + 128 * (u / 8) + 32 * j + 4 * (u % 8), f);
            }
        }
    }

    /// [`dequantize_group`] for one block of the 32-value types (`d`: its 16 scales), its values
    /// at `first` of the depth.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn dequantize_block_32(kind: Kind, block: &[u8], d: __m512, sink: &mut Sink, first: usize) {
        let at = if kind.has_min() { 64 } else { 32 };
        if kind == Kind::Q8_0 {
            // Run j: values 4j .. 4j + 4, stored plus 128.
            let offset = _mm512_set1_epi32(128);
            for j in 0..8 {
                let v = load64(block, at + 64 * j);
                let mut f = [_mm512_setzero_ps(); 4];
                for (p, f) in f.iter_mut().enumerate() {
                    let q = _mm512_sub_epi32(lane_byte(v, p), offset);
                    *f = _mm512_mul_ps(_mm512_cvtepi32_ps(q), d);
                }
                emit(sink, first + 4 * j, f);
            }
            return;
        }
        let m = if kind.has_min() {
            halves16(block, 32)
        } else {
            _mm512_setzero_ps()
        };
        let (m4, sixteen) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(16));
        let offset = _mm512_set1_epi32(kind.offset());
        for t in 0..4 {
            let v = load64(block, at + 64 * t);
            let mut halves = [
                _mm512_and_si512(v, m4),
                _mm512_and_si512(_mm512_srli_epi16(v, 4), m4),
            ];
            if kind.fifth_bit() {
                for (h, x) in halves.iter_mut().enumerate() {
                    let at = at + 256 + 8 * (t + 4 * h);
                    let mask = u64::from_le_bytes(block[at..at + 8].try_into().expect("8 bytes"));
                    *x = _mm512_mask_add_epi8(*x, mask, *x, sixteen);
                }
            }
            for (h, x) in halves.into_iter().enumerate() {
                let mut f = [_mm512_setzero_ps(); 4];
                for (p, f) in f.iter_mut().enumerate() {
                    let q = _mm512_cvtepi32_ps(_mm512_sub_epi32(lane_byte(x, p), offset));
                    *f = match kind {
                        Kind::Q4_1 => _mm512_fmadd_ps(q, d, m),
                        Kind::Q5_1 => _mm512_add_ps(_mm512_mul_ps(q, d), m),
                        _ => _mm512_mul_ps(q, d),
                    };
                }
                emit(sink, first + 16 * h + 4 * t, f);
            }
        }
    }

    /// Values at .. at + 4 of the blocks' depth, for each of the 16 rows (`f[p]`: value at + p
    /// in row r's lane), into `sink`: as tile lines, rounded to bf16 (lines at / 2 and
    /// at / 2 + 1, two values a lane), or as rows (4 values at `at` of each row's `len`).
    #[target_feature(enable = "avx512f,avx512bw")]
    fn emit(sink: &mut Sink, at: usize, f: [__m512; 4]) {
        match sink {
            Sink::Lines(lines) => {
                let r = [
                    crate::amx::round_bf16_bits(_mm512_castps_si512(f[0])),
                    crate::amx::round_bf16_bits(_mm512_castps_si512(f[1])),
                    crate::amx::round_bf16_bits(_mm512_castps_si512(f[2])),
                    crate::amx::round_bf16_bits(_mm512_castps_si512(f[3])),
                ];
                let pairs = [
                    _mm512_or_si512(r[0], _mm512_slli_epi32::<16>(r[1])),
                    _mm512_or_si512(r[2], _mm512_slli_epi32::<16>(r[3])),
                ];
                for (i, v) in pairs.into_iter().enumerate() {
                    let line = &mut lines[16 * (at / 2 + i)..][..16];
                    // SAFETY: `line` holds 16 u32.
                    unsafe { _mm512_storeu_si512(line.as_mut_ptr().cast(), v) };
                }
            }
            Sink::Rows(out, len) => {
                // A 4 × 16 transpose: in each 128-bit lane q, rows 4q .. 4q + 4 (u[i]: row
                // 4q + i's 4 values).
                let t0 = _mm512_unpacklo_ps(f[0], f[1]);
                let t1 = _mm512_unpackhi_ps(f[0], f[1]);
                let t2 = _mm512_unpacklo_ps(f[2], f[3]);
                let t3 = _mm512_unpackhi_ps(f[2], f[3]);
                let u = [
                    _mm512_shuffle_ps::<0x44>(t0, t2),
                    _mm512_shuffle_ps::<0xEE>(t0, t2),
                    _mm512_shuffle_ps::<0x44>(t1, t3),
                    _mm512_shuffle_ps::<0xEE>(t1, t3),
                ];
                let mut rows = [[0f32; 16]; 4];
                for (row, u) in rows.iter_mut().zip(u) {
                    // SAFETY: `row` holds 16 f32.
                    unsafe { _mm512_storeu_ps(row.as_mut_ptr(), u) };
                }
                for q in 0..4 {
                    for (i, row) in rows.iter().enumerate() {
                        let r = 4 * q + i;
                        out[r * *len + at..][..4].copy_from_slice(&row[4 * q..4 * q + 4]);
                    }
                }
            }
        }
    }

    /// The values of one group (`group`: its bytes), blocks `blocks`, into `sink` (see
    /// [`emit`]): each value as the tiles' packers of the stored blocks compute it (Q2_K, Q4_K
    /// and Q5_K: (d·scale)·q − dmin·min; Q3_K: (d·(scale − 32))·(q − 4); Q6_K: (d·scale)·(q −
    /// 32); Q4_1: d·q + m fused; Q5_1:
    /// q·d + m; the others q·d, q less the offset), which is also candle's `to_float` (Q4_1's
    /// q·d is exact in f32, so fused or not is the same).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn dequantize_group(
        kind: Kind,
        group: &[u8],
        blocks: std::ops::Range<usize>,
        mut sink: Sink,
    ) {
        let bb = GROUP_ROWS * kind.block_bytes();
        let values = kind.block_values();
        for (i, b) in blocks.enumerate() {
            let block = &group[b * bb..(b + 1) * bb];
            let d = halves16(block, 0);
            let at = i * values;
            match kind {
                Kind::Q2K => dequantize_block_23::<false>(block, d, &mut sink, at),
                Kind::Q3K => dequantize_block_23::<true>(block, d, &mut sink, at),
                _ if !kind.super_blocks() => dequantize_block_32(kind, block, d, &mut sink, at),
                _ => {}
            }
            if !matches!(kind, Kind::Q4K | Kind::Q5K | Kind::Q6K) {
                continue;
            }
            if kind == Kind::Q6K {
                let thirty_two = _mm512_set1_epi32(32);
                for h in 0..2 {
                    for t in 0..8 {
                        let v = q6_values(block, h, t);
                        for (q, v) in v.into_iter().enumerate() {
                            let scale = q6_scale(block, 8 * h + 2 * q + t / 4);
                            let ds = _mm512_mul_ps(d, _mm512_cvtepi32_ps(scale));
                            let mut f = [_mm512_setzero_ps(); 4];
                            for (p, f) in f.iter_mut().enumerate() {
                                let q = _mm512_sub_epi32(lane_byte(v, p), thirty_two);
                                *f = _mm512_mul_ps(ds, _mm512_cvtepi32_ps(q));
                            }
                            emit(&mut sink, at + 128 * h + 32 * q + 4 * t, f);
                        }
                    }
                }
                continue;
            }
            let dmin = halves16(block, 32);
            let (scales, mins) = k4_scales(block);
            for c in 0..4 {
                let mut d1 = [_mm512_setzero_ps(); 2];
                let mut m1 = [_mm512_setzero_ps(); 2];
                for h in 0..2 {
                    let j = 2 * c + h;
                    d1[h] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(k4_byte(scales, j)));
                    m1[h] = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(k4_byte(mins, j)));
                }
                for t in 0..8 {
                    let v = if kind == Kind::Q5K {
                        k4_values::<true>(block, c, t)
                    } else {
                        k4_values::<false>(block, c, t)
                    };
                    for (h, v) in v.into_iter().enumerate() {
                        let mut f = [_mm512_setzero_ps(); 4];
                        for (p, f) in f.iter_mut().enumerate() {
                            let q = _mm512_cvtepi32_ps(lane_byte(v, p));
                            *f = _mm512_sub_ps(_mm512_mul_ps(d1[h], q), m1[h]);
                        }
                        emit(&mut sink, at + 64 * c + 32 * h + 4 * t, f);
                    }
                }
            }
        }
    }

    /// Q4_K (and Q5_K, `FIVE`): per 32-value sub-block j, each row's integer dot products
    /// (`vpdpbusd` of the unsigned 4-bit values, plus 16 where a fifth bit is set) times its
    /// 6-bit scale (`vpmulld`), summed in i32; the mins' term Σ min_j·(the activations' sums of
    /// sub-block j) by `vpdpwssd` of the mins against the sums in 16-bit pairs; then
    /// d·y.d·sums − dmin·y.d·mins, as llama.cpp's.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, VL and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q45_k<const FIVE: bool, const R: usize>(
        w: &[u8],
        acts: &[(&[Q8K], &[[i32; 16]])],
        out: &mut [[f32; 16]],
    ) {
        let bb = GROUP_ROWS * if FIVE { 176 } else { 144 };
        let (acts, terms, blocks) = super::super_rows::<R>(acts, w.len() / bb);
        let mut acc = [_mm512_setzero_ps(); R];
        for (b, block) in w.chunks_exact(bb).take(blocks).enumerate() {
            prefetch_block(block);
            let (scales, mins) = k4_scales(block);
            let mut sums = [_mm512_setzero_si512(); R];
            for c in 0..4 {
                let mut lo_s = [_mm512_setzero_si512(); R];
                let mut hi_s = [_mm512_setzero_si512(); R];
                for t in 0..8 {
                    let [lo, hi] = k4_values::<FIVE>(block, c, t);
                    for r in 0..R {
                        let y = &acts[r][b].qs;
                        lo_s[r] = _mm512_dpbusd_epi32(lo_s[r], lo, quad_at(y, 64 * c + 4 * t));
                        hi_s[r] = _mm512_dpbusd_epi32(hi_s[r], hi, quad_at(y, 64 * c + 32 + 4 * t));
                    }
                }
                // Sub-blocks 2c and 2c + 1: byte 2c % 4 (and the next) of the scales' run.
                let (sl, sh) = (k4_byte(scales, 2 * c), k4_byte(scales, 2 * c + 1));
                for r in 0..R {
                    let p = _mm512_add_epi32(
                        _mm512_mullo_epi32(lo_s[r], sl),
                        _mm512_mullo_epi32(hi_s[r], sh),
                    );
                    sums[r] = _mm512_add_epi32(sums[r], p);
                }
            }
            let d = halves16(block, 0);
            let dmin = halves16(block, 32);
            let pairs = min_pairs(&mins);
            for r in 0..R {
                let y = &acts[r][b];
                let m = mins_dot(&pairs, 4, &terms[r][b]);
                let yd = _mm512_set1_ps(y.d);
                let s = _mm512_cvtepi32_ps(sums[r]);
                acc[r] = _mm512_fmadd_ps(s, _mm512_mul_ps(d, yd), acc[r]);
                acc[r] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(m), _mm512_mul_ps(dmin, yd), acc[r]);
            }
        }
        for r in 0..R {
            // SAFETY: `out[r]` holds 16 f32.
            unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
        }
    }

    /// Q6_K: per 16-value group g, each row's integer dot products (`vpdpbusd` of the unsigned
    /// 6-bit values, from −32·the activations' sum of the group: the offset) times its signed
    /// 8-bit scale (`vpmulld`), summed in i32; then d·y.d·sums, as llama.cpp's.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, VL and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q6_k<const R: usize>(
        w: &[u8],
        acts: &[(&[Q8K], &[[i32; 16]])],
        out: &mut [[f32; 16]],
    ) {
        let bb = GROUP_ROWS * 210;
        let (acts, terms, blocks) = super::super_rows::<R>(acts, w.len() / bb);
        let mut acc = [_mm512_setzero_ps(); R];
        for (b, block) in w.chunks_exact(bb).take(blocks).enumerate() {
            prefetch_block(block);
            let mut sums = [_mm512_setzero_si512(); R];
            for h in 0..2 {
                // Values 128h + 32q + 4t .. + 4 (q = 0..4) from the runs of low bits at
                // 4t and 32 + 4t of half h's 64 bytes and its high bit pairs at 4t; groups
                // 8h + 2q + t / 4: the first four t, then the next.
                for part in 0..2 {
                    // (Loops, not closures: closures here would not take the target features.)
                    let mut s = [[_mm512_setzero_si512(); 4]; R];
                    for (s, t) in s.iter_mut().zip(&terms) {
                        for (q, s) in s.iter_mut().enumerate() {
                            // −32·the group's activation sum.
                            *s = _mm512_set1_epi32(t[b][8 * h + 2 * q + part]);
                        }
                    }
                    for t in 4 * part..4 * part + 4 {
                        let v = q6_values(block, h, t);
                        for r in 0..R {
                            let y = &acts[r][b].qs;
                            for q in 0..4 {
                                let x = quad_at(y, 128 * h + 32 * q + 4 * t);
                                s[r][q] = _mm512_dpbusd_epi32(s[r][q], v[q], x);
                            }
                        }
                    }
                    let mut scales = [_mm512_setzero_si512(); 4];
                    for (q, sc) in scales.iter_mut().enumerate() {
                        *sc = q6_scale(block, 8 * h + 2 * q + part);
                    }
                    for (sum, s) in sums.iter_mut().zip(&s) {
                        for (s, sc) in s.iter().zip(&scales) {
                            *sum = _mm512_add_epi32(*sum, _mm512_mullo_epi32(*s, *sc));
                        }
                    }
                }
            }
            let d = halves16(block, 0);
            for r in 0..R {
                let yd = _mm512_set1_ps(acts[r][b].d);
                let s = _mm512_cvtepi32_ps(sums[r]);
                acc[r] = _mm512_fmadd_ps(s, _mm512_mul_ps(d, yd), acc[r]);
            }
        }
        for r in 0..R {
            // SAFETY: `out[r]` holds 16 f32.
            unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
        }
    }

    /// Q2_K (Q3_K: `THREE`): per 16-value group g, each row's integer dot products (`vpdpbusd`
    /// of the unsigned 2-bit values, Q3_K's 3-bit ones from −4·the activations' sum of the group:
    /// the offset) times its scale (Q3_K's less 32), two groups' at once by `vpdpwssd` of their
    /// sums as 16-bit pairs, summed in i32; Q2_K's mins' term Σ min_g·(the activations' sum of
    /// group g) by `vpdpwssd` of the mins against the sums in 16-bit pairs; then d·y.d·sums (−
    /// dmin·y.d·mins), as llama.cpp's.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, VL and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q23_k<const THREE: bool, const R: usize>(
        w: &[u8],
        acts: &[(&[Q8K], &[[i32; 16]])],
        out: &mut [[f32; 16]],
    ) {
        let bb = GROUP_ROWS * if THREE { 110 } else { 84 };
        let (acts, terms, blocks) = super::super_rows::<R>(acts, w.len() / bb);
        let m4 = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); R];
        for (b, block) in w.chunks_exact(bb).take(blocks).enumerate() {
            prefetch_block(block);
            let scales = k23_scales::<THREE>(block);
            let mut sums = [_mm512_setzero_si512(); R];
            for n in 0..2 {
                for s in 0..2 {
                    // Runs 8n + 4s .. + 4: values 128n + 32j + 16s .. + 16, group 8n + 2j + s.
                    // (Loops, not closures: closures here would not take the target features.)
                    let mut runs = [_mm512_setzero_si512(); 4];
                    for (i, run) in runs.iter_mut().enumerate() {
                        *run = k23_run::<THREE>(block, 8 * n + 4 * s + i);
                    }
                    // Groups g and g + 2 (j and j + 1) together: each one's dot products fit
                    // 16 bits (Q2_K |Σ| ≤ 16·3·127, Q3_K's with its offset ≤ 16·4·127), so
                    // both are scaled by one `vpdpwssd` of the pair against their scales'.
                    for jp in 0..2 {
                        let j = 2 * jp;
                        let g = 8 * n + 2 * j + s;
                        let mut a = [[_mm512_setzero_si512(); R]; 2];
                        if THREE {
                            for (h, a) in a.iter_mut().enumerate() {
                                for (a, t) in a.iter_mut().zip(&terms) {
                                    // −4·the group's activation sum.
                                    *a = _mm512_set1_epi32(t[b][g + 2 * h]);
                                }
                            }
                        }
                        for (i, &run) in runs.iter().enumerate() {
                            let u = 8 * n + 4 * s + i;
                            let v = [
                                k23_values::<THREE>(block, run, u, j),
                                k23_values::<THREE>(block, run, u, j + 1),
                            ];
                            for r in 0..R {
                                let y = &acts[r][b].qs;
                                let x =
                                    [quad_at(y, 16 * g + 4 * i), quad_at(y, 16 * g + 32 + 4 * i)];
                                a[0][r] = _mm512_dpbusd_epi32(a[0][r], v[0], x[0]);
                                a[1][r] = _mm512_dpbusd_epi32(a[1][r], v[1], x[1]);
                            }
                        }
                        // The two groups' scales as the low and high 16 bits of each lane.
                        let mut sc = [_mm512_setzero_si512(); 2];
                        for (h, sc) in sc.iter_mut().enumerate() {
                            let g = g + 2 * h;
                            let v = lane_byte(scales[g / 4], g % 4);
                            *sc = if THREE {
                                _mm512_sub_epi32(v, _mm512_set1_epi32(32))
                            } else {
                                _mm512_and_si512(v, _mm512_set1_epi32(0x0F))
                            };
                        }
                        let pair = _mm512_mask_blend_epi16(
                            0xAAAA_AAAA,
                            sc[0],
                            _mm512_slli_epi32::<16>(sc[1]),
                        );
                        for r in 0..R {
                            let both = _mm512_mask_blend_epi16(
                                0xAAAA_AAAA,
                                a[0][r],
                                _mm512_slli_epi32::<16>(a[1][r]),
                            );
                            sums[r] = _mm512_dpwssd_epi32(sums[r], both, pair);
                        }
                    }
                }
            }
            let d = halves16(block, 0);
            // Q2_K's mins (the scales' high nibbles) and dmin.
            let mut mins = [_mm512_setzero_si512(); 4];
            let mut dmin = _mm512_setzero_ps();
            if !THREE {
                for (m, sc) in mins.iter_mut().zip(scales) {
                    *m = _mm512_and_si512(_mm512_srli_epi16(sc, 4), m4);
                }
                dmin = halves16(block, 32);
            }
            let pairs = min_pairs(&mins);
            for r in 0..R {
                let y = &acts[r][b];
                let yd = _mm512_set1_ps(y.d);
                let s = _mm512_cvtepi32_ps(sums[r]);
                acc[r] = _mm512_fmadd_ps(s, _mm512_mul_ps(d, yd), acc[r]);
                if !THREE {
                    let m = mins_dot(&pairs, 8, &terms[r][b]);
                    acc[r] =
                        _mm512_fnmadd_ps(_mm512_cvtepi32_ps(m), _mm512_mul_ps(dmin, yd), acc[r]);
                }
            }
        }
        for r in 0..R {
            // SAFETY: `out[r]` holds 16 f32.
            unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
        }
    }

    /// 4 activation bytes (values 4j..4j+4 of a block) in every 32-bit lane.
    #[target_feature(enable = "avx512f")]
    fn quad(y: &Q8_1, j: usize) -> __m512i {
        quad_at(&y.qs, 4 * j)
    }

    /// Activation bytes at..at + 4 in every 32-bit lane.
    #[target_feature(enable = "avx512f")]
    fn quad_at(qs: &[i8], at: usize) -> __m512i {
        let q = &qs[at..at + 4];
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
            prefetch_block(block);
            // From −offset·the activations' sum (loops, not closures: see `q23_k`).
            let mut even = [_mm512_setzero_si512(); R];
            for (e, a) in even.iter_mut().zip(&acts) {
                *e = _mm512_set1_epi32(a.1[b]);
            }
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
    use super::{Kind, Sink};
    use crate::quant::Q8_1;

    pub(super) fn group(_: Kind, _: &[u8], _: &[(&[Q8_1], &[i32])], _: &mut [[f32; 16]]) {
        unreachable!("interleaved weights are made only where the kernels run")
    }

    pub(super) fn group_k(
        _: Kind,
        _: &[u8],
        _: &[(&[crate::quant_dots::Q8K], &[[i32; 16]])],
        _: &mut [[f32; 16]],
    ) {
        unreachable!("interleaved weights are made only where the kernels run")
    }

    pub(super) unsafe fn dequantize_group(_: Kind, _: &[u8], _: std::ops::Range<usize>, _: Sink) {
        unreachable!("interleaved weights are made only where the kernels run")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amx::QuantRows;
    use candle_core::quantized::QTensor;
    use candle_core::Device;

    /// A depth of `blocks` blocks of `dtype`.
    fn depth(dtype: GgmlDType, blocks: usize) -> usize {
        blocks * Kind::of(dtype).unwrap().block_values()
    }

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
            let (n, k) = (53, depth(dtype, 3));
            let len = n * 3 * Kind::of(dtype).unwrap().block_bytes();
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
            let (a, b) = bytes.split_at(32 * 3 * Kind::of(dtype).unwrap().block_bytes());
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
        assert!(Interleaved::rearranged(&w, GgmlDType::F16, 16, 64).is_none());
    }

    /// Rows dequantized from the interleaved layout equal candle's dequantization of the stored
    /// blocks, to the bit: whole groups (straight from the runs), rows inside a group, across
    /// groups and of the tail (put back first), ranges of blocks.
    #[test]
    fn rows_dequantize_as_candle_s() {
        for dtype in TYPES {
            let (n, k) = (53, depth(dtype, 8));
            let bytes = weights(dtype, n, k);
            let w = Interleaved::rearranged(&bytes, dtype, n, k).unwrap();
            let deq = crate::quant::Dequantizer::of(dtype).unwrap();
            let row_bytes = bytes.len() / n;
            let bb = deq.block_bytes;
            for (j0, count, blocks) in [
                (0, 16, 0..8),
                (32, 16, 3..7),
                (19, 5, 2..7),
                (30, 4, 1..3),
                (48, 5, 0..8),
            ] {
                let len = depth(dtype, blocks.len());
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
    /// up to the order of f32 sums: 1–9 input rows (the kernels' passes of 1–8 rows, 4 for Q5_K and
    /// Q6_K, a serial product and the team's) and 19 (rayon's pool), whole groups and a tail of 5
    /// rows.
    #[test]
    fn products_equal_the_per_row_dot_products() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX2 (or LMKIT_SIMD caps it)");
            return;
        }
        for dtype in TYPES {
            for (n, k) in [(53, depth(dtype, 2)), (96, depth(dtype, 4))] {
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

    /// The AVX2 kernels, with AVX-VNNI (where the CPU has it) and without, give the AVX-512 VNNI
    /// kernels' outputs to the bit (the same integer sums, the same f32 steps) for 1–8 activation
    /// rows: weights of normal values, and weights whose values are all at the top (or the
    /// bottom) of their range, their f16 scales 1, against rows whose 8-bit activations are all
    /// −128 (or −127), +127 or normal — the extremes of each kernel's sums in 16 bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernels_equal_the_avx512_ones() {
        if !vnni() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI (or LMKIT_SIMD caps it)");
            return;
        }
        let bits = |v: &[[f32; 16]]| {
            v.iter()
                .flatten()
                .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
                .collect::<Vec<_>>()
        };
        for dtype in TYPES {
            let kind = Kind::of(dtype).unwrap();
            let (n, k) = (16, depth(dtype, 3));
            let normal = weights(dtype, n, k);
            let mut patterns = vec![normal.clone()];
            for byte in [0xFF, 0x80] {
                // Every byte `byte`, but the f16 scales (and minimums) 1.
                let mut w = vec![byte; normal.len()];
                for block in w.chunks_exact_mut(kind.block_bytes()) {
                    for seg in kind.segments() {
                        if let Seg::Halves { src, .. } = *seg {
                            block[src..src + 2].copy_from_slice(&0x3C00u16.to_le_bytes());
                        }
                    }
                }
                patterns.push(w);
            }
            // The extremes first, then normal rows: 8 in all.
            let mut xs = vec![-1.0; k];
            xs.extend(std::iter::repeat_n(-1e-40, k));
            xs.extend(std::iter::repeat_n(1.0, k));
            xs.extend(inputs(MAX_ROWS - 3, k));
            let dps = [false, true];
            for (p, bytes) in patterns.iter().enumerate() {
                let w = Interleaved::rearranged(bytes, dtype, n, k).unwrap();
                let mut wide = [[0f32; 16]; MAX_ROWS];
                let mut narrow = [[0f32; 16]; MAX_ROWS];
                for (rows, dp) in (1..=MAX_ROWS).flat_map(|r| dps.map(|dp| (r, dp))) {
                    if dp && !avx2::has_avx_vnni() {
                        continue;
                    }
                    let xs = &xs[..rows * k];
                    if kind.super_blocks() {
                        let q = crate::quant_dots::quantize_rows_q8_k(xs, k);
                        let of = |kind| q.iter().map(|y| block_terms(kind, y)).collect::<Vec<_>>();
                        let (t_wide, t_narrow) = (of(kind), of(avx2::terms_kind(kind)));
                        let blocks = k / QK_K;
                        let a_wide: Vec<(&[Q8K], &[[i32; 16]])> = q
                            .chunks_exact(blocks)
                            .zip(t_wide.chunks_exact(blocks))
                            .collect();
                        let a_narrow: Vec<(&[Q8K], &[[i32; 16]])> = q
                            .chunks_exact(blocks)
                            .zip(t_narrow.chunks_exact(blocks))
                            .collect();
                        kernels::group_k(kind, &w.groups, &a_wide, &mut wide[..rows]);
                        let out = &mut narrow[..rows];
                        avx2::group_k_as(dp, kind, &w.groups, &a_narrow, out);
                    } else {
                        let q = crate::quant::quantize_rows_q8_1(xs, k);
                        let sums = offset_sums(kind, &q);
                        let blocks = k / QK;
                        let acts = q
                            .chunks_exact(blocks)
                            .zip(sums.chunks_exact(blocks))
                            .collect::<Vec<_>>();
                        kernels::group(kind, &w.groups, &acts, &mut wide[..rows]);
                        avx2::group_as(dp, kind, &w.groups, &acts, &mut narrow[..rows]);
                    }
                    assert_eq!(
                        bits(&narrow[..rows]),
                        bits(&wide[..rows]),
                        "{dtype:?} weights {p}, {rows} rows, AVX-VNNI {dp}"
                    );
                }
            }
        }
    }

    /// From 16 rows on AMX tiles, the product packs whole groups straight from the interleaved
    /// runs ([`Interleaved::pack_lines`]) and the tail's rows put back: the same values as from
    /// the stored blocks, to the bit, for every type (4 whole groups and 5 rows of tail, a depth
    /// of several packed depths); so does the input gradient's product g·W (rows put back).
    #[test]
    fn tile_products_read_the_interleaved_blocks_as_stored() {
        if !available() || !crate::amx::available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI or AMX tiles");
            return;
        }
        for dtype in TYPES {
            let (n, k) = (69, 2048);
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
