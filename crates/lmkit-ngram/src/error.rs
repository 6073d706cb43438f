//! Errors of the n-gram crate: each names the file (and line, where there is one) and what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum NgramError {
    #[error(transparent)]
    Io(#[from] lmkit_core::PathError),
    #[error("{path}:{line}: line is not valid UTF-8 (byte {byte}); convert the file to UTF-8 (e.g. `iconv -f CP949 -t UTF-8`)")]
    InvalidUtf8 {
        path: PathBuf,
        line: u64,
        byte: usize,
    },
    #[error("{path}:{line}: the corpus contains the reserved token `{token}` (`<s>`, `</s>` and `<unk>` are the model's own); remove or replace it, or pass --skip-symbols to drop these tokens as lmplz --skip_symbols does")]
    ReservedToken {
        path: PathBuf,
        line: u64,
        token: String,
    },
    #[error("cannot estimate Kneser-Ney discounts for {order}-grams: {why} (adjusted count-of-counts 1..4: {counts:?}); is the corpus tiny or artificial? Deduplicate it, give more text, or pass --discount-fallback (default 0.5 1 1.5) to use fixed discounts where the estimate fails, as lmplz --discount_fallback")]
    Discounts {
        order: usize,
        why: String,
        counts: [u64; 4],
    },
    #[error("--{option}: {msg}")]
    BadOption { option: &'static str, msg: String },
    #[error("order must be between 1 and {max}, got {order}")]
    BadOrder { order: usize, max: usize },
    #[error("the corpus is empty: {what}; give at least one non-blank line of text")]
    EmptyCorpus { what: String },
    #[error(transparent)]
    Inputs(#[from] lmkit_core::inputs::InputError),
    #[error("{path}:{line}: ARPA file is malformed: {msg}")]
    Arpa {
        path: PathBuf,
        line: u64,
        msg: String,
    },
    #[error("{path}: not a valid lmkit binary model: {msg}; rebuild it with `lmkit ngram convert` or `lmkit ngram train`")]
    Binary { path: PathBuf, msg: String },
    #[error("{path}: unsupported model file extension; use .arpa (text) or .lmkb (binary)")]
    UnknownFormat { path: PathBuf },
}

impl NgramError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        NgramError::Io(lmkit_core::PathError::new(path, source))
    }
}

pub type Result<T> = std::result::Result<T, NgramError>;
