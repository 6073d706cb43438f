//! `lmkit`: one subcommand per stage of a language model's life.
#![forbid(unsafe_code)]

mod adapter;
mod chat;
mod compare;
mod constraint;
mod data;
mod dpo;
mod encoder;
mod eval;
mod finetune;
mod generate;
mod index;
mod lines;
mod model;
mod moderation;
mod ngram;
mod placement;
mod progress;
mod prompt;
mod quantize;
mod rag;
mod reward;
mod rl;
mod serve;
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
    /// LoRA adapters: merge one into its base model
    #[command(subcommand)]
    Adapter(adapter::AdapterCommand),
    /// Chat with a checkpoint through its chat template (system prompt, history, streaming)
    Chat(chat::ChatArgs),
    /// Train an n-gram model, an RNN, an LSTM and a GPT on the same data and compare them
    Compare(compare::CompareArgs),
    /// Corpus preparation: normalize, filter, deduplicate, split
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Evaluate any model: perplexity and bits per byte, sentence ranking, log-likelihood tasks
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Fine-tune a model on instruction, chat or text data: all parameters, or LoRA adapters
    /// (PEFT's format) on a Hugging Face or GGUF base
    Finetune(finetune::FinetuneArgs),
    /// Preference tuning on prompt/chosen/rejected pairs: DPO (sigmoid, robust, hinge, IPO),
    /// SimPO and ORPO; KTO on thumbs-up/down rows; all parameters or LoRA adapters
    Dpo(dpo::DpoArgs),
    /// Fill the mask tokens of a text with a BERT or RoBERTa checkpoint
    FillMask(encoder::FillMaskArgs),
    /// Sentence embeddings (pooled as the model's sentence-transformers config says)
    Embed(encoder::EmbedArgs),
    /// Label texts (or their tokens) with a fine-tuned encoder's classification head
    Classify(encoder::ClassifyArgs),
    /// Byte-level BPE tokenizers: train, encode (token shards), decode, stats
    #[command(subcommand)]
    Tokenizer(tokenizer::TokenizerCommand),
    /// Generate text with a checkpoint (KV cache, sampling, stop strings, streaming)
    Generate(generate::GenerateArgs),
    /// Vector indexes of documents: build (chunk + embed + HNSW + BM25), add, delete, search
    #[command(subcommand)]
    Index(index::IndexCommand),
    /// Retrieval-augmented generation: answer from an index's passages, citing them
    #[command(subcommand)]
    Rag(rag::RagCommand),
    /// Neural checkpoints (Hugging Face layout): info, logits
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Prompts: render a conversation through a model's chat template
    #[command(subcommand)]
    Prompt(prompt::PromptCommand),
    /// Moderation: train the text classifier, check texts against rules and classifier
    #[command(subcommand)]
    Moderation(moderation::ModerationCommand),
    /// Write a Llama-family checkpoint as a GGUF file (q8_0, q4_k, ...) that llama.cpp runs
    Quantize(quantize::QuantizeArgs),
    /// Reward models: train one on preference pairs, score texts with one
    #[command(subcommand)]
    Reward(reward::RewardCommand),
    /// Online reinforcement learning (GRPO or PPO): the policy samples, rules or a reward model
    /// score, group-relative advantages (GRPO) or a value model's (PPO) update it
    Rl(rl::RlArgs),
    /// Serve a checkpoint over an OpenAI-compatible HTTP API, with web chat, moderation and review
    Serve(serve::ServeArgs),
    /// Train a neural language model from a TOML run config (checkpoints, resume, metrics, plot)
    Train(train::TrainArgs),
    /// Statistical n-gram language models (modified Kneser-Ney, ARPA/KenLM-compatible)
    #[command(subcommand)]
    Ngram(ngram::NgramCommand),
}

fn main() {
    // `println!` panics when stdout is a pipe whose reader left (`lmkit ngram info m | head -1`):
    // end quietly there, as a write error does below.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let p = info.payload();
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info)
    }));
    let cli = Cli::parse();
    // n-gram work builds and frees a few large tables, not tensors at every op: the allocator's
    // own defaults hand freed tables back to the kernel as they go.
    if !matches!(cli.command, Command::Ngram(_)) {
        lmkit_kernels::system::tune_allocator();
    }
    lmkit_kernels::blas::choose_openblas_core();
    let result = match cli.command {
        Command::Adapter(cmd) => adapter::run(cmd),
        Command::Chat(a) => chat::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Data(cmd) => data::run(cmd),
        Command::Dpo(a) => dpo::run(a),
        Command::Embed(a) => encoder::embed(a),
        Command::Classify(a) => encoder::classify(a),
        Command::Finetune(a) => finetune::run(a),
        Command::FillMask(a) => encoder::fill_mask(a),
        Command::Eval(cmd) => eval::run(cmd),
        Command::Generate(a) => generate::run(a),
        Command::Index(cmd) => index::run(cmd),
        Command::Rag(cmd) => rag::run(cmd),
        Command::Model(cmd) => model::run(cmd),
        Command::Ngram(cmd) => ngram::run(cmd),
        Command::Prompt(cmd) => prompt::run(cmd),
        Command::Quantize(a) => quantize::run(a),
        Command::Tokenizer(cmd) => tokenizer::run(cmd),
        Command::Moderation(cmd) => moderation::run(cmd),
        Command::Reward(cmd) => reward::run(cmd),
        Command::Rl(a) => rl::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Train(a) => train::run(a),
    };
    if let Err(e) = result {
        // A reader that went away (`lmkit … | head`) is not an error worth reporting.
        let broken_pipe = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if broken_pipe {
            std::process::exit(141);
        }
        let message = format!("{e:#}");
        eprintln!("error: {message}");
        if let Some(hint) = gpu_memory_hint(&message) {
            eprintln!("hint: {hint}");
        }
        std::process::exit(1);
    }
}

/// What to try when a GPU ran out of memory inside candle, cudarc or cuBLAS, whose errors name
/// only the driver's code (lmkit's own allocations say what needs less themselves).
fn gpu_memory_hint(message: &str) -> Option<&'static str> {
    let oom = ["CUDA_ERROR_OUT_OF_MEMORY", "CUBLAS_STATUS_ALLOC_FAILED"]
        .iter()
        .any(|code| message.contains(code));
    oom.then_some(
        "the GPU ran out of memory: a half type (--dtype bf16, or train.dtype = \"bf16\"), \
         fewer tokens at once (serve --max-active or --prompt-tokens, train.batch_size with \
         train.grad_accum for the same batch), or another GPU (--device cuda:N) needs less; \
         nvidia-smi shows what else holds its memory",
    )
}

#[cfg(test)]
mod tests {
    use super::gpu_memory_hint;

    #[test]
    fn a_gpu_out_of_memory_error_gets_a_hint() {
        let candle = "loading the model: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")";
        assert!(gpu_memory_hint(candle).unwrap().contains("--dtype bf16"));
        assert!(gpu_memory_hint("cublas: CUBLAS_STATUS_ALLOC_FAILED").is_some());
        // lmkit's own message (no driver code) already says what needs less; other errors get
        // none.
        let own = "cuda: out of memory on GPU 0 allocating 512.0 MiB; a smaller train.batch_size";
        assert_eq!(gpu_memory_hint(own), None);
        assert_eq!(
            gpu_memory_hint("data/x.txt: No such file or directory"),
            None
        );
    }
}
