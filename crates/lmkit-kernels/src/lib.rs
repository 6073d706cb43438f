//! lmkit's compute kernels, and the only crate of the workspace with `unsafe` code (besides one
//! read-only memory map in `lmkit-core`).
//!
//! - [`blas`]: matrix products through a BLAS library opened at run time (OpenBLAS, MKL, BLIS),
//!   with the built-in product ([`gemm`]) as the fallback, and the fused attention products built
//!   on them.
//! - [`gemm`]: the built-in f32/f64 matrix product (packed panels, AVX-512/AVX2 micro-kernels),
//!   used when no BLAS library is installed.
//! - [`fused`]: elementwise and row-wise kernels (softmax, GELU, layer/RMS norm, rope, bias,
//!   cross-entropy) as slice-level forward/backward pairs, compiled per SIMD level and chosen at
//!   run time ([`simd`]), wrapped as candle custom ops with analytic backward passes.
//! - [`half_weights`], [`half_ops`]: products, element-wise and row-wise kernels for models
//!   loaded in bf16 or f16 on the CPU, computed in f32 and rounded once.
//! - [`padded_attention`]: encoder self-attention over a padded batch, each sequence over its
//!   own tokens (inference).
//! - [`quant`]: products with block-quantized (GGUF) weights where candle has no vector kernel;
//!   [`quant_dots`]: the 8-bit dot products of the other GGUF types (Q4_0, Q5_0/1, Q4_K–Q6_K).
//! - [`adamw`]: the in-place AdamW update and the gradient norm.
//! - [`buffers`]: uninitialised-buffer helpers for passes that write every element.
//! - [`causal`]: causal attention and its gradients in f64, the reference the flash kernels are
//!   checked against.
//! - `cuda` (feature `cuda`): device buffers, cuBLAS products and the CUDA kernels of the
//!   hand-written training passes (feature `cuda-emu`: the same on an emulated GPU, for tests).
//! - [`nccl`]: NVIDIA's collective library opened at run time (data-parallel GPU training).
//! - [`sampling`]: the vocabulary-wide loops of drawing a token (rank keys, exp weights).
//! - [`vector`]: dot products of f32 vectors (one query against many rows) for vector search.
//! - [`system`]: process-level set-up (allocator tuning) and memory-mapped weights.
//! - [`team`]: a few threads that poll between the short parallel loops of a decoding step.
//!
//! Each kernel runs on CPU f32/f64 tensors and reports "not mine" (or falls back to composed
//! candle ops) for other devices and dtypes, so models stay device-agnostic. Every `unsafe`
//! block carries a `SAFETY` note; raw product entry points check operand extents first.

pub mod adamw;
pub mod amx;
pub mod attend;
pub mod blas;
pub mod buffers;
pub mod causal;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
pub mod cuda;
pub mod few_rows;
pub mod fused;
pub mod gemm;
pub mod half_ops;
pub mod half_weights;
pub mod interleaved;
pub mod nccl;
pub mod padded_attention;
pub mod quant;
pub mod quant_dots;
pub mod recurrent;
pub mod sampling;
pub mod simd;
pub mod system;
pub mod team;
pub mod vector;

#[doc(hidden)]
pub mod testing;
