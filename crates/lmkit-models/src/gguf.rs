//! GGUF checkpoints (llama.cpp's format): one file with the hyper-parameters and tokenizer as
//! metadata and the weights in GGML's block-quantized types. Read with candle's GGUF reader;
//! every tensor is checked against the file's size when it is opened, so a truncated or damaged
//! file is an error naming the file (and tensor), not a crash later.

use crate::error::{ModelError, Result};
use crate::families::llama::{Arch, LlamaConfig};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// The architectures lmkit runs from a GGUF file (`general.architecture` is their `model_type`).
pub const ARCHITECTURES: &[Arch] = &[Arch::Llama, Arch::Qwen2, Arch::Qwen3];

pub use lmkit_core::is_gguf;

/// An open GGUF file.
pub struct Gguf {
    path: PathBuf,
    content: Content,
    file: std::fs::File,
}

impl Gguf {
    /// Reads the header and checks that every tensor lies inside the file.
    pub fn open(path: &Path) -> Result<Gguf> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| ModelError::Io(lmkit_core::PathError::new(path, e)))?;
        let bad = |msg: String| ModelError::Config {
            path: path.to_path_buf(),
            msg,
        };
        // Buffered: the reader takes every metadata string (tens of thousands of vocabulary
        // tokens and merges) with its own small reads.
        let content = Content::read(&mut std::io::BufReader::with_capacity(1 << 20, &mut file))
            .map_err(|e| {
                bad(format!(
                    "not a readable GGUF file: {}",
                    crate::first_line(&e)
                ))
            })?;
        let size = file
            .metadata()
            .map_err(|e| ModelError::Io(lmkit_core::PathError::new(path, e)))?
            .len();
        for (name, info) in &content.tensor_infos {
            let n = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if !n.is_multiple_of(block) {
                return Err(bad(format!(
                    "tensor `{name}` has {n} values, not a whole number of {:?} blocks of {block}",
                    info.ggml_dtype
                )));
            }
            let bytes = (n / block) as u64 * info.ggml_dtype.type_size() as u64;
            let end = content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|s| s.checked_add(bytes));
            if end.is_none_or(|end| end > size) {
                return Err(bad(format!(
                    "tensor `{name}` ({bytes} bytes at offset {}) lies beyond the end of the file ({size} bytes): the file is truncated or damaged",
                    info.offset
                )));
            }
        }
        Ok(Gguf {
            path: path.to_path_buf(),
            content,
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn bad(&self, msg: String) -> ModelError {
        ModelError::Config {
            path: self.path.clone(),
            msg,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// A string metadata value.
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// An integer metadata value of any width (a negative one is absent).
    pub fn int(&self, key: &str) -> Option<u64> {
        Some(match self.get(key)? {
            Value::U8(v) => *v as u64,
            Value::U16(v) => *v as u64,
            Value::U32(v) => *v as u64,
            Value::U64(v) => *v,
            Value::I8(v) => u64::try_from(*v).ok()?,
            Value::I16(v) => u64::try_from(*v).ok()?,
            Value::I32(v) => u64::try_from(*v).ok()?,
            Value::I64(v) => u64::try_from(*v).ok()?,
            _ => return None,
        })
    }

    /// A float metadata value.
    pub fn float(&self, key: &str) -> Option<f64> {
        match self.get(key)? {
            Value::F32(v) => Some(*v as f64),
            Value::F64(v) => Some(*v),
            _ => self.int(key).map(|v| v as f64),
        }
    }

    fn need_int(&self, key: &str) -> Result<usize> {
        self.int(key)
            .map(|v| v as usize)
            .ok_or_else(|| self.bad(format!("metadata `{key}` is missing or not an integer")))
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.str("general.architecture")
            .ok_or_else(|| self.bad("metadata `general.architecture` is missing".into()))
    }

    /// The decoder the file holds, when it is one lmkit runs.
    pub fn arch(&self) -> Result<Arch> {
        let name = self.architecture()?;
        ARCHITECTURES
            .iter()
            .copied()
            .find(|a| a.model_type() == name)
            .ok_or_else(|| {
                if name == "gptneox" {
                    return self.bad(
                        "a gptneox file runs as it is (generate, chat, eval, serve); fine-tuning \
                         from it or merging adapters into it needs its transformers directory"
                            .into(),
                    );
                }
                let mut known: Vec<&str> = ARCHITECTURES.iter().map(|a| a.model_type()).collect();
                known.push("gptneox");
                self.bad(format!(
                    "architecture `{name}` is not supported (supported: {})",
                    known.join(", ")
                ))
            })
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The shape of tensor `name` (PyTorch order: [rows, columns]).
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.content.tensor_infos.get(name).map(|i| i.shape.dims())
    }

    /// The storage type of tensor `name`.
    pub fn dtype(&self, name: &str) -> Option<GgmlDType> {
        self.content.tensor_infos.get(name).map(|i| i.ggml_dtype)
    }

    /// The tensor names, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .content
            .tensor_infos
            .keys()
            .map(|s| s.as_str())
            .collect();
        names.sort();
        names
    }

    /// Tensor `name` as stored, checked to have `shape`.
    pub fn qtensor(&mut self, name: &str, shape: &[usize], dev: &Device) -> Result<QTensor> {
        let have = self.shape(name).map(|s| s.to_vec());
        match have {
            None => {
                return Err(ModelError::Tensor {
                    path: self.path.clone(),
                    name: name.into(),
                    msg: "missing from the GGUF file".into(),
                })
            }
            Some(have) if have != shape => {
                return Err(ModelError::Tensor {
                    path: self.path.clone(),
                    name: name.into(),
                    msg: format!("shape {have:?}, expected {shape:?}"),
                })
            }
            Some(_) => {}
        }
        self.content
            .tensor(&mut self.file, name, dev)
            .map_err(|e| ModelError::Tensor {
                path: self.path.clone(),
                name: name.into(),
                msg: crate::first_line(&e),
            })
    }

    /// Tensor `name` dequantized to f32, checked finite.
    pub fn tensor(&mut self, name: &str, shape: &[usize], dev: &Device) -> Result<Tensor> {
        let t = self.qtensor(name, shape, dev)?.dequantize(dev)?;
        let finite = t
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.is_finite());
        if !finite {
            return Err(ModelError::Tensor {
                path: self.path.clone(),
                name: name.into(),
                msg: "holds NaN or infinite values".into(),
            });
        }
        Ok(t)
    }

    /// Whether the file holds a GPT-NeoX model (`general.architecture` = gptneox).
    pub fn is_gptneox(&self) -> bool {
        self.str("general.architecture") == Some("gptneox")
    }

    /// The config of a gptneox file (Pythia, Polyglot-ko), from its metadata.
    pub fn gptneox_config(&self) -> Result<crate::families::gpt_neox::GptNeoxConfig> {
        let key = |k: &str| format!("gptneox.{k}");
        let hidden = self.need_int(&key("embedding_length"))?;
        let heads = self.need_int(&key("attention.head_count"))?;
        let vocab = self
            .shape("token_embd.weight")
            .map(|s| s[0])
            .ok_or_else(|| self.bad("tensor `token_embd.weight` is missing".into()))?;
        let head_dim = hidden / heads.max(1);
        let rotary = self
            .int(&key("rope.dimension_count"))
            .map_or(head_dim, |v| v as usize);
        let parallel = match self.content.metadata.get(&key("use_parallel_residual")) {
            Some(Value::Bool(b)) => *b,
            _ => true,
        };
        let cfg = serde_json::json!({
            "vocab_size": vocab,
            "hidden_size": hidden,
            "num_hidden_layers": self.need_int(&key("block_count"))?,
            "num_attention_heads": heads,
            "intermediate_size": self.need_int(&key("feed_forward_length"))?,
            "rotary_pct": rotary as f64 / head_dim.max(1) as f64,
            "rotary_emb_base": self.float(&key("rope.freq_base")).unwrap_or(10_000.0),
            "max_position_embeddings": self.need_int(&key("context_length"))?,
            "layer_norm_eps": self.float(&key("attention.layer_norm_epsilon")).unwrap_or(1e-5),
            "use_parallel_residual": parallel,
            "attention_bias": self.has_tensor("blk.0.attn_qkv.bias"),
            "tie_word_embeddings": !self.has_tensor("output.weight"),
            "bos_token_id": self.int("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.int("tokenizer.ggml.eos_token_id"),
        });
        let cfg: crate::families::gpt_neox::GptNeoxConfig =
            serde_json::from_value(cfg).map_err(|e| self.bad(e.to_string()))?;
        crate::families::FamilyConfig::validate(&cfg).map_err(|m| self.bad(m))?;
        if cfg.rotary_dims() != rotary {
            return Err(self.bad(format!(
                "{} = {rotary} is not a whole share of head_dim {head_dim}",
                key("rope.dimension_count")
            )));
        }
        Ok(cfg)
    }

    /// The decoder config of a llama / qwen2 / qwen3 file, from its metadata.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.arch()?;
        let key = |k: &str| format!("{}.{k}", arch.model_type());
        if let Some(kind) = self.str(&key("rope.scaling.type")) {
            if kind != "none" {
                return Err(self.bad(format!(
                    "rope scaling `{kind}` ({}) is not supported yet",
                    key("rope.scaling.type")
                )));
            }
        }
        let hidden = self.need_int(&key("embedding_length"))?;
        let heads = self.need_int(&key("attention.head_count"))?;
        let head_dim = self.int(&key("attention.key_length")).map(|v| v as usize);
        let vocab = self
            .shape("token_embd.weight")
            .map(|s| s[0])
            .ok_or_else(|| self.bad("tensor `token_embd.weight` is missing".into()))?;
        let cfg = LlamaConfig {
            arch,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.need_int(&key("feed_forward_length"))?,
            num_hidden_layers: self.need_int(&key("block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: self
                .int(&key("attention.head_count_kv"))
                .map(|v| v as usize),
            head_dim,
            max_position_embeddings: self.need_int(&key("context_length"))?,
            rms_norm_eps: self
                .float(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-6),
            rope_theta: self.float(&key("rope.freq_base")).unwrap_or(10_000.0),
            hidden_act: "silu".into(),
            tie_word_embeddings: !self.has_tensor("output.weight"),
            attention_bias: false,
            mlp_bias: false,
            rope_scaling: None,
            rope_parameters: None,
            other: Default::default(),
            bos_token_id: self.int("tokenizer.ggml.bos_token_id").map(|v| v as u32),
            eos_token_id: self.int("tokenizer.ggml.eos_token_id").map(|v| v as u32),
        };
        cfg.validate().map_err(|m| self.bad(m))?;
        if let Some(dims) = self.int(&key("rope.dimension_count")) {
            if dims as usize != cfg.head_dim() {
                return Err(self.bad(format!(
                    "partial rotary embeddings ({} = {dims}, head_dim {}) are not supported",
                    key("rope.dimension_count"),
                    cfg.head_dim()
                )));
            }
        }
        Ok(cfg)
    }

    /// A llama / qwen2 / qwen3 file as a transformers checkpoint: its `config.json` and every
    /// tensor under transformers' name, dequantized to f32 (query/key rows back in
    /// transformers' order).
    pub fn as_transformers(&mut self) -> Result<(serde_json::Value, Vec<(String, Tensor)>)> {
        let cfg = self.llama_config()?;
        let dev = Device::Cpu;
        let (v, h, i) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
        let (hd, nh, kv) = (cfg.head_dim(), cfg.num_attention_heads, cfg.num_kv_heads());
        let interleaved = self.rope_interleaved()?;
        let mut out = vec![
            (
                "model.embed_tokens.weight".to_string(),
                self.tensor("token_embd.weight", &[v, h], &dev)?,
            ),
            (
                "model.norm.weight".to_string(),
                self.tensor("output_norm.weight", &[h], &dev)?,
            ),
        ];
        if !cfg.tie_word_embeddings {
            out.push((
                "lm_head.weight".into(),
                self.tensor("output.weight", &[v, h], &dev)?,
            ));
        }
        for l in 0..cfg.num_hidden_layers {
            let blk = format!("blk.{l}");
            let hf = format!("model.layers.{l}");
            let projections: [(&str, &str, usize, usize, Option<usize>); 7] = [
                ("attn_q", "self_attn.q_proj", nh * hd, h, Some(nh)),
                ("attn_k", "self_attn.k_proj", kv * hd, h, Some(kv)),
                ("attn_v", "self_attn.v_proj", kv * hd, h, None),
                ("attn_output", "self_attn.o_proj", h, nh * hd, None),
                ("ffn_gate", "mlp.gate_proj", i, h, None),
                ("ffn_up", "mlp.up_proj", i, h, None),
                ("ffn_down", "mlp.down_proj", h, i, None),
            ];
            for (name, path, rows, cols, heads) in projections {
                let mut q = self.qtensor(&format!("{blk}.{name}.weight"), &[rows, cols], &dev)?;
                if let (Some(heads), true) = (heads, interleaved) {
                    q = unpermute_rows(q, heads)?;
                }
                out.push((format!("{hf}.{path}.weight"), q.dequantize(&dev)?));
                let bias = format!("{blk}.{name}.bias");
                if self.has_tensor(&bias) {
                    out.push((
                        format!("{hf}.{path}.bias"),
                        self.tensor(&bias, &[rows], &dev)?,
                    ));
                }
            }
            for (name, path, size) in [
                ("attn_norm", "input_layernorm", h),
                ("ffn_norm", "post_attention_layernorm", h),
                ("attn_q_norm", "self_attn.q_norm", hd),
                ("attn_k_norm", "self_attn.k_norm", hd),
            ] {
                let full = format!("{blk}.{name}.weight");
                if self.has_tensor(&full) {
                    out.push((
                        format!("{hf}.{path}.weight"),
                        self.tensor(&full, &[size], &dev)?,
                    ));
                }
            }
        }
        let mut config = serde_json::to_value(&cfg).map_err(|e| self.bad(e.to_string()))?;
        if let Some(map) = config.as_object_mut() {
            map.retain(|_, v| !v.is_null());
            map.insert("model_type".into(), cfg.arch.model_type().into());
            map.insert(
                "architectures".into(),
                serde_json::json!([cfg.arch.architecture()]),
            );
            map.insert("torch_dtype".into(), "float32".into());
            // A llama file with projection biases (qwen2's are implied by its model_type).
            if cfg.arch == Arch::Llama && out.iter().any(|(n, _)| n.ends_with("q_proj.bias")) {
                map.insert("attention_bias".into(), true.into());
            }
        }
        Ok((config, out))
    }

    /// Whether this file's query/key rows are in llama.cpp's interleaved rotary order (its
    /// converter permutes them for the `llama` architecture; qwen2/3 keep transformers' order).
    pub fn rope_interleaved(&self) -> Result<bool> {
        Ok(self.arch()? == Arch::Llama)
    }
}

/// The types `lmkit quantize` writes, by the names llama.cpp's tools use, with llama.cpp's
/// `general.file_type` code.
pub const QUANT_TYPES: &[(&str, GgmlDType, u32)] = &[
    ("f32", GgmlDType::F32, 0),
    ("f16", GgmlDType::F16, 1),
    ("q4_0", GgmlDType::Q4_0, 2),
    ("q4_1", GgmlDType::Q4_1, 3),
    ("q8_0", GgmlDType::Q8_0, 7),
    ("q2_k", GgmlDType::Q2K, 10),
    ("q3_k", GgmlDType::Q3K, 11),
    ("q4_k", GgmlDType::Q4K, 14),
    ("q5_k", GgmlDType::Q5K, 16),
    ("q6_k", GgmlDType::Q6K, 18),
];

/// What [`write_llama`] wrote.
#[derive(Debug, Default)]
pub struct QuantizeReport {
    pub tensors: usize,
    /// Tensors whose rows are not a whole number of blocks of the asked type, written as Q8_0
    /// (or f16) instead.
    pub fallbacks: Vec<String>,
    pub bytes: u64,
}

/// Writes the Llama-family checkpoint in `dir` (config.json + safetensors) as a GGUF file of
/// weight type `ty` that llama.cpp runs: transformers' tensor names mapped to llama.cpp's, query
/// and key rows permuted to its rotary layout, norms kept f32; `tokenizer` is the
/// `tokenizer.ggml.*` metadata. Written atomically.
pub fn write_llama(
    dir: &Path,
    out: &Path,
    ty: &str,
    tokenizer: Vec<(String, Value)>,
) -> Result<QuantizeReport> {
    let (_, dtype, file_type) =
        *QUANT_TYPES
            .iter()
            .find(|(n, ..)| *n == ty)
            .ok_or_else(|| ModelError::Config {
                path: out.to_path_buf(),
                msg: format!(
                    "unknown quantization type `{ty}` (supported: {})",
                    QUANT_TYPES
                        .iter()
                        .map(|t| t.0)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
    let dir = crate::resolve_checkpoint(dir);
    let cfg_path = dir.join("config.json");
    let cfg: LlamaConfig = crate::registry::load_family(&cfg_path)?;
    let bad = |msg: String| ModelError::Config {
        path: cfg_path.clone(),
        msg,
    };
    if cfg.attention_bias || cfg.mlp_bias {
        return Err(bad(
            "biases have no place in llama.cpp's `llama` architecture".into(),
        ));
    }
    let rope = cfg.rope().map_err(&bad)?;
    if rope.scaling != crate::families::llama::RopeScaling::None {
        return Err(bad("rope scaling is not written to GGUF yet".into()));
    }
    if u32::try_from(cfg.max_position_embeddings).is_err() {
        return Err(bad(format!(
            "max_position_embeddings ({}) does not fit GGUF's 32-bit `llama.context_length`",
            cfg.max_position_embeddings
        )));
    }
    let dev = Device::Cpu;
    let vb = crate::mmap_weights(&dir, &dev, None, candle_core::DType::F32)?;
    let (h, v, i_size) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let (nh, kv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
    let mut report = QuantizeReport::default();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let get = |name: &str, shape: &[usize]| {
        vb.get(shape, name)
            .map_err(|e| crate::tensor_error(&dir, e))
    };
    // The output layer (the token embeddings when tied) loses the most to few bits: as
    // llama.cpp's presets do, it gets at least Q6_K (Q8_0 where rows are not whole Q6_K blocks).
    let output_name = if cfg.tie_word_embeddings {
        "token_embd.weight"
    } else {
        "output.weight"
    };
    let few_bits = matches!(
        dtype,
        GgmlDType::Q4_0
            | GgmlDType::Q4_1
            | GgmlDType::Q2K
            | GgmlDType::Q3K
            | GgmlDType::Q4K
            | GgmlDType::Q5K
    );
    let mut put =
        |gguf: String, t: Tensor, norm: bool, report: &mut QuantizeReport| -> Result<()> {
            let cols = *t.dims().last().unwrap_or(&0);
            let want = if norm {
                GgmlDType::F32
            } else if few_bits && gguf == output_name {
                if cols.is_multiple_of(256) {
                    GgmlDType::Q6K
                } else {
                    GgmlDType::Q8_0
                }
            } else {
                dtype
            };
            let use_ty = if cols.is_multiple_of(want.block_size()) {
                want
            } else {
                report.fallbacks.push(gguf.clone());
                if cols.is_multiple_of(32) {
                    GgmlDType::Q8_0
                } else {
                    GgmlDType::F16
                }
            };
            tensors.push((gguf, QTensor::quantize(&t, use_ty)?));
            Ok(())
        };
    // llama.cpp's rotary layout: within each head, rows j and j + head_dim/2 side by side.
    let permute = |t: Tensor, heads: usize| -> Result<Tensor> {
        Ok(t.reshape((heads, 2, hd / 2, h))?
            .transpose(1, 2)?
            .reshape((heads * hd, h))?
            .contiguous()?)
    };
    put(
        "token_embd.weight".into(),
        get("model.embed_tokens.weight", &[v, h])?,
        false,
        &mut report,
    )?;
    // Each layer tensor: llama.cpp's name, transformers', its shape, whether it is a norm, and
    // the heads whose rows take llama.cpp's rotary layout.
    let layer = [
        ("attn_norm", "input_layernorm", vec![h], true, None),
        (
            "attn_q",
            "self_attn.q_proj",
            vec![nh * hd, h],
            false,
            Some(nh),
        ),
        (
            "attn_k",
            "self_attn.k_proj",
            vec![kv * hd, h],
            false,
            Some(kv),
        ),
        ("attn_v", "self_attn.v_proj", vec![kv * hd, h], false, None),
        (
            "attn_output",
            "self_attn.o_proj",
            vec![h, nh * hd],
            false,
            None,
        ),
        ("ffn_norm", "post_attention_layernorm", vec![h], true, None),
        ("ffn_gate", "mlp.gate_proj", vec![i_size, h], false, None),
        ("ffn_up", "mlp.up_proj", vec![i_size, h], false, None),
        ("ffn_down", "mlp.down_proj", vec![h, i_size], false, None),
    ];
    for l in 0..cfg.num_hidden_layers {
        for (gguf, hf, shape, norm, heads) in &layer {
            let mut t = get(&format!("model.layers.{l}.{hf}.weight"), shape)?;
            if let Some(heads) = heads {
                t = permute(t, *heads)?;
            }
            put(format!("blk.{l}.{gguf}.weight"), t, *norm, &mut report)?;
        }
    }
    put(
        "output_norm.weight".into(),
        get("model.norm.weight", &[h])?,
        true,
        &mut report,
    )?;
    if !cfg.tie_word_embeddings {
        put(
            "output.weight".into(),
            get("lm_head.weight", &[v, h])?,
            false,
            &mut report,
        )?;
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String(name)),
        ("general.file_type".into(), Value::U32(file_type)),
        ("general.quantization_version".into(), Value::U32(2)),
        ("llama.vocab_size".into(), Value::U32(v as u32)),
        (
            "llama.context_length".into(),
            Value::U32(cfg.max_position_embeddings as u32),
        ),
        ("llama.embedding_length".into(), Value::U32(h as u32)),
        (
            "llama.block_count".into(),
            Value::U32(cfg.num_hidden_layers as u32),
        ),
        (
            "llama.feed_forward_length".into(),
            Value::U32(i_size as u32),
        ),
        ("llama.attention.head_count".into(), Value::U32(nh as u32)),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(kv as u32),
        ),
        ("llama.attention.key_length".into(), Value::U32(hd as u32)),
        ("llama.attention.value_length".into(), Value::U32(hd as u32)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base".into(), Value::F32(rope.theta as f32)),
        ("llama.rope.dimension_count".into(), Value::U32(hd as u32)),
    ];
    meta.extend(tokenizer);
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", cfg.bos_token_id),
        ("tokenizer.ggml.eos_token_id", cfg.eos_token_id),
    ] {
        if let Some(id) = id {
            meta.retain(|(k, _)| k != key);
            meta.push((key.into(), Value::U32(id)));
        }
    }
    let mut buf = std::io::Cursor::new(Vec::new());
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    candle_core::quantized::gguf_file::write(&mut buf, &meta_refs, &tensor_refs)?;
    let bytes = buf.into_inner();
    lmkit_core::write_atomic_bytes(out, &bytes)?;
    report.tensors = tensors.len();
    report.bytes = bytes.len() as u64;
    Ok(report)
}

/// A query/key projection [heads·head_dim, in] whose rows llama.cpp's converter permuted (within
/// each head, rows 2j and 2j+1 hold transformers' rows j and j + head_dim/2) back in
/// transformers' order. Rows of a block-quantized tensor are whole blocks, so this moves bytes.
pub fn unpermute_rows(t: QTensor, heads: usize) -> Result<QTensor> {
    let rows = t.shape().dims2()?.0;
    if heads == 0 || !rows.is_multiple_of(heads) {
        return Err(ModelError::Candle(candle_core::Error::Msg(format!(
            "cannot un-permute a tensor of {rows} rows into {heads} heads"
        ))));
    }
    let (hd, half) = (rows / heads, rows / heads / 2);
    // Row `to` of transformers' order is llama.cpp's row `from`.
    permute_rows(t, |to| {
        let (h, r) = (to / hd, to % hd);
        let (s, j) = (r / half.max(1), r % half.max(1));
        h * hd + 2 * j + s
    })
}

/// The rows of a (block-quantized) matrix reordered: row `to` of the result is row `from(to)`
/// of `t` (blocks run along rows, so each row moves as whole blocks).
pub fn permute_rows(t: QTensor, from: impl Fn(usize) -> usize) -> Result<QTensor> {
    let (rows, cols) = t.shape().dims2()?;
    let dtype = t.dtype();
    let device = t.device();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = t.data()?;
    if data.len() != rows * row_bytes {
        return Err(ModelError::Candle(candle_core::Error::Msg(format!(
            "cannot reorder the rows of a [{rows}, {cols}] tensor of {} bytes",
            data.len()
        ))));
    }
    let mut out = vec![0u8; data.len()];
    for (to, row) in out.chunks_mut(row_bytes.max(1)).enumerate().take(rows) {
        let f = from(to);
        row.copy_from_slice(&data[f * row_bytes..(f + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(Cow::Owned(out), &device, dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermuting_undoes_llama_cpp_s_permutation() {
        let dev = Device::Cpu;
        let (heads, hd, cols) = (2, 4, 32);
        // transformers' rows: row r is all r.
        let rows: Vec<f32> = (0..heads * hd)
            .flat_map(|r| std::iter::repeat_n(r as f32, cols))
            .collect();
        // llama.cpp's permutation: reshape(heads, 2, hd/2, cols).swapaxes(1, 2).
        let mut permuted = Vec::new();
        for h in 0..heads {
            for j in 0..hd / 2 {
                for s in 0..2 {
                    let r = h * hd + s * (hd / 2) + j;
                    permuted.extend_from_slice(&rows[r * cols..(r + 1) * cols]);
                }
            }
        }
        let t = Tensor::from_vec(permuted, (heads * hd, cols), &dev).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let back = unpermute_rows(q, heads)
            .unwrap()
            .dequantize(&dev)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (r, row) in back.iter().enumerate() {
            assert!(row.iter().all(|&v| (v - r as f32).abs() < 0.05), "{r}");
        }
    }

    #[test]
    fn damaged_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, b"GGUF\x03\0\0\0").unwrap();
        let e = Gguf::open(&p).err().unwrap().to_string();
        assert!(e.contains("m.gguf") && e.contains("GGUF"), "{e}");
        std::fs::write(&p, b"NOPE1234").unwrap();
        assert!(!is_gguf(&p));
        let e = Gguf::open(&p).err().unwrap().to_string();
        assert!(e.contains("m.gguf"), "{e}");
    }
}
