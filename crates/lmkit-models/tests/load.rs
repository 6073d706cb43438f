//! Loading checkpoints: weights with NaN or infinite values are refused, naming the tensor.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lmkit_models::{CausalLm, DecoderConfig};
use std::collections::HashMap;
use std::path::Path;

#[test]
fn weights_with_nan_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({"model_type": "gpt2", "vocab_size": 11, "n_positions": 8,
                                    "n_embd": 4, "n_layer": 1, "n_head": 2});
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let cfg = DecoderConfig::from_json(config, Path::new("t")).unwrap();
    let vm = VarMap::new();
    CausalLm::from_var_builder(
        &cfg,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        Path::new("t"),
    )
    .unwrap();
    let mut tensors: HashMap<String, Tensor> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().ones_like().unwrap()))
        .collect();
    let file = dir.path().join("model.safetensors");
    candle_core::safetensors::save(&tensors, &file).unwrap();
    assert!(CausalLm::load(dir.path(), &Device::Cpu).is_ok());

    let name = "transformer.h.0.mlp.c_fc.weight";
    let t = &tensors[name];
    let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v[5] = f32::NAN;
    tensors.insert(
        name.into(),
        Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let e = CausalLm::load(dir.path(), &Device::Cpu)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains(name) && e.contains("NaN"), "{e}");
}
