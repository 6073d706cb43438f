//! From a checked request to what the engine runs: prompt tokens and the room left in the
//! context.

use super::*;
pub(super) use lmkit_core::rng::fresh_id;

/// A request ready for the engine.
pub(super) struct Prepared {
    pub(super) endpoint: &'static str,
    pub(super) chat: bool,
    /// The completions endpoint's `echo`: the prompt's text (and log-probabilities) before each
    /// choice's.
    pub(super) echo: bool,
    pub(super) id: String,
    pub(super) prompt_text: String,
    pub(super) messages: Option<String>,
    pub(super) prompt_ids: Vec<u32>,
    pub(super) params: Params,
    /// Token ids that end the completion (none with `ignore_eos`).
    pub(super) eos: Vec<u32>,
    pub(super) stops: Vec<String>,
    pub(super) prompt_verdict: Verdict,
    /// The passages retrieved into the prompt (`"retrieval"` requests).
    pub(super) sources: Option<Vec<lmkit_rag::prompt::Source>>,
    /// `response_format` / `tools`: the constraint on every choice.
    pub(super) structured: super::structured::Structured,
}

/// A completion prompt's ids, with the special tokens the model's tokenizer adds to a text (a
/// BOS for Llama 2 or Mistral vocabularies), as transformers and llama.cpp's server encode it.
pub(super) fn encode(state: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    lmkit_tokenize::encode_prompt(&state.tokenizer, text)
        .map_err(|e| ApiError::internal(format!("tokenizing the prompt failed: {e}")))
}

pub(super) fn finish_room(state: &AppState, prep: &mut Prepared) -> Result<usize, ApiError> {
    let ctx = state.max_positions;
    let len = prep.prompt_ids.len();
    if len == 0 {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if len >= ctx {
        return Err(ApiError::invalid(
            if prep.chat { "messages" } else { "prompt" },
            format!("the prompt has {len} tokens but the model's context holds {ctx}; shorten it"),
        )
        .code("context_length_exceeded"));
    }
    let room = ctx - len;
    let default = if prep.chat { room } else { 16 };
    let want = prep
        .params
        .max_tokens
        .unwrap_or(default)
        .min(state.limits.max_tokens);
    Ok(want.min(room))
}
