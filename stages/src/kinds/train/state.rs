//! What a training run carries from step to step and keeps in its checkpoints: the sums of the
//! epoch in progress, the finished epochs' log rows, and the per-sample results of the steps
//! not yet read back from the device.

use crate::error::{Result, StageError};
use crate::science::ogr::OgrPoint;
use candle_core::Tensor;
use engine::checkpoint::Checkpoints;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct EpochRow {
    pub(super) epoch: usize,
    pub(super) lr: f64,
    pub(super) loss: f64,
    pub(super) accuracy: f64,
    pub(super) images_per_s: f64,
    pub(super) seconds: f64,
    /// Mean training loss of the images of each class (by their own label), for the loss-curve
    /// figure; written to `class_loss.csv`. `None` for a class with no image in the epoch: a
    /// NaN here would be written to `state.json` as `null`, which an `f64` cannot read back,
    /// and every later checkpoint would be unreadable.
    pub(super) class_loss: Vec<Option<f64>>,
    /// The held-out evaluation after this epoch (`eval_every`), if one was due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) eval: Option<EpochEval>,
}

/// The model evaluated on a held-out split after an epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct EpochEval {
    /// Mean negative log-likelihood (nats).
    pub(super) nll: f64,
    /// Top-1 accuracy in [0, 1].
    pub(super) accuracy: f64,
    /// ECE over 10 equal-width bins (the evaluate stage's default).
    pub(super) ece: f64,
}

/// Sums over the part of an epoch done so far; kept in checkpoints so a resumed epoch logs the
/// same row as an uninterrupted one (timings aside). serde_json's `float_roundtrip` feature makes
/// the f64 values come back bit for bit from `state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct EpochSums {
    pub(super) loss: f64,
    pub(super) correct: usize,
    pub(super) seen: usize,
    pub(super) lr: f64,
    pub(super) seconds: f64,
    pub(super) class_loss: Vec<f64>,
    pub(super) class_seen: Vec<usize>,
}

/// `state.json` of a checkpoint: where training stands.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct CheckpointState {
    pub(super) fingerprint: String,
    /// Global step (batches done since the start).
    pub(super) step: u64,
    /// The epoch in progress and its next batch (batch 0 of the next epoch at an epoch's end).
    pub(super) epoch: usize,
    pub(super) batch: usize,
    pub(super) sums: EpochSums,
    pub(super) log: Vec<EpochRow>,
    /// OGR measurements so far (OGR methods only).
    #[serde(default)]
    pub(super) ogr: Vec<OgrPoint>,
}

/// How far the training whose (partial) folder is `dir` got, by its newest readable checkpoint:
/// `6 of 12 epochs done (epoch 6: loss 1.0986, accuracy 33.3%)`, and `, 3 batches into epoch
/// 7` when it stopped mid-epoch, then the training time left at the pace of the last (up to
/// [`PACE_EPOCHS`]) epochs (`, about 12 min of training left`); `None` without a checkpoint.
pub(super) fn progress(dir: &Path, epochs: usize) -> Option<String> {
    /// What is read of `state.json`: not the epochs' per-class losses (megabytes at 1000
    /// classes and hundreds of epochs), only skimmed.
    #[derive(Deserialize)]
    struct Position {
        step: u64,
        epoch: usize,
        batch: usize,
        log: Vec<Logged>,
    }
    #[derive(Deserialize)]
    struct Logged {
        epoch: usize,
        loss: f64,
        accuracy: f64,
        seconds: f64,
    }
    let checkpoints = Checkpoints::new(dir, 1).list().ok()?;
    // Newest first: a running training may prune one between the listing and its reading.
    let state = checkpoints
        .iter()
        .rev()
        .find_map(|(_, ck)| engine::json::read::<Position>(&ck.join("state.json")).ok())?;
    let mut out = format!("{} of {epochs} epochs done", state.epoch);
    if let Some(last) = state.log.last() {
        out += &format!(
            " (epoch {}: loss {:.4}, accuracy {:.1}%)",
            last.epoch,
            last.loss,
            100.0 * last.accuracy
        );
    }
    if state.batch > 0 {
        out += &format!(", {} batches into epoch {}", state.batch, state.epoch + 1);
    }
    let recent = &state.log[state.log.len().saturating_sub(PACE_EPOCHS)..];
    if !recent.is_empty() && state.epoch < epochs {
        let per_epoch = recent.iter().map(|r| r.seconds).sum::<f64>() / recent.len() as f64;
        // Batches an epoch, from the global step (every epoch done had as many).
        let steps = (state.step as f64 - state.batch as f64) / state.epoch as f64;
        let into = if steps >= 1.0 {
            (state.batch as f64 / steps).min(1.0)
        } else {
            0.0
        };
        let left = (epochs - state.epoch) as f64 - into;
        out += &format!(
            ", about {} of training left",
            crate::progress::rough(per_epoch * left)
        );
    }
    Some(out)
}

/// Epochs whose mean duration is the pace of the time left.
const PACE_EPOCHS: usize = 5;

/// Steps between reads of the loss on the host: each read waits for the device to finish
/// the queued steps, so reading every step would stall the GPU between steps.
pub(super) const READ_EVERY: usize = 25;

/// Per-sample losses and predictions of the steps not yet read back to the host.
#[derive(Default)]
pub(super) struct Pending {
    losses: Vec<Tensor>,
    preds: Vec<Tensor>,
    labels: Vec<u32>,
    /// (batch index, batch size) of each pending step.
    batches: Vec<(usize, usize)>,
}

impl Pending {
    pub(super) fn push(&mut self, losses: Tensor, preds: Tensor, labels: &[u32], batch: usize) {
        self.losses.push(losses);
        self.preds.push(preds);
        self.labels.extend_from_slice(labels);
        self.batches.push((batch, labels.len()));
    }

    pub(super) fn len(&self) -> usize {
        self.batches.len()
    }

    /// Reads the pending steps (one wait for the device) into `sums`, batch by batch as if read
    /// after every step (so the sums do not depend on when reads happen); fails on a
    /// non-finite loss, naming the epoch and batch.
    pub(super) fn read(&mut self, sums: &mut EpochSums, name: &str, epoch: usize) -> Result<()> {
        if self.batches.is_empty() {
            return Ok(());
        }
        let losses = Tensor::cat(&self.losses, 0)?.to_vec1::<f32>()?;
        let preds = Tensor::cat(&self.preds, 0)?.to_vec1::<u32>()?;
        self.losses.clear();
        self.preds.clear();
        let mut at = 0;
        for &(index, b) in &self.batches {
            let (ls, ps, ys) = (
                &losses[at..at + b],
                &preds[at..at + b],
                &self.labels[at..at + b],
            );
            at += b;
            let l: f64 = ls.iter().map(|&v| v as f64).sum::<f64>() / b as f64;
            if !l.is_finite() {
                return Err(StageError::numeric(format!(
                    "{name}: the loss became {l} at epoch {}, batch {index}; lower the learning rate",
                    epoch + 1
                )));
            }
            for ((&y, &pr), &li) in ys.iter().zip(ps).zip(ls) {
                sums.correct += (y == pr) as usize;
                sums.class_loss[y as usize] += li as f64;
                sums.class_seen[y as usize] += 1;
            }
            sums.loss += l * b as f64;
            sums.seen += b;
        }
        self.labels.clear();
        self.batches.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An epoch in which a class had no image (a `limit` can leave one out) is written to
    /// `state.json` and read back: its NaN used to be written as `null`, which made every later
    /// checkpoint unreadable, so a resumed run started again from step 0.
    #[test]
    fn a_class_unseen_in_an_epoch_round_trips_through_state_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let state = CheckpointState {
            fingerprint: "f".into(),
            step: 8,
            epoch: 1,
            batch: 0,
            sums: EpochSums::default(),
            log: vec![EpochRow {
                epoch: 1,
                lr: 0.1,
                loss: 1.5,
                accuracy: 0.25,
                images_per_s: 100.0,
                seconds: 1.0,
                class_loss: vec![Some(1.25), None, Some(0.5)],
                eval: None,
            }],
            ogr: Vec::new(),
        };
        engine::json::write(&path, &state).unwrap();
        let back: CheckpointState = engine::json::read(&path).unwrap();
        assert_eq!(back.log[0].class_loss, [Some(1.25), None, Some(0.5)]);
    }

    /// `state.json` of a checkpoint at `step` under `dir`: at `epoch` (in progress) and `batch`
    /// (its next), after `rows` epochs of loss 0.5·e, accuracy 0.25 and 2·e seconds.
    fn checkpoint(dir: &Path, step: u64, epoch: usize, batch: usize, rows: usize) {
        let state = CheckpointState {
            fingerprint: "f".into(),
            step,
            epoch,
            batch,
            sums: EpochSums::default(),
            log: (1..=rows)
                .map(|e| EpochRow {
                    epoch: e,
                    lr: 0.1,
                    loss: 0.5 * e as f64,
                    accuracy: 0.25,
                    images_per_s: 100.0,
                    seconds: 2.0 * e as f64,
                    class_loss: vec![Some(1.0); 3],
                    eval: None,
                })
                .collect(),
            ogr: Vec::new(),
        };
        let ck = dir.join(format!("checkpoints/step-{step:010}"));
        std::fs::create_dir_all(&ck).unwrap();
        engine::json::write(&ck.join("state.json"), &state).unwrap();
    }

    /// Progress is read from the newest checkpoint whose state reads: epochs done at an epoch's
    /// end, the batches into the next mid-epoch, none before a first checkpoint; the time left
    /// at the mean pace of the last five epochs.
    #[test]
    fn progress_is_the_newest_readable_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(progress(dir.path(), 12), None);
        checkpoint(dir.path(), 3, 0, 3, 0);
        assert_eq!(
            progress(dir.path(), 12).as_deref(),
            Some("0 of 12 epochs done, 3 batches into epoch 1")
        );
        // Epochs of 2 and 4 s: 3 s an epoch, 10 epochs left.
        checkpoint(dir.path(), 12, 2, 0, 2);
        let at_end = "2 of 12 epochs done (epoch 2: loss 1.0000, accuracy 25.0%)";
        assert_eq!(
            progress(dir.path(), 12),
            Some(format!("{at_end}, about 30 s of training left"))
        );
        // 6 batches an epoch (12 steps in 2 epochs), 2 into the third: 9⅔ epochs left.
        checkpoint(dir.path(), 14, 2, 2, 2);
        let mid = format!("{at_end}, 2 batches into epoch 3, about 29 s of training left");
        assert_eq!(progress(dir.path(), 12), Some(mid.clone()));
        // A newer checkpoint whose state does not read (cut short) is passed over.
        let cut = dir.path().join("checkpoints/step-0000000018");
        std::fs::create_dir_all(&cut).unwrap();
        std::fs::write(cut.join("state.json"), "{\"epoch\": 3, \"batch").unwrap();
        assert_eq!(progress(dir.path(), 12), Some(mid));
    }

    /// Epochs 1…8 of 2·e seconds: the last five (8 to 16 s) give 12 s an epoch. 100 epochs left
    /// are 20 min; longer runs in hours and days, short ones in seconds.
    #[test]
    fn time_left_is_at_the_last_epochs_pace() {
        let dir = tempfile::tempdir().unwrap();
        checkpoint(dir.path(), 80, 8, 0, 8);
        let left = |epochs| progress(dir.path(), epochs).unwrap();
        assert!(
            left(108).ends_with(", about 20 min of training left"),
            "{}",
            left(108)
        );
        assert!(
            left(1508).ends_with(", about 5.0 h of training left"),
            "{}",
            left(1508)
        );
        assert!(
            left(20008).ends_with(", about 2.8 days of training left"),
            "{}",
            left(20008)
        );
        assert!(
            left(10).ends_with(", about 24 s of training left"),
            "{}",
            left(10)
        );
        // Every epoch done: nothing left to time.
        assert!(!left(8).contains("left"), "{}", left(8));
    }
}
