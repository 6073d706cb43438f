//! `lmkit quantize`: a Llama-family checkpoint as a GGUF file llama.cpp runs.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
#[command(
    after_help = "Types: f32, f16, q4_0, q4_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k (k-quants need rows of a multiple of 256 \
values; tensors whose rows are not are written as q8_0).\n\n\
Examples:\n  lmkit quantize runs/llama/ llama-q8_0.gguf --type q8_0\n  \
lmkit quantize SmolLM2-135M-Instruct/ smollm2-q4_1.gguf --type q4_1\n  \
lmkit eval ppl --model llama-q8_0.gguf --input held-out.txt   # the cost of the quantization"
)]
pub struct QuantizeArgs {
    /// Model directory (config.json, safetensors, tokenizer.json; model_type llama)
    model: PathBuf,
    /// Output GGUF file
    output: PathBuf,
    /// Weight type
    #[arg(long = "type", default_value = "q8_0")]
    ty: String,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let dir = lmkit_models::resolve_checkpoint(&a.model);
    let tk = lmkit_tokenize::load(&dir)?;
    let template = lmkit_tokenize::chat::load_template(&dir)?;
    let meta = lmkit_tokenize::gguf::metadata(&tk, template.as_ref())
        .with_context(|| format!("{}: the tokenizer", dir.display()))?;
    let t0 = std::time::Instant::now();
    let r = lmkit_models::gguf::write_llama(&dir, &a.output, &a.ty, meta)?;
    eprintln!(
        "wrote {} ({} tensors, {:.1} MB, {}) in {:.1} s",
        a.output.display(),
        r.tensors,
        r.bytes as f64 / 1e6,
        a.ty,
        t0.elapsed().as_secs_f64()
    );
    if !r.fallbacks.is_empty() {
        let shown: Vec<&str> = r.fallbacks.iter().take(4).map(|s| s.as_str()).collect();
        eprintln!(
            "{} of {} tensors have rows that are not whole {} blocks and were written as q8_0 (or f16): {}{}",
            r.fallbacks.len(),
            r.tensors,
            a.ty,
            shown.join(", "),
            if r.fallbacks.len() > shown.len() { ", ..." } else { "" }
        );
    }
    Ok(())
}
