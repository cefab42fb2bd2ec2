//! The training engine: everything that trains and runs a model, and nothing that knows about
//! stages, stages.toml or the paper's methods.
//!
//! - [`models`]: the ResNets and their layers, with hand-written CPU kernels;
//! - `gpu` (feature `cuda`): cuDNN convolutions, fused BatchNorm and the other CUDA kernels;
//! - [`optim`] and [`schedule`]: SGD and learning-rate schedules;
//! - [`losses`]: the loss functions the methods combine, and [`const_matmul`]: products with a
//!   constant factor, differentiated for the other alone;
//! - [`checkpoint`]: resumable training state on disk; [`import`]: models saved by PyTorch or
//!   as safetensors;
//! - [`feed`]: batches onto the device; [`inference`]: a model over a whole packed split;
//! - [`device`]: device and arithmetic selection; [`profile`]: per-kernel timers.
//!
//! It sits between the `datasets` crate (packed stores, the loader) below and the `stages`
//! crate above, which Cargo keeps from being imported here.

pub mod checkpoint;
pub mod const_matmul;
pub mod device;
pub mod error;
pub mod export;
pub mod feed;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod import;
pub mod inference;
pub mod json;
pub mod losses;
pub mod models;
pub mod optim;
pub mod profile;
pub mod schedule;

pub use error::{EngineError, Result};
