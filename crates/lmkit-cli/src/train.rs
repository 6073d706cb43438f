//! `lmkit train`: train a model from a TOML run config.

use crate::progress::Bar;
use anyhow::Result;
use clap::Args;
use lmkit_train::RunConfig;
use std::path::PathBuf;

#[derive(Args)]
#[command(
    after_help = "Examples:\n  lmkit train --config configs/gpt-small.toml\n  \
    lmkit train --config configs/gpt-small.toml --set train.max_steps=2000 --set model.n_layer=6\n  \
    lmkit train --config configs/gpt-small.toml --resume        # continue after a crash or a stop\n  \
    lmkit train --config configs/gpt-small.toml --overwrite     # start again in the same OUT\n\n\
    Writes OUT/ckpt-NNNNNN/ (a Hugging Face model directory + trainer_state/), OUT/latest,\n\
    OUT/metrics.jsonl and OUT/loss.svg, where OUT is train.out_dir."
)]
pub struct TrainArgs {
    /// Run configuration (TOML with [model], [data] and [train] sections)
    #[arg(long)]
    config: PathBuf,
    /// Override a field: section.field=value (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue from OUT/latest with the same loss curve
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Start a new run in an OUT that holds another run, removing that run's checkpoints,
    /// latest, metrics.jsonl and loss.svg first (without this, such an OUT is refused)
    #[arg(long)]
    overwrite: bool,
    /// Shorthand for --set train.max_steps=N
    #[arg(long)]
    max_steps: Option<usize>,
    /// Shorthand for --set train.max_time=SECONDS
    #[arg(long)]
    max_time: Option<f64>,
}

/// Ctrl-C or SIGTERM: the run stops after the current step with a checkpoint; a second one quits
/// at once (the last checkpoint stays whole: checkpoints are written atomically).
pub(crate) fn stop_on_signals() {
    let installed = ctrlc::set_handler(|| {
        if lmkit_core::stop::request() {
            eprintln!("\nstopping now");
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step with a checkpoint (again to quit at once)");
    });
    if let Err(e) = installed {
        eprintln!("warning: Ctrl-C will not save a checkpoint: {e}");
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    let mut overrides = a.overrides.clone();
    if let Some(n) = a.max_steps {
        overrides.push(format!("train.max_steps={n}"));
    }
    if let Some(s) = a.max_time {
        overrides.push(format!("train.max_time={s}"));
    }
    let cfg = RunConfig::load(&a.config, &overrides)?;
    let start = if a.resume {
        lmkit_train::Start::Resume
    } else if a.overwrite {
        lmkit_train::Start::Overwrite
    } else {
        lmkit_train::Start::New
    };
    stop_on_signals();
    let s = lmkit_train::train(&cfg, start, &Bar::default())?;
    eprintln!(
        "trained {} parameters for {} steps: train loss {:.4}{}, {:.0} tokens/s",
        s.parameters,
        s.steps,
        s.final_loss,
        s.val_loss
            .map(|v| format!(", validation loss {v:.4}"))
            .unwrap_or_default(),
        s.tokens_per_sec
    );
    eprintln!("checkpoint {}", s.checkpoint.display());
    eprintln!(
        "metrics   {}",
        cfg.train.out_dir.join("metrics.jsonl").display()
    );
    eprintln!("loss plot {}", cfg.train.out_dir.join("loss.svg").display());
    Ok(())
}
