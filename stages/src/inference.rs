//! Batched eval-mode inference over a whole packed split, in store order, shared by the `label`
//! and `evaluate` stages.

use crate::context::Context;
use crate::error::Result;
use crate::models::Model;
use candle_core::{Device, Tensor, D};
use datasets::augment::{Augment, Normalize};
use datasets::{Loader, LoaderConfig, PackedStore};
use std::sync::Arc;

/// How to run a model over a split.
pub struct Inference<'a> {
    /// The model, used in eval mode.
    pub model: &'a Model,
    /// The device its weights live on.
    pub device: &'a Device,
    /// Input normalisation of the dataset.
    pub normalize: &'a Normalize,
    /// Images per batch.
    pub batch_size: usize,
    /// Softmax temperature τ.
    pub temperature: f64,
}

impl Inference<'_> {
    /// Softmax probabilities at temperature τ of every image of `store`, `N × K` row-major, in
    /// store order; `what` labels the progress bar.
    pub fn predict(&self, ctx: &Context, store: &Arc<PackedStore>, what: &str) -> Result<Vec<f32>> {
        let info = store.info().clone();
        let loader = Loader::new(
            store.clone(),
            LoaderConfig {
                batch_size: self.batch_size,
                shuffle: false,
                drop_last: false,
                augment: Augment::NONE,
                normalize: self.normalize.clone(),
                mix: datasets::mix::Mix::None,
                workers: ctx.threads.max(1),
                prefetch: 2,
                seed: 0,
            },
        );
        let bar = ctx.bar(loader.batches_per_epoch() as u64, what);
        let mut out = Vec::with_capacity(store.len() * info.k());
        let mut it = loader.epoch(0, 0);
        while let Some(batch) = it.next() {
            let x = Tensor::from_slice(
                &batch.images,
                (batch.len(), info.c, info.h, info.w),
                self.device,
            )?;
            let logits = self.model.net.forward_t(&x, false)?;
            let probs = candle_nn::ops::softmax(&(logits / self.temperature)?, D::Minus1)?;
            out.extend(probs.flatten_all()?.to_vec1::<f32>()?);
            bar.inc(1);
            it.recycle(batch);
        }
        bar.finish_and_clear();
        Ok(out)
    }
}
