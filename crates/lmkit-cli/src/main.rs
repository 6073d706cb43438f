//! `lmkit`: one subcommand per stage of a language model's life.

mod ngram;
mod progress;

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
    /// Statistical n-gram language models (modified Kneser-Ney, ARPA/KenLM-compatible)
    #[command(subcommand)]
    Ngram(ngram::NgramCommand),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Ngram(cmd) => ngram::run(cmd),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
