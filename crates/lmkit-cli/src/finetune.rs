//! `lmkit finetune`: supervised fine-tuning of a loaded model (all parameters, or LoRA adapters
//! saved in PEFT's format).

use crate::progress::Bar;
use crate::train::{report, report_data, stop_on_signals, TuneArgs};
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
    tune: TuneArgs,
    /// Which tokens the loss is taken on: the answers (completion, the default) or every token
    /// of the rendered rows (prompt); shorthand for --set data.train_on=...
    #[arg(long, value_parser = ["completion", "prompt"])]
    train_on: Option<String>,
}

pub fn run(a: FinetuneArgs) -> Result<()> {
    let mut overrides = a.tune.overrides();
    if let Some(t) = &a.train_on {
        overrides.push(format!("data.train_on=\"{t}\""));
    }
    let a = a.tune;
    let cfg = FinetuneConfig::load(&a.run.config, &overrides)?;
    stop_on_signals();
    let (s, data) = lmkit_train::finetune(&cfg, a.run.start(), &Bar::default())?;
    report_data(
        &format!(
            "{} training and {} validation examples",
            data.train_examples, data.val_examples
        ),
        &[
            (data.bad, "bad rows left out"),
            (data.empty, "rows with nothing to predict"),
            (data.truncated, "rows cut to train.seq_len"),
        ],
        &data.bad_samples,
    );
    if let Some(v) = data.val_loss_before {
        eprintln!("validation loss before tuning {v:.4}");
    }
    report(&s, &cfg.train.out_dir);
    Ok(())
}
