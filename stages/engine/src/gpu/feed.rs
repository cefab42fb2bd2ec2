//! Host-to-device copies of batches through pinned (page-locked) host buffers.
//!
//! A copy from pageable memory may make the driver wait for the stream before staging it, which
//! would drain the GPU's queue at every batch; from pinned memory the copy is queued like a
//! kernel and the host goes on. A ring of buffers lets the loader's next batch be written while
//! earlier copies are still in flight: a buffer is reused only after the copy that last read it
//! has finished (each buffer carries a CUDA event), by when a ring of three is long idle.

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PinnedHostSlice, ValidAsZeroBits};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Result, Shape, Storage, Tensor};

/// Buffers in the ring.
const RING: usize = 3;

/// A ring of pinned buffers of `T` for one device.
pub struct PinnedRing<T> {
    buffers: Vec<PinnedHostSlice<T>>,
    next: usize,
}

impl<T> Default for PinnedRing<T> {
    fn default() -> Self {
        PinnedRing {
            buffers: Vec::new(),
            next: 0,
        }
    }
}

impl<T: DeviceRepr + ValidAsZeroBits + CudaDType + Copy> PinnedRing<T> {
    /// Copies `data` to a new tensor of `shape` on `dev`, asynchronously.
    pub fn upload(&mut self, data: &[T], shape: Shape, dev: &CudaDevice) -> Result<Tensor> {
        if shape.elem_count() != data.len() {
            candle_core::bail!("upload: {} values for shape {shape:?}", data.len())
        }
        let stream = dev.cuda_stream();
        let slot = self.next % RING;
        self.next = self.next.wrapping_add(1);
        if self.buffers.len() <= slot || self.buffers[slot].len() != data.len() {
            // SAFETY: written in full below before any copy reads it. Write-combined memory:
            // the host only writes it (sequentially), the device only reads it.
            let b = unsafe { stream.context().alloc_pinned::<T>(data.len().max(1)) }
                .map_err(candle_core::Error::wrap)?;
            if self.buffers.len() <= slot {
                self.buffers.push(b);
            } else {
                self.buffers[slot] = b;
            }
        }
        let buf = &mut self.buffers[slot];
        // Waits for the copy that last read this buffer (RING batches ago).
        buf.as_mut_slice().map_err(candle_core::Error::wrap)?[..data.len()].copy_from_slice(data);
        // SAFETY: the copy below writes every element.
        let mut dst = unsafe { dev.alloc::<T>(data.len().max(1))? };
        stream
            .memcpy_htod(&*buf, &mut dst)
            .map_err(candle_core::Error::wrap)?;
        Ok(Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(dst, dev.clone())),
            shape,
            BackpropOp::none(),
            false,
        ))
    }
}
