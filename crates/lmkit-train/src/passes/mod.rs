//! Hand-written training passes: forward, loss and backward of a whole model over plain
//! buffers, without candle's autograd graph. Each is checked against the graph's gradients in its
//! tests; [`for_model`] picks the one for a model (or none: the graph is differentiated).

pub mod gpt2;
#[cfg(feature = "cuda")]
mod gpt2_cuda;
pub mod llama;

use candle_core::Tensor;
use lmkit_models::CausalLm;
use serde::{Deserialize, Serialize};

/// The mean next-token cross-entropy of a batch and the gradient of every parameter tensor.
pub struct LossAndGrads {
    pub loss: f64,
    /// (parameter, gradient) pairs; a tied output layer's gradient is in the embedding's.
    pub grads: Vec<(Tensor, Tensor)>,
}

/// A model's training pass.
pub trait TrainPass {
    /// The mean next-token cross-entropy of `ids` → `targets` (both [batch, seq], u32) and every
    /// parameter's gradient times `scale`; `None` where the pass does not apply to these tensors
    /// (device, dtype, no BLAS), and the caller differentiates the graph instead.
    fn loss_and_grads(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        scale: f64,
    ) -> candle_core::Result<Option<LossAndGrads>>;
}

/// How gradients are computed (`train.backward`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backward {
    /// A hand-written pass where the model has one, the autograd graph elsewhere.
    #[default]
    Auto,
    /// Always candle's autograd graph (to check or compare the hand-written passes).
    Autograd,
}

/// The hand-written pass for `model`, if it has one and `backward` allows it.
pub fn for_model(model: &CausalLm, backward: Backward) -> Option<Box<dyn TrainPass + '_>> {
    match (backward, model) {
        (Backward::Auto, CausalLm::Gpt2(m)) => Some(Box::new(gpt2::Gpt2Pass(m))),
        (Backward::Auto, CausalLm::Llama(m)) => Some(Box::new(llama::LlamaPass(m))),
        _ => None,
    }
}
