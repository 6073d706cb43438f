//! One file per model family: its serde `Config` (Hugging Face `config.json` field names), its
//! modules built from a `VarBuilder` with Hugging Face tensor names, and what the rest of lmkit
//! needs to know about it, through [`FamilyConfig`]. [`crate::registry`] lists the families.
//! `ADDING_A_FAMILY.md` beside this crate's manifest shows how to add one.

pub mod bart;
pub mod bert;
pub mod gpt2;
pub mod gpt_neox;
pub mod llama;
pub mod rnn;

use crate::registry::ModelConfig;

/// What a model computes, which decides how it is trained, scored and served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Next-token prediction (decoders, recurrent models): generation, perplexity.
    Causal,
    /// A bidirectional encoder with a masked-LM head: fill-mask, embeddings, pseudo-likelihood.
    Masked,
    /// An encoder-decoder: target given source.
    Seq2seq,
}

/// What a parameter tensor is. Initialisation and weight decay follow from it, so training
/// never guesses from tensor names.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ParamRole {
    /// Token, position or token-type embeddings: N(0, 0.02); no weight decay.
    Embedding,
    /// The weight of a linear layer: N(0, 0.02); decayed.
    Weight,
    /// The last projection of a residual branch: N(0, 0.02/√(2·layers)) (Radford et al. 2019,
    /// §2.3); decayed.
    ResidualOut,
    /// The gain of a layer or RMS norm: ones; no weight decay.
    NormGain,
    /// Any bias (of a linear layer, a norm or the output layer): zeros; no weight decay.
    Bias,
    /// A recurrent layer's weights (`bias`: its biases): U(−1/√hidden, 1/√hidden) as PyTorch's
    /// `nn.RNN`/`nn.LSTM`; weights decayed, biases not.
    Recurrent { hidden: usize, bias: bool },
}

impl ParamRole {
    /// Whether AdamW's weight decay applies.
    pub fn decays(&self) -> bool {
        match self {
            ParamRole::Weight | ParamRole::ResidualOut => true,
            ParamRole::Recurrent { bias, .. } => !bias,
            ParamRole::Embedding | ParamRole::NormGain | ParamRole::Bias => false,
        }
    }
}

/// Special-token ids of the tokenizer a new model is trained with.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpecialIds {
    /// End of text (`<|endoftext|>`).
    pub eot: Option<u32>,
    pub pad: Option<u32>,
}

/// `config.json` token-id fields and their values (`None`: the tokenizer has no such token).
pub type TokenIdFields = Vec<(&'static str, Option<u32>)>;

/// The token-id fields of a decoder: text starts and ends with the end-of-text token.
pub fn decoder_token_ids(ids: SpecialIds) -> TokenIdFields {
    vec![("bos_token_id", ids.eot), ("eos_token_id", ids.eot)]
}

/// What a family tells the rest of lmkit. Implemented by each family's config.
pub trait FamilyConfig: Sized + serde::de::DeserializeOwned {
    /// `model_type` in `config.json`.
    const MODEL_TYPE: &'static str;
    /// The transformers class written to `architectures` when lmkit creates a model.
    const ARCHITECTURE: &'static str;
    const KIND: Kind;

    /// Checks what serde cannot: divisibility, supported activations, math-changing options.
    fn validate(&self) -> Result<(), String>;
    fn vocab_size(&self) -> usize;
    /// The longest sequence the model reads at once.
    fn max_positions(&self) -> usize;
    /// Width of the residual stream (the hidden size), for memory estimates.
    fn width(&self) -> usize;
    /// Layers of the deepest stack (scales residual-branch initialisation).
    fn num_layers(&self) -> usize;
    fn eos_token_id(&self) -> Option<u32>;
    /// `config.json` token-id fields a new model takes from its tokenizer (when not given).
    fn token_id_fields(ids: SpecialIds) -> TokenIdFields;
    /// Parameters of a model of this config (tied tensors once): what memory checks count
    /// before anything is allocated. Counted in f64 (exact below 2^53), so that a config of
    /// absurd sizes gives a huge count (at most `u64::MAX`) rather than one wrapped past 2^64.
    fn num_parameters(&self) -> u64;
    /// The role of the parameter tensor named `name` (Hugging Face name).
    fn param_role(&self, name: &str) -> ParamRole;
    fn into_model_config(self) -> ModelConfig;
    /// Keys of the config this family keeps without reading them (not among its fields).
    fn unread_fields(&self) -> Vec<String> {
        Vec::new()
    }
}

/// `Err` naming the first of `fields` (config key, value) that is zero.
pub(crate) fn require_positive(fields: &[(&str, usize)]) -> Result<(), String> {
    match fields.iter().find(|(_, v)| *v == 0) {
        Some((name, _)) => Err(format!("{name} must be positive")),
        None => Ok(()),
    }
}

/// `Err` naming the first of `keys` that a config sets (to anything but null or false) among the
/// keys its family keeps without reading (`other`): keys that change what a model computes.
pub(crate) fn refuse_unread<'a>(
    other: &serde_json::Map<String, serde_json::Value>,
    keys: impl IntoIterator<Item = &'a str>,
    model_type: &str,
) -> Result<(), String> {
    for key in keys {
        match other.get(key) {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => {}
            Some(v) => {
                return Err(format!(
                    "`{key}` ({v}) changes the computation and is not supported for model_type {model_type}"
                ))
            }
        }
    }
    Ok(())
}

/// `eos_token_id` as transformers writes it: one id or a list (Llama 3, Qwen2.5 instruct); a list
/// reads as its first id here (all of them stop generation: [`crate::stop_token_ids`]).
pub(crate) mod one_or_first {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        Ok(match Option::<OneOrMany>::deserialize(d)? {
            None => None,
            Some(OneOrMany::One(id)) => Some(id),
            Some(OneOrMany::Many(ids)) => ids.first().copied(),
        })
    }

    pub fn serialize<S: Serializer>(v: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(id) => s.serialize_u32(*id),
            None => s.serialize_none(),
        }
    }
}

/// A parameter count computed in f64, as a whole number (`as` saturates at `u64::MAX`).
fn count(n: f64) -> u64 {
    n.round() as u64
}
