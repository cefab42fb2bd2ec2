//! Model names: every architecture a stage can ask for by name, parsed into what builds it.
//!
//! - the ResNets ([`super::resnet`]): `resnet<6n+2>`, `resnet18` … `resnet200`, `_imagenet`;
//! - `resnext29_<C>x<d>d` ([`super::resnext`]): kuangliu/pytorch-cifar's ResNeXt-29 of
//!   cardinality C and bottleneck width d (`resnext29_4x64d` is the paper's Table 5 student);
//! - `densenet121`, `densenet169`, `densenet201`, `densenet161`, `densenet_cifar`
//!   ([`super::densenet`]);
//! - `dla` ([`super::dla`]): kuangliu/pytorch-cifar's Deep Layer Aggregation network.
//!
//! `width` scales each family (see [`Arch::default_width`]); the reference networks are at
//! their default widths.

use super::densenet::DenseNet;
use super::dla::Dla;
use super::dropout::Dropout;
use super::net::{Backbone, Net};
use super::resnet::{ResNet, ResNetArch};
use super::resnext::ResNeXt;
use super::{ModelSpec, Shortcut, Stem};
use crate::error::{EngineError, Result};
use candle_nn::VarBuilder;

/// What [`Arch::parse`] accepts, for error messages.
pub const KNOWN_MODELS: &str = "a ResNet (a CIFAR ResNet resnet<6n+2>: resnet8, resnet14, \
resnet20, resnet32, resnet44, resnet56, resnet110, ...; resnet18, resnet34, resnet50, resnet101, \
resnet152, resnet200, or one of these six with `_imagenet`), resnext29_<C>x<d>d (resnext29_2x64d, \
resnext29_4x64d, resnext29_8x64d, resnext29_32x4d, ...), densenet121, densenet169, densenet201, \
densenet161, densenet_cifar, or dla";

/// kuangliu/pytorch-cifar's DenseNets: name, blocks per dense stage, growth rate.
pub const DENSENETS: [(&str, [usize; 4], usize); 5] = [
    ("densenet121", [6, 12, 24, 16], 32),
    ("densenet169", [6, 12, 32, 32], 32),
    ("densenet201", [6, 12, 48, 32], 32),
    ("densenet161", [6, 12, 36, 24], 48),
    ("densenet_cifar", [6, 12, 24, 16], 12),
];

/// An architecture name, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// A ResNet.
    ResNet(ResNetArch),
    /// `resnext29_<cardinality>x<bottleneck_width>d`.
    ResNeXt {
        /// Groups of the 3×3 convolutions.
        cardinality: usize,
        /// Channels per group in the first stage (doubled at each later stage).
        bottleneck_width: usize,
    },
    /// A DenseNet-BC of four dense stages.
    DenseNet {
        /// Bottleneck layers per dense stage.
        blocks: [usize; 4],
        /// Channels each layer adds.
        growth: usize,
    },
    /// DLA (Yu et al. 2018) as kuangliu/pytorch-cifar defines it for CIFAR.
    Dla,
}

impl Arch {
    /// Parses a model name; an unknown one is an error listing the known names.
    pub fn parse(name: &str) -> Result<Arch> {
        let unknown =
            || EngineError::Config(format!("unknown model `{name}`: expected {KNOWN_MODELS}"));
        if name.starts_with("resnet") {
            return ResNetArch::parse(name)
                .map(Arch::ResNet)
                .map_err(|_| unknown());
        }
        if let Some(rest) = name.strip_prefix("resnext29_") {
            let (c, d) = rest
                .strip_suffix('d')
                .and_then(|r| r.split_once('x'))
                .ok_or_else(unknown)?;
            let (cardinality, bottleneck_width): (usize, usize) = (
                c.parse().map_err(|_| unknown())?,
                d.parse().map_err(|_| unknown())?,
            );
            // One spelling per model, as for the ResNets.
            if cardinality == 0
                || bottleneck_width == 0
                || name != format!("resnext29_{cardinality}x{bottleneck_width}d")
            {
                return Err(unknown());
            }
            return Ok(Arch::ResNeXt {
                cardinality,
                bottleneck_width,
            });
        }
        if let Some(&(_, blocks, growth)) = DENSENETS.iter().find(|d| d.0 == name) {
            return Ok(Arch::DenseNet { blocks, growth });
        }
        if name == "dla" {
            return Ok(Arch::Dla);
        }
        Err(unknown())
    }

    /// The `width` of the reference network: the ResNets' stem channels (16 for the CIFAR
    /// ResNets, 64 for the others), ResNeXt's bottleneck width d, DenseNet's growth rate, DLA's
    /// base channels (16; its stages have 1, 1, 2, 4, 8, 16, 32 times as many).
    pub fn default_width(&self) -> usize {
        match self {
            Arch::ResNet(a) => a.default_width(),
            Arch::ResNeXt {
                bottleneck_width, ..
            } => *bottleneck_width,
            Arch::DenseNet { growth, .. } => *growth,
            Arch::Dla => 16,
        }
    }

    /// Whether `stem` and `shortcut` apply to this architecture; if not, the key at fault and
    /// why.
    pub fn check(
        &self,
        stem: Stem,
        shortcut: Shortcut,
    ) -> std::result::Result<(), (&'static str, String)> {
        let cifar_resnet = matches!(self, Arch::ResNet(ResNetArch::Cifar { .. }));
        if stem == Stem::Imagenet && !matches!(self, Arch::ResNet(ResNetArch::Large { .. })) {
            return Err((
                "stem",
                if cifar_resnet {
                    "the ImageNet stem applies to resnet18 … resnet200, not to the CIFAR ResNets resnet<6n+2>".into()
                } else {
                    "the ImageNet stem applies to resnet18 … resnet200 only".into()
                },
            ));
        }
        if shortcut == Shortcut::A && !cifar_resnet {
            return Err((
                "shortcut",
                "option A applies to the CIFAR ResNets resnet<6n+2> only; this model uses projections (B)".into(),
            ));
        }
        Ok(())
    }

    /// The variable prefix of the classifier: torchvision's `fc` for the ResNets,
    /// kuangliu/pytorch-cifar's `linear` for the others, so checkpoints load by name into the
    /// PyTorch definitions they come from.
    pub fn classifier_name(&self) -> &'static str {
        match self {
            Arch::ResNet(_) => "fc",
            _ => "linear",
        }
    }

    /// Whether this is a ResNet (names after torchvision).
    pub fn is_resnet(&self) -> bool {
        matches!(self, Arch::ResNet(_))
    }

    /// The backbone of `spec` under `vb`.
    pub(super) fn backbone(&self, spec: &ModelSpec, vb: &VarBuilder) -> Result<Box<dyn Backbone>> {
        let (w, c) = (spec.width, spec.in_channels);
        Ok(match *self {
            Arch::ResNet(a) => Box::new(ResNet::new(a, spec, vb)?),
            Arch::ResNeXt { cardinality, .. } => Box::new(ResNeXt::new(cardinality, w, c, vb)?),
            Arch::DenseNet { blocks, .. } => Box::new(DenseNet::new(blocks, w, c, vb)?),
            Arch::Dla => Box::new(Dla::new(w, c, vb)?),
        })
    }
}

/// Builds the network described by `spec` under `vb`; refuses an unknown architecture and
/// keys that do not apply to it.
pub fn build(spec: &ModelSpec, vb: &VarBuilder) -> Result<Net> {
    let arch = Arch::parse(&spec.arch)?;
    let refuse = |what: String| EngineError::Config(format!("model `{}`: {what}", spec.arch));
    if spec.width == 0 || spec.classes == 0 || spec.in_channels == 0 {
        return Err(refuse(format!(
            "width {}, classes {} and in_channels {} must all be at least 1",
            spec.width, spec.classes, spec.in_channels
        )));
    }
    arch.check(spec.stem, spec.shortcut)
        .map_err(|(_, why)| refuse(why))?;
    let dropout = Dropout::new(spec.dropout).map_err(|e| refuse(e.to_string()))?;
    let body = arch.backbone(spec, vb)?;
    Net::new(body, dropout, spec.classes, arch.classifier_name(), vb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_typos_list_the_known_models() {
        assert_eq!(
            Arch::parse("resnext29_4x64d").unwrap(),
            Arch::ResNeXt {
                cardinality: 4,
                bottleneck_width: 64
            }
        );
        assert_eq!(
            Arch::parse("densenet121").unwrap(),
            Arch::DenseNet {
                blocks: [6, 12, 24, 16],
                growth: 32
            }
        );
        assert_eq!(Arch::parse("dla").unwrap(), Arch::Dla);
        assert_eq!(Arch::parse("densenet161").unwrap().default_width(), 48);
        assert_eq!(Arch::parse("resnext29_32x4d").unwrap().default_width(), 4);
        assert_eq!(Arch::parse("dla").unwrap().default_width(), 16);
        assert!(Arch::parse("resnet56").unwrap().is_resnet());
        for bad in [
            "resnext29_4x64",
            "resnext29_04x64d",
            "resnext29_0x64d",
            "resnext50_4x64d",
            "densenet122",
            "densnet121",
            "DLA",
            "dla34",
            "resnet9",
        ] {
            let e = Arch::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{bad}`")) && e.contains("densenet121") && e.contains("dla"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn stem_and_shortcut_apply_where_they_exist() {
        let dla = Arch::parse("dla").unwrap();
        assert!(dla.check(Stem::Cifar, Shortcut::B).is_ok());
        assert_eq!(
            dla.check(Stem::Imagenet, Shortcut::B).unwrap_err().0,
            "stem"
        );
        assert_eq!(
            dla.check(Stem::Cifar, Shortcut::A).unwrap_err().0,
            "shortcut"
        );
        let r20 = Arch::parse("resnet20").unwrap();
        assert!(r20.check(Stem::Cifar, Shortcut::A).is_ok());
        assert_eq!(
            r20.check(Stem::Imagenet, Shortcut::B).unwrap_err().0,
            "stem"
        );
        let r18 = Arch::parse("resnet18").unwrap();
        assert!(r18.check(Stem::Imagenet, Shortcut::B).is_ok());
        assert_eq!(
            r18.check(Stem::Cifar, Shortcut::A).unwrap_err().0,
            "shortcut"
        );
    }

    /// The paper's Table 5 parameter counts (27.1 M, 6.95 M, 16.29 M) are kuangliu's networks at
    /// 10 classes; at 100 the classifier is larger. Both counts are PyTorch's, printed by
    /// tests/fixtures/models/make_fixtures.py from kuangliu's own definitions.
    #[test]
    fn parameter_counts_match_kuangliu() {
        use crate::models::{Model, ModelSpec};
        for (arch, k, expected) in [
            ("resnext29_4x64d", 10, 27_104_586),
            ("resnext29_4x64d", 100, 27_288_996),
            ("densenet121", 10, 6_956_298),
            ("densenet121", 100, 7_048_548),
            ("dla", 10, 16_291_386),
            ("dla", 100, 16_337_556),
        ] {
            let spec = ModelSpec::new(arch, k, 3).unwrap();
            let m = Model::new(&spec, &candle_core::Device::Cpu, 0).unwrap();
            assert_eq!(m.parameter_count(), expected, "{arch}, {k} classes");
        }
    }
}
