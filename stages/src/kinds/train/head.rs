//! SSKD's first phase as a train stage (`method = "sskd-head"`): the one model in `needs`, the
//! teacher, frozen in eval mode, and its self-supervised projection head, the only thing the
//! optimiser updates. The stage's model is the teacher itself (its weights are written out
//! unchanged, with the head beside them), so an `sskd` student reads both from one folder.

use crate::artifacts::TrainedModel;
use crate::context::Context;
use crate::error::Result;
use crate::science::sskd::{self, ProjectionHead};
use crate::science::supervision::renormalization;
use candle_core::{DType, Device, Tensor};
use datasets::augment::Normalize;
use datasets::loader::Batch;
use engine::feed::Feeder;
use engine::models::Model;

/// The teacher's description, the head being trained, and what feeds the teacher.
pub(super) struct HeadPhase {
    /// The teacher's `model.json`: the head stage's model is the teacher, described as it was
    /// (its normalisation, where it was imported from).
    pub(super) teacher: TrainedModel,
    pub(super) head: ProjectionHead,
    /// The teacher's own input normalisation, when it differs from the dataset's.
    renormalize: Option<(Tensor, Tensor)>,
    labels_feed: Feeder,
}

impl HeadPhase {
    /// Loads the stage's one model input as the frozen teacher (returned with the phase) and
    /// draws its head from `seed`.
    pub(super) fn new(
        ctx: &Context,
        k: usize,
        dataset: &Normalize,
        seed: u64,
        device: &Device,
    ) -> Result<(HeadPhase, Model)> {
        // The frozen teacher runs in evaluation mode on every batch (planned: see
        // `TrainedModel::load`).
        let (teacher, model) = TrainedModel::load(&ctx.model_input().dir, device, k)?;
        let renormalize = match &teacher.normalize {
            Some(own) if own != dataset => Some(renormalization(dataset, own, device)?),
            _ => None,
        };
        let head = ProjectionHead::new(sskd::TEACHER_HEAD, model.net.feature_dim(), seed, device)?;
        let phase = HeadPhase {
            teacher,
            head,
            renormalize,
            labels_feed: Feeder::new(),
        };
        Ok((phase, model))
    }

    /// The loss of each original image of the batch (`x`: its `4B` views, view-major) and the
    /// log's predictions ([`sskd::head_predictions`]).
    pub(super) fn loss(
        &mut self,
        teacher: &Model,
        x: &Tensor,
        batch: &Batch,
        k: usize,
    ) -> Result<(Tensor, Tensor)> {
        let b = batch.len();
        let x = match &self.renormalize {
            None => x.clone(),
            Some((scale, shift)) => x.broadcast_mul(scale)?.broadcast_add(shift)?,
        };
        let features = teacher.net.features_t(&x, false)?.detach();
        let rep = self.head.forward(&features.to_dtype(DType::F32)?)?;
        let sims = sskd::similarities(&rep, b)?;
        let labels = self.labels_feed.upload_u32(&batch.labels, b, x.device())?;
        let predictions = sskd::head_predictions(&sims.detach(), &labels, k)?;
        Ok((sskd::head_loss(&sims, b)?, predictions))
    }
}
