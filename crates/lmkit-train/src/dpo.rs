//! Preference tuning (`lmkit dpo`): Direct Preference Optimization and its relatives on
//! prompt/chosen/rejected pairs (see [`crate::pref`]), of all parameters or of LoRA adapters.
//!
//! Losses, as TRL computes them (z is β times the policy's chosen-minus-rejected log-ratio over
//! the reference's, log-probabilities summed over the completion tokens):
//! - `sigmoid` (DPO, Rafailov et al. 2023): −(1−ε)·log σ(z) − ε·log σ(−z) (ε: label smoothing,
//!   the conservative cDPO; 0 by default);
//! - `robust` (Chowdhury et al. 2024): (−(1−ε)·log σ(z) + ε·log σ(−z)) / (1 − 2ε);
//! - `hinge` (SLiC): max(0, 1 − z);
//! - `ipo` (Azar et al. 2023): (d − 1/(2β))², d the log-ratio difference with each side's
//!   log-ratio averaged over its completion tokens;
//! - `simpo` (Meng et al. 2024, no reference): −log σ(β·(āc − ār) − γ) on the average
//!   log-probabilities, plus `sft_weight` times the chosen completions' cross-entropy;
//! - `orpo` (Hong et al. 2024, no reference): the chosen completions' cross-entropy − β·log σ of
//!   the log odds ratio of the average log-probabilities.
//!
//! The reference model's log-probabilities are computed once, before training, and kept in a
//! cache file keyed by the reference's weights and the tokenized data, so the reference is never
//! held in memory beside the policy (with LoRA the reference is the base, adapters off).

use crate::checkpoint::Start;
use crate::config::{load_tuning, TrainConfig, TuningDefaults};
use crate::error::{Result, TrainError};
use crate::finetune::{
    begin, hand_scored_rows, predicted_hidden, sequences_batch, Tuned, Tuning, Vocab,
};
use crate::metrics::Extra;
use crate::pref::Pair;
use crate::sft::{self, Example, Format, Renderer, TrainOn};
use crate::steps::{Grads, Micro, Validation};
use crate::Summary;
use candle_core::{Device, Tensor};
use lmkit_core::Progress;
use lmkit_models::layers::lora::LoraSpec;
use lmkit_models::CausalLm;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Which preference loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    #[default]
    Sigmoid,
    Robust,
    Hinge,
    Ipo,
    Simpo,
    Orpo,
    /// KTO (Ethayarajh et al. 2024) on unpaired rows `{"prompt", "completion", "label"}`.
    Kto,
}

impl LossType {
    /// Whether the loss compares the policy with a reference model.
    pub fn needs_reference(self) -> bool {
        !matches!(self, LossType::Simpo | LossType::Orpo)
    }

    /// Whether sequences are scored by their average (not summed) token log-probability.
    fn averaged(self) -> bool {
        matches!(self, LossType::Simpo | LossType::Orpo)
    }
}

/// The `[dpo]` section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DpoSpec {
    #[serde(default)]
    pub loss: LossType,
    /// How far the policy may move from the reference (DPO's β; ORPO's λ; SimPO's β).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// The assumed share of flipped labels (sigmoid, robust, simpo), in [0, 0.5).
    #[serde(default)]
    pub label_smoothing: f64,
    /// SimPO's target reward margin γ.
    #[serde(default = "default_gamma")]
    pub simpo_gamma: f64,
    /// Weight of the chosen completions' cross-entropy added to the loss (ORPO always adds it
    /// with weight 1; SimPO with this weight, CPO's `cpo_alpha`; 0 by default).
    #[serde(default)]
    pub sft_weight: f64,
    /// KTO: the weights of desirable and undesirable rows' losses.
    #[serde(default = "default_one")]
    pub desirable_weight: f64,
    #[serde(default = "default_one")]
    pub undesirable_weight: f64,
}

fn default_one() -> f64 {
    1.0
}

fn default_beta() -> f64 {
    0.1
}

fn default_gamma() -> f64 {
    0.5
}

impl Default for DpoSpec {
    fn default() -> Self {
        DpoSpec {
            loss: LossType::default(),
            beta: default_beta(),
            label_smoothing: 0.0,
            simpo_gamma: default_gamma(),
            sft_weight: 0.0,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    }
}

/// The data files of a preference run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrefDataConfig {
    /// Preference rows (JSONL or a JSON array): prompt/chosen/rejected.
    pub train: PathBuf,
    #[serde(default)]
    pub val: Option<PathBuf>,
    #[serde(default = "crate::sft::default_val_fraction")]
    pub val_fraction: f64,
    #[serde(default)]
    pub skip_bad: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DpoConfig {
    /// The policy's starting point: a Hugging Face directory, a training output, or a GGUF file
    /// (LoRA only).
    pub base: PathBuf,
    /// The reference model, when it is not the starting policy (the base, with the adapter of
    /// `adapter` if given).
    #[serde(default)]
    pub reference: Option<PathBuf>,
    pub data: PrefDataConfig,
    #[serde(default)]
    pub dpo: DpoSpec,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub lora: Option<LoraSpec>,
    #[serde(default)]
    pub adapter: Option<PathBuf>,
}

impl DpoConfig {
    /// Reads `path` with `overrides`; `[train]` fields left out take preference-tuning defaults
    /// (TRL's: learning rate 1e-6, or 5e-6 with LoRA; no weight decay; 100 steps of 4 pairs of
    /// up to 512 tokens).
    pub fn load(path: &Path, overrides: &[String]) -> Result<DpoConfig> {
        let cfg: DpoConfig = load_tuning(
            path,
            overrides,
            &TuningDefaults {
                lr: (1e-6, 5e-6),
                constant: false,
                max_steps: 100,
                batch_size: 4,
                seq_len: 512,
                eval_every: 50,
                save_every: 50,
                out_dir: "runs/dpo",
            },
        )?;
        let bad = |msg: String| TrainError::Config {
            path: path.to_path_buf(),
            msg,
        };
        crate::config::validate_tuning(
            &cfg.train,
            Some(cfg.data.val_fraction),
            cfg.lora.as_ref(),
            cfg.adapter.is_some(),
        )
        .map_err(bad)?;
        let d = &cfg.dpo;
        if !(d.beta.is_finite() && d.beta > 0.0) {
            return Err(bad("dpo.beta must be a positive number".into()));
        }
        if !(0.0..0.5).contains(&d.label_smoothing) {
            return Err(bad("dpo.label_smoothing must be in [0, 0.5)".into()));
        }
        if d.label_smoothing > 0.0
            && !matches!(
                d.loss,
                LossType::Sigmoid | LossType::Robust | LossType::Simpo
            )
        {
            return Err(bad(format!(
                "dpo.label_smoothing applies to the sigmoid, robust and simpo losses, not {:?}",
                d.loss
            )));
        }
        if !(d.simpo_gamma.is_finite() && d.sft_weight.is_finite() && d.sft_weight >= 0.0) {
            return Err(bad(
                "dpo.simpo_gamma must be a number and dpo.sft_weight a number ≥ 0".into(),
            ));
        }
        let positive = |w: f64| w.is_finite() && w > 0.0;
        if !(positive(d.desirable_weight) && positive(d.undesirable_weight)) {
            return Err(bad(
                "dpo.desirable_weight and dpo.undesirable_weight must be positive numbers".into(),
            ));
        }
        if cfg.reference.is_some() && !d.loss.needs_reference() {
            return Err(bad(format!(
                "the {:?} loss uses no reference model; leave `reference` out",
                d.loss
            )));
        }
        Ok(cfg)
    }
}

/// A pair's sequences scored: log-probability sums and completion token counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    pub chosen: f64,
    pub rejected: f64,
    pub n_chosen: usize,
    pub n_rejected: usize,
}

/// One pair's loss, its derivatives by the policy's chosen and rejected log-probability sums,
/// and the implicit rewards logged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairLoss {
    pub loss: f64,
    pub d_chosen: f64,
    pub d_rejected: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
}

pub(crate) fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// log σ(x), stable for large |x|.
pub(crate) fn log_sigmoid(x: f64) -> f64 {
    x.min(0.0) - (-x.abs()).exp().ln_1p()
}

/// log(1 − eˣ) for x < 0.
fn log1mexp(x: f64) -> f64 {
    if x > -std::f64::consts::LN_2 {
        (-x.exp_m1()).ln()
    } else {
        (-x.exp()).ln_1p()
    }
}

/// The loss of one pair: the policy's scores `policy`, the reference's `reference` (ignored by
/// the reference-free losses).
pub fn pair_loss(spec: &DpoSpec, policy: &Scored, reference: &Scored) -> PairLoss {
    let (b, eps) = (spec.beta, spec.label_smoothing);
    let (nc, nr) = (
        policy.n_chosen.max(1) as f64,
        policy.n_rejected.max(1) as f64,
    );
    // Smoothed logistic loss of z and its derivative.
    let logistic = |z: f64| {
        (
            -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z),
            sigmoid(z) - 1.0 + eps,
        )
    };
    match spec.loss {
        LossType::Sigmoid | LossType::Robust | LossType::Hinge | LossType::Ipo => {
            let lc = policy.chosen - reference.chosen;
            let lr = policy.rejected - reference.rejected;
            let (loss, dc, dr) = match spec.loss {
                LossType::Ipo => {
                    let d = lc / nc - lr / nr - 1.0 / (2.0 * b);
                    (d * d, 2.0 * d / nc, -2.0 * d / nr)
                }
                kind => {
                    let z = b * (lc - lr);
                    let (loss, dz) = match kind {
                        LossType::Sigmoid => logistic(z),
                        LossType::Robust => (
                            (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z))
                                / (1.0 - 2.0 * eps),
                            ((1.0 - eps) * (sigmoid(z) - 1.0) - eps * sigmoid(z))
                                / (1.0 - 2.0 * eps),
                        ),
                        _ => ((1.0 - z).max(0.0), if z < 1.0 { -1.0 } else { 0.0 }),
                    };
                    (loss, b * dz, -b * dz)
                }
            };
            PairLoss {
                loss,
                d_chosen: dc,
                d_rejected: dr,
                reward_chosen: b * lc,
                reward_rejected: b * lr,
            }
        }
        LossType::Simpo => {
            let (ac, ar) = (policy.chosen / nc, policy.rejected / nr);
            let z = b * (ac - ar) - spec.simpo_gamma;
            let (loss, dz) = logistic(z);
            PairLoss {
                loss,
                d_chosen: b * dz / nc,
                d_rejected: -b * dz / nr,
                reward_chosen: b * ac,
                reward_rejected: b * ar,
            }
        }
        LossType::Kto => {
            // Unpaired rows are scored by `kto_row`; a pair has no KTO loss.
            PairLoss {
                loss: 0.0,
                d_chosen: 0.0,
                d_rejected: 0.0,
                reward_chosen: 0.0,
                reward_rejected: 0.0,
            }
        }
        LossType::Orpo => {
            // Average log-probabilities are below 0; a completion the model is sure of (0)
            // is kept just below it so that its odds stay finite.
            let (ac, ar) = (
                (policy.chosen / nc).min(-1e-12),
                (policy.rejected / nr).min(-1e-12),
            );
            let log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar));
            let loss = -b * log_sigmoid(log_odds);
            let dl = b * (sigmoid(log_odds) - 1.0);
            PairLoss {
                loss,
                d_chosen: dl / (-ac.exp_m1()) / nc,
                d_rejected: -dl / (-ar.exp_m1()) / nr,
                reward_chosen: b * ac,
                reward_rejected: b * ar,
            }
        }
    }
}

/// The weight of the chosen completions' mean cross-entropy in the loss.
fn nll_weight(spec: &DpoSpec) -> f64 {
    match spec.loss {
        LossType::Orpo => 1.0,
        LossType::Simpo => spec.sft_weight,
        _ => 0.0,
    }
}

/// The derivatives of a batch's loss by a pair's chosen and rejected log-probability sums: its
/// own loss's share of the mean over `pairs`, and for the chosen side the cross-entropy term's
/// (the mean over the batch's `chosen_tokens`).
fn pair_gradient(spec: &DpoSpec, l: &PairLoss, pairs: usize, chosen_tokens: usize) -> (f64, f64) {
    let n = pairs.max(1) as f64;
    let nll = nll_weight(spec) / chosen_tokens.max(1) as f64;
    (l.d_chosen / n - nll, l.d_rejected / n)
}

/// A batch's loss (the mean over its pairs, plus the cross-entropy term) with its derivatives
/// by each sequence's log-probability sum (chosen then rejected, as `policy`), and the metrics
/// TRL logs, each the batch's mean.
fn batch_loss(spec: &DpoSpec, policy: &[Scored], reference: &[Scored]) -> (f64, Vec<f64>, Extra) {
    let k = policy.len();
    let n = k.max(1) as f64;
    let chosen_tokens: usize = policy.iter().map(|p| p.n_chosen).sum();
    let mut loss = 0.0;
    let mut d = vec![0.0; 2 * k];
    let mut m = Extra::new();
    let mut add = |name: &str, v: f64| *m.entry(name.to_string()).or_default() += v / n;
    let avg = spec.loss.averaged();
    for (i, (p, r)) in policy.iter().zip(reference).enumerate() {
        let l = pair_loss(spec, p, r);
        loss += l.loss / n;
        (d[i], d[k + i]) = pair_gradient(spec, &l, k, chosen_tokens);
        add("rewards/chosen", l.reward_chosen);
        add("rewards/rejected", l.reward_rejected);
        add("rewards/margins", l.reward_chosen - l.reward_rejected);
        add(
            "rewards/accuracies",
            (l.reward_chosen > l.reward_rejected) as u8 as f64,
        );
        let (c, rj) = if avg {
            (
                p.chosen / p.n_chosen.max(1) as f64,
                p.rejected / p.n_rejected.max(1) as f64,
            )
        } else {
            (p.chosen, p.rejected)
        };
        add("logps/chosen", c);
        add("logps/rejected", rj);
    }
    let w = nll_weight(spec);
    if w > 0.0 {
        let nll = -policy.iter().map(|p| p.chosen).sum::<f64>() / chosen_tokens.max(1) as f64;
        loss += w * nll;
        m.insert("nll_loss".into(), nll);
    }
    (loss, d, m)
}

/// Each sequence's summed cross-entropy over its scored tokens (its negative log-probability
/// sum), as graph nodes; the sequences go through the model as one padded batch.
fn sequences_ce(model: &CausalLm, seqs: &[&Example], dev: &Device) -> Result<Vec<Tensor>> {
    let b = sequences_batch(seqs, dev)?;
    let h = predicted_hidden(model, &b)?;
    let mut out = Vec::with_capacity(seqs.len());
    let mut at = 0;
    for e in seqs {
        let k = e.targets();
        out.push(crate::objective::output_loss_sum(
            model.output(),
            &h.narrow(0, at, k)?,
            &b.targets.narrow(0, at, k)?,
        )?);
        at += k;
    }
    Ok(out)
}

/// A sequence's summed cross-entropy (see [`sequences_ce`]) on its own: the graph of one
/// sequence is alive at once (a batch's holds every intermediate of all its sequences until the
/// backward pass), and no position is padding.
fn sequence_ce(model: &CausalLm, e: &Example, dev: &Device) -> Result<Tensor> {
    let mut ce = sequences_ce(model, &[e], dev)?;
    ce.pop()
        .ok_or_else(|| TrainError::Data("no sequence".into()))
}

/// A sequence's log-probability sum, without gradient.
fn sequence_logp(model: &CausalLm, e: &Example, dev: &Device) -> Result<f64> {
    Ok(-(sequence_ce(model, e, dev)?.detach().to_scalar::<f32>()? as f64))
}

/// The scores of `pairs` under `model` (no gradient).
fn score_pairs(
    model: &CausalLm,
    pairs: &[&Pair],
    dev: &Device,
    progress: &dyn Progress,
) -> Result<Vec<Scored>> {
    model.set_training(false);
    let mut out = Vec::with_capacity(pairs.len());
    progress.begin(
        "reference log-probabilities",
        pairs.len() as u64,
        lmkit_core::Unit::Items,
    );
    for p in pairs {
        out.push(Scored {
            chosen: sequence_logp(model, &p.chosen, dev)?,
            rejected: sequence_logp(model, &p.rejected, dev)?,
            n_chosen: p.chosen.targets(),
            n_rejected: p.rejected.targets(),
        });
        progress.advance(1);
    }
    progress.finish();
    Ok(out)
}

/// Where cached reference log-probabilities live: `$LMKIT_CACHE`, else `$XDG_CACHE_HOME/lmkit`,
/// else `~/.cache/lmkit`, under `reference-logps/`.
fn cache_dir() -> PathBuf {
    let root = std::env::var_os("LMKIT_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("lmkit")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lmkit")))
        .unwrap_or_else(|| PathBuf::from(".lmkit-cache"));
    root.join("reference-logps")
}

/// A fingerprint of a model's weights: the contents of its weight files and config (a
/// directory's, or a GGUF file), and of an adapter directory's.
fn fingerprint(paths: &[&Path]) -> Result<u128> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for &p in paths {
        let dir_files = |d: &Path| -> Result<Vec<PathBuf>> {
            let mut v: Vec<PathBuf> = std::fs::read_dir(d)
                .map_err(|e| TrainError::io(d, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    name.ends_with(".safetensors")
                        || name.ends_with(".gguf")
                        || name == "config.json"
                        || name == "adapter_config.json"
                })
                .collect();
            v.sort();
            Ok(v)
        };
        let files = if p.is_dir() {
            let d = lmkit_models::resolve_checkpoint(p);
            let d = if d.join("adapter_config.json").exists() || d.join("config.json").exists() {
                d
            } else {
                lmkit_models::resolve_run(p, "adapter_config.json")
            };
            dir_files(&d)?
        } else if p.is_file() {
            vec![p.to_path_buf()]
        } else {
            // (A device such as /dev/zero would be hashed without end.)
            return Err(TrainError::io(
                p,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a model directory or a GGUF file",
                ),
            ));
        };
        for f in files {
            let mut file = std::fs::File::open(&f).map_err(|e| TrainError::io(&f, e))?;
            h.update(f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or(b""));
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n =
                    std::io::Read::read(&mut file, &mut buf).map_err(|e| TrainError::io(&f, e))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        }
    }
    Ok(h.digest128())
}

/// The cache key of reference scores: the reference's fingerprint and every pair's tokens.
fn cache_key(model: u128, pairs: &[&Pair]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&model.to_le_bytes());
    for p in pairs {
        for e in [&p.chosen, &p.rejected] {
            h.update(&(e.ids.len() as u64).to_le_bytes());
            for (&id, &t) in e.ids.iter().zip(&e.train) {
                h.update(&id.to_le_bytes());
                h.update(&[t as u8]);
            }
        }
    }
    format!("{:032x}", h.digest128())
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    key: String,
    scores: Vec<Scored>,
}

/// Unpaired (KTO) rows as pairs: each row's sequence, and the same prompt with the completion
/// of the row before it within its block of `batch` rows (cyclically, as TRL pairs them for the
/// KL estimate).
fn read_unpaired(
    renderer: &Renderer,
    path: &Path,
    skip_bad: bool,
    batch: usize,
) -> Result<sft::Read<Pair>> {
    let r = sft::read_with(
        path,
        skip_bad,
        |v| renderer.unpaired(v),
        |u| u.example.targets() > 0,
    )?;
    let mut pairs = Vec::with_capacity(r.examples.len());
    for block in r.examples.chunks(batch.max(1)) {
        for (j, u) in block.iter().enumerate() {
            let before = &block[(j + block.len() - 1) % block.len()];
            let kl = renderer
                .mismatched(u, before)
                .map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))?;
            pairs.push(Pair {
                chosen: u.example.clone(),
                rejected: kl,
                margin: None,
                label: Some(u.label),
            });
        }
    }
    Ok(sft::Read {
        examples: pairs,
        bad: r.bad,
        bad_samples: r.bad_samples,
        empty: r.empty,
        truncated: r.truncated,
    })
}

/// One KTO row's loss share (of `n` rows) and its derivative by the row's log-probability sum,
/// with the batch's KL estimate `kl` (not differentiated, as TRL).
fn kto_row(spec: &DpoSpec, logratio: f64, desirable: bool, kl: f64, n: usize) -> (f64, f64) {
    let b = spec.beta;
    let n = n.max(1) as f64;
    let (z, w, sign) = if desirable {
        (b * (logratio - kl), spec.desirable_weight, 1.0)
    } else {
        (b * (kl - logratio), spec.undesirable_weight, -1.0)
    };
    let s = sigmoid(z);
    // d(1 − σ(z))/dlogratio = −σ(z)(1 − σ(z))·dz/dlogratio.
    (w * (1.0 - s) / n, -w * s * (1.0 - s) * b * sign / n)
}

/// A batch of KTO rows: its loss (gradients added with `grads`) and metrics.
fn kto_loss(
    model: &CausalLm,
    spec: &DpoSpec,
    rows: &[&Pair],
    refs: &[Scored],
    mut grads: Option<&mut Grads>,
    t: &TrainConfig,
    dev: &Device,
) -> Result<(f64, Extra, u64)> {
    let share = 1.0 / t.grad_accum as f64;
    // The KL estimate: the policy's and the reference's log-probabilities of the mismatched
    // sequences, their mean difference, at least 0.
    let (mut kl_sum, mut kl_n) = (0.0, 0usize);
    for (p, r) in rows.iter().zip(refs) {
        if p.rejected.targets() > 0 {
            kl_sum += sequence_logp(model, &p.rejected, dev)? - r.rejected;
            kl_n += 1;
        }
    }
    let kl = (kl_sum / kl_n.max(1) as f64).max(0.0);
    let n = rows.len();
    let mut loss = 0.0;
    // (reward, log-probability) of the desirable and the undesirable rows.
    let mut good: Vec<(f64, f64)> = Vec::new();
    let mut bad: Vec<(f64, f64)> = Vec::new();
    for (p, r) in rows.iter().zip(refs) {
        let desirable = p.label.unwrap_or(true);
        let logp = match grads.as_deref_mut() {
            None => sequence_logp(model, &p.chosen, dev)?,
            Some(g) => {
                let ce = sequence_ce(model, &p.chosen, dev)?;
                let logp = -(ce.to_scalar::<f32>()? as f64);
                let (_, d) = kto_row(spec, logp - r.chosen, desirable, kl, n);
                g.backward(&(ce * (-d * share))?)?;
                logp
            }
        };
        let (l, _) = kto_row(spec, logp - r.chosen, desirable, kl, n);
        loss += l;
        let side = if desirable { &mut good } else { &mut bad };
        side.push((spec.beta * (logp - r.chosen), logp));
    }
    let mean = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
        v.iter().map(f).sum::<f64>() / v.len().max(1) as f64
    };
    let mut extra = Extra::new();
    extra.insert("kl".into(), kl);
    if !good.is_empty() {
        extra.insert("rewards/chosen".into(), mean(&good, |x| x.0));
        extra.insert("logps/chosen".into(), mean(&good, |x| x.1));
    }
    if !bad.is_empty() {
        extra.insert("rewards/rejected".into(), mean(&bad, |x| x.0));
        extra.insert("logps/rejected".into(), mean(&bad, |x| x.1));
    }
    if !good.is_empty() && !bad.is_empty() {
        extra.insert(
            "rewards/margins".into(),
            mean(&good, |x| x.0) - mean(&bad, |x| x.0),
        );
    }
    let tokens = rows
        .iter()
        .map(|p| (p.chosen.ids.len() + p.rejected.ids.len()) as u64)
        .sum();
    Ok((loss * share, extra, tokens))
}

/// What `dpo` read and computed before training, for the command to report.
pub struct PrefReport {
    pub train_pairs: usize,
    pub val_pairs: usize,
    pub bad: usize,
    pub bad_samples: Vec<String>,
    pub empty: usize,
    pub truncated: usize,
    /// Where the reference log-probabilities came from (computed, or the cache file).
    pub reference: Option<String>,
}

/// Tunes per `cfg` on preference pairs (a new run, or `Start::Resume`).
pub fn dpo(
    cfg: &DpoConfig,
    start: Start,
    progress: &dyn Progress,
) -> Result<(Summary, PrefReport)> {
    let t = &cfg.train;
    let base = &cfg.base;
    let spec = &cfg.dpo;
    let dev = lmkit_models::parse_device(&t.device)?;
    let vocab = Vocab::load(base)?;
    let renderer = vocab.renderer(Format::Auto, TrainOn::Completion, t.seq_len + 1);
    let read = |p: &Path| {
        if spec.loss == LossType::Kto {
            read_unpaired(&renderer, p, cfg.data.skip_bad, t.batch_size)
        } else {
            sft::read_with(p, cfg.data.skip_bad, |v| renderer.pair(v), Pair::scorable)
        }
    };
    let sets = sft::read_sets(
        &cfg.data.train,
        cfg.data.val.as_deref(),
        cfg.data.val_fraction,
        t.seed,
        progress,
        read,
    )?;
    let mut report = PrefReport {
        train_pairs: sets.train.len(),
        val_pairs: sets.val.len(),
        bad: sets.bad,
        bad_samples: sets.bad_samples,
        empty: sets.empty,
        truncated: sets.truncated,
        reference: None,
    };
    let (train, val) = (sets.train, sets.val);
    if train.is_empty() {
        return Err(TrainError::Data(format!(
            "{}: no pair to train on ({} bad rows, {} with a side left with no completion token after cutting to train.seq_len)",
            cfg.data.train.display(),
            report.bad,
            report.empty
        )));
    }

    let what = Tuning {
        base,
        lora: cfg.lora.as_ref(),
        adapter: cfg.adapter.as_deref(),
        seed: t.seed,
        group: None,
    };
    let identity = serde_json::json!({
        "base": base.to_string_lossy(),
        "reference": cfg.reference,
        "lora": cfg.lora,
        "adapter": cfg.adapter,
        "data": cfg.data,
        "dpo": cfg.dpo,
        "seq_len": t.seq_len,
    });
    let toml_text = toml::to_string_pretty(cfg).unwrap_or_default();
    let (tuned, output, mut opt, from) =
        begin(what, t, identity, &toml_text, start, &dev, progress)?;
    let n_params: usize = opt.params.iter().map(|p| p.var.elem_count()).sum();

    // Reference scores for every pair, training then validation.
    let all: Vec<&Pair> = train.iter().chain(&val).collect();
    let reference: Vec<Scored> = if spec.loss.needs_reference() {
        let (scores, source) = reference_scores(cfg, &tuned, from.step == 0, &all, &dev, progress)?;
        report.reference = Some(source);
        scores
    } else {
        vec![Scored::default(); all.len()]
    };
    let (ref_train, ref_val) = reference.split_at(train.len());

    let model = &tuned.model;
    let adapters = tuned.adapters.as_ref();
    let mut micro = |step: usize, m: usize, grads: &mut Grads| -> Result<Micro> {
        model.set_training(true);
        if let Some(a) = adapters {
            let seed = t.seed ^ 0xd90_5eed ^ ((step * 1024 + m) as u64 + 1);
            a.set_dropout_seed(Some(lmkit_core::rng::mix(seed)));
        }
        let idx = sft::batch_indices(train.len(), t.batch_size, step * t.grad_accum + m, t.seed);
        let pairs: Vec<&Pair> = idx.iter().map(|&i| &train[i]).collect();
        let refs: Vec<Scored> = idx.iter().map(|&i| ref_train[i]).collect();
        let (loss, extra, tokens) = if spec.loss == LossType::Kto {
            kto_loss(model, spec, &pairs, &refs, Some(grads), t, &dev)?
        } else {
            pairs_loss(
                model,
                adapters.is_some(),
                spec,
                &pairs,
                &refs,
                Some(grads),
                t,
                &dev,
            )?
        };
        Ok(Micro {
            loss,
            tokens,
            extra,
        })
    };
    let mut evaluate = || -> Result<Option<Validation>> {
        if val.is_empty() {
            return Ok(None);
        }
        model.set_training(false);
        if let Some(a) = adapters {
            a.set_dropout_seed(None);
        }
        let limit = t
            .eval_batches
            .max(1)
            .saturating_mul(t.batch_size)
            .min(val.len());
        let (mut loss, mut extra, mut batches) = (0.0, Extra::new(), 0usize);
        for (k, chunk) in val[..limit].chunks(t.batch_size).enumerate() {
            let pairs: Vec<&Pair> = chunk.iter().collect();
            let at = k * t.batch_size;
            let refs = &ref_val[at..at + chunk.len()];
            let (l, e, _) = if spec.loss == LossType::Kto {
                kto_loss(model, spec, &pairs, refs, None, t, &dev)?
            } else {
                pairs_loss(model, true, spec, &pairs, refs, None, t, &dev)?
            };
            loss += l;
            for (name, v) in e {
                *extra.entry(format!("eval_{name}")).or_default() += v;
            }
            batches += 1;
        }
        for v in extra.values_mut() {
            *v /= batches as f64;
        }
        Ok(Some(Validation {
            loss: loss / batches as f64,
            extra,
        }))
    };
    let (end, _) = output.run(t, &mut opt, from, progress, &mut micro, &mut evaluate)?;
    Ok((end.summary(n_params), report))
}

/// The loss of `pairs` (against `refs`) and its metrics; with `grads`, its gradients (the
/// micro batch's share of the step's) are added. Also returns the tokens the batch held.
///
/// A pair's derivatives depend only on its own two scores (and the batch's token counts), so
/// each pair is finished before the next. With `per_sequence` (adapters) the chosen side's
/// gradient is kept while the rejected side runs, and both are added once the pair's loss is
/// known.
#[allow(clippy::too_many_arguments)]
fn pairs_loss(
    model: &CausalLm,
    per_sequence: bool,
    spec: &DpoSpec,
    pairs: &[&Pair],
    refs: &[Scored],
    mut grads: Option<&mut Grads>,
    t: &TrainConfig,
    dev: &Device,
) -> Result<(f64, Extra, u64)> {
    let tokens = pairs
        .iter()
        .map(|p| (p.chosen.ids.len() + p.rejected.ids.len()) as u64)
        .sum();
    let chosen_tokens: usize = pairs.iter().map(|p| p.chosen.targets()).sum();
    let share = 1.0 / t.grad_accum as f64;
    let mut policy = Vec::with_capacity(pairs.len());
    for (p, r) in pairs.iter().zip(refs) {
        let (n_chosen, n_rejected) = (p.chosen.targets(), p.rejected.targets());
        // The hand-written pass: each side's summed cross-entropy and its gradients, added once
        // the pair's loss gives their weights.
        if let Some(grads) = grads.as_deref_mut() {
            let hand = |e: &Example, grads: &Grads| {
                let b = sequences_batch(&[e], dev)?;
                hand_scored_rows(model, &b, 1.0, None, grads, t.backward)
            };
            if let Some(c) = hand(&p.chosen, grads)? {
                let Some(rj) = hand(&p.rejected, grads)? else {
                    return Err(TrainError::Data(
                        "the training pass took one side of a pair and not the other".into(),
                    ));
                };
                let s = Scored {
                    chosen: -c.loss(),
                    rejected: -rj.loss(),
                    n_chosen,
                    n_rejected,
                };
                let l = pair_loss(spec, &s, r);
                let (dc, dr) = pair_gradient(spec, &l, pairs.len(), chosen_tokens);
                // d(loss)/d(params) = d·∇logp = −d·∇ce.
                grads.add_all(c.grads, -dc * share)?;
                grads.add_all(rj.grads, -dr * share)?;
                policy.push(s);
                continue;
            }
        }
        let scored = match grads.as_deref_mut() {
            None => Scored {
                chosen: sequence_logp(model, &p.chosen, dev)?,
                rejected: sequence_logp(model, &p.rejected, dev)?,
                n_chosen,
                n_rejected,
            },
            // Adapters: one sequence at a time, the chosen side's (small) gradient kept while
            // the rejected side runs.
            Some(grads) if per_sequence => {
                let ce = sequence_ce(model, &p.chosen, dev)?;
                let chosen = -(ce.to_scalar::<f32>()? as f64);
                let g_chosen = grads.gradients_of(&ce)?;
                drop(ce);
                let ce = sequence_ce(model, &p.rejected, dev)?;
                let s = Scored {
                    chosen,
                    rejected: -(ce.to_scalar::<f32>()? as f64),
                    n_chosen,
                    n_rejected,
                };
                let l = pair_loss(spec, &s, r);
                let (dc, dr) = pair_gradient(spec, &l, pairs.len(), chosen_tokens);
                // d(loss)/d(params) = d·∇logp = −d·∇ce.
                grads.backward(&(ce * (-dr * share))?)?;
                grads.add_scaled(g_chosen, -dc * share)?;
                s
            }
            // All parameters: a gradient is as large as the model, so the pair's two sequences
            // go through together and one backward pass takes both.
            Some(grads) => {
                let ce = sequences_ce(model, &[&p.chosen, &p.rejected], dev)?;
                let s = Scored {
                    chosen: -(ce[0].to_scalar::<f32>()? as f64),
                    rejected: -(ce[1].to_scalar::<f32>()? as f64),
                    n_chosen,
                    n_rejected,
                };
                let l = pair_loss(spec, &s, r);
                let (dc, dr) = pair_gradient(spec, &l, pairs.len(), chosen_tokens);
                let surrogate = ((&ce[0] * (-dc * share))? + (&ce[1] * (-dr * share))?)?;
                grads.backward(&surrogate)?;
                s
            }
        };
        policy.push(scored);
    }
    let (loss, _, extra) = batch_loss(spec, &policy, refs);
    Ok((loss * share, extra, tokens))
}

/// The reference's scores of `pairs`: from the cache, or computed (and cached) with the
/// explicit reference model, with the policy itself at the start of a new run, or with the
/// starting policy loaded again.
fn reference_scores(
    cfg: &DpoConfig,
    tuned: &Tuned,
    fresh_start: bool,
    pairs: &[&Pair],
    dev: &Device,
    progress: &dyn Progress,
) -> Result<(Vec<Scored>, String)> {
    let t = &cfg.train;
    let mut sources: Vec<&Path> = Vec::new();
    match &cfg.reference {
        Some(r) => sources.push(r),
        None => {
            sources.push(&cfg.base);
            if let Some(a) = &cfg.adapter {
                sources.push(a);
            }
        }
    }
    for s in &sources {
        if !s.exists() {
            return Err(TrainError::Data(format!(
                "reference = \"{}\": no such file or directory",
                s.display()
            )));
        }
    }
    let key = cache_key(fingerprint(&sources)?, pairs);
    let file = cache_dir().join(format!("{key}.json"));
    if let Ok(text) = std::fs::read_to_string(&file) {
        if let Ok(c) = serde_json::from_str::<CacheFile>(&text) {
            if c.key == key && c.scores.len() == pairs.len() {
                return Ok((c.scores, format!("cached in {}", file.display())));
            }
        }
    }
    let scores = match &cfg.reference {
        Some(r) => {
            progress.message(&format!(
                "scoring the pairs with the reference {}",
                r.display()
            ));
            // Scored by the same code as the policy (a directory loads as a trainable model
            // does); a GGUF file keeps its weights quantized.
            let model = if lmkit_models::gguf::is_gguf(r) {
                CausalLm::load(r, dev)?.0
            } else {
                let what = Tuning {
                    base: r,
                    lora: None,
                    adapter: None,
                    seed: t.seed,
                    group: None,
                };
                crate::finetune::load_model(what, dev)?.model
            };
            score_pairs(&model, pairs, dev, progress)?
        }
        None if fresh_start => {
            // The policy before its first step is the reference (fresh adapters add nothing).
            if let Some(a) = &tuned.adapters {
                a.set_dropout_seed(None);
            }
            score_pairs(&tuned.model, pairs, dev, progress)?
        }
        None => {
            progress.message("scoring the pairs with the starting model (not in the cache)");
            let what = Tuning {
                base: &cfg.base,
                lora: cfg.lora.as_ref(),
                adapter: cfg.adapter.as_deref(),
                seed: t.seed,
                group: None,
            };
            let start = crate::finetune::load_model(what, dev)?;
            score_pairs(&start.model, pairs, dev, progress)?
        }
    };
    let saved = std::fs::create_dir_all(cache_dir()).is_ok()
        && serde_json::to_vec(&CacheFile {
            key,
            scores: scores.clone(),
        })
        .ok()
        .is_some_and(|bytes| lmkit_core::write_atomic_bytes(&file, &bytes).is_ok());
    let source = if saved {
        format!("computed, cached in {}", file.display())
    } else {
        "computed (the cache directory is not writable)".to_string()
    };
    Ok((scores, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model given as neither a directory nor a regular file (a device: `/dev/zero` was hashed
    /// without end) is an error naming it.
    #[test]
    fn a_reference_that_is_not_a_file_is_an_error() {
        let e = fingerprint(&[Path::new("/dev/null")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/dev/null") && e.contains("not a model directory or a GGUF file"),
            "{e}"
        );
    }

    fn spec(loss: LossType, eps: f64) -> DpoSpec {
        DpoSpec {
            loss,
            beta: 0.3,
            label_smoothing: eps,
            simpo_gamma: 0.4,
            sft_weight: 0.7,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    }

    #[test]
    fn derivatives_match_finite_differences() {
        let reference = Scored {
            chosen: -14.0,
            rejected: -9.5,
            n_chosen: 7,
            n_rejected: 4,
        };
        for loss in [
            LossType::Sigmoid,
            LossType::Robust,
            LossType::Hinge,
            LossType::Ipo,
            LossType::Simpo,
            LossType::Orpo,
        ] {
            let eps = if loss == LossType::Robust || loss == LossType::Sigmoid {
                0.1
            } else {
                0.0
            };
            let s = spec(loss, eps);
            for (pc, pr) in [(-12.0, -11.0), (-20.0, -3.0), (-1.5, -0.2)] {
                let p = Scored {
                    chosen: pc,
                    rejected: pr,
                    ..reference
                };
                let policy = [
                    p,
                    Scored {
                        chosen: pc - 1.0,
                        ..p
                    },
                ];
                let refs = [reference, reference];
                let (_, d, _) = batch_loss(&s, &policy, &refs);
                let h = 1e-6;
                for (i, di) in d.iter().enumerate() {
                    let bump = |delta: f64| {
                        let mut q = policy;
                        let side = &mut q[i % 2];
                        if i < 2 {
                            side.chosen += delta;
                        } else {
                            side.rejected += delta;
                        }
                        batch_loss(&s, &q, &refs).0
                    };
                    let numeric = (bump(h) - bump(-h)) / (2.0 * h);
                    assert!(
                        (numeric - di).abs() < 1e-6,
                        "{loss:?} at ({pc}, {pr}) sequence {i}: {numeric} vs {di}"
                    );
                }
            }
        }
    }

    #[test]
    fn kto_derivatives_match_finite_differences() {
        let s = DpoSpec {
            desirable_weight: 1.3,
            undesirable_weight: 0.7,
            ..spec(LossType::Kto, 0.0)
        };
        for (x, label) in [(0.4, true), (-2.0, true), (0.4, false), (3.0, false)] {
            let (_, d) = kto_row(&s, x, label, 0.25, 4);
            let h = 1e-6;
            let numeric = (kto_row(&s, x + h, label, 0.25, 4).0
                - kto_row(&s, x - h, label, 0.25, 4).0)
                / (2.0 * h);
            assert!((numeric - d).abs() < 1e-8, "{x} {label}: {numeric} vs {d}");
        }
        // Rows at the KL estimate: 1 − σ(0) = ½, weighted.
        assert!((kto_row(&s, 0.25, true, 0.25, 1).0 - 0.65).abs() < 1e-12);
    }

    #[test]
    fn dpo_starts_at_log_two_when_policy_is_reference() {
        let p = Scored {
            chosen: -5.0,
            rejected: -7.0,
            n_chosen: 3,
            n_rejected: 3,
        };
        let l = pair_loss(&spec(LossType::Sigmoid, 0.0), &p, &p);
        assert!((l.loss - std::f64::consts::LN_2).abs() < 1e-12);
        assert_eq!((l.reward_chosen, l.reward_rejected), (0.0, 0.0));
        // IPO pulls the averaged margin toward 1/(2β).
        let l = pair_loss(&spec(LossType::Ipo, 0.0), &p, &p);
        assert!((l.loss - (1.0f64 / 0.6).powi(2)).abs() < 1e-12);
        assert!(log_sigmoid(-800.0).is_finite() && log_sigmoid(800.0) == 0.0);
        assert!((log1mexp(-1e-9) - (1e-9f64).ln()).abs() < 1e-6);
    }

    #[test]
    fn the_example_config_loads_and_bad_settings_are_refused() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/dpo-lora.toml");
        let cfg = DpoConfig::load(&path, &[]).unwrap();
        assert_eq!(cfg.dpo.loss, LossType::Sigmoid);
        assert_eq!(cfg.train.weight_decay, 0.0);
        for bad in [
            "dpo.beta=0",
            "dpo.label_smoothing=0.5",
            "dpo.loss=\"nope\"",
            "reference=\"x\"\ndpo.loss=\"orpo\"",
        ] {
            let overrides: Vec<String> = bad.lines().map(String::from).collect();
            assert!(DpoConfig::load(&path, &overrides).is_err(), "{bad}");
        }
    }
}
