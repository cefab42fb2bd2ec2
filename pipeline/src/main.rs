//! `pipeline`: runs a stages.toml — prepare → train teachers → label → train students →
//! evaluate → report — resumably, skipping what is up to date.

use pipeline::{bench, config, inspect, lock, runner};

use anyhow::Result;
use clap::{Parser, Subcommand};
use indicatif::MultiProgress;
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
    Run {
        /// The stages.toml to run.
        file: PathBuf,
        /// Output root (overrides `[run].output`).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Run only this stage (repeatable); its inputs must be up to date.
        #[arg(long, value_name = "STAGE")]
        only: Vec<String>,
        /// Re-run this stage even if it is up to date (repeatable).
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
        /// Print what would run, and why, without running anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show each stage of FILE: up to date, stale (and why), never run or incomplete.
    Status {
        /// The stages.toml to inspect.
        file: PathBuf,
        /// Output root (overrides `[run].output`).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Remove the outputs of STAGE, or of every stage of FILE.
    Clean {
        /// The stages.toml whose outputs to remove.
        file: PathBuf,
        /// The stage to clean (default: all).
        stage: Option<String>,
        /// Output root (overrides `[run].output`).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Show a label store's schema, metadata and first rows, or a packed split's summary.
    Inspect(inspect::InspectArgs),
    /// Measure throughput (to compare with the PyTorch scripts in benches/).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
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
    // Option ids from the `mi_option_e` enum of mimalloc.h (v2, vendored by libmimalloc-sys
    // 0.1.49, which exports no constants for them): arena_eager_commit = 4, purge_delay = 15.
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

    let result: Result<()> = match &cli.command {
        Command::Run {
            file,
            output,
            only,
            force,
            dry_run,
        } => {
            let config = match load(file, output.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            configure_threads(config.run.threads);
            (|| {
                let _lock = lock::OutputLock::acquire(&config.run.output)?;
                let t0 = std::time::Instant::now();
                let opts = runner::RunOptions {
                    only: only.clone(),
                    force: force.clone(),
                    dry_run: *dry_run,
                };
                let summary = runner::run(&config, &opts, progress.clone())?;
                if !dry_run {
                    tracing::info!(
                        "{} stage(s) run, {} up to date, in {:.1}s; outputs in {}",
                        summary.ran.len(),
                        summary.skipped.len(),
                        t0.elapsed().as_secs_f64(),
                        config.run.output.display()
                    );
                }
                Ok(())
            })()
        }
        Command::Status { file, output } => {
            let config = match load(file, output.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let states = runner::status(&config);
            let width = states.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
            for (name, state) in &states {
                let kind = config.stage(name).expect("listed").params.kind();
                println!("{name:width$}  {:<8}  {state}", kind.as_str());
            }
            // One line per grid: how many of its cells are done.
            for (grid, cells) in &config.grids {
                let (mut done, mut partial, mut stale) = (0, 0, 0);
                for (name, state) in &states {
                    if cells.contains(name) {
                        match state {
                            runner::StageState::UpToDate => done += 1,
                            runner::StageState::Incomplete(_) => partial += 1,
                            runner::StageState::Stale(_) => stale += 1,
                            runner::StageState::NeverRun => {}
                        }
                    }
                }
                let n = cells.len();
                println!(
                    "grid {grid}: {n} cells, {done} up to date, {partial} incomplete, {stale} stale, {} never run",
                    n - done - partial - stale
                );
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
            (|| {
                let _lock = lock::OutputLock::acquire(&config.run.output)?;
                for removed in runner::clean(&config, stage.as_deref())? {
                    println!("removed {removed}");
                }
                Ok(())
            })()
        }
        Command::Inspect(args) => inspect::inspect(args),
        Command::Bench { what } => match what {
            BenchCommand::Loader(args) => bench::loader(args),
            BenchCommand::Train(args) => bench::train(args),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(p) = &progress {
                let _ = p.clear();
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
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
