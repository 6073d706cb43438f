//! Errors of tokenizer training/use and token shards, naming the file or field at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error(transparent)]
    Io(#[from] lmkit_core::PathError),
    #[error(transparent)]
    Data(#[from] lmkit_data::DataError),
    #[error("{path}: cannot load tokenizer: {msg}")]
    Load { path: PathBuf, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{path}: {msg}")]
    Shard { path: PathBuf, msg: String },
    #[error("invalid option {name}={value}: {msg}")]
    BadOption {
        name: &'static str,
        value: String,
        msg: String,
    },
    #[error("{what}: no text to train on; give at least one non-blank line")]
    Empty { what: String },
}

impl TokenizeError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TokenizeError::Io(lmkit_core::PathError::new(path, source))
    }
}

pub type Result<T> = std::result::Result<T, TokenizeError>;
