//! f32 products of a few rows (2 to [`FEW_ROWS`]) against a large matrix on the CPU: a serving
//! round's decoding steps (one new row a sequence) or a short prompt against a weight.
//!
//! A BLAS gemm packs the whole weight into its own layout first — a copy as large as the weight
//! for every product (at 8 rows against SmolLM2's weights OpenBLAS's packing, `sgemm_incopy`,
//! took more of the time than its multiplying) — and lmkit splits products of fewer than 16
//! rows over no threads, of 16 to 32 over two pieces at most. Here each task takes a tile of the
//! output's columns, streams its part of the weight once and multiplies every row against it
//! while it is in cache; the tasks run on the polling team, as the one-row products do
//! ([`crate::team`]). With SmolLM2-135M-Instruct (f32) on 2 cores, `lmkit serve` went from 66 to
//! 160 completion tokens/s with 8 streams and from 131 to 194 with 32 (`bench/serve_bench.py`);
//! taking weight rows three at a time against each group of four rows (12 sums in registers)
//! then took 32 streams from 207 to 235.

use crate::simd::simd_versions;

/// The most rows a product may have to take this path.
pub const FEW_ROWS: usize = 32;

/// Products whose weight holds fewer values stay with the library (too small to split).
const MIN_WEIGHT: usize = 1 << 15;

/// Output columns per task: their weight values stay in the L2 cache while every row passes.
pub(crate) const COLS_PER_TASK: usize = 32;

/// Output columns per task for a weight stored [in, out] (as GPT-2's are): each of the weight's
/// rows gives a task 1 KiB side by side (32 columns were 128 bytes: a page and a cache miss
/// each, for a tile of every row, took a round's products at 8 rows 1.3x longer).
const COLS_IN_OUT: usize = 256;

/// The [in, out] weight's rows per pass over the rows of A: 128 KiB of a task's columns, in the
/// L2 cache while every group of rows reads them.
const K_CHUNK: usize = 128;

/// Values of the shared dimension per step of the row-by-column kernel (two AVX2 vectors, one
/// AVX-512 vector: independent sums enough to keep the adders busy).
const LANES: usize = 16;

thread_local! {
    /// Whether this thread runs a model pass ([`in_pass`]).
    static IN_PASS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` (a model's pass, which runs on a thread of rayon's pool so that the thread takes
/// part in its products) with its few-row products split as on any other thread.
pub fn in_pass<R>(f: impl FnOnce() -> R) -> R {
    with_pass(true, f)
}

/// Runs `f` (one of many tasks of a parallel loop, each with its own products: a recurrence's
/// rows) with its products kept off this path, also inside a model's pass.
pub fn outside_pass<R>(f: impl FnOnce() -> R) -> R {
    with_pass(false, f)
}

/// Runs `f` with this thread's pass flag set to `on`, then restores it (also when `f` panics).
fn with_pass<R>(on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            IN_PASS.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(IN_PASS.with(|p| p.replace(on)));
    f()
}

/// Products this path has run in this process (for tests that check it was taken).
static TAKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many products this path has run in this process.
pub fn products_taken() -> u64 {
    TAKEN.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether a product of m rows against a k×n matrix goes this way: a few rows, a weight worth
/// splitting, and a caller that is not one of rayon's tasks — or one running a model's pass
/// ([`in_pass`]): the other tasks of a parallel loop (a recurrence's steps, many small products
/// side by side) keep the library's single-threaded products.
pub fn applies(m: usize, n: usize, k: usize) -> bool {
    (2..=FEW_ROWS).contains(&m)
        && n.saturating_mul(k) >= MIN_WEIGHT
        && (rayon::current_thread_index().is_none() || IN_PASS.with(|p| p.get()))
}

/// The weight operand: `data` with rows `ld` apart, k×n (`trans`: stored n×k, row j holding
/// output column j's k values, as a linear layer's [out, in] weight is).
#[derive(Clone, Copy)]
pub struct Weight<'a> {
    pub data: &'a [f32],
    pub ld: usize,
    pub trans: bool,
}

/// A weight value type [`dot_tile`] reads: f32, or a half type (bf16, f16) widened to f32 as it
/// is loaded into a register (a model loaded in a half type: [`crate::half_weights`]), so that
/// its products read half the bytes and write no f32 copy.
pub(crate) trait WeightValue: Copy + Send + Sync + 'static {
    /// Which of the three: the kernels load each their own way.
    const KIND: ValueKind;
    fn widen(self) -> f32;
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum ValueKind {
    F32,
    Bf16,
    F16,
}

impl WeightValue for f32 {
    const KIND: ValueKind = ValueKind::F32;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl WeightValue for half::bf16 {
    const KIND: ValueKind = ValueKind::Bf16;
    #[inline(always)]
    fn widen(self) -> f32 {
        // bf16 is f32's upper half.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl WeightValue for half::f16 {
    const KIND: ValueKind = ValueKind::F16;
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// Eight values of `W` from `p` as f32 (the match is decided when W is: one load each, and a
/// widening for the half types).
///
/// # Safety
/// The CPU must have AVX2 and F16C; `p` must be valid for reads of 8 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
pub(crate) unsafe fn load8<W: WeightValue>(p: *const W) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: the caller's.
    unsafe {
        match W::KIND {
            ValueKind::F32 => _mm256_loadu_ps(p.cast()),
            ValueKind::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                _mm_loadu_si128(p.cast()),
            ))),
            ValueKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
        }
    }
}

/// C[m×n] = A[m×k] · W (plus C's previous contents when `accumulate`), A's rows `lda` apart,
/// C's `ldc` apart (from `c`). Returns false, touching nothing, where the operands do not hold
/// the sizes or there are more than [`FEW_ROWS`] rows.
///
/// # Safety
/// `c` must be valid for writes of rows i < m of n elements at `c + i·ldc` (initialised when
/// `accumulate`), and nothing else may access them during the call.
pub unsafe fn product(
    (m, n, k): (usize, usize, usize),
    (a, lda): (&[f32], usize),
    w: Weight,
    (c, ldc): (*mut f32, usize),
    accumulate: bool,
) -> bool {
    let stored = if w.trans { (n, k) } else { (k, n) };
    if !crate::blas::holds(a.len(), (m, k), lda)
        || !crate::blas::holds(w.data.len(), stored, w.ld)
        || ldc < n
        || m > FEW_ROWS
    {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    TAKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = crate::blas::SharedOut(c);
    let per_task = if w.trans { COLS_PER_TASK } else { COLS_IN_OUT };
    crate::team::for_each(n.div_ceil(per_task), &|t| {
        let j0 = t * per_task;
        let cols = per_task.min(n - j0);
        let (mut dots, mut strips);
        let tile = if w.trans {
            dots = [0f32; FEW_ROWS * COLS_PER_TASK];
            let tile = &mut dots[..m * cols];
            dot_tile(a, lda, m, &w.data[j0 * w.ld..], w.ld, cols, k, tile, true);
            tile
        } else {
            strips = [0f32; FEW_ROWS * COLS_IN_OUT];
            let tile = &mut strips[..m * cols];
            in_out_tile(a, lda, m, &w.data[j0..], w.ld, cols, k, tile);
            tile
        };
        for (i, row) in tile.chunks_exact(cols).enumerate() {
            // SAFETY: task t alone writes columns j0..j0 + cols of the m rows, which the caller
            // guarantees are valid (and initialised when accumulating).
            let dst = unsafe { std::slice::from_raw_parts_mut(out.at(i * ldc + j0), cols) };
            if accumulate {
                for (d, &v) in dst.iter_mut().zip(row) {
                    *d += v;
                }
            } else {
                dst.copy_from_slice(row);
            }
        }
    });
    true
}

/// `R` rows of A against one weight row (output column): R sums.
#[inline(always)]
fn dots<W: WeightValue, const R: usize>(x: [&[f32]; R], w: &[W], k: usize) -> [f32; R] {
    let mut acc = [[0f32; LANES]; R];
    let body = k / LANES * LANES;
    let mut kk = 0;
    while kk < body {
        let wv: [f32; LANES] = std::array::from_fn(|l| w[kk + l].widen());
        for r in 0..R {
            let xv: &[f32; LANES] = x[r][kk..kk + LANES].try_into().expect("LANES values");
            for l in 0..LANES {
                acc[r][l] += xv[l] * wv[l];
            }
        }
        kk += LANES;
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let mut s = acc[r].iter().sum::<f32>();
        for q in body..k {
            s += x[r][q] * w[q].widen();
        }
        out[r] = s;
    }
    out
}

/// `R` rows of A against `LANES` columns of a row-major k×n weight (`w` from the first column,
/// rows `ld` apart): R × LANES sums, row by row.
#[inline(always)]
fn strip<const R: usize>(x: [&[f32]; R], w: &[f32], ld: usize, k: usize) -> [[f32; LANES]; R] {
    let mut acc = [[0f32; LANES]; R];
    for kk in 0..k {
        let wv: &[f32; LANES] = w[kk * ld..kk * ld + LANES]
            .try_into()
            .expect("LANES values");
        for r in 0..R {
            let xv = x[r][kk];
            for l in 0..LANES {
                acc[r][l] += xv * wv[l];
            }
        }
    }
    acc
}

/// `$body` with `$rows` the group of `$r` rows (4, 3, 2 or 1) from row `$i`, `$row(i)` each, as
/// an array of that length: the kernels take their number of rows as a constant.
macro_rules! with_rows {
    ($r:expr, $i:expr, $row:expr, |$rows:ident| $body:expr) => {
        match $r {
            4 => {
                let $rows = [$row($i), $row($i + 1), $row($i + 2), $row($i + 3)];
                $body
            }
            3 => {
                let $rows = [$row($i), $row($i + 1), $row($i + 2)];
                $body
            }
            2 => {
                let $rows = [$row($i), $row($i + 1)];
                $body
            }
            _ => {
                let $rows = [$row($i)];
                $body
            }
        }
    };
}

/// `put(q, values[q])` for each of a group's values.
#[inline(always)]
fn put_each<T, const R: usize>(values: [T; R], mut put: impl FnMut(usize, T)) {
    for (q, v) in values.into_iter().enumerate() {
        put(q, v);
    }
}

/// The first row and the number of rows of each group of (at most) four of m rows.
fn groups(m: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..m).step_by(4).map(move |i| (i, (m - i).min(4)))
}

/// Weight rows (output columns) per call of [`block_avx2`]: with four rows of A, 12 sums in
/// registers, each step loading 4 + 3 vectors for 12 fused multiply-adds.
#[cfg(target_arch = "x86_64")]
const BLOCK_COLS: usize = 3;

/// `R` rows of A (from `x[r]`) against `C` weight rows (from `w[c]`), k values each: R × C sums,
/// with AVX2 and FMA. Each step of 8 values loads every weight row's vector once and every row's
/// once, for R × C multiply-adds into independent sums (enough of them to keep both FMA units
/// busy at 4 × 3).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; each pointer must be valid for reads of k values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_avx2<W: WeightValue, const R: usize, const C: usize>(
    x: [*const f32; R],
    w: [*const W; C],
    k: usize,
) -> [[f32; C]; R] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let body = k / 8 * 8;
    let mut q = 0;
    let mut out = [[0f32; C]; R];
    // SAFETY: q + 8 ≤ body ≤ k values are read from each pointer; the tail reads q < k.
    unsafe {
        while q < body {
            let mut wv = [_mm256_setzero_ps(); C];
            for c in 0..C {
                wv[c] = load8(w[c].add(q));
            }
            for r in 0..R {
                let xv = _mm256_loadu_ps(x[r].add(q));
                for c in 0..C {
                    acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
                }
            }
            q += 8;
        }
        for r in 0..R {
            for c in 0..C {
                let v = acc[r][c];
                let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
                let v = _mm_add_ss(v, _mm_shuffle_ps::<1>(v, v));
                let mut s = _mm_cvtss_f32(v);
                for p in body..k {
                    s += *x[r].add(p) * (*w[c].add(p)).widen();
                }
                out[r][c] = s;
            }
        }
    }
    out
}

/// The group `x` of R rows against the `cols` weight rows from `w` (`ld` apart), `width` (at
/// most [`BLOCK_COLS`]) weight rows at a time (the last time, fewer) through [`block_avx2`]:
/// `put(r, j, sum)`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; each row pointer must be valid for reads of k values, and
/// `w + j·ld` for j < cols too.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_group_avx2<W: WeightValue, const R: usize>(
    x: [*const f32; R],
    (w, ld, cols): (*const W, usize, usize),
    k: usize,
    width: usize,
    mut put: impl FnMut(usize, usize, f32),
) {
    let mut j = 0;
    while j < cols {
        let c = width.min(BLOCK_COLS).min(cols - j);
        // SAFETY: the caller keeps weight rows j..j + c (< cols) and the rows in bounds.
        let wr = |q: usize| unsafe { w.add((j + q) * ld) };
        let mut emit = |sums: &[[f32; BLOCK_COLS]]| {
            for (r, s) in sums.iter().enumerate() {
                for (q, &v) in s[..c].iter().enumerate() {
                    put(r, j + q, v);
                }
            }
        };
        // SAFETY: as the caller's, who checked AVX2, FMA and F16C.
        unsafe {
            match c {
                3 => emit(&block_avx2(x, [wr(0), wr(1), wr(2)], k)),
                2 => emit(&block_avx2(x, [wr(0), wr(1)], k).map(|[a, b]| [a, b, 0.0])),
                _ => emit(&block_avx2(x, [wr(0)], k).map(|[a]| [a, 0.0, 0.0])),
            }
        }
        j += c;
    }
}

/// tile[i·cols + j] = Σ_q A[i, q] · w[j·ld + q] for the m rows (any number) and `cols` weight
/// rows, on the calling thread; `from_memory`: the weight rows are not in the cache yet (the
/// first group of rows reads them in order).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dot_tile<W: WeightValue>(
    a: &[f32],
    lda: usize,
    m: usize,
    w: &[W],
    ld: usize,
    cols: usize,
    k: usize,
    tile: &mut [f32],
    from_memory: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::simd_level() >= 1 {
        // Every row and weight row read below lies within `a` and `w`.
        assert!(m == 0 || (m - 1) * lda + k <= a.len());
        assert!(cols == 0 || (cols - 1) * ld + k <= w.len());
        assert!(tile.len() >= m * cols);
        let row = |i: usize| a[i * lda..].as_ptr();
        for (i, r) in groups(m) {
            let put = |q: usize, j: usize, v: f32| tile[(i + q) * cols + j] = v;
            // The first group reads the tile's weight rows from memory: one after another, a
            // single stream the hardware prefetcher follows (three read side by side took a
            // round's products at 8 rows from 35 to 43 ms: examples/few_rows_speed.rs). The
            // other groups find them in the cache and take three at a time.
            let width = if i == 0 && from_memory { 1 } else { BLOCK_COLS };
            // SAFETY: simd_level checked AVX2, FMA and F16C (f16 weights are widened with it);
            // the asserts above keep the k values read from each row and from each of the
            // `cols` weight rows in bounds.
            with_rows!(r, i, row, |rows| unsafe {
                row_group_avx2(rows, (w.as_ptr(), ld, cols), k, width, put)
            });
        }
        return;
    }
    dot_tile_portable(a, lda, m, w, ld, cols, k, tile)
}

simd_versions! {
    /// [`dot_tile`] without AVX2.
    #[allow(clippy::too_many_arguments)]
    fn dot_tile_portable<W: WeightValue>(a: &[f32], lda: usize, m: usize, w: &[W], ld: usize, cols: usize, k: usize, tile: &mut [f32]) {
        let row = |i: usize| &a[i * lda..i * lda + k];
        for (i, r) in groups(m) {
            for j in 0..cols {
                let wj = &w[j * ld..j * ld + k];
                let put = |q: usize, v: f32| tile[(i + q) * cols + j] = v;
                with_rows!(r, i, row, |rows| put_each(dots(rows, wj, k), put));
            }
        }
    }
}

/// Columns per panel of the packed [in, out] chunk ([`in_out_tile`]): two AVX2 vectors, so that
/// four rows take 8 sums in registers, each step loading 2 weight vectors and broadcasting 4
/// values for 8 fused multiply-adds. (Three vectors' 12 sums left the compiler one register
/// short: it kept a sum on the stack, and a round's products at 32 rows took 150 ms against 110.)
#[cfg(target_arch = "x86_64")]
const PANEL: usize = 16;

thread_local! {
    /// A task's packed chunk of an [in, out] weight: [`K_CHUNK`] rows of [`COLS_IN_OUT`]
    /// columns, panel after panel.
    #[cfg(target_arch = "x86_64")]
    static PACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `R` rows of A (from `x[r]`, kl values each) against a packed panel of `V` vectors (`p`: kl
/// steps of V·8 values side by side): the R × V·8 sums added into R rows of `out` (`ldo` apart).
///
/// # Safety
/// The CPU must have AVX2 and FMA; each `x[r]` must be valid for reads of kl values, `p` of
/// kl·V·8, and `out + r·ldo` for r < R for reads and writes of V·8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn panel_avx2<const R: usize, const V: usize>(
    x: [*const f32; R],
    p: *const f32,
    kl: usize,
    (out, ldo): (*mut f32, usize),
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); V]; R];
    // SAFETY: q < kl steps of V·8 values from `p`, q < kl from each row, V·8 of each out row.
    unsafe {
        for q in 0..kl {
            let mut wv = [_mm256_setzero_ps(); V];
            for (v, wv) in wv.iter_mut().enumerate() {
                *wv = _mm256_loadu_ps(p.add(q * V * 8 + v * 8));
            }
            for r in 0..R {
                let xv = _mm256_broadcast_ss(&*x[r].add(q));
                for v in 0..V {
                    acc[r][v] = _mm256_fmadd_ps(xv, wv[v], acc[r][v]);
                }
            }
        }
        for (r, sums) in acc.iter().enumerate() {
            for (v, &sum) in sums.iter().enumerate() {
                let o = out.add(r * ldo + v * 8);
                _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), sum));
            }
        }
    }
}

/// Copies rows k0..k0 + kl of the weight (`w`, rows `ld` apart; `vectors` values each, a
/// multiple of 8) into panels of [`PANEL`] columns at `packed` (panel j0's kl rows from
/// `packed + kl·j0`), and asks the cache for rows `next` (each row's `vectors` values).
///
/// # Safety
/// The CPU must have AVX2; `w + q·ld` must be valid for reads of `vectors` values for q in
/// k0..k0 + kl, `packed` for writes of kl·vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pack_avx2(
    (w, ld): (*const f32, usize),
    (k0, kl, vectors): (usize, usize, usize),
    next: Option<std::ops::Range<usize>>,
    packed: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut next = next.into_iter().flatten();
    // SAFETY: as the caller's; prefetches read nothing.
    unsafe {
        for q in 0..kl {
            let src = w.add((k0 + q) * ld);
            let mut j0 = 0;
            while j0 < vectors {
                let width = PANEL.min(vectors - j0);
                let dst = packed.add(kl * j0 + q * width);
                for v in (0..width).step_by(8) {
                    _mm256_storeu_ps(dst.add(v), _mm256_loadu_ps(src.add(j0 + v)));
                }
                j0 += width;
            }
            if let Some(row) = next.next() {
                prefetch_rows(w, ld, row..row + 1, vectors);
            }
        }
    }
}

/// Asks the L2 cache for `vectors` values of each of the weight's rows `rows` (`ld` apart).
///
/// # Safety
/// Nothing is read; the addresses must lie within the weight's allocation.
#[cfg(target_arch = "x86_64")]
unsafe fn prefetch_rows(w: *const f32, ld: usize, rows: std::ops::Range<usize>, vectors: usize) {
    use std::arch::x86_64::*;
    for row in rows {
        // SAFETY: the caller keeps the rows within the weight.
        let row = unsafe { w.add(row * ld) } as *const i8;
        for b in (0..vectors * 4).step_by(64) {
            // SAFETY: a prefetch reads nothing; the address is within the row.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(row.add(b)) };
        }
    }
}

/// [`axpy_tile`]'s sums with AVX2 where the CPU has it: each chunk of [`K_CHUNK`] weight rows
/// is first copied into panels of [`PANEL`] columns (a panel's rows side by side, read in order
/// by every group of rows, where the weight's own rows lie `ld` apart), then each group of four
/// rows runs through each panel with its sums in registers. Against the portable loop, a
/// serving round's products from [in, out] weights (`examples/few_rows_speed.rs -- --in-out`)
/// went from 170 to 90–100 ms at 32 rows and from 78–99 to 57–62 at 8.
#[allow(clippy::too_many_arguments)]
fn in_out_tile(
    a: &[f32],
    lda: usize,
    m: usize,
    w: &[f32],
    ld: usize,
    cols: usize,
    k: usize,
    tile: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::simd_level() >= 1 && cols <= COLS_IN_OUT {
        // Every row, weight value and tile value read below lies within `a`, `w` and `tile`.
        assert!(m == 0 || (m - 1) * lda + k <= a.len());
        assert!(k == 0 || (k - 1) * ld + cols <= w.len());
        assert!(tile.len() >= m * cols);
        tile[..m * cols].fill(0.0);
        let vectors = cols / 8 * 8;
        PACKED.with(|packed| {
            let mut packed = packed.borrow_mut();
            packed.resize(K_CHUNK * COLS_IN_OUT, 0.0);
            for k0 in (0..k).step_by(K_CHUNK) {
                let kl = K_CHUNK.min(k - k0);
                // Panels: (first column, width), each packed from kl·j0 on.
                let panels = (0..vectors)
                    .step_by(PANEL)
                    .map(|j0| (j0, PANEL.min(vectors - j0)));
                // The next chunk's rows, asked for now so that they arrive while this one's
                // products run: each row's part of the tile is only `cols` values, too short a
                // run for the hardware prefetcher (without this, a round's products at 8 rows
                // took 75 ms against 57–61).
                let next = (k0 + K_CHUNK < k).then(|| k0 + K_CHUNK..k.min(k0 + 2 * K_CHUNK));
                assert!(packed.len() >= kl * vectors);
                // SAFETY: simd_level checked AVX2; rows k0..k0 + kl (and the next chunk's, below
                // k) hold `vectors` ≤ cols values from w (asserted above), `packed` kl·vectors.
                unsafe {
                    pack_avx2(
                        (w.as_ptr(), ld),
                        (k0, kl, vectors),
                        next,
                        packed.as_mut_ptr(),
                    )
                };
                let row = |i: usize| a[i * lda + k0..].as_ptr();
                for (j0, width) in panels {
                    let p = packed[kl * j0..kl * (j0 + width)].as_ptr();
                    for (i, r) in groups(m) {
                        let out = (tile[i * cols + j0..].as_mut_ptr(), cols);
                        // SAFETY: simd_level checked AVX2 and FMA; each row holds kl values from
                        // k0 (asserted above), the panel kl·width, each of the group's tile rows
                        // width values from j0 (j0 + width ≤ cols).
                        with_rows!(r, i, row, |rows| unsafe {
                            match width {
                                16 => panel_avx2::<_, 2>(rows, p, kl, out),
                                _ => panel_avx2::<_, 1>(rows, p, kl, out),
                            }
                        });
                    }
                }
            }
        });
        // The last columns, fewer than 8.
        last_columns(a, lda, m, w, ld, vectors..cols, k, tile);
        return;
    }
    axpy_tile(a, lda, m, w, ld, cols, k, tile)
}

simd_versions! {
    /// tile[i·cols + j] = Σ_q A[i, q] · w[q·ld + j] for the m rows and `cols` columns: the
    /// weight's rows [`K_CHUNK`] at a time, each chunk's part of the tile (`cols` values of each
    /// of its rows, side by side in memory) read in from memory once and kept in cache while
    /// every group of rows passes, its sums added into the tile.
    #[allow(clippy::too_many_arguments)]
    fn axpy_tile(a: &[f32], lda: usize, m: usize, w: &[f32], ld: usize, cols: usize, k: usize, tile: &mut [f32]) {
        let body = cols / LANES * LANES;
        tile[..m * cols].fill(0.0);
        for k0 in (0..k).step_by(K_CHUNK) {
            let kl = K_CHUNK.min(k - k0);
            let row = |i: usize| &a[i * lda + k0..i * lda + k0 + kl];
            for (i, r) in groups(m) {
                for j0 in (0..body).step_by(LANES) {
                    let wj = &w[k0 * ld + j0..];
                    let put = |q: usize, v: [f32; LANES]| {
                        let at = (i + q) * cols + j0;
                        for (t, v) in tile[at..at + LANES].iter_mut().zip(v) {
                            *t += v;
                        }
                    };
                    with_rows!(r, i, row, |rows| put_each(strip(rows, wj, ld, kl), put));
                }
            }
        }
        // The last columns, fewer than LANES.
        last_columns(a, lda, m, w, ld, body..cols, k, tile);
    }
}

/// tile[i·cols + j] = Σ_q A[i, q] · w[q·ld + j] for the m rows and the columns `js`, which end
/// at the tile's width `cols`, one sum at a time: the few columns the vector kernels leave.
#[allow(clippy::too_many_arguments)]
fn last_columns(
    a: &[f32],
    lda: usize,
    m: usize,
    w: &[f32],
    ld: usize,
    js: std::ops::Range<usize>,
    k: usize,
    tile: &mut [f32],
) {
    let cols = js.end;
    for q in 0..m {
        let x = &a[q * lda..q * lda + k];
        for j in js.clone() {
            let mut s = 0f32;
            for (p, &xv) in x.iter().enumerate() {
                s += xv * w[p * ld + j];
            }
            tile[q * cols + j] = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(m: usize, n: usize, k: usize, a: &[f32], lda: usize, w: Weight) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|q| {
                        let wv = if w.trans {
                            w.data[j * w.ld + q]
                        } else {
                            w.data[q * w.ld + j]
                        };
                        a[i * lda + q] as f64 * wv as f64
                    })
                    .sum();
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32)
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed.wrapping_mul(40503));
                ((h >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Every row count 2..=FEW_ROWS, both weight layouts, shapes with and without tails (k and n not
    /// multiples of the lanes or the tile), rows and outputs with gaps, written and added.
    #[test]
    fn products_equal_the_sums_written_out() {
        for &(n, k) in &[(64, 512), (70, 37), (33, 1030), (5, 16), (300, 140)] {
            for trans in [true, false] {
                for m in 2..=FEW_ROWS {
                    let (lda, ldw, ldc) = (k + 3, if trans { k + 5 } else { n + 7 }, n + 2);
                    let a = values(m * lda, 1);
                    let stored = if trans { n } else { k };
                    let data = values(stored * ldw, 2);
                    let w = Weight {
                        data: &data,
                        ld: ldw,
                        trans,
                    };
                    let want = reference(m, n, k, &a, lda, w);
                    for accumulate in [false, true] {
                        let mut c = values(m * ldc, 3);
                        let before = c.clone();
                        // SAFETY: c holds m rows of ldc ≥ n values.
                        let ok = unsafe {
                            product((m, n, k), (&a, lda), w, (c.as_mut_ptr(), ldc), accumulate)
                        };
                        assert!(ok);
                        for i in 0..m {
                            for j in 0..ldc {
                                let got = c[i * ldc + j] as f64;
                                let old = before[i * ldc + j] as f64;
                                if j >= n {
                                    assert_eq!(got, old, "gap touched at {i},{j}");
                                    continue;
                                }
                                let expect = want[i * n + j] + if accumulate { old } else { 0.0 };
                                assert!(
                                    (got - expect).abs() <= 1e-4 * (1.0 + expect.abs()) * (k as f64).sqrt(),
                                    "m {m} n {n} k {k} trans {trans} acc {accumulate} at {i},{j}: {got} vs {expect}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The weight-row kernel without AVX2 (what CPUs without it run) gives the same sums.
    #[test]
    fn the_portable_kernel_equals_the_vector_one() {
        let (m, cols, k, lda, ld) = (7, 5, 45, 50, 47);
        let a = values(m * lda, 4);
        let w = values(cols * ld, 5);
        let (mut fast, mut portable) = (vec![0f32; m * cols], vec![0f32; m * cols]);
        dot_tile(&a, lda, m, &w, ld, cols, k, &mut fast, true);
        dot_tile_portable(&a, lda, m, &w, ld, cols, k, &mut portable);
        for (x, y) in fast.iter().zip(&portable) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
        let want = reference(
            m,
            cols,
            k,
            &a,
            lda,
            Weight {
                data: &w,
                ld,
                trans: true,
            },
        );
        for (x, y) in portable.iter().zip(&want) {
            assert!((*x as f64 - y).abs() < 1e-4, "{x} vs {y}");
        }
        // Half-precision weights, widened as they are read: the sums of their f32 values.
        fn widened<W: WeightValue>(w: &[f32], to: impl Fn(f32) -> W) -> (Vec<W>, Vec<f32>) {
            let half: Vec<W> = w.iter().map(|&v| to(v)).collect();
            let wide = half.iter().map(|v| v.widen()).collect();
            (half, wide)
        }
        fn check<W: WeightValue>(
            a: &[f32],
            (m, cols, k, lda, ld): Dims,
            (w, wide): (Vec<W>, Vec<f32>),
        ) {
            let (mut fast, mut portable) = (vec![0f32; m * cols], vec![0f32; m * cols]);
            dot_tile(a, lda, m, &w, ld, cols, k, &mut fast, true);
            dot_tile_portable(a, lda, m, &w, ld, cols, k, &mut portable);
            let data = &wide;
            let want = reference(
                m,
                cols,
                k,
                a,
                lda,
                Weight {
                    data,
                    ld,
                    trans: true,
                },
            );
            for ((x, y), z) in fast.iter().zip(&portable).zip(&want) {
                assert!(
                    (*x as f64 - z).abs() < 1e-4 && (*y as f64 - z).abs() < 1e-4,
                    "{x}, {y} vs {z}"
                );
            }
        }
        type Dims = (usize, usize, usize, usize, usize);
        let dims = (m, cols, k, lda, ld);
        check(&a, dims, widened(&w, half::bf16::from_f32));
        check(&a, dims, widened(&w, half::f16::from_f32));
    }

    /// The packed [in, out] kernel gives the portable one's sums for tiles of whole panels, of
    /// a narrower last panel and a tail of single columns, and of the tail alone, over several
    /// chunks of the weight's rows (the last one short).
    #[test]
    fn the_in_out_kernel_equals_the_portable_one() {
        let (k, lda, ld) = (300, 303, 270);
        for m in [1, 4, 5, 11] {
            let a = values(m * lda, 6);
            let w = values(k * ld, 7);
            for cols in [256, 44, 7] {
                let (mut fast, mut portable) = (vec![9f32; m * cols], vec![0f32; m * cols]);
                in_out_tile(&a, lda, m, &w, ld, cols, k, &mut fast);
                axpy_tile(&a, lda, m, &w, ld, cols, k, &mut portable);
                let want = reference(
                    m,
                    cols,
                    k,
                    &a,
                    lda,
                    Weight {
                        data: &w,
                        ld,
                        trans: false,
                    },
                );
                for (i, ((x, y), z)) in fast.iter().zip(&portable).zip(&want).enumerate() {
                    assert!((x - y).abs() < 1e-3, "m {m} cols {cols} at {i}: {x} vs {y}");
                    assert!(
                        (*y as f64 - z).abs() < 1e-3,
                        "m {m} cols {cols} at {i}: {y} vs {z}"
                    );
                }
            }
        }
    }

    #[test]
    fn products_it_cannot_take_are_refused_untouched() {
        let a = values(4 * 10, 1);
        let w = values(10 * 8, 2);
        let mut c = vec![7f32; 4 * 8];
        let weight = Weight {
            data: &w,
            ld: 8,
            trans: false,
        };
        // SAFETY: c holds 4 rows of 8.
        let ok = unsafe { product((4, 8, 11), (&a, 10), weight, (c.as_mut_ptr(), 8), false) };
        assert!(!ok);
        assert!(c.iter().all(|&v| v == 7.0));
        // More rows than the tiles hold.
        let rows = FEW_ROWS + 1;
        let (a, mut c) = (values(rows * 10, 1), vec![7f32; rows * 8]);
        // SAFETY: c holds `rows` rows of 8.
        let ok = unsafe { product((rows, 8, 10), (&a, 10), weight, (c.as_mut_ptr(), 8), false) };
        assert!(!ok);
        assert!(c.iter().all(|&v| v == 7.0));
        assert!(applies(8, 576, 576) && !applies(1, 576, 576));
        assert!(!applies(FEW_ROWS + 1, 576, 576));
        assert!(!applies(8, 16, 16));
    }
}
