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
    unrated: Option<bool>,
}

pub async fn recent(
    State(state): State<Arc<AppState>>,
    Query(q): Query<RecentQuery>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    let limit = q.limit.unwrap_or(20).min(500);
    let rows = blocking(move || store.recent(limit, q.unrated.unwrap_or(false))).await?;
    Ok(Json(json!({ "data": rows })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rate {
    id: String,
    rating: i64,
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
    blocking(move || store.rate(&r.id, r.rating)).await?;
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
