//! Errors of model construction and loading, naming the file, field or tensor at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid config: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: unsupported model_type `{model_type}` (supported: gpt2, llama, lmkit_rnn)")]
    UnsupportedModel { path: PathBuf, model_type: String },
    #[error("{path}: tensor `{name}`: {msg} (is the checkpoint complete and made for this config.json?)")]
    Tensor {
        path: PathBuf,
        name: String,
        msg: String,
    },
    #[error("{0}")]
    Device(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;
