//! ResNeXt-29 (Xie et al. 2017) as kuangliu/pytorch-cifar defines it (`models/resnext.py`), the
//! paper's Table 5 student `resnext29_4x64d` (27.1 M parameters at 10 classes): a 1×1 stem of 64
//! channels, three stages of three blocks (strides 1, 2, 2), each block a 1×1 convolution to
//! C·d channels, a 3×3 convolution in C groups (the stride sits here), a 1×1 convolution to
//! 2·C·d, BatchNorm after each, and a 1×1 convolution + BatchNorm projection (`shortcut`) when
//! the shape changes; d doubles after every stage. Variable names are kuangliu's.

use super::basic::{bn, conv, unit};
use super::batch_norm::BatchNorm;
use super::bottleneck::Bottleneck;
use super::conv::Conv2d;
use super::net::Backbone;
use super::plan::Program;
use crate::error::Result;
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

/// Output channels of a block per channel of its grouped convolution.
const EXPANSION: usize = 2;
/// Channels of the stem, fixed whatever the cardinality and width (as in the reference).
const STEM: usize = 64;

/// ResNeXt-29 up to its last feature maps.
pub struct ResNeXt {
    conv1: Conv2d,
    bn1: BatchNorm,
    blocks: Vec<Bottleneck>,
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
                let group_width = cardinality * w;
                let cout = EXPANSION * group_width;
                blocks.push(Bottleneck::general(
                    cin,
                    group_width,
                    cout,
                    stride,
                    cardinality,
                    "shortcut",
                    vb,
                )?);
                cin = cout;
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
}

impl Backbone for ResNeXt {
    fn feature_dim(&self) -> usize {
        self.feature_dim
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut y = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        for b in &self.blocks {
            y = b.forward_t(&y, train)?;
        }
        Ok(y)
    }

    fn program(&self) -> Option<Program> {
        Some(Program {
            stem: unit(&self.conv1, &self.bn1, true),
            pool: None,
            blocks: self.blocks.iter().map(Bottleneck::program).collect(),
        })
    }
}
