//! What every request passes before its handler: the Host it names (DNS rebinding), the page
//! that sent it (`Origin`: cross-site requests), its body type (JSON only, so an HTML form on
//! another site cannot post), and the API key. Every response gets frame and sniffing
//! protection headers.

use crate::error::ApiError;
use crate::AppState;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// The host names requests may name: `allowed` if given; otherwise, for a server bound to a
/// loopback address, the loopback names (a browser on this machine may still reach it, but a
/// page from elsewhere cannot rebind a name of its own to it); otherwise any.
pub fn allowed_hosts(bind_host: &str, allowed: &[String]) -> Option<Vec<String>> {
    if !allowed.is_empty() {
        return Some(allowed.iter().map(|h| h.to_ascii_lowercase()).collect());
    }
    let loopback = matches!(bind_host, "127.0.0.1" | "localhost" | "::1" | "[::1]")
        || bind_host.starts_with("127.");
    loopback.then(|| {
        ["localhost", "127.0.0.1", "[::1]", "::1", bind_host]
            .iter()
            .map(|s| s.to_string())
            .collect()
    })
}

/// `host[:port]` without the port.
fn host_name(authority: &str) -> String {
    let a = authority.trim().to_ascii_lowercase();
    if let Some(rest) = a.strip_prefix('[') {
        // [v6]:port
        return rest
            .split(']')
            .next()
            .map(|h| format!("[{h}]"))
            .unwrap_or(a.clone());
    }
    match a.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h.to_string(),
        _ => a,
    }
}

fn forbidden(msg: String) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, "invalid_request_error", msg).into_response()
}

pub async fn check(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    if let (Some(allowed), Some(h)) = (&state.allowed_hosts, &host) {
        if !allowed.contains(&host_name(h)) {
            state.metrics.request("forbidden", 403);
            return forbidden(format!(
                "Host `{h}` is not one this server answers to; start it with --allowed-host {} to allow it",
                host_name(h)
            ));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        // A page may call the server only from the server's own origin — host and port, so a
        // page another local server serves on another port is refused — or from a host given
        // with --allowed-host (not merely a loopback name).
        let o = origin.to_str().unwrap_or("null");
        let authority = o
            .split_once("://")
            .map(|(_, rest)| rest.trim_end_matches('/').to_ascii_lowercase());
        let same = authority.as_ref().is_some_and(|a| {
            host.as_deref()
                .map(|h| h.trim().to_ascii_lowercase())
                .as_ref()
                == Some(a)
                || state.allowed_origin_hosts.contains(&host_name(a))
        });
        if !same {
            state.metrics.request("forbidden", 403);
            return forbidden(format!(
                "requests from pages of `{o}` are not accepted (Origin must be this server's own address)"
            ));
        }
    }
    let req = if req.method() == Method::POST {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            state.metrics.request("unsupported", 415);
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "send the body as JSON with `Content-Type: application/json`",
            )
            .into_response();
        }
        // The body must arrive within the read timeout (a slow client cannot hold a request
        // open); it is read here, up to the size limit, and handed on whole.
        let (parts, body) = req.into_parts();
        let limit = state.limits.max_body_bytes;
        let wait = std::time::Duration::from_secs(state.limits.read_timeout_secs.max(1));
        let limited = http_body_util::Limited::new(body, limit);
        match tokio::time::timeout(wait, http_body_util::BodyExt::collect(limited)).await {
            Err(_) => {
                state.metrics.request("timeout", 408);
                return ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request_error",
                    format!(
                        "the request body did not arrive within {} s",
                        wait.as_secs()
                    ),
                )
                .into_response();
            }
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    format!("the request body is larger than the server's limit of {limit} bytes"),
                )
                .into_response();
            }
            Ok(Err(e)) => {
                return ApiError::invalid("", format!("could not read the body: {e}"))
                    .into_response()
            }
            Ok(Ok(collected)) => {
                Request::from_parts(parts, axum::body::Body::from(collected.to_bytes()))
            }
        }
    } else {
        req
    };
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("frame-ancestors 'none'"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// Equal in time independent of where `a` and `b` differ (their lengths may show).
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// With API keys configured, a request must carry one: `Authorization: Bearer KEY` (the scheme
/// in any case).
pub async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if !state.api_keys.is_empty() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim());
        let ok = given.is_some_and(|k| {
            // Every key is compared (no early exit on the first match).
            state.api_keys.iter().fold(false, |found, x| {
                same_key(x.as_bytes(), k.as_bytes()) | found
            })
        });
        if !ok {
            state.metrics.request("unauthorized", 401);
            let mut resp = ApiError::unauthorized().into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"lmkit\""),
            );
            return resp;
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_and_keys() {
        assert_eq!(host_name("LocalHost:8000"), "localhost");
        assert_eq!(host_name("[::1]:80"), "[::1]");
        assert_eq!(host_name("example.com"), "example.com");
        assert!(allowed_hosts("0.0.0.0", &[]).is_none());
        let lo = allowed_hosts("127.0.0.1", &[]).unwrap();
        assert!(lo.contains(&"localhost".to_string()) && !lo.contains(&"evil.com".to_string()));
        assert_eq!(
            allowed_hosts("0.0.0.0", &["Box.lan".into()]).unwrap(),
            ["box.lan"]
        );
        assert!(
            same_key(b"sk-1", b"sk-1") && !same_key(b"sk-1", b"sk-2") && !same_key(b"sk", b"sk-1")
        );
    }
}
