//! The request bodies of the OpenAI-compatible endpoints, as serde reads them (unknown fields refused).

use super::*;

/// A string or a list of strings (`stop`).
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// `prompt`: text, a list of texts, token ids, or a list of lists of token ids (one choice, or
/// `n`, for each prompt).
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StreamOptions {
    pub(super) include_usage: Option<bool>,
}

/// The sampling fields shared by both endpoints.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Sampling {
    pub(super) model: Option<String>,
    pub(super) max_tokens: Option<u64>,
    pub(super) max_completion_tokens: Option<u64>,
    pub(super) temperature: Option<f32>,
    pub(super) top_p: Option<f32>,
    /// lmkit extension: keep the k most likely tokens.
    pub(super) top_k: Option<usize>,
    /// lmkit extension: CTRL-style penalty (> 1) for tokens already in the text.
    pub(super) repetition_penalty: Option<f32>,
    /// lmkit extension (as in vLLM): keep generating past the end-of-sequence token.
    pub(super) ignore_eos: Option<bool>,
    pub(super) n: Option<u64>,
    /// Completions only: choices generated, of which the `n` of the highest mean
    /// log-probability a token are answered.
    pub(super) best_of: Option<u64>,
    pub(super) stream: Option<bool>,
    pub(super) stream_options: Option<StreamOptions>,
    pub(super) stop: Option<OneOrMany>,
    pub(super) seed: Option<u64>,
    pub(super) user: Option<String>,
    pub(super) presence_penalty: Option<f32>,
    pub(super) frequency_penalty: Option<f32>,
    pub(super) logprobs: Option<Value>,
    pub(super) top_logprobs: Option<u64>,
    pub(super) logit_bias: Option<std::collections::BTreeMap<String, f32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ChatMessage {
    pub(super) role: String,
    #[serde(default)]
    pub(super) content: Option<Content>,
    pub(super) name: Option<String>,
    /// An assistant turn that called functions (OpenAI's shape).
    pub(super) tool_calls: Option<Vec<Value>>,
    /// A `tool` turn: the call it answers.
    pub(super) tool_call_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
pub(super) struct ContentPart {
    #[serde(rename = "type")]
    pub(super) kind: String,
    pub(super) text: Option<String>,
}

/// Checked request parameters.
#[derive(Clone)]
pub(super) struct Params {
    /// The model variant (0: the base; i: adapter i).
    pub(super) model: usize,
    pub(super) max_tokens: Option<usize>,
    pub(super) sampling: SamplingParams,
    /// Choices generated (`best_of` where given, else `n`).
    pub(super) n: usize,
    /// Choices answered (`n`): the best of those generated where fewer.
    pub(super) returned: usize,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    pub(super) stops: Vec<String>,
    pub(super) ignore_eos: bool,
    /// Log-probabilities with each token, and this many of the most likely tokens' (`None`:
    /// none).
    pub(super) logprobs: Option<usize>,
    /// Frequency and presence penalties, `logit_bias`.
    pub(super) adjust: lmkit_infer::LogitAdjust,
    pub(super) json: Value,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EmbeddingRequest {
    pub(super) input: EmbeddingInput,
    pub(super) model: Option<String>,
    pub(super) encoding_format: Option<String>,
    pub(super) user: Option<String>,
}
