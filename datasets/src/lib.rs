//! Datasets for the LDL pipeline: the built-in synthetic dataset, the packed memory-mapped image
//! store that the `prepare` stage writes, on-the-fly augmentation and the multithreaded batch
//! loader that feeds training.
//!
//! This crate knows nothing about models or training: it turns images on disk into deterministic
//! streams of normalised `f32` NCHW batches.

pub mod atomic;
pub mod augment;
pub mod cifar;
pub mod error;
pub mod loader;
pub mod packed;
pub mod rng;
pub mod synthetic;

pub use error::{DatasetError, Result};
pub use loader::{Batch, Loader, LoaderConfig};
pub use packed::{PackedStore, PackedWriter, StoreInfo};
