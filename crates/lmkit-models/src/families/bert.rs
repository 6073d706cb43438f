//! BERT (Devlin et al. 2019): a bidirectional Transformer encoder with the masked-LM head, as
//! transformers' `BertForMaskedLM` lays it out (post-norm layers, learned positions, token types,
//! tied output embeddings), plus sentence embeddings pooled as sentence-transformers does. The
//! same encoder read as RoBERTa (Liu et al. 2019) and XLM-RoBERTa (Conneau et al. 2020): positions
//! counted from the padding id + 1, their own masked-LM head. Checkpoints with a sequence or token
//! classification head (`*ForSequenceClassification`, `*ForTokenClassification`) load with it.

use super::{FamilyConfig, Kind, ParamRole, SpecialIds, TokenIdFields};
use crate::error::Result;
use crate::layers::attention::{attention, padding_bias, Mask};
use crate::layers::linear::{linear, Linear};
use crate::layers::ops::LayerNorm;
use crate::layers::parts::{AttentionParts, LayerParts};
pub use crate::layers::pooling::{Pooling, PoolingMode};
use crate::registry::ModelConfig;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{embedding, Embedding, VarBuilder};
use serde::{Deserialize, Serialize};
use std::path::Path;

fn gelu() -> String {
    "gelu".into()
}
fn eps() -> f64 {
    1e-12
}
fn two() -> usize {
    2
}
fn yes() -> bool {
    true
}
fn absolute() -> String {
    "absolute".into()
}

/// The encoders that are BERT with a difference, read from their own `model_type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encoder {
    #[default]
    Bert,
    /// RoBERTa: position ids start after the padding id; its own masked-LM head (`lm_head`).
    Roberta,
    /// XLM-RoBERTa: RoBERTa's layout (a larger, multilingual vocabulary).
    XlmRoberta,
}

impl Encoder {
    pub const fn model_type(self) -> &'static str {
        match self {
            Encoder::Bert => "bert",
            Encoder::Roberta => "roberta",
            Encoder::XlmRoberta => "xlm-roberta",
        }
    }

    pub const fn architecture(self) -> &'static str {
        match self {
            Encoder::Bert => "BertForMaskedLM",
            Encoder::Roberta => "RobertaForMaskedLM",
            Encoder::XlmRoberta => "XLMRobertaForMaskedLM",
        }
    }

    /// Where the encoder's tensors live in a model with a head.
    const fn prefix(self) -> &'static str {
        match self {
            Encoder::Bert => "bert",
            Encoder::Roberta | Encoder::XlmRoberta => "roberta",
        }
    }

    /// RoBERTa's positions: padding_idx + 1 + the index among non-padding tokens.
    const fn positions_after_padding(self) -> bool {
        !matches!(self, Encoder::Bert)
    }
}

/// transformers' `BertConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Which of the BERT-like encoders (from `model_type`; not a config key of its own).
    #[serde(skip)]
    pub arch: Encoder,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    /// Only `absolute` (learned positions) is computed.
    #[serde(default = "absolute")]
    pub position_embedding_type: String,
}

impl BertConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size ({}) must be a multiple of num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        super::require_positive(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ])?;
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type `{}` is not supported (absolute)",
                self.position_embedding_type
            ));
        }
        if self.arch.positions_after_padding() && self.max_position_embeddings <= self.pad() + 1 {
            return Err(format!(
                "max_position_embeddings ({}) leaves no position after the padding id ({})",
                self.max_position_embeddings,
                self.pad()
            ));
        }
        crate::layers::ops::check_activation("hidden_act", &self.hidden_act)
    }

    /// The padding id RoBERTa's positions count from (transformers' default 1).
    fn pad(&self) -> usize {
        self.pad_token_id.unwrap_or(1) as usize
    }

    /// The longest text the encoder reads: every position, less RoBERTa's offset.
    pub fn max_tokens(&self) -> usize {
        if self.arch.positions_after_padding() {
            self.max_position_embeddings - self.pad() - 1
        } else {
            self.max_position_embeddings
        }
    }

    /// Reads and validates a `config.json` of a BERT-like encoder (bert, roberta, xlm-roberta).
    pub fn load(path: &Path) -> Result<BertConfig> {
        Self::from_json(crate::registry::read_json(path)?, path)
    }

    /// Validates a `config.json` given as JSON; `path` names it in errors.
    pub fn from_json(v: serde_json::Value, path: &Path) -> Result<BertConfig> {
        match crate::registry::ModelConfig::from_json(v, path)? {
            ModelConfig::Bert(c) => Ok(c),
            other => Err(crate::ModelError::Config {
                path: path.to_path_buf(),
                msg: format!(
                    "model_type is `{}`, but this needs a BERT-like encoder (bert, roberta, xlm-roberta)",
                    other.family().model_type
                ),
            }),
        }
    }
}

impl FamilyConfig for BertConfig {
    const MODEL_TYPE: &'static str = "bert";
    const ARCHITECTURE: &'static str = "BertForMaskedLM";
    const KIND: Kind = Kind::Masked;

    fn validate(&self) -> std::result::Result<(), String> {
        BertConfig::validate(self)
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn max_positions(&self) -> usize {
        self.max_tokens()
    }
    fn width(&self) -> usize {
        self.hidden_size
    }
    fn num_layers(&self) -> usize {
        self.num_hidden_layers
    }
    fn eos_token_id(&self) -> Option<u32> {
        None
    }
    fn token_id_fields(ids: SpecialIds) -> TokenIdFields {
        vec![("pad_token_id", ids.pad)]
    }
    fn num_parameters(&self) -> u64 {
        let (v, h, i) = (
            self.vocab_size as f64,
            self.hidden_size as f64,
            self.intermediate_size as f64,
        );
        let embeddings =
            (v + self.max_position_embeddings as f64 + self.type_vocab_size as f64) * h + 2.0 * h;
        let layer = 4.0 * (h * h + h) + 4.0 * h + (h * i + i) + (i * h + h);
        let head = (h * h + h) + 2.0 * h + v + if self.tie_word_embeddings { 0.0 } else { v * h };
        super::count(embeddings + self.num_hidden_layers as f64 * layer + head)
    }
    fn param_role(&self, name: &str) -> ParamRole {
        if name.ends_with("bias") {
            ParamRole::Bias
        } else if name.contains("LayerNorm") || name.contains("layer_norm") {
            ParamRole::NormGain
        } else if name.contains("_embeddings.") {
            ParamRole::Embedding
        } else {
            ParamRole::Weight
        }
    }
    fn into_model_config(self) -> ModelConfig {
        ModelConfig::Bert(self)
    }
}

use crate::layers::ops::activation as act;

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
    heads: usize,
    act: String,
    /// query | key | value as one layer, made on first use by the inference path.
    qkv: std::sync::OnceLock<Option<Linear>>,
}

impl Layer {
    fn new(cfg: &BertConfig, vb: VarBuilder) -> candle_core::Result<Layer> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let a = vb.pp("attention");
        Ok(Layer {
            query: linear(h, h, a.pp("self.query"))?,
            key: linear(h, h, a.pp("self.key"))?,
            value: linear(h, h, a.pp("self.value"))?,
            attn_out: linear(h, h, a.pp("output.dense"))?,
            attn_norm: LayerNorm::new(h, eps, a.pp("output.LayerNorm"))?,
            intermediate: linear(h, i, vb.pp("intermediate.dense"))?,
            output: linear(i, h, vb.pp("output.dense"))?,
            out_norm: LayerNorm::new(h, eps, vb.pp("output.LayerNorm"))?,
            heads: cfg.num_attention_heads,
            act: cfg.hidden_act.clone(),
            qkv: std::sync::OnceLock::new(),
        })
    }

    /// The three projections stacked ([3h, h]), unless one carries a LoRA adapter.
    fn stacked_qkv(&self) -> candle_core::Result<Option<&Linear>> {
        if let Some(l) = self.qkv.get() {
            return Ok(l.as_ref());
        }
        let parts = [&self.query, &self.key, &self.value];
        let made = if parts.iter().any(|p| p.lora().is_some()) {
            None
        } else {
            let w: Vec<Tensor> = parts
                .iter()
                .map(|p| p.weight_out_in())
                .collect::<candle_core::Result<_>>()?;
            let b: Option<Vec<Tensor>> = parts.iter().map(|p| p.bias().cloned()).collect();
            let b = b.map(|b| Tensor::cat(&b, 0)).transpose()?;
            Some(Linear::from_weight(Tensor::cat(&w, 0)?, b, "qkv")?)
        };
        Ok(self.qkv.get_or_init(|| made).as_ref())
    }

    /// [`Layer::forward`] for inference on a batch whose row i has `lens[i]` real tokens: one
    /// q|k|v product and each sequence attending over its own tokens (no score tensor or mask).
    /// Padded rows come out as numbers that pooling ignores. `None` where that path does not apply.
    fn forward_lens(&self, x: &Tensor, lens: &[usize]) -> candle_core::Result<Option<Tensor>> {
        let Some(qkv) = self.stacked_qkv()? else {
            return Ok(None);
        };
        let d = x.dim(2)? / self.heads;
        let qkv = qkv.forward(x)?;
        let scale = 1.0 / (d as f64).sqrt();
        let Some(y) =
            lmkit_kernels::padded_attention::encoder_attention(&qkv, self.heads, lens, scale)?
        else {
            return Ok(None);
        };
        let x = self.attn_norm.forward(&self.attn_out.forward_add(&y, x)?)?;
        // The intermediate output is this layer's own: its activation may overwrite it.
        let m = crate::layers::ops::activation_owned(&self.act, self.intermediate.forward(&x)?)?;
        Ok(Some(
            self.out_norm.forward(&self.output.forward_add(&m, &x)?)?,
        ))
    }

    /// `bias`: additive attention bias [b, 1, 1, t] (0 for tokens, −∞ for padding), if any.
    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let d = h / self.heads;
        let split = |y: Tensor| -> candle_core::Result<Tensor> {
            y.reshape((b, t, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = (split(self.query.forward(x)?)? * (1.0 / (d as f64).sqrt()))?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        // Queries scaled before the product, as transformers' BertSelfAttention.
        let y = attention(&q, &k, &v, Mask::Bias(bias), 1.0)?
            .transpose(1, 2)?
            .reshape((b, t, h))?;
        let x = self.attn_norm.forward(&(x + self.attn_out.forward(&y)?)?)?;
        let m = self
            .output
            .forward(&act(&self.act, &self.intermediate.forward(&x)?)?)?;
        self.out_norm.forward(&(x + m)?)
    }
}

/// The masked-LM head (BERT's `cls.predictions`, RoBERTa's `lm_head`).
struct MlmHead {
    dense: Linear,
    norm: LayerNorm,
    /// The output layer (its weight tied to the word embeddings unless untied).
    decoder: Linear,
    /// BERT's head applies `hidden_act`; RoBERTa's always the exact GELU.
    act: String,
}

impl MlmHead {
    /// The head of `arch` under `p` (`cls.predictions` or `lm_head`).
    fn new(
        cfg: &BertConfig,
        word: &Embedding,
        p: VarBuilder,
        path: &str,
    ) -> candle_core::Result<MlmHead> {
        let h = cfg.hidden_size;
        let (dense, norm, act) = match cfg.arch {
            Encoder::Bert => (
                "transform.dense",
                "transform.LayerNorm",
                cfg.hidden_act.clone(),
            ),
            Encoder::Roberta | Encoder::XlmRoberta => ("dense", "layer_norm", "gelu".into()),
        };
        let decoder = if cfg.tie_word_embeddings {
            word.embeddings().clone()
        } else {
            p.get((cfg.vocab_size, h), "decoder.weight")?
        };
        Ok(MlmHead {
            dense: linear(h, h, p.pp(dense))?,
            norm: LayerNorm::new(h, cfg.layer_norm_eps, p.pp(norm))?,
            decoder: Linear::from_weight(
                decoder,
                Some(p.get(cfg.vocab_size, "bias")?),
                &format!("{path}.decoder"),
            )?,
            act,
        })
    }
}

/// The path of the masked-LM head in a checkpoint of `arch`.
const fn mlm_path(arch: Encoder) -> &'static str {
    match arch {
        Encoder::Bert => "cls.predictions",
        Encoder::Roberta | Encoder::XlmRoberta => "lm_head",
    }
}

/// What a fine-tuned checkpoint's classification head predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// One label distribution per text (`*ForSequenceClassification`), from the first token's
    /// state through a tanh layer (BERT's pooler, RoBERTa's `classifier.dense`).
    Sequence,
    /// One label distribution per token (`*ForTokenClassification`).
    Token,
}

/// The layers of a classification head.
enum HeadLayers {
    /// The tanh layer over the first token's state, then the output layer.
    Sequence { dense: Linear, out: Linear },
    /// The output layer over every token's state.
    Token { out: Linear },
}

/// A classification head and its labels (`id2label` of config.json, in id order).
struct TaskHead {
    layers: HeadLayers,
    labels: Vec<String>,
    /// `problem_type: multi_label_classification`: independent sigmoids instead of a softmax.
    multi_label: bool,
}

impl TaskHead {
    /// The head named by config.json's `architectures`, if it is a classification head.
    fn load(
        cfg: &BertConfig,
        raw: &serde_json::Value,
        root: &VarBuilder,
        vb: &VarBuilder,
        config_path: &Path,
    ) -> Result<Option<Box<TaskHead>>> {
        let class = raw
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .unwrap_or("");
        let task = if class.ends_with("ForSequenceClassification") {
            Task::Sequence
        } else if class.ends_with("ForTokenClassification") {
            Task::Token
        } else {
            return Ok(None);
        };
        let bad = |msg: String| crate::ModelError::Config {
            path: config_path.to_path_buf(),
            msg,
        };
        let map = raw
            .get("id2label")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad(format!("{class} needs `id2label` (its labels)")))?;
        let mut labels = vec![None; map.len()];
        for (k, v) in map {
            let i: usize = k
                .parse()
                .ok()
                .filter(|&i| i < labels.len())
                .ok_or_else(|| {
                    bad(format!(
                        "id2label: `{k}` is not a label id below {}",
                        map.len()
                    ))
                })?;
            labels[i] = Some(v.as_str().unwrap_or_default().to_string());
        }
        let labels: Vec<String> = labels.into_iter().map(Option::unwrap_or_default).collect();
        let (h, n) = (cfg.hidden_size, labels.len());
        let tensors = |e: candle_core::Error| crate::tensor_error(config_path, e);
        let layers = match (task, cfg.arch) {
            (Task::Token, _) => HeadLayers::Token {
                out: linear(h, n, vb.pp("classifier")).map_err(tensors)?,
            },
            (Task::Sequence, Encoder::Bert) => HeadLayers::Sequence {
                dense: linear(h, h, root.pp("pooler.dense")).map_err(tensors)?,
                out: linear(h, n, vb.pp("classifier")).map_err(tensors)?,
            },
            (Task::Sequence, Encoder::Roberta | Encoder::XlmRoberta) => HeadLayers::Sequence {
                dense: linear(h, h, vb.pp("classifier.dense")).map_err(tensors)?,
                out: linear(h, n, vb.pp("classifier.out_proj")).map_err(tensors)?,
            },
        };
        Ok(Some(Box::new(TaskHead {
            layers,
            labels,
            multi_label: raw.get("problem_type").and_then(|p| p.as_str())
                == Some("multi_label_classification"),
        })))
    }
}

/// The masked-LM head's parts: dense layer, its activation and norm, the output layer (weight
/// tied to the word embeddings unless untied, and bias).
pub struct HeadParts<'a> {
    pub dense: &'a Linear,
    pub norm: &'a LayerNorm,
    pub decoder: &'a Linear,
    pub activation: &'a str,
}

/// The model's parts as a training pass reads them (see [`Bert::parts`]): word, position and
/// token-type embeddings, the embedding norm, the layers (no cross-attention), the head.
pub struct Parts<'a> {
    pub word: &'a Tensor,
    pub position: &'a Tensor,
    pub token_type: &'a Tensor,
    pub emb_norm: &'a LayerNorm,
    pub layers: Vec<LayerParts<'a>>,
    pub activation: &'a str,
    pub head: Option<HeadParts<'a>>,
}

pub struct Bert {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    /// Absent in a `BertModel` checkpoint (an encoder without the masked-LM head).
    head: Option<MlmHead>,
    /// A fine-tuned classification head, when the checkpoint has one.
    task: Option<Box<TaskHead>>,
    pub pooling: Pooling,
    pub cfg: BertConfig,
}

impl Bert {
    /// A `BertForMaskedLM` (tensors under `bert.` and `cls.predictions.`; RoBERTa's under
    /// `roberta.` and `lm_head.`), as training creates it.
    pub fn new(cfg: &BertConfig, vb: VarBuilder) -> candle_core::Result<Bert> {
        let head = mlm_path(cfg.arch);
        Self::build(cfg, vb.pp(cfg.arch.prefix()), Some(vb.pp(head)))
    }

    fn build(
        cfg: &BertConfig,
        vb: VarBuilder,
        head: Option<VarBuilder>,
    ) -> candle_core::Result<Bert> {
        let h = cfg.hidden_size;
        let e = vb.pp("embeddings");
        let word = embedding(cfg.vocab_size, h, e.pp("word_embeddings"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, vb.pp(format!("encoder.layer.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let head = head
            .map(|p| MlmHead::new(cfg, &word, p, mlm_path(cfg.arch)))
            .transpose()?;
        Ok(Bert {
            position: embedding(cfg.max_position_embeddings, h, e.pp("position_embeddings"))?,
            token_type: embedding(cfg.type_vocab_size, h, e.pp("token_type_embeddings"))?,
            emb_norm: LayerNorm::new(h, cfg.layer_norm_eps, e.pp("LayerNorm"))?,
            word,
            layers,
            head,
            task: None,
            pooling: Pooling::default(),
            cfg: cfg.clone(),
        })
    }

    /// Loads `dir/config.json` and its weights (f32) onto `device`: a `*ForMaskedLM`, an
    /// encoder saved without a head (`BertModel`, tensors under `bert.`/`roberta.` or at the
    /// top level), or one with a classification head, with the sentence-transformers pooling of
    /// the directory.
    pub fn load(dir: &Path, device: &Device) -> Result<Bert> {
        let dir = crate::resolve_checkpoint(dir);
        let config_path = dir.join("config.json");
        // Read once: the config, and the head's class and labels beside it.
        let raw = crate::registry::read_json(&config_path)?;
        let cfg = BertConfig::from_json(raw.clone(), &config_path)?;
        let vb = crate::mmap_weights(&dir, device, Some(cfg.num_hidden_layers), DType::F32)?;
        let root = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb.clone()
        } else {
            vb.pp(cfg.arch.prefix())
        };
        let path = mlm_path(cfg.arch);
        let head = vb
            .contains_tensor(&format!("{path}.bias"))
            .then(|| vb.pp(path));
        let mut m =
            Bert::build(&cfg, root.clone(), head).map_err(|e| crate::tensor_error(&dir, e))?;
        m.task = TaskHead::load(&cfg, &raw, &root, &vb, &config_path)?;
        m.pooling = Pooling::load(&dir)?;
        Ok(m)
    }

    /// The embedding layer's output [b, t, h] for `ids` [b, t] (normalised).
    fn embeddings(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.cfg.max_tokens() {
            candle_core::bail!(
                "{t} tokens exceed the {} this model reads (max_position_embeddings {})",
                self.cfg.max_tokens(),
                self.cfg.max_position_embeddings
            );
        }
        let flat: Vec<u32> = ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
        let pos = Tensor::from_vec(self.position_ids(&flat, t), (b, t), ids.device())?;
        let types = Tensor::zeros((b, t), DType::U32, ids.device())?;
        let x = self
            .word
            .forward(ids)?
            .broadcast_add(&self.position.forward(&pos)?)?
            .add(&self.token_type.forward(&types)?)?;
        self.emb_norm.forward(&x)
    }

    /// The position of each of `ids` (rows of `t`, flattened): 0.. in each row for BERT; for
    /// RoBERTa as transformers' create_position_ids_from_input_ids: padding keeps the padding
    /// id, the n-th other token of a row gets padding id + n.
    pub fn position_ids(&self, ids: &[u32], t: usize) -> Vec<u32> {
        if !self.cfg.arch.positions_after_padding() {
            return (0..ids.len()).map(|i| (i % t.max(1)) as u32).collect();
        }
        let pad = self.cfg.pad() as u32;
        ids.chunks(t.max(1))
            .flat_map(|row| {
                row.iter().scan(pad, move |n, &id| {
                    Some(if id == pad {
                        pad
                    } else {
                        *n += 1;
                        *n
                    })
                })
            })
            .collect()
    }

    /// The parts a hand-written training pass reads; `None` for a model with a classification
    /// head (its pass is not written).
    pub fn parts(&self) -> Option<Parts<'_>> {
        if self.task.is_some() {
            return None;
        }
        Some(Parts {
            word: self.word.embeddings(),
            position: self.position.embeddings(),
            token_type: self.token_type.embeddings(),
            emb_norm: &self.emb_norm,
            layers: self
                .layers
                .iter()
                .map(|l| LayerParts {
                    self_attn: AttentionParts {
                        q: &l.query,
                        k: &l.key,
                        v: &l.value,
                        out: &l.attn_out,
                        heads: l.heads,
                    },
                    self_norm: &l.attn_norm,
                    cross: None,
                    fc1: &l.intermediate,
                    fc2: &l.output,
                    final_norm: &l.out_norm,
                })
                .collect(),
            activation: &self.cfg.hidden_act,
            head: self.head.as_ref().map(|h| HeadParts {
                dense: &h.dense,
                norm: &h.norm,
                decoder: &h.decoder,
                activation: &h.act,
            }),
        })
    }

    /// Last hidden states [b, t, h] for `ids` [b, t]; `mask` [b, t] is 1 for tokens, 0 for padding.
    pub fn hidden(&self, ids: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let mut x = self.embeddings(ids)?;
        let bias = mask.map(padding_bias).transpose()?;
        for l in &self.layers {
            x = l.forward(&x, bias.as_ref())?;
        }
        Ok(x)
    }

    /// Where the weights live.
    pub fn word_device(&self) -> &Device {
        self.word.embeddings().device()
    }

    /// Whether the checkpoint has the masked-LM head.
    pub fn has_mlm_head(&self) -> bool {
        self.head.is_some()
    }

    /// Masked-LM logits [b, t, vocab] from hidden states.
    pub fn mlm_logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let Some(head) = &self.head else {
            candle_core::bail!(
                "this checkpoint is an encoder without the masked-LM head (BertModel): it gives embeddings, not token predictions"
            )
        };
        let x = act(&head.act, &head.dense.forward(hidden)?)?;
        let x = head.norm.forward(&x)?;
        head.decoder.forward(&x)
    }

    /// The classification head's task, when the checkpoint has one.
    pub fn task(&self) -> Option<Task> {
        self.task.as_ref().map(|t| match t.layers {
            HeadLayers::Sequence { .. } => Task::Sequence,
            HeadLayers::Token { .. } => Task::Token,
        })
    }

    /// The classification head's labels in id order (empty without one).
    pub fn labels(&self) -> &[String] {
        self.task.as_ref().map_or(&[], |t| &t.labels)
    }

    /// Whether the labels are independent (sigmoid per label) rather than one softmax.
    pub fn multi_label(&self) -> bool {
        self.task.as_ref().is_some_and(|t| t.multi_label)
    }

    /// The classification head's logits: [b, labels] for a sequence head (from the first
    /// token), [b, t, labels] for a token head.
    pub fn task_logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let Some(head) = &self.task else {
            candle_core::bail!(
                "this checkpoint has no classification head (config.json's architectures names no *ForSequenceClassification or *ForTokenClassification)"
            )
        };
        match &head.layers {
            HeadLayers::Sequence { dense, out } => {
                let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
                out.forward(&dense.forward(&first)?.tanh()?)
            }
            HeadLayers::Token { out } => out.forward(hidden),
        }
    }

    /// Sentence embeddings [b, h]: the last hidden states pooled (and normalised) as the
    /// model's pooling says; by default the mean over real tokens.
    /// Inference only (the fast path has no backward pass): each row attends over its real
    /// tokens, which `mask` says come first.
    pub fn embed(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.hidden_inference(ids, mask)?;
        self.pooling.pool(&h, mask)
    }

    /// [`Bert::hidden`] for inference, on rows whose real tokens come first (as `mask` says).
    fn hidden_inference(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let rows = mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let lens: Vec<usize> = rows
            .iter()
            .map(|r| r.iter().filter(|&&m| m != 0).count())
            .collect();
        let leading = rows
            .iter()
            .zip(&lens)
            .all(|(r, &n)| r[..n].iter().all(|&m| m != 0));
        if !leading || ids.dim(1)? > self.cfg.max_tokens() {
            return self.hidden(ids, Some(mask));
        }
        let mut x = self.embeddings(ids)?;
        for l in &self.layers {
            x = match l.forward_lens(&x, &lens)? {
                Some(y) => y,
                None => return self.hidden(ids, Some(mask)),
            };
        }
        Ok(x)
    }
}

/// Picks positions for masked-LM training (Devlin et al.: 15% of tokens; of those 80% become the
/// mask token, 10% a random token, 10% stay). Returns the corrupted ids and, per position, the
/// id to predict or `None`. `rand` yields uniform numbers in [0, 1).
pub fn mask_tokens(
    ids: &[u32],
    mask_id: u32,
    vocab: u32,
    special: &[u32],
    rand: &mut dyn FnMut() -> f64,
) -> (Vec<u32>, Vec<Option<u32>>) {
    let mut out = ids.to_vec();
    let mut targets = vec![None; ids.len()];
    for (i, &id) in ids.iter().enumerate() {
        if special.contains(&id) || rand() >= 0.15 {
            continue;
        }
        targets[i] = Some(id);
        let r = rand();
        if r < 0.8 {
            out[i] = mask_id;
        } else if r < 0.9 {
            out[i] = (rand() * vocab as f64) as u32 % vocab;
        }
    }
    (out, targets)
}

/// Last-dim index of the largest value.
pub fn argmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    x.argmax(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_follows_the_80_10_10_rule() {
        let ids: Vec<u32> = (0..200_000).map(|i| 5 + (i % 50)).collect();
        let mut s = 7u64;
        let mut rand = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        let (out, t) = mask_tokens(&ids, 1, 60, &[5], &mut rand);
        let picked: Vec<usize> = (0..ids.len()).filter(|&i| t[i].is_some()).collect();
        let share = picked.len() as f64 / ids.len() as f64;
        assert!((share - 0.15 * 49.0 / 50.0).abs() < 0.005, "{share}");
        let masked = picked.iter().filter(|&&i| out[i] == 1).count() as f64 / picked.len() as f64;
        let kept =
            picked.iter().filter(|&&i| out[i] == ids[i]).count() as f64 / picked.len() as f64;
        assert!((masked - 0.8).abs() < 0.01, "{masked}");
        // Kept: 10%, plus random replacements that drew the same token.
        assert!((kept - 0.1).abs() < 0.01, "{kept}");
        assert!(
            ids.iter().zip(&t).all(|(&i, t)| i != 5 || t.is_none()),
            "special tokens are never picked"
        );
    }
}
