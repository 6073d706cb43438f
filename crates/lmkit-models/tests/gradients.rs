//! Gradient check: autograd gradients of the language-model loss equal central finite differences
//! (in f64) for every parameter tensor of small GPT-2, Llama, GPT-NeoX, RNN and LSTM models — attention,
//! softmax, norms, rotary embeddings, MLPs, recurrences and embeddings included.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lmkit_models::{CausalLm, Cell, DecoderConfig, Gpt2Config, LlamaConfig, RnnConfig};
use std::path::Path;

/// With `single_pass`, GPT-2 and Llama take the fused attention kernels (the training path).
fn loss(m: &CausalLm, x: &Tensor, y: &Tensor, single_pass: bool) -> Tensor {
    let mut cache = if single_pass {
        m.single_pass_cache()
    } else {
        m.new_cache()
    };
    let logits = m.forward(x, &mut cache).unwrap();
    let (b, t, v) = logits.dims3().unwrap();
    candle_nn::loss::cross_entropy(
        &logits.reshape((b * t, v)).unwrap(),
        &y.reshape(b * t).unwrap(),
    )
    .unwrap()
}

fn check(cfg: DecoderConfig, single_pass: bool) {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let m = CausalLm::from_var_builder(
        &cfg,
        VarBuilder::from_varmap(&vm, DType::F64, &dev),
        Path::new("t"),
    )
    .unwrap();
    // Non-trivial values everywhere (norm gains and biases too), deterministic.
    let mut state = 12345u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64 / (1u64 << 53) as f64) - 0.5
    };
    let vars = lmkit_kernels::testing::vars_by_name(&vm);
    for (name, var) in &vars {
        let n = var.elem_count();
        let base = if name.contains("ln_") || name.contains("norm") {
            1.0
        } else {
            0.0
        };
        let vals: Vec<f64> = (0..n).map(|_| base + next() * 0.6).collect();
        var.set(&Tensor::from_vec(vals, var.shape(), &dev).unwrap())
            .unwrap();
    }
    let x = Tensor::new(&[[1u32, 5, 7, 2, 9, 3], [4, 4, 8, 0, 6, 1]], &dev).unwrap();
    let y = Tensor::new(&[[5u32, 7, 2, 9, 3, 1], [4, 8, 0, 6, 1, 2]], &dev).unwrap();
    let grads = loss(&m, &x, &y, single_pass).backward().unwrap();
    let h = 1e-5;
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reaches {name}"));
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let orig: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        // A few elements of each tensor.
        for k in [0, orig.len() / 3, orig.len() - 1] {
            let mut plus = orig.clone();
            plus[k] += h;
            var.set(&Tensor::from_vec(plus, var.shape(), &dev).unwrap())
                .unwrap();
            let lp = loss(&m, &x, &y, single_pass).to_scalar::<f64>().unwrap();
            let mut minus = orig.clone();
            minus[k] -= h;
            var.set(&Tensor::from_vec(minus, var.shape(), &dev).unwrap())
                .unwrap();
            let lm = loss(&m, &x, &y, single_pass).to_scalar::<f64>().unwrap();
            var.set(&Tensor::from_vec(orig.clone(), var.shape(), &dev).unwrap())
                .unwrap();
            let numeric = (lp - lm) / (2.0 * h);
            // Relative error, floored so that finite-difference noise on tiny gradients does not count.
            let err = (numeric - g[k]).abs() / numeric.abs().max(g[k].abs()).max(1e-3);
            assert!(
                err < 1e-5,
                "{name}[{k}]: autograd {} vs finite difference {numeric}",
                g[k]
            );
        }
    }
}

#[test]
fn gpt2_gradients_match_finite_differences() {
    let cfg = DecoderConfig::Gpt2(Gpt2Config {
        vocab_size: 11,
        n_positions: 8,
        n_embd: 8,
        n_layer: 2,
        n_head: 2,
        n_inner: None,
        activation_function: "gelu_new".into(),
        layer_norm_epsilon: 1e-5,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
    });
    // Composed attention (decoding) and the fused attention + linear kernels (training).
    check(cfg.clone(), false);
    check(cfg, true);
}

#[test]
fn llama_gradients_match_finite_differences() {
    let cfg = DecoderConfig::Llama(LlamaConfig {
        vocab_size: 11,
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        head_dim: None,
        max_position_embeddings: 8,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        hidden_act: "silu".into(),
        tie_word_embeddings: false,
        attention_bias: false,
        mlp_bias: false,
        rope_scaling: None,
        rope_parameters: None,
        arch: Default::default(),
        other: Default::default(),
        bos_token_id: None,
        eos_token_id: None,
    });
    // Composed attention (decoding) and rotation + attention in one kernel (one pass).
    check(cfg.clone(), false);
    check(cfg, true);
}

fn rnn(cell: Cell, tie: bool) -> DecoderConfig {
    DecoderConfig::Rnn(RnnConfig {
        model_type: "lmkit_rnn".into(),
        architectures: Vec::new(),
        torch_dtype: None,
        cell,
        vocab_size: 11,
        hidden_size: 6,
        embedding_size: if tie { None } else { Some(5) },
        num_layers: 2,
        dropout: 0.0,
        tie_word_embeddings: tie,
        max_position_embeddings: 8,
        bos_token_id: None,
        eos_token_id: None,
    })
}

#[test]
fn rnn_and_lstm_gradients_match_finite_differences() {
    check(rnn(Cell::Rnn, false), false);
    check(rnn(Cell::Lstm, true), false);
}

#[test]
fn gpt_neox_gradients_match_finite_differences() {
    // Partial rotation (half of each head), both residual layouts.
    for parallel in [true, false] {
        let cfg: lmkit_models::gpt_neox::GptNeoxConfig =
            serde_json::from_value(serde_json::json!({
                "vocab_size": 11, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
                "num_attention_heads": 2, "max_position_embeddings": 8, "rotary_pct": 0.5,
                "use_parallel_residual": parallel,
            }))
            .unwrap();
        check(DecoderConfig::GptNeox(cfg), false);
    }
}
