//! What the runner hands a stage: its working folder, its inputs' folders, the run's seed, the
//! device and a progress-bar factory.

use crate::artifacts::{Artifact, Kind, TrainedModel};
use crate::error::{Result, StageError};
use crate::replay_store::TeacherRef;
use crate::science::supervision::Teacher;
use candle_core::Device;
use datasets::augment::Normalize;
use engine::device::DeviceSpec;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A run's distinguishing settings: flattened parameter paths (`epochs`, `mix.p`,
/// `teacher.model`) to their values as text; what a report keeps apart in rows (see
/// [`crate::StageParams::settings`]).
pub type Settings = std::collections::BTreeMap<String, String>;

/// An upstream stage this stage reads.
#[derive(Debug, Clone)]
pub struct Input {
    /// The upstream stage's name.
    pub name: String,
    /// Its kind (which says what files its folder holds).
    pub kind: Kind,
    /// Its completed output folder.
    pub dir: PathBuf,
    /// Its fingerprint.
    pub fingerprint: String,
    /// What distinguishes its run apart from the seed.
    pub settings: Settings,
}

/// Everything a stage needs to run.
#[derive(Debug, Clone)]
pub struct Context {
    /// The stage's name.
    pub name: String,
    /// The folder to write outputs into (renamed into place by the runner on success). It
    /// survives a killed run with the same fingerprint, so training can resume from it.
    pub dir: PathBuf,
    /// The folder relative paths of the stages.toml are resolved against (its own folder).
    pub base_dir: PathBuf,
    /// This stage's fingerprint.
    pub fingerprint: String,
    /// Upstream stages, in the order of `needs`.
    pub inputs: Vec<Input>,
    /// The device to compute on.
    pub device: DeviceSpec,
    /// Worker threads for data loading.
    pub threads: usize,
    /// Where progress bars draw; `None` hides them.
    pub progress: Option<MultiProgress>,
    /// Set when the process is asked to stop (SIGTERM, SIGUSR2, Ctrl-C): a training checkpoints
    /// at its next step boundary and returns [`StageError::Interrupted`]; shorter stages finish.
    pub stop: Arc<AtomicBool>,
}

impl Context {
    /// Whether the process was asked to stop.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// The error a stage returns once it has stopped on request, after `what` (e.g. "a
    /// checkpoint at step 120").
    pub fn interrupted(&self, what: &str) -> StageError {
        StageError::Interrupted(format!(
            "{}: stopped on request after {what}; the next run resumes it",
            self.name
        ))
    }

    /// The inputs of kind `kind`.
    pub fn inputs_of(&self, kind: Kind) -> impl Iterator<Item = &Input> {
        self.inputs.iter().filter(move |i| i.kind == kind)
    }

    /// The single input of kind `kind` (the runner has checked there is exactly one).
    pub fn input(&self, kind: Kind) -> &Input {
        self.inputs_of(kind)
            .next()
            .expect("the runner checked the stage's inputs")
    }

    /// The inputs that are models (train and import stages), in the order of `needs`.
    pub fn model_inputs(&self) -> impl Iterator<Item = &Input> {
        self.inputs
            .iter()
            .filter(|i| i.kind.produces() == Artifact::Model)
    }

    /// The single model input (the runner has checked there is exactly one).
    pub fn model_input(&self) -> &Input {
        self.model_inputs()
            .next()
            .expect("the runner checked the stage's inputs")
    }

    /// The model inputs as teachers run on a student's batches (normalised by `dataset`), on
    /// `device`, for a `k`-class dataset; with `teacher_mc > 0` each must have dropout.
    pub fn teachers(
        &self,
        device: &Device,
        k: usize,
        dataset: &Normalize,
        teacher_mc: usize,
    ) -> Result<Vec<Teacher>> {
        let mut teachers = Vec::new();
        for input in self.model_inputs() {
            let (meta, model) = TrainedModel::load(&input.dir, device, k)?;
            if teacher_mc > 0 && meta.spec.dropout == 0.0 {
                return Err(StageError::config(format!(
                    "{}: teacher_mc = {teacher_mc} needs teachers trained with dropout; `{}` has \
                     none (train it with `dropout = 0.2`)",
                    self.name, input.name
                )));
            }
            let own = meta.normalize.as_ref();
            teachers.push(Teacher::new(&input.name, model, own, dataset, device)?);
        }
        Ok(teachers)
    }

    /// The model inputs' names and fingerprints, in order, as a replay store records them.
    pub fn teacher_refs(&self) -> Vec<TeacherRef> {
        self.model_inputs()
            .map(|i| TeacherRef {
                name: i.name.clone(),
                fingerprint: i.fingerprint.clone(),
            })
            .collect()
    }

    /// A progress bar of `len` steps, labelled with the stage name and `what`.
    pub fn bar(&self, len: u64, what: &str) -> ProgressBar {
        let bar = match &self.progress {
            Some(m) => m.add(ProgressBar::new(len)),
            None => {
                let b = ProgressBar::new(len);
                b.set_draw_target(ProgressDrawTarget::hidden());
                b
            }
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>12.cyan.bold} [{bar:30}] {pos}/{len} {msg} ({elapsed} < {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(self.name.clone());
        bar.set_message(what.to_owned());
        bar
    }
}

impl engine::inference::Progress for Context {
    fn bar(&self, len: u64, what: &str) -> ProgressBar {
        Context::bar(self, len, what)
    }
}
