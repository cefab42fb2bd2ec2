//! What flows between stages: the kinds of stage, the artifact each produces, and the types
//! that read them — a prepared dataset ([`Dataset`]), a trained model ([`TrainedModel`]), a
//! label store's files ([`labels`]), an evaluation ([`Evaluation`]), a training curve
//! ([`Curve`]) and where a prepared image came from ([`records`]). Stage kinds pass nothing else to each other.

pub mod curve;
pub mod dataset;
pub mod evaluation;
pub mod labels;
pub mod model;
pub mod records;

pub use curve::{Curve, CurvePoint};
pub use dataset::{Dataset, DatasetInfo, SplitInfo};
pub use evaluation::{Calibrated, Evaluation};
pub use labels::Split;
pub use model::TrainedModel;

use serde::{Deserialize, Serialize};

/// The kind of a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Turns a dataset into packed splits.
    Prepare,
    /// Turns a model trained elsewhere (a PyTorch or safetensors file) into a model artifact.
    Import,
    /// Trains a model (teacher or student).
    Train,
    /// Runs teachers over a split and stores their label distributions.
    Label,
    /// Runs teachers over every batch of a training's batch stream and stores their outputs.
    Replay,
    /// Runs a model over the test split and computes metrics.
    Evaluate,
    /// Tabulates evaluations.
    Report,
}

impl Kind {
    /// Every kind, in pipeline order.
    pub const ALL: [Kind; 7] = [
        Kind::Prepare,
        Kind::Import,
        Kind::Train,
        Kind::Label,
        Kind::Replay,
        Kind::Evaluate,
        Kind::Report,
    ];

    /// The kind's name in stages.toml.
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Prepare => "prepare",
            Kind::Import => "import",
            Kind::Train => "train",
            Kind::Label => "label",
            Kind::Replay => "replay",
            Kind::Evaluate => "evaluate",
            Kind::Report => "report",
        }
    }

    /// What a stage of this kind produces for its downstream stages.
    pub fn produces(&self) -> Artifact {
        match self {
            Kind::Prepare => Artifact::Dataset,
            Kind::Import | Kind::Train => Artifact::Model,
            Kind::Label => Artifact::Labels,
            Kind::Replay => Artifact::Replay,
            Kind::Evaluate => Artifact::Metrics,
            Kind::Report => Artifact::Report,
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Kind::ALL.iter().map(Kind::as_str).collect();
                format!(
                    "unknown stage kind `{s}`, expected one of {}",
                    names.join(", ")
                )
            })
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What flows along a `needs` edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Artifact {
    /// Packed splits (`prepare`).
    Dataset,
    /// A model (`train`, `import`).
    Model,
    /// A label store (`label`).
    Labels,
    /// A replay store (`replay`).
    Replay,
    /// Metrics of one model (`evaluate`).
    Metrics,
    /// Tables (`report`): nothing reads them.
    Report,
}

impl std::fmt::Display for Artifact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Artifact::Dataset => "a dataset (kind prepare)",
            Artifact::Model => "a model (kind train or import)",
            Artifact::Labels => "a label store (kind label)",
            Artifact::Replay => "a replay store (kind replay)",
            Artifact::Metrics => "metrics (kind evaluate)",
            Artifact::Report => "a report (kind report)",
        })
    }
}

/// How many inputs of an artifact a stage takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Multiplicity {
    /// Exactly one.
    One,
    /// One or more.
    OneOrMore,
    /// None allowed.
    None,
}

/// A field of the CSV tables stages write, quoted (RFC 4180) when it holds a comma, a quote or
/// a line break: method labels list variants with commas (`on-ldl (cutmix, MCDO-T)`), and an
/// ImageFolder's class names are folder names.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
