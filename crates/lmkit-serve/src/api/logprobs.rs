//! Log-probabilities in OpenAI's shapes: chat's `logprobs.content` (token, logprob, bytes,
//! top_logprobs) and the completions endpoint's legacy lists (tokens, token_logprobs,
//! top_logprobs, text_offset), with the prompt's tokens first where it is echoed.

use super::*;
use lmkit_infer::TokenLogprobs;

/// A generated token's log-probabilities and the byte where its text starts in its choice's
/// text (which tokens a piece of text, or a text cut short, carries).
pub(super) struct Scored {
    pub(super) lp: TokenLogprobs,
    pub(super) offset: usize,
}

/// Token `id`'s text (lossy where it is part of a character) and bytes.
fn token_text(state: &AppState, id: u32) -> (String, Vec<u8>) {
    let bytes = lmkit_tokenize::token_bytes(&state.tokenizer, id).unwrap_or_default();
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// The `logprobs` object of a choice (or of a streamed chunk) for these generated tokens; a
/// completion's text offsets go on from `at` (the characters of the tokens before: see
/// [`lists`]), which is moved past them.
pub(super) fn object(state: &AppState, chat: bool, tokens: &[Scored], at: &mut usize) -> Value {
    if !chat {
        return lists(state, tokens.iter().map(|s| (s.lp.token, Some(&s.lp))), at);
    }
    let entry = |id: u32, logprob: f32| {
        let (token, bytes) = token_text(state, id);
        json!({"token": token, "logprob": logprob, "bytes": bytes})
    };
    let content: Vec<Value> = tokens
        .iter()
        .map(|s| {
            let mut e = entry(s.lp.token, s.lp.logprob);
            e["top_logprobs"] = s.lp.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// The completions endpoint's lists for an echoed prompt's tokens (`scores`: those of the
/// tokens after the first, which has none) followed by the generated `tokens`; offsets from
/// `at` (0 for a whole answer), moved past them.
pub(super) fn echoed(
    state: &AppState,
    prompt: &[u32],
    scores: &[TokenLogprobs],
    tokens: &[Scored],
    at: &mut usize,
) -> Value {
    let first = std::iter::once(None).chain(scores.iter().map(Some));
    let generated = tokens.iter().map(|s| (s.lp.token, Some(&s.lp)));
    lists(
        state,
        prompt.iter().copied().zip(first).chain(generated),
        at,
    )
}

/// The legacy lists for entries (token, its log-probabilities if it has them). Each token's
/// text offset is where the texts of the tokens before it end, counted in characters from
/// `at` (as vLLM counts them: a token that is part of a character is one U+FFFD in `tokens`).
fn lists<'a>(
    state: &AppState,
    entries: impl Iterator<Item = (u32, Option<&'a TokenLogprobs>)>,
    at: &mut usize,
) -> Value {
    let (mut texts, mut logprobs, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for (id, lp) in entries {
        let text = token_text(state, id).0;
        offsets.push(*at);
        *at += text.chars().count();
        texts.push(text);
        logprobs.push(lp.map(|l| l.logprob));
        // A text two tokens share keeps the more likely one's value.
        tops.push(lp.map(|l| {
            l.top
                .iter()
                .rev()
                .map(|&(id, v)| (token_text(state, id).0, json!(v)))
                .collect::<serde_json::Map<String, Value>>()
        }));
    }
    json!({"tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets})
}
