//! `lmkit finetune`: supervised fine-tuning of a loaded model (all parameters, or LoRA adapters
//! saved in PEFT's format).

use crate::progress::Bar;
use crate::train::{report, stop_on_signals, RunArgs};
use anyhow::Result;
use clap::Args;
use lmkit_train::FinetuneConfig;

#[derive(Args)]
#[command(
    after_help = "Examples:\n  lmkit finetune --config configs/sft-lora.toml\n  \
    lmkit finetune --config configs/sft-lora.toml --set lora.r=16 --set train.lr=1e-4\n  \
    lmkit finetune --config configs/sft-lora.toml --resume      # continue after a crash or a stop\n  \
    lmkit finetune --config configs/sft-lora.toml --train-on prompt   # no masking: learn the prompts too\n\n\
    The config names the base (`base = \"DIR\"` or a .gguf file), [data] (train = rows: chat\n\
    JSONL {\"messages\": [...]}, Alpaca instruction/input/output, prompt/completion, or text),\n\
    [train] and optionally [lora] (r, alpha, dropout, target_modules = [\"q_proj\", ...] or\n\
    \"all-linear\", use_rslora) or adapter = \"DIR\" (continue a PEFT adapter). Without them every\n\
    parameter is tuned. data.pack = true packs short examples into full rows.\n\n\
    Writes OUT/ckpt-NNNNNN/ (with [lora]: a PEFT adapter directory, adapter_config.json +\n\
    adapter_model.safetensors, that `--adapter` and PEFT load; without: a model directory),\n\
    OUT/latest, OUT/metrics.jsonl and OUT/loss.svg, where OUT is train.out_dir."
)]
pub struct FinetuneArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Which tokens the loss is taken on: the answers (completion, the default) or every token
    /// of the rendered rows (prompt); shorthand for --set data.train_on=...
    #[arg(long, value_parser = ["completion", "prompt"])]
    train_on: Option<String>,
    /// Leave out (and count) rows that cannot be read, instead of stopping at the first
    #[arg(long)]
    skip_bad: bool,
}

pub fn run(a: FinetuneArgs) -> Result<()> {
    let mut overrides = a.run.overrides();
    if let Some(t) = &a.train_on {
        overrides.push(format!("data.train_on=\"{t}\""));
    }
    if a.skip_bad {
        overrides.push("data.skip_bad=true".into());
    }
    let cfg = FinetuneConfig::load(&a.run.config, &overrides)?;
    stop_on_signals();
    let (s, data) = lmkit_train::finetune(&cfg, a.run.start(), &Bar::default())?;
    eprintln!(
        "data: {} training and {} validation examples{}{}{}",
        data.train_examples,
        data.val_examples,
        if data.bad > 0 {
            format!(", {} bad rows left out", data.bad)
        } else {
            String::new()
        },
        if data.empty > 0 {
            format!(", {} rows with nothing to predict", data.empty)
        } else {
            String::new()
        },
        if data.truncated > 0 {
            format!(", {} rows cut to train.seq_len", data.truncated)
        } else {
            String::new()
        },
    );
    if let Some(v) = data.val_loss_before {
        eprintln!("validation loss before tuning {v:.4}");
    }
    for b in &data.bad_samples {
        eprintln!("  bad row: {b}");
    }
    report(&s, &cfg.train.out_dir);
    Ok(())
}
