//! Errors of corpus preparation: each names the file and line, and what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {msg} (use --skip-bad to skip and count such lines instead)")]
    BadRecord {
        path: PathBuf,
        line: u64,
        msg: String,
    },
    #[error("{path}: no input files found (a directory is searched recursively for .txt, .jsonl and their .gz)")]
    NoInputFiles { path: PathBuf },
    #[error("no documents in the input ({what}); give at least one non-blank document")]
    EmptyInput { what: String },
    #[error("invalid option {name}={value}: {msg}")]
    BadOption {
        name: &'static str,
        value: String,
        msg: String,
    },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, DataError>;
