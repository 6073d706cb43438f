//! `lmkit tokenizer ...`: train, encode (to stdout or token shards), decode, stats.

use crate::lines::read_lines;
use crate::progress::Bar;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use lmkit_data::IngestOptions;
use lmkit_tokenize::{DocStream, ShardWriter, TrainOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer; writes DIR/tokenizer.json and DIR/tokenizer_config.json
    #[command(
        after_help = "Memory stays bounded: a document is trained on its first 8 MiB and a run of \
        non-space characters on its first 1 KiB (the command says how many documents it cut).\n\n\
        Examples:\n  lmkit tokenizer train --input data/en data/ko --vocab-size 8192 --output tok/\n  \
        lmkit tokenizer train --input prepared/ --vocab-size 16000 --special '<|tool|>' --output tok/"
    )]
    Train {
        #[command(flatten)]
        input: InputArgs,
        /// Output directory
        #[arg(long)]
        output: PathBuf,
        /// Vocabulary size, special tokens included
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        /// Minimum pair frequency for a merge
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        /// Extra special tokens (the defaults are <|endoftext|> <|pad|> <|mask|> <|system|> <|user|> <|assistant|> <|end|>)
        #[arg(long)]
        special: Vec<String>,
    },
    /// Encode text: ids per line on stdout, or token shards for training with --shards DIR
    #[command(
        after_help = "Examples:\n  echo '안녕하세요, world' | lmkit tokenizer encode --tokenizer tok/\n  \
        lmkit tokenizer encode --tokenizer tok/ --input prepared/ --shards shards/"
    )]
    Encode {
        /// tokenizer.json or the directory holding it
        #[arg(long)]
        tokenizer: PathBuf,
        /// Inputs (default: standard input, one text per line)
        #[command(flatten)]
        input: OptInputArgs,
        /// Write token shards (tokens-NNNNN.bin + .json) into this directory instead of printing ids
        #[arg(long)]
        shards: Option<PathBuf>,
        /// Tokens per shard
        #[arg(long, default_value_t = 100_000_000)]
        shard_tokens: u64,
        /// Add the special tokens the tokenizer puts around a text by default (a BOS for Llama 2
        /// or Mistral vocabularies; nothing for GPT-2's), as `lmkit generate --prompt` does
        #[arg(long)]
        add_special_tokens: bool,
    },
    /// Decode ids (space-separated, one sequence per line; from the arguments or stdin)
    #[command(
        after_help = "Example:\n  echo '101 2040 33' | lmkit tokenizer decode --tokenizer tok/"
    )]
    Decode {
        #[arg(long)]
        tokenizer: PathBuf,
        /// Ids to decode
        ids: Vec<u32>,
    },
    /// Tokens per byte and per word on some text, to judge a vocabulary
    #[command(
        after_help = "Example:\n  lmkit tokenizer stats --tokenizer tok/ --input data/en data/ko"
    )]
    Stats {
        #[arg(long)]
        tokenizer: PathBuf,
        #[command(flatten)]
        input: InputArgs,
    },
}

#[derive(Args)]
pub struct InputArgs {
    /// Text files or directories (.txt: a document per line; .jsonl: the --text-field; .gz too)
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// JSON field holding the text in .jsonl inputs
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Skip (and count) bad records instead of stopping at the first
    #[arg(long)]
    skip_bad: bool,
}

#[derive(Args)]
pub struct OptInputArgs {
    /// Text files or directories (.txt: a document per line; .jsonl: the --text-field; .gz too)
    #[arg(long, num_args = 1..)]
    input: Vec<PathBuf>,
    /// JSON field holding the text in .jsonl inputs
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Skip (and count) bad records instead of stopping at the first
    #[arg(long)]
    skip_bad: bool,
}

fn files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        out.extend(lmkit_data::collect_inputs(p)?);
    }
    Ok(out)
}

fn ingest(text_field: &str, skip_bad: bool) -> IngestOptions {
    IngestOptions {
        text_field: text_field.to_string(),
        skip_bad,
        ..Default::default()
    }
}

pub fn run(cmd: TokenizerCommand) -> Result<()> {
    match cmd {
        TokenizerCommand::Train {
            input,
            output,
            vocab_size,
            min_frequency,
            special,
        } => {
            let t0 = Instant::now();
            let mut opts = TrainOptions {
                vocab_size,
                min_frequency,
                ingest: ingest(&input.text_field, input.skip_bad),
                ..Default::default()
            };
            for s in special {
                if !opts.special_tokens.contains(&s) {
                    opts.special_tokens.push(s);
                }
            }
            let inputs = files(&input.input)?;
            eprintln!(
                "training byte-level BPE (vocab {vocab_size}) on {} file(s)...",
                inputs.len()
            );
            let (tk, report) = lmkit_tokenize::train_with_report(&inputs, &opts)?;
            if report.cut_documents > 0 {
                let mib = lmkit_tokenize::bpe::MAX_TRAIN_DOC >> 20;
                eprintln!(
                    "note: {} of {} documents are longer than {mib} MiB and were trained on their first {mib} MiB",
                    report.cut_documents, report.documents,
                );
            }
            lmkit_tokenize::save(&tk, &output, &opts.special_tokens)?;
            eprintln!(
                "wrote {} (vocab {}) in {:.1}s",
                output.join("tokenizer.json").display(),
                tk.get_vocab_size(true),
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        TokenizerCommand::Encode {
            tokenizer,
            input,
            shards,
            shard_tokens,
            add_special_tokens,
        } => {
            let tk = lmkit_tokenize::load(&tokenizer)?;
            // Documents come from a reader thread (files) or stdin, a chunk at a time.
            let mut docs = (!input.input.is_empty())
                .then(|| -> Result<DocStream> {
                    Ok(DocStream::open(
                        files(&input.input)?,
                        ingest(&input.text_field, input.skip_bad),
                    ))
                })
                .transpose()?;
            let t0 = Instant::now();
            let bar = Bar::default();
            let mut bytes = 0u64;
            // Shards are written as a whole: into a temporary directory that replaces `dir` (and
            // any earlier shards there) only when encoding succeeds.
            let output = match &shards {
                Some(dir) => Some(lmkit_core::OutputDir::create(
                    dir,
                    "a token shard (tokens-NNNNN.bin/.json)",
                    |n| n.starts_with("tokens-") && (n.ends_with(".bin") || n.ends_with(".json")),
                )?),
                None => None,
            };
            let mut writer = match &output {
                Some(staging) => {
                    let eot = tk.token_to_id(lmkit_tokenize::ENDOFTEXT);
                    if eot.is_none() {
                        eprintln!(
                            "warning: the tokenizer has no {} token; documents are not separated",
                            lmkit_tokenize::ENDOFTEXT
                        );
                    }
                    lmkit_core::Progress::begin(&bar, "encoding", 0, lmkit_core::Unit::Bytes);
                    Some(ShardWriter::new(
                        staging.path(),
                        tk.get_vocab_size(true),
                        eot,
                        shard_tokens,
                    )?)
                }
                None => None,
            };
            let mut out = BufWriter::new(std::io::stdout().lock());
            // The special tokens put around each document: written around its ids as they come
            // (a huge document's ids come a batch at a time); where the tokenizer's
            // post-processor does more than that, each document's ids are gathered and given to it.
            let affixes = match add_special_tokens {
                true => lmkit_tokenize::special_affixes(&tk)?,
                false => Some((Vec::new(), Vec::new())),
            };
            let mut gathered: Vec<u32> = Vec::new();
            let mut started = false; // ids of the current document written
            let mut emit = |ids: &[u32], end: bool| -> Result<()> {
                match writer.as_mut() {
                    Some(w) => {
                        w.write_ids(ids)?;
                        if end {
                            w.end_document()?;
                        }
                    }
                    None => {
                        for id in ids {
                            if started {
                                out.write_all(b" ")?;
                            }
                            write!(out, "{id}")?;
                            started = true;
                        }
                        if end {
                            out.write_all(b"\n")?;
                            started = false;
                        }
                    }
                }
                Ok(())
            };
            let mut encode_chunk = |chunk: Vec<String>| -> Result<()> {
                let mut first = true; // the next call starts a document
                lmkit_tokenize::encode_each::<anyhow::Error>(&tk, &chunk, |i, ids, last| {
                    match &affixes {
                        Some((head, tail)) => {
                            if first {
                                emit(head, false)?;
                            }
                            emit(ids, false)?;
                            if last {
                                emit(tail, true)?;
                            }
                        }
                        None => {
                            gathered.extend_from_slice(ids);
                            if last {
                                let all = std::mem::take(&mut gathered);
                                emit(&lmkit_tokenize::add_special_tokens(&tk, all)?, true)?;
                            }
                        }
                    }
                    first = last;
                    if last {
                        bytes += chunk[i].len() as u64;
                    }
                    Ok(())
                })?;
                lmkit_core::Progress::advance(&bar, chunk.len() as u64);
                Ok(())
            };
            // Files: documents from the reader thread; stdin: every line, blank ones included
            // (one line of ids per input line). Both a chunk at a time.
            match docs.as_mut() {
                Some(d) => loop {
                    let chunk = d.next_chunk(4096, lmkit_tokenize::CHUNK_BYTES);
                    if chunk.is_empty() {
                        break;
                    }
                    encode_chunk(chunk)?;
                },
                None => crate::lines::for_line_chunks(None, 4096, encode_chunk)?,
            }
            lmkit_core::Progress::finish(&bar);
            if let Some(d) = docs {
                let (read, skipped) = (d.documents, d.skipped());
                d.finish()?;
                if skipped > 0 {
                    if read == 0 {
                        anyhow::bail!("every record of the input was bad ({skipped} skipped): nothing to encode");
                    }
                    eprintln!("skipped {skipped} bad record(s)");
                }
            }
            if let (Some(w), Some(output), Some(dir)) = (writer.as_mut(), output, &shards) {
                w.finish()?;
                output.commit()?;
                let secs = t0.elapsed().as_secs_f64();
                eprintln!(
                    "wrote {} tokens from {} documents ({:.2} MB) into {} shard(s) in {} in {:.2}s ({:.1} MB/s)",
                    w.tokens,
                    w.documents,
                    bytes as f64 / 1e6,
                    w.paths.len(),
                    dir.display(),
                    secs,
                    bytes as f64 / 1e6 / secs.max(1e-9)
                );
            }
            Ok(())
        }
        TokenizerCommand::Decode { tokenizer, ids } => {
            let tk = lmkit_tokenize::load(&tokenizer)?;
            let seqs: Vec<Vec<u32>> = if ids.is_empty() {
                read_lines(None)?
                    .iter()
                    .enumerate()
                    .map(|(i, l)| {
                        l.split_whitespace()
                            .map(|t| {
                                t.parse::<u32>().with_context(|| {
                                    format!("<stdin>:{}: `{t}` is not a token id", i + 1)
                                })
                            })
                            .collect::<Result<Vec<u32>>>()
                    })
                    .collect::<Result<_>>()?
            } else {
                vec![ids]
            };
            let mut out = BufWriter::new(std::io::stdout().lock());
            for s in seqs {
                writeln!(out, "{}", lmkit_tokenize::decode(&tk, &s)?)?;
            }
            Ok(())
        }
        TokenizerCommand::Stats { tokenizer, input } => {
            let tk = lmkit_tokenize::load(&tokenizer)?;
            println!(
                "| input | documents | MB | tokens | tokens/byte | bytes/token | tokens/word |"
            );
            println!("|---|---|---|---|---|---|---|");
            for p in &input.input {
                let s = lmkit_tokenize::bpe::stats(
                    &tk,
                    &files(std::slice::from_ref(p))?,
                    &ingest(&input.text_field, input.skip_bad),
                )?;
                if s.documents == 0 {
                    bail!("{}: no text", p.display());
                }
                println!(
                    "| {} | {} | {:.2} | {} | {:.3} | {:.2} | {:.2} |",
                    p.display(),
                    s.documents,
                    s.bytes as f64 / 1e6,
                    s.tokens,
                    s.tokens_per_byte(),
                    s.bytes_per_token(),
                    s.tokens_per_word()
                );
            }
            Ok(())
        }
    }
}
