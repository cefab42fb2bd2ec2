//! The ResNets, selected by name:
//!
//! - `resnet<6n+2>` (`resnet8`, `resnet20`, `resnet56`, `resnet110`, ...): He et al.'s CIFAR
//!   ResNets (2016, §4.2): a 3×3 stem, three stages of n basic blocks with `width`, 2·`width` and
//!   4·`width` channels. Shortcut option A is parameter-free (subsample, zero-pad channels);
//!   option B is a 1×1 convolution + BatchNorm projection, as RepDistiller uses (the paper
//!   gives no model code; its "ResNet56 (0.85M)" is either).
//! - `resnet18`, `resnet34` (basic blocks) and `resnet50`, `resnet101`, `resnet152`, `resnet200`
//!   (bottleneck blocks): the ImageNet ResNets' four stages of `width`·{1, 2, 4, 8} planes, with
//!   the CIFAR stem of kuangliu/pytorch-cifar and RepDistiller (3×3 stride-1 convolution, no
//!   max-pool) or, with `stem = "imagenet"` or the `_imagenet` suffix, torchvision's (7×7
//!   stride-2 convolution, 3×3 stride-2 max-pool). Their shortcuts are always projections.
//!
//! As backbones of a [`Net`](super::net::Net) they end with global average pooling, an optional
//! dropout and the classifier `fc`, and name their variables as torchvision does.

pub use super::basic::Shortcut;
use super::basic::{bn, conv, unit, BasicBlock};
use super::batch_norm::BatchNorm;
use super::bottleneck::{Bottleneck, EXPANSION};
use super::conv::Conv2d;
use super::net::Backbone;
use super::plan;
use super::pool::{max_pool2d, PoolGeometry};
use super::ModelSpec;
use crate::error::{EngineError, Result};
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// The first layers of resnet18 … resnet200.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Stem {
    /// 3×3 stride-1 convolution + BatchNorm + ReLU, for 32×32 images.
    #[default]
    Cifar,
    /// 7×7 stride-2 convolution + BatchNorm + ReLU + 3×3 stride-2 max-pool, for larger images
    /// (a 224×224 image reaches the first stage as 56×56).
    Imagenet,
}

/// The residual block of a ResNet of the ImageNet family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3×3 convolutions.
    Basic,
    /// 1×1 reduce, 3×3, 1×1 expand to 4× the planes.
    Bottleneck,
}

/// A ResNet name, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResNetArch {
    /// `resnet<depth>` with depth = 6n+2: He et al.'s CIFAR ResNet, n basic blocks per stage.
    Cifar {
        /// 6n+2.
        depth: usize,
    },
    /// `resnet18` … `resnet200`, with `_imagenet` for the ImageNet stem.
    Large {
        /// 18, 34, 50, 101, 152 or 200.
        depth: usize,
        /// Basic blocks up to depth 34, bottlenecks from 50.
        block: BlockKind,
        /// Blocks in each of the four stages.
        layers: [usize; 4],
        /// The name carries the `_imagenet` suffix, which selects [`Stem::Imagenet`].
        imagenet: bool,
    },
}

/// The ImageNet family (He et al. 2016, table 1; 200's [3, 24, 36, 3] from He et al.'s
/// "Identity mappings", pre-activation there, post-activation here as timm's `resnet200`).
const LARGE: [(usize, BlockKind, [usize; 4]); 6] = [
    (18, BlockKind::Basic, [2, 2, 2, 2]),
    (34, BlockKind::Basic, [3, 4, 6, 3]),
    (50, BlockKind::Bottleneck, [3, 4, 6, 3]),
    (101, BlockKind::Bottleneck, [3, 4, 23, 3]),
    (152, BlockKind::Bottleneck, [3, 8, 36, 3]),
    (200, BlockKind::Bottleneck, [3, 24, 36, 3]),
];

/// What [`ResNetArch::parse`] accepts, for error messages.
pub const KNOWN_RESNETS: &str = "a CIFAR ResNet resnet<6n+2> (resnet8, resnet14, resnet20, \
resnet32, resnet44, resnet56, resnet110, ...), resnet18, resnet34, resnet50, resnet101, \
resnet152, resnet200, or one of these six with `_imagenet` (resnet18_imagenet, ...)";

impl ResNetArch {
    /// Parses a model name. Depths 50, 152 and 200 are of the form 6n+2 too, but name the
    /// bottleneck ResNets, as everywhere else.
    pub fn parse(name: &str) -> Result<ResNetArch> {
        let unknown =
            || EngineError::Config(format!("unknown model `{name}`: expected {KNOWN_RESNETS}"));
        let (base, imagenet) = match name.strip_suffix("_imagenet") {
            Some(base) => (base, true),
            None => (name, false),
        };
        let depth: usize = base
            .strip_prefix("resnet")
            .and_then(|d| d.parse().ok())
            .ok_or_else(unknown)?;
        // One spelling per model: `usize::from_str` would also take "resnet+20" and "resnet020".
        if base != format!("resnet{depth}") {
            return Err(unknown());
        }
        if let Some(&(_, block, layers)) = LARGE.iter().find(|l| l.0 == depth) {
            return Ok(ResNetArch::Large {
                depth,
                block,
                layers,
                imagenet,
            });
        }
        if !imagenet && depth >= 8 && (depth - 2).is_multiple_of(6) {
            return Ok(ResNetArch::Cifar { depth });
        }
        Err(unknown())
    }

    /// The `width` of the reference network: 16 for the CIFAR ResNets, 64 for the others.
    pub fn default_width(&self) -> usize {
        match self {
            ResNetArch::Cifar { .. } => 16,
            ResNetArch::Large { .. } => 64,
        }
    }
}

/// Depth of a CIFAR ResNet name `resnet<6n+2>` such as `resnet20`; `None` for any other name,
/// including resnet50, resnet152 and resnet200, which are bottleneck ResNets. To check any
/// model name, use [`super::Arch::parse`].
pub fn cifar_depth(arch: &str) -> Option<usize> {
    match ResNetArch::parse(arch) {
        Ok(ResNetArch::Cifar { depth }) => Some(depth),
        _ => None,
    }
}

enum Block {
    Basic(BasicBlock),
    Bottleneck(Bottleneck),
}

impl Block {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self {
            Block::Basic(b) => b.forward_t(x, train),
            Block::Bottleneck(b) => b.forward_t(x, train),
        }
    }

    fn program(&self) -> plan::Block {
        match self {
            Block::Basic(b) => b.program(),
            Block::Bottleneck(b) => b.program(),
        }
    }
}

/// A ResNet of any of the families above, up to its last feature maps.
pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm,
    max_pool: bool,
    blocks: Vec<Block>,
    feature_dim: usize,
}

impl ResNet {
    /// Builds the network `arch` of `spec` under `vb` (the spec's stem and shortcut already
    /// checked against the architecture).
    ///
    /// `spec.width` is the number of channels of the stem and of the first stage; the later
    /// stages double it each time (CIFAR ResNets: width·{1, 2, 4}; the others: width·{1, 2, 4,
    /// 8} planes, times 4 at the output of a bottleneck). The reference networks have
    /// [`ResNetArch::default_width`]: 16 and 64.
    pub fn new(arch: ResNetArch, spec: &ModelSpec, vb: &VarBuilder) -> Result<Self> {
        let w = spec.width;
        let mut blocks = Vec::new();
        let (stem, feature_dim) = match arch {
            ResNetArch::Cifar { depth } => {
                let n = (depth - 2) / 6;
                let mut cin = w;
                for (stage, cout) in [w, 2 * w, 4 * w].into_iter().enumerate() {
                    for i in 0..n {
                        let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                        let vb = vb.pp(format!("layer{}.{}", stage + 1, i));
                        blocks.push(Block::Basic(BasicBlock::new(
                            cin,
                            cout,
                            stride,
                            spec.shortcut,
                            vb,
                        )?));
                        cin = cout;
                    }
                }
                (Stem::Cifar, cin)
            }
            ResNetArch::Large {
                block,
                layers,
                imagenet,
                ..
            } => {
                let mut cin = w;
                for (stage, &n) in layers.iter().enumerate() {
                    let planes = w << stage;
                    for i in 0..n {
                        let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                        let vb = vb.pp(format!("layer{}.{}", stage + 1, i));
                        blocks.push(match block {
                            BlockKind::Basic => {
                                Block::Basic(BasicBlock::new(cin, planes, stride, Shortcut::B, vb)?)
                            }
                            BlockKind::Bottleneck => {
                                Block::Bottleneck(Bottleneck::new(cin, planes, stride, vb)?)
                            }
                        });
                        cin = match block {
                            BlockKind::Basic => planes,
                            BlockKind::Bottleneck => EXPANSION * planes,
                        };
                    }
                }
                let stem = if imagenet { Stem::Imagenet } else { spec.stem };
                (stem, cin)
            }
        };
        let (k, stride) = match stem {
            Stem::Cifar => (3, 1),
            Stem::Imagenet => (7, 2),
        };
        Ok(ResNet {
            conv1: conv(spec.in_channels, w, k, stride, vb.pp("conv1"))?,
            bn1: bn(w, vb.pp("bn1"))?,
            max_pool: stem == Stem::Imagenet,
            blocks,
            feature_dim,
        })
    }
}

impl Backbone for ResNet {
    fn feature_dim(&self) -> usize {
        self.feature_dim
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut y = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        if self.max_pool {
            let g = PoolGeometry::STEM;
            // On CUDA our pooling kernel comes with the planned step's opt-in (see `pool`).
            let cuda_kernel = plan::wanted(y.device());
            y = max_pool2d(&y, g.kernel, g.stride, g.pad, cuda_kernel)?;
        }
        for b in &self.blocks {
            y = b.forward_t(&y, train)?;
        }
        Ok(y)
    }

    /// Every ResNet: the CIFAR stem, or the ImageNet stem with its max-pooling.
    fn program(&self) -> Option<plan::Program> {
        Some(plan::Program {
            stem: unit(&self.conv1, &self.bn1, true),
            pool: self.max_pool.then_some(PoolGeometry::STEM),
            blocks: self.blocks.iter().map(Block::program).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Mode, Model, ModelSpec};
    use super::*;
    use crate::losses::cross_entropy;
    use crate::models::testing::{max_rel, random};
    use crate::optim::{Sgd, SgdConfig};
    use candle_core::{DType, Device, Tensor};

    fn spec(arch: &str, shortcut: Shortcut, classes: usize) -> ModelSpec {
        ModelSpec {
            shortcut,
            ..ModelSpec::new(arch, classes, 3).unwrap()
        }
    }

    fn count(s: &ModelSpec) -> usize {
        Model::new(s, &Device::Cpu, 0).unwrap().parameter_count()
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
            assert_eq!(
                count(&spec(arch, sc, k)),
                expected,
                "{arch} option {sc:?}, {k} classes"
            );
        }
    }

    /// kuangliu/pytorch-cifar and RepDistiller (CIFAR stem) and torchvision (`_imagenet`).
    #[test]
    fn large_parameter_counts_match_the_references() {
        for (arch, k, expected) in [
            ("resnet18", 10, 11_173_962),
            ("resnet18", 100, 11_220_132),
            ("resnet34", 10, 21_282_122),
            ("resnet50", 10, 23_520_842),
            ("resnet18_imagenet", 1000, 11_689_512),
            ("resnet50_imagenet", 1000, 25_557_032),
            ("resnet101_imagenet", 1000, 44_549_160),
            ("resnet152_imagenet", 1000, 60_192_808),
            // Not in torchvision; timm's resnet200 (same blocks) has these 64.7 M.
            ("resnet200_imagenet", 1000, 64_673_832),
        ] {
            assert_eq!(
                count(&spec(arch, Shortcut::B, k)),
                expected,
                "{arch}, {k} classes"
            );
        }
        // The `stem` key and the alias build the same network.
        let keyed = ModelSpec {
            stem: Stem::Imagenet,
            ..spec("resnet18", Shortcut::B, 1000)
        };
        assert_eq!(count(&keyed), 11_689_512);
    }

    /// Every variable carries its torchvision name, and no convolution has a bias.
    #[test]
    fn variables_have_torchvision_names() {
        let s = ModelSpec {
            width: 4,
            ..spec("resnet50_imagenet", Shortcut::B, 5)
        };
        let m = Model::new(&s, &Device::Cpu, 0).unwrap();
        let data = m.vars.data().lock().unwrap();
        let shape = |n: &str| {
            data.get(n)
                .unwrap_or_else(|| panic!("no `{n}`"))
                .dims()
                .to_vec()
        };
        assert_eq!(shape("conv1.weight"), [4, 3, 7, 7]);
        assert_eq!(shape("bn1.running_var"), [4]);
        assert_eq!(shape("layer1.0.conv1.weight"), [4, 4, 1, 1]);
        assert_eq!(shape("layer1.0.conv3.weight"), [16, 4, 1, 1]);
        assert_eq!(shape("layer1.0.downsample.0.weight"), [16, 4, 1, 1]);
        assert_eq!(shape("layer1.0.downsample.1.running_mean"), [16]);
        assert_eq!(shape("layer2.0.downsample.0.weight"), [32, 16, 1, 1]);
        assert_eq!(shape("layer4.2.bn3.weight"), [128]);
        assert_eq!(shape("fc.weight"), [5, 128]);
        assert_eq!(shape("fc.bias"), [5]);
        assert!(!data.contains_key("layer1.1.downsample.0.weight"));
        assert!(!data.contains_key("layer4.3.conv1.weight"));
        for name in data.keys() {
            let last = name.rsplit('.').nth(1).unwrap();
            assert!(
                !(name.ends_with(".bias") && (last.starts_with("conv") || last == "0")),
                "convolution with a bias: {name}"
            );
        }
    }

    #[test]
    fn names_parse() {
        assert_eq!(
            ResNetArch::parse("resnet20").unwrap(),
            ResNetArch::Cifar { depth: 20 }
        );
        assert_eq!(
            ResNetArch::parse("resnet8").unwrap(),
            ResNetArch::Cifar { depth: 8 }
        );
        assert_eq!(
            ResNetArch::parse("resnet50").unwrap(),
            ResNetArch::Large {
                depth: 50,
                block: BlockKind::Bottleneck,
                layers: [3, 4, 6, 3],
                imagenet: false
            }
        );
        assert!(matches!(
            ResNetArch::parse("resnet34_imagenet").unwrap(),
            ResNetArch::Large {
                block: BlockKind::Basic,
                imagenet: true,
                ..
            }
        ));
        assert!(matches!(
            ResNetArch::parse("resnet200").unwrap(),
            ResNetArch::Large {
                layers: [3, 24, 36, 3],
                ..
            }
        ));
        for bad in [
            "resnet9",
            "resnet020",
            "resnet+20",
            "resnet",
            "resnet20_imagenet",
            "vgg16",
            "resnet18_imagenet_imagenet",
        ] {
            let e = ResNetArch::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("resnet152"), "{bad}: {e}");
        }
        assert_eq!(cifar_depth("resnet110"), Some(110));
        assert_eq!(cifar_depth("resnet50"), None);
        assert_eq!(ResNetArch::parse("resnet56").unwrap().default_width(), 16);
        assert_eq!(ResNetArch::parse("resnet101").unwrap().default_width(), 64);
    }

    #[test]
    fn inconsistent_specs_are_refused() {
        for (s, needle) in [
            (spec("resnet18", Shortcut::A, 10), "option A"),
            (
                ModelSpec {
                    stem: Stem::Imagenet,
                    ..spec("resnet20", Shortcut::B, 10)
                },
                "ImageNet stem",
            ),
            (
                ModelSpec {
                    dropout: 1.0,
                    ..spec("resnet8", Shortcut::B, 10)
                },
                "dropout",
            ),
            (
                ModelSpec {
                    width: 0,
                    ..spec("resnet8", Shortcut::B, 10)
                },
                "width 0",
            ),
        ] {
            let e = Model::new(&s, &Device::Cpu, 0)
                .err()
                .expect("refused")
                .to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn forward_shapes_and_deterministic_init() {
        let s = spec("resnet8", Shortcut::A, 7);
        let a = Model::new(&s, &Device::Cpu, 1).unwrap();
        let b = Model::new(&s, &Device::Cpu, 1).unwrap();
        assert_eq!(a.to_safetensors().unwrap(), b.to_safetensors().unwrap());
        let x = Tensor::ones((2, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(a.net.forward_t(&x, false).unwrap().dims(), &[2, 7]);
        assert_eq!(a.net.features_t(&x, true).unwrap().dims(), &[2, 64]);
        assert!(cifar_depth("resnet9").is_none());
    }

    /// One tiny forward per family: logits `N × K`, features `N × D`.
    #[test]
    fn every_family_gives_the_right_shapes() {
        for (arch, width, hw, dim) in [
            ("resnet14", 4, 8, 16),
            ("resnet18", 64, 8, 512),
            ("resnet18_imagenet", 8, 32, 64),
            ("resnet50", 4, 8, 128),
            ("resnet50_imagenet", 4, 32, 128),
        ] {
            let s = ModelSpec {
                width,
                ..spec(arch, Shortcut::B, 3)
            };
            let m = Model::new(&s, &Device::Cpu, 0).unwrap();
            assert_eq!(m.net.feature_dim(), dim, "{arch}");
            let x = random(&[2, 3, hw, hw], -1.0..1.0, 0);
            for train in [true, false] {
                let (f, y) = m
                    .net
                    .features_and_logits(
                        &x,
                        Mode {
                            train,
                            dropout_seed: None,
                        },
                    )
                    .unwrap();
                assert_eq!(f.dims(), &[2, dim], "{arch}");
                assert_eq!(y.dims(), &[2, 3], "{arch}");
            }
        }
    }

    /// A few SGD steps on one tiny batch lower the loss of an ImageNet-stem bottleneck ResNet
    /// with dropout, and every parameter, the stem's included (its only path to the loss is the
    /// max-pool), gets a non-zero gradient. One dropout mask and plain SGD make the objective a
    /// fixed function of the weights; with four images BatchNorm makes it rough, so the test
    /// asks for a trend, not a monotone descent.
    #[test]
    fn bottleneck_and_max_pool_train() {
        let s = ModelSpec {
            width: 4,
            dropout: 0.2,
            ..spec("resnet50_imagenet", Shortcut::B, 4)
        };
        let m = Model::new(&s, &Device::Cpu, 3).unwrap();
        let params: Vec<_> = {
            let data = m.vars.data().lock().unwrap();
            data.iter()
                .filter(|(n, _)| !n.ends_with("running_mean") && !n.ends_with("running_var"))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect()
        };
        let mut opt = Sgd::new(
            params.clone(),
            SgdConfig {
                momentum: 0.0,
                weight_decay: 0.0,
                nesterov: false,
            },
        );
        let x = random(&[4, 3, 64, 64], -1.0..1.0, 1);
        let y = Tensor::new(&[0u32, 1, 2, 3], &Device::Cpu).unwrap();
        let mut losses = Vec::new();
        for step in 0..10 {
            let logits = m.net.forward_mode(&x, Mode::train(0)).unwrap();
            let loss = cross_entropy(&logits, &y).unwrap();
            let grads = loss.backward().unwrap();
            if step == 0 {
                for (name, var) in &params {
                    let g = grads
                        .get(var.as_tensor())
                        .unwrap_or_else(|| panic!("no gradient: {name}"));
                    let norm = g
                        .sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(norm > 0.0 && norm.is_finite(), "{name}: |g|² = {norm}");
                }
            }
            opt.step(&grads, 0.03).unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
        }
        let last: f32 = losses[7..].iter().sum::<f32>() / 3.0;
        assert!(
            last < 0.5 * losses[0],
            "the loss did not decrease: {losses:?}"
        );
    }

    /// Same seed, same output; another seed, another output; p = 0 is no dropout; eval mode is
    /// deterministic and equals the model without dropout; MC dropout differs from eval.
    #[test]
    fn dropout_is_seeded_and_optional() {
        let base = ModelSpec {
            width: 4,
            ..spec("resnet8", Shortcut::A, 5)
        };
        let with = Model::new(
            &ModelSpec {
                dropout: 0.5,
                ..base.clone()
            },
            &Device::Cpu,
            2,
        )
        .unwrap();
        let x = random(&[3, 3, 8, 8], -1.0..1.0, 4);
        let vec = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // A fresh plain model per comparison: training forwards move the running statistics.
        let plain = || Model::new(&base, &Device::Cpu, 2).unwrap();

        let eval = vec(with.net.forward_t(&x, false).unwrap());
        assert_eq!(vec(with.net.forward_mode(&x, Mode::EVAL).unwrap()), eval);
        assert_eq!(vec(plain().net.forward_t(&x, false).unwrap()), eval);
        let mc = vec(with.net.forward_mc(&x, 11).unwrap());
        assert_eq!(vec(with.net.forward_mc(&x, 11).unwrap()), mc);
        assert_ne!(vec(with.net.forward_mc(&x, 12).unwrap()), mc);
        assert_ne!(mc, eval);
        assert_eq!(vec(with.net.forward_t(&x, false).unwrap()), eval);

        // Training: two equal models, same seed, same output; another seed, another output.
        let twin = || {
            Model::new(
                &ModelSpec {
                    dropout: 0.5,
                    ..base.clone()
                },
                &Device::Cpu,
                2,
            )
            .unwrap()
        };
        let t = vec(twin().net.forward_mode(&x, Mode::train(5)).unwrap());
        assert_eq!(vec(twin().net.forward_mode(&x, Mode::train(5)).unwrap()), t);
        assert_ne!(vec(twin().net.forward_mode(&x, Mode::train(6)).unwrap()), t);
        assert!(
            twin().net.forward_t(&x, true).is_err(),
            "training with dropout needs a seed"
        );

        // p = 0: any seed is no dropout, in training and in MC mode.
        assert_eq!(
            vec(plain().net.forward_mode(&x, Mode::train(5)).unwrap()),
            vec(plain().net.forward_t(&x, true).unwrap())
        );
        assert_eq!(vec(plain().net.forward_mc(&x, 5).unwrap()), eval);
    }

    /// The features are the classifier's input: logits = features·Wᵀ + b.
    #[test]
    fn features_are_the_classifier_input() {
        let s = ModelSpec {
            width: 8,
            dropout: 0.3,
            ..spec("resnet18", Shortcut::B, 6)
        };
        let m = Model::new(&s, &Device::Cpu, 5).unwrap();
        let x = random(&[2, 3, 8, 8], -1.0..1.0, 6);
        let (f, y) = m.net.features_and_logits(&x, Mode::EVAL).unwrap();
        let (w, b) = {
            let data = m.vars.data().lock().unwrap();
            (
                data["fc.weight"].as_tensor().clone(),
                data["fc.bias"].as_tensor().clone(),
            )
        };
        let by_hand = f
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(max_rel(&y, &by_hand) < 1e-6);
        assert!(max_rel(&f, &m.net.features_t(&x, false).unwrap()) == 0.0);
        assert_eq!(f.dims(), &[2, 64]);
    }
}
