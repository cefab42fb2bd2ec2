//! The runner's promises, through the binary: dependency order, skipping what is up to date,
//! re-running exactly the downstream of a change, no partial output after a failure, per-stage
//! claims shared by several processes on one output root.

mod common;
use common::*;
use std::io::Write as _;
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

/// An evaluation finished by a program whose evaluate stages wrote less (an older output
/// version: same parameters and inputs, another fingerprint, no `best_class.json`) is stale,
/// says why, and reruns alone, writing what this program writes.
#[test]
fn an_evaluation_of_an_older_output_version_reruns_alone() {
    let dir = scratch();
    let cfg = "[run]\noutput = \"out\"\n\n\
        [[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 64\ntest_size = 32\nclasses = 3\nimage_size = 12\n\n\
        [[stage]]\nname = \"model\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\nwidth = 4\nmethod = \"vanilla\"\nepochs = 1\nbatch_size = 32\n\n\
        [[stage]]\nname = \"eval\"\nkind = \"evaluate\"\nneeds = [\"data\", \"model\"]\n";
    write(dir.path(), "p.toml", cfg);
    assert!(pipeline(dir.path(), &["run", "p.toml"]).status.success());
    let eval = dir.path().join("out/eval");
    let edit_record = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut r = record(&dir.path().join("out"), "eval");
        f(&mut r);
        std::fs::write(eval.join("stage.json"), r.to_string()).unwrap();
    };
    edit_record(&|r| {
        r["fingerprint"] = "0".repeat(64).into();
        let outputs = r["outputs"].as_array_mut().unwrap();
        outputs.retain(|o| o["path"] != "best_class.json");
    });
    std::fs::remove_file(eval.join("best_class.json")).unwrap();
    let line = |name: &str| {
        let st = stdout(&pipeline(dir.path(), &["status", "p.toml"]));
        let found = st.lines().find(|l| l.starts_with(name)).map(str::to_owned);
        found.unwrap_or_else(|| panic!("{st}"))
    };
    assert!(line("model").ends_with("up to date"), "{}", line("model"));
    assert!(
        line("eval").contains(
            "stale: this program computes or writes the outputs of a stage of kind `evaluate` differently"
        ),
        "{}",
        line("eval")
    );
    edit_record(&|r| r["format_version"] = 0.into());
    assert!(
        line("eval").contains("stale: format version changed (0 → 1)"),
        "{}",
        line("eval")
    );
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert_eq!(ran(&o), ["eval"], "{}", stderr(&o));
    assert!(eval.join("best_class.json").exists());
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
    // --exit-code: 1 while a stage shown is not up to date, 0 when every one shown is.
    let code = |args: &[&str]| pipeline(dir.path(), args).status.code();
    assert_eq!(code(&["status", "p.toml", "--exit-code"]), Some(1));
    assert_eq!(code(&["status", "p.toml"]), Some(0));
    let only = pipeline(
        dir.path(),
        &[
            "status",
            "p.toml",
            "--only",
            "teacher",
            "--only",
            "labels",
            "--exit-code",
        ],
    );
    assert_eq!(only.status.code(), Some(0), "{}", stderr(&only));
    let shown = stdout(&only);
    let names: Vec<&str> = shown
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or_default())
        .collect();
    assert_eq!(names, ["teacher", "labels"], "{shown}");
    assert_eq!(
        code(&["status", "p.toml", "--only", "report", "--exit-code"]),
        Some(1)
    );
    assert_eq!(code(&["status", "p.toml", "--only", "nosuch"]), Some(2));
    let dry = pipeline(dir.path(), &["run", "p.toml", "--dry-run"]);
    assert_eq!(
        stdout(&dry).matches("would run").count(),
        4,
        "{}",
        stdout(&dry)
    );
    assert_eq!(
        stdout(&dry).lines().last(),
        Some("would run 3 stages: 1 train, 1 evaluate, 1 report"),
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

/// A forced run killed after its new folder was swapped into place but before the old one,
/// left complete at the partial path, was removed: the next run discards the old folder instead
/// of taking it for a finished run and moving the old outputs back over the new ones.
#[test]
fn an_old_folder_left_by_a_stopped_replacement_is_not_moved_back() {
    let dir = scratch();
    write(
        dir.path(),
        "f.toml",
        "[run]\noutput = \"out\"\n\n\
         [[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 64\ntest_size = 32\nclasses = 3\nimage_size = 12\n",
    );
    let out = dir.path().join("out");
    assert!(pipeline(dir.path(), &["run", "f.toml"]).status.success());
    copy_files(&out.join("data"), &dir.path().join("old"));
    let o = pipeline(dir.path(), &["run", "f.toml", "--force", "data"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let replaced = record(&out, "data")["finished"]
        .as_str()
        .unwrap()
        .to_string();
    // The state the kill leaves: the old folder at the partial path, complete; written by a
    // host whose clock ran an hour ahead, so its record ends after the new one's.
    copy_files(&dir.path().join("old"), &out.join(".data.partial"));
    let partial_record = out.join(".data.partial/stage.json");
    let mut old: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&partial_record).unwrap()).unwrap();
    shift_times(&mut old, &["finished"], 3600);
    std::fs::write(&partial_record, serde_json::to_vec_pretty(&old).unwrap()).unwrap();
    let o = pipeline(dir.path(), &["run", "f.toml", "--force", "data"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("holds outputs older than its folder's")
            && !stderr(&o).contains("moving it now"),
        "{}",
        stderr(&o)
    );
    assert_eq!(ran(&o), ["data"]);
    let started = record(&out, "data")["started"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        humantime::parse_rfc3339_weak(&started).unwrap()
            > humantime::parse_rfc3339_weak(&replaced).unwrap(),
        "{started} is not after {replaced}: the old folder came back"
    );
    assert!(!out.join(".data.partial").exists());
}

/// Starts `pipeline ARGS` in `dir` and returns once a line of its log contains `marker`, with
/// a thread that collects its whole log.
fn spawn_until(
    dir: &Path,
    args: &[&str],
    marker: &'static str,
) -> (std::process::Child, std::thread::JoinHandle<String>) {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(args)
        .current_dir(dir)
        .env("RAYON_NUM_THREADS", "2")
        .env("LDL_CACHE", dir.join(".ldl-cache"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (seen, saw) = std::sync::mpsc::channel();
    let reader = std::io::BufReader::new(child.stderr.take().unwrap());
    let log = std::thread::spawn(move || {
        let mut log = String::new();
        for line in reader.lines().map_while(Result::ok) {
            if line.contains(marker) {
                let _ = seen.send(());
            }
            log += &line;
            log.push('\n');
        }
        log
    });
    if let Err(e) = saw.recv_timeout(std::time::Duration::from_secs(120)) {
        let _ = child.kill();
        panic!("no `{marker}` ({e}):\n{}", log.join().unwrap());
    }
    (child, log)
}

/// The exit and log of a child of [`spawn_until`], as [`ran`] and [`skipped`] read them.
fn finish(
    mut child: std::process::Child,
    log: std::thread::JoinHandle<String>,
) -> std::process::Output {
    let status = child.wait().unwrap();
    std::process::Output {
        status,
        stdout: Vec::new(),
        stderr: log.join().unwrap().into_bytes(),
    }
}

/// Moves record times `keys` of `record` by `secs` seconds (negative: earlier), as a host whose
/// clock is off by that much would have written them.
fn shift_times(record: &mut serde_json::Value, keys: &[&str], secs: i64) {
    for key in keys {
        let t = humantime::parse_rfc3339_weak(record[*key].as_str().unwrap()).unwrap();
        let d = std::time::Duration::from_secs(secs.unsigned_abs());
        let t = if secs < 0 { t - d } else { t + d };
        record[*key] = humantime::format_rfc3339_millis(t).to_string().into();
    }
}

/// Two processes forcing one stage run it once, whatever their hosts' clocks say: a run that
/// forces `data` and `model` and waits for `data` while another process, on a host whose clock
/// is an hour behind, forces `model`, takes that run as the re-run it asked for (a run claimed
/// after it started), not as one older than itself.
#[test]
fn a_stage_forced_by_two_processes_runs_once_whatever_their_clocks() {
    use rustix::fs::{flock, FlockOperation};
    let dir = scratch();
    write(dir.path(), "f.toml", DATA_AND_MODEL);
    let o = pipeline(dir.path(), &["run", "f.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    // Holding `data`'s claim here keeps the first process waiting before it reaches `model`.
    let claim = std::fs::File::open(out.join(".locks/data.lock")).unwrap();
    flock(&claim, FlockOperation::NonBlockingLockExclusive).unwrap();
    let (first, log) = spawn_until(
        dir.path(),
        &["run", "f.toml", "--force", "data", "--force", "model"],
        "data: being run by another process",
    );
    let o = pipeline(
        dir.path(),
        &["run", "f.toml", "--only", "model", "--force", "model"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(ran(&o), ["model"]);
    let mut second = record(&out, "model");
    shift_times(&mut second, &["started", "finished"], -3600);
    let json = serde_json::to_vec_pretty(&second).unwrap();
    std::fs::write(out.join("model/stage.json"), json).unwrap();
    let weights = std::fs::read(out.join("model/model.safetensors")).unwrap();
    drop(claim);
    let first = finish(first, log);
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(ran(&first), ["data"], "{}", stderr(&first));
    assert_eq!(skipped(&first), ["model"], "{}", stderr(&first));
    assert_eq!(record(&out, "model")["run"], second["run"]);
    let now = std::fs::read(out.join("model/model.safetensors")).unwrap();
    assert!(now == weights, "model was trained again");
}

/// A run that was under way when `--force` was asked for started before it: its completion is
/// not the re-run asked for, and the forcing process runs the stage once the claim is free.
#[test]
fn a_forced_stage_whose_run_was_under_way_is_run_again() {
    use rustix::fs::{flock, FlockOperation};
    let dir = scratch();
    write(dir.path(), "f.toml", DATA_AND_MODEL);
    let o = pipeline(dir.path(), &["run", "f.toml", "--only", "data"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    let claim = std::fs::File::open(out.join(".locks/data.lock")).unwrap();
    flock(&claim, FlockOperation::NonBlockingLockExclusive).unwrap();
    let (forcing, log) = spawn_until(
        dir.path(),
        &["run", "f.toml", "--only", "data", "--force", "data"],
        "data: being run by another process",
    );
    // The run under way (the claim's holder) completes: its record replaces the one there.
    let mut done = record(&out, "data");
    done["replaces"] = done["run"].clone();
    done["run"] = "0123456789abcdef0123456789abcdef".into();
    shift_times(&mut done, &["started", "finished"], 1);
    let json = serde_json::to_vec_pretty(&done).unwrap();
    std::fs::write(out.join("data/stage.json"), json).unwrap();
    drop(claim);
    let forcing = finish(forcing, log);
    assert!(forcing.status.success(), "{}", stderr(&forcing));
    assert_eq!(ran(&forcing), ["data"], "{}", stderr(&forcing));
    assert_eq!(record(&out, "data")["replaces"], done["run"]);
}

/// A finished stage reaches its final folder whatever stops the run on the way: on a file
/// system without `renameat2(RENAME_EXCHANGE)` (NFS; simulated by `LDL_FAULT_EXCHANGE`) the
/// folder is replaced by two renames; a kill between them, or after the record is written, costs
/// no training: the next run moves the finished folder into place, or resumes from the
/// checkpoint of the last step.
#[test]
fn a_finished_stage_is_moved_into_place_after_any_stop_and_without_rename_exchange() {
    let dir = scratch();
    let cfg = |epochs: usize| {
        format!(
            "[run]\noutput = \"out\"\n\n\
             [[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 64\ntest_size = 32\nclasses = 3\nimage_size = 12\n\n\
             [[stage]]\nname = \"model\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\nwidth = 4\nmethod = \"vanilla\"\nepochs = {epochs}\nbatch_size = 32\n"
        )
    };
    let run = |epochs: usize, fault: Option<(&str, &str)>| {
        write(dir.path(), "f.toml", &cfg(epochs));
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"));
        c.args(["run", "f.toml"]).current_dir(dir.path());
        if let Some((k, v)) = fault {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let out = dir.path().join("out");
    let epochs_logged = || {
        std::fs::read_to_string(out.join("model/train_log.csv"))
            .unwrap()
            .lines()
            .count()
            - 1
    };
    let only_recorded = || {
        let rec = record(&out, "model");
        let mut listed: Vec<String> = rec["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["path"].as_str().unwrap().to_string())
            .chain(["stage.json".to_string()])
            .collect();
        listed.sort();
        let mut present: Vec<String> = std::fs::read_dir(out.join("model"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        present.sort();
        assert_eq!(present, listed);
        let hidden: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".model"))
            .collect();
        assert!(hidden.is_empty(), "{hidden:?}");
    };
    assert!(run(1, None).status.success());

    // Without the exchange, a changed stage still replaces its folder.
    let o = run(2, Some(("LDL_FAULT_EXCHANGE", "unsupported")));
    assert!(o.status.success(), "{}", stderr(&o));
    // (The default schedule's milestones are for the paper's 240 epochs: said, not refused.)
    assert!(
        stderr(&o).contains(
            "model: the learning rate never drops at milestone(s) [150, 180, 210]: the run has 2 epochs"
        ),
        "{}",
        stderr(&o)
    );
    assert_eq!(epochs_logged(), 2);
    only_recorded();

    // Killed between the two renames: no final folder for now, the finished one still partial.
    let o = run(3, Some(("LDL_FAULT_EXCHANGE", "unsupported-abort")));
    assert!(!o.status.success() && stderr(&o).contains("aborting between the renames"));
    assert!(!out.join("model").exists() && out.join(".model.partial/stage.json").exists());
    let st = pipeline(dir.path(), &["status", "f.toml"]);
    assert!(
        stdout(&st).contains("finished, but stopped before its folder was moved into place"),
        "{}",
        stdout(&st)
    );
    let o = run(3, None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("model: finished by an earlier run"),
        "{}",
        stderr(&o)
    );
    assert!(
        !stderr(&o).contains("epoch 1/3"),
        "trained again:\n{}",
        stderr(&o)
    );
    assert_eq!(epochs_logged(), 3);
    only_recorded();

    // Killed while writing the record: the outputs are there but not recorded; the checkpoint
    // of the last step is still there too, so nothing is trained again.
    let o = run(4, Some(("LDL_FAULT_WRITE", ".model.partial/stage.json@10")));
    assert!(!o.status.success() && stderr(&o).contains("LDL_FAULT_WRITE: aborting"));
    let o = run(4, None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("model: resuming from the checkpoint of step 8 "),
        "{}",
        stderr(&o)
    );
    assert_eq!(epochs_logged(), 4);
    only_recorded();
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

/// Every file of every stage folder under `out` except `stage.json` and the timing columns of
/// `train_log.csv`, with its contents: what must not depend on how a run was scheduled.
fn artifacts(out: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    artifacts_of(out, TINY_STAGES.iter().copied())
}

/// Two `pipeline run` processes started together on one output root share the work: both exit
/// 0, every stage ran in exactly one of them, and the artifacts equal a single run's.
#[test]
fn two_processes_on_one_root_run_every_stage_exactly_once() {
    let dir = scratch();
    write(dir.path(), "p.toml", TINY);
    let single = pipeline(dir.path(), &["run", "p.toml", "--output", "single"]);
    assert!(single.status.success(), "{}", stderr(&single));
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
            .args(["run", "p.toml"])
            .current_dir(dir.path())
            .env("RAYON_NUM_THREADS", "1")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn pipeline")
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "first: {}", stderr(&a));
    assert!(b.status.success(), "second: {}", stderr(&b));
    let (ran_a, ran_b) = (ran(&a), ran(&b));
    let mut all: Vec<String> = ran_a.iter().chain(&ran_b).cloned().collect();
    all.sort();
    let mut expected: Vec<String> = TINY_STAGES.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(
        all, expected,
        "each stage runs in exactly one process:\nfirst ran {ran_a:?}\nsecond ran {ran_b:?}"
    );
    assert_eq!(
        artifacts(&dir.path().join("out")),
        artifacts(&dir.path().join("single"))
    );
}

/// A stage claimed by a live process is left to it: another run waits for the claim, then
/// runs the stage itself when the holder ended without completing it (as a killed one would).
#[test]
fn a_claimed_stage_is_waited_for_and_taken_over_when_its_holder_ends() {
    use rustix::fs::{flock, FlockOperation};
    use std::io::Write;
    let dir = scratch();
    write(
        dir.path(),
        "p.toml",
        "[run]\noutput = \"out\"\n[[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 20\ntest_size = 10\nimage_size = 8\n",
    );
    let out = dir.path().join("out");
    std::fs::create_dir_all(out.join(".locks")).unwrap();
    // A live holder: this test process holds the stage's flock, as a running pipeline would.
    let mut f = std::fs::File::create(out.join(".locks/data.lock")).unwrap();
    write!(f, "host=elsewhere pid=4242 started=2026-01-01T00:00:00Z").unwrap();
    flock(&f, FlockOperation::NonBlockingLockExclusive).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "p.toml"])
        .current_dir(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(!out.join("data").exists(), "the claimed stage must not run");
    // `clean` refuses a claimed stage too.
    let o = pipeline(dir.path(), &["clean", "p.toml"]);
    assert!(o.status.success(), "nothing to clean yet: {}", stderr(&o));
    // The holder ends without completing the stage: the waiting run takes it over.
    drop(f);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("data: being run by another process (PID 4242 on elsewhere"),
        "{}",
        stderr(&o)
    );
    assert_eq!(ran(&o), ["data"]);
    assert!(out.join("data/stage.json").exists());
}

/// `clean` leaves a stage that another process is running.
#[test]
fn clean_refuses_a_stage_another_process_runs() {
    use rustix::fs::{flock, FlockOperation};
    let dir = scratch();
    write(
        dir.path(),
        "p.toml",
        "[run]\noutput = \"out\"\n[[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 20\ntest_size = 10\nimage_size = 8\n",
    );
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    let f = std::fs::File::open(out.join(".locks/data.lock")).unwrap();
    flock(&f, FlockOperation::NonBlockingLockExclusive).unwrap();
    let o = pipeline(dir.path(), &["clean", "p.toml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("stage `data` is being run by another process"),
        "{}",
        stderr(&o)
    );
    assert!(out.join("data/stage.json").exists());
    drop(f);
    let o = pipeline(dir.path(), &["clean", "p.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!out.join("data").exists());
}

/// `status` of the [`KILLED_EPOCHS`]-epoch training `model` (6 batches an epoch) killed with checkpoints in
/// `checkpoints`: how far it got, as its newest checkpoint's `state.json` says (read here as
/// plain JSON, its position checked against its global step and its log); and, while a
/// process holds its claim, running, by that process (as its claim file names it), as far.
fn assert_status_shows_progress(dir: &Path, checkpoints: &Path) {
    const EPOCHS: u64 = KILLED_EPOCHS as u64;
    let newest = newest_checkpoint(checkpoints).unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(newest.join("state.json")).unwrap()).unwrap();
    let (epoch, batch) = (
        state["epoch"].as_u64().unwrap(),
        state["batch"].as_u64().unwrap(),
    );
    assert!(batch < 6 && epoch < EPOCHS, "{state}");
    assert_eq!(state["step"].as_u64(), Some(epoch * 6 + batch), "{state}");
    let log = state["log"].as_array().unwrap();
    assert_eq!(log.len() as u64, epoch, "{state}");
    let mut done = format!("{epoch} of {EPOCHS} epochs done");
    if let Some(row) = log.last() {
        assert_eq!(row["epoch"].as_u64(), Some(epoch));
        done += &format!(
            " (epoch {}: loss {:.4}, accuracy {:.1}%)",
            row["epoch"],
            row["loss"].as_f64().unwrap(),
            100.0 * row["accuracy"].as_f64().unwrap()
        );
    }
    if batch > 0 {
        done += &format!(", {batch} batches into epoch {}", epoch + 1);
    }
    // The time left at the mean pace of the last five epochs (seconds here: tiny epochs).
    if !log.is_empty() {
        let recent = &log[log.len().saturating_sub(5)..];
        let pace = recent
            .iter()
            .map(|r| r["seconds"].as_f64().unwrap())
            .sum::<f64>()
            / recent.len() as f64;
        let left = pace * ((EPOCHS - epoch) as f64 - batch as f64 / 6.0);
        assert!(left < 90.0, "{left}");
        done += &format!(", about {left:.0} s of training left");
    }
    let st = stdout(&pipeline(dir, &["status", "p.toml"]));
    let interrupted = format!("incomplete: interrupted with {done}; the next run resumes it");
    assert!(st.contains(&interrupted), "{st}\nwanted: {interrupted}");

    // The claim file as a run holding it writes it.
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("out/.locks/model.lock"))
        .unwrap();
    lock.lock().unwrap();
    lock.set_len(0).unwrap();
    (&lock)
        .write_all(b"host=node7 pid=4242 started=2026-12-07T00:00:00Z\n")
        .unwrap();
    let st = stdout(&pipeline(dir, &["status", "p.toml"]));
    let running = format!("running (PID 4242 on node7, since 2026-12-07T00:00:00Z): {done}");
    assert!(st.contains(&running), "{st}\nwanted: {running}");
    drop(lock);
    let st = stdout(&pipeline(dir, &["status", "p.toml"]));
    assert!(st.contains(&interrupted), "{st}");
}

/// A finished training whose `epochs` change is stale; its rerun, killed after a checkpoint,
/// leaves it stale, and `status` says so with how far the rerun got (it resumes from there).
#[test]
fn an_interrupted_rerun_of_a_stale_stage_shows_its_progress() {
    let dir = scratch();
    let cfg = |epochs: usize| {
        format!(
            "[run]\noutput = \"out\"\nseed = 5\n\n\
             [[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 96\ntest_size = 16\nclasses = 3\nimage_size = 12\n\n\
             [[stage]]\nname = \"model\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\nwidth = 4\nmethod = \"vanilla\"\nepochs = {epochs}\nbatch_size = 16\n"
        )
    };
    write(dir.path(), "p.toml", &cfg(1));
    let first = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(first.status.success(), "{}", stderr(&first));
    write(dir.path(), "p.toml", &cfg(400));
    let mut child = run_until_checkpoint(dir.path(), "p.toml", "model");
    child.kill().unwrap();
    child.wait().unwrap();
    let st = stdout(&pipeline(dir.path(), &["status", "p.toml"]));
    let line = st.lines().find(|l| l.starts_with("model ")).unwrap();
    assert!(
        line.contains("stale: parameters changed (`epochs`); its rerun was interrupted with ")
            && line.contains(" of 400 epochs done (epoch ")
            && line.ends_with("; the next run resumes it"),
        "{st}"
    );
}

/// Epochs of the training the kill tests kill: long enough (about 15 ms each here) that a kill
/// within the first half of an uninterrupted run's time comes before the end.
const KILLED_EPOCHS: usize = 40;

/// A training killed with SIGKILL at a random moment (mid-epoch checkpoints every 2 steps) resumes
/// from its newest complete checkpoint, and ends with weights bitwise equal to an uninterrupted
/// run's, and the same per-epoch log (timings aside).
#[test]
fn a_killed_training_resumes_and_matches_an_uninterrupted_run() {
    let dir = scratch();
    let cfg = &format!(
        "[run]\noutput = \"out\"\nseed = 5\n\n\
        [[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 96\ntest_size = 16\nclasses = 3\nimage_size = 12\n\n\
        [[stage]]\nname = \"model\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\nwidth = 4\nmethod = \"vanilla\"\nepochs = {KILLED_EPOCHS}\nbatch_size = 16\n\
        checkpoint_every = 2\nkeep_checkpoints = 2\ndropout = 0.2\nmix = {{ type = \"cutmix\", p = 0.5 }}\n"
    );
    write(dir.path(), "p.toml", cfg);
    let started = std::time::Instant::now();
    let reference = pipeline(dir.path(), &["run", "p.toml", "--output", "reference"]);
    assert!(reference.status.success(), "{}", stderr(&reference));
    // The kill must come before the run ends: within the first half of the reference's time.
    let window = (started.elapsed() / 2).min(std::time::Duration::from_millis(400));

    let mut child = run_until_checkpoint(dir.path(), "p.toml", "model");
    let checkpoints = dir.path().join("out/.model.partial/checkpoints");
    // A random moment after the first checkpoint: mid-step, mid-write or between steps.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let delay =
        std::time::Duration::from_micros(u64::from(nanos) % window.as_micros().max(1) as u64);
    eprintln!("killing {delay:?} after the first checkpoint");
    std::thread::sleep(delay);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let out = dir.path().join("out");
    assert!(
        !out.join("model").exists(),
        "the killed stage must not have a final output"
    );
    assert_status_shows_progress(dir.path(), &checkpoints);

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

/// SIGUSR2 (Slurm's warning before a time limit or preemption) and SIGTERM make a training
/// checkpoint at its next step and the run exit with status 75, its partial folder kept; each
/// next run resumes from that checkpoint, and the last ends with weights bitwise equal to an
/// uninterrupted run's.
#[test]
fn a_signal_checkpoints_the_training_and_the_next_run_resumes_from_it() {
    use rustix::process::{kill_process, Pid, Signal};
    let dir = scratch();
    let cfg = "[run]\noutput = \"out\"\nseed = 5\n\n\
        [[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 96\ntest_size = 16\nclasses = 3\nimage_size = 12\n\n\
        [[stage]]\nname = \"model\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\nwidth = 4\nmethod = \"vanilla\"\nepochs = 40\nbatch_size = 16\n\
        keep_checkpoints = 2\nmix = { type = \"cutmix\", p = 0.5 }\n";
    write(dir.path(), "p.toml", cfg);
    let reference = pipeline(dir.path(), &["run", "p.toml", "--output", "reference"]);
    assert!(reference.status.success(), "{}", stderr(&reference));
    let checkpoints = dir.path().join("out/.model.partial/checkpoints");
    let mut resumed_from = Vec::new();
    for signal in [Signal::USR2, Signal::TERM] {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
            .args(["run", "p.toml"])
            .current_dir(dir.path())
            .env("RAYON_NUM_THREADS", "2")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for a checkpoint newer than the one this run resumed from (so that the run is
        // past its start, signal handlers installed, and training).
        let newest = || {
            std::fs::read_dir(&checkpoints)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("step-"))
                .max()
        };
        let before = newest();
        let t0 = std::time::Instant::now();
        while newest() <= before {
            assert!(
                t0.elapsed().as_secs() < 120,
                "no newer checkpoint than {before:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        kill_process(Pid::from_child(&child), signal).unwrap();
        if signal == Signal::TERM {
            // Again at once, as when a scheduler signals every process of a job and a `--jobs`
            // parent passes its own on: one stop, not a second signal that ends the process.
            std::thread::sleep(std::time::Duration::from_millis(2));
            kill_process(Pid::from_child(&child), signal).unwrap();
        }
        let o = child.wait_with_output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(75), "{signal:?}: {err}");
        assert!(err.contains("stopped on request after"), "{err}");
        assert!(
            checkpoints.exists(),
            "the partial folder keeps its checkpoints"
        );
        let step: u64 = err
            .split("(step ")
            .nth(1)
            .or_else(|| err.split("at step ").nth(1))
            .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no step in: {err}"));
        resumed_from.push(step);
    }
    let last = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(last.status.success(), "{}", stderr(&last));
    let err = stderr(&last);
    assert!(
        err.contains(&format!(
            "resuming from the checkpoint of step {}",
            resumed_from[1]
        )),
        "{err}"
    );
    assert!(resumed_from[0] < resumed_from[1], "{resumed_from:?}");
    let weights =
        |root: &str| std::fs::read(dir.path().join(root).join("model/model.safetensors")).unwrap();
    assert!(
        weights("out") == weights("reference"),
        "resumed weights differ"
    );
}

/// A second stop signal ends the process at once, with 128 + the signal, its partial folder
/// kept: here SIGINT and SIGUSR2, pending together (which one the handlers see first is the
/// kernel's choice; the status names the second).
/// (A SIGTERM within two seconds of the first stop is the same stop:
/// `a_signal_checkpoints_the_training_and_the_next_run_resumes_from_it`; after, a second one:
/// the unit test of `ends_at_once`.)
#[test]
fn a_second_signal_ends_the_run_at_once() {
    use rustix::process::{kill_process, Pid, Signal};
    let dir = scratch();
    let cfg = "[run]\noutput = \"out\"\nseed = 5\n\n\
        [[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 96\ntest_size = 16\nclasses = 3\nimage_size = 12\n\n\
        [[stage]]\nname = \"model\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\nwidth = 4\nmethod = \"vanilla\"\nepochs = 400\nbatch_size = 16\n";
    write(dir.path(), "p.toml", cfg);
    let partial = dir.path().join("out/.model.partial");
    // Both signals arrive while the process is stopped (SIGSTOP), so that it has no step
    // boundary to stop at before the second one.
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "p.toml"])
        .current_dir(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !partial.join("checkpoints").exists() {
        assert!(t0.elapsed().as_secs() < 120, "the training never started");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let pid = Pid::from_child(&child);
    kill_process(pid, Signal::STOP).unwrap();
    kill_process(pid, Signal::INT).unwrap();
    kill_process(pid, Signal::USR2).unwrap();
    kill_process(pid, Signal::CONT).unwrap();
    let o = child.wait_with_output().unwrap();
    let code = o.status.code();
    assert!(
        code == Some(128 + 2) || code == Some(128 + 12),
        "{code:?}: {}",
        stderr(&o)
    );
    assert!(partial.exists(), "the partial folder was removed");
}

/// `--only`, `--force` and `clean` take a grid's name for all its cells; a name the file does not
/// have is a usage error (status 2) that lists what it has.
#[test]
fn command_lines_name_grids_for_their_cells() {
    let dir = scratch();
    let cfg = "[run]\noutput = \"out\"\n\n\
        [[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 64\ntest_size = 32\nclasses = 3\nimage_size = 12\n\n\
        [[stage]]\nname = \"s\"\nkind = \"train\"\nneeds = [\"data\"]\nmatrix = { seed = [0, 1] }\nmodel = \"resnet8\"\nwidth = 4\nmethod = \"vanilla\"\nepochs = 1\nbatch_size = 32\n";
    write(dir.path(), "g.toml", cfg);
    let dry = pipeline(dir.path(), &["run", "g.toml", "--force", "s", "--dry-run"]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert_eq!(
        stdout(&dry).lines().last(),
        Some("would run 3 stages: 1 prepare, 2 train"),
        "{}",
        stdout(&dry)
    );
    for args in [
        &["run", "g.toml", "--only", "t"][..],
        &["run", "g.toml", "--force", "s.seed=2"],
        &["clean", "g.toml", "t"],
    ] {
        let o = pipeline(dir.path(), args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("(stages: data; grids: s)"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    for cell in ["s.seed=0", "s.seed=1", "data"] {
        std::fs::create_dir_all(dir.path().join("out").join(cell)).unwrap();
    }
    let o = pipeline(dir.path(), &["clean", "g.toml", "s"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    assert!(!out.join("s.seed=0").exists() && !out.join("s.seed=1").exists());
    assert!(out.join("data").exists());
}
