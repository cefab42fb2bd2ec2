//! `relu(a + b)`: the end of every residual block, fused into one op on CPU.
//!
//! As candle ops this is an addition and a ReLU: two passes forward, and backward a zero
//! tensor, a comparison, a dtype conversion, a product and the gradient accumulation for the
//! ReLU alone. Fused, the forward is one pass and the backward one pass that masks the incoming
//! gradient with the sign of the op's own output and hands the same tensor to both inputs. On
//! CUDA the same two passes are kernels of `gpu`.

use super::cpu::{f32_slice, relu_grad, with_f32, written_vec};
use crate::profile::{timer, Section};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per parallel task: large enough to amortise scheduling, small enough to split a
/// CIFAR activation across cores.
const CHUNK: usize = 1 << 15;

/// Writes `out = max(a + b, 0)` elementwise (every element).
pub(crate) fn add_relu_into(a: &[f32], b: &[f32], out: &mut [f32]) {
    let _t = timer(Section::AddReluForward);
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            for ((o, &p), &q) in o.iter_mut().zip(a).zip(b) {
                *o = (p + q).max(0.0);
            }
        });
}

struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (
            f32_slice(s1, l1, "add-relu")?,
            f32_slice(s2, l2, "add-relu")?,
        );
        let y = written_vec(a.len(), |y| add_relu_into(a, b, y));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            crate::gpu::add_relu_forward(s1, l1, s2, l2)?,
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _t = timer(Section::AddReluBackward);
        #[cfg(feature = "cuda")]
        if res.device().is_cuda() {
            let masked = crate::gpu::relu_backward(res, grad)?;
            return Ok((Some(masked.clone()), Some(masked)));
        }
        let out = with_f32(res, "add-relu", |y| {
            with_f32(grad, "add-relu", |dy| {
                written_vec(y.len(), |out| {
                    out.par_chunks_mut(CHUNK)
                        .zip(y.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
                        .for_each(|(o, (y, dy))| {
                            for ((o, &y), &d) in o.iter_mut().zip(y).zip(dy) {
                                // PyTorch's convention: no gradient where the output is exactly 0.
                                *o = relu_grad(d, y);
                            }
                        });
                })
            })
        })??;
        let masked = Tensor::from_vec(out, res.shape(), res.device())?;
        Ok((Some(masked.clone()), Some(masked)))
    }
}

/// `relu(a + b)` for tensors of one shape; one fused op on CPU (f32) and CUDA (f32, bf16),
/// candle ops elsewhere.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let fused = match a.device() {
        candle_core::Device::Cpu => a.dtype() == candle_core::DType::F32,
        candle_core::Device::Cuda(_) => cfg!(feature = "cuda") && a.dtype() == b.dtype(),
        _ => false,
    };
    if !fused || super::cpu::reference_ops() {
        return super::cpu::relu(&(a + b)?);
    }
    if a.shape() != b.shape() {
        candle_core::bail!("add-relu: shapes {:?} and {:?} differ", a.dims(), b.dims())
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::testing::{max_rel, random};
    use candle_core::Var;

    /// Output and both gradients equal candle's `relu(a + b)`.
    #[test]
    fn matches_candle_ops() {
        let a = Var::from_tensor(&random(&[3, 5, 7, 9], -1.0..1.0, 1)).unwrap();
        let b = Var::from_tensor(&random(&[3, 5, 7, 9], -1.0..1.0, 2)).unwrap();
        let ours = add_relu(a.as_tensor(), b.as_tensor()).unwrap();
        let theirs = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
        assert_eq!(max_rel(&ours, &theirs), 0.0);
        let m = random(ours.dims(), -1.0..1.0, 3);
        let g1 = (&ours * &m).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &m)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&a, &b] {
            let (x, y) = (
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(max_rel(x, y) < 1e-6);
        }
    }
}
