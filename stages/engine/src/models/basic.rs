//! The basic residual block (two 3×3 convolutions; the CIFAR ResNets, resnet18 and resnet34)
//! and the pieces every residual block is built of: a "same"-padded convolution, BatchNorm and
//! the shortcut branch.

use super::add_relu::add_relu;
use super::batch_norm::BatchNorm;
use super::conv::Conv2d;
use super::plan::{Block, Skip, Unit};
use crate::error::Result;
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// Shortcut connection type when a block of a CIFAR ResNet `resnet<6n+2>` changes shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Shortcut {
    /// Parameter-free: stride-2 subsampling and zero-padded channels.
    A,
    /// 1×1 convolution + BatchNorm projection.
    #[default]
    B,
}

/// A bias-free convolution with "same" padding for odd kernels.
pub(super) fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    Ok(Conv2d::new(cin, cout, k, stride, k / 2, vb)?)
}

pub(super) fn bn(c: usize, vb: VarBuilder) -> Result<BatchNorm> {
    Ok(BatchNorm::new(c, vb)?)
}

/// The shortcut branch of a residual block.
pub(super) enum Projection {
    /// Identity.
    None,
    /// Option A: subsample by `stride`, zero-pad `pad` channels.
    A { pad: usize, stride: usize },
    /// Option B: 1×1 convolution with `stride` + BatchNorm.
    B(Conv2d, BatchNorm),
}

impl Projection {
    /// A projection whose variables are torchvision's `downsample.0.weight` and
    /// `downsample.1.*` under `vb`.
    pub(super) fn b(cin: usize, cout: usize, stride: usize, vb: &VarBuilder) -> Result<Self> {
        Self::named(cin, cout, stride, vb, "downsample")
    }

    /// An option-B projection whose variables are `<name>.0.weight` and `<name>.1.*` (kuangliu's
    /// `shortcut`).
    pub(super) fn named(
        cin: usize,
        cout: usize,
        stride: usize,
        vb: &VarBuilder,
        name: &str,
    ) -> Result<Self> {
        Ok(Projection::B(
            conv(cin, cout, 1, stride, vb.pp(format!("{name}.0")))?,
            bn(cout, vb.pp(format!("{name}.1")))?,
        ))
    }

    pub(super) fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self {
            Projection::None => Ok(x.clone()),
            Projection::A { pad, stride } => {
                let (_, _, h, w) = x.dims4()?;
                // x[:, :, ::stride, ::stride], then pad channels equally on both sides.
                let idx_h = Tensor::arange_step(0u32, h as u32, *stride as u32, x.device())?;
                let idx_w = Tensor::arange_step(0u32, w as u32, *stride as u32, x.device())?;
                let sub = x.index_select(&idx_h, 2)?.index_select(&idx_w, 3)?;
                sub.pad_with_zeros(1, pad / 2, pad - pad / 2)
            }
            Projection::B(c, b) => b.forward_t(&c.forward(x)?, train),
        }
    }

    /// The shortcut as a step of a planned program.
    pub(super) fn skip(&self) -> Skip {
        match self {
            Projection::None => Skip::Identity,
            Projection::A { pad, stride } => Skip::Subsample {
                pad: *pad,
                stride: *stride,
            },
            Projection::B(c, b) => Skip::Project(unit(c, b, false)),
        }
    }
}

/// A convolution, its BatchNorm and maybe a ReLU as a unit of a planned program.
pub(super) fn unit(conv: &Conv2d, bn: &BatchNorm, relu: bool) -> Unit {
    Unit {
        conv: conv.clone(),
        bn: bn.clone(),
        relu,
    }
}

pub(super) struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    shortcut: Projection,
}

impl BasicBlock {
    pub(super) fn new(
        cin: usize,
        cout: usize,
        stride: usize,
        option: Shortcut,
        vb: VarBuilder,
    ) -> Result<Self> {
        let shortcut = if stride == 1 && cin == cout {
            Projection::None
        } else {
            match option {
                Shortcut::A => Projection::A {
                    pad: cout - cin,
                    stride,
                },
                Shortcut::B => Projection::b(cin, cout, stride, &vb)?,
            }
        };
        Self::with_shortcut(cin, cout, stride, shortcut, vb)
    }

    /// kuangliu/pytorch-cifar's basic block (DLA's): the projection is `shortcut.0`/`shortcut.1`.
    pub(super) fn kuangliu(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let shortcut = if stride == 1 && cin == cout {
            Projection::None
        } else {
            Projection::named(cin, cout, stride, &vb, "shortcut")?
        };
        Self::with_shortcut(cin, cout, stride, shortcut, vb)
    }

    fn with_shortcut(
        cin: usize,
        cout: usize,
        stride: usize,
        shortcut: Projection,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(BasicBlock {
            conv1: conv(cin, cout, 3, stride, vb.pp("conv1"))?,
            bn1: bn(cout, vb.pp("bn1"))?,
            conv2: conv(cout, cout, 3, 1, vb.pp("conv2"))?,
            bn2: bn(cout, vb.pp("bn2"))?,
            shortcut,
        })
    }

    pub(super) fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        let y = self.bn2.forward_t(&self.conv2.forward(&y)?, train)?;
        add_relu(&y, &self.shortcut.forward_t(x, train)?)
    }

    /// The block as a step of a planned program.
    pub(super) fn program(&self) -> Block {
        Block {
            main: vec![
                unit(&self.conv1, &self.bn1, true),
                unit(&self.conv2, &self.bn2, false),
            ],
            skip: self.shortcut.skip(),
        }
    }
}
