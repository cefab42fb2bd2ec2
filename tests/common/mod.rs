//! Helpers shared by the end-to-end tests: run the `pipeline` binary in a scratch folder.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch folder removed at the end of the test.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ldl-e2e-")
        .tempdir()
        .expect("temp dir")
}

/// A prepare stage `data` (64 synthetic 12×12 training images of 3 classes) and a one-epoch
/// training `model` on it: the smallest file with an upstream and a downstream stage.
pub const DATA_AND_MODEL: &str = "[run]\noutput = \"out\"\n\n\
    [[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 64\ntest_size = 32\nclasses = 3\nimage_size = 12\n\n\
    [[stage]]\nname = \"model\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\nwidth = 4\nmethod = \"vanilla\"\nepochs = 1\nbatch_size = 32\n";

/// Copies the files of folder `from` (not its subfolders) into folder `to`, created if missing.
pub fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Runs `pipeline ARGS` in `dir` (quiet progress bars: stderr is not a terminal).
pub fn pipeline(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(args)
        .current_dir(dir)
        .env("RAYON_NUM_THREADS", "2")
        // Source digests and downloads are cached per test, not in the user's home.
        .env("LDL_CACHE", dir.join(".ldl-cache"))
        .output()
        .expect("run pipeline")
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config");
    p
}

/// A tiny but complete pipeline: prepare → teacher → label → two students → evaluate → report.
/// Seconds on two cores.
pub const TINY: &str = r#"
[run]
output = "out"
seed = 3
threads = 2

[[stage]]
name = "data"
kind = "prepare"
source = "synthetic"
train_size = 160
test_size = 80
classes = 4
image_size = 16

[[stage]]
name = "teacher"
kind = "train"
needs = ["data"]
model = "resnet8"
width = 4
method = "vanilla"
epochs = 2
batch_size = 32
schedule = { type = "cosine" }

[[stage]]
name = "labels"
kind = "label"
needs = ["data", "teacher"]

[[stage]]
name = "vanilla"
kind = "train"
needs = ["data"]
model = "resnet8"
width = 4
method = "vanilla"
epochs = 1
batch_size = 32
schedule = { type = "cosine" }

[[stage]]
name = "off-ldl"
kind = "train"
needs = ["data", "labels"]
model = "resnet8"
width = 4
method = "off-ldl"
epochs = 1
batch_size = 32
schedule = { type = "cosine" }

[[stage]]
name = "eval-vanilla"
kind = "evaluate"
needs = ["data", "vanilla"]

[[stage]]
name = "eval-off-ldl"
kind = "evaluate"
needs = ["data", "off-ldl"]

[[stage]]
name = "report"
kind = "report"
needs = ["eval-vanilla", "eval-off-ldl"]
"#;

/// The stages of [`TINY`], in dependency order.
pub const TINY_STAGES: [&str; 8] = [
    "data",
    "teacher",
    "labels",
    "vanilla",
    "off-ldl",
    "eval-vanilla",
    "eval-off-ldl",
    "report",
];

/// Names of the stages whose runner log line contains `marker`.
fn stages_logged(o: &Output, marker: &str) -> Vec<String> {
    stderr(o)
        .lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| l.split(" INFO ").nth(1).or(Some(l)))
        .map(|l| l.trim().split(' ').next().unwrap_or("").to_owned())
        .collect()
}

/// Names of the stages that ran, from the runner's log lines.
pub fn ran(o: &Output) -> Vec<String> {
    stages_logged(o, ": running (")
}

/// Names of the stages skipped as up to date.
pub fn skipped(o: &Output) -> Vec<String> {
    stages_logged(o, ": up to date, skipped")
}

/// The output files of stage folder `out/stage` (not `stage.json`, `stage.log` or folders),
/// by name, in a form two runs can be compared in: `train_log.csv` keeps its first four
/// columns (epoch, lr, loss, accuracy), the other two being wall-clock figures.
pub fn stage_files(out: &Path, stage: &str) -> Vec<(String, Vec<u8>)> {
    let dir = out.join(stage);
    let mut files = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name == "stage.json" || name == "stage.log" || p.is_dir() {
            continue;
        }
        let mut bytes = std::fs::read(&p).unwrap();
        if name == "train_log.csv" {
            bytes = String::from_utf8(bytes)
                .unwrap()
                .lines()
                .map(|l| l.split(',').take(4).collect::<Vec<_>>().join(","))
                .collect::<Vec<_>>()
                .join("\n")
                .into_bytes();
        }
        files.push((name, bytes));
    }
    files.sort();
    files
}

/// [`stage_files`] of every stage in `stages`, keyed `stage/name`.
pub fn artifacts_of<'a>(
    out: &Path,
    stages: impl IntoIterator<Item = &'a str>,
) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    for stage in stages {
        for (name, bytes) in stage_files(out, stage) {
            files.insert(format!("{stage}/{name}"), bytes);
        }
    }
    files
}

/// Every record batch of the Parquet file at `path`.
pub fn parquet_batches(path: &Path) -> Vec<arrow::array::RecordBatch> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

/// The rows of a prepare stage's `records.parquet`: (split, index, record, file).
pub fn records(path: &Path) -> Vec<(String, u32, u32, Option<String>)> {
    use arrow::array::{Array, StringArray, UInt32Array};
    let mut rows = Vec::new();
    for batch in parquet_batches(path) {
        let col = |name: &str| batch.column_by_name(name).unwrap().clone();
        let (split, index, record, file) = (col("split"), col("index"), col("record"), col("file"));
        let split = split.as_any().downcast_ref::<StringArray>().unwrap();
        let index = index.as_any().downcast_ref::<UInt32Array>().unwrap();
        let record = record.as_any().downcast_ref::<UInt32Array>().unwrap();
        let file = file.as_any().downcast_ref::<StringArray>().unwrap();
        for r in 0..batch.num_rows() {
            rows.push((
                split.value(r).to_string(),
                index.value(r),
                record.value(r),
                (!file.is_null(r)).then(|| file.value(r).to_string()),
            ));
        }
    }
    rows
}

/// The newest complete checkpoint (`step-N`, not a `.tmp-step-N` being written) in the
/// checkpoint folder `checkpoints`, if any.
pub fn newest_checkpoint(checkpoints: &Path) -> Option<PathBuf> {
    std::fs::read_dir(checkpoints)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("step-")
        })
        .max()
}

/// Starts `pipeline run FILE` in `dir` and waits (up to 2 minutes) for the first complete
/// checkpoint of its training `stage` (in `out/`); returns the running child. (Killed before
/// that rename, a run leaves nothing to resume from.)
pub fn run_until_checkpoint(dir: &Path, file: &str, stage: &str) -> std::process::Child {
    let child = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", file])
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let checkpoints = dir.join(format!("out/.{stage}.partial/checkpoints"));
    let t0 = std::time::Instant::now();
    while newest_checkpoint(&checkpoints).is_none() {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child
}
