//! Batched eval-mode inference over a whole packed split, in store order, shared by the `label`
//! and `evaluate` stages.

use crate::context::Context;
use crate::error::Result;
use crate::models::Model;
use candle_core::{Device, Tensor, D};
use datasets::augment::{Augment, Normalize};
use datasets::{Loader, LoaderConfig, PackedStore};
use std::sync::Arc;

/// Softmax probabilities at temperature `tau` of every image of `store`, `N × K` row-major.
pub fn predict(
    ctx: &Context,
    model: &Model,
    store: &Arc<PackedStore>,
    normalize: &Normalize,
    batch_size: usize,
    tau: f64,
    device: &Device,
    what: &str,
) -> Result<Vec<f32>> {
    let info = store.info().clone();
    let loader = Loader::new(
        store.clone(),
        LoaderConfig {
            batch_size,
            shuffle: false,
            drop_last: false,
            augment: Augment::NONE,
            normalize: normalize.clone(),
            workers: ctx.threads.max(1),
            prefetch: 2,
            seed: 0,
        },
    );
    let bar = ctx.bar(loader.batches_per_epoch() as u64, what);
    let mut out = Vec::with_capacity(store.len() * info.k());
    let mut it = loader.epoch(0, 0);
    while let Some(batch) = it.next() {
        let x = Tensor::from_slice(&batch.images, (batch.len(), info.c, info.h, info.w), device)?;
        let logits = model.net.forward_t(&x, false)?;
        let probs = candle_nn::ops::softmax(&(logits / tau)?, D::Minus1)?;
        out.extend(probs.flatten_all()?.to_vec1::<f32>()?);
        bar.inc(1);
        it.recycle(batch);
    }
    bar.finish_and_clear();
    Ok(out)
}
