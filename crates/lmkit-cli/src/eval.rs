//! `lmkit eval ...`: perplexity and bits per byte, sentence ranking, log-likelihood tasks.

use crate::lines::read_lines;
use crate::progress::Bar;
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use lmkit_eval::Progress;
use lmkit_eval::{harness, tasks, Scorer};
use std::path::PathBuf;

#[derive(Args)]
pub struct ModelArgs {
    /// A checkpoint directory (GPT-2/Llama) or an n-gram model file (.arpa / .lmkb)
    #[arg(long)]
    model: PathBuf,
    /// The ARPA model counts characters (as `lmkit ngram train --chars`)
    #[arg(long)]
    chars: bool,
    /// Where to run a neural model: cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// A LoRA adapter directory (PEFT's format, or a `lmkit finetune` output) added to the model
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// A decoder checkpoint's type: f32, or bf16/f16 for half the memory (as lm-evaluation-harness'
    /// `dtype=bfloat16`; the log-probabilities are taken in f32; on the CPU a half type saves
    /// memory, and bf16 time too where the CPU has AMX tiles)
    #[arg(long, default_value = "f32")]
    dtype: String,
}

impl ModelArgs {
    fn load(&self) -> Result<Scorer> {
        let dev = lmkit_models::parse_device(&self.device)?;
        let dtype = lmkit_models::parse_dtype(&self.dtype)?;
        Ok(Scorer::load(
            &self.model,
            &dev,
            self.chars,
            self.adapter.as_deref(),
            dtype,
        )?)
    }
}

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Perplexity, bits per token and bits per byte of a text file (one document per line)
    #[command(
        after_help = "Examples:\n  lmkit eval ppl --model runs/quickstart/gpt --input runs/quickstart/en.held.txt\n  \
        lmkit eval ppl --model runs/quickstart/en.lmkb --input runs/quickstart/en.held.txt\n  \
        lmkit eval ppl --model smollm2/ --input held.txt --device cuda --dtype bf16   # half the memory\n\n\
        Bits per byte (bits of the whole text, newlines included, over its UTF-8 bytes) compare models\n\
        with different tokenizers, n-gram and neural alike."
    )]
    Ppl {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        input: PathBuf,
        /// Neural models: tokens the window advances by (default: half the context; RNN/LSTM models read the text once, their state carried)
        #[arg(long)]
        stride: Option<usize>,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Rank candidate sentences by probability, most likely first (log10 probabilities)
    #[command(
        after_help = "Examples:\n  lmkit eval rank --model runs/quickstart/gpt 'In the beginning God created' 'beginning the In created God'\n  \
        lmkit eval rank --model runs/quickstart/gpt --input candidates.txt"
    )]
    Rank {
        #[command(flatten)]
        model: ModelArgs,
        candidates: Vec<String>,
        #[arg(long)]
        input: Option<PathBuf>,
    },
    /// Multiple-choice / classification tasks scored by log-likelihood (JSONL task files)
    #[command(
        after_help = "Examples:\n  lmkit eval tasks --model runs/quickstart/gpt --tasks bench/tasks/en-bible-cloze.jsonl --output results.json\n  \
        lmkit eval tasks --model SmolLM2-135M-Instruct.Q4_1.gguf --tasks bench/tasks/gen/*.yaml --limit 50 --details details.jsonl\n\n\
        JSONL task lines: {\"context\", \"choices\", \"answer\"} | {\"premise\", \"hypothesis\", \"label\"} |\n\
        {\"sentence1\", \"sentence2\", \"label\"} | {\"text\", \"labels\", \"label\"}: acc (highest log-likelihood) and\n\
        acc_norm (per byte of the choice).\n\n\
        YAML tasks follow lm-evaluation-harness's format (a subset; docs/tasks.md): generate_until tasks\n\
        (stop strings, max_gen_toks; exact_match, squad_f1, rouge1/2/L, bleu, chrf, chrf++ after regex\n\
        filters) and multiple_choice tasks (acc, acc_norm), few-shot drawn as the harness draws them."
    )]
    Tasks {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, required = true, num_args = 1..)]
        tasks: Vec<PathBuf>,
        /// Write the results as JSON
        #[arg(long)]
        output: Option<PathBuf>,
        /// Write every example's details as JSONL (prompt, response, filtered answers, scores;
        /// choice log-likelihoods for multiple choice)
        #[arg(long)]
        details: Option<PathBuf>,
        #[command(flatten)]
        harness: HarnessOptions,
    },
    /// Score predictions against references: exact match, SQuAD F1, ROUGE-1/2/L (means over
    /// examples), corpus BLEU, chrF and chrF++ (sacrebleu's defaults)
    #[command(
        after_help = "Example:\n  lmkit eval metrics --input predictions.jsonl\n\n\
        Lines: {\"prediction\": TEXT, \"references\": [TEXT, ...]} (or \"reference\": TEXT). Prints JSON."
    )]
    Metrics {
        #[arg(long)]
        input: PathBuf,
        /// exact_match: compare lower-cased
        #[arg(long)]
        ignore_case: bool,
        /// exact_match: drop ASCII punctuation first
        #[arg(long)]
        ignore_punctuation: bool,
    },
    /// Retrieval quality of an index on a question set: hit@1, hit@5, hit@k and MRR for dense,
    /// BM25 and hybrid search
    #[command(
        after_help = "Example:\n  python3 data/tools/make_retrieval_questions.py --output questions.jsonl\n  \
        lmkit index build --embedding-model all-MiniLM-L6-v2/ --input data/en data/ko --output corpus.index\n  \
        lmkit eval retrieval --index corpus.index --questions questions.jsonl\n\n\
        Question lines: {\"question\", \"source\", \"lines\": [first, last]} (and optionally \"lang\"): a hit is a\n\
        chunk of that source whose lines overlap. Prints a Markdown table per mode (and per language\n\
        when the questions say), or JSON with --json."
    )]
    Retrieval {
        /// The index: a directory, or a postgres:// URL (dense only)
        #[arg(long)]
        index: PathBuf,
        #[arg(long)]
        questions: PathBuf,
        /// Search depth (hit@k, MRR over the first k)
        #[arg(short = 'k', long = "top-k", default_value_t = 10)]
        k: usize,
        /// Modes to evaluate, comma-separated: dense, bm25, hybrid (default: all three; dense
        /// for a PostgreSQL index)
        #[arg(long)]
        modes: Option<String>,
        /// The embedding model, when it has moved since the index was built
        #[arg(long)]
        embedding_model: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Ppl {
            model,
            input,
            stride,
            json,
        } => {
            let s = model.load()?;
            let lines = read_lines(Some(&input))?;
            if lines.iter().all(|l| l.trim().is_empty()) {
                bail!("{}: no text to evaluate", input.display());
            }
            let e = s.eval_text(&lines, stride, &Bar::default())?;
            if json {
                let mut v = serde_json::to_value(&e)?;
                v["perplexity"] = e.perplexity().into();
                v["bits_per_token"] = e.bits_per_token().into();
                v["bits_per_byte"] = e.bits_per_byte().into();
                println!("{v}");
            } else {
                println!(
                    "lines:\t{}\nbytes:\t{}\ntokens:\t{}",
                    e.lines, e.bytes, e.tokens
                );
                match s {
                    Scorer::Ngram(_) => println!("oov:\t{}", e.oov),
                    Scorer::Masked(_) => println!(
                        "(BERT: pseudo-log-likelihood, each token scored with itself masked)"
                    ),
                    Scorer::Seq2seq(_) => println!(
                        "(encoder-decoder: log p(target | source); bytes are the targets')"
                    ),
                    Scorer::Neural(_) => {}
                }
                println!(
                    "perplexity:\t{:.4}\nbits per token:\t{:.4}\nbits per byte:\t{:.4}",
                    e.perplexity(),
                    e.bits_per_token(),
                    e.bits_per_byte()
                );
            }
            Ok(())
        }
        EvalCommand::Rank {
            model,
            candidates,
            input,
        } => {
            let s = model.load()?;
            crate::lines::rank(candidates, input.as_deref(), |c| Ok(s.sentence_log10(c)?))
        }
        EvalCommand::Metrics {
            input,
            ignore_case,
            ignore_punctuation,
        } => {
            let (preds, refs) = read_predictions(&input)?;
            let em = lmkit_eval::metrics::ExactMatch {
                ignore_case,
                ignore_punctuation,
                ..Default::default()
            };
            use lmkit_eval::metrics as m;
            let n = preds.len() as f64;
            let mean = |f: &dyn Fn(&str, &[String]) -> f64| {
                preds.iter().zip(&refs).map(|(p, r)| f(p, r)).sum::<f64>() / n
            };
            let v = serde_json::json!({
                "examples": preds.len(),
                "exact_match": mean(&|p, r| em.score(p, r)),
                "squad_f1": mean(&m::squad_f1),
                "rouge1": mean(&|p, r| m::best(p, r, |a, b| m::rouge_n(a, b, 1))),
                "rouge2": mean(&|p, r| m::best(p, r, |a, b| m::rouge_n(a, b, 2))),
                "rougeL": mean(&|p, r| m::best(p, r, m::rouge_l)),
                "bleu": m::corpus_bleu(&preds, &refs),
                "chrf": m::corpus_chrf(&preds, &refs, 0),
                "chrf++": m::corpus_chrf(&preds, &refs, 2),
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        EvalCommand::Retrieval {
            index,
            questions,
            k,
            modes,
            embedding_model,
            json,
        } => crate::index::eval_retrieval(
            &index,
            &questions,
            k,
            modes.as_deref(),
            embedding_model.as_deref(),
            json,
        ),
        EvalCommand::Tasks {
            model,
            tasks: files,
            output,
            details,
            harness: opts,
        } => {
            if opts.limit == Some(0) {
                bail!("--limit 0 leaves nothing to evaluate: give at least 1 (the first N documents or examples of each task)");
            }
            let s = model.load()?;
            let mut results = Vec::new();
            let mut detail_lines = Vec::new();
            let mut scores = Vec::new();
            for f in &files {
                if is_yaml(f) {
                    let (sc, det) = run_harness_task(&s, &model.model, f, &opts)?;
                    scores.extend(sc);
                    detail_lines.extend(det);
                    continue;
                }
                let mut examples = tasks::load(f)?;
                if let Some(n) = opts.limit {
                    examples.truncate(n);
                }
                let name = f
                    .file_stem()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let (r, scored) = tasks::run(&s, &name, &examples, &Bar::default())?;
                for (i, sc) in scored.iter().enumerate() {
                    detail_lines.push(serde_json::json!({"task": name, "index": i, "loglikelihoods": sc.loglikelihoods,
                        "answer": sc.answer, "pick": sc.pick, "pick_norm": sc.pick_norm}));
                }
                results.push(r);
            }
            if !results.is_empty() {
                print!("{}", tasks::markdown(&results));
            }
            if !scores.is_empty() {
                if !results.is_empty() {
                    println!();
                }
                print!("{}", harness::markdown(&scores));
            }
            if let Some(p) = output {
                let mut v = serde_json::json!({"model": model.model, "results": results});
                if !scores.is_empty() {
                    v["scores"] = serde_json::to_value(&scores)?;
                }
                lmkit_core::atomic::write_atomic_bytes(
                    &p,
                    (serde_json::to_string_pretty(&v)? + "\n").as_bytes(),
                )?;
            }
            if let Some(p) = details {
                let mut text = String::new();
                for l in detail_lines {
                    text.push_str(&l.to_string());
                    text.push('\n');
                }
                lmkit_core::atomic::write_atomic_bytes(&p, text.as_bytes())?;
            }
            Ok(())
        }
    }
}

fn is_yaml(p: &std::path::Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

#[derive(Args)]
pub(crate) struct HarnessOptions {
    /// Evaluate only the first N documents of each task (YAML) or examples (JSONL)
    #[arg(long)]
    limit: Option<usize>,
    /// YAML tasks: few-shot examples per prompt (default: the task's `num_fewshot`, else 0)
    #[arg(long)]
    num_fewshot: Option<usize>,
    /// YAML tasks: seed of the few-shot draw (the harness's default)
    #[arg(long, default_value_t = lmkit_eval::harness::DEFAULT_FEWSHOT_SEED)]
    fewshot_seed: u64,
    /// YAML tasks: render prompts through the model's chat template (description as the
    /// system message, few-shot examples and the question in one user message)
    #[arg(long)]
    apply_chat_template: bool,
    /// YAML generation tasks: prompts decoded together
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// YAML generation tasks with do_sample: the sampler's seed
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The prompts of a YAML task's documents: plain text, or through the model's chat template.
pub(crate) fn harness_prompts(
    model: &std::path::Path,
    rendered: &[harness::Rendered],
    chat: bool,
) -> Result<Vec<String>> {
    if !chat {
        return Ok(rendered.iter().map(|r| r.prompt.clone()).collect());
    }
    let dir = lmkit_models::resolve_checkpoint(model);
    let Some(template) = lmkit_tokenize::chat::load_template(&dir)? else {
        bail!(
            "{}: --apply-chat-template: the model has no chat template",
            dir.display()
        );
    };
    rendered
        .iter()
        .map(|r| {
            let mut msgs = Vec::new();
            if !r.system.is_empty() {
                msgs.push(lmkit_tokenize::chat::Message::new("system", &r.system));
            }
            msgs.push(lmkit_tokenize::chat::Message::new("user", &r.user));
            Ok(template.render(&msgs, true)?)
        })
        .collect()
}

fn run_harness_task(
    s: &Scorer,
    model: &std::path::Path,
    file: &std::path::Path,
    o: &HarnessOptions,
) -> Result<(Vec<harness::Score>, Vec<serde_json::Value>)> {
    let task = harness::Task::load(file)?;
    let shots = o.num_fewshot.unwrap_or(task.num_fewshot);
    let rendered = task.render(shots, o.fewshot_seed, o.limit)?;
    let prompts = harness_prompts(model, &rendered, o.apply_chat_template)?;
    let bar = Bar::default();
    match task.output_type {
        harness::OutputType::GenerateUntil => {
            let Scorer::Neural(n) = s else {
                bail!(
                    "{}: generation tasks need a causal language model (GPT-2, Llama-style or GGUF), not {}",
                    file.display(),
                    model.display()
                );
            };
            bar.begin(&task.name, prompts.len() as u64, lmkit_eval::Unit::Items);
            let responses =
                n.generate_until(&prompts, &task.generation, o.seed, o.batch_size, &bar)?;
            bar.finish();
            Ok(harness::score_generations(
                &task, shots, &rendered, &responses,
            ))
        }
        harness::OutputType::MultipleChoice => {
            bar.begin(&task.name, prompts.len() as u64, lmkit_eval::Unit::Items);
            let mut lls = Vec::with_capacity(rendered.len());
            for (r, p) in rendered.iter().zip(&prompts) {
                let ll = task
                    .choice_requests(r, p)
                    .iter()
                    .map(|(c, x)| s.loglikelihood(c, x))
                    .collect::<lmkit_eval::Result<Vec<f64>>>()?;
                lls.push(ll);
                bar.advance(1);
            }
            bar.finish();
            Ok(harness::score_choices(&task, shots, &rendered, &lls))
        }
    }
}

/// Reads {"prediction", "references" | "reference"} lines.
fn read_predictions(path: &std::path::Path) -> Result<(Vec<String>, Vec<Vec<String>>)> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let (mut preds, mut refs) = (Vec::new(), Vec::new());
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let bad = |m: &str| anyhow::anyhow!("{}: line {}: {m}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(l).map_err(|e| bad(&format!("not valid JSON: {e}")))?;
        let p = v
            .get("prediction")
            .and_then(|p| p.as_str())
            .ok_or_else(|| bad("`prediction` (text) is missing"))?;
        let r: Vec<String> = match (v.get("references"), v.get("reference")) {
            (Some(serde_json::Value::Array(a)), _) => a
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("`references` must be a list of texts"))?,
            (None, Some(serde_json::Value::String(s))) => vec![s.clone()],
            _ => {
                return Err(bad(
                    "give `references` (a list of texts) or `reference` (a text)",
                ))
            }
        };
        if r.is_empty() {
            return Err(bad("`references` is empty"));
        }
        preds.push(p.to_string());
        refs.push(r);
    }
    if preds.is_empty() {
        bail!("{}: no predictions", path.display());
    }
    Ok((preds, refs))
}
