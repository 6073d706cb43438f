//! `lmkit rag ask`: retrieve passages from an index, answer from them through the chat template,
//! and print the sources.

use crate::index::Retrieval;
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use lmkit_infer::{GenerateOptions, SamplingParams};
use lmkit_rag::prompt::{self, Source};
use lmkit_rag::Store;
use lmkit_tokenize::chat::{encode_chat, Message};
use std::io::Write;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum RagCommand {
    /// Answer a question from the passages an index retrieves for it, citing them
    Ask(AskArgs),
}

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    lmkit rag ask --model SmolLM2-135M-Instruct.Q4_1.gguf --index docs.index \"How do I resume training?\"\n  \
    lmkit rag ask --model chat-model/ --index ko.index -k 3 --show-prompt \"납세의무자는 누구인가?\"\n\n\
    The question is searched in the index (hybrid by default), the best passages go into the\n\
    prompt as numbered sources through the model's chat template, the model answers, and the\n\
    sources are printed after the answer. Passages that do not fit the model's context are left\n\
    out, the lowest-ranked first.")]
pub struct AskArgs {
    /// Chat model: checkpoint directory or GGUF file
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter directory added to the model
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The index to retrieve from (a directory, or a postgres:// URL)
    #[arg(long)]
    index: PathBuf,
    question: String,
    #[command(flatten)]
    retrieval: Retrieval,
    /// The system message (default: answer from the sources only, cite them as [n])
    #[arg(long)]
    system: Option<String>,
    /// Print the rendered prompt (to stderr) before answering
    #[arg(long)]
    show_prompt: bool,
    /// Maximum tokens of the answer
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 decodes greedily
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 1.1)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object (answer, sources, prompt tokens) instead of text
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    placement: crate::placement::Placement,
}

pub fn run(cmd: RagCommand) -> Result<()> {
    match cmd {
        RagCommand::Ask(a) => ask(a),
    }
}

fn ask(a: AskArgs) -> Result<()> {
    if a.question.trim().is_empty() {
        bail!("the question is empty");
    }
    let mut ix = Store::open(&a.index)?;
    let opts = a.retrieval.options(4, &ix)?;
    let e = a.retrieval.embedder(&ix)?;
    let v = e.as_ref().map(|e| e.query(&a.question)).transpose()?;
    let found = ix.search(v.as_deref(), &a.question, &opts)?;
    let mut sources = prompt::sources(&found);
    drop(e);

    let chat = crate::chat::ChatModel::load(&a.model, a.adapter.as_deref(), &a.placement)?;
    let (cfg, tk) = (&chat.cfg, &chat.tk);
    let system = a
        .system
        .clone()
        .unwrap_or_else(|| prompt::SYSTEM.to_string());
    let room_for_answer = a.max_tokens.min(cfg.max_positions() / 4).max(1);
    // Drop the lowest-ranked sources until the prompt leaves room to answer.
    let (text, ids) = loop {
        let msgs = vec![
            Message::new("system", &system),
            Message::new("user", &prompt::user_message(&a.question, &sources)),
        ];
        let (text, ids) = encode_chat(tk, &chat.template, &msgs, true)?;
        if ids.len() + room_for_answer <= cfg.max_positions() {
            break (text, ids);
        }
        if sources.pop().is_none() {
            bail!(
                "the question alone does not fit the model's context of {} tokens",
                cfg.max_positions()
            );
        }
    };
    if a.show_prompt {
        eprintln!("{text}");
    }
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: None,
        top_p: (a.top_p < 1.0).then_some(a.top_p),
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
    };
    sampling.validate().map_err(anyhow::Error::msg)?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens.min(cfg.max_positions() - ids.len()),
        sampling,
        stop_ids: chat.end_ids.clone(),
        max_positions: cfg.max_positions(),
    };
    let mut out = std::io::stdout().lock();
    let echo: Option<&mut dyn Write> = if a.json { None } else { Some(&mut out) };
    let (gen, tail) = chat.stream_reply(&ids, &opts, None, echo)?;
    let answer = lmkit_tokenize::decode(tk, &gen)?;
    let answer = lmkit_core::tokens::CHAT_STOPS
        .iter()
        .fold(answer, |s, stop| {
            s.split(stop).next().unwrap_or_default().to_string()
        })
        .trim()
        .to_string();
    if a.json {
        let line = serde_json::json!({
            "question": a.question,
            "answer": answer,
            "sources": sources,
            "prompt_tokens": ids.len(),
            "completion_tokens": gen.len(),
        });
        writeln!(out, "{line}")?;
    } else {
        writeln!(out, "{tail}")?;
        print_sources(&mut out, &sources)?;
    }
    Ok(())
}

fn print_sources(out: &mut impl Write, sources: &[Source]) -> Result<()> {
    writeln!(out, "\nSources:")?;
    for s in sources {
        writeln!(out, "[{}] {} (score {:.4})", s.number, s.label(), s.score)?;
    }
    Ok(())
}
