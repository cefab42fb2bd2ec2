//! JSON files of the engine and the stages (checkpoint states, `model.json`, `dataset.json`):
//! read with the file and place named in errors, written atomically.

use crate::error::{EngineError, Result};
use std::path::Path;

/// Reads a JSON file into `T`, naming the file, line and column in errors.
pub fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        EngineError::invalid(
            path,
            format!("line {}, column {}", e.line(), e.column()),
            e.to_string(),
        )
    })
}

/// Writes `value` as pretty JSON, atomically.
pub fn write<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("serialisable");
    bytes.push(b'\n');
    Ok(datasets::atomic::write_bytes(path, &bytes)?)
}
