//! Loading checkpoints: weights with NaN or infinite values are refused, naming the tensor; the
//! variants of one checkpoint share its weights.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lmkit_models::{CausalLm, DecoderConfig};
use std::collections::HashMap;
use std::path::Path;

/// Writes `config` (a GPT-2 config) into `dir`; its model's variables, by name.
fn gpt2_variables(dir: &Path, config: serde_json::Value) -> VarMap {
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let cfg = DecoderConfig::from_json(config, Path::new("t")).unwrap();
    let vm = VarMap::new();
    CausalLm::from_var_builder(
        &cfg,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        Path::new("t"),
    )
    .unwrap();
    vm
}

#[test]
fn weights_with_nan_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({"model_type": "gpt2", "vocab_size": 11, "n_positions": 8,
                                    "n_embd": 4, "n_layer": 1, "n_head": 2});
    let vm = gpt2_variables(dir.path(), config);
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

/// The variants of one checkpoint (a base and its adapted versions, as `lmkit serve` loads them)
/// share each weight, GPT-2's Conv1D weights kept [out, in] included, and compute what the
/// checkpoint loaded alone computes.
#[test]
fn variants_share_the_weights_and_compute_as_one_load() {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({"model_type": "gpt2", "vocab_size": 13, "n_positions": 8,
                                    "n_embd": 8, "n_layer": 2, "n_head": 2});
    let vm = gpt2_variables(dir.path(), config);
    let dev = Device::Cpu;
    let tensors: HashMap<String, Tensor> = lmkit_kernels::testing::vars_by_name(&vm)
        .into_iter()
        .enumerate()
        .map(|(i, (k, v))| {
            let t = lmkit_kernels::testing::randn(i as f32 * 0.01, 0.5, v.shape(), &dev).unwrap();
            (k, t)
        })
        .collect();
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();

    let (alone, _) = CausalLm::load(dir.path(), &dev).unwrap();
    let (variants, _) =
        CausalLm::load_variants(dir.path(), &[None, None], &dev, DType::F32).unwrap();
    let conv1d = |m: &CausalLm| match m {
        CausalLm::Gpt2(g) => g.params().blocks[1].c_fc_w.clone(),
        _ => panic!("a GPT-2 model"),
    };
    let (one, two) = (conv1d(&variants[0]), conv1d(&variants[1]));
    assert_eq!(one.id(), two.id(), "one copy for the variants");
    assert_eq!(
        one.to_vec2::<f32>().unwrap(),
        tensors["transformer.h.1.mlp.c_fc.weight"]
            .to_vec2::<f32>()
            .unwrap()
    );
    let ids = Tensor::new(&[[3u32, 1, 4, 1, 5, 9]], &dev).unwrap();
    let logits = |m: &CausalLm| {
        m.forward(&ids, &mut m.new_cache())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let want = logits(&alone);
    for m in &variants {
        assert_eq!(logits(m), want);
    }
}
