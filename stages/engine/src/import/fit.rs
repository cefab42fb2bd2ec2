//! Whether a checkpoint's tensors can fill the model they are imported as, checked on small
//! models of its architecture before the model itself is built. A damaged or crafted file can
//! otherwise have a model of billions of values built from a few kilobytes: the width is read
//! off one tensor, the classes off another, the depth off a few names, and every shape is
//! compared only once the model exists.
//!
//! A model's tensors are named alike at every width (but one: ResNeXt's first block has no
//! projection at the width whose groups make the stem's 64 channels), and its values are a
//! quadratic in the width (channels scale with it, a convolution's weights with its square),
//! plus the classifier's row per class and the stem's filters per input channel. So the
//! models checked are built with 1 class and 1 input channel at four widths in a row named
//! alike, the quadratic fitted at three and checked at the fourth.

use crate::error::{EngineError, Result};
use crate::models::{extra_tensors, missing_tensor, Arch, Model, ModelSpec};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// The widest small model built for the check.
const MAX_CHECK_WIDTH: usize = 8;

/// A model of at most this width is built even if the small models are named otherwise, and
/// compares the tensors one by one: wide enough for ResNeXt's width whose tensors are named
/// otherwise (32 / cardinality).
const UNCHECKED_WIDTH: usize = 32;

/// Checks that `tensors` are named as the model of `spec` names its tensors (for a model wider
/// than [`UNCHECKED_WIDTH`]) and that the model holds at most twice their values and 16 M more
/// (room for shapes that differ a little: the model is then built and says which differs).
pub(super) fn fits(
    tensors: &BTreeMap<String, Tensor>,
    path: &Path,
    spec: &ModelSpec,
) -> Result<()> {
    let names: Vec<&String> = tensors.keys().collect();
    let run = small_models(spec)?;
    // At a narrow width the model may be named otherwise (ResNeXt's odd width): it is built,
    // and compares its tensors one by one.
    let named_alike = model_names(&run[0].1).iter().eq(names.iter().copied());
    if !named_alike && spec.width > UNCHECKED_WIDTH {
        return Err(names_differ(tensors, &run[0].1, path, spec));
    }
    if run.len() < 4 {
        return Ok(());
    }
    let Some(want) = values(&run, spec)? else {
        return Ok(());
    };
    let have: f64 = tensors.values().map(|t| t.elem_count() as f64).sum();
    if want > 2.0 * have + (16 << 20) as f64 {
        return Err(EngineError::invalid(
            path,
            "checkpoint",
            format!(
                "holds {have} values, a {} of width {}, {} classes and {} input channels has \
                 {want}: the shapes are far from the model's",
                spec.arch, spec.width, spec.classes, spec.in_channels
            ),
        ));
    }
    Ok(())
}

/// Models of `spec`'s architecture with 1 class and 1 input channel at four consecutive widths
/// from 1 to [`MAX_CHECK_WIDTH`] named alike (ResNeXt's odd width left out); fewer if there are
/// none such.
fn small_models(spec: &ModelSpec) -> Result<Vec<(usize, Model)>> {
    let mut run: Vec<(usize, Model)> = Vec::new();
    for width in 1..=MAX_CHECK_WIDTH {
        let small = ModelSpec {
            width,
            classes: 1,
            in_channels: 1,
            ..spec.clone()
        };
        let model = Model::new(&small, &Device::Cpu, 0)?;
        if run
            .last()
            .is_some_and(|(_, m)| model_names(m) != model_names(&model))
        {
            run.clear();
        }
        run.push((width, model));
        if run.len() == 4 {
            break;
        }
    }
    Ok(run)
}

/// A model's tensor names, sorted.
fn model_names(model: &Model) -> Vec<String> {
    model.tensors().into_iter().map(|(n, _)| n).collect()
}

/// The error `Model::set_tensors` gives for names that are not the model's: the first extra
/// tensor, else the first missing one.
fn names_differ(
    tensors: &BTreeMap<String, Tensor>,
    small: &Model,
    path: &Path,
    spec: &ModelSpec,
) -> EngineError {
    let ours = model_names(small);
    let extra: Vec<&String> = tensors
        .keys()
        .filter(|n| ours.binary_search(n).is_err())
        .collect();
    if let Some(first) = extra.first() {
        return extra_tensors(path, &spec.arch, first, extra.len());
    }
    let missing = ours.iter().find(|n| !tensors.contains_key(*n));
    missing_tensor(path, &spec.arch, missing.map_or("?", |n| n.as_str()))
}

/// The values (weights and statistics) of the model of `spec`, from four small models at
/// consecutive widths (1 class, 1 input channel): the quadratic through the first three,
/// checked at the fourth (`None` if it misses), plus the classifier's rows for the other
/// classes and the stem's filters for the other input channels, both linear in the width.
fn values(run: &[(usize, Model)], spec: &ModelSpec) -> Result<Option<f64>> {
    let total = |m: &Model| -> f64 { m.tensors().iter().map(|(_, t)| t.elem_count() as f64).sum() };
    let v: Vec<f64> = run.iter().map(|(_, m)| total(m)).collect();
    let a = (v[2] - 2.0 * v[1] + v[0]) / 2.0;
    let b = v[1] - v[0] - a;
    let quadratic = |x: f64| a * x * x + b * x + v[0];
    if quadratic(3.0) != v[3] {
        return Ok(None);
    }
    let x = spec.width as f64 - run[0].0 as f64;
    let arch = Arch::parse(&spec.arch)?;
    // Per class: a row of the classifier and its bias; per input channel: the stem's filters.
    let classifier = format!("{}.weight", arch.classifier_name());
    let per_class = |m: &Model| dims(m, &classifier).get(1).map_or(0.0, |&f| f as f64 + 1.0);
    let stem = if arch == Arch::Dla {
        "base.0.weight"
    } else {
        "conv1.weight"
    };
    let per_channel = |m: &Model| dims(m, stem).iter().product::<usize>() as f64;
    let linear = |f: &dyn Fn(&Model) -> f64| f(&run[0].1) + x * (f(&run[1].1) - f(&run[0].1));
    Ok(Some(
        quadratic(x)
            + (spec.classes as f64 - 1.0) * linear(&per_class)
            + (spec.in_channels as f64 - 1.0) * linear(&per_channel),
    ))
}

/// The shape of `model`'s tensor `name`.
fn dims(model: &Model, name: &str) -> Vec<usize> {
    model
        .tensors()
        .into_iter()
        .find(|(n, _)| n == name)
        .map_or_else(Vec::new, |(_, t)| t.dims().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::tests::fixture;
    use crate::import::{read, Select};

    /// The tensors of a freshly built model of `spec`.
    fn tensors_of(spec: &ModelSpec) -> BTreeMap<String, Tensor> {
        Model::new(spec, &Device::Cpu, 0)
            .unwrap()
            .tensors()
            .into_iter()
            .collect()
    }

    /// resnet8.pth's tensors are refused for a resnet8 of width 4,096 (5 G values) and for one
    /// of 100 million classes (6.4 G values), before either is built: the models checked have
    /// one class, and widths up to 8.
    #[test]
    fn a_model_far_larger_than_its_tensors_is_not_built() {
        let path = fixture("resnet8.pth");
        let state = read(&path, Select::default(), Arch::parse("resnet8").unwrap()).unwrap();
        let spec = state.spec(&path, "resnet8", 0.0).unwrap();
        fits(&state.tensors, &path, &spec).unwrap();
        for (width, classes) in [(4096, 10), (16, 100_000_000)] {
            let huge = ModelSpec {
                width,
                classes,
                ..spec.clone()
            };
            let e = fits(&state.tensors, &path, &huge).unwrap_err().to_string();
            // PyTorch's 78,042 parameters and BatchNorm's 2 × 336 running statistics.
            assert!(
                e.contains(&format!(
                    "holds 78714 values, a resnet8 of width {width}, {classes} classes"
                )) && e.contains("far from the model's"),
                "{e}"
            );
        }
    }

    /// The values reckoned from the small models are the model's own, for every family at a
    /// width, classes and input channels none of the small models has; ResNeXt of 8, 16 and 32
    /// groups included, whose first block has no projection at width 4, 2 and 1.
    #[test]
    fn the_values_reckoned_are_the_models_own() {
        for arch in [
            "resnet8",
            "resnet18",
            "resnet50_imagenet",
            "resnext29_2x4d",
            "resnext29_8x64d",
            "resnext29_16x4d",
            "resnext29_32x4d",
            "densenet121",
            "densenet161",
            "dla",
        ] {
            let spec = ModelSpec {
                width: 9,
                ..ModelSpec::new(arch, 7, 3).unwrap()
            };
            let built: f64 = tensors_of(&spec)
                .values()
                .map(|t| t.elem_count() as f64)
                .sum();
            let run = small_models(&spec).unwrap();
            assert_eq!(values(&run, &spec).unwrap(), Some(built), "{arch}");
        }
    }

    /// ResNeXt at the width whose groups make the stem's 64 channels (no projection in its
    /// first block: named unlike every other width) fits, as do its other widths; a wide model
    /// named otherwise is refused naming the first tensor it lacks.
    #[test]
    fn resnext_at_its_odd_width_fits_and_wide_models_check_names() {
        for (arch, width) in [
            ("resnext29_32x4d", 1),
            ("resnext29_8x64d", 4),
            ("resnext29_8x64d", 3),
        ] {
            let spec = ModelSpec {
                width,
                ..ModelSpec::new(arch, 10, 3).unwrap()
            };
            fits(&tensors_of(&spec), Path::new("x.pth"), &spec).unwrap();
        }
        let spec = ModelSpec {
            width: 40,
            ..ModelSpec::new("resnet8", 10, 3).unwrap()
        };
        let mut tensors = tensors_of(&ModelSpec {
            width: 1,
            ..spec.clone()
        });
        tensors.remove("fc.bias");
        let e = fits(&tensors, Path::new("x.pth"), &spec)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tensor `fc.bias`: missing"), "{e}");
    }
}
