//! The web pages (a chat playground and a review page; plain HTML + JS served from the binary)
//! and the review API they use.

use crate::error::ApiError;
use crate::store::{RecentFilter, StoreError};
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
    /// Only those created at or after / before these times: seconds since the Unix epoch or a
    /// date (YYYY-MM-DD, UTC; `until` is the end of that day).
    since: Option<String>,
    until: Option<String>,
    /// `flagged=true|false`: only completions whose prompt or output moderation flagged, or
    /// only the others.
    flagged: Option<bool>,
}

/// Seconds since the Unix epoch of `v`: a number, or a YYYY-MM-DD date (UTC) at its start, or
/// (`end_of_day`) at the next day's start.
fn epoch_seconds(field: &str, v: &str, end_of_day: bool) -> Result<i64, ApiError> {
    if let Ok(n) = v.trim().parse::<i64>() {
        return Ok(n);
    }
    let bad = || {
        ApiError::invalid(
            field,
            format!("`{field}` must be seconds since 1970-01-01 or a date YYYY-MM-DD, not {v:?}"),
        )
    };
    let parts: Vec<&str> = v.trim().split('-').collect();
    let [y, m, d] = parts[..] else {
        return Err(bad());
    };
    let (y, m, d): (i64, i64, i64) = (
        y.parse().map_err(|_| bad())?,
        m.parse().map_err(|_| bad())?,
        d.parse().map_err(|_| bad())?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || !(1970..=9999).contains(&y) {
        return Err(bad());
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok((days + end_of_day as i64) * 86_400)
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
    let time = |field: &str, v: &Option<String>, end: bool| {
        v.as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| epoch_seconds(field, s, end))
            .transpose()
    };
    let filter = RecentFilter {
        rated,
        model: q.model.filter(|m| !m.is_empty()),
        since: time("since", &q.since, false)?,
        until: time("until", &q.until, true)?,
        flagged: q.flagged,
    };
    let rows = blocking(move || store.recent(limit, &filter)).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn review_filter_times_are_seconds_or_dates() {
        assert_eq!(
            epoch_seconds("since", "1700000000", false).unwrap(),
            1_700_000_000
        );
        assert_eq!(epoch_seconds("since", "1970-01-01", false).unwrap(), 0);
        assert_eq!(epoch_seconds("until", "1970-01-01", true).unwrap(), 86_400);
        // 2026-11-30T00:00:00Z
        assert_eq!(
            epoch_seconds("since", "2026-11-30", false).unwrap(),
            1_795_996_800
        );
        assert_eq!(
            epoch_seconds("since", "2024-03-01", false).unwrap(),
            1_709_251_200
        );
        for bad in ["yesterday", "2026-13-01", "2026-11", ""] {
            let e = epoch_seconds("since", bad, false).unwrap_err();
            assert!(format!("{e:?}").contains("YYYY-MM-DD"), "{bad}: {e:?}");
        }
    }
}
