//! DenseNet-BC (Huang et al. 2017) as kuangliu/pytorch-cifar defines it (`models/densenet.py`),
//! the paper's Table 5 student `densenet121` (6.95 M parameters at 10 classes): a 3×3 stem of
//! 2·growth channels, four dense stages whose layers are BatchNorm-ReLU-1×1 convolution to
//! 4·growth, BatchNorm-ReLU-3×3 convolution to growth, concatenated in front of their input
//! (`cat([out, x])`), transitions (BatchNorm-ReLU-1×1 convolution to half the channels, rounded
//! down, then 2×2 average pooling) between the stages, and a final BatchNorm-ReLU. Variable
//! names are kuangliu's (`dense1.0.conv1`, `trans1.bn`, `bn`, `linear`).

use super::basic::{bn, conv};
use super::batch_norm::BatchNorm;
use super::conv::Conv2d;
use super::net::Backbone;
use crate::error::Result;
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

/// One bottleneck layer of a dense stage.
struct Layer {
    bn1: BatchNorm,
    conv1: Conv2d,
    bn2: BatchNorm,
    conv2: Conv2d,
}

impl Layer {
    fn new(cin: usize, growth: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Layer {
            bn1: bn(cin, vb.pp("bn1"))?,
            conv1: conv(cin, 4 * growth, 1, 1, vb.pp("conv1"))?,
            bn2: bn(4 * growth, vb.pp("bn2"))?,
            conv2: conv(4 * growth, growth, 3, 1, vb.pp("conv2"))?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self.conv1.forward(&self.bn1.forward_relu_t(x, train)?)?;
        let y = self.conv2.forward(&self.bn2.forward_relu_t(&y, train)?)?;
        Tensor::cat(&[&y, x], 1)
    }
}

/// The transition between two dense stages.
struct Transition {
    bn: BatchNorm,
    conv: Conv2d,
}

impl Transition {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.conv
            .forward(&self.bn.forward_relu_t(x, train)?)?
            .avg_pool2d(2)
    }
}

/// DenseNet-BC up to its last feature maps (after the final BatchNorm-ReLU).
pub struct DenseNet {
    conv1: Conv2d,
    stages: Vec<(Vec<Layer>, Option<Transition>)>,
    bn: BatchNorm,
    feature_dim: usize,
}

impl DenseNet {
    /// `blocks` layers per dense stage adding `growth` channels each, images of `in_channels`;
    /// variables under `vb`.
    pub fn new(
        blocks: [usize; 4],
        growth: usize,
        in_channels: usize,
        vb: &VarBuilder,
    ) -> Result<Self> {
        let mut planes = 2 * growth;
        let mut stages = Vec::new();
        for (s, &n) in blocks.iter().enumerate() {
            let mut layers = Vec::new();
            for i in 0..n {
                layers.push(Layer::new(
                    planes,
                    growth,
                    vb.pp(format!("dense{}.{i}", s + 1)),
                )?);
                planes += growth;
            }
            let transition = if s + 1 < blocks.len() {
                let out = planes / 2;
                let vb = vb.pp(format!("trans{}", s + 1));
                let t = Transition {
                    bn: bn(planes, vb.pp("bn"))?,
                    conv: conv(planes, out, 1, 1, vb.pp("conv"))?,
                };
                planes = out;
                Some(t)
            } else {
                None
            };
            stages.push((layers, transition));
        }
        Ok(DenseNet {
            conv1: conv(in_channels, 2 * growth, 3, 1, vb.pp("conv1"))?,
            stages,
            bn: bn(planes, vb.pp("bn"))?,
            feature_dim: planes,
        })
    }
}

impl Backbone for DenseNet {
    fn feature_dim(&self) -> usize {
        self.feature_dim
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut y = self.conv1.forward(x)?;
        for (layers, transition) in &self.stages {
            for l in layers {
                y = l.forward_t(&y, train)?;
            }
            if let Some(t) = transition {
                y = t.forward_t(&y, train)?;
            }
        }
        self.bn.forward_relu_t(&y, train)
    }
}
