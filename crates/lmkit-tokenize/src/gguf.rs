//! The tokenizer and chat template a GGUF file carries in its metadata (`tokenizer.ggml.*`,
//! `tokenizer.chat_template`), rebuilt as a Hugging Face tokenizer that splits text as llama.cpp
//! does for the file's pre-tokenizer type.

use crate::error::{Result, TokenizeError};
use candle_core::quantized::gguf_file::{Content, Value};
use std::path::Path;
use tokenizers::Tokenizer;

pub use lmkit_core::is_gguf;

/// The metadata of a GGUF file.
pub struct GgufMeta {
    content: Content,
}

impl GgufMeta {
    pub fn read(path: &Path) -> Result<GgufMeta> {
        let f = std::fs::File::open(path).map_err(|e| TokenizeError::io(path, e))?;
        // Buffered: the reader takes each metadata string with its own small reads.
        let mut f = std::io::BufReader::with_capacity(1 << 20, f);
        let content = Content::read(&mut f).map_err(|e| TokenizeError::Load {
            path: path.to_path_buf(),
            msg: format!(
                "not a readable GGUF file: {}",
                e.to_string().lines().next().unwrap_or_default()
            ),
        })?;
        Ok(GgufMeta { content })
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    fn int(&self, key: &str) -> Option<u32> {
        self.get(key)?.to_u32().ok().or_else(|| {
            self.get(key)?
                .to_i32()
                .ok()
                .and_then(|v| u32::try_from(v).ok())
        })
    }

    fn strings(&self, key: &str) -> Option<Vec<&str>> {
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Some(s.as_str()),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    fn ints(&self, key: &str) -> Option<Vec<i64>> {
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.to_i32()
                        .map(|x| x as i64)
                        .or_else(|_| v.to_u32().map(|x| x as i64))
                })
                .collect::<std::result::Result<_, _>>()
                .ok(),
            _ => None,
        }
    }

    fn floats(&self, key: &str) -> Option<Vec<f32>> {
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| v.to_f32().or_else(|_| v.to_f64().map(|x| x as f32)))
                .collect::<std::result::Result<_, _>>()
                .ok(),
            _ => None,
        }
    }

    fn flag(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// A token id the metadata gives under `key` (`tokenizer.ggml.eos_token_id`...).
    pub fn token_id(&self, key: &str) -> Option<u32> {
        self.int(key)
    }

    /// The chat template (`tokenizer.chat_template`), if the file has one.
    pub fn chat_template(&self) -> Option<String> {
        self.str("tokenizer.chat_template").map(String::from)
    }

    /// The text of special token `which` (`bos`, `eos`, `unk`, `padding`), by its id.
    pub fn special_token(&self, which: &str) -> Option<String> {
        let id = self.int(&format!("tokenizer.ggml.{which}_token_id"))? as usize;
        self.strings("tokenizer.ggml.tokens")?
            .get(id)
            .map(|s| s.to_string())
    }
}

/// Splitting rules of llama.cpp's pre-tokenizer types (llama-vocab.cpp), as Hugging Face
/// pre-tokenizers.
fn pre_tokenizer(pre: &str) -> Option<(serde_json::Value, bool)> {
    const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let byte_level = |use_regex: bool| serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| serde_json::json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    let seq = |items: Vec<serde_json::Value>| serde_json::json!({"type": "Sequence", "pretokenizers": items});
    Some(match pre {
        "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => (byte_level(true), false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => (
            seq(vec![
                serde_json::json!({"type": "Digits", "individual_digits": true}),
                byte_level(true),
            ]),
            false,
        ),
        "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "pixtral" => {
            (seq(vec![split(LLAMA3), byte_level(false)]), true)
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" => {
            (seq(vec![split(QWEN2), byte_level(false)]), false)
        }
        _ => return None,
    })
}

/// The tokenizer of a GGUF file. Supported: `tokenizer.ggml.model = gpt2` (byte-level BPE, the
/// kind of Llama 3, Qwen2/3, SmolLM2 and GPT-NeoX models) with the pre-tokenizer types above, and
/// `llama` (SentencePiece BPE with byte fallback: Llama 1/2, Mistral 7B, Gemma-style vocabularies).
pub fn tokenizer(path: &Path, meta: &GgufMeta) -> Result<Tokenizer> {
    let bad = |msg: String| TokenizeError::Load {
        path: path.to_path_buf(),
        msg,
    };
    let model = meta.str("tokenizer.ggml.model").ok_or_else(|| {
        bad("metadata `tokenizer.ggml.model` is missing: the file carries no tokenizer".into())
    })?;
    if model == "llama" {
        return sentencepiece(meta).map_err(bad);
    }
    if model != "gpt2" {
        return Err(bad(format!(
            "tokenizer.ggml.model `{model}` is not supported yet (supported: gpt2, byte-level \
             BPE; llama, SentencePiece BPE)"
        )));
    }
    // (llama.cpp's `default` splits otherwise than GPT-2; files made since 2024 name theirs.)
    let pre_name = meta.str("tokenizer.ggml.pre").unwrap_or("default");
    let (pre, ignore_merges) = pre_tokenizer(pre_name).ok_or_else(|| {
        bad(format!(
            "tokenizer.ggml.pre `{pre_name}` is not supported yet (its splitting rules are not known here)"
        ))
    })?;
    let tokens = meta
        .strings("tokenizer.ggml.tokens")
        .ok_or_else(|| bad("metadata `tokenizer.ggml.tokens` is missing".into()))?;
    let merges = meta
        .strings("tokenizer.ggml.merges")
        .ok_or_else(|| bad("metadata `tokenizer.ggml.merges` is missing".into()))?;
    let types = meta.ints("tokenizer.ggml.token_type").unwrap_or_default();
    // Control (3) and user-defined (4) tokens are matched in text as a whole.
    let (vocab, added) = vocabulary(&tokens, &types, 3..=4).map_err(bad)?;
    for (i, m) in merges.iter().enumerate() {
        if m.split_once(' ').is_none() {
            return Err(bad(format!(
                "tokenizer.ggml.merges[{i}] `{m}` is not two tokens separated by a space"
            )));
        }
    }
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": post_processor(meta, &tokens, false),
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
    });
    from_json(&json).map_err(bad)
}

/// The vocabulary (token → id) and, as Hugging Face's `added_tokens`, the tokens whose llama.cpp
/// type (`types`: one per token, or none) is in `whole`: those are matched in text as a whole,
/// user-defined ones (4) as plain tokens, the others as special ones.
fn vocabulary(
    tokens: &[&str],
    types: &[i64],
    whole: std::ops::RangeInclusive<i64>,
) -> std::result::Result<
    (
        serde_json::Map<String, serde_json::Value>,
        Vec<serde_json::Value>,
    ),
    String,
> {
    if !types.is_empty() && types.len() != tokens.len() {
        return Err(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        ));
    }
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        vocab.insert(tok.to_string(), id.into());
        let ty = types.get(id).copied().unwrap_or(1);
        if whole.contains(&ty) {
            added.push(
                serde_json::json!({"id": id, "content": tok, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": ty != 4}),
            );
        }
    }
    Ok((vocab, added))
}

/// The special tokens llama.cpp puts around a text it tokenizes with its special tokens
/// (`tokenizer.ggml.add_bos_token`, default on for SentencePiece vocabularies and off for
/// byte-level BPE ones as in llama.cpp; `tokenizer.ggml.add_eos_token`, default off), as Hugging
/// Face's `TemplateProcessing` (null when none, or when the token ids are missing).
fn post_processor(meta: &GgufMeta, tokens: &[&str], bos_default: bool) -> serde_json::Value {
    let token = |key: &str| {
        meta.int(key)
            .and_then(|i| tokens.get(i as usize).map(|t| (t.to_string(), i)))
    };
    let added = |flag: &str, default: bool, id: &str| {
        meta.flag(flag)
            .unwrap_or(default)
            .then(|| token(id))
            .flatten()
    };
    let bos = added(
        "tokenizer.ggml.add_bos_token",
        bos_default,
        "tokenizer.ggml.bos_token_id",
    );
    let eos = added(
        "tokenizer.ggml.add_eos_token",
        false,
        "tokenizer.ggml.eos_token_id",
    );
    if bos.is_none() && eos.is_none() {
        return serde_json::Value::Null;
    }
    let special =
        |t: &(String, u32)| serde_json::json!({"SpecialToken": {"id": t.0, "type_id": 0}});
    let seq = |s: &str| serde_json::json!({"Sequence": {"id": s, "type_id": 0}});
    let around = |s: &str| {
        let mut v: Vec<serde_json::Value> = bos.iter().map(special).collect();
        v.push(seq(s));
        v.extend(eos.iter().map(special));
        v
    };
    let single = around("A");
    let pair = [around("A"), around("B")].concat();
    let specials: serde_json::Map<String, serde_json::Value> = bos
        .iter()
        .chain(eos.iter())
        .map(|(t, i)| {
            (
                t.clone(),
                serde_json::json!({"id": t, "ids": [i], "tokens": [t]}),
            )
        })
        .collect();
    serde_json::json!({"type": "TemplateProcessing", "single": single, "pair": pair,
        "special_tokens": specials})
}

/// A tokenizer from its tokenizer.json form.
fn from_json(json: &serde_json::Value) -> std::result::Result<Tokenizer, String> {
    serde_json::to_string(json)
        .map_err(|e| e.to_string())?
        .parse()
        .map_err(|e: tokenizers::Error| format!("rebuilding the tokenizer: {e}"))
}

/// A SentencePiece BPE vocabulary (`tokenizer.ggml.model = llama`: tokens, scores, types) as
/// llama.cpp tokenizes with it: a space before the text (and after each special token) when
/// `add_space_prefix` (the default), spaces as `▁`, adjacent pieces merged highest score first,
/// characters outside the vocabulary as their UTF-8 bytes (`<0xNN>` tokens). In Hugging Face's
/// terms (its Llama converter): a BPE model whose merges are every split of a token into two
/// tokens, ordered by the merged token's score, with byte fallback.
fn sentencepiece(meta: &GgufMeta) -> std::result::Result<Tokenizer, String> {
    let tokens = meta
        .strings("tokenizer.ggml.tokens")
        .ok_or("metadata `tokenizer.ggml.tokens` is missing")?;
    let scores = meta.floats("tokenizer.ggml.scores").ok_or(
        "metadata `tokenizer.ggml.scores` is missing (a SentencePiece vocabulary needs them)",
    )?;
    if scores.len() != tokens.len() {
        return Err(format!(
            "{} tokens but {} scores",
            tokens.len(),
            scores.len()
        ));
    }
    let types = meta.ints("tokenizer.ggml.token_type").unwrap_or_default();
    // Unknown (2), control (3) and user-defined (4) tokens are matched in text as a whole.
    let (vocab, added) = vocabulary(&tokens, &types, 2..=4)?;
    let ty = |id: usize| types.get(id).copied().unwrap_or(1);
    let mut ids = std::collections::HashMap::with_capacity(tokens.len());
    for (id, tok) in tokens.iter().enumerate() {
        ids.entry(*tok).or_insert(id);
    }
    // Every split of a normal token into two tokens, ordered by the token's score (highest
    // first; then the longer left part, then the longer right part), each token's splits by the
    // parts' ids.
    let mut merges: Vec<(f32, usize, usize, usize, usize)> = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        if ty(id) != 1 {
            continue;
        }
        let mut local = Vec::new();
        for (cut, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(cut);
            if let (Some(&a), Some(&b)) = (ids.get(l), ids.get(r)) {
                local.push((scores[id], l.chars().count(), r.chars().count(), a, b));
            }
        }
        local.sort_by_key(|m| (m.3, m.4));
        merges.extend(local);
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(y.1.cmp(&x.1)).then(y.2.cmp(&x.2)));
    let merges: Vec<[&str; 2]> = merges.iter().map(|m| [tokens[m.3], tokens[m.4]]).collect();
    let unk = meta
        .int("tokenizer.ggml.unknown_token_id")
        .and_then(|i| tokens.get(i as usize))
        .or_else(|| (0..tokens.len()).find(|&i| ty(i) == 2).map(|i| &tokens[i]))
        .map(|t| t.to_string());
    let space_prefix = meta.flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
    let replace =
        serde_json::json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"});
    let normalizer = if space_prefix {
        serde_json::json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, replace]})
    } else {
        replace
    };
    let mut decoders = vec![
        serde_json::json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        serde_json::json!({"type": "ByteFallback"}),
        serde_json::json!({"type": "Fuse"}),
    ];
    if space_prefix {
        decoders.push(serde_json::json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": post_processor(meta, &tokens, true),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    from_json(&json)
}

/// The `tokenizer.ggml.*` metadata (and `tokenizer.chat_template`) that describe `tk` to
/// llama.cpp: byte-level BPE tokenizers whose splitting rules match one of llama.cpp's
/// pre-tokenizer types. Token types: special added tokens are control tokens, other added
/// tokens user-defined.
pub fn metadata(
    tk: &Tokenizer,
    template: Option<&crate::chat::ChatTemplate>,
) -> Result<Vec<(String, Value)>> {
    let bad = |msg: String| {
        TokenizeError::Tokenizer(format!("cannot write this tokenizer to GGUF: {msg}"))
    };
    let json: serde_json::Value =
        serde_json::from_str(&tk.to_string(false).map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(bad(format!(
            "model type {} (only byte-level BPE has a GGUF form here)",
            model["type"]
        )));
    }
    // Offsets do not change ids: `trim_offsets` is left out of the comparison.
    fn ids_only(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(o) => o
                .iter()
                .filter(|(k, _)| k.as_str() != "trim_offsets")
                .map(|(k, v)| (k.clone(), ids_only(v)))
                .collect(),
            serde_json::Value::Array(a) => a.iter().map(ids_only).collect(),
            other => other.clone(),
        }
    }
    let pre = &json["pre_tokenizer"];
    let pre_name = ["gpt-2", "smollm", "llama-bpe", "qwen2"]
        .into_iter()
        .find(|name| pre_tokenizer(name).is_some_and(|(p, _)| ids_only(&p) == ids_only(pre)))
        .ok_or_else(|| {
            bad(format!(
                "its pre-tokenizer matches none of llama.cpp's types: {pre}"
            ))
        })?;
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("no vocabulary".into()))?;
    let added = tk.get_added_tokens_decoder();
    let size = vocab
        .values()
        .filter_map(|v| v.as_u64())
        .chain(added.keys().map(|&k| k as u64))
        .max()
        .map_or(0, |m| m as usize + 1);
    let mut tokens: Vec<Option<String>> = vec![None; size];
    for (t, id) in vocab {
        if let Some(id) = id.as_u64() {
            tokens[id as usize] = Some(t.clone());
        }
    }
    let mut types = vec![1i32; size];
    for (&id, t) in &added {
        tokens[id as usize] = Some(t.content.clone());
        types[id as usize] = if t.special { 3 } else { 4 };
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.map(Value::String)
                .ok_or_else(|| bad(format!("no token has id {i} (ids must be contiguous)")))
        })
        .collect::<Result<_>>()?;
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .ok_or_else(|| bad("no merges".into()))?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(Value::String(s.clone())),
            serde_json::Value::Array(p) if p.len() == 2 => Ok(Value::String(format!(
                "{} {}",
                p[0].as_str().unwrap_or_default(),
                p[1].as_str().unwrap_or_default()
            ))),
            other => Err(bad(format!(
                "a merge is neither \"a b\" nor [a, b]: {other}"
            ))),
        })
        .collect::<Result<_>>()?;
    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String(pre_name.into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
        (
            "tokenizer.ggml.add_bos_token".to_string(),
            Value::Bool(false),
        ),
    ];
    let id_of = |t: &Option<String>| t.as_deref().and_then(|t| tk.token_to_id(t));
    if let Some(t) = template {
        out.push((
            "tokenizer.chat_template".into(),
            Value::String(t.source.clone()),
        ));
        if let Some(id) = id_of(&t.bos_token) {
            out.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(id)));
        }
        if let Some(id) = id_of(&t.eos_token) {
            out.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(id)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_pre_tokenizer_builds() {
        for pre in ["gpt-2", "smollm", "llama-bpe", "qwen2"] {
            let (json, _) = pre_tokenizer(pre).unwrap();
            let _: tokenizers::PreTokenizerWrapper = serde_json::from_value(json).unwrap();
        }
        assert!(pre_tokenizer("nonesuch").is_none());
    }
}
