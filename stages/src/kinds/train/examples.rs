//! `supervision.json` and the `supervision` figure (the paper's Fig. 6): what a student with
//! online teachers (`kd`, `wsl`, `on-ldl`, `on-en-ldl`, `on-mt-ldl`) is taught, on the first
//! images of its first batch: the (mixed) hard label beside the teachers' distribution on the
//! same augmented, mixed image, and the teachers' probability of the label's classes (Fig. 6's
//! pairs). The loader redraws that batch from the seed, so the files are the same whether the
//! run was interrupted or not; they cost one batch and one teacher pass over it.
//! A replayed training has no teacher loaded and writes none.

use super::trainer::Trainer;
use crate::error::Result;
use crate::science::figures::{self, ImageCell, ImageGrid};
use crate::science::methods::Method;
use candle_core::Tensor;
use datasets::loader::Batch;
use datasets::mix::MixRecord;
use serde::Serialize;

/// Images shown.
const SHOWN: usize = 8;
/// Classes listed per distribution.
const TOP: usize = 3;

/// One image of the first batch and what it was taught.
#[derive(Debug, Serialize)]
struct Example {
    /// Its place in the packed training split (of the image in its slot, before mixing).
    index: u32,
    /// Its own label.
    label: u32,
    /// The mixed hard label: (class, weight), heaviest first.
    mixed_label: Vec<(u32, f32)>,
    /// The teachers' probability of each class of `mixed_label` (the paper's Fig. 6 pairs).
    teachers_on_label: Vec<(u32, f32)>,
    /// The teachers' distribution on the mixed image (their mean, MC means with `teacher_mc`),
    /// its `TOP` largest entries: (class, probability).
    teachers: Vec<(u32, f32)>,
}

/// Image `i`'s hard label after mixing: its classes with their summed weights, heaviest first
/// (ties: the lower class); classes of weight 0 (a box that covers nothing) are left out.
fn mixed_label(mix: &MixRecord, labels: &[u32], i: usize) -> Vec<(u32, f32)> {
    let mut mixed: Vec<(u32, f32)> = Vec::new();
    for (slot, weight) in mix.components(i) {
        let class = labels[slot];
        match mixed.iter_mut().find(|m| m.0 == class) {
            Some(m) => m.1 += weight,
            None => mixed.push((class, weight)),
        }
    }
    mixed.retain(|m| m.1 > 0.0);
    mixed.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    mixed
}

/// A class name cut to 18 characters, so that it fits its cell.
fn short(name: &str) -> String {
    if name.chars().count() <= 18 {
        name.to_string()
    } else {
        format!("{}…", name.chars().take(17).collect::<String>())
    }
}

/// The `n` largest entries of a distribution, largest first (ties: the lower class).
fn largest(row: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut top: Vec<(u32, f32)> = (0..row.len() as u32).zip(row.iter().copied()).collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(n);
    top
}

impl Trainer<'_> {
    /// Writes the examples when the method learns from teachers run on its batches.
    pub(super) fn write_supervision_examples(&self) -> Result<Vec<String>> {
        let online = matches!(
            self.p.method,
            Method::Kd | Method::Wsl | Method::OnLdl | Method::OnEnLdl | Method::OnMtLdl
        );
        let run = self.p.method.teachers_run(self.supervision.teachers.len());
        if !online || run == 0 {
            return Ok(Vec::new());
        }
        // Only the first batch: an open-ended epoch would set every worker building batches.
        let Some(batch) = self.loader.epoch_range(0, 0..1).next() else {
            return Ok(Vec::new());
        };
        let probs = self.teachers_on(&batch, run)?;
        let classes = &self.data.info.classes;
        let class = |c: u32| short(&classes[c as usize]);
        let mut examples = Vec::new();
        let mut cells = Vec::new();
        for (i, row) in probs.iter().enumerate().take(SHOWN) {
            let mixed = mixed_label(&batch.mix, &batch.labels, i);
            let on_label: Vec<(u32, f32)> =
                mixed.iter().map(|m| (m.0, row[m.0 as usize])).collect();
            let top = largest(row, TOP);
            let mut lines = vec!["label (teacher)".to_string()];
            lines.extend(
                mixed
                    .iter()
                    .zip(&on_label)
                    .map(|(m, t)| format!("  {} {:.2} ({:.2})", class(m.0), m.1, t.1)),
            );
            lines.push(if run == 1 {
                "teacher's top 3".into()
            } else {
                format!("{run} teachers' mean, top 3")
            });
            lines.extend(top.iter().map(|t| format!("  {} {:.2}", class(t.0), t.1)));
            cells.push(ImageCell {
                pixels: self.rgb(&batch.images, i),
                size: {
                    let [_, h, w] = self.input_shape();
                    (w as u32, h as u32)
                },
                lines,
            });
            examples.push(Example {
                index: batch.indices[i],
                label: batch.labels[i],
                mixed_label: mixed,
                teachers_on_label: on_label,
                teachers: top,
            });
        }
        engine::json::write(&self.ctx.dir.join("supervision.json"), &examples)?;
        let grid = ImageGrid {
            title: format!(
                "{}: what the first training images are taught ({}, mix = {})",
                self.ctx.name,
                self.p.method.as_str(),
                self.p.mix.as_str()
            ),
            columns: 4,
            cells,
        };
        let mut out = vec!["supervision.json".to_string()];
        out.extend(figures::save_png(
            &grid,
            &self.ctx.dir,
            "supervision",
            (1200, 400),
        )?);
        Ok(out)
    }

    /// The mean distribution of the first `run` teachers on the batch's (first-view) images,
    /// as the method computes it: softmax at temperature 1, or Monte-Carlo means.
    fn teachers_on(&self, batch: &Batch, run: usize) -> Result<Vec<Vec<f32>>> {
        let [c, h, w] = self.input_shape();
        let n = batch.len();
        let x = Tensor::from_slice(&batch.images[..n * c * h * w], (n, c, h, w), &self.device)?;
        let mean = self.supervision.mean_teacher_probs(run, &x, 0, batch)?;
        Ok(mean.to_vec2::<f32>()?)
    }

    /// Image `i` of a batch's normalised CHW pixels as row-major RGB bytes (grey images are
    /// repeated), the dataset's normalisation undone.
    fn rgb(&self, images: &[f32], i: usize) -> Vec<u8> {
        let [c, h, w] = self.input_shape();
        let norm = &self.data.info.normalize;
        let image = &images[i * c * h * w..(i + 1) * c * h * w];
        let mut out = Vec::with_capacity(h * w * 3);
        for p in 0..h * w {
            for ch in 0..3 {
                let ch = ch.min(c - 1);
                let v = image[ch * h * w + p] * norm.std[ch] + norm.mean[ch];
                out.push((v * 255.0).round().clamp(0.0, 255.0) as u8);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datasets::mix::Rect;

    #[test]
    fn mixed_labels_sum_the_weights_of_each_class() {
        let labels = [3, 1, 3, 0];
        // CutMix: image 0 keeps 0.75 of itself (class 3) and shows 0.25 of slot 1 (class 1).
        let cutmix = MixRecord::Cutmix {
            lambda: 0.75,
            partner: vec![1, 0, 3, 2],
            rect: Rect::default(),
        };
        assert_eq!(mixed_label(&cutmix, &labels, 0), [(3, 0.75), (1, 0.25)]);
        // Image 2 (class 3) pasted with slot 3 (class 0).
        assert_eq!(mixed_label(&cutmix, &labels, 2), [(3, 0.75), (0, 0.25)]);
        // RICAP: patches from slots 0, 2 (both class 3), 1 and 3: class 3 gets 0.25 + 0.375.
        let ricap = MixRecord::Ricap {
            partners: [vec![0; 4], vec![2; 4], vec![1; 4], vec![3; 4]],
            weights: [0.25, 0.375, 0.125, 0.25],
            src: [Rect::default(); 4],
            dst: [Rect::default(); 4],
        };
        assert_eq!(
            mixed_label(&ricap, &labels, 1),
            [(3, 0.625), (0, 0.25), (1, 0.125)]
        );
        assert_eq!(mixed_label(&MixRecord::None, &labels, 3), [(0, 1.0)]);
        // A box that covers nothing: the partner's class has weight 0 and is left out.
        let empty = MixRecord::Cutmix {
            lambda: 1.0,
            partner: vec![1, 0, 3, 2],
            rect: Rect::default(),
        };
        assert_eq!(mixed_label(&empty, &labels, 0), [(3, 1.0)]);
        assert_eq!(short("a_rather_long_class_name"), "a_rather_long_cla…");
        assert_eq!(short("cat"), "cat");
    }

    #[test]
    fn the_largest_entries_come_first_and_ties_by_class() {
        let row = [0.125, 0.5, 0.125, 0.25];
        assert_eq!(largest(&row, 3), [(1, 0.5), (3, 0.25), (0, 0.125)]);
        assert_eq!(largest(&row, 9).len(), 4);
    }
}
