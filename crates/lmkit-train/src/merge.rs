//! `lmkit adapter merge`: a LoRA adapter folded into its base's weights (W + scale·B·A, as PEFT's
//! `merge_and_unload`), written as a plain model directory that needs no adapter to load.

use crate::checkpoint::tokenizer_files;
use crate::error::{Result, TrainError};
use crate::safetensors_io::write_safetensors;
use candle_core::Device;
use lmkit_models::layers::lora::Adapters;
use std::path::Path;

/// Merges `adapter` into `base` — a Hugging Face model directory, or a GGUF file (dequantized:
/// the merged model is f32) — and writes the result to `out` (which must not exist) as a
/// Hugging Face model directory. Returns the number of layers changed.
pub fn merge(base: &Path, adapter: &Path, out: &Path) -> Result<usize> {
    if out.exists() {
        return Err(TrainError::Data(format!(
            "{}: already exists; give a new directory (nothing is overwritten)",
            out.display()
        )));
    }
    let dev = Device::Cpu;
    let adapters = Adapters::load(adapter, &dev)?;
    let gguf = lmkit_models::gguf::is_gguf(base);
    let dir = lmkit_models::resolve_checkpoint(base);
    let (gguf_config, mut tensors) = if gguf {
        let (config, all) = lmkit_models::gguf::Gguf::open(base)?.as_transformers()?;
        (Some(config), all)
    } else {
        (None, lmkit_models::checkpoint_tensors(&dir, &dev)?)
    };
    let mut merged = 0;
    for (path, lora) in adapters.layers() {
        let name = format!("{path}.weight");
        let Some((_, w)) = tensors.iter_mut().find(|(n, _)| *n == name) else {
            return Err(TrainError::Data(format!(
                "{}: the adapter changes `{path}`, but the base has no tensor {name}",
                adapter.display()
            )));
        };
        let delta = lora.delta()?;
        let (out_dim, in_dim) = delta.dims2()?;
        let transposed = if adapters.fan_in_fan_out {
            w.dims() == [in_dim, out_dim]
        } else {
            w.dims() != [out_dim, in_dim] && w.dims() == [in_dim, out_dim]
        };
        let delta = if transposed { delta.t()? } else { delta };
        if w.dims() != delta.dims() {
            return Err(TrainError::Data(format!(
                "{}: the adapter for `{path}` is {out_dim}×{in_dim} but the base's {name} is {:?}",
                adapter.display(),
                w.dims()
            )));
        }
        *w = (&*w + delta)?;
        merged += 1;
    }
    // Modules trained whole (modules_to_save) replace the base's; an output layer tied to the
    // embeddings becomes a layer of its own.
    let mut untied = false;
    for (path, weight, bias) in adapters.saved_modules() {
        // A table stored beside its embedding adapter replaces the table (before the adapter's
        // delta is added, below).
        let path = path
            .strip_suffix(".base_layer")
            .unwrap_or(&path)
            .to_string();
        for (name, t) in [("weight", Some(weight)), ("bias", bias)] {
            let Some(t) = t else { continue };
            let name = format!("{path}.{name}");
            match tensors.iter_mut().find(|(n, _)| *n == name) {
                Some((_, w)) if w.dims() == t.dims() => *w = t,
                Some((_, w)) => {
                    return Err(TrainError::Data(format!(
                        "{}: the saved module's {name} is {:?} but the base's is {:?}",
                        adapter.display(),
                        t.dims(),
                        w.dims()
                    )))
                }
                None => {
                    untied |= path == "lm_head";
                    tensors.push((name, t));
                }
            }
        }
        merged += 1;
    }
    // Embedding adapters: scale·(B·A)ᵀ [vocab, dim] onto the table (a tied output layer reads
    // the merged table, as it does in PEFT's merge).
    for (path, lora) in adapters.embedding_layers() {
        let name = format!("{path}.weight");
        let Some((_, w)) = tensors.iter_mut().find(|(n, _)| *n == name) else {
            return Err(TrainError::Data(format!(
                "{}: the adapter changes `{path}`, but the base has no tensor {name}",
                adapter.display()
            )));
        };
        let delta = lora.delta()?.t()?;
        if w.dims() != delta.dims() {
            return Err(TrainError::Data(format!(
                "{}: the embedding adapter for `{path}` is {:?} but the base's {name} is {:?}",
                adapter.display(),
                delta.dims(),
                w.dims()
            )));
        }
        *w = (&*w + delta)?;
        merged += 1;
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    };
    std::fs::create_dir_all(&parent).map_err(|e| TrainError::io(&parent, e))?;
    let tmp = lmkit_core::AtomicDir::create_in(&parent)?;
    let file = tmp.path().join("model.safetensors");
    let f = std::fs::File::create(&file).map_err(|e| TrainError::io(&file, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &f);
    write_safetensors(&tensors, &mut w)?;
    std::io::Write::flush(&mut w).map_err(|e| TrainError::io(&file, e))?;
    drop(w);
    f.sync_all().map_err(|e| TrainError::io(&file, e))?;
    let mut copy = Vec::new();
    match gguf_config {
        Some(mut config) => {
            if untied {
                config["tie_word_embeddings"] = false.into();
            }
            write_gguf_side_files(base, &config, tmp.path())?
        }
        None => {
            copy = tokenizer_files(&dir);
            copy.push(dir.join("generation_config.json"));
            let src = dir.join("config.json");
            if untied {
                let text = std::fs::read_to_string(&src).map_err(|e| TrainError::io(&src, e))?;
                let mut config: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| TrainError::Data(format!("{}: {e}", src.display())))?;
                config["tie_word_embeddings"] = false.into();
                write_json(&tmp.path().join("config.json"), &config)?;
            } else {
                copy.push(src);
            }
        }
    }
    for src in copy {
        if let (true, Some(name)) = (src.is_file(), src.file_name()) {
            std::fs::copy(&src, tmp.path().join(name)).map_err(|e| TrainError::io(&src, e))?;
        }
    }
    let name = out
        .file_name()
        .ok_or_else(|| TrainError::Data(format!("{}: not a directory name", out.display())))?;
    tmp.commit(name)?;
    Ok(merged)
}

/// config.json, tokenizer.json and tokenizer_config.json (chat template, special tokens) of a
/// model read from the GGUF file `base`, written into `dir`.
fn write_gguf_side_files(base: &Path, config: &serde_json::Value, dir: &Path) -> Result<()> {
    let write = |name: &str, v: &serde_json::Value| write_json(&dir.join(name), v);
    write("config.json", config)?;
    let tk = lmkit_tokenize::load(base)?;
    let p = dir.join("tokenizer.json");
    tk.save(&p, false)
        .map_err(|e| TrainError::Data(format!("{}: {e}", p.display())))?;
    let meta = lmkit_tokenize::gguf::GgufMeta::read(base)?;
    let mut tc = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
    });
    for (key, which) in [
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("unk_token", "unk"),
        ("pad_token", "padding"),
    ] {
        if let Some(t) = meta.special_token(which) {
            tc[key] = t.into();
        }
    }
    if let Some(t) = meta.chat_template() {
        tc["chat_template"] = t.into();
    }
    write("tokenizer_config.json", &tc)
}

fn write_json(p: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| TrainError::Data(e.to_string()))?;
    std::fs::write(p, text).map_err(|e| TrainError::io(p, e))
}
