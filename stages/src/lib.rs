//! The stages of the LDL pipeline and everything they are made of: models, losses, the
//! optimiser and schedules, metrics and the Parquet label store.
//!
//! Each stage kind lives in its own module (`prepare`, `train`, `label`, `evaluate`, `report`)
//! with a `Params` struct (its stages.toml keys) and a `run` function that reads its inputs'
//! folders and writes its outputs into the folder the runner gives it. This crate knows nothing
//! of the command line: the `pipeline` binary parses stages.toml, orders stages and makes their
//! outputs atomic.

pub mod calibration;
pub mod checkpoint;
pub mod context;
pub mod device;
pub mod error;
pub mod evaluate;
pub mod feed;
pub mod figures;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod inference;
pub mod label;
pub mod label_store;
pub mod losses;
pub mod method;
pub mod metrics;
pub mod models;
pub mod optim;
pub mod prepare;
pub mod profile;
pub mod report;
pub mod schedule;
pub mod stage;
pub mod train;

pub use context::{Context, Input};
pub use error::{Result, StageError};
pub use stage::{Artifact, Kind, Multiplicity, StageParams};

/// Version of the on-disk formats and of the fingerprint scheme; bump it when a stage's output
/// for the same parameters changes, so every stage re-runs.
pub const FORMAT_VERSION: u32 = 1;

/// The program version recorded in every output.
pub const PROGRAM_VERSION: &str = env!("CARGO_PKG_VERSION");
