//! CUDA's [`Kernels`] for the planned training step (`models::plan`): device buffers of the
//! activation type (f32 or bf16) that live across steps, cuDNN convolutions and the fused
//! BatchNorm kernels called on raw addresses, and the residual and max-pooling passes of
//! `kernels.cu`.
//!
//! What candle's autograd does per op on the GPU (allocate the output, record the graph,
//! accumulate each gradient through a zero tensor, cast the f32 weight to bf16 as a graph op)
//! is replaced by launches on fixed buffers: after the first step of a shape nothing is
//! allocated. Parameter gradients are f32 tensors owned here, one per parameter, written (or
//! added to, for a second forward pass of the same step) by the backward and handed to the
//! `GradStore`; the next step's backward overwrites them, so a caller must not keep a step's
//! gradients past the next one.
//!
//! With the channels-last option (`PlanOptions::channels_last`, `LDL_GPU_NHWC=1`) the buffers
//! hold NHWC activations and the convolutions take KRSC filters, cuDNN's layout for bf16 tensor
//! cores; the images and the output's gradient are transposed on the way in, the output on the
//! way out, and each weight gradient on its way into the parameter's (KCRS) one. Where the
//! convolutions need weights of another type (bf16) or layout (KRSC), every forward pass first
//! writes all the copies with one launch per 64 convolutions (`begin_forward`).
//!
//! Nothing here reads a value back to the host: the step runs in stream order on candle's
//! stream. With `LDL_GPU_GRAPH=1` (and the plan, `LDL_GPU_PLAN=1`) each tape's forward and
//! backward pass, once warm, is recorded as a CUDA graph by stream capture and replayed as one
//! launch (`models::plan` decides when). What makes that sound here: buffers only grow, and
//! every allocation bumps a process-wide count that retires the graphs recorded before it (a
//! cuDNN workspace grown too, `conv::workspace_allocations`); parameters, gradients and their
//! device addresses are fixed (SGD and BatchNorm's running statistics update in place), and
//! those addresses are looked up once, so no slice is asked for its address (which records
//! events) while a stream is being captured; a parameter gradient that comes from outside the
//! plan (a candle tensor at a new address every step) makes that pass unrecordable. The
//! `GradStore` entries a recorded backward made are made again after each replay. A device call
//! that fails while a pass is being recorded (`super::device_call`) does not end the pass: it
//! finishes its host-side bookkeeping, the recording is dropped, and the pass runs unrecorded.

use super::conv::{run, Direction};
use super::norm::{self, Gradients, Operands};
use super::WeightCopy;
use super::{
    alloc, alloc_tensor, cast_weights, elementwise, kernel, launch, pool_args, tensor_ptr, Arg,
};
use crate::models::batch_norm::BatchNorm;
use crate::models::conv::Conv2d;
use crate::models::plan::{Kernels, PlanOptions, Program};
use crate::models::pool::PoolGeometry;
use candle_core::backprop::GradStore;
use candle_core::cuda_backend::cudarc::driver::result::memcpy_dtod_async;
use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph, CudaStream};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Result, Storage, Tensor, TensorId, Var};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Recorded passes replayed by this process.
static REPLAYS: AtomicU64 = AtomicU64::new(0);

/// How many recorded passes this process has replayed.
pub fn replays() -> u64 {
    REPLAYS.load(Ordering::Relaxed)
}

/// Passes whose recording failed (they run unrecorded since).
static UNRECORDED: AtomicU64 = AtomicU64::new(0);

/// How many passes this process could not record as graphs because a device call failed or the
/// graph could not be made (each then runs unrecorded).
pub fn unrecorded_passes() -> u64 {
    UNRECORDED.load(Ordering::Relaxed)
}

/// Ends the keeping of failed device calls however the recorded pass ends, a panic included:
/// a flag left set would make this thread swallow later, real errors.
struct Recording;

impl Recording {
    fn begin() -> Recording {
        super::begin_recording();
        Recording
    }

    /// The first device call that failed while recording.
    fn end(self) -> Option<candle_core::Error> {
        super::end_recording()
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        // After `end`, a no-op.
        super::end_recording();
    }
}

/// A recorded pass: the graph, and the gradients it writes as (parameter, gradient) pairs for
/// the `GradStore`.
pub struct Graph {
    exec: CudaGraph,
    grads: Vec<(Tensor, Tensor)>,
    stream: Arc<CudaStream>,
}

impl Drop for Graph {
    fn drop(&mut self) {
        // A graph is retired after an allocation, possibly while its last replay still runs:
        // the stream finishes first (rare: once per new shape, and at the end of training).
        if let Err(e) = self.stream.synchronize() {
            tracing::warn!("retiring a recorded pass: {e}");
        }
    }
}

// SAFETY: a graph is not internally synchronised; it is only launched or dropped by the plan
// that owns it, behind the network's mutex, so never from two threads at once.
unsafe impl Send for Graph {}

/// A device buffer that grows and is never shrunk; its values are unspecified until written.
#[derive(Default)]
pub struct DeviceBuf {
    storage: Option<CudaStorage>,
    ptr: u64,
    len: usize,
    cap: usize,
}

impl DeviceBuf {
    /// Makes the buffer hold `len` elements of `dtype` (its type never changes), counting an
    /// allocation in `allocations`.
    fn fit(
        &mut self,
        dev: &CudaDevice,
        dtype: DType,
        len: usize,
        allocations: &Cell<u64>,
    ) -> Result<u64> {
        if self.cap < len || self.storage.is_none() {
            let (s, p) = alloc(dev, dtype, len)?;
            allocations.set(allocations.get() + 1);
            // The old storage is freed in stream order, after the work queued on it.
            self.storage = Some(s);
            self.ptr = p;
            self.cap = len;
        }
        self.len = len;
        Ok(self.ptr)
    }
}

/// A BatchNorm's batch mean and `1/√(var + eps)`, f32 on the device.
#[derive(Default)]
pub struct DeviceStats {
    mean: DeviceBuf,
    invstd: DeviceBuf,
}

/// The CUDA kernels of one plan: its device, activation type, and the buffers it owns besides
/// the tapes (parameter gradients, bf16 weights, the BatchNorm's scratch).
pub struct CudaKernels {
    dev: CudaDevice,
    dtype: DType,
    /// Whether passes are recorded as graphs.
    graphs: bool,
    /// Whether activations are NHWC and the convolutions' weights KRSC copies.
    nhwc: bool,
    /// Buffers this plan has allocated: a graph recorded at another count may address freed
    /// memory. (Per plan, not per process: another plan or thread allocating does not move
    /// this one's buffers.)
    allocations: Cell<u64>,
    /// Device addresses of the parameters and their gradient tensors, looked up once.
    addresses: HashMap<TensorId, u64>,
    /// While recording: the gradients the pass hands to the `GradStore`.
    recording: Option<Vec<(Tensor, Tensor)>>,
    /// While recording: whether the pass met a gradient it cannot replay.
    unrecordable: bool,
    /// f32 gradient tensors by their parameter.
    grads: HashMap<TensorId, Tensor>,
    /// The copies the convolutions take of their f32 KCRS weights (bf16 or channels-last plans
    /// only), by the weight's address.
    weights: HashMap<u64, DeviceBuf>,
    /// What `begin_forward` writes: every weight copy of the program, made on its first call.
    casts: Vec<WeightCopy>,
    /// A weight gradient of the activation type, before it joins the parameter's f32 one.
    dw: DeviceBuf,
    /// dγ, dβ, the BatchNorm backward's coefficients, and the partial sums of its reductions.
    dgamma: DeviceBuf,
    dbeta: DeviceBuf,
    coef: DeviceBuf,
    partial: DeviceBuf,
}

impl CudaKernels {
    /// Kernels on `dev` for activations of `dtype` (f32 or bf16), run as `options` say.
    pub fn new(dev: CudaDevice, dtype: DType, options: PlanOptions) -> Self {
        CudaKernels {
            dev,
            dtype,
            graphs: options.graphs,
            nhwc: options.channels_last,
            allocations: Cell::new(0),
            addresses: HashMap::new(),
            recording: None,
            unrecordable: false,
            grads: HashMap::new(),
            weights: HashMap::new(),
            casts: Vec::new(),
            dw: DeviceBuf::default(),
            dgamma: DeviceBuf::default(),
            dbeta: DeviceBuf::default(),
            coef: DeviceBuf::default(),
            partial: DeviceBuf::default(),
        }
    }

    /// Whether the convolutions take copies of the f32 KCRS weights.
    fn copies_weights(&self) -> bool {
        self.dtype != DType::F32 || self.nhwc
    }

    /// What writing the copy of conv weight `w` takes (the copy made here on first use).
    fn weight_copy(&mut self, w: &Tensor) -> Result<WeightCopy> {
        let src = self.address(w, "conv2d weight")?;
        let (_, cin, kh, kw) = w.dims4()?;
        let n = w.elem_count();
        if !self.weights.contains_key(&src) {
            // Inserted only once allocated: a failed allocation leaves no entry behind.
            let mut copy = DeviceBuf::default();
            copy.fit(&self.dev, self.dtype, n, &self.allocations)?;
            self.weights.insert(src, copy);
        }
        Ok(WeightCopy {
            src,
            dst: self.weights[&src].ptr,
            n,
            cin,
            taps: kh * kw,
        })
    }

    /// The address of what the convolutions take for `w` (an f32 conv weight): `w` itself, or
    /// the copy `begin_forward` wrote this forward pass.
    fn weight(&mut self, w: &Tensor) -> Result<u64> {
        let pw = self.address(w, "conv2d weight")?;
        if !self.copies_weights() {
            return Ok(pw);
        }
        match self.weights.get(&pw) {
            Some(copy) => Ok(copy.ptr),
            // A copy made anywhere else would never be written again.
            None => candle_core::bail!(
                "planned CUDA step: a conv weight of shape {:?} outside Program::convs (a bug)",
                w.dims()
            ),
        }
    }

    /// The element count and the `[n, rows, cols]` of a transpose between NCHW and NHWC for a
    /// tensor of shape `dims`: NCHW → NHWC when `to_nhwc`.
    fn transposed(dims: [usize; 4], to_nhwc: bool) -> (usize, [usize; 3]) {
        let [n, c, h, w] = dims;
        let rc = if to_nhwc { [c, h * w] } else { [h * w, c] };
        (n * c * h * w, [n, rc[0], rc[1]])
    }

    /// `dst` = `src` transposed between NCHW and NHWC (see [`CudaKernels::transposed`]).
    fn transpose(&self, src: u64, dst: u64, dims: [usize; 4], to_nhwc: bool) -> Result<()> {
        let (total, [n, rows, cols]) = Self::transposed(dims, to_nhwc);
        self.each(
            kernel!(self.dtype, "transpose"),
            total,
            &[
                Arg::Ptr(src),
                Arg::Ptr(dst),
                Arg::I32(n as i32),
                Arg::I32(rows as i32),
                Arg::I32(cols as i32),
            ],
        )
    }

    /// The device address of a parameter or gradient tensor (contiguous, on this device),
    /// looked up on first use: their storage never moves.
    fn address(&mut self, t: &Tensor, what: &str) -> Result<u64> {
        if let Some(&p) = self.addresses.get(&t.id()) {
            return Ok(p);
        }
        let (_, p) = tensor_ptr(t, what)?;
        self.addresses.insert(t.id(), p);
        Ok(p)
    }

    /// Sets or adds the gradient of `var` from its values of type `dtype` at `src`: into the
    /// f32 tensor kept for `var`, which `grads` then holds. `krsc`: `src` is a conv weight's
    /// gradient in KRSC order, with these input channels (per group) and taps.
    fn accumulate(
        &mut self,
        grads: &mut GradStore,
        var: &Tensor,
        src: u64,
        dtype: DType,
        krsc: Option<(usize, usize)>,
    ) -> Result<()> {
        if !self.grads.contains_key(&var.id()) {
            let (t, _) = alloc_tensor(&self.dev, DType::F32, var.shape())?;
            self.allocations.set(self.allocations.get() + 1);
            self.grads.insert(var.id(), t);
        }
        let own = self.grads[&var.id()].clone();
        let po = self.address(&own, "parameter gradient")?;
        let add = match grads.get(var) {
            None => false,
            Some(g) if g.id() == own.id() => true,
            Some(_) if self.recording.is_some() => {
                // Its address is new every step: this pass runs unrecorded.
                self.unrecordable = true;
                return Ok(());
            }
            Some(g) => {
                // A gradient from outside the plan (the parameter also used in candle's graph):
                // ours starts from it.
                let g = g.to_dtype(DType::F32)?.contiguous()?;
                let (_, pg) = tensor_ptr(&g, "parameter gradient")?;
                self.copy(pg, po, DType::F32, var.elem_count())?;
                true
            }
        };
        let n = var.elem_count();
        let (cin, taps) = krsc.unwrap_or((1, 1));
        self.each(
            kernel!(dtype, "grad_add"),
            n,
            &[
                Arg::Ptr(po),
                Arg::Ptr(src),
                Arg::I64(n as i64),
                Arg::I32(add as i32),
                Arg::I32(krsc.is_some() as i32),
                Arg::I32(cin as i32),
                Arg::I32(taps as i32),
            ],
        )?;
        match &mut self.recording {
            // Made by the replay, so that a pass found unrecordable leaves `grads` untouched
            // for its unrecorded run.
            Some(log) => log.push((var.clone(), own)),
            None => {
                grads.insert(var, own);
            }
        }
        Ok(())
    }

    /// Copies `len` values of `dtype` from `src` to `dst`, in stream order.
    fn copy(&self, src: u64, dst: u64, dtype: DType, len: usize) -> Result<()> {
        let stream = self.dev.cuda_stream();
        // SAFETY: both addresses are of live device buffers of at least `len` values.
        let r =
            unsafe { memcpy_dtod_async(dst, src, len * dtype.size_in_bytes(), stream.cu_stream()) };
        super::device_call(r.map_err(candle_core::Error::wrap))
    }

    /// Launches the elementwise kernel `name` over `total` values with `args`.
    fn each(&self, name: &'static str, total: usize, args: &[Arg]) -> Result<()> {
        launch(&self.dev, name, elementwise(total), args)
    }

    /// cuDNN's geometry of `conv` over an input of shape `dims`, in this plan's type and layout.
    fn geometry(&self, conv: &Conv2d, dims: [usize; 4]) -> Result<super::conv::Geometry> {
        let mut g = conv.geometry(dims)?.cuda(self.dtype);
        g.nhwc = self.nhwc;
        Ok(g)
    }
}

/// Logs why a pass could not be recorded; it then runs unrecorded (`run_pass` in
/// `models/plan.rs`), so training goes on at the unrecorded pace.
fn unrecorded(why: &str) -> Option<Graph> {
    UNRECORDED.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        "a planned CUDA pass could not be recorded as a graph ({why}); it runs unrecorded"
    );
    None
}

impl Kernels for CudaKernels {
    type Buf = DeviceBuf;
    type Stats = DeviceStats;

    fn fit(&mut self, b: &mut DeviceBuf, len: usize) -> Result<()> {
        b.fit(&self.dev, self.dtype, len, &self.allocations)
            .map(|_| ())
    }

    fn load(&mut self, t: &Tensor, b: &mut DeviceBuf) -> Result<()> {
        let t = t.to_dtype(self.dtype)?.contiguous()?;
        let (_, p) = tensor_ptr(&t, "planned step input")?;
        let dst = b.fit(&self.dev, self.dtype, t.elem_count(), &self.allocations)?;
        if self.nhwc {
            let dims: [usize; 4] = t.dims4()?.into();
            return self.transpose(p, dst, dims, true);
        }
        self.copy(p, dst, self.dtype, t.elem_count())
    }

    fn output(&mut self, b: &DeviceBuf, dims: [usize; 4]) -> Result<Var> {
        let n = dims.iter().product();
        if n > b.len {
            candle_core::bail!(
                "planned step: output of shape {dims:?} from {} values",
                b.len
            )
        }
        let (s, p) = alloc(&self.dev, self.dtype, n)?;
        if self.nhwc {
            self.transpose(b.ptr, p, dims, false)?;
        } else {
            self.copy(b.ptr, p, self.dtype, n)?;
        }
        let t = Tensor::from_storage(Storage::Cuda(s), dims.to_vec(), BackpropOp::none(), true);
        Var::from_tensor(&t)
    }

    fn begin_forward(&mut self, program: &Program) -> Result<()> {
        if !self.copies_weights() {
            return Ok(());
        }
        if self.casts.is_empty() {
            // Made once: the weights' and the copies' addresses never change.
            self.casts = program
                .convs()
                .into_iter()
                .map(|c| self.weight_copy(c.weight()))
                .collect::<Result<_>>()?;
        }
        cast_weights(&self.dev, self.dtype, &self.casts, self.nhwc)
    }

    fn conv_forward(
        &mut self,
        conv: &Conv2d,
        x: &DeviceBuf,
        dims: [usize; 4],
        y: &mut DeviceBuf,
    ) -> Result<()> {
        let g = conv.geometry(dims)?;
        let pw = self.weight(conv.weight())?;
        let py = y.fit(&self.dev, self.dtype, g.output_len(), &self.allocations)?;
        run(
            &self.dev,
            &self.geometry(conv, dims)?,
            Direction::Forward,
            x.ptr,
            pw,
            py,
        )
    }

    fn bn_forward(
        &mut self,
        bn: &BatchNorm,
        x: &DeviceBuf,
        [n, c, h, w]: [usize; 4],
        relu: bool,
        train: bool,
        stats: &mut DeviceStats,
        y: &mut DeviceBuf,
    ) -> Result<()> {
        let (gamma, beta) = bn.affine();
        let (running_mean, running_var, eps, momentum) = bn.running();
        let prm = self.address(running_mean, "running mean")?;
        let prv = self.address(running_var, "running variance")?;
        let invstd = stats
            .invstd
            .fit(&self.dev, DType::F32, c, &self.allocations)?;
        let mut o = Operands {
            x: x.ptr,
            mean: prm,
            invstd,
            gamma: self.address(gamma, "batch norm weight")?,
            partial: 0,
            dims: [n, c, h * w],
            nhwc: self.nhwc,
        };
        if train {
            o.mean = stats
                .mean
                .fit(&self.dev, DType::F32, c, &self.allocations)?;
            o.partial = self.partial.fit(
                &self.dev,
                DType::F32,
                c * norm::parts(c, n * h * w, self.nhwc) * 2,
                &self.allocations,
            )?;
            norm::statistics(&self.dev, self.dtype, &o, prm, prv, eps, momentum)?;
        } else {
            norm::running_invstd(&self.dev, prv, invstd, c, eps)?;
        }
        let py = y.fit(&self.dev, self.dtype, x.len, &self.allocations)?;
        let pb = self.address(beta, "batch norm bias")?;
        norm::apply(&self.dev, self.dtype, &o, pb, relu, py)
    }

    fn bn_backward(
        &mut self,
        bn: &BatchNorm,
        x: &DeviceBuf,
        dy: &DeviceBuf,
        mask: Option<&DeviceBuf>,
        stats: &DeviceStats,
        [n, c, h, w]: [usize; 4],
        dx: &mut DeviceBuf,
        grads: &mut GradStore,
    ) -> Result<()> {
        let (gamma, beta) = bn.affine();
        let o = Operands {
            x: x.ptr,
            mean: stats.mean.ptr,
            invstd: stats.invstd.ptr,
            gamma: self.address(gamma, "batch norm weight")?,
            partial: self.partial.fit(
                &self.dev,
                DType::F32,
                c * norm::parts(c, n * h * w, self.nhwc) * 2,
                &self.allocations,
            )?,
            dims: [n, c, h * w],
            nhwc: self.nhwc,
        };
        let g = Gradients {
            dx: dx.fit(&self.dev, self.dtype, x.len, &self.allocations)?,
            dgamma: self
                .dgamma
                .fit(&self.dev, DType::F32, c, &self.allocations)?,
            dbeta: self
                .dbeta
                .fit(&self.dev, DType::F32, c, &self.allocations)?,
            coef: self
                .coef
                .fit(&self.dev, DType::F32, 3 * c, &self.allocations)?,
        };
        let mask = mask.map_or(0, |m| m.ptr);
        norm::backward(&self.dev, self.dtype, &o, dy.ptr, mask, true, &g)?;
        self.accumulate(grads, gamma, g.dgamma, DType::F32, None)?;
        self.accumulate(grads, beta, g.dbeta, DType::F32, None)
    }

    fn conv_backward(
        &mut self,
        conv: &Conv2d,
        x: &DeviceBuf,
        dims: [usize; 4],
        dy: &DeviceBuf,
        dx: Option<&mut DeviceBuf>,
        grads: &mut GradStore,
    ) -> Result<()> {
        let g = self.geometry(conv, dims)?;
        let weight = conv.weight();
        let pw = self.weight(weight)?;
        if let Some(dx) = dx {
            let pdx = dx.fit(
                &self.dev,
                self.dtype,
                dims.iter().product(),
                &self.allocations,
            )?;
            run(&self.dev, &g, Direction::BackwardData, dy.ptr, pw, pdx)?;
        }
        let pdw = self.dw.fit(
            &self.dev,
            self.dtype,
            weight.elem_count(),
            &self.allocations,
        )?;
        run(&self.dev, &g, Direction::BackwardFilter, x.ptr, dy.ptr, pdw)?;
        let (_, cin, kh, kw) = weight.dims4()?;
        let krsc = self.nhwc.then_some((cin, kh * kw));
        self.accumulate(grads, weight, pdw, self.dtype, krsc)
    }

    fn add_relu(&mut self, a: &DeviceBuf, b: &DeviceBuf, y: &mut DeviceBuf) -> Result<()> {
        let py = y.fit(&self.dev, self.dtype, a.len, &self.allocations)?;
        self.each(
            kernel!(self.dtype, "add_relu_fwd"),
            a.len,
            &[
                Arg::Ptr(a.ptr),
                Arg::Ptr(b.ptr),
                Arg::Ptr(py),
                Arg::I64(a.len as i64),
            ],
        )
    }

    fn add_relu_in_place(&mut self, y: &mut DeviceBuf, a: &DeviceBuf) -> Result<()> {
        // Each thread reads y[i] before writing it: the output may alias an operand.
        self.each(
            kernel!(self.dtype, "add_relu_fwd"),
            y.len,
            &[
                Arg::Ptr(a.ptr),
                Arg::Ptr(y.ptr),
                Arg::Ptr(y.ptr),
                Arg::I64(y.len as i64),
            ],
        )
    }

    fn add_masked(&mut self, dx: &mut DeviceBuf, dy: &DeviceBuf, out: &DeviceBuf) -> Result<()> {
        self.each(
            kernel!(self.dtype, "add_masked"),
            dx.len,
            &[
                Arg::Ptr(dx.ptr),
                Arg::Ptr(dy.ptr),
                Arg::Ptr(out.ptr),
                Arg::I64(dx.len as i64),
            ],
        )
    }

    fn add(&mut self, dx: &mut DeviceBuf, d: &DeviceBuf) -> Result<()> {
        self.each(
            kernel!(self.dtype, "add_into"),
            dx.len,
            &[Arg::Ptr(dx.ptr), Arg::Ptr(d.ptr), Arg::I64(dx.len as i64)],
        )
    }

    fn subsample(
        &mut self,
        x: &DeviceBuf,
        [n, c, h, w]: [usize; 4],
        pad: usize,
        stride: usize,
        y: &mut DeviceBuf,
    ) -> Result<()> {
        let total = n * (c + pad) * h.div_ceil(stride) * w.div_ceil(stride);
        let py = y.fit(&self.dev, self.dtype, total, &self.allocations)?;
        let [n, c, h, w, pad, stride] = [n, c, h, w, pad, stride].map(|v| Arg::I32(v as i32));
        let nhwc = Arg::I32(self.nhwc as i32);
        self.each(
            kernel!(self.dtype, "subsample"),
            total,
            &[Arg::Ptr(x.ptr), Arg::Ptr(py), n, c, h, w, pad, stride, nhwc],
        )
    }

    fn max_pool(
        &mut self,
        x: &DeviceBuf,
        dims: [usize; 4],
        g: PoolGeometry,
        y: &mut DeviceBuf,
    ) -> Result<()> {
        let out = g.out_dims(dims)?;
        let total = out.iter().product();
        let py = y.fit(&self.dev, self.dtype, total, &self.allocations)?;
        self.each(
            kernel!(self.dtype, "max_pool_fwd"),
            total,
            &pool_args(&[x.ptr, py], dims, out, g.window(), self.nhwc)?,
        )
    }

    fn max_pool_backward(
        &mut self,
        x: &DeviceBuf,
        dims: [usize; 4],
        g: PoolGeometry,
        dy: &DeviceBuf,
        dx: &mut DeviceBuf,
    ) -> Result<()> {
        let total = dims.iter().product();
        let out = g.out_dims(dims)?;
        let pdx = dx.fit(&self.dev, self.dtype, total, &self.allocations)?;
        self.each(
            kernel!(self.dtype, "max_pool_bwd"),
            total,
            &pool_args(&[x.ptr, dy.ptr, pdx], dims, out, g.window(), self.nhwc)?,
        )
    }

    fn subsample_backward(
        &mut self,
        dx: &mut DeviceBuf,
        [n, c, h, w]: [usize; 4],
        dy: &DeviceBuf,
        out: &DeviceBuf,
        pad: usize,
        stride: usize,
    ) -> Result<()> {
        let total = n * c * h.div_ceil(stride) * w.div_ceil(stride);
        let (pdx, pdy, pout) = (Arg::Ptr(dx.ptr), Arg::Ptr(dy.ptr), Arg::Ptr(out.ptr));
        let [n, c, h, w, pad, stride] = [n, c, h, w, pad, stride].map(|v| Arg::I32(v as i32));
        let nhwc = Arg::I32(self.nhwc as i32);
        self.each(
            kernel!(self.dtype, "subsample_bwd"),
            total,
            &[pdx, pdy, pout, n, c, h, w, pad, stride, nhwc],
        )
    }

    type Graph = Graph;

    fn graphs(&self) -> bool {
        self.graphs
    }

    fn generation(&self) -> u64 {
        // Both counts only grow, so their sum changes whenever either does. The workspace is
        // this thread's, the one the plan's convolutions use.
        self.allocations.get() + super::conv::workspace_allocations()
    }

    fn capture(&mut self, f: &mut dyn FnMut(&mut Self) -> Result<()>) -> Result<Option<Graph>> {
        let stream = self.dev.cuda_stream();
        let before = self.generation();
        self.recording = Some(Vec::new());
        self.unrecordable = false;
        // Thread-local mode: a call of this thread that is unsafe during capture (a
        // synchronisation) fails instead of being recorded. A stream-ordered allocation would
        // be recorded as a graph memory node, so the count below catches it.
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        stream
            .begin_capture(mode)
            .map_err(candle_core::Error::wrap)?;
        let recording = Recording::begin();
        let ran = f(self);
        let refused = recording.end();
        // The capture always ends, whatever happened inside it.
        let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        let grads = self.recording.take().unwrap_or_default();
        // Checked first: freeing a buffer's old memory inside the capture also invalidates it,
        // and the CUDA error that follows would hide the cause.
        if self.generation() != before {
            // The buffer holds memory of the (discarded) graph: nothing can use it safely.
            candle_core::bail!(
                "planned CUDA step: a buffer was allocated while a pass was being recorded as a \
                 graph (a bug; LDL_GPU_GRAPH=0 runs without graphs)"
            )
        }
        // An error of the pass's own (not a device call's) is a bug: shown, not retried.
        ran?;
        // A device call the capture refused, or a capture that could not be made into a graph:
        // this pass runs unrecorded from now on (counted: the test of recorded steps wants none).
        let exec = match (refused.map(|e| e.to_string()), ended) {
            (None, Ok(exec)) => exec,
            (Some(why), _) => return Ok(unrecorded(&why)),
            (None, Err(e)) => return Ok(unrecorded(&e.to_string())),
        };
        if self.unrecordable {
            return Ok(None);
        }
        Ok(exec.map(|exec| Graph {
            exec,
            grads,
            stream,
        }))
    }

    fn replay(&mut self, graph: &Graph, grads: Option<&mut GradStore>) -> Result<bool> {
        if let Some(store) = &grads {
            // The recording wrote or added to our own gradients only; a gradient from outside
            // the plan would be lost (the unrecorded pass adds to it).
            let foreign = graph
                .grads
                .iter()
                .any(|(var, own)| store.get(var).is_some_and(|g| g.id() != own.id()));
            if foreign {
                return Ok(false);
            }
        }
        graph.exec.launch().map_err(candle_core::Error::wrap)?;
        REPLAYS.fetch_add(1, Ordering::Relaxed);
        if let Some(store) = grads {
            for (var, grad) in &graph.grads {
                store.insert(var, grad.clone());
            }
        }
        Ok(true)
    }
}
