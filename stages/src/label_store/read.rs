//! The reader: a store's metadata, and one source's rows for a split, streamed from only the
//! row groups and columns that source needs, every row checked on the way in ([`super::validate`]).

use super::schema::{floats_of, required, schema, ROWS_PER_GROUP};
use super::soft_labels::{Rows, SoftLabels};
use super::validate::RowCheck;
use super::{LabelMeta, StoreDtype};
use crate::error::{Result, StageError};
use arrow::array::{Array, AsArray, FixedSizeListArray, Float32Array, StringArray, UInt32Array};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::metadata::KeyValue;
use std::collections::BTreeMap;
use std::path::Path;

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
    let classes: Vec<String> =
        serde_json::from_str(&get("classes")?).map_err(|e| bad_json("classes", e))?;
    let k = get("k")?;
    if k.parse::<usize>().ok() != Some(classes.len()) {
        return Err(StageError::invalid(
            path,
            "metadata key `ldl.k`",
            format!(
                "found `{k}`, but `ldl.classes` names {} classes",
                classes.len()
            ),
        ));
    }
    Ok(LabelMeta {
        classes,
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
        // Any string representation (another tool's large strings or views) as strings.
        let column = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8);
        if let Some(src) = column.ok().as_ref().and_then(|c| c.as_string_opt::<i32>()) {
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
pub fn guard<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    engine::error::unpanicked(f, |msg| {
        StageError::invalid(
            path,
            "a data page",
            format!("the Parquet decoder failed on damaged data: {msg}"),
        )
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
    let meta = check_store(path, &builder, classes, fingerprint)?;
    let k = classes.len();
    let (groups, spans) = source_row_groups(&builder, source);
    // Stream only what the source needs: its row groups, and the columns index, source and
    // its distributions.
    let arrow_schema = builder.schema().clone();
    let roots = required(meta.top_k)
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
    let mut sink = Sink::new(path, &meta, n, spans);
    let documented = schema(k, meta.top_k, meta.dtype);
    for batch in reader {
        let batch = batch.map_err(|e| {
            StageError::invalid(path, "a row group", format!("cannot be read: {e}"))
        })?;
        let batch = super::conform::conform(path, &batch, &documented, &|r| sink.peek_file_row(r))?;
        sink.take(&batch, source)?;
    }
    if !sink.found {
        return Err(StageError::invalid(
            path,
            "column `source`",
            format!(
                "no rows for source `{source}`; the store has {:?}",
                source_names(path)?
            ),
        ));
    }
    if let Some(missing) = sink.seen.iter().position(|s| !s) {
        return Err(StageError::invalid(
            path,
            "column `index`",
            format!("sample {missing} of 0..{n} has no row for source `{source}`"),
        ));
    }
    Ok(SoftLabels {
        k,
        meta,
        rows: sink.rows,
    })
}

/// The store's metadata, checked against the dataset (`classes`, `fingerprint`) and its
/// columns against the schema of its mode.
fn check_store(
    path: &Path,
    builder: &ParquetRecordBatchReaderBuilder<std::fs::File>,
    classes: &[String],
    fingerprint: &str,
) -> Result<LabelMeta> {
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
    let expected = schema(classes.len(), meta.top_k, meta.dtype);
    let arrow_schema = builder.schema();
    let needed = required(meta.top_k);
    for f in expected
        .fields()
        .iter()
        .filter(|f| needed.contains(&f.name().as_str()))
    {
        match arrow_schema.field_with_name(f.name()) {
            Ok(actual) if super::conform::compatible(actual.data_type(), f.data_type()) => {}
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
    Ok(meta)
}

/// The row groups whose `source` statistics admit `source` (the writer gives each source its
/// own row groups), and the (first file row, rows) of each, to name file rows in errors.
fn source_row_groups(
    builder: &ParquetRecordBatchReaderBuilder<std::fs::File>,
    source: &str,
) -> (Vec<usize>, Vec<(usize, usize)>) {
    let source_col = builder
        .parquet_schema()
        .columns()
        .iter()
        .position(|c| c.path().parts() == ["source"]);
    let all = builder.metadata().row_groups();
    let groups: Vec<usize> = all
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
    let mut starts = Vec::with_capacity(all.len());
    let mut at = 0usize;
    for rg in all {
        starts.push(at);
        at += rg.num_rows() as usize;
    }
    let spans = groups
        .iter()
        .map(|&g| (starts[g], all[g].num_rows() as usize))
        .collect();
    (groups, spans)
}

/// Where one source's rows land while they stream in: each checked by [`RowCheck`], placed at
/// its sample index, every index seen once.
struct Sink<'a> {
    check: RowCheck<'a>,
    top_k: Option<usize>,
    dtype: StoreDtype,
    k: usize,
    n: usize,
    rows: Rows,
    seen: Vec<bool>,
    /// Scratch of the top-k class check.
    dup: Vec<bool>,
    found: bool,
    /// (first file row, rows) of each selected row group, and the position in them.
    spans: Vec<(usize, usize)>,
    span: usize,
    offset: usize,
}

impl<'a> Sink<'a> {
    fn new(path: &'a Path, meta: &LabelMeta, n: usize, spans: Vec<(usize, usize)>) -> Self {
        let k = meta.classes.len();
        Sink {
            check: RowCheck {
                path,
                tolerance: meta.dtype.sum_tolerance(k),
                prefix: "",
            },
            top_k: meta.top_k,
            dtype: meta.dtype,
            k,
            n,
            rows: match meta.top_k {
                None => Rows::Full(vec![f32::NAN; n * k]),
                Some(t) => Rows::TopK {
                    t,
                    classes: vec![0; n * t],
                    probs: vec![f32::NAN; n * t],
                    rest: vec![f32::NAN; n],
                },
            },
            seen: vec![false; n],
            dup: vec![false; k],
            found: false,
            spans,
            span: 0,
            offset: 0,
        }
    }

    /// The file row of the next row read.
    fn next_file_row(&mut self) -> usize {
        let (row, span, offset) = self.after(self.span, self.offset);
        (self.span, self.offset) = (span, offset);
        row
    }

    /// The file row of the `r`-th row (from 0) still to be read, without reading it.
    fn peek_file_row(&self, r: usize) -> usize {
        let (mut span, mut offset, mut row) = (self.span, self.offset, 0);
        for _ in 0..=r {
            (row, span, offset) = self.after(span, offset);
        }
        row
    }

    /// From position (`span`, `offset`): the file row of the next row, and the position after it.
    fn after(&self, mut span: usize, mut offset: usize) -> (usize, usize, usize) {
        while span < self.spans.len() && offset == self.spans[span].1 {
            span += 1;
            offset = 0;
        }
        offset += 1;
        let row = self.spans.get(span).map_or(0, |s| s.0 + offset - 1);
        (row, span, offset)
    }

    /// Takes the rows of `source` in `batch`.
    fn take(&mut self, batch: &arrow::array::RecordBatch, source: &str) -> Result<()> {
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
        let full = self.top_k.is_none().then(|| list("probs"));
        let full_values = full.as_ref().map(floats_of);
        let top = self.top_k.map(|_| {
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
            let at = self.next_file_row();
            if src.value(r) != source {
                continue;
            }
            self.found = true;
            let i = self.index(at, index.value(r) as usize, source)?;
            match (&full, &full_values, &top, &top_values) {
                (Some(list), Some(values), _, _) => {
                    let start = list.value_offset_at(r);
                    self.full_row(at, i, &values[start..start + self.k])?;
                }
                (_, _, Some((cl, class_values, tlist, rest_col)), Some(values)) => {
                    let t = self.top_k.expect("top-k mode");
                    let cs = &class_values.values()[cl.value_offset_at(r)..][..t];
                    let ps = &values[tlist.value_offset_at(r)..][..t];
                    self.top_k_row(at, i, cs, ps, rest_col.value(r))?;
                }
                _ => unreachable!("one of the two modes"),
            }
        }
        Ok(())
    }

    /// Checks a row's sample index: in the split, not seen before.
    fn index(&mut self, at: usize, i: usize, source: &str) -> Result<usize> {
        let (path, n) = (self.check.path, self.n);
        if i >= n {
            return Err(StageError::invalid(
                path,
                format!("row {at}, column `index`"),
                format!("{i} is outside the split's 0..{n}"),
            ));
        }
        if self.seen[i] {
            return Err(StageError::invalid(
                path,
                format!("row {at}, column `index`"),
                format!("sample {i} appears twice for source `{source}`"),
            ));
        }
        self.seen[i] = true;
        Ok(i)
    }

    /// Sample `i`'s full vector, checked (and renormalised from float16).
    fn full_row(&mut self, at: usize, i: usize, values: &[f32]) -> Result<()> {
        let k = self.k;
        let Rows::Full(probs) = &mut self.rows else {
            unreachable!("full mode")
        };
        let row = &mut probs[i * k..(i + 1) * k];
        row.copy_from_slice(values);
        let sum = self.check.distribution(at, "probs", row, &[], 0.0)?;
        if self.dtype == StoreDtype::F16 {
            row.iter_mut().for_each(|v| *v /= sum);
        }
        Ok(())
    }

    /// Sample `i`'s top-k classes, probabilities and remaining mass, checked (and renormalised
    /// from float16).
    fn top_k_row(
        &mut self,
        at: usize,
        i: usize,
        cs: &[u16],
        ps: &[f32],
        rest_v: f32,
    ) -> Result<()> {
        self.check.top_k_classes(at, cs, self.k, &mut self.dup)?;
        let t = cs.len();
        self.check.rest(at, rest_v, t == self.k)?;
        let sum = self.check.distribution(at, "topk_probs", ps, cs, rest_v)?;
        let scale = if self.dtype == StoreDtype::F16 {
            1.0 / sum
        } else {
            1.0
        };
        let Rows::TopK {
            classes,
            probs,
            rest,
            ..
        } = &mut self.rows
        else {
            unreachable!("top-k mode")
        };
        classes[i * t..(i + 1) * t].copy_from_slice(cs);
        probs[i * t..(i + 1) * t]
            .iter_mut()
            .zip(ps)
            .for_each(|(o, &v)| *o = v * scale);
        rest[i] = rest_v * scale;
        Ok(())
    }
}
