//! `lmkit model ...`: inspect a checkpoint and print its logits (for checks against other tools).

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use lmkit_models::{CausalLm, DecoderConfig, Device, Tensor};
use std::io::Write;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Print a checkpoint's architecture and sizes
    #[command(after_help = "Example:\n  lmkit model info runs/gpt/")]
    Info { model: PathBuf },
    /// Print the logits for a sequence of token ids as JSON ([position][vocab])
    #[command(
        after_help = "Examples:\n  lmkit model logits --model runs/gpt/ --ids 1,5,9\n  \
        lmkit model logits --model runs/gpt/ --ids 1,5,9 --incremental   # one token at a time through the KV cache"
    )]
    Logits {
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u32>,
        /// Feed the ids one at a time through the KV cache instead of all at once
        #[arg(long)]
        incremental: bool,
        /// Encoder-decoder models: the source token ids (`--ids` are then the decoder's inputs)
        #[arg(long, value_delimiter = ',')]
        source_ids: Vec<u32>,
        /// Where to run: cpu, cuda or cuda:N
        #[arg(long, default_value = "cpu")]
        device: String,
        /// The causal model's type: f32, bf16 or f16 (the logits are written in f32)
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Write the logits to this file as a NumPy .npy array (f32) instead of JSON on stdout
        #[arg(long)]
        output: Option<PathBuf>,
        /// A LoRA adapter directory (PEFT's format) added to a causal model
        #[arg(long)]
        adapter: Option<PathBuf>,
    },
}

/// Writes `rows` (equal lengths) as a little-endian f32 NumPy array, atomically.
fn write_npy(path: &std::path::Path, rows: &[Vec<f32>]) -> Result<()> {
    let cols = rows.first().map_or(0, |r| r.len());
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {cols}), }}",
        rows.len()
    );
    // Magic (6) + version (2) + length (2) + header + newline, padded to a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + rows.len() * cols * 4);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for r in rows {
        for v in r {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    lmkit_core::write_atomic_bytes(path, &bytes)?;
    Ok(())
}

/// The logits: to `output` as .npy, or as JSON on stdout.
fn emit(rows: &[Vec<f32>], output: Option<&std::path::Path>) -> Result<()> {
    if let Some(path) = output {
        return write_npy(path, rows);
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    serde_json::to_writer(&mut out, rows).context("writing logits")?;
    writeln!(out)?;
    Ok(())
}

use lmkit_models::{kind_of, Kind};

/// `model info` of a BERT-like encoder: its family, sizes and head.
fn encoder_info(model: &std::path::Path) -> Result<()> {
    let m = lmkit_models::bert::Bert::load(model, &Device::Cpu)?;
    let c = &m.cfg;
    let head = match m.task() {
        Some(t) => format!(
            "{t:?} classification ({} labels: {})",
            m.labels().len(),
            m.labels().join(", ")
        ),
        None if m.has_mlm_head() => "masked LM".into(),
        None => "none (encoder only)".into(),
    };
    println!(
        "model_type:\t{}\nlayers:\t{}\nheads:\t{}\nhidden_size:\t{}\nvocab_size:\t{}\ntokens:\t{}\nhead:\t{head}\npooling:\t{:?}{}",
        c.arch.model_type(),
        c.num_hidden_layers,
        c.num_attention_heads,
        c.hidden_size,
        c.vocab_size,
        c.max_tokens(),
        m.pooling.mode,
        if m.pooling.normalize { ", normalized" } else { "" }
    );
    let params = lmkit_models::ModelConfig::Bert(c.clone()).num_parameters();
    println!("parameters:\t{params} (encoder and masked-LM head as configured)");
    Ok(())
}

pub fn run(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Info { model } => {
            if kind_of(&model)? == Kind::Masked {
                return encoder_info(&model);
            }
            let (m, cfg) = CausalLm::load(&model, &Device::Cpu)?;
            match &cfg {
                DecoderConfig::Gpt2(c) => println!(
                    "architecture:\tGPT2LMHeadModel\nlayers:\t{}\nheads:\t{}\nn_embd:\t{}\nvocab_size:\t{}\npositions:\t{}",
                    c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.n_positions
                ),
                DecoderConfig::GptNeox(c) => println!(
                    "architecture:\tGPTNeoXForCausalLM\nlayers:\t{}\nheads:\t{}\nhidden_size:\t{}\nrotary dims:\t{} of {}\nvocab_size:\t{}\npositions:\t{}",
                    c.num_hidden_layers,
                    c.num_attention_heads,
                    c.hidden_size,
                    c.rotary_dims(),
                    c.head_dim(),
                    c.vocab_size,
                    c.max_position_embeddings
                ),
                DecoderConfig::Llama(c) => println!(
                    "architecture:\t{}\nlayers:\t{}\nheads:\t{} (kv {})\nhidden_size:\t{}\nvocab_size:\t{}\npositions:\t{}",
                    c.arch.architecture(),
                    c.num_hidden_layers,
                    c.num_attention_heads,
                    c.num_kv_heads(),
                    c.hidden_size,
                    c.vocab_size,
                    c.max_position_embeddings
                ),
                DecoderConfig::Rnn(c) => println!(
                    "architecture:\t{}\nlayers:\t{}\nhidden_size:\t{}\nembedding_size:\t{}\nvocab_size:\t{}",
                    match c.cell {
                        lmkit_models::Cell::Rnn => "RNN (tanh)",
                        lmkit_models::Cell::Lstm => "LSTM",
                    },
                    c.num_layers,
                    c.hidden_size,
                    c.embedding_size(),
                    c.vocab_size
                ),
            }
            println!("cache layers:\t{}", m.num_layers());
            let params = lmkit_models::ModelConfig::from_decoder(&cfg).num_parameters();
            println!("parameters:\t{params}");
            if lmkit_models::gguf::is_gguf(&model) {
                let g = lmkit_models::gguf::Gguf::open(&model)?;
                let mut counts = std::collections::BTreeMap::new();
                for name in g.tensor_names() {
                    if let Some(t) = g.dtype(name) {
                        *counts.entry(format!("{t:?}")).or_insert(0) += 1;
                    }
                }
                let types: Vec<String> = counts.iter().map(|(t, n)| format!("{t} ×{n}")).collect();
                println!("format:\tGGUF ({})", g.architecture()?);
                println!("weights:\t{}", types.join(", "));
            } else {
                println!("format:\tHugging Face directory (weights read as f32)");
            }
            let dir = lmkit_models::resolve_checkpoint(&model);
            let template = lmkit_tokenize::chat::load_template(&dir)?;
            println!(
                "chat template:\t{}",
                match &template {
                    Some(t) => format!("yes ({} characters)", t.source.len()),
                    None => "none".into(),
                }
            );
            Ok(())
        }
        ModelCommand::Logits {
            model,
            device,
            dtype,
            ids,
            incremental,
            source_ids,
            output,
            adapter,
        } => {
            let dev = lmkit_models::parse_device(&device)?;
            let dtype = lmkit_models::parse_dtype(&dtype)?;
            let kind = kind_of(&model)?;
            if kind != Kind::Causal && dtype != lmkit_models::DType::F32 {
                bail!(
                    "--dtype {} is for causal models; this one runs in f32",
                    dtype.as_str()
                );
            }
            if kind == Kind::Seq2seq {
                if source_ids.is_empty() {
                    bail!("an encoder-decoder model needs --source-ids");
                }
                let m = lmkit_models::bart::Bart::load(&model, &dev)?;
                let v = m.cfg.vocab_size;
                if let Some(bad) = ids.iter().chain(&source_ids).find(|&&i| i as usize >= v) {
                    bail!("token id {bad} is out of range for vocab_size {v}");
                }
                let src = Tensor::new(source_ids.as_slice(), &dev)?.unsqueeze(0)?;
                let x = Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?;
                let memory = m.encode(&src, None)?;
                let rows = m.decode(&x, &memory, None)?.squeeze(0)?.to_vec2::<f32>()?;
                return emit(&rows, output.as_deref());
            }
            if kind == Kind::Masked {
                // Masked-LM logits of the whole sequence (bidirectional: no incremental mode).
                if incremental {
                    bail!(
                        "--incremental is for causal models; BERT reads the whole sequence at once"
                    );
                }
                let m = lmkit_models::bert::Bert::load(&model, &dev)?;
                if let Some(bad) = ids.iter().find(|&&i| i as usize >= m.cfg.vocab_size) {
                    bail!(
                        "token id {bad} is out of range for vocab_size {}",
                        m.cfg.vocab_size
                    );
                }
                let x = Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?;
                let h = m.hidden(&x, None)?;
                // A classification checkpoint gives its head's logits ([1, labels] for a sequence
                // head, [1, t, labels] for a token head); otherwise the masked-LM logits
                // [1, t, vocab]. Rows: one per position, or the one row of the sequence.
                let logits = if m.task().is_some() {
                    m.task_logits(&h)?
                } else {
                    m.mlm_logits(&h)?
                };
                let logits = if logits.rank() == 3 {
                    logits.squeeze(0)?
                } else {
                    logits
                };
                let rows = logits.to_vec2::<f32>()?;
                return emit(&rows, output.as_deref());
            }
            let (m, cfg) = CausalLm::load_adapted(&model, adapter.as_deref(), &dev, dtype)?;
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= cfg.vocab_size()) {
                bail!(
                    "token id {bad} is out of range for vocab_size {}",
                    cfg.vocab_size()
                );
            }
            if ids.len() > cfg.max_positions() {
                bail!(
                    "{} ids exceed the model's {} positions",
                    ids.len(),
                    cfg.max_positions()
                );
            }
            let mut cache = if incremental {
                m.new_cache()
            } else {
                m.single_pass_cache()
            };
            let rows: Vec<Vec<f32>> = if incremental {
                let mut rows = Vec::new();
                for &id in &ids {
                    let x = Tensor::new(&[[id]], &dev)?;
                    rows.extend(m.forward(&x, &mut cache)?.squeeze(0)?.to_vec2::<f32>()?);
                }
                rows
            } else {
                let x = Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?;
                m.forward(&x, &mut cache)?.squeeze(0)?.to_vec2::<f32>()?
            };
            emit(&rows, output.as_deref())
        }
    }
}
