//! A prepared dataset: `dataset.json` and the packed splits a `prepare` stage writes, opened
//! (and their contents re-checked) by every stage that reads them.

use crate::error::{Result, StageError};
use datasets::augment::Normalize;
use datasets::PackedStore;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// One packed split as described in `dataset.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitInfo {
    /// File name in the stage folder.
    pub file: String,
    /// Number of images.
    pub n: usize,
    /// Content hash of the packed file (its fingerprint).
    pub hash: String,
    /// Images per class, in class order.
    #[serde(default)]
    pub class_counts: Vec<usize>,
}

/// `dataset.json`: what a prepared dataset holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// Class names.
    pub classes: Vec<String>,
    /// Channels, height, width (with `varying`: a bound every image's height and width
    /// reaches).
    pub shape: [usize; 3],
    /// The images vary in size (an ImageFolder packed with `keep_aspect`): models see crops
    /// of them (`crop_size`), never whole images.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub varying: bool,
    /// Training split.
    pub train: SplitInfo,
    /// Test split.
    pub test: SplitInfo,
    /// Validation split held out of the training images (`val`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val: Option<SplitInfo>,
    /// Per-channel statistics of the training split, used to normalise every split.
    pub normalize: Normalize,
}

/// Packed splits up to this size (4 GiB: CIFAR, STL-10, Tiny-ImageNet) are re-hashed whenever
/// a stage opens them, about a second per GiB; larger ones (ImageNet) only by `pipeline inspect`.
pub const VERIFY_LIMIT: u64 = 4 << 30;

/// A prepared dataset opened for reading.
pub struct Dataset {
    /// Its description.
    pub info: DatasetInfo,
    /// Training split.
    pub train: Arc<PackedStore>,
    /// Test split.
    pub test: Arc<PackedStore>,
    /// Validation split, if the stage held one out.
    pub val: Option<Arc<PackedStore>>,
}

impl Dataset {
    /// Opens the dataset a `prepare` stage wrote into `dir`, checking that the packed files
    /// match `dataset.json` and, for splits up to [`VERIFY_LIMIT`] bytes, that their contents
    /// still hash to the recorded fingerprint (a damaged pixel is refused, not trained on).
    pub fn open(dir: &Path) -> Result<Dataset> {
        let info: DatasetInfo = engine::json::read(&dir.join("dataset.json"))?;
        let open = |s: &SplitInfo| -> Result<Arc<PackedStore>> {
            let p = dir.join(&s.file);
            let store = PackedStore::open(&p)?;
            let i = store.info();
            let info_differs = i.classes != info.classes
                || i.varying != info.varying
                || [i.c, i.h, i.w] != info.shape;
            if store.hash() != s.hash || store.len() != s.n || info_differs {
                return Err(StageError::invalid(
                    &p,
                    "header",
                    format!(
                        "does not match dataset.json (hash {}, {} images of {:?}): the folder \
                         was modified",
                        s.hash, s.n, info.shape
                    ),
                ));
            }
            let bytes = std::fs::metadata(&p)
                .map_err(|e| StageError::io(&p, e))?
                .len();
            if bytes <= VERIFY_LIMIT {
                store.verify()?;
            } else {
                tracing::debug!(
                    "{}: {bytes} bytes, content hash not re-checked (`pipeline inspect` does)",
                    p.display()
                );
            }
            Ok(Arc::new(store))
        };
        let (train, test) = (open(&info.train)?, open(&info.test)?);
        let val = info.val.as_ref().map(open).transpose()?;
        Ok(Dataset {
            info,
            train,
            test,
            val,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datasets::{PackedWriter, StoreInfo};

    /// A dataset whose `dataset.json` describes its packs opens; one whose recorded shape or
    /// `varying` flag was edited (so a crop checked against it could fall outside the images)
    /// is refused, naming the pack and what it should hold.
    #[test]
    fn a_dataset_json_that_disagrees_with_its_packs_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreInfo {
            n: 2,
            h: 4,
            w: 4,
            c: 3,
            classes: vec!["a".into(), "b".into()],
            varying: false,
        };
        let split = |name: &str| {
            let file = format!("{name}.pack");
            let hash =
                PackedWriter::write(&dir.path().join(&file), &store, &[0, 1], &[7; 96]).unwrap();
            SplitInfo {
                file,
                n: 2,
                hash,
                class_counts: vec![1, 1],
            }
        };
        let info = DatasetInfo {
            classes: store.classes.clone(),
            shape: [3, 4, 4],
            varying: false,
            train: split("train"),
            test: split("test"),
            val: None,
            normalize: Normalize {
                mean: vec![0.5; 3],
                std: vec![0.25; 3],
            },
        };
        let open = |info: &DatasetInfo| {
            engine::json::write(&dir.path().join("dataset.json"), info).unwrap();
            Dataset::open(dir.path())
        };
        assert_eq!(open(&info).unwrap().train.len(), 2);
        for edited in [
            DatasetInfo {
                shape: [3, 5, 5],
                ..info.clone()
            },
            DatasetInfo {
                varying: true,
                ..info.clone()
            },
        ] {
            let e = open(&edited).err().expect("refused").to_string();
            assert!(
                e.contains("train.pack") && e.contains("does not match dataset.json"),
                "{e}"
            );
        }
    }
}
