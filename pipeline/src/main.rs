//! `pipeline`: runs a stages.toml — prepare → train teachers → label → train students →
//! evaluate → report — resumably, skipping what is up to date.

use pipeline::{bench, config, export, inspect, runner};

use anyhow::Result;
use clap::{Parser, Subcommand};
use indicatif::MultiProgress;
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

// Training allocates and frees many tensor-sized buffers per step; glibc's malloc hands large
// ones back to the kernel each time (a quarter of CPU training time went to page faults),
// mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Label distribution learning pipeline: train teachers, store their soft labels, train and
/// evaluate students, and report accuracy and calibration.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// More logging (-v: debug, -vv: trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Less logging: warnings and errors only, no progress bars.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the stages of FILE in dependency order, skipping those that are up to date.
    Run(RunArgs),
    /// Show each stage of FILE: up to date, stale (and why), never run, incomplete (how far) or
    /// running (by which process, how far), then each grid's cells counted by state.
    Status {
        /// The stages.toml to inspect.
        file: PathBuf,
        /// Output root (overrides `[run].output`).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Show only this stage or grid (repeatable).
        #[arg(long, value_name = "STAGE|GRID")]
        only: Vec<String>,
        /// Exit with status 1 when a stage shown is not up to date (0 when all are), for
        /// scripts, as `git diff --exit-code`.
        #[arg(long)]
        exit_code: bool,
    },
    /// Remove the outputs of STAGE (a stage, or a grid's cells), or of every stage of FILE.
    Clean {
        /// The stages.toml whose outputs to remove.
        file: PathBuf,
        /// The stage or grid to clean (default: all).
        stage: Option<String>,
        /// Output root (overrides `[run].output`).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Show a label store's schema, metadata and first rows, an evaluation's predictions, a
    /// packed split's summary, or what a model checkpoint holds and how to import it.
    Inspect(inspect::InspectArgs),
    /// Write a trained or imported model's weights for PyTorch: a `.pth` that `torch.load`
    /// reads, or a `.safetensors` file, under torchvision's or kuangliu's names.
    Export(export::ExportArgs),
    /// Submit the stages of FILE that are not up to date to a cluster (`--slurm`): a grid as
    /// one job array, chained by the DAG's dependencies.
    Submit(SubmitArgs),
    /// Measure throughput (to compare with the PyTorch scripts in benches/).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

/// `pipeline submit`.
#[derive(clap::Args, Debug)]
struct SubmitArgs {
    /// The stages.toml to submit.
    file: PathBuf,
    /// Submit to Slurm (`sbatch`); the only scheduler so far, and required.
    #[arg(long, required = true)]
    slurm: bool,
    /// Output root (overrides `[run].output`); it must be on a file system the nodes share.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Print the sbatch scripts, submit nothing.
    #[arg(long)]
    dry_run: bool,
    /// `--partition` of every job (over `[slurm]`).
    #[arg(long)]
    partition: Option<String>,
    /// `--account` of every job.
    #[arg(long)]
    account: Option<String>,
    /// `--time` of every job.
    #[arg(long)]
    time: Option<String>,
    /// `--gpus` of every job.
    #[arg(long)]
    gpus: Option<u32>,
    /// `--cpus-per-task` of every job.
    #[arg(long)]
    cpus: Option<u32>,
    /// `--mem` of every job.
    #[arg(long)]
    mem: Option<String>,
    /// At most this many tasks of each array at once.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    throttle: Option<u32>,
}

/// `pipeline run`.
#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The stages.toml to run.
    file: PathBuf,
    /// Output root (overrides `[run].output`).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Run only this stage, or a grid's cells (repeatable); its inputs must be up to date.
    #[arg(long, value_name = "STAGE")]
    only: Vec<String>,
    /// Re-run this stage, or a grid's cells, even if up to date (repeatable).
    #[arg(long, value_name = "STAGE")]
    force: Vec<String>,
    /// Print what would run, and why, without running anything.
    #[arg(long)]
    dry_run: bool,
    /// Run up to N ready stages at once, each in its own child process (default 1: one after
    /// another in this process; with --devices: one per device slot).
    #[arg(long, short = 'j', value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    jobs: Option<u64>,
    /// CUDA devices to hand out to the children, one each (`--devices 0,1,2,3`); needs
    /// `[run].device = "cuda"`.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    devices: Vec<usize>,
    /// Children per device of --devices.
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    per_device: u64,
    /// With --jobs: after a failure, still start the stages that do not depend on it.
    #[arg(long)]
    keep_going: bool,
    /// CPU threads (overrides `[run].threads`; with --jobs, per child).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    threads: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Images/s of the batch loader (crop, flip, normalise, CutMix) on CIFAR-shaped data.
    Loader(bench::LoaderArgs),
    /// Images/s of training steps (forward, backward, SGD) on random CIFAR-shaped batches.
    Train(bench::TrainArgs),
}

/// Log lines are written through the progress bars, so bars and logs never garble each other.
#[derive(Clone)]
struct LogWriter(Option<MultiProgress>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.0 {
            Some(m) => m.suspend(|| std::io::stderr().write(buf)),
            None => std::io::stderr().write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// A command line that names what the file does not have: exit status 2, like a bad file.
fn usage_error(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

fn load(file: &Path, output: Option<&Path>) -> Result<config::Config, ExitCode> {
    config::load(file, output).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

/// Keeps freed memory in mimalloc's arenas instead of returning it to the kernel: a training step
/// frees and reallocates the same tensor-sized buffers, and re-faulting their pages cost ~25% of
/// CPU training time.
fn keep_freed_memory() {
    // Option ids from the `mi_option_e` enum of mimalloc.h (v3, the one libmimalloc-sys 0.1.49
    // builds without its `v2` feature, and v2 alike; the crate exports no constants for them):
    // arena_eager_commit = 4, purge_delay = 15.
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: plain option setters, called before any other thread exists.
    unsafe {
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 1);
        libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let progress = init_logging(&cli);
    let result: Result<()> = match &cli.command {
        Command::Run(args) => return run(args, progress),
        Command::Status {
            file,
            output,
            only,
            exit_code,
        } => {
            let config = match load(file, output.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let shown = match config.select(only) {
                Ok(shown) => shown,
                Err(e) => return usage_error(&e),
            };
            let all_done = status(&config, &shown);
            if *exit_code && !all_done {
                return ExitCode::from(1);
            }
            Ok(())
        }
        Command::Clean {
            file,
            stage,
            output,
        } => {
            let config = match load(file, output.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let stages = match stage
                .as_ref()
                .map(|s| config.select(std::slice::from_ref(s)))
            {
                Some(Err(e)) => return usage_error(&e),
                Some(Ok(cells)) => cells.into_iter().map(Some).collect(),
                None => vec![None],
            };
            (|| {
                for stage in &stages {
                    for removed in runner::clean(&config, stage.as_deref())? {
                        println!("removed {removed}");
                    }
                }
                Ok(())
            })()
        }
        Command::Inspect(args) => inspect::inspect(args),
        Command::Export(args) => export::export(args),
        Command::Submit(args) => {
            let config = match load(&args.file, args.output.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            submit(args, &config)
        }
        Command::Bench { what } => match what {
            BenchCommand::Loader(args) => bench::loader(args),
            BenchCommand::Train(args) => bench::train(args),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Output piped into a reader that stopped reading (`pipeline inspect … | head`).
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => report_error(&e, &progress),
    }
}

/// Progress bars when stderr is a terminal (and not `--quiet`), and the log's level and writer
/// (through the bars, so log lines do not tear them).
fn init_logging(cli: &Cli) -> Option<MultiProgress> {
    let progress = (!cli.quiet && std::io::stderr().is_terminal()).then(MultiProgress::new);
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => tracing::Level::WARN,
        (false, 0) => tracing::Level::INFO,
        (false, 1) => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    let writer = LogWriter(progress.clone());
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(move || writer.clone())
        .init();
    progress
}

/// `pipeline status`: each stage's kind and state (with its Slurm job where one is queued for
/// it; running, by which process and how far, where one holds its claim), then one line per
/// grid counting its cells by state; only the stages `shown` when any are named. Returns
/// whether every stage shown is up to date.
fn status(config: &config::Config, shown: &[String]) -> bool {
    let mut states = runner::status(config);
    if !shown.is_empty() {
        states.retain(|(name, _)| shown.contains(name));
    }
    // A running stage shows how far it is when it runs the file's parameters now, else what
    // its output is (stale: a run of the old parameters, or one that has not checkpointed yet).
    let fps = runner::fingerprints(config);
    let running: BTreeMap<&str, String> = states
        .iter()
        .filter_map(|(name, state)| {
            let holder = pipeline::claim::StageClaim::held(&config.run.output, name)?;
            let fp = &fps[config.index_of(name)];
            let text = match (runner::progress(config, name, fp), state) {
                (Some(done), _) => format!("running ({holder}): {done}"),
                (None, runner::StageState::Stale(_) | runner::StageState::UpToDate) => {
                    format!("running ({holder}); {state}")
                }
                (None, _) => format!("running ({holder})"),
            };
            Some((name.as_str(), text))
        })
        .collect();
    let width = states.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let submitted = pipeline::slurm::submitted(config);
    let ids: Vec<&str> = submitted.stages.values().map(String::as_str).collect();
    let queue = pipeline::slurm::queue_states(&ids).unwrap_or_default();
    for (name, state) in &states {
        let kind = config.stage(name).expect("listed").params.kind();
        let job = match (state, submitted.stages.get(name)) {
            (runner::StageState::UpToDate, _) | (_, None) => String::new(),
            (_, Some(id)) => match queue.get(id) {
                Some(st) if !pipeline::slurm::can_still_run(st) => format!(
                    "  (Slurm job {id}: {st}: never starts, an upstream job failed; submitting \
                     again replaces it)"
                ),
                st => format!(
                    "  (Slurm job {id}: {})",
                    st.map_or("not queued", String::as_str)
                ),
            },
        };
        let state = running
            .get(name.as_str())
            .map_or_else(|| state.to_string(), String::clone);
        println!("{name:width$}  {:<8}  {state}{job}", kind.as_str());
    }
    for (grid, cells) in &config.grids {
        if !shown.is_empty() && !cells.iter().any(|c| shown.contains(c)) {
            continue;
        }
        let (mut done, mut partial, mut stale, mut busy) = (0, 0, 0, 0);
        for (name, state) in &states {
            if running.contains_key(name.as_str()) && cells.contains(name) {
                busy += 1;
            } else if cells.contains(name) {
                match state {
                    runner::StageState::UpToDate => done += 1,
                    runner::StageState::Incomplete(_) => partial += 1,
                    runner::StageState::Stale(_) => stale += 1,
                    runner::StageState::NeverRun => {}
                }
            }
        }
        let n = states
            .iter()
            .filter(|(name, _)| cells.contains(name))
            .count();
        let never = n - done - partial - stale - busy;
        let busy = match busy {
            0 => String::new(),
            b => format!("{b} running, "),
        };
        println!(
            "grid {grid}: {n} cell{}, {busy}{done} up to date, {partial} incomplete, {stale} stale, {never} never run",
            if n == 1 { "" } else { "s" },
        );
    }
    states
        .iter()
        .all(|(_, s)| matches!(s, runner::StageState::UpToDate))
}

/// `pipeline submit`: the file's unfinished stages as Slurm jobs, the flags over `[slurm]`.
fn submit(args: &SubmitArgs, config: &config::Config) -> Result<()> {
    let opts = pipeline::slurm::SubmitOptions {
        dry_run: args.dry_run,
        overrides: config::SlurmResources {
            partition: args.partition.clone(),
            account: args.account.clone(),
            time: args.time.clone(),
            gpus: args.gpus,
            cpus: args.cpus,
            mem: args.mem.clone(),
            throttle: args.throttle,
            ..Default::default()
        },
    };
    pipeline::slurm::submit(config, &opts).map(|jobs| {
        if jobs.is_empty() {
            println!("nothing to submit: every stage is up to date or queued");
        } else if !args.dry_run {
            println!("{} stage(s) submitted", jobs.len());
        }
    })
}

/// Exit status of a run stopped on request (a signal) with its work checkpointed: BSD's
/// EX_TEMPFAIL, "try again later". A Slurm job requeues itself on it.
const EXIT_INTERRUPTED: u8 = pipeline::jobs::EXIT_INTERRUPTED as u8;

/// Whether `--devices` can be handed out: the file runs on CUDA and the devices exist.
fn devices_fit(config: &config::Config, devices: &[usize]) -> Result<(), String> {
    if devices.is_empty() {
        return Ok(());
    }
    match config.run.device {
        engine::device::DeviceSpec::Cpu => {
            return Err(format!(
            "--devices hands out CUDA devices, but {} runs on the CPU: set [run].device = \"cuda\"",
            config.path.display()
        ))
        }
        // Each child sees only its own device, as its CUDA device 0.
        engine::device::DeviceSpec::Cuda(n) if n > 0 => {
            return Err(format!(
                "--devices gives each child one device, its `cuda:0`, but {} asks for cuda:{n}: \
                 set [run].device = \"cuda\" and list the devices in --devices",
                config.path.display()
            ))
        }
        engine::device::DeviceSpec::Cuda(_) => {}
    }
    pipeline::jobs::check_devices(devices).map_err(|e| format!("{e:#}"))
}

/// `pipeline run`: in this process, or with `--jobs`/`--devices` in children.
fn run(args: &RunArgs, progress: Option<MultiProgress>) -> ExitCode {
    let mut config = match load(&args.file, args.output.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (only, force) = match (config.select(&args.only), config.select(&args.force)) {
        (Ok(only), Ok(force)) => (only, force),
        (Err(e), _) | (_, Err(e)) => return usage_error(&e),
    };
    if let Some(t) = args.threads {
        config.run.threads = t as usize;
        config.run.threads_set = true;
    }
    // Flags of the parallel mode are refused without it, not ignored.
    if args.devices.is_empty() && args.per_device != 1 {
        return usage_error(
            "--per-device counts children per device of --devices, which is not given",
        );
    }
    if args.keep_going && args.jobs.is_none_or(|j| j < 2) && args.devices.is_empty() {
        return usage_error(
            "--keep-going applies to children run with --jobs N (N > 1) or --devices; without \
             them the run stops at its first failure",
        );
    }
    // Checked before a dry run too: it says what the real run would do.
    if let Err(message) = devices_fit(&config, &args.devices) {
        return usage_error(&message);
    }
    let slots = args.devices.len() * args.per_device as usize;
    let jobs = args.jobs.map_or(slots.max(1), |j| j as usize);
    let parallel = (jobs > 1 || !args.devices.is_empty()) && !args.dry_run;
    let threads = if config.run.threads_set || !parallel {
        config.run.threads
    } else {
        (config.run.threads / jobs).max(1)
    };
    configure_threads(threads);
    pipeline::jobs::follow_parent();
    if let Ok(job) = std::env::var("SLURM_JOB_ID") {
        tracing::info!(
            "Slurm job {job}, restart {}",
            std::env::var("SLURM_RESTART_COUNT").unwrap_or_else(|_| "0".into())
        );
    }
    let result = (|| -> Result<ExitCode> {
        let t0 = std::time::Instant::now();
        let opts = runner::RunOptions {
            only: only.clone(),
            force: force.clone(),
            dry_run: args.dry_run,
            stop: stop_on_signals()?,
        };
        let (summary, code) = if parallel {
            let job_opts = pipeline::jobs::JobOptions {
                jobs,
                devices: args.devices.clone(),
                per_device: args.per_device as usize,
                keep_going: args.keep_going,
                threads,
            };
            run_children(&config, &opts, &job_opts, progress.clone())?
        } else {
            run_here(&config, &opts, progress.clone())?
        };
        if args.dry_run {
            println!("{}", dry_run_summary(&config, &summary.ran));
        } else {
            tracing::info!(
                "{} stage(s) run, {} up to date, {} completed by other processes, in {:.1}s; outputs in {}",
                summary.ran.len(),
                summary.skipped.len(),
                summary.elsewhere.len(),
                t0.elapsed().as_secs_f64(),
                config.run.output.display()
            );
        }
        Ok(code)
    })();
    match result {
        Ok(code) => code,
        Err(e) => report_error(&e, &progress),
    }
}

/// `pipeline run` in this process. A child of `--jobs` that ran nothing (another process
/// completed its stage) says so to its parent with [`pipeline::jobs::EXIT_DONE_ELSEWHERE`].
fn run_here(
    config: &pipeline::config::Config,
    opts: &runner::RunOptions,
    progress: Option<MultiProgress>,
) -> Result<(runner::RunSummary, ExitCode)> {
    let summary = runner::run(config, opts, progress)?;
    let child = std::env::var_os(pipeline::jobs::CHILD_ENV).is_some();
    let code = if child && summary.ran.is_empty() && !opts.dry_run {
        ExitCode::from(pipeline::jobs::EXIT_DONE_ELSEWHERE as u8)
    } else {
        ExitCode::SUCCESS
    };
    Ok((summary, code))
}

/// `pipeline run` in children (`--jobs`, `--devices`): each failure reported with its log; a
/// stop on request asks Slurm to requeue this job.
fn run_children(
    config: &pipeline::config::Config,
    opts: &runner::RunOptions,
    jobs: &pipeline::jobs::JobOptions,
    progress: Option<MultiProgress>,
) -> Result<(runner::RunSummary, ExitCode)> {
    let out = pipeline::jobs::run(config, opts, jobs, progress)?;
    for f in &out.failed {
        eprintln!(
            "error: stage `{}` failed ({}); its log: {}",
            f.stage,
            f.status
                .map_or("killed by a signal".to_string(), |c| format!(
                    "exit status {c}"
                )),
            f.log.display()
        );
    }
    let code = if !out.failed.is_empty() {
        ExitCode::FAILURE
    } else if out.interrupted {
        eprintln!("stopped on request; the next run resumes where the stages stopped");
        pipeline::slurm::requeue_self();
        ExitCode::from(EXIT_INTERRUPTED)
    } else {
        ExitCode::SUCCESS
    };
    Ok((out.run, code))
}

/// Prints `e` and returns the exit status it calls for: [`EXIT_INTERRUPTED`] for a stop on
/// request, 1 otherwise.
fn report_error(e: &anyhow::Error, progress: &Option<MultiProgress>) -> ExitCode {
    if let Some(p) = progress {
        let _ = p.clear();
    }
    let interrupted = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<stages::StageError>(),
            Some(stages::StageError::Interrupted(_))
        )
    });
    if interrupted {
        eprintln!("stopped: {}", chain_text(e));
        pipeline::slurm::requeue_self();
        return ExitCode::from(EXIT_INTERRUPTED);
    }
    if e.downcast_ref::<pipeline::UsageError>().is_some() {
        return usage_error(&chain_text(e));
    }
    eprintln!("error: {}", chain_text(e));
    ExitCode::FAILURE
}

/// The last line of a dry run: how many stages would run, by kind
/// (`would run 38 stages: 1 prepare, 19 train, 1 label, 16 evaluate, 1 report`).
fn dry_run_summary(config: &config::Config, would_run: &[String]) -> String {
    let count = |kind: stages::Kind| {
        would_run
            .iter()
            .filter(|n| config.stage(n).is_some_and(|s| s.params.kind() == kind))
            .count()
    };
    let by_kind: Vec<String> = stages::Kind::ALL
        .into_iter()
        .map(|k| (k, count(k)))
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{n} {}", k.as_str()))
        .collect();
    match would_run.len() {
        0 => "would run nothing: every stage is up to date".into(),
        n => format!("would run {n} stages: {}", by_kind.join(", ")),
    }
}

/// `e` and its causes, joined by ": " as `{:#}` does, but each cause only once: an I/O error
/// names its path and its OS error, which is also its source.
fn chain_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// The flag SIGTERM, SIGUSR2 (Slurm's warning before a time limit or preemption; USR1 is NCCL's)
/// and SIGINT set: the run stops at the next step boundary. A second signal ends the process at
/// once, with the status a shell gives a signalled process (128 + 15, 12 or 2), leaving partial
/// folders to resume from as after a kill; but a SIGTERM within [`TERM_GRACE_NS`] of the first
/// stop is the same stop delivered twice (a scheduler signals every process of a job, and a
/// `--jobs` parent passes its own on), not a second one.
fn stop_on_signals() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in pipeline::jobs::STOP_SIGNALS {
        let stop = stop.clone();
        // SAFETY: the handler only reads the monotonic clock (clock_gettime), touches atomics
        // and calls _exit: all async-signal-safe.
        unsafe { signal_hook::low_level::register(sig, move || on_stop_signal(&stop, sig)) }?;
    }
    pipeline::slurm::requeue_on_usr2()?;
    Ok(stop)
}

/// When the first stop signal came (monotonic nanoseconds; 0: none yet).
static FIRST_STOP_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How long after the first stop a SIGTERM is taken for the same stop.
const TERM_GRACE_NS: u64 = 2_000_000_000;

/// A stop signal: the first sets `stop`; a later one ends the process at once, but for a
/// SIGTERM within the grace.
fn on_stop_signal(stop: &std::sync::atomic::AtomicBool, sig: i32) {
    use std::sync::atomic::Ordering::SeqCst;
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let now = (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
        .max(1);
    match FIRST_STOP_NS.compare_exchange(0, now, SeqCst, SeqCst) {
        Ok(_) => stop.store(true, SeqCst),
        Err(first) if ends_at_once(sig, now.saturating_sub(first)) => {
            signal_hook::low_level::exit(128 + sig)
        }
        Err(_) => {}
    }
}

/// Whether stop signal `sig`, `since_first` nanoseconds after the first stop, ends the process.
fn ends_at_once(sig: i32, since_first: u64) -> bool {
    sig != signal_hook::consts::SIGTERM || since_first >= TERM_GRACE_NS
}

/// Sizes the thread pools: rayon's (data loading, decoding) and candle's CPU kernels, which read
/// `RAYON_NUM_THREADS`.
fn configure_threads(threads: usize) {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
}

#[cfg(test)]
mod tests {
    use super::*;
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR2};

    /// A SIGTERM within two seconds of the first stop is that stop again; after, or any other
    /// stop signal, a second one.
    #[test]
    fn a_sigterm_within_the_grace_is_the_same_stop() {
        assert!(!ends_at_once(SIGTERM, 0));
        assert!(!ends_at_once(SIGTERM, 1_999_999_999));
        assert!(ends_at_once(SIGTERM, 2_000_000_000));
        assert!(ends_at_once(SIGINT, 0) && ends_at_once(SIGUSR2, 5));
    }
}
