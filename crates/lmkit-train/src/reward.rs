//! Reward models (`lmkit reward train`, `lmkit reward score`): a causal LM with a scalar head
//! in transformers' `*ForSequenceClassification` layout (`score.weight` [1, hidden], no bias),
//! read at the last token that is not the padding token, trained on preference pairs with the
//! Bradley–Terry loss −log σ(r_chosen − r_rejected − margin) (a row's `margin` when it has one),
//! optionally plus `center_rewards_coefficient` · mean((r_chosen + r_rejected)²), as TRL's
//! RewardTrainer. Checkpoints load in transformers with `AutoModelForSequenceClassification`;
//! with `[lora]` only adapters and the head train, and checkpoints are PEFT `SEQ_CLS` adapter
//! directories (the head saved as a module, `modules_to_save = ["score"]`).

use crate::adamw::Param;
use crate::checkpoint::Start;
use crate::config::{load_tuning, TrainConfig, TuningDefaults};
use crate::dpo::PrefDataConfig;
use crate::error::{Result, TrainError};
use crate::finetune::{load_variables, Output, Tuned, Vocab};
use crate::metrics::Extra;
use crate::pref::Pair;
use crate::sft::{self, Example, Format, TrainOn};
use crate::steps::{Grads, Micro, Validation};
use crate::Summary;
use candle_core::{Device, IndexOp, Tensor, Var};
use lmkit_core::rng::{mix, MixChain, Random};
use lmkit_core::Progress;
use lmkit_models::layers::lora::{Adapters, LoraSpec};
use lmkit_models::{CausalLm, ModelConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The `[reward]` section.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    /// Pulls the rewards toward 0 (Eisenstein et al. 2023): this times mean((r_c + r_r)²).
    #[serde(default)]
    pub center_rewards_coefficient: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// The model the reward model starts from: a causal LM directory (its output layer is
    /// replaced by the scalar head) or a reward model to train further.
    pub base: PathBuf,
    pub data: PrefDataConfig,
    #[serde(default)]
    pub reward: RewardSpec,
    /// LoRA adapters on the base (frozen) instead of training every parameter.
    #[serde(default)]
    pub lora: Option<LoraSpec>,
    #[serde(default)]
    pub train: TrainConfig,
}

impl RewardConfig {
    /// Reads `path` with `overrides`; `[train]` fields left out take TRL's reward defaults
    /// (learning rate 1e-5 constant, no weight decay, 100 steps of 4 pairs of up to 512 tokens).
    pub fn load(path: &Path, overrides: &[String]) -> Result<RewardConfig> {
        let cfg: RewardConfig = load_tuning(
            path,
            overrides,
            &TuningDefaults {
                lr: (1e-5, 1e-5),
                constant: true,
                max_steps: 100,
                batch_size: 4,
                seq_len: 512,
                eval_every: 50,
                save_every: 50,
                out_dir: "runs/reward",
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
            false,
        )
        .map_err(bad)?;
        if let Some(c) = cfg.reward.center_rewards_coefficient {
            if !(c.is_finite() && c >= 0.0) {
                return Err(bad(
                    "reward.center_rewards_coefficient must be a number ≥ 0".into(),
                ));
            }
        }
        Ok(cfg)
    }
}

/// A reward model: the causal LM's final hidden states, read at the last non-padding token
/// through the scalar head.
pub struct RewardModel {
    pub model: CausalLm,
    /// [1, hidden].
    pub score: Tensor,
    /// The padding token (transformers reads the reward at the last token that is not it).
    pub pad: Option<u32>,
}

impl RewardModel {
    /// The reward of token ids `ids` (one sequence), as a graph node.
    pub fn reward(&self, ids: &[u32], dev: &Device) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(TrainError::Data("an empty sequence has no reward".into()));
        }
        let at = match self.pad {
            Some(p) => ids.iter().rposition(|&i| i != p).unwrap_or(ids.len() - 1),
            None => ids.len() - 1,
        };
        let x = Tensor::new(&ids[..=at], dev)?.unsqueeze(0)?;
        let mut cache = self.model.single_pass_cache();
        let h = self.model.hidden(&x, &mut cache)?.i((0, at))?;
        Ok(h.unsqueeze(0)?
            .matmul(&self.score.t()?)?
            .flatten_all()?
            .sum_all()?)
    }

    /// The reward of `ids` as a number.
    pub fn score(&self, ids: &[u32], dev: &Device) -> Result<f64> {
        Ok(self.reward(ids, dev)?.detach().to_scalar::<f32>()? as f64)
    }

    /// Loads a reward model directory (or training output) for scoring: its config.json must
    /// name a `*ForSequenceClassification` architecture with one label (a causal LM would get a
    /// random head).
    pub fn load(dir: &Path, dev: &Device) -> Result<RewardModel> {
        let adapter = lmkit_models::resolve_run(dir, "adapter_config.json");
        if adapter.join("adapter_config.json").is_file() {
            return load_adapter_reward(&adapter, dev);
        }
        let dir = &lmkit_models::resolve_checkpoint(dir);
        let path = dir.join("config.json");
        let cfg: serde_json::Value = std::fs::read_to_string(&path)
            .map_err(|e| TrainError::io(&path, e))
            .and_then(|t| {
                serde_json::from_str(&t)
                    .map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))
            })?;
        let arch = cfg
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .unwrap_or("");
        let labels = cfg
            .get("id2label")
            .and_then(|l| l.as_object())
            .map_or(1, |l| l.len());
        if !arch.ends_with("ForSequenceClassification") || labels != 1 {
            return Err(TrainError::Data(format!(
                "{}: not a reward model (architectures {arch:?}, {labels} labels); train one with `lmkit reward train`",
                path.display()
            )));
        }
        let (m, _, _) = load_reward(dir, 0, dev)?;
        Ok(m)
    }
}

/// A reward model kept as a PEFT `SEQ_CLS` adapter directory: its base (named by
/// `base_model_name_or_path`) with the adapters and the saved `score` head.
fn load_adapter_reward(dir: &Path, dev: &Device) -> Result<RewardModel> {
    let adapters = Adapters::load(dir, dev)?;
    let cfg_path = dir.join("adapter_config.json");
    if adapters.task_type() != "SEQ_CLS" {
        return Err(TrainError::Data(format!(
            "{}: not a reward model adapter (task_type {}, not SEQ_CLS); train one with `lmkit reward train` and a [lora] section",
            cfg_path.display(),
            adapters.task_type()
        )));
    }
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| TrainError::io(&cfg_path, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| TrainError::Data(format!("{}: {e}", cfg_path.display())))?;
    let Some(base) = json.get("base_model_name_or_path").and_then(|b| b.as_str()) else {
        return Err(TrainError::Data(format!(
            "{}: base_model_name_or_path is missing (the base the adapters were trained on)",
            cfg_path.display()
        )));
    };
    let base = PathBuf::from(base);
    if !base.exists() {
        return Err(TrainError::Data(format!(
            "{}: its base {} does not exist",
            cfg_path.display(),
            base.display()
        )));
    }
    let score = adapters.claim_saved("score", || {
        candle_core::bail!("a loaded adapter set reads its head from its file")
    })?;
    let (model, _) = adapters.build(|| CausalLm::load(&base, dev))?;
    Ok(RewardModel {
        model,
        score,
        pad: base_pad(&base),
    })
}

/// The padding token of a base model (directory or GGUF file).
fn base_pad(base: &Path) -> Option<u32> {
    let config =
        std::fs::read_to_string(lmkit_models::resolve_checkpoint(base).join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null);
    pad_id(&config, Vocab::load(base).ok().as_ref())
}

/// A new reward head [1, hidden]: normal, σ = 0.02 as transformers initialises it, drawn from
/// `seed`.
fn new_score(hidden: usize, seed: u64, dev: &Device) -> candle_core::Result<Tensor> {
    let std = 0.02;
    let mut rng = MixChain::new(mix(seed ^ 0x5c04e));
    let w: Vec<f32> = (0..hidden).map(|_| (rng.normal() * std) as f32).collect();
    Tensor::from_vec(w, (1, hidden), dev)
}

/// A causal LM `base` with new LoRA adapters and a new reward head saved with them, and the
/// base's positions.
pub(crate) fn load_lora_reward(
    base: &Path,
    spec: &LoraSpec,
    seed: u64,
    dev: &Device,
) -> Result<(RewardModel, Vec<Param>, Adapters, usize)> {
    let adapters = Adapters::fresh(spec.clone(), seed, dev);
    adapters.set_task_type("SEQ_CLS");
    let (model, dcfg) = adapters.build(|| CausalLm::load(base, dev))?;
    let score = adapters.claim_saved("score", || new_score(dcfg.hidden_size(), seed, dev))?;
    let params = crate::finetune::adapter_params(&adapters);
    let rm = RewardModel {
        model,
        score,
        pad: base_pad(base),
    };
    Ok((rm, params, adapters, dcfg.max_positions()))
}

/// The padding token id: config.json's `pad_token_id`, else the tokenizer's padding token.
fn pad_id(config: &serde_json::Value, vocab: Option<&Vocab>) -> Option<u32> {
    if let Some(p) = config.get("pad_token_id").and_then(|v| v.as_u64()) {
        return Some(p as u32);
    }
    let tk = &vocab?.tokenizer;
    tk.get_padding()
        .map(|p| p.pad_id)
        .or_else(|| tk.token_to_id(lmkit_core::tokens::PAD))
}

/// Loads `base` as a reward model with trainable variables: a reward model's own head, or a
/// new one (normal, σ = 0.02 as transformers initialises it, drawn from `seed`) on a causal
/// LM. Returns the model, its parameters (the output layer of a causal LM is left out: it is
/// not used) and config.json rewritten for `*ForSequenceClassification`.
pub(crate) fn load_reward(
    base: &Path,
    seed: u64,
    dev: &Device,
) -> Result<(RewardModel, Vec<Param>, serde_json::Value)> {
    if lmkit_models::gguf::is_gguf(base) {
        return Err(TrainError::Data(format!(
            "{}: a reward model trains every parameter; give a Hugging Face directory (a GGUF base is for LoRA)",
            base.display()
        )));
    }
    let score_var = std::cell::RefCell::new(None::<Var>);
    let v = load_variables(
        base,
        dev,
        |vm, dcfg| {
            let var = Var::from_tensor(&new_score(dcfg.hidden_size(), seed, dev)?)?;
            vm.data()
                .lock()
                .map_err(|_| TrainError::Data("variable map lock poisoned".into()))?
                .insert("score.weight".into(), var.clone());
            *score_var.borrow_mut() = Some(var);
            Ok(())
        },
        &["score.weight", "lm_head.weight"],
    )?;
    let score = score_var
        .into_inner()
        .ok_or_else(|| TrainError::Data("the reward head was not made".into()))?;
    let mcfg = ModelConfig::from_decoder(&v.dcfg);
    let tied =
        v.vm.data()
            .lock()
            .map(|d| !d.contains_key("lm_head.weight"))
            .unwrap_or(true);
    let params: Vec<Param> = crate::init::params(&v.vm, &mcfg)?
        .into_iter()
        .filter(|p| tied || p.name != "lm_head.weight")
        .collect();
    let mut config = v.config_json;
    let arch = config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .unwrap_or("")
        .to_string();
    let family = arch
        .strip_suffix("ForCausalLM")
        .or_else(|| arch.strip_suffix("LMHeadModel"))
        .or_else(|| arch.strip_suffix("ForSequenceClassification"));
    let family = match family {
        Some(f) => f.to_string(),
        None => {
            return Err(TrainError::Data(format!(
            "{}: config.json's architectures ({arch:?}) names no causal LM to put a reward head on",
            base.display()
        )))
        }
    };
    let vocab = Vocab::load(base).ok();
    let pad = pad_id(&config, vocab.as_ref());
    if let Some(o) = config.as_object_mut() {
        o.insert(
            "architectures".into(),
            serde_json::json!([format!("{family}ForSequenceClassification")]),
        );
        o.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
        o.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
        if let Some(p) = pad {
            o.insert("pad_token_id".into(), serde_json::json!(p));
        }
    }
    let model = RewardModel {
        model: v.model,
        score: score.as_tensor().clone(),
        pad,
    };
    Ok((model, params, config))
}

/// A pair's Bradley–Terry loss share (of a batch of `n` pairs) and its derivatives by the two
/// rewards.
fn pair_loss(rc: f64, rr: f64, margin: f64, center: f64, n: usize) -> (f64, f64, f64) {
    let n = n.max(1) as f64;
    let z = rc - rr - margin;
    let (ls, s) = (crate::dpo::log_sigmoid(z), crate::dpo::sigmoid(z));
    let c = (rc + rr) * (rc + rr);
    let dc = 2.0 * center * (rc + rr);
    let loss = (-ls + center * c) / n;
    (loss, (s - 1.0 + dc) / n, (1.0 - s + dc) / n)
}

/// What `reward train` read, for the command to report.
pub struct RewardReport {
    pub train_pairs: usize,
    pub val_pairs: usize,
    pub bad: usize,
    pub bad_samples: Vec<String>,
    pub truncated: usize,
}

/// Trains a reward model per `cfg`.
pub fn train(
    cfg: &RewardConfig,
    start: Start,
    progress: &dyn Progress,
) -> Result<(Summary, RewardReport)> {
    let t = &cfg.train;
    let dev = lmkit_models::parse_device(&t.device)?;
    let vocab = Vocab::load(&cfg.base)?;
    // Whole sequences (prompt and completion), cut to train.seq_len.
    let r = vocab.renderer(Format::Auto, TrainOn::Completion, t.seq_len);
    let read = |p: &Path| sft::read_with(p, cfg.data.skip_bad, |v| r.pair(v), Pair::scorable);
    let sets = sft::read_sets(
        &cfg.data.train,
        cfg.data.val.as_deref(),
        cfg.data.val_fraction,
        t.seed,
        progress,
        read,
    )?;
    if sets.train.is_empty() {
        return Err(TrainError::Data(format!(
            "{}: no pair to train on ({} bad rows)",
            cfg.data.train.display(),
            sets.bad
        )));
    }
    let report = RewardReport {
        train_pairs: sets.train.len(),
        val_pairs: sets.val.len(),
        bad: sets.bad,
        bad_samples: sets.bad_samples,
        truncated: sets.truncated,
    };
    let (train, val) = (sets.train, sets.val);
    if dev.is_cpu() {
        crate::cpu_products(t, progress);
    }
    let (rm, params, config, adapters, max_positions) = match &cfg.lora {
        Some(spec) => {
            let (rm, params, adapters, max) = load_lora_reward(&cfg.base, spec, t.seed, &dev)?;
            (rm, params, None, Some(adapters), Some(max))
        }
        None => {
            let (rm, params, config) = load_reward(&cfg.base, t.seed, &dev)?;
            (rm, params, Some(config), None, None)
        }
    };
    let max_positions = match max_positions {
        Some(m) => m,
        None => lmkit_models::DecoderConfig::load(
            &lmkit_models::resolve_checkpoint(&cfg.base).join("config.json"),
        )?
        .max_positions(),
    };
    if t.seq_len > max_positions {
        return Err(TrainError::Data(format!(
            "train.seq_len ({}) exceeds the model's positions ({max_positions})",
            t.seq_len
        )));
    }
    let identity = serde_json::json!({
        "base": cfg.base.to_string_lossy(),
        "data": cfg.data,
        "reward": cfg.reward,
        "lora": cfg.lora,
        "seq_len": t.seq_len,
    });
    crate::init::check_step_tokens(
        &rm.model,
        2.0 * t.batch_size as f64,
        t.seq_len,
        &format!("train.batch_size ({}) pairs", t.batch_size),
    )?;
    let tuned = Tuned {
        model: rm.model,
        base: cfg.base.clone(),
        max_positions,
        params: Vec::new(),
        adapters,
        config_json: config,
    };
    let toml_text = toml::to_string_pretty(cfg).unwrap_or_default();
    let (output, mut opt, from) = Output::open(
        &tuned, params, t, identity, start, &toml_text, &dev, progress,
    )?;
    let n_params: usize = opt.params.iter().map(|p| p.var.elem_count()).sum();
    let rm = RewardModel {
        model: tuned.model,
        score: rm.score,
        pad: rm.pad,
    };
    let center = cfg.reward.center_rewards_coefficient.unwrap_or(0.0);
    let share = 1.0 / t.grad_accum as f64;

    // The loss of `pairs` and its metrics, with gradients when given `grads`; a pair's
    // chosen-side gradient is kept while its rejected side runs (one sequence's graph at once).
    let batch = |pairs: &[&Pair], mut grads: Option<&mut Grads>| -> Result<(f64, Extra)> {
        let n = pairs.len();
        let (mut loss, mut rewards) = (0.0, Vec::with_capacity(2 * n));
        let (mut correct, mut margin) = (0.0, 0.0);
        for p in pairs {
            let m = p.margin.unwrap_or(0.0);
            let (rc, rr) = match grads.as_deref_mut() {
                None => (
                    rm.score(&p.chosen.ids, &dev)?,
                    rm.score(&p.rejected.ids, &dev)?,
                ),
                Some(g) => {
                    let c = rm.reward(&p.chosen.ids, &dev)?;
                    let rc = c.to_scalar::<f32>()? as f64;
                    let gc = g.gradients_of(&c)?;
                    drop(c);
                    let r = rm.reward(&p.rejected.ids, &dev)?;
                    let rr = r.to_scalar::<f32>()? as f64;
                    let (_, dc, dr) = pair_loss(rc, rr, m, center, n);
                    g.backward(&(r * (dr * share))?)?;
                    g.add_scaled(gc, dc * share)?;
                    (rc, rr)
                }
            };
            loss += pair_loss(rc, rr, m, center, n).0;
            correct += (rc > rr) as u8 as f64 / n as f64;
            margin += (rc - rr) / n as f64;
            rewards.extend([rc, rr]);
        }
        let mut extra = Extra::new();
        extra.insert("accuracy".into(), correct);
        extra.insert("margin".into(), margin);
        extra.insert(
            "mean_reward".into(),
            rewards.iter().sum::<f64>() / rewards.len().max(1) as f64,
        );
        extra.insert(
            "min_reward".into(),
            rewards.iter().cloned().fold(f64::INFINITY, f64::min),
        );
        extra.insert(
            "max_reward".into(),
            rewards.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        );
        Ok((loss, extra))
    };
    let mut micro = |step: usize, m: usize, grads: &mut Grads| -> Result<Micro> {
        let idx = sft::batch_indices(train.len(), t.batch_size, step * t.grad_accum + m, t.seed);
        let pairs: Vec<&Pair> = idx.iter().map(|&i| &train[i]).collect();
        let (loss, extra) = batch(&pairs, Some(grads))?;
        Ok(Micro {
            loss: loss * share,
            tokens: pairs
                .iter()
                .map(|p| (p.chosen.ids.len() + p.rejected.ids.len()) as u64)
                .sum(),
            extra,
        })
    };
    let mut evaluate = || -> Result<Option<Validation>> {
        if val.is_empty() {
            return Ok(None);
        }
        let limit = t
            .eval_batches
            .max(1)
            .saturating_mul(t.batch_size)
            .min(val.len());
        let pairs: Vec<&Pair> = val[..limit].iter().collect();
        let (loss, extra) = batch(&pairs, None)?;
        Ok(Some(Validation {
            loss,
            extra: extra
                .into_iter()
                .map(|(k, v)| (format!("eval_{k}"), v))
                .collect(),
        }))
    };
    let (end, _) = output.run(t, &mut opt, from, progress, &mut micro, &mut evaluate)?;
    Ok((end.summary(n_params), report))
}

/// A scored row: a pair's two rewards, or one sequence's.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Scores {
    Pair { chosen: f64, rejected: f64 },
    One { reward: f64 },
}

/// Scores the rows of `input` with the reward model `model`: preference rows
/// (prompt/chosen/rejected) give both rewards, other rows (prompt/completion, messages, text)
/// one. Rows are cut to `max_tokens`.
pub fn score_file(
    model: &Path,
    input: &Path,
    max_tokens: usize,
    progress: &dyn Progress,
) -> Result<Vec<Scores>> {
    let dev = Device::Cpu;
    // A training output: its latest checkpoint (a model directory or a PEFT adapter one, both
    // holding the tokenizer).
    let adapter = lmkit_models::resolve_run(model, "adapter_config.json");
    let model = &if adapter.join("adapter_config.json").is_file() {
        adapter
    } else {
        lmkit_models::resolve_checkpoint(model)
    };
    let vocab = Vocab::load(model)?;
    let rm = RewardModel::load(model, &dev)?;
    let r = vocab.renderer(Format::Auto, TrainOn::Prompt, max_tokens);
    let (rows, what) = sft::read_rows(input)?;
    progress.begin("scoring", rows.len() as u64, lmkit_core::Unit::Items);
    let mut out = Vec::with_capacity(rows.len());
    for (line, row) in rows {
        let row =
            row.map_err(|e| TrainError::Data(format!("{}:{what} {line}: {e}", input.display())))?;
        let bad = |e: String| TrainError::Data(format!("{}:{what} {line}: {e}", input.display()));
        let is_pair = row.get("chosen").is_some() && row.get("rejected").is_some();
        let scores = if is_pair {
            let (p, _) = r.pair(&row).map_err(bad)?;
            Scores::Pair {
                chosen: rm.score(&p.chosen.ids, &dev)?,
                rejected: rm.score(&p.rejected.ids, &dev)?,
            }
        } else {
            let (e, _): (Example, bool) = r.example(&row).map_err(bad)?;
            Scores::One {
                reward: rm.score(&e.ids, &dev)?,
            }
        };
        out.push(scores);
        progress.advance(1);
    }
    progress.finish();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bradley_terry_derivatives_match_finite_differences() {
        for (rc, rr, m, c) in [
            (0.3, -0.2, 0.0, 0.0),
            (-2.0, 1.5, 0.5, 0.01),
            (9.0, -9.0, 1.0, 0.1),
        ] {
            let (_, dc, dr) = pair_loss(rc, rr, m, c, 3);
            let h = 1e-6;
            let nc =
                (pair_loss(rc + h, rr, m, c, 3).0 - pair_loss(rc - h, rr, m, c, 3).0) / (2.0 * h);
            let nr =
                (pair_loss(rc, rr + h, m, c, 3).0 - pair_loss(rc, rr - h, m, c, 3).0) / (2.0 * h);
            assert!(
                (nc - dc).abs() < 1e-7 && (nr - dr).abs() < 1e-7,
                "{rc} {rr}: {nc} {dc} {nr} {dr}"
            );
        }
        // Equal rewards: log 2.
        assert!((pair_loss(1.0, 1.0, 0.0, 0.0, 1).0 - std::f64::consts::LN_2).abs() < 1e-12);
    }

    #[test]
    fn the_example_config_loads_and_bad_settings_are_refused() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/reward.toml");
        let cfg = RewardConfig::load(&path, &[]).unwrap();
        assert_eq!((cfg.train.lr, cfg.train.weight_decay), (1e-5, 0.0));
        assert!(cfg.lora.is_none());
        let cfg = RewardConfig::load(&path, &["lora.r=4".into()]).unwrap();
        assert_eq!(cfg.lora.map(|l| l.r), Some(4));
        let err = RewardConfig::load(&path, &["lora.r=0".into()]).unwrap_err();
        assert!(err.to_string().contains("lora.r"), "{err}");
        assert!(
            RewardConfig::load(&path, &["reward.center_rewards_coefficient=-1".into()]).is_err()
        );
    }
}
