//! Reading and checking request bodies: size, UTF-8, JSON, field types and ranges, each error naming its field.

use super::*;

/// A JSON value read strictly: an object that names a key twice is an error (serde_json keeps
/// the last one silently, so `{"max_tokens": 1, "max_tokens": 9999}` would pass a check on the
/// first).
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Strict;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
                Ok(Strict(Value::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
                Ok(Strict(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
                Ok(Strict(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
                Ok(Strict(
                    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
                ))
            }
            fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
                Ok(Strict(Value::String(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Strict, E> {
                Ok(Strict(Value::String(v)))
            }
            fn visit_unit<E>(self) -> Result<Strict, E> {
                Ok(Strict(Value::Null))
            }
            fn visit_none<E>(self) -> Result<Strict, E> {
                Ok(Strict(Value::Null))
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Strict, D::Error> {
                serde::Deserialize::deserialize(d)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Strict, A::Error> {
                let mut v = Vec::new();
                while let Some(Strict(x)) = a.next_element()? {
                    v.push(x);
                }
                Ok(Strict(Value::Array(v)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Strict, A::Error> {
                let mut m = serde_json::Map::new();
                while let Some(k) = a.next_key::<String>()? {
                    if m.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!("duplicate key `{k}`")));
                    }
                    let Strict(v) = a.next_value()?;
                    m.insert(k, v);
                }
                Ok(Strict(Value::Object(m)))
            }
        }
        d.deserialize_any(V)
    }
}

/// Reads `body` as JSON strictly (no duplicate keys, nothing after the value), then as `T`,
/// each error naming its field.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_str(body);
    let strict = <Strict as serde::Deserialize>::deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| {
            if e.is_syntax() || e.is_eof() {
                ApiError::invalid("", format!("the body is not valid JSON: {e}"))
            } else {
                ApiError::invalid("", format!("bad request: {e}"))
            }
        })?;
    serde_path_to_error::deserialize(strict.0).map_err(|e| {
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

pub(super) fn body_text(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<String, ApiError> {
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
pub(super) fn split_body(
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

/// The sampling fields of a request body (`chat`: of /v1/chat/completions; `echo`: a completion
/// that echoes its prompt, which may ask for no tokens).
pub(super) fn sampling(
    state: &AppState,
    v: Value,
    chat: bool,
    echo: bool,
) -> Result<Params, ApiError> {
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
    let model = match &s.model {
        None => 0,
        Some(m) if *m == state.model_name => 0,
        Some(m) => match state.adapters.iter().position(|a| a == m) {
            Some(i) => i + 1,
            None => {
                let served: Vec<String> = std::iter::once(&state.model_name)
                    .chain(&state.adapters)
                    .map(|n| format!("`{n}`"))
                    .collect();
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!(
                        "the model `{m}` does not exist; this server serves {}",
                        served.join(", ")
                    ),
                )
                .code("model_not_found"));
            }
        },
    };
    let limit = state.limits.max_tokens;
    let max_tokens = match s.max_completion_tokens.or(s.max_tokens) {
        Some(0) if !echo => {
            return Err(ApiError::invalid(
                "max_tokens",
                "`max_tokens` must be at least 1 (0 only with `echo`: the prompt scored alone)",
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
    let stream = s.stream.unwrap_or(false);
    let generated = match s.best_of {
        None => n,
        Some(_) if chat => {
            return Err(ApiError::invalid(
                "best_of",
                "`best_of` is a completions parameter; chat completions take `n`",
            ))
        }
        Some(b) if b < n || b as usize > state.limits.max_n => {
            return Err(ApiError::invalid(
                "best_of",
                format!(
                    "`best_of` must be at least `n` ({n}) and at most {}",
                    state.limits.max_n
                ),
            ))
        }
        Some(b) if b > n && stream => {
            return Err(ApiError::invalid(
                "best_of",
                "choices picked by `best_of` cannot be streamed: set `stream` to false or `best_of` to `n`",
            ))
        }
        Some(b) => b,
    };
    for (name, v) in [
        ("presence_penalty", s.presence_penalty),
        ("frequency_penalty", s.frequency_penalty),
    ] {
        if v.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
            return Err(ApiError::invalid(
                name,
                format!("`{name}` must be between -2 and 2"),
            ));
        }
    }
    let adjust = lmkit_infer::LogitAdjust {
        frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
        presence_penalty: s.presence_penalty.unwrap_or(0.0),
        logit_bias: logit_bias(state, s.logit_bias)?,
    };
    let logprobs = logprobs_asked(chat, s.logprobs.as_ref(), s.top_logprobs)?;
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
        model,
        max_tokens,
        sampling,
        n: generated as usize,
        returned: n as usize,
        stream,
        include_usage: s
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        stops,
        ignore_eos: s.ignore_eos.unwrap_or(false),
        logprobs,
        adjust,
        json: v,
    })
}

/// `logit_bias` (token ids, as strings, to a bias between -100 and 100; at most 300 of them, as
/// OpenAI allows) as (id, bias) pairs.
fn logit_bias(
    state: &AppState,
    bias: Option<std::collections::BTreeMap<String, f32>>,
) -> Result<Vec<(u32, f32)>, ApiError> {
    let bias = bias.unwrap_or_default();
    if bias.len() > 300 {
        return Err(ApiError::invalid(
            "logit_bias",
            "`logit_bias` takes at most 300 tokens",
        ));
    }
    bias.into_iter()
        .map(|(k, b)| {
            let id = k
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|&i| (i as usize) < state.vocab_size);
            match id {
                None => Err(ApiError::invalid(
                    "logit_bias",
                    format!(
                        "`logit_bias` key `{k}` is not a token id of the vocabulary of {}",
                        state.vocab_size
                    ),
                )),
                Some(_) if !(-100.0..=100.0).contains(&b) => Err(ApiError::invalid(
                    "logit_bias",
                    format!("`logit_bias` of token {k} must be between -100 and 100"),
                )),
                Some(i) => Ok((i, b)),
            }
        })
        .collect()
}

/// The most likely tokens asked for beside each token's log-probability (`None`: no
/// log-probabilities): chat's `logprobs: true` with `top_logprobs` (0 to 20), or the completions
/// endpoint's `logprobs: N` (0 to 20; OpenAI's legacy API allows 5).
fn logprobs_asked(
    chat: bool,
    logprobs: Option<&Value>,
    top: Option<u64>,
) -> Result<Option<usize>, ApiError> {
    const MOST: u64 = 20;
    let logprobs = logprobs.filter(|v| !v.is_null());
    if chat {
        let on = match logprobs {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::invalid(
                    "logprobs",
                    "`logprobs` must be true or false (the number of alternatives goes in `top_logprobs`)",
                ))
            }
        };
        return match top {
            Some(t) if t > MOST => Err(ApiError::invalid(
                "top_logprobs",
                format!("`top_logprobs` must be between 0 and {MOST}"),
            )),
            Some(t) if t > 0 && !on => Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            )),
            t => Ok(on.then_some(t.unwrap_or(0) as usize)),
        };
    }
    if top.is_some() {
        return Err(ApiError::invalid(
            "top_logprobs",
            "`top_logprobs` is for /v1/chat/completions; here `logprobs` takes the number",
        ));
    }
    match logprobs {
        None | Some(Value::Bool(false)) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= MOST => Ok(Some(n as usize)),
            _ => Err(ApiError::invalid(
                "logprobs",
                format!("`logprobs` must be a number of alternatives between 0 and {MOST}"),
            )),
        },
    }
}
