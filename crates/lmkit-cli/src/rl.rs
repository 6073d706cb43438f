//! `lmkit rl`: online reinforcement learning (GRPO or PPO) with rewards from rules or a reward
//! model.

use crate::progress::Bar;
use crate::train::{report, report_data, stop_on_signals, TuneArgs};
use anyhow::Result;
use clap::Args;
use lmkit_train::rl::RlConfig;

#[derive(Args)]
#[command(
    after_help = "Examples:\n  lmkit rl --config configs/grpo-lora.toml\n  \
    lmkit rl --config configs/grpo-lora.toml --set rl.beta=0.04 --set rl.group_size=8\n  \
    lmkit rl --config configs/grpo-lora.toml --resume\n  \
    lmkit rl --config configs/ppo.toml\n\n\
    The config names the base, [data] prompts (JSONL rows {\"prompt\": ...} or {\"messages\": [...]}),\n\
    [rl] (algorithm = \"grpo\" or \"ppo\", group_size, max_new_tokens, temperature, top_p, top_k,\n\
    beta, scale_rewards; PPO: ppo_epochs, gamma, lam, cliprange, cliprange_value, vf_coef,\n\
    value_model), [reward] (regex = \"...\": 1 on a match; command = \"...\": reads JSON lines\n\
    {\"prompt\", \"completion\", \"row\"} and prints one number per line; model = \"DIR\": a reward\n\
    model; those given are summed), [train] (batch_size = prompts per step) and optionally [lora].\n\n\
    Writes checkpoints as `lmkit finetune` does, OUT/metrics.jsonl (loss, reward, reward_std,\n\
    rewards/<source>, kl, completions/mean_length, time/generation and time/optimization per\n\
    step; PPO: loss/policy, loss/value, policy/clipfrac, policy/approxkl, value/clipfrac,\n\
    value/mean) and OUT/completions.jsonl (every sampled completion with its reward and advantage)."
)]
pub struct RlArgs {
    #[command(flatten)]
    tune: TuneArgs,
}

pub fn run(a: RlArgs) -> Result<()> {
    let a = a.tune;
    let cfg = RlConfig::load(&a.run.config, &a.overrides())?;
    stop_on_signals();
    let (s, data) = lmkit_train::rl::rl(&cfg, a.run.start(), &Bar::default())?;
    report_data(
        &format!("{} prompts", data.prompts),
        &[(data.bad, "bad rows left out")],
        &data.bad_samples,
    );
    report(&s, &cfg.train.out_dir);
    Ok(())
}
