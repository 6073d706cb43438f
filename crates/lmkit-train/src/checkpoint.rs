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
    /// Which run wrote the checkpoint: only a run's own checkpoints are ever pruned.
    #[serde(default)]
    pub run_id: String,
}

/// How a run starts in its output directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A new run; the directory must not hold another one.
    New,
    /// Continue the run in the directory from the checkpoint `latest` names.
    Resume,
    /// A new run replacing the one in the directory: its checkpoints, `latest`, metrics and plot
    /// are removed first.
    Overwrite,
}

/// The files of a run in `out`, other than its checkpoints.
const RUN_FILES: &[&str] = &[LATEST, "metrics.jsonl", "loss.svg", "run.toml"];

/// The checkpoint directories in `out` (`ckpt-N` holding a trainer state), by step.
fn checkpoints(out: &Path) -> Vec<(usize, PathBuf)> {
    let mut all: Vec<(usize, PathBuf)> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            let step = name.strip_prefix("ckpt-")?.parse().ok()?;
            p.join("trainer_state").is_dir().then_some((step, p))
        })
        .collect();
    all.sort();
    all
}

/// What of a run `out` holds, described for an error; `None` when it holds none.
pub fn existing_run(out: &Path) -> Option<String> {
    let ckpts = checkpoints(out);
    let mut what = Vec::new();
    if let Some((_, last)) = ckpts.last() {
        let name = last.file_name().unwrap_or_default().to_string_lossy();
        what.push(format!("{} checkpoint(s), the last {name}", ckpts.len()));
    }
    for f in RUN_FILES {
        if out.join(f).exists() {
            what.push((*f).to_string());
        }
    }
    (!what.is_empty()).then(|| what.join(", "))
}

/// Removes the run in `out` (checkpoints and run files), leaving other files alone.
pub fn remove_run(out: &Path) -> Result<()> {
    for (_, dir) in checkpoints(out) {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    for f in RUN_FILES {
        let p = out.join(f);
        if p.exists() {
            std::fs::remove_file(&p).map_err(io(&p))?;
        }
    }
    Ok(())
}

/// A new run's id.
pub fn new_run_id() -> String {
    format!("{:016x}", lmkit_core::rng::fresh_id())
}

/// The run id of the checkpoint in `dir` ("" when unreadable or written before run ids).
fn run_id_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("trainer_state/state.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<TrainerState>(&t).ok())
        .map(|s| s.run_id)
        .unwrap_or_default()
}

/// Tensors by name.
pub(crate) type Named = Vec<(String, Tensor)>;

pub struct CheckpointFiles<'a> {
    /// JSON files of the directory by name (config.json, generation_config.json; an adapter's
    /// adapter_config.json).
    pub json: &'a [(&'a str, &'a serde_json::Value)],
    /// The weights' file name (model.safetensors; adapter_model.safetensors) and tensors.
    pub weights_file: &'a str,
    pub weights: &'a [(String, Tensor)],
    pub optimizer: &'a [(String, Tensor)],
    pub state: &'a TrainerState,
    /// Files copied in where they exist (the tokenizer's).
    pub copy: &'a [PathBuf],
}

/// The tokenizer files of a model directory that a checkpoint carries.
pub fn tokenizer_files(dir: &Path) -> Vec<PathBuf> {
    [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ]
    .iter()
    .map(|n| dir.join(n))
    .collect()
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

/// Writes checkpoint `step` under `out` and points `out/latest` at it; removes all but the newest
/// `keep`, and redraws the run's loss plot (`out/loss.svg`, from `out/metrics.jsonl`).
pub fn save(out: &Path, step: usize, files: &CheckpointFiles, keep: usize) -> Result<PathBuf> {
    let tmp = lmkit_core::AtomicDir::create_in(out)?;
    let dir = tmp.path();
    for (name, v) in files.json {
        write_json(&dir.join(name), v)?;
    }
    let weights = dir.join(files.weights_file);
    write_file(&weights, |w| {
        write_safetensors(files.weights, w).map_err(TrainError::from)
    })?;
    for src in files.copy {
        if let (true, Some(name)) = (src.is_file(), src.file_name()) {
            std::fs::copy(src, dir.join(name)).map_err(io(src))?;
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

    // Prune this run's oldest checkpoints (by step, not name: ckpt-1000000 sorts before
    // ckpt-999999); another run's are never touched.
    let ours: Vec<PathBuf> = checkpoints(out)
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| run_id_of(p) == files.state.run_id)
        .collect();
    for old in ours.iter().rev().skip(keep.max(1)) {
        if *old != final_dir {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    // The plot is a convenience: failing to draw it does not fail the checkpoint.
    let _ = crate::metrics::plot(
        &crate::metrics::read(&out.join("metrics.jsonl")),
        &out.join("loss.svg"),
    );
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

/// Loads the checkpoint `out/latest` names into `opt` (weights from `weights_file`, moments
/// from trainer_state/) after checking that it was written for `model` (the run's identity as
/// stored in its state). Returns its directory, state and every tensor of its optimizer file.
pub(crate) fn restore(
    out: &Path,
    opt: &mut crate::adamw::AdamW,
    weights_file: &str,
    model: &serde_json::Value,
    dev: &candle_core::Device,
) -> Result<(
    PathBuf,
    TrainerState,
    std::collections::HashMap<String, Tensor>,
)> {
    let dir = latest(out)?;
    let state: TrainerState = serde_json::from_str(
        &std::fs::read_to_string(dir.join("trainer_state/state.json"))
            .map_err(|e| TrainError::io(&dir, e))?,
    )
    .map_err(|e| TrainError::Resume {
        path: dir.clone(),
        msg: format!("bad state.json: {e}"),
    })?;
    if state.model != *model {
        return Err(TrainError::Resume {
            path: dir,
            msg: "the checkpoint was trained with a different configuration".into(),
        });
    }
    let weights = candle_core::safetensors::load(dir.join(weights_file), dev)?;
    let moments =
        candle_core::safetensors::load(dir.join("trainer_state/optimizer.safetensors"), dev)?;
    for (i, p) in opt.params.iter().enumerate() {
        let missing = |what: &str| TrainError::Resume {
            path: dir.clone(),
            msg: format!("{what} `{}` missing", p.name),
        };
        p.var
            .set(weights.get(&p.name).ok_or_else(|| missing("weight"))?)?;
        opt.m[i] = moments
            .get(&format!("m.{}", p.name))
            .ok_or_else(|| missing("first moment of"))?
            .clone();
        opt.v[i] = moments
            .get(&format!("v.{}", p.name))
            .ok_or_else(|| missing("second moment of"))?
            .clone();
    }
    opt.step = state.step;
    Ok((dir, state, moments))
}

/// Makes `out` ready for a run starting as `start`: created, temporaries of a run that died
/// while saving removed; a new run refuses a directory holding another run, an overwriting one
/// removes it. Returns the path of the run's metrics.jsonl.
pub(crate) fn prepare(out: &Path, start: Start) -> Result<PathBuf> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    remove_partial(out);
    match start {
        Start::New => {
            if let Some(what) = existing_run(out) {
                return Err(TrainError::RunExists {
                    path: out.to_path_buf(),
                    what,
                });
            }
        }
        Start::Overwrite => remove_run(out)?,
        Start::Resume => {}
    }
    Ok(out.join("metrics.jsonl"))
}

/// The optimizer's parameters by name, and its moments (`m.NAME`, `v.NAME`): what a checkpoint
/// stores.
pub(crate) fn optimizer_tensors(opt: &crate::adamw::AdamW) -> (Named, Named) {
    let weights = opt
        .params
        .iter()
        .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
        .collect();
    let mut moments = Vec::new();
    for (i, p) in opt.params.iter().enumerate() {
        moments.push((format!("m.{}", p.name), opt.m[i].clone()));
        moments.push((format!("v.{}", p.name), opt.v[i].clone()));
    }
    (weights, moments)
}
