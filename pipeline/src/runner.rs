//! The runner: fingerprints stages, decides what is up to date, runs the rest in dependency
//! order and makes every stage's output appear atomically.
//!
//! A stage writes into `<output>/.<name>.partial/`; on success the runner records `stage.json`
//! there, fsyncs, and swaps the folder into `<output>/<name>/` with one atomic rename
//! (`datasets::atomic::replace_dir`), then deletes the old one. A stage
//! that fails has its partial folder removed and leaves the previous output untouched. A stage
//! that is killed leaves its partial folder, tagged with its fingerprint: the next run with the
//! same fingerprint hands it back to the stage (training resumes from its checkpoint), a run with
//! another fingerprint discards it.

use crate::claim::{self, StageClaim};
use crate::config::{Config, StageDecl};
use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use stages::{Context, Input, Settings, StageError, StageParams, FORMAT_VERSION, PROGRAM_VERSION};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// One output file as recorded in `stage.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Path relative to the stage folder.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// blake3 of the contents.
    pub blake3: String,
}

/// `stage.json`: the record of a completed stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    /// Stage name.
    pub name: String,
    /// Stage kind.
    pub kind: String,
    /// Resolved parameters.
    pub params: serde_json::Value,
    /// Content hash of parameters, input fingerprints and format version.
    pub fingerprint: String,
    /// Upstream stage name → its fingerprint.
    pub inputs: BTreeMap<String, String>,
    /// Start time (RFC 3339, UTC).
    pub started: String,
    /// End time (RFC 3339, UTC).
    pub finished: String,
    /// `complete`.
    pub status: String,
    /// The program version that wrote it.
    pub program_version: String,
    /// The format version.
    pub format_version: u32,
    /// Device it ran on.
    pub device: String,
    /// Output files.
    pub outputs: Vec<OutputFile>,
    /// An identifier of the run that wrote this record (128 random bits, hex). `--force` and
    /// a replacement stopped half-way tell runs apart by it rather than by their times, which
    /// hosts sharing an output root write from clocks that may disagree. Empty in records
    /// written before it was recorded.
    #[serde(default)]
    pub run: String,
    /// The `run` of the record this run's folder replaced (empty when there was none, or it
    /// had no `run`).
    #[serde(default)]
    pub replaces: String,
}

impl StageRecord {
    /// Whether this is the record of a complete run of fingerprint `fp`.
    fn completes(&self, fp: &str) -> bool {
        self.status == "complete" && self.fingerprint == fp
    }
}

const RECORD: &str = "stage.json";
const PARTIAL_TAG: &str = ".partial.json";

/// Where a stage stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageState {
    /// Complete and its fingerprint matches.
    UpToDate,
    /// Complete, but its parameters or inputs changed.
    Stale(String),
    /// Never run.
    NeverRun,
    /// Started but not complete (killed, or its outputs were removed).
    Incomplete(String),
}

impl std::fmt::Display for StageState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StageState::UpToDate => write!(f, "up to date"),
            StageState::Stale(why) => write!(f, "stale: {why}"),
            StageState::NeverRun => write!(f, "never run"),
            StageState::Incomplete(why) => write!(f, "incomplete: {why}"),
        }
    }
}

/// The resolved parameters of a stage as JSON.
pub fn params_json(p: &StageParams) -> serde_json::Value {
    serde_json::to_value(p).expect("parameters serialise")
}

/// Fingerprints of every stage, by index, from parameters, input fingerprints, the format
/// version and the kind's output version (when above 1). A report's also holds its inputs'
/// `label` keys, which are left out of the trainings' fingerprints (a new row name redraws the
/// report without retraining).
pub fn fingerprints(config: &Config) -> Vec<String> {
    let settings = settings(config);
    let mut fps = vec![String::new(); config.stages.len()];
    for i in config.order() {
        let s = &config.stages[i];
        let inputs: Vec<(&str, &str)> = s
            .needs
            .iter()
            .map(|n| {
                let j = config.index_of(n);
                (n.as_str(), fps[j].as_str())
            })
            .collect();
        let mut params = params_json(&s.params);
        if let Some(obj) = params.as_object_mut() {
            for key in s.params.unfingerprinted_keys() {
                obj.remove(key);
            }
        }
        let mut doc = serde_json::json!({
            "format_version": FORMAT_VERSION,
            "kind": s.params.kind().as_str(),
            "params": params,
            "inputs": inputs,
        });
        let version = s.params.output_version();
        if version > 1 {
            doc["output_version"] = version.into();
        }
        if s.params.kind() == stages::Kind::Report {
            let labels: Vec<Option<&String>> = s
                .needs
                .iter()
                .map(|n| settings[config.index_of(n)].get("model.label"))
                .collect();
            doc["labels"] = serde_json::json!(labels);
        }
        fps[i] = blake3::hash(doc.to_string().as_bytes())
            .to_hex()
            .to_string();
    }
    fps
}

/// The distinguishing settings of every stage's run, by index (see
/// [`StageParams::settings`]).
pub fn settings(config: &Config) -> Vec<Settings> {
    let mut out = vec![Settings::new(); config.stages.len()];
    for i in config.order() {
        let s = &config.stages[i];
        let inputs: Vec<(stages::Kind, &Settings)> = s
            .needs
            .iter()
            .map(|n| {
                let j = config.index_of(n);
                (config.stages[j].params.kind(), &out[j])
            })
            .collect();
        let own = s.params.settings(&params_json(&s.params), &inputs);
        out[i] = own;
    }
    out
}

/// The output folder of stage `name`.
pub fn stage_dir(config: &Config, name: &str) -> PathBuf {
    config.run.output.join(name)
}

fn partial_dir(config: &Config, name: &str) -> PathBuf {
    config.run.output.join(format!(".{name}.partial"))
}

/// How far the run of stage `name` (fingerprint `fp`) in its partial folder got (a training's
/// epochs, ...), by what that folder holds ([`StageParams::progress`]); `None` when that
/// folder is of other parameters (a run that the next would not resume) or holds nothing yet.
pub fn progress(config: &Config, name: &str, fp: &str) -> Option<String> {
    let stage = config.stage(name)?;
    if !resumable(config, name, fp) {
        return None;
    }
    // The prepared dataset it reads, whose splits' sizes say how much a label stage has left.
    let dataset = stage
        .needs
        .iter()
        .find(|n| {
            config
                .stage(n)
                .is_some_and(|u| u.params.kind() == stages::Kind::Prepare)
        })
        .map(|n| stage_dir(config, n));
    // Each run rewrites the partial folder's tag when it starts: the latest resumption.
    let partial = partial_dir(config, name);
    let resumed = fs::metadata(partial.join(PARTIAL_TAG))
        .and_then(|m| m.modified())
        .ok();
    stage.params.progress(&partial, dataset.as_deref(), resumed)
}

/// Whether the partial folder of `name` was left by a killed run with fingerprint `fp`, so that
/// the stage can resume from it.
fn resumable(config: &Config, name: &str, fp: &str) -> bool {
    fs::read(partial_dir(config, name).join(PARTIAL_TAG))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v["fingerprint"] == fp)
}

/// Writes `stage.json` into `dir` atomically.
fn write_record(dir: &Path, record: &StageRecord) -> datasets::Result<()> {
    let mut json = serde_json::to_vec_pretty(record).expect("a record serialises");
    json.push(b'\n');
    datasets::atomic::write_bytes(&dir.join(RECORD), &json)
}

fn read_record(dir: &Path) -> Option<StageRecord> {
    serde_json::from_slice(&fs::read(dir.join(RECORD)).ok()?).ok()
}

/// Why stage `i`, whose record is `record`, is stale: which of its parameters changed, which
/// upstream stages, or the format or output version.
fn why_stale(config: &Config, fps: &[String], i: usize, record: &StageRecord) -> Vec<String> {
    let s = &config.stages[i];
    let mut why = Vec::new();
    let now = params_json(&s.params);
    if record.params != now {
        let (old, new) = (record.params.as_object(), now.as_object());
        let mut keys: Vec<&String> = old.into_iter().chain(new).flat_map(|m| m.keys()).collect();
        keys.sort();
        keys.dedup();
        // Only keys the fingerprint holds: a moved dataset's `path` is not why it reruns.
        let unprinted: Vec<&str> = s.params.unfingerprinted_keys().collect();
        let changed: Vec<String> = keys
            .into_iter()
            .filter(|k| !unprinted.contains(&k.as_str()))
            .filter(|k| old.and_then(|m| m.get(*k)) != new.and_then(|m| m.get(*k)))
            .map(|k| format!("`{k}`"))
            .collect();
        if !changed.is_empty() {
            why.push(format!("parameters changed ({})", changed.join(", ")));
        }
    }
    for n in &s.needs {
        let j = config.index_of(n);
        if record.inputs.get(n) != Some(&fps[j]) {
            why.push(format!("upstream `{n}` changed"));
        }
    }
    if why.is_empty() && record.format_version != FORMAT_VERSION {
        why.push(format!(
            "format version changed ({} → {FORMAT_VERSION})",
            record.format_version
        ));
    }
    if why.is_empty() && s.params.kind() == stages::Kind::Report {
        why.push("its rows' `label`s changed, or this program draws reports differently".into());
    }
    if why.is_empty() {
        why.push(format!(
            "this program computes or writes the outputs of a stage of kind `{}` differently from \
             the one that ran it (its output version changed)",
            record.kind
        ));
    }
    why
}

/// Where stage `i` stands.
pub fn state_of(config: &Config, fps: &[String], i: usize) -> StageState {
    let s = &config.stages[i];
    let dir = stage_dir(config, &s.name);
    let can_resume = resumable(config, &s.name, &fps[i]);
    let finished = |r: StageRecord| r.completes(&fps[i]);
    if read_record(&partial_dir(config, &s.name)).is_some_and(finished)
        && !read_record(&dir).is_some_and(finished)
    {
        return StageState::Incomplete(
            "finished, but stopped before its folder was moved into place; the next run moves it"
                .into(),
        );
    }
    let Some(record) = read_record(&dir) else {
        if can_resume {
            return StageState::Incomplete(match progress(config, &s.name, &fps[i]) {
                Some(done) => format!("interrupted with {done}; the next run resumes it"),
                None => "interrupted; the next run resumes it".into(),
            });
        }
        if dir.exists() {
            return StageState::Incomplete(format!(
                "{} is missing or unreadable",
                dir.join(RECORD).display()
            ));
        }
        return StageState::NeverRun;
    };
    if record.fingerprint != fps[i] {
        // A rerun toward the new output that was stopped resumes: it says how far it got.
        let mut why = why_stale(config, fps, i, &record).join("; ");
        if can_resume {
            why += &match progress(config, &s.name, &fps[i]) {
                Some(done) => {
                    format!("; its rerun was interrupted with {done}; the next run resumes it")
                }
                None => "; its rerun was interrupted; the next run resumes it".into(),
            };
        }
        return StageState::Stale(why);
    }
    for out in &record.outputs {
        let p = dir.join(&out.path);
        match fs::metadata(&p) {
            Ok(m) if m.len() == out.bytes => {}
            Ok(m) => {
                return StageState::Incomplete(format!(
                    "{} has {} bytes, {} recorded",
                    p.display(),
                    m.len(),
                    out.bytes
                ))
            }
            Err(_) => return StageState::Incomplete(format!("{} is missing", p.display())),
        }
    }
    StageState::UpToDate
}

/// Options of `pipeline run`.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Run only these stages (their inputs must be up to date).
    pub only: Vec<String>,
    /// Re-run these stages even if up to date.
    pub force: Vec<String>,
    /// Print the plan without running anything.
    pub dry_run: bool,
    /// Set by a stop request (SIGTERM, SIGUSR2, Ctrl-C): a training checkpoints at its next
    /// step and the run ends with [`StageError::Interrupted`]; no further stage starts.
    pub stop: Arc<AtomicBool>,
}

/// What `run` did, for the summary and the tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Stages run.
    pub ran: Vec<String>,
    /// Stages skipped as up to date.
    pub skipped: Vec<String>,
    /// Stages that another process completed while this one waited for them.
    pub elsewhere: Vec<String>,
}

/// Rewrites the parameters in an up-to-date stage's record when they differ from its current
/// ones (which, with an equal fingerprint, differ only in keys it does not hold: a prepare's
/// `path` after its data moved), so the record says where its data is now; a node that cannot
/// read the data then finds the digest recorded for that `path`. The record is rewritten only
/// under the stage's claim, and only if the stage is still up to date once claimed: a `--force`
/// of it in another process would otherwise get the old record written over its new folder.
/// A stage claimed elsewhere is left to its holder, and a failure only warns.
fn refresh_record(config: &Config, fps: &[String], i: usize) {
    let s = &config.stages[i];
    if s.params.located_keys().is_empty() {
        return;
    }
    let dir = stage_dir(config, &s.name);
    let now = params_json(&s.params);
    if read_record(&dir).is_none_or(|r| r.params == now) {
        return;
    }
    let _claim = match StageClaim::try_claim(&config.run.output, &s.name) {
        Ok(Some(claim)) => claim,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!("{}: cannot update its record: {e:#}", s.name);
            return;
        }
    };
    if state_of(config, fps, i) != StageState::UpToDate {
        return;
    }
    let Some(mut record) = read_record(&dir) else {
        return;
    };
    record.params = now;
    match write_record(&dir, &record) {
        Ok(()) => tracing::info!("{}: its record now names where its data is", s.name),
        Err(e) => tracing::warn!("{}: cannot update its record: {e}", s.name),
    }
}

/// The time now in RFC 3339 with milliseconds (records' `started` and `finished`, for people and
/// for records without a `run`).
fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// A new run's identifier: 128 random bits (a generator seeded by the operating system), as
/// hex. Not a seed: nothing a stage computes depends on it.
fn new_run_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Whether the folder of record `old` is the one that the run of record `new` replaced: said by
/// the runs' identifiers (`new.replaces`, or `old.replaces` naming `new`) where they are known;
/// otherwise (records written before runs had identifiers, or a folder whose record could not
/// be read when `new` was written) by their end times.
fn replaced_by(old: &StageRecord, new: &StageRecord) -> bool {
    if !old.run.is_empty() && !new.replaces.is_empty() {
        return new.replaces == old.run;
    }
    if !new.run.is_empty() && old.replaces == new.run {
        return false;
    }
    earlier(&old.finished, &new.finished)
}

/// The environment variable in which `run --jobs` hands a child the [`Seen`] of the stage it
/// forces, as JSON (`{"stage": Seen}`), so that the child judges a re-run from the parent's
/// start, not its own.
pub const FORCE_SEEN_ENV: &str = "LDL_FORCE_SEEN";

/// A `--force`d stage's folder as an invocation found it when it started, to tell later whether
/// another process has re-run the stage since (then it is not run again) without comparing
/// times written by hosts whose clocks may disagree.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Seen {
    /// The record's start and end times as written; `None` when there was no readable record.
    record: Option<(String, String)>,
    /// Its `run` identifier (empty without one).
    run: String,
    /// Whether another process held the stage's claim: its run, under way, started before this
    /// invocation and does not count as the re-run asked for.
    busy: bool,
}

impl Seen {
    /// Looks at stage `name` now: at its claim first, then its record, so that a run claimed
    /// after the look can only complete a record the look did not see.
    pub fn take(config: &Config, name: &str) -> Seen {
        let busy = StageClaim::held(&config.run.output, name).is_some();
        let record = read_record(&stage_dir(config, name));
        Seen {
            record: record
                .as_ref()
                .map(|r| (r.started.clone(), r.finished.clone())),
            run: record.map(|r| r.run).unwrap_or_default(),
            busy,
        }
    }

    /// Whether stage `name` is still to be forced: its record is the one seen (or none is
    /// readable), or it may be that of the run under way when seen (it replaced the record
    /// seen). A record written by a run claimed after the look is the re-run asked for.
    pub fn still_forced(&self, config: &Config, name: &str) -> bool {
        let Some(now) = read_record(&stage_dir(config, name)) else {
            return true;
        };
        let same = self.record.as_ref().is_some_and(|(started, finished)| {
            *started == now.started && *finished == now.finished
        });
        same || (self.busy && now.replaces == self.run)
    }
}

/// The [`Seen`] of each stage of `opts.force` (`None` for the others): handed down by a `--jobs`
/// parent, else taken now.
pub fn seen_at_start(config: &Config, opts: &RunOptions) -> Vec<Option<Seen>> {
    let handed: BTreeMap<String, Seen> = std::env::var(FORCE_SEEN_ENV)
        .ok()
        .and_then(|v| serde_json::from_str(&v).ok())
        .unwrap_or_default();
    config
        .stages
        .iter()
        .map(|s| {
            let forced = opts.force.contains(&s.name);
            forced.then(|| {
                handed
                    .get(&s.name)
                    .cloned()
                    .unwrap_or_else(|| Seen::take(config, &s.name))
            })
        })
        .collect()
}

/// Whether RFC 3339 time `a` is before `b`, compared as times (records written before
/// milliseconds were recorded have whole seconds); an unreadable time counts as before.
fn earlier(a: &str, b: &str) -> bool {
    match (
        humantime::parse_rfc3339_weak(a),
        humantime::parse_rfc3339_weak(b),
    ) {
        (Ok(a), Ok(b)) => a < b,
        _ => true,
    }
}

fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut hasher = blake3::Hasher::new();
    let mut f = fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let bytes = std::io::copy(&mut f, &mut hasher)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok((bytes, hasher.finalize().to_hex().to_string()))
}

/// How a stage stands once this process has looked at it.
enum Settled {
    /// Run here, skipped as up to date, or completed by another process meanwhile.
    Done,
    /// Another process holds its claim: wait for it.
    ClaimedElsewhere,
}

/// Runs the pipeline: every stage (or those of `--only`) in dependency order, skipping those
/// that are up to date or that another process is running, then waiting for those.
pub fn run(
    config: &Config,
    opts: &RunOptions,
    progress: Option<indicatif::MultiProgress>,
) -> Result<RunSummary> {
    for n in opts.only.iter().chain(&opts.force) {
        if config.stage(n).is_none() {
            bail!("no stage named `{n}` in {}", config.path.display());
        }
    }
    let root = &config.run.output;
    if !opts.dry_run {
        fs::create_dir_all(root)
            .with_context(|| format!("cannot create output folder {}", root.display()))?;
        claim::check_root(root);
    }
    let mut runner = Runner {
        config,
        opts,
        progress,
        fps: fingerprints(config),
        settings: settings(config),
        seen: seen_at_start(config, opts),
        summary: RunSummary::default(),
        changed: vec![false; config.stages.len()],
    };
    let todo: Vec<usize> = config
        .order()
        .into_iter()
        .filter(|&i| opts.only.is_empty() || opts.only.contains(&config.stages[i].name))
        .collect();
    let mut done = vec![false; config.stages.len()];
    loop {
        let mut waiting = None;
        for &i in &todo {
            // A stage waits for its upstream stages of this run that are not settled yet.
            let blocked = config.stages[i].needs.iter().any(|n| {
                let j = config.index_of(n);
                todo.contains(&j) && !done[j]
            });
            if done[i] || blocked {
                continue;
            }
            match runner.settle(i)? {
                Settled::Done => done[i] = true,
                Settled::ClaimedElsewhere => {
                    waiting.get_or_insert(i);
                }
            }
        }
        let Some(i) = waiting else {
            break;
        };
        let name = &config.stages[i].name;
        tracing::info!(
            "{name}: being run by another process ({}); waiting for it",
            StageClaim::holder(root, name)
        );
        if !StageClaim::wait_released(root, name, &runner.opts.stop)? {
            return Err(anyhow!(StageError::Interrupted(format!(
                "stopped on request while waiting for stage `{name}`, which another process runs"
            ))));
        }
    }
    Ok(runner.summary)
}

/// One invocation's view of the run.
struct Runner<'a> {
    config: &'a Config,
    opts: &'a RunOptions,
    progress: Option<indicatif::MultiProgress>,
    fps: Vec<String>,
    /// Every stage's run settings, handed to its downstream stages with its folder.
    settings: Vec<Settings>,
    /// Each forced stage's folder as this invocation found it when it started (`None` for the
    /// stages not forced).
    seen: Vec<Option<Seen>>,
    summary: RunSummary,
    /// Stages run by this invocation.
    changed: Vec<bool>,
}

impl Runner<'_> {
    /// Whether stage `i` is up to date, and whether it is still to be forced: forced and not
    /// re-run by another process since this invocation started ([`Seen`]).
    fn current(&self, i: usize) -> (StageState, bool) {
        let s = &self.config.stages[i];
        let state = state_of(self.config, &self.fps, i);
        let forced = self.seen[i]
            .as_ref()
            .is_some_and(|seen| seen.still_forced(self.config, &s.name));
        (state, forced)
    }

    /// Skips, runs, or finds claimed elsewhere, stage `i`, whose upstream stages of this run
    /// are settled.
    fn settle(&mut self, i: usize) -> Result<Settled> {
        let (config, opts) = (self.config, self.opts);
        let s = &config.stages[i];
        let (mut state, forced) = self.current(i);
        if state == StageState::UpToDate && !forced {
            if !opts.dry_run {
                refresh_record(config, &self.fps, i);
            }
            tracing::info!("{} ({}): up to date, skipped", s.name, s.params.kind());
            self.summary.skipped.push(s.name.clone());
            return Ok(Settled::Done);
        }
        if forced && state == StageState::UpToDate {
            state = StageState::Stale("forced with --force".into());
        }
        for n in &s.needs {
            let j = config.index_of(n);
            let upstream_ready =
                self.changed[j] || state_of(config, &self.fps, j) == StageState::UpToDate;
            if !upstream_ready && !opts.dry_run {
                bail!(
                    "stage `{}` needs `{n}`, which is not up to date ({}); run without --only",
                    s.name,
                    state_of(config, &self.fps, j)
                );
            }
        }
        if opts.dry_run {
            println!("would run {} ({}): {state}", s.name, s.params.kind());
            self.summary.ran.push(s.name.clone());
            self.changed[i] = true;
            return Ok(Settled::Done);
        }
        let Some(_claim) = StageClaim::try_claim(&config.run.output, &s.name)? else {
            return Ok(Settled::ClaimedElsewhere);
        };
        // Another process may have completed it between the look above and the claim.
        if let (StageState::UpToDate, false) = self.current(i) {
            tracing::info!(
                "{} ({}): completed by another process, skipped",
                s.name,
                s.params.kind()
            );
            self.summary.elsewhere.push(s.name.clone());
            return Ok(Settled::Done);
        }
        tracing::info!("{} ({}): running ({state})", s.name, s.params.kind());
        let t0 = Instant::now();
        if self.opts.stop.load(Ordering::Relaxed) {
            return Err(anyhow!(StageError::Interrupted(format!(
                "stopped on request before stage `{}`; the next run goes on from there",
                s.name
            ))));
        }
        run_stage(
            config,
            &self.fps,
            &self.settings,
            i,
            self.progress.clone(),
            &self.opts.stop,
        )
        .with_context(|| format!("stage `{}` failed", s.name))?;
        tracing::info!(
            "{} ({}): done in {:.1}s",
            s.name,
            s.params.kind(),
            t0.elapsed().as_secs_f64()
        );
        self.summary.ran.push(s.name.clone());
        self.changed[i] = true;
        Ok(Settled::Done)
    }
}

fn run_stage(
    config: &Config,
    fps: &[String],
    settings: &[Settings],
    i: usize,
    progress: Option<indicatif::MultiProgress>,
    stop: &Arc<AtomicBool>,
) -> Result<()> {
    let s: &StageDecl = &config.stages[i];
    let final_dir = stage_dir(config, &s.name);
    let partial = partial_dir(config, &s.name);
    let tag = serde_json::json!({ "fingerprint": fps[i], "pid": std::process::id() });
    if let Some(record) = finished_partial(&partial, &fps[i]) {
        // The folder a forced run swapped out of place (the exchange puts the old outputs at
        // the partial path) and was killed before removing: older than the final one, it is
        // discarded, not moved back over the newer outputs.
        let swapped_out = read_record(&final_dir)
            .is_some_and(|f| f.completes(&fps[i]) && replaced_by(&record, &f));
        if !swapped_out {
            tracing::info!(
                "{}: finished by an earlier run that stopped before moving it into place; moving it now",
                s.name
            );
            return move_into_place(&partial, &final_dir, &record);
        }
        tracing::info!(
            "{}: {} holds outputs older than its folder's, left by a replacement that was \
             stopped: removing it",
            s.name,
            partial.display()
        );
        fs::remove_dir_all(&partial)
            .with_context(|| format!("cannot remove {}", partial.display()))?;
    }
    if partial.exists() && !resumable(config, &s.name, &fps[i]) {
        fs::remove_dir_all(&partial)
            .with_context(|| format!("cannot remove stale {}", partial.display()))?;
    }
    fs::create_dir_all(&partial).with_context(|| format!("cannot create {}", partial.display()))?;
    // A killed writer may have left temporary files in a folder this run resumes: they must not
    // reach the final output.
    datasets::atomic::remove_stale_temps(&partial)
        .with_context(|| format!("cannot clean {}", partial.display()))?;
    datasets::atomic::write_bytes(&partial.join(PARTIAL_TAG), tag.to_string().as_bytes())?;

    let inputs: Vec<Input> = s
        .needs
        .iter()
        .map(|n| {
            let j = config.index_of(n);
            Input {
                name: n.clone(),
                kind: config.stages[j].params.kind(),
                dir: stage_dir(config, n),
                fingerprint: fps[j].clone(),
                settings: settings[j].clone(),
            }
        })
        .collect();
    let ctx = Context {
        name: s.name.clone(),
        dir: partial.clone(),
        base_dir: config.path.parent().unwrap_or(Path::new(".")).to_owned(),
        fingerprint: fps[i].clone(),
        inputs: inputs.clone(),
        device: config.run.device,
        threads: config.run.threads,
        progress,
        stop: stop.clone(),
    };
    let started = now();
    let outputs = match s.params.run(&ctx) {
        Ok(o) => o,
        // Stopped on request, a file it resumes from is damaged, or an error the next run may
        // not meet (a full disk, out of GPU memory, a missing device): the partial folder keeps
        // its checkpoints or chunks.
        Err(e) if e.keeps_partial() && has_progress(&partial) => {
            tracing::warn!(
                "{}: {} is kept for the next run to resume from (`pipeline clean` discards it)",
                s.name,
                partial.display()
            );
            return Err(anyhow!(e));
        }
        // What the same inputs would meet again (an invalid file, divergence).
        Err(e) => {
            let _ = fs::remove_dir_all(&partial);
            return Err(anyhow!(e));
        }
    };
    let record = finished_record(config, fps, i, &inputs, started, &partial, &outputs)?;
    // From here on the partial folder is complete: a run stopped before it is in place finds
    // the record and only moves it (so a kill here never costs a training).
    write_record(&partial, &record)?;
    move_into_place(&partial, &final_dir, &record)
}

/// The record of stage `i`, run from `started` until now into `partial`, with the size and hash
/// of each of its `outputs`, and the run whose folder it is to replace.
fn finished_record(
    config: &Config,
    fps: &[String],
    i: usize,
    inputs: &[Input],
    started: String,
    partial: &Path,
    outputs: &[String],
) -> Result<StageRecord> {
    let s = &config.stages[i];
    let mut files = Vec::new();
    for o in outputs {
        let (bytes, blake3) = hash_file(&partial.join(o))?;
        files.push(OutputFile {
            path: o.clone(),
            bytes,
            blake3,
        });
    }
    Ok(StageRecord {
        name: s.name.clone(),
        kind: s.params.kind().as_str().into(),
        params: params_json(&s.params),
        fingerprint: fps[i].clone(),
        inputs: inputs
            .iter()
            .map(|x| (x.name.clone(), x.fingerprint.clone()))
            .collect(),
        started,
        finished: now(),
        status: "complete".into(),
        program_version: PROGRAM_VERSION.into(),
        format_version: FORMAT_VERSION,
        device: config.run.device.to_string(),
        outputs: files,
        run: new_run_id(),
        // Read under the stage's claim: nothing replaces the folder meanwhile.
        replaces: read_record(&stage_dir(config, &s.name))
            .map(|r| r.run)
            .unwrap_or_default(),
    })
}

/// Whether a partial folder holds anything besides its resume tag (checkpoints, chunks, epochs
/// of a replay store): what a stopped or failed stage's next run would resume from.
fn has_progress(partial: &Path) -> bool {
    fs::read_dir(partial)
        .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name() != PARTIAL_TAG)))
}

/// The record of a partial folder that a run finished (outputs written and recorded) but did not
/// move into place, when it is for fingerprint `fp` and every output has its recorded size and
/// hash.
fn finished_partial(partial: &Path, fp: &str) -> Option<StageRecord> {
    let record = read_record(partial)?;
    let intact = record.completes(fp)
        && record.outputs.iter().all(|o| {
            hash_file(&partial.join(&o.path))
                .is_ok_and(|(bytes, blake3)| bytes == o.bytes && blake3 == o.blake3)
        });
    intact.then_some(record)
}

/// Moves a finished partial folder into place: first removes what is not one of its recorded
/// outputs (the resume tag, checkpoints, label chunks), then replaces the final folder.
fn move_into_place(partial: &Path, final_dir: &Path, record: &StageRecord) -> Result<()> {
    for entry in
        fs::read_dir(partial).with_context(|| format!("cannot read {}", partial.display()))?
    {
        let entry = entry.with_context(|| format!("cannot read {}", partial.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let recorded = name == RECORD
            || record.outputs.iter().any(|o| {
                Path::new(&o.path).components().next()
                    == Some(std::path::Component::Normal(name.as_ref()))
            });
        if recorded {
            continue;
        }
        let path = entry.path();
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.with_context(|| format!("cannot remove {}", path.display()))?;
    }
    datasets::atomic::sync_dir(partial)
        .with_context(|| format!("cannot sync {}", partial.display()))?;
    Ok(datasets::atomic::replace_dir(partial, final_dir)?)
}

/// Prints where every stage stands, in dependency order.
pub fn status(config: &Config) -> Vec<(String, StageState)> {
    let fps = fingerprints(config);
    config
        .order()
        .into_iter()
        .map(|i| (config.stages[i].name.clone(), state_of(config, &fps, i)))
        .collect()
}

/// Removes the outputs (and partial folders) of `stage`, or of every stage of the file.
pub fn clean(config: &Config, stage: Option<&str>) -> Result<Vec<String>> {
    let names: Vec<&str> = match stage {
        Some(n) => {
            if config.stage(n).is_none() {
                bail!("no stage named `{n}` in {}", config.path.display());
            }
            vec![n]
        }
        None => config.stages.iter().map(|s| s.name.as_str()).collect(),
    };
    let mut removed = Vec::new();
    for n in names {
        let dirs: Vec<PathBuf> = [stage_dir(config, n), partial_dir(config, n)]
            .into_iter()
            .filter(|d| d.exists())
            .collect();
        if dirs.is_empty() {
            continue;
        }
        let Some(_claim) = StageClaim::try_claim(&config.run.output, n)? else {
            bail!(
                "stage `{n}` is being run by another process ({}); wait for it or stop it",
                StageClaim::holder(&config.run.output, n)
            );
        };
        for dir in dirs {
            fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
            removed.push(dir.display().to_string());
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_times_compare_as_times_across_precisions() {
        // A record of whole seconds (before milliseconds were recorded) against now.
        assert!(earlier("2026-12-06T03:28:26Z", "2026-12-06T03:28:26.500Z"));
        assert!(!earlier("2026-12-06T03:28:26.500Z", "2026-12-06T03:28:26Z"));
        // Within one second.
        assert!(earlier(
            "2026-12-06T03:28:26.400Z",
            "2026-12-06T03:28:26.401Z"
        ));
        assert!(!earlier(
            "2026-12-06T03:28:26.401Z",
            "2026-12-06T03:28:26.400Z"
        ));
        let t = now();
        assert!(
            t.len() == 24 && t.ends_with('Z') && t.as_bytes()[19] == b'.',
            "{t}"
        );
    }

    fn record(run: &str, replaces: &str, finished: &str) -> StageRecord {
        StageRecord {
            name: "s".into(),
            kind: "prepare".into(),
            params: serde_json::json!({}),
            fingerprint: "f".into(),
            inputs: BTreeMap::new(),
            started: "2026-12-06T03:00:00.000Z".into(),
            finished: finished.into(),
            status: "complete".into(),
            program_version: "0".into(),
            format_version: 1,
            device: "cpu".into(),
            outputs: Vec::new(),
            run: run.into(),
            replaces: replaces.into(),
        }
    }

    #[test]
    fn a_replaced_folder_is_told_by_run_ids_not_clocks() {
        // The old run's host clock ran an hour ahead of the new one's: its record ends later.
        let old = record("a1", "", "2026-12-06T04:00:00.000Z");
        let new = record("b2", "a1", "2026-12-06T03:10:00.000Z");
        assert!(replaced_by(&old, &new));
        assert!(!replaced_by(&new, &old));
        // A folder the new one did not replace (the record names another run).
        assert!(!replaced_by(
            &record("c3", "", "2026-12-06T02:00:00.000Z"),
            &new
        ));
        // Records written before runs had identifiers: their end times decide.
        let (old, new) = (
            record("", "", "2026-12-06T03:00:00.000Z"),
            record("", "", "2026-12-06T03:00:00.001Z"),
        );
        assert!(replaced_by(&old, &new) && !replaced_by(&new, &old));
        assert!(replaced_by(
            &old,
            &record("b2", "", "2026-12-06T03:10:00.000Z")
        ));
        // A finished folder not yet moved names the one it is to replace: it is the newer,
        // whatever the clocks say.
        let (waiting, in_place) = (
            record("d4", "a1", "2026-12-06T02:00:00.000Z"),
            record("a1", "", "2026-12-06T04:00:00.000Z"),
        );
        assert!(!replaced_by(&waiting, &in_place));
        // Without either naming the other (a `replaces` that could not be read), times decide.
        assert!(replaced_by(
            &record("e5", "", "2026-12-06T02:00:00.000Z"),
            &in_place
        ));
    }

    #[test]
    fn run_ids_are_random_hex_and_records_without_them_still_read() {
        let (a, b) = (new_run_id(), new_run_id());
        assert!(
            a.len() == 32 && a.bytes().all(|c| c.is_ascii_hexdigit()) && a != b,
            "{a} {b}"
        );
        let mut json =
            serde_json::to_value(record("a1", "z9", "2026-12-06T04:00:00.000Z")).unwrap();
        json.as_object_mut().unwrap().remove("run");
        json.as_object_mut().unwrap().remove("replaces");
        let old: StageRecord = serde_json::from_value(json).unwrap();
        assert!(old.run.is_empty() && old.replaces.is_empty());
    }
}
