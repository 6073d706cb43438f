//! Checkpoints: `OUT/ckpt-NNNNNN/` is a complete Hugging Face model directory (config.json,
//! model.safetensors, tokenizer files, generation_config.json) plus `trainer_state/` (optimizer
//! moments, step, seed). It is written into a temporary directory, fsynced and renamed into place;
//! then `OUT/latest` (written atomically) names it. A crash at any moment leaves the previous
//! checkpoint intact and `latest` pointing at a complete one.

use crate::error::{Result, TrainError};
use crate::safetensors_io::write_safetensors;
use candle_core::Tensor;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

pub const LATEST: &str = "latest";

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct TrainerState {
    pub step: usize,
    pub seed: u64,
    pub tokens_seen: u64,
    pub elapsed_seconds: f64,
    /// The model config the weights belong to (checked on resume).
    pub model: serde_json::Value,
}

pub struct CheckpointFiles<'a> {
    pub config_json: &'a serde_json::Value,
    pub weights: &'a [(String, Tensor)],
    pub optimizer: &'a [(String, Tensor)],
    pub state: &'a TrainerState,
    pub tokenizer_dir: &'a Path,
    pub generation_config: &'a serde_json::Value,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::io(path, e)
}

fn write_file(
    path: &Path,
    f: impl FnOnce(&mut BufWriter<&std::fs::File>) -> Result<()>,
) -> Result<()> {
    let file = std::fs::File::create(path).map_err(io(path))?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, &file);
        f(&mut w)?;
        std::io::Write::flush(&mut w).map_err(io(path))?;
    }
    file.sync_all().map_err(io(path))
}

fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<()> {
    write_file(path, |w| {
        serde_json::to_writer_pretty(w, v).map_err(|e| TrainError::io(path, e.into()))
    })
}

/// Writes checkpoint `step` under `out` and points `out/latest` at it; removes all but the newest `keep`.
pub fn save(out: &Path, step: usize, files: &CheckpointFiles, keep: usize) -> Result<PathBuf> {
    let tmp = lmkit_core::AtomicDir::create_in(out)?;
    let dir = tmp.path();
    write_json(&dir.join("config.json"), files.config_json)?;
    write_json(&dir.join("generation_config.json"), files.generation_config)?;
    let weights = dir.join("model.safetensors");
    write_file(&weights, |w| {
        write_safetensors(files.weights, w).map_err(TrainError::from)
    })?;
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        let src = files.tokenizer_dir.join(name);
        if src.exists() {
            std::fs::copy(&src, dir.join(name)).map_err(io(&src))?;
        }
    }
    let ts = dir.join("trainer_state");
    std::fs::create_dir(&ts).map_err(io(&ts))?;
    let opt = ts.join("optimizer.safetensors");
    write_file(&opt, |w| {
        write_safetensors(files.optimizer, w).map_err(TrainError::from)
    })?;
    write_json(&ts.join("state.json"), files.state)?;

    let name = format!("ckpt-{step:06}");
    let final_dir = tmp.commit(&name)?;
    let latest = out.join(LATEST);
    lmkit_core::write_atomic_bytes(&latest, name.as_bytes())?;

    let mut all: Vec<PathBuf> = std::fs::read_dir(out)
        .map_err(io(out))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("ckpt-"))
        })
        .collect();
    all.sort();
    for old in all.iter().rev().skip(keep.max(1)) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(final_dir)
}

/// Removes temporary checkpoint directories left by a run that died while writing one.
pub fn remove_partial(out: &Path) {
    lmkit_core::atomic::remove_temporaries(out);
}

/// The checkpoint `out/latest` names.
pub fn latest(out: &Path) -> Result<PathBuf> {
    let p = out.join(LATEST);
    let name = std::fs::read_to_string(&p).map_err(|e| TrainError::Resume {
        path: p.clone(),
        msg: format!("no checkpoint to resume from ({e})"),
    })?;
    let dir = out.join(name.trim());
    if !dir.join("trainer_state").join("state.json").exists() {
        return Err(TrainError::Resume {
            path: dir,
            msg: "the checkpoint `latest` names is incomplete".into(),
        });
    }
    Ok(dir)
}
