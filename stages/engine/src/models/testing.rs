//! Helpers for tests of layers and of what is built on them (here and in the stages crate):
//! seeded random tensors and a relative-error measure.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

/// A tensor of `shape` with values uniform in `range`, drawn from `seed`.
pub fn random(shape: &[usize], range: std::ops::Range<f32>, seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(range.clone())).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("shape matches")
}

/// max |a − b| / max |b|.
pub fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let scalar = |t: Tensor| t.to_scalar::<f32>().expect("scalar");
    let diff = scalar((a - b).unwrap().abs().unwrap().max_all().unwrap());
    diff / scalar(b.abs().unwrap().max_all().unwrap()).max(1e-6)
}
