//! Running the choices through the engine and answering: one JSON response, or Server-Sent Events in OpenAI's chunk format.

use super::*;

pub(super) fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Eos | Finish::Stopped => "stop",
        Finish::Length | Finish::Context => "length",
    }
}

/// One piece of a streamed response.
pub(super) enum Chunk {
    Delta {
        index: usize,
        text: String,
        /// The log-probabilities of the tokens whose text starts in this piece, where asked for.
        logprobs: Option<Value>,
    },
    Finish {
        index: usize,
        reason: &'static str,
        /// Those of the tokens not yet sent (text held back to the end), where asked for.
        logprobs: Option<Value>,
    },
    Usage {
        prompt: usize,
        /// The prompt's tokens that came from the prefix cache.
        cached: usize,
        completion: usize,
    },
    /// The passages retrieved into the prompt, sent before the first token.
    Sources(Vec<lmkit_rag::prompt::Source>),
    /// A reply that turned out to be function calls (requests with `tools`).
    ToolCalls {
        index: usize,
        calls: Vec<Value>,
    },
    Error(ApiError),
}

impl Chunk {
    /// The chunk as choice `index + offset`'s (a request of several prompts numbers all their
    /// choices in one sequence).
    pub(super) fn shifted(mut self, offset: usize) -> Chunk {
        if let Chunk::Delta { index, .. }
        | Chunk::Finish { index, .. }
        | Chunk::ToolCalls { index, .. } = &mut self
        {
            *index += offset;
        }
        self
    }
}

pub(super) struct Outcome {
    pub(super) texts: Vec<String>,
    pub(super) reasons: Vec<&'static str>,
    /// Tokens generated per choice.
    pub(super) tokens: Vec<usize>,
    pub(super) completion_tokens: usize,
    /// The prompt's tokens whose keys and values came from the prefix cache (the most over the
    /// choices).
    pub(super) cached_tokens: usize,
    /// Each choice's moderation verdict (a choice that moderation cut short: the verdict on
    /// the text it cut).
    pub(super) verdicts: Vec<Verdict>,
    /// Each choice's `logprobs` (null where not asked for).
    pub(super) logprobs: Vec<Value>,
    /// The first error a choice ended with (its reason is `error`).
    pub(super) error: Option<ApiError>,
    /// Each choice's mean log-probability a token (its text's tokens and the stop token that
    /// ended it; −∞ where it has none): how `best_of` ranks them. `NaN` where the job did not
    /// ask for log-probabilities.
    pub(super) scores: Vec<f64>,
}

/// The response's `usage`: OpenAI's fields, the prompt's cached tokens among its details.
pub(super) fn usage(prompt: usize, cached: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

pub(super) fn sse_chunk(id: &str, model: &str, created: i64, chat: bool, c: Chunk) -> SseEvent {
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let choice = |index: usize, text: Option<&str>, reason: Option<&str>, lp: Option<Value>| {
        let lp = lp.unwrap_or(Value::Null);
        if chat {
            let delta = match text {
                Some(t) => json!({"role": "assistant", "content": t}),
                None => json!({}),
            };
            json!({"index": index, "delta": delta, "finish_reason": reason, "logprobs": lp})
        } else {
            json!({"index": index, "text": text.unwrap_or(""), "finish_reason": reason, "logprobs": lp})
        }
    };
    let v = match c {
        Chunk::Delta {
            index,
            text,
            logprobs,
        } => {
            json!({"id": id, "object": object, "created": created, "model": model,
            "choices": [choice(index, Some(&text), None, logprobs)]})
        }
        Chunk::Finish {
            index,
            reason,
            logprobs,
        } => {
            json!({"id": id, "object": object, "created": created, "model": model,
            "choices": [choice(index, None, Some(reason), logprobs)]})
        }
        Chunk::Usage {
            prompt,
            cached,
            completion,
        } => {
            json!({"id": id, "object": object, "created": created, "model": model,
            "choices": [], "usage": usage(prompt, cached, completion)})
        }
        Chunk::ToolCalls { index, calls } => {
            let calls: Vec<Value> = calls
                .into_iter()
                .enumerate()
                .map(|(k, mut c)| {
                    c["index"] = json!(k);
                    c
                })
                .collect();
            json!({"id": id, "object": object, "created": created, "model": model,
            "choices": [{"index": index, "delta": {"role": "assistant", "content": null, "tool_calls": calls},
                         "finish_reason": null, "logprobs": null}]})
        }
        Chunk::Sources(s) => {
            json!({"id": id, "object": object, "created": created, "model": model,
            "choices": [], "sources": s})
        }
        Chunk::Error(e) => {
            json!({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}})
        }
    };
    SseEvent::default().data(v.to_string())
}

/// Collects the engine's events for every choice into text, applying stop strings and
/// moderation; with `out` (a sender, and the index in the response of this request's first
/// choice), streams each piece as it comes. Stops all choices when the client goes away.
pub(super) async fn drive(
    state: &AppState,
    prep: &Prepared,
    mut rx: mpsc::UnboundedReceiver<(usize, Event)>,
    cancels: &[Arc<AtomicBool>],
    out: Option<(&mpsc::UnboundedSender<Chunk>, usize)>,
    started: Instant,
) -> Outcome {
    let n = prep.params.n;
    let mut streams: Vec<TextStream> = (0..n)
        .map(|_| TextStream::new(&state.tokenizer, prep.stops.clone()))
        .collect();
    let mut ids: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut texts = vec![String::new(); n];
    let mut reasons: Vec<Option<&'static str>> = vec![None; n];
    let mut verdicts = vec![Verdict::default(); n];
    let mut first = true;
    let mut client_gone = false;
    let mut cached_tokens = 0;
    let mut error = None;
    // With `tools`, a reply is held back while it may still be a call (it starts with `{`).
    let mut holding = vec![prep.structured.tools.is_some(); n];
    // Log-probabilities: each choice's tokens so far, how many of them went out in chunks, and
    // how many the answer keeps (set when it ends: those whose text starts in its text, or all
    // where no stop string or moderation cut it).
    let chat = prep.chat;
    let want = prep.params.logprobs.is_some();
    // Whether streamed chunks carry them.
    let in_chunks = want && out.is_some();
    // An echoed prompt: its text goes before each choice's (its log-probabilities too, where
    // asked for: the engine sends them first). `at`: the text offset (in characters) where each
    // choice's next streamed token starts.
    let mut at = vec![0usize; n];
    let mut prompt_scores: Vec<Vec<lmkit_infer::TokenLogprobs>> = vec![Vec::new(); n];
    let mut echoed = vec![!prep.echo; n];
    let mut scored: Vec<Vec<super::logprobs::Scored>> = (0..n).map(|_| Vec::new()).collect();
    let mut sent = vec![0usize; n];
    let mut keep = vec![0usize; n];
    // The log-probability of the stop token that ended each choice, where one did.
    let mut end: Vec<Option<f32>> = vec![None; n];
    // The log-probabilities of choice i's tokens after those sent, up to `upto` tokens (a
    // streamed chunk's; `None` where not asked for or not streaming).
    let due =
        |scored: &[super::logprobs::Scored], sent: &mut usize, at: &mut usize, upto: usize| {
            in_chunks.then(|| {
                let upto = upto.max(*sent);
                let v = super::logprobs::object(state, chat, &scored[*sent..upto], at);
                *sent = upto;
                v
            })
        };
    // How many of the tokens start within the first `len` bytes of the text.
    let within = |scored: &[super::logprobs::Scored], len: usize| {
        scored.iter().take_while(|s| s.offset < len).count()
    };
    // A piece of choice `index`'s text (now `len` bytes), with the entries of its tokens not yet
    // sent whose text starts before that end.
    let piece = |index: usize, text: String, len: usize, tokens: (&[_], &mut usize, &mut usize)| {
        let (scored, sent, at) = tokens;
        let logprobs = due(scored, sent, at, within(scored, len));
        Chunk::Delta {
            index,
            text,
            logprobs,
        }
    };
    let send = |c: Chunk, gone: &mut bool| {
        if let Some((o, first)) = out {
            if o.send(c.shifted(first)).is_err() {
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
        let mut ev = ev;
        if let Event::Prompt(scores) = &mut ev {
            prompt_scores[i] = std::mem::take(scores);
        }
        if !echoed[i] {
            echoed[i] = true;
            let lists = || {
                let p = &prep.prompt_ids;
                super::logprobs::echoed(state, p, &prompt_scores[i], &[], &mut at[i])
            };
            send(
                Chunk::Delta {
                    index: i,
                    text: prep.prompt_text.clone(),
                    logprobs: in_chunks.then(lists),
                },
                &mut client_gone,
            );
        }
        let (delta, done) = match ev {
            Event::Cached(n) => {
                cached_tokens = cached_tokens.max(n);
                continue;
            }
            Event::Prompt(_) => continue,
            Event::Token(t, lp) => {
                if first {
                    state.metrics.first_token(started.elapsed().as_secs_f64());
                    first = false;
                }
                if let Some(lp) = lp {
                    let offset = streams[i].decoded_len();
                    scored[i].push(super::logprobs::Scored { lp, offset });
                }
                ids[i].push(t);
                let d = streams[i].push(&ids[i]).unwrap_or_default();
                (d, streams[i].stopped.then_some("stop"))
            }
            Event::Done(f, lp) => {
                end[i] = lp;
                (
                    streams[i].finish(&ids[i]).unwrap_or_default(),
                    Some(finish_reason(f)),
                )
            }
            Event::Error(msg) => {
                eprintln!("lmkit serve: {} choice {i}: {msg}", prep.id);
                let e = ApiError::internal(format!("generation failed: {msg}"));
                error.get_or_insert_with(|| e.clone());
                send(Chunk::Error(e), &mut client_gone);
                (String::new(), Some("error"))
            }
            Event::Invalid(msg) => {
                let field = if prep.structured.tools.is_some() {
                    "tools"
                } else {
                    "response_format"
                };
                // The engine's first line says why; the rest is its parser's state.
                let why = msg.lines().next().unwrap_or_default();
                let e = ApiError::invalid(
                    field,
                    format!("the schema or grammar failed while generating: {why}"),
                );
                error.get_or_insert_with(|| e.clone());
                send(Chunk::Error(e), &mut client_gone);
                (String::new(), Some("error"))
            }
        };
        let mut done = done;
        if !delta.is_empty() {
            let mut candidate = texts[i].clone();
            candidate.push_str(&delta);
            let v = state.moderator.check(&candidate);
            if v.flagged && state.moderator.policy == Policy::Refuse {
                verdicts[i] = v;
                done = Some("content_filter");
            } else {
                texts[i] = candidate;
                let head = texts[i].trim_start();
                let tokens = (scored[i].as_slice(), &mut sent[i], &mut at[i]);
                if !holding[i] {
                    send(piece(i, delta, texts[i].len(), tokens), &mut client_gone);
                } else if !head.is_empty() && !head.starts_with('{') {
                    holding[i] = false;
                    let all = texts[i].clone();
                    send(piece(i, all, texts[i].len(), tokens), &mut client_gone);
                }
            }
        }
        if let (Some(r), true) = (done, holding[i]) {
            holding[i] = false;
            match super::structured::tool_calls(&texts[i]) {
                Some(calls) if r != "error" && r != "content_filter" => {
                    send(Chunk::ToolCalls { index: i, calls }, &mut client_gone);
                    done = Some("tool_calls");
                }
                _ if !texts[i].is_empty() => {
                    let tokens = (scored[i].as_slice(), &mut sent[i], &mut at[i]);
                    let all = texts[i].clone();
                    send(piece(i, all, texts[i].len(), tokens), &mut client_gone)
                }
                _ => {}
            }
        }
        if let Some(r) = done {
            reasons[i] = Some(r);
            cancels[i].store(true, Ordering::SeqCst);
            keep[i] = if streams[i].stopped || r == "content_filter" {
                within(&scored[i], texts[i].len())
            } else {
                scored[i].len()
            };
            if r != "error" {
                send(
                    Chunk::Finish {
                        index: i,
                        reason: r,
                        logprobs: due(&scored[i], &mut sent[i], &mut at[i], keep[i]),
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
    for (v, t) in verdicts.iter_mut().zip(&texts) {
        if !v.flagged {
            *v = state.moderator.check(t);
        }
    }
    if verdicts.iter().any(|v| v.flagged) {
        state.metrics.flagged();
    }
    let completion_tokens = ids.iter().map(|v| v.len()).sum();
    let scores = (0..n)
        .map(|i| {
            if scored[i].len() < ids[i].len() {
                return f64::NAN;
            }
            let ended = end[i].filter(|_| !streams[i].stopped);
            let lps = scored[i][..keep[i]].iter().map(|s| s.lp.logprob);
            let (sum, count) = lps
                .chain(ended)
                .fold((0.0, 0usize), |(s, c), lp| (s + lp as f64, c + 1));
            if count == 0 {
                f64::NEG_INFINITY
            } else {
                sum / count as f64
            }
        })
        .collect();
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
        cached_tokens,
        verdicts,
        error,
        scores,
        logprobs: scored
            .iter()
            .zip(&keep)
            .zip(&prompt_scores)
            .map(|((s, &k), scores)| match (want, prep.echo) {
                (false, _) => Value::Null,
                (true, false) => super::logprobs::object(state, chat, &s[..k], &mut 0),
                (true, true) => {
                    super::logprobs::echoed(state, &prep.prompt_ids, scores, &s[..k], &mut 0)
                }
            })
            .collect(),
    }
}
