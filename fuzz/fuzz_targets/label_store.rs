//! The label-store reader on damaged Parquet files: metadata and rows must be read or refused
//! with an error, never panic; accepted rows are distributions.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = std::env::temp_dir().join(format!("ldl-fuzz-labels-{}.parquet", std::process::id()));
    std::fs::write(&p, data).unwrap();
    if let Ok(meta) = stages::label_store::read_meta(&p) {
        let k = meta.classes.len();
        if k > 0 && k <= 1000 {
            for source in meta.teachers.keys().map(String::as_str).chain(["ensemble"]) {
                if let Ok(labels) = stages::label_store::read(&p, source, 16, &meta.classes, &meta.dataset_fingerprint) {
                    let mut row = vec![0f32; k];
                    for i in 0..labels.len() {
                        labels.row_into(i, &mut row);
                        let sum: f32 = row.iter().sum();
                        assert!((sum - 1.0).abs() < 1e-3, "{row:?}");
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_file(&p);
});
