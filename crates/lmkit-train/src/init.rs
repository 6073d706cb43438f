//! A new model: its `config.json` from `[model]` and the tokenizer, its initial weights and its
//! optimizer parameters, both decided by each tensor's role.

use crate::adamw::Param;
use crate::error::{Result, TrainError};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use lmkit_core::rng::{mix, MixChain, Random};
use lmkit_models::{ModelConfig, ParamRole, SpecialIds};
use rayon::prelude::*;
use std::path::Path;

/// The model's `config.json` as JSON — `[model]` with the vocabulary size, the tokenizer's
/// special-token ids and the class name transformers needs — and the validated config.
pub(crate) fn hf_config(
    model: &toml::Table,
    vocab_size: usize,
    ids: SpecialIds,
) -> Result<(serde_json::Value, ModelConfig)> {
    let mut v = serde_json::to_value(model).map_err(|e| TrainError::Data(e.to_string()))?;
    let at = Path::new("[model]");
    let family = lmkit_models::registry::family_of(&v, at)?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| TrainError::Data("[model] must be a table".into()))?;
    obj.entry("vocab_size")
        .or_insert(serde_json::json!(vocab_size));
    for (field, id) in family.token_id_fields(ids) {
        if let Some(id) = id {
            obj.entry(field).or_insert(serde_json::json!(id));
        }
    }
    obj.insert(
        "architectures".into(),
        serde_json::json!([family.architecture]),
    );
    obj.insert("torch_dtype".into(), serde_json::json!("float32"));
    let cfg = ModelConfig::from_json(v.clone(), at)?;
    // A typo (`n_layers`) would otherwise be ignored and written to config.json: `[model]` takes
    // only the fields its family reads, as `[train]` and `[data]` do.
    let known = cfg.known_fields();
    if let Some(bad) = model.keys().find(|k| !known.contains(k)) {
        return Err(TrainError::Data(format!(
            "[model]: unknown field `{bad}` for model_type `{}` (its fields: {})",
            family.model_type,
            known.join(", ")
        )));
    }
    Ok((v, cfg))
}

/// Refuses a run of `cfg` that cannot fit in the memory the machine has, before anything is
/// allocated (an allocation failure aborts the process). The estimate, roughly: f32 weights,
/// gradients and AdamW's two moments (4 × 4 bytes a parameter), the activations a step keeps for
/// its backward pass (about 24 residual-stream widths per layer and token), and the output
/// layer's logits, computed in chunks of 512 rows.
pub(crate) fn check_memory(cfg: &ModelConfig, batch: usize, seq: usize) -> Result<()> {
    let Some(avail) = lmkit_core::memory::available() else {
        return Ok(());
    };
    let params = cfg.num_parameters() as f64 * 16.0;
    let tokens = batch as f64 * seq as f64;
    let acts = tokens * cfg.num_layers() as f64 * cfg.width() as f64 * 24.0 * 4.0
        + tokens.min(512.0) * cfg.vocab_size() as f64 * 4.0 * 3.0;
    if params + acts <= avail as f64 {
        return Ok(());
    }
    use lmkit_core::memory::gib;
    Err(TrainError::Data(format!(
        "this run needs about {} ({} parameters: {} for weights, gradients and optimizer \
         state; {} for activations of batch {batch} × {seq} tokens) but {} are available; \
         shrink [model] or train.batch_size / train.seq_len",
        gib(params + acts),
        match cfg.num_parameters() {
            n if n < 1_000_000_000_000_000 => n.to_string(),
            n => format!("{:.2e}", n as f64),
        },
        gib(params),
        gib(acts),
        gib(avail as f64)
    )))
}

/// Refuses a step of `rows` sequences of `seq` positions (`rows` named by `what`) through
/// `model` whose hidden states alone — one f32 vector of the model's width a position, the least
/// a pass keeps — exceed the memory the machine has: such a step would abort on allocation. A
/// lower bound, so it refuses only sizes no pass could hold.
pub(crate) fn check_step_tokens(
    model: &lmkit_models::CausalLm,
    rows: f64,
    seq: usize,
    what: &str,
) -> Result<()> {
    let Some(avail) = lmkit_core::memory::available() else {
        return Ok(());
    };
    let width = model.output().dims()?.1;
    let bytes = rows * seq as f64 * width as f64 * 4.0;
    if bytes <= avail as f64 {
        return Ok(());
    }
    use lmkit_core::memory::gib;
    Err(TrainError::Data(format!(
        "{what} × train.seq_len ({seq}) positions a step: their hidden states alone need {} but \
         {} are available; lower them",
        gib(bytes),
        gib(avail as f64)
    )))
}

/// Initial weights by parameter role (see [`ParamRole`]): GPT-2's N(0, 0.02) with residual
/// projections scaled by 1/√(2·layers), zero biases and unit norm gains (Radford et al. 2019,
/// §2.3); PyTorch's U(−1/√H, 1/√H) for recurrent layers. Deterministic in `seed`.
pub(crate) fn init_weights(vm: &VarMap, cfg: &ModelConfig, seed: u64, dev: &Device) -> Result<()> {
    let data = vm
        .data()
        .lock()
        .map_err(|_| TrainError::Data("variable map lock poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let n_layer = cfg.num_layers();
    // Each tensor draws from its own generator (seeded by its place in name order), so the
    // tensors are filled in parallel with the values a serial pass would give.
    names
        .par_iter()
        .enumerate()
        .try_for_each(|(i, name)| -> Result<()> {
            let var = &data[*name];
            let shape = var.shape().clone();
            let n = shape.elem_count();
            let mut rng = MixChain::new(mix(seed ^ mix(i as u64 + 1)));
            let normal = |rng: &mut MixChain, std: f64| -> Vec<f32> {
                (0..n).map(|_| (rng.normal() * std) as f32).collect()
            };
            let t = match cfg.param_role(name) {
                ParamRole::Recurrent { hidden, .. } => {
                    let k = 1.0 / (hidden as f64).sqrt();
                    let vals: Vec<f32> = (0..n)
                        .map(|_| ((rng.uniform_open() * 2.0 - 1.0) * k) as f32)
                        .collect();
                    Tensor::from_vec(vals, shape, &Device::Cpu)?
                }
                ParamRole::Bias => Tensor::zeros(shape, DType::F32, &Device::Cpu)?,
                ParamRole::NormGain => Tensor::ones(shape, DType::F32, &Device::Cpu)?,
                ParamRole::Embedding | ParamRole::Weight => {
                    Tensor::from_vec(normal(&mut rng, 0.02), shape, &Device::Cpu)?
                }
                ParamRole::ResidualOut => Tensor::from_vec(
                    normal(&mut rng, 0.02 / (2.0 * n_layer as f64).sqrt()),
                    shape,
                    &Device::Cpu,
                )?,
            };
            var.set(&t.to_device(dev)?)?;
            Ok(())
        })
}

/// The optimizer's parameters in name order, weight decay by role.
pub(crate) fn params(vm: &VarMap, cfg: &ModelConfig) -> Result<Vec<Param>> {
    let data = vm
        .data()
        .lock()
        .map_err(|_| TrainError::Data("variable map lock poisoned".into()))?;
    let mut names: Vec<String> = data.keys().cloned().collect();
    names.sort();
    Ok(names
        .into_iter()
        .map(|name| Param {
            var: data[&name].clone(),
            decay: cfg.param_role(&name).decays(),
            name,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel fill gives every tensor the values of its own generator, drawn in order:
    /// the sequence checkpoints and loss curves depend on.
    #[test]
    fn initial_weights_are_each_tensors_own_sequence() {
        let cfg = ModelConfig::from_json(
            serde_json::json!({"model_type": "gpt2", "n_layer": 2, "n_embd": 8, "n_head": 2,
                               "n_positions": 16, "vocab_size": 32}),
            Path::new("test"),
        )
        .unwrap();
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let names = [
            ("transformer.wte.weight", vec![32, 8]),
            ("transformer.h.0.attn.c_proj.weight", vec![8, 8]),
            ("transformer.h.0.attn.c_proj.bias", vec![8]),
            ("transformer.h.0.ln_1.weight", vec![8]),
            ("transformer.h.1.mlp.c_fc.weight", vec![8, 32]),
        ];
        for (name, dims) in &names {
            vm.get(
                dims.as_slice(),
                name,
                candle_nn::Init::Const(7.0),
                DType::F32,
                &dev,
            )
            .unwrap();
        }
        init_weights(&vm, &cfg, 42, &dev).unwrap();
        let mut sorted: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
        sorted.sort();
        let data = vm.data().lock().unwrap();
        for (i, name) in sorted.iter().enumerate() {
            let got: Vec<f32> = data[*name].flatten_all().unwrap().to_vec1().unwrap();
            let mut rng = MixChain::new(mix(42 ^ mix(i as u64 + 1)));
            let std = if name.ends_with("c_proj.weight") {
                0.02 / (2.0 * 2f64).sqrt() // 2 layers
            } else {
                0.02
            };
            let want: Vec<f32> = if name.ends_with("bias") {
                vec![0.0; got.len()]
            } else if name.contains(".ln_") {
                vec![1.0; got.len()]
            } else {
                (0..got.len())
                    .map(|_| (rng.normal() * std) as f32)
                    .collect()
            };
            assert_eq!(got, want, "{name}");
        }
    }
}
