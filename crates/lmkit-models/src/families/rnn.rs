//! Recurrent language models: Elman RNN (tanh) and LSTM (Hochreiter & Schmidhuber 1997), several
//! layers, tensors laid out as PyTorch's `nn.RNN` / `nn.LSTM` (`weight_ih_l{k}` [gates·H, in],
//! `weight_hh_l{k}` [gates·H, H], `bias_ih_l{k}`, `bias_hh_l{k}`; LSTM gates in the order input,
//! forget, cell, output); output layer `lm_head.weight` without bias. The state carried between calls lives in the [`KvCache`].

use super::{FamilyConfig, Kind, ParamRole, SpecialIds, TokenIdFields};
use crate::layers::kv_cache::KvCache;
use crate::layers::linear::Linear;
use crate::registry::ModelConfig;
use candle_core::{Module, Tensor, D};
use candle_nn::{embedding, Embedding, VarBuilder};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};

fn rnn_context() -> usize {
    1024
}

/// The recurrent cell of an [`RnnConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cell {
    /// Elman RNN: h' = tanh(W_ih x + b_ih + W_hh h + b_hh)
    Rnn,
    /// LSTM with PyTorch's gate order (input, forget, cell, output)
    Lstm,
}

/// lmkit's recurrent language model (`model_type` "lmkit_rnn"): embedding → multi-layer RNN or
/// LSTM (tensors named as in PyTorch's `nn.RNN` / `nn.LSTM` under `rnn.`) → output layer.
/// transformers has no such class; the layout loads into plain PyTorch modules.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RnnConfig {
    pub model_type: String,
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub torch_dtype: Option<String>,
    pub cell: Cell,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the token embeddings (default: hidden_size).
    #[serde(default)]
    pub embedding_size: Option<usize>,
    pub num_layers: usize,
    /// Dropout between layers and before the output layer, in training only.
    #[serde(default)]
    pub dropout: f64,
    /// Output layer = embedding matrix (needs embedding_size == hidden_size).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Longest text read at once in evaluation and generation (the state carries no limit).
    #[serde(default = "rnn_context")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

impl RnnConfig {
    pub fn embedding_size(&self) -> usize {
        self.embedding_size.unwrap_or(self.hidden_size)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        super::require_positive(&[
            ("vocab_size", self.vocab_size),
            ("embedding_size", self.embedding_size()),
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("max_position_embeddings", self.max_position_embeddings),
        ])?;
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout ({}) must be in [0, 1)", self.dropout));
        }
        if self.tie_word_embeddings && self.embedding_size() != self.hidden_size {
            return Err(format!(
                "tie_word_embeddings needs embedding_size ({}) == hidden_size ({})",
                self.embedding_size(),
                self.hidden_size
            ));
        }
        Ok(())
    }
}

impl FamilyConfig for RnnConfig {
    const MODEL_TYPE: &'static str = "lmkit_rnn";
    const ARCHITECTURE: &'static str = "LmkitRnnForCausalLM";
    const KIND: Kind = Kind::Causal;

    fn validate(&self) -> std::result::Result<(), String> {
        RnnConfig::validate(self)
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn max_positions(&self) -> usize {
        self.max_position_embeddings
    }
    fn width(&self) -> usize {
        self.hidden_size.max(self.embedding_size())
    }
    fn num_layers(&self) -> usize {
        self.num_layers
    }
    fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }
    fn token_id_fields(ids: SpecialIds) -> TokenIdFields {
        super::decoder_token_ids(ids)
    }
    fn num_parameters(&self) -> u64 {
        let (v, h, e) = (
            self.vocab_size as f64,
            self.hidden_size as f64,
            self.embedding_size() as f64,
        );
        let gates = match self.cell {
            Cell::Rnn => 1.0,
            Cell::Lstm => 4.0,
        };
        // The first layer reads the embeddings, the others the layer below.
        let layer = |input: f64| gates * h * (input + h) + 2.0 * gates * h;
        let layers = if self.num_layers == 0 {
            0.0
        } else {
            layer(e) + (self.num_layers - 1) as f64 * layer(h)
        };
        let head = if self.tie_word_embeddings { 0.0 } else { v * h };
        super::count(v * e + layers + head)
    }
    fn param_role(&self, name: &str) -> ParamRole {
        if let Some(rest) = name.strip_prefix("rnn.") {
            ParamRole::Recurrent {
                hidden: self.hidden_size,
                bias: rest.starts_with("bias_"),
            }
        } else if name.ends_with("bias") {
            ParamRole::Bias
        } else if name.starts_with("embedding.") {
            ParamRole::Embedding
        } else {
            ParamRole::Weight
        }
    }
    fn into_model_config(self) -> ModelConfig {
        ModelConfig::Rnn(self)
    }
}

struct Layer {
    w_ih: Tensor,
    w_hh: Tensor,
    // Kept apart (not pre-summed): the optimizer updates each variable in place.
    b_ih: Tensor,
    b_hh: Tensor,
}

/// A layer's weights (PyTorch's layout: `weight_ih` [gates·hidden, input], `weight_hh`
/// [gates·hidden, hidden], two biases).
pub struct LayerParts<'a> {
    pub w_ih: &'a Tensor,
    pub w_hh: &'a Tensor,
    pub b_ih: &'a Tensor,
    pub b_hh: &'a Tensor,
}

/// The model's parts as a training pass reads them (see [`RnnLm::parts`]).
pub struct Parts<'a> {
    pub embedding: &'a Tensor,
    pub layers: Vec<LayerParts<'a>>,
    /// The output layer [vocab, hidden] (the embedding when tied).
    pub lm_head: &'a Tensor,
    pub lstm: bool,
    pub hidden: usize,
    /// The dropout in force (0 when not training).
    pub dropout: f64,
}

pub struct RnnLm {
    embedding: Embedding,
    layers: Vec<Layer>,
    lm_head: Linear,
    hidden: usize,
    cell: Cell,
    dropout: f64,
    training: AtomicBool,
    pub cfg: RnnConfig,
}

impl RnnLm {
    pub fn new(cfg: &RnnConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let gates = match cfg.cell {
            Cell::Rnn => 1,
            Cell::Lstm => 4,
        };
        let embedding = embedding(cfg.vocab_size, cfg.embedding_size(), vb.pp("embedding"))?;
        let r = vb.pp("rnn");
        let layers = (0..cfg.num_layers)
            .map(|k| {
                let input = if k == 0 { cfg.embedding_size() } else { h };
                Ok(Layer {
                    w_ih: r.get((gates * h, input), &format!("weight_ih_l{k}"))?,
                    w_hh: r.get((gates * h, h), &format!("weight_hh_l{k}"))?,
                    b_ih: r.get(gates * h, &format!("bias_ih_l{k}"))?,
                    b_hh: r.get(gates * h, &format!("bias_hh_l{k}"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            embedding.embeddings().clone()
        } else {
            vb.get((cfg.vocab_size, h), "lm_head.weight")?
        };
        let lm_head = Linear::from_weight(lm_head, None, "lm_head")?;
        Ok(RnnLm {
            embedding,
            layers,
            lm_head,
            hidden: h,
            cell: cfg.cell,
            dropout: cfg.dropout,
            training: AtomicBool::new(false),
            cfg: cfg.clone(),
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The parts a hand-written training pass reads.
    pub fn parts(&self) -> Parts<'_> {
        Parts {
            embedding: self.embedding.embeddings(),
            layers: self
                .layers
                .iter()
                .map(|l| LayerParts {
                    w_ih: &l.w_ih,
                    w_hh: &l.w_hh,
                    b_ih: &l.b_ih,
                    b_hh: &l.b_hh,
                })
                .collect(),
            lm_head: self.lm_head.weight(),
            lstm: matches!(self.cell, Cell::Lstm),
            hidden: self.hidden,
            dropout: if self.training.load(Ordering::Relaxed) {
                self.dropout
            } else {
                0.0
            },
        }
    }

    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.weight()
    }

    /// The output layer (logits = hidden states through it).
    pub fn output(&self) -> &Linear {
        &self.lm_head
    }

    /// Dropout is applied only while training.
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    fn drop(&self, x: Tensor) -> candle_core::Result<Tensor> {
        if self.dropout > 0.0 && self.training.load(Ordering::Relaxed) {
            candle_nn::ops::dropout(&x, self.dropout as f32)
        } else {
            Ok(x)
        }
    }

    /// The starting state of `layer` for the batch: each cache's saved state, zeros where none.
    fn initial(
        &self,
        caches: &[&mut KvCache],
        layer: usize,
        b: usize,
        like: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let zeros = |rows: usize| Tensor::zeros((rows, self.hidden), like.dtype(), like.device());
        let rows = if caches.len() == 1 { b } else { 1 };
        let mut hs = Vec::with_capacity(caches.len());
        let mut cs = Vec::with_capacity(caches.len());
        for c in caches {
            match &c.recurrent[layer] {
                Some((h, c)) => {
                    hs.push(h.clone());
                    cs.push(match c {
                        Some(c) => c.clone(),
                        None => zeros(rows)?,
                    });
                }
                None => {
                    hs.push(zeros(rows)?);
                    cs.push(zeros(rows)?);
                }
            }
        }
        Ok((Tensor::cat(&hs, 0)?, Tensor::cat(&cs, 0)?))
    }

    /// Every step's hidden state [b, t, hidden] of `layer` over its input projections `pre`
    /// [b, t, gates·hidden] from the state (h, c), and the last step's (h, c).
    fn recur(
        &self,
        layer: &Layer,
        pre: &Tensor,
        mut h: Tensor,
        mut c: Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let h4 = self.hidden;
        let (kernel_cell, state0) = match self.cell {
            Cell::Rnn => (lmkit_kernels::recurrent::Cell::Tanh, h.clone()),
            Cell::Lstm => (
                lmkit_kernels::recurrent::Cell::Lstm,
                Tensor::cat(&[&h, &c], 1)?,
            ),
        };
        // The whole window as one op where it applies (CPU f32/f64 with BLAS, steps to run).
        if let Some(states) =
            lmkit_kernels::recurrent::sequence(kernel_cell, pre, &layer.w_hh, &state0)?
        {
            let t = states.dim(1)?;
            let last = states.narrow(1, t - 1, 1)?.squeeze(1)?;
            return Ok(match self.cell {
                Cell::Rnn => (states, last, c),
                Cell::Lstm => (
                    states.narrow(2, 0, h4)?,
                    last.narrow(1, 0, h4)?,
                    last.narrow(1, h4, h4)?,
                ),
            });
        }
        // Elsewhere step by step in composed ops.
        let w_hh = layer.w_hh.t()?;
        let t = pre.dim(1)?;
        let mut outs = Vec::with_capacity(t);
        for s in 0..t {
            let g = (pre.narrow(1, s, 1)?.squeeze(1)? + lmkit_kernels::blas::matmul(&h, &w_hh)?)?;
            match self.cell {
                Cell::Rnn => h = g.tanh()?,
                Cell::Lstm => {
                    let gate = |i: usize| g.narrow(D::Minus1, i * h4, h4);
                    let i = candle_nn::ops::sigmoid(&gate(0)?)?;
                    let f = candle_nn::ops::sigmoid(&gate(1)?)?;
                    let gg = gate(2)?.tanh()?;
                    let o = candle_nn::ops::sigmoid(&gate(3)?)?;
                    c = ((f * &c)? + (i * gg)?)?;
                    h = (o * c.tanh()?)?;
                }
            }
            outs.push(h.clone());
        }
        Ok((Tensor::stack(&outs, 1)?, h, c))
    }

    /// Final hidden states [batch, t, hidden] for `ids` [batch, t], continuing from the state in
    /// the cache (one cache for the batch, or one per row).
    pub fn hidden(&self, ids: &Tensor, caches: &mut [&mut KvCache]) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if caches.len() != 1 && caches.len() != b {
            candle_core::bail!("{} caches for a batch of {b} rows", caches.len());
        }
        let mut x = self.embedding.forward(ids)?;
        for (k, layer) in self.layers.iter().enumerate() {
            if k > 0 {
                x = self.drop(x)?;
            }
            // Input projections of all steps at once; only the recurrence runs step by step.
            // Both biases in the product's one node (their sum is a [gates·H] vector).
            let bias = (&layer.b_ih + &layer.b_hh)?;
            let pre = lmkit_kernels::blas::linear(&x, &layer.w_ih.t()?, Some(&bias))?;
            let (h0, c0) = self.initial(caches, k, b, &x)?;
            let (out, h, c) = self.recur(layer, &pre, h0, c0)?;
            // Save the state: for the whole batch, or row by row.
            let cell = matches!(self.cell, Cell::Lstm);
            if let [cache] = caches {
                cache.recurrent[k] = Some((h.detach(), cell.then(|| c.detach())));
            } else {
                for (r, cache) in caches.iter_mut().enumerate() {
                    cache.recurrent[k] = Some((
                        h.narrow(0, r, 1)?.detach(),
                        if cell {
                            Some(c.narrow(0, r, 1)?.detach())
                        } else {
                            None
                        },
                    ));
                }
            }
            x = out;
        }
        for c in caches.iter_mut() {
            c.advance(t);
        }
        self.drop(x)
    }
}
