//! `lmkit prompt ...`: the exact prompt a model sees.

use anyhow::{Context, Result};
use clap::Subcommand;
use lmkit_tokenize::chat::{encode_chat, load_template, Message};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum PromptCommand {
    /// Render a conversation through a model's chat template; print the prompt and its token count
    #[command(
        after_help = "The conversation is a JSON file: a list of {\"role\": ..., \"content\": ...} messages, or an\n\
        object with such a list under \"messages\" (OpenAI's request shape).\n\n\
        Examples:\n  lmkit prompt render --model SmolLM2-135M-Instruct.Q4_1.gguf --messages chat.json\n  \
        lmkit prompt render --model runs/gpt/ --messages chat.json --ids\n  \
        lmkit prompt render --task bench/tasks/gen/en-law-reasons.yaml --num-fewshot 3 --limit 2"
    )]
    Render {
        /// Model directory or GGUF file whose tokenizer and chat template to use
        #[arg(long, required_unless_present = "task")]
        model: Option<PathBuf>,
        /// The conversation (JSON)
        #[arg(long, required_unless_present = "task", conflicts_with = "task")]
        messages: Option<PathBuf>,
        /// Render the prompts of a YAML task (lm-evaluation-harness format) instead: one per
        /// document, with few-shot examples (token counts when --model is given)
        #[arg(long)]
        task: Option<PathBuf>,
        /// With --task: only the first N documents
        #[arg(long, requires = "task")]
        limit: Option<usize>,
        /// With --task: few-shot examples per prompt (default: the task's num_fewshot)
        #[arg(long, requires = "task")]
        num_fewshot: Option<usize>,
        /// With --task: seed of the few-shot draw
        #[arg(long, default_value_t = lmkit_eval::harness::DEFAULT_FEWSHOT_SEED)]
        fewshot_seed: u64,
        /// With --task: through the model's chat template
        #[arg(long, requires_all = ["task", "model"])]
        apply_chat_template: bool,
        /// With --task: one JSON object per document (doc_index, prompt, targets, tokens)
        #[arg(long, requires = "task")]
        json: bool,
        /// Leave out the assistant turn opener at the end
        #[arg(long)]
        no_generation_prompt: bool,
        /// Print the token ids (space-separated) instead of the text
        #[arg(long)]
        ids: bool,
    },
}

pub fn run(cmd: PromptCommand) -> Result<()> {
    match cmd {
        PromptCommand::Render {
            model,
            messages,
            task,
            limit,
            num_fewshot,
            fewshot_seed,
            apply_chat_template,
            json,
            no_generation_prompt,
            ids,
        } => {
            if let Some(task) = task {
                return render_task(
                    &task,
                    model.as_deref(),
                    limit,
                    num_fewshot,
                    fewshot_seed,
                    apply_chat_template,
                    json,
                );
            }
            let (Some(model), Some(messages)) = (model, messages) else {
                anyhow::bail!("give --model and --messages (or --task)");
            };
            let dir = lmkit_models::resolve_checkpoint(&model);
            let text = std::fs::read_to_string(&messages)
                .with_context(|| format!("{}: cannot read", messages.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", messages.display()))?;
            let list = v.get("messages").cloned().unwrap_or(v);
            let msgs: Vec<Message> = serde_json::from_value(list).with_context(|| {
                format!(
                    "{}: expected a list of {{\"role\", \"content\"}} messages",
                    messages.display()
                )
            })?;
            let template = load_template(&dir)?.with_context(|| {
                format!(
                    "{}: no chat template (chat_template.jinja, tokenizer_config.json `chat_template` or GGUF `tokenizer.chat_template`)",
                    dir.display()
                )
            })?;
            let tk = lmkit_tokenize::load(&dir)?;
            let (prompt, tokens) = encode_chat(&tk, &template, &msgs, !no_generation_prompt)?;
            if ids {
                let line: Vec<String> = tokens.iter().map(|i| i.to_string()).collect();
                println!("{}", line.join(" "));
            } else {
                print!("{prompt}");
            }
            eprintln!("[{} tokens]", tokens.len());
            Ok(())
        }
    }
}

fn render_task(
    task: &std::path::Path,
    model: Option<&std::path::Path>,
    limit: Option<usize>,
    num_fewshot: Option<usize>,
    seed: u64,
    chat: bool,
    json: bool,
) -> Result<()> {
    let t = lmkit_eval::harness::Task::load(task)?;
    let shots = num_fewshot.unwrap_or(t.num_fewshot);
    let rendered = t.render(shots, seed, limit)?;
    let prompts = match model {
        Some(m) => crate::eval::harness_prompts(m, &rendered, chat)?,
        None => rendered.iter().map(|r| r.prompt.clone()).collect(),
    };
    let tk = model
        .map(|m| lmkit_tokenize::load(&lmkit_models::resolve_checkpoint(m)))
        .transpose()?;
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    for (r, p) in rendered.iter().zip(&prompts) {
        let tokens = match &tk {
            Some(tk) => Some(lmkit_tokenize::encode_batch(tk, std::slice::from_ref(p))?[0].len()),
            None => None,
        };
        if json {
            let mut v =
                serde_json::json!({"doc_index": r.doc_index, "prompt": p, "targets": r.targets});
            if let Some(c) = &r.choices {
                v["choices"] = c.clone().into();
                v["gold"] = r.gold.into();
            }
            if let Some(n) = tokens {
                v["tokens"] = n.into();
            }
            writeln!(out, "{v}")?;
        } else {
            let count = tokens.map(|n| format!(", {n} tokens")).unwrap_or_default();
            writeln!(out, "=== document {}{count} ===\n{p}", r.doc_index)?;
            writeln!(out, "=== target: {:?} ===\n", r.targets)?;
        }
    }
    Ok(())
}
