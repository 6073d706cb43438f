//! Matrix products on the CPU through a system BLAS library loaded at run time, or through the
//! built-in product ([`crate::gemm`]) where none is installed.
//!
//! candle's CPU matmul (the `gemm` crate) reaches about a third of the f32 GEMM throughput that
//! OpenBLAS or MKL reach on the same cores, and matrix products are most of a training step. Any
//! library exporting the CBLAS functions `cblas_[sd]gemm`/`cblas_[sd]gemv` (OpenBLAS, BLIS, MKL) is
//! opened on first use; nothing is linked at build time. Without one, the built-in product (same
//! entry points) runs on CPUs with AVX2 or AVX-512, candle's matmul elsewhere.
//! `LMKIT_BLAS=/path/to/libopenblas.so` picks a library, `LMKIT_BLAS=builtin` the built-in
//! product, `LMKIT_BLAS=off` candle's. [`backend`] says which is in use.
//!
//! [`matmul`] is a differentiable CustomOp: its backward is two more products through the same
//! library (transposed operands are passed as BLAS transpose flags, not copied).

use crate::gemm::{strip_product, Part, Strips};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

pub type Gemm<T> = unsafe extern "C" fn(
    layout: i32,
    trans_a: i32,
    trans_b: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: T,
    a: *const T,
    lda: i32,
    b: *const T,
    ldb: i32,
    beta: T,
    c: *mut T,
    ldc: i32,
);

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

pub type Gemv<T> = unsafe extern "C" fn(
    layout: i32,
    trans: i32,
    m: i32,
    n: i32,
    alpha: T,
    a: *const T,
    lda: i32,
    x: *const T,
    incx: i32,
    beta: T,
    y: *mut T,
    incy: i32,
);

pub struct Blas {
    sgemm: Gemm<f32>,
    dgemm: Gemm<f64>,
    sgemv: Gemv<f32>,
    dgemv: Gemv<f64>,
    path: String,
    /// The library runs each call on the calling thread (OpenBLAS told so at load): lmkit splits
    /// products over rayon's threads itself, so no second thread pool competes for the cores.
    single_threaded: bool,
    // Keeps the library mapped for as long as the function pointers above are used (none for
    // the built-in product).
    _lib: Option<libloading::Library>,
}

/// Libraries tried, in order, when `LMKIT_BLAS` is not set.
const CANDIDATES: &[&str] = &[
    "libopenblas.so.0",
    "libopenblas.so",
    "libopenblas.dylib",
    "libmkl_rt.so.2",
    "libmkl_rt.so",
    "libblis.so.4",
    "libblis.so",
];

struct Loaded {
    blas: Option<Blas>,
    note: String,
}

impl From<Blas> for Loaded {
    fn from(b: Blas) -> Loaded {
        Loaded {
            note: format!("BLAS {}", b.path),
            blas: Some(b),
        }
    }
}

/// OpenBLAS releases older than the CPU they run on fall back to their slowest generic kernels
/// (Debian 12's 0.3.21 takes a Sapphire Rapids Xeon for a Prescott: 3-5x slower GEMM). Unless
/// the user chose one, name the kernel family the CPU supports; other libraries ignore this.
///
/// Called by [`open`]; a program should call it at the start of `main`, before it starts
/// threads, since it may set an environment variable.
pub fn choose_openblas_core() {
    if std::env::var_os("OPENBLAS_CORETYPE").is_some() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let core = if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
            "SkylakeX"
        } else if has!("avx2") && has!("fma") {
            "Haswell"
        } else {
            return;
        };
        // Read by OpenBLAS when it is loaded.
        std::env::set_var("OPENBLAS_CORETYPE", core);
    }
}

fn open(path: &str) -> Result<Blas, String> {
    choose_openblas_core();
    // SAFETY: loading a shared library runs its initialisers; the candidates are BLAS libraries,
    // and the symbols are declared with the CBLAS signatures.
    unsafe {
        let lib = libloading::Library::new(path).map_err(|e| e.to_string())?;
        let sgemm = *lib
            .get::<Gemm<f32>>(b"cblas_sgemm\0")
            .map_err(|e| e.to_string())?;
        let dgemm = *lib
            .get::<Gemm<f64>>(b"cblas_dgemm\0")
            .map_err(|e| e.to_string())?;
        let sgemv = *lib
            .get::<Gemv<f32>>(b"cblas_sgemv\0")
            .map_err(|e| e.to_string())?;
        let dgemv = *lib
            .get::<Gemv<f64>>(b"cblas_dgemv\0")
            .map_err(|e| e.to_string())?;
        type CoreName = unsafe extern "C" fn() -> *const std::ffi::c_char;
        let core = match lib.get::<CoreName>(b"openblas_get_corename\0") {
            Ok(f) => {
                let p = f();
                if p.is_null() {
                    String::new()
                } else {
                    let name = std::ffi::CStr::from_ptr(p).to_string_lossy();
                    format!(" (OpenBLAS, {name} kernels)")
                }
            }
            Err(_) => String::new(),
        };
        // OpenBLAS's own worker threads spin (sched_yield) between calls, taking cores from the
        // rayon threads that run every other op; with one thread per call there are none.
        type SetThreads = unsafe extern "C" fn(n: std::ffi::c_int);
        let single_threaded = match lib.get::<SetThreads>(b"openblas_set_num_threads\0") {
            Ok(f) => {
                f(1);
                true
            }
            Err(_) => false,
        };
        Ok(Blas {
            sgemm,
            dgemm,
            sgemv,
            dgemv,
            single_threaded,
            path: format!("{path}{core}"),
            _lib: Some(lib),
        })
    }
}

/// The built-in product ([`crate::gemm`]), where this CPU has a micro-kernel for it.
fn builtin() -> Option<Loaded> {
    let crate::gemm::Cblas {
        sgemm,
        dgemm,
        sgemv,
        dgemv,
    } = crate::gemm::functions()?;
    let isa = crate::gemm::isa()?;
    Some(Loaded {
        note: format!("built-in gemm ({isa})"),
        blas: Some(Blas {
            sgemm,
            dgemm,
            sgemv,
            dgemv,
            path: format!("built-in ({isa})"),
            single_threaded: true,
            _lib: None,
        }),
    })
}

fn candle_note(why: &str) -> Loaded {
    Loaded {
        blas: None,
        note: format!("candle gemm ({why})"),
    }
}

fn loaded() -> &'static Loaded {
    static LOADED: OnceLock<Loaded> = OnceLock::new();
    LOADED.get_or_init(|| match std::env::var("LMKIT_BLAS") {
        Ok(v) if matches!(v.as_str(), "off" | "0" | "none" | "") => candle_note("LMKIT_BLAS=off"),
        Ok(v) if v == "builtin" => builtin()
            .unwrap_or_else(|| candle_note("LMKIT_BLAS=builtin, but this CPU has no AVX2/AVX-512")),
        Ok(path) => match open(&path) {
            Ok(b) => Loaded::from(b),
            Err(e) => candle_note(&format!(
                "LMKIT_BLAS={path} could not be used: {e}; point it at a CBLAS library \
                 (OpenBLAS, MKL, BLIS), set it to `builtin`, or unset it"
            )),
        },
        Err(_) => {
            for c in CANDIDATES {
                if let Ok(b) = open(c) {
                    return Loaded::from(b);
                }
            }
            builtin().unwrap_or_else(|| {
                candle_note(
                    "no BLAS library found; installing OpenBLAS, e.g. \
                     `apt install libopenblas0-pthread`, makes CPU matrix products ~3x faster",
                )
            })
        }
    })
}

/// The BLAS library loaded in this process, if any.
pub(crate) fn loaded_blas() -> Option<&'static Blas> {
    blas()
}

fn blas() -> Option<&'static Blas> {
    loaded().blas.as_ref()
}

/// The loaded library, for a kernel (`what`) that cannot run without one.
pub fn require(what: &str) -> candle_core::Result<&'static Blas> {
    match blas() {
        Some(b) => Ok(b),
        None => candle_core::bail!("{what}: no BLAS library is loaded ({})", backend()),
    }
}

/// Which CPU matmul is in use, e.g. "BLAS libopenblas.so.0" or "candle gemm (…why…)".
pub fn backend() -> &'static str {
    &loaded().note
}

/// How one operand's last two dims [rows, cols] lie in memory, in BLAS terms.
#[derive(Clone, Copy)]
struct Mat {
    trans: bool,
    ld: usize,
}

/// Element (i, j) must be at i·ld + j (row-major) or j·ld + i (transposed); `None` when neither.
fn describe(rows: usize, cols: usize, sr: usize, sc: usize) -> Option<Mat> {
    let ld = if rows == 1 { cols.max(1) } else { sr };
    if (cols == 1 || sc == 1) && ld >= cols.max(1) {
        return Some(Mat { trans: false, ld });
    }
    let ld = if cols == 1 { rows.max(1) } else { sc };
    if (rows == 1 || sr == 1) && ld >= rows.max(1) {
        return Some(Mat { trans: true, ld });
    }
    None
}

/// Offsets of each matrix of a [batch..., r, c] layout, batch dims flattened in row-major order.
fn batch_offsets(l: &Layout) -> Vec<usize> {
    let dims = l.dims();
    let strides = l.stride();
    let nb = dims.len() - 2;
    let mut offs = vec![l.start_offset()];
    for d in 0..nb {
        offs = offs
            .iter()
            .flat_map(|&o| (0..dims[d]).map(move |i| o + i * strides[d]))
            .collect();
    }
    offs
}

struct BlasMatmul;

impl Blas {
    /// a · b for f32 or f64 CPU operands ([batch..., m, k] · [batch..., k, n]).
    fn product(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let split = self.single_threaded;
        match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                if let Some((v, s)) = few_rows_product(a, l1, b, l2)? {
                    return Ok((CpuStorage::F32(v), s));
                }
                let (v, s) = gemm_batched(self.sgemm, self.sgemv, split, 1f32, a, l1, b, l2)?;
                Ok((CpuStorage::F32(v), s))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                let (v, s) = gemm_batched(self.dgemm, self.dgemv, split, 1f64, a, l1, b, l2)?;
                Ok((CpuStorage::F64(v), s))
            }
            _ => candle_core::bail!("blas matmul: f32 or f64 operands of one dtype only"),
        }
    }
}

/// a · b through [`crate::few_rows`] where it applies: one product (no batch), a few rows of a
/// stored as rows; `None` otherwise.
fn few_rows_product(
    a: &[f32],
    la: &Layout,
    b: &[f32],
    lb: &Layout,
) -> candle_core::Result<Option<(Vec<f32>, Shape)>> {
    let (da, db) = (la.dims(), lb.dims());
    let r = da.len();
    if r < 2 || db.len() != r || da[..r - 2].iter().chain(&db[..r - 2]).any(|&d| d != 1) {
        return Ok(None);
    }
    let (m, k, n) = (da[r - 2], da[r - 1], db[r - 1]);
    let (sa, sb) = (la.stride(), lb.stride());
    let (Some(ma), Some(mb)) = (
        describe(m, k, sa[r - 2], sa[r - 1]),
        describe(k, n, sb[r - 2], sb[r - 1]),
    ) else {
        return Ok(None);
    };
    if ma.trans || !crate::few_rows::applies(m, n, k) {
        return Ok(None);
    }
    let w = crate::few_rows::Weight {
        data: &b[lb.start_offset()..],
        ld: mb.ld,
        trans: mb.trans,
    };
    let mut out = vec![0f32; m * n];
    // SAFETY: `out` holds m rows of n values.
    let done = unsafe {
        crate::few_rows::product(
            (m, n, k),
            (&a[la.start_offset()..], ma.ld),
            w,
            (out.as_mut_ptr(), n),
            false,
        )
    };
    let mut shape = da[..r - 1].to_vec();
    shape.push(n);
    Ok(done.then(|| (out, shape.into())))
}

#[allow(clippy::too_many_arguments)]
fn gemm_batched<T: Copy + Default + Send + Sync>(
    gemm: Gemm<T>,
    gemv: Gemv<T>,
    split: bool,
    one: T,
    a: &[T],
    la: &Layout,
    b: &[T],
    lb: &Layout,
) -> candle_core::Result<(Vec<T>, Shape)> {
    let (da, db) = (la.dims(), lb.dims());
    let r = da.len();
    let (m, k, n) = (da[r - 2], da[r - 1], db[r - 1]);
    let (oa, ob) = (batch_offsets(la), batch_offsets(lb));
    let mut shape = da[..r - 1].to_vec();
    shape.push(n);
    if m == 0 || n == 0 || k == 0 {
        return Ok((vec![T::default(); oa.len() * m * n], shape.into()));
    }
    // Every element is written by BLAS (beta = 0), so the output is not zeroed first (zeroing
    // it was ~5% of a training step).
    let mut out = Box::<[T]>::new_uninit_slice(oa.len() * m * n);
    let (sa, sb) = (la.stride(), lb.stride());
    let ma = describe(m, k, sa[r - 2], sa[r - 1]);
    let mb = describe(k, n, sb[r - 2], sb[r - 1]);
    let (Some(ma), Some(mb)) = (ma, mb) else {
        candle_core::bail!("blas matmul: operands must be row-major or transposed matrices")
    };
    if [m, n, k, ma.ld, mb.ld]
        .iter()
        .any(|&v| v > i32::MAX as usize)
    {
        candle_core::bail!("blas matmul: a dimension exceeds the BLAS 32-bit index range");
    }
    // Rows i0.. of `a` start i0·ld (row-major) or i0 (transposed) elements further on.
    let a_row = if ma.trans { 1 } else { ma.ld };
    let run = |c: &mut [std::mem::MaybeUninit<T>], oa: usize, ob: usize, rows: usize| {
        // SAFETY: `describe` checked that every element (i, j) of both operands lies at the
        // offsets BLAS will read (offset + i·ld + j or + j·ld + i within candle's storage, whose
        // layout addresses the same elements; `rows` ≤ m rows from `oa`); `c` holds exactly
        // rows·n elements with ldc = n.
        unsafe {
            gemm_raw(
                gemm,
                one,
                (rows, n, k),
                (a[oa..].as_ptr(), ma.ld, ma.trans),
                (b[ob..].as_ptr(), mb.ld, mb.trans),
                (c.as_mut_ptr().cast::<T>(), n),
            )
        }
    };
    let nb = oa.len();
    let threads = rayon::current_num_threads().max(1);
    if m == 1 {
        // One row (decoding a token): a matrix-vector product streams `b` once, where gemm
        // would first pack all of it; columns are split over the threads.
        let cols_per = if split {
            n.div_ceil(threads).max(64)
        } else {
            n
        };
        let x_inc = if ma.trans { ma.ld } else { 1 };
        let gemv_cols = |c: &mut [std::mem::MaybeUninit<T>], oa: usize, ob: usize, j0: usize| {
            let cols = c.len();
            // Columns j0.. of `b` start j0 (row-major) or j0·ld (transposed) elements further on.
            let (bo, trans, rows_b, cols_b) = if mb.trans {
                (ob + j0 * mb.ld, NO_TRANS, cols, k)
            } else {
                (ob + j0, TRANS, k, cols)
            };
            // SAFETY: `describe` checked both operands' layouts; the `cols` columns of `b` from
            // j0 and the k elements of `a` (stride x_inc) lie within the storages; `c` holds
            // exactly `cols` elements.
            unsafe {
                gemv(
                    ROW_MAJOR,
                    trans,
                    rows_b as i32,
                    cols_b as i32,
                    one,
                    b[bo..].as_ptr(),
                    mb.ld as i32,
                    a[oa..].as_ptr(),
                    x_inc as i32,
                    T::default(),
                    c.as_mut_ptr().cast::<T>(),
                    1,
                )
            }
        };
        out.par_chunks_mut(n)
            .zip(oa.par_iter().zip(ob.par_iter()))
            .for_each(|(c, (&oa, &ob))| {
                c.par_chunks_mut(cols_per)
                    .enumerate()
                    .for_each(|(i, cc)| gemv_cols(cc, oa, ob, i * cols_per))
            });
        // SAFETY: every output element was written by one gemv call above.
        return Ok((unsafe { out.assume_init() }.into_vec(), shape.into()));
    }
    // With a single-threaded library, each product is split into row blocks over the threads
    // (enough blocks for every thread when there are fewer products than threads); with a
    // threaded one, only many small products (attention heads) run side by side.
    let rows_per = if split && nb < threads {
        m.div_ceil(threads.div_ceil(nb)).max(m.min(32))
    } else {
        m
    };
    let product = |c: &mut [std::mem::MaybeUninit<T>], oa: usize, ob: usize| {
        if rows_per < m {
            c.par_chunks_mut(rows_per * n)
                .enumerate()
                .for_each(|(i, cc)| run(cc, oa + i * rows_per * a_row, ob, cc.len() / n));
        } else {
            run(c, oa, ob, m)
        }
    };
    if nb > 1 && (split || m * n * k < 1 << 22) {
        out.par_chunks_mut(m * n)
            .zip(oa.par_iter().zip(ob.par_iter()))
            .for_each(|(c, (&oa, &ob))| product(c, oa, ob));
    } else {
        out.chunks_mut(m * n)
            .zip(oa.iter().zip(ob.iter()))
            .for_each(|(c, (&oa, &ob))| product(c, oa, ob));
    }
    // SAFETY: the blocks above cover all oa.len()·m·n elements, each written by one gemm call.
    let out = unsafe { out.assume_init() }.into_vec();
    Ok((out, shape.into()))
}

impl CustomOp2 for BlasMatmul {
    fn name(&self) -> &'static str {
        "blas-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        require("blas matmul")?.product(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // A frozen operand (a weight not being trained) gets no gradient: computing it would
        // double the backward pass's work.
        let da = a.track_op().then(|| matmul(grad, &b.t()?)).transpose()?;
        let db = b.track_op().then(|| matmul(&a.t()?, grad)).transpose()?;
        Ok((da, db))
    }
}

fn usable(a: &Tensor, b: &Tensor) -> bool {
    a.device().is_cpu()
        && b.device().is_cpu()
        && matches!(a.dtype(), DType::F32 | DType::F64)
        && a.dtype() == b.dtype()
        && a.rank() >= 2
        && b.rank() >= 2
        && available()
}

/// Strides that `describe` cannot express (e.g. a permuted view) are made contiguous first.
fn blas_ready(x: &Tensor) -> candle_core::Result<Tensor> {
    let (dims, st) = (x.dims(), x.stride());
    let r = dims.len();
    if describe(dims[r - 2], dims[r - 1], st[r - 2], st[r - 1]).is_some() {
        Ok(x.clone())
    } else {
        x.contiguous()
    }
}

/// `a · b` with candle's `broadcast_matmul` semantics, through BLAS on the CPU when a library is
/// loaded ([`backend`]), through candle otherwise. Half-precision operands on the CPU are
/// multiplied in f32 and the result rounded once (candle's f16 matrix-vector product adds into
/// its f16 output column by column, rounding at every step).
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let half = |t: &Tensor| matches!(t.dtype(), DType::F16 | DType::BF16) && t.device().is_cpu();
    if half(a) && b.dtype() == a.dtype() && half(b) {
        // A linear layer's weight: widened a block of rows at a time.
        if let Some(y) = crate::half_weights::product(a, b)? {
            return Ok(y);
        }
        let y = matmul(&a.to_dtype(DType::F32)?, &b.to_dtype(DType::F32)?)?;
        return y.to_dtype(a.dtype());
    }
    if !usable(a, b) || a.dim(candle_core::D::Minus1)? != b.dim(candle_core::D::Minus2)? {
        return a.broadcast_matmul(b);
    }
    let (ra, rb) = (a.rank(), b.rank());
    if rb == 2 && ra > 2 {
        // [..., m, k] · [k, n]: one product over all rows of `a`.
        let dims = a.dims().to_vec();
        let a2 = a.reshape(((dims[..ra - 1].iter().product::<usize>()), dims[ra - 1]))?;
        let y = blas_ready(&a2)?.apply_op2(&blas_ready(b)?, BlasMatmul)?;
        let mut out = dims[..ra - 1].to_vec();
        out.push(b.dim(1)?);
        return y.reshape(out);
    }
    if ra == rb && a.dims()[..ra - 2] == b.dims()[..rb - 2] {
        return blas_ready(a)?.apply_op2(&blas_ready(b)?, BlasMatmul);
    }
    a.broadcast_matmul(b)
}

/// Whether [`matmul`] goes through BLAS for CPU f32/f64 tensors in this process.
pub fn available() -> bool {
    blas().is_some()
}

// ---------------------------------------------------------------- linear layer

/// x·w + b (+ r) as [rows, n]: C starts as the bias on every row (plus the residual `r`), and
/// the product accumulates into it — no zero fill of C and no second pass over it to add the
/// bias (each a full pass over a matrix that rarely fits in cache). One row (a decoding step)
/// goes through the matrix-vector product instead, which streams w once.
fn affine<T: BlasFloat>(
    blas: &Blas,
    (x, lx): (&[T], &Layout),
    (w, lw): (&[T], &Layout),
    b: &[T],
    r: Option<&[T]>,
    (rows, k, n): (usize, usize, usize),
) -> candle_core::Result<Vec<T>> {
    let Some((start, end)) = lx.contiguous_offsets() else {
        candle_core::bail!("blas affine: the input must be contiguous")
    };
    if b.len() != n || r.is_some_and(|r| r.len() != rows * n) || end - start != rows * k {
        candle_core::bail!("blas affine: the bias or residual does not match {rows}×{n}");
    }
    if rows < 2 {
        let l2 = Layout::contiguous_with_offset((rows, k), start);
        let split = blas.single_threaded;
        let (mut y, _) =
            gemm_batched(T::gemm(blas), T::gemv(blas), split, T::one(), x, &l2, w, lw)?;
        for (i, v) in y.iter_mut().enumerate() {
            *v += b[i % n] + r.map_or(T::zero(), |r| r[i]);
        }
        return Ok(y);
    }
    let (sw, ow) = (lw.stride(), lw.start_offset());
    let Some(mw) = describe(k, n, sw[0], sw[1]) else {
        candle_core::bail!("blas affine: the weight must be a row-major or transposed matrix")
    };
    let mut out = Box::<[T]>::new_uninit_slice(rows * n);
    out.par_chunks_mut(n.max(1) * 64)
        .enumerate()
        .for_each(|(i, part)| {
            for (j, row) in part.chunks_mut(n.max(1)).enumerate() {
                match r {
                    Some(r) => {
                        let at = (i * 64 + j) * n;
                        for ((o, &ri), &bi) in row.iter_mut().zip(&r[at..at + n]).zip(b) {
                            o.write(ri + bi);
                        }
                    }
                    None => {
                        for (o, &bi) in row.iter_mut().zip(b) {
                            o.write(bi);
                        }
                    }
                }
            }
        });
    // SAFETY: every element was written just above.
    let mut out = unsafe { out.assume_init() }.into_vec();
    let wop = Operand {
        data: &w[ow..],
        ld: mw.ld,
        trans: mw.trans,
    };
    gemm_par(
        blas,
        (rows, n, k),
        plain(&x[start..end], k),
        wop,
        &mut out,
        true,
    )?;
    Ok(out)
}

/// y = x·w + b for x [.., k] (contiguous; its rows form one [rows, k] matrix), w [k, n] (a
/// transposed view is fine) and b [n]: one graph node instead of a product and a bias add, whose
/// gradient accumulations in candle's backward pass each cost a full-size zero fill and add.
struct Affine {
    /// A residual [.., n] the output starts from (inference only: [`linear_add`]).
    residual: Option<Tensor>,
}

impl candle_core::CustomOp3 for Affine {
    fn name(&self) -> &'static str {
        "lmkit-affine"
    }
    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let blas = require("blas affine")?;
        let dims = lx.dims();
        let k = *dims.last().unwrap_or(&0);
        let rows = lx.shape().elem_count() / k.max(1);
        let n = lw.dims()[1];
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap_or(&mut 0) = n;
        let guard = self.residual.as_ref().map(Tensor::storage_and_layout);
        let r = match &guard {
            None => None,
            Some((st, l)) => match &**st {
                candle_core::Storage::Cpu(c) => Some((c, *l)),
                _ => candle_core::bail!("blas affine: CPU tensors only"),
            },
        };
        /// A CPU operand and its layout.
        type Stored<'a> = (&'a CpuStorage, &'a Layout);
        /// The operands as `T` slices, and the output.
        fn run<T: BlasFloat>(
            blas: &Blas,
            (x, w, b): (Stored, Stored, Stored),
            r: Option<Stored>,
            dims: (usize, usize, usize),
        ) -> candle_core::Result<CpuStorage> {
            let ((sx, lx), (sw, lw), (sb, lb)) = (x, w, b);
            let r = match r {
                Some((s, l)) => Some(contiguous(T::cpu_storage_as_slice(s)?, l)?),
                None => None,
            };
            let (x, w) = (T::cpu_storage_as_slice(sx)?, T::cpu_storage_as_slice(sw)?);
            let b = contiguous(T::cpu_storage_as_slice(sb)?, lb)?;
            let y = affine(blas, (x, lx), (w, lw), b, r, dims)?;
            Ok(T::to_cpu_storage_owned(y))
        }
        let operands = ((sx, lx), (sw, lw), (sb, lb));
        let out = match sx {
            CpuStorage::F32(_) => run::<f32>(blas, operands, r, (rows, k, n))?,
            CpuStorage::F64(_) => run::<f64>(blas, operands, r, (rows, k, n))?,
            _ => candle_core::bail!("blas affine: f32 or f64 operands of one dtype only"),
        };
        Ok((out, shape.into()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (k, n) = w.dims2()?;
        let rows = x.elem_count() / k.max(1);
        let dy2 = dy.contiguous()?.reshape((rows, n))?;
        // Frozen operands (weights not being trained) get no gradient.
        let dx = x
            .track_op()
            .then(|| matmul(&dy2, &w.t()?)?.reshape(x.shape()))
            .transpose()?;
        let dw = w
            .track_op()
            .then(|| matmul(&x.reshape((rows, k))?.t()?, &dy2))
            .transpose()?;
        let db = b
            .track_op()
            .then(|| crate::fused::column_sum(&dy2))
            .transpose()?;
        Ok((dx, dw, db))
    }
}

/// `x·w + b` for x [.., k], w [k, n], b [n] (or `x·w` without b): one fused node through BLAS on
/// the CPU when a library is loaded, one product with the bias in its epilogue on a GPU where
/// nothing tracks gradients (`cuda::linear`), [`matmul`] and the fused bias add otherwise.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let Some(b) = b else {
        return matmul(x, w);
    };
    let fits = usable(x, w)
        && w.rank() == 2
        && b.dtype() == x.dtype()
        && b.device().is_cpu()
        && b.dims() == [w.dim(1)?]
        && x.dim(candle_core::D::Minus1)? == w.dim(0)?;
    if !fits {
        #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
        if crate::cuda::layers_on(x) {
            if let Some(y) = crate::cuda::linear(x, w, Some(b), None)? {
                return Ok(y);
            }
        }
        if let Some(y) = crate::half_weights::product_bias(x, w, b)? {
            return Ok(y);
        }
        return crate::fused::add_bias(&matmul(x, w)?, b);
    }
    x.contiguous()?
        .apply_op3(&blas_ready(w)?, &b.contiguous()?, Affine { residual: None })
}

/// r + x·w + b (a residual connection after a linear layer) in one product for inference: the
/// output starts as r plus the bias and the product accumulates into it (see [`affine`]; on a
/// GPU, cuBLASLt's epilogue adds both: `cuda::linear`). With any operand tracked for a
/// gradient, or where neither product applies, it is `linear(x, w, b) + r` through the graph.
pub fn linear_add(x: &Tensor, w: &Tensor, b: &Tensor, r: &Tensor) -> candle_core::Result<Tensor> {
    let k = x.dim(candle_core::D::Minus1)?;
    let n = w.dim(candle_core::D::Minus1)?;
    let mut shape = x.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    let fits = usable(x, w)
        && w.rank() == 2
        && w.dim(0)? == k
        && [b, r]
            .iter()
            .all(|t| t.dtype() == x.dtype() && t.device().is_cpu())
        && b.dims() == [n]
        && r.dims() == shape.as_slice()
        && ![x, w, b, r].iter().any(|t| t.track_op());
    if !fits {
        #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
        if crate::cuda::layers_on(x) {
            if let Some(y) = crate::cuda::linear(x, w, Some(b), Some(r))? {
                return Ok(y);
            }
        }
        return linear(x, w, Some(b))? + r;
    }
    x.contiguous()?.apply_op3_no_bwd(
        &blas_ready(w)?,
        &b.contiguous()?,
        &Affine {
            residual: Some(r.contiguous()?),
        },
    )
}

// ---------------------------------------------------------------- fused causal self-attention

/// A raw pointer that parallel tasks share, each writing its own disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut<T>(pub(crate) *mut T);
// SAFETY: used only for writes of `T` values to disjoint elements (see each use), which is
// sound when `T` itself may be sent to another thread.
unsafe impl<T: Send> Send for SharedOut<T> {}
// SAFETY: as above; shared references to the wrapper only hand out the pointer.
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// The element `i` places on (a method, so closures capture the Send/Sync wrapper).
    pub(crate) fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

/// One row-major gemm call: C[m×n] (ldc) = op(A)[m×k] · op(B)[k×n].
///
/// # Safety
/// As [`gemm_raw_beta`].
pub(crate) unsafe fn gemm_raw<T: Copy + Default>(
    gemm: Gemm<T>,
    one: T,
    mnk: (usize, usize, usize),
    a: (*const T, usize, bool),
    b: (*const T, usize, bool),
    c: (*mut T, usize),
) {
    // SAFETY: the caller's guarantee, passed on.
    unsafe { gemm_raw_beta(gemm, one, T::default(), mnk, a, b, c) }
}

/// One row-major gemm call: C[m×n] (ldc) = alpha·op(A)[m×k] · op(B)[k×n] + beta·C.
///
/// # Safety
/// `gemm` must be a CBLAS gemm; A, B and C must hold every element op(A), op(B) and C span
/// with their leading dimensions (C writable, and initialised when beta ≠ 0); every dimension
/// must fit in an `i32`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw_beta<T: Copy + Default>(
    gemm: Gemm<T>,
    alpha: T,
    beta: T,
    (m, n, k): (usize, usize, usize),
    (a, lda, ta): (*const T, usize, bool),
    (b, ldb, tb): (*const T, usize, bool),
    (c, ldc): (*mut T, usize),
) {
    let tr = |t: bool| if t { TRANS } else { NO_TRANS };
    // SAFETY: the caller's guarantee on the pointers, extents and dimensions.
    unsafe {
        gemm(
            ROW_MAJOR,
            tr(ta),
            tr(tb),
            m as i32,
            n as i32,
            k as i32,
            alpha,
            a,
            lda as i32,
            b,
            ldb as i32,
            beta,
            c,
            ldc as i32,
        )
    }
}

/// Whether `len` values hold a row-major matrix of rows × cols whose rows lie `ld` apart.
pub(crate) fn holds(len: usize, (rows, cols): (usize, usize), ld: usize) -> bool {
    ld >= cols && (rows == 0 || cols == 0 || (rows - 1) * ld + cols <= len)
}

/// f32 and f64: the element types the BLAS kernels run in.
pub trait BlasFloat:
    crate::fused::FastMath
    + Default
    + std::ops::AddAssign
    + candle_core::WithDType
    + crate::gemm::Buffers
{
    fn gemm(blas: &Blas) -> Gemm<Self>;
    fn gemv(blas: &Blas) -> Gemv<Self>;
    /// The built-in product, where this CPU has a micro-kernel for it.
    fn builtin_gemm() -> Option<Gemm<Self>>;
    /// The product for attention's many small ones (a few dozen rows by a head's dimensions):
    /// the built-in product where the CPU has one — it skips a library's per-call set-up
    /// (attention forward and backward at SmolLM2's shapes took 8–10% less time than with
    /// OpenBLAS 0.3.21) — else the library's.
    fn attention_gemm(blas: &Blas) -> Gemm<Self> {
        Self::builtin_gemm().unwrap_or_else(|| Self::gemm(blas))
    }
    /// C[m×n] (rows `ldc` apart) = op(A)·op(B) (plus C when `accumulate`) through lmkit's own
    /// kernels where one applies (f32 only): [`crate::few_rows`] for a few rows of A stored as
    /// rows, AMX tiles from operands rounded to bf16 for more where [`set_bf16_products`] asked
    /// for that and the CPU has them; whether it ran.
    ///
    /// # Safety
    /// As [`gemm_into`]'s: `c` valid for the m rows of n elements, initialised when accumulating.
    unsafe fn own_kernels(
        (m, n, k): (usize, usize, usize),
        a: &Operand<Self>,
        b: &Operand<Self>,
        (c, ldc): (*mut Self, usize),
        accumulate: bool,
    ) -> bool {
        let _ = ((m, n, k), a, b, (c, ldc), accumulate);
        false
    }
}

impl BlasFloat for f32 {
    fn gemm(blas: &Blas) -> Gemm<f32> {
        blas.sgemm
    }
    fn builtin_gemm() -> Option<Gemm<f32>> {
        crate::gemm::functions().map(|f| f.sgemm)
    }
    fn gemv(blas: &Blas) -> Gemv<f32> {
        blas.sgemv
    }
    unsafe fn own_kernels(
        (m, n, k): (usize, usize, usize),
        a: &Operand<f32>,
        b: &Operand<f32>,
        (c, ldc): (*mut f32, usize),
        accumulate: bool,
    ) -> bool {
        if !a.trans && crate::few_rows::applies(m, n, k) {
            let w = crate::few_rows::Weight {
                data: b.data,
                ld: b.ld,
                trans: b.trans,
            };
            // SAFETY: the caller's guarantee on `c`.
            return unsafe {
                crate::few_rows::product((m, n, k), (a.data, a.ld), w, (c, ldc), accumulate)
            };
        }
        if !bf16_products() || m <= crate::few_rows::FEW_ROWS || n < 32 || k < 32 {
            return false;
        }
        // SAFETY: the caller's guarantee on `c`; `gemm_into` checked the operands' extents.
        unsafe { crate::amx::product_f32((m, n, k), a, b, (c, ldc), accumulate) }
    }
}

static BF16_PRODUCTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether f32 products of more than a few rows through [`gemm_par`], [`gemm_par_ld`] and
/// [`product`] round their operands to bf16 and run on AMX tiles with f32 sums, where the CPU
/// has them ([`crate::amx::available`]): `train.dtype = "bf16"` on the CPU. The training
/// passes' linear layers and output layer take this path; attention's products, element-wise
/// ops, weights, optimizer state, activations and gradients stay f32.
pub fn set_bf16_products(on: bool) {
    BF16_PRODUCTS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// As set by [`set_bf16_products`].
pub fn bf16_products() -> bool {
    BF16_PRODUCTS.load(std::sync::atomic::Ordering::Relaxed)
}

impl BlasFloat for f64 {
    fn gemm(blas: &Blas) -> Gemm<f64> {
        blas.dgemm
    }
    fn builtin_gemm() -> Option<Gemm<f64>> {
        crate::gemm::functions().map(|f| f.dgemm)
    }
    fn gemv(blas: &Blas) -> Gemv<f64> {
        blas.dgemv
    }
}

/// An operand of [`gemm_par`]: row-major data with leading dimension `ld`, used as stored or
/// transposed.
pub struct Operand<'a, T> {
    pub data: &'a [T],
    pub ld: usize,
    pub trans: bool,
}

/// `data` [rows, ld] used as stored.
pub fn plain<T>(data: &[T], ld: usize) -> Operand<'_, T> {
    Operand {
        data,
        ld,
        trans: false,
    }
}

/// `data` [rows, ld] used transposed.
pub fn transposed<T>(data: &[T], ld: usize) -> Operand<'_, T> {
    Operand {
        data,
        ld,
        trans: true,
    }
}

/// C [m×n] (contiguous rows) = op(A)[m×k] · op(B)[k×n], plus C's previous contents when
/// `accumulate`: row blocks of C over rayon's threads (the library itself runs single-threaded).
pub fn gemm_par<T: BlasFloat>(
    blas: &Blas,
    (m, n, k): (usize, usize, usize),
    a: Operand<T>,
    b: Operand<T>,
    c: &mut [T],
    accumulate: bool,
) -> candle_core::Result<()> {
    if c.len() != m * n {
        candle_core::bail!(
            "blas product: the output holds {} elements, not {m}×{n}",
            c.len()
        );
    }
    // SAFETY: `c` holds m·n initialised elements.
    unsafe { gemm_into(blas, (m, n, k), a, b, (c.as_mut_ptr(), n), accumulate) }
}

/// As [`gemm_par`], into C rows that lie `ldc` apart in `c` (a block of columns of a wider
/// matrix: `c` starts at the block's first element).
pub fn gemm_par_ld<T: BlasFloat>(
    blas: &Blas,
    (m, n, k): (usize, usize, usize),
    a: Operand<T>,
    b: Operand<T>,
    (c, ldc): (&mut [T], usize),
    accumulate: bool,
) -> candle_core::Result<()> {
    if !holds(c.len(), (m, n), ldc) {
        candle_core::bail!(
            "blas product: an output of {} elements with rows {ldc} apart does not hold {m}×{n}",
            c.len()
        );
    }
    // SAFETY: rows i < m of C occupy c[i·ldc .. i·ldc + n], within `c` (checked above), all
    // initialised.
    unsafe { gemm_into(blas, (m, n, k), a, b, (c.as_mut_ptr(), ldc), accumulate) }
}

/// A new [m×n] = op(A)[m×k] · op(B)[k×n] (as [`gemm_par`]), not zero-filled first: BLAS
/// writes every element.
pub fn product<T: BlasFloat>(
    blas: &Blas,
    (m, n, k): (usize, usize, usize),
    a: Operand<T>,
    b: Operand<T>,
) -> candle_core::Result<Vec<T>> {
    let mut out = Box::<[T]>::new_uninit_slice(m * n);
    // SAFETY: `out` has room for m·n elements; with accumulate = false every one is written
    // (by BLAS with beta = 0, or zeroed when k = 0) before `assume_init`.
    unsafe {
        gemm_into(
            blas,
            (m, n, k),
            a,
            b,
            (out.as_mut_ptr().cast::<T>(), n),
            false,
        )?;
        Ok(out.assume_init().into_vec())
    }
}

/// The body of [`gemm_par`], [`gemm_par_ld`] and [`product`], writing C through `c` (rows
/// `ldc` apart).
///
/// # Safety
/// `c` must be valid for writes of the m rows of n elements (and hold initialised ones when
/// `accumulate`), row i at `c + i·ldc`.
unsafe fn gemm_into<T: BlasFloat>(
    blas: &Blas,
    (m, n, k): (usize, usize, usize),
    a: Operand<T>,
    b: Operand<T>,
    (c, ldc): (*mut T, usize),
    accumulate: bool,
) -> candle_core::Result<()> {
    // Whether an op(X) of r×s lies within the operand's data (as stored: transposed or not).
    let extent = |(r, s): (usize, usize), x: &Operand<T>| {
        let stored = if x.trans { (s, r) } else { (r, s) };
        holds(x.data.len(), stored, x.ld)
    };
    if !extent((m, k), &a) || !extent((k, n), &b) {
        candle_core::bail!("blas product: operand sizes do not match {m}×{k}·{k}×{n}");
    }
    if [m, n, k, a.ld, b.ld, ldc]
        .iter()
        .any(|&v| v > i32::MAX as usize)
    {
        candle_core::bail!("blas matmul: a dimension exceeds the BLAS 32-bit index range");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: the caller's guarantee; all-zero bits are 0.0 in f32 and f64.
                unsafe { std::ptr::write_bytes(c.wrapping_add(i * ldc), 0, n) };
            }
        }
        return Ok(());
    }
    // SAFETY: the caller's guarantee on `c`.
    if unsafe { T::own_kernels((m, n, k), &a, &b, (c, ldc), accumulate) } {
        return Ok(());
    }
    let threads = rayon::current_num_threads().max(1);
    let beta = if accumulate { T::one() } else { T::zero() };
    let gemm = T::gemm(blas);
    let out = SharedOut(c);
    // A single-threaded library runs on pieces of C over rayon's threads. Each piece packs all
    // of the operand it shares with the others: pieces of rows repack op(B) (k·n values) per
    // thread, pieces of columns repack op(A) (m·k) — so C is cut into pieces of columns when it
    // is much wider than tall (an output layer's vocabulary), of rows otherwise: at 1024 × 1536
    // × 576 (a LoRA step's MLP) pieces of rows measured as fast or faster than of columns. A
    // product of fewer than 16 rows stays whole (as pieces of rows do): such products come many
    // at a time, one per task of a parallel loop (a recurrence's steps).
    let by_cols = blas.single_threaded && n > 2 * m && m >= 16 && threads > 1;
    let per = if !blas.single_threaded {
        m
    } else if by_cols {
        // Whole 32-column strips of the micro-kernels per piece.
        n.div_ceil(threads).next_multiple_of(32)
    } else {
        m.div_ceil(threads).max(16)
    };
    let a_row = if a.trans { 1 } else { a.ld };
    let b_col = if b.trans { b.ld } else { 1 };
    let pieces = if by_cols {
        n.div_ceil(per)
    } else {
        m.div_ceil(per)
    };
    (0..pieces).into_par_iter().for_each(|i| {
        let (r0, rows, c0, cols) = if by_cols {
            (0, m, i * per, per.min(n - i * per))
        } else {
            (i * per, per.min(m - i * per), 0, n)
        };
        // SAFETY: the extents checked above hold every element BLAS reads of op(A) rows
        // r0..r0 + rows (offset r0·a_row) and of op(B) columns c0..c0 + cols (offset c0·b_col);
        // piece i alone writes C rows r0..r0 + rows, columns c0..c0 + cols, within the rows the
        // caller provides.
        unsafe {
            gemm_raw_beta(
                gemm,
                T::one(),
                beta,
                (rows, cols, k),
                (a.data[r0 * a_row..].as_ptr(), a.ld, a.trans),
                (b.data[c0 * b_col..].as_ptr(), b.ld, b.trans),
                (out.at(r0 * ldc + c0), ldc),
            )
        }
    });
    Ok(())
}

/// Shapes of a packed [b, t, 3·c] q|k|v tensor split into `heads` heads of `hd` dims.
#[derive(Clone, Copy)]
pub struct Heads {
    pub b: usize,
    pub t: usize,
    pub heads: usize,
    pub hd: usize,
}

impl Heads {
    pub(crate) fn c(&self) -> usize {
        self.heads * self.hd
    }
    /// Each batch row's sequence as a span of rows.
    fn spans(&self) -> Vec<(usize, usize)> {
        sequence_spans(self.b, self.t, None).unwrap_or_default()
    }
    fn gqa<'a>(&self, spans: &'a [(usize, usize)]) -> Gqa<'a> {
        Gqa {
            spans,
            heads: self.heads,
            kv_heads: self.heads,
            hd: self.hd,
        }
    }
}

/// Causal self-attention over rows of packed projections `[q of every head | k of every
/// key/value head | v of every key/value head]` (`hd` values per head): sequences are runs of
/// rows (`spans`: first row, rows), each attending only within itself, and query head h reads
/// key/value head h / (heads / kv_heads) (grouped-query attention; kv_heads = heads is plain
/// multi-head attention). Several sequences packed into one batch row are separate spans.
#[derive(Clone, Copy)]
pub struct Gqa<'a> {
    pub spans: &'a [(usize, usize)],
    pub heads: usize,
    pub kv_heads: usize,
    pub hd: usize,
}

impl Gqa<'_> {
    /// Values in a row of q|k|v.
    pub fn width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.hd
    }
    /// Values in a row of the output (every query head).
    pub fn out_width(&self) -> usize {
        self.heads * self.hd
    }
    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    /// Columns of key/value head g's k and v.
    fn kv_cols(&self, g: usize) -> (usize, usize) {
        let k = (self.heads + g) * self.hd;
        (k, k + self.kv_heads * self.hd)
    }
    /// Rows `qkv` must hold, heads that divide evenly, spans within them.
    fn check(&self, len: usize, what: &str) -> candle_core::Result<usize> {
        let rows = self.spans.iter().map(|&(r, n)| r + n).max().unwrap_or(0);
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            candle_core::bail!(
                "{what}: {} query heads do not share {} key/value heads evenly",
                self.heads,
                self.kv_heads
            );
        }
        if rows * self.width() > len {
            candle_core::bail!(
                "{what}: q|k|v holds {len} values, fewer than {rows} rows of {}",
                self.width()
            );
        }
        Ok(rows)
    }
    /// Tasks of a forward pass: (span, query head, first row, end row) for blocks of
    /// `block(t)` query rows of each head of a span of t rows.
    fn row_blocks(&self, block: impl Fn(usize) -> usize) -> Vec<(usize, usize, usize, usize)> {
        let mut tasks = Vec::new();
        for (si, &(_, t)) in self.spans.iter().enumerate() {
            let block = block(t).max(1);
            for h in 0..self.heads {
                for r0 in (0..t).step_by(block) {
                    tasks.push((si, h, r0, (r0 + block).min(t)));
                }
            }
        }
        tasks
    }
    /// The scores' scale, 1/√hd.
    fn scale<T: BlasFloat>(&self) -> T {
        T::one() / T::from(self.hd).unwrap_or_else(T::one).sqrt()
    }
    /// The longest span.
    fn longest(&self) -> usize {
        self.spans.iter().map(|&(_, n)| n).max().unwrap_or(0)
    }
}

/// Rows per block of the causal attention products: row block [r0, r1) needs keys 0..r1 only,
/// so the products skip the masked upper triangle block by block (~60% of the full work at
/// t = 256). Tests use small blocks so that short sequences span several.
const CAUSAL_BLOCK: usize = if cfg!(test) { 3 } else { 64 };

/// Query rows per task of the forward pass over a t-row sequence: larger blocks for long
/// sequences, whose keys are then packed for fewer products (one 4,096-token window of a 135M
/// Llama: 9.7 s with 64-row blocks, 9.1–9.2 s with 256), small ones for short sequences, where
/// the masked corner of each block would be a large part of the work.
fn forward_block(t: usize) -> usize {
    (t / 16).clamp(CAUSAL_BLOCK, 256)
}

/// Row blocks [r0, r1) of a t-row causal attention.
fn causal_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(CAUSAL_BLOCK)
        .map(move |r0| (r0, (r0 + CAUSAL_BLOCK).min(t)))
}

/// P = causal softmax(scale · q·kᵀ) of query head `h` over the span of `t` rows from row `r`,
/// into `p` [t, t] (zeros above the diagonal).
#[allow(clippy::too_many_arguments)]
fn attention_probs<T: BlasFloat>(
    gemm: Gemm<T>,
    qkv: &[T],
    s: &Gqa,
    (r, t): (usize, usize),
    h: usize,
    scale: T,
    p: &mut [T],
) {
    let w = s.width();
    let (q, k) = (r * w + h * s.hd, r * w + s.kv_cols(h / s.group()).0);
    for (r0, r1) in causal_blocks(t) {
        // SAFETY: q rows r0..r1 and k rows 0..r1 of the span lie at q/k + i·w .. + hd within
        // `qkv` (checked by the caller: every span's rows are within it); the block writes
        // p[r0..r1, 0..r1] (ldc t) within its t·t elements.
        unsafe {
            gemm_raw(
                gemm,
                T::one(),
                (r1 - r0, r1, s.hd),
                (qkv[q + r0 * w..].as_ptr(), w, false),
                (qkv[k..].as_ptr(), w, true),
                (p[r0 * t..].as_mut_ptr(), t),
            )
        };
    }
    for (i, row) in p[..t * t].chunks_mut(t).enumerate() {
        crate::fused::softmax_row(row, i + 1, scale);
    }
}

/// The attention output [b, t, c] of the packed q|k|v.
pub fn attention_fwd<T: BlasFloat>(
    gemm: Gemm<T>,
    qkv: &[T],
    s: Heads,
) -> candle_core::Result<Vec<T>> {
    gqa_attention_fwd(gemm, qkv, s.gqa(&s.spans()))
}

/// The attention output [rows, heads·hd] of the packed q|k|v (see [`Gqa`]); rows outside every
/// span are zero. Tasks are blocks of query rows of one head: each computes its rows' scores
/// over the keys they see, so one long sequence spreads over every thread.
///
/// Where the CPU has a micro-kernel for the built-in product, every product runs on operands
/// packed once ([`strips_attention_fwd`]); elsewhere through `gemm`.
pub fn gqa_attention_fwd<T: BlasFloat>(
    gemm: Gemm<T>,
    qkv: &[T],
    s: Gqa,
) -> candle_core::Result<Vec<T>> {
    if crate::gemm::isa().is_some() {
        strips_attention_fwd(qkv, s)
    } else {
        products_attention_fwd(gemm, qkv, s)
    }
}

/// [`gqa_attention_fwd`] through `gemm` calls: tasks are blocks of query rows of one head, each
/// product packing its operands.
#[doc(hidden)]
pub fn products_attention_fwd<T: BlasFloat>(
    gemm: Gemm<T>,
    qkv: &[T],
    s: Gqa,
) -> candle_core::Result<Vec<T>> {
    let rows = s.check(qkv.len(), "attention")?;
    let (hd, w, c) = (s.hd, s.width(), s.out_width());
    let scale = s.scale::<T>();
    let longest = s.longest();
    let tasks = s.row_blocks(forward_block);
    let mut y = crate::buffers::zeros(rows * c);
    let out = SharedOut(y.as_mut_ptr());
    tasks.into_par_iter().for_each_init(
        || vec![T::zero(); forward_block(longest) * longest],
        |p, (si, h, r0, r1)| {
            let (r, _) = s.spans[si];
            let (kc, vc) = s.kv_cols(h / s.group());
            let (q, k, v) = (r * w + h * hd, r * w + kc, r * w + vc);
            // SAFETY: q rows r0..r1 and k, v rows 0..r1 of the span lie at q/k/v + i·w .. + hd
            // within `qkv` (`check`: every span's rows are within it); the scores P
            // [r1 − r0, r1] (ld r1) fit the forward_block(longest) × longest buffer (blocks
            // grow with the sequence); task (span, h, r0)
            // alone writes y[r + r0..r + r1, h·hd .. (h+1)·hd] (ldc = c): spans do not overlap.
            unsafe {
                gemm_raw(
                    gemm,
                    T::one(),
                    (r1 - r0, r1, hd),
                    (qkv[q + r0 * w..].as_ptr(), w, false),
                    (qkv[k..].as_ptr(), w, true),
                    (p.as_mut_ptr(), r1),
                );
            }
            for (i, row) in p[..(r1 - r0) * r1].chunks_mut(r1).enumerate() {
                crate::fused::softmax_row(row, r0 + i + 1, scale);
            }
            // SAFETY: as above; P is 0 past each row's last seen key.
            unsafe {
                gemm_raw(
                    gemm,
                    T::one(),
                    (r1 - r0, hd, r1),
                    (p.as_ptr(), r1, false),
                    (qkv[v..].as_ptr(), w, false),
                    (out.at((r + r0) * c + h * hd), c),
                )
            };
        },
    );
    Ok(y)
}

/// Gradient of the packed q|k|v from dy [b, t, c] (see [`gqa_attention_bwd`]).
pub fn attention_bwd<T: BlasFloat>(
    gemm: Gemm<T>,
    qkv: &[T],
    dy: &[T],
    s: Heads,
) -> candle_core::Result<Vec<T>> {
    gqa_attention_bwd(gemm, qkv, dy, s.gqa(&s.spans()))
}

/// Gradient of the packed q|k|v from dy [rows, heads·hd], recomputing each head's P (keeping
/// them from the forward pass measured no faster: [b, heads, t, t] per block streams through
/// memory twice): dV = Pᵀ·dY, dP = dY·Vᵀ, dS = scale·P ⊙ (dP − rowsum(dP ⊙ P)), dQ = dS·K,
/// dK = dSᵀ·Q, each product restricted to the causal blocks (P and dS are 0 above the
/// diagonal); a key/value head's gradients add up over the query heads that read it.
///
/// Where the CPU has a micro-kernel for the built-in product, every product runs on operands
/// packed once ([`strips_attention_bwd`]); elsewhere through `gemm`.
pub fn gqa_attention_bwd<T: BlasFloat>(
    gemm: Gemm<T>,
    qkv: &[T],
    dy: &[T],
    s: Gqa,
) -> candle_core::Result<Vec<T>> {
    if crate::gemm::isa().is_some() {
        strips_attention_bwd(qkv, dy, s)
    } else {
        products_attention_bwd(gemm, qkv, dy, s)
    }
}

/// The rows of q|k|v and of dy [rows, heads·hd] the backward pass reads are there.
fn check_bwd<T>(qkv: &[T], dy: &[T], s: &Gqa) -> candle_core::Result<usize> {
    let rows = s.check(qkv.len(), "attention backward")?;
    let c = s.out_width();
    if dy.len() < rows * c {
        candle_core::bail!(
            "attention backward: dy holds {} values, fewer than {rows} rows of {c}",
            dy.len()
        );
    }
    Ok(rows)
}

/// [`gqa_attention_bwd`] through `gemm` calls on blocks of rows.
#[doc(hidden)]
pub fn products_attention_bwd<T: BlasFloat>(
    gemm: Gemm<T>,
    qkv: &[T],
    dy: &[T],
    s: Gqa,
) -> candle_core::Result<Vec<T>> {
    check_bwd(qkv, dy, &s)?;
    let (hd, w, c) = (s.hd, s.width(), s.out_width());
    let scale = s.scale::<T>();
    let longest = s.longest();
    let mut dqkv = crate::buffers::zeros(qkv.len());
    let out = SharedOut(dqkv.as_mut_ptr());
    (0..s.spans.len() * s.kv_heads)
        .into_par_iter()
        .for_each_init(
            || {
                let n = longest * longest;
                (vec![T::zero(); n], vec![T::zero(); n])
            },
            |(p, dp), task| {
                let (r, t) = s.spans[task / s.kv_heads];
                if t == 0 {
                    return;
                }
                let g = task % s.kv_heads;
                let (kc, vc) = s.kv_cols(g);
                let (k, v) = (r * w + kc, r * w + vc);
                for h in g * s.group()..(g + 1) * s.group() {
                    attention_probs(gemm, qkv, &s, (r, t), h, scale, p);
                    let q = r * w + h * hd;
                    let dy_h = r * c + h * hd;
                    for (r0, r1) in causal_blocks(t) {
                        // SAFETY: task (span, g) writes only the span's rows of its q heads'
                        // and of its k and v head's columns of dqkv (ldc = w), which no other
                        // task writes; reads stay within `qkv`, `dy` (ld c) and the t×t
                        // buffers. Rows r0..r1 of dV gain P[r0.., r0..r1]ᵀ·dY[r0..]
                        // (P[i, j] = 0 for i < j); dP rows r0..r1 need columns 0..r1 only.
                        unsafe {
                            gemm_raw_beta(
                                gemm,
                                T::one(),
                                T::one(),
                                (r1 - r0, hd, t - r0),
                                (p[r0 * t + r0..].as_ptr(), t, true),
                                (dy[dy_h + r0 * c..].as_ptr(), c, false),
                                (out.at(v + r0 * w), w),
                            );
                            gemm_raw(
                                gemm,
                                T::one(),
                                (r1 - r0, r1, hd),
                                (dy[dy_h + r0 * c..].as_ptr(), c, false),
                                (qkv[v..].as_ptr(), w, true),
                                (dp[r0 * t..].as_mut_ptr(), t),
                            );
                        }
                    }
                    for (i, (pr, dr)) in p[..t * t].chunks(t).zip(dp.chunks_mut(t)).enumerate() {
                        crate::fused::softmax_bwd_row(&pr[..=i], &mut dr[..=i], scale);
                        dr[i + 1..].iter_mut().for_each(|v| *v = T::zero());
                    }
                    for (r0, r1) in causal_blocks(t) {
                        // SAFETY: as above; dS[r0..r1, 0..r1]·K[0..r1] gives dQ rows r0..r1,
                        // and dS[r0.., r0..r1]ᵀ·Q[r0..] adds to dK rows r0..r1
                        // (dS[i, j] = 0 for i < j).
                        unsafe {
                            gemm_raw(
                                gemm,
                                T::one(),
                                (r1 - r0, hd, r1),
                                (dp[r0 * t..].as_ptr(), t, false),
                                (qkv[k..].as_ptr(), w, false),
                                (out.at(q + r0 * w), w),
                            );
                            gemm_raw_beta(
                                gemm,
                                T::one(),
                                T::one(),
                                (r1 - r0, hd, t - r0),
                                (dp[r0 * t + r0..].as_ptr(), t, true),
                                (qkv[q + r0 * w..].as_ptr(), w, false),
                                (out.at(k + r0 * w), w),
                            );
                        }
                    }
                }
            },
        );
    Ok(dqkv)
}

/// Query rows per task of [`strips_attention_fwd`]: about 64, in whole strips of the kernel.
fn query_block<T: BlasFloat>() -> usize {
    let (mr, _) = crate::gemm::strip_widths::<T>();
    64usize.div_ceil(mr) * mr
}

/// Which operand of a causal attention [`CausalRows::start`] places.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Role {
    /// A query head's rows.
    Q,
    /// A key/value head's keys.
    K,
    /// A key/value head's values.
    V,
    /// A query head's output rows.
    Y,
}

/// Where the operands of a causal grouped-query attention lie: sequences of queries, each the
/// last of its keys, with every head's rows of hd values at a fixed stride from a start of its
/// own (the packed q|k|v of a training pass; the [b, heads, t, hd] heads and KV cache views of
/// a prompt).
pub(crate) struct CausalRows<'a, T> {
    /// Per sequence: its queries t and the keys before its first query o (query i sees keys
    /// 0 ..= o + i of the sequence's o + t).
    pub seqs: &'a [(usize, usize)],
    pub heads: usize,
    pub kv_heads: usize,
    pub hd: usize,
    /// Queries, keys and values, each with the stride between its rows.
    pub q: (&'a [T], usize),
    pub k: (&'a [T], usize),
    pub v: (&'a [T], usize),
    /// The stride between the output's rows.
    pub y_ld: usize,
    /// Where row 0 of (operand, sequence, head) starts: query and output heads h < heads, key
    /// and value heads g < kv_heads.
    pub start: &'a (dyn Fn(Role, usize, usize) -> usize + Sync),
}

impl<T> CausalRows<'_, T> {
    /// `data` from row 0 of (role, sequence, head), or an error naming the operand.
    pub(crate) fn rows<'d>(
        &self,
        data: &'d [T],
        role: Role,
        si: usize,
        h: usize,
    ) -> candle_core::Result<&'d [T]> {
        match data.get((self.start)(role, si, h)..) {
            Some(x) => Ok(x),
            None => candle_core::bail!(
                "attention: the {role:?} rows of head {h} lie past their storage"
            ),
        }
    }

    /// Query heads per key/value head, once the heads divide evenly and every head's rows lie
    /// within their operand (and the output's within `y_len` values).
    pub(crate) fn check(&self, y_len: usize) -> candle_core::Result<usize> {
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            candle_core::bail!(
                "attention: {} query heads do not share {} key/value heads evenly",
                self.heads,
                self.kv_heads
            );
        }
        // The end of a head's last row (saturating: past any storage).
        let end = |role, si, h, rows: usize, ld: usize| {
            (self.start)(role, si, h)
                .saturating_add((rows - 1).saturating_mul(ld))
                .saturating_add(self.hd)
        };
        for (si, &(t, o)) in self.seqs.iter().enumerate().filter(|(_, s)| s.0 > 0) {
            for h in 0..self.heads {
                for (role, ld, len) in [
                    (Role::Q, self.q.1, self.q.0.len()),
                    (Role::Y, self.y_ld, y_len),
                ] {
                    if end(role, si, h, t, ld) > len {
                        candle_core::bail!(
                            "attention: the {role:?} rows of head {h} lie past their storage"
                        );
                    }
                }
            }
            for g in 0..self.kv_heads {
                for (role, (data, ld)) in [(Role::K, self.k), (Role::V, self.v)] {
                    if end(role, si, g, o + t, ld) > data.len() {
                        candle_core::bail!(
                            "attention: the {role:?} rows of head {g} lie past their storage"
                        );
                    }
                }
            }
        }
        Ok(self.heads / self.kv_heads)
    }

    /// The forward pass's tasks: (sequence, query head, first row, end row) for blocks of
    /// `block` query rows of each head of each sequence.
    pub(crate) fn tasks(&self, block: usize) -> Vec<(usize, usize, usize, usize)> {
        let mut tasks = Vec::new();
        for (si, &(t, _)) in self.seqs.iter().enumerate() {
            for h in 0..self.heads {
                for r0 in (0..t).step_by(block) {
                    tasks.push((si, h, r0, (r0 + block).min(t)));
                }
            }
        }
        tasks
    }
}

/// softmax(scale·q·kᵀ)·v over the causal keys of each sequence of `a` into `y` (each query
/// head's rows at `a.start(Role::Y, ..)`, `a.y_ld` apart; the rest of `y` is left as it is), on
/// the built-in micro-kernel with each operand packed once: every key/value head's keys (for
/// q·kᵀ) and values (for p·v) first, then tasks of query rows of one head (their queries and
/// probabilities packed by the task). Each strip of query rows (the kernel's MR) multiplies only
/// the keys its last row sees, so the masked part of the scores is skipped to within a strip.
pub(crate) fn causal_strips_fwd<T: BlasFloat>(
    a: &CausalRows<T>,
    y: &mut [T],
    scale: T,
) -> candle_core::Result<()> {
    let hd = a.hd;
    let group = a.check(y.len())?;
    let (_, nr) = crate::gemm::strip_widths::<T>();
    let kv: Vec<(Strips<T>, Strips<T>)> = (0..a.seqs.len() * a.kv_heads)
        .into_par_iter()
        .map(|task| {
            let (si, g) = (task / a.kv_heads, task % a.kv_heads);
            let (t, o) = a.seqs[si];
            let (mut k, mut v) = (Strips::default(), Strips::default());
            if t > 0 {
                // op(B) = Kᵀ [hd, o + t] and V [o + t, hd].
                let ((kd, kl), (vd, vl)) = (a.k, a.v);
                k.pack_b(a.rows(kd, Role::K, si, g)?, kl, true, (hd, o + t))?;
                v.pack_b(a.rows(vd, Role::V, si, g)?, vl, false, (o + t, hd))?;
            }
            Ok((k, v))
        })
        .collect::<candle_core::Result<_>>()?;
    let tasks = a.tasks(query_block::<T>());
    let out = SharedOut(y.as_mut_ptr());
    let one = (T::one(), T::zero());
    tasks.into_par_iter().try_for_each_init(
        || (Strips::default(), Strips::default(), Vec::new()),
        |(qs, ps, p), (si, h, r0, r1)| {
            let (_, o) = a.seqs[si];
            let (ks, vs) = &kv[si * a.kv_heads + h / group];
            let (rb, (qd, ql)) = (r1 - r0, a.q);
            let q = a.rows(qd, Role::Q, si, h)?;
            qs.pack_a(q.get(r0 * ql..).unwrap_or_default(), ql, false, (rb, hd))?;
            // Scores [rb, o + r1] (rows lp apart: whole strips of keys); each strip of rows
            // takes the keys its last row sees, the rest of a row is zeroed by its softmax.
            let keys = o + r1;
            let lp = keys.next_multiple_of(nr);
            p.resize(rb * lp, T::zero());
            // SAFETY: the [rb, lp] scores; keys run to the end of a strip: o + r1 ≤ o + t
            // rounded up to whole strips, lp at most.
            unsafe {
                strip_product(
                    (qs, 0),
                    (ks, 0),
                    (rb, lp),
                    0..hd,
                    Part::ColumnsBefore(o + r0),
                    one,
                    p.as_mut_ptr(),
                    lp,
                )
            };
            for (i, row) in p.chunks_mut(lp).enumerate() {
                crate::fused::softmax_row(&mut row[..keys], o + r0 + i + 1, scale);
            }
            ps.pack_a(p, lp, false, (rb, keys))?;
            // SAFETY: task (sequence, h, r0) alone writes its query rows r0..r1 of head h,
            // within `y` (checked above: every head's t rows); P is 0 past each row's last seen
            // key.
            unsafe {
                strip_product(
                    (ps, 0),
                    (vs, 0),
                    (rb, hd),
                    0..keys,
                    Part::StepsBefore(o + r0),
                    one,
                    out.at((a.start)(Role::Y, si, h) + r0 * a.y_ld),
                    a.y_ld,
                )
            };
            candle_core::Result::Ok(())
        },
    )?;
    Ok(())
}

/// `f` of the rows of a causal attention over the packed q|k|v of `s` (see [`Gqa`]).
fn on_packed<T, R>(qkv: &[T], s: &Gqa, f: impl FnOnce(&CausalRows<T>) -> R) -> R {
    let (hd, w, c) = (s.hd, s.width(), s.out_width());
    let seqs: Vec<(usize, usize)> = s.spans.iter().map(|&(_, t)| (t, 0)).collect();
    let start = |role, si: usize, h: usize| {
        let r = s.spans[si].0;
        match role {
            Role::Q => r * w + h * hd,
            Role::K => r * w + s.kv_cols(h).0,
            Role::V => r * w + s.kv_cols(h).1,
            Role::Y => r * c + h * hd,
        }
    };
    f(&CausalRows {
        seqs: &seqs,
        heads: s.heads,
        kv_heads: s.kv_heads,
        hd,
        q: (qkv, w),
        k: (qkv, w),
        v: (qkv, w),
        y_ld: c,
        start: &start,
    })
}

/// [`gqa_attention_fwd`] on the built-in micro-kernel ([`causal_strips_fwd`] over the packed
/// q|k|v).
fn strips_attention_fwd<T: BlasFloat>(qkv: &[T], s: Gqa) -> candle_core::Result<Vec<T>> {
    let rows = s.check(qkv.len(), "attention")?;
    let mut y = crate::buffers::zeros(rows * s.out_width());
    on_packed(qkv, &s, |a| causal_strips_fwd(a, &mut y, s.scale()))?;
    Ok(y)
}

/// The attention output [rows, heads·hd] of a packed q|k|v (bf16, or f32 rounded to it) on the
/// AMX tiles ([`crate::amx::causal_attention`]), rounded once to bf16; an error where the CPU
/// has no tiles.
fn tiles_attention_fwd<T: crate::amx::TileValue>(
    qkv: &[T],
    s: Gqa,
) -> candle_core::Result<Vec<half::bf16>> {
    Ok(crate::half_weights::narrowed_bf16(&tiles_attention_sums(
        qkv, s,
    )?))
}

/// [`tiles_attention_fwd`]'s output in f32, not rounded.
fn tiles_attention_sums<T: crate::amx::TileValue>(
    qkv: &[T],
    s: Gqa,
) -> candle_core::Result<Vec<f32>> {
    let rows = s.check(qkv.len(), "attention")?;
    let mut y = crate::buffers::zeros(rows * s.out_width());
    if !on_packed(qkv, &s, |a| {
        crate::amx::causal_attention(a, &mut y, s.scale())
    })? {
        candle_core::bail!("fused attention: bf16 needs the AMX tiles");
    }
    Ok(y)
}

/// [`gqa_attention_bwd`] on the built-in micro-kernel, each operand packed once per task (a
/// sequence's key/value head and the query heads that read it). P and dP are computed a strip
/// of query rows at a time over the keys each strip sees; dQ = dS·K over the same keys; dK =
/// dSᵀ·Q and dV = Pᵀ·dY a strip of keys at a time over the queries that see them (from the
/// key on).
fn strips_attention_bwd<T: BlasFloat>(qkv: &[T], dy: &[T], s: Gqa) -> candle_core::Result<Vec<T>> {
    check_bwd(qkv, dy, &s)?;
    let (hd, w, c) = (s.hd, s.width(), s.out_width());
    let scale = s.scale::<T>();
    let (mr, nr) = crate::gemm::strip_widths::<T>();
    let mut dqkv = crate::buffers::zeros(qkv.len());
    let out = SharedOut(dqkv.as_mut_ptr());
    #[derive(Default)]
    struct Bufs<T> {
        /// op(B) = Kᵀ, Vᵀ, K; op(A) = Q, dY; op(B) = Q, dY; op(A) = Pᵀ, dS, dSᵀ in turn.
        kt: Strips<T>,
        vt: Strips<T>,
        kn: Strips<T>,
        qa: Strips<T>,
        dya: Strips<T>,
        qb: Strips<T>,
        dyb: Strips<T>,
        sq: Strips<T>,
        p: Vec<T>,
        dp: Vec<T>,
    }
    let (set, add) = ((T::one(), T::zero()), (T::one(), T::one()));
    (0..s.spans.len() * s.kv_heads)
        .into_par_iter()
        .try_for_each_init(Bufs::default, |b, task| {
            let (r, t) = s.spans[task / s.kv_heads];
            if t == 0 {
                return candle_core::Result::Ok(());
            }
            let g = task % s.kv_heads;
            let (kc, vc) = s.kv_cols(g);
            let (k, v) = (r * w + kc, r * w + vc);
            b.kt.pack_b(&qkv[k..], w, true, (hd, t))?;
            b.vt.pack_b(&qkv[v..], w, true, (hd, t))?;
            b.kn.pack_b(&qkv[k..], w, false, (t, hd))?;
            // P and dP [t, t], rows lp apart (whole strips of keys).
            let lp = t.next_multiple_of(nr);
            b.p.resize(t * lp, T::zero());
            b.dp.resize(t * lp, T::zero());
            for h in g * s.group()..(g + 1) * s.group() {
                let (q, dyh) = (r * w + h * hd, r * c + h * hd);
                b.qa.pack_a(&qkv[q..], w, false, (t, hd))?;
                b.dya.pack_a(&dy[dyh..], c, false, (t, hd))?;
                // SAFETY: the [t, lp] buffers; keys to the end of a strip (lp at most).
                unsafe {
                    let keys = Part::ColumnsBefore(0);
                    let (pp, dpp) = (b.p.as_mut_ptr(), b.dp.as_mut_ptr());
                    strip_product((&b.qa, 0), (&b.kt, 0), (t, lp), 0..hd, keys, set, pp, lp);
                    strip_product((&b.dya, 0), (&b.vt, 0), (t, lp), 0..hd, keys, set, dpp, lp);
                }
                // The products below read, of row i's keys after i, only those up to the end of
                // i's strip of MR rows (the strips are packed on their side of the diagonal
                // only): those are zeroed, the rest is not read.
                for (i, (pr, dr)) in b.p.chunks_mut(lp).zip(b.dp.chunks_mut(lp)).enumerate() {
                    let band = t.min((i / mr + 1) * mr);
                    crate::fused::softmax_row(&mut pr[..band], i + 1, scale);
                    crate::fused::softmax_bwd_row(&pr[..=i], &mut dr[..=i], scale);
                    dr[i + 1..band].iter_mut().for_each(|v| *v = T::zero());
                }
                // Rows [t, hd] of dqkv from column `at` (ldc = w): a t × t operand's product
                // with a [t, hd] one, each strip of rows over its `part` of the steps.
                let grad = |a: &Strips<T>, x: &Strips<T>, part: Part, ab: (T, T), at: usize| {
                    // SAFETY: task (span, g) alone writes the span's rows of its q heads' and of
                    // its k and v head's columns of dqkv, which hold t rows of hd from `at`.
                    unsafe { strip_product((a, 0), (x, 0), (t, hd), 0..t, part, ab, out.at(at), w) }
                };
                // P and dS are 0 above the diagonal: dV and dK rows k.. need queries k.. only,
                // dQ row i keys ..= i only.
                b.dyb.pack_b(&dy[dyh..], c, false, (t, hd))?;
                let (from, before) = (Part::StepsFrom(0), Part::StepsBefore(0));
                b.sq.pack_a_part(&b.p, lp, true, (t, t), from)?;
                grad(&b.sq, &b.dyb, from, add, v);
                b.sq.pack_a_part(&b.dp, lp, false, (t, t), before)?;
                grad(&b.sq, &b.kn, before, set, q);
                b.qb.pack_b(&qkv[q..], w, false, (t, hd))?;
                b.sq.pack_a_part(&b.dp, lp, true, (t, t), from)?;
                grad(&b.sq, &b.qb, from, add, k);
            }
            Ok(())
        })?;
    Ok(dqkv)
}

struct CausalSelfAttention {
    heads: usize,
}
struct CausalSelfAttentionBwd {
    heads: usize,
}

pub(crate) fn heads_of(l: &Layout, heads: usize) -> candle_core::Result<Heads> {
    let &[b, t, c3] = l.dims() else {
        candle_core::bail!("fused attention: q|k|v must be [batch, seq, 3·dim]")
    };
    if c3 % (3 * heads) != 0 {
        candle_core::bail!("fused attention: {c3} is not 3 × {heads} heads × head dim");
    }
    Ok(Heads {
        b,
        t,
        heads,
        hd: c3 / 3 / heads,
    })
}

pub(crate) fn contiguous<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("fused attention: inputs must be contiguous"),
    }
}

/// [`causal_self_attention`] of a bf16 q|k|v on the AMX tiles (inference: no backward).
struct TilesSelfAttention {
    heads: usize,
}

impl candle_core::CustomOp1 for TilesSelfAttention {
    fn name(&self) -> &'static str {
        "lmkit-tiles-self-attention"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = heads_of(l, self.heads)?;
        let CpuStorage::BF16(v) = st else {
            candle_core::bail!("fused attention on the tiles: bf16 only");
        };
        let y = tiles_attention_fwd(contiguous(v, l)?, s.gqa(&s.spans()))?;
        Ok((CpuStorage::BF16(y), (s.b, s.t, s.c()).into()))
    }
}

impl candle_core::CustomOp1 for CausalSelfAttention {
    fn name(&self) -> &'static str {
        "lmkit-causal-self-attention"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let blas = require("fused attention")?;
        let s = heads_of(l, self.heads)?;
        let y = match st {
            CpuStorage::F32(v) => CpuStorage::F32(attention_fwd(blas.sgemm, contiguous(v, l)?, s)?),
            CpuStorage::F64(v) => CpuStorage::F64(attention_fwd(blas.dgemm, contiguous(v, l)?, s)?),
            _ => candle_core::bail!("fused attention: f32 or f64 only"),
        };
        Ok((y, (s.b, s.t, s.c()).into()))
    }
    fn bwd(&self, qkv: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = CausalSelfAttentionBwd { heads: self.heads };
        Ok(Some(qkv.apply_op2_no_bwd(&dy.contiguous()?, &op)?))
    }
}

impl CustomOp2 for CausalSelfAttentionBwd {
    fn name(&self) -> &'static str {
        "lmkit-causal-self-attention-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let blas = require("fused attention")?;
        let s = heads_of(l1, self.heads)?;
        if l2.dims() != [s.b, s.t, s.c()] {
            candle_core::bail!("fused attention: gradient shape {:?}", l2.dims());
        }
        let g = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(d)) => CpuStorage::F32(attention_bwd(
                blas.sgemm,
                contiguous(x, l1)?,
                contiguous(d, l2)?,
                s,
            )?),
            (CpuStorage::F64(x), CpuStorage::F64(d)) => CpuStorage::F64(attention_bwd(
                blas.dgemm,
                contiguous(x, l1)?,
                contiguous(d, l2)?,
                s,
            )?),
            _ => candle_core::bail!("fused attention: f32 or f64 only"),
        };
        Ok((g, l1.shape().clone()))
    }
}

/// Causal multi-head self-attention straight from the packed projection `qkv` [b, t, 3·c]
/// (q | k | v, as GPT-2's `c_attn` gives it) to the heads' concatenated output [b, t, c]:
/// per (row, head), P = causal softmax(q·kᵀ/√d), y = P·v, with BLAS products on strided views of
/// `qkv` — no head split, transposes, mask or separate softmax in the graph. The backward pass
/// recomputes P instead of keeping it. A half-type `qkv` (inference) goes through f32, or for
/// bf16 on a CPU with AMX tiles runs on them (`amx::causal_attention`). `None` when it does
/// not apply (not on the CPU in f32/f64 or a half type, or no BLAS library): the
/// caller uses the composed attention.
pub fn causal_self_attention(qkv: &Tensor, heads: usize) -> candle_core::Result<Option<Tensor>> {
    // A bf16 model's pass on a CPU with AMX tiles: on them (q, k, v and the probabilities in
    // bf16, sums and softmax in f32).
    if qkv.dtype() == DType::BF16
        && qkv.device().is_cpu()
        && !qkv.track_op()
        && crate::amx::available()
    {
        return qkv
            .contiguous()?
            .apply_op1_no_bwd(&TilesSelfAttention { heads })
            .map(Some);
    }
    // A half-type model's pass: in f32, the output rounded once.
    if let Some(y) = crate::half_ops::in_f32(qkv, |q| causal_self_attention(q, heads))? {
        return Ok(Some(y));
    }
    if !(qkv.device().is_cpu() && matches!(qkv.dtype(), DType::F32 | DType::F64) && available()) {
        return Ok(None);
    }
    qkv.contiguous()?
        .apply_op1(CausalSelfAttention { heads })
        .map(Some)
}

/// Each sequence of a [b, t] batch as (first row, rows) of its flattened rows: one per row, or
/// the sequences `segments` gives for each row (lengths in order, summing to t).
pub fn sequence_spans(
    b: usize,
    t: usize,
    segments: Option<&[Vec<usize>]>,
) -> candle_core::Result<Vec<(usize, usize)>> {
    let Some(segs) = segments else {
        return Ok((0..b).map(|bi| (bi * t, t)).collect());
    };
    let mut spans = Vec::new();
    for bi in 0..b {
        let row = segs.get(bi).map(Vec::as_slice).unwrap_or_default();
        if row.iter().sum::<usize>() != t {
            candle_core::bail!("packed row {bi}: sequence lengths do not sum to {t}");
        }
        let mut at = bi * t;
        for &n in row.iter().filter(|&&n| n > 0) {
            spans.push((at, n));
            at += n;
        }
    }
    Ok(spans)
}

/// Each of `rows` rows' position: its place in its span (0 outside every span).
pub fn span_positions(rows: usize, spans: &[(usize, usize)]) -> Vec<usize> {
    let mut pos = vec![0; rows];
    for &(r, n) in spans {
        for (i, p) in pos[r..r + n].iter_mut().enumerate() {
            *p = i;
        }
    }
    pos
}

/// Rotary embedding and causal grouped-query attention from packed projections (see
/// [`rope_causal_attention`]).
struct RopeAttention {
    heads: usize,
    kv_heads: usize,
    spans: Vec<(usize, usize)>,
}

/// Inputs (q|k|v, table, dy); output dq|dk|dv.
struct RopeAttentionBwd<'a>(&'a RopeAttention);

impl RopeAttention {
    /// The op for `qkv` [b, t, _]: heads that divide evenly, each row's sequences.
    fn new(
        qkv: &Tensor,
        heads: usize,
        kv_heads: usize,
        segments: Option<&[Vec<usize>]>,
    ) -> candle_core::Result<Self> {
        let (b, t, _) = qkv.dims3()?;
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            candle_core::bail!(
                "rope attention: {heads} query heads for {kv_heads} key/value heads"
            );
        }
        Ok(Self {
            heads,
            kv_heads,
            spans: sequence_spans(b, t, segments)?,
        })
    }

    fn gqa(&self, hd: usize) -> Gqa<'_> {
        Gqa {
            spans: &self.spans,
            heads: self.heads,
            kv_heads: self.kv_heads,
            hd,
        }
    }

    /// Head size from q|k|v [b, t, w] and the table [positions, hd]; shapes, spans and
    /// positions checked.
    fn head_dim(&self, qkv: &Layout, table: &Layout) -> candle_core::Result<usize> {
        let (&[b, t, w], &[positions, hd]) = (qkv.dims(), table.dims()) else {
            candle_core::bail!("rope attention: q|k|v must be [batch, seq, width], the table [positions, head dim]");
        };
        if hd == 0 || w != (self.heads + 2 * self.kv_heads) * hd {
            candle_core::bail!(
                "rope attention: rows of {w} are not {} + 2 × {} heads of {hd}",
                self.heads,
                self.kv_heads
            );
        }
        let end = self.spans.iter().map(|&(r, n)| r + n).max().unwrap_or(0);
        if end > b * t {
            candle_core::bail!("rope attention: sequences reach past the {} rows", b * t);
        }
        if let Some(&(_, n)) = self.spans.iter().find(|&&(_, n)| n > positions) {
            candle_core::bail!(
                "rope attention: a sequence of {n} positions, the table has {positions}"
            );
        }
        Ok(hd)
    }

    /// Rotates the queries and keys of q|k|v rows `x` in place (by −θ when `inverse`: the
    /// backward pass).
    fn rotate<T: BlasFloat>(&self, x: &mut [T], table: &[T], hd: usize, inverse: bool) {
        let w = (self.heads + 2 * self.kv_heads) * hd;
        let pos = span_positions(x.len() / w, &self.spans);
        let cols = 0..(self.heads + self.kv_heads) * hd;
        crate::fused::rope_heads_in_place(x, w, cols, hd, &pos, table, inverse);
    }

    /// q|k|v with the queries and keys rotated.
    fn rotated<T: BlasFloat>(&self, qkv: &[T], table: &[T], hd: usize) -> Vec<T> {
        let mut x = qkv.to_vec();
        self.rotate(&mut x, table, hd, false);
        x
    }

    fn fwd<T: BlasFloat>(&self, qkv: &[T], table: &[T], hd: usize) -> candle_core::Result<Vec<T>> {
        let blas = require("rope attention")?;
        gqa_attention_fwd(T::gemm(blas), &self.rotated(qkv, table, hd), self.gqa(hd))
    }

    fn bwd<T: BlasFloat>(
        &self,
        qkv: &[T],
        table: &[T],
        dy: &[T],
        hd: usize,
    ) -> candle_core::Result<Vec<T>> {
        let blas = require("rope attention")?;
        let x = self.rotated(qkv, table, hd);
        let mut d = gqa_attention_bwd(T::gemm(blas), &x, dy, self.gqa(hd))?;
        self.rotate(&mut d, table, hd, true);
        Ok(d)
    }
}

/// [`rope_causal_attention`] of a bf16 q|k|v (and the f32 table) on the AMX tiles: the rotation
/// in f32 on the widened projections, as for f32, then [`crate::amx::causal_attention`] (q, k, v
/// and the probabilities rounded to bf16), the output rounded once. Inference: no backward.
struct RopeTilesAttention(RopeAttention);

impl CustomOp2 for RopeTilesAttention {
    fn name(&self) -> &'static str {
        "lmkit-rope-tiles-attention"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = &self.0;
        let hd = op.head_dim(l1, l2)?;
        let out = match (s1, s2) {
            (CpuStorage::BF16(x), CpuStorage::F32(t)) => {
                let wide: Vec<f32> = contiguous(x, l1)?.iter().map(|v| v.to_f32()).collect();
                let x = op.rotated(&wide, contiguous(t, l2)?, hd);
                CpuStorage::BF16(tiles_attention_fwd(&x, op.gqa(hd))?)
            }
            // A block-quantized model's f32 rows: rounded as they are packed, the output f32.
            (CpuStorage::F32(x), CpuStorage::F32(t)) => {
                let x = op.rotated(contiguous(x, l1)?, contiguous(t, l2)?, hd);
                CpuStorage::F32(tiles_attention_sums(&x, op.gqa(hd))?)
            }
            _ => candle_core::bail!("rope attention on the tiles: bf16 or f32 q|k|v, an f32 table"),
        };
        let d = l1.dims();
        Ok((out, (d[0], d[1], op.heads * hd).into()))
    }
}

impl CustomOp2 for RopeAttention {
    fn name(&self) -> &'static str {
        "lmkit-rope-attention"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let hd = self.head_dim(l1, l2)?;
        let y = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(t)) => {
                CpuStorage::F32(self.fwd(contiguous(x, l1)?, contiguous(t, l2)?, hd)?)
            }
            (CpuStorage::F64(x), CpuStorage::F64(t)) => {
                CpuStorage::F64(self.fwd(contiguous(x, l1)?, contiguous(t, l2)?, hd)?)
            }
            _ => candle_core::bail!("rope attention: f32 or f64 only, one dtype"),
        };
        let d = l1.dims();
        Ok((y, (d[0], d[1], self.heads * hd).into()))
    }
    fn bwd(
        &self,
        qkv: &Tensor,
        table: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = qkv.apply_op3_no_bwd(table, &dy.contiguous()?, &RopeAttentionBwd(self))?;
        Ok((Some(d), None))
    }
}

impl candle_core::CustomOp3 for RopeAttentionBwd<'_> {
    fn name(&self) -> &'static str {
        "lmkit-rope-attention-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.0;
        let hd = op.head_dim(l1, l2)?;
        let d = l1.dims();
        if l3.dims() != [d[0], d[1], op.heads * hd] {
            candle_core::bail!("rope attention: gradient shape {:?}", l3.dims());
        }
        let g = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(t), CpuStorage::F32(dy)) => {
                CpuStorage::F32(op.bwd(
                    contiguous(x, l1)?,
                    contiguous(t, l2)?,
                    contiguous(dy, l3)?,
                    hd,
                )?)
            }
            (CpuStorage::F64(x), CpuStorage::F64(t), CpuStorage::F64(dy)) => {
                CpuStorage::F64(op.bwd(
                    contiguous(x, l1)?,
                    contiguous(t, l2)?,
                    contiguous(dy, l3)?,
                    hd,
                )?)
            }
            _ => candle_core::bail!("rope attention: f32 or f64 only, one dtype"),
        };
        Ok((g, l1.shape().clone()))
    }
}

/// Rotary embedding ("rotate half", `table` [positions, head dim]: cos values then sin values)
/// of the queries and keys, then causal grouped-query attention, straight from the packed
/// projections `qkv` [b, t, (heads + 2·kv_heads)·head dim] (q | k | v, as a Llama layer's
/// projections give them side by side) to the heads' output [b, t, heads·head dim]. Each row
/// is one sequence, or the sequences `segments` gives (lengths in order; positions and
/// attention restart at each). BLAS products over the causal blocks only, no [t, t] mask or
/// repeated key/value heads; the backward pass recomputes P. A half-type `qkv` (inference) goes
/// through f32 (`table` is f32 for such a model), or for bf16 on a CPU with AMX tiles rotates in
/// f32 and attends on them (`amx::causal_attention`). `None` when it does not apply (not on the CPU
/// in f32/f64 or a half type, or no BLAS library): the caller composes the attention.
pub fn rope_causal_attention(
    qkv: &Tensor,
    table: &Tensor,
    heads: usize,
    kv_heads: usize,
    segments: Option<&[Vec<usize>]>,
) -> candle_core::Result<Option<Tensor>> {
    // A bf16 model's pass on a CPU with AMX tiles: the rotation in f32, the attention on them.
    if let Some(y) = rope_on_tiles(qkv, table, (heads, kv_heads, segments), DType::BF16)? {
        return Ok(Some(y));
    }
    // A half-type model's pass (its table is f32): in f32, the output rounded once.
    let wide = |q: &Tensor| rope_causal_attention(q, table, heads, kv_heads, segments);
    if let Some(y) = crate::half_ops::in_f32(qkv, wide)? {
        return Ok(Some(y));
    }
    let fits = qkv.device().is_cpu()
        && table.device().is_cpu()
        && matches!(qkv.dtype(), DType::F32 | DType::F64)
        && table.dtype() == qkv.dtype()
        && available();
    if !fits {
        return Ok(None);
    }
    let op = RopeAttention::new(qkv, heads, kv_heads, segments)?;
    qkv.contiguous()?
        .apply_op2(&table.contiguous()?, op)
        .map(Some)
}

/// [`rope_causal_attention`] with an f32 `qkv` on the AMX tiles where the CPU has them (a
/// block-quantized model's pass, whose products run there): rotated in f32, then each value
/// rounded to bf16 as it is packed, the probabilities rounded to bf16 for p·v, f32 sums and
/// output. Elsewhere as [`rope_causal_attention`].
pub fn rope_causal_attention_on_tiles(
    qkv: &Tensor,
    table: &Tensor,
    heads: usize,
    kv_heads: usize,
    segments: Option<&[Vec<usize>]>,
) -> candle_core::Result<Option<Tensor>> {
    if let Some(y) = rope_on_tiles(qkv, table, (heads, kv_heads, segments), DType::F32)? {
        return Ok(Some(y));
    }
    rope_causal_attention(qkv, table, heads, kv_heads, segments)
}

/// [`RopeTilesAttention`] for a `qkv` of `dtype` with an f32 table, on the CPU without
/// gradients where the tiles are there; `None` otherwise.
fn rope_on_tiles(
    qkv: &Tensor,
    table: &Tensor,
    (heads, kv_heads, segments): (usize, usize, Option<&[Vec<usize>]>),
    dtype: DType,
) -> candle_core::Result<Option<Tensor>> {
    if qkv.dtype() != dtype
        || table.dtype() != DType::F32
        || !qkv.device().is_cpu()
        || !table.device().is_cpu()
        || qkv.track_op()
        || !crate::amx::available()
    {
        return Ok(None);
    }
    let op = RopeTilesAttention(RopeAttention::new(qkv, heads, kv_heads, segments)?);
    qkv.contiguous()?
        .apply_op2_no_bwd(&table.contiguous()?, &op)
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::assert_same;

    /// softmax(q·kᵀ/√d + causal mask)·v in plain candle ops: the reference for the fused kernel.
    fn composed_causal_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (_, _, t, d) = q.dims4()?;
        let att = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), q.device())?.to_dtype(att.dtype())?;
        let att = att.broadcast_add(&mask)?;
        let e = att
            .broadcast_sub(&att.max_keepdim(candle_core::D::Minus1)?)?
            .exp()?;
        e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)?
            .matmul(v)
    }
    use candle_core::{Device, Var};

    /// Without a BLAS library every product goes through candle and these tests compare candle
    /// with itself; CI installs OpenBLAS and sets LMKIT_REQUIRE_BLAS=1 so that cannot happen there.
    fn blas_or_skip() -> bool {
        if available() {
            return true;
        }
        if std::env::var_os("LMKIT_REQUIRE_BLAS").is_some() {
            panic!(
                "LMKIT_REQUIRE_BLAS is set but no BLAS was loaded: {}",
                backend()
            );
        }
        eprintln!("skipped: {}", backend());
        false
    }

    /// Value and both gradients of Σ (a·b ⊙ r) equal candle's, for operands built by `make`
    /// from contiguous variables (so views: transposes, permutes, narrows).
    fn check(
        da: &[usize],
        db: &[usize],
        dtype: DType,
        make: impl Fn(&Tensor, &Tensor) -> candle_core::Result<(Tensor, Tensor)>,
    ) {
        let dev = Device::Cpu;
        let va = Var::randn(0f32, 1.0, da, &dev).unwrap();
        let vb = Var::randn(0f32, 1.0, db, &dev).unwrap();
        let (va, vb) = (
            Var::from_tensor(&va.to_dtype(dtype).unwrap()).unwrap(),
            Var::from_tensor(&vb.to_dtype(dtype).unwrap()).unwrap(),
        );
        let (a, b) = make(va.as_tensor(), vb.as_tensor()).unwrap();
        let ours = matmul(&a, &b).unwrap();
        // candle's own matmul refuses some strided views: give it contiguous copies.
        let theirs = a
            .contiguous()
            .unwrap()
            .broadcast_matmul(&b.contiguous().unwrap())
            .unwrap();
        let tol = if dtype == DType::F64 { 1e-10 } else { 1e-4 };
        assert_same(ours, theirs, &[&va, &vb], tol, &format!("{da:?}·{db:?}"));
    }

    #[test]
    fn products_and_gradients_equal_candle() {
        if !blas_or_skip() {
            return;
        }
        for dtype in [DType::F32, DType::F64] {
            let same = |a: &Tensor, b: &Tensor| Ok((a.clone(), b.clone()));
            check(&[5, 7], &[7, 3], dtype, same);
            // Linear layer: x [b, t, in] · Wᵀ with W [out, in].
            check(&[2, 5, 7], &[3, 7], dtype, |a, b| Ok((a.clone(), b.t()?)));
            // Transposed left operand (the weight gradient's form).
            check(&[7, 5], &[7, 3], dtype, |a, b| Ok((a.t()?, b.clone())));
            // Attention: [b, h, t, d] · [b, h, d, s] from kᵀ, and a head-split (permuted) view.
            check(&[2, 3, 4, 8], &[2, 3, 6, 8], dtype, |a, b| {
                Ok((a.clone(), b.t()?))
            });
            check(&[2, 4, 3, 8], &[2, 3, 8, 6], dtype, |a, b| {
                Ok((a.transpose(1, 2)?, b.clone()))
            });
            // A permuted view BLAS cannot describe (copied first), and a narrowed one.
            check(&[4, 3, 5], &[3, 6], dtype, |a, b| {
                Ok((a.permute((2, 0, 1))?.narrow(0, 1, 3)?, b.clone()))
            });
            check(&[6, 9], &[9, 4], dtype, |a, b| {
                Ok((a.narrow(1, 2, 5)?, b.narrow(0, 2, 5)?))
            });
            // Products large enough to be split into row blocks over the threads.
            check(&[3, 50, 16], &[9, 16], dtype, |a, b| {
                Ok((a.clone(), b.t()?))
            });
            check(&[100, 70], &[100, 9], dtype, |a, b| Ok((a.t()?, b.clone())));
            // One row (decoding a token): matrix-vector products, columns split over threads;
            // row-major and transposed right operands, a strided row, a batch of single rows.
            check(&[1, 7], &[7, 300], dtype, same);
            check(&[1, 7], &[300, 7], dtype, |a, b| Ok((a.clone(), b.t()?)));
            check(&[7, 1], &[7, 130], dtype, |a, b| Ok((a.t()?, b.clone())));
            check(&[2, 3, 1, 8], &[2, 3, 5, 8], dtype, |a, b| {
                Ok((a.clone(), b.t()?))
            });
            // Single rows and columns (decoding one token).
            check(&[1, 7], &[7, 1], dtype, same);
            check(&[3, 1, 7], &[7, 5], dtype, same);
        }
    }

    /// The attention on strips packed once equals the one through block products (the test
    /// below holds the path the CPU takes to the composed ops): sequences shorter than a strip,
    /// empty, longer than the kernel's depth block, head sizes that are not whole strips,
    /// grouped-query heads.
    #[test]
    fn strip_attention_equals_block_products() {
        let Some(f) = crate::gemm::functions() else {
            eprintln!("skipped: no built-in micro-kernel on this CPU");
            return;
        };
        fn case<T: BlasFloat>(
            gemm: Gemm<T>,
            spans: &[(usize, usize)],
            (heads, kv, hd): (usize, usize, usize),
            tol: f64,
        ) {
            let g = Gqa {
                spans,
                heads,
                kv_heads: kv,
                hd,
            };
            let rows = spans.iter().map(|&(r, n)| r + n).max().unwrap();
            let num = |i: usize, m: usize| T::from(((i * m) % 1009) as f64 / 500.0 - 1.0).unwrap();
            let qkv: Vec<T> = (0..rows * g.width()).map(|i| num(i, 7919)).collect();
            let dy: Vec<T> = (0..rows * heads * hd).map(|i| num(i, 104729)).collect();
            let what = format!(
                "{} spans {spans:?}, {heads}/{kv} heads of {hd}",
                std::any::type_name::<T>()
            );
            let close = |a: &[T], b: &[T], part: &str| {
                assert_eq!(a.len(), b.len());
                let size = b.iter().fold(0f64, |m, v| m.max(v.to_f64().unwrap().abs()));
                assert!(size > 0.0, "{what} {part}: all zero");
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    let (x, y) = (x.to_f64().unwrap(), y.to_f64().unwrap());
                    assert!(
                        (x - y).abs() <= tol * size,
                        "{what} {part} [{i}]: {x} vs {y}"
                    );
                }
            };
            let ours = strips_attention_fwd(&qkv, g).unwrap();
            let want = products_attention_fwd(gemm, &qkv, g).unwrap();
            close(&ours, &want, "forward");
            let ours = strips_attention_bwd(&qkv, &dy, g).unwrap();
            let want = products_attention_bwd(gemm, &qkv, &dy, g).unwrap();
            close(&ours, &want, "backward");
        }
        let spans = [(0, 13), (13, 1), (14, 40), (54, 7), (61, 0)];
        for shape in [(4, 2, 8), (4, 2, 20), (3, 3, 16), (2, 1, 5)] {
            case::<f64>(f.dgemm, &spans, shape, 1e-12);
            case::<f32>(f.sgemm, &spans, shape, 1e-5);
        }
        // Longer than the kernel's depth block (steps in two blocks), rows in several tasks.
        case::<f64>(f.dgemm, &[(0, 401)], (2, 1, 8), 1e-12);
        case::<f32>(f.sgemm, &[(3, 401)], (2, 2, 16), 1e-5);
    }

    #[test]
    fn fused_self_attention_equals_the_composed_attention() {
        if !blas_or_skip() {
            return;
        }
        let dev = Device::Cpu;
        let (b, t, heads, hd) = (2usize, 7usize, 3usize, 4usize);
        let c = heads * hd;
        for dtype in [DType::F64, DType::F32] {
            let qkv = Var::from_tensor(
                &crate::testing::randn(0f32, 1.0, (b, t, 3 * c), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let ours = causal_self_attention(qkv.as_tensor(), heads)
                .unwrap()
                .expect("fused with BLAS");
            let split = |i: usize| {
                qkv.as_tensor()
                    .narrow(2, i * c, c)?
                    .reshape((b, t, heads, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (split(0).unwrap(), split(1).unwrap(), split(2).unwrap());
            let reference = composed_causal_attention(&q, &k, &v)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, t, c))
                .unwrap();
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            assert_same(ours, reference, &[&qkv], tol, &format!("{dtype:?}"));
        }
    }

    /// A half-type model's scoring passes (inference) run the f32 kernels on the widened
    /// projections and round their output once: the same values as the f32 kernel on them
    /// (bf16 on a CPU with AMX tiles: on the tiles, within the rounding of their operands); and
    /// a block-quantized model's f32 rows through `rope_causal_attention_on_tiles`.
    #[test]
    fn half_type_scoring_attention_goes_through_f32() {
        if !blas_or_skip() {
            return;
        }
        let dev = Device::Cpu;
        let (b, t, heads, kv, hd) = (2usize, 37usize, 4usize, 2usize, 8usize);
        let table = Tensor::randn(0f32, 1.0, (t, hd), &dev).unwrap();
        let values = |x: Tensor| crate::testing::values(&x);
        for dtype in [DType::BF16, DType::F16] {
            let half = |w: usize| {
                Tensor::randn(0f32, 1.0, (b, t, w), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let wide = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            let qkv = half((heads + 2 * kv) * hd);
            let got = rope_causal_attention(&qkv, &table, heads, kv, None)
                .unwrap()
                .expect("in f32");
            assert_eq!(got.dtype(), dtype);
            let want = rope_causal_attention(&wide(&qkv), &table, heads, kv, None)
                .unwrap()
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            // On the tiles, the operands (rotated q and k too) and the probabilities are
            // rounded to bf16 as well: close (within `bound`) but not equal.
            let tiles = dtype == DType::BF16 && crate::amx::available();
            let agree = |got: Tensor, want: Tensor, bound: f64, what: &str| {
                if tiles {
                    let err = crate::testing::max_diff(&wide(&got), &wide(&want));
                    assert!(err > 0.0 && err <= bound, "bf16 {what} on tiles: {err}");
                } else {
                    assert_eq!(values(got), values(want), "{dtype:?} {what}");
                }
            };
            agree(got, want, 4.0 / 64.0, "rope attention");
            let qkv = half(3 * heads * hd);
            let got = causal_self_attention(&qkv, heads).unwrap().expect("in f32");
            assert_eq!(got.dtype(), dtype);
            let want = causal_self_attention(&wide(&qkv), heads)
                .unwrap()
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            agree(got, want, 4.0 / 128.0, "self-attention");
        }
        // A block-quantized model's f32 rows on the tiles: f32 out, within the rounding of the
        // operands and probabilities to bf16 of the f32 kernel's (equal to it without tiles).
        let qkv = Tensor::randn(0f32, 1.0, (b, t, (heads + 2 * kv) * hd), &dev).unwrap();
        let got = rope_causal_attention_on_tiles(&qkv, &table, heads, kv, None)
            .unwrap()
            .expect("f32");
        let want = rope_causal_attention(&qkv, &table, heads, kv, None)
            .unwrap()
            .unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let err = crate::testing::max_diff(&got, &want);
        if crate::amx::available() {
            assert!(
                err > 1e-5 && err <= 4.0 / 64.0,
                "f32 rope attention on tiles: {err}"
            );
        } else {
            assert_eq!(values(got), values(want));
        }
    }

    #[test]
    fn fused_linear_equals_product_plus_bias() {
        if !blas_or_skip() {
            return;
        }
        let dev = Device::Cpu;
        for dtype in [DType::F64, DType::F32] {
            for transposed in [false, true] {
                let var = |shape: &[usize]| {
                    Var::from_tensor(
                        &crate::testing::randn(0f32, 1.0, shape, &dev)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap(),
                    )
                    .unwrap()
                };
                // 3 × 50 rows: split into row blocks over the threads; one row: the
                // matrix-vector product.
                for rows in [[3, 50, 6], [1, 1, 6]] {
                    let (x, b) = (var(&rows), var(&[5]));
                    let wv = if transposed {
                        var(&[5, 6])
                    } else {
                        var(&[6, 5])
                    };
                    let w = if transposed {
                        wv.as_tensor().t().unwrap()
                    } else {
                        wv.as_tensor().clone()
                    };
                    let ours = linear(x.as_tensor(), &w, Some(b.as_tensor())).unwrap();
                    let reference = x
                        .as_tensor()
                        .broadcast_matmul(&w.contiguous().unwrap())
                        .unwrap()
                        .broadcast_add(b.as_tensor())
                        .unwrap();
                    let tol = if dtype == DType::F64 { 1e-12 } else { 1e-4 };
                    assert_same(
                        ours,
                        reference.clone(),
                        &[&x, &wv, &b],
                        tol,
                        &format!("{dtype:?}"),
                    );
                    // With a residual: untracked operands take the accumulating product; tracked
                    // ones the graph (same values either way).
                    let r = var(&[rows[0], rows[1], 5]);
                    let want = (&reference + r.as_tensor()).unwrap();
                    let plain = |v: &Var| v.as_tensor().detach();
                    let fast = linear_add(&plain(&x), &w.detach(), &plain(&b), &plain(&r)).unwrap();
                    assert!(!fast.track_op());
                    let graph =
                        linear_add(x.as_tensor(), &w, b.as_tensor(), r.as_tensor()).unwrap();
                    assert!(graph.track_op());
                    for got in [fast, graph] {
                        let d = (got - &want).unwrap().abs().unwrap().flatten_all().unwrap();
                        let d = d.max(0).unwrap().to_dtype(DType::F64).unwrap();
                        assert!(d.to_scalar::<f64>().unwrap() < tol, "{dtype:?} {rows:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn empty_and_mismatched_shapes() {
        let dev = Device::Cpu;
        let a = Tensor::zeros((3, 0), DType::F32, &dev).unwrap();
        let b = Tensor::zeros((0, 4), DType::F32, &dev).unwrap();
        let y = matmul(&a, &b).unwrap();
        assert_eq!(y.dims(), &[3, 4]);
        assert_eq!(y.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let c = Tensor::zeros((5, 4), DType::F32, &dev).unwrap();
        let err = matmul(&a.reshape((0, 3)).unwrap(), &c).unwrap_err();
        assert!(err.to_string().contains("shape"), "{err}");
    }

    #[test]
    fn layouts() {
        let m = describe(4, 3, 3, 1).unwrap();
        assert!(!m.trans && m.ld == 3);
        let m = describe(4, 3, 1, 4).unwrap();
        assert!(m.trans && m.ld == 4);
        assert!(describe(4, 3, 2, 2).is_none());
        // A broadcast (stride 0) row cannot be one.
        assert!(describe(4, 3, 0, 1).is_none());
    }
}
