//! The training methods and grids end to end: the smoke grid of examples/smoke.toml trains every
//! method through `pipeline run`; grids expand, follow and resume; offline students refuse a
//! label store made for another dataset.

mod common;
use common::*;
use std::path::Path;

fn root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Every method of docs/methods.md, as `method = "..."`.
const METHODS: [&str; 14] = [
    "vanilla",
    "ls",
    "kd",
    "wsl",
    "off-ldl",
    "off-en-ldl",
    "off-mt-ldl",
    "on-ldl",
    "on-en-ldl",
    "on-mt-ldl",
    "ogr-loss",
    "ogr-ldl",
    "crd",
    "crd-kd",
];

/// Their names in the paper's tables, as reports label their rows.
const PAPER_NAMES: [&str; 14] = [
    "Vanilla",
    "LS",
    "KD",
    "WSL",
    "Off-LDL",
    "Off-En-LDL",
    "Off-MT-LDL",
    "On-LDL",
    "On-En-LDL",
    "On-MT-LDL",
    "OGR",
    "OGR-LDL",
    "CRD",
    "CRD+KD",
];

#[test]
fn the_smoke_grid_trains_and_evaluates_every_method() {
    let dir = scratch();
    let smoke = root().join("examples/smoke.toml");
    let out = dir.path().join("smoke");
    let o = pipeline(
        dir.path(),
        &[
            "run",
            smoke.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let report = std::fs::read_to_string(out.join("report/report.md")).unwrap();
    for (m, name) in METHODS.into_iter().zip(PAPER_NAMES) {
        let cell = format!("student.method={m}");
        let model: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(&cell).join("model.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(model["method"], m);
        // Each cell was temperature-scaled on the validation split.
        let t: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(&cell).join("temperature.json")).unwrap(),
        )
        .unwrap();
        assert!(t["temperature"].as_f64().unwrap() > 0.0);
        assert!(t["val_nll_after"].as_f64() <= t["val_nll_before"].as_f64());
        // The evaluate stage followed the grid: one evaluation per cell.
        let e: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(format!("eval.method={m}/metrics.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(e["model_stage"], cell.as_str());
        assert!(e["calibrated"]["metrics"]["ece"].as_f64().is_some());
        assert!(
            report.contains(&format!("| {name} | resnet8 |"))
                && report.contains(&format!("| {name} + TS | resnet8 |")),
            "{m} missing from the report:\n{report}"
        );
    }
    assert!(
        report.contains("| On-LDL (CutMix, MCDO-T, MCDO-S) | resnet8 |"),
        "{report}"
    );
    check_figures(&out);
    metrics_csv_quotes_labels_with_commas(&out.join("eval-mcdo/metrics.csv"));
    best_class_agrees_with_the_predictions(&out.join("eval.method=ls"));
    check_supervision_examples(&out);
    // The OGR cells measured per-class losses every epoch.
    let ogr = std::fs::read_to_string(out.join("student.method=ogr-loss/ogr.csv")).unwrap();
    assert_eq!(ogr.lines().count(), 1 + 3 * 10, "{ogr}");
    // Cells read only what their method uses.
    let needs = |cell: &str| -> Vec<String> {
        let rec: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(cell).join("stage.json")).unwrap(),
        )
        .unwrap();
        rec["inputs"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    assert_eq!(needs("student.method=vanilla"), ["data"]);
    assert_eq!(needs("student.method=off-ldl"), ["data", "labels"]);
    assert_eq!(
        needs("student.method=on-en-ldl"),
        ["data", "teacher-a", "teacher-b"]
    );
    assert_eq!(needs("student-sskd"), ["data", "teacher-a-sskd"]);
    check_sskd(&out, &report);
    let st = pipeline(
        dir.path(),
        &[
            "status",
            smoke.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
    );
    assert!(
        stdout(&st).contains("grid student: 14 cells, 14 up to date"),
        "{}",
        stdout(&st)
    );
    assert!(
        stdout(&st).contains("grid eval: 14 cells, 14 up to date"),
        "{}",
        stdout(&st)
    );
}

/// The report's page and figures, and each evaluation's.
fn check_figures(out: &Path) {
    for f in [
        "index.html",
        "table.md",
        "table.csv",
        "accuracy-vs-ece.png",
        "accuracy-vs-ece.svg",
        "f1-vs-confidence.png",
        "vanilla-difference.png",
        "vanilla-difference.svg",
        "best-classes.png",
        "best-classes.svg",
        "reliability-diagrams.png",
        "reliability-diagrams.svg",
    ] {
        assert!(out.join("report").join(f).exists(), "report/{f}");
    }
    let index = std::fs::read_to_string(out.join("report/index.html")).unwrap();
    assert!(
        index.contains("<img src=\"../eval.method=kd/reliability.svg\""),
        "{index}"
    );
    for f in [
        "predictions.parquet",
        "class_metrics.csv",
        "reliability.png",
        "reliability.svg",
        "reliability-ts.png",
        "confidence.svg",
        "class-loss.png",
        "projection.svg",
        "projection.csv",
        "best-class.png",
        "best_class.json",
    ] {
        assert!(out.join("eval.method=vanilla").join(f).exists(), "eval/{f}");
    }
}

/// An evaluation's `metrics.csv` whose method label lists variants with commas quotes it, so
/// every row has the header's fields (counted here by RFC 4180's rule: commas outside quotes).
fn metrics_csv_quotes_labels_with_commas(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    let fields = |line: &str| {
        let mut quoted = false;
        1 + line
            .chars()
            .filter(|&c| {
                quoted ^= c == '"';
                c == ',' && !quoted
            })
            .count()
    };
    let mut lines = text.lines();
    let header = fields(lines.next().unwrap());
    let row = lines.next().unwrap();
    assert!(
        row.contains(",\"on-ldl (cutmix, MCDO-T, MCDO-S)\","),
        "{text}"
    );
    assert_eq!(fields(row), header, "{text}");
}

/// Students taught by teachers on their batches show what the first images were taught: the
/// same images for every cell of the grid (one seed, no mixing), so `kd`, `wsl` and `on-ldl`,
/// which run the first teacher, show the same distributions, and the two ensembles theirs.
fn check_supervision_examples(out: &Path) {
    let mut teachers = std::collections::BTreeMap::new();
    for m in METHODS {
        let dir = out.join(format!("student.method={m}"));
        let online = ["kd", "wsl", "on-ldl", "on-en-ldl", "on-mt-ldl"].contains(&m);
        assert_eq!(dir.join("supervision.png").exists(), online, "{m}");
        if online {
            supervision_examples_are_distributions(&dir.join("supervision.json"), 10);
            let json: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join("supervision.json")).unwrap(),
            )
            .unwrap();
            let of: Vec<serde_json::Value> = json
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["teachers"].clone())
                .collect();
            teachers.insert(m, of);
        }
    }
    assert_eq!(teachers["kd"], teachers["on-ldl"]);
    assert_eq!(teachers["wsl"], teachers["on-ldl"]);
    assert_eq!(teachers["on-en-ldl"], teachers["on-mt-ldl"]);
    assert_ne!(
        teachers["on-en-ldl"], teachers["on-ldl"],
        "the ensemble shows one teacher"
    );
    // On CutMix batches (p = 1) the labels are mixed.
    let mixed =
        supervision_examples_are_distributions(&out.join("student-mcdo/supervision.json"), 10);
    assert!(mixed > 0, "no example of the CutMix student is mixed");
}

/// Each example of `supervision.json`: a mixed hard label whose weights sum to 1 and include the
/// image's own class (CutMix keeps part of every image), and the teachers' three most probable
/// classes, most probable first, their probabilities summing to at most 1.
/// Returns how many examples are mixed (two classes or more).
fn supervision_examples_are_distributions(path: &Path, k: u64) -> usize {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let examples = json.as_array().unwrap();
    assert_eq!(examples.len(), 8, "{json}");
    let pairs = |v: &serde_json::Value| -> Vec<(u64, f64)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
            .collect()
    };
    for e in examples {
        let mixed = pairs(&e["mixed_label"]);
        let total: f64 = mixed.iter().map(|m| m.1).sum();
        assert!((total - 1.0).abs() < 1e-5, "{e}");
        assert!(
            mixed.iter().any(|m| m.0 == e["label"].as_u64().unwrap()),
            "{e}"
        );
        // The teachers' probability of each class of the label, and of their top 3.
        let on_label = pairs(&e["teachers_on_label"]);
        assert_eq!(
            on_label.iter().map(|t| t.0).collect::<Vec<_>>(),
            mixed.iter().map(|m| m.0).collect::<Vec<_>>(),
            "{e}"
        );
        let teachers = pairs(&e["teachers"]);
        for (c, p) in &on_label {
            assert!((0.0..=1.0).contains(p), "{e}");
            if let Some(t) = teachers.iter().find(|t| t.0 == *c) {
                assert_eq!(t.1, *p, "{e}");
            }
        }
        assert_eq!(teachers.len(), 3, "{e}");
        assert!(
            teachers
                .iter()
                .all(|t| t.0 < k && (0.0..=1.0).contains(&t.1)),
            "{e}"
        );
        assert!(teachers.windows(2).all(|w| w[0].1 >= w[1].1), "{e}");
        assert!(
            teachers.iter().map(|t| t.1).sum::<f64>() <= 1.0 + 1e-5,
            "{e}"
        );
    }
    examples
        .iter()
        .filter(|e| e["mixed_label"].as_array().unwrap().len() > 1)
        .count()
}

/// `best_class.json` against the evaluation's own predictions, recomputed here: the class with
/// the highest F1 of the argmax predictions (ties: lowest index), and the mean probability
/// vector over its test images, its largest entries first.
fn best_class_agrees_with_the_predictions(eval: &Path) {
    use arrow::array::{Array, FixedSizeListArray, Float32Array, UInt32Array};
    let (mut labels, mut probs) = (Vec::new(), Vec::new());
    for batch in parquet_batches(&eval.join("predictions.parquet")) {
        let l = batch.column_by_name("label").unwrap();
        labels.extend(
            l.as_any()
                .downcast_ref::<UInt32Array>()
                .unwrap()
                .values()
                .iter()
                .map(|&y| y as usize),
        );
        let list = batch.column_by_name("probs").unwrap();
        let list = list.as_any().downcast_ref::<FixedSizeListArray>().unwrap();
        for r in 0..list.len() {
            let v = list.value(r);
            probs.push(
                v.as_any()
                    .downcast_ref::<Float32Array>()
                    .unwrap()
                    .values()
                    .to_vec(),
            );
        }
    }
    let k = probs[0].len();
    let (mut tp, mut fp, mut fn_) = (vec![0f64; k], vec![0f64; k], vec![0f64; k]);
    for (p, &y) in probs.iter().zip(&labels) {
        let pred = (0..k).fold(0, |b, c| if p[c] > p[b] { c } else { b });
        if pred == y {
            tp[y] += 1.0;
        } else {
            fp[pred] += 1.0;
            fn_[y] += 1.0;
        }
    }
    let f1: Vec<f64> = (0..k)
        .map(|c| {
            if tp[c] + fn_[c] == 0.0 {
                f64::NAN
            } else {
                2.0 * tp[c] / (2.0 * tp[c] + fp[c] + fn_[c])
            }
        })
        .collect();
    let best = (0..k)
        .filter(|&c| f1[c].is_finite())
        .fold(None, |b: Option<usize>, c| match b {
            Some(b) if f1[b] >= f1[c] => Some(b),
            _ => Some(c),
        })
        .unwrap();
    let rows: Vec<&Vec<f32>> = probs
        .iter()
        .zip(&labels)
        .filter(|(_, &y)| y == best)
        .map(|(p, _)| p)
        .collect();
    let mut mean: Vec<(usize, f64)> = (0..k)
        .map(|c| {
            (
                c,
                rows.iter().map(|p| p[c] as f64).sum::<f64>() / rows.len() as f64,
            )
        })
        .collect();
    mean.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    mean.truncate(10);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval.join("best_class.json")).unwrap())
            .unwrap();
    assert_eq!(json["class"].as_u64(), Some(best as u64), "{json}");
    assert!(
        (json["f1"].as_f64().unwrap() - f1[best]).abs() < 1e-9,
        "{json} vs {f1:?}"
    );
    let top = json["top"].as_array().unwrap();
    assert_eq!(top.len(), mean.len(), "{json}");
    for (got, (c, m)) in top.iter().zip(&mean) {
        assert_eq!(got[0].as_u64(), Some(*c as u64), "{json} vs {mean:?}");
        assert!(
            (got[1].as_f64().unwrap() - m).abs() < 1e-9,
            "{json} vs {mean:?}"
        );
    }
}

/// SSKD's two stages of the smoke grid: the head stage keeps its teacher's weights bit for bit
/// and adds the head's four tensors; the student is an ordinary classifier (its head is not in
/// its model), evaluated and reported as "SSKD", calibrated too.
fn check_sskd(out: &Path, report: &str) {
    use candle_core::{safetensors, Device};
    let load = |p: std::path::PathBuf| safetensors::load(&p, &Device::Cpu).unwrap();
    let teacher = load(out.join("teacher-a/model.safetensors"));
    let head_stage = load(out.join("teacher-a-sskd/model.safetensors"));
    assert_eq!(
        teacher.keys().collect::<std::collections::BTreeSet<_>>(),
        head_stage.keys().collect()
    );
    for (name, t) in &teacher {
        let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = head_stage[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(a == b, "the sskd-head stage changed the teacher's `{name}`");
    }
    let head = load(out.join("teacher-a-sskd/sskd_head.safetensors"));
    let mut names: Vec<_> = head.keys().cloned().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "proj_head.0.bias",
            "proj_head.0.weight",
            "proj_head.2.bias",
            "proj_head.2.weight"
        ]
    );
    // A square head over the teacher's pooled features (resnet8 of width 8: 32 channels).
    assert_eq!(head["proj_head.0.weight"].dims(), [32, 32]);
    let student = load(out.join("student-sskd/model.safetensors"));
    assert!(student.keys().all(|k| !k.contains("proj_head")));
    let model: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("student-sskd/model.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(model["method"], "sskd");
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval-sskd/metrics.json")).unwrap())
            .unwrap();
    assert_eq!(e["model_stage"], "student-sskd");
    assert!(
        report.contains("| SSKD | resnet8 |") && report.contains("| SSKD + TS | resnet8 |"),
        "SSKD missing from the report:\n{report}"
    );
}

/// A small grid over seeds and two methods, evaluated cell by cell and reported together.
const GRID: &str = r#"
[run]
output = "out"
seed = 0
threads = 2

[[stage]]
name = "data"
kind = "prepare"
source = "synthetic"
train_size = 96
test_size = 32
classes = 3
image_size = 12

[[stage]]
name = "student"
kind = "train"
needs = ["data"]
matrix = { method = ["vanilla", "ls"], seed = [0, 1] }
model = "resnet8"
width = 4
epochs = 2
batch_size = 32

[[stage]]
name = "eval"
kind = "evaluate"
needs = ["data", "student"]

[[stage]]
name = "report"
kind = "report"
needs = ["eval"]
"#;

#[test]
fn a_grid_expands_into_named_cells_and_a_killed_run_resumes_with_the_unfinished_ones() {
    let dir = scratch();
    write(dir.path(), "g.toml", GRID);
    let cells = [
        "student.method=vanilla.seed=0",
        "student.method=vanilla.seed=1",
        "student.method=ls.seed=0",
        "student.method=ls.seed=1",
    ];
    // Kill the run once the first cell is complete.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "g.toml"])
        .current_dir(dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = dir.path().join("out");
    let t0 = std::time::Instant::now();
    while !cells
        .iter()
        .any(|c| out.join(c).join("stage.json").exists())
    {
        assert!(t0.elapsed().as_secs() < 300, "no cell finished");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done: Vec<&str> = cells
        .iter()
        .copied()
        .filter(|c| out.join(c).join("stage.json").exists())
        .collect();
    assert!(!done.is_empty() && done.len() < 4, "{done:?}");
    let st = pipeline(dir.path(), &["status", "g.toml"]);
    assert!(
        stdout(&st).contains(&format!("grid student: 4 cells, {} up to date", done.len())),
        "{}",
        stdout(&st)
    );
    // A cell whose claim a process holds is counted as running.
    let busy = cells.iter().find(|c| !done.contains(c)).unwrap();
    let lock = std::fs::File::create(out.join(format!(".locks/{busy}.lock"))).unwrap();
    lock.lock().unwrap();
    let st = stdout(&pipeline(dir.path(), &["status", "g.toml"]));
    let line = format!(
        "grid student: 4 cells, 1 running, {} up to date, ",
        done.len()
    );
    assert!(st.contains(&line), "{st}\nwanted: {line}");
    drop(lock);

    let o = pipeline(dir.path(), &["run", "g.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let redone = ran(&o);
    for c in &done {
        assert!(
            !redone.contains(&c.to_string()),
            "{c} ran again: {redone:?}"
        );
        assert!(skipped(&o).contains(&c.to_string()));
    }
    for c in cells {
        assert!(out.join(c).join("model.safetensors").exists(), "{c}");
        let eval = c.replacen("student", "eval", 1);
        let e: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(&eval).join("metrics.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(e["model_stage"], c);
    }
    // The report averages each method over its two seeds.
    let report = std::fs::read_to_string(out.join("report/report.md")).unwrap();
    assert!(report.contains("| Vanilla | resnet8 | 2 |"), "{report}");
    assert!(report.contains("| LS | resnet8 | 2 |"), "{report}");
    let again = pipeline(dir.path(), &["run", "g.toml"]);
    assert!(ran(&again).is_empty(), "{:?}", ran(&again));
}

/// Runs that differ in anything but their seed: epochs, a method's key, the teacher.
const RUNS_APART: &str = r#"
[run]
output = "out"
seed = 0
threads = 2

[[stage]]
name = "data"
kind = "prepare"
source = "synthetic"
train_size = 64
test_size = 32
classes = 3
image_size = 12

[[stage]]
name = "teacher-a"
kind = "train"
needs = ["data"]
model = "resnet8"
width = 4
method = "vanilla"
epochs = 1
batch_size = 32

[[stage]]
name = "teacher-b"
kind = "train"
needs = ["data"]
model = "resnet8"
width = 6
method = "vanilla"
epochs = 1
batch_size = 32

[[stage]]
name = "vanilla"
kind = "train"
needs = ["data"]
matrix = { epochs = [1, 2], seed = [0, 1] }
method = "vanilla"
model = "resnet8"
width = 4
batch_size = 32

[[stage]]
name = "kd"
kind = "train"
needs = ["data", "teacher-a"]
matrix = { kd_tau = [2.0, 4.0], seed = [0, 1] }
method = "kd"
model = "resnet8"
width = 4
epochs = 1
batch_size = 32

[[stage]]
name = "kd-b"
kind = "train"
needs = ["data", "teacher-b"]
method = "kd"
kd_tau = 4.0
model = "resnet8"
width = 4
epochs = 1
batch_size = 32

[[stage]]
name = "named"
kind = "train"
needs = ["data"]
method = "vanilla"
model = "resnet8"
width = 4
epochs = 1
batch_size = 32
seed = 5
label = "Baseline"

[[stage]]
name = "eval"
kind = "evaluate"
needs = ["data", "vanilla"]

[[stage]]
name = "eval-kd"
kind = "evaluate"
needs = ["data", "kd"]

[[stage]]
name = "eval-kd-b"
kind = "evaluate"
needs = ["data", "kd-b"]

[[stage]]
name = "eval-named"
kind = "evaluate"
needs = ["data", "named"]

[[stage]]
name = "report"
kind = "report"
needs = ["eval", "eval-kd", "eval-kd-b", "eval-named"]
"#;

#[test]
fn a_report_keeps_runs_that_differ_in_more_than_their_seed_apart() {
    let dir = scratch();
    write(dir.path(), "r.toml", RUNS_APART);
    let o = pipeline(dir.path(), &["run", "r.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let csv = std::fs::read_to_string(dir.path().join("out/report/report.csv")).unwrap();
    // (label, seeds) of each row of the long table in report.md.
    let md = std::fs::read_to_string(dir.path().join("out/report/report.md")).unwrap();
    let rows: Vec<(String, String)> = md
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains(" | resnet8 | "))
        .map(|l| {
            let f: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
            (f[0].to_string(), f[2].to_string())
        })
        .collect();
    // The epoch grid gives two rows of two seeds (the longer schedule marked `+`, as the
    // paper marks its 350-epoch runs); the kd_tau grid two rows; the KD from the other teacher
    // a third, told apart from the kd_tau = 4 row by the teacher's width; the labelled run its
    // label.
    let want: Vec<(String, String)> = [
        ("Vanilla", "2"),
        ("Vanilla+", "2"),
        ("KD (kd_tau=2.0, teacher.width=4)", "2"),
        ("KD (kd_tau=4.0, teacher.width=4)", "2"),
        ("KD (kd_tau=4.0, teacher.width=6)", "1"),
        ("Baseline", "1"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(rows, want, "{md}");
    // Labels with commas are quoted in the CSV.
    assert!(
        csv.contains("\n\"KD (kd_tau=4.0, teacher.width=6)\",resnet8,1,"),
        "{csv}"
    );
    // Cells of other seed counts say so in the paper table.
    let table = std::fs::read_to_string(dir.path().join("out/report/table.md")).unwrap();
    assert!(
        table.contains("| Baseline | ") && table.contains("(n = 1) |"),
        "{table}"
    );
    // A new label redraws the report and retrains nothing.
    write(
        dir.path(),
        "r.toml",
        &RUNS_APART.replace("label = \"Baseline\"", "label = \"Plain\""),
    );
    let again = pipeline(dir.path(), &["run", "r.toml"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(ran(&again), ["report"]);
    let csv = std::fs::read_to_string(dir.path().join("out/report/report.csv")).unwrap();
    assert!(csv.contains("\nPlain,resnet8,1,"), "{csv}");
}

#[test]
fn offline_students_refuse_a_label_store_made_for_another_dataset() {
    let dir = scratch();
    let cfg = r#"
[run]
output = "out"
threads = 2

[[stage]]
name = "data-a"
kind = "prepare"
source = "synthetic"
train_size = 64
test_size = 16
classes = 3
image_size = 12
seed = 1

[[stage]]
name = "data-b"
kind = "prepare"
source = "synthetic"
train_size = 64
test_size = 16
classes = 3
image_size = 12
seed = 2

[[stage]]
name = "teacher"
kind = "train"
needs = ["data-a"]
model = "resnet8"
width = 4
method = "vanilla"
epochs = 1
batch_size = 32

[[stage]]
name = "labels"
kind = "label"
needs = ["data-a", "teacher"]

[[stage]]
name = "student"
kind = "train"
needs = ["data-b", "labels"]
model = "resnet8"
width = 4
method = "off-ldl"
epochs = 1
batch_size = 32
"#;
    write(dir.path(), "x.toml", cfg);
    let o = pipeline(dir.path(), &["run", "x.toml"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("labels.parquet")
            && e.contains("ldl.dataset_fingerprint")
            && e.contains("the labels were made for dataset"),
        "{e}"
    );
    assert!(!dir.path().join("out/student").exists());
}

/// Every example in examples/ is a valid stages.toml (checked by `pipeline status`, which runs
/// nothing), declares its grids, and quotes its dry run's count of stages by kind.
#[test]
fn every_example_parses_and_expands_its_grids() {
    let dir = scratch();
    let mut seen = 0;
    for entry in std::fs::read_dir(root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        seen += 1;
        let o = pipeline(
            dir.path(),
            &[
                "status",
                path.to_str().unwrap(),
                "--output",
                dir.path().join("out").to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}: {}", path.display(), stderr(&o));
        assert!(
            stdout(&o).contains("grid "),
            "{}: no grid\n{}",
            path.display(),
            stdout(&o)
        );
        // Its header quotes the last line of a dry run, which counts the stages it lists.
        let text = std::fs::read_to_string(&path).unwrap();
        let stated = text
            .lines()
            .find(|l| l.starts_with("# `pipeline run FILE --dry-run` ends with `"))
            .and_then(|l| l.split('`').nth(3))
            .unwrap_or_else(|| panic!("{}: no dry-run line", path.display()));
        let dry = pipeline(
            dir.path(),
            &[
                "run",
                path.to_str().unwrap(),
                "--dry-run",
                "--output",
                dir.path().join("out").to_str().unwrap(),
            ],
        );
        assert!(dry.status.success(), "{}: {}", path.display(), stderr(&dry));
        let listed = stdout(&dry);
        let stage_lines: Vec<&str> = listed
            .lines()
            .filter(|l| l.starts_with("would run ") && l.contains("): "))
            .collect();
        let by_kind: Vec<String> = [
            "prepare", "import", "train", "label", "replay", "evaluate", "report",
        ]
        .iter()
        .map(|k| {
            let n = stage_lines
                .iter()
                .filter(|l| l.contains(&format!(" ({k}): ")))
                .count();
            (k, n)
        })
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
        let counted = format!(
            "would run {} stages: {}",
            stage_lines.len(),
            by_kind.join(", ")
        );
        assert_eq!(counted, stated, "{}", path.display());
        assert_eq!(listed.lines().last(), Some(stated), "{}", path.display());
    }
    assert!(seen >= 6, "examples/ has {seen} files");
}
