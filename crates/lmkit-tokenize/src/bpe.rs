//! Byte-level BPE (the GPT-2 scheme: bytes mapped to printable characters, then merges) trained and
//! saved with Hugging Face `tokenizers`, so the result is a `tokenizer.json` that Python
//! `tokenizers` and `transformers` load unchanged. No normalizer: decode(encode(x)) == x for any text.

use crate::error::{Result, TokenizeError};
use std::path::{Path, PathBuf};
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    Tokenizer, TokenizerBuilder,
};

pub use lmkit_core::tokens::{DEFAULT_SPECIAL_TOKENS, ENDOFTEXT};
use lmkit_core::tokens::{MASK, PAD};

/// The chat template written to `tokenizer_config.json` (Jinja, as `transformers` reads it).
pub const DEFAULT_CHAT_TEMPLATE: &str = "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub vocab_size: usize,
    pub min_frequency: u64,
    pub special_tokens: Vec<String>,
    /// How documents are read from the inputs (txt unit, JSONL text field).
    pub ingest: lmkit_data::IngestOptions,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            vocab_size: 8192,
            min_frequency: 2,
            special_tokens: DEFAULT_SPECIAL_TOKENS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            ingest: lmkit_data::IngestOptions::default(),
        }
    }
}

fn tk_err(e: impl std::fmt::Display) -> TokenizeError {
    TokenizeError::Tokenizer(e.to_string())
}

/// The largest vocabulary `train` builds (2²¹).
pub const MAX_VOCAB: usize = 1 << 21;

/// Trains a byte-level BPE tokenizer on the documents of `inputs`.
pub fn train(inputs: &[PathBuf], opts: &TrainOptions) -> Result<Tokenizer> {
    Ok(train_with_report(inputs, opts)?.0)
}

/// What training read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrainReport {
    /// Documents trained on.
    pub documents: u64,
    /// Documents longer than [`MAX_TRAIN_DOC`], trained on their first part only.
    pub cut_documents: u64,
}

/// [`train`], also saying how many documents were trained on and how many were cut.
pub fn train_with_report(
    inputs: &[PathBuf],
    opts: &TrainOptions,
) -> Result<(Tokenizer, TrainReport)> {
    let min_vocab = 256 + opts.special_tokens.len();
    if opts.vocab_size > MAX_VOCAB {
        return Err(TokenizeError::BadOption {
            name: "vocab_size",
            value: opts.vocab_size.to_string(),
            msg: format!("must be at most {MAX_VOCAB} (large open models use 32k-256k)"),
        });
    }
    if opts.vocab_size < min_vocab {
        return Err(TokenizeError::BadOption {
            name: "vocab_size",
            value: opts.vocab_size.to_string(),
            msg: format!(
                "must be at least {min_vocab} (256 bytes + {} special tokens)",
                opts.special_tokens.len()
            ),
        });
    }
    let specials: Vec<AddedToken> = opts
        .special_tokens
        .iter()
        .map(|s| AddedToken::from(s.clone(), true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(opts.vocab_size)
        .min_frequency(opts.min_frequency)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build();
    let byte_level = ByteLevel::new(false, true, true);
    let mut tk = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(byte_level)))
    .with_post_processor(Some(PostProcessorWrapper::ByteLevel(byte_level)))
    .with_decoder(Some(DecoderWrapper::ByteLevel(byte_level)))
    .build()
    .map_err(tk_err)?;
    let mut docs = crate::stream::DocStream::open(inputs.to_vec(), opts.ingest.clone());
    let mut non_blank = 0u64;
    let mut report = TrainReport::default();
    let trained = tk.train(
        &mut trainer,
        docs.by_ref()
            .inspect(|d| {
                non_blank += u64::from(!d.trim().is_empty());
                report.cut_documents += u64::from(d.len() > MAX_TRAIN_DOC);
            })
            .flat_map(training_pieces),
    );
    report.documents = docs.documents;
    docs.finish()?; // a read error part-way is an error, not a smaller training set
    trained.map_err(tk_err)?;
    if non_blank == 0 {
        let what = inputs
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(TokenizeError::Empty { what });
    }
    let json = serde_json::to_string(&tk).map_err(tk_err)?;
    Ok((json.parse::<Tokenizer>().map_err(tk_err)?, report))
}

/// Loads `tokenizer.json` (or a directory containing it).
pub fn load(path: &Path) -> Result<Tokenizer> {
    if crate::gguf::is_gguf(path) {
        let meta = crate::gguf::GgufMeta::read(path)?;
        return crate::gguf::tokenizer(path, &meta);
    }
    let file = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|e| TokenizeError::io(&file, e))?;
    // The JSON's syntax first: tokenizers' decoder field panics on a file that ends early
    // (a truncated download or copy) where this names the line and column.
    serde_json::from_str::<serde::de::IgnoredAny>(&text).map_err(|e| TokenizeError::Load {
        path: file.clone(),
        msg: format!("not valid JSON ({e}); is the file whole?"),
    })?;
    let mut tk = text.parse::<Tokenizer>().map_err(|e| TokenizeError::Load {
        path: file.clone(),
        msg: e.to_string(),
    })?;
    // Lengths are lmkit's to decide (a tokenizer.json may pad or cut every text to 128 tokens).
    tk.with_padding(None);
    tk.with_truncation(None).map_err(tk_err)?;
    Ok(tk)
}

/// Encodes texts for an encoder as transformers' tokenizer call does: special tokens added (the
/// `[CLS] … [SEP]` of BERT-style tokenizers) and each text cut to `max_len` tokens, specials
/// included.
pub fn encode_with_specials(
    tk: &Tokenizer,
    texts: &[String],
    max_len: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut tk = tk.clone();
    tk.with_truncation(Some(tokenizers::TruncationParams {
        max_length: max_len,
        ..Default::default()
    }))
    .map_err(tk_err)?;
    // Only the start of a text is read: a huge line is cut before it is encoded whole.
    let heads: Vec<&str> = texts
        .iter()
        .map(|t| pieces(t, MAX_PIECE_BYTES)[0])
        .collect();
    Ok(tk
        .encode_batch(heads, true)
        .map_err(tk_err)?
        .into_iter()
        .map(|e| e.get_ids().to_vec())
        .collect())
}

/// Writes `tokenizer.json` and `tokenizer_config.json` (special tokens, chat template) into `dir`,
/// each atomically.
pub fn save(tk: &Tokenizer, dir: &Path, special_tokens: &[String]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TokenizeError::io(dir, e))?;
    let json = tk.to_string(true).map_err(tk_err)?;
    lmkit_core::write_atomic_bytes(&dir.join("tokenizer.json"), json.as_bytes())?;
    let has = |t: &str| special_tokens.iter().any(|s| s == t).then(|| t.to_string());
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": has(ENDOFTEXT),
        "eos_token": has(ENDOFTEXT),
        "unk_token": serde_json::Value::Null,
        "pad_token": has(PAD),
        "mask_token": has(MASK),
        "add_prefix_space": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 1_000_000_000_000_000_000u64,
        "chat_template": DEFAULT_CHAT_TEMPLATE,
    });
    let text = serde_json::to_string_pretty(&config).map_err(tk_err)?;
    Ok(lmkit_core::write_atomic_bytes(
        &dir.join("tokenizer_config.json"),
        text.as_bytes(),
    )?)
}

/// The longest piece of text encoded or trained on at once: a longer document is cut into
/// pieces, so that one huge line (or one huge "word") cannot take memory without bound (a
/// 200 MB line took over 13 GB).
pub const MAX_PIECE_BYTES: usize = 1 << 16;

/// Text encoded in one batch when a document is cut into pieces: an encoding keeps ~100 bytes
/// per token, so a batch of 1 MiB of text holds at most ~100 MB of encodings at once.
pub const BATCH_BYTES: usize = 1 << 20;

/// Documents handed to [`encode_batch`] at once by the streaming commands: up to 4096 of them or
/// this much text.
pub const CHUNK_BYTES: usize = 16 << 20;

/// `text` cut into pieces of at most `max` bytes (`max` ≥ 8). A cut goes just before a space
/// that follows a non-space character — where byte-level and metaspace pre-tokenizers split
/// anyway, so the pieces encode to the same tokens as the whole — when the last quarter of the
/// piece has one; otherwise at a character boundary.
pub fn pieces(text: &str, max: usize) -> Vec<&str> {
    let max = max.max(8);
    let mut out = Vec::new();
    let mut rest = text;
    while rest.len() > max {
        let mut end = max;
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let window = &rest[..end];
        let cut = window
            .char_indices()
            .rev()
            .take_while(|&(i, _)| i >= end - end / 4)
            .find(|&(i, c)| c == ' ' && i > 0 && !window[..i].ends_with(char::is_whitespace))
            .map_or(end, |(i, _)| i);
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out.push(rest);
    out
}

/// The longest run of non-space characters trained on: a longer one is cut to its first
/// `MAX_TRAIN_RUN` bytes. The trainer keeps every distinct word with ~24 bytes per character (a
/// 3 MB word took 563 MB), and a word this long teaches nothing the start of it does not (as
/// SentencePiece's trainer bounds its input with `max_sentence_length`).
pub const MAX_TRAIN_RUN: usize = 1 << 10;

/// The most of one document trained on: the trainer's memory grows with the distinct words it
/// has seen, and one huge line of distinct words (200 MB of them) would take it past any memory;
/// a longer document is trained on its first `MAX_TRAIN_DOC` bytes (cut at a space where one is
/// near), as SentencePiece's trainer skips sentences over its `max_sentence_length`.
pub const MAX_TRAIN_DOC: usize = 8 << 20;

/// A document as the trainer sees it: its first [`MAX_TRAIN_DOC`] bytes, runs of non-space
/// characters cut to [`MAX_TRAIN_RUN`] bytes, then cut into [`pieces`].
fn training_pieces(mut doc: String) -> Vec<String> {
    if doc.len() > MAX_TRAIN_DOC {
        let head = pieces(&doc, MAX_TRAIN_DOC)[0].len();
        doc.truncate(head);
    }
    let doc = match cap_runs(&doc, MAX_TRAIN_RUN) {
        std::borrow::Cow::Borrowed(_) => doc,
        std::borrow::Cow::Owned(capped) => capped,
    };
    if doc.len() <= MAX_PIECE_BYTES {
        return vec![doc];
    }
    pieces(&doc, MAX_PIECE_BYTES)
        .into_iter()
        .map(String::from)
        .collect()
}

/// `text` with each run of non-whitespace characters longer than `cap` bytes cut to the
/// characters that fit in its first `cap` bytes (borrowed when no run is that long).
pub fn cap_runs(text: &str, cap: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= cap {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out: Option<String> = None;
    let mut copied = 0; // text[..copied] is in `out` (or dropped)
    let mut run_start = None;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            run_start = None;
            continue;
        }
        let start = *run_start.get_or_insert(i);
        let end = i + c.len_utf8();
        if end - start > cap {
            let o = out.get_or_insert_with(String::new);
            o.push_str(&text[copied..i]);
            copied = end;
        }
    }
    match out {
        None => std::borrow::Cow::Borrowed(text),
        Some(mut o) => {
            o.push_str(&text[copied..]);
            std::borrow::Cow::Owned(o)
        }
    }
}

/// Encodes a prompt as the model's tokenizer does by default (Hugging Face's `tokenizer(text)`,
/// llama.cpp's tokenization with its special tokens): the special tokens its post-processor
/// puts around a text — a BOS for Llama 2 or Mistral vocabularies, nothing for GPT-2's — added.
/// A chat prompt rendered from a template already holds them: encode it with [`encode_batch`].
pub fn encode_prompt(tk: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    add_special_tokens(tk, encode_batch(tk, &[text.to_string()])?.remove(0))
}

/// `ids` (of one text, encoded without special tokens) with the special tokens the tokenizer's
/// post-processor puts around a text (see [`encode_prompt`]).
pub fn add_special_tokens(tk: &Tokenizer, ids: Vec<u32>) -> Result<Vec<u32>> {
    if tk.get_post_processor().is_none() {
        return Ok(ids);
    }
    let tokens = ids
        .iter()
        .map(|&id| tokenizers::Token::new(id, String::new(), (0, 0)))
        .collect();
    let e = tk
        .post_process(tokenizers::Encoding::from_tokens(tokens, 0), None, true)
        .map_err(tk_err)?;
    Ok(e.get_ids().to_vec())
}

/// Encodes texts (no special tokens added), in parallel; texts over [`MAX_PIECE_BYTES`] are
/// encoded a piece at a time (see [`pieces`]) and their ids joined.
pub fn encode_batch(tk: &Tokenizer, texts: &[String]) -> Result<Vec<Vec<u32>>> {
    if texts.iter().all(|t| t.len() <= MAX_PIECE_BYTES) {
        let enc = tk
            .encode_batch(texts.iter().map(|t| t.as_str()).collect::<Vec<_>>(), false)
            .map_err(tk_err)?;
        return Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect());
    }
    let mut out = vec![Vec::new(); texts.len()];
    let all: Vec<(usize, &str)> = texts
        .iter()
        .enumerate()
        .flat_map(|(i, t)| pieces(t, MAX_PIECE_BYTES).into_iter().map(move |p| (i, p)))
        .collect();
    encode_pieces::<TokenizeError>(tk, &all, |i, ids| {
        out[i].extend_from_slice(ids);
        Ok(())
    })?;
    Ok(out)
}

/// Encodes `pieces` (text `i`'s pieces, as `(i, piece)`) in batches of up to [`BATCH_BYTES`] of
/// text, handing each piece's ids to `f` in order: only one batch's encodings are held at once.
fn encode_pieces<E: From<TokenizeError>>(
    tk: &Tokenizer,
    pieces: &[(usize, &str)],
    mut f: impl FnMut(usize, &[u32]) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let mut start = 0;
    while start < pieces.len() {
        // A batch holds up to 1 MiB of text (at least one piece).
        let mut end = start + 1;
        let mut bytes = pieces[start].1.len();
        while end < pieces.len() && bytes + pieces[end].1.len() <= BATCH_BYTES {
            bytes += pieces[end].1.len();
            end += 1;
        }
        let group = &pieces[start..end];
        let enc = tk
            .encode_batch(group.iter().map(|&(_, p)| p).collect::<Vec<_>>(), false)
            .map_err(tk_err)?;
        for (&(i, _), e) in group.iter().zip(enc) {
            f(i, e.get_ids())?;
        }
        start = end;
    }
    Ok(())
}

/// Encodes `texts` in order (no special tokens added), handing `f` each text's ids as
/// `(index, ids, last)`: a text of up to [`BATCH_BYTES`] in one call, a longer one a batch of
/// its pieces at a time, so that the ids of a huge document are never held whole (gathered, the
/// ids of a 64 MiB line of one-byte tokens took `tokenizer encode` to a 616 MiB peak; streamed,
/// about 210 MiB). Every text gets at least one call, and its
/// last has `last` true; the ids of a text's calls joined are [`encode_batch`]'s.
pub fn encode_each<E: From<TokenizeError>>(
    tk: &Tokenizer,
    texts: &[String],
    mut f: impl FnMut(usize, &[u32], bool) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let short_ids = if texts.iter().all(|t| t.len() <= BATCH_BYTES) {
        encode_batch(tk, texts)?
    } else {
        let short: Vec<String> = texts
            .iter()
            .filter(|t| t.len() <= BATCH_BYTES)
            .cloned()
            .collect();
        encode_batch(tk, &short)?
    };
    let mut short_ids = short_ids.into_iter();
    for (i, text) in texts.iter().enumerate() {
        if text.len() <= BATCH_BYTES {
            let ids = short_ids.next().unwrap_or_default();
            f(i, &ids, true)?;
        } else {
            let all: Vec<(usize, &str)> = pieces(text, MAX_PIECE_BYTES)
                .into_iter()
                .map(|p| (i, p))
                .collect();
            encode_pieces(tk, &all, |i, ids| f(i, ids, false))?;
            f(i, &[], true)?;
        }
    }
    Ok(())
}

/// The ids the tokenizer's post-processor puts before and after a text's ids (what
/// [`add_special_tokens`] adds), so that they can be written around ids streamed by
/// [`encode_each`]; `None` when the post-processor does more than put the same ids around any
/// text (then add them to the whole text's ids).
pub fn special_affixes(tk: &Tokenizer) -> Result<Option<(Vec<u32>, Vec<u32>)>> {
    if tk.get_post_processor().is_none() {
        return Ok(Some((Vec::new(), Vec::new())));
    }
    // A probe id that is not a special token, put through alone and three times.
    let special = tk.get_added_tokens_decoder();
    let Some(p) = (0..tk.get_vocab_size(true) as u32).find(|i| !special.contains_key(i)) else {
        return Ok(None);
    };
    let one = add_special_tokens(tk, vec![p])?;
    let Some(k) = one.iter().position(|&i| i == p) else {
        return Ok(None);
    };
    let (head, tail) = (one[..k].to_vec(), one[k + 1..].to_vec());
    let three = add_special_tokens(tk, vec![p; 3])?;
    if three != [&head[..], &[p; 3], &tail[..]].concat() {
        return Ok(None);
    }
    Ok(Some((head, tail)))
}

pub fn decode(tk: &Tokenizer, ids: &[u32]) -> Result<String> {
    // (`get_vocab_size(true)` builds the whole vocabulary as a map: too slow for every step of
    // streamed decoding.)
    if let Some(bad) = ids.iter().find(|&&id| tk.id_to_token(id).is_none()) {
        return Err(TokenizeError::BadOption {
            name: "id",
            value: bad.to_string(),
            msg: format!(
                "out of range for a vocabulary of {}",
                tk.get_vocab_size(true)
            ),
        });
    }
    tk.decode(ids, false).map_err(tk_err)
}

/// The bytes token `id` stands for, as OpenAI's `logprobs` give them (`bytes`): exact where one
/// token is part of a character (byte-level BPE's pieces mapped back through its byte alphabet,
/// SentencePiece's `<0xHH>` byte tokens), SentencePiece's word marker `▁` as a space; otherwise
/// the token decoded alone. `None` for an id outside the vocabulary.
pub fn token_bytes(tk: &Tokenizer, id: u32) -> Option<Vec<u8>> {
    let piece = tk.id_to_token(id)?;
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
        if let (2, Ok(b)) = (hex.len(), u8::from_str_radix(hex, 16)) {
            return Some(vec![b]);
        }
    }
    let alone = tk.decode(&[id], false).unwrap_or_default();
    // Byte-level BPE: each character of the piece one byte; checked against the decoder (a
    // piece of plain letters under another scheme maps to the same bytes).
    let mapped: Option<Vec<u8>> = piece.chars().map(byte_of_char).collect();
    if let Some(bytes) = mapped {
        if String::from_utf8_lossy(&bytes) == alone {
            return Some(bytes);
        }
    }
    if piece.contains('\u{2581}') && !tk.get_added_vocabulary().is_special_token(&piece) {
        return Some(piece.replace('\u{2581}', " ").into_bytes());
    }
    Some(alone.into_bytes())
}

/// The byte GPT-2's byte-level alphabet writes as `c` (printable Latin-1 characters stand for
/// themselves, the other 68 bytes for U+0100 on, in order).
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let c = c as u32;
    if c < 256 {
        return printable(c).then_some(c as u8);
    }
    (0..256u32)
        .filter(|&b| !printable(b))
        .nth((c - 256) as usize)
        .map(|b| b as u8)
}

/// Compression statistics of a tokenizer on some texts.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TokenStats {
    pub documents: u64,
    pub bytes: u64,
    pub words: u64,
    pub tokens: u64,
}

impl TokenStats {
    pub fn tokens_per_byte(&self) -> f64 {
        self.tokens as f64 / self.bytes.max(1) as f64
    }
    pub fn bytes_per_token(&self) -> f64 {
        self.bytes as f64 / self.tokens.max(1) as f64
    }
    pub fn tokens_per_word(&self) -> f64 {
        self.tokens as f64 / self.words.max(1) as f64
    }
}

/// Compression statistics over the documents of `inputs`, streamed.
pub fn stats(
    tk: &Tokenizer,
    inputs: &[PathBuf],
    ingest: &lmkit_data::IngestOptions,
) -> Result<TokenStats> {
    let mut s = TokenStats::default();
    let mut docs = crate::stream::DocStream::open(inputs.to_vec(), ingest.clone());
    loop {
        let chunk = docs.next_chunk(4096, CHUNK_BYTES);
        if chunk.is_empty() {
            break;
        }
        encode_each::<TokenizeError>(tk, &chunk, |i, ids, last| {
            s.tokens += ids.len() as u64;
            if last {
                let t = &chunk[i];
                s.documents += 1;
                s.bytes += t.len() as u64;
                s.words += t.split_whitespace().count() as u64;
            }
            Ok(())
        })?;
    }
    docs.finish()?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer(
        decoder: serde_json::Value,
        vocab: serde_json::Value,
        fallback: bool,
    ) -> Tokenizer {
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 1, "content": "<s>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": decoder,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": fallback, "ignore_merges": false, "vocab": vocab, "merges": []},
        });
        serde_json::to_string(&json).unwrap().parse().unwrap()
    }

    #[test]
    fn token_bytes_are_exact_for_byte_level_and_sentencepiece_tokens() {
        // SentencePiece's scheme: byte tokens, `▁` for a space (the first one stripped when a
        // text is decoded).
        let decoders = [
            serde_json::json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
            serde_json::json!({"type": "ByteFallback"}),
            serde_json::json!({"type": "Fuse"}),
            serde_json::json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}),
        ];
        let spm = tokenizer(
            serde_json::json!({"type": "Sequence", "decoders": decoders}),
            serde_json::json!({"<unk>": 0, "<s>": 1, "<0xE2>": 2, "▁the": 3, "cat": 4}),
            true,
        );
        assert_eq!(token_bytes(&spm, 2).unwrap(), [0xE2]);
        assert_eq!(token_bytes(&spm, 3).unwrap(), b" the");
        assert_eq!(token_bytes(&spm, 4).unwrap(), b"cat");
        assert_eq!(token_bytes(&spm, 1).unwrap(), b"<s>");
        assert!(token_bytes(&spm, 99).is_none());
        // Byte-level BPE: `Ġ` is the space, `ì` the byte 0xEC (part of a character), `Ċ` the
        // newline.
        let byte_level = tokenizer(
            serde_json::json!({"type": "ByteLevel", "add_prefix_space": true,
                "trim_offsets": true, "use_regex": true}),
            serde_json::json!({"Ġthe": 0, "<s>": 1, "ì": 2, "Ċ": 3, "ìĬ": 4}),
            false,
        );
        assert_eq!(token_bytes(&byte_level, 0).unwrap(), b" the");
        assert_eq!(token_bytes(&byte_level, 2).unwrap(), [0xEC]);
        assert_eq!(token_bytes(&byte_level, 3).unwrap(), b"\n");
        assert_eq!(token_bytes(&byte_level, 4).unwrap(), [0xEC, 0x8A]);
    }
}
