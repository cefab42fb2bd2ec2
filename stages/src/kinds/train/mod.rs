//! The `train` stage: trains a model on a prepared dataset with SGD, by one of the training
//! methods, checkpointing at the end of every epoch (and every `checkpoint_every` steps) so that a
//! killed run resumes where it stopped, with the same result as an uninterrupted one.
//!
//! Outputs: `model.safetensors` (weights and BatchNorm statistics, PyTorch names), `model.json`
//! (architecture, method, seed), `train_log.csv` (one row per epoch) and `class_loss.csv` (mean
//! training loss per class per epoch); with online teachers, `supervision.json`/`.png` (what
//! the first images were taught, `examples`). While training, the stage folder holds
//! `checkpoints/` (see [`engine::checkpoint`]); the runner keeps it across a kill when the
//! fingerprint is unchanged.
//!
//! [`params`] holds the stage's keys, [`trainer`] the set-up and the loop, `state` what a
//! checkpoint keeps, `outputs` what a finished run writes, `examples` the supervision examples,
//! `head` SSKD's first phase (a frozen teacher's head trained in place of a student).

mod examples;
mod head;
mod outputs;
pub mod params;
mod state;
mod trainer;

pub use params::{AugmentName, Params};

use crate::context::Context;
use crate::error::Result;
use crate::science::supervision::SupervisionConfig;
use trainer::Trainer;

/// How far the training whose (partial) folder is `dir` got, by its newest checkpoint (epochs
/// done, the last epoch's loss and accuracy, batches into the next, the time left at the
/// pace of the last epochs), for `pipeline status`; `None` without one.
pub fn progress(p: &Params, dir: &std::path::Path) -> Option<String> {
    state::progress(dir, p.epochs)
}

/// Runs a `train` stage: set up, resume from the newest checkpoint, train the remaining epochs,
/// write the outputs.
pub fn run(ctx: &Context, p: &Params) -> Result<Vec<String>> {
    let mut trainer = Trainer::new(ctx, p)?;
    let (start_epoch, start_batch) = trainer.resume()?;
    for epoch in start_epoch..p.epochs {
        let first = if epoch == start_epoch { start_batch } else { 0 };
        trainer.epoch(epoch, first)?;
    }
    trainer.bar.finish_and_clear();
    trainer.finish()
}

impl Params {
    /// The method and its keys, as the supervision of the student reads them.
    pub fn supervision(&self) -> SupervisionConfig {
        SupervisionConfig {
            method: self.method,
            ls_alpha: self.ls_alpha,
            ls_convention: self.ls_convention,
            kd_lambda: self.kd_lambda,
            kd_tau: self.kd_tau,
            kd_reduction: self.kd_reduction,
            kd_tau_squared: self.kd_tau_squared,
            wsl_alpha: self.wsl_alpha,
            wsl_tau: self.wsl_tau,
            mt_reduction: self.mt_reduction,
            teacher_mc: self.teacher_mc,
            ogr_alpha: self.ogr_alpha,
            crd: crate::science::crd::CrdConfig {
                dim: self.crd_dim,
                negatives: self.crd_negatives,
                temperature: self.crd_temperature,
                momentum: self.crd_momentum,
            },
            crd_beta: self.crd_beta,
            crd_kd_alpha: self.crd_kd_alpha,
            crd_kd_tau: self.crd_kd_tau,
            sskd: crate::science::sskd::SskdConfig {
                ce_weight: self.sskd_ce_weight,
                kd_weight: self.sskd_kd_weight,
                tf_weight: self.sskd_tf_weight,
                ss_weight: self.sskd_ss_weight,
                kd_tau: self.sskd_kd_tau,
                tf_tau: self.sskd_tf_tau,
                ss_tau: self.sskd_ss_tau,
                ratio_tf: self.sskd_ratio_tf,
                ratio_ss: self.sskd_ratio_ss,
            },
            // The Monte-Carlo teacher masks are part of the batch stream's labels.
            seed: self.data_seed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    /// Checkpointed epoch sums must come back bit for bit, or a resumed run logs other losses.
    #[test]
    fn json_floats_round_trip_exactly() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let values: Vec<f64> = (0..20_000)
            .map(|i| rng.random::<f64>() * 10f64.powi(i % 9 - 3))
            .collect();
        let text = serde_json::to_string(&values).unwrap();
        let back: Vec<f64> = serde_json::from_str(&text).unwrap();
        let differ = values
            .iter()
            .zip(&back)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differ, 0);
    }
}
