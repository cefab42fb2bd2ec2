//! BatchNorm (+ an optional fused ReLU) on CUDA: the kernels of `kernels.cu` behind a candle op.
//!
//! Training: a statistics pass (per-channel partial sums over a (channel, part) grid, then a
//! per-channel finalise that also updates the running statistics in place), a normalisation
//! pass, and backward two passes (partial sums of g and g·(x − μ), then dx). Statistics,
//! parameters and running statistics are f32 whatever the activations' type (f32 or bf16), so
//! bf16 training works where candle's BatchNorm fails on mixed types. No value is read back to
//! the host.

use super::{
    alloc, alloc_tensor, elementwise, kernel, launch, per_channel, storage_ptr, tensor_ptr, Arg,
};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Threads of a reduction block.
const REDUCE_THREADS: u32 = 512;

/// Parts each channel's reduction is split into: enough blocks to fill the GPU (about four
/// per multiprocessor of an H100 in all) while each block still sums a few thousand values.
fn parts(c: usize, m: usize) -> usize {
    let want = 528usize.div_ceil(c.max(1));
    want.min(m / 4096).clamp(1, 256)
}

fn reduce_grid(c: usize, parts: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c as u32, parts as u32, 1),
        block_dim: (REDUCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `y = γ·(x − μ)·invstd + β` (then ReLU when `relu`), with per-channel f32 `mean` and `invstd`
/// computed before the op; its backward differentiates through the batch statistics when
/// `train`.
struct Normalize {
    mean: Tensor,
    invstd: Tensor,
    train: bool,
    relu: bool,
}

impl CustomOp3 for Normalize {
    fn name(&self) -> &'static str {
        "batch-norm-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("batch-norm-cuda runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        gamma: &CudaStorage,
        lg: &Layout,
        beta: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (_, c, h, w) = lx.shape().dims4()?;
        let name = kernel!(x.dtype(), "bn_apply");
        if gamma.dtype() != DType::F32 || beta.dtype() != DType::F32 {
            candle_core::bail!("batch norm on CUDA: weight and bias must be f32")
        }
        let total = lx.shape().elem_count();
        let px = storage_ptr(x, lx, "batch norm input")?;
        let pg = storage_ptr(gamma, lg, "batch norm weight")?;
        let pb = storage_ptr(beta, lb, "batch norm bias")?;
        let (_, pm) = tensor_ptr(&self.mean, "batch norm mean")?;
        let (_, pi) = tensor_ptr(&self.invstd, "batch norm invstd")?;
        let (y, py) = alloc(&x.device, x.dtype(), total)?;
        launch(
            &x.device,
            name,
            elementwise(total),
            &[
                Arg::Ptr(px),
                Arg::Ptr(py),
                Arg::Ptr(pm),
                Arg::Ptr(pi),
                Arg::Ptr(pg),
                Arg::Ptr(pb),
                Arg::I64(total as i64),
                Arg::I32(c as i32),
                Arg::I32((h * w) as i32),
                Arg::I32(self.relu as i32),
            ],
        )?;
        Ok((y, lx.shape().clone()))
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
        let (hw, total) = (h * w, x.elem_count());
        let (partial_name, apply_name) = (
            kernel!(x.dtype(), "bn_bwd_partial"),
            kernel!(x.dtype(), "bn_bwd_apply"),
        );
        let dy = grad.contiguous()?;
        let (dev, px) = tensor_ptr(x, "batch norm input")?;
        let (_, py) = tensor_ptr(res, "batch norm output")?;
        let (_, pd) = tensor_ptr(&dy, "batch norm output gradient")?;
        let (_, pm) = tensor_ptr(&self.mean, "batch norm mean")?;
        let (_, pi) = tensor_ptr(&self.invstd, "batch norm invstd")?;
        let (_, pg) = tensor_ptr(gamma, "batch norm weight")?;
        let parts = parts(c, n * hw);
        let (_partial, pp) = alloc(&dev, DType::F32, c * parts * 2)?;
        launch(
            &dev,
            partial_name,
            reduce_grid(c, parts),
            &[
                Arg::Ptr(px),
                Arg::Ptr(py),
                Arg::Ptr(pd),
                Arg::Ptr(pm),
                Arg::Ptr(pp),
                Arg::I32(n as i32),
                Arg::I32(c as i32),
                Arg::I32(hw as i32),
                Arg::I32(self.relu as i32),
            ],
        )?;
        let (dgamma, pdg) = alloc_tensor(&dev, DType::F32, c)?;
        let (dbeta, pdb) = alloc_tensor(&dev, DType::F32, c)?;
        let (_coef, pc) = alloc(&dev, DType::F32, 3 * c)?;
        launch(
            &dev,
            "bn_bwd_finalize",
            per_channel(c),
            &[
                Arg::Ptr(pp),
                Arg::Ptr(pi),
                Arg::Ptr(pg),
                Arg::Ptr(pdg),
                Arg::Ptr(pdb),
                Arg::Ptr(pc),
                Arg::I32(n as i32),
                Arg::I32(c as i32),
                Arg::I32(hw as i32),
                Arg::I32(parts as i32),
                Arg::I32(self.train as i32),
            ],
        )?;
        let (dx, pdx) = alloc_tensor(&dev, x.dtype(), x.shape())?;
        launch(
            &dev,
            apply_name,
            elementwise(total),
            &[
                Arg::Ptr(px),
                Arg::Ptr(py),
                Arg::Ptr(pd),
                Arg::Ptr(pm),
                Arg::Ptr(pc),
                Arg::Ptr(pdx),
                Arg::I64(total as i64),
                Arg::I32(c as i32),
                Arg::I32(hw as i32),
                Arg::I32(self.relu as i32),
            ],
        )?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// BatchNorm of `x` (`N × C × H × W`, f32 or bf16, on CUDA) with f32 `gamma`, `beta` and running
/// statistics. In training the batch statistics normalise and the running ones are updated in
/// place (PyTorch's rule: `momentum` the weight of the batch, unbiased variance); otherwise the
/// running ones normalise. `relu` fuses a following ReLU.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    momentum: f64,
    train: bool,
    relu: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (n, c, h, w) = x.dims4()?;
    let hw = h * w;
    let (stats_name, finalize_name) = (
        kernel!(x.dtype(), "bn_stats_partial"),
        kernel!(x.dtype(), "bn_stats_finalize"),
    );
    for (t, what) in [
        (gamma, "weight"),
        (beta, "bias"),
        (running_mean, "running mean"),
        (running_var, "running variance"),
    ] {
        if t.dtype() != DType::F32 || t.elem_count() != c || !t.is_contiguous() {
            candle_core::bail!(
                "batch norm on CUDA: the {what} must be a contiguous f32 vector of {c}"
            )
        }
    }
    let (dev, px) = tensor_ptr(&x, "batch norm input")?;
    let (mean, invstd) = if train {
        let parts = parts(c, n * hw);
        let (_partial, pp) = alloc(&dev, DType::F32, c * parts * 2)?;
        launch(
            &dev,
            stats_name,
            reduce_grid(c, parts),
            &[
                Arg::Ptr(px),
                Arg::Ptr(pp),
                Arg::I32(n as i32),
                Arg::I32(c as i32),
                Arg::I32(hw as i32),
            ],
        )?;
        let (mean, pm) = alloc_tensor(&dev, DType::F32, c)?;
        let (invstd, pi) = alloc_tensor(&dev, DType::F32, c)?;
        let (_, prm) = tensor_ptr(running_mean, "running mean")?;
        let (_, prv) = tensor_ptr(running_var, "running variance")?;
        // The running statistics are updated in place, in stream order: the variables keep
        // their storage, so checkpoints and evaluation read the new values.
        launch(
            &dev,
            finalize_name,
            per_channel(c),
            &[
                Arg::Ptr(px),
                Arg::Ptr(pp),
                Arg::Ptr(pm),
                Arg::Ptr(pi),
                Arg::Ptr(prm),
                Arg::Ptr(prv),
                Arg::I32(n as i32),
                Arg::I32(c as i32),
                Arg::I32(hw as i32),
                Arg::I32(parts as i32),
                Arg::F32(eps as f32),
                Arg::F32(momentum as f32),
            ],
        )?;
        (mean, invstd)
    } else {
        let (_, prv) = tensor_ptr(running_var, "running variance")?;
        let (invstd, pi) = alloc_tensor(&dev, DType::F32, c)?;
        launch(
            &dev,
            "bn_invstd",
            per_channel(c),
            &[
                Arg::Ptr(prv),
                Arg::Ptr(pi),
                Arg::I32(c as i32),
                Arg::F32(eps as f32),
            ],
        )?;
        (running_mean.clone(), invstd)
    };
    x.apply_op3(
        gamma,
        beta,
        Normalize {
            mean,
            invstd,
            train,
            relu,
        },
    )
}
