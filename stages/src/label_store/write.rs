//! The writer: a whole store in one atomic write, each source in its own row groups, the float
//! vectors BYTE_STREAM_SPLIT-encoded, no timestamps (the same inputs give the same bytes). Rows
//! can be given whole ([`write`]) or streamed piece by piece ([`write_streamed`]), which keeps
//! one row group in memory instead of the store: the same rows give the same bytes either way.

use super::schema::{float_list, leaf, schema, ROWS_PER_GROUP};
use super::{LabelMeta, McRows, SourceRows, StoreDtype};
use crate::error::{Result, StageError};
use arrow::array::{
    ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, StringArray, UInt32Array,
};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Field};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use std::path::Path;
use std::sync::Arc;

/// Writes a label store atomically to `path`, holding every source's rows in memory.
pub fn write(path: &Path, meta: &LabelMeta, sources: &[SourceRows]) -> Result<()> {
    write_streamed(path, meta, |sink| {
        for s in sources {
            sink.push(s)?;
        }
        Ok(())
    })
}

/// Writes a label store atomically to `path` from the rows that `fill` pushes into a
/// [`RowSink`], a source's rows together, in as many pieces as it likes: the file holds the same
/// bytes as [`write`] of the whole sources, and memory holds one row group, not the store.
pub fn write_streamed<F>(path: &Path, meta: &LabelMeta, fill: F) -> Result<()>
where
    F: FnOnce(&mut RowSink<'_>) -> Result<()>,
{
    let k = meta.classes.len();
    if let Some(t) = meta.top_k {
        if t == 0 || t > k || k > u16::MAX as usize + 1 {
            return Err(StageError::config(format!(
                "{}: top_k = {t} must be in 1..={k} (and K at most 65536)",
                path.display()
            )));
        }
    }
    // The `ldl.*` keys go into the footer's key-value metadata (what readers here check) and
    // into the Arrow schema too, so pyarrow shows them as `schema.metadata` and keeps them when
    // it rewrites a table it read.
    let keys = metadata(meta);
    let in_schema = keys
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone().unwrap_or_default()));
    let schema = Arc::new(
        schema(k, meta.top_k, meta.dtype)
            .with_metadata(in_schema.collect::<std::collections::HashMap<_, _>>()),
    );
    let props = properties(meta, keys);
    // `fill`'s own error is kept whole; the atomic writer only carries an io::Error out.
    let mut failure = None;
    let written = datasets::atomic::write_with(path, |w| {
        let w: Box<dyn std::io::Write + Send + '_> = Box::new(w);
        let writer = ArrowWriter::try_new(w, schema.clone(), Some(props)).map_err(to_io)?;
        let mut sink = RowSink {
            path,
            meta,
            schema: &schema,
            writer,
            source: None,
            finished: Vec::new(),
            pending: Pending::default(),
        };
        if let Err(e) = fill(&mut sink).and_then(|()| sink.end_source()) {
            let message = e.to_string();
            failure = Some(e);
            return Err(std::io::Error::other(message));
        }
        sink.writer.close().map_err(to_io)?;
        Ok(())
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(written?),
    }
}

fn to_io(e: parquet::errors::ParquetError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Where [`write_streamed`] takes rows: a source's rows must come together; a row group holds
/// one source's rows, [`ROWS_PER_GROUP`] of them but its last.
pub struct RowSink<'a> {
    path: &'a Path,
    meta: &'a LabelMeta,
    schema: &'a Arc<arrow::datatypes::Schema>,
    writer: ArrowWriter<Box<dyn std::io::Write + Send + 'a>>,
    /// The source being written.
    source: Option<String>,
    /// The sources written before it.
    finished: Vec<String>,
    /// Its rows not yet in a row group (fewer than [`ROWS_PER_GROUP`]).
    pending: Pending,
}

/// Rows of one source waiting for a full row group.
#[derive(Default)]
struct Pending {
    indices: Vec<u32>,
    labels: Vec<u32>,
    probs: Vec<f32>,
    mc: Option<(Vec<f32>, Vec<f32>, Vec<f32>)>,
}

impl Pending {
    fn clear(&mut self) {
        self.indices.clear();
        self.labels.clear();
        self.probs.clear();
        if let Some((std, entropy, mi)) = &mut self.mc {
            std.clear();
            entropy.clear();
            mi.clear();
        }
    }

    /// Appends rows `range` of `s`.
    fn extend(&mut self, s: &SourceRows, range: std::ops::Range<usize>, k: usize) {
        let (lo, hi) = (range.start, range.end);
        self.indices.extend_from_slice(&s.indices[lo..hi]);
        self.labels.extend_from_slice(&s.labels[lo..hi]);
        self.probs.extend_from_slice(&s.probs[lo * k..hi * k]);
        if let (Some((std, entropy, mi)), Some(m)) = (&mut self.mc, &s.mc) {
            std.extend_from_slice(&m.std[lo * k..hi * k]);
            entropy.extend_from_slice(&m.entropy[lo..hi]);
            mi.extend_from_slice(&m.mutual_information[lo..hi]);
        }
    }

    /// The pending rows as a source's rows.
    fn rows<'a>(&'a self, source: &'a str) -> SourceRows<'a> {
        SourceRows {
            source,
            indices: &self.indices,
            labels: &self.labels,
            probs: &self.probs,
            mc: self.mc.as_ref().map(|(std, entropy, mi)| McRows {
                std,
                entropy,
                mutual_information: mi,
            }),
        }
    }
}

impl RowSink<'_> {
    /// Appends rows of source `s.source`, after the rows pushed before; a source other than the
    /// last one pushed starts a new source (its rows must not have been pushed before).
    pub fn push(&mut self, s: &SourceRows) -> Result<()> {
        let (n, k) = (s.indices.len(), self.meta.classes.len());
        self.check(s, n, k)?;
        if self.source.as_deref() != Some(s.source) {
            if self.finished.iter().any(|f| f == s.source) {
                return Err(StageError::numeric(format!(
                    "{}: source `{}` was given rows after another source's: a source's rows \
                     must come together",
                    self.path.display(),
                    s.source
                )));
            }
            self.end_source()?;
            self.source = Some(s.source.to_string());
            self.pending.mc = s.mc.as_ref().map(|_| Default::default());
        } else if self.pending.mc.is_some() != s.mc.is_some() {
            return Err(StageError::numeric(format!(
                "{}: source `{}` was given rows with and without uncertainty columns",
                self.path.display(),
                s.source
            )));
        }
        let mut lo = 0;
        while lo < n {
            let waiting = self.pending.indices.len();
            if waiting == 0 && n - lo >= ROWS_PER_GROUP {
                self.write_batch(s, lo..lo + ROWS_PER_GROUP)?;
                lo += ROWS_PER_GROUP;
                continue;
            }
            let take = (ROWS_PER_GROUP - waiting).min(n - lo);
            self.pending.extend(s, lo..lo + take, k);
            lo += take;
            if self.pending.indices.len() == ROWS_PER_GROUP {
                self.write_pending()?;
            }
        }
        Ok(())
    }

    /// Refuses rows whose columns disagree on their length.
    fn check(&self, s: &SourceRows, n: usize, k: usize) -> Result<()> {
        let mc_ok = s.mc.as_ref().is_none_or(|m| {
            m.std.len() == n * k && m.entropy.len() == n && m.mutual_information.len() == n
        });
        if s.labels.len() != n || s.probs.len() != n * k || !mc_ok {
            return Err(StageError::numeric(format!(
                "{}: source `{}`: {n} indices, but {} labels and {} probabilities (K = {k})",
                self.path.display(),
                s.source,
                s.labels.len(),
                s.probs.len()
            )));
        }
        Ok(())
    }

    /// Writes the pending rows and ends the row group of the source being written, so a row
    /// group holds one source and readers filtering on `source` skip the others by the column's
    /// statistics.
    fn end_source(&mut self) -> Result<()> {
        if !self.pending.indices.is_empty() {
            self.write_pending()?;
        }
        if let Some(done) = self.source.take() {
            self.finished.push(done);
            let path = self.path;
            self.writer
                .flush()
                .map_err(|e| StageError::io(path, to_io(e)))?;
        }
        Ok(())
    }

    fn write_pending(&mut self) -> Result<()> {
        let rows = self
            .pending
            .rows(self.source.as_deref().unwrap_or_default());
        let batch = batch(self.schema, self.meta, &rows, 0..rows.indices.len())
            .map_err(|e| StageError::io(self.path, e))?;
        self.write(&batch)?;
        self.pending.clear();
        Ok(())
    }

    fn write_batch(&mut self, s: &SourceRows, range: std::ops::Range<usize>) -> Result<()> {
        let batch =
            batch(self.schema, self.meta, s, range).map_err(|e| StageError::io(self.path, e))?;
        self.write(&batch)
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let path = self.path;
        self.writer
            .write(batch)
            .map_err(|e| StageError::io(path, to_io(e)))
    }
}

/// The `ldl.*` key-value metadata of a store.
fn metadata(meta: &LabelMeta) -> Vec<KeyValue> {
    let kv = |key: &str, value: String| KeyValue::new(format!("ldl.{key}"), value);
    let mut keys = vec![
        kv("format_version", crate::FORMAT_VERSION.to_string()),
        kv("k", meta.classes.len().to_string()),
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
    ];
    if let Some(t) = meta.top_k {
        keys.push(kv("top_k", t.to_string()));
    }
    if let Some(mc) = &meta.mc {
        keys.push(kv("mc", serde_json::to_string(mc).expect("json")));
    }
    keys
}

/// Compression, encodings, row groups and the key-value metadata `keys`.
fn properties(meta: &LabelMeta, keys: Vec<KeyValue>) -> WriterProperties {
    let vector_encoding = match meta.dtype {
        StoreDtype::F32 => Encoding::BYTE_STREAM_SPLIT,
        StoreDtype::F16 => Encoding::PLAIN,
    };
    WriterProperties::builder()
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
        .set_key_value_metadata(Some(keys))
        .build()
}

fn arrow_io(e: arrow::error::ArrowError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Rows `range` of source `s` as one record batch.
fn batch(
    schema: &Arc<arrow::datatypes::Schema>,
    meta: &LabelMeta,
    s: &SourceRows,
    range: std::ops::Range<usize>,
) -> std::io::Result<RecordBatch> {
    let (lo, hi, k) = (range.start, range.end, meta.classes.len());
    let rows = hi - lo;
    let list = |values: &[f32], width: usize, nulls: Option<NullBuffer>| {
        float_list(values, width, meta.dtype, nulls).map_err(arrow_io)
    };
    let probs: Vec<ArrayRef> = match meta.top_k {
        None => vec![Arc::new(list(&s.probs[lo * k..hi * k], k, None)?)],
        Some(t) => top_k_columns(&s.probs[lo * k..hi * k], k, t, meta.dtype).map_err(arrow_io)?,
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
    RecordBatch::try_new(schema.clone(), columns).map_err(arrow_io)
}

/// The top-k columns of `N × K` distributions: each row's `t` most probable classes, their
/// probabilities, and the mass of the others (as the label store and the replay store hold
/// them).
pub(crate) fn top_k_columns(
    probs: &[f32],
    k: usize,
    t: usize,
    dtype: StoreDtype,
) -> std::result::Result<Vec<ArrayRef>, arrow::error::ArrowError> {
    let rows = probs.len() / k;
    let (mut classes, mut top, mut rest) = (
        Vec::with_capacity(rows * t),
        Vec::with_capacity(rows * t),
        Vec::with_capacity(rows),
    );
    let mut other = vec![true; k];
    for p in probs.chunks_exact(k) {
        let best = top_classes(p, t);
        // The mass of the classes left out, summed (not 1 − kept, which would add the
        // rounding of the whole row to it).
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
    )?;
    let top = float_list(&top, t, dtype, None)?;
    Ok(vec![
        Arc::new(classes),
        Arc::new(top),
        Arc::new(Float32Array::from(rest)),
    ])
}

/// The `t` most probable classes of `p`, most probable first (ties: lower class first).
pub fn top_classes(p: &[f32], t: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    order.truncate(t);
    order
}
