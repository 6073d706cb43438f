//! The model families lmkit knows, and the only place that tells them apart by `model_type`.
//! Everything else asks a [`ModelConfig`] (what its family says through [`FamilyConfig`]) or
//! dispatches on its [`Kind`].

use crate::error::{ModelError, Result};
use crate::families::{
    bart::BartConfig, bert::BertConfig, gpt2::Gpt2Config, gpt_neox::GptNeoxConfig,
    llama::LlamaConfig, rnn::RnnConfig,
};
use crate::families::{FamilyConfig, Kind, ParamRole, SpecialIds, TokenIdFields};
use std::path::Path;

/// One registered family.
pub struct Family {
    pub model_type: &'static str,
    pub architecture: &'static str,
    pub kind: Kind,
    parse: fn(serde_json::Value) -> std::result::Result<ModelConfig, String>,
    token_id_fields: fn(SpecialIds) -> TokenIdFields,
}

fn parse<C: FamilyConfig>(v: serde_json::Value) -> std::result::Result<ModelConfig, String> {
    let cfg: C = serde_json::from_value(v).map_err(|e| e.to_string())?;
    cfg.validate()?;
    Ok(cfg.into_model_config())
}

/// A Llama-like decoder of `model_type` `arch`'s: a Llama config with its differences on.
fn parse_variant(
    v: serde_json::Value,
    arch: crate::families::llama::Arch,
) -> std::result::Result<ModelConfig, String> {
    let mut cfg: LlamaConfig = serde_json::from_value(v).map_err(|e| e.to_string())?;
    cfg.arch = arch;
    cfg.validate()?;
    Ok(ModelConfig::Llama(cfg))
}

fn parse_mistral(v: serde_json::Value) -> std::result::Result<ModelConfig, String> {
    parse_variant(v, crate::families::llama::Arch::Mistral)
}
fn parse_qwen2(v: serde_json::Value) -> std::result::Result<ModelConfig, String> {
    parse_variant(v, crate::families::llama::Arch::Qwen2)
}
fn parse_qwen3(v: serde_json::Value) -> std::result::Result<ModelConfig, String> {
    parse_variant(v, crate::families::llama::Arch::Qwen3)
}

/// A BERT-like encoder of `model_type` `arch`'s.
fn parse_encoder(
    v: serde_json::Value,
    arch: crate::families::bert::Encoder,
) -> std::result::Result<ModelConfig, String> {
    let mut cfg: BertConfig = serde_json::from_value(v).map_err(|e| e.to_string())?;
    cfg.arch = arch;
    cfg.validate()?;
    Ok(ModelConfig::Bert(cfg))
}

fn parse_roberta(v: serde_json::Value) -> std::result::Result<ModelConfig, String> {
    parse_encoder(v, crate::families::bert::Encoder::Roberta)
}
fn parse_xlm_roberta(v: serde_json::Value) -> std::result::Result<ModelConfig, String> {
    parse_encoder(v, crate::families::bert::Encoder::XlmRoberta)
}

impl Family {
    /// A Llama-like decoder (see [`crate::families::llama::Arch`]).
    const fn llama_variant(
        arch: crate::families::llama::Arch,
        parse: fn(serde_json::Value) -> std::result::Result<ModelConfig, String>,
    ) -> Family {
        Family {
            model_type: arch.model_type(),
            architecture: arch.architecture(),
            kind: Kind::Causal,
            parse,
            token_id_fields: LlamaConfig::token_id_fields,
        }
    }

    /// A BERT-like encoder (see [`crate::families::bert::Encoder`]).
    const fn encoder_variant(
        arch: crate::families::bert::Encoder,
        parse: fn(serde_json::Value) -> std::result::Result<ModelConfig, String>,
    ) -> Family {
        Family {
            model_type: arch.model_type(),
            architecture: arch.architecture(),
            kind: Kind::Masked,
            parse,
            token_id_fields: BertConfig::token_id_fields,
        }
    }

    const fn of<C: FamilyConfig>() -> Family {
        Family {
            model_type: C::MODEL_TYPE,
            architecture: C::ARCHITECTURE,
            kind: C::KIND,
            parse: parse::<C>,
            token_id_fields: C::token_id_fields,
        }
    }

    /// Token-id fields a new model of this family takes from its tokenizer.
    pub fn token_id_fields(&self, ids: SpecialIds) -> TokenIdFields {
        (self.token_id_fields)(ids)
    }
}

/// Every family, one line each.
pub static FAMILIES: &[Family] = &[
    Family::of::<Gpt2Config>(),
    Family::of::<GptNeoxConfig>(),
    Family::of::<LlamaConfig>(),
    Family::llama_variant(crate::families::llama::Arch::Mistral, parse_mistral),
    Family::llama_variant(crate::families::llama::Arch::Qwen2, parse_qwen2),
    Family::llama_variant(crate::families::llama::Arch::Qwen3, parse_qwen3),
    Family::of::<RnnConfig>(),
    Family::of::<BertConfig>(),
    Family::encoder_variant(crate::families::bert::Encoder::Roberta, parse_roberta),
    Family::encoder_variant(
        crate::families::bert::Encoder::XlmRoberta,
        parse_xlm_roberta,
    ),
    Family::of::<BartConfig>(),
];

/// The `model_type`s lmkit reads, for error messages.
pub fn supported() -> String {
    FAMILIES
        .iter()
        .map(|f| f.model_type)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The family of a `config.json` (as JSON); `path` names it in errors.
pub fn family_of(v: &serde_json::Value, path: &Path) -> Result<&'static Family> {
    let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
    FAMILIES
        .iter()
        .find(|f| f.model_type == model_type)
        .ok_or_else(|| ModelError::UnsupportedModel {
            path: path.to_path_buf(),
            model_type: model_type.to_string(),
            supported: supported(),
        })
}

/// A model's config, of whichever family.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelConfig {
    Gpt2(Gpt2Config),
    GptNeox(GptNeoxConfig),
    Llama(LlamaConfig),
    Rnn(RnnConfig),
    Bert(BertConfig),
    Bart(BartConfig),
}

/// `$body` with `$c` bound to the family config inside `$cfg`.
macro_rules! with_family {
    ($cfg:expr, $c:ident => $body:expr) => {
        match $cfg {
            ModelConfig::Gpt2($c) => $body,
            ModelConfig::GptNeox($c) => $body,
            ModelConfig::Llama($c) => $body,
            ModelConfig::Rnn($c) => $body,
            ModelConfig::Bert($c) => $body,
            ModelConfig::Bart($c) => $body,
        }
    };
}

/// Reads a JSON file, naming it in errors.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ModelError::Io(lmkit_core::PathError::new(path, e)))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        msg: format!("not valid JSON: {e}"),
    })
}

impl ModelConfig {
    /// Reads and validates a `config.json` file.
    pub fn load(path: &Path) -> Result<ModelConfig> {
        Self::from_json(read_json(path)?, path)
    }

    /// The config of a checkpoint directory (or of the checkpoint a run directory's `latest`
    /// names).
    pub fn load_dir(dir: &Path) -> Result<ModelConfig> {
        Self::load(&crate::resolve_checkpoint(dir).join("config.json"))
    }

    /// Validates a config given as JSON; `path` names it in errors.
    pub fn from_json(v: serde_json::Value, path: &Path) -> Result<ModelConfig> {
        let family = family_of(&v, path)?;
        let bad = |msg: String| ModelError::Config {
            path: path.to_path_buf(),
            msg,
        };
        (family.parse)(v).map_err(bad)
    }

    pub fn family(&self) -> &'static Family {
        let model_type = match self {
            // One config type serves the Llama-like decoders, one the BERT-like encoders; their
            // `arch` says which.
            ModelConfig::Llama(c) => c.arch.model_type(),
            ModelConfig::Bert(c) => c.arch.model_type(),
            _ => with_family!(self, c => family_model_type(c)),
        };
        FAMILIES
            .iter()
            .find(|f| f.model_type == model_type)
            .expect("every ModelConfig variant is registered")
    }

    pub fn kind(&self) -> Kind {
        self.family().kind
    }

    pub fn vocab_size(&self) -> usize {
        with_family!(self, c => c.vocab_size())
    }

    pub fn max_positions(&self) -> usize {
        with_family!(self, c => c.max_positions())
    }

    pub fn num_layers(&self) -> usize {
        with_family!(self, c => c.num_layers())
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        with_family!(self, c => c.eos_token_id())
    }

    pub fn param_role(&self, name: &str) -> ParamRole {
        with_family!(self, c => c.param_role(name))
    }

    pub fn width(&self) -> usize {
        with_family!(self, c => c.width())
    }

    pub fn num_parameters(&self) -> u64 {
        with_family!(self, c => c.num_parameters())
    }

    /// The `config.json` fields this family reads (and writes), sorted.
    pub fn known_fields(&self) -> Vec<String> {
        let v = with_family!(self, c => serde_json::to_value(c)).unwrap_or_default();
        let unread = with_family!(self, c => c.unread_fields());
        let mut keys: Vec<String> = v
            .as_object()
            .map(|o| o.keys().filter(|k| !unread.contains(k)).cloned().collect())
            .unwrap_or_default();
        for k in ["model_type", "architectures", "torch_dtype"] {
            if !keys.iter().any(|x| x == k) {
                keys.push(k.to_string());
            }
        }
        keys.sort();
        keys
    }

    /// The model config of a causal-LM config.
    pub fn from_decoder(cfg: &DecoderConfig) -> ModelConfig {
        match cfg.clone() {
            DecoderConfig::Gpt2(c) => ModelConfig::Gpt2(c),
            DecoderConfig::GptNeox(c) => ModelConfig::GptNeox(c),
            DecoderConfig::Llama(c) => ModelConfig::Llama(c),
            DecoderConfig::Rnn(c) => ModelConfig::Rnn(c),
        }
    }

    /// The causal-LM config, when this is a causal family.
    pub fn into_decoder(self) -> Option<DecoderConfig> {
        match self {
            ModelConfig::Gpt2(c) => Some(DecoderConfig::Gpt2(c)),
            ModelConfig::GptNeox(c) => Some(DecoderConfig::GptNeox(c)),
            ModelConfig::Llama(c) => Some(DecoderConfig::Llama(c)),
            ModelConfig::Rnn(c) => Some(DecoderConfig::Rnn(c)),
            ModelConfig::Bert(_) | ModelConfig::Bart(_) => None,
        }
    }
}

fn family_model_type<C: FamilyConfig>(_: &C) -> &'static str {
    C::MODEL_TYPE
}

/// The config of a causal language model ([`Kind::Causal`] families).
#[derive(Clone, Debug, PartialEq)]
pub enum DecoderConfig {
    Gpt2(Gpt2Config),
    GptNeox(GptNeoxConfig),
    Llama(LlamaConfig),
    Rnn(RnnConfig),
}

impl DecoderConfig {
    /// Reads and validates `config.json`; a family that is not a causal LM is an error.
    pub fn load(path: &Path) -> Result<DecoderConfig> {
        Self::from_json(read_json(path)?, path)
    }

    /// Validates a config given as JSON; `path` names it in errors.
    pub fn from_json(v: serde_json::Value, path: &Path) -> Result<DecoderConfig> {
        let cfg = ModelConfig::from_json(v, path)?;
        let kind = cfg.kind();
        let model_type = cfg.family().model_type;
        cfg.into_decoder().ok_or_else(|| ModelError::Config {
            path: path.to_path_buf(),
            msg: format!(
                "model_type `{model_type}` is not a causal language model ({kind:?}); this command needs one"
            ),
        })
    }

    pub fn vocab_size(&self) -> usize {
        with_decoder!(self, c => c.vocab_size())
    }

    /// Bytes a sequence's KV cache takes per position with its values in `elem`-byte numbers
    /// (the model's activation type): every layer's keys and values; 0 for a recurrent model,
    /// whose state does not grow with the text.
    pub fn kv_bytes_per_position(&self, elem: usize) -> u64 {
        let (layers, width) = match self {
            DecoderConfig::Gpt2(c) => (c.n_layer, c.n_embd),
            DecoderConfig::GptNeox(c) => (c.num_hidden_layers, c.hidden_size),
            DecoderConfig::Llama(c) => (c.num_hidden_layers, c.num_kv_heads() * c.head_dim()),
            DecoderConfig::Rnn(_) => (0, 0),
        };
        (2 * layers * width * elem) as u64
    }

    pub fn max_positions(&self) -> usize {
        with_decoder!(self, c => c.max_positions())
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        with_decoder!(self, c => c.eos_token_id())
    }

    pub fn num_layers(&self) -> usize {
        with_decoder!(self, c => c.num_layers())
    }

    /// The width of the final hidden states.
    pub fn hidden_size(&self) -> usize {
        match self {
            DecoderConfig::Gpt2(c) => c.n_embd,
            DecoderConfig::GptNeox(c) => c.hidden_size,
            DecoderConfig::Llama(c) => c.hidden_size,
            DecoderConfig::Rnn(c) => c.hidden_size,
        }
    }
}

/// `$body` with `$c` bound to the family config inside a [`DecoderConfig`].
macro_rules! with_decoder {
    ($cfg:expr, $c:ident => $body:expr) => {
        match $cfg {
            DecoderConfig::Gpt2($c) => $body,
            DecoderConfig::GptNeox($c) => $body,
            DecoderConfig::Llama($c) => $body,
            DecoderConfig::Rnn($c) => $body,
        }
    };
}
use with_decoder;

/// Reads `config.json` of a model that must be of family `C`, naming the file in every error.
pub fn load_family<C: FamilyConfig>(path: &Path) -> Result<C> {
    let v = read_json(path)?;
    let family = family_of(&v, path)?;
    if family.model_type != C::MODEL_TYPE {
        return Err(ModelError::Config {
            path: path.to_path_buf(),
            msg: format!(
                "model_type is `{}`, but this needs `{}`",
                family.model_type,
                C::MODEL_TYPE
            ),
        });
    }
    let bad = |msg: String| ModelError::Config {
        path: path.to_path_buf(),
        msg,
    };
    let cfg: C = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
    cfg.validate().map_err(bad)?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    /// A tiny config of every registered family, as `lmkit train` would write it.
    fn tiny(model_type: &str) -> serde_json::Value {
        let mut v = match model_type {
            "gpt2" => {
                serde_json::json!({"n_positions": 16, "n_embd": 8, "n_layer": 2, "n_head": 2, "tie_word_embeddings": false})
            }
            "llama" | "mistral" | "qwen2" | "qwen3" => {
                serde_json::json!({"hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 16, "attention_bias": true})
            }
            "gpt_neox" => {
                serde_json::json!({"hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
                "num_attention_heads": 2, "max_position_embeddings": 16, "rotary_pct": 0.5})
            }
            "lmkit_rnn" => {
                serde_json::json!({"model_type": "lmkit_rnn", "cell": "lstm", "hidden_size": 8, "num_layers": 2})
            }
            "bert" | "roberta" | "xlm-roberta" => {
                serde_json::json!({"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 12, "max_position_embeddings": 16, "tie_word_embeddings": false})
            }
            "bart" => serde_json::json!({"d_model": 8, "encoder_layers": 1, "decoder_layers": 2,
                "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 12,
                "decoder_ffn_dim": 12, "max_position_embeddings": 16}),
            other => panic!("no tiny config for {other}"),
        };
        v["model_type"] = model_type.into();
        v["vocab_size"] = 20.into();
        v
    }

    /// The variables a model of `cfg` creates: (name, shape).
    fn variables(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        match cfg.clone() {
            ModelConfig::Bert(c) => {
                crate::bert::Bert::new(&c, vb).unwrap();
            }
            ModelConfig::Bart(c) => {
                crate::bart::Bart::new(&c, vb).unwrap();
            }
            other => {
                let c = other.into_decoder().unwrap();
                crate::CausalLm::from_var_builder(&c, vb, Path::new("t")).unwrap();
            }
        }
        let data = vm.data().lock().unwrap();
        data.iter()
            .map(|(n, v)| (n.clone(), v.dims().to_vec()))
            .collect()
    }

    #[test]
    fn every_family_parses_and_knows_its_parameters() {
        for family in FAMILIES {
            let cfg = ModelConfig::from_json(tiny(family.model_type), Path::new("t")).unwrap();
            assert_eq!(cfg.family().model_type, family.model_type);
            assert_eq!(cfg.kind(), family.kind);
            assert_eq!(cfg.vocab_size(), 20);
            let vars = variables(&cfg);
            assert!(!vars.is_empty());
            let counted: usize = vars.iter().map(|(_, d)| d.iter().product::<usize>()).sum();
            assert_eq!(
                cfg.num_parameters(),
                counted as u64,
                "{}",
                family.model_type
            );
            let mut embeddings = 0;
            for (name, dims) in &vars {
                let role = cfg.param_role(name);
                let what = format!("{}: {name} {dims:?} → {role:?}", family.model_type);
                match role {
                    ParamRole::Bias => assert!(name.ends_with("bias"), "{what}"),
                    ParamRole::NormGain => assert_eq!(dims.len(), 1, "{what}"),
                    ParamRole::Weight | ParamRole::ResidualOut => {
                        assert_eq!(dims.len(), 2, "{what}")
                    }
                    ParamRole::Embedding => {
                        assert_eq!(dims.len(), 2, "{what}");
                        embeddings += 1;
                    }
                    ParamRole::Recurrent { hidden, .. } => {
                        assert!(name.starts_with("rnn."), "{what}");
                        assert_eq!(hidden, 8);
                    }
                }
                if dims.len() == 1 {
                    assert!(!role.decays(), "{what}: 1-D tensors are never decayed");
                }
                if name.ends_with("bias") && !name.starts_with("rnn.") {
                    assert_eq!(role, ParamRole::Bias, "{what}");
                }
            }
            assert!(embeddings >= 1, "{}: no embedding found", family.model_type);
            // Every residual stack has its output projections scaled.
            if matches!(family.model_type, "gpt2" | "llama" | "gpt_neox") {
                let scaled = vars
                    .iter()
                    .filter(|(n, _)| cfg.param_role(n) == ParamRole::ResidualOut)
                    .count();
                assert_eq!(scaled, 2 * 2, "{}", family.model_type);
            }
        }
    }

    #[test]
    fn layer_counts_are_read_from_tensor_names() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            crate::layers_in(&names(&[
                "model.layers.0.mlp.up_proj.weight",
                "model.layers.11.input_layernorm.weight",
                "lm_head.weight"
            ])),
            Some(12)
        );
        assert_eq!(
            crate::layers_in(&names(&["transformer.h.3.attn.c_attn.weight"])),
            Some(4)
        );
        assert_eq!(
            crate::layers_in(&names(&["bert.encoder.layer.5.output.dense.bias"])),
            Some(6)
        );
        assert_eq!(
            crate::layers_in(&names(&["rnn.weight_ih_l0", "wte.weight"])),
            None
        );
    }

    #[test]
    fn unknown_model_types_name_the_supported_ones() {
        let e = ModelConfig::from_json(
            serde_json::json!({"model_type": "mamba"}),
            Path::new("c.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("c.json") && e.contains("`mamba`"), "{e}");
        for f in FAMILIES {
            assert!(e.contains(f.model_type), "{e}");
        }
        let e = DecoderConfig::from_json(tiny("bert"), Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a causal language model"), "{e}");
    }

    #[test]
    fn family_configs_load_only_their_own_model_type() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, tiny("gpt2").to_string()).unwrap();
        let e = load_family::<BertConfig>(&p).unwrap_err().to_string();
        assert!(e.contains("`gpt2`") && e.contains("`bert`"), "{e}");
        assert_eq!(load_family::<Gpt2Config>(&p).unwrap().n_layer, 2);
    }
}
