//! Run configuration: a TOML file (`lmkit train --config run.toml`) whose every field can be
//! overridden on the command line with `--set section.field=value`.

use crate::error::{Result, TrainError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The model as a Hugging Face config (`model_type = "gpt2"` or `"llama"` plus its fields);
    /// `vocab_size` defaults to the tokenizer's.
    pub model: toml::Table,
    pub data: DataConfig,
    #[serde(default)]
    pub train: TrainConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Directory of training token shards (`lmkit tokenizer encode --shards`).
    pub train: PathBuf,
    /// Validation shards; by default the last `val_fraction` of the training stream is held out.
    #[serde(default)]
    pub val: Option<PathBuf>,
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// Tokenizer directory or tokenizer.json, copied into every checkpoint.
    pub tokenizer: PathBuf,
}

fn default_val_fraction() -> f64 {
    0.02
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub out_dir: PathBuf,
    pub seq_len: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub max_steps: usize,
    /// Stop (with a checkpoint) after this many seconds.
    pub max_time: Option<f64>,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this (0: off).
    pub grad_clip: f64,
    pub seed: u64,
    pub eval_every: usize,
    pub eval_batches: usize,
    pub save_every: usize,
    pub log_every: usize,
    /// Checkpoints kept (oldest removed first).
    pub keep_checkpoints: usize,
    /// Where to train: cpu, cuda or cuda:N (cuda needs a build with --features cuda).
    pub device: String,
    /// How gradients are computed: "auto" (a hand-written pass where the model has one on
    /// this device, the autograd graph elsewhere) or "autograd" (always the graph).
    pub backward: crate::passes::Backward,
    /// On a CUDA device, f32 matrix products on the tensor cores in TF32 (10-bit mantissa inputs,
    /// f32 accumulation), as PyTorch's `allow_tf32`; false for full f32 products.
    pub tf32: bool,
    /// The products' precision: "f32" (with `tf32`), or "bf16" — on a CUDA device, the
    /// hand-written passes' products on the bf16 tensor cores (inputs rounded to bf16, f32
    /// accumulation) while weights, optimizer state, activations and gradients stay f32; on the
    /// CPU, where it has AMX tiles, the linear layers' and output layer's products the same way
    /// (`lmkit_kernels::blas::set_bf16_products`).
    pub dtype: Precision,
}

/// `train.dtype`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            out_dir: PathBuf::from("runs/gpt"),
            seq_len: 128,
            batch_size: 16,
            grad_accum: 1,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 50,
            max_steps: 1000,
            max_time: None,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            seed: 0,
            eval_every: 100,
            eval_batches: 8,
            save_every: 100,
            log_every: 10,
            keep_checkpoints: 2,
            device: "cpu".into(),
            backward: crate::passes::Backward::Auto,
            tf32: true,
            dtype: Precision::F32,
        }
    }
}

impl RunConfig {
    /// Reads `path` and applies `overrides` (`section.field=value`, value in TOML syntax; bare
    /// words are taken as strings).
    pub fn load(path: &Path, overrides: &[String]) -> Result<RunConfig> {
        let cfg: RunConfig = load_toml(path, overrides, |_| {})?;
        cfg.validate().map_err(|msg| TrainError::Config {
            path: path.to_path_buf(),
            msg,
        })?;
        Ok(cfg)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        validate_train(&self.train)?;
        if !(0.0..0.5).contains(&self.data.val_fraction) {
            return Err("data.val_fraction must be in [0, 0.5)".into());
        }
        Ok(())
    }
}

/// Reads the TOML file `path`, lets `defaults` fill in the table, applies `overrides`
/// (`section.field=value`) and deserializes; errors name the file.
pub(crate) fn load_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    overrides: &[String],
    defaults: impl FnOnce(&mut toml::Table),
) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let bad = |msg: String| TrainError::Config {
        path: path.to_path_buf(),
        msg,
    };
    let mut value: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| bad(e.to_string()))?;
    for o in overrides {
        apply_override(&mut value, o).map_err(bad)?;
    }
    defaults(&mut value);
    toml::Value::Table(value)
        .try_into()
        .map_err(|e: toml::de::Error| bad(e.to_string()))
}

/// The `[train]` values a tuning command (fine-tuning, preference tuning, RL) gives the fields
/// its config leaves out; the rest of its defaults are shared: no warmup, no weight decay,
/// β₂ 0.999.
pub(crate) struct TuningDefaults {
    /// The learning rate when every parameter trains, and when adapters do.
    pub lr: (f64, f64),
    /// A constant learning rate (min_lr = lr) instead of a decay to 0.
    pub constant: bool,
    pub max_steps: i64,
    pub batch_size: i64,
    pub seq_len: i64,
    pub eval_every: i64,
    pub save_every: i64,
    pub out_dir: &'static str,
}

/// Reads a tuning config (see [`load_toml`]) with `d`'s defaults for `[train]`.
pub(crate) fn load_tuning<T: serde::de::DeserializeOwned>(
    path: &Path,
    overrides: &[String],
    d: &TuningDefaults,
) -> Result<T> {
    load_toml(path, overrides, |table| {
        let adapters = table.contains_key("lora") || table.contains_key("adapter");
        let train = table
            .entry("train")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(train) = train.as_table_mut() else {
            return;
        };
        let lr = toml::Value::Float(if adapters { d.lr.1 } else { d.lr.0 });
        let lr = train.entry("lr").or_insert(lr).clone();
        let min_lr = if d.constant {
            lr
        } else {
            toml::Value::Float(0.0)
        };
        for (k, v) in [
            ("min_lr", min_lr),
            ("warmup_steps", toml::Value::Integer(0)),
            ("weight_decay", toml::Value::Float(0.0)),
            ("beta2", toml::Value::Float(0.999)),
            ("max_steps", toml::Value::Integer(d.max_steps)),
            ("batch_size", toml::Value::Integer(d.batch_size)),
            ("seq_len", toml::Value::Integer(d.seq_len)),
            ("eval_every", toml::Value::Integer(d.eval_every)),
            ("save_every", toml::Value::Integer(d.save_every)),
            ("out_dir", toml::Value::String(d.out_dir.into())),
        ] {
            train.entry(k).or_insert(v);
        }
    })
}

/// The checks every tuning config shares: `[train]`, the held-out share (when the data has
/// one), and `[lora]` (which excludes `adapter`).
pub(crate) fn validate_tuning(
    t: &TrainConfig,
    val_fraction: Option<f64>,
    lora: Option<&lmkit_models::layers::lora::LoraSpec>,
    adapter: bool,
) -> std::result::Result<(), String> {
    validate_train(t)?;
    if t.dtype == Precision::Bf16 && t.device.starts_with("cuda") {
        // The tuning commands' GPU products are f32: refused rather than silently not applied.
        return Err(format!(
            "train.dtype = \"bf16\" on {} applies to `lmkit train` only; fine-tuning, DPO, RL \
             and reward training run a GPU's products in f32 (bf16 on the CPU needs AMX tiles): \
             remove train.dtype",
            t.device
        ));
    }
    if val_fraction.is_some_and(|v| !(0.0..0.5).contains(&v)) {
        return Err("data.val_fraction must be in [0, 0.5)".into());
    }
    if let Some(l) = lora {
        l.validate()?;
        if adapter {
            return Err(
                "give [lora] (new adapters) or adapter = DIR (continue one), not both".into(),
            );
        }
    }
    Ok(())
}

/// Checks the `[train]` section's values.
pub(crate) fn validate_train(t: &TrainConfig) -> std::result::Result<(), String> {
    for (name, v) in [
        ("train.seq_len", t.seq_len),
        ("train.batch_size", t.batch_size),
        ("train.grad_accum", t.grad_accum),
        ("train.max_steps", t.max_steps),
    ] {
        if v == 0 {
            return Err(format!("{name} must be at least 1"));
        }
    }
    if !(t.lr > 0.0 && t.lr.is_finite() && t.min_lr >= 0.0 && t.min_lr <= t.lr) {
        return Err(format!(
            "need 0 ≤ train.min_lr ({}) ≤ train.lr ({}) and lr > 0, finite",
            t.min_lr, t.lr
        ));
    }
    // As PyTorch's AdamW checks its own; grad_clip 0 turns clipping off.
    for (name, v) in [
        ("train.weight_decay", t.weight_decay),
        ("train.eps", t.eps),
        ("train.grad_clip", t.grad_clip),
    ] {
        if !(v >= 0.0 && v.is_finite()) {
            return Err(format!("{name} must be a finite number ≥ 0, not {v}"));
        }
    }
    if let Some(m) = t.max_time.filter(|m| m.is_nan() || *m <= 0.0) {
        return Err(format!(
            "train.max_time must be a number of seconds > 0, not {m} (leave it out for no limit)"
        ));
    }
    if !(0.0..1.0).contains(&t.beta1) || !(0.0..1.0).contains(&t.beta2) {
        return Err("train.beta1 and train.beta2 must be in [0, 1)".into());
    }
    if t.dtype == Precision::Bf16 && !t.device.starts_with("cuda") && !bf16_on_this_cpu() {
        return Err(format!(
            "train.dtype = \"bf16\" on {} runs the products on AMX tiles (Intel Xeon from \
             Sapphire Rapids on), which this CPU, its kernel or LMKIT_SIMD does not give: remove \
             train.dtype to train in f32, or set train.device = \"cuda\"",
            t.device
        ));
    }
    Ok(())
}

/// Whether this process can run bf16 products on the CPU (a test may pretend it cannot).
fn bf16_on_this_cpu() -> bool {
    #[cfg(test)]
    if tests::NO_AMX.with(|c| c.get()) {
        return false;
    }
    lmkit_kernels::amx::available()
}

fn apply_override(table: &mut toml::Table, o: &str) -> std::result::Result<(), String> {
    let (key, raw) = o
        .split_once('=')
        .ok_or_else(|| format!("override `{o}` is not `section.field=value`"))?;
    let value: toml::Value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut parts: Vec<&str> = key.trim().split('.').collect();
    let last = parts
        .pop()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("override `{o}` has no field name"))?;
    let mut t = table;
    for p in parts {
        t = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` in `{key}` is not a section"))?;
    }
    t.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Set: [`bf16_on_this_cpu`] answers no on this thread.
        pub(super) static NO_AMX: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    #[test]
    fn optimizer_values_out_of_range_are_refused_naming_the_field() {
        let ok: TrainConfig = toml::from_str("grad_clip = 0.0\nmax_time = 1e9").unwrap();
        assert_eq!(validate_train(&ok), Ok(()));
        for (line, field) in [
            ("lr = inf", "train.lr"),
            ("weight_decay = -0.1", "train.weight_decay"),
            ("weight_decay = nan", "train.weight_decay"),
            ("eps = -1e-8", "train.eps"),
            ("grad_clip = -1.0", "train.grad_clip"),
            ("grad_clip = nan", "train.grad_clip"),
            ("max_time = 0.0", "train.max_time"),
            ("max_time = nan", "train.max_time"),
        ] {
            let t: TrainConfig = toml::from_str(line).unwrap();
            let e = validate_train(&t).unwrap_err();
            assert!(e.contains(field), "{line}: {e}");
        }
    }

    #[test]
    fn bf16_products_need_amx_tiles_on_the_cpu() {
        let t: TrainConfig = toml::from_str("dtype = \"bf16\"").unwrap();
        assert_eq!(t.dtype, Precision::Bf16);
        assert_eq!(validate_train(&t).is_ok(), lmkit_kernels::amx::available());
        NO_AMX.with(|c| c.set(true));
        let e = validate_train(&t).unwrap_err();
        NO_AMX.with(|c| c.set(false));
        assert!(
            e.contains("train.dtype") && e.contains("on cpu") && e.contains("AMX"),
            "{e}"
        );
        let t = TrainConfig {
            device: "cuda:1".into(),
            ..t
        };
        assert!(validate_train(&t).is_ok());
        // The tuning commands take bf16 products on the CPU only.
        let e = validate_tuning(&t, None, None, false).unwrap_err();
        assert!(
            e.contains("train.dtype") && e.contains("`lmkit train` only"),
            "{e}"
        );
        let cpu = TrainConfig {
            device: "cpu".into(),
            ..t
        };
        let tuning = validate_tuning(&cpu, None, None, false);
        assert_eq!(tuning.is_ok(), lmkit_kernels::amx::available());
        assert_eq!(TrainConfig::default().dtype, Precision::F32);
        assert!(toml::from_str::<TrainConfig>("dtype = \"fp8\"").is_err());
    }
}
