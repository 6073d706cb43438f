//! Paired text (JSONL `{"source", "target"}`) for encoder-decoder training: tokenized once,
//! batched with padding, teacher forcing (the decoder reads `start + target` and predicts
//! `target + end`).

use crate::error::{Result, TrainError};
use candle_core::{Device, Tensor};
use lmkit_models::bart::Bart;
use std::path::Path;

pub struct Pair {
    pub source: Vec<u32>,
    pub target: Vec<u32>,
}

fn read(path: &Path, tk: &lmkit_tokenize::Tokenizer, max: usize) -> Result<Vec<Pair>> {
    let text = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let text = String::from_utf8(text)
        .map_err(|e| TrainError::Data(format!("{}: not valid UTF-8 ({e})", path.display())))?;
    let (mut src, mut tgt) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: &str| TrainError::Data(format!("{}:{}: {msg}", path.display(), i + 1));
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(&format!("not valid JSON: {e}")))?;
        let field = |name: &str| {
            v.get(name)
                .and_then(|s| s.as_str())
                .map(String::from)
                .ok_or_else(|| bad(&format!("`{name}` (a string) is missing")))
        };
        src.push(field("source")?);
        tgt.push(field("target")?);
    }
    if src.is_empty() {
        return Err(TrainError::Data(format!(
            "{}: no {{\"source\", \"target\"}} pairs",
            path.display()
        )));
    }
    let s = lmkit_tokenize::encode_batch(tk, &src)?;
    let t = lmkit_tokenize::encode_batch(tk, &tgt)?;
    Ok(s.into_iter()
        .zip(t)
        .map(|(mut source, mut target)| {
            source.truncate(max);
            // Room for the start token (decoder input) and the end token (decoder target).
            target.truncate(max - 1);
            Pair { source, target }
        })
        .collect())
}

/// Training and validation pairs: `val` if given, else the last `val_fraction` of `train`.
pub fn load_pairs(
    train: &Path,
    val: Option<&Path>,
    val_fraction: f64,
    tk: &lmkit_tokenize::Tokenizer,
    max: usize,
) -> Result<(Vec<Pair>, Vec<Pair>)> {
    let mut pairs = read(train, tk, max)?;
    let held = match val {
        Some(v) => read(v, tk, max)?,
        None => {
            let n = (pairs.len() as f64 * val_fraction) as usize;
            pairs.split_off(pairs.len() - n.min(pairs.len().saturating_sub(1)))
        }
    };
    Ok((pairs, held))
}

/// A padded batch: source ids and mask, decoder inputs, targets and their mask.
pub struct PairBatch {
    src: Tensor,
    src_mask: Tensor,
    dec_in: Tensor,
    labels: Vec<u32>,
    label_mask: Vec<bool>,
    /// Real (unpadded) source and target tokens, for throughput.
    pub tokens: usize,
}

/// `batch` pairs drawn by `pick(i)` (an index into `pairs`).
pub fn batch(
    pairs: &[Pair],
    batch: usize,
    pick: &mut dyn FnMut() -> usize,
    start: u32,
    end: u32,
    pad: u32,
    dev: &Device,
) -> Result<PairBatch> {
    let chosen: Vec<&Pair> = (0..batch).map(|_| &pairs[pick() % pairs.len()]).collect();
    let tokens = chosen
        .iter()
        .map(|p| p.source.len() + p.target.len() + 1)
        .sum();
    let s = chosen
        .iter()
        .map(|p| p.source.len().max(1))
        .max()
        .unwrap_or(1);
    let t = chosen.iter().map(|p| p.target.len() + 1).max().unwrap_or(1);
    let (mut src, mut src_mask, mut dec_in, mut labels, mut label_mask) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for p in chosen {
        let n = p.source.len().max(1);
        src.extend(
            p.source
                .iter()
                .copied()
                .chain(std::iter::repeat(pad))
                .take(s),
        );
        src_mask.extend((0..s).map(|i| u32::from(i < n)));
        let inp: Vec<u32> = std::iter::once(start)
            .chain(p.target.iter().copied())
            .collect();
        let out: Vec<u32> = p
            .target
            .iter()
            .copied()
            .chain(std::iter::once(end))
            .collect();
        dec_in.extend(inp.iter().copied().chain(std::iter::repeat(pad)).take(t));
        labels.extend(out.iter().copied().chain(std::iter::repeat(pad)).take(t));
        label_mask.extend((0..t).map(|i| i < out.len()));
    }
    Ok(PairBatch {
        src: Tensor::from_vec(src, (batch, s), dev)?,
        src_mask: Tensor::from_vec(src_mask, (batch, s), dev)?,
        dec_in: Tensor::from_vec(dec_in, (batch, t), dev)?,
        labels,
        label_mask,
        tokens,
    })
}

/// Mean cross-entropy over the real (unpadded) target tokens.
pub fn loss(m: &Bart, b: &PairBatch) -> Result<Tensor> {
    let memory = m.encode(&b.src, Some(&b.src_mask))?;
    let logits = m.decode(&b.dec_in, &memory, Some(&b.src_mask))?;
    let (n, t, v) = logits.dims3()?;
    let rows: Vec<u32> = (0..n * t)
        .filter(|&i| b.label_mask[i])
        .map(|i| i as u32)
        .collect();
    let want: Vec<u32> = rows.iter().map(|&i| b.labels[i as usize]).collect();
    let dev = logits.device();
    let logits = logits
        .reshape((n * t, v))?
        .index_select(&Tensor::new(rows.as_slice(), dev)?, 0)?;
    Ok(candle_nn::loss::cross_entropy(
        &logits,
        &Tensor::new(want.as_slice(), dev)?,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_load_split_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("c.txt");
        std::fs::write(&corpus, "the cat sat on the mat\n".repeat(20)).unwrap();
        let opts = lmkit_tokenize::TrainOptions {
            vocab_size: 280,
            ..Default::default()
        };
        let tk = lmkit_tokenize::train(std::slice::from_ref(&corpus), &opts).unwrap();
        let p = dir.path().join("p.jsonl");
        let line = "{\"source\": \"the cat\", \"target\": \"sat on the mat\"}\n";
        std::fs::write(&p, line.repeat(10)).unwrap();
        let (train, val) = load_pairs(&p, None, 0.2, &tk, 3).unwrap();
        assert_eq!((train.len(), val.len()), (8, 2));
        assert!(
            train[0].source.len() <= 3 && train[0].target.len() <= 2,
            "cut to the positions"
        );
        let b = batch(&train, 4, &mut || 0, 2, 2, 1, &Device::Cpu).unwrap();
        assert_eq!(b.labels.len(), b.label_mask.len());
        std::fs::write(&p, format!("{line}{{\"source\": \"x\"}}\n")).unwrap();
        let e = load_pairs(&p, None, 0.0, &tk, 8).err().unwrap().to_string();
        assert!(e.contains("p.jsonl:2") && e.contains("`target`"), "{e}");
        std::fs::write(&p, "{oops\n").unwrap();
        let e = load_pairs(&p, None, 0.0, &tk, 8).err().unwrap().to_string();
        assert!(e.contains("p.jsonl:1: not valid JSON"), "{e}");
        std::fs::write(&p, "\n\n").unwrap();
        assert!(load_pairs(&p, None, 0.0, &tk, 8).is_err());
    }
}
