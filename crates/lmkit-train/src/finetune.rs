//! Fine-tuning a loaded model (`lmkit finetune`): supervised fine-tuning on chat, Alpaca,
//! prompt/completion or text rows (see [`crate::sft`]), of all parameters or of LoRA adapters
//! on a frozen base (a Hugging Face directory, or a GGUF file whose weights stay quantized).
//! The run shares pretraining's loop, schedule, checkpoints and exact resume; a LoRA checkpoint
//! is a PEFT adapter directory.

use crate::adamw::{AdamW, Param};
use crate::checkpoint::{self, Named, Start, TrainerState};
use crate::config::{load_tuning, TrainConfig, TuningDefaults};
use crate::error::{Result, TrainError};
use crate::passes::llama::ScoredRows;
use crate::passes::Backward;
use crate::sft::{self, Example, Renderer, SftDataConfig};
use crate::steps::{self, Grads, Micro, Position, Validation};
use crate::{metrics, Summary};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lmkit_core::Progress;
use lmkit_models::layers::lora::{Adapters, LoraSpec};
use lmkit_models::{CausalLm, DecoderConfig, ModelConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// The model tuned: a Hugging Face directory (or a training output directory), or a GGUF
    /// file (LoRA only).
    pub base: PathBuf,
    pub data: SftDataConfig,
    #[serde(default)]
    pub train: TrainConfig,
    /// LoRA adapters; without this section (or `adapter`) every parameter is tuned.
    #[serde(default)]
    pub lora: Option<LoraSpec>,
    /// Continue tuning this LoRA adapter directory (PEFT's format): its rank, alpha and target
    /// layers are used, and its weights are the starting point.
    #[serde(default)]
    pub adapter: Option<PathBuf>,
}

impl FinetuneConfig {
    /// Reads `path` with `overrides` (as [`crate::RunConfig::load`]); `[train]` fields left out
    /// take fine-tuning defaults (learning rate 2e-4 with LoRA, 2e-5 without, no weight decay,
    /// β₂ 0.999, 100 steps, batches of 4 sequences of up to 512 tokens).
    pub fn load(path: &Path, overrides: &[String]) -> Result<FinetuneConfig> {
        let cfg: FinetuneConfig = load_tuning(
            path,
            overrides,
            &TuningDefaults {
                lr: (2e-5, 2e-4),
                constant: false,
                max_steps: 100,
                batch_size: 4,
                seq_len: 512,
                eval_every: 50,
                save_every: 50,
                out_dir: "runs/sft",
            },
        )?;
        crate::config::validate_tuning(
            &cfg.train,
            Some(cfg.data.val_fraction),
            cfg.lora.as_ref(),
            cfg.adapter.is_some(),
        )
        .map_err(|msg| TrainError::Config {
            path: path.to_path_buf(),
            msg,
        })?;
        Ok(cfg)
    }
}

/// A model directory's weights as trainable variables.
pub(crate) struct Variables {
    pub model: CausalLm,
    pub vm: VarMap,
    pub dcfg: DecoderConfig,
    /// The directory's config.json.
    pub config_json: serde_json::Value,
}

/// Loads the checkpoint of `base` (a model directory or a training output) into variables:
/// `extra` may add variables of its own before the checkpoint's values are set (those the
/// checkpoint has are set too), and the variables named in `optional` may be missing from it.
pub(crate) fn load_variables(
    base: &Path,
    dev: &Device,
    extra: impl FnOnce(&VarMap, &DecoderConfig) -> Result<()>,
    optional: &[&str],
) -> Result<Variables> {
    let dir = lmkit_models::resolve_checkpoint(base);
    let config_path = dir.join("config.json");
    let dcfg = DecoderConfig::load(&config_path)?;
    let config_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path).map_err(|e| TrainError::io(&config_path, e))?,
    )
    .map_err(|e| TrainError::Data(format!("{}: {e}", config_path.display())))?;
    let vm = VarMap::new();
    let model =
        CausalLm::from_var_builder(&dcfg, VarBuilder::from_varmap(&vm, DType::F32, dev), &dir)?;
    extra(&vm, &dcfg)?;
    // The variables take the checkpoint's values.
    {
        let vars = vm
            .data()
            .lock()
            .map_err(|_| TrainError::Data("variable map lock poisoned".into()))?;
        let mut unset: std::collections::BTreeSet<&String> = vars
            .keys()
            .filter(|k| !optional.contains(&k.as_str()))
            .collect();
        for (name, t) in lmkit_models::checkpoint_tensors(&dir, dev)? {
            if let Some(var) = vars.get(&name) {
                if var.dims() != t.dims() {
                    return Err(TrainError::Data(format!(
                        "{}: tensor `{name}` has shape {:?}, the model needs {:?}",
                        dir.display(),
                        t.dims(),
                        var.dims()
                    )));
                }
                var.set(&t)?;
                unset.remove(&name);
            }
        }
        if let Some(name) = unset.first() {
            return Err(TrainError::Data(format!(
                "{}: tensor `{name}` not found in the weights",
                dir.display()
            )));
        }
    }
    Ok(Variables {
        model,
        vm,
        dcfg,
        config_json,
    })
}

/// The model being tuned and its trainable parameters.
pub(crate) struct Tuned {
    pub model: CausalLm,
    /// The base it was loaded from.
    pub base: PathBuf,
    pub max_positions: usize,
    pub params: Vec<Param>,
    pub adapters: Option<Adapters>,
    /// The base's config.json (full fine-tuning writes it into every checkpoint).
    pub config_json: Option<serde_json::Value>,
}

/// What is tuned: `base` with new adapters (`lora`), with the adapters of `adapter` made
/// trainable, or (neither) all of its parameters.
#[derive(Clone, Copy)]
pub(crate) struct Tuning<'a> {
    pub base: &'a Path,
    pub lora: Option<&'a LoraSpec>,
    pub adapter: Option<&'a Path>,
    pub seed: u64,
    /// Sequences a step reads for each of `train.batch_size`'s examples beyond one, named by
    /// their setting (RL's `rl.group_size` completions a prompt); checked against the memory
    /// before the run's directory is touched.
    pub group: Option<(&'a str, usize)>,
}

/// The trainable tensors of `adapters` as optimizer parameters (biases without weight decay).
pub(crate) fn adapter_params(adapters: &Adapters) -> Vec<Param> {
    adapters
        .vars()
        .into_iter()
        .map(|(name, var)| Param {
            decay: !name.ends_with(".bias"),
            name,
            var,
        })
        .collect()
}

pub(crate) fn load_model(what: Tuning, dev: &Device) -> Result<Tuned> {
    let base = what.base;
    let adapters = match (what.lora, what.adapter) {
        (Some(spec), _) => Some(Adapters::fresh(spec.clone(), what.seed, dev)),
        (None, Some(dir)) => Some(Adapters::load(dir, dev)?.trainable()),
        (None, None) => None,
    };
    if let Some(adapters) = adapters {
        let (model, dcfg) = adapters.build(|| CausalLm::load(base, dev))?;
        let params = adapter_params(&adapters);
        return Ok(Tuned {
            model,
            base: base.to_path_buf(),
            max_positions: dcfg.max_positions(),
            params,
            adapters: Some(adapters),
            config_json: None,
        });
    }
    if lmkit_models::gguf::is_gguf(base) {
        return Err(TrainError::Data(format!(
            "{}: a GGUF base keeps its weights quantized, so only adapters can be tuned on it; add a [lora] section",
            base.display()
        )));
    }
    let v = load_variables(base, dev, |_, _| Ok(()), &[])?;
    let (model, vm, dcfg, config_json) = (v.model, v.vm, v.dcfg, v.config_json);
    let mcfg = ModelConfig::from_decoder(&dcfg);
    let params = crate::init::params(&vm, &mcfg)?;
    Ok(Tuned {
        model,
        base: base.to_path_buf(),
        max_positions: dcfg.max_positions(),
        params,
        adapters: None,
        config_json: Some(config_json),
    })
}

/// The base's tokenizer, chat template, and the text that ends a completion (the template's
/// end-of-sequence token, or the model's first stop token).
pub(crate) struct Vocab {
    pub tokenizer: lmkit_tokenize::Tokenizer,
    pub template: Option<lmkit_tokenize::chat::ChatTemplate>,
    pub eos: Option<String>,
}

impl Vocab {
    pub(crate) fn load(base: &Path) -> Result<Vocab> {
        if !base.exists() {
            return Err(TrainError::Data(format!(
                "base = \"{}\": no such file or directory (the base is a Hugging Face model directory, a training output directory or a GGUF file)",
                base.display()
            )));
        }
        // A training output reads its latest checkpoint's files.
        let base = &lmkit_models::resolve_checkpoint(base);
        let tokenizer = lmkit_tokenize::load(base)?;
        let template = lmkit_tokenize::chat::load_template(base)?;
        let eos = match template.as_ref().and_then(|t| t.eos_token.clone()) {
            Some(e) => Some(e),
            None => lmkit_models::stop_token_ids(base)?
                .first()
                .and_then(|&id| tokenizer.id_to_token(id)),
        };
        Ok(Vocab {
            tokenizer,
            template,
            eos,
        })
    }

    /// How rows become token ids with this vocabulary: rows of `format`, the loss on
    /// `train_on`, cut to `max_tokens`.
    pub(crate) fn renderer(
        &self,
        format: sft::Format,
        train_on: sft::TrainOn,
        max_tokens: usize,
    ) -> Renderer<'_> {
        Renderer {
            tokenizer: &self.tokenizer,
            template: self.template.as_ref(),
            eos: self.eos.clone(),
            format,
            train_on,
            max_tokens,
        }
    }
}

/// Loads what is tuned, checking that `train.seq_len` fits the model.
pub(crate) fn load_tuned(
    what: Tuning,
    t: &TrainConfig,
    dev: &Device,
    progress: &dyn Progress,
) -> Result<Tuned> {
    if dev.is_cpu() {
        crate::cpu_products(t, progress);
    }
    let tuned = load_model(what, dev)?;
    if t.seq_len > tuned.max_positions {
        return Err(TrainError::Data(format!(
            "train.seq_len ({}) exceeds the model's positions ({})",
            t.seq_len, tuned.max_positions
        )));
    }
    let (rows, what) = match what.group {
        Some((name, g)) => (
            t.batch_size as f64 * g as f64,
            format!("train.batch_size ({}) × {name} ({g})", t.batch_size),
        ),
        None => (
            t.batch_size as f64,
            format!("train.batch_size ({})", t.batch_size),
        ),
    };
    crate::init::check_step_tokens(&tuned.model, rows, t.seq_len, &what)?;
    Ok(tuned)
}

/// Loads what is tuned (see [`load_tuned`]) and opens the run's output directory (see
/// [`Output::open`]): the model, the writer of its checkpoints, its optimizer and the step to
/// start from.
pub(crate) fn begin(
    what: Tuning,
    t: &TrainConfig,
    identity: serde_json::Value,
    run_toml: &str,
    start: Start,
    dev: &Device,
    progress: &dyn Progress,
) -> Result<(Tuned, Output, AdamW, Position)> {
    let mut tuned = load_tuned(what, t, dev, progress)?;
    let params = std::mem::take(&mut tuned.params);
    let (output, opt, from) =
        Output::open(&tuned, params, t, identity, start, run_toml, dev, progress)?;
    Ok((tuned, output, opt, from))
}

/// A tuning run's output directory: its metrics file and how its checkpoints are written (a
/// PEFT adapter directory when adapters are tuned, a model directory otherwise).
pub(crate) struct Output {
    pub out: PathBuf,
    pub metrics_path: PathBuf,
    identity: serde_json::Value,
    run_id: String,
    weights_file: &'static str,
    json: Vec<(&'static str, serde_json::Value)>,
    copy: Vec<PathBuf>,
    seed: u64,
    keep: usize,
    /// Tensors a run keeps beside its optimizer's in each checkpoint's optimizer file (PPO's
    /// value model), and those a resumed checkpoint held.
    extra: std::cell::RefCell<Named>,
    restored: std::cell::RefCell<std::collections::HashMap<String, Tensor>>,
}

impl Output {
    /// Keeps `tensors` in the checkpoints written from now on (beside the optimizer's).
    pub(crate) fn keep_extra(&self, tensors: Named) {
        *self.extra.borrow_mut() = tensors;
    }

    /// The optimizer file's tensors of the checkpoint this run resumed from (empty for a new
    /// run); taken once.
    pub(crate) fn take_restored(&self) -> std::collections::HashMap<String, Tensor> {
        std::mem::take(&mut *self.restored.borrow_mut())
    }

    /// Prepares `train.out_dir` for a new run (or, `Start::Resume`, restores the optimizer and
    /// the position from its latest checkpoint, which must have the same `identity`), writes
    /// `run.toml`, and returns the optimizer over `params` and the step to start from.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        tuned: &Tuned,
        params: Vec<Param>,
        t: &TrainConfig,
        identity: serde_json::Value,
        start: Start,
        run_toml: &str,
        dev: &Device,
        progress: &dyn Progress,
    ) -> Result<(Output, AdamW, Position)> {
        let mut opt = AdamW::new(params, t.beta1, t.beta2, t.eps, t.weight_decay)?;
        let out = &t.out_dir;
        let metrics_path = checkpoint::prepare(out, start)?;
        let mut run_id = checkpoint::new_run_id();
        let weights_file = if tuned.adapters.is_some() {
            "adapter_model.safetensors"
        } else {
            "model.safetensors"
        };
        let mut from = Position::default();
        let mut restored = std::collections::HashMap::new();
        if start == Start::Resume {
            let (dir, state, saved) =
                checkpoint::restore(out, &mut opt, weights_file, &identity, dev)?;
            restored = saved;
            if !state.run_id.is_empty() {
                run_id = state.run_id.clone();
            }
            from = Position {
                step: state.step,
                tokens_seen: state.tokens_seen,
                elapsed: state.elapsed_seconds,
            };
            metrics::truncate_after(&metrics_path, from.step)?;
            progress.message(&format!(
                "resumed from {} at step {}",
                dir.display(),
                from.step
            ));
        }
        lmkit_core::write_atomic_bytes(&out.join("run.toml"), run_toml.as_bytes())?;

        let base = &tuned.base;
        let base_dir = base
            .is_dir()
            .then(|| lmkit_models::resolve_checkpoint(base));
        let mut copy = base_dir
            .as_deref()
            .map(checkpoint::tokenizer_files)
            .unwrap_or_default();
        let mut json: Vec<(&str, serde_json::Value)> = Vec::new();
        match (&tuned.adapters, &tuned.config_json) {
            (Some(a), _) => json.push((
                "adapter_config.json",
                a.peft_config(
                    &std::path::absolute(base)
                        .unwrap_or(base.clone())
                        .to_string_lossy(),
                ),
            )),
            (None, Some(c)) => {
                json.push(("config.json", c.clone()));
                if let Some(d) = &base_dir {
                    copy.push(d.join("generation_config.json"));
                }
            }
            (None, None) => unreachable!("a full fine-tune has its base's config"),
        }
        let output = Output {
            out: out.clone(),
            metrics_path,
            identity,
            run_id,
            weights_file,
            json,
            copy,
            seed: t.seed,
            keep: t.keep_checkpoints,
            extra: Default::default(),
            restored: std::cell::RefCell::new(restored),
        };
        Ok((output, opt, from))
    }

    /// Trains from `from` with the shared loop, checkpoints written here. A new run with
    /// validation data is validated first (logged as step 0); that validation is returned too.
    pub(crate) fn run(
        &self,
        t: &TrainConfig,
        opt: &mut AdamW,
        from: Position,
        progress: &dyn Progress,
        micro: &mut dyn FnMut(usize, usize, &mut Grads) -> Result<Micro>,
        evaluate: &mut dyn FnMut() -> Result<Option<Validation>>,
    ) -> Result<(steps::End, Option<Validation>)> {
        let mut before = None;
        if from.step == 0 && t.eval_every > 0 {
            before = evaluate()?;
            if let Some(v) = &before {
                metrics::append(&self.metrics_path, &v.record(0))?;
                let extra: String = v
                    .extra
                    .iter()
                    .filter(|(k, _)| k.ends_with("accuracy") || k.ends_with("accuracies"))
                    .map(|(k, x)| format!(", {k} {x:.3}"))
                    .collect();
                progress.message(&format!(
                    "validation before tuning: loss {:.4}{extra}",
                    v.loss
                ));
            }
        }
        let end = steps::run(
            t,
            opt,
            from,
            &self.metrics_path,
            progress,
            &mut crate::group::Group::single(),
            steps::Hooks {
                micro,
                evaluate,
                save: &mut |opt, at: Position| self.save(opt, at),
            },
        )?;
        Ok((end, before))
    }

    /// Writes the checkpoint of `at` and returns its directory.
    pub(crate) fn save(&self, opt: &AdamW, at: Position) -> Result<PathBuf> {
        let (weights, mut moments) = checkpoint::optimizer_tensors(opt);
        moments.extend(self.extra.borrow().iter().cloned());
        let state = TrainerState {
            step: at.step,
            seed: self.seed,
            tokens_seen: at.tokens_seen,
            elapsed_seconds: at.elapsed,
            model: self.identity.clone(),
            run_id: self.run_id.clone(),
        };
        let json_refs: Vec<(&str, &serde_json::Value)> =
            self.json.iter().map(|(n, v)| (*n, v)).collect();
        let files = checkpoint::CheckpointFiles {
            json: &json_refs,
            weights_file: self.weights_file,
            weights: &weights,
            optimizer: &moments,
            state: &state,
            copy: &self.copy,
        };
        checkpoint::save(&self.out, at.step, &files, self.keep)
    }
}

/// A batch: inputs [b, t] (padded), for the predicted positions their flat index into [b·t]
/// and target id, and for packed rows each row's sequence lengths.
pub(crate) struct Batch {
    pub x: Tensor,
    pub rows: Tensor,
    pub targets: Tensor,
    pub count: usize,
    pub segments: Option<Vec<Vec<usize>>>,
}

/// A batch of rows, each holding one example or (`packed`) several one after another.
pub(crate) fn make_batch(rows_of: &[Vec<&Example>], packed: bool, dev: &Device) -> Result<Batch> {
    let len =
        |row: &Vec<&Example>| -> usize { row.iter().map(|e| e.ids.len().saturating_sub(1)).sum() };
    let t = rows_of.iter().map(len).max().unwrap_or(0).max(1);
    let mut x = vec![0u32; rows_of.len() * t];
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    let mut segments = Vec::with_capacity(rows_of.len());
    for (b, row) in rows_of.iter().enumerate() {
        let mut at = b * t;
        let mut lens = Vec::with_capacity(row.len() + 1);
        for e in row {
            let n = e.ids.len().saturating_sub(1);
            x[at..at + n].copy_from_slice(&e.ids[..n]);
            for i in 0..n {
                if e.train[i + 1] {
                    rows.push((at + i) as u32);
                    targets.push(e.ids[i + 1]);
                }
            }
            at += n;
            lens.push(n);
        }
        // Padding is a sequence of its own (it sees nothing before it, nothing sees it).
        if at < (b + 1) * t {
            lens.push((b + 1) * t - at);
        }
        lens.retain(|&n| n > 0);
        segments.push(lens);
    }
    let count = rows.len();
    Ok(Batch {
        x: Tensor::from_vec(x, (rows_of.len(), t), dev)?,
        rows: Tensor::from_vec(rows, count, dev)?,
        targets: Tensor::from_vec(targets, count, dev)?,
        count,
        segments: packed.then_some(segments),
    })
}

/// A batch of whole sequences, one per row.
pub(crate) fn sequences_batch(seqs: &[&Example], dev: &Device) -> Result<Batch> {
    let rows: Vec<Vec<&Example>> = seqs.iter().map(|&e| vec![e]).collect();
    make_batch(&rows, false, dev)
}

/// The final hidden states [count, dim] at a batch's predicted positions, in `b.targets`'
/// order (packed rows attend only within their sequences).
pub(crate) fn predicted_hidden(model: &CausalLm, b: &Batch) -> Result<Tensor> {
    let mut cache = match &b.segments {
        Some(s) => lmkit_models::KvCache::packed(model.num_layers(), s.clone()),
        None => model.single_pass_cache(),
    };
    let h = model.hidden(&b.x, &mut cache)?;
    let (n, t, c) = h.dims3()?;
    Ok(h.reshape((n * t, c))?.index_select(&b.rows, 0)?)
}

/// The cross-entropy of each of a batch's predicted tokens and the gradients of their sum
/// (weighted by `weights`: row, cross-entropy → weight) times `scale` for the parameters `grads`
/// trains, through the model's hand-written training pass; `None` where it has none that applies
/// (the caller differentiates the graph).
pub(crate) fn hand_scored_rows(
    model: &CausalLm,
    b: &Batch,
    scale: f64,
    weights: Option<&(dyn Fn(usize, f64) -> f64 + Sync)>,
    grads: &Grads,
    backward: Backward,
) -> Result<Option<ScoredRows>> {
    let (CausalLm::Llama(m), Backward::Auto) = (model, backward) else {
        return Ok(None);
    };
    let (rows_n, t) = b.x.dims2()?;
    let ids: Vec<u32> = b.x.flatten_all()?.to_vec1()?;
    let rows: Vec<u32> = b.rows.to_vec1()?;
    let targets: Vec<u32> = b.targets.to_vec1()?;
    let batch = crate::passes::llama::Batch {
        ids: &ids,
        b: rows_n,
        t,
        segments: b.segments.as_deref(),
        rows: &rows,
        targets: &targets,
        weights,
    };
    let trains = |p: &Tensor| grads.trains(p);
    Ok(crate::passes::llama::scored_rows(
        m, &batch, scale, &trains,
    )?)
}

/// The summed cross-entropy of a batch's predicted tokens.
fn batch_loss_sum(model: &CausalLm, b: &Batch) -> Result<Tensor> {
    let h = predicted_hidden(model, b)?;
    crate::objective::output_loss_sum(model.output(), &h, &b.targets)
}

/// What `finetune` read from the data, for the command to report.
pub struct DataReport {
    /// The validation loss of the model before tuning (a new run with validation data).
    pub val_loss_before: Option<f64>,
    pub train_examples: usize,
    pub val_examples: usize,
    pub bad: usize,
    pub bad_samples: Vec<String>,
    pub empty: usize,
    pub truncated: usize,
}

/// Fine-tunes per `cfg` (a new run, or `Start::Resume` from `train.out_dir`'s latest checkpoint).
pub fn finetune(
    cfg: &FinetuneConfig,
    start: Start,
    progress: &dyn Progress,
) -> Result<(Summary, DataReport)> {
    let t = &cfg.train;
    let base = &cfg.base;
    let dev = lmkit_models::parse_device(&t.device)?;
    let vocab = Vocab::load(base)?;
    let renderer = vocab.renderer(cfg.data.format, cfg.data.train_on, t.seq_len + 1);
    let sets = sft::read_sets(
        &cfg.data.train,
        cfg.data.val.as_deref(),
        cfg.data.val_fraction,
        t.seed,
        progress,
        |p| renderer.read(p, cfg.data.skip_bad),
    )?;
    let mut report = DataReport {
        val_loss_before: None,
        train_examples: sets.train.len(),
        val_examples: sets.val.len(),
        bad: sets.bad,
        bad_samples: sets.bad_samples,
        empty: sets.empty,
        truncated: sets.truncated,
    };
    let (train, val) = (sets.train, sets.val);
    if train.is_empty() {
        return Err(TrainError::Data(format!(
            "{}: no example to train on ({} bad rows, {} with nothing left to predict after cutting to train.seq_len)",
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
    // What a checkpoint must have been written by to be resumed.
    let identity = serde_json::json!({
        "base": base.to_string_lossy(),
        "lora": cfg.lora,
        "adapter": cfg.adapter,
        "data": cfg.data,
        "seq_len": t.seq_len,
    });
    let toml_text = toml::to_string_pretty(cfg).unwrap_or_default();
    let (tuned, output, mut opt, from) =
        begin(what, t, identity, &toml_text, start, &dev, progress)?;
    let model = &tuned.model;
    let n_params: usize = opt.params.iter().map(|p| p.var.elem_count()).sum();

    let packed = cfg.data.pack;
    if packed && model.is_recurrent() {
        return Err(TrainError::Data(
            "data.pack is for attention models; a recurrent model reads its rows as one sequence"
                .into(),
        ));
    }
    // Packed rows of the epochs so far, made as the run reaches them.
    let packed_rows: std::cell::RefCell<Vec<Vec<usize>>> = Default::default();
    let packed_epochs = std::cell::Cell::new(0usize);
    let batch_of = |k: usize| -> Vec<Vec<&Example>> {
        if !packed {
            return sft::batch_indices(train.len(), t.batch_size, k, t.seed)
                .into_iter()
                .map(|i| vec![&train[i]])
                .collect();
        }
        let mut rows = packed_rows.borrow_mut();
        while rows.len() < (k + 1) * t.batch_size {
            let order = sft::epoch_order(train.len(), packed_epochs.get(), t.seed);
            rows.extend(sft::pack(&order, &train, t.seq_len));
            packed_epochs.set(packed_epochs.get() + 1);
        }
        rows[k * t.batch_size..(k + 1) * t.batch_size]
            .iter()
            .map(|r| r.iter().map(|&i| &train[i]).collect())
            .collect()
    };
    // The step's loss is the mean over all the tokens its micro batches predict.
    let adapters = tuned.adapters.as_ref();
    // The tokens the current step predicts: (step, count).
    let counted = std::cell::Cell::new(None::<(usize, usize)>);
    let mut micro = |step: usize, m: usize, grads: &mut Grads| -> Result<Micro> {
        model.set_training(true);
        if let Some(a) = adapters {
            let seed = t.seed ^ 0xd207_0a7e ^ ((step * 1024 + m) as u64 + 1);
            a.set_dropout_seed(Some(lmkit_core::rng::mix(seed)));
        }
        // Counted once per step (at its first micro batch).
        let step_tokens = match counted.get() {
            Some((s, n)) if s == step => n,
            _ => {
                let n: usize = (0..t.grad_accum)
                    .map(|j| {
                        batch_of(step * t.grad_accum + j)
                            .iter()
                            .flatten()
                            .map(|e| e.targets())
                            .sum::<usize>()
                    })
                    .sum();
                counted.set(Some((step, n)));
                n
            }
        };
        let examples = batch_of(step * t.grad_accum + m);
        let b = make_batch(&examples, packed, &dev)?;
        let scale = 1.0 / step_tokens.max(1) as f64;
        let loss = match hand_scored_rows(model, &b, scale, None, grads, t.backward)? {
            Some(r) => {
                let loss = r.loss() * scale;
                grads.add_all(r.grads, 1.0)?;
                loss
            }
            None => {
                let share = (batch_loss_sum(model, &b)? * scale)?;
                grads.backward(&share)?;
                share.to_scalar::<f32>()? as f64
            }
        };
        Ok(Micro::new(
            loss,
            examples.iter().flatten().map(|e| e.ids.len() as u64).sum(),
        ))
    };
    let evaluate = || -> Result<Option<f64>> {
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
        let (mut sum, mut count) = (0.0, 0usize);
        for chunk in val[..limit].chunks(t.batch_size) {
            let rows: Vec<Vec<&Example>> = chunk.iter().map(|e| vec![e]).collect();
            let b = make_batch(&rows, false, &dev)?;
            let s = batch_loss_sum(model, &b)?.detach();
            sum += s.to_scalar::<f32>()? as f64;
            count += b.count;
        }
        Ok(Some(sum / count.max(1) as f64))
    };
    let mut evaluate = || Ok(evaluate()?.map(Into::into));
    let (end, before) = output.run(t, &mut opt, from, progress, &mut micro, &mut evaluate)?;
    report.val_loss_before = before.map(|v| v.loss);
    Ok((end.summary(n_params), report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_loads_with_fine_tuning_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/sft-lora.toml");
        let cfg = FinetuneConfig::load(&path, &["base=/elsewhere/model.gguf".into()]).unwrap();
        assert_eq!(cfg.base, PathBuf::from("/elsewhere/model.gguf"));
        let lora = cfg.lora.expect("[lora]");
        assert_eq!((lora.r, lora.alpha, lora.scale()), (16, 32.0, 2.0));
        assert_eq!(cfg.train.seq_len, 384);
        // Left out of the file: fine-tuning's defaults, not pretraining's.
        assert_eq!((cfg.train.weight_decay, cfg.train.beta2), (0.0, 0.999));
        let both = FinetuneConfig::load(&path, &["adapter=\"x\"".into()]);
        assert!(both.is_err(), "[lora] and adapter together are refused");
    }
}
