//! An evaluation: `metrics.json`, as an `evaluate` stage writes it and a `report` reads it.

use crate::science::metrics::Metrics;
use serde::{Deserialize, Serialize};

/// Metrics after temperature scaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibrated {
    /// The fitted temperature T.
    pub temperature: f64,
    /// The metrics of softmax(logits / T).
    pub metrics: Metrics,
}

/// `metrics.json`: one evaluated model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The train stage evaluated.
    pub model_stage: String,
    /// Its architecture.
    pub model: String,
    /// Its training method.
    pub method: String,
    /// The training's distinguishing options (mixing, MC teachers) and `MCDO-S` when evaluated
    /// by MC dropout; empty for none.
    #[serde(default)]
    pub variant: String,
    /// Its seed.
    pub seed: u64,
    /// The metrics on the test split.
    pub metrics: Metrics,
    /// The metrics after temperature scaling, when the model has a fitted temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibrated: Option<Calibrated>,
    /// Class names, in class order.
    #[serde(default)]
    pub classes: Vec<String>,
    /// The model's trainable parameters (BatchNorm running statistics excluded); 0 in
    /// metrics.json files written before it was recorded.
    #[serde(default)]
    pub parameters: usize,
    /// The evaluate stage that wrote it, set by the report reading it (not in metrics.json): two
    /// evaluate stages of one model (other `bins`, other `mc_samples`) are told apart by it.
    #[serde(skip)]
    pub stage: String,
}

impl Evaluation {
    /// The row label of the method: `method` or `method (variant)`.
    pub fn label(&self) -> String {
        if self.variant.is_empty() {
            self.method.clone()
        } else {
            format!("{} ({})", self.method, self.variant)
        }
    }
}
