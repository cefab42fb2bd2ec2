//! The error type of the stages crate.

use std::path::PathBuf;

/// Errors raised while running a stage.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The engine failed (a model, a checkpoint, a device).
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
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
        /// Where in the file (a row, a column, a key).
        place: String,
        /// What was found and what was expected.
        message: String,
    },
    /// The stage's parameters or inputs do not fit together.
    #[error("{0}")]
    Config(String),
    /// Training diverged or produced non-finite values.
    #[error("{0}")]
    Numeric(String),
    /// A file the stage left in its folder to resume from (a label chunk) is damaged: the runner
    /// keeps the folder, so that removing that one file resumes the rest.
    #[error("{path}: {place}: {message}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Where in it.
        place: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// The stage stopped because the process was asked to (a signal), leaving a checkpoint to
    /// resume from.
    #[error("{0}")]
    Interrupted(String),
}

impl StageError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StageError::Io {
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
        StageError::Invalid {
            path: path.into(),
            place: place.into(),
            message: message.into(),
        }
    }
}

/// Result alias of the stages crate.
pub type Result<T, E = StageError> = std::result::Result<T, E>;
