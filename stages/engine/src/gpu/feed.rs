//! Host-to-device copies of batches through pinned (page-locked) host buffers.
//!
//! A copy from pageable memory may make the driver wait for the stream before staging it, which
//! would drain the GPU's queue at every batch; from pinned memory the copy is queued like a
//! kernel and the host goes on. A ring of buffers lets the loader's next batch be written while
//! earlier copies are still in flight: a buffer is rewritten (or freed) only after the copy that
//! last read it has finished, by when a ring of three is long idle. Each slot records its own CUDA
//! event after its copy: the event inside cudarc's `PinnedHostSlice` is recorded only when cudarc
//! manages several streams, which candle's device never does, so waiting on it returns at once.

use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Result, Shape, Storage, Tensor};

/// Buffers in the ring.
const RING: usize = 3;

/// A ring of pinned buffers of `T` for one device, each with the event recorded after the copy
/// that last read it.
pub struct PinnedRing<T> {
    buffers: Vec<(PinnedHostSlice<T>, CudaEvent)>,
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
        let wrap = candle_core::Error::wrap;
        let stream = dev.cuda_stream();
        let slot = self.next % RING;
        self.next = self.next.wrapping_add(1);
        // Waits for the copy that last read this slot's buffer (RING batches ago), before the
        // buffer is rewritten or freed.
        if let Some((_, copied)) = self.buffers.get(slot) {
            copied.synchronize().map_err(wrap)?;
        }
        // Grown, never shrunk: a partial last batch reuses the slot (reallocating pinned memory
        // can synchronise the device).
        let n = data.len();
        if self
            .buffers
            .get(slot)
            .is_none_or(|(b, _)| b.len() < n.max(1))
        {
            // SAFETY: the first `n` values are written below before any copy reads them.
            // Write-combined memory: the host only writes it (sequentially), the device only
            // reads it.
            let b = unsafe { stream.context().alloc_pinned::<T>(n.max(1)) }.map_err(wrap)?;
            let copied = stream.context().new_event(None).map_err(wrap)?;
            if self.buffers.len() <= slot {
                self.buffers.push((b, copied));
            } else {
                self.buffers[slot] = (b, copied);
            }
        }
        let (buf, copied) = &mut self.buffers[slot];
        buf.as_mut_slice().map_err(wrap)?[..n].copy_from_slice(data);
        // SAFETY: the copy below writes every element (an empty batch has none to write).
        let mut dst = unsafe { dev.alloc::<T>(n.max(1))? };
        if n > 0 {
            // A prefix of pinned memory is pinned memory: the copy stays asynchronous.
            stream
                .memcpy_htod(&buf.as_slice().map_err(wrap)?[..n], &mut dst)
                .map_err(wrap)?;
        }
        copied.record(&stream).map_err(wrap)?;
        Ok(Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(dst, dev.clone())),
            shape,
            BackpropOp::none(),
            false,
        ))
    }
}
