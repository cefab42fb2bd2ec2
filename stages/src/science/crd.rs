//! Contrastive representation distillation (CRD; Tian et al., ICLR 2020), as its reference
//! implementation computes it (HobbitLong/RepDistiller: `crd/criterion.py`, `crd/memory.py`,
//! `dataset/cifar100.py`'s `CIFAR100InstanceSample`).
//!
//! Student and teacher penultimate features pass through trainable embedding heads (a linear
//! layer to `dim` = 128 and L2 normalisation). Two memory banks of one row per training image
//! hold the momentum-averaged (0.5) student and teacher embeddings. For each image, its own row
//! and `negatives` = 16,384 rows of images of other classes (drawn without replacement, as
//! `numpy.random.choice(..., replace=False)`) are scored against the other side's embedding,
//! `exp(v·m / T)` with T = 0.07, divided by a constant Z fixed on the first batch (the mean score
//! times the dataset size); the NCE loss of eq. (18) is taken with the teacher as anchor over the
//! student memory and with the student as anchor over the teacher memory, summed. Then both
//! memories' rows of the batch's images move towards the new embeddings. The heads are trained
//! with the student (same SGD, weight decay included); heads, memories and Z are checkpointed.

use crate::error::{Result, StageError};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{Linear, Module};
use datasets::rng::{rng_for, stream};
use rand::Rng;
use std::collections::BTreeMap;

/// RepDistiller's `eps` of the NCE loss.
const EPS: f64 = 1e-7;

/// CRD's settings; the defaults are RepDistiller's (`train_student.py`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrdConfig {
    /// Embedding dimension (`--feat_dim`).
    pub dim: usize,
    /// Negatives per image (`--nce_k`).
    pub negatives: usize,
    /// Temperature of the scores (`--nce_t`).
    pub temperature: f64,
    /// Momentum of the memory update (`--nce_m`).
    pub momentum: f64,
}

impl Default for CrdConfig {
    fn default() -> Self {
        CrdConfig {
            dim: 128,
            negatives: 16_384,
            temperature: 0.07,
            momentum: 0.5,
        }
    }
}

/// An embedding head: `Linear(d_in, dim)` then L2 normalisation of each row.
struct Embed {
    weight: Var,
    bias: Var,
}

impl Embed {
    /// PyTorch's `nn.Linear` initialisation: weight and bias uniform in ±1/√d_in.
    fn new(d_in: usize, dim: usize, rng: &mut impl Rng, device: &Device) -> Result<Embed> {
        let bound = 1.0 / (d_in as f32).sqrt();
        let mut draw =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..bound)).collect() };
        Ok(Embed {
            weight: Var::from_vec(draw(dim * d_in), (dim, d_in), device)?,
            bias: Var::from_vec(draw(dim), dim, device)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let lin = Linear::new(
            self.weight.as_tensor().clone(),
            Some(self.bias.as_tensor().clone()),
        );
        l2_normalize(&lin.forward(x)?)
    }
}

/// Each row divided by its L2 norm.
fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// The training images' indices grouped by class, to draw each image's negatives from the
/// images of other classes without a list per class.
struct ByClass {
    /// Indices sorted by class (stable).
    order: Vec<u32>,
    /// `start[c]..start[c + 1]` is class c's range of `order`.
    start: Vec<usize>,
}

impl ByClass {
    fn new(labels: &[u32], classes: usize) -> ByClass {
        let mut start = vec![0usize; classes + 1];
        for &y in labels {
            start[y as usize + 1] += 1;
        }
        for c in 0..classes {
            start[c + 1] += start[c];
        }
        let mut next = start.clone();
        let mut order = vec![0u32; labels.len()];
        for (i, &y) in labels.iter().enumerate() {
            order[next[y as usize]] = i as u32;
            next[y as usize] += 1;
        }
        ByClass { order, start }
    }

    /// The j-th image not of class `y`.
    fn negative(&self, y: usize, j: usize) -> u32 {
        let (lo, hi) = (self.start[y], self.start[y + 1]);
        self.order[if j < lo { j } else { j + hi - lo }]
    }

    /// How many images are not of class `y`.
    fn negatives_of(&self, y: usize) -> usize {
        self.order.len() - (self.start[y + 1] - self.start[y])
    }
}

/// CRD's trainable heads and its state between steps.
pub struct Crd {
    cfg: CrdConfig,
    n_data: usize,
    embed_s: Embed,
    embed_t: Embed,
    /// RepDistiller's `memory_v1`: student embeddings, `n_data × dim`.
    memory_s: Tensor,
    /// `memory_v2`: teacher embeddings.
    memory_t: Tensor,
    /// Z of the student-anchored and the teacher-anchored scores, once set.
    z: Option<(f64, f64)>,
    by_class: ByClass,
    /// Reused per-batch buffers: the taken-bitmap of the negatives' draw, the index rows.
    taken: Vec<bool>,
    rows: Vec<u32>,
    seed: u64,
}

impl Crd {
    /// CRD for a student of feature size `s_dim` and a teacher of `t_dim` over training images
    /// of `labels` (`classes` classes); heads and memories drawn from `seed`.
    pub fn new(
        cfg: CrdConfig,
        s_dim: usize,
        t_dim: usize,
        labels: &[u32],
        classes: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Crd> {
        let n_data = labels.len();
        let mut rng = rng_for(&[seed, stream::CRD_INIT]);
        let embed_s = Embed::new(s_dim, cfg.dim, &mut rng, device)?;
        let embed_t = Embed::new(t_dim, cfg.dim, &mut rng, device)?;
        // RepDistiller: uniform in ±1/√(dim/3).
        let stdv = 1.0 / (cfg.dim as f32 / 3.0).sqrt();
        let mut bank = || -> Result<Tensor> {
            let v: Vec<f32> = (0..n_data * cfg.dim)
                .map(|_| rng.random_range(-stdv..stdv))
                .collect();
            Ok(Tensor::from_vec(v, (n_data, cfg.dim), device)?)
        };
        let (memory_s, memory_t) = (bank()?, bank()?);
        Ok(Crd {
            cfg,
            n_data,
            embed_s,
            embed_t,
            memory_s,
            memory_t,
            z: None,
            by_class: ByClass::new(labels, classes),
            taken: Vec::new(),
            rows: Vec::new(),
            seed,
        })
    }

    /// The heads' variables for the optimiser, named `crd.embed_s.linear.weight`, ...
    pub fn trainable(&self) -> Vec<(String, Var)> {
        vec![
            (
                "crd.embed_s.linear.weight".into(),
                self.embed_s.weight.clone(),
            ),
            ("crd.embed_s.linear.bias".into(), self.embed_s.bias.clone()),
            (
                "crd.embed_t.linear.weight".into(),
                self.embed_t.weight.clone(),
            ),
            ("crd.embed_t.linear.bias".into(), self.embed_t.bias.clone()),
        ]
    }

    /// Everything a checkpoint keeps: the heads, both memories and Z (`NaN` while unset).
    pub fn state(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out: BTreeMap<String, Tensor> = self
            .trainable()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        // Copies: the banks change in place at the next step.
        out.insert("crd.memory_v1".into(), self.memory_s.copy()?);
        out.insert("crd.memory_v2".into(), self.memory_t.copy()?);
        let (zs, zt) = self.z.unwrap_or((f64::NAN, f64::NAN));
        out.insert(
            "crd.z".into(),
            Tensor::new(&[zs, zt], self.memory_s.device())?,
        );
        Ok(out)
    }

    /// Restores [`Crd::state`] (read from `origin`, which errors name).
    pub fn load_state(
        &mut self,
        origin: &std::path::Path,
        state: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let device = self.memory_s.device().clone();
        let get = |name: &str, dims: &[usize]| -> Result<Tensor> {
            let t = state.get(name).ok_or_else(|| {
                StageError::invalid(origin, format!("tensor `{name}`"), "missing")
            })?;
            if t.dims() != dims {
                return Err(StageError::invalid(
                    origin,
                    format!("tensor `{name}`"),
                    format!("shape {:?}, expected {dims:?}", t.dims()),
                ));
            }
            Ok(t.to_device(&device)?)
        };
        for (name, var) in self.trainable() {
            var.set(&get(&name, var.dims())?.to_dtype(DType::F32)?)?;
        }
        let bank = [self.n_data, self.cfg.dim];
        // Own contiguous copies, since the banks are written in place.
        self.memory_s = get("crd.memory_v1", &bank)?
            .to_dtype(DType::F32)?
            .force_contiguous()?;
        self.memory_t = get("crd.memory_v2", &bank)?
            .to_dtype(DType::F32)?
            .force_contiguous()?;
        let z = get("crd.z", &[2])?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        self.z = (!z[0].is_nan()).then_some((z[0], z[1]));
        Ok(())
    }

    /// Each image's contrast row: its own index, then `negatives` images of other classes,
    /// drawn for batch `batch` of `epoch` (a resumed run draws the same).
    pub fn contrast_indices(
        &mut self,
        indices: &[u32],
        labels: &[u32],
        epoch: usize,
        batch: usize,
    ) -> &[u32] {
        let k = self.cfg.negatives;
        let mut rng = rng_for(&[self.seed, stream::CRD_NEGATIVES, epoch as u64, batch as u64]);
        let rows = &mut self.rows;
        rows.clear();
        for (&i, &y) in indices.iter().zip(labels) {
            rows.push(i);
            let m = self.by_class.negatives_of(y as usize);
            if k > m {
                // numpy's `replace=True` when there are fewer negatives than asked for.
                for _ in 0..k {
                    rows.push(self.by_class.negative(y as usize, rng.random_range(0..m)));
                }
                continue;
            }
            // Without replacement: rejection against a bitmap, cleared after.
            self.taken.resize(m, false);
            let first = rows.len();
            while rows.len() - first < k {
                let j = rng.random_range(0..m);
                if !self.taken[j] {
                    self.taken[j] = true;
                    rows.push(j as u32);
                }
            }
            for r in &mut rows[first..] {
                self.taken[*r as usize] = false;
                *r = self.by_class.negative(y as usize, *r as usize);
            }
        }
        &self.rows
    }

    /// The CRD loss of each image of a batch (its dataset `indices` and `labels`, batch `batch`
    /// of `epoch`): [`Crd::contrast_indices`] then [`Crd::per_sample_loss`].
    pub fn batch_loss(
        &mut self,
        f_s: &Tensor,
        f_t: &Tensor,
        indices: &[u32],
        labels: &[u32],
        (epoch, batch): (usize, usize),
    ) -> Result<Tensor> {
        self.contrast_indices(indices, labels, epoch, batch);
        let contrast = std::mem::take(&mut self.rows);
        let loss = self.per_sample_loss(f_s, f_t, indices, &contrast);
        self.rows = contrast;
        loss
    }

    /// The CRD loss of each image (`b` values; RepDistiller's loss is their mean) from the
    /// student's features `f_s` (`b × s_dim`, with gradient) and the teacher's `f_t` (detached),
    /// with contrast rows `contrast` (`b × (1 + negatives)`, own index first); then updates the
    /// memories at the images' `indices`.
    pub fn per_sample_loss(
        &mut self,
        f_s: &Tensor,
        f_t: &Tensor,
        indices: &[u32],
        contrast: &[u32],
    ) -> Result<Tensor> {
        let b = indices.len();
        let dev = self.memory_s.device().clone();
        let v_s = self.embed_s.forward(f_s)?;
        let v_t = self.embed_t.forward(f_t)?;
        let idx = Tensor::from_slice(contrast, contrast.len(), &dev)?;
        // Scores of each anchor against the other side's memory rows: b × (1 + K).
        let score = |memory: &Tensor, v: &Tensor| -> Result<Tensor> {
            let w = memory
                .index_select(&idx, 0)?
                .reshape((b, contrast.len() / b, self.cfg.dim))?;
            // The memory rows take no gradient: candle's matmul would make one of their size.
            let dots = engine::const_matmul::matmul_const_lhs(&w, &v.unsqueeze(2)?)?;
            Ok((dots.squeeze(2)? / self.cfg.temperature)?.exp()?)
        };
        let out_t = score(&self.memory_s, &v_t)?;
        let out_s = score(&self.memory_t, &v_s)?;
        let (zs, zt) = match self.z {
            Some(z) => z,
            None => {
                let n = self.n_data as f64;
                let z = (
                    out_s.mean_all()?.to_scalar::<f32>()? as f64 * n,
                    out_t.mean_all()?.to_scalar::<f32>()? as f64 * n,
                );
                self.z = Some(z);
                z
            }
        };
        let loss = (self.nce(&(out_s / zs)?)? + self.nce(&(out_t / zt)?)?)?;
        // The scores read copies of the rows (`index_select`), so the banks can change now.
        self.update(&self.memory_s, &v_s, indices)?;
        self.update(&self.memory_t, &v_t, indices)?;
        Ok(loss)
    }

    /// Eq. (18) per image: −log(P₀ / (P₀ + K·Pn + ε)) − Σ_k log(K·Pn / (P_k + K·Pn + ε)), with
    /// the noise probability Pn = 1/n_data.
    fn nce(&self, x: &Tensor) -> Result<Tensor> {
        let m = (x.dim(1)? - 1) as f64;
        let mpn = m / self.n_data as f64;
        let pos = x.narrow(1, 0, 1)?.squeeze(1)?;
        let log_d1 = (&pos / (&pos + (mpn + EPS))?)?.log()?;
        let neg = x.narrow(1, 1, x.dim(1)? - 1)?;
        let log_d0 = ((neg + (mpn + EPS))?.recip()? * mpn)?.log()?.sum(1)?;
        Ok((log_d1 + log_d0)?.neg()?)
    }

    /// Replaces the rows of `memory` at `indices` by normalise(m·row + (1 − m)·v), in place: a
    /// copy of the bank each step would move 2 × n_data × dim floats to change b rows.
    fn update(&self, memory: &Tensor, v: &Tensor, indices: &[u32]) -> Result<()> {
        let dev = memory.device();
        let idx = Tensor::from_slice(indices, indices.len(), dev)?;
        let m = self.cfg.momentum;
        let rows = ((memory.index_select(&idx, 0)? * m)? + (v.detach() * (1.0 - m))?)?;
        let rows = l2_normalize(&rows)?;
        let at = idx
            .unsqueeze(1)?
            .broadcast_as((indices.len(), self.cfg.dim))?
            .contiguous()?;
        Ok(memory.scatter_set(&at, &rows, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::science::reference_values::{assert_close, grid};

    fn t(v: Vec<f32>, dims: (usize, usize)) -> Tensor {
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn scaled(v: Vec<f32>, s: f32) -> Vec<f32> {
        v.into_iter().map(|x| x * s).collect()
    }

    /// Two batches through CRD with the weights, memories and contrast rows of
    /// tests/fixtures/crd/reference.py give the losses, Z, memories and head gradient that
    /// RepDistiller's own CRDLoss printed (in f64).
    #[test]
    fn matches_repdistillers_crd_loss() {
        let cfg = CrdConfig {
            dim: 4,
            negatives: 3,
            temperature: 0.2,
            momentum: 0.5,
        };
        let labels = [0u32, 1, 0, 1, 2, 2];
        let mut crd = Crd::new(cfg, 5, 3, &labels, 3, 0, &Device::Cpu).unwrap();
        crd.embed_s
            .weight
            .set(&t(grid(4, 5, 0.7, 1.3), (4, 5)))
            .unwrap();
        crd.embed_s
            .bias
            .set(
                &t(scaled(grid(1, 4, 0.5, 0.9), 0.1), (1, 4))
                    .squeeze(0)
                    .unwrap(),
            )
            .unwrap();
        crd.embed_t
            .weight
            .set(&t(grid(4, 3, 1.1, 0.4), (4, 3)))
            .unwrap();
        crd.embed_t
            .bias
            .set(
                &t(scaled(grid(1, 4, 0.2, 1.7), 0.1), (1, 4))
                    .squeeze(0)
                    .unwrap(),
            )
            .unwrap();
        crd.memory_s = t(scaled(grid(6, 4, 0.9, 0.6), 0.5), (6, 4));
        crd.memory_t = t(scaled(grid(6, 4, 0.4, 1.9), 0.5), (6, 4));
        // A checkpoint's snapshot must not follow the banks, which steps change in place.
        let snapshot = crd.state().unwrap();

        let mean = |l: Tensor| l.mean_all().unwrap();
        let l1 = crd
            .per_sample_loss(
                &t(grid(2, 5, 1.7, 0.8), (2, 5)),
                &t(grid(2, 3, 0.6, 2.1), (2, 3)),
                &[1, 4],
                &[1, 0, 2, 5, 4, 3, 3, 0],
            )
            .unwrap();
        let l1 = mean(l1).to_scalar::<f32>().unwrap();
        let l2 = mean(
            crd.per_sample_loss(
                &t(grid(2, 5, 0.3, 1.1), (2, 5)),
                &t(grid(2, 3, 1.4, 0.5), (2, 3)),
                &[0, 4],
                &[0, 5, 1, 3, 4, 2, 1, 1],
            )
            .unwrap(),
        );
        let grads = l2.backward().unwrap();
        assert_close(&[l1], &[6.4281988911], "loss 1");
        assert_close(&[l2.to_scalar::<f32>().unwrap()], &[7.3946204276], "loss 2");
        for (name, at) in [("crd.memory_v1", (0.9, 0.6)), ("crd.memory_v2", (0.4, 1.9))] {
            let kept = snapshot[name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(kept, scaled(grid(6, 4, at.0, at.1), 0.5), "{name} snapshot");
        }
        let (zs, zt) = crd.z.unwrap();
        assert_close(&[zs as f32, zt as f32], &[16.811179755, 27.914983311], "Z");
        let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_close(
            &flat(&crd.memory_s),
            &[
                0.69019937882,
                0.63991922180,
                0.32021130331,
                -0.10767046154,
                0.75174531328,
                0.43534791208,
                -0.051521070833,
                -0.49264262775,
                0.43160468332,
                0.21368994012,
                -0.078872847072,
                -0.34388307959,
                0.070560004030,
                -0.22126022165,
                -0.43578788621,
                -0.49808230442,
                0.66394694088,
                0.51382900778,
                0.035123067624,
                -0.54214442779,
                -0.49808230442,
                -0.38638224378,
                -0.13970774910,
                0.15577068176,
            ],
            "memory_v1",
        );
        assert_close(
            &flat(&crd.memory_t),
            &[
                0.43939757875,
                0.71334241563,
                -0.24447964858,
                -0.48816192731,
                -0.22447070645,
                0.80675412584,
                0.25350311647,
                0.48424875047,
                0.44560368003,
                0.070560004030,
                -0.49122630631,
                0.24705667557,
                0.49874749330,
                -0.12777055101,
                -0.41613372111,
                0.39683393192,
                0.30870017611,
                0.65314009109,
                0.58580065294,
                0.36735516560,
                0.37285260609,
                -0.43578788621,
                -0.091081252136,
                0.49467912331,
            ],
            "memory_v2",
        );
        assert_close(
            &flat(grads.get(crd.embed_s.weight.as_tensor()).unwrap()),
            &[
                -0.058572182936,
                -0.046243252848,
                0.016620662668,
                0.061321389091,
                0.039009625836,
                -0.0061505736753,
                -0.058049807532,
                -0.046511761416,
                0.015854698373,
                0.060895020794,
                -0.16907094102,
                -0.24758274658,
                -0.055534206140,
                0.19720254555,
                0.23443482574,
                -0.17351502416,
                -0.27608173805,
                -0.076944186995,
                0.20627856848,
                0.26407850419,
            ],
            "d loss 2 / d embed_s.weight",
        );
    }

    /// Each image's row starts with itself, then distinct images of other classes; the same
    /// (epoch, batch) draws the same rows, another batch other rows; asking for more negatives
    /// than exist draws with replacement.
    #[test]
    fn negatives_are_distinct_images_of_other_classes() {
        let labels: Vec<u32> = (0..40).map(|i| (i % 4) as u32).collect();
        let cfg = CrdConfig {
            dim: 2,
            negatives: 25,
            ..CrdConfig::default()
        };
        let mut crd = Crd::new(cfg, 3, 3, &labels, 4, 7, &Device::Cpu).unwrap();
        let (idx, ys) = ([5u32, 10, 39], [1u32, 2, 3]);
        let rows = crd.contrast_indices(&idx, &ys, 2, 3).to_vec();
        assert_eq!(rows.len(), 3 * 26);
        for (r, row) in rows.chunks(26).enumerate() {
            assert_eq!(row[0], idx[r]);
            let mut neg: Vec<u32> = row[1..].to_vec();
            assert!(neg.iter().all(|&j| labels[j as usize] != ys[r]), "{row:?}");
            neg.sort();
            neg.dedup();
            assert_eq!(neg.len(), 25, "repeated negatives: {row:?}");
        }
        assert_eq!(crd.contrast_indices(&idx, &ys, 2, 3), rows);
        assert_ne!(crd.contrast_indices(&idx, &ys, 2, 4), rows);
        let mut many = Crd::new(
            CrdConfig {
                negatives: 31,
                ..cfg
            },
            3,
            3,
            &labels,
            4,
            7,
            &Device::Cpu,
        )
        .unwrap();
        let rows = many.contrast_indices(&[0], &[0], 0, 0);
        assert_eq!(rows.len(), 32);
        assert!(rows[1..].iter().all(|&j| labels[j as usize] != 0));
    }
}
