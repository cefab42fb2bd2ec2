//! Readers for the official binary versions of CIFAR-10 and CIFAR-100.
//!
//! CIFAR-10: `data_batch_1.bin` … `data_batch_5.bin`, `test_batch.bin`, `batches.meta.txt`; a
//! record is 1 label byte + 3072 pixel bytes (1024 R, 1024 G, 1024 B, each plane row-major 32×32).
//! CIFAR-100: `train.bin`, `test.bin`, `fine_label_names.txt`, `coarse_label_names.txt`; a record
//! is 1 coarse label byte + 1 fine label byte + 3072 pixel bytes. The pixel layout is already the
//! packed store's CHW, so records are copied as they are.

use crate::error::{DatasetError, Result};
use crate::packed::StoreInfo;
use std::path::Path;

const PIXELS: usize = 3 * 32 * 32;

/// One split read from the official files: its description, labels and CHW pixels.
pub type Split = (StoreInfo, Vec<u32>, Vec<u8>);

/// Which CIFAR-100 label to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cifar100Label {
    /// The 100 fine classes.
    Fine,
    /// The 20 coarse superclasses.
    Coarse,
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| DatasetError::io(path, e))
}

/// Reads a class-name file: one name per line, blank lines ignored, exactly `k` names.
pub(crate) fn read_names(path: &Path, k: usize) -> Result<Vec<String>> {
    let text = String::from_utf8(read(path)?)
        .map_err(|e| DatasetError::format(path, "contents", format!("not UTF-8: {e}")))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if names.len() != k {
        return Err(DatasetError::format(
            path,
            "class names",
            format!("{} names, expected {k}", names.len()),
        ));
    }
    Ok(names)
}

/// A label byte of a record: its offset, its number of classes, what it is called in errors.
#[derive(Clone, Copy)]
struct LabelByte {
    at: usize,
    k: usize,
    name: &'static str,
}

/// CIFAR-10's one label byte.
const CIFAR10_LABEL: LabelByte = LabelByte {
    at: 0,
    k: 10,
    name: "label",
};

/// CIFAR-100's coarse label byte.
const COARSE: LabelByte = LabelByte {
    at: 0,
    k: 20,
    name: "coarse label",
};

/// CIFAR-100's fine label byte.
const FINE: LabelByte = LabelByte {
    at: 1,
    k: 100,
    name: "fine label",
};

/// Appends the records of one binary file, `record` bytes each: the label of byte `label`, and
/// the pixels. Every byte of `checked` (the label's among them) must be in its range: a file
/// whose other label is out of range is not a CIFAR file, whichever label is used.
fn read_records(
    path: &Path,
    record: usize,
    label: LabelByte,
    checked: &[LabelByte],
    labels: &mut Vec<u32>,
    pixels: &mut Vec<u8>,
) -> Result<()> {
    let bytes = read(path)?;
    if bytes.is_empty() {
        return Err(DatasetError::format(
            path,
            "size",
            format!("the file is empty, expected {record}-byte records"),
        ));
    }
    if bytes.len() % record != 0 {
        return Err(DatasetError::format(
            path,
            "size",
            format!(
                "{} bytes is not a whole number of {record}-byte records ({} complete records and {} bytes over)",
                bytes.len(),
                bytes.len() / record,
                bytes.len() % record
            ),
        ));
    }
    for (i, r) in bytes.chunks_exact(record).enumerate() {
        for b in checked {
            let value = r[b.at] as usize;
            if value >= b.k {
                return Err(DatasetError::format(
                    path,
                    format!("record {i} (byte {})", i * record + b.at),
                    format!("{} {value} is outside 0..{}", b.name, b.k),
                ));
            }
        }
        labels.push(r[label.at] as u32);
        pixels.extend_from_slice(&r[record - PIXELS..]);
    }
    Ok(())
}

fn split(classes: Vec<String>, labels: Vec<u32>, pixels: Vec<u8>) -> Split {
    let info = StoreInfo {
        n: labels.len(),
        h: 32,
        w: 32,
        c: 3,
        classes,
        varying: false,
    };
    (info, labels, pixels)
}

/// The files [`cifar10`] reads, in its order (for [`crate::digest`]).
pub fn cifar10_files(dir: &Path, batches: Option<&[u32]>) -> Vec<std::path::PathBuf> {
    let mut files = vec![dir.join("batches.meta.txt")];
    for b in batches.unwrap_or(&[1, 2, 3, 4, 5]) {
        files.push(dir.join(format!("data_batch_{b}.bin")));
    }
    files.push(dir.join("test_batch.bin"));
    files
}

/// The files [`cifar100`] reads, in its order (for [`crate::digest`]).
pub fn cifar100_files(dir: &Path, label: Cifar100Label) -> Vec<std::path::PathBuf> {
    let names = match label {
        Cifar100Label::Fine => "fine_label_names.txt",
        Cifar100Label::Coarse => "coarse_label_names.txt",
    };
    ["train.bin", "test.bin", names]
        .iter()
        .map(|f| dir.join(f))
        .collect()
}

/// Refuses, with what to do instead, a folder of the Python version of a CIFAR dataset (its
/// pickles, as torchvision downloads them: `python_file` there, `binary_file` absent); the
/// readers take the binary version.
fn binary_version(dir: &Path, binary_file: &str, python_file: &str, archive: &str) -> Result<()> {
    if !dir.join(binary_file).exists() && dir.join(python_file).is_file() {
        return Err(DatasetError::format(
            dir,
            python_file,
            format!(
                "this is the Python (pickle) version of the dataset, as torchvision downloads it; \
                 the reader takes the binary version ({archive}, with {binary_file}), or set \
                 fetch = true to download it"
            ),
        ));
    }
    Ok(())
}

/// Reads CIFAR-10 from `dir`: the training batches listed in `batches` (1..=5; all five when
/// `None`) and the test batch.
pub fn cifar10(dir: &Path, batches: Option<&[u32]>) -> Result<(Split, Split)> {
    let all = [1, 2, 3, 4, 5];
    let batches = batches.unwrap_or(&all);
    if let Some(b) = batches.iter().find(|b| !(1..=5).contains(*b)) {
        return Err(DatasetError::Param {
            name: "batches",
            message: format!("CIFAR-10 has training batches 1..=5, not {b}"),
        });
    }
    if let Some((i, b)) = batches
        .iter()
        .enumerate()
        .find(|(i, b)| batches[..*i].contains(b))
    {
        return Err(DatasetError::Param {
            name: "batches",
            message: format!(
                "lists batch {b} twice (again at position {i}): its images would be packed twice"
            ),
        });
    }
    binary_version(
        dir,
        "batches.meta.txt",
        "batches.meta",
        "cifar-10-binary.tar.gz",
    )?;
    let classes = read_names(&dir.join("batches.meta.txt"), 10)?;
    let (mut labels, mut pixels) = (Vec::new(), Vec::new());
    for b in batches {
        let p = dir.join(format!("data_batch_{b}.bin"));
        let label = CIFAR10_LABEL;
        read_records(&p, 1 + PIXELS, label, &[label], &mut labels, &mut pixels)?;
    }
    let train = split(classes.clone(), labels, pixels);
    let (mut labels, mut pixels) = (Vec::new(), Vec::new());
    read_records(
        &dir.join("test_batch.bin"),
        1 + PIXELS,
        CIFAR10_LABEL,
        &[CIFAR10_LABEL],
        &mut labels,
        &mut pixels,
    )?;
    Ok((train, split(classes, labels, pixels)))
}

/// Reads CIFAR-100 from `dir` with fine or coarse labels.
pub fn cifar100(dir: &Path, label: Cifar100Label) -> Result<(Split, Split)> {
    let (names, used) = match label {
        Cifar100Label::Fine => ("fine_label_names.txt", FINE),
        Cifar100Label::Coarse => ("coarse_label_names.txt", COARSE),
    };
    binary_version(dir, "train.bin", "train", "cifar-100-binary.tar.gz")?;
    let classes = read_names(&dir.join(names), used.k)?;
    let mut out = Vec::new();
    for file in ["train.bin", "test.bin"] {
        let (mut labels, mut pixels) = (Vec::new(), Vec::new());
        let (path, record) = (dir.join(file), 2 + PIXELS);
        read_records(
            &path,
            record,
            used,
            &[COARSE, FINE],
            &mut labels,
            &mut pixels,
        )?;
        out.push(split(classes.clone(), labels, pixels));
    }
    let test = out.pop().expect("two splits");
    let train = out.pop().expect("two splits");
    Ok((train, test))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ldl-cifar-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A record whose pixel p has value (seed + p) mod 251, so every byte position is checkable.
    fn record(prefix: &[u8], seed: usize) -> Vec<u8> {
        let mut r = prefix.to_vec();
        r.extend((0..PIXELS).map(|p| ((seed + p) % 251) as u8));
        r
    }

    fn cifar10_fixture(d: &Path) {
        let names: String = (0..10).map(|i| format!("class{i}\n")).collect();
        std::fs::write(d.join("batches.meta.txt"), names + "\n").unwrap();
        for b in 1..=2 {
            let bytes: Vec<u8> = (0..3)
                .flat_map(|i| record(&[(b * 3 + i) as u8 % 10], b * 10 + i))
                .collect();
            std::fs::write(d.join(format!("data_batch_{b}.bin")), bytes).unwrap();
        }
        std::fs::write(d.join("test_batch.bin"), record(&[9], 77)).unwrap();
    }

    #[test]
    fn cifar10_pixels_and_labels_byte_exact() {
        let d = dir("c10");
        cifar10_fixture(&d);
        let ((info, labels, pixels), (tinfo, tlabels, tpixels)) =
            cifar10(&d, Some(&[1, 2])).unwrap();
        assert_eq!(info.n, 6);
        assert_eq!(info.classes[3], "class3");
        assert_eq!(labels, vec![3, 4, 5, 6, 7, 8]);
        // Image 4 = batch 2, record 1: R plane pixel (row 2, col 5) is byte 2·32 + 5.
        let img = &pixels[4 * PIXELS..5 * PIXELS];
        assert_eq!(img[2 * 32 + 5], (21 + 2 * 32 + 5) as u8); // 90 < 251: no wrap
        assert_eq!(img[1024 + 7], ((21 + 1024 + 7) % 251) as u8); // G plane
        assert_eq!((tinfo.n, tlabels[0], tpixels[0]), (1, 9, 77));
        // Without `batches`, all five are required and a missing one is named.
        let e = cifar10(&d, None).unwrap_err().to_string();
        assert!(e.contains("data_batch_3.bin"), "{e}");
    }

    #[test]
    fn cifar10_malformed_inputs() {
        let d = dir("c10bad");
        cifar10_fixture(&d);
        let mut b = std::fs::read(d.join("data_batch_1.bin")).unwrap();
        b.pop();
        std::fs::write(d.join("data_batch_1.bin"), &b).unwrap();
        let e = cifar10(&d, Some(&[1])).unwrap_err().to_string();
        assert!(
            e.contains("data_batch_1.bin") && e.contains("not a whole number of 3073-byte records"),
            "{e}"
        );
        cifar10_fixture(&d);
        let mut b = std::fs::read(d.join("data_batch_2.bin")).unwrap();
        b[3073] = 10; // label of record 1
        std::fs::write(d.join("data_batch_2.bin"), &b).unwrap();
        let e = cifar10(&d, Some(&[2])).unwrap_err().to_string();
        assert!(
            e.contains("data_batch_2.bin")
                && e.contains("record 1 (byte 3073)")
                && e.contains("label 10"),
            "{e}"
        );
        std::fs::write(d.join("batches.meta.txt"), "a\nb\n").unwrap();
        let e = cifar10(&d, Some(&[1])).unwrap_err().to_string();
        assert!(
            e.contains("batches.meta.txt") && e.contains("2 names, expected 10"),
            "{e}"
        );
        let e = cifar10(&d, Some(&[6])).unwrap_err().to_string();
        assert!(e.contains("batches"), "{e}");
        let e = cifar10(&d, Some(&[2, 1, 2])).unwrap_err().to_string();
        assert!(
            e.contains("lists batch 2 twice (again at position 2)"),
            "{e}"
        );
        cifar10_fixture(&d);
        std::fs::write(d.join("data_batch_1.bin"), b"").unwrap();
        let e = cifar10(&d, Some(&[1])).unwrap_err().to_string();
        assert!(
            e.contains("data_batch_1.bin") && e.contains("the file is empty"),
            "{e}"
        );
    }

    /// torchvision's download (the Python version: pickles without extension) is refused with
    /// what to use instead, not with a missing file.
    #[test]
    fn the_python_version_is_refused_with_what_to_use() {
        let d = dir("c10py");
        for f in ["batches.meta", "data_batch_1", "test_batch"] {
            std::fs::write(d.join(f), b"pickle").unwrap();
        }
        let e = cifar10(&d, None).unwrap_err().to_string();
        assert!(
            e.contains("batches.meta")
                && e.contains("Python (pickle) version")
                && e.contains("cifar-10-binary.tar.gz"),
            "{e}"
        );
        let d = dir("c100py");
        for f in ["meta", "train", "test"] {
            std::fs::write(d.join(f), b"pickle").unwrap();
        }
        let e = cifar100(&d, Cifar100Label::Fine).unwrap_err().to_string();
        assert!(
            e.contains("Python (pickle) version") && e.contains("cifar-100-binary.tar.gz"),
            "{e}"
        );
    }

    #[test]
    fn cifar100_fine_and_coarse() {
        let d = dir("c100");
        let fine: String = (0..100).map(|i| format!("f{i}\n")).collect();
        let coarse: String = (0..20).map(|i| format!("c{i}\n")).collect();
        std::fs::write(d.join("fine_label_names.txt"), fine).unwrap();
        std::fs::write(d.join("coarse_label_names.txt"), coarse).unwrap();
        let train: Vec<u8> = [record(&[3, 42], 1), record(&[19, 99], 2)].concat();
        std::fs::write(d.join("train.bin"), train).unwrap();
        std::fs::write(d.join("test.bin"), record(&[0, 5], 3)).unwrap();
        let ((info, labels, pixels), _) = cifar100(&d, Cifar100Label::Fine).unwrap();
        assert_eq!((info.k(), labels.clone()), (100, vec![42, 99]));
        assert_eq!(pixels[PIXELS + 2048 + 31], ((2 + 2048 + 31) % 251) as u8); // B plane of image 1
        let ((info, labels, _), (_, tl, _)) = cifar100(&d, Cifar100Label::Coarse).unwrap();
        assert_eq!((info.k(), labels, tl), (20, vec![3, 19], vec![0]));
        let mut b = std::fs::read(d.join("train.bin")).unwrap();
        b[1] = 100;
        std::fs::write(d.join("train.bin"), &b).unwrap();
        let e = cifar100(&d, Cifar100Label::Fine).unwrap_err().to_string();
        assert!(
            e.contains("train.bin")
                && e.contains("record 0 (byte 1)")
                && e.contains("fine label 100 is outside 0..100"),
            "{e}"
        );
        // The coarse byte is checked when the fine labels are used, and the other way round:
        // a record with coarse label 20 is not CIFAR-100.
        b[1] = 42;
        b[2 + PIXELS] = 20;
        std::fs::write(d.join("train.bin"), &b).unwrap();
        for label in [Cifar100Label::Fine, Cifar100Label::Coarse] {
            let e = cifar100(&d, label).unwrap_err().to_string();
            assert!(
                e.contains(&format!("record 1 (byte {})", 2 + PIXELS))
                    && e.contains("coarse label 20 is outside 0..20"),
                "{e}"
            );
        }
    }
}
