//! Errors of corpus preparation: each names the file and line, and what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Io(#[from] lmkit_core::PathError),
    #[error("{path}:{line}: {msg} (use --skip-bad to skip and count such lines instead)")]
    BadRecord {
        path: PathBuf,
        line: u64,
        msg: String,
    },
    /// A file whose framing is broken (nothing after the fault can be read).
    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },
    #[error(transparent)]
    Inputs(#[from] lmkit_core::inputs::InputError),
    #[error(transparent)]
    Output(#[from] lmkit_core::atomic::OutputDirError),
    #[error("no documents in the input ({what}); give at least one non-blank document")]
    EmptyInput { what: String },
    /// The reading side of a run stopped because the writing side failed (whose error is
    /// reported), or itself ended abnormally.
    #[error("reading the input stopped before its end")]
    Stopped,
    #[error("invalid option {name}={value}: {msg}")]
    BadOption {
        name: &'static str,
        value: String,
        msg: String,
    },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io(lmkit_core::PathError::new(path, source))
    }
}

pub type Result<T> = std::result::Result<T, DataError>;
