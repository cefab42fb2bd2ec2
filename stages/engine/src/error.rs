//! The error type of the engine.

use std::path::PathBuf;

/// Errors raised while building, training, saving or loading a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A dataset could not be read or written.
    #[error(transparent)]
    Dataset(#[from] datasets::DatasetError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// An I/O operation on `path` failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file does not hold what it should.
    #[error("{path}: {place}: {message}")]
    Invalid {
        /// The file involved.
        path: PathBuf,
        /// Where in the file (a tensor, a key).
        place: String,
        /// What was found and what was expected.
        message: String,
    },
    /// The settings do not fit together (an unknown architecture, a missing device).
    #[error("{0}")]
    Config(String),
    /// Training diverged or produced non-finite values.
    #[error("{0}")]
    Numeric(String),
}

impl EngineError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }
    /// A content error at `place` in `path`.
    pub fn invalid(
        path: impl Into<PathBuf>,
        place: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        EngineError::Invalid {
            path: path.into(),
            place: place.into(),
            message: message.into(),
        }
    }
}

/// Result alias of the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Runs `f`, turning a panic inside it (a third-party decoder's on damaged input: candle's
/// unpickler, the parquet crate's pages) into the error `on_panic` makes of its message.
pub fn unpanicked<T, E>(
    f: impl FnOnce() -> std::result::Result<T, E>,
    on_panic: impl FnOnce(&str) -> E,
) -> std::result::Result<T, E> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("unknown failure");
        Err(on_panic(msg))
    })
}
