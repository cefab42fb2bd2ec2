//! The checkpoint loader on damaged safetensors files: load into a ResNet-8 or refuse with an
//! error, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn model() -> &'static engine::models::Model {
    static M: OnceLock<engine::models::Model> = OnceLock::new();
    M.get_or_init(|| {
        let mut spec = engine::models::ModelSpec::new("resnet8", 3, 3).unwrap();
        spec.width = 2;
        engine::models::Model::new(&spec, &candle_core::Device::Cpu, 0).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let p = std::env::temp_dir().join(format!("ldl-fuzz-ckpt-{}.safetensors", std::process::id()));
    std::fs::write(&p, data).unwrap();
    let _ = model().load(&p);
    let _ = std::fs::remove_file(&p);
});
