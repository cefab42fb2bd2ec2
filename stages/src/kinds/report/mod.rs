//! The `report` stage: gathers the evaluations it needs (typically a grid) into the paper's
//! tables and figures:
//!
//! - `table.md` / `table.csv`: one row per method, one column per model, cells
//!   "accuracy ± std / ECE" over seeds (the paper's Tables 1–3);
//! - `report.md` / `report.csv`: the long table, one row per (method, model), every metric as
//!   mean ± std (the supplement's Table 7), with the paper table above it in report.md; the
//!   CSV's columns are metrics.json's names and units (fractions), the Markdown's are in %;
//! - figures (PNG and SVG): `accuracy-vs-ece` (every model, Fig. 10) and `f1-vs-confidence`
//!   (per class, Fig. 4);
//! - `index.html`: one static page with the tables, these figures and every evaluated model's
//!   reliability diagram, confidence histogram, class-loss curves and projection (linked from
//!   the evaluate stages' folders beside this one).
//!
//! - `vanilla-difference` (Fig. 3): accuracy and ECE difference from Vanilla against the
//!   student's parameter count, one line per method.
//! - `reliability-diagrams` (Figs. 11–14): every row's and model's reliability diagram, its
//!   seeds pooled.
//! - `best-classes` (Fig. 5): for each row and model (its lowest seed), the mean output over the
//!   test images of its best class by F1.
//! - `training-curves`: every row's held-out accuracy, ECE and NLL by epoch (mean over seeds),
//!   when its trainings logged them (`eval_every`).
//!
//! A row is one distinct run, whatever its seeds ([`rows`]: how rows are told apart and named).
//! A temperature-scaled model gives two rows: as trained, and `<label> + TS`.

mod rows;

pub use rows::{group, Group};

use crate::artifacts::{csv_field, Curve, CurvePoint, Evaluation, Kind};
use crate::context::Context;
use crate::error::Result;
use crate::science::figures::{self, ClassBars, Plot, Reliability, Series};
use crate::science::metrics::{BestClass, Bin};
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

impl Group {
    fn stat(&self, f: impl Fn(&Evaluation) -> f64) -> (f64, f64) {
        mean_std(&self.evals.iter().map(f).collect::<Vec<_>>())
    }
    /// "acc ± std / ECE" as in the paper's tables: accuracy in %, ECE as a fraction; with
    /// "(n = k)" when the cell averages another number of seeds (`seeds`) than the others.
    pub fn paper_cell(&self, seeds: usize) -> String {
        let (a, s) = self.stat(|e| 100.0 * e.metrics.accuracy);
        let (ece, _) = self.stat(|e| e.metrics.ece);
        let n = self.evals.len();
        let count = if n == seeds {
            String::new()
        } else {
            format!(" (n = {n})")
        };
        format!("{a:.2} ± {s:.2} / {ece:.3}{count}")
    }
}

/// The number of seeds most cells of the report average (the largest, on a tie).
pub fn usual_seeds(groups: &[Group]) -> usize {
    let mut counts: Vec<(usize, usize)> = Vec::new();
    for g in groups {
        match counts.iter_mut().find(|(n, _)| *n == g.evals.len()) {
            Some((_, c)) => *c += 1,
            None => counts.push((g.evals.len(), 1)),
        }
    }
    counts
        .into_iter()
        .max_by_key(|&(n, c)| (c, n))
        .map_or(1, |(n, _)| n)
}

/// The paper-style table: rows methods, columns models; Markdown and CSV.
pub fn paper_table(groups: &[Group]) -> (String, String) {
    let seeds = usual_seeds(groups);
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
    let quoted: Vec<String> = models.iter().map(|m| csv_field(m)).collect();
    let mut csv = format!("method,{}\n", quoted.join(","));
    for m in &methods {
        let cells: Vec<String> = models
            .iter()
            .map(|model| {
                groups
                    .iter()
                    .find(|g| g.method == *m && g.model == *model)
                    .map_or("–".into(), |g| g.paper_cell(seeds))
            })
            .collect();
        md.push_str(&format!("| {m} | {} |\n", cells.join(" | ")));
        let cells: Vec<String> = cells.iter().map(|c| csv_field(c)).collect();
        csv.push_str(&format!("{},{}\n", csv_field(m), cells.join(",")));
    }
    (md, csv)
}

type Metric = (&'static str, fn(&Evaluation) -> f64, f64, usize);

/// The long table's metrics: name, value, scale (100 for %), decimals.
const LONG: [Metric; 11] = [
    ("accuracy", |e| e.metrics.accuracy, 100.0, 2),
    ("top-5", |e| e.metrics.top5, 100.0, 2),
    ("ECE", |e| e.metrics.ece, 100.0, 2),
    ("MCE", |e| e.metrics.mce, 100.0, 2),
    ("adaptive ECE", |e| e.metrics.adaptive_ece, 100.0, 2),
    ("classwise ECE", |e| e.metrics.classwise_ece, 100.0, 2),
    ("UCE", |e| e.metrics.uce, 100.0, 2),
    ("NLL", |e| e.metrics.nll, 1.0, 4),
    ("Brier (sum)", |e| e.metrics.brier, 1.0, 4),
    ("Brier (top label)", |e| e.metrics.brier_top_label, 1.0, 4),
    ("n", |e| e.metrics.n as f64, 1.0, 0),
];

/// The long table: one row per (method, model), every metric as mean ± std; Markdown and CSV.
pub fn long_table(groups: &[Group]) -> (String, String) {
    let shown = &LONG[..10];
    let mut md = format!(
        "| method | model | seeds | {} |\n|---|---|---|{}\n",
        shown.iter().map(|m| m.0).collect::<Vec<_>>().join(" | "),
        "---|".repeat(shown.len())
    );
    let mut csv = String::from("method,model,seeds");
    for (name, ..) in shown {
        let key = csv_key(name);
        csv.push_str(&format!(",{key}_mean,{key}_std"));
    }
    csv.push('\n');
    for g in groups {
        let mut cells = Vec::new();
        let mut values = Vec::new();
        for (_, f, scale, digits) in shown {
            // The CSV in metrics.json's units (fractions), the Markdown in %.
            let (mean, std) = g.stat(f);
            let (shown_mean, shown_std) = (mean * scale, std * scale);
            cells.push(format!("{shown_mean:.digits$} ± {shown_std:.digits$}"));
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
            csv_field(&g.method),
            csv_field(&g.model),
            g.evals.len(),
            values.join(",")
        ));
    }
    (md, csv)
}

/// The CSV column stem of a long-table metric: `Brier (sum)` → `brier`, `Brier (top label)` →
/// `brier_top_label` (the names of metrics.json), `adaptive ECE` → `adaptive_ece`.
fn csv_key(name: &str) -> String {
    match name {
        "Brier (sum)" => "brier".into(),
        "top-5" => "top5".into(),
        other => other
            .to_lowercase()
            .replace(['(', ')'], "")
            .replace([' ', '-'], "_"),
    }
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
        let mut e: Evaluation = engine::json::read(&input.dir.join("metrics.json"))?;
        e.stage = input.name.clone();
        stages.push((input.name.clone(), input.dir.clone(), e.clone()));
        evals.push((e, input.settings.clone()));
    }
    let groups = group(&evals);
    let title = p.title.clone().unwrap_or_else(|| ctx.name.clone());
    // Evaluations with other bin counts are other rows (`bins` is a setting); name them all.
    let mut counts: Vec<usize> = evals.iter().map(|(e, _)| e.metrics.bins.len()).collect();
    counts.sort_unstable();
    counts.dedup();
    let bins = match counts.as_slice() {
        [] => "10".to_string(),
        [one] => one.to_string(),
        many => {
            let all: Vec<String> = many.iter().map(|n| n.to_string()).collect();
            format!("{} (by row)", all.join(" or "))
        }
    };
    let (paper_md, paper_csv) = paper_table(&groups);
    let (long_md, long_csv) = long_table(&groups);
    let seeds = usual_seeds(&groups);
    let conventions = format!(
        "Test split; mean ± standard deviation over seeds (sample std; ± 0 for one seed); a row \
         is one run setting, its cells average {seeds} seed(s) unless marked (n = k). Accuracy \
         and calibration errors in %, with {bins} equal-width bins (adaptive ECE: {bins} \
         equal-mass bins); NLL in nats; Brier (sum) is summed over classes, Brier (top label) is \
         the paper's (Table 7). Conventions: docs/metrics.md."
    );
    let mut figures = figures_of(ctx, &title, &groups)?;
    // Figures drawn only when their evaluations have the data: (stem, description).
    let mut optional = Vec::new();
    for (drawn, stem, alt) in [
        (
            training_curves(ctx, &title, &groups, &stages)?,
            "training-curves",
            "held-out metrics during training",
        ),
        (
            best_classes(ctx, &title, &groups, &stages)?,
            "best-classes",
            "mean output on each model's best class",
        ),
        (
            reliability_grid(ctx, &title, &groups)?,
            "reliability-diagrams",
            "reliability diagram of every row and model",
        ),
    ] {
        if !drawn.is_empty() {
            optional.push((stem, alt));
            figures.extend(drawn);
        }
    }
    let optional_md: String = optional
        .iter()
        .map(|(stem, alt)| format!("\n![{alt}]({stem}.png)\n"))
        .collect();
    let md = format!(
        "# {title}\n\n## Accuracy (%) ± std / ECE, per method and model\n\n{paper_md}\n\
         ## Every metric\n\n{conventions}\n\n{long_md}\n\
         ![accuracy against ECE](accuracy-vs-ece.png)\n\n![per-class F1 against confidence](f1-vs-confidence.png)\n\n\
         ![difference from Vanilla against parameters](vanilla-difference.png)\n{optional_md}"
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
    outputs.extend(figures);
    let html = index_html(
        &title,
        &paper_md,
        &long_md,
        &conventions,
        &stages,
        &groups,
        &optional,
    );
    datasets::atomic::write_bytes(&ctx.dir.join("index.html"), html.as_bytes())?;
    outputs.push("index.html".into());
    Ok(outputs)
}

/// The markers of series of one row and model: a colour per row (method) and a shape per
/// model, so that a figure tells both apart; with more rows than colours or more models than
/// shapes, each series its own marker (`None`: the series' default).
fn markers(groups: &[Group]) -> impl Fn(&Group) -> Option<figures::Marker> {
    let mut rows: Vec<String> = Vec::new();
    let mut models: Vec<String> = Vec::new();
    for g in groups {
        let row = g.method.clone();
        if !rows.contains(&row) {
            rows.push(row);
        }
        if !models.contains(&g.model) {
            models.push(g.model.clone());
        }
    }
    let fits = rows.len() <= figures::PALETTE.len() && models.len() <= figures::MARKER_SHAPES;
    move |g: &Group| {
        let colour = rows.iter().position(|r| *r == g.method)?;
        let shape = models.iter().position(|m| *m == g.model)?;
        fits.then_some(figures::Marker { colour, shape })
    }
}

/// `accuracy-vs-ece` (one point per evaluated model and seed) and `f1-vs-confidence` (per
/// class, each class averaged over the group's seeds): one series per row and model, coloured
/// by row and shaped by model ([`markers`]).
fn figures_of(ctx: &Context, title: &str, groups: &[Group]) -> Result<Vec<String>> {
    let marker = markers(groups);
    let several_models = groups.iter().any(|g| g.model != groups[0].model);
    let scatter: Vec<Series> = groups
        .iter()
        .map(|g| Series {
            label: if several_models {
                format!("{} / {}", g.method, g.model)
            } else {
                g.method.clone()
            },
            points: g
                .evals
                .iter()
                .map(|e| (100.0 * e.metrics.accuracy, 100.0 * e.metrics.ece))
                .collect(),
            marker: marker(g),
        })
        .collect();
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
                marker: marker(g),
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
    outputs.extend(figures::save(
        &vanilla_difference(title, groups),
        &ctx.dir,
        "vanilla-difference",
        (1200, 520),
    )?);
    Ok(outputs)
}

/// `training-curves`: every row's held-out accuracy, ECE and NLL by epoch (see
/// [`curve_series`]), from the evaluate stages' `curve.csv` (trainings with `eval_every`);
/// nothing when no evaluation has one.
fn training_curves(
    ctx: &Context,
    title: &str,
    groups: &[Group],
    stages: &[(String, PathBuf, Evaluation)],
) -> Result<Vec<String>> {
    let mut curves: Vec<(&Evaluation, Curve)> = Vec::new();
    for (_, dir, e) in stages {
        if let Some(c) = Curve::read(&dir.join("curve.csv"))? {
            curves.push((e, c));
        }
    }
    let Some((split, [acc, ece, nll])) = curve_series(groups, &curves) else {
        return Ok(Vec::new());
    };
    let panels = figures::curve_panels(
        format!("{title}: {split} metrics during training (mean over seeds)"),
        &split,
        acc,
        ece,
        nll,
        false,
    );
    figures::save(&panels, &ctx.dir, "training-curves", (1500, 520))
}

/// `best-classes` (the paper's Fig. 5): for each row and model, the mean output over the test
/// images of its best class (`best_class.json`), from the evaluation of its lowest seed: the
/// best class differs between seeds, so seeds are not averaged. `+ TS` rows are left out (they
/// have no `best_class.json` of their own). Nothing when no evaluation has the file.
fn best_classes(
    ctx: &Context,
    title: &str,
    groups: &[Group],
    stages: &[(String, PathBuf, Evaluation)],
) -> Result<Vec<String>> {
    let mut panels = Vec::new();
    for g in groups.iter().filter(|g| !g.settings.contains_key("ts")) {
        let Some(e) = g.evals.iter().min_by_key(|e| e.seed) else {
            continue;
        };
        let Some((_, dir, _)) = stages.iter().find(|(_, _, x)| same_evaluation(x, e)) else {
            continue;
        };
        let path = dir.join("best_class.json");
        if !path.exists() {
            continue;
        }
        let best: BestClass = engine::json::read(&path)?;
        let name = e.classes.get(best.class).cloned().unwrap_or_default();
        panels.push(ClassBars::of_best(
            format!(
                "{} / {} (seed {}, {:.2}%): {name}, F1 {:.2}",
                g.method,
                g.model,
                e.seed,
                100.0 * e.metrics.accuracy,
                best.f1
            ),
            &best,
            &e.classes,
        ));
    }
    if panels.is_empty() {
        return Ok(Vec::new());
    }
    save_grid(
        ctx,
        format!("{title}: mean output on each model's best class by test F1"),
        panels,
        (460, 360),
        "best-classes",
    )
}

/// Saves `panels` of `panel` pixels each as figure `stem`, in a grid of [`grid_shape`].
fn save_grid<F: figures::Figure>(
    ctx: &Context,
    title: String,
    panels: Vec<F>,
    panel: (u32, u32),
    stem: &str,
) -> Result<Vec<String>> {
    let (columns, size) = grid_shape(panels.len(), panel);
    let grid = figures::Grid {
        title,
        panels,
        columns,
    };
    figures::save(&grid, &ctx.dir, stem, size)
}

/// Columns and pixel size of a grid of `n` panels of `panel` pixels: about square, at most 6
/// columns, with room for the title.
fn grid_shape(n: usize, panel: (u32, u32)) -> (usize, (u32, u32)) {
    let columns = ((n as f64).sqrt().ceil() as usize)
        .clamp(1, 6)
        .min(n.max(1));
    let rows = n.div_ceil(columns).max(1);
    (
        columns,
        (panel.0 * columns as u32, panel.1 * rows as u32 + 40),
    )
}

/// `reliability-diagrams` (the paper's Figs. 11–14): one reliability diagram per row and model, its
/// seeds' bins pooled (counts summed; accuracy and confidence averaged with the counts as
/// weights), titled with the row's mean accuracy and ECE. A `+ TS` row shows the calibrated
/// bins. Nothing when there is no evaluation, or when the evaluations' bins differ.
fn reliability_grid(ctx: &Context, title: &str, groups: &[Group]) -> Result<Vec<String>> {
    let Some(pooled) = groups
        .iter()
        .map(pooled_bins)
        .collect::<Option<Vec<Vec<Bin>>>>()
        .filter(|p| !p.is_empty())
    else {
        return Ok(Vec::new());
    };
    let panels: Vec<Reliability> = groups
        .iter()
        .zip(&pooled)
        .map(|(g, bins)| Reliability {
            title: format!(
                "{} / {}: {:.2}%, ECE {:.2}%",
                g.method,
                g.model,
                100.0 * g.stat(|e| e.metrics.accuracy).0,
                100.0 * g.stat(|e| e.metrics.ece).0
            ),
            bins,
        })
        .collect();
    save_grid(
        ctx,
        format!("{title}: reliability diagrams (test split, seeds pooled)"),
        panels,
        (420, 380),
        "reliability-diagrams",
    )
}

/// The bins of a row's evaluations pooled; `None` when their bin edges differ.
fn pooled_bins(g: &Group) -> Option<Vec<Bin>> {
    let first = &g.evals.first()?.metrics.bins;
    let same = |b: &[Bin]| {
        b.len() == first.len()
            && b.iter()
                .zip(first)
                .all(|(x, y)| (x.lo, x.hi) == (y.lo, y.hi))
    };
    if !g.evals.iter().all(|e| same(&e.metrics.bins)) {
        return None;
    }
    Some(
        (0..first.len())
            .map(|i| {
                let of = || g.evals.iter().map(|e| &e.metrics.bins[i]);
                let count: usize = of().map(|b| b.count).sum();
                let weighted = |f: fn(&Bin) -> f64| {
                    let sum: f64 = of().map(|b| f(b) * b.count as f64).sum();
                    if count == 0 {
                        0.0
                    } else {
                        sum / count as f64
                    }
                };
                Bin {
                    lo: first[i].lo,
                    hi: first[i].hi,
                    count,
                    accuracy: weighted(|b| b.accuracy),
                    confidence: weighted(|b| b.confidence),
                }
            })
            .collect(),
    )
}

/// One line per row, for held-out accuracy (%), ECE (%) and NLL: the mean over the row's
/// evaluations that have a curve (`(n = k)` when not all of them), at the epochs all of them
/// evaluated. `+ TS` rows are left out (their temperature is fitted after training), and so is
/// a row of the same trainings as one drawn (an `MCDO-S` evaluation of them). Also the split measured on (`held-out` when
/// rows differ); `None` without a curve.
fn curve_series(
    groups: &[Group],
    curves: &[(&Evaluation, Curve)],
) -> Option<(String, [Vec<Series>; 3])> {
    let mut lines: [Vec<Series>; 3] = Default::default();
    let mut splits: Vec<&str> = Vec::new();
    let mut drawn: Vec<&str> = Vec::new();
    for g in groups.iter().filter(|g| !g.settings.contains_key("ts")) {
        let (stages, of_group): (Vec<&str>, Vec<&Curve>) = curves
            .iter()
            .filter(|(e, _)| g.evals.iter().any(|x| same_evaluation(x, e)))
            .map(|(e, c)| (e.model_stage.as_str(), c))
            .unzip();
        // Trainings drawn already, evaluated another way (an `MCDO-S` row): the same curves.
        if stages.iter().all(|s| drawn.contains(s)) {
            continue;
        }
        let Some(first) = of_group.first() else {
            continue;
        };
        drawn.extend(stages);
        if !splits.contains(&first.split.as_str()) {
            splits.push(&first.split);
        }
        let metrics: [fn(&CurvePoint) -> f64; 3] = [
            |p| 100.0 * p.held_out_accuracy,
            |p| 100.0 * p.ece,
            |p| p.nll,
        ];
        for (series, f) in lines.iter_mut().zip(metrics) {
            let points = first.points.iter().filter_map(|p| {
                let at: Vec<f64> = of_group
                    .iter()
                    .filter_map(|c| c.points.iter().find(|q| q.epoch == p.epoch).map(f))
                    .collect();
                (at.len() == of_group.len()).then(|| (p.epoch as f64, mean_std(&at).0))
            });
            // Seeds trained without eval_every have no curve: say how many are averaged.
            let count = if of_group.len() == g.evals.len() {
                String::new()
            } else {
                format!(" (n = {})", of_group.len())
            };
            series.push(Series {
                marker: None,
                label: format!("{} / {}{count}", g.method, g.model),
                points: points.collect(),
            });
        }
    }
    let split = match splits[..] {
        [] => return None,
        [one] => one.to_string(),
        _ => "held-out".to_string(),
    };
    Some((split, lines))
}

/// Whether two evaluations are one evaluate stage's (compared by what names it, not by its
/// metrics, which may be NaN): its stage, and the model, variant and seed it evaluated.
fn same_evaluation(a: &Evaluation, b: &Evaluation) -> bool {
    (&a.stage, &a.model_stage, &a.variant, a.seed) == (&b.stage, &b.model_stage, &b.variant, b.seed)
}

/// The reference of row `g`'s Vanilla differences: of the rows of its model trained by
/// `vanilla` (as trained, not `+ TS`), the one sharing most of `g`'s settings (its schedule,
/// learning rate, mixing…); none when two share as many. A `vanilla` row itself is compared
/// only when it has variants (`Vanilla (CutMix)`), with a row that has none.
fn vanilla_of<'a>(groups: &'a [Group], g: &Group) -> Option<&'a Group> {
    let plain = |v: &Group| v.evals[0].method == "vanilla" && !v.settings.contains_key("ts");
    let g_plain = plain(g);
    if g_plain && g.evals[0].variant.is_empty() {
        return None;
    }
    let shared = |v: &Group| {
        g.settings
            .iter()
            .filter(|(k, value)| v.settings.get(*k) == Some(value))
            .count()
    };
    let mut candidates: Vec<(usize, &Group)> = groups
        .iter()
        .filter(|v| v.model == g.model && plain(v) && !std::ptr::eq(*v, g))
        .filter(|v| !g_plain || v.evals[0].variant.is_empty())
        .map(|v| (shared(v), v))
        .collect();
    candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
    match candidates.as_slice() {
        [(best, v), rest @ ..] if rest.first().is_none_or(|r| r.0 < *best) => Some(v),
        _ => None,
    }
}

/// The paper's Fig. 3: per row (method), the difference of its mean accuracy and mean ECE from
/// the Vanilla row's ([`vanilla_of`]) on the same model, against that model's parameter count;
/// models without a Vanilla row (or without a recorded parameter count) are left out.
fn vanilla_difference(title: &str, groups: &[Group]) -> figures::Grid<Plot> {
    let mut acc: Vec<Series> = Vec::new();
    let mut ece: Vec<Series> = Vec::new();
    for g in groups {
        let Some(v) = vanilla_of(groups, g) else {
            continue;
        };
        let params = g.evals[0].parameters as f64 / 1e6;
        if params == 0.0 {
            continue;
        }
        let d = |f: fn(&Evaluation) -> f64| 100.0 * (g.stat(f).0 - v.stat(f).0);
        for (list, y) in [
            (&mut acc, d(|e| e.metrics.accuracy)),
            (&mut ece, d(|e| e.metrics.ece)),
        ] {
            match list.iter_mut().find(|s| s.label == g.method) {
                Some(s) => s.points.push((params, y)),
                None => list.push(Series {
                    marker: None,
                    label: g.method.clone(),
                    points: vec![(params, y)],
                }),
            }
        }
    }
    for s in acc.iter_mut().chain(ece.iter_mut()) {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let plot = |what: &str, series: Vec<Series>| Plot {
        title: format!("{what} − Vanilla's"),
        x: "student parameters (millions)".into(),
        y: format!("{what} difference (points)"),
        series,
        lines: true,
        square: false,
    };
    figures::Grid::row(
        format!("{title}: difference from Vanilla by student size"),
        vec![plot("accuracy", acc), plot("ECE", ece)],
    )
}

/// The row label of evaluation `e` as trained (not its `+ TS` row).
fn row_of(groups: &[Group], e: &Evaluation) -> String {
    groups
        .iter()
        .find(|g| !g.settings.contains_key("ts") && g.evals.iter().any(|x| same_evaluation(x, e)))
        .map_or_else(|| e.label(), |g| g.method.clone())
}

/// `index.html`: everything on one static page; model figures are linked from the evaluate
/// stages' folders, siblings of this one.
fn index_html(
    title: &str,
    paper_md: &str,
    long_md: &str,
    conventions: &str,
    stages: &[(String, PathBuf, Evaluation)],
    groups: &[Group],
    optional: &[(&str, &str)],
) -> String {
    let mut html = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>\
         body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;margin:1em 0}}\
         td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}\
         img{{max-width:48%;margin:4px;border:1px solid #eee}}section{{margin-top:2em}}</style></head><body>\n\
         <h1>{t}</h1>\n<h2>Accuracy (%) ± std / ECE</h2>\n{}\n<h2>Every metric</h2>\n<p>{}</p>\n{}\n\
         <h2>Figures</h2>\n<img src=\"accuracy-vs-ece.svg\" alt=\"accuracy against ECE\">\
         <img src=\"f1-vs-confidence.svg\" alt=\"per-class F1 against confidence\">\
         <img src=\"vanilla-difference.svg\" alt=\"difference from Vanilla against parameters\">\n{}",
        html_table(paper_md),
        html_escape(conventions),
        html_table(long_md),
        optional
            .iter()
            .map(|(stem, alt)| format!("<img src=\"{stem}.svg\" alt=\"{alt}\">\n"))
            .collect::<String>(),
        t = html_escape(title)
    );
    for (name, dir, e) in stages {
        html.push_str(&format!(
            "<section><h3>{} — {} ({}, {}, seed {})</h3>\n",
            html_escape(name),
            html_escape(&e.model_stage),
            html_escape(&e.model),
            html_escape(&row_of(groups, e)),
            e.seed
        ));
        for fig in [
            "reliability",
            "reliability-ts",
            "confidence",
            "class-loss",
            "training-curve",
            "best-class",
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
    use crate::artifacts::Calibrated;
    use crate::context::Settings;
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
            parameters: 0,
            stage: format!("eval-{method}-{model}-{seed}"),
        }
    }

    /// Rows are compared with the Vanilla run of their model sharing most of their settings;
    /// a plain Vanilla row with nothing, a mixed one with the plain one; two equally close
    /// Vanilla runs give no reference.
    #[test]
    fn each_row_is_compared_with_the_vanilla_run_sharing_its_settings() {
        let p = [0.9f32, 0.1];
        let run = |method: &str, variant: &str, lr: &str| {
            let mut e = eval(method, "resnet8", 0, &p, &[0]);
            e.variant = variant.into();
            let s = [("model.lr", lr), ("model.method", method)];
            let s: Settings = s
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            (e, s)
        };
        let evals = vec![
            run("vanilla", "", "0.1"),
            run("vanilla", "", "0.05"),
            run("kd", "", "0.05"),
            run("vanilla", "cutmix", "0.1"),
        ];
        let groups = group(&evals);
        let named = |g: &Group| vanilla_of(&groups, g).map(|v| v.method.clone());
        let rows: Vec<Option<String>> = groups.iter().map(named).collect();
        assert_eq!(
            rows,
            [
                None,
                None,
                Some("Vanilla (lr=0.05)".into()),
                Some("Vanilla (lr=0.1)".into())
            ],
            "{:?}",
            groups.iter().map(|g| &g.method).collect::<Vec<_>>()
        );
        // A KD run at another learning rate is as close to either plain Vanilla run: none.
        let apart = vec![
            run("vanilla", "", "0.1"),
            run("vanilla", "", "0.05"),
            run("kd", "", "0.2"),
        ];
        let groups = group(&apart);
        assert!(vanilla_of(&groups, &groups[2]).is_none());
    }

    /// Two evaluate stages of one trained model (other `bins`) are two rows, and each
    /// evaluation is found in its own, not in the first one of its model.
    #[test]
    fn two_evaluations_of_one_model_keep_their_own_rows() {
        let p = [0.9f32, 0.1];
        let one = |stage: &str, bins: &str| {
            let mut e = eval("vanilla", "resnet8", 0, &p, &[0]);
            e.model_stage = "vanilla-resnet8-0".into();
            e.stage = stage.into();
            let s: Settings = [("bins".to_string(), bins.to_string())]
                .into_iter()
                .collect();
            (e, s)
        };
        let evals = vec![one("eval-a", "10"), one("eval-b", "15")];
        let groups = group(&evals);
        let names: Vec<String> = evals.iter().map(|(e, _)| row_of(&groups, e)).collect();
        assert_eq!(names, ["Vanilla (eval.bins=10)", "Vanilla (eval.bins=15)"]);
    }

    fn point(epoch: u32, acc: f64, ece: f64, nll: f64) -> CurvePoint {
        CurvePoint {
            epoch,
            loss: 9.0,
            accuracy: 0.9,
            nll,
            held_out_accuracy: acc,
            ece,
        }
    }

    #[test]
    fn training_curves_average_seeds_at_their_common_epochs() {
        let labels = [0, 1];
        let (a0, mut a1) = (
            eval("vanilla", "resnet8", 0, &[0.9, 0.1, 0.2, 0.8], &labels),
            eval("vanilla", "resnet8", 1, &[0.6, 0.4, 0.3, 0.7], &labels),
        );
        // A NaN metric (a diverged model, a class without test images) must not lose the curve.
        a1.metrics.nll = f64::NAN;
        // Seed 0's model evaluated by MC dropout: another row, the same training's curve.
        let mut mc = a0.clone();
        mc.variant = "MCDO-S".into();
        // A KD row of two seeds, one trained without eval_every.
        let b = eval("kd", "resnet8", 0, &[0.9, 0.1, 0.2, 0.8], &labels);
        let b1 = eval("kd", "resnet8", 1, &[0.9, 0.1, 0.2, 0.8], &labels);
        let mut calibrated = b.clone();
        calibrated.calibrated = Some(Calibrated {
            temperature: 1.5,
            metrics: b.metrics.clone(),
        });
        let no_curve = eval("ls", "resnet8", 0, &[0.9, 0.1, 0.2, 0.8], &labels);
        let evals: Vec<(Evaluation, Settings)> = [&a0, &a1, &calibrated, &b1, &no_curve, &mc]
            .into_iter()
            .map(|e| (e.clone(), Settings::new()))
            .collect();
        let groups = group(&evals);
        let curve = |points| Curve {
            split: "val".into(),
            points,
        };
        // Seed 1 was not evaluated at epoch 2: the row's line has epochs 1 and 3 only.
        let curves = vec![
            (
                &a0,
                curve(vec![
                    point(1, 0.5, 0.25, 2.0),
                    point(2, 0.6, 0.2, 1.5),
                    point(3, 0.75, 0.125, 1.0),
                ]),
            ),
            (
                &a1,
                curve(vec![point(1, 0.25, 0.05, 3.0), point(3, 0.5, 0.075, 2.0)]),
            ),
            (&calibrated, curve(vec![point(4, 0.5, 0.5, 0.5)])),
            (
                &mc,
                curve(vec![
                    point(1, 0.5, 0.25, 2.0),
                    point(2, 0.6, 0.2, 1.5),
                    point(3, 0.75, 0.125, 1.0),
                ]),
            ),
        ];
        let (split, [acc, ece, nll]) = curve_series(&groups, &curves).unwrap();
        assert_eq!(split, "val");
        // Rows Vanilla and KD (one of its two seeds has a curve); KD + TS, LS (no curve) and
        // Vanilla (MCDO-S) (Vanilla's trainings again) have none.
        let labels: Vec<&str> = acc.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["Vanilla / resnet8", "KD / resnet8 (n = 1)"]);
        assert_eq!(acc[0].points, [(1.0, 37.5), (3.0, 62.5)]);
        assert_eq!(ece[0].points, [(1.0, 15.0), (3.0, 10.0)]);
        assert_eq!(nll[0].points, [(1.0, 2.5), (3.0, 1.5)]);
        assert_eq!(acc[1].points, [(4.0, 50.0)]);
        assert!(curve_series(&groups, &[]).is_none());
        let mut test_split = curves.clone();
        test_split[2].1.split = "test".into();
        test_split.pop();
        assert_eq!(curve_series(&groups, &test_split).unwrap().0, "held-out");
    }

    #[test]
    fn reliability_bins_of_seeds_are_pooled_by_count() {
        let labels = [0, 1];
        let mut a = eval("vanilla", "resnet8", 0, &[0.9, 0.1, 0.2, 0.8], &labels);
        let mut b = eval("vanilla", "resnet8", 1, &[0.9, 0.1, 0.2, 0.8], &labels);
        let bin = |count, accuracy, confidence| Bin {
            lo: 0.5,
            hi: 1.0,
            count,
            accuracy,
            confidence,
        };
        a.metrics.bins = vec![bin(2, 0.5, 0.625), bin(0, 0.0, 0.0)];
        b.metrics.bins = vec![bin(6, 1.0, 0.75), bin(0, 0.0, 0.0)];
        let groups = group(&[(a.clone(), Settings::new()), (b.clone(), Settings::new())]);
        // Bin 0: 8 samples; accuracy (2·0.5 + 6·1)/8 = 0.875, confidence (1.25 + 4.5)/8.
        let pooled = pooled_bins(&groups[0]).unwrap();
        assert_eq!(pooled[0], bin(8, 0.875, 0.71875));
        assert_eq!(pooled[1], bin(0, 0.0, 0.0));
        b.metrics.bins[0].lo = 0.25;
        let groups = group(&[(a, Settings::new()), (b, Settings::new())]);
        assert!(pooled_bins(&groups[0]).is_none(), "different edges");
    }

    #[test]
    fn grids_are_about_square_and_at_most_six_wide() {
        assert_eq!(grid_shape(1, (10, 10)), (1, (10, 50)));
        assert_eq!(grid_shape(5, (10, 10)), (3, (30, 60)));
        assert_eq!(grid_shape(60, (10, 10)), (6, (60, 140)));
    }

    #[test]
    fn tables_average_over_seeds() {
        // Seed 0: 4 samples, 3 right (accuracy 75%); seed 1: 4 right of 4 (100%).
        // Mean 87.5, sample std √((12.5² + 12.5²)/1) = 17.68.
        // ECE seed 0: all confidences 0.9 in one bin, accuracy 0.75 → 0.15; seed 1: 0.1.
        // Mean ECE 0.125.
        let p = [0.9f32, 0.1, 0.9, 0.1, 0.9, 0.1, 0.9, 0.1];
        let none = Settings::new();
        let evals = vec![
            (
                eval("vanilla", "resnet20", 0, &p, &[0, 0, 0, 1]),
                none.clone(),
            ),
            (
                eval("vanilla", "resnet20", 1, &p, &[0, 0, 0, 0]),
                none.clone(),
            ),
            (
                eval("off-ldl", "resnet56", 0, &p, &[0, 0, 0, 0]),
                none.clone(),
            ),
            (
                eval("off-ldl", "resnet56", 1, &p, &[0, 0, 0, 0]),
                none.clone(),
            ),
            (eval("off-ldl", "resnet20", 0, &p, &[0, 0, 0, 0]), none),
        ];
        let groups = group(&evals);
        assert_eq!(groups.len(), 3);
        let (md, csv) = paper_table(&groups);
        assert!(md.contains("| method | resnet20 | resnet56 |"), "{md}");
        assert!(
            md.contains("| Vanilla | 87.50 ± 17.68 / 0.125 | – |"),
            "{md}"
        );
        // Two cells average two seeds, the off-LDL resnet20 cell one: it says so.
        assert!(
            md.contains("| Off-LDL | 100.00 ± 0.00 / 0.100 (n = 1) | 100.00 ± 0.00 / 0.100 |"),
            "{md}"
        );
        assert_eq!(csv.lines().count(), 3);
        let (long, long_csv) = long_table(&groups);
        assert!(
            long.contains("| Vanilla | resnet20 | 2 | 87.50 ± 17.68 |"),
            "{long}"
        );
        let header: Vec<&str> = long_csv.lines().next().unwrap().split(',').collect();
        assert_eq!(header[3..5], ["accuracy_mean", "accuracy_std"]);
        assert!(header.contains(&"adaptive_ece_mean"));
        // Both Brier scores, under metrics.json's names. Seed 0 of Vanilla: three right at
        // confidence 0.9, one wrong at 0.9: top-label (3·0.01 + 0.81)/4 = 0.21, summed twice
        // that (K = 2: both classes' errors are equal) = 0.42; seed 1: 0.01 and 0.02.
        let brier = header.iter().position(|h| *h == "brier_mean").unwrap();
        let top = header
            .iter()
            .position(|h| *h == "brier_top_label_mean")
            .unwrap();
        let row: Vec<&str> = long_csv.lines().nth(1).unwrap().split(',').collect();
        // In metrics.json's units, as its column names say: accuracy 1 and 0.75 over two seeds,
        // sample std 0.125·√2.
        assert_eq!(row[3..5], ["0.875000", "0.176777"]);
        assert_eq!((row[brier], row[top]), ("0.220000", "0.110000"));
    }

    /// A colour per row and a shape per model; past ten rows (colours), each series its own.
    #[test]
    fn series_are_coloured_by_row_and_shaped_by_model() {
        let group = |method: &str, model: &str| Group {
            method: method.into(),
            model: model.into(),
            evals: Vec::new(),
            settings: Settings::new(),
        };
        let groups = [
            group("KD", "resnet8"),
            group("Vanilla", "resnet8"),
            group("KD", "resnet20"),
            group("Vanilla", "resnet20"),
        ];
        let marker = markers(&groups);
        let m = |colour, shape| Some(figures::Marker { colour, shape });
        let got: Vec<_> = groups.iter().map(&marker).collect();
        assert_eq!(got, [m(0, 0), m(1, 0), m(0, 1), m(1, 1)]);
        let many: Vec<Group> = (0..11)
            .map(|i| group(&format!("r{i}"), "resnet8"))
            .collect();
        let marker = markers(&many);
        assert!(many.iter().all(|g| marker(g).is_none()));
    }
}
