//! Self-supervised knowledge distillation (SSKD; Xu et al., ECCV 2020), as its reference
//! implementation computes it (xuguodong03/SSKD: `student.py`, `wrapper.py`, `cifar.py`).
//!
//! Every image comes in its four rotations (the loader's `rotations`, view-major: the B
//! originals, then the 3B rotated views). A projection head (Linear D→D, ReLU, Linear D→D) maps
//! a network's penultimate features to a representation; the cosine similarities of the rotated
//! views' representations with the originals' form a `3B × B` matrix whose row `j` has its own
//! original, `j mod B`, as the right answer.
//!
//! - Phase one (`sskd-head`): the teacher frozen in eval mode, its head alone is trained on the
//!   cross-entropy of the similarity rows (raw cosines as logits) against their own originals.
//! - Phase two (`sskd`): the student and its own head train on
//!   `w_ce·CE + w_kd·τ²·KL(originals) + w_tf·τ²·KL(rotated views) + w_ss·τ²·KL(similarity rows)`,
//!   each KL the teacher's distribution against the student's at its temperature, averaged
//!   over the rows it keeps. "Error-level ranking" keeps every row whose right answer the
//!   teacher ranks first, and the fraction `ratio` of the others whose right answer it ranks
//!   highest.

use crate::error::{Result, StageError};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Linear, Module};
use datasets::rng::{rng_for, stream};
use engine::losses::{cross_entropy_per_sample, kd_per_sample, KdReduction};
use rand::Rng;
use std::collections::BTreeMap;
use std::path::Path;

/// The file of an `sskd-head` stage holding the teacher's trained head.
pub const HEAD_FILE: &str = "sskd_head.safetensors";
/// The teacher head's tensor names in [`HEAD_FILE`] (the reference wrapper's `proj_head.0.weight`, …).
pub const TEACHER_HEAD: &str = "proj_head";
/// The student head's tensor names in a student's checkpoints.
pub const STUDENT_HEAD: &str = "sskd.proj_head";
/// Rotated views per image.
const ROTATED: usize = datasets::loader::ROTATIONS - 1;

/// SSKD's weights, temperatures and keep ratios; the defaults are the reference's CIFAR-100
/// settings (`student.py`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SskdConfig {
    /// Weight of the cross-entropy on the originals (`--ce-weight`).
    pub ce_weight: f64,
    /// Weight of the KD term on the originals (`--kd-weight`).
    pub kd_weight: f64,
    /// Weight of the KD term on the rotated views (`--tf-weight`).
    pub tf_weight: f64,
    /// Weight of the similarity term (`--ss-weight`).
    pub ss_weight: f64,
    /// Temperature of the KD term (`--kd-T`).
    pub kd_tau: f64,
    /// Temperature of the rotated views' term (`--tf-T`).
    pub tf_tau: f64,
    /// Temperature of the similarity term (`--ss-T`).
    pub ss_tau: f64,
    /// Fraction of the wrongly ranked rotated views kept (`--ratio-tf`).
    pub ratio_tf: f64,
    /// Fraction of the wrongly ranked similarity rows kept (`--ratio-ss`).
    pub ratio_ss: f64,
}

impl Default for SskdConfig {
    fn default() -> Self {
        SskdConfig {
            ce_weight: 0.1,
            kd_weight: 0.9,
            tf_weight: 2.7,
            ss_weight: 10.0,
            kd_tau: 4.0,
            tf_tau: 4.0,
            ss_tau: 0.5,
            ratio_tf: 1.0,
            ratio_ss: 0.75,
        }
    }
}

/// The reference's `proj_head`: `Linear(D, D)`, ReLU, `Linear(D, D)`.
pub struct ProjectionHead {
    prefix: &'static str,
    w1: Var,
    b1: Var,
    w2: Var,
    b2: Var,
}

impl ProjectionHead {
    /// A head over features of size `dim`, named `prefix.0.weight`, …, with PyTorch's
    /// `nn.Linear` initialisation (weights and biases uniform in ±1/√dim) drawn from `seed`.
    pub fn new(prefix: &'static str, dim: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = rng_for(&[seed, stream::SSKD_INIT]);
        let bound = 1.0 / (dim as f32).sqrt();
        let mut draw = |shape: &[usize]| -> Result<Var> {
            let n = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
            Ok(Var::from_vec(v, shape, device)?)
        };
        Ok(ProjectionHead {
            prefix,
            w1: draw(&[dim, dim])?,
            b1: draw(&[dim])?,
            w2: draw(&[dim, dim])?,
            b2: draw(&[dim])?,
        })
    }

    /// The teacher's head stored by the `sskd-head` stage in `dir`, for features of size `dim`.
    pub fn read(dir: &Path, dim: usize, device: &Device) -> Result<Self> {
        let path = dir.join(HEAD_FILE);
        if !path.exists() {
            return Err(StageError::config(format!(
                "{}: no trained SSKD head: `sskd` learns from a train stage with \
                 method = \"sskd-head\"",
                path.display()
            )));
        }
        let state = engine::checkpoint::read_tensors(&path, device)?;
        let head = ProjectionHead::new(TEACHER_HEAD, dim, 0, device)?;
        head.load_state(&path, &state)?;
        Ok(head)
    }

    /// The representations of features `x` (`N × D`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let l1 = Linear::new(
            self.w1.as_tensor().clone(),
            Some(self.b1.as_tensor().clone()),
        );
        let l2 = Linear::new(
            self.w2.as_tensor().clone(),
            Some(self.b2.as_tensor().clone()),
        );
        Ok(l2.forward(&l1.forward(x)?.relu()?)?)
    }

    /// The head's variables by name, for the optimiser.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        [
            ("0.weight", &self.w1),
            ("0.bias", &self.b1),
            ("2.weight", &self.w2),
            ("2.bias", &self.b2),
        ]
        .into_iter()
        .map(|(n, v)| (format!("{}.{n}", self.prefix), v.clone()))
        .collect()
    }

    /// The head's tensors by name, for a checkpoint or [`HEAD_FILE`].
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        self.trainable()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect()
    }

    /// Restores [`ProjectionHead::state`] (read from `origin`, which errors name).
    pub fn load_state(&self, origin: &Path, state: &BTreeMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.trainable() {
            let place = || format!("tensor `{name}`");
            let t = state
                .get(&name)
                .ok_or_else(|| StageError::invalid(origin, place(), "missing"))?;
            if t.dims() != var.dims() {
                return Err(StageError::invalid(
                    origin,
                    place(),
                    format!("shape {:?}, expected {:?}", t.dims(), var.dims()),
                ));
            }
            var.set(&t.to_device(var.device())?.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }
}

/// Cosine similarities of the rotated views' rows of `rep` (`4B × D`, view-major) with the
/// originals' rows: `3B × B`, as `F.cosine_similarity` computes them (each norm at least 1e-8).
pub fn similarities(rep: &Tensor, b: usize) -> Result<Tensor> {
    let norm = rep.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-8)?;
    let unit = rep.broadcast_div(&norm)?;
    let originals = unit.narrow(0, 0, b)?;
    let rotated = unit.narrow(0, b, ROTATED * b)?;
    Ok(rotated.matmul(&originals.t()?)?)
}

/// Each similarity row's own original, `j mod B`.
fn own_columns(b: usize, device: &Device) -> Result<Tensor> {
    let v: Vec<u32> = (0..(ROTATED * b) as u32).map(|j| j % b as u32).collect();
    Ok(Tensor::from_vec(v, ROTATED * b, device)?)
}

/// Per-row values of the rotated views (`3B`, view-major) summed per image (`B`).
fn per_image(rows: &Tensor, b: usize) -> Result<Tensor> {
    Ok(rows.reshape((ROTATED, b))?.sum(0)?)
}

/// Phase one's loss of each image (`B` values): the mean over its three rotated views of the
/// cross-entropy of the view's similarity row against its own original, so that the batch mean
/// is the reference's `F.cross_entropy(simi, target)` over the `3B` rows.
pub fn head_loss(sims: &Tensor, b: usize) -> Result<Tensor> {
    let ce = cross_entropy_per_sample(sims, &own_columns(b, sims.device())?)?;
    Ok((per_image(&ce, b)? / ROTATED as f64)?)
}

/// Phase one's predictions for the training log: an image's `labels` entry where all three of
/// its rotated views are most similar to their own original, `classes` (no class) where not,
/// so the log's accuracy is the fraction of images whose rotations are all recognised.
pub fn head_predictions(sims: &Tensor, labels: &Tensor, classes: usize) -> Result<Tensor> {
    let b = labels.dim(0)?;
    let hit = sims.argmax(1)?.eq(&own_columns(b, sims.device())?)?;
    let all = hit.reshape((ROTATED, b))?.min(0)?;
    let none = Tensor::full(classes as u32, b, sims.device())?;
    Ok(all.where_cond(labels, &none)?)
}

/// Rank of each row's right answer among the row's values: how many are strictly greater
/// (0: ranked first).
fn ranks(values: &Tensor, right: &Tensor) -> Result<Vec<u32>> {
    let own = values.gather(&right.unsqueeze(1)?, 1)?;
    Ok(values
        .broadcast_gt(&own)?
        .to_dtype(DType::U32)?
        .sum(1)?
        .to_vec1::<u32>()?)
}

/// The reference's error-level ranking as per-row weights over the `3B` rotated rows: every
/// row whose right answer ranks first, and `⌊ratio · wrong⌋` of the others, those whose right
/// answer ranks highest (ties in the reference's row order, image-major), each weighted
/// `B / kept` so that the mean over the batch of the per-image sums is the mean over the kept
/// rows (the reference's `batchmean`); the other rows 0.
pub fn keep_weights(ranks: &[u32], ratio: f64, b: usize) -> Vec<f32> {
    let rows = ranks.len();
    let wrong = ranks.iter().filter(|&&r| r > 0).count();
    let kept = rows - wrong + (wrong as f64 * ratio) as usize;
    let mut order: Vec<usize> = (0..rows).collect();
    // Row j = r·B + i here is row 3i + r of the reference's interleaved batch.
    order.sort_by_key(|&j| (ranks[j], (j % b) * ROTATED + j / b));
    let mut w = vec![0f32; rows];
    for &j in &order[..kept] {
        w[j] = b as f32 / kept as f32;
    }
    w
}

/// Phase two: the teacher's trained head and the student's, and the loss.
pub struct Sskd {
    cfg: SskdConfig,
    teacher_head: ProjectionHead,
    student_head: ProjectionHead,
}

impl Sskd {
    /// SSKD from the teacher of the `sskd-head` stage in `teacher_dir` (features of size
    /// `t_dim`) to a student of features of size `s_dim`, its head drawn from `seed`.
    pub fn new(
        cfg: SskdConfig,
        teacher_dir: &Path,
        t_dim: usize,
        s_dim: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Sskd> {
        Ok(Sskd {
            cfg,
            teacher_head: ProjectionHead::read(teacher_dir, t_dim, device)?,
            student_head: ProjectionHead::new(STUDENT_HEAD, s_dim, seed, device)?,
        })
    }

    /// The student head's variables, trained with the student.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.student_head.trainable()
    }

    /// What a checkpoint keeps: the student head.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        self.student_head.state()
    }

    /// Restores [`Sskd::state`] (read from `origin`).
    pub fn load_state(&self, origin: &Path, state: &BTreeMap<String, Tensor>) -> Result<()> {
        self.student_head.load_state(origin, state)
    }

    /// The loss of each original image (`B` values, whose mean is the reference's total) from
    /// the student's and the teacher's logits and penultimate features on the `4B` views and
    /// the `B` labels.
    pub fn per_sample_loss(
        &self,
        s_logits: &Tensor,
        s_features: &Tensor,
        t_logits: &Tensor,
        t_features: &Tensor,
        labels: &Tensor,
    ) -> Result<Tensor> {
        let (c, b) = (&self.cfg, labels.dim(0)?);
        let originals = |t: &Tensor| t.narrow(0, 0, b);
        let rotated = |t: &Tensor| t.narrow(0, b, ROTATED * b);
        let ce = cross_entropy_per_sample(&originals(s_logits)?, labels)?;
        let kd = kd_per_sample(
            &originals(s_logits)?,
            &originals(t_logits)?,
            c.kd_tau,
            KdReduction::Batchmean,
        )?;
        let (s_rot, t_rot) = (rotated(s_logits)?, rotated(t_logits)?);
        let rot_labels = Tensor::cat(&[labels; ROTATED], 0)?;
        let w_tf = self.keep(&t_rot, &rot_labels, c.ratio_tf, b)?;
        let tf = kd_per_sample(&s_rot, &t_rot, c.tf_tau, KdReduction::Batchmean)?;
        let tf = per_image(&(tf * w_tf)?, b)?;
        let s_sim = similarities(&self.student_head.forward(s_features)?, b)?;
        let t_sim = similarities(&self.teacher_head.forward(t_features)?, b)?.detach();
        let w_ss = self.keep(&t_sim, &own_columns(b, labels.device())?, c.ratio_ss, b)?;
        let ss = kd_per_sample(&s_sim, &t_sim, c.ss_tau, KdReduction::Batchmean)?;
        let ss = per_image(&(ss * w_ss)?, b)?;
        Ok(
            ((ce * c.ce_weight)?
                + (kd * c.kd_weight)?
                + (tf * c.tf_weight)?
                + (ss * c.ss_weight)?)?,
        )
    }

    /// [`keep_weights`] of the rows of `values` (the teacher's) with right answers `right`; with
    /// `ratio ≥ 1` every row, without reading the ranks back from the device.
    fn keep(&self, values: &Tensor, right: &Tensor, ratio: f64, b: usize) -> Result<Tensor> {
        let w = if ratio >= 1.0 {
            vec![1.0 / ROTATED as f32; ROTATED * b]
        } else {
            keep_weights(&ranks(values, right)?, ratio, b)
        };
        Ok(Tensor::from_vec(w, ROTATED * b, values.device())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::science::reference_values::{assert_close, grid};

    const B: usize = 3;

    /// The reference's interleaved rows (4i + r) in our view-major order (r·B + i), times `s`.
    fn views(v: Vec<f32>, cols: usize, s: f32) -> Tensor {
        let rows: Vec<f32> = (0..4 * B)
            .flat_map(|j| {
                let (r, i) = (j / B, j % B);
                v[(4 * i + r) * cols..(4 * i + r + 1) * cols].to_vec()
            })
            .map(|x| x * s)
            .collect();
        Tensor::from_vec(rows, (4 * B, cols), &Device::Cpu).unwrap()
    }

    /// The script's `head(dim, a, b)` weights.
    fn head(prefix: &'static str, dim: usize, a: f64, b: f64) -> ProjectionHead {
        let h = ProjectionHead::new(prefix, dim, 0, &Device::Cpu).unwrap();
        let t = |v: Vec<f32>, dims: &[usize]| Tensor::from_vec(v, dims, &Device::Cpu).unwrap();
        let tenth = |v: Vec<f32>| v.into_iter().map(|x| x * 0.1).collect::<Vec<_>>();
        h.w1.set(&t(grid(dim, dim, a, b), &[dim, dim])).unwrap();
        h.b1.set(&t(tenth(grid(1, dim, b, a)), &[dim])).unwrap();
        h.w2.set(&t(grid(dim, dim, b, a), &[dim, dim])).unwrap();
        h.b2.set(&t(tenth(grid(1, dim, a, a)), &[dim])).unwrap();
        h
    }

    /// Phase two on the script's tensors gives the total that SSKD's student.py computed (in
    /// f64), with every rotated view kept and with half of the wrong ones, and its gradient
    /// with respect to the student head.
    #[test]
    fn matches_the_references_student_loss() {
        let labels = Tensor::new(&[2u32, 0, 4], &Device::Cpu).unwrap();
        let s_logits = views(grid(4 * B, 5, 0.7, 1.3), 5, 3.0);
        let t_logits = views(grid(4 * B, 5, 1.1, 0.4), 5, 3.0);
        let s_features = views(grid(4 * B, 4, 0.9, 0.6), 4, 1.0);
        let t_features = views(grid(4 * B, 3, 0.4, 1.9), 3, 1.0);
        let grad_w1 = [
            -0.0844834210257392,
            -0.09820265372024502,
            -0.07761687416218202,
            -0.029917287407778263,
            -0.026288134420754995,
            -0.02253480418546925,
            -0.010909418517811896,
            0.004526940904058608,
            0.05457288047262585,
            0.06176115406648903,
            0.047374479665368306,
            0.016438536544796607,
            0.12461341024718542,
            0.11927814824557458,
            0.07227559740791263,
            2.5101013673340267e-05,
        ];
        for (ratio_tf, total) in [(1.0, 9.850354880216088), (0.5, 11.214991833969567)] {
            let sskd = Sskd {
                cfg: SskdConfig {
                    ratio_tf,
                    ..SskdConfig::default()
                },
                teacher_head: head(TEACHER_HEAD, 3, 0.2, 1.7),
                student_head: head(STUDENT_HEAD, 4, 0.5, 0.9),
            };
            let per_image = sskd
                .per_sample_loss(&s_logits, &s_features, &t_logits, &t_features, &labels)
                .unwrap();
            let mean = per_image.mean_all().unwrap();
            let got = mean.to_scalar::<f32>().unwrap();
            assert_close(&[got], &[total], &format!("total, ratio_tf {ratio_tf}"));
            let grads = mean.backward().unwrap();
            let g = grads.get(sskd.student_head.w1.as_tensor()).unwrap();
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_close(&g, &grad_w1, "d total / d proj_head.0.weight");
        }
    }

    /// Phase one on the script's teacher features gives student.py's head loss and gradient;
    /// its similarity argmax [0, 0, 0, 1, 2, 2, 2, 2, 2] (interleaved rows) recognises every
    /// rotation of images 0 and 2, not image 1's.
    #[test]
    fn matches_the_references_head_loss() {
        let t_head = head(TEACHER_HEAD, 3, 0.2, 1.7);
        let rep = t_head
            .forward(&views(grid(4 * B, 3, 0.4, 1.9), 3, 1.0))
            .unwrap();
        let sims = similarities(&rep, B).unwrap();
        let loss = head_loss(&sims, B).unwrap().mean_all().unwrap();
        assert_close(
            &[loss.to_scalar::<f32>().unwrap()],
            &[0.9340358542545386],
            "head loss",
        );
        let grads = loss.backward().unwrap();
        let g = grads.get(t_head.w1.as_tensor()).unwrap();
        let want = [
            -0.006221289170783977,
            0.0076525835820404325,
            0.0012732883075347572,
            0.001084305925727424,
            -0.0012794428054330557,
            -0.00025704490493726705,
            -0.1185609863898844,
            0.13816844828798835,
            0.0292241507874322,
        ];
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_close(&g, &want, "d head loss / d proj_head.0.weight");
        let labels = Tensor::new(&[7u32, 8, 9], &Device::Cpu).unwrap();
        let preds = head_predictions(&sims, &labels, 10).unwrap();
        assert_eq!(preds.to_vec1::<u32>().unwrap(), [7, 10, 9]);
    }

    /// Hand-worked: 6 rows (B = 2) with ranks [0, 2, 1, 0, 1, 3]: 4 wrong, ratio 0.5 keeps 2,
    /// the two of rank 1 (rows 2 and 4), so 4 rows kept at weight 2/4 each.
    #[test]
    fn error_level_ranking_keeps_the_least_wrong_rows() {
        let w = keep_weights(&[0, 2, 1, 0, 1, 3], 0.5, 2);
        assert_eq!(w, [0.5, 0.0, 0.5, 0.5, 0.5, 0.0]);
        // A tie at the boundary goes to the reference's earlier row: rows 1 (image 1, view 1)
        // and 2 (image 0, view 2) both rank 1, reference rows 3 and 1; one is kept: row 2.
        let w = keep_weights(&[0, 1, 1, 0, 0, 0], 0.5, 2);
        assert_eq!(w, [0.4, 0.0, 0.4, 0.4, 0.4, 0.4]);
        assert_eq!(keep_weights(&[1, 1, 1], 0.0, 1), [0.0; 3]);
    }
}
