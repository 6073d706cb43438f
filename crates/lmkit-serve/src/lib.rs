//! `lmkit serve`: an OpenAI-compatible HTTP API over an lmkit checkpoint (completions and chat
//! completions, streamed as Server-Sent Events), with API keys, request limits, a bounded queue,
//! moderation of prompts and completions, a SQLite store of every completion, Prometheus
//! metrics, and web pages for chatting and for reviewing completions.
#![forbid(unsafe_code)]

pub mod api;
pub mod classifier;
pub mod engine;
pub mod error;
pub mod guard;
pub mod metrics;
pub mod moderation;
pub mod prefix;
pub mod store;
pub mod web;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use engine::{Capacity, Engine, KvBudget};
use error::ApiError;
use lmkit_models::CausalLm;
use moderation::Moderator;
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use store::Store;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Model(#[from] lmkit_models::ModelError),
    #[error(transparent)]
    Tokenize(#[from] lmkit_tokenize::TokenizeError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("{0}")]
    Config(String),
    #[error("{addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Limits on what one request may ask for.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Most new tokens one choice may produce.
    pub max_tokens: usize,
    /// Most choices (`n`) per request.
    pub max_n: usize,
    /// Seconds suggested in Retry-After when the queue is full.
    pub retry_after: u64,
    /// Seconds a client has to send a request's headers, and then its body.
    pub read_timeout_secs: u64,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1 << 20,
            max_tokens: 1024,
            max_n: 8,
            retry_after: 1,
            read_timeout_secs: 30,
            max_connections: 256,
        }
    }
}

pub struct ServeConfig {
    pub model_dir: PathBuf,
    pub device: String,
    /// The model's weights' and activations' type: f32, bf16 or f16 (see
    /// [`lmkit_models::parse_dtype`]).
    pub dtype: String,
    /// The name clients use in `model` (default: the model directory's name).
    pub model_name: Option<String>,
    pub host: String,
    pub port: u16,
    /// Accepted API keys; empty means no authentication.
    pub api_keys: Vec<String>,
    /// Host names requests may use (empty: the loopback names when bound to loopback, any
    /// otherwise); see [`guard::allowed_hosts`].
    pub allowed_hosts: Vec<String>,
    pub db: PathBuf,
    pub limits: Limits,
    /// Sequences decoded at once.
    pub max_active: usize,
    /// Prompt tokens read per round at most, beside the decoding steps (see
    /// [`lmkit_infer::Decoder::step_many`]; 0: each prompt whole, in a pass of its own).
    pub prompt_tokens: usize,
    /// Sequences accepted (queued or decoding) before answering 429.
    pub max_queue: usize,
    pub moderator: Moderator,
    /// A BERT checkpoint for `POST /v1/embeddings`.
    pub embedding_model: Option<PathBuf>,
    /// LoRA adapters served beside the base model, by the name requests give as `model`.
    pub adapters: Vec<(String, PathBuf)>,
    /// A document index (`lmkit index build`) for retrieval in chat requests.
    pub index: Option<PathBuf>,
    /// The index's embedding model, when it has moved since the index was built.
    pub index_embedding_model: Option<PathBuf>,
    /// What the active sequences' KV caches may reserve together.
    pub kv_memory: KvMemory,
    /// What the prefix cache may keep ([`prefix::PrefixCache`]).
    pub prefix_cache: PrefixCacheSize,
}

/// How much the prefix cache may keep (`--prefix-cache`; see [`prefix::PrefixCache`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PrefixCacheSize {
    /// A quarter of the KV budget (1 GiB where the KV caches have no limit).
    Auto,
    Bytes(u64),
    /// None kept: every prompt read whole.
    Off,
}

impl std::str::FromStr for PrefixCacheSize {
    type Err = String;

    /// `auto`, `none` (or `0`), or a size as `--kv-memory` takes one.
    fn from_str(s: &str) -> Result<PrefixCacheSize, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(PrefixCacheSize::Auto),
            "none" | "off" | "0" => Ok(PrefixCacheSize::Off),
            _ => parse_size(s).map(PrefixCacheSize::Bytes),
        }
    }
}

/// The bytes the prefix cache may keep, for a KV budget of `kv` (`None`: no limit).
fn prefix_cache_bytes(size: PrefixCacheSize, kv: Option<KvBudget>) -> u64 {
    match size {
        PrefixCacheSize::Off => 0,
        PrefixCacheSize::Bytes(b) => b,
        PrefixCacheSize::Auto => kv.map_or(1 << 30, |b| b.bytes / 4),
    }
}

/// How much memory the active sequences' KV caches may reserve together (`--kv-memory`; see
/// [`engine::KvBudget`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KvMemory {
    /// A share of what the device has free once the model is loaded: 90% of a GPU's free
    /// memory, half of the memory the CPU machine has available.
    Auto,
    Bytes(u64),
    /// No limit.
    Unlimited,
}

impl std::str::FromStr for KvMemory {
    type Err = String;

    /// `auto`, `none` (or `0`: no limit), or a size ([`parse_size`]).
    fn from_str(s: &str) -> Result<KvMemory, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(KvMemory::Auto),
            "none" | "unlimited" | "0" => Ok(KvMemory::Unlimited),
            _ => parse_size(s).map(KvMemory::Bytes),
        }
    }
}

/// A size: a number with an optional unit, `B`, `KB`, `MB`, `GB`, `TB` (powers of 1000) or
/// `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024); more than 0.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: u64 = match unit.trim() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit (expected e.g. 8GiB, 512MiB, 2GB, auto or none)"
            ))
        }
    };
    match number.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 => Ok((n * scale as f64) as u64),
        _ => Err(format!(
            "`{s}`: expected a size such as 8GiB or 512MiB, auto, or none"
        )),
    }
}

/// The KV budget `kv` comes to for a model whose caches take `per_position` bytes a position
/// on a device with `free` bytes free (`None`: no limit).
fn kv_budget(kv: KvMemory, per_position: u64, free: Option<u64>, gpu: bool) -> Option<KvBudget> {
    if per_position == 0 {
        return None;
    }
    let bytes = match kv {
        KvMemory::Unlimited => return None,
        KvMemory::Bytes(b) => b,
        KvMemory::Auto => {
            let free = free?;
            if gpu {
                free / 10 * 9
            } else {
                free / 2
            }
        }
    };
    Some(KvBudget {
        bytes,
        per_position,
    })
}

/// The encoder behind `/v1/embeddings`.
pub struct Embedder {
    pub model: lmkit_models::bert::Bert,
    pub tokenizer: lmkit_tokenize::Tokenizer,
    pub name: String,
    pub device: lmkit_models::Device,
}

pub struct AppState {
    pub engine: Engine,
    pub tokenizer: lmkit_tokenize::Tokenizer,
    pub template: Option<lmkit_tokenize::chat::ChatTemplate>,
    pub model_name: String,
    /// The adapters' names: `model` = adapters[i] decodes with model variant i + 1.
    pub adapters: Vec<String>,
    pub max_positions: usize,
    pub vocab_size: usize,
    /// The model's end-of-text ids (config.json, generation_config.json or GGUF metadata).
    pub eos: Vec<u32>,
    pub chat_end: Option<u32>,
    /// The model's fill-in-the-middle tokens, where it has them (completions' `suffix`).
    pub fim: Option<lmkit_tokenize::fim::Fim>,
    pub moderator: Moderator,
    pub store: Arc<Store>,
    pub metrics: metrics::Metrics,
    pub api_keys: Vec<String>,
    /// `None`: any Host.
    pub allowed_hosts: Option<Vec<String>>,
    /// Host names given with `--allowed-host` (lower case): pages from them may call the server
    /// even when the Host they reach it by differs (a reverse proxy).
    pub allowed_origin_hosts: Vec<String>,
    pub limits: Limits,
    pub created: i64,
    pub embedder: Option<Arc<Embedder>>,
    pub retriever: Option<api::retrieval::Retriever>,
    /// What the active sequences' KV caches may reserve together (`None`: no limit).
    pub kv_budget: Option<KvBudget>,
    /// Bytes the prefix cache may keep (0: none).
    pub prefix_cache: u64,
    /// The grammar engine for constrained output (`response_format`, `tools`), built on first use.
    pub grammars: std::sync::OnceLock<Result<Arc<lmkit_infer::constrain::Grammars>, String>>,
}

/// Reads API keys from a file: one per line, blank lines and `#` comments skipped.
pub fn read_keys(path: &Path) -> Result<Vec<String>, ServeError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ServeError::Config(format!("{}: {e}", path.display())))?;
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if keys.is_empty() {
        return Err(ServeError::Config(format!(
            "{}: no API keys in the file (one per line)",
            path.display()
        )));
    }
    Ok(keys)
}

/// Loads the model and its tokenizer and starts the model worker.
pub fn load_state(cfg: ServeConfig) -> Result<Arc<AppState>, ServeError> {
    // The queue's channel holds room for every waiting sequence from the start.
    const MAX_QUEUE: usize = 1 << 20;
    if cfg.max_queue > MAX_QUEUE {
        return Err(ServeError::Config(format!(
            "--max-queue ({}) must be at most {MAX_QUEUE}",
            cfg.max_queue
        )));
    }
    if cfg.limits.max_n > cfg.max_queue {
        // A request for more choices than the queue holds could never be accepted: clients
        // would retry its 429 forever.
        return Err(ServeError::Config(format!(
            "--max-n ({}) exceeds --max-queue ({}); raise --max-queue or lower --max-n",
            cfg.limits.max_n, cfg.max_queue
        )));
    }
    if cfg.api_keys.iter().any(|k| k.trim().is_empty()) {
        return Err(ServeError::Config(
            "an API key is empty; give non-empty keys (or none, for no authentication)".into(),
        ));
    }
    let dir = lmkit_models::resolve_checkpoint(&cfg.model_dir);
    let device = lmkit_models::parse_device(&cfg.device)?;
    let dtype = lmkit_models::parse_dtype(&cfg.dtype)?;
    let mut variants = vec![None];
    for (name, path) in &cfg.adapters {
        let a = lmkit_models::layers::lora::Adapters::load(path, &device)
            .map_err(|e| ServeError::Config(format!("adapter `{name}`: {e}")))?;
        variants.push(Some(a));
    }
    let (models, mcfg) = CausalLm::load_variants(&dir, &variants, &device, dtype)?;
    let tokenizer = lmkit_tokenize::load(&dir)?;
    let template = lmkit_tokenize::chat::load_template(&dir)?;
    let tk_vocab = tokenizer.get_vocab_size(true);
    if tk_vocab > mcfg.vocab_size() {
        return Err(ServeError::Config(format!(
            "{}: the tokenizer has {tk_vocab} tokens but the model's vocab_size is {}",
            dir.display(),
            mcfg.vocab_size()
        )));
    }
    let store = Store::open(&cfg.db)?;
    let model_name = cfg.model_name.clone().unwrap_or_else(|| {
        cfg.model_dir
            .canonicalize()
            .unwrap_or(cfg.model_dir.clone())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "lmkit".into())
    });
    for (i, (name, _)) in cfg.adapters.iter().enumerate() {
        if *name == model_name || cfg.adapters[..i].iter().any(|(n, _)| n == name) {
            return Err(ServeError::Config(format!(
                "the model name `{name}` is given twice; name each adapter (--adapter NAME=DIR) apart from the base (--model-name)"
            )));
        }
    }
    let chat_end = tokenizer.token_to_id("<|end|>");
    let fim = lmkit_tokenize::fim::Fim::of(&dir, &tokenizer);
    let embedder = match &cfg.embedding_model {
        Some(p) => {
            let d = lmkit_models::resolve_checkpoint(p);
            Some(Arc::new(Embedder {
                model: lmkit_models::bert::Bert::load(&d, &device)?,
                tokenizer: lmkit_tokenize::load(&d)?,
                name: p
                    .canonicalize()
                    .unwrap_or(p.clone())
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "embeddings".into()),
                device: device.clone(),
            }))
        }
        None => None,
    };
    let retriever = match &cfg.index {
        Some(p) => {
            let config = |e: lmkit_rag::RagError| ServeError::Config(e.to_string());
            let mut index = lmkit_rag::Store::open(p).map_err(config)?;
            let embedder = lmkit_rag::embed::Embedder::for_index(
                index.manifest(),
                cfg.index_embedding_model.as_deref(),
            )
            .map_err(config)?;
            Some(api::retrieval::Retriever {
                chunks: index.len().map_err(config)?,
                index: std::sync::Mutex::new(index),
                embedder,
            })
        }
        None => None,
    };
    // Measured once the model (and the embedding model) is loaded: what is left for the caches.
    let kv_per_position = mcfg.kv_bytes_per_position(dtype.size_in_bytes());
    let kv_budget = kv_budget(
        cfg.kv_memory,
        kv_per_position,
        lmkit_models::free_memory(&device),
        !device.is_cpu(),
    );
    let prefix_cache = match kv_per_position {
        0 => 0,
        _ => prefix_cache_bytes(cfg.prefix_cache, kv_budget),
    };
    let (eos, warning) = lmkit_models::sampleable_stop_ids(&dir, mcfg.vocab_size())?;
    if let Some(w) = warning {
        eprintln!("lmkit serve: warning: {w}");
    }
    Ok(Arc::new(AppState {
        engine: Engine::start(
            models,
            Capacity {
                max_active: cfg.max_active,
                max_queue: cfg.max_queue,
                prompt_tokens: cfg.prompt_tokens,
                kv: kv_budget,
                prefix_cache,
                kv_per_position,
            },
        ),
        kv_budget,
        prefix_cache,
        template,
        adapters: cfg.adapters.iter().map(|(n, _)| n.clone()).collect(),
        model_name,
        max_positions: mcfg.max_positions(),
        vocab_size: mcfg.vocab_size(),
        eos,
        chat_end,
        fim,
        tokenizer,
        moderator: cfg.moderator,
        store: Arc::new(store),
        metrics: metrics::Metrics::default(),
        allowed_hosts: guard::allowed_hosts(&cfg.host, &cfg.allowed_hosts),
        allowed_origin_hosts: cfg
            .allowed_hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        api_keys: cfg.api_keys,
        limits: cfg.limits,
        created: store::now(),
        embedder,
        retriever,
        grammars: std::sync::OnceLock::new(),
    }))
}

impl AppState {
    /// The name of model variant `i` (0: the base).
    pub fn variant_name(&self, i: usize) -> &str {
        match i {
            0 => &self.model_name,
            i => &self.adapters[i - 1],
        }
    }
}

async fn models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": std::iter::once(state.model_name.clone())
            .chain(state.adapters.iter().cloned())
            .chain(state.embedder.iter().map(|e| e.name.clone()))
            .map(|id| json!({"id": id, "object": "model", "created": state.created, "owned_by": "lmkit"}))
            .collect::<Vec<_>>(),
        // lmkit's own: the document index chat requests may retrieve from (`"retrieval"`).
        "index": state.retriever.as_ref().map(|r| json!({"chunks": r.chunks})),
    }))
}

async fn health(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    if !state.api_keys.is_empty() {
        // Open without a key: nothing beyond "up".
        return Json(json!({"status": "ok"}));
    }
    Json(json!({"status": "ok", "model": state.model_name, "queue_depth": state.engine.depth()}))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state
            .metrics
            .render(&state.engine, state.kv_budget.map(|b| b.bytes)),
    )
        .into_response()
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "this endpoint does not take that method (the API's endpoints are POSTs, /v1/models a GET)",
    )
}

async fn not_found() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such endpoint (see GET /v1/models, POST /v1/completions, POST /v1/chat/completions)",
    )
}

/// The HTTP routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(api::completions))
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/v1/embeddings", post(api::embeddings))
        .route("/review/api/recent", get(web::recent))
        .route("/review/api/stats", get(web::stats))
        .route("/review/api/export", get(web::export))
        .route("/review/api/rate", post(web::rate))
        .route("/review/api/pair", get(web::pair))
        .route("/review/api/prefer", post(web::prefer))
        // With API keys, the metrics (request counts and timings) need one too; /health stays
        // open for load balancers and tells only that the server is up.
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::auth,
        ));
    Router::new()
        .merge(protected)
        .route("/health", get(health))
        .route("/", get(web::chat_page))
        .route("/review", get(web::review_page))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::check,
        ))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .with_state(state)
}

/// Serves until Ctrl-C. `on_ready` gets the bound address (port 0 picks a free one).
///
/// Connections are served by hyper directly (not `axum::serve`) so that a client gets
/// `limits.read_timeout_secs` to send its headers (a slow client cannot hold a connection open
/// forever) and at most `limits.max_connections` are open at once.
pub async fn serve(
    state: Arc<AppState>,
    host: &str,
    port: u16,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;
    let addr = format!("{host}:{port}");
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| ServeError::Bind {
            addr: addr.clone(),
            source: e,
        })?;
    let local = listener.local_addr().map_err(|e| ServeError::Bind {
        addr: addr.clone(),
        source: e,
    })?;
    on_ready(local);
    let app = router(state.clone());
    let slots = Arc::new(tokio::sync::Semaphore::new(
        state.limits.max_connections.max(1),
    ));
    let read_timeout = std::time::Duration::from_secs(state.limits.read_timeout_secs.max(1));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    eprintln!("lmkit serve: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            state.metrics.request("connection_refused", 503);
            drop(stream);
            continue;
        };
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(read_timeout);
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    // Let open requests finish (streams included), for a while.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), graceful.shutdown()).await;
    Ok(())
}
