//! `records.parquet`, written by a `prepare` stage: where each packed image came from. A label
//! store's `index` (and a replay store's, and the position in a `.pack`) is the image's place in
//! its packed split, which `limit` and `val` draw from the source's training images; this file
//! maps it back to the source: `record`, the image's place in the source's own split as read
//! (for CIFAR and STL-10 the index torchvision's dataset gives it; for an ImageFolder too,
//! unless it holds names starting with `.`, which torchvision takes and we skip), and for an
//! ImageFolder its file, the surest key. Users join it on (`split`,
//! `index`) in pyarrow, DuckDB or Polars.

use crate::error::Result;
use arrow::array::{ArrayRef, RecordBatch, StringArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use std::path::Path;
use std::sync::Arc;

/// The file's name in a prepare stage's folder.
pub const FILE: &str = "records.parquet";

/// The provenance of one packed split.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitRecords {
    /// `train`, `val` or `test`.
    pub split: &'static str,
    /// For each packed image, in pack order, its place in the source's split.
    pub records: Vec<usize>,
    /// For each packed image, its file relative to the source folder (ImageFolder only).
    pub files: Option<Vec<String>>,
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("split", DataType::Utf8, false),
        Field::new("index", DataType::UInt32, false),
        Field::new("record", DataType::UInt32, false),
        Field::new("file", DataType::Utf8, true),
    ]))
}

/// Writes `records.parquet` to `path` atomically, the splits in the order given.
pub fn write(path: &Path, splits: &[SplitRecords]) -> Result<()> {
    let schema = schema();
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("level")))
        .build();
    let to_io = |e: arrow::error::ArrowError| std::io::Error::other(e.to_string());
    let pq_io = |e: parquet::errors::ParquetError| std::io::Error::other(e.to_string());
    datasets::atomic::write_with(path, |w| {
        let mut writer = ArrowWriter::try_new(w, schema.clone(), Some(props)).map_err(pq_io)?;
        for s in splits {
            let n = s.records.len();
            let files: StringArray = match &s.files {
                Some(f) => f.iter().map(|p| Some(p.as_str())).collect(),
                None => std::iter::repeat_n(None::<&str>, n).collect(),
            };
            let columns: Vec<ArrayRef> = vec![
                Arc::new(StringArray::from(vec![s.split; n])),
                Arc::new(UInt32Array::from_iter_values(0..n as u32)),
                Arc::new(UInt32Array::from_iter_values(
                    s.records.iter().map(|&r| r as u32),
                )),
                Arc::new(files),
            ];
            let batch = RecordBatch::try_new(schema.clone(), columns).map_err(to_io)?;
            writer.write(&batch).map_err(pq_io)?;
        }
        writer.close().map_err(pq_io)?;
        Ok(())
    })?;
    Ok(())
}
