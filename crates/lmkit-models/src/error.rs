//! Errors of model construction and loading, naming the file, field or tensor at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Io(#[from] lmkit_core::PathError),
    #[error("{path}: invalid config: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: unsupported model_type `{model_type}` (supported: {supported})")]
    UnsupportedModel {
        path: PathBuf,
        model_type: String,
        supported: String,
    },
    #[error("{path}: tensor `{name}`: {msg} (is the checkpoint complete and made for this config.json?)")]
    Tensor {
        path: PathBuf,
        name: String,
        msg: String,
    },
    #[error("{0}")]
    Device(String),
    /// A construction refused for the reason given (a setting the machine cannot hold).
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;
