//! stages.toml: any text must parse into a validated config or give a located error, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let file = std::path::Path::new("/nonexistent/fuzz.toml");
        if let Err(e) = pipeline::config::parse(file, text, Some(std::path::Path::new("/nonexistent/out"))) {
            // Errors point inside the file.
            assert!(e.line <= text.lines().count() + 1, "{e}");
        }
    }
});
