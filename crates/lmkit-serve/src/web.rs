//! The web pages (a chat playground and a review page; plain HTML + JS served from the binary)
//! and the review API they use.

use crate::error::ApiError;
use crate::store::StoreError;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Html;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

pub async fn chat_page() -> Html<&'static str> {
    Html(include_str!("../static/chat.html"))
}

pub async fn review_page() -> Html<&'static str> {
    Html(include_str!("../static/review.html"))
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", m),
        e => ApiError::internal(e.to_string()),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(store_error)
}

fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| ApiError::invalid("", e.to_string()))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| ApiError::invalid("", format!("the body is not valid UTF-8: {e}")))?;
    crate::api::parse_json(text)
}

#[derive(Deserialize)]
pub struct RecentQuery {
    limit: Option<usize>,
    /// `unrated=true`: only completions nobody rated yet.
    unrated: Option<bool>,
    /// `rated=true|false`: only rated / only unrated completions.
    rated: Option<bool>,
    /// Only this model's (base or adapter name) completions.
    model: Option<String>,
}

pub async fn recent(
    State(state): State<Arc<AppState>>,
    Query(q): Query<RecentQuery>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    let limit = q.limit.unwrap_or(20).min(500);
    let rated = match (q.unrated, q.rated) {
        (Some(true), _) => Some(false),
        (_, r) => r,
    };
    let model = q.model.filter(|m| !m.is_empty());
    let rows = blocking(move || store.recent(limit, rated, model.as_deref())).await?;
    Ok(Json(json!({ "data": rows })))
}

/// Counts for the review page: completions, rated, unrated, preference pairs, models.
pub async fn stats(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    Ok(Json(blocking(move || store.stats()).await?))
}

#[derive(Deserialize)]
pub struct ExportQuery {
    /// `preferences` (A/B picks: DPO rows), `ratings` (thumbs up/down: KTO rows) or
    /// `corrections` (corrected answers: fine-tuning rows).
    kind: String,
}

/// The review store's picks or ratings as a JSONL download (what `lmkit data export-*` write).
pub async fn export(
    State(state): State<Arc<AppState>>,
    Query(q): Query<ExportQuery>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let store = state.store.clone();
    let kind = q.kind.clone();
    if !["preferences", "ratings", "corrections"].contains(&kind.as_str()) {
        return Err(ApiError::invalid(
            "kind",
            "`kind` must be `preferences`, `ratings` or `corrections`",
        ));
    }
    let body = blocking(move || {
        let mut out: Vec<u8> = Vec::new();
        match kind.as_str() {
            "preferences" => store.export_preferences(&mut out)?,
            "ratings" => store.export_ratings(&mut out)?,
            _ => store.export_corrections(&mut out)?,
        };
        Ok(out)
    })
    .await?;
    let disposition = format!("attachment; filename=\"{}.jsonl\"", q.kind);
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/jsonl".to_string(),
            ),
            (axum::http::header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rate {
    id: String,
    rating: i64,
    /// A note from the rater.
    #[serde(default)]
    comment: Option<String>,
    /// The answer the rater would have wanted (exported as fine-tuning data).
    #[serde(default)]
    correction: Option<String>,
}

pub async fn rate(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let r: Rate = json_body(body)?;
    if !(-5..=5).contains(&r.rating) {
        return Err(ApiError::invalid(
            "rating",
            "`rating` must be between -5 and 5",
        ));
    }
    let store = state.store.clone();
    let id = r.id.clone();
    let text = |t: Option<String>| t.filter(|t| !t.trim().is_empty());
    let (comment, correction) = (text(r.comment), text(r.correction));
    blocking(move || store.rate(&r.id, r.rating, comment.as_deref(), correction.as_deref()))
        .await?;
    Ok(Json(json!({ "ok": true, "id": id })))
}

pub async fn pair(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    let p = blocking(move || store.pair()).await?;
    Ok(Json(match p {
        Some((a, b)) => json!({ "prompt": a.prompt, "a": a, "b": b }),
        None => json!({ "prompt": null }),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Prefer {
    chosen: String,
    rejected: String,
}

pub async fn prefer(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let p: Prefer = json_body(body)?;
    let store = state.store.clone();
    let id = blocking(move || store.prefer(&p.chosen, &p.rejected)).await?;
    Ok(Json(json!({ "ok": true, "id": id })))
}
