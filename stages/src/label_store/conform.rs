//! Stores written by other tools: pyarrow, Polars and DuckDB name and type a store's columns
//! their own way (a list's item called `element` and nullable, strings as large strings or
//! views, vectors as variable-length lists, indices as other integers, float16 widened to
//! float32). The reader takes any column that holds the documented values and maps it onto the
//! documented type here, refusing nulls and vectors of the wrong length by their row.

use crate::error::{Result, StageError};
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::{cast_with_options, CastOptions};
use arrow::datatypes::{DataType, Field, Schema};
use std::path::Path;
use std::sync::Arc;

/// Whether a column of type `actual` holds what a column of the documented type `expected`
/// holds: the same type, or the same values in another representation.
pub(super) fn compatible(actual: &DataType, expected: &DataType) -> bool {
    use DataType::*;
    match (actual, expected) {
        _ if actual == expected => true,
        (FixedSizeList(a, n), FixedSizeList(e, m)) => {
            n == m && scalar_compatible(a.data_type(), e.data_type())
        }
        (List(a) | LargeList(a), FixedSizeList(e, _)) => {
            scalar_compatible(a.data_type(), e.data_type())
        }
        _ => scalar_compatible(actual, expected),
    }
}

/// Integers for integers (values range-checked when cast), any float for float32, float16 or
/// float32 (exact float16 values, as DuckDB widens them) for float16, any string for strings.
fn scalar_compatible(actual: &DataType, expected: &DataType) -> bool {
    use DataType::*;
    match (actual, expected) {
        _ if actual == expected => true,
        (Utf8 | LargeUtf8 | Utf8View, Utf8) => true,
        (a, Float32) => a.is_floating(),
        (Float32, Float16) => true,
        (a, e) => a.is_integer() && e.is_integer(),
    }
}

/// The type a column of type `actual` is read as: the documented `expected`, except that a
/// float vector keeps float32 items where it has them (a float16 store rewritten by DuckDB).
fn target(actual: &DataType, expected: &DataType) -> DataType {
    match (actual, expected) {
        (
            DataType::FixedSizeList(a, _) | DataType::List(a) | DataType::LargeList(a),
            DataType::FixedSizeList(e, n),
        ) if e.data_type() == &DataType::Float16 && a.data_type() != &DataType::Float16 => {
            DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, false)), *n)
        }
        _ => expected.clone(),
    }
}

/// `batch` (columns of a store, checked [`compatible`] with `expected`) with every column in
/// the documented representation; `file_row` gives the file row of a batch row, for errors.
pub(super) fn conform(
    path: &Path,
    batch: &RecordBatch,
    expected: &Schema,
    file_row: &dyn Fn(usize) -> usize,
) -> Result<RecordBatch> {
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let name = field.name();
        let want = expected
            .field_with_name(name)
            .expect("checked against the schema")
            .data_type();
        let at = |r: usize| format!("row {}, column `{name}`", file_row(r));
        if let Some(r) = (0..column.len()).find(|&r| column.is_null(r)) {
            return Err(StageError::invalid(path, at(r), "null, expected a value"));
        }
        if let DataType::FixedSizeList(_, width) = want {
            if let Some((r, why)) = bad_vector(column, *width as usize) {
                return Err(StageError::invalid(path, at(r), why));
            }
        }
        let to = target(column.data_type(), want);
        let column: ArrayRef = if column.data_type() == &to {
            column.clone()
        } else {
            let options = CastOptions {
                safe: false,
                ..Default::default()
            };
            cast_with_options(column, &to, &options).map_err(|e| {
                StageError::invalid(
                    path,
                    format!("column `{name}`"),
                    format!("cannot be read as {to}: {e}"),
                )
            })?
        };
        fields.push(Field::new(name, to, false));
        columns.push(column);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| StageError::invalid(path, "a row group", e.to_string()))
}

/// The first row of a vector column whose vector has another length than `width` or a null
/// item, and what is wrong with it.
fn bad_vector(column: &ArrayRef, width: usize) -> Option<(usize, String)> {
    let item_nulls = |item: ArrayRef| item.null_count() > 0;
    let row_of = |lengths: &mut dyn Iterator<Item = usize>, items: &dyn Fn(usize) -> ArrayRef| {
        lengths.enumerate().find_map(|(r, len)| {
            if len != width {
                Some((r, format!("{len} values, expected {width}")))
            } else if item_nulls(items(r)) {
                Some((r, "a null value, expected a number".to_string()))
            } else {
                None
            }
        })
    };
    if let Some(list) = column.as_list_opt::<i32>() {
        let mut lengths = list.offsets().windows(2).map(|w| (w[1] - w[0]) as usize);
        row_of(&mut lengths, &|r| list.value(r))
    } else if let Some(list) = column.as_list_opt::<i64>() {
        let mut lengths = list.offsets().windows(2).map(|w| (w[1] - w[0]) as usize);
        row_of(&mut lengths, &|r| list.value(r))
    } else if let Some(list) = column.as_fixed_size_list_opt() {
        if list.values().null_count() == 0 {
            return None;
        }
        let mut lengths = std::iter::repeat_n(list.value_length() as usize, list.len());
        row_of(&mut lengths, &|r| list.value(r))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        FixedSizeListArray, Float64Array, Int64Array, LargeStringArray, ListArray, StringArray,
        UInt32Array,
    };
    use arrow::buffer::OffsetBuffer;

    fn expected() -> Schema {
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        Schema::new(vec![
            Field::new("index", DataType::UInt32, false),
            Field::new("source", DataType::Utf8, false),
            Field::new("probs", DataType::FixedSizeList(item, 2), false),
        ])
    }

    /// A batch as another tool writes it: int64 indices, large strings, variable-length lists
    /// of float64 whose item is called `element` and nullable.
    fn foreign(index: Vec<i64>, lengths: Vec<usize>, values: Vec<f64>) -> RecordBatch {
        let n = index.len();
        let item = Arc::new(Field::new("element", DataType::Float64, true));
        let probs = ListArray::new(
            item.clone(),
            OffsetBuffer::from_lengths(lengths),
            Arc::new(Float64Array::from(values)),
            None,
        );
        let schema = Schema::new(vec![
            Field::new("index", DataType::Int64, true),
            Field::new("source", DataType::LargeUtf8, true),
            Field::new("probs", DataType::List(item), true),
        ]);
        RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(Int64Array::from(index)),
                Arc::new(LargeStringArray::from(vec!["t"; n])),
                Arc::new(probs),
            ],
        )
        .unwrap()
    }

    fn err(batch: &RecordBatch) -> String {
        conform(Path::new("s.parquet"), batch, &expected(), &|r| r + 100)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn other_representations_of_the_documented_values_are_read() {
        let batch = foreign(vec![0, 1], vec![2, 2], vec![0.25, 0.75, 1.0, 0.0]);
        for f in expected().fields() {
            let actual = batch.schema().field_with_name(f.name()).unwrap().clone();
            assert!(compatible(actual.data_type(), f.data_type()), "{f}");
        }
        let b = conform(Path::new("s.parquet"), &batch, &expected(), &|r| r).unwrap();
        let index = b.column(0).as_any().downcast_ref::<UInt32Array>().unwrap();
        assert_eq!(index.values(), &[0, 1]);
        let source = b.column(1).as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(source.value(1), "t");
        let probs = b.column(2).as_any().downcast_ref::<FixedSizeListArray>();
        let values = probs
            .unwrap()
            .values()
            .as_primitive::<arrow::datatypes::Float32Type>();
        assert_eq!(values.values(), &[0.25, 0.75, 1.0, 0.0]);
    }

    #[test]
    fn other_types_wrong_lengths_nulls_and_negative_indices_are_refused_by_row() {
        let strings = DataType::Utf8;
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        assert!(!compatible(&strings, &DataType::UInt32));
        assert!(!compatible(
            &DataType::FixedSizeList(item.clone(), 3),
            &DataType::FixedSizeList(item.clone(), 2)
        ));
        assert!(!compatible(&DataType::Float32, &DataType::UInt32));
        let e = err(&foreign(
            vec![0, 1],
            vec![2, 3],
            vec![0.5, 0.5, 0.2, 0.3, 0.5],
        ));
        assert!(
            e.contains("row 101, column `probs`") && e.contains("3 values, expected 2"),
            "{e}"
        );
        let mut nulls = foreign(vec![0, 1], vec![2, 2], vec![0.5; 4]);
        let values = Float64Array::from(vec![Some(0.5), Some(0.5), None, Some(0.5)]);
        let probs = ListArray::new(
            Arc::new(Field::new("element", DataType::Float64, true)),
            OffsetBuffer::from_lengths([2, 2]),
            Arc::new(values),
            None,
        );
        let mut columns = nulls.columns().to_vec();
        columns[2] = Arc::new(probs);
        nulls = RecordBatch::try_new(nulls.schema(), columns).unwrap();
        let e = err(&nulls);
        assert!(
            e.contains("row 101, column `probs`") && e.contains("null"),
            "{e}"
        );
        let e = err(&foreign(vec![0, -1], vec![2, 2], vec![0.5; 4]));
        assert!(
            e.contains("column `index`") && e.contains("cannot be read as"),
            "{e}"
        );
        let mut index_null = foreign(vec![0, 1], vec![2, 2], vec![0.5; 4]);
        let mut columns = index_null.columns().to_vec();
        columns[0] = Arc::new(Int64Array::from(vec![None, Some(1)]));
        index_null = RecordBatch::try_new(index_null.schema(), columns).unwrap();
        let e = err(&index_null);
        assert!(e.contains("row 100, column `index`: null"), "{e}");
    }
}
