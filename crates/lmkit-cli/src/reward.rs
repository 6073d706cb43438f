//! `lmkit reward`: reward models on preference pairs (train), and rewards of texts (score).

use crate::progress::Bar;
use crate::train::{report, report_data, stop_on_signals, TuneArgs};
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum RewardCommand {
    /// Train a reward model (a scalar head on a causal LM) on prompt/chosen/rejected pairs
    Train(TrainArgs),
    /// Print the rewards of rows: preference pairs (both rewards) or prompt/completion,
    /// messages or text rows (one reward), one JSON line each
    Score(ScoreArgs),
}

#[derive(Args)]
#[command(
    after_help = "Examples:\n  lmkit reward train --config configs/reward.toml\n  \
    lmkit reward train --config configs/reward.toml --set train.max_steps=200 --resume\n\n\
    The config names the base (`base = \"DIR\"`: a causal LM directory, whose output layer is\n\
    replaced by a scalar head, or a reward model to train further), [data] (train = JSONL rows\n\
    {\"prompt\", \"chosen\", \"rejected\"} and an optional numeric \"margin\"; strings, or message\n\
    lists rendered through the chat template), [reward] (center_rewards_coefficient) and [train].\n\n\
    The loss is Bradley-Terry's, -log sigmoid(r_chosen - r_rejected - margin), the reward read\n\
    at the last non-padding token. Checkpoints are transformers *ForSequenceClassification\n\
    directories (score.weight); metrics.jsonl logs accuracy, margin, mean/min/max_reward and\n\
    their eval_ counterparts on held-out pairs."
)]
pub struct TrainArgs {
    #[command(flatten)]
    tune: TuneArgs,
}

#[derive(Args)]
#[command(after_help = "Example:\n  lmkit reward score --model runs/reward --input pairs.jsonl")]
pub struct ScoreArgs {
    /// The reward model (a directory, or a training output: its latest checkpoint)
    #[arg(long)]
    model: PathBuf,
    /// JSONL rows (or a JSON array)
    #[arg(long)]
    input: PathBuf,
    /// Rows are cut to this many tokens
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
}

pub fn run(cmd: RewardCommand) -> Result<()> {
    match cmd {
        RewardCommand::Train(a) => {
            let a = a.tune;
            let cfg = lmkit_train::reward::RewardConfig::load(&a.run.config, &a.overrides())?;
            stop_on_signals();
            let (s, data) = lmkit_train::reward::train(&cfg, a.run.start(), &Bar::default())?;
            report_data(
                &format!(
                    "{} training and {} validation pairs",
                    data.train_pairs, data.val_pairs
                ),
                &[
                    (data.bad, "bad rows left out"),
                    (data.truncated, "pairs cut to train.seq_len"),
                ],
                &data.bad_samples,
            );
            report(&s, &cfg.train.out_dir);
        }
        RewardCommand::Score(a) => {
            let scores =
                lmkit_train::reward::score_file(&a.model, &a.input, a.max_tokens, &Bar::default())?;
            let (mut pairs, mut right) = (0usize, 0usize);
            for s in &scores {
                println!("{}", serde_json::to_string(s)?);
                if let lmkit_train::reward::Scores::Pair { chosen, rejected } = s {
                    pairs += 1;
                    right += (chosen > rejected) as usize;
                }
            }
            if pairs > 0 {
                eprintln!(
                    "pairs ranked right: {right} of {pairs} ({:.3})",
                    right as f64 / pairs as f64
                );
            }
        }
    }
    Ok(())
}
