//! `pipeline submit FILE --slurm`: the stages that are not up to date as Slurm jobs, a grid as
//! one job array, chained by the dependencies of the DAG.
//!
//! A grid's cells are the tasks of one array (task id = the cell's position in its grid, so
//! that two grids that follow each other cell by cell have corresponding task ids); a grid
//! that follows another cell by cell depends on it with `aftercorr` (task i starts once task i
//! of the other succeeded), any other need with `afterok` on the whole upstream job. Arrays
//! longer than the cluster's `MaxArraySize` are cut into chunks, each with task ids from 0 and
//! its own task → stage table in its script; with a `throttle`, each chunk waits (`afterany`)
//! for the one before to end, so that the throttle holds for the grid. Each task `exec`s `pipeline run FILE --only
//! STAGE`, so the binary itself receives Slurm's signals: jobs are submitted with `--requeue` and
//! `--signal=B:USR2@<lead>`; on USR2 a training checkpoints, and the process requeues its own
//! job (`scontrol requeue`) before exiting with status 75, so the requeued task resumes from that
//! checkpoint. SIGTERM (`scancel`, a preemption) checkpoints too but does not requeue: a
//! cancelled job stays cancelled, and Slurm requeues a preempted one itself.
//!
//! Scripts and Slurm's logs go to `<output>/.slurm/`; `jobs.json` there records
//! which job runs which stage, for `pipeline status` (which asks `squeue`; `sacct` needs
//! accounting, which many clusters lack) and for resubmitting: a stage that is queued or
//! running is not submitted again.

use crate::config::{Config, SlurmResources, DEFAULT_SIGNAL_LEAD, SOURCE_DIGESTS_ENV};
use crate::runner::{fingerprints, state_of, StageState};
use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Options of `pipeline submit`.
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    /// Print the scripts, submit nothing.
    pub dry_run: bool,
    /// Resources given on the command line, over those of `[slurm]`.
    pub overrides: SlurmResources,
}

/// One job to submit: a plain stage, or (a chunk of) a grid.
#[derive(Debug, Clone)]
struct Job {
    /// `ldl-<stage or grid>`, with `-<chunk>` for chunks after the first.
    name: String,
    /// (task id, stage index) of each task; one task of id 0 for a plain stage.
    tasks: Vec<(usize, usize)>,
    /// Whether it is an array.
    array: bool,
    /// The grid, or the stage, whose resources apply.
    key: String,
}

/// `jobs.json`: the job (`<job id>` or `<array job id>_<task id>`) of each submitted stage.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Submitted {
    /// Stage name → job id.
    pub stages: BTreeMap<String, String>,
}

fn slurm_dir(config: &Config) -> PathBuf {
    config.run.output.join(".slurm")
}

/// Reads `jobs.json` (empty when nothing was submitted).
pub fn submitted(config: &Config) -> Submitted {
    std::fs::read(slurm_dir(config).join("jobs.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The pending reason of a job whose dependency failed: it will never start (Slurm keeps it
/// queued unless `kill_on_invalid_dep` is set).
const DEAD_DEPENDENCY: &str = "DependencyNeverSatisfied";

/// Whether a job in `state` (from [`queue_states`]) can still run.
pub fn can_still_run(state: &str) -> bool {
    !state.contains(DEAD_DEPENDENCY)
}

/// The Slurm state of every job `squeue` knows among `ids` (arrays expanded: `123_4`), with the
/// reason of one that waits on a failed dependency: `PENDING (DependencyNeverSatisfied)`.
pub fn queue_states(ids: &[&str]) -> Result<BTreeMap<String, String>> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let jobs: std::collections::BTreeSet<&str> = ids
        .iter()
        .map(|i| i.split('_').next().unwrap_or(i))
        .collect();
    // This user's jobs, filtered here: `--jobs` fails as a whole on an id the controller has
    // forgotten (finished long ago), which cannot be told from a controller that does not
    // answer; taking that for "nothing queued" would submit every queued stage twice.
    let o = Command::new("squeue")
        .args(["-h", "-r", "-o", "%i %T %r", "--me"])
        .output()
        .context("cannot run squeue (is Slurm's client on PATH?)")?;
    if !o.status.success() {
        bail!(
            "squeue failed ({}): {}; nothing was submitted, as the jobs already queued are \
             unknown",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&o.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let (id, state) = (words.next()?, words.next()?);
            if !jobs.contains(id.split('_').next().unwrap_or(id)) {
                return None;
            }
            Some(match words.next() {
                Some(DEAD_DEPENDENCY) => (id.into(), format!("{state} ({DEAD_DEPENDENCY})")),
                _ => (id.into(), state.into()),
            })
        })
        .collect())
}

/// Whether `program` is an executable on PATH.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| {
            let p = d.join(program);
            p.metadata().is_ok_and(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
        })
    })
}

/// The cluster's `MaxArraySize` (`scontrol show config`; 1001, Slurm's default, if unknown).
fn max_array_size() -> usize {
    Command::new("scontrol")
        .args(["show", "config"])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == "MaxArraySize").then(|| v.trim().parse().ok())?
            })
        })
        .unwrap_or(1001)
}

/// Submits (or with `dry_run` prints) the jobs of every stage that is not up to date and not
/// already queued; returns the stage → job map of this submission.
pub fn submit(config: &Config, opts: &SubmitOptions) -> Result<BTreeMap<String, String>> {
    for tool in ["sbatch", "squeue", "scontrol"] {
        if !opts.dry_run && !on_path(tool) {
            bail!("pipeline submit --slurm needs Slurm's `{tool}` on PATH; nothing was submitted");
        }
    }
    let previous = submitted(config);
    let queued = earlier_jobs(&previous, opts.dry_run)?;
    // Stage → job id of stages queued or running from an earlier submission.
    let mut job_of: BTreeMap<String, String> = previous
        .stages
        .iter()
        .filter(|(_, id)| queued.get(*id).is_some_and(|st| can_still_run(st)))
        .map(|(s, id)| (s.clone(), id.clone()))
        .collect();
    let todo = stages_to_submit(config, &mut job_of, &queued, opts.dry_run);
    let jobs = in_dependency_order(config, plan(config, &todo, max_array_size()))?;
    let target = Target {
        exe: std::path::absolute(std::env::current_exe()?)?,
        file: std::path::absolute(&config.path)?,
        root: std::path::absolute(&config.run.output)?,
    };
    let dir = target.root.join(".slurm");
    if !opts.dry_run {
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Every job's time limit is checked before the first is submitted: a refusal half way would
    // leave some submitted.
    for job in &jobs {
        check_time_limit(job, &resources(config, opts, job))?;
    }
    let mut new = BTreeMap::new();
    // The last chunk submitted of each throttled grid: the next waits for it to end, so that
    // the grid, not each chunk, runs at most `throttle` tasks at once; the first waits for the
    // grid's arrays still queued from an earlier submission.
    let mut last_chunk = queued_arrays(config, &job_of);
    for job in &jobs {
        let throttled = job.array && resources(config, opts, job).throttle.is_some();
        let after = last_chunk.get(job.key.as_str()).filter(|_| throttled);
        let dependency = match (dependency(config, job, &job_of), after) {
            (d, Some(prev)) => Some(
                d.into_iter()
                    .chain([format!("afterany:{prev}")])
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (d, None) => d,
        };
        let script = script(config, opts, job, &target, &dir)?;
        let id = submit_one(job, &script, &dir, dependency.as_deref(), opts.dry_run)?;
        if throttled {
            last_chunk.insert(&job.key, id.clone());
        }
        for &(task, i) in &job.tasks {
            let name = &config.stages[i].name;
            let sid = if job.array {
                format!("{id}_{task}")
            } else {
                id.clone()
            };
            job_of.insert(name.clone(), sid.clone());
            new.insert(name.clone(), sid);
        }
        if !opts.dry_run {
            // Recorded after every job, so an error later leaves an accurate record.
            let mut all = submitted(config);
            all.stages
                .extend(new.iter().map(|(k, v)| (k.clone(), v.clone())));
            let json = serde_json::to_vec_pretty(&all)?;
            datasets::atomic::write_bytes(&dir.join("jobs.json"), &json)?;
        }
    }
    Ok(new)
}

/// Where the jobs run from: the `pipeline` binary, the stages file and the output root, as
/// absolute paths.
struct Target {
    exe: PathBuf,
    file: PathBuf,
    root: PathBuf,
}

/// The queue states of the jobs of earlier submissions still in the queue. Jobs waiting on a
/// dependency that failed never start: they are cancelled (their stages are submitted again).
/// A dry run asks the queue too (it only reads), so that it shows what a submission would do;
/// without `squeue` it says it could not.
fn earlier_jobs(previous: &Submitted, dry_run: bool) -> Result<BTreeMap<String, String>> {
    let ids: Vec<&str> = previous.stages.values().map(String::as_str).collect();
    let queued = if dry_run && !on_path("squeue") {
        if !ids.is_empty() {
            println!(
                "# squeue is not on PATH: the {} job(s) of earlier submissions were not looked \
                 up, so their stages are shown as if none were queued",
                ids.len()
            );
        }
        BTreeMap::new()
    } else {
        queue_states(&ids)?
    };
    let dead: Vec<&str> = queued
        .iter()
        .filter(|(_, st)| !can_still_run(st))
        .map(|(id, _)| id.as_str())
        .collect();
    if !dead.is_empty() {
        cancel(&dead, dry_run);
    }
    Ok(queued)
}

/// The stages to submit, in the config's order: those not up to date and not queued
/// (`job_of`). A queued stage still waiting on one submitted again (its job failed, or it went
/// stale) would wait on the old job for ever, or start before the new one: it is cancelled,
/// dropped from `job_of` and submitted again after it, and so is whatever waits on it in turn.
fn stages_to_submit(
    config: &Config,
    job_of: &mut BTreeMap<String, String>,
    queued: &BTreeMap<String, String>,
    dry_run: bool,
) -> Vec<usize> {
    let fps = fingerprints(config);
    let to_run = |job_of: &BTreeMap<String, String>| -> Vec<usize> {
        config
            .order()
            .into_iter()
            .filter(|&i| {
                let s = &config.stages[i];
                state_of(config, &fps, i) != StageState::UpToDate && !job_of.contains_key(&s.name)
            })
            .collect()
    };
    let todo = to_run(job_of);
    let waiting = waiting_on(config, &todo, job_of, queued);
    if waiting.is_empty() {
        return todo;
    }
    let ids: Vec<&str> = waiting.iter().map(String::as_str).collect();
    cancel(&ids, dry_run);
    to_run(job_of)
}

/// Writes `job`'s batch script into `dir` and submits it (a dry run prints it instead);
/// returns its job id (`<name>` for a dry run).
fn submit_one(
    job: &Job,
    script: &str,
    dir: &Path,
    dependency: Option<&str>,
    dry_run: bool,
) -> Result<String> {
    let path = dir.join(format!("{}.sbatch", job.name));
    if !dry_run {
        datasets::atomic::write_bytes(&path, script.as_bytes())?;
        return sbatch(&path, job, dependency);
    }
    println!(
        "# {}{}",
        path.display(),
        dependency.map_or(String::new(), |d| format!(" (--dependency={d})"))
    );
    println!("{script}");
    Ok(format!("<{}>", job.name))
}

/// For each grid with cells queued or running from an earlier submission (`job_of`), the
/// array jobs they are in (`afterany:` dependencies, colon-separated).
fn queued_arrays<'a>(
    config: &'a Config,
    job_of: &BTreeMap<String, String>,
) -> BTreeMap<&'a str, String> {
    let mut out = BTreeMap::new();
    for (grid, cells) in &config.grids {
        let mut bases: Vec<&str> = cells
            .iter()
            .filter_map(|c| job_of.get(c))
            .filter_map(|id| id.split_once('_').map(|(base, _)| base))
            .collect();
        bases.sort();
        bases.dedup();
        if !bases.is_empty() {
            out.insert(grid.as_str(), bases.join(":"));
        }
    }
    out
}

/// Cancels jobs `ids` (a dry run says it would); a failure only warns.
fn cancel(ids: &[&str], dry_run: bool) {
    if dry_run {
        println!("# would cancel job(s) {}", ids.join(" "));
        return;
    }
    let o = Command::new("scancel").args(ids).status();
    if !o.is_ok_and(|s| s.success()) {
        eprintln!("warning: scancel {} failed", ids.join(" "));
    }
}

/// The queued jobs of stages still pending that need, directly or through other such stages,
/// a stage of `todo` (to be submitted again): removed from `job_of`, their ids returned.
/// Running jobs are left alone (their needs were met; a stale output reruns them later).
fn waiting_on(
    config: &Config,
    todo: &[usize],
    job_of: &mut BTreeMap<String, String>,
    queued: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut again: std::collections::BTreeSet<&str> = todo
        .iter()
        .map(|&i| config.stages[i].name.as_str())
        .collect();
    let mut ids = Vec::new();
    loop {
        let next = config.stages.iter().find(|s| {
            job_of.get(&s.name).is_some_and(|id| {
                queued.get(id).is_some_and(|st| st.starts_with("PENDING"))
                    && s.needs.iter().any(|n| again.contains(n.as_str()))
            })
        });
        let Some(s) = next else {
            return ids;
        };
        ids.push(job_of.remove(&s.name).expect("found in job_of"));
        again.insert(&s.name);
    }
}

/// Submits the script at `path`; returns the job id.
fn sbatch(path: &Path, job: &Job, dependency: Option<&str>) -> Result<String> {
    let mut cmd = Command::new("sbatch");
    cmd.arg("--parsable");
    if let Some(d) = dependency {
        cmd.arg(format!("--dependency={d}"));
    }
    let o = cmd.arg(path).output().context("cannot run sbatch")?;
    if !o.status.success() {
        bail!(
            "sbatch refused {}: {}",
            path.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    // `--parsable` prints `<id>` or `<id>;<cluster>`.
    let id = String::from_utf8_lossy(&o.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap_or_default()
        .to_string();
    tracing::info!(
        "submitted {} as job {id}{} ({} stage(s))",
        job.name,
        dependency.map_or(String::new(), |d| format!(", after {d}")),
        job.tasks.len()
    );
    Ok(id)
}

/// The jobs of the stages `todo` (in dependency order): one array per grid, chunked to
/// `max_array` tasks, one job per plain stage.
fn plan(config: &Config, todo: &[usize], max_array: usize) -> Vec<Job> {
    let mut jobs: Vec<Job> = Vec::new();
    let mut done_grids: Vec<&str> = Vec::new();
    for &i in todo {
        let s = &config.stages[i];
        let Some(grid) = &s.grid else {
            jobs.push(Job {
                name: format!("ldl-{}", s.name),
                tasks: vec![(0, i)],
                array: false,
                key: s.name.clone(),
            });
            continue;
        };
        if done_grids.contains(&grid.as_str()) {
            continue;
        }
        done_grids.push(grid);
        let cells = &config
            .grids
            .iter()
            .find(|(g, _)| g == grid)
            .expect("a stage's grid is listed")
            .1;
        let mut tasks: Vec<(usize, usize)> = cells
            .iter()
            .enumerate()
            .filter_map(|(pos, c)| {
                let j = config.index_of(c);
                todo.contains(&j).then_some((pos, j))
            })
            .collect();
        tasks.sort();
        let max = max_array.max(1);
        let mut chunk = 0;
        while !tasks.is_empty() {
            let (lo, hi) = (chunk * max, (chunk + 1) * max);
            let (mine, rest): (Vec<_>, Vec<_>) = tasks.iter().partition(|(p, _)| *p < hi);
            if !mine.is_empty() {
                jobs.push(Job {
                    name: if chunk == 0 {
                        format!("ldl-{grid}")
                    } else {
                        format!("ldl-{grid}-{chunk}")
                    },
                    tasks: mine.iter().map(|&(p, j)| (p - lo, j)).collect(),
                    array: true,
                    key: grid.clone(),
                });
            }
            tasks = rest;
            chunk += 1;
        }
    }
    jobs
}

/// `jobs` reordered so that each comes after the jobs of the stages its tasks need: an array is
/// planned at its first cell, but a later cell may need a stage declared after that cell
/// (stages are declared in any order), whose job must exist before the array names it in its
/// dependency. The planned order is kept where the needs allow. Cells of one array needing a
/// stage that needs another of its cells cannot be one array: refused.
fn in_dependency_order(config: &Config, jobs: Vec<Job>) -> Result<Vec<Job>> {
    let owner: BTreeMap<usize, usize> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, job)| job.tasks.iter().map(move |&(_, i)| (i, j)))
        .collect();
    let needs: Vec<Vec<usize>> = jobs
        .iter()
        .enumerate()
        .map(|(j, job)| {
            job.tasks
                .iter()
                .flat_map(|&(_, i)| &config.stages[i].needs)
                .filter_map(|n| owner.get(&config.index_of(n)).copied())
                .filter(|&k| k != j)
                .collect()
        })
        .collect();
    let (order, stuck) = crate::config::stable_order(&needs);
    if !stuck.is_empty() {
        let stuck: Vec<&str> = stuck.iter().map(|&j| jobs[j].name.as_str()).collect();
        bail!(
            "jobs {} need each other (a grid's cells need a stage that needs another of \
             its cells): they cannot be submitted as arrays; run them with `pipeline run`",
            stuck.join(", ")
        );
    }
    Ok(crate::config::permuted(jobs, &order))
}

/// `--dependency` of `job`: `aftercorr` on an array it follows task by task, `afterok` on every
/// other job its stages need.
fn dependency(config: &Config, job: &Job, job_of: &BTreeMap<String, String>) -> Option<String> {
    let mut afterok: Vec<String> = Vec::new();
    let mut aftercorr: Vec<String> = Vec::new();
    // The upstream jobs, as `<array>` for arrays: (job id, tasks of this job needing it).
    let mut upstream: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    for &(task, i) in &job.tasks {
        for n in &config.stages[i].needs {
            if let Some(id) = job_of.get(n) {
                let (base, t) = id.split_once('_').map_or((id.clone(), None), |(b, t)| {
                    (b.to_string(), Some(t.to_string()))
                });
                upstream
                    .entry(base)
                    .or_default()
                    .push((task, t.unwrap_or_default()));
            }
        }
    }
    let mine: std::collections::BTreeSet<String> =
        job.tasks.iter().map(|(t, _)| t.to_string()).collect();
    for (base, pairs) in upstream {
        // Task by task when every task needs exactly the upstream task of its own id, and the
        // two arrays have the same task ids (no task waits on one the other lacks).
        let theirs: std::collections::BTreeSet<String> = job_of
            .values()
            .filter_map(|id| id.split_once('_'))
            .filter(|(b, _)| *b == base)
            .map(|(_, t)| t.to_string())
            .collect();
        let corresponding = job.array
            && theirs == mine
            && pairs.iter().all(|(task, t)| t == &task.to_string())
            && {
                let mut seen: Vec<usize> = pairs.iter().map(|(t, _)| *t).collect();
                seen.sort();
                seen.dedup();
                seen.len() == pairs.len()
            };
        if corresponding {
            aftercorr.push(base);
        } else {
            afterok.push(base);
        }
    }
    let mut parts = Vec::new();
    if !afterok.is_empty() {
        parts.push(format!("afterok:{}", afterok.join(":")));
    }
    if !aftercorr.is_empty() {
        parts.push(format!("aftercorr:{}", aftercorr.join(":")));
    }
    (!parts.is_empty()).then(|| parts.join(","))
}

/// The resources of `job`: `[slurm]`, then `[slurm.kind.<kind>]`, then
/// `[slurm.stage.<grid or stage>]`, then the command line's, each over the one before.
fn resources(config: &Config, opts: &SubmitOptions, job: &Job) -> SlurmResources {
    let kind = config.stages[job.tasks[0].1].params.kind();
    config
        .slurm
        .for_stage(kind.as_str(), &job.key)
        .over(&opts.overrides)
}

/// Refuses a job whose `time` is not longer than its `signal_lead`: the warning would come at
/// once and the job requeue itself for ever. (stages.toml's own tables are checked when it is
/// read; this catches a `--time` given on the command line.) `submit` checks every job before
/// the first is submitted.
fn check_time_limit(job: &Job, r: &SlurmResources) -> Result<()> {
    if let Some(lead) = r.lead_not_before_limit() {
        return Err(crate::UsageError(format!(
            "job {}: `time` = {:?} is not longer than `signal_lead` = {lead} s: the warning \
             would come at once and the job requeue itself for ever",
            job.name,
            r.time.as_deref().unwrap_or_default()
        ))
        .into());
    }
    Ok(())
}

/// The `--output` of an sbatch script: `pattern` (of Slurm's `%` replacements) in folder
/// `logs`, double-quoted (sbatch reads `#SBATCH` values as a shell would: a space would end the
/// path) with the folder's own `%` written `%%` (else Slurm would replace them).
fn output_pattern(logs: &Path, pattern: &str) -> Result<String> {
    let folder = logs.display().to_string();
    if folder.contains(['"', '\n']) {
        bail!(
            "the log folder {folder:?} holds a double quote or a line break, which an sbatch \
             script cannot name; choose another output folder"
        );
    }
    Ok(format!("\"{}/{pattern}\"", folder.replace('%', "%%")))
}

/// The sbatch script of `job` (an array's names the stage of each task id in a table).
fn script(
    config: &Config,
    opts: &SubmitOptions,
    job: &Job,
    target: &Target,
    dir: &Path,
) -> Result<String> {
    let r = resources(config, opts, job);
    let q = |p: &Path| shell_quote(&p.display().to_string());
    let mut s = String::from("#!/bin/bash\n");
    let log = if job.array {
        "%x-%A_%a.out"
    } else {
        "%x-%j.out"
    };
    writeln!(s, "#SBATCH --job-name={}", job.name)?;
    writeln!(
        s,
        "#SBATCH --output={}",
        output_pattern(&dir.join("logs"), log)?
    )?;
    writeln!(s, "#SBATCH --open-mode=append")?;
    writeln!(s, "#SBATCH --requeue")?;
    let lead = r.signal_lead.unwrap_or(DEFAULT_SIGNAL_LEAD);
    writeln!(s, "#SBATCH --signal=B:USR2@{lead}")?;
    if job.array {
        let ids: Vec<String> = job.tasks.iter().map(|(t, _)| t.to_string()).collect();
        let throttle = r.throttle.map_or(String::new(), |n| format!("%{n}"));
        writeln!(s, "#SBATCH --array={}{throttle}", ids.join(","))?;
    }
    for (flag, v) in [
        ("partition", r.partition.clone()),
        ("account", r.account.clone()),
        ("time", r.time.clone()),
        ("gpus", r.gpus.map(|g| g.to_string())),
        ("cpus-per-task", r.cpus.map(|c| c.to_string())),
        ("mem", r.mem.clone()),
    ] {
        if let Some(v) = v {
            writeln!(s, "#SBATCH --{flag}={v}")?;
        }
    }
    for line in r.extra.iter().flatten() {
        writeln!(s, "#SBATCH {line}")?;
    }
    s.push_str("set -euo pipefail\n");
    if job.array {
        // The task → stage table is part of the script, which sbatch copies when it submits:
        // a later submission (rewriting this file) cannot change what a queued task runs.
        let width = job.tasks.iter().map(|(t, _)| *t).max().unwrap_or(0) + 1;
        let mut names = vec![String::new(); width];
        for &(t, i) in &job.tasks {
            names[t] = config.stages[i].name.clone();
        }
        s.push_str("STAGES=(\n");
        for n in &names {
            let quoted = if n.is_empty() {
                "''".into()
            } else {
                shell_quote(n)
            };
            writeln!(s, "  {quoted}")?;
        }
        s.push_str(")\n");
        s.push_str("STAGE=${STAGES[SLURM_ARRAY_TASK_ID]}\n");
    } else {
        writeln!(
            s,
            "STAGE={}",
            shell_quote(&config.stages[job.tasks[0].1].name)
        )?;
    }
    let threads = if r.cpus.is_some() {
        " --threads \"$SLURM_CPUS_PER_TASK\""
    } else {
        ""
    };
    s.push_str(
        "# On USR2 (the time limit is near) the binary checkpoints and requeues this job.\n",
    );
    writeln!(s, "export {REQUEUE_ENV}=1")?;
    // Computed at submission: a task skips statting the source again (its prepare stage still
    // checks the files when it runs).
    if let Some(digests) = config.source_digests() {
        writeln!(s, "export {SOURCE_DIGESTS_ENV}={}", shell_quote(&digests))?;
    }
    writeln!(
        s,
        "exec {} run {} --output {} --only \"$STAGE\"{threads}",
        q(&target.exe),
        q(&target.file),
        q(&target.root)
    )?;
    Ok(s)
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./=+:,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Set in the scripts of `submit`: a process stopped by SIGUSR2 requeues its own job.
pub const REQUEUE_ENV: &str = "LDL_SLURM_REQUEUE";

/// Set by SIGUSR2, the signal `submit`'s jobs get `signal_lead` seconds before their time limit.
static REQUEUE_ASKED: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
    std::sync::OnceLock::new();

/// Registers SIGUSR2 as a request to requeue (beside the stop it also requests). SIGTERM, what
/// `scancel` and a preemption send, only stops: a cancelled job stays cancelled, and a preempted
/// one is requeued by Slurm itself (jobs are submitted with `--requeue`).
pub fn requeue_on_usr2() -> Result<()> {
    let flag = REQUEUE_ASKED.get_or_init(Default::default);
    signal_hook::flag::register(signal_hook::consts::SIGUSR2, flag.clone())?;
    Ok(())
}

/// In a Slurm job submitted by `submit`, after SIGUSR2 stopped the run: requeue this job (task),
/// so that it runs again and resumes from the checkpoint just written.
pub fn requeue_self() {
    let asked = REQUEUE_ASKED
        .get()
        .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed));
    if std::env::var_os(REQUEUE_ENV).is_none() || !asked {
        return;
    }
    let id = match (
        std::env::var("SLURM_ARRAY_JOB_ID"),
        std::env::var("SLURM_ARRAY_TASK_ID"),
        std::env::var("SLURM_JOB_ID"),
    ) {
        (Ok(a), Ok(t), _) => format!("{a}_{t}"),
        (_, _, Ok(j)) => j,
        _ => return,
    };
    match Command::new("scontrol").args(["requeue", &id]).status() {
        Ok(s) if s.success() => {
            eprintln!("requeued Slurm job {id}: it resumes from its checkpoint")
        }
        Ok(s) => eprintln!("warning: scontrol requeue {id} failed ({s})"),
        Err(e) => eprintln!("warning: cannot run scontrol requeue {id}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A grid's cells still queued from an earlier submission name the arrays the grid's
    /// next chunk must wait for; plain stages and grids with nothing queued name none.
    #[test]
    fn a_grids_queued_arrays_are_found_for_its_next_chunk() {
        let src = r#"
[run]
output = "out"

[[stage]]
name = "data"
kind = "prepare"
source = "synthetic"

[[stage]]
name = "m"
kind = "train"
needs = ["data"]
matrix = { seed = [0, 1, 2, 3] }
model = "resnet8"
method = "vanilla"

[[stage]]
name = "e"
kind = "evaluate"
needs = ["data", "m"]
"#;
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::parse(&dir.path().join("s.toml"), src, None).unwrap();
        let job_of: BTreeMap<String, String> = [
            ("data", "40"),
            ("m.seed=0", "41_0"),
            ("m.seed=1", "41_1"),
            ("m.seed=2", "43_0"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let queued = queued_arrays(&config, &job_of);
        assert_eq!(queued.len(), 1, "{queued:?}");
        assert_eq!(queued["m"], "41:43");
    }

    /// A grid whose later cells need a stage declared after its first cell: the array is
    /// planned at its first cell, before that stage's job, and moved after it.
    #[test]
    fn an_array_comes_after_the_jobs_its_cells_need() {
        let src = r#"
[run]
output = "out"

[[stage]]
name = "data"
kind = "prepare"
source = "synthetic"

[[stage]]
name = "labels"
kind = "label"
needs = ["data", "teacher"]

[[stage]]
name = "student"
kind = "train"
needs = ["data", "labels"]
matrix = { method = ["vanilla", "off-ldl"] }
model = "resnet8"

[[stage]]
name = "teacher"
kind = "train"
needs = ["data"]
model = "resnet8"
method = "vanilla"
"#;
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::parse(&dir.path().join("s.toml"), src, None).unwrap();
        let names = |jobs: &[Job]| -> Vec<String> { jobs.iter().map(|j| j.name.clone()).collect() };
        let planned = plan(&config, &config.order(), 1001);
        let at = |names: &[String], n: &str| names.iter().position(|x| x == n).unwrap();
        let before = names(&planned);
        assert!(
            at(&before, "ldl-student") < at(&before, "ldl-labels"),
            "{before:?}"
        );
        let after = names(&in_dependency_order(&config, planned).unwrap());
        assert!(
            at(&after, "ldl-teacher") < at(&after, "ldl-labels")
                && at(&after, "ldl-labels") < at(&after, "ldl-student"),
            "{after:?}"
        );
        assert_eq!(after[0], "ldl-data");
    }

    /// The log folder is quoted, its own `%` doubled; Slurm's patterns are kept.
    #[test]
    fn the_output_pattern_is_quoted_and_escaped() {
        let got = output_pattern(Path::new("/runs/my run/100%/logs"), "%x-%A_%a.out").unwrap();
        assert_eq!(got, "\"/runs/my run/100%%/logs/%x-%A_%a.out\"");
        let e = output_pattern(Path::new("/a\"b"), "%x-%j.out").unwrap_err();
        assert!(e.to_string().contains("double quote"), "{e}");
    }
}
