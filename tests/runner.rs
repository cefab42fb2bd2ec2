//! The runner's promises, through the binary: dependency order, skipping what is up to date,
//! re-running exactly the downstream of a change, no partial output after a failure, the lock.

mod common;
use common::*;
use std::path::Path;

fn record(out: &Path, stage: &str) -> serde_json::Value {
    let p = out.join(stage).join("stage.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

/// Stages declared in reverse order still run in dependency order.
#[test]
fn runs_in_dependency_order_whatever_the_file_order() {
    let dir = scratch();
    let reversed = "[run]\noutput = \"out\"\n\n\
        [[stage]]\nname = \"eval\"\nkind = \"evaluate\"\nneeds = [\"data\", \"model\"]\n\n\
        [[stage]]\nname = \"model\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\nwidth = 4\nmethod = \"vanilla\"\nepochs = 1\nbatch_size = 32\n\n\
        [[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 64\ntest_size = 32\nclasses = 3\nimage_size = 12\n";
    write(dir.path(), "rev.toml", reversed);
    let o = pipeline(dir.path(), &["run", "rev.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(ran(&o), ["data", "model", "eval"]);
    let out = dir.path().join("out");
    let (d, m, e) = (
        record(&out, "data"),
        record(&out, "model"),
        record(&out, "eval"),
    );
    assert!(d["finished"].as_str() <= m["started"].as_str());
    assert!(m["finished"].as_str() <= e["started"].as_str());
    assert_eq!(e["inputs"]["model"], m["fingerprint"]);
    assert_eq!(e["inputs"]["data"], d["fingerprint"]);
}

#[test]
fn skips_up_to_date_and_reruns_exactly_the_downstream_of_a_change() {
    let dir = scratch();
    let cfg = write(dir.path(), "p.toml", TINY);
    let first = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(ran(&first).len(), 8);
    let out = dir.path().join("out");
    let before: Vec<_> = TINY_STAGES.iter().map(|s| record(&out, s)).collect();

    let second = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(ran(&second).is_empty(), "{}", stderr(&second));
    assert_eq!(skipped(&second).len(), 8);

    let st = pipeline(dir.path(), &["status", "p.toml"]);
    assert!(st.status.success());
    assert_eq!(
        stdout(&st).matches("up to date").count(),
        8,
        "{}",
        stdout(&st)
    );

    // Operational keys (checkpointing, prefetch) change how a stage runs, not what it makes.
    let operational = TINY.replacen(
        "method = \"vanilla\"\nepochs = 1",
        "method = \"vanilla\"\nepochs = 1\ncheckpoint_every = 1\nkeep_checkpoints = 3\nprefetch = 4",
        1,
    );
    assert_ne!(operational, TINY);
    std::fs::write(&cfg, &operational).unwrap();
    let st = pipeline(dir.path(), &["status", "p.toml"]);
    assert_eq!(
        stdout(&st).matches("up to date").count(),
        8,
        "{}",
        stdout(&st)
    );

    // Change the vanilla student's epochs: it, its evaluation and the report re-run, nothing else.
    let changed = TINY.replacen(
        "method = \"vanilla\"\nepochs = 1",
        "method = \"vanilla\"\nepochs = 2",
        1,
    );
    assert_ne!(changed, TINY);
    std::fs::write(&cfg, &changed).unwrap();
    let st = pipeline(dir.path(), &["status", "p.toml"]);
    let status = stdout(&st);
    assert!(status.contains("parameters changed (`epochs`)"), "{status}");
    assert!(status.contains("upstream `vanilla` changed"), "{status}");
    let dry = pipeline(dir.path(), &["run", "p.toml", "--dry-run"]);
    assert_eq!(
        stdout(&dry).matches("would run").count(),
        3,
        "{}",
        stdout(&dry)
    );
    let third = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(third.status.success(), "{}", stderr(&third));
    assert_eq!(ran(&third), ["vanilla", "eval-vanilla", "report"]);
    for (i, s) in TINY_STAGES.iter().enumerate() {
        let now = record(&out, s);
        let rerun = ["vanilla", "eval-vanilla", "report"].contains(s);
        assert_eq!(now["fingerprint"] != before[i]["fingerprint"], rerun, "{s}");
    }
    // --force re-runs one stage even though it is up to date.
    let forced = pipeline(dir.path(), &["run", "p.toml", "--force", "eval-off-ldl"]);
    assert_eq!(ran(&forced), ["eval-off-ldl"], "{}", stderr(&forced));
    // clean removes a stage's output; status then says never run.
    let c = pipeline(dir.path(), &["clean", "p.toml", "report"]);
    assert!(c.status.success() && !out.join("report").exists());
    let st = pipeline(dir.path(), &["status", "p.toml"]);
    assert!(
        stdout(&st)
            .lines()
            .any(|l| l.starts_with("report") && l.ends_with("never run")),
        "{}",
        stdout(&st)
    );
}

#[test]
fn a_failing_stage_leaves_no_partial_output_and_keeps_the_previous_one() {
    let dir = scratch();
    let good = "[run]\noutput = \"out\"\n\n\
        [[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 64\ntest_size = 32\nclasses = 3\nimage_size = 12\n\n\
        [[stage]]\nname = \"model\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\nwidth = 4\nmethod = \"vanilla\"\nepochs = 1\nbatch_size = 32\nlr = 0.1\n";
    let cfg = write(dir.path(), "p.toml", good);
    assert!(pipeline(dir.path(), &["run", "p.toml"]).status.success());
    let out = dir.path().join("out");
    let weights = std::fs::read(out.join("model/model.safetensors")).unwrap();
    let rec = std::fs::read(out.join("model/stage.json")).unwrap();
    // A learning rate that makes the loss diverge: the stage fails at run time.
    std::fs::write(
        &cfg,
        good.replace("epochs = 1", "epochs = 4")
            .replace("lr = 0.1", "lr = 1e30"),
    )
    .unwrap();
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("stage `model` failed") && stderr(&o).contains("loss became"),
        "{}",
        stderr(&o)
    );
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial") || n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(
        std::fs::read(out.join("model/model.safetensors")).unwrap(),
        weights
    );
    assert_eq!(std::fs::read(out.join("model/stage.json")).unwrap(), rec);
    let st = pipeline(dir.path(), &["status", "p.toml"]);
    assert!(
        stdout(&st).contains("stale: parameters changed (`epochs`, `lr`)"),
        "{}",
        stdout(&st)
    );
}

#[test]
fn the_lock_refuses_a_second_run_and_is_taken_over_when_its_holder_died() {
    use rustix::fs::{flock, FlockOperation};
    use std::io::Write;
    let dir = scratch();
    write(
        dir.path(),
        "p.toml",
        "[run]\noutput = \"out\"\n[[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 20\ntest_size = 10\nimage_size = 8\n",
    );
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let lock_path = out.join(".pipeline.lock");
    // A live holder: this test process holds the flock, as a running pipeline would.
    let mut f = std::fs::File::create(&lock_path).unwrap();
    write!(f, "pid=4242 started=2026-01-01T00:00:00Z").unwrap();
    flock(&f, FlockOperation::NonBlockingLockExclusive).unwrap();
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("in use by another pipeline process (PID 4242"),
        "{}",
        stderr(&o)
    );
    assert!(!out.join("data").exists());
    // The holder dies (its flock goes with it) but its file stays: the next run takes over.
    drop(f);
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("taking over the lock"),
        "{}",
        stderr(&o)
    );
    assert!(out.join("data/stage.json").exists());
}

/// A training killed with SIGKILL at a random moment (mid-epoch checkpoints every 2 steps) resumes
/// from its newest complete checkpoint, and ends with weights bitwise equal to an uninterrupted
/// run's, and the same per-epoch log (timings aside).
#[test]
fn a_killed_training_resumes_and_matches_an_uninterrupted_run() {
    let dir = scratch();
    let cfg = "[run]\noutput = \"out\"\nseed = 5\n\n\
        [[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 96\ntest_size = 16\nclasses = 3\nimage_size = 12\n\n\
        [[stage]]\nname = \"model\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\nwidth = 4\nmethod = \"vanilla\"\nepochs = 12\nbatch_size = 16\n\
        checkpoint_every = 2\nkeep_checkpoints = 2\ndropout = 0.2\nmix = { type = \"cutmix\", p = 0.5 }\n";
    write(dir.path(), "p.toml", cfg);
    let reference = pipeline(dir.path(), &["run", "p.toml", "--output", "reference"]);
    assert!(reference.status.success(), "{}", stderr(&reference));

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "p.toml"])
        .current_dir(dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let checkpoints = dir.path().join("out/.model.partial/checkpoints");
    let t0 = std::time::Instant::now();
    while std::fs::read_dir(&checkpoints).map_or(true, |mut d| d.next().is_none()) {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    // A random moment after the first checkpoint: mid-step, mid-write or between steps.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let delay = std::time::Duration::from_micros(u64::from(nanos % 400_000));
    eprintln!("killing {delay:?} after the first checkpoint");
    std::thread::sleep(delay);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let out = dir.path().join("out");
    assert!(
        !out.join("model").exists(),
        "the killed stage must not have a final output"
    );
    let st = pipeline(dir.path(), &["status", "p.toml"]);
    assert!(
        stdout(&st).contains("incomplete: interrupted"),
        "{}",
        stdout(&st)
    );

    let resumed = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(
        stderr(&resumed).contains("resuming from the checkpoint of step"),
        "{}",
        stderr(&resumed)
    );
    assert_eq!(ran(&resumed), ["model"]);
    let a = std::fs::read(out.join("model/model.safetensors")).unwrap();
    let b = std::fs::read(dir.path().join("reference/model/model.safetensors")).unwrap();
    assert!(
        a == b,
        "resumed weights differ from the uninterrupted run's"
    );
    // The logs agree too, but for the timing columns.
    let without_timing = |p: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| l.split(',').take(4).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(
        without_timing(&out.join("model/train_log.csv")),
        without_timing(&dir.path().join("reference/model/train_log.csv"))
    );
    assert_eq!(
        std::fs::read(out.join("model/class_loss.csv")).unwrap(),
        std::fs::read(dir.path().join("reference/model/class_loss.csv")).unwrap()
    );
    assert!(!out.join(".model.partial").exists());
}

/// Two runs on different output roots run at the same time without interfering: both complete
/// and produce the same bytes as each other.
#[test]
fn two_runs_on_different_roots_run_side_by_side() {
    let dir = scratch();
    write(dir.path(), "tiny.toml", TINY);
    let spawn = |out: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
            .args(["run", "tiny.toml", "--output", out])
            .current_dir(dir.path())
            .env("RAYON_NUM_THREADS", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("a"), spawn("b"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(b.status.success(), "{}", stderr(&b));
    for f in [
        "teacher/model.safetensors",
        "labels/labels.parquet",
        "eval-off-ldl/metrics.json",
        "report/report.csv",
    ] {
        let x = std::fs::read(dir.path().join("a").join(f)).unwrap();
        let y = std::fs::read(dir.path().join("b").join(f)).unwrap();
        assert!(x == y, "{f} differs between the side-by-side runs");
    }
}
