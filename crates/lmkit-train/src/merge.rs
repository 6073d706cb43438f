//! `lmkit adapter merge`: a LoRA adapter folded into its base's weights (W + scale·B·A, as PEFT's
//! `merge_and_unload`), written as a plain model directory that needs no adapter to load.

use crate::checkpoint::tokenizer_files;
use crate::error::{Result, TrainError};
use crate::safetensors_io::write_safetensors;
use candle_core::{DType, Device, Tensor};
use lmkit_models::layers::lora::Adapters;
use std::path::Path;

/// Merges `adapter` into the Hugging Face model directory `base` and writes the result to `out`
/// (which must not exist). Returns the number of layers changed.
pub fn merge(base: &Path, adapter: &Path, out: &Path) -> Result<usize> {
    if lmkit_models::gguf::is_gguf(base) {
        return Err(TrainError::Data(format!(
            "{}: merging into a GGUF base is not supported; merge into the Hugging Face directory it was made from",
            base.display()
        )));
    }
    if out.exists() {
        return Err(TrainError::Data(format!(
            "{}: already exists; give a new directory (nothing is overwritten)",
            out.display()
        )));
    }
    let dir = lmkit_models::resolve_checkpoint(base);
    let dev = Device::Cpu;
    let adapters = Adapters::load(adapter, &dev)?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for file in lmkit_models::weight_files(&dir)? {
        for (name, t) in candle_core::safetensors::load(&file, &dev)? {
            tensors.push((name, t.to_dtype(DType::F32)?));
        }
    }
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
    let mut copy = tokenizer_files(&dir);
    copy.push(dir.join("config.json"));
    copy.push(dir.join("generation_config.json"));
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
