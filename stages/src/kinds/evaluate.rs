//! The `evaluate` stage: runs a trained model over the test split in eval mode (or averaging
//! `mc_samples` Monte-Carlo dropout passes) and writes
//!
//! - `predictions.parquet`: `index`, `label`, `probs` and `logits` (`FixedSizeList<float32, K>`;
//!   `logits` null under MC dropout, whose mean has none);
//! - the metrics of [`crate::science::metrics`] (conventions in docs/metrics.md) as `metrics.json`,
//!   `metrics.csv`, `metrics.md`, and per class as `class_metrics.csv`; when the model was
//!   temperature-scaled (`temperature.json`), the calibrated metrics as well;
//! - figures, PNG and SVG: `reliability` (and `reliability-ts`), `confidence`, `class-loss` (the
//!   training loss per epoch of the 5 best and 5 worst classes by test F1) and `projection` (the
//!   penultimate activations of three classes on the plane of their classifier templates);
//! - `best_class.json` and the `best-class` figure: the class with the best test F1 and the ten
//!   classes its test images get the most probability on average (the paper's Fig. 5);
//! - when the training logged held-out metrics (`eval_every`), `curve.csv` (its evaluated
//!   epochs, see [`crate::artifacts::curve`]) and the `training-curve` figure.

use crate::artifacts::{
    csv_field, Calibrated, Curve, CurvePoint, Dataset, Evaluation, Kind, TrainedModel,
};
use crate::context::{Context, Input};
use crate::error::{Result, StageError};
use crate::params::{self, at_least, RangeError};
use crate::science::calibration::Temperature;
use crate::science::figures::{self, ClassBars, ConfidenceHistogram, Plot, Reliability, Series};
use crate::science::metrics::{self, Metrics};
use arrow::array::{ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, UInt32Array};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Field, Schema};
use engine::inference::Inference;
use engine::json;
use engine::models::Model;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// Parameters of an `evaluate` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", default, deny_unknown_fields)]
pub struct Params {
    /// Confidence bins of the ECE, MCE, adaptive ECE, classwise ECE and UCE.
    pub bins: usize,
    /// Images per inference batch.
    pub batch_size: usize,
    /// Average this many Monte-Carlo dropout passes (0: one deterministic pass); the model
    /// must have dropout ("MCDO-S").
    pub mc_samples: usize,
    /// Seed of the Monte-Carlo dropout masks (default: the model's training seed).
    pub seed: Option<u64>,
    /// The three classes of the penultimate-layer projection (default: 0, 1, 2).
    pub projection_classes: Option<[usize; 3]>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            bins: 10,
            batch_size: 256,
            mc_samples: 0,
            seed: None,
            projection_classes: None,
        }
    }
}

params::stage_params! {
    Params,
    omitted: [
        "mc_samples",
        "seed",
        "projection_classes",
    ],
}

impl Params {
    /// `projection_classes = [0, 1, 2]` is the default written out: the same stage as without
    /// the key, not a stale one.
    pub fn resolve(&mut self) {
        if self.projection_classes == Some([0, 1, 2]) {
            self.projection_classes = None;
        }
    }

    /// Checks value ranges that the types alone do not.
    pub fn validate(&self) -> Result<(), RangeError> {
        at_least("bins", self.bins, 1)?;
        if let Some([a, b, c]) = self.projection_classes {
            if a == b || b == c || a == c {
                return Err((
                    "projection_classes",
                    format!("must name three different classes, found [{a}, {b}, {c}]"),
                ));
            }
        }
        at_least("batch_size", self.batch_size, 1)
    }
}

/// Header of `metrics.csv` (the first nine columns are those of earlier versions; new columns
/// are appended). `brier` is summed over classes, `brier_top_label` is the paper's.
pub const CSV_HEADER: &str = "stage,model,method,seed,n,accuracy,ece,nll,brier,top5,mce,adaptive_ece,classwise_ece,uce,brier_top_label";

fn csv_row(stage: &str, model: &str, method: &str, seed: u64, m: &Metrics) -> String {
    format!(
        "{},{},{},{seed},{},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6}\n",
        csv_field(stage),
        csv_field(model),
        csv_field(method),
        m.n,
        m.accuracy,
        m.ece,
        m.nll,
        m.brier,
        m.top5,
        m.mce,
        m.adaptive_ece,
        m.classwise_ece,
        m.uce,
        m.brier_top_label
    )
}

/// softmax(logits / t) of `N × K` logits, in f64.
fn softmax_rows(logits: &[f32], k: usize, t: f64) -> Vec<f32> {
    logits
        .chunks_exact(k)
        .flat_map(|row| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let e: Vec<f64> = row.iter().map(|&v| ((v as f64 - max) / t).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(move |v| (v / sum) as f32)
        })
        .collect()
}

/// Writes `predictions.parquet` atomically.
fn write_predictions(
    path: &Path,
    k: usize,
    labels: &[u32],
    probs: &[f32],
    logits: Option<&[f32]>,
) -> Result<()> {
    let vector = |nullable| {
        Field::new(
            "x",
            DataType::FixedSizeList(
                Arc::new(Field::new("item", DataType::Float32, false)),
                k as i32,
            ),
            nullable,
        )
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("index", DataType::UInt32, false),
        Field::new("label", DataType::UInt32, false),
        vector(false).with_name("probs"),
        vector(true).with_name("logits"),
    ]));
    let n = labels.len();
    let list = |values: Vec<f32>, nulls: Option<NullBuffer>| -> Result<ArrayRef> {
        Ok(Arc::new(
            FixedSizeListArray::try_new(
                Arc::new(Field::new("item", DataType::Float32, false)),
                k as i32,
                Arc::new(Float32Array::from(values)),
                nulls,
            )
            .map_err(|e| StageError::invalid(path, "predictions", e.to_string()))?,
        ))
    };
    let logits = match logits {
        Some(l) => list(l.to_vec(), None)?,
        None => list(vec![0.0; n * k], Some(NullBuffer::new_null(n)))?,
    };
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(UInt32Array::from_iter_values(0..n as u32)),
            Arc::new(UInt32Array::from(labels.to_vec())),
            list(probs.to_vec(), None)?,
            logits,
        ],
    )
    .map_err(|e| StageError::invalid(path, "predictions", e.to_string()))?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(
            parquet::basic::ZstdLevel::try_new(3).expect("valid level"),
        ))
        .build();
    let to_io = |e: parquet::errors::ParquetError| std::io::Error::other(e.to_string());
    datasets::atomic::write_with(path, |w| {
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(w, schema.clone(), Some(props)).map_err(to_io)?;
        writer.write(&batch).map_err(to_io)?;
        writer.close().map_err(to_io)?;
        Ok(())
    })?;
    Ok(())
}

/// Of classes ranked best first, the 5 best and the 5 worst, none in both: of 10 classes or
/// fewer, the better half (the middle one with an odd count) and the rest.
fn best_and_worst(ranked: &[usize]) -> Vec<(usize, &'static str)> {
    let n = ranked.len();
    let best = n.div_ceil(2).min(5);
    let worst = (n - best).min(5);
    ranked[..best]
        .iter()
        .map(|&c| (c, "best"))
        .chain(ranked[n - worst..].iter().map(|&c| (c, "worst")))
        .collect()
}

/// The per-epoch training loss of the 5 best and 5 worst classes by test F1 ([`best_and_worst`]),
/// from the train stage's `class_loss.csv` (none when the file is missing or has no rows).
fn class_loss_curves(train_dir: &Path, m: &Metrics, classes: &[String]) -> Result<Vec<Series>> {
    let path = train_dir.join("class_loss.csv");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(Vec::new());
    };
    let k = m.classes.len();
    let mut curves: Vec<Vec<(f64, f64)>> = vec![Vec::new(); k];
    for (line_no, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let parsed = (f.len() == 3)
            .then(|| {
                Some((
                    f[0].parse::<f64>().ok()?,
                    f[1].parse::<usize>().ok()?,
                    f[2].parse::<f64>().ok()?,
                ))
            })
            .flatten();
        let Some((epoch, class, loss)) = parsed.filter(|p| p.1 < k) else {
            return Err(StageError::invalid(
                &path,
                format!("line {}", line_no + 1),
                format!("`{line}`: expected epoch,class,loss with a class below {k}"),
            ));
        };
        curves[class].push((epoch, loss));
    }
    let mut ranked: Vec<usize> = (0..k).filter(|&c| m.classes[c].f1.is_finite()).collect();
    ranked.sort_by(|&a, &b| m.classes[b].f1.total_cmp(&m.classes[a].f1).then(a.cmp(&b)));
    Ok(best_and_worst(&ranked)
        .into_iter()
        .map(|(c, which)| Series {
            marker: None,
            label: format!(
                "{} ({which}, F1 {:.2})",
                classes.get(c).cloned().unwrap_or_else(|| c.to_string()),
                m.classes[c].f1
            ),
            points: curves[c].clone(),
        })
        .collect())
}

/// Coordinates of penultimate activations `x` (N × D) on the plane through the three class
/// templates `w` (3 × D) (Müller et al. 2019): an orthonormal basis (e1, e2) of the plane from
/// Gram–Schmidt on (w1 − w0, w2 − w0), and each point's ((x − c)·e1, (x − c)·e2) with c the
/// templates' centroid.
pub fn plane_projection(x: &[f32], w: &[f32], d: usize) -> Vec<(f64, f64)> {
    let row = |v: &[f32], i: usize| -> Vec<f64> {
        v[i * d..(i + 1) * d].iter().map(|&a| a as f64).collect()
    };
    let (w0, w1, w2) = (row(w, 0), row(w, 1), row(w, 2));
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let sub = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<f64>>();
    let unit = |a: Vec<f64>| {
        let n = dot(&a, &a).sqrt().max(1e-12);
        a.into_iter().map(|v| v / n).collect::<Vec<f64>>()
    };
    let e1 = unit(sub(&w1, &w0));
    let u = sub(&w2, &w0);
    let along = dot(&u, &e1);
    let e2 = unit(u.iter().zip(&e1).map(|(a, b)| a - along * b).collect());
    let c: Vec<f64> = (0..d).map(|j| (w0[j] + w1[j] + w2[j]) / 3.0).collect();
    (0..x.len() / d)
        .map(|i| {
            let p = sub(&row(x, i), &c);
            (dot(&p, &e1), dot(&p, &e2))
        })
        .collect()
}

/// Runs an `evaluate` stage: predictions and metrics, the files that hold them, figures.
pub fn run(ctx: &Context, p: &Params) -> Result<Vec<String>> {
    if p.bins == 0 {
        return Err(StageError::config(format!(
            "{}: bins must be at least 1",
            ctx.name
        )));
    }
    let data = Dataset::open(&ctx.input(Kind::Prepare).dir)?;
    let device = ctx.device.open()?;
    let input = ctx.model_input();
    let k = data.info.classes.len();
    // Checked before the evaluation rather than at its end, where the projection is drawn.
    if let Some(bad) = p.projection_classes.iter().flatten().find(|&&c| c >= k) {
        return Err(StageError::config(format!(
            "{}: projection_classes names class {bad}, the dataset has {k}",
            ctx.name
        )));
    }
    let (meta, model) = TrainedModel::load(&input.dir, &device, k)?;
    let inference = Inference {
        model: &model,
        device: &device,
        normalize: meta.normalize(&data.info.normalize),
        view: meta
            .eval_view(&data.info)
            .map_err(|e| StageError::config(format!("{}: {e}", ctx.name)))?,
        batch_size: p.batch_size,
        temperature: 1.0,
        workers: ctx.threads,
        progress: ctx,
    };
    let labels = data.test.labels();
    let chosen = (k >= 3).then(|| p.projection_classes.unwrap_or([0, 1, 2]));
    let Evaluated {
        e,
        probs,
        logits,
        features,
    } = evaluate(ctx, p, &data, input, &meta, &inference, chosen)?;
    let mut outputs = write_tables(ctx, &e, &labels, &probs, logits.as_deref())?;
    outputs.extend(reliability_figures(ctx, &e, &input.dir)?);
    outputs.extend(training_curve(ctx, &e, &input.dir)?);
    outputs.extend(best_class(ctx, &e, &probs, &labels)?);
    if let Some(chosen) = chosen {
        let features = match features {
            Some(f) => f,
            None => class_features(&model, &inference, &data, chosen)?,
        };
        outputs.extend(projection(ctx, &e, &model, chosen, &features)?);
    }
    write_summary(ctx, p, &e)?;
    outputs.push("metrics.md".into());
    let m = &e.metrics;
    tracing::info!(
        "{}: {} accuracy {:.2}% ECE {:.2}% UCE {:.2}% NLL {:.4} Brier (sum) {:.4} Brier (top label) {:.4}",
        ctx.name,
        e.model_stage,
        100.0 * m.accuracy,
        100.0 * m.ece,
        100.0 * m.uce,
        m.nll,
        m.brier,
        m.brier_top_label
    );
    Ok(outputs)
}

/// The model's test-split probabilities (and logits, without MC dropout) and their metrics,
/// also after temperature scaling when the model has a fitted temperature.
fn evaluate(
    ctx: &Context,
    p: &Params,
    data: &Dataset,
    input: &Input,
    meta: &TrainedModel,
    inference: &Inference,
    chosen: Option<[usize; 3]>,
) -> Result<Evaluated> {
    let k = data.info.classes.len();
    let labels = data.test.labels();
    let mut variant = meta.variant.clone();
    let (probs, logits, features) = if p.mc_samples > 0 {
        if meta.spec.dropout == 0.0 {
            return Err(StageError::config(format!(
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
        let mc = inference.predict_mc(&data.test, p.mc_samples, seed, "evaluating (MC dropout)")?;
        (mc.mean, None, None)
    } else {
        let (logits, features) = logits_and_features(inference, data, chosen)?;
        (softmax_rows(&logits, k, 1.0), Some(logits), features)
    };
    // A NaN would pass as a finite NLL (its floor) and an arbitrary argmax: refused by name.
    if let Some(i) = probs.iter().position(|v| !v.is_finite()) {
        return Err(StageError::invalid(
            input.dir.join("model.safetensors"),
            format!("test image {} (class {})", i / k, i % k),
            "the model's output is not finite (NaN or infinite): it cannot be evaluated",
        ));
    }
    let m = metrics::compute(&probs, &labels, k, p.bins);
    let temperature_file = input.dir.join("temperature.json");
    let calibrated = match (&logits, temperature_file.exists()) {
        (Some(logits), true) => {
            let t: Temperature = json::read(&temperature_file)?;
            let probs = softmax_rows(logits, k, t.temperature);
            Some(Calibrated {
                temperature: t.temperature,
                metrics: metrics::compute(&probs, &labels, k, p.bins),
            })
        }
        _ => None,
    };
    let e = Evaluation {
        model_stage: input.name.clone(),
        model: meta.spec.arch.clone(),
        method: meta.method_name().into(),
        variant,
        seed: meta.seed,
        metrics: m,
        calibrated,
        classes: data.info.classes.clone(),
        parameters: inference.model.parameter_count(),
        stage: ctx.name.clone(),
    };
    Ok(Evaluated {
        e,
        probs,
        logits,
        features,
    })
}

/// What the evaluation's pass gives: its metrics, the probabilities, the logits (none under
/// Monte-Carlo dropout) and the projection's features when they came with it.
struct Evaluated {
    e: Evaluation,
    probs: Vec<f32>,
    logits: Option<Vec<f32>>,
    features: Option<ClassFeatures>,
}

/// The penultimate activations of the test images of three classes, in test order: their
/// (index, label) and `D` values each.
struct ClassFeatures {
    d: usize,
    samples: Vec<(u32, u32)>,
    values: Vec<f32>,
}

impl ClassFeatures {
    fn new(d: usize) -> Self {
        ClassFeatures {
            d,
            samples: Vec::new(),
            values: Vec::new(),
        }
    }

    /// Keeps the rows of `batch` whose label is one of `chosen` from its features `all`
    /// (`batch.len() × D`).
    fn keep(&mut self, batch: &datasets::Batch, all: &[f32], chosen: [usize; 3]) {
        for j in 0..batch.len() {
            if chosen.contains(&(batch.labels[j] as usize)) {
                self.samples.push((batch.indices[j], batch.labels[j]));
                self.values
                    .extend_from_slice(&all[j * self.d..(j + 1) * self.d]);
            }
        }
    }
}

/// The logits of every test image (eval mode), and with `chosen` the features of those
/// classes' images, from one pass: the logits are the classifier's on the same features, so
/// bit for bit what [`Inference::logits`] gives.
fn logits_and_features(
    inference: &Inference,
    data: &Dataset,
    chosen: Option<[usize; 3]>,
) -> Result<(Vec<f32>, Option<ClassFeatures>)> {
    let net = &inference.model.net;
    let d = net.classifier_weight().dim(1)?;
    let mut logits = Vec::with_capacity(data.test.len() * data.info.classes.len());
    let mut kept = chosen.map(|_| ClassFeatures::new(d));
    inference.for_each_batch(&data.test, "evaluating", |batch, x| {
        let features = net.features_t(x, false)?;
        let l = net.head_with_dropout(&features, None)?;
        logits.extend(l.flatten_all()?.to_vec1::<f32>()?);
        if let (Some(kept), Some(chosen)) = (kept.as_mut(), chosen) {
            kept.keep(batch, &features.flatten_all()?.to_vec1::<f32>()?, chosen);
        }
        Ok(())
    })?;
    Ok((logits, kept))
}

/// The features of the `chosen` classes' test images, in a pass of their own (an evaluation by
/// Monte-Carlo dropout computes no plain features).
fn class_features(
    model: &Model,
    inference: &Inference,
    data: &Dataset,
    chosen: [usize; 3],
) -> Result<ClassFeatures> {
    let net = &model.net;
    let mut kept = ClassFeatures::new(net.classifier_weight().dim(1)?);
    inference.for_each_batch(&data.test, "projecting", |batch, x| {
        let all = net.features_t(x, false)?.flatten_all()?.to_vec1::<f32>()?;
        kept.keep(batch, &all, chosen);
        Ok(())
    })?;
    Ok(kept)
}

/// `predictions.parquet`, `metrics.json`, `metrics.csv` and `class_metrics.csv`.
fn write_tables(
    ctx: &Context,
    e: &Evaluation,
    labels: &[u32],
    probs: &[f32],
    logits: Option<&[f32]>,
) -> Result<Vec<String>> {
    let k = e.classes.len();
    write_predictions(
        &ctx.dir.join("predictions.parquet"),
        k,
        labels,
        probs,
        logits,
    )?;
    json::write(&ctx.dir.join("metrics.json"), e)?;
    let m = &e.metrics;
    let mut csv = format!("{CSV_HEADER}\n");
    csv.push_str(&csv_row(&e.model_stage, &e.model, &e.label(), e.seed, m));
    if let Some(c) = &e.calibrated {
        let label = format!("{} + TS", e.label());
        csv.push_str(&csv_row(
            &e.model_stage,
            &e.model,
            &label,
            e.seed,
            &c.metrics,
        ));
    }
    datasets::atomic::write_bytes(&ctx.dir.join("metrics.csv"), csv.as_bytes())?;
    let mut class_csv = String::from("class,name,support,precision,recall,f1,confidence\n");
    for (c, s) in m.classes.iter().enumerate() {
        class_csv.push_str(&format!(
            "{c},{},{},{},{},{},{}\n",
            csv_field(&e.classes[c]),
            s.support,
            fixed(s.precision, 6),
            fixed(s.recall, 6),
            fixed(s.f1, 6),
            fixed(s.confidence, 6)
        ));
    }
    datasets::atomic::write_bytes(&ctx.dir.join("class_metrics.csv"), class_csv.as_bytes())?;
    Ok([
        "predictions.parquet",
        "metrics.json",
        "metrics.csv",
        "class_metrics.csv",
    ]
    .map(String::from)
    .to_vec())
}

/// `v` with `digits` decimals; empty when undefined (a class with no test sample has no recall,
/// F1 or confidence).
fn fixed(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        String::new()
    }
}

/// The reliability diagram (also after temperature scaling), the confidence histogram and the
/// class-loss curves.
fn reliability_figures(ctx: &Context, e: &Evaluation, train_dir: &Path) -> Result<Vec<String>> {
    let m = &e.metrics;
    let title = format!(
        "{} — accuracy {:.2}%, ECE {:.2}%",
        e.model_stage,
        100.0 * m.accuracy,
        100.0 * m.ece
    );
    let mut out = figures::save(
        &Reliability {
            title: title.clone(),
            bins: &m.bins,
        },
        &ctx.dir,
        "reliability",
        (640, 520),
    )?;
    if let Some(c) = &e.calibrated {
        out.extend(figures::save(
            &Reliability {
                title: format!(
                    "{} + TS (T = {:.3}) — accuracy {:.2}%, ECE {:.2}%",
                    e.model_stage,
                    c.temperature,
                    100.0 * c.metrics.accuracy,
                    100.0 * c.metrics.ece
                ),
                bins: &c.metrics.bins,
            },
            &ctx.dir,
            "reliability-ts",
            (640, 520),
        )?);
    }
    out.extend(figures::save(
        &ConfidenceHistogram {
            title: format!("{} — confidence", e.model_stage),
            bins: &m.bins,
            accuracy: m.accuracy,
        },
        &ctx.dir,
        "confidence",
        (640, 420),
    )?);
    let curves = class_loss_curves(train_dir, m, &e.classes)?;
    if !curves.is_empty() {
        out.extend(figures::save(
            &Plot {
                title: format!(
                    "{} — training loss of the best and worst classes by test F1",
                    e.model_stage
                ),
                x: "epoch".into(),
                y: "mean training loss".into(),
                series: curves,
                lines: true,
                square: false,
            },
            &ctx.dir,
            "class-loss",
            (760, 520),
        )?);
    }
    Ok(out)
}

/// `curve.csv` and the `training-curve` figure, when the model's training logged held-out
/// metrics (`eval_every`): held-out accuracy, ECE and NLL by epoch, beside the training
/// accuracy and loss (nothing for an imported model or a training without `eval_every`).
fn training_curve(ctx: &Context, e: &Evaluation, train_dir: &Path) -> Result<Vec<String>> {
    let Some(curve) = Curve::read(&train_dir.join("train_log.csv"))? else {
        return Ok(Vec::new());
    };
    curve.write(&ctx.dir.join("curve.csv"))?;
    let line = |label: &str, f: fn(&CurvePoint) -> f64| Series {
        marker: None,
        label: label.into(),
        points: curve
            .points
            .iter()
            .map(|p| (p.epoch as f64, f(p)))
            .collect(),
    };
    let split = curve.split.as_str();
    let panels = figures::curve_panels(
        format!("{} — during training", e.model_stage),
        split,
        vec![
            line("training", |p| 100.0 * p.accuracy),
            line(split, |p| 100.0 * p.held_out_accuracy),
        ],
        vec![line(split, |p| 100.0 * p.ece)],
        vec![line("training loss", |p| p.loss), line(split, |p| p.nll)],
        true,
    );
    let mut out = vec!["curve.csv".to_string()];
    out.extend(figures::save(
        &panels,
        &ctx.dir,
        "training-curve",
        (1200, 420),
    )?);
    Ok(out)
}

/// The number of classes [`best_class`] shows, as the paper's Fig. 5.
pub const BEST_CLASS_TOP: usize = 10;

/// `best_class.json` and the `best-class` figure: the class with the best test F1 and the
/// classes its test images get the most probability on average (the paper's Fig. 5); nothing
/// when no class has a test image.
fn best_class(ctx: &Context, e: &Evaluation, probs: &[f32], labels: &[u32]) -> Result<Vec<String>> {
    let Some(best) = metrics::best_class(probs, labels, &e.metrics.classes, BEST_CLASS_TOP) else {
        return Ok(Vec::new());
    };
    json::write(&ctx.dir.join("best_class.json"), &best)?;
    let name = e.classes.get(best.class).cloned().unwrap_or_default();
    let bars = ClassBars::of_best(
        format!(
            "{} (accuracy {:.2}%): mean output on `{name}` (F1 {:.2})",
            e.model_stage,
            100.0 * e.metrics.accuracy,
            best.f1
        ),
        &best,
        &e.classes,
    );
    let mut out = vec!["best_class.json".to_string()];
    out.extend(figures::save(&bars, &ctx.dir, "best-class", (560, 420))?);
    Ok(out)
}

/// `projection.csv` and figure: the penultimate activations of three classes on the plane of
/// their classifier templates.
fn projection(
    ctx: &Context,
    e: &Evaluation,
    model: &Model,
    chosen: [usize; 3],
    features: &ClassFeatures,
) -> Result<Vec<String>> {
    let net = &model.net;
    let w = net
        .classifier_weight()
        .to_dtype(candle_core::DType::F32)?
        .to_device(&candle_core::Device::Cpu)?;
    let d = w.dim(1)?;
    let w_rows: Vec<f32> = chosen
        .iter()
        .flat_map(|&c| {
            w.get(c)
                .and_then(|r| r.to_vec1::<f32>())
                .unwrap_or_default()
        })
        .collect();
    let mut series: Vec<Series> = chosen
        .iter()
        .map(|&c| Series {
            marker: None,
            label: e.classes[c].clone(),
            points: Vec::new(),
        })
        .collect();
    let mut csv = String::from("index,label,x,y\n");
    let points = plane_projection(&features.values, &w_rows, d);
    for (&(i, label), xy) in features.samples.iter().zip(points) {
        let s = chosen
            .iter()
            .position(|&c| c == label as usize)
            .expect("kept");
        series[s].points.push(xy);
        csv.push_str(&format!("{i},{label},{},{}\n", xy.0, xy.1));
    }
    datasets::atomic::write_bytes(&ctx.dir.join("projection.csv"), csv.as_bytes())?;
    let mut out = vec!["projection.csv".to_string()];
    out.extend(figures::save(
        &Plot {
            title: format!(
                "{} — penultimate layer, classes {:?}",
                e.model_stage, chosen
            ),
            x: "template plane, axis 1".into(),
            y: "template plane, axis 2".into(),
            series,
            lines: false,
            square: true,
        },
        &ctx.dir,
        "projection",
        (560, 560),
    )?);
    Ok(out)
}

/// `metrics.md`: the metrics, the calibrated ones, the figures and the per-class table.
fn write_summary(ctx: &Context, p: &Params, e: &Evaluation) -> Result<()> {
    let m = &e.metrics;
    let mut md = format!(
        "# {}: {} ({}, {}, seed {})\n\n| metric | value |\n|---|---|\n| test images | {} |\n\
         | top-1 accuracy | {:.2}% |\n| top-5 accuracy | {:.2}% |\n| ECE ({} bins) | {:.2}% |\n\
         | MCE | {:.2}% |\n| adaptive ECE | {:.2}% |\n| classwise ECE | {:.2}% |\n| UCE | {:.2}% |\n\
         | NLL | {:.4} |\n| Brier (sum over classes) | {:.4} |\n| Brier (top label, the paper's) | {:.4} |\n",
        ctx.name,
        e.model_stage,
        e.model,
        e.label(),
        e.seed,
        m.n,
        100.0 * m.accuracy,
        100.0 * m.top5,
        p.bins,
        100.0 * m.ece,
        100.0 * m.mce,
        100.0 * m.adaptive_ece,
        100.0 * m.classwise_ece,
        100.0 * m.uce,
        m.nll,
        m.brier,
        m.brier_top_label
    );
    if let Some(c) = &e.calibrated {
        md.push_str(&format!(
            "\nAfter temperature scaling (T = {:.4}, fitted on the validation split): accuracy {:.2}%, ECE {:.2}%, UCE {:.2}%, NLL {:.4}, Brier (sum) {:.4}, Brier (top label) {:.4}.\n",
            c.temperature,
            100.0 * c.metrics.accuracy,
            100.0 * c.metrics.ece,
            100.0 * c.metrics.uce,
            c.metrics.nll,
            c.metrics.brier,
            c.metrics.brier_top_label
        ));
    }
    md.push_str(
        "\n![reliability diagram](reliability.png)\n\n![confidence histogram](confidence.png)\n",
    );
    if ctx.dir.join("best-class.png").exists() {
        md.push_str("\n![mean output on the best class](best-class.png)\n");
    }
    md.push_str("\n| class | name | support | precision | recall | F1 | mean true-class confidence |\n|---|---|---|---|---|---|---|\n");
    for (c, s) in m.classes.iter().enumerate() {
        md.push_str(&format!(
            "| {c} | {} | {} | {} | {} | {} | {} |\n",
            e.classes[c],
            s.support,
            fixed(s.precision, 4),
            fixed(s.recall, 4),
            fixed(s.f1, 4),
            fixed(s.confidence, 4)
        ));
    }
    datasets::atomic::write_bytes(&ctx.dir.join("metrics.md"), md.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_and_worst_classes_never_overlap() {
        let names = |v: Vec<(usize, &str)>| {
            v.into_iter()
                .map(|(c, w)| format!("{c}{w}"))
                .collect::<Vec<_>>()
        };
        // 12 classes: 5 and 5, the middle two left out.
        let twelve: Vec<usize> = (0..12).collect();
        let chosen = best_and_worst(&twelve);
        assert_eq!(chosen.len(), 10);
        assert_eq!(chosen[4], (4, "best"));
        assert_eq!(chosen[5], (7, "worst"));
        // 3 classes: 2 best, 1 worst; 1 class: best only.
        assert_eq!(
            names(best_and_worst(&[2, 0, 1])),
            ["2best", "0best", "1worst"]
        );
        assert_eq!(names(best_and_worst(&[0])), ["0best"]);
        assert!(best_and_worst(&[]).is_empty());
    }

    #[test]
    fn the_projection_plane_passes_through_the_templates() {
        // D = 3: templates at (1,0,0), (0,1,0), (0,0,1). Their centroid projects to (0, 0);
        // e1 = (−1, 1, 0)/√2; the templates are an equilateral triangle of side √2, so each sits
        // at distance √(2/3) from the centroid, and a point off the plane along the normal
        // (1,1,1) projects onto the centroid.
        let w = [1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        let c = 1.0f32 / 3.0;
        let x = [1.0f32, 0.0, 0.0, c + 5.0, c + 5.0, c + 5.0];
        let p = plane_projection(&x, &w, 3);
        let r = (p[0].0.powi(2) + p[0].1.powi(2)).sqrt();
        assert!((r - (2.0f64 / 3.0).sqrt()).abs() < 1e-6, "{p:?}");
        assert!(p[1].0.abs() < 1e-6 && p[1].1.abs() < 1e-6, "{p:?}");
        // Template 0 lies along −e1 from the centroid: x = (1,0,0) − c projects to −1/√2.
        assert!((p[0].0 + 1.0 / 2f64.sqrt()).abs() < 1e-6, "{p:?}");
    }
}
