//! The error type of the stages crate.

use std::path::PathBuf;

/// Errors raised while running a stage.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
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

/// Reads a JSON file into `T`, naming the file in errors.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| StageError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        StageError::invalid(
            path,
            format!("line {}, column {}", e.line(), e.column()),
            e.to_string(),
        )
    })
}

/// Writes `value` as pretty JSON, atomically.
pub(crate) fn write_json<T: serde::Serialize>(path: &std::path::Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("serialisable");
    bytes.push(b'\n');
    Ok(datasets::atomic::write_bytes(path, &bytes)?)
}
