//! ResNeXt-29 (Xie et al. 2017) as kuangliu/pytorch-cifar defines it (`models/resnext.py`), the
//! paper's Table 5 student `resnext29_4x64d` (27.1 M parameters at 10 classes): a 1×1 stem of 64
//! channels, three stages of three blocks (strides 1, 2, 2), each block a 1×1 convolution to
//! C·d channels, a 3×3 convolution in C groups (the stride sits here), a 1×1 convolution to
//! 2·C·d, BatchNorm after each, and a 1×1 convolution + BatchNorm projection (`shortcut`) when
//! the shape changes; d doubles after every stage. Variable names are kuangliu's.

use super::add_relu::add_relu;
use super::basic::{bn, conv, Projection};
use super::batch_norm::BatchNorm;
use super::conv::Conv2d;
use super::net::Backbone;
use crate::error::Result;
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

/// Output channels of a block per channel of its grouped convolution.
const EXPANSION: usize = 2;
/// Channels of the stem, fixed whatever the cardinality and width (as in the reference).
const STEM: usize = 64;

struct Block {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    conv3: Conv2d,
    bn3: BatchNorm,
    shortcut: Projection,
}

impl Block {
    fn new(
        cin: usize,
        cardinality: usize,
        width: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let group_width = cardinality * width;
        let cout = EXPANSION * group_width;
        let shortcut = if stride == 1 && cin == cout {
            Projection::None
        } else {
            Projection::named(cin, cout, stride, &vb, "shortcut")?
        };
        Ok(Block {
            conv1: conv(cin, group_width, 1, 1, vb.pp("conv1"))?,
            bn1: bn(group_width, vb.pp("bn1"))?,
            conv2: Conv2d::grouped(
                group_width,
                group_width,
                3,
                stride,
                1,
                cardinality,
                vb.pp("conv2"),
            )?,
            bn2: bn(group_width, vb.pp("bn2"))?,
            conv3: conv(group_width, cout, 1, 1, vb.pp("conv3"))?,
            bn3: bn(cout, vb.pp("bn3"))?,
            shortcut,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        let y = self.bn2.forward_relu_t(&self.conv2.forward(&y)?, train)?;
        let y = self.bn3.forward_t(&self.conv3.forward(&y)?, train)?;
        add_relu(&y, &self.shortcut.forward_t(x, train)?)
    }
}

/// ResNeXt-29 up to its last feature maps.
pub struct ResNeXt {
    conv1: Conv2d,
    bn1: BatchNorm,
    blocks: Vec<Block>,
    feature_dim: usize,
}

impl ResNeXt {
    /// `cardinality` groups, bottleneck width `width` in the first stage, images of
    /// `in_channels`; variables under `vb`.
    pub fn new(
        cardinality: usize,
        width: usize,
        in_channels: usize,
        vb: &VarBuilder,
    ) -> Result<Self> {
        let mut blocks = Vec::new();
        let (mut cin, mut w) = (STEM, width);
        for stage in 0..3 {
            for i in 0..3 {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let vb = vb.pp(format!("layer{}.{}", stage + 1, i));
                blocks.push(Block::new(cin, cardinality, w, stride, vb)?);
                cin = EXPANSION * cardinality * w;
            }
            w *= 2;
        }
        Ok(ResNeXt {
            conv1: conv(in_channels, STEM, 1, 1, vb.pp("conv1"))?,
            bn1: bn(STEM, vb.pp("bn1"))?,
            blocks,
            feature_dim: cin,
        })
    }

    /// Channels of the last feature maps: 8·C·d.
    pub fn feature_dim(&self) -> usize {
        self.feature_dim
    }
}

impl Backbone for ResNeXt {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut y = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        for b in &self.blocks {
            y = b.forward_t(&y, train)?;
        }
        Ok(y)
    }
}
