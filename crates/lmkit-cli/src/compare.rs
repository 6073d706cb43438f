//! `lmkit compare`: the history of language models on the user's own data. Trains an n-gram
//! model, an RNN, an LSTM and a GPT on the same split and prints one table of held-out bits per
//! byte, parameters, training time and training speed.

use anyhow::{bail, Context, Result};
use clap::Args;
use lmkit_eval::Scorer;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
#[command(
    after_help = "Example:\n  lmkit compare --input data/en --output runs/compare --seconds 120\n\n\
    Lines of INPUT (files or directories of .txt) are split: every 20th line is held out. The\n\
    n-gram model counts characters (so that unseen words still cost their bytes); the neural models\n\
    share one BPE tokenizer and train for the same time. Bits per byte on the held-out lines compare\n\
    them all. Writes OUTPUT/results.json and OUTPUT/results.md beside the models."
)]
pub struct CompareArgs {
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    #[arg(long)]
    output: PathBuf,
    /// Training time per neural model
    #[arg(long, default_value_t = 120.0)]
    seconds: f64,
    /// Order of the character n-gram model
    #[arg(long, default_value_t = 7)]
    ngram_order: usize,
    #[arg(long, default_value_t = 8192)]
    vocab_size: usize,
    /// Where the neural models train: cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
}

struct Row {
    name: String,
    parameters: String,
    seconds: f64,
    tokens_per_sec: Option<f64>,
    eval: lmkit_eval::TextEval,
}

fn write(path: &Path, lines: &[String]) -> Result<()> {
    let mut text = lines.join("\n");
    text.push('\n');
    Ok(lmkit_core::write_atomic_bytes(path, text.as_bytes())?)
}

pub fn run(a: CompareArgs) -> Result<()> {
    let out = &a.output;
    std::fs::create_dir_all(out)
        .with_context(|| format!("{}: cannot create the directory", out.display()))?;
    let mut files = Vec::new();
    for p in &a.input {
        files.extend(lmkit_ngram::collect_inputs(p)?);
    }
    let mut train_lines = Vec::new();
    let mut held = Vec::new();
    let mut n = 0usize;
    for f in &files {
        for l in crate::lines::read_lines(Some(f))? {
            if l.trim().is_empty() {
                continue;
            }
            if n % 20 == 19 {
                held.push(l);
            } else {
                train_lines.push(l);
            }
            n += 1;
        }
    }
    if held.len() < 10 {
        bail!("too little text: {n} non-empty lines (need at least 200)");
    }
    let (train_txt, held_txt) = (out.join("train.txt"), out.join("held.txt"));
    write(&train_txt, &train_lines)?;
    write(&held_txt, &held)?;
    eprintln!(
        "split: {} training lines, {} held-out lines",
        train_lines.len(),
        held.len()
    );
    let mut rows = Vec::new();

    // n-gram (characters)
    let t0 = Instant::now();
    let opts = lmkit_ngram::TrainOptions {
        order: a.ngram_order,
        tokenization: lmkit_ngram::Tokenization::Chars,
        // The comparison runs on whatever corpus it is given, small ones too.
        estimation: lmkit_ngram::EstimateOptions {
            fallback: Some(lmkit_ngram::FALLBACK_DISCOUNTS),
            ..Default::default()
        },
        ..Default::default()
    };
    let trained = lmkit_ngram::train(
        std::slice::from_ref(&train_txt),
        &opts,
        &crate::progress::Bar::default(),
    )?;
    let ngram_path = out.join("ngram.lmkb");
    lmkit_ngram::save(&trained.tables, &ngram_path)?;
    let secs = t0.elapsed().as_secs_f64();
    let model = lmkit_ngram::Model::open(&ngram_path, lmkit_ngram::Tokenization::Chars)?;
    let ngrams: u64 = model.counts().iter().sum();
    let eval =
        Scorer::Ngram(Box::new(model)).eval_text(&held, None, &crate::progress::Bar::default())?;
    rows.push(Row {
        name: format!("{}-gram, characters (Kneser-Ney)", a.ngram_order),
        parameters: format!("{ngrams} n-grams"),
        seconds: secs,
        tokens_per_sec: None,
        eval,
    });

    // Tokenizer + shards for the neural models.
    let tk_opts = lmkit_tokenize::TrainOptions {
        vocab_size: a.vocab_size,
        ..Default::default()
    };
    let tk = lmkit_tokenize::train(std::slice::from_ref(&train_txt), &tk_opts)?;
    let tk_dir = out.join("tokenizer");
    lmkit_tokenize::save(&tk, &tk_dir, &tk_opts.special_tokens)?;
    let ids = lmkit_tokenize::encode_batch(&tk, &train_lines)?;
    let shards = out.join("shards");
    let _ = std::fs::remove_dir_all(&shards);
    let mut w = lmkit_tokenize::ShardWriter::new(
        &shards,
        tk.get_vocab_size(true),
        tk.token_to_id(lmkit_tokenize::ENDOFTEXT),
        64 << 20,
    )?;
    for d in &ids {
        w.write_document(d)?;
    }
    w.finish()?;

    // (name, [model], peak learning rate). The tanh RNN takes half the others' rate: at 2e-3
    // held for two minutes its carried state saturates (|h| ≈ 1 in every unit) and it stops
    // reading its input.
    let models = [
        ("RNN (tanh)", "model_type = \"lmkit_rnn\"\ncell = \"rnn\"\nhidden_size = 256\nnum_layers = 2\ntie_word_embeddings = true\n", 1e-3),
        ("LSTM", "model_type = \"lmkit_rnn\"\ncell = \"lstm\"\nhidden_size = 256\nnum_layers = 2\ntie_word_embeddings = true\n", 2e-3),
        ("GPT (Transformer)", "model_type = \"gpt2\"\nn_positions = 128\nn_embd = 128\nn_layer = 4\nn_head = 4\n", 2e-3),
    ];
    for (name, model, lr) in models {
        let dir = out.join(
            name.split_whitespace()
                .next()
                .unwrap_or(name)
                .to_lowercase(),
        );
        let _ = std::fs::remove_dir_all(&dir);
        let toml = format!(
            "[model]\n{model}\n[data]\ntrain = {:?}\ntokenizer = {:?}\nval_fraction = 0.0\n\n\
             [train]\nout_dir = {:?}\nseq_len = 128\nbatch_size = 16\nlr = {lr:e}\nmin_lr = {:e}\n\
             warmup_steps = 30\nmax_steps = 100000\nmax_time = {}\neval_every = 0\nsave_every = 100000\n\
             log_every = 10\ndevice = {:?}\n",
            shards,
            tk_dir,
            dir,
            lr / 10.0,
            a.seconds,
            a.device
        );
        let cfg_path = out.join(format!(
            "{}.toml",
            dir.file_name().unwrap_or_default().to_string_lossy()
        ));
        lmkit_core::write_atomic_bytes(&cfg_path, toml.as_bytes())?;
        let cfg = lmkit_train::RunConfig::load(&cfg_path, &[])?;
        eprintln!("training {name} for {} s", a.seconds);
        let t0 = Instant::now();
        let summary = lmkit_train::train(
            &cfg,
            lmkit_train::Start::Overwrite,
            &crate::progress::Bar::default(),
        )?;
        let secs = t0.elapsed().as_secs_f64();
        let dev = lmkit_models::parse_device(&a.device)?;
        let scorer = Scorer::load(&dir, &dev, false, None, lmkit_models::DType::F32)?;
        let eval = scorer.eval_text(&held, None, &crate::progress::Bar::default())?;
        rows.push(Row {
            name: name.to_string(),
            parameters: format!("{:.2} M", summary.parameters as f64 / 1e6),
            seconds: secs,
            tokens_per_sec: Some(summary.tokens_per_sec),
            eval,
        });
    }

    let mut md = String::from(
        "| model | parameters | training time | training tokens/s | held-out bits per byte |\n|---|---|---|---|---|\n",
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {:.0} s | {} | {:.3} |\n",
            r.name,
            r.parameters,
            r.seconds,
            r.tokens_per_sec
                .map(|t| format!("{t:.0}"))
                .unwrap_or_else(|| "—".into()),
            r.eval.bits_per_byte()
        ));
    }
    print!("{md}");
    lmkit_core::write_atomic_bytes(&out.join("results.md"), md.as_bytes())?;
    let json: Vec<_> = rows
        .iter()
        .map(|r| {
            serde_json::json!({"model": r.name, "parameters": r.parameters, "seconds": r.seconds,
                "tokens_per_sec": r.tokens_per_sec, "bits_per_byte": r.eval.bits_per_byte(),
                "held_out": r.eval})
        })
        .collect();
    lmkit_core::write_atomic_bytes(
        &out.join("results.json"),
        (serde_json::to_string_pretty(&json)? + "\n").as_bytes(),
    )?;
    Ok(())
}
