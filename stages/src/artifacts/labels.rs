//! A label store's files: which split's labels a `label` stage writes to which file, so that
//! its readers (a student, `pipeline inspect`, Python) find them.

use serde::{Deserialize, Serialize};

/// A split of a prepared dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// `train.pack`.
    Train,
    /// `val.pack` (held out by the prepare stage's `val` key).
    Val,
    /// `test.pack`.
    Test,
}

impl Split {
    /// The split's name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

/// The file a split's labels are written to: `labels.parquet` for the training split (the one
/// students read), `labels-<split>.parquet` for the others.
pub fn file_for(split: Split) -> String {
    match split {
        Split::Train => "labels.parquet".into(),
        other => format!("labels-{}.parquet", other.as_str()),
    }
}
