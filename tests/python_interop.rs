//! Interoperability of the label store: the binary writes a store (two teachers, one trained with
//! dropout, so it has every kind of source: `teacher`, `teacher-b`, `ensemble`, `teacher.mc`),
//! the Rust reader reads chosen rows, and tests/python/check_label_store.py opens the store with
//! pyarrow, DuckDB and Polars and checks, in each, the documented schema and metadata, the rows
//! per source, and that the chosen rows' probabilities equal, bit for bit, what Rust read.
//!
//! The Python is `LDL_PYTHON` when set; otherwise the test makes (or reuses) the pinned virtual
//! environment `.venv-interop/` itself with `scripts/python-env.sh` (about 20 s and 0.5 GB the
//! first time, instant afterwards), so `cargo test --workspace` needs no set-up step.

mod common;
use common::*;
use datasets::PackedStore;
use stages::label_store;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (this test's package is `pipeline/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The environment of `scripts/python-env.sh`, created or reused; the script prints its python.
fn pinned_environment() -> PathBuf {
    let script = root().join("scripts/python-env.sh");
    let o = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run bash {}: {e}", script.display()));
    assert!(
        o.status.success(),
        "{} failed (it needs python3 with venv and pip, and PyPI): {}\n\
         set LDL_PYTHON to an interpreter with pyarrow, duckdb and polars to use another one",
        script.display(),
        stderr(&o).trim()
    );
    PathBuf::from(stdout(&o).trim())
}

/// The interpreter: `LDL_PYTHON` (a relative path is taken from the workspace root), or the
/// pinned environment.
fn python() -> PathBuf {
    let Some(py) = std::env::var_os("LDL_PYTHON").filter(|p| !p.is_empty()) else {
        return checked(pinned_environment());
    };
    let py = PathBuf::from(py);
    let py = if py.is_relative() && py.components().count() > 1 {
        root().join(py)
    } else {
        py
    };
    checked(py)
}

/// `py`, once it is known to import the interoperability packages (checked before the pipeline
/// runs).
fn checked(py: PathBuf) -> PathBuf {
    let o = Command::new(&py)
        .args([
            "-c",
            "import numpy, pyarrow, pyarrow.dataset, duckdb, polars",
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; unset LDL_PYTHON to use the pinned environment \
                 (scripts/python-env.sh)",
                py.display()
            )
        });
    assert!(
        o.status.success(),
        "{} lacks the interoperability packages ({}); unset LDL_PYTHON to use the pinned \
         environment (scripts/python-env.sh)",
        py.display(),
        stderr(&o).trim().lines().last().unwrap_or("")
    );
    py
}

/// Sample positions whose rows are compared, in each source.
const CHOSEN: [usize; 7] = [0, 1, 2, 79, 80, 158, 159];

#[test]
fn pyarrow_duckdb_and_polars_read_the_store_as_documented_and_as_rust_does() {
    let py = python();
    let dir = scratch();
    // TINY up to its label stage, with a dropout teacher and a second teacher for the ensemble.
    let upto_labels = TINY
        .find("[[stage]]\nname = \"vanilla\"")
        .expect("TINY has a `vanilla` stage after `labels`");
    let cfg = TINY[..upto_labels]
        .replacen(
            "name = \"teacher\"\nkind = \"train\"",
            "name = \"teacher\"\nkind = \"train\"\ndropout = 0.3",
            1,
        )
        .replacen(
            "name = \"labels\"\nkind = \"label\"\nneeds = [\"data\", \"teacher\"]",
            "name = \"teacher-b\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\n\
             width = 4\nmethod = \"vanilla\"\nepochs = 1\nbatch_size = 32\nseed = 5\n\
             schedule = { type = \"cosine\" }\n\n[[stage]]\n\
             name = \"labels\"\nkind = \"label\"\nneeds = [\"data\", \"teacher\", \"teacher-b\"]\n\
             mc_samples = 8\n\n[[stage]]\nname = \"labels-f16\"\nkind = \"label\"\n\
             needs = [\"data\", \"teacher\", \"teacher-b\"]\nmc_samples = 8\ndtype = \"f16\"",
            1,
        );
    assert!(
        cfg.contains("dropout = 0.3")
            && cfg.contains("\"teacher-b\"]")
            && cfg.contains("dtype = \"f16\""),
        "TINY changed: {cfg}"
    );
    write(dir.path(), "interop.toml", &cfg);
    let o = pipeline(dir.path(), &["run", "interop.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    let store = out.join("labels/labels.parquet");

    // What Rust reads: the expected values, from the dataset, the teachers' records and the reader.
    let train = PackedStore::open(&out.join("data/train.pack")).unwrap();
    let (n, classes, fingerprint) = (train.len(), train.info().classes.clone(), train.hash());
    let k = classes.len();
    let teachers: serde_json::Map<String, serde_json::Value> = ["teacher", "teacher-b"]
        .iter()
        .map(|t| {
            let rec = std::fs::read_to_string(out.join(t).join("stage.json")).unwrap();
            let rec: serde_json::Value = serde_json::from_str(&rec).unwrap();
            (t.to_string(), rec["fingerprint"].clone())
        })
        .collect();
    let checkpoints: serde_json::Map<String, serde_json::Value> = ["teacher", "teacher-b"]
        .iter()
        .map(|t| {
            let weights = std::fs::read(out.join(t).join("model.safetensors")).unwrap();
            (
                t.to_string(),
                blake3::hash(&weights).to_hex().to_string().into(),
            )
        })
        .collect();
    let sources = ["teacher", "teacher-b", "ensemble", "teacher.mc"];
    let mut rows = Vec::new();
    let mut rows_f16 = Vec::new();
    let mut per_source = Vec::new();
    for source in sources {
        let labels = label_store::read(&store, source, n, &classes, &fingerprint)
            .unwrap_or_else(|e| panic!("Rust reads source `{source}`: {e}"));
        assert_eq!(labels.k, k);
        let dense = labels.to_dense();
        for i in CHOSEN {
            let p = &dense[i * k..(i + 1) * k];
            rows.push(serde_json::json!({
                "source": source,
                "index": i,
                "label": train.label(i),
                "probs": p,
                "probs_bits": p.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            }));
            // The float16 store holds the same values rounded to half precision.
            let h: Vec<half::f16> = p.iter().map(|&v| half::f16::from_f32(v)).collect();
            rows_f16.push(serde_json::json!({
                "source": source,
                "index": i,
                "label": train.label(i),
                "probs": h.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
                "probs_bits": h.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            }));
        }
        per_source.push((source, dense));
    }
    // The sources differ from each other, so a tool reading the wrong one cannot pass.
    for (a, pa) in &per_source {
        for (b, pb) in &per_source {
            assert!(a == b || pa != pb, "sources `{a}` and `{b}` are equal");
        }
    }
    // `pipeline inspect` reads the float16 store: every source's rows, and the first row's most
    // probable class with its half-precision probability.
    let o = pipeline(dir.path(), &["inspect", "out/labels-f16", "--rows", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for source in sources {
        assert!(text.contains(&format!("    {source:<26} {n}")), "{text}");
    }
    let first = &rows_f16[0];
    let probs: Vec<f64> = serde_json::from_value(first["probs"].clone()).unwrap();
    let (top, p) = probs
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap();
    let want = format!("{} {p:.3}", classes[top]);
    let row = text.split("first rows").nth(1).unwrap_or_default();
    assert!(row.contains(&want), "missing `{want}` in:\n{text}");
    let expected = |dtype: &str, rows: Vec<serde_json::Value>| {
        serde_json::json!({
        "k": k,
        "dtype": dtype,
        "metadata": {
            "ldl.dtype": dtype,
            "ldl.format_version": stages::FORMAT_VERSION.to_string(),
            "ldl.k": k.to_string(),
            "ldl.dataset_fingerprint": fingerprint,
            "ldl.program_version": stages::PROGRAM_VERSION,
        },
        "metadata_json": {
            "ldl.classes": classes,
            "ldl.teachers": teachers,
            "ldl.temperature": 1.0,
            "ldl.teacher_checkpoints": checkpoints,
            "ldl.mc": {"samples": 8, "dropout": {"teacher": 0.3}},
        },
        "rows_per_source": sources
            .iter()
            .map(|s| (s.to_string(), n))
            .collect::<std::collections::BTreeMap<_, _>>(),
        "rows": rows,
        })
    };
    rewritten_stores_read_as_the_original(&py, dir.path(), &store, &per_source, &classes);
    for (dtype, file, rows) in [
        ("float32", "labels/labels.parquet", rows),
        ("float16", "labels-f16/labels.parquet", rows_f16),
    ] {
        let store = out.join(file);
        let expected_path = write(
            dir.path(),
            &format!("expected-{dtype}.json"),
            &serde_json::to_string_pretty(&expected(dtype, rows)).unwrap(),
        );
        check(&py, &store, &expected_path, sources.len() * CHOSEN.len());
    }
}

/// The store rewritten by pyarrow, Polars and DuckDB (tests/python/rewrite_label_store.py: their
/// own list items, strings and list types, the `ldl.*` keys kept as each tool keeps metadata)
/// reads in Rust as the original: every source, bit for bit (`per_source`: the original's rows).
fn rewritten_stores_read_as_the_original(
    py: &Path,
    dir: &Path,
    store: &Path,
    per_source: &[(&str, Vec<f32>)],
    classes: &[String],
) {
    let out = dir.join("rewritten");
    std::fs::create_dir_all(&out).unwrap();
    let script = root().join("tests/python/rewrite_label_store.py");
    let o = Command::new(py)
        .arg(&script)
        .arg(store)
        .arg(&out)
        .output()
        .expect("run the Python rewrite");
    assert!(
        o.status.success(),
        "{}
{}",
        stdout(&o),
        stderr(&o)
    );
    let meta = label_store::read_meta(store).unwrap();
    let n = per_source[0].1.len() / classes.len();
    for tool in ["pyarrow", "polars", "duckdb"] {
        let file = out.join(format!("{tool}.parquet"));
        for (source, original) in per_source {
            let labels = label_store::read(&file, source, n, classes, &meta.dataset_fingerprint)
                .unwrap_or_else(|e| panic!("{tool}'s store, source `{source}`: {e}"));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(
                bits(&labels.to_dense()) == bits(original),
                "{tool}'s store, source `{source}`: other values"
            );
        }
    }
}

/// Runs tests/python/check_label_store.py on `store` and asserts a success line per tool.
fn check(py: &Path, store: &Path, expected_path: &Path, chosen: usize) {
    let script = root().join("tests/python/check_label_store.py");
    let o = Command::new(py)
        .arg(&script)
        .arg(store)
        .arg(expected_path)
        .output()
        .expect("run the Python check");
    let report = format!(
        "{} {} {} {}\nstdout:\n{}\nstderr:\n{}",
        py.display(),
        script.display(),
        store.display(),
        expected_path.display(),
        stdout(&o),
        stderr(&o)
    );
    assert!(o.status.success(), "the Python check failed: {report}");
    let text = stdout(&o);
    println!("{text}");
    // One line per tool: pyarrow.parquet, pyarrow.dataset, DuckDB, Polars.
    let ok: Vec<&str> = text.lines().filter(|l| l.starts_with("ok ")).collect();
    assert_eq!(ok.len(), 4, "{report}");
    let compared = format!("{chosen} chosen rows");
    for tool in ["pyarrow.parquet", "pyarrow.dataset", "duckdb", "polars"] {
        assert!(
            ok.iter().any(|l| l.contains(tool) && l.contains(&compared)),
            "no success line for {tool} comparing {compared}: {report}"
        );
    }
}

/// A replay store's epoch files open in pyarrow, DuckDB and Polars: one row per image per step,
/// keyed by step and position, the teacher's vectors of K values, and the footer's digests.
#[test]
fn pyarrow_duckdb_and_polars_read_a_replay_store() {
    let py = python();
    let dir = scratch();
    let upto_labels = TINY
        .find("[[stage]]\nname = \"labels\"")
        .expect("TINY has a `labels` stage after its teacher");
    let cfg = format!(
        "{}[[stage]]\nname = \"replay\"\nkind = \"replay\"\nneeds = [\"data\", \"teacher\"]\nepochs = 2\nbatch_size = 32\nmix = {{ type = \"mixup\", alpha = 1.0 }}\n",
        &TINY[..upto_labels]
    );
    write(dir.path(), "p.toml", &cfg);
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let file = dir.path().join("out/replay/epoch-00001.parquet");
    let script = r#"
import json, sys
import duckdb, polars as pl, pyarrow.parquet as pq
path = sys.argv[1]
t = pq.read_table(path)
meta = pq.read_metadata(path).metadata
digests = json.loads(meta[b"ldl.replay.digests"])
print("pyarrow", t.num_rows, ",".join(t.column_names), len(t.column("teacher")[0]), len(digests), meta[b"ldl.replay.epoch"].decode())
n, steps, k = duckdb.sql(f"SELECT count(*), count(DISTINCT step), max(len(teacher)) FROM '{path}'").fetchall()[0]
print("duckdb", n, steps, k)
df = pl.read_parquet(path)
print("polars", df.height, df.filter(pl.col("step") == 4).height)
"#;
    let o = Command::new(&py)
        .args(["-c", script, file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    // 160 images in batches of 32: 5 steps, the last of 32 too; K = 4.
    assert!(
        out.contains("pyarrow 160 step,position,index,teacher 4 5 1"),
        "{out}"
    );
    assert!(out.contains("duckdb 160 5 4"), "{out}");
    assert!(out.contains("polars 160 32"), "{out}");
}

/// `pipeline export` of a model imported from a PyTorch checkpoint writes a `.pth` that
/// CPython's own unpickler reads as `torch.save` lays it out (tests/python/check_export.py:
/// data.pkl, stored entries at 64-byte offsets, version, byteorder), holding bit for bit the
/// tensors of PyTorch's file, under torchvision's names or kuangliu's; a `.safetensors` export
/// holds the same tensors; an unknown extension, or a file in the stage's folder, is refused.
#[test]
fn an_exported_pth_unpickles_in_python_to_pytorchs_tensors() {
    let py = python();
    let dir = scratch();
    let reference = root().join("tests/fixtures/import/resnet8.pth");
    let cfg = format!(
        "[run]\noutput = \"out\"\n\n[[stage]]\nname = \"teacher\"\nkind = \"import\"\npath = \"{}\"\nmodel = \"resnet8\"\n",
        reference.display()
    );
    write(dir.path(), "p.toml", &cfg);
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for naming in ["torchvision", "kuangliu"] {
        let file = format!("{naming}.pth");
        let o = pipeline(
            dir.path(),
            &["export", "out/teacher", "-o", &file, "--naming", naming],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let o = Command::new(&py)
            .arg(root().join("tests/python/check_export.py"))
            .arg(dir.path().join(&file))
            .arg(&reference)
            .arg(naming)
            .output()
            .unwrap();
        assert!(o.status.success(), "{naming}: {}", stderr(&o));
        assert!(stdout(&o).contains("\"tensors\": 47"), "{}", stdout(&o));
    }
    // In float16: numpy's rounding of PyTorch's tensors, bit for bit.
    let o = pipeline(
        dir.path(),
        &["export", "out/teacher", "-o", "half.pth", "--dtype", "f16"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = Command::new(&py)
        .arg(root().join("tests/python/check_export.py"))
        .arg(dir.path().join("half.pth"))
        .arg(&reference)
        .args(["torchvision", "f16"])
        .output()
        .unwrap();
    assert!(o.status.success(), "f16: {}", stderr(&o));
    // The safetensors export holds what the import stage stored.
    let o = pipeline(
        dir.path(),
        &["export", "out/teacher", "-o", "t.safetensors"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let load = |p: &str| {
        candle_core::safetensors::load(dir.path().join(p), &candle_core::Device::Cpu).unwrap()
    };
    let (ours, stored) = (load("t.safetensors"), load("out/teacher/model.safetensors"));
    assert_eq!(ours.len(), stored.len());
    for (name, t) in &stored {
        let values = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(&ours[name]), values(t), "{name}");
    }
    // In bfloat16, .pth and .safetensors: each value the stored f32's upper half rounded to
    // nearest, ties to even (worked here on the bits), read back by an import stage and by
    // candle.
    let bf16 = |v: f32| {
        let b = v.to_bits();
        f32::from_bits(((b + 0x7fff + ((b >> 16) & 1)) >> 16) << 16)
    };
    for file in ["b.pth", "b.safetensors"] {
        let o = pipeline(
            dir.path(),
            &["export", "out/teacher", "-o", file, "--dtype", "bf16"],
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let back = dir.path().join("b.pth");
    write(
        dir.path(),
        "back.toml",
        &format!(
            "[run]\noutput = \"back\"\n\n[[stage]]\nname = \"teacher\"\nkind = \"import\"\npath = \"{}\"\nmodel = \"resnet8\"\n",
            back.display()
        ),
    );
    let o = pipeline(dir.path(), &["run", "back.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (imported, half) = (
        load("back/teacher/model.safetensors"),
        load("b.safetensors"),
    );
    for (name, t) in &stored {
        let want: Vec<f32> = t
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(bf16)
            .collect();
        let got = |t: &candle_core::Tensor| {
            t.to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(half[name].dtype(), candle_core::DType::BF16, "{name}");
        assert_eq!(got(&half[name]), want, "{name} (.safetensors)");
        assert_eq!(got(&imported[name]), want, "{name} (.pth, imported)");
    }
    // Not into the stage's folder, which the runner owns.
    let o = pipeline(
        dir.path(),
        &["export", "out/teacher", "-o", "out/teacher/model.pth"],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("runner owns"), "{}", stderr(&o));
    let o = pipeline(dir.path(), &["export", "out/teacher", "-o", "t.onnx"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("t.onnx") && stderr(&o).contains("`.pth`"),
        "{}",
        stderr(&o)
    );
}
