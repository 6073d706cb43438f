//! The OpenAI-compatible endpoints: request parsing and validation, running the choices through
//! the engine, streaming them as Server-Sent Events, and logging every completion.

use crate::engine::{Event, Job, Rejected};
use crate::error::ApiError;
use crate::moderation::{Policy, Verdict};
use crate::store::{now, Completion};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use lmkit_infer::{Finish, GenerateOptions, SamplingParams, TextStream};
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// A string or a list of strings (`stop`).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// `prompt`: text, one text in a list, or token ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// The sampling fields shared by both endpoints.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Sampling {
    model: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// lmkit extension: keep the k most likely tokens.
    top_k: Option<usize>,
    /// lmkit extension: CTRL-style penalty (> 1) for tokens already in the text.
    repetition_penalty: Option<f32>,
    /// lmkit extension (as in vLLM): keep generating past the end-of-sequence token.
    ignore_eos: Option<bool>,
    n: Option<u64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    stop: Option<OneOrMany>,
    seed: Option<u64>,
    user: Option<String>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logprobs: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatMessage {
    role: String,
    content: Content,
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

/// Checked request parameters.
struct Params {
    max_tokens: Option<usize>,
    sampling: SamplingParams,
    n: usize,
    stream: bool,
    include_usage: bool,
    stops: Vec<String>,
    ignore_eos: bool,
    json: Value,
}

fn parse<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_str(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid("", format!("the body is not valid JSON: {msg}"))
        } else if path == "." || path.is_empty() {
            ApiError::invalid("", format!("bad request: {msg}"))
        } else {
            ApiError::invalid(&path, format!("`{path}`: {msg}"))
        }
    })
}

fn body_text(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<String, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the request body is larger than the server's limit of {limit} bytes"),
            )
        } else {
            ApiError::invalid("", format!("could not read the body: {e}"))
        }
    })?;
    String::from_utf8(bytes.to_vec())
        .map_err(|e| ApiError::invalid("", format!("the body is not valid UTF-8: {e}")))
}

/// Reads a JSON object body and takes out its required `field`: (the field, the rest).
fn split_body(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
    field: &str,
) -> Result<(Value, Value), ApiError> {
    let mut v: Value = parse(&body_text(body, limit)?)?;
    let taken = v
        .as_object_mut()
        .ok_or_else(|| ApiError::invalid("", "the body must be a JSON object"))?
        .remove(field)
        .ok_or_else(|| ApiError::invalid(field, format!("`{field}` is required")))?;
    Ok((taken, v))
}

fn sampling(state: &AppState, v: Value) -> Result<Params, ApiError> {
    let s: Sampling = serde_path_to_error::deserialize(v.clone()).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.into_inner().to_string();
        match msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
        {
            Some(field) => ApiError::invalid(field, format!("unknown field `{field}`")),
            None => ApiError::invalid(&path, format!("`{path}`: {msg}")),
        }
    })?;
    if let Some(m) = &s.model {
        if m != &state.model_name {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "the model `{m}` does not exist; this server serves `{}`",
                    state.model_name
                ),
            )
            .code("model_not_found"));
        }
    }
    let limit = state.limits.max_tokens;
    let max_tokens = match s.max_completion_tokens.or(s.max_tokens) {
        Some(0) => {
            return Err(ApiError::invalid(
                "max_tokens",
                "`max_tokens` must be at least 1",
            ))
        }
        Some(m) if m as usize > limit => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("`max_tokens` is {m}; this server allows at most {limit}"),
            ))
        }
        m => m.map(|m| m as usize),
    };
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            "`temperature` must be between 0 and 2",
        ));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", "`top_p` must be in (0, 1]"));
    }
    let n = s.n.unwrap_or(1);
    if n == 0 || n as usize > state.limits.max_n {
        return Err(ApiError::invalid(
            "n",
            format!("`n` must be between 1 and {}", state.limits.max_n),
        ));
    }
    for (name, v) in [
        ("presence_penalty", s.presence_penalty),
        ("frequency_penalty", s.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::invalid(
                name,
                format!("`{name}` is not supported (use `repetition_penalty`); leave it out or 0"),
            ));
        }
    }
    if s.logprobs
        .as_ref()
        .is_some_and(|l| !l.is_null() && l != &json!(false))
    {
        return Err(ApiError::invalid("logprobs", "`logprobs` is not supported"));
    }
    let stops = match s.stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if stops.len() > 4 || stops.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::invalid(
            "stop",
            "`stop` takes up to 4 non-empty strings of at most 256 bytes",
        ));
    }
    let sampling = SamplingParams {
        temperature,
        top_k: s.top_k,
        top_p: (top_p < 1.0).then_some(top_p),
        repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
        seed: s.seed.unwrap_or_else(|| fresh_id() ^ now() as u64),
    };
    sampling.validate().map_err(|m| ApiError::invalid("", m))?;
    let _ = s.user;
    Ok(Params {
        max_tokens,
        sampling,
        n: n as usize,
        stream: s.stream.unwrap_or(false),
        include_usage: s
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        stops,
        ignore_eos: s.ignore_eos.unwrap_or(false),
        json: v,
    })
}

fn fresh_id() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = t ^ COUNTER
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 33)
}

/// A request ready for the engine.
struct Prepared {
    endpoint: &'static str,
    chat: bool,
    id: String,
    prompt_text: String,
    messages: Option<String>,
    prompt_ids: Vec<u32>,
    params: Params,
    eos: Option<u32>,
    stops: Vec<String>,
    prompt_verdict: Verdict,
}

fn encode(state: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    lmkit_tokenize::encode_batch(&state.tokenizer, &[text.to_string()])
        .map(|mut v| v.remove(0))
        .map_err(|e| ApiError::internal(format!("tokenizing the prompt failed: {e}")))
}

fn finish_room(state: &AppState, prep: &mut Prepared) -> Result<usize, ApiError> {
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

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let (prompt, mut v) = split_body(body, state.limits.max_body_bytes, "prompt")?;
        if let Some(e) = v.as_object_mut().and_then(|o| o.remove("echo")) {
            if e != json!(false) && !e.is_null() {
                return Err(ApiError::invalid("echo", "`echo` is not supported"));
            }
        }
        let prompt: Prompt = serde_json::from_value(prompt).map_err(|_| {
            ApiError::invalid(
                "prompt",
                "`prompt` must be a string, a list of one string, or a list of token ids",
            )
        })?;
        let params = sampling(&state, v)?;
        let (prompt_text, prompt_ids) = match prompt {
            Prompt::Text(t) => {
                let ids = encode(&state, &t)?;
                (t, ids)
            }
            Prompt::Texts(mut v) if v.len() == 1 => {
                let t = v.remove(0);
                let ids = encode(&state, &t)?;
                (t, ids)
            }
            Prompt::Texts(_) => {
                return Err(ApiError::invalid(
                    "prompt",
                    "send one prompt per request (a list of several prompts is not supported; use `n` for several completions)",
                ))
            }
            Prompt::Ids(ids) => {
                if let Some(bad) = ids.iter().find(|&&i| i as usize >= state.vocab_size) {
                    return Err(ApiError::invalid(
                        "prompt",
                        format!("token id {bad} is out of range for the vocabulary of {}", state.vocab_size),
                    ));
                }
                let t = lmkit_tokenize::decode(&state.tokenizer, &ids)
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                (t, ids)
            }
        };
        let verdict = state.moderator.check(&prompt_text);
        let stops = params.stops.clone();
        Ok::<_, ApiError>(Prepared {
            endpoint: "completions",
            chat: false,
            id: format!("cmpl-{:016x}", fresh_id()),
            prompt_text,
            messages: None,
            prompt_ids,
            eos: state.eos.filter(|_| !params.ignore_eos),
            params,
            stops,
            prompt_verdict: verdict,
        })
    }
    .await;
    respond(state, "completions", result, started).await
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let (messages, v) = split_body(body, state.limits.max_body_bytes, "messages")?;
        let messages: Vec<ChatMessage> = {
            let de = messages;
            serde_path_to_error::deserialize(de).map_err(|e| {
                let path = format!("messages{}", e.path().to_string().trim_start_matches('.'));
                let msg = e.into_inner().to_string();
                if msg.contains("untagged enum Content") {
                    return ApiError::invalid(
                        &path,
                        format!("`{path}` must be a string or a list of text parts"),
                    );
                }
                ApiError::invalid(&path, format!("`{path}`: {msg}"))
            })?
        };
        let params = sampling(&state, v)?;
        if messages.is_empty() {
            return Err(ApiError::invalid("messages", "`messages` must not be empty"));
        }
        let template = state.template.as_deref().ok_or_else(|| {
            ApiError::invalid(
                "messages",
                "this model has no chat template (tokenizer_config.json `chat_template`); use /v1/completions",
            )
        })?;
        let mut msgs = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer") {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("`messages[{i}].role` must be system, user or assistant, not `{}`", m.role),
                ));
            }
            let content = match &m.content {
                Content::Text(t) => t.clone(),
                Content::Parts(parts) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => s.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content"),
                                    "only text content parts (`{\"type\": \"text\", \"text\": ...}`) are supported",
                                ))
                            }
                        }
                    }
                    s
                }
            };
            let _ = &m.name;
            let role = if m.role == "developer" { "system" } else { m.role.as_str() };
            msgs.push(lmkit_tokenize::chat::Message::new(role, &content));
        }
        let prompt_text = lmkit_tokenize::chat::render(template, &msgs, true)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let prompt_ids = encode(&state, &prompt_text)?;
        let said: String = msgs
            .iter()
            .filter(|m| m.role != "assistant")
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let verdict = state.moderator.check(&said);
        let mut stops = params.stops.clone();
        for s in lmkit_core::tokens::CHAT_STOPS {
            if !stops.iter().any(|x| x == s) {
                stops.push(s.to_string());
            }
        }
        Ok::<_, ApiError>(Prepared {
            endpoint: "chat/completions",
            chat: true,
            id: format!("chatcmpl-{:016x}", fresh_id()),
            prompt_text,
            messages: serde_json::to_string(&msgs).ok(),
            prompt_ids,
            eos: state.chat_end.or(state.eos).filter(|_| !params.ignore_eos),
            params,
            stops,
            prompt_verdict: verdict,
        })
    }
    .await;
    respond(state, "chat/completions", result, started).await
}

fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Eos | Finish::Stopped => "stop",
        Finish::Length | Finish::Context => "length",
    }
}

/// One piece of a streamed response.
enum Chunk {
    Delta { index: usize, text: String },
    Finish { index: usize, reason: &'static str },
    Usage { prompt: usize, completion: usize },
    Error(ApiError),
}

struct Outcome {
    texts: Vec<String>,
    reasons: Vec<&'static str>,
    /// Tokens generated per choice.
    tokens: Vec<usize>,
    completion_tokens: usize,
    verdict: Verdict,
}

async fn respond(
    state: Arc<AppState>,
    endpoint: &'static str,
    prepared: Result<Prepared, ApiError>,
    started: Instant,
) -> Response {
    let r = run(state.clone(), prepared, started).await;
    let r = match r {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    state.metrics.request(endpoint, r.status().as_u16());
    if !r
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
    {
        state
            .metrics
            .latency(endpoint, started.elapsed().as_secs_f64());
    }
    r
}

async fn run(
    state: Arc<AppState>,
    prepared: Result<Prepared, ApiError>,
    started: Instant,
) -> Result<Response, ApiError> {
    let mut prep = prepared?;
    let max_tokens = finish_room(&state, &mut prep)?;
    if prep.prompt_verdict.flagged {
        state.metrics.flagged();
    }
    if prep.prompt_verdict.flagged && state.moderator.policy == Policy::Refuse {
        let outcome = Outcome {
            texts: vec![String::new()],
            reasons: vec!["content_filter"],
            tokens: vec![0],
            completion_tokens: 0,
            verdict: Verdict::default(),
        };
        log(&state, &prep, &outcome, started).await;
        return Err(ApiError::invalid(
            if prep.chat { "messages" } else { "prompt" },
            format!(
                "the prompt was refused by moderation (categories: {})",
                prep.prompt_verdict.categories.join(", ")
            ),
        )
        .code("content_policy_violation"));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let cancels: Vec<Arc<AtomicBool>> = (0..prep.params.n)
        .map(|_| Arc::new(AtomicBool::new(false)))
        .collect();
    let jobs = (0..prep.params.n)
        .map(|i| Job {
            index: i,
            prompt: prep.prompt_ids.clone(),
            opts: GenerateOptions {
                max_tokens,
                sampling: SamplingParams {
                    seed: prep.params.sampling.seed.wrapping_add(i as u64),
                    ..prep.params.sampling.clone()
                },
                eos_token_id: prep.eos,
                max_positions: state.max_positions,
            },
            events: tx.clone(),
            cancel: cancels[i].clone(),
        })
        .collect();
    drop(tx);
    match state.engine.submit(jobs) {
        Ok(()) => {}
        Err(Rejected::Busy) => return Err(ApiError::busy(state.limits.retry_after)),
        Err(Rejected::Closed) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the model worker has stopped; restart the server",
            ))
        }
    }
    if prep.params.stream {
        let (out_tx, out_rx) = mpsc::unbounded_channel::<Chunk>();
        let created = now();
        let (id, model, chat, include_usage) = (
            prep.id.clone(),
            state.model_name.clone(),
            prep.chat,
            prep.params.include_usage,
        );
        let st = state.clone();
        tokio::spawn(async move {
            let outcome = drive(&st, &prep, rx, &cancels, Some(&out_tx), started).await;
            log(&st, &prep, &outcome, started).await;
            st.metrics
                .latency(prep.endpoint, started.elapsed().as_secs_f64());
            if include_usage {
                let _ = out_tx.send(Chunk::Usage {
                    prompt: prep.prompt_ids.len(),
                    completion: outcome.completion_tokens,
                });
            }
        });
        let stream = futures_util::stream::unfold((out_rx, false), move |(mut rx, done)| {
            let (id, model) = (id.clone(), model.clone());
            async move {
                if done {
                    return None;
                }
                match rx.recv().await {
                    Some(c) => Some((
                        Ok::<_, Infallible>(sse_chunk(&id, &model, created, chat, c)),
                        (rx, false),
                    )),
                    None => Some((Ok(SseEvent::default().data("[DONE]")), (rx, true))),
                }
            }
        });
        return Ok(Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let outcome = drive(&state, &prep, rx, &cancels, None, started).await;
    log(&state, &prep, &outcome, started).await;
    if outcome.reasons.contains(&"error") {
        return Err(ApiError::internal("generation failed; see the server log"));
    }
    let created = now();
    let choices: Vec<Value> = outcome
        .texts
        .iter()
        .zip(&outcome.reasons)
        .enumerate()
        .map(|(i, (t, r))| {
            if prep.chat {
                json!({"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r, "logprobs": null})
            } else {
                json!({"index": i, "text": t, "finish_reason": r, "logprobs": null})
            }
        })
        .collect();
    let body = json!({
        "id": prep.id,
        "object": if prep.chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": state.model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prep.prompt_ids.len(),
            "completion_tokens": outcome.completion_tokens,
            "total_tokens": prep.prompt_ids.len() + outcome.completion_tokens,
        },
        "moderation": {
            "prompt": prep.prompt_verdict,
            "completion": outcome.verdict,
            "policy": format!("{:?}", state.moderator.policy).to_lowercase(),
        },
    });
    Ok(Json(body).into_response())
}

fn sse_chunk(id: &str, model: &str, created: i64, chat: bool, c: Chunk) -> SseEvent {
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let choice = |index: usize, text: Option<&str>, reason: Option<&str>| {
        if chat {
            let delta = match text {
                Some(t) => json!({"role": "assistant", "content": t}),
                None => json!({}),
            };
            json!({"index": index, "delta": delta, "finish_reason": reason, "logprobs": null})
        } else {
            json!({"index": index, "text": text.unwrap_or(""), "finish_reason": reason, "logprobs": null})
        }
    };
    let v = match c {
        Chunk::Delta { index, text } => {
            json!({"id": id, "object": object, "created": created, "model": model,
            "choices": [choice(index, Some(&text), None)]})
        }
        Chunk::Finish { index, reason } => {
            json!({"id": id, "object": object, "created": created, "model": model,
            "choices": [choice(index, None, Some(reason))]})
        }
        Chunk::Usage { prompt, completion } => {
            json!({"id": id, "object": object, "created": created, "model": model,
            "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}})
        }
        Chunk::Error(e) => {
            json!({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}})
        }
    };
    SseEvent::default().data(v.to_string())
}

/// Collects the engine's events for every choice into text, applying stop strings and
/// moderation; with `out`, streams each piece as it comes. Stops all choices when the client
/// goes away.
async fn drive(
    state: &AppState,
    prep: &Prepared,
    mut rx: mpsc::UnboundedReceiver<(usize, Event)>,
    cancels: &[Arc<AtomicBool>],
    out: Option<&mpsc::UnboundedSender<Chunk>>,
    started: Instant,
) -> Outcome {
    let n = prep.params.n;
    let mut streams: Vec<TextStream> = (0..n)
        .map(|_| TextStream::new(&state.tokenizer, prep.stops.clone()))
        .collect();
    let mut ids: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut texts = vec![String::new(); n];
    let mut reasons: Vec<Option<&'static str>> = vec![None; n];
    let mut verdict = Verdict::default();
    let mut first = true;
    let mut client_gone = false;
    let send = |c: Chunk, gone: &mut bool| {
        if let Some(o) = out {
            if o.send(c).is_err() {
                *gone = true;
            }
        }
    };
    while reasons.iter().any(|r| r.is_none()) {
        let Some((i, ev)) = rx.recv().await else {
            break;
        };
        if reasons[i].is_some() {
            continue;
        }
        let (delta, done) = match ev {
            Event::Token(t) => {
                if first {
                    state.metrics.first_token(started.elapsed().as_secs_f64());
                    first = false;
                }
                ids[i].push(t);
                let d = streams[i].push(&ids[i]).unwrap_or_default();
                (d, streams[i].stopped.then_some("stop"))
            }
            Event::Done(f) => (
                streams[i].finish(&ids[i]).unwrap_or_default(),
                Some(finish_reason(f)),
            ),
            Event::Error(msg) => {
                eprintln!("lmkit serve: {} choice {i}: {msg}", prep.id);
                send(
                    Chunk::Error(ApiError::internal(format!("generation failed: {msg}"))),
                    &mut client_gone,
                );
                (String::new(), Some("error"))
            }
        };
        let mut done = done;
        if !delta.is_empty() {
            let mut candidate = texts[i].clone();
            candidate.push_str(&delta);
            let v = state.moderator.check(&candidate);
            if v.flagged && state.moderator.policy == Policy::Refuse {
                for c in v.categories {
                    if !verdict.categories.contains(&c) {
                        verdict.categories.push(c);
                    }
                }
                verdict.flagged = true;
                done = Some("content_filter");
            } else {
                texts[i] = candidate;
                send(
                    Chunk::Delta {
                        index: i,
                        text: delta,
                    },
                    &mut client_gone,
                );
            }
        }
        if let Some(r) = done {
            reasons[i] = Some(r);
            cancels[i].store(true, Ordering::SeqCst);
            if r != "error" {
                send(
                    Chunk::Finish {
                        index: i,
                        reason: r,
                    },
                    &mut client_gone,
                );
            }
        }
        if client_gone {
            for (c, r) in cancels.iter().zip(reasons.iter_mut()) {
                c.store(true, Ordering::SeqCst);
                r.get_or_insert("cancelled");
            }
        }
    }
    for (c, r) in cancels.iter().zip(reasons.iter_mut()) {
        c.store(true, Ordering::SeqCst);
        r.get_or_insert("cancelled");
    }
    if !verdict.flagged {
        for t in &texts {
            let v = state.moderator.check(t);
            for c in v.categories {
                if !verdict.categories.contains(&c) {
                    verdict.categories.push(c);
                }
            }
        }
        verdict.flagged = !verdict.categories.is_empty();
    }
    if verdict.flagged {
        state.metrics.flagged();
    }
    let completion_tokens = ids.iter().map(|v| v.len()).sum();
    state
        .metrics
        .tokens(prep.prompt_ids.len() as u64, completion_tokens as u64);
    Outcome {
        texts,
        reasons: reasons
            .into_iter()
            .map(|r| r.unwrap_or("cancelled"))
            .collect(),
        tokens: ids.iter().map(|v| v.len()).collect(),
        completion_tokens,
        verdict,
    }
}

/// Stores one row per choice; waits for the write so a client that got its answer finds it.
async fn log(state: &Arc<AppState>, prep: &Prepared, o: &Outcome, started: Instant) {
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let moderation = json!({
        "prompt": prep.prompt_verdict,
        "completion": o.verdict,
        "policy": format!("{:?}", state.moderator.policy).to_lowercase(),
    })
    .to_string();
    let rows: Vec<Completion> = o
        .texts
        .iter()
        .zip(&o.reasons)
        .enumerate()
        .map(|(i, (t, r))| Completion {
            id: if o.texts.len() == 1 {
                prep.id.clone()
            } else {
                format!("{}-{i}", prep.id)
            },
            request_id: prep.id.clone(),
            created: now(),
            endpoint: prep.endpoint.to_string(),
            model: state.model_name.clone(),
            prompt: prep.prompt_text.clone(),
            messages: prep.messages.clone(),
            output: t.clone(),
            params: prep.params.json.to_string(),
            moderation: moderation.clone(),
            prompt_tokens: prep.prompt_ids.len() as i64,
            completion_tokens: o.tokens.get(i).copied().unwrap_or(0) as i64,
            latency_ms,
            finish_reason: r.to_string(),
            rating: None,
        })
        .collect();
    let store = state.store.clone();
    let res = tokio::task::spawn_blocking(move || {
        for r in &rows {
            store.insert(r)?;
        }
        Ok::<_, crate::store::StoreError>(())
    })
    .await;
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("lmkit serve: could not store {}: {e}", prep.id),
        Err(e) => eprintln!("lmkit serve: could not store {}: {e}", prep.id),
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbeddingRequest {
    input: EmbeddingInput,
    model: Option<String>,
    encoding_format: Option<String>,
    user: Option<String>,
}

/// `POST /v1/embeddings`: mean-pooled sentence embeddings from the BERT given with
/// `--embedding-model`.
pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let r = async {
        let text = body_text(body, state.limits.max_body_bytes)?;
        let req: EmbeddingRequest = parse(&text)?;
        let emb = state.embedder.clone().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "this server has no embedding model: start it with --embedding-model DIR (a BERT checkpoint)",
            )
            .code("model_not_found")
        })?;
        if let Some(m) = &req.model {
            if m != &emb.name {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!("the model `{m}` does not exist; embeddings come from `{}`", emb.name),
                )
                .code("model_not_found"));
            }
        }
        let base64 = match req.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(f) => {
                return Err(ApiError::invalid(
                    "encoding_format",
                    format!("`encoding_format` must be float or base64, not `{f}`"),
                ))
            }
        };
        let _ = req.user;
        let inputs = match req.input {
            EmbeddingInput::One(s) => vec![s],
            EmbeddingInput::Many(v) => v,
        };
        if inputs.is_empty() || inputs.len() > 256 {
            return Err(ApiError::invalid("input", "`input` takes 1 to 256 texts"));
        }
        let tokens: usize = lmkit_tokenize::encode_batch(&emb.tokenizer, &inputs)
            .map_err(|e| ApiError::internal(e.to_string()))?
            .iter()
            .enumerate()
            .map(|(i, ids)| {
                if ids.len() > emb.model.cfg.max_position_embeddings {
                    Err(ApiError::invalid(
                        &format!("input[{i}]"),
                        format!(
                            "input {i} has {} tokens; the embedding model reads at most {}",
                            ids.len(),
                            emb.model.cfg.max_position_embeddings
                        ),
                    )
                    .code("context_length_exceeded"))
                } else {
                    Ok(ids.len())
                }
            })
            .sum::<Result<usize, ApiError>>()?;
        let vectors = tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(inputs.len());
            for chunk in inputs.chunks(32) {
                out.extend(lmkit_infer::embed_texts(&emb.model, &emb.tokenizer, chunk, &emb.device)?);
            }
            Ok::<_, lmkit_infer::InferError>((out, emb.name.clone()))
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("embedding failed: {e}")))?;
        let (vectors, name) = vectors;
        let data: Vec<Value> = vectors
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let e = if base64 {
                    // Little-endian f32s, as OpenAI's clients decode them.
                    use base64::Engine;
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": i, "embedding": e})
            })
            .collect();
        state.metrics.tokens(tokens as u64, 0);
        Ok::<_, ApiError>(Json(json!({
            "object": "list",
            "data": data,
            "model": name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
        .into_response())
    }
    .await;
    let r = r.unwrap_or_else(|e| e.into_response());
    state.metrics.request("embeddings", r.status().as_u16());
    state
        .metrics
        .latency("embeddings", started.elapsed().as_secs_f64());
    r
}
