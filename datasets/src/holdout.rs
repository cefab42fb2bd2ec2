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
/// with the indices of its images in `train`. With `stratify`, each class gives both draws a
/// share of its images in proportion to its size ([`quotas`]), as scikit-learn's
/// `train_test_split(stratify=y)`; without, the draws are uniform over the images.
pub fn limit_and_hold_out(
    train: Split,
    limit: Option<usize>,
    val: Option<usize>,
    seed: u64,
    stratify: bool,
) -> Result<(Drawn, Option<Drawn>)> {
    let (train_idx, val_idx) = draw(&train.1, &train.0.classes, limit, val, seed, stratify)?;
    if train_idx.len() == train.0.n {
        return Ok(((train, train_idx), None));
    }
    let val_split = val_idx.map(|v| (subset(&train, &v), v));
    Ok(((subset(&train, &train_idx), train_idx), val_split))
}

/// The draws of [`limit_and_hold_out`] from the labels alone: the indices (ascending) of the
/// images kept for training and of those held out (`None` without `val`), so that a source too
/// large for memory reads only the images drawn.
pub fn draw(
    labels: &[u32],
    classes: &[String],
    limit: Option<usize>,
    val: Option<usize>,
    seed: u64,
    stratify: bool,
) -> Result<(Vec<usize>, Option<Vec<usize>>)> {
    let n = labels.len();
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
        return Ok(((0..n).collect(), None));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng_for(&[seed, stream::HOLDOUT]));
    let (mut val_idx, mut train_idx) = if stratify {
        stratified(&order, labels, classes, keep, v)?
    } else {
        (order[..v].to_vec(), order[v..keep].to_vec())
    };
    val_idx.sort_unstable();
    train_idx.sort_unstable();
    Ok((train_idx, (v > 0).then_some(val_idx)))
}

/// The stratified draws: `keep` images in proportion to the classes, `val` of them held out
/// in proportion to the kept ones; each class's images taken in the shuffled `order`. A class
/// with images left without any to train on is refused, as scikit-learn refuses a class too
/// small to split.
fn stratified(
    order: &[usize],
    labels: &[u32],
    classes: &[String],
    keep: usize,
    val: usize,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let mut counts = vec![0usize; classes.len()];
    for &y in labels {
        counts[y as usize] += 1;
    }
    let kept = quotas(&counts, keep);
    let mut val_left = quotas(&kept, val);
    let mut train_left: Vec<usize> = kept.iter().zip(&val_left).map(|(a, b)| a - b).collect();
    if let Some(c) = (0..classes.len()).find(|&c| counts[c] > 0 && train_left[c] == 0) {
        return Err(DatasetError::Param {
            name: "stratify",
            message: format!(
                "class `{}` has {} training images; its share of `limit` keeps {} and its share \
                 of `val` holds out {}, leaving none to train on",
                classes[c], counts[c], kept[c], val_left[c]
            ),
        });
    }
    let (mut val_idx, mut train_idx) = (Vec::with_capacity(val), Vec::with_capacity(keep - val));
    for &i in order {
        let c = labels[i] as usize;
        if val_left[c] > 0 {
            val_left[c] -= 1;
            val_idx.push(i);
        } else if train_left[c] > 0 {
            train_left[c] -= 1;
            train_idx.push(i);
        }
    }
    Ok((val_idx, train_idx))
}

/// `take` items shared among classes of `counts` items in proportion to their sizes, by largest
/// remainder: each class gets the floor of its exact share, and the items left over go one each
/// to the classes with the largest fractional parts (ties: the lower class). No class gets more
/// than it has.
pub fn quotas(counts: &[usize], take: usize) -> Vec<usize> {
    let total: usize = counts.iter().sum();
    if total == 0 {
        return vec![0; counts.len()];
    }
    let exact = |c: usize| {
        (
            take as u128 * c as u128 / total as u128,
            take as u128 * c as u128 % total as u128,
        )
    };
    let mut out: Vec<usize> = counts.iter().map(|&c| exact(c).0 as usize).collect();
    let left = take - out.iter().sum::<usize>();
    let mut by_remainder: Vec<usize> = (0..counts.len()).collect();
    by_remainder.sort_by(|&a, &b| exact(counts[b]).1.cmp(&exact(counts[a]).1).then(a.cmp(&b)));
    for &c in by_remainder.iter().take(left) {
        out[c] += 1;
    }
    out
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
            limit_and_hold_out(full.clone(), Some(40), Some(10), 7, false).unwrap();
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
        let ((again, _), _) =
            limit_and_hold_out(full.clone(), Some(40), Some(10), 7, false).unwrap();
        assert_eq!(again.2, train.2);
        let ((other, _), _) =
            limit_and_hold_out(full.clone(), Some(40), Some(10), 8, false).unwrap();
        assert_ne!(other.2, train.2);
        // Nothing drawn: every image, in order.
        let ((all, idx), none) = limit_and_hold_out(full.clone(), None, None, 7, false).unwrap();
        assert_eq!((all.0.n, idx), (50, (0..50).collect::<Vec<_>>()));
        assert!(none.is_none());
        let e = limit_and_hold_out(full.clone(), Some(40), Some(40), 7, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`val`") && e.contains("none to train on"), "{e}");
        let e = limit_and_hold_out(full, Some(51), None, 7, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`limit`") && e.contains("1..=50"), "{e}");
    }

    /// Largest remainder, by hand: 10 of (60, 30, 10) is (6, 3, 1); 5 of (7, 3) has shares 3.5
    /// and 1.5, the one left over to the lower class on the tie: (4, 1); 4 of (1, 1, 1, 1, 1)
    /// gives the four lower classes one each; a class never gets more than it has.
    #[test]
    fn quotas_share_by_largest_remainder() {
        assert_eq!(quotas(&[60, 30, 10], 10), [6, 3, 1]);
        assert_eq!(quotas(&[7, 3], 5), [4, 1]);
        assert_eq!(quotas(&[1, 1, 1, 1, 1], 4), [1, 1, 1, 1, 0]);
        // 7 of (5, 3, 2): shares 3.5, 2.1, 1.4 → floors (3, 2, 1), one left to class 0.
        assert_eq!(quotas(&[5, 3, 2], 7), [4, 2, 1]);
        assert_eq!(quotas(&[5, 3, 2], 10), [5, 3, 2]);
        assert_eq!(quotas(&[0, 4], 2), [0, 2]);
    }

    /// Stratified draws give each class its share in both splits: 100 images of classes
    /// (60, 30, 10), `limit` 50 and `val` 10 keep (30, 15, 5) and hold out (6, 3, 1); disjoint,
    /// seeded, each image with its own label.
    #[test]
    fn stratified_draws_keep_the_class_proportions() {
        let labels: Vec<u32> = (0..100u32)
            .map(|i| match i % 10 {
                0..=5 => 0,
                6..=8 => 1,
                _ => 2,
            })
            .collect();
        let info = crate::packed::StoreInfo {
            n: 100,
            h: 1,
            w: 1,
            c: 1,
            classes: vec!["a".into(), "b".into(), "c".into()],
            varying: false,
        };
        let pixels: Vec<u8> = (0..100u8).collect();
        let full = (info, labels.clone(), pixels);
        let per_class = |l: &[u32]| [0, 1, 2].map(|c| l.iter().filter(|&&y| y == c).count());
        let ((train, train_idx), val) =
            limit_and_hold_out(full.clone(), Some(50), Some(10), 3, true).unwrap();
        let (val, val_idx) = val.unwrap();
        assert_eq!(per_class(&val.1), [6, 3, 1]);
        assert_eq!(per_class(&train.1), [24, 12, 4]);
        assert!(train_idx.iter().all(|i| !val_idx.contains(i)));
        for (k, &i) in val_idx.iter().enumerate() {
            assert_eq!((val.1[k], val.2[k]), (labels[i], i as u8));
        }
        let ((again, _), _) =
            limit_and_hold_out(full.clone(), Some(50), Some(10), 3, true).unwrap();
        assert_eq!(again.2, train.2);
        let ((other, _), _) =
            limit_and_hold_out(full.clone(), Some(50), Some(10), 4, true).unwrap();
        assert_ne!(other.2, train.2);
        // Without `limit`: every image kept, 10 held out in proportion.
        let ((train, _), val) = limit_and_hold_out(full.clone(), None, Some(10), 3, true).unwrap();
        assert_eq!(per_class(&val.unwrap().0 .1), [6, 3, 1]);
        assert_eq!(per_class(&train.1), [54, 27, 9]);
        // `limit` 10 keeps (6, 3, 1); `val` 9 of it has shares (5.4, 2.7, 0.9), floors
        // (5, 2, 0) and the two left to the largest remainders, `c` then `b`: (5, 3, 1). Class
        // `b` keeps nothing to train on (nor does `c`): refused, naming the first.
        let e = limit_and_hold_out(full, Some(10), Some(9), 3, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`stratify`")
                && e.contains("class `b` has 30 training images")
                && e.contains("keeps 3")
                && e.contains("holds out 3"),
            "{e}"
        );
    }
}
