//! CIFAR ResNets of depth 6n+2 (He et al. 2016, §4.2): a 3×3 stem, three stages of n basic
//! blocks with `width`, 2·`width` and 4·`width` channels, global average pooling and a linear
//! classifier. Shortcut option A is parameter-free (subsample, zero-pad channels); option B is a
//! 1×1 convolution + BatchNorm projection, as RepDistiller and the paper's code use.

use super::batch_norm::BatchNorm;
use super::conv::Conv2d;
use super::ModelSpec;
use crate::error::{Result, StageError};
use candle_core::{Module, Tensor, D};
use candle_nn::{linear, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

/// Shortcut connection type when a block changes shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Shortcut {
    /// Parameter-free: stride-2 subsampling and zero-padded channels.
    A,
    /// 1×1 convolution + BatchNorm projection.
    #[default]
    B,
}

fn conv(cin: usize, cout: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    Ok(Conv2d::new(cin, cout, k, stride, k / 2, vb)?)
}

fn bn(c: usize, vb: VarBuilder) -> Result<BatchNorm> {
    Ok(BatchNorm::new(c, vb)?)
}

enum Projection {
    None,
    A { pad: usize, stride: usize },
    B(Conv2d, BatchNorm),
}

struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    shortcut: Projection,
}

impl BasicBlock {
    fn new(
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
                Shortcut::B => Projection::B(
                    conv(cin, cout, 1, stride, vb.pp("downsample.0"))?,
                    bn(cout, vb.pp("downsample.1"))?,
                ),
            }
        };
        Ok(BasicBlock {
            conv1: conv(cin, cout, 3, stride, vb.pp("conv1"))?,
            bn1: bn(cout, vb.pp("bn1"))?,
            conv2: conv(cout, cout, 3, 1, vb.pp("conv2"))?,
            bn2: bn(cout, vb.pp("bn2"))?,
            shortcut,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self.bn1.forward_t(&self.conv1.forward(x)?, train)?.relu()?;
        let y = self.bn2.forward_t(&self.conv2.forward(&y)?, train)?;
        let s = match &self.shortcut {
            Projection::None => x.clone(),
            Projection::A { pad, stride } => {
                let (_, _, h, w) = x.dims4()?;
                // x[:, :, ::stride, ::stride], then pad channels equally on both sides.
                let idx_h = Tensor::arange_step(0u32, h as u32, *stride as u32, x.device())?;
                let idx_w = Tensor::arange_step(0u32, w as u32, *stride as u32, x.device())?;
                let sub = x.index_select(&idx_h, 2)?.index_select(&idx_w, 3)?;
                sub.pad_with_zeros(1, pad / 2, pad - pad / 2)?
            }
            Projection::B(c, b) => b.forward_t(&c.forward(x)?, train)?,
        };
        (y + s)?.relu()
    }
}

/// A CIFAR ResNet.
pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm,
    blocks: Vec<BasicBlock>,
    fc: Linear,
}

/// Depth of a CIFAR ResNet name such as `resnet20`; valid depths are 6n+2.
pub fn cifar_depth(arch: &str) -> Option<usize> {
    let d: usize = arch.strip_prefix("resnet")?.parse().ok()?;
    (d >= 8 && (d - 2).is_multiple_of(6)).then_some(d)
}

impl ResNet {
    /// Builds the network described by `spec` under `vb`.
    pub fn new(spec: &ModelSpec, vb: VarBuilder) -> Result<Self> {
        let depth = cifar_depth(&spec.arch).ok_or_else(|| {
            StageError::Config(format!(
                "unknown model `{}`: expected a CIFAR ResNet resnet<6n+2> such as resnet8, resnet20, resnet56",
                spec.arch
            ))
        })?;
        let n = (depth - 2) / 6;
        let w = spec.width;
        let mut blocks = Vec::new();
        let mut cin = w;
        for (stage, cout) in [w, 2 * w, 4 * w].into_iter().enumerate() {
            for i in 0..n {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let name = format!("layer{}.{}", stage + 1, i);
                blocks.push(BasicBlock::new(
                    cin,
                    cout,
                    stride,
                    spec.shortcut,
                    vb.pp(name),
                )?);
                cin = cout;
            }
        }
        Ok(ResNet {
            conv1: conv(spec.in_channels, w, 3, 1, vb.pp("conv1"))?,
            bn1: bn(w, vb.pp("bn1"))?,
            blocks,
            fc: linear(4 * w, spec.classes, vb.pp("fc"))?,
        })
    }

    /// Penultimate features (after global average pooling), `N × 4·width`.
    pub fn features_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut y = self.bn1.forward_t(&self.conv1.forward(x)?, train)?.relu()?;
        for b in &self.blocks {
            y = b.forward_t(&y, train)?;
        }
        y.mean(D::Minus1)?.mean(D::Minus1)
    }

    /// Logits from penultimate features.
    pub fn head(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.fc.forward(features)
    }

    /// Logits, `N × K`; `train` selects batch statistics (and updates the running ones).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.head(&self.features_t(x, train)?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Model, ModelSpec};
    use super::*;
    use candle_core::{Device, Tensor};

    fn spec(arch: &str, shortcut: Shortcut, classes: usize) -> ModelSpec {
        ModelSpec {
            arch: arch.into(),
            width: 16,
            shortcut,
            classes,
            in_channels: 3,
        }
    }

    #[test]
    fn parameter_counts_match_the_references() {
        for (arch, sc, k, expected) in [
            ("resnet20", Shortcut::A, 10, 269_722),
            ("resnet32", Shortcut::A, 10, 464_154),
            ("resnet56", Shortcut::A, 10, 853_018),
            ("resnet110", Shortcut::A, 10, 1_727_962),
            ("resnet20", Shortcut::B, 100, 278_324),
        ] {
            let m = Model::new(&spec(arch, sc, k), &Device::Cpu, 0).unwrap();
            assert_eq!(
                m.parameter_count(),
                expected,
                "{arch} option {sc:?}, {k} classes"
            );
        }
    }

    #[test]
    fn forward_shapes_and_deterministic_init() {
        let s = spec("resnet8", Shortcut::A, 7);
        let a = Model::new(&s, &Device::Cpu, 1).unwrap();
        let b = Model::new(&s, &Device::Cpu, 1).unwrap();
        assert_eq!(a.to_safetensors().unwrap(), b.to_safetensors().unwrap());
        let x = Tensor::ones((2, 3, 16, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(a.net.forward_t(&x, false).unwrap().dims(), &[2, 7]);
        assert_eq!(a.net.features_t(&x, true).unwrap().dims(), &[2, 64]);
        assert!(cifar_depth("resnet9").is_none());
    }
}
