//! Model configs that read and write Hugging Face `config.json` (field names as in transformers).

use crate::error::{ModelError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

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
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_layer", self.n_layer),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !matches!(
            self.activation_function.as_str(),
            "gelu_new" | "gelu" | "gelu_pytorch_tanh" | "relu"
        ) {
            return Err(format!(
                "activation_function `{}` is not supported",
                self.activation_function
            ));
        }
        Ok(())
    }
}

fn llama_eps() -> f64 {
    1e-6
}
fn rope_theta() -> f64 {
    10_000.0
}
fn silu() -> String {
    "silu".into()
}

/// `LlamaForCausalLM` (transformers `LlamaConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
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
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

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
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err("rope_scaling is not supported yet".into());
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        Ok(())
    }
}

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
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
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

/// Reads `config.json` for a model family that must have `model_type` `expected`, deserializes and
/// validates it, naming the file in every error.
pub(crate) fn load_typed<T: serde::de::DeserializeOwned>(
    path: &Path,
    expected: &str,
    validate: impl Fn(&T) -> std::result::Result<(), String>,
) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let bad = |msg: String| ModelError::Config {
        path: path.to_path_buf(),
        msg,
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let mt = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
    if mt != expected {
        return Err(ModelError::UnsupportedModel {
            path: path.to_path_buf(),
            model_type: mt.to_string(),
        });
    }
    let cfg: T = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
    validate(&cfg).map_err(bad)?;
    Ok(cfg)
}

/// A decoder config, told apart by `model_type`.
#[derive(Clone, Debug, PartialEq)]
pub enum DecoderConfig {
    Gpt2(Gpt2Config),
    Llama(LlamaConfig),
    Rnn(RnnConfig),
}

impl DecoderConfig {
    /// Reads and validates `config.json`.
    pub fn load(path: &Path) -> Result<DecoderConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            msg: format!("not valid JSON: {e}"),
        })?;
        Self::from_json(v, path)
    }

    /// Validates a config given as JSON; `path` names it in errors.
    pub fn from_json(v: serde_json::Value, path: &Path) -> Result<DecoderConfig> {
        let bad = |msg: String| ModelError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let model_type = v
            .get("model_type")
            .and_then(|m| m.as_str())
            .unwrap_or_default()
            .to_string();
        let cfg = match model_type.as_str() {
            "gpt2" => {
                DecoderConfig::Gpt2(serde_json::from_value(v).map_err(|e| bad(e.to_string()))?)
            }
            "llama" => {
                DecoderConfig::Llama(serde_json::from_value(v).map_err(|e| bad(e.to_string()))?)
            }
            "lmkit_rnn" => {
                DecoderConfig::Rnn(serde_json::from_value(v).map_err(|e| bad(e.to_string()))?)
            }
            _ => {
                return Err(ModelError::UnsupportedModel {
                    path: path.to_path_buf(),
                    model_type,
                })
            }
        };
        match &cfg {
            DecoderConfig::Gpt2(c) => c.validate(),
            DecoderConfig::Llama(c) => c.validate(),
            DecoderConfig::Rnn(c) => c.validate(),
        }
        .map_err(bad)?;
        Ok(cfg)
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            DecoderConfig::Gpt2(c) => c.vocab_size,
            DecoderConfig::Llama(c) => c.vocab_size,
            DecoderConfig::Rnn(c) => c.vocab_size,
        }
    }

    pub fn max_positions(&self) -> usize {
        match self {
            DecoderConfig::Gpt2(c) => c.n_positions,
            DecoderConfig::Llama(c) => c.max_position_embeddings,
            DecoderConfig::Rnn(c) => c.max_position_embeddings,
        }
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        match self {
            DecoderConfig::Gpt2(c) => c.eos_token_id,
            DecoderConfig::Llama(c) => c.eos_token_id,
            DecoderConfig::Rnn(c) => c.eos_token_id,
        }
    }
}
