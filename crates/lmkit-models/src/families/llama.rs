//! Llama-style decoder (Touvron et al. 2023): RMSNorm, rotary position embeddings (Su et al. 2021,
//! in the non-interleaved "rotate half" layout transformers uses), SwiGLU MLP and grouped-query
//! attention. Tensor names follow transformers' `LlamaForCausalLM`.

use super::{FamilyConfig, Kind, ParamRole, SpecialIds, TokenIdFields};
use crate::layers::kv_cache::KvCache;
use crate::layers::linear::{linear_b, Fanout, Linear};
use crate::layers::ops::RmsNorm;
use crate::layers::rope::Rope;
use crate::registry::ModelConfig;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

fn llama_eps() -> f64 {
    1e-6
}
fn rope_theta() -> f64 {
    10_000.0
}
fn silu() -> String {
    "silu".into()
}

/// The decoders that are Llama with a difference, read from their own `model_type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Arch {
    #[default]
    Llama,
    /// Mistral: sliding-window attention (`sliding_window`).
    Mistral,
    /// Qwen2: biases on the query, key and value projections (not the output one).
    Qwen2,
    /// Qwen3: RMS norms over each query and key head (`q_norm`, `k_norm`), no biases.
    Qwen3,
}

impl Arch {
    pub const fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }

    pub const fn architecture(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// Biases on q, k, v (and on o).
    fn biases(self, cfg: &LlamaConfig) -> (bool, bool) {
        match self {
            Arch::Qwen2 => (true, false),
            _ => (cfg.attention_bias, cfg.attention_bias),
        }
    }
}

/// `LlamaForCausalLM` (transformers `LlamaConfig`), and the variants of [`Arch`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Which of the Llama-like decoders (from `model_type`; not a config key of its own).
    #[serde(skip)]
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: key/value heads (defaults to num_attention_heads).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    #[serde(default = "llama_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "silu")]
    pub hidden_act: String,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// transformers 4.x rope scaling (`{"rope_type": "llama3" | "linear", ...}`).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5.x: `rope_theta` and the scaling in one object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default, with = "super::one_or_first")]
    pub eos_token_id: Option<u32>,
    /// Keys this family does not read, kept so that a config read and written again keeps them;
    /// those that would change the computation are refused by `validate`.
    #[serde(flatten, skip_serializing_if = "serde_json::Map::is_empty")]
    pub other: serde_json::Map<String, serde_json::Value>,
}

pub use crate::layers::rope::{RopeScaling, RopeSpec};

/// Config keys of other decoders that change what a model computes; a `llama` config that sets
/// them is not a model lmkit would compute correctly.
const UNREAD_MATH_KEYS: &[&str] = &[
    "sliding_window",
    "use_sliding_window",
    "partial_rotary_factor",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "use_qk_norm",
    "qk_layernorm",
    "no_rope_layers",
    "layer_types",
    "attention_chunk_size",
    "logits_scaling",
    "embedding_multiplier",
    "residual_multiplier",
    "attention_multiplier",
];

impl LlamaConfig {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let h = self.num_attention_heads;
        if h == 0 || (self.head_dim.is_none() && !self.hidden_size.is_multiple_of(h)) {
            return Err(format!(
                "hidden_size ({}) must be a multiple of num_attention_heads ({h})",
                self.hidden_size
            ));
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !h.is_multiple_of(kv) {
            return Err(format!(
                "num_attention_heads ({h}) must be a multiple of num_key_value_heads ({kv})"
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim()
            ));
        }
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act `{}` is not supported (silu)",
                self.hidden_act
            ));
        }
        self.rope()?;
        let read = |key: &str| match (self.arch, key) {
            // Mistral's window is applied; Qwen2/3 name one but use it only when
            // `use_sliding_window` is on (refused as an unread key).
            (Arch::Mistral, "sliding_window") => true,
            (Arch::Qwen2 | Arch::Qwen3, "sliding_window") => true,
            // Every layer attending over the whole context is what lmkit computes.
            (_, "layer_types") => self.other.get("layer_types").is_some_and(|v| {
                v.as_array()
                    .is_some_and(|l| l.iter().all(|t| t == "full_attention"))
            }),
            _ => false,
        };
        super::refuse_unread(
            &self.other,
            UNREAD_MATH_KEYS.iter().copied().filter(|k| !read(k)),
            self.arch.model_type(),
        )?;
        super::require_positive(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("head_dim", self.head_dim()),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
        ])?;
        Ok(())
    }
}

impl LlamaConfig {
    /// The rotary embedding: `rope_parameters` (transformers 5.x) or `rope_theta` and
    /// `rope_scaling` (4.x). Scaling types other than linear and llama3 are errors.
    pub fn rope(&self) -> std::result::Result<RopeSpec, String> {
        RopeSpec::from_config(self.rope_theta, &self.rope_scaling, &self.rope_parameters)
    }

    /// Mistral's attention window: each position sees itself and the `window - 1` before it.
    pub fn sliding_window(&self) -> Option<usize> {
        if self.arch != Arch::Mistral {
            return None;
        }
        self.other
            .get("sliding_window")
            .and_then(|w| w.as_u64())
            .map(|w| w as usize)
            .filter(|&w| w < self.max_position_embeddings)
    }

    /// The inverse frequencies θ_i = theta^(-2i/d), scaled as the config says.
    pub fn inv_freq(&self) -> std::result::Result<Vec<f32>, String> {
        Ok(self.rope()?.inv_freq(self.head_dim()))
    }
}

impl FamilyConfig for LlamaConfig {
    const MODEL_TYPE: &'static str = "llama";
    const ARCHITECTURE: &'static str = "LlamaForCausalLM";
    const KIND: Kind = Kind::Causal;

    fn validate(&self) -> std::result::Result<(), String> {
        LlamaConfig::validate(self)
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
        let hd = self.head_dim() as f64;
        let (q, kv) = (
            self.num_attention_heads as f64 * hd,
            self.num_kv_heads() as f64 * hd,
        );
        let (qkv_bias, o_bias) = self.arch.biases(self);
        let attn_bias = if qkv_bias { q + 2.0 * kv } else { 0.0 }
            + if o_bias { h } else { 0.0 }
            + if self.arch == Arch::Qwen3 {
                2.0 * hd
            } else {
                0.0
            };
        let mlp_bias = if self.mlp_bias { 2.0 * i + h } else { 0.0 };
        let layer = 2.0 * h + h * q + 2.0 * h * kv + q * h + attn_bias + 3.0 * h * i + mlp_bias;
        let head = if self.tie_word_embeddings { 0.0 } else { v * h };
        super::count(v * h + self.num_hidden_layers as f64 * layer + h + head)
    }
    fn param_role(&self, name: &str) -> ParamRole {
        if name.ends_with("bias") {
            ParamRole::Bias
        } else if name.ends_with("norm.weight") {
            ParamRole::NormGain
        } else if name.contains("embed_tokens") {
            ParamRole::Embedding
        } else if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
            ParamRole::ResidualOut
        } else {
            ParamRole::Weight
        }
    }
    fn into_model_config(self) -> ModelConfig {
        ModelConfig::Llama(self)
    }
    fn unread_fields(&self) -> Vec<String> {
        self.other.keys().cloned().collect()
    }
}

fn rope_tables(cfg: &LlamaConfig, dtype: DType, dev: &Device) -> candle_core::Result<Rope> {
    let inv = cfg.inv_freq().map_err(candle_core::Error::Msg)?;
    Rope::new(inv, cfg.max_position_embeddings, dtype, dev)
}

struct Layer {
    input_layernorm: RmsNorm,
    /// Qwen3: RMS norms over each query and key head before the rotation.
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    /// q_proj, k_proj, v_proj.
    qkv: Fanout,
    o_proj: Linear,
    post_attention_layernorm: RmsNorm,
    /// gate_proj, up_proj.
    gate_up: Fanout,
    down_proj: Linear,
    n_head: usize,
    n_kv: usize,
    head_dim: usize,
}

impl Layer {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, hd, kv) = (cfg.hidden_size, cfg.head_dim(), cfg.num_kv_heads());
        let a = vb.pp("self_attn");
        let m = vb.pp("mlp");
        let (qkv_bias, o_bias) = cfg.arch.biases(cfg);
        let (q_norm, k_norm) = if cfg.arch == Arch::Qwen3 {
            (
                Some(RmsNorm::new(hd, cfg.rms_norm_eps, a.pp("q_norm"))?),
                Some(RmsNorm::new(hd, cfg.rms_norm_eps, a.pp("k_norm"))?),
            )
        } else {
            (None, None)
        };
        Ok(Layer {
            input_layernorm: RmsNorm::new(h, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            q_norm,
            k_norm,
            qkv: Fanout::new(
                vec![
                    linear_b(h, cfg.num_attention_heads * hd, qkv_bias, a.pp("q_proj"))?,
                    linear_b(h, kv * hd, qkv_bias, a.pp("k_proj"))?,
                    linear_b(h, kv * hd, qkv_bias, a.pp("v_proj"))?,
                ],
                &a.prefix(),
            )?,
            o_proj: linear_b(cfg.num_attention_heads * hd, h, o_bias, a.pp("o_proj"))?,
            post_attention_layernorm: RmsNorm::new(
                h,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            gate_up: Fanout::new(
                vec![
                    linear_b(h, cfg.intermediate_size, cfg.mlp_bias, m.pp("gate_proj"))?,
                    linear_b(h, cfg.intermediate_size, cfg.mlp_bias, m.pp("up_proj"))?,
                ],
                &m.prefix(),
            )?,
            down_proj: linear_b(cfg.intermediate_size, h, cfg.mlp_bias, m.pp("down_proj"))?,
            n_head: cfg.num_attention_heads,
            n_kv: kv,
            head_dim: hd,
        })
    }

    /// Layer `i` of a GGUF file (`blk.{i}.*`), under transformers' tensor paths.
    fn from_gguf(
        cfg: &LlamaConfig,
        g: &mut crate::gguf::Gguf,
        i: usize,
        dev: &Device,
    ) -> crate::Result<Self> {
        let (h, hd, kv) = (cfg.hidden_size, cfg.head_dim(), cfg.num_kv_heads());
        let nh = cfg.num_attention_heads;
        let interleaved = g.rope_interleaved()?;
        let blk = format!("blk.{i}");
        let hf = format!("model.layers.{i}");
        let mut proj = |name: &str, path: &str, out: usize, inp: usize, heads: Option<usize>| {
            let mut q = g.qtensor(&format!("{blk}.{name}.weight"), &[out, inp], dev)?;
            if let (Some(heads), true) = (heads, interleaved) {
                q = crate::gguf::unpermute_rows(q, heads)?;
            }
            let bias_name = format!("{blk}.{name}.bias");
            let bias = if g.has_tensor(&bias_name) {
                Some(g.tensor(&bias_name, &[out], dev)?)
            } else {
                None
            };
            Ok::<_, crate::ModelError>(Linear::quantized(q, bias, &format!("{hf}.{path}"))?)
        };
        let q_proj = proj("attn_q", "self_attn.q_proj", nh * hd, h, Some(nh))?;
        let k_proj = proj("attn_k", "self_attn.k_proj", kv * hd, h, Some(kv))?;
        let v_proj = proj("attn_v", "self_attn.v_proj", kv * hd, h, None)?;
        let o_proj = proj("attn_output", "self_attn.o_proj", h, nh * hd, None)?;
        let i_size = cfg.intermediate_size;
        let gate_proj = proj("ffn_gate", "mlp.gate_proj", i_size, h, None)?;
        let up_proj = proj("ffn_up", "mlp.up_proj", i_size, h, None)?;
        let down_proj = proj("ffn_down", "mlp.down_proj", h, i_size, None)?;
        let mut head_norm = |name: &str| -> crate::Result<Option<RmsNorm>> {
            let full = format!("{blk}.{name}.weight");
            if !g.has_tensor(&full) {
                return Ok(None);
            }
            let w = g.tensor(&full, &[hd], dev)?;
            Ok(Some(RmsNorm::from_weight(w, cfg.rms_norm_eps)))
        };
        let (q_norm, k_norm) = (head_norm("attn_q_norm")?, head_norm("attn_k_norm")?);
        if cfg.arch == Arch::Qwen3 && (q_norm.is_none() || k_norm.is_none()) {
            return Err(crate::ModelError::Tensor {
                path: g.path().to_path_buf(),
                name: format!("{blk}.attn_q_norm.weight"),
                msg: "missing: a qwen3 layer normalises its query and key heads".into(),
            });
        }
        let mut norm = |name: &str, size: usize| -> crate::Result<RmsNorm> {
            let w = g.tensor(&format!("{blk}.{name}.weight"), &[size], dev)?;
            Ok(RmsNorm::from_weight(w, cfg.rms_norm_eps))
        };
        let input_layernorm = norm("attn_norm", h)?;
        let post_attention_layernorm = norm("ffn_norm", h)?;
        Ok(Layer {
            qkv: Fanout::new(vec![q_proj, k_proj, v_proj], &format!("{hf}.self_attn"))?,
            gate_up: Fanout::new(vec![gate_proj, up_proj], &format!("{hf}.mlp"))?,
            q_norm,
            k_norm,
            input_layernorm,
            post_attention_layernorm,
            o_proj,
            down_proj,
            n_head: nh,
            n_kv: kv,
            head_dim: hd,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let h = self.input_layernorm.forward(x)?;
        let heads = |y: Tensor, n: usize| y.reshape((b, t, n, self.head_dim))?.transpose(1, 2);
        let [q, k, v]: [Tensor; 3] = self
            .qkv
            .forward(&h)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("q, k, v projections".into()))?;
        if let [cache] = caches {
            // One pass whose keys and values are not kept (scoring, training): rotation and
            // attention in one kernel over the projections side by side.
            let (table, rotated) = rope.table(cache.len() + t)?;
            if cache.discards_kv() && self.q_norm.is_none() && rotated == self.head_dim {
                let qkv = Tensor::cat(&[&q, &k, &v], 2)?;
                // A block-quantized model's on the AMX tiles, as its products run.
                let attend = if self.qkv.is_block_quantized() {
                    lmkit_kernels::blas::rope_causal_attention_on_tiles
                } else {
                    lmkit_kernels::blas::rope_causal_attention
                };
                let y = attend(&qkv, &table, self.n_head, self.n_kv, cache.segments())?;
                if let Some(y) = y {
                    return self.mlp(&self.o_proj.forward_add(&y, x)?);
                }
            }
        }
        let mut q = heads(q, self.n_head)?;
        let mut k = heads(k, self.n_kv)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q.contiguous()?)?;
            k = kn.forward(&k.contiguous()?)?;
        }
        let v = heads(v, self.n_kv)?;
        // Grouped-query attention: each key/value head serves n_head / n_kv query heads.
        // A block-quantized model's prompts attend on the AMX tiles, as its products run.
        let tiles = self.qkv.is_block_quantized();
        let y = crate::layers::attention::attend_rows_as(
            &q,
            &k,
            &v,
            caches,
            (layer, Some(rope)),
            tiles,
        )?;
        let y = y
            .transpose(1, 2)?
            .reshape((b, t, self.n_head * self.head_dim))?;
        self.mlp(&self.o_proj.forward_add(&y, x)?)
    }

    /// x + MLP(RMSNorm(x)).
    fn mlp(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.post_attention_layernorm.forward(x)?;
        let [gate, up]: [Tensor; 2] = self
            .gate_up
            .forward(&h)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("gate, up projections".into()))?;
        let gated = crate::layers::ops::swiglu(&gate, &up)?;
        self.down_proj.forward_add(&gated, x)
    }
}

/// A layer's parts, for code that runs the model's computation itself (the hand-written training
/// pass).
pub struct LayerParts<'a> {
    pub input_layernorm: &'a RmsNorm,
    pub post_attention_layernorm: &'a RmsNorm,
    /// q_proj, k_proj, v_proj.
    pub qkv: &'a [Linear],
    pub o_proj: &'a Linear,
    /// gate_proj, up_proj.
    pub gate_up: &'a [Linear],
    pub down_proj: &'a Linear,
    pub n_head: usize,
    pub n_kv: usize,
    pub head_dim: usize,
}

/// The model's parts (see [`Llama::parts`]).
pub struct Parts<'a> {
    pub embed_tokens: &'a Tensor,
    pub layers: Vec<LayerParts<'a>>,
    pub norm: &'a RmsNorm,
    pub lm_head: &'a Linear,
    pub rope: &'a Rope,
}

/// The token embeddings: a dense table, or a GGUF's quantized one (rows dequantized as looked up).
enum TokenEmbedding {
    Dense(Embedding),
    Quantized(Arc<QTensor>),
}

impl TokenEmbedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            TokenEmbedding::Dense(e) => e.forward(ids),
            TokenEmbedding::Quantized(q) => q.embedding(ids),
        }
    }
}

pub struct Llama {
    embed_tokens: TokenEmbedding,
    /// A LoRA adapter on the token embeddings (`target_modules` naming `embed_tokens`).
    embed_lora: Option<crate::layers::lora::Lora>,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    pub cfg: LlamaConfig,
    pub device: Device,
}

impl Llama {
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let m = vb.pp("model");
        let embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, m.pp("embed_tokens"))?;
        // The table adapters store in its place (modules_to_save, or PEFT's copy beside an
        // embedding adapter), if any.
        let table = embed_tokens.embeddings().clone();
        let embed_tokens = match crate::layers::lora::saved_module(
            "model.embed_tokens",
            &|| Ok(table.clone()),
            None,
        )? {
            Some((w, _)) => Embedding::new(w, cfg.hidden_size),
            None => embed_tokens,
        };
        let embed_lora = crate::layers::lora::attach_embedding(
            "model.embed_tokens",
            cfg.vocab_size,
            cfg.hidden_size,
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, m.pp(format!("layers.{i}"))))
            .collect::<candle_core::Result<_>>()?;
        let norm = RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.embeddings().clone()
        } else {
            vb.get((cfg.vocab_size, cfg.hidden_size), "lm_head.weight")?
        };
        let lm_head = Linear::from_weight(lm_head, None, "lm_head")?;
        let rope = rope_tables(cfg, vb.dtype(), vb.device())?;
        Ok(Llama {
            embed_tokens: TokenEmbedding::Dense(embed_tokens),
            embed_lora,
            layers,
            norm,
            lm_head,
            rope,
            cfg: cfg.clone(),
            device: vb.device().clone(),
        })
    }

    /// A model from a GGUF file (architectures llama, qwen2, qwen3): block-quantized weights stay
    /// quantized, norms and biases become f32.
    pub fn from_gguf(g: &mut crate::gguf::Gguf, dev: &Device) -> crate::Result<Self> {
        let cfg = g.llama_config()?;
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed = Arc::new(g.qtensor("token_embd.weight", &[v, h], dev)?);
        let embed_lora = crate::layers::lora::attach_embedding("model.embed_tokens", v, h)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::from_gguf(&cfg, g, i, dev))
            .collect::<crate::Result<_>>()?;
        let norm =
            RmsNorm::from_weight(g.tensor("output_norm.weight", &[h], dev)?, cfg.rms_norm_eps);
        let head = if cfg.tie_word_embeddings {
            g.qtensor("token_embd.weight", &[v, h], dev)?
        } else {
            g.qtensor("output.weight", &[v, h], dev)?
        };
        let lm_head = Linear::quantized(head, None, "lm_head")?;
        let rope = rope_tables(&cfg, DType::F32, dev)?;
        Ok(Llama {
            embed_tokens: TokenEmbedding::Quantized(embed),
            embed_lora,
            layers,
            norm,
            lm_head,
            rope,
            cfg,
            device: dev.clone(),
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The parts of a model whose layers are each as [`Llama::hidden`] computes them with plain
    /// products: dense token embeddings, separate projections, no per-head query/key norms and
    /// attention over every earlier position. `None` for other models (a GGUF's stacked
    /// quantized projections, Qwen3, a sliding window).
    pub fn parts(&self) -> Option<Parts<'_>> {
        let TokenEmbedding::Dense(embed) = &self.embed_tokens else {
            return None;
        };
        if self.embed_lora.as_ref().is_some_and(|l| l.is_on()) {
            return None;
        }
        if self.cfg.sliding_window().is_some() {
            return None;
        }
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let (Fanout::Apart(qkv), Fanout::Apart(gate_up)) = (&l.qkv, &l.gate_up) else {
                    return None;
                };
                if l.q_norm.is_some() || l.k_norm.is_some() || qkv.len() != 3 || gate_up.len() != 2
                {
                    return None;
                }
                Some(LayerParts {
                    input_layernorm: &l.input_layernorm,
                    post_attention_layernorm: &l.post_attention_layernorm,
                    qkv,
                    o_proj: &l.o_proj,
                    gate_up,
                    down_proj: &l.down_proj,
                    n_head: l.n_head,
                    n_kv: l.n_kv,
                    head_dim: l.head_dim,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Parts {
            embed_tokens: embed.embeddings(),
            layers,
            norm: &self.norm,
            lm_head: &self.lm_head,
            rope: &self.rope,
        })
    }

    /// The output layer (logits = hidden states through it).
    pub fn output(&self) -> &Linear {
        &self.lm_head
    }

    /// Final (normalised) hidden states [batch, t, hidden_size] for `ids` [batch, t]; logits are
    /// these times `lm_head`ᵀ. With one cache, the batch continues its cached positions; with
    /// one cache per row, each row continues its own; with one row and several caches, the row
    /// holds their queued continuations one after another ([`crate::CausalLm::forward_packed_last`]).
    pub fn hidden(&self, ids: &Tensor, caches: &mut [&mut KvCache]) -> candle_core::Result<Tensor> {
        if let Some(window) = self.cfg.sliding_window() {
            let t = ids.dim(1)?;
            let end = caches
                .iter()
                .map(|c| c.pass_positions(t).end)
                .max()
                .unwrap_or(t);
            if end > window {
                candle_core::bail!(
                    "{end} positions exceed this model's sliding_window ({window}); attention limited to a window is not implemented yet"
                );
            }
        }
        let mut x = self.embed_tokens.forward(ids)?;
        if let Some(l) = self.embed_lora.as_ref().filter(|l| l.is_on()) {
            x = (x + l.embed(ids)?)?;
        }
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &self.rope, caches, i)?;
        }
        self.norm.forward(&x)
    }
}
