//! Moving the loader's batches onto the training device.
//!
//! On the CPU a batch becomes a tensor by one copy. On a CUDA device it goes through a ring of
//! pinned host buffers and an asynchronous copy on the compute stream, so that the host never
//! waits for the GPU to drain its queue before handing over the next batch (see `gpu::feed`).

use candle_core::{Device, Result, Shape, Tensor};

/// Uploads batches to one device; keeps its pinned buffers between batches. Use one feeder per
/// stream of same-sized uploads (images, targets, labels): a buffer is remade when the size
/// changes.
#[derive(Default)]
pub struct Feeder {
    #[cfg(feature = "cuda")]
    ring: crate::gpu::feed::PinnedRing<f32>,
    #[cfg(feature = "cuda")]
    ring_u32: crate::gpu::feed::PinnedRing<u32>,
}

impl Feeder {
    /// A feeder with no buffers yet (they are made on the first batch).
    pub fn new() -> Feeder {
        Feeder::default()
    }

    /// `data` as a tensor of `shape` on `device`.
    pub fn upload(
        &mut self,
        data: &[f32],
        shape: impl Into<Shape>,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => self.ring.upload(data, shape, dev),
            _ => Tensor::from_slice(data, shape, device),
        }
    }

    /// `data` (labels, indices) as a tensor of `shape` on `device`.
    pub fn upload_u32(
        &mut self,
        data: &[u32],
        shape: impl Into<Shape>,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => self.ring_u32.upload(data, shape, dev),
            _ => Tensor::from_slice(data, shape, device),
        }
    }
}
