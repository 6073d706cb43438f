//! Helpers for tests here and in the crates that use the models.

use crate::{CausalLm, DecoderConfig};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::path::Path;

/// A model on the CPU with random (not zero) weights, from a config in Hugging Face's JSON form:
/// each weight, in the order of the names, drawn uniformly from [-scale, scale) (by
/// [`lmkit_kernels::testing::uniform`] with `seed`: the same model every run). Its weights are
/// plain tensors, as a model read from files has (no gradients tracked, so inference takes its
/// fast paths). Panics on a bad config.
pub fn random_model(config: &str, seed: u64, scale: f32) -> CausalLm {
    random_model_on(config, seed, scale, &Device::Cpu)
}

/// [`random_model`] with its weights on `device` (the same weights on every device).
pub fn random_model_on(config: &str, seed: u64, scale: f32, device: &Device) -> CausalLm {
    random_model_as(config, seed, scale, device, DType::F32)
}

/// [`random_model_on`] with its weights in `dtype` (the f32 draws rounded).
pub fn random_model_as(
    config: &str,
    seed: u64,
    scale: f32,
    device: &Device,
    dtype: DType,
) -> CausalLm {
    let v: serde_json::Value = serde_json::from_str(config).expect("config JSON");
    let cfg = DecoderConfig::from_json(v, Path::new("config.json")).expect("config");
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let model = CausalLm::from_var_builder(&cfg, vb, Path::new("random")).expect("model");
    let mut draw = lmkit_kernels::testing::uniform(seed);
    for (_, var) in lmkit_kernels::testing::vars_by_name(&vm) {
        let values: Vec<f32> = draw(var.elem_count())
            .into_iter()
            .map(|x| 2.0 * scale * x)
            .collect();
        let t = Tensor::from_vec(values, var.shape(), &Device::Cpu).expect("weights");
        var.set(&t).expect("weights");
    }
    drop(model);
    let weights: std::collections::HashMap<String, Tensor> =
        lmkit_kernels::testing::vars_by_name(&vm)
            .into_iter()
            .map(|(name, var)| {
                let t = var.as_tensor().detach().to_device(device).expect("weights");
                (name, t)
            })
            .collect();
    let vb = VarBuilder::from_tensors(weights, dtype, device);
    CausalLm::from_var_builder(&cfg, vb, Path::new("random")).expect("model")
}
