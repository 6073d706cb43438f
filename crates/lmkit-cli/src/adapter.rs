//! `lmkit adapter`: LoRA adapters (PEFT's format) apart from training.

use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum AdapterCommand {
    /// Fold a LoRA adapter into its base model's weights (as PEFT's merge_and_unload) and write a
    /// model directory that loads without the adapter
    #[command(
        after_help = "Examples:\n  lmkit adapter merge smollm2/ runs/sft/ smollm2-tuned/   # runs/sft: a finetune output or a PEFT directory\n  \
        lmkit adapter merge SmolLM2-135M-Instruct.Q4_1.gguf runs/sft/ smollm2-tuned/   # QLoRA: merged in f32"
    )]
    Merge {
        /// The base: a Hugging Face model directory, or a GGUF file (llama/qwen2/qwen3; it is
        /// dequantized, and the merged model written in f32 with the file's tokenizer and chat
        /// template)
        base: PathBuf,
        /// The adapter directory (adapter_config.json + adapter_model.safetensors), or a
        /// `lmkit finetune` output directory (its latest checkpoint)
        adapter: PathBuf,
        /// The merged model's directory (must not exist)
        out: PathBuf,
    },
}

pub fn run(cmd: AdapterCommand) -> Result<()> {
    match cmd {
        AdapterCommand::Merge { base, adapter, out } => {
            let n = lmkit_train::merge::merge(&base, &adapter, &out)?;
            eprintln!("merged the adapters of {n} layers into {}", out.display());
        }
    }
    Ok(())
}
