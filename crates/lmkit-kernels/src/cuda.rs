//! CUDA building blocks of the hand-written training passes: device buffers, cuBLAS products
//! with row-major operands, the kernels of `cuda/train.cu` and the flash-style attention of
//! `cuda/attention.cu` (TF32 operands, or bf16 with bf16 products) (compiled to PTX at build
//! time, loaded once per device).
//!
//! Everything runs on candle's stream for the device, so the pass's work is ordered with the
//! tensors candle creates around it. A [`Dev`] is a device address and a length; every entry
//! point checks that the elements it touches lie within its operands' lengths before it
//! launches, as the CPU product entry points do.
//!
//! With the `cuda-emu` feature (and not `cuda`), the same entry points run on an emulated GPU on
//! the CPU (`cuda/emulated.rs`): the kernels' CUDA source compiled for the host, so that the GPU
//! passes' tests run, and are held to the autograd graph, where there is no GPU.

use candle_core::Result;
use std::marker::PhantomData;

// The GPU itself (`device.rs`), or with only the `cuda-emu` feature its stand-in on the CPU for
// tests (`emulated.rs`): memory, products and launches; everything else here is shared.
#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
use device as hw;
#[cfg(feature = "cuda")]
pub use device::{
    autotune, layers_on, prepare_device, set_autotune, set_tf32_products, tf32_products, Comm, Elem,
};
#[cfg(not(feature = "cuda"))]
mod emulated;
#[cfg(not(feature = "cuda"))]
use emulated as hw;
#[cfg(not(feature = "cuda"))]
pub use emulated::{
    autotune, layers_on, set_autotune, set_emulated_layers, set_tf32_products, tf32_products, Elem,
};
mod decode;
mod gelu;
mod infer;
mod linear;
pub use decode::{cache_attention, CacheSlot};
#[doc(hidden)]
pub use gelu::{bias_grad_in_epilogue, set_bias_grad_in_epilogue, set_gelu_epilogues};
pub use infer::{linear, swiglu_rows};
pub use linear::{fused_epilogues, set_fused_epilogues, Added};

/// The modules of `cuda/train.cu` and `cuda/attention.cu`.
#[derive(Clone, Copy)]
enum Module {
    Train,
    Attention,
}

/// Rows of queries or keys a block of the attention kernels owns, and its threads
/// (attention.cu's ATT_ROWS, ATT_THREADS).
const ATT_ROWS: usize = 64;
const ATT_THREADS: u32 = 128;

/// Threads of a block of attention.cu's `decode_attention`, `cache_append` and
/// `extend_attention` (DEC_THREADS), and the new rows of a sequence an `extend_attention` block
/// takes (EXT_ROWS).
const DEC_THREADS: u32 = 128;
const EXT_ROWS: usize = 16;
/// The largest head size [`Gpu::decode_attention`] takes (attention.cu's DEC_MAX_HD).
pub const DECODE_MAX_HEAD: usize = 256;

/// One sequence of [`Gpu::decode_attention`] and [`Gpu::extend_attention`]: its KV cache's key
/// and value buffers, each `kv_heads` heads `head_stride` elements apart with rows of the head
/// size, holding `len` positions and room for the `new` ones the pass brings (one for
/// [`Gpu::decode_attention`]); f32, or bf16 (a model loaded in bf16).
#[derive(Clone, Copy, Debug)]
pub struct DecodeCache {
    pub k: Data,
    pub v: Data,
    pub len: usize,
    pub new: usize,
    pub head_stride: usize,
}

impl DecodeCache {
    /// The key and value addresses, checked to hold `kv_heads` heads of `len + new` rows of hd.
    fn need(&self, i: usize, kv_heads: usize, hd: usize) -> Result<(u64, u64)> {
        let end = self.len + self.new;
        if self.head_stride < end * hd {
            candle_core::bail!(
                "cuda decode attention: sequence {i}'s cache holds {} positions a head, {end} \
                 needed",
                self.head_stride / hd
            );
        }
        let reach = (kv_heads - 1) * self.head_stride + end * hd;
        Ok((
            self.k.need(reach, "decode attention keys")?,
            self.v.need(reach, "decode attention values")?,
        ))
    }
}

/// An input of [`Gpu::decode_attention`]: head h's row for sequence i (the head size's
/// elements) starts at h·head_stride + i·seq_stride.
#[derive(Clone, Copy, Debug)]
pub struct DecodeRows {
    pub data: Data,
    pub head_stride: usize,
    pub seq_stride: usize,
}

impl DecodeRows {
    /// The address, checked to hold `heads` heads of `n` rows of hd.
    fn need(self, (heads, n, hd): (usize, usize, usize), what: &str) -> Result<u64> {
        let reach = (heads - 1) * self.head_stride + (n - 1) * self.seq_stride + hd;
        self.data.need(reach, what)
    }
}

/// The address of an optional buffer, checked to hold `elements`, or 0: a null pointer, which
/// the kernel taking it skips.
fn need_opt<T>(d: Option<Dev<T>>, elements: usize, what: &str) -> Result<u64> {
    d.map_or(Ok(0), |d| d.need(elements, what))
}

/// Sizes of a causal attention: batch, tokens, query heads, key/value heads, head size.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub hd: usize,
}

impl AttnShape {
    /// Whether the flash kernels cover this shape on a GPU of compute capability `major`.x: head
    /// size 32, 64 or 128, whole groups of query heads per key/value head, tensor cores with
    /// TF32 (8.0 on).
    pub fn flash_fits(&self, major: i32) -> bool {
        major >= 8
            && matches!(self.hd, 32 | 64 | 128)
            && self.kv_heads > 0
            && self.heads.is_multiple_of(self.kv_heads)
            && self.t > 0
    }

    /// The floating-point operations of one [t, t]-by-hd product per query head over the causal
    /// half (b·heads·t²·hd: the count FlashAttention's papers use for causal attention).
    pub fn causal_products(&self) -> f64 {
        (self.b * self.heads) as f64 * (self.t * self.t) as f64 * self.hd as f64
    }
}

/// The flash kernels for a head size, precision and input type (attention.cu's ATT_KERNELS):
/// their names' prefix, keys per tile of the forward and dQ kernels, queries per tile of the
/// dK/dV kernel, the tiles' element size and row padding (attention.cu's Tf32 and Bf16), and the
/// buffers of each streamed tile (two for bf16 inputs: the next tile's copies in flight).
struct AttnPlan {
    prefix: &'static str,
    keys: usize,
    queries: usize,
    elem: usize,
    pad: usize,
    buffers: usize,
}

impl AttnPlan {
    /// `bf16`: bf16 products; `bf16_inputs`: q, k, v and dO in bf16 (bf16 products only).
    fn of(s: &AttnShape, bf16: bool, bf16_inputs: bool) -> Result<AttnPlan> {
        if !matches!(s.hd, 32 | 64 | 128) {
            candle_core::bail!("cuda attention: no kernel for head size {}", s.hd);
        }
        if bf16_inputs && !bf16 {
            candle_core::bail!("cuda attention: bf16 inputs need bf16 products");
        }
        let wide = s.hd == 128;
        Ok(if bf16 {
            AttnPlan {
                prefix: if bf16_inputs {
                    "flash_bf16in"
                } else {
                    "flash_bf16"
                },
                keys: 64,
                queries: if wide { 32 } else { 64 },
                elem: 2,
                pad: 8,
                buffers: if bf16_inputs { 2 } else { 1 },
            }
        } else {
            let tile = if wide { 32 } else { 64 };
            AttnPlan {
                prefix: "flash",
                keys: tile,
                queries: tile,
                elem: 4,
                pad: 4,
                buffers: 1,
            }
        })
    }

    /// Bytes of shared memory for tiles of `rows` rows in all.
    fn tiles(&self, rows: usize, hd: usize) -> usize {
        self.elem * rows * (hd + self.pad)
    }
}

/// A row-major [b·t, ld] operand of the attention kernels: head h's columns start at h·hd. The
/// inputs q, k, v and dO are all f32 or, with bf16 products, all bf16 (16-byte aligned rows:
/// `ld` a multiple of 8); o is of the inputs' type, the gradients f32.
#[derive(Clone, Copy, Debug)]
pub struct Rows {
    pub ptr: Data,
    pub ld: usize,
}

pub fn rows(ptr: impl Into<Data>, ld: usize) -> Rows {
    Rows {
        ptr: ptr.into(),
        ld,
    }
}

impl Rows {
    /// The address, checked to hold b·t rows of `heads` heads of size hd (and, for bf16, that
    /// every head's row starts 16 bytes aligned, as the kernels' cp.async copies need).
    fn need(self, s: &AttnShape, heads: usize, what: &str) -> Result<u64> {
        let cols = heads * s.hd;
        if self.ld < cols {
            candle_core::bail!("cuda {what}: rows of {} for {cols} columns", self.ld);
        }
        let addr = self.ptr.need((s.b * s.t - 1) * self.ld + cols, what)?;
        let aligned =
            addr.is_multiple_of(16) && self.ld.is_multiple_of(8) && s.hd.is_multiple_of(8);
        if self.ptr.is_bf16() && !aligned {
            candle_core::bail!(
                "cuda {what}: bf16 rows at {addr:#x} with {} elements between rows (16-byte \
                 alignment needed)",
                self.ld
            );
        }
        Ok(addr)
    }

    /// The address of the forward pass's output o ([b·t, heads·hd]): bf16 for bf16 inputs, else
    /// f32.
    fn need_as(self, bf16: bool, s: &AttnShape, what: &str) -> Result<u64> {
        if self.ptr.is_bf16() != bf16 {
            candle_core::bail!("cuda {what}: rows of the inputs' type (f32 or bf16) needed");
        }
        self.need(s, s.heads, what)
    }

    /// The address of f32 rows (an output).
    fn need_f32(self, s: &AttnShape, heads: usize, what: &str) -> Result<u64> {
        if self.ptr.is_bf16() {
            candle_core::bail!("cuda {what}: f32 rows needed");
        }
        self.need(s, heads, what)
    }
}

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

    /// The first `len` elements, if there are as many.
    fn first(self, len: usize) -> Option<Dev<T>> {
        (len <= self.len).then_some(Dev { len, ..self })
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
pub struct Buf<T: Elem> {
    store: hw::Store<T>,
    dev: Dev<T>,
}

impl<T: Elem> Buf<T> {
    pub fn dev(&self) -> Dev<T> {
        self.dev
    }
}

/// A bf16 number as its 16 bits: the element of the bf16 operands of products with
/// `train.dtype = "bf16"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Bf16 {
    /// `x` rounded to bf16 (to nearest, ties to even), as the kernels' `bf16_bits` does.
    pub fn from_f32(x: f32) -> Bf16 {
        Bf16(half::bf16::from_f32(x).to_bits())
    }

    pub fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.0) << 16)
    }
}

/// Elements of a product's operand or of a kernel's output: f32s, or bf16s.
#[derive(Clone, Copy, Debug)]
pub enum Data {
    F32(Dev<f32>),
    Bf16(Dev<Bf16>),
}

impl From<Dev<f32>> for Data {
    fn from(d: Dev<f32>) -> Data {
        Data::F32(d)
    }
}

impl From<Dev<Bf16>> for Data {
    fn from(d: Dev<Bf16>) -> Data {
        Data::Bf16(d)
    }
}

impl Data {
    /// The elements from `offset` on.
    pub fn at(self, offset: usize) -> Result<Data> {
        Ok(match self {
            Data::F32(d) => Data::F32(d.at(offset)?),
            Data::Bf16(d) => Data::Bf16(d.at(offset)?),
        })
    }

    pub fn is_bf16(self) -> bool {
        matches!(self, Data::Bf16(_))
    }

    fn need(self, elements: usize, what: &str) -> Result<u64> {
        match self {
            Data::F32(d) => d.need(elements, what),
            Data::Bf16(d) => d.need(elements, what),
        }
    }

    /// The address, checked to hold `elements`, the name of kernel `name` that writes elements
    /// of this type (`name`, or `name_bf16`), and their size in bytes.
    fn output(self, elements: usize, what: &str, name: &str) -> Result<(u64, String, usize)> {
        let addr = self.need(elements, what)?;
        Ok(match self {
            Data::F32(_) => (addr, name.to_string(), 4),
            Data::Bf16(_) => (addr, format!("{name}_bf16"), 2),
        })
    }
}

/// A buffer of f32s, or of bf16s: an activation kept only as a product's operand
/// ([`Gpu::operand_buf`]).
pub enum Stored {
    F32(Buf<f32>),
    Bf16(Buf<Bf16>),
}

impl Stored {
    pub fn data(&self) -> Data {
        match self {
            Stored::F32(b) => b.dev().into(),
            Stored::Bf16(b) => b.dev().into(),
        }
    }
}

/// f32 data as a product's operand ([`Gpu::operand`], [`Gpu::operand_stacked`]): the data
/// itself, or a copy (bf16, or stacked), which lives as long as this.
pub struct Operand {
    data: Data,
    _copy: Option<Stored>,
}

impl Operand {
    pub fn data(&self) -> Data {
        self.data
    }
}

impl From<Dev<f32>> for Operand {
    /// f32 data used as it is.
    fn from(x: Dev<f32>) -> Operand {
        Operand {
            data: x.into(),
            _copy: None,
        }
    }
}

/// A matrix operand of a row-major product: `ld` elements between rows as stored; `t`: the
/// operand is the transpose of what is stored. Both operands of a product are f32, or both bf16.
#[derive(Clone, Copy, Debug)]
pub struct Mat {
    pub ptr: Data,
    pub ld: usize,
    pub t: bool,
}

pub fn plain(ptr: impl Into<Data>, ld: usize) -> Mat {
    Mat {
        ptr: ptr.into(),
        ld,
        t: false,
    }
}

pub fn transposed(ptr: impl Into<Data>, ld: usize) -> Mat {
    Mat {
        ptr: ptr.into(),
        ld,
        t: true,
    }
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

/// The time the GPU spent on one kernel, or on products of one shape and precision, since the
/// last [`take_op_times`] (LMKIT_CUDA_TIMING=ops), the floating-point operations of that work
/// where they are counted (products, attention; 0 for other kernels), and the bytes it must at
/// least move to and from device memory (each element it reads or writes once; 0 where not
/// counted: attention, whose tiles are read many times).
#[derive(Clone, Debug)]
pub struct OpTime {
    pub name: String,
    pub calls: usize,
    pub secs: f64,
    pub flops: f64,
    pub bytes: f64,
}

impl OpTime {
    /// The rate of the work, in 10¹² floating-point operations a second (0 where not counted).
    pub fn tflops(&self) -> f64 {
        self.per_second(self.flops) / 1e12
    }

    /// The bytes moved, in 10⁹ a second (0 where not counted).
    pub fn gbps(&self) -> f64 {
        self.per_second(self.bytes) / 1e9
    }

    fn per_second(&self, x: f64) -> f64 {
        if self.secs > 0.0 {
            x / self.secs
        } else {
            0.0
        }
    }
}

/// What one launch or product does, for LMKIT_CUDA_TIMING=ops: floating-point operations and
/// bytes moved (see [`OpTime`]).
#[derive(Clone, Copy, Debug, Default)]
struct Work {
    flops: f64,
    bytes: f64,
}

impl Work {
    fn bytes(bytes: usize) -> Work {
        Work {
            flops: 0.0,
            bytes: bytes as f64,
        }
    }
}

/// The op times gathered so far: the totals of resolved entries, and the entries whose events
/// are not yet read (read at [`take_op_times`], or when there are [`PENDING_MAX`]).
#[derive(Default)]
struct OpTimes {
    totals: Vec<OpTime>,
    pending: Vec<(String, Work, hw::Mark, hw::Mark)>,
}

thread_local! {
    /// Each thread's op times: a thread's GPU work goes to its own stream, and a pass reports
    /// the work it launched, not another thread's.
    static OPS: std::cell::RefCell<OpTimes> = std::cell::RefCell::default();
}

/// Entries kept unread at most (two events each): then they are read, which waits for the GPU.
const PENDING_MAX: usize = 4096;

impl OpTimes {
    /// Reads the pending entries' events (waiting for the GPU to reach them) into the totals.
    fn resolve(&mut self) -> Result<()> {
        for (name, work, start, end) in std::mem::take(&mut self.pending) {
            let secs = end.secs_since(&start)?;
            match self.totals.iter_mut().find(|o| o.name == name) {
                Some(o) => {
                    o.calls += 1;
                    o.secs += secs;
                    o.flops += work.flops;
                    o.bytes += work.bytes;
                }
                None => self.totals.push(OpTime {
                    name,
                    calls: 1,
                    secs,
                    flops: work.flops,
                    bytes: work.bytes,
                }),
            }
        }
        Ok(())
    }
}

/// An on/off setting that an environment variable chooses the first time it is read, unless
/// a `set` came first (the GPU paths' switches: timing, epilogues, tuning).
struct Switch(std::sync::atomic::AtomicU8);

impl Switch {
    /// Not chosen yet.
    const fn new() -> Switch {
        Switch(std::sync::atomic::AtomicU8::new(0))
    }

    /// The setting: the last `set`, or where there was none, `from_env()` (kept from then on).
    fn get(&self, from_env: impl FnOnce() -> bool) -> bool {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            0 => {
                let on = from_env();
                self.set(on);
                on
            }
            v => v == 1,
        }
    }

    fn set(&self, on: bool) {
        let v = if on { 1 } else { 2 };
        self.0.store(v, std::sync::atomic::Ordering::Relaxed);
    }
}

/// LMKIT_CUDA_TIMING=ops, or [`set_op_timing`].
static OP_TIMING: Switch = Switch::new();

/// Whether every launch and product is timed: LMKIT_CUDA_TIMING=ops, or [`set_op_timing`]. Each
/// is then preceded and followed by an event on its stream (no synchronisation), and its entry
/// is the GPU's time between them: the work's own time, and any wait for the host to launch it
/// where the GPU had nothing else queued.
pub fn op_timing() -> bool {
    OP_TIMING.get(|| std::env::var("LMKIT_CUDA_TIMING").is_ok_and(|v| v == "ops"))
}

/// Times every launch and product from now on (`true`), or none.
pub fn set_op_timing(on: bool) {
    OP_TIMING.set(on);
}

/// The op times this thread gathered since the last call, the longest first (waiting for the
/// GPU to finish the work timed); the gathering starts again.
pub fn take_op_times() -> Result<Vec<OpTime>> {
    OPS.with_borrow_mut(|ops| {
        let resolved = ops.resolve();
        let mut totals = std::mem::take(&mut ops.totals);
        resolved?;
        totals.sort_by(|a, b| b.secs.total_cmp(&a.secs));
        Ok(totals)
    })
}

/// One parameter's operands of [`Gpu::adam`] (each as long as the gradient) and its
/// 1 − lr·weight decay.
#[derive(Clone, Copy, Debug)]
pub struct AdamParam {
    pub theta: Dev<f32>,
    pub g: Dev<f32>,
    pub m: Dev<f32>,
    pub v: Dev<f32>,
    pub keep: f32,
}

/// The coefficients of one AdamW step (1/bias corrections, the gradient's clipping factor).
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub beta1: f32,
    pub beta2: f32,
    pub scale: f32,
    pub lr: f32,
    pub ibc1: f32,
    pub ibc2: f32,
    pub eps: f32,
}

/// Elements per block of the optimizer kernels.
const OPT_CHUNK: usize = 1 << 16;

/// One CUDA device's stream, cuBLAS handle and kernels (with the `cuda-emu` feature instead of
/// `cuda`: their stand-in on the CPU, see `cuda/emulated.rs`).
pub struct Gpu {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    hw: hw::Hw,
    /// f32 products on the tensor cores (TF32 inputs, f32 accumulation).
    pub tf32: bool,
    /// Products on the bf16 tensor cores (f32 accumulation); before `tf32`. The passes then keep
    /// their products' operands in bf16 ([`Gpu::operand`], [`Gpu::operand_buf`]); f32 operands
    /// are rounded to bf16 by cuBLAS. From [`set_bf16_products`].
    pub bf16: bool,
    /// Query rows per block of the flash forward and dQ kernels, and keys per block of the dK/dV
    /// kernel with bf16 products: 64 (16 a warp) or 128 (32 a warp: every fragment of the other
    /// operand read from shared memory serves two blocks of 16; head sizes 32 and 64, else 64).
    /// From [`flash_block_rows`].
    pub flash_rows: usize,
}

/// The flash kernels' rows (or keys) per block ([`Gpu::flash_rows`]) for the [`Gpu`]s made
/// from now on: `LMKIT_CUDA_FLASH_ROWS` (64 or 128), 64 when it is not set or names neither
/// (with a warning; read once).
pub fn flash_block_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        let v = std::env::var("LMKIT_CUDA_FLASH_ROWS").unwrap_or_default();
        flash_rows_setting(&v).unwrap_or_else(|| {
            eprintln!("warning: LMKIT_CUDA_FLASH_ROWS={v:?} is not 64 or 128: 64 is used");
            ATT_ROWS
        })
    })
}

/// The rows an `LMKIT_CUDA_FLASH_ROWS` value names (empty: the default, 64).
fn flash_rows_setting(value: &str) -> Option<usize> {
    match value.trim() {
        "" | "64" => Some(ATT_ROWS),
        "128" => Some(128),
        _ => None,
    }
}

static BF16_PRODUCTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the [`Gpu`]s made from now on run their f32 products on the bf16 tensor cores
/// (`train.dtype = "bf16"`).
pub fn set_bf16_products(on: bool) {
    BF16_PRODUCTS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// A product's two operands as the backends take them, checked by the caller: (address, leading
/// dimension, transposed) each, and whether both are bf16.
type Operands = ((u64, usize, bool), (u64, usize, bool), bool);

/// How a product computes: bf16 operands as they are, or f32 operands exactly, rounded to TF32,
/// or rounded to bf16 (f32 accumulation throughout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Precision {
    Bf16,
    F32,
    Tf32,
    F32AsBf16,
}

impl Precision {
    /// The name the op timing gives it.
    fn name(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::F32AsBf16 => "bf16 (f32 operands)",
        }
    }
}

impl Gpu {
    /// The precision of a product with these operands on this GPU ([`Gpu::bf16`] before
    /// [`Gpu::tf32`] for f32 operands).
    fn precision(&self, bf16_operands: bool) -> Precision {
        if bf16_operands {
            Precision::Bf16
        } else if self.bf16 {
            Precision::F32AsBf16
        } else if self.tf32 {
            Precision::Tf32
        } else {
            Precision::F32
        }
    }
}

const THREADS: u32 = 256;

/// The rotary kernels' arguments after the data's: the table, n, ld, t, heads, hd and the
/// rotation's sign, after checking the shape (`heads` heads of `hd`, even, within rows of
/// `ld`; positions below `t` in the table).
fn rope_args(
    table: Dev<f32>,
    ld: usize,
    (n, t): (usize, usize),
    (heads, hd): (usize, usize),
    inverse: bool,
) -> Result<[Arg; 7]> {
    if heads * hd > ld || !hd.is_multiple_of(2) {
        candle_core::bail!("cuda rope: {heads} heads of {hd} in rows of {ld}");
    }
    Ok([
        Arg::P(table.need(t.min(n) * hd, "rope table")?),
        Arg::I(int(n)?),
        Arg::I(int(ld)?),
        Arg::I(int(t)?),
        Arg::I(int(heads)?),
        Arg::I(int(hd)?),
        Arg::F(if inverse { -1.0 } else { 1.0 }),
    ])
}

/// The elements `rows` rows of `cols`, `ld` apart, span (an error naming `what` for `ld` <
/// `cols`).
fn strided(rows: usize, cols: usize, ld: usize, what: &str) -> Result<usize> {
    if ld < cols {
        candle_core::bail!("cuda {what}: rows of {cols} cannot be {ld} apart");
    }
    Ok(if rows == 0 { 0 } else { (rows - 1) * ld + cols })
}

fn blocks(n: usize, per_block: usize) -> u32 {
    n.div_ceil(per_block).max(1) as u32
}

/// Whether the operands are all bf16 (`true`) or all f32 (`false`); an error naming `what` when
/// they mix.
fn same_type<const N: usize>(operands: [Data; N], what: &str) -> Result<bool> {
    let bf16 = operands[0].is_bf16();
    if operands.iter().any(|d| d.is_bf16() != bf16) {
        candle_core::bail!("cuda {what}: all f32 or all bf16");
    }
    Ok(bf16)
}

impl Gpu {
    /// The f32 data of a contiguous tensor on this GPU (with the emulation: a CPU tensor; read
    /// only, the passes write their own buffers; the storage must stay borrowed while the
    /// address is used), or `None` for another device, dtype or a strided view.
    pub fn view(storage: &candle_core::Storage, layout: &candle_core::Layout) -> Option<Dev<f32>> {
        match Self::view_data(storage, layout)? {
            Data::F32(d) => Some(d),
            Data::Bf16(_) => None,
        }
    }

    /// A storage's f32 or bf16 elements from the layout's start ([`Gpu::region`],
    /// [`Gpu::region_bf16`]).
    pub(super) fn region_data(
        storage: &candle_core::Storage,
        layout: &candle_core::Layout,
    ) -> Option<Data> {
        match Self::region(storage, layout) {
            Some(d) => Some(Data::F32(d)),
            None => Self::region_bf16(storage, layout).map(Data::Bf16),
        }
    }

    /// [`Gpu::region_data`] of a storage held mutably, for a kernel that writes it
    /// ([`Gpu::region_mut`], [`Gpu::region_mut_bf16`]).
    pub(super) fn region_mut_data(
        storage: &mut hw::DeviceStorage,
        layout: &candle_core::Layout,
    ) -> Option<Data> {
        match Self::region_mut(storage, layout) {
            Some(d) => Some(Data::F32(d)),
            None => Self::region_mut_bf16(storage, layout).map(Data::Bf16),
        }
    }

    /// [`Gpu::view`] of f32 or bf16 elements.
    pub(super) fn view_data(
        storage: &candle_core::Storage,
        layout: &candle_core::Layout,
    ) -> Option<Data> {
        let (start, end) = layout.contiguous_offsets()?;
        match Self::region_data(storage, layout)? {
            Data::F32(d) => d.first(end - start).map(Data::F32),
            Data::Bf16(d) => d.first(end - start).map(Data::Bf16),
        }
    }

    pub fn upload_u32(&self, data: &[u32]) -> Result<Buf<u32>> {
        self.upload(data)
    }

    /// Row-major `c = alpha·a·b + beta·c` with a: [rows, k], b: [k, cols], c: [rows, cols] (row
    /// stride `ldc`), `batch.count` times; a and b both f32 or both bf16, c f32.
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
        let bf16_operands = a.ptr.is_bf16();
        if b.ptr.is_bf16() != bf16_operands {
            candle_core::bail!("cuda mm: one operand in bf16 and the other in f32");
        }
        let pa = a.ptr.need(span(a, rows, k, batch.a), "mm a")?;
        let pb = b.ptr.need(span(b, k, cols, batch.b), "mm b")?;
        let pc = c.0.need(
            (batch.count - 1) * batch.c + (rows - 1) * c.1 + cols,
            "mm c",
        )?;
        let elem = if bf16_operands { 2 } else { 4 };
        let c_bytes = 4 * rows * cols * if beta == 0.0 { 1 } else { 2 };
        let work = Work {
            flops: 2.0 * (rows * cols * k * batch.count) as f64,
            bytes: (batch.count * (elem * k * (rows + cols) + c_bytes)) as f64,
        };
        let name = || {
            let precision = self.precision(bf16_operands).name();
            let times = if batch.count > 1 {
                format!(" x{}", batch.count)
            } else {
                String::new()
            };
            (
                format!("product {rows}x{cols}x{k}{times} {precision}"),
                work,
            )
        };
        self.timed(name, || {
            self.gemm(
                (rows, cols, k),
                ((pa, a.ld, a.t), (pb, b.ld, b.t), bf16_operands),
                (pc, c.1),
                (alpha, beta),
                batch,
            )
        })
    }

    /// Runs `f` (one launch or product): with LMKIT_CUDA_TIMING=ops, timed between two events on
    /// the GPU's stream and added to [`take_op_times`]'s entry of the name `what()` gives, with
    /// the work it gives.
    fn timed(
        &self,
        what: impl FnOnce() -> (String, Work),
        f: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        if !op_timing() {
            return f();
        }
        let start = self.mark()?;
        f()?;
        let end = self.mark()?;
        let (name, work) = what();
        OPS.with_borrow_mut(|ops| {
            ops.pending.push((name, work, start, end));
            if ops.pending.len() >= PENDING_MAX {
                ops.resolve()?;
            }
            Ok(())
        })
    }

    /// Launches kernel `name` of `module` on (x, y) blocks of `block` threads with `shared` bytes
    /// of dynamic shared memory (timed with LMKIT_CUDA_TIMING=ops, as `work`).
    fn launch_in(
        &self,
        module: Module,
        name: &str,
        (grid, block, shared): ((usize, usize), u32, usize),
        args: &[Arg],
        work: Work,
    ) -> Result<()> {
        self.timed(
            || (name.to_string(), work),
            || self.launch_kernel(module, name, grid, block, shared, args),
        )
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

    /// Launches `name` of train.cu with the given arguments (already checked by the caller),
    /// which moves at least `bytes` to and from device memory.
    fn launch(
        &self,
        name: &str,
        (grid, block): (u32, u32),
        args: &[Arg],
        bytes: usize,
    ) -> Result<()> {
        let launch = ((grid as usize, 1), block, 0);
        self.launch_in(Module::Train, name, launch, args, Work::bytes(bytes))
    }

    /// Causal attention without the [t, t] probabilities: o = softmax(scale·q·kᵀ)·v per head,
    /// and each row's log-sum-exp of its scaled scores in `lse` ([b, heads, t]) for
    /// [`Gpu::flash_attention_bwd`]. TF32 products, or with [`Gpu::bf16`] bf16 operands (q, k,
    /// v and the probabilities rounded to bf16, f32 accumulation and softmax; q, k and v may be
    /// bf16 already, and are then copied into the tiles asynchronously, the next tile's copies
    /// in flight while one is used, and o is written in bf16, rounded once); the shape must
    /// satisfy [`AttnShape::flash_fits`].
    pub fn flash_attention(
        &self,
        s: AttnShape,
        (q, k, v): (Rows, Rows, Rows),
        o: Rows,
        lse: Dev<f32>,
        scale: f32,
    ) -> Result<()> {
        let bf16_inputs = same_type([q.ptr, k.ptr, v.ptr], "attention q, k, v")?;
        let plan = AttnPlan::of(&s, self.bf16, bf16_inputs)?;
        let args = [
            Arg::P(q.need(&s, s.heads, "attention q")?),
            Arg::P(k.need(&s, s.kv_heads, "attention k")?),
            Arg::P(v.need(&s, s.kv_heads, "attention v")?),
            Arg::P(o.need_as(bf16_inputs, &s, "attention o")?),
            Arg::P(lse.need(s.b * s.heads * s.t, "attention lse")?),
            Arg::I(int(s.t)?),
            Arg::I(int(s.heads)?),
            Arg::I(int(s.kv_heads)?),
            Arg::I(int(q.ld)?),
            Arg::I(int(k.ld)?),
            Arg::I(int(v.ld)?),
            Arg::I(int(o.ld)?),
            Arg::F(scale),
        ];
        // 64 rows a block (`_fwd_`), or 128 (`_fwd2_`: two row blocks a warp; head sizes up
        // to 64, where its accumulators stay in registers).
        let (rows, kind) = match self.flash_rows {
            128 if s.hd <= 64 => (128, "fwd2"),
            _ => (ATT_ROWS, "fwd"),
        };
        let grid = (s.t.div_ceil(rows), s.b * s.heads);
        // The block's query rows, and a tile of keys and one of values (per buffer).
        let shared = plan.tiles(rows + 2 * plan.buffers * plan.keys, s.hd);
        let name = format!("{}_{kind}_{}", plan.prefix, s.hd);
        let work = Work {
            flops: 2.0 * s.causal_products(),
            bytes: 0.0,
        };
        let launch = (grid, ATT_THREADS, shared);
        self.launch_in(Module::Attention, &name, launch, &args, work)
    }

    /// A decoding step's attention for n sequences that each continue their own KV cache:
    /// out = softmax(scale·q·kᵀ)·v per sequence and query head over the cache's `len` positions
    /// and the sequence's new key and value, which are written into the cache at position `len`.
    /// q has `heads` heads, k_new and v_new `kv_heads` (grouped-query heads: query head h reads
    /// key/value head h / (heads / kv_heads)), rows of hd (at most 256); out [n, heads, hd].
    /// With `rope` ((table [positions, rotated]: each position's cos values, then its sin
    /// values), rotated), q's and the new key's first `rotated` columns are rotated at the
    /// sequence's position `len` first. Few sequences over long caches split their keys over
    /// several blocks ([`decode_splits`]), merged by a second launch.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention(
        &self,
        out: Data,
        (q, k_new, v_new): (DecodeRows, DecodeRows, DecodeRows),
        caches: &[DecodeCache],
        rope: Option<(Dev<f32>, usize)>,
        (heads, kv_heads, hd): (usize, usize, usize),
        scale: f32,
    ) -> Result<()> {
        let n = caches.len();
        let (rotated, rope) =
            cached_attention_checks(out, (q, k_new, v_new), caches, rope, (heads, kv_heads, hd))?;
        let size = if out.is_bf16() { 2 } else { 4 };
        let suffix = if out.is_bf16() { "_bf16" } else { "" };
        let mut table = Vec::with_capacity(4 * n);
        let mut positions = 0;
        for (i, c) in caches.iter().enumerate() {
            if c.new != 1 {
                candle_core::bail!("cuda decode attention: sequence {i} brings {} rows", c.new);
            }
            let (k, v) = c.need(i, kv_heads, hd)?;
            table.extend([k, v, c.len as u64, c.head_stride as u64]);
            positions += c.len + 1;
        }
        let table = self.upload(&table)?;
        let longest = caches.iter().map(|c| c.len + 1).max().unwrap_or(1);
        let splits = decode_splits(n * heads, longest);
        let partial = match splits {
            1 => None,
            _ => Some(self.uninit(n * heads * splits * (2 + hd))?),
        };
        let out = out.need(n * heads * hd, "decode attention out")?;
        let args = [
            Arg::P(out),
            Arg::P(partial.as_ref().map_or(0, |p| p.dev().addr)),
            Arg::P(q.need((heads, n, hd), "decode attention q")?),
            Arg::P(k_new.need((kv_heads, n, hd), "decode attention k_new")?),
            Arg::P(v_new.need((kv_heads, n, hd), "decode attention v_new")?),
            Arg::P(table.dev().addr),
            Arg::P(rope),
            Arg::I(int(n)?),
            Arg::I(int(splits)?),
            Arg::I(int(heads)?),
            Arg::I(int(kv_heads)?),
            Arg::I(int(hd)?),
            Arg::I(int(rotated)?),
            Arg::I(int(q.head_stride)?),
            Arg::I(int(q.seq_stride)?),
            Arg::I(int(k_new.head_stride)?),
            Arg::I(int(k_new.seq_stride)?),
            Arg::I(int(v_new.head_stride)?),
            Arg::I(int(v_new.seq_stride)?),
            Arg::F(scale),
        ];
        // Every query head reads its group's keys and values (from cache, once per group where
        // the cache holds them).
        let work = Work {
            flops: (4 * heads * hd * positions) as f64,
            bytes: (2 * size * kv_heads * hd * positions) as f64,
        };
        let launch = ((n * splits, heads), DEC_THREADS, 0);
        let name = format!("decode_attention{suffix}");
        self.launch_in(Module::Attention, &name, launch, &args, work)?;
        let Some(partial) = partial else {
            return Ok(());
        };
        let merge = [
            Arg::P(out),
            Arg::P(partial.dev().addr),
            Arg::I(int(n)?),
            Arg::I(int(splits)?),
            Arg::I(int(heads)?),
            Arg::I(int(hd)?),
        ];
        let work = Work::bytes(4 * n * heads * splits * (2 + hd) + size * n * heads * hd);
        let launch = ((n, heads), DEC_THREADS, 0);
        let name = format!("decode_combine{suffix}");
        self.launch_in(Module::Attention, &name, launch, &merge, work)
    }

    /// The attention of n new rows of sequences that each continue their own KV cache by
    /// `new` rows (prompt pieces, decoding steps among them): every new key and value written
    /// into its cache at positions `len`, `len + 1`, ... (one launch), then each new row's
    /// queries attend to its cache's positions up to its own (another launch, a block per tile
    /// of up to 16 rows of a sequence and query head). The rows are the sequences' in order
    /// (the inputs' sequence axis: caches[0]'s `new` rows first); heads, rotation and out as
    /// for [`Gpu::decode_attention`].
    #[allow(clippy::too_many_arguments)]
    pub fn extend_attention(
        &self,
        out: Data,
        (q, k_new, v_new): (DecodeRows, DecodeRows, DecodeRows),
        caches: &[DecodeCache],
        rope: Option<(Dev<f32>, usize)>,
        (heads, kv_heads, hd): (usize, usize, usize),
        scale: f32,
    ) -> Result<()> {
        let (rotated, rope) =
            cached_attention_checks(out, (q, k_new, v_new), caches, rope, (heads, kv_heads, hd))?;
        let size = if out.is_bf16() { 2 } else { 4 };
        let suffix = if out.is_bf16() { "_bf16" } else { "" };
        let n: usize = caches.iter().map(|c| c.new).sum();
        let mut tiles = Vec::new();
        let (mut row, mut work) = (0, Work::default());
        for (i, c) in caches.iter().enumerate() {
            if c.new == 0 {
                candle_core::bail!("cuda extend attention: sequence {i} brings no rows");
            }
            let (k, v) = c.need(i, kv_heads, hd)?;
            for r0 in (0..c.new).step_by(EXT_ROWS) {
                let rows = EXT_ROWS.min(c.new - r0);
                tiles.extend([k, v, (c.len + r0) as u64, rows as u64, (row + r0) as u64]);
                tiles.push(c.head_stride as u64);
                // Every query head reads the keys and values up to the tile's last row.
                let keys = c.len + r0 + rows;
                work.flops += (4 * heads * hd * rows * keys) as f64;
                work.bytes += (2 * size * heads * hd * keys) as f64;
            }
            row += c.new;
        }
        let n_tiles = tiles.len() / 6;
        let tiles = self.upload(&tiles)?;
        let append = [
            Arg::P(k_new.need((kv_heads, n, hd), "extend attention k_new")?),
            Arg::P(v_new.need((kv_heads, n, hd), "extend attention v_new")?),
            Arg::P(tiles.dev().addr),
            Arg::P(rope),
            Arg::I(int(n_tiles)?),
            Arg::I(int(kv_heads)?),
            Arg::I(int(hd)?),
            Arg::I(int(rotated)?),
            Arg::I(int(k_new.head_stride)?),
            Arg::I(int(k_new.seq_stride)?),
            Arg::I(int(v_new.head_stride)?),
            Arg::I(int(v_new.seq_stride)?),
        ];
        let copy = Work::bytes(4 * size * kv_heads * hd * n);
        let launch = ((n_tiles, kv_heads), DEC_THREADS, 0);
        let name = format!("cache_append{suffix}");
        self.launch_in(Module::Attention, &name, launch, &append, copy)?;
        let attend = [
            Arg::P(out.need(n * heads * hd, "extend attention out")?),
            Arg::P(q.need((heads, n, hd), "extend attention q")?),
            Arg::P(tiles.dev().addr),
            Arg::P(rope),
            Arg::I(int(n_tiles)?),
            Arg::I(int(heads)?),
            Arg::I(int(kv_heads)?),
            Arg::I(int(hd)?),
            Arg::I(int(rotated)?),
            Arg::I(int(q.head_stride)?),
            Arg::I(int(q.seq_stride)?),
            Arg::F(scale),
        ];
        let launch = ((n_tiles, heads), DEC_THREADS, 0);
        let name = format!("extend_attention{suffix}");
        self.launch_in(Module::Attention, &name, launch, &attend, work)
    }

    /// The gradients of [`Gpu::flash_attention`] from dout: dq, dk, dv written (not added);
    /// `dvec` is scratch [b, heads, t]. `o` and `lse` are the forward pass's; q, k, v and dout
    /// all f32, or all bf16 (with bf16 products).
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention_bwd(
        &self,
        s: AttnShape,
        (q, k, v): (Rows, Rows, Rows),
        (o, lse): (Rows, Dev<f32>),
        dout: Rows,
        (dq, dk, dv): (Rows, Rows, Rows),
        dvec: Dev<f32>,
        scale: f32,
    ) -> Result<()> {
        let bf16_inputs = same_type([q.ptr, k.ptr, v.ptr, dout.ptr], "attention q, k, v, dout")?;
        let plan = AttnPlan::of(&s, self.bf16, bf16_inputs)?;
        let n = s.b * s.t;
        let stats = s.b * s.heads * s.t;
        let dvec = dvec.need(stats, "attention row dots")?;
        let dout_p = dout.need(&s, s.heads, "attention dout")?;
        let dots = [
            Arg::P(dvec),
            Arg::P(dout_p),
            Arg::P(o.need_as(bf16_inputs, &s, "attention o")?),
            Arg::I(int(n)?),
            Arg::I(int(s.t)?),
            Arg::I(int(s.heads)?),
            Arg::I(int(s.hd)?),
            Arg::I(int(dout.ld)?),
            Arg::I(int(o.ld)?),
        ];
        let grid = (blocks(n * s.heads, THREADS as usize / 32) as usize, 1);
        let launch = (grid, THREADS, 0);
        let name = if bf16_inputs {
            "attn_row_dots_h16"
        } else {
            "attn_row_dots"
        };
        // dO and o read once.
        let elem = if bf16_inputs { 2 } else { 4 };
        let work = Work::bytes(2 * elem * n * s.heads * s.hd + 4 * stats);
        self.launch_in(Module::Attention, name, launch, &dots, work)?;
        let inputs = [
            Arg::P(q.need(&s, s.heads, "attention q")?),
            Arg::P(k.need(&s, s.kv_heads, "attention k")?),
            Arg::P(v.need(&s, s.kv_heads, "attention v")?),
            Arg::P(dout_p),
            Arg::P(lse.need(stats, "attention lse")?),
            Arg::P(dvec),
        ];
        let sizes = [
            Arg::I(int(s.t)?),
            Arg::I(int(s.heads)?),
            Arg::I(int(s.kv_heads)?),
            Arg::I(int(q.ld)?),
            Arg::I(int(k.ld)?),
            Arg::I(int(v.ld)?),
            Arg::I(int(dout.ld)?),
        ];
        // Shared memory: the block's rows of two operands (q and dO, or k and v) and a tile of
        // each of the other two (per buffer); the dK/dV kernel also holds the query tile's
        // log-sum-exps and row dots (per buffer).
        let streamed = 2 * plan.buffers;
        // 64 rows a block, or 128 (`_dq2_`: two row blocks a warp, tiles of 32 keys).
        let (dq_rows, dq_keys, dq_kind) = match self.flash_rows {
            128 if s.hd <= 64 => (128, 32, "dq2"),
            _ => (ATT_ROWS, plan.keys, "dq"),
        };
        let dq_shared = plan.tiles(2 * dq_rows + streamed * dq_keys, s.hd);
        // 64 keys a block, or 128 with bf16 products (`_dkdv2_`: two key blocks a warp, tiles of
        // 32 queries).
        let (dkdv_keys, dkdv_queries, dkdv_kind) = match self.flash_rows {
            128 if s.hd <= 64 && self.bf16 => (128, 32, "dkdv2"),
            _ => (ATT_ROWS, plan.queries, "dkdv"),
        };
        let dkdv_shared =
            plan.tiles(2 * dkdv_keys + streamed * dkdv_queries, s.hd) + 4 * streamed * dkdv_queries;
        let tiles = s.t.div_ceil(dkdv_keys);
        let mut args = inputs.to_vec();
        args.push(Arg::P(dq.need_f32(&s, s.heads, "attention dq")?));
        args.extend(sizes);
        args.extend([Arg::I(int(dq.ld)?), Arg::F(scale)]);
        let name = format!("{}_bwd_{dq_kind}_{}", plan.prefix, s.hd);
        // Scores, dP and dQ: three products over the causal half.
        let launch = (
            (s.t.div_ceil(dq_rows), s.b * s.heads),
            ATT_THREADS,
            dq_shared,
        );
        let work = Work {
            flops: 3.0 * s.causal_products(),
            bytes: 0.0,
        };
        self.launch_in(Module::Attention, &name, launch, &args, work)?;
        let mut args = inputs.to_vec();
        args.push(Arg::P(dk.need_f32(&s, s.kv_heads, "attention dk")?));
        args.push(Arg::P(dv.need_f32(&s, s.kv_heads, "attention dv")?));
        args.extend(sizes);
        args.extend([Arg::I(int(dk.ld)?), Arg::I(int(dv.ld)?), Arg::F(scale)]);
        let name = format!("{}_bwd_{dkdv_kind}_{}", plan.prefix, s.hd);
        // Scores, dP, dV and dK: four products over the causal half.
        let launch = ((tiles, s.b * s.kv_heads), ATT_THREADS, dkdv_shared);
        let work = Work {
            flops: 4.0 * s.causal_products(),
            bytes: 0.0,
        };
        self.launch_in(Module::Attention, &name, launch, &args, work)
    }

    /// The flash kernels ([`Gpu::flash_attention`] and its backward pass, in this Gpu's precision)
    /// on a random problem of shape `s` (standard-normal-like inputs from a fixed generator)
    /// against [`crate::causal::attention_f64`]: the largest error of the output, log-sum-exps and
    /// gradients, relative to the larger of 1 and the largest reference value. A pass runs it
    /// once per GPU, head size and precision ([`Gpu::flash_check_shape`]) before it trusts the
    /// kernels with a model.
    pub fn flash_check(&self, s: AttnShape) -> Result<f64> {
        self.flash_check_inputs(s, self.bf16)
    }

    /// [`Gpu::flash_check`] with q, k, v and dO given to the kernels in bf16 (`bf16_inputs`, bf16
    /// products only: the kernels the passes use with bf16 products) or f32.
    fn flash_check_inputs(&self, s: AttnShape, bf16_inputs: bool) -> Result<f64> {
        let hd = s.hd;
        let (n, c, ckv) = (s.b * s.t, s.heads * hd, s.kv_heads * hd);
        // Standard normal inputs from a fixed generator (the same problem every run).
        use lmkit_core::rng::{Random, SplitMix64};
        let mut rng = SplitMix64::new(0x9e37_79b9_7f4a_7c15 ^ (s.t * 131 + hd) as u64);
        let mut draw = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal() as f32).collect() };
        let host = [draw(n * c), draw(n * ckv), draw(n * ckv), draw(n * c)];
        let [q, k, v, g] = [&host[0], &host[1], &host[2], &host[3]].map(|x| self.upload(x));
        let (q, k, v, g) = (q?, k?, v?, g?);
        let [q, k, v, g] = [&q, &k, &v, &g].map(|x| {
            if bf16_inputs {
                self.operand(x.dev())
            } else {
                Ok(Operand::from(x.dev()))
            }
        });
        let (q, k, v, g) = (q?, k?, v?, g?);
        let scale = 1.0 / (hd as f32).sqrt();
        // The output of the inputs' type.
        let o = self.stored(bf16_inputs, n * c)?;
        let lse = self.uninit(s.b * s.heads * s.t)?;
        let qkv = (rows(q.data(), c), rows(k.data(), ckv), rows(v.data(), ckv));
        self.flash_attention(s, qkv, rows(o.data(), c), lse.dev(), scale)?;
        let [dq, dk, dv, dots] =
            [n * c, n * ckv, n * ckv, s.b * s.heads * s.t].map(|len| self.uninit(len));
        let (dq, dk, dv, dots) = (dq?, dk?, dv?, dots?);
        let grads = (rows(dq.dev(), c), rows(dk.dev(), ckv), rows(dv.dev(), ckv));
        let kept = (rows(o.data(), c), lse.dev());
        self.flash_attention_bwd(s, qkv, kept, rows(g.data(), c), grads, dots.dev(), scale)?;
        let inputs = [&host[0][..], &host[1], &host[2], &host[3]];
        let dims = (s.b, s.t, s.heads, s.kv_heads, hd);
        let want = crate::causal::attention_f64(dims, inputs, scale as f64);
        let got = [
            self.values(&o, n * c)?,
            self.download(&lse, s.b * s.heads * s.t)?,
            self.download(&dq, n * c)?,
            self.download(&dk, n * ckv)?,
            self.download(&dv, n * ckv)?,
        ];
        let mut worst = 0.0f64;
        for (got, want) in got.into_iter().zip(&want) {
            let top = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            let err = got
                .iter()
                .zip(want)
                .fold(0.0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
            // NaN errors count as the worst.
            worst = if err.is_nan() {
                f64::INFINITY
            } else {
                worst.max(err / top)
            };
        }
        Ok(worst)
    }

    /// The largest [`Gpu::flash_check`] error the kernels may show in this Gpu's precision: TF32
    /// tiles give a few 1e-4 of the largest value, bf16 operands a few 1e-3.
    pub fn flash_tolerance(&self) -> f64 {
        if self.bf16 {
            1.5e-2
        } else {
            3e-3
        }
    }

    /// The shape of the run-time check for head size `hd`: 77 tokens (a full tile and a partial
    /// one), two query heads sharing one key/value head.
    pub fn flash_check_shape(hd: usize) -> AttnShape {
        AttnShape {
            b: 1,
            t: 77,
            heads: 2,
            kv_heads: 1,
            hd,
        }
    }

    /// Launches an elementwise kernel: a thread per element of `len` (`bytes` moved).
    fn launch_elements(&self, name: &str, len: usize, args: &[Arg], bytes: usize) -> Result<()> {
        self.launch(name, (blocks(len, THREADS as usize), THREADS), args, bytes)
    }

    /// Launches a kernel over `rows` rows of `cols` (`bytes` moved): blocks of columns, each
    /// going down the rows of its group (grid y; at most 65,535 groups); none for no elements.
    fn launch_columns(
        &self,
        name: &str,
        (rows, cols): (usize, usize),
        args: &[Arg],
        bytes: usize,
    ) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let grid = (cols.div_ceil(THREADS as usize), rows.min(65_535));
        self.launch_in(
            Module::Train,
            name,
            (grid, THREADS, 0),
            args,
            Work::bytes(bytes),
        )
    }

    /// Launches a row kernel: a warp per row of `rows` (`bytes` moved).
    fn launch_rows(&self, name: &str, rows: usize, args: &[Arg], bytes: usize) -> Result<()> {
        self.launch(
            name,
            (blocks(rows, THREADS as usize / 32), THREADS),
            args,
            bytes,
        )
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
        self.launch_elements("embed_fwd", n * c, &args, 12 * n * c)
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
        self.scatter_add_rows(dwte, dx, ids, (n, c), vocab)?;
        let args = [
            Arg::P(dwpe.need(t * c, "embed_bwd dwpe")?),
            Arg::P(dx.need(n * c, "embed_bwd dx")?),
            Arg::I(int(b)?),
            Arg::I(int(t)?),
            Arg::I(int(c)?),
        ];
        self.launch_elements("embed_bwd_positions", t * c, &args, 4 * (b + 1) * t * c)
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
            Arg::P(need_opt(x, n * c, "add_rows x")?),
            Arg::P(bias.need(c, "add_rows bias")?),
            Arg::I(int(n)?),
            Arg::I(int(c)?),
        ];
        let read = if x.is_some() { 4 * n * c } else { 0 };
        self.launch_elements("add_rows", n * c, &args, 4 * n * c + read + 4 * c)
    }

    /// LayerNorm of rows into `out` (f32, or bf16); mean and 1/std per row kept in `stats`
    /// ([2, n]).
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm(
        &self,
        out: impl Into<Data>,
        stats: Dev<f32>,
        x: Dev<f32>,
        w: Dev<f32>,
        b: Dev<f32>,
        (n, c): (usize, usize),
        eps: f32,
    ) -> Result<()> {
        stats.need(2 * n, "layer_norm stats")?;
        let (out, name, size) = out
            .into()
            .output(n * c, "layer_norm out", "layer_norm_fwd")?;
        let args = [
            Arg::P(out),
            Arg::P(stats.addr),
            Arg::P(stats.at(n)?.addr),
            Arg::P(x.need(n * c, "layer_norm x")?),
            Arg::P(w.need(c, "layer_norm w")?),
            Arg::P(b.need(c, "layer_norm b")?),
            Arg::I(int(n)?),
            Arg::I(int(c)?),
            Arg::F(eps),
        ];
        self.launch_rows(&name, n, &args, (4 + size) * n * c + 8 * n)
    }

    /// LayerNorm's backward: dx (= or += with `accumulate`), and its bf16 copy where `dx16` is
    /// given (the weight's and bias's gradients: [`Gpu::norm_weight_grads`]).
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm_bwd(
        &self,
        (dx, dx16): (Dev<f32>, Option<Dev<Bf16>>),
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
            Arg::P(need_opt(dx16, n * c, "layer_norm_bwd dx16")?),
            Arg::P(dy.need(n * c, "layer_norm_bwd dy")?),
            Arg::P(x.need(n * c, "layer_norm_bwd x")?),
            Arg::P(w.need(c, "layer_norm_bwd w")?),
            Arg::P(stats.addr),
            Arg::P(stats.at(n)?.addr),
            Arg::I(int(n)?),
            Arg::I(int(c)?),
            Arg::I(accumulate as i32),
        ];
        // dy and x read, dx (read too when accumulating) and its bf16 copy written.
        let dx_bytes = if accumulate { 8 } else { 4 } + if dx16.is_some() { 2 } else { 0 };
        self.launch_rows("layer_norm_bwd", n, &args, (8 + dx_bytes) * n * c + 8 * n)
    }

    /// dst[..len] = src[..len] (after the work before it).
    pub fn copy(&self, dst: Dev<f32>, src: Dev<f32>, len: usize) -> Result<()> {
        let (d, s) = (dst.need(len, "copy dst")?, src.need(len, "copy src")?);
        self.copy_raw(d, s, len)
    }

    /// table[ids[r]] += rows[r] for the n rows of `rows` ([n, c]); ids must be < the table's
    /// rows (checked by the caller).
    pub fn scatter_add_rows(
        &self,
        table: Dev<f32>,
        src: Dev<f32>,
        ids: Dev<u32>,
        (n, c): (usize, usize),
        vocab: usize,
    ) -> Result<()> {
        let args = [
            Arg::P(table.need(vocab * c, "scatter table")?),
            Arg::P(src.need(n * c, "scatter rows")?),
            Arg::P(ids.need(n, "scatter ids")?),
            Arg::I(int(n)?),
            Arg::I(int(c)?),
        ];
        self.launch_elements("embed_bwd_tokens", n * c, &args, 12 * n * c)
    }

    /// out[r] = table[ids[r]]; ids must be < the table's rows (checked by the caller).
    pub fn gather_rows(
        &self,
        out: Dev<f32>,
        table: Dev<f32>,
        ids: Dev<u32>,
        (n, c): (usize, usize),
        vocab: usize,
    ) -> Result<()> {
        let args = [
            Arg::P(out.need(n * c, "gather out")?),
            Arg::P(table.need(vocab * c, "gather table")?),
            Arg::P(ids.need(n, "gather ids")?),
            Arg::I(int(n)?),
            Arg::I(int(c)?),
        ];
        self.launch_elements("gather_rows", n * c, &args, 8 * n * c)
    }

    /// RMSNorm of rows; each row's 1/rms kept in `rstd` ([n]).
    pub fn rms_norm(
        &self,
        (out, rstd): (Data, Dev<f32>),
        x: Dev<f32>,
        w: Dev<f32>,
        (n, c): (usize, usize),
        eps: f32,
    ) -> Result<()> {
        let (out, name, size) = out.output(n * c, "rms_norm out", "rms_norm_fwd")?;
        let args = [
            Arg::P(out),
            Arg::P(rstd.need(n, "rms_norm rstd")?),
            Arg::P(x.need(n * c, "rms_norm x")?),
            Arg::P(w.need(c, "rms_norm w")?),
            Arg::I(int(n)?),
            Arg::I(int(c)?),
            Arg::F(eps),
        ];
        self.launch_rows(&name, n, &args, (4 + size) * n * c + 4 * n)
    }

    /// RMSNorm's backward: dx (= or += with `accumulate`), and its bf16 copy where `dx16` is
    /// given; `x`, `w`, `rstd`: the forward pass's input, weight and kept 1/rms (the weight's
    /// gradient: [`Gpu::norm_weight_grads`]).
    pub fn rms_norm_bwd(
        &self,
        (dx, dx16): (Dev<f32>, Option<Dev<Bf16>>),
        dy: Dev<f32>,
        (x, w, rstd): (Dev<f32>, Dev<f32>, Dev<f32>),
        (n, c): (usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        let args = [
            Arg::P(dx.need(n * c, "rms_norm_bwd dx")?),
            Arg::P(need_opt(dx16, n * c, "rms_norm_bwd dx16")?),
            Arg::P(dy.need(n * c, "rms_norm_bwd dy")?),
            Arg::P(x.need(n * c, "rms_norm_bwd x")?),
            Arg::P(w.need(c, "rms_norm_bwd w")?),
            Arg::P(rstd.need(n, "rms_norm_bwd rstd")?),
            Arg::I(int(n)?),
            Arg::I(int(c)?),
            Arg::I(accumulate as i32),
        ];
        let dx_bytes = if accumulate { 8 } else { 4 } + if dx16.is_some() { 2 } else { 0 };
        self.launch_rows("rms_norm_bwd", n, &args, (8 + dx_bytes) * n * c + 4 * n)
    }

    /// Rotary embedding in place of the first `heads` heads of hd columns of each row of x
    /// ([n, ld]; f32, or bf16 as a bf16 product writes it), row r at position r mod t of `table`
    /// ([positions ≥ t, hd]: cos, then sin); `inverse` rotates by −θ (the backward pass).
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: impl Into<Data>,
        ld: usize,
        table: Dev<f32>,
        (n, t): (usize, usize),
        (heads, hd): (usize, usize),
        inverse: bool,
    ) -> Result<()> {
        let x = x.into();
        let shape = rope_args(table, ld, (n, t), (heads, hd), inverse)?;
        let addr = x.need((n.max(1) - 1) * ld + heads * hd, "rope x")?;
        let args: Vec<Arg> = [Arg::P(addr)].into_iter().chain(shape).collect();
        let pairs = n * heads * (hd / 2);
        let (name, size) = if x.is_bf16() {
            ("rope_rows_h16", 2)
        } else {
            ("rope_rows", 4)
        };
        self.launch_elements(name, pairs, &args, 4 * size * pairs)
    }

    /// [`Gpu::rope`] of f32 x ([n, ld]) into a new bf16 `out` ([n, ld]) in one pass: the
    /// rotated columns as it rotates them, the rest of each row as it is, all rounded to bf16
    /// (the backward pass's q|k|v gradient as the products' operand).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_to_bf16(
        &self,
        out: Dev<Bf16>,
        x: Dev<f32>,
        ld: usize,
        table: Dev<f32>,
        (n, t): (usize, usize),
        (heads, hd): (usize, usize),
        inverse: bool,
    ) -> Result<()> {
        let shape = rope_args(table, ld, (n, t), (heads, hd), inverse)?;
        let (out, x) = (out.need(n * ld, "rope out")?, x.need(n * ld, "rope x")?);
        let args: Vec<Arg> = [Arg::P(out), Arg::P(x)].into_iter().chain(shape).collect();
        self.launch_columns("rope_rows_bf16", (n, ld), &args, 6 * n * ld)
    }

    /// g = silu(gate) ⊙ up over `rows` rows of `cols`, gate's and up's rows `ld` apart (the
    /// halves of a stacked gate|up product, read in place; `ld` = `cols` for separate ones), g
    /// [rows, cols]: gate and up f32 (g f32, or bf16), or both bf16 (g bf16).
    pub fn swiglu(
        &self,
        g: Data,
        gate: impl Into<Data>,
        up: impl Into<Data>,
        (rows, cols, ld): (usize, usize, usize),
    ) -> Result<()> {
        self.swiglu_launch(g, (gate.into(), ld), (up.into(), ld), (rows, cols))
    }

    /// Inference's `out = silu(gate)·up` over `rows` rows of `cols`, gate's row r at r·ld_gate
    /// and up's at r·ld_up (the halves of a stacked gate|up projection, read in place); out
    /// [rows, cols]; types as [`Gpu::swiglu`]'s.
    pub fn swiglu_rows(
        &self,
        out: Data,
        gate: (Data, usize),
        up: (Data, usize),
        (rows, cols): (usize, usize),
    ) -> Result<()> {
        self.swiglu_launch(out, gate, up, (rows, cols))
    }

    /// The SwiGLU forward kernel of [`Gpu::swiglu`] and [`Gpu::swiglu_rows`]: gate's and up's
    /// rows each `ld` apart.
    fn swiglu_launch(
        &self,
        g: Data,
        (gate, ld_gate): (Data, usize),
        (up, ld_up): (Data, usize),
        (rows, cols): (usize, usize),
    ) -> Result<()> {
        let h16 = same_type([gate, up], "swiglu")?;
        if h16 && !g.is_bf16() {
            candle_core::bail!("cuda swiglu: bf16 gate and up give a bf16 g");
        }
        let len = rows * cols;
        let (g, name, size) = g.output(len, "swiglu g", "swiglu_fwd")?;
        let args = [
            Arg::P(g),
            Arg::P(gate.need(strided(rows, cols, ld_gate, "swiglu")?, "swiglu gate")?),
            Arg::P(up.need(strided(rows, cols, ld_up, "swiglu")?, "swiglu up")?),
            Arg::L(rows as i64),
            Arg::I(int(cols)?),
            Arg::L(ld_gate as i64),
            Arg::L(ld_up as i64),
        ];
        let (name, in_size) = if h16 {
            ("swiglu_fwd_h16".to_string(), 2)
        } else {
            (name, 4)
        };
        self.launch_columns(&name, (rows, cols), &args, (2 * in_size + size) * len)
    }

    /// SwiGLU's backward from dg ([rows, cols]) and the forward's gate and up (laid out as
    /// [`Gpu::swiglu`] reads them): into `grads` (dgate, dup, laid out the same), f32 (which may
    /// be gate and up themselves) or bf16; with gate, up and dg in bf16 (as bf16 products write
    /// them), bf16 (which may be gate and up themselves).
    pub fn swiglu_bwd(
        &self,
        grads: (Data, Data),
        gate: impl Into<Data>,
        up: impl Into<Data>,
        dg: impl Into<Data>,
        (rows, cols, ld): (usize, usize, usize),
    ) -> Result<()> {
        let (gate, up, dg) = (gate.into(), up.into(), dg.into());
        let out16 = same_type([grads.0, grads.1], "swiglu_bwd dgate and dup")?;
        let h16 = same_type([gate, up, dg], "swiglu_bwd gate, up and dg")?;
        if h16 && !out16 {
            candle_core::bail!("cuda swiglu_bwd: bf16 gate, up and dg give bf16 gradients");
        }
        let len = rows * cols;
        let halves = strided(rows, cols, ld, "swiglu_bwd")?;
        let (pgate, name, size) = grads.0.output(halves, "swiglu_bwd dgate", "swiglu_bwd")?;
        let args = [
            Arg::P(pgate),
            Arg::P(grads.1.need(halves, "swiglu_bwd dup")?),
            Arg::P(gate.need(halves, "swiglu_bwd gate")?),
            Arg::P(up.need(halves, "swiglu_bwd up")?),
            Arg::P(dg.need(len, "swiglu_bwd dg")?),
            Arg::L(rows as i64),
            Arg::I(int(cols)?),
            Arg::L(ld as i64),
        ];
        let (name, in_size) = if h16 {
            ("swiglu_bwd_h16".to_string(), 2)
        } else {
            (name, 4)
        };
        self.launch_columns(&name, (rows, cols), &args, (3 * in_size + 2 * size) * len)
    }

    /// An elementwise activation: the tanh GELU, or ReLU (out f32, or bf16).
    pub fn act_fwd(&self, gelu: bool, out: Data, h: Dev<f32>, len: usize) -> Result<()> {
        let kernel = if gelu { "gelu_fwd" } else { "relu_fwd" };
        let (out, name, size) = out.output(len, "act out", kernel)?;
        let args = [
            Arg::P(out),
            Arg::P(h.need(len, "act h")?),
            Arg::L(len as i64),
        ];
        self.launch_elements(&name, len, &args, (4 + size) * len)
    }

    /// out = x rounded to bf16 (to nearest, ties to even).
    pub fn to_bf16(&self, out: Dev<Bf16>, x: Dev<f32>, len: usize) -> Result<()> {
        let args = [
            Arg::P(out.need(len, "to_bf16 out")?),
            Arg::P(x.need(len, "to_bf16 x")?),
            Arg::L(len as i64),
        ];
        self.launch_elements("to_bf16", len, &args, 6 * len)
    }

    /// out = x (bf16 values as f32s).
    pub fn from_bf16(&self, out: Dev<f32>, x: Dev<Bf16>, len: usize) -> Result<()> {
        let args = [
            Arg::P(out.need(len, "from_bf16 out")?),
            Arg::P(x.need(len, "from_bf16 x")?),
            Arg::L(len as i64),
        ];
        self.launch_elements("from_bf16", len, &args, 6 * len)
    }

    /// A new buffer holding `x` rounded to bf16.
    pub fn bf16_copy(&self, x: Dev<f32>) -> Result<Buf<Bf16>> {
        let copy = self.uninit_bf16(x.len)?;
        self.to_bf16(copy.dev(), x, x.len)?;
        Ok(copy)
    }

    /// `x` as a product's operand: with bf16 products ([`Gpu::bf16`]) a bf16 copy of it, else
    /// `x` itself.
    pub fn operand(&self, x: Dev<f32>) -> Result<Operand> {
        if !self.bf16 {
            return Ok(x.into());
        }
        let copy = self.bf16_copy(x)?;
        Ok(Operand {
            data: copy.dev().into(),
            _copy: Some(Stored::Bf16(copy)),
        })
    }

    /// [`Gpu::operand`] of f32 data, or bf16 data itself (which the caller keeps as long as the
    /// operand).
    pub fn operand_data(&self, x: Data) -> Result<Operand> {
        match x {
            Data::F32(d) => self.operand(d),
            Data::Bf16(_) => Ok(Operand {
                data: x,
                _copy: None,
            }),
        }
    }

    /// Arrays one after another as one product's operand (weight matrices of the same width
    /// stacked by rows, so that one product does the work of several): a new buffer, bf16 with
    /// bf16 products ([`Gpu::bf16`]), else f32.
    pub fn operand_stacked(&self, parts: &[Dev<f32>]) -> Result<Operand> {
        let copy = self.operand_buf(parts.iter().map(|p| p.len).sum())?;
        let mut at = 0;
        for p in parts {
            match &copy {
                Stored::Bf16(b) => self.to_bf16(b.dev().at(at)?, *p, p.len)?,
                Stored::F32(b) => self.copy(b.dev().at(at)?, *p, p.len)?,
            }
            at += p.len;
        }
        Ok(Operand {
            data: copy.data(),
            _copy: Some(copy),
        })
    }

    /// A buffer of `len` elements to be written before it is read, for an activation kept only
    /// as a product's operand: bf16 with bf16 products ([`Gpu::bf16`]), else f32.
    pub fn operand_buf(&self, len: usize) -> Result<Stored> {
        self.stored(self.bf16, len)
    }

    /// A buffer's first `len` values, as f32s.
    pub fn values(&self, buf: &Stored, len: usize) -> Result<Vec<f32>> {
        Ok(match buf {
            Stored::F32(b) => self.download(b, len)?,
            Stored::Bf16(b) => self.download(b, len)?.iter().map(|x| x.to_f32()).collect(),
        })
    }

    /// A tensor over a buffer's first `shape.elem_count()` elements, of its type.
    pub fn stored_tensor(
        &self,
        buf: Stored,
        shape: impl Into<candle_core::Shape>,
    ) -> Result<candle_core::Tensor> {
        match buf {
            Stored::F32(b) => self.into_tensor(b, shape),
            Stored::Bf16(b) => self.into_tensor_bf16(b, shape),
        }
    }

    /// A buffer of `len` bf16s (`bf16`) or f32s, to be written before it is read.
    pub fn stored(&self, bf16: bool, len: usize) -> Result<Stored> {
        Ok(if bf16 {
            Stored::Bf16(self.uninit_bf16(len)?)
        } else {
            Stored::F32(self.uninit(len)?)
        })
    }

    /// With bf16 products ([`Gpu::bf16`]), a buffer of `len` bf16s for the copy an f32 value's
    /// producer writes beside it as the products' operand; else none (the products take the
    /// f32 value).
    pub fn operand_copy_buf(&self, len: usize) -> Result<Option<Buf<Bf16>>> {
        self.bf16.then(|| self.uninit_bf16(len)).transpose()
    }

    /// The activation's backward: dh (which may be dg) from dg and the forward's input h (f32;
    /// or, for GELU, bf16 as [`Gpu::linear_gelu`] keeps it); with `dh16`, dh rounded to bf16 too
    /// (the products' operand).
    pub fn act_bwd(
        &self,
        gelu: bool,
        (dh, dh16): (Dev<f32>, Option<Dev<Bf16>>),
        h: impl Into<Data>,
        dg: Dev<f32>,
        len: usize,
    ) -> Result<()> {
        let h = h.into();
        let name = match (gelu, h) {
            (true, Data::F32(_)) => "gelu_bwd",
            (true, Data::Bf16(_)) => "gelu_bwd_h16",
            (false, Data::F32(_)) => "relu_bwd",
            (false, Data::Bf16(_)) => {
                candle_core::bail!("cuda act_bwd: ReLU keeps its input in f32")
            }
        };
        let args = [
            Arg::P(dh.need(len, "act_bwd dh")?),
            Arg::P(need_opt(dh16, len, "act_bwd dh16")?),
            Arg::P(h.need(len, "act_bwd h")?),
            Arg::P(dg.need(len, "act_bwd dg")?),
            Arg::L(len as i64),
        ];
        let h_size = if h.is_bf16() { 2 } else { 4 };
        let bytes = (8 + h_size + if dh16.is_some() { 2 } else { 0 }) * len;
        self.launch_elements(name, len, &args, bytes)
    }

    /// Causal softmax in place over `rows` rows of length t (rows of [groups, t, t]).
    pub fn softmax_causal(&self, p: Dev<f32>, rows: usize, t: usize, scale: f32) -> Result<()> {
        let args = [
            Arg::P(p.need(rows * t, "softmax p")?),
            Arg::L(rows as i64),
            Arg::I(int(t)?),
            Arg::F(scale),
        ];
        self.launch_rows("softmax_causal_fwd", rows, &args, 8 * rows * t)
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
        self.launch_rows("softmax_causal_bwd", rows, &args, 12 * rows * t)
    }

    /// Cross-entropy of logits [rows, v] (f32, or bf16) against targets; the logits become the
    /// gradient times `sc` (rounded to bf16 for bf16 logits), loss[r] the row's loss (f32,
    /// from a softmax in f32). Targets must be < v (checked by the caller).
    pub fn cross_entropy(
        &self,
        logits: Data,
        loss: Dev<f32>,
        targets: Dev<u32>,
        (rows, v): (usize, usize),
        sc: f32,
    ) -> Result<()> {
        let (ptr, name, size) = logits.output(rows * v, "cross_entropy logits", "cross_entropy")?;
        let args = [
            Arg::P(ptr),
            Arg::P(loss.need(rows, "cross_entropy loss")?),
            Arg::P(targets.need(rows, "cross_entropy targets")?),
            Arg::I(int(v)?),
            Arg::F(sc),
        ];
        self.launch(&name, (rows as u32, 1024), &args, 2 * size * rows * v)
    }

    /// AdamW over every parameter in one launch (a block per `OPT_CHUNK` elements), in place:
    /// m ← β₁·m + (1 − β₁)·x, v ← β₂·v + (1 − β₂)·x² with x = scale·g, then
    /// θ ← keep·θ − lr·(m·ibc1) / (√(v·ibc2) + ε), each parameter with its own keep.
    pub fn adam(&self, params: &[AdamParam], k: AdamStep) -> Result<()> {
        let (table, chunks) = self.chunk_table(params)?;
        if chunks == 0 {
            return Ok(());
        }
        let args = [
            Arg::P(table.dev().addr),
            Arg::F(k.beta1),
            Arg::F(k.beta2),
            Arg::F(k.scale),
            Arg::F(k.lr),
            Arg::F(k.ibc1),
            Arg::F(k.ibc2),
            Arg::F(k.eps),
        ];
        // θ, m and v read and written, g read.
        let elements: usize = params.iter().map(|p| p.g.len).sum();
        self.launch("adam_chunks", (chunks, THREADS), &args, 28 * elements)
    }

    /// The optimizer kernels' table: per chunk of `OPT_CHUNK` elements of a parameter, its
    /// operands' addresses at the chunk's start, its length and keep (train.cu's `Chunk`),
    /// uploaded; and the number of chunks.
    fn chunk_table(&self, params: &[AdamParam]) -> Result<(Buf<u64>, u32)> {
        let mut table = Vec::new();
        for p in params {
            let len = p.g.len;
            for (x, what) in [(p.theta, "theta"), (p.m, "m"), (p.v, "v")] {
                if x.len != len {
                    candle_core::bail!("cuda adam: {what} of {} for a gradient of {len}", x.len);
                }
            }
            for start in (0..len).step_by(OPT_CHUNK) {
                let at = |x: Dev<f32>| x.addr + (start * 4) as u64;
                table.extend([at(p.theta), at(p.g), at(p.m), at(p.v)]);
                table.push(OPT_CHUNK.min(len - start) as u64);
                table.push(p.keep.to_bits() as u64);
            }
        }
        let chunks = table.len() / 6;
        let Ok(chunks) = u32::try_from(chunks) else {
            candle_core::bail!("cuda adam: {chunks} chunks");
        };
        Ok((self.upload(&table)?, chunks))
    }

    /// Σ x² over every array (in f64: a partial sum per chunk, added on the host in a fixed
    /// order: the same value every run), in one launch and one copy back to the host.
    pub fn sum_of_squares(&self, arrays: &[Dev<f32>]) -> Result<f64> {
        // The table's other operands are not read by this kernel.
        let params: Vec<AdamParam> = arrays
            .iter()
            .map(|&x| AdamParam {
                theta: x,
                g: x,
                m: x,
                v: x,
                keep: 1.0,
            })
            .collect();
        let (table, chunks) = self.chunk_table(&params)?;
        if chunks == 0 {
            return Ok(0.0);
        }
        let partials = self.zeros::<f64>(chunks as usize)?;
        let args = [Arg::P(partials.dev().addr), Arg::P(table.dev().addr)];
        let elements: usize = arrays.iter().map(|a| a.len).sum();
        self.launch("sum_squares_chunks", (chunks, THREADS), &args, 4 * elements)?;
        let host = self.download(&partials, chunks as usize)?;
        Ok(host.iter().sum())
    }

    /// out[j] = Σ_r src[r, j] over the n rows of `src` [n, cols] (f32, or bf16), in f32 and in
    /// a fixed order.
    pub fn column_sums(
        &self,
        out: Dev<f32>,
        src: impl Into<Data>,
        (n, cols): (usize, usize),
    ) -> Result<()> {
        let src = src.into();
        if n == 0 {
            return self.fill(out, 0.0, cols);
        }
        let (chunks, per) = row_chunks(n);
        let sums = |out: Dev<f32>, src: Data, (n, per, chunks): (usize, usize, usize)| {
            let (src, elem) = match src {
                Data::F32(s) => (s.need(n * cols, "column_sums src")?, 4),
                Data::Bf16(s) => (s.need(n * cols, "column_sums src")?, 2),
            };
            let vec = lanes(elem, cols, &[src]);
            let kernel = match (elem, vec) {
                (4, 1) => "column_sums",
                (4, _) => "column_sums_v4",
                (_, 1) => "column_sums_h16",
                _ => "column_sums_h16_v8",
            };
            let args = [
                Arg::P(out.need(chunks * cols, "column_sums out")?),
                Arg::P(src),
                Arg::I(int(n)?),
                Arg::I(int(cols)?),
                Arg::I(int(per)?),
            ];
            let launch = ((blocks(cols, 32 * vec) as usize, chunks), SUM_THREADS, 0);
            let work = Work::bytes((elem * n + 4 * chunks) * cols);
            self.launch_in(Module::Train, kernel, launch, &args, work)
        };
        if chunks == 1 {
            return sums(out, src, (n, n, 1));
        }
        let partial = self.uninit(chunks * cols)?;
        sums(partial.dev(), src, (n, per, chunks))?;
        sums(out, partial.dev().into(), (chunks, chunks, 1))
    }

    /// A norm's weight gradient dw[j] = Σ_r dy[r, j]·x̂[r, j] over the n rows of dy and x [n, c],
    /// x̂ = (x − mean)·rstd with `stats` = (mean, rstd) as the norm's forward pass kept them (no
    /// mean: RMSNorm's x·rstd), and, where `db` is given, the bias's db[j] = Σ_r dy[r, j]; in
    /// f32 and in a fixed order, as [`Gpu::column_sums`].
    pub fn norm_weight_grads(
        &self,
        (dw, db): (Dev<f32>, Option<Dev<f32>>),
        dy: Dev<f32>,
        x: Dev<f32>,
        (mean, rstd): (Option<Dev<f32>>, Dev<f32>),
        (n, c): (usize, usize),
    ) -> Result<()> {
        if n == 0 {
            self.fill(dw, 0.0, c)?;
            return db.map_or(Ok(()), |db| self.fill(db, 0.0, c));
        }
        let (chunks, per) = row_chunks(n);
        let (dy, x) = (
            dy.need(n * c, "norm_weight_grads dy")?,
            x.need(n * c, "norm_weight_grads x")?,
        );
        let vec = lanes(4, c, &[dy, x]);
        let args = |dw: Dev<f32>, db: Option<Dev<f32>>| -> Result<Vec<Arg>> {
            Ok(vec![
                Arg::P(dw.need(chunks * c, "norm_weight_grads dw")?),
                Arg::P(need_opt(db, chunks * c, "norm_weight_grads db")?),
                Arg::P(dy),
                Arg::P(x),
                Arg::P(need_opt(mean, n, "norm_weight_grads mean")?),
                Arg::P(rstd.need(n, "norm_weight_grads rstd")?),
                Arg::I(int(n)?),
                Arg::I(int(c)?),
                Arg::I(int(per)?),
            ])
        };
        let launch = ((blocks(c, 32 * vec) as usize, chunks), SUM_THREADS, 0);
        let outputs = 1 + usize::from(db.is_some());
        let work = Work::bytes(8 * n * c + 8 * n + 4 * outputs * chunks * c);
        let kernel = if vec == 1 {
            "norm_weight_sums"
        } else {
            "norm_weight_sums_v4"
        };
        let run = |args: Vec<Arg>| self.launch_in(Module::Train, kernel, launch, &args, work);
        if chunks == 1 {
            return run(args(dw, db)?);
        }
        // Rows of partial sums, then their column sums.
        let pw = self.uninit(chunks * c)?;
        let pb = db.map(|_| self.uninit(chunks * c)).transpose()?;
        run(args(pw.dev(), pb.as_ref().map(|b| b.dev()))?)?;
        self.column_sums(dw, pw.dev(), (chunks, c))?;
        match (db, pb) {
            (Some(db), Some(pb)) => self.column_sums(db, pb.dev(), (chunks, c)),
            _ => Ok(()),
        }
    }

    pub fn fill(&self, out: Dev<f32>, value: f32, len: usize) -> Result<()> {
        let args = [
            Arg::P(out.need(len, "fill")?),
            Arg::F(value),
            Arg::L(len as i64),
        ];
        self.launch_elements("fill", len, &args, 4 * len)
    }
}

/// How the column sums split n rows: (chunks, rows per chunk). Chunks of at least 128 rows (16
/// a thread), at most 128 of them, each summed by its own blocks into a row of partial sums, then
/// those rows summed (in order): one block per 32 columns alone keeps most of a GPU idle (24
/// blocks for 768 columns; 288 GB/s measured on an H200). 64 chunks of 8,192 rows of 768 f32
/// columns: 384 blocks of 8 warps.
fn row_chunks(n: usize) -> (usize, usize) {
    let chunks = n.div_ceil(128).clamp(1, 128);
    (chunks, n.div_ceil(chunks))
}

/// Threads of a block of the column sums' kernels (train.cu's SUM_THREADS).
const SUM_THREADS: u32 = 256;

/// The columns a lane of the column sums' kernels reads in one 16-byte load from rows of
/// `elem`-byte values at `rows` (each `cols` wide): 16 / elem where every row starts 16-byte
/// aligned, else one.
fn lanes(elem: usize, cols: usize, rows: &[u64]) -> usize {
    let v = 16 / elem;
    if cols.is_multiple_of(v) && rows.iter().all(|a| a.is_multiple_of(16)) {
        v
    } else {
        1
    }
}

/// Blocks of `decode_attention` a launch should have at least to keep a large GPU busy (two per
/// multiprocessor of an H100 or H200, with their 132), and the fewest keys worth a block of their
/// own.
const DECODE_BLOCKS: usize = 256;
const DECODE_SPLIT_KEYS: usize = 256;

/// How many blocks each (sequence, query head) of a decoding step splits its keys over: one
/// where the step has blocks enough (`pairs` of them, serving rounds of many streams), else as
/// many as bring the launch to [`DECODE_BLOCKS`], each with [`DECODE_SPLIT_KEYS`] of the longest
/// cache's keys at least (batch-1 decoding over a long context), 32 at most.
fn decode_splits(pairs: usize, longest: usize) -> usize {
    if 2 * pairs >= DECODE_BLOCKS {
        return 1;
    }
    longest
        .div_ceil(DECODE_SPLIT_KEYS)
        .min(DECODE_BLOCKS.div_ceil(pairs.max(1)))
        .clamp(1, 32)
}

/// The checks [`Gpu::decode_attention`] and [`Gpu::extend_attention`] share: some sequences,
/// grouped heads, a head size the kernels take, an even number of rotated columns within it,
/// and a rotary table reaching every new row's position. The rotated columns and the table's
/// address (0 without rotation).
fn cached_attention_checks(
    out: Data,
    (q, k_new, v_new): (DecodeRows, DecodeRows, DecodeRows),
    caches: &[DecodeCache],
    rope: Option<(Dev<f32>, usize)>,
    (heads, kv_heads, hd): (usize, usize, usize),
) -> Result<(usize, u64)> {
    let n = caches.len();
    let bf16 = out.is_bf16();
    let rows_and_caches = [q.data, k_new.data, v_new.data]
        .into_iter()
        .chain(caches.iter().flat_map(|c| [c.k, c.v]));
    if rows_and_caches.into_iter().any(|d| d.is_bf16() != bf16) {
        candle_core::bail!("cuda decode attention: rows, caches and output all f32 or all bf16");
    }
    if n == 0 || heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        candle_core::bail!(
            "cuda decode attention: {n} sequences, {heads} query heads for {kv_heads} key/value \
             heads"
        );
    }
    if hd == 0 || hd > DECODE_MAX_HEAD {
        candle_core::bail!("cuda decode attention: head size {hd} (1 to {DECODE_MAX_HEAD})");
    }
    let rotated = rope.map_or(0, |(_, r)| r);
    if rotated > hd || !rotated.is_multiple_of(2) {
        candle_core::bail!("cuda decode attention: {rotated} rotated columns of {hd}");
    }
    let table = match rope {
        Some((t, r)) if r > 0 => {
            let end = caches.iter().map(|c| c.len + c.new).max().unwrap_or(0);
            t.need(end * r, "decode attention rotary table")?
        }
        _ => 0,
    };
    Ok((rotated, table))
}

fn int(x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("cuda: size {x} too large")))
}

#[derive(Clone, Copy)]
enum Arg {
    P(u64),
    I(i32),
    L(i64),
    F(f32),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU (the emulation with `cuda-emu`) with full f32 products, or `None` where there is
    /// none ([`crate::testing::gpu_device`]).
    fn gpu() -> Option<Gpu> {
        let mut gpu = Gpu::of(&crate::testing::gpu_device()?)?;
        gpu.tf32 = false;
        gpu.bf16 = false;
        Some(gpu)
    }

    /// Products with every transposition, padded rows, two batched products, alpha and beta
    /// (full f32, and bf16 operands with f32 accumulation) against the loops in f64: the
    /// row-major operands' translation for cuBLAS on a GPU, the emulation's stand-in for it with
    /// `cuda-emu`.
    #[test]
    fn gpu_products_equal_the_loops() {
        let Some(gpu) = gpu() else {
            return;
        };
        let (rows, cols, k, pad, count) = (5, 7, 6, 3, 2);
        let mut draw = crate::testing::uniform(7);
        let transpositions = [(false, false), (true, false), (false, true), (true, true)];
        for (bf16, (ta, tb)) in [false, true]
            .into_iter()
            .flat_map(|b| transpositions.map(|t| (b, t)))
        {
            // Stored shapes, each row padded by `pad`.
            let (ar, ac) = if ta { (k, rows) } else { (rows, k) };
            let (br, bc) = if tb { (cols, k) } else { (k, cols) };
            let (lda, ldb, ldc) = (ac + pad, bc + pad, cols + pad);
            let (sa, sb, sc) = (ar * lda, br * ldb, rows * ldc);
            let (mut a, mut b, c0) = (draw(count * sa), draw(count * sb), draw(count * sc));
            // bf16 operands: the reference takes their values.
            let to_bf16 =
                |x: &[f32]| -> Vec<Bf16> { x.iter().map(|&v| Bf16::from_f32(v)).collect() };
            let (ha, hb) = (to_bf16(&a), to_bf16(&b));
            if bf16 {
                a = ha.iter().map(|v| v.to_f32()).collect();
                b = hb.iter().map(|v| v.to_f32()).collect();
            }
            let (da, db, dc) = (
                gpu.upload(&a).unwrap(),
                gpu.upload(&b).unwrap(),
                gpu.upload(&c0).unwrap(),
            );
            let (da16, db16) = (gpu.upload(&ha).unwrap(), gpu.upload(&hb).unwrap());
            let pick = |f: &Buf<f32>, h: &Buf<Bf16>| -> Data {
                if bf16 {
                    h.dev().into()
                } else {
                    f.dev().into()
                }
            };
            let mat = |d: Data, ld, t| Mat { ptr: d, ld, t };
            let batch = Batched {
                count,
                a: sa,
                b: sb,
                c: sc,
            };
            let (alpha, beta) = (0.5, 2.0);
            gpu.mm(
                (rows, cols, k),
                mat(pick(&da, &da16), lda, ta),
                mat(pick(&db, &db16), ldb, tb),
                (dc.dev(), ldc),
                alpha,
                beta,
                batch,
            )
            .unwrap();
            let got = gpu.download(&dc, count * sc).unwrap();
            for i in 0..count {
                for r in 0..rows {
                    for j in 0..ldc {
                        let at = i * sc + r * ldc + j;
                        let want = if j >= cols {
                            // Padding is not written.
                            c0[at] as f64
                        } else {
                            let dot: f64 = (0..k)
                                .map(|e| {
                                    let x = if ta {
                                        a[i * sa + e * lda + r]
                                    } else {
                                        a[i * sa + r * lda + e]
                                    };
                                    let y = if tb {
                                        b[i * sb + j * ldb + e]
                                    } else {
                                        b[i * sb + e * ldb + j]
                                    };
                                    x as f64 * y as f64
                                })
                                .sum();
                            alpha as f64 * dot + beta as f64 * c0[at] as f64
                        };
                        let err = (got[at] as f64 - want).abs();
                        assert!(
                            err < 1e-5,
                            "bf16 {bf16} ta {ta} tb {tb} batch {i} [{r}, {j}]: {} vs {want}",
                            got[at]
                        );
                    }
                }
            }
        }
    }

    /// The kernels that write bf16 operands (norms, activations and their gradients, `to_bf16`,
    /// the cross-entropy's gradient of bf16 logits) give their f32 kernels' outputs rounded to nearest even (within one bf16 step: on a GPU the two
    /// instantiations may contract their arithmetic differently).
    #[test]
    fn gpu_bf16_outputs_are_the_f32_outputs_rounded() {
        let Some(gpu) = gpu() else {
            return;
        };
        let (n, c) = (37, 70);
        let len = n * c;
        let x: Vec<f32> = (0..len)
            .map(|i| ((i * 7919 % 1000) as f32 / 250.0 - 2.0) * (1.0 + (i % 3) as f32))
            .collect();
        let w: Vec<f32> = (0..c).map(|j| 0.5 + (j % 5) as f32 * 0.25).collect();
        let bias: Vec<f32> = (0..c).map(|j| (j % 7) as f32 * 0.1 - 0.3).collect();
        let (dx, dw, db) = (
            gpu.upload(&x).unwrap(),
            gpu.upload(&w).unwrap(),
            gpu.upload(&bias).unwrap(),
        );
        let up = gpu
            .upload(&x.iter().rev().copied().collect::<Vec<_>>())
            .unwrap();
        let stats = gpu.uninit(2 * n).unwrap();
        // Logits of bf16 values for the cross-entropy (its f32 kernel on the values its bf16
        // kernel reads), a target per row.
        let rounded: Vec<f32> = x.iter().map(|&v| Bf16::from_f32(v).to_f32()).collect();
        let dxr = gpu.upload(&rounded).unwrap();
        let targets = gpu
            .upload_u32(&(0..n as u32).map(|r| r * 13 % c as u32).collect::<Vec<_>>())
            .unwrap();
        let losses = gpu.uninit(n).unwrap();
        // The backward kernels' other outputs, and the norms' statistics for their backward.
        let (scratch, scratch16) = (gpu.uninit(len).unwrap(), gpu.uninit_bf16(len).unwrap());
        let (ln_stats, rms_stats) = (gpu.uninit(2 * n).unwrap(), gpu.uninit(n).unwrap());
        let (xd, wd, bd) = (dx.dev(), dw.dev(), db.dev());
        gpu.layer_norm(scratch.dev(), ln_stats.dev(), xd, wd, bd, (n, c), 1e-5)
            .unwrap();
        gpu.rms_norm(
            (Data::from(scratch.dev()), rms_stats.dev()),
            xd,
            wd,
            (n, c),
            1e-5,
        )
        .unwrap();
        type Kernel<'a> = Box<dyn Fn(Data) -> Result<()> + 'a>;
        // A kernel's other output, of the type of the one checked.
        let other = |o: Data| -> Data {
            match o {
                Data::F32(_) => scratch.dev().into(),
                Data::Bf16(_) => scratch16.dev().into(),
            }
        };
        // The activation's backward: its f32 gradient, or (into scratch) with the bf16 copy.
        let (g, h, dg, dh) = (&gpu, dx.dev(), up.dev(), scratch.dev());
        let act_bwd = |gelu: bool| -> Kernel {
            Box::new(move |o| match o {
                Data::F32(o) => g.act_bwd(gelu, (o, None), h, dg, len),
                Data::Bf16(o) => g.act_bwd(gelu, (dh, Some(o)), h, dg, len),
            })
        };
        let kernels: Vec<(&str, Kernel)> = vec![
            (
                "layer_norm",
                Box::new(|o| {
                    let (x, w, b) = (dx.dev(), dw.dev(), db.dev());
                    gpu.layer_norm(o, stats.dev(), x, w, b, (n, c), 1e-5)
                }),
            ),
            (
                "rms_norm",
                Box::new(|o| gpu.rms_norm((o, stats.dev()), dx.dev(), dw.dev(), (n, c), 1e-5)),
            ),
            ("gelu", Box::new(|o| gpu.act_fwd(true, o, dx.dev(), len))),
            ("relu", Box::new(|o| gpu.act_fwd(false, o, dx.dev(), len))),
            (
                "swiglu",
                Box::new(|o| gpu.swiglu(o, dx.dev(), up.dev(), (n, c, c))),
            ),
            (
                "to_bf16",
                Box::new(|o| match o {
                    Data::F32(o) => gpu.copy(o, dx.dev(), len),
                    Data::Bf16(o) => gpu.to_bf16(o, dx.dev(), len),
                }),
            ),
            (
                "layer_norm_bwd",
                Box::new(|o| {
                    let grads = match o {
                        Data::F32(o) => (o, None),
                        Data::Bf16(o) => (scratch.dev(), Some(o)),
                    };
                    let (dy, x, w) = (up.dev(), dx.dev(), dw.dev());
                    gpu.layer_norm_bwd(grads, dy, x, w, ln_stats.dev(), (n, c), false)
                }),
            ),
            (
                "rms_norm_bwd",
                Box::new(|o| {
                    let grads = match o {
                        Data::F32(o) => (o, None),
                        Data::Bf16(o) => (scratch.dev(), Some(o)),
                    };
                    let kept = (dx.dev(), dw.dev(), rms_stats.dev());
                    gpu.rms_norm_bwd(grads, up.dev(), kept, (n, c), false)
                }),
            ),
            ("gelu_bwd", act_bwd(true)),
            ("relu_bwd", act_bwd(false)),
            (
                "swiglu_bwd dgate",
                Box::new(|o| {
                    let grads = (o, other(o));
                    gpu.swiglu_bwd(grads, dx.dev(), up.dev(), dxr.dev(), (n, c, c))
                }),
            ),
            (
                "swiglu_bwd dup",
                Box::new(|o| {
                    let grads = (other(o), o);
                    gpu.swiglu_bwd(grads, dx.dev(), up.dev(), dxr.dev(), (n, c, c))
                }),
            ),
            (
                "cross_entropy",
                Box::new(|o| {
                    match o {
                        Data::F32(o) => gpu.copy(o, dxr.dev(), len)?,
                        Data::Bf16(o) => gpu.to_bf16(o, dx.dev(), len)?,
                    }
                    gpu.cross_entropy(o, losses.dev(), targets.dev(), (n, c), 0.5)
                }),
            ),
        ];
        for (name, kernel) in kernels {
            let f = gpu.uninit(len).unwrap();
            let h = gpu.uninit_bf16(len).unwrap();
            kernel(f.dev().into()).unwrap();
            kernel(h.dev().into()).unwrap();
            let (f, h) = (
                gpu.download(&f, len).unwrap(),
                gpu.download(&h, len).unwrap(),
            );
            for (i, (f, h)) in f.iter().zip(&h).enumerate() {
                let want = Bf16::from_f32(*f);
                assert!(
                    want.0.abs_diff(h.0) <= 1,
                    "{name} [{i}]: {:?} ({}) for {f}",
                    h,
                    h.to_f32()
                );
            }
        }
        // Rounding to nearest, ties to even; NaN, infinities, the largest value (to infinity), a
        // subnormal (kept: bf16 has them too), signed zeros.
        let edge = [
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -1.0 - 1.0 / 256.0,
            1.0 + 1.0 / 256.0 + 1e-6,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            1e-40,
            0.0,
            -0.0,
        ];
        let src = gpu.upload(&edge).unwrap();
        let out = gpu.uninit_bf16(edge.len()).unwrap();
        gpu.to_bf16(out.dev(), src.dev(), edge.len()).unwrap();
        let got = gpu.download(&out, edge.len()).unwrap();
        let want = [
            0x3f80, 0x3f82, 0xbf80, 0x3f81, 0x7fc0, 0x7f80, 0xff80, 0x7f80, 0x0001, 0x0000, 0x8000,
        ];
        for ((g, w), x) in got.iter().zip(want).zip(edge) {
            let same = if x.is_nan() {
                g.to_f32().is_nan()
            } else {
                g.0 == w && Bf16::from_f32(x).0 == w
            };
            assert!(same, "to_bf16({x:e}) = {:#06x}, want {w:#06x}", g.0);
        }
    }

    /// Uploads arrive whole and in order while the GPU is busy: small ones through the staging
    /// slots (more uploads than slots, so that each slot is reused, some while the GPU has not
    /// reached earlier copies), larger ones directly.
    #[test]
    fn gpu_uploads_arrive_whole_while_the_gpu_is_busy() {
        let Some(gpu) = gpu() else {
            return;
        };
        let busy = gpu.uninit(1 << 20).unwrap();
        let mut sent = Vec::new();
        for i in 0..300u64 {
            if i % 16 == 0 {
                gpu.fill(busy.dev(), i as f32, 1 << 20).unwrap();
            }
            // 8 bytes to 160 KiB: most within a slot, some over it.
            let len = 1 + (i as usize * 137) % 20_000;
            let data: Vec<u64> = (0..len as u64).map(|j| i << 32 | j).collect();
            sent.push((gpu.upload(&data).unwrap(), data));
        }
        for (i, (buf, data)) in sent.iter().enumerate() {
            assert_eq!(&gpu.download(buf, data.len()).unwrap(), data, "upload {i}");
        }
    }

    /// Column sums over few and many rows (one launch, and chunks of rows summed apart, then
    /// their sums) equal the sums in f64, the same bits every run: one column a lane, and four
    /// (rows of a multiple of 4 columns, 16-byte aligned; not a view one value in).
    #[test]
    fn gpu_column_sums_equal_the_sums_in_f64() {
        let Some(gpu) = gpu() else {
            return;
        };
        let mut draw = crate::testing::uniform(5);
        for (cols, skip) in [(70, 0), (72, 0), (72, 1)] {
            for n in [1, 127, 128, 1000, 20_000] {
                let x = draw(n * cols + skip);
                let up = gpu.upload(&x).unwrap();
                let src = up.dev().at(skip).unwrap();
                let x = &x[skip..];
                let wide = cols % 4 == 0 && skip == 0 && up.dev().addr.is_multiple_of(16);
                assert_eq!(lanes(4, cols, &[src.addr]), if wide { 4 } else { 1 });
                let out = gpu.uninit(cols).unwrap();
                gpu.column_sums(out.dev(), src, (n, cols)).unwrap();
                let got = gpu.download(&out, cols).unwrap();
                for (j, g) in got.iter().enumerate() {
                    let want: f64 = (0..n).map(|r| x[r * cols + j] as f64).sum();
                    let tol = 1e-6 * n as f64;
                    assert!(
                        (*g as f64 - want).abs() <= tol,
                        "{n} x {cols}, {skip} skipped, column {j}: {g} vs {want}"
                    );
                }
                let again = gpu.uninit(cols).unwrap();
                gpu.column_sums(again.dev(), src, (n, cols)).unwrap();
                assert_eq!(gpu.download(&again, cols).unwrap(), got, "{n} rows");
            }
        }
    }

    /// The column sums read 16 bytes a lane where every row starts 16-byte aligned: 4 f32s or
    /// 8 bf16s.
    #[test]
    fn column_sums_read_16_bytes_a_lane_from_aligned_rows() {
        assert_eq!(lanes(4, 768, &[0x1000, 0x2000]), 4);
        assert_eq!(lanes(2, 768, &[0x1000]), 8);
        assert_eq!(lanes(4, 770, &[0x1000]), 1, "rows of 3080 bytes");
        assert_eq!(lanes(2, 772, &[0x1000]), 1, "rows of 1544 bytes");
        assert_eq!(lanes(4, 768, &[0x1000, 0x2004]), 1, "one input 4 bytes off");
        assert_eq!(lanes(4, 4, &[0x1010]), 4);
    }

    /// A norm's weight and bias gradients over few and many rows (chunks of rows summed apart,
    /// then their sums), with a mean (LayerNorm) and without (RMSNorm, no bias), equal the sums
    /// in f64; bf16 rows' column sums too.
    #[test]
    fn gpu_norm_weight_grads_equal_the_sums_in_f64() {
        let Some(gpu) = gpu() else {
            return;
        };
        let c = 40;
        let mut draw = crate::testing::uniform(6);
        for n in [1, 300, 1000] {
            let (x, dy) = (draw(n * c), draw(n * c));
            let (mean, rstd): (Vec<f32>, Vec<f32>) = (0..n)
                .map(|r| (x[r * c] * 0.5, 1.0 + r as f32 / n as f32))
                .unzip();
            let up = |v: &[f32]| gpu.upload(v).unwrap();
            let (xd, dyd, md, rd) = (up(&x), up(&dy), up(&mean), up(&rstd));
            for layer in [true, false] {
                let (dw, db) = (gpu.uninit(c).unwrap(), gpu.uninit(c).unwrap());
                let m = layer.then(|| md.dev());
                let dbd = layer.then(|| db.dev());
                gpu.norm_weight_grads((dw.dev(), dbd), dyd.dev(), xd.dev(), (m, rd.dev()), (n, c))
                    .unwrap();
                let got_w = gpu.download(&dw, c).unwrap();
                let got_b = gpu.download(&db, c).unwrap();
                for j in 0..c {
                    let (mut w, mut b) = (0f64, 0f64);
                    for r in 0..n {
                        let centre = if layer { mean[r] as f64 } else { 0.0 };
                        let xh = (x[r * c + j] as f64 - centre) * rstd[r] as f64;
                        w += dy[r * c + j] as f64 * xh;
                        b += dy[r * c + j] as f64;
                    }
                    let tol = 1e-5 * n as f64;
                    let what = format!("{n} rows, layer norm {layer}, column {j}");
                    assert!(
                        (got_w[j] as f64 - w).abs() <= tol,
                        "{what}: dw {} vs {w}",
                        got_w[j]
                    );
                    if layer {
                        assert!(
                            (got_b[j] as f64 - b).abs() <= tol,
                            "{what}: db {} vs {b}",
                            got_b[j]
                        );
                    }
                }
            }
            // bf16 rows: the sums of their values.
            let h: Vec<Bf16> = dy.iter().map(|&v| Bf16::from_f32(v)).collect();
            let hd = gpu.upload(&h).unwrap();
            let out = gpu.uninit(c).unwrap();
            gpu.column_sums(out.dev(), hd.dev(), (n, c)).unwrap();
            let got = gpu.download(&out, c).unwrap();
            for (j, g) in got.iter().enumerate() {
                let want: f64 = (0..n).map(|r| h[r * c + j].to_f32() as f64).sum();
                assert!(
                    (*g as f64 - want).abs() <= 1e-6 * n as f64,
                    "bf16 {n} rows: {g} vs {want}"
                );
            }
        }
    }

    /// The SwiGLU kernels reading gate, up and dg in bf16 (as bf16 products write them) give
    /// their f32 kernels' outputs on the same values, rounded (within one bf16 step), also with
    /// the gradients written in gate's and up's place; mixed types are refused.
    #[test]
    fn gpu_swiglu_kernels_read_bf16_inputs() {
        let Some(gpu) = gpu() else {
            return;
        };
        let (rows, cols) = (37, 70);
        let len = rows * cols;
        let shape = (rows, cols, cols);
        let x: Vec<f32> = (0..len)
            .map(|i| ((i * 7919 % 1000) as f32 / 125.0 - 4.0) * (1.0 + (i % 3) as f32))
            .collect();
        let u: Vec<f32> = (0..len)
            .map(|i| ((i * 104729 % 997) as f32 / 300.0) - 1.6)
            .collect();
        let rounded =
            |v: &[f32]| -> Vec<f32> { v.iter().map(|&e| Bf16::from_f32(e).to_f32()).collect() };
        let (xs, us) = (gpu.upload(&x).unwrap(), gpu.upload(&u).unwrap());
        let (xr, ur) = (
            gpu.upload(&rounded(&x)).unwrap(),
            gpu.upload(&rounded(&u)).unwrap(),
        );
        let copy16 = |src: &Buf<f32>| gpu.bf16_copy(src.dev()).unwrap();
        let (gate, up, dg) = (copy16(&xs), copy16(&us), copy16(&us));
        let check = |name: &str, want: &Buf<f32>, got: &Buf<Bf16>| {
            let want = gpu.download(want, len).unwrap();
            let got = gpu.download(got, len).unwrap();
            for (i, (f, h)) in want.iter().zip(&got).enumerate() {
                assert!(
                    Bf16::from_f32(*f).0.abs_diff(h.0) <= 1,
                    "{name} [{i}]: {} for {f}",
                    h.to_f32()
                );
            }
        };
        // Forward.
        let (f, h) = (gpu.uninit(len).unwrap(), gpu.uninit_bf16(len).unwrap());
        gpu.swiglu(f.dev().into(), xr.dev(), ur.dev(), shape)
            .unwrap();
        gpu.swiglu(h.dev().into(), gate.dev(), up.dev(), shape)
            .unwrap();
        check("swiglu", &f, &h);
        let silu_up: Vec<f32> = rounded(&x)
            .iter()
            .zip(rounded(&u))
            .map(|(&x, u)| x / (1.0 + (-x).exp()) * u)
            .collect();
        for (i, (got, want)) in gpu
            .download(&f, len)
            .unwrap()
            .iter()
            .zip(&silu_up)
            .enumerate()
        {
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "[{i}]: {got} for {want}"
            );
        }
        // Backward: into new buffers, and in gate's and up's place.
        let (fg, fu) = (gpu.uninit(len).unwrap(), gpu.uninit(len).unwrap());
        let grads = (fg.dev().into(), fu.dev().into());
        gpu.swiglu_bwd(grads, xr.dev(), ur.dev(), ur.dev(), shape)
            .unwrap();
        let (hg, hu) = (gpu.uninit_bf16(len).unwrap(), gpu.uninit_bf16(len).unwrap());
        let grads = (hg.dev().into(), hu.dev().into());
        gpu.swiglu_bwd(grads, gate.dev(), up.dev(), dg.dev(), shape)
            .unwrap();
        check("swiglu_bwd dgate", &fg, &hg);
        check("swiglu_bwd dup", &fu, &hu);
        let grads = (gate.dev().into(), up.dev().into());
        gpu.swiglu_bwd(grads, gate.dev(), up.dev(), dg.dev(), shape)
            .unwrap();
        check("swiglu_bwd dgate in place", &fg, &gate);
        check("swiglu_bwd dup in place", &fu, &up);
        // gate and up as the halves of one stacked [rows, 2·cols] product (each row gate's, then
        // up's), read and written in place: the same bits as separate buffers.
        let (xh, uh) = (
            gpu.download(&copy16(&xs), len).unwrap(),
            gpu.download(&copy16(&us), len).unwrap(),
        );
        let stacked: Vec<Bf16> = (0..rows)
            .flat_map(|r| {
                xh[r * cols..(r + 1) * cols]
                    .iter()
                    .chain(&uh[r * cols..(r + 1) * cols])
            })
            .copied()
            .collect();
        let both = gpu.upload(&stacked).unwrap();
        let (sg, su) = (both.dev(), both.dev().at(cols).unwrap());
        let halves = (rows, cols, 2 * cols);
        let hs = gpu.uninit_bf16(len).unwrap();
        gpu.swiglu(hs.dev().into(), sg, su, halves).unwrap();
        let bits = |b: &Buf<Bf16>, n: usize| -> Vec<u16> {
            gpu.download(b, n).unwrap().iter().map(|v| v.0).collect()
        };
        assert_eq!(bits(&hs, len), bits(&h, len), "swiglu of the halves");
        gpu.swiglu_bwd((sg.into(), su.into()), sg, su, dg.dev(), halves)
            .unwrap();
        let got = bits(&both, 2 * len);
        let (want_g, want_u) = (bits(&gate, len), bits(&up, len));
        for r in 0..rows {
            let row = &got[r * 2 * cols..(r + 1) * 2 * cols];
            assert_eq!(
                row[..cols],
                want_g[r * cols..(r + 1) * cols],
                "dgate row {r}"
            );
            assert_eq!(row[cols..], want_u[r * cols..(r + 1) * cols], "dup row {r}");
        }
        // Halves closer than a row apart are refused.
        let e = gpu
            .swiglu(hs.dev().into(), sg, su, (rows, cols, cols - 1))
            .expect_err("overlapping rows")
            .to_string();
        assert!(e.contains("apart"), "{e}");
        // Mixed types.
        let refused = [
            gpu.swiglu(f.dev().into(), gate.dev(), up.dev(), shape),
            gpu.swiglu(h.dev().into(), gate.dev(), us.dev(), shape),
            gpu.swiglu_bwd(
                (fg.dev().into(), fu.dev().into()),
                gate.dev(),
                up.dev(),
                dg.dev(),
                shape,
            ),
            gpu.swiglu_bwd(
                (hg.dev().into(), hu.dev().into()),
                gate.dev(),
                up.dev(),
                us.dev(),
                shape,
            ),
            gpu.swiglu_bwd(
                (hg.dev().into(), fu.dev().into()),
                xs.dev(),
                us.dev(),
                us.dev(),
                shape,
            ),
        ];
        for (i, r) in refused.into_iter().enumerate() {
            let e = r.expect_err("mixed types").to_string();
            assert!(e.contains("bf16"), "case {i}: {e}");
        }
    }

    /// The rotary kernels: f32 in place against the rotation written out on the host; in place
    /// on bf16 (as a bf16 product writes q|k|v) and rotated into a new bf16 buffer (the backward
    /// pass's operand) give the f32 kernel's outputs rounded (within one bf16 step), the columns
    /// past the heads left alone or only rounded.
    #[test]
    fn gpu_rope_kernels_write_bf16() {
        let Some(gpu) = gpu() else {
            return;
        };
        let (n, t, heads, hd) = (37, 10, 3, 16);
        let ld = heads * hd + 24;
        let len = n * ld;
        let x: Vec<f32> = (0..len)
            .map(|i| ((i * 7919 % 1000) as f32 / 250.0 - 2.0) * (1.0 + (i % 3) as f32))
            .collect();
        let half = hd / 2;
        let table: Vec<f32> = (0..t * hd)
            .map(|i| {
                let (p, j) = (i / hd, i % half);
                let theta = p as f32 * 0.37f32.powi(j as i32);
                if i % hd < half {
                    theta.cos()
                } else {
                    theta.sin()
                }
            })
            .collect();
        let table_d = gpu.upload(&table).unwrap();
        let rounded: Vec<f32> = x.iter().map(|&v| Bf16::from_f32(v).to_f32()).collect();
        let shape = ((n, t), (heads, hd));
        // The rotation on the host, by +θ or −θ.
        let host = |x: &[f32], sign: f64| -> Vec<f32> {
            let mut out = x.to_vec();
            for r in 0..n {
                for h in 0..heads {
                    for j in 0..half {
                        let at = r * ld + h * hd;
                        let tr = &table[(r % t) * hd..];
                        let (co, si) = (tr[j] as f64, sign * tr[half + j] as f64);
                        let (a, b) = (x[at + j] as f64, x[at + half + j] as f64);
                        out[at + j] = (a * co - b * si) as f32;
                        out[at + half + j] = (b * co + a * si) as f32;
                    }
                }
            }
            out
        };
        for (inverse, sign) in [(false, 1.0), (true, -1.0)] {
            let f = gpu.upload(&rounded).unwrap();
            gpu.rope(f.dev(), ld, table_d.dev(), shape.0, shape.1, inverse)
                .unwrap();
            let want = gpu.download(&f, len).unwrap();
            for (i, (g, h)) in want.iter().zip(host(&rounded, sign)).enumerate() {
                assert!(
                    (g - h).abs() <= 1e-5 * h.abs().max(1.0),
                    "[{i}]: {g} for {h}"
                );
            }
            let within_a_step = |name: &str, got: &[Bf16]| {
                for (i, (f, h)) in want.iter().zip(got).enumerate() {
                    let step = Bf16::from_f32(*f).0.abs_diff(h.0);
                    // Past the heads: the input, rounded, exactly.
                    let bound = u16::from(i % ld < heads * hd);
                    assert!(step <= bound, "{name} [{i}]: {} for {f}", h.to_f32());
                }
            };
            // In place on bf16.
            let h = gpu.upload(
                &rounded
                    .iter()
                    .map(|&v| Bf16::from_f32(v))
                    .collect::<Vec<_>>(),
            );
            let h = h.unwrap();
            gpu.rope(h.dev(), ld, table_d.dev(), shape.0, shape.1, inverse)
                .unwrap();
            within_a_step("in place", &gpu.download(&h, len).unwrap());
            // Into a new bf16 buffer.
            let (src, out) = (gpu.upload(&rounded).unwrap(), gpu.uninit_bf16(len).unwrap());
            gpu.rope_to_bf16(
                out.dev(),
                src.dev(),
                ld,
                table_d.dev(),
                shape.0,
                shape.1,
                inverse,
            )
            .unwrap();
            within_a_step("into bf16", &gpu.download(&out, len).unwrap());
            assert_eq!(
                gpu.download(&src, len).unwrap(),
                rounded,
                "its input changed"
            );
        }
        let e = gpu
            .rope(
                table_d.dev(),
                ld,
                table_d.dev(),
                shape.0,
                (heads, hd + 1),
                false,
            )
            .expect_err("odd head size")
            .to_string();
        assert!(e.contains("heads"), "{e}");
    }

    /// The flash kernels' bf16 inputs: rows 16-byte aligned, all four inputs of one type, bf16
    /// products, o of the inputs' type; anything else is refused before a launch.
    #[test]
    fn gpu_flash_attention_refuses_misplaced_bf16_inputs() {
        let Some(mut gpu) = gpu() else {
            return;
        };
        gpu.bf16 = true;
        let s = AttnShape {
            b: 1,
            t: 5,
            heads: 1,
            kv_heads: 1,
            hd: 32,
        };
        let x16 = gpu.uninit_bf16(5 * 40).unwrap();
        let x = gpu.uninit(5 * 40).unwrap();
        let lse = gpu.uninit(5).unwrap();
        let err = |q: Rows, k: Rows, o: Rows, gpu: &Gpu| {
            gpu.flash_attention(s, (q, k, k), o, lse.dev(), 1.0)
                .unwrap_err()
                .to_string()
        };
        let good = rows(x16.dev(), 32);
        let out = rows(x.dev(), 32);
        // Rows 36 elements apart: 72 bytes, not a multiple of 16.
        assert!(err(rows(x16.dev(), 36), good, out, &gpu).contains("16-byte alignment"));
        // A row start 8 bytes off.
        let off = rows(x16.dev().at(4).unwrap(), 32);
        assert!(err(off, good, out, &gpu).contains("16-byte alignment"));
        assert!(err(good, out, out, &gpu).contains("all f32 or all bf16"));
        assert!(err(good, good, out, &gpu).contains("rows of the inputs' type"));
        gpu.bf16 = false;
        assert!(err(good, good, good, &gpu).contains("bf16 inputs need bf16 products"));
        gpu.bf16 = true;
        let (x, x16) = (rows(x.dev(), 32), rows(x16.dev(), 32));
        let e = gpu.flash_attention(s, (x, x, x), x16, lse.dev(), 1.0);
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("rows of the inputs' type"));
    }

    /// LMKIT_CUDA_TIMING=ops: each launch and product is timed under its kernel's name or its
    /// shape and precision, with the operations of products and attention and the bytes of
    /// products and the other kernels counted.
    #[test]
    fn gpu_ops_are_timed_by_name() {
        let Some(gpu) = gpu() else {
            return;
        };
        set_op_timing(true);
        take_op_times().unwrap();
        let a = gpu.upload(&[1.0f32; 6]).unwrap();
        let c = gpu.zeros::<f32>(4).unwrap();
        for _ in 0..2 {
            gpu.fill(c.dev(), 0.5, 4).unwrap();
        }
        let m = |d: Dev<f32>, ld| plain(d, ld);
        gpu.mm(
            (2, 2, 3),
            m(a.dev(), 3),
            m(a.dev(), 2),
            (c.dev(), 2),
            1.0,
            1.0,
            Batched::ONE,
        )
        .unwrap();
        // The flash kernels count their products' operations over the causal half.
        let mut tf32 = Gpu::of(&crate::testing::gpu_device().unwrap()).unwrap();
        tf32.tf32 = true;
        tf32.bf16 = false;
        let shape = Gpu::flash_check_shape(32);
        tf32.flash_check(shape).unwrap();
        set_op_timing(false);
        let ops = take_op_times().unwrap();
        // This thread's launches only (other tests launch on theirs).
        let of = |name: &str| ops.iter().find(|o| o.name == name);
        assert!(
            of("fill").is_some_and(|o| o.calls >= 2 && o.flops == 0.0),
            "{ops:?}"
        );
        // The product: a [2, 3] and b [3, 2] read, c [2, 2] read and written.
        let product = of("product 2x2x3 f32").expect("the product's entry");
        assert_eq!(product.flops, 24.0 * product.calls as f64);
        assert_eq!(
            product.bytes,
            (4 * (6 + 6) + 2 * 16) as f64 * product.calls as f64
        );
        let quarter = (2 * 77 * 77 * 32) as f64;
        for (kernel, products) in [("fwd", 2.0), ("bwd_dq", 3.0), ("bwd_dkdv", 4.0)] {
            let o = of(&format!("flash_{kernel}_32")).expect("a flash kernel's entry");
            assert_eq!(o.flops, products * quarter * o.calls as f64, "{o:?}");
        }
        assert!(ops.windows(2).all(|w| w[0].secs >= w[1].secs));
        // Each entry's time read back from its events.
        assert!(ops.iter().all(|o| o.secs > 0.0 && o.secs < 60.0), "{ops:?}");
        assert_eq!(gpu.download(&c, 4).unwrap(), vec![3.5; 4]);
    }

    /// A wrapper's arguments must match the kernel's parameters in number and type: the
    /// emulation checks (the driver would run the kernel with whatever it is given).
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn the_emulation_checks_launch_arguments() {
        let gpu = gpu().unwrap();
        let out = gpu.uninit(4).unwrap();
        assert!(gpu.download(&out, 4).unwrap().iter().all(|x| x.is_nan()));
        let p = Arg::P(out.dev().addr);
        let launch = |name: &str, args: &[Arg]| {
            gpu.launch_in(Module::Train, name, ((1, 1), 32, 0), args, Work::default())
                .map_err(|e| e.to_string())
        };
        launch("fill", &[p, Arg::F(1.5), Arg::L(4)]).unwrap();
        assert_eq!(gpu.download(&out, 4).unwrap(), vec![1.5; 4]);
        let wrong_type = launch("fill", &[p, Arg::F(1.5), Arg::I(4)]).unwrap_err();
        assert!(
            wrong_type.contains("not of its parameters' types"),
            "{wrong_type}"
        );
        let too_few = launch("fill", &[p, Arg::F(1.5)]).unwrap_err();
        assert!(too_few.contains("number of arguments"), "{too_few}");
        let unknown = launch("fil", &[p]).unwrap_err();
        assert!(unknown.contains("no kernel fil"), "{unknown}");
    }

    #[test]
    fn flash_rows_settings_are_64_or_128() {
        assert_eq!(flash_rows_setting(""), Some(64));
        assert_eq!(flash_rows_setting(" 64"), Some(64));
        assert_eq!(flash_rows_setting("128\n"), Some(128));
        assert_eq!(flash_rows_setting("256"), None);
        assert_eq!(flash_rows_setting("wide"), None);
    }

    /// The flash kernels (TF32 and bf16) on the GPU against the f64 reference: grouped-query
    /// heads, a length across two tiles and a partial one, one token, head sizes 32, 64 and 128,
    /// and the passes' run-time check.
    #[test]
    fn flash_attention_on_the_gpu_equals_the_f64_reference() {
        let Some(mut gpu) = gpu() else {
            return;
        };
        if gpu.compute_major().unwrap() < 8 {
            return;
        }
        let shapes = [
            (2, 100, 4, 2, 64),
            (1, 70, 2, 2, 128),
            (1, 33, 2, 1, 32),
            (1, 97, 3, 1, 128),
            (3, 1, 2, 1, 64),
        ]
        .map(|(b, t, heads, kv_heads, hd)| AttnShape {
            b,
            t,
            heads,
            kv_heads,
            hd,
        });
        let checks = [32, 64, 128].map(Gpu::flash_check_shape);
        // TF32; bf16 products on f32 inputs; bf16 inputs (cp.async tiles).
        let modes = [(false, false), (true, false), (true, true)];
        // The kernels with 64 rows (keys) a block and with 128 (two blocks of 16 a warp; 200
        // tokens: a full block, a partial one, and rows of one warp in both of its blocks).
        let wide = AttnShape {
            b: 1,
            t: 200,
            heads: 2,
            kv_heads: 1,
            hd: 64,
        };
        for rows in [64, 128] {
            gpu.flash_rows = rows;
            let extra = (rows == 128).then_some(wide);
            for (s, (bf16, inputs)) in shapes
                .into_iter()
                .chain(checks)
                .chain(extra)
                .flat_map(|s| modes.map(|m| (s, m)))
            {
                assert!(s.flash_fits(8));
                // The bf16 kernels with bf16 products.
                gpu.bf16 = bf16;
                let err = gpu.flash_check_inputs(s, inputs).unwrap();
                let tol = gpu.flash_tolerance();
                assert!(
                    err < tol,
                    "{s:?} (bf16 {bf16}, bf16 inputs {inputs}, {rows} rows): error {err}"
                );
            }
        }
    }
}
