//! Datasets for the LDL pipeline: the built-in synthetic dataset, readers of the official CIFAR-10,
//! CIFAR-100 and STL-10 binaries, the packed memory-mapped image
//! store that the `prepare` stage writes, on-the-fly augmentation and the multithreaded batch
//! loader that feeds training.
//!
//! This crate knows nothing about models or training: it turns images on disk into deterministic
//! streams of normalised `f32` NCHW batches.

pub mod atomic;
pub mod augment;
pub mod cifar;
pub mod digest;
pub mod error;
pub mod fetch;
pub mod holdout;
pub mod imagefolder;
pub mod loader;
pub mod mix;
pub mod packed;
pub mod rng;
pub mod stl10;
pub mod synthetic;
pub mod view;

pub use error::{DatasetError, Result};
pub use loader::{Batch, Loader, LoaderConfig};
pub use packed::{PackedStore, PackedWriter, StoreInfo};
