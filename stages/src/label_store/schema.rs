//! The store's Arrow schema — one row per (sample, source); full vectors or top-k columns; the
//! uncertainty columns of Monte-Carlo dropout sources — and its vector columns' conversions.

use super::StoreDtype;
use arrow::array::{Array, ArrayRef, FixedSizeListArray, Float16Array, Float32Array};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Field, Schema};
use parquet::schema::types::ColumnPath;
use std::sync::Arc;

/// Rows per row group (and per written batch).
pub(super) const ROWS_PER_GROUP: usize = 8192;

impl StoreDtype {
    /// The Arrow type of a vector's items.
    pub(crate) fn arrow(&self) -> DataType {
        match self {
            StoreDtype::F32 => DataType::Float32,
            StoreDtype::F16 => DataType::Float16,
        }
    }
}

/// A `FixedSizeList` of `k` items of `dtype`.
pub(super) fn vector(k: usize, dtype: StoreDtype) -> DataType {
    DataType::FixedSizeList(Arc::new(Field::new("item", dtype.arrow(), false)), k as i32)
}

/// The schema of a store of K classes.
pub(super) fn schema(k: usize, top_k: Option<usize>, dtype: StoreDtype) -> Schema {
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
pub(super) fn required(top_k: Option<usize>) -> &'static [&'static str] {
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

/// A `FixedSizeList<dtype, width>` of `values` (rounded to nearest for `float16`).
pub(crate) fn float_list(
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
pub(crate) fn floats_of(list: &FixedSizeListArray) -> std::borrow::Cow<'_, [f32]> {
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

/// The leaf column of a list column, as arrow-rs names it (`<name>.list.item`).
pub(super) fn leaf(column: &str) -> ColumnPath {
    ColumnPath::new(vec![column.into(), "list".into(), "item".into()])
}
