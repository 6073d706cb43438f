//! GPT-2 (Radford et al. 2019): learned positions, pre-norm LayerNorm, GELU MLP, tied embeddings.
//! Tensors are named and shaped as in transformers' `GPT2LMHeadModel` (its `Conv1D` layers store
//! weights as [in, out]).

use super::{FamilyConfig, Kind, ParamRole, SpecialIds, TokenIdFields};
use crate::layers::kv_cache::KvCache;
use crate::layers::linear::Linear;
use crate::layers::ops::LayerNorm;
use crate::registry::ModelConfig;
use candle_core::{Module, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

fn default_true() -> bool {
    true
}
fn gpt2_eps() -> f64 {
    1e-5
}
fn gelu_new() -> String {
    "gelu_new".into()
}

/// `GPT2LMHeadModel` (transformers `GPT2Config`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// MLP width; `None` means 4·n_embd.
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "gelu_new")]
    pub activation_function: String,
    #[serde(default = "gpt2_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    #[serde(with = "super::one_or_first")]
    pub eos_token_id: Option<u32>,
}

impl Gpt2Config {
    pub fn n_inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!(
                "n_embd ({}) must be a multiple of n_head ({})",
                self.n_embd, self.n_head
            ));
        }
        super::require_positive(&[
            ("vocab_size", self.vocab_size),
            ("n_embd", self.n_embd),
            ("n_inner", self.n_inner()),
            ("n_positions", self.n_positions),
            ("n_layer", self.n_layer),
        ])?;
        crate::layers::ops::check_activation("activation_function", &self.activation_function)
    }
}

impl FamilyConfig for Gpt2Config {
    const MODEL_TYPE: &'static str = "gpt2";
    const ARCHITECTURE: &'static str = "GPT2LMHeadModel";
    const KIND: Kind = Kind::Causal;

    fn validate(&self) -> std::result::Result<(), String> {
        Gpt2Config::validate(self)
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn max_positions(&self) -> usize {
        self.n_positions
    }
    fn width(&self) -> usize {
        self.n_embd
    }
    fn num_layers(&self) -> usize {
        self.n_layer
    }
    fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }
    fn token_id_fields(ids: SpecialIds) -> TokenIdFields {
        super::decoder_token_ids(ids)
    }
    fn num_parameters(&self) -> u64 {
        let (v, p, c, i) = (
            self.vocab_size as f64,
            self.n_positions as f64,
            self.n_embd as f64,
            self.n_inner() as f64,
        );
        let block = 4.0 * c + (c * 3.0 * c + 3.0 * c) + (c * c + c) + (c * i + i) + (i * c + c);
        let head = if self.tie_word_embeddings { 0.0 } else { v * c };
        super::count(v * c + p * c + self.n_layer as f64 * block + 2.0 * c + head)
    }
    fn param_role(&self, name: &str) -> ParamRole {
        if name.ends_with("bias") {
            ParamRole::Bias
        } else if name.contains(".ln_") {
            ParamRole::NormGain
        } else if name.contains(".wte.") || name.contains(".wpe.") {
            ParamRole::Embedding
        } else if name.ends_with("c_proj.weight") {
            ParamRole::ResidualOut
        } else {
            ParamRole::Weight
        }
    }
    fn into_model_config(self) -> ModelConfig {
        ModelConfig::Gpt2(self)
    }
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
    n_head: usize,
    act: String,
}

impl Block {
    fn new(cfg: &Gpt2Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let e = cfg.n_embd;
        let eps = cfg.layer_norm_epsilon;
        Ok(Block {
            ln_1: LayerNorm::new(e, eps, vb.pp("ln_1"))?,
            c_attn: Linear::conv1d(e, 3 * e, vb.pp("attn.c_attn"))?,
            attn_proj: Linear::conv1d(e, e, vb.pp("attn.c_proj"))?,
            ln_2: LayerNorm::new(e, eps, vb.pp("ln_2"))?,
            c_fc: Linear::conv1d(e, cfg.n_inner(), vb.pp("mlp.c_fc"))?,
            mlp_proj: Linear::conv1d(cfg.n_inner(), e, vb.pp("mlp.c_proj"))?,
            n_head: cfg.n_head,
            act: cfg.activation_function.clone(),
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let (b, t, e) = x.dims3()?;
        let hd = e / self.n_head;
        let qkv = self.c_attn.forward(&self.ln_1.forward(x)?)?;
        if let [cache] = caches {
            // (A packed pass attends sequence by sequence, below.)
            if cache.discards_kv() && cache.segments().is_none() {
                if let Some(y) = lmkit_kernels::blas::causal_self_attention(&qkv, self.n_head)? {
                    return self.mlp(&residual(&self.attn_proj, &y, x)?);
                }
            }
        }
        // Views of the packed projection on a GPU, whose cache attention reads the heads in
        // place (three copies a layer fewer); copies on the CPU, whose attention wants them.
        // The rows split into heads first, then narrowed: a view of q|k|v's heads for any
        // number of rows (narrowed first, several rows would be copied by the reshape, and on
        // a GPU each such copy also uploads its strides).
        let views = crate::layers::attention::takes_head_views(x);
        let heads = qkv.reshape((b, t, 3 * self.n_head, hd))?;
        let split = |i: usize| -> candle_core::Result<Tensor> {
            let heads = heads
                .narrow(2, i * self.n_head, self.n_head)?
                .transpose(1, 2)?;
            if views {
                Ok(heads)
            } else {
                heads.contiguous()
            }
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let y = crate::layers::attention::attend_rows(&q, &k, &v, caches, layer, None)?;
        let y = y.transpose(1, 2)?.reshape((b, t, e))?;
        self.mlp(&residual(&self.attn_proj, &y, x)?)
    }

    /// x + MLP(LayerNorm(x)).
    fn mlp(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.c_fc.forward(&self.ln_2.forward(x)?)?;
        let h = crate::layers::ops::activation(&self.act, &h)?;
        residual(&self.mlp_proj, &h, x)
    }
}

/// `x + layer(h)`: on a GPU one product whose epilogue adds the bias and x
/// ([`Linear::forward_add`]); on the CPU the layer's output and then the sum, as GPT-2 and
/// GPT-NeoX have always computed it there (the CPU's fused form accumulates the product into x,
/// which rounds differently).
pub(crate) fn residual(layer: &Linear, h: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() {
        let y = layer.forward(h)?;
        match lmkit_kernels::half_ops::add(x, &y)? {
            Some(sum) => Ok(sum),
            None => x + y,
        }
    } else {
        layer.forward_add(h, x)
    }
}

/// GPT-2's parameters by name, in one fixed order ([`Gpt2Params::into_vec`]): what a
/// hand-written training pass reads (`P` = tensors or their data) and writes (gradients).
#[derive(Clone, Debug, Default)]
pub struct Gpt2Params<P> {
    pub wte: P,
    pub wpe: P,
    pub blocks: Vec<Gpt2BlockParams<P>>,
    pub ln_f_w: P,
    pub ln_f_b: P,
    /// The output layer; `None` when it is the token embedding (tied).
    pub lm_head: Option<P>,
}

/// One block's parameters: `c_attn` (packed q|k|v), `attn_proj` (`attn.c_proj`), `c_fc` and
/// `mlp_proj` (`mlp.c_proj`) in transformers' Conv1D layout ([in, out]).
#[derive(Clone, Debug, Default)]
pub struct Gpt2BlockParams<P> {
    pub ln_1_w: P,
    pub ln_1_b: P,
    pub c_attn_w: P,
    pub c_attn_b: P,
    pub attn_proj_w: P,
    pub attn_proj_b: P,
    pub ln_2_w: P,
    pub ln_2_b: P,
    pub c_fc_w: P,
    pub c_fc_b: P,
    pub mlp_proj_w: P,
    pub mlp_proj_b: P,
}

impl<P> Gpt2BlockParams<P> {
    fn into_vec(self) -> [P; 12] {
        [
            self.ln_1_w,
            self.ln_1_b,
            self.c_attn_w,
            self.c_attn_b,
            self.attn_proj_w,
            self.attn_proj_b,
            self.ln_2_w,
            self.ln_2_b,
            self.c_fc_w,
            self.c_fc_b,
            self.mlp_proj_w,
            self.mlp_proj_b,
        ]
    }

    fn try_map<Q, E>(self, f: &mut impl FnMut(P) -> Result<Q, E>) -> Result<Gpt2BlockParams<Q>, E> {
        Ok(Gpt2BlockParams {
            ln_1_w: f(self.ln_1_w)?,
            ln_1_b: f(self.ln_1_b)?,
            c_attn_w: f(self.c_attn_w)?,
            c_attn_b: f(self.c_attn_b)?,
            attn_proj_w: f(self.attn_proj_w)?,
            attn_proj_b: f(self.attn_proj_b)?,
            ln_2_w: f(self.ln_2_w)?,
            ln_2_b: f(self.ln_2_b)?,
            c_fc_w: f(self.c_fc_w)?,
            c_fc_b: f(self.c_fc_b)?,
            mlp_proj_w: f(self.mlp_proj_w)?,
            mlp_proj_b: f(self.mlp_proj_b)?,
        })
    }

    fn as_ref(&self) -> Gpt2BlockParams<&P> {
        Gpt2BlockParams {
            ln_1_w: &self.ln_1_w,
            ln_1_b: &self.ln_1_b,
            c_attn_w: &self.c_attn_w,
            c_attn_b: &self.c_attn_b,
            attn_proj_w: &self.attn_proj_w,
            attn_proj_b: &self.attn_proj_b,
            ln_2_w: &self.ln_2_w,
            ln_2_b: &self.ln_2_b,
            c_fc_w: &self.c_fc_w,
            c_fc_b: &self.c_fc_b,
            mlp_proj_w: &self.mlp_proj_w,
            mlp_proj_b: &self.mlp_proj_b,
        }
    }
}

impl<P> Gpt2Params<P> {
    /// Every parameter in a fixed order: wte, wpe, each block's (as [`Gpt2BlockParams`] lists
    /// them), ln_f, and lm_head when untied.
    pub fn into_vec(self) -> Vec<P> {
        let mut v = vec![self.wte, self.wpe];
        for b in self.blocks {
            v.extend(b.into_vec());
        }
        v.extend([self.ln_f_w, self.ln_f_b]);
        v.extend(self.lm_head);
        v
    }

    /// The same parameters through `f` (stopping at its first error).
    pub fn try_map<Q, E>(self, mut f: impl FnMut(P) -> Result<Q, E>) -> Result<Gpt2Params<Q>, E> {
        Ok(Gpt2Params {
            wte: f(self.wte)?,
            wpe: f(self.wpe)?,
            blocks: self
                .blocks
                .into_iter()
                .map(|b| b.try_map(&mut f))
                .collect::<Result<_, E>>()?,
            ln_f_w: f(self.ln_f_w)?,
            ln_f_b: f(self.ln_f_b)?,
            lm_head: self.lm_head.map(&mut f).transpose()?,
        })
    }

    /// The same parameters through `f`.
    pub fn map<Q>(self, mut f: impl FnMut(P) -> Q) -> Gpt2Params<Q> {
        match self.try_map(|p| Ok::<_, std::convert::Infallible>(f(p))) {
            Ok(q) => q,
            Err(never) => match never {},
        }
    }

    /// References to the parameters, by name.
    pub fn as_ref(&self) -> Gpt2Params<&P> {
        Gpt2Params {
            wte: &self.wte,
            wpe: &self.wpe,
            blocks: self.blocks.iter().map(Gpt2BlockParams::as_ref).collect(),
            ln_f_w: &self.ln_f_w,
            ln_f_b: &self.ln_f_b,
            lm_head: self.lm_head.as_ref(),
        }
    }
}

pub struct Gpt2 {
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    pub cfg: Gpt2Config,
}

impl Gpt2 {
    pub fn new(cfg: &Gpt2Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let t = vb.pp("transformer");
        let wte = embedding(cfg.vocab_size, cfg.n_embd, t.pp("wte"))?;
        let wpe = embedding(cfg.n_positions, cfg.n_embd, t.pp("wpe"))?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::new(cfg, t.pp(format!("h.{i}"))))
            .collect::<candle_core::Result<_>>()?;
        let eps = cfg.layer_norm_epsilon;
        let ln_f = LayerNorm::new(cfg.n_embd, eps, t.pp("ln_f"))?;
        let lm_head = if cfg.tie_word_embeddings {
            wte.embeddings().clone()
        } else {
            vb.get((cfg.vocab_size, cfg.n_embd), "lm_head.weight")?
        };
        let lm_head = Linear::from_weight(lm_head, None, "lm_head")?;
        Ok(Gpt2 {
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            cfg: cfg.clone(),
        })
    }

    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// The parameter tensors by name.
    pub fn params(&self) -> Gpt2Params<&Tensor> {
        let tied = self.lm_head.weight().id() == self.wte.embeddings().id();
        Gpt2Params {
            wte: self.wte.embeddings(),
            wpe: self.wpe.embeddings(),
            blocks: self
                .blocks
                .iter()
                .map(|b| Gpt2BlockParams {
                    ln_1_w: &b.ln_1.weight,
                    ln_1_b: &b.ln_1.bias,
                    c_attn_w: b.c_attn.weight(),
                    c_attn_b: b.c_attn.bias().expect("Conv1D layers have a bias"),
                    attn_proj_w: b.attn_proj.weight(),
                    attn_proj_b: b.attn_proj.bias().expect("Conv1D layers have a bias"),
                    ln_2_w: &b.ln_2.weight,
                    ln_2_b: &b.ln_2.bias,
                    c_fc_w: b.c_fc.weight(),
                    c_fc_b: b.c_fc.bias().expect("Conv1D layers have a bias"),
                    mlp_proj_w: b.mlp_proj.weight(),
                    mlp_proj_b: b.mlp_proj.bias().expect("Conv1D layers have a bias"),
                })
                .collect(),
            ln_f_w: &self.ln_f.weight,
            ln_f_b: &self.ln_f.bias,
            lm_head: (!tied).then_some(self.lm_head.weight()),
        }
    }

    /// The output projection [vocab, n_embd].
    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.weight()
    }

    /// The output layer (logits = hidden states through it).
    pub fn output(&self) -> &Linear {
        &self.lm_head
    }

    /// Final (normalised) hidden states [batch, t, n_embd] for `ids` [batch, t]; logits are
    /// these times `lm_head`ᵀ. With one cache, the batch continues its cached positions; with
    /// one cache per row, each row continues its own; with one row and several caches, the row
    /// holds their queued continuations one after another ([`crate::CausalLm::forward_packed_last`]).
    pub fn hidden(&self, ids: &Tensor, caches: &mut [&mut KvCache]) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let pos: Vec<u32> = match caches {
            [c] if c.segments().is_some() => c.packed_positions().unwrap_or_default(),
            _ => caches
                .iter()
                .flat_map(|c| c.pass_positions(t).map(|p| p as u32))
                .collect(),
        };
        let rows = if pos.len() == t {
            1
        } else {
            pos.len() / t.max(1)
        };
        let pos = Tensor::from_vec(pos, (rows, t), ids.device())?;
        let mut x = self
            .wte
            .forward(ids)?
            .broadcast_add(&self.wpe.forward(&pos)?)?;
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, caches, i)?;
        }
        self.ln_f.forward(&x)
    }
}
