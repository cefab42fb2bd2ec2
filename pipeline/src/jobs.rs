//! `pipeline run FILE --jobs N`: up to N ready stages at once, each in a child process
//! (`pipeline run FILE --only STAGE`), in dependency order.
//!
//! A stage is ready when every upstream stage of this run is settled. Up-to-date stages are
//! skipped here, without a child. Each child gets a slot: with `--devices 0,1 --per-device 2`
//! the slots are the devices, each twice, and a child sees only its device
//! (`CUDA_VISIBLE_DEVICES`); its CPU threads are `[run].threads` when set, else the cores
//! divided among the N slots. A child's stderr goes to `<output>/.logs/<stage>.log` (and, when
//! the child ran the stage, into the stage's folder as `stage.log`) while its last line shows on
//! the stage's progress line. A child that found its stage completed by another process exits
//! with [`EXIT_DONE_ELSEWHERE`] and its log stays in `.logs`.
//!
//! Children claim their stages like any `pipeline` process (see `claim`), so several `--jobs`
//! runs, or plain runs, can share one output root. When a stage fails, the running ones finish
//! and no new one starts (unless `--keep-going`); the summary names the failed stages and their
//! logs. A stop request (Ctrl-C, SIGTERM, SIGUSR2) is passed to every child once: trainings
//! checkpoint and every child exits, leaving resumable partial folders. Children run in their
//! own process groups (a terminal's Ctrl-C reaches only this process, which forwards it once)
//! and receive SIGTERM if this process dies.

use crate::config::Config;
use crate::runner::{
    fingerprints, seen_at_start, state_of, RunOptions, RunSummary, Seen, StageState, FORCE_SEEN_ENV,
};
use anyhow::{bail, Context as _, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Exit status of a child stopped on request (see `main.rs`).
pub const EXIT_INTERRUPTED: i32 = 75;

/// Exit status of a child that found its stage completed by another process (or, forced, re-run
/// by one since the parent started) and ran nothing: the parent counts it as done elsewhere and
/// leaves the stage's own `stage.log` alone. Only children exit with it (a plain `run` exits 0).
pub const EXIT_DONE_ELSEWHERE: i32 = 3;

/// How `--jobs` runs its children.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Stages at once.
    pub jobs: usize,
    /// CUDA devices to hand out, one per child (empty: none).
    pub devices: Vec<usize>,
    /// Children per device.
    pub per_device: usize,
    /// Start new stages after a failure (those not downstream of it).
    pub keep_going: bool,
    /// CPU threads per child (`[run].threads` when set, else the cores / jobs).
    pub threads: usize,
}

/// A stage that failed in a child.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The stage.
    pub stage: String,
    /// Its exit status.
    pub status: Option<i32>,
    /// Its full log.
    pub log: PathBuf,
}

/// What a `--jobs` run did.
#[derive(Debug, Default)]
pub struct JobsSummary {
    /// Run, skipped, completed elsewhere.
    pub run: RunSummary,
    /// The stages that failed.
    pub failed: Vec<Failure>,
    /// Whether it stopped on request.
    pub interrupted: bool,
}

/// A running child.
struct Running {
    stage: usize,
    slot: usize,
    child: Child,
    started: Instant,
    log: PathBuf,
    bar: indicatif::ProgressBar,
}

/// The slots children run in: `None` for CPU slots, else the device.
pub fn slots(jobs: &JobOptions) -> Vec<Option<usize>> {
    if jobs.devices.is_empty() {
        return vec![None; jobs.jobs];
    }
    let all: Vec<Option<usize>> = jobs
        .devices
        .iter()
        .flat_map(|&d| std::iter::repeat_n(Some(d), jobs.per_device))
        .collect();
    all.into_iter().take(jobs.jobs).collect()
}

/// Runs the stages of `config` with up to `jobs.jobs` children at once.
pub fn run(
    config: &Config,
    opts: &RunOptions,
    jobs: &JobOptions,
    progress: Option<indicatif::MultiProgress>,
) -> Result<JobsSummary> {
    let root = &config.run.output;
    std::fs::create_dir_all(root.join(".logs"))
        .with_context(|| format!("cannot create {}", root.join(".logs").display()))?;
    crate::claim::check_root(root);
    let fps = fingerprints(config);
    let seen = seen_at_start(config, opts);
    let slots = slots(jobs);
    let mut free: Vec<usize> = (0..slots.len()).rev().collect();
    let todo: Vec<usize> = config
        .order()
        .into_iter()
        .filter(|&i| opts.only.is_empty() || opts.only.contains(&config.stages[i].name))
        .collect();
    let mut settled = vec![false; config.stages.len()];
    let mut blocked = vec![false; config.stages.len()];
    let mut running: Vec<Running> = Vec::new();
    let mut out = JobsSummary::default();
    let (lines_tx, lines_rx) = mpsc::channel::<(usize, String)>();
    let mut forwarded = false;
    loop {
        let stopping = opts.stop.load(Ordering::Relaxed);
        if stopping && !forwarded {
            for r in &running {
                let _ = terminate(&r.child);
            }
            forwarded = true;
        }
        let failed_stop = !out.failed.is_empty() && !jobs.keep_going;
        if !stopping && !failed_stop {
            for &i in &todo {
                if free.is_empty() {
                    break;
                }
                if settled[i] || blocked[i] || running.iter().any(|r| r.stage == i) {
                    continue;
                }
                match can_start(config, &todo, &settled, &blocked, i) {
                    None => {
                        blocked[i] = true;
                        continue;
                    }
                    Some(false) => continue,
                    Some(true) => {}
                }
                let s = &config.stages[i];
                let forced = seen[i].as_ref().filter(|v| v.still_forced(config, &s.name));
                if state_of(config, &fps, i) == StageState::UpToDate && forced.is_none() {
                    tracing::info!("{} ({}): up to date, skipped", s.name, s.params.kind());
                    out.run.skipped.push(s.name.clone());
                    settled[i] = true;
                    continue;
                }
                let slot = free.pop().expect("a free slot");
                running.push(spawn(
                    config,
                    opts,
                    jobs,
                    i,
                    slot,
                    slots[slot],
                    forced,
                    &progress,
                    &lines_tx,
                )?);
            }
        }
        if running.is_empty() {
            // Stopped on request with stages left to run: the run is interrupted, even when the
            // children that were running (evaluations, reports) finished first.
            if stopping && todo.iter().any(|&i| !settled[i]) {
                out.interrupted = true;
            }
            break;
        }
        // Show the children's latest lines; then reap those that ended.
        while let Ok((stage, line)) = lines_rx.try_recv() {
            if let Some(r) = running.iter().find(|r| r.stage == stage) {
                r.bar.set_message(line);
            }
        }
        reap(
            config,
            &mut running,
            &mut free,
            forwarded,
            &mut settled,
            &mut blocked,
            &mut out,
        )?;
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(out)
}

/// Settles the children that have ended and frees their slots.
fn reap(
    config: &Config,
    running: &mut Vec<Running>,
    free: &mut Vec<usize>,
    forwarded: bool,
    settled: &mut [bool],
    blocked: &mut [bool],
    out: &mut JobsSummary,
) -> Result<()> {
    let mut k = 0;
    while k < running.len() {
        let Some(status) = running[k].child.try_wait()? else {
            k += 1;
            continue;
        };
        let r = running.swap_remove(k);
        free.push(r.slot);
        let mut code = status.code();
        // A child ended by a stop signal after this process passed one on (it came before
        // the child's handlers were in place, or twice within their grace) left its partial
        // folder as a kill does: interrupted, not failed.
        let signalled = std::os::unix::process::ExitStatusExt::signal(&status);
        let stop_signal = |sig: i32| STOP_SIGNALS.contains(&sig);
        let by_stop = signalled.is_some_and(stop_signal)
            || code.is_some_and(|c| c > 128 && stop_signal(c - 128));
        if forwarded && by_stop {
            code = Some(EXIT_INTERRUPTED);
        }
        settle(config, r, code, settled, blocked, out);
    }
    Ok(())
}

/// Whether stage `i` can start: its upstream stages of this run are all settled
/// (`Some(true)`), not yet (`Some(false)`), or one failed or stopped (`None`: it never will).
fn can_start(
    config: &Config,
    todo: &[usize],
    settled: &[bool],
    blocked: &[bool],
    i: usize,
) -> Option<bool> {
    let mut ready = true;
    for n in &config.stages[i].needs {
        let j = config.index_of(n);
        if !todo.contains(&j) {
            continue;
        }
        if blocked[j] {
            return None;
        }
        ready &= settled[j];
    }
    Some(ready)
}

/// Records how a child ended.
fn settle(
    config: &Config,
    r: Running,
    code: Option<i32>,
    settled: &mut [bool],
    blocked: &mut [bool],
    out: &mut JobsSummary,
) {
    let name = &config.stages[r.stage].name;
    r.bar.finish_and_clear();
    let secs = r.started.elapsed().as_secs_f64();
    let final_log = config.run.output.join(name).join("stage.log");
    match code {
        Some(0) => {
            tracing::info!("{name}: done in {secs:.1}s (slot {})", r.slot);
            // The stage's folder exists once it completed: its log joins it.
            if final_log.parent().is_some_and(Path::exists) {
                let _ = std::fs::rename(&r.log, &final_log);
            }
            out.run.ran.push(name.clone());
            settled[r.stage] = true;
        }
        Some(EXIT_DONE_ELSEWHERE) => {
            tracing::info!("{name}: completed by another process; its child ran nothing");
            out.run.elsewhere.push(name.clone());
            settled[r.stage] = true;
        }
        Some(EXIT_INTERRUPTED) => {
            tracing::info!("{name}: stopped on request after {secs:.1}s; the next run resumes it");
            out.interrupted = true;
            blocked[r.stage] = true;
        }
        other => {
            tracing::error!(
                "{name}: failed after {secs:.1}s ({}); log: {}",
                other.map_or("killed by a signal".to_string(), |c| format!(
                    "exit status {c}"
                )),
                r.log.display()
            );
            out.failed.push(Failure {
                stage: name.clone(),
                status: other,
                log: r.log.clone(),
            });
            blocked[r.stage] = true;
        }
    }
}

/// The signals that stop a run at its next step boundary: SIGTERM, SIGUSR2 (Slurm's warning
/// before a time limit or preemption; USR1 is NCCL's) and SIGINT.
pub const STOP_SIGNALS: [i32; 3] = [
    signal_hook::consts::SIGTERM,
    signal_hook::consts::SIGUSR2,
    signal_hook::consts::SIGINT,
];

/// Starts the child of stage `i` in `slot`.
#[allow(clippy::too_many_arguments)]
fn spawn(
    config: &Config,
    opts: &RunOptions,
    jobs: &JobOptions,
    i: usize,
    slot: usize,
    device: Option<usize>,
    forced: Option<&Seen>,
    progress: &Option<indicatif::MultiProgress>,
    lines: &mpsc::Sender<(usize, String)>,
) -> Result<Running> {
    use std::os::unix::process::CommandExt;
    let s = &config.stages[i];
    let root = &config.run.output;
    let log = std::path::absolute(root.join(".logs").join(format!("{}.log", s.name)))?;
    let exe = std::env::current_exe().context("cannot find this program's executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .arg(&config.path)
        .arg("--output")
        .arg(root)
        .args(["--only", &s.name])
        .args(["--threads", &jobs.threads.to_string()])
        .env("RAYON_NUM_THREADS", jobs.threads.to_string())
        .env(CHILD_ENV, std::process::id().to_string())
        // Only this process requeues its Slurm job, once, after its children stopped.
        .env_remove(crate::slurm::REQUEUE_ENV)
        .env_remove(FORCE_SEEN_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(seen) = forced {
        // The child judges whether another process re-ran the stage from this process's start.
        cmd.args(["--force", &s.name]).env(
            FORCE_SEEN_ENV,
            serde_json::json!({ s.name.as_str(): seen }).to_string(),
        );
    }
    if let Some(digests) = config.source_digests() {
        cmd.env(crate::config::SOURCE_DIGESTS_ENV, digests);
    }
    if opts.dry_run {
        bail!("--dry-run does not start children");
    }
    if let Some(d) = device {
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        cmd.env("CUDA_VISIBLE_DEVICES", child_device(visible.as_deref(), d));
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start the child of stage `{}`", s.name))?;
    let stderr = child.stderr.take().expect("piped");
    // Appended to: the log of a stage resumed after a stop or a failure keeps its earlier runs.
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let tx = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(file, "{line}");
            let _ = tx.send((i, line));
        }
        let _ = file.sync_all();
    });
    let bar = match progress {
        Some(m) => m.add(indicatif::ProgressBar::new_spinner()),
        None => indicatif::ProgressBar::hidden(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>24.cyan.bold} {spinner} {elapsed:>4} {wide_msg}",
        )
        .expect("valid template"),
    );
    bar.set_prefix(s.name.clone());
    bar.enable_steady_tick(Duration::from_millis(200));
    tracing::info!(
        "{}: started (slot {slot}{}, {} threads); log: {}",
        s.name,
        device.map_or(String::new(), |d| format!(", CUDA device {d}")),
        jobs.threads,
        log.display()
    );
    Ok(Running {
        stage: i,
        slot,
        child,
        started: Instant::now(),
        log,
        bar,
    })
}

/// Set in a child's environment to its parent's PID: the child asks the kernel for SIGTERM when
/// the parent dies (see [`follow_parent`]).
pub const CHILD_ENV: &str = "LDL_JOBS_PARENT";

/// In a child of `--jobs`: receive SIGTERM when the parent dies, so a killed parent does not
/// leave its children running on (they checkpoint and stop, as on any stop request).
pub fn follow_parent() {
    let Some(parent) = std::env::var(CHILD_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return;
    };
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM));
    // The parent may have died before the call: then nobody would send the signal.
    if rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) != Some(parent) {
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::TERM);
    }
}

/// Asks a child to stop (it checkpoints and exits).
fn terminate(child: &Child) -> Result<()> {
    let pid = rustix::process::Pid::from_child(child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
    Ok(())
}

/// The `CUDA_VISIBLE_DEVICES` of a child given device `d`, as this process numbers its devices:
/// the `d`-th entry of this process's own `CUDA_VISIBLE_DEVICES` (an index, a `GPU-…` or
/// `MIG-…` UUID) when it has one, so that a child never runs on a device this process was not
/// given (a Slurm job's GPUs), else `d`.
fn child_device(visible: Option<&str>, d: usize) -> String {
    let listed: Vec<&str> = visible
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .collect()
        })
        .unwrap_or_default();
    match listed.get(d) {
        Some(entry) => entry.to_string(),
        None if listed.is_empty() => d.to_string(),
        // Beyond the list: check_devices refused it already; CUDA then sees no device.
        None => "-1".into(),
    }
}

/// Every CUDA device in `devices` must exist, as this process numbers them (a CPU-only build
/// has none).
pub fn check_devices(devices: &[usize]) -> Result<()> {
    if devices.is_empty() {
        return Ok(());
    }
    if !candle_core::utils::cuda_is_available() {
        bail!(
            "--devices {}: this build of the program runs on the CPU only (build it with scripts/build-cuda.sh)",
            list(devices)
        );
    }
    for &d in devices {
        if candle_core::Device::new_cuda(d).is_err() {
            bail!(
                "--devices {}: there is no CUDA device {d} on this machine",
                list(devices)
            );
        }
    }
    Ok(())
}

fn list(devices: &[usize]) -> String {
    devices
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child's device is this process's `d`-th visible one: `--devices 0,1` under
    /// `CUDA_VISIBLE_DEVICES=2,3` runs on physical devices 2 and 3 (or the UUIDs listed).
    #[test]
    fn children_get_the_devices_this_process_was_given() {
        assert_eq!(child_device(None, 1), "1");
        assert_eq!(child_device(Some(""), 1), "1");
        assert_eq!(child_device(Some("2,3"), 0), "2");
        assert_eq!(child_device(Some("2, 3"), 1), "3");
        assert_eq!(child_device(Some("GPU-a1,MIG-b2"), 1), "MIG-b2");
        assert_eq!(child_device(Some("2,3"), 2), "-1");
    }
}
