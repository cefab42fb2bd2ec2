//! The CUDA training path (a build with the `cuda` feature): cuDNN convolutions ([`conv`]), fused
//! BatchNorm kernels ([`norm`]), the fused residual add + ReLU, the stem's max-pooling and the
//! multi-tensor SGD update (this file),
//! the planned step's kernels over fixed device buffers ([`plan`]), and pinned, asynchronous
//! host-to-device copies of batches ([`feed`]).
//!
//! candle's CUDA backend computes a convolution's input gradient with a naive kernel, runs
//! BatchNorm as a chain of about ten unfused ops (and fails in bf16 training), and updates each
//! parameter with seven elementwise ops. The layers in `models` call into this module when their
//! tensors are on a CUDA device; each op here is checked against the CPU implementation by
//! `tests/gpu_ops.rs`.
//!
//! Everything runs on candle's one stream, in issue order, so no host synchronisation happens
//! inside a training step. The kernels are in `kernels.cu`, compiled to PTX by `build.rs`.

pub mod conv;
pub mod feed;
pub mod norm;
pub mod plan;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, DeviceId};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

/// The kernels of `kernels.cu`, as PTX.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
/// The name the module is cached under in candle's device.
const MODULE: &str = "ldl_stages_kernels";
/// Threads per block of the elementwise and reduction kernels.
const THREADS: u32 = 256;

/// A kernel argument: a device address, an `int`, a `long long`, a `float` or a `double`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
}

/// The name of kernel `$base` for activations of `$dtype` (`$base_f32`, `$base_bf16`).
macro_rules! kernel {
    ($dtype:expr, $base:literal) => {
        match $dtype {
            candle_core::DType::F32 => concat!($base, "_f32"),
            candle_core::DType::BF16 => concat!($base, "_bf16"),
            d => candle_core::bail!(
                "{}: activations of type {d:?} are not supported on CUDA (f32 or bf16)",
                $base
            ),
        }
    };
}
pub(crate) use kernel;

thread_local! {
    // Loaded kernels by device and name: looking a function up in candle's module store takes a
    // lock, a map lookup and a driver call per launch, a cost the small kernels of a ResNet-56
    // step (hundreds of launches, host-bound at batch 64) would pay every time.
    static FUNCTIONS: std::cell::RefCell<std::collections::HashMap<(DeviceId, &'static str), CudaFunction>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

thread_local! {
    /// While a planned pass is being recorded as a CUDA graph (`plan.rs`'s `capture`): `Some`,
    /// with the first device call that failed during the recording, if one did.
    static RECORDING: std::cell::RefCell<Option<Option<candle_core::Error>>> =
        const { std::cell::RefCell::new(None) };
}

/// The result of a device call (a kernel launch, a cuDNN call, a copy). While a pass is being
/// recorded, a failure (a call the capture refuses, or any call after that has invalidated the
/// capture) is kept for [`end_recording`] and the pass goes on, so that its host-side
/// bookkeeping ends as a finished pass leaves it; the pass is then run unrecorded, where a
/// genuine error shows again.
pub(crate) fn device_call(r: Result<()>) -> Result<()> {
    match r {
        Err(e) => RECORDING.with(|slot| match &mut *slot.borrow_mut() {
            Some(first) => {
                first.get_or_insert(e);
                Ok(())
            }
            None => Err(e),
        }),
        ok => ok,
    }
}

/// Starts keeping the failures of [`device_call`] on this thread.
pub(crate) fn begin_recording() {
    RECORDING.with(|slot| *slot.borrow_mut() = Some(None));
}

/// Stops keeping failures, and returns the first one kept since [`begin_recording`].
pub(crate) fn end_recording() -> Option<candle_core::Error> {
    RECORDING.with(|slot| slot.borrow_mut().take().flatten())
}

/// Launches kernel `name` of `kernels.cu` on the device's stream (asynchronously).
pub(crate) fn launch(
    dev: &CudaDevice,
    name: &'static str,
    cfg: LaunchConfig,
    args: &[Arg],
) -> Result<()> {
    launch_with_table::<SgdTable>(dev, name, cfg, None, args)
}

/// [`launch`] of a kernel whose first parameter is a table passed by value ([`SgdTable`],
/// [`CastTable`]).
fn launch_with_table<T: DeviceRepr>(
    dev: &CudaDevice,
    name: &'static str,
    cfg: LaunchConfig,
    table: Option<&T>,
    args: &[Arg],
) -> Result<()> {
    FUNCTIONS.with(|cache| -> Result<()> {
        let mut cache = cache.borrow_mut();
        let key = (dev.id(), name);
        if let std::collections::hash_map::Entry::Vacant(e) = cache.entry(key) {
            let f = dev.get_or_load_custom_func(name, MODULE, PTX)?;
            e.insert(f.into_cuda_function());
        }
        check_arguments(name, table.map(|_| std::mem::size_of::<T>()), args)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&cache[&key]);
        if let Some(t) = table {
            b.arg(t);
        }
        for a in args {
            match a {
                Arg::Ptr(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::F64(v) => b.arg(v),
            };
        }
        // SAFETY: each call site passes the arguments of the kernel's C signature, with device
        // addresses of live buffers of the lengths the kernel reads and writes.
        device_call(
            unsafe { b.launch(cfg) }
                .map(drop)
                .map_err(candle_core::Error::wrap),
        )
    })
}

/// A kernel parameter as the PTX declares it: `.u64` (a pointer or `long long`), `.u32` (an
/// `int`), `.f32`, `.f64`, or a by-value struct of so many bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Param {
    U64,
    U32,
    F32,
    F64,
    Bytes(usize),
}

/// The parameters of every kernel in `ptx`, by name, from its `.entry` declarations.
fn parse_signatures(ptx: &str) -> std::collections::HashMap<String, Vec<Param>> {
    let mut out = std::collections::HashMap::new();
    let mut lines = ptx.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim().strip_prefix(".visible .entry ") else {
            continue;
        };
        let name = rest.trim_end_matches('(').trim().to_string();
        let mut params = Vec::new();
        for p in lines.by_ref() {
            let p = p.trim();
            if p.starts_with(')') {
                break;
            }
            let kind = if p.contains(".u64") || p.contains(".s64") {
                Param::U64
            } else if p.contains(".u32") || p.contains(".s32") {
                Param::U32
            } else if p.contains(".f32") {
                Param::F32
            } else if p.contains(".f64") {
                Param::F64
            } else {
                // `.param .align 8 .b8 name[2056]`
                let bytes = p
                    .rsplit_once('[')
                    .and_then(|(_, n)| n.trim_end_matches([']', ',']).parse().ok())
                    .unwrap_or(0);
                Param::Bytes(bytes)
            };
            params.push(kind);
        }
        out.insert(name, params);
    }
    out
}

/// Fails unless `args` (after a by-value table of `table` bytes) match the parameters the PTX
/// declares for kernel `name`: a wrong argument list would otherwise run the kernel on garbage.
fn check_arguments(name: &str, table: Option<usize>, args: &[Arg]) -> Result<()> {
    static SIGNATURES: std::sync::OnceLock<std::collections::HashMap<String, Vec<Param>>> =
        std::sync::OnceLock::new();
    let signatures = SIGNATURES.get_or_init(|| parse_signatures(PTX));
    let given = table
        .map(Param::Bytes)
        .into_iter()
        .chain(args.iter().map(|a| match a {
            Arg::Ptr(_) | Arg::I64(_) => Param::U64,
            Arg::I32(_) => Param::U32,
            Arg::F32(_) => Param::F32,
            Arg::F64(_) => Param::F64,
        }));
    match signatures.get(name) {
        Some(want) if want.iter().copied().eq(given.clone()) => Ok(()),
        Some(want) => candle_core::bail!(
            "kernel `{name}` launched with arguments {:?}, its PTX declares {want:?} (a bug)",
            given.collect::<Vec<_>>()
        ),
        None => candle_core::bail!("kernel `{name}` is not in kernels.cu's PTX (a bug)"),
    }
}

/// A one-dimensional grid-stride launch over `total` elements.
pub(crate) fn elementwise(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(THREADS as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One thread per channel.
pub(crate) fn per_channel(c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.div_ceil(128) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The device address of the first element of a contiguous region of `s` described by `l`.
pub(crate) fn storage_ptr(s: &CudaStorage, l: &Layout, what: &str) -> Result<u64> {
    if !l.is_contiguous() {
        candle_core::bail!("{what}: expected a contiguous tensor on CUDA")
    }
    let stream = s.device.cuda_stream();
    let off = l.start_offset() as u64;
    // The guards returned with the addresses record events for cross-stream use; everything here
    // runs on candle's single stream, so they are dropped at once.
    Ok(match &s.slice {
        CudaStorageSlice::F32(v) => v.device_ptr(&stream).0 + 4 * off,
        CudaStorageSlice::BF16(v) => v.device_ptr(&stream).0 + 2 * off,
        CudaStorageSlice::U32(v) => v.device_ptr(&stream).0 + 4 * off,
        _ => candle_core::bail!("{what}: unsupported type {:?} on CUDA", s.dtype()),
    })
}

/// The CUDA device and the device address of a contiguous tensor.
pub(crate) fn tensor_ptr(t: &Tensor, what: &str) -> Result<(CudaDevice, u64)> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cuda(s) => Ok((s.device.clone(), storage_ptr(s, l, what)?)),
        _ => candle_core::bail!("{what}: expected a tensor on a CUDA device"),
    }
}

/// Uninitialised device storage for `len` elements of `dtype`, and its address.
pub(crate) fn alloc(dev: &CudaDevice, dtype: DType, len: usize) -> Result<(CudaStorage, u64)> {
    let len = len.max(1);
    // SAFETY: every caller has a kernel write all `len` elements before they are read.
    let s = unsafe {
        match dtype {
            DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(len)?, dev.clone()),
            DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::bf16>(len)?, dev.clone()),
            DType::U32 => CudaStorage::wrap_cuda_slice(dev.alloc::<u32>(len)?, dev.clone()),
            d => candle_core::bail!("cannot allocate {d:?} on CUDA here"),
        }
    };
    let p = storage_ptr(&s, &Layout::contiguous(len), "allocation")?;
    Ok((s, p))
}

/// A new tensor (no gradient history) over uninitialised device storage, and its address.
pub(crate) fn alloc_tensor(
    dev: &CudaDevice,
    dtype: DType,
    shape: impl Into<Shape>,
) -> Result<(Tensor, u64)> {
    let shape = shape.into();
    let (s, p) = alloc(dev, dtype, shape.elem_count())?;
    Ok((
        Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false),
        p,
    ))
}

/// `relu(a + b)` for contiguous storages of one type and length.
pub(crate) fn add_relu_forward(
    a: &CudaStorage,
    la: &Layout,
    b: &CudaStorage,
    lb: &Layout,
) -> Result<CudaStorage> {
    let n = la.shape().elem_count();
    let name = kernel!(a.dtype(), "add_relu_fwd");
    if b.dtype() != a.dtype() || lb.shape().elem_count() != n {
        candle_core::bail!("add-relu: operands differ in type or length")
    }
    let (pa, pb) = (
        storage_ptr(a, la, "add-relu")?,
        storage_ptr(b, lb, "add-relu")?,
    );
    let (y, py) = alloc(&a.device, a.dtype(), n)?;
    launch(
        &a.device,
        name,
        elementwise(n),
        &[Arg::Ptr(pa), Arg::Ptr(pb), Arg::Ptr(py), Arg::I64(n as i64)],
    )?;
    Ok(y)
}

/// The gradient behind a ReLU: `dy` where its output `y` is positive, else 0.
pub(crate) fn relu_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let dy = dy.contiguous()?;
    let name = kernel!(y.dtype(), "relu_bwd");
    let (dev, py) = tensor_ptr(y, "add-relu output")?;
    let (_, pd) = tensor_ptr(&dy, "add-relu gradient")?;
    let n = y.elem_count();
    let (g, pg) = alloc_tensor(&dev, y.dtype(), y.shape())?;
    launch(
        &dev,
        name,
        elementwise(n),
        &[Arg::Ptr(py), Arg::Ptr(pd), Arg::Ptr(pg), Arg::I64(n as i64)],
    )?;
    Ok(g)
}

/// The arguments of `max_pool_fwd` / `max_pool_bwd` (`kernels.cu`): the buffers `ptrs`, the
/// input's shape `dims`, the output's `out`, the `window` (size, stride, padding) and the layout.
pub(crate) fn pool_args(
    ptrs: &[u64],
    dims: [usize; 4],
    out: [usize; 4],
    window: [usize; 3],
    nhwc: bool,
) -> Result<Vec<Arg>> {
    let [k, s, p] = window;
    let ints = [dims[0], dims[1], dims[2], dims[3], out[2], out[3], k, s, p];
    let mut args: Vec<Arg> = ptrs.iter().map(|&p| Arg::Ptr(p)).collect();
    for v in ints {
        args.push(Arg::I32(
            i32::try_from(v).map_err(candle_core::Error::wrap)?,
        ));
    }
    args.push(Arg::I32(nhwc as i32));
    Ok(args)
}

/// Max-pooling (`models::pool`) of a contiguous NCHW storage of shape `dims` into `out` with
/// `window` (size, stride, padding).
pub(crate) fn max_pool_forward(
    x: &CudaStorage,
    l: &Layout,
    dims: [usize; 4],
    out: [usize; 4],
    window: [usize; 3],
) -> Result<CudaStorage> {
    let name = kernel!(x.dtype(), "max_pool_fwd");
    let len: usize = out.iter().product();
    let px = storage_ptr(x, l, "max-pool")?;
    let (y, py) = alloc(&x.device, x.dtype(), len)?;
    launch(
        &x.device,
        name,
        elementwise(len),
        &pool_args(&[px, py], dims, out, window, false)?,
    )?;
    Ok(y)
}

/// The input gradient of [`max_pool_forward`] over `x` (shape `dims`) from the output's `dy`
/// (shape `out`).
pub(crate) fn max_pool_backward(
    x: &Tensor,
    dy: &Tensor,
    dims: [usize; 4],
    out: [usize; 4],
    window: [usize; 3],
) -> Result<Tensor> {
    let (x, dy) = (x.contiguous()?, dy.contiguous()?.to_dtype(x.dtype())?);
    let name = kernel!(x.dtype(), "max_pool_bwd");
    let (dev, px) = tensor_ptr(&x, "max-pool input")?;
    let (_, pd) = tensor_ptr(&dy, "max-pool gradient")?;
    let (dx, pdx) = alloc_tensor(&dev, x.dtype(), x.shape())?;
    launch(
        &dev,
        name,
        elementwise(x.elem_count()),
        &pool_args(&[px, pd, pdx], dims, out, window, false)?,
    )?;
    Ok(dx)
}

/// Parameters per launch of `sgd_multi_f32` (`SGD_TABLE` in `kernels.cu`).
const SGD_TABLE: usize = 64;

/// The kernel argument of `sgd_multi_f32`: `struct SgdTable` of `kernels.cu`, field for field.
#[repr(C)]
#[derive(Clone, Copy)]
struct SgdTable {
    w: [u64; SGD_TABLE],
    g: [u64; SGD_TABLE],
    b: [u64; SGD_TABLE],
    n: [i64; SGD_TABLE],
    count: i32,
}

// SAFETY: a plain C struct of integers, passed by value as the kernel's first parameter.
unsafe impl DeviceRepr for SgdTable {}

/// One parameter of a multi-tensor SGD step: device addresses of its f32 weights, gradient and
/// momentum buffer (0 without momentum), each of `n` values.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SgdParam {
    pub w: u64,
    pub g: u64,
    pub buf: u64,
    pub n: usize,
}

/// One in-place SGD step of every parameter in `params` (see `optim.rs`), the learning rate
/// read from the f32 at device address `lr`: ⌈len / 64⌉ launches instead of one per parameter.
pub(crate) fn sgd_multi(
    dev: &CudaDevice,
    params: &[SgdParam],
    lr: u64,
    momentum: f32,
    weight_decay: f32,
    nesterov: bool,
) -> Result<()> {
    for chunk in params.chunks(SGD_TABLE) {
        let mut t = SgdTable {
            w: [0; SGD_TABLE],
            g: [0; SGD_TABLE],
            b: [0; SGD_TABLE],
            n: [0; SGD_TABLE],
            count: chunk.len() as i32,
        };
        for (i, p) in chunk.iter().enumerate() {
            (t.w[i], t.g[i], t.b[i], t.n[i]) = (p.w, p.g, p.buf, p.n as i64);
        }
        let largest = chunk.iter().map(|p| p.n).max().unwrap_or(1);
        launch_with_table(
            dev,
            "sgd_multi_f32",
            elementwise(largest),
            Some(&t),
            &[
                Arg::Ptr(lr),
                Arg::F32(momentum),
                Arg::F32(weight_decay),
                Arg::I32(nesterov as i32),
            ],
        )?;
    }
    Ok(())
}

/// Conv weights per launch of `cast_weights_*` (`CAST_TABLE` in `kernels.cu`).
const CAST_TABLE: usize = 64;

/// The kernel argument of `cast_weights_*`: `struct CastTable` of `kernels.cu`, field for field.
#[repr(C)]
#[derive(Clone, Copy)]
struct CastTable {
    src: [u64; CAST_TABLE],
    dst: [u64; CAST_TABLE],
    n: [i64; CAST_TABLE],
    cin: [i32; CAST_TABLE],
    taps: [i32; CAST_TABLE],
    count: i32,
}

// SAFETY: a plain C struct of integers, passed by value as the kernel's first parameter.
unsafe impl DeviceRepr for CastTable {}

// The layout nvcc gives the two structs (`.param .align 8 .b8 [2056]` in the PTX; the offsets
// are asserted on the C side too, tests/kernels_on_cpu/check.cpp).
const _: () = assert!(std::mem::size_of::<SgdTable>() == 2056);
const _: () = assert!(std::mem::offset_of!(SgdTable, count) == 2048);
const _: () = assert!(std::mem::size_of::<CastTable>() == 2056);
const _: () = assert!(std::mem::offset_of!(CastTable, n) == 1024);
const _: () = assert!(std::mem::offset_of!(CastTable, cin) == 1536);
const _: () = assert!(std::mem::offset_of!(CastTable, count) == 2048);

/// One conv weight to copy: device addresses of the f32 KCRS weight and of its copy, `n` values,
/// `cin` input channels per group and `taps` = kh·kw.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WeightCopy {
    pub src: u64,
    pub dst: u64,
    pub n: usize,
    pub cin: usize,
    pub taps: usize,
}

/// Writes the copies of `weights` in `dtype` (f32 or bf16), in KRSC order when `krsc`:
/// ⌈len / 64⌉ launches for a whole network instead of one per convolution.
pub(crate) fn cast_weights(
    dev: &CudaDevice,
    dtype: DType,
    weights: &[WeightCopy],
    krsc: bool,
) -> Result<()> {
    let name = kernel!(dtype, "cast_weights");
    for chunk in weights.chunks(CAST_TABLE) {
        let mut t = CastTable {
            src: [0; CAST_TABLE],
            dst: [0; CAST_TABLE],
            n: [0; CAST_TABLE],
            cin: [0; CAST_TABLE],
            taps: [0; CAST_TABLE],
            count: chunk.len() as i32,
        };
        for (i, w) in chunk.iter().enumerate() {
            (t.src[i], t.dst[i], t.n[i]) = (w.src, w.dst, w.n as i64);
            (t.cin[i], t.taps[i]) = (w.cin as i32, w.taps as i32);
        }
        let largest = chunk.iter().map(|w| w.n).max().unwrap_or(1);
        launch_with_table(
            dev,
            name,
            elementwise(largest),
            Some(&t),
            &[Arg::I32(krsc as i32)],
        )?;
    }
    Ok(())
}

/// Writes `v` into the f32 at device address `at`, in stream order: a memset of its bits, so
/// no host buffer has to outlive the call (a per-step scalar a captured graph reads).
pub(crate) fn set_f32(dev: &CudaDevice, at: u64, v: f32) -> Result<()> {
    let stream = dev.cuda_stream();
    // SAFETY: `at` is the address of a live f32 in device memory.
    unsafe { sys::cuMemsetD32Async(at, v.to_bits(), 1, stream.cu_stream()) }
        .result()
        .map_err(candle_core::Error::wrap)
}

/// The most device memory held by live allocations of this process since the last reset, in
/// bytes: the high-water mark of the stream-ordered allocator's default pool, which every
/// candle allocation comes from (comparable to PyTorch's `max_memory_allocated`; the CUDA
/// context and library workspaces outside the pool are not counted). `reset` starts a new
/// measurement. `None` where the device has no memory pools.
pub fn memory_high_water(dev: &CudaDevice, reset: bool) -> Result<Option<u64>> {
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    if !ctx.has_async_alloc() {
        return Ok(None);
    }
    ctx.bind_to_thread().map_err(candle_core::Error::wrap)?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
    // SAFETY: a live device handle; the attribute is a 64-bit counter.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(candle_core::Error::wrap)?;
        let mut value: u64 = 0;
        if reset {
            sys::cuMemPoolSetAttribute(pool, attr, &mut value as *mut u64 as *mut _)
                .result()
                .map_err(candle_core::Error::wrap)?;
            return Ok(Some(0));
        }
        sys::cuMemPoolGetAttribute(pool, attr, &mut value as *mut u64 as *mut _)
            .result()
            .map_err(candle_core::Error::wrap)?;
        Ok(Some(value))
    }
}

#[cfg(test)]
mod tests {
    use super::{check_arguments, parse_signatures, Arg, Param};

    #[test]
    fn kernel_signatures_are_read_from_the_ptx() {
        let ptx = ".visible .entry f(\n\t.param .align 8 .b8 f_param_0[2056],\n\t.param .u64 \
                   f_param_1,\n\t.param .f32 f_param_2,\n\t.param .u32 f_param_3\n)\n{\n}\n";
        let s = parse_signatures(ptx);
        assert_eq!(
            s["f"],
            [Param::Bytes(2056), Param::U64, Param::F32, Param::U32]
        );
    }

    #[test]
    fn launches_are_checked_against_the_built_ptx() {
        // The PTX this build embeds: a right and a wrong argument list of real kernels.
        let add = [Arg::Ptr(0), Arg::Ptr(0), Arg::I64(1)];
        assert!(check_arguments("add_into_f32", None, &add).is_ok());
        let err = check_arguments("add_into_f32", None, &add[..2]).unwrap_err();
        assert!(err.to_string().contains("add_into_f32"), "{err}");
        assert!(check_arguments(
            "sgd_multi_f32",
            Some(2056),
            &[Arg::Ptr(0), Arg::F32(0.9), Arg::F32(0.0), Arg::I32(0)]
        )
        .is_ok());
        assert!(check_arguments("cast_weights_bf16", Some(2056), &[Arg::I32(1)]).is_ok());
        // The max-pooling's argument lists as `pool_args` makes them.
        let g = crate::models::pool::PoolGeometry::STEM;
        for (name, ptrs) in [
            ("max_pool_fwd_f32", &[0u64, 0][..]),
            ("max_pool_bwd_bf16", &[0, 0, 0][..]),
        ] {
            let (dims, window) = ([2, 3, 9, 9], [g.kernel, g.stride, g.pad]);
            let out = g.out_dims(dims).unwrap();
            let args = super::pool_args(ptrs, dims, out, window, true).unwrap();
            assert!(check_arguments(name, None, &args).is_ok(), "{name}");
        }
        // BatchNorm's eps is a double (as the CPU adds it): a float in its place is refused.
        let invstd = |eps: Arg| [Arg::Ptr(0), Arg::Ptr(0), Arg::I32(1), eps];
        assert!(check_arguments("bn_invstd", None, &invstd(Arg::F64(1e-5))).is_ok());
        assert!(check_arguments("bn_invstd", None, &invstd(Arg::F32(1e-5))).is_err());
        let finalize = [
            [Arg::Ptr(0); 6].as_slice(),
            &[Arg::I32(1); 4],
            &[Arg::F64(1e-5), Arg::F32(0.1), Arg::I32(0)],
        ]
        .concat();
        assert!(check_arguments("bn_stats_finalize_bf16", None, &finalize).is_ok());
        assert!(check_arguments("no_such_kernel", None, &[]).is_err());
    }
}
