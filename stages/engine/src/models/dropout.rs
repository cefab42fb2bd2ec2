//! Inverted dropout before the classifier, with masks drawn from an explicit seed, and the
//! [`Mode`] that says how a forward pass treats BatchNorm and dropout.
//!
//! A mask is a function of the seed alone: it is drawn on the CPU from one sequential ChaCha
//! stream (`rng_for(&[seed, stream::DROPOUT])`), element by element in row-major order, then
//! copied to the device. So it depends neither on the thread count nor on the device, and a
//! resumed training that passes the same per-step seed redraws the same masks. Keeping dropout
//! active at inference (Monte-Carlo dropout) is [`Mode::mc`].

use candle_core::{Result, Tensor};
use datasets::rng::{rng_for, stream};
use rand::Rng;

/// How a forward pass runs: which BatchNorm statistics it uses and whether dropout is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// BatchNorm normalises with the batch statistics and updates its running ones (training);
    /// otherwise it uses the running statistics.
    pub train: bool,
    /// `Some(seed)`: dropout is active with masks drawn from `seed`; `None`: dropout is the
    /// identity.
    pub dropout_seed: Option<u64>,
}

impl Mode {
    /// Inference: running statistics, no dropout.
    pub const EVAL: Mode = Mode {
        train: false,
        dropout_seed: None,
    };

    /// Training: batch statistics, dropout masks drawn from `seed` (give each step its own seed,
    /// e.g. `derive_seed(&[run_seed, epoch, batch])`, so that a resumed run redraws them).
    pub fn train(seed: u64) -> Mode {
        Mode {
            train: true,
            dropout_seed: Some(seed),
        }
    }

    /// Monte-Carlo dropout: running statistics, dropout active with masks drawn from `seed`.
    pub fn mc(seed: u64) -> Mode {
        Mode {
            train: false,
            dropout_seed: Some(seed),
        }
    }
}

/// Inverted dropout of rate `p`: kept elements are scaled by 1/(1 − p), so the expected output
/// equals the input and inference needs no rescaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    p: f64,
}

impl Dropout {
    /// Dropout of rate `p`, which must lie in [0, 1).
    pub fn new(p: f64) -> Result<Dropout> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("dropout rate must be in [0, 1), found {p}")
        }
        Ok(Dropout { p })
    }

    /// The rate p.
    pub fn rate(&self) -> f64 {
        self.p
    }

    /// Applies dropout with masks drawn from `seed`, or returns `x` unchanged when `seed` is
    /// `None` or p = 0.
    pub fn forward(&self, x: &Tensor, seed: Option<u64>) -> Result<Tensor> {
        let Some(seed) = seed.filter(|_| self.p > 0.0) else {
            return Ok(x.clone());
        };
        let keep = 1.0 - self.p;
        let scale = (1.0 / keep) as f32;
        let mut rng = rng_for(&[seed, stream::DROPOUT]);
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.random_bool(keep) { scale } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, x.dims(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::testing::random;

    /// Outputs are 0 or x/(1 − p), about a fraction p is dropped, the seed alone fixes the mask
    /// (whatever the thread count), and p = 0 or no seed is the identity.
    #[test]
    fn seeded_inverted_dropout() {
        let x = random(&[64, 32], 0.5..1.5, 3);
        let d = Dropout::new(0.25).unwrap();
        let y = d.forward(&x, Some(7)).unwrap();
        let (xs, ys) = (
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let mut dropped = 0;
        for (a, b) in xs.iter().zip(&ys) {
            if *b == 0.0 {
                dropped += 1;
            } else {
                assert_eq!(*b, a * (1.0 / 0.75f32));
            }
        }
        let frac = dropped as f64 / xs.len() as f64;
        assert!((frac - 0.25).abs() < 0.05, "dropped fraction {frac}");

        let in_pool = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| d.forward(&x, Some(7)).unwrap())
        };
        for other in [in_pool(1), in_pool(2)] {
            assert_eq!(
                other.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                ys,
                "same seed, same mask"
            );
        }
        let z = d.forward(&x, Some(8)).unwrap();
        assert_ne!(z.flatten_all().unwrap().to_vec1::<f32>().unwrap(), ys);

        for same in [
            d.forward(&x, None).unwrap(),
            Dropout::new(0.0).unwrap().forward(&x, Some(7)).unwrap(),
        ] {
            assert_eq!(same.flatten_all().unwrap().to_vec1::<f32>().unwrap(), xs);
        }
        for bad in [1.0, -0.1, f64::NAN] {
            assert!(Dropout::new(bad).is_err(), "rate {bad}");
        }
    }
}
