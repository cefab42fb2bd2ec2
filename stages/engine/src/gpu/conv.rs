//! 2-D convolutions through cuDNN: forward, backward-data and backward-filter.
//!
//! For each geometry and type the tensor, filter and convolution descriptors are built once,
//! the three algorithms are chosen once by cuDNN's heuristics (`cudnnGet*Algorithm_v7`, as
//! PyTorch does without `benchmark`; or by timing them, `cudnnFind*`, with
//! `LDL_CUDNN_SEARCH=1`) and cached, and one workspace per thread, grown to the
//! largest any cached plan needs, is reused by every call (candle's `cudnn` feature picks the
//! algorithm and allocates a workspace on every call, and still runs its naive backward).
//!
//! Among the algorithms the heuristics rank, the first deterministic one is taken, so that a
//! run on the GPU gives the same weights when repeated or resumed (the nondeterministic ones
//! accumulate with atomics). bf16 convolutions run on tensor cores with f32 accumulation; f32
//! ones use plain FMA arithmetic (no TF32), so they agree with the CPU path to ~1e-5.
//! Tensors are NCHW, the layout of every other op of the models, or NHWC (channels-last, with
//! KRSC filters: `Geometry::nhwc`) for the planned step's channels-last option, the layout
//! cuDNN's bf16 tensor-core kernels work in (NCHW bf16 convolutions transpose internally). A
//! channels-last shape cuDNN cannot plan runs as NCHW between transposes (`run_transposed`).

use super::{alloc, alloc_tensor, storage_ptr, tensor_ptr};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::cudnn::{result, sys, CudnnError};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
use candle_core::cuda_backend::DeviceId;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;

/// The geometry and type of one convolution: the key of the plan cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// Batch, input channels, height, width.
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// Output channels and kernel size.
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    /// Stride and zero padding (both dimensions).
    pub stride: usize,
    pub pad: usize,
    /// Channel groups (1 for an ordinary convolution); the weight is `cout × c/groups × kh × kw`.
    pub groups: usize,
    /// Whether activations and weights are bf16 (else f32).
    pub bf16: bool,
    /// Whether activations are NHWC and filters KRSC (else NCHW and KCRS).
    pub nhwc: bool,
}

impl Geometry {
    /// Output height and width.
    pub fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.pad - self.kh) / self.stride + 1,
            (self.w + 2 * self.pad - self.kw) / self.stride + 1,
        )
    }
    fn dtype(&self) -> DType {
        if self.bf16 {
            DType::BF16
        } else {
            DType::F32
        }
    }
    fn cudnn_type(&self) -> sys::cudnnDataType_t {
        if self.bf16 {
            sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16
        } else {
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT
        }
    }
}

/// Descriptors and chosen algorithms of one geometry.
struct Plan {
    x: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    /// One convolution descriptor per direction: each carries the math type (tensor cores or
    /// not) of the algorithm chosen for it, which cuDNN needs alongside the algorithm.
    conv: [sys::cudnnConvolutionDescriptor_t; 3],
    fwd: sys::cudnnConvolutionFwdAlgo_t,
    bwd_data: sys::cudnnConvolutionBwdDataAlgo_t,
    bwd_filter: sys::cudnnConvolutionBwdFilterAlgo_t,
    /// Workspace bytes of each algorithm: forward, backward-data, backward-filter.
    workspace: [usize; 3],
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: the descriptors were created by this plan and are destroyed once.
        unsafe {
            let _ = result::destroy_tensor_descriptor(self.x);
            let _ = result::destroy_filter_descriptor(self.w);
            let _ = result::destroy_tensor_descriptor(self.y);
            for c in self.conv {
                let _ = result::destroy_convolution_descriptor(c);
            }
        }
    }
}

/// The per-thread cuDNN state: a handle on the device's stream, the plans, the workspace.
struct State {
    handle: sys::cudnnHandle_t,
    plans: HashMap<Geometry, Plan>,
    /// The workspace and its device address (taken once: asking the slice for it on every
    /// call would also record events, which a stream being captured into a graph refuses).
    workspace: Option<(CudaSlice<u8>, u64)>,
    /// Channels-last geometries cuDNN could not plan, run transposed ([`run_transposed`]).
    unsupported: std::collections::HashSet<Geometry>,
    /// The transposed operands of those: grown, never shrunk, like the workspace.
    temps: [Option<(CudaSlice<u8>, u64)>; 3],
}

thread_local! {
    /// How many times this thread's workspace was (re)allocated: a CUDA graph recorded before
    /// the last time addresses a freed one (`gpu::plan`).
    static WORKSPACE_ALLOCATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// See [`WORKSPACE_ALLOCATIONS`].
pub(crate) fn workspace_allocations() -> u64 {
    WORKSPACE_ALLOCATIONS.with(|c| c.get())
}

/// Channels-last geometries this process ran transposed: for tests and logs.
static TRANSPOSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many channels-last geometries cuDNN could not plan, so that they ran as NCHW with
/// transposed operands.
pub fn transposed_geometries() -> u64 {
    TRANSPOSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// A device buffer of at least `bytes` bytes in `slot`, grown (and counted as a workspace
/// allocation, which retires recorded graphs) when smaller. Returns its address.
fn grown(dev: &CudaDevice, slot: &mut Option<(CudaSlice<u8>, u64)>, bytes: usize) -> Result<u64> {
    if slot.as_ref().is_none_or(|w| w.0.len() < bytes) {
        // The old one is freed in stream order, after the work queued on it.
        // SAFETY: only kernels write it before anything reads it.
        let w = unsafe { dev.alloc::<u8>(bytes.max(1))? };
        let at = w.device_ptr(&dev.cuda_stream()).0;
        *slot = Some((w, at));
        WORKSPACE_ALLOCATIONS.with(|c| c.set(c.get() + 1));
    }
    Ok(slot.as_ref().expect("set above").1)
}

thread_local! {
    // cuDNN handles may not be shared between threads; training runs on one thread, so this
    // is one handle per opened device in practice.
    static STATE: RefCell<HashMap<DeviceId, State>> = RefCell::new(HashMap::new());
}

fn err(e: CudnnError, what: &str, g: &Geometry) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuDNN {what} of convolution {g:?}: {e:?}"))
}

/// Why no plan could be made for a geometry.
#[derive(Debug)]
enum PlanError {
    Cudnn(CudnnError),
    /// Of the algorithms cuDNN ranked for a direction, `usable` report success and none is
    /// deterministic (or none at all is usable).
    NoDeterministic {
        direction: &'static str,
        ranked: usize,
        usable: usize,
    },
}

impl From<CudnnError> for PlanError {
    fn from(e: CudnnError) -> Self {
        PlanError::Cudnn(e)
    }
}

impl PlanError {
    /// Whether cuDNN declined the shape rather than failed: no deterministic algorithm, or a
    /// status of the "not supported" family (`CUDNN_STATUS_NOT_SUPPORTED` = 3000 and, from
    /// cuDNN 9, its refinements 3001–3999: `_SHAPE`, `_LAYOUT`, `_DATA_TYPE`, …).
    fn is_unsupported(&self) -> bool {
        match self {
            PlanError::NoDeterministic { .. } => true,
            PlanError::Cudnn(CudnnError(status)) => (3000..4000).contains(&(*status as u32)),
        }
    }

    fn into_error(self, g: &Geometry) -> candle_core::Error {
        let hint = if g.nhwc {
            " (channels-last: LDL_GPU_NHWC=0 runs NCHW)"
        } else {
            ""
        };
        match self {
            PlanError::Cudnn(e) => err(e, "algorithm choice", g),
            PlanError::NoDeterministic {
                direction,
                ranked,
                usable,
            } => candle_core::Error::Msg(format!(
                "cuDNN has no deterministic {direction} algorithm for convolution {g:?}: \
                 {ranked} ranked, {usable} usable{hint}"
            )),
        }
    }
}

/// The environment variable that turns on timed algorithm search.
pub const SEARCH_ENV: &str = "LDL_CUDNN_SEARCH";

/// Whether to choose algorithms by timing them (`cudnnFind*`, PyTorch's `cudnn.benchmark`)
/// rather than by cuDNN's heuristics: `LDL_CUDNN_SEARCH=1`. Off by default because timings
/// vary between processes, so a resumed run could pick other algorithms than the run it
/// continues and stop being bitwise reproducible.
fn search() -> bool {
    static SEARCH: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SEARCH.get_or_init(|| std::env::var(SEARCH_ENV).is_ok_and(|v| v == "1"))
}

/// Builds the plan of `g`: descriptors and, for each direction, the first deterministic
/// algorithm in the heuristics' order that reports success.
fn make_plan(handle: sys::cudnnHandle_t, g: &Geometry) -> std::result::Result<Plan, PlanError> {
    // SAFETY: descriptors are created before use and owned by the returned plan (dropped on
    // every early return through `Plan`'s destructor once it exists).
    unsafe {
        let mut plan = Plan {
            x: result::create_tensor_descriptor()?,
            w: result::create_filter_descriptor()?,
            y: result::create_tensor_descriptor()?,
            conv: [
                result::create_convolution_descriptor()?,
                result::create_convolution_descriptor()?,
                result::create_convolution_descriptor()?,
            ],
            fwd: sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            bwd_data: sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
            bwd_filter: sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
            workspace: [0; 3],
        };
        describe(&plan, g)?;
        choose_algorithms(handle, &mut plan, g)?;
        Ok(plan)
    }
}

/// Sets `plan`'s descriptors for `g`: the input, filter and output tensors in `g`'s layout
/// and type, and the three directions' convolutions (groups, math type).
///
/// # Safety
/// `plan`'s descriptors must have been created by cuDNN.
unsafe fn describe(plan: &Plan, g: &Geometry) -> std::result::Result<(), PlanError> {
    let (ho, wo) = g.out_hw();
    let t = g.cudnn_type();
    let format = if g.nhwc {
        sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC
    } else {
        sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW
    };
    let i = |v: usize| v as std::ffi::c_int;
    // Dimensions are given as N, C, H, W (K, C, R, S) whatever the format.
    result::set_tensor4d_descriptor(plan.x, format, t, [i(g.n), i(g.c), i(g.h), i(g.w)])?;
    let cg = i(g.c / g.groups);
    result::set_filter4d_descriptor(plan.w, t, format, [i(g.cout), cg, i(g.kh), i(g.kw)])?;
    result::set_tensor4d_descriptor(plan.y, format, t, [i(g.n), i(g.cout), i(ho), i(wo)])?;
    for c in plan.conv {
        result::set_convolution2d_descriptor(
            c,
            i(g.pad),
            i(g.pad),
            i(g.stride),
            i(g.stride),
            1,
            1,
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        )?;
        sys::cudnnSetConvolutionGroupCount(c, i(g.groups)).result()?;
        result::set_convolution_math_type(
            c,
            if g.bf16 {
                sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
            } else {
                sys::cudnnMathType_t::CUDNN_FMA_MATH
            },
        )?;
    }
    Ok(())
}

// Each direction's candidates, ranked by timing them when searching, else by cuDNN's
// heuristics (both calls take the same arguments); the first deterministic one that reports
// success is taken.
macro_rules! rank {
    ($find:path, $get:path, $($arg:expr),+ $(,)?) => {
        if search() { $find($($arg),+) } else { $get($($arg),+) }.result()?
    };
}
macro_rules! first_deterministic {
    ($perf:expr, $count:expr, $direction:literal) => {{
        let ranked = &$perf[..$count.max(0) as usize];
        let success = sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS;
        let det = sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC;
        let usable = ranked.iter().filter(|p| p.status == success).count();
        ranked
            .iter()
            .find(|p| p.status == success && p.determinism == det)
            .ok_or(PlanError::NoDeterministic {
                direction: $direction,
                ranked: ranked.len(),
                usable,
            })?
    }};
}

/// Chooses, for each direction of `plan`'s convolution, the first deterministic algorithm in
/// the heuristics' (or, searching, the timings') order that reports success, with its math type
/// and workspace size. For bf16 each direction takes the math type its algorithm was ranked
/// with; f32 keeps FMA math (cuDNN's default math would allow TF32 tensor cores).
///
/// # Safety
/// `plan`'s descriptors must have been set for `g` ([`describe`]).
unsafe fn choose_algorithms(
    handle: sys::cudnnHandle_t,
    plan: &mut Plan,
    g: &Geometry,
) -> std::result::Result<(), PlanError> {
    choose_forward(handle, plan, g)?;
    choose_backward_data(handle, plan, g)?;
    choose_backward_filter(handle, plan, g)
}

/// The forward algorithm of [`choose_algorithms`].
unsafe fn choose_forward(
    handle: sys::cudnnHandle_t,
    plan: &mut Plan,
    g: &Geometry,
) -> std::result::Result<(), PlanError> {
    let mut count = 0;
    let mut fwd = [std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>(); 8];
    rank!(
        sys::cudnnFindConvolutionForwardAlgorithm,
        sys::cudnnGetConvolutionForwardAlgorithm_v7,
        handle,
        plan.x,
        plan.w,
        plan.conv[0],
        plan.y,
        fwd.len() as _,
        &mut count,
        fwd.as_mut_ptr(),
    );
    let f = first_deterministic!(fwd, count, "forward");
    plan.fwd = f.algo;
    if g.bf16 {
        result::set_convolution_math_type(plan.conv[0], f.mathType)?;
    }
    plan.workspace[0] = result::get_convolution_forward_workspace_size(
        handle,
        plan.x,
        plan.w,
        plan.conv[0],
        plan.y,
        plan.fwd,
    )?;
    Ok(())
}

/// The backward-data algorithm of [`choose_algorithms`].
unsafe fn choose_backward_data(
    handle: sys::cudnnHandle_t,
    plan: &mut Plan,
    g: &Geometry,
) -> std::result::Result<(), PlanError> {
    let mut count = 0;
    let mut bd = [std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>(); 6];
    rank!(
        sys::cudnnFindConvolutionBackwardDataAlgorithm,
        sys::cudnnGetConvolutionBackwardDataAlgorithm_v7,
        handle,
        plan.w,
        plan.y,
        plan.conv[1],
        plan.x,
        bd.len() as _,
        &mut count,
        bd.as_mut_ptr(),
    );
    let d = first_deterministic!(bd, count, "backward-data");
    plan.bwd_data = d.algo;
    if g.bf16 {
        result::set_convolution_math_type(plan.conv[1], d.mathType)?;
    }
    plan.workspace[1] = result::get_convolution_backward_data_workspace_size(
        handle,
        plan.w,
        plan.y,
        plan.conv[1],
        plan.x,
        plan.bwd_data,
    )?;
    Ok(())
}

/// The backward-filter algorithm of [`choose_algorithms`].
unsafe fn choose_backward_filter(
    handle: sys::cudnnHandle_t,
    plan: &mut Plan,
    g: &Geometry,
) -> std::result::Result<(), PlanError> {
    let mut count = 0;
    let mut bf = [std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>(); 7];
    rank!(
        sys::cudnnFindConvolutionBackwardFilterAlgorithm,
        sys::cudnnGetConvolutionBackwardFilterAlgorithm_v7,
        handle,
        plan.x,
        plan.y,
        plan.conv[2],
        plan.w,
        bf.len() as _,
        &mut count,
        bf.as_mut_ptr(),
    );
    let fl = first_deterministic!(bf, count, "backward-filter");
    plan.bwd_filter = fl.algo;
    if g.bf16 {
        result::set_convolution_math_type(plan.conv[2], fl.mathType)?;
    }
    plan.workspace[2] = result::get_convolution_backward_filter_workspace_size(
        handle,
        plan.x,
        plan.y,
        plan.conv[2],
        plan.w,
        plan.bwd_filter,
    )?;
    Ok(())
}

/// Which of the three operations to run.
#[derive(Clone, Copy)]
pub(crate) enum Direction {
    Forward,
    BackwardData,
    BackwardFilter,
}

/// Runs `f` on this thread's cuDNN state for `dev`, made (a handle on the device's stream) on
/// first use.
fn with_state<R>(
    dev: &CudaDevice,
    g: &Geometry,
    f: impl FnOnce(&mut State) -> Result<R>,
) -> Result<R> {
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        let key = dev.id();
        if let std::collections::hash_map::Entry::Vacant(e) = state.entry(key) {
            let handle = result::create_handle().map_err(|e| err(e, "handle", g))?;
            let stream = dev.cuda_stream();
            // SAFETY: a live handle and the device's live stream.
            unsafe { result::set_stream(handle, stream.cu_stream() as sys::cudaStream_t) }
                .map_err(|e| err(e, "stream", g))?;
            e.insert(State {
                handle,
                plans: HashMap::new(),
                workspace: None,
                unsupported: Default::default(),
                temps: [None, None, None],
            });
        }
        f(state.get_mut(&key).expect("inserted above"))
    })
}

/// Runs `dir` for geometry `g` with the plan (made on first use) and the thread's workspace:
/// `a` and `b` are the two inputs (x and w; dy and w; x and dy) and `out` the output. A
/// channels-last geometry cuDNN has no (deterministic) algorithm for runs as NCHW with its
/// operands transposed around the call ([`run_transposed`]).
pub(crate) fn run(
    dev: &CudaDevice,
    g: &Geometry,
    dir: Direction,
    a: u64,
    b: u64,
    out: u64,
) -> Result<()> {
    let direct = with_state(dev, g, |st| {
        if st.plans.contains_key(g) {
            return Ok(true);
        }
        if st.unsupported.contains(g) {
            return Ok(false);
        }
        match make_plan(st.handle, g) {
            Ok(plan) => {
                st.plans.insert(*g, plan);
                Ok(true)
            }
            // Only "cuDNN cannot do this" switches layout; any other error is a bug to show.
            Err(e) if g.nhwc && e.is_unsupported() => {
                tracing::warn!(
                    "{}; running it as NCHW with transposed operands",
                    e.into_error(g)
                );
                TRANSPOSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                st.unsupported.insert(*g);
                Ok(false)
            }
            Err(e) => Err(e.into_error(g)),
        }
    })?;
    super::device_call(if direct {
        run_planned(dev, g, dir, a, b, out)
    } else {
        run_transposed(dev, g, dir, a, b, out)
    })
}

/// The `[n, rows, cols]` of the transposes (`kernels.cu`'s `transpose`: `n × rows × cols` to
/// `n × cols × rows`) that turn the channels-last operands of `dir` into NCHW / KCRS ones
/// (`a`, `b`), and the NCHW / KCRS result into the channels-last output.
fn transposes(g: &Geometry, dir: Direction) -> [[usize; 3]; 3] {
    let (ho, wo) = g.out_hw();
    let (hw, ohw, taps, cin) = (g.h * g.w, ho * wo, g.kh * g.kw, g.c / g.groups);
    let x = [g.n, hw, g.c]; // NHWC x → NCHW
    let dy = [g.n, ohw, g.cout]; // NHWC dy → NCHW
    let w = [g.cout, taps, cin]; // KRSC w → KCRS
    match dir {
        Direction::Forward => [x, w, [g.n, g.cout, ohw]],
        Direction::BackwardData => [dy, w, [g.n, g.c, hw]],
        Direction::BackwardFilter => [x, dy, [g.cout, cin, taps]],
    }
}

/// [`run`] of a channels-last geometry cuDNN could not plan: its operands transposed into this
/// thread's temporary buffers, the NCHW convolution, its result transposed into `out`.
fn run_transposed(
    dev: &CudaDevice,
    g: &Geometry,
    dir: Direction,
    a: u64,
    b: u64,
    out: u64,
) -> Result<()> {
    let dtype = g.dtype();
    let [ta, tb, to] = transposes(g, dir);
    let len = |t: [usize; 3]| t.iter().product::<usize>();
    let bytes = [len(ta), len(tb), len(to)].map(|l| l * dtype.size_in_bytes());
    let [pa, pb, po] = with_state(dev, g, |st| {
        let mut at = [0u64; 3];
        for (i, slot) in st.temps.iter_mut().enumerate() {
            at[i] = grown(dev, slot, bytes[i])?;
        }
        Ok(at)
    })?;
    let transpose = |src: u64, dst: u64, [n, rows, cols]: [usize; 3]| {
        super::launch(
            dev,
            super::kernel!(dtype, "transpose"),
            super::elementwise(n * rows * cols),
            &[
                super::Arg::Ptr(src),
                super::Arg::Ptr(dst),
                super::Arg::I32(n as i32),
                super::Arg::I32(rows as i32),
                super::Arg::I32(cols as i32),
            ],
        )
    };
    transpose(a, pa, ta)?;
    transpose(b, pb, tb)?;
    let nchw = Geometry { nhwc: false, ..*g };
    run_planned(dev, &nchw, dir, pa, pb, po)?;
    transpose(po, out, to)
}

/// [`run`] with the plan of `g`, made here if there is none yet.
fn run_planned(
    dev: &CudaDevice,
    g: &Geometry,
    dir: Direction,
    a: u64,
    b: u64,
    out: u64,
) -> Result<()> {
    with_state(dev, g, |st| {
        if !st.plans.contains_key(g) {
            let plan = make_plan(st.handle, g).map_err(|e| e.into_error(g))?;
            st.plans.insert(*g, plan);
        }
        let plan = &st.plans[g];
        let need = plan.workspace[dir as usize];
        // Grown, never shrunk: the largest plan's workspace serves every call.
        let (ws, ws_len) = if need > 0 {
            let at = grown(dev, &mut st.workspace, need)?;
            let len = st.workspace.as_ref().map_or(0, |w| w.0.len());
            (at as *mut std::ffi::c_void, len)
        } else {
            (std::ptr::null_mut(), 0)
        };
        let (one, zero) = (1f32, 0f32);
        let alpha = &one as *const f32 as *const std::ffi::c_void;
        let beta = &zero as *const f32 as *const std::ffi::c_void;
        let p = |v: u64| v as *const std::ffi::c_void;
        let m = |v: u64| v as *mut std::ffi::c_void;
        // SAFETY: the addresses are of live device buffers shaped as the plan's descriptors
        // (checked by the callers), alpha/beta are f32 as cuDNN expects for f32 and bf16 data.
        let r = unsafe {
            match dir {
                Direction::Forward => result::convolution_forward(
                    st.handle,
                    alpha,
                    plan.x,
                    p(a),
                    plan.w,
                    p(b),
                    plan.conv[0],
                    plan.fwd,
                    ws,
                    ws_len,
                    beta,
                    plan.y,
                    m(out),
                ),
                Direction::BackwardData => result::convolution_backward_data(
                    st.handle,
                    alpha,
                    plan.w,
                    p(b),
                    plan.y,
                    p(a),
                    plan.conv[1],
                    plan.bwd_data,
                    ws,
                    ws_len,
                    beta,
                    plan.x,
                    m(out),
                ),
                Direction::BackwardFilter => result::convolution_backward_filter(
                    st.handle,
                    alpha,
                    plan.x,
                    p(a),
                    plan.y,
                    p(b),
                    plan.conv[2],
                    plan.bwd_filter,
                    ws,
                    ws_len,
                    beta,
                    plan.w,
                    m(out),
                ),
            }
        };
        r.map_err(|e| {
            err(
                e,
                match dir {
                    Direction::Forward => "forward",
                    Direction::BackwardData => "backward-data",
                    Direction::BackwardFilter => "backward-filter",
                },
                g,
            )
        })
    })
}

/// The geometry of `x` (`N × C × H × W`) under weights `cout × C/groups × kh × kw`.
pub fn geometry(
    x: &[usize],
    w: &[usize],
    stride: usize,
    pad: usize,
    groups: usize,
    dtype: DType,
) -> Geometry {
    Geometry {
        n: x[0],
        c: x[1],
        h: x[2],
        w: x[3],
        cout: w[0],
        kh: w[2],
        kw: w[3],
        stride,
        pad,
        groups,
        bf16: dtype == DType::BF16,
        nhwc: false,
    }
}

fn check_type(g: &Geometry, dtype: DType, what: &str) -> Result<()> {
    if dtype != g.dtype() {
        candle_core::bail!(
            "conv2d on CUDA: {what} is {dtype:?}, expected {:?} (input and weight must share \
             f32 or bf16)",
            g.dtype()
        )
    }
    Ok(())
}

/// The forward convolution of contiguous storages `x` and `w`: the output storage.
pub fn forward(
    g: &Geometry,
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
) -> Result<CudaStorage> {
    check_type(g, x.dtype(), "the input")?;
    check_type(g, w.dtype(), "the weight")?;
    // The copies (if any) live until the call below is queued.
    let (_x_copy, px) = aligned_ptr(x, lx, "conv2d input")?;
    let (_w_copy, pw) = aligned_ptr(w, lw, "conv2d weight")?;
    let (ho, wo) = g.out_hw();
    let (y, py) = alloc(&x.device, g.dtype(), g.n * g.cout * ho * wo)?;
    run(&x.device, g, Direction::Forward, px, pw, py)?;
    Ok(y)
}

/// Whether `l` starts 16-byte aligned, as cuDNN's tensor-core kernels want their operands and
/// every allocation is; a batch narrowed out of a larger one starts wherever its first image
/// does (an odd number of bf16 values per image leaves it 2-byte aligned).
fn starts_aligned(l: &Layout, dtype: DType) -> bool {
    (l.start_offset() * dtype.size_in_bytes()).is_multiple_of(16)
}

/// The device address of `s` over `l`, from a copy of its own (returned, to be kept alive
/// until the call using it is queued) when `l` does not start aligned.
fn aligned_ptr(s: &CudaStorage, l: &Layout, what: &str) -> Result<(Option<CudaStorage>, u64)> {
    if starts_aligned(l, s.dtype()) {
        return Ok((None, storage_ptr(s, l, what)?));
    }
    // SAFETY: the copy below writes every element.
    let mut copy = unsafe { s.device().alloc_uninit(l.shape(), s.dtype())? };
    s.copy_strided_src(&mut copy, 0, l)?;
    let p = storage_ptr(&copy, &Layout::contiguous(l.shape()), what)?;
    Ok((Some(copy), p))
}

/// A tensor contiguous and starting aligned ([`starts_aligned`]): `t`, or a copy.
fn aligned(t: &Tensor) -> Result<Tensor> {
    let t = t.contiguous()?;
    if starts_aligned(t.layout(), t.dtype()) {
        return Ok(t);
    }
    t.force_contiguous()
}

/// The input gradient `N × C × H × W` from the weights and the output gradient `dy`.
pub fn backward_data(g: &Geometry, w: &Tensor, dy: &Tensor) -> Result<Tensor> {
    check_type(g, dy.dtype(), "the output gradient")?;
    let (w, dy) = (aligned(w)?, aligned(dy)?);
    let (dev, pw) = tensor_ptr(&w, "conv2d weight")?;
    let (_, pd) = tensor_ptr(&dy, "conv2d output gradient")?;
    let (dx, px) = alloc_tensor(&dev, g.dtype(), (g.n, g.c, g.h, g.w))?;
    run(&dev, g, Direction::BackwardData, pd, pw, px)?;
    Ok(dx)
}

/// The weight gradient `cout × C/groups × kh × kw` from the input and the output gradient `dy`.
pub fn backward_filter(g: &Geometry, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    check_type(g, dy.dtype(), "the output gradient")?;
    let (x, dy) = (aligned(x)?, aligned(dy)?);
    let (dev, px) = tensor_ptr(&x, "conv2d input")?;
    let (_, pd) = tensor_ptr(&dy, "conv2d output gradient")?;
    let dims = (g.cout, g.c / g.groups, g.kh, g.kw);
    let (dw, pw) = alloc_tensor(&dev, g.dtype(), dims)?;
    run(&dev, g, Direction::BackwardFilter, px, pd, pw)?;
    Ok(dw)
}

#[cfg(test)]
mod tests {
    use super::{transposes, Direction, Geometry};

    /// `kernels.cu`'s `transpose`: `n × rows × cols` to `n × cols × rows`.
    fn transpose(v: &[f32], [n, rows, cols]: [usize; 3]) -> Vec<f32> {
        let mut out = vec![0.0; v.len()];
        for i in 0..n {
            for r in 0..rows {
                for c in 0..cols {
                    out[(i * cols + c) * rows + r] = v[(i * rows + r) * cols + c];
                }
            }
        }
        out
    }

    /// NCHW `v` (n × c × hw) in NHWC.
    fn nhwc(v: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
        let mut out = vec![0.0; v.len()];
        for i in 0..n {
            for ch in 0..c {
                for k in 0..hw {
                    out[(i * hw + k) * c + ch] = v[(i * c + ch) * hw + k];
                }
            }
        }
        out
    }

    /// KCRS `w` (k × cin × taps) in KRSC: NHWC's rule with taps as the pixels.
    fn krsc(w: &[f32], k: usize, cin: usize, taps: usize) -> Vec<f32> {
        nhwc(w, k, cin, taps)
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32)
            .collect()
    }

    #[test]
    fn transposed_operands_are_the_nchw_ones() {
        let g = Geometry {
            n: 2,
            c: 6,
            h: 5,
            w: 4,
            cout: 8,
            kh: 3,
            kw: 3,
            stride: 2,
            pad: 1,
            groups: 2,
            bf16: true,
            nhwc: true,
        };
        let (ho, wo) = g.out_hw();
        let (hw, ohw, cin, taps) = (g.h * g.w, ho * wo, g.c / g.groups, g.kh * g.kw);
        let x = values(g.n * g.c * hw, 1);
        let dy = values(g.n * g.cout * ohw, 2);
        let w = values(g.cout * cin * taps, 3);
        let (x_cl, dy_cl, w_cl) = (
            nhwc(&x, g.n, g.c, hw),
            nhwc(&dy, g.n, g.cout, ohw),
            krsc(&w, g.cout, cin, taps),
        );
        // (direction, channels-last operands, their NCHW / KCRS forms, the NCHW / KCRS result
        // and its channels-last form)
        let cases = [
            (
                Direction::Forward,
                [&x_cl, &w_cl],
                [&x, &w],
                dy.clone(),
                dy_cl.clone(),
            ),
            (
                Direction::BackwardData,
                [&dy_cl, &w_cl],
                [&dy, &w],
                x.clone(),
                x_cl.clone(),
            ),
            (
                Direction::BackwardFilter,
                [&x_cl, &dy_cl],
                [&x, &dy],
                w.clone(),
                w_cl.clone(),
            ),
        ];
        for (dir, given, want, result, result_cl) in cases {
            let [ta, tb, to] = transposes(&g, dir);
            assert_eq!(&transpose(given[0], ta), want[0], "first operand");
            assert_eq!(&transpose(given[1], tb), want[1], "second operand");
            assert_eq!(transpose(&result, to), result_cl, "result");
        }
    }
}
