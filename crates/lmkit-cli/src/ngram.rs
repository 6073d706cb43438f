//! `lmkit ngram ...`: train, convert, score, ppl, rank, info.

use crate::lines::read_lines;
use crate::progress::Bar;
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use lmkit_ngram::tokenize::{tokens, EOS};
use lmkit_ngram::{Model, Perplexity, SentenceScore, Tokenization, TrainOptions};
use rayon::prelude::*;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Subcommand)]
pub enum NgramCommand {
    /// Count a corpus and estimate an interpolated modified Kneser-Ney model
    #[command(
        after_help = "Examples:\n  lmkit ngram train --order 3 --input data/en --output en.arpa\n  \
        lmkit ngram train --order 5 --chars --input data/ko --output ko.lmkb\n  \
        zcat corpus.txt.gz | lmkit ngram train --order 4 --input - --output big.lmkb --prune 0 1 1\n  \
        lmkit ngram train --order 3 --input corpus.txt.zst --limit-vocab words.txt --output small.arpa\n  \
        lmkit ngram train --order 5 --input web/ --output web.arpa --memory-mb 8192 --temp-dir /scratch\n\n\
        Every line is a sentence, blank lines too (an empty sentence), and words are split on spaces\n\
        and tabs only: the same text gives the same model as KenLM's lmplz. Where the n-grams do not fit\n\
        in --memory-mb, an .arpa build sorts them through files in --temp-dir (the same model)."
    )]
    Train(TrainArgs),
    /// Convert an ARPA model to the memory-mapped binary format
    #[command(
        after_help = "Examples:\n  lmkit ngram convert en.arpa en.lmkb                  # hash tables: fastest\n  \
        lmkit ngram convert en.arpa en.q8.lmkb --quantize 8  # trie, 8-bit values: small\n  \
        lmkit ngram convert en.arpa en.q8a.lmkb --quantize 8 --pointer-bits 22  # smallest"
    )]
    Convert {
        /// ARPA model to read
        arpa: PathBuf,
        /// Binary model to write (.lmkb)
        output: PathBuf,
        /// The ARPA model is over characters (as trained with --chars)
        #[arg(long)]
        chars: bool,
        #[command(flatten)]
        layout: LayoutArgs,
    },
    /// Print the log10 probability of each sentence (one per line, from --input or stdin)
    #[command(
        after_help = "Examples:\n  echo 'In the beginning' | lmkit ngram score --model en.arpa\n  \
        lmkit ngram score --model en.lmkb --input sentences.txt --verbose"
    )]
    Score {
        #[command(flatten)]
        model: ModelArgs,
        /// Sentences, one per line (default: standard input)
        #[arg(long)]
        input: Option<PathBuf>,
        /// Also print each word's log10 probability and the n-gram length used
        #[arg(long, short)]
        verbose: bool,
    },
    /// Perplexity of a text file, with OOVs counted separately (as KenLM's `query` does; a blank
    /// line is an empty sentence there too)
    #[command(after_help = "Example:\n  lmkit ngram ppl --model en.lmkb --input held_out.txt")]
    Ppl {
        #[command(flatten)]
        model: ModelArgs,
        /// Text, one sentence per line
        #[arg(long)]
        input: PathBuf,
    },
    /// Rank candidate sentences by probability, most likely first
    #[command(
        after_help = "Examples:\n  lmkit ngram rank --model ko.lmkb '나는 버스를 탔다' '나는 버스를 태운다'\n  \
        lmkit ngram rank --model en.arpa --input candidates.txt"
    )]
    Rank {
        #[command(flatten)]
        model: ModelArgs,
        /// Candidate sentences
        candidates: Vec<String>,
        /// Read candidates from a file, one per line
        #[arg(long)]
        input: Option<PathBuf>,
    },
    /// Show a model's order, vocabulary size and n-gram counts
    #[command(after_help = "Example:\n  lmkit ngram info en.lmkb")]
    Info {
        model: PathBuf,
        #[arg(long)]
        chars: bool,
    },
}

#[derive(Args)]
pub struct TrainArgs {
    /// Model order N (1..=8)
    #[arg(long, default_value_t = 3)]
    order: usize,
    /// Corpus: text files (one sentence per line; .gz and .zst are decompressed), directories
    /// searched for *.txt, *.txt.gz and *.txt.zst, or `-` for standard input
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Output model: .arpa (text, KenLM-compatible) or .lmkb (binary, memory-mapped)
    #[arg(long)]
    output: PathBuf,
    /// Character n-grams (whitespace becomes the token ▁) instead of whitespace words
    #[arg(long)]
    chars: bool,
    /// Memory budget in MiB for counting and, for an .arpa output, estimation: where the corpus's
    /// n-grams do not fit, both go through sorted files on disk (--temp-dir)
    #[arg(long, default_value_t = 1024)]
    memory_mb: usize,
    /// Directory for sorted runs (default: the system temporary directory)
    #[arg(long)]
    temp_dir: Option<PathBuf>,
    /// Drop <s>, </s> and <unk> found in the text instead of refusing it (lmplz --skip_symbols)
    #[arg(long)]
    skip_symbols: bool,
    /// Leave out n-grams seen at most T times, one threshold per order (the last repeats; they
    /// must not decrease), e.g. `--prune 0 1 2` (lmplz --prune)
    #[arg(long, num_args = 1.., value_name = "T")]
    prune: Vec<u64>,
    /// Keep only n-grams made of the words in FILE (separated by spaces, tabs or newlines; lmplz
    /// --limit_vocab_file)
    #[arg(long, value_name = "FILE")]
    limit_vocab: Option<PathBuf>,
    /// Use these discounts for D1 D2 D3+ where the estimate from the counts fails (tiny or
    /// artificial corpora); without a value 0.5 1 1.5; refused by default (lmplz
    /// --discount_fallback)
    #[arg(long, num_args = 0..=3, value_name = "D", default_missing_values = ["0.5", "1", "1.5"])]
    discount_fallback: Option<Vec<f64>>,
    /// Discounts of one order instead of estimated ones: ORDER=D1,D2,D3 (repeatable)
    #[arg(long, value_name = "ORDER=D1,D2,D3")]
    discounts: Vec<String>,
    #[command(flatten)]
    layout: LayoutArgs,
}

/// Three discounts D1 D2 D3+ from up to three values (the last repeats, as lmplz does), each
/// within [0, k].
fn three_discounts(option: &str, values: &[f64]) -> Result<[f64; 3]> {
    if values.is_empty() || values.len() > 3 {
        bail!("--{option}: give one to three discounts (for counts 1, 2 and 3+)");
    }
    let mut d = [0.0; 3];
    for (k, slot) in d.iter_mut().enumerate() {
        let v = values[k.min(values.len() - 1)];
        if !(0.0..=(k + 1) as f64).contains(&v) {
            bail!(
                "--{option}: the discount for count {} is {v}, outside [0, {}]",
                k + 1,
                k + 1
            );
        }
        *slot = v;
    }
    Ok(d)
}

fn estimate_options(a: &TrainArgs) -> Result<lmkit_ngram::EstimateOptions> {
    let fallback = match &a.discount_fallback {
        Some(v) => Some(three_discounts("discount-fallback", v)?),
        None => None,
    };
    if a.order == 0 || a.order > lmkit_ngram::MAX_ORDER {
        // (The library says so too, after this table would have been allocated.)
        return Err(lmkit_ngram::NgramError::BadOrder {
            order: a.order,
            max: lmkit_ngram::MAX_ORDER,
        }
        .into());
    }
    let mut given = vec![None; a.order];
    for spec in &a.discounts {
        let parsed = spec.split_once('=').and_then(|(n, ds)| {
            let n: usize = n.trim().parse().ok()?;
            let ds: Option<Vec<f64>> = ds.split(',').map(|d| d.trim().parse().ok()).collect();
            Some((n, ds?))
        });
        let Some((n, ds)) = parsed else {
            bail!("--discounts {spec}: expected ORDER=D1,D2,D3, e.g. 2=0.5,1,1.5");
        };
        if n == 0 || n > a.order {
            bail!("--discounts {spec}: order {n} is not in 1..={}", a.order);
        }
        given[n - 1] = Some(three_discounts("discounts", &ds)?);
    }
    let limit_vocab = match &a.limit_vocab {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let words: Vec<String> = text
                .split(lmkit_ngram::tokenize::is_lmplz_delimiter)
                .filter(|w| !w.is_empty())
                .map(str::to_string)
                .collect();
            if words.is_empty() {
                bail!("{}: no words in the --limit-vocab file", path.display());
            }
            Some(words)
        }
        None => None,
    };
    Ok(lmkit_ngram::EstimateOptions {
        prune: a.prune.clone(),
        limit_vocab,
        fallback,
        given,
    })
}

/// How a `.lmkb` model stores its n-grams.
#[derive(Args)]
pub struct LayoutArgs {
    /// Store the n-grams in a bit-packed trie (several times smaller, slower to query) instead of
    /// hash tables
    #[arg(long)]
    trie: bool,
    /// Quantize probabilities and back-offs to BITS bits (1..=16; implies --trie), as KenLM's
    /// `build_binary trie -q BITS`
    #[arg(long, value_name = "BITS")]
    quantize: Option<u32>,
    /// Compress the trie's child pointers: their high bits go to per-order offset tables of at
    /// most BITS bits (1..=32, sized to make the file smallest; implies --trie), as KenLM's
    /// `build_binary -a BITS`; smaller, a little slower to query
    #[arg(long, value_name = "BITS")]
    pointer_bits: Option<u32>,
}

impl LayoutArgs {
    fn layout(&self) -> lmkit_ngram::BinaryLayout {
        if self.trie || self.quantize.is_some() || self.pointer_bits.is_some() {
            lmkit_ngram::BinaryLayout::Trie {
                bits: self.quantize.unwrap_or(0),
                pointer_bits: self.pointer_bits.unwrap_or(0),
            }
        } else {
            lmkit_ngram::BinaryLayout::Probing
        }
    }

    fn check(&self, output: &std::path::Path) -> Result<()> {
        if let Some(bits) = self.quantize {
            if !(1..=lmkit_ngram::binary::MAX_QUANT_BITS).contains(&bits) {
                bail!(
                    "--quantize {bits}: give 1..={} bits",
                    lmkit_ngram::binary::MAX_QUANT_BITS
                );
            }
        }
        if let Some(bits) = self.pointer_bits {
            if !(1..=lmkit_ngram::binary::MAX_POINTER_BITS).contains(&bits) {
                bail!(
                    "--pointer-bits {bits}: give 1..={} bits",
                    lmkit_ngram::binary::MAX_POINTER_BITS
                );
            }
        }
        let binary = output.extension().and_then(|e| e.to_str()) == Some("lmkb");
        if (self.trie || self.quantize.is_some() || self.pointer_bits.is_some()) && !binary {
            bail!(
                "{}: --trie, --quantize and --pointer-bits describe a binary model; name the \
                 output *.lmkb",
                output.display()
            );
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct ModelArgs {
    /// Model file (.arpa or .lmkb)
    #[arg(long, short)]
    model: PathBuf,
    /// Tokenize into characters (for ARPA models trained with --chars; .lmkb models know this)
    #[arg(long)]
    chars: bool,
}

fn tokenization(chars: bool) -> Tokenization {
    if chars {
        Tokenization::Chars
    } else {
        Tokenization::Words
    }
}

fn load(m: &ModelArgs) -> Result<Model> {
    Ok(Model::open(&m.model, tokenization(m.chars))?)
}

pub fn run(cmd: NgramCommand) -> Result<()> {
    match cmd {
        NgramCommand::Train(a) => train(a),
        NgramCommand::Convert {
            arpa,
            output,
            chars,
            layout,
        } => {
            let t0 = Instant::now();
            layout.check(&output)?;
            let tables =
                lmkit_ngram::convert(&arpa, &output, tokenization(chars), layout.layout())?;
            eprintln!(
                "wrote {} ({} n-grams, order {}) in {:.2}s",
                output.display(),
                tables.orders.iter().map(|o| o.len()).sum::<usize>(),
                tables.order(),
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        NgramCommand::Score {
            model,
            input,
            verbose,
        } => {
            let m = load(&model)?;
            let out = std::io::stdout();
            let mut out = BufWriter::new(out.lock());
            let lines = read_lines(input.as_deref())?;
            let scores: Vec<SentenceScore> = lines.par_iter().map(|l| m.score_line(l)).collect();
            for (line, s) in lines.iter().zip(&scores) {
                writeln!(out, "{:.6}\t{}", s.log10_prob, line)?;
                if verbose {
                    let toks = tokens(line, m.tokenization());
                    for (word, w) in toks.iter().copied().chain(Some(EOS)).zip(&s.words) {
                        let oov = if w.oov { "\tOOV" } else { "" };
                        writeln!(
                            out,
                            "\t{word}\t{:.6}\t{}-gram{oov}",
                            w.log10_prob, w.ngram_len
                        )?;
                    }
                }
            }
            Ok(())
        }
        NgramCommand::Ppl { model, input } => {
            let m = load(&model)?;
            // Streamed a chunk of lines at a time (scored in parallel): memory stays bounded.
            let mut ppl = Perplexity::default();
            crate::lines::for_line_chunks(Some(&input), 1 << 16, |lines| {
                // A blank line is an empty sentence (`</s>` alone), as KenLM's `query` scores it.
                let part = lines
                    .par_iter()
                    .fold(Perplexity::default, |mut acc, l| {
                        m.add_line(l, &mut acc);
                        acc
                    })
                    .reduce(Perplexity::default, Perplexity::merge);
                ppl = Perplexity::merge(std::mem::take(&mut ppl), part);
                Ok(())
            })?;
            if ppl.tokens == 0 {
                bail!("{}: no lines to score", input.display());
            }
            println!("Perplexity including OOVs:\t{:.4}", ppl.including_oovs());
            println!("Perplexity excluding OOVs:\t{:.4}", ppl.excluding_oovs());
            println!("OOVs:\t{}", ppl.oovs);
            println!("Tokens:\t{}", ppl.tokens);
            println!("Sentences:\t{}", ppl.sentences);
            println!("log10 probability:\t{:.4}", ppl.log10_prob);
            Ok(())
        }
        NgramCommand::Rank {
            model,
            candidates,
            input,
        } => {
            let m = load(&model)?;
            crate::lines::rank(candidates, input.as_deref(), |c| {
                Ok(m.score_line(c).log10_prob as f64)
            })
        }
        NgramCommand::Info { model, chars } => {
            let t0 = Instant::now();
            let m = Model::open(&model, tokenization(chars))?;
            println!("model:\t{}", model.display());
            println!("loaded in:\t{:.3} ms", t0.elapsed().as_secs_f64() * 1e3);
            println!("order:\t{}", m.order());
            println!("tokens:\t{}", m.tokenization().name());
            match m.layout() {
                lmkit_ngram::BinaryLayout::Probing => println!("layout:\thash tables"),
                lmkit_ngram::BinaryLayout::Trie { bits, pointer_bits } => {
                    let values = match bits {
                        0 => String::new(),
                        b => format!(", {b}-bit values"),
                    };
                    let pointers = match pointer_bits {
                        0 => String::new(),
                        b => format!(", pointers compressed (tables of at most {b} bits)"),
                    };
                    println!("layout:\ttrie{values}{pointers}")
                }
            }
            println!("vocabulary:\t{}", m.vocab_size());
            for (i, c) in m.counts().iter().enumerate() {
                println!("{}-grams:\t{c}", i + 1);
            }
            Ok(())
        }
    }
}

fn train(a: TrainArgs) -> Result<()> {
    let t0 = Instant::now();
    let mut inputs = Vec::new();
    for p in &a.input {
        inputs.extend(lmkit_ngram::collect_inputs(p)?);
    }
    let opts = TrainOptions {
        order: a.order,
        tokenization: tokenization(a.chars),
        memory_bytes: a.memory_mb.saturating_mul(1 << 20),
        temp_dir: a.temp_dir.clone(),
        skip_symbols: a.skip_symbols,
        estimation: estimate_options(&a)?,
    };
    // Fail on a bad output name before spending time on counting.
    match a.output.extension().and_then(|e| e.to_str()) {
        Some("arpa") | Some("lmkb") => {}
        _ => bail!(
            "{}: the output must end in .arpa (text) or .lmkb (binary)",
            a.output.display()
        ),
    }
    a.layout.check(&a.output)?;
    let arpa = a.output.extension().and_then(|e| e.to_str()) == Some("arpa");
    let (counts, discounts, stats, on_disk) = if arpa {
        // Estimated on disk when counting does not fit in --memory-mb.
        let t = lmkit_ngram::train_arpa(&inputs, &opts, &a.output, &Bar::default())?;
        (t.counts, t.discounts, t.stats, t.on_disk)
    } else {
        let t = lmkit_ngram::train(&inputs, &opts, &Bar::default())?;
        lmkit_ngram::save_as(&t.tables, &a.output, a.layout.layout())?;
        let counts = t.tables.orders.iter().map(|o| o.len() as u64).collect();
        (counts, t.discounts, t.stats, false)
    };
    let s = &stats;
    eprintln!(
        "read {} file(s), {} lines ({} blank), {} sentences, {} tokens, {} bytes",
        s.files, s.lines, s.blank_lines, s.sentences, s.tokens, s.bytes
    );
    if s.skipped_symbols > 0 {
        eprintln!(
            "dropped {} <s>, </s> and <unk> from the text (--skip-symbols)",
            s.skipped_symbols
        );
    }
    if s.runs_on_disk > 0 {
        eprintln!("counting spilled {} sorted runs to disk", s.runs_on_disk);
    }
    if on_disk {
        eprintln!("estimated through sorted files on disk (within --memory-mb)");
    } else if s.runs_on_disk > 0 {
        eprintln!(
            "estimated in memory: a binary model is built from tables in memory (write .arpa \
             to stay within --memory-mb, then `lmkit ngram convert`)"
        );
    }
    eprintln!("vocabulary: {} (with <s>, </s>, <unk>)", counts[0]);
    for (n, (c, d)) in counts.iter().zip(&discounts).enumerate() {
        let note = match d.source {
            lmkit_ngram::DiscountSource::Estimated => "",
            lmkit_ngram::DiscountSource::Fallback => {
                " (--discount-fallback: the estimate from the counts failed)"
            }
            lmkit_ngram::DiscountSource::Given => " (given)",
        };
        eprintln!(
            "{}-grams: {:>9}   discounts D1={:.4} D2={:.4} D3+={:.4}{note}",
            n + 1,
            c,
            d.d[0],
            d.d[1],
            d.d[2]
        );
    }
    eprintln!(
        "wrote {} in {:.2}s",
        a.output.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
