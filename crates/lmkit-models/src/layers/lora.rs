//! LoRA adapters (Hu et al. 2021) as PEFT defines and stores them: a layer `y = x·Wᵀ + b` gains
//! `scale · (x·Aᵀ)·Bᵀ` with A [r, in] and B [out, r], `scale = alpha / r` (or `alpha / √r` with
//! rsLoRA). An adapter set is PEFT's directory: `adapter_config.json` + `adapter_model.safetensors`
//! with keys `base_model.model.<layer path>.lora_A.weight` / `.lora_B.weight`.
//!
//! Adapters are attached to [`Linear`](super::linear::Linear) layers while a model is built
//! ([`Adapters::build`]): each layer asks for the adapter of its tensor path, so no model file
//! knows about adapters.

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// PEFT's prefix of a causal LM's module paths in a saved adapter.
const PREFIX: &str = "base_model.model.";

/// PEFT's key of a layer's A or B matrix (`which`: "A" or "B").
fn key(path: &str, which: &str) -> String {
    format!("{PREFIX}{path}.lora_{which}.weight")
}

/// PEFT's key of an embedding layer's adapter matrix (`which`: "A" [r, vocab] or "B" [dim, r]).
fn emb_key(path: &str, which: &str) -> String {
    format!("{PREFIX}{path}.lora_embedding_{which}")
}

/// The embedding path and matrix ("A" or "B") a PEFT embedding-adapter key names.
fn parse_emb_key(k: &str) -> Option<(&str, &str)> {
    let (path, which) = k.strip_prefix(PREFIX)?.rsplit_once(".lora_embedding_")?;
    matches!(which, "A" | "B").then_some((path, which))
}

/// PEFT's key of a saved module's tensor (`which`: "weight" or "bias").
fn saved_key(path: &str, which: &str) -> String {
    format!("{PREFIX}{path}.{which}")
}

/// The module path and tensor ("weight" or "bias") a PEFT key of a saved module names.
fn parse_saved_key(k: &str) -> Option<(&str, &str)> {
    let (path, which) = k.strip_prefix(PREFIX)?.rsplit_once('.')?;
    (matches!(which, "weight" | "bias") && parse_key(k).is_none() && parse_emb_key(k).is_none())
        .then_some((path, which))
}

/// Whether `path` is one of `names` (PEFT: the path equals a name or ends in `.name`).
fn names_match(names: &[String], path: &str) -> bool {
    names
        .iter()
        .any(|n| path == n || path.ends_with(&format!(".{n}")))
}

/// The layer path and matrix ("A" or "B") a PEFT key names, if it names one.
fn parse_key(k: &str) -> Option<(&str, &str)> {
    let (path, which) = k
        .strip_prefix(PREFIX)?
        .strip_suffix(".weight")?
        .rsplit_once(".lora_")?;
    matches!(which, "A" | "B").then_some((path, which))
}

/// Which layers get an adapter: PEFT's `target_modules`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    /// Layer names (a path equal to one, or ending in `.name`), or `["all-linear"]`.
    Names(Vec<String>),
    /// `"all-linear"`: every linear layer but the output layer.
    One(String),
}

impl Targets {
    fn all_linear(&self) -> bool {
        match self {
            Targets::One(s) => s == "all-linear",
            Targets::Names(v) => v.len() == 1 && v[0] == "all-linear",
        }
    }

    /// Whether the layer at `path` is targeted (PEFT: the path equals a name or ends in `.name`).
    pub fn matches(&self, path: &str) -> bool {
        let leaf = path.rsplit('.').next().unwrap_or(path);
        if self.all_linear() {
            return !OUTPUT_LAYERS.contains(&leaf);
        }
        match self {
            Targets::Names(names) => names_match(names, path),
            Targets::One(_) => false,
        }
    }
}

/// Output layers, which `all-linear` leaves out (as PEFT does).
const OUTPUT_LAYERS: &[&str] = &["lm_head", "embed_out", "score", "classifier", "out_proj"];

/// The adapter settings of a run (`[lora]`) and of `adapter_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Targets,
    #[serde(default)]
    pub use_rslora: bool,
    /// Modules trained whole beside the adapters and stored in the adapter file (PEFT's
    /// `modules_to_save`, e.g. `["lm_head"]`), named as `target_modules` names layers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules_to_save: Vec<String>,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> Targets {
    Targets::One("all-linear".into())
}

impl Default for LoraSpec {
    fn default() -> Self {
        LoraSpec {
            r: default_r(),
            alpha: default_alpha(),
            dropout: 0.0,
            target_modules: default_targets(),
            use_rslora: false,
            modules_to_save: Vec::new(),
        }
    }
}

impl LoraSpec {
    /// The factor the adapter's product is multiplied by.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.r == 0 {
            return Err("lora.r must be at least 1".into());
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err("lora.alpha must be a positive number".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err("lora.dropout must be in [0, 1)".into());
        }
        if let Targets::One(s) = &self.target_modules {
            if s != "all-linear" {
                return Err(format!(
                    "lora.target_modules = \"{s}\": give a list of layer names (e.g. [\"q_proj\", \"v_proj\"]) or \"all-linear\""
                ));
            }
        }
        if let Targets::Names(v) = &self.target_modules {
            if v.is_empty() {
                return Err("lora.target_modules is empty".into());
            }
        }
        Ok(())
    }
}

/// One layer's adapter: A [r, in], B [out, r] and the scale.
#[derive(Clone, Debug)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    /// Dropout on the adapter's input while training (PEFT's `lora_dropout`).
    dropout: Option<Dropout>,
    /// Set while the adapters are switched off (the base model alone answers).
    off: Arc<AtomicBool>,
}

/// A layer's adapter dropout: probability, the layer's own stream key, and the set's seed for
/// the current step (0: off, as outside training).
#[derive(Clone, Debug)]
struct Dropout {
    p: f64,
    key: u64,
    seed: Arc<AtomicU64>,
}

impl Dropout {
    /// The mask for `x` (kept values scaled by 1/(1−p)), drawn from the step's seed and the
    /// layer's key: the same for the same step, so a resumed run draws the same masks.
    fn mask(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.mask_values(x.elem_count())
            .map(|v| Tensor::from_vec(v, x.shape(), x.device()))
            .transpose()
    }

    /// The mask's `count` values (as [`Dropout::mask`] draws them for an input of that size).
    fn mask_values(&self, count: usize) -> Option<Vec<f32>> {
        use lmkit_core::rng::{mix, MixChain, Random};
        use rayon::prelude::*;
        let seed = self.seed.load(Ordering::Relaxed);
        if seed == 0 || self.p == 0.0 {
            return None;
        }
        let keep = 1.0 - self.p;
        let scale = (1.0 / keep) as f32;
        let mut v = vec![0f32; count];
        v.par_chunks_mut(1 << 16)
            .enumerate()
            .for_each(|(c, chunk)| {
                let mut rng = MixChain::new(mix(seed ^ self.key ^ mix(c as u64 + 1)));
                for e in chunk {
                    *e = if rng.next_f64() < keep { scale } else { 0.0 };
                }
            });
        Some(v)
    }
}

impl Lora {
    /// Whether the set this adapter belongs to is switched on.
    pub fn is_on(&self) -> bool {
        !self.off.load(Ordering::Relaxed)
    }

    /// The dropout mask (kept values 1/(1−p), dropped 0) that [`Lora::forward`] applies now to an
    /// input of `count` values; `None` when no dropout applies.
    pub fn dropout_mask(&self, count: usize) -> Option<Vec<f32>> {
        self.dropout.as_ref()?.mask_values(count)
    }

    /// `scale · (x·Aᵀ)·Bᵀ` for `x` [.., in] (x through dropout while training).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dropped;
        let x = match self
            .dropout
            .as_ref()
            .map(|d| d.mask(x))
            .transpose()?
            .flatten()
        {
            Some(m) => {
                dropped = (x * m)?;
                &dropped
            }
            None => x,
        };
        let h = lmkit_kernels::blas::linear(x, &self.a.t()?, None)?;
        // The scale goes on B [out, r], not on the [.., out] product.
        lmkit_kernels::blas::linear(&h, &(&self.b * self.scale)?.t()?, None)
    }

    /// `scale · B·A` [out, in]: what merging adds to the weight ([dim, vocab] for an embedding
    /// adapter: transposed to the table's layout).
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        self.b.matmul(&self.a)? * self.scale
    }

    /// An embedding adapter (A [r, vocab], B [dim, r]) for token `ids`: `scale · Aᵀ[ids]·Bᵀ`,
    /// what PEFT adds to the table's rows (no dropout on embeddings, as in PEFT).
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let r = self.a.dim(0)?;
        let rows = candle_nn::Embedding::new(self.a.t()?.contiguous()?, r);
        let h = candle_core::Module::forward(&rows, ids)?;
        lmkit_kernels::blas::linear(&h, &(&self.b * self.scale)?.t()?, None)
    }
}

enum Source {
    /// New trainable adapters: A drawn as PEFT's default (Kaiming-uniform, bound 1/√in), B zero.
    Fresh { seed: u64, device: Device },
    /// Adapters read from a PEFT directory (trainable: to continue tuning them).
    Loaded {
        dir: PathBuf,
        tensors: HashMap<String, Tensor>,
        trainable: bool,
    },
}

struct State {
    source: Source,
    /// Attached adapters by layer path, with the layer's storage (transposed: Conv1D).
    attached: BTreeMap<String, (Lora, Option<Var>, Option<Var>, bool)>,
    /// Saved modules by path: their weight and bias, variables when trained.
    saved: BTreeMap<String, SavedModule>,
    /// Embedding adapters by path (A [r, vocab], B [dim, r]), with their variables.
    embeddings: BTreeMap<String, (Lora, Option<Var>, Option<Var>)>,
    /// PEFT's `task_type` written to `adapter_config.json` (`CAUSAL_LM` unless set).
    task_type: Option<String>,
}

/// A module trained whole (`modules_to_save`): its weight (as the layer stores it) and bias.
#[derive(Clone)]
struct SavedModule {
    weight: Tensor,
    bias: Option<Tensor>,
    vars: (Option<Var>, Option<Var>),
}

impl SavedModule {
    /// `weight` and `bias`, as new variables holding them when `trainable`.
    fn new(weight: Tensor, bias: Option<Tensor>, trainable: bool) -> candle_core::Result<Self> {
        if !trainable {
            return Ok(SavedModule {
                weight,
                bias,
                vars: (None, None),
            });
        }
        let wv = Var::from_tensor(&weight)?;
        let bv = bias.as_ref().map(Var::from_tensor).transpose()?;
        Ok(SavedModule {
            weight: wv.as_tensor().clone(),
            bias: bv.as_ref().map(|v| v.as_tensor().clone()),
            vars: (Some(wv), bv),
        })
    }
}

/// A set of adapters: created fresh for training or read from a PEFT directory, attached to a
/// model's layers while it is built.
#[derive(Clone)]
pub struct Adapters {
    pub spec: LoraSpec,
    /// The current training step's dropout seed (0: no dropout).
    dropout_seed: Arc<AtomicU64>,
    /// Set while the adapters are switched off.
    off: Arc<AtomicBool>,
    /// PEFT's `fan_in_fan_out`: the targeted layers store their weights [in, out] (Conv1D).
    pub fan_in_fan_out: bool,
    state: Arc<Mutex<State>>,
}

thread_local! {
    static BUILDING: RefCell<Option<Adapters>> = const { RefCell::new(None) };
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The weight and bias the layer at `path` takes instead of its checkpoint's, when a model is
/// being built with adapters that save that module (`modules_to_save`): a trainable copy of
/// `weight`/`bias` for new adapters, the adapter file's tensors for loaded ones. Called by
/// `Linear`'s constructors with the weight as the layer stores it.
pub(crate) fn saved_module(
    path: &str,
    weight: &dyn Fn() -> candle_core::Result<Tensor>,
    bias: Option<&Tensor>,
) -> candle_core::Result<Option<(Tensor, Option<Tensor>)>> {
    BUILDING.with(|b| match &*b.borrow() {
        Some(adapters) => adapters.save_module(path, weight, bias),
        None => Ok(None),
    })
}

/// The adapter for the token embedding table at `path` ([vocab, dim]), when a model is being
/// built with adapters that name it in `target_modules` (`all-linear` leaves embeddings out).
pub fn attach_embedding(path: &str, vocab: usize, dim: usize) -> candle_core::Result<Option<Lora>> {
    BUILDING.with(|b| match &*b.borrow() {
        Some(adapters) => adapters.attach_embedding(path, vocab, dim),
        None => Ok(None),
    })
}

/// Refuses a new adapter of rank `r` on the layer at `path` ([in, out] sizes) whose A and B,
/// with their gradients and AdamW's two moments (16 bytes a value), cannot fit in the memory
/// the machine has (a rank of 10^12 aborted on allocation).
fn check_room(path: &str, r: usize, in_dim: usize, out_dim: usize) -> candle_core::Result<()> {
    let bytes = r as f64 * (in_dim as f64 + out_dim as f64) * 16.0;
    match lmkit_core::memory::available() {
        Some(avail) if bytes > avail as f64 => {
            use lmkit_core::memory::gib;
            candle_core::bail!(
                "lora.r = {r}: the adapter of {path} alone needs {} (A [{r}, {in_dim}] and B \
                 [{out_dim}, {r}] with gradients and optimizer state) but {} are available; \
                 lower lora.r",
                gib(bytes),
                gib(avail as f64)
            )
        }
        _ => Ok(()),
    }
}

/// The adapter for the layer at `path` ([in, out] sizes), when a model is being built with
/// adapters that target it. Called by `Linear`'s constructors.
pub(crate) fn attach(
    path: &str,
    in_dim: usize,
    out_dim: usize,
    transposed: bool,
) -> candle_core::Result<Option<Lora>> {
    BUILDING.with(|b| match &*b.borrow() {
        Some(adapters) => adapters.attach(path, in_dim, out_dim, transposed),
        None => Ok(None),
    })
}

/// The peft `adapter_config.json` fields lmkit reads or writes.
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: Option<Targets>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    rank_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    alpha_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    task_type: Option<String>,
}

impl Adapters {
    /// New adapters per `spec`, drawn from `seed`, trainable.
    pub fn fresh(spec: LoraSpec, seed: u64, device: &Device) -> Self {
        Adapters {
            spec,
            dropout_seed: Arc::default(),
            off: Arc::default(),
            fan_in_fan_out: false,
            state: Arc::new(Mutex::new(State {
                source: Source::Fresh {
                    seed,
                    device: device.clone(),
                },
                attached: BTreeMap::new(),
                saved: BTreeMap::new(),
                embeddings: BTreeMap::new(),
                task_type: None,
            })),
        }
    }

    /// Reads a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
    /// A training output directory loads the checkpoint its `latest` names.
    pub fn load(dir: &Path, device: &Device) -> crate::Result<Self> {
        let dir = crate::resolve_run(dir, "adapter_config.json");
        let cfg_path = dir.join("adapter_config.json");
        let bad = |msg: String| crate::ModelError::Config {
            path: cfg_path.clone(),
            msg,
        };
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
            lmkit_core::PathError::new(
                cfg_path.clone(),
                std::io::Error::new(
                    e.kind(),
                    format!("{e} (an adapter is a PEFT directory with adapter_config.json)"),
                ),
            )
        })?;
        let c: PeftConfig = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if let Some(t) = c.peft_type.as_deref().filter(|t| *t != "LORA") {
            return Err(bad(format!("peft_type {t} is not supported (only LORA)")));
        }
        let refuse = |what: &str| Err(bad(format!("{what} is not supported")));
        if c.use_dora {
            return refuse("use_dora (DoRA)");
        }
        if c.bias.as_deref().is_some_and(|b| b != "none") {
            return refuse("bias other than \"none\"");
        }
        if c.rank_pattern.as_ref().is_some_and(|m| !m.is_empty())
            || c.alpha_pattern.as_ref().is_some_and(|m| !m.is_empty())
        {
            return refuse("rank_pattern / alpha_pattern");
        }
        if c.layers_to_transform.as_ref().is_some_and(|v| !v.is_null()) {
            return refuse("layers_to_transform");
        }
        let spec = LoraSpec {
            r: c.r,
            alpha: c.lora_alpha,
            dropout: c.lora_dropout,
            target_modules: c.target_modules.unwrap_or(Targets::Names(Vec::new())),
            use_rslora: c.use_rslora,
            modules_to_save: c.modules_to_save.unwrap_or_default(),
        };
        if spec.r == 0 || spec.alpha <= 0.0 {
            return Err(bad("r and lora_alpha must be positive".into()));
        }
        let file = dir.join("adapter_model.safetensors");
        if !file.exists() {
            return Err(crate::ModelError::Io(lmkit_core::PathError::new(
                file,
                std::io::Error::new(std::io::ErrorKind::NotFound, "adapter weights missing"),
            )));
        }
        let tensors = candle_core::safetensors::load(&file, device)
            .map_err(|e| crate::ModelError::Tensor {
                path: file.clone(),
                name: "*".into(),
                msg: crate::first_line(&e),
            })?
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
            .collect::<candle_core::Result<HashMap<_, _>>>()?;
        for k in tensors.keys() {
            // PEFT also stores the table under an embedding adapter (`save_embedding_layers`,
            // for resized vocabularies): `<path>.base_layer.weight`.
            let table = |path: &str| {
                path.strip_suffix(".base_layer")
                    .is_some_and(|p| tensors.contains_key(&emb_key(p, "A")))
            };
            let saved = parse_saved_key(k)
                .is_some_and(|(path, _)| names_match(&spec.modules_to_save, path) || table(path));
            if parse_key(k).is_none() && parse_emb_key(k).is_none() && !saved {
                return Err(crate::ModelError::Tensor {
                    path: file.clone(),
                    name: k.clone(),
                    msg: "not a LoRA A/B weight of a causal LM adapter (base_model.model.<layer>.lora_A.weight) nor a tensor of a module in modules_to_save".into(),
                });
            }
        }
        Ok(Adapters {
            spec,
            dropout_seed: Arc::default(),
            off: Arc::default(),
            fan_in_fan_out: c.fan_in_fan_out,
            state: Arc::new(Mutex::new(State {
                source: Source::Loaded {
                    dir,
                    tensors,
                    trainable: false,
                },
                attached: BTreeMap::new(),
                saved: BTreeMap::new(),
                embeddings: BTreeMap::new(),
                task_type: c.task_type,
            })),
        })
    }

    /// Turns adapter dropout on for a training step (`Some(seed)`: each step its own seed) or
    /// off (`None`: evaluation, inference).
    pub fn set_dropout_seed(&self, seed: Option<u64>) {
        // 0 means off; a seed that happens to be 0 is taken as 1.
        self.dropout_seed
            .store(seed.map_or(0, |s| s.max(1)), Ordering::Relaxed);
    }

    /// Switches the adapters off (`false`: the model computes as its base alone, what preference
    /// tuning takes as the reference) or back on.
    pub fn set_enabled(&self, on: bool) {
        self.off.store(!on, Ordering::Relaxed);
    }

    /// These (loaded) adapters as trainable variables: tuning continues from them.
    pub fn trainable(self) -> Self {
        if let Source::Loaded { trainable, .. } = &mut lock(&self.state).source {
            *trainable = true;
        }
        self
    }

    /// Runs `build` (which constructs a model) with these adapters attached to the layers they
    /// target; a loaded set must be used whole (an adapter for a layer the model does not have is
    /// an error naming it).
    pub fn build<T>(&self, build: impl FnOnce() -> crate::Result<T>) -> crate::Result<T> {
        BUILDING.with(|b| *b.borrow_mut() = Some(self.clone()));
        let built = build();
        BUILDING.with(|b| *b.borrow_mut() = None);
        let built = built?;
        let st = lock(&self.state);
        match &st.source {
            Source::Loaded { dir, tensors, .. } => {
                let unused = |k: &&String| match (parse_key(k), parse_saved_key(k)) {
                    (Some((path, _)), _) => !st.attached.contains_key(path),
                    (None, Some((path, _))) => !st.saved.contains_key(path),
                    (None, None) => {
                        parse_emb_key(k).is_none_or(|(path, _)| !st.embeddings.contains_key(path))
                    }
                };
                if let Some(k) = tensors.keys().find(unused) {
                    return Err(crate::ModelError::Tensor {
                        path: dir.join("adapter_model.safetensors"),
                        name: k.clone(),
                        msg: "this model has no such layer (was the adapter made for another base model?)".into(),
                    });
                }
            }
            Source::Fresh { .. } if st.attached.is_empty() && st.embeddings.is_empty() => {
                return Err(crate::ModelError::Config {
                    path: PathBuf::from("[lora]"),
                    msg: format!(
                        "target_modules {} matches no layer of this model (layer names are those of its checkpoint: q_proj, v_proj, c_attn, query_key_value, ...)",
                        match &self.spec.target_modules {
                            Targets::Names(n) => format!("{n:?}"),
                            Targets::One(s) => format!("{s:?}"),
                        }
                    ),
                });
            }
            Source::Fresh { .. } => {}
        }
        if let Some(name) = self.spec.modules_to_save.iter().find(|n| {
            !st.saved
                .keys()
                .any(|p| names_match(std::slice::from_ref(n), p))
        }) {
            return Err(crate::ModelError::Config {
                path: PathBuf::from("[lora]"),
                msg: format!(
                    "modules_to_save: {name:?} names no linear layer of this model (e.g. \"lm_head\")"
                ),
            });
        }
        Ok(built)
    }

    fn attach_embedding(
        &self,
        path: &str,
        vocab: usize,
        dim: usize,
    ) -> candle_core::Result<Option<Lora>> {
        let mut st = lock(&self.state);
        let scale = self.spec.scale();
        let r = self.spec.r;
        let (a, b, trainable) = match &st.source {
            Source::Fresh { seed, device } => {
                let Targets::Names(names) = &self.spec.target_modules else {
                    return Ok(None);
                };
                if !names_match(names, path) {
                    return Ok(None);
                }
                check_room(path, r, vocab, dim)?;
                // PEFT's initialisation of embedding adapters: A zero, B standard normal.
                let mut rng = lmkit_core::rng::MixChain::new(lmkit_core::rng::mix(
                    seed ^ lmkit_core::rng::mix(fnv(path)),
                ));
                let vals: Vec<f32> = (0..dim * r)
                    .map(|_| lmkit_core::rng::Random::normal(&mut rng) as f32)
                    .collect();
                let a = Tensor::zeros((r, vocab), DType::F32, device)?;
                (a, Tensor::from_vec(vals, (dim, r), device)?, true)
            }
            Source::Loaded {
                tensors, trainable, ..
            } => {
                let (Some(a), Some(b)) = (
                    tensors.get(&emb_key(path, "A")),
                    tensors.get(&emb_key(path, "B")),
                ) else {
                    return Ok(None);
                };
                let ((ra, v), (d, rb)) = (a.dims2()?, b.dims2()?);
                if v != vocab || d != dim || ra != rb {
                    candle_core::bail!(
                        "adapter for {path}: lora_embedding_A {:?} and lora_embedding_B {:?} do not fit a table of {vocab} tokens × {dim}",
                        a.dims(),
                        b.dims()
                    );
                }
                (a.clone(), b.clone(), *trainable)
            }
        };
        let (lora, vars) = if trainable {
            trainable_lora(&a, &b, scale, None, &self.off)?
        } else {
            let lora = Lora {
                a,
                b,
                scale,
                dropout: None,
                off: self.off.clone(),
            };
            (lora, (None, None))
        };
        st.embeddings
            .insert(path.to_string(), (lora.clone(), vars.0, vars.1));
        Ok(Some(lora))
    }

    fn save_module(
        &self,
        path: &str,
        weight: &dyn Fn() -> candle_core::Result<Tensor>,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<Option<(Tensor, Option<Tensor>)>> {
        let mut st = lock(&self.state);
        let table = format!("{path}.base_layer");
        if let Source::Loaded { tensors, .. } = &st.source {
            if let Some(w) = tensors.get(&saved_key(&table, "weight")).cloned() {
                // An embedding table stored with its adapter (PEFT's save_embedding_layers).
                if w.dims() != weight()?.dims() {
                    candle_core::bail!(
                        "{table}: a table of {:?} where the model's is {:?}",
                        w.dims(),
                        weight()?.dims()
                    );
                }
                st.saved
                    .insert(table, SavedModule::new(w.clone(), None, false)?);
                return Ok(Some((w, None)));
            }
        }
        if !names_match(&self.spec.modules_to_save, path) {
            return Ok(None);
        }
        let (w, b, trainable) = match &st.source {
            Source::Fresh { .. } => (
                weight()?.to_dtype(DType::F32)?,
                bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
                true,
            ),
            Source::Loaded {
                dir,
                tensors,
                trainable,
            } => {
                let Some(w) = tensors.get(&saved_key(path, "weight")) else {
                    candle_core::bail!(
                        "{}: {path} is in modules_to_save but its weight is not in adapter_model.safetensors",
                        dir.display()
                    );
                };
                let want = weight()?;
                if w.dims() != want.dims() {
                    candle_core::bail!(
                        "saved module {path}: weight {:?} where the model's is {:?}",
                        w.dims(),
                        want.dims()
                    );
                }
                let b = match (tensors.get(&saved_key(path, "bias")), bias) {
                    (Some(b), Some(_)) => Some(b.clone()),
                    (None, Some(b)) => Some(b.to_dtype(DType::F32)?),
                    (_, None) => None,
                };
                (w.clone(), b, *trainable)
            }
        };
        let module = SavedModule::new(w, b, trainable)?;
        let out = (module.weight.clone(), module.bias.clone());
        st.saved.insert(path.to_string(), module);
        Ok(Some(out))
    }

    fn attach(
        &self,
        path: &str,
        in_dim: usize,
        out_dim: usize,
        transposed: bool,
    ) -> candle_core::Result<Option<Lora>> {
        let mut st = lock(&self.state);
        let scale = self.spec.scale();
        let dropout = (self.spec.dropout > 0.0).then(|| Dropout {
            p: self.spec.dropout,
            key: lmkit_core::rng::mix(fnv(path)),
            seed: self.dropout_seed.clone(),
        });
        let (lora, vars) = match &st.source {
            Source::Fresh { seed, device } => {
                if !self.spec.target_modules.matches(path) {
                    return Ok(None);
                }
                let r = self.spec.r;
                check_room(path, r, in_dim, out_dim)?;
                let mut rng = lmkit_core::rng::MixChain::new(lmkit_core::rng::mix(
                    seed ^ lmkit_core::rng::mix(fnv(path)),
                ));
                let bound = 1.0 / (in_dim as f64).sqrt();
                let vals: Vec<f32> = (0..r * in_dim)
                    .map(|_| {
                        use lmkit_core::rng::Random;
                        ((rng.next_f64() * 2.0 - 1.0) * bound) as f32
                    })
                    .collect();
                let a = Tensor::from_vec(vals, (r, in_dim), device)?;
                let b = Tensor::zeros((out_dim, r), DType::F32, device)?;
                trainable_lora(&a, &b, scale, dropout, &self.off)?
            }
            Source::Loaded {
                tensors, trainable, ..
            } => {
                let (Some(a), Some(b)) =
                    (tensors.get(&key(path, "A")), tensors.get(&key(path, "B")))
                else {
                    return Ok(None);
                };
                let (r, i) = a.dims2()?;
                let (o, r2) = b.dims2()?;
                if i != in_dim || o != out_dim || r != r2 {
                    candle_core::bail!(
                        "adapter for {path}: lora_A {:?} and lora_B {:?} do not fit a layer of {in_dim} inputs and {out_dim} outputs",
                        a.dims(),
                        b.dims()
                    );
                }
                if *trainable {
                    trainable_lora(a, b, scale, dropout, &self.off)?
                } else {
                    let lora = Lora {
                        a: a.clone(),
                        b: b.clone(),
                        scale,
                        dropout: None,
                        off: self.off.clone(),
                    };
                    (lora, (None, None))
                }
            }
        };
        st.attached
            .insert(path.to_string(), (lora.clone(), vars.0, vars.1, transposed));
        Ok(Some(lora))
    }

    /// A loaded set's embedding adapters by path (A [r, vocab], B [dim, r]), without a model.
    pub fn embedding_layers(&self) -> Vec<(String, Lora)> {
        self.loaded_pairs(parse_emb_key, emb_key)
    }

    /// A loaded set's adapters by layer path, without a model.
    pub fn layers(&self) -> Vec<(String, Lora)> {
        self.loaded_pairs(parse_key, key)
    }

    /// A loaded set's A/B pairs whose keys `parse` reads (and `key` writes), by path.
    fn loaded_pairs(
        &self,
        parse: fn(&str) -> Option<(&str, &str)>,
        key: fn(&str, &str) -> String,
    ) -> Vec<(String, Lora)> {
        let st = lock(&self.state);
        let Source::Loaded { tensors, .. } = &st.source else {
            return Vec::new();
        };
        let mut out: Vec<(String, Lora)> = tensors
            .iter()
            .filter_map(|(k, a)| {
                let (path, "A") = parse(k)? else {
                    return None;
                };
                let b = tensors.get(&key(path, "B"))?;
                Some((
                    path.to_string(),
                    Lora {
                        a: a.clone(),
                        b: b.clone(),
                        scale: self.spec.scale(),
                        dropout: None,
                        off: self.off.clone(),
                    },
                ))
            })
            .collect();
        out.sort_by(|x, y| x.0.cmp(&y.0));
        out
    }

    /// A module the model holds outside its linear layers (a reward model's `score` head) saved
    /// with these adapters: a loaded set's tensor from its file, else `make()`'s; a variable when
    /// the set trains. Call before [`Adapters::build`].
    pub fn claim_saved(
        &self,
        path: &str,
        make: impl FnOnce() -> candle_core::Result<Tensor>,
    ) -> crate::Result<Tensor> {
        let mut st = lock(&self.state);
        let (w, trainable) = match &mut st.source {
            Source::Fresh { .. } => (make()?, true),
            Source::Loaded {
                dir,
                tensors,
                trainable,
            } => match tensors.remove(&saved_key(path, "weight")) {
                Some(w) => (w, *trainable),
                None => {
                    return Err(crate::ModelError::Tensor {
                        path: dir.join("adapter_model.safetensors"),
                        name: saved_key(path, "weight"),
                        msg: format!("missing: the adapter set has no saved `{path}` module"),
                    })
                }
            },
        };
        let module = SavedModule::new(w, None, trainable)?;
        let weight = module.weight.clone();
        st.saved.insert(path.to_string(), module);
        Ok(weight)
    }

    /// Sets PEFT's `task_type` for `adapter_config.json` (`SEQ_CLS` for a reward model).
    pub fn set_task_type(&self, task: &str) {
        lock(&self.state).task_type = Some(task.to_string());
    }

    /// PEFT's `task_type` of these adapters (`CAUSAL_LM` unless a file or
    /// [`Adapters::set_task_type`] says otherwise).
    pub fn task_type(&self) -> String {
        lock(&self.state)
            .task_type
            .clone()
            .unwrap_or_else(|| "CAUSAL_LM".into())
    }

    /// The trainable tensors (fresh adapters, or loaded ones made trainable), under their PEFT
    /// keys (A before B per layer), then the saved modules' (weight before bias).
    pub fn vars(&self) -> Vec<(String, Var)> {
        let st = lock(&self.state);
        let mut out = Vec::new();
        for (path, (_, a, b, _)) in &st.attached {
            if let (Some(a), Some(b)) = (a, b) {
                out.push((key(path, "A"), a.clone()));
                out.push((key(path, "B"), b.clone()));
            }
        }
        for (path, (_, a, b)) in &st.embeddings {
            if let (Some(a), Some(b)) = (a, b) {
                out.push((emb_key(path, "A"), a.clone()));
                out.push((emb_key(path, "B"), b.clone()));
            }
        }
        for (path, m) in &st.saved {
            for (which, v) in [("weight", &m.vars.0), ("bias", &m.vars.1)] {
                if let Some(v) = v {
                    out.push((saved_key(path, which), v.clone()));
                }
            }
        }
        out
    }

    /// The saved modules (`modules_to_save`) by path, with their weight (as the layer stores
    /// it) and bias: of the model built with these adapters, or as a loaded set holds them.
    pub fn saved_modules(&self) -> Vec<(String, Tensor, Option<Tensor>)> {
        let st = lock(&self.state);
        if let (Source::Loaded { tensors, .. }, true) = (&st.source, st.saved.is_empty()) {
            let mut out: Vec<_> = tensors
                .iter()
                .filter_map(|(k, w)| {
                    let (path, "weight") = parse_saved_key(k)? else {
                        return None;
                    };
                    let b = tensors.get(&saved_key(path, "bias")).cloned();
                    Some((path.to_string(), w.clone(), b))
                })
                .collect();
            out.sort_by(|x, y| x.0.cmp(&y.0));
            return out;
        }
        st.saved
            .iter()
            .map(|(p, m)| (p.clone(), m.weight.clone(), m.bias.clone()))
            .collect()
    }

    /// The attached adapters by layer path, with whether the layer stores its weight
    /// transposed ([in, out], Conv1D).
    pub fn attached(&self) -> Vec<(String, Lora, bool)> {
        lock(&self.state)
            .attached
            .iter()
            .map(|(p, (l, _, _, t))| (p.clone(), l.clone(), *t))
            .collect()
    }

    /// `adapter_config.json` for the attached adapters (`base` is recorded as
    /// `base_model_name_or_path`).
    pub fn peft_config(&self, base: &str) -> serde_json::Value {
        let attached = self.attached();
        let embedded: Vec<String> = lock(&self.state).embeddings.keys().cloned().collect();
        let mut names: Vec<String> = (attached.iter().map(|(p, ..)| p))
            .chain(&embedded)
            .map(|p| p.rsplit('.').next().unwrap_or(p).to_string())
            .collect();
        names.sort();
        names.dedup();
        let fan_in_fan_out = attached.iter().any(|(_, _, t)| *t);
        let mut saved = self.spec.modules_to_save.clone();
        for (path, ..) in self.saved_modules() {
            if !names_match(&saved, &path) {
                saved.push(path.rsplit('.').next().unwrap_or(&path).to_string());
            }
        }
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": self.task_type(),
            "base_model_name_or_path": base,
            "r": self.spec.r,
            "lora_alpha": self.spec.alpha,
            "lora_dropout": self.spec.dropout,
            "target_modules": names,
            "use_rslora": self.spec.use_rslora,
            "fan_in_fan_out": fan_in_fan_out,
            "bias": "none",
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": (!saved.is_empty()).then_some(saved),
            "use_dora": false,
        })
    }

    /// The adapters' tensors under PEFT's keys, as `adapter_model.safetensors` holds them (with
    /// the saved modules' weights and biases).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .attached()
            .into_iter()
            .flat_map(|(path, l, _)| [(key(&path, "A"), l.a), (key(&path, "B"), l.b)])
            .collect();
        let embedded: Vec<(String, Lora)> = lock(&self.state)
            .embeddings
            .iter()
            .map(|(p, (l, ..))| (p.clone(), l.clone()))
            .collect();
        for (path, l) in embedded {
            out.push((emb_key(&path, "A"), l.a));
            out.push((emb_key(&path, "B"), l.b));
        }
        for (path, w, b) in self.saved_modules() {
            out.push((saved_key(&path, "weight"), w));
            out.extend(b.map(|b| (saved_key(&path, "bias"), b)));
        }
        out
    }
}

/// A trainable adapter's A and B variables (none for a frozen one).
type TrainedVars = (Option<Var>, Option<Var>);

/// An adapter whose A and B are new variables holding `a` and `b`, with the variables.
fn trainable_lora(
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout: Option<Dropout>,
    off: &Arc<AtomicBool>,
) -> candle_core::Result<(Lora, TrainedVars)> {
    let (a, b) = (Var::from_tensor(a)?, Var::from_tensor(b)?);
    let lora = Lora {
        a: a.as_tensor().clone(),
        b: b.as_tensor().clone(),
        scale,
        dropout,
        off: off.clone(),
    };
    Ok((lora, (Some(a), Some(b))))
}

/// FNV-1a of a layer path: each layer's adapter draws from its own stream, so adding a target
/// does not change the others' initial values.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_as_peft() {
        let t = Targets::Names(vec!["q_proj".into(), "v_proj".into()]);
        assert!(t.matches("model.layers.0.self_attn.q_proj"));
        assert!(!t.matches("model.layers.0.self_attn.k_proj"));
        assert!(!t.matches("model.layers.0.self_attn.xq_proj"));
        let all = Targets::One("all-linear".into());
        assert!(all.matches("model.layers.3.mlp.down_proj"));
        assert!(!all.matches("lm_head"));
        assert!(Targets::Names(vec!["all-linear".into()]).matches("transformer.h.0.attn.c_attn"));
    }

    #[test]
    fn peft_keys_round_trip() {
        let k = key("model.layers.0.self_attn.q_proj", "B");
        assert_eq!(
            k,
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        );
        assert_eq!(
            parse_key(&k),
            Some(("model.layers.0.self_attn.q_proj", "B"))
        );
        assert_eq!(parse_key("base_model.model.x.lora_C.weight"), None);
        assert_eq!(parse_key("model.x.lora_A.weight"), None);
    }

    #[test]
    fn scale_follows_rslora() {
        let mut s = LoraSpec {
            r: 16,
            alpha: 32.0,
            ..Default::default()
        };
        assert_eq!(s.scale(), 2.0);
        s.use_rslora = true;
        assert_eq!(s.scale(), 8.0);
        s.dropout = 0.1;
        assert!(s.validate().is_ok());
        s.dropout = 1.0;
        assert!(s.validate().is_err());
    }
}
