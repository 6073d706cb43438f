//! bf16 · bf16 products on Intel's AMX tiles (Sapphire Rapids on): `tdpbf16ps` multiplies a
//! 16 × 32 bf16 tile by a 32 × 16 one (stored as 16 rows of pairs) into a 16 × 16 f32 tile, a
//! whole block of a product per instruction. A model loaded in bf16 multiplies its prompts' rows
//! by its weights this way ([`product`]), and `train.dtype = "bf16"` its f32 products, each
//! operand rounded to bf16 as it is packed ([`product_f32`]). Each task packs its columns of the
//! second operand in the tiles' pair layout, 512 of the depth at a time, and passes every block of
//! 32 rows of the first by them, four f32 tiles (32 × 32 sums) held in the tile registers over
//! that depth; whole blocks of sums are loaded from and stored to the output where it lies. A bf16
//! model's prompts attend on the tiles too ([`causal_attention`]: q·kᵀ and p·v as tile products
//! over each key/value head packed once, the softmax between them in f32).
//!
//! The sums are f32, as the widened product's; the instruction treats subnormal bf16 inputs as
//! zero and adds each pair's products in its own order, so a sum may differ from the widened
//! one's in its last bits (the one rounding to bf16 after hides nearly all of that).
//!
//! What bounds the kernel (one core of a 2-core Sapphire Rapids Xeon, data in L1): four
//! `tdpbf16ps` back to back run at ≈ 3.5 TFLOP/s, but each step of the 2 × 2 blocking loads
//! four tiles (two of rows, two of pairs) for its four products, and with those loads it runs
//! at ≈ 1.5 TFLOP/s (two loads a step: ≈ 2.7); tile rows that straddle two cache lines cost
//! ≈ 1.7x more again, hence the buffers on 64-byte boundaries. Eight tile registers leave no
//! room for a larger blocking.

use half::bf16;
use std::mem::MaybeUninit;

/// Rows and columns of a block of sums (2 × 2 tiles of 16 × 16), and the depth of a tile.
const BLOCK: usize = 32;

/// The depth packed at a time: a task's packed columns (at most a few hundred, 1 KiB per column
/// here) stay in the core's cache however deep the product (a weight gradient's depth is the
/// batch's tokens).
const DEPTH: usize = 512;

/// 64 bytes at a 64-byte boundary: the unit of the tile inputs' buffers, so that each 64-byte
/// row a tile load reads is one cache line (loads of rows across two lines ran ~1.7x slower).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; 16]);

/// A buffer of u32 (pairs of bf16) on 64-byte boundaries: a task's packed columns.
#[derive(Default)]
struct Lines(Vec<Line>);

impl Lines {
    /// The first `len` values (a multiple of 16), the buffer grown with zeros to hold them; the
    /// values it held before are left as they were.
    fn u32s(&mut self, len: usize) -> &mut [u32] {
        debug_assert!(len.is_multiple_of(16));
        self.0
            .resize(len.div_ceil(16).max(self.0.len()), Line([0; 16]));
        // SAFETY: a Line is 16 u32 with no padding; the buffer holds at least len of them.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), len) }
    }

    fn as_ptr(&self) -> *const u32 {
        self.0.as_ptr().cast()
    }
}

/// The tile input's rows (bf16, whole blocks of 32 rows) on 64-byte boundaries, `ld` values
/// apart ([`row_stride`]).
struct Rows {
    lines: Box<[Line]>,
    ld: usize,
}

/// Values between the starts of the tile input's rows of `kp` values: kp, or one 64-byte line
/// more where kp·2 bytes is a multiple of 1 KiB. A tile load reads 16 rows at once, a block of
/// sums 32: rows 4 KiB apart (a depth of 2048) all fall in one set of the 12-way L1 cache, and
/// evict each other.
fn row_stride(kp: usize) -> usize {
    if kp.is_multiple_of(512) {
        kp + 32
    } else {
        kp
    }
}

impl Rows {
    /// Rows held (whole blocks of 32).
    fn count(&self) -> usize {
        self.lines.len() * 32 / self.ld
    }

    fn bf16s(&self) -> &[bf16] {
        // SAFETY: a Line is 32 bf16's bytes with no padding, every one initialised.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.lines.len() * 32) }
    }
}

/// Whether this CPU has AMX with bf16 and the kernel lets this process use its tile data
/// (asked once), lmkit's vector instructions are not capped below AVX-512 (`LMKIT_SIMD`), and
/// `LMKIT_AMX` does not turn the tiles off (`0` or `off`: to run as on an AVX-512 CPU without
/// them).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        crate::simd::simd_level() >= 2
            && *AMX.get_or_init(|| !turned_off(std::env::var("LMKIT_AMX").ok()) && x86::enable())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether an `LMKIT_AMX` value turns the tiles off: `0` or `off` (any case, spaces around).
pub(crate) fn turned_off(value: Option<String>) -> bool {
    value.is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "0" | "off"))
}

/// The f32 sums x [m, k] · w [n, k]ᵀ in rows of `n.next_multiple_of(32)` (the sums of the
/// padding columns zero), for m rows; `None` where [`available`] is false. Tasks of `width`
/// weight rows (a multiple of 32) over rayon's threads.
pub fn product(
    x: &[bf16],
    w: &[bf16],
    (m, n, k): (usize, usize, usize),
    width: usize,
) -> Option<Vec<f32>> {
    if !available()
        || m.checked_mul(k).is_none_or(|len| x.len() < len)
        || n.checked_mul(k).is_none_or(|len| w.len() < len)
        || !width.is_multiple_of(BLOCK)
        || m == 0
        || n == 0
        || k == 0
    {
        return None;
    }
    let kp = k.next_multiple_of(BLOCK);
    // x's rows padded with zeros to whole tiles: mp rows of kp values.
    let xa = padded_rows((m, k, kp), |i0, rows, ld| {
        for (i, row) in (i0..m).zip(rows.chunks_exact_mut(ld)) {
            for (o, &v) in row.iter_mut().zip(&x[i * k..][..k]) {
                o.write(v);
            }
        }
    });
    let (mp, np) = (xa.count(), n.next_multiple_of(BLOCK));
    // Not zeroed first: the product writes every sum.
    let mut sums = Vec::with_capacity(mp * np);
    // SAFETY: `sums` has room for mp rows of np values (every block whole); `run` over all mp
    // rows and np columns, not accumulating, writes each of them before the length covers them.
    unsafe {
        run(
            &xa,
            (mp, np, kp),
            width,
            (sums.as_mut_ptr(), np),
            false,
            |cols, depth, packed| pack(w, (n, k), cols, depth, packed),
        );
        sums.set_len(mp * np);
    }
    Some(sums)
}

/// x [m, k] (f32, rows whole) times a block-quantized weight w [n, k] (`ty`'s blocks, row-major)ᵀ
/// on the tiles: [m, n]. Each input value is rounded to bf16, each weight value dequantized in
/// f32 (Q4_1's d·q + m as one fused multiply-add, Q8_0's d·q) and rounded to bf16, and the sums
/// are f32. `None` where [`available`] is false or the sizes disagree (k a multiple of 32, x m
/// rows of k, w n rows of k/32 blocks).
pub fn quant_product(
    x: &[f32],
    w: QuantRows,
    ty: crate::quant::QType,
    (m, n, k): (usize, usize, usize),
) -> Option<Vec<f32>> {
    if !quant_fits(
        (crate::quant::QK, ty.block_bytes()),
        w.len(),
        (m, n, k),
        (x.len(), k),
    ) {
        return None;
    }
    // SAFETY: `available` was checked.
    Some(unsafe {
        rounded_product(x, (m, n, k), |cols, depth, packed| {
            pack_quant(w, ty, (n, k), cols, depth, packed)
        })
    })
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::round as round_bf16_bits;

/// A block-quantized weight's rows as the tile products read them.
#[derive(Clone, Copy)]
pub enum QuantRows<'a> {
    /// The blocks as stored, row after row.
    Stored(&'a [u8]),
    /// Rows interleaved in groups of 16 ([`crate::interleaved`]): each group of columns' blocks
    /// over a packed depth are put back in the stored layout as they are packed.
    Interleaved(&'a crate::interleaved::Interleaved),
}

impl QuantRows<'_> {
    fn len(&self) -> usize {
        match self {
            QuantRows::Stored(w) => w.len(),
            QuantRows::Interleaved(w) => w.len(),
        }
    }

    /// Blocks `blocks` of row `j` (`bytes` a block, rows of `row_bytes`) in the stored layout:
    /// where they are stored so, in place; otherwise put back into `buf`.
    fn row<'s>(
        &'s self,
        j: usize,
        blocks: std::ops::Range<usize>,
        (row_bytes, bytes): (usize, usize),
        buf: &'s mut Vec<u8>,
    ) -> &'s [u8] {
        let len = blocks.len() * bytes;
        match self {
            QuantRows::Stored(w) => &w[j * row_bytes + blocks.start * bytes..][..len],
            QuantRows::Interleaved(w) => {
                buf.resize(len, 0);
                w.row_blocks(j, blocks, buf);
                buf
            }
        }
    }

    /// `f` of rows j0 .. j0 + `count` (at most 16; the rest empty): blocks `blocks` of each
    /// (`bytes` a block, rows of `row_bytes`), in the stored layout.
    fn with_rows<R>(
        &self,
        (j0, count): (usize, usize),
        blocks: std::ops::Range<usize>,
        (row_bytes, bytes): (usize, usize),
        f: impl FnOnce(&[&[u8]; 16]) -> R,
    ) -> R {
        let len = blocks.len() * bytes;
        // Where row c's blocks start, and the rows' stride: in place, or in a copy put back.
        let scratch: Vec<u8>;
        let (data, at, stride) = match self {
            QuantRows::Stored(w) => (*w, j0 * row_bytes + blocks.start * bytes, row_bytes),
            QuantRows::Interleaved(w) => {
                let mut rows = vec![0u8; count * len];
                for (c, row) in rows.chunks_exact_mut(len.max(1)).enumerate().take(count) {
                    w.row_blocks(j0 + c, blocks.clone(), row);
                }
                scratch = rows;
                (&scratch[..], 0, len)
            }
        };
        f(&std::array::from_fn(|c| {
            if c < count {
                &data[at + c * stride..][..len]
            } else {
                &[][..]
            }
        }))
    }
}

/// Whether the tiles are there and the sizes agree for a product with the block-quantized w
/// [n, k] (blocks of `values` values in `bytes` bytes; k whole blocks and whole tiles, a packed
/// depth whole blocks): an input of `len` values, m rows of `row`.
fn quant_fits(
    (values, bytes): (usize, usize),
    w: usize,
    (m, n, k): (usize, usize, usize),
    (len, row): (usize, usize),
) -> bool {
    available()
        && m > 0
        && n > 0
        && k > 0
        && values > 0
        && k.is_multiple_of(values)
        && k.is_multiple_of(BLOCK)
        && DEPTH.is_multiple_of(values)
        && m.checked_mul(row) == Some(len)
        && n.checked_mul(k / values * bytes) == Some(w)
}

/// The f32 rows `x` (m of `depth` values) rounded to bf16 times the `cols` columns `pack`
/// packs, on the tiles: a new [m, cols]. The rows are padded with zeros to whole tiles (their
/// depth to a multiple of 32), which `pack` packs zeros against past `depth`.
///
/// # Safety
/// [`available`] is true.
unsafe fn rounded_product(
    x: &[f32],
    (m, cols, depth): (usize, usize, usize),
    pack: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>, &mut Lines) + Sync,
) -> Vec<f32> {
    let dp = depth.next_multiple_of(BLOCK);
    let xa = padded_rows((m, depth, dp), |i0, rows, ld| {
        for (i, row) in (i0..m).zip(rows.chunks_exact_mut(ld)) {
            crate::half_weights::narrow_bf16_into(&x[i * depth..][..depth], &mut row[..depth]);
        }
    });
    let mut out = Vec::with_capacity(m * cols);
    // SAFETY: the caller's `available`; `out` has room for m rows of `cols` values, and `run`,
    // not accumulating, writes each of them before the length covers them.
    unsafe {
        run(
            &xa,
            (m, cols, dp),
            task_width(cols),
            (out.as_mut_ptr(), cols),
            false,
            pack,
        );
        out.set_len(m * cols);
    }
    out
}

/// g [m, n] (f32, rows whole) times a block-quantized weight w [n, k] (`ty`'s blocks, row-major)
/// on the tiles: [m, k] — the input gradient of a frozen quantized layer. Rounded and summed as
/// [`quant_product`]. `None` where [`available`] is false or the sizes disagree.
pub fn quant_product_nk(
    g: &[f32],
    w: QuantRows,
    ty: crate::quant::QType,
    (m, n, k): (usize, usize, usize),
) -> Option<Vec<f32>> {
    if !quant_fits(
        (crate::quant::QK, ty.block_bytes()),
        w.len(),
        (m, n, k),
        (g.len(), n),
    ) {
        return None;
    }
    // The depth is w's rows.
    // SAFETY: `available` was checked.
    Some(unsafe {
        rounded_product(g, (m, k, n), |cols, depth, packed| {
            pack_quant_nk(w, ty, (n, k), cols, depth, packed)
        })
    })
}

/// x [m, k] (f32, rows whole) times a weight w [n, k] of any block-quantized GGML type (its
/// blocks, row-major; `deq` its dequantization)ᵀ on the tiles: [m, n]. Each weight row's values
/// over a packed depth are dequantized by `deq` into f32, then rounded to bf16 as the inputs
/// are; the sums are f32. `None` where [`available`] is false or the sizes disagree (k whole
/// blocks, x m rows of k, w n rows).
pub fn dequant_product(
    x: &[f32],
    w: QuantRows,
    deq: &crate::quant::Dequantizer,
    (m, n, k): (usize, usize, usize),
) -> Option<Vec<f32>> {
    let (values, bytes) = (deq.block_values, deq.block_bytes);
    if !quant_fits((values, bytes), w.len(), (m, n, k), (x.len(), k)) {
        return None;
    }
    let row_bytes = k / values * bytes;
    let pack = |cols: std::ops::Range<usize>, depth: std::ops::Range<usize>, packed: &mut Lines| {
        let pairs = depth.len() / 2;
        let out = packed.u32s(cols.len() * pairs);
        // The depth's blocks (DEPTH and k being whole blocks, so is the depth).
        let blocks = depth.start / values..depth.end / values;
        let mut scratch = vec![0f32; 16 * depth.len()];
        for (g, group) in out.chunks_exact_mut(16 * pairs).enumerate() {
            let j0 = cols.start + g * 16;
            let count = n.saturating_sub(j0).min(16);
            // An interleaved weight's whole groups straight into the lines.
            if let QuantRows::Interleaved(w) = w {
                if w.pack_lines((j0, count), blocks.clone(), group) {
                    continue;
                }
            }
            w.with_rows((j0, count), blocks.clone(), (row_bytes, bytes), |rows| {
                for (vals, row) in scratch.chunks_exact_mut(depth.len()).zip(&rows[..count]) {
                    deq.to_f32(row, vals);
                }
            });
            // SAFETY: the tiles being there (checked above), so is AVX-512; `count` columns of
            // the depth's values, and the group depth / 2 pairs of 16 columns.
            unsafe { pack_f32_columns(&scratch, (depth.len(), count), group) };
        }
    };
    // SAFETY: `available` was checked.
    Some(unsafe { rounded_product(x, (m, n, k), pack) })
}

/// g [m, n] (f32, rows whole) times a weight w [n, k] of any block-quantized GGML type (its
/// blocks, row-major; `deq` its dequantization) as it is stored, on the tiles: [m, k] — a frozen
/// quantized layer's input gradient. For each packed depth (w's rows), the blocks of those rows
/// under a task's columns are dequantized by `deq` into f32, then rounded to bf16 as g is; the
/// sums are f32. `None` where [`available`] is false or the sizes disagree.
pub fn dequant_product_nk(
    g: &[f32],
    w: QuantRows,
    deq: &crate::quant::Dequantizer,
    (m, n, k): (usize, usize, usize),
) -> Option<Vec<f32>> {
    let (values, bytes) = (deq.block_values, deq.block_bytes);
    if !quant_fits((values, bytes), w.len(), (m, n, k), (g.len(), n)) {
        return None;
    }
    let row_bytes = k / values * bytes;
    let pack = |cols: std::ops::Range<usize>, depth: std::ops::Range<usize>, packed: &mut Lines| {
        let pairs = depth.len() / 2;
        let out = packed.u32s(cols.len() * pairs);
        // The blocks of each weight row under the columns, dequantized: depth.len() rows of
        // `span` values (zero past w's last row).
        let (b0, b1) = (cols.start / values, cols.end.min(k).div_ceil(values));
        let span = b1.saturating_sub(b0) * values;
        let mut rows_f32 = vec![0f32; depth.len() * span];
        if span > 0 {
            let mut buf = Vec::new();
            // 16 rows at a time: an interleaved weight's whole groups straight from its runs.
            for (c, rows) in rows_f32.chunks_mut(16 * span).enumerate() {
                let d0 = depth.start + 16 * c;
                let count = (rows.len() / span).min(n.saturating_sub(d0));
                match w {
                    QuantRows::Interleaved(w) => w.dequantize_rows(d0, count, b0..b1, rows),
                    QuantRows::Stored(_) => {
                        for (d, row) in (d0..d0 + count).zip(rows.chunks_exact_mut(span)) {
                            deq.to_f32(w.row(d, b0..b1, (row_bytes, bytes), &mut buf), row)
                        }
                    }
                }
            }
        }
        // Each output column's values over the depth: a column of those rows.
        let mut columns = vec![0f32; 16 * depth.len()];
        for (gi, group) in out.chunks_exact_mut(16 * pairs).enumerate() {
            let j0 = cols.start + gi * 16;
            let count = k.saturating_sub(j0).min(16);
            for (c, col) in columns
                .chunks_exact_mut(depth.len())
                .take(count)
                .enumerate()
            {
                let j = j0 + c - b0 * values;
                for (v, row) in col.iter_mut().zip(rows_f32.chunks_exact(span)) {
                    *v = row[j];
                }
            }
            // SAFETY: as in `dequant_product`.
            unsafe { pack_f32_columns(&columns, (depth.len(), count), group) };
        }
    };
    // The depth is w's rows.
    // SAFETY: `available` was checked.
    Some(unsafe { rounded_product(g, (m, k, n), pack) })
}

/// Packs the first `count` of 16 columns' f32 values over a depth (`len` each, one column after
/// another in `columns`; the rest padding) into `group`, their bf16 pairs.
///
/// # Safety
/// AVX-512 (F, BW) is there (as it is wherever the tiles are); `columns` holds `count` × `len`
/// values and `group` `len` / 2 pairs of 16 columns.
unsafe fn pack_f32_columns(columns: &[f32], (len, count): (usize, usize), group: &mut [u32]) {
    let rows: [&[f32]; 16] = std::array::from_fn(|c| {
        if c < count {
            &columns[c * len..][..len]
        } else {
            &[][..]
        }
    });
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's: AVX-512, each row the depth's values or empty.
    unsafe {
        x86::pack_f32_group(&rows, group)
    };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!(
        "AMX tiles on another architecture: {:?}",
        (group.len(), rows.len())
    );
}

/// Weight rows (output columns) per task for a product of `n` of them: whole blocks of 32, as
/// many tasks as a multiple of rayon's threads, about 128 columns each or fewer (a task's
/// packed columns stay in the core's cache while every block of input rows reads them).
pub fn task_width(n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let ld = n.next_multiple_of(BLOCK);
    let tasks = ld.div_ceil(128 * threads) * threads;
    ld.div_ceil(tasks).next_multiple_of(BLOCK)
}

/// C [m×n] (rows `ldc` apart) = op(A)[m×k] · op(B)[k×n], plus C's previous contents when
/// `accumulate`, from f32 operands rounded to bf16 (to nearest, ties to even) with f32 sums:
/// the mixed-precision product of `train.dtype = "bf16"`. False (C untouched) where
/// [`available`] is false or m, n or k is zero.
///
/// # Safety
/// The operands must hold op(A) and op(B) with their leading dimensions; `c` must be valid for
/// writes of the m rows of n values, row i at `c + i·ldc` (initialised when accumulating), and
/// not overlap the operands.
pub unsafe fn product_f32(
    (m, n, k): (usize, usize, usize),
    a: &crate::blas::Operand<f32>,
    b: &crate::blas::Operand<f32>,
    (c, ldc): (*mut f32, usize),
    accumulate: bool,
) -> bool {
    if !available() || m == 0 || n == 0 || k == 0 {
        return false;
    }
    let kp = k.next_multiple_of(BLOCK);
    // op(A)'s m rows rounded and padded with zeros to whole tiles.
    let xa = if a.trans {
        // A stored [k, m]: each block of 32 rows of `xa` from A's columns i0 .. i0 + 32,
        // transposed 32 × 32 values at a time in the cache.
        padded_rows((m, k, kp), |i0, rows, ld| {
            transpose_rows(a, (i0, m, k, ld), rows)
        })
    } else {
        padded_rows((m, k, kp), |i0, rows, ld| {
            for (i, row) in (i0..m).zip(rows.chunks_exact_mut(ld)) {
                crate::half_weights::narrow_bf16_into(&a.data[i * a.ld..][..k], &mut row[..k]);
            }
        })
    };
    // SAFETY: `available` was checked; the caller's guarantee on C.
    unsafe {
        run(
            &xa,
            (m, n, kp),
            task_width(n),
            (c, ldc),
            accumulate,
            |cols, depth, packed| pack_f32(b, (n, k), cols, depth, packed),
        )
    };
    true
}

/// m rows of kp values ([`row_stride`] apart), then zero rows up to a whole block of 32: a
/// block of 32 rows a task. `fill(i0, rows, ld)` writes values 0 .. k of each of the block's
/// rows (ld apart) below m while the block is in the cache; the rest is zeroed here. Each value
/// is written once.
fn padded_rows(
    (m, k, kp): (usize, usize, usize),
    fill: impl Fn(usize, &mut [MaybeUninit<bf16>], usize) + Sync,
) -> Rows {
    use rayon::prelude::*;
    // kp (so ld) is a multiple of 32: each row whole lines.
    let ld = row_stride(kp);
    let len = m.next_multiple_of(BLOCK) * ld;
    let mut lines = Box::<[Line]>::new_uninit_slice(len / 32);
    // SAFETY: the lines' bytes as len bf16, not yet initialised (Line has no padding).
    let xa = unsafe {
        std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<MaybeUninit<bf16>>(), len)
    };
    xa.par_chunks_mut(BLOCK * ld)
        .enumerate()
        .for_each(|(blk, rows)| {
            let i0 = blk * BLOCK;
            fill(i0, rows, ld);
            for (i, row) in (i0..).zip(rows.chunks_exact_mut(ld)) {
                let from = if i < m { k } else { 0 };
                for v in &mut row[from..] {
                    v.write(bf16::ZERO);
                }
            }
        });
    Rows {
        // SAFETY: every value of every line was written above: values 0 .. k of the rows
        // below m by `fill`, the rest here.
        lines: unsafe { lines.assume_init() },
        ld,
    }
}

/// C [m×n] (rows `ldc` apart) = the padded rows `xa` (m rounded up to 32, of kp bf16) by n
/// columns, plus C when `accumulate`, each task of `width` columns packing them with `pack`
/// first.
///
/// # Safety
/// [`available`] is true; `c` is valid for writes of m rows of n values, row i at `c + i·ldc`
/// (initialised when accumulating).
unsafe fn run(
    xa: &Rows,
    (m, n, kp): (usize, usize, usize),
    width: usize,
    (c, ldc): (*mut f32, usize),
    accumulate: bool,
    pack: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>, &mut Lines) + Sync,
) {
    use rayon::prelude::*;
    let (mp, np) = (xa.count(), n.next_multiple_of(BLOCK));
    let (ld, xa) = (xa.ld, xa.bf16s());
    let dst = crate::blas::SharedOut(c);
    (0..np.div_ceil(width)).into_par_iter().for_each_init(
        Lines::default,
        |packed: &mut Lines, t| {
            let (j0, nb) = (t * width, width.min(np - t * width));
            // The depth in blocks, the sums of each added to the last's in C.
            for d0 in (0..kp).step_by(DEPTH) {
                let depth = DEPTH.min(kp - d0);
                pack(j0..j0 + nb, d0..d0 + depth, packed);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the caller's guarantees; `xa` holds mp rows of kp values (both
                // multiples of 32) and the block's values d0 .. d0 + depth lie within each row;
                // `packed` holds nb/16 groups of depth/2 rows of 64 bytes; the task writes C's
                // columns j0 .. j0 + min(nb, n - j0) of its m rows, which no other task writes,
                // and has written them once before it adds to them.
                unsafe {
                    x86::blocks(
                        xa.as_ptr().add(d0).cast(),
                        (mp, ld, depth),
                        (packed.as_ptr(), 8 * depth),
                        nb,
                        (dst.at(j0), ldc),
                        (m, nb.min(n - j0)),
                        accumulate || d0 > 0,
                    )
                };
            }
        },
    );
}

/// Values 0 .. k of rows i0 .. i0 + 32 (those below m) of op(A) = Aᵀ [m×k] (A stored [k, m])
/// rounded to bf16 into `rows` (32 rows `ld` values apart): A's values i0 .. i0 + 32 of its rows,
/// 32 rows at a time, transposed in the cache.
fn transpose_rows(
    a: &crate::blas::Operand<f32>,
    (i0, m, k, ld): (usize, usize, usize, usize),
    rows: &mut [MaybeUninit<bf16>],
) {
    debug_assert_eq!(rows.len(), BLOCK * ld);
    let count = BLOCK.min(m - i0);
    // block[r][d]: row i0 + r's value p0 + d.
    let mut block = [[bf16::ZERO; BLOCK]; BLOCK];
    for p0 in (0..k).step_by(BLOCK) {
        let depth = BLOCK.min(k - p0);
        #[cfg(target_arch = "x86_64")]
        if count == BLOCK && depth == BLOCK && crate::simd::simd_level() >= 2 {
            let src = &a.data[p0 * a.ld + i0..][..(BLOCK - 1) * a.ld + BLOCK];
            // SAFETY: AVX-512 is there; `src` holds 32 rows of 32 values `a.ld` apart, `rows`
            // 32 rows of ld ≥ p0 + 32 values.
            unsafe { x86::transpose_block(src.as_ptr(), a.ld, rows[p0..].as_mut_ptr().cast(), ld) };
            continue;
        }
        for d in 0..depth {
            let src = &a.data[(p0 + d) * a.ld + i0..][..count];
            for (b, &x) in block.iter_mut().zip(src) {
                b[d] = bf16::from_bits(crate::half_weights::round_bf16(x));
            }
        }
        for (b, row) in block.iter().zip(rows.chunks_exact_mut(ld)).take(count) {
            for (o, &v) in row[p0..p0 + depth].iter_mut().zip(b) {
                o.write(v);
            }
        }
    }
}

crate::simd::simd_versions! {
    /// As [`pack`], for an f32 op(B) [k×n] (`dims` = (n, k)), each value rounded to bf16.
    fn pack_f32(
        b: &crate::blas::Operand<f32>,
        dims: (usize, usize),
        cols: std::ops::Range<usize>,
        depth: std::ops::Range<usize>,
        out: &mut Lines,
    ) {
        let (n, k) = dims;
        let pairs = depth.len() / 2;
        // Not cleared first: the loops below write every value of a whole group over the whole
        // depth, and the groups that are not whole are zeroed first.
        let out = out.u32s(cols.len() * pairs);
        // The values of the depth block that exist, from d0.
        let (d0, real) = (depth.start, k.min(depth.end).saturating_sub(depth.start));
        let mut row = vec![bf16::ZERO; if b.trans { real } else { 0 }];
        for (g, group) in out.chunks_exact_mut(16 * pairs).enumerate() {
            let j0 = cols.start + g * 16;
            let count = n.saturating_sub(j0).min(16);
            if count < 16 || real < depth.len() {
                group.fill(0); // padding columns or depth: zeros
            }
            if count == 0 {
                continue;
            }
            if b.trans {
                // B stored [n, k]: row j holds op(B)'s column j, rounded in order.
                for (c, j) in (j0..j0 + count).enumerate() {
                    crate::half_weights::narrow_bf16(&b.data[j * b.ld + d0..][..real], &mut row);
                    scatter_pairs(&row, &mut group[c..]);
                }
            } else {
                // B stored [k, n]: rows 2p and 2p + 1 give pair p of the 16 columns side by side
                // (a whole group in fixed-size steps, which vectorise).
                for (p, at) in group.chunks_exact_mut(16).take(real.div_ceil(2)).enumerate() {
                    let r0 = (d0 + 2 * p) * b.ld + j0;
                    let lo = &b.data[r0..][..count];
                    let hi = if 2 * p + 1 < real { &b.data[r0 + b.ld..][..count] } else { &[] };
                    match (lo.try_into(), hi.try_into(), <&mut [u32; 16]>::try_from(&mut *at)) {
                        (Ok(lo), Ok(hi), Ok(at)) => interleave(lo, hi, at),
                        _ => {
                            for (c, o) in at.iter_mut().take(count).enumerate() {
                                let h = hi.get(c).map_or(0, |&v| crate::half_weights::round_bf16(v));
                                *o = u32::from(crate::half_weights::round_bf16(lo[c]))
                                    | u32::from(h) << 16;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Pairs of 16 columns' values from two rows, rounded to bf16: (lo[c], hi[c]) in `at[c]`.
#[inline(always)]
fn interleave(lo: &[f32; 16], hi: &[f32; 16], at: &mut [u32; 16]) {
    for c in 0..16 {
        at[c] = u32::from(crate::half_weights::round_bf16(lo[c]))
            | u32::from(crate::half_weights::round_bf16(hi[c])) << 16;
    }
}

/// One column's values `row` (bf16, in depth order) into its place of a group in the tiles'
/// pair layout: pair p at `group[16 p]`.
#[inline(always)]
fn scatter_pairs(row: &[bf16], group: &mut [u32]) {
    let mut at = 0;
    for two in row.chunks_exact(2) {
        group[at] = u32::from(two[0].to_bits()) | u32::from(two[1].to_bits()) << 16;
        at += 16;
    }
    if let [.., last] = row {
        if row.len() % 2 == 1 {
            group[at] = u32::from(last.to_bits());
        }
    }
}

/// Packs columns `cols` of op(w) = wᵀ over the block `depth` of the depth (rows of w, padded
/// with zero rows past n and zero values past k) in the tiles' pair layout: a group of 16
/// columns holds, for each pair p of the block, the 16 columns' values 2p and 2p + 1 (32 bits
/// each, 64 bytes).
fn pack(
    w: &[bf16],
    (n, k): (usize, usize),
    cols: std::ops::Range<usize>,
    depth: std::ops::Range<usize>,
    out: &mut Lines,
) {
    let pairs = depth.len() / 2;
    let end = k.min(depth.end).max(depth.start);
    let out = out.u32s(cols.len() * pairs);
    out.fill(0);
    for (g, group) in out.chunks_exact_mut(16 * pairs).enumerate() {
        let j0 = cols.start + g * 16;
        for (c, j) in (j0..n.min(j0 + 16)).enumerate() {
            // Row by row: each read in order, the writes 64 bytes apart within the group.
            scatter_pairs(&w[j * k + depth.start..j * k + end], &mut group[c..]);
        }
    }
}

/// As [`pack`], for a block-quantized w [n, k] (`ty`'s blocks, row-major; k a multiple of 32,
/// `depth` within it in whole blocks): each weight value dequantized in f32 and rounded to bf16.
/// Only where [`available`] is true.
fn pack_quant(
    w: QuantRows,
    ty: crate::quant::QType,
    (n, k): (usize, usize),
    cols: std::ops::Range<usize>,
    depth: std::ops::Range<usize>,
    out: &mut Lines,
) {
    use crate::quant::QK;
    debug_assert!(depth.start.is_multiple_of(QK) && depth.len().is_multiple_of(QK));
    debug_assert!(depth.end <= k);
    let (pairs, bytes) = (depth.len() / 2, ty.block_bytes());
    let row_bytes = k / QK * bytes;
    let out = out.u32s(cols.len() * pairs);
    for (g, group) in out.chunks_exact_mut(16 * pairs).enumerate() {
        let j0 = cols.start + g * 16;
        let count = n.saturating_sub(j0).min(16);
        // Each of the group's columns: its row's blocks over the depth (none: a padding column).
        let blocks = depth.start / QK..depth.end / QK;
        // An interleaved weight's whole groups straight into the lines.
        if let QuantRows::Interleaved(w) = w {
            if w.pack_lines((j0, count), blocks.clone(), group) {
                continue;
            }
        }
        w.with_rows((j0, count), blocks, (row_bytes, bytes), |rows| {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the tiles being there (the caller's), so is AVX-512; each row holds the
            // depth's blocks or is empty, and the group depth / 2 pairs of 16 columns.
            unsafe {
                x86::pack_quant_group(ty, rows, group)
            };
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!(
                "AMX tiles on another architecture: {:?}",
                (group.len(), rows.len())
            );
        });
    }
}

/// As [`pack`], for op(B) = w [n, k] as it is stored (block-quantized, `ty`'s blocks, k a
/// multiple of 32): the depth is w's rows (zeros past n), the columns its values, each
/// dequantized in f32 and rounded to bf16. Only where [`available`] is true.
fn pack_quant_nk(
    w: QuantRows,
    ty: crate::quant::QType,
    (n, k): (usize, usize),
    cols: std::ops::Range<usize>,
    depth: std::ops::Range<usize>,
    out: &mut Lines,
) {
    use crate::quant::QK;
    let (pairs, bytes) = (depth.len() / 2, ty.block_bytes());
    let row_bytes = k / QK * bytes;
    let out = out.u32s(cols.len() * pairs);
    let (mut buf0, mut buf1) = (Vec::new(), Vec::new());
    for (g, group) in out.chunks_exact_mut(16 * pairs).enumerate() {
        let c0 = cols.start + g * 16;
        if c0 >= k {
            group.fill(0); // padding columns
            continue;
        }
        // Columns c0 .. c0 + 16: one half of each row's block c0 / 32 (k is whole blocks).
        let (at, high) = (c0 / QK, (c0 / 16) % 2 == 1);
        let sizes = (row_bytes, bytes);
        for (p, line) in group.chunks_exact_mut(16).enumerate() {
            let r = depth.start + 2 * p;
            let block = |r: usize, buf| (r < n).then(|| w.row(r, at..at + 1, sizes, buf));
            let (block0, block1) = (block(r, &mut buf0), block(r + 1, &mut buf1));
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the tiles being there (the caller's), so is AVX-512; each block is whole.
            unsafe {
                x86::pack_half_blocks(ty, (block0, block1), high, line)
            };
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!(
                "AMX tiles on another architecture: {:?}",
                (line.len(), high, r)
            );
        }
    }
}

/// `blocks` (`ty`'s, whole) dequantized into `out` (32 values a block) in f32 as
/// [`x86::pack_quant_group`] dequantizes them: Q4_1's d·q + m as one fused multiply-add, Q8_0's
/// d·q.
#[cfg(test)]
pub(crate) fn dequantize(ty: crate::quant::QType, blocks: &[u8], out: &mut [f32]) {
    use crate::quant::{QType, QK};
    let f16_at = |b: &[u8], at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    for (b, vals) in blocks
        .chunks_exact(ty.block_bytes())
        .zip(out.chunks_exact_mut(QK))
    {
        match ty {
            QType::Q4_1 => {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for j in 0..QK / 2 {
                    let q = b[4 + j];
                    vals[j] = f32::from(q & 0x0f).mul_add(d, m);
                    vals[j + QK / 2] = f32::from(q >> 4).mul_add(d, m);
                }
            }
            QType::Q8_0 => {
                let d = f16_at(b, 0);
                for (v, &q) in vals.iter_mut().zip(&b[2..]) {
                    *v = f32::from(q as i8) * d;
                }
            }
        }
    }
}

/// Values the tiles' attention reads: bf16 as they are, f32 rounded to bf16.
pub(crate) trait TileValue: Copy + Send + Sync {
    /// `dst[i]` = `src[i]` as bf16, for the shorter of the two.
    fn to_bf16s(src: &[Self], dst: &mut [MaybeUninit<bf16>]);
}

impl TileValue for bf16 {
    fn to_bf16s(src: &[Self], dst: &mut [MaybeUninit<bf16>]) {
        for (d, &v) in dst.iter_mut().zip(src) {
            d.write(v);
        }
    }
}

impl TileValue for f32 {
    fn to_bf16s(src: &[Self], dst: &mut [MaybeUninit<bf16>]) {
        crate::half_weights::narrow_bf16_into(src, dst)
    }
}

/// Query rows per task of [`causal_attention`]: two blocks of 32.
const QUERY_ROWS: usize = 64;

/// A key/value head's keys and values in the tiles' pair layout (see [`causal_attention`]).
struct PackedKv {
    /// op(B) = Kᵀ: groups of 16 keys, each kq / 2 rows of 16 pairs of the head's values.
    keys: Lines,
    /// op(B) = V: groups of 16 of the head's columns, each np / 2 rows of 16 pairs of keys.
    values: Lines,
    /// Keys rounded up to whole blocks.
    np: usize,
}

/// softmax(scale·q·kᵀ)·v over the causal keys of each sequence of `a` (see
/// [`crate::blas::causal_strips_fwd`]) on the tiles, into `y` (f32; each query head's rows at
/// `a.start(Role::Y, ..)`, `a.y_ld` apart): q·kᵀ from q and k as bf16, the softmax in f32, its
/// probabilities rounded to bf16 for p·v (as PyTorch's CPU flash attention in bf16 does), sums in
/// f32. Each key/value head is packed once; tasks are blocks of 64 query rows of one head, each
/// block of 32 rows multiplying only the blocks of keys its last row sees. False (y untouched)
/// where [`available`] is false.
pub(crate) fn causal_attention<T: TileValue>(
    a: &crate::blas::CausalRows<T>,
    y: &mut [f32],
    scale: f32,
) -> candle_core::Result<bool> {
    use crate::blas::Role;
    use rayon::prelude::*;
    if !available() {
        return Ok(false);
    }
    let group = a.check(y.len())?;
    let (hd, kq) = (a.hd, a.hd.next_multiple_of(BLOCK));
    if hd == 0 {
        return Ok(true);
    }
    // Row j of a head's operand (within it: `check`).
    fn row_of<'d, T>(
        a: &crate::blas::CausalRows<'d, T>,
        (data, ld): (&'d [T], usize),
        (role, si, h): (Role, usize, usize),
        j: usize,
    ) -> candle_core::Result<&'d [T]> {
        Ok(&a.rows(data, role, si, h)?[j * ld..j * ld + a.hd])
    }
    let row = |x, role, si, h, j| row_of(a, x, (role, si, h), j);
    let kv: Vec<PackedKv> = (0..a.seqs.len() * a.kv_heads)
        .into_par_iter()
        .map(|task| {
            let (si, g) = (task / a.kv_heads, task % a.kv_heads);
            let (t, o) = a.seqs[si];
            let n = if t > 0 { o + t } else { 0 };
            let np = n.next_multiple_of(BLOCK);
            // New buffers: they start as zeros (the padding keys and values stay so).
            let (mut keys, mut values) = (Lines::default(), Lines::default());
            let ku = keys.u32s(np * kq / 2);
            let mut wide = vec![MaybeUninit::new(bf16::ZERO); 2 * hd];
            for j in 0..n {
                T::to_bf16s(row(a.k, Role::K, si, g, j)?, &mut wide[..hd]);
                // SAFETY: the first hd values were written just above (or by the start).
                let kj = unsafe { std::slice::from_raw_parts(wide.as_ptr().cast::<bf16>(), hd) };
                scatter_pairs(kj, &mut ku[(j / 16) * (kq / 2) * 16 + j % 16..]);
            }
            let vu = values.u32s(kq * np / 2);
            for p in 0..n.div_ceil(2) {
                T::to_bf16s(row(a.v, Role::V, si, g, 2 * p)?, &mut wide[..hd]);
                if 2 * p + 1 < n {
                    T::to_bf16s(row(a.v, Role::V, si, g, 2 * p + 1)?, &mut wide[hd..]);
                } else {
                    wide[hd..].fill(MaybeUninit::new(bf16::ZERO));
                }
                // SAFETY: all 2·hd values were written (by the start or just above).
                let two =
                    unsafe { std::slice::from_raw_parts(wide.as_ptr().cast::<bf16>(), 2 * hd) };
                let (lo, hi) = two.split_at(hd);
                for (c, (l, h)) in lo.iter().zip(hi).enumerate() {
                    vu[(c / 16) * (np / 2) * 16 + p * 16 + c % 16] =
                        u32::from(l.to_bits()) | u32::from(h.to_bits()) << 16;
                }
            }
            Ok(PackedKv { keys, values, np })
        })
        .collect::<candle_core::Result<_>>()?;
    let out = crate::blas::SharedOut(y.as_mut_ptr());
    a.tasks(QUERY_ROWS).into_par_iter().try_for_each_init(
        || (Vec::new(), vec![0f32; QUERY_ROWS * kq]),
        |(scores, sums): &mut (Vec<f32>, Vec<f32>), (si, h, r0, r1)| {
            let (_, o) = a.seqs[si];
            let packed = &kv[si * a.kv_heads + h / group];
            let (rb, keys) = (r1 - r0, o + r1);
            let (mq, lp) = (rb.next_multiple_of(BLOCK), keys.next_multiple_of(BLOCK));
            // The keys block i0 of the rows sees: to its last row's, in whole blocks.
            let seen = |i0: usize| (o + r0 + i0 + BLOCK).min(keys).next_multiple_of(BLOCK);
            let q = a.rows(a.q.0, Role::Q, si, h)?;
            let ql = a.q.1;
            let qa = padded_rows((rb, hd, kq), |i0, rows, ld| {
                for (i, row) in (i0..rb).zip(rows.chunks_exact_mut(ld)) {
                    T::to_bf16s(&q[(r0 + i) * ql..][..hd], &mut row[..hd]);
                }
            });
            scores.resize(mq * lp, 0.0);
            for i0 in (0..mq).step_by(BLOCK) {
                let cols = seen(i0);
                // SAFETY: `available`; `qa` holds mq rows of kq values, the keys kq / 2 pair
                // rows of each of np ≥ cols columns' groups; the block's 32 rows of `cols`
                // scores lie within `scores` (mq rows of lp ≥ cols).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    x86::blocks(
                        qa.bf16s().as_ptr().add(i0 * qa.ld).cast(),
                        (BLOCK, qa.ld, kq),
                        (packed.keys.as_ptr(), 8 * kq),
                        cols,
                        (scores.as_mut_ptr().add(i0 * lp), lp),
                        (BLOCK, cols),
                        false,
                    )
                };
                for (i, r) in (i0..i0 + BLOCK).zip(scores[i0 * lp..].chunks_mut(lp)) {
                    if i < rb {
                        crate::fused::softmax_row(&mut r[..cols], o + r0 + i + 1, scale);
                    } else {
                        r[..cols].fill(0.0);
                    }
                }
            }
            let pa = padded_rows((mq, lp, lp), |i0, rows, ld| {
                let cols = seen(i0);
                for (i, row) in (i0..).zip(rows.chunks_exact_mut(ld)) {
                    crate::half_weights::narrow_bf16_into(&scores[i * lp..][..cols], row);
                    row[cols..].fill(MaybeUninit::new(bf16::ZERO));
                }
            });
            for i0 in (0..mq).step_by(BLOCK) {
                // SAFETY: `available`; `pa` holds mq rows of lp ≥ seen(i0) values, the values
                // np / 2 ≥ seen(i0) / 2 pair rows of each of kq columns' groups; the block's
                // 32 rows of kq sums lie within `sums` (64 rows of kq).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    x86::blocks(
                        pa.bf16s().as_ptr().add(i0 * pa.ld).cast(),
                        (BLOCK, pa.ld, seen(i0)),
                        (packed.values.as_ptr(), 8 * packed.np),
                        kq,
                        (sums.as_mut_ptr().add(i0 * kq), kq),
                        (BLOCK, kq),
                        false,
                    )
                };
            }
            let y0 = (a.start)(Role::Y, si, h);
            for (i, s) in sums.chunks_exact(kq).take(rb).enumerate() {
                // SAFETY: task (sequence, h, r0) alone writes its query rows r0..r1 of head h,
                // hd values each, within `y` (`check`).
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(out.at(y0 + (r0 + i) * a.y_ld), hd) };
                dst.copy_from_slice(&s[..hd]);
            }
            candle_core::Result::Ok(())
        },
    )?;
    Ok(true)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::BLOCK;
    use std::arch::asm;

    /// The tile configuration (palette 1): tiles 0–3 the sums (16 rows of 16 f32), 4–5 the
    /// input's rows (16 rows of 32 bf16), 6–7 the weight's pairs (16 rows of 16 pairs).
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    const CONFIG: Config = Config {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// AMX-TILE and AMX-BF16 in CPUID, and the kernel's permission for this process to use the
    /// tile data (Linux's `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`).
    pub(super) fn enable() -> bool {
        if std::arch::x86_64::__cpuid(0).eax < 7 {
            return false;
        }
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (tile, bf16) = (leaf7.edx & (1 << 24) != 0, leaf7.edx & (1 << 22) != 0);
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a request for a permission; it changes nothing else.
        tile && bf16
            && unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            } == 0
    }

    /// `dst`'s rows r < 32 (`ld_dst` values apart), values 0 .. 32: value d of row r is value r
    /// of `src`'s row d (`ld_src` apart), rounded to bf16 as `round_bf16` rounds. Rows 2p and
    /// 2p + 1 give 16 pairs side by side, which a 16 × 16 transpose of the pairs puts in rows.
    ///
    /// # Safety
    /// AVX-512 is there; `src` is valid for reads of 32 rows of 32 f32, `dst` for writes of 32
    /// rows of 32 u16.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn transpose_block(
        src: *const f32,
        ld_src: usize,
        dst: *mut u16,
        ld_dst: usize,
    ) {
        use std::arch::x86_64::*;
        for h in 0..2 {
            let mut pairs = [_mm512_setzero_ps(); 16];
            for (p, pair) in pairs.iter_mut().enumerate() {
                // SAFETY: rows 2p and 2p + 1 < 32 of `src`, values 16h .. 16h + 16.
                let (lo, hi) = unsafe {
                    (
                        _mm512_loadu_si512(src.add(2 * p * ld_src + 16 * h).cast()),
                        _mm512_loadu_si512(src.add((2 * p + 1) * ld_src + 16 * h).cast()),
                    )
                };
                let both = _mm512_or_si512(round(lo), _mm512_slli_epi32::<16>(round(hi)));
                *pair = _mm512_castsi512_ps(both);
            }
            let rows = crate::gemm::x86::transpose16(pairs);
            for (r, row) in rows.iter().enumerate() {
                // SAFETY: row 16h + r < 32 of `dst`, 64 bytes.
                unsafe { _mm512_storeu_ps(dst.add((16 * h + r) * ld_dst).cast(), *row) };
            }
        }
    }

    /// A group of 16 columns over a depth in the tiles' pair layout (pair p of column c at
    /// `group[16 p + c]`), 32 depth values at a time: `values(c, blk)` gives column c's values
    /// 32 blk .. 32 blk + 32 as two vectors of 16 f32 (`None`: a padding column, zeros), which
    /// are rounded as `round_bf16` into 16 pairs; the 16 columns' pairs, transposed, are 16
    /// whole lines of the group.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn pack_pairs(
        group: &mut [u32],
        values: impl Fn(usize, usize) -> Option<[std::arch::x86_64::__m512; 2]>,
    ) {
        use std::arch::x86_64::*;
        // Values 0 .. 32 of the two vectors (low halves of their lanes) side by side.
        let evens = _mm512_set_epi16(
            62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26, 24, 22, 20,
            18, 16, 14, 12, 10, 8, 6, 4, 2, 0,
        );
        for (blk, lines) in group.chunks_exact_mut(16 * BLOCK / 2).enumerate() {
            let mut pairs = [_mm512_setzero_ps(); 16];
            for (c, pair) in pairs.iter_mut().enumerate() {
                if let Some([lo, hi]) = values(c, blk) {
                    let (lo, hi) = (
                        round(_mm512_castps_si512(lo)),
                        round(_mm512_castps_si512(hi)),
                    );
                    *pair = _mm512_castsi512_ps(_mm512_permutex2var_epi16(lo, evens, hi));
                }
            }
            let lines_of = crate::gemm::x86::transpose16(pairs);
            for (line, v) in lines.chunks_exact_mut(16).zip(lines_of) {
                // SAFETY: 16 u32 of the group.
                unsafe { _mm512_storeu_ps(line.as_mut_ptr().cast(), v) };
            }
        }
    }

    /// One half of a block `b` of `ty` (values 16..32 where `high`, else 0..16) dequantized in
    /// f32: Q4_1's d·q + m as one fused multiply-add, Q8_0's d·q.
    #[target_feature(enable = "avx512f")]
    fn half_block(ty: crate::quant::QType, b: &[u8], high: bool) -> std::arch::x86_64::__m512 {
        use crate::quant::QType;
        use std::arch::x86_64::*;
        let f16_at = |at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        // The 16 bytes holding the half's values.
        let bytes: &[u8; 16] = match ty {
            QType::Q4_1 => &b[4..20],
            QType::Q8_0 if high => &b[18..34],
            QType::Q8_0 => &b[2..18],
        }
        .try_into()
        .expect("16 bytes");
        // SAFETY: a 16-byte array.
        let raw = unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) };
        match ty {
            QType::Q4_1 => {
                let q = _mm512_cvtepu8_epi32(raw);
                let q = if high {
                    _mm512_srli_epi32::<4>(q)
                } else {
                    _mm512_and_si512(q, _mm512_set1_epi32(0x0f))
                };
                let (d, m) = (_mm512_set1_ps(f16_at(0)), _mm512_set1_ps(f16_at(2)));
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), d, m)
            }
            QType::Q8_0 => {
                let q = _mm512_cvtepi8_epi32(raw);
                _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(f16_at(0)))
            }
        }
    }

    /// [`pack_pairs`] of a block-quantized weight: `rows[c]` holds column c's blocks over the
    /// depth (empty: a padding column), each value dequantized by [`half_block`].
    ///
    /// # Safety
    /// AVX-512 (F, BW) is there; every non-empty row holds `group.len() / 256` whole blocks.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn pack_quant_group(
        ty: crate::quant::QType,
        rows: &[&[u8]; 16],
        group: &mut [u32],
    ) {
        let bytes = ty.block_bytes();
        pack_pairs(group, |c, blk| {
            let b = rows[c].get(blk * bytes..(blk + 1) * bytes)?;
            Some([half_block(ty, b, false), half_block(ty, b, true)])
        });
    }

    /// One half (values 16..32 where `high`, else 0..16) of a block of `ty` from each of two
    /// rows (none: zeros), dequantized by [`half_block`] and rounded to bf16, as 16 pairs (the
    /// first row's value low) in `line`.
    ///
    /// # Safety
    /// AVX-512 (F, BW) is there; each block is whole (`ty`'s bytes); `line` holds 16 u32.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn pack_half_blocks(
        ty: crate::quant::QType,
        (lo, hi): (Option<&[u8]>, Option<&[u8]>),
        high: bool,
        line: &mut [u32],
    ) {
        use std::arch::x86_64::*;
        debug_assert!(line.len() == 16);
        let half = |b: Option<&[u8]>| match b {
            Some(b) => round(_mm512_castps_si512(half_block(ty, b, high))),
            None => _mm512_setzero_si512(),
        };
        let pairs = _mm512_or_si512(half(lo), _mm512_slli_epi32::<16>(half(hi)));
        // SAFETY: `line` holds 16 u32.
        unsafe { _mm512_storeu_si512(line.as_mut_ptr().cast(), pairs) };
    }

    /// [`pack_pairs`] of values already dequantized: `rows[c]` holds column c's f32 values over
    /// the depth (empty: a padding column).
    ///
    /// # Safety
    /// AVX-512 (F, BW) is there; every non-empty row holds `group.len() / 16` values.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn pack_f32_group(rows: &[&[f32]; 16], group: &mut [u32]) {
        use std::arch::x86_64::*;
        pack_pairs(group, |c, blk| {
            let v = rows[c].get(blk * BLOCK..(blk + 1) * BLOCK)?;
            // SAFETY: 32 values of the row.
            Some(unsafe {
                [
                    _mm512_loadu_ps(v.as_ptr()),
                    _mm512_loadu_ps(v.as_ptr().add(16)),
                ]
            })
        });
    }

    /// Each f32 (as bits) rounded to bf16's bits in the low half of its lane, as `round_bf16`.
    #[target_feature(enable = "avx512f")]
    pub(crate) fn round(b: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, bias));
        let magnitude = _mm512_and_si512(b, _mm512_set1_epi32(0x7fff_ffff));
        let nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7f80_0000));
        let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(0x40));
        _mm512_mask_blend_epi32(nan, rounded, quiet)
    }

    /// C[i, c] (rows `ldc` apart from `c`) = the sums of row i of the input by the task's
    /// column c, for the `rows` × `cols` of C that exist (plus C's values when `accumulate`):
    /// whole blocks of 32 × 32 go from and to C's tiles directly, the edges through a block on
    /// the stack.
    ///
    /// # Safety
    /// The CPU has AMX-BF16 and this process its permission; `xa` holds `mp` rows `lda` values
    /// apart of `depth` values (all multiples of 32, rows ≤ mp); `packed` nb / 16 groups,
    /// `group` u32 apart, of depth / 2 rows of 16 pairs (cols ≤ nb); `c` valid for writes of
    /// `rows` rows of `cols` f32, `ldc` apart (initialised when accumulating).
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn blocks(
        xa: *const u16,
        (mp, lda, depth): (usize, usize, usize),
        (packed, group): (*const u32, usize),
        nb: usize,
        (c, ldc): (*mut f32, usize),
        (rows, cols): (usize, usize),
        accumulate: bool,
    ) {
        debug_assert!(rows <= mp && cols <= nb && group >= 8 * depth);
        let a_stride = lda * 2;
        let mut edge = [0f32; BLOCK * BLOCK];
        // SAFETY: the configuration is valid (palette 1, rows of 64 bytes).
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
        for i0 in (0..rows).step_by(BLOCK) {
            for j in (0..cols).step_by(BLOCK) {
                let whole = i0 + BLOCK <= rows && j + BLOCK <= cols;
                let a = xa.wrapping_add(i0 * lda);
                let b = packed.wrapping_add((j / 16) * group);
                // Whole blocks in C itself; edges in `edge`, rows of 32.
                let (out, ld) = if whole {
                    (c.wrapping_add(i0 * ldc + j), ldc)
                } else {
                    (edge.as_mut_ptr(), BLOCK)
                };
                // SAFETY: each load reads 16 rows of 64 bytes within `xa` (rows i0 .. i0 + 32,
                // values kk .. kk + 32) or a group of `packed` (pair rows kk/2 .. kk/2 + 16, 16
                // pairs each); the sums' loads and stores read and write 16 rows of 16 f32 within
                // C's whole block or `edge`.
                unsafe {
                    if whole && accumulate {
                        asm!(
                            "tileloadd tmm0, [{c00} + {sc}*1]",
                            "tileloadd tmm1, [{c01} + {sc}*1]",
                            "tileloadd tmm2, [{c10} + {sc}*1]",
                            "tileloadd tmm3, [{c11} + {sc}*1]",
                            c00 = in(reg) out,
                            c01 = in(reg) out.add(16),
                            c10 = in(reg) out.add(16 * ld),
                            c11 = in(reg) out.add(16 * ld + 16),
                            sc = in(reg) ld * 4,
                            options(nostack, readonly),
                        );
                    } else {
                        asm!(
                            "tilezero tmm0",
                            "tilezero tmm1",
                            "tilezero tmm2",
                            "tilezero tmm3",
                            options(nostack, nomem)
                        );
                    }
                    for kk in (0..depth).step_by(BLOCK) {
                        asm!(
                            "tileloadd tmm4, [{a0} + {sa}*1]",
                            "tileloadd tmm5, [{a1} + {sa}*1]",
                            "tileloadd tmm6, [{b0} + {sb}*1]",
                            "tileloadd tmm7, [{b1} + {sb}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            a0 = in(reg) a.add(kk),
                            a1 = in(reg) a.add(16 * lda + kk),
                            b0 = in(reg) b.add(kk * 8),
                            b1 = in(reg) b.add(group + kk * 8),
                            sa = in(reg) a_stride,
                            sb = in(reg) 64usize,
                            options(nostack, readonly),
                        );
                    }
                    asm!(
                        "tilestored [{c00} + {sc}*1], tmm0",
                        "tilestored [{c01} + {sc}*1], tmm1",
                        "tilestored [{c10} + {sc}*1], tmm2",
                        "tilestored [{c11} + {sc}*1], tmm3",
                        c00 = in(reg) out,
                        c01 = in(reg) out.add(16),
                        c10 = in(reg) out.add(16 * ld),
                        c11 = in(reg) out.add(16 * ld + 16),
                        sc = in(reg) ld * 4,
                        options(nostack),
                    );
                }
                if !whole {
                    let width = BLOCK.min(cols - j);
                    for (r, sums) in edge.chunks_exact(BLOCK).take(rows - i0).enumerate() {
                        // SAFETY: row i0 + r < rows of C, columns j .. j + width < cols.
                        let row = unsafe {
                            std::slice::from_raw_parts_mut(c.add((i0 + r) * ldc + j), width)
                        };
                        for (o, &v) in row.iter_mut().zip(sums) {
                            *o = if accumulate { *o + v } else { v };
                        }
                    }
                }
            }
        }
        // SAFETY: releases the tile state this function configured.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lmkit_amx_turns_the_tiles_off_only_when_asked() {
        for v in ["0", "off", " OFF "] {
            assert!(turned_off(Some(v.into())), "{v:?}");
        }
        for v in [None, Some(""), Some("1"), Some("on"), Some("no")] {
            assert!(!turned_off(v.map(String::from)), "{v:?}");
        }
    }

    /// Shapes whose sizes overflow, that the operands cannot hold, or an odd width give no
    /// product (and no panic).
    #[test]
    fn shapes_the_operands_cannot_hold_are_declined() {
        let x = vec![bf16::ONE; 64];
        for mnk in [
            (usize::MAX, 2, 2),
            (2, usize::MAX, 2),
            (2, 2, usize::MAX),
            (0, 2, 2),
            (9, 2, 8),
        ] {
            assert!(product(&x, &x, mnk, 32).is_none(), "{mnk:?}");
        }
        assert!(product(&x, &x, (2, 2, 8), 16).is_none(), "a width of 16");
    }

    /// The tile products equal the f64 product of the same values within f32 accumulation, for
    /// shapes with partial tiles in every dimension, several row blocks, several tasks and
    /// several blocks of the depth.
    #[test]
    fn tile_products_equal_the_widened_product() {
        if !available() {
            eprintln!("skipped: this CPU (or kernel) gives no AMX-BF16");
            return;
        }
        let mut uniform = crate::testing::uniform(7);
        let mut draw = |len| -> Vec<bf16> {
            uniform(len)
                .into_iter()
                .map(|v| bf16::from_f32(4.0 * v))
                .collect()
        };
        for (m, n, k, width) in [
            (1, 1, 1, 32),
            (13, 70, 45, 32),
            (70, 130, 388, 64),
            (40, 33, 6, 96),
            (35, 40, 1030, 32),
            // Depths of a multiple of 512: rows a line further apart than their values.
            (35, 40, 1024, 32),
            (33, 64, 512, 64),
        ] {
            let (x, w) = (draw(m * k), draw(n * k));
            let got = product(&x, &w, (m, n, k), width).expect("taken");
            let ld = n.next_multiple_of(BLOCK);
            assert_eq!(got.len(), m.next_multiple_of(BLOCK) * ld);
            for i in 0..m {
                for j in 0..ld {
                    let (want, size) = (0..k).fold((0f64, 0f64), |(s, a), p| {
                        if j >= n {
                            return (s, a);
                        }
                        let v = f64::from(x[i * k + p].to_f32()) * f64::from(w[j * k + p].to_f32());
                        (s + v, a + v.abs())
                    });
                    let err = (f64::from(got[i * ld + j]) - want).abs();
                    assert!(err <= 1e-6 * size.max(1.0), "{m}x{n}x{k}: ({i}, {j}) {err}");
                }
            }
        }
    }

    /// The AVX-512 transposition rounds as `round_bf16` does (ties to even, NaNs quieted,
    /// overflow to infinity, subnormals kept) and puts value d of row r at row r, value d.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn transposed_blocks_round_as_the_scalar_rounding() {
        if crate::simd::simd_level() < 2 {
            eprintln!("skipped: no AVX-512");
            return;
        }
        let special = [
            0x3f80_8000u32, // a tie below an even value: stays
            0x3f81_8000,    // a tie below an odd value: up
            0x3f80_8001,
            0xbf81_7fff,
            0x7f7f_ffff, // rounds to infinity
            0x7f80_0000,
            0xff80_0001, // a signalling NaN
            0x7fc0_0000,
            0xffff_ffff,
            0x0000_8001, // subnormal
            0x8000_0000,
        ];
        let ld = 37;
        let mut uniform = crate::testing::uniform(5);
        let mut src: Vec<f32> = uniform(32 * ld);
        for (i, &bits) in special.iter().enumerate() {
            src[i * 3 * ld + (7 * i) % 32] = f32::from_bits(bits);
        }
        let mut dst = vec![0u16; 32 * 40];
        // SAFETY: AVX-512 is there; `src` holds 32 rows of 37 values, `dst` 32 rows of 40.
        unsafe { x86::transpose_block(src.as_ptr(), ld, dst.as_mut_ptr(), 40) };
        for r in 0..32 {
            for d in 0..32 {
                let want = crate::half_weights::round_bf16(src[d * ld + r]);
                assert_eq!(
                    dst[r * 40 + d],
                    want,
                    "row {r}, value {d}: {}",
                    src[d * ld + r]
                );
            }
            assert!(
                dst[r * 40 + 32..][..8].iter().all(|&v| v == 0),
                "row {r}: past 32 written"
            );
        }
    }

    /// The f32 products on tiles equal the f64 product of the operands rounded to bf16, for
    /// each of op(A) and op(B) stored or transposed, into rows of C wider than n, with and
    /// without C's previous contents added, over one or several blocks of the depth.
    #[test]
    fn f32_products_on_tiles_equal_the_product_of_the_rounded_operands() {
        use crate::blas::{plain, transposed};
        if !available() {
            eprintln!("skipped: this CPU (or kernel) gives no AMX-BF16");
            return;
        }
        let mut uniform = crate::testing::uniform(11);
        let mut draw = |len| -> Vec<f32> { uniform(len).into_iter().map(|v| 4.0 * v).collect() };
        let rounded = |v: f32| f64::from(bf16::from_f32(v).to_f32());
        for (m, n, k) in [(33, 32, 32), (70, 45, 97), (100, 300, 64), (40, 50, 1100)] {
            for (ta, tb, accumulate) in [
                (false, false, false),
                (false, true, true),
                (true, false, true),
                (true, true, false),
            ] {
                // Stored with leading dimensions one wider than the rows need.
                let (ra, ca) = if ta { (k, m) } else { (m, k) };
                let (rb, cb) = if tb { (n, k) } else { (k, n) };
                let a = draw(ra * (ca + 1));
                let b = draw(rb * (cb + 1));
                let ldc = n + 3;
                let before = draw(m * ldc);
                let mut c = before.clone();
                fn op(t: bool, d: &[f32], ld: usize) -> crate::blas::Operand<'_, f32> {
                    if t {
                        transposed(d, ld)
                    } else {
                        plain(d, ld)
                    }
                }
                let (oa, ob) = (op(ta, &a, ca + 1), op(tb, &b, cb + 1));
                // SAFETY: the operands hold op(A) and op(B); `c` holds m rows of ldc values.
                let taken =
                    unsafe { product_f32((m, n, k), &oa, &ob, (c.as_mut_ptr(), ldc), accumulate) };
                assert!(taken);
                let at = |i: usize, p: usize| {
                    if ta {
                        a[p * (ca + 1) + i]
                    } else {
                        a[i * (ca + 1) + p]
                    }
                };
                let bt = |p: usize, j: usize| {
                    if tb {
                        b[j * (cb + 1) + p]
                    } else {
                        b[p * (cb + 1) + j]
                    }
                };
                for i in 0..m {
                    for j in 0..ldc {
                        let at_c = i * ldc + j;
                        if j >= n {
                            assert_eq!(c[at_c], before[at_c], "a value past n changed");
                            continue;
                        }
                        let (mut want, mut size) = (0f64, 0f64);
                        for p in 0..k {
                            let v = rounded(at(i, p)) * rounded(bt(p, j));
                            want += v;
                            size += v.abs();
                        }
                        if accumulate {
                            want += f64::from(before[at_c]);
                        }
                        let err = (f64::from(c[at_c]) - want).abs();
                        let what =
                            format!("{m}x{n}x{k} ta={ta} tb={tb} acc={accumulate} ({i}, {j})");
                        assert!(err <= 1e-6 * (size + 2.0), "{what}: {err}");
                    }
                }
            }
        }
    }
}
