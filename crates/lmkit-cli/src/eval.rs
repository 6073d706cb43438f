//! `lmkit eval ...`: perplexity and bits per byte, sentence ranking, log-likelihood tasks.

use crate::lines::read_lines;
use crate::progress::Bar;
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use lmkit_eval::{tasks, Scorer};
use std::io::Write;
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
}

impl ModelArgs {
    fn load(&self) -> Result<Scorer> {
        let dev = lmkit_models::parse_device(&self.device)?;
        Ok(Scorer::load(
            &self.model,
            &dev,
            self.chars,
            self.adapter.as_deref(),
        )?)
    }
}

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Perplexity, bits per token and bits per byte of a text file (one document per line)
    #[command(
        after_help = "Examples:\n  lmkit eval ppl --model runs/quickstart/gpt --input runs/quickstart/en.held.txt\n  \
        lmkit eval ppl --model runs/quickstart/en.lmkb --input runs/quickstart/en.held.txt\n\n\
        Bits per byte (bits of the whole text, newlines included, over its UTF-8 bytes) compare models\n\
        with different tokenizers, n-gram and neural alike."
    )]
    Ppl {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        input: PathBuf,
        /// Neural models: tokens the window advances by (default: half the context)
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
        after_help = "Example:\n  lmkit eval tasks --model runs/quickstart/gpt --tasks bench/tasks/en-bible-cloze.jsonl --output results.json\n\n\
        Task lines: {\"context\", \"choices\", \"answer\"} | {\"premise\", \"hypothesis\", \"label\"} |\n\
        {\"sentence1\", \"sentence2\", \"label\"} | {\"text\", \"labels\", \"label\"}. Prints a Markdown table of\n\
        acc (highest log-likelihood) and acc_norm (per byte of the choice)."
    )]
    Tasks {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, required = true, num_args = 1..)]
        tasks: Vec<PathBuf>,
        /// Write the results as JSON
        #[arg(long)]
        output: Option<PathBuf>,
        /// Write every example's choice log-likelihoods as JSONL
        #[arg(long)]
        details: Option<PathBuf>,
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
        } => {
            let s = model.load()?;
            let mut results = Vec::new();
            let mut detail_lines = Vec::new();
            for f in &files {
                let examples = tasks::load(f)?;
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
            print!("{}", tasks::markdown(&results));
            if let Some(p) = output {
                let v = serde_json::json!({"model": model.model, "results": results});
                std::fs::write(&p, serde_json::to_string_pretty(&v)? + "\n")?;
            }
            if let Some(p) = details {
                let mut w = std::io::BufWriter::new(std::fs::File::create(&p)?);
                for l in detail_lines {
                    writeln!(w, "{l}")?;
                }
                w.flush()?;
            }
            Ok(())
        }
    }
}
