//! Training end to end on tiny data: the loss falls near zero on a repetitive corpus, a resumed run
//! repeats the uninterrupted one exactly, checkpoints load as models, bad configs are refused.

use lmkit_train::{train, NoProgress, RunConfig, Start};
use std::path::Path;

/// A tokenizer and token shards for `text` under `dir`.
fn data(dir: &Path, text: &str) {
    let corpus = dir.join("c.txt");
    std::fs::write(&corpus, text).unwrap();
    let opts = lmkit_tokenize::TrainOptions {
        vocab_size: 300,
        ..Default::default()
    };
    let tk = lmkit_tokenize::train(std::slice::from_ref(&corpus), &opts).unwrap();
    lmkit_tokenize::save(&tk, &dir.join("tok"), &opts.special_tokens).unwrap();
    let docs: Vec<String> = text.lines().map(String::from).collect();
    let ids = lmkit_tokenize::encode_batch(&tk, &docs).unwrap();
    let mut w = lmkit_tokenize::ShardWriter::new(
        &dir.join("shards"),
        tk.get_vocab_size(true),
        tk.token_to_id("<|endoftext|>"),
        1 << 20,
    )
    .unwrap();
    for i in &ids {
        w.write_document(i).unwrap();
    }
    w.finish().unwrap();
}

fn config(dir: &Path, extra: &str) -> RunConfig {
    let text = format!(
        r#"
[model]
model_type = "gpt2"
n_positions = 32
n_embd = 32
n_layer = 2
n_head = 2

[data]
train = "{d}/shards"
tokenizer = "{d}/tok"
val_fraction = 0.1

[train]
out_dir = "{d}/out"
seq_len = 16
batch_size = 8
lr = 3e-3
min_lr = 3e-4
warmup_steps = 5
max_steps = 150
eval_every = 50
eval_batches = 2
save_every = 50
log_every = 1
{extra}
"#,
        d = dir.display()
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    RunConfig::load(&p, &[]).unwrap()
}

#[test]
fn loss_goes_near_zero_on_a_repetitive_corpus() {
    let dir = tempfile::tempdir().unwrap();
    data(
        dir.path(),
        &"the cat sat on the mat. the dog sat on the log.\n".repeat(200),
    );
    let mut cfg = config(dir.path(), "");
    cfg.train.max_steps = 400;
    cfg.train.lr = 1e-2;
    cfg.train.min_lr = 1e-3;
    let s = train(&cfg, Start::New, &NoProgress).unwrap();
    assert!(s.final_loss < 0.3, "final loss {}", s.final_loss);
    // The checkpoint is a model directory that loads and predicts the corpus.
    let (m, _) =
        lmkit_models::CausalLm::load(&dir.path().join("out"), &lmkit_models::Device::Cpu).unwrap();
    assert_eq!(m.num_layers(), 2);
    assert!(dir.path().join("out/loss.svg").exists());
}

#[test]
fn an_lstm_learns_the_repetitive_corpus_too() {
    let dir = tempfile::tempdir().unwrap();
    data(
        dir.path(),
        &"the cat sat on the mat. the dog sat on the log.\n".repeat(200),
    );
    let mut cfg = config(dir.path(), "");
    cfg.model = "model_type = \"lmkit_rnn\"\ncell = \"lstm\"\nhidden_size = 48\nnum_layers = 1\ntie_word_embeddings = true\n"
        .parse()
        .unwrap();
    cfg.train.max_steps = 300;
    cfg.train.lr = 2e-2;
    cfg.train.min_lr = 2e-3;
    let s = train(&cfg, Start::New, &NoProgress).unwrap();
    assert!(s.final_loss < 0.5, "final loss {}", s.final_loss);
}

#[test]
fn bert_learns_to_fill_masks_in_a_repetitive_corpus() {
    let dir = tempfile::tempdir().unwrap();
    data(
        dir.path(),
        &"the cat sat on the mat. the dog sat on the log.\n".repeat(200),
    );
    let mut cfg = config(dir.path(), "");
    cfg.model = "model_type = \"bert\"\nhidden_size = 32\nnum_hidden_layers = 2\nnum_attention_heads = 2\nintermediate_size = 64\nmax_position_embeddings = 32\n"
        .parse()
        .unwrap();
    cfg.train.max_steps = 1000;
    cfg.train.batch_size = 16;
    cfg.train.warmup_steps = 20;
    cfg.train.lr = 3e-3;
    cfg.train.min_lr = 3e-4;
    cfg.train.eval_every = 1000;
    let s = train(&cfg, Start::New, &NoProgress).unwrap();
    assert!(s.final_loss < 0.3, "final loss {}", s.final_loss);
    assert!(
        s.val_loss.unwrap() < 0.3,
        "validation loss {:?}",
        s.val_loss
    );
    let m = lmkit_models::bert::Bert::load(&dir.path().join("out"), &lmkit_models::Device::Cpu)
        .unwrap();
    assert_eq!(m.cfg.num_hidden_layers, 2);
}

#[test]
fn resume_repeats_the_uninterrupted_run_exactly() {
    check_resume(None);
}

/// The LSTM's state, carried from window to window of its streams, is restored on resume too.
#[test]
fn an_lstm_resumes_exactly_with_its_carried_state() {
    check_resume(Some(
        "model_type = \"lmkit_rnn\"\ncell = \"lstm\"\nhidden_size = 24\nnum_layers = 2\n",
    ));
}

/// Llama and BERT (masks drawn from the seed and step) resume exactly too.
#[test]
fn llama_and_bert_resume_exactly() {
    check_resume(Some(
        "model_type = \"llama\"\nhidden_size = 32\nintermediate_size = 48\nnum_hidden_layers = 2\n\
         num_attention_heads = 2\nmax_position_embeddings = 32\n",
    ));
    check_resume(Some(
        "model_type = \"bert\"\nhidden_size = 32\nnum_hidden_layers = 2\nnum_attention_heads = 2\n\
         intermediate_size = 64\nmax_position_embeddings = 32\n",
    ));
}

/// BART (source/target pairs, teacher forcing) resumes exactly too.
#[test]
fn bart_resumes_exactly() {
    check_resume(Some(
        "model_type = \"bart\"\nd_model = 32\nencoder_layers = 1\ndecoder_layers = 2\n\
         encoder_attention_heads = 2\ndecoder_attention_heads = 2\nencoder_ffn_dim = 48\n\
         decoder_ffn_dim = 48\nmax_position_embeddings = 32\n",
    ));
}

fn check_resume(model: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    data(
        dir.path(),
        &"alpha beta gamma delta. epsilon zeta eta theta.\n".repeat(100),
    );
    let whole = config(dir.path(), "").train.out_dir.clone();
    let mut cfg = config(dir.path(), "");
    if let Some(m) = model {
        cfg.model = m.parse().unwrap();
    }
    if model.is_some_and(|m| m.contains("\"bart\"")) {
        // An encoder-decoder trains on source/target pairs.
        let pairs: String = (0..200)
            .map(|i| {
                let (s, t) = if i % 2 == 0 {
                    ("alpha beta gamma", "delta epsilon")
                } else {
                    ("zeta eta", "theta alpha beta")
                };
                format!("{}\n", serde_json::json!({"source": s, "target": t}))
            })
            .collect();
        std::fs::write(dir.path().join("pairs.jsonl"), pairs).unwrap();
        cfg.data.train = dir.path().join("pairs.jsonl");
    }
    cfg.train.max_steps = 12;
    cfg.train.save_every = 6;
    cfg.train.eval_every = 6;
    let straight = train(&cfg, Start::New, &NoProgress).unwrap();
    let reference = lmkit_train::metrics::read(&whole.join("metrics.jsonl"));
    let final_weights = std::fs::read(straight.checkpoint.join("model.safetensors")).unwrap();

    // The same run, killed right after its step-6 checkpoint (and while writing the next one), then resumed.
    std::fs::remove_dir_all(&whole).unwrap();
    run_until(&cfg, 6);
    std::fs::create_dir(whole.join(".lmkit-tmp-crashed")).unwrap();
    let steps = CountSteps::default();
    let resumed = train(&cfg, Start::Resume, &steps).unwrap();
    assert_eq!(resumed.steps, 12);
    // Only the steps after the checkpoint ran (a restart from step 0 would run all twelve).
    assert_eq!(steps.0.load(std::sync::atomic::Ordering::SeqCst), 6);
    assert!(
        !whole.join(".lmkit-tmp-crashed").exists(),
        "a partial checkpoint was left behind"
    );
    // Everything but the measured speed is identical: losses, gradient norms, learning rates.
    let strip = |rs: Vec<lmkit_train::metrics::Record>| {
        rs.into_iter()
            .map(|r| lmkit_train::metrics::Record {
                tokens_per_sec: None,
                ..r
            })
            .collect::<Vec<_>>()
    };
    let again = lmkit_train::metrics::read(&whole.join("metrics.jsonl"));
    assert_eq!(
        strip(again),
        strip(reference),
        "the loss curve after resuming differs"
    );
    assert_eq!(
        std::fs::read(resumed.checkpoint.join("model.safetensors")).unwrap(),
        final_weights
    );
}

/// Counts the optimisation steps a run reports.
#[derive(Default)]
struct CountSteps(std::sync::atomic::AtomicUsize);

impl lmkit_train::Progress for CountSteps {
    fn status(&self, _msg: &str) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Trains `cfg` and simulates a crash right after the checkpoint at `stop_step`: later checkpoints
/// and metrics are removed, as if the process had been killed then.
fn run_until(cfg: &RunConfig, stop_step: usize) {
    let out = &cfg.train.out_dir;
    train(cfg, Start::New, &NoProgress).unwrap();
    for e in std::fs::read_dir(out).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if let Some(n) = name.strip_prefix("ckpt-") {
            if n.parse::<usize>().unwrap() > stop_step {
                std::fs::remove_dir_all(&p).unwrap();
            }
        }
    }
    std::fs::write(out.join("latest"), format!("ckpt-{stop_step:06}")).unwrap();
    // Metrics written after the checkpoint survive a crash; resume must drop them.
}

#[test]
fn bad_configs_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    data(dir.path(), &"some words here and there.\n".repeat(50));
    let p = dir.path().join("bad.toml");
    let base = std::fs::read_to_string({
        config(dir.path(), "");
        dir.path().join("run.toml")
    })
    .unwrap();
    std::fs::write(&p, base.replace("n_head = 2", "n_head = 3")).unwrap();
    let cfg = RunConfig::load(&p, &[]).unwrap();
    let e = train(&cfg, Start::New, &NoProgress)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("n_embd (32) must be a multiple of n_head (3)"),
        "{e}"
    );

    let e = RunConfig::load(&p, &["train.batch_size=0".into()])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("bad.toml") && e.contains("train.batch_size"),
        "{e}"
    );
    let e = RunConfig::load(&p, &["train.typo_field=1".into()])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("typo_field"), "{e}");
    let cfg = RunConfig::load(&p, &["model.n_head=2".into(), "train.seq_len=64".into()]).unwrap();
    let e = train(&cfg, Start::New, &NoProgress)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("seq_len (64) exceeds the model's positions (32)"),
        "{e}"
    );
    let cfg = RunConfig::load(
        &p,
        &["model.n_head=2".into(), "model.vocab_size=100".into()],
    )
    .unwrap();
    let e = train(&cfg, Start::New, &NoProgress)
        .err()
        .unwrap()
        .to_string();
    let n = lmkit_tokenize::load(&dir.path().join("tok"))
        .unwrap()
        .get_vocab_size(true);
    assert!(
        e.contains(&format!("tokenizer has {n} tokens")) && e.contains("vocab_size is 100"),
        "{e}"
    );
    let e = train(
        &RunConfig::load(&p, &["model.n_head=2".into()]).unwrap(),
        Start::Resume,
        &NoProgress,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("cannot resume"), "{e}");
    let cfg = RunConfig::load(&p, &["model.n_head=2".into(), "train.device=tpu".into()]).unwrap();
    let e = train(&cfg, Start::New, &NoProgress)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("unknown device `tpu`"), "{e}");
    // Sizes that cannot work are refused with a reason, before any allocation.
    for (set, want) in [
        ("model.n_embd=0", "n_embd must be positive"),
        ("model.n_embd=100000000", "needs about"),
        (
            "train.batch_size=100000000",
            "activations of batch 100000000",
        ),
    ] {
        let cfg = RunConfig::load(&p, &["model.n_head=2".into(), set.into()]).unwrap();
        let e = train(&cfg, Start::New, &NoProgress)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(want), "{set}: {e}");
    }
    // A typo in [model] is refused, naming the fields the family reads.
    let cfg = RunConfig::load(&p, &["model.n_head=2".into(), "model.n_layers=4".into()]).unwrap();
    let e = train(&cfg, Start::New, &NoProgress)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("unknown field `n_layers`") && e.contains("n_layer,"),
        "{e}"
    );
}

/// A new run never lands on another run's files: refused unless told to overwrite, and pruning
/// keeps every checkpoint another run wrote, whatever its name.
#[test]
fn runs_never_destroy_each_others_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    data(dir.path(), &"one two three four. five six.\n".repeat(60));
    let mut cfg = config(dir.path(), "keep_checkpoints = 1");
    cfg.train.max_steps = 4;
    cfg.train.save_every = 2;
    cfg.train.eval_every = 0;
    let out = cfg.train.out_dir.clone();
    train(&cfg, Start::New, &NoProgress).unwrap();
    let metrics = std::fs::read(out.join("metrics.jsonl")).unwrap();

    // A second new run into the same directory is refused, and touches nothing.
    let e = train(&cfg, Start::New, &NoProgress)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("holds another run") && e.contains("ckpt-000004") && e.contains("--overwrite"),
        "{e}"
    );
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), metrics);
    assert_eq!(
        std::fs::read_to_string(out.join("latest")).unwrap(),
        "ckpt-000004"
    );

    // Another run's checkpoint in the directory (named to sort last, as a longer run's would).
    let other = out.join("ckpt-9999999");
    copy_dir(&out.join("ckpt-000004"), &other);
    let state = other.join("trainer_state/state.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    v["run_id"] = "someone-else".into();
    std::fs::write(&state, v.to_string()).unwrap();

    // Resuming prunes only the run's own older checkpoints.
    cfg.train.max_steps = 8;
    let s = train(&cfg, Start::Resume, &NoProgress).unwrap();
    assert_eq!(s.steps, 8);
    assert!(other.exists(), "another run's checkpoint was pruned");
    assert!(s.checkpoint.ends_with("ckpt-000008") && s.checkpoint.exists());
    assert!(!out.join("ckpt-000006").exists() && !out.join("ckpt-000004").exists());
    assert_eq!(
        std::fs::read_to_string(out.join("latest")).unwrap(),
        "ckpt-000008"
    );

    // --overwrite replaces the run: its checkpoints and metrics go, other files stay.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    cfg.train.max_steps = 2;
    let s = train(&cfg, Start::Overwrite, &NoProgress).unwrap();
    assert_eq!(s.steps, 2);
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "ckpt-000002",
            "latest",
            "loss.svg",
            "metrics.jsonl",
            "notes.txt",
            "run.toml"
        ]
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
