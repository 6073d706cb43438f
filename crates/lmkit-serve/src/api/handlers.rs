//! The endpoint handlers: `/v1/completions`, `/v1/chat/completions`, `/v1/embeddings`.

use super::*;

/// Prompts one request may carry (a list of texts or of token lists): each is a request of its
/// own to the engine, their choices answered together.
const MOST_PROMPTS: usize = 64;

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let (prompt, mut v) = split_body(body, state.limits.max_body_bytes, "prompt")?;
        let echo = match v.as_object_mut().and_then(|o| o.remove("echo")) {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(_) => return Err(ApiError::invalid("echo", "`echo` must be true or false")),
        };
        // Fill-in-the-middle: the text the completion goes before.
        let suffix = match v.as_object_mut().and_then(|o| o.remove("suffix")) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => return Err(ApiError::invalid("suffix", "`suffix` must be a string")),
        };
        let fim = match (&suffix, &state.fim) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(ApiError::invalid(
                    "suffix",
                    "this model has no fill-in-the-middle tokens (such as <|fim_prefix|>, \
                     <|fim_suffix|>, <|fim_middle|>): `suffix` needs a code model trained with them",
                ))
            }
            (Some(_), Some(_)) if echo => {
                return Err(ApiError::invalid("suffix", "`echo` and `suffix` cannot be combined"))
            }
            (Some(s), Some(f)) => Some((s.as_str(), f)),
        };
        let prompt: Prompt = serde_json::from_value(prompt).map_err(|_| {
            ApiError::invalid(
                "prompt",
                "`prompt` must be a string, a list of strings, a list of token ids, or a list of lists of token ids",
            )
        })?;
        let structured = structured::options(&mut v, false)?;
        let params = sampling(&state, v, false, echo)?;
        let known = |ids: Vec<u32>| {
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= state.vocab_size) {
                return Err(ApiError::invalid(
                    "prompt",
                    format!("token id {bad} is out of range for the vocabulary of {}", state.vocab_size),
                ));
            }
            let t = lmkit_tokenize::decode(&state.tokenizer, &ids)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            Ok((t, ids))
        };
        let text = |t: String| match fim {
            None => encode(&state, &t).map(|ids| (t, ids)),
            Some((suffix, f)) => f
                .prompt(&state.tokenizer, &t, suffix)
                .map(|ids| (t, ids))
                .map_err(|e| ApiError::internal(format!("tokenizing the prompt failed: {e}"))),
        };
        let prompts: Vec<(String, Vec<u32>)> = match prompt {
            Prompt::Text(t) => vec![text(t)?],
            Prompt::Texts(v) => v.into_iter().map(text).collect::<Result<_, _>>()?,
            Prompt::Ids(_) | Prompt::IdLists(_) if fim.is_some() => {
                return Err(ApiError::invalid(
                    "prompt",
                    "with `suffix`, the prompt (the text before the middle) must be text, not token ids",
                ))
            }
            Prompt::Ids(ids) => vec![known(ids)?],
            Prompt::IdLists(v) => v.into_iter().map(known).collect::<Result<_, _>>()?,
        };
        // A middle also ends at the model's fill-in-the-middle end tokens.
        let mut eos = if params.ignore_eos { Vec::new() } else { state.eos.clone() };
        if let (Some((_, f)), false) = (fim, params.ignore_eos) {
            f.add_ends(&mut eos);
        }
        if prompts.is_empty() || prompts.len() > MOST_PROMPTS {
            return Err(ApiError::invalid(
                "prompt",
                format!("`prompt` takes 1 to {MOST_PROMPTS} prompts"),
            ));
        }
        Ok::<_, ApiError>(
            prompts
                .into_iter()
                .map(|(prompt_text, prompt_ids)| {
                    let verdict = state.moderator.check(&prompt_text);
                    Prepared {
                        endpoint: "completions",
                        chat: false,
                        echo,
                        id: format!("cmpl-{:016x}", fresh_id()),
                        prompt_text,
                        messages: None,
                        prompt_ids,
                        eos: eos.clone(),
                        stops: params.stops.clone(),
                        params: params.clone(),
                        prompt_verdict: verdict,
                        sources: None,
                        structured: structured.clone(),
                    }
                })
                .collect::<Vec<_>>(),
        )
    }
    .await;
    match result {
        Ok(mut preps) if preps.len() == 1 => {
            respond(state, "completions", Ok(preps.remove(0)), started).await
        }
        Ok(preps) => {
            let streamed = preps[0].params.stream;
            let r = several(state.clone(), preps, started)
                .await
                .unwrap_or_else(|e| e.into_response());
            state.metrics.request("completions", r.status().as_u16());
            if !streamed {
                // (A stream's latency is counted when it ends.)
                state
                    .metrics
                    .latency("completions", started.elapsed().as_secs_f64());
            }
            r
        }
        Err(e) => respond(state, "completions", Err(e), started).await,
    }
}

/// A completion request of several prompts: each prompt's choices as a request of its own
/// (stored under its own id), answered together, prompt k's choice j at index k·n + j, the
/// usage summed (OpenAI's order and indices). The response takes the first prompt's id, and
/// the moderation verdicts of the first flagged prompt and completion (or the first's).
async fn several(
    state: Arc<AppState>,
    preps: Vec<Prepared>,
    started: Instant,
) -> Result<Response, ApiError> {
    let mut submitted = Vec::with_capacity(preps.len());
    for p in preps {
        submitted.push(submit(&state, p, started).await?);
    }
    if submitted[0].0.params.stream {
        return Ok(stream_several(state, submitted, started));
    }
    let bodies = futures_util::future::join_all(
        submitted
            .into_iter()
            .map(|(p, rx, c)| answer(state.clone(), p, rx, c, started)),
    )
    .await
    .into_iter()
    .collect::<Result<Vec<Value>, ApiError>>()?;
    let mut body = bodies[0].clone();
    let mut choices = Vec::new();
    let count = |key: &str| -> u64 {
        bodies
            .iter()
            .map(|b| b["usage"][key].as_u64().unwrap_or(0))
            .sum()
    };
    for (k, b) in bodies.iter().enumerate() {
        let n = b["choices"].as_array().map_or(0, |c| c.len());
        for c in b["choices"].as_array().into_iter().flatten() {
            let mut c = c.clone();
            c["index"] = json!(k * n + c["index"].as_u64().unwrap_or(0) as usize);
            choices.push(c);
        }
    }
    body["choices"] = json!(choices);
    body["usage"] = usage(
        count("prompt_tokens") as usize,
        bodies
            .iter()
            .map(|b| {
                b["usage"]["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .sum::<u64>() as usize,
        count("completion_tokens") as usize,
    );
    for part in ["prompt", "completion"] {
        if let Some(flagged) = bodies
            .iter()
            .find(|b| b["moderation"][part]["flagged"] == json!(true))
        {
            body["moderation"][part] = flagged["moderation"][part].clone();
        }
    }
    Ok(Json(body).into_response())
}

/// [`several`]'s prompts streamed: their chunks interleaved as they come, each choice at its
/// index k·n + j, under the first prompt's id; with `stream_options.include_usage`, one usage
/// chunk of their sums at the end.
fn stream_several(state: Arc<AppState>, submitted: Vec<Submitted>, started: Instant) -> Response {
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Chunk>();
    let created = now();
    let first = &submitted[0].0;
    let (id, model, include_usage) = (
        first.id.clone(),
        state.variant_name(first.params.model).to_string(),
        first.params.include_usage,
    );
    let n = first.params.n;
    let tasks: Vec<_> = submitted
        .into_iter()
        .enumerate()
        .map(|(k, (prep, rx, cancels))| {
            let (st, out) = (state.clone(), out_tx.clone());
            tokio::spawn(async move {
                // This prompt's choices come at k·n + j; a client that left ends them all.
                let outcome = drive(&st, &prep, rx, &cancels, Some((&out, k * n)), started).await;
                log(&st, &prep, &outcome, started).await;
                (
                    prep.prompt_ids.len(),
                    outcome.cached_tokens,
                    outcome.completion_tokens,
                )
            })
        })
        .collect();
    let st = state.clone();
    tokio::spawn(async move {
        let (mut prompt, mut cached, mut completion) = (0, 0, 0);
        for t in tasks {
            if let Ok((p, c, g)) = t.await {
                prompt += p;
                cached += c;
                completion += g;
            }
        }
        st.metrics
            .latency("completions", started.elapsed().as_secs_f64());
        if include_usage {
            let _ = out_tx.send(Chunk::Usage {
                prompt,
                cached,
                completion,
            });
        }
    });
    sse_response(out_rx, id, model, created, false)
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let (messages, mut v) = split_body(body, state.limits.max_body_bytes, "messages")?;
        let search = retrieval::options(&state, v.as_object_mut().and_then(|o| o.remove("retrieval")))?;
        let structured = structured::options(&mut v, true)?;
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
        let params = sampling(&state, v, true, false)?;
        if messages.is_empty() {
            return Err(ApiError::invalid("messages", "`messages` must not be empty"));
        }
        let template = state.template.as_ref().ok_or_else(|| {
            ApiError::invalid(
                "messages",
                "this model has no chat template (chat_template.jinja, tokenizer_config.json `chat_template` or GGUF `tokenizer.chat_template`); use /v1/completions",
            )
        })?;
        let mut msgs = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer" | "tool") {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("`messages[{i}].role` must be system, user, assistant or tool, not `{}`", m.role),
                ));
            }
            let mut content = match &m.content {
                None if m.role == "assistant" && m.tool_calls.is_some() => String::new(),
                None => {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].content"),
                        format!("`messages[{i}].content` is missing"),
                    ))
                }
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
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
            // Calls and their results are shown to the model as text: most chat templates know
            // no tool turns.
            for c in m.tool_calls.iter().flatten() {
                let f = c.get("function");
                let name = f.and_then(|f| f.get("name")).cloned().unwrap_or(Value::Null);
                let args = f
                    .and_then(|f| f.get("arguments"))
                    .and_then(|a| a.as_str().and_then(|s| serde_json::from_str::<Value>(s).ok()).or(Some(a.clone())))
                    .unwrap_or(Value::Null);
                if !content.is_empty() {
                    content.push('\n');
                }
                content.push_str(&json!({"name": name, "arguments": args}).to_string());
            }
            if m.role == "tool" {
                content = format!(
                    "Result of the function call{}: {content}",
                    m.tool_call_id.as_ref().map(|id| format!(" {id}")).unwrap_or_default()
                );
            }
            let role = match m.role.as_str() {
                "developer" => "system",
                "tool" => "user",
                r => r,
            };
            msgs.push(lmkit_tokenize::chat::Message::new(role, &content));
        }
        // Every message is moderated, assistant turns the client sent included (retrieved
        // passages are the server's own documents, not the client's words).
        let said: String = msgs
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let verdict = state.moderator.check(&said);
        if let Some(t) = &structured.tools {
            let text = structured::tools_prompt(t);
            match msgs.first_mut() {
                Some(m) if m.role == "system" => m.content = format!("{}\n\n{text}", m.content),
                _ => msgs.insert(0, lmkit_tokenize::chat::Message::new("system", &text)),
            }
        }
        let encode = |msgs: &[lmkit_tokenize::chat::Message]| {
            lmkit_tokenize::chat::encode_chat(&state.tokenizer, template, msgs, true)
                .map_err(|e| ApiError::internal(e.to_string()))
        };
        let mut sources = None;
        if let Some(opts) = search {
            let question = msgs
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map(|m| m.content.clone())
                .unwrap_or_default();
            let mut found = retrieval::augment(&state, &mut msgs, opts).await?;
            // Passages that leave no room to answer are left out, the lowest-ranked first.
            while encode(&msgs)?.1.len() + 16 > state.max_positions
                && retrieval::drop_last_source(&mut msgs, &mut found, &question)
            {}
            sources = Some(found);
        }
        // Message contents are encoded as plain text: typed control tokens cannot forge turns.
        let (prompt_text, prompt_ids) = encode(&msgs)?;
        let mut stops = params.stops.clone();
        for s in lmkit_core::tokens::CHAT_STOPS {
            if !stops.iter().any(|x| x == s) {
                stops.push(s.to_string());
            }
        }
        Ok::<_, ApiError>(Prepared {
            endpoint: "chat/completions",
            chat: true,
            echo: false,
            id: format!("chatcmpl-{:016x}", fresh_id()),
            prompt_text,
            messages: serde_json::to_string(&msgs).ok(),
            prompt_ids,
            eos: if params.ignore_eos {
                Vec::new()
            } else {
                state.chat_end.iter().chain(&state.eos).copied().collect()
            },
            params,
            stops,
            prompt_verdict: verdict,
            sources,
            structured,
        })
    }
    .await;
    respond(state, "chat/completions", result, started).await
}

pub(super) async fn respond(
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

pub(super) async fn run(
    state: Arc<AppState>,
    prepared: Result<Prepared, ApiError>,
    started: Instant,
) -> Result<Response, ApiError> {
    let (prep, rx, cancels) = submit(&state, prepared?, started).await?;
    if prep.params.stream {
        return Ok(stream(state, prep, rx, cancels, started));
    }
    Ok(Json(answer(state, prep, rx, cancels, started).await?).into_response())
}

/// A request's choices, given to the engine: what [`stream`] or [`answer`] reads them from.
type Submitted = (
    Prepared,
    mpsc::UnboundedReceiver<(usize, Event)>,
    Vec<Arc<AtomicBool>>,
);

/// Checks a prepared request (its room in the context, moderation of its prompt, constraints,
/// the KV budget) and gives its choices to the engine.
async fn submit(
    state: &Arc<AppState>,
    mut prep: Prepared,
    started: Instant,
) -> Result<Submitted, ApiError> {
    let max_tokens = finish_room(state, &mut prep)?;
    if prep.prompt_verdict.flagged {
        state.metrics.flagged();
    }
    if prep.prompt_verdict.flagged && state.moderator.policy == Policy::Refuse {
        let outcome = Outcome {
            texts: vec![String::new()],
            reasons: vec!["content_filter"],
            tokens: vec![0],
            completion_tokens: 0,
            cached_tokens: 0,
            verdicts: vec![Verdict::default()],
            logprobs: vec![Value::Null],
            error: None,
            scores: vec![f64::NAN],
        };
        log(state, &prep, &outcome, started).await;
        return Err(ApiError::invalid(
            if prep.chat { "messages" } else { "prompt" },
            format!(
                "the prompt was refused by moderation (categories: {})",
                prep.prompt_verdict.categories.join(", ")
            ),
        )
        .code("content_policy_violation"));
    }
    let field = if prep.structured.tools.is_some() {
        "tools"
    } else {
        "response_format"
    };
    let mut constraints = (0..prep.params.n)
        .map(|_| {
            prep.structured
                .spec
                .as_ref()
                .map(|s| structured::compile(state, s, field))
                .transpose()
        })
        .collect::<Result<Vec<_>, ApiError>>()?
        .into_iter();
    let (tx, rx) = mpsc::unbounded_channel();
    let cancels: Vec<Arc<AtomicBool>> = (0..prep.params.n)
        .map(|_| Arc::new(AtomicBool::new(false)))
        .collect();
    let jobs: Vec<Job> = (0..prep.params.n)
        .map(|i| Job {
            index: i,
            model: prep.params.model,
            prompt: prep.prompt_ids.clone(),
            opts: GenerateOptions {
                max_tokens,
                sampling: SamplingParams {
                    seed: prep.params.sampling.seed.wrapping_add(i as u64),
                    ..prep.params.sampling.clone()
                },
                stop_ids: prep.eos.clone(),
                max_positions: state.max_positions,
            },
            events: tx.clone(),
            cancel: cancels[i].clone(),
            constraint: constraints.next().flatten(),
            // `best_of` ranks the choices by their tokens' log-probabilities.
            logprobs: prep
                .params
                .logprobs
                .or((prep.params.returned < prep.params.n).then_some(0)),
            prompt_logprobs: prep.params.logprobs.filter(|_| prep.echo),
            adjust: prep.params.adjust.clone(),
        })
        .collect();
    drop(tx);
    // A request whose cache could never fit the KV budget is the client's to fix (fewer tokens).
    if let (Some(kv), Some(job)) = (state.kv_budget, jobs.first()) {
        if let Some(why) = kv.refusal(job) {
            return Err(ApiError::invalid("max_tokens", why));
        }
    }
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
    Ok((prep, rx, cancels))
}

/// The choices' tokens streamed as Server-Sent Events.
fn stream(
    state: Arc<AppState>,
    prep: Prepared,
    rx: mpsc::UnboundedReceiver<(usize, Event)>,
    cancels: Vec<Arc<AtomicBool>>,
    started: Instant,
) -> Response {
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Chunk>();
    let created = now();
    let (id, model, chat, include_usage) = (
        prep.id.clone(),
        state.variant_name(prep.params.model).to_string(),
        prep.chat,
        prep.params.include_usage,
    );
    let st = state.clone();
    tokio::spawn(async move {
        if let Some(s) = &prep.sources {
            let _ = out_tx.send(Chunk::Sources(s.clone()));
        }
        let outcome = drive(&st, &prep, rx, &cancels, Some((&out_tx, 0)), started).await;
        log(&st, &prep, &outcome, started).await;
        st.metrics
            .latency(prep.endpoint, started.elapsed().as_secs_f64());
        if include_usage {
            let _ = out_tx.send(Chunk::Usage {
                prompt: prep.prompt_ids.len(),
                cached: outcome.cached_tokens,
                completion: outcome.completion_tokens,
            });
        }
    });
    sse_response(out_rx, id, model, created, chat)
}

/// The chunks `rx` gives as server-sent events, then `[DONE]` once every sender has gone.
fn sse_response(
    rx: mpsc::UnboundedReceiver<Chunk>,
    id: String,
    model: String,
    created: i64,
    chat: bool,
) -> Response {
    let stream = futures_util::stream::unfold((rx, false), move |(mut rx, done)| {
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
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The choices' whole answer (the response body).
async fn answer(
    state: Arc<AppState>,
    prep: Prepared,
    rx: mpsc::UnboundedReceiver<(usize, Event)>,
    cancels: Vec<Arc<AtomicBool>>,
    started: Instant,
) -> Result<Value, ApiError> {
    // A client that leaves drops this handler; the choices then end (cancelled) and are still
    // stored and counted, by a task of their own.
    let watch = ClientWatch {
        state: state.clone(),
        endpoint: prep.endpoint,
        cancels: cancels.clone(),
        armed: true,
    };
    let st = state.clone();
    let (prep, outcome) = tokio::spawn(async move {
        let outcome = drive(&st, &prep, rx, &cancels, None, started).await;
        log(&st, &prep, &outcome, started).await;
        (prep, outcome)
    })
    .await
    .map_err(|e| ApiError::internal(format!("generation task failed: {e}")))?;
    watch.disarm();
    if let Some(e) = outcome.error {
        return Err(match e.status {
            StatusCode::BAD_REQUEST => e,
            _ => ApiError::internal("generation failed; see the server log"),
        });
    }
    let created = now();
    let chosen = best(&outcome.scores, prep.params.returned);
    // The verdict on the choices answered with (`best_of`'s others are stored with their own).
    let verdict = Verdict::of_all(chosen.iter().map(|&c| &outcome.verdicts[c]));
    let choices: Vec<Value> = chosen
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let (t, r) = (&outcome.texts[c], outcome.reasons[c]);
            let calls = prep.structured.tools.as_ref().and_then(|_| structured::tool_calls(t));
            let lp = outcome.logprobs.get(c).cloned().unwrap_or(Value::Null);
            if let Some(calls) = calls {
                json!({"index": i, "message": {"role": "assistant", "content": null, "tool_calls": calls}, "finish_reason": "tool_calls", "logprobs": lp})
            } else if prep.chat {
                json!({"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r, "logprobs": lp})
            } else if prep.echo {
                json!({"index": i, "text": format!("{}{t}", prep.prompt_text), "finish_reason": r, "logprobs": lp})
            } else {
                json!({"index": i, "text": t, "finish_reason": r, "logprobs": lp})
            }
        })
        .collect();
    let mut body = json!({
        "id": prep.id,
        "object": if prep.chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": state.variant_name(prep.params.model),
        "choices": choices,
        "usage": usage(prep.prompt_ids.len(), outcome.cached_tokens, outcome.completion_tokens),
        "moderation": {
            "prompt": prep.prompt_verdict,
            "completion": verdict,
            "policy": format!("{:?}", state.moderator.policy).to_lowercase(),
        },
    });
    if let Some(s) = &prep.sources {
        body["sources"] = json!(s);
    }
    Ok(body)
}

/// The `returned` choices to answer with, out of those `scores` ranks: all, in order, where
/// there are no more; else (`best_of`) those of the highest mean log-probability a token, best
/// first (ties: the lower index first).
fn best(scores: &[f64], returned: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    if returned < scores.len() {
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        order.truncate(returned);
    }
    order
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
                if ids.len() > emb.model.cfg.max_tokens() {
                    Err(ApiError::invalid(
                        &format!("input[{i}]"),
                        format!(
                            "input {i} has {} tokens; the embedding model reads at most {}",
                            ids.len(),
                            emb.model.cfg.max_tokens()
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

/// Armed while a non-streaming request waits for its choices: dropped armed (the client left
/// and the handler with it), it cancels them and counts the request as 499 (client closed).
struct ClientWatch {
    state: Arc<AppState>,
    endpoint: &'static str,
    cancels: Vec<Arc<AtomicBool>>,
    armed: bool,
}

impl ClientWatch {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for ClientWatch {
    fn drop(&mut self) {
        if self.armed {
            for c in &self.cancels {
                c.store(true, Ordering::SeqCst);
            }
            self.state.metrics.request(self.endpoint, 499);
        }
    }
}
