//! A training curve: the held-out metrics a training logged by epoch (its `eval_every`
//! evaluations, on `val` or else `test`) beside its training loss and accuracy. A `train` stage
//! writes them into `train_log.csv`; an `evaluate` stage copies the evaluated epochs into its
//! own `curve.csv` (the same columns) and draws them, and a `report` draws every row's curve
//! averaged over seeds. One reader serves both files.

use crate::error::{Result, StageError};
use std::path::Path;

/// One evaluated epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct CurvePoint {
    /// The epoch (1-based) after which the model was evaluated.
    pub epoch: u32,
    /// The method's training loss, averaged over the epoch.
    pub loss: f64,
    /// Training accuracy over the epoch (on augmented, possibly mixed batches).
    pub accuracy: f64,
    /// Held-out mean negative log-likelihood (nats).
    pub nll: f64,
    /// Held-out top-1 accuracy in [0, 1].
    pub held_out_accuracy: f64,
    /// Held-out ECE (10 equal-width bins).
    pub ece: f64,
}

/// The evaluated epochs of one training.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// The held-out split: `val` or `test`.
    pub split: String,
    /// Evaluated epochs, in order.
    pub points: Vec<CurvePoint>,
}

/// The held-out splits a training may evaluate on, as its columns are prefixed.
const SPLITS: [&str; 2] = ["val", "test"];

impl Curve {
    /// Reads the evaluated epochs of `path`, a `train_log.csv` or `curve.csv`; `None` when the
    /// file is missing, has no held-out columns (trained without `eval_every`) or no evaluated
    /// epoch. A malformed file is an error naming its line and column.
    pub fn read(path: &Path) -> Result<Option<Curve>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StageError::io(path, e)),
        };
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
        let column = |name: &str| header.iter().position(|h| *h == name);
        let Some(split) = SPLITS
            .into_iter()
            .find(|s| column(&format!("{s}_accuracy")).is_some())
        else {
            return Ok(None);
        };
        let names = [
            "epoch".to_string(),
            "loss".into(),
            "accuracy".into(),
            format!("{split}_nll"),
            format!("{split}_accuracy"),
            format!("{split}_ece"),
        ];
        let mut at = [0usize; 6];
        for (slot, name) in at.iter_mut().zip(&names) {
            *slot = column(name).ok_or_else(|| {
                StageError::invalid(path, "line 1", format!("has no `{name}` column"))
            })?;
        }
        let mut points = Vec::new();
        for (i, line) in lines.enumerate() {
            let cells: Vec<&str> = line.split(',').collect();
            if cells.len() != header.len() {
                return Err(StageError::invalid(
                    path,
                    format!("line {}", i + 2),
                    format!("has {} cells, expected {}", cells.len(), header.len()),
                ));
            }
            if cells[at[4]].is_empty() {
                continue; // an epoch that was not evaluated
            }
            let number = |j: usize| -> Result<f64> {
                cells[at[j]].parse::<f64>().map_err(|_| {
                    StageError::invalid(
                        path,
                        format!("line {}, column `{}`", i + 2, names[j]),
                        format!("`{}` is not a number", cells[at[j]]),
                    )
                })
            };
            points.push(CurvePoint {
                epoch: number(0)? as u32,
                loss: number(1)?,
                accuracy: number(2)?,
                nll: number(3)?,
                held_out_accuracy: number(4)?,
                ece: number(5)?,
            });
        }
        Ok((!points.is_empty()).then(|| Curve {
            split: split.to_string(),
            points,
        }))
    }

    /// Writes `curve.csv`: the columns of `train_log.csv` that [`Curve::read`] reads.
    pub fn write(&self, path: &Path) -> Result<()> {
        let s = &self.split;
        let mut csv = format!("epoch,loss,accuracy,{s}_nll,{s}_accuracy,{s}_ece\n");
        for p in &self.points {
            csv.push_str(&format!(
                "{},{},{},{},{},{}\n",
                p.epoch, p.loss, p.accuracy, p.nll, p.held_out_accuracy, p.ece
            ));
        }
        datasets::atomic::write_bytes(path, csv.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_evaluated_epochs_of_a_train_log_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("train_log.csv");
        std::fs::write(
            &log,
            "epoch,lr,loss,accuracy,images_per_s,seconds,val_nll,val_accuracy,val_ece\n\
             1,0.1,2.5,0.2,100.0,1.000,,,\n\
             2,0.1,2.0,0.3,100.0,1.000,1.75,0.375,0.0625\n\
             3,0.01,1.5,0.5,100.0,1.000,1.25,0.5,0.03125\n",
        )
        .unwrap();
        let curve = Curve::read(&log).unwrap().unwrap();
        assert_eq!(curve.split, "val");
        assert_eq!(
            curve.points,
            [
                CurvePoint {
                    epoch: 2,
                    loss: 2.0,
                    accuracy: 0.3,
                    nll: 1.75,
                    held_out_accuracy: 0.375,
                    ece: 0.0625
                },
                CurvePoint {
                    epoch: 3,
                    loss: 1.5,
                    accuracy: 0.5,
                    nll: 1.25,
                    held_out_accuracy: 0.5,
                    ece: 0.03125
                }
            ]
        );
        let copy = dir.path().join("curve.csv");
        curve.write(&copy).unwrap();
        assert_eq!(
            std::fs::read_to_string(&copy).unwrap(),
            "epoch,loss,accuracy,val_nll,val_accuracy,val_ece\n\
             2,2,0.3,1.75,0.375,0.0625\n3,1.5,0.5,1.25,0.5,0.03125\n"
        );
        assert_eq!(Curve::read(&copy).unwrap().unwrap(), curve);
    }

    #[test]
    fn no_curve_without_held_out_columns_and_errors_name_the_place() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("train_log.csv");
        assert_eq!(Curve::read(&log).unwrap(), None, "a missing file");
        std::fs::write(
            &log,
            "epoch,lr,loss,accuracy,images_per_s,seconds\n1,0.1,2,0.2,1,1\n",
        )
        .unwrap();
        assert_eq!(Curve::read(&log).unwrap(), None, "no eval_every");
        std::fs::write(
            &log,
            "epoch,loss,accuracy,test_nll,test_accuracy,test_ece\n1,2,0.2,x,0.5,0.1\n",
        )
        .unwrap();
        let err = Curve::read(&log).unwrap_err().to_string();
        assert!(
            err.contains("train_log.csv")
                && err.contains("line 2, column `test_nll`")
                && err.contains("`x` is not a number"),
            "{err}"
        );
        std::fs::write(&log, "epoch,loss,test_accuracy\n1,2,0.5\n").unwrap();
        let err = Curve::read(&log).unwrap_err().to_string();
        assert!(
            err.contains("line 1") && err.contains("no `accuracy` column"),
            "{err}"
        );
        std::fs::write(
            &log,
            "epoch,loss,accuracy,test_nll,test_accuracy,test_ece\n1,2,0.2,1\n",
        )
        .unwrap();
        let err = Curve::read(&log).unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("has 4 cells, expected 6"),
            "{err}"
        );
    }
}
