//! `lmkit fill-mask`, `lmkit embed` and `lmkit classify`: using a BERT-like encoder (BERT,
//! RoBERTa, XLM-RoBERTa).

use anyhow::{bail, Context, Result};
use clap::Args;
use lmkit_models::bert::Bert;
use lmkit_models::Tensor;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
#[command(
    after_help = "Example:\n  lmkit fill-mask --model runs/bert \"In the beginning God created the <|mask|> and the earth.\"\n\n\
    Prints the most likely tokens for each mask position with their probabilities."
)]
pub struct FillMaskArgs {
    #[arg(long)]
    model: PathBuf,
    /// Text with one or more mask tokens (the tokenizer's mask token, e.g. <|mask|> or [MASK])
    text: String,
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
#[command(
    after_help = "Example:\n  lmkit embed --model runs/bert --input sentences.txt --output vectors.jsonl\n\n\
    One JSON line per input line: {\"text\", \"embedding\"}, pooled (and normalised) as the model's\n\
    sentence-transformers configuration says (mean of the last hidden states for a plain encoder)."
)]
pub struct EmbedArgs {
    #[arg(long)]
    model: PathBuf,
    /// One text per line (default: standard input)
    #[arg(long)]
    input: Option<PathBuf>,
    /// Output JSONL (default: standard output)
    #[arg(long)]
    output: Option<PathBuf>,
    /// Texts per forward pass (batched by length)
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
#[command(
    after_help = "Examples:\n  lmkit classify --model sentiment-model/ \"I loved it\" \"Terrible service\"\n  \
    lmkit classify --model ner-model/ --input sentences.txt\n\n\
    The model is a fine-tuned encoder saved by transformers with its classification head.\n\
    One JSON line per text. A sequence classifier (*ForSequenceClassification) prints\n\
    {\"text\", \"label\", \"score\", \"scores\": {label: probability}}; a token classifier\n\
    (*ForTokenClassification) prints {\"text\", \"tokens\": [{\"token\", \"label\", \"score\"}]}.\n\
    Probabilities are a softmax over the labels, or one sigmoid per label when config.json says\n\
    problem_type = multi_label_classification."
)]
pub struct ClassifyArgs {
    #[arg(long)]
    model: PathBuf,
    /// Texts to classify (or --input)
    texts: Vec<String>,
    /// One text per line (default, with no texts given: standard input)
    #[arg(long)]
    input: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Probabilities from logits [n, labels]: a softmax per row, or independent sigmoids.
fn label_probs(logits: &Tensor, multi_label: bool) -> Result<Vec<Vec<f32>>> {
    let p = if multi_label {
        candle_nn::ops::sigmoid(logits)?
    } else {
        candle_nn::ops::softmax_last_dim(logits)?
    };
    Ok(p.to_vec2::<f32>()?)
}

/// The best label of a probability row.
fn best(labels: &[String], p: &[f32]) -> (String, f32) {
    let (i, v) = p
        .iter()
        .copied()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((0, 0.0));
    (labels.get(i).cloned().unwrap_or_default(), v)
}

pub fn classify(a: ClassifyArgs) -> Result<()> {
    let dev = lmkit_models::parse_device(&a.device)?;
    let dir = lmkit_models::resolve_checkpoint(&a.model);
    let m = Bert::load(&dir, &dev)?;
    let Some(task) = m.task() else {
        bail!(
            "{}: no classification head (config.json's architectures names no *ForSequenceClassification or *ForTokenClassification); `lmkit embed` gives this model's sentence vectors",
            dir.display()
        );
    };
    let tk = lmkit_tokenize::load(&dir)?;
    let texts = if a.texts.is_empty() {
        crate::lines::read_lines(a.input.as_deref())?
            .into_iter()
            .filter(|l| !l.trim().is_empty())
            .collect()
    } else {
        if a.input.is_some() {
            bail!("give texts or --input, not both");
        }
        a.texts
    };
    let labels = m.labels();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for text in &texts {
        let ids = lmkit_tokenize::encode_with_specials(
            &tk,
            std::slice::from_ref(text),
            m.cfg.max_tokens(),
        )?
        .remove(0);
        let x = Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?;
        let logits = m.task_logits(&m.hidden(&x, None)?)?;
        let line = match task {
            lmkit_models::bert::Task::Sequence => {
                let p = label_probs(&logits, m.multi_label())?.remove(0);
                let (label, score) = best(labels, &p);
                let scores: serde_json::Map<String, serde_json::Value> = labels
                    .iter()
                    .zip(&p)
                    .map(|(l, v)| (l.clone(), serde_json::json!(v)))
                    .collect();
                serde_json::json!({"text": text, "label": label, "score": score, "scores": scores})
            }
            lmkit_models::bert::Task::Token => {
                let rows = label_probs(&logits.squeeze(0)?, m.multi_label())?;
                let tokens: Vec<serde_json::Value> = ids
                    .iter()
                    .zip(&rows)
                    .map(|(&id, p)| {
                        let (label, score) = best(labels, p);
                        let token = tk.id_to_token(id).unwrap_or_default();
                        serde_json::json!({"token": token, "label": label, "score": score})
                    })
                    .collect();
                serde_json::json!({"text": text, "tokens": tokens})
            }
        };
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}

fn mask_token(tk: &lmkit_tokenize::Tokenizer) -> Option<(String, u32)> {
    lmkit_core::tokens::MASK_TOKENS
        .iter()
        .find_map(|t| tk.token_to_id(t).map(|id| (t.to_string(), id)))
}

pub fn fill_mask(a: FillMaskArgs) -> Result<()> {
    let dev = lmkit_models::parse_device(&a.device)?;
    let dir = lmkit_models::resolve_checkpoint(&a.model);
    let m = Bert::load(&dir, &dev)?;
    let tk = lmkit_tokenize::load(&dir)?;
    let (mask, mask_id) = mask_token(&tk).context("the tokenizer has no mask token")?;
    if !a.text.contains(&mask) {
        bail!("the text has no {mask} to fill");
    }
    let ids = lmkit_tokenize::encode_batch(&tk, std::slice::from_ref(&a.text))?.remove(0);
    let x = Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?;
    let logits = m.mlm_logits(&m.hidden(&x, None)?)?.squeeze(0)?;
    let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
    for (pos, _) in ids.iter().enumerate().filter(|(_, &id)| id == mask_id) {
        let mut best: Vec<(usize, f32)> = probs[pos].iter().copied().enumerate().collect();
        best.sort_by(|a, b| b.1.total_cmp(&a.1));
        let shown: Vec<String> = best
            .iter()
            .take(a.top_k)
            .map(|(id, p)| {
                let t = lmkit_tokenize::decode(&tk, &[*id as u32]).unwrap_or_default();
                format!("{t:?} {p:.4}")
            })
            .collect();
        println!("position {pos}: {}", shown.join(", "));
    }
    Ok(())
}

pub fn embed(a: EmbedArgs) -> Result<()> {
    let dev = lmkit_models::parse_device(&a.device)?;
    let dir = lmkit_models::resolve_checkpoint(&a.model);
    let m = Bert::load(&dir, &dev)?;
    let tk = lmkit_tokenize::load(&dir)?;
    let lines: Vec<String> = crate::lines::read_lines(a.input.as_deref())?
        .into_iter()
        .filter(|l| !l.trim().is_empty())
        .collect();
    // `--output` is written whole once every text is embedded (an earlier file stays until then).
    let mut file = match &a.output {
        Some(p) => Some(lmkit_core::AtomicFile::create_for(p)?),
        None => None,
    };
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    let out: &mut dyn Write = match file.as_mut() {
        Some(f) => f,
        None => &mut stdout,
    };
    let started = std::time::Instant::now();
    let vectors = lmkit_infer::embed_batched(&m, &tk, &lines, a.batch_size, &dev, &|_| {})?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "embedded {} texts in {secs:.2} s ({:.1} texts/s)",
        lines.len(),
        lines.len() as f64 / secs.max(1e-9)
    );
    for (t, e) in lines.iter().zip(vectors) {
        writeln!(out, "{}", serde_json::json!({"text": t, "embedding": e}))?;
    }
    out.flush()?;
    if let (Some(f), Some(p)) = (file, &a.output) {
        f.commit(p)?;
    }
    Ok(())
}
