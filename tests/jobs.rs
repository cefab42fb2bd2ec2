//! `pipeline run --jobs N`: stages in parallel child processes, with the same artifacts as one
//! after another; a killed `--jobs` run resumes to them; bad flags are refused.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A prepared dataset and three independent trainings of a few seconds each, then their
/// evaluations: room for two stages at once. One thread per stage, which keeps two children from
/// crowding the two cores of CI (the artifacts do not depend on it: see
/// `the_artifacts_do_not_depend_on_the_thread_count`).
const GRID: &str = "[run]\noutput = \"out\"\nseed = 2\nthreads = 1\n\n\
    [[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 256\ntest_size = 64\nclasses = 4\nimage_size = 12\n\n\
    [[stage]]\nname = \"model\"\nkind = \"train\"\nneeds = [\"data\"]\nmatrix = { seed = [0, 1, 2] }\nmodel = \"resnet8\"\nwidth = 8\nmethod = \"vanilla\"\nepochs = 6\nbatch_size = 32\ncheckpoint_every = 3\n\n\
    [[stage]]\nname = \"eval\"\nkind = \"evaluate\"\nneeds = [\"data\", \"model\"]\n";

const STAGES: [&str; 7] = [
    "data",
    "model.seed=0",
    "model.seed=1",
    "model.seed=2",
    "eval.seed=0",
    "eval.seed=1",
    "eval.seed=2",
];

/// Every output file of every stage (as `stage.json` lists them) with its contents, the
/// wall-clock columns of `train_log.csv` left out.
fn artifacts(out: &Path) -> BTreeMap<String, Vec<u8>> {
    artifacts_of(out, STAGES.iter().copied())
}

fn record(out: &Path, stage: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join(stage).join("stage.json")).unwrap()).unwrap()
}

#[test]
fn two_jobs_give_the_artifacts_of_one_and_run_stages_at_the_same_time() {
    let dir = scratch();
    write(dir.path(), "g.toml", GRID);
    let one = pipeline(dir.path(), &["run", "g.toml", "--output", "one"]);
    assert!(one.status.success(), "{}", stderr(&one));
    let two = pipeline(dir.path(), &["run", "g.toml", "--jobs", "2"]);
    assert!(two.status.success(), "{}", stderr(&two));
    let out = dir.path().join("out");
    assert_eq!(artifacts(&out), artifacts(&dir.path().join("one")));
    // Some two trainings overlapped in time (stage.json times are whole seconds).
    let spans: Vec<(String, String)> = ["model.seed=0", "model.seed=1", "model.seed=2"]
        .iter()
        .map(|s| {
            let r = record(&out, s);
            (
                r["started"].as_str().unwrap().to_string(),
                r["finished"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let overlap = (0..3)
        .any(|a| (0..3).any(|b| a != b && spans[a].0 <= spans[b].0 && spans[b].0 < spans[a].1));
    assert!(
        overlap,
        "no two trainings ran at once: {spans:?}\n{}",
        stderr(&two)
    );
    // Each stage's full log is in its folder.
    let log = std::fs::read_to_string(out.join("model.seed=1/stage.log")).unwrap();
    assert!(log.contains("model.seed=1 (train): running"), "{log}");
    // A second run finds everything up to date, without children.
    let again = pipeline(dir.path(), &["run", "g.toml", "--jobs", "2"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(skipped(&again).len(), STAGES.len(), "{}", stderr(&again));
}

/// The PIDs of the processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid …: comm may hold spaces, so read after its closing parenthesis.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

#[test]
fn a_killed_jobs_run_resumes_to_the_same_artifacts() {
    use rustix::process::{kill_process, Pid, Signal};
    let dir = scratch();
    write(dir.path(), "g.toml", GRID);
    let one = pipeline(dir.path(), &["run", "g.toml", "--output", "one"]);
    assert!(one.status.success(), "{}", stderr(&one));
    let parent = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "g.toml", "--jobs", "2"])
        .current_dir(dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the trainings have checkpoints, then kill the children and the parent.
    let out = dir.path().join("out");
    let t0 = std::time::Instant::now();
    while !out.join(".model.seed=0.partial/checkpoints").exists()
        && !out.join(".model.seed=1.partial/checkpoints").exists()
    {
        assert!(t0.elapsed().as_secs() < 120, "the trainings did not start");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    for c in children_of(parent.id()) {
        let _ = kill_process(Pid::from_raw(c).unwrap(), Signal::KILL);
    }
    let mut parent = parent;
    parent.kill().unwrap();
    parent.wait().unwrap();
    let resumed = pipeline(dir.path(), &["run", "g.toml", "--jobs", "2"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert_eq!(artifacts(&out), artifacts(&dir.path().join("one")));
}

/// The same file run on 1 and on 3 CPU threads (`--threads`, with candle's own kernels following
/// it) gives bitwise the same trained weights, predictions and metrics: a stage's output depends
/// on its inputs and parameters, not on the cores of the machine or the `--jobs` that shared
/// them. The trainings have projection shortcuts (1×1 convolutions); one is an online student
/// (On-LDL) whose teacher runs in evaluation mode on every batch.
#[test]
fn the_artifacts_do_not_depend_on_the_thread_count() {
    let dir = scratch();
    let cfg = GRID
        .replace("threads = 1\n", "")
        .replace("matrix = { seed = [0, 1, 2] }", "matrix = { seed = [0, 1] }")
        .replace("epochs = 6", "epochs = 2")
        + "\n[[stage]]\nname = \"online\"\nkind = \"train\"\nneeds = [\"data\", \"model.seed=0\"]\nmodel = \"resnet14\"\nwidth = 4\nmethod = \"on-ldl\"\nepochs = 2\nbatch_size = 24\n";
    write(dir.path(), "g.toml", &cfg);
    let run = |threads: &str, out: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_pipeline"))
            .args(["run", "g.toml", "--threads", threads, "--output", out])
            .current_dir(dir.path())
            .env_remove("RAYON_NUM_THREADS")
            .output()
            .unwrap();
        assert!(o.status.success(), "{threads} threads: {}", stderr(&o));
        artifacts_of(
            &dir.path().join(out),
            [
                "data",
                "model.seed=0",
                "model.seed=1",
                "eval.seed=0",
                "eval.seed=1",
                "online",
            ],
        )
    };
    let (one, three) = (run("1", "one"), run("3", "three"));
    assert_eq!(
        one.keys().collect::<Vec<_>>(),
        three.keys().collect::<Vec<_>>()
    );
    for (file, bytes) in &one {
        assert!(
            three[file] == *bytes,
            "{file} differs between 1 and 3 threads"
        );
    }
}

#[test]
fn bad_jobs_and_devices_are_refused_before_anything_runs() {
    let dir = scratch();
    write(dir.path(), "g.toml", GRID);
    let zero = pipeline(dir.path(), &["run", "g.toml", "--jobs", "0"]);
    assert_eq!(zero.status.code(), Some(2), "{}", stderr(&zero));
    assert!(stderr(&zero).contains("--jobs"), "{}", stderr(&zero));
    // This CPU build has no CUDA device; and the file runs on the CPU anyway.
    let cpu = pipeline(dir.path(), &["run", "g.toml", "--devices", "0"]);
    assert_eq!(cpu.status.code(), Some(2), "{}", stderr(&cpu));
    assert!(stderr(&cpu).contains("--devices"), "{}", stderr(&cpu));
    let cuda = GRID.replace("seed = 2\n", "seed = 2\ndevice = \"cuda\"\n");
    write(dir.path(), "c.toml", &cuda);
    // (This CPU build refuses the file's device already, as a configuration error.)
    let missing = pipeline(dir.path(), &["run", "c.toml", "--devices", "0,7"]);
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    // Flags of the parallel mode without it are refused, not ignored.
    for (flags, named) in [
        (&["--keep-going"][..], "--keep-going"),
        (&["--keep-going", "--jobs", "1"][..], "--keep-going"),
        (&["--per-device", "2"][..], "--per-device"),
    ] {
        let o = pipeline(dir.path(), &[&["run", "g.toml"][..], flags].concat());
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(named), "{}", stderr(&o));
    }
    // As are a device or dtype `bench train` cannot use in this build.
    for (flag, value) in [("--device", "cuda"), ("--dtype", "bf16")] {
        let o = pipeline(dir.path(), &["bench", "train", flag, value]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(flag), "{}", stderr(&o));
    }
    assert!(!dir.path().join("out/data").exists(), "nothing may run");
}

/// A failing stage: the running ones finish, the exit status is 1, and the summary names the
/// stage and its log, which holds the error; `--keep-going` still runs everything else.
#[test]
fn a_failed_stage_is_named_with_its_log_and_keep_going_runs_the_rest() {
    let dir = scratch();
    // A learning rate that makes the loss diverge: the stage fails when it runs.
    let cfg = format!(
        "{GRID}\n[[stage]]\nname = \"bad\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\nwidth = 4\nmethod = \"vanilla\"\nepochs = 1\nbatch_size = 32\nlr = 1e30\n"
    );
    write(dir.path(), "g.toml", &cfg);
    let o = pipeline(
        dir.path(),
        &["run", "g.toml", "--jobs", "2", "--keep-going"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    let log = dir.path().join("out/.logs/bad.log");
    assert!(
        err.contains(&format!(
            "stage `bad` failed (exit status 1); its log: {}",
            log.display()
        )),
        "{err}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("loss became"), "{text}");
    let out = dir.path().join("out");
    for stage in STAGES {
        assert!(
            out.join(stage).join("stage.json").exists(),
            "{stage} ran: {err}"
        );
    }
    assert!(!out.join("bad").exists());
}

/// Ctrl-C (SIGINT to the parent) reaches every child once: the trainings checkpoint, the run
/// exits with status 75, and the next run resumes to the artifacts of an uninterrupted one.
#[test]
fn ctrl_c_stops_every_child_cleanly_and_the_next_run_resumes() {
    use rustix::process::{kill_process, Pid, Signal};
    let dir = scratch();
    let slow = GRID.replace("epochs = 6", "epochs = 16");
    write(dir.path(), "g.toml", &slow);
    let one = pipeline(dir.path(), &["run", "g.toml", "--output", "one"]);
    assert!(one.status.success(), "{}", stderr(&one));
    let parent = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "g.toml", "--jobs", "2"])
        .current_dir(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = dir.path().join("out");
    let t0 = std::time::Instant::now();
    while !out.join(".model.seed=0.partial/checkpoints").exists() {
        assert!(t0.elapsed().as_secs() < 120, "the trainings did not start");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    kill_process(Pid::from_child(&parent), Signal::INT).unwrap();
    let o = parent.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(75), "{err}");
    assert!(err.contains("stopped on request"), "{err}");
    assert!(
        out.join(".model.seed=0.partial/checkpoints").exists(),
        "{err}"
    );
    let resumed = pipeline(dir.path(), &["run", "g.toml", "--jobs", "2"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    // The children's logs, in the stages' folders, say where they resumed.
    let log = std::fs::read_to_string(out.join("model.seed=0/stage.log")).unwrap();
    assert!(
        log.contains("resuming from the checkpoint of step"),
        "{log}"
    );
    assert_eq!(artifacts(&out), artifacts(&dir.path().join("one")));
}

/// A stop request while only short stages run (two evaluations, which finish before they stop,
/// and a third waiting for a slot): no further stage starts, and the run says it was
/// interrupted (status 75), not done.
#[test]
fn a_stop_while_evaluations_run_leaves_the_rest_for_the_next_run_with_status_75() {
    use rustix::process::{kill_process, Pid, Signal};
    let dir = scratch();
    write(dir.path(), "g.toml", GRID);
    let first = pipeline(dir.path(), &["run", "g.toml"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let out = dir.path().join("out");
    for s in ["eval.seed=0", "eval.seed=1", "eval.seed=2"] {
        std::fs::remove_dir_all(out.join(s)).unwrap();
    }
    let parent = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "g.toml", "--jobs", "2"])
        .current_dir(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !out.join(".eval.seed=0.partial").exists() && !out.join("eval.seed=0").exists() {
        assert!(
            t0.elapsed().as_secs() < 120,
            "the evaluations did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    kill_process(Pid::from_child(&parent), Signal::TERM).unwrap();
    let o = parent.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(75), "{err}");
    assert!(err.contains("stopped on request"), "{err}");
    assert!(!out.join("eval.seed=2").exists(), "{err}");
    let rest = pipeline(dir.path(), &["run", "g.toml", "--jobs", "2"]);
    assert!(rest.status.success(), "{}", stderr(&rest));
    assert!(out.join("eval.seed=2/metrics.json").exists());
}

/// Starts `pipeline run f.toml --jobs 2 EXTRA` in `dir`, its log in `parent.log`, and returns
/// once its child for `data` waits for the claim that the caller holds.
fn jobs_run_waiting_for_data(dir: &Path, extra: &[&str]) -> (std::process::Child, PathBuf) {
    let parent_log = dir.join("parent.log");
    let parent = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "f.toml", "--jobs", "2"])
        .args(extra)
        .current_dir(dir)
        .env("RAYON_NUM_THREADS", "2")
        .stderr(std::fs::File::create(&parent_log).unwrap())
        .spawn()
        .unwrap();
    let child_log = dir.join("out/.logs/data.log");
    let waiting = (0..1200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        std::fs::read_to_string(&child_log)
            .is_ok_and(|l| l.contains("data: being run by another process"))
    });
    assert!(waiting, "{}", std::fs::read_to_string(&parent_log).unwrap());
    (parent, parent_log)
}

/// A `--jobs` run judges a forced stage from its own start, not its child's: a stage another
/// process re-ran while the run waited for an upstream stage is not run again (each child used
/// to judge from the moment it was started, after that re-run).
#[test]
fn a_forced_stage_re_run_elsewhere_meanwhile_is_not_run_again_by_a_jobs_run() {
    use rustix::fs::{flock, FlockOperation};
    let dir = scratch();
    write(dir.path(), "f.toml", DATA_AND_MODEL);
    let o = pipeline(dir.path(), &["run", "f.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    // Holding `data`'s claim here keeps the `--jobs` run's child for `data` waiting.
    let claim = std::fs::File::open(out.join(".locks/data.lock")).unwrap();
    flock(&claim, FlockOperation::NonBlockingLockExclusive).unwrap();
    let (parent, parent_log) =
        jobs_run_waiting_for_data(dir.path(), &["--force", "data", "--force", "model"]);
    // Another process forces `model` meanwhile.
    let o = pipeline(
        dir.path(),
        &["run", "f.toml", "--only", "model", "--force", "model"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(ran(&o), ["model"]);
    let second = record(&out, "model")["run"].clone();
    drop(claim);
    let o = parent.wait_with_output().unwrap();
    let log = std::fs::read_to_string(&parent_log).unwrap();
    assert!(o.status.success(), "{log}");
    assert!(log.contains("data: started (slot"), "{log}");
    assert!(!log.contains("model: started (slot"), "{log}");
    assert!(log.contains("model (train): up to date, skipped"), "{log}");
    assert_eq!(record(&out, "model")["run"], second);
}

/// A child that finds its stage completed by another process while it waited runs nothing and
/// says so (exit status 3): the parent counts the stage as done elsewhere, not as run, and leaves
/// the `stage.log` of the process that ran it in the stage's folder.
#[test]
fn a_stage_completed_elsewhere_while_its_child_waited_is_not_counted_as_run() {
    use rustix::fs::{flock, FlockOperation};
    let dir = scratch();
    write(
        dir.path(),
        "f.toml",
        "[run]\noutput = \"out\"\n\n\
         [[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 64\ntest_size = 32\nclasses = 3\nimage_size = 12\n",
    );
    // The folder the other process completes: the same stage, run into another output root.
    let o = pipeline(
        dir.path(),
        &["run", "f.toml", "--jobs", "2", "--output", "other"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let theirs = std::fs::read(dir.path().join("other/data/stage.log")).unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(out.join(".locks")).unwrap();
    let claim = std::fs::File::create(out.join(".locks/data.lock")).unwrap();
    flock(&claim, FlockOperation::NonBlockingLockExclusive).unwrap();
    let (parent, parent_log) = jobs_run_waiting_for_data(dir.path(), &[]);
    // The claim's holder completes the stage: its folder appears in one rename.
    let done = out.join(".done");
    copy_files(&dir.path().join("other/data"), &done);
    std::fs::rename(&done, out.join("data")).unwrap();
    drop(claim);
    let o = parent.wait_with_output().unwrap();
    let log = std::fs::read_to_string(&parent_log).unwrap();
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("data: completed by another process; its child ran nothing"),
        "{log}"
    );
    assert!(!log.contains("data: done in"), "{log}");
    assert!(
        log.contains("0 stage(s) run, 0 up to date, 1 completed by other processes"),
        "{log}"
    );
    assert_eq!(std::fs::read(out.join("data/stage.log")).unwrap(), theirs);
}
