//! The training step of the residual networks as one planned program on the CPU.
//!
//! Through candle's autograd, every op of a training step allocates its output, every
//! gradient reaching a tensor is accumulated as `zeros_like` + `add` (three passes over the
//! activation per graph edge), and the graph is walked and hashed per op. A ResNet's backbone
//! is a fixed sequence of the same few kernels, so here it runs as a program: the forward pass
//! writes each activation the backward needs into a buffer of a tape that lives across steps
//! (no allocation after the first step), and the backward walks the blocks in reverse with the
//! same kernels ([`super::conv`], [`super::batch_norm`]), fusing what candle runs as separate
//! ops: the residual ReLU's mask goes into the BatchNorm backward passes, and the shortcut's
//! gradient is added in place instead of accumulated through zero tensors.
//!
//! Candle stays at the boundaries: the weights are the model's `Var`s, the backbone's output is
//! a `Var` that the rest of the network (pooling, classifier, the method's loss) differentiates
//! as usual, and [`Plan::backward`] turns that output's gradient into the parameters' gradients
//! in the same `GradStore`. The kernels and their order are the autograd path's, so the
//! results are bitwise the same (tested in `tests`).

use super::add_relu::add_relu_into;
use super::batch_norm::{backward_into as bn_backward, normalize_into, BatchNorm};
use super::conv::Conv2d;
use super::cpu::{relu_grad, with_f32};
use crate::profile::{timer, Section};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use rayon::prelude::*;

/// Elements per parallel task of the elementwise passes.
const CHUNK: usize = 1 << 15;

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

/// A backbone the plan can run: a stem unit (with its ReLU), then residual blocks.
#[derive(Clone)]
pub struct Program {
    /// The first convolution, BatchNorm and ReLU.
    pub stem: Unit,
    /// The residual blocks in order.
    pub blocks: Vec<Block>,
}

/// What the backward needs of one unit: its input's shape, the convolution's output, the unit's
/// output (also the ReLU's mask) and the batch statistics.
#[derive(Default)]
struct UnitTape {
    input: [usize; 4],
    output: [usize; 4],
    conv_out: Vec<f32>,
    act: Vec<f32>,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

/// One block's tape: its units', the projection's, and the block's output.
#[derive(Default)]
struct BlockTape {
    main: Vec<UnitTape>,
    skip: Option<UnitTape>,
    out: Vec<f32>,
}

/// The activations of one forward pass, and the `Var` that carries its output into candle.
#[derive(Default)]
struct Tape {
    images: Option<Tensor>,
    stem: UnitTape,
    blocks: Vec<BlockTape>,
    output: Option<Var>,
}

/// Gradient buffers of the backward, reused across steps.
#[derive(Default)]
struct Scratch {
    /// Gradient at the current block's output; becomes the next (earlier) block's.
    dout: Vec<f32>,
    /// Gradient at the current block's input.
    dx: Vec<f32>,
    /// Gradient at a convolution's output (after the BatchNorm backward).
    dconv: Vec<f32>,
    /// Gradient at a unit's output inside the residual branch.
    dact: Vec<f32>,
    /// The next gradient of [`Scratch::dact`], while that one is read.
    dnext: Vec<f32>,
    /// Gradient the projection sends to the block's input.
    dskip: Vec<f32>,
}

/// A program with its tapes: forward passes in training mode, then one backward per loss.
pub struct Plan {
    program: Program,
    pending: Vec<Tape>,
    free: Vec<Tape>,
    scratch: Scratch,
}

/// Makes `v` exactly `len` long, allocating only when it grows.
fn fit(v: &mut Vec<f32>, len: usize) {
    v.resize(len, 0.0);
}

/// The output shape of `conv` over an input of shape `x`.
fn conv_output(conv: &Conv2d, x: [usize; 4]) -> Result<[usize; 4]> {
    let g = conv.geometry(x)?;
    let (ho, wo) = g.out_hw();
    Ok([x[0], conv.weight().dim(0)?, ho, wo])
}

impl Unit {
    /// The unit over `x` (shape `dims`), its activations written into `tape`.
    fn forward(&self, x: &[f32], dims: [usize; 4], tape: &mut UnitTape) -> Result<()> {
        let g = self.conv.geometry(dims)?;
        let out = conv_output(&self.conv, dims)?;
        let [n, c, h, w] = out;
        tape.input = dims;
        tape.output = out;
        fit(&mut tape.conv_out, g.output_len());
        fit(&mut tape.act, g.output_len());
        with_f32(self.conv.weight(), "conv2d weight", |wt| {
            g.forward_into(x, wt, &mut tape.conv_out)
        })?;
        let _t = timer(Section::BatchNormForward);
        let (mean, inv_std) = self.bn.batch_statistics(&tape.conv_out, [n, c, h * w])?;
        let (gamma, beta) = self.bn.affine();
        with_f32(gamma, "batch norm", |gamma| {
            with_f32(beta, "batch norm", |beta| {
                normalize_into(
                    &tape.conv_out,
                    gamma,
                    beta,
                    &mean,
                    &inv_std,
                    self.relu,
                    c,
                    h * w,
                    &mut tape.act,
                )
            })
        })??;
        tape.mean = mean;
        tape.inv_std = inv_std;
        Ok(())
    }

    /// The unit's backward: `dy` at its output (masked by `mask > 0` when given), the unit's
    /// input `x`; writes the input gradient into `dx` when given (`dconv` is scratch) and adds
    /// the parameters' gradients to `grads`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        tape: &UnitTape,
        x: &[f32],
        dy: &[f32],
        mask: Option<&[f32]>,
        dconv: &mut Vec<f32>,
        dx: Option<&mut Vec<f32>>,
        grads: &mut GradStore,
    ) -> Result<()> {
        let [n, c, h, w] = tape.output;
        fit(dconv, tape.conv_out.len());
        let (gamma, beta) = self.bn.affine();
        let (dgamma, dbeta) = with_f32(gamma, "batch norm", |g| {
            bn_backward(
                &tape.conv_out,
                dy,
                mask,
                g,
                &tape.mean,
                &tape.inv_std,
                true,
                [n, c, h * w],
                dconv,
            )
        })?;
        accumulate(grads, gamma, Tensor::from_vec(dgamma, c, &Device::Cpu)?)?;
        accumulate(grads, beta, Tensor::from_vec(dbeta, c, &Device::Cpu)?)?;
        let g = self.conv.geometry(tape.input)?;
        let dx = dx.map(|d| {
            fit(d, tape.input.iter().product());
            d.as_mut_slice()
        });
        let weight = self.conv.weight();
        let dw = with_f32(weight, "conv2d weight", |wt| {
            g.backward_into(x, wt, dconv, dx)
        })?;
        accumulate(
            grads,
            weight,
            Tensor::from_vec(dw, weight.shape(), &Device::Cpu)?,
        )
    }
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

/// `dx += dy` where `out > 0` (the residual ReLU's gradient reaching an identity shortcut).
fn add_masked(dx: &mut [f32], dy: &[f32], out: &[f32]) {
    let _t = timer(Section::AddReluBackward);
    dx.par_chunks_mut(CHUNK)
        .zip(dy.par_chunks(CHUNK).zip(out.par_chunks(CHUNK)))
        .for_each(|(d, (g, y))| {
            for ((d, &g), &y) in d.iter_mut().zip(g).zip(y) {
                // candle's accumulation adds an exact 0 where the mask is off: the same sum.
                *d += relu_grad(g, y);
            }
        });
}

/// Option A's shortcut of `x` (`[n, c, h, w]`): every `stride`-th pixel, channels placed after
/// `pad / 2` zero channels, `pad` zero channels in all.
fn subsample_into(x: &[f32], [_, c, h, w]: [usize; 4], pad: usize, stride: usize, y: &mut [f32]) {
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
}

/// The adjoint of [`subsample_into`], masked by the residual ReLU: `dx[sub] += dy` where
/// `out > 0`, for the channels that came from `x`.
fn subsample_backward(
    dx: &mut [f32],
    [n, c, h, w]: [usize; 4],
    dy: &[f32],
    out: &[f32],
    pad: usize,
    stride: usize,
) {
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
}

impl Block {
    /// The block over `x` (shape `dims`) into `tape`; returns the output's shape.
    fn forward(&self, x: &[f32], dims: [usize; 4], tape: &mut BlockTape) -> Result<[usize; 4]> {
        tape.main.resize_with(self.main.len(), UnitTape::default);
        let mut d = dims;
        for (i, unit) in self.main.iter().enumerate() {
            let (done, rest) = tape.main.split_at_mut(i);
            let input: &[f32] = match done.last() {
                Some(u) => &u.act,
                None => x,
            };
            unit.forward(input, d, &mut rest[0])?;
            d = rest[0].output;
        }
        let last = tape.main.last().expect("a block has units");
        fit(&mut tape.out, last.act.len());
        match &self.skip {
            Skip::Identity => add_relu_into(&last.act, x, &mut tape.out),
            Skip::Subsample { pad, stride } => {
                // The shortcut is built in the output buffer, then the sum written over it.
                subsample_into(x, dims, *pad, *stride, &mut tape.out);
                add_relu_in_place(&mut tape.out, &last.act);
            }
            Skip::Project(unit) => {
                let skip = tape.skip.get_or_insert_with(UnitTape::default);
                unit.forward(x, dims, skip)?;
                add_relu_into(&last.act, &skip.act, &mut tape.out);
            }
        }
        Ok(d)
    }

    /// The block's backward from the gradient at its output (`s.dout`): writes the gradient
    /// at its input `x` (shape `dims`) into `s.dx` and adds the parameters' gradients to
    /// `grads`.
    fn backward(
        &self,
        tape: &BlockTape,
        x: &[f32],
        dims: [usize; 4],
        s: &mut Scratch,
        grads: &mut GradStore,
    ) -> Result<()> {
        let units = self.main.len();
        for i in (0..units).rev() {
            let input: &[f32] = if i == 0 { x } else { &tape.main[i - 1].act };
            // The last unit's output gradient is the block's, masked by the residual ReLU; the
            // others' is the next unit's input gradient, masked by their own ReLU.
            let (dy, mask): (&[f32], &[f32]) = if i + 1 == units {
                (&s.dout, &tape.out)
            } else {
                (&s.dact, &tape.main[i].act)
            };
            let into = if i == 0 { &mut s.dx } else { &mut s.dnext };
            self.main[i].backward(
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
        match &self.skip {
            Skip::Identity => add_masked(&mut s.dx, &s.dout, &tape.out),
            Skip::Subsample { pad, stride } => {
                subsample_backward(&mut s.dx, dims, &s.dout, &tape.out, *pad, *stride)
            }
            Skip::Project(unit) => {
                let skip = tape.skip.as_ref().expect("the projection's tape");
                unit.backward(
                    skip,
                    x,
                    &s.dout,
                    Some(&tape.out),
                    &mut s.dconv,
                    Some(&mut s.dskip),
                    grads,
                )?;
                let _t = timer(Section::AddReluBackward);
                s.dx.par_chunks_mut(CHUNK)
                    .zip(s.dskip.par_chunks(CHUNK))
                    .for_each(|(d, g)| {
                        for (d, &g) in d.iter_mut().zip(g) {
                            *d += g;
                        }
                    });
            }
        }
        Ok(())
    }
}

/// `out = max(out + a, 0)` elementwise.
fn add_relu_in_place(out: &mut [f32], a: &[f32]) {
    let _t = timer(Section::AddReluForward);
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .for_each(|(o, a)| {
            for (o, &p) in o.iter_mut().zip(a) {
                *o = (p + *o).max(0.0);
            }
        });
}

impl Plan {
    /// A plan of `program`, with no tape yet.
    pub fn new(program: Program) -> Self {
        Plan {
            program,
            pending: Vec::new(),
            free: Vec::new(),
            scratch: Scratch::default(),
        }
    }

    /// The backbone's output on images `x` (CPU, `f32`) in training mode, as a variable whose
    /// gradient [`Plan::backward`] carries into the parameters.
    pub fn forward(&mut self, x: &Tensor) -> Result<Tensor> {
        if self.pending.len() >= MAX_PENDING {
            candle_core::bail!(
                "planned training step: {MAX_PENDING} forward passes without a backward (Net::backward)"
            )
        }
        let dims: [usize; 4] = x.dims4()?.into();
        let mut tape = self.free.pop().unwrap_or_default();
        tape.images = Some(x.clone());
        with_f32(x, "planned forward input", |x| {
            self.program.stem.forward(x, dims, &mut tape.stem)
        })??;
        tape.blocks
            .resize_with(self.program.blocks.len(), BlockTape::default);
        let mut d = tape.stem.output;
        for (i, block) in self.program.blocks.iter().enumerate() {
            let (before, rest) = tape.blocks.split_at_mut(i);
            let x: &[f32] = match before.last() {
                Some(b) => &b.out,
                None => &tape.stem.act,
            };
            d = block.forward(x, d, &mut rest[0])?;
        }
        let out = match tape.blocks.last() {
            Some(b) => &b.out,
            None => &tape.stem.act,
        };
        let var = Var::from_vec(out.clone(), d.to_vec(), &Device::Cpu)?;
        let t = var.as_tensor().clone();
        tape.output = Some(var);
        self.pending.push(tape);
        Ok(t)
    }

    /// Adds to `grads` the parameters' gradients of every forward pass since the last call
    /// whose output received a gradient (the others did not reach the loss and are dropped).
    pub fn backward(&mut self, grads: &mut GradStore) -> Result<()> {
        for mut tape in std::mem::take(&mut self.pending) {
            let var = tape.output.take().expect("a pending tape has its output");
            if let Some(g) = grads.remove(var.as_tensor()) {
                let g = g.to_dtype(DType::F32)?;
                let s = &mut self.scratch;
                fit(&mut s.dout, g.elem_count());
                with_f32(&g, "planned backward", |g| s.dout.copy_from_slice(g))?;
                self.backward_tape(&tape, grads)?;
            }
            tape.images = None;
            self.free.push(tape);
        }
        Ok(())
    }

    fn backward_tape(&mut self, tape: &Tape, grads: &mut GradStore) -> Result<()> {
        let s = &mut self.scratch;
        for (i, block) in self.program.blocks.iter().enumerate().rev() {
            let (x, dims): (&[f32], [usize; 4]) = match i {
                0 => (&tape.stem.act, tape.stem.output),
                _ => (
                    &tape.blocks[i - 1].out,
                    tape.blocks[i - 1].main.last().expect("units").output,
                ),
            };
            fit(&mut s.dx, x.len());
            block.backward(&tape.blocks[i], x, dims, s, grads)?;
            std::mem::swap(&mut s.dout, &mut s.dx);
        }
        // The stem: its input is the images, which get no gradient.
        let images = tape.images.as_ref().expect("a pending tape has its images");
        with_f32(images, "planned backward input", |x| {
            self.program.stem.backward(
                &tape.stem,
                x,
                &s.dout,
                Some(&tape.stem.act),
                &mut s.dconv,
                None,
                grads,
            )
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Mode, Model, ModelSpec, Shortcut};
    use crate::losses::cross_entropy;
    use crate::models::testing::random;
    use crate::optim::{Sgd, SgdConfig};
    use candle_core::{Device, Tensor};

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
                    m.net.plan_training(planned == 1),
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
    }

    /// The ImageNet stem and the architectures without a program keep the autograd path.
    #[test]
    fn only_programs_are_planned() {
        for arch in ["resnet18_imagenet", "densenet_cifar", "dla"] {
            let mut m = Model::new(&ModelSpec::new(arch, 5, 3).unwrap(), &Device::Cpu, 0).unwrap();
            assert!(!m.net.plan_training(true), "{arch}");
        }
    }
}
