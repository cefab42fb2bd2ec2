//! The stages of the LDL pipeline and the paper's science they are made of, in layers that
//! depend only downwards (checked by `tests/layers.rs`; docs/architecture.md has the picture):
//!
//! 1. [`label_store`]: the Parquet label store format (schema, writer, reader, validation);
//!    [`stream`]: a training's batch stream; [`replay_store`]: teachers' outputs on every
//!    batch of a stream, stored for replay;
//! 2. [`science`]: the paper's methods (supervision of a student), OGR, metrics, calibration
//!    and figures;
//! 3. [`artifacts`]: what flows between stages — a prepared dataset, a trained model, a label
//!    store, an evaluation — and the vocabulary of stage kinds;
//! 4. [`context`]: what the runner hands a stage;
//! 5. [`kinds`]: one module per stage kind (`prepare`, `import`, `train`, `label`, `evaluate`,
//!    `report`),
//!    each with its `Params` (its stages.toml keys) and a `run` function; kinds never import
//!    each other;
//! 6. [`registry`]: [`StageParams`], the parameters of any kind, which the runner validates,
//!    fingerprints and runs.
//!
//! Below them lie the `datasets` crate and the training `engine` crate; [`error`],
//! [`params`] and [`progress`] serve every layer. This crate knows nothing of the command line: the `pipeline`
//! binary parses stages.toml, orders stages and makes their outputs atomic.

pub mod artifacts;
pub mod context;
pub mod error;
pub mod kinds;
pub mod label_store;
pub mod params;
pub mod progress;
pub mod registry;
pub mod replay_store;
pub mod science;
pub mod stream;

pub use artifacts::{Artifact, Kind, Multiplicity};
pub use context::{Context, Input, Settings};
pub use error::{Result, StageError};
pub use registry::StageParams;

/// Version of the on-disk formats and of the fingerprint scheme; bump it when a stage's output
/// for the same parameters changes, so every stage re-runs.
pub const FORMAT_VERSION: u32 = 1;

/// The program version recorded in every output.
pub const PROGRAM_VERSION: &str = env!("CARGO_PKG_VERSION");
