//! The `report` stage: gathers the evaluations it needs (typically a grid) into the paper's
//! tables and figures:
//!
//! - `table.md` / `table.csv`: one row per method, one column per model, cells
//!   "accuracy ± std / ECE" over seeds (the paper's Tables 1–3);
//! - `report.md` / `report.csv`: the long table, one row per (method, model), every metric as
//!   mean ± std (the supplement's Table 7), with the paper table above it in report.md;
//! - figures (PNG and SVG): `accuracy-vs-ece` (every model, Fig. 10) and `f1-vs-confidence`
//!   (per class, Fig. 4);
//! - `index.html`: one static page with the tables, these figures and every evaluated model's
//!   reliability diagram, confidence histogram, class-loss curves and projection (linked from
//!   the evaluate stages' folders beside this one).
//!
//! A temperature-scaled model gives two rows: as trained, and `<method> + TS`.

use crate::artifacts::{Evaluation, Kind};
use crate::context::Context;
use crate::error::Result;
use crate::science::figures::{self, Plot, Series};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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

/// The evaluations of one (method, model) cell of the tables, one per seed.
#[derive(Debug, Clone)]
pub struct Group {
    /// Row label: the method (with its variant, `+ TS` for calibrated metrics).
    pub method: String,
    /// Column: the model.
    pub model: String,
    /// One evaluation per seed.
    pub evals: Vec<Evaluation>,
}

/// Groups evaluations by (method label, model), in first-seen order; a calibrated evaluation
/// also makes a `+ TS` group.
pub fn group(evals: &[Evaluation]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for e in evals {
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
            match groups
                .iter_mut()
                .find(|g| g.method == label && g.model == e.model)
            {
                Some(g) => g.evals.push(e),
                None => groups.push(Group {
                    method: label,
                    model: e.model.clone(),
                    evals: vec![e],
                }),
            }
        }
    }
    groups
}

impl Group {
    fn stat(&self, f: impl Fn(&Evaluation) -> f64) -> (f64, f64) {
        mean_std(&self.evals.iter().map(f).collect::<Vec<_>>())
    }
    /// "acc ± std / ECE" as in the paper's tables: accuracy in %, ECE as a fraction.
    pub fn paper_cell(&self) -> String {
        let (a, s) = self.stat(|e| 100.0 * e.metrics.accuracy);
        let (ece, _) = self.stat(|e| e.metrics.ece);
        format!("{a:.2} ± {s:.2} / {ece:.3}")
    }
}

/// The paper-style table: rows methods, columns models; Markdown and CSV.
pub fn paper_table(groups: &[Group]) -> (String, String) {
    let mut methods: Vec<&str> = Vec::new();
    let mut models: Vec<&str> = Vec::new();
    for g in groups {
        if !methods.contains(&g.method.as_str()) {
            methods.push(&g.method);
        }
        if !models.contains(&g.model.as_str()) {
            models.push(&g.model);
        }
    }
    let mut md = format!(
        "| method | {} |\n|---|{}\n",
        models.join(" | "),
        "---|".repeat(models.len())
    );
    let mut csv = format!("method,{}\n", models.join(","));
    for m in &methods {
        let cells: Vec<String> = models
            .iter()
            .map(|model| {
                groups
                    .iter()
                    .find(|g| g.method == *m && g.model == *model)
                    .map_or("–".into(), Group::paper_cell)
            })
            .collect();
        md.push_str(&format!("| {m} | {} |\n", cells.join(" | ")));
        csv.push_str(&format!("{m},{}\n", cells.join(",")));
    }
    (md, csv)
}

type Metric = (&'static str, fn(&Evaluation) -> f64, f64, usize);

/// The long table's metrics: name, value, scale (100 for %), decimals.
const LONG: [Metric; 10] = [
    ("accuracy", |e| e.metrics.accuracy, 100.0, 2),
    ("top-5", |e| e.metrics.top5, 100.0, 2),
    ("ECE", |e| e.metrics.ece, 100.0, 2),
    ("MCE", |e| e.metrics.mce, 100.0, 2),
    ("adaptive ECE", |e| e.metrics.adaptive_ece, 100.0, 2),
    ("classwise ECE", |e| e.metrics.classwise_ece, 100.0, 2),
    ("UCE", |e| e.metrics.uce, 100.0, 2),
    ("NLL", |e| e.metrics.nll, 1.0, 4),
    ("Brier", |e| e.metrics.brier, 1.0, 4),
    ("n", |e| e.metrics.n as f64, 1.0, 0),
];

/// The long table: one row per (method, model), every metric as mean ± std; Markdown and CSV.
pub fn long_table(groups: &[Group]) -> (String, String) {
    let shown = &LONG[..9];
    let mut md = format!(
        "| method | model | seeds | {} |\n|---|---|---|{}\n",
        shown.iter().map(|m| m.0).collect::<Vec<_>>().join(" | "),
        "---|".repeat(shown.len())
    );
    let mut csv = String::from("method,model,seeds");
    for (name, ..) in shown {
        let key = name.to_lowercase().replace([' ', '-'], "_");
        csv.push_str(&format!(",{key}_mean,{key}_std"));
    }
    csv.push('\n');
    for g in groups {
        let mut cells = Vec::new();
        let mut values = Vec::new();
        for (_, f, scale, digits) in shown {
            let (mean, std) = g.stat(|e| f(e) * scale);
            cells.push(format!("{mean:.digits$} ± {std:.digits$}"));
            values.push(format!("{mean:.6},{std:.6}"));
        }
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            g.method,
            g.model,
            g.evals.len(),
            cells.join(" | ")
        ));
        csv.push_str(&format!(
            "{},{},{},{}\n",
            g.method,
            g.model,
            g.evals.len(),
            values.join(",")
        ));
    }
    (md, csv)
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A Markdown table (as written by this module) as an HTML table.
fn html_table(md: &str) -> String {
    let mut out = String::from("<table>\n");
    for (i, line) in md.lines().enumerate() {
        if i == 1 {
            continue;
        }
        let tag = if i == 0 { "th" } else { "td" };
        let cells: Vec<String> = line
            .trim_matches('|')
            .split(" | ")
            .map(|c| format!("<{tag}>{}</{tag}>", html_escape(c.trim())))
            .collect();
        out.push_str(&format!("<tr>{}</tr>\n", cells.join("")));
    }
    out.push_str("</table>\n");
    out
}

/// Runs a `report` stage: the tables, the figures over every evaluation, and `index.html`.
pub fn run(ctx: &Context, p: &Params) -> Result<Vec<String>> {
    let mut evals = Vec::new();
    let mut stages = Vec::new();
    for input in ctx.inputs_of(Kind::Evaluate) {
        let e: Evaluation = engine::json::read(&input.dir.join("metrics.json"))?;
        stages.push((input.name.clone(), input.dir.clone(), e.clone()));
        evals.push(e);
    }
    let groups = group(&evals);
    let title = p.title.clone().unwrap_or_else(|| ctx.name.clone());
    let bins = evals.first().map_or(10, |e| e.metrics.bins.len());
    let (paper_md, paper_csv) = paper_table(&groups);
    let (long_md, long_csv) = long_table(&groups);
    let conventions = format!(
        "Test split; mean ± standard deviation over seeds (sample std; ± 0 for one seed). \
         Accuracy and calibration errors in %, with {bins} equal-width bins (adaptive ECE: {bins} \
         equal-mass bins); NLL in nats; Brier summed over classes. Conventions: docs/metrics.md."
    );
    let md = format!(
        "# {title}\n\n## Accuracy (%) ± std / ECE, per method and model\n\n{paper_md}\n\
         ## Every metric\n\n{conventions}\n\n{long_md}\n\
         ![accuracy against ECE](accuracy-vs-ece.png)\n\n![per-class F1 against confidence](f1-vs-confidence.png)\n"
    );
    let mut outputs = Vec::new();
    for (name, text) in [
        ("report.md", md.as_str()),
        ("report.csv", long_csv.as_str()),
        ("table.md", paper_md.as_str()),
        ("table.csv", paper_csv.as_str()),
    ] {
        datasets::atomic::write_bytes(&ctx.dir.join(name), text.as_bytes())?;
        outputs.push(name.to_string());
    }
    outputs.extend(figures_of(ctx, &title, &groups)?);
    let html = index_html(&title, &paper_md, &long_md, &conventions, &stages);
    datasets::atomic::write_bytes(&ctx.dir.join("index.html"), html.as_bytes())?;
    outputs.push("index.html".into());
    Ok(outputs)
}

/// `accuracy-vs-ece` (one point per evaluated model, one series per method) and
/// `f1-vs-confidence` (per class, one series per (method, model) group, each class averaged
/// over the group's seeds).
fn figures_of(ctx: &Context, title: &str, groups: &[Group]) -> Result<Vec<String>> {
    let mut scatter: Vec<Series> = Vec::new();
    for g in groups {
        let s = match scatter.iter_mut().find(|s| s.label == g.method) {
            Some(s) => s,
            None => {
                scatter.push(Series {
                    label: g.method.clone(),
                    points: Vec::new(),
                });
                scatter.last_mut().expect("pushed")
            }
        };
        s.points.extend(
            g.evals
                .iter()
                .map(|e| (100.0 * e.metrics.accuracy, 100.0 * e.metrics.ece)),
        );
    }
    let mut outputs = figures::save(
        &Plot {
            title: format!("{title}: accuracy against ECE"),
            x: "accuracy (%)".into(),
            y: "ECE (%)".into(),
            series: scatter,
            lines: false,
            square: false,
        },
        &ctx.dir,
        "accuracy-vs-ece",
        (760, 560),
    )?;
    let f1: Vec<Series> = groups
        .iter()
        .map(|g| {
            let k = g.evals[0].metrics.classes.len();
            let points = (0..k)
                .map(|c| {
                    let (conf, _) =
                        g.stat(|e| e.metrics.classes.get(c).map_or(f64::NAN, |s| s.confidence));
                    let (f, _) = g.stat(|e| e.metrics.classes.get(c).map_or(f64::NAN, |s| s.f1));
                    (conf, f)
                })
                .collect();
            Series {
                label: format!("{} / {}", g.method, g.model),
                points,
            }
        })
        .collect();
    outputs.extend(figures::save(
        &Plot {
            title: format!("{title}: per-class F1 against mean true-class confidence"),
            x: "mean confidence of the true class".into(),
            y: "F1".into(),
            series: f1,
            lines: false,
            square: false,
        },
        &ctx.dir,
        "f1-vs-confidence",
        (760, 560),
    )?);
    Ok(outputs)
}

/// `index.html`: everything on one static page; model figures are linked from the evaluate
/// stages' folders, siblings of this one.
fn index_html(
    title: &str,
    paper_md: &str,
    long_md: &str,
    conventions: &str,
    stages: &[(String, PathBuf, Evaluation)],
) -> String {
    let mut html = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>\
         body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;margin:1em 0}}\
         td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}\
         img{{max-width:48%;margin:4px;border:1px solid #eee}}section{{margin-top:2em}}</style></head><body>\n\
         <h1>{t}</h1>\n<h2>Accuracy (%) ± std / ECE</h2>\n{}\n<h2>Every metric</h2>\n<p>{}</p>\n{}\n\
         <h2>Figures</h2>\n<img src=\"accuracy-vs-ece.svg\" alt=\"accuracy against ECE\">\
         <img src=\"f1-vs-confidence.svg\" alt=\"per-class F1 against confidence\">\n",
        html_table(paper_md),
        html_escape(conventions),
        html_table(long_md),
        t = html_escape(title)
    );
    for (name, dir, e) in stages {
        html.push_str(&format!(
            "<section><h3>{} — {} ({}, {}, seed {})</h3>\n",
            html_escape(name),
            html_escape(&e.model_stage),
            html_escape(&e.model),
            html_escape(&e.label()),
            e.seed
        ));
        for fig in [
            "reliability",
            "reliability-ts",
            "confidence",
            "class-loss",
            "projection",
        ] {
            if dir.join(format!("{fig}.svg")).exists() {
                html.push_str(&format!(
                    "<img src=\"../{}/{fig}.svg\" alt=\"{fig}\">",
                    html_escape(name)
                ));
            }
        }
        html.push_str("\n</section>\n");
    }
    html.push_str("</body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::science::metrics::compute;

    #[test]
    fn mean_and_sample_std() {
        // mean of (1, 2, 3, 4) = 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; /3 → √(5/3).
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert!((m - 2.5).abs() < 1e-12);
        assert!((s - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_std(&[7.0]), (7.0, 0.0));
    }

    fn eval(method: &str, model: &str, seed: u64, probs: &[f32], labels: &[u32]) -> Evaluation {
        Evaluation {
            model_stage: format!("{method}-{model}-{seed}"),
            model: model.into(),
            method: method.into(),
            variant: String::new(),
            seed,
            metrics: compute(probs, labels, 2, 10),
            calibrated: None,
            classes: vec!["a".into(), "b".into()],
        }
    }

    #[test]
    fn tables_average_over_seeds() {
        // Seed 0: 4 samples, 3 right (accuracy 75%); seed 1: 4 right of 4 (100%).
        // Mean 87.5, sample std √((12.5² + 12.5²)/1) = 17.68.
        // ECE seed 0: all confidences 0.9 in one bin, accuracy 0.75 → 0.15; seed 1: 0.1.
        // Mean ECE 0.125.
        let p = [0.9f32, 0.1, 0.9, 0.1, 0.9, 0.1, 0.9, 0.1];
        let evals = vec![
            eval("vanilla", "resnet20", 0, &p, &[0, 0, 0, 1]),
            eval("vanilla", "resnet20", 1, &p, &[0, 0, 0, 0]),
            eval("off-ldl", "resnet56", 0, &p, &[0, 0, 0, 0]),
        ];
        let groups = group(&evals);
        assert_eq!(groups.len(), 2);
        let (md, csv) = paper_table(&groups);
        assert!(md.contains("| method | resnet20 | resnet56 |"), "{md}");
        assert!(
            md.contains("| vanilla | 87.50 ± 17.68 / 0.125 | – |"),
            "{md}"
        );
        assert!(
            md.contains("| off-ldl | – | 100.00 ± 0.00 / 0.100 |"),
            "{md}"
        );
        assert_eq!(csv.lines().count(), 3);
        let (long, long_csv) = long_table(&groups);
        assert!(
            long.contains("| vanilla | resnet20 | 2 | 87.50 ± 17.68 |"),
            "{long}"
        );
        let header: Vec<&str> = long_csv.lines().next().unwrap().split(',').collect();
        assert_eq!(header[3..5], ["accuracy_mean", "accuracy_std"]);
        assert!(header.contains(&"adaptive_ece_mean"));
        let row: Vec<&str> = long_csv.lines().nth(1).unwrap().split(',').collect();
        assert_eq!(row[3..5], ["87.500000", "17.677670"]);
    }
}
