//! `pipeline submit --slurm` against a real Slurm: the one-node cluster of
//! `scripts/slurm-local.sh` (Debian's slurm-wlm and munge, started by the test itself when it
//! is not up, which needs root; `.ci/run` starts it too). A grid becomes job arrays (cut into
//! chunks: the test cluster's MaxArraySize is 3) chained as the DAG says, and completes with the
//! artifacts of a local run; a preempted training requeues itself and resumes bitwise; bad
//! input submits nothing.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Starts the local cluster unless one answers.
fn cluster() {
    static UP: OnceLock<()> = OnceLock::new();
    UP.get_or_init(|| {
        let up = Command::new("sinfo")
            .args(["-h", "-o", "%T"])
            .output()
            .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
        if up {
            return;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/slurm-local.sh");
        let o = Command::new("bash")
            .arg(&script)
            .arg("start")
            .output()
            .expect("run scripts/slurm-local.sh");
        assert!(
            o.status.success(),
            "no Slurm cluster answers, and `bash scripts/slurm-local.sh start` (as root) failed: {}",
            stderr(&o)
        );
    });
}

/// The tests that submit jobs run one at a time (one pauses the partition).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Holds the partition (`State=DOWN`: jobs are accepted and pend) until dropped.
struct Paused;

impl Paused {
    fn new() -> Paused {
        set_partition("DOWN");
        Paused
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        set_partition("UP");
    }
}

fn set_partition(state: &str) {
    let o = Command::new("scontrol")
        .args(["update", "PartitionName=debug", &format!("State={state}")])
        .output()
        .expect("scontrol");
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Waits until none of `jobs` is queued or running.
fn wait_for(jobs: &[String]) {
    let t0 = Instant::now();
    loop {
        let o = Command::new("squeue")
            .args(["-h", "-o", "%i", "--jobs", &jobs.join(",")])
            .output()
            .expect("squeue");
        if String::from_utf8_lossy(&o.stdout).trim().is_empty() {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "jobs {jobs:?} still queued after 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits (up to 5 minutes) until the `model` training under `out` has written a checkpoint.
fn training_started(out: &Path) {
    let t0 = Instant::now();
    while !out.join(".model.partial/checkpoints").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "the training did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `scontrol show job -o ID`: one line per job (per task of an array).
fn show(id: &str) -> String {
    let o = Command::new("scontrol")
        .args(["show", "job", "-o", id])
        .output()
        .expect("scontrol");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn jobs_json(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join(".slurm/jobs.json")).unwrap()).unwrap()
}

/// Every output file of every stage folder but `stage.json`, `stage.log` and the timings of
/// `train_log.csv`.
fn artifacts(out: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let stages: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|s| !s.starts_with('.'))
        .collect();
    artifacts_of(out, stages.iter().map(String::as_str))
}

/// Data, a grid of four trainings, evaluations following it cell by cell, a report.
const GRID: &str = "[run]\noutput = \"out\"\nseed = 2\nthreads = 1\n\n\
    [[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 128\ntest_size = 48\nclasses = 3\nimage_size = 12\n\n\
    [[stage]]\nname = \"model\"\nkind = \"train\"\nneeds = [\"data\"]\nmatrix = { seed = [0, 1, 2, 3] }\nmodel = \"resnet8\"\nwidth = 4\nmethod = \"vanilla\"\nepochs = 2\nbatch_size = 32\n\n\
    [[stage]]\nname = \"eval\"\nkind = \"evaluate\"\nneeds = [\"data\", \"model\"]\n\n\
    [[stage]]\nname = \"report\"\nkind = \"report\"\nneeds = [\"eval\"]\n\n\
    [slurm]\ntime = \"00:20:00\"\nthrottle = 2\n\n[slurm.kind.train]\ncpus = 1\n";

#[test]
fn a_grid_on_slurm_runs_as_chained_arrays_and_gives_a_local_runs_artifacts() {
    cluster();
    let _serial = serial();
    let dir = scratch();
    write(dir.path(), "g.toml", GRID);
    let local = pipeline(dir.path(), &["run", "g.toml", "--output", "local"]);
    assert!(local.status.success(), "{}", stderr(&local));
    // Submitted to a paused partition, the jobs pend while their structure is read.
    let paused = Paused::new();
    let o = pipeline(dir.path(), &["submit", "g.toml", "--slurm"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    let jobs = jobs_json(&out);
    let job = |stage: &str| jobs["stages"][stage].as_str().unwrap().to_string();
    let base = |stage: &str| job(stage).split('_').next().unwrap().to_string();
    // The grid is two arrays (MaxArraySize 3): tasks 0–2, then one task of the second chunk.
    assert_eq!(job("model.seed=0"), format!("{}_0", base("model.seed=0")));
    assert_eq!(job("model.seed=2"), format!("{}_2", base("model.seed=0")));
    assert_eq!(job("model.seed=3"), format!("{}_0", base("model.seed=3")));
    assert_ne!(base("model.seed=3"), base("model.seed=0"));
    // While pending, each job waits on what the DAG says: the trainings on the data, the
    // evaluations task by task on the trainings (and on the data), the report on them all.
    let model = show(&base("model.seed=0"));
    let eval = show(&base("eval.seed=0"));
    let eval_chunk = show(&base("eval.seed=3"));
    let report = show(&job("report"));
    assert!(
        model.contains(&format!("afterok:{}", base("data"))),
        "{model}"
    );
    assert!(
        eval.contains(&format!("aftercorr:{}", base("model.seed=0"))),
        "{eval}"
    );
    assert!(
        eval_chunk.contains(&format!("aftercorr:{}", base("model.seed=3"))),
        "{eval_chunk}"
    );
    for cell in ["eval.seed=0", "eval.seed=3"] {
        assert!(
            report.contains(&format!("afterok:{}", base(cell))),
            "{report}"
        );
    }
    assert!(model.contains("ArrayTaskThrottle=2"), "{model}");
    // Throttled, the grid's second chunk waits for its first to end: at most 2 tasks of the
    // grid run at once, not 2 a chunk.
    let model_chunk = show(&base("model.seed=3"));
    assert!(
        model_chunk.contains(&format!("afterany:{}", base("model.seed=0"))),
        "{model_chunk}"
    );
    assert!(model.contains("Requeue=1"), "{model}");
    // `pipeline status` names each waiting stage's job and its state (from squeue).
    let st = pipeline(dir.path(), &["status", "g.toml"]);
    assert!(
        stdout(&st).contains(&format!("(Slurm job {}: PENDING)", job("model.seed=1"))),
        "{}",
        stdout(&st)
    );
    // A dry run looks at the queue as a submission does: everything is queued.
    let dry = pipeline(dir.path(), &["submit", "g.toml", "--slurm", "--dry-run"]);
    assert!(
        stdout(&dry).contains("nothing to submit") && !stdout(&dry).contains("#SBATCH"),
        "{}",
        stdout(&dry)
    );
    drop(paused);
    let ids: Vec<String> = jobs["stages"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().split('_').next().unwrap().to_string())
        .collect();
    wait_for(&ids);
    let st = pipeline(dir.path(), &["status", "g.toml"]);
    assert_eq!(
        stdout(&st)
            .lines()
            .filter(|l| l.ends_with("up to date"))
            .count(),
        10,
        "{}",
        stdout(&st)
    );
    assert_eq!(artifacts(&out), artifacts(&dir.path().join("local")));
    // Nothing is left to submit; a stage whose output went missing is submitted alone.
    let again = pipeline(dir.path(), &["submit", "g.toml", "--slurm"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stdout(&again).contains("nothing to submit: every stage is up to date or queued"),
        "{}",
        stdout(&again)
    );
    let clean = pipeline(dir.path(), &["clean", "g.toml", "eval.seed=1"]);
    assert!(clean.status.success(), "{}", stderr(&clean));
    let partial = pipeline(dir.path(), &["submit", "g.toml", "--slurm"]);
    assert!(partial.status.success(), "{}", stderr(&partial));
    assert!(
        stdout(&partial).contains("1 stage(s) submitted"),
        "{}",
        stdout(&partial)
    );
    let id = jobs_json(&out)["stages"]["eval.seed=1"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for(&[id.split('_').next().unwrap().to_string()]);
    assert_eq!(artifacts(&out), artifacts(&dir.path().join("local")));
}

#[test]
fn a_preempted_training_requeues_itself_and_resumes_bitwise() {
    cluster();
    let _serial = serial();
    let dir = scratch();
    let cfg = "[run]\noutput = \"out\"\nseed = 5\nthreads = 1\n\n\
        [[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 96\ntest_size = 16\nclasses = 3\nimage_size = 12\n\n\
        [[stage]]\nname = \"model\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\nwidth = 4\nmethod = \"vanilla\"\nepochs = 40\nbatch_size = 16\n";
    write(dir.path(), "p.toml", cfg);
    let reference = pipeline(dir.path(), &["run", "p.toml", "--output", "reference"]);
    assert!(reference.status.success(), "{}", stderr(&reference));
    let o = pipeline(dir.path(), &["submit", "p.toml", "--slurm"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    let job = jobs_json(&out)["stages"]["model"]
        .as_str()
        .unwrap()
        .to_string();
    training_started(&out);
    // What Slurm sends before a time limit or a preemption: USR2 to the batch step.
    let sig = Command::new("scancel")
        .args(["--signal=USR2", "--batch", &job])
        .output()
        .unwrap();
    assert!(sig.status.success(), "{}", stderr(&sig));
    wait_for(std::slice::from_ref(&job));
    let record = show(&job);
    assert!(record.contains("JobState=COMPLETED"), "{record}");
    assert!(record.contains("Restarts=1"), "{record}");
    let log = std::fs::read_dir(out.join(".slurm/logs"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("ldl-model"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .expect("the training's Slurm log");
    assert!(log.contains("requeued Slurm job"), "{log}");
    assert!(
        log.contains(&format!("Slurm job {job}, restart 1")),
        "{log}"
    );
    assert!(
        log.contains("model: resuming from the checkpoint of step"),
        "{log}"
    );
    let weights =
        |root: &str| std::fs::read(dir.path().join(root).join("model/model.safetensors")).unwrap();
    assert!(
        weights("out") == weights("reference"),
        "resumed weights differ"
    );
}

#[test]
fn bad_input_submits_nothing() {
    let dir = scratch();
    let bad = GRID.replace("throttle = 2", "throttle = 2\nqueue = \"fast\"");
    write(dir.path(), "bad.toml", &bad);
    let o = pipeline(dir.path(), &["submit", "bad.toml", "--slurm"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let line = bad.lines().position(|l| l.starts_with("queue")).unwrap() + 1;
    assert!(
        stderr(&o).contains(&format!("bad.toml:{line}:1: [slurm]: unknown key `queue`")),
        "{}",
        stderr(&o)
    );
    let unknown = GRID.replace("[slurm.kind.train]", "[slurm.stage.nope]");
    write(dir.path(), "nope.toml", &unknown);
    let o = pipeline(dir.path(), &["submit", "nope.toml", "--slurm"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no stage or grid named `nope`"),
        "{}",
        stderr(&o)
    );
    // No sbatch on PATH.
    write(dir.path(), "g.toml", GRID);
    let o = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["submit", "g.toml", "--slurm"])
        .current_dir(dir.path())
        .env("PATH", dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("needs Slurm's `sbatch` on PATH"),
        "{}",
        stderr(&o)
    );
    assert!(
        !dir.path().join("out/.slurm").exists(),
        "nothing may be written"
    );
}

/// A training that fails leaves its evaluation waiting on a dependency that is never satisfied:
/// `pipeline status` says so, and submitting again (with the failure fixed) cancels that job and
/// submits the evaluation anew on the new training job. A job cancelled with `scancel` (SIGTERM)
/// checkpoints and stays cancelled: it does not requeue itself.
#[test]
fn a_job_stuck_on_a_failed_upstream_is_replaced_and_a_cancelled_job_stays_cancelled() {
    cluster();
    let _serial = serial();
    let dir = scratch();
    let cfg = |lr: &str, epochs: usize| {
        format!(
            "[run]\noutput = \"out\"\nseed = 3\nthreads = 1\n\n\
             [[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 96\ntest_size = 16\nclasses = 3\nimage_size = 12\n\n\
             [[stage]]\nname = \"model\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\nwidth = 4\nmethod = \"vanilla\"\nepochs = {epochs}\nbatch_size = 16\nlr = {lr}\n\n\
             [[stage]]\nname = \"eval\"\nkind = \"evaluate\"\nneeds = [\"data\", \"model\"]\n\n\
             [[stage]]\nname = \"report\"\nkind = \"report\"\nneeds = [\"eval\"]\n"
        )
    };
    write(dir.path(), "f.toml", &cfg("1e30", 2));
    let o = pipeline(dir.path(), &["submit", "f.toml", "--slurm"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    let first = jobs_json(&out);
    let job = |j: &serde_json::Value, s: &str| j["stages"][s].as_str().unwrap().to_string();
    let (model, eval, report) = (
        job(&first, "model"),
        job(&first, "eval"),
        job(&first, "report"),
    );
    wait_for(std::slice::from_ref(&model));
    let t0 = Instant::now();
    loop {
        let o = Command::new("squeue")
            .args(["-h", "-o", "%r", "--jobs", &eval])
            .output()
            .expect("squeue");
        if String::from_utf8_lossy(&o.stdout).contains("DependencyNeverSatisfied") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "eval job {eval} not stuck: {}",
            show(&eval)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let st = pipeline(dir.path(), &["status", "f.toml"]);
    assert!(
        stdout(&st).contains(&format!(
            "(Slurm job {eval}: PENDING (DependencyNeverSatisfied): never starts"
        )),
        "{}",
        stdout(&st)
    );
    write(dir.path(), "f.toml", &cfg("0.1", 2));
    let o = pipeline(dir.path(), &["submit", "f.toml", "--slurm"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let second = jobs_json(&out);
    let (model2, eval2, report2) = (
        job(&second, "model"),
        job(&second, "eval"),
        job(&second, "report"),
    );
    assert!(
        model2 != model && eval2 != eval && report2 != report,
        "{second}"
    );
    // The report waited on the stuck evaluation (two levels below the failure): it is
    // cancelled and submitted again after the new one, not left on the cancelled job.
    for old in [&eval, &report] {
        assert!(show(old).contains("JobState=CANCELLED"), "{}", show(old));
    }
    wait_for(&[model2, eval2, report2]);
    assert!(out.join("eval/metrics.json").exists());
    assert!(out.join("report/report.md").exists());

    // scancel: SIGTERM to the training, which checkpoints and does not requeue.
    write(dir.path(), "f.toml", &cfg("0.1", 400));
    let o = pipeline(dir.path(), &["submit", "f.toml", "--slurm"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let model3 = job(&jobs_json(&out), "model");
    training_started(&out);
    let o = Command::new("scancel").arg(&model3).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for(std::slice::from_ref(&model3));
    let record = show(&model3);
    assert!(
        record.contains("JobState=CANCELLED") && record.contains("Restarts=0"),
        "{record}"
    );
    let cancel_all = Command::new("scancel")
        .args([
            job(&jobs_json(&out), "eval"),
            job(&jobs_json(&out), "report"),
        ])
        .output();
    assert!(cancel_all.is_ok());
}
