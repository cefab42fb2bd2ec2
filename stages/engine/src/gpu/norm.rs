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
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

/// Threads of a reduction block.
const REDUCE_THREADS: u32 = 512;
// The kernels' block sums take whole warps, and `column_sum2` (NHWC) at most 512 threads.
const _: () = assert!(REDUCE_THREADS.is_multiple_of(32) && REDUCE_THREADS <= 512);

/// Parts each channel's reduction is split into: enough blocks to fill the GPU (about four
/// per multiprocessor of an H100 in all) while each block still sums a few thousand values.
/// A block of an NCHW reduction sums one channel, one of an NHWC reduction
/// [`nhwc_channels`] of them.
pub(crate) fn parts(c: usize, m: usize, nhwc: bool) -> usize {
    let c = c.max(1);
    if nhwc {
        let width = nhwc_channels(c);
        let per_part = REDUCE_THREADS as usize * 8 / width;
        528usize
            .div_ceil(c.div_ceil(width))
            .min(m / per_part)
            .clamp(1, 512)
    } else {
        528usize.div_ceil(c).min(m / 4096).clamp(1, 256)
    }
}

/// Adjacent channels one block of an NHWC reduction takes (its threads' x dimension): a warp's
/// loads stay contiguous, and few threads idle on narrow layers.
fn nhwc_channels(c: usize) -> usize {
    c.next_power_of_two().clamp(8, 32)
}

fn reduce_grid(c: usize, parts: usize, nhwc: bool) -> LaunchConfig {
    if nhwc {
        let width = nhwc_channels(c);
        return LaunchConfig {
            grid_dim: (c.div_ceil(width) as u32, parts as u32, 1),
            block_dim: (width as u32, REDUCE_THREADS / width as u32, 1),
            shared_mem_bytes: 0,
        };
    }
    LaunchConfig {
        grid_dim: (c as u32, parts as u32, 1),
        block_dim: (REDUCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Device addresses of one BatchNorm's operands (f32 unless said otherwise), for the
/// pointer-level launches shared by the candle op here and the planned step (`gpu::plan`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Operands {
    /// The input `N × C × H × W` (activation type).
    pub x: u64,
    /// Per-channel batch mean and `1/√(var + eps)`.
    pub mean: u64,
    pub invstd: u64,
    /// γ.
    pub gamma: u64,
    /// Partial sums, `c × parts × 2` (see [`parts`]).
    pub partial: u64,
    /// `[n, c, h·w]`.
    pub dims: [usize; 3],
    /// Whether activations are NHWC (channels-last) rather than NCHW.
    pub nhwc: bool,
}

/// The batch statistics of `o.x` into `o.mean` and `o.invstd`, and the running statistics at
/// `running_mean` and `running_var` updated in place.
pub(crate) fn statistics(
    dev: &CudaDevice,
    dtype: DType,
    o: &Operands,
    running_mean: u64,
    running_var: u64,
    eps: f64,
    momentum: f64,
) -> Result<()> {
    let [n, c, hw] = o.dims;
    let parts = parts(c, n * hw, o.nhwc);
    let partial = if o.nhwc {
        kernel!(dtype, "bn_stats_partial_nhwc")
    } else {
        kernel!(dtype, "bn_stats_partial")
    };
    launch(
        dev,
        partial,
        reduce_grid(c, parts, o.nhwc),
        &[
            Arg::Ptr(o.x),
            Arg::Ptr(o.partial),
            Arg::I32(n as i32),
            Arg::I32(c as i32),
            Arg::I32(hw as i32),
        ],
    )?;
    launch(
        dev,
        kernel!(dtype, "bn_stats_finalize"),
        per_channel(c),
        &[
            Arg::Ptr(o.x),
            Arg::Ptr(o.partial),
            Arg::Ptr(o.mean),
            Arg::Ptr(o.invstd),
            Arg::Ptr(running_mean),
            Arg::Ptr(running_var),
            Arg::I32(n as i32),
            Arg::I32(c as i32),
            Arg::I32(hw as i32),
            Arg::I32(parts as i32),
            Arg::F64(eps),
            Arg::F32(momentum as f32),
            Arg::I32(o.nhwc as i32),
        ],
    )
}

/// `invstd[c] = 1/√(running_var[c] + eps)` for the `c` channels at the two addresses.
pub(crate) fn running_invstd(
    dev: &CudaDevice,
    running_var: u64,
    invstd: u64,
    c: usize,
    eps: f64,
) -> Result<()> {
    launch(
        dev,
        "bn_invstd",
        per_channel(c),
        &[
            Arg::Ptr(running_var),
            Arg::Ptr(invstd),
            Arg::I32(c as i32),
            Arg::F64(eps),
        ],
    )
}

/// `y = γ·(x − μ)·invstd + β` (then ReLU when `relu`) with β at `beta`.
pub(crate) fn apply(
    dev: &CudaDevice,
    dtype: DType,
    o: &Operands,
    beta: u64,
    relu: bool,
    y: u64,
) -> Result<()> {
    let [n, c, hw] = o.dims;
    let total = n * c * hw;
    launch(
        dev,
        kernel!(dtype, "bn_apply"),
        elementwise(total),
        &[
            Arg::Ptr(o.x),
            Arg::Ptr(y),
            Arg::Ptr(o.mean),
            Arg::Ptr(o.invstd),
            Arg::Ptr(o.gamma),
            Arg::Ptr(beta),
            Arg::I64(total as i64),
            Arg::I32(c as i32),
            Arg::I32(hw as i32),
            Arg::I32(relu as i32),
            Arg::I32(o.nhwc as i32),
        ],
    )
}

/// Where the backward writes: the input gradient (activation type), dγ and dβ, and the
/// `3 × c` coefficients it computes on the way.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gradients {
    pub dx: u64,
    pub dgamma: u64,
    pub dbeta: u64,
    pub coef: u64,
}

/// The backward from `dy`, zeroed where `mask` (when non-zero: an activation-type buffer) is
/// not positive; through the batch statistics when `train`.
pub(crate) fn backward(
    dev: &CudaDevice,
    dtype: DType,
    o: &Operands,
    dy: u64,
    mask: u64,
    train: bool,
    g: &Gradients,
) -> Result<()> {
    let [n, c, hw] = o.dims;
    let (total, parts) = (n * c * hw, parts(c, n * hw, o.nhwc));
    let relu = (mask != 0) as i32;
    let partial = if o.nhwc {
        kernel!(dtype, "bn_bwd_partial_nhwc")
    } else {
        kernel!(dtype, "bn_bwd_partial")
    };
    launch(
        dev,
        partial,
        reduce_grid(c, parts, o.nhwc),
        &[
            Arg::Ptr(o.x),
            Arg::Ptr(mask),
            Arg::Ptr(dy),
            Arg::Ptr(o.mean),
            Arg::Ptr(o.partial),
            Arg::I32(n as i32),
            Arg::I32(c as i32),
            Arg::I32(hw as i32),
            Arg::I32(relu),
        ],
    )?;
    launch(
        dev,
        "bn_bwd_finalize",
        per_channel(c),
        &[
            Arg::Ptr(o.partial),
            Arg::Ptr(o.invstd),
            Arg::Ptr(o.gamma),
            Arg::Ptr(g.dgamma),
            Arg::Ptr(g.dbeta),
            Arg::Ptr(g.coef),
            Arg::I32(n as i32),
            Arg::I32(c as i32),
            Arg::I32(hw as i32),
            Arg::I32(parts as i32),
            Arg::I32(train as i32),
        ],
    )?;
    launch(
        dev,
        kernel!(dtype, "bn_bwd_apply"),
        elementwise(total),
        &[
            Arg::Ptr(o.x),
            Arg::Ptr(mask),
            Arg::Ptr(dy),
            Arg::Ptr(o.mean),
            Arg::Ptr(g.coef),
            Arg::Ptr(g.dx),
            Arg::I64(total as i64),
            Arg::I32(c as i32),
            Arg::I32(hw as i32),
            Arg::I32(relu),
            Arg::I32(o.nhwc as i32),
        ],
    )
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
        let (n, c, h, w) = lx.shape().dims4()?;
        if gamma.dtype() != DType::F32 || beta.dtype() != DType::F32 {
            candle_core::bail!("batch norm on CUDA: weight and bias must be f32")
        }
        let o = Operands {
            x: storage_ptr(x, lx, "batch norm input")?,
            mean: tensor_ptr(&self.mean, "batch norm mean")?.1,
            invstd: tensor_ptr(&self.invstd, "batch norm invstd")?.1,
            gamma: storage_ptr(gamma, lg, "batch norm weight")?,
            partial: 0,
            dims: [n, c, h * w],
            nhwc: false,
        };
        let pb = storage_ptr(beta, lb, "batch norm bias")?;
        let (y, py) = alloc(&x.device, x.dtype(), lx.shape().elem_count())?;
        apply(&x.device, x.dtype(), &o, pb, self.relu, py)?;
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
        let dy = grad.contiguous()?;
        let (dev, px) = tensor_ptr(x, "batch norm input")?;
        let (_partial, pp) = alloc(&dev, DType::F32, c * parts(c, n * h * w, false) * 2)?;
        let o = Operands {
            x: px,
            mean: tensor_ptr(&self.mean, "batch norm mean")?.1,
            invstd: tensor_ptr(&self.invstd, "batch norm invstd")?.1,
            gamma: tensor_ptr(gamma, "batch norm weight")?.1,
            partial: pp,
            dims: [n, c, h * w],
            nhwc: false,
        };
        let py = tensor_ptr(res, "batch norm output")?.1;
        let pd = tensor_ptr(&dy, "batch norm output gradient")?.1;
        let (dgamma, pdg) = alloc_tensor(&dev, DType::F32, c)?;
        let (dbeta, pdb) = alloc_tensor(&dev, DType::F32, c)?;
        let (_coef, pc) = alloc(&dev, DType::F32, 3 * c)?;
        let (dx, pdx) = alloc_tensor(&dev, x.dtype(), x.shape())?;
        let g = Gradients {
            dx: pdx,
            dgamma: pdg,
            dbeta: pdb,
            coef: pc,
        };
        // The op's own output masks the gradient when it fused a ReLU.
        let mask = if self.relu { py } else { 0 };
        backward(&dev, x.dtype(), &o, pd, mask, self.train, &g)?;
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
        let (_partial, pp) = alloc(&dev, DType::F32, c * parts(c, n * hw, false) * 2)?;
        let (mean, pm) = alloc_tensor(&dev, DType::F32, c)?;
        let (invstd, pi) = alloc_tensor(&dev, DType::F32, c)?;
        let o = Operands {
            x: px,
            mean: pm,
            invstd: pi,
            gamma: 0,
            partial: pp,
            dims: [n, c, hw],
            nhwc: false,
        };
        // The running statistics are updated in place, in stream order: the variables keep
        // their storage, so checkpoints and evaluation read the new values.
        let (_, prm) = tensor_ptr(running_mean, "running mean")?;
        let (_, prv) = tensor_ptr(running_var, "running variance")?;
        statistics(&dev, x.dtype(), &o, prm, prv, eps, momentum)?;
        (mean, invstd)
    } else {
        let (_, prv) = tensor_ptr(running_var, "running variance")?;
        let (invstd, pi) = alloc_tensor(&dev, DType::F32, c)?;
        running_invstd(&dev, prv, pi, c, eps)?;
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
