//! The `report` stage: gathers the evaluations it needs into one table, one row per
//! (method, model), each cell the mean ± standard deviation over seeds, as `report.md` and
//! `report.csv`.

use crate::context::Context;
use crate::error::{read_json, Result};
use crate::evaluate::Evaluation;
use crate::stage::Kind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Parameters of a `report` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Title of the report (default: the stage name).
    #[serde(default)]
    pub title: Option<String>,
}

/// Mean and sample standard deviation (0 for a single value).
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Runs a `report` stage.
pub fn run(ctx: &Context, p: &Params) -> Result<Vec<String>> {
    let mut groups: BTreeMap<(String, String), Vec<Evaluation>> = BTreeMap::new();
    let mut order = Vec::new();
    for input in ctx.inputs_of(Kind::Evaluate) {
        let e: Evaluation = read_json(&input.dir.join("metrics.json"))?;
        // A temperature-scaled model gives two rows: as trained, and "+ TS".
        let mut rows = vec![(e.label(), e.clone())];
        if let Some(c) = &e.calibrated {
            rows.push((
                format!("{} + TS", e.label()),
                Evaluation {
                    metrics: c.metrics.clone(),
                    calibrated: None,
                    ..e.clone()
                },
            ));
        }
        for (label, e) in rows {
            let key = (label, e.model.clone());
            if !groups.contains_key(&key) {
                order.push(key.clone());
            }
            groups.entry(key).or_default().push(e);
        }
    }
    let title = p.title.clone().unwrap_or_else(|| ctx.name.clone());
    let bins = groups
        .values()
        .flatten()
        .map(|e| e.metrics.bins.len())
        .next()
        .unwrap_or(10);
    let mut md = format!(
        "# {title}\n\nTest split; mean ± standard deviation over seeds (sample std; ± 0 for one seed). \
         Accuracy and ECE in %, ECE with {} equal-width bins; NLL in nats; Brier summed over classes.\n\n\
         | method | model | seeds | accuracy | ECE | NLL | Brier |\n|---|---|---|---|---|---|---|\n",
        bins
    );
    let mut csv = String::from(
        "method,model,seeds,accuracy_mean,accuracy_std,ece_mean,ece_std,nll_mean,nll_std,brier_mean,brier_std\n",
    );
    for key in &order {
        let evals = &groups[key];
        let stat = |f: fn(&Evaluation) -> f64| mean_std(&evals.iter().map(f).collect::<Vec<_>>());
        let acc = stat(|e| 100.0 * e.metrics.accuracy);
        let ece = stat(|e| 100.0 * e.metrics.ece);
        let nll = stat(|e| e.metrics.nll);
        let brier = stat(|e| e.metrics.brier);
        md.push_str(&format!(
            "| {} | {} | {} | {:.2} ± {:.2} | {:.2} ± {:.2} | {:.4} ± {:.4} | {:.4} ± {:.4} |\n",
            key.0,
            key.1,
            evals.len(),
            acc.0,
            acc.1,
            ece.0,
            ece.1,
            nll.0,
            nll.1,
            brier.0,
            brier.1
        ));
        csv.push_str(&format!(
            "{},{},{},{:.4},{:.4},{:.4},{:.4},{:.6},{:.6},{:.6},{:.6}\n",
            key.0,
            key.1,
            evals.len(),
            acc.0,
            acc.1,
            ece.0,
            ece.1,
            nll.0,
            nll.1,
            brier.0,
            brier.1
        ));
    }
    datasets::atomic::write_bytes(&ctx.dir.join("report.md"), md.as_bytes())?;
    datasets::atomic::write_bytes(&ctx.dir.join("report.csv"), csv.as_bytes())?;
    Ok(vec!["report.md".into(), "report.csv".into()])
}

#[cfg(test)]
mod tests {
    use super::mean_std;

    #[test]
    fn mean_and_sample_std() {
        // mean of (1, 2, 3, 4) = 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; /3 → √(5/3).
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert!((m - 2.5).abs() < 1e-12);
        assert!((s - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_std(&[7.0]), (7.0, 0.0));
    }
}
