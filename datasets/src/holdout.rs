//! Seeded subsets of a split (`limit`) and a validation split held out of the training split
//! (`val`), drawn from explicit seeds so the same parameters always select the same images.

use crate::cifar::Split;
use crate::error::{DatasetError, Result};
use crate::rng::{rng_for, stream};
use rand::seq::SliceRandom;

/// The images of `split` at `indices`, in that order.
pub fn subset(split: &Split, indices: &[usize]) -> Split {
    let (info, labels, pixels) = split;
    let len = info.image_len();
    let mut out_pixels = Vec::with_capacity(indices.len() * len);
    for &i in indices {
        out_pixels.extend_from_slice(&pixels[i * len..(i + 1) * len]);
    }
    let mut out_info = info.clone();
    out_info.n = indices.len();
    (
        out_info,
        indices.iter().map(|&i| labels[i]).collect(),
        out_pixels,
    )
}

/// A split with, for each of its images, the image's index in the split it was drawn from.
pub type Drawn = (Split, Vec<usize>);

/// Keeps a seeded random `limit` of the training images (all when `None`), then holds `val` of
/// them out as a validation split. Both selections keep the images' original order; each comes
/// with the indices of its images in `train`.
pub fn limit_and_hold_out(
    train: Split,
    limit: Option<usize>,
    val: Option<usize>,
    seed: u64,
) -> Result<(Drawn, Option<Drawn>)> {
    let n = train.0.n;
    let keep = limit.unwrap_or(n);
    if keep == 0 || keep > n {
        return Err(DatasetError::Param {
            name: "limit",
            message: format!("{keep} is outside 1..={n}, the training images available"),
        });
    }
    let v = val.unwrap_or(0);
    if v >= keep {
        return Err(DatasetError::Param {
            name: "val",
            message: format!(
                "holding out {v} of {keep} training images would leave none to train on"
            ),
        });
    }
    if keep == n && v == 0 {
        return Ok(((train, (0..n).collect()), None));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng_for(&[seed, stream::HOLDOUT]));
    let mut val_idx = order[..v].to_vec();
    let mut train_idx = order[v..keep].to_vec();
    val_idx.sort_unstable();
    train_idx.sort_unstable();
    let val_split = (v > 0).then(|| (subset(&train, &val_idx), val_idx));
    Ok(((subset(&train, &train_idx), train_idx), val_split))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::SyntheticSpec;

    #[test]
    fn disjoint_seeded_and_ordered() {
        let spec = SyntheticSpec {
            image_size: 8,
            ..Default::default()
        };
        let full = spec.generate(1, 0, 50).unwrap();
        let ((train, train_idx), val) =
            limit_and_hold_out(full.clone(), Some(40), Some(10), 7).unwrap();
        let (val, val_idx) = val.unwrap();
        assert_eq!((train.0.n, val.0.n), (30, 10));
        let len = full.0.image_len();
        // Every kept image is an original image; no image is in both splits.
        let find = |img: &[u8]| {
            (0..50)
                .position(|i| &full.2[i * len..(i + 1) * len] == img)
                .unwrap()
        };
        let ti: Vec<usize> = train.2.chunks(len).map(find).collect();
        let vi: Vec<usize> = val.2.chunks(len).map(find).collect();
        assert!(ti.windows(2).all(|w| w[0] < w[1]) && vi.windows(2).all(|w| w[0] < w[1]));
        assert!(ti.iter().all(|i| !vi.contains(i)));
        // The indices returned are the images' places in the full split.
        assert_eq!((ti.clone(), vi.clone()), (train_idx, val_idx));
        for (k, &i) in ti.iter().enumerate() {
            assert_eq!(train.1[k], full.1[i]);
        }
        // Same seed, same selection; another seed, another one.
        let ((again, _), _) = limit_and_hold_out(full.clone(), Some(40), Some(10), 7).unwrap();
        assert_eq!(again.2, train.2);
        let ((other, _), _) = limit_and_hold_out(full.clone(), Some(40), Some(10), 8).unwrap();
        assert_ne!(other.2, train.2);
        // Nothing drawn: every image, in order.
        let ((all, idx), none) = limit_and_hold_out(full.clone(), None, None, 7).unwrap();
        assert_eq!((all.0.n, idx), (50, (0..50).collect::<Vec<_>>()));
        assert!(none.is_none());
        let e = limit_and_hold_out(full.clone(), Some(40), Some(40), 7)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`val`") && e.contains("none to train on"), "{e}");
        let e = limit_and_hold_out(full, Some(51), None, 7)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`limit`") && e.contains("1..=50"), "{e}");
    }
}
