//! `lmkit generate`: continue a prompt with a checkpoint, streaming the text.

use anyhow::{bail, Result};
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
    lmkit generate --model runs/bart/ --source 'the cat sat on the mat' --greedy   # encoder-decoder\n  \
    lmkit generate --model SmolLM2-135M-Instruct.Q4_1.gguf --prompt 'A person: ' --json-schema person.json --greedy\n  \
    lmkit generate --model runs/gpt/ --prompt 'Year: ' --regex '(19|20)[0-9]{2}'"
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
    /// Encoder-decoder models: the text to translate or summarize
    #[arg(long, conflicts_with_all = ["prompt", "prompt_ids"])]
    source: Option<String>,
    /// Prompt as comma-separated token ids
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Vec<u32>,
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
    /// Where to run: cpu, cuda or cuda:N (cuda needs a build with --features cuda)
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    constraint: crate::constraint::ConstraintArgs,
}

/// Encoder-decoder models: decode a reply to `--source` (no KV cache; the decoder re-reads its
/// output each step).
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

fn run_seq2seq(a: &GenerateArgs, source: &str) -> Result<()> {
    let dev = lmkit_models::parse_device(&a.device)?;
    let dir = lmkit_models::resolve_checkpoint(&a.model);
    let m = lmkit_models::bart::Bart::load(&dir, &dev)?;
    let tk = lmkit_tokenize::load(a.tokenizer.as_deref().unwrap_or(&dir))?;
    let mut src = lmkit_tokenize::encode_batch(&tk, &[source.to_string()])?.remove(0);
    src.truncate(m.cfg.max_position_embeddings);
    if src.is_empty() {
        anyhow::bail!("--source is empty");
    }
    let memory = m.encode(
        &lmkit_models::Tensor::new(src.as_slice(), &dev)?.unsqueeze(0)?,
        None,
    )?;
    let sampling = a.sampling();
    sampling.validate().map_err(anyhow::Error::msg)?;
    let mut rng = lmkit_infer::Rng::new(a.seed);
    let mut ids = vec![m.cfg.start_token()];
    let mut out = Vec::new();
    let eos = m.cfg.eos_token_id;
    let mut stream = TextStream::new(&tk, a.stop.clone());
    let mut stdout = std::io::stdout().lock();
    while out.len() < a.max_tokens && ids.len() < m.cfg.max_position_embeddings {
        let x = lmkit_models::Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?;
        let logits = m.decode(&x, &memory, None)?.squeeze(0)?;
        let last: Vec<f32> = logits.get(ids.len() - 1)?.to_vec1()?;
        let next = lmkit_infer::sample(&last, &out, &sampling, &mut rng);
        if Some(next) == eos && !a.ignore_eos {
            break;
        }
        ids.push(next);
        out.push(next);
        if a.ids {
            continue;
        }
        let delta = stream.push(&out)?;
        stdout.write_all(delta.as_bytes())?;
        stdout.flush()?;
        if stream.stopped {
            break;
        }
    }
    if a.ids {
        let line: Vec<String> = out.iter().map(|i| i.to_string()).collect();
        writeln!(stdout, "{}", line.join(" "))?;
    } else {
        write!(stdout, "{}", stream.finish(&out)?)?;
        writeln!(stdout)?;
    }
    Ok(())
}

pub fn run(a: GenerateArgs) -> Result<()> {
    if let Some(src) = &a.source {
        return run_seq2seq(&a, src);
    }
    let dev = lmkit_models::parse_device(&a.device)?;
    let (model, cfg) = CausalLm::load_adapted(&a.model, a.adapter.as_deref(), &dev)?;
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
    let prompt: Vec<u32> = match (&a.prompt, &tokenizer) {
        (Some(text), Some(tk)) => {
            lmkit_tokenize::encode_batch(tk, std::slice::from_ref(text))?.remove(0)
        }
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
            stop_ids(&a.model, cfg.vocab_size())?
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
            let line: Vec<String> = res.0.iter().map(|i| i.to_string()).collect();
            writeln!(out, "{}", line.join(" "))?;
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
