//! The label store's tests: round trips, metadata, malformed files and rows.

use super::schema::{schema, vector};
use super::*;
use crate::error::Result;
use arrow::array::{
    ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, StringArray, UInt32Array,
};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use std::collections::BTreeMap;
use std::sync::Arc;

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
    let mut w = ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema, None).unwrap();
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
    let write_raw_k = |classes: [u16; 2], top: [f32; 2], rest: f32, k: &str| {
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
                kv("k", k.to_string()),
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
    let write_raw = |classes, top, rest| write_raw_k(classes, top, rest, &K.to_string());
    assert!(write_raw([2, 0], [0.5, 0.3], 0.2).is_ok());
    // `ldl.k` must be the number of `ldl.classes`.
    let e = write_raw_k([2, 0], [0.5, 0.3], 0.2, "4")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.parquet")
            && e.contains("metadata key `ldl.k`: found `4`, but `ldl.classes` names 3 classes"),
        "{e}"
    );
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

/// Rows streamed in pieces of any size (crossing row groups, one row, whole groups) make the
/// file that the whole sources make, in full-vector and top-k mode, with uncertainty columns:
/// each source in its own row groups of 8192, every row read back as written.
#[test]
fn rows_streamed_in_pieces_make_the_same_store() {
    let n = 20_000;
    let indices: Vec<u32> = (0..n as u32).collect();
    let labels: Vec<u32> = (0..n as u32).map(|i| i % K as u32).collect();
    // Rows that differ, so that a row out of place shows: (i, 2i, 3i) mod 97 + 1, normalised.
    let probs = |salt: usize| -> Vec<f32> {
        (0..n)
            .flat_map(|i| {
                let v = [1, 2, 3].map(|m| ((i * m + salt) % 97 + 1) as f32);
                let s: f32 = v.iter().sum();
                v.map(|x| x / s)
            })
            .collect()
    };
    let (t, u) = (probs(0), probs(11));
    let std: Vec<f32> = (0..n * K).map(|i| (i % 13) as f32 / 100.0).collect();
    let entropy: Vec<f32> = (0..n).map(|i| (i % 7) as f32 / 10.0).collect();
    let mi: Vec<f32> = (0..n).map(|i| (i % 5) as f32 / 100.0).collect();
    let whole = |lo: usize, hi: usize, source: &'static str| SourceRows {
        source,
        indices: &indices[lo..hi],
        labels: &labels[lo..hi],
        probs: if source == "t" {
            &t[lo * K..hi * K]
        } else {
            &u[lo * K..hi * K]
        },
        mc: (source == "t.mc").then(|| McRows {
            std: &std[lo * K..hi * K],
            entropy: &entropy[lo..hi],
            mutual_information: &mi[lo..hi],
        }),
    };
    let cuts = [0, 3000, 3001, 11_193, 19_385, n];
    for top_k in [None, Some(2)] {
        let dir = tempfile::tempdir().unwrap();
        let m = LabelMeta { top_k, ..meta() };
        let (a, b) = (dir.path().join("a.parquet"), dir.path().join("b.parquet"));
        let sources = ["t", "u", "t.mc"];
        let rows: Vec<SourceRows> = sources.iter().map(|s| whole(0, n, s)).collect();
        write(&a, &m, &rows).unwrap();
        write_streamed(&b, &m, |sink| {
            for s in sources {
                for w in cuts.windows(2) {
                    sink.push(&whole(w[0], w[1], s))?;
                }
            }
            Ok(())
        })
        .unwrap();
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
            "top_k {top_k:?}: streamed pieces gave other bytes"
        );
        let file = std::fs::File::open(&b).unwrap();
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        let groups: Vec<i64> = builder
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows())
            .collect();
        assert_eq!(groups, [8192, 8192, 3616].repeat(3), "top_k {top_k:?}");
        // With K = 3 and top-2, the one class left out gets the rest, which is its own mass:
        // both modes read back every row as written.
        let got = read(&b, "u", n, &m.classes, "fp").unwrap().to_dense();
        let worst = got
            .iter()
            .zip(&u)
            .map(|(g, w)| (g - w).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-6,
            "top_k {top_k:?}: source u read back {worst} off"
        );
    }
}

/// A source's rows must come together, and with the same columns.
#[test]
fn a_source_mixing_uncertainty_columns_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (idx, lab, p) = (vec![0u32], vec![0u32], vec![0.2f32, 0.3, 0.5]);
    let (s, e) = (vec![0.0f32; K], vec![0.0f32]);
    let err = write_streamed(&dir.path().join("x.parquet"), &meta(), |sink| {
        let plain = SourceRows {
            source: "t.mc",
            indices: &idx,
            labels: &lab,
            probs: &p,
            mc: None,
        };
        sink.push(&plain)?;
        sink.push(&SourceRows {
            mc: Some(McRows {
                std: &s,
                entropy: &e,
                mutual_information: &e,
            }),
            ..plain
        })
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("with and without uncertainty columns"),
        "{err}"
    );
    assert!(!dir.path().join("x.parquet").exists());
    // `t`, `u`, then `t` again: refused.
    let err = write_streamed(&dir.path().join("y.parquet"), &meta(), |sink| {
        for source in ["t", "u", "t"] {
            sink.push(&SourceRows {
                source,
                indices: &idx,
                labels: &lab,
                probs: &p,
                mc: None,
            })?;
        }
        Ok(())
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("source `t` was given rows after another"),
        "{err}"
    );
    assert!(!dir.path().join("y.parquet").exists());
}
