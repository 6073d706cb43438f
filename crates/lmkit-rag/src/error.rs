//! What can go wrong building, opening or searching an index.

use lmkit_core::PathError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RagError {
    #[error(transparent)]
    Io(#[from] PathError),
    #[error("{}: {what}; rebuild the index with `lmkit index build`", path.display())]
    Corrupt { path: PathBuf, what: String },
    #[error("{}:{line}: {what}", path.display())]
    Input {
        path: PathBuf,
        line: usize,
        what: String,
    },
    #[error("embedding model: {0}")]
    Model(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, RagError>;

impl RagError {
    pub fn corrupt(path: impl Into<PathBuf>, what: impl Into<String>) -> RagError {
        RagError::Corrupt {
            path: path.into(),
            what: what.into(),
        }
    }
}
