//! Fill-in-the-middle: the tokens code models (Qwen2.5-Coder, StarCoder, DeepSeek-Coder, Code
//! Llama, Granite...) are trained with to write the text that goes between a prefix and a suffix,
//! found as llama.cpp finds them (its vocabulary's token texts, or a GGUF file's
//! `tokenizer.ggml.fim_*_token_id` keys), and the prompt they read: prefix-suffix-middle order,
//! `<PRE> prefix <SUF> suffix <MID>`, after the tokenizer's own start token where it adds one (the
//! layout of llama.cpp's `/infill` for a vocabulary without repository tokens).

use crate::error::Result;
use crate::gguf::GgufMeta;
use std::path::Path;
use tokenizers::Tokenizer;

/// The token texts llama.cpp takes for each role (llama-vocab.cpp), most common first.
const PREFIX: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
];
const SUFFIX: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
];
const MIDDLE: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
];
/// Tokens that end a middle where the vocabulary has them (llama.cpp's end-of-generation tokens
/// of the fill-in-the-middle family: padding, repository and file separators, Code Llama's end of
/// infill).
const ENDS: &[&str] = &[
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
    "<EOT>",
    "▁<EOT>",
];

/// A model's fill-in-the-middle tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fim {
    pub prefix: u32,
    pub suffix: u32,
    pub middle: u32,
    /// Tokens besides the model's end-of-text ones that end a middle.
    pub ends: Vec<u32>,
}

impl Fim {
    /// The fill-in-the-middle tokens of `tk` (`meta`: the GGUF file it came from, whose
    /// `tokenizer.ggml.fim_{pre,suf,mid}_token_id` keys come first), or `None` where it lacks one
    /// of the three.
    pub fn find(tk: &Tokenizer, meta: Option<&GgufMeta>) -> Option<Fim> {
        let n = tk.get_vocab_size(true) as u32;
        let key = |names: &[&str]| {
            let meta = meta?;
            names
                .iter()
                .find_map(|k| meta.token_id(&format!("tokenizer.ggml.{k}_token_id")))
                .filter(|&id| id < n)
        };
        let text = |texts: &[&str]| texts.iter().find_map(|t| tk.token_to_id(t));
        let prefix = key(&["fim_pre", "prefix"]).or_else(|| text(PREFIX))?;
        let suffix = key(&["fim_suf", "suffix"]).or_else(|| text(SUFFIX))?;
        let middle = key(&["fim_mid", "middle"]).or_else(|| text(MIDDLE))?;
        let mut ends: Vec<u32> = ["fim_pad", "fim_rep", "fim_sep", "eot"]
            .iter()
            .filter_map(|k| key(&[k]))
            .chain(ENDS.iter().filter_map(|t| tk.token_to_id(t)))
            .collect();
        ends.sort_unstable();
        ends.dedup();
        Some(Fim {
            prefix,
            suffix,
            middle,
            ends,
        })
    }

    /// [`Fim::find`] for `tk` loaded from `path` (a GGUF file's metadata read for its keys).
    pub fn of(path: &Path, tk: &Tokenizer) -> Option<Fim> {
        let meta = crate::gguf::is_gguf(path)
            .then(|| GgufMeta::read(path).ok())
            .flatten();
        Fim::find(tk, meta.as_ref())
    }

    /// Adds the tokens that end a middle to the stop tokens `stops` (those not there already).
    pub fn add_ends(&self, stops: &mut Vec<u32>) {
        for &t in &self.ends {
            if !stops.contains(&t) {
                stops.push(t);
            }
        }
    }

    /// The prompt that asks for the text between `prefix` and `suffix` (each encoded as a
    /// prompt's text is, without special tokens), with the tokenizer's start token where its
    /// post-processor adds one.
    pub fn prompt(&self, tk: &Tokenizer, prefix: &str, suffix: &str) -> Result<Vec<u32>> {
        let mut parts = crate::encode_batch(tk, &[prefix.to_string(), suffix.to_string()])?;
        let suffix_ids = parts.pop().unwrap_or_default();
        let prefix_ids = parts.pop().unwrap_or_default();
        let mut ids = Vec::with_capacity(prefix_ids.len() + suffix_ids.len() + 3);
        ids.push(self.prefix);
        ids.extend(prefix_ids);
        ids.push(self.suffix);
        ids.extend(suffix_ids);
        ids.push(self.middle);
        // The post-processor's start token (BOS), as llama.cpp adds it where the vocabulary
        // asks; an end token it would append is not wanted before the middle.
        let with = crate::add_special_tokens(tk, ids.clone())?;
        let start = with
            .iter()
            .position(|&t| t == self.prefix)
            .unwrap_or_default();
        let mut out = with[..start].to_vec();
        out.extend(ids);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer(specials: &[&str]) -> Tokenizer {
        let mut vocab = serde_json::Map::new();
        for (i, t) in ["a", "b", "c", " ", "d"].iter().enumerate() {
            vocab.insert(t.to_string(), i.into());
        }
        let added: Vec<serde_json::Value> = specials
            .iter()
            .enumerate()
            .map(|(i, s)| {
                serde_json::json!({"id": 5 + i, "content": s, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        for (i, s) in specials.iter().enumerate() {
            vocab.insert(s.to_string(), (5 + i).into());
        }
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab,
                "merges": []},
        });
        Tokenizer::from_bytes(serde_json::to_vec(&json).unwrap()).unwrap()
    }

    #[test]
    fn qwen_and_starcoder_spellings_are_found_and_laid_out_prefix_suffix_middle() {
        let tk = tokenizer(&[
            "<|endoftext|>",
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
        ]);
        let f = Fim::find(&tk, None).unwrap();
        assert_eq!(
            (f.prefix, f.middle, f.suffix, f.ends.clone()),
            (6, 7, 8, vec![9])
        );
        assert_eq!(f.prompt(&tk, "ab", "c").unwrap(), vec![6, 0, 1, 8, 2, 7]);
        assert_eq!(f.prompt(&tk, "", "").unwrap(), vec![6, 8, 7]);
        let tk = tokenizer(&["<fim_prefix>", "<fim_middle>", "<fim_suffix>"]);
        let f = Fim::find(&tk, None).unwrap();
        assert_eq!((f.prefix, f.middle, f.suffix), (5, 6, 7));
        assert!(f.ends.is_empty());
    }

    #[test]
    fn a_vocabulary_without_all_three_has_none() {
        assert_eq!(Fim::find(&tokenizer(&["<|endoftext|>"]), None), None);
        assert_eq!(
            Fim::find(&tokenizer(&["<|fim_prefix|>", "<|fim_suffix|>"]), None),
            None
        );
    }
}
