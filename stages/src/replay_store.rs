//! The replay store: the outputs of one or more teachers on every batch of a training's batch
//! stream ([`crate::stream`]), computed once by a `replay` stage and read by every student with
//! that stream instead of running the teachers on each step.
//!
//! Files, in the replay stage's folder:
//! - `replay.json` ([`ReplayMeta`]): the stream, the epochs, the split's hash, K, the teachers
//!   (names and fingerprints, in order), what is stored (logits, or probabilities with
//!   Monte-Carlo teachers or top-k storage) and how (`dtype`, `top_k`);
//! - `epoch-NNNNN.parquet`, one per epoch: one row per image per step, in step order, keyed by
//!   `step`, `position` (the image's slot in the batch) and `index` (its position in the split),
//!   then per teacher either `<teacher>` (`FixedSizeList<float32|float16, K>`) or
//!   `<teacher>.topk_classes`, `<teacher>.topk_probs`, `<teacher>.rest` (as in the label store).
//!   The footer's key-value metadata holds `ldl.replay.epoch`, `ldl.replay.fingerprint` and
//!   `ldl.replay.digests`: each step's [`crate::stream::digest`], so a reader checks that every
//!   stored output belongs to the very images of its batch.

use crate::error::{Result, StageError};
use crate::label_store::schema::{float_list, floats_of};
use crate::label_store::write::top_k_columns;
use crate::label_store::{expand_top_k, StoreDtype};
use crate::stream::{digest, BatchStream};
use arrow::array::{
    Array, ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, UInt16Array, UInt32Array,
};
use arrow::datatypes::{DataType, Field, Schema};
use datasets::Batch;
use parquet::arrow::arrow_reader::{
    ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder, RowSelection, RowSelector,
};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The version of the replay store's layout.
pub const FORMAT: u32 = 1;
/// The description's file name.
pub const META_FILE: &str = "replay.json";
/// Rows per Parquet row group of an epoch file.
const ROWS_PER_GROUP: usize = 8192;

/// What a replay store holds of each teacher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// Its logits (deterministic teachers, dense storage): serve every online method.
    Logits,
    /// Its softmax, or the mean of its Monte-Carlo dropout passes: serve the `on-*` methods.
    Probs,
}

/// A teacher of the store: its stage and that stage's fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeacherRef {
    /// The teacher's stage.
    pub name: String,
    /// Its fingerprint.
    pub fingerprint: String,
}

/// `replay.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayMeta {
    /// [`FORMAT`].
    pub format: u32,
    /// The batch stream the outputs are of.
    pub stream: BatchStream,
    /// Epochs stored (a student may read fewer).
    pub epochs: usize,
    /// The training split's hash.
    pub dataset: String,
    /// Images in the split.
    pub images: usize,
    /// Classes K.
    pub classes: usize,
    /// The teachers, in order.
    pub teachers: Vec<TeacherRef>,
    /// Monte-Carlo dropout passes of the teachers (0: deterministic).
    pub teacher_mc: usize,
    /// What is stored.
    pub output: Output,
    /// Storage type of the vectors.
    pub dtype: StoreDtype,
    /// Each distribution stored as its `top_k` largest probabilities and the rest's mass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
}

/// What a student needs of a replay store.
pub struct Want<'a> {
    /// Its batch stream.
    pub stream: &'a BatchStream,
    /// Its epochs.
    pub epochs: usize,
    /// Its training split's hash.
    pub dataset: &'a str,
    /// Its K.
    pub classes: usize,
    /// The teachers its method runs, in order: the store's first ones.
    pub teachers: &'a [TeacherRef],
    /// Its `teacher_mc`.
    pub teacher_mc: usize,
    /// Whether its method reads the teachers' logits (`kd`, `wsl`).
    pub logits: bool,
}

/// The file name of epoch `epoch` in the store's folder.
pub fn epoch_file_name(epoch: usize) -> String {
    format!("epoch-{epoch:05}.parquet")
}

/// The file of epoch `epoch`.
pub fn epoch_file(dir: &Path, epoch: usize) -> PathBuf {
    dir.join(epoch_file_name(epoch))
}

/// Reads `replay.json` of the store in `dir`.
pub fn read_meta(dir: &Path) -> Result<ReplayMeta> {
    let meta: ReplayMeta = engine::json::read(&dir.join(META_FILE))?;
    if meta.format != FORMAT {
        return Err(StageError::invalid(
            dir.join(META_FILE),
            "key `format`",
            format!(
                "replay store format {}, this program reads {FORMAT}",
                meta.format
            ),
        ));
    }
    Ok(meta)
}

impl ReplayMeta {
    /// Refuses a store that is not of `want`'s stream, data, teachers or K, naming the key.
    pub fn check(&self, dir: &Path, want: &Want) -> Result<()> {
        let file = dir.join(META_FILE);
        let refuse =
            |key: &str, msg: String| Err(StageError::invalid(&file, format!("key `{key}`"), msg));
        let s = &self.stream;
        let w = want.stream;
        let pairs: [(&str, String, String); 5] = [
            (
                "stream.batch_size",
                s.batch_size.to_string(),
                w.batch_size.to_string(),
            ),
            (
                "stream.data_seed",
                s.data_seed.to_string(),
                w.data_seed.to_string(),
            ),
            (
                "stream.augment",
                format!("{:?}", s.augment),
                format!("{:?}", w.augment),
            ),
            ("stream.cutout", s.cutout.to_string(), w.cutout.to_string()),
            ("stream.mix", format!("{:?}", s.mix), format!("{:?}", w.mix)),
        ];
        for (key, have, need) in pairs {
            if have != need {
                return refuse(key, format!("the store's batches have {have}, the student's {need}: another batch stream"));
            }
        }
        if self.classes != want.classes {
            return refuse(
                "classes",
                format!(
                    "the store holds K = {}, the student has {} classes",
                    self.classes, want.classes
                ),
            );
        }
        if self.dataset != want.dataset {
            return refuse(
                "dataset",
                format!(
                    "the store is of split {}, the student trains on {}",
                    self.dataset, want.dataset
                ),
            );
        }
        // A store of more teachers serves a student of its first ones (an `on-ldl` student
        // reads the first teacher of an ensemble's store).
        if !self.teachers.starts_with(want.teachers) {
            let names = |t: &[TeacherRef]| {
                t.iter()
                    .map(|t| {
                        format!(
                            "{} ({})",
                            t.name,
                            &t.fingerprint[..12.min(t.fingerprint.len())]
                        )
                    })
                    .collect::<Vec<_>>()
            };
            return refuse(
                "teachers",
                format!(
                    "the store is of teachers {:?}, the student's are {:?}",
                    names(&self.teachers),
                    names(want.teachers)
                ),
            );
        }
        if self.teacher_mc != want.teacher_mc {
            return refuse(
                "teacher_mc",
                format!(
                    "the store holds {} Monte-Carlo passes per teacher, the student asks for {}",
                    self.teacher_mc, want.teacher_mc
                ),
            );
        }
        if self.epochs < want.epochs {
            return refuse(
                "epochs",
                format!(
                    "the store holds {} epochs, the student trains {}",
                    self.epochs, want.epochs
                ),
            );
        }
        if want.logits && self.output != Output::Logits {
            return refuse("output", "the store holds probabilities (Monte-Carlo teachers or top-k storage); kd and wsl need the teachers' logits".into());
        }
        Ok(())
    }

    fn schema(&self) -> Schema {
        let u32f = |n: &str| Field::new(n, DataType::UInt32, false);
        let list = |n: String, dt: DataType, w: usize| {
            Field::new(
                n,
                DataType::FixedSizeList(Arc::new(Field::new("item", dt, false)), w as i32),
                false,
            )
        };
        let mut fields = vec![u32f("step"), u32f("position"), u32f("index")];
        for t in &self.teachers {
            match self.top_k {
                None => fields.push(list(t.name.clone(), self.dtype.arrow(), self.classes)),
                Some(k) => {
                    fields.push(list(
                        format!("{}.topk_classes", t.name),
                        DataType::UInt16,
                        k,
                    ));
                    fields.push(list(
                        format!("{}.topk_probs", t.name),
                        self.dtype.arrow(),
                        k,
                    ));
                    fields.push(Field::new(
                        format!("{}.rest", t.name),
                        DataType::Float32,
                        false,
                    ));
                }
            }
        }
        Schema::new(fields)
    }
}

/// One step's rows: the batch and each teacher's outputs (`b × K`, row-major).
pub struct StepRows {
    /// The batch.
    pub batch: Batch,
    /// Each teacher's outputs.
    pub outputs: Vec<Vec<f32>>,
}

fn to_io(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl ReplayMeta {
    /// The record batch of one step.
    fn step_batch(
        &self,
        schema: &Arc<Schema>,
        rows: &StepRows,
    ) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
        let b = rows.batch.len();
        let k = self.classes;
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(UInt32Array::from(vec![rows.batch.index as u32; b])),
            Arc::new(UInt32Array::from_iter_values(0..b as u32)),
            Arc::new(UInt32Array::from(rows.batch.indices.clone())),
        ];
        for out in &rows.outputs {
            match self.top_k {
                None => cols.push(Arc::new(float_list(out, k, self.dtype, None)?)),
                Some(t) => cols.extend(top_k_columns(out, k, t, self.dtype)?),
            }
        }
        RecordBatch::try_new(schema.clone(), cols)
    }

    /// Writes epoch `epoch` atomically: `next(spent)` yields its steps in order until `None`,
    /// and gets back each step's batch once written (to recycle its buffers). `fingerprint`
    /// (the replay stage's) goes into the footer.
    pub fn write_epoch(
        &self,
        dir: &Path,
        epoch: usize,
        fingerprint: &str,
        mut next: impl FnMut(Option<Batch>) -> Result<Option<StepRows>>,
    ) -> Result<()> {
        let path = epoch_file(dir, epoch);
        let schema = Arc::new(self.schema());
        // Bounded row groups: the writer holds one in memory (8,192 rows of K = 1000 f32 are
        // 32 MB), whatever the epoch's size.
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(
                ZstdLevel::try_new(3).expect("valid level"),
            ))
            .set_dictionary_enabled(false)
            .set_max_row_group_row_count(Some(ROWS_PER_GROUP));
        // float32 vectors compress better split into byte planes (as in the label store);
        // float16 ones stay PLAIN, which every reader takes.
        if self.dtype == StoreDtype::F32 {
            for t in &self.teachers {
                let column = match self.top_k {
                    None => t.name.clone(),
                    Some(_) => format!("{}.topk_probs", t.name),
                };
                let leaf = ColumnPath::new(vec![column, "list".into(), "item".into()]);
                props = props.set_column_encoding(leaf, Encoding::BYTE_STREAM_SPLIT);
            }
        }
        let props = props.build();
        let mut failed: Option<StageError> = None;
        let written = datasets::atomic::write_with(&path, |w| {
            let mut writer = ArrowWriter::try_new(w, schema.clone(), Some(props)).map_err(to_io)?;
            let mut digests = Vec::new();
            let mut spent = None;
            loop {
                let rows = match next(spent.take()) {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        let msg = e.to_string();
                        failed = Some(e);
                        return Err(to_io(msg));
                    }
                };
                digests.push(digest(&rows.batch));
                writer
                    .write(&self.step_batch(&schema, &rows).map_err(to_io)?)
                    .map_err(to_io)?;
                spent = Some(rows.batch);
            }
            let kv = |k: &str, v: String| KeyValue::new(format!("ldl.replay.{k}"), v);
            writer.append_key_value_metadata(kv("epoch", epoch.to_string()));
            writer.append_key_value_metadata(kv("fingerprint", fingerprint.to_string()));
            writer.append_key_value_metadata(kv(
                "digests",
                serde_json::to_string(&digests).expect("json"),
            ));
            writer.close().map_err(to_io)?;
            Ok(())
        });
        match (failed, written) {
            (Some(e), _) => Err(e),
            (None, r) => Ok(r?),
        }
    }
}

/// The footer metadata value `ldl.replay.<key>` of an epoch file, if any.
fn footer(path: &Path, key: &str) -> Result<Option<String>> {
    let file = std::fs::File::open(path).map_err(|e| StageError::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| StageError::invalid(path, "parquet footer", format!("cannot read: {e}")))?;
    let kv = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned()
        .unwrap_or_default();
    Ok(kv
        .into_iter()
        .find(|e| e.key == format!("ldl.replay.{key}"))
        .and_then(|e| e.value))
}

/// Whether epoch `epoch` is stored complete by the stage with `fingerprint` (a file renamed
/// into place by a run of that stage).
pub fn epoch_done(dir: &Path, epoch: usize, fingerprint: &str) -> bool {
    let path = epoch_file(dir, epoch);
    path.exists() && footer(&path, "fingerprint").ok().flatten().as_deref() == Some(fingerprint)
}

/// Reads one epoch of a store, step by step, for a student.
pub struct EpochReader {
    path: PathBuf,
    meta: ReplayMeta,
    reader: ParquetRecordBatchReader,
    digests: Vec<String>,
    step: usize,
}

impl EpochReader {
    /// Opens epoch `epoch` of the store in `dir` at step `first` (a resumed student's).
    pub fn open(dir: &Path, meta: &ReplayMeta, epoch: usize, first: usize) -> Result<EpochReader> {
        let path = epoch_file(dir, epoch);
        let bad = |place: &str, msg: String| StageError::invalid(&path, place.to_string(), msg);
        let digests: Vec<String> = match footer(&path, "digests")? {
            Some(d) => serde_json::from_str(&d)
                .map_err(|e| bad("metadata `ldl.replay.digests`", e.to_string()))?,
            None => return Err(bad("metadata `ldl.replay.digests`", "missing".into())),
        };
        let file = std::fs::File::open(&path).map_err(|e| StageError::io(&path, e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| bad("parquet footer", e.to_string()))?;
        let expected = meta.schema();
        if builder.schema().fields() != expected.fields() {
            return Err(bad(
                "schema",
                format!(
                    "{:?}, expected {:?}",
                    builder.schema().fields(),
                    expected.fields()
                ),
            ));
        }
        let total = builder.metadata().file_metadata().num_rows() as usize;
        let skip = (first * meta.stream.batch_size).min(total);
        let reader = builder
            .with_batch_size(meta.stream.batch_size)
            .with_row_selection(RowSelection::from(vec![
                RowSelector::skip(skip),
                RowSelector::select(total - skip),
            ]))
            .build()
            .map_err(|e| bad("parquet", e.to_string()))?;
        Ok(EpochReader {
            path,
            meta: meta.clone(),
            reader,
            digests,
            step: first,
        })
    }

    /// The teachers' outputs (`b × K` each, dense) on `batch`, the next step's: refused unless
    /// the stored step, positions, image indices and digest are the batch's.
    pub fn next_step(&mut self, batch: &Batch) -> Result<Vec<Vec<f32>>> {
        let at = format!("step {}", self.step);
        let bad = |msg: String| StageError::invalid(&self.path, at.clone(), msg);
        if batch.index != self.step {
            return Err(bad(format!("the student is at step {}", batch.index)));
        }
        let rb = self
            .reader
            .next()
            .ok_or_else(|| bad("missing: the epoch ends before it".into()))?
            .map_err(|e| bad(format!("cannot read: {e}")))?;
        let u32s = |name: &str| {
            rb.column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<UInt32Array>().cloned())
        };
        let (steps, positions, indices) = (u32s("step"), u32s("position"), u32s("index"));
        let (Some(steps), Some(positions), Some(indices)) = (steps, positions, indices) else {
            return Err(bad("missing key columns".into()));
        };
        let b = batch.len();
        if rb.num_rows() != b
            || steps.values().iter().any(|&s| s as usize != self.step)
            || positions
                .values()
                .iter()
                .enumerate()
                .any(|(i, &p)| p as usize != i)
        {
            return Err(bad(format!(
                "{} rows of steps {:?}…, expected the {b} rows of this step",
                rb.num_rows(),
                steps.values().first()
            )));
        }
        if indices.values().as_ref() != batch.indices.as_slice() {
            return Err(bad(
                "its images are not the student's: another batch stream".into(),
            ));
        }
        let want = digest(batch);
        if self.digests.get(self.step) != Some(&want) {
            return Err(bad(format!(
                "digest {:?}, the student's batch has {want}: other pixels (augmentation or data)",
                self.digests.get(self.step)
            )));
        }
        let k = self.meta.classes;
        let mut out = Vec::with_capacity(self.meta.teachers.len());
        for t in &self.meta.teachers {
            let list = |name: &str| {
                rb.column_by_name(name)
                    .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>().cloned())
            };
            let dense = match self.meta.top_k {
                None => {
                    let col =
                        list(&t.name).ok_or_else(|| bad(format!("no column `{}`", t.name)))?;
                    floats_of(&col).into_owned()
                }
                Some(top) => {
                    let classes = list(&format!("{}.topk_classes", t.name))
                        .ok_or_else(|| bad(format!("no column `{}.topk_classes`", t.name)))?;
                    let probs = list(&format!("{}.topk_probs", t.name))
                        .ok_or_else(|| bad(format!("no column `{}.topk_probs`", t.name)))?;
                    let rest = rb
                        .column_by_name(&format!("{}.rest", t.name))
                        .and_then(|c| c.as_any().downcast_ref::<Float32Array>().cloned())
                        .ok_or_else(|| bad(format!("no column `{}.rest`", t.name)))?;
                    let cls = classes
                        .values()
                        .as_any()
                        .downcast_ref::<UInt16Array>()
                        .ok_or_else(|| bad("topk_classes is not uint16".into()))?
                        .values()
                        .to_vec();
                    let ps = floats_of(&probs);
                    let mut dense = vec![0f32; b * k];
                    for (i, row) in dense.chunks_exact_mut(k).enumerate() {
                        expand_top_k(
                            &cls[i * top..(i + 1) * top],
                            &ps[i * top..(i + 1) * top],
                            rest.value(i),
                            row,
                        );
                    }
                    dense
                }
            };
            out.push(dense);
        }
        self.step += 1;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::AugmentName;
    use datasets::mix::Mix;

    fn meta(top_k: Option<usize>, dtype: StoreDtype) -> ReplayMeta {
        ReplayMeta {
            format: FORMAT,
            stream: BatchStream {
                batch_size: 2,
                augment: AugmentName::None,
                cutout: 0,
                mix: Mix::None {},
                data_seed: 1,
                rotations: false,
            },
            epochs: 1,
            dataset: "d".into(),
            images: 3,
            classes: 3,
            teachers: vec![TeacherRef {
                name: "t".into(),
                fingerprint: "f".repeat(64),
            }],
            teacher_mc: 0,
            output: if top_k.is_some() {
                Output::Probs
            } else {
                Output::Logits
            },
            dtype,
            top_k,
        }
    }

    fn batch(index: usize, indices: Vec<u32>, pixel: f32) -> Batch {
        Batch {
            index,
            images: vec![pixel; indices.len() * 4],
            labels: vec![0; indices.len()],
            indices,
            ..Batch::default()
        }
    }

    /// Two steps (2 + 1 images) of outputs.
    fn steps() -> Vec<(Batch, Vec<f32>)> {
        vec![
            (
                batch(0, vec![2, 0], 0.5),
                vec![0.7, 0.2, 0.1, 0.25, 0.5, 0.25],
            ),
            (batch(1, vec![1], -0.5), vec![0.1, 0.3, 0.6]),
        ]
    }

    fn write(dir: &Path, m: &ReplayMeta) {
        let mut it = steps().into_iter();
        m.write_epoch(dir, 0, "fp", |_| {
            Ok(it.next().map(|(batch, out)| StepRows {
                batch,
                outputs: vec![out],
            }))
        })
        .unwrap();
    }

    /// Dense f32 comes back exactly, f16 to its precision, top-2 as the two kept values with
    /// the rest spread over the others; a step read at the wrong place is refused.
    #[test]
    fn epochs_round_trip_in_every_storage() {
        let dir = tempfile::tempdir().unwrap();
        for (top_k, dtype, tol) in [
            (None, StoreDtype::F32, 0.0),
            (None, StoreDtype::F16, 1e-3),
            // Top-2 of 3 keeps two values; the third is the rest, the sum of the classes left
            // out: its own mass, exactly (1 − 0.7 − 0.2 is not 0.1 in f32).
            (Some(2), StoreDtype::F32, 0.0),
        ] {
            let m = meta(top_k, dtype);
            write(dir.path(), &m);
            assert!(epoch_done(dir.path(), 0, "fp") && !epoch_done(dir.path(), 0, "other"));
            let mut r = EpochReader::open(dir.path(), &m, 0, 0).unwrap();
            for (b, want) in steps() {
                let got = r.next_step(&b).unwrap();
                for (g, w) in got[0].iter().zip(&want) {
                    assert!((g - w).abs() <= tol, "{top_k:?} {dtype:?}: {g} vs {w}");
                }
            }
            // Resumed at step 1, the reader starts there.
            let mut r = EpochReader::open(dir.path(), &m, 0, 1).unwrap();
            let (b1, w1) = steps().remove(1);
            assert!((r.next_step(&b1).unwrap()[0][2] - w1[2]).abs() <= tol);
        }
        // Top-1 of [0.25, 0.5, 0.25]: 0.5 kept, 0.5 rest spread as 0.25 on each other class;
        // of [0.7, 0.2, 0.1]: 0.7 kept, 0.15 on the others.
        let m = meta(Some(1), StoreDtype::F32);
        write(dir.path(), &m);
        let mut r = EpochReader::open(dir.path(), &m, 0, 0).unwrap();
        let got = r.next_step(&steps()[0].0).unwrap();
        let want = [0.7, 0.15, 0.15, 0.25, 0.5, 0.25];
        for (g, w) in got[0].iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }

        let m = meta(None, StoreDtype::F32);
        write(dir.path(), &m);
        let other_pixels = batch(0, vec![2, 0], 0.25);
        let e = EpochReader::open(dir.path(), &m, 0, 0)
            .unwrap()
            .next_step(&other_pixels)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("epoch-00000.parquet") && e.contains("step 0") && e.contains("digest"),
            "{e}"
        );
        let other_images = batch(0, vec![0, 2], 0.5);
        let e = EpochReader::open(dir.path(), &m, 0, 0)
            .unwrap()
            .next_step(&other_images)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not the student's"), "{e}");
    }

    /// A store of another K or dataset is refused naming the key.
    #[test]
    fn another_k_or_dataset_is_refused() {
        let m = meta(None, StoreDtype::F32);
        let want = |classes, dataset| Want {
            stream: &m.stream,
            epochs: 1,
            dataset,
            classes,
            teachers: &m.teachers,
            teacher_mc: 0,
            logits: true,
        };
        let dir = Path::new("store");
        assert!(m.check(dir, &want(3, "d")).is_ok());
        let e = m.check(dir, &want(4, "d")).unwrap_err().to_string();
        assert!(
            e.contains("store/replay.json") && e.contains("key `classes`"),
            "{e}"
        );
        let e = m.check(dir, &want(3, "other")).unwrap_err().to_string();
        assert!(e.contains("key `dataset`"), "{e}");
        let top = meta(Some(2), StoreDtype::F32);
        let e = top.check(dir, &want(3, "d")).unwrap_err().to_string();
        assert!(e.contains("key `output`"), "{e}");
    }
}
