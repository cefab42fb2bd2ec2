//! The whole pipeline on a tiny synthetic config, through the binary: every declared output
//! exists and parses, and the artifacts agree with each other.

mod common;
use common::*;
use datasets::PackedStore;
use stages::label_store;
use std::path::Path;

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn tiny_pipeline_produces_every_output() {
    let dir = scratch();
    write(dir.path(), "tiny.toml", TINY);
    let o = pipeline(dir.path(), &["run", "tiny.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");

    // Every stage has a complete record whose outputs exist with the recorded sizes and hashes.
    for stage in TINY_STAGES {
        let rec: serde_json::Value =
            serde_json::from_str(&read(&out.join(stage).join("stage.json"))).unwrap();
        assert_eq!(rec["status"], "complete");
        assert_eq!(rec["name"], stage);
        assert_eq!(rec["fingerprint"].as_str().unwrap().len(), 64);
        let outputs = rec["outputs"].as_array().unwrap();
        assert!(!outputs.is_empty());
        for f in outputs {
            let bytes = std::fs::read(out.join(stage).join(f["path"].as_str().unwrap())).unwrap();
            assert_eq!(bytes.len() as u64, f["bytes"].as_u64().unwrap());
            assert_eq!(
                blake3::hash(&bytes).to_hex().as_str(),
                f["blake3"].as_str().unwrap()
            );
        }
    }

    // The packed splits open, verify, and hold what was asked.
    let train = PackedStore::open(&out.join("data/train.pack")).unwrap();
    train.verify().unwrap();
    assert_eq!(
        (train.len(), train.info().k(), train.info().h),
        (160, 4, 16)
    );
    let test = PackedStore::open(&out.join("data/test.pack")).unwrap();
    assert_eq!(test.len(), 80);

    // The label store: one distribution per training sample, valid and matching the dataset.
    let labels = label_store::read(
        &out.join("labels/labels.parquet"),
        "teacher",
        train.len(),
        &train.info().classes,
        &train.hash(),
    )
    .unwrap();
    assert_eq!(labels.probs.len(), 160 * 4);
    assert_eq!(labels.meta.teachers.len(), 1);
    // The teacher's labels are soft: not every row is one-hot.
    assert!(labels.probs.chunks(4).any(|r| r.iter().all(|&p| p < 0.999)));

    // Models: weights, spec and a training log with one row per epoch.
    for (stage, epochs) in [("teacher", 2), ("vanilla", 1), ("off-ldl", 1)] {
        let log = read(&out.join(stage).join("train_log.csv"));
        assert_eq!(log.lines().count(), 1 + epochs, "{log}");
        let spec: serde_json::Value =
            serde_json::from_str(&read(&out.join(stage).join("model.json"))).unwrap();
        assert_eq!(spec["spec"]["classes"], 4);
        assert!(!out.join(stage).join("checkpoint").exists());
    }

    // Metrics in three formats that agree.
    for stage in ["eval-vanilla", "eval-off-ldl"] {
        let csv = read(&out.join(stage).join("metrics.csv"));
        let mut lines = csv.lines();
        assert_eq!(lines.next().unwrap(), stages::evaluate::CSV_HEADER);
        let row: Vec<&str> = lines.next().unwrap().split(',').collect();
        let acc: f64 = row[5].parse().unwrap();
        let ece: f64 = row[6].parse().unwrap();
        let nll: f64 = row[7].parse().unwrap();
        let brier: f64 = row[8].parse().unwrap();
        assert!((0.0..=1.0).contains(&acc) && (0.0..=1.0).contains(&ece));
        assert!(nll > 0.0 && (0.0..=2.0).contains(&brier));
        let json: serde_json::Value =
            serde_json::from_str(&read(&out.join(stage).join("metrics.json"))).unwrap();
        assert!((json["metrics"]["accuracy"].as_f64().unwrap() - acc).abs() < 1e-6);
        assert_eq!(json["metrics"]["n"], 80);
        assert_eq!(json["metrics"]["bins"].as_array().unwrap().len(), 10);
        let md = read(&out.join(stage).join("metrics.md"));
        assert!(md.contains(&format!("{:.2}%", 100.0 * acc)), "{md}");
    }

    // The report has one row per method.
    let report = read(&out.join("report/report.md"));
    assert!(report.contains("| vanilla | resnet8 | 1 |"), "{report}");
    assert!(report.contains("| off-ldl | resnet8 | 1 |"), "{report}");
    assert_eq!(read(&out.join("report/report.csv")).lines().count(), 3);
}

#[test]
fn same_seed_same_artifacts() {
    // Two runs into two output folders give byte-identical models, labels and metrics.
    let dir = scratch();
    write(dir.path(), "tiny.toml", TINY);
    for o in ["a", "b"] {
        let r = pipeline(dir.path(), &["run", "tiny.toml", "--output", o]);
        assert!(r.status.success(), "{}", stderr(&r));
    }
    for f in [
        "data/train.pack",
        "teacher/model.safetensors",
        "labels/labels.parquet",
        "off-ldl/model.safetensors",
        "eval-off-ldl/metrics.csv",
    ] {
        let a = std::fs::read(dir.path().join("a").join(f)).unwrap();
        let b = std::fs::read(dir.path().join("b").join(f)).unwrap();
        assert!(a == b, "{f} differs between identical runs");
    }
}

#[test]
fn prepare_holds_out_a_seeded_validation_split() {
    let dir = scratch();
    let cfg = "[run]\noutput = \"out\"\nseed = 4\n[[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\n\
               train_size = 100\ntest_size = 10\nimage_size = 8\nlimit = 80\nval = 20\n";
    write(dir.path(), "v.toml", cfg);
    let o = pipeline(dir.path(), &["run", "v.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out/data");
    let train = PackedStore::open(&out.join("train.pack")).unwrap();
    let val = PackedStore::open(&out.join("val.pack")).unwrap();
    assert_eq!((train.len(), val.len()), (60, 20));
    // No image is in both splits.
    for i in 0..val.len() {
        assert!((0..train.len()).all(|j| train.image(j) != val.image(i)));
    }
    let info: serde_json::Value = serde_json::from_str(&read(&out.join("dataset.json"))).unwrap();
    assert_eq!(info["val"]["n"], 20);
    let rec: serde_json::Value = serde_json::from_str(&read(&out.join("stage.json"))).unwrap();
    assert!(rec["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["path"] == "val.pack"));
}
