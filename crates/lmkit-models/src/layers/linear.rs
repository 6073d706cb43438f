//! The one linear layer every family uses: y = x·Wᵀ + b, whatever the layout its checkpoint
//! stores W in. Products go through [`lmkit_kernels::blas::linear`] (one fused BLAS node with the
//! bias on the CPU). Each layer knows its tensor path (`model.layers.0.self_attn.q_proj`), the key
//! under which adapters and quantized weights are looked up.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

/// How the weight is stored.
#[derive(Clone, Debug)]
enum Weight {
    /// [out, in], as PyTorch's `nn.Linear` (and output layers tied to an embedding).
    Dense(Tensor),
    /// [in, out], as transformers' `Conv1D` (GPT-2).
    Transposed(Tensor),
}

#[derive(Clone, Debug)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    path: String,
}

impl Linear {
    /// `nn.Linear` layout: `weight` [out, in] (and `bias` [out]) under `vb`, created with
    /// candle-nn's initialisation.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let path = vb.prefix();
        let l = candle_nn::linear_b(in_dim, out_dim, bias, vb)?;
        Ok(Linear {
            weight: Weight::Dense(l.weight().clone()),
            bias: l.bias().cloned(),
            path,
        })
    }

    /// transformers' `Conv1D` layout: `weight` [in, out] and `bias` [out] under `vb`.
    pub fn conv1d(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Linear {
            weight: Weight::Transposed(vb.get((in_dim, out_dim), "weight")?),
            bias: Some(vb.get(out_dim, "bias")?),
            path: vb.prefix(),
        })
    }

    /// A layer over an existing [out, in] weight (an output layer tied to the token embeddings,
    /// or one stored under a name of its own), with an optional bias.
    pub fn from_weight(weight: Tensor, bias: Option<Tensor>, path: &str) -> Self {
        Linear {
            weight: Weight::Dense(weight),
            bias,
            path: path.to_string(),
        }
    }

    /// The weight as stored ([out, in] dense, [in, out] for Conv1D).
    pub fn weight(&self) -> &Tensor {
        match &self.weight {
            Weight::Dense(w) | Weight::Transposed(w) => w,
        }
    }

    /// The weight as [out, in], whatever the storage (a transposed view for Conv1D).
    pub fn weight_out_in(&self) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Transposed(w) => w.t(),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The tensor path of the layer in its checkpoint.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w_in_out = match &self.weight {
            Weight::Dense(w) => w.t()?,
            Weight::Transposed(w) => w.clone(),
        };
        lmkit_kernels::blas::linear(x, &w_in_out, self.bias.as_ref())
    }
}

/// A [`Linear`] in `nn.Linear` layout with or without bias.
pub fn linear_b(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    Linear::new(in_dim, out_dim, bias, vb)
}

/// A [`Linear`] in `nn.Linear` layout with bias.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    Linear::new(in_dim, out_dim, true, vb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn both_layouts_compute_the_same_product() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
        let dense = Linear::new(3, 4, true, vb.pp("a")).unwrap();
        assert_eq!(dense.path(), "a");
        let w = lmkit_kernels::testing::randn(0f64, 1.0, (3, 4), &dev).unwrap();
        let b = lmkit_kernels::testing::randn(0f64, 1.0, 4, &dev).unwrap();
        let conv = Linear {
            weight: Weight::Transposed(w.clone()),
            bias: Some(b.clone()),
            path: "c".into(),
        };
        let same = Linear::from_weight(w.t().unwrap().contiguous().unwrap(), Some(b), "d");
        let x = lmkit_kernels::testing::randn(0f64, 1.0, (2, 5, 3), &dev).unwrap();
        let (y1, y2) = (conv.forward(&x).unwrap(), same.forward(&x).unwrap());
        let d = (y1 - y2).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f64>().unwrap() < 1e-12);
        assert_eq!(conv.weight_out_in().unwrap().dims(), [4, 3]);
        assert_eq!(dense.forward(&x).unwrap().dims(), [2, 5, 4]);
    }
}
