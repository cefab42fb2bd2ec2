//! The writer: a whole store in one atomic write, each source in its own row groups, the float
//! vectors BYTE_STREAM_SPLIT-encoded, no timestamps (the same inputs give the same bytes).

use super::schema::{float_list, leaf, schema, ROWS_PER_GROUP};
use super::{LabelMeta, SourceRows, StoreDtype};
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

/// Writes a label store atomically to `path`.
pub fn write(path: &Path, meta: &LabelMeta, sources: &[SourceRows]) -> Result<()> {
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
    let to_io = |e: parquet::errors::ParquetError| std::io::Error::other(e.to_string());
    datasets::atomic::write_with(path, |w| {
        let mut writer = ArrowWriter::try_new(w, schema.clone(), Some(props)).map_err(to_io)?;
        for s in sources {
            for lo in (0..s.indices.len()).step_by(ROWS_PER_GROUP) {
                let hi = (lo + ROWS_PER_GROUP).min(s.indices.len());
                writer
                    .write(&batch(&schema, meta, s, lo..hi)?)
                    .map_err(to_io)?;
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
        Some(t) => top_k_columns(&s.probs[lo * k..hi * k], k, t, meta.dtype)?,
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
/// probabilities, and the mass of the others.
fn top_k_columns(
    probs: &[f32],
    k: usize,
    t: usize,
    dtype: StoreDtype,
) -> std::io::Result<Vec<ArrayRef>> {
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
    )
    .map_err(arrow_io)?;
    let top = float_list(&top, t, dtype, None).map_err(arrow_io)?;
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
