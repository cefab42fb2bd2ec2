//! Batched eval-mode inference over a whole packed split, in store order, shared by the `label`
//! and `evaluate` stages; and Monte-Carlo dropout inference (BatchNorm in eval mode, dropout
//! active) summarised per sample.

use crate::error::Result;
use crate::models::Model;
use candle_core::{Device, Tensor, D};
use datasets::augment::{Augment, Normalize};
use datasets::view::View;
use datasets::{Loader, LoaderConfig, PackedStore};
use indicatif::ProgressBar;
use std::ops::Range;
use std::sync::Arc;

/// How to run a model over a split.
pub struct Inference<'a> {
    /// The model, used in eval mode.
    pub model: &'a Model,
    /// The device its weights live on.
    pub device: &'a Device,
    /// Input normalisation of the dataset.
    pub normalize: &'a Normalize,
    /// The part of each image the model sees: its centre square for a model trained on crops of
    /// that size, else the whole image.
    pub view: View,
    /// Images per batch.
    pub batch_size: usize,
    /// Softmax temperature τ.
    pub temperature: f64,
    /// Loader threads (at least one is used).
    pub workers: usize,
    /// Where the progress bars go.
    pub progress: &'a dyn Progress,
}

/// Where long loops report progress: a bar of `len` steps labelled `what` (the stages give
/// theirs a prefix naming the stage).
pub trait Progress {
    /// A new progress bar.
    fn bar(&self, len: u64, what: &str) -> ProgressBar;
}

/// Per-sample summary of S Monte-Carlo dropout passes, each `N × K` or `N` row-major.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct McSummary {
    /// Mean of the S softmax distributions.
    pub mean: Vec<f32>,
    /// Per-class standard deviation over the passes (population: divided by S).
    pub std: Vec<f32>,
    /// Entropy of the mean distribution, in nats (the total uncertainty).
    pub entropy: Vec<f32>,
    /// Mutual information between the prediction and the dropout mask: the entropy of the mean
    /// minus the mean entropy of the passes, in nats (the epistemic part), clamped at 0.
    pub mutual_information: Vec<f32>,
}

fn entropy(p: &[f32]) -> f64 {
    -p.iter()
        .filter(|&&v| v > 0.0)
        .map(|&v| v as f64 * (v as f64).ln())
        .sum::<f64>()
}

impl Inference<'_> {
    /// The softmax of `logits` at this inference's temperature τ, row by row.
    fn softmax(&self, logits: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::softmax(&(logits / self.temperature)?, D::Minus1)
    }

    fn loader(&self, store: &Arc<PackedStore>) -> Loader {
        Loader::new(
            store.clone(),
            LoaderConfig {
                batch_size: self.batch_size,
                shuffle: false,
                drop_last: false,
                view: self.view,
                augment: Augment::NONE,
                normalize: self.normalize.clone(),
                mix: datasets::mix::Mix::None {},
                workers: self.workers.max(1),
                prefetch: 2,
                seed: 0,
                rotations: false,
            },
        )
    }

    /// `samples` Monte-Carlo dropout passes over every image of `store`, summarised per sample.
    /// The features are computed once per batch and only the dropout and classifier are
    /// resampled; pass `s` of batch `b` draws its masks from (seed, MC stream, b, s).
    pub fn predict_mc(
        &self,
        store: &Arc<PackedStore>,
        samples: usize,
        seed: u64,
        what: &str,
    ) -> Result<McSummary> {
        self.predict_mc_batches(store, 0..self.batches(store), samples, seed, what)
    }

    /// [`predict_mc`](Self::predict_mc) over the batches `batches` of the split only: the
    /// images of those batches, with the masks of those batch numbers, so that any partition of
    /// the batches gives, concatenated, the whole split's result bit for bit.
    pub fn predict_mc_batches(
        &self,
        store: &Arc<PackedStore>,
        batches: Range<usize>,
        samples: usize,
        seed: u64,
        what: &str,
    ) -> Result<McSummary> {
        self.mc_batches(store, batches, samples, seed, what, None)
    }

    /// [`predict_batches`](Self::predict_batches) and
    /// [`predict_mc_batches`](Self::predict_mc_batches) over the same batches from one
    /// computation of each batch's features: the eval-mode probabilities (bit for bit those of
    /// `predict_batches`: the same features through the classifier without dropout) and the
    /// Monte-Carlo summary. A teacher with dropout is labelled both ways, at the cost of one.
    pub fn predict_with_mc_batches(
        &self,
        store: &Arc<PackedStore>,
        batches: Range<usize>,
        samples: usize,
        seed: u64,
        what: &str,
    ) -> Result<(Vec<f32>, McSummary)> {
        let mut probs = Vec::with_capacity(self.images_in(store, &batches) * store.info().k());
        let mc = self.mc_batches(store, batches, samples, seed, what, Some(&mut probs))?;
        Ok((probs, mc))
    }

    /// The Monte-Carlo summary of the batches, and their eval-mode probabilities into `eval`
    /// when given.
    fn mc_batches(
        &self,
        store: &Arc<PackedStore>,
        batches: Range<usize>,
        samples: usize,
        seed: u64,
        what: &str,
        mut eval: Option<&mut Vec<f32>>,
    ) -> Result<McSummary> {
        let (n, k) = (self.images_in(store, &batches), store.info().k());
        let mut out = McSummary {
            mean: Vec::with_capacity(n * k),
            std: Vec::with_capacity(n * k),
            entropy: Vec::with_capacity(n),
            mutual_information: Vec::with_capacity(n),
        };
        let s = samples.max(1);
        self.for_each_batch_in(store, batches, what, |batch, x| {
            let b = batch.len();
            let features = self.model.net.features_t(x, false)?;
            if let Some(out) = eval.as_deref_mut() {
                let logits = self.model.net.head_with_dropout(&features, None)?;
                out.extend(self.softmax(&logits)?.flatten_all()?.to_vec1::<f32>()?);
            }
            let mut sum = vec![0f64; b * k];
            let mut sq = vec![0f64; b * k];
            let mut mean_entropy = vec![0f64; b];
            for pass in 0..s {
                let mask_seed = datasets::rng::derive_seed(&[
                    seed,
                    datasets::rng::stream::MC_DROPOUT,
                    batch.index as u64,
                    pass as u64,
                ]);
                let logits = self
                    .model
                    .net
                    .head_with_dropout(&features, Some(mask_seed))?;
                let probs = self.softmax(&logits)?.flatten_all()?.to_vec1::<f32>()?;
                for (i, row) in probs.chunks_exact(k).enumerate() {
                    mean_entropy[i] += entropy(row) / s as f64;
                    for (c, &p) in row.iter().enumerate() {
                        sum[i * k + c] += p as f64;
                        sq[i * k + c] += p as f64 * p as f64;
                    }
                }
            }
            for i in 0..b {
                let at = out.mean.len();
                out.mean
                    .extend((0..k).map(|c| (sum[i * k + c] / s as f64) as f32));
                out.std.extend((0..k).map(|c| {
                    let m = sum[i * k + c] / s as f64;
                    ((sq[i * k + c] / s as f64 - m * m).max(0.0)).sqrt() as f32
                }));
                let h = entropy(&out.mean[at..]);
                out.entropy.push(h as f32);
                out.mutual_information
                    .push((h - mean_entropy[i]).max(0.0) as f32);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Runs the model's batches over every image of `store`, in store order, in eval mode:
    /// `f(batch, images)` receives each batch and its images on the device; `what` labels the
    /// progress bar.
    pub fn for_each_batch(
        &self,
        store: &Arc<PackedStore>,
        what: &str,
        f: impl FnMut(&datasets::Batch, &Tensor) -> Result<()>,
    ) -> Result<()> {
        self.for_each_batch_in(store, 0..self.batches(store), what, f)
    }

    /// The number of batches of `store`: the last one may be short.
    pub fn batches(&self, store: &Arc<PackedStore>) -> usize {
        self.loader(store).batches_per_epoch()
    }

    /// The number of images in the batches `batches` of `store`.
    pub fn images_in(&self, store: &Arc<PackedStore>, batches: &Range<usize>) -> usize {
        let b = self.batch_size.max(1);
        (batches.end * b).min(store.len()) - (batches.start * b).min(store.len())
    }

    /// [`for_each_batch`](Self::for_each_batch) over the batches `batches` only (numbered as
    /// in the whole split).
    pub fn for_each_batch_in(
        &self,
        store: &Arc<PackedStore>,
        batches: Range<usize>,
        what: &str,
        mut f: impl FnMut(&datasets::Batch, &Tensor) -> Result<()>,
    ) -> Result<()> {
        let loader = self.loader(store);
        let (c, h, w) = loader.image_dims();
        let bar = self.progress.bar(batches.len() as u64, what);
        let mut it = loader.epoch_range(0, batches);
        while let Some(batch) = it.next() {
            let x = Tensor::from_slice(&batch.images, (batch.len(), c, h, w), self.device)?;
            f(&batch, &x)?;
            bar.inc(1);
            it.recycle(batch);
        }
        bar.finish_and_clear();
        Ok(())
    }

    /// Logits of every image of `store`, `N × K` row-major, in store order (eval mode; the
    /// temperature is not applied).
    pub fn logits(&self, store: &Arc<PackedStore>, what: &str) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(store.len() * store.info().k());
        self.for_each_batch(store, what, |_, x| {
            let logits = self.model.net.forward_t(x, false)?;
            out.extend(logits.flatten_all()?.to_vec1::<f32>()?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Softmax probabilities at temperature τ of every image of `store`, `N × K` row-major, in
    /// store order; `what` labels the progress bar.
    pub fn predict(&self, store: &Arc<PackedStore>, what: &str) -> Result<Vec<f32>> {
        self.predict_batches(store, 0..self.batches(store), what)
    }

    /// [`predict`](Self::predict) over the batches `batches` of the split only.
    pub fn predict_batches(
        &self,
        store: &Arc<PackedStore>,
        batches: Range<usize>,
        what: &str,
    ) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(self.images_in(store, &batches) * store.info().k());
        self.for_each_batch_in(store, batches, what, |_, x| {
            let logits = self.model.net.forward_t(x, false)?;
            out.extend(self.softmax(&logits)?.flatten_all()?.to_vec1::<f32>()?);
            Ok(())
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ModelSpec;
    use datasets::packed::PackedWriter;
    use datasets::synthetic::SyntheticSpec;

    struct Quiet;
    impl Progress for Quiet {
        fn bar(&self, _: u64, _: &str) -> ProgressBar {
            ProgressBar::hidden()
        }
    }

    /// Labelling a dropout teacher both ways from one pass over its features gives, bit for
    /// bit, what the two separate passes give.
    #[test]
    fn probabilities_and_mc_summary_from_one_pass_equal_two_passes() {
        let spec = SyntheticSpec {
            classes: 3,
            image_size: 8,
            ..Default::default()
        };
        let (info, labels, pixels) = spec.generate(1, 0, 21).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.pack");
        PackedWriter::write(&path, &info, &labels, &pixels).unwrap();
        let store = Arc::new(PackedStore::open(&path).unwrap());
        let mut model_spec = ModelSpec::new("resnet8", 3, 3).unwrap();
        model_spec.width = 4;
        model_spec.dropout = 0.3;
        let device = Device::Cpu;
        let model = Model::new(&model_spec, &device, 7).unwrap();
        let normalize = Normalize {
            mean: vec![0.5; 3],
            std: vec![0.25; 3],
        };
        let inference = Inference {
            model: &model,
            device: &device,
            normalize: &normalize,
            view: View::Whole,
            batch_size: 8,
            temperature: 2.0,
            workers: 1,
            progress: &Quiet,
        };
        // Batches 1 and 2 of 3: the last one short.
        let probs = inference.predict_batches(&store, 1..3, "p").unwrap();
        let mc = inference
            .predict_mc_batches(&store, 1..3, 5, 11, "mc")
            .unwrap();
        let (both_probs, both_mc) = inference
            .predict_with_mc_batches(&store, 1..3, 5, 11, "both")
            .unwrap();
        assert_eq!(probs.len(), 13 * 3);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&both_probs), bits(&probs));
        assert_eq!(both_mc, mc);
        // Dropout is active in the passes: their mean is not the eval-mode distribution.
        assert_ne!(bits(&mc.mean), bits(&probs));
    }
}
