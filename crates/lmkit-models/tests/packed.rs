//! Several sequences read in one packed pass (`CausalLm::forward_packed_last`) give each the
//! logits and the KV cache that a pass over it alone gives.

use candle_core::{Device, Tensor};
use lmkit_models::{CausalLm, KvCache};

fn random_model(config: &str) -> CausalLm {
    lmkit_models::testing::random_model(config, 7, 0.5)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    lmkit_kernels::testing::max_diff(a, b)
}

const CONFIGS: [&str; 5] = [
    r#"{"model_type": "gpt2", "vocab_size": 61, "n_positions": 40, "n_embd": 24, "n_layer": 2, "n_head": 3}"#,
    r#"{"model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 40}"#,
    r#"{"model_type": "qwen3", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "max_position_embeddings": 40}"#,
    r#"{"model_type": "gpt_neox", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "rotary_pct": 0.5,
        "use_parallel_residual": true, "max_position_embeddings": 40}"#,
    r#"{"model_type": "lmkit_rnn", "cell": "lstm", "vocab_size": 61, "hidden_size": 20,
        "num_layers": 2, "max_position_embeddings": 40}"#,
];

#[test]
fn a_packed_pass_equals_one_pass_per_sequence() {
    let dev = Device::Cpu;
    for config in CONFIGS {
        let m = random_model(config);
        let seqs: [&[u32]; 4] = [&[1, 2, 3], &[7], &[5, 9, 11, 13, 2, 4, 6], &[30, 31]];
        // Sequences 0 and 2 continue earlier positions; 1 and 3 start fresh.
        let history: [&[u32]; 4] = [&[8, 9], &[], &[40, 41, 42, 43, 44], &[]];
        let fresh = || -> Vec<KvCache> {
            history
                .iter()
                .map(|h| {
                    let mut c = m.new_cache();
                    if !h.is_empty() {
                        let ids = Tensor::new(*h, &dev).unwrap().unsqueeze(0).unwrap();
                        m.forward_last(&ids, &mut c).unwrap();
                    }
                    c
                })
                .collect()
        };
        let (mut alone, mut packed) = (fresh(), fresh());
        let want: Vec<Tensor> = seqs
            .iter()
            .zip(alone.iter_mut())
            .map(|(s, c)| {
                let ids = Tensor::new(*s, &dev).unwrap().unsqueeze(0).unwrap();
                m.forward_last(&ids, c).unwrap()
            })
            .collect();
        let want = Tensor::cat(&want, 0).unwrap();
        let mut refs: Vec<&mut KvCache> = packed.iter_mut().collect();
        let got = m.forward_packed_last(&seqs, &mut refs).unwrap();
        assert_eq!(got.dims(), [4, 61], "{config}");
        let d = max_diff(&got, &want);
        assert!(d < 1e-5, "{config}: logits differ by {d}");
        for (i, (a, p)) in alone.iter().zip(&packed).enumerate() {
            assert_eq!((a.len(), p.queued()), (p.len(), 0), "{config}: cache {i}");
        }
        // The caches continue alike: one batched decoding step over all four.
        let step = Tensor::new(&[[3u32], [4], [5], [6]], &dev).unwrap();
        let mut refs: Vec<&mut KvCache> = alone.iter_mut().collect();
        let want = m.forward_rows(&step, &mut refs).unwrap();
        let mut refs: Vec<&mut KvCache> = packed.iter_mut().collect();
        let got = m.forward_rows(&step, &mut refs).unwrap();
        let d = max_diff(&got, &want);
        assert!(d < 1e-5, "{config}: the next step's logits differ by {d}");
    }
}

/// Models whose weights are large enough for the few-row products
/// (`lmkit_kernels::few_rows`: a packed pass of 2 to 32 rows, on the thread pool): a serving
/// round's decoding steps and short prompts packed together give the logits of each sequence's
/// pass alone (one row at a time: the matrix-vector products).
#[test]
fn packed_passes_of_a_few_rows_equal_passes_alone() {
    let dev = Device::Cpu;
    let configs = [
        r#"{"model_type": "gpt2", "vocab_size": 300, "n_positions": 40, "n_embd": 192, "n_layer": 2, "n_head": 3}"#,
        r#"{"model_type": "llama", "vocab_size": 300, "hidden_size": 128, "intermediate_size": 320,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 40}"#,
    ];
    for config in configs {
        let m = random_model(config);
        let before = lmkit_kernels::few_rows::products_taken();
        let seqs: [&[u32]; 4] = [&[1, 2, 3], &[7], &[5, 9, 11, 13, 2], &[30, 31]];
        let mut alone: Vec<KvCache> = (0..4).map(|_| m.new_cache()).collect();
        let mut packed: Vec<KvCache> = (0..4).map(|_| m.new_cache()).collect();
        let one = |s: &[u32], c: &mut KvCache| {
            // One position at a time: every product of one row.
            let mut last = None;
            for &t in s {
                let ids = Tensor::new(&[t], &dev).unwrap().unsqueeze(0).unwrap();
                last = Some(m.forward_last(&ids, c).unwrap());
            }
            last.unwrap()
        };
        // The prompts, then one decoding step each.
        let step: [&[u32]; 4] = [&[3], &[4], &[5], &[6]];
        for (round, what) in [(seqs, "logits"), (step, "the decoding steps' logits")] {
            let want: Vec<Tensor> = round
                .iter()
                .zip(&mut alone)
                .map(|(s, c)| one(s, c))
                .collect();
            let mut refs: Vec<&mut KvCache> = packed.iter_mut().collect();
            let got = m.forward_packed_last(&round, &mut refs).unwrap();
            let d = max_diff(&got, &Tensor::cat(&want, 0).unwrap());
            assert!(d < 1e-4, "{config}: {what} differ by {d}");
        }
        if lmkit_kernels::blas::available() {
            assert!(
                lmkit_kernels::few_rows::products_taken() > before,
                "{config}: no product of a few rows"
            );
        }
    }
}

#[test]
fn a_packed_pass_refuses_what_it_cannot_read() {
    let m = random_model(CONFIGS[1]);
    let (mut a, mut b) = (m.new_cache(), m.new_cache());
    let e = m
        .forward_packed_last(&[&[1, 2]], &mut [&mut a, &mut b])
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 sequences for 2 caches"), "{e}");
    let e = m
        .forward_packed_last(&[&[1, 2], &[]], &mut [&mut a, &mut b])
        .unwrap_err()
        .to_string();
    assert!(e.contains("sequence 1 is empty"), "{e}");
    // Past the context: an error, and the caches stay usable.
    let long: Vec<u32> = (0..45).map(|i| i % 61).collect();
    assert!(m
        .forward_packed_last(&[&[1, 2], &long], &mut [&mut a, &mut b])
        .is_err());
    assert_eq!((a.queued(), b.queued()), (0, 0));
}
