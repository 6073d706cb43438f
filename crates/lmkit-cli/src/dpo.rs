//! `lmkit dpo`: preference tuning (DPO and relatives) of a loaded model on prompt/chosen/rejected
//! pairs, all parameters or LoRA adapters.

use crate::progress::Bar;
use crate::train::{report, report_data, stop_on_signals, TuneArgs};
use anyhow::Result;
use clap::Args;
use lmkit_train::DpoConfig;

#[derive(Args)]
#[command(
    after_help = "Examples:\n  lmkit dpo --config configs/dpo-lora.toml\n  \
    lmkit dpo --config configs/dpo-lora.toml --set dpo.loss='\"ipo\"' --set dpo.beta=0.5\n  \
    lmkit dpo --config configs/dpo-lora.toml --resume      # continue after a crash or a stop\n\n\
    The config names the base (`base = \"DIR\"` or a .gguf file), optionally a separate\n\
    `reference` model, [data] (train = JSONL rows {\"prompt\", \"chosen\", \"rejected\"} as strings,\n\
    or as message lists rendered through the chat template; `lmkit data export-preferences`\n\
    writes them), [dpo] (loss = sigmoid | robust | hinge | ipo | simpo | orpo | kto, beta,\n\
    label_smoothing, simpo_gamma, sft_weight, desirable_weight, undesirable_weight), [train] and\n\
    optionally [lora] or adapter = \"DIR\". With loss = \"kto\" the rows are unpaired:\n\
    {\"prompt\", \"completion\", \"label\": true|false}, as `lmkit data export-ratings` writes them.\n\n\
    The reference model's log-probabilities are computed once and cached under\n\
    ~/.cache/lmkit/reference-logps (or $LMKIT_CACHE) by the reference's weights and the data;\n\
    with LoRA the reference is the base with the adapters off.\n\n\
    Writes OUT/ckpt-NNNNNN/ (with [lora]: a PEFT adapter directory; without: a model directory),\n\
    OUT/latest, OUT/metrics.jsonl (loss, rewards/chosen, rewards/rejected, rewards/margins,\n\
    rewards/accuracies, logps/*, and eval_* for validation) and OUT/loss.svg."
)]
pub struct DpoArgs {
    #[command(flatten)]
    tune: TuneArgs,
}

pub fn run(a: DpoArgs) -> Result<()> {
    let a = a.tune;
    let cfg = DpoConfig::load(&a.run.config, &a.overrides())?;
    stop_on_signals();
    let (s, data) = lmkit_train::dpo(&cfg, a.run.start(), &Bar::default())?;
    report_data(
        &format!(
            "{} training and {} validation pairs",
            data.train_pairs, data.val_pairs
        ),
        &[
            (data.bad, "bad rows left out"),
            (
                data.empty,
                "pairs with a side left without completion tokens",
            ),
            (data.truncated, "pairs cut to train.seq_len"),
        ],
        &data.bad_samples,
    );
    if let Some(r) = &data.reference {
        eprintln!("reference log-probabilities: {r}");
    }
    report(&s, &cfg.train.out_dir);
    Ok(())
}
