//! The CPU's [`Kernels`] for the planned training step ([`super::plan`]): host vectors of f32,
//! our convolution, BatchNorm and max-pooling kernels, and the residual passes the plan fuses
//! (the masked shortcut gradient, option A's subsampling and its adjoint). The same kernels in the same
//! order as the autograd path, so a planned step is bitwise an autograd one.

use super::add_relu::add_relu_into;
use super::batch_norm::{backward_into as bn_backward, normalize_into, BatchNorm};
use super::conv::Conv2d;
use super::cpu::{relu_grad, with_f32};
use super::plan::Kernels;
use super::pool::{max_pool_backward_into, max_pool_into, PoolGeometry};
use crate::profile::{timer, Section};
use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor, Var};
use rayon::prelude::*;

/// Elements per parallel task of the elementwise passes.
const CHUNK: usize = 1 << 15;

/// The CPU kernels (stateless: the buffers are the plan's).
pub struct CpuKernels;

/// A BatchNorm's batch mean and `1/√(var + eps)` per channel.
#[derive(Default)]
pub struct CpuStats {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

/// Makes `v` exactly `len` long, allocating only when it grows.
fn fit(v: &mut Vec<f32>, len: usize) {
    v.resize(len, 0.0);
}

/// Adds `grad` to the gradient of `var` in `grads` (sets it when there is none yet).
fn accumulate(grads: &mut GradStore, var: &Tensor, grad: Tensor) -> Result<()> {
    let sum = match grads.get(var) {
        Some(g) => (g + grad)?,
        None => grad,
    };
    grads.insert(var, sum);
    Ok(())
}

impl Kernels for CpuKernels {
    type Buf = Vec<f32>;
    type Stats = CpuStats;
    type Graph = ();

    fn fit(&mut self, b: &mut Vec<f32>, len: usize) -> Result<()> {
        fit(b, len);
        Ok(())
    }

    fn load(&mut self, t: &Tensor, b: &mut Vec<f32>) -> Result<()> {
        fit(b, t.elem_count());
        with_f32(t, "planned step", |v| b.copy_from_slice(v))
    }

    fn output(&mut self, b: &Vec<f32>, dims: [usize; 4]) -> Result<Var> {
        Var::from_vec(b.clone(), dims.to_vec(), &Device::Cpu)
    }

    fn conv_forward(
        &mut self,
        conv: &Conv2d,
        x: &Vec<f32>,
        dims: [usize; 4],
        y: &mut Vec<f32>,
    ) -> Result<()> {
        let g = conv.geometry(dims)?;
        fit(y, g.output_len());
        with_f32(conv.weight(), "conv2d weight", |wt| {
            g.forward_into(x, wt, y)
        })
    }

    fn bn_forward(
        &mut self,
        bn: &BatchNorm,
        x: &Vec<f32>,
        [n, c, h, w]: [usize; 4],
        relu: bool,
        train: bool,
        stats: &mut CpuStats,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        let _t = timer(Section::BatchNormForward);
        fit(y, x.len());
        let (mean, inv_std) = match train {
            true => bn.batch_statistics(x, [n, c, h * w])?,
            false => bn.running_statistics()?,
        };
        let (gamma, beta) = bn.affine();
        with_f32(gamma, "batch norm", |gamma| {
            with_f32(beta, "batch norm", |beta| {
                normalize_into(x, gamma, beta, &mean, &inv_std, relu, c, h * w, y)
            })
        })??;
        stats.mean = mean;
        stats.inv_std = inv_std;
        Ok(())
    }

    fn bn_backward(
        &mut self,
        bn: &BatchNorm,
        x: &Vec<f32>,
        dy: &Vec<f32>,
        mask: Option<&Vec<f32>>,
        stats: &CpuStats,
        [n, c, h, w]: [usize; 4],
        dx: &mut Vec<f32>,
        grads: &mut GradStore,
    ) -> Result<()> {
        fit(dx, x.len());
        let (gamma, beta) = bn.affine();
        let (dgamma, dbeta) = with_f32(gamma, "batch norm", |g| {
            bn_backward(
                x,
                dy,
                mask.map(|m| m.as_slice()),
                g,
                &stats.mean,
                &stats.inv_std,
                true,
                [n, c, h * w],
                dx,
            )
        })?;
        accumulate(grads, gamma, Tensor::from_vec(dgamma, c, &Device::Cpu)?)?;
        accumulate(grads, beta, Tensor::from_vec(dbeta, c, &Device::Cpu)?)
    }

    fn conv_backward(
        &mut self,
        conv: &Conv2d,
        x: &Vec<f32>,
        dims: [usize; 4],
        dy: &Vec<f32>,
        dx: Option<&mut Vec<f32>>,
        grads: &mut GradStore,
    ) -> Result<()> {
        let g = conv.geometry(dims)?;
        let dx = dx.map(|d| {
            fit(d, dims.iter().product());
            d.as_mut_slice()
        });
        let weight = conv.weight();
        let dw = with_f32(weight, "conv2d weight", |wt| g.backward_into(x, wt, dy, dx))?;
        accumulate(
            grads,
            weight,
            Tensor::from_vec(dw, weight.shape(), &Device::Cpu)?,
        )
    }

    fn add_relu(&mut self, a: &Vec<f32>, b: &Vec<f32>, y: &mut Vec<f32>) -> Result<()> {
        add_relu_into(a, b, y);
        Ok(())
    }

    fn add_relu_in_place(&mut self, y: &mut Vec<f32>, a: &Vec<f32>) -> Result<()> {
        let _t = timer(Section::AddReluForward);
        y.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK))
            .for_each(|(o, a)| {
                for (o, &p) in o.iter_mut().zip(a) {
                    *o = (p + *o).max(0.0);
                }
            });
        Ok(())
    }

    fn add_masked(&mut self, dx: &mut Vec<f32>, dy: &Vec<f32>, out: &Vec<f32>) -> Result<()> {
        let _t = timer(Section::AddReluBackward);
        dx.par_chunks_mut(CHUNK)
            .zip(dy.par_chunks(CHUNK).zip(out.par_chunks(CHUNK)))
            .for_each(|(d, (g, y))| {
                for ((d, &g), &y) in d.iter_mut().zip(g).zip(y) {
                    // candle's accumulation adds an exact 0 where the mask is off: the same sum.
                    *d += relu_grad(g, y);
                }
            });
        Ok(())
    }

    fn add(&mut self, dx: &mut Vec<f32>, d: &Vec<f32>) -> Result<()> {
        let _t = timer(Section::AddReluBackward);
        dx.par_chunks_mut(CHUNK)
            .zip(d.par_chunks(CHUNK))
            .for_each(|(d, g)| {
                for (d, &g) in d.iter_mut().zip(g) {
                    *d += g;
                }
            });
        Ok(())
    }

    fn subsample(
        &mut self,
        x: &Vec<f32>,
        [_, c, h, w]: [usize; 4],
        pad: usize,
        stride: usize,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        let (ho, wo) = (h.div_ceil(stride), w.div_ceil(stride));
        let co = c + pad;
        y.par_chunks_mut(co * ho * wo)
            .enumerate()
            .for_each(|(i, yi)| {
                yi.fill(0.0);
                for ch in 0..c {
                    let plane = &x[(i * c + ch) * h * w..(i * c + ch + 1) * h * w];
                    let dst = &mut yi[(pad / 2 + ch) * ho * wo..(pad / 2 + ch + 1) * ho * wo];
                    for (oy, row) in dst.chunks_exact_mut(wo).enumerate() {
                        let src = &plane[oy * stride * w..];
                        for (ox, o) in row.iter_mut().enumerate() {
                            *o = src[ox * stride];
                        }
                    }
                }
            });
        Ok(())
    }

    fn max_pool(
        &mut self,
        x: &Vec<f32>,
        dims: [usize; 4],
        g: PoolGeometry,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        fit(y, g.out_dims(dims)?.iter().product());
        max_pool_into(x, dims, g, y);
        Ok(())
    }

    fn max_pool_backward(
        &mut self,
        x: &Vec<f32>,
        dims: [usize; 4],
        g: PoolGeometry,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        fit(dx, x.len());
        max_pool_backward_into(x, dims, g, dy, dx);
        Ok(())
    }

    fn subsample_backward(
        &mut self,
        dx: &mut Vec<f32>,
        [n, c, h, w]: [usize; 4],
        dy: &Vec<f32>,
        out: &Vec<f32>,
        pad: usize,
        stride: usize,
    ) -> Result<()> {
        let _t = timer(Section::AddReluBackward);
        let (ho, wo) = (h.div_ceil(stride), w.div_ceil(stride));
        let co = c + pad;
        debug_assert_eq!(dx.len(), n * c * h * w);
        dx.par_chunks_mut(c * h * w)
            .enumerate()
            .for_each(|(i, dxi)| {
                for ch in 0..c {
                    let at = (i * co + pad / 2 + ch) * ho * wo;
                    let (g, y) = (&dy[at..at + ho * wo], &out[at..at + ho * wo]);
                    let plane = &mut dxi[ch * h * w..(ch + 1) * h * w];
                    for oy in 0..ho {
                        for ox in 0..wo {
                            let j = oy * wo + ox;
                            plane[oy * stride * w + ox * stride] += relu_grad(g[j], y[j]);
                        }
                    }
                }
            });
        Ok(())
    }
}
