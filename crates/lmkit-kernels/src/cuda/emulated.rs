//! The `cuda-emu` feature's stand-in for a GPU, for tests where there is none: [`super::Gpu`]
//! over host memory, so the hand-written GPU passes — their buffers, bounds checks, launches,
//! products and the very kernels of `train.cu` and `attention.cu` — run on the CPU and can be
//! held to the autograd graph.
//!
//! - Kernels: `emulated.cpp` compiles the kernel source against `emu.h` (each block's threads
//!   as contexts on one OS thread, a warp at a time; `mma.sync` and `ldmatrix` warp-collective
//!   by the PTX ISA's fragment layouts; shared memory filled with NaNs) and launches them by name, after checking the
//!   arguments' number and types against the kernel's parameters.
//! - Products: cuBLAS's row-major `c = alpha·a·b + beta·c` written out, the operands rounded as
//!   the tensor cores take them (TF32: 10-bit mantissas; bf16: 7-bit), f32 accumulation; `c`
//!   is not read when beta is 0, as cuBLAS does.
//! - Memory: a buffer is a `Vec`; [`Gpu::uninit`] fills it with NaNs, so a pass that reads an
//!   element it never wrote shows it. A GPU is `Gpu::of(&Device::Cpu)`, tensors are CPU
//!   tensors, and there is one stream: everything is synchronous.
//!
//! Only for tests: the build compiles the C++ emulation with the system's C++20 compiler.

use super::{Arg, Batched, Bf16, Buf, Dev, Gpu, Module, Operands, Precision, BF16_PRODUCTS};
use candle_core::{Device, Layout, Result, Shape, Storage, Tensor};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};

/// What a [`Buf`] may hold.
pub trait Elem: Copy + Default + 'static {}
impl<T: Copy + Default + 'static> Elem for T {}

/// A point in the emulated GPU's work (the op timing's): the host's clock.
pub(super) struct Mark(std::time::Instant);

impl Mark {
    /// The seconds from `start` to this point.
    pub(super) fn secs_since(&self, start: &Mark) -> Result<f64> {
        Ok(self.0.duration_since(start.0).as_secs_f64())
    }
}

pub(super) type Store<T> = Vec<T>;

/// The storage of a tensor on this device (the host), as an in-place op holds it.
pub(super) type DeviceStorage = candle_core::CpuStorage;

/// Nothing: the emulated GPU is the host.
pub(super) struct Hw;

/// Shared memory a block may have on the emulated GPU (an H100's 227 KiB).
const MAX_SHARED: usize = 227 << 10;

static TF32: AtomicBool = AtomicBool::new(false);

static LAYERS: AtomicBool = AtomicBool::new(false);

/// Whether inference's layers of CPU tensors take the emulated GPU where a GPU's would
/// ([`super::linear`], [`super::swiglu_rows`], in place of the composed ops): off unless a test
/// of the GPU path turns it on ([`set_emulated_layers`]).
pub fn layers_on(x: &Tensor) -> bool {
    x.device().is_cpu() && LAYERS.load(Ordering::SeqCst)
}

/// Sets [`layers_on`] (tests only: the switch is the process's).
pub fn set_emulated_layers(on: bool) {
    LAYERS.store(on, Ordering::SeqCst)
}

/// Whether f32 products round their operands to TF32 (the emulation's stand-in for candle's
/// `train.tf32` switch).
pub fn tf32_products() -> bool {
    TF32.load(Ordering::Relaxed)
}

/// Sets [`tf32_products`].
pub fn set_tf32_products(on: bool) {
    TF32.store(on, Ordering::Relaxed)
}

/// The emulated GPU runs a product one way: there are no algorithms to time
/// (`LMKIT_CUDA_AUTOTUNE` is for the GPU's cuBLASLt).
pub fn autotune() -> bool {
    false
}

/// Nothing to turn on in the emulation ([`autotune`]).
pub fn set_autotune(_: bool) {}

unsafe extern "C" {
    fn lmkit_cuda_emu_launch(
        name: *const std::ffi::c_char,
        gx: u32,
        gy: u32,
        threads: u32,
        shared: usize,
        args: *const u64,
        types: *const u8,
        count: usize,
    ) -> i32;
}

/// `x` rounded to nearest (ties to even) with `drop` low mantissa bits cleared.
fn round_mantissa(x: f32, drop: u32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    let u = x.to_bits();
    let half = (1u32 << (drop - 1)) - 1 + ((u >> drop) & 1);
    f32::from_bits(u.wrapping_add(half) & !((1u32 << drop) - 1))
}

impl Gpu {
    /// The emulated GPU for `Device::Cpu`, `None` for other devices.
    pub fn of(device: &Device) -> Option<Gpu> {
        device.is_cpu().then(|| Gpu {
            hw: Hw,
            tf32: true,
            bf16: BF16_PRODUCTS.load(Ordering::Relaxed),
            flash_rows: super::flash_block_rows(),
        })
    }

    fn buf<T: Elem>(&self, mut store: Vec<T>) -> Buf<T> {
        let dev = Dev {
            addr: store.as_mut_ptr() as u64,
            len: store.len(),
            _t: PhantomData,
        };
        Buf { store, dev }
    }

    /// `len` zeros.
    pub fn zeros<T: Elem>(&self, len: usize) -> Result<Buf<T>> {
        Ok(self.buf(vec![T::default(); len.max(1)]))
    }

    /// `len` elements the caller writes before reading: NaNs here, so that a read before the
    /// first write shows.
    pub fn uninit(&self, len: usize) -> Result<Buf<f32>> {
        Ok(self.buf(vec![f32::NAN; len.max(1)]))
    }

    /// `len` bf16s the caller writes before reading: NaNs here, as [`Gpu::uninit`].
    pub fn uninit_bf16(&self, len: usize) -> Result<Buf<Bf16>> {
        Ok(self.buf(vec![Bf16(0x7fc0); len.max(1)]))
    }

    pub(super) fn upload<T: Elem>(&self, data: &[T]) -> Result<Buf<T>> {
        let mut v = data.to_vec();
        if v.is_empty() {
            v.push(T::default());
        }
        Ok(self.buf(v))
    }

    /// The GPU's index.
    pub fn ordinal(&self) -> usize {
        0
    }

    pub fn download<T: Elem>(&self, buf: &Buf<T>, len: usize) -> Result<Vec<T>> {
        match buf.store.get(..len) {
            Some(v) => Ok(v.to_vec()),
            None => candle_core::bail!("cuda download: {len} of {}", buf.store.len()),
        }
    }

    /// A tensor over the buffer's first `shape.elem_count()` elements.
    pub fn into_tensor(&self, buf: Buf<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
        Self::wrap(buf.store, shape.into())
    }

    /// [`Gpu::into_tensor`] of bf16s: a tensor of candle's bf16.
    pub fn into_tensor_bf16(&self, buf: Buf<Bf16>, shape: impl Into<Shape>) -> Result<Tensor> {
        let v = buf
            .store
            .iter()
            .map(|b| half::bf16::from_bits(b.0))
            .collect();
        Self::wrap(v, shape.into())
    }

    /// A tensor over a vector's first `shape.elem_count()` elements.
    fn wrap<S: candle_core::WithDType>(mut v: Vec<S>, shape: Shape) -> Result<Tensor> {
        if v.len() < shape.elem_count() {
            candle_core::bail!("cuda: a buffer of {} for {shape:?}", v.len());
        }
        v.truncate(shape.elem_count());
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// The f32 elements of a tensor's storage from its layout's start to the storage's end (a
    /// strided view's whole reach, bounds-checked by the entry points), or `None` for another
    /// device or dtype.
    pub(super) fn region(storage: &Storage, layout: &Layout) -> Option<Dev<f32>> {
        let Storage::Cpu(cs) = storage else {
            return None;
        };
        host_region(cs.as_slice::<f32>().ok()?, layout)
    }

    /// [`Gpu::region`] of a bf16 storage.
    pub(super) fn region_bf16(storage: &Storage, layout: &Layout) -> Option<Dev<Bf16>> {
        let Storage::Cpu(cs) = storage else {
            return None;
        };
        host_region(cs.as_slice::<half::bf16>().ok()?, layout)
    }

    /// [`Gpu::region`] of a storage held mutably, for a kernel that writes it.
    pub(super) fn region_mut(
        cs: &mut candle_core::CpuStorage,
        layout: &Layout,
    ) -> Option<Dev<f32>> {
        match cs {
            candle_core::CpuStorage::F32(data) => host_region(data, layout),
            _ => None,
        }
    }

    /// [`Gpu::region_mut`] of a bf16 storage.
    pub(super) fn region_mut_bf16(
        cs: &mut candle_core::CpuStorage,
        layout: &Layout,
    ) -> Option<Dev<Bf16>> {
        match cs {
            candle_core::CpuStorage::BF16(data) => host_region(data, layout),
            _ => None,
        }
    }

    /// The time now, for the op timing (the emulation runs each launch as it is made).
    pub(super) fn mark(&self) -> Result<Mark> {
        Ok(Mark(std::time::Instant::now()))
    }

    pub fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Compute capability 9.0 (the emulation has the tensor-core instructions the kernels use).
    pub fn compute_major(&self) -> Result<i32> {
        Ok(9)
    }

    /// Runs kernel `name` (either module: the emulation holds both) on (x, y) blocks.
    pub(super) fn launch_kernel(
        &self,
        _module: Module,
        name: &str,
        (x, y): (usize, usize),
        block: u32,
        shared: usize,
        args: &[Arg],
    ) -> Result<()> {
        if shared > MAX_SHARED {
            candle_core::bail!(
                "cuda {name}: {shared} bytes of shared memory (at most {MAX_SHARED})"
            );
        }
        let (x, y) = (super::int(x)? as u32, super::int(y)? as u32);
        let mut bits = Vec::with_capacity(args.len());
        let mut types = Vec::with_capacity(args.len());
        for a in args {
            let (b, t) = match *a {
                Arg::P(p) => (p, b'P'),
                Arg::I(i) => (i as i64 as u64, b'I'),
                Arg::L(l) => (l as u64, b'L'),
                Arg::F(f) => (f.to_bits() as u64, b'F'),
            };
            bits.push(b);
            types.push(t);
        }
        let cname =
            std::ffi::CString::new(name).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        // SAFETY: the pointer arguments are host addresses of live buffers or borrowed tensors,
        // checked by the caller to cover what the kernel touches for the sizes passed with them;
        // the emulation checks the arguments' number and types against the kernel's.
        let code = unsafe {
            lmkit_cuda_emu_launch(
                cname.as_ptr(),
                x,
                y,
                block,
                shared,
                bits.as_ptr(),
                types.as_ptr(),
                bits.len(),
            )
        };
        match code {
            0 => Ok(()),
            1 => candle_core::bail!("cuda emulation: no kernel {name}"),
            2 => candle_core::bail!(
                "cuda emulation: {name} takes another number of arguments than {}",
                args.len()
            ),
            _ => candle_core::bail!(
                "cuda emulation: {name}'s arguments {:?} are not of its parameters' types",
                String::from_utf8_lossy(&types)
            ),
        }
    }

    /// [`Gpu::copy`] of `len` f32s between addresses checked by the caller.
    pub(super) fn copy_raw(&self, d: u64, s: u64, len: usize) -> Result<()> {
        // SAFETY: both are host addresses of `len` f32s (checked by the caller); `ptr::copy`
        // allows them to overlap.
        unsafe { std::ptr::copy(s as *const f32, d as *mut f32, len) };
        Ok(())
    }

    /// The product of [`Gpu::mm`]: operands as (address, leading dimension, transposed),
    /// checked by the caller, and whether both are bf16; f32 operands rounded to bf16 or TF32 as
    /// the GPU's tensor cores would.
    pub(super) fn gemm(
        &self,
        (rows, cols, k): (usize, usize, usize),
        (a, b, bf16_operands): Operands,
        (pc, ldc): (u64, usize),
        (alpha, beta): (f32, f32),
        batch: Batched,
    ) -> Result<()> {
        let size = if bf16_operands { 2 } else { 4 };
        for i in 0..batch.count {
            let a = (a.0 + (size * i * batch.a) as u64, a.1, a.2);
            let b = (b.0 + (size * i * batch.b) as u64, b.1, b.2);
            let pc = pc + (4 * i * batch.c) as u64;
            let dots = self.dots((rows, cols, k), (a, b, bf16_operands));
            for r in 0..rows {
                for cc in 0..cols {
                    let dot = dots[r * cols + cc];
                    let out = (pc as *mut f32).wrapping_add(r * ldc + cc);
                    // SAFETY: the caller checked that every element of `c` lies within its
                    // buffer (host memory here), a buffer the pass owns.
                    unsafe {
                        *out = if beta == 0.0 {
                            alpha * dot
                        } else {
                            alpha * dot + beta * *out
                        };
                    }
                }
            }
        }
        Ok(())
    }

    /// cuBLASLt's product with the bias epilogue ([`Gpu::linear`]): d = a·b + c + bias, c (the
    /// residual) and the bias of d's type, c not read where absent, then the GELU (the sum kept
    /// in aux) or its gradient (from aux, the bias then receiving d's column sums, summed in
    /// f32 before d's rounding) where `out.act` says; d, aux and the bias's gradient rounded to
    /// bf16 where d is bf16 (to nearest even, from f32); always has an algorithm.
    pub(super) fn gemm_fused(
        &self,
        (rows, cols, k): (usize, usize, usize),
        operands: Operands,
        out: super::linear::Fused,
    ) -> Result<bool> {
        use super::linear::Act;
        let dots = self.dots((rows, cols, k), operands);
        // SAFETY (every read and write below): the caller checked that d, c, aux ([rows, cols])
        // and the bias ([cols]) lie within their buffers (host memory here).
        let read = |p: u64, i: usize| unsafe {
            if out.bf16_out {
                Bf16(*(p as *const u16).add(i)).to_f32()
            } else {
                *(p as *const f32).add(i)
            }
        };
        let write = |p: u64, i: usize, x: f32| unsafe {
            if out.bf16_out {
                *(p as *mut u16).add(i) = Bf16::from_f32(x).0;
            } else {
                *(p as *mut f32).add(i) = x;
            }
        };
        let mut sums = vec![0f32; cols];
        for r in 0..rows {
            for (cc, sum) in sums.iter_mut().enumerate() {
                let i = r * cols + cc;
                let mut x = dots[i];
                if let Some(c) = out.c {
                    x += read(c, i);
                }
                match out.act {
                    Act::None | Act::Gelu { .. } => {
                        if let Some(bias) = out.bias {
                            x += read(bias, cc);
                        }
                    }
                    Act::GeluGrad { .. } => {}
                }
                match out.act {
                    Act::None => {}
                    Act::Gelu { aux } => {
                        write(aux, i, x);
                        x = gelu(x);
                    }
                    Act::GeluGrad { aux, .. } => {
                        x *= gelu_grad(read(aux, i));
                        *sum += x;
                    }
                }
                write(out.d, i, x);
            }
        }
        if let Act::GeluGrad {
            dbias: Some(db), ..
        } = out.act
        {
            for (cc, &v) in sums.iter().enumerate() {
                write(db, cc, v);
            }
        }
        Ok(true)
    }

    /// The [rows, cols] dot products of one product's operands, rounded as the tensor cores
    /// take them, in f32.
    fn dots(
        &self,
        (rows, cols, k): (usize, usize, usize),
        ((pa, lda, ta), (pb, ldb, tb), bf16_operands): Operands,
    ) -> Vec<f32> {
        let precision = self.precision(bf16_operands);
        let round = |x: f32| match precision {
            Precision::F32AsBf16 => round_mantissa(x, 16),
            Precision::Tf32 => round_mantissa(x, 13),
            Precision::F32 | Precision::Bf16 => x,
        };
        let read = |p: u64, i: usize| {
            // SAFETY: the caller checked that every element of the operands lies within their
            // buffers (host memory here); `i` indexes one of them.
            if bf16_operands {
                Bf16(unsafe { *(p as *const u16).add(i) }).to_f32()
            } else {
                round(unsafe { *(p as *const f32).add(i) })
            }
        };
        let a: Vec<f32> = (0..rows * k)
            .map(|e| {
                let (r, j) = (e / k, e % k);
                read(pa, if ta { j * lda + r } else { r * lda + j })
            })
            .collect();
        let b: Vec<f32> = (0..k * cols)
            .map(|e| {
                let (j, cc) = (e % k, e / k);
                read(pb, if tb { cc * ldb + j } else { j * ldb + cc })
            })
            .collect();
        let mut dots = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for cc in 0..cols {
                let bc = &b[cc * k..(cc + 1) * k];
                dots.push(
                    a[r * k..(r + 1) * k]
                        .iter()
                        .zip(bc)
                        .map(|(x, y)| x * y)
                        .sum(),
                );
            }
        }
        dots
    }
}

/// GELU, tanh approximation, as train.cu's kernels compute it.
fn gelu(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (K * (x + 0.044715 * x * x * x)).tanh())
}

/// GELU′ (tanh approximation), as train.cu's gelu_bwd computes it.
fn gelu_grad(x: f32) -> f32 {
    const K: f32 = 0.797_884_6;
    let th = (K * (x + 0.044715 * x * x * x)).tanh();
    let du = K * (1.0 + 3.0 * 0.044715 * x * x);
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du
}

/// `data` from the layout's start on, as the emulated device's elements `T` (of `S`'s size: the
/// emulation's device memory is the host's).
fn host_region<S, T>(data: &[S], layout: &Layout) -> Option<Dev<T>> {
    let part = data.get(layout.start_offset()..)?;
    Some(Dev {
        addr: part.as_ptr() as u64,
        len: part.len(),
        _t: PhantomData,
    })
}
