//! The multithreaded batch loader: worker threads build whole batches (read from the memory map,
//! augment, normalise, write `f32` NCHW into a recycled buffer) and hand them to the trainer
//! through bounded channels, so decoding overlaps training.
//!
//! Determinism: the epoch's order is a permutation drawn from (seed, epoch) and every batch's
//! augmentation draws come from (seed, epoch, batch), so the batches are identical whatever the
//! number of workers, and an epoch can be started at any batch to resume a killed run. Batch `b`
//! is built by worker `b mod W` and read from that worker's channel, which keeps order without a
//! reorder buffer. Mixing (mixup, CutMix, RICAP) draws from its own stream (seed, epoch, batch)
//! after the per-image augmentation, and its record travels with the batch. With `rotations`
//! (SSKD's self-supervision) each image comes in its four rotations, view-major: the batch's B
//! images as augmented, then the same B rotated by 90°, then by 180°, then by 270°.

use crate::augment::{augment_into, rotate_into, Augment, Normalize};
use crate::mix::{Mix, MixRecord};
use crate::packed::PackedStore;
use crate::rng::{rng_for, stream};
use crate::view::{View, ViewScratch};
use crossbeam_channel::{bounded, Receiver, Sender};
use rand::seq::SliceRandom;
use std::sync::Arc;
use std::thread::JoinHandle;

/// How the loader batches, orders and augments a split.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch_size: usize,
    /// Shuffle each epoch (training) or keep store order (evaluation).
    pub shuffle: bool,
    /// Drop the last incomplete batch.
    pub drop_last: bool,
    /// The part of each packed image the batch holds, and its size ([`View::Whole`]: all of it).
    pub view: View,
    /// Per-image augmentation, applied to the view.
    pub augment: Augment,
    /// Per-channel normalisation.
    pub normalize: Normalize,
    /// Batch-level mixing.
    pub mix: Mix,
    /// Worker threads (at least 1).
    pub workers: usize,
    /// Batches each worker may build ahead of the trainer.
    pub prefetch: usize,
    /// Seed of the permutation and augmentation streams.
    pub seed: u64,
    /// Emit every image in its [`ROTATIONS`] rotations (SSKD), `ROTATIONS × B` images per batch
    /// (square images only; no mixing).
    pub rotations: bool,
}

/// Views of each image in a batch with [`LoaderConfig::rotations`]: 0°, 90°, 180°, 270°.
pub const ROTATIONS: usize = 4;

/// One batch: images as `f32` NCHW, their labels and their positions in the split.
#[derive(Debug, Default)]
pub struct Batch {
    /// Position of the batch in its epoch.
    pub index: usize,
    /// `views × len × C × H × W` normalised pixels, view-major.
    pub images: Vec<f32>,
    /// Images per sample: 1, or [`ROTATIONS`] with [`LoaderConfig::rotations`].
    pub views: usize,
    /// Hard labels.
    pub labels: Vec<u32>,
    /// Positions of the images in the packed split.
    pub indices: Vec<u32>,
    /// What the mixing augmentation did ([`MixRecord::None`] without mixing).
    pub mix: MixRecord,
    /// The images before mixing (kept only when the batch was mixed), so a record can be
    /// re-applied or the unmixed images shown to a model.
    pub unmixed: Vec<f32>,
}

impl Batch {
    /// Number of images in the batch.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// A loader over one packed split.
#[derive(Debug, Clone)]
pub struct Loader {
    store: Arc<PackedStore>,
    config: LoaderConfig,
}

impl Loader {
    /// A loader over `store`.
    ///
    /// # Panics
    /// If the store's images vary in size and the view is [`View::Whole`]: a batch holds
    /// images of one size (stages refuse this configuration before they load).
    pub fn new(store: Arc<PackedStore>, config: LoaderConfig) -> Self {
        assert!(
            !(store.info().varying && config.view.is_whole()),
            "{}: its images vary in size, so batches need a crop view",
            store.path().display()
        );
        Loader { store, config }
    }

    /// Channels, height and width of each image of a batch: the view's.
    pub fn image_dims(&self) -> (usize, usize, usize) {
        let info = self.store.info();
        let (h, w) = self.config.view.dims((info.h, info.w));
        (info.c, h, w)
    }

    /// Batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.store.len(), self.config.batch_size.max(1));
        if self.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The order of the split's images in `epoch`.
    pub fn order(&self, epoch: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.store.len() as u32).collect();
        if self.config.shuffle {
            order.shuffle(&mut rng_for(&[self.config.seed, stream::SHUFFLE, epoch]));
        }
        order
    }

    /// Streams the batches of `epoch` from batch `start` on.
    pub fn epoch(&self, epoch: u64, start: usize) -> EpochIter {
        self.epoch_range(epoch, start..self.batches_per_epoch())
    }

    /// Streams the batches `batches` of `epoch` (numbered as in the whole epoch), building none
    /// beyond them.
    pub fn epoch_range(&self, epoch: u64, batches: std::ops::Range<usize>) -> EpochIter {
        let order = Arc::new(self.order(epoch));
        let start = batches.start;
        let total = batches.end.min(self.batches_per_epoch());
        let workers = self
            .config
            .workers
            .max(1)
            .min(total.saturating_sub(start).max(1));
        let mut receivers = Vec::with_capacity(workers);
        let mut recyclers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = bounded::<Batch>(self.config.prefetch.max(1));
            let (rtx, rrx) = bounded::<Batch>(self.config.prefetch.max(1) + 2);
            let (store, config, order) = (self.store.clone(), self.config.clone(), order.clone());
            handles.push(std::thread::spawn(move || {
                let mut b = start + w;
                let mut scratch = Scratch::default();
                while b < total {
                    let mut batch = rrx.try_recv().unwrap_or_default();
                    fill_batch(&store, &config, &order, epoch, b, &mut batch, &mut scratch);
                    if tx.send(batch).is_err() {
                        return; // the trainer dropped the epoch
                    }
                    b += workers;
                }
            }));
            receivers.push(rx);
            recyclers.push(rtx);
        }
        EpochIter {
            receivers,
            recyclers,
            handles,
            start,
            next: start,
            total,
        }
    }
}

/// A loader worker's buffers, reused from batch to batch.
#[derive(Default)]
struct Scratch {
    /// A rotated view (SSKD).
    rotated: Vec<u8>,
    /// A cropped or resized view.
    view: ViewScratch,
}

/// Builds batch `b` of `epoch` into `batch`, with the worker's `scratch`.
fn fill_batch(
    store: &PackedStore,
    config: &LoaderConfig,
    order: &[u32],
    epoch: u64,
    b: usize,
    batch: &mut Batch,
    scratch: &mut Scratch,
) {
    let info = store.info();
    let (h, w) = config.view.dims((info.h, info.w));
    let c = info.c;
    let len = c * h * w;
    let lo = b * config.batch_size;
    let hi = (lo + config.batch_size).min(order.len());
    let idx = &order[lo..hi];
    batch.index = b;
    batch.views = if config.rotations { ROTATIONS } else { 1 };
    batch.images.resize(batch.views * idx.len() * len, 0.0);
    batch.labels.clear();
    batch.indices.clear();
    let mut rng = rng_for(&[config.seed, stream::AUGMENT, epoch, b as u64]);
    for (slot, &i) in idx.iter().enumerate() {
        // The view's draws (a random crop's box) come before the augmentation's.
        let (ih, iw) = store.dims(i as usize);
        let src = config.view.render(
            store.image(i as usize),
            (c, ih, iw),
            &mut rng,
            &mut scratch.view,
        );
        if config.rotations {
            rotated_views(
                src,
                batch,
                slot,
                idx.len(),
                (c, h, w),
                config,
                &mut rng,
                &mut scratch.rotated,
            );
        } else {
            let dst = &mut batch.images[slot * len..(slot + 1) * len];
            augment_into(
                src,
                dst,
                (c, h, w),
                &config.augment,
                &config.normalize,
                &mut rng,
            );
        }
        batch.labels.push(store.label(i as usize));
        batch.indices.push(i);
    }
    batch.mix = match config.mix {
        Mix::None {} => MixRecord::None,
        ref mix => {
            let mut rng = rng_for(&[config.seed, stream::MIX, epoch, b as u64]);
            crate::mix::draw(mix, idx.len(), (h, w), &mut rng)
        }
    };
    // A recycled buffer may hold an earlier batch's images: keep `unmixed` empty when unmixed.
    batch.unmixed.clear();
    if batch.mix != MixRecord::None {
        std::mem::swap(&mut batch.images, &mut batch.unmixed);
        batch.images.resize(batch.unmixed.len(), 0.0);
        batch
            .mix
            .apply(&batch.unmixed, &mut batch.images, (c, h, w));
    }
}

/// SSKD's four views of image `src` (its reference `cifar.py`): one flip coin shared by the
/// views, then each rotation (counter-clockwise, numpy's `rot90`) cropped and cut out with its
/// own draws, into the batch's slot `slot` of every view (`b` images per view).
#[allow(clippy::too_many_arguments)]
fn rotated_views(
    src: &[u8],
    batch: &mut Batch,
    slot: usize,
    b: usize,
    (c, h, w): (usize, usize, usize),
    config: &LoaderConfig,
    rng: &mut impl rand::Rng,
    scratch: &mut Vec<u8>,
) {
    assert_eq!(
        h, w,
        "rotations need square images (checked by the trainer)"
    );
    let len = c * h * w;
    let flip = config.augment.flip && rng.random_bool(0.5);
    let each = Augment {
        flip: false,
        ..config.augment
    };
    scratch.resize(len, 0);
    for r in 0..ROTATIONS {
        rotate_into(src, scratch, (c, h), r, flip);
        let at = (r * b + slot) * len;
        let dst = &mut batch.images[at..at + len];
        augment_into(scratch, dst, (c, h, w), &each, &config.normalize, rng);
    }
}

/// The batches of one epoch, in order.
pub struct EpochIter {
    receivers: Vec<Receiver<Batch>>,
    recyclers: Vec<Sender<Batch>>,
    handles: Vec<JoinHandle<()>>,
    /// The first batch: worker `w` builds batches `start + w`, `start + w + workers`, …
    start: usize,
    next: usize,
    total: usize,
}

impl EpochIter {
    /// Returns a consumed batch's buffers to the worker that will build a later batch, so
    /// steady-state loading allocates nothing.
    pub fn recycle(&self, batch: Batch) {
        let w = (batch.index - self.start) % self.recyclers.len();
        let _ = self.recyclers[w].try_send(batch);
    }
}

impl Iterator for EpochIter {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.total {
            return None;
        }
        let w = (self.next - self.start) % self.receivers.len();
        let Ok(batch) = self.receivers[w].recv() else {
            // A worker sends every batch it owns before it returns, so a closed channel means
            // it panicked: pass its panic on, or the epoch would end short, as if complete.
            self.receivers.clear();
            for h in self.handles.drain(..) {
                if let Err(panic) = h.join() {
                    std::panic::resume_unwind(panic);
                }
            }
            panic!(
                "loader worker {w} stopped before batch {} of {}",
                self.next, self.total
            );
        };
        debug_assert_eq!(batch.index, self.next);
        self.next += 1;
        Some(batch)
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        // Unblock workers waiting to send, then join them.
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::{PackedWriter, StoreInfo};
    use crate::synthetic::SyntheticSpec;

    fn store() -> Arc<PackedStore> {
        let spec = SyntheticSpec {
            classes: 4,
            image_size: 8,
            ..Default::default()
        };
        let (info, labels, pixels): (StoreInfo, _, _) = spec.generate(1, 0, 50).unwrap();
        // A folder per call: tests run in parallel. The mapping outlives the deleted file.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train.pack");
        PackedWriter::write(&p, &info, &labels, &pixels).unwrap();
        Arc::new(PackedStore::open(&p).unwrap())
    }

    fn config(workers: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size: 8,
            shuffle: true,
            drop_last: false,
            view: View::Whole,
            augment: Augment::CROP_FLIP,
            normalize: Normalize {
                mean: vec![0.5; 3],
                std: vec![0.25; 3],
            },
            mix: Mix::None {},
            workers,
            prefetch: 2,
            seed: 3,
            rotations: false,
        }
    }

    /// [`config`] with a flip only and no normalisation (pixels stay 0–255), so tests can
    /// compare batches with the source bytes.
    fn flip_raw(workers: usize) -> LoaderConfig {
        LoaderConfig {
            augment: Augment::FLIP,
            normalize: Normalize {
                mean: vec![0.0; 3],
                std: vec![1.0 / 255.0; 3],
            },
            ..config(workers)
        }
    }

    fn collect(loader: &Loader, epoch: u64, start: usize) -> Vec<(Vec<f32>, Vec<u32>, Vec<u32>)> {
        let mut it = loader.epoch(epoch, start);
        let mut out = Vec::new();
        while let Some(b) = it.next() {
            out.push((b.images.clone(), b.labels.clone(), b.indices.clone()));
            it.recycle(b);
        }
        out
    }

    /// A worker that panics (here on a mixing parameter no stage would pass) fails the epoch
    /// with its panic; the epoch does not end early as if it were complete.
    #[test]
    fn a_panicking_worker_fails_the_epoch() {
        let loader = Loader::new(
            store(),
            LoaderConfig {
                mix: Mix::Mixup { alpha: -1.0 },
                ..config(2)
            },
        );
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            collect(&loader, 0, 0).len()
        }));
        let panic = run.expect_err("the epoch ended as if complete");
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        assert!(message.contains("validated beta parameter"), "{message}");
    }

    /// With a random resized view, each image of a batch is the view's box (drawn first from
    /// the batch's augmentation stream) resampled as Pillow does, then flipped on the next
    /// draw, then normalised; the batch holds images of the view's size.
    #[test]
    fn random_resized_views_draw_the_box_then_the_flip() {
        use crate::view::{random_resized_box, ViewScratch};
        use rand::Rng;
        let s = store();
        let view = View::random_resized(5);
        let loader = Loader::new(
            s.clone(),
            LoaderConfig {
                view,
                ..flip_raw(2)
            },
        );
        assert_eq!(loader.image_dims(), (3, 5, 5));
        let mut scratch = ViewScratch::default();
        let (mut flips, mut boxes) = (0, std::collections::HashSet::new());
        for (b, (images, _, indices)) in collect(&loader, 1, 0).into_iter().enumerate() {
            assert_eq!(images.len(), indices.len() * 75);
            let mut rng = rng_for(&[3, stream::AUGMENT, 1, b as u64]);
            for (slot, &i) in indices.iter().enumerate() {
                let bx = random_resized_box((8, 8), [0.08, 1.0], [0.75, 4.0 / 3.0], &mut rng);
                let flip = rng.random_bool(0.5);
                boxes.insert((bx.top, bx.left, bx.height, bx.width));
                flips += usize::from(flip);
                let want = scratch.resize(s.image(i as usize), (3, 8, 8), bx, 5);
                for c in 0..3 {
                    for y in 0..5 {
                        for x in 0..5 {
                            let sx = if flip { 4 - x } else { x };
                            let got = images[slot * 75 + c * 25 + y * 5 + x];
                            assert_eq!(got, want[c * 25 + y * 5 + sx] as f32, "image {i}");
                        }
                    }
                }
            }
        }
        assert!(
            flips > 5 && flips < 45 && boxes.len() > 10,
            "{flips} flips, {} boxes",
            boxes.len()
        );
    }

    /// A store of 12 images of 4 sizes (landscape, portrait, square), each pixel a function of
    /// its image, channel, row and column.
    fn varying_store() -> (Arc<PackedStore>, Vec<(usize, usize)>) {
        let sizes: Vec<(usize, usize)> = (0..12)
            .map(|i| [(6, 9), (11, 6), (6, 6), (7, 8)][i % 4])
            .collect();
        let info = StoreInfo {
            n: sizes.len(),
            h: 6,
            w: 6,
            c: 3,
            classes: vec!["a".into(), "b".into()],
            varying: true,
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("varying.pack");
        let labels: Vec<u32> = (0..12).map(|i| i % 2).collect();
        let mut w = PackedWriter::start(&p, &info, &labels).unwrap();
        for (i, &(h, wd)) in sizes.iter().enumerate() {
            let img: Vec<u8> = (0..3 * h * wd)
                .map(|q| (i * 20 + q / (h * wd) * 7 + (q % (h * wd)) / wd * 3 + q % wd) as u8)
                .collect();
            w.push_sized(&img, (h, wd)).unwrap();
        }
        w.finish().unwrap();
        (Arc::new(PackedStore::open(&p).unwrap()), sizes)
    }

    /// Over images of varying sizes, a centre view is each image's own centre square
    /// (torchvision's `CenterCrop` offsets, worked out here by hand for each size) and a random
    /// resized view draws its box on each image's own size (its expected pixels come from the
    /// box drawer and resampler, tested against torchvision and Pillow on their own; the
    /// independent evidence here is the boxes reaching past the stores' 6×6 bound).
    #[test]
    fn views_of_images_of_varying_sizes_use_each_images_size() {
        use crate::view::{random_resized_box, ViewScratch};
        let (s, sizes) = varying_store();
        let centre = Loader::new(
            s.clone(),
            LoaderConfig {
                view: View::Center { side: 5 },
                augment: Augment::NONE,
                shuffle: false,
                ..flip_raw(2)
            },
        );
        assert_eq!(centre.image_dims(), (3, 5, 5));
        // int(round((9 - 5) / 2)) = 2, round(0.5) = 0 (half to even), round(3) = 3, round(1) = 1,
        // round(1.5) = 2.
        let offsets = |(h, w)| match (h, w) {
            (6, 9) => (0, 2),
            (11, 6) => (3, 0),
            (6, 6) => (0, 0),
            (7, 8) => (1, 2),
            _ => unreachable!(),
        };
        for (images, _, indices) in collect(&centre, 0, 0) {
            for (slot, &i) in indices.iter().enumerate() {
                let (h, w) = sizes[i as usize];
                let (top, left) = offsets((h, w));
                let img = s.image(i as usize);
                for q in 0..75 {
                    let (c, y, x) = (q / 25, q / 5 % 5, q % 5);
                    let want = img[c * h * w + (top + y) * w + left + x];
                    assert_eq!(images[slot * 75 + q], want as f32, "image {i} at {q}");
                }
            }
        }

        let random = Loader::new(
            s.clone(),
            LoaderConfig {
                view: View::random_resized(4),
                augment: Augment::NONE,
                ..flip_raw(1)
            },
        );
        let mut scratch = ViewScratch::default();
        let mut outside = 0;
        for (b, (images, _, indices)) in collect(&random, 2, 0).into_iter().enumerate() {
            let mut rng = rng_for(&[3, stream::AUGMENT, 2, b as u64]);
            for (slot, &i) in indices.iter().enumerate() {
                let (h, w) = sizes[i as usize];
                let bx = random_resized_box((h, w), [0.08, 1.0], [0.75, 4.0 / 3.0], &mut rng);
                // A box reaching past the 6×6 bound shows the draw used the image's own size.
                outside += usize::from(bx.top + bx.height > 6 || bx.left + bx.width > 6);
                let want = scratch.resize(s.image(i as usize), (3, h, w), bx, 4);
                let got: Vec<u8> = images[slot * 48..(slot + 1) * 48]
                    .iter()
                    .map(|&v| v as u8)
                    .collect();
                assert_eq!(got, want, "image {i}");
            }
        }
        assert!(outside > 0, "every box fell within the bound");
    }

    /// A whole-image view of images of varying sizes cannot make batches: refused by name.
    #[test]
    #[should_panic(expected = "varying.pack: its images vary in size")]
    fn whole_views_of_images_of_varying_sizes_are_refused() {
        let _ = Loader::new(varying_store().0, flip_raw(1));
    }

    /// Without crops, view r of an image is view 0 rotated r·90° counter-clockwise, and view 0
    /// is the image or its mirror (one flip coin for the four views); a view-major layout.
    #[test]
    fn rotated_views_share_the_flip_and_rotate_counter_clockwise() {
        let s = store();
        let loader = Loader::new(
            s.clone(),
            LoaderConfig {
                rotations: true,
                ..flip_raw(2)
            },
        );
        let n = 8;
        let len = 3 * n * n;
        let (mut flipped, mut plain) = (0, 0);
        let mut it = loader.epoch(0, 0);
        while let Some(batch) = it.next() {
            let b = batch.len();
            assert_eq!((batch.views, batch.images.len()), (4, 4 * b * len));
            for (slot, &i) in batch.indices.iter().enumerate() {
                let img = s.image(i as usize);
                let view = |r: usize| -> Vec<u8> {
                    let at = (r * b + slot) * len;
                    batch.images[at..at + len]
                        .iter()
                        .map(|&v| v.round() as u8)
                        .collect()
                };
                // Hand mirror: column x reads column n-1-x.
                let mirror: Vec<u8> = (0..len).map(|p| img[p - p % n + (n - 1 - p % n)]).collect();
                let v0 = view(0);
                if v0 == img {
                    plain += 1;
                } else {
                    assert_eq!(v0, mirror, "view 0 of image {i}");
                    flipped += 1;
                }
                // Hand rotation by 90° counter-clockwise: out[y][x] = in[x][n-1-y].
                let mut want = v0;
                for r in 1..4 {
                    want = (0..len)
                        .map(|p| {
                            let (ch, y, x) = (p / (n * n), (p / n) % n, p % n);
                            want[ch * n * n + x * n + (n - 1 - y)]
                        })
                        .collect();
                    assert_eq!(view(r), want, "view {r} of image {i}");
                }
            }
            it.recycle(batch);
        }
        assert!(flipped > 0 && plain > 0, "{flipped} flipped, {plain} not");
    }

    #[test]
    fn mixed_batches_are_identical_across_worker_counts() {
        let s = store();
        for mix in [
            Mix::Mixup { alpha: 1.0 },
            Mix::Cutmix { beta: 1.0, p: 1.0 },
            Mix::Ricap { beta: 0.3 },
        ] {
            let mixed = |workers| {
                let mut c = config(workers);
                c.mix = mix;
                let loader = Loader::new(s.clone(), c);
                let mut out = Vec::new();
                let mut it = loader.epoch(1, 0);
                while let Some(b) = it.next() {
                    let mut again = vec![0.0; b.images.len()];
                    b.mix.apply(&b.unmixed, &mut again, (3, 8, 8));
                    assert_eq!(again, b.images, "the record rebuilds the batch");
                    assert_ne!(b.mix, MixRecord::None);
                    out.push((b.images.clone(), b.mix.clone(), b.unmixed.clone()));
                    it.recycle(b);
                }
                out
            };
            let one = mixed(1);
            assert_eq!(one, mixed(3));
            // The unmixed images are those of the unmixing loader.
            let plain = collect(&Loader::new(s.clone(), config(1)), 1, 0);
            assert_eq!(one.len(), plain.len());
            for (m, p) in one.iter().zip(&plain) {
                assert_eq!(m.2, p.0);
            }
        }
    }

    #[test]
    fn identical_across_worker_counts_and_resumable() {
        let s = store();
        let one = collect(&Loader::new(s.clone(), config(1)), 2, 0);
        let three = collect(&Loader::new(s.clone(), config(3)), 2, 0);
        assert_eq!(one.len(), 7);
        assert_eq!(one, three);
        // Resumed from any batch, with any number of workers (also one that does not divide
        // the start: a stop request can checkpoint at any step).
        for workers in [2, 3] {
            for start in 0..=7 {
                let resumed = collect(&Loader::new(s.clone(), config(workers)), 2, start);
                assert_eq!(
                    &one[start..],
                    &resumed[..],
                    "{workers} workers from batch {start}"
                );
            }
        }
        // Every image appears exactly once per epoch, labels match the store.
        let mut seen: Vec<u32> = one.iter().flat_map(|b| b.2.clone()).collect();
        for (imgs, labels, idx) in &one {
            assert_eq!(imgs.len(), idx.len() * 3 * 64);
            for (l, i) in labels.iter().zip(idx) {
                assert_eq!(*l, s.label(*i as usize));
            }
        }
        seen.sort();
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
        // Another epoch has another order.
        let other = collect(&Loader::new(s, config(2)), 3, 0);
        assert_ne!(one[0].2, other[0].2);
    }
}
