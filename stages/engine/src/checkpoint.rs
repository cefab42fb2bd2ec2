//! Training checkpoints: weights, optimizer state and the training position, written together so
//! a run killed at any instant resumes from the newest complete one.
//!
//! Layout, inside the stage's (partial) folder: `checkpoints/step-<global step, 10 digits>/` holding
//! `model.safetensors`, `optimizer.safetensors`, `state.json` and, for a method with state of its
//! own besides the model (CRD's heads and memory banks, SSKD's heads), `extra.safetensors`. A checkpoint is written into
//! `checkpoints/.tmp-step-N/`, its files and the folder fsynced, then renamed into place, so a
//! folder named `step-*` is always complete. After a new one lands, all but the newest `keep` are
//! removed, and so are any of later steps (left by a resume that could not read them). Nothing else is stateful: every random draw of training derives from (seed, epoch,
//! batch), so the position alone restores the random streams.

use crate::error::{EngineError, Result};
use crate::json::{read as read_json, write as write_json};
use crate::models::Model;
use crate::optim::Sgd;
use candle_core::{Device, Tensor};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The checkpoint folder of a training stage.
pub struct Checkpoints {
    dir: PathBuf,
    keep: usize,
}

const PREFIX: &str = "step-";
/// The file of a checkpoint's extra tensors.
const EXTRA: &str = "extra.safetensors";

/// A restored checkpoint: its state and the method's extra tensors.
pub struct Restored<S> {
    /// `state.json`.
    pub state: S,
    /// `extra.safetensors` (empty when the checkpoint has none).
    pub extra: BTreeMap<String, Tensor>,
    /// Where the extra tensors were read from, for errors about them.
    pub extra_path: PathBuf,
}

/// Writes `tensors` to the safetensors file `path` (atomically).
pub fn write_tensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let bytes =
        safetensors::serialize(tensors, None).map_err(|e| EngineError::Numeric(e.to_string()))?;
    Ok(datasets::atomic::write_bytes(path, &bytes)?)
}

/// Every tensor of the safetensors file `path`, on `device`.
pub fn read_tensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| EngineError::invalid(path, "safetensors header", e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        out.insert(name, candle_core::safetensors::Load::load(&view, device)?);
    }
    Ok(out)
}

impl Checkpoints {
    /// Checkpoints under `stage_dir/checkpoints`, keeping the newest `keep` (at least 1).
    pub fn new(stage_dir: &Path, keep: usize) -> Self {
        Checkpoints {
            dir: stage_dir.join("checkpoints"),
            keep: keep.max(1),
        }
    }

    /// Complete checkpoints, oldest first, with their global steps.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        if !self.dir.exists() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| EngineError::io(&self.dir, e))? {
            let entry = entry.map_err(|e| EngineError::io(&self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(step) = name.strip_prefix(PREFIX).and_then(|s| s.parse().ok()) {
                out.push((step, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Writes the checkpoint of global step `step` (with the method's `extra` tensors, if any),
    /// then prunes to the newest `keep`.
    pub fn save<S: Serialize>(
        &self,
        step: u64,
        model: &Model,
        opt: &Sgd,
        state: &S,
        extra: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let io = |p: &Path, e| EngineError::io(p, e);
        std::fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, e))?;
        let tmp = self.dir.join(format!(".tmp-{PREFIX}{step:010}"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| io(&tmp, e))?;
        datasets::atomic::write_bytes(&tmp.join("model.safetensors"), &model.to_safetensors()?)?;
        write_tensors(&tmp.join("optimizer.safetensors"), &opt.state()?)?;
        if !extra.is_empty() {
            write_tensors(&tmp.join(EXTRA), extra)?;
        }
        write_json(&tmp.join("state.json"), state)?;
        datasets::atomic::sync_dir(&tmp).map_err(|e| io(&tmp, e))?;
        let dst = self.dir.join(format!("{PREFIX}{step:010}"));
        if dst.exists() {
            // Only after a resume that replays to an already saved step: same contents.
            self.discard(&dst)?;
        }
        std::fs::rename(&tmp, &dst).map_err(|e| io(&dst, e))?;
        datasets::atomic::sync_dir(&self.dir).map_err(|e| io(&self.dir, e))?;
        // Checkpoints of later steps are of a run abandoned at a resume that could not read
        // them (or did not accept them): kept, they would count among the newest `keep` and
        // this one, the run's only progress, would be pruned at once.
        let mut all = self.list()?;
        while all.last().is_some_and(|(s, _)| *s > step) {
            let (_, later) = all.pop().expect("checked");
            self.discard(&later)?;
        }
        for (_, old) in &all[..all.len().saturating_sub(self.keep)] {
            self.discard(old)?;
        }
        Ok(())
    }

    /// Deletes checkpoint folder `ck`, first renaming it out of the `step-N` names, so that a
    /// kill in the middle of the deletion leaves no half-deleted checkpoint that a resume
    /// would take for a complete one.
    fn discard(&self, ck: &Path) -> Result<()> {
        let io = |p: &Path, e| EngineError::io(p, e);
        let name = ck.file_name().unwrap_or_default().to_string_lossy();
        let doomed = self.dir.join(format!(".discarded-{name}"));
        if doomed.exists() {
            std::fs::remove_dir_all(&doomed).map_err(|e| io(&doomed, e))?;
        }
        std::fs::rename(ck, &doomed).map_err(|e| io(ck, e))?;
        std::fs::remove_dir_all(&doomed).map_err(|e| io(&doomed, e))
    }

    /// Restores the newest checkpoint whose state `accept`s (e.g. its fingerprint matches) into
    /// `model` and `opt`, and returns its state and its extra tensors (empty when it has none)
    /// with the file they came from; `None` when there is none. A checkpoint that cannot be read
    /// is skipped with a warning for the next older one; when none of those can be read either,
    /// the first error is returned (the model may hold part of a checkpoint by then).
    pub fn restore<S: DeserializeOwned>(
        &self,
        device: &Device,
        model: &Model,
        opt: &mut Sgd,
        accept: impl Fn(&S) -> bool,
    ) -> Result<Option<Restored<S>>> {
        let mut unreadable = None;
        for (step, ck) in self.list()?.into_iter().rev() {
            let state: S = match read_json(&ck.join("state.json")) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("skipping checkpoint of step {step}: {e}");
                    unreadable.get_or_insert(e);
                    continue;
                }
            };
            if !accept(&state) {
                continue;
            }
            match load_into(&ck, device, model, opt) {
                Ok((extra, extra_path)) => {
                    return Ok(Some(Restored {
                        state,
                        extra,
                        extra_path,
                    }))
                }
                Err(e) => {
                    tracing::warn!("skipping checkpoint of step {step}: {e}");
                    unreadable.get_or_insert(e);
                }
            }
        }
        unreadable.map_or(Ok(None), Err)
    }
}

/// Loads checkpoint folder `ck` into `model` and `opt`; returns its extra tensors (empty when it
/// has none) and the file they came from.
fn load_into(
    ck: &Path,
    device: &Device,
    model: &Model,
    opt: &mut Sgd,
) -> Result<(BTreeMap<String, Tensor>, PathBuf)> {
    model.load(&ck.join("model.safetensors"))?;
    opt.load_state(read_tensors(&ck.join("optimizer.safetensors"), device)?)?;
    let extra_path = ck.join(EXTRA);
    let extra = if extra_path.exists() {
        read_tensors(&extra_path, device)?
    } else {
        BTreeMap::new()
    };
    Ok((extra, extra_path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ModelSpec;
    use crate::optim::SgdConfig;

    #[derive(Serialize, serde::Deserialize)]
    struct State {
        step: u64,
    }

    fn setup(dir: &Path) -> (Checkpoints, Model, Sgd) {
        let spec = ModelSpec::new("resnet8", 3, 3).unwrap();
        let model = Model::new(&spec, &Device::Cpu, 0).unwrap();
        let opt = Sgd::new(model.trainable(), SgdConfig::default());
        (Checkpoints::new(dir, 1), model, opt)
    }

    fn steps(ck: &Checkpoints) -> Vec<u64> {
        ck.list().unwrap().into_iter().map(|(s, _)| s).collect()
    }

    /// A newer checkpoint whose state cannot be read is skipped for an older one; its error is
    /// returned when no checkpoint can be read, not taken for "no checkpoint".
    #[test]
    fn an_unreadable_state_falls_back_and_alone_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (ck, model, mut opt) = setup(dir.path());
        let no_extra = BTreeMap::new();
        ck.save(50, &model, &opt, &State { step: 50 }, &no_extra)
            .unwrap();
        let newer = dir.path().join("checkpoints/step-0000000100");
        std::fs::create_dir(&newer).unwrap();
        std::fs::write(newer.join("state.json"), b"{\"step\": null}").unwrap();
        let r = ck
            .restore::<State>(&Device::Cpu, &model, &mut opt, |_| true)
            .unwrap()
            .expect("the older checkpoint");
        assert_eq!(r.state.step, 50);
        std::fs::remove_dir_all(dir.path().join("checkpoints/step-0000000050")).unwrap();
        let e = ck
            .restore::<State>(&Device::Cpu, &model, &mut opt, |_| true)
            .err()
            .expect("an error, not a fresh start");
        assert!(e.to_string().contains("step-0000000100/state.json"), "{e}");
    }

    /// After a resume from an older checkpoint, the new checkpoint is kept and the later
    /// one, of the abandoned run, goes (with keep = 1 the new one used to be pruned at once).
    #[test]
    fn saving_after_a_fallback_discards_later_checkpoints_not_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let (ck, model, opt) = setup(dir.path());
        let later = dir.path().join("checkpoints/step-0000000100");
        std::fs::create_dir_all(&later).unwrap();
        std::fs::write(later.join("state.json"), b"not json").unwrap();
        ck.save(60, &model, &opt, &State { step: 60 }, &BTreeMap::new())
            .unwrap();
        assert_eq!(steps(&ck), [60]);
        ck.save(70, &model, &opt, &State { step: 70 }, &BTreeMap::new())
            .unwrap();
        assert_eq!(steps(&ck), [70]);
    }
}
