//! Learning-rate schedules, evaluated per step so that a resumed run continues exactly.

use serde::{Deserialize, Serialize};

/// A learning-rate schedule over epochs (fractional epochs within an epoch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Schedule {
    /// Multiply by `gamma` at each milestone epoch (the paper: 0.05, ×0.1 at 150/180/210).
    MultiStep {
        /// Epochs at which the rate drops.
        milestones: Vec<usize>,
        /// Factor of each drop.
        gamma: f64,
    },
    /// Cosine annealing from the base rate to 0 over the run. (Braced, as `Constant`, so that
    /// serde's `deny_unknown_fields` refuses keys such as `gamma` on it: an internally tagged
    /// unit variant ignores them. Both serialise as `{ type = … }` alone either way.)
    Cosine {},
    /// A constant rate.
    Constant {},
}

/// Learning rate at `epoch` + `frac` (frac in [0, 1)) of `epochs`, with `warmup` epochs of
/// linear warm-up from 0.
pub fn lr_at(
    base: f64,
    schedule: &Schedule,
    epochs: usize,
    warmup: usize,
    epoch: usize,
    frac: f64,
) -> f64 {
    let t = epoch as f64 + frac;
    let lr = match schedule {
        Schedule::MultiStep { milestones, gamma } => {
            base * gamma.powi(milestones.iter().filter(|&&m| epoch >= m).count() as i32)
        }
        Schedule::Cosine {} => {
            base * 0.5 * (1.0 + (std::f64::consts::PI * t / epochs.max(1) as f64).cos())
        }
        Schedule::Constant {} => base,
    };
    if warmup > 0 && t < warmup as f64 {
        lr * t / warmup as f64
    } else {
        lr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multistep_cosine_warmup() {
        let s = Schedule::MultiStep {
            milestones: vec![150, 180, 210],
            gamma: 0.1,
        };
        assert_eq!(lr_at(0.05, &s, 240, 0, 149, 0.9), 0.05);
        assert!((lr_at(0.05, &s, 240, 0, 150, 0.0) - 0.005).abs() < 1e-12);
        assert!((lr_at(0.05, &s, 240, 0, 239, 0.0) - 0.00005).abs() < 1e-12);
        assert!((lr_at(1.0, &Schedule::Cosine {}, 10, 0, 5, 0.0) - 0.5).abs() < 1e-12);
        assert!(lr_at(1.0, &Schedule::Cosine {}, 10, 0, 9, 0.99) < 0.01);
        assert!((lr_at(1.0, &Schedule::Constant {}, 10, 2, 1, 0.0) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn keys_of_another_schedule_are_refused_and_the_form_is_unchanged() {
        let e = serde_json::from_str::<Schedule>(r#"{"type": "cosine", "gamma": 0.1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `gamma`"), "{e}");
        assert!(
            serde_json::from_str::<Schedule>(r#"{"type": "constant", "milestones": []}"#).is_err()
        );
        let cosine: Schedule = serde_json::from_str(r#"{"type": "cosine"}"#).unwrap();
        assert_eq!(cosine, Schedule::Cosine {});
        // What fingerprints hash: the type alone, as when these were unit variants.
        assert_eq!(
            serde_json::to_string(&cosine).unwrap(),
            r#"{"type":"cosine"}"#
        );
        assert_eq!(
            serde_json::to_string(&Schedule::Constant {}).unwrap(),
            r#"{"type":"constant"}"#
        );
    }

    #[test]
    fn the_papers_long_schedule() {
        // 350 epochs, ×0.1 at 150, 200, 250 and 300, written in stages.toml as milestones.
        let s: Schedule = serde_json::from_str(
            r#"{"type": "multi-step", "milestones": [150, 200, 250, 300], "gamma": 0.1}"#,
        )
        .unwrap();
        let at = |e| lr_at(0.05, &s, 350, 0, e, 0.5);
        for (epoch, want) in [
            (0, 0.05),
            (149, 0.05),
            (150, 5e-3),
            (199, 5e-3),
            (200, 5e-4),
            (250, 5e-5),
            (300, 5e-6),
            (349, 5e-6),
        ] {
            assert!(
                (at(epoch) - want).abs() < 1e-15,
                "epoch {epoch}: {}",
                at(epoch)
            );
        }
    }
}
