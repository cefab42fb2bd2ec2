//! The bottleneck residual block of resnet50 … resnet200 (He et al. 2016, §4.1): a 1×1
//! convolution down to `planes` channels, a 3×3 convolution, a 1×1 convolution up to
//! 4·`planes`, each followed by BatchNorm, with a 1×1 convolution + BatchNorm projection when the
//! shape changes. The stride sits on the 3×3 convolution, as in torchvision and
//! kuangliu/pytorch-cifar ("ResNet v1.5"); parameter names are torchvision's. ResNeXt's block is
//! the same with a grouped 3×3 convolution, other widths and kuangliu's `shortcut` name
//! ([`Bottleneck::general`]).

use super::add_relu::add_relu;
use super::basic::{bn, conv, unit, Projection};
use super::batch_norm::BatchNorm;
use super::conv::Conv2d;
use super::plan::Block;
use crate::error::Result;
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

/// Output channels per `planes` of a bottleneck block.
pub const EXPANSION: usize = 4;

/// A bottleneck block: `cin` → 4·`planes` channels, spatial size divided by `stride`.
pub(super) struct Bottleneck {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    conv3: Conv2d,
    bn3: BatchNorm,
    shortcut: Projection,
}

impl Bottleneck {
    /// The block's variables live under `vb` (`conv1.weight`, `bn1.*`, ..., `downsample.0.weight`,
    /// `downsample.1.*`).
    pub(super) fn new(cin: usize, planes: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        Self::general(cin, planes, EXPANSION * planes, stride, 1, "downsample", vb)
    }

    /// `cin` → `mid` (1×1) → `mid` (3×3 in `groups` groups, with `stride`) → `cout` (1×1), the
    /// projection's variables named `<projection>.0`, `<projection>.1`.
    pub(super) fn general(
        cin: usize,
        mid: usize,
        cout: usize,
        stride: usize,
        groups: usize,
        projection: &str,
        vb: VarBuilder,
    ) -> Result<Self> {
        let shortcut = if stride == 1 && cin == cout {
            Projection::None
        } else {
            Projection::named(cin, cout, stride, &vb, projection)?
        };
        Ok(Bottleneck {
            conv1: conv(cin, mid, 1, 1, vb.pp("conv1"))?,
            bn1: bn(mid, vb.pp("bn1"))?,
            conv2: Conv2d::grouped(mid, mid, 3, stride, 1, groups, vb.pp("conv2"))?,
            bn2: bn(mid, vb.pp("bn2"))?,
            conv3: conv(mid, cout, 1, 1, vb.pp("conv3"))?,
            bn3: bn(cout, vb.pp("bn3"))?,
            shortcut,
        })
    }

    pub(super) fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        let y = self.bn2.forward_relu_t(&self.conv2.forward(&y)?, train)?;
        let y = self.bn3.forward_t(&self.conv3.forward(&y)?, train)?;
        add_relu(&y, &self.shortcut.forward_t(x, train)?)
    }

    /// The block as a step of a planned program.
    pub(super) fn program(&self) -> Block {
        Block {
            main: vec![
                unit(&self.conv1, &self.bn1, true),
                unit(&self.conv2, &self.bn2, true),
                unit(&self.conv3, &self.bn3, false),
            ],
            skip: self.shortcut.skip(),
        }
    }
}
