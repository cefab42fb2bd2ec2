//! `torch.save`'s zip format (PyTorch ≥ 1.6, the default since): an archive holding
//! `<name>/data.pkl`, the pickled object (see [`super::pickled`]); `<name>/data/<key>`, each
//! storage's bytes; and from PyTorch 1.10 `<name>/byteorder`.

use super::pickled::{materialise_all, unpickle};
use super::places::tensors;
use super::unpickler::Pickle;
use super::Select;
use crate::error::{EngineError, Result};
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

type Archive = zip::ZipArchive<BufReader<File>>;

/// The tensors of the state dict in a zip checkpoint, by their names in the file, and the dict
/// key they were under (`key`, or found).
pub(super) fn read(
    path: &Path,
    select: Select,
) -> Result<(BTreeMap<String, Tensor>, Option<String>)> {
    let (mut zip, pickle, top) = saved(path)?;
    let (refs, key) = tensors(path, &pickle, &top, select)?;
    let dir = pickle.strip_suffix(".pkl").expect("ends with data.pkl");
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    for (name, t) in &refs {
        if !storages.contains_key(&t.storage) {
            let entry = format!("{dir}/{}", t.storage);
            let mut bytes = Vec::new();
            zip.by_name(&entry)
                .and_then(|mut f| Ok(f.read_to_end(&mut bytes)?))
                .map_err(|e| {
                    EngineError::invalid(
                        path,
                        format!("tensor `{name}`"),
                        format!("its storage `{entry}`: {e}"),
                    )
                })?;
            storages.insert(t.storage.clone(), bytes);
        }
    }
    let out = materialise_all(path, refs, |key| storages.get(key).map(Vec::as_slice))?;
    Ok((out, key))
}

/// The archive, the name of its `data.pkl` and the object pickled in it.
pub(super) fn saved(path: &Path) -> Result<(Archive, String, Pickle)> {
    let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| EngineError::invalid(path, "zip archive", e.to_string()))?;
    let pickle = pickle_name(path, &zip)?;
    check_byte_order(path, &mut zip, &pickle)?;
    let mut data = Vec::new();
    zip.by_name(&pickle)
        .map_err(|e| EngineError::invalid(path, &pickle, e.to_string()))?
        .read_to_end(&mut data)
        .map_err(|e| EngineError::invalid(path, &pickle, format!("cannot read: {e}")))?;
    let top = unpickle(path, &data, &mut 0, &pickle)?;
    Ok((zip, pickle, top))
}

/// The archive's `data.pkl`, under whatever folder name it was saved with.
fn pickle_name(path: &Path, zip: &Archive) -> Result<String> {
    zip.file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
        .ok_or_else(|| {
            EngineError::invalid(
                path,
                "zip archive",
                "no `data.pkl`: not a checkpoint written by `torch.save`",
            )
        })
}

/// Refuses storages of another byte order than little-endian, the one they are read in
/// (PyTorch ≥ 1.10 records it; older files are little-endian).
fn check_byte_order(path: &Path, zip: &mut Archive, pickle: &str) -> Result<()> {
    let order = pickle.replace("data.pkl", "byteorder");
    let Ok(mut entry) = zip.by_name(&order) else {
        return Ok(());
    };
    let mut text = String::new();
    let _ = entry.read_to_string(&mut text);
    if text.trim() == "little" {
        return Ok(());
    }
    Err(EngineError::invalid(
        path,
        &order,
        format!(
            "storages in `{}` byte order; only little-endian ones are read",
            text.trim()
        ),
    ))
}
