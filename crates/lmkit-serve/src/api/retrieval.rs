//! Retrieval for chat requests (the request extension `"retrieval"`): the last user message is
//! searched in the server's index (`lmkit serve --index`), the passages found go into that message
//! as numbered sources, and the answer's response carries them in `sources`.
//!
//! `"retrieval": true` searches with the defaults (hybrid, or dense for a PostgreSQL index; 4
//! passages); an object sets
//! `k` (1–20), `mode` (`hybrid`, `dense`, `bm25`) and `filter` (a `KEY=VALUE` string or a list of
//! them, as `lmkit index search --filter`).

use super::*;
use lmkit_rag::prompt::{self, Source};
use lmkit_rag::{Mode, SearchOptions};
use lmkit_tokenize::chat::Message;

/// The index and the model that embeds queries for it (behind a lock: a PostgreSQL index holds
/// one connection).
pub struct Retriever {
    pub index: std::sync::Mutex<lmkit_rag::Store>,
    pub chunks: usize,
    pub embedder: lmkit_rag::embed::Embedder,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    k: Option<usize>,
    mode: Option<String>,
    filter: Option<Filters>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Filters {
    One(String),
    Many(Vec<String>),
}

/// The search options a request's `retrieval` value asks for (`None`: no retrieval).
pub(super) fn options(
    state: &AppState,
    v: Option<Value>,
) -> Result<Option<SearchOptions>, ApiError> {
    let bad = |msg: String| ApiError::invalid("retrieval", msg);
    let spec = match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => return Ok(None),
        Some(Value::Bool(true)) => Spec {
            k: None,
            mode: None,
            filter: None,
        },
        Some(v @ Value::Object(_)) => {
            serde_json::from_value(v).map_err(|e| bad(format!("`retrieval`: {e}")))?
        }
        Some(_) => {
            return Err(bad(
                "`retrieval` must be true or an object {k, mode, filter}".into(),
            ))
        }
    };
    if state.retriever.is_none() {
        return Err(bad(
            "this server has no document index; start it with `lmkit serve --index INDEX`".into(),
        ));
    }
    let k = spec.k.unwrap_or(4);
    if !(1..=20).contains(&k) {
        return Err(bad(format!("`retrieval.k` must be from 1 to 20, not {k}")));
    }
    let default = match &state.retriever {
        Some(r) => r
            .index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .default_mode(),
        None => Mode::Hybrid,
    };
    let mode = match spec.mode.as_deref() {
        None => default,
        Some("hybrid") => Mode::Hybrid,
        Some("dense") => Mode::Dense,
        Some("bm25") => Mode::Bm25,
        Some(m) => {
            return Err(bad(format!(
                "`retrieval.mode` must be hybrid, dense or bm25, not `{m}`"
            )))
        }
    };
    let filters = match spec.filter {
        None => Vec::new(),
        Some(Filters::One(s)) => vec![s],
        Some(Filters::Many(v)) => v,
    };
    let filter = lmkit_rag::filter::Filter::parse(&filters)
        .map_err(|e| bad(format!("`retrieval.filter`: {e}")))?;
    Ok(Some(SearchOptions {
        k,
        mode,
        ef: None,
        exact: false,
        filter,
    }))
}

/// Searches the index for the last user message of `msgs`, puts the passages found into it and
/// the instruction to answer from them into the system message; returns the passages.
pub(super) async fn augment(
    state: &Arc<AppState>,
    msgs: &mut Vec<Message>,
    opts: SearchOptions,
) -> Result<Vec<Source>, ApiError> {
    let Some(last) = msgs.iter().rposition(|m| m.role == "user") else {
        return Err(ApiError::invalid(
            "messages",
            "retrieval needs a user message to search for",
        ));
    };
    let question = msgs[last].content.clone();
    let st = state.clone();
    let q = question.clone();
    let sources = tokio::task::spawn_blocking(move || -> Result<Vec<Source>, String> {
        let Some(r) = st.retriever.as_ref() else {
            return Ok(Vec::new());
        };
        let v = match opts.mode {
            Mode::Bm25 => None,
            _ => Some(r.embedder.query(&q).map_err(|e| e.to_string())?),
        };
        let mut ix = r.index.lock().unwrap_or_else(|p| p.into_inner());
        let found = ix
            .search(v.as_deref(), &q, &opts)
            .map_err(|e| e.to_string())?;
        Ok(prompt::sources(&found))
    })
    .await
    .map_err(|e| ApiError::internal(format!("retrieval failed: {e}")))?
    .map_err(|e| ApiError::internal(format!("retrieval failed: {e}")))?;
    msgs[last].content = prompt::user_message(&question, &sources);
    match msgs.iter_mut().find(|m| m.role == "system") {
        Some(m) => m.content = format!("{}\n\n{}", m.content.trim_end(), prompt::SYSTEM),
        None => msgs.insert(0, Message::new("system", prompt::SYSTEM)),
    }
    Ok(sources)
}

/// The user message of `msgs` that holds `sources`, rebuilt with fewer of them (the lowest-ranked
/// dropped) so that the prompt fits.
pub(super) fn drop_last_source(
    msgs: &mut [Message],
    sources: &mut Vec<Source>,
    question: &str,
) -> bool {
    if sources.pop().is_none() {
        return false;
    }
    if let Some(m) = msgs.iter_mut().rev().find(|m| m.role == "user") {
        m.content = prompt::user_message(question, sources);
    }
    true
}
