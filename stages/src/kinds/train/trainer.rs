//! A training run's set-up and its loop: the model, optimiser, supervision and loader built
//! from the stage's inputs, resumption from the newest checkpoint, and the epochs of steps with
//! their periodic loss reads, logging and checkpoints.

use super::head::HeadPhase;
use super::params::Params;
use super::state::{CheckpointState, EpochEval, EpochRow, EpochSums, Pending, READ_EVERY};
use crate::artifacts::{Dataset, Kind};
use crate::context::Context;
use crate::error::{Result, StageError};
use crate::label_store::{self, SoftLabels};
use crate::replay_store::{self, EpochReader, ReplayMeta, Want};
use crate::science::crd::Crd;
use crate::science::methods::Method;
use crate::science::metrics;
use crate::science::ogr::{ogr, ogr_weights, OgrPoint};
use crate::science::sskd::Sskd;
use crate::science::supervision::Supervision;
use candle_core::{DType, Device, Tensor};
use datasets::loader::Batch;
use datasets::rng::{derive_seed, stream};
use datasets::view::View;
use datasets::{Loader, PackedStore};
use engine::checkpoint::{Checkpoints, Restored};
use engine::feed::Feeder;
use engine::inference::Inference;
use engine::models::{Arch, Mode, Model, ModelSpec};
use engine::optim::{Sgd, SgdConfig};
use engine::schedule::lr_at;
use engine::schedule::Schedule;
use indicatif::ProgressBar;
use std::sync::Arc;
use std::time::Instant;

/// Bins of the ECE that `eval_every` logs (the evaluate stage's default).
const EVAL_BINS: usize = 10;

/// Where the host's time goes in an epoch, for its log line: waiting for the loader, handing
/// batches to the device, and waiting for the device at loss reads.
#[derive(Default)]
struct Waits {
    loader: f64,
    upload: f64,
    read: f64,
}

/// A replay store being read: its folder, description, the epoch open and the uploads.
struct Replay {
    dir: std::path::PathBuf,
    meta: ReplayMeta,
    /// How many of the store's teachers the method runs (its first ones).
    used: usize,
    epoch: Option<EpochReader>,
    feeds: Vec<Feeder>,
}

/// Everything a training run holds between its steps.
pub(super) struct Trainer<'a> {
    pub(super) ctx: &'a Context,
    pub(super) p: &'a Params,
    pub(super) seed: u64,
    pub(super) data: Dataset,
    pub(super) device: Device,
    compute: DType,
    pub(super) k: usize,
    pub(super) spec: ModelSpec,
    pub(super) model: Model,
    opt: Sgd,
    pub(super) supervision: Supervision,
    /// `sskd-head`: the frozen teacher's head being trained (`model` is the teacher).
    pub(super) head: Option<HeadPhase>,
    /// The training and validation splits the OGR methods measure per-class losses on.
    ogr_sets: Option<(Arc<PackedStore>, Arc<PackedStore>)>,
    pub(super) loader: Loader,
    /// The replay store the teachers' outputs are read from, if any.
    replay: Option<Replay>,
    /// Batches per epoch.
    steps: usize,
    feeder: Feeder,
    pub(super) checkpoints: Checkpoints,
    /// Global step: batches done since the start.
    step: u64,
    /// Sums of the epoch in progress.
    sums: EpochSums,
    /// One row per finished epoch.
    pub(super) log: Vec<EpochRow>,
    /// OGR measurements so far.
    pub(super) ogr_points: Vec<OgrPoint>,
    pub(super) bar: ProgressBar,
}

impl<'a> Trainer<'a> {
    /// Opens the inputs and builds the model, optimiser, supervision and loader.
    pub(super) fn new(ctx: &'a Context, p: &'a Params) -> Result<Trainer<'a>> {
        let seed = p.seed.unwrap_or_default();
        let data = Dataset::open(&ctx.input(Kind::Prepare).dir)?;
        let device = ctx.device.open()?;
        p.dtype
            .check(ctx.device)
            .map_err(|m| StageError::config(format!("{}: key `dtype`: {m}", ctx.name)))?;
        let k = data.info.classes.len();
        check_views(ctx, p, &data)?;
        let (spec, model, head) = model_to_train(ctx, p, &data, seed, &device)?;
        let stored = stored_labels(ctx, p, &data)?;
        let replay = replay(ctx, p, &data, k)?;
        let teachers = if replay.is_some() || !p.method.uses_teachers() || head.is_some() {
            Vec::new()
        } else {
            ctx.teachers(&device, k, &data.info.normalize, p.teacher_mc)?
        };
        let ogr_sets = ogr_sets(ctx, p, &data)?;
        let mut supervision = Supervision::new(p.supervision(), k, &device, stored, teachers);
        supervision.crd = crd(p, &model, &supervision, &data, seed, &device)?;
        supervision.sskd = sskd(ctx, p, &model, &supervision, seed, &device)?;
        let trainable = match &head {
            Some(h) => h.head.trainable(),
            None => {
                let mut t = model.trainable();
                t.extend(supervision.crd.iter().flat_map(Crd::trainable));
                t.extend(supervision.sskd.iter().flat_map(Sskd::trainable));
                t
            }
        };
        let opt = Sgd::new(
            trainable,
            SgdConfig {
                momentum: p.momentum,
                weight_decay: p.weight_decay,
                nesterov: p.nesterov,
            },
        );
        let loader = p
            .stream()
            .loader(&data.train, &data.info.normalize, ctx.threads, p.prefetch);
        let steps = loader.batches_per_epoch();
        if let Schedule::MultiStep { milestones, .. } = &p.schedule {
            // Easily left at the paper's default when `epochs` is cut for a quick run.
            let late: Vec<&usize> = milestones.iter().filter(|&&m| m >= p.epochs).collect();
            if !late.is_empty() {
                tracing::warn!(
                    "{}: the learning rate never drops at milestone(s) {late:?}: the run has {} epochs (set `schedule`)",
                    ctx.name,
                    p.epochs
                );
            }
        }
        Ok(Trainer {
            ctx,
            p,
            seed,
            compute: p.dtype.dtype(),
            k,
            spec,
            model,
            opt,
            supervision,
            head,
            ogr_sets,
            steps,
            loader,
            replay,
            feeder: Feeder::new(),
            checkpoints: Checkpoints::new(&ctx.dir, p.keep_checkpoints),
            step: 0,
            sums: EpochSums::default(),
            log: Vec::new(),
            ogr_points: Vec::new(),
            bar: ctx.bar((p.epochs * steps) as u64, "training"),
            data,
            device,
        })
    }

    /// Restores the newest checkpoint of this stage's fingerprint, if any; returns the epoch in
    /// progress and its next batch.
    pub(super) fn resume(&mut self) -> Result<(usize, usize)> {
        let fingerprint = &self.ctx.fingerprint;
        // No checkpoint readable: an error that keeps them (days of training a fixed program
        // may read), not one that discards the folder as an invalid input would.
        let restored: Option<Restored<CheckpointState>> = self
            .checkpoints
            .restore(
                &self.device,
                &self.model,
                &mut self.opt,
                |s: &CheckpointState| &s.fingerprint == fingerprint,
            )
            .map_err(|e| match e {
                engine::EngineError::Invalid {
                    path,
                    place,
                    message,
                } => StageError::Damaged {
                    path,
                    place,
                    message: format!(
                        "{message}: no checkpoint can be read; they are kept (`pipeline clean` \
                         discards them to start again)"
                    ),
                },
                e => e.into(),
            })?;
        let mut at = (0, 0);
        if let Some(Restored {
            state: st,
            extra,
            extra_path,
        }) = restored
        {
            if let Some(c) = &mut self.supervision.crd {
                c.load_state(&extra_path, &extra)?;
            }
            if let Some(s) = &self.supervision.sskd {
                s.load_state(&extra_path, &extra)?;
            }
            if let Some(h) = &self.head {
                h.head.load_state(&extra_path, &extra)?;
            }
            tracing::info!(
                "{}: resuming from the checkpoint of step {} (epoch {}, batch {})",
                self.ctx.name,
                st.step,
                st.epoch + 1,
                st.batch
            );
            (self.step, at, self.sums, self.log, self.ogr_points) =
                (st.step, (st.epoch, st.batch), st.sums, st.log, st.ogr);
        }
        if self.ogr_points.len() >= 2 {
            let [a, b] = &self.ogr_points[self.ogr_points.len() - 2..] else {
                unreachable!("two points")
            };
            self.supervision.class_weights = ogr_weights(&ogr(a, b));
        }
        self.bar.set_position(self.step);
        Ok(at)
    }

    /// Trains epoch `epoch` from batch `first` (0 unless resumed mid-epoch), then logs it and
    /// checkpoints.
    pub(super) fn epoch(&mut self, epoch: usize, first: usize) -> Result<()> {
        if first == 0 {
            self.sums = EpochSums::default();
        }
        self.measure_ogr(epoch)?;
        self.sums.class_loss.resize(self.k, 0.0);
        self.sums.class_seen.resize(self.k, 0);
        let t0 = Instant::now();
        let (mut timed_images, secs_before) = (0usize, self.sums.seconds);
        if let Some(r) = &mut self.replay {
            r.epoch = Some(EpochReader::open(&r.dir, &r.meta, epoch, first)?);
        }
        let mut it = self.loader.epoch(epoch as u64, first);
        let mut pending = Pending::default();
        let mut waits = Waits::default();
        loop {
            let t_wait = Instant::now();
            let Some(batch) = it.next() else {
                break;
            };
            waits.loader += t_wait.elapsed().as_secs_f64();
            self.step(&batch, epoch, &mut pending, &mut waits)?;
            timed_images += batch.len();
            let next_batch = batch.index + 1;
            it.recycle(batch);
            let checkpoint_now = next_batch < self.steps
                && self
                    .p
                    .checkpoint_every
                    .is_some_and(|n| self.step.is_multiple_of(n as u64));
            if pending.len() >= READ_EVERY || checkpoint_now {
                self.read(&mut pending, epoch, &mut waits)?;
                self.sums.seconds = secs_before + t0.elapsed().as_secs_f64();
                self.bar.set_message(self.message(epoch, timed_images, t0));
            }
            // Asked to stop (a signal): checkpoint here and return, unless this was the
            // epoch's last batch, whose end-of-epoch checkpoint follows.
            let stop_now = next_batch < self.steps && self.ctx.stop_requested();
            if stop_now && !checkpoint_now {
                self.read(&mut pending, epoch, &mut waits)?;
                self.sums.seconds = secs_before + t0.elapsed().as_secs_f64();
            }
            if checkpoint_now || stop_now {
                self.save(epoch, next_batch, self.sums.clone())?;
            }
            if stop_now {
                return Err(self
                    .ctx
                    .interrupted(&format!("a checkpoint at step {}", self.step)));
            }
        }
        self.read(&mut pending, epoch, &mut waits)?;
        self.sums.seconds = secs_before + t0.elapsed().as_secs_f64();
        tracing::info!(
            "{}: epoch {}: {:.2} s waiting for the loader, {:.2} s handing batches to the device, \
             {:.2} s waiting for the device at loss reads (of {:.2} s)",
            self.ctx.name,
            epoch + 1,
            waits.loader,
            waits.upload,
            waits.read,
            t0.elapsed().as_secs_f64()
        );
        self.log_epoch(epoch);
        self.evaluate_epoch(epoch)?;
        self.save(epoch + 1, 0, EpochSums::default())?;
        if self.ctx.stop_requested() && epoch + 1 < self.p.epochs {
            return Err(self.ctx.interrupted(&format!(
                "the checkpoint of epoch {} (step {})",
                epoch + 1,
                self.step
            )));
        }
        Ok(())
    }

    /// One step: forward, the method's loss, backward and the SGD update; its per-sample
    /// results join `pending` (read back every [`READ_EVERY`] steps, not every step, so the
    /// host never waits for the device inside a step).
    fn step(
        &mut self,
        batch: &Batch,
        epoch: usize,
        pending: &mut Pending,
        waits: &mut Waits,
    ) -> Result<()> {
        let [c, h, w] = self.input_shape();
        let p = self.p;
        self.sums.lr = lr_at(
            p.lr,
            &p.schedule,
            p.epochs,
            p.warmup_epochs,
            epoch,
            batch.index as f64 / self.steps as f64,
        );
        let t_upload = Instant::now();
        let images = batch.len() * batch.views.max(1);
        let x = self
            .feeder
            .upload(&batch.images, (images, c, h, w), &self.device)?;
        waits.upload += t_upload.elapsed().as_secs_f64();
        let (per_sample, predictions) = match &mut self.head {
            Some(phase) => phase.loss(&self.model, &x, batch, self.k)?,
            None => self.student_loss(&x, batch, epoch)?,
        };
        let grads = self.model.net.backward(&per_sample.mean_all()?)?;
        self.opt.step(&grads, self.sums.lr)?;
        pending.push(
            per_sample.detach().to_dtype(DType::F32)?,
            predictions,
            &batch.labels,
            batch.index,
        );
        self.step += 1;
        self.bar.inc(1);
        Ok(())
    }

    /// The student's forward pass and the method's loss of each image of the batch (`x`, all
    /// its views), with the student's predictions on the batch's originals.
    fn student_loss(
        &mut self,
        x: &Tensor,
        batch: &Batch,
        epoch: usize,
    ) -> Result<(Tensor, Tensor)> {
        let p = self.p;
        // Dropout masks from (seed, epoch, batch): a resumed run draws the same ones.
        let mode = Mode::train(derive_seed(&[
            self.seed,
            stream::DROPOUT,
            epoch as u64,
            batch.index as u64,
        ]));
        let input = if self.compute == DType::F32 {
            x.clone()
        } else {
            x.to_dtype(self.compute)?
        };
        let (features, logits) = if p.method.uses_features() {
            let (f, l) = self.model.net.features_and_logits(&input, mode)?;
            (Some(f), l)
        } else {
            (None, self.model.net.forward_mode(&input, mode)?)
        };
        if let Some(r) = &mut self.replay {
            let mut rows = r.epoch.as_mut().expect("opened").next_step(batch)?;
            rows.truncate(r.used);
            if r.feeds.len() < rows.len() {
                r.feeds.resize_with(rows.len(), Feeder::new);
            }
            let mut outputs = Vec::with_capacity(rows.len());
            for (feed, v) in r.feeds.iter_mut().zip(&rows) {
                outputs.push(feed.upload(v, (batch.len(), self.k), &self.device)?);
            }
            self.supervision.set_replayed(outputs, r.meta.output);
        }
        let per_sample =
            self.supervision
                .per_sample_loss(&logits, features.as_ref(), x, batch, epoch)?;
        let originals = logits.detach().narrow(0, 0, batch.len())?;
        Ok((per_sample, originals.argmax(1)?))
    }

    /// Reads the pending steps' results into the epoch's sums (one wait for the device).
    fn read(&mut self, pending: &mut Pending, epoch: usize, waits: &mut Waits) -> Result<()> {
        let t_read = Instant::now();
        pending.read(&mut self.sums, &self.ctx.name, epoch)?;
        waits.read += t_read.elapsed().as_secs_f64();
        Ok(())
    }

    /// The progress bar's message.
    fn message(&self, epoch: usize, timed_images: usize, t0: Instant) -> String {
        let sums = &self.sums;
        format!(
            "epoch {}/{} loss {:.3} acc {:.1}% {:.0} img/s",
            epoch + 1,
            self.p.epochs,
            sums.loss / sums.seen.max(1) as f64,
            100.0 * sums.correct as f64 / sums.seen.max(1) as f64,
            timed_images as f64 / t0.elapsed().as_secs_f64()
        )
    }

    /// Appends the finished epoch's row to the log.
    fn log_epoch(&mut self, epoch: usize) {
        let sums = &self.sums;
        let row = EpochRow {
            epoch: epoch + 1,
            lr: sums.lr,
            loss: sums.loss / sums.seen.max(1) as f64,
            accuracy: sums.correct as f64 / sums.seen.max(1) as f64,
            images_per_s: sums.seen as f64 / sums.seconds.max(1e-9),
            seconds: sums.seconds,
            class_loss: sums
                .class_loss
                .iter()
                .zip(&sums.class_seen)
                .map(|(l, &n)| (n > 0).then(|| l / n as f64))
                .collect(),
            eval: None,
        };
        tracing::info!(
            "{}: epoch {}/{} loss {:.4} train acc {:.2}% lr {:.4} {:.0} img/s",
            self.ctx.name,
            row.epoch,
            self.p.epochs,
            row.loss,
            100.0 * row.accuracy,
            row.lr,
            row.images_per_s
        );
        self.log.push(row);
    }

    /// Checkpoints the run at the current step: next is batch `batch` of epoch `epoch`, with
    /// `sums` of that epoch so far.
    fn save(&self, epoch: usize, batch: usize, sums: EpochSums) -> Result<()> {
        Ok(self.checkpoints.save(
            self.step,
            &self.model,
            &self.opt,
            &CheckpointState {
                fingerprint: self.ctx.fingerprint.clone(),
                step: self.step,
                epoch,
                batch,
                sums,
                log: self.log.clone(),
                ogr: self.ogr_points.clone(),
            },
            &self.extra_state()?,
        )?)
    }

    /// What a checkpoint keeps besides the model and the optimiser: CRD's heads and memories,
    /// the SSKD student's head, or the `sskd-head` stage's head.
    fn extra_state(&self) -> Result<std::collections::BTreeMap<String, Tensor>> {
        let s = &self.supervision;
        Ok(match (&s.crd, &s.sskd, &self.head) {
            (Some(c), _, _) => c.state()?,
            (_, Some(s), _) => s.state(),
            (_, _, Some(h)) => h.head.state(),
            _ => Default::default(),
        })
    }

    /// `eval_every`: the model on the held-out split after every that many epochs and the last,
    /// into the epoch's log row (before its checkpoint, so a resumed run logs the same).
    fn evaluate_epoch(&mut self, epoch: usize) -> Result<()> {
        let every = self.p.eval_every;
        let done = epoch + 1;
        if every == 0 || !(done.is_multiple_of(every) || done == self.p.epochs) {
            return Ok(());
        }
        let (split, store) = self.eval_split();
        let probs = self
            .inference()
            .predict(store, &format!("evaluating epoch {done} on {split}"))?;
        // Not held through the epochs until the next evaluation.
        self.model.net.release_inference();
        let m = metrics::compute(&probs, &store.labels(), self.k, EVAL_BINS);
        tracing::info!(
            "{}: epoch {done}/{}: {split} acc {:.2}% NLL {:.4} ECE {:.4}",
            self.ctx.name,
            self.p.epochs,
            100.0 * m.accuracy,
            m.nll,
            m.ece
        );
        if let Some(row) = self.log.last_mut() {
            row.eval = Some(EpochEval {
                nll: m.nll,
                accuracy: m.accuracy,
                ece: m.ece,
            });
        }
        Ok(())
    }

    /// The split `eval_every` evaluates on: `val` when the dataset holds one out, else `test`.
    pub(super) fn eval_split(&self) -> (&'static str, &Arc<PackedStore>) {
        match &self.data.val {
            Some(v) => ("val", v),
            None => ("test", &self.data.test),
        }
    }

    /// OGR: per-class losses every `ogr_every` epochs, and the class weights from the last two
    /// measurements.
    fn measure_ogr(&mut self, epoch: usize) -> Result<()> {
        let Some((train_set, val_set)) = &self.ogr_sets else {
            return Ok(());
        };
        if !epoch.is_multiple_of(self.p.ogr_every.max(1))
            || self.ogr_points.iter().any(|q| q.epoch == epoch)
        {
            return Ok(());
        }
        let point = OgrPoint {
            epoch,
            train: self.class_losses(train_set, "OGR: training losses")?,
            val: self.class_losses(val_set, "OGR: validation losses")?,
        };
        self.model.net.release_inference();
        self.ogr_points.push(point);
        if let [.., a, b] = &self.ogr_points[..] {
            self.supervision.class_weights = ogr_weights(&ogr(a, b));
        }
        Ok(())
    }

    /// Mean loss of each class's images of `store`, in eval mode.
    fn class_losses(&self, store: &Arc<PackedStore>, what: &str) -> Result<Vec<f64>> {
        let k = self.k;
        let probs = self.inference().predict(store, what)?;
        let (mut sum, mut n) = (vec![0f64; k], vec![0usize; k]);
        for (row, y) in probs.chunks_exact(k).zip(store.labels()) {
            sum[y as usize] -= (row[y as usize] as f64).max(1e-30).ln();
            n[y as usize] += 1;
        }
        Ok(sum
            .iter()
            .zip(&n)
            .map(|(s, &c)| if c == 0 { 0.0 } else { s / c as f64 })
            .collect())
    }

    /// The shape of the images the model is fed: the loader's view of the packed images.
    pub(super) fn input_shape(&self) -> [usize; 3] {
        let (c, h, w) = self.loader.image_dims();
        [c, h, w]
    }

    /// Eval-mode inference with the model being trained.
    pub(super) fn inference(&self) -> Inference<'_> {
        Inference {
            model: &self.model,
            device: &self.device,
            normalize: &self.data.info.normalize,
            view: View::centre_or_whole(self.p.crop_size),
            batch_size: self.p.batch_size.max(256),
            temperature: 1.0,
            workers: self.ctx.threads,
            progress: self.ctx,
        }
    }
}

/// The stored distributions an offline method learns from: one source (`off-ldl`'s teacher or
/// `label_source`, `off-en-ldl`'s ensemble) or every teacher's (`off-mt-ldl`).
fn stored_labels(ctx: &Context, p: &Params, data: &Dataset) -> Result<Vec<SoftLabels>> {
    if !p.method.reads_labels() {
        return Ok(Vec::new());
    }
    let path = ctx.input(Kind::Label).dir.join("labels.parquet");
    let meta = label_store::read_meta(&path)?;
    let teachers: Vec<String> = meta.teachers.keys().cloned().collect();
    let sources: Vec<String> = match p.method {
        Method::OffLdl => vec![match (&p.label_source, teachers.as_slice()) {
            (Some(s), _) => s.clone(),
            (None, [only]) => only.clone(),
            (None, _) => {
                return Err(StageError::config(format!(
                    "{}: {} holds the labels of teachers {teachers:?}: name the one to learn from \
                     with `label_source`, or use `off-en-ldl` (their mean) or `off-mt-ldl` (all of them)",
                    ctx.name,
                    path.display()
                )))
            }
        }],
        Method::OffEnLdl if teachers.len() < 2 => {
            return Err(StageError::config(format!(
                "{}: off-en-ldl learns from the `ensemble` source, which a label stage writes \
                 only with two or more teachers; {} has {teachers:?}",
                ctx.name,
                path.display()
            )))
        }
        Method::OffEnLdl => vec!["ensemble".into()],
        _ => teachers,
    };
    let mut out = Vec::with_capacity(sources.len());
    for source in &sources {
        out.push(label_store::read(
            &path,
            source,
            data.train.len(),
            &data.info.classes,
            &data.train.hash(),
        )?);
    }
    Ok(out)
}

/// The OGR methods' splits: training and validation.
fn ogr_sets(
    ctx: &Context,
    p: &Params,
    data: &Dataset,
) -> Result<Option<(Arc<PackedStore>, Arc<PackedStore>)>> {
    if !p.method.uses_ogr() {
        return Ok(None);
    }
    match &data.val {
        Some(val) => Ok(Some((data.train.clone(), val.clone()))),
        None => Err(StageError::config(format!(
            "{}: method `{}` measures per-class validation losses: the prepare stage \
             must hold out a validation split (`val = N`)",
            ctx.name,
            p.method.as_str()
        ))),
    }
}

/// The replay store of `p.replay`, checked against this training's stream, data, teachers and
/// K; `None` when the teachers run online.
fn replay(ctx: &Context, p: &Params, data: &Dataset, k: usize) -> Result<Option<Replay>> {
    if !p.replay {
        return Ok(None);
    }
    let input = ctx.input(Kind::Replay);
    let name = &input.name;
    let meta = replay_store::read_meta(&input.dir)?;
    // kd, wsl and on-ldl run their first teacher only; the ensembles all of them.
    let mut teachers = ctx.teacher_refs();
    teachers.truncate(p.method.teachers_run(teachers.len()));
    meta.check(
        &input.dir,
        &Want {
            stream: &p.stream(),
            epochs: p.epochs,
            dataset: &data.train.hash(),
            classes: k,
            teachers: &teachers,
            teacher_mc: p.teacher_mc,
            logits: matches!(p.method, Method::Kd | Method::Wsl),
        },
    )?;
    tracing::info!(
        "{}: reading the teachers' outputs from the replay store `{name}`",
        ctx.name
    );
    Ok(Some(Replay {
        dir: input.dir.clone(),
        meta,
        used: teachers.len(),
        epoch: None,
        feeds: Vec::new(),
    }))
}

/// CRD's heads and memories for a `crd` or `crd-kd` student (`None` for the other methods):
/// over the training split's images, between the student's and the first teacher's features.
fn crd(
    p: &Params,
    model: &Model,
    supervision: &Supervision,
    data: &Dataset,
    seed: u64,
    device: &Device,
) -> Result<Option<Crd>> {
    if !p.method.is_crd() {
        return Ok(None);
    }
    let teacher = supervision
        .teachers
        .first()
        .ok_or_else(|| StageError::config(format!("`{}` needs a teacher", p.method.as_str())))?;
    Ok(Some(Crd::new(
        p.supervision().crd,
        model.net.feature_dim(),
        teacher.model.net.feature_dim(),
        &data.train.labels(),
        data.info.classes.len(),
        seed,
        device,
    )?))
}

/// SSKD's heads for an `sskd` student (`None` for the other methods): the teacher's, trained by
/// the `sskd-head` stage in `needs`, and the student's own, drawn from `seed`.
fn sskd(
    ctx: &Context,
    p: &Params,
    model: &Model,
    supervision: &Supervision,
    seed: u64,
    device: &Device,
) -> Result<Option<Sskd>> {
    if p.method != Method::Sskd {
        return Ok(None);
    }
    let teacher = supervision
        .teachers
        .first()
        .ok_or_else(|| StageError::config("`sskd` needs a teacher"))?;
    Ok(Some(Sskd::new(
        p.supervision().sskd,
        &ctx.model_input().dir,
        teacher.model.net.feature_dim(),
        model.net.feature_dim(),
        seed,
        device,
    )?))
}

/// The network the stage trains, and its description: a new student of `p`'s architecture, or
/// for `sskd-head` the teacher in `needs` (frozen) with the head being trained.
fn model_to_train(
    ctx: &Context,
    p: &Params,
    data: &Dataset,
    seed: u64,
    device: &Device,
) -> Result<(ModelSpec, Model, Option<HeadPhase>)> {
    let k = data.info.classes.len();
    if p.method == Method::SskdHead {
        let (phase, model) = HeadPhase::new(ctx, k, &data.info.normalize, seed, device)?;
        return Ok((phase.teacher.spec.clone(), model, Some(phase)));
    }
    let spec = ModelSpec {
        arch: p.model.clone(),
        width: match p.width {
            Some(w) => w,
            None => Arch::parse(&p.model)?.default_width(),
        },
        shortcut: p.shortcut,
        classes: k,
        in_channels: data.info.shape[0],
        stem: p.stem,
        dropout: p.dropout,
    };
    let mut model = Model::new(&spec, device, derive_seed(&[seed, stream::INIT]))?;
    // The planned step gives the autograd path's results bitwise (engine::models::plan); the
    // trainer takes every gradient through Net::backward, as the plan requires.
    let planned = engine::models::plan::wanted(device).then_some(p.dtype.dtype());
    model.net.plan_training(planned);
    // Its held-out evaluations (`eval_every`, OGR's class losses) take the planned
    // evaluation-mode passes too: bitwise the layers' outputs, in a few reused buffers.
    model
        .net
        .plan_inference(engine::models::plan::wanted(device));
    Ok((spec, model, None))
}

/// A `crop_size` must fit in the packed images; SSKD rotates every image by quarter turns, so
/// its images must be square.
fn check_views(ctx: &Context, p: &Params, data: &Dataset) -> Result<()> {
    let stream = p.stream();
    stream.check_view(&ctx.name, data.info.shape, data.info.varying)?;
    let [_, ph, pw] = data.info.shape;
    let (h, w) = stream.view.dims((ph, pw));
    if p.method.uses_rotations() && h != w {
        return Err(StageError::config(format!(
            "{}: `{}` trains on the four rotations of each image, which needs square images; \
             the prepared dataset's are {h}×{w}",
            ctx.name,
            p.method.as_str()
        )));
    }
    Ok(())
}
