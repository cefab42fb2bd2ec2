//! What a finished training writes: the model and its description, the per-epoch logs, the
//! OGR measurements, and the fitted temperature when asked for.

use super::trainer::Trainer;
use crate::artifacts::TrainedModel;
use crate::error::{Result, StageError};
use crate::science::calibration;
use crate::science::ogr::{ogr, ogr_weights};
use crate::science::sskd;
use engine::json;

impl Trainer<'_> {
    /// Writes the outputs, removes the checkpoints, and returns the files written.
    pub(super) fn finish(self) -> Result<Vec<String>> {
        let dir = &self.ctx.dir;
        datasets::atomic::write_bytes(
            &dir.join("model.safetensors"),
            &self.model.to_safetensors()?,
        )?;
        // An `sskd-head` stage's model is its teacher, which keeps its own normalisation and
        // origin; its head lies beside it.
        let teacher = self.head.as_ref().map(|h| &h.teacher);
        json::write(
            &dir.join("model.json"),
            &TrainedModel {
                spec: self.spec.clone(),
                method: Some(self.p.method),
                seed: self.seed,
                epochs: self.p.epochs,
                variant: self.p.variant(),
                imported: teacher.and_then(|t| t.imported.clone()),
                normalize: teacher.and_then(|t| t.normalize.clone()),
                crop_size: self.p.crop_size.or(teacher.and_then(|t| t.crop_size)),
            },
        )?;
        self.write_logs()?;
        let mut outputs = vec![
            "model.safetensors".to_string(),
            "model.json".into(),
            "train_log.csv".into(),
            "class_loss.csv".into(),
        ];
        outputs.extend(self.write_supervision_examples()?);
        if let Some(h) = &self.head {
            engine::checkpoint::write_tensors(&dir.join(sskd::HEAD_FILE), &h.head.state())?;
            outputs.push(sskd::HEAD_FILE.into());
        }
        if !self.ogr_points.is_empty() {
            self.write_ogr()?;
            outputs.push("ogr.csv".into());
        }
        if self.p.temperature_scaling {
            self.fit_temperature()?;
            outputs.push("temperature.json".into());
        }
        // The checkpoints stay until the runner has recorded these outputs: a kill before that
        // resumes from them instead of training again.
        Ok(outputs)
    }

    /// `train_log.csv` (one row per epoch) and `class_loss.csv` (per class per epoch).
    /// With `eval_every`, three more columns named for the held-out split (`val_nll,
    /// val_accuracy, val_ece` or `test_…`), empty in the epochs not evaluated.
    fn write_logs(&self) -> Result<()> {
        let mut csv = String::from("epoch,lr,loss,accuracy,images_per_s,seconds");
        let split = (self.p.eval_every > 0).then(|| self.eval_split().0);
        if let Some(s) = split {
            csv.push_str(&format!(",{s}_nll,{s}_accuracy,{s}_ece"));
        }
        csv.push('\n');
        let mut class_csv = String::from("epoch,class,loss\n");
        for r in &self.log {
            csv.push_str(&format!(
                "{},{},{},{},{:.1},{:.3}",
                r.epoch, r.lr, r.loss, r.accuracy, r.images_per_s, r.seconds
            ));
            match (&r.eval, split) {
                (Some(e), Some(_)) => csv.push_str(&format!(",{},{},{}", e.nll, e.accuracy, e.ece)),
                (None, Some(_)) => csv.push_str(",,,"),
                _ => {}
            }
            csv.push('\n');
            for (class, l) in r.class_loss.iter().enumerate() {
                // `NaN` for a class not seen in the epoch, as pandas and polars read it.
                let l = l.unwrap_or(f64::NAN);
                class_csv.push_str(&format!("{},{class},{l}\n", r.epoch));
            }
        }
        let dir = &self.ctx.dir;
        datasets::atomic::write_bytes(&dir.join("train_log.csv"), csv.as_bytes())?;
        datasets::atomic::write_bytes(&dir.join("class_loss.csv"), class_csv.as_bytes())?;
        Ok(())
    }

    /// `ogr.csv`: every measurement's per-class losses, OGR and weights.
    fn write_ogr(&self) -> Result<()> {
        let (k, points) = (self.k, &self.ogr_points);
        let mut csv = String::from("epoch,class,train_loss,val_loss,ogr,weight\n");
        for (i, b) in points.iter().enumerate() {
            let (o, w) = match i.checked_sub(1).map(|j| &points[j]) {
                Some(a) => {
                    let o = ogr(a, b);
                    let w = ogr_weights(&o);
                    (o, w.iter().map(|&v| v as f64).collect())
                }
                None => (vec![f64::NAN; k], vec![1.0; k]),
            };
            for c in 0..k {
                csv.push_str(&format!(
                    "{},{c},{},{},{},{}\n",
                    b.epoch, b.train[c], b.val[c], o[c], w[c]
                ));
            }
        }
        datasets::atomic::write_bytes(&self.ctx.dir.join("ogr.csv"), csv.as_bytes())?;
        Ok(())
    }

    /// Fits the temperature T on the validation split and writes `temperature.json`.
    fn fit_temperature(&self) -> Result<()> {
        let Some(val) = &self.data.val else {
            return Err(StageError::config(format!(
                "{}: temperature_scaling fits T on the validation split: the prepare stage must \
                 hold out one (`val = N`)",
                self.ctx.name
            )));
        };
        let logits = self.inference().logits(val, "temperature scaling")?;
        let fitted = calibration::fit(&logits, &val.labels(), self.k);
        tracing::info!(
            "{}: temperature T = {:.4} (validation NLL {:.4} → {:.4})",
            self.ctx.name,
            fitted.temperature,
            fitted.val_nll_before,
            fitted.val_nll_after
        );
        json::write(&self.ctx.dir.join("temperature.json"), &fitted)?;
        Ok(())
    }
}
