//! The kill-and-resume harness: `pipeline run` on a multi-stage experiment (prepare → teacher
//! with dropout → label with MC dropout, replay of the teacher on the online student's batches
//! → two students, offline and online (replayed), a CRD+KD student whose checkpoints carry
//! its heads and memory banks, and SSKD's two phases (a teacher's head, then a student whose
//! checkpoints carry its own head) → evaluate → report)
//! is killed with SIGKILL at moments drawn from a seed, rerun, and killed again, until a run
//! completes. After every kill it checks that every final stage folder is complete (no partial
//! file at a final path) and that the next run resumes each training from its newest complete
//! checkpoint (so the work redone is at most one checkpoint interval); at the end, that every
//! artifact is bitwise equal to an uninterrupted run's (but `stage.json`'s timestamps and run
//! ids, and the timing columns of `train_log.csv`). A lock left by a killed run must never block the rerun.
//!
//! Each pass runs into a fresh output root; passes repeat until the wanted number of kills. CI
//! runs at least 10 kills. The long mode is run by hand:
//!
//!     LDL_KILLS=50 LDL_KILL_SEED=7 cargo test --release -p pipeline --test kill -- --nocapture

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CFG: &str = r#"
[run]
output = "out"
seed = 11
threads = 2

[[stage]]
name = "data"
kind = "prepare"
source = "synthetic"
train_size = 192
test_size = 64
classes = 4
image_size = 12

[[stage]]
name = "teacher"
kind = "train"
needs = ["data"]
model = "resnet8"
width = 4
dropout = 0.2
method = "vanilla"
epochs = 3
batch_size = 16
checkpoint_every = 2
keep_checkpoints = 2
eval_every = 2

[[stage]]
name = "labels"
kind = "label"
needs = ["data", "teacher"]
mc_samples = 4
batch_size = 32
chunk_size = 64

[[stage]]
name = "replay"
kind = "replay"
needs = ["data", "teacher"]
epochs = 2
batch_size = 16
mix = { type = "cutmix", p = 0.5 }

[[stage]]
name = "student"
kind = "train"
needs = ["data", "labels", "teacher", "replay"]
matrix = { method = ["off-ldl", "on-ldl"] }
replay = true
label_source = "teacher.mc"
model = "resnet8"
width = 4
epochs = 2
batch_size = 16
checkpoint_every = 2
mix = { type = "cutmix", p = 0.5 }

[[stage]]
name = "crd"
kind = "train"
needs = ["data", "teacher"]
method = "crd-kd"
crd_negatives = 32
model = "resnet8"
width = 4
epochs = 2
batch_size = 16
checkpoint_every = 2

[[stage]]
name = "sskd-head"
kind = "train"
needs = ["data", "teacher"]
method = "sskd-head"
epochs = 2
batch_size = 16
checkpoint_every = 2

[[stage]]
name = "sskd"
kind = "train"
needs = ["data", "sskd-head"]
method = "sskd"
sskd_ratio_tf = 0.5
model = "resnet8"
width = 4
epochs = 2
batch_size = 16
checkpoint_every = 2

[[stage]]
name = "eval"
kind = "evaluate"
needs = ["data", "student"]

[[stage]]
name = "report"
kind = "report"
needs = ["eval"]
"#;

/// splitmix64: the harness's own seeded stream of kill moments.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Every regular file under `dir` (relative paths), skipping hidden entries at the top.
fn files(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let hidden = p.file_name().unwrap().to_string_lossy().starts_with('.');
        if p.is_dir() && !hidden {
            walk(dir, &p, &mut out);
        }
    }
    out.sort();
    out
}

/// Checks that every final stage folder is complete: its `stage.json` lists exactly the
/// outputs present, with their recorded sizes, and nothing temporary.
fn final_folders_are_complete(out: &Path) {
    let Ok(entries) = std::fs::read_dir(out) else {
        return;
    };
    for e in entries {
        let dir = e.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        if !dir.is_dir() || name.starts_with('.') {
            continue;
        }
        let record: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("stage.json"))
                .unwrap_or_else(|e| panic!("final folder {name} without stage.json: {e}")),
        )
        .unwrap();
        assert_eq!(record["status"], "complete", "{name}");
        let mut listed: Vec<String> = vec!["stage.json".into()];
        for o in record["outputs"].as_array().unwrap() {
            let path = o["path"].as_str().unwrap();
            let len = std::fs::metadata(dir.join(path))
                .unwrap_or_else(|e| panic!("{name}/{path} listed but missing: {e}"))
                .len();
            assert_eq!(len, o["bytes"].as_u64().unwrap(), "{name}/{path} size");
            listed.push(path.into());
        }
        let present: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        for p in present {
            assert!(
                listed.contains(&p),
                "{name}/{p} is in a final folder but not one of its recorded outputs"
            );
        }
    }
}

/// The newest complete checkpoint step of each training left partial in `out`.
fn newest_checkpoints(out: &Path) -> BTreeMap<String, u64> {
    let mut found = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(out) else {
        return found;
    };
    for e in entries {
        let dir = e.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let Some(stage) = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".partial"))
        else {
            continue;
        };
        let Ok(cks) = std::fs::read_dir(dir.join("checkpoints")) else {
            continue;
        };
        let newest = cks
            .filter_map(|c| {
                let c = c.ok()?.file_name().to_string_lossy().to_string();
                c.strip_prefix("step-")?.parse::<u64>().ok()
            })
            .max();
        if let Some(step) = newest {
            found.insert(stage.to_string(), step);
        }
    }
    found
}

/// The label chunks complete (renamed into place) in the label stage's partial folder.
fn complete_chunks(out: &Path) -> usize {
    std::fs::read_dir(out.join(".labels.partial/chunks")).map_or(0, |d| {
        d.filter(|e| {
            let name = e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .to_string();
            name.ends_with(".safetensors") && !name.contains(".tmp-")
        })
        .count()
    })
}

/// `train_log.csv` without its timing columns (images/s, seconds; the held-out evaluation's
/// columns of `eval_every` after them are kept).
fn without_timing(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            [&cells[..4.min(cells.len())], cells.get(6..).unwrap_or(&[])]
                .concat()
                .join(",")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts that every artifact under `out` is bitwise equal to the one under `reference` (but
/// `stage.json`'s timestamps and run ids, and the timing columns of `train_log.csv`).
fn same_outputs(out: &Path, reference: &Path) {
    let (a, b) = (files(out), files(reference));
    assert_eq!(a, b, "the outputs differ in their files");
    for f in &a {
        let name = f.file_name().unwrap().to_string_lossy();
        let (x, y) = (
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(reference.join(f)).unwrap(),
        );
        match name.as_ref() {
            "stage.json" => {}
            "train_log.csv" => {
                assert_eq!(without_timing(&x), without_timing(&y), "{}", f.display())
            }
            _ => assert!(
                x == y,
                "{} differs from the uninterrupted run's",
                f.display()
            ),
        }
    }
}

/// The temporary files (`.<name>.tmp-<pid>`) anywhere under `dir`.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.file_name().unwrap().to_string_lossy().contains(".tmp-") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out
}

/// Deterministic kills inside the writes that random kills only hit by chance: the
/// fault-injection hook (`LDL_FAULT_WRITE=<text>@<bytes>`) aborts the process once that many
/// bytes of a file whose path contains `<text>` reached its temporary file, in a checkpoint
/// (model and optimizer state; one of an SSKD student, whose head must be restored), the label
/// store's Parquet file, the predictions' Parquet file and a final model. Each time the partial file exists only at its temporary path, every final
/// folder is complete, and the rerun completes with outputs bitwise equal to an uninterrupted
/// run's.
#[test]
fn aborted_inside_each_kind_of_write_the_run_resumes_bitwise_equal() {
    let dir = scratch();
    write(dir.path(), "k.toml", CFG);
    let reference = pipeline(dir.path(), &["run", "k.toml", "--output", "reference"]);
    assert!(reference.status.success(), "{}", stderr(&reference));
    let faults = [
        ("optimizer.safetensors", 1_000),
        ("model.safetensors", 3_000),
        // The second of the label stage's three chunks (batches 2..4 of 6).
        ("train-b2-4", 1_000),
        // The replay store's second epoch.
        ("epoch-00001.parquet", 500),
        ("labels.parquet", 500),
        ("predictions.parquet", 200),
        ("table.md", 50),
        // The SSKD student's checkpoint of step 8 (its first file): the rerun resumes from
        // step 6 and must restore the head it had trained there, not draw a new one.
        (".sskd.partial/checkpoints/.tmp-step-0000000008/", 200),
    ];
    for (i, (text, bytes)) in faults.iter().enumerate() {
        let out_name = format!("fault-{i}");
        let out = dir.path().join(&out_name);
        let aborted = Command::new(env!("CARGO_BIN_EXE_pipeline"))
            .args(["run", "k.toml", "--output", &out_name])
            .current_dir(dir.path())
            .env("RAYON_NUM_THREADS", "2")
            .env("LDL_FAULT_WRITE", format!("{text}@{bytes}"))
            .output()
            .unwrap();
        let err = stderr(&aborted);
        assert!(
            !aborted.status.success(),
            "{text}: the fault did not fire:\n{err}"
        );
        assert!(
            err.contains("LDL_FAULT_WRITE: aborting while writing") && err.contains(text),
            "{text}: not stopped by the hook:\n{err}"
        );
        let partial = temp_files(&out);
        assert!(
            partial.iter().any(|p| p.to_string_lossy().contains(text)
                && std::fs::metadata(p).unwrap().len() == *bytes),
            "{text}: no temporary file of {bytes} bytes in {partial:?}"
        );
        final_folders_are_complete(&out);
        if text.starts_with("train-b") {
            damaged_chunk_is_refused_and_only_it_redone(dir.path(), &out_name);
        }
        let resumed = pipeline(dir.path(), &["run", "k.toml", "--output", &out_name]);
        assert!(resumed.status.success(), "{text}: {}", stderr(&resumed));
        if text.starts_with("epoch-") {
            assert!(
                stderr(&resumed).contains("replay: resuming with 1 of 2 epochs stored"),
                "the replay stage did not resume from its first epoch:\n{}",
                stderr(&resumed)
            );
        }
        if text.starts_with("train-b") {
            assert!(
                stderr(&resumed)
                    .contains("labels: train split: resuming with 1 of 3 chunks labelled"),
                "the label stage did not resume from its first chunk:\n{}",
                stderr(&resumed)
            );
        }
        if text.starts_with(".sskd.partial") {
            assert!(
                stderr(&resumed).contains("sskd: resuming from the checkpoint of step 6"),
                "the SSKD student did not resume from step 6:\n{}",
                stderr(&resumed)
            );
        }
        final_folders_are_complete(&out);
        same_outputs(&out, &dir.path().join("reference"));
        assert!(temp_files(&out).is_empty(), "{text}: temporary files left");
    }
}

/// With the label stage stopped inside its second chunk: a damaged first chunk is refused
/// naming the file, with the stage folder (and the chunk) kept; restored, it is reused.
fn damaged_chunk_is_refused_and_only_it_redone(dir: &Path, out_name: &str) {
    let chunk = dir
        .join(out_name)
        .join(".labels.partial/chunks/train-b0-2.safetensors");
    let good = std::fs::read(&chunk).unwrap();
    std::fs::write(&chunk, &good[..good.len() / 2]).unwrap();
    let o = pipeline(dir, &["run", "k.toml", "--output", out_name]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("train-b0-2.safetensors") && e.contains("remove the file"),
        "{e}"
    );
    assert!(chunk.exists(), "the damaged chunk's folder was removed");
    std::fs::write(&chunk, &good).unwrap();
}

/// The label store does not depend on the chunk size: one batch per chunk gives the bytes of
/// one chunk for the whole split.
#[test]
fn the_label_store_does_not_depend_on_the_chunk_size() {
    let dir = scratch();
    let until_labels = CFG.split("[[stage]]\nname = \"student\"").next().unwrap();
    write(dir.path(), "a.toml", until_labels);
    write(
        dir.path(),
        "b.toml",
        &until_labels.replace("chunk_size = 64", "chunk_size = 1"),
    );
    for (cfg, out) in [("a.toml", "a"), ("b.toml", "b")] {
        let o = pipeline(dir.path(), &["run", cfg, "--output", out]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let read = |o: &str| std::fs::read(dir.path().join(o).join("labels/labels.parquet")).unwrap();
    assert!(
        read("a") == read("b"),
        "the chunk size changed the label store"
    );
    assert!(!dir.path().join("a/labels/chunks").exists());
}

/// Changes the first value of `fc.weight` in a safetensors file (its low byte), keeping the
/// file's size: a teacher trained again to other weights, with its fingerprint unchanged.
fn perturb_fc_weight(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = header["fc.weight"]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[8 + n + start] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

/// A label or replay stage stopped part way, whose teacher is then trained again to other
/// weights (same fingerprint: `--force`, another device), does not reuse what it computed from
/// the old weights: its store is the one a fresh run with the new weights writes.
#[test]
fn a_resumed_label_or_replay_stage_redoes_what_old_teacher_weights_computed() {
    let dir = scratch();
    let until_replay = CFG.split("[[stage]]\nname = \"student\"").next().unwrap();
    write(dir.path(), "k.toml", until_replay);
    for (stage, fault, store, done) in [
        (
            "labels",
            "train-b2-4@1000",
            "labels.parquet",
            "1 of 3 chunks labelled",
        ),
        (
            "replay",
            "epoch-00001.parquet@500",
            "epoch-00000.parquet",
            "1 of 2 epochs stored",
        ),
    ] {
        let out = format!("out-{stage}");
        let aborted = Command::new(env!("CARGO_BIN_EXE_pipeline"))
            .args(["run", "k.toml", "--output", &out])
            .current_dir(dir.path())
            .env("LDL_FAULT_WRITE", fault)
            .output()
            .unwrap();
        assert!(
            stderr(&aborted).contains("LDL_FAULT_WRITE: aborting"),
            "{}",
            stderr(&aborted)
        );
        // `status` counts what was stored (192 images in batches of 32, 2 batches a chunk: 3
        // chunks; the replay's 2 epochs), with no time left from a single write.
        let status = stdout(&pipeline(
            dir.path(),
            &["status", "k.toml", "--output", &out, "--only", stage],
        ));
        assert!(
            status.contains(&format!(
                "incomplete: interrupted with {done}; the next run resumes it"
            )),
            "{status}"
        );
        let root = dir.path().join(&out);
        perturb_fc_weight(&root.join("teacher/model.safetensors"));
        let resumed = pipeline(
            dir.path(),
            &["run", "k.toml", "--output", &out, "--only", stage],
        );
        assert!(resumed.status.success(), "{}", stderr(&resumed));
        assert!(
            stderr(&resumed).contains("other teacher weights"),
            "{stage}: {}",
            stderr(&resumed)
        );
        let resumed_store = std::fs::read(root.join(stage).join(store)).unwrap();
        let fresh = pipeline(
            dir.path(),
            &[
                "run", "k.toml", "--output", &out, "--only", stage, "--force", stage,
            ],
        );
        assert!(fresh.status.success(), "{}", stderr(&fresh));
        let fresh_store = std::fs::read(root.join(stage).join(store)).unwrap();
        assert!(
            resumed_store == fresh_store,
            "{stage}: the resumed store kept outputs of the old teacher weights"
        );
    }
}

/// A training of 3 epochs of 12 steps, checkpointed every 4 steps, keeping 2.
const SMALL: &str = r#"
[run]
output = "out"
seed = 5
threads = 2

[[stage]]
name = "data"
kind = "prepare"
source = "synthetic"
train_size = 192
test_size = 64
classes = 4
image_size = 12

[[stage]]
name = "net"
kind = "train"
needs = ["data"]
model = "resnet8"
width = 4
method = "vanilla"
epochs = 3
batch_size = 16
schedule = { type = "cosine" }
checkpoint_every = 4
keep_checkpoints = 2
"#;

/// The bytes of every file under `dir`, by relative path.
fn contents(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// SMALL run uninterrupted into `dir/reference`, then into `dir/out` stopped inside the
/// checkpoint of step 16, which leaves steps 8 and 12.
fn stopped_in_the_checkpoint_of_step_16(dir: &Path) {
    write(dir, "f.toml", SMALL);
    let reference = pipeline(dir, &["run", "f.toml", "--output", "reference"]);
    assert!(reference.status.success(), "{}", stderr(&reference));
    let aborted = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "f.toml"])
        .current_dir(dir)
        .env("LDL_FAULT_WRITE", ".tmp-step-0000000016/@100")
        .output()
        .unwrap();
    assert!(!aborted.status.success(), "{}", stderr(&aborted));
}

/// A write that fails with a real I/O error (EFBIG: the process's file-size limit, standing in
/// for a full disk) in the middle of a training keeps the partial folder and its checkpoints
/// untouched, and the error names the file; a newest checkpoint found damaged on the next run
/// is skipped for the older one; the training then ends bitwise equal to an uninterrupted one.
#[test]
fn a_failed_write_keeps_the_checkpoints_and_a_damaged_newest_one_falls_back() {
    let dir = scratch();
    stopped_in_the_checkpoint_of_step_16(dir.path());
    let partial = dir.path().join("out/.net.partial");
    let checkpoints = partial.join("checkpoints");
    let kept = contents(&checkpoints.join("step-0000000012"));
    assert_eq!(newest_checkpoints(&dir.path().join("out"))["net"], 12);

    // Resumed under a file-size limit of 8 KiB, below a checkpoint file's size: the checkpoint
    // of step 16 cannot be written. `trap "" XFSZ` makes the kernel return EFBIG instead of
    // killing the process (an ignored signal stays ignored across exec).
    let limited = Command::new("bash")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 8; exec \"$0\" run f.toml")
        .arg(env!("CARGO_BIN_EXE_pipeline"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = stderr(&limited);
    assert_eq!(limited.status.code(), Some(1), "{err}");
    assert!(
        err.contains("resuming from the checkpoint of step 12"),
        "{err}"
    );
    assert!(
        err.contains("checkpoints/.tmp-step-0000000016/model.safetensors")
            && err.contains("File too large"),
        "the error does not name the file and the cause:\n{err}"
    );
    assert!(
        err.contains(".net.partial is kept for the next run to resume from"),
        "{err}"
    );
    assert_eq!(
        contents(&checkpoints.join("step-0000000012")),
        kept,
        "the newest checkpoint changed"
    );
    assert!(checkpoints
        .join("step-0000000008/model.safetensors")
        .exists());
    assert!(
        temp_files(&partial).is_empty(),
        "{:?}",
        temp_files(&partial)
    );

    // The newest checkpoint damaged: the next run skips it for step 8's.
    let model = checkpoints.join("step-0000000012/model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..1000]).unwrap();
    let resumed = pipeline(dir.path(), &["run", "f.toml"]);
    let err = stderr(&resumed);
    assert!(resumed.status.success(), "{err}");
    assert!(
        err.contains("skipping checkpoint of step 12")
            && err.contains("step-0000000012/model.safetensors")
            && err.contains("resuming from the checkpoint of step 8"),
        "{err}"
    );
    final_folders_are_complete(&dir.path().join("out"));
    same_outputs(&dir.path().join("out"), &dir.path().join("reference"));
    assert!(temp_files(&dir.path().join("out")).is_empty());
}

/// When no checkpoint's state can be read (a program that wrote what it cannot read back, as
/// a NaN written as `null` once did), the run fails naming the file and keeps the checkpoints
/// for a fixed program, rather than starting again from step 0 or discarding them; with the
/// states readable again it resumes and ends as an uninterrupted run.
#[test]
fn unreadable_checkpoint_states_fail_the_run_and_are_kept() {
    let dir = scratch();
    stopped_in_the_checkpoint_of_step_16(dir.path());
    let checkpoints = dir.path().join("out/.net.partial/checkpoints");
    let states: Vec<PathBuf> = [8, 12]
        .iter()
        .map(|s| checkpoints.join(format!("step-{s:010}/state.json")))
        .collect();
    let good: Vec<Vec<u8>> = states.iter().map(|p| std::fs::read(p).unwrap()).collect();
    for p in &states {
        std::fs::write(p, b"{\"step\": null}").unwrap();
    }
    let failed = pipeline(dir.path(), &["run", "f.toml"]);
    let err = stderr(&failed);
    assert_eq!(failed.status.code(), Some(1), "{err}");
    assert!(
        err.contains("state.json") && err.contains("no checkpoint can be read"),
        "{err}"
    );
    assert!(
        err.contains(".net.partial is kept for the next run to resume from"),
        "{err}"
    );
    for (p, g) in states.iter().zip(&good) {
        std::fs::write(p, g).unwrap();
    }
    let resumed = pipeline(dir.path(), &["run", "f.toml"]);
    let err = stderr(&resumed);
    assert!(resumed.status.success(), "{err}");
    assert!(
        err.contains("resuming from the checkpoint of step 12"),
        "{err}"
    );
    same_outputs(&dir.path().join("out"), &dir.path().join("reference"));
}

#[test]
fn killed_at_random_moments_the_run_resumes_and_ends_bitwise_equal() {
    let kills_wanted: usize = std::env::var("LDL_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let seed: u64 = std::env::var("LDL_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let dir = scratch();
    write(dir.path(), "k.toml", CFG);

    let t0 = Instant::now();
    let reference = pipeline(dir.path(), &["run", "k.toml", "--output", "reference"]);
    assert!(reference.status.success(), "{}", stderr(&reference));
    let full = t0.elapsed();
    eprintln!("uninterrupted run: {full:?}");

    // Passes: each runs the experiment into a fresh output root, killing it at moments
    // full·u² (u uniform in [0, 1): many early kills, some late ones, so that every stage kind
    // is hit, also those that redo their whole work when killed) until a run gets through, and
    // then compares it with the reference. Passes continue until `kills_wanted` kills.
    let mut rng = Rng(seed);
    let (mut kills, mut attempts, mut resumes, mut pass) = (0usize, 0usize, 0usize, 0usize);
    let mut chunk_resumes = 0usize;
    let mut killed_in: BTreeMap<String, usize> = BTreeMap::new();
    while kills < kills_wanted || pass == 0 {
        pass += 1;
        let out_name = format!("out-{pass}");
        let out = dir.path().join(&out_name);
        let mut expected_resume: BTreeMap<String, u64> = BTreeMap::new();
        let mut expected_chunks = 0usize;
        let mut pass_attempts = 0;
        loop {
            attempts += 1;
            pass_attempts += 1;
            assert!(pass_attempts < 500, "pass {pass} never completed");
            let log = dir.path().join(format!("attempt-{attempts}.log"));
            let mut child = Command::new(env!("CARGO_BIN_EXE_pipeline"))
                .args(["run", "k.toml", "--output", &out_name])
                .current_dir(dir.path())
                .env("RAYON_NUM_THREADS", "2")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let u = rng.next();
            let delay = full.mul_f64(u * u);
            let deadline = Instant::now() + delay;
            let mut status = None;
            // Once enough kills happened, let the run finish.
            while kills < kills_wanted && Instant::now() < deadline {
                if let Some(s) = child.try_wait().unwrap() {
                    status = Some(s);
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let finished = match status {
                Some(s) => Some(s),
                None if kills < kills_wanted => {
                    child.kill().unwrap(); // SIGKILL
                    child.wait().unwrap();
                    None
                }
                None => Some(child.wait().unwrap()),
            };
            let text = std::fs::read_to_string(&log).unwrap();
            assert!(
                !text.contains("in use by another pipeline"),
                "a stale lock blocked attempt {attempts}:\n{text}"
            );
            // The trainings this attempt resumed started from the newest checkpoint left by
            // the previous kill: nothing older, so at most one checkpoint interval is redone.
            for line in text
                .lines()
                .filter(|l| l.contains("resuming from the checkpoint of step"))
            {
                let stage = line
                    .split(" INFO ")
                    .nth(1)
                    .unwrap_or(line)
                    .split(':')
                    .next()
                    .unwrap()
                    .trim();
                let step: u64 = line
                    .rsplit("step ")
                    .next()
                    .and_then(|s| s.split_whitespace().next())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("no step in `{line}`"));
                if let Some(&want) = expected_resume.get(stage) {
                    assert_eq!(
                        step, want,
                        "{stage} resumed from step {step}, newest was {want}"
                    );
                }
                resumes += 1;
            }
            // A label stage resumed with every chunk the previous kill left complete: at most the
            // chunk it was computing is redone.
            if let Some(line) = text
                .lines()
                .find(|l| l.contains("labels: train split: resuming with"))
            {
                let done: usize = line
                    .split("resuming with ")
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("no count in `{line}`"));
                assert_eq!(
                    done, expected_chunks,
                    "labels resumed with {done} chunks, {expected_chunks} were complete"
                );
                chunk_resumes += 1;
            }
            final_folders_are_complete(&out);
            match finished {
                Some(s) => {
                    assert!(s.success(), "attempt {attempts} failed:\n{text}");
                    break;
                }
                None => {
                    kills += 1;
                    expected_resume = newest_checkpoints(&out);
                    expected_chunks = complete_chunks(&out);
                    let running = text
                        .lines()
                        .rev()
                        .find(|l| l.contains(": running ("))
                        .and_then(|l| l.split(" INFO ").nth(1))
                        .map_or("(starting)".to_string(), |l| {
                            l.split(':').next().unwrap_or(l).to_string()
                        });
                    eprintln!("pass {pass}, kill {kills} after {delay:?}: in {running}");
                    *killed_in.entry(running).or_default() += 1;
                }
            }
        }

        // Every artifact equals the uninterrupted run's.
        same_outputs(&out, &dir.path().join("reference"));
        // Nothing partial is left behind.
        let leftovers: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".partial"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
    eprintln!(
        "{kills} kills in {pass} passes, {attempts} runs, {resumes} resumed trainings, {chunk_resumes} resumed label stages; kills per stage: {killed_in:?}"
    );
    assert!(kills >= kills_wanted, "only {kills} kills");
}
