//! The registry of stage kinds: [`StageParams`], the parameters of a stage of any kind, with
//! what the runner asks of every kind — its inputs, its range checks, its resolution against
//! the run's defaults, and running it.

use crate::artifacts::{Artifact, Kind, Multiplicity};
use crate::context::{Context, Settings};
use crate::error::Result;
use crate::kinds::{evaluate, import, label, prepare, replay, report, train};
use crate::label_store::StoreDtype;
use crate::params::{ParamDefaults, RangeError};
use crate::science::methods::Method;
use serde::Serialize;

/// Flattens `value` into `out` under `prefix`: objects by key (joined with `.`), anything else
/// as its JSON text; the top level's `seed` and operational keys are left out.
fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Settings) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let top = prefix.is_empty();
                if top && (k == "seed" || StageParams::OPERATIONAL_KEYS.contains(&k.as_str())) {
                    continue;
                }
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&path, v, out);
            }
        }
        serde_json::Value::Null => {}
        serde_json::Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// The parameters of a stage, by kind.
// One value a stage, built once per run: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum StageParams {
    /// `kind = "prepare"`.
    Prepare(prepare::Params),
    /// `kind = "import"`.
    Import(import::Params),
    /// `kind = "train"`.
    Train(train::Params),
    /// `kind = "label"`.
    Label(label::Params),
    /// `kind = "replay"`.
    Replay(replay::Params),
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
            StageParams::Import(_) => Kind::Import,
            StageParams::Train(_) => Kind::Train,
            StageParams::Label(_) => Kind::Label,
            StageParams::Replay(_) => Kind::Replay,
            StageParams::Evaluate(_) => Kind::Evaluate,
            StageParams::Report(_) => Kind::Report,
        }
    }

    /// How far a run of the stage got, read from its (partial) folder `dir`, for `pipeline
    /// status`: a training's epochs, a label stage's chunks, a replay's epochs, and the time
    /// left; `None` for the kinds that do not resume part-way, or when nothing is stored yet.
    /// `dataset` is the folder of the stage's prepared dataset, if it reads one (a label
    /// stage's chunks are counted against its splits' sizes); `resumed` is when the run that
    /// writes the folder now started (the time left is not paced across the pause before it).
    pub fn progress(
        &self,
        dir: &std::path::Path,
        dataset: Option<&std::path::Path>,
        resumed: Option<std::time::SystemTime>,
    ) -> Option<String> {
        match self {
            StageParams::Train(p) => train::progress(p, dir),
            StageParams::Label(p) => label::progress(p, dir, dataset, resumed),
            StageParams::Replay(p) => replay::progress(p, dir, resumed),
            _ => None,
        }
    }

    /// How many inputs of each artifact the stage reads, given its parameters.
    pub fn needs(&self, artifact: Artifact) -> Multiplicity {
        use Artifact::*;
        use Multiplicity as M;
        match (self, artifact) {
            (StageParams::Prepare(_) | StageParams::Import(_), _) => M::None,
            (StageParams::Train(_), Dataset) => M::One,
            (StageParams::Train(p), Labels) if p.method.reads_labels() => M::One,
            (StageParams::Train(p), Model) if p.method.uses_rotations() => M::One,
            (StageParams::Train(p), Model) if p.method.uses_teachers() => M::OneOrMore,
            (StageParams::Train(p), Replay) if p.method.uses_teachers() && p.replay => M::One,
            (StageParams::Replay(_), Dataset) => M::One,
            (StageParams::Replay(_), Model) => M::OneOrMore,
            (StageParams::Label(_), Dataset) => M::One,
            (StageParams::Label(_), Model) => M::OneOrMore,
            (StageParams::Evaluate(_), Dataset | Model) => M::One,
            (StageParams::Report(_), Metrics) => M::OneOrMore,
            _ => M::None,
        }
    }

    /// Keys that change how a stage runs but not what it produces; the runner leaves them out of
    /// the fingerprint, so checkpointing can be changed on a half-done run without restarting it.
    /// `eval_every` only adds columns to a training's log (its weights are the same): adding it
    /// to a finished teacher must not retrain it and everything downstream.
    pub const OPERATIONAL_KEYS: &'static [&'static str] = &[
        "checkpoint_every",
        "keep_checkpoints",
        "prefetch",
        "chunk_size",
        "eval_every",
    ];

    /// Keys that only name the stage's results in reports (a train stage's `label`): left out
    /// of its fingerprint like the operational keys, but kept in its [`settings`](Self::settings),
    /// and fingerprinted by the reports that show them.
    pub fn presentation_keys(&self) -> &'static [&'static str] {
        match self {
            StageParams::Train(_) | StageParams::Import(_) => &["label"],
            _ => &[],
        }
    }

    /// Keys that say where an input file lives, whose content hash is fingerprinted instead
    /// (an import's `path`, beside its `file_blake3`; a prepare's `path`, `cache` and mirror,
    /// beside its `source_digest`): moving the files reruns nothing.
    pub fn located_keys(&self) -> &'static [&'static str] {
        match self {
            StageParams::Import(_) => &["path"],
            StageParams::Prepare(p) => p.located_keys(),
            _ => &[],
        }
    }

    /// Every key left out of the fingerprint: the operational, presentation and located keys.
    pub fn unfingerprinted_keys(&self) -> impl Iterator<Item = &'static str> + '_ {
        Self::OPERATIONAL_KEYS
            .iter()
            .chain(self.presentation_keys())
            .chain(self.located_keys())
            .copied()
    }

    /// The version of what a stage of this kind (with these parameters) writes. The runner
    /// fingerprints it when above 1, so that a change of what a kind computes reruns exactly
    /// the stages it affects: evaluate 2 (`brier_top_label`, `parameters`), report 2 (rows by
    /// run), train 2 for the OGR methods (bounded OGR weights) and for `wsl` (defaults α = 2.25,
    /// τ = 4, WSL's CIFAR-100 settings, were 2.5 and 2); evaluate 3 (`best_class.json`,
    /// `curve.csv` and their figures) and report 3 (`training-curves`, `best-classes`,
    /// `reliability-diagrams`), so a finished grid gets them at its next run, at the cost of
    /// its evaluations (not its trainings); prepare 2 for ImageFolder trees (centre crops
    /// offset as torchvision's, halves rounded to even), 3 (pixels bitwise torchvision's).
    pub fn output_version(&self) -> u32 {
        match self {
            StageParams::Evaluate(_) => 3,
            // 4: legends wrap their labels and grow the figure rather than run off its edge.
            StageParams::Report(_) => 4,
            // 3: ImageFolder images are decoded by libjpeg-turbo and resized by Pillow's filter,
            // bitwise the pixels of torchvision's `Resize` + `CenterCrop` (they were the `image`
            // crate's, up to 5 levels off).
            StageParams::Prepare(p) if p.source == prepare::Source::Imagefolder => 3,
            // 3: ResNeXt, DenseNet and DLA start from their reference's (PyTorch's default)
            // initialisation, not a ResNet's.
            StageParams::Train(p)
                if !matches!(
                    engine::models::Arch::parse(&p.model),
                    Ok(engine::models::Arch::ResNet(_))
                ) =>
            {
                3
            }
            StageParams::Train(p) if p.method.uses_ogr() || p.method == Method::Wsl => 2,
            // 3: the students of a float16 store of probabilities renormalise its rows (their
            // rounding left sums up to 3·10⁻⁴ from 1), so they run again.
            StageParams::Replay(p)
                if p.dtype == StoreDtype::F16 && (p.top_k.is_some() || p.teacher_mc > 0) =>
            {
                3
            }
            // A top-k replay store's `rest` is the sum of the classes left out (it was 1 − the
            // kept mass, as the label store never was).
            StageParams::Replay(p) if p.top_k.is_some() => 2,
            _ => 1,
        }
    }

    /// What distinguishes the run this stage makes from others, apart from its seed: its own
    /// parameters and, under a prefix naming their role, its inputs' settings (`data.` for the
    /// dataset, `labels.` for a label store, `teacher.`, `teacher2.` … for the models a
    /// training or labelling reads, `model.` for the model an evaluation reads). Keys are
    /// flattened JSON paths (`schedule.milestones`, `mix.p`), values JSON text (strings
    /// unquoted); seeds and operational keys are left out, `label` kept, an evaluation's
    /// Monte-Carlo dropout seed kept as `mc_seed`. A report keeps runs with different settings
    /// in different rows.
    pub fn settings(&self, params: &serde_json::Value, inputs: &[(Kind, &Settings)]) -> Settings {
        let mut out = Settings::new();
        flatten("", params, &mut out);
        // An evaluation's own seed draws Monte-Carlo dropout masks, not a run: two of one model
        // with other masks are two rows, not two seeds of one.
        if let StageParams::Evaluate(e) = self {
            if let (true, Some(seed)) = (e.mc_samples > 0, e.seed) {
                out.insert("mc_seed".into(), seed.to_string());
            }
            // How the evaluation is computed or drawn, not what it measures: seeds evaluated
            // in other batches, or with other projection classes, are one run.
            out.remove("batch_size");
            out.remove("projection_classes");
        }
        // An import given a seed is one seed of a run trained elsewhere: its file names the
        // seed's weights, as a training's seed does, not another run.
        if let StageParams::Import(i) = self {
            if i.seed.is_some() {
                for key in ["path", "file_blake3", "blake3"] {
                    out.remove(key);
                }
            }
        }
        let own = self.kind();
        let mut seen: Vec<&str> = Vec::new();
        for (kind, settings) in inputs {
            let role = match (kind, own) {
                (Kind::Prepare, _) => "data",
                (Kind::Label, _) => "labels",
                (Kind::Replay, _) => "replay",
                (Kind::Train | Kind::Import, Kind::Evaluate) => "model",
                (Kind::Train | Kind::Import, _) => "teacher",
                (Kind::Evaluate, _) => "evaluation",
                (Kind::Report, _) => "report",
            };
            let n = seen.iter().filter(|r| **r == role).count();
            seen.push(role);
            let prefix = if n == 0 {
                role.to_string()
            } else {
                format!("{role}{}", n + 1)
            };
            for (k, v) in settings.iter() {
                out.insert(format!("{prefix}.{k}"), v.clone());
            }
        }
        out
    }

    /// Checks value ranges that the types alone do not; on error returns the offending key and
    /// what was expected, so the config loader can point at it before anything runs.
    pub fn validate(&self) -> std::result::Result<(), RangeError> {
        match self {
            StageParams::Prepare(p) => p.validate(),
            StageParams::Import(p) => p.validate(),
            StageParams::Train(p) => p.validate(),
            StageParams::Label(p) => p.validate(),
            StageParams::Replay(p) => p.validate(),
            StageParams::Evaluate(p) => p.validate(),
            StageParams::Report(_) => Ok(()),
        }
    }

    /// The keys a stage of `kind` must set.
    pub fn required(kind: Kind) -> &'static [&'static str] {
        match kind {
            Kind::Import => &["path", "model"],
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
            StageParams::Replay(p) => p.resolve(run_seed),
            StageParams::Evaluate(p) => p.resolve(),
            _ => {}
        }
    }

    /// Reads what the stage's parameters name outside stages.toml into them: an import's file
    /// hash, a prepare's source digest (relative paths are resolved against `base_dir`, the
    /// stages.toml's folder). An import's unreadable file is an error (the key and what is
    /// wrong); a prepare's unreadable source is a warning returned, as its data may be put in
    /// place before it runs.
    pub fn resolve_files(
        &mut self,
        base_dir: &std::path::Path,
    ) -> std::result::Result<Option<String>, RangeError> {
        match self {
            StageParams::Import(p) => p.hash_file(base_dir).map(|()| None),
            StageParams::Prepare(p) => {
                let cache = datasets::digest::default_cache();
                Ok(p.digest_source(base_dir, cache.as_deref()))
            }
            _ => Ok(None),
        }
    }

    /// Runs the stage; returns the output files it wrote, relative to its folder.
    pub fn run(&self, ctx: &Context) -> Result<Vec<String>> {
        match self {
            StageParams::Prepare(p) => prepare::run(ctx, p),
            StageParams::Import(p) => import::run(ctx, p),
            StageParams::Train(p) => train::run(ctx, p),
            StageParams::Label(p) => label::run(ctx, p),
            StageParams::Replay(p) => replay::run(ctx, p),
            StageParams::Evaluate(p) => evaluate::run(ctx, p),
            StageParams::Report(p) => report::run(ctx, p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings_of(p: StageParams) -> Settings {
        let json = serde_json::to_value(&p).unwrap();
        p.settings(&json, &[])
    }

    /// Seeds are left out of what tells runs apart, except the Monte-Carlo dropout seed of an
    /// evaluation that draws masks with it.
    #[test]
    fn only_an_evaluations_mask_seed_tells_runs_apart() {
        let mc = |mc_samples, seed| {
            settings_of(StageParams::Evaluate(evaluate::Params {
                mc_samples,
                seed,
                ..Default::default()
            }))
        };
        let drawn = mc(8, Some(3));
        assert_eq!(drawn.get("mc_seed").map(String::as_str), Some("3"));
        assert_eq!(drawn.get("mc_samples").map(String::as_str), Some("8"));
        assert!(!drawn.contains_key("seed"));
        // No masks drawn, or the default seed (the model's): nothing to tell apart.
        assert!(!mc(0, Some(3)).contains_key("mc_seed"));
        assert!(!mc(8, None).contains_key("mc_seed"));
        assert_ne!(mc(8, Some(3)), mc(8, Some(4)));
        assert_eq!(mc(0, Some(3)), mc(0, Some(4)));
        // The inference batch and the projection's classes draw no other run.
        let drawn = |batch_size, projection_classes| {
            settings_of(StageParams::Evaluate(evaluate::Params {
                batch_size,
                projection_classes,
                ..Default::default()
            }))
        };
        assert_eq!(drawn(64, None), drawn(256, Some([3, 4, 5])));
        let bins = settings_of(StageParams::Evaluate(evaluate::Params {
            bins: 15,
            ..Default::default()
        }));
        assert_ne!(bins, drawn(256, None));
    }

    /// Imports given seeds are seeds of one run whatever their files; without seeds, each
    /// file is a run of its own; imports of other recipes stay apart either way.
    #[test]
    fn imports_with_seeds_are_seeds_of_one_run() {
        let import = |path: &str, blake3: &str, seed, dropout| {
            settings_of(StageParams::Import(import::Params {
                path: path.into(),
                model: "resnet8".into(),
                key: None,
                prefix: None,
                dropout,
                normalize: None,
                crop_size: None,
                blake3: None,
                seed,
                label: None,
                file_blake3: blake3.into(),
            }))
        };
        let (a, b) = (
            import("s0.pth", "aa", Some(0), 0.0),
            import("s1.pth", "bb", Some(1), 0.0),
        );
        assert_eq!(a, b);
        assert!(!a.contains_key("seed") && !a.contains_key("path"));
        assert_eq!(a.get("model").map(String::as_str), Some("resnet8"));
        assert_ne!(
            import("s0.pth", "aa", None, 0.0),
            import("s1.pth", "bb", None, 0.0)
        );
        assert_ne!(a, import("s1.pth", "bb", Some(1), 0.1));
    }
}
