//! stages.toml, format version 1: parsing and validation. Every error is found before anything
//! runs and names the file, the line and column, and the key.
//!
//! ```toml
//! version = 1                # optional; the format version
//! [run]
//! output = "outputs/demo"    # default: outputs/<file stem>, relative to the file's folder
//! seed = 0
//! device = "cpu"             # "cpu" | "cuda" | "cuda:N"
//! threads = 2                # default: all cores
//!
//! [[stage]]
//! name = "data"
//! kind = "prepare"           # prepare | import | train | label | replay | evaluate | report
//! needs = []                 # upstream stages this one reads
//! source = "synthetic"       # ... and the kind's own parameters
//! ```

use engine::device::DeviceSpec;
use serde::Deserialize;
use stages::science::methods::Method;
use stages::{Artifact, Kind, Multiplicity, Settings, StageParams};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::de::{DeArray, DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

/// The stages.toml format version this program reads.
pub const CONFIG_VERSION: i64 = 1;

/// An error in stages.toml, located by line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong, naming the key.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            // Not a place in the file: the file itself (it cannot be read).
            return write!(f, "{}: {}", self.file.display(), self.message);
        }
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

impl std::error::Error for ConfigError {}

/// The `[run]` table, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSettings {
    /// Output root.
    pub output: PathBuf,
    /// Seed of every stage that does not set its own.
    pub seed: u64,
    /// Compute device.
    pub device: DeviceSpec,
    /// Worker threads.
    pub threads: usize,
    /// Whether `threads` was set (`[run].threads`, `--threads`) rather than all cores.
    pub threads_set: bool,
}

/// One declared stage.
#[derive(Debug, Clone, PartialEq)]
pub struct StageDecl {
    /// Unique name; also its output folder.
    pub name: String,
    /// Upstream stages, in declared order.
    pub needs: Vec<String>,
    /// Kind and parameters (seed resolved).
    pub params: StageParams,
    /// The grid the stage is a cell of (its `[[stage]]` name), if any.
    pub grid: Option<String>,
}

/// A validated stages.toml.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// The `[run]` settings.
    pub run: RunSettings,
    /// Stages in file order, grids expanded into their cells.
    pub stages: Vec<StageDecl>,
    /// Each grid's name and its cells' stage names, in file order.
    pub grids: Vec<(String, Vec<String>)>,
    /// The `[slurm]` table: resources of `pipeline submit --slurm`.
    pub slurm: SlurmTable,
}

/// Slurm resources of a job (`None`: the cluster's default, or the level below).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmResources {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// `--time` (`HH:MM:SS`, `D-HH:MM`, …).
    pub time: Option<String>,
    /// `--gpus`.
    pub gpus: Option<u32>,
    /// `--cpus-per-task` (the stage's threads too).
    pub cpus: Option<u32>,
    /// `--mem` (`16G`, …).
    pub mem: Option<String>,
    /// Further `#SBATCH` lines, e.g. `["--qos=high", "--constraint=a100"]`.
    pub extra: Option<Vec<String>>,
    /// At most this many tasks of an array at once (`--array=…%N`).
    pub throttle: Option<u32>,
    /// Seconds before the time limit at which Slurm sends SIGUSR2 (`--signal=B:USR2@N`; 120).
    pub signal_lead: Option<u32>,
}

/// Seconds before the time limit at which Slurm sends SIGUSR2 when `signal_lead` is unset.
pub const DEFAULT_SIGNAL_LEAD: u32 = 120;

impl SlurmResources {
    /// The signal lead (seconds) when the `time` limit is not longer than it: the warning
    /// would come as the job starts, and the job requeue itself for ever. `None` when the
    /// limit is longer, unset, or of a form sbatch judges (`infinite`).
    pub fn lead_not_before_limit(&self) -> Option<u32> {
        let lead = self.signal_lead.unwrap_or(DEFAULT_SIGNAL_LEAD);
        let limit = time_limit_seconds(self.time.as_deref()?)?;
        (limit <= u64::from(lead)).then_some(lead)
    }

    /// These resources with those `o` sets replacing them.
    pub fn over(&self, o: &SlurmResources) -> SlurmResources {
        SlurmResources {
            partition: o.partition.clone().or_else(|| self.partition.clone()),
            account: o.account.clone().or_else(|| self.account.clone()),
            time: o.time.clone().or_else(|| self.time.clone()),
            gpus: o.gpus.or(self.gpus),
            cpus: o.cpus.or(self.cpus),
            mem: o.mem.clone().or_else(|| self.mem.clone()),
            extra: o.extra.clone().or_else(|| self.extra.clone()),
            throttle: o.throttle.or(self.throttle),
            signal_lead: o.signal_lead.or(self.signal_lead),
        }
    }
}

/// Seconds in a Slurm time limit (`minutes`, `minutes:seconds`, `hours:minutes:seconds`,
/// `days-hours`, `days-hours:minutes`, `days-hours:minutes:seconds`); `None` for another form
/// (`infinite`, `UNLIMITED`), which sbatch judges.
pub fn time_limit_seconds(time: &str) -> Option<u64> {
    let (days, rest) = match time.split_once('-') {
        Some((d, rest)) => (Some(d.trim().parse::<u64>().ok()?), rest),
        None => (None, time),
    };
    let parts: Vec<u64> = rest
        .split(':')
        .map(|p| p.trim().parse().ok())
        .collect::<Option<_>>()?;
    let (h, m, sec) = match (days.is_some(), parts.as_slice()) {
        (false, [m]) => (0, *m, 0),
        (false, [m, s]) => (0, *m, *s),
        (_, [h, m, s]) => (*h, *m, *s),
        (true, [h]) => (*h, 0, 0),
        (true, [h, m]) => (*h, *m, 0),
        _ => return None,
    };
    Some(days.unwrap_or(0) * 86_400 + h * 3600 + m * 60 + sec)
}

/// `[slurm]`: resources for every job, then per kind (`[slurm.kind.train]`), then per stage or
/// grid (`[slurm.stage.student]`), each over the one before.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlurmTable {
    /// The table's own keys.
    pub defaults: SlurmResources,
    /// Per stage kind.
    pub kind: BTreeMap<String, SlurmResources>,
    /// Per stage or grid name.
    pub stage: BTreeMap<String, SlurmResources>,
}

impl SlurmTable {
    /// The resources of a stage of `kind` whose job is that of `key` (a grid's name for its
    /// cells, else the stage's): the table's own, then `[slurm.kind.<kind>]`'s, then
    /// `[slurm.stage.<key>]`'s, each over the one before.
    pub fn for_stage(&self, kind: &str, key: &str) -> SlurmResources {
        [self.kind.get(kind), self.stage.get(key)]
            .into_iter()
            .flatten()
            .fold(self.defaults.clone(), |r, level| r.over(level))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunRaw {
    #[serde(default)]
    output: Option<String>,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    device: Option<Spanned<String>>,
    #[serde(default)]
    threads: Option<Spanned<usize>>,
}

struct Locator<'a> {
    file: &'a Path,
    src: &'a str,
}

impl Locator<'_> {
    fn at(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let offset = span.start.min(self.src.len());
        let before = &self.src[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ConfigError {
            file: self.file.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }

    fn toml(&self, e: toml::de::Error, context: &str, fallback: Range<usize>) -> ConfigError {
        let msg = e
            .message()
            .trim()
            .replace("unknown field", "unknown key")
            // serde's words for a table variant without keys (`schedule = { type = "cosine" }`).
            .replace(", there are no fields", ": this `type` takes no other keys")
            .replace("missing field", "missing key")
            .replace("expected usize", "expected a whole number")
            .replace("expected u64", "expected a whole number")
            .replace("expected u32", "expected a whole number")
            .replace("expected f64", "expected a number")
            .replace("expected f32", "expected a number");
        self.at(e.span().unwrap_or(fallback), format!("{context}{msg}"))
    }
}

/// Reads and validates a stages.toml; `output` overrides `[run].output`.
pub fn load(file: &Path, output: Option<&Path>) -> Result<Config, ConfigError> {
    let src = std::fs::read_to_string(file).map_err(|e| ConfigError {
        file: file.to_owned(),
        line: 0,
        column: 0,
        message: format!("cannot read: {e}"),
    })?;
    parse(file, &src, output)
}

fn expect_string<'a>(
    loc: &Locator,
    v: &'a Spanned<DeValue>,
    what: &str,
) -> Result<&'a str, ConfigError> {
    match v.get_ref() {
        DeValue::String(s) => Ok(s),
        other => Err(loc.at(
            v.span(),
            format!("{what} must be a string, found {}", type_name(other)),
        )),
    }
}

fn type_name(v: &DeValue) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// Parses stages.toml source text (`file` names it in errors): the version, `[run]`, then each
/// `[[stage]]` table as a template (phase 1), expanded into stages, grids cell by cell
/// (phase 2), and the graph checked.
pub fn parse(file: &Path, src: &str, output: Option<&Path>) -> Result<Config, ConfigError> {
    let loc = Locator { file, src };
    let doc = DeTable::parse(src).map_err(|e| loc.toml(e, "syntax error: ", 0..0))?;
    let doc_span = doc.span();
    let mut doc = doc.into_inner();
    check_version(&loc, &mut doc)?;
    let run = run_settings(&loc, file, output, &mut doc)?;
    let slurm = slurm_table(&loc, doc.remove("slurm"))?;
    let stage_values = stage_tables(&loc, &mut doc, doc_span)?;
    let mut templates = Vec::new();
    let mut seen: HashMap<String, Range<usize>> = HashMap::new();
    for (i, v) in stage_values.into_iter().enumerate() {
        templates.push(template(&loc, i, v, &mut seen)?);
    }
    // Expanded in the order of their needs (a stage naming a grid, or following one cell by
    // cell, needs the grid's cells), then put back in file order: stages are declared in any
    // order.
    let declared: HashMap<String, usize> = templates
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let mut expansion = Expansion::default();
    let mut template_of: Vec<usize> = Vec::new();
    for (i, tpl) in in_need_order(templates) {
        expansion.expand(&loc, &run, tpl)?;
        template_of.resize(expansion.stages.len(), i);
    }
    let Expansion {
        stages,
        name_spans,
        need_spans,
        mut grids,
        ..
    } = expansion;
    let order = file_order(&template_of);
    let (stages, name_spans, need_spans) = (
        permuted(stages, &order),
        permuted(name_spans, &order),
        permuted(need_spans, &order),
    );
    grids.sort_by_key(|(g, _)| declared.get(g).copied().unwrap_or(usize::MAX));
    validate_graph(&loc, &stages, &name_spans, &need_spans)?;
    validate_import_seeds(&loc, &stages, &name_spans)?;
    validate_slurm_names(&loc, &slurm.1.names, &stages, &grids)?;
    validate_slurm_times(&loc, &slurm.0, &slurm.1.timing, &stages)?;
    Ok(Config {
        path: file.to_owned(),
        run,
        stages,
        grids,
        slurm: slurm.0,
    })
}

/// Each `[slurm.stage.NAME]` names a stage or a grid. A grid's cells run as one job array with
/// the grid's resources, so a cell's own table would be ignored: it is refused.
fn validate_slurm_names(
    loc: &Locator,
    names: &BTreeMap<String, Range<usize>>,
    stages: &[StageDecl],
    grids: &[(String, Vec<String>)],
) -> Result<(), ConfigError> {
    for (name, span) in names {
        if grids.iter().any(|(g, _)| g == name) {
            continue;
        }
        if let Some((grid, _)) = grids.iter().find(|(_, cells)| cells.contains(name)) {
            return Err(loc.at(
                span.clone(),
                format!(
                    "[slurm.stage.{name}]: `{name}` is a cell of grid `{grid}`, whose cells run \
                     as one job array with one set of resources: set them in \
                     [slurm.stage.{grid}]"
                ),
            ));
        }
        if !stages.iter().any(|s| &s.name == name) {
            return Err(loc.at(
                span.clone(),
                format!("[slurm.stage.{name}]: no stage or grid named `{name}`"),
            ));
        }
    }
    Ok(())
}

/// `version`, if given, must be the one this program reads.
fn check_version(loc: &Locator, doc: &mut DeTable) -> Result<(), ConfigError> {
    if let Some(v) = doc.remove("version") {
        match v.get_ref() {
            DeValue::Integer(i) if i.to_string() == CONFIG_VERSION.to_string() => {}
            other => {
                return Err(loc.at(
                    v.span(),
                    format!(
                        "key `version`: this program reads stages.toml version {CONFIG_VERSION}, found {}",
                        match other {
                            DeValue::Integer(i) => i.to_string(),
                            o => type_name(o).to_string(),
                        }
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// The `[run]` table, resolved: output root (`output` overrides it), seed, device, threads.
fn run_settings(
    loc: &Locator,
    file: &Path,
    output: Option<&Path>,
    doc: &mut DeTable,
) -> Result<RunSettings, ConfigError> {
    let run_raw: RunRaw = match doc.remove("run") {
        Some(v) => {
            let span = v.span();
            if !matches!(v.get_ref(), DeValue::Table(_)) {
                return Err(loc.at(
                    span,
                    format!(
                        "key `run` must be a table, found {}",
                        type_name(v.get_ref())
                    ),
                ));
            }
            RunRaw::deserialize(ValueDeserializer::from(v))
                .map_err(|e| loc.toml(e, "[run]: ", span))?
        }
        None => RunRaw {
            output: None,
            seed: 0,
            device: None,
            threads: None,
        },
    };
    let device = match &run_raw.device {
        None => DeviceSpec::Cpu,
        Some(d) => d
            .get_ref()
            .parse()
            .map_err(|m: String| loc.at(d.span(), format!("[run] key `device`: {m}")))?,
    };
    if let (Some(d), Err(m)) = (&run_raw.device, device.available()) {
        return Err(loc.at(d.span(), format!("[run] key `device`: {m}")));
    }
    let threads = match &run_raw.threads {
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        Some(t) if *t.get_ref() == 0 => {
            return Err(loc.at(t.span(), "[run] key `threads`: must be at least 1"))
        }
        Some(t) => *t.get_ref(),
    };
    let base = file.parent().unwrap_or(Path::new("."));
    let output = match (output, &run_raw.output) {
        (Some(o), _) => o.to_owned(),
        (None, Some(o)) => base.join(o),
        (None, None) => base
            .join("outputs")
            .join(file.file_stem().unwrap_or_default()),
    };
    Ok(RunSettings {
        output,
        seed: run_raw.seed,
        device,
        threads,
        threads_set: run_raw.threads.is_some(),
    })
}

/// The `[slurm]` table, and for each `[slurm.stage.NAME]` the span of its name (checked once
/// the stages are known). Errors name the sub-table and point at the key.
fn slurm_table(
    loc: &Locator,
    v: Option<Spanned<DeValue>>,
) -> Result<(SlurmTable, SlurmPlaces), ConfigError> {
    let Some(v) = v else {
        return Ok(Default::default());
    };
    let (span, mut t) = slurm_subtable(loc, "key `slurm`", v)?;
    let mut table = SlurmTable::default();
    let mut names = BTreeMap::new();
    let mut timing = BTreeMap::new();
    if let Some(kinds) = t.remove("kind") {
        for (k, v) in slurm_subtable(loc, "[slurm.kind]", kinds)?.1 {
            let context = format!("[slurm.kind.{}]", k.get_ref());
            if k.get_ref().parse::<Kind>().is_err() {
                let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
                return Err(loc.at(
                    k.span(),
                    format!(
                        "{context}: unknown stage kind `{}`, expected one of {}",
                        k.get_ref(),
                        kinds.join(", ")
                    ),
                ));
            }
            let r = slurm_resources(loc, &context, v, &mut timing)?;
            table.kind.insert(k.get_ref().to_string(), r);
        }
    }
    if let Some(stages) = t.remove("stage") {
        for (k, v) in slurm_subtable(loc, "[slurm.stage]", stages)?.1 {
            let context = format!("[slurm.stage.{}]", k.get_ref());
            let r = slurm_resources(loc, &context, v, &mut timing)?;
            names.insert(k.get_ref().to_string(), k.span());
            table.stage.insert(k.get_ref().to_string(), r);
        }
    }
    let all = Spanned::new(span, DeValue::Table(t));
    table.defaults = slurm_resources(loc, "[slurm]", all, &mut timing)?;
    Ok((table, SlurmPlaces { names, timing }))
}

/// Where parts of `[slurm]` are, for the checks made once the stages are known.
#[derive(Default)]
struct SlurmPlaces {
    /// Each `[slurm.stage.NAME]`'s name.
    names: BTreeMap<String, Range<usize>>,
    /// Each table's `time` (or `signal_lead`), by the table's name (`[slurm.kind.train]`).
    timing: BTreeMap<String, Range<usize>>,
}

/// Every stage's job gets a `time` longer than its `signal_lead` (default 120 s): a warning
/// due as the job starts would requeue it for ever. The error points at the most specific
/// table setting either.
fn validate_slurm_times(
    loc: &Locator,
    table: &SlurmTable,
    timing: &BTreeMap<String, Range<usize>>,
    stages: &[StageDecl],
) -> Result<(), ConfigError> {
    for s in stages {
        let kind = s.params.kind().as_str();
        let key = s.grid.as_deref().unwrap_or(&s.name);
        let r = table.for_stage(kind, key);
        let Some(lead) = r.lead_not_before_limit() else {
            continue;
        };
        let tables = [
            format!("[slurm.stage.{key}]"),
            format!("[slurm.kind.{kind}]"),
            "[slurm]".to_string(),
        ];
        let (context, at) = tables
            .iter()
            .find_map(|c| timing.get(c).map(|at| (c, at)))
            .expect("a table set the time");
        return Err(loc.at(
            at.clone(),
            format!(
                "{context}: `time` = {:?} is not longer than `signal_lead` = {lead} s for stage \
                 `{}`: the warning would come at once and the job requeue itself for ever",
                r.time.as_deref().unwrap_or_default(),
                s.name
            ),
        ));
    }
    Ok(())
}

/// A table of `[slurm]`, or an error naming `what` and the type found.
fn slurm_subtable<'i>(
    loc: &Locator,
    what: &str,
    v: Spanned<DeValue<'i>>,
) -> Result<(Range<usize>, DeTable<'i>), ConfigError> {
    let span = v.span();
    match v.into_inner() {
        DeValue::Table(t) => Ok((span, t)),
        other => Err(loc.at(
            span,
            format!("{what} must be a table, found {}", type_name(&other)),
        )),
    }
}

/// One level of `[slurm]` resources; `context` names its table in errors and keys `timing`,
/// which gets the place of its `time` (or `signal_lead`) for [`validate_slurm_times`].
fn slurm_resources(
    loc: &Locator,
    context: &str,
    v: Spanned<DeValue>,
    timing: &mut BTreeMap<String, Range<usize>>,
) -> Result<SlurmResources, ConfigError> {
    let span = v.span();
    let key_span = |key: &str| match v.get_ref() {
        DeValue::Table(t) => t.get(key).map(|th| th.span()),
        _ => None,
    };
    let throttle_span = key_span("throttle");
    if let Some(at) = key_span("time").or_else(|| key_span("signal_lead")) {
        timing.insert(context.to_string(), at);
    }
    let r = SlurmResources::deserialize(ValueDeserializer::from(v))
        .map_err(|e| loc.toml(e, &format!("{context}: "), span.clone()))?;
    if r.throttle == Some(0) {
        return Err(loc.at(
            throttle_span.unwrap_or(span),
            format!("{context} key `throttle`: must be at least 1"),
        ));
    }
    Ok(r)
}

/// The `[[stage]]` tables; no other top-level key is allowed.
fn stage_tables<'i>(
    loc: &Locator,
    doc: &mut DeTable<'i>,
    doc_span: Range<usize>,
) -> Result<DeArray<'i>, ConfigError> {
    let stage_values = match doc.remove("stage") {
        None => return Err(loc.at(doc_span, "no `[[stage]]` tables: nothing to run")),
        Some(v) => match v.into_inner() {
            DeValue::Array(a) => a,
            other => {
                return Err(loc.at(
                    0..0,
                    format!(
                        "key `stage` must be an array of tables, found {}",
                        type_name(&other)
                    ),
                ))
            }
        },
    };
    if let Some((k, _)) = doc.iter().next() {
        return Err(loc.at(
            k.span(),
            format!(
                "unknown top-level key `{}`, expected one of `version`, `run`, `slurm`, `stage`",
                k.get_ref()
            ),
        ));
    }
    Ok(stage_values)
}

/// Phase 1: `[[stage]]` table number `i` as a template: name, kind, needs, its own keys, and
/// the cells of its `matrix` (none: one plain stage).
fn template<'i>(
    loc: &Locator,
    i: usize,
    v: Spanned<DeValue<'i>>,
    seen: &mut HashMap<String, Range<usize>>,
) -> Result<Template<'i>, ConfigError> {
    let span = v.span();
    let DeValue::Table(mut t) = v.into_inner() else {
        return Err(loc.at(span, "each `stage` entry must be a table (`[[stage]]`)"));
    };
    let name_v = t.remove("name").ok_or_else(|| {
        loc.at(
            span.clone(),
            format!("stage #{}: missing key `name`", i + 1),
        )
    })?;
    let name = expect_string(loc, &name_v, "key `name`")?.to_owned();
    let valid_name = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !valid_name {
        return Err(loc.at(
            name_v.span(),
            format!("key `name`: `{name}` is not a valid stage name (letters, digits, `-`, `_`, `.`; not starting with `.`)"),
        ));
    }
    if let Some(first) = seen.get(&name) {
        let first_line = loc.at(first.clone(), "").line;
        return Err(loc.at(
            name_v.span(),
            format!(
                "key `name`: duplicate stage name `{name}` (first declared on line {first_line})"
            ),
        ));
    }
    seen.insert(name.clone(), name_v.span());
    let ctx = format!("stage `{name}`: ");
    let kind_v = t
        .remove("kind")
        .ok_or_else(|| loc.at(span.clone(), format!("{ctx}missing key `kind`")))?;
    let kind: Kind = expect_string(loc, &kind_v, &format!("{ctx}key `kind`"))?
        .parse()
        .map_err(|m: String| loc.at(kind_v.span(), format!("{ctx}key `kind`: {m}")))?;
    let mut needs = Vec::new();
    if let Some(nv) = t.remove("needs") {
        let nspan = nv.span();
        match nv.into_inner() {
            DeValue::Array(a) => {
                for item in a.iter() {
                    needs.push((
                        expect_string(loc, item, &format!("{ctx}each entry of `needs`"))?
                            .to_owned(),
                        item.span(),
                    ));
                }
            }
            other => {
                return Err(loc.at(
                    nspan,
                    format!(
                        "{ctx}key `needs` must be an array of stage names, found {}",
                        type_name(&other)
                    ),
                ))
            }
        }
    }
    let cells = match t.remove("matrix") {
        None => None,
        Some(m) => Some(matrix_cells(loc, &name, m)?),
    };
    Ok(Template {
        name,
        name_span: name_v.span(),
        span,
        kind,
        needs,
        table: t,
        cells,
    })
}

/// `templates` (with their places in the file) in an order where each comes after those it
/// names in `needs`, file order kept where the needs allow; templates in a cycle keep their
/// file order (the graph's check reports the cycle).
fn in_need_order(templates: Vec<Template<'_>>) -> Vec<(usize, Template<'_>)> {
    let index: HashMap<&str, usize> = templates
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let needs: Vec<Vec<usize>> = templates
        .iter()
        .enumerate()
        .map(|(i, t)| {
            t.needs
                .iter()
                .filter_map(|(n, _)| index.get(n.as_str()).copied())
                .filter(|&j| j != i)
                .collect()
        })
        .collect();
    let (order, _in_a_cycle) = stable_order(&needs);
    let templates = permuted(templates, &order);
    order.into_iter().zip(templates).collect()
}

/// The order that puts expanded stages back in file order: by the place of the template each
/// came from (`template_of`), a template's cells in their own order.
fn file_order(template_of: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..template_of.len()).collect();
    order.sort_by_key(|&k| template_of[k]);
    order
}

/// The indices of `needs` (each with the indices it needs) in an order where each comes after
/// those it needs, the lowest ready index first, so that the given order is kept where the
/// needs allow. Indices that need each other are taken lowest first when nothing else is
/// ready; the second value lists those left at the first such stall (empty without a cycle).
pub(crate) fn stable_order(needs: &[Vec<usize>]) -> (Vec<usize>, Vec<usize>) {
    let n = needs.len();
    let mut placed = vec![false; n];
    let mut order = Vec::with_capacity(n);
    let mut stuck = Vec::new();
    while order.len() < n {
        let ready = (0..n).find(|&i| !placed[i] && needs[i].iter().all(|&j| placed[j]));
        let next = ready.unwrap_or_else(|| {
            if stuck.is_empty() {
                stuck = (0..n).filter(|&i| !placed[i]).collect();
            }
            (0..n).find(|&i| !placed[i]).expect("one is left")
        });
        placed[next] = true;
        order.push(next);
    }
    (order, stuck)
}

/// The items of `items` at the places of `order`.
pub(crate) fn permuted<T>(items: Vec<T>, order: &[usize]) -> Vec<T> {
    let mut slots: Vec<Option<T>> = items.into_iter().map(Some).collect();
    order
        .iter()
        .map(|&k| slots[k].take().expect("each once"))
        .collect()
}

/// Phase 2: the stages of the templates so far, in file order, with their grids. A stage with
/// a `matrix` becomes one stage per cell; a stage that needs exactly one stage of what a grid
/// produces follows that grid, one stage per cell; any other need of a grid means all of its
/// cells.
#[derive(Default)]
struct Expansion {
    stages: Vec<StageDecl>,
    name_spans: Vec<Range<usize>>,
    need_spans: Vec<Vec<Range<usize>>>,
    grids: Vec<(String, Vec<String>)>,
    kinds: HashMap<String, Kind>,
    /// Each grid's `matrix` keys (none for a grid made by following another).
    grid_keys: HashMap<String, Vec<String>>,
    /// Each stage's resolved parameters, as JSON, by name.
    resolved: HashMap<String, serde_json::Value>,
    /// The name segments (`key`, `value`) of each cell made by a `matrix`, with the span of
    /// the value in the file.
    segments: HashMap<String, Vec<(String, String, Range<usize>)>>,
}

impl Expansion {
    /// Adds the stages of `tpl`: one per cell of its matrix (or one), times the cells of a grid
    /// it follows.
    fn expand(
        &mut self,
        loc: &Locator,
        run: &RunSettings,
        tpl: Template,
    ) -> Result<(), ConfigError> {
        let own: Vec<Vec<CellValue>> = tpl.cells.clone().unwrap_or_else(|| vec![Vec::new()]);
        let mut cell_names = Vec::new();
        for cell in own {
            let (own_name, params) = cell_params(loc, run, &tpl, &cell)?;
            let follow = self.followed_grid(loc, &tpl, &own_name, &params)?;
            let variants = match follow {
                None => vec![(own_name.clone(), None)],
                Some(j) => self.following_variants(loc, &tpl, j, &cell, &own_name, &params)?,
            };
            let in_grid = tpl.cells.is_some() || follow.is_some();
            for (stage_name, followed) in variants {
                let (needs, spans) = self.expanded_needs(&tpl, follow, followed, in_grid, &params);
                if self.kinds.contains_key(&stage_name) {
                    return Err(loc.at(
                        tpl.name_span.clone(),
                        format!("key `name`: the grid `{}` derives the stage name `{stage_name}`, which is already taken", tpl.name),
                    ));
                }
                self.kinds.insert(stage_name.clone(), tpl.kind);
                self.resolved.insert(
                    stage_name.clone(),
                    serde_json::to_value(&params).expect("parameters serialise"),
                );
                if follow.is_none() && tpl.cells.is_some() {
                    let segs = cell
                        .iter()
                        .map(|c| (c.key.clone(), c.segment.clone(), c.value.span()));
                    self.segments.insert(stage_name.clone(), segs.collect());
                }
                cell_names.push(stage_name.clone());
                self.stages.push(StageDecl {
                    name: stage_name,
                    needs,
                    params: params.clone(),
                    grid: in_grid.then(|| tpl.name.clone()),
                });
                self.name_spans.push(tpl.name_span.clone());
                self.need_spans.push(spans);
            }
        }
        self.check_distinct_cells(loc, &tpl, &cell_names)?;
        if tpl.cells.is_some() || cell_names.len() > 1 || cell_names.first() != Some(&tpl.name) {
            if let Some(first) = tpl.cells.as_ref().and_then(|c| c.first()) {
                let keys = first.iter().map(|c| c.key.clone()).collect();
                self.grid_keys.insert(tpl.name.clone(), keys);
            }
            self.grids.push((tpl.name.clone(), cell_names));
        }
        Ok(())
    }

    /// Refuses two cells of `tpl`'s own matrix that are the same run: equal resolved parameters
    /// (operational and presentation keys aside) and equal needs, as `lr = [0.1, 0.10]` or a
    /// method's key varied on a method that does not use it (reset to its default) give. Both
    /// would train alike, and a report would count them as two seeds.
    fn check_distinct_cells(
        &self,
        loc: &Locator,
        tpl: &Template,
        cells: &[String],
    ) -> Result<(), ConfigError> {
        if tpl.cells.is_none() {
            return Ok(());
        }
        let run_of = |name: &String| {
            let mut v = self.resolved[name].clone();
            let stage = self.stages.iter().find(|s| &s.name == name).expect("added");
            if let Some(obj) = v.as_object_mut() {
                let presentation = stage.params.presentation_keys();
                for key in StageParams::OPERATIONAL_KEYS.iter().chain(presentation) {
                    obj.remove(*key);
                }
            }
            (v, stage.needs.clone())
        };
        let runs: Vec<_> = cells.iter().map(run_of).collect();
        for (b, run) in runs.iter().enumerate() {
            let Some(a) = runs[..b].iter().position(|r| r == run) else {
                continue;
            };
            let segments = |i: usize| self.segments.get(&cells[i]).cloned().unwrap_or_default();
            let (sa, sb) = (segments(a), segments(b));
            let differing: Vec<_> = sa.iter().zip(&sb).filter(|(x, y)| x.1 != y.1).collect();
            let differ: Vec<String> = differing
                .iter()
                .map(|(x, y)| format!("`{} = {}` and `{}`", x.0, x.1, y.1))
                .collect();
            // The second cell's first value that differs is where the repetition is written.
            let span = differing
                .first()
                .map_or(tpl.span.clone(), |(_, y)| y.2.clone());
            return Err(loc.at(
                span,
                format!(
                    "stage `{}`: cells `{}` and `{}` are the same run: {} resolve to the same \
                     parameters (equal values, or a key their method does not use, reset to its \
                     default); list each value once, or split the grid by method",
                    tpl.name,
                    cells[a],
                    cells[b],
                    if differ.is_empty() {
                        "their matrix values".to_string()
                    } else {
                        format!("their {}", differ.join(", "))
                    }
                ),
            ));
        }
        Ok(())
    }

    /// The stages one cell (`own_name`, `params`) of `tpl` becomes when it follows the grid of
    /// its need `j`: a name and the followed grid cell for each cell of that grid it pairs with.
    fn following_variants(
        &self,
        loc: &Locator,
        tpl: &Template,
        j: usize,
        cell: &[CellValue],
        own_name: &str,
        params: &StageParams,
    ) -> Result<Vec<(String, Option<String>)>, ConfigError> {
        let grid = &tpl.needs[j].0;
        let (_, cells) = self.grids.iter().find(|(g, _)| g == grid).expect("found");
        let followed_kind = self.kinds[&cells[0]];
        // The grid's matrix keys that this stage sets itself (in its own matrix or its table),
        // and that mean the same in both kinds, pair cells: it follows only the cells of the
        // grid that hold its own values of them (students follow the replay store of their seed
        // and mixing; an evaluation's `seed` and `batch_size` are not its model's).
        let shared: Vec<&String> = self
            .grid_keys
            .get(grid)
            .into_iter()
            .flatten()
            .filter(|k| cell.iter().any(|c| &&c.key == k) || tpl.table.contains_key(k.as_str()))
            .filter(|k| same_meaning(tpl.kind, followed_kind, k))
            .collect();
        let own = serde_json::to_value(params).expect("parameters serialise");
        let paired: Vec<&String> = cells
            .iter()
            .filter(|c| {
                shared
                    .iter()
                    .all(|k| self.resolved[*c].get(k.as_str()) == own.get(k.as_str()))
            })
            .collect();
        if paired.is_empty() {
            let values: Vec<String> = shared
                .iter()
                .map(|k| {
                    format!(
                        "`{k} = {}`",
                        own.get(k.as_str()).unwrap_or(&serde_json::Value::Null)
                    )
                })
                .collect();
            return Err(loc.at(
                tpl.span.clone(),
                format!(
                    "stage `{own_name}` follows the grid `{grid}`, but no cell of `{grid}` has its {}",
                    values.join(", ")
                ),
            ));
        }
        Ok(paired
            .into_iter()
            .map(|c| {
                // The followed cell's name segments, less those this cell's name already has.
                let suffix: String = match self.segments.get(c) {
                    Some(segs) => segs
                        .iter()
                        .filter(|(k, _, _)| !shared.contains(&k))
                        .map(|(k, v, _)| format!(".{k}={v}"))
                        .collect(),
                    None => c.strip_prefix(grid.as_str()).unwrap_or(c).to_string(),
                };
                (format!("{own_name}{suffix}"), Some(c.clone()))
            })
            .collect())
    }

    /// A stage's needs with grids replaced by their cells (the followed one by the cell
    /// `followed`), and the span of the `needs` entry each came from.
    fn expanded_needs(
        &self,
        tpl: &Template,
        follow: Option<usize>,
        followed: Option<String>,
        in_grid: bool,
        params: &StageParams,
    ) -> (Vec<String>, Vec<Range<usize>>) {
        let mut needs = Vec::new();
        let mut spans = Vec::new();
        for (j, (need, nspan)) in tpl.needs.iter().enumerate() {
            let expanded: Vec<String> = if Some(j) == follow {
                vec![followed.clone().expect("following")]
            } else if let Some((_, cells)) = self.grids.iter().find(|(g, _)| g == need) {
                cells.clone()
            } else {
                vec![need.clone()]
            };
            for n in expanded {
                // A grid cell drops what its own parameters do not read (a `vanilla` cell of
                // a method grid, the label store its `off-ldl` cells read).
                if in_grid {
                    if let Some(k) = self.kinds.get(&n) {
                        if params.needs(k.produces()) == Multiplicity::None {
                            continue;
                        }
                    }
                }
                needs.push(n);
                spans.push(nspan.clone());
            }
        }
        (needs, spans)
    }

    /// Which of `tpl`'s needs is a grid this cell follows (it takes one stage of what the grid
    /// produces), if any; at most one.
    fn followed_grid(
        &self,
        loc: &Locator,
        tpl: &Template,
        shown: &str,
        params: &StageParams,
    ) -> Result<Option<usize>, ConfigError> {
        let mut follow: Option<usize> = None;
        for (j, (need, nspan)) in tpl.needs.iter().enumerate() {
            let Some((_, cells)) = self.grids.iter().find(|(g, _)| g == need) else {
                continue;
            };
            let produced = self.kinds[&cells[0]].produces();
            if params.needs(produced) == Multiplicity::One {
                if let Some(f) = follow {
                    return Err(loc.at(
                            nspan.clone(),
                            format!(
                                "stage `{shown}`: key `needs` names the grids `{}` and `{need}`, and takes one stage of each: it can follow only one grid (name single cells instead)",
                                tpl.needs[f].0
                            ),
                        ));
                }
                follow = Some(j);
            }
        }
        Ok(follow)
    }
}

/// Whether matrix key `key` of a grid of kind `followed` means the same in a stage of kind
/// `follower` that follows it, so that it pairs their cells: every key between stages of one
/// kind; between a student and a replay store, the keys of the batch stream they share.
fn same_meaning(follower: Kind, followed: Kind, key: &str) -> bool {
    const STREAM: [&str; 9] = [
        "seed",
        "batch_size",
        "augment",
        "crop_size",
        "crop_scale",
        "crop_ratio",
        "cutout",
        "mix",
        "teacher_mc",
    ];
    follower == followed
        || (follower == Kind::Train && followed == Kind::Replay && STREAM.contains(&key))
}

/// One cell's stage name and parameters: the template's keys with the cell's values, checked
/// and resolved.
fn cell_params(
    loc: &Locator,
    run: &RunSettings,
    tpl: &Template,
    cell: &[CellValue],
) -> Result<(String, StageParams), ConfigError> {
    let mut t = tpl.table.clone();
    let mut own_name = tpl.name.clone();
    let mut key_spans: HashMap<String, Range<usize>> = t
        .iter()
        .map(|(k, v)| (k.get_ref().to_string(), k.span().start..v.span().end))
        .collect();
    for c in cell {
        own_name.push_str(&format!(".{}={}", c.key, c.segment));
        key_spans.insert(c.key.clone(), c.value.span());
        t.insert(
            Spanned::new(c.value.span(), c.key.clone().into()),
            c.value.clone(),
        );
    }
    let shown = own_name.clone();
    let kind = tpl.kind;
    let span = tpl.span.clone();
    // Keys without a default (their kinds fill missing keys from `Default`).
    let missing = StageParams::required(kind)
        .iter()
        .find(|k| !t.contains_key(**k));
    let body = Spanned::new(span.clone(), DeValue::Table(t));
    let parsed = deserialize_params(kind, ValueDeserializer::from(body));
    let err = |e: toml::de::Error| {
        // A value of the wrong type: name its key (serde's message names only the types).
        let key = e
            .message()
            .starts_with("invalid")
            .then(|| e.span())
            .flatten()
            .and_then(|at| {
                key_spans
                    .iter()
                    .find(|(_, r)| r.start <= at.start && at.end <= r.end)
            })
            .map_or(String::new(), |(k, _)| format!("key `{k}`: "));
        loc.toml(
            e,
            &format!("stage `{shown}` (kind {kind}): {key}"),
            span.clone(),
        )
    };
    if let Some(key) = missing {
        // A misspelt key is the likelier cause of a missing one: its error names it.
        if let Err(e) = &parsed {
            if e.message().starts_with("unknown field") {
                return Err(err(e.clone()));
            }
        }
        return Err(loc.at(
            span,
            format!("stage `{shown}` (kind {kind}): missing key `{key}`"),
        ));
    }
    let mut params = parsed.map_err(err)?;
    if let Err((key, message)) = params.validate() {
        let at = key_spans.get(key).cloned().unwrap_or(span.clone());
        return Err(loc.at(
            at,
            format!("stage `{shown}` (kind {kind}): key `{key}` {message}"),
        ));
    }
    if let StageParams::Train(tp) = &params {
        if let Err(m) = tp.dtype.check(run.device) {
            let at = key_spans.get("dtype").cloned().unwrap_or(span.clone());
            return Err(loc.at(
                at,
                format!("stage `{shown}` (kind {kind}): key `dtype`: {m}"),
            ));
        }
    }
    params.resolve(run.seed);
    let base_dir = loc.file.parent().unwrap_or(Path::new("."));
    if let Err((key, message)) = read_files(&mut params, base_dir, &run.output, &own_name) {
        let at = key_spans.get(key).cloned().unwrap_or(span.clone());
        return Err(loc.at(
            at,
            format!("stage `{shown}` (kind {kind}): key `{key}`: {message}"),
        ));
    }
    Ok((own_name, params))
}

/// Reads what `params` name outside stages.toml into them (relative paths against `base_dir`):
/// an import's file hash; a prepare's source digest, handed down by a parent process or
/// computed, then squared with the stage's record under `output` (see
/// [`reconcile_with_record`]). On error, the key and what is wrong.
fn read_files(
    params: &mut StageParams,
    base_dir: &Path,
    output: &Path,
    stage: &str,
) -> Result<(), (&'static str, String)> {
    if let StageParams::Prepare(p) = params {
        if let Some(d) = given_digest(stage) {
            p.source_digest = d;
            reconcile_with_record(output, stage, p, None);
            return Ok(());
        }
    }
    let unreadable = params.resolve_files(base_dir)?;
    if let StageParams::Prepare(p) = params {
        reconcile_with_record(output, stage, p, unreadable);
    }
    Ok(())
}

/// The environment variable through which a `--jobs` parent or a Slurm script hands the
/// processes it starts the source digests it computed (a JSON object, prepare stage name →
/// digest), so they do not stat an ImageNet-sized tree again each. Only a prepare stage reads
/// its source, and it checks the digest against the files when it runs.
pub const SOURCE_DIGESTS_ENV: &str = "LDL_SOURCE_DIGESTS";

/// The digest of prepare stage `stage` handed down in [`SOURCE_DIGESTS_ENV`], if any.
fn given_digest(stage: &str) -> Option<String> {
    let text = std::env::var(SOURCE_DIGESTS_ENV).ok()?;
    let map: std::collections::BTreeMap<String, String> = serde_json::from_str(&text).ok()?;
    map.get(stage).filter(|d| d.starts_with("blake3:")).cloned()
}

impl Config {
    /// The source digests of this file's prepare stages, as [`SOURCE_DIGESTS_ENV`] hands them
    /// down (`None` when there are none).
    pub fn source_digests(&self) -> Option<String> {
        let map: std::collections::BTreeMap<&str, &str> = self
            .stages
            .iter()
            .filter_map(|s| match &s.params {
                StageParams::Prepare(p) if !p.source_digest.is_empty() => {
                    Some((s.name.as_str(), p.source_digest.as_str()))
                }
                _ => None,
            })
            .collect();
        (!map.is_empty()).then(|| serde_json::to_string(&map).expect("a map serialises"))
    }
}

/// Squares a prepare stage's source digest with its finished run's record
/// (`<output>/<stage>/stage.json`), so that its fingerprint stays what that run recorded where
/// the digest alone would change it for nothing:
///
/// - a run finished before source digests existed, with these very parameters, keeps being
///   identified by its `path` (upgrading reruns nothing; cleaning the stage switches it);
/// - a source that cannot be read here (`unreadable`: a login node without the compute nodes'
///   data, raw files deleted after packing) keeps the digest recorded for the same `path`;
///   otherwise it is identified by its `path`. Either way the stage fails if it must run.
fn reconcile_with_record(
    output: &Path,
    stage: &str,
    p: &mut stages::kinds::prepare::Params,
    unreadable: Option<String>,
) {
    let record = std::fs::read(output.join(stage).join("stage.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let recorded = record.as_ref().map(|r| &r["params"]);
    let same_place = recorded.is_some_and(|r| r["path"].as_str() == p.path.as_deref());
    let digest = recorded.and_then(|r| r["source_digest"].as_str());
    if let Some(why) = unreadable {
        match digest {
            Some(d) if same_place && !d.is_empty() => {
                p.source_digest = d.to_string();
                tracing::warn!(
                    "stage `{stage}`: its source cannot be read now ({why}); it keeps the digest \
                     its last run recorded for this `path`, and fails if it must run"
                );
            }
            _ => tracing::warn!(
                "stage `{stage}`: its source cannot be read now ({why}); it is identified by its \
                 `path` until it can, and fails if it must run"
            ),
        }
        return;
    }
    if p.source_digest.is_empty() || digest.is_some() || !same_place {
        return;
    }
    let by_path = stages::kinds::prepare::Params {
        source_digest: String::new(),
        ..p.clone()
    };
    let unchanged = recorded == Some(&serde_json::to_value(&by_path).expect("serialise"));
    if unchanged {
        *p = by_path;
        tracing::debug!(
            "stage `{stage}`: finished before source digests, so identified by its `path` \
             (`pipeline clean` it to switch to its digest, rerunning what follows)"
        );
    }
}

/// A stage table's parameters, as its kind reads them.
fn deserialize_params(kind: Kind, de: ValueDeserializer) -> Result<StageParams, toml::de::Error> {
    Ok(match kind {
        Kind::Prepare => StageParams::Prepare(Deserialize::deserialize(de)?),
        Kind::Import => StageParams::Import(Deserialize::deserialize(de)?),
        Kind::Train => StageParams::Train(Deserialize::deserialize(de)?),
        Kind::Label => StageParams::Label(Deserialize::deserialize(de)?),
        Kind::Replay => StageParams::Replay(Deserialize::deserialize(de)?),
        Kind::Evaluate => StageParams::Evaluate(Deserialize::deserialize(de)?),
        Kind::Report => StageParams::Report(Deserialize::deserialize(de)?),
    })
}

/// One key of a grid cell: its value and the name segment it gives.
#[derive(Clone)]
struct CellValue<'i> {
    key: String,
    value: Spanned<DeValue<'i>>,
    segment: String,
}

/// A `[[stage]]` table before grid expansion.
struct Template<'i> {
    name: String,
    name_span: Range<usize>,
    span: Range<usize>,
    kind: Kind,
    needs: Vec<(String, Range<usize>)>,
    table: DeTable<'i>,
    cells: Option<Vec<Vec<CellValue<'i>>>>,
}

/// The cells of `matrix = { key = [values…], … }`: the cartesian product, keys in alphabetical
/// order (the last varying fastest).
fn matrix_cells<'i>(
    loc: &Locator,
    stage: &str,
    m: Spanned<DeValue<'i>>,
) -> Result<Vec<Vec<CellValue<'i>>>, ConfigError> {
    let span = m.span();
    let DeValue::Table(t) = m.into_inner() else {
        return Err(loc.at(
            span,
            format!("stage `{stage}`: key `matrix` must be a table of key = [values], e.g. `matrix = {{ seed = [0, 1, 2] }}`"),
        ));
    };
    if t.is_empty() {
        return Err(loc.at(span, format!("stage `{stage}`: key `matrix` is empty")));
    }
    let mut cells: Vec<Vec<CellValue>> = vec![Vec::new()];
    for (k, v) in t.iter() {
        let key = k.get_ref().to_string();
        if ["name", "kind", "needs", "matrix"].contains(&key.as_str()) {
            return Err(loc.at(
                k.span(),
                format!("stage `{stage}`: key `matrix.{key}`: `{key}` cannot vary in a grid"),
            ));
        }
        let DeValue::Array(values) = v.get_ref() else {
            return Err(loc.at(
                v.span(),
                format!(
                    "stage `{stage}`: key `matrix.{key}` must be an array of values, found {}",
                    type_name(v.get_ref())
                ),
            ));
        };
        if values.is_empty() {
            return Err(loc.at(
                v.span(),
                format!(
                    "stage `{stage}`: key `matrix.{key}` is empty: a grid needs at least one value"
                ),
            ));
        }
        let mut segments: Vec<String> = values
            .iter()
            .map(|item| cell_segment(loc, stage, &key, item))
            .collect::<Result<_, _>>()?;
        name_tables_apart(&mut segments, values);
        for (i, item) in values.iter().enumerate() {
            let segment = &segments[i];
            if segment.is_empty()
                || !segment
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
            {
                return Err(loc.at(
                    item.span(),
                    format!("stage `{stage}`: key `matrix.{key}`: the value `{segment}` cannot be part of a stage name (letters, digits, `-`, `_`, `.`, `+`)"),
                ));
            }
            if segments[..i].contains(segment) {
                return Err(loc.at(
                    item.span(),
                    format!("stage `{stage}`: key `matrix.{key}` lists `{segment}` twice"),
                ));
            }
        }
        let mut next = Vec::with_capacity(cells.len() * values.len());
        for cell in &cells {
            for (item, segment) in values.iter().zip(&segments) {
                let mut c = cell.clone();
                c.push(CellValue {
                    key: key.clone(),
                    value: item.clone(),
                    segment: segment.clone(),
                });
                next.push(c);
            }
        }
        cells = next;
    }
    Ok(cells)
}

/// Tables of one `type` in a matrix list (`mix = [{ type = "cutmix", p = 1.0 }, { type =
/// "cutmix", p = 0.5 }]`) are named by their type and the keys that tell them apart, each as
/// `_<key><value>` (`cutmix_p1.0`, `cutmix_p0.5`; an array's values joined by `-`); a table
/// whose type is unique in the list keeps its type alone, so existing cells keep their names.
fn name_tables_apart(segments: &mut [String], values: &[Spanned<DeValue<'_>>]) {
    let table = |i: usize| match values[i].get_ref() {
        DeValue::Table(t) => Some(t),
        _ => None,
    };
    let bases = segments.to_vec();
    for (i, base) in bases.iter().enumerate() {
        let group: Vec<usize> = (0..bases.len())
            .filter(|&j| &bases[j] == base && table(j).is_some())
            .collect();
        if group.len() < 2 || table(i).is_none() {
            continue;
        }
        let mut keys: Vec<String> = group
            .iter()
            .flat_map(|&j| table(j).into_iter().flat_map(|t| t.iter()))
            .map(|(k, _)| k.get_ref().to_string())
            .filter(|k| k != "type")
            .collect();
        keys.sort();
        keys.dedup();
        let text = |j: usize, k: &str| {
            let t = table(j)?;
            let (_, v) = t.iter().find(|(name, _)| name.get_ref() == k)?;
            value_text(v.get_ref())
        };
        for k in keys {
            let first = text(group[0], &k);
            if group.iter().all(|&j| text(j, &k) == first) {
                continue;
            }
            if let Some(v) = text(i, &k) {
                segments[i].push_str(&format!("_{k}{v}"));
            }
        }
    }
}

/// A scalar or an array of scalars as text in a cell name (`0.5`, `150-180-210`).
fn value_text(v: &DeValue<'_>) -> Option<String> {
    Some(match v {
        DeValue::String(s) => s.to_string(),
        DeValue::Integer(i) => i.to_string(),
        DeValue::Float(f) => f.to_string(),
        DeValue::Boolean(b) => b.to_string(),
        DeValue::Array(a) => {
            let parts: Option<Vec<String>> = a.iter().map(|x| value_text(x.get_ref())).collect();
            parts?.join("-")
        }
        _ => return None,
    })
}

/// The name segment of one `matrix.KEY` value of `stage` (`seed=1`'s `1`; a table by its
/// `type`): a string, number or boolean (its characters are checked by [`matrix_cells`], after
/// [`name_tables_apart`]).
fn cell_segment(
    loc: &Locator,
    stage: &str,
    key: &str,
    item: &Spanned<DeValue<'_>>,
) -> Result<String, ConfigError> {
    let segment = match item.get_ref() {
        DeValue::String(s) => s.to_string(),
        DeValue::Integer(i) => i.to_string(),
        DeValue::Float(f) => f.to_string(),
        DeValue::Boolean(b) => b.to_string(),
        DeValue::Table(tt) => match tt.get("type").map(|t| t.get_ref()) {
            Some(DeValue::String(s)) => s.to_string(),
            _ => {
                return Err(loc.at(
                    item.span(),
                    format!("stage `{stage}`: key `matrix.{key}`: a table value needs a `type` string to name its cells"),
                ))
            }
        },
        other => {
            return Err(loc.at(
                item.span(),
                format!(
                    "stage `{stage}`: key `matrix.{key}`: {} cannot name a grid cell",
                    type_name(other)
                ),
            ))
        }
    };
    Ok(segment)
}

/// Every stage's needs name stages of this file, once each, of kinds it reads, as many of each
/// artifact as its kind wants; and the stages form no cycle.
fn validate_graph(
    loc: &Locator,
    stages: &[StageDecl],
    name_spans: &[Range<usize>],
    need_spans: &[Vec<Range<usize>>],
) -> Result<(), ConfigError> {
    let index: HashMap<&str, usize> = stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    for (i, s) in stages.iter().enumerate() {
        let counts = validate_needs(loc, stages, &index, s, &need_spans[i])?;
        validate_counts(loc, s, &counts, &name_spans[i])?;
    }
    if let Some(cycle) = find_cycle(stages, &index) {
        let names: Vec<&str> = cycle.iter().map(|&i| stages[i].name.as_str()).collect();
        return Err(loc.at(
            name_spans[cycle[0]].clone(),
            format!("key `needs`: stages form a cycle: {}", names.join(" → ")),
        ));
    }
    Ok(())
}

/// Imports of one recipe given one seed must be of one file: a report counts imports of one
/// recipe with seeds as seeds of one run, and would average two files as two seeds.
fn validate_import_seeds(
    loc: &Locator,
    stages: &[StageDecl],
    name_spans: &[Range<usize>],
) -> Result<(), ConfigError> {
    let mut seen: Vec<(Settings, u64, &str, usize)> = Vec::new();
    for (i, s) in stages.iter().enumerate() {
        let StageParams::Import(p) = &s.params else {
            continue;
        };
        let Some(seed) = p.seed else {
            continue;
        };
        let json = serde_json::to_value(&s.params).expect("parameters serialise");
        let recipe = s.params.settings(&json, &[]);
        let other = seen.iter().find(|(r, sd, file, _)| {
            *r == recipe && *sd == seed && *file != p.file_blake3.as_str()
        });
        if let Some((_, _, _, first)) = other {
            return Err(loc.at(
                name_spans[i].clone(),
                format!(
                    "stage `{}`: key `seed`: imports `{}` and `{}` give seed {seed} to two \
                     different files of one recipe, which a report would average as two \
                     seeds; give each file the seed it was trained with",
                    s.name, stages[*first].name, s.name
                ),
            ));
        }
        seen.push((recipe, seed, p.file_blake3.as_str(), i));
    }
    Ok(())
}

/// Checks each of `s`'s needs (at `spans`): a stage of this file, listed once, producing what
/// `s` reads; returns how many of each artifact they produce.
fn validate_needs(
    loc: &Locator,
    stages: &[StageDecl],
    index: &HashMap<&str, usize>,
    s: &StageDecl,
    spans: &[Range<usize>],
) -> Result<HashMap<Artifact, usize>, ConfigError> {
    let kind = s.params.kind();
    let mut counts: HashMap<Artifact, usize> = HashMap::new();
    for (j, need) in s.needs.iter().enumerate() {
        let span = spans[j].clone();
        let Some(&u) = index.get(need.as_str()) else {
            return Err(loc.at(
                span,
                format!(
                    "stage `{}`: key `needs` names `{need}`, which is not a stage in this file",
                    s.name
                ),
            ));
        };
        if s.needs[..j].contains(need) {
            return Err(loc.at(
                span,
                format!("stage `{}`: key `needs` lists `{need}` twice", s.name),
            ));
        }
        let produced = stages[u].params.kind().produces();
        if s.params.needs(produced) == Multiplicity::None {
            return Err(loc.at(
                span,
                format!(
                    "stage `{}` (kind {kind}): key `needs` names `{need}`, which produces {produced}; a {kind} stage {}",
                    s.name,
                    reads(&s.params)
                ),
            ));
        }
        if let Some(why) = sskd_teacher_mismatch(&s.params, &stages[u].params)
            .or_else(|| input_mismatch(&s.params, &stages[u].params))
            .or_else(|| label_source_mismatch(&s.params, &stages[u], stages, index))
        {
            return Err(loc.at(
                span,
                format!("stage `{}`: key `needs` names `{need}`, {why}", s.name),
            ));
        }
        *counts.entry(produced).or_default() += 1;
    }
    Ok(counts)
}

/// `s`'s needs give each artifact as many times as its kind wants (`counts`, from
/// [`validate_needs`]); an error points at the stage's name (`span`).
fn validate_counts(
    loc: &Locator,
    s: &StageDecl,
    counts: &HashMap<Artifact, usize>,
    span: &Range<usize>,
) -> Result<(), ConfigError> {
    for artifact in [
        Artifact::Dataset,
        Artifact::Model,
        Artifact::Labels,
        Artifact::Replay,
        Artifact::Metrics,
    ] {
        let n = counts.get(&artifact).copied().unwrap_or(0);
        let ok = match s.params.needs(artifact) {
            Multiplicity::One => n == 1,
            Multiplicity::OneOrMore => n >= 1,
            Multiplicity::None => n == 0,
        };
        if !ok {
            let want = match s.params.needs(artifact) {
                Multiplicity::One => "exactly one",
                _ => "at least one",
            };
            let kind = s.params.kind();
            return Err(loc.at(
                span.clone(),
                format!(
                    "stage `{}` (kind {kind}): key `needs` must name {want} stage producing {artifact}, found {n}",
                    s.name
                ),
            ));
        }
    }
    Ok(())
}

/// A cycle of needs, as stage indices from a stage back to itself, if there is one: a
/// depth-first search with colours (0 unseen, 1 on the path, 2 done).
fn find_cycle(stages: &[StageDecl], index: &HashMap<&str, usize>) -> Option<Vec<usize>> {
    fn visit(
        v: usize,
        stages: &[StageDecl],
        index: &HashMap<&str, usize>,
        colour: &mut [u8],
        path: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        colour[v] = 1;
        path.push(v);
        for need in &stages[v].needs {
            let u = index[need.as_str()];
            if colour[u] == 1 {
                let start = path.iter().position(|&x| x == u).expect("on path");
                let mut cycle = path[start..].to_vec();
                cycle.push(u);
                return Some(cycle);
            }
            if colour[u] == 0 {
                if let Some(c) = visit(u, stages, index, colour, path) {
                    return Some(c);
                }
            }
        }
        path.pop();
        colour[v] = 2;
        None
    }
    let mut colour = vec![0u8; stages.len()];
    let mut path = Vec::new();
    (0..stages.len()).find_map(|v| {
        if colour[v] == 0 {
            visit(v, stages, index, &mut colour, &mut path)
        } else {
            None
        }
    })
}

/// Why `needed` cannot be the teacher of an `sskd` student `p`: SSKD distils the teacher's
/// trained self-supervised head, which only an `sskd-head` stage has.
fn sskd_teacher_mismatch(p: &StageParams, needed: &StageParams) -> Option<String> {
    let StageParams::Train(p) = p else {
        return None;
    };
    if p.method != Method::Sskd || needed.kind().produces() != Artifact::Model {
        return None;
    }
    match needed {
        StageParams::Train(t) if t.method == Method::SskdHead => None,
        StageParams::Train(t) => Some(format!(
            "a teacher trained by `{}`: an `sskd` student needs the `sskd-head` stage that trained its teacher's self-supervised head (method = \"sskd-head\", needs = [teacher])",
            t.method.as_str()
        )),
        _ => Some(format!(
            "a {} stage: an `sskd` student needs the `sskd-head` stage that trained its teacher's self-supervised head (method = \"sskd-head\", needs = [teacher])",
            needed.kind()
        )),
    }
}

/// What stage `needed` lacks that `p` reads from it, found here rather than when `p` starts
/// (in a grid, after days of its upstream trainings): a validation split, a teacher's dropout,
/// a replay store's epochs.
fn input_mismatch(p: &StageParams, needed: &StageParams) -> Option<String> {
    match (p, needed) {
        (StageParams::Train(t), StageParams::Prepare(d))
            if (t.temperature_scaling || t.method.uses_ogr()) && d.val.unwrap_or(0) == 0 =>
        {
            let what = if t.temperature_scaling {
                "`temperature_scaling`".to_string()
            } else {
                format!("method `{}`", t.method.as_str())
            };
            Some(format!(
                "which holds out no validation split, which {what} needs (set its `val`)"
            ))
        }
        (StageParams::Train(t), StageParams::Train(teacher))
            if t.method.uses_teachers() && !t.replay && t.teacher_mc > 0 && teacher.dropout == 0.0 =>
        {
            Some(format!(
                "a teacher without dropout: teacher_mc = {} needs teachers trained with dropout (train it with `dropout = 0.2`)",
                t.teacher_mc
            ))
        }
        (StageParams::Evaluate(e), StageParams::Train(m)) if e.mc_samples > 0 && m.dropout == 0.0 => {
            Some(format!(
                "a model without dropout: mc_samples = {} averages Monte-Carlo dropout passes (train it with `dropout = 0.2`)",
                e.mc_samples
            ))
        }
        (StageParams::Train(t), StageParams::Replay(r)) if t.replay && r.epochs < t.epochs => Some(format!(
            "which stores {} epochs, fewer than this stage's {} (raise the replay stage's `epochs`)",
            r.epochs, t.epochs
        )),
        _ => None,
    }
}

/// What an offline student reads from label stage `label` that its store will not hold: a
/// `label_source` that is none of its sources, one teacher's labels from a store of several
/// without naming which, or the ensemble of a single teacher.
fn label_source_mismatch(
    p: &StageParams,
    label: &StageDecl,
    stages: &[StageDecl],
    index: &HashMap<&str, usize>,
) -> Option<String> {
    let (StageParams::Train(t), StageParams::Label(l)) = (p, &label.params) else {
        return None;
    };
    let teachers: Vec<&StageDecl> = label
        .needs
        .iter()
        .filter_map(|n| index.get(n.as_str()).map(|&i| &stages[i]))
        .filter(|d| d.params.kind().produces() == Artifact::Model)
        .collect();
    let names: Vec<&str> = teachers.iter().map(|d| d.name.as_str()).collect();
    let mut sources: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    if teachers.len() > 1 {
        sources.push("ensemble".into());
    }
    for d in &teachers {
        // A trained teacher has Monte-Carlo labels only with dropout; an imported one's
        // dropout is in its file, so its `.mc` source is taken on trust here.
        let dropout = match &d.params {
            StageParams::Train(tp) => tp.dropout > 0.0,
            _ => true,
        };
        if l.mc_samples > 0 && dropout {
            sources.push(format!("{}.mc", d.name));
        }
    }
    match (t.method, &t.label_source) {
        (Method::OffLdl, Some(src)) if !sources.contains(src) => Some(format!(
            "whose store will hold the sources {sources:?}, not the `label_source = \"{src}\"` this stage reads"
        )),
        (Method::OffLdl, None) if names.len() > 1 => Some(format!(
            "whose store will hold the labels of teachers {names:?}: name the one to learn from with `label_source`, or use `off-en-ldl` (their mean) or `off-mt-ldl` (all of them)"
        )),
        (Method::OffEnLdl, _) if names.len() < 2 => Some(format!(
            "whose store will hold no `ensemble` source: off-en-ldl needs a label stage of two or more teachers, it has {names:?}"
        )),
        _ => None,
    }
}

fn reads(p: &StageParams) -> String {
    let mut parts = Vec::new();
    for a in [
        Artifact::Dataset,
        Artifact::Model,
        Artifact::Labels,
        Artifact::Replay,
        Artifact::Metrics,
    ] {
        match p.needs(a) {
            Multiplicity::One => parts.push(format!("one stage producing {a}")),
            Multiplicity::OneOrMore => parts.push(format!("one or more stages producing {a}")),
            Multiplicity::None => {}
        }
    }
    if parts.is_empty() {
        "reads no other stage".into()
    } else {
        format!("reads {}", parts.join(" and "))
    }
}

impl Config {
    /// Stage indices in dependency order; ties keep file order.
    pub fn order(&self) -> Vec<usize> {
        let index: HashMap<&str, usize> = self
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let needs: Vec<Vec<usize>> = self
            .stages
            .iter()
            .map(|s| s.needs.iter().map(|n| index[n.as_str()]).collect())
            .collect();
        let (order, stuck) = stable_order(&needs);
        assert!(stuck.is_empty(), "validated acyclic");
        order
    }

    /// Index of the stage named `name`, which validation guarantees exists.
    pub fn index_of(&self, name: &str) -> usize {
        self.stages
            .iter()
            .position(|s| s.name == name)
            .expect("`needs` names were validated")
    }

    /// The stage named `name`.
    pub fn stage(&self, name: &str) -> Option<&StageDecl> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// The stages `names` name on a command line: a stage, or a grid (all its cells). An
    /// unknown name is an error that says what the file has.
    pub fn select(&self, names: &[String]) -> Result<Vec<String>, String> {
        let mut out: Vec<String> = Vec::new();
        for n in names {
            let cells = match self.grids.iter().find(|(g, _)| g == n) {
                Some((_, cells)) => cells.clone(),
                None if self.stage(n).is_some() => vec![n.clone()],
                None => {
                    let grids: Vec<&str> = self.grids.iter().map(|(g, _)| g.as_str()).collect();
                    let plain = self.stages.iter().filter(|s| s.grid.is_none());
                    let names: Vec<&str> = plain.map(|s| s.name.as_str()).collect();
                    return Err(format!(
                        "{}: no stage or grid named `{n}` (stages: {}; grids: {})",
                        self.path.display(),
                        names.join(", "),
                        if grids.is_empty() {
                            "none".into()
                        } else {
                            grids.join(", ")
                        }
                    ));
                }
            };
            for c in cells {
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every form of sbatch's `--time`, by hand.
    #[test]
    fn time_limits_in_seconds() {
        for (text, want) in [
            ("30", Some(1800)),
            ("30:15", Some(1815)),
            ("2:00:00", Some(7200)),
            ("1-0", Some(86_400)),
            ("1-2", Some(93_600)),
            ("1-2:30", Some(95_400)),
            ("1-2:30:05", Some(95_405)),
            ("infinite", None),
            ("1:2:3:4", None),
        ] {
            assert_eq!(time_limit_seconds(text), want, "{text}");
        }
    }

    /// Stages are declared in any order: a report before the grid of evaluations it reads, the
    /// evaluations (following a training grid cell by cell) before that grid, and a grid cell
    /// dropping a need declared after it. The stages stay in file order.
    #[test]
    fn stages_declared_in_any_order_expand_as_in_need_order() {
        let src = r#"
[run]
output = "out"

[[stage]]
name = "report"
kind = "report"
needs = ["eval"]

[[stage]]
name = "eval"
kind = "evaluate"
needs = ["data", "student"]

[[stage]]
name = "student"
kind = "train"
needs = ["data", "labels"]
matrix = { method = ["vanilla", "off-ldl"] }
model = "resnet8"

[[stage]]
name = "labels"
kind = "label"
needs = ["data", "teacher"]

[[stage]]
name = "teacher"
kind = "train"
needs = ["data"]
model = "resnet8"
method = "vanilla"

[[stage]]
name = "data"
kind = "prepare"
source = "synthetic"
"#;
        let dir = tempfile::tempdir().unwrap();
        let config = parse(&dir.path().join("s.toml"), src, None).unwrap();
        let names: Vec<&str> = config.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "report",
                "eval.method=vanilla",
                "eval.method=off-ldl",
                "student.method=vanilla",
                "student.method=off-ldl",
                "labels",
                "teacher",
                "data"
            ]
        );
        let needs = |n: &str| config.stage(n).unwrap().needs.clone();
        assert_eq!(
            needs("report"),
            ["eval.method=vanilla", "eval.method=off-ldl"]
        );
        assert_eq!(
            needs("eval.method=off-ldl"),
            ["data", "student.method=off-ldl"]
        );
        // The vanilla cell reads no label store; the off-ldl cell does.
        assert_eq!(needs("student.method=vanilla"), ["data"]);
        assert_eq!(needs("student.method=off-ldl"), ["data", "labels"]);
        let grids: Vec<&str> = config.grids.iter().map(|(g, _)| g.as_str()).collect();
        assert_eq!(grids, ["eval", "student"]);
    }
}
