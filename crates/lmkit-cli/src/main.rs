//! `lmkit`: one subcommand per stage of a language model's life.

mod data;
mod generate;
mod model;
mod ngram;
mod progress;
mod tokenizer;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lmkit",
    version,
    about = "lmkit: build, train, evaluate and serve language models",
    after_help = "Example:\n  lmkit ngram train --order 3 --input data/en --output en.lmkb\n  \
                  lmkit ngram rank --model en.lmkb 'In the beginning' 'beginning the In'"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Corpus preparation: normalize, filter, deduplicate, split
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Byte-level BPE tokenizers: train, encode (token shards), decode, stats
    #[command(subcommand)]
    Tokenizer(tokenizer::TokenizerCommand),
    /// Generate text with a checkpoint (KV cache, sampling, stop strings, streaming)
    Generate(generate::GenerateArgs),
    /// Neural checkpoints (Hugging Face layout): info, logits
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Train a neural language model from a TOML run config (checkpoints, resume, metrics, plot)
    Train(train::TrainArgs),
    /// Statistical n-gram language models (modified Kneser-Ney, ARPA/KenLM-compatible)
    #[command(subcommand)]
    Ngram(ngram::NgramCommand),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Data(cmd) => data::run(cmd),
        Command::Generate(a) => generate::run(a),
        Command::Model(cmd) => model::run(cmd),
        Command::Ngram(cmd) => ngram::run(cmd),
        Command::Tokenizer(cmd) => tokenizer::run(cmd),
        Command::Train(a) => train::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
