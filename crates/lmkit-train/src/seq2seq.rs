//! Paired text (JSONL `{"source", "target"}`) for encoder-decoder training: tokenized once,
//! batched with padding, teacher forcing (the decoder reads `start + target` and predicts
//! `target + end`).

use crate::error::{Result, TrainError};
use candle_core::Tensor;
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

/// A padded batch: `b` sources of `s` positions (each sequence's real tokens first), `b`
/// decoder inputs and targets of `t` positions (real ones first).
pub struct PairBatch {
    pub b: usize,
    pub s: usize,
    pub t: usize,
    /// Source ids [b, s] and each source's real tokens.
    pub src: Vec<u32>,
    pub src_lens: Vec<usize>,
    /// Decoder inputs and targets [b, t], and each row's real positions.
    pub dec_in: Vec<u32>,
    pub labels: Vec<u32>,
    pub dec_lens: Vec<usize>,
    /// Real (unpadded) source and target tokens, for throughput.
    pub tokens: usize,
}

impl PairBatch {
    /// The flattened decoder positions with a target, in order.
    pub fn scored_rows(&self) -> impl Iterator<Item = usize> + '_ {
        self.dec_lens
            .iter()
            .enumerate()
            .flat_map(move |(i, &n)| i * self.t..i * self.t + n)
    }
}

/// `batch` pairs drawn by `pick(i)` (an index into `pairs`).
pub fn batch(
    pairs: &[Pair],
    batch: usize,
    pick: &mut dyn FnMut() -> usize,
    start: u32,
    end: u32,
    pad: u32,
) -> PairBatch {
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
    let mut b = PairBatch {
        b: batch,
        s,
        t,
        src: Vec::with_capacity(batch * s),
        src_lens: Vec::with_capacity(batch),
        dec_in: Vec::with_capacity(batch * t),
        labels: Vec::with_capacity(batch * t),
        dec_lens: Vec::with_capacity(batch),
        tokens,
    };
    for p in chosen {
        let n = p.source.len().max(1);
        b.src.extend(
            p.source
                .iter()
                .copied()
                .chain(std::iter::repeat(pad))
                .take(s),
        );
        b.src_lens.push(n);
        let inp = std::iter::once(start).chain(p.target.iter().copied());
        let out = p.target.iter().copied().chain(std::iter::once(end));
        b.dec_in.extend(inp.chain(std::iter::repeat(pad)).take(t));
        b.labels.extend(out.chain(std::iter::repeat(pad)).take(t));
        b.dec_lens.push(p.target.len() + 1);
    }
    b
}

/// Mean cross-entropy over the real (unpadded) target tokens, through the graph.
pub fn loss(m: &Bart, b: &PairBatch) -> Result<Tensor> {
    let dev = m.word_device();
    let src = Tensor::from_slice(&b.src, (b.b, b.s), dev)?;
    let mask: Vec<u32> = (0..b.b * b.s)
        .map(|i| u32::from(i % b.s < b.src_lens[i / b.s]))
        .collect();
    let src_mask = Tensor::from_vec(mask, (b.b, b.s), dev)?;
    let dec_in = Tensor::from_slice(&b.dec_in, (b.b, b.t), dev)?;
    let memory = m.encode(&src, Some(&src_mask))?;
    let logits = m.decode(&dec_in, &memory, Some(&src_mask))?;
    let (n, t, v) = logits.dims3()?;
    let rows: Vec<u32> = b.scored_rows().map(|i| i as u32).collect();
    let want: Vec<u32> = rows.iter().map(|&i| b.labels[i as usize]).collect();
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
        let b = batch(&train, 4, &mut || 0, 2, 2, 1);
        assert_eq!(b.labels.len(), b.dec_in.len());
        let want: usize = b.dec_lens.iter().sum();
        assert_eq!(b.scored_rows().count(), want);
        assert_eq!(
            want,
            4 * (train[0].target.len() + 1),
            "the target's tokens and the end"
        );
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
