//! Online reinforcement learning (`lmkit rl`): GRPO (Shao et al. 2024, as TRL's GRPOTrainer).
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
use lmkit_infer::{Decoder, GenerateOptions, Step};
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
        if r.algorithm != "grpo" {
            return Err(bad(format!(
                "rl.algorithm = {:?}: only \"grpo\" is implemented",
                r.algorithm
            )));
        }
        if r.group_size < 2 {
            return Err(bad(
                "rl.group_size must be at least 2 (advantages compare a group's completions)"
                    .into(),
            ));
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
    let model = &tuned.model;
    let adapters = tuned.adapters.as_ref();
    let max_positions = tuned.max_positions;

    let mut micro = |step: usize, m: usize, grads: &mut Grads| -> Result<Micro> {
        // Generation: the policy as it is, without dropout.
        let t_gen = Instant::now();
        model.set_training(false);
        if let Some(a) = adapters {
            a.set_dropout_seed(None);
        }
        let k = step * t.grad_accum + m;
        let chosen = sft::batch_indices(prompts.len(), t.batch_size, k, t.seed);
        // Each prompt goes through the model once; its group continues from copies of the cache.
        let mut decoders = Vec::new();
        let mut done = Vec::new();
        for (i, &p) in chosen.iter().enumerate() {
            let opts: Vec<GenerateOptions> = (0..r.group_size)
                .map(|g| GenerateOptions {
                    max_tokens: r.max_new_tokens,
                    sampling: sampling(
                        r,
                        mix(t.seed ^ mix((k * 4096 + i * 64 + g) as u64 + 0x61e0)),
                    ),
                    stop_ids: stop_ids.clone(),
                    max_positions,
                })
                .collect();
            for (d, first) in Decoder::prefill_group(model, &prompts[p].ids, opts)
                .map_err(|e| TrainError::Data(e.to_string()))?
            {
                done.push(matches!(first, Step::Done(_)));
                decoders.push(d);
            }
        }
        lmkit_infer::finish_all(model, &mut decoders, &mut done)
            .map_err(|e| TrainError::Data(e.to_string()))?;
        let samples: Vec<Sample> = decoders
            .iter()
            .enumerate()
            .map(|(j, d)| Sample {
                prompt: chosen[j / r.group_size],
                ids: d.generated().to_vec(),
                stop: d.stopped_by(),
                text: vocab
                    .tokenizer
                    .decode(d.generated(), true)
                    .unwrap_or_default(),
            })
            .collect();
        let generation = t_gen.elapsed().as_secs_f64();

        // Rewards.
        let t_opt = Instant::now();
        let mut rewards = vec![0.0; samples.len()];
        let mut parts = Extra::new();
        if let Some(re) = &regex {
            let got: Vec<f64> = samples
                .iter()
                .map(|s| re.is_match(&s.text) as u8 as f64)
                .collect();
            add_source(&mut rewards, &mut parts, "rewards/regex", &got);
        }
        if let Some(cmd) = &cfg.reward.command {
            let got = command_rewards(cmd, cfg.reward.timeout_s, &samples, &prompts)?;
            add_source(&mut rewards, &mut parts, "rewards/command", &got);
        }
        if let Some(rm) = &reward_model {
            let mut got = Vec::with_capacity(samples.len());
            for s in &samples {
                let mut ids = prompts[s.prompt].ids.clone();
                ids.extend(&s.ids);
                ids.extend(s.stop);
                got.push(rm.score(&ids, &dev)?);
            }
            add_source(&mut rewards, &mut parts, "rewards/model", &got);
        }
        let (adv, reward_std, flat) = advantages(&rewards, r.group_size, r.scale_rewards);

        // The policy's loss, one sequence at a time.
        let seqs: Vec<Example> = samples
            .iter()
            .map(|s| {
                let p = &prompts[s.prompt].ids;
                let mut ids = p.clone();
                ids.extend(&s.ids);
                ids.extend(s.stop);
                let mut train = vec![false; p.len()];
                train.resize(ids.len(), true);
                Example { ids, train }
            })
            .collect();
        let n_tokens: usize = seqs.iter().map(|e| e.targets()).sum();
        let norm = 1.0 / (n_tokens.max(1) * t.grad_accum) as f64;
        let (mut loss, mut kl_sum) = (0.0, 0.0);
        // Sequences go through the model in passes of up to PASS_TOKENS positions: fewer passes
        // over the weights, and one pass's graph alive at a time.
        let order: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].targets() > 0).collect();
        let mut passes: Vec<Vec<usize>> = Vec::new();
        for &i in &order {
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
        for pass in &passes {
            let batch: Vec<&Example> = pass.iter().map(|&i| &seqs[i]).collect();
            let refs: Option<Vec<f32>> = match &reference {
                Reference::None => None,
                Reference::Model(rm) => Some(token_logps_value(rm, &batch, &dev)?),
                Reference::AdaptersOff(a) => {
                    a.set_enabled(false);
                    let v = token_logps_value(model, &batch, &dev);
                    a.set_enabled(true);
                    Some(v?)
                }
            };
            model.set_training(true);
            if let Some(ad) = adapters {
                let seed = t.seed ^ 0x71_0a7e ^ ((k * 4096) as u64 + 1);
                ad.set_dropout_seed(Some(mix(seed)));
            }
            // Each scored token's loss, derivative by its log-probability and KL estimate.
            let row_adv: Vec<f64> = pass
                .iter()
                .flat_map(|&i| std::iter::repeat_n(adv[i], seqs[i].targets()))
                .collect();
            let term = |row: usize, lp: f64| {
                let reference = refs.as_ref().map(|r| r[row] as f64);
                token_loss(row_adv[row], lp, reference, r.beta)
            };
            // d(loss)/d(params) = Σ d·∇lp = Σ −d·∇ce.
            let weight = |row: usize, ce: f64| -term(row, -ce).1 * norm;
            let b = sequences_batch(&batch, &dev)?;
            let values: Vec<f64> =
                match hand_scored_rows(model, &b, 1.0, Some(&weight), grads, t.backward)? {
                    Some(s) => {
                        grads.add_all(s.grads, 1.0)?;
                        s.row_losses.iter().map(|ce| -ce).collect()
                    }
                    None => {
                        let lp = token_logps(model, &batch, &dev)?;
                        let values: Vec<f64> =
                            lp.to_vec1::<f32>()?.iter().map(|&v| v as f64).collect();
                        let coef: Vec<f32> = (values.iter().enumerate())
                            .map(|(row, &v)| (term(row, v).1 * norm) as f32)
                            .collect();
                        let coef = Tensor::from_vec(coef, values.len(), &dev)?;
                        grads.backward(&(lp * coef)?.sum_all()?)?;
                        values
                    }
                };
            for (row, &v) in values.iter().enumerate() {
                let (l, _, kl) = term(row, v);
                loss += l * norm;
                kl_sum += kl;
            }
            model.set_training(false);
        }
        let optimization = t_opt.elapsed().as_secs_f64();
        write_samples(&samples_path, step + 1, &samples, &prompts, &rewards, &adv)?;

        let n = samples.len().max(1) as f64;
        let mut extra = parts;
        extra.insert("reward".into(), rewards.iter().sum::<f64>() / n);
        extra.insert("reward_std".into(), reward_std);
        extra.insert("frac_reward_zero_std".into(), flat);
        extra.insert(
            "completions/mean_length".into(),
            samples
                .iter()
                .map(|s| (s.ids.len() + s.stop.is_some() as usize) as f64)
                .sum::<f64>()
                / n,
        );
        extra.insert(
            "completions/clipped_ratio".into(),
            samples.iter().filter(|s| s.stop.is_none()).count() as f64 / n,
        );
        if r.beta > 0.0 {
            extra.insert("kl".into(), kl_sum / n_tokens.max(1) as f64);
        }
        extra.insert("time/generation".into(), generation);
        extra.insert("time/optimization".into(), optimization);
        Ok(Micro {
            loss,
            tokens: seqs.iter().map(|e| e.ids.len() as u64).sum(),
            extra,
        })
    };
    let mut evaluate = || -> Result<Option<Validation>> { Ok(None) };
    let (end, _) = output.run(t, &mut opt, from, progress, &mut micro, &mut evaluate)?;
    Ok((end.summary(n_params), report))
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
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
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
    let out = std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    let text = String::from_utf8_lossy(&out.stdout);
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

    #[test]
    fn the_example_config_loads_and_bad_settings_are_refused() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/grpo-lora.toml");
        let cfg = RlConfig::load(&path, &[]).unwrap();
        assert_eq!(cfg.rl.algorithm, "grpo");
        for bad in [
            "rl.group_size=1",
            "rl.algorithm=\"ppo\"",
            "reward.regex=\"(\"",
            "rl.temperature=0",
            "reference=\"x\"\nrl.beta=0",
        ] {
            let overrides: Vec<String> = bad.lines().map(String::from).collect();
            assert!(RlConfig::load(&path, &overrides).is_err(), "{bad}");
        }
    }
}
