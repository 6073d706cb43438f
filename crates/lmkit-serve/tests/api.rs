//! The HTTP API end to end on a tiny trained model: answers equal lmkit's own generation,
//! streaming reassembles to the stored text, auth, limits, bad input, moderation, a full queue,
//! client disconnects, and the review API with preference export.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use lmkit_serve::moderation::{Moderator, Policy};
use lmkit_serve::{load_state, router, AppState, Limits, ServeConfig};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tower::ServiceExt;

/// A 2-step-trained GPT-2 checkpoint (with tokenizer and chat template), made once per test run.
fn model_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serve-model");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let text = "the cat sat on the mat and the dog sat on the log.\n".repeat(40);
        let corpus = dir.join("c.txt");
        std::fs::write(&corpus, &text).unwrap();
        let opts = lmkit_tokenize::TrainOptions {
            vocab_size: 300,
            ..Default::default()
        };
        let tk = lmkit_tokenize::train(std::slice::from_ref(&corpus), &opts).unwrap();
        lmkit_tokenize::save(&tk, &dir.join("tok"), &opts.special_tokens).unwrap();
        let ids = lmkit_tokenize::encode_batch(&tk, &[text]).unwrap();
        let mut w = lmkit_tokenize::ShardWriter::new(
            &dir.join("shards"),
            tk.get_vocab_size(true),
            tk.token_to_id("<|endoftext|>"),
            1 << 20,
        )
        .unwrap();
        w.write_document(&ids[0]).unwrap();
        w.finish().unwrap();
        let cfg = format!(
            "[model]\nmodel_type = \"gpt2\"\nn_positions = 1024\nn_embd = 32\nn_layer = 2\nn_head = 2\n\
             [data]\ntrain = \"{d}/shards\"\ntokenizer = \"{d}/tok\"\nval_fraction = 0.0\n\
             [train]\nout_dir = \"{d}/out\"\nseq_len = 16\nbatch_size = 4\nmax_steps = 2\nwarmup_steps = 1\n\
             eval_every = 0\nsave_every = 2\n",
            d = dir.display()
        );
        std::fs::write(dir.join("run.toml"), cfg).unwrap();
        let run = lmkit_train::RunConfig::load(&dir.join("run.toml"), &[]).unwrap();
        lmkit_train::train(&run, lmkit_train::Start::New, &lmkit_train::NoProgress).unwrap();
        dir.join("out")
    })
    .clone()
}

/// The test model's server config, with `db` and `max_queue`, default limits otherwise.
fn config(db: &Path, max_queue: usize) -> ServeConfig {
    ServeConfig {
        model_dir: model_dir(),
        device: "cpu".into(),
        dtype: "f32".into(),
        model_name: Some("tiny".into()),
        host: "127.0.0.1".into(),
        port: 0,
        api_keys: Vec::new(),
        allowed_hosts: Vec::new(),
        db: db.to_path_buf(),
        limits: Limits::default(),
        max_active: 4,
        prompt_tokens: lmkit_infer::PACKED_PROMPT_TOKENS,
        max_queue,
        moderator: Moderator::none(),
        embedding_model: None,
        adapters: Vec::new(),
        index: None,
        index_embedding_model: None,
        kv_memory: lmkit_serve::KvMemory::Auto,
        prefix_cache: lmkit_serve::PrefixCacheSize::Auto,
    }
}

fn state(db: &Path, keys: &[&str], moderator: Moderator, max_queue: usize) -> Arc<AppState> {
    load_state(ServeConfig {
        api_keys: keys.iter().map(|k| k.to_string()).collect(),
        limits: Limits {
            max_body_bytes: 64 * 1024,
            max_tokens: 2000,
            max_n: max_queue.min(8),
            ..Limits::default()
        },
        moderator,
        ..config(db, max_queue)
    })
    .unwrap()
}

async fn call(
    st: &Arc<AppState>,
    method: &str,
    path: &str,
    body: impl Into<Body>,
    key: Option<&str>,
) -> (StatusCode, Vec<u8>, axum::http::HeaderMap) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let resp = router(st.clone())
        .oneshot(req.body(body.into()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, bytes, headers)
}

/// A JSON `POST /v1/completions` with `body`, for tests that drive the response themselves.
fn completion_request(body: &Value) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn post(st: &Arc<AppState>, path: &str, body: Value) -> (StatusCode, Value) {
    let (s, b, _) = call(st, "POST", path, body.to_string(), None).await;
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

fn greedy_reference(prompt: &str, max_tokens: usize) -> String {
    let (model, cfg) =
        lmkit_models::CausalLm::load(&model_dir(), &lmkit_models::Device::Cpu).unwrap();
    let tk = lmkit_tokenize::load(&lmkit_models::resolve_checkpoint(&model_dir())).unwrap();
    let ids = lmkit_tokenize::encode_batch(&tk, &[prompt.to_string()])
        .unwrap()
        .remove(0);
    let opts = lmkit_infer::GenerateOptions {
        max_tokens,
        sampling: lmkit_infer::SamplingParams::greedy(),
        stop_ids: cfg.eos_token_id().into_iter().collect(),
        max_positions: cfg.max_positions(),
    };
    let (out, _) = lmkit_infer::generate(&model, &ids, &opts, &mut |_, _| true).unwrap();
    lmkit_tokenize::decode(&tk, &out).unwrap()
}

/// Data payloads of an SSE body, in order.
fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8(body.to_vec())
        .unwrap()
        .split("\n\n")
        .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(String::from)
        .collect()
}

#[tokio::test]
async fn completions_and_chat_match_local_generation_and_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let st = state(&dir.path().join("db.sqlite"), &[], Moderator::none(), 16);
    let (s, v) = post(
        &st,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "the cat", "max_tokens": 12, "temperature": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(text, greedy_reference("the cat", 12));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let row = st.store.get(v["id"].as_str().unwrap()).unwrap().unwrap();
    assert_eq!(
        (row.prompt.as_str(), row.output.as_str()),
        ("the cat", text)
    );

    // A stop string cuts the text before it.
    let stop: String = text.chars().skip(4).take(3).collect();
    let (_, v) = post(
        &st,
        "/v1/completions",
        json!({"prompt": "the cat", "max_tokens": 12, "temperature": 0, "stop": [stop.clone()]}),
    )
    .await;
    let cut = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(cut, &text[..text.find(&stop).unwrap()]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // n choices with a seed: reproducible, each stored.
    let body = json!({"prompt": "the", "max_tokens": 8, "n": 3, "seed": 7, "temperature": 1.0});
    let (_, a) = post(&st, "/v1/completions", body.clone()).await;
    let (_, b) = post(&st, "/v1/completions", body).await;
    assert_eq!(a["choices"].as_array().unwrap().len(), 3);
    assert_eq!(a["choices"], b["choices"]);
    assert!(st
        .store
        .get(&format!("{}-2", a["id"].as_str().unwrap()))
        .unwrap()
        .is_some());

    // Streaming chat: the chunks reassemble to the stored reply; usage comes last, then [DONE].
    let (s, body, headers) = call(
        &st,
        "POST",
        "/v1/chat/completions",
        json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the dog"}],
               "max_tokens": 10, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}})
        .to_string(),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let data = sse_data(&body);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let usage = &chunks.last().unwrap()["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() >= 1);
    let id = chunks[0]["id"].as_str().unwrap();
    let row = st.store.get(id).unwrap().unwrap();
    assert_eq!(row.output, text);
    assert!(row.prompt.contains("<|system|>Be brief.") && row.prompt.ends_with("<|assistant|>"));
    // The chat reply equals local greedy generation on the rendered prompt (up to the end token).
    let want = greedy_reference(&row.prompt, 10);
    assert!(want.starts_with(&text), "{want:?} vs {text:?}");

    let (s, b, _) = call(&st, "GET", "/metrics", Body::empty(), None).await;
    assert_eq!(s, StatusCode::OK);
    let m = String::from_utf8(b).unwrap();
    assert!(
        m.contains("lmkit_requests_total{endpoint=\"completions\",status=\"200\"} 4"),
        "{m}"
    );
    assert!(m.contains("lmkit_queue_depth 0"), "{m}");
    // The worker's rounds and their time: at least one round per generated token.
    let value = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no `{name}` in\n{m}"))
    };
    assert!(value("lmkit_engine_rounds_total") >= 10.0, "{m}");
    assert!(value("lmkit_engine_busy_seconds_total") > 0.0, "{m}");
}

/// `--dtype bf16` serves the model in bf16 (streams of a round packed together, prompts in
/// pieces); an unknown type is refused at start-up, naming the ones there are.
#[tokio::test]
async fn the_model_is_served_in_bf16_and_unknown_types_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let st = load_state(ServeConfig {
        dtype: "bf16".into(),
        prompt_tokens: 2,
        ..config(&dir.path().join("db.sqlite"), 16)
    })
    .unwrap();
    let body = json!({"messages": [{"role": "user", "content": "the dog and the cat"}],
                      "max_tokens": 6, "n": 3, "seed": 5, "temperature": 1.0});
    let (s, v) = post(&st, "/v1/chat/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 3);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{v}");
    let e = load_state(ServeConfig {
        dtype: "fp8".into(),
        ..config(&dir.path().join("db2.sqlite"), 16)
    })
    .err()
    .expect("refused");
    assert!(e.to_string().contains("expected f32, bf16 or f16"), "{e}");
}

#[tokio::test]
async fn prompts_read_whole_in_pieces_or_once_for_all_choices_give_the_same_replies() {
    // --prompt-tokens 0 (each prompt alone), 2 (the prompt in pieces over many rounds, the
    // other choices waiting), 2048 (the three choices' prompt read once, the cache copied).
    let dir = tempfile::tempdir().unwrap();
    let body = json!({"messages": [{"role": "user", "content": "the dog and the cat"}],
                      "max_tokens": 8, "n": 3, "seed": 5, "temperature": 1.0});
    let mut replies = Vec::new();
    for prompt_tokens in [0, 2, 2048] {
        let st = load_state(ServeConfig {
            prompt_tokens,
            ..config(&dir.path().join(format!("db{prompt_tokens}.sqlite")), 16)
        })
        .unwrap();
        let (s, v) = post(&st, "/v1/chat/completions", body.clone()).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["choices"].as_array().unwrap().len(), 3);
        replies.push(v["choices"].clone());
    }
    assert_eq!(replies[1], replies[0]);
    assert_eq!(replies[2], replies[0]);
}

#[tokio::test]
async fn auth_limits_and_bad_input_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let st = state(
        &dir.path().join("db.sqlite"),
        &["k1", "k2"],
        Moderator::none(),
        16,
    );
    let ok = json!({"prompt": "the", "max_tokens": 2}).to_string();
    let (s, b, _) = call(&st, "POST", "/v1/completions", ok.clone(), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(String::from_utf8_lossy(&b).contains("invalid_api_key"));
    let (s, _, _) = call(&st, "POST", "/v1/completions", ok.clone(), Some("nope")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = call(&st, "GET", "/v1/models", Body::empty(), Some("k2")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = call(&st, "GET", "/health", Body::empty(), None).await;
    assert_eq!(s, StatusCode::OK, "health needs no key");

    let cases: Vec<(Body, StatusCode, &str, &str)> = vec![
        (
            "{\"prompt\": ".into(),
            StatusCode::BAD_REQUEST,
            "",
            "not valid JSON",
        ),
        (
            "{\"prompt\": \"a\"} trailing".into(),
            StatusCode::BAD_REQUEST,
            "",
            "trailing characters",
        ),
        (
            "{\"prompt\": \"a\", \"max_tokens\": 1, \"max_tokens\": 5000}".into(),
            StatusCode::BAD_REQUEST,
            "",
            "duplicate key `max_tokens`",
        ),
        (
            b"{\"prompt\": \"\xff\"}".to_vec().into(),
            StatusCode::BAD_REQUEST,
            "",
            "not valid UTF-8",
        ),
        (
            json!({"prompt": "a", "bogus": 1}).to_string().into(),
            StatusCode::BAD_REQUEST,
            "bogus",
            "unknown field `bogus`",
        ),
        (
            json!({"prompt": "a", "max_tokens": "ten"})
                .to_string()
                .into(),
            StatusCode::BAD_REQUEST,
            "max_tokens",
            "invalid type",
        ),
        (
            json!({"prompt": 5}).to_string().into(),
            StatusCode::BAD_REQUEST,
            "prompt",
            "must be a string",
        ),
        (
            json!({"max_tokens": 3}).to_string().into(),
            StatusCode::BAD_REQUEST,
            "prompt",
            "required",
        ),
        (
            json!({"prompt": "a", "max_tokens": 100000})
                .to_string()
                .into(),
            StatusCode::BAD_REQUEST,
            "max_tokens",
            "at most 2000",
        ),
        (
            json!({"prompt": "a", "temperature": 3}).to_string().into(),
            StatusCode::BAD_REQUEST,
            "temperature",
            "between 0 and 2",
        ),
        (
            json!({"prompt": "a", "n": 99}).to_string().into(),
            StatusCode::BAD_REQUEST,
            "n",
            "between 1 and 8",
        ),
        (
            json!({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]})
                .to_string()
                .into(),
            StatusCode::BAD_REQUEST,
            "stop",
            "up to 4",
        ),
        (
            json!({"prompt": "a", "model": "gpt-9"}).to_string().into(),
            StatusCode::NOT_FOUND,
            "",
            "does not exist",
        ),
        (
            json!({"prompt": "the cat ".repeat(1000)})
                .to_string()
                .into(),
            StatusCode::BAD_REQUEST,
            "prompt",
            "context holds 1024",
        ),
        (
            json!({"prompt": [1, 2, 99999]}).to_string().into(),
            StatusCode::BAD_REQUEST,
            "prompt",
            "out of range",
        ),
        (
            "x".repeat(100_000).into(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "",
            "larger than",
        ),
    ];
    for (body, status, param, needle) in cases {
        let (s, b, _) = call(&st, "POST", "/v1/completions", body, Some("k1")).await;
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(s, status, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{needle}: {msg}");
        if !param.is_empty() {
            assert_eq!(v["error"]["param"], param, "{v}");
        }
    }
    // A wrong method gets an OpenAI-style error body too.
    let (s, b, _) = call(&st, "GET", "/v1/completions", Body::empty(), Some("k1")).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("method"),
        "{v}"
    );
    let chat_cases = [
        (json!({"messages": []}), "messages", "must not be empty"),
        (
            json!({"messages": [{"role": "robot", "content": "hi"}]}),
            "messages[0].role",
            "must be system",
        ),
        (
            json!({"messages": [{"role": "user"}]}),
            "messages[0]",
            "content",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}),
            "messages[0].content",
            "text content",
        ),
    ];
    for (body, param, needle) in chat_cases {
        let (s, b, _) = call(
            &st,
            "POST",
            "/v1/chat/completions",
            body.to_string(),
            Some("k1"),
        )
        .await;
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["error"]["param"].as_str().unwrap().starts_with(param),
            "{v}"
        );
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{v}"
        );
    }
    let (s, _, _) = call(&st, "GET", "/v1/nothing", Body::empty(), Some("k1")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Still serving after all that.
    let (s, _, _) = call(&st, "POST", "/v1/completions", ok, Some("k1")).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn moderation_refuses_or_flags_and_logs_the_decision() {
    let dir = tempfile::tempdir().unwrap();
    let rules = "violence: \\bkill\\b\n";
    let st = state(
        &dir.path().join("db.sqlite"),
        &[],
        Moderator::parse(rules, "rules", Policy::Refuse).unwrap(),
        16,
    );
    let (s, v) = post(
        &st,
        "/v1/completions",
        json!({"prompt": "I will KILL the cat", "max_tokens": 3}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["code"], "content_policy_violation");
    assert!(v["error"]["message"].as_str().unwrap().contains("violence"));
    let rows = st.store.recent(10, &Default::default()).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].finish_reason, "content_filter");
    assert!(rows[0].moderation.contains("violence"));

    let st = state(
        &dir.path().join("db2.sqlite"),
        &[],
        Moderator::parse(rules, "rules", Policy::Flag).unwrap(),
        16,
    );
    let (s, v) = post(
        &st,
        "/v1/completions",
        json!({"prompt": "kill", "max_tokens": 3}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["moderation"]["prompt"]["flagged"], true);
    assert_eq!(v["moderation"]["prompt"]["categories"], json!(["violence"]));
    let row = st.store.get(v["id"].as_str().unwrap()).unwrap().unwrap();
    assert!(row.moderation.contains("\"flagged\":true"));
}

/// Each choice is moderated on its own text: its stored row carries its own verdict (they all
/// carried the verdict on every choice), and a `best_of` answer the verdict on the choice it
/// answers with, not on those it generated and left out.
#[tokio::test]
async fn each_choice_is_moderated_on_its_own_text() {
    let dir = tempfile::tempdir().unwrap();
    let plain = state(&dir.path().join("a.sqlite"), &[], Moderator::none(), 16);
    let texts = |v: &Value| -> Vec<String> {
        let choices = v["choices"].as_array().unwrap();
        choices
            .iter()
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect()
    };
    // A seed and a rule (one letter) that flags some of 4 choices but not the best of them.
    let mut found = None;
    'search: for seed in 0..20 {
        let body = move |extra: Value| {
            let mut b =
                json!({"prompt": "the cat", "max_tokens": 5, "temperature": 1.0, "seed": seed});
            b.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            b
        };
        let (_, all) = post(&plain, "/v1/completions", body(json!({"n": 4}))).await;
        let (_, one) = post(&plain, "/v1/completions", body(json!({"best_of": 4}))).await;
        let (all, best) = (texts(&all), texts(&one).remove(0));
        assert!(all.contains(&best), "{best:?} {all:?}");
        for c in all.concat().chars().filter(|c| c.is_ascii_alphanumeric()) {
            let rules = format!("odd: {c}\n");
            let m = Moderator::parse(&rules, "rules", Policy::Flag).unwrap();
            if !m.check(&best).flagged && all.iter().any(|t| m.check(t).flagged) {
                found = Some((body, rules, all, best));
                break 'search;
            }
        }
    }
    let (body, rules, all, best) = found.expect("no seed whose choices a letter tells apart");
    let st = state(
        &dir.path().join("b.sqlite"),
        &[],
        Moderator::parse(&rules, "rules", Policy::Flag).unwrap(),
        16,
    );
    let m = Moderator::parse(&rules, "rules", Policy::Flag).unwrap();
    let (s, v) = post(&st, "/v1/completions", body(json!({"n": 4}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(texts(&v), all);
    assert_eq!(v["moderation"]["completion"]["flagged"], true);
    let (s, v) = post(&st, "/v1/completions", body(json!({"best_of": 4}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(texts(&v), vec![best.clone()]);
    assert_eq!(v["moderation"]["completion"]["flagged"], false, "{v}");
    let rows = st.store.recent(20, &Default::default()).unwrap();
    assert_eq!(rows.len(), 8);
    for r in &rows {
        let stored: Value = serde_json::from_str(&r.moderation).unwrap();
        let own = m.check(&r.output).flagged;
        assert_eq!(
            stored["completion"]["flagged"], own,
            "{:?}: {}",
            r.output, r.moderation
        );
    }
    assert!(rows.iter().any(|r| m.check(&r.output).flagged));
}

#[tokio::test]
async fn a_full_queue_answers_429_and_a_disconnect_cancels_generation() {
    let dir = tempfile::tempdir().unwrap();
    let st = state(&dir.path().join("db.sqlite"), &[], Moderator::none(), 2);
    // Long enough (the whole context, end-of-sequence ignored) that it cannot finish before the
    // client leaves.
    let long = json!({"prompt": "the", "max_tokens": 2000, "stream": true, "temperature": 1.0,
                      "n": 2, "ignore_eos": true});
    let resp = router(st.clone())
        .oneshot(completion_request(&long))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some());
    // Two sequences hold the whole queue: the next request is turned away with Retry-After.
    let (s, b, h) = call(
        &st,
        "POST",
        "/v1/completions",
        json!({"prompt": "a"}).to_string(),
        None,
    )
    .await;
    assert_eq!(
        s,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        String::from_utf8_lossy(&b)
    );
    assert!(h.contains_key("retry-after"));
    // Dropping the stream (a client that went away) frees the queue well before the context fills.
    drop(body);
    let t0 = std::time::Instant::now();
    while st.engine.depth() > 0 {
        assert!(t0.elapsed().as_secs() < 20, "generation was not cancelled");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The cancelled request is still logged, marked as such.
    let t0 = std::time::Instant::now();
    loop {
        let rows = st.store.recent(10, &Default::default()).unwrap();
        if rows.len() == 2 {
            assert!(
                rows.iter().all(|r| r.finish_reason == "cancelled"),
                "{rows:?}"
            );
            assert!(rows.iter().all(|r| r.completion_tokens < 1000));
            break;
        }
        assert!(t0.elapsed().as_secs() < 20, "no log rows: {rows:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (s, _, _) = call(
        &st,
        "POST",
        "/v1/completions",
        json!({"prompt": "a", "max_tokens": 2}).to_string(),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn review_api_rates_pairs_and_exports_preferences() {
    let dir = tempfile::tempdir().unwrap();
    let st = state(&dir.path().join("db.sqlite"), &[], Moderator::none(), 16);
    let (_, v) = post(
        &st,
        "/v1/completions",
        json!({"prompt": "the", "max_tokens": 6, "n": 2, "seed": 3, "temperature": 1.5}),
    )
    .await;
    let id = v["id"].as_str().unwrap();
    let (a, b) = (format!("{id}-0"), format!("{id}-1"));
    let (s, _) = post(&st, "/review/api/rate", json!({"id": a, "rating": 1})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(st.store.get(&a).unwrap().unwrap().rating, Some(1));
    let (s, _) = post(
        &st,
        "/review/api/rate",
        json!({"id": "missing", "rating": 1}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = post(&st, "/review/api/rate", json!({"id": a, "rating": "great"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, b2, _) = call(&st, "GET", "/review/api/pair", Body::empty(), None).await;
    assert_eq!(s, StatusCode::OK);
    let p: Value = serde_json::from_slice(&b2).unwrap();
    if v["choices"][0]["text"] != v["choices"][1]["text"] {
        assert_eq!(p["prompt"], "the");
    }
    let (s, _) = post(
        &st,
        "/review/api/prefer",
        json!({"chosen": a, "rejected": b}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let mut out = Vec::new();
    assert_eq!(st.store.export_preferences(&mut out).unwrap(), 1);
    let line: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(line["prompt"], "the");
    assert_eq!(line["chosen"], v["choices"][0]["text"]);
    assert_eq!(line["rejected"], v["choices"][1]["text"]);
    let (s, page, _) = call(&st, "GET", "/review", Body::empty(), None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(String::from_utf8(page)
        .unwrap()
        .contains("/review/api/prefer"));
    // Counts, the same export as the CLI's, and filters.
    let (s, b, _) = call(&st, "GET", "/review/api/stats", Body::empty(), None).await;
    assert_eq!(s, StatusCode::OK);
    let stats: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        (stats["preferences"].as_i64(), stats["rated"].as_i64()),
        (Some(1), Some(1))
    );
    let (s, b, _) = call(
        &st,
        "GET",
        "/review/api/export?kind=preferences",
        Body::empty(),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b, out);
    let (s, _, _) = call(
        &st,
        "GET",
        "/review/api/export?kind=secrets",
        Body::empty(),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (_, b, _) = call(
        &st,
        "GET",
        "/review/api/recent?rated=true",
        Body::empty(),
        None,
    )
    .await;
    let rated: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(rated["data"].as_array().map(|a| a.len()), Some(1));
    let (_, b, _) = call(
        &st,
        "GET",
        "/review/api/recent?model=nobody",
        Body::empty(),
        None,
    )
    .await;
    let none: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(none["data"].as_array().map(|a| a.len()), Some(0));
}

/// A client that leaves a non-streaming request: its choices are cancelled, stored and counted.
#[tokio::test]
async fn a_non_streaming_request_whose_client_leaves_is_cancelled_stored_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let st = state(&dir.path().join("db.sqlite"), &[], Moderator::none(), 4);
    let long = json!({"prompt": "the", "max_tokens": 2000, "temperature": 1.0, "ignore_eos": true});
    // The client goes away (its request future is dropped) once generation has started.
    let pending = tokio::spawn(router(st.clone()).oneshot(completion_request(&long)));
    let t0 = std::time::Instant::now();
    while st.engine.depth() == 0 {
        assert!(t0.elapsed().as_secs() < 20, "generation did not start");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    pending.abort();
    assert!(pending.await.unwrap_err().is_cancelled());
    let t0 = std::time::Instant::now();
    loop {
        let rows = st.store.recent(10, &Default::default()).unwrap();
        if let [row] = rows.as_slice() {
            assert_eq!(row.finish_reason, "cancelled", "{row:?}");
            assert!(row.completion_tokens < 1000, "{row:?}");
            break;
        }
        assert!(t0.elapsed().as_secs() < 20, "no log row: {rows:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(st.engine.depth(), 0);
    let (s, b, _) = call(&st, "GET", "/metrics", "", None).await;
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8_lossy(&b);
    assert!(
        text.lines()
            .any(|l| l.contains("status=\"499\"") && l.contains("completions")),
        "{text}"
    );
}

/// Cross-site and rebinding requests, non-JSON bodies, key handling and page headers.
#[tokio::test]
async fn requests_from_other_sites_and_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let st = state(&dir.path().join("db.sqlite"), &["k1"], Moderator::none(), 8);
    let send =
        |headers: Vec<(&'static str, &'static str)>, path: &'static str, body: &'static str| {
            let st = st.clone();
            async move {
                let mut req = Request::builder()
                    .method(if body.is_empty() { "GET" } else { "POST" })
                    .uri(path);
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                let resp = router(st)
                    .oneshot(req.body(Body::from(body)).unwrap())
                    .await
                    .unwrap();
                let (status, h) = (resp.status(), resp.headers().clone());
                let b = resp.into_body().collect().await.unwrap().to_bytes();
                (status, h, String::from_utf8_lossy(&b).into_owned())
            }
        };
    let body = r#"{"prompt": "the", "max_tokens": 1}"#;
    let json = ("content-type", "application/json");
    let key = ("authorization", "bearer k1");
    // The scheme in any case; a wrong key gets a challenge.
    let (s, _, b) = send(
        vec![json, key, ("host", "127.0.0.1:8000")],
        "/v1/completions",
        body,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, h, _) = send(
        vec![json, ("authorization", "Bearer k2")],
        "/v1/completions",
        body,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(h.contains_key("www-authenticate"));
    // A form post from another site (no JSON type), a page of another origin, a rebound name.
    let (s, _, b) = send(
        vec![("content-type", "text/plain"), key],
        "/v1/completions",
        body,
    )
    .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{b}");
    let (s, _, b) = send(
        vec![
            json,
            key,
            ("host", "127.0.0.1:8000"),
            ("origin", "http://evil.example"),
        ],
        "/review/api/prefer",
        r#"{"id": "x"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert!(b.contains("evil.example"), "{b}");
    let (s, _, b) = send(
        vec![json, key, ("host", "evil.example:8000")],
        "/v1/completions",
        body,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert!(b.contains("--allowed-host"), "{b}");
    // A page another local server serves (same name, another port) may not.
    let (s, _, b) = send(
        vec![
            json,
            key,
            ("host", "localhost:8000"),
            ("origin", "http://localhost:9999"),
        ],
        "/v1/completions",
        body,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    // The server's own page may call it.
    let (s, _, b) = send(
        vec![
            json,
            key,
            ("host", "localhost:8000"),
            ("origin", "http://localhost:8000"),
        ],
        "/v1/completions",
        body,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // With keys, /metrics needs one and /health says only "up"; pages refuse to be framed.
    let (s, _, _) = send(vec![], "/metrics", "").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, b) = send(vec![], "/health", "").await;
    assert_eq!((s, b.as_str()), (StatusCode::OK, r#"{"status":"ok"}"#));
    let (s, h, _) = send(vec![], "/", "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h.get("x-frame-options").unwrap(), "DENY");
    // An empty key is refused at start-up.
    let e = load_state(ServeConfig {
        api_keys: vec!["".into()],
        max_active: 1,
        ..config(&dir.path().join("db2.sqlite"), 8)
    })
    .err()
    .expect("refused");
    assert!(e.to_string().contains("empty"), "{e}");
    // More choices per request than the queue holds could never be served.
    let e = load_state(ServeConfig {
        max_active: 1,
        ..config(&dir.path().join("db3.sqlite"), 2)
    })
    .err()
    .expect("refused");
    assert!(e.to_string().contains("--max-queue"), "{e}");
}

/// A slow client is cut off after the read timeout, and connections beyond the limit are closed
/// at once (the served process, over real sockets on 127.0.0.1; bounded waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_time_out_and_connections_are_limited() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let st = load_state(ServeConfig {
        limits: Limits {
            read_timeout_secs: 1,
            max_connections: 2,
            max_n: 4,
            ..Limits::default()
        },
        max_active: 1,
        ..config(&dir.path().join("db.sqlite"), 4)
    })
    .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(lmkit_serve::serve(st, "127.0.0.1", 0, move |a| {
        let _ = tx.send(a);
    }));
    let addr = rx.await.unwrap();
    // Closed by the server: read returns 0 bytes (or an error), within `limit`.
    async fn closed_within(s: &mut tokio::net::TcpStream, limit: u64) -> bool {
        let mut buf = vec![0u8; 4096];
        let deadline = std::time::Duration::from_secs(limit);
        let t0 = std::time::Instant::now();
        loop {
            match tokio::time::timeout(deadline.saturating_sub(t0.elapsed()), s.read(&mut buf))
                .await
            {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue, // a 408 answer before the close
            }
        }
    }
    // Headers that never end: closed after about a second.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let t0 = std::time::Instant::now();
    assert!(
        closed_within(&mut slow, 10).await,
        "a slow client held its connection"
    );
    assert!(t0.elapsed() >= std::time::Duration::from_millis(500));
    // Two idle connections fill the limit; a third is closed at once.
    let mut a = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_within(&mut c, 1).await,
        "a connection over the limit was kept"
    );
    // The open ones still work.
    a.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        a.read_to_string(&mut reply),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    server.abort();
}

/// Sampling through the server: a seed repeats a sample, another seed (almost surely) differs,
/// top_k = 1 is greedy; /metrics histograms count every request, cumulatively.
#[tokio::test]
async fn sampling_parameters_and_metrics_histograms() {
    let dir = tempfile::tempdir().unwrap();
    let st = state(&dir.path().join("db.sqlite"), &[], Moderator::none(), 8);
    let ask = |body: Value| {
        let st = st.clone();
        async move {
            let (s, v) = post(&st, "/v1/completions", body).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            v["choices"][0]["text"].as_str().unwrap().to_string()
        }
    };
    let sample = |seed: u64| json!({"prompt": "the", "max_tokens": 24, "temperature": 1.5, "seed": seed, "ignore_eos": true});
    let a = ask(sample(1)).await;
    assert_eq!(ask(sample(1)).await, a, "the same seed gave another sample");
    let others: Vec<String> =
        futures_join(vec![ask(sample(2)), ask(sample(3)), ask(sample(4))]).await;
    assert!(
        others.iter().any(|o| *o != a),
        "every seed gave the same sample"
    );
    let greedy =
        ask(json!({"prompt": "the", "max_tokens": 12, "temperature": 0, "ignore_eos": true})).await;
    let top1 = ask(
        json!({"prompt": "the", "max_tokens": 12, "temperature": 1.5, "top_k": 1, "seed": 9,
                         "ignore_eos": true}),
    )
    .await;
    assert_eq!(top1, greedy, "top_k = 1 must be greedy");

    let (_, b, _) = call(&st, "GET", "/metrics", "", None).await;
    let text = String::from_utf8_lossy(&b);
    let value = |prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no `{prefix}` in\n{text}"))
    };
    let count = value("lmkit_request_duration_seconds_count{endpoint=\"completions\"}");
    assert_eq!(count, 7.0, "{text}");
    assert_eq!(
        value("lmkit_request_duration_seconds_bucket{endpoint=\"completions\",le=\"+Inf\"}"),
        count
    );
    // Buckets are cumulative: never decreasing.
    let buckets: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("lmkit_request_duration_seconds_bucket{endpoint=\"completions\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(
        buckets.len() > 2 && buckets.windows(2).all(|w| w[0] <= w[1]),
        "{buckets:?}"
    );
    assert_eq!(value("lmkit_time_to_first_token_seconds_count"), 7.0);
}

/// Runs the futures one after the other (the test runtime has one thread).
async fn futures_join<F: std::future::Future<Output = String>>(fs: Vec<F>) -> Vec<String> {
    let mut out = Vec::new();
    for f in fs {
        out.push(f.await);
    }
    out
}

/// A job for the base model submitted to the engine directly: greedy, no stop tokens, its
/// events tagged `index`.
fn greedy_job(
    st: &AppState,
    index: usize,
    prompt: Vec<u32>,
    max_tokens: usize,
    events: tokio::sync::mpsc::UnboundedSender<(usize, lmkit_serve::engine::Event)>,
) -> lmkit_serve::engine::Job {
    lmkit_serve::engine::Job {
        index,
        model: 0,
        prompt,
        opts: lmkit_infer::GenerateOptions {
            max_tokens,
            sampling: lmkit_infer::SamplingParams::greedy(),
            stop_ids: Vec::new(),
            max_positions: st.max_positions,
        },
        events,
        cancel: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        constraint: None,
        logprobs: None,
        prompt_logprobs: None,
        adjust: Default::default(),
    }
}

/// With a KV budget that holds one sequence's cache but not two, the second job waits until
/// the first is done (first come, first served), and a job whose cache alone would exceed the
/// budget is answered with an error naming --kv-memory instead of starting.
#[tokio::test]
async fn sequences_start_only_when_their_kv_cache_fits_the_budget() {
    use lmkit_serve::engine::Event;
    let d = tempfile::tempdir().unwrap();
    let per_position = state(&d.path().join("a.sqlite"), &[], Moderator::none(), 8)
        .kv_budget
        .expect("a budget by default")
        .per_position;
    // gpt2, 2 layers of 32: keys and values in f32.
    assert_eq!(per_position, 2 * 2 * 32 * 4);
    let st = load_state(ServeConfig {
        kv_memory: lmkit_serve::KvMemory::Bytes(100 * per_position),
        ..config(&d.path().join("b.sqlite"), 8)
    })
    .unwrap();
    assert_eq!(st.kv_budget.unwrap().bytes, 100 * per_position);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // Each of the first two needs 64 positions (the fewest a cache holds); the third 3 + 200.
    let job = |index, max_tokens| greedy_job(&st, index, vec![5, 6, 7], max_tokens, tx.clone());
    st.engine
        .submit(vec![job(0, 6), job(1, 6), job(2, 200)])
        .unwrap();
    drop(tx);
    let mut order = Vec::new();
    // A job left waiting for room that never comes would hold the channel open: a failure,
    // not a hang.
    let wait = std::time::Duration::from_secs(60);
    while let Some((i, e)) = tokio::time::timeout(wait, rx.recv())
        .await
        .expect("the engine stopped answering")
    {
        match e {
            Event::Cached(_) | Event::Prompt(_) => {}
            Event::Token(..) => order.push((i, "token")),
            Event::Done(..) => order.push((i, "done")),
            Event::Invalid(msg) => panic!("{msg}"),
            Event::Error(msg) => {
                assert_eq!(i, 2, "{msg}");
                assert!(msg.contains("--kv-memory"), "{msg}");
                order.push((i, "error"));
            }
        }
    }
    let first_of = |i: usize| order.iter().position(|e| e.0 == i).unwrap();
    let done_of = |i: usize| order.iter().position(|&e| e == (i, "done")).unwrap();
    assert!(done_of(0) < first_of(1), "{order:?}");
    assert_eq!(
        order.iter().filter(|e| e.1 == "token").count(),
        12,
        "{order:?}"
    );
    assert!(order.contains(&(2, "error")), "{order:?}");
    // Both released their share: the engine is empty and takes new work.
    assert_eq!(st.engine.depth(), 0);
    assert_eq!(st.engine.kv_reserved(), 0);
    let (_, b, _) = call(&st, "GET", "/metrics", "", None).await;
    let m = String::from_utf8(b).unwrap();
    assert!(m.contains("lmkit_kv_reserved_bytes 0\n"), "{m}");
    let budget = format!("lmkit_kv_budget_bytes {}\n", 100 * per_position);
    assert!(m.contains(&budget), "{m}");
    // Over HTTP, a request that could never fit is the client's to fix; one that fits is served.
    let (status, v) = post(
        &st,
        "/v1/completions",
        json!({"prompt": "the cat", "max_tokens": 200}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "max_tokens", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--kv-memory"),
        "{v}"
    );
    let (status, v) = post(
        &st,
        "/v1/completions",
        json!({"prompt": "the cat", "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

#[test]
fn kv_memory_sizes_parse_with_units() {
    use lmkit_serve::KvMemory;
    let p = |s: &str| s.parse::<KvMemory>();
    assert_eq!(p("auto"), Ok(KvMemory::Auto));
    assert_eq!(p("none"), Ok(KvMemory::Unlimited));
    assert_eq!(p("0"), Ok(KvMemory::Unlimited));
    assert_eq!(p("8GiB"), Ok(KvMemory::Bytes(8 << 30)));
    assert_eq!(p("512 MiB"), Ok(KvMemory::Bytes(512 << 20)));
    assert_eq!(p("1.5gb"), Ok(KvMemory::Bytes(1_500_000_000)));
    assert_eq!(p("4096"), Ok(KvMemory::Bytes(4096)));
    for bad in ["", "lots", "8 parsecs", "-1GiB", "GiB"] {
        let e = p(bad).unwrap_err();
        assert!(e.contains("8GiB"), "{bad}: {e}");
    }
}

/// A request that begins as an earlier one did (its prompt, or its prompt and answer: a chat's
/// next turn) reads only the rest: `usage` and the log count the cached tokens, /metrics the
/// tokens read from the prefix cache, and the answer is the plain generation loop's over the
/// whole prompt.
#[tokio::test]
async fn a_prompt_that_begins_as_an_earlier_one_reads_only_the_rest() {
    let d = tempfile::tempdir().unwrap();
    let st = state(&d.path().join("a.sqlite"), &[], Moderator::none(), 8);
    assert!(st.prefix_cache > 0);
    let first = "the cat sat on the mat and the dog";
    let (status, v) = post(
        &st,
        "/v1/completions",
        json!({"prompt": first, "max_tokens": 6, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let p1 = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{v}"
    );
    let next = format!("{first} sat on the log and the cat");
    let body = json!({"prompt": next, "max_tokens": 8, "temperature": 0});
    let (status, v) = post(&st, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let p2 = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= p1 && cached < p2, "{p1} {p2} {v}");
    assert_eq!(v["choices"][0]["text"], greedy_reference(&next, 8), "{v}");
    // The log keeps the prefix cache's share too.
    let row = st.store.get(v["id"].as_str().unwrap()).unwrap().unwrap();
    assert_eq!(
        (row.prompt_tokens, row.cached_tokens),
        (p2 as i64, cached as i64)
    );
    // Streamed, with usage: the whole of the second prompt is cached now but its last token.
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    stream["stream_options"] = json!({"include_usage": true});
    let (_, b, _) = call(&st, "POST", "/v1/completions", stream.to_string(), None).await;
    let text = String::from_utf8(b).unwrap();
    let usage: Value = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|c| c.get("usage").is_some_and(|u| !u.is_null()))
        .expect("a usage chunk")["usage"]
        .clone();
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"],
        p2 - 1,
        "{text}"
    );
    let (_, b, _) = call(&st, "GET", "/metrics", "", None).await;
    let m = String::from_utf8(b).unwrap();
    let from_cache = format!(
        "lmkit_prompt_tokens_read_total{{from=\"prefix_cache\"}} {}\n",
        cached + p2 - 1
    );
    assert!(m.contains(&from_cache), "{m}");
    let from_model = format!(
        "lmkit_prompt_tokens_read_total{{from=\"model\"}} {}\n",
        p1 + p2 - cached + 1
    );
    assert!(m.contains(&from_model), "{m}");
    assert!(!m.contains("lmkit_prefix_cache_entries 0\n"), "{m}");
    // Off: every prompt read whole, the same answer.
    let off = load_state(ServeConfig {
        prefix_cache: lmkit_serve::PrefixCacheSize::Off,
        ..config(&d.path().join("b.sqlite"), 8)
    })
    .unwrap();
    assert_eq!(off.prefix_cache, 0);
    for _ in 0..2 {
        let (status, w) = post(&off, "/v1/completions", body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{w}");
        assert_eq!(
            w["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
            "{w}"
        );
        assert_eq!(w["choices"][0]["text"], v["choices"][0]["text"]);
    }
}

/// The prefix cache's entries give way to the decoding sequences within the KV budget: while a
/// sequence that needs the room they hold decodes, they hold none of it.
#[tokio::test]
async fn prefix_cache_entries_give_way_to_decoding_sequences() {
    use lmkit_serve::engine::Event;
    use std::sync::atomic::Ordering;
    let d = tempfile::tempdir().unwrap();
    let per_position = 2 * 2 * 32 * 4;
    let st = load_state(ServeConfig {
        kv_memory: lmkit_serve::KvMemory::Bytes(100 * per_position),
        prefix_cache: lmkit_serve::PrefixCacheSize::Bytes(100 * per_position),
        ..config(&d.path().join("a.sqlite"), 8)
    })
    .unwrap();
    let stats = st.engine.prefix_stats();
    let body =
        json!({"prompt": "the cat sat", "max_tokens": 60, "temperature": 0, "ignore_eos": true});
    let (status, v) = post(&st, "/v1/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(stats.entries.load(Ordering::SeqCst), 1);
    let held = stats.bytes.load(Ordering::SeqCst);
    assert!(held >= 60 * per_position, "{held} {v}");
    // 95 new tokens after 3 others: more room than the budget leaves beside the entry.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let job = greedy_job(&st, 0, vec![7, 8, 9], 95, tx);
    st.engine.submit(vec![job]).unwrap();
    let wait = std::time::Duration::from_secs(60);
    let mut tokens = 0;
    while let Some((_, e)) = tokio::time::timeout(wait, rx.recv())
        .await
        .expect("the sequence waited for room that did not come")
    {
        match e {
            Event::Token(..) => {
                tokens += 1;
                if tokens == 1 {
                    // Decoding: its room reserved, the entry gone, and its own prompt (3
                    // positions) not kept either: the budget leaves 2.
                    assert_eq!(st.engine.kv_reserved(), 98 * per_position);
                    assert_eq!(stats.bytes.load(Ordering::SeqCst), 0);
                    assert_eq!(stats.entries.load(Ordering::SeqCst), 0);
                }
            }
            Event::Done(..) => break,
            Event::Cached(n) => panic!("{n} tokens from an entry that had to go"),
            Event::Error(msg) | Event::Invalid(msg) => panic!("{msg}"),
            Event::Prompt(_) => panic!("prompt log-probabilities not asked for"),
        }
    }
    assert_eq!(tokens, 95);
}

/// A prompt is kept as soon as it has been read, while its sequence still decodes: a request
/// that arrives meanwhile and begins the same way (many requests with one system prompt or
/// document) reads only the rest, and generates what reading all of it does.
#[tokio::test]
async fn a_prompt_is_kept_for_other_requests_once_read() {
    use lmkit_serve::engine::Event;
    use std::sync::atomic::Ordering;
    let d = tempfile::tempdir().unwrap();
    let st = state(&d.path().join("a.sqlite"), &[], Moderator::none(), 8);
    let stats = st.engine.prefix_stats();
    let wait = std::time::Duration::from_secs(60);
    let shared: Vec<u32> = (0..24).map(|i| 5 + (i * 7) % 50).collect();
    // Long enough (to the end of the context) to be decoding still when the second one comes.
    let (tx, mut first) = tokio::sync::mpsc::unbounded_channel();
    let long = greedy_job(&st, 0, shared.clone(), st.max_positions - shared.len(), tx);
    let cancel = long.cancel.clone();
    st.engine.submit(vec![long]).unwrap();
    match tokio::time::timeout(wait, first.recv()).await.unwrap() {
        Some((_, Event::Token(..))) => {}
        other => panic!("{other:?}"),
    }
    let entries = stats.entries.load(Ordering::SeqCst);
    if st.engine.active() == 1 {
        // Still decoding (so it has not ended, which keeps what it read too).
        assert_eq!(entries, 1);
        // 2 layers' keys and values of 32 f32 values a position.
        let per_position = 2 * 2 * 32 * 4;
        let held = stats.bytes.load(Ordering::SeqCst);
        assert_eq!(held, shared.len() as u64 * per_position);
    }
    let mut prompt = shared.clone();
    prompt.extend([1, 2, 3]);
    let (tx, mut second) = tokio::sync::mpsc::unbounded_channel();
    st.engine
        .submit(vec![greedy_job(&st, 1, prompt.clone(), 6, tx)])
        .unwrap();
    let (mut cached, mut tokens) = (0, Vec::new());
    while let Some((_, e)) = tokio::time::timeout(wait, second.recv()).await.unwrap() {
        match e {
            Event::Cached(n) => cached = n,
            Event::Token(t, _) => tokens.push(t),
            Event::Done(..) => break,
            Event::Error(msg) | Event::Invalid(msg) => panic!("{msg}"),
            Event::Prompt(_) => panic!("prompt log-probabilities not asked for"),
        }
    }
    assert!(cached >= shared.len(), "{cached}");
    cancel.store(true, Ordering::SeqCst);
    drop(first);
    let (model, cfg) =
        lmkit_models::CausalLm::load(&model_dir(), &lmkit_models::Device::Cpu).unwrap();
    let opts = lmkit_infer::GenerateOptions {
        max_tokens: 6,
        sampling: lmkit_infer::SamplingParams::greedy(),
        stop_ids: Vec::new(),
        max_positions: cfg.max_positions(),
    };
    let (reference, _) = lmkit_infer::generate(&model, &prompt, &opts, &mut |_, _| true).unwrap();
    assert_eq!(tokens, reference);
}

type Events = (
    tokio::sync::mpsc::UnboundedSender<(usize, lmkit_serve::engine::Event)>,
    tokio::sync::mpsc::UnboundedReceiver<(usize, lmkit_serve::engine::Event)>,
);

const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A server whose rounds read at most 8 prompt positions, with a sequence (index 0) decoding
/// `max_tokens` greedily once its first token has come, and its events' channel.
async fn decoding_beside(d: &Path, max_tokens: usize) -> (Arc<AppState>, Events) {
    decoding_within(d, max_tokens, lmkit_serve::KvMemory::Auto).await
}

/// [`decoding_beside`] within a KV budget of `kv_memory`.
async fn decoding_within(
    d: &Path,
    max_tokens: usize,
    kv_memory: lmkit_serve::KvMemory,
) -> (Arc<AppState>, Events) {
    use lmkit_serve::engine::Event;
    let st = load_state(ServeConfig {
        prompt_tokens: 8,
        kv_memory,
        ..config(&d.join("s.sqlite"), 16)
    })
    .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    st.engine
        .submit(vec![greedy_job(
            &st,
            0,
            vec![5, 6, 7],
            max_tokens,
            tx.clone(),
        )])
        .unwrap();
    loop {
        match tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            (0, Event::Token(..)) => break,
            (_, Event::Cached(_)) => {}
            e => panic!("{e:?}"),
        }
    }
    (st, (tx, rx))
}

/// A job asking for its prompt's log-probabilities (and one token).
fn scoring_job(
    st: &AppState,
    index: usize,
    prompt: Vec<u32>,
    events: tokio::sync::mpsc::UnboundedSender<(usize, lmkit_serve::engine::Event)>,
) -> lmkit_serve::engine::Job {
    let mut j = greedy_job(st, index, prompt, 1, events);
    j.prompt_logprobs = Some(2);
    j
}

/// While a long scored prompt is read a part a round, a job that decodes starts beside it (it
/// waited until the whole prompt was read); a second scored prompt waits for the first.
#[tokio::test]
async fn decoding_jobs_start_while_a_long_prompt_is_scored() {
    use lmkit_serve::engine::Event;
    let d = tempfile::tempdir().unwrap();
    let (st, (tx, mut rx)) = decoding_within(d.path(), 40, lmkit_serve::KvMemory::Unlimited).await;
    // 41 positions: 6 parts of 8 (`--prompt-tokens`), a round each.
    let long: Vec<u32> = (0..41).map(|i| 5 + (i * 7) % 50).collect();
    st.engine
        .submit(vec![
            scoring_job(&st, 1, long.clone(), tx.clone()),
            greedy_job(&st, 2, vec![8, 9], 2, tx.clone()),
            scoring_job(&st, 3, long, tx.clone()),
        ])
        .unwrap();
    drop(tx);
    let mut order = Vec::new();
    while let Some((i, e)) = tokio::time::timeout(WAIT, rx.recv()).await.unwrap() {
        match e {
            Event::Prompt(_) => order.push((i, "prompt")),
            Event::Token(..) => order.push((i, "token")),
            Event::Done(..) => order.push((i, "done")),
            Event::Cached(_) => {}
            Event::Error(m) | Event::Invalid(m) => panic!("{m}"),
        }
    }
    let at = |e| order.iter().position(|&o| o == e).unwrap();
    assert!(at((2, "done")) < at((1, "prompt")), "{order:?}");
    assert!(at((1, "prompt")) < at((3, "prompt")), "{order:?}");
    assert_eq!(st.engine.kv_reserved(), 0);
    assert_eq!(st.engine.depth(), 0);
}

/// Prompts scored for their log-probabilities are read in batches of at most `--prompt-tokens`
/// positions, one batch a round while other sequences decode: a decoding sequence gets a token
/// between two batches (it waited for all of them before).
#[tokio::test]
async fn scoring_batches_take_turns_with_decoding_sequences() {
    use lmkit_serve::engine::Event;
    let d = tempfile::tempdir().unwrap();
    let (st, (tx, mut rx)) = decoding_beside(d.path(), 60).await;
    let scoring = |index| scoring_job(&st, index, vec![9, 10, 11, 12, 13, 14], tx.clone());
    st.engine
        .submit(vec![scoring(1), scoring(2), scoring(3)])
        .unwrap();
    drop(tx);
    let mut order = Vec::new();
    while let Some((i, e)) = tokio::time::timeout(WAIT, rx.recv()).await.unwrap() {
        match e {
            Event::Prompt(s) => {
                assert_eq!(s.len(), 5);
                order.push((i, "prompt"));
            }
            Event::Token(..) => order.push((i, "token")),
            Event::Done(..) => order.push((i, "done")),
            Event::Cached(_) => {}
            Event::Error(m) | Event::Invalid(m) => panic!("{m}"),
        }
    }
    let prompts: Vec<usize> = (0..order.len())
        .filter(|&k| order[k].1 == "prompt")
        .collect();
    assert_eq!(prompts.len(), 3, "{order:?}");
    for w in prompts.windows(2) {
        assert!(
            order[w[0]..w[1]].contains(&(0, "token")),
            "no token of the decoding sequence between two scoring batches: {order:?}"
        );
    }
}

/// A prompt longer than `--prompt-tokens` scored while another sequence decodes is read a part a
/// round, that sequence's tokens between the parts; its scores equal those of reading it whole
/// (nothing else decoding).
#[tokio::test]
async fn a_long_scored_prompt_is_read_in_parts_between_decoding_rounds() {
    use lmkit_serve::engine::Event;
    let long: Vec<u32> = (0..41).map(|i| 5 + (i * 7) % 50).collect();
    // Alone: read whole.
    let d = tempfile::tempdir().unwrap();
    let st = load_state(ServeConfig {
        prompt_tokens: 8,
        ..config(&d.path().join("p.sqlite"), 16)
    })
    .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    st.engine
        .submit(vec![scoring_job(&st, 1, long.clone(), tx)])
        .unwrap();
    let mut whole = None;
    while let Some((_, e)) = tokio::time::timeout(WAIT, rx.recv()).await.unwrap() {
        if let Event::Prompt(s) = e {
            whole = Some(s);
        }
    }
    let whole = whole.expect("scores");
    assert_eq!(whole.len(), 40);
    // Beside a decoding sequence: in parts of 8 positions.
    let (st, (tx, mut rx)) = decoding_beside(d.path(), 200).await;
    st.engine
        .submit(vec![scoring_job(&st, 1, long, tx)])
        .unwrap();
    let mut between = 0;
    let parts = loop {
        match tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            (0, Event::Token(..)) => between += 1,
            (1, Event::Prompt(s)) => break s,
            (_, Event::Cached(_)) => {}
            e => panic!("{e:?}"),
        }
    };
    // 40 positions in 5 parts: at least 4 rounds of the other sequence between them.
    assert!(between >= 4, "{between} tokens while the prompt was scored");
    assert_eq!(parts.len(), whole.len());
    for (a, b) in parts.iter().zip(&whole) {
        assert_eq!((a.token, a.top.len()), (b.token, b.top.len()));
        assert!((a.logprob - b.logprob).abs() < 1e-4, "{a:?} {b:?}");
    }
}

/// A prompt scored for its log-probabilities waits, as other jobs do, until its sequence's
/// cache fits the KV budget beside the decoding sequences': it is scored after the sequence
/// holding the room ends (it was read at once before, its cache outside the budget), whether it
/// is read in one batch or a part a round; where both fit, the long prompt is read in parts
/// while the other decodes. Each lets its room go at the end.
#[tokio::test]
async fn scored_prompts_wait_for_room_in_the_kv_budget() {
    use lmkit_serve::engine::Event;
    use lmkit_serve::KvMemory;
    // gpt2, 2 layers of 32: keys and values in f32.
    let per_position = 2 * 2 * 32 * 4;
    let short: Vec<u32> = vec![9, 10, 11, 12, 13, 14];
    let long: Vec<u32> = (0..41).map(|i| 5 + (i * 7) % 50).collect();
    // The decoding sequence and the scored one each need 64 positions (the fewest a cache
    // holds): 100 holds one of them, 200 both.
    for (prompt, positions, waits) in [(&short, 100, true), (&long, 100, true), (&long, 200, false)]
    {
        let d = tempfile::tempdir().unwrap();
        let budget = KvMemory::Bytes(positions * per_position);
        let (st, (tx, mut rx)) = decoding_within(d.path(), 30, budget).await;
        st.engine
            .submit(vec![scoring_job(&st, 1, prompt.clone(), tx)])
            .unwrap();
        let mut order = Vec::new();
        while let Some((i, e)) = tokio::time::timeout(WAIT, rx.recv()).await.unwrap() {
            match e {
                Event::Prompt(s) => {
                    assert_eq!(s.len(), prompt.len() - 1);
                    order.push((i, "prompt"));
                }
                Event::Done(..) => order.push((i, "done")),
                Event::Token(..) | Event::Cached(_) => {}
                Event::Error(m) | Event::Invalid(m) => panic!("{m}"),
            }
        }
        let at = |e| order.iter().position(|&o| o == e).unwrap();
        assert_eq!(
            at((0, "done")) < at((1, "prompt")),
            waits,
            "{} prompt tokens, {positions} positions: {order:?}",
            prompt.len()
        );
        assert_eq!(order.len(), 3, "{order:?}");
        assert_eq!(st.engine.kv_reserved(), 0);
        assert_eq!(st.engine.depth(), 0);
    }
}
