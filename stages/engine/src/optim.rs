//! SGD with momentum, Nesterov and weight decay, with PyTorch's semantics, and with state that
//! can be saved and restored (candle's own `SGD` has no momentum and no state to save).
//!
//! Per parameter w with gradient g: `g ← g + wd·w`; `b ← μ·b + g` (`b ← g` on the first step);
//! `d ← g + μ·b` with Nesterov, else `d ← b`; `w ← w − lr·d`.
//!
//! On CPU the update runs in place, one pass over each parameter that reads the gradient and
//! writes the momentum buffer and the weights, with no allocation; as candle tensor ops it would
//! be seven elementwise passes, each allocating a parameter-sized tensor. On CUDA the same pass
//! runs over up to 64 parameters per kernel (`gpu::sgd_multi`), with the momentum buffers and
//! the learning rate in device memory.
//! Other devices use the tensor ops.

use crate::error::{EngineError, Result};
use crate::models::cpu::{f32_slice, f32_slice_mut};
use crate::profile::{timer, Section};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor, Var};
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

/// A momentum buffer: host memory for CPU parameters (updated in place in the same pass as the
/// weights), a tensor on other devices.
enum Buffer {
    Host(Vec<f32>),
    Device(Tensor),
}

/// SGD over a fixed, named set of variables.
pub struct Sgd {
    params: Vec<(String, Var)>,
    buffers: BTreeMap<String, Buffer>,
    config: SgdConfig,
    /// The learning rate in device memory, which the CUDA update reads.
    #[cfg(feature = "cuda")]
    lr_on_device: Option<Tensor>,
}

/// Whether a parameter takes the in-place CPU update.
fn on_host(w: &Tensor) -> bool {
    w.device().is_cpu() && w.dtype() == DType::F32 && w.is_contiguous()
}

impl Sgd {
    /// An optimiser over `params` (name, variable); names key the saved state.
    pub fn new(mut params: Vec<(String, Var)>, config: SgdConfig) -> Self {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        Sgd {
            params,
            buffers: BTreeMap::new(),
            config,
            #[cfg(feature = "cuda")]
            lr_on_device: None,
        }
    }

    /// One update with learning rate `lr`; variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let _t = timer(Section::OptimizerStep);
        let (params, buffers, config) = (&self.params, &mut self.buffers, self.config);
        #[cfg(feature = "cuda")]
        let mut on_gpu = Vec::new();
        for (name, var) in params {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let w = var.as_tensor();
            #[cfg(feature = "cuda")]
            if on_cuda(w) {
                on_gpu.push((name.as_str(), w, g));
                continue;
            }
            if on_host(w) {
                step_in_place(config, buffers, name, w, &g.contiguous()?, lr)?;
            } else {
                step_with_tensor_ops(config, buffers, name, var, g, lr)?;
            }
        }
        #[cfg(feature = "cuda")]
        if !on_gpu.is_empty() {
            step_on_cuda(config, buffers, &mut self.lr_on_device, &on_gpu, lr)?;
        }
        Ok(())
    }

    /// The momentum buffers, by parameter name, as tensors shaped like their parameters (for
    /// checkpoints).
    pub fn state(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (name, var) in &self.params {
            let t = match self.buffers.get(name) {
                None => continue,
                // A copy: the CUDA update changes the live buffer in place.
                Some(Buffer::Device(t)) => t.copy()?,
                Some(Buffer::Host(v)) => {
                    Tensor::from_slice(v, var.shape(), &candle_core::Device::Cpu)?
                }
            };
            out.insert(name.clone(), t);
        }
        Ok(out)
    }

    /// Restores momentum buffers saved by [`Sgd::state`], checking names and shapes.
    pub fn load_state(&mut self, state: BTreeMap<String, Tensor>) -> Result<()> {
        let mut buffers = BTreeMap::new();
        for (name, t) in state {
            let var = self
                .params
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v)
                .ok_or_else(|| {
                    EngineError::Config(format!("optimizer state names unknown parameter `{name}`"))
                })?;
            if var.dims() != t.dims() {
                return Err(EngineError::Config(format!(
                    "optimizer state for `{name}` has shape {:?}, the parameter {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            let b = if on_host(var.as_tensor()) {
                Buffer::Host(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
            } else {
                // A copy (`to_device` to the same device shares the storage, which the CUDA
                // update would then change under the caller).
                Buffer::Device(t.to_device(var.device())?.copy()?)
            };
            buffers.insert(name, b);
        }
        self.buffers = buffers;
        Ok(())
    }
}

/// Whether a parameter takes the in-place CUDA update.
#[cfg(feature = "cuda")]
fn on_cuda(w: &Tensor) -> bool {
    w.device().is_cuda() && w.dtype() == DType::F32 && w.is_contiguous()
}

/// The CUDA update of `params` (name, weights, gradient): the multi-tensor kernel over the
/// weights, gradients and momentum buffers, in place, the learning rate written to the device.
#[cfg(feature = "cuda")]
fn step_on_cuda(
    c: SgdConfig,
    buffers: &mut BTreeMap<String, Buffer>,
    lr_on_device: &mut Option<Tensor>,
    params: &[(&str, &Tensor, &Tensor)],
    lr: f64,
) -> Result<()> {
    use crate::gpu::{set_f32, sgd_multi, tensor_ptr, SgdParam};
    let device = params[0].1.device();
    let candle_core::Device::Cuda(dev) = device else {
        unreachable!("on_cuda checked the device")
    };
    let lr_t = match lr_on_device {
        Some(t) if t.device().same_device(device) => t.clone(),
        _ => lr_on_device
            .insert(Tensor::zeros(1, DType::F32, device)?)
            .clone(),
    };
    let (_, lr_at) = tensor_ptr(&lr_t, "learning rate")?;
    set_f32(dev, lr_at, lr as f32)?;
    // The contiguous f32 gradients live until the launches are queued (freed in stream order).
    let mut kept = Vec::with_capacity(params.len());
    let mut table = Vec::with_capacity(params.len());
    for &(name, w, g) in params {
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        if g.elem_count() != w.elem_count() {
            return Err(EngineError::Numeric(format!(
                "the gradient of `{name}` has {} values, the parameter {}",
                g.elem_count(),
                w.elem_count()
            )));
        }
        let buf = if c.momentum != 0.0 {
            let b = match buffers.remove(name) {
                Some(Buffer::Device(t)) if t.is_contiguous() && t.dtype() == DType::F32 => t,
                Some(Buffer::Device(t)) => t.to_dtype(DType::F32)?.contiguous()?.copy()?,
                Some(Buffer::Host(v)) => Tensor::from_slice(&v, w.shape(), device)?,
                None => Tensor::zeros(w.shape(), DType::F32, device)?,
            };
            let at = tensor_ptr(&b, "SGD momentum buffer")?.1;
            buffers.insert(name.to_string(), Buffer::Device(b));
            at
        } else {
            0
        };
        table.push(SgdParam {
            w: tensor_ptr(w, "SGD parameter")?.1,
            g: tensor_ptr(&g, "SGD gradient")?.1,
            buf,
            n: w.elem_count(),
        });
        kept.push(g);
    }
    sgd_multi(
        dev,
        &table,
        lr_at,
        c.momentum as f32,
        c.weight_decay as f32,
        c.nesterov,
    )?;
    drop(kept);
    Ok(())
}

/// The CPU update of one parameter: one pass over w, g and the momentum buffer.
fn step_in_place(
    c: SgdConfig,
    buffers: &mut BTreeMap<String, Buffer>,
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
        return Ok(w.inplace_op2(g, &SgdStep(update, std::sync::Mutex::new(&mut [])))?);
    }
    let n = w.elem_count();
    // `load_state` keeps the buffers of host parameters in host memory, so a tensor here is a
    // bug, not an input; the kernel itself checks the length.
    let Buffer::Host(b) = buffers
        .entry(name.to_string())
        .or_insert_with(|| Buffer::Host(vec![0.0; n]))
    else {
        return Err(EngineError::Numeric(format!(
            "the momentum buffer of `{name}` is not in host memory"
        )));
    };
    Ok(w.inplace_op2(g, &SgdStep(update, std::sync::Mutex::new(b.as_mut_slice())))?)
}

/// The update of one parameter as candle tensor ops (any device).
fn step_with_tensor_ops(
    c: SgdConfig,
    buffers: &mut BTreeMap<String, Buffer>,
    name: &str,
    var: &Var,
    g: &Tensor,
    lr: f64,
) -> Result<()> {
    // Detached, the gradient and the weight alike: a term computed from the variable itself
    // would record an op, and the momentum buffer built on it would chain every past step's
    // buffer into one growing graph.
    let mut g = g.detach();
    if c.weight_decay != 0.0 {
        g = (g + (var.as_tensor().detach() * c.weight_decay)?)?;
    }
    let d = if c.momentum != 0.0 {
        let b = match buffers.get(name) {
            Some(Buffer::Device(b)) => ((b * c.momentum)? + &g)?,
            Some(Buffer::Host(v)) => {
                let b = Tensor::from_slice(v, var.shape(), &candle_core::Device::Cpu)?
                    .to_device(var.device())?;
                ((b * c.momentum)? + &g)?
            }
            None => g.clone(),
        };
        let d = if c.nesterov {
            (&g + (&b * c.momentum)?)?
        } else {
            b.clone()
        };
        buffers.insert(name.to_string(), Buffer::Device(b));
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

/// On the weights w, with source g and the momentum buffer b (empty without momentum), per
/// element: `g' = g + wd·w`; `b ← μ·b + g'`; `w ← w − lr·d` with `d = b`, `g' + μ·b` under
/// Nesterov, or `g'` without momentum. (A zero buffer makes the first step `b = g'`, as in
/// PyTorch.) The buffer sits behind a mutex only because the op is shared by reference.
struct SgdStep<'a>(Update, std::sync::Mutex<&'a mut [f32]>);

impl InplaceOp2 for SgdStep<'_> {
    fn name(&self) -> &'static str {
        "sgd-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let u = self.0;
        let (w, g) = (f32_slice_mut(s1, l1, "sgd")?, f32_slice(s2, l2, "sgd")?);
        let mut b = self.1.lock().unwrap_or_else(|e| e.into_inner());
        if u.momentum == 0.0 {
            for (w, &g) in w.iter_mut().zip(g) {
                *w -= u.lr * (g + u.weight_decay * *w);
            }
            return Ok(());
        }
        if b.len() != w.len() {
            candle_core::bail!("sgd: momentum buffer of {} values for {}", b.len(), w.len())
        }
        for ((w, &g), b) in w.iter_mut().zip(g).zip(b.iter_mut()) {
            let g = g + u.weight_decay * *w;
            *b = u.momentum * *b + g;
            let d = if u.nesterov { g + u.momentum * *b } else { *b };
            *w -= u.lr * d;
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
                if let Some(Buffer::Device(b)) = plain.buffers.get("w") {
                    assert!(!b.track_op(), "the momentum buffer records a graph");
                }
                assert!(
                    max_rel(w1.as_tensor(), w2.as_tensor()) < 1e-6,
                    "step {step}"
                );
                if momentum != 0.0 {
                    let (a, b) = (fused.state().unwrap(), plain.state().unwrap());
                    assert!(max_rel(&a["w"], &b["w"]) < 1e-6);
                }
            }
        }
    }

    /// Saving the state and loading it into a fresh optimiser continues exactly as if nothing
    /// had happened (the host buffers round-trip through tensors).
    #[test]
    fn state_round_trip_continues_identically() {
        use crate::models::testing::random;
        let config = SgdConfig {
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: true,
        };
        let w1 = Var::from_tensor(&random(&[4, 3], -1.0..1.0, 1)).unwrap();
        let mut a = Sgd::new(vec![("w".into(), w1.clone())], config);
        let step = |opt: &mut Sgd, w: &Var, seed: u64| {
            let m = random(&[4, 3], -1.0..1.0, seed);
            let loss = (w.as_tensor() * &m)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            opt.step(&loss.backward().unwrap(), 0.1).unwrap();
        };
        step(&mut a, &w1, 10);
        step(&mut a, &w1, 11);
        let w2 = Var::from_tensor(&w1.as_tensor().copy().unwrap()).unwrap();
        let mut b = Sgd::new(vec![("w".into(), w2.clone())], config);
        b.load_state(a.state().unwrap()).unwrap();
        for seed in 12..15 {
            step(&mut a, &w1, seed);
            step(&mut b, &w2, seed);
        }
        let (x, y) = (
            w1.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            w2.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
        assert_eq!(x, y);
    }
}
