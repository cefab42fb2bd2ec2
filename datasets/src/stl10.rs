//! Reader for the official binary version of STL-10 (labelled splits).
//!
//! Files: `train_X.bin`, `train_y.bin`, `test_X.bin`, `test_y.bin`, `class_names.txt`. Images are
//! 3×96×96 `u8`, each channel plane stored **column-major** (the layout of the MATLAB-exported
//! originals), so every plane is transposed into the packed store's row-major CHW. Labels are
//! bytes 1..=10 and become 0..=9.

use crate::cifar::{read_names, Split};
use crate::error::{DatasetError, Result};
use crate::packed::StoreInfo;
use rayon::prelude::*;
use std::path::Path;

const SIDE: usize = 96;
const PLANE: usize = SIDE * SIDE;
const IMAGE: usize = 3 * PLANE;

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| DatasetError::io(path, e))
}

fn split(dir: &Path, name: &str, classes: &[String]) -> Result<Split> {
    let (xp, yp) = (
        dir.join(format!("{name}_X.bin")),
        dir.join(format!("{name}_y.bin")),
    );
    let (x, y) = (read(&xp)?, read(&yp)?);
    if x.is_empty() || x.len() % IMAGE != 0 {
        return Err(DatasetError::format(
            &xp,
            "size",
            format!(
                "{} bytes is not a whole number of {IMAGE}-byte images (3×96×96): {} complete \
                 images and {} bytes over",
                x.len(),
                x.len() / IMAGE,
                x.len() % IMAGE
            ),
        ));
    }
    let n = x.len() / IMAGE;
    if y.len() != n {
        return Err(DatasetError::format(
            &yp,
            "size",
            format!(
                "{} labels for the {n} images of {}: one of the two files is truncated or \
                 from another split",
                y.len(),
                xp.display()
            ),
        ));
    }
    let mut labels = Vec::with_capacity(n);
    for (i, &l) in y.iter().enumerate() {
        if !(1..=10).contains(&l) {
            return Err(DatasetError::format(
                &yp,
                format!("record {i} (byte {i})"),
                format!("label {l} is outside 1..=10"),
            ));
        }
        labels.push(l as u32 - 1);
    }
    let mut pixels = vec![0u8; n * IMAGE];
    pixels
        .par_chunks_mut(PLANE)
        .zip(x.par_chunks(PLANE))
        .for_each(|(dst, src)| {
            for col in 0..SIDE {
                for row in 0..SIDE {
                    dst[row * SIDE + col] = src[col * SIDE + row];
                }
            }
        });
    let info = StoreInfo {
        n,
        h: SIDE,
        w: SIDE,
        c: 3,
        classes: classes.to_vec(),
        varying: false,
    };
    Ok((info, labels, pixels))
}

/// The files [`stl10`] reads (for [`crate::digest`]).
pub fn stl10_files(dir: &Path) -> Vec<std::path::PathBuf> {
    [
        "class_names.txt",
        "train_X.bin",
        "train_y.bin",
        "test_X.bin",
        "test_y.bin",
    ]
    .iter()
    .map(|f| dir.join(f))
    .collect()
}

/// Reads the labelled train and test splits of STL-10 from `dir`.
pub fn stl10(dir: &Path) -> Result<(Split, Split)> {
    let classes = read_names(&dir.join("class_names.txt"), 10)?;
    Ok((
        split(dir, "train", &classes)?,
        split(dir, "test", &classes)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(d: &Path, n_train: usize) {
        std::fs::create_dir_all(d).unwrap();
        let names: String = (0..10).map(|i| format!("c{i}\n")).collect();
        std::fs::write(d.join("class_names.txt"), names).unwrap();
        for (name, n) in [("train", n_train), ("test", 1)] {
            // Image i, channel c, stored column-major: the byte at column x, row y of the plane
            // is at c·9216 + x·96 + y; its value encodes (i, c, y, x) mod 256.
            let mut x = vec![0u8; n * IMAGE];
            for i in 0..n {
                for c in 0..3 {
                    for col in 0..SIDE {
                        for row in 0..SIDE {
                            x[i * IMAGE + c * PLANE + col * SIDE + row] =
                                ((i * 7 + c * 50 + row * 3 + col) % 256) as u8;
                        }
                    }
                }
            }
            std::fs::write(d.join(format!("{name}_X.bin")), x).unwrap();
            let y: Vec<u8> = (0..n).map(|i| (i % 10 + 1) as u8).collect();
            std::fs::write(d.join(format!("{name}_y.bin")), y).unwrap();
        }
    }

    #[test]
    fn transposes_column_major_planes_and_shifts_labels() {
        let d = std::env::temp_dir().join(format!("ldl-stl-{}", std::process::id()));
        fixture(&d, 3);
        let ((info, labels, pixels), (tinfo, tlabels, _)) = stl10(&d).unwrap();
        assert_eq!((info.n, info.h, info.w, info.k()), (3, 96, 96, 10));
        assert_eq!(labels, vec![0, 1, 2]);
        assert_eq!((tinfo.n, tlabels), (1, vec![0]));
        // Image 2, channel 1 (G), row 5, column 70, row-major in the store.
        let at = 2 * IMAGE + PLANE + 5 * SIDE + 70;
        assert_eq!(pixels[at], (2 * 7 + 50 + 5 * 3 + 70) as u8); // 149 < 256: no wrap
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn malformed_files_are_refused() {
        let d = std::env::temp_dir().join(format!("ldl-stl-bad-{}", std::process::id()));
        fixture(&d, 2);
        std::fs::write(d.join("train_y.bin"), [1u8, 11]).unwrap();
        let e = stl10(&d).unwrap_err().to_string();
        assert!(
            e.contains("train_y.bin") && e.contains("record 1") && e.contains("label 11"),
            "{e}"
        );
        std::fs::write(d.join("train_y.bin"), [1u8]).unwrap();
        let e = stl10(&d).unwrap_err().to_string();
        assert!(
            e.contains("train_y.bin") && e.contains("1 labels for the 2 images"),
            "{e}"
        );
        let mut x = std::fs::read(d.join("test_X.bin")).unwrap();
        x.truncate(IMAGE - 1);
        std::fs::write(d.join("test_X.bin"), x).unwrap();
        std::fs::write(d.join("train_y.bin"), [1u8, 2]).unwrap();
        let e = stl10(&d).unwrap_err().to_string();
        assert!(
            e.contains("test_X.bin")
                && e.contains("not a whole number")
                && e.contains(&format!("0 complete images and {} bytes over", IMAGE - 1)),
            "{e}"
        );
        std::fs::remove_file(d.join("class_names.txt")).unwrap();
        let e = stl10(&d).unwrap_err().to_string();
        assert!(e.contains("class_names.txt"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
