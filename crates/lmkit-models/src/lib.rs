//! Neural language models on candle, one file per family in [`families`] (GPT-2, Llama, lmkit's
//! GPT-NeoX, RNN/LSTM, BERT, BART), built from shared [`layers`]; [`registry`] is the one place that tells
//! families apart by `model_type`. Configs read and write Hugging Face `config.json`; weights load
//! from Hugging Face `model.safetensors` with Hugging Face tensor names.
#![forbid(unsafe_code)]

pub mod device;
pub mod error;
pub mod families;
pub mod gguf;
pub mod layers;
pub mod registry;
pub mod testing;

pub use families::{bart, bert, gpt2, gpt_neox, llama, rnn};

/// candle's error type, for crates that handle tensors from these models.
pub use candle_core as candle_error;
pub use candle_core::{DType, Device, Tensor};
pub use device::{cuda_device_count, free_memory, parse_device, parse_dtype};
pub use error::{ModelError, Result};
pub use families::gpt2::Gpt2Config;
pub use families::llama::LlamaConfig;
pub use families::rnn::{Cell, RnnConfig};
pub use families::{FamilyConfig, Kind, ParamRole, SpecialIds};
pub use layers::kv_cache::KvCache;
pub use registry::{DecoderConfig, ModelConfig};

use candle_core::Module;
use std::path::{Path, PathBuf};

/// A causal language model loaded from a checkpoint directory.
pub enum CausalLm {
    Gpt2(gpt2::Gpt2),
    GptNeox(gpt_neox::GptNeox),
    Llama(llama::Llama),
    Rnn(rnn::RnnLm),
}

/// The safetensors files of a checkpoint: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|_| {
        ModelError::Io(lmkit_core::PathError::new(
            single.clone(),
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors (nor model.safetensors.index.json) in the checkpoint directory",
            ),
        ))
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: index.clone(),
        msg: format!("not valid JSON: {e}"),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Config {
            path: index.clone(),
            msg: "missing `weight_map`".into(),
        })?;
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|f| f.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// `dir` itself, or the checkpoint that `dir/latest` names when `dir` has no config.json.
pub fn resolve_checkpoint(dir: &Path) -> PathBuf {
    resolve_run(dir, "config.json")
}

/// `dir` itself, or the checkpoint that `dir/latest` names when `dir` has no `marker` file
/// (config.json for a model, adapter_config.json for an adapter) and that checkpoint has one.
pub fn resolve_run(dir: &Path, marker: &str) -> PathBuf {
    if !dir.join(marker).exists() {
        if let Ok(name) = std::fs::read_to_string(dir.join("latest")) {
            let ckpt = dir.join(name.trim());
            if ckpt.join(marker).exists() {
                return ckpt;
            }
        }
    }
    dir.to_path_buf()
}

/// The ids that end generation for the model at `path`: `eos_token_id` of config.json and of
/// generation_config.json (each one id or a list), or a GGUF file's `tokenizer.ggml.eos_token_id`
/// (and its end-of-turn token, when it names one).
pub fn stop_token_ids(path: &Path) -> Result<Vec<u32>> {
    let mut ids: Vec<u32> = Vec::new();
    if gguf::is_gguf(path) {
        let g = gguf::Gguf::open(path)?;
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = g.int(key) {
                ids.push(id as u32);
            }
        }
    } else {
        let dir = resolve_checkpoint(path);
        for name in ["config.json", "generation_config.json"] {
            let file = dir.join(name);
            if !file.exists() {
                continue;
            }
            let v = registry::read_json(&file)?;
            match v.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => ids.extend(n.as_u64().map(|n| n as u32)),
                Some(serde_json::Value::Array(list)) => {
                    ids.extend(list.iter().filter_map(|n| n.as_u64()).map(|n| n as u32))
                }
                _ => {}
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
    Ok(ids)
}

/// [`stop_token_ids`] for a model of `vocab_size` tokens, with a warning for the ids outside the
/// vocabulary, which can never be sampled (transformers' random-init GPT-2 keeps eos 50256 whatever
/// its vocabulary): they are dropped, and generation then stops only at the token limit or a
/// stop string.
pub fn sampleable_stop_ids(path: &Path, vocab_size: usize) -> Result<(Vec<u32>, Option<String>)> {
    let (ids, outside): (Vec<u32>, Vec<u32>) = stop_token_ids(path)?
        .into_iter()
        .partition(|&id| (id as usize) < vocab_size);
    let warning = (!outside.is_empty()).then(|| {
        format!(
            "{}: end-of-text id {outside:?} is outside the vocabulary ({vocab_size} tokens); generation stops only at the token limit or a stop string",
            path.display()
        )
    });
    Ok((ids, warning))
}

/// What the checkpoint in `dir` computes (causal, masked or sequence-to-sequence), from its
/// config.json; an unreadable or unsupported config is an error naming the file.
pub fn kind_of(dir: &Path) -> Result<Kind> {
    if gguf::is_gguf(dir) {
        return Ok(Kind::Causal);
    }
    not_a_model_file(dir)?;
    Ok(ModelConfig::load_dir(dir)?.kind())
}

/// A file given where a model is expected must be GGUF: anything else is an error saying so
/// (instead of one about a `config.json` inside it).
fn not_a_model_file(path: &Path) -> Result<()> {
    if path.is_file() {
        return Err(ModelError::Config {
            path: path.to_path_buf(),
            msg: "not a GGUF file (it does not start with `GGUF`); a Hugging Face model is a directory with config.json".into(),
        });
    }
    Ok(())
}

/// The layers a checkpoint's tensor names hold: one more than the highest N of a `layers.N.`,
/// `h.N.` (GPT-2) or `layer.N.` (BERT) path segment, if any name has one.
fn layers_in(names: &[String]) -> Option<usize> {
    names
        .iter()
        .filter_map(|name| {
            let parts: Vec<&str> = name.split('.').collect();
            parts.windows(2).find_map(|w| match w {
                ["layers" | "h" | "layer", n] => n.parse::<usize>().ok(),
                _ => None,
            })
        })
        .max()
        .map(|n| n + 1)
}

/// `Err` unless `dtype` is f32 for a GGUF file, whose weights keep the file's own types.
fn refuse_gguf_dtype(path: &Path, dtype: DType) -> Result<()> {
    if dtype == DType::F32 {
        return Ok(());
    }
    Err(ModelError::Config {
        path: path.to_path_buf(),
        msg: format!(
            "a GGUF file keeps its weights in the file's own types: --dtype {} applies to \
             Hugging Face checkpoint directories (leave it at f32 here)",
            dtype.as_str()
        ),
    })
}

/// `Err` unless `dtype` is f32 with LoRA adapters, which run in f32.
fn refuse_adapter_dtype(dtype: DType) -> Result<()> {
    if dtype == DType::F32 {
        return Ok(());
    }
    Err(ModelError::Device(format!(
        "LoRA adapters run in f32: load the model with --dtype f32, or merge the adapter into \
         it first (`lmkit adapter merge`) and load the merged model in {}",
        dtype.as_str()
    )))
}

/// `Err` unless `dtype` is f32 for the recurrent models, whose cells compute in f32.
fn refuse_rnn_dtype(cfg: &DecoderConfig, dtype: DType) -> Result<()> {
    if dtype == DType::F32 || !matches!(cfg, DecoderConfig::Rnn(_)) {
        return Ok(());
    }
    Err(ModelError::Device(format!(
        "the RNN/LSTM models run in f32 only (--dtype {} asked for)",
        dtype.as_str()
    )))
}

/// A variable source over a checkpoint's safetensors files (memory-mapped, converted to
/// `dtype` as read). With `layers`, weights for more layers than the config has are an error
/// (they would be ignored silently).
pub(crate) fn mmap_weights(
    dir: &Path,
    device: &Device,
    layers: Option<usize>,
    dtype: DType,
) -> Result<candle_nn::VarBuilder<'static>> {
    Ok(checked_weights(dir, layers)?.into_var_builder(dtype, device))
}

/// Every tensor of a checkpoint directory's safetensors files, as f32, checked as loading checks
/// them (no NaN or infinite values): for code that needs the tensors themselves (merging
/// adapters, full fine-tuning).
pub fn checkpoint_tensors(dir: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let weights = checked_weights(dir, None)?;
    let names = weights.tensor_names();
    let backend = weights.into_backend();
    names
        .into_iter()
        .map(|name| {
            let t = backend
                .get_unchecked(&name, DType::F32, device)
                .map_err(|e| tensor_error(dir, e))?;
            Ok((name, t))
        })
        .collect()
}

/// A checkpoint's safetensors files, mapped and checked (non-finite values; with `layers`, more
/// layers than the config has).
fn checked_weights(
    dir: &Path,
    layers: Option<usize>,
) -> Result<lmkit_kernels::system::MappedWeights> {
    let files = weight_files(dir)?;
    for f in &files {
        if !f.exists() {
            return Err(ModelError::Io(lmkit_core::PathError::new(
                f.clone(),
                std::io::Error::new(std::io::ErrorKind::NotFound, "weight file missing"),
            )));
        }
    }
    let bad = |name: String, msg: String| ModelError::Tensor {
        path: dir.to_path_buf(),
        name,
        msg,
    };
    let weights = lmkit_kernels::system::MappedWeights::open(&files)
        .map_err(|e| bad("*".into(), first_line(&e)))?;
    if let Some(name) = weights.non_finite_tensor() {
        return Err(bad(name, "holds NaN or infinite values".into()));
    }
    if let (Some(want), Some(have)) = (layers, layers_in(&weights.tensor_names())) {
        if have > want {
            return Err(ModelError::Config {
                path: dir.join("config.json"),
                msg: format!(
                    "the weights hold {have} layers but the config says {want}; fix the layer count in config.json"
                ),
            });
        }
    }
    Ok(weights)
}

/// A variable source that hands out one tensor per name however often it is asked: models built
/// from it (a base and its adapted variants) share their weights' memory.
struct SharedWeights {
    inner: Box<dyn candle_nn::var_builder::SimpleBackend>,
    /// What it has handed out (a Conv1D weight's [out, in] copy replaces the tensor read,
    /// [`layers::linear::keeping_copies_in`]).
    seen: layers::linear::Loaded,
}

impl candle_nn::var_builder::SimpleBackend for SharedWeights {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = seen
            .get(name)
            .filter(|t| t.shape() == &s && t.dtype() == dtype)
        {
            return Ok(t.clone());
        }
        let t = self.inner.get(s, name, h, dtype, dev)?;
        seen.insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = seen.get(name).filter(|t| t.dtype() == dtype) {
            return Ok(t.clone());
        }
        let t = self.inner.get_unchecked(name, dtype, dev)?;
        seen.insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// A model-construction error naming the tensor candle's message names.
pub(crate) fn tensor_error(path: &Path, e: candle_core::Error) -> ModelError {
    // candle may append a backtrace to its message; the first line says what failed.
    let msg = first_line(&e);
    if msg.starts_with("lora.") {
        // An adapter setting refused while the layers were built (see `lora::check_room`).
        return ModelError::Refused(msg);
    }
    // candle names the tensor in its message ("cannot find tensor X", "shape mismatch for X").
    let name = msg
        .split_whitespace()
        .find(|w| w.contains('.') && w.chars().next().is_some_and(|c| c.is_ascii_alphabetic()))
        .unwrap_or("?")
        .trim_end_matches([',', ':'])
        .to_string();
    ModelError::Tensor {
        path: path.to_path_buf(),
        name,
        msg,
    }
}

pub(crate) fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

impl CausalLm {
    /// Loads `dir/config.json` and the weights (f32) onto `device`. A training output directory
    /// (with a `latest` file naming its newest checkpoint) loads that checkpoint.
    /// A GGUF file (llama / qwen2 / qwen3) loads with its weights kept quantized.
    pub fn load(dir: &Path, device: &Device) -> Result<(CausalLm, DecoderConfig)> {
        Self::load_as(dir, device, DType::F32)
    }

    /// [`load`](Self::load) with the weights (and so the activations) in `dtype`: f32, or bf16
    /// or f16 for inference in half the memory. A GGUF file keeps its own types (`dtype` must be
    /// f32 there).
    pub fn load_as(dir: &Path, device: &Device, dtype: DType) -> Result<(CausalLm, DecoderConfig)> {
        if gguf::is_gguf(dir) {
            refuse_gguf_dtype(dir, dtype)?;
            let mut g = gguf::Gguf::open(dir)?;
            if g.is_gptneox() {
                let m = gpt_neox::GptNeox::from_gguf(&mut g, device)?;
                let cfg = DecoderConfig::GptNeox(m.cfg.clone());
                return Ok((CausalLm::GptNeox(m), cfg));
            }
            let m = llama::Llama::from_gguf(&mut g, device)?;
            let cfg = DecoderConfig::Llama(m.cfg.clone());
            return Ok((CausalLm::Llama(m), cfg));
        }
        not_a_model_file(dir)?;
        let dir = &resolve_checkpoint(dir);
        let cfg = DecoderConfig::load(&dir.join("config.json"))?;
        refuse_rnn_dtype(&cfg, dtype)?;
        let vb = mmap_weights(dir, device, Some(cfg.num_layers()), dtype)?;
        Self::from_var_builder(&cfg, vb, dir).map(|m| (m, cfg))
    }

    /// [`load`](Self::load) with the LoRA adapter directory `adapter` (PEFT's format) added to
    /// the layers it targets, when given.
    pub fn load_adapted(
        dir: &Path,
        adapter: Option<&Path>,
        device: &Device,
        dtype: DType,
    ) -> Result<(CausalLm, DecoderConfig)> {
        match adapter {
            None => Self::load_as(dir, device, dtype),
            Some(a) => {
                refuse_adapter_dtype(dtype)?;
                layers::lora::Adapters::load(a, device)?.build(|| Self::load_as(dir, device, dtype))
            }
        }
    }

    /// The model of `dir` once per entry of `adapters`: plain for `None`, with that adapter set
    /// attached otherwise. The variants of a Hugging Face directory share the base weights'
    /// memory (only the adapters are extra); those of a GGUF file each read the file.
    pub fn load_variants(
        dir: &Path,
        adapters: &[Option<layers::lora::Adapters>],
        device: &Device,
        dtype: DType,
    ) -> Result<(Vec<CausalLm>, DecoderConfig)> {
        let build_one =
            |a: &Option<layers::lora::Adapters>,
             f: &dyn Fn() -> Result<(CausalLm, DecoderConfig)>| match a {
                Some(a) => a.build(f),
                None => f(),
            };
        if adapters.iter().any(Option::is_some) {
            refuse_adapter_dtype(dtype)?;
        }
        let mut out = Vec::new();
        let mut config = None;
        if gguf::is_gguf(dir) {
            refuse_gguf_dtype(dir, dtype)?;
            for a in adapters {
                let (m, c) = build_one(a, &|| Self::load(dir, device))?;
                out.push(m);
                config = Some(c);
            }
        } else {
            not_a_model_file(dir)?;
            let dir = &resolve_checkpoint(dir);
            let cfg = DecoderConfig::load(&dir.join("config.json"))?;
            refuse_rnn_dtype(&cfg, dtype)?;
            let weights = checked_weights(dir, Some(cfg.num_layers()))?;
            let seen = layers::linear::Loaded::default();
            let shared = SharedWeights {
                inner: weights.into_backend(),
                seen: seen.clone(),
            };
            let vb = candle_nn::VarBuilder::from_backend(Box::new(shared), dtype, device.clone());
            layers::linear::keeping_copies_in(&seen, || -> Result<()> {
                for a in adapters {
                    let (m, c) = build_one(a, &|| {
                        Self::from_var_builder(&cfg, vb.clone(), dir).map(|m| (m, cfg.clone()))
                    })?;
                    out.push(m);
                    config = Some(c);
                }
                Ok(())
            })?;
        }
        let config =
            config.ok_or_else(|| ModelError::Device("no model variant asked for".into()))?;
        Ok((out, config))
    }

    /// Builds the model from any variable source (a checkpoint, or fresh variables for training).
    pub fn from_var_builder(
        cfg: &DecoderConfig,
        vb: candle_nn::VarBuilder,
        path: &Path,
    ) -> Result<CausalLm> {
        let built = match cfg {
            DecoderConfig::Gpt2(c) => gpt2::Gpt2::new(c, vb).map(CausalLm::Gpt2),
            DecoderConfig::GptNeox(c) => gpt_neox::GptNeox::new(c, vb).map(CausalLm::GptNeox),
            DecoderConfig::Llama(c) => llama::Llama::new(c, vb).map(CausalLm::Llama),
            DecoderConfig::Rnn(c) => rnn::RnnLm::new(c, vb).map(CausalLm::Rnn),
        };
        built.map_err(|e| tensor_error(path, e))
    }

    pub fn num_layers(&self) -> usize {
        match self {
            CausalLm::Gpt2(m) => m.num_layers(),
            CausalLm::GptNeox(m) => m.num_layers(),
            CausalLm::Llama(m) => m.num_layers(),
            CausalLm::Rnn(m) => m.num_layers(),
        }
    }

    /// Whether the model carries a recurrent state (instead of keys and values) from one
    /// window of text to the next.
    pub fn is_recurrent(&self) -> bool {
        matches!(self, CausalLm::Rnn(_))
    }

    /// Switches training-only behaviour (dropout) on or off.
    pub fn set_training(&self, on: bool) {
        if let CausalLm::Rnn(m) = self {
            m.set_training(on);
        }
    }

    /// Where the weights live.
    pub fn device(&self) -> &Device {
        match self {
            CausalLm::Gpt2(m) => m.lm_head().device(),
            CausalLm::GptNeox(m) => m.device(),
            CausalLm::Llama(m) => &m.device,
            CausalLm::Rnn(m) => m.lm_head().device(),
        }
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.num_layers())
    }

    /// A cache for one full pass whose keys/values are not reused (training, scoring): lets
    /// attention use the fused kernel.
    pub fn single_pass_cache(&self) -> KvCache {
        KvCache::single_pass(self.num_layers())
    }

    /// Final hidden states [batch, seq, dim] for `ids`, before the output projection.
    pub fn hidden(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.hidden_rows(ids, &mut [cache])
    }

    /// Like `hidden`, with one cache per batch row: sequences at different positions (each with
    /// its own history) advance together, sharing the weight reads of one batched pass.
    pub fn hidden_rows(&self, ids: &Tensor, caches: &mut [&mut KvCache]) -> Result<Tensor> {
        if rayon::current_thread_index().is_none() && self.device().is_cpu() {
            // Run the pass on a thread of the pool its parallel products use: that thread then
            // takes part in them, instead of the caller's thread sleeping through each product
            // while the pool's threads spin through the caller's sequential work. (A GPU's pass
            // stays on the caller's thread: its work goes to that thread's stream, with that
            // thread's cuBLASLt workspace.)
            return rayon::scope(|_| {
                lmkit_kernels::few_rows::in_pass(|| self.hidden_rows(ids, caches))
            });
        }
        Ok(match self {
            CausalLm::Gpt2(m) => m.hidden(ids, caches)?,
            CausalLm::GptNeox(m) => m.hidden(ids, caches)?,
            CausalLm::Llama(m) => m.hidden(ids, caches)?,
            CausalLm::Rnn(m) => m.hidden(ids, caches)?,
        })
    }

    /// Logits [batch, seq, vocab] for `ids` [batch, seq], row r continuing `caches[r]`.
    pub fn forward_rows(&self, ids: &Tensor, caches: &mut [&mut KvCache]) -> Result<Tensor> {
        self.logits(&self.hidden_rows(ids, caches)?)
    }

    /// The output layer on `hidden`; a half-precision model's logits widened to f32 (sampling
    /// and scoring read f32; an f64 model, as the gradient checks build, keeps f64).
    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let y = self.output().forward(hidden)?;
        Ok(y.to_dtype(layers::ops::compute_dtype(y.dtype()))?)
    }

    /// The output layer (its weight is the token embeddings when they are tied).
    pub fn output(&self) -> &layers::linear::Linear {
        match self {
            CausalLm::Gpt2(m) => m.output(),
            CausalLm::GptNeox(m) => m.output(),
            CausalLm::Llama(m) => m.output(),
            CausalLm::Rnn(m) => m.output(),
        }
    }

    /// Logits [batch, vocab] of the last position only (what sampling needs): the output layer,
    /// the largest product of a prompt pass, runs on one position instead of all.
    pub fn forward_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let hidden = self.hidden(ids, cache)?;
        let t = hidden.dim(1)?;
        self.logits(&hidden.narrow(1, t - 1, 1)?.squeeze(1)?)
    }

    /// Logits [n, vocab] of the last position of each of the n `seqs`, sequence i continuing
    /// `caches[i]` (its keys and values appended there, as [`CausalLm::forward_last`] would).
    /// The sequences go through the model together, one after another in a single row, each
    /// attending only to its own cache and its own positions: the products read the weights
    /// once for all of them (prompts arriving together are read in one pass instead of one
    /// pass each). Single tokens (decoding steps) go as one row each; recurrent models read the
    /// sequences one at a time.
    pub fn forward_packed_last(
        &self,
        seqs: &[&[u32]],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        check_packed(seqs, caches)?;
        if seqs.len() > 1 && seqs.iter().all(|s| s.len() == 1) {
            // Decoding steps: one row each, every row continuing its own cache.
            let ids = Tensor::new(seqs.concat(), self.device())?.unsqueeze(1)?;
            return Ok(self.forward_rows(&ids, caches)?.squeeze(1)?);
        }
        if seqs.len() == 1 || self.is_recurrent() {
            let rows = seqs
                .iter()
                .zip(caches.iter_mut())
                .map(|(s, c)| self.forward_last(&Tensor::new(*s, self.device())?.unsqueeze(0)?, c))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Tensor::cat(&rows, 0)?);
        }
        let hidden = self.packed_hidden(seqs, caches);
        let ends: Vec<u32> = seqs
            .iter()
            .scan(0, |end, s| {
                *end += s.len();
                Some(*end as u32 - 1)
            })
            .collect();
        let ends = Tensor::new(ends.as_slice(), self.device())?;
        let last = hidden?.squeeze(0)?.index_select(&ends, 0)?;
        self.logits(&last)
    }

    /// Logits [n, vocab] of every position of the `seqs` (n positions in all), sequence i
    /// continuing `caches[i]`: the sequences go through the model together as in
    /// [`CausalLm::forward_packed_last`] (one at a time for recurrent models).
    pub fn forward_packed(&self, seqs: &[&[u32]], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        check_packed(seqs, caches)?;
        if seqs.len() == 1 || self.is_recurrent() {
            let rows = seqs
                .iter()
                .zip(caches.iter_mut())
                .map(|(s, c)| {
                    let ids = Tensor::new(*s, self.device())?.unsqueeze(0)?;
                    Ok(self.forward(&ids, c)?.squeeze(0)?)
                })
                .collect::<Result<Vec<_>>>()?;
            return Ok(Tensor::cat(&rows, 0)?);
        }
        self.logits(&self.packed_hidden(seqs, caches)?.squeeze(0)?)
    }

    /// Hidden states [1, n, dim] of the `seqs` packed one after another in a single row, each
    /// attending only to its own cache and positions.
    fn packed_hidden(&self, seqs: &[&[u32]], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let ids: Vec<u32> = seqs.concat();
        let t = ids.len();
        for (c, s) in caches.iter_mut().zip(seqs) {
            c.queue(s.len());
        }
        let hidden = Tensor::from_vec(ids, (1, t), self.device())
            .map_err(ModelError::from)
            .and_then(|ids| self.hidden_rows(&ids, caches));
        // Whether the pass ended or failed part-way, the counts were for it alone.
        caches.iter_mut().for_each(|c| c.queue(0));
        hidden
    }

    /// Logits [batch, seq, vocab] (f32) for `ids` [batch, seq] continuing the cached positions.
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.logits(&self.hidden(ids, cache)?)
    }
}

/// Packed sequences' checks: one cache each, none empty.
fn check_packed(seqs: &[&[u32]], caches: &[&mut KvCache]) -> Result<()> {
    if seqs.len() != caches.len() {
        return Err(candle_core::Error::Msg(format!(
            "{} sequences for {} caches",
            seqs.len(),
            caches.len()
        ))
        .into());
    }
    if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
        return Err(candle_core::Error::Msg(format!("sequence {i} is empty")).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_ids_outside_the_vocabulary_are_dropped_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"eos_token_id": [2, 50256]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": 5}"#,
        )
        .unwrap();
        let (ids, warning) = sampleable_stop_ids(dir.path(), 97).unwrap();
        assert_eq!(ids, vec![2, 5]);
        let w = warning.expect("a warning");
        assert!(
            w.contains("[50256] is outside the vocabulary (97 tokens)"),
            "{w}"
        );
        let (ids, warning) = sampleable_stop_ids(dir.path(), 60000).unwrap();
        assert_eq!(ids, vec![2, 50256, 5]);
        assert!(warning.is_none());
    }
}
