//! Differentiable building blocks. candle-nn's fused softmax, layer norm, RMS norm and rotary
//! kernels are applied without a backward pass (`apply_op*_no_bwd`): gradients silently stop at
//! them. These versions take lmkit's fused kernels (with backward passes) on the CPU and are
//! composed of basic tensor ops elsewhere, so autograd flows through; only on a GPU where nothing
//! tracks gradients (inference) do the norms and the softmax take candle-nn's kernels. The
//! gradient-check test (tests/gradients.rs) holds them to finite differences.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

pub use lmkit_kernels::fused::{gelu_tanh, softmax_last_dim, swiglu, target_log_probs};

/// LayerNorm (Ba et al. 2016): (x - mean) / sqrt(var + eps) · weight + bias over the last dim.
pub struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) eps: f64,
}

impl LayerNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(LayerNorm {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(y) = lmkit_kernels::fused::layer_norm(x, &self.weight, &self.bias, self.eps)? {
            return Ok(y);
        }
        let dtype = x.dtype();
        let x = x.to_dtype(compute_dtype(dtype))?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        y.to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x²) + eps) · weight over the last dim.
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(RmsNorm {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    /// A norm over an existing gain vector.
    pub fn from_weight(weight: Tensor, eps: f64) -> Self {
        RmsNorm { weight, eps }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(y) = lmkit_kernels::fused::rms_norm(x, &self.weight, self.eps)? {
            return Ok(y);
        }
        let dtype = x.dtype();
        let x = x.to_dtype(compute_dtype(dtype))?;
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)
    }
}

/// The activation functions of transformers' `ACT2FN` that lmkit computes.
pub const ACTIVATIONS: &[&str] = &[
    "gelu",
    "gelu_new",
    "gelu_pytorch_tanh",
    "gelu_fast",
    "relu",
    "silu",
];

/// `Err` naming `field` when `name` is not one of [`ACTIVATIONS`].
pub fn check_activation(field: &str, name: &str) -> Result<(), String> {
    if ACTIVATIONS.contains(&name) {
        Ok(())
    } else {
        Err(format!(
            "{field} `{name}` is not supported ({})",
            ACTIVATIONS.join(", ")
        ))
    }
}

/// The activation transformers names `name` (checked by [`check_activation`] when the config
/// was read): `gelu` is the exact (erf) one; `gelu_new`, `gelu_pytorch_tanh` and `gelu_fast` are
/// the tanh approximation.
pub fn activation(name: &str, x: &Tensor) -> candle_core::Result<Tensor> {
    match name {
        "gelu" => lmkit_kernels::fused::gelu_erf(x),
        "relu" => x.relu(),
        "silu" => candle_nn::ops::silu(x),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => gelu_tanh(x),
        other => candle_core::bail!("activation `{other}` is not supported"),
    }
}

/// [`activation`] of a tensor the caller owns alone (a layer's fresh output, for inference):
/// the exact GELU is written over it instead of into a new buffer where that applies.
pub fn activation_owned(name: &str, x: Tensor) -> candle_core::Result<Tensor> {
    if name == "gelu" && lmkit_kernels::fused::gelu_erf_in_place(&x)? {
        return Ok(x);
    }
    activation(name, &x)
}

/// Norms, and a half-precision model's attention scores and logits, compute in f32, or in f64
/// for f64 inputs.
pub(crate) fn compute_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Rotary embedding in the "rotate half" layout (transformers' Llama): x·cos + rotate_half(x)·sin
/// with x [b, h, t, d] and cos/sin [t, d/2].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(y) = lmkit_kernels::fused::rope(x, cos, sin)? {
        return Ok(y);
    }
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}
