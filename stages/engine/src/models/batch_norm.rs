//! BatchNorm over the channels of NCHW activations, fused on CPU.
//!
//! candle-nn's BatchNorm is a chain of about ten unfused tensor ops (transpose, copy, mean,
//! subtract, square, mean, divide, ...) each reading and writing the whole activation, forward
//! and backward. Here the CPU path makes one pass for the batch statistics, one for the
//! normalisation and two in the backward, as a custom op whose gradient is the closed form
//! `dx = γ/σ · (dy − mean(dy) − x̂·mean(dy·x̂))`. Running statistics follow PyTorch: momentum 0.1,
//! unbiased variance. A following ReLU can be fused into the same op ([`BatchNorm::forward_relu_t`]):
//! candle's own ReLU costs a pass forward and six backward (a zero tensor, a comparison, a
//! conversion, a product and the gradient accumulation), where the fused op masks the incoming
//! gradient with the sign of its own output inside the passes it makes anyway. On a CUDA device
//! the same computation runs as CUDA kernels (`gpu::norm`), for f32 or bf16 activations with f32
//! statistics and parameters; other devices use the equivalent candle ops.

use super::cpu::{f32_slice, relu_grad, with_f32, written_vec};
use super::no_grad::param;
use crate::profile::{timer, Section};
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

/// The kernel's name in errors.
const BN: &str = "batch norm";

/// Independent partial sums: float addition is not associative, so the compiler keeps a
/// single running sum scalar; sixteen of them vectorise.
const LANES: usize = 16;

/// Splits `v` into arrays of `LANES` (fixed size, so the loops over them compile to vector
/// instructions without bounds checks) and the remainder.
fn lanes(v: &[f32]) -> (impl Iterator<Item = &[f32; LANES]>, &[f32]) {
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    (chunks.map(|c| c.try_into().expect("LANES long")), tail)
}

/// `(Σ (v − k), Σ (v − k)²)` over a slice, in `LANES` partial sums.
fn sum_and_squares(v: &[f32], k: f32) -> (f32, f32) {
    let (mut s, mut s2) = ([0f32; LANES], [0f32; LANES]);
    let (chunks, tail) = lanes(v);
    for c in chunks {
        for l in 0..LANES {
            let d = c[l] - k;
            s[l] += d;
            s2[l] += d * d;
        }
    }
    let (mut a, mut b) = (s.iter().sum::<f32>(), s2.iter().sum::<f32>());
    for &t in tail {
        a += t - k;
        b += (t - k) * (t - k);
    }
    (a, b)
}

/// `(Σ g, Σ g·(x − μ))` over one plane, where g is `dy`, masked to 0 where `y ≤ 0` when the
/// output `y` of a fused ReLU is given.
fn grad_sums(dy: &[f32], x: &[f32], y: Option<&[f32]>, mu: f32) -> (f32, f32) {
    let (mut s, mut s2) = ([0f32; LANES], [0f32; LANES]);
    let n = dy.len() / LANES * LANES;
    let (mut a, mut b) = (0f32, 0f32);
    let (dc, _) = lanes(&dy[..n]);
    let (xc, _) = lanes(&x[..n]);
    match y {
        Some(y) => {
            let (yc, _) = lanes(&y[..n]);
            for ((d, x), y) in dc.zip(xc).zip(yc) {
                for l in 0..LANES {
                    let g = relu_grad(d[l], y[l]);
                    s[l] += g;
                    s2[l] += g * (x[l] - mu);
                }
            }
            for j in n..dy.len() {
                let g = relu_grad(dy[j], y[j]);
                a += g;
                b += g * (x[j] - mu);
            }
        }
        None => {
            for (d, x) in dc.zip(xc) {
                for l in 0..LANES {
                    s[l] += d[l];
                    s2[l] += d[l] * (x[l] - mu);
                }
            }
            for j in n..dy.len() {
                a += dy[j];
                b += dy[j] * (x[j] - mu);
            }
        }
    }
    (a + s.iter().sum::<f32>(), b + s2.iter().sum::<f32>())
}

/// Per-channel mean and biased variance of an `N × C × H × W` slice (f64 accumulation across
/// planes). One pass, shifted by the channel's first value: `E[x²] − E[x]²` in f32 loses the
/// variance to cancellation when the mean is large next to the spread (a convolution's output
/// without bias, a deep layer at small batches), while the moments of `x − k` for any k near
/// the mean do not.
fn channel_stats(x: &[f32], n: usize, c: usize, hw: usize) -> (Vec<f32>, Vec<f32>) {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let k = x[ch * hw];
            let (mut s, mut s2) = (0f64, 0f64);
            for i in 0..n {
                let plane = &x[(i * c + ch) * hw..(i * c + ch + 1) * hw];
                let (ps, ps2) = sum_and_squares(plane, k);
                s += ps as f64;
                s2 += ps2 as f64;
            }
            let m = (n * hw) as f64;
            let shifted_mean = s / m;
            (
                (k as f64 + shifted_mean) as f32,
                (s2 / m - shifted_mean * shifted_mean).max(0.0) as f32,
            )
        })
        .unzip()
}

/// Writes `y = γ·(x − μ)·inv_std + β` (then `max(y, 0)` when `relu`) for NCHW `x` with `c`
/// channels of `hw` values, every element of `y`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn normalize_into(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    inv_std: &[f32],
    relu: bool,
    c: usize,
    hw: usize,
    y: &mut [f32],
) {
    y.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .for_each(|(p, (out, inp))| {
            let ch = p % c;
            let scale = gamma[ch] * inv_std[ch];
            let shift = beta[ch] - mean[ch] * scale;
            if relu {
                for (o, &v) in out.iter_mut().zip(inp) {
                    *o = (v * scale + shift).max(0.0);
                }
            } else {
                for (o, &v) in out.iter_mut().zip(inp) {
                    *o = v * scale + shift;
                }
            }
        });
}

/// The BatchNorm backward over NCHW `x` (`[n, c, hw]`): writes every element of `dx` and
/// returns `(dγ, dβ)`. The incoming gradient `dy` is masked to 0 where `mask ≤ 0` when a mask
/// is given (the output of a fused ReLU, or of the ReLU the layer feeds); `train` differentiates
/// through the batch statistics μ and inv_std.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_into(
    x: &[f32],
    dy: &[f32],
    mask: Option<&[f32]>,
    gamma: &[f32],
    mean: &[f32],
    inv_std: &[f32],
    train: bool,
    [n, c, hw]: [usize; 3],
    dx: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let _t = timer(Section::BatchNormBackward);
    let m = (n * hw) as f32;
    // Per channel: Σ dy and Σ dy·x̂.
    let (sum_dy, sum_dy_xhat): (Vec<f32>, Vec<f32>) = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mu, is) = (mean[ch], inv_std[ch]);
            let (mut a, mut b) = (0f64, 0f64);
            for i in 0..n {
                let r = (i * c + ch) * hw..(i * c + ch + 1) * hw;
                let y = mask.map(|y| &y[r.clone()]);
                let (pa, pb) = grad_sums(&dy[r.clone()], &x[r], y, mu);
                a += pa as f64;
                b += pb as f64 * is as f64;
            }
            (a as f32, b as f32)
        })
        .unzip();
    dx.par_chunks_mut(hw).enumerate().for_each(|(p, out)| {
        let ch = p % c;
        let r = p * hw..(p + 1) * hw;
        let (dy, x) = (&dy[r.clone()], &x[r.clone()]);
        let (mu, is, g) = (mean[ch], inv_std[ch], gamma[ch]);
        let k = g * is;
        // dx = k·(g − mean(g) − x̂·mean(g·x̂)) in training (k·g in eval), written as
        // k·g − (k·mean(g) + (x − μ)·k·is·mean(g·x̂)).
        let (mdy, mdyx) = if train {
            (sum_dy[ch] / m, sum_dy_xhat[ch] / m)
        } else {
            (0.0, 0.0)
        };
        let (c0, c1) = (k * mdy, k * is * mdyx);
        match mask {
            Some(y) => {
                for (((o, &d), &v), &y) in out.iter_mut().zip(dy).zip(x).zip(&y[r]) {
                    let d = relu_grad(d, y);
                    *o = k * d - c0 - (v - mu) * c1;
                }
            }
            None => {
                for ((o, &d), &v) in out.iter_mut().zip(dy).zip(x) {
                    *o = k * d - c0 - (v - mu) * c1;
                }
            }
        }
    });
    (sum_dy_xhat, sum_dy)
}

/// `y = γ·(x − μ)·inv_std + β` with fixed per-channel μ and inv_std, then `max(y, 0)` when
/// `relu`; in training mode the backward also differentiates through the batch statistics.
struct Normalize {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    train: bool,
    relu: bool,
}

impl CustomOp3 for Normalize {
    fn name(&self) -> &'static str {
        "batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gamma, beta) = (
            f32_slice(s1, l1, BN)?,
            f32_slice(s2, l2, BN)?,
            f32_slice(s3, l3, BN)?,
        );
        let (_, c, h, w) = l1.shape().dims4()?;
        let y = written_vec(x.len(), |y| {
            normalize_into(
                x,
                gamma,
                beta,
                &self.mean,
                &self.inv_std,
                self.relu,
                c,
                h * w,
                y,
            )
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, w) = x.dims4()?;
        let hw = h * w;
        let gamma = gamma.to_vec1::<f32>()?;
        // With the fused ReLU, the gradient reaching the normalisation is dy where the output
        // is positive and 0 elsewhere (PyTorch's convention at exactly 0).
        let res = if self.relu {
            Some(res.contiguous()?)
        } else {
            None
        };
        let (dx, dgamma, dbeta) = with_f32(x, BN, |x| {
            with_f32(grad, BN, |dy| {
                let body = |y: Option<&[f32]>| {
                    let mut sums = (Vec::new(), Vec::new());
                    let dx = written_vec(x.len(), |dx| {
                        sums = backward_into(
                            x,
                            dy,
                            y,
                            &gamma,
                            &self.mean,
                            &self.inv_std,
                            self.train,
                            [n, c, hw],
                            dx,
                        );
                    });
                    (dx, sums.0, sums.1)
                };
                match &res {
                    Some(r) => with_f32(r, BN, |y| body(Some(y))),
                    None => Ok(body(None)),
                }
            })
        })???;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (n, c, h, w), dev)?),
            Some(Tensor::from_vec(dgamma, c, dev)?),
            Some(Tensor::from_vec(dbeta, c, dev)?),
        ))
    }
}

/// A BatchNorm layer with PyTorch's parameter names and defaults (eps 1e-5, momentum 0.1).
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm {
    /// A layer over `c` channels; variables `weight`, `bias`, `running_mean`, `running_var`.
    pub fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(BatchNorm {
            weight: vb.get_with_hints(c, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(c, "bias", Init::Const(0.0))?,
            running_mean: Var::from_tensor(&vb.get_with_hints(
                c,
                "running_mean",
                Init::Const(0.0),
            )?)?,
            running_var: Var::from_tensor(&vb.get_with_hints(
                c,
                "running_var",
                Init::Const(1.0),
            )?)?,
            eps: 1e-5,
            momentum: 0.1,
        })
    }

    /// Normalises with batch statistics (and updates the running ones) when `train`, else with
    /// the running statistics.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_fused(x, train, false)
    }

    /// `relu(self.forward_t(x, train))`, fused into one op on CPU.
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_fused(x, train, true)
    }

    fn forward_fused(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let (weight, bias) = (param(&self.weight), param(&self.bias));
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return crate::gpu::norm::batch_norm(
                x,
                &weight,
                &bias,
                self.running_mean.as_tensor(),
                self.running_var.as_tensor(),
                self.eps,
                self.momentum,
                train,
                relu,
            );
        }
        if !matches!(x.device(), Device::Cpu) || super::cpu::reference_ops() {
            let y = self.forward_generic(x, train)?;
            return if relu { super::cpu::relu(&y) } else { Ok(y) };
        }
        let _t = timer(Section::BatchNormForward);
        let x = x.contiguous()?;
        let (mean, inv_std) = if train {
            with_f32(&x, BN, |d| self.batch_statistics(d, [n, c, h * w]))??
        } else {
            self.running_statistics()?
        };
        x.apply_op3(
            &weight,
            &bias,
            Normalize {
                mean,
                inv_std,
                train,
                relu,
            },
        )
    }

    /// The running mean and variance, and eps and momentum (for the planned CUDA step, which
    /// updates the running statistics on the device).
    #[cfg(feature = "cuda")]
    pub(crate) fn running(&self) -> (&Tensor, &Tensor, f64, f64) {
        (
            self.running_mean.as_tensor(),
            self.running_var.as_tensor(),
            self.eps,
            self.momentum,
        )
    }

    /// γ and β.
    pub(crate) fn affine(&self) -> (&Tensor, &Tensor) {
        (&self.weight, &self.bias)
    }

    /// The batch's per-channel mean and `1/√(var + eps)` of NCHW `x` (`[n, c, hw]`), after
    /// updating the running statistics with them (momentum, unbiased variance) as PyTorch does.
    pub(crate) fn batch_statistics(
        &self,
        x: &[f32],
        [n, c, hw]: [usize; 3],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mean, var) = channel_stats(x, n, c, hw);
        let m = (n * hw) as f64;
        let unbias = if m > 1.0 { m / (m - 1.0) } else { 1.0 };
        let mo = self.momentum;
        let rm = self.running_mean.as_tensor().to_vec1::<f32>()?;
        let rv = self.running_var.as_tensor().to_vec1::<f32>()?;
        let rm: Vec<f32> = rm
            .iter()
            .zip(&mean)
            .map(|(r, b)| ((1.0 - mo) * *r as f64 + mo * *b as f64) as f32)
            .collect();
        let rv: Vec<f32> = rv
            .iter()
            .zip(&var)
            .map(|(r, b)| ((1.0 - mo) * *r as f64 + mo * unbias * *b as f64) as f32)
            .collect();
        let dev = self.running_mean.device();
        self.running_mean.set(&Tensor::from_vec(rm, c, dev)?)?;
        self.running_var.set(&Tensor::from_vec(rv, c, dev)?)?;
        Ok((mean, self.inv_std(&var)))
    }

    /// The running mean and `1/√(running var + eps)` (evaluation mode).
    pub(crate) fn running_statistics(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let mean = self.running_mean.as_tensor().to_vec1::<f32>()?;
        let var = self.running_var.as_tensor().to_vec1::<f32>()?;
        Ok((mean, self.inv_std(&var)))
    }

    fn inv_std(&self, var: &[f32]) -> Vec<f32> {
        var.iter()
            .map(|v| (1.0 / (*v as f64 + self.eps).sqrt()) as f32)
            .collect()
    }

    fn forward_generic(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = x.dim(1)?;
        let shape = (1, c, 1, 1);
        let (mean, var) = if train {
            let xt = x.transpose(0, 1)?.flatten_from(1)?;
            let mean = xt.mean_keepdim(1)?;
            let var = xt.broadcast_sub(&mean)?.sqr()?.mean_keepdim(1)?;
            let m = (xt.dim(1)?) as f64;
            let (mf, vf) = (mean.flatten_all()?, var.flatten_all()?);
            let rm = ((self.running_mean.as_tensor() * (1.0 - self.momentum))?
                + (mf.detach() * self.momentum)?)?;
            let rv = ((self.running_var.as_tensor() * (1.0 - self.momentum))?
                + (vf.detach() * (self.momentum * m / (m - 1.0).max(1.0)))?)?;
            self.running_mean.set(&rm)?;
            self.running_var.set(&rv)?;
            (mf.reshape(shape)?, vf.reshape(shape)?)
        } else {
            (
                param(self.running_mean.as_tensor()).reshape(shape)?,
                param(self.running_var.as_tensor()).reshape(shape)?,
            )
        };
        let xhat = x
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xhat.broadcast_mul(&param(&self.weight).reshape(shape)?)?
            .broadcast_add(&param(&self.bias).reshape(shape)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::testing::{max_rel, random};
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// The fused CPU path equals the generic candle-op path (followed by candle's ReLU when
    /// fused with one): output, running statistics and the gradients of input, γ and β, in
    /// training and in eval mode.
    #[test]
    fn fused_equals_reference() {
        for (train, relu) in [(true, false), (false, false), (true, true), (false, true)] {
            let build = || {
                let vm = VarMap::new();
                let bn = BatchNorm::new(3, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
                    .unwrap();
                (vm, bn)
            };
            let (vm1, bn1) = build();
            let (vm2, bn2) = build();
            for (vm, seed) in [(&vm1, 7), (&vm2, 7)] {
                let data = vm.data().lock().unwrap();
                data["weight"].set(&random(&[3], -2.0..3.0, seed)).unwrap();
                data["bias"]
                    .set(&random(&[3], -2.0..3.0, seed + 1))
                    .unwrap();
                data["running_var"]
                    .set(&(random(&[3], -2.0..3.0, seed + 2).abs().unwrap() + 0.5).unwrap())
                    .unwrap();
            }
            let x = Var::from_tensor(&random(&[5, 3, 7, 3], -2.0..3.0, 1)).unwrap();
            let (y1, y2) = if relu {
                (
                    bn1.forward_relu_t(x.as_tensor(), train).unwrap(),
                    bn2.forward_generic(x.as_tensor(), train)
                        .unwrap()
                        .relu()
                        .unwrap(),
                )
            } else {
                (
                    bn1.forward_t(x.as_tensor(), train).unwrap(),
                    bn2.forward_generic(x.as_tensor(), train).unwrap(),
                )
            };
            assert!(
                max_rel(&y1, &y2) < 1e-5,
                "forward, train={train}, relu={relu}"
            );
            assert!(max_rel(bn1.running_var.as_tensor(), bn2.running_var.as_tensor()) < 1e-5);
            assert!(max_rel(bn1.running_mean.as_tensor(), bn2.running_mean.as_tensor()) < 1e-5);
            let m = random(y1.dims(), -2.0..3.0, 9);
            let g1 = (&y1 * &m).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&y2 * &m).unwrap().sum_all().unwrap().backward().unwrap();
            for (t1, t2) in [
                (x.as_tensor(), x.as_tensor()),
                (&bn1.weight, &bn2.weight),
                (&bn1.bias, &bn2.bias),
            ] {
                let (a, b) = (g1.get(t1).unwrap(), g2.get(t2).unwrap());
                assert!(
                    max_rel(a, b) < 1e-5,
                    "gradient, train={train}, relu={relu}: {}",
                    max_rel(a, b)
                );
            }
        }
    }
}
