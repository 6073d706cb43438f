//! GPT-NeoX (Black et al. 2022; EleutherAI's Pythia, Polyglot-ko): LayerNorm with biases, one
//! fused query/key/value projection whose output interleaves the three per head, rotary
//! embeddings over the first `rotary_pct` of each head, and the parallel residual
//! x + attn(ln₁(x)) + mlp(ln₂(x)). Tensor names follow transformers' `GPTNeoXForCausalLM`.

use super::gpt2::residual;
use super::{FamilyConfig, Kind, ParamRole, SpecialIds, TokenIdFields};
use crate::layers::kv_cache::KvCache;
use crate::layers::linear::{linear_b, Linear};
use crate::layers::ops::LayerNorm;
use crate::layers::rope::{Rope, RopeSpec};
use crate::registry::ModelConfig;
use candle_core::{Module, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

fn gelu() -> String {
    "gelu".into()
}
fn rotary_pct() -> f64 {
    0.25
}
fn rotary_base() -> f64 {
    10_000.0
}
fn positions() -> usize {
    2048
}
fn eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

/// Config keys other decoders use that would change what this model computes.
const UNREAD_MATH_KEYS: &[&str] = &[
    "sliding_window",
    "use_sliding_window",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "logits_scaling",
];

/// `GPTNeoXForCausalLM` (transformers `GPTNeoXConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GptNeoxConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    /// The share of each head's dimensions that rotate.
    #[serde(default = "rotary_pct")]
    pub rotary_pct: f64,
    /// The same share under its newer name (transformers writes both; this one wins when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default = "rotary_base")]
    pub rotary_emb_base: f64,
    /// The base under its newer name (transformers writes both; this one wins when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5.x: `rope_theta`, `partial_rotary_factor` and the scaling in one object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default = "positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "yes")]
    pub use_parallel_residual: bool,
    #[serde(default = "yes")]
    pub attention_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default, with = "super::one_or_first")]
    pub eos_token_id: Option<u32>,
    /// Keys this family does not read (dropouts, initializer range...), kept so that a config
    /// read and written again keeps them; those that would change the computation are refused.
    #[serde(flatten, skip_serializing_if = "serde_json::Map::is_empty")]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl GptNeoxConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// The dimensions of each head that rotate: head_dim × the rotary share, rounded down as
    /// transformers does (`int(...)`).
    pub fn rotary_dims(&self) -> usize {
        let share = crate::layers::rope::parameters(&self.rope_parameters)
            .and_then(|p| p.get("partial_rotary_factor"))
            .and_then(|v| v.as_f64())
            .or(self.partial_rotary_factor)
            .unwrap_or(self.rotary_pct);
        (self.head_dim() as f64 * share) as usize
    }

    pub fn rope(&self) -> Result<RopeSpec, String> {
        RopeSpec::from_config(
            self.rope_theta.unwrap_or(self.rotary_emb_base),
            &self.rope_scaling,
            &self.rope_parameters,
        )
    }
}

impl FamilyConfig for GptNeoxConfig {
    const MODEL_TYPE: &'static str = "gpt_neox";
    const ARCHITECTURE: &'static str = "GPTNeoXForCausalLM";
    const KIND: Kind = Kind::Causal;

    fn validate(&self) -> Result<(), String> {
        let h = self.num_attention_heads;
        if h == 0 || !self.hidden_size.is_multiple_of(h) {
            return Err(format!(
                "hidden_size ({}) must be a multiple of num_attention_heads ({h})",
                self.hidden_size
            ));
        }
        super::require_positive(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("max_position_embeddings", self.max_position_embeddings),
        ])?;
        let share = self.rotary_dims() as f64 / self.head_dim() as f64;
        if !(0.0..=1.0).contains(&share) {
            return Err(format!(
                "rotary_pct ({}) must be between 0 and 1",
                self.rotary_pct
            ));
        }
        if !self.rotary_dims().is_multiple_of(2) {
            return Err(format!(
                "the rotated dimensions of a head ({}) must be even",
                self.rotary_dims()
            ));
        }
        crate::layers::ops::check_activation("hidden_act", &self.hidden_act)?;
        self.rope()?;
        super::refuse_unread(
            &self.other,
            UNREAD_MATH_KEYS.iter().copied(),
            Self::MODEL_TYPE,
        )?;
        Ok(())
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn max_positions(&self) -> usize {
        self.max_position_embeddings
    }
    fn width(&self) -> usize {
        self.hidden_size
    }
    fn num_layers(&self) -> usize {
        self.num_hidden_layers
    }
    fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }
    fn token_id_fields(ids: SpecialIds) -> TokenIdFields {
        super::decoder_token_ids(ids)
    }
    fn num_parameters(&self) -> u64 {
        let (v, h, i) = (
            self.vocab_size as f64,
            self.hidden_size as f64,
            self.intermediate_size as f64,
        );
        let attn_bias = if self.attention_bias { 4.0 * h } else { 0.0 };
        let layer = 4.0 * h + 4.0 * h * h + attn_bias + (h * i + i) + (i * h + h);
        let head = if self.tie_word_embeddings { 0.0 } else { v * h };
        super::count(v * h + self.num_hidden_layers as f64 * layer + 2.0 * h + head)
    }
    fn param_role(&self, name: &str) -> ParamRole {
        if name.ends_with("bias") {
            ParamRole::Bias
        } else if name.ends_with("layernorm.weight") || name.ends_with("final_layer_norm.weight") {
            ParamRole::NormGain
        } else if name.contains("embed_in") {
            ParamRole::Embedding
        } else if name.ends_with("attention.dense.weight") || name.ends_with("dense_4h_to_h.weight")
        {
            ParamRole::ResidualOut
        } else {
            ParamRole::Weight
        }
    }
    fn into_model_config(self) -> ModelConfig {
        ModelConfig::GptNeox(self)
    }
    fn unread_fields(&self) -> Vec<String> {
        self.other.keys().cloned().collect()
    }
}

struct Layer {
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
    query_key_value: Linear,
    dense: Linear,
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
    n_head: usize,
    head_dim: usize,
    parallel: bool,
    act: String,
}

impl Layer {
    fn new(cfg: &GptNeoxConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let a = vb.pp("attention");
        let m = vb.pp("mlp");
        Ok(Layer {
            input_layernorm: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: LayerNorm::new(
                h,
                cfg.layer_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            query_key_value: linear_b(h, 3 * h, cfg.attention_bias, a.pp("query_key_value"))?,
            dense: linear_b(h, h, cfg.attention_bias, a.pp("dense"))?,
            dense_h_to_4h: linear_b(h, i, true, m.pp("dense_h_to_4h"))?,
            dense_4h_to_h: linear_b(i, h, true, m.pp("dense_4h_to_h"))?,
            n_head: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            parallel: cfg.use_parallel_residual,
            act: cfg.hidden_act.clone(),
        })
    }

    /// `r + mlp(x)`: the MLP of post-attention LayerNorm(x) added to the residual `r`.
    fn mlp_add(&self, x: &Tensor, r: &Tensor) -> candle_core::Result<Tensor> {
        let h = self
            .dense_h_to_4h
            .forward(&self.post_attention_layernorm.forward(x)?)?;
        let h = crate::layers::ops::activation(&self.act, &h)?;
        residual(&self.dense_4h_to_h, &h, r)
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let d = self.head_dim;
        // [b, t, heads, q|k|v of the head] → [b, heads, t, 3·head_dim]
        let qkv = self
            .query_key_value
            .forward(&self.input_layernorm.forward(x)?)?
            .reshape((b, t, self.n_head, 3 * d))?
            .transpose(1, 2)?;
        let (q, k, v) = (
            qkv.narrow(3, 0, d)?,
            qkv.narrow(3, d, d)?,
            qkv.narrow(3, 2 * d, d)?,
        );
        // A block-quantized model's prompts attend on the AMX tiles, as its products run.
        let tiles = self.query_key_value.is_block_quantized();
        let y = crate::layers::attention::attend_rows_as(
            &q,
            &k,
            &v,
            caches,
            (layer, Some(rope)),
            tiles,
        )?;
        let y = y.transpose(1, 2)?.reshape((b, t, h))?;
        // (x + attn) + mlp(x), or x' + mlp(x') of x' = x + attn.
        let with_attn = residual(&self.dense, &y, x)?;
        let mlp_in = if self.parallel { x } else { &with_attn };
        self.mlp_add(mlp_in, &with_attn)
    }
}

pub struct GptNeox {
    embed_in: Embedding,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    embed_out: Linear,
    rope: Rope,
    pub cfg: GptNeoxConfig,
}

impl GptNeox {
    pub fn new(cfg: &GptNeoxConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let m = vb.pp("gpt_neox");
        let embed_in = embedding(cfg.vocab_size, cfg.hidden_size, m.pp("embed_in"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, m.pp(format!("layers.{i}"))))
            .collect::<candle_core::Result<_>>()?;
        let final_layer_norm = LayerNorm::new(
            cfg.hidden_size,
            cfg.layer_norm_eps,
            m.pp("final_layer_norm"),
        )?;
        let embed_out = if cfg.tie_word_embeddings {
            Linear::from_weight(embed_in.embeddings().clone(), None, "embed_out")?
        } else {
            linear_b(cfg.hidden_size, cfg.vocab_size, false, vb.pp("embed_out"))?
        };
        let spec = cfg.rope().map_err(candle_core::Error::Msg)?;
        let rope = Rope::new(
            spec.inv_freq(cfg.rotary_dims()),
            cfg.max_position_embeddings,
            vb.dtype(),
            vb.device(),
        )?;
        Ok(GptNeox {
            embed_in,
            layers,
            final_layer_norm,
            embed_out,
            rope,
            cfg: cfg.clone(),
        })
    }

    /// A model from a gptneox GGUF file: block-quantized projections stay quantized (the fused
    /// query/key/value rows, which llama.cpp's converter groups as q | k | v, go back to
    /// transformers' per-head order), embeddings, norms and biases become f32.
    pub fn from_gguf(g: &mut crate::gguf::Gguf, dev: &candle_core::Device) -> crate::Result<Self> {
        let cfg = g.gptneox_config()?;
        let (v, h, i) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
        let (heads, d) = (cfg.num_attention_heads, cfg.head_dim());
        // transformers' row of head n, part p (q, k, v), index j is llama.cpp's row p·h + n·d + j.
        let qkv_row = |to: usize| {
            let (n, r) = (to / (3 * d), to % (3 * d));
            (r / d) * h + n * d + r % d
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let blk = format!("blk.{l}");
            let hf = format!("gpt_neox.layers.{l}");
            let mut norm = |name: &str| -> crate::Result<LayerNorm> {
                Ok(LayerNorm {
                    weight: g.tensor(&format!("{blk}.{name}.weight"), &[h], dev)?,
                    bias: g.tensor(&format!("{blk}.{name}.bias"), &[h], dev)?,
                    eps: cfg.layer_norm_eps,
                })
            };
            let (input_layernorm, post_attention_layernorm) =
                (norm("attn_norm")?, norm("ffn_norm")?);
            let mut proj = |name: &str, path: &str, out: usize, inp: usize, qkv: bool| {
                let mut q = g.qtensor(&format!("{blk}.{name}.weight"), &[out, inp], dev)?;
                let bias_name = format!("{blk}.{name}.bias");
                let mut bias = if g.has_tensor(&bias_name) {
                    Some(g.tensor(&bias_name, &[out], dev)?)
                } else {
                    None
                };
                if qkv {
                    q = crate::gguf::permute_rows(q, qkv_row)?;
                    if let Some(b) = &bias {
                        let idx: Vec<u32> = (0..out).map(|r| qkv_row(r) as u32).collect();
                        bias = Some(b.index_select(&Tensor::new(idx.as_slice(), dev)?, 0)?);
                    }
                }
                Ok::<_, crate::ModelError>(Linear::quantized(q, bias, &format!("{hf}.{path}"))?)
            };
            layers.push(Layer {
                query_key_value: proj("attn_qkv", "attention.query_key_value", 3 * h, h, true)?,
                dense: proj("attn_output", "attention.dense", h, h, false)?,
                dense_h_to_4h: proj("ffn_up", "mlp.dense_h_to_4h", i, h, false)?,
                dense_4h_to_h: proj("ffn_down", "mlp.dense_4h_to_h", h, i, false)?,
                input_layernorm,
                post_attention_layernorm,
                n_head: heads,
                head_dim: d,
                parallel: cfg.use_parallel_residual,
                act: cfg.hidden_act.clone(),
            });
        }
        let final_layer_norm = LayerNorm {
            weight: g.tensor("output_norm.weight", &[h], dev)?,
            bias: g.tensor("output_norm.bias", &[h], dev)?,
            eps: cfg.layer_norm_eps,
        };
        let table = g.tensor("token_embd.weight", &[v, h], dev)?;
        let embed_out = if cfg.tie_word_embeddings {
            Linear::from_weight(table.clone(), None, "embed_out")?
        } else {
            Linear::quantized(g.qtensor("output.weight", &[v, h], dev)?, None, "embed_out")?
        };
        let spec = cfg.rope().map_err(|m| g.bad(m))?;
        let rope = Rope::new(
            spec.inv_freq(cfg.rotary_dims()),
            cfg.max_position_embeddings,
            candle_core::DType::F32,
            dev,
        )?;
        Ok(GptNeox {
            embed_in: Embedding::new(table, h),
            layers,
            final_layer_norm,
            embed_out,
            rope,
            cfg,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The output layer (`embed_out`).
    pub fn output(&self) -> &Linear {
        &self.embed_out
    }

    pub fn device(&self) -> &candle_core::Device {
        self.embed_in.embeddings().device()
    }

    /// Final hidden states [batch, t, hidden_size] for `ids` [batch, t]: with one cache, the
    /// batch continues its cached positions; with one cache per row, each row its own; with one
    /// row and several caches, the row holds their queued continuations one after another
    /// ([`crate::CausalLm::forward_packed_last`]).
    pub fn hidden(&self, ids: &Tensor, caches: &mut [&mut KvCache]) -> candle_core::Result<Tensor> {
        let mut x = self.embed_in.forward(ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &self.rope, caches, i)?;
        }
        self.final_layer_norm.forward(&x)
    }
}
