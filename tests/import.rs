//! The `import` stage through the binary: a ResNet-8 written by PyTorch (the committed fixtures
//! of tests/fixtures/import, made by its make_fixtures.py) evaluates to PyTorch's own
//! predictions of the same images, from the `.pth` and from the `.safetensors`; an imported
//! teacher labels and teaches online unchanged; the fingerprint follows the file's content, not
//! its path; malformed checkpoints fail with errors naming the file and the tensor.

mod common;
use candle_core::Device;
use common::*;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/import")
}

/// A run over the fixture CIFAR-10 (16 training, 64 test images) importing `checkpoint`.
fn config(checkpoint: &str, extra: &str) -> String {
    let f = fixtures();
    format!(
        r#"
[run]
output = "out"
threads = 2

[[stage]]
name = "data"
kind = "prepare"
source = "cifar10"
path = "{data}"
batches = [1]

[[stage]]
name = "teacher"
kind = "import"
path = "{checkpoint}"
model = "resnet8"

[[stage]]
name = "eval"
kind = "evaluate"
needs = ["data", "teacher"]
batch_size = 16
{extra}"#,
        data = f.join("cifar10").display(),
    )
}

#[derive(serde::Deserialize)]
struct Expected {
    accuracy: f64,
    predicted: Vec<usize>,
    logits: Vec<Vec<f64>>,
}

fn expected() -> Expected {
    serde_json::from_slice(&std::fs::read(fixtures().join("resnet8_predictions.json")).unwrap())
        .unwrap()
}

/// The logits column of `predictions.parquet`, row by row.
fn logits(path: &Path) -> Vec<Vec<f32>> {
    use arrow::array::{Array, FixedSizeListArray, Float32Array};
    let mut rows = Vec::new();
    for batch in parquet_batches(path) {
        let col = batch.column_by_name("logits").unwrap();
        let list = col.as_any().downcast_ref::<FixedSizeListArray>().unwrap();
        for r in 0..list.len() {
            let v = list.value(r);
            let v = v.as_any().downcast_ref::<Float32Array>().unwrap();
            rows.push(v.values().to_vec());
        }
    }
    rows
}

/// Asserts that the evaluations `got` and `want` (their `predictions.parquet`) hold `n` rows of
/// the same logits, within 1e-5 relative.
fn assert_same_logits(got: &Path, want: &Path, n: usize) {
    let (got, want) = (
        logits(&got.join("predictions.parquet")),
        logits(&want.join("predictions.parquet")),
    );
    assert_eq!(got.len(), n);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        for (a, b) in g.iter().zip(w) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "image {i}: {g:?} vs {w:?}"
            );
        }
    }
}

/// A `w`×`h` test image of class `class`: every channel a different modular pattern, shifted by
/// `seed`.
fn pattern(w: u32, h: u32, seed: u32, class: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let v = |c: u32| ((x * 37 + y * 91 + c * 53 + seed * 29 + class * 80) % 256) as u8;
        image::Rgb([v(0), v(1), v(2)])
    })
}

/// Writes `img` to `dir/root/rel`, making its folders.
fn save_png(dir: &Path, root: &str, rel: &str, img: &image::RgbImage) {
    let p = dir.join(root).join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    img.save(&p).unwrap();
}

/// The imported teacher's `model.json` under the output root `out`.
fn teacher_json(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("teacher/model.json")).unwrap()).unwrap()
}

/// `evaluate` on the imported model reproduces PyTorch's logits, predictions and accuracy.
fn check_against_pytorch(out: &Path) {
    let want = expected();
    let got = logits(&out.join("eval/predictions.parquet"));
    assert_eq!(got.len(), want.logits.len());
    for (i, (g, w)) in got.iter().zip(&want.logits).enumerate() {
        for (k, (a, b)) in g.iter().zip(w).enumerate() {
            let tol = 1e-4 * (1.0 + b.abs());
            assert!(
                (*a as f64 - b).abs() <= tol,
                "image {i} class {k}: {a} here, {b} in PyTorch"
            );
        }
        let argmax = (0..g.len()).max_by(|&a, &b| g[a].total_cmp(&g[b])).unwrap();
        assert_eq!(argmax, want.predicted[i], "image {i}");
    }
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("eval/metrics.json")).unwrap()).unwrap();
    assert_eq!(
        metrics["metrics"]["accuracy"].as_f64().unwrap(),
        want.accuracy
    );
    assert_eq!(metrics["method"], "imported");
}

#[test]
fn a_pytorch_resnet8_evaluates_to_pytorchs_predictions_from_pth_and_safetensors() {
    let dir = scratch();
    let pth = fixtures().join("resnet8.pth");
    write(
        dir.path(),
        "p.toml",
        &config(&pth.display().to_string(), ""),
    );
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    check_against_pytorch(&out);
    let meta = teacher_json(&out);
    assert_eq!(meta["imported"]["key"], "model");
    assert_eq!(meta["imported"]["format"], "pth");
    assert_eq!(meta["spec"]["classes"], 10);
    assert_eq!(meta["spec"]["width"], 16);
    assert_eq!(
        meta["imported"]["blake3"],
        blake3::hash(&std::fs::read(&pth).unwrap())
            .to_hex()
            .as_str()
    );

    // The same weights in safetensors, with DataParallel's `module.` prefix.
    let st = fixtures().join("resnet8.safetensors");
    let dir2 = scratch();
    write(
        dir2.path(),
        "p.toml",
        &config(&st.display().to_string(), ""),
    );
    let o = pipeline(dir2.path(), &["run", "p.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    check_against_pytorch(&dir2.path().join("out"));
    let meta = teacher_json(&dir2.path().join("out"));
    assert_eq!(meta["imported"]["data_parallel"], true);
    // Both imports hold the same weights.
    assert_eq!(
        std::fs::read(out.join("teacher/model.safetensors")).unwrap(),
        std::fs::read(dir2.path().join("out/teacher/model.safetensors")).unwrap()
    );
}

/// `prefix` picks the student of a checkpoint holding a student and a teacher: the import
/// evaluates to PyTorch's predictions of the student's weights, and `model.json` records the
/// prefix; a prefix not ending with `.` is a config error, and one no name has fails the stage
/// naming it.
#[test]
fn a_prefix_imports_one_network_of_a_checkpoint_holding_two() {
    let dir = scratch();
    let weights =
        candle_core::safetensors::load(fixtures().join("resnet8.safetensors"), &Device::Cpu)
            .unwrap();
    let mut both = std::collections::HashMap::new();
    for (name, t) in weights {
        both.insert(format!("teacher.{name}"), t.zeros_like().unwrap());
        both.insert(format!("student.{name}"), t);
    }
    candle_core::safetensors::save(&both, dir.path().join("kd.safetensors")).unwrap();
    let with = |prefix: &str| {
        config("kd.safetensors", "").replace(
            "model = \"resnet8\"",
            &format!("model = \"resnet8\"\nprefix = \"{prefix}\""),
        )
    };
    write(dir.path(), "p.toml", &with("student."));
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    check_against_pytorch(&out);
    let meta = teacher_json(&out);
    assert_eq!(meta["imported"]["prefix"], "student.");
    assert_eq!(meta["imported"]["data_parallel"], true);

    // A prefix ends between two parts of a name.
    write(dir.path(), "p.toml", &with("student"));
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("key `prefix`") && e.contains("must end with `.`"),
        "{e}"
    );

    write(dir.path(), "p.toml", &with("ema."));
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("kd.safetensors")
            && e.contains("prefix `ema.`")
            && e.contains("`student.` (")
            && e.contains("`teacher.` ("),
        "{e}"
    );
}

/// `pipeline inspect` of a checkpoint whose state dict lies two dicts deep: it finds none by
/// default and says where tensors are; with `--key` it names the model, checks it, and prints
/// an import stage which, pasted into stages.toml as it is, evaluates to PyTorch's
/// predictions. Checkpoint options on a label store, and a file that is no checkpoint, are
/// errors.
#[test]
fn inspect_finds_a_nested_state_dict_and_prints_a_stage_that_imports_it() {
    let dir = scratch();
    std::fs::copy(fixtures().join("nested.pth"), dir.path().join("nested.pth")).unwrap();
    let o = pipeline(dir.path(), &["inspect", "nested.pth"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("run.weights") && text.contains("tensors are under `run.weights` (56)"),
        "{text}"
    );
    let o = pipeline(
        dir.path(),
        &["inspect", "nested.pth", "--key", "run.ema.v2"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("model: resnet8 — every tensor's name and shape checked"),
        "{text}"
    );
    let block: String = text
        .lines()
        .skip_while(|l| !l.contains("as a stage"))
        .skip(1)
        .take_while(|l| l.starts_with("    ") && !l.starts_with("     "))
        .map(|l| format!("{}\n", l.trim()))
        .collect();
    assert!(block.contains("key = \"run.ema.v2\""), "{text}");
    let imported = "[[stage]]\nname = \"teacher\"\nkind = \"import\"\npath = \"nested.pth\"\nmodel = \"resnet8\"\n";
    let toml = config("nested.pth", "");
    assert!(toml.contains(imported));
    write(dir.path(), "p.toml", &toml.replace(imported, &block));
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(o.status.success(), "{}\n{block}", stderr(&o));
    check_against_pytorch(&dir.path().join("out"));
    assert_eq!(
        teacher_json(&dir.path().join("out"))["imported"]["key"],
        "run.ema.v2"
    );

    let store = dir.path().join("out/eval/predictions.parquet");
    let o = pipeline(
        dir.path(),
        &["inspect", store.to_str().unwrap(), "--key", "model"],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("apply to model checkpoints only"),
        "{}",
        stderr(&o)
    );
    let o = pipeline(dir.path(), &["inspect", "nested.pth", "--model", "resnet9"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--model: unknown model `resnet9`"),
        "{}",
        stderr(&o)
    );
    let o = pipeline(dir.path(), &["inspect", "p.toml"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("p.toml") && e.contains("neither a PyTorch checkpoint"),
        "{e}"
    );
}

/// A copy of the checkpoint at another path is the same stage; other content is not.
#[test]
fn the_fingerprint_is_the_files_content_not_its_path() {
    let dir = scratch();
    let a = dir.path().join("a.pth");
    std::fs::copy(fixtures().join("resnet8.pth"), &a).unwrap();
    write(dir.path(), "p.toml", &config("a.pth", ""));
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(ran(&o), ["data", "teacher", "eval"]);

    std::fs::rename(&a, dir.path().join("moved.pth")).unwrap();
    write(dir.path(), "p.toml", &config("moved.pth", ""));
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(ran(&o).is_empty(), "{}", stderr(&o));

    // The safetensors file holds the same weights but is another file: a new import.
    std::fs::copy(
        fixtures().join("resnet8.safetensors"),
        dir.path().join("moved.pth"),
    )
    .unwrap();
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(ran(&o), ["teacher", "eval"]);

    // A pinned hash refuses any other content, at the key's line.
    let pin = "0".repeat(64);
    let cfg = config("moved.pth", "").replace(
        "model = \"resnet8\"",
        &format!("model = \"resnet8\"\nblake3 = \"{pin}\""),
    );
    write(dir.path(), "p.toml", &cfg);
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    let line = cfg.lines().position(|l| l.starts_with("blake3")).unwrap() + 1;
    assert!(
        e.contains(&format!("p.toml:{line}:"))
            && e.contains("key `blake3`")
            && e.contains("moved.pth"),
        "{e}"
    );
    // So does a missing file, at `path`.
    write(dir.path(), "p.toml", &config("nowhere.pth", ""));
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("key `path`") && stderr(&o).contains("nowhere.pth"),
        "{}",
        stderr(&o)
    );
}

/// An imported teacher feeds a label stage and an online student as a trained one does.
#[test]
fn an_imported_teacher_labels_and_teaches_online() {
    let dir = scratch();
    let pth = fixtures().join("resnet8.pth");
    let extra = r#"
[[stage]]
name = "labels"
kind = "label"
needs = ["data", "teacher"]
splits = ["test"]

[[stage]]
name = "student"
kind = "train"
needs = ["data", "teacher"]
model = "resnet8"
width = 4
method = "on-ldl"
epochs = 1
batch_size = 8
"#;
    write(
        dir.path(),
        "p.toml",
        &config(&pth.display().to_string(), extra),
    );
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    // The stored distributions are the softmax of PyTorch's logits.
    let want = expected();
    let store = out.join("labels/labels-test.parquet");
    let meta = stages::label_store::read_meta(&store).unwrap();
    assert_eq!(meta.teachers.len(), 1);
    let test = datasets::PackedStore::open(&out.join("data/test.pack")).unwrap();
    let labels =
        stages::label_store::read(&store, "teacher", 64, &test.info().classes, &test.hash())
            .unwrap()
            .to_dense();
    for (i, w) in want.logits.iter().enumerate() {
        let max = w.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = w.iter().map(|v| (v - max).exp()).sum();
        for (k, v) in w.iter().enumerate() {
            let p = (v - max).exp() / z;
            let got = labels[i * 10 + k] as f64;
            assert!((got - p).abs() < 1e-4, "image {i} class {k}: {got} vs {p}");
        }
    }
    assert!(out.join("student/model.safetensors").exists());
}

/// Malformed checkpoints: each a clear error naming the file and the tensor or key, exit ≠ 0,
/// and nothing of the earlier import lost.
#[test]
fn malformed_checkpoints_fail_naming_the_file_and_the_tensor() {
    let dir = scratch();
    let bad = fixtures().join("bad");
    let cases = [
        (
            "missing.pth",
            "tensor `layer2.0.bn2.running_var`",
            "missing",
        ),
        (
            "wrong_shape.pth",
            "tensor `layer3.0.conv2.weight`",
            "shape [8, 8, 1, 1], the model expects [8, 8, 3, 3]",
        ),
        (
            "extra.pth",
            "tensor `layer4.0.conv1.weight`",
            "not in this model",
        ),
        ("no_state_dict.pth", "data.pkl", "not a state dict"),
        ("list.pth", "data.pkl", "a list"),
        ("cut.th", "storage `", "past the end of the file"),
    ];
    // A legacy-format file cut short, as an interrupted download leaves it.
    let legacy = std::fs::read(fixtures().join("akamaster_resnet20.th")).unwrap();
    std::fs::write(dir.path().join("cut.th"), &legacy[..legacy.len() / 2]).unwrap();
    // A good import first: a failed one must leave it in place.
    write(
        dir.path(),
        "p.toml",
        &config(&fixtures().join("resnet8.pth").display().to_string(), ""),
    );
    assert!(pipeline(dir.path(), &["run", "p.toml"]).status.success());
    let good = std::fs::read(dir.path().join("out/teacher/model.safetensors")).unwrap();
    for (file, place, what) in cases {
        let path = if file == "cut.th" {
            dir.path().join(file)
        } else {
            bad.join(file)
        };
        write(
            dir.path(),
            "p.toml",
            &config(&path.display().to_string(), ""),
        );
        let o = pipeline(dir.path(), &["run", "p.toml"]);
        assert!(!o.status.success(), "{file} was accepted");
        let e = stderr(&o);
        assert!(
            e.contains(&path.display().to_string()) && e.contains(place) && e.contains(what),
            "{file}: {e}"
        );
        assert_eq!(
            std::fs::read(dir.path().join("out/teacher/model.safetensors")).unwrap(),
            good,
            "{file}"
        );
    }
    // A `key` that is not in the checkpoint names the keys that are.
    let cfg = config(&fixtures().join("resnet8.pth").display().to_string(), "").replace(
        "model = \"resnet8\"",
        "model = \"resnet8\"\nkey = \"state_dict\"",
    );
    write(dir.path(), "p.toml", &cfg);
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("key `state_dict`") && e.contains("\"model\"") && e.contains("\"epoch\""),
        "{e}"
    );
    // Another architecture's checkpoint: resnet8 weights are not a resnet14.
    let cfg = config(&fixtures().join("resnet8.pth").display().to_string(), "")
        .replace("model = \"resnet8\"", "model = \"resnet14\"");
    write(dir.path(), "p.toml", &cfg);
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("tensor `layer1.1.bn1.bias`") && e.contains("missing"),
        "{e}"
    );
}

/// akamaster/pytorch_resnet_cifar10's published ResNet-20 (the legacy format of PyTorch 0.3,
/// `module.` names, option A) imported with the ImageNet statistics its trainer.py normalises
/// with evaluates the fixture's test images to the logits akamaster's own code computes for them
/// in PyTorch (tests/fixtures/import/make_reference_fixtures.py).
#[test]
fn akamasters_published_resnet20_evaluates_to_pytorchs_logits() {
    let dir = scratch();
    let th = fixtures().join("akamaster_resnet20.th");
    let cfg = config(&th.display().to_string(), "").replace(
        "model = \"resnet8\"",
        "model = \"resnet20\"\nnormalize = { mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] }",
    );
    write(dir.path(), "p.toml", &cfg);
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    let meta = teacher_json(&out);
    assert_eq!(meta["imported"]["format"], "pth-legacy");
    assert_eq!(meta["imported"]["key"], "state_dict");
    assert_eq!(meta["imported"]["naming"], "kuangliu");
    assert_eq!(meta["imported"]["data_parallel"], true);
    assert_eq!(meta["spec"]["shortcut"], "A");
    let want: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("reference_logits.json")).unwrap())
            .unwrap();
    let want = &want["akamaster_resnet20_test_batch"]["logits"];
    let got = logits(&out.join("eval/predictions.parquet"));
    assert_eq!(got.len(), 64);
    for (i, row) in got.iter().enumerate() {
        for (k, a) in row.iter().enumerate() {
            let b = want[i][k].as_f64().unwrap();
            assert!(
                (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "image {i} class {k}: {a} here, {b} in PyTorch"
            );
        }
    }
}

/// Writes the fixture's CIFAR-10 test images as an ImageFolder tree (`val/<class>/NNN.png`, and
/// again under `train/`, which must hold every class), whose `prepare` fits its own
/// normalisation.
fn image_folder(root: &Path) {
    let f = fixtures().join("cifar10");
    let classes: Vec<String> = std::fs::read_to_string(f.join("batches.meta.txt"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    for split in ["train", "val"] {
        let file = "test_batch.bin";
        let bytes = std::fs::read(f.join(file)).unwrap();
        for (i, rec) in bytes.chunks_exact(3073).enumerate() {
            let dir = root.join(split).join(&classes[rec[0] as usize]);
            std::fs::create_dir_all(&dir).unwrap();
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                let p = (y * 32 + x) as usize;
                image::Rgb([rec[1 + p], rec[1 + 1024 + p], rec[1 + 2048 + p]])
            });
            // Zero-padded so that the folder order is the record order.
            img.save(dir.join(format!("{i:03}.png"))).unwrap();
        }
    }
}

/// An imported model's own normalisation (`normalize`) is what it is fed, whatever the
/// dataset's: over an ImageFolder copy of the images, whose statistics `prepare` fits, the
/// import stating CIFAR-10's statistics still reproduces PyTorch's logits; without it, it
/// does not.
#[test]
fn an_imported_models_own_normalisation_is_what_it_is_fed() {
    let dir = scratch();
    image_folder(&dir.path().join("images"));
    let pth = fixtures().join("resnet8.pth");
    let cfg = |normalize: &str| {
        format!(
            r#"
[run]
output = "out"
threads = 2

[[stage]]
name = "data"
kind = "prepare"
source = "imagefolder"
path = "images"
image_size = 32

[[stage]]
name = "teacher"
kind = "import"
path = "{}"
model = "resnet8"
{normalize}

[[stage]]
name = "eval"
kind = "evaluate"
needs = ["data", "teacher"]
"#,
            pth.display()
        )
    };
    write(
        dir.path(),
        "p.toml",
        &cfg("normalize = { mean = [0.4914, 0.4822, 0.4465], std = [0.2470, 0.2435, 0.2616] }"),
    );
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("data/dataset.json")).unwrap()).unwrap();
    assert_ne!(
        info["normalize"]["mean"][0].as_f64().unwrap() as f32,
        0.4914f32
    );
    // The ImageFolder test split is in class-folder order, the fixture in record order: match
    // them through the labels, which take 0..9 in turn in the fixture.
    let got = logits(&out.join("eval/predictions.parquet"));
    let want = expected();
    let order: Vec<usize> = (0..10).flat_map(|c| (c..64).step_by(10)).collect();
    for (row, &i) in order.iter().enumerate() {
        for (a, b) in got[row].iter().zip(&want.logits[i]) {
            assert!(
                (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "image {i}: {a} vs {b}"
            );
        }
    }
    // Fed the dataset's own statistics, the model computes other logits.
    write(dir.path(), "p.toml", &cfg(""));
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let other = logits(&out.join("eval/predictions.parquet"));
    assert!((other[0][0] as f64 - want.logits[0][0]).abs() > 1e-2);
}

/// Two imports of one recipe given seeds are one row of a report, averaged over both; without
/// seeds each file is a row of its own.
#[test]
fn imports_given_seeds_are_seeds_of_one_row() {
    let f = fixtures();
    let cfg = |seeds: [&str; 2]| {
        let mut text = config(&f.join("resnet8.pth").display().to_string(), "");
        text = text.replace(
            "name = \"teacher\"\nkind = \"import\"",
            &format!("name = \"teacher\"\nkind = \"import\"\n{}", seeds[0]),
        );
        text.push_str(&format!(
            r#"
[[stage]]
name = "teacher-b"
kind = "import"
path = "{st}"
model = "resnet8"
{seed}

[[stage]]
name = "eval-b"
kind = "evaluate"
needs = ["data", "teacher-b"]
batch_size = 16

[[stage]]
name = "report"
kind = "report"
needs = ["eval", "eval-b"]
"#,
            st = f.join("resnet8.safetensors").display(),
            seed = seeds[1],
        ));
        text
    };
    // Each row's (method, seeds) columns.
    let rows = |dir: &Path| -> Vec<(String, String)> {
        let csv = std::fs::read_to_string(dir.join("out/report/report.csv")).unwrap();
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        let at = |name| header.iter().position(|h| *h == name).unwrap();
        csv.lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f[at("method")].to_owned(), f[at("seeds")].to_owned())
            })
            .collect()
    };
    let dir = scratch();
    write(dir.path(), "p.toml", &cfg(["seed = 1", "seed = 2"]));
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = rows(dir.path());
    assert_eq!(got, [("imported".to_string(), "2".to_string())]);
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("out/teacher-b/model.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["seed"], 2);

    let dir = scratch();
    write(dir.path(), "p.toml", &cfg(["", ""]));
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = rows(dir.path());
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.iter().all(|(_, seeds)| seeds == "1"), "{got:?}");

    // One seed given to two files of one recipe is refused before anything runs.
    let dir = scratch();
    write(dir.path(), "p.toml", &cfg(["seed = 1", "seed = 1"]));
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("imports `teacher` and `teacher-b` give seed 1 to two different files"),
        "{e}"
    );
    assert!(!dir.path().join("out/data").exists());
}

/// A model trained on random resized crops (`crop_size = 12` of 16×16 images) is evaluated on
/// each image's centre 12×12 square: its predictions equal those of the same weights, imported,
/// on a dataset whose files are those centre squares themselves (cut here, independently of
/// the loader), under the first dataset's normalisation. A crop larger than the images is
/// refused with the stage and the sizes named.
#[test]
fn a_model_trained_on_crops_is_evaluated_on_their_centre_squares() {
    let dir = scratch();
    let save = |root: &str, rel: &str, img: &image::RgbImage| save_png(dir.path(), root, rel, img);
    for (split, n) in [("train", 18u32), ("val", 6)] {
        for i in 0..n {
            let (class, seed) = (i % 3, i * 7 + u32::from(split == "val") * 101);
            let img = pattern(16, 16, seed, class);
            let rel = format!("{split}/c{class}/{i}.png");
            save("images", &rel, &img);
            // torchvision's CenterCrop(12) of 16: offset round(2.0) = 2.
            let crop = image::imageops::crop_imm(&img, 2, 2, 12, 12).to_image();
            save("crops", &rel, &crop);
        }
    }
    write(
        dir.path(),
        "a.toml",
        r#"
[run]
output = "out"
seed = 1
threads = 2

[[stage]]
name = "data"
kind = "prepare"
source = "imagefolder"
path = "images"
image_size = 16

[[stage]]
name = "teacher"
kind = "train"
needs = ["data"]
model = "resnet8"
width = 4
method = "vanilla"
augment = "random-resized-crop"
crop_size = 12
epochs = 1
batch_size = 6

[[stage]]
name = "labels"
kind = "label"
needs = ["data", "teacher"]

[[stage]]
name = "eval"
kind = "evaluate"
needs = ["data", "teacher"]
batch_size = 4
"#,
    );
    let o = pipeline(dir.path(), &["run", "a.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    assert_eq!(teacher_json(&out)["crop_size"], 12);
    let labelled: usize = parquet_batches(&out.join("labels/labels.parquet"))
        .iter()
        .map(|b| b.num_rows())
        .sum();
    assert_eq!(labelled, 18);

    let dataset: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("data/dataset.json")).unwrap()).unwrap();
    let norm = &dataset["normalize"];
    write(
        dir.path(),
        "b.toml",
        &format!(
            r#"
[run]
output = "out2"

[[stage]]
name = "data"
kind = "prepare"
source = "imagefolder"
path = "crops"
image_size = 12

[[stage]]
name = "teacher"
kind = "import"
path = "out/teacher/model.safetensors"
model = "resnet8"
normalize = {{ mean = {}, std = {} }}

[[stage]]
name = "eval"
kind = "evaluate"
needs = ["data", "teacher"]
batch_size = 4
"#,
            norm["mean"], norm["std"]
        ),
    );
    let o = pipeline(dir.path(), &["run", "b.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_logits(&out.join("eval"), &dir.path().join("out2/eval"), 6);

    let bigger = std::fs::read_to_string(dir.path().join("a.toml"))
        .unwrap()
        .replace("crop_size = 12", "crop_size = 20")
        .replace("output = \"out\"", "output = \"out3\"");
    write(dir.path(), "c.toml", &bigger);
    let o = pipeline(dir.path(), &["run", "c.toml"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("teacher") && e.contains("`crop_size = 20`") && e.contains("16×16"),
        "{e}"
    );
}

/// `keep_aspect = true` packs each ImageFolder image whole (shorter side `image_size`, here
/// already 16, so the pixels are the files' own): the store holds every file's bytes at its
/// size. A model trained on random resized crops of them is evaluated on each image's own
/// centre 12×12 square: its predictions equal those of the same weights, imported, on a
/// dataset of those squares, cut here with torchvision's offsets worked out by hand (ties
/// rounded half to even). A training that would take whole images is refused, naming
/// `keep_aspect`.
#[test]
fn images_kept_whole_train_on_crops_and_evaluate_on_each_ones_centre() {
    let dir = scratch();
    let save = |root: &str, rel: &str, img: &image::RgbImage| save_png(dir.path(), root, rel, img);
    // (width, height) and the CenterCrop(12) offsets (left, top) of each:
    // round(6) = 6, round(2) = 2; round(2) = 2, round(4) = 4; round(2.5) = 2, round(2) = 2;
    // round(2) = 2, round(3.5) = 4.
    let shapes = [
        ((24, 16), (6, 2)),
        ((16, 20), (2, 4)),
        ((17, 16), (2, 2)),
        ((16, 19), (2, 4)),
    ];
    let mut sources: Vec<(usize, usize, Vec<u8>)> = Vec::new();
    for (split, n) in [("train", 16u32), ("val", 8)] {
        for i in 0..n {
            let (class, seed) = (i % 2, i * 7 + u32::from(split == "val") * 101);
            let ((w, h), (left, top)) = shapes[i as usize % 4];
            let img = pattern(w, h, seed, class);
            let rel = format!("{split}/c{class}/{i}.png");
            save("images", &rel, &img);
            let crop = image::imageops::crop_imm(&img, left, top, 12, 12).to_image();
            save("crops", &rel, &crop);
            if split == "train" {
                let chw = (0..3)
                    .flat_map(|c| img.pixels().map(move |p| p[c]))
                    .collect();
                sources.push((h as usize, w as usize, chw));
            }
        }
    }
    let config = |output: &str, path: &str, extra: &str, model: &str| {
        format!(
            r#"
[run]
output = "{output}"
seed = 1
threads = 2

[[stage]]
name = "data"
kind = "prepare"
source = "imagefolder"
path = "{path}"
image_size = {size}
{extra}

{model}

[[stage]]
name = "eval"
kind = "evaluate"
needs = ["data", "teacher"]
batch_size = 4
"#,
            size = if path == "crops" { 12 } else { 16 }
        )
    };
    let trained = r#"[[stage]]
name = "teacher"
kind = "train"
needs = ["data"]
model = "resnet8"
width = 4
method = "vanilla"
augment = "random-resized-crop"
crop_size = 12
epochs = 1
batch_size = 6"#;
    write(
        dir.path(),
        "a.toml",
        &config("out", "images", "keep_aspect = true", trained),
    );
    let o = pipeline(dir.path(), &["run", "a.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    let train = datasets::PackedStore::open(&out.join("data/train.pack")).unwrap();
    assert_eq!((train.len(), train.info().varying), (16, true));
    for i in 0..train.len() {
        let (h, w) = train.dims(i);
        assert!(
            sources
                .iter()
                .any(|s| (s.0, s.1, &s.2[..]) == (h, w, train.image(i))),
            "packed image {i} ({h}×{w}) is no training file's pixels"
        );
    }

    let dataset: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("data/dataset.json")).unwrap()).unwrap();
    assert_eq!(
        (&dataset["shape"], &dataset["varying"]),
        (&serde_json::json!([3, 16, 16]), &serde_json::json!(true))
    );
    let norm = &dataset["normalize"];
    let imported = format!(
        "[[stage]]\nname = \"teacher\"\nkind = \"import\"\npath = \"out/teacher/model.safetensors\"\n\
         model = \"resnet8\"\nnormalize = {{ mean = {}, std = {} }}",
        norm["mean"], norm["std"]
    );
    write(
        dir.path(),
        "b.toml",
        &config("out2", "crops", "", &imported),
    );
    let o = pipeline(dir.path(), &["run", "b.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_logits(&out.join("eval"), &dir.path().join("out2/eval"), 8);

    let whole = trained.replace("augment = \"random-resized-crop\"\ncrop_size = 12\n", "");
    write(
        dir.path(),
        "c.toml",
        &config("out3", "images", "keep_aspect = true", &whole),
    );
    let o = pipeline(dir.path(), &["run", "c.toml"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("teacher") && e.contains("vary in size") && e.contains("keep_aspect"),
        "{e}"
    );
}
