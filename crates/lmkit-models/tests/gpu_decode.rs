//! Passes over KV caches through the GPU's cache attention (decoding steps: one kernel launch a
//! layer that writes every sequence's key and value into its cache and attends over it; prompt
//! pieces: the writes, then the attention) give the logits the composed attention gives on the
//! CPU: prompts read alone and one sequence's steps alone, steps a row each, steps beside prompt
//! pieces in one packed pass (fresh prompts and pieces continuing a cache, over one tile of 16
//! rows and under), fresh caches and caches regrown past their first capacity, for GPT-2, Llama
//! (grouped-query heads), Qwen3 and GPT-NeoX (part of each head rotated). On a GPU with the `cuda` feature; with `cuda-emu` alone, on the emulated GPU (CPU
//! tensors routed through the kernel by `set_emulated_gpu_decode`, and through the products
//! with their bias and residual and the SwiGLU kernel that a GPU's layers take by
//! `set_emulated_layers`).
#![cfg(any(feature = "cuda-emu", feature = "cuda"))]

use candle_core::{Device, Tensor};
use lmkit_models::{CausalLm, KvCache};

const CONFIGS: [&str; 4] = [
    r#"{"model_type": "gpt2", "vocab_size": 61, "n_positions": 128, "n_embd": 24, "n_layer": 2, "n_head": 3}"#,
    r#"{"model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128}"#,
    r#"{"model_type": "qwen3", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "max_position_embeddings": 128}"#,
    r#"{"model_type": "gpt_neox", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "rotary_pct": 0.5,
        "use_parallel_residual": true, "max_position_embeddings": 128}"#,
];

/// Whether decoding steps of a CPU model take the emulated GPU's kernels: the cache
/// attention, and the products and SwiGLU that a GPU's layers take.
fn emulate(on: bool) {
    #[cfg(not(feature = "cuda"))]
    {
        lmkit_models::layers::attention::set_emulated_gpu_decode(on);
        lmkit_kernels::cuda::set_emulated_layers(on);
    }
    #[cfg(feature = "cuda")]
    let _ = on;
}

/// One packed pass over `seqs`, each continuing its cache; on the CPU through the kernel
/// (`kernel`, emulated) or not. Logits on the CPU.
fn pass(m: &CausalLm, seqs: &[Vec<u32>], caches: &mut [KvCache], kernel: bool) -> Tensor {
    emulate(kernel);
    let seqs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
    let out = m.forward_packed_last(&seqs, &mut refs);
    emulate(false);
    out.unwrap().to_device(&Device::Cpu).unwrap()
}

#[test]
fn gpu_decoding_steps_equal_the_composed_attention() {
    let Some(gpu) = lmkit_kernels::testing::gpu_device() else {
        return;
    };
    // Sums in another order than the CPU's (a GPU's products besides: f32, not TF32, candle's
    // default).
    let tol = if cfg!(feature = "cuda") { 1e-3 } else { 1e-4 };
    for config in CONFIGS {
        let cpu = lmkit_models::testing::random_model(config, 11, 0.5);
        let tested = lmkit_models::testing::random_model_on(config, 11, 0.5, &gpu);
        // Sequence 1 starts with a decoding step of a fresh cache; the others continue prompts
        // read alone (sequence 2's over a tile of 16 rows).
        let long: Vec<u32> = (20..39).collect();
        let prompts: [&[u32]; 4] = [&[8, 9, 10], &[], &long, &[3]];
        let start = |m: &CausalLm, kernel: bool| -> (Vec<KvCache>, Vec<Tensor>) {
            let mut logits = Vec::new();
            let caches = prompts
                .iter()
                .map(|p| {
                    let mut c = m.new_cache();
                    if !p.is_empty() {
                        let seq = [p.to_vec()];
                        logits.push(pass(m, &seq, std::slice::from_mut(&mut c), kernel));
                    }
                    c
                })
                .collect();
            (caches, logits)
        };
        let (mut want_caches, want) = start(&cpu, false);
        let (mut got_caches, got) = start(&tested, true);
        for (got, want) in got.iter().zip(&want) {
            let d = lmkit_kernels::testing::max_diff(got, want);
            assert!(d < tol, "{config}, a prompt alone: logits differ by {d}");
        }
        // 70 rounds: past the caches' first capacity of 64 positions. Every fifth round,
        // sequence 2 brings a piece of 3 tokens (a prompt read beside the steps); in round 30
        // sequence 3 starts again from a fresh cache with a prompt of 21 tokens.
        for round in 0..70u32 {
            if round == 30 {
                want_caches[3] = cpu.new_cache();
                got_caches[3] = tested.new_cache();
            }
            let seqs: Vec<Vec<u32>> = (0..4u32)
                .map(|i| {
                    let tok = (round * 7 + i * 13) % 61;
                    let piece = match (i, round) {
                        (3, 30) => 21,
                        (2, r) if r % 5 == 4 => 3,
                        _ => 1,
                    };
                    (0..piece).map(|j| (tok + j) % 61).collect()
                })
                .collect();
            let want = pass(&cpu, &seqs, &mut want_caches, false);
            let got = pass(&tested, &seqs, &mut got_caches, true);
            let d = lmkit_kernels::testing::max_diff(&got, &want);
            assert!(d < tol, "{config}, round {round}: logits differ by {d}");
            for (a, b) in want_caches.iter().zip(&got_caches) {
                assert_eq!(a.len(), b.len(), "{config}, round {round}");
            }
        }
        // One sequence alone (batch-1 generation): its steps and a piece of 5 through the
        // kernels too.
        for step in 0..3u32 {
            let n = if step == 1 { 5 } else { 1 };
            let seq = vec![(0..n).map(|j| (step * 5 + 1 + j) % 61).collect()];
            let want = pass(&cpu, &seq, &mut want_caches[..1], false);
            let got = pass(&tested, &seq, &mut got_caches[..1], true);
            let d = lmkit_kernels::testing::max_diff(&got, &want);
            assert!(d < tol, "{config}, step {step} alone: logits differ by {d}");
        }
    }
}

/// Models loaded in bf16: decoding steps, a prompt piece beside them and a fresh prompt through
/// the bf16 kernels (rows, caches and output in bf16) give the composed bf16 attention's logits
/// within bf16's rounding (the kernels round the attention's output and the rotated keys once;
/// the composed ops round the scores' product, the probabilities and the rotation too).
#[test]
fn gpu_bf16_decoding_steps_equal_the_composed_attention() {
    let Some(gpu) = lmkit_kernels::testing::gpu_device() else {
        return;
    };
    let bf16 = candle_core::DType::BF16;
    for config in CONFIGS {
        let cpu = lmkit_models::testing::random_model_as(config, 11, 0.5, &Device::Cpu, bf16);
        let tested = lmkit_models::testing::random_model_as(config, 11, 0.5, &gpu, bf16);
        let mut want_caches: Vec<KvCache> = (0..3).map(|_| cpu.new_cache()).collect();
        let mut got_caches: Vec<KvCache> = (0..3).map(|_| tested.new_cache()).collect();
        let mut worst = 0f64;
        for round in 0..24u32 {
            let seqs: Vec<Vec<u32>> = (0..3u32)
                .map(|i| {
                    let tok = (round * 7 + i * 13) % 61;
                    let piece = match (i, round) {
                        (_, 0) => 5 + i,
                        (2, r) if r % 5 == 4 => 3,
                        (1, 12) => 18,
                        _ => 1,
                    };
                    (0..piece).map(|j| (tok + j) % 61).collect()
                })
                .collect();
            if round == 12 {
                want_caches[1] = cpu.new_cache();
                got_caches[1] = tested.new_cache();
            }
            let want = pass(&cpu, &seqs, &mut want_caches, false);
            let got = pass(&tested, &seqs, &mut got_caches, true);
            let size = want.abs().unwrap().max_keepdim(1).unwrap();
            let size = size.max(0).unwrap().to_vec1::<f32>().unwrap()[0];
            let d = lmkit_kernels::testing::max_diff(&got, &want) / f64::from(size.max(1.0));
            worst = worst.max(d);
            assert!(
                d < 0.03,
                "{config}, round {round}: logits differ by {d} of {size}"
            );
        }
        eprintln!("{config}: bf16 logits differ by at most {worst} of their size");
    }
}
