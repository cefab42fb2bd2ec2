//! The `evaluate` stage: runs a trained model over the test split in eval mode and writes its
//! metrics (top-1 accuracy, ECE, NLL, Brier; conventions in `metrics`) as `metrics.json`,
//! `metrics.csv` and `metrics.md`.

use crate::context::Context;
use crate::error::{write_json, Result};
use crate::inference::Inference;
use crate::metrics::{self, Metrics};
use crate::prepare::Dataset;
use crate::stage::Kind;
use crate::train::TrainedModel;
use serde::{Deserialize, Serialize};

fn d_bins() -> usize {
    10
}
fn d_batch() -> usize {
    256
}

/// Parameters of an `evaluate` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Equal-width confidence bins of the ECE.
    #[serde(default = "d_bins")]
    pub bins: usize,
    /// Images per inference batch.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
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
    /// Its seed.
    pub seed: u64,
    /// The metrics on the test split.
    pub metrics: Metrics,
}

/// Header of `metrics.csv`.
pub const CSV_HEADER: &str = "stage,model,method,seed,n,accuracy,ece,nll,brier";

/// Runs an `evaluate` stage.
pub fn run(ctx: &Context, p: &Params) -> Result<Vec<String>> {
    if p.bins == 0 {
        return Err(crate::StageError::Config(format!(
            "{}: bins must be at least 1",
            ctx.name
        )));
    }
    let data = Dataset::open(&ctx.input(Kind::Prepare).dir)?;
    let device = ctx.device.open()?;
    let input = ctx.input(Kind::Train);
    let k = data.info.classes.len();
    let (meta, model) = TrainedModel::load(&input.dir, &device, k)?;
    let inference = Inference {
        model: &model,
        device: &device,
        normalize: &data.info.normalize,
        batch_size: p.batch_size,
        temperature: 1.0,
    };
    let probs = inference.predict(ctx, &data.test, "evaluating")?;
    let m = metrics::compute(&probs, &data.test.labels(), k, p.bins);
    let e = Evaluation {
        model_stage: input.name.clone(),
        model: meta.spec.arch.clone(),
        method: meta.method.as_str().into(),
        seed: meta.seed,
        metrics: m,
    };
    write_json(&ctx.dir.join("metrics.json"), &e)?;
    let m = &e.metrics;
    let csv = format!(
        "{CSV_HEADER}\n{},{},{},{},{},{:.6},{:.6},{:.6},{:.6}\n",
        e.model_stage, e.model, e.method, e.seed, m.n, m.accuracy, m.ece, m.nll, m.brier
    );
    datasets::atomic::write_bytes(&ctx.dir.join("metrics.csv"), csv.as_bytes())?;
    let md = format!(
        "# {}: {} ({}, {}, seed {})\n\n| metric | value |\n|---|---|\n| test images | {} |\n| top-1 accuracy | {:.2}% |\n| ECE ({} bins) | {:.2}% |\n| NLL | {:.4} |\n| Brier (sum over classes) | {:.4} |\n",
        ctx.name, e.model_stage, e.model, e.method, e.seed, m.n, 100.0 * m.accuracy, p.bins, 100.0 * m.ece, m.nll, m.brier
    );
    datasets::atomic::write_bytes(&ctx.dir.join("metrics.md"), md.as_bytes())?;
    tracing::info!(
        "{}: {} accuracy {:.2}% ECE {:.2}% NLL {:.4} Brier {:.4}",
        ctx.name,
        e.model_stage,
        100.0 * m.accuracy,
        100.0 * m.ece,
        m.nll,
        m.brier
    );
    Ok(vec![
        "metrics.json".into(),
        "metrics.csv".into(),
        "metrics.md".into(),
    ])
}
