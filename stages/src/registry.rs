//! The registry of stage kinds: [`StageParams`], the parameters of a stage of any kind, with
//! what the runner asks of every kind — its inputs, its range checks, its resolution against
//! the run's defaults, and running it.

use crate::artifacts::{Artifact, Kind, Multiplicity};
use crate::context::Context;
use crate::error::Result;
use crate::kinds::{evaluate, label, prepare, report, train};
use crate::params::{ParamDefaults, RangeError};
use serde::Serialize;

/// The parameters of a stage, by kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum StageParams {
    /// `kind = "prepare"`.
    Prepare(prepare::Params),
    /// `kind = "train"`.
    Train(train::Params),
    /// `kind = "label"`.
    Label(label::Params),
    /// `kind = "evaluate"`.
    Evaluate(evaluate::Params),
    /// `kind = "report"`.
    Report(report::Params),
}

impl StageParams {
    /// The stage's kind.
    pub fn kind(&self) -> Kind {
        match self {
            StageParams::Prepare(_) => Kind::Prepare,
            StageParams::Train(_) => Kind::Train,
            StageParams::Label(_) => Kind::Label,
            StageParams::Evaluate(_) => Kind::Evaluate,
            StageParams::Report(_) => Kind::Report,
        }
    }

    /// How many inputs of each artifact the stage reads, given its parameters.
    pub fn needs(&self, artifact: Artifact) -> Multiplicity {
        use Artifact::*;
        use Multiplicity as M;
        match (self, artifact) {
            (StageParams::Prepare(_), _) => M::None,
            (StageParams::Train(_), Dataset) => M::One,
            (StageParams::Train(p), Labels) if p.method.reads_labels() => M::One,
            (StageParams::Train(p), Model) if p.method.uses_teachers() => M::OneOrMore,
            (StageParams::Label(_), Dataset) => M::One,
            (StageParams::Label(_), Model) => M::OneOrMore,
            (StageParams::Evaluate(_), Dataset | Model) => M::One,
            (StageParams::Report(_), Metrics) => M::OneOrMore,
            _ => M::None,
        }
    }

    /// Keys that change how a stage runs but not what it produces; the runner leaves them out of
    /// the fingerprint, so checkpointing can be changed on a half-done run without restarting it.
    pub const OPERATIONAL_KEYS: &'static [&'static str] =
        &["checkpoint_every", "keep_checkpoints", "prefetch"];

    /// Checks value ranges that the types alone do not; on error returns the offending key and
    /// what was expected, so the config loader can point at it before anything runs.
    pub fn validate(&self) -> std::result::Result<(), RangeError> {
        match self {
            StageParams::Prepare(p) => p.validate(),
            StageParams::Train(p) => p.validate(),
            StageParams::Label(p) => p.validate(),
            StageParams::Evaluate(p) => p.validate(),
            StageParams::Report(_) => Ok(()),
        }
    }

    /// The keys a stage of `kind` must set.
    pub fn required(kind: Kind) -> &'static [&'static str] {
        match kind {
            Kind::Train => <train::Params as ParamDefaults>::REQUIRED,
            _ => &[],
        }
    }

    /// Fills parameters left to the run's defaults (the seed); the result is what is
    /// fingerprinted and recorded.
    pub fn resolve(&mut self, run_seed: u64) {
        match self {
            StageParams::Prepare(p) => p.resolve(run_seed),
            StageParams::Train(p) => p.resolve(run_seed),
            _ => {}
        }
    }

    /// Runs the stage; returns the output files it wrote, relative to its folder.
    pub fn run(&self, ctx: &Context) -> Result<Vec<String>> {
        match self {
            StageParams::Prepare(p) => prepare::run(ctx, p),
            StageParams::Train(p) => train::run(ctx, p),
            StageParams::Label(p) => label::run(ctx, p),
            StageParams::Evaluate(p) => evaluate::run(ctx, p),
            StageParams::Report(p) => report::run(ctx, p),
        }
    }
}
