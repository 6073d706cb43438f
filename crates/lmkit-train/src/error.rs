//! Training errors, naming the file or field at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Io(#[from] lmkit_core::PathError),
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error(transparent)]
    Model(#[from] lmkit_models::ModelError),
    #[error(transparent)]
    Tokenize(#[from] lmkit_tokenize::TokenizeError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: cannot resume: {msg}")]
    Resume { path: PathBuf, msg: String },
    #[error("{path} holds another run ({what}); continue it with --resume, replace it with --overwrite, or set another train.out_dir")]
    RunExists { path: PathBuf, what: String },
    #[error("{0}")]
    Data(String),
    #[error("training group: {0}")]
    Group(String),
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io(lmkit_core::PathError::new(path, source))
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;
