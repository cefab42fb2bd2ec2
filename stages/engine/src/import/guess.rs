//! Which of our architectures a checkpoint's tensors are, told from their names and shapes
//! (for `pipeline inspect`, which then checks the guess by importing with it: the import is
//! always told the model and checks every tensor against it).
//!
//! The families tell themselves apart by their names: DLA by `base.0`, DenseNet by `dense1.`,
//! the ResNets and ResNeXt by `layerS.B.` with S up to 3 (CIFAR ResNets, ResNeXt-29) or 4
//! (the ImageNet ResNets); bottlenecks by a `conv3`, ResNeXt's cardinality by its grouped
//! 3×3 convolution's shape, the ImageNet stem by a 7×7 first convolution.

use super::{not_a_weight, wrapper_prefix};
use crate::models::arch::DENSENETS;
use crate::models::resnet::BlockKind;
use crate::models::{Arch, ResNetArch};
use std::collections::BTreeMap;

/// Shapes by name, wrapper prefixes removed.
type Dims<'a> = BTreeMap<&'a str, &'a [usize]>;

/// The model name (as stages.toml's `model`) the named tensors are of, if they are of one of
/// ours; names as the file has them (wrapper prefixes, kuangliu's or torchvision's).
pub fn model_of<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>) -> Option<String> {
    let weights: Vec<(&str, &[usize])> = tensors
        .into_iter()
        .filter(|(n, _)| !not_a_weight(n))
        .collect();
    if weights.is_empty() {
        return None;
    }
    let names: Vec<String> = weights.iter().map(|(n, _)| n.to_string()).collect();
    let prefix = wrapper_prefix(names.iter());
    let dims: Dims = weights
        .iter()
        .filter_map(|&(n, d)| Some((n.strip_prefix(prefix.as_str())?, d)))
        .collect();
    if dims.contains_key("base.0.weight") && dims.contains_key("linear.weight") {
        return Some("dla".into());
    }
    if dims.contains_key("dense1.0.conv1.weight") {
        return densenet(&dims);
    }
    resnet_or_resnext(&dims)
}

/// Stages and blocks beyond any network's (ResNet-1202 has 200 blocks in a stage, ResNet-200 36).
const MAX_STAGES: usize = 64;
const MAX_BLOCKS: usize = 1_000;

/// The blocks of each stage whose names start `{stage}{s}.{b}.` (s = 1, 2, …): the highest `b`
/// plus one, up to the first stage missing; nothing past [`MAX_STAGES`] or [`MAX_BLOCKS`].
fn blocks(dims: &Dims, stage: &str) -> Vec<usize> {
    let mut last: BTreeMap<usize, usize> = BTreeMap::new();
    for name in dims.keys() {
        let parsed = name.strip_prefix(stage).and_then(|rest| {
            let mut parts = rest.split('.');
            let s: usize = parts.next()?.parse().ok()?;
            let b: usize = parts.next()?.parse().ok()?;
            (s <= MAX_STAGES && b < MAX_BLOCKS).then_some((s, b))
        });
        if let Some((s, b)) = parsed {
            let top = last.entry(s).or_default();
            *top = (*top).max(b + 1);
        }
    }
    (1..=MAX_STAGES)
        .map_while(|s| last.get(&s).copied())
        .collect()
}

/// A DenseNet: kuangliu's of the same blocks per stage, the one of the same growth rate if
/// there is one (the import reads the growth rate off the weights as its `width`).
fn densenet(dims: &Dims) -> Option<String> {
    let blocks: [usize; 4] = blocks(dims, "dense").try_into().ok()?;
    let growth = *dims.get("dense1.0.conv2.weight")?.first()?;
    let same = || DENSENETS.iter().filter(|d| d.1 == blocks);
    same()
        .find(|d| d.2 == growth)
        .or_else(|| same().next())
        .map(|d| d.0.to_owned())
}

/// A ResNet or ResNeXt-29, if the name its stages make parses back to the same stages
/// (`resnet50` is the bottleneck ResNet, not a CIFAR ResNet of 8 basic blocks a stage).
fn resnet_or_resnext(dims: &Dims) -> Option<String> {
    let stem = dims.get("conv1.weight")?;
    let blocks = blocks(dims, "layer");
    let bottleneck = dims.contains_key("layer1.0.conv3.weight");
    let name = match (blocks.len(), bottleneck) {
        (3, false) if blocks.iter().all(|&b| b == blocks[0]) => {
            format!("resnet{}", 6 * blocks[0] + 2)
        }
        (3, true) if blocks == [3, 3, 3] => {
            // Grouped: [groups × width, width, 3, 3].
            let conv2 = dims.get("layer1.0.conv2.weight")?;
            let (all, per_group) = (*conv2.first()?, *conv2.get(1)?);
            if per_group == 0 || all % per_group != 0 {
                return None;
            }
            format!("resnext29_{}x{per_group}d", all / per_group)
        }
        (4, _) => {
            let imagenet = if stem.get(2) == Some(&7) {
                "_imagenet"
            } else {
                ""
            };
            return [18, 34, 50, 101, 152, 200]
                .into_iter()
                .map(|d| format!("resnet{d}{imagenet}"))
                .find(|name| match Arch::parse(name) {
                    Ok(Arch::ResNet(ResNetArch::Large { layers, block, .. })) => {
                        layers[..] == blocks[..] && (block == BlockKind::Bottleneck) == bottleneck
                    }
                    _ => false,
                });
        }
        _ => return None,
    };
    match Arch::parse(&name).ok()? {
        Arch::ResNet(ResNetArch::Cifar { .. }) if !bottleneck => Some(name),
        Arch::ResNeXt { .. } if bottleneck => Some(name),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::survey::survey;
    use crate::import::tests::fixture;

    /// The model named by the names and shapes of `file`'s tensors (those under `prefix`).
    fn guess(file: &str, prefix: &str) -> Option<String> {
        let c = survey(&fixture(file), None).unwrap();
        let h = &c.holders[c.read.unwrap()];
        model_of(
            h.tensors
                .iter()
                .filter_map(|t| Some((t.name.strip_prefix(prefix)?, &t.dims[..]))),
        )
    }

    /// Each reference checkpoint is named as the network its maker built: make_fixtures.py's
    /// resnet8 (also behind DataParallel's and `torch.compile`'s prefixes, and in safetensors),
    /// kuangliu's ResNet-18 at width 2, torchvision's ResNet-18 and -50 with their ImageNet
    /// stem, akamaster's ResNet-20 (legacy format, option A), and kuangliu's ResNeXt-29 4×64d,
    /// DenseNet-121 and DLA built at width 2 (so ResNeXt's bottleneck is 2 channels a group:
    /// `resnext29_4x2d`, the same network). MoCo's two encoders are none, one of them is.
    #[test]
    fn reference_checkpoints_are_named_as_their_makers_built_them() {
        for (file, want) in [
            ("resnet8.pth", "resnet8"),
            ("wrapped.pth", "resnet8"),
            ("resnet8.safetensors", "resnet8"),
            ("kuangliu_resnet18_w2.pth", "resnet18"),
            ("torchvision_resnet18_w4.pth", "resnet18_imagenet"),
            ("torchvision_resnet50_w4.pth", "resnet50_imagenet"),
            ("akamaster_resnet20.th", "resnet20"),
            (
                "../models/kuangliu_resnext29_4x64d_w2.pth",
                "resnext29_4x2d",
            ),
            ("../models/kuangliu_densenet121_w2.pth", "densenet121"),
            ("../models/kuangliu_dla_w2.pth", "dla"),
        ] {
            assert_eq!(guess(file, "").as_deref(), Some(want), "{file}");
        }
        assert_eq!(guess("moco_resnet8.pth", ""), None);
        assert_eq!(
            guess("moco_resnet8.pth", "module.encoder_q.").as_deref(),
            Some("resnet8")
        );
    }

    /// The names of a CIFAR ResNet of `n` basic blocks a stage (projection shortcuts).
    fn cifar_resnet(n: usize) -> Vec<(String, Vec<usize>)> {
        let mut out = vec![("conv1.weight".to_owned(), vec![16, 3, 3, 3])];
        for s in 1..=3 {
            for b in 0..n {
                out.push((format!("layer{s}.{b}.conv1.weight"), vec![16, 16, 3, 3]));
                out.push((format!("layer{s}.{b}.conv2.weight"), vec![16, 16, 3, 3]));
            }
        }
        out.push(("fc.weight".to_owned(), vec![10, 64]));
        out
    }

    /// Depth 6n + 2 for n blocks a stage, except where the name means another network: a CIFAR
    /// ResNet of 8 blocks a stage would be `resnet50`, the bottleneck ResNet, so it is none.
    /// Stages of unequal blocks, a stage missing and no first convolution are none either.
    #[test]
    fn a_name_is_given_only_where_it_builds_the_same_stages() {
        let named =
            |t: &[(String, Vec<usize>)]| model_of(t.iter().map(|(n, d)| (n.as_str(), &d[..])));
        assert_eq!(named(&cifar_resnet(18)).as_deref(), Some("resnet110"));
        assert_eq!(named(&cifar_resnet(1)).as_deref(), Some("resnet8"));
        assert_eq!(named(&cifar_resnet(8)), None);
        let mut uneven = cifar_resnet(3);
        uneven.retain(|(n, _)| !n.starts_with("layer2.2."));
        assert_eq!(named(&uneven), None);
        let mut two_stages = cifar_resnet(3);
        two_stages.retain(|(n, _)| !n.starts_with("layer3."));
        assert_eq!(named(&two_stages), None);
        let mut headless = cifar_resnet(3);
        headless.retain(|(n, _)| n != "conv1.weight");
        assert_eq!(named(&headless), None);
    }

    /// Names no network has are none, with no overflow or endless loop: a block numbered
    /// `usize::MAX`, a stage numbered past any network's, and no names at all (a module
    /// without tensors, the fuzzer's input in fuzz/regressions/import, looped for ever
    /// stripping wrapper prefixes off no names).
    #[test]
    fn absurd_names_are_none() {
        let named = |t: &[(&str, &[usize])]| model_of(t.iter().map(|&(n, d)| (n, d)));
        let conv: &[usize] = &[16, 3, 3, 3];
        assert_eq!(
            named(&[
                ("conv1.weight", conv),
                ("layer1.18446744073709551615.conv1.weight", conv),
            ]),
            None
        );
        assert_eq!(
            named(&[
                ("conv1.weight", conv),
                ("layer18446744073709551615.0.conv1.weight", conv),
            ]),
            None
        );
        assert_eq!(named(&[]), None);
        assert_eq!(named(&[("bn1.num_batches_tracked", &[])]), None);
        let c = survey(
            &fixture("../../../fuzz/regressions/import/module-without-tensors.pth"),
            None,
        )
        .unwrap();
        for h in &c.holders {
            assert_eq!(
                model_of(h.tensors.iter().map(|t| (t.name.as_str(), &t.dims[..]))),
                None
            );
        }
    }
}
