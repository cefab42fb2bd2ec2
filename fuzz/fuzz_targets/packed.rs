//! The packed-store reader on damaged files: open, verify and read every image and label of
//! whatever opens; never panic, never read out of bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = std::env::temp_dir().join(format!("ldl-fuzz-packed-{}.pack", std::process::id()));
    std::fs::write(&p, data).unwrap();
    if let Ok(store) = datasets::PackedStore::open(&p) {
        let _ = store.verify();
        let k = store.info().classes.len();
        for i in 0..store.len() {
            assert!((store.label(i) as usize) < k);
            let (h, w) = store.dims(i);
            assert!(h >= store.info().h && w >= store.info().w);
            assert_eq!(store.image(i).len(), store.info().c * h * w);
        }
    }
    let _ = std::fs::remove_file(&p);
});
