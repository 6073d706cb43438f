//! The CUDA side of [`super::Gpu`]: device memory, cuBLAS products and kernel launches on
//! candle's stream for the device, and NCCL communicators.

use super::{int, Arg, Batched, Bf16, Buf, Dev, Gpu, Module, Operands, Precision, BF16_PRODUCTS};
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{Device, Layout, Result, Shape, Storage, Tensor};
use cudarc::cublas::sys as cublas_sys;
use cudarc::cublaslt::sys as lt_sys;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use std::marker::PhantomData;

/// The modules of `cuda/train.cu` and `cuda/attention.cu`: a name and its PTX.
const TRAIN_KERNELS: (&str, &str) = (
    "lmkit_train",
    include_str!(concat!(env!("OUT_DIR"), "/train.ptx")),
);
const ATTENTION_KERNELS: (&str, &str) = (
    "lmkit_attention",
    include_str!(concat!(env!("OUT_DIR"), "/attention.ptx")),
);

/// What a [`Buf`] may hold.
pub trait Elem: DeviceRepr + cudarc::driver::ValidAsZeroBits {}
impl<T: DeviceRepr + cudarc::driver::ValidAsZeroBits> Elem for T {}

// SAFETY: `Bf16` is `repr(transparent)` over a u16, which the kernels read as bf16 bits; any
// bits, zeros included, are a valid value.
unsafe impl DeviceRepr for Bf16 {}
unsafe impl cudarc::driver::ValidAsZeroBits for Bf16 {}

pub(super) type Store<T> = CudaSlice<T>;

/// The storage of a tensor on this device, as an in-place op holds it.
pub(super) type DeviceStorage = CudaStorage;

/// A point in a GPU's stream (the op timing's): an event recorded there.
pub(super) struct Mark(cudarc::driver::CudaEvent);

impl Mark {
    /// The GPU's seconds from `start` to this point (waiting for the GPU to reach it).
    pub(super) fn secs_since(&self, start: &Mark) -> Result<f64> {
        let ms = start
            .0
            .elapsed_ms(&self.0)
            .map_err(Gpu::fail("cuEventElapsedTime"))?;
        Ok(f64::from(ms) / 1e3)
    }
}

/// The device and its cuBLAS handle.
pub(super) struct Hw {
    dev: CudaDevice,
    blas: std::sync::Arc<cudarc::cublas::CudaBlas>,
}

/// A cuBLASLt handle and the workspace its products may use (NVIDIA's recommendation: 32 MiB on
/// Hopper, 4 MiB before).
struct Lt {
    handle: lt_sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
}

// SAFETY: a cuBLASLt handle may be used from any thread, one call at a time; `Lt` is not `Sync`,
// and the handles are used only under `LT`'s lock.
unsafe impl Send for Lt {}

/// The cuBLASLt handles and workspaces made so far, one per device and host thread, made at the
/// thread's first product through cuBLASLt on the device and kept (inference takes a [`Gpu`] for
/// each layer's product, and a handle and a 32 MiB workspace made and freed for each would cost
/// more than a decoding step's product); and the algorithms cuBLASLt's heuristic chose, per
/// device: a product of a shape, types, epilogue and alignments seen before takes the same
/// algorithm without asking again (asking costs more than a decoding step's small product).
/// Per thread because a candle device's work goes to the calling thread's stream: the products
/// of one thread are ordered on its stream, two threads' could overlap and must not share a
/// workspace.
struct LtHandles {
    handles: Vec<(
        (candle_core::cuda_backend::DeviceId, std::thread::ThreadId),
        Lt,
    )>,
    algos: std::collections::HashMap<
        (candle_core::cuda_backend::DeviceId, LtKey),
        lt_sys::cublasLtMatmulAlgo_t,
    >,
}

static LT: std::sync::LazyLock<std::sync::Mutex<LtHandles>> = std::sync::LazyLock::new(|| {
    std::sync::Mutex::new(LtHandles {
        handles: Vec::new(),
        algos: std::collections::HashMap::new(),
    })
});

/// At most this many handles are kept (a run uses one or a few devices and threads; the tests
/// open many devices), the oldest freed first.
const LT_KEPT: usize = 8;

/// At most this many algorithms are kept (prompts of every length make products of as many row
/// counts), all dropped when it is reached.
const LT_ALGOS_KEPT: usize = 1024;

/// Algorithms timed per product shape with [`autotune`] on, and the timed runs of each.
const TUNE_CANDIDATES: usize = 8;
const TUNE_RUNS: usize = 3;

/// LMKIT_CUDA_AUTOTUNE=1, or [`set_autotune`].
static AUTOTUNE: super::Switch = super::Switch::new();

/// Whether the products with epilogues time the heuristic's first [`TUNE_CANDIDATES`]
/// algorithms the first time a shape (and types, epilogue, alignments) comes, and keep the
/// fastest, instead of taking the heuristic's first: LMKIT_CUDA_AUTOTUNE=1, or
/// [`set_autotune`]. For training, whose shapes repeat every step; each new shape costs a wait
/// for the GPU and a few dozen products.
pub fn autotune() -> bool {
    AUTOTUNE.get(|| std::env::var("LMKIT_CUDA_AUTOTUNE").is_ok_and(|v| v == "1"))
}

/// Turns [`autotune`] on or off.
pub fn set_autotune(on: bool) {
    AUTOTUNE.set(on);
}

/// Uploads of at most this many bytes take a staging slot ([`Gpu::upload`]): a decoding step's
/// attention table, a training step's token ids (32 KiB for 8,192) and AdamW's chunk table.
const STAGED_BYTES: usize = 64 << 10;
/// Staging slots per device and thread.
const STAGING_SLOTS: usize = 64;

/// Page-locked host memory for small uploads: a copy from pageable memory may first wait for
/// everything queued on the stream (the driver stages it through memory of its own), which
/// made each layer of a decoding step — whose attention takes a table of its sequences' cache
/// addresses and lengths — wait for the layers before it instead of being queued behind them.
/// A copy from page-locked memory is queued and returns at once. Slots are taken in turn, each
/// reused once the GPU has passed its previous copy (an event after it).
#[derive(Default)]
struct Staging {
    slots: Vec<Slot>,
    next: usize,
    /// Page-locked memory could not be had: uploads copy from where the data is.
    unavailable: bool,
}

struct Slot {
    host: cudarc::driver::PinnedHostSlice<u8>,
    event: cudarc::driver::CudaEvent,
    /// Whether a copy from it was queued (its event recorded).
    used: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        // The page-locked memory is freed with the slots: their copies must have run.
        for s in self.slots.iter().filter(|s| s.used) {
            let _ = s.event.synchronize();
        }
    }
}

/// The staging slots made so far, per device and host thread (as [`LtHandles`]: a thread's
/// copies go to its stream), at most [`LT_KEPT`] sets, the oldest freed first.
#[allow(clippy::type_complexity)]
static STAGING: std::sync::LazyLock<
    std::sync::Mutex<
        Vec<(
            (candle_core::cuda_backend::DeviceId, std::thread::ThreadId),
            Staging,
        )>,
    >,
> = std::sync::LazyLock::new(|| std::sync::Mutex::new(Vec::new()));

/// Whether [`keep_freed_memory`] ran for GPU i (bit i).
static POOLS_SET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Readies a CUDA device for lmkit's work (other devices are left alone; later calls cost two
/// atomic reads): memory freed on the GPU stays in its pool for the next allocations
/// ([`keep_freed_memory`]), and cudarc makes no events for each allocation (they order a buffer's
/// use across streams, and all of a candle device's work runs on one stream: cudarc waits on
/// them only once a context has several, which lmkit never makes).
pub fn prepare_device(device: &Device) {
    if let Device::Cuda(dev) = device {
        prepare(dev);
    }
}

fn prepare(dev: &CudaDevice) {
    if dev.is_event_tracking() {
        // SAFETY: the context's one stream orders every use of its buffers (no other stream is
        // made on it), so the events would order nothing.
        unsafe { dev.disable_event_tracking() };
    }
    keep_freed_memory(dev.cuda_stream().context());
}

/// Sets the GPU's memory pool (the one cuMemAllocAsync, and so candle, allocates from) to keep
/// freed memory instead of returning it to the driver at every synchronisation, as CUDA's
/// default release threshold of 0 does: each training step's read of its loss and each decoding
/// step's read of its tokens would hand back every buffer freed since, and the next step map the
/// memory again. As PyTorch's caching allocator, the process keeps what it freed for its next
/// allocations. Once per GPU; a threshold set before (by another library) is left as it is, and
/// `LMKIT_CUDA_KEEP_FREED=0` keeps the driver's default.
fn keep_freed_memory(ctx: &cudarc::driver::CudaContext) {
    use cudarc::driver::sys;
    use std::sync::atomic::Ordering;
    let bit = 1u64.checked_shl(ctx.ordinal() as u32).unwrap_or(0);
    if bit != 0 && POOLS_SET.load(Ordering::Relaxed) & bit != 0 {
        return;
    }
    POOLS_SET.fetch_or(bit, Ordering::Relaxed);
    if std::env::var("LMKIT_CUDA_KEEP_FREED").is_ok_and(|v| v.trim() == "0") {
        return;
    }
    let threshold = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut current = 0u64;
    let mut keep = u64::MAX;
    // SAFETY: `pool` receives the device's current pool; the release threshold is a u64 read
    // from and written to live locals. A driver without memory pools answers with an error and
    // nothing changes.
    unsafe {
        if sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) != sys::CUresult::CUDA_SUCCESS
            || sys::cuMemPoolGetAttribute(pool, threshold, &mut current as *mut u64 as *mut _)
                != sys::CUresult::CUDA_SUCCESS
            || current != 0
        {
            return;
        }
        let _ = sys::cuMemPoolSetAttribute(pool, threshold, &mut keep as *mut u64 as *mut _);
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: the handle was made by `cublasLtCreate` and is destroyed once, here; the
        // products that used it are ordered on the stream before the workspace is freed.
        let _ = unsafe { cudarc::cublaslt::result::destroy_handle(self.handle) };
    }
}

/// Whether f32 products run on the TF32 tensor cores: candle's switch (`train.tf32`), which its
/// own products follow too.
pub fn tf32_products() -> bool {
    candle_core::cuda_backend::gemm_reduced_precision_f32()
}

/// Whether inference's layers of `x` take the GPU's products and kernels ([`super::linear`],
/// [`super::swiglu_rows`]): on a GPU.
pub fn layers_on(x: &Tensor) -> bool {
    x.device().is_cuda()
}

/// Sets [`tf32_products`].
pub fn set_tf32_products(on: bool) {
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(on)
}

impl Gpu {
    fn fail<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> candle_core::Error + '_ {
        move |e| candle_core::Error::Msg(format!("cuda {what}: {e:?}"))
    }

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
        prepare(dev);
        Gpu {
            hw: Hw {
                blas: dev.cublas_handle(),
                dev: dev.clone(),
            },
            tf32: true,
            bf16: BF16_PRODUCTS.load(std::sync::atomic::Ordering::Relaxed),
            flash_rows: super::flash_block_rows(),
        }
    }

    fn buf<T: Elem>(&self, slice: CudaSlice<T>) -> Buf<T> {
        let stream = self.hw.dev.cuda_stream();
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
            store: slice,
        }
    }

    /// An allocation's error: running out of memory says how large the allocation was and what
    /// needs less.
    fn alloc_fail<'a>(
        &'a self,
        what: &'a str,
        bytes: usize,
    ) -> impl FnOnce(cudarc::driver::DriverError) -> candle_core::Error + 'a {
        move |e| {
            use cudarc::driver::sys::CUresult;
            if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                candle_core::Error::Msg(format!(
                    "cuda: out of memory on GPU {} allocating {:.1} MiB; a smaller \
                     train.batch_size (with train.grad_accum for the same batch) or \
                     train.seq_len, train.dtype = \"bf16\" or LMKIT_CUDA_ATTENTION=flash \
                     needs less",
                    self.ordinal(),
                    bytes as f64 / (1 << 20) as f64
                ))
            } else {
                Self::fail(what)(e)
            }
        }
    }

    /// `len` zeros.
    pub fn zeros<T: Elem>(&self, len: usize) -> Result<Buf<T>> {
        let s = self
            .hw
            .dev
            .cuda_stream()
            .alloc_zeros::<T>(len.max(1))
            .map_err(self.alloc_fail("alloc", len * std::mem::size_of::<T>()))?;
        Ok(self.buf(s))
    }

    /// `len` elements the caller writes before reading.
    pub fn uninit(&self, len: usize) -> Result<Buf<f32>> {
        // SAFETY: the buffer is only read by kernels and products after they have written it
        // (each pass writes every element of its scratch buffers first).
        let s = unsafe { self.hw.dev.cuda_stream().alloc::<f32>(len.max(1)) }
            .map_err(self.alloc_fail("alloc", 4 * len))?;
        Ok(self.buf(s))
    }

    /// `len` bf16s the caller writes before reading.
    pub fn uninit_bf16(&self, len: usize) -> Result<Buf<Bf16>> {
        // SAFETY: as for `uninit`: written by a kernel before anything reads it.
        let s = unsafe { self.hw.dev.cuda_stream().alloc::<Bf16>(len.max(1)) }
            .map_err(self.alloc_fail("alloc", 2 * len))?;
        Ok(self.buf(s))
    }

    /// `data` in a new buffer on the GPU, copied in stream order. Up to [`STAGED_BYTES`] (such as
    /// the table a decoding step's attention takes for each layer) go through a page-locked
    /// staging slot ([`Staging`]) and do not wait for the GPU; larger data is copied from where
    /// it is, which from pageable memory may wait for the stream's earlier work first.
    pub(super) fn upload<T: Elem>(&self, data: &[T]) -> Result<Buf<T>> {
        let bytes = std::mem::size_of_val(data);
        if bytes > 0 && bytes <= STAGED_BYTES {
            let stream = self.hw.dev.cuda_stream();
            // SAFETY: written by the copy below before anything reads it.
            let buf = self.buf(
                unsafe { stream.alloc::<T>(data.len()) }
                    .map_err(self.alloc_fail("alloc", bytes))?,
            );
            // SAFETY: T is plain data (DeviceRepr): its bytes are what the GPU gets.
            let src = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, bytes) };
            // Where page-locked memory cannot be had, the copy below.
            if self.staged_copy(buf.dev.addr, src).is_ok() {
                return Ok(buf);
            }
        }
        let s = self
            .hw
            .dev
            .cuda_stream()
            .clone_htod(data)
            .map_err(self.alloc_fail("upload", bytes))?;
        Ok(self.buf(s))
    }

    /// Copies `src` (at most [`STAGED_BYTES`]) to device address `dst` in stream order, through
    /// the next of this device's and thread's staging slots: the slot's previous copy is waited
    /// for (64 copies back: the host rarely runs that far ahead), `src` written into it, the
    /// copy from page-locked memory queued (it returns at once) and an event recorded after it.
    fn staged_copy(&self, dst: u64, src: &[u8]) -> Result<()> {
        use cudarc::driver::result;
        let stream = self.hw.dev.cuda_stream();
        let ctx = stream.context();
        let id = (self.hw.dev.id(), std::thread::current().id());
        let mut all = STAGING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = match all.iter().position(|(d, _)| *d == id) {
            Some(at) => at,
            None => {
                if all.len() >= LT_KEPT {
                    all.remove(0);
                }
                all.push((id, Staging::default()));
                all.len() - 1
            }
        };
        let staging = &mut all[at].1;
        if staging.unavailable {
            candle_core::bail!("cuda: no page-locked staging memory");
        }
        let i = staging.next;
        if i == staging.slots.len() {
            // SAFETY: the slot is written before each copy from it.
            let made = unsafe { ctx.alloc_pinned::<u8>(STAGED_BYTES) }.and_then(|host| {
                let event = ctx.new_event(None)?;
                Ok(Slot {
                    host,
                    event,
                    used: false,
                })
            });
            match made {
                Ok(slot) => staging.slots.push(slot),
                Err(e) => {
                    // Not asked for again: this thread's uploads take the pageable path.
                    staging.unavailable = true;
                    return Err(Self::fail("cuMemHostAlloc")(e));
                }
            }
        }
        staging.next = (i + 1) % STAGING_SLOTS;
        let slot = &mut staging.slots[i];
        if slot.used {
            slot.event
                .synchronize()
                .map_err(Self::fail("cuEventSynchronize"))?;
        }
        let host = slot.host.as_mut_slice().map_err(Self::fail("staging"))?;
        host[..src.len()].copy_from_slice(src);
        ctx.bind_to_thread().map_err(Self::fail("bind context"))?;
        // SAFETY: `dst` holds `src.len()` bytes (the caller's new buffer); the page-locked slot
        // is not written again before the event recorded after this copy has passed.
        unsafe { result::memcpy_htod_async(dst, &host[..src.len()], stream.cu_stream()) }
            .map_err(Self::fail("cuMemcpyHtoDAsync"))?;
        slot.event
            .record(&stream)
            .map_err(Self::fail("cuEventRecord"))?;
        slot.used = true;
        Ok(())
    }

    /// The GPU's index.
    pub fn ordinal(&self) -> usize {
        self.hw.dev.cuda_stream().context().ordinal()
    }

    pub fn download<T: Elem>(&self, buf: &Buf<T>, len: usize) -> Result<Vec<T>> {
        let v = self
            .hw
            .dev
            .cuda_stream()
            .clone_dtoh(&buf.store.slice(..len))
            .map_err(Self::fail("download"))?;
        Ok(v)
    }

    /// A tensor over the buffer's first `shape.elem_count()` elements (the buffer moves into it).
    pub fn into_tensor(&self, buf: Buf<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
        self.wrap(buf.store, shape.into())
    }

    /// [`Gpu::into_tensor`] of bf16s: a tensor of candle's bf16.
    pub fn into_tensor_bf16(&self, buf: Buf<Bf16>, shape: impl Into<Shape>) -> Result<Tensor> {
        let len = buf.store.len();
        let stream = self.hw.dev.cuda_stream();
        let ptr = buf.store.leak();
        // SAFETY: the allocation of `len` `Bf16`s just released by `leak` (freed once, by the
        // new slice); `Bf16` is `repr(transparent)` over the u16 that `half::bf16` is too.
        let slice = unsafe { stream.upgrade_device_ptr::<half::bf16>(ptr, len) };
        self.wrap(slice, shape.into())
    }

    /// A tensor over a slice's first `shape.elem_count()` elements.
    fn wrap<S: candle_core::cuda_backend::CudaDType + Elem>(
        &self,
        mut slice: CudaSlice<S>,
        shape: Shape,
    ) -> Result<Tensor> {
        if slice.len() != shape.elem_count() {
            if slice.len() < shape.elem_count() {
                candle_core::bail!("cuda: a buffer of {} for {shape:?}", slice.len());
            }
            let part = self
                .hw
                .dev
                .cuda_stream()
                .clone_dtod(&slice.slice(..shape.elem_count()))
                .map_err(Self::fail("copy"))?;
            slice = part;
        }
        let storage = CudaStorage::wrap_cuda_slice(slice, self.hw.dev.clone());
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }

    /// The f32 elements of a tensor's storage on a GPU from its layout's start to the
    /// storage's end (a strided view's whole reach, bounds-checked by the entry points), or
    /// `None` for another device or dtype.
    pub(super) fn region(storage: &Storage, layout: &Layout) -> Option<Dev<f32>> {
        storage_region::<f32, f32>(storage, layout)
    }

    /// [`Gpu::region`] of a bf16 storage.
    pub(super) fn region_bf16(storage: &Storage, layout: &Layout) -> Option<Dev<Bf16>> {
        storage_region::<half::bf16, Bf16>(storage, layout)
    }

    /// [`Gpu::region`] of a storage held mutably, for a kernel that writes it.
    pub(super) fn region_mut(cs: &mut CudaStorage, layout: &Layout) -> Option<Dev<f32>> {
        storage_region_mut::<f32, f32>(cs, layout)
    }

    /// [`Gpu::region_mut`] of a bf16 storage.
    pub(super) fn region_mut_bf16(cs: &mut CudaStorage, layout: &Layout) -> Option<Dev<Bf16>> {
        storage_region_mut::<half::bf16, Bf16>(cs, layout)
    }

    /// An event recorded on this GPU's stream now, for the op timing.
    pub(super) fn mark(&self) -> Result<Mark> {
        let stream = self.hw.dev.cuda_stream();
        let event = stream
            .context()
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(Self::fail("cuEventCreate"))?;
        event.record(&stream).map_err(Self::fail("cuEventRecord"))?;
        Ok(Mark(event))
    }

    pub fn synchronize(&self) -> Result<()> {
        self.hw
            .dev
            .cuda_stream()
            .synchronize()
            .map_err(Self::fail("synchronize"))
    }

    /// Compute capability's major version of this GPU.
    pub fn compute_major(&self) -> Result<i32> {
        let (major, _) = self
            .hw
            .dev
            .cuda_stream()
            .context()
            .compute_capability()
            .map_err(Self::fail("compute capability"))?;
        Ok(major)
    }

    /// Launches kernel `name` of a module on a grid of (x, y) blocks of `block` threads with
    /// `shared` bytes of dynamic shared memory (beyond 48 KiB where the GPU allows it).
    pub(super) fn launch_kernel(
        &self,
        module: Module,
        name: &str,
        (x, y): (usize, usize),
        block: u32,
        shared: usize,
        args: &[Arg],
    ) -> Result<()> {
        let (module, ptx) = match module {
            Module::Train => TRAIN_KERNELS,
            Module::Attention => ATTENTION_KERNELS,
        };
        let f = self
            .hw
            .dev
            .get_or_load_custom_func(name, module, ptx)?
            .into_cuda_function();
        if shared > 48 << 10 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                int(shared)?,
            )
            .map_err(Self::fail(name))?;
        }
        let stream = self.hw.dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        for a in args {
            match a {
                Arg::P(p) => b.arg(p),
                Arg::I(i) => b.arg(i),
                Arg::L(l) => b.arg(l),
                Arg::F(x) => b.arg(x),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (int(x)? as u32, int(y)? as u32, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: int(shared)? as u32,
        };
        // SAFETY: every pointer argument was checked by the caller to cover the elements the
        // kernel reads or writes for the sizes passed with it; the kernels index only within
        // those sizes.
        unsafe { b.launch(cfg) }.map_err(Self::fail(name))?;
        Ok(())
    }

    /// [`Gpu::copy`] of `len` f32s between addresses checked by the caller, on the stream.
    pub(super) fn copy_raw(&self, d: u64, s: u64, len: usize) -> Result<()> {
        let stream = self.hw.dev.cuda_stream();
        // SAFETY: both addresses are live device buffers holding `len` elements (checked by the
        // caller); the copy is ordered on the stream every kernel and product of the pass uses.
        unsafe { cudarc::driver::result::memcpy_dtod_async(d, s, len * 4, stream.cu_stream()) }
            .map_err(Self::fail("copy"))
    }

    /// The product of [`Gpu::mm`] on cuBLAS: operands as (address, leading dimension,
    /// transposed), checked by the caller, and whether both are bf16 (c is f32 either way).
    pub(super) fn gemm(
        &self,
        (rows, cols, k): (usize, usize, usize),
        ((pa, lda, ta), (pb, ldb, tb), bf16_operands): Operands,
        (pc, ldc): (u64, usize),
        (alpha, beta): (f32, f32),
        batch: Batched,
    ) -> Result<()> {
        let op = |t: bool| {
            if t {
                cublas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                cublas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        // bf16 operands run on the bf16 tensor cores with f32 accumulation as they are; f32
        // operands are rounded to bf16 or TF32 by cuBLAS where the products are reduced.
        let compute = match self.precision(bf16_operands) {
            Precision::Bf16 | Precision::F32 => cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            Precision::F32AsBf16 => cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
            Precision::Tf32 => cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        };
        let f32t = cublas_sys::cudaDataType_t::CUDA_R_32F;
        let operand_t = if bf16_operands {
            cublas_sys::cudaDataType_t::CUDA_R_16BF
        } else {
            f32t
        };
        // Column-major cuBLAS computes cᵀ = bᵀ·aᵀ: a row-major matrix is its transpose in
        // column-major order, so the operands swap and keep their own transposition flags.
        // SAFETY: the addresses are live device buffers (borrowed tensors or buffers of the
        // pass) whose lengths cover every element read or written, checked above; the handle
        // is bound to candle's stream for this device.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.hw.blas.handle(),
                op(tb),
                op(ta),
                int(cols)?,
                int(rows)?,
                int(k)?,
                &alpha as *const f32 as *const _,
                pb as *const _,
                operand_t,
                int(ldb)?,
                batch.b as i64,
                pa as *const _,
                operand_t,
                int(lda)?,
                batch.a as i64,
                &beta as *const f32 as *const _,
                pc as *mut _,
                f32t,
                int(ldc)?,
                batch.c as i64,
                int(batch.count)?,
                compute,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(Self::fail("gemm"))
    }
}

impl Gpu {
    /// `f` of this device's and thread's cuBLASLt handle and workspace and the device's
    /// algorithms ([`LtHandles`]: made at the first call, then kept), under their lock.
    fn with_lt<R>(&self, f: impl FnOnce(&Lt, &mut Algos) -> Result<R>) -> Result<R> {
        let id = (self.hw.dev.id(), std::thread::current().id());
        let mut lt = LT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let LtHandles { handles, algos } = &mut *lt;
        let at = match handles.iter().position(|(d, _)| *d == id) {
            Some(at) => at,
            None => {
                let size = if self.compute_major()? >= 9 {
                    32 << 20
                } else {
                    4 << 20
                };
                // SAFETY: scratch that cuBLASLt writes before it reads.
                let workspace = unsafe { self.hw.dev.cuda_stream().alloc::<u8>(size) }
                    .map_err(self.alloc_fail("alloc", size))?;
                let handle =
                    cudarc::cublaslt::result::create_handle().map_err(Self::fail("cublasLt"))?;
                if handles.len() >= LT_KEPT {
                    let (_, oldest) = handles.remove(0);
                    // Its thread's products may still be running on that thread's stream:
                    // the whole context waits for them before the workspace is freed here.
                    let _ = oldest.workspace.stream().context().synchronize();
                }
                handles.push((id, Lt { handle, workspace }));
                handles.len() - 1
            }
        };
        f(
            &handles[at].1,
            &mut Algos {
                device: id.0,
                algos,
            },
        )
    }

    /// [`Gpu::linear`]'s product through cuBLASLt: `d = a·b + c + bias` (row-major, d and c of
    /// row stride `cols`), the bias added by the epilogue (`CUBLASLT_EPILOGUE_BIAS`, a vector of
    /// d's type along d's columns), c read as the product's C with β = 1 (or d as C with β = 0),
    /// then the GELU or its gradient where `out.act` says (`GELU_AUX[_BIAS]`,
    /// `DGELU[_BGRAD]`: the aux matrix of d's type and row stride, the bias pointer then the
    /// bias's gradient); `false` (nothing run) where cuBLASLt refuses the description or has no
    /// algorithm for it.
    pub(super) fn gemm_fused(
        &self,
        (rows, cols, k): (usize, usize, usize),
        ((pa, lda, ta), (pb, ldb, tb), bf16_operands): Operands,
        out: super::linear::Fused,
    ) -> Result<bool> {
        // As `gemm`'s (cuBLASLt has its own copy of the type).
        let compute = match self.precision(bf16_operands) {
            Precision::Bf16 | Precision::F32 => lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            Precision::F32AsBf16 => lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
            Precision::Tf32 => lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        };
        let ty = |bf16: bool| {
            if bf16 {
                lt_sys::cudaDataType_t::CUDA_R_16BF
            } else {
                lt_sys::cudaDataType_t::CUDA_R_32F
            }
        };
        // Column-major cuBLASLt computes dᵀ = bᵀ·aᵀ (as `gemm` does): its A is our b, its B our
        // a, its D [cols, rows] with leading dimension cols, and the bias runs along its rows,
        // our columns. A layout is the stored matrix's [rows, cols], before its transposition.
        let stored = |t: bool, r: usize, c: usize| if t { (c, r) } else { (r, c) };
        self.with_lt(|lt, algos| {
            let plan = LtPlan {
                compute,
                trans: (tb, ta),
                layouts: [
                    (ty(bf16_operands), stored(tb, cols, k), ldb),
                    (ty(bf16_operands), stored(ta, k, rows), lda),
                    (ty(out.bf16_out), (cols, rows), cols),
                ],
                bias: out.bias,
                act: out.act,
                ld_aux: cols,
                // The largest power of two up to 256 dividing each address: the alignment
                // cuBLASLt may assume of A, B, C and D.
                align: [pb, pa, out.c.unwrap_or(out.d), out.d]
                    .map(|p| 1 << p.trailing_zeros().min(8)),
                workspace: lt.workspace.len(),
            };
            let key = plan.key();
            let cached = algos.get(key);
            // Timing candidates runs the product several times: only where that gives the
            // same result (d not also the C it adds).
            let tune = cached.is_none() && autotune() && out.c != Some(out.d);
            let candidates = if tune { TUNE_CANDIDATES } else { 1 };
            let Ok(ready) = plan.make(lt.handle, cached, candidates) else {
                return Ok(false);
            };
            let workspace = {
                let stream = self.hw.dev.cuda_stream();
                let (addr, _sync) = lt.workspace.device_ptr(&stream);
                addr
            };
            let (alpha, beta) = (1f32, if out.c.is_some() { 1f32 } else { 0f32 });
            let l = &ready.layouts.0;
            let run = |algo: &lt_sys::cublasLtMatmulAlgo_t| {
                // SAFETY: the description and layouts were made for these operands, the
                // algorithm for a product of the same key (shape, types, epilogue, alignments);
                // a, b, c, d and the bias are live device buffers whose lengths the caller
                // checked; the workspace lives as long as the handle; candle's stream for this
                // device orders the product with the pass's other work and with other products
                // using the workspace.
                unsafe {
                    cudarc::cublaslt::result::matmul(
                        lt.handle,
                        ready.desc.0,
                        &alpha as *const f32 as *const _,
                        &beta as *const f32 as *const _,
                        pb as *const _,
                        l[0],
                        pa as *const _,
                        l[1],
                        out.c.unwrap_or(out.d) as *const _,
                        l[2],
                        out.d as *mut _,
                        l[2],
                        algo,
                        workspace as *mut _,
                        lt.workspace.len(),
                        self.hw.dev.cuda_stream().cu_stream() as *mut _,
                    )
                }
            };
            let algo = if ready.algos.len() > 1 {
                self.fastest(&ready.algos, &run)?
            } else {
                ready.algos[0]
            };
            algos.keep(key, algo);
            run(&algo).map_err(Self::fail("cublasLt matmul"))?;
            Ok(true)
        })
    }

    /// The algorithm of `algos` whose product `run` takes the least time on the GPU: each run
    /// once, then [`TUNE_RUNS`] times between two events (waiting for the GPU); one that fails is
    /// passed over (the heuristic's first where all do).
    fn fastest(
        &self,
        algos: &[lt_sys::cublasLtMatmulAlgo_t],
        run: &impl Fn(
            &lt_sys::cublasLtMatmulAlgo_t,
        ) -> std::result::Result<(), cudarc::cublaslt::result::CublasError>,
    ) -> Result<lt_sys::cublasLtMatmulAlgo_t> {
        let mut best = (f64::INFINITY, algos[0]);
        for algo in algos {
            if run(algo).is_err() {
                continue;
            }
            let start = self.mark()?;
            if (0..TUNE_RUNS).any(|_| run(algo).is_err()) {
                continue;
            }
            let secs = self.mark()?.secs_since(&start)?;
            if secs < best.0 {
                best = (secs, *algo);
            }
        }
        Ok(best.1)
    }
}

/// What a cuBLASLt product is described by: compute type, (A, B) transposed, A/B/C=D layouts
/// (type, [rows, cols] as stored, leading dimension), the bias epilogue's vector (or the bias
/// gradient's), the activation and its aux matrix's leading dimension, the alignments of A, B,
/// C and D, and the workspace it may use.
struct LtPlan {
    compute: lt_sys::cublasComputeType_t,
    trans: (bool, bool),
    layouts: [(lt_sys::cudaDataType_t, (usize, usize), usize); 3],
    bias: Option<u64>,
    act: super::linear::Act,
    ld_aux: usize,
    align: [u32; 4],
    workspace: usize,
}

/// A device's algorithms in [`LtHandles`].
struct Algos<'a> {
    device: candle_core::cuda_backend::DeviceId,
    algos: &'a mut std::collections::HashMap<
        (candle_core::cuda_backend::DeviceId, LtKey),
        lt_sys::cublasLtMatmulAlgo_t,
    >,
}

impl Algos<'_> {
    fn get(&self, key: LtKey) -> Option<lt_sys::cublasLtMatmulAlgo_t> {
        self.algos.get(&(self.device, key)).copied()
    }

    fn keep(&mut self, key: LtKey, algo: lt_sys::cublasLtMatmulAlgo_t) {
        let key = (self.device, key);
        if !self.algos.contains_key(&key) {
            if self.algos.len() >= LT_ALGOS_KEPT {
                self.algos.clear();
            }
            self.algos.insert(key, algo);
        }
    }
}

/// What makes cuBLASLt's heuristic choose the same algorithm for two products: an [`LtPlan`]
/// without its bias and aux addresses.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct LtKey {
    compute: lt_sys::cublasComputeType_t,
    trans: (bool, bool),
    layouts: [(lt_sys::cudaDataType_t, (usize, usize), usize); 3],
    bias: bool,
    /// 0: no activation, 1: GELU, 2: its gradient.
    act: u8,
    ld_aux: usize,
    align: [u32; 4],
    workspace: usize,
}

/// A described product and the algorithms cuBLASLt's heuristic chose for it, best first.
struct LtReady {
    desc: LtDesc,
    layouts: LtLayouts,
    algos: Vec<lt_sys::cublasLtMatmulAlgo_t>,
}

struct LtDesc(lt_sys::cublasLtMatmulDesc_t);
struct LtLayouts(Vec<lt_sys::cublasLtMatrixLayout_t>);
struct LtPref(lt_sys::cublasLtMatmulPreference_t);

// SAFETY (the three `Drop`s): each handle was made by its `create_` function and is freed once,
// after the product that used it was enqueued (cuBLASLt copies what it needs at the call).
impl Drop for LtDesc {
    fn drop(&mut self) {
        let _ = unsafe { cudarc::cublaslt::result::destroy_matmul_desc(self.0) };
    }
}
impl Drop for LtLayouts {
    fn drop(&mut self) {
        for &l in &self.0 {
            let _ = unsafe { cudarc::cublaslt::result::destroy_matrix_layout(l) };
        }
    }
}
impl Drop for LtPref {
    fn drop(&mut self) {
        let _ = unsafe { cudarc::cublaslt::result::destroy_matmul_pref(self.0) };
    }
}

impl LtPlan {
    fn key(&self) -> LtKey {
        use super::linear::Act;
        LtKey {
            compute: self.compute,
            trans: self.trans,
            layouts: self.layouts,
            bias: self.bias.is_some(),
            act: match self.act {
                Act::None => 0,
                Act::Gelu { .. } => 1,
                Act::GeluGrad { .. } => 2,
            },
            ld_aux: self.ld_aux,
            align: self.align,
            workspace: self.workspace,
        }
    }

    /// Sets the bias and aux addresses of `desc`, this plan's description.
    fn point(
        &self,
        desc: &LtDesc,
    ) -> std::result::Result<(), cudarc::cublaslt::result::CublasError> {
        use super::linear::Act;
        use lt_sys::cublasLtMatmulDescAttributes_t as Desc;
        let aux = match self.act {
            Act::None => None,
            Act::Gelu { aux } | Act::GeluGrad { aux, .. } => Some(aux),
        };
        let pointers = [
            (Desc::CUBLASLT_MATMUL_DESC_BIAS_POINTER, self.bias),
            (Desc::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux),
        ];
        for (attr, addr) in pointers {
            if let Some(addr) = &addr {
                // SAFETY: a 64-bit device address, read during the call, for an attribute
                // cuBLASLt documents as a device pointer.
                unsafe {
                    cudarc::cublaslt::result::set_matmul_desc_attribute(
                        desc.0,
                        attr,
                        addr as *const u64 as _,
                        8,
                    )?
                };
            }
        }
        Ok(())
    }

    /// The description, layouts and `algo`, or without it the heuristic's first `candidates`
    /// algorithms (at least one), best first; an error where cuBLASLt refuses any of them or has
    /// no algorithm.
    fn make(
        &self,
        handle: lt_sys::cublasLtHandle_t,
        algo: Option<lt_sys::cublasLtMatmulAlgo_t>,
        candidates: usize,
    ) -> std::result::Result<LtReady, cudarc::cublaslt::result::CublasError> {
        use cudarc::cublaslt::result as lt;
        use lt_sys::cublasLtMatmulDescAttributes_t as Desc;
        use lt_sys::cublasLtMatmulPreferenceAttributes_t as Pref;
        let mut layouts = LtLayouts(Vec::new());
        for (ty, (r, c), ld) in self.layouts {
            layouts
                .0
                .push(lt::create_matrix_layout(ty, r as u64, c as u64, ld as i64)?);
        }
        let desc = LtDesc(lt::create_matmul_desc(
            self.compute,
            lt_sys::cudaDataType_t::CUDA_R_32F,
        )?);
        // TRANSA/TRANSB are int32 `cublasOperation_t`s, the epilogue a uint32.
        let op = |t: bool| -> i32 {
            if t {
                cublas_sys::cublasOperation_t::CUBLAS_OP_T as i32
            } else {
                cublas_sys::cublasOperation_t::CUBLAS_OP_N as i32
            }
        };
        let (op_a, op_b) = (op(self.trans.0), op(self.trans.1));
        use super::linear::Act;
        use lt_sys::cublasLtEpilogue_t as Epi;
        let (epilogue, aux) = match (self.act, self.bias.is_some()) {
            (Act::None, true) => (Epi::CUBLASLT_EPILOGUE_BIAS, None),
            (Act::None, false) => (Epi::CUBLASLT_EPILOGUE_DEFAULT, None),
            (Act::Gelu { aux }, true) => (Epi::CUBLASLT_EPILOGUE_GELU_AUX_BIAS, Some(aux)),
            (Act::Gelu { aux }, false) => (Epi::CUBLASLT_EPILOGUE_GELU_AUX, Some(aux)),
            (Act::GeluGrad { aux, .. }, true) => (Epi::CUBLASLT_EPILOGUE_DGELU_BGRAD, Some(aux)),
            (Act::GeluGrad { aux, .. }, false) => (Epi::CUBLASLT_EPILOGUE_DGELU, Some(aux)),
        };
        let epilogue = epilogue as u32;
        let ld_aux = self.ld_aux as i64;
        let workspace = self.workspace as u64;
        // SAFETY: every attribute gets a pointer to a live value of the size cuBLASLt documents
        // for it (int32 operations, uint32 epilogue and alignments, uint64 workspace size, 64-bit
        // device addresses for the bias and the aux matrix, an int64 leading dimension), read
        // during the call.
        unsafe {
            let mut attrs: Vec<(Desc, *const std::ffi::c_void, usize)> = vec![
                (
                    Desc::CUBLASLT_MATMUL_DESC_TRANSA,
                    &op_a as *const i32 as _,
                    4,
                ),
                (
                    Desc::CUBLASLT_MATMUL_DESC_TRANSB,
                    &op_b as *const i32 as _,
                    4,
                ),
                (
                    Desc::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    &epilogue as *const u32 as _,
                    4,
                ),
            ];
            if aux.is_some() {
                attrs.push((
                    Desc::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                    &ld_aux as *const i64 as _,
                    8,
                ));
            }
            for (attr, v, size) in attrs {
                lt::set_matmul_desc_attribute(desc.0, attr, v, size)?;
            }
            self.point(&desc)?;
            if let Some(algo) = algo {
                return Ok(LtReady {
                    desc,
                    layouts,
                    algos: vec![algo],
                });
            }
            let pref = LtPref(lt::create_matmul_pref()?);
            let pref_set = |attr: Pref, v: *const std::ffi::c_void, size: usize| {
                lt::set_matmul_pref_attribute(pref.0, attr, v, size)
            };
            pref_set(
                Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &workspace as *const u64 as _,
                8,
            )?;
            let aligns = [
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ];
            for (attr, a) in aligns.into_iter().zip(&self.align) {
                pref_set(attr, a as *const u32 as _, 4)?;
            }
            let l = &layouts.0;
            let algos = if candidates <= 1 {
                let heuristic =
                    lt::get_matmul_algo_heuristic(handle, desc.0, l[0], l[1], l[2], l[2], pref.0)?;
                vec![heuristic.algo]
            } else {
                let mut results: Vec<lt_sys::cublasLtMatmulHeuristicResult_t> =
                    vec![std::mem::zeroed(); candidates];
                let mut count = 0;
                lt_sys::cublasLtMatmulAlgoGetHeuristic(
                    handle,
                    desc.0,
                    l[0],
                    l[1],
                    l[2],
                    l[2],
                    pref.0,
                    candidates as i32,
                    results.as_mut_ptr(),
                    &mut count,
                )
                .result()?;
                let found: Vec<_> = results[..count.clamp(0, candidates as i32) as usize]
                    .iter()
                    .filter(|r| r.state == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                    .map(|r| r.algo)
                    .collect();
                if found.is_empty() {
                    return Err(cudarc::cublaslt::result::CublasError(
                        lt_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED,
                    ));
                }
                found
            };
            Ok(LtReady {
                desc,
                layouts,
                algos,
            })
        }
    }
}

/// An NCCL communicator: one member per process, each on its own GPU (see [`crate::nccl`]).
pub struct Comm {
    comm: crate::nccl::NcclComm,
    nccl: &'static crate::nccl::Nccl,
    gpu: Gpu,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; `Comm` is not
// `Sync`, so only its owner's thread calls it.
unsafe impl Send for Comm {}

impl Comm {
    /// Joins the communicator `id` (made by rank 0, the same for every member) as `rank` of
    /// `world`, on `device`'s GPU. Blocks until every member has joined.
    pub fn new(
        nccl: &'static crate::nccl::Nccl,
        device: &Device,
        id: crate::nccl::UniqueId,
        rank: usize,
        world: usize,
    ) -> Result<Comm> {
        let Some(gpu) = Gpu::of(device) else {
            candle_core::bail!("NCCL needs a CUDA device, not {device:?}");
        };
        // NCCL takes the GPU from the calling thread's current context.
        gpu.hw
            .dev
            .cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(Gpu::fail("bind context"))?;
        let mut comm: crate::nccl::NcclComm = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; the id is passed by value as nccl.h
        // declares it.
        let code = unsafe { (nccl.comm_init_rank)(&mut comm, int(world)?, id, int(rank)?) };
        nccl.check(code, None)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL rank {rank} of {world}: {e}")))?;
        Ok(Comm { comm, nccl, gpu })
    }

    /// The members' element-wise mean of each tensor (contiguous f32 on this communicator's
    /// GPU), as new tensors; queued on the GPU's stream, so later work sees the results.
    pub fn mean(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut outs = Vec::with_capacity(tensors.len());
        let mut guards = Vec::with_capacity(tensors.len());
        for t in tensors {
            let (storage, layout) = t.storage_and_layout();
            let Some(src) = Gpu::view(&storage, layout) else {
                candle_core::bail!(
                    "NCCL mean: a {:?} tensor on {:?} (contiguous f32 on the GPU expected)",
                    t.dtype(),
                    t.device()
                );
            };
            let out = self.gpu.uninit(src.len)?;
            guards.push((storage, src, out.dev));
            outs.push(out);
        }
        let stream = self.gpu.hw.dev.cuda_stream().cu_stream() as *mut std::ffi::c_void;
        let check = |code| {
            self.nccl
                .check(code, Some(self.comm))
                .map_err(candle_core::Error::Msg)
        };
        // SAFETY: every source and destination holds `src.len` f32s (views of live storages,
        // buffers of that length); the calls are queued on the stream that later reads them.
        unsafe {
            check((self.nccl.group_start)())?;
            for (_, src, dst) in &guards {
                let code = (self.nccl.all_reduce)(
                    src.addr as *const std::ffi::c_void,
                    dst.addr as *mut std::ffi::c_void,
                    src.len,
                    crate::nccl::FLOAT32,
                    crate::nccl::AVG,
                    self.comm,
                    stream,
                );
                if code != 0 {
                    // Closes the group before reporting.
                    let _ = (self.nccl.group_end)();
                    check(code)?;
                }
            }
            check((self.nccl.group_end)())?;
        }
        drop(guards);
        outs.into_iter()
            .zip(tensors)
            .map(|(buf, t)| self.gpu.into_tensor(buf, t.shape().clone()))
            .collect()
    }
}

impl Comm {
    /// Ends the communicator without waiting for its operations in flight: for a group that
    /// failed (a member left or stopped answering), whose all-reduce may never complete, where
    /// dropping it (`ncclCommDestroy`) could wait for ever. Without `ncclCommAbort` (NCCL
    /// before 2.4) the communicator is left as it is, for the process's end to reclaim.
    pub fn abort(mut self) {
        if let Some(abort) = self.nccl.comm_abort {
            // SAFETY: the communicator was made by `Comm::new` and is not used again.
            let _ = unsafe { abort(self.comm) };
        }
        // `Drop` leaves a null communicator.
        self.comm = std::ptr::null_mut();
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        if self.comm.is_null() {
            return; // aborted
        }
        // SAFETY: the communicator was made by `Comm::new` and is destroyed once.
        let _ = unsafe { (self.nccl.comm_destroy)(self.comm) };
    }
}

/// A storage's elements of candle's type `S` from the layout's start, as device elements `T` (of
/// the same size), or `None` for another device or dtype.
fn storage_region<S: candle_core::cuda_backend::CudaDType, T>(
    storage: &Storage,
    layout: &Layout,
) -> Option<Dev<T>> {
    let Storage::Cuda(cs) = storage else {
        return None;
    };
    let slice = cs.as_cuda_slice::<S>().ok()?;
    let stream = cs.device.cuda_stream();
    let (addr, _sync) = slice.device_ptr(&stream);
    let all = Dev::<T> {
        addr,
        len: slice.len(),
        _t: PhantomData,
    };
    all.at(layout.start_offset()).ok()
}

/// [`storage_region`] of a storage held mutably.
fn storage_region_mut<S: candle_core::cuda_backend::CudaDType, T>(
    cs: &mut CudaStorage,
    layout: &Layout,
) -> Option<Dev<T>> {
    let stream = cs.device.cuda_stream();
    let slice = cs.as_cuda_slice_mut::<S>().ok()?;
    let len = slice.len();
    let (addr, _sync) = slice.device_ptr_mut(&stream);
    let all = Dev::<T> {
        addr,
        len,
        _t: PhantomData,
    };
    all.at(layout.start_offset()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::randn;

    /// A communicator of one member (only one GPU is lent to the tests): its mean is each
    /// tensor itself, in new buffers, through NCCL's all-reduce on the GPU.
    #[test]
    fn nccl_mean_of_one_member_on_the_gpu() {
        let Some(dev) = crate::testing::gpu_device() else {
            return;
        };
        let nccl = crate::nccl::library()
            .unwrap()
            .expect("NCCL (libnccl.so.2 on LD_LIBRARY_PATH or LMKIT_NCCL)");
        let id = nccl.unique_id().unwrap();
        let comm = Comm::new(nccl, &dev, id, 0, 1).unwrap();
        let xs = [
            randn(0f32, 1.0, (3, 5), &dev).unwrap(),
            randn(0f32, 1.0, 1000, &dev).unwrap(),
        ];
        let means = comm.mean(&xs).unwrap();
        for (x, m) in xs.iter().zip(&means) {
            assert_eq!(x.shape(), m.shape());
            let (a, b) = (x.flatten_all().unwrap(), m.flatten_all().unwrap());
            assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        }
        let on_cpu = comm
            .mean(&[randn(0f32, 1.0, 2, &Device::Cpu).unwrap()])
            .err()
            .unwrap()
            .to_string();
        assert!(on_cpu.contains("contiguous f32 on the GPU"), "{on_cpu}");
    }

    /// An attribute of the GPU's current memory pool (a u64 one).
    fn pool_attribute(
        ctx: &cudarc::driver::CudaContext,
        attr: cudarc::driver::sys::CUmemPool_attribute,
    ) -> u64 {
        use cudarc::driver::sys;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut value = 0u64;
        // SAFETY: as in `keep_freed_memory`.
        unsafe {
            assert_eq!(
                sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()),
                sys::CUresult::CUDA_SUCCESS
            );
            let at = &mut value as *mut u64 as *mut _;
            assert_eq!(
                sys::cuMemPoolGetAttribute(pool, attr, at),
                sys::CUresult::CUDA_SUCCESS
            );
        }
        value
    }

    /// A device lmkit uses keeps freed memory in its pool across synchronisations, makes no
    /// events per allocation, and its products share one cuBLASLt handle.
    #[test]
    fn gpu_devices_keep_freed_memory_and_one_cublaslt_handle() {
        use cudarc::driver::sys::CUmemPool_attribute as Attr;
        let Some(dev) = crate::testing::gpu_device() else {
            return;
        };
        let Device::Cuda(cuda) = &dev else {
            return;
        };
        let gpu = Gpu::of(&dev).unwrap();
        assert!(!cuda.is_event_tracking());
        let ctx = cuda.cuda_stream().context().clone();
        assert_eq!(
            pool_attribute(&ctx, Attr::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD),
            u64::MAX
        );
        let len = 64 << 20;
        drop(gpu.uninit(len).unwrap());
        gpu.synchronize().unwrap();
        let reserved = pool_attribute(&ctx, Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT);
        assert!(reserved >= 4 * len as u64, "{reserved} bytes kept");

        // A handle's workspace tells it apart (cuBLASLt may give two handles one address).
        let workspace = |g: &Gpu| {
            g.with_lt(|lt, _| {
                let stream = g.hw.dev.cuda_stream();
                let (addr, _sync) = lt.workspace.device_ptr(&stream);
                Ok(addr)
            })
            .unwrap()
        };
        let first = workspace(&gpu);
        assert_eq!(workspace(&Gpu::of(&dev).unwrap()), first);
        // Another thread has its own (its work goes to its own stream).
        let other = std::thread::scope(|s| s.spawn(|| workspace(&Gpu::of(&dev).unwrap())).join());
        assert_ne!(other.unwrap(), first);
        let kept = LT.lock().unwrap();
        let on_this = |(id, _): &&((_, _), Lt)| id.0 == cuda.id();
        assert_eq!(kept.handles.iter().filter(on_this).count(), 2);
    }
}
