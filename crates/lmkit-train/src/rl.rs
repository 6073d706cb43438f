//! Online reinforcement learning (`lmkit rl`): GRPO (Shao et al. 2024, as TRL's GRPOTrainer)
//! and PPO (Schulman et al. 2017, as TRL's PPOTrainer; see [`ppo_step`]).
//!
//! Each step the policy samples `group_size` completions for each of `train.batch_size` prompts
//! with lmkit's batched decoder; rewards come from rules (a regular expression, a command that
//! reads the completions as JSON lines and prints one number per line) and/or a reward model,
//! summed. A completion's advantage is its reward minus its group's mean, divided by the group's
//! standard deviation (+1e-4). The loss, per completion token t,
//!
//!   −A · πθ(t)/πθ_old(t) + β · (π_ref(t)/πθ(t) − log(π_ref(t)/πθ(t)) − 1),
//!
//! is summed over the micro batch's completion tokens and divided by their number (TRL's `bnpo`;
//! its default `dapo` with no gradient accumulation). One optimisation step per generation
//! batch, so πθ_old = πθ: the ratio is 1 in value and ∇log πθ in gradient, and clipping never
//! binds. With β > 0 the reference is the starting policy (the base with adapters off, or the
//! base loaded again), or `reference = DIR`.
//!
//! PPO samples a rollout every `ppo_epochs` steps and takes that many optimisation steps over
//! it. A value model (a reward model's layout, read at every position) gives each completion
//! token a value; per-token rewards are −β·(log πθ_old − log π_ref) with the completion's score
//! added at its last token; GAE (γ, λ) gives advantages, whitened over the rollout's tokens, and
//! returns. The policy's loss is the clipped surrogate max(−A·ρ, −A·clip(ρ, 1 ± ε)),
//! ρ = πθ/πθ_old, averaged over the tokens; the value model's, ½·max((V − R)², (clip(V,
//! V_old ± ε_v) − R)²) times `vf_coef`, with its own AdamW (the run's settings and learning rate
//! schedule; its gradient clipped on its own, where TRL clips the two together). Log
//! probabilities are those of the untempered policy (TRL divides the logits by the
//! temperature).

use crate::adamw::AdamW;
use crate::checkpoint::Start;
use crate::config::{load_tuning, TrainConfig, TuningDefaults};
use crate::error::{Result, TrainError};
use crate::finetune::{begin, hand_scored_rows, predicted_hidden, sequences_batch, Tuning, Vocab};
use crate::metrics::Extra;
use crate::reward::RewardModel;
use crate::sft::{self, Example};
use crate::steps::{Grads, Micro, Validation};
use crate::Summary;
use candle_core::{Device, Module, Tensor, D};
use lmkit_core::rng::mix;
use lmkit_core::Progress;
use lmkit_infer::sampling::SamplingParams;
use lmkit_infer::{Decoder, GenerateOptions};
use lmkit_models::layers::lora::{Adapters, LoraSpec};
use lmkit_models::CausalLm;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The `[rl]` section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RlSpec {
    /// Only "grpo".
    #[serde(default = "default_algorithm")]
    pub algorithm: String,
    /// Completions sampled per prompt (TRL's num_generations), at least 2.
    #[serde(default = "default_group")]
    pub group_size: usize,
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<usize>,
    /// The KL penalty's weight (0: no reference model).
    #[serde(default)]
    pub beta: f64,
    /// Divide advantages by the group's standard deviation (TRL's scale_rewards = "group").
    #[serde(default = "default_true")]
    pub scale_rewards: bool,
    /// PPO: optimisation steps over each rollout (TRL's num_ppo_epochs).
    #[serde(default = "default_ppo_epochs")]
    pub ppo_epochs: usize,
    /// PPO: the discount and GAE's λ.
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    #[serde(default = "default_lam")]
    pub lam: f64,
    /// PPO: the policy ratio's and the value's clipping ranges.
    #[serde(default = "default_clip")]
    pub cliprange: f64,
    #[serde(default = "default_clip")]
    pub cliprange_value: f64,
    /// PPO: the value loss's weight in the reported loss (and its gradient's scale).
    #[serde(default = "default_vf_coef")]
    pub vf_coef: f64,
    /// PPO: the value model's starting weights (a reward model or causal LM directory);
    /// default: the reward model (`[reward] model`), else the base with a new value head (and,
    /// with `[lora]`, its own LoRA adapters instead of every weight trained).
    #[serde(default)]
    pub value_model: Option<PathBuf>,
}

impl RlSpec {
    pub fn is_ppo(&self) -> bool {
        self.algorithm == "ppo"
    }
}

fn default_ppo_epochs() -> usize {
    4
}
fn default_gamma() -> f64 {
    1.0
}
fn default_lam() -> f64 {
    0.95
}
fn default_clip() -> f64 {
    0.2
}
fn default_vf_coef() -> f64 {
    0.1
}

fn default_algorithm() -> String {
    "grpo".into()
}
fn default_group() -> usize {
    4
}
fn default_new_tokens() -> usize {
    64
}
fn default_temperature() -> f32 {
    1.0
}
fn default_true() -> bool {
    true
}
fn default_timeout() -> f64 {
    300.0
}

impl Default for RlSpec {
    fn default() -> Self {
        RlSpec {
            algorithm: default_algorithm(),
            group_size: default_group(),
            max_new_tokens: default_new_tokens(),
            temperature: default_temperature(),
            top_p: None,
            top_k: None,
            beta: 0.0,
            scale_rewards: true,
            ppo_epochs: default_ppo_epochs(),
            gamma: default_gamma(),
            lam: default_lam(),
            cliprange: default_clip(),
            cliprange_value: default_clip(),
            vf_coef: default_vf_coef(),
            value_model: None,
        }
    }
}

/// Where rewards come from (those given are summed).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RewardSources {
    /// 1 when the completion matches this regular expression, else 0.
    #[serde(default)]
    pub regex: Option<String>,
    /// A shell command run once per step: it reads one JSON line per completion
    /// (`{"prompt", "completion", "row"}`, `row` the prompt's data row) and prints one number
    /// per line, in order.
    #[serde(default)]
    pub command: Option<String>,
    /// Seconds the command may take per step before it is stopped and the run fails.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// A reward model directory (`lmkit reward train`'s output or a transformers
    /// `*ForSequenceClassification`), scoring prompt + completion.
    #[serde(default)]
    pub model: Option<PathBuf>,
}

impl Default for RewardSources {
    fn default() -> Self {
        RewardSources {
            regex: None,
            command: None,
            timeout_s: default_timeout(),
            model: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RlDataConfig {
    /// Prompt rows: `{"prompt": "..."}` (used as is) or `{"messages": [...]}` (rendered through
    /// the chat template with the generation prompt); other fields go to the reward command.
    pub prompts: PathBuf,
    #[serde(default)]
    pub skip_bad: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RlConfig {
    pub base: PathBuf,
    /// The KL reference, when it is not the starting policy.
    #[serde(default)]
    pub reference: Option<PathBuf>,
    pub data: RlDataConfig,
    #[serde(default)]
    pub rl: RlSpec,
    #[serde(default)]
    pub reward: RewardSources,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub lora: Option<LoraSpec>,
    #[serde(default)]
    pub adapter: Option<PathBuf>,
}

impl RlConfig {
    /// Reads `path` with `overrides`; `[train]` fields left out take RL defaults (learning rate
    /// 1e-6, or 1e-5 with LoRA, constant; no weight decay; 100 steps of 4 prompts).
    pub fn load(path: &Path, overrides: &[String]) -> Result<RlConfig> {
        let cfg: RlConfig = load_tuning(
            path,
            overrides,
            &TuningDefaults {
                lr: (1e-6, 1e-5),
                constant: true,
                max_steps: 100,
                batch_size: 4,
                seq_len: 1024,
                eval_every: 0,
                save_every: 50,
                out_dir: "runs/rl",
            },
        )?;
        let bad = |msg: String| TrainError::Config {
            path: path.to_path_buf(),
            msg,
        };
        crate::config::validate_tuning(&cfg.train, None, cfg.lora.as_ref(), cfg.adapter.is_some())
            .map_err(bad)?;
        let r = &cfg.rl;
        if r.algorithm != "grpo" && r.algorithm != "ppo" {
            return Err(bad(format!(
                "rl.algorithm = {:?}: \"grpo\" or \"ppo\"",
                r.algorithm
            )));
        }
        if r.group_size < 2 && !r.is_ppo() {
            return Err(bad(
                "rl.group_size must be at least 2 for GRPO (advantages compare a group's completions)"
                    .into(),
            ));
        }
        if r.group_size == 0 {
            return Err(bad("rl.group_size must be at least 1".into()));
        }
        if r.is_ppo() {
            let unit = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
            if r.ppo_epochs == 0 {
                return Err(bad("rl.ppo_epochs must be at least 1".into()));
            }
            if !unit(r.gamma) || !unit(r.lam) {
                return Err(bad("rl.gamma and rl.lam must be within [0, 1]".into()));
            }
            let positive = |v: f64| v.is_finite() && v > 0.0;
            if !positive(r.cliprange) || !positive(r.cliprange_value) {
                return Err(bad(
                    "rl.cliprange and rl.cliprange_value must be above 0".into()
                ));
            }
            if !(r.vf_coef.is_finite() && r.vf_coef >= 0.0) {
                return Err(bad("rl.vf_coef must be a number ≥ 0".into()));
            }
            if cfg.train.grad_accum > 1 {
                return Err(bad(
                    "PPO takes train.grad_accum = 1 (raise train.batch_size instead)".into(),
                ));
            }
        }
        if r.max_new_tokens == 0 {
            return Err(bad("rl.max_new_tokens must be at least 1".into()));
        }
        if !(r.beta.is_finite() && r.beta >= 0.0) {
            return Err(bad("rl.beta must be a number ≥ 0".into()));
        }
        let sampling = sampling(r, 0);
        sampling.validate().map_err(|e| bad(format!("[rl]: {e}")))?;
        if r.temperature <= 0.0 {
            return Err(bad(
                "rl.temperature must be above 0 (greedy decoding gives a group identical completions)"
                    .into(),
            ));
        }
        let w = &cfg.reward;
        if w.regex.is_none() && w.command.is_none() && w.model.is_none() {
            return Err(bad(
                "[reward] needs regex = \"...\", command = \"...\" or model = \"DIR\"".into(),
            ));
        }
        if let Some(re) = &w.regex {
            regex::Regex::new(re).map_err(|e| bad(format!("reward.regex: {e}")))?;
        }
        if !(w.timeout_s.is_finite() && w.timeout_s > 0.0) {
            return Err(bad(
                "reward.timeout_s must be a positive number of seconds".into()
            ));
        }
        if cfg.reference.is_some() && r.beta == 0.0 {
            return Err(bad(
                "`reference` is only used with rl.beta > 0 (the KL penalty)".into(),
            ));
        }
        Ok(cfg)
    }
}

fn sampling(r: &RlSpec, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: r.temperature,
        top_k: r.top_k,
        top_p: r.top_p,
        repetition_penalty: 1.0,
        seed,
    }
}

/// A prompt: its tokens, its text and its data row.
struct Prompt {
    ids: Vec<u32>,
    text: String,
    row: serde_json::Value,
}

/// One sampled completion.
struct Sample {
    prompt: usize,
    ids: Vec<u32>,
    /// The stop token that ended it (trained on: the policy learns to stop).
    stop: Option<u32>,
    text: String,
}

/// Group-relative advantages: each reward minus its group's mean, divided (with `scale`) by the
/// group's standard deviation (n − 1) + 1e-4. Also returns the mean of the groups' deviations
/// and the share of groups whose rewards were all equal.
pub fn advantages(rewards: &[f64], group: usize, scale: bool) -> (Vec<f64>, f64, f64) {
    let mut out = Vec::with_capacity(rewards.len());
    let (mut std_sum, mut flat, mut groups) = (0.0, 0usize, 0usize);
    for g in rewards.chunks(group) {
        let n = g.len() as f64;
        let mean = g.iter().sum::<f64>() / n;
        let var = g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        let std = var.sqrt();
        std_sum += std;
        groups += 1;
        flat += (std.abs() < 1e-12) as usize;
        for r in g {
            out.push(if scale {
                (r - mean) / (std + 1e-4)
            } else {
                r - mean
            });
        }
    }
    let g = groups.max(1) as f64;
    (out, std_sum / g, flat as f64 / g)
}

/// The per-token loss and its derivative by the policy's log-probability: −A (the ratio is 1)
/// plus β times the KL estimate exp(ref − lp) − (ref − lp) − 1, and that estimate.
pub fn token_loss(advantage: f64, lp: f64, reference: Option<f64>, beta: f64) -> (f64, f64, f64) {
    let (kl, dkl) = match reference {
        Some(r) if beta > 0.0 => {
            let d = r - lp;
            (d.exp() - d - 1.0, 1.0 - d.exp())
        }
        _ => (0.0, 0.0),
    };
    (-advantage + beta * kl, -advantage + beta * dkl, kl)
}

/// The log-probabilities of the scored tokens of `seqs` (one padded batch), sequence after
/// sequence, with their graph (for the policy).
fn token_logps(model: &CausalLm, seqs: &[&Example], dev: &Device) -> Result<Tensor> {
    let b = sequences_batch(seqs, dev)?;
    let h = predicted_hidden(model, &b)?;
    let rows = 128.max((16 << 20) / (4 * model.output().dims()?.0.max(1)));
    let mut parts = Vec::new();
    for start in (0..b.count).step_by(rows) {
        let len = rows.min(b.count - start);
        let logits = model.output().forward(&h.narrow(0, start, len)?)?;
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let picked = lp.gather(&b.targets.narrow(0, start, len)?.unsqueeze(1)?, 1)?;
        parts.push(picked.squeeze(1)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// The log-probabilities of the scored tokens of `seqs`, without gradient (for the reference).
fn token_logps_value(model: &CausalLm, seqs: &[&Example], dev: &Device) -> Result<Vec<f32>> {
    let b = sequences_batch(seqs, dev)?;
    let h = predicted_hidden(model, &b)?.detach();
    let logits = model.output().forward(&h)?.detach();
    let targets: Vec<u32> = b.targets.to_vec1()?;
    Ok(lmkit_kernels::fused::target_log_probs(&logits, &targets)?)
}

/// Positions (rows × the longest row) in one training pass over sampled sequences.
const PASS_TOKENS: usize = 512;

/// The reference for the KL penalty.
enum Reference {
    None,
    /// The policy with these, its adapters, switched off.
    AdaptersOff(Adapters),
    Model(Box<CausalLm>),
}

/// What `rl` read, for the command to report.
pub struct RlReport {
    pub prompts: usize,
    pub bad: usize,
    pub bad_samples: Vec<String>,
}

/// Runs GRPO per `cfg`.
pub fn rl(cfg: &RlConfig, start: Start, progress: &dyn Progress) -> Result<(Summary, RlReport)> {
    let t = &cfg.train;
    let r = &cfg.rl;
    let dev = lmkit_models::parse_device(&t.device)?;
    let vocab = Vocab::load(&cfg.base)?;
    let prompts = sft::read_with(
        &cfg.data.prompts,
        cfg.data.skip_bad,
        |row| {
            let obj = row.as_object().ok_or("a row must be a JSON object")?;
            let text = match (obj.get("prompt"), obj.get("messages")) {
                (Some(serde_json::Value::String(p)), _) => p.clone(),
                (_, Some(m)) => {
                    let template = vocab
                        .template
                        .as_ref()
                        .ok_or("the base model has no chat template for `messages` rows")?;
                    let msgs: Vec<lmkit_tokenize::chat::Message> =
                        serde_json::from_value(m.clone())
                            .map_err(|e| format!("`messages`: {e}"))?;
                    template.render(&msgs, true).map_err(|e| e.to_string())?
                }
                _ => return Err("no `prompt` string or `messages` list".into()),
            };
            let ids = vocab
                .tokenizer
                .encode(text.as_str(), false)
                .map_err(|e| format!("tokenizer: {e}"))?
                .get_ids()
                .to_vec();
            if ids.is_empty() {
                return Err("the prompt is empty".into());
            }
            let cut = ids.len() + r.max_new_tokens + 1 > t.seq_len;
            Ok((
                Prompt {
                    ids,
                    text,
                    row: row.clone(),
                },
                cut,
            ))
        },
        |_| true,
    )?;
    if prompts.truncated > 0 {
        return Err(TrainError::Data(format!(
            "{}: {} prompts leave no room for rl.max_new_tokens ({}) within train.seq_len ({}); raise train.seq_len or shorten them",
            cfg.data.prompts.display(),
            prompts.truncated,
            r.max_new_tokens,
            t.seq_len
        )));
    }
    let report = RlReport {
        prompts: prompts.examples.len(),
        bad: prompts.bad,
        bad_samples: prompts.bad_samples.clone(),
    };
    let prompts = prompts.examples;
    if prompts.is_empty() {
        return Err(TrainError::Data(format!(
            "{}: no prompt to train on",
            cfg.data.prompts.display()
        )));
    }
    let what = Tuning {
        base: &cfg.base,
        lora: cfg.lora.as_ref(),
        adapter: cfg.adapter.as_deref(),
        seed: t.seed,
        group: Some(("rl.group_size", r.group_size)),
    };
    let identity = serde_json::json!({
        "base": cfg.base.to_string_lossy(),
        "reference": cfg.reference,
        "lora": cfg.lora,
        "adapter": cfg.adapter,
        "data": cfg.data,
        "rl": cfg.rl,
        "reward": cfg.reward,
        "seq_len": t.seq_len,
    });
    let toml_text = toml::to_string_pretty(cfg).unwrap_or_default();
    let (tuned, output, mut opt, from) =
        begin(what, t, identity, &toml_text, start, &dev, progress)?;
    let n_params: usize = opt.params.iter().map(|p| p.var.elem_count()).sum();
    let samples_path = output.out.join("completions.jsonl");
    keep_samples_through(&samples_path, from.step)?;

    let reference = if r.beta == 0.0 {
        Reference::None
    } else if let Some(dir) = &cfg.reference {
        Reference::Model(Box::new(CausalLm::load(dir, &dev)?.0))
    } else if let Some(a) = &tuned.adapters {
        Reference::AdaptersOff(a.clone())
    } else {
        progress.message("loading the base again as the KL reference");
        Reference::Model(Box::new(CausalLm::load(&cfg.base, &dev)?.0))
    };
    let reward_model = match &cfg.reward.model {
        Some(d) => Some(RewardModel::load(
            &lmkit_models::resolve_checkpoint(d),
            &dev,
        )?),
        None => None,
    };
    let regex = cfg
        .reward
        .regex
        .as_deref()
        .map(regex::Regex::new)
        .transpose()
        .map_err(|e| TrainError::Data(format!("reward.regex: {e}")))?;
    let stop_ids = lmkit_models::stop_token_ids(&cfg.base)?;
    let ctx = Ctx {
        cfg,
        model: &tuned.model,
        adapters: tuned.adapters.as_ref(),
        vocab: &vocab,
        prompts: &prompts,
        stop_ids,
        max_positions: tuned.max_positions,
        regex,
        reward_model,
        reference,
        dev: &dev,
    };
    let mut critic = if r.is_ppo() {
        let dir = value_model_dir(cfg);
        // A value model started from the base trains LoRA adapters and its head when the policy
        // does; one named by rl.value_model or a reward model trains every weight (as TRL).
        let lora = cfg.lora.as_ref().filter(|_| dir == cfg.base);
        progress.message(&format!(
            "value model: {}{}",
            dir.display(),
            if lora.is_some() {
                " (LoRA adapters and a new head)"
            } else {
                ""
            }
        ));
        let c = Critic::load(&dir, lora, t, &dev)?;
        Some(std::cell::RefCell::new(c))
    } else {
        None
    };
    if let Some(c) = &mut critic {
        if from.step > 0 {
            c.get_mut().restore(&output.take_restored(), from.step)?;
        }
        // Every checkpoint from now on carries the value model, even one written before a step.
        output.keep_extra(c.get_mut().state());
    }
    let rollouts = std::cell::RefCell::new(std::collections::HashMap::new());

    let mut micro = |step: usize, m: usize, grads: &mut Grads| -> Result<Micro> {
        match &critic {
            None => grpo_step(&ctx, &samples_path, step, m, grads),
            Some(c) => {
                let block = step / r.ppo_epochs;
                let k = block * t.grad_accum + m;
                let mut held = rollouts.borrow_mut();
                let fresh = !matches!(held.get(&m), Some((b, _)) if *b == block);
                if fresh {
                    let ro = ppo_rollout(&ctx, &c.borrow(), k)?;
                    write_samples(
                        &samples_path,
                        step + 1,
                        &ro.sampled.samples,
                        &prompts,
                        &ro.sampled.rewards,
                        &ro.sample_advantages(),
                    )?;
                    held.insert(m, (block, ro));
                }
                let (_, ro) = &held[&m];
                let mut critic = c.borrow_mut();
                let micro = ppo_step(&ctx, &mut critic, ro, fresh, step, m, grads)?;
                if m + 1 == t.grad_accum {
                    critic.step(t, step)?;
                    output.keep_extra(critic.state());
                }
                Ok(micro)
            }
        }
    };
    let mut evaluate = || -> Result<Option<Validation>> { Ok(None) };
    let (end, _) = output.run(t, &mut opt, from, progress, &mut micro, &mut evaluate)?;
    Ok((end.summary(n_params), report))
}

/// What a step reads: the run's configuration, the policy, the prompts, the reward sources
/// and the KL reference.
struct Ctx<'a> {
    cfg: &'a RlConfig,
    model: &'a CausalLm,
    adapters: Option<&'a Adapters>,
    vocab: &'a Vocab,
    prompts: &'a [Prompt],
    stop_ids: Vec<u32>,
    max_positions: usize,
    regex: Option<regex::Regex>,
    reward_model: Option<RewardModel>,
    reference: Reference,
    dev: &'a Device,
}

/// A step's sampled completions, their rewards (summed over the sources) and each source's
/// mean, and the generation's seconds.
struct Sampled {
    samples: Vec<Sample>,
    rewards: Vec<f64>,
    parts: Extra,
    seconds: f64,
}

/// Samples `group_size` completions for each of batch `k`'s prompts with the policy as it is
/// (no dropout) and scores them.
fn sample_and_score(ctx: &Ctx, k: usize) -> Result<Sampled> {
    let (cfg, model) = (ctx.cfg, ctx.model);
    let (t, r) = (&cfg.train, &cfg.rl);
    let t_gen = Instant::now();
    model.set_training(false);
    if let Some(a) = ctx.adapters {
        a.set_dropout_seed(None);
    }
    let chosen = sft::batch_indices(ctx.prompts.len(), t.batch_size, k, t.seed);
    // The prompts are read together in one packed pass, each once: a group's decoders continue
    // from copies of its cache (`Decoder::step_many`).
    let mut decoders = Vec::new();
    for (i, &p) in chosen.iter().enumerate() {
        for g in 0..r.group_size {
            let opts = GenerateOptions {
                max_tokens: r.max_new_tokens,
                sampling: sampling(
                    r,
                    mix(t.seed ^ mix((k * 4096 + i * 64 + g) as u64 + 0x61e0)),
                ),
                stop_ids: ctx.stop_ids.clone(),
                max_positions: ctx.max_positions,
            };
            decoders.push(
                Decoder::new(model, &ctx.prompts[p].ids, opts)
                    .map_err(|e| TrainError::Data(e.to_string()))?,
            );
        }
    }
    let mut done = vec![false; decoders.len()];
    lmkit_infer::finish_all(
        model,
        &mut decoders,
        &mut done,
        lmkit_infer::PACKED_PROMPT_TOKENS,
    )
    .map_err(|e| TrainError::Data(e.to_string()))?;
    let samples: Vec<Sample> = decoders
        .iter()
        .enumerate()
        .map(|(j, d)| Sample {
            prompt: chosen[j / r.group_size],
            ids: d.generated().to_vec(),
            stop: d.stopped_by(),
            text: ctx
                .vocab
                .tokenizer
                .decode(d.generated(), true)
                .unwrap_or_default(),
        })
        .collect();
    let seconds = t_gen.elapsed().as_secs_f64();

    let mut rewards = vec![0.0; samples.len()];
    let mut parts = Extra::new();
    if let Some(re) = &ctx.regex {
        let got: Vec<f64> = samples
            .iter()
            .map(|s| re.is_match(&s.text) as u8 as f64)
            .collect();
        add_source(&mut rewards, &mut parts, "rewards/regex", &got);
    }
    if let Some(cmd) = &cfg.reward.command {
        let got = command_rewards(cmd, cfg.reward.timeout_s, &samples, ctx.prompts)?;
        add_source(&mut rewards, &mut parts, "rewards/command", &got);
    }
    if let Some(rm) = &ctx.reward_model {
        let mut got = Vec::with_capacity(samples.len());
        for s in &samples {
            got.push(rm.score(&full_ids(&ctx.prompts[s.prompt], s), ctx.dev)?);
        }
        add_source(&mut rewards, &mut parts, "rewards/model", &got);
    }
    Ok(Sampled {
        samples,
        rewards,
        parts,
        seconds,
    })
}

/// A sample's whole sequence: prompt, completion, the stop token that ended it.
fn full_ids(p: &Prompt, s: &Sample) -> Vec<u32> {
    let mut ids = p.ids.clone();
    ids.extend(&s.ids);
    ids.extend(s.stop);
    ids
}

/// The samples as training sequences (the completion's tokens scored, the stop token
/// included: the policy learns to stop).
fn sequences(samples: &[Sample], prompts: &[Prompt]) -> Vec<Example> {
    samples
        .iter()
        .map(|s| {
            let p = &prompts[s.prompt];
            let ids = full_ids(p, s);
            let mut train = vec![false; p.ids.len()];
            train.resize(ids.len(), true);
            Example { ids, train }
        })
        .collect()
}

/// The sequences with scored tokens in passes of up to PASS_TOKENS positions: fewer passes over
/// the weights, and one pass's graph alive at a time. The scored tokens in pass order are the
/// steps' "rows" (sequence after sequence).
fn pass_groups(seqs: &[Example]) -> Vec<Vec<usize>> {
    let mut passes: Vec<Vec<usize>> = Vec::new();
    for i in (0..seqs.len()).filter(|&i| seqs[i].targets() > 0) {
        let n = seqs[i].ids.len();
        let fits = passes.last().is_some_and(|p| {
            let longest = p.iter().map(|&j| seqs[j].ids.len()).max().unwrap_or(0);
            longest.max(n) * (p.len() + 1) <= PASS_TOKENS
        });
        match passes.last_mut() {
            Some(p) if fits => p.push(i),
            _ => passes.push(vec![i]),
        }
    }
    passes
}

/// `score` of each pass's sequences, concatenated: one number per row, in row order.
fn per_row(
    seqs: &[Example],
    groups: &[Vec<usize>],
    mut score: impl FnMut(&[&Example]) -> Result<Vec<f64>>,
) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for g in groups {
        let batch: Vec<&Example> = g.iter().map(|&i| &seqs[i]).collect();
        out.extend(score(&batch)?);
    }
    Ok(out)
}

/// Log-probabilities of every row without gradient under `model`.
fn logps_under(model: &CausalLm, batch: &[&Example], dev: &Device) -> Result<Vec<f64>> {
    let v = token_logps_value(model, batch, dev)?;
    Ok(v.iter().map(|&x| x as f64).collect())
}

/// The reference's log-probability of every row (`None` without a reference).
fn reference_logps(ctx: &Ctx, seqs: &[Example], groups: &[Vec<usize>]) -> Result<Option<Vec<f64>>> {
    Ok(Some(match &ctx.reference {
        Reference::None => return Ok(None),
        Reference::Model(rm) => per_row(seqs, groups, |b| logps_under(rm, b, ctx.dev))?,
        Reference::AdaptersOff(a) => {
            a.set_enabled(false);
            let v = per_row(seqs, groups, |b| logps_under(ctx.model, b, ctx.dev));
            a.set_enabled(true);
            v?
        }
    }))
}

/// The policy's gradient for a loss whose derivative by row i's log-probability lp is
/// `dloss(i, lp)` (summed over rows), added to `grads`; every row's log-probability. Dropout
/// masks (LoRA) are drawn from `k`.
fn policy_update(
    ctx: &Ctx,
    seqs: &[Example],
    groups: &[Vec<usize>],
    k: usize,
    grads: &mut Grads,
    dloss: &(dyn Fn(usize, f64) -> f64 + Sync),
) -> Result<Vec<f64>> {
    let t = &ctx.cfg.train;
    let mut lps = Vec::new();
    for g in groups {
        let batch: Vec<&Example> = g.iter().map(|&i| &seqs[i]).collect();
        let at = lps.len();
        ctx.model.set_training(true);
        if let Some(ad) = ctx.adapters {
            let seed = t.seed ^ 0x71_0a7e ^ ((k * 4096) as u64 + 1);
            ad.set_dropout_seed(Some(mix(seed)));
        }
        // d(loss)/d(params) = Σ d·∇lp = Σ −d·∇ce.
        let weight = |row: usize, ce: f64| -dloss(at + row, -ce);
        let b = sequences_batch(&batch, ctx.dev)?;
        match hand_scored_rows(ctx.model, &b, 1.0, Some(&weight), grads, t.backward)? {
            Some(s) => {
                grads.add_all(s.grads, 1.0)?;
                lps.extend(s.row_losses.iter().map(|ce| -ce));
            }
            None => {
                let lp = token_logps(ctx.model, &batch, ctx.dev)?;
                let values: Vec<f64> = lp.to_vec1::<f32>()?.iter().map(|&v| v as f64).collect();
                let coef: Vec<f32> = (values.iter().enumerate())
                    .map(|(row, &v)| dloss(at + row, v) as f32)
                    .collect();
                let coef = Tensor::from_vec(coef, values.len(), ctx.dev)?;
                grads.backward(&(lp * coef)?.sum_all()?)?;
                lps.extend(values);
            }
        }
        ctx.model.set_training(false);
    }
    Ok(lps)
}

/// Rows of the scored tokens per sequence, in row order (0 for sequences without any).
fn rows_per_sequence(seqs: &[Example], groups: &[Vec<usize>]) -> Vec<(usize, usize)> {
    let mut spans = vec![(0, 0); seqs.len()];
    let mut at = 0;
    for &i in groups.iter().flatten() {
        spans[i] = (at, seqs[i].targets());
        at += seqs[i].targets();
    }
    spans
}

/// One GRPO step on batch (step, m).
fn grpo_step(
    ctx: &Ctx,
    samples_path: &Path,
    step: usize,
    m: usize,
    grads: &mut Grads,
) -> Result<Micro> {
    let (t, r) = (&ctx.cfg.train, &ctx.cfg.rl);
    let k = step * t.grad_accum + m;
    let s = sample_and_score(ctx, k)?;
    let t_opt = Instant::now();
    let (adv, reward_std, flat) = advantages(&s.rewards, r.group_size, r.scale_rewards);
    let seqs = sequences(&s.samples, ctx.prompts);
    let groups = pass_groups(&seqs);
    let spans = rows_per_sequence(&seqs, &groups);
    let n_tokens: usize = seqs.iter().map(|e| e.targets()).sum();
    let norm = 1.0 / (n_tokens.max(1) * t.grad_accum) as f64;
    let refs = reference_logps(ctx, &seqs, &groups)?;
    let mut row_adv = vec![0.0; n_tokens];
    for (i, &(at, n)) in spans.iter().enumerate() {
        row_adv[at..at + n].iter_mut().for_each(|a| *a = adv[i]);
    }
    let term = |row: usize, lp: f64| {
        let reference = refs.as_ref().map(|r| r[row]);
        token_loss(row_adv[row], lp, reference, r.beta)
    };
    let lps = policy_update(ctx, &seqs, &groups, k, grads, &|row, lp| {
        term(row, lp).1 * norm
    })?;
    let (mut loss, mut kl_sum) = (0.0, 0.0);
    for (row, &v) in lps.iter().enumerate() {
        let (l, _, kl) = term(row, v);
        loss += l * norm;
        kl_sum += kl;
    }
    let optimization = t_opt.elapsed().as_secs_f64();
    write_samples(
        samples_path,
        step + 1,
        &s.samples,
        ctx.prompts,
        &s.rewards,
        &adv,
    )?;
    let mut extra = sample_metrics(&s);
    extra.insert("reward_std".into(), reward_std);
    extra.insert("frac_reward_zero_std".into(), flat);
    if r.beta > 0.0 {
        extra.insert("kl".into(), kl_sum / n_tokens.max(1) as f64);
    }
    extra.insert("time/optimization".into(), optimization);
    Ok(Micro {
        loss,
        tokens: seqs.iter().map(|e| e.ids.len() as u64).sum(),
        extra,
    })
}

/// The metrics of a step's samples: mean reward (and each source's), completion lengths, the
/// share cut at max_new_tokens, the generation's seconds.
fn sample_metrics(s: &Sampled) -> Extra {
    let n = s.samples.len().max(1) as f64;
    let mut extra = s.parts.clone();
    extra.insert("reward".into(), s.rewards.iter().sum::<f64>() / n);
    extra.insert(
        "completions/mean_length".into(),
        s.samples
            .iter()
            .map(|x| (x.ids.len() + x.stop.is_some() as usize) as f64)
            .sum::<f64>()
            / n,
    );
    extra.insert(
        "completions/clipped_ratio".into(),
        s.samples.iter().filter(|x| x.stop.is_none()).count() as f64 / n,
    );
    extra.insert("time/generation".into(), s.seconds);
    extra
}

/// The value model's directory: `rl.value_model`, else the reward model's (a transformers
/// directory), else the base (a new value head on the policy's starting weights).
fn value_model_dir(cfg: &RlConfig) -> PathBuf {
    if let Some(d) = &cfg.rl.value_model {
        return d.clone();
    }
    match &cfg.reward.model {
        Some(d)
            if !lmkit_models::resolve_run(d, "adapter_config.json")
                .join("adapter_config.json")
                .is_file() =>
        {
            d.clone()
        }
        _ => cfg.base.clone(),
    }
}

/// PPO's value model (a reward model's layout: a causal LM's hidden states through a scalar
/// head, read at every position), its optimizer and the step's gradients being gathered.
struct Critic {
    rm: RewardModel,
    opt: AdamW,
    grads: Vec<Option<Tensor>>,
}

impl Critic {
    fn load(dir: &Path, lora: Option<&LoraSpec>, t: &TrainConfig, dev: &Device) -> Result<Critic> {
        if let Some(spec) = lora {
            let (rm, params, _, _) =
                crate::reward::load_lora_reward(dir, spec, t.seed ^ 0x7a1e, dev)?;
            let opt = AdamW::new(params, t.beta1, t.beta2, t.eps, t.weight_decay)?;
            let grads = vec![None; opt.params.len()];
            return Ok(Critic { rm, opt, grads });
        }
        if lmkit_models::gguf::is_gguf(dir) {
            return Err(TrainError::Data(format!(
                "{}: PPO's value model trains every weight and needs a Hugging Face directory; \
                 set rl.value_model (a reward model from `lmkit reward train`, or a causal LM \
                 directory, which gets a new value head)",
                dir.display()
            )));
        }
        let (rm, params, _) = crate::reward::load_reward(dir, t.seed, dev)?;
        let opt = AdamW::new(params, t.beta1, t.beta2, t.eps, t.weight_decay)?;
        let grads = vec![None; opt.params.len()];
        Ok(Critic { rm, opt, grads })
    }

    /// The value at each scored row of `batch` (the hidden state before the token), as a graph.
    fn values(&self, batch: &[&Example], dev: &Device) -> Result<Tensor> {
        let b = sequences_batch(batch, dev)?;
        let h = predicted_hidden(&self.rm.model, &b)?;
        Ok(h.matmul(&self.rm.score.t()?)?.squeeze(1)?)
    }

    /// Adds the gradients of `loss` to the step's.
    fn add_grads(&mut self, loss: &Tensor) -> Result<()> {
        let g = loss.backward()?;
        for (p, acc) in self.opt.params.iter().zip(self.grads.iter_mut()) {
            if let Some(gi) = g.get(p.var.as_tensor()) {
                let gi = gi.detach();
                *acc = Some(match acc.take() {
                    Some(a) => (a + gi)?,
                    None => gi,
                });
            }
        }
        Ok(())
    }

    /// One optimizer step with the gathered gradients, at step `step`'s learning rate and with
    /// the run's gradient clipping.
    fn step(&mut self, t: &TrainConfig, step: usize) -> Result<()> {
        let grads: Vec<Tensor> =
            std::mem::replace(&mut self.grads, vec![None; self.opt.params.len()])
                .into_iter()
                .zip(&self.opt.params)
                .map(|(g, p)| g.map_or_else(|| p.var.zeros_like(), Ok))
                .collect::<candle_core::Result<_>>()?;
        let norm = crate::adamw::grad_norm(&grads)?;
        let lr = crate::adamw::lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps);
        self.opt
            .step(&grads, lr, crate::adamw::clip_scale(norm, t.grad_clip))?;
        Ok(())
    }

    /// Its weights and moments, named for a checkpoint's optimizer file.
    fn state(&self) -> Vec<(String, Tensor)> {
        let (weights, moments) = crate::checkpoint::optimizer_tensors(&self.opt);
        weights
            .into_iter()
            .chain(moments)
            .map(|(n, t)| (format!("{CRITIC}{n}"), t))
            .collect()
    }

    /// Takes its weights and moments from a resumed checkpoint's optimizer file.
    fn restore(
        &mut self,
        saved: &std::collections::HashMap<String, Tensor>,
        step: usize,
    ) -> Result<()> {
        let get = |name: String| {
            saved.get(&name).cloned().ok_or_else(|| {
                TrainError::Data(format!(
                    "the checkpoint has no `{name}`: it was not written by a PPO run"
                ))
            })
        };
        for i in 0..self.opt.params.len() {
            let name = self.opt.params[i].name.clone();
            self.opt.params[i]
                .var
                .set(&get(format!("{CRITIC}{name}"))?)?;
            self.opt.m[i] = get(format!("{CRITIC}m.{name}"))?;
            self.opt.v[i] = get(format!("{CRITIC}v.{name}"))?;
        }
        self.opt.step = step;
        Ok(())
    }
}

/// The prefix of the value model's tensors in a checkpoint's optimizer file.
const CRITIC: &str = "value_model.";

/// Generalized advantage estimation (Schulman et al. 2016) over each sequence's rows
/// (`spans`: first row, rows): δ_t = r_t + γ·V_{t+1} − V_t (V after the last row = 0),
/// A_t = δ_t + γλ·A_{t+1}; returns A and the returns A + V.
pub fn gae(
    rewards: &[f64],
    values: &[f64],
    spans: &[(usize, usize)],
    gamma: f64,
    lam: f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut adv = vec![0.0; rewards.len()];
    for &(at, n) in spans {
        let mut last = 0.0;
        for i in (at..at + n).rev() {
            let next = if i + 1 < at + n { values[i + 1] } else { 0.0 };
            let delta = rewards[i] + gamma * next - values[i];
            last = delta + gamma * lam * last;
            adv[i] = last;
        }
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// (x − mean) / √(var + 1e-8) with the unbiased variance (TRL's masked_whiten).
pub fn whiten(x: &[f64]) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n.max(1.0);
    let var = if x.len() > 1 {
        x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    let s = 1.0 / (var + 1e-8).sqrt();
    x.iter().map(|v| (v - mean) * s).collect()
}

/// PPO's clipped surrogate for one token: the loss max(−A·ρ, −A·clip(ρ, 1 ± ε)) with
/// ρ = exp(lp − old), its derivative by lp, and whether the clipped term was the larger.
pub fn ppo_token_loss(advantage: f64, lp: f64, old: f64, eps: f64) -> (f64, f64, bool) {
    let ratio = (lp - old).exp();
    let unclipped = -advantage * ratio;
    let clipped = -advantage * ratio.clamp(1.0 - eps, 1.0 + eps);
    if clipped > unclipped {
        (clipped, 0.0, true)
    } else {
        (unclipped, -advantage * ratio, false)
    }
}

/// A PPO rollout: sampled completions and their scores, and per scored row (sequence after
/// sequence) the sampling policy's log-probability, the value, advantage (whitened) and return,
/// and the KL estimate lp − ref (empty without a reference).
struct Rollout {
    sampled: Sampled,
    seqs: Vec<Example>,
    groups: Vec<Vec<usize>>,
    spans: Vec<(usize, usize)>,
    old: Vec<f64>,
    values: Vec<f64>,
    adv: Vec<f64>,
    returns: Vec<f64>,
    kl: Vec<f64>,
}

impl Rollout {
    /// Each sample's mean advantage over its tokens (for the completions log).
    fn sample_advantages(&self) -> Vec<f64> {
        self.spans
            .iter()
            .map(|&(at, n)| self.adv[at..at + n].iter().sum::<f64>() / n.max(1) as f64)
            .collect()
    }
}

/// Samples and scores batch `k`, then computes what PPO's steps over it read: per-token
/// rewards (−β·(lp − ref), the score added at the last token), values, GAE advantages
/// (whitened over the batch's tokens) and returns.
fn ppo_rollout(ctx: &Ctx, critic: &Critic, k: usize) -> Result<Rollout> {
    let r = &ctx.cfg.rl;
    let sampled = sample_and_score(ctx, k)?;
    let seqs = sequences(&sampled.samples, ctx.prompts);
    let groups = pass_groups(&seqs);
    let spans = rows_per_sequence(&seqs, &groups);
    let old = per_row(&seqs, &groups, |b| logps_under(ctx.model, b, ctx.dev))?;
    let kl: Vec<f64> = match reference_logps(ctx, &seqs, &groups)? {
        Some(refs) => old.iter().zip(&refs).map(|(o, f)| o - f).collect(),
        None => Vec::new(),
    };
    let values = per_row(&seqs, &groups, |b| {
        let v = critic.values(b, ctx.dev)?.detach();
        Ok(v.to_vec1::<f32>()?.iter().map(|&x| x as f64).collect())
    })?;
    let mut rewards: Vec<f64> = if kl.is_empty() {
        vec![0.0; old.len()]
    } else {
        kl.iter().map(|d| -r.beta * d).collect()
    };
    for (i, &(at, n)) in spans.iter().enumerate() {
        if n > 0 {
            rewards[at + n - 1] += sampled.rewards[i];
        }
    }
    let (adv, returns) = gae(&rewards, &values, &spans, r.gamma, r.lam);
    Ok(Rollout {
        seqs,
        groups,
        spans,
        old,
        values,
        adv: whiten(&adv),
        returns,
        kl,
        sampled,
    })
}

/// One PPO optimisation step (step, m) over its rollout: the policy's clipped surrogate
/// (gradients into `grads`) and the value model's clipped value loss (gradients gathered in
/// the critic, stepped by the caller).
fn ppo_step(
    ctx: &Ctx,
    critic: &mut Critic,
    ro: &Rollout,
    fresh: bool,
    step: usize,
    m: usize,
    grads: &mut Grads,
) -> Result<Micro> {
    let (t, r) = (&ctx.cfg.train, &ctx.cfg.rl);
    let t_opt = Instant::now();
    let n_tokens = ro.old.len();
    let norm = 1.0 / (n_tokens.max(1) * t.grad_accum) as f64;
    let term = |row: usize, lp: f64| ppo_token_loss(ro.adv[row], lp, ro.old[row], r.cliprange);
    let k = step * t.grad_accum + m;
    let lps = policy_update(ctx, &ro.seqs, &ro.groups, k, grads, &|row, lp| {
        term(row, lp).1 * norm
    })?;
    let (mut pg, mut clipped, mut approx) = (0.0, 0usize, 0.0);
    for (row, &lp) in lps.iter().enumerate() {
        let (l, _, c) = term(row, lp);
        pg += l;
        clipped += c as usize;
        approx += 0.5 * (lp - ro.old[row]).powi(2);
    }
    // The value loss: ½·max((V − R)², (clip(V, V_old ± ε) − R)²), the larger term chosen per
    // token (the gradient of the unclipped one where they are equal).
    let (mut vf, mut vclipped) = (0.0, 0usize);
    let mut at = 0;
    for g in &ro.groups {
        let batch: Vec<&Example> = g.iter().map(|&i| &ro.seqs[i]).collect();
        let v = critic.values(&batch, ctx.dev)?;
        let n = v.dim(0)?;
        let dev = ctx.dev;
        let slice = |x: &[f64]| {
            let x: Vec<f32> = x[at..at + n].iter().map(|&v| v as f32).collect();
            Tensor::from_vec(x, n, dev)
        };
        let (v_old, ret) = (slice(&ro.values)?, slice(&ro.returns)?);
        let vc = (&v_old + (&v - &v_old)?.clamp(-r.cliprange_value, r.cliprange_value)?)?;
        let l1 = (&v - &ret)?.sqr()?;
        let l2 = (vc - &ret)?.sqr()?;
        let (a1, a2): (Vec<f32>, Vec<f32>) = (l1.to_vec1()?, l2.to_vec1()?);
        let pick: Vec<f32> = a1
            .iter()
            .zip(&a2)
            .map(|(x, y)| (y > x) as u8 as f32)
            .collect();
        for (x, y) in a1.iter().zip(&a2) {
            vf += 0.5 * x.max(*y) as f64;
            vclipped += (y > x) as usize;
        }
        let pick = Tensor::from_vec(pick, n, dev)?;
        let chosen = ((&l1 * (1.0 - &pick)?)? + (&l2 * &pick)?)?;
        critic.add_grads(&(chosen.sum_all()? * (0.5 * r.vf_coef * norm))?)?;
        at += n;
    }
    let nt = n_tokens.max(1) as f64;
    let mut extra = sample_metrics(&ro.sampled);
    if !fresh {
        extra.insert("time/generation".into(), 0.0);
    }
    extra.insert("loss/policy".into(), pg / nt);
    extra.insert("loss/value".into(), vf / nt);
    extra.insert("policy/clipfrac".into(), clipped as f64 / nt);
    extra.insert("policy/approxkl".into(), approx / nt);
    extra.insert("value/clipfrac".into(), vclipped as f64 / nt);
    extra.insert("value/mean".into(), ro.values.iter().sum::<f64>() / nt);
    if !ro.kl.is_empty() {
        extra.insert("kl".into(), ro.kl.iter().sum::<f64>() / nt);
    }
    extra.insert("time/optimization".into(), t_opt.elapsed().as_secs_f64());
    Ok(Micro {
        loss: (pg + r.vf_coef * vf) / nt / t.grad_accum as f64,
        tokens: ro.seqs.iter().map(|e| e.ids.len() as u64).sum(),
        extra,
    })
}

fn add_source(rewards: &mut [f64], parts: &mut Extra, name: &str, got: &[f64]) {
    for (r, g) in rewards.iter_mut().zip(got) {
        *r += g;
    }
    parts.insert(
        name.into(),
        got.iter().sum::<f64>() / got.len().max(1) as f64,
    );
}

/// The most a reward command may print (a number a line, a line for each completion).
const MAX_REWARD_OUTPUT: usize = 16 << 20;

/// Runs the reward command once over all samples.
fn command_rewards(
    cmd: &str,
    timeout_s: f64,
    samples: &[Sample],
    prompts: &[Prompt],
) -> Result<Vec<f64>> {
    let fail = |msg: String| TrainError::Data(format!("reward.command `{cmd}`: {msg}"));
    let mut input = String::new();
    for s in samples {
        let p = &prompts[s.prompt];
        input.push_str(
            &serde_json::json!({"prompt": p.text, "completion": s.text, "row": p.row}).to_string(),
        );
        input.push('\n');
    }
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot start: {e}")))?;
    let mut stdin = child.stdin.take().ok_or_else(|| fail("no stdin".into()))?;
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    // Both pipes are read to their ends (the command never blocks on a full pipe), keeping the
    // first MAX_REWARD_OUTPUT bytes of standard output and counting the rest (a command that
    // prints without end is an error, not a buffer grown until an allocation aborts), and the last
    // 64 KiB of standard error (a Python traceback ends with the error).
    let stdout = child.stdout.take().map(|mut p| {
        std::thread::spawn(move || {
            use std::io::Read;
            let mut kept = Vec::new();
            let _ = (&mut p)
                .take(MAX_REWARD_OUTPUT as u64)
                .read_to_end(&mut kept);
            let rest = std::io::copy(&mut p, &mut std::io::sink()).unwrap_or(0);
            (kept.len() as u64 + rest, kept)
        })
    });
    let stderr = child.stderr.take().map(|mut p| {
        std::thread::spawn(move || {
            use std::io::Read;
            let (mut kept, mut chunk) = (Vec::new(), vec![0u8; 8 << 10]);
            while let Ok(n @ 1..) = p.read(&mut chunk) {
                kept.extend_from_slice(&chunk[..n]);
                if kept.len() > 128 << 10 {
                    kept.drain(..kept.len() - (64 << 10));
                }
            }
            kept
        })
    });
    let t0 = Instant::now();
    let status = loop {
        match child.try_wait().map_err(|e| fail(format!("{e}")))? {
            Some(status) => break status,
            None if t0.elapsed().as_secs_f64() > timeout_s => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!(
                    "did not finish within {timeout_s} s (reward.timeout_s); it was stopped"
                )));
            }
            None => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    };
    let _ = writer.join();
    let (printed, stdout) = stdout.and_then(|t| t.join().ok()).unwrap_or_default();
    let stderr = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    if !status.success() {
        let said = String::from_utf8_lossy(&stderr);
        let said = said.trim();
        // Its last lines (a Python traceback ends with the error).
        let mut from = said.len().saturating_sub(2000);
        while !said.is_char_boundary(from) {
            from += 1;
        }
        let tail = &said[from..];
        return Err(fail(format!(
            "{status}{}{tail}",
            if tail.is_empty() { "" } else { ":\n" }
        )));
    }
    if printed > stdout.len() as u64 {
        return Err(fail(format!(
            "printed more than {} MiB; print one number a line, one line for each completion",
            MAX_REWARD_OUTPUT >> 20
        )));
    }
    let text = String::from_utf8_lossy(&stdout);
    let got: Vec<f64> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| fail(format!("printed {l:?}, not a number")))
        })
        .collect::<Result<_>>()?;
    if got.len() != samples.len() {
        return Err(fail(format!(
            "printed {} numbers for {} completions (one line each, in order)",
            got.len(),
            samples.len()
        )));
    }
    Ok(got)
}

/// Appends the step's completions to `path` (one JSON line each).
fn write_samples(
    path: &Path,
    step: usize,
    samples: &[Sample],
    prompts: &[Prompt],
    rewards: &[f64],
    adv: &[f64],
) -> Result<()> {
    let mut text = String::new();
    for ((s, r), a) in samples.iter().zip(rewards).zip(adv) {
        let p = &prompts[s.prompt];
        let mut ids = s.ids.clone();
        ids.extend(s.stop);
        text.push_str(
            &serde_json::json!({
                "step": step, "prompt": p.text, "completion": s.text, "reward": r, "advantage": a,
                "prompt_ids": p.ids, "completion_ids": ids,
            })
            .to_string(),
        );
        text.push('\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| TrainError::io(path, e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| TrainError::io(path, e))
}

/// Keeps the logged completions of steps up to `step` (a resumed run repeats the later ones).
fn keep_samples_through(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    lmkit_core::write_atomic_bytes(path, kept.as_bytes()).map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_are_group_relative() {
        let (a, std, flat) = advantages(&[1.0, 0.0, 0.0, 2.0, 2.0, 2.0], 3, true);
        let s = (1.0f64 / 3.0).sqrt(); // std of {1, 0, 0} with n − 1
        assert!((a[0] - (2.0 / 3.0) / (s + 1e-4)).abs() < 1e-9);
        assert!((a[1] + (1.0 / 3.0) / (s + 1e-4)).abs() < 1e-9);
        assert_eq!(&a[3..], &[0.0, 0.0, 0.0]);
        assert!((std - s / 2.0).abs() < 1e-12 && flat == 0.5);
    }

    #[test]
    fn the_kl_term_and_its_derivative() {
        let (l, d, kl) = token_loss(0.5, -2.0, Some(-2.0), 0.1);
        assert_eq!((l, d, kl), (-0.5, -0.5, 0.0));
        // As a function of the policy's log-probability around the sampling one (−2), the
        // ratio exp(lp + 2) carries the advantage term.
        let f = |lp: f64| {
            let (_, _, kl) = token_loss(0.5, lp, Some(-1.0), 0.1);
            -0.5 * (lp + 2.0).exp() + 0.1 * kl
        };
        let (_, d, kl) = token_loss(0.5, -2.0, Some(-1.0), 0.1);
        assert!(kl > 0.0);
        assert!(((f(-2.0 + 1e-6) - f(-2.0 - 1e-6)) / 2e-6 - d).abs() < 1e-6);
    }

    /// GAE against the recursion written out for one sequence, and sequences kept apart.
    #[test]
    fn gae_and_whitening() {
        let (r, v) = ([0.0, 0.5, 1.0, 2.0], [0.1, 0.2, 0.3, 0.4]);
        let (g, l) = (0.9, 0.8);
        let (a, ret) = gae(&r, &v, &[(0, 3), (3, 1)], g, l);
        let d2 = 1.0 - 0.3;
        let d1 = 0.5 + g * 0.3 - 0.2;
        let d0 = 0.0 + g * 0.2 - 0.1;
        let want = [
            d0 + g * l * (d1 + g * l * d2),
            d1 + g * l * d2,
            d2,
            2.0 - 0.4,
        ];
        for i in 0..4 {
            assert!(
                (a[i] - want[i]).abs() < 1e-12,
                "{i}: {} vs {}",
                a[i],
                want[i]
            );
            assert!((ret[i] - (want[i] + v[i])).abs() < 1e-12);
        }
        let w = whiten(&[1.0, 2.0, 3.0]);
        assert!((w[0] + 1.0).abs() < 1e-6 && w[1].abs() < 1e-12 && (w[2] - 1.0).abs() < 1e-6);
        assert_eq!(whiten(&[5.0]), vec![0.0]);
    }

    /// The clipped surrogate picks the larger term, and its derivative is the chosen term's.
    #[test]
    fn the_clipped_surrogate() {
        for (a, lp, old) in [
            (1.0, -1.0, -1.5),
            (1.0, -1.5, -1.0),
            (-1.0, -1.0, -1.5),
            (-0.5, -2.0, -2.05),
        ] {
            let (l, d, clipped) = ppo_token_loss(a, lp, old, 0.2);
            let ratio: f64 = (lp - old).exp();
            assert_eq!(l, (-a * ratio).max(-a * ratio.clamp(0.8, 1.2)));
            assert_eq!(clipped, !(0.8..=1.2).contains(&ratio) && d == 0.0);
            let h = 1e-6;
            let f = |x: f64| ppo_token_loss(a, x, old, 0.2).0;
            assert!(((f(lp + h) - f(lp - h)) / (2.0 * h) - d).abs() < 1e-6);
        }
    }

    /// A reward command's numbers are read one a line; one that fails is an error with its exit
    /// status and the end of what it said, and one that prints too much an error (it was read
    /// whole, and `cat /dev/zero` aborted on allocation).
    #[test]
    fn reward_commands_print_numbers_and_their_failures_are_errors() {
        let prompts = [Prompt {
            ids: vec![1],
            text: "p".into(),
            row: serde_json::json!({"prompt": "p"}),
        }];
        let samples: Vec<Sample> = (0..2)
            .map(|i| Sample {
                prompt: 0,
                ids: vec![2],
                stop: None,
                text: format!("c{i}"),
            })
            .collect();
        let run = |cmd: &str| command_rewards(cmd, 30.0, &samples, &prompts);
        assert_eq!(
            run("cat > /dev/null; printf '1\\n0.5\\n'").unwrap(),
            [1.0, 0.5]
        );
        let e = run("cat > /dev/null; echo 1; echo 'it broke' >&2; exit 3")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("exit status: 3") && e.contains("it broke"),
            "{e}"
        );
        // The end of a long standard error is what is quoted.
        let e = run(
            "cat > /dev/null; head -c 300000 /dev/zero | tr '\\0' x >&2; echo last >&2; exit 1",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.ends_with("xxlast") && e.len() < 3000,
            "{} … {}",
            e.len(),
            &e[e.len() - 100..]
        );
        let e = run("cat > /dev/null; head -c 20000000 /dev/zero")
            .unwrap_err()
            .to_string();
        assert!(e.contains("printed more than 16 MiB"), "{e}");
    }

    #[test]
    fn the_example_config_loads_and_bad_settings_are_refused() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/grpo-lora.toml");
        let cfg = RlConfig::load(&path, &[]).unwrap();
        assert_eq!(cfg.rl.algorithm, "grpo");
        let ppo = path.with_file_name("ppo.toml");
        let cfg = RlConfig::load(&ppo, &[]).unwrap();
        assert!(cfg.rl.is_ppo() && cfg.rl.value_model.is_some());
        for bad in [
            "rl.group_size=1",
            "rl.algorithm=\"a2c\"",
            "rl.algorithm=\"ppo\"\nrl.ppo_epochs=0",
            "rl.algorithm=\"ppo\"\nrl.lam=2",
            "reward.regex=\"(\"",
            "rl.temperature=0",
            "reference=\"x\"\nrl.beta=0",
        ] {
            let overrides: Vec<String> = bad.lines().map(String::from).collect();
            assert!(RlConfig::load(&path, &overrides).is_err(), "{bad}");
        }
    }
}
