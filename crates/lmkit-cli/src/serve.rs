//! `lmkit serve`: the OpenAI-compatible HTTP server.

use anyhow::{Context, Result};
use clap::Args;
use lmkit_serve::moderation::{Moderator, Policy};
use lmkit_serve::{Limits, ServeConfig};
use std::path::PathBuf;

#[derive(Args)]
#[command(after_help = "Examples:\n  lmkit serve runs/quickstart/gpt\n  \
    lmkit serve runs/quickstart/gpt --port 8080 --api-key sk-local-1 --db reviews.sqlite\n  \
    lmkit serve runs/quickstart/gpt --moderation-rules configs/moderation-rules.txt --moderation-policy flag\n  \
    lmkit serve smollm2/ --adapter legal=runs/sft-legal --adapter chat=runs/sft-chat   # model: \"legal\" picks an adapter\n  \
    lmkit serve smollm2/ --device cuda --dtype bf16 --max-active 32\n  \
    lmkit serve smollm2/ --kv-memory 4GiB   # the decoding sequences' KV caches within 4 GiB\n  \
    lmkit serve smollm2/ --prefix-cache none   # read every prompt whole (no reuse of earlier ones' keys and values)\n\n\
    Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream: true for SSE;\n\
    logprobs; echo and lists of prompts on /v1/completions, as lm-evaluation-harness's local-completions\n\
    model sends them), GET /health, GET /metrics (Prometheus), GET / (chat page), GET /review (rate completions, pick the\n\
    better of two). Every completion is stored in the SQLite database (--db) for review; export the\n\
    preference pairs with `lmkit data export-preferences`.")]
pub struct ServeArgs {
    /// Checkpoint directory (or a training output directory: its latest checkpoint)
    model: PathBuf,
    /// Address to bind (127.0.0.1 keeps the server local; 0.0.0.0 opens it to the network)
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Accepted API key (repeatable); without any key the API is open
    #[arg(long = "api-key", value_name = "KEY")]
    api_keys: Vec<String>,
    /// File of accepted API keys, one per line
    #[arg(long)]
    api_keys_file: Option<PathBuf>,
    /// A host name clients may use to reach the server (repeatable). By default a server bound
    /// to loopback answers only to localhost/127.0.0.1/[::1] (so that a web page cannot rebind a
    /// name of its own to it), and one bound elsewhere to any name.
    #[arg(long = "allowed-host", value_name = "NAME")]
    allowed_hosts: Vec<String>,
    /// SQLite database of completions, ratings and preference pairs
    #[arg(long, default_value = "lmkit-completions.sqlite")]
    db: PathBuf,
    /// Name clients give as `model` (default: the model directory's name)
    #[arg(long)]
    model_name: Option<String>,
    /// A LoRA adapter to serve beside the base model, chosen by requests whose `model` is NAME
    /// (repeatable; the variants share the base's weights; a bare DIR is named after its
    /// directory)
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    adapters: Vec<String>,
    #[command(flatten)]
    placement: crate::placement::Placement,
    /// Sequences decoded at once (their steps interleave)
    #[arg(long, default_value_t = 8)]
    max_active: usize,
    /// The most memory the decoding sequences' KV caches may take together, e.g. 8GiB or 512MiB:
    /// a request starts once the room its cache can come to need (prompt and max_tokens) fits
    /// beside the others' and waits in the queue until then; auto: 90% of a GPU's free memory
    /// once the model is loaded, half of the CPU machine's available memory; none: no limit
    #[arg(long, default_value = "auto", value_parser = clap::value_parser!(lmkit_serve::KvMemory))]
    kv_memory: lmkit_serve::KvMemory,
    /// The most memory kept of finished sequences' keys and values, for the requests that begin
    /// with the same tokens (a chat's next turn, a shared system prompt or document), which then
    /// read only the rest of their prompt; entries give way to decoding sequences. auto: a
    /// quarter of --kv-memory's budget (1 GiB without one); none: every prompt read whole
    #[arg(long, default_value = "auto", value_parser = clap::value_parser!(lmkit_serve::PrefixCacheSize))]
    prefix_cache: lmkit_serve::PrefixCacheSize,
    /// Prompt tokens read per round at most, in the same pass as the decoding steps: prompts
    /// that arrive together share it (each attending only to itself), a longer prompt is read in
    /// pieces over several rounds so the others' tokens keep coming; 0 reads each prompt whole
    /// in a pass of its own
    #[arg(long, default_value_t = lmkit_infer::PACKED_PROMPT_TOKENS)]
    prompt_tokens: usize,
    /// Sequences accepted, queued or decoding, before answering 429
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Largest request body in bytes
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Most new tokens per choice
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    /// Most choices (`n`) per request
    #[arg(long, default_value_t = 8)]
    max_n: usize,
    /// Seconds a client has to send a request's headers, and then its body
    #[arg(long, default_value_t = 30)]
    read_timeout: u64,
    /// Connections open at once (more are closed)
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Moderation rules, one `category: regex` per line
    #[arg(long)]
    moderation_rules: Option<PathBuf>,
    /// A BERT checkpoint to serve POST /v1/embeddings with
    #[arg(long)]
    embedding_model: Option<PathBuf>,
    /// A document index (`lmkit index build`: a directory or a postgres:// URL): chat requests with `"retrieval": true` (or
    /// {k, mode, filter}) answer from its passages and return them in `sources`
    #[arg(long)]
    index: Option<PathBuf>,
    /// The index's embedding model, when it has moved since the index was built
    #[arg(long, requires = "index")]
    index_embedding_model: Option<PathBuf>,
    /// Moderation classifier directory (from `lmkit moderation train`)
    #[arg(long)]
    moderation_classifier: Option<PathBuf>,
    /// What to do with flagged prompts and completions: refuse, flag or off
    #[arg(long, default_value = "refuse")]
    moderation_policy: String,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let policy: Policy = a.moderation_policy.parse().map_err(anyhow::Error::msg)?;
    let moderator = if a.moderation_rules.is_none() && a.moderation_classifier.is_none() {
        Moderator::none()
    } else {
        crate::moderation::moderator(
            a.moderation_rules.as_ref(),
            a.moderation_classifier.as_ref(),
            policy,
        )?
    };
    let mut api_keys = a.api_keys.clone();
    if let Some(f) = &a.api_keys_file {
        api_keys.extend(lmkit_serve::read_keys(f)?);
    }
    if api_keys.is_empty() && a.host != "127.0.0.1" && a.host != "localhost" && a.host != "::1" {
        eprintln!(
            "warning: serving on {} without an API key: anyone who can reach it can use the model",
            a.host
        );
    }
    let cfg = ServeConfig {
        model_dir: a.model.clone(),
        device: a.placement.device.clone(),
        dtype: a.placement.dtype.clone(),
        model_name: a.model_name.clone(),
        host: a.host.clone(),
        port: a.port,
        api_keys,
        allowed_hosts: a.allowed_hosts.clone(),
        db: a.db.clone(),
        limits: Limits {
            max_body_bytes: a.max_body_bytes,
            max_tokens: a.max_tokens,
            max_n: a.max_n,
            read_timeout_secs: a.read_timeout,
            max_connections: a.max_connections,
            ..Limits::default()
        },
        max_active: a.max_active,
        kv_memory: a.kv_memory,
        prefix_cache: a.prefix_cache,
        prompt_tokens: a.prompt_tokens,
        max_queue: a.max_queue,
        moderator,
        embedding_model: a.embedding_model.clone(),
        index: a.index.clone(),
        index_embedding_model: a.index_embedding_model.clone(),
        adapters: a
            .adapters
            .iter()
            .map(|s| match s.split_once('=') {
                Some((name, dir)) if !name.is_empty() => (name.to_string(), PathBuf::from(dir)),
                _ => {
                    let dir = PathBuf::from(s);
                    let name = dir
                        .canonicalize()
                        .unwrap_or(dir.clone())
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| s.clone());
                    (name, dir)
                }
            })
            .collect(),
    };
    let (host, port) = (cfg.host.clone(), cfg.port);
    let state = lmkit_serve::load_state(cfg)?;
    let name = state.model_name.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let kv = match state.kv_budget {
        Some(kv) => format!(
            "KV caches: up to {} for the decoding sequences together ({} positions at {} KiB; --kv-memory)",
            lmkit_core::memory::gib(kv.bytes as f64),
            kv.bytes / kv.per_position,
            kv.per_position.div_ceil(1024),
        ),
        None => "KV caches: no limit (--kv-memory)".to_string(),
    };
    let kv = match state.prefix_cache {
        0 => format!("{kv}; prefix cache: off"),
        b => format!(
            "{kv}; prefix cache: up to {} (--prefix-cache)",
            lmkit_core::memory::gib(b as f64)
        ),
    };
    rt.block_on(lmkit_serve::serve(state, &host, port, |addr| {
        // The first line says where: scripts and tests wait for it.
        eprintln!("serving `{name}` on http://{addr} (chat page: http://{addr}/, review: http://{addr}/review); Ctrl-C stops");
        eprintln!("{kv}");
    }))?;
    Ok(())
}
