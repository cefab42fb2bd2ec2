//! The error type of the datasets crate: every variant names the file and the place in it.

use std::path::PathBuf;

/// Errors from reading, writing or validating datasets.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// An I/O operation on `path` failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file's contents do not follow its format.
    #[error("{path}: {place}: {message}")]
    Format {
        /// The file involved.
        path: PathBuf,
        /// Where in the file (a header field, a record, a byte offset).
        place: String,
        /// What was found and what was expected.
        message: String,
    },
    /// A parameter is out of its valid range.
    #[error("invalid parameter `{name}`: {message}")]
    Param {
        /// The parameter's name.
        name: &'static str,
        /// What was expected.
        message: String,
    },
}

impl DatasetError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DatasetError::Io {
            path: path.into(),
            source,
        }
    }

    /// A format error at `place` in `path`.
    pub fn format(
        path: impl Into<PathBuf>,
        place: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        DatasetError::Format {
            path: path.into(),
            place: place.into(),
            message: message.into(),
        }
    }
}

/// Result alias of the datasets crate.
pub type Result<T, E = DatasetError> = std::result::Result<T, E>;
