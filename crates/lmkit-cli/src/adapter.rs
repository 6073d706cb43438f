//! `lmkit adapter`: LoRA adapters (PEFT's format) apart from training.

use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum AdapterCommand {
    /// Fold a LoRA adapter into its base model's weights (as PEFT's merge_and_unload) and write a
    /// model directory that loads without the adapter
    #[command(
        after_help = "Example:\n  lmkit adapter merge smollm2/ runs/sft/ smollm2-tuned/   # runs/sft: a finetune output or a PEFT directory"
    )]
    Merge {
        /// The base: a Hugging Face model directory
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
