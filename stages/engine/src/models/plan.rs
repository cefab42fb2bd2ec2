//! The training step of the residual networks as one planned program.
//!
//! Through candle's autograd, every op of a training step allocates its output, every
//! gradient reaching a tensor is accumulated as `zeros_like` + `add` (three passes over the
//! activation per graph edge), and the graph is walked and hashed per op. A ResNet's backbone
//! is a fixed sequence of the same few kernels, so here it runs as a program: the forward pass
//! writes each activation the backward needs into a buffer of a tape that lives across steps
//! (no allocation after the first step), and the backward walks the blocks in reverse with the
//! same kernels, fusing what candle runs as separate ops: the residual ReLU's mask goes into
//! the BatchNorm backward passes, and the shortcut's gradient is added in place instead of
//! accumulated through zero tensors.
//!
//! The program's control flow is written once, here, over the [`Kernels`] of a device: the CPU's
//! ([`super::plan_cpu`]: our convolution and BatchNorm kernels over host vectors) and, in a
//! build with the `cuda` feature, CUDA's (`gpu::plan`: cuDNN and the fused kernels over device
//! buffers, f32 or bf16); [`super::net`] picks them for the network's device. Fixed buffers and no host work inside the step are also what
//! capturing the step as a CUDA graph needs.
//!
//! Candle stays at the boundaries: the weights are the model's `Var`s, the backbone's output is
//! a `Var` that the rest of the network (pooling, classifier, the method's loss) differentiates
//! as usual, and [`Planned::backward`] turns that output's gradient into the parameters'
//! gradients in the same `GradStore`. On the CPU the kernels and their order are the autograd
//! path's, so the results are bitwise the same (tested in `tests`).

use super::batch_norm::BatchNorm;
use super::conv::Conv2d;
use super::pool::PoolGeometry;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};

/// Forward passes whose backward has not run; more means a caller never differentiates them.
const MAX_PENDING: usize = 8;

/// A convolution followed by BatchNorm (in batch statistics) and optionally a ReLU.
#[derive(Clone)]
pub struct Unit {
    /// The convolution.
    pub conv: Conv2d,
    /// The BatchNorm after it.
    pub bn: BatchNorm,
    /// Whether a ReLU follows (the last unit of a block ends in the residual ReLU instead).
    pub relu: bool,
}

/// The shortcut branch of a residual block.
#[derive(Clone)]
pub enum Skip {
    /// The block's input itself.
    Identity,
    /// Option A: the input subsampled by `stride`, zero-padded by `pad` channels (half before).
    Subsample {
        /// Channels added.
        pad: usize,
        /// Spatial subsampling.
        stride: usize,
    },
    /// A 1×1 convolution + BatchNorm projection.
    Project(Unit),
}

/// `relu(main(x) + skip(x))`, where `main` is a chain of units.
#[derive(Clone)]
pub struct Block {
    /// The residual branch, first unit first.
    pub main: Vec<Unit>,
    /// The shortcut.
    pub skip: Skip,
}

/// A backbone the plan can run: a stem unit (with its ReLU), a max-pooling for the ImageNet
/// stem, then residual blocks.
#[derive(Clone)]
pub struct Program {
    /// The first convolution, BatchNorm and ReLU.
    pub stem: Unit,
    /// The max-pooling after the stem (ImageNet's), if any.
    pub pool: Option<PoolGeometry>,
    /// The residual blocks in order.
    pub blocks: Vec<Block>,
}

impl Program {
    /// Every convolution of the program, stem first, in the order the forward pass runs them.
    pub fn convs(&self) -> Vec<&Conv2d> {
        let mut convs = vec![&self.stem.conv];
        for b in &self.blocks {
            convs.extend(b.main.iter().map(|u| &u.conv));
            if let Skip::Project(u) = &b.skip {
                convs.push(&u.conv);
            }
        }
        convs
    }
}

/// The kernels a device runs the program with. Buffers hold activations or their gradients in
/// the device's activation type and layout (NCHW; NHWC for CUDA's channels-last option), while
/// what crosses to candle (`load`, `output`) is NCHW; parameters stay the model's `Var`s (f32),
/// and their gradients are added to a `GradStore`.
pub trait Kernels: Send {
    /// An activation or gradient buffer, reused across steps.
    type Buf: Default + Send;
    /// The batch statistics a BatchNorm's backward needs.
    type Stats: Default + Send;

    /// Makes `b` hold `len` elements (their values unspecified), allocating only to grow.
    fn fit(&mut self, b: &mut Self::Buf, len: usize) -> Result<()>;
    /// Copies the values of `t` (any shape, on this device) into `b`.
    fn load(&mut self, t: &Tensor, b: &mut Self::Buf) -> Result<()>;
    /// A new variable of shape `dims` holding the values of `b`: the backbone's output.
    fn output(&mut self, b: &Self::Buf, dims: [usize; 4]) -> Result<Var>;
    /// Called at the start of every forward pass of `program`, before its first kernel: where
    /// a device convolves with copies of the weights (another type or layout), it makes them
    /// here, all at once.
    fn begin_forward(&mut self, program: &Program) -> Result<()> {
        let _ = program;
        Ok(())
    }
    /// `y = conv(x)` for input shape `dims`.
    fn conv_forward(
        &mut self,
        conv: &Conv2d,
        x: &Self::Buf,
        dims: [usize; 4],
        y: &mut Self::Buf,
    ) -> Result<()>;
    /// `y = bn(x)`, then a ReLU when `relu`: in training, in batch statistics (kept in
    /// `stats`; the running ones updated), else in the running statistics.
    #[allow(clippy::too_many_arguments)]
    fn bn_forward(
        &mut self,
        bn: &BatchNorm,
        x: &Self::Buf,
        dims: [usize; 4],
        relu: bool,
        train: bool,
        stats: &mut Self::Stats,
        y: &mut Self::Buf,
    ) -> Result<()>;
    /// BatchNorm's backward from `dy` (zeroed where `mask` is not positive, when given) to
    /// `dx`; adds γ's and β's gradients to `grads`.
    #[allow(clippy::too_many_arguments)]
    fn bn_backward(
        &mut self,
        bn: &BatchNorm,
        x: &Self::Buf,
        dy: &Self::Buf,
        mask: Option<&Self::Buf>,
        stats: &Self::Stats,
        dims: [usize; 4],
        dx: &mut Self::Buf,
        grads: &mut GradStore,
    ) -> Result<()>;
    /// The convolution's backward for input `x` of shape `dims`: the input gradient into `dx`
    /// when given (fitted here), the weight's gradient added to `grads`.
    fn conv_backward(
        &mut self,
        conv: &Conv2d,
        x: &Self::Buf,
        dims: [usize; 4],
        dy: &Self::Buf,
        dx: Option<&mut Self::Buf>,
        grads: &mut GradStore,
    ) -> Result<()>;
    /// `y = max(a + b, 0)`.
    fn add_relu(&mut self, a: &Self::Buf, b: &Self::Buf, y: &mut Self::Buf) -> Result<()>;
    /// `y = max(y + a, 0)`.
    fn add_relu_in_place(&mut self, y: &mut Self::Buf, a: &Self::Buf) -> Result<()>;
    /// `dx += dy` where `out > 0`.
    fn add_masked(&mut self, dx: &mut Self::Buf, dy: &Self::Buf, out: &Self::Buf) -> Result<()>;
    /// `dx += d`.
    fn add(&mut self, dx: &mut Self::Buf, d: &Self::Buf) -> Result<()>;
    /// Option A's shortcut of `x` (shape `dims`): every `stride`-th pixel, channels placed
    /// after `pad / 2` zero channels, `pad` zero channels in all.
    fn subsample(
        &mut self,
        x: &Self::Buf,
        dims: [usize; 4],
        pad: usize,
        stride: usize,
        y: &mut Self::Buf,
    ) -> Result<()>;
    /// `y` = the max-pooling of `x` (shape `dims`) with window `g` (`models::pool`).
    fn max_pool(
        &mut self,
        x: &Self::Buf,
        dims: [usize; 4],
        g: PoolGeometry,
        y: &mut Self::Buf,
    ) -> Result<()>;
    /// `dx` = the input gradient of [`Kernels::max_pool`] over `x` (shape `dims`) from the
    /// output's gradient `dy` (every value of `dx`).
    fn max_pool_backward(
        &mut self,
        x: &Self::Buf,
        dims: [usize; 4],
        g: PoolGeometry,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
    ) -> Result<()>;
    /// The adjoint of [`Kernels::subsample`], masked by the residual ReLU: `dx[sub] += dy`
    /// where `out > 0`, for the channels that came from `x` (shape `dims`).
    #[allow(clippy::too_many_arguments)]
    fn subsample_backward(
        &mut self,
        dx: &mut Self::Buf,
        dims: [usize; 4],
        dy: &Self::Buf,
        out: &Self::Buf,
        pad: usize,
        stride: usize,
    ) -> Result<()>;

    /// Recorded device work, replayed as one launch (a CUDA graph); `()` on devices without.
    type Graph: Send;
    /// Whether passes are recorded once warm and then replayed ([`Kernels::capture`]).
    fn graphs(&self) -> bool {
        false
    }
    /// A count that changes whenever a buffer a recorded graph may address is allocated: a
    /// graph recorded at another count is stale.
    fn generation(&self) -> u64 {
        0
    }
    /// Records the work `f` queues as a graph, without running it. `None` when that work cannot
    /// be replayed as recorded (then nothing ran, and the caller runs `f` again unrecorded).
    fn capture(
        &mut self,
        f: &mut dyn FnMut(&mut Self) -> Result<()>,
    ) -> Result<Option<Self::Graph>> {
        let _ = f;
        Ok(None)
    }
    /// Runs a recorded graph, and adds to `grads` (a backward's) the gradients it writes.
    /// `false` when `grads` holds what the recording did not expect (a gradient from outside
    /// the plan): then nothing ran, and the caller runs the pass unrecorded.
    fn replay(&mut self, graph: &Self::Graph, grads: Option<&mut GradStore>) -> Result<bool> {
        let _ = (graph, grads);
        candle_core::bail!("this device records no graphs")
    }
}

/// What a recorded pass depends on besides its buffers: the input's shape and, for a backward,
/// whether an earlier pass of the same step already wrote the parameters' gradients (then it
/// adds to them).
type Key = ([usize; 4], bool);

/// The recorded passes of one tape. A pass is recorded the second time it runs with the same
/// key and no buffer allocated since the first (which sized every buffer and chose every
/// algorithm), and replayed while both stay; a partial last batch (another shape) runs
/// unrecorded, or gets its own graph when it recurs.
struct Recorder<G> {
    graphs: Vec<(Key, u64, G)>,
    warm: Vec<(Key, u64)>,
    /// Keys whose pass could not be recorded: not tried again.
    never: Vec<Key>,
}

impl<G> Default for Recorder<G> {
    fn default() -> Self {
        Recorder {
            graphs: Vec::new(),
            warm: Vec::new(),
            never: Vec::new(),
        }
    }
}

/// Runs `pass` for `key` on `k`: replays its graph, records and replays it once warm, or runs
/// it. `grads` goes to the pass (a backward's) and to the replay.
fn run_pass<K: Kernels>(
    k: &mut K,
    rec: &mut Recorder<K::Graph>,
    key: Key,
    mut grads: Option<&mut GradStore>,
    pass: &mut dyn FnMut(&mut K, Option<&mut GradStore>) -> Result<()>,
) -> Result<()> {
    if k.graphs() {
        let gen = k.generation();
        // Graphs of buffers since reallocated address freed memory: never replayed again.
        rec.graphs.retain(|(_, g, _)| *g == gen);
        if let Some((_, _, graph)) = rec.graphs.iter().find(|(k2, _, _)| *k2 == key) {
            if k.replay(graph, grads.as_deref_mut())? {
                return Ok(());
            }
        } else if rec.warm.contains(&(key, gen)) && !rec.never.contains(&key) {
            match k.capture(&mut |k| pass(k, grads.as_deref_mut()))? {
                Some(graph) => {
                    // Recording ran nothing: the replay is this pass's run.
                    let ran = k.replay(&graph, grads.as_deref_mut())?;
                    rec.graphs.push((key, gen, graph));
                    if ran {
                        return Ok(());
                    }
                }
                None => rec.never.push(key),
            }
        }
    }
    pass(k, grads)?;
    if k.graphs() {
        let gen = k.generation();
        rec.warm.retain(|(k2, _)| *k2 != key);
        rec.warm.push((key, gen));
    }
    Ok(())
}

/// A planned backbone as the network holds it, whatever its device.
pub trait Planned: Send {
    /// The backbone's output on images `x` in training mode, as a variable whose gradient
    /// [`Planned::backward`] carries into the parameters.
    fn forward(&mut self, x: &Tensor) -> Result<Tensor>;
    /// Adds to `grads` the parameters' gradients of every forward pass since the last call
    /// whose output received a gradient (the others did not reach the loss and are dropped).
    fn backward(&mut self, grads: &mut GradStore) -> Result<()>;
    /// The backbone's output on images `x` in evaluation mode (BatchNorm in its running
    /// statistics), with no gradient: a teacher's forward pass.
    fn infer(&mut self, x: &Tensor) -> Result<Tensor>;
    /// Whether images `x` run through the plan (its device and activation type).
    fn accepts(&self, x: &Tensor) -> bool;
}

/// The environment variable that opts CUDA training into the planned step (`LDL_GPU_PLAN=1`).
/// Until the CUDA kernels of the plan have been checked on a GPU (`tests/gpu_ops.rs`), CUDA
/// training keeps candle's autograd unless asked.
pub const GPU_PLAN_ENV: &str = "LDL_GPU_PLAN";

/// Whether training on `device` should take the planned step: always on the CPU; on CUDA when
/// [`GPU_PLAN_ENV`] is `1`.
pub fn wanted(device: &Device) -> bool {
    device.is_cpu()
        || (device.is_cuda() && std::env::var(GPU_PLAN_ENV).is_ok_and(|v| v.trim() == "1"))
}

/// The environment variable that records the planned CUDA passes as CUDA graphs and replays
/// them (`LDL_GPU_GRAPH=1`, with [`GPU_PLAN_ENV`]); unverified on a GPU so far, as the plan.
pub const GPU_GRAPH_ENV: &str = "LDL_GPU_GRAPH";

/// Whether [`GPU_GRAPH_ENV`] asks for graphs.
pub fn graphs_wanted() -> bool {
    std::env::var(GPU_GRAPH_ENV).is_ok_and(|v| v.trim() == "1")
}

/// The environment variable that keeps the planned CUDA step's activations channels-last
/// (`LDL_GPU_NHWC=1`, with [`GPU_PLAN_ENV`]): NHWC activations, KRSC weight copies, the layout
/// of cuDNN's bf16 tensor-core kernels. Unverified on a GPU so far, as the plan.
pub const GPU_NHWC_ENV: &str = "LDL_GPU_NHWC";

/// How a device runs a plan, beyond its activation type. Only CUDA reads these; the CPU plan
/// ignores them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// Record each warm pass as a CUDA graph and replay it ([`GPU_GRAPH_ENV`]).
    pub graphs: bool,
    /// NHWC activations and KRSC weight copies ([`GPU_NHWC_ENV`]).
    pub channels_last: bool,
}

impl PlanOptions {
    /// The options the environment asks for ([`GPU_GRAPH_ENV`], [`GPU_NHWC_ENV`]).
    pub fn from_env() -> Self {
        PlanOptions {
            graphs: graphs_wanted(),
            channels_last: std::env::var(GPU_NHWC_ENV).is_ok_and(|v| v.trim() == "1"),
        }
    }
}

/// What the backward needs of one unit: its input's shape, the convolution's output, the unit's
/// output (also the ReLU's mask) and the batch statistics. The output of a block's last unit and
/// of its projection is only read by the residual sum, so it goes to a [`Transient`] buffer
/// instead and `act` stays empty.
struct UnitTape<K: Kernels> {
    input: [usize; 4],
    output: [usize; 4],
    conv_out: K::Buf,
    act: K::Buf,
    stats: K::Stats,
}

impl<K: Kernels> Default for UnitTape<K> {
    fn default() -> Self {
        UnitTape {
            input: [0; 4],
            output: [0; 4],
            conv_out: K::Buf::default(),
            act: K::Buf::default(),
            stats: K::Stats::default(),
        }
    }
}

/// Outputs a forward pass reads right after writing them and no backward reads: a block's last
/// BatchNorm output and its projection's, before the residual sum. One pair serves every block
/// of every pass (sized for the largest), instead of a buffer per block in each tape, the
/// memory PyTorch's autograd also frees after the forward.
struct Transient<K: Kernels> {
    main: K::Buf,
    skip: K::Buf,
}

impl<K: Kernels> Default for Transient<K> {
    fn default() -> Self {
        Transient {
            main: K::Buf::default(),
            skip: K::Buf::default(),
        }
    }
}

/// One block's tape: its units', the projection's, and the block's output.
struct BlockTape<K: Kernels> {
    main: Vec<UnitTape<K>>,
    skip: Option<UnitTape<K>>,
    out: K::Buf,
}

impl<K: Kernels> Default for BlockTape<K> {
    fn default() -> Self {
        BlockTape {
            main: Vec::new(),
            skip: None,
            out: K::Buf::default(),
        }
    }
}

/// The activations of one forward pass, its input included.
struct Activations<K: Kernels> {
    images: K::Buf,
    stem: UnitTape<K>,
    /// The stem's pooled output and its shape (with [`Program::pool`]).
    pooled: K::Buf,
    pooled_dims: [usize; 4],
    blocks: Vec<BlockTape<K>>,
}

impl<K: Kernels> Activations<K> {
    /// The first block's input: the stem's output, pooled when the program pools, and its shape.
    fn trunk(&self, program: &Program) -> (&K::Buf, [usize; 4]) {
        match program.pool {
            Some(_) => (&self.pooled, self.pooled_dims),
            None => (&self.stem.act, self.stem.output),
        }
    }
}

/// One forward pass's activations, the `Var` that carries its output into candle, and the
/// recorded passes over these buffers.
struct Tape<K: Kernels> {
    acts: Activations<K>,
    output: Option<Var>,
    forward: Recorder<K::Graph>,
    backward: Recorder<K::Graph>,
}

impl<K: Kernels> Default for Tape<K> {
    fn default() -> Self {
        Tape {
            acts: Activations {
                images: K::Buf::default(),
                stem: UnitTape::default(),
                pooled: K::Buf::default(),
                pooled_dims: [0; 4],
                blocks: Vec::new(),
            },
            output: None,
            forward: Recorder::default(),
            backward: Recorder::default(),
        }
    }
}

/// Gradient buffers of the backward, reused across steps.
struct Scratch<K: Kernels> {
    /// Gradient at the current block's output; becomes the next (earlier) block's.
    dout: K::Buf,
    /// Gradient at the current block's input.
    dx: K::Buf,
    /// Gradient at a convolution's output (after the BatchNorm backward).
    dconv: K::Buf,
    /// Gradient at a unit's output inside the residual branch.
    dact: K::Buf,
    /// The next gradient of [`Scratch::dact`], while that one is read.
    dnext: K::Buf,
    /// Gradient the projection sends to the block's input.
    dskip: K::Buf,
}

impl<K: Kernels> Default for Scratch<K> {
    fn default() -> Self {
        Scratch {
            dout: K::Buf::default(),
            dx: K::Buf::default(),
            dconv: K::Buf::default(),
            dact: K::Buf::default(),
            dnext: K::Buf::default(),
            dskip: K::Buf::default(),
        }
    }
}

/// A program with its tapes on one device: forward passes in training mode, then one backward
/// per loss.
pub struct Plan<K: Kernels> {
    program: Program,
    kernels: K,
    device: Device,
    dtype: DType,
    pending: Vec<Tape<K>>,
    free: Vec<Tape<K>>,
    scratch: Scratch<K>,
    transient: Transient<K>,
    /// The buffers and recorded passes of evaluation-mode passes.
    inference: Option<Inference<K>>,
}

/// The buffers of evaluation-mode passes (a teacher's): nothing is kept for a backward, so a
/// block's input and output alternate between two buffers and its units' outputs between two
/// more, with one convolution output and the plan's [`Transient`]s — a few activations in all,
/// where a training tape holds two per unit.
struct Pool<K: Kernels> {
    images: K::Buf,
    io: [K::Buf; 2],
    units: [K::Buf; 2],
    conv: K::Buf,
    stats: K::Stats,
}

impl<K: Kernels> Default for Pool<K> {
    fn default() -> Self {
        Pool {
            images: K::Buf::default(),
            io: [K::Buf::default(), K::Buf::default()],
            units: [K::Buf::default(), K::Buf::default()],
            conv: K::Buf::default(),
            stats: K::Stats::default(),
        }
    }
}

/// A plan's evaluation-mode passes: their buffers, and the passes recorded over them.
struct Inference<K: Kernels> {
    pool: Pool<K>,
    recorder: Recorder<K::Graph>,
}

impl<K: Kernels> Default for Inference<K> {
    fn default() -> Self {
        Inference {
            pool: Pool::default(),
            recorder: Recorder::default(),
        }
    }
}

/// The output shape of `conv` over an input of shape `x`.
fn conv_output(conv: &Conv2d, x: [usize; 4]) -> Result<[usize; 4]> {
    let g = conv.geometry(x)?;
    let (ho, wo) = g.out_hw();
    Ok([x[0], conv.weight().dim(0)?, ho, wo])
}

impl Unit {
    /// The unit in evaluation mode over `x` of shape `dims`: the convolution into `conv`, the
    /// output into `y`. Returns the output's shape.
    #[allow(clippy::too_many_arguments)]
    fn infer<K: Kernels>(
        &self,
        k: &mut K,
        x: &K::Buf,
        dims: [usize; 4],
        conv: &mut K::Buf,
        stats: &mut K::Stats,
        y: &mut K::Buf,
    ) -> Result<[usize; 4]> {
        let out = conv_output(&self.conv, dims)?;
        k.conv_forward(&self.conv, x, dims, conv)?;
        k.bn_forward(&self.bn, conv, out, self.relu, false, stats, y)?;
        Ok(out)
    }

    /// The unit in training mode over `x`, its activations written into `tape` (shaped by
    /// `shape_forward`), its output into `into` when given (a [`Transient`]) instead of
    /// `tape.act`.
    fn forward<K: Kernels>(
        &self,
        k: &mut K,
        x: &K::Buf,
        tape: &mut UnitTape<K>,
        into: Option<&mut K::Buf>,
    ) -> Result<()> {
        let UnitTape {
            input,
            output,
            conv_out,
            act,
            stats,
        } = tape;
        k.conv_forward(&self.conv, x, *input, conv_out)?;
        let y = into.unwrap_or(act);
        k.bn_forward(&self.bn, conv_out, *output, self.relu, true, stats, y)
    }

    /// The unit's backward: `dy` at its output (masked by `mask > 0` when given), the unit's
    /// input `x`; writes the input gradient into `dx` when given (`dconv` is scratch) and adds
    /// the parameters' gradients to `grads`.
    #[allow(clippy::too_many_arguments)]
    fn backward<K: Kernels>(
        &self,
        k: &mut K,
        tape: &UnitTape<K>,
        x: &K::Buf,
        dy: &K::Buf,
        mask: Option<&K::Buf>,
        dconv: &mut K::Buf,
        dx: Option<&mut K::Buf>,
        grads: &mut GradStore,
    ) -> Result<()> {
        k.bn_backward(
            &self.bn,
            &tape.conv_out,
            dy,
            mask,
            &tape.stats,
            tape.output,
            dconv,
            grads,
        )?;
        k.conv_backward(&self.conv, x, tape.input, dconv, dx, grads)
    }
}

impl Block {
    /// The block in training mode over `x` into `tape` (shaped by `shape_forward`), with the
    /// transient buffers `t`.
    fn forward<K: Kernels>(
        &self,
        k: &mut K,
        x: &K::Buf,
        tape: &mut BlockTape<K>,
        t: &mut Transient<K>,
    ) -> Result<()> {
        let units = self.main.len();
        for i in 0..units {
            let (done, rest) = tape.main.split_at_mut(i);
            let input = match done.last() {
                Some(u) => &u.act,
                None => x,
            };
            let into = (i + 1 == units).then_some(&mut t.main);
            self.main[i].forward(k, input, &mut rest[0], into)?;
        }
        let dims = tape.main[0].input;
        match &self.skip {
            Skip::Identity => k.add_relu(&t.main, x, &mut tape.out),
            Skip::Subsample { pad, stride } => {
                // The shortcut is built in the output buffer, then the sum written over it.
                k.subsample(x, dims, *pad, *stride, &mut tape.out)?;
                k.add_relu_in_place(&mut tape.out, &t.main)
            }
            Skip::Project(unit) => {
                let skip = tape
                    .skip
                    .as_mut()
                    .expect("shape_forward made the projection's tape");
                unit.forward(k, x, skip, Some(&mut t.skip))?;
                k.add_relu(&t.main, &t.skip, &mut tape.out)
            }
        }
    }

    /// The block in evaluation mode over `x` of shape `dims` into `out`, its units' outputs
    /// alternating between `p.units` (the last one's and the projection's in `t`). Returns the
    /// output's shape.
    #[allow(clippy::too_many_arguments)]
    fn infer<K: Kernels>(
        &self,
        k: &mut K,
        x: &K::Buf,
        dims: [usize; 4],
        units: &mut [K::Buf; 2],
        conv: &mut K::Buf,
        stats: &mut K::Stats,
        t: &mut Transient<K>,
        out: &mut K::Buf,
    ) -> Result<[usize; 4]> {
        let n = self.main.len();
        let [u0, u1] = units;
        let mut d = dims;
        for (i, u) in self.main.iter().enumerate() {
            // Unit i reads unit i − 1's output, in u0 when i is odd, and writes the other.
            let (input, y): (&K::Buf, &mut K::Buf) = match (i == 0, i + 1 == n, i % 2 == 1) {
                (true, true, _) => (x, &mut t.main),
                (true, false, _) => (x, &mut *u0),
                (false, true, true) => (&*u0, &mut t.main),
                (false, true, false) => (&*u1, &mut t.main),
                (false, false, true) => (&*u0, &mut *u1),
                (false, false, false) => (&*u1, &mut *u0),
            };
            d = u.infer(k, input, d, conv, stats, y)?;
        }
        k.fit(out, d.iter().product())?;
        match &self.skip {
            Skip::Identity => k.add_relu(&t.main, x, out)?,
            Skip::Subsample { pad, stride } => {
                k.subsample(x, dims, *pad, *stride, out)?;
                k.add_relu_in_place(out, &t.main)?;
            }
            Skip::Project(unit) => {
                unit.infer(k, x, dims, conv, stats, &mut t.skip)?;
                k.add_relu(&t.main, &t.skip, out)?;
            }
        }
        Ok(d)
    }

    /// The block's backward from the gradient at its output (`s.dout`): writes the gradient
    /// at its input `x` (shape `dims`) into `s.dx` and adds the parameters' gradients to
    /// `grads`.
    fn backward<K: Kernels>(
        &self,
        k: &mut K,
        tape: &BlockTape<K>,
        x: &K::Buf,
        dims: [usize; 4],
        s: &mut Scratch<K>,
        grads: &mut GradStore,
    ) -> Result<()> {
        let units = self.main.len();
        for i in (0..units).rev() {
            let input = if i == 0 { x } else { &tape.main[i - 1].act };
            // The last unit's output gradient is the block's, masked by the residual ReLU; the
            // others' is the next unit's input gradient, masked by their own ReLU.
            let (dy, mask) = if i + 1 == units {
                (&s.dout, &tape.out)
            } else {
                (&s.dact, &tape.main[i].act)
            };
            let into = if i == 0 { &mut s.dx } else { &mut s.dnext };
            self.main[i].backward(
                k,
                &tape.main[i],
                input,
                dy,
                Some(mask),
                &mut s.dconv,
                Some(into),
                grads,
            )?;
            if i > 0 {
                std::mem::swap(&mut s.dact, &mut s.dnext);
            }
        }
        // Back to the roles the pass found them in (see `backward_pass`).
        if units.is_multiple_of(2) {
            std::mem::swap(&mut s.dact, &mut s.dnext);
        }
        match &self.skip {
            Skip::Identity => k.add_masked(&mut s.dx, &s.dout, &tape.out),
            Skip::Subsample { pad, stride } => {
                k.subsample_backward(&mut s.dx, dims, &s.dout, &tape.out, *pad, *stride)
            }
            Skip::Project(unit) => {
                let skip = tape.skip.as_ref().expect("the projection's tape");
                unit.backward(
                    k,
                    skip,
                    x,
                    &s.dout,
                    Some(&tape.out),
                    &mut s.dconv,
                    Some(&mut s.dskip),
                    grads,
                )?;
                k.add(&mut s.dx, &s.dskip)
            }
        }
    }
}

impl<K: Kernels> Plan<K> {
    /// A plan of `program` over `kernels`, for images on `device` of type `dtype`; no tape yet.
    pub fn new(program: Program, kernels: K, device: Device, dtype: DType) -> Self {
        Plan {
            program,
            kernels,
            device,
            dtype,
            pending: Vec::new(),
            free: Vec::new(),
            scratch: Scratch::default(),
            transient: Transient::default(),
            inference: None,
        }
    }

    /// Fails unless the plan runs images like `x`.
    fn check(&self, x: &Tensor) -> Result<()> {
        if !self.accepts(x) {
            candle_core::bail!(
                "planned step: images of type {:?} on {:?}, the plan runs {:?} on {:?}",
                x.dtype(),
                x.device().location(),
                self.dtype,
                self.device.location()
            )
        }
        Ok(())
    }
}

/// The training-mode forward pass over images already in `tape.images`, the tape shaped by
/// `shape_forward`.
fn forward_pass<K: Kernels>(
    k: &mut K,
    program: &Program,
    tape: &mut Activations<K>,
    transient: &mut Transient<K>,
) -> Result<()> {
    k.begin_forward(program)?;
    program
        .stem
        .forward(k, &tape.images, &mut tape.stem, None)?;
    if let Some(g) = program.pool {
        k.max_pool(&tape.stem.act, tape.stem.output, g, &mut tape.pooled)?;
    }
    let Activations {
        stem,
        pooled,
        blocks,
        ..
    } = tape;
    for (i, block) in program.blocks.iter().enumerate() {
        let (before, rest) = blocks.split_at_mut(i);
        let x = match (before.last(), program.pool) {
            (Some(b), _) => &b.out,
            (None, Some(_)) => &*pooled,
            (None, None) => &stem.act,
        };
        block.forward(k, x, &mut rest[0], transient)?;
    }
    Ok(())
}

/// An evaluation-mode pass over the images in `p.images` (shape `dims`): the output ends in
/// `p.io[program.blocks.len() % 2]` ([`infer_shape`]).
fn infer_pass<K: Kernels>(
    k: &mut K,
    program: &Program,
    p: &mut Pool<K>,
    t: &mut Transient<K>,
    dims: [usize; 4],
) -> Result<()> {
    k.begin_forward(program)?;
    let Pool {
        images,
        io,
        units,
        conv,
        stats,
    } = p;
    let [a, z] = io;
    let mut d = match program.pool {
        // The stem's output goes to a unit buffer (free until the first block), pooled into `a`.
        Some(g) => {
            let stem = program
                .stem
                .infer(k, images, dims, conv, stats, &mut units[0])?;
            k.max_pool(&units[0], stem, g, a)?;
            g.out_dims(stem)?
        }
        None => program.stem.infer(k, images, dims, conv, stats, a)?,
    };
    for (b, block) in program.blocks.iter().enumerate() {
        let (x, out) = if b % 2 == 0 {
            (&*a, &mut *z)
        } else {
            (&*z, &mut *a)
        };
        d = block.infer(k, x, d, units, conv, stats, t, out)?;
    }
    Ok(())
}

/// The output shape of an evaluation-mode pass over images of shape `dims`, and the index of
/// the pool's `io` buffer it ends in.
fn infer_shape(program: &Program, dims: [usize; 4]) -> Result<([usize; 4], usize)> {
    let mut d = conv_output(&program.stem.conv, dims)?;
    if let Some(g) = program.pool {
        d = g.out_dims(d)?;
    }
    for block in &program.blocks {
        for u in &block.main {
            d = conv_output(&u.conv, d)?;
        }
    }
    Ok((d, program.blocks.len() % 2))
}

/// The backward pass from the gradient at the output in `s.dout`. Leaves the scratch buffers
/// in the roles it found them in, as a replayed graph (which does not swap them) does.
fn backward_pass<K: Kernels>(
    k: &mut K,
    program: &Program,
    tape: &Activations<K>,
    s: &mut Scratch<K>,
    grads: &mut GradStore,
) -> Result<()> {
    for (i, block) in program.blocks.iter().enumerate().rev() {
        let (x, dims) = match i {
            0 => tape.trunk(program),
            _ => (
                &tape.blocks[i - 1].out,
                tape.blocks[i - 1].main.last().expect("units").output,
            ),
        };
        k.fit(&mut s.dx, dims.iter().product())?;
        block.backward(k, &tape.blocks[i], x, dims, s, grads)?;
        std::mem::swap(&mut s.dout, &mut s.dx);
    }
    // Back through the pooling to the stem's output.
    if let Some(g) = program.pool {
        k.fit(&mut s.dx, tape.stem.output.iter().product())?;
        k.max_pool_backward(&tape.stem.act, tape.stem.output, g, &s.dout, &mut s.dx)?;
        std::mem::swap(&mut s.dout, &mut s.dx);
    }
    // The stem: its input is the images, which get no gradient.
    program.stem.backward(
        k,
        &tape.stem,
        &tape.images,
        &s.dout,
        Some(&tape.stem.act),
        &mut s.dconv,
        None,
        grads,
    )?;
    // One swap per block and one for the pooling: undone when their count is odd.
    if (program.blocks.len() + usize::from(program.pool.is_some())) % 2 == 1 {
        std::mem::swap(&mut s.dout, &mut s.dx);
    }
    Ok(())
}

impl<K: Kernels> Planned for Plan<K> {
    fn forward(&mut self, x: &Tensor) -> Result<Tensor> {
        if self.pending.len() >= MAX_PENDING {
            candle_core::bail!(
                "planned training step: {MAX_PENDING} forward passes without a backward (Net::backward)"
            )
        }
        self.check(x)?;
        let dims: [usize; 4] = x.dims4()?.into();
        let (k, program, transient) = (&mut self.kernels, &self.program, &mut self.transient);
        // The i-th forward pass of a step takes the tape the i-th took last step, so that each
        // tape keeps one shape (and its recorded graphs stay valid).
        let mut tape = match self.free.is_empty() {
            true => Tape::default(),
            false => self.free.remove(0),
        };
        k.load(x, &mut tape.acts.images)?;
        let out_dims = shape_forward(k, program, &mut tape.acts, transient, dims)?;
        let acts = &mut tape.acts;
        run_pass(k, &mut tape.forward, (dims, false), None, &mut |k, _| {
            forward_pass(k, program, acts, transient)
        })?;
        let out = match tape.acts.blocks.last() {
            Some(b) => &b.out,
            None => tape.acts.trunk(program).0,
        };
        let var = k.output(out, out_dims)?;
        let t = var.as_tensor().clone();
        tape.output = Some(var);
        self.pending.push(tape);
        Ok(t)
    }

    fn backward(&mut self, grads: &mut GradStore) -> Result<()> {
        // Whether an earlier pass of this step has written the parameters' gradients.
        let mut written = false;
        // This step's tapes go back first, in pass order, so the i-th pass of the next step
        // takes the i-th tape of this one (the tapes a shorter step left unused follow).
        let mut used = Vec::with_capacity(self.pending.len() + self.free.len());
        for mut tape in std::mem::take(&mut self.pending) {
            let var = tape.output.take().expect("a pending tape has its output");
            if let Some(g) = grads.remove(var.as_tensor()) {
                let g = g.to_dtype(self.dtype)?;
                let (k, s, program) = (&mut self.kernels, &mut self.scratch, &self.program);
                k.fit(&mut s.dout, g.elem_count())?;
                k.load(&g, &mut s.dout)?;
                let dims = tape.acts.stem.input;
                let acts = &tape.acts;
                run_pass(
                    k,
                    &mut tape.backward,
                    (dims, written),
                    Some(grads),
                    &mut |k, grads| {
                        let grads = grads.expect("a backward pass has its gradients");
                        backward_pass(k, program, acts, s, grads)
                    },
                )?;
                written = true;
            }
            used.push(tape);
        }
        used.append(&mut self.free);
        self.free = used;
        Ok(())
    }

    fn infer(&mut self, x: &Tensor) -> Result<Tensor> {
        self.check(x)?;
        let dims: [usize; 4] = x.dims4()?.into();
        let (k, program, transient) = (&mut self.kernels, &self.program, &mut self.transient);
        let inference = self.inference.get_or_insert_with(Inference::default);
        let Inference { pool, recorder } = inference;
        k.load(x, &mut pool.images)?;
        let (out_dims, last) = infer_shape(program, dims)?;
        // The output's length, as `output` reads it also after a replayed pass (which runs no
        // host code, so sets no length).
        k.fit(&mut pool.io[last], out_dims.iter().product())?;
        run_pass(k, recorder, (dims, false), None, &mut |k, _| {
            infer_pass(k, program, pool, transient, dims)
        })?;
        Ok(k.output(&pool.io[last], out_dims)?.as_tensor().detach())
    }

    fn accepts(&self, x: &Tensor) -> bool {
        x.dtype() == self.dtype && x.device().same_device(&self.device)
    }
}

/// Sizes the tape for input `dims` without running anything: every unit's shapes, and every
/// buffer fitted to them. The forward pass reads them, and so does what follows a replayed
/// one (which runs no host code): the output and an unrecorded backward. Returns the output's
/// shape.
fn shape_forward<K: Kernels>(
    k: &mut K,
    program: &Program,
    tape: &mut Activations<K>,
    transient: &mut Transient<K>,
    dims: [usize; 4],
) -> Result<[usize; 4]> {
    // Shapes the unit's tape; its output buffer too unless it goes to a transient one. Returns
    // the output's length.
    fn unit<K: Kernels>(
        k: &mut K,
        u: &Unit,
        t: &mut UnitTape<K>,
        x: [usize; 4],
        keep: bool,
    ) -> Result<usize> {
        t.input = x;
        t.output = conv_output(&u.conv, x)?;
        let len = t.output.iter().product();
        k.fit(&mut t.conv_out, len)?;
        if keep {
            k.fit(&mut t.act, len)?;
        }
        Ok(len)
    }
    unit(k, &program.stem, &mut tape.stem, dims, true)?;
    if let Some(g) = program.pool {
        tape.pooled_dims = g.out_dims(tape.stem.output)?;
        k.fit(&mut tape.pooled, tape.pooled_dims.iter().product())?;
    }
    tape.blocks
        .resize_with(program.blocks.len(), BlockTape::default);
    let mut d = tape.trunk(program).1;
    let (mut main, mut skip) = (0, 0);
    for (block, bt) in program.blocks.iter().zip(&mut tape.blocks) {
        let x = d;
        let units = block.main.len();
        bt.main.resize_with(units, UnitTape::default);
        for (i, (u, ut)) in block.main.iter().zip(&mut bt.main).enumerate() {
            let len = unit(k, u, ut, d, i + 1 < units)?;
            if i + 1 == units {
                main = main.max(len);
            }
            d = ut.output;
        }
        if let Skip::Project(u) = &block.skip {
            let t = bt.skip.get_or_insert_with(UnitTape::default);
            skip = skip.max(unit(k, u, t, x, false)?);
        }
        k.fit(&mut bt.out, d.iter().product())?;
    }
    // Sized for the largest use here, so a recorded pass never grows them.
    for (b, len) in [(&mut transient.main, main), (&mut transient.skip, skip)] {
        if len > 0 {
            k.fit(b, len)?;
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::super::{Mode, Model, ModelSpec, Shortcut};
    use crate::losses::cross_entropy;
    use crate::models::testing::random;
    use crate::optim::{Sgd, SgdConfig};
    use candle_core::{DType, Device, Tensor};

    fn spec(arch: &str, width: usize, shortcut: Shortcut) -> ModelSpec {
        ModelSpec {
            width,
            shortcut,
            dropout: 0.25,
            ..ModelSpec::new(arch, 5, 3).unwrap()
        }
    }

    /// Every variable's values, by name.
    fn values(m: &Model) -> Vec<(String, Vec<f32>)> {
        let data = m.vars.data().lock().unwrap();
        let mut v: Vec<_> = data
            .iter()
            .map(|(k, t)| {
                let t = t
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                (k.clone(), t)
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Three SGD steps of the planned model and of the autograd one from the same weights:
    /// the logits of every step, and after them every weight and BatchNorm statistic, are
    /// bitwise equal. Each step takes two forward passes (two half-batches, one loss over
    /// both) and a third whose output never reaches the loss.
    fn assert_same_training(spec: &ModelSpec, hw: usize) {
        let models: Vec<Model> = (0..2)
            .map(|planned| {
                let mut m = Model::new(spec, &Device::Cpu, 7).unwrap();
                assert_eq!(
                    m.net.plan_training((planned == 1).then_some(DType::F32)),
                    planned == 1,
                    "{}",
                    spec.arch
                );
                m
            })
            .collect();
        let mut opts: Vec<Sgd> = models
            .iter()
            .map(|m| {
                Sgd::new(
                    m.trainable(),
                    SgdConfig {
                        momentum: 0.9,
                        weight_decay: 5e-4,
                        nesterov: false,
                    },
                )
            })
            .collect();
        for step in 0..3u64 {
            let x = random(&[6, 3, hw, hw], -2.0..2.0, 100 + step);
            let y = Tensor::new(&[0u32, 1, 2, 3, 4, 0], &Device::Cpu).unwrap();
            let mut logits = Vec::new();
            for (m, opt) in models.iter().zip(&mut opts) {
                let mode = Mode::train(step);
                let a = m
                    .net
                    .forward_mode(&x.narrow(0, 0, 4).unwrap(), mode)
                    .unwrap();
                let b = m
                    .net
                    .forward_mode(&x.narrow(0, 4, 2).unwrap(), mode)
                    .unwrap();
                let unused = m.net.forward_mode(&x, mode).unwrap();
                let l = Tensor::cat(&[&a, &b], 0).unwrap();
                let loss = cross_entropy(&l, &y).unwrap();
                opt.step(&m.net.backward(&loss).unwrap(), 0.1).unwrap();
                logits.push((l.flatten_all().unwrap().to_vec1::<f32>().unwrap(), unused));
            }
            assert_eq!(
                logits[0].0, logits[1].0,
                "{} step {step}: logits",
                spec.arch
            );
        }
        let (a, b) = (values(&models[0]), values(&models[1]));
        for ((name, va), (_, vb)) in a.iter().zip(&b) {
            assert_eq!(va, vb, "{}: `{name}` after three steps", spec.arch);
        }
    }

    #[test]
    fn planned_steps_equal_autograd_bitwise() {
        assert_same_training(&spec("resnet8", 4, Shortcut::A), 8);
        assert_same_training(&spec("resnet14", 4, Shortcut::B), 8);
        assert_same_training(&spec("resnet18", 4, Shortcut::B), 16);
        assert_same_training(&spec("resnet50", 2, Shortcut::B), 16);
        assert_same_training(&spec("resnext29_2x4d", 2, Shortcut::B), 8);
        // The ImageNet stem (7×7 stride-2 convolution, max-pooling) on 20×20 and odd 17×17
        // images.
        assert_same_training(&spec("resnet18_imagenet", 4, Shortcut::B), 20);
        assert_same_training(&spec("resnet50_imagenet", 2, Shortcut::B), 17);
    }

    /// The architectures without a program keep the autograd path.
    #[test]
    fn only_programs_are_planned() {
        for arch in ["densenet_cifar", "dla"] {
            let mut m = Model::new(&ModelSpec::new(arch, 5, 3).unwrap(), &Device::Cpu, 0).unwrap();
            assert!(!m.net.plan_training(Some(DType::F32)), "{arch}");
        }
    }
}
