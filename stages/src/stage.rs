//! The vocabulary shared by the runner and the stages: stage kinds, the artifacts they produce
//! and read, and the parameters of each kind.

use crate::context::Context;
use crate::error::Result;
use serde::{Deserialize, Serialize};

/// The kind of a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Turns a dataset into packed splits.
    Prepare,
    /// Trains a model (teacher or student).
    Train,
    /// Runs teachers over a split and stores their label distributions.
    Label,
    /// Runs a model over the test split and computes metrics.
    Evaluate,
    /// Tabulates evaluations.
    Report,
}

impl Kind {
    /// Every kind, in pipeline order.
    pub const ALL: [Kind; 5] = [
        Kind::Prepare,
        Kind::Train,
        Kind::Label,
        Kind::Evaluate,
        Kind::Report,
    ];

    /// The kind's name in stages.toml.
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Prepare => "prepare",
            Kind::Train => "train",
            Kind::Label => "label",
            Kind::Evaluate => "evaluate",
            Kind::Report => "report",
        }
    }

    /// What a stage of this kind produces for its downstream stages.
    pub fn produces(&self) -> Artifact {
        match self {
            Kind::Prepare => Artifact::Dataset,
            Kind::Train => Artifact::Model,
            Kind::Label => Artifact::Labels,
            Kind::Evaluate => Artifact::Metrics,
            Kind::Report => Artifact::Report,
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!("unknown stage kind `{s}`, expected one of prepare, train, label, evaluate, report")
            })
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What flows along a `needs` edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Artifact {
    /// Packed splits (`prepare`).
    Dataset,
    /// A trained model (`train`).
    Model,
    /// A label store (`label`).
    Labels,
    /// Metrics of one model (`evaluate`).
    Metrics,
    /// Tables (`report`): nothing reads them.
    Report,
}

impl std::fmt::Display for Artifact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Artifact::Dataset => "a dataset (kind prepare)",
            Artifact::Model => "a model (kind train)",
            Artifact::Labels => "a label store (kind label)",
            Artifact::Metrics => "metrics (kind evaluate)",
            Artifact::Report => "a report (kind report)",
        })
    }
}

/// How many inputs of an artifact a stage takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Multiplicity {
    /// Exactly one.
    One,
    /// One or more.
    OneOrMore,
    /// None allowed.
    None,
}

/// The parameters of a stage, by kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum StageParams {
    /// `kind = "prepare"`.
    Prepare(crate::prepare::Params),
    /// `kind = "train"`.
    Train(crate::train::Params),
    /// `kind = "label"`.
    Label(crate::label::Params),
    /// `kind = "evaluate"`.
    Evaluate(crate::evaluate::Params),
    /// `kind = "report"`.
    Report(crate::report::Params),
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
            (StageParams::Train(p), Model) => p.method.teachers(),
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
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        fn positive(key: &'static str, v: f64) -> std::result::Result<(), (&'static str, String)> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err((key, format!("must be a positive number, found {v}")))
            }
        }
        fn at_least(
            key: &'static str,
            v: usize,
            min: usize,
        ) -> std::result::Result<(), (&'static str, String)> {
            if v >= min {
                Ok(())
            } else {
                Err((key, format!("must be at least {min}, found {v}")))
            }
        }
        match self {
            StageParams::Prepare(p) => p.validate(),
            StageParams::Train(p) => {
                use crate::models::{Arch, Shortcut, Stem};
                let arch = Arch::parse(&p.model).map_err(|e| ("model", e.to_string()))?;
                match arch {
                    Arch::Cifar { .. } if p.stem != Stem::Cifar => {
                        return Err((
                            "stem",
                            format!(
                                "the ImageNet stem applies to resnet18 … resnet200, not to `{}`",
                                p.model
                            ),
                        ));
                    }
                    Arch::Large { .. } if p.shortcut == Shortcut::A => {
                        return Err(("shortcut", format!("option A applies to the CIFAR ResNets resnet<6n+2> only; `{}` uses projections (B)", p.model)));
                    }
                    _ => {}
                }
                if !(0.0..1.0).contains(&p.dropout) {
                    return Err(("dropout", format!("must be in [0, 1), found {}", p.dropout)));
                }
                at_least("width", p.width.unwrap_or(1), 1)?;
                at_least("checkpoint_every", p.checkpoint_every.unwrap_or(1), 1)?;
                at_least("keep_checkpoints", p.keep_checkpoints, 1)?;
                at_least("prefetch", p.prefetch, 1)?;
                at_least("epochs", p.epochs, 1)?;
                at_least("batch_size", p.batch_size, 1)?;
                positive("lr", p.lr)?;
                if !(0.0..1.0).contains(&p.momentum) {
                    return Err((
                        "momentum",
                        format!("must be in [0, 1), found {}", p.momentum),
                    ));
                }
                if !(p.weight_decay >= 0.0 && p.weight_decay.is_finite()) {
                    return Err((
                        "weight_decay",
                        format!("must be ≥ 0, found {}", p.weight_decay),
                    ));
                }
                if p.warmup_epochs > p.epochs {
                    return Err((
                        "warmup_epochs",
                        format!("{} is more than the {} epochs", p.warmup_epochs, p.epochs),
                    ));
                }
                p.mix
                    .validate()
                    .map_err(|(key, msg)| ("mix", format!("`{key}` {msg}")))?;
                if !(0.0..1.0).contains(&p.ls_alpha) {
                    return Err((
                        "ls_alpha",
                        format!("must be in [0, 1), found {}", p.ls_alpha),
                    ));
                }
                if !(0.0..1.0).contains(&p.ogr_alpha) {
                    return Err((
                        "ogr_alpha",
                        format!("must be in [0, 1), found {}", p.ogr_alpha),
                    ));
                }
                if !(0.0..=1.0).contains(&p.kd_lambda) {
                    return Err((
                        "kd_lambda",
                        format!("must be in [0, 1], found {}", p.kd_lambda),
                    ));
                }
                positive("kd_tau", p.kd_tau)?;
                positive("wsl_tau", p.wsl_tau)?;
                if !(p.wsl_alpha >= 0.0 && p.wsl_alpha.is_finite()) {
                    return Err(("wsl_alpha", format!("must be ≥ 0, found {}", p.wsl_alpha)));
                }
                at_least("ogr_every", p.ogr_every, 1)?;
                Ok(())
            }
            StageParams::Label(p) => {
                positive("temperature", p.temperature)?;
                at_least("top_k", p.top_k.unwrap_or(1), 1)?;
                let mut seen = p.splits.clone();
                seen.sort_by_key(|s| *s as u8);
                seen.dedup();
                if p.splits.is_empty() || seen.len() != p.splits.len() {
                    return Err((
                        "splits",
                        "must list distinct splits among \"train\", \"val\" and \"test\"".into(),
                    ));
                }
                at_least("batch_size", p.batch_size, 1)
            }
            StageParams::Evaluate(p) => {
                at_least("bins", p.bins, 1)?;
                at_least("batch_size", p.batch_size, 1)
            }
            StageParams::Report(_) => Ok(()),
        }
    }

    /// Fills parameters left to the run's defaults (the seed); the result is what is
    /// fingerprinted and recorded.
    pub fn resolve(&mut self, run_seed: u64) {
        match self {
            StageParams::Prepare(p) => p.resolve(run_seed),
            StageParams::Train(p) => {
                p.seed.get_or_insert(run_seed);
                p.clear_unused();
                if p.width.is_none() {
                    if let Ok(arch) = crate::models::Arch::parse(&p.model) {
                        p.width = Some(arch.default_width());
                    }
                }
            }
            _ => {}
        }
    }

    /// Runs the stage; returns the output files it wrote, relative to its folder.
    pub fn run(&self, ctx: &Context) -> Result<Vec<String>> {
        match self {
            StageParams::Prepare(p) => crate::prepare::run(ctx, p),
            StageParams::Train(p) => crate::train::run(ctx, p),
            StageParams::Label(p) => crate::label::run(ctx, p),
            StageParams::Evaluate(p) => crate::evaluate::run(ctx, p),
            StageParams::Report(p) => crate::report::run(ctx, p),
        }
    }
}
