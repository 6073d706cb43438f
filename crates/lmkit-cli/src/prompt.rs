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
        lmkit prompt render --model runs/gpt/ --messages chat.json --ids"
    )]
    Render {
        /// Model directory or GGUF file whose tokenizer and chat template to use
        #[arg(long)]
        model: PathBuf,
        /// The conversation (JSON)
        #[arg(long)]
        messages: PathBuf,
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
            no_generation_prompt,
            ids,
        } => {
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
