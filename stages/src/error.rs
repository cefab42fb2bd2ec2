//! The error type of the stages crate.

use engine::EngineError;
use std::path::PathBuf;

/// Errors raised while running a stage.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The engine failed, or a file, a setting or a value was wrong: everything a stage shares
    /// with the engine (datasets, tensors, I/O, invalid files, configuration, divergence) is
    /// an [`EngineError`], with the same messages.
    #[error(transparent)]
    Engine(#[from] EngineError),
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

impl From<datasets::DatasetError> for StageError {
    fn from(e: datasets::DatasetError) -> Self {
        StageError::Engine(e.into())
    }
}

impl From<candle_core::Error> for StageError {
    fn from(e: candle_core::Error) -> Self {
        StageError::Engine(e.into())
    }
}

impl StageError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StageError::Engine(EngineError::io(path, source))
    }
    /// A content error at `place` (a row, a column, a key) in `path`.
    pub fn invalid(
        path: impl Into<PathBuf>,
        place: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        StageError::Engine(EngineError::invalid(path, place, message))
    }
    /// The stage's parameters or inputs do not fit together.
    pub fn config(message: impl Into<String>) -> Self {
        StageError::Engine(EngineError::Config(message.into()))
    }
    /// Training diverged or produced non-finite values.
    pub fn numeric(message: impl Into<String>) -> Self {
        StageError::Engine(EngineError::Numeric(message.into()))
    }

    /// Whether the stage's partial folder is worth keeping after this error: a stop, a damaged
    /// file to resume from, an I/O error that the next run may not meet (a full disk, a
    /// network file system's hiccup), or a device's (out of GPU memory, a GPU that fails to
    /// start on a requeued node: tensor and device errors), so that it resumes from the
    /// checkpoints and chunks already written. What the same inputs would meet again (an
    /// invalid file, divergence) makes the folder worthless.
    pub fn keeps_partial(&self) -> bool {
        matches!(
            self,
            StageError::Interrupted(_)
                | StageError::Damaged { .. }
                | StageError::Engine(
                    EngineError::Io { .. }
                        | EngineError::Dataset(datasets::DatasetError::Io { .. })
                        | EngineError::Candle(_)
                        | EngineError::Config(_)
                )
        )
    }
}

/// Result alias of the stages crate.
pub type Result<T, E = StageError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Days of checkpoints survive what a rerun may not meet (a device failing, out of memory,
    /// a missing GPU, a full disk, a stop); an invalid input or divergence, which the same
    /// inputs meet again, discards them.
    #[test]
    fn what_keeps_a_partial_folder() {
        let oom = candle_core::Error::Msg("CUDA_ERROR_OUT_OF_MEMORY".into());
        let kept = [
            StageError::Engine(EngineError::Candle(oom)),
            StageError::config("no CUDA device 0"),
            StageError::io("/x", std::io::Error::other("disk full")),
            StageError::Interrupted("stop".into()),
        ];
        assert!(kept.iter().all(StageError::keeps_partial));
        let discarded = [
            StageError::numeric("the loss is NaN at step 7"),
            StageError::invalid("/x.pth", "tensor `fc.weight`", "shape [3, 4]"),
        ];
        assert!(!discarded.iter().any(StageError::keeps_partial));
    }
}
