//! The label store: teachers' label distributions in a Parquet file that pyarrow, DuckDB and
//! Polars open directly, one row per (sample, source).
//!
//! Columns: `index` (`uint32`, position of the sample in the prepared split), `label` (`uint32`,
//! the hard label), `source` (`utf8`: a teacher stage's name, `ensemble` for the mean of several
//! teachers, `<teacher>.mc` for a teacher's Monte-Carlo dropout mean), `probs`
//! (`FixedSizeList<float32, K>`), and for `.mc` sources (null elsewhere) `std`
//! (`FixedSizeList<float32, K>`, per-class standard deviation over the passes), `entropy` and
//! `mutual_information` (`float32`, nats). Key-value metadata: `ldl.format_version`,
//! `ldl.k`, `ldl.classes` (JSON list), `ldl.dataset_fingerprint`, `ldl.teachers` (JSON object of
//! stage name → fingerprint), `ldl.temperature`, `ldl.teacher_checkpoints` (stage name → blake3
//! of its weights), `ldl.mc` (with MC sources: passes and dropout rates), `ldl.program_version`. Files are zstd-compressed,
//! the float vectors are BYTE_STREAM_SPLIT-encoded, row groups hold 8192 rows, and files contain no
//! timestamp: the same inputs give byte-identical files. With `dtype = "f16"` the vectors are
//! stored as `float16` (`ldl.dtype`), half the size; the reader renormalises such rows (their
//! rounding can move a sum by up to 2^-11).
//!
//! In memory, a top-k store stays top-k ([`SoftLabels::row_into`] expands one row at a time), so
//! a student of a 1.28M × 1000 ImageNet store holds 43 MB of labels (top-5), not 5 GB.
//!
//! The store's parts: [`schema`] (columns, metadata keys and encodings), [`write`](mod@write)
//! (the writer), [`read`](mod@read) (the metadata and one source's rows), [`validate`] (the checks every
//! row passes on the way in) and [`soft_labels`] (the rows in memory).

mod conform;
pub mod read;
pub(crate) mod schema;
pub mod soft_labels;
pub mod validate;
pub mod write;

pub use read::{guard, open_parquet, read, read_meta};
pub use soft_labels::{expand_top_k, SoftLabels};
pub use write::{top_classes, write, write_streamed, RowSink};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Rows summing to 1 within this tolerance are accepted.
pub const SUM_TOLERANCE: f32 = 1e-4;

/// What a label store says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelMeta {
    /// Class names (their count is K).
    pub classes: Vec<String>,
    /// Fingerprint of the dataset split the labels index.
    pub dataset_fingerprint: String,
    /// Teacher stage name → fingerprint.
    pub teachers: BTreeMap<String, String>,
    /// Softmax temperature.
    pub temperature: f64,
    /// Teacher stage name → blake3 of its `model.safetensors`.
    pub checkpoints: BTreeMap<String, String>,
    /// Monte-Carlo dropout: passes per sample, and each MC teacher's dropout rate.
    pub mc: Option<McMeta>,
    /// Top-k mode: each distribution is stored as its k largest probabilities and the mass of
    /// the other classes (`ldl.top_k`); `None` stores full vectors.
    pub top_k: Option<usize>,
    /// Storage type of the probability and standard-deviation vectors (`ldl.dtype`).
    pub dtype: StoreDtype,
}

/// Storage type of a store's float vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreDtype {
    /// `float32` (default).
    #[default]
    F32,
    /// `float16`: half the size; about 3 significant digits.
    F16,
}

impl StoreDtype {
    /// The value of `ldl.dtype`.
    pub fn as_str(&self) -> &'static str {
        match self {
            StoreDtype::F32 => "float32",
            StoreDtype::F16 => "float16",
        }
    }
    /// How far from 1 a stored row may sum: [`SUM_TOLERANCE`], plus for `float16` the worst
    /// rounding of K values summing to 1 (relative 2^-11 each, and 2^-25 absolute for subnormals).
    pub fn sum_tolerance(&self, k: usize) -> f32 {
        match self {
            StoreDtype::F32 => SUM_TOLERANCE,
            StoreDtype::F16 => SUM_TOLERANCE + 2f32.powi(-11) + k as f32 * 2f32.powi(-25),
        }
    }
}

/// How the Monte-Carlo dropout sources were made (`ldl.mc`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McMeta {
    /// Stochastic passes per sample (N).
    pub samples: usize,
    /// Teacher stage name → its dropout rate p.
    pub dropout: BTreeMap<String, f64>,
}

/// One source's distributions, to be written.
pub struct SourceRows<'a> {
    /// `source` column value.
    pub source: &'a str,
    /// Sample indices.
    pub indices: &'a [u32],
    /// Hard labels.
    pub labels: &'a [u32],
    /// `len × K` probabilities.
    pub probs: &'a [f32],
    /// The uncertainty columns of a Monte-Carlo dropout source (null for other sources).
    pub mc: Option<McRows<'a>>,
}

/// The uncertainty columns of a Monte-Carlo dropout source.
pub struct McRows<'a> {
    /// `len × K` per-class standard deviations over the passes.
    pub std: &'a [f32],
    /// Entropy of the mean distribution (nats), one per row.
    pub entropy: &'a [f32],
    /// Mutual information (nats), one per row.
    pub mutual_information: &'a [f32],
}

#[cfg(test)]
mod tests;
