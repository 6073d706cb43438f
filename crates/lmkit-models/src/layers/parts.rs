//! Post-norm Transformer layers (BERT's and BART's) as the hand-written training passes read
//! them: the layers' own linear layers and norms, borrowed.

use super::linear::Linear;
use super::ops::LayerNorm;

/// An attention block's projections as a training pass reads them.
pub struct AttentionParts<'a> {
    pub q: &'a Linear,
    pub k: &'a Linear,
    pub v: &'a Linear,
    pub out: &'a Linear,
    pub heads: usize,
}

/// A post-norm layer's parts: self-attention and its norm, cross-attention and its norm
/// (encoder-decoder decoder layers),
/// the feed-forward block and its norm (post-norm: each norm follows its residual add).
pub struct LayerParts<'a> {
    pub self_attn: AttentionParts<'a>,
    pub self_norm: &'a LayerNorm,
    pub cross: Option<(AttentionParts<'a>, &'a LayerNorm)>,
    pub fc1: &'a Linear,
    pub fc2: &'a Linear,
    pub final_norm: &'a LayerNorm,
}
