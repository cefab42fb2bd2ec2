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
const METHODS: [&str; 12] = [
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
    for m in METHODS {
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
            report.contains(&format!("| {m} | resnet8 |"))
                && report.contains(&format!("| {m} + TS | resnet8 |")),
            "{m} missing from the report:\n{report}"
        );
    }
    assert!(
        report.contains("| on-ldl (cutmix, MCDO-T, MCDO-S) | resnet8 |"),
        "{report}"
    );
    // The report's page and figures, and each evaluation's.
    for f in [
        "index.html",
        "table.md",
        "table.csv",
        "accuracy-vs-ece.png",
        "accuracy-vs-ece.svg",
        "f1-vs-confidence.png",
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
    ] {
        assert!(out.join("eval.method=vanilla").join(f).exists(), "eval/{f}");
    }
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
        stdout(&st).contains("grid student: 12 cells, 12 up to date"),
        "{}",
        stdout(&st)
    );
    assert!(
        stdout(&st).contains("grid eval: 12 cells, 12 up to date"),
        "{}",
        stdout(&st)
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
    assert!(report.contains("| vanilla | resnet8 | 2 |"), "{report}");
    assert!(report.contains("| ls | resnet8 | 2 |"), "{report}");
    let again = pipeline(dir.path(), &["run", "g.toml"]);
    assert!(ran(&again).is_empty(), "{:?}", ran(&again));
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
/// nothing), and declares its grids.
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
    }
    assert!(seen >= 6, "examples/ has {seen} files");
}
