//! SGD with momentum, Nesterov and weight decay, with PyTorch's semantics, and with state that
//! can be saved and restored (candle's own `SGD` has no momentum and no state to save).
//!
//! Per parameter w with gradient g: `g ← g + wd·w`; `b ← μ·b + g` (`b ← g` on the first step);
//! `d ← g + μ·b` with Nesterov, else `d ← b`; `w ← w − lr·d`.

use crate::error::{Result, StageError};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
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
        let c = self.config;
        for (name, var) in &self.params {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Detached: gradients (and so momentum buffers) would otherwise keep every past
            // step's graph alive.
            let mut g = g.detach();
            if c.weight_decay != 0.0 {
                g = (g + (var.as_tensor() * c.weight_decay)?)?;
            }
            let d = if c.momentum != 0.0 {
                let b = match self.buffers.get(name) {
                    Some(b) => ((b * c.momentum)? + &g)?,
                    None => g.clone(),
                };
                let d = if c.nesterov {
                    (&g + (&b * c.momentum)?)?
                } else {
                    b.clone()
                };
                self.buffers.insert(name.clone(), b);
                d
            } else {
                g
            };
            var.set(&(var.as_tensor().detach() - (d * lr)?)?)?;
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
}
