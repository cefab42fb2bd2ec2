//! The `replay` stage: runs the teachers once over every batch of a training's batch stream —
//! the same shuffled, augmented, mixed batches a student with these settings sees — and stores
//! their outputs in a replay store ([`crate::replay_store`]), which every such student reads
//! (`replay = true`, this stage in `needs`) instead of running the teachers on each step.
//!
//! Students of different models, schedules, learning rates or initialisation seeds share one
//! store when their streams are equal: the same dataset, `batch_size`, `augment`, `cutout`,
//! `mix` and `data_seed`. Each epoch is written atomically as soon as it is computed, so a
//! killed stage redoes at most one epoch.

use crate::artifacts::{Dataset, Kind, TrainedModel};
use crate::context::Context;
use crate::error::{Result, StageError};
use crate::label_store::StoreDtype;
use crate::params::{self, at_least, RangeError};
use crate::progress;
use crate::replay_store::{self, Output, ReplayMeta, StepRows};
use crate::science::methods::Method;
use crate::science::supervision::{Supervision, SupervisionConfig};
use crate::stream::{AugmentName, BatchStream};
use datasets::mix::Mix;
use engine::feed::Feeder;
use serde::{Deserialize, Serialize};

/// Parameters of a `replay` stage: the batch stream of the students it serves, and how their
/// teachers' outputs are stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", default, deny_unknown_fields)]
pub struct Params {
    /// Epochs to store (students may train fewer).
    pub epochs: usize,
    /// The students' `batch_size`.
    pub batch_size: usize,
    /// The students' `augment`.
    pub augment: AugmentName,
    /// The students' `crop_size`.
    pub crop_size: Option<usize>,
    /// The students' `crop_scale`.
    pub crop_scale: [f64; 2],
    /// The students' `crop_ratio`.
    pub crop_ratio: [f64; 2],
    /// The students' `cutout`.
    pub cutout: usize,
    /// The students' `mix`.
    pub mix: Mix,
    /// The seed of the students' batch stream: their `data_seed`, else their `seed` (default:
    /// the run's seed). Named `seed` so that a replay grid over seeds pairs with the student
    /// grids over the same seeds.
    pub seed: Option<u64>,
    /// Monte-Carlo dropout passes of the teachers (the students' `teacher_mc`; 0: none).
    pub teacher_mc: usize,
    /// Storage of the vectors: `"f32"` (bitwise the online results) or `"f16"`.
    pub dtype: StoreDtype,
    /// Store each teacher distribution as its `top_k` largest probabilities and the rest's mass
    /// (for the `on-*` students only: `kd` and `wsl` need logits).
    pub top_k: Option<usize>,
    /// Batches each loader worker builds ahead.
    pub prefetch: usize,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            epochs: 240,
            batch_size: 64,
            augment: AugmentName::CropFlip,
            crop_size: None,
            crop_scale: crate::stream::CROP_SCALE,
            crop_ratio: crate::stream::CROP_RATIO,
            cutout: 0,
            mix: Mix::None {},
            seed: None,
            teacher_mc: 0,
            dtype: StoreDtype::F32,
            top_k: None,
            prefetch: 2,
        }
    }
}

params::stage_params! {
    Params,
    omitted: [
        "crop_size",
        "crop_scale",
        "crop_ratio",
        "cutout",
        "mix",
        "teacher_mc",
        "dtype",
        "top_k",
        "prefetch",
    ],
}

impl Params {
    /// Checks value ranges that the types alone do not.
    pub fn validate(&self) -> std::result::Result<(), RangeError> {
        at_least("epochs", self.epochs, 1)?;
        at_least("batch_size", self.batch_size, 1)?;
        at_least("prefetch", self.prefetch, 1)?;
        at_least("top_k", self.top_k.unwrap_or(1), 1)?;
        crate::stream::check_crop(
            self.augment,
            self.crop_size,
            self.crop_scale,
            self.crop_ratio,
        )?;
        self.mix
            .validate()
            .map_err(|(key, msg)| ("mix", format!("`{key}` {msg}")))
    }

    /// Fills the data seed left to the run.
    pub fn resolve(&mut self, run_seed: u64) {
        self.seed.get_or_insert(run_seed);
    }

    /// The batch stream stored.
    pub fn stream(&self) -> BatchStream {
        BatchStream {
            batch_size: self.batch_size,
            augment: self.augment,
            cutout: self.cutout,
            mix: self.mix,
            data_seed: self.seed.unwrap_or_default(),
            rotations: false,
            view: crate::stream::training_view(
                self.augment,
                self.crop_size,
                self.crop_scale,
                self.crop_ratio,
            ),
        }
    }

    /// What is stored: logits, unless the teachers are Monte-Carlo or the storage top-k.
    fn output(&self) -> Output {
        if self.teacher_mc > 0 || self.top_k.is_some() {
            Output::Probs
        } else {
            Output::Logits
        }
    }
}

/// Refuses a `top_k` above K (or a K that `uint16` classes cannot name) and a teacher named
/// like one of the store's key columns.
fn check_columns(ctx: &Context, p: &Params, k: usize) -> Result<()> {
    if let Some(t) = p.top_k {
        if t > k || k > u16::MAX as usize + 1 {
            return Err(StageError::config(format!(
                "{}: top_k = {t} must be at most K = {k} (and K at most 65536)",
                ctx.name
            )));
        }
    }
    // A teacher's column is named after its stage; these are the store's key columns.
    let keys = ["step", "position", "index"];
    if let Some(t) = ctx.model_inputs().find(|i| keys.contains(&i.name.as_str())) {
        return Err(StageError::config(format!(
            "{}: teacher `{}` has the name of a key column of the replay store (`step`, \
             `position`, `index`), which its outputs' column would take; rename the teacher stage",
            ctx.name, t.name
        )));
    }
    Ok(())
}

/// How far the replay stage whose (partial) folder is `dir` got: its epochs stored (`3 of 10
/// epochs stored`) and the time left at the pace the last ones were written, the gap across
/// `resumed` (when the run writing now started) left out (`, about 12 min of replay left`), for
/// `pipeline status`; `None` before the first.
pub fn progress(
    p: &Params,
    dir: &std::path::Path,
    resumed: Option<std::time::SystemTime>,
) -> Option<String> {
    let times: Vec<_> = (0..p.epochs)
        .filter_map(|e| progress::written(&replay_store::epoch_file(dir, e)))
        .collect();
    let stored = times.len();
    if stored == 0 {
        return None;
    }
    let mut out = format!("{stored} of {} epochs stored", p.epochs);
    if let Some(s) = progress::left_at_pace(&times, p.epochs - stored, resumed) {
        out += &format!(", about {} of replay left", progress::rough(s));
    }
    Some(out)
}

/// Runs a `replay` stage: every epoch not yet stored, then `replay.json`.
pub fn run(ctx: &Context, p: &Params) -> Result<Vec<String>> {
    let data = Dataset::open(&ctx.input(Kind::Prepare).dir)?;
    let device = ctx.device.open()?;
    let k = data.info.classes.len();
    check_columns(ctx, p, k)?;
    let teachers = ctx.teachers(&device, k, &data.info.normalize, p.teacher_mc)?;
    let stream = p.stream();
    let meta = ReplayMeta {
        format: replay_store::FORMAT,
        stream: stream.clone(),
        epochs: p.epochs,
        dataset: data.train.hash(),
        images: data.train.len(),
        classes: k,
        teachers: ctx.teacher_refs(),
        teacher_mc: p.teacher_mc,
        output: p.output(),
        dtype: p.dtype,
        top_k: p.top_k,
    };
    let supervision = Supervision::new(
        SupervisionConfig {
            method: Method::OnLdl,
            teacher_mc: p.teacher_mc,
            seed: stream.data_seed,
            ..SupervisionConfig::default()
        },
        k,
        &device,
        Vec::new(),
        teachers,
    );
    stream.check_view(&ctx.name, data.info.shape, data.info.varying)?;
    let loader = stream.loader(&data.train, &data.info.normalize, ctx.threads, p.prefetch);
    let steps = loader.batches_per_epoch();
    let key = epoch_key(ctx)?;
    let done = (0..p.epochs)
        .filter(|&e| replay_store::epoch_done(&ctx.dir, e, &key))
        .count();
    if done > 0 {
        tracing::info!(
            "{}: resuming with {done} of {} epochs stored",
            ctx.name,
            p.epochs
        );
    }
    let bar = ctx.bar((p.epochs * steps) as u64, "replaying the teachers");
    let mut outputs = Vec::new();
    for epoch in 0..p.epochs {
        if replay_store::epoch_done(&ctx.dir, epoch, &key) {
            bar.inc(steps as u64);
        } else {
            if replay_store::epoch_file(&ctx.dir, epoch).exists() {
                tracing::info!(
                    "{}: epoch {} was stored from other teacher weights (a teacher trained \
                     again) or by an older version of this program: replaying it again",
                    ctx.name,
                    epoch + 1
                );
            }
            let (c, h, w) = loader.image_dims();
            write_epoch(
                ctx,
                &key,
                &meta,
                &supervision,
                &loader,
                [c, h, w],
                &device,
                epoch,
                &bar,
            )?;
        }
        outputs.push(replay_store::epoch_file_name(epoch));
        if ctx.stop_requested() && epoch + 1 < p.epochs {
            return Err(ctx.interrupted(&format!("epoch {} of {}", epoch + 1, p.epochs)));
        }
    }
    bar.finish_and_clear();
    engine::json::write(&ctx.dir.join(replay_store::META_FILE), &meta)?;
    outputs.push(replay_store::META_FILE.into());
    tracing::info!(
        "{}: {} epochs × {steps} steps of {} teacher(s) stored ({:?}, {:?}{})",
        ctx.name,
        p.epochs,
        meta.teachers.len(),
        meta.output,
        meta.dtype,
        p.top_k.map_or(String::new(), |t| format!(", top-{t}"))
    );
    Ok(outputs)
}

/// What a stored epoch must have been written under to be reused: the stage's fingerprint and
/// the blake3 of each teacher's `model.safetensors` (a teacher trained again, `--force`, to
/// other weights keeps its fingerprint; the epochs of its old weights are not reused).
fn epoch_key(ctx: &Context) -> Result<String> {
    let mut key = ctx.fingerprint.clone();
    for input in ctx.model_inputs() {
        key.push(' ');
        key.push_str(&TrainedModel::weights_blake3(&input.dir)?);
    }
    Ok(key)
}

/// Runs the teachers over every batch of `epoch` and stores their outputs.
#[allow(clippy::too_many_arguments)]
fn write_epoch(
    ctx: &Context,
    key: &str,
    meta: &ReplayMeta,
    supervision: &Supervision,
    loader: &datasets::Loader,
    [c, h, w]: [usize; 3],
    device: &candle_core::Device,
    epoch: usize,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    let mut feeder = Feeder::new();
    let mut it = loader.epoch(epoch as u64, 0);
    meta.write_epoch(&ctx.dir, epoch, key, |spent| {
        if let Some(b) = spent {
            it.recycle(b);
        }
        let Some(batch) = it.next() else {
            return Ok(None);
        };
        let x = feeder.upload(&batch.images, (batch.len(), c, h, w), device)?;
        let mut rows = Vec::with_capacity(meta.teachers.len());
        for n in 0..meta.teachers.len() {
            let t = supervision.teacher_output(n, &x, epoch, &batch, meta.output)?;
            rows.push(t.flatten_all()?.to_vec1::<f32>()?);
        }
        bar.inc(1);
        Ok(Some(StepRows {
            batch,
            outputs: rows,
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The epochs stored are counted among the stage's `epochs`, not a file being written; the
    /// time left is the gap between their writes times the epochs left.
    #[test]
    fn progress_counts_the_epochs_stored() {
        let dir = tempfile::tempdir().unwrap();
        let p = Params {
            epochs: 10,
            ..Params::default()
        };
        assert_eq!(progress(&p, dir.path(), None), None);
        for name in [
            replay_store::epoch_file_name(0),
            replay_store::epoch_file_name(2),
            replay_store::epoch_file_name(10),
            format!(".{}.tmp-7", replay_store::epoch_file_name(3)),
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        // Epoch 0 written at t, epoch 2 a minute later: 8 epochs left take 8 minutes.
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for (e, at) in [(0, 0), (2, 60)] {
            let f = std::fs::File::options()
                .write(true)
                .open(replay_store::epoch_file(dir.path(), e))
                .unwrap();
            f.set_modified(t + std::time::Duration::from_secs(at))
                .unwrap();
        }
        assert_eq!(
            progress(&p, dir.path(), None).as_deref(),
            Some("2 of 10 epochs stored, about 8 min of replay left")
        );
    }
}
