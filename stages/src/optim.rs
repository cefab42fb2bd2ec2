//! SGD with momentum, Nesterov and weight decay, with PyTorch's semantics, and with state that
//! can be saved and restored (candle's own `SGD` has no momentum and no state to save).
//!
//! Per parameter w with gradient g: `g ← g + wd·w`; `b ← μ·b + g` (`b ← g` on the first step);
//! `d ← g + μ·b` with Nesterov, else `d ← b`; `w ← w − lr·d`.
//!
//! On CPU the update runs in place, as two fused loops per parameter (one writes the momentum
//! buffer, one the weights), with no allocation; as candle tensor ops it would be seven
//! elementwise passes, each allocating a parameter-sized tensor. Other devices use the tensor ops.

use crate::error::{Result, StageError};
use crate::profile::{timer, Section};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp3, Layout, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Optimiser hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgdConfig {
    /// Momentum μ.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: false,
        }
    }
}

/// SGD over a fixed, named set of variables.
pub struct Sgd {
    params: Vec<(String, Var)>,
    buffers: BTreeMap<String, Tensor>,
    config: SgdConfig,
}

impl Sgd {
    /// An optimiser over `params` (name, variable); names key the saved state.
    pub fn new(mut params: Vec<(String, Var)>, config: SgdConfig) -> Self {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        Sgd {
            params,
            buffers: BTreeMap::new(),
            config,
        }
    }

    /// One update with learning rate `lr`; variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let _t = timer(Section::OptimizerStep);
        let (params, buffers, config) = (&self.params, &mut self.buffers, self.config);
        for (name, var) in params {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let w = var.as_tensor();
            if w.device().is_cpu() && w.dtype() == DType::F32 && w.is_contiguous() {
                step_in_place(config, buffers, name, w, &g.contiguous()?, lr)?;
            } else {
                step_with_tensor_ops(config, buffers, name, var, g, lr)?;
            }
        }
        Ok(())
    }

    /// The momentum buffers, by parameter name (for checkpoints).
    pub fn state(&self) -> &BTreeMap<String, Tensor> {
        &self.buffers
    }

    /// Restores momentum buffers saved by [`Sgd::state`], checking names and shapes.
    pub fn load_state(&mut self, state: BTreeMap<String, Tensor>) -> Result<()> {
        for (name, t) in &state {
            let var = self
                .params
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v)
                .ok_or_else(|| {
                    StageError::Config(format!("optimizer state names unknown parameter `{name}`"))
                })?;
            if var.dims() != t.dims() {
                return Err(StageError::Config(format!(
                    "optimizer state for `{name}` has shape {:?}, the parameter {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
        }
        self.buffers = state;
        Ok(())
    }
}

/// The CPU update of one parameter (see [`MomentumStep`] and [`WeightStep`]).
fn step_in_place(
    c: SgdConfig,
    buffers: &mut BTreeMap<String, Tensor>,
    name: &str,
    w: &Tensor,
    g: &Tensor,
    lr: f64,
) -> Result<()> {
    let update = Update {
        lr: lr as f32,
        momentum: c.momentum as f32,
        weight_decay: c.weight_decay as f32,
        nesterov: c.nesterov,
    };
    if c.momentum == 0.0 {
        // Without momentum the buffer is never read: w ← w − lr·(g + wd·w).
        return Ok(w.inplace_op3(g, g, &WeightStep(update))?);
    }
    let b = match buffers.get(name) {
        Some(b) if b.is_contiguous() && b.dtype() == DType::F32 && b.device().is_cpu() => {
            b.inplace_op3(g, w, &MomentumStep(update))?;
            b.clone()
        }
        _ => {
            // First step (or a buffer restored in another layout): b ← g + wd·w.
            let b = (g + (w * c.weight_decay)?)?.contiguous()?;
            buffers.insert(name.to_string(), b.clone());
            b
        }
    };
    Ok(w.inplace_op3(g, &b, &WeightStep(update))?)
}

/// The update of one parameter as candle tensor ops (any device).
fn step_with_tensor_ops(
    c: SgdConfig,
    buffers: &mut BTreeMap<String, Tensor>,
    name: &str,
    var: &Var,
    g: &Tensor,
    lr: f64,
) -> Result<()> {
    // Detached: gradients (and so momentum buffers) would otherwise keep every past
    // step's graph alive.
    let mut g = g.detach();
    if c.weight_decay != 0.0 {
        g = (g + (var.as_tensor() * c.weight_decay)?)?;
    }
    let d = if c.momentum != 0.0 {
        let b = match buffers.get(name) {
            Some(b) => ((b * c.momentum)? + &g)?,
            None => g.clone(),
        };
        let d = if c.nesterov {
            (&g + (&b * c.momentum)?)?
        } else {
            b.clone()
        };
        buffers.insert(name.to_string(), b);
        d
    } else {
        g
    };
    var.set(&(var.as_tensor().detach() - (d * lr)?)?)?;
    Ok(())
}

/// Hyper-parameters of one in-place update, in f32.
#[derive(Clone, Copy)]
struct Update {
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    nesterov: bool,
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(d), Some((a, b))) => Ok(&d[a..b]),
        _ => candle_core::bail!("sgd: expected contiguous f32 tensors"),
    }
}

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(d), Some((a, b))) => Ok(&mut d[a..b]),
        _ => candle_core::bail!("sgd: expected contiguous f32 tensors"),
    }
}

/// On the momentum buffer b, with sources (g, w): `b ← μ·b + g + wd·w`.
struct MomentumStep(Update);

impl InplaceOp3 for MomentumStep {
    fn name(&self) -> &'static str {
        "sgd-momentum"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let u = self.0;
        let (b, g, w) = (slice_mut(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        for ((b, &g), &w) in b.iter_mut().zip(g).zip(w) {
            *b = u.momentum * *b + g + u.weight_decay * w;
        }
        Ok(())
    }
}

/// On the weights w, with sources (g, b): `w ← w − lr·d`, d = b, or `g + wd·w + μ·b` with
/// Nesterov, or `g + wd·w` without momentum (then b is not read).
struct WeightStep(Update);

impl InplaceOp3 for WeightStep {
    fn name(&self) -> &'static str {
        "sgd-weights"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let u = self.0;
        let (w, g, b) = (slice_mut(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        if u.momentum == 0.0 {
            for (w, &g) in w.iter_mut().zip(g) {
                *w -= u.lr * (g + u.weight_decay * *w);
            }
        } else if u.nesterov {
            for ((w, &g), &b) in w.iter_mut().zip(g).zip(b) {
                *w -= u.lr * (g + u.weight_decay * *w + u.momentum * b);
            }
        } else {
            for (w, &b) in w.iter_mut().zip(b) {
                *w -= u.lr * b;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_pytorch_update_rule() {
        // w = 1, loss = 2w (g = 2), lr 0.1, μ 0.9, wd 0.5.
        // step 1: g' = 2 + 0.5·1 = 2.5, b = 2.5, w = 1 − 0.25 = 0.75
        // step 2: g' = 2 + 0.375 = 2.375, b = 0.9·2.5 + 2.375 = 4.625, w = 0.75 − 0.4625 = 0.2875
        let w = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut opt = Sgd::new(
            vec![("w".into(), w.clone())],
            SgdConfig {
                momentum: 0.9,
                weight_decay: 0.5,
                nesterov: false,
            },
        );
        for _ in 0..2 {
            let loss = (w.as_tensor() * 2.0).unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap(), 0.1).unwrap();
        }
        let v = w.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((v - 0.2875).abs() < 1e-6, "{v}");
    }

    #[test]
    fn nesterov_update() {
        // w = 1, g = 2, no wd, μ 0.5, lr 0.1: b = 2, d = 2 + 0.5·2 = 3, w = 0.7.
        let w = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut opt = Sgd::new(
            vec![("w".into(), w.clone())],
            SgdConfig {
                momentum: 0.5,
                weight_decay: 0.0,
                nesterov: true,
            },
        );
        let loss = (w.as_tensor() * 2.0).unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap(), 0.1).unwrap();
        let v = w.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((v - 0.7).abs() < 1e-6, "{v}");
    }

    /// The in-place CPU update equals the tensor-op update (used off the CPU) over several
    /// steps, for plain, Nesterov and momentum-free SGD, buffers included.
    #[test]
    fn in_place_equals_tensor_ops() {
        use crate::models::testing::{max_rel, random};
        for (momentum, nesterov, wd) in [(0.9, false, 5e-4), (0.8, true, 1e-2), (0.0, false, 1e-3)]
        {
            let config = SgdConfig {
                momentum,
                weight_decay: wd,
                nesterov,
            };
            let init = random(&[7, 5], -1.0..1.0, 1);
            let (w1, w2) = (
                Var::from_tensor(&init).unwrap(),
                Var::from_tensor(&init.copy().unwrap()).unwrap(),
            );
            let mut fused = Sgd::new(vec![("w".into(), w1.clone())], config);
            let mut plain = Sgd::new(vec![("w".into(), w2.clone())], config);
            for step in 0..4u64 {
                let m = random(&[7, 5], -1.0..1.0, 10 + step);
                let l1 = (w1.as_tensor() * &m)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let l2 = (w2.as_tensor() * &m)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let (g1, g2) = (l1.backward().unwrap(), l2.backward().unwrap());
                fused.step(&g1, 0.1).unwrap();
                let g = g2.get(w2.as_tensor()).unwrap().clone();
                step_with_tensor_ops(config, &mut plain.buffers, "w", &w2, &g, 0.1).unwrap();
                assert!(
                    max_rel(w1.as_tensor(), w2.as_tensor()) < 1e-6,
                    "step {step}"
                );
                if momentum != 0.0 {
                    assert!(max_rel(&fused.state()["w"], &plain.state()["w"]) < 1e-6);
                }
            }
        }
    }
}
