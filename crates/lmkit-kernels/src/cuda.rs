//! CUDA building blocks of the hand-written training passes: device buffers, cuBLAS products
//! with row-major operands, and the kernels of `cuda/train.cu` (compiled to PTX at build time,
//! loaded once per device).
//!
//! Everything runs on candle's stream for the device, so the pass's work is ordered with the
//! tensors candle creates around it. A [`Dev`] is a device address and a length; every entry
//! point checks that the elements it touches lie within its operands' lengths before it
//! launches, as the CPU product entry points do.

use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{Device, Layout, Result, Shape, Storage, Tensor};
use cudarc::cublas::sys as cublas_sys;
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use std::marker::PhantomData;

/// The PTX of `cuda/train.cu`.
const TRAIN_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/train.ptx"));
const MODULE: &str = "lmkit_train";

/// A run of `len` elements of type `T` in device memory.
#[derive(Debug)]
pub struct Dev<T> {
    addr: u64,
    len: usize,
    _t: PhantomData<T>,
}

impl<T> Clone for Dev<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Dev<T> {}

impl<T> Dev<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The elements from `offset` on.
    pub fn at(self, offset: usize) -> Result<Dev<T>> {
        if offset > self.len {
            candle_core::bail!("cuda: offset {offset} past a buffer of {}", self.len);
        }
        Ok(Dev {
            addr: self.addr + (offset * std::mem::size_of::<T>()) as u64,
            len: self.len - offset,
            _t: PhantomData,
        })
    }

    fn need(self, elements: usize, what: &str) -> Result<u64> {
        if elements > self.len {
            candle_core::bail!(
                "cuda {what}: {elements} elements needed from a buffer of {}",
                self.len
            );
        }
        Ok(self.addr)
    }
}

/// A device buffer owned by the pass.
pub struct Buf<T: DeviceRepr> {
    slice: CudaSlice<T>,
    dev: Dev<T>,
}

impl<T: DeviceRepr> Buf<T> {
    pub fn dev(&self) -> Dev<T> {
        self.dev
    }
}

/// A matrix operand of a row-major product: `ld` elements between rows as stored; `t`: the
/// operand is the transpose of what is stored.
#[derive(Clone, Copy, Debug)]
pub struct Mat {
    pub ptr: Dev<f32>,
    pub ld: usize,
    pub t: bool,
}

pub fn plain(ptr: Dev<f32>, ld: usize) -> Mat {
    Mat { ptr, ld, t: false }
}

pub fn transposed(ptr: Dev<f32>, ld: usize) -> Mat {
    Mat { ptr, ld, t: true }
}

/// `count` products at once, each operand `stride` elements after the previous one.
#[derive(Clone, Copy, Debug)]
pub struct Batched {
    pub count: usize,
    pub a: usize,
    pub b: usize,
    pub c: usize,
}

impl Batched {
    pub const ONE: Batched = Batched {
        count: 1,
        a: 0,
        b: 0,
        c: 0,
    };
}

/// One CUDA device's stream, cuBLAS handle and kernels.
pub struct Gpu {
    dev: CudaDevice,
    blas: std::sync::Arc<cudarc::cublas::CudaBlas>,
    /// f32 products on the tensor cores (TF32 inputs, f32 accumulation).
    pub tf32: bool,
}

const THREADS: u32 = 256;

fn blocks(n: usize, per_block: usize) -> u32 {
    n.div_ceil(per_block).max(1) as u32
}

impl Gpu {
    /// The GPU of `device`, or `None` for other devices.
    pub fn of(device: &Device) -> Option<Gpu> {
        match device {
            Device::Cuda(dev) => Some(Gpu::on(dev)),
            _ => None,
        }
    }

    /// The GPU a CUDA storage lives on.
    pub fn of_storage(storage: &CudaStorage) -> Gpu {
        Gpu::on(&storage.device)
    }

    fn on(dev: &CudaDevice) -> Gpu {
        Gpu {
            blas: dev.cublas_handle(),
            dev: dev.clone(),
            tf32: true,
        }
    }

    fn fail<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> candle_core::Error + '_ {
        move |e| candle_core::Error::Msg(format!("cuda {what}: {e:?}"))
    }

    fn buf<T: DeviceRepr>(&self, slice: CudaSlice<T>) -> Buf<T> {
        let stream = self.dev.cuda_stream();
        let addr = {
            let (addr, _sync) = slice.device_ptr(&stream);
            addr
        };
        let len = slice.len();
        Buf {
            dev: Dev {
                addr,
                len,
                _t: PhantomData,
            },
            slice,
        }
    }

    /// `len` zeros.
    pub fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<Buf<T>> {
        let s = self
            .dev
            .cuda_stream()
            .alloc_zeros::<T>(len.max(1))
            .map_err(Self::fail("alloc"))?;
        Ok(self.buf(s))
    }

    /// `len` elements the caller writes before reading.
    pub fn uninit(&self, len: usize) -> Result<Buf<f32>> {
        // SAFETY: the buffer is only read by kernels and products after they have written it
        // (each pass writes every element of its scratch buffers first).
        let s = unsafe { self.dev.cuda_stream().alloc::<f32>(len.max(1)) }
            .map_err(Self::fail("alloc"))?;
        Ok(self.buf(s))
    }

    pub fn upload_u32(&self, data: &[u32]) -> Result<Buf<u32>> {
        let s = self
            .dev
            .cuda_stream()
            .clone_htod(data)
            .map_err(Self::fail("upload"))?;
        Ok(self.buf(s))
    }

    pub fn download(&self, buf: &Buf<f32>, len: usize) -> Result<Vec<f32>> {
        let v = self
            .dev
            .cuda_stream()
            .clone_dtoh(&buf.slice.slice(..len))
            .map_err(Self::fail("download"))?;
        Ok(v)
    }

    /// A tensor over the buffer's first `shape.elem_count()` elements (the buffer moves into it).
    pub fn into_tensor(&self, buf: Buf<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let mut slice = buf.slice;
        if slice.len() != shape.elem_count() {
            if slice.len() < shape.elem_count() {
                candle_core::bail!("cuda: a buffer of {} for {shape:?}", slice.len());
            }
            let part = self
                .dev
                .cuda_stream()
                .clone_dtod(&slice.slice(..shape.elem_count()))
                .map_err(Self::fail("copy"))?;
            slice = part;
        }
        let storage = CudaStorage::wrap_cuda_slice(slice, self.dev.clone());
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }

    /// The f32 data of a contiguous tensor on this GPU (the storage must stay borrowed while the
    /// address is used), or `None` for another device, dtype or a strided view.
    pub fn view(storage: &Storage, layout: &Layout) -> Option<Dev<f32>> {
        let Storage::Cuda(cs) = storage else {
            return None;
        };
        Self::view_cuda(cs, layout)
    }

    /// [`Gpu::view`] of a CUDA storage.
    pub fn view_cuda(cs: &CudaStorage, layout: &Layout) -> Option<Dev<f32>> {
        let slice = cs.as_cuda_slice::<f32>().ok()?;
        let (start, end) = layout.contiguous_offsets()?;
        let stream = cs.device.cuda_stream();
        let (addr, _sync) = slice.device_ptr(&stream);
        let all = Dev::<f32> {
            addr,
            len: slice.len(),
            _t: PhantomData,
        };
        let v = all.at(start).ok()?;
        (end <= slice.len()).then_some(Dev {
            len: end - start,
            ..v
        })
    }

    pub fn synchronize(&self) -> Result<()> {
        self.dev
            .cuda_stream()
            .synchronize()
            .map_err(Self::fail("synchronize"))
    }

    /// Row-major `c = alpha·a·b + beta·c` with a: [rows, k], b: [k, cols], c: [rows, cols] (row
    /// stride `ldc`), `batch.count` times.
    #[allow(clippy::too_many_arguments)]
    pub fn mm(
        &self,
        (rows, cols, k): (usize, usize, usize),
        a: Mat,
        b: Mat,
        c: (Dev<f32>, usize),
        alpha: f32,
        beta: f32,
        batch: Batched,
    ) -> Result<()> {
        if rows == 0 || cols == 0 || batch.count == 0 {
            return Ok(());
        }
        // Elements each operand spans: the last one's index + 1.
        let span = |m: Mat, r: usize, cc: usize, stride: usize| {
            let (r, cc) = if m.t { (cc, r) } else { (r, cc) };
            (batch.count - 1) * stride + (r - 1) * m.ld + cc
        };
        if k == 0 {
            candle_core::bail!("cuda mm: empty inner dimension");
        }
        let pa = a.ptr.need(span(a, rows, k, batch.a), "mm a")?;
        let pb = b.ptr.need(span(b, k, cols, batch.b), "mm b")?;
        let pc = c.0.need(
            (batch.count - 1) * batch.c + (rows - 1) * c.1 + cols,
            "mm c",
        )?;
        let op = |t: bool| {
            if t {
                cublas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                cublas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let compute = if self.tf32 {
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let f32t = cublas_sys::cudaDataType_t::CUDA_R_32F;
        // Column-major cuBLAS computes cᵀ = bᵀ·aᵀ: a row-major matrix is its transpose in
        // column-major order, so the operands swap and keep their own transposition flags.
        // SAFETY: the addresses are live device buffers (borrowed tensors or buffers of the
        // pass) whose lengths cover every element read or written, checked above; the handle
        // is bound to candle's stream for this device.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                op(b.t),
                op(a.t),
                int(cols)?,
                int(rows)?,
                int(k)?,
                &alpha as *const f32 as *const _,
                pb as *const _,
                f32t,
                int(b.ld)?,
                batch.b as i64,
                pa as *const _,
                f32t,
                int(a.ld)?,
                batch.a as i64,
                &beta as *const f32 as *const _,
                pc as *mut _,
                f32t,
                int(c.1)?,
                batch.c as i64,
                int(batch.count)?,
                compute,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(Self::fail("gemm"))
    }

    /// `c = a·b` ([`Gpu::mm`] with alpha 1, beta 0: c is overwritten).
    pub fn set_product(
        &self,
        dims: (usize, usize, usize),
        a: Mat,
        b: Mat,
        c: (Dev<f32>, usize),
        batch: Batched,
    ) -> Result<()> {
        self.mm(dims, a, b, c, 1.0, 0.0, batch)
    }

    /// Launches `name` with the given arguments (already checked by the caller).
    fn launch(&self, name: &str, grid: u32, block: u32, args: &[Arg]) -> Result<()> {
        let f = self.dev.get_or_load_custom_func(name, MODULE, TRAIN_PTX)?;
        let mut b = f.builder();
        for a in args {
            match a {
                Arg::P(p) => b.arg(p),
                Arg::I(i) => b.arg(i),
                Arg::L(l) => b.arg(l),
                Arg::F(x) => b.arg(x),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every pointer argument was checked by the caller to cover the elements the
        // kernel touches for the size arguments passed with it; the kernels index only within
        // those sizes.
        unsafe { b.launch(cfg) }.map_err(Self::fail(name))?;
        Ok(())
    }

    /// Launches an elementwise kernel: a thread per element of `len`.
    fn launch_elements(&self, name: &str, len: usize, args: &[Arg]) -> Result<()> {
        self.launch(name, blocks(len, THREADS as usize), THREADS, args)
    }

    /// Launches a row kernel: a warp per row of `rows`.
    fn launch_rows(&self, name: &str, rows: usize, args: &[Arg]) -> Result<()> {
        self.launch(name, blocks(rows, THREADS as usize / 32), THREADS, args)
    }

    /// x[r] = wte[ids[r]] + wpe[r mod t]; ids must be < wte's rows (checked by the caller).
    pub fn embed_fwd(
        &self,
        x: Dev<f32>,
        wte: Dev<f32>,
        wpe: Dev<f32>,
        ids: Dev<u32>,
        (n, t, c): (usize, usize, usize),
        vocab: usize,
    ) -> Result<()> {
        let args = [
            Arg::P(x.need(n * c, "embed x")?),
            Arg::P(wte.need(vocab * c, "embed wte")?),
            Arg::P(wpe.need(t.min(n) * c, "embed wpe")?),
            Arg::P(ids.need(n, "embed ids")?),
            Arg::I(int(n)?),
            Arg::I(int(t)?),
            Arg::I(int(c)?),
        ];
        self.launch_elements("embed_fwd", n * c, &args)
    }

    /// dwte[ids[r]] += dx[r]; dwpe[p] = Σ_b dx[b·t + p] for p < t.
    #[allow(clippy::too_many_arguments)]
    pub fn embed_bwd(
        &self,
        dwte: Dev<f32>,
        dwpe: Dev<f32>,
        dx: Dev<f32>,
        ids: Dev<u32>,
        (b, t, c): (usize, usize, usize),
        vocab: usize,
    ) -> Result<()> {
        let n = b * t;
        let args = [
            Arg::P(dwte.need(vocab * c, "embed_bwd dwte")?),
            Arg::P(dx.need(n * c, "embed_bwd dx")?),
            Arg::P(ids.need(n, "embed_bwd ids")?),
            Arg::I(int(n)?),
            Arg::I(int(c)?),
        ];
        self.launch_elements("embed_bwd_tokens", n * c, &args)?;
        let args = [
            Arg::P(dwpe.need(t * c, "embed_bwd dwpe")?),
            Arg::P(dx.need(n * c, "embed_bwd dx")?),
            Arg::I(int(b)?),
            Arg::I(int(t)?),
            Arg::I(int(c)?),
        ];
        self.launch_elements("embed_bwd_positions", t * c, &args)
    }

    /// out[r] = x[r] + bias, or out[r] = bias without x.
    pub fn add_rows(
        &self,
        out: Dev<f32>,
        x: Option<Dev<f32>>,
        bias: Dev<f32>,
        (n, c): (usize, usize),
    ) -> Result<()> {
        let args = [
            Arg::P(out.need(n * c, "add_rows out")?),
            Arg::P(match x {
                Some(x) => x.need(n * c, "add_rows x")?,
                None => 0,
            }),
            Arg::P(bias.need(c, "add_rows bias")?),
            Arg::I(int(n)?),
            Arg::I(int(c)?),
        ];
        self.launch_elements("add_rows", n * c, &args)
    }

    /// LayerNorm of rows; mean and 1/std per row kept in `stats` ([2, n]).
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm(
        &self,
        out: Dev<f32>,
        stats: Dev<f32>,
        x: Dev<f32>,
        w: Dev<f32>,
        b: Dev<f32>,
        (n, c): (usize, usize),
        eps: f32,
    ) -> Result<()> {
        stats.need(2 * n, "layer_norm stats")?;
        let args = [
            Arg::P(out.need(n * c, "layer_norm out")?),
            Arg::P(stats.addr),
            Arg::P(stats.at(n)?.addr),
            Arg::P(x.need(n * c, "layer_norm x")?),
            Arg::P(w.need(c, "layer_norm w")?),
            Arg::P(b.need(c, "layer_norm b")?),
            Arg::I(int(n)?),
            Arg::I(int(c)?),
            Arg::F(eps),
        ];
        self.launch_rows("layer_norm_fwd", n, &args)
    }

    /// LayerNorm's backward: dx (= or += with `accumulate`) and prod = dy ⊙ x̂ (for dw's column
    /// sums).
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm_bwd(
        &self,
        dx: Dev<f32>,
        prod: Dev<f32>,
        dy: Dev<f32>,
        x: Dev<f32>,
        w: Dev<f32>,
        stats: Dev<f32>,
        (n, c): (usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        stats.need(2 * n, "layer_norm_bwd stats")?;
        let args = [
            Arg::P(dx.need(n * c, "layer_norm_bwd dx")?),
            Arg::P(prod.need(n * c, "layer_norm_bwd prod")?),
            Arg::P(dy.need(n * c, "layer_norm_bwd dy")?),
            Arg::P(x.need(n * c, "layer_norm_bwd x")?),
            Arg::P(w.need(c, "layer_norm_bwd w")?),
            Arg::P(stats.addr),
            Arg::P(stats.at(n)?.addr),
            Arg::I(int(n)?),
            Arg::I(int(c)?),
            Arg::I(accumulate as i32),
        ];
        self.launch_rows("layer_norm_bwd", n, &args)
    }

    /// An elementwise activation: the tanh GELU, or ReLU.
    pub fn act_fwd(&self, gelu: bool, out: Dev<f32>, h: Dev<f32>, len: usize) -> Result<()> {
        let args = [
            Arg::P(out.need(len, "act out")?),
            Arg::P(h.need(len, "act h")?),
            Arg::L(len as i64),
        ];
        let name = if gelu { "gelu_fwd" } else { "relu_fwd" };
        self.launch_elements(name, len, &args)
    }

    pub fn act_bwd(
        &self,
        gelu: bool,
        dh: Dev<f32>,
        h: Dev<f32>,
        dg: Dev<f32>,
        len: usize,
    ) -> Result<()> {
        let args = [
            Arg::P(dh.need(len, "act_bwd dh")?),
            Arg::P(h.need(len, "act_bwd h")?),
            Arg::P(dg.need(len, "act_bwd dg")?),
            Arg::L(len as i64),
        ];
        let name = if gelu { "gelu_bwd" } else { "relu_bwd" };
        self.launch_elements(name, len, &args)
    }

    /// Causal softmax in place over `rows` rows of length t (rows of [groups, t, t]).
    pub fn softmax_causal(&self, p: Dev<f32>, rows: usize, t: usize, scale: f32) -> Result<()> {
        let args = [
            Arg::P(p.need(rows * t, "softmax p")?),
            Arg::L(rows as i64),
            Arg::I(int(t)?),
            Arg::F(scale),
        ];
        self.launch_rows("softmax_causal_fwd", rows, &args)
    }

    /// dS = scale · P ⊙ (dP − rowsum(dP ⊙ P)) in place in dp.
    pub fn softmax_causal_bwd(
        &self,
        dp: Dev<f32>,
        p: Dev<f32>,
        rows: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        let args = [
            Arg::P(dp.need(rows * t, "softmax_bwd dp")?),
            Arg::P(p.need(rows * t, "softmax_bwd p")?),
            Arg::L(rows as i64),
            Arg::I(int(t)?),
            Arg::F(scale),
        ];
        self.launch_rows("softmax_causal_bwd", rows, &args)
    }

    /// Cross-entropy of logits [rows, v] against targets; the logits become the gradient times
    /// `sc`, loss[r] the row's loss. Targets must be < v (checked by the caller).
    pub fn cross_entropy(
        &self,
        logits: Dev<f32>,
        loss: Dev<f32>,
        targets: Dev<u32>,
        (rows, v): (usize, usize),
        sc: f32,
    ) -> Result<()> {
        let args = [
            Arg::P(logits.need(rows * v, "cross_entropy logits")?),
            Arg::P(loss.need(rows, "cross_entropy loss")?),
            Arg::P(targets.need(rows, "cross_entropy targets")?),
            Arg::I(int(v)?),
            Arg::F(sc),
        ];
        self.launch("cross_entropy", rows as u32, 1024, &args)
    }

    /// In place: m ← β·m + (1 − β)·(s·g), or with (s·g)² for the second moment.
    pub fn adam_moment(
        &self,
        m: Dev<f32>,
        g: Dev<f32>,
        len: usize,
        (beta, scale): (f32, f32),
        square: bool,
    ) -> Result<()> {
        let args = [
            Arg::P(m.need(len, "adam m")?),
            Arg::P(g.need(len, "adam g")?),
            Arg::L(len as i64),
            Arg::F(beta),
            Arg::F(scale),
            Arg::I(square as i32),
        ];
        self.launch_elements("adam_moment", len, &args)
    }

    /// In place: θ ← keep·θ − lr·(m·ibc1) / (√(v·ibc2) + ε); `k` = (keep, lr, ibc1, ibc2, ε).
    pub fn adam_apply(
        &self,
        theta: Dev<f32>,
        m: Dev<f32>,
        v: Dev<f32>,
        len: usize,
        k: [f32; 5],
    ) -> Result<()> {
        let args = [
            Arg::P(theta.need(len, "adam theta")?),
            Arg::P(m.need(len, "adam m")?),
            Arg::P(v.need(len, "adam v")?),
            Arg::L(len as i64),
            Arg::F(k[0]),
            Arg::F(k[1]),
            Arg::F(k[2]),
            Arg::F(k[3]),
            Arg::F(k[4]),
        ];
        self.launch_elements("adam_apply", len, &args)
    }

    /// Σ x² over every array (in f64, partial sums added in a fixed order: the same value every
    /// run), with one copy back to the host.
    pub fn sum_of_squares(&self, arrays: &[Dev<f32>]) -> Result<f64> {
        const PARTS: usize = 64;
        let partials = self.zeros::<f64>(arrays.len() * PARTS)?;
        for (i, x) in arrays.iter().enumerate() {
            let args = [
                Arg::P(partials.dev().at(i * PARTS)?.need(PARTS, "sum_squares")?),
                Arg::P(x.addr),
                Arg::L(x.len as i64),
            ];
            self.launch("sum_squares", PARTS as u32, THREADS, &args)?;
        }
        let host = self
            .dev
            .cuda_stream()
            .clone_dtoh(&partials.slice)
            .map_err(Self::fail("download"))?;
        Ok(host[..arrays.len() * PARTS].iter().sum())
    }

    pub fn fill(&self, out: Dev<f32>, value: f32, len: usize) -> Result<()> {
        let args = [
            Arg::P(out.need(len, "fill")?),
            Arg::F(value),
            Arg::L(len as i64),
        ];
        self.launch_elements("fill", len, &args)
    }
}

fn int(x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("cuda: size {x} too large")))
}

enum Arg {
    P(u64),
    I(i32),
    L(i64),
    F(f32),
}
