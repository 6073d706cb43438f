//! Generation through the GPU's cache attention (decoding steps, prompts and prompt pieces packed
//! beside other streams' steps, a prompt read once for two decoders and its cache copied) gives
//! the tokens the composed attention gives: the serving scheduler's rounds ([`finish_all`]) with
//! the decoding steps of a CPU model routed through the emulated GPU's kernels
//! (`set_emulated_gpu_decode`), against the same rounds without them.
#![cfg(feature = "cuda-emu")]

use lmkit_infer::{finish_all, Decoder, GenerateOptions, SamplingParams};
use lmkit_models::CausalLm;

/// Every decoder's generated tokens after [`finish_all`] with `prompt_tokens` prompt tokens a
/// pass, through the emulated GPU's kernels or not.
fn run(m: &CausalLm, prompts: &[Vec<u32>], prompt_tokens: usize, kernels: bool) -> Vec<Vec<u32>> {
    let mut decoders: Vec<Decoder> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let opts = GenerateOptions {
                max_tokens: 70,
                sampling: SamplingParams {
                    temperature: 1.0,
                    top_k: None,
                    top_p: None,
                    repetition_penalty: 1.0,
                    seed: i as u64,
                },
                stop_ids: Vec::new(),
                max_positions: 128,
            };
            Decoder::new(m, p, opts).unwrap()
        })
        .collect();
    let mut done = vec![false; decoders.len()];
    lmkit_models::layers::attention::set_emulated_gpu_decode(kernels);
    let rounds = finish_all(m, &mut decoders, &mut done, prompt_tokens);
    lmkit_models::layers::attention::set_emulated_gpu_decode(false);
    rounds.unwrap();
    decoders.iter().map(|d| d.generated().to_vec()).collect()
}

#[test]
fn generation_through_the_gpu_cache_attention_equals_the_composed_attention() {
    for config in [
        r#"{"model_type": "gpt2", "vocab_size": 61, "n_positions": 128, "n_embd": 24, "n_layer": 2, "n_head": 3}"#,
        r#"{"model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128}"#,
    ] {
        let m = lmkit_models::testing::random_model(config, 5, 1.0);
        // A 30-token prompt (read in pieces of at most 8 tokens a pass beside the others'
        // steps), two equal prompts (read once, the cache copied), a one-token prompt; 70 tokens
        // each, past the caches' first capacity of 64 positions.
        let prompts: Vec<Vec<u32>> = vec![
            (0..30).map(|i| (i * 7 + 3) % 61).collect(),
            vec![5, 6, 7, 8, 9],
            vec![5, 6, 7, 8, 9],
            vec![42],
        ];
        for prompt_tokens in [8, 0] {
            let want = run(&m, &prompts, prompt_tokens, false);
            let got = run(&m, &prompts, prompt_tokens, true);
            assert!(want.iter().all(|g| g.len() == 70));
            assert_ne!(
                want[1], want[2],
                "equal prompts with other seeds sampled alike"
            );
            assert_eq!(got, want, "{config}, {prompt_tokens} prompt tokens a pass");
        }
    }
}
