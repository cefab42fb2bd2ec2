//! Max-pooling with padding that never wins, for the ImageNet ResNet stem (3×3, stride 2,
//! padding 1), as PyTorch's `max_pool2d`: each output is the first maximum of its window in
//! window order (a NaN wins), and the backward gives each output's gradient to that one input.
//!
//! On the CPU in f32 and on CUDA in f32 and bf16 (with `LDL_GPU_PLAN=1` until a GPU has run its
//! tests) it is one op of ours: a pass over the windows forward,
//! and backward the gradient added at each window's maximum, found again (the CPU scatters
//! output by output in each plane; the CUDA kernel gathers, each input summing over the few
//! windows that hold it in the same order, so both add in the same order). Elsewhere, and as
//! the reference of tests, it is separable candle ops: a 1-D max over rows, then over columns,
//! each the elementwise maximum of `kernel` strided `index_select`s of the input padded with
//! −∞ — a dozen passes over the activation and their autograd, and where a window holds equal
//! maxima candle's `maximum` shares the gradient between them.

use super::cpu::{f32_slice, with_f32, written_vec};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A square pooling window: its size, stride and padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolGeometry {
    /// Window size.
    pub kernel: usize,
    /// Step between windows.
    pub stride: usize,
    /// Padding on each side.
    pub pad: usize,
}

impl PoolGeometry {
    /// The ImageNet ResNet stem's pooling: 3×3, stride 2, padding 1.
    pub const STEM: PoolGeometry = PoolGeometry {
        kernel: 3,
        stride: 2,
        pad: 1,
    };

    /// Fails unless the window makes sense: as in PyTorch, a padding over half the window would
    /// make windows that hold padding only.
    fn check(&self) -> Result<()> {
        let PoolGeometry {
            kernel,
            stride,
            pad,
        } = *self;
        if kernel == 0 || stride == 0 || 2 * pad > kernel {
            candle_core::bail!(
                "max-pool: kernel {kernel}, stride {stride}, padding {pad}: need kernel, stride ≥ 1 and padding ≤ kernel / 2"
            )
        }
        Ok(())
    }

    /// Outputs along a side of `len` inputs.
    fn out_len(&self, len: usize) -> Result<usize> {
        if len == 0 {
            candle_core::bail!("max-pool: an empty image")
        }
        if len + 2 * self.pad < self.kernel {
            candle_core::bail!(
                "max-pool: size {len} with padding {} is smaller than the kernel {}",
                self.pad,
                self.kernel
            )
        }
        Ok(self.side(len))
    }

    /// Outputs along a side of `len` inputs, for a side [`PoolGeometry::out_len`] accepts.
    fn side(&self, len: usize) -> usize {
        (len + 2 * self.pad - self.kernel) / self.stride + 1
    }

    /// The output shape over an input of shape `dims` (N × C × H × W).
    pub fn out_dims(&self, dims: [usize; 4]) -> Result<[usize; 4]> {
        self.check()?;
        Ok([
            dims[0],
            dims[1],
            self.out_len(dims[2])?,
            self.out_len(dims[3])?,
        ])
    }

    /// Size, stride and padding, as the CUDA kernels take them.
    pub fn window(&self) -> [usize; 3] {
        [self.kernel, self.stride, self.pad]
    }

    /// The rows (or columns) of window `o` that fall inside a side of `len`.
    #[inline]
    fn span(&self, o: usize, len: usize) -> std::ops::Range<usize> {
        let start = (o * self.stride) as isize - self.pad as isize;
        let end = (start + self.kernel as isize).min(len as isize);
        start.max(0) as usize..end.max(0) as usize
    }
}

/// Max-pooling of an `N × C × H × W` tensor with a square `kernel`, `stride` and `pad`, padding
/// with −∞ as PyTorch does; the output is `N × C × H' × W'` with
/// `H' = (H + 2·pad − kernel) / stride + 1`. On CUDA our kernel runs only when `cuda_kernel`:
/// the caller's opt-in to CUDA kernels no GPU has run yet (the planned step's `LDL_GPU_PLAN=1`).
pub fn max_pool2d(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    pad: usize,
    cuda_kernel: bool,
) -> Result<Tensor> {
    let g = PoolGeometry {
        kernel,
        stride,
        pad,
    };
    g.check()?;
    let fused = match x.device() {
        candle_core::Device::Cpu => x.dtype() == candle_core::DType::F32,
        candle_core::Device::Cuda(_) => {
            cfg!(feature = "cuda")
                && cuda_kernel
                && matches!(
                    x.dtype(),
                    candle_core::DType::F32 | candle_core::DType::BF16
                )
        }
        _ => false,
    };
    if !fused || super::cpu::reference_ops() || x.rank() != 4 {
        return max_pool2d_separable(x, g);
    }
    fused_max_pool2d(x, g)
}

/// [`max_pool2d`] as our op on any device it has (the CPU in f32, CUDA in f32 and bf16), whatever
/// the environment asks: for tests that check the CUDA kernels.
pub fn fused_max_pool2d(x: &Tensor, g: PoolGeometry) -> Result<Tensor> {
    g.check()?;
    x.contiguous()?.apply_op1(MaxPool(g))
}

/// The index in a plane of `h × w` values of the first maximum of window (`oy`, `ox`), in
/// window order, as PyTorch picks it: a value wins when greater than the maximum so far, or NaN;
/// a window of −∞ only gives its first position.
#[inline]
fn window_argmax(
    plane: &[f32],
    w: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) -> usize {
    let mut best = rows.start * w + cols.start;
    let mut max = f32::NEG_INFINITY;
    for iy in rows {
        for ix in cols.clone() {
            let v = plane[iy * w + ix];
            if v > max || v.is_nan() {
                max = v;
                best = iy * w + ix;
            }
        }
    }
    best
}

/// Planes per parallel task: about 32k values of input, so that a CIFAR-sized activation still
/// splits across cores.
fn planes_per_task(plane: usize) -> usize {
    ((1 << 15) / plane.max(1)).max(1)
}

/// `y` = the max-pooling of `x` (shape `dims`, NCHW) with window `g` (every value of `y`).
pub(crate) fn max_pool_into(x: &[f32], dims: [usize; 4], g: PoolGeometry, y: &mut [f32]) {
    let [_, _, h, w] = dims;
    let (ho, wo) = (g.side(h), g.side(w));
    y.par_chunks_mut(ho * wo)
        .zip(x.par_chunks(h * w))
        .with_min_len(planes_per_task(h * w))
        .for_each(|(y, plane)| {
            for oy in 0..ho {
                let rows = g.span(oy, h);
                for ox in 0..wo {
                    y[oy * wo + ox] = plane[window_argmax(plane, w, rows.clone(), g.span(ox, w))];
                }
            }
        });
}

/// `dx` = the input gradient of the max-pooling of `x` (shape `dims`, NCHW) with window `g`,
/// from the output gradient `dy`: each output's gradient added at its window's maximum, output
/// by output (every value of `dx`).
pub(crate) fn max_pool_backward_into(
    x: &[f32],
    dims: [usize; 4],
    g: PoolGeometry,
    dy: &[f32],
    dx: &mut [f32],
) {
    let [_, _, h, w] = dims;
    let (ho, wo) = (g.side(h), g.side(w));
    dx.par_chunks_mut(h * w)
        .zip(x.par_chunks(h * w).zip(dy.par_chunks(ho * wo)))
        .with_min_len(planes_per_task(h * w))
        .for_each(|(dx, (plane, dy))| {
            dx.fill(0.0);
            for oy in 0..ho {
                let rows = g.span(oy, h);
                for ox in 0..wo {
                    dx[window_argmax(plane, w, rows.clone(), g.span(ox, w))] += dy[oy * wo + ox];
                }
            }
        });
}

/// The fused max-pooling op (see the module's documentation).
struct MaxPool(PoolGeometry);

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "max-pool")?;
        let dims: [usize; 4] = l.shape().dims4()?.into();
        let out = self.0.out_dims(dims)?;
        let y = written_vec(out.iter().product(), |y| max_pool_into(x, dims, self.0, y));
        Ok((CpuStorage::F32(y), Shape::from(out.to_vec())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims: [usize; 4] = l.shape().dims4()?.into();
        let out = self.0.out_dims(dims)?;
        Ok((
            crate::gpu::max_pool_forward(s, l, dims, out, self.0.window())?,
            Shape::from(out.to_vec()),
        ))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dims: [usize; 4] = x.dims4()?.into();
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let out = self.0.out_dims(dims)?;
            let dx = crate::gpu::max_pool_backward(x, dy, dims, out, self.0.window())?;
            return Ok(Some(dx));
        }
        let dx = with_f32(x, "max-pool", |x| {
            with_f32(dy, "max-pool", |dy| {
                written_vec(x.len(), |dx| {
                    max_pool_backward_into(x, dims, self.0, dy, dx)
                })
            })
        })??;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// [`max_pool2d`] as separable candle ops (see the module's documentation).
fn max_pool2d_separable(x: &Tensor, g: PoolGeometry) -> Result<Tensor> {
    let y = max_pool1d(x, 2, g)?;
    max_pool1d(&y, 3, g)
}

/// Max-pooling along one dimension.
fn max_pool1d(x: &Tensor, dim: usize, g: PoolGeometry) -> Result<Tensor> {
    let PoolGeometry {
        kernel,
        stride,
        pad,
    } = g;
    let len = x.dim(dim)?;
    let out = g.out_len(len)?;
    let padded = if pad == 0 {
        x.clone()
    } else {
        let mut shape = x.dims().to_vec();
        shape[dim] = pad;
        let fill = Tensor::full(f32::NEG_INFINITY, shape, x.device())?.to_dtype(x.dtype())?;
        Tensor::cat(&[&fill, x, &fill], dim)?
    };
    let mut y: Option<Tensor> = None;
    for offset in 0..kernel {
        // Positions offset, offset + stride, ... of the padded input: the offset-th element of
        // every window.
        let idx = Tensor::arange_step(
            offset as u32,
            (offset + stride * out) as u32,
            stride as u32,
            x.device(),
        )?;
        let taken = padded.index_select(&idx, dim)?;
        y = Some(match y {
            None => taken,
            Some(m) => m.maximum(&taken)?,
        });
    }
    Ok(y.expect("kernel ≥ 1"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::testing::{max_rel, random};
    use candle_core::{Device, Var};

    /// A direct loop: output values and, for a loss Σ y·m, the gradient (m added at each
    /// window's argmax).
    fn reference(
        x: &[f32],
        (n, c, h, w): (usize, usize, usize, usize),
        m: &[f32],
        (k, s, p): (usize, usize, usize),
    ) -> (Vec<f32>, Vec<f32>) {
        let ho = (h + 2 * p - k) / s + 1;
        let wo = (w + 2 * p - k) / s + 1;
        let mut y = vec![0f32; n * c * ho * wo];
        let mut g = vec![0f32; x.len()];
        for plane in 0..n * c {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut best = (f32::NEG_INFINITY, usize::MAX);
                    for ky in 0..k {
                        for kx in 0..k {
                            let (iy, ix) = (
                                (oy * s + ky) as isize - p as isize,
                                (ox * s + kx) as isize - p as isize,
                            );
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            let at = plane * h * w + iy as usize * w + ix as usize;
                            if x[at] > best.0 {
                                best = (x[at], at);
                            }
                        }
                    }
                    let o = plane * ho * wo + oy * wo + ox;
                    y[o] = best.0;
                    g[best.1] += m[o];
                }
            }
        }
        (y, g)
    }

    /// The fused op's values and input gradient (a loss Σ y·m), as vectors.
    fn fused(x: &Tensor, ksp: (usize, usize, usize), m_seed: u64) -> (Vec<f32>, Vec<f32>, Tensor) {
        let v = Var::from_tensor(x).unwrap();
        let y = max_pool2d(v.as_tensor(), ksp.0, ksp.1, ksp.2, false).unwrap();
        let m = random(y.dims(), -1.0..1.0, m_seed);
        let grads = (&y * &m).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(v.as_tensor()).unwrap();
        (
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            m,
        )
    }

    /// An input shape (N, C, H, W) and a window (kernel, stride, padding).
    type Case = ((usize, usize, usize, usize), (usize, usize, usize));

    const CASES: [Case; 5] = [
        ((2, 3, 8, 8), (3, 2, 1)),
        ((1, 2, 7, 9), (3, 2, 1)),
        ((2, 1, 6, 5), (2, 2, 0)),
        ((1, 2, 5, 5), (3, 1, 1)),
        ((1, 1, 1, 1), (3, 2, 1)),
    ];

    /// Values and input gradient of the fused op equal the direct loop bitwise (both add an
    /// input's gradients output by output), for even and odd sizes, the padded-overlapping and
    /// plain cases and a 1×1 image; random inputs have no ties, so the argmax is unique.
    #[test]
    fn matches_a_direct_loop_forward_and_backward() {
        for (i, &(dims, ksp)) in CASES.iter().enumerate() {
            let (n, c, h, w) = dims;
            let x = random(&[n, c, h, w], -1.0..1.0, i as u64);
            let (y, g, m) = fused(&x, ksp, 50 + i as u64);
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let ms = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (y_ref, g_ref) = reference(&xs, dims, &ms, ksp);
            assert_eq!(y, y_ref, "values, case {i}");
            assert_eq!(g, g_ref, "gradient, case {i}");
        }
    }

    /// The separable candle ops (the path of other devices and types, and of whole-model
    /// reference tests) give the same values and, up to summation order, gradients.
    #[test]
    fn the_separable_ops_match_the_direct_loop() {
        for (i, &(dims, ksp)) in CASES.iter().enumerate() {
            let (n, c, h, w) = dims;
            let x = Var::from_tensor(&random(&[n, c, h, w], -1.0..1.0, i as u64)).unwrap();
            let g = PoolGeometry {
                kernel: ksp.0,
                stride: ksp.1,
                pad: ksp.2,
            };
            let y = max_pool2d_separable(x.as_tensor(), g).unwrap();
            let m = random(y.dims(), -1.0..1.0, 50 + i as u64);
            let grads = (&y * &m).unwrap().sum_all().unwrap().backward().unwrap();
            let xs = x
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let ms = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (y_ref, g_ref) = reference(&xs, dims, &ms, ksp);
            assert_eq!(
                y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                y_ref,
                "values, case {i}"
            );
            let g = grads.get(x.as_tensor()).unwrap();
            let g_ref = Tensor::from_vec(g_ref, g.dims(), g.device()).unwrap();
            assert!(max_rel(g, &g_ref) < 1e-6, "gradient, case {i}");
        }
    }

    /// PyTorch's choice where a window's maximum is not unique: all of an output's gradient
    /// goes to the first maximum in window order (worked by hand on a 1 × 1 × 3 × 4 image), and
    /// a NaN in a window is its maximum.
    #[test]
    fn ties_go_to_the_first_maximum_and_nan_wins() {
        // 3 × 4 plane, 2 × 2 windows, stride 2, no padding: windows {0,1,4,5} and {2,3,6,7}
        // (the last row is left over).
        let x = Tensor::from_vec(
            vec![
                1.0f32, 5.0, 7.0, 7.0, //
                5.0, 2.0, 7.0, 0.0, //
                9.0, 9.0, 9.0, 9.0,
            ],
            (1, 1, 3, 4),
            &Device::Cpu,
        )
        .unwrap();
        let v = Var::from_tensor(&x).unwrap();
        let y = max_pool2d(v.as_tensor(), 2, 2, 0, false).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [5.0, 7.0]
        );
        let m = Tensor::from_vec(vec![10.0f32, 20.0], (1, 1, 1, 2), &Device::Cpu).unwrap();
        let grads = (&y * &m).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(v.as_tensor()).unwrap();
        // Window 1's maximum 5 is at 1 (before 4), window 2's 7 at 2 (before 3 and 6).
        assert_eq!(
            g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0.0, 10.0, 20.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        );
        let x =
            Tensor::from_vec(vec![1.0f32, f32::NAN, 3.0, 2.0], (1, 1, 2, 2), &Device::Cpu).unwrap();
        let y = max_pool2d(&x, 2, 2, 0, false).unwrap();
        assert!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0].is_nan());
        // An empty image has no window, even where padding alone would make one.
        let empty = Tensor::zeros((1, 1, 0, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(max_pool2d(&empty, 2, 2, 1, false).is_err());
    }

    /// Without padding and with kernel = stride, candle's own pooling gives the same values.
    #[test]
    fn equals_candle_without_padding() {
        let x = random(&[2, 3, 8, 6], -1.0..1.0, 9);
        let ours = max_pool2d(&x, 2, 2, 0, false).unwrap();
        let theirs = x.max_pool2d(2).unwrap();
        assert_eq!(
            ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert!(max_pool2d(&x, 3, 2, 2, false).is_err());
    }
}
