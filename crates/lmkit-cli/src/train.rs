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
    #[command(flatten)]
    run: RunArgs,
}

/// The options of every training command: config, overrides, how to start, limits.
#[derive(Args)]
pub(crate) struct RunArgs {
    /// Run configuration (TOML)
    #[arg(long)]
    pub config: PathBuf,
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

impl RunArgs {
    /// The `--set` overrides with the shorthands added.
    pub fn overrides(&self) -> Vec<String> {
        let mut overrides = self.overrides.clone();
        if let Some(n) = self.max_steps {
            overrides.push(format!("train.max_steps={n}"));
        }
        if let Some(s) = self.max_time {
            overrides.push(format!("train.max_time={s}"));
        }
        overrides
    }

    pub fn start(&self) -> lmkit_train::Start {
        if self.resume {
            lmkit_train::Start::Resume
        } else if self.overwrite {
            lmkit_train::Start::Overwrite
        } else {
            lmkit_train::Start::New
        }
    }
}

/// The options of the tuning commands, which read data rows: [`RunArgs`] and `--skip-bad`.
#[derive(Args)]
pub(crate) struct TuneArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Leave out (and count) rows that cannot be read, instead of stopping at the first
    #[arg(long)]
    pub skip_bad: bool,
}

impl TuneArgs {
    /// The overrides, `--skip-bad` among them.
    pub fn overrides(&self) -> Vec<String> {
        let mut overrides = self.run.overrides();
        if self.skip_bad {
            overrides.push("data.skip_bad=true".into());
        }
        overrides
    }
}

/// What a tuning command read: `read` ("12 training and 2 validation pairs"), each count in
/// `counts` that is not zero with what it counts, and the first bad rows.
pub(crate) fn report_data(read: &str, counts: &[(usize, &str)], bad_samples: &[String]) {
    let notes: String = counts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!(", {n} {what}"))
        .collect();
    eprintln!("data: {read}{notes}");
    for b in bad_samples {
        eprintln!("  bad row: {b}");
    }
}

/// What a finished run prints.
pub(crate) fn report(s: &lmkit_train::Summary, out: &std::path::Path) {
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
    eprintln!("metrics   {}", out.join("metrics.jsonl").display());
    eprintln!("loss plot {}", out.join("loss.svg").display());
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
    let cfg = RunConfig::load(&a.run.config, &a.run.overrides())?;
    stop_on_signals();
    let s = lmkit_train::train(&cfg, a.run.start(), &Bar::default())?;
    report(&s, &cfg.train.out_dir);
    Ok(())
}
