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
    assert_eq!(labels.len(), 160);
    assert_eq!(labels.meta.teachers.len(), 1);
    // The teacher's labels are soft: not every row is one-hot.
    assert!(labels
        .to_dense()
        .chunks(4)
        .any(|r| r.iter().all(|&p| p < 0.999)));

    // Models: weights, spec and a training log with one row per epoch.
    for (stage, epochs) in [("teacher", 2), ("vanilla", 1), ("off-ldl", 1)] {
        let log = read(&out.join(stage).join("train_log.csv"));
        assert_eq!(log.lines().count(), 1 + epochs, "{log}");
        let spec: serde_json::Value =
            serde_json::from_str(&read(&out.join(stage).join("model.json"))).unwrap();
        assert_eq!(spec["spec"]["classes"], 4);
        assert!(!out.join(stage).join("checkpoints").exists());
        let class_loss = read(&out.join(stage).join("class_loss.csv"));
        assert_eq!(class_loss.lines().count(), 1 + epochs * 4, "{class_loss}");
    }

    // Metrics in three formats that agree.
    for stage in ["eval-vanilla", "eval-off-ldl"] {
        let csv = read(&out.join(stage).join("metrics.csv"));
        let mut lines = csv.lines();
        assert_eq!(lines.next().unwrap(), stages::kinds::evaluate::CSV_HEADER);
        let row: Vec<&str> = lines.next().unwrap().split(',').collect();
        let acc: f64 = row[5].parse().unwrap();
        let ece: f64 = row[6].parse().unwrap();
        let nll: f64 = row[7].parse().unwrap();
        let brier: f64 = row[8].parse().unwrap();
        assert!((0.0..=1.0).contains(&acc) && (0.0..=1.0).contains(&ece));
        assert!(nll > 0.0 && (0.0..=2.0).contains(&brier));
        // The top-label score is one of the summed score's terms (the predicted class's, when
        // wrong) or equals it minus the other classes' terms (when right): never larger.
        let brier_top: f64 = row[14].parse().unwrap();
        assert!((0.0..=1.0).contains(&brier_top) && brier_top <= brier + 1e-9);
        let json: serde_json::Value =
            serde_json::from_str(&read(&out.join(stage).join("metrics.json"))).unwrap();
        assert!((json["metrics"]["accuracy"].as_f64().unwrap() - acc).abs() < 1e-6);
        assert!((json["metrics"]["brier_top_label"].as_f64().unwrap() - brier_top).abs() < 1e-6);
        assert_eq!(json["metrics"]["n"], 80);
        assert_eq!(json["metrics"]["bins"].as_array().unwrap().len(), 10);
        let md = read(&out.join(stage).join("metrics.md"));
        assert!(md.contains(&format!("{:.2}%", 100.0 * acc)), "{md}");
    }

    // The report has one row per method.
    let report = read(&out.join("report/report.md"));
    assert!(report.contains("| Vanilla | resnet8 | 1 |"), "{report}");
    assert!(report.contains("| Off-LDL | resnet8 | 1 |"), "{report}");
    assert_eq!(read(&out.join("report/report.csv")).lines().count(), 3);

    // `pipeline inspect` summarises the label store and the packed splits of a stage folder.
    let o = pipeline(
        dir.path(),
        &["inspect", "out/labels/labels.parquet", "--rows", "3"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for want in [
        "160 rows",
        "probs      FixedSizeList",
        "BYTE_STREAM_SPLIT",
        "ldl.dataset_fingerprint",
        &train.hash(),
        "teacher                    160",
        "first rows (source, index, label, top classes):",
    ] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }
    let first_rows = text.split("first rows").nth(1).unwrap();
    assert_eq!(first_rows.matches("\n    teacher ").count(), 3, "{text}");
    let o = pipeline(dir.path(), &["inspect", "out/data"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("images 160  shape C×H×W 3×16×16  classes K = 4"),
        "{text}"
    );
    assert!(text.contains("images 80 "), "{text}");
    assert!(
        text.contains("source records of the packed images: train 160, test 80"),
        "{text}"
    );
    // An evaluation's folder: its predictions, with the accuracy its metrics.json reports.
    let o = pipeline(dir.path(), &["inspect", "out/eval-vanilla", "--rows", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let json: serde_json::Value =
        serde_json::from_str(&read(&out.join("eval-vanilla/metrics.json"))).unwrap();
    let accuracy = json["metrics"]["accuracy"].as_f64().unwrap();
    let want = format!("80 predictions: accuracy {:.2}%", 100.0 * accuracy);
    assert!(text.contains(&want), "missing `{want}` in:\n{text}");
    let first_rows = text.split("first rows (index, label, top classes):").nth(1);
    assert_eq!(
        first_rows.map(|t| t.trim().lines().count()),
        Some(2),
        "{text}"
    );
    // Labels and top classes are named by the evaluation's classes.
    let classes: Vec<String> = serde_json::from_value(json["classes"].clone()).unwrap();
    for line in first_rows.unwrap().trim().lines() {
        let label = line.split_whitespace().nth(1).unwrap();
        assert!(classes.iter().any(|c| c == label), "{label}: {text}");
        let top = line.split_whitespace().nth(2).unwrap();
        assert!(classes.iter().any(|c| c == top), "{top}: {text}");
    }
    let o = pipeline(dir.path(), &["inspect", "tiny.toml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("expected a label store (.parquet)"),
        "{}",
        stderr(&o)
    );
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
    let spec = "kind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 100\ntest_size = 10\nimage_size = 8\n";
    let cfg = format!(
        "[run]\noutput = \"out\"\nseed = 4\n[[stage]]\nname = \"data\"\n{spec}limit = 80\nval = 20\n\
         [[stage]]\nname = \"full\"\n{spec}"
    );
    write(dir.path(), "v.toml", &cfg);
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
    // records.parquet maps each packed image to its place among the 100 generated ones: the
    // same image in the stage that keeps them all.
    let full = PackedStore::open(&dir.path().join("out/full/train.pack")).unwrap();
    let rows = records(&out.join("records.parquet"));
    assert_eq!(rows.len(), 60 + 10 + 20);
    let mut seen = std::collections::HashSet::new();
    for (split, index, record, file) in &rows {
        assert_eq!(file, &None);
        let (i, r) = (*index as usize, *record as usize);
        match split.as_str() {
            "train" => assert_eq!(train.image(i), full.image(r), "train {i} ← {r}"),
            "val" => assert_eq!(val.image(i), full.image(r), "val {i} ← {r}"),
            "test" => assert_eq!(i, r),
            other => panic!("split {other}"),
        }
        if split != "test" {
            assert!(seen.insert(r), "record {r} packed twice");
        }
    }
}

/// A teacher trained with dropout gets a Monte-Carlo dropout source with its uncertainty columns;
/// the deterministic sources have them null.
#[test]
fn a_dropout_teacher_gets_monte_carlo_labels() {
    use arrow::array::{Array, FixedSizeListArray, Float32Array, StringArray};
    let dir = scratch();
    let cfg = TINY.replacen(
        "name = \"teacher\"\nkind = \"train\"",
        "name = \"teacher\"\nkind = \"train\"\ndropout = 0.3",
        1,
    );
    assert_ne!(cfg, TINY);
    let cfg = cfg.replacen(
        "name = \"labels\"\nkind = \"label\"",
        "name = \"labels\"\nkind = \"label\"\nmc_samples = 8",
        1,
    );
    write(dir.path(), "mc.toml", &cfg);
    let o = pipeline(dir.path(), &["run", "mc.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    let train = PackedStore::open(&out.join("data/train.pack")).unwrap();
    let path = out.join("labels/labels.parquet");
    // The MC mean is a valid distribution for every sample, and differs from the deterministic one.
    let mc = label_store::read(
        &path,
        "teacher.mc",
        160,
        &train.info().classes,
        &train.hash(),
    )
    .unwrap();
    let det =
        label_store::read(&path, "teacher", 160, &train.info().classes, &train.hash()).unwrap();
    assert_ne!(mc.to_dense(), det.to_dense());
    // The metadata names the MC settings and the exact teacher weights.
    let meta = label_store::read_meta(&path).unwrap();
    let mc_meta = meta.mc.expect("ldl.mc");
    assert_eq!((mc_meta.samples, mc_meta.dropout["teacher"]), (8, 0.3));
    let weights = std::fs::read(out.join("teacher/model.safetensors")).unwrap();
    assert_eq!(
        meta.checkpoints["teacher"],
        blake3::hash(&weights).to_hex().as_str()
    );
    let (mut mc_rows, mut positive_mi) = (0, 0);
    for batch in parquet_batches(&path) {
        let col = |n: &str| batch.column_by_name(n).unwrap().clone();
        let source = col("source");
        let source = source.as_any().downcast_ref::<StringArray>().unwrap();
        let std = col("std");
        let std = std.as_any().downcast_ref::<FixedSizeListArray>().unwrap();
        let entropy = col("entropy");
        let entropy = entropy.as_any().downcast_ref::<Float32Array>().unwrap();
        let mi = col("mutual_information");
        let mi = mi.as_any().downcast_ref::<Float32Array>().unwrap();
        for r in 0..batch.num_rows() {
            if source.value(r) == "teacher.mc" {
                mc_rows += 1;
                assert!(std.is_valid(r) && entropy.is_valid(r) && mi.is_valid(r));
                let (h, i) = (entropy.value(r), mi.value(r));
                // 0 ≤ MI ≤ H ≤ ln K.
                assert!(
                    (0.0..=h + 1e-6).contains(&i) && h <= 4f32.ln() + 1e-5,
                    "H {h}, MI {i}"
                );
                positive_mi += (i > 0.0) as usize;
                let sd = std.value(r);
                let sd = sd.as_any().downcast_ref::<Float32Array>().unwrap();
                assert!(sd.values().iter().all(|v| (0.0..=0.5).contains(v)));
            } else {
                assert!(std.is_null(r) && entropy.is_null(r) && mi.is_null(r));
            }
        }
    }
    assert_eq!(mc_rows, 160);
    // Dropout at p = 0.3 makes the passes disagree somewhere.
    assert!(positive_mi > 0);
}

/// A top-k label store (`top_k = 2` of K = 4) is written, read back as full distributions by an
/// off-ldl student, and shown by `pipeline inspect`.
#[test]
fn a_top_k_store_feeds_a_student() {
    let dir = scratch();
    let cfg = TINY.replacen(
        "name = \"labels\"\nkind = \"label\"",
        "name = \"labels\"\nkind = \"label\"\ntop_k = 2",
        1,
    );
    assert_ne!(cfg, TINY);
    write(dir.path(), "k.toml", &cfg);
    let o = pipeline(dir.path(), &["run", "k.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    let train = PackedStore::open(&out.join("data/train.pack")).unwrap();
    let path = out.join("labels/labels.parquet");
    assert_eq!(label_store::read_meta(&path).unwrap().top_k, Some(2));
    let labels =
        label_store::read(&path, "teacher", 160, &train.info().classes, &train.hash()).unwrap();
    // Every row: two stored classes, the other two share the rest equally.
    for row in labels.to_dense().chunks(4) {
        let mut sorted = row.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        assert!((sorted[2] - sorted[3]).abs() < 1e-6, "{row:?}");
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    }
    assert!(out.join("off-ldl/model.safetensors").exists());
    let o = pipeline(dir.path(), &["inspect", "out/labels", "--rows", "1"]);
    let text = stdout(&o);
    assert!(
        o.status.success() && text.contains("topk_classes") && text.contains("ldl.top_k"),
        "{text}"
    );
}

/// A label stage refuses, before labelling, a `top_k` above K and a teacher whose name would
/// be the name of another source (`ensemble` beside the ensemble).
#[test]
fn a_label_stage_refuses_top_k_above_k_and_teachers_named_as_other_sources() {
    let dir = scratch();
    let upto_students = TINY
        .find("[[stage]]\nname = \"vanilla\"")
        .expect("TINY has a `vanilla` stage after `labels`");
    let labels = TINY[..upto_students].replacen(
        "name = \"labels\"\nkind = \"label\"",
        "name = \"labels\"\nkind = \"label\"\ntop_k = 5",
        1,
    );
    write(dir.path(), "k.toml", &labels);
    let o = pipeline(dir.path(), &["run", "k.toml"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("labels: top_k = 5 is more than the dataset's 4 classes"),
        "{}",
        stderr(&o)
    );
    let clash = TINY[..upto_students].replacen(
        "name = \"labels\"\nkind = \"label\"\nneeds = [\"data\", \"teacher\"]",
        "name = \"ensemble\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\n\
         width = 4\nmethod = \"vanilla\"\nepochs = 1\nbatch_size = 32\n\n[[stage]]\n\
         name = \"labels\"\nkind = \"label\"\nneeds = [\"data\", \"teacher\", \"ensemble\"]",
        1,
    );
    assert!(clash.contains("\"ensemble\"]"), "TINY changed: {clash}");
    write(dir.path(), "clash.toml", &clash);
    let o = pipeline(dir.path(), &["run", "clash.toml"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(
            "teacher `ensemble` and the ensemble of the teachers would both be source `ensemble`"
        ),
        "{}",
        stderr(&o)
    );
    assert!(!dir.path().join("out/labels").exists());
}

/// `splits` labels the validation and test splits too, each in its own file indexed by its own
/// split; asking for `val` without a held-out split is a clear error.
#[test]
fn the_label_stage_labels_every_split_asked_for() {
    let dir = scratch();
    let cfg = TINY
        .replacen("image_size = 16", "image_size = 16\nval = 32", 1)
        .replacen(
            "name = \"labels\"\nkind = \"label\"",
            "name = \"labels\"\nkind = \"label\"\nsplits = [\"train\", \"val\", \"test\"]",
            1,
        );
    write(dir.path(), "s.toml", &cfg);
    let o = pipeline(dir.path(), &["run", "s.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    for (split, file, n) in [
        ("train", "labels.parquet", 128),
        ("val", "labels-val.parquet", 32),
        ("test", "labels-test.parquet", 80),
    ] {
        let store = PackedStore::open(&out.join(format!("data/{split}.pack"))).unwrap();
        assert_eq!(store.len(), n);
        let labels = label_store::read(
            &out.join("labels").join(file),
            "teacher",
            n,
            &store.info().classes,
            &store.hash(),
        )
        .unwrap_or_else(|e| panic!("{split}: {e}"));
        assert_eq!(labels.len(), n);
    }
    let bad = TINY.replacen(
        "name = \"labels\"\nkind = \"label\"",
        "name = \"labels\"\nkind = \"label\"\nsplits = [\"val\"]",
        1,
    );
    write(dir.path(), "bad.toml", &bad);
    let o = pipeline(dir.path(), &["run", "bad.toml", "--output", "bad-out"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o)
            .contains("split `val` asked for, but the prepare stage held no validation split out"),
        "{}",
        stderr(&o)
    );
}

/// `eval_every` logs the held-out split's NLL, accuracy and ECE in `train_log.csv` after every
/// that many epochs and the last, without changing the training: the weights are bitwise those
/// of the same training without it, and the last row agrees with the evaluate stage.
#[test]
fn eval_every_logs_held_out_metrics_and_trains_the_same() {
    let dir = scratch();
    let training = |name: &str, extra: &str| {
        format!(
            "\n[[stage]]\nname = \"{name}\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\n\
             width = 4\nmethod = \"vanilla\"\nepochs = 3\nbatch_size = 32\nschedule = {{ type = \"cosine\" }}\n{extra}\n"
        )
    };
    let cfg = format!(
        "[run]\noutput = \"out\"\nseed = 3\nthreads = 2\n\n[[stage]]\nname = \"data\"\nkind = \"prepare\"\n\
         source = \"synthetic\"\ntrain_size = 160\ntest_size = 80\nclasses = 4\nimage_size = 16\n{}{}{}\n\
         [[stage]]\nname = \"eval\"\nkind = \"evaluate\"\nneeds = [\"data\", \"logged\"]\n\n\
         [[stage]]\nname = \"eval_seed4\"\nkind = \"evaluate\"\nneeds = [\"data\", \"seed4\"]\n\n\
         [[stage]]\nname = \"eval_plain\"\nkind = \"evaluate\"\nneeds = [\"data\", \"plain\"]\n\n\
         [[stage]]\nname = \"report\"\nkind = \"report\"\nneeds = [\"eval\", \"eval_seed4\", \"eval_plain\"]\n",
        training("plain", ""),
        training("logged", "eval_every = 2"),
        training("seed4", "eval_every = 2\nseed = 4"),
    );
    write(dir.path(), "e.toml", &cfg);
    let o = pipeline(dir.path(), &["run", "e.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    let bytes = |p: &str| std::fs::read(out.join(p)).unwrap();
    assert!(bytes("plain/model.safetensors") == bytes("logged/model.safetensors"));
    let plain = read(&out.join("plain/train_log.csv"));
    assert!(
        plain.starts_with("epoch,lr,loss,accuracy,images_per_s,seconds\n"),
        "{plain}"
    );
    let log = read(&out.join("logged/train_log.csv"));
    let rows: Vec<Vec<&str>> = log.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(
        rows[0],
        [
            "epoch",
            "lr",
            "loss",
            "accuracy",
            "images_per_s",
            "seconds",
            "test_nll",
            "test_accuracy",
            "test_ece"
        ]
    );
    // Epoch 1 not evaluated; 2 (every 2) and 3 (the last) evaluated.
    assert_eq!(&rows[1][6..], ["", "", ""], "{log}");
    for r in &rows[2..] {
        assert!(r[6..].iter().all(|v| v.parse::<f64>().is_ok()), "{log}");
    }
    // The training columns are the plain training's.
    for (a, b) in plain.lines().zip(log.lines()).skip(1) {
        let (a, b): (Vec<&str>, Vec<&str>) = (a.split(',').collect(), b.split(',').collect());
        assert_eq!(a[..4], b[..4]);
    }
    // The last row agrees with the evaluate stage on the same model and split.
    let json: serde_json::Value =
        serde_json::from_str(&read(&out.join("eval/metrics.json"))).unwrap();
    let m = &json["metrics"];
    let last = &rows[3];
    let num = |s: &str| s.parse::<f64>().unwrap();
    assert_eq!(num(last[7]), m["accuracy"].as_f64().unwrap(), "{log}");
    assert!(
        (num(last[6]) - m["nll"].as_f64().unwrap()).abs() < 1e-5,
        "{log}"
    );
    assert!(
        (num(last[8]) - m["ece"].as_f64().unwrap()).abs() < 1e-5,
        "{log}"
    );
    // The evaluate stage copies the evaluated rows' columns into curve.csv and draws them; the
    // report draws every row's curve. A training without eval_every has none.
    // (The header row names the same columns.)
    let curve: Vec<String> = rows
        .iter()
        .filter(|r| !r[6].is_empty())
        .map(|r| [r[0], r[2], r[3], r[6], r[7], r[8]].join(","))
        .collect();
    assert_eq!(
        read(&out.join("eval/curve.csv")),
        format!("{}\n", curve.join("\n"))
    );
    assert!(out.join("eval/training-curve.png").exists());
    assert!(!out.join("eval_plain/curve.csv").exists());
    assert!(!out.join("eval_plain/training-curve.png").exists());
    for f in ["training-curves.png", "training-curves.svg"] {
        assert!(out.join("report").join(f).exists(), "{f}");
    }
    assert!(read(&out.join("report/report.md")).contains("](training-curves.png)"));
    let html = read(&out.join("report/index.html"));
    assert!(html.contains("src=\"training-curves.svg\""));
    assert!(html.contains("src=\"../eval_seed4/training-curve.svg\""));
    assert!(!html.contains("src=\"../eval_plain/training-curve.svg\""));
    // Not fingerprinted: set on the finished plain training, it reruns nothing.
    let plain_cfg = cfg.replacen("name = \"plain\"", "name = \"plain\"\neval_every = 1", 1);
    assert_ne!(plain_cfg, cfg);
    write(dir.path(), "e.toml", &plain_cfg);
    let o = pipeline(dir.path(), &["status", "e.toml", "--exit-code"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
}

/// The supervision examples of an online student (the paper's Fig. 6) show what its teacher
/// gives the images: with neither augmentation nor mixing, each example's top-3 is the label
/// stage's row for that image, computed apart (another pass, in other batches).
#[test]
fn supervision_examples_show_the_label_stages_distributions() {
    use arrow::array::{Array, FixedSizeListArray, Float32Array, StringArray, UInt32Array};
    let dir = scratch();
    let until_labels = TINY.split("[[stage]]\nname = \"vanilla\"").next().unwrap();
    let cfg = format!(
        "{until_labels}[[stage]]\nname = \"student\"\nkind = \"train\"\nneeds = [\"data\", \"teacher\"]\n\
         model = \"resnet8\"\nwidth = 4\nmethod = \"on-ldl\"\naugment = \"none\"\nepochs = 1\n\
         batch_size = 16\n"
    );
    write(dir.path(), "s.toml", &cfg);
    let o = pipeline(dir.path(), &["run", "s.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    let mut rows = std::collections::HashMap::new();
    for batch in parquet_batches(&out.join("labels/labels.parquet")) {
        let col = |n: &str| batch.column_by_name(n).unwrap().clone();
        let (index, source, probs) = (col("index"), col("source"), col("probs"));
        let index = index.as_any().downcast_ref::<UInt32Array>().unwrap();
        let source = source.as_any().downcast_ref::<StringArray>().unwrap();
        let probs = probs.as_any().downcast_ref::<FixedSizeListArray>().unwrap();
        for r in 0..batch.num_rows() {
            assert_eq!(source.value(r), "teacher");
            let row = probs.value(r);
            let row = row.as_any().downcast_ref::<Float32Array>().unwrap();
            rows.insert(index.value(r), row.values().to_vec());
        }
    }
    let json: serde_json::Value =
        serde_json::from_str(&read(&out.join("student/supervision.json"))).unwrap();
    let examples = json.as_array().unwrap();
    assert_eq!(examples.len(), 8);
    for e in examples {
        let row = &rows[&(e["index"].as_u64().unwrap() as u32)];
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        let shown: Vec<(usize, f64)> = e["teachers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_u64().unwrap() as usize, p[1].as_f64().unwrap()))
            .collect();
        assert_eq!(shown.len(), 3, "{e}");
        for (&(class, p), &want) in shown.iter().zip(&order) {
            assert_eq!(class, want, "{e}: {row:?}");
            assert!((p - row[want] as f64).abs() < 1e-5, "{e}: {row:?}");
        }
        // Unmixed: the label is the image's own, taught at weight 1.
        assert_eq!(e["mixed_label"][0][0], e["label"]);
        assert_eq!(e["mixed_label"][0][1].as_f64(), Some(1.0));
    }
}
