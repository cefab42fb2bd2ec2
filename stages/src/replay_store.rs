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
//!   The footer's key-value metadata holds `ldl.replay.epoch`, `ldl.replay.fingerprint` (the
//!   stage's fingerprint and its teachers' weight hashes, for resuming) and
//!   `ldl.replay.digests`: each step's [`crate::stream::digest`], so a reader checks that every
//!   stored output belongs to the very images of its batch.

use crate::error::{Result, StageError};
use crate::label_store::schema::{float_list, floats_of};
use crate::label_store::validate::RowCheck;
use crate::label_store::write::top_k_columns;
use crate::label_store::{expand_top_k, guard, open_parquet, StoreDtype};
use crate::stream::{digest, BatchStream};
use arrow::array::{
    Array, ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, UInt16Array, UInt32Array,
};
use arrow::datatypes::{DataType, Field, Schema};
use datasets::Batch;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, RowSelection, RowSelector};
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
        let pairs: [(&str, String, String); 6] = [
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
            (
                "stream.view",
                format!("{:?}", s.view),
                format!("{:?}", w.view),
            ),
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
    /// (what the epoch is reused under: the replay stage's fingerprint and teachers' weights)
    /// goes into the footer.
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
    let builder = open_parquet(path)?;
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
        let builder = open_parquet(&path)?;
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
        let reader = &mut self.reader;
        let rb = guard(&self.path, || {
            reader
                .next()
                .ok_or_else(|| bad("missing: the epoch ends before it".into()))?
                .map_err(|e| bad(format!("cannot read: {e}")))
        })?;
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
        let first_row = self.step * self.meta.stream.batch_size;
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
                    let mut dense = floats_of(&col).into_owned();
                    self.check_dense(&mut dense, first_row, &t.name)?;
                    dense
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
                    let top_k = TopKRows {
                        classes: &cls,
                        probs: &ps,
                        rest: rest.values(),
                        top,
                    };
                    self.expand_checked(&top_k, b, first_row, &t.name)?
                }
            };
            out.push(dense);
        }
        self.step += 1;
        Ok(out)
    }
}

/// One teacher's top-k columns of one step.
struct TopKRows<'a> {
    classes: &'a [u16],
    probs: &'a [f32],
    rest: &'a [f32],
    top: usize,
}

impl EpochReader {
    /// The checks of the label store's reader, on the columns of teacher column `prefix`.
    fn row_check<'a>(&'a self, prefix: &'a str) -> RowCheck<'a> {
        RowCheck {
            path: &self.path,
            tolerance: self.meta.dtype.sum_tolerance(self.meta.classes),
            prefix,
        }
    }

    /// Checks a teacher's dense rows: logits finite; probabilities a distribution, renormalised
    /// from float16 (rounding leaves their sums up to 3·10⁻⁴ from 1 at K = 100).
    fn check_dense(&self, dense: &mut [f32], first_row: usize, column: &str) -> Result<()> {
        let k = self.meta.classes;
        if self.meta.output == Output::Logits {
            if let Some(i) = dense.iter().position(|v| !v.is_finite()) {
                return Err(StageError::invalid(
                    &self.path,
                    format!("row {}, column `{column}`", first_row + i / k),
                    format!("logit {} is not finite", dense[i]),
                ));
            }
            return Ok(());
        }
        let check = self.row_check("");
        for (i, row) in dense.chunks_exact_mut(k).enumerate() {
            let sum = check.distribution(first_row + i, column, row, &[], 0.0)?;
            if self.meta.dtype == StoreDtype::F16 {
                row.iter_mut().for_each(|v| *v /= sum);
            }
        }
        Ok(())
    }

    /// Expands `b` checked top-k rows to dense ones (renormalised from float16).
    fn expand_checked(
        &self,
        rows: &TopKRows,
        b: usize,
        first_row: usize,
        column: &str,
    ) -> Result<Vec<f32>> {
        let (k, top) = (self.meta.classes, rows.top);
        let prefix = format!("{column}.");
        let check = self.row_check(&prefix);
        let mut dup = vec![false; k];
        let probs_column = format!("{column}.topk_probs");
        let mut dense = vec![0f32; b * k];
        for (i, row) in dense.chunks_exact_mut(k).enumerate() {
            let (cs, ps, rest) = (
                &rows.classes[i * top..(i + 1) * top],
                &rows.probs[i * top..(i + 1) * top],
                rows.rest[i],
            );
            let at = first_row + i;
            check.top_k_classes(at, cs, k, &mut dup)?;
            check.rest(at, rest, top == k)?;
            let sum = check.distribution(at, &probs_column, ps, cs, rest)?;
            expand_top_k(cs, ps, rest, row);
            if self.meta.dtype == StoreDtype::F16 {
                row.iter_mut().for_each(|v| *v /= sum);
            }
        }
        Ok(dense)
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
                view: datasets::view::View::Whole,
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

    /// Writes one step of `outputs` (the first step's two images) for `m`.
    fn write_rows(dir: &Path, m: &ReplayMeta, outputs: Vec<f32>) {
        let mut once = Some(StepRows {
            batch: batch(0, vec![2, 0], 0.5),
            outputs: vec![outputs],
        });
        m.write_epoch(dir, 0, "fp", |_| Ok(once.take())).unwrap();
    }

    /// Probabilities stored as float16 come back as distributions: rounding 0.7, 0.2, 0.1 to
    /// float16 gives 0.70020, 0.19995, 0.09998, summing to 1.00012; the reader divides by the sum.
    #[test]
    fn float16_probabilities_are_renormalised() {
        let dir = tempfile::tempdir().unwrap();
        for top_k in [None, Some(2)] {
            let mut m = meta(top_k, StoreDtype::F16);
            m.output = Output::Probs;
            m.teacher_mc = 2;
            write(dir.path(), &m);
            let mut r = EpochReader::open(dir.path(), &m, 0, 0).unwrap();
            for (b, want) in steps() {
                let got = r.next_step(&b).unwrap();
                for (row, want) in got[0].chunks_exact(3).zip(want.chunks_exact(3)) {
                    let sum: f32 = row.iter().sum();
                    assert!((sum - 1.0).abs() < 1e-6, "{top_k:?}: {row:?} sums to {sum}");
                    for (g, w) in row.iter().zip(want) {
                        assert!((g - w).abs() < 1e-3, "{top_k:?}: {g} vs {w}");
                    }
                }
            }
        }
    }

    /// Stored values the label store's reader would refuse are refused here too, naming the
    /// file, the row and the column: a negative probability, a logit that is not finite, a
    /// top-k row naming a class twice (which expanded to a row summing to 0.4).
    #[test]
    fn damaged_values_are_refused_naming_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let read = |m: &ReplayMeta| {
            EpochReader::open(dir.path(), m, 0, 0)
                .unwrap()
                .next_step(&steps()[0].0)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        let mut probs = meta(None, StoreDtype::F32);
        probs.output = Output::Probs;
        write_rows(dir.path(), &probs, vec![0.7, 0.2, 0.1, 0.6, -0.1, 0.5]);
        let e = read(&probs);
        assert!(
            e.contains("epoch-00000.parquet") && e.contains("row 1") && e.contains("`t`"),
            "{e}"
        );
        let logits = meta(None, StoreDtype::F32);
        write_rows(dir.path(), &logits, vec![1.0, 2.0, 3.0, f32::NAN, 0.0, 1.0]);
        let e = read(&logits);
        assert!(e.contains("row 1") && e.contains("not finite"), "{e}");
        // A top-2 file whose first row names class 0 twice (written, then its column altered).
        let top = meta(Some(2), StoreDtype::F32);
        write(dir.path(), &top);
        let path = epoch_file(dir.path(), 0);
        let builder = open_parquet(&path).unwrap();
        let kv = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .cloned();
        let schema = builder.schema().clone();
        let batches: Vec<RecordBatch> = builder.build().unwrap().map(|b| b.unwrap()).collect();
        let mut w =
            ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema, None).unwrap();
        for rb in batches {
            let i = rb.schema().index_of("t.topk_classes").unwrap();
            let old = rb
                .column(i)
                .as_any()
                .downcast_ref::<FixedSizeListArray>()
                .unwrap();
            let mut classes = old
                .values()
                .as_any()
                .downcast_ref::<UInt16Array>()
                .unwrap()
                .values()
                .to_vec();
            // Row 0's second class becomes its first.
            classes[1] = classes[0];
            let field = match old.data_type() {
                DataType::FixedSizeList(f, _) => f.clone(),
                _ => unreachable!(),
            };
            let list =
                FixedSizeListArray::new(field, 2, Arc::new(UInt16Array::from(classes)), None);
            let mut columns = rb.columns().to_vec();
            columns[i] = Arc::new(list);
            w.write(&RecordBatch::try_new(rb.schema(), columns).unwrap())
                .unwrap();
        }
        for e in kv.unwrap() {
            w.append_key_value_metadata(e);
        }
        w.close().unwrap();
        let e = read(&top);
        assert!(
            e.contains("epoch-00000.parquet")
                && e.contains("row 0, column `t.topk_classes`")
                && e.contains("distinct"),
            "{e}"
        );
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
