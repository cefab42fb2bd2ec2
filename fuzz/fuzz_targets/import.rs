//! The importer on damaged PyTorch checkpoints (zip and legacy `torch.save` formats): survey
//! (`pipeline inspect`: every place holding tensors, a model guessed from their names), read,
//! infer a ResNet-8's spec and load it, or refuse with an error, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = std::env::temp_dir().join(format!("ldl-fuzz-import-{}.pth", std::process::id()));
    std::fs::write(&p, data).unwrap();
    if let Ok(c) = engine::import::survey(&p, Some("model.state")) {
        for h in &c.holders {
            let _ = engine::import::model_of(h.tensors.iter().map(|t| (t.name.as_str(), &t.dims[..])));
        }
    }
    let _ = engine::import::survey(&p, None);
    let arch = engine::models::Arch::parse("resnet8").unwrap();
    if let Ok(state) = engine::import::read(&p, Default::default(), arch) {
        if let Ok(spec) = state.spec(&p, "resnet8", 0.0) {
            // A width read off a damaged file can be absurd; building such a model is not the
            // reader's concern.
            if spec.width <= 64 && spec.classes <= 1000 && spec.in_channels <= 16 {
                let _ = state.into_model(&p, &spec, &candle_core::Device::Cpu);
            }
        }
    }
    let _ = std::fs::remove_file(&p);
});
