//! `lmkit chat`: an interactive conversation with a checkpoint, through its chat template.

use anyhow::{bail, Context, Result};
use clap::Args;
use lmkit_infer::{generate_constrained, GenerateOptions, SamplingParams, TextStream};
use lmkit_models::CausalLm;
use lmkit_tokenize::chat::{encode_chat, load_template, Message};
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
#[command(
    after_help = "Example:\n  lmkit chat --model runs/quickstart/gpt --system 'You answer in one sentence.'\n\n\
    Type a message and press Enter. /reset clears the conversation, /quit (or end of input) leaves."
)]
pub struct ChatArgs {
    /// Checkpoint directory
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter directory (PEFT's format, or a `lmkit finetune` output) added to the model
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The chatbot's role, sent as the system message
    #[arg(long)]
    system: Option<String>,
    /// Maximum tokens per reply
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 1.1)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print each rendered prompt (the chat template's output) to stderr
    #[arg(long)]
    print_prompt: bool,
    #[command(flatten)]
    placement: crate::placement::Placement,
    /// Every reply follows this constraint
    #[command(flatten)]
    constraint: crate::constraint::ConstraintArgs,
}

/// A chat model ready to answer: weights (with an adapter), tokenizer, chat template and the
/// ids that end a reply.
pub(crate) struct ChatModel {
    pub model: CausalLm,
    pub cfg: lmkit_models::DecoderConfig,
    pub tk: lmkit_tokenize::Tokenizer,
    pub template: lmkit_tokenize::chat::ChatTemplate,
    /// lmkit's own end-of-turn token, and the model's end-of-text ids.
    pub end_ids: Vec<u32>,
}

impl ChatModel {
    pub fn load(
        model: &std::path::Path,
        adapter: Option<&std::path::Path>,
        placement: &crate::placement::Placement,
    ) -> Result<ChatModel> {
        let dir = lmkit_models::resolve_checkpoint(model);
        let (model, cfg) =
            CausalLm::load_adapted(&dir, adapter, &placement.device()?, placement.dtype()?)?;
        let tk = lmkit_tokenize::load(&dir)?;
        let template = load_template(&dir)?.with_context(|| {
            format!(
                "{}: no chat template (chat_template.jinja, tokenizer_config.json `chat_template` or GGUF `tokenizer.chat_template`)",
                dir.display()
            )
        })?;
        let mut end_ids: Vec<u32> = tk.token_to_id("<|end|>").into_iter().collect();
        end_ids.extend(crate::generate::stop_ids(&dir, cfg.vocab_size())?);
        Ok(ChatModel {
            model,
            cfg,
            tk,
            template,
            end_ids,
        })
    }

    /// Generates a reply to `prompt` (stopping at the chat stop strings), writing its text to
    /// `echo` as it comes when given; returns the reply's token ids and the text held back at
    /// its end (written by nobody yet).
    pub fn stream_reply(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        constraint: Option<lmkit_infer::constrain::Constraint>,
        mut echo: Option<&mut dyn Write>,
    ) -> Result<(Vec<u32>, String)> {
        let mut stream = TextStream::new(
            &self.tk,
            lmkit_core::tokens::CHAT_STOPS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        );
        let (ids, _) =
            generate_constrained(&self.model, prompt, opts, constraint, &mut |_, all| {
                if let (Ok(delta), Some(out)) = (stream.push(all), echo.as_mut()) {
                    let _ = out.write_all(delta.as_bytes()).and_then(|_| out.flush());
                }
                !stream.stopped
            })?;
        let tail = stream.finish(&ids)?;
        Ok((ids, tail))
    }
}

pub fn run(a: ChatArgs) -> Result<()> {
    let chat = ChatModel::load(&a.model, a.adapter.as_deref(), &a.placement)?;
    let (cfg, tk, template) = (&chat.cfg, &chat.tk, &chat.template);
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: (a.top_p < 1.0).then_some(a.top_p),
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
    };
    sampling.validate().map_err(anyhow::Error::msg)?;
    let spec = match a.constraint.spec()? {
        Some(s) => Some((
            crate::constraint::engine(tk, cfg.vocab_size(), &chat.end_ids)?,
            s,
        )),
        None => None,
    };
    let mut history: Vec<Message> = a.system.iter().map(|s| Message::new("system", s)).collect();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut turn = 0u64;
    loop {
        write!(out, "> ")?;
        out.flush()?;
        let mut bytes = Vec::new();
        let n =
            lmkit_core::read_line_within(&mut stdin.lock(), &mut bytes, lmkit_core::MAX_LINE_BYTES)
                .map_err(|e| anyhow::anyhow!("<stdin>: {e}"))?;
        if n == 0 {
            writeln!(out)?;
            return Ok(());
        }
        let line = String::from_utf8(bytes).map_err(|e| {
            anyhow::anyhow!(
                "<stdin>: the line is not valid UTF-8 (byte {})",
                e.utf8_error().valid_up_to()
            )
        })?;
        let line = line.trim();
        match line {
            "" => continue,
            "/quit" | "/exit" => return Ok(()),
            "/reset" => {
                history.retain(|m| m.role == "system");
                writeln!(out, "(conversation cleared)")?;
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", line));
        // Drop the oldest exchanges (never the system message) until the prompt leaves room to answer.
        let prompt_ids = loop {
            let (prompt, ids) = encode_chat(tk, template, &history, true)?;
            if ids.len() + a.max_tokens.min(16) < cfg.max_positions() {
                if a.print_prompt {
                    eprintln!("[prompt] {prompt}");
                }
                break ids;
            }
            let first = history.iter().position(|m| m.role != "system");
            match first {
                Some(i) if history.len() - i > 1 => {
                    history.remove(i);
                }
                _ => bail!(
                    "the message is too long for the model's context of {} tokens",
                    cfg.max_positions()
                ),
            }
        };
        let room = cfg.max_positions() - prompt_ids.len();
        let opts = GenerateOptions {
            max_tokens: a.max_tokens.min(room),
            sampling: SamplingParams {
                seed: sampling.seed.wrapping_add(turn),
                ..sampling.clone()
            },
            stop_ids: chat.end_ids.clone(),
            max_positions: cfg.max_positions(),
        };
        turn += 1;
        let constraint = spec
            .as_ref()
            .map(|(g, s)| crate::constraint::compile(g, s))
            .transpose()?;
        let (ids, tail) = chat.stream_reply(&prompt_ids, &opts, constraint, Some(&mut out))?;
        write!(out, "{tail}")?;
        writeln!(out)?;
        let reply = lmkit_tokenize::decode(tk, &ids)?;
        let reply = reply
            .split("<|end|>")
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        history.push(Message::new("assistant", &reply));
    }
}
