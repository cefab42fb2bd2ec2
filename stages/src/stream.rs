//! A training's batch stream: which shuffled, augmented and mixed batches a student sees, as
//! settings and a data seed. Two trainings with the same stream see the same images in the same
//! batches, whatever their models, schedules or initialisation seeds, which is what lets a
//! replay store ([`crate::replay_store`]) computed once stand in for a teacher run on every step.

use datasets::augment::{Augment, Normalize};
use datasets::mix::Mix;
use datasets::view::View;
use datasets::{Batch, Loader, LoaderConfig, PackedStore};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Per-image training augmentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AugmentName {
    /// None.
    None,
    /// Random crop with 4 pixels of zero padding and horizontal flip.
    CropFlip,
    /// torchvision's `RandomResizedCrop(crop_size, crop_scale, crop_ratio)` and horizontal flip,
    /// ImageNet's training augmentation.
    RandomResizedCrop,
}

/// torchvision's `RandomResizedCrop` default area range.
pub const CROP_SCALE: [f64; 2] = [0.08, 1.0];
/// torchvision's `RandomResizedCrop` default aspect-ratio range.
pub const CROP_RATIO: [f64; 2] = [3.0 / 4.0, 4.0 / 3.0];

/// The crop a training's images are seen through (the `crop_size`, `crop_scale` and
/// `crop_ratio` keys): a random resized crop with `random-resized-crop`, else the centre square
/// of `crop_size` (also what evaluation sees of a model trained with a `crop_size`), else the
/// whole image.
pub fn training_view(
    augment: AugmentName,
    crop_size: Option<usize>,
    scale: [f64; 2],
    ratio: [f64; 2],
) -> View {
    match (augment, crop_size) {
        (AugmentName::RandomResizedCrop, Some(side)) => View::RandomResized { side, scale, ratio },
        _ => View::centre_or_whole(crop_size),
    }
}

/// Why the crop keys of a train or replay stage do not go together, naming the key.
pub fn check_crop(
    augment: AugmentName,
    crop_size: Option<usize>,
    scale: [f64; 2],
    ratio: [f64; 2],
) -> Result<(), (&'static str, String)> {
    if augment == AugmentName::RandomResizedCrop && crop_size.is_none() {
        return Err((
            "crop_size",
            "is required with `augment = \"random-resized-crop\"`: the side of its output (e.g. 224)".into(),
        ));
    }
    if crop_size == Some(0) {
        return Err(("crop_size", "must be at least 1".into()));
    }
    if augment != AugmentName::RandomResizedCrop {
        for (key, v, default) in [
            ("crop_scale", scale, CROP_SCALE),
            ("crop_ratio", ratio, CROP_RATIO),
        ] {
            if v != default {
                return Err((
                    key,
                    "is used only with `augment = \"random-resized-crop\"`".into(),
                ));
            }
        }
    }
    let view = training_view(augment, crop_size, scale, ratio);
    match view.check((usize::MAX, usize::MAX)) {
        Err(msg) if msg.starts_with("scale") => Err(("crop_scale", msg)),
        Err(msg) if msg.starts_with("ratio") => Err(("crop_ratio", msg)),
        Err(msg) => Err(("crop_size", msg)),
        Ok(()) => Ok(()),
    }
}

/// The settings that fix a training's batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchStream {
    /// Images per batch.
    pub batch_size: usize,
    /// Per-image augmentation.
    pub augment: AugmentName,
    /// Side of a Cutout square (0: none).
    pub cutout: usize,
    /// Batch-level mixing.
    pub mix: Mix,
    /// Seed of the order, the augmentation and the mixing.
    pub data_seed: u64,
    /// Each image in its four rotations (SSKD's batches; see [`datasets::loader::ROTATIONS`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rotations: bool,
    /// The part of each image the batches hold ([`training_view`]).
    #[serde(default, skip_serializing_if = "View::is_whole")]
    pub view: View,
}

impl BatchStream {
    /// Refuses a view that a prepared dataset's images (of `shape`; of `varying` sizes, at
    /// least that) cannot give: a crop larger than them, or the whole image of images that
    /// vary in size; named with stage `stage`.
    pub fn check_view(
        &self,
        stage: &str,
        [_, h, w]: [usize; 3],
        varying: bool,
    ) -> crate::error::Result<()> {
        if varying && self.view.is_whole() {
            return Err(crate::error::StageError::config(format!(
                "{stage}: the prepared dataset's images vary in size (`keep_aspect = true`), \
                 so a batch can only hold crops of them: set `crop_size` (e.g. 224 with \
                 `augment = \"random-resized-crop\"`)"
            )));
        }
        self.view.check((h, w)).map_err(|why| {
            let (side, _) = self.view.dims((h, w));
            crate::error::StageError::config(format!(
                "{stage}: `crop_size = {side}` is larger than the prepared dataset's {}: \
                 {why} (prepare it at `image_size` ≥ {side})",
                images_of(h, w, varying)
            ))
        })
    }

    /// The loader of the stream over `split`, normalised by `normalize`, with `workers` threads
    /// each building up to `prefetch` batches ahead.
    pub fn loader(
        &self,
        split: &Arc<PackedStore>,
        normalize: &Normalize,
        workers: usize,
        prefetch: usize,
    ) -> Loader {
        Loader::new(
            split.clone(),
            LoaderConfig {
                batch_size: self.batch_size,
                shuffle: true,
                drop_last: false,
                view: self.view,
                augment: Augment {
                    cutout: self.cutout,
                    ..match self.augment {
                        AugmentName::None => Augment::NONE,
                        AugmentName::CropFlip => Augment::CROP_FLIP,
                        AugmentName::RandomResizedCrop => Augment::FLIP,
                    }
                },
                normalize: normalize.clone(),
                mix: self.mix,
                workers: workers.max(1),
                prefetch,
                seed: self.data_seed,
                rotations: self.rotations,
            },
        )
    }
}

/// How a prepared dataset's images of `h`×`w` (with `varying`: at least that) are named in
/// messages.
pub fn images_of(h: usize, w: usize, varying: bool) -> String {
    if varying {
        format!("images (kept whole, each at least {h}×{w})")
    } else {
        format!("{h}×{w} images")
    }
}

/// A batch's digest: blake3 of its number, its images' positions in the split and its pixels
/// as the model receives them (augmented, mixed, normalised), as 32 hex digits. Equal digests
/// mean the same images, so a replayed teacher output belongs to the batch it is used for.
pub fn digest(batch: &Batch) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&(batch.index as u64).to_le_bytes());
    for i in &batch.indices {
        h.update(&i.to_le_bytes());
    }
    h.update(bytemuck::cast_slice(&batch.images));
    h.finalize().to_hex()[..32].to_string()
}
