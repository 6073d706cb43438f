//! The error of an operation on a file: the path and what the operating system said.

use std::path::{Path, PathBuf};

/// An I/O error with the path it happened on. Its message is `PATH: CAUSE`; the cause is part of
/// the message and not also reported as a `source()`, so error chains (`{:#}`) print it once.
#[derive(Debug, thiserror::Error)]
#[error("{}: {cause}", path.display())]
pub struct PathError {
    pub path: PathBuf,
    cause: std::io::Error,
}

impl PathError {
    pub fn new(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        PathError {
            path: path.into(),
            cause,
        }
    }

    /// What the operating system said.
    pub fn io_error(&self) -> &std::io::Error {
        &self.cause
    }

    pub fn kind(&self) -> std::io::ErrorKind {
        self.cause.kind()
    }
}

/// `.at(path)` on I/O results: names the file in the error.
pub trait PathResultExt<T> {
    fn at(self, path: &Path) -> Result<T, PathError>;
}

impl<T> PathResultExt<T> for std::io::Result<T> {
    fn at(self, path: &Path) -> Result<T, PathError> {
        self.map_err(|e| PathError::new(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_the_path_and_the_cause_once() {
        let e = std::fs::read("/no/such/dir/file.txt").at(Path::new("/no/such/dir/file.txt"));
        let e = e.err().unwrap();
        let msg = e.to_string();
        assert!(msg.starts_with("/no/such/dir/file.txt: "), "{msg}");
        assert_eq!(msg.matches("os error").count(), 1, "{msg}");
        assert!(std::error::Error::source(&e).is_none());
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
