//! The label store: teachers' label distributions in a Parquet file that pyarrow, DuckDB and
//! Polars open directly, one row per (sample, source).
//!
//! Columns: `index` (`uint32`, position of the sample in the prepared split), `label` (`uint32`,
//! the hard label), `source` (`utf8`: a teacher stage's name, `ensemble` for the mean of several
//! teachers, `<teacher>.mc` for a teacher's Monte-Carlo dropout mean), `probs`
//! (`FixedSizeList<float32, K>`), and for `.mc` sources (null elsewhere) `std`
//! (`FixedSizeList<float32, K>`, per-class standard deviation over the passes), `entropy` and
//! `mutual_information` (`float32`, nats). Key-value metadata: `ldl.format_version`,
//! `ldl.k`, `ldl.classes` (JSON list), `ldl.dataset_fingerprint`, `ldl.teachers` (JSON object of
//! stage name → fingerprint), `ldl.temperature`, `ldl.teacher_checkpoints` (stage name → blake3
//! of its weights), `ldl.mc` (with MC sources: passes and dropout rates), `ldl.program_version`. Files are zstd-compressed,
//! the float vectors are BYTE_STREAM_SPLIT-encoded, row groups hold 8192 rows, and files contain no
//! timestamp: the same inputs give byte-identical files. With `dtype = "f16"` the vectors are
//! stored as `float16` (`ldl.dtype`), half the size; the reader renormalises such rows (their
//! rounding can move a sum by up to 2^-11).
//!
//! In memory, a top-k store stays top-k ([`SoftLabels::row_into`] expands one row at a time), so
//! a student of a 1.28M × 1000 ImageNet store holds 43 MB of labels (top-5), not 5 GB.

use crate::error::{Result, StageError};
use arrow::array::{
    Array, ArrayRef, FixedSizeListArray, Float16Array, Float32Array, RecordBatch, StringArray,
    UInt32Array,
};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Rows summing to 1 within this tolerance are accepted.
pub const SUM_TOLERANCE: f32 = 1e-4;

/// What a label store says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelMeta {
    /// Class names (their count is K).
    pub classes: Vec<String>,
    /// Fingerprint of the dataset split the labels index.
    pub dataset_fingerprint: String,
    /// Teacher stage name → fingerprint.
    pub teachers: BTreeMap<String, String>,
    /// Softmax temperature.
    pub temperature: f64,
    /// Teacher stage name → blake3 of its `model.safetensors`.
    pub checkpoints: BTreeMap<String, String>,
    /// Monte-Carlo dropout: passes per sample, and each MC teacher's dropout rate.
    pub mc: Option<McMeta>,
    /// Top-k mode: each distribution is stored as its k largest probabilities and the mass of
    /// the other classes (`ldl.top_k`); `None` stores full vectors.
    pub top_k: Option<usize>,
    /// Storage type of the probability and standard-deviation vectors (`ldl.dtype`).
    pub dtype: StoreDtype,
}

/// Storage type of a store's float vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreDtype {
    /// `float32` (default).
    #[default]
    F32,
    /// `float16`: half the size; about 3 significant digits.
    F16,
}

impl StoreDtype {
    /// The value of `ldl.dtype`.
    pub fn as_str(&self) -> &'static str {
        match self {
            StoreDtype::F32 => "float32",
            StoreDtype::F16 => "float16",
        }
    }
    fn arrow(&self) -> DataType {
        match self {
            StoreDtype::F32 => DataType::Float32,
            StoreDtype::F16 => DataType::Float16,
        }
    }
    /// How far from 1 a stored row may sum: [`SUM_TOLERANCE`], plus for `float16` the worst
    /// rounding of K values summing to 1 (relative 2^-11 each, and 2^-25 absolute for subnormals).
    pub fn sum_tolerance(&self, k: usize) -> f32 {
        match self {
            StoreDtype::F32 => SUM_TOLERANCE,
            StoreDtype::F16 => SUM_TOLERANCE + 2f32.powi(-11) + k as f32 * 2f32.powi(-25),
        }
    }
}

/// How the Monte-Carlo dropout sources were made (`ldl.mc`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct McMeta {
    /// Stochastic passes per sample (N).
    pub samples: usize,
    /// Teacher stage name → its dropout rate p.
    pub dropout: BTreeMap<String, f64>,
}

/// One source's distributions, to be written.
pub struct SourceRows<'a> {
    /// `source` column value.
    pub source: &'a str,
    /// Sample indices.
    pub indices: &'a [u32],
    /// Hard labels.
    pub labels: &'a [u32],
    /// `len × K` probabilities.
    pub probs: &'a [f32],
    /// The uncertainty columns of a Monte-Carlo dropout source (null for other sources).
    pub mc: Option<McRows<'a>>,
}

/// The uncertainty columns of a Monte-Carlo dropout source.
pub struct McRows<'a> {
    /// `len × K` per-class standard deviations over the passes.
    pub std: &'a [f32],
    /// Entropy of the mean distribution (nats), one per row.
    pub entropy: &'a [f32],
    /// Mutual information (nats), one per row.
    pub mutual_information: &'a [f32],
}

fn vector(k: usize, dtype: StoreDtype) -> DataType {
    DataType::FixedSizeList(Arc::new(Field::new("item", dtype.arrow(), false)), k as i32)
}

fn schema(k: usize, top_k: Option<usize>, dtype: StoreDtype) -> Schema {
    let vector = |k| vector(k, dtype);
    let mut fields = vec![
        Field::new("index", DataType::UInt32, false),
        Field::new("label", DataType::UInt32, false),
        Field::new("source", DataType::Utf8, false),
    ];
    match top_k {
        None => fields.push(Field::new("probs", vector(k), false)),
        Some(t) => fields.extend([
            Field::new(
                "topk_classes",
                DataType::FixedSizeList(
                    Arc::new(Field::new("item", DataType::UInt16, false)),
                    t as i32,
                ),
                false,
            ),
            Field::new("topk_probs", vector(t), false),
            Field::new("rest", DataType::Float32, false),
        ]),
    }
    fields.extend([
        Field::new("std", vector(k), true),
        Field::new("entropy", DataType::Float32, true),
        Field::new("mutual_information", DataType::Float32, true),
    ]);
    Schema::new(fields)
}

/// The columns a reader needs in each mode.
fn required(top_k: Option<usize>) -> &'static [&'static str] {
    match top_k {
        None => &["index", "label", "source", "probs"],
        Some(_) => &[
            "index",
            "label",
            "source",
            "topk_classes",
            "topk_probs",
            "rest",
        ],
    }
}

/// The `t` most probable classes of `p`, most probable first (ties: lower class first).
pub fn top_classes(p: &[f32], t: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    order.truncate(t);
    order
}

/// Rebuilds a full distribution from its top-k part: the listed classes get their stored
/// probabilities, and the remaining mass `rest` is spread evenly over the other K − k classes.
pub fn expand_top_k(classes: &[u16], probs: &[f32], rest: f32, out: &mut [f32]) {
    let others = out.len() - classes.len();
    out.fill(if others == 0 {
        0.0
    } else {
        rest / others as f32
    });
    for (&c, &p) in classes.iter().zip(probs) {
        out[c as usize] = p;
    }
}

/// A `FixedSizeList<dtype, width>` of `values` (rounded to nearest for `float16`).
fn float_list(
    values: &[f32],
    width: usize,
    dtype: StoreDtype,
    nulls: Option<NullBuffer>,
) -> std::result::Result<FixedSizeListArray, arrow::error::ArrowError> {
    let item = Arc::new(Field::new("item", dtype.arrow(), false));
    let values: ArrayRef = match dtype {
        StoreDtype::F32 => Arc::new(Float32Array::from(values.to_vec())),
        StoreDtype::F16 => Arc::new(Float16Array::from_iter_values(
            values.iter().map(|&v| half::f16::from_f32(v)),
        )),
    };
    FixedSizeListArray::try_new(item, width as i32, values, nulls)
}

/// The float values of a `FixedSizeList<float32|float16>` column as f32 (converted for float16).
fn floats_of(list: &FixedSizeListArray) -> std::borrow::Cow<'_, [f32]> {
    let values = list.values();
    if let Some(v) = values.as_any().downcast_ref::<Float32Array>() {
        std::borrow::Cow::Borrowed(v.values())
    } else {
        let v = values
            .as_any()
            .downcast_ref::<Float16Array>()
            .expect("schema checked");
        std::borrow::Cow::Owned(v.values().iter().map(|h| h.to_f32()).collect())
    }
}

fn leaf(column: &str) -> ColumnPath {
    ColumnPath::new(vec![column.into(), "list".into(), "item".into()])
}

const ROWS_PER_GROUP: usize = 8192;

/// Writes a label store atomically to `path`.
pub fn write(path: &Path, meta: &LabelMeta, sources: &[SourceRows]) -> Result<()> {
    let k = meta.classes.len();
    if let Some(t) = meta.top_k {
        if t == 0 || t > k || k > u16::MAX as usize + 1 {
            return Err(StageError::Config(format!(
                "{}: top_k = {t} must be in 1..={k} (and K at most 65536)",
                path.display()
            )));
        }
    }
    let schema = Arc::new(schema(k, meta.top_k, meta.dtype));
    let kv = |key: &str, value: String| KeyValue::new(format!("ldl.{key}"), value);
    let mut extra = Vec::new();
    if let Some(t) = meta.top_k {
        extra.push(kv("top_k", t.to_string()));
    }
    if let Some(mc) = &meta.mc {
        extra.push(kv("mc", serde_json::to_string(mc).expect("json")));
    }
    let vector_encoding = match meta.dtype {
        StoreDtype::F32 => Encoding::BYTE_STREAM_SPLIT,
        StoreDtype::F16 => Encoding::PLAIN,
    };
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).expect("valid level"),
        ))
        .set_max_row_group_row_count(Some(ROWS_PER_GROUP))
        // Probabilities compress far better split into byte planes than as dictionary pages:
        // exponents and high mantissa bytes repeat, low bytes are noise.
        // (arrow-rs names a list's leaf column `<name>.list.item`).
        // float16 vectors are stored PLAIN: DuckDB (2.0) cannot read BYTE_STREAM_SPLIT on their
        // FIXED_LEN_BYTE_ARRAY(2) physical type.
        .set_column_dictionary_enabled(leaf("probs"), false)
        .set_column_encoding(leaf("probs"), vector_encoding)
        .set_column_dictionary_enabled(leaf("topk_probs"), false)
        .set_column_encoding(leaf("topk_probs"), vector_encoding)
        .set_column_dictionary_enabled(leaf("std"), false)
        .set_column_encoding(leaf("std"), vector_encoding)
        .set_key_value_metadata(Some(
            vec![
                kv("format_version", crate::FORMAT_VERSION.to_string()),
                kv("k", k.to_string()),
                kv(
                    "classes",
                    serde_json::to_string(&meta.classes).expect("json"),
                ),
                kv("dataset_fingerprint", meta.dataset_fingerprint.clone()),
                kv(
                    "teachers",
                    serde_json::to_string(&meta.teachers).expect("json"),
                ),
                kv("temperature", meta.temperature.to_string()),
                kv("dtype", meta.dtype.as_str().to_string()),
                kv(
                    "teacher_checkpoints",
                    serde_json::to_string(&meta.checkpoints).expect("json"),
                ),
                kv("program_version", crate::PROGRAM_VERSION.to_string()),
            ]
            .into_iter()
            .chain(extra)
            .collect(),
        ))
        .build();
    let to_io = |e: parquet::errors::ParquetError| std::io::Error::other(e.to_string());
    datasets::atomic::write_with(path, |w| {
        let mut writer = ArrowWriter::try_new(w, schema.clone(), Some(props)).map_err(to_io)?;
        for s in sources {
            for lo in (0..s.indices.len()).step_by(ROWS_PER_GROUP) {
                let hi = (lo + ROWS_PER_GROUP).min(s.indices.len());
                let rows = hi - lo;
                let list = |values: &[f32], width: usize, nulls: Option<NullBuffer>| {
                    float_list(values, width, meta.dtype, nulls)
                        .map_err(|e| std::io::Error::other(e.to_string()))
                };
                let probs: Vec<ArrayRef> = match meta.top_k {
                    None => vec![Arc::new(list(&s.probs[lo * k..hi * k], k, None)?)],
                    Some(t) => {
                        let (mut classes, mut top, mut rest) = (
                            Vec::with_capacity(rows * t),
                            Vec::with_capacity(rows * t),
                            Vec::with_capacity(rows),
                        );
                        let mut other = vec![true; k];
                        for p in s.probs[lo * k..hi * k].chunks_exact(k) {
                            let best = top_classes(p, t);
                            // The mass of the classes left out, summed (not 1 − kept, which
                            // would add the rounding of the whole row to it).
                            other.fill(true);
                            for &c in &best {
                                other[c] = false;
                            }
                            let dropped: f32 = p
                                .iter()
                                .zip(&other)
                                .filter(|(_, o)| **o)
                                .map(|(v, _)| v)
                                .sum();
                            classes.extend(best.iter().map(|&c| c as u16));
                            top.extend(best.iter().map(|&c| p[c]));
                            rest.push(dropped);
                        }
                        let item = Arc::new(Field::new("item", DataType::UInt16, false));
                        let classes = FixedSizeListArray::try_new(
                            item,
                            t as i32,
                            Arc::new(arrow::array::UInt16Array::from(classes)),
                            None,
                        )
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                        let top = list(&top, t, None)?;
                        vec![
                            Arc::new(classes),
                            Arc::new(top),
                            Arc::new(Float32Array::from(rest)),
                        ]
                    }
                };
                let (std, entropy, mi): (ArrayRef, ArrayRef, ArrayRef) = match &s.mc {
                    Some(mc) => (
                        Arc::new(list(&mc.std[lo * k..hi * k], k, None)?),
                        Arc::new(Float32Array::from(mc.entropy[lo..hi].to_vec())),
                        Arc::new(Float32Array::from(mc.mutual_information[lo..hi].to_vec())),
                    ),
                    None => (
                        Arc::new(list(
                            &vec![0.0; rows * k],
                            k,
                            Some(NullBuffer::new_null(rows)),
                        )?),
                        Arc::new(Float32Array::new_null(rows)),
                        Arc::new(Float32Array::new_null(rows)),
                    ),
                };
                let mut columns: Vec<ArrayRef> = vec![
                    Arc::new(UInt32Array::from(s.indices[lo..hi].to_vec())),
                    Arc::new(UInt32Array::from(s.labels[lo..hi].to_vec())),
                    Arc::new(StringArray::from(vec![s.source; rows])),
                ];
                columns.extend(probs);
                columns.extend([std, entropy, mi]);
                let batch = RecordBatch::try_new(schema.clone(), columns)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                writer.write(&batch).map_err(to_io)?;
            }
            // End the row group at each source, so a row group holds one source and readers
            // filtering on `source` skip the others by the column's statistics.
            writer.flush().map_err(to_io)?;
        }
        writer.close().map_err(to_io)?;
        Ok(())
    })?;
    Ok(())
}

/// Soft labels of one source, indexed by sample position, held as the store holds them: full
/// vectors, or (top-k stores) k classes, k probabilities and the remaining mass per sample.
#[derive(Debug, Clone)]
pub struct SoftLabels {
    /// Number of classes.
    pub k: usize,
    /// The store's metadata.
    pub meta: LabelMeta,
    rows: Rows,
}

#[derive(Debug, Clone)]
enum Rows {
    /// `N × K` probabilities.
    Full(Vec<f32>),
    /// `N × t` classes and probabilities, `N` remaining masses.
    TopK {
        t: usize,
        classes: Vec<u16>,
        probs: Vec<f32>,
        rest: Vec<f32>,
    },
}

impl SoftLabels {
    /// Number of samples.
    pub fn len(&self) -> usize {
        match &self.rows {
            Rows::Full(p) => p.len() / self.k,
            Rows::TopK { rest, .. } => rest.len(),
        }
    }
    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Writes sample `i`'s full distribution into `out` (length K); a top-k row is expanded by
    /// [`expand_top_k`].
    pub fn row_into(&self, i: usize, out: &mut [f32]) {
        let k = self.k;
        match &self.rows {
            Rows::Full(p) => out.copy_from_slice(&p[i * k..(i + 1) * k]),
            Rows::TopK {
                t,
                classes,
                probs,
                rest,
            } => expand_top_k(
                &classes[i * t..(i + 1) * t],
                &probs[i * t..(i + 1) * t],
                rest[i],
                out,
            ),
        }
    }
    /// All distributions as one `N × K` array (for inspection and tests; training uses
    /// [`SoftLabels::row_into`]).
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len() * self.k];
        for (i, row) in out.chunks_exact_mut(self.k).enumerate() {
            self.row_into(i, row);
        }
        out
    }
    /// Bytes the labels occupy in memory.
    pub fn heap_bytes(&self) -> usize {
        match &self.rows {
            Rows::Full(p) => p.len() * 4,
            Rows::TopK {
                classes,
                probs,
                rest,
                ..
            } => classes.len() * 2 + probs.len() * 4 + rest.len() * 4,
        }
    }
}

/// Opens a Parquet file for reading and checks that every column chunk its footer lists lies
/// inside the file: the parquet crate panics, rather than failing, on a footer with negative
/// offsets or sizes (found by the `label_store` fuzz target).
pub fn open_parquet(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<std::fs::File>> {
    let file = std::fs::File::open(path).map_err(|e| StageError::io(path, e))?;
    let len = file.metadata().map_err(|e| StageError::io(path, e))?.len();
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| {
        StageError::invalid(path, "file", format!("not a readable Parquet file: {e}"))
    })?;
    for (g, rg) in builder.metadata().row_groups().iter().enumerate() {
        for (c, col) in rg.columns().iter().enumerate() {
            let start = col
                .dictionary_page_offset()
                .unwrap_or(col.data_page_offset());
            let size = col.compressed_size();
            let inside = start >= 0
                && size >= 0
                && col.data_page_offset() >= 0
                && (start as u64)
                    .checked_add(size as u64)
                    .is_some_and(|end| end <= len);
            if !inside {
                return Err(StageError::invalid(
                    path,
                    format!("row group {g}, column chunk {c} (`{}`)", col.column_path()),
                    format!(
                        "footer places it at offset {start}, {size} bytes, outside the file's {len} bytes: the file is damaged"
                    ),
                ));
            }
        }
    }
    Ok(builder)
}

/// Reads the metadata of a store.
pub fn read_meta(path: &Path) -> Result<LabelMeta> {
    let builder = open_parquet(path)?;
    meta_of(
        path,
        builder.metadata().file_metadata().key_value_metadata(),
    )
}

fn meta_of(path: &Path, kv: Option<&Vec<KeyValue>>) -> Result<LabelMeta> {
    let get = |key: &str| -> Result<String> {
        kv.and_then(|kv| kv.iter().find(|e| e.key == format!("ldl.{key}")))
            .and_then(|e| e.value.clone())
            .ok_or_else(|| {
                StageError::invalid(
                    path,
                    format!("metadata key `ldl.{key}`"),
                    "missing: not a label store",
                )
            })
    };
    let version = get("format_version")?;
    if version != crate::FORMAT_VERSION.to_string() {
        return Err(StageError::invalid(
            path,
            "metadata key `ldl.format_version`",
            format!(
                "found {version}, this program reads {}",
                crate::FORMAT_VERSION
            ),
        ));
    }
    let bad_json = |key: &str, e: serde_json::Error| {
        StageError::invalid(path, format!("metadata key `ldl.{key}`"), e.to_string())
    };
    Ok(LabelMeta {
        classes: serde_json::from_str(&get("classes")?).map_err(|e| bad_json("classes", e))?,
        dataset_fingerprint: get("dataset_fingerprint")?,
        teachers: serde_json::from_str(&get("teachers")?).map_err(|e| bad_json("teachers", e))?,
        temperature: get("temperature")?.parse().map_err(|e| {
            StageError::invalid(path, "metadata key `ldl.temperature`", format!("{e}"))
        })?,
        checkpoints: match get("teacher_checkpoints") {
            Ok(v) => serde_json::from_str(&v).map_err(|e| bad_json("teacher_checkpoints", e))?,
            Err(_) => BTreeMap::new(),
        },
        mc: match get("mc") {
            Ok(v) => Some(serde_json::from_str(&v).map_err(|e| bad_json("mc", e))?),
            Err(_) => None,
        },
        top_k: match get("top_k") {
            Ok(v) => Some(v.parse().map_err(|e| {
                StageError::invalid(path, "metadata key `ldl.top_k`", format!("{e}"))
            })?),
            Err(_) => None,
        },
        dtype: match get("dtype").ok().as_deref() {
            None | Some("float32") => StoreDtype::F32,
            Some("float16") => StoreDtype::F16,
            Some(other) => {
                return Err(StageError::invalid(
                    path,
                    "metadata key `ldl.dtype`",
                    format!("found `{other}`, expected `float32` or `float16`"),
                ))
            }
        },
    })
}

/// The distinct values of the `source` column (read alone; for error messages).
fn source_names(path: &Path) -> Result<std::collections::BTreeSet<String>> {
    guard(path, || source_names_unguarded(path))
}

fn source_names_unguarded(path: &Path) -> Result<std::collections::BTreeSet<String>> {
    let builder = open_parquet(path)?;
    let Ok(at) = builder.schema().index_of("source") else {
        return Ok(Default::default());
    };
    let mask = parquet::arrow::ProjectionMask::roots(builder.parquet_schema(), [at]);
    let mut names = std::collections::BTreeSet::new();
    for batch in builder
        .with_projection(mask)
        .build()
        .map_err(|e| StageError::invalid(path, "file", e.to_string()))?
    {
        let batch =
            batch.map_err(|e| StageError::invalid(path, "column `source`", e.to_string()))?;
        if let Some(src) = batch.column(0).as_any().downcast_ref::<StringArray>() {
            names.extend(src.iter().flatten().map(str::to_owned));
        }
    }
    Ok(names)
}

/// Reads the distributions of `source` for a split of `n` samples, refusing a store whose classes
/// or dataset fingerprint differ from `classes`/`fingerprint`, and any row that is not a
/// distribution (NaN, negative, not summing to 1 within [`SUM_TOLERANCE`]), any index out of range,
/// duplicated or missing.
pub fn read(
    path: &Path,
    source: &str,
    n: usize,
    classes: &[String],
    fingerprint: &str,
) -> Result<SoftLabels> {
    guard(path, || {
        read_unguarded(path, source, n, classes, fingerprint)
    })
}

/// Runs `f`, turning a panic inside the parquet crate into an error naming the file: its
/// decoders panic, rather than fail, on some damaged pages (e.g. a dictionary-encoded page
/// without a dictionary page, found by the `label_store` fuzz target).
fn guard<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("unknown failure");
        Err(StageError::invalid(
            path,
            "a data page",
            format!("the Parquet decoder failed on damaged data: {msg}"),
        ))
    })
}

fn read_unguarded(
    path: &Path,
    source: &str,
    n: usize,
    classes: &[String],
    fingerprint: &str,
) -> Result<SoftLabels> {
    let builder = open_parquet(path)?;
    let meta = meta_of(
        path,
        builder.metadata().file_metadata().key_value_metadata(),
    )?;
    if meta.classes != classes {
        return Err(StageError::invalid(
            path,
            "metadata key `ldl.classes`",
            format!(
                "the store has K = {} classes {:?}, the dataset K = {} classes {:?}",
                meta.classes.len(),
                meta.classes,
                classes.len(),
                classes
            ),
        ));
    }
    if meta.dataset_fingerprint != fingerprint {
        return Err(StageError::invalid(
            path,
            "metadata key `ldl.dataset_fingerprint`",
            format!(
                "the labels were made for dataset {}, this stage trains on {}",
                meta.dataset_fingerprint, fingerprint
            ),
        ));
    }
    let k = classes.len();
    let expected = schema(k, meta.top_k, meta.dtype);
    let arrow_schema = builder.schema().clone();
    let needed = required(meta.top_k);
    for f in expected
        .fields()
        .iter()
        .filter(|f| needed.contains(&f.name().as_str()))
    {
        match arrow_schema.field_with_name(f.name()) {
            Ok(actual) if actual.data_type() == f.data_type() => {}
            Ok(actual) => {
                return Err(StageError::invalid(
                    path,
                    format!("column `{}`", f.name()),
                    format!("type {}, expected {}", actual.data_type(), f.data_type()),
                ))
            }
            Err(_) => {
                return Err(StageError::invalid(
                    path,
                    format!("column `{}`", f.name()),
                    "missing",
                ))
            }
        }
    }
    // Stream only what the source needs: the row groups whose `source` statistics admit it
    // (the writer gives each source its own row groups) and the columns index, source, probs.
    let source_col = builder
        .parquet_schema()
        .columns()
        .iter()
        .position(|c| c.path().parts() == ["source"]);
    let groups: Vec<usize> = builder
        .metadata()
        .row_groups()
        .iter()
        .enumerate()
        .filter(|(_, rg)| {
            let stats = source_col.and_then(|c| rg.column(c).statistics());
            match stats.map(|s| (s.min_bytes_opt(), s.max_bytes_opt())) {
                Some((Some(lo), Some(hi))) => lo <= source.as_bytes() && source.as_bytes() <= hi,
                _ => true,
            }
        })
        .map(|(i, _)| i)
        .collect();
    // (first file row, rows) of each selected group, to name file rows in errors.
    let spans: Vec<(usize, usize)> = {
        let all = builder.metadata().row_groups();
        let mut starts = Vec::with_capacity(all.len());
        let mut at = 0usize;
        for rg in all {
            starts.push(at);
            at += rg.num_rows() as usize;
        }
        groups
            .iter()
            .map(|&g| (starts[g], all[g].num_rows() as usize))
            .collect()
    };
    let roots = needed
        .iter()
        .filter(|c| **c != "label")
        .map(|c| arrow_schema.index_of(c).expect("checked"));
    let mask = parquet::arrow::ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder
        .with_row_groups(groups)
        .with_projection(mask)
        .with_batch_size(ROWS_PER_GROUP)
        .build()
        .map_err(|e| StageError::invalid(path, "file", e.to_string()))?;
    let tolerance = meta.dtype.sum_tolerance(k);
    let mut rows = match meta.top_k {
        None => Rows::Full(vec![f32::NAN; n * k]),
        Some(t) => Rows::TopK {
            t,
            classes: vec![0; n * t],
            probs: vec![f32::NAN; n * t],
            rest: vec![f32::NAN; n],
        },
    };
    let mut seen = vec![false; n];
    let mut dup = vec![false; k];
    let mut found = false;
    let (mut span, mut offset) = (0usize, 0usize);
    let mut file_row = || {
        while span < spans.len() && offset == spans[span].1 {
            span += 1;
            offset = 0;
        }
        offset += 1;
        spans.get(span).map_or(0, |s| s.0 + offset - 1)
    };
    // A row's values must be finite and non-negative and sum to 1; names the first bad one.
    // `of`: the class of each value (top-k rows), else the value's position is its class.
    let check = |at: usize, column: &str, values: &[f32], of: &[u16], rest: f32| -> Result<f32> {
        let mut sum = rest;
        for (c, &v) in values.iter().enumerate() {
            if !v.is_finite() || v < 0.0 {
                return Err(StageError::invalid(
                    path,
                    format!(
                        "row {at}, column `{column}`, class {}",
                        of.get(c).map_or(c, |&c| c as usize)
                    ),
                    format!("value {v}: probabilities must be finite and non-negative"),
                ));
            }
            sum += v;
        }
        if (sum - 1.0).abs() > tolerance {
            return Err(StageError::invalid(
                path,
                format!("row {at}, column `{column}`"),
                format!("sums to {sum}, expected 1 within {tolerance}"),
            ));
        }
        Ok(sum)
    };
    for batch in reader {
        let batch = batch.map_err(|e| {
            StageError::invalid(path, "a row group", format!("cannot be read: {e}"))
        })?;
        let col = |name: &str| batch.column_by_name(name).expect("schema checked");
        let list = |name: &str| {
            col(name)
                .as_any()
                .downcast_ref::<FixedSizeListArray>()
                .expect("schema checked")
                .clone()
        };
        let index = col("index")
            .as_any()
            .downcast_ref::<UInt32Array>()
            .expect("schema checked");
        let src = col("source")
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("schema checked");
        // Full vectors, or the top-k columns and the remaining mass.
        let full = meta.top_k.is_none().then(|| list("probs"));
        let full_values = full.as_ref().map(floats_of);
        let top = meta.top_k.map(|_| {
            let classes = list("topk_classes");
            let class_values = classes
                .values()
                .as_any()
                .downcast_ref::<arrow::array::UInt16Array>()
                .expect("schema checked")
                .clone();
            let rest = col("rest")
                .as_any()
                .downcast_ref::<Float32Array>()
                .expect("schema checked")
                .clone();
            (classes, class_values, list("topk_probs"), rest)
        });
        let top_values = top.as_ref().map(|t| floats_of(&t.2));
        for r in 0..batch.num_rows() {
            let at = file_row();
            if src.value(r) != source {
                continue;
            }
            found = true;
            let i = index.value(r) as usize;
            if i >= n {
                return Err(StageError::invalid(
                    path,
                    format!("row {at}, column `index`"),
                    format!("{i} is outside the split's 0..{n}"),
                ));
            }
            if seen[i] {
                return Err(StageError::invalid(
                    path,
                    format!("row {at}, column `index`"),
                    format!("sample {i} appears twice for source `{source}`"),
                ));
            }
            seen[i] = true;
            match &mut rows {
                Rows::Full(probs) => {
                    let list = full.as_ref().expect("full mode");
                    let values = full_values.as_ref().expect("full mode");
                    let start = list.value_offset_at(r);
                    let row = &mut probs[i * k..(i + 1) * k];
                    row.copy_from_slice(&values[start..start + k]);
                    let sum = check(at, "probs", row, &[], 0.0)?;
                    if meta.dtype == StoreDtype::F16 {
                        row.iter_mut().for_each(|v| *v /= sum);
                    }
                }
                Rows::TopK {
                    t,
                    classes,
                    probs,
                    rest,
                } => {
                    let t = *t;
                    let (cl, class_values, tlist, rest_col) = top.as_ref().expect("top-k mode");
                    let values = top_values.as_ref().expect("top-k mode");
                    let cs = &class_values.values()[cl.value_offset_at(r)..][..t];
                    let ps = &values[tlist.value_offset_at(r)..][..t];
                    dup.fill(false);
                    for &c in cs {
                        if c as usize >= k || std::mem::replace(&mut dup[c as usize], true) {
                            return Err(StageError::invalid(
                                path,
                                format!("row {at}, column `topk_classes`"),
                                format!("{cs:?} must be distinct classes in 0..{k}"),
                            ));
                        }
                    }
                    let rest_v = rest_col.value(r);
                    if !rest_v.is_finite() || rest_v < 0.0 {
                        return Err(StageError::invalid(
                            path,
                            format!("row {at}, column `rest`"),
                            format!(
                                "value {rest_v}: the remaining mass must be finite and non-negative"
                            ),
                        ));
                    }
                    if t == k && rest_v > tolerance {
                        return Err(StageError::invalid(
                            path,
                            format!("row {at}, column `rest`"),
                            format!("value {rest_v}: with top_k = K no mass can remain"),
                        ));
                    }
                    let sum = check(at, "topk_probs", ps, cs, rest_v)?;
                    let scale = if meta.dtype == StoreDtype::F16 {
                        1.0 / sum
                    } else {
                        1.0
                    };
                    classes[i * t..(i + 1) * t].copy_from_slice(cs);
                    probs[i * t..(i + 1) * t]
                        .iter_mut()
                        .zip(ps)
                        .for_each(|(o, &v)| *o = v * scale);
                    rest[i] = rest_v * scale;
                }
            }
        }
    }
    if !found {
        return Err(StageError::invalid(
            path,
            "column `source`",
            format!(
                "no rows for source `{source}`; the store has {:?}",
                source_names(path)?
            ),
        ));
    }
    if let Some(missing) = seen.iter().position(|s| !s) {
        return Err(StageError::invalid(
            path,
            "column `index`",
            format!("sample {missing} of 0..{n} has no row for source `{source}`"),
        ));
    }
    Ok(SoftLabels { k, meta, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: usize = 3;

    fn meta() -> LabelMeta {
        LabelMeta {
            classes: vec!["a".into(), "b".into(), "c".into()],
            dataset_fingerprint: "fp".into(),
            teachers: BTreeMap::from([("t".into(), "tfp".into())]),
            temperature: 1.0,
            checkpoints: BTreeMap::from([("t".into(), "hash".into())]),
            mc: Some(McMeta {
                samples: 20,
                dropout: BTreeMap::from([("t".into(), 0.2)]),
            }),
            top_k: None,
            dtype: StoreDtype::F32,
        }
    }

    /// A store with sources `t` and `u` over `n` samples; `edit` may corrupt `u`'s rows.
    fn store(n: usize, edit: impl FnOnce(&mut Vec<u32>, &mut Vec<f32>)) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let indices: Vec<u32> = (0..n as u32).collect();
        let labels: Vec<u32> = (0..n as u32).map(|i| i % K as u32).collect();
        let t: Vec<f32> = (0..n).flat_map(|_| [0.5f32, 0.25, 0.25]).collect();
        let mut u_idx = indices.clone();
        let mut u: Vec<f32> = (0..n).flat_map(|_| [0.2f32, 0.3, 0.5]).collect();
        edit(&mut u_idx, &mut u);
        let rows = [
            SourceRows {
                source: "t",
                indices: &indices,
                labels: &labels,
                probs: &t,
                mc: None,
            },
            SourceRows {
                source: "u",
                indices: &u_idx,
                labels: &labels,
                probs: &u,
                mc: None,
            },
        ];
        write(&dir.path().join("l.parquet"), &meta(), &rows).unwrap();
        dir
    }

    fn read_u(dir: &tempfile::TempDir, n: usize) -> Result<SoftLabels> {
        let m = meta();
        read(&dir.path().join("l.parquet"), "u", n, &m.classes, "fp")
    }

    fn err(r: Result<SoftLabels>) -> String {
        r.map(|_| ()).unwrap_err().to_string()
    }

    #[test]
    fn round_trip_and_metadata() {
        let dir = store(10, |_, _| {});
        let got = read_u(&dir, 10).unwrap();
        assert_eq!(got.to_dense()[..3], [0.2, 0.3, 0.5]);
        assert_eq!(got.meta, meta());
        assert_eq!(read_meta(&dir.path().join("l.parquet")).unwrap(), meta());
    }

    #[test]
    fn each_source_has_its_own_row_groups_and_only_they_are_read() {
        // 9000 rows per source: two row groups each, never shared between sources.
        let dir = store(9000, |_, _| {});
        let path = dir.path().join("l.parquet");
        let file = std::fs::File::open(&path).unwrap();
        let b = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        let groups: Vec<i64> = b
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows())
            .collect();
        assert_eq!(groups, [8192, 808, 8192, 808]);
        // Corrupt every row of `t` (a NaN): reading `u` must not touch those row groups.
        let n = 9000;
        let indices: Vec<u32> = (0..n as u32).collect();
        let labels = vec![0u32; n];
        let bad = vec![f32::NAN; n * K];
        let good: Vec<f32> = (0..n).flat_map(|_| [0.2f32, 0.3, 0.5]).collect();
        let rows = [
            SourceRows {
                source: "t",
                indices: &indices,
                labels: &labels,
                probs: &bad,
                mc: None,
            },
            SourceRows {
                source: "u",
                indices: &indices,
                labels: &labels,
                probs: &good,
                mc: None,
            },
        ];
        write(&path, &meta(), &rows).unwrap();
        assert!(read_u(&dir, n).is_ok());
        let m = meta();
        let e = err(read(&path, "t", n, &m.classes, "fp"));
        assert!(
            e.contains("row 0, column `probs`, class 0") && e.contains("NaN"),
            "{e}"
        );
    }

    /// Corrupts a source's indices and probabilities before they are written.
    type Edit = Box<dyn FnOnce(&mut Vec<u32>, &mut Vec<f32>)>;

    #[test]
    fn malformed_rows_are_refused_naming_file_row_and_value() {
        let file_row = |i: usize| 10 + i; // `u` follows the 10 rows of `t`
        let cases: Vec<(Edit, String)> = vec![
            (
                Box::new(|_, p| p[3 * 4 + 1] = f32::NAN),
                format!("row {}, column `probs`, class 1: value NaN", file_row(4)),
            ),
            (
                Box::new(|_, p| p[3 * 2] = -0.1),
                format!("row {}, column `probs`, class 0: value -0.1", file_row(2)),
            ),
            (
                Box::new(|_, p| p[3 * 7] = 0.3),
                format!("row {}, column `probs`: sums to 1.1", file_row(7)),
            ),
            (
                Box::new(|i, _| i[5] = 99),
                format!(
                    "row {}, column `index`: 99 is outside the split's 0..10",
                    file_row(5)
                ),
            ),
            (
                Box::new(|i, _| i[6] = 1),
                format!(
                    "row {}, column `index`: sample 1 appears twice",
                    file_row(6)
                ),
            ),
        ];
        for (edit, want) in cases {
            let dir = store(10, edit);
            let e = err(read_u(&dir, 10));
            assert!(
                e.contains("l.parquet") && e.contains(&want),
                "{e}\nwanted: {want}"
            );
        }
        // A sample without a row.
        let dir = store(10, |_, _| {});
        let e = err(read_u(&dir, 11));
        assert!(
            e.contains("sample 10 of 0..11 has no row for source `u`"),
            "{e}"
        );
    }

    #[test]
    fn mismatched_stores_are_refused() {
        let dir = store(4, |_, _| {});
        let path = dir.path().join("l.parquet");
        let m = meta();
        let e = err(read(&path, "u", 4, &["a".into(), "b".into()], "fp"));
        assert!(e.contains("`ldl.classes`") && e.contains("K = 3"), "{e}");
        let e = err(read(&path, "u", 4, &m.classes, "other"));
        assert!(
            e.contains("`ldl.dataset_fingerprint`") && e.contains("other"),
            "{e}"
        );
        let e = err(read(&path, "nope", 4, &m.classes, "fp"));
        assert!(
            e.contains("no rows for source `nope`") && e.contains("\"t\", \"u\""),
            "{e}"
        );
        std::fs::write(&path, b"not parquet").unwrap();
        let e = err(read(&path, "u", 4, &m.classes, "fp"));
        assert!(e.contains("not a readable Parquet file"), "{e}");
    }

    #[test]
    fn a_parquet_file_that_is_not_a_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.parquet");
        let schema = Arc::new(Schema::new(vec![Field::new(
            "index",
            DataType::UInt32,
            false,
        )]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(UInt32Array::from(vec![0u32])) as ArrayRef],
        )
        .unwrap();
        let mut w =
            ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let e = err(read(&path, "u", 1, &meta().classes, "fp"));
        assert!(
            e.contains("`ldl.format_version`") && e.contains("not a label store"),
            "{e}"
        );
    }

    #[test]
    fn top_k_keeps_the_largest_and_spreads_the_rest() {
        assert_eq!(top_classes(&[0.1, 0.4, 0.1, 0.4], 3), [1, 3, 0]);
        let mut out = [0f32; 5];
        expand_top_k(&[3, 0], &[0.5, 0.2], 0.3, &mut out);
        assert_eq!(out, [0.2, 0.1, 0.1, 0.5, 0.1]);
        // Round trip: K = 3 stored as top 2; the third class gets the remaining mass.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.parquet");
        let m = LabelMeta {
            top_k: Some(2),
            ..meta()
        };
        let probs = [0.7f32, 0.2, 0.1, 0.05, 0.15, 0.8];
        let rows = [SourceRows {
            source: "t",
            indices: &[0, 1],
            labels: &[0, 2],
            probs: &probs,
            mc: None,
        }];
        write(&path, &m, &rows).unwrap();
        assert_eq!(read_meta(&path).unwrap().top_k, Some(2));
        let got = read(&path, "t", 2, &m.classes, "fp").unwrap();
        assert_eq!(got.to_dense(), probs);
        // K = 4 stored as top 2: the two others share the rest evenly.
        let m4 = LabelMeta {
            classes: vec!["a".into(), "b".into(), "c".into(), "d".into()],
            top_k: Some(2),
            ..meta()
        };
        let probs4 = [0.6f32, 0.1, 0.2, 0.1];
        let rows = [SourceRows {
            source: "t",
            indices: &[0],
            labels: &[0],
            probs: &probs4,
            mc: None,
        }];
        write(&path, &m4, &rows).unwrap();
        let got = read(&path, "t", 1, &m4.classes, "fp").unwrap();
        let dense = got.to_dense();
        for (a, b) in dense.iter().zip([0.6f32, 0.1, 0.2, 0.1]) {
            assert!((a - b).abs() < 1e-6, "{dense:?}");
        }
        let e = write(
            &path,
            &LabelMeta {
                top_k: Some(5),
                ..m4
            },
            &rows,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("top_k = 5 must be in 1..=4"), "{e}");
    }

    #[test]
    fn float16_stores_round_to_half_precision_and_read_back_normalised() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.parquet");
        // Values f16 cannot hold exactly; each row sums to 1 in f32.
        let probs = [0.1f32, 0.2, 0.7, 0.333, 0.333, 0.334];
        let std = [0.01f32, 0.02, 0.03, 0.0, 0.1, 0.2];
        let rows = [SourceRows {
            source: "t",
            indices: &[0, 1],
            labels: &[2, 0],
            probs: &probs,
            mc: Some(McRows {
                std: &std,
                entropy: &[0.8, 1.0],
                mutual_information: &[0.1, 0.2],
            }),
        }];
        for top_k in [None, Some(2)] {
            let m = LabelMeta {
                dtype: StoreDtype::F16,
                top_k,
                ..meta()
            };
            write(&path, &m, &rows).unwrap();
            assert_eq!(read_meta(&path).unwrap(), m);
            let file = std::fs::File::open(&path).unwrap();
            let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
            let column = if top_k.is_some() {
                "topk_probs"
            } else {
                "probs"
            };
            assert_eq!(
                builder
                    .schema()
                    .field_with_name(column)
                    .unwrap()
                    .data_type(),
                &vector(top_k.unwrap_or(K), StoreDtype::F16)
            );
            let got = read(&path, "t", 2, &m.classes, "fp").unwrap().to_dense();
            for (row, want) in got.chunks(K).zip(probs.chunks(K)) {
                let sum: f32 = row.iter().sum();
                assert!((sum - 1.0).abs() < 1e-6, "{row:?} sums to {sum}");
                for (a, b) in row.iter().zip(want) {
                    // Half precision: 11 significant bits, so within 2^-11 relative (plus the
                    // renormalisation, and the even spread of the top-k remainder: exact here,
                    // as K − k = 1).
                    assert!(
                        (a - b).abs() <= 1.5e-3 * b.max(1e-3),
                        "{got:?} vs {probs:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_top_k_store_stays_compact_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.parquet");
        let k = 100;
        let n = 50;
        let classes: Vec<String> = (0..k).map(|c| format!("c{c}")).collect();
        let probs: Vec<f32> = (0..n * k)
            .map(|j| if j % k == j / k % k { 0.505 } else { 0.005 })
            .collect();
        let rows = [SourceRows {
            source: "t",
            indices: &(0..n as u32).collect::<Vec<_>>(),
            labels: &vec![0; n],
            probs: &probs,
            mc: None,
        }];
        let m = LabelMeta {
            classes: classes.clone(),
            top_k: Some(5),
            ..meta()
        };
        write(&path, &m, &rows).unwrap();
        let got = read(&path, "t", n, &classes, "fp").unwrap();
        // 5 × (2 + 4) + 4 bytes a sample, not 100 × 4.
        assert_eq!(got.heap_bytes(), n * 34);
        assert_eq!(got.len(), n);
        let mut row = vec![0f32; k];
        got.row_into(7, &mut row);
        assert_eq!(row[7], 0.505);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    }

    #[test]
    fn malformed_top_k_rows_are_refused() {
        use arrow::array::UInt16Array;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.parquet");
        let m = LabelMeta {
            top_k: Some(2),
            ..meta()
        };
        // Writes one row of `t` with the given top-k classes, probabilities and rest.
        let write_raw = |classes: [u16; 2], top: [f32; 2], rest: f32| {
            let schema = Arc::new(schema(K, Some(2), StoreDtype::F32));
            let list = |values: ArrayRef, item: DataType| {
                Arc::new(
                    FixedSizeListArray::try_new(
                        Arc::new(Field::new("item", item, false)),
                        2,
                        values,
                        None,
                    )
                    .unwrap(),
                ) as ArrayRef
            };
            let null_std = FixedSizeListArray::try_new(
                Arc::new(Field::new("item", DataType::Float32, false)),
                K as i32,
                Arc::new(Float32Array::from(vec![0f32; K])),
                Some(NullBuffer::new_null(1)),
            )
            .unwrap();
            let columns: Vec<ArrayRef> = vec![
                Arc::new(UInt32Array::from(vec![0u32])),
                Arc::new(UInt32Array::from(vec![0u32])),
                Arc::new(StringArray::from(vec!["t"])),
                list(
                    Arc::new(UInt16Array::from(classes.to_vec())),
                    DataType::UInt16,
                ),
                list(
                    Arc::new(Float32Array::from(top.to_vec())),
                    DataType::Float32,
                ),
                Arc::new(Float32Array::from(vec![rest])),
                Arc::new(null_std),
                Arc::new(Float32Array::new_null(1)),
                Arc::new(Float32Array::new_null(1)),
            ];
            let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
            let kv = |k: &str, v: String| KeyValue::new(format!("ldl.{k}"), v);
            let props = WriterProperties::builder()
                .set_key_value_metadata(Some(vec![
                    kv("format_version", crate::FORMAT_VERSION.to_string()),
                    kv("k", K.to_string()),
                    kv("classes", serde_json::to_string(&m.classes).unwrap()),
                    kv("dataset_fingerprint", "fp".into()),
                    kv("teachers", "{}".into()),
                    kv("temperature", "1".into()),
                    kv("top_k", "2".into()),
                ]))
                .build();
            let mut w =
                ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema, Some(props))
                    .unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
            read(&path, "t", 1, &m.classes, "fp").map(|_| ())
        };
        assert!(write_raw([2, 0], [0.5, 0.3], 0.2).is_ok());
        for (classes, top, rest, want) in [
            (
                [1, 1],
                [0.5, 0.3],
                0.2,
                "row 0, column `topk_classes`: [1, 1] must be distinct",
            ),
            (
                [0, 7],
                [0.5, 0.3],
                0.2,
                "row 0, column `topk_classes`: [0, 7] must be distinct classes in 0..3",
            ),
            ([0, 1], [0.5, 0.3], -0.2, "row 0, column `rest`: value -0.2"),
            (
                [0, 1],
                [0.5, f32::NAN],
                0.2,
                "row 0, column `topk_probs`, class 1: value NaN",
            ),
            (
                [0, 1],
                [0.5, 0.3],
                0.5,
                "row 0, column `topk_probs`: sums to 1.3",
            ),
        ] {
            let e = write_raw(classes, top, rest).unwrap_err().to_string();
            assert!(
                e.contains("bad.parquet") && e.contains(want),
                "{e}\nwanted: {want}"
            );
        }
    }

    /// Regression (fuzz target `label_store`): a data page that claims dictionary encoding in a
    /// chunk without a dictionary page made the parquet decoder panic; it is an error.
    #[test]
    fn a_page_without_its_dictionary_is_refused_not_a_panic() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/regressions/label_store/dictionary-page-missing.parquet");
        let meta = read_meta(&path).unwrap();
        for source in meta.teachers.keys() {
            let r = read(&path, source, 16, &meta.classes, &meta.dataset_fingerprint);
            let e = r.map(|_| ()).unwrap_err().to_string();
            assert!(e.contains("dictionary-page-missing.parquet"), "{e}");
        }
    }

    /// Regression (fuzz target `label_store`): a footer with a negative column offset made the
    /// parquet crate panic while building the reader; it is refused with an error.
    #[test]
    fn a_footer_with_negative_offsets_is_refused_not_a_panic() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/regressions/label_store/negative-column-offset.parquet");
        let e = read_meta(&path).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("negative-column-offset.parquet"), "{e}");
        let e = read(&path, "t", 16, &meta().classes, "fp")
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("negative-column-offset.parquet"), "{e}");
    }
}
