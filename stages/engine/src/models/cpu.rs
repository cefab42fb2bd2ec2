//! What the CPU kernels (convolution, BatchNorm, add + ReLU, the SGD update) share: borrowing a
//! candle tensor's `f32` values in place, allocating output buffers without zeroing them, and
//! the ReLU's gradient mask.

use candle_core::{CpuStorage, Layout, Result, Tensor};

/// The values of a contiguous `f32` CPU storage; `op` names the kernel in the error.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(d), Some((a, b))) => Ok(&d[a..b]),
        _ => candle_core::bail!("{op}: expected contiguous f32 values on the CPU"),
    }
}

/// [`f32_slice`], writable (for in-place ops).
pub(crate) fn f32_slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    op: &str,
) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(d), Some((a, b))) => Ok(&mut d[a..b]),
        _ => candle_core::bail!("{op}: expected contiguous f32 values on the CPU"),
    }
}

/// Runs `f` over a CPU `f32` tensor's values (made contiguous first).
pub(crate) fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{op}: expected a CPU tensor")
    };
    Ok(f(f32_slice(cpu, layout, op)?))
}

/// An f32 vector of `len` values that `fill` writes completely, without zeroing it first: CPU
/// kernels hand candle fresh output buffers every call, and zeroing them would be one more pass
/// over memory.
pub(crate) fn written_vec(len: usize, fill: impl FnOnce(&mut [f32])) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    let spare: &mut [std::mem::MaybeUninit<f32>] = &mut v.spare_capacity_mut()[..len];
    // SAFETY: f32 has no invalid bit patterns and `fill` only writes through the slice before
    // anything reads it (every caller writes each element: GEMMs that do not accumulate, the
    // unfolding, elementwise kernels, or an explicit zeroing); `set_len` follows once all of it
    // is written. candle's CPU backend allocates its own outputs the same way (`alloc_uninit`).
    let slice = unsafe { &mut *(spare as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
    fill(slice);
    // SAFETY: capacity is at least `len`, and every element was written by `fill`.
    unsafe { v.set_len(len) };
    v
}

#[cfg(test)]
thread_local! {
    /// Set by whole-model tests: this thread's layers run candle's own ops instead of ours.
    pub(crate) static REFERENCE_OPS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the layers run candle's reference ops instead of the kernels here: only in tests
/// that compare whole models against them ([`REFERENCE_OPS`]).
#[inline(always)]
pub(crate) fn reference_ops() -> bool {
    #[cfg(test)]
    return REFERENCE_OPS.with(|r| r.get());
    #[cfg(not(test))]
    false
}

/// `max(t, 0)` as candle ops, for the paths without kernels of ours. candle's own ReLU passes
/// the gradient where its input is exactly 0; on the reference path of whole-model tests the
/// ReLU is written as `t · [t > 0]` instead, PyTorch's convention and our kernels' (a BatchNorm
/// channel that is constant over the batch normalises to exactly β, 0 at initialisation).
pub(crate) fn relu(t: &Tensor) -> Result<Tensor> {
    if reference_ops() {
        return t * t.gt(0f32)?.to_dtype(t.dtype())?;
    }
    t.relu()
}

/// `d` where `y > 0`, else `+0.0`: the gradient through a ReLU whose output is `y` (PyTorch's
/// convention at exactly 0), bitwise the same as `if y > 0.0 { d } else { 0.0 }`. Written as a
/// bit mask because the sign of an activation is unpredictable: as a branch, the compiler kept
/// it one in the BatchNorm backward's reduction, whose mispredictions cost more than the pass.
#[inline(always)]
pub(crate) fn relu_grad(d: f32, y: f32) -> f32 {
    f32::from_bits(d.to_bits() & (-((y > 0.0) as i32)) as u32)
}

#[cfg(test)]
mod tests {
    use super::relu_grad;

    /// The mask gives bitwise what the branch gives, signed zeros, infinities and NaNs included.
    #[test]
    fn relu_grad_is_the_branch() {
        let special = [
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            f32::MIN_POSITIVE / 2.0,
            -f32::MIN_POSITIVE / 2.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            3.5e-20,
            -7.25e12,
        ];
        for &d in &special {
            for &y in &special {
                let branch = if y > 0.0 { d } else { 0.0 };
                assert_eq!(relu_grad(d, y).to_bits(), branch.to_bits(), "d {d}, y {y}");
            }
        }
    }
}
