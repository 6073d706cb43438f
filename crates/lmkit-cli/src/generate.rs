//! `lmkit generate`: continue a prompt with a checkpoint, streaming the text.

use anyhow::{bail, Context, Result};
use clap::Args;
use lmkit_infer::{generate_constrained, Finish, GenerateOptions, SamplingParams, TextStream};
use lmkit_models::CausalLm;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
#[command(
    after_help = "Examples:\n  lmkit generate --model runs/gpt/ --prompt 'In the beginning' --max-tokens 50\n  \
    lmkit generate --model runs/gpt/ --prompt '대한민국은' --temperature 0.7 --top-k 40 --seed 1 --stop '\\n'\n  \
    lmkit generate --model runs/gpt/ --prompt-ids 5,17,3 --greedy --ids\n  \
    lmkit generate --model smollm2/ --prompt 'Hello' --device cuda --dtype bf16   # half the memory\n  \
    lmkit generate --model runs/bart/ --source 'the cat sat on the mat' --greedy   # encoder-decoder\n  \
    lmkit generate --model runs/bart/ --source 'the cat sat on the mat' --num-beams 4 --length-penalty 1.0\n  \
    lmkit generate --model SmolLM2-135M-Instruct.Q4_1.gguf --prompt 'A person: ' --json-schema person.json --greedy\n  \
    lmkit generate --model runs/gpt/ --prompt 'Year: ' --regex '(19|20)[0-9]{2}'\n  \
    lmkit generate --model qwen2.5-coder/ --prompt 'def area(r):\n    ' --suffix '\n    return a' --greedy"
)]
pub struct GenerateArgs {
    /// Checkpoint directory (config.json, model.safetensors, tokenizer.json)
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter directory (PEFT's format, or a `lmkit finetune` output) added to the model
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// tokenizer.json or its directory (default: the model directory)
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Prompt text
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Fill in the middle: the text that follows the generated one (--prompt is the text before
    /// it); needs a code model with fill-in-the-middle tokens (<|fim_prefix|>, <fim_prefix>...)
    #[arg(long, requires = "prompt")]
    suffix: Option<String>,
    /// Encoder-decoder models: the text to translate or summarize
    #[arg(long, conflicts_with_all = ["prompt", "prompt_ids"])]
    source: Option<String>,
    /// Prompt as comma-separated token ids
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Vec<u32>,
    /// Encoder-decoder models: the source as comma-separated token ids
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["prompt", "prompt_ids", "source"])]
    source_ids: Vec<u32>,
    /// Encoder-decoder models: beam search with this many beams (1: greedy or sampling)
    #[arg(long, default_value_t = 1)]
    num_beams: usize,
    /// Beam search: finished hypotheses are scored by log-probability / length^this (> 0 favours
    /// longer ones)
    #[arg(long, default_value_t = 1.0)]
    length_penalty: f32,
    /// Beam search: true (stop once --num-beams hypotheses finished), false (stop when no running
    /// beam can do better, transformers' default) or never
    #[arg(long, default_value = "false")]
    early_stopping: lmkit_infer::beam::EarlyStopping,
    /// Maximum number of new tokens
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy)
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep only the k most likely tokens
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Penalty (> 1) for tokens already in the text
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Random seed (the same seed gives the same text)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the text contains this string (repeatable; not included in the output)
    #[arg(long)]
    stop: Vec<String>,
    /// Greedy decoding (same as --temperature 0)
    #[arg(long)]
    greedy: bool,
    /// Keep going past the end-of-sequence token
    #[arg(long)]
    ignore_eos: bool,
    /// Print the generated token ids instead of text
    #[arg(long)]
    ids: bool,
    #[command(flatten)]
    placement: crate::placement::Placement,
    #[command(flatten)]
    constraint: crate::constraint::ConstraintArgs,
}

impl GenerateArgs {
    /// The sampling settings the flags ask for (--greedy means temperature 0).
    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: if self.greedy { 0.0 } else { self.temperature },
            top_k: self.top_k,
            top_p: (self.top_p < 1.0).then_some(self.top_p),
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        }
    }
}

/// Encoder-decoder models: decode a reply to `--source` (or `--source-ids`) with the decoder's
/// KV cache: by beam search (`--num-beams` > 1), greedily or by sampling.
fn run_seq2seq(a: &GenerateArgs) -> Result<()> {
    let dev = a.placement.device()?;
    if a.placement.dtype()? != lmkit_models::DType::F32 {
        bail!(
            "--dtype {} is for causal models; encoder-decoders run in f32",
            a.placement.dtype
        );
    }
    let dir = lmkit_models::resolve_checkpoint(&a.model);
    let m = lmkit_models::bart::Bart::load(&dir, &dev)?;
    let tk = match (&a.source, a.ids) {
        (None, true) => None,
        _ => Some(lmkit_tokenize::load(
            a.tokenizer.as_deref().unwrap_or(&dir),
        )?),
    };
    let mut src = match (&a.source, &tk) {
        (Some(text), Some(tk)) => {
            lmkit_tokenize::encode_batch(tk, std::slice::from_ref(text))?.remove(0)
        }
        _ => a.source_ids.clone(),
    };
    src.truncate(m.cfg.max_position_embeddings);
    if src.is_empty() {
        bail!("the source is empty");
    }
    if let Some(bad) = src.iter().find(|&&i| i as usize >= m.cfg.vocab_size) {
        bail!(
            "source id {bad} is outside the vocabulary ({} tokens)",
            m.cfg.vocab_size
        );
    }
    let memory = m.encode(
        &lmkit_models::Tensor::new(src.as_slice(), &dev)?.unsqueeze(0)?,
        None,
    )?;
    let mut cache = m.decoder_cache(&memory, None)?;
    let start = m.cfg.start_token();
    // Positions left for the decoder (its first input is the start token).
    let room = m.cfg.max_position_embeddings.saturating_sub(1);
    let eos: Vec<u32> = m
        .cfg
        .eos_token_id
        .into_iter()
        .filter(|_| !a.ignore_eos)
        .collect();
    let mut stdout = std::io::stdout().lock();
    if a.num_beams > 1 {
        let settings = lmkit_infer::beam::BeamSettings {
            num_beams: a.num_beams,
            length_penalty: a.length_penalty,
            early_stopping: a.early_stopping,
            max_new_tokens: a.max_tokens.min(room),
            eos: eos.clone(),
        };
        let mut out = lmkit_infer::beam::beam_search(
            &settings,
            &[start],
            |parents, seqs| -> Result<Vec<Vec<f32>>> {
                match parents {
                    None => cache.select(&vec![0; seqs.len()])?,
                    Some(p) => cache.select(p)?,
                }
                let new: Vec<u32> = seqs
                    .iter()
                    .flat_map(|s| s[cache.len..].iter().copied())
                    .collect();
                let t = seqs[0].len() - cache.len;
                let x = lmkit_models::Tensor::from_vec(new, (seqs.len(), t), &dev)?;
                let logits = m.decode_next(&x, &mut cache)?;
                Ok(logits.narrow(1, t - 1, 1)?.squeeze(1)?.to_vec2::<f32>()?)
            },
        )?;
        if out.last().is_some_and(|t| eos.contains(t)) {
            out.pop();
        }
        if a.ids {
            write_ids(&mut stdout, &out)?;
        } else if let Some(tk) = &tk {
            writeln!(stdout, "{}", lmkit_tokenize::decode(tk, &out)?)?;
        }
        return Ok(());
    }
    let sampling = a.sampling();
    sampling.validate().map_err(anyhow::Error::msg)?;
    let mut rng = lmkit_infer::Rng::new(a.seed);
    let mut out = Vec::new();
    let mut stream = tk.as_ref().map(|tk| TextStream::new(tk, a.stop.clone()));
    let mut next_input = start;
    while out.len() < a.max_tokens && out.len() < room {
        let x = lmkit_models::Tensor::new(&[[next_input]], &dev)?;
        let last: Vec<f32> = m
            .decode_next(&x, &mut cache)?
            .squeeze(0)?
            .squeeze(0)?
            .to_vec1()?;
        let next = lmkit_infer::sample(&last, &out, &sampling, &mut rng);
        if eos.contains(&next) {
            break;
        }
        out.push(next);
        next_input = next;
        if a.ids {
            continue;
        }
        if let Some(stream) = &mut stream {
            let delta = stream.push(&out)?;
            stdout.write_all(delta.as_bytes())?;
            stdout.flush()?;
            if stream.stopped {
                break;
            }
        }
    }
    match stream {
        Some(mut stream) if !a.ids => {
            write!(stdout, "{}", stream.finish(&out)?)?;
            writeln!(stdout)?;
        }
        _ => write_ids(&mut stdout, &out)?,
    }
    Ok(())
}

/// Token ids as one line, separated by spaces.
fn write_ids(out: &mut impl Write, ids: &[u32]) -> std::io::Result<()> {
    let line: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    writeln!(out, "{}", line.join(" "))
}

pub fn run(a: GenerateArgs) -> Result<()> {
    // Each beam keeps its own cache and candidates (transformers' users take 2–16).
    const MAX_BEAMS: usize = 256;
    if a.num_beams == 0 || a.num_beams > MAX_BEAMS {
        bail!("--num-beams must be in 1..={MAX_BEAMS} (1: no beam search)");
    }
    if a.source.is_some() || !a.source_ids.is_empty() {
        return run_seq2seq(&a);
    }
    if a.num_beams > 1 {
        bail!("--num-beams is for encoder-decoder models (--source); decoder-only models decode greedily or by sampling");
    }
    let (model, cfg) = CausalLm::load_adapted(
        &a.model,
        a.adapter.as_deref(),
        &a.placement.device()?,
        a.placement.dtype()?,
    )?;
    let tok_path = a
        .tokenizer
        .clone()
        .unwrap_or_else(|| lmkit_models::resolve_checkpoint(&a.model));
    let needs_tokenizer = a.prompt.is_some() || !a.ids;
    let tokenizer = if needs_tokenizer {
        Some(lmkit_tokenize::load(&tok_path)?)
    } else {
        None
    };
    if let Some(tk) = &tokenizer {
        let n = tk.get_vocab_size(true);
        if n > cfg.vocab_size() {
            bail!(
                "the tokenizer ({}) has {n} tokens but the model's vocab_size is {}: they do not belong together",
                tok_path.display(),
                cfg.vocab_size()
            );
        }
    }
    // Fill in the middle: the model's tokens for it, and those that end a middle.
    let fim = match (&a.suffix, &tokenizer) {
        (Some(_), Some(tk)) => Some(lmkit_tokenize::fim::Fim::of(&tok_path, tk).with_context(
            || {
                format!(
                    "--suffix: {} has no fill-in-the-middle tokens (such as <|fim_prefix|>, \
                     <|fim_suffix|>, <|fim_middle|>); it needs a code model trained with them",
                    tok_path.display()
                )
            },
        )?),
        _ => None,
    };
    let prompt: Vec<u32> = match (&a.prompt, &tokenizer, &fim, &a.suffix) {
        (Some(text), Some(tk), Some(f), Some(suffix)) => f.prompt(tk, text, suffix)?,
        (Some(text), Some(tk), _, _) => lmkit_tokenize::encode_prompt(tk, text)?,
        _ => a.prompt_ids.clone(),
    };
    if prompt.is_empty() {
        bail!("give a prompt: --prompt TEXT or --prompt-ids 1,2,3");
    }
    if let Some(bad) = prompt.iter().find(|&&i| i as usize >= cfg.vocab_size()) {
        bail!(
            "prompt token id {bad} is out of range for vocab_size {}",
            cfg.vocab_size()
        );
    }
    let sampling = a.sampling();
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling,
        stop_ids: if a.ignore_eos {
            Vec::new()
        } else {
            let mut ids = stop_ids(&a.model, cfg.vocab_size())?;
            if let Some(f) = &fim {
                f.add_ends(&mut ids);
            }
            ids
        },
        max_positions: cfg.max_positions(),
    };
    let mut constraint = match (a.constraint.spec()?, &tokenizer) {
        (None, _) => None,
        (Some(_), None) => {
            bail!("constrained decoding needs the model's tokenizer (tokenizer.json)")
        }
        (Some(_), Some(_)) if a.ignore_eos => {
            bail!("--ignore-eos cannot be combined with a constraint: the grammar decides where the text ends")
        }
        (Some(spec), Some(tk)) => Some(crate::constraint::compile(
            &crate::constraint::engine(tk, cfg.vocab_size(), &opts.stop_ids)?,
            &spec,
        )?),
    };
    let mut out = std::io::stdout().lock();
    let started = std::time::Instant::now();
    // When the first token arrives, the prompt has been read (and one token sampled).
    let first = std::cell::Cell::new(None);
    let mark = || {
        if first.get().is_none() {
            first.set(Some(started.elapsed().as_secs_f64()));
        }
    };
    let (ids, finish) = match (&tokenizer, a.ids) {
        (Some(tk), false) => {
            let mut stream = TextStream::new(tk, a.stop.clone());
            let mut err = None;
            let res =
                generate_constrained(&model, &prompt, &opts, constraint.take(), &mut |_, all| {
                    mark();
                    match stream.push(all) {
                        Ok(delta) => {
                            let _ = out.write_all(delta.as_bytes()).and_then(|_| out.flush());
                            !stream.stopped
                        }
                        Err(e) => {
                            err = Some(e);
                            false
                        }
                    }
                })?;
            if let Some(e) = err {
                return Err(e.into());
            }
            let tail = stream.finish(&res.0)?;
            write!(out, "{tail}")?;
            writeln!(out)?;
            res
        }
        _ => {
            let res =
                generate_constrained(&model, &prompt, &opts, constraint.take(), &mut |_, _| {
                    mark();
                    true
                })?;
            write_ids(&mut out, &res.0)?;
            res
        }
    };
    let why = match finish {
        Finish::Eos => "end of sequence",
        Finish::Length => "max tokens",
        Finish::Context => "context full",
        Finish::Stopped => "stop string",
    };
    let secs = started.elapsed().as_secs_f64();
    let prompt_secs = first.get().unwrap_or(secs);
    // Decoding speed: the tokens after the first, over the time after the first.
    let decode_rate = ids.len().saturating_sub(1) as f64 / (secs - prompt_secs).max(1e-9);
    eprintln!(
        "[{} prompt tokens in {prompt_secs:.3} s ({:.1} tokens/s), {} generated in {secs:.3} s ({decode_rate:.1} tokens/s after the first), stopped: {why}]",
        prompt.len(),
        prompt.len() as f64 / prompt_secs.max(1e-9),
        ids.len(),
    );
    if std::env::var_os("LMKIT_CUDA_TIMING").is_some() {
        let c = lmkit_infer::step_clock();
        let ms = |s: f64| 1e3 * s / c.steps.max(1) as f64;
        eprintln!(
            "[{} decoding steps: {:.3} ms a step running the pass on the host, {:.3} ms reading its logits (on a GPU: waiting for the pass to finish)]",
            c.steps,
            ms(c.pass_secs),
            ms(c.read_secs),
        );
    }
    Ok(())
}

/// The model's end-of-text ids that can be sampled, with a warning for any outside the vocabulary.
pub(crate) fn stop_ids(model: &std::path::Path, vocab_size: usize) -> Result<Vec<u32>> {
    let (ids, warning) = lmkit_models::sampleable_stop_ids(model, vocab_size)?;
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
    Ok(ids)
}
