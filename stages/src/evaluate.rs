//! The `evaluate` stage: runs a trained model over the test split in eval mode (or averaging
//! `mc_samples` Monte-Carlo dropout passes) and writes its metrics (top-1 accuracy, ECE, NLL,
//! Brier; conventions in `metrics`) as `metrics.json`, `metrics.csv` and `metrics.md`; when the
//! model was temperature-scaled (`temperature.json`), the calibrated metrics as well.

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
    /// Average this many Monte-Carlo dropout passes (0: one deterministic pass); the model
    /// must have dropout ("MCDO-S").
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mc_samples: usize,
    /// Seed of the Monte-Carlo dropout masks (default: the model's training seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

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
    let labels = data.test.labels();
    let mut variant = meta.variant.clone();
    let probs = if p.mc_samples > 0 {
        if meta.spec.dropout == 0.0 {
            return Err(crate::StageError::Config(format!(
                "{}: mc_samples = {} averages Monte-Carlo dropout passes, but `{}` was trained \
                 without dropout",
                ctx.name, p.mc_samples, input.name
            )));
        }
        if !variant.is_empty() {
            variant.push_str(", ");
        }
        variant.push_str("MCDO-S");
        let seed = p.seed.unwrap_or(meta.seed);
        inference
            .predict_mc(
                ctx,
                &data.test,
                p.mc_samples,
                seed,
                "evaluating (MC dropout)",
            )?
            .mean
    } else {
        inference.predict(ctx, &data.test, "evaluating")?
    };
    let m = metrics::compute(&probs, &labels, k, p.bins);
    let temperature_file = input.dir.join("temperature.json");
    let calibrated = if temperature_file.exists() && p.mc_samples == 0 {
        let t: crate::calibration::Temperature = crate::error::read_json(&temperature_file)?;
        let logits = inference.logits(ctx, &data.test, "evaluating (temperature-scaled)")?;
        let probs: Vec<f32> = logits
            .chunks_exact(k)
            .flat_map(|row| {
                let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                let e: Vec<f64> = row
                    .iter()
                    .map(|&v| ((v as f64 - max) / t.temperature).exp())
                    .collect();
                let sum: f64 = e.iter().sum();
                e.into_iter().map(move |v| (v / sum) as f32)
            })
            .collect();
        Some(Calibrated {
            temperature: t.temperature,
            metrics: metrics::compute(&probs, &labels, k, p.bins),
        })
    } else {
        None
    };
    let e = Evaluation {
        model_stage: input.name.clone(),
        model: meta.spec.arch.clone(),
        method: meta.method.as_str().into(),
        variant,
        seed: meta.seed,
        metrics: m,
        calibrated,
    };
    write_json(&ctx.dir.join("metrics.json"), &e)?;
    let m = &e.metrics;
    let mut csv = format!(
        "{CSV_HEADER}\n{},{},{},{},{},{:.6},{:.6},{:.6},{:.6}\n",
        e.model_stage,
        e.model,
        e.label(),
        e.seed,
        m.n,
        m.accuracy,
        m.ece,
        m.nll,
        m.brier
    );
    if let Some(c) = &e.calibrated {
        let m = &c.metrics;
        csv.push_str(&format!(
            "{},{},{} + TS,{},{},{:.6},{:.6},{:.6},{:.6}\n",
            e.model_stage,
            e.model,
            e.label(),
            e.seed,
            m.n,
            m.accuracy,
            m.ece,
            m.nll,
            m.brier
        ));
    }
    datasets::atomic::write_bytes(&ctx.dir.join("metrics.csv"), csv.as_bytes())?;
    let md = format!(
        "# {}: {} ({}, {}, seed {})\n\n| metric | value |\n|---|---|\n| test images | {} |\n| top-1 accuracy | {:.2}% |\n| ECE ({} bins) | {:.2}% |\n| NLL | {:.4} |\n| Brier (sum over classes) | {:.4} |\n",
        ctx.name, e.model_stage, e.model, e.label(), e.seed, m.n, 100.0 * m.accuracy, p.bins, 100.0 * m.ece, m.nll, m.brier
    );
    let md = match &e.calibrated {
        Some(c) => format!(
            "{md}\nAfter temperature scaling (T = {:.4}, fitted on the validation split): accuracy {:.2}%, ECE {:.2}%, NLL {:.4}, Brier {:.4}.\n",
            c.temperature,
            100.0 * c.metrics.accuracy,
            100.0 * c.metrics.ece,
            c.metrics.nll,
            c.metrics.brier
        ),
        None => md,
    };
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
