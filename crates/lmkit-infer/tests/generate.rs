//! The generation loop's stop conditions and the text stream's stop strings and UTF-8 handling.

use candle_nn::{VarBuilder, VarMap};
use lmkit_infer::{generate, Finish, GenerateOptions, SamplingParams, TextStream};
use lmkit_models::{CausalLm, DType, DecoderConfig, Device, Gpt2Config};
use std::path::Path;

fn tiny_model() -> (CausalLm, DecoderConfig) {
    let cfg = DecoderConfig::Gpt2(Gpt2Config {
        vocab_size: 50,
        n_positions: 12,
        n_embd: 16,
        n_layer: 1,
        n_head: 2,
        n_inner: None,
        activation_function: "gelu_new".into(),
        layer_norm_epsilon: 1e-5,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
    });
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    (
        CausalLm::from_var_builder(&cfg, vb, Path::new("random")).unwrap(),
        cfg,
    )
}

fn opts(max_tokens: usize, eos: Option<u32>, sampling: SamplingParams) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampling,
        stop_ids: eos.into_iter().collect(),
        max_positions: 12,
    }
}

#[test]
fn stops_on_length_context_eos_and_callback() {
    let (m, _) = tiny_model();
    let (ids, why) = generate(
        &m,
        &[1, 2],
        &opts(5, None, SamplingParams::greedy()),
        &mut |_, _| true,
    )
    .unwrap();
    assert_eq!((ids.len(), why), (5, Finish::Length));
    let (ids, why) = generate(
        &m,
        &[1, 2],
        &opts(100, None, SamplingParams::greedy()),
        &mut |_, _| true,
    )
    .unwrap();
    assert_eq!((ids.len(), why), (10, Finish::Context));
    // The greedy continuation's first token, declared as EOS, ends generation at once.
    let first = ids[0];
    let (ids, why) = generate(
        &m,
        &[1, 2],
        &opts(5, Some(first), SamplingParams::greedy()),
        &mut |_, _| true,
    )
    .unwrap();
    assert_eq!((ids.len(), why), (0, Finish::Eos));
    let (ids, why) = generate(
        &m,
        &[1, 2],
        &opts(5, None, SamplingParams::greedy()),
        &mut |_, all| all.len() < 2,
    )
    .unwrap();
    assert_eq!((ids.len(), why), (2, Finish::Stopped));
}

/// The stop token that ends decoding has its log-probabilities kept as a taken token's are (a
/// sequence's probability counts the token that ended it).
#[test]
fn the_stop_token_has_its_logprobs() {
    let (m, _) = tiny_model();
    let mut free =
        lmkit_infer::Decoder::new(&m, &[1, 2], opts(5, None, SamplingParams::greedy())).unwrap();
    free.keep_logprobs(2);
    let lmkit_infer::Step::Token(first) = free.step(&m).unwrap() else {
        panic!("no first token")
    };
    let want = free.last_logprobs().unwrap().clone();
    let o = opts(5, Some(first), SamplingParams::greedy());
    let mut stopped = lmkit_infer::Decoder::new(&m, &[1, 2], o).unwrap();
    stopped.keep_logprobs(2);
    assert_eq!(
        stopped.step(&m).unwrap(),
        lmkit_infer::Step::Done(Finish::Eos)
    );
    let got = stopped.last_logprobs().unwrap();
    assert_eq!((got.token, &got.top), (first, &want.top));
    assert_eq!(got.logprob, want.logprob);
    assert!(stopped.generated().is_empty());
    // A sequence ended by its length takes no token: no log-probabilities (not the last
    // token's again).
    let mut short =
        lmkit_infer::Decoder::new(&m, &[1, 2], opts(1, None, SamplingParams::greedy())).unwrap();
    short.keep_logprobs(0);
    assert_eq!(short.step(&m).unwrap(), lmkit_infer::Step::Token(first));
    assert!(short.last_logprobs().is_some());
    assert_eq!(
        short.step(&m).unwrap(),
        lmkit_infer::Step::Done(Finish::Length)
    );
    assert!(short.last_logprobs().is_none());
    let mut batched =
        lmkit_infer::Decoder::new(&m, &[1, 2], opts(1, None, SamplingParams::greedy())).unwrap();
    batched.keep_logprobs(0);
    for want in [
        lmkit_infer::Step::Token(first),
        lmkit_infer::Step::Done(Finish::Length),
    ] {
        let r = lmkit_infer::Decoder::step_many(&m, &mut [&mut batched], 16);
        assert_eq!(r[0].as_ref().unwrap(), &want);
        let taken = matches!(want, lmkit_infer::Step::Token(_));
        assert_eq!(batched.last_logprobs().is_some(), taken);
    }
}

#[test]
fn sampling_is_reproducible_by_seed() {
    let (m, _) = tiny_model();
    let run = |seed| {
        let s = SamplingParams {
            temperature: 1.5,
            top_k: Some(20),
            top_p: Some(0.9),
            repetition_penalty: 1.1,
            seed,
        };
        generate(&m, &[3], &opts(8, None, s), &mut |_, _| true)
            .unwrap()
            .0
    };
    assert_eq!(run(5), run(5));
    assert!(
        (0..5)
            .map(run)
            .collect::<std::collections::HashSet<_>>()
            .len()
            > 1
    );
}

#[test]
fn bad_requests_are_refused() {
    let (m, _) = tiny_model();
    let e = generate(
        &m,
        &[],
        &opts(5, None, SamplingParams::greedy()),
        &mut |_, _| true,
    )
    .unwrap_err();
    assert!(e.to_string().contains("prompt is empty"), "{e}");
    let e = generate(
        &m,
        &[1; 12],
        &opts(5, None, SamplingParams::greedy()),
        &mut |_, _| true,
    )
    .unwrap_err();
    assert!(e.to_string().contains("context holds 12"), "{e}");
    let bad = SamplingParams {
        top_p: Some(1.5),
        ..Default::default()
    };
    let e = generate(&m, &[1], &opts(5, None, bad), &mut |_, _| true).unwrap_err();
    assert!(e.to_string().contains("top_p"), "{e}");
}

#[test]
fn text_stream_cuts_at_stop_strings_and_holds_partial_characters() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, "hello world. 안녕하세요 세계.\n".repeat(50)).unwrap();
    let tk = lmkit_tokenize::train(
        &[corpus],
        &lmkit_tokenize::TrainOptions {
            vocab_size: 300,
            ..Default::default()
        },
    )
    .unwrap();
    let ids =
        lmkit_tokenize::encode_batch(&tk, &["hello world. 안녕하세요 세계. more".to_string()])
            .unwrap()
            .remove(0);

    // Without stop strings the deltas add up to the text, and no delta ever holds a broken character.
    let mut s = TextStream::new(&tk, vec![]);
    let mut text = String::new();
    for n in 1..=ids.len() {
        let d = s.push(&ids[..n]).unwrap();
        assert!(!d.contains('\u{FFFD}'));
        text.push_str(&d);
    }
    text.push_str(&s.finish(&ids).unwrap());
    assert_eq!(text, "hello world. 안녕하세요 세계. more");

    // With a stop string the output ends right before it.
    let mut s = TextStream::new(&tk, vec!["세계".into()]);
    let mut text = String::new();
    for n in 1..=ids.len() {
        text.push_str(&s.push(&ids[..n]).unwrap());
        if s.stopped {
            break;
        }
    }
    assert!(s.stopped);
    assert_eq!(text, "hello world. 안녕하세요 ");
}

/// Small decoders of each family, for the tests that compare ways of decoding.
const GPT2: &str = r#"{"model_type": "gpt2", "vocab_size": 61, "n_positions": 40, "n_embd": 24, "n_layer": 2, "n_head": 3}"#;
const LLAMA: &str = r#"{"model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 40}"#;
const NEOX: &str = r#"{"model_type": "gpt_neox", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 2, "num_attention_heads": 4, "rotary_pct": 0.5,
    "max_position_embeddings": 40}"#;
const LSTM: &str = r#"{"model_type": "lmkit_rnn", "cell": "lstm", "vocab_size": 61, "hidden_size": 20,
    "num_layers": 2, "max_position_embeddings": 40}"#;

fn random_model(config: &str) -> CausalLm {
    lmkit_models::testing::random_model(config, 7, 1.0)
}

#[test]
fn batched_steps_equal_one_sequence_at_a_time() {
    for config in [
        GPT2,
        LLAMA,
        NEOX,
        LSTM,
        r#"{"model_type": "lmkit_rnn", "cell": "rnn", "vocab_size": 61, "hidden_size": 20,
            "embedding_size": 12, "num_layers": 1, "max_position_embeddings": 40}"#,
    ] {
        let m = random_model(config);
        // Greedy, and sampled with a seed of each sequence's own (drawn side by side on the
        // thread pool, as for a model on a GPU: a draw from another's generator would show).
        lmkit_infer::draw_side_by_side_on_cpu(true);
        let sampled = SamplingParams {
            temperature: 1.0,
            top_p: Some(0.9),
            ..Default::default()
        };
        for (sampling, seeded) in [(SamplingParams::greedy(), false), (sampled, true)] {
            let o = |i: usize| GenerateOptions {
                max_tokens: 9,
                sampling: SamplingParams {
                    seed: if seeded { 100 + i as u64 } else { 0 },
                    ..sampling.clone()
                },
                stop_ids: Vec::new(),
                max_positions: 40,
            };
            let prompts: [&[u32]; 4] = [&[1, 2, 3], &[7], &[5, 9, 11, 13, 2, 4, 6], &[30, 31]];
            let want: Vec<Vec<u32>> = prompts
                .iter()
                .enumerate()
                .map(|(i, p)| generate(&m, p, &o(i), &mut |_, _| true).unwrap().0)
                .collect();
            // Prompts read one at a time, in packs of at most 5 tokens, all in one pack.
            for prompt_tokens in [0, 5, lmkit_infer::PACKED_PROMPT_TOKENS] {
                // Different lengths and limits, so that the batch changes as sequences finish.
                let mut ds: Vec<lmkit_infer::Decoder> = prompts
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let o = GenerateOptions {
                            max_tokens: 9 - i,
                            ..o(i)
                        };
                        lmkit_infer::Decoder::new(&m, p, o).unwrap()
                    })
                    .collect();
                let mut done = vec![false; ds.len()];
                let rounds =
                    lmkit_infer::finish_all(&m, &mut ds, &mut done, prompt_tokens).unwrap();
                assert!(rounds < 50);
                for (i, d) in ds.iter().enumerate() {
                    assert_eq!(
                    d.generated(),
                    &want[i][..9 - i],
                    "{config} sequence {i}, packs of {prompt_tokens} prompt tokens, sampled: {seeded}"
                );
                }
            }
        }
    }
}

#[test]
fn a_sequence_that_fails_its_pass_fails_alone() {
    // Mistral's sliding window (8 positions) is not implemented past its length: the sequence
    // that outgrows it gets an error, the one that stays within continues as alone.
    let m = random_model(
        r#"{"model_type": "mistral", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 40, "sliding_window": 8}"#,
    );
    let o = GenerateOptions {
        max_tokens: 4,
        sampling: SamplingParams::greedy(),
        stop_ids: Vec::new(),
        max_positions: 40,
    };
    let want = generate(&m, &[9, 8], &o, &mut |_, _| true).unwrap().0;
    let mut ds = [
        lmkit_infer::Decoder::new(&m, &[1, 2, 3, 4, 5, 6], o.clone()).unwrap(),
        lmkit_infer::Decoder::new(&m, &[9, 8], o.clone()).unwrap(),
    ];
    let mut errors = Vec::new();
    let mut live = vec![true, true];
    while live.iter().any(|l| *l) {
        let mut refs: Vec<&mut lmkit_infer::Decoder> = ds
            .iter_mut()
            .zip(&live)
            .filter(|(_, l)| **l)
            .map(|(d, _)| d)
            .collect();
        let idx: Vec<usize> = (0..2).filter(|&i| live[i]).collect();
        let steps = lmkit_infer::Decoder::step_many(&m, &mut refs, 64);
        for (i, s) in idx.into_iter().zip(steps) {
            match s {
                Err(e) => {
                    errors.push((i, e.to_string()));
                    live[i] = false;
                }
                Ok(lmkit_infer::Step::Done(_)) => live[i] = false,
                Ok(_) => {}
            }
        }
    }
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, 0);
    assert!(errors[0].1.contains("sliding_window"), "{}", errors[0].1);
    assert_eq!(ds[1].generated(), want.as_slice());
}

#[test]
fn equal_prompts_in_one_pass_sample_as_independent_decoders() {
    // The choices of one request: one prompt, several seeds (read once, the cache copied), next
    // to another prompt.
    for config in [GPT2, LLAMA, LSTM] {
        let m = random_model(config);
        let opts = |seed| GenerateOptions {
            max_tokens: 6,
            sampling: SamplingParams {
                temperature: 1.0,
                top_k: None,
                top_p: None,
                repetition_penalty: 1.0,
                seed,
            },
            stop_ids: Vec::new(),
            max_positions: 40,
        };
        let prompts: [&[u32]; 4] = [&[3, 1, 4], &[2, 7], &[3, 1, 4], &[3, 1, 4]];
        let want: Vec<Vec<u32>> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                generate(&m, p, &opts(i as u64), &mut |_, _| true)
                    .unwrap()
                    .0
            })
            .collect();
        let mut ds: Vec<lmkit_infer::Decoder> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| lmkit_infer::Decoder::new(&m, p, opts(i as u64)).unwrap())
            .collect();
        let mut done = vec![false; ds.len()];
        lmkit_infer::finish_all(&m, &mut ds, &mut done, 64).unwrap();
        let got: Vec<Vec<u32>> = ds.iter().map(|d| d.generated().to_vec()).collect();
        assert_eq!(got, want, "{config}");
        assert!(
            got[0] != got[2] || got[0] != got[3],
            "the seeds gave one sequence"
        );
    }
}

/// A sequence that starts from the keys and values another one left for the start of its
/// prompt (a server's prefix cache: a chat's next turn) generates what it would have reading the
/// whole prompt — with the prefix copied or as views of a cache that decodes on meanwhile, read
/// alone or beside other sequences, and for a prefix that ends inside the earlier sequence's.
#[test]
fn a_cached_prefix_continues_as_the_whole_prompt_would() {
    for config in [GPT2, LLAMA, NEOX] {
        let m = random_model(config);
        let o = |max_tokens: usize, stop: Option<u32>, seed: u64| GenerateOptions {
            max_tokens,
            sampling: SamplingParams {
                temperature: 1.0,
                top_p: Some(0.9),
                seed,
                ..Default::default()
            },
            stop_ids: stop.into_iter().collect(),
            max_positions: 40,
        };
        let first: &[u32] = &[1, 2, 3, 4, 5];
        let out = generate(&m, first, &o(8, None, 1), &mut |_, _| true)
            .unwrap()
            .0;
        // Ended by its length (its last token not read), and by a stop token (all read: the
        // stop's first draw ends it).
        let at = out.iter().position(|&t| t == out[4]).unwrap();
        for (stop, read) in [(None, 5 + 7), (Some(out[4]), 5 + at)] {
            let mut d = lmkit_infer::Decoder::new(&m, first, o(8, stop, 1)).unwrap();
            lmkit_infer::finish_all(&m, std::slice::from_mut(&mut d), &mut [false], 64).unwrap();
            let (tokens, cache) = d.cached().unwrap();
            assert_eq!(tokens.len(), read, "{config}");
            assert_eq!(&tokens[..5], first);
            assert_eq!(&tokens[5..], &out[..read - 5]);
            // The next turn: all that was read and more; a prompt that leaves it after 3.
            let next: Vec<u32> = tokens.iter().copied().chain([7, 8, 9]).collect();
            let apart: Vec<u32> = tokens[..3].iter().copied().chain([20, 21]).collect();
            for (prompt, n) in [(&next, read), (&apart, 3)] {
                let want = generate(&m, prompt, &o(6, None, 9), &mut |_, _| true)
                    .unwrap()
                    .0;
                for (copy, prompt_tokens) in [(true, 64), (false, 2), (true, 0)] {
                    let prefix = cache.prefix(n, copy).unwrap().unwrap();
                    assert_eq!(prefix.len(), n);
                    let mut ds = vec![
                        lmkit_infer::Decoder::with_prefix(&m, prompt, o(6, None, 9), prefix)
                            .unwrap(),
                        // Another sequence in the same passes.
                        lmkit_infer::Decoder::new(&m, &[30, 31, 32], o(5, None, 3)).unwrap(),
                    ];
                    lmkit_infer::finish_all(&m, &mut ds, &mut [false, false], prompt_tokens)
                        .unwrap();
                    assert_eq!(
                        ds[0].generated(),
                        &want[..],
                        "{config} {copy} {prompt_tokens}"
                    );
                }
            }
        }
        // Views of a cache whose sequence decodes on: the positions they show are not written
        // again.
        let mut live = lmkit_infer::Decoder::new(&m, first, o(12, None, 4)).unwrap();
        for _ in 0..3 {
            live.step(&m).unwrap();
        }
        let (tokens, cache) = live.cached().unwrap();
        let tokens = tokens.to_vec();
        let view = cache.prefix(tokens.len(), false).unwrap().unwrap();
        let whole = cache.prefix(tokens.len(), true).unwrap().unwrap();
        for _ in 0..5 {
            live.step(&m).unwrap();
        }
        let prompt: Vec<u32> = tokens.iter().copied().chain([11]).collect();
        let want = generate(&m, &prompt, &o(4, None, 5), &mut |_, _| true)
            .unwrap()
            .0;
        let mut d = lmkit_infer::Decoder::with_prefix(&m, &prompt, o(4, None, 5), view).unwrap();
        lmkit_infer::finish_all(&m, std::slice::from_mut(&mut d), &mut [false], 64).unwrap();
        assert_eq!(d.generated(), &want[..], "{config}");
        // A prefix must leave the prompt's last token to read.
        assert!(lmkit_infer::Decoder::with_prefix(&m, &tokens, o(4, None, 5), whole).is_err());
    }
    // A recurrent model's state is that of all its positions: no prefix of it.
    let m = random_model(LSTM);
    let mut d = lmkit_infer::Decoder::new(
        &m,
        &[1, 2, 3],
        GenerateOptions {
            max_tokens: 3,
            sampling: SamplingParams::greedy(),
            stop_ids: Vec::new(),
            max_positions: 40,
        },
    )
    .unwrap();
    d.step(&m).unwrap();
    let (tokens, cache) = d.cached().unwrap();
    assert_eq!(tokens, [1, 2, 3]);
    assert!(cache.prefix(2, true).unwrap().is_none());
}

/// The step clock counts the decoding steps (one new token each; the prompt's pass not) and the
/// time of their passes and of their logits' reads.
#[test]
fn the_step_clock_counts_decoding_steps() {
    let (m, _) = tiny_model();
    let before = lmkit_infer::step_clock();
    let mut d =
        lmkit_infer::Decoder::new(&m, &[1, 2, 3], opts(5, None, SamplingParams::greedy())).unwrap();
    let mut tokens = 0;
    while let lmkit_infer::Step::Token(_) = d.step(&m).unwrap() {
        tokens += 1;
    }
    assert_eq!(tokens, 5);
    let after = lmkit_infer::step_clock();
    // Other tests of this process may decode at the same time: at least these 4.
    assert!(after.steps >= before.steps + 4, "{before:?} {after:?}");
    assert!(after.pass_secs > before.pass_secs, "{before:?} {after:?}");
    assert!(after.read_secs >= before.read_secs, "{before:?} {after:?}");
}

/// The prompt's log-probabilities read in pieces equal the log-softmax of one pass over it, and
/// a decoder continuing from the scoring pass's cache takes the tokens (and log-probabilities)
/// of one that reads the whole prompt.
#[test]
fn scored_prompts_continue_as_whole_prompts() {
    use lmkit_models::Tensor;
    let (m, _) = tiny_model();
    let prompt = [3u32, 9, 14, 2, 41, 7, 30, 5, 11];
    let whole = {
        let ids = Tensor::new(&prompt[..prompt.len() - 1], m.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let rows: Vec<Vec<f32>> = m
            .forward(&ids, &mut m.new_cache())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        rows
    };
    for pieces in [1, 3, 4, 8, 256] {
        let (scores, cache) = lmkit_infer::score_prompt_in_pieces(&m, &prompt, 3, pieces).unwrap();
        assert_eq!(scores.len(), prompt.len() - 1);
        assert_eq!(cache.len(), prompt.len() - 1);
        for (p, s) in scores.iter().enumerate() {
            let want = lmkit_infer::logprobs(&whole[p], prompt[p + 1], 3);
            assert_eq!(s.token, prompt[p + 1]);
            assert!(
                (s.logprob - want.logprob).abs() < 1e-5,
                "{pieces}: {s:?} {want:?}"
            );
            let ids = |t: &[(u32, f32)]| t.iter().map(|x| x.0).collect::<Vec<_>>();
            assert_eq!(ids(&s.top), ids(&want.top), "{pieces} at {p}");
        }
        let o = opts(3, None, SamplingParams::greedy());
        let mut cont = lmkit_infer::Decoder::with_prefix(&m, &prompt, o.clone(), cache).unwrap();
        let mut fresh = lmkit_infer::Decoder::new(&m, &prompt, o).unwrap();
        cont.keep_logprobs(2);
        fresh.keep_logprobs(2);
        for _ in 0..3 {
            assert_eq!(cont.step(&m).unwrap(), fresh.step(&m).unwrap());
            let (a, b) = (
                cont.last_logprobs().unwrap(),
                fresh.last_logprobs().unwrap(),
            );
            assert_eq!(a.token, b.token);
            assert!((a.logprob - b.logprob).abs() < 1e-5);
        }
    }
    // A prompt of one token: nothing to score, nothing cached.
    let (scores, cache) = lmkit_infer::score_prompt(&m, &[4], 1).unwrap();
    assert!(scores.is_empty() && cache.is_empty());
}

/// Prompts scored together (one packed pass) give each prompt's scores and cache as scoring it
/// alone does, in order, whatever their lengths (one token: nothing to score).
#[test]
fn prompts_scored_together_equal_each_alone() {
    let (m, _) = tiny_model();
    let prompts: [&[u32]; 4] = [
        &[3, 9, 14, 2, 41],
        &[8],
        &[7, 7, 30, 5, 11, 2, 19, 4, 6],
        &[1, 2],
    ];
    let asked: Vec<(&[u32], usize)> = prompts.iter().map(|&p| (p, 2)).collect();
    let together = lmkit_infer::score_prompts(&m, &asked);
    assert_eq!(together.len(), prompts.len());
    for (p, got) in prompts.iter().zip(together) {
        let (got, cache) = got.unwrap();
        let (want, alone) = lmkit_infer::score_prompt(&m, p, 2).unwrap();
        assert_eq!(cache.len(), alone.len());
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            assert_eq!(a.token, b.token);
            assert!((a.logprob - b.logprob).abs() < 1e-5, "{a:?} {b:?}");
            assert_eq!(a.top.len(), 2);
        }
        // The cache continues the prompt as the one of scoring it alone does.
        let o = opts(2, None, SamplingParams::greedy());
        let mut x = lmkit_infer::Decoder::with_prefix(&m, p, o.clone(), cache).unwrap();
        let mut y = lmkit_infer::Decoder::new(&m, p, o).unwrap();
        assert_eq!(x.step(&m).unwrap(), y.step(&m).unwrap());
    }
}
