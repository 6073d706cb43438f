//! Counters and histograms for `GET /metrics` in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

const BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (c, b) in self.counts.iter_mut().zip(BUCKETS) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (c, b) in self.counts.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    prompt_tokens: u64,
    completion_tokens: u64,
    flagged: u64,
    latency: BTreeMap<String, Histogram>,
    first_token: Histogram,
}

#[derive(Default)]
pub struct Metrics(Mutex<Inner>);

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Inner)) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g);
    }

    pub fn request(&self, endpoint: &str, status: u16) {
        self.with(|m| *m.requests.entry((endpoint.into(), status)).or_default() += 1);
    }

    pub fn tokens(&self, prompt: u64, completion: u64) {
        self.with(|m| {
            m.prompt_tokens += prompt;
            m.completion_tokens += completion;
        });
    }

    pub fn flagged(&self) {
        self.with(|m| m.flagged += 1);
    }

    pub fn latency(&self, endpoint: &str, seconds: f64) {
        self.with(|m| {
            m.latency
                .entry(endpoint.into())
                .or_default()
                .observe(seconds)
        });
    }

    pub fn first_token(&self, seconds: f64) {
        self.with(|m| m.first_token.observe(seconds));
    }

    /// The metrics in Prometheus' text format, with the engine's: its queue depth, active
    /// sequences, rounds of work and their seconds ([`crate::engine::Engine::busy`]), KV bytes
    /// reserved and the prefix cache's counts; and the KV budget if any.
    pub fn render(&self, engine: &crate::engine::Engine, kv_budget: Option<u64>) -> String {
        let (queue_depth, active) = (engine.depth(), engine.active());
        let ((rounds, busy), kv_reserved) = (engine.busy(), engine.kv_reserved());
        let prefix = engine.prefix_stats();
        let read = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let mut out = String::new();
        self.with(|m| {
            out.push_str("# HELP lmkit_requests_total HTTP requests by endpoint and status.\n# TYPE lmkit_requests_total counter\n");
            for ((e, s), n) in &m.requests {
                let _ = writeln!(
                    out,
                    "lmkit_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}"
                );
            }
            out.push_str("# HELP lmkit_tokens_total Tokens processed.\n# TYPE lmkit_tokens_total counter\n");
            let _ = writeln!(
                out,
                "lmkit_tokens_total{{kind=\"prompt\"}} {}\nlmkit_tokens_total{{kind=\"completion\"}} {}",
                m.prompt_tokens, m.completion_tokens
            );
            out.push_str("# HELP lmkit_moderation_flagged_total Prompts or completions flagged by moderation.\n# TYPE lmkit_moderation_flagged_total counter\n");
            let _ = writeln!(out, "lmkit_moderation_flagged_total {}", m.flagged);
            out.push_str("# HELP lmkit_request_duration_seconds Time from request to last byte.\n# TYPE lmkit_request_duration_seconds histogram\n");
            for (e, h) in &m.latency {
                h.render(
                    &mut out,
                    "lmkit_request_duration_seconds",
                    &format!("endpoint=\"{e}\""),
                );
            }
            out.push_str("# HELP lmkit_time_to_first_token_seconds Time from request to the first generated token.\n# TYPE lmkit_time_to_first_token_seconds histogram\n");
            m.first_token
                .render(&mut out, "lmkit_time_to_first_token_seconds", "");
        });
        let _ = writeln!(
            out,
            "# HELP lmkit_queue_depth Sequences queued or decoding.\n# TYPE lmkit_queue_depth gauge\nlmkit_queue_depth {queue_depth}"
        );
        let _ = writeln!(
            out,
            "# HELP lmkit_active_sequences Sequences decoding now.\n# TYPE lmkit_active_sequences gauge\nlmkit_active_sequences {active}"
        );
        let _ = writeln!(
            out,
            "# HELP lmkit_engine_rounds_total Rounds of the model worker (one pass per model variant over its decoding steps and prompt pieces).\n# TYPE lmkit_engine_rounds_total counter\nlmkit_engine_rounds_total {rounds}"
        );
        let _ = writeln!(
            out,
            "# HELP lmkit_engine_busy_seconds_total Time the model worker spent in its rounds (passes and sampling; no HTTP, templates or tokenization).\n# TYPE lmkit_engine_busy_seconds_total counter\nlmkit_engine_busy_seconds_total {busy:.6}"
        );
        let _ = writeln!(
            out,
            "# HELP lmkit_kv_reserved_bytes KV cache room the decoding sequences hold (their prompts and max_tokens).\n# TYPE lmkit_kv_reserved_bytes gauge\nlmkit_kv_reserved_bytes {kv_reserved}"
        );
        if let Some(b) = kv_budget {
            let _ = writeln!(
                out,
                "# HELP lmkit_kv_budget_bytes What the decoding sequences' KV caches may hold together (--kv-memory).\n# TYPE lmkit_kv_budget_bytes gauge\nlmkit_kv_budget_bytes {b}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP lmkit_prompt_tokens_read_total Prompt tokens of the sequences started, by where their keys and values came from: read by the model, or from the prefix cache.\n# TYPE lmkit_prompt_tokens_read_total counter\nlmkit_prompt_tokens_read_total{{from=\"model\"}} {}\nlmkit_prompt_tokens_read_total{{from=\"prefix_cache\"}} {}",
            read(&prefix.prompt_tokens).saturating_sub(read(&prefix.cached_tokens)),
            read(&prefix.cached_tokens),
        );
        let _ = writeln!(
            out,
            "# HELP lmkit_prefix_cache_bytes Keys and values the prefix cache keeps (--prefix-cache).\n# TYPE lmkit_prefix_cache_bytes gauge\nlmkit_prefix_cache_bytes {}\n# HELP lmkit_prefix_cache_entries Sequences the prefix cache keeps.\n# TYPE lmkit_prefix_cache_entries gauge\nlmkit_prefix_cache_entries {}",
            read(&prefix.bytes),
            read(&prefix.entries),
        );
        out
    }
}
