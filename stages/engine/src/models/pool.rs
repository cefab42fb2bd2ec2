//! Max-pooling with zero-free padding, for the ImageNet ResNet stem (3×3, stride 2, padding 1).
//!
//! candle's `max_pool2d` has no padding and its backward refuses overlapping windows (kernel ≠
//! stride), so neither fits the stem. Here the pooling is separable: a 1-D max over rows, then
//! over columns, each the elementwise maximum of `kernel` strided `index_select`s of the input
//! padded with −∞. Every piece is a candle op with a gradient on every device, so no hand-written
//! backward is needed. Where a window holds several equal maxima, candle's `maximum` shares the
//! gradient between them (PyTorch gives it all to the first); the values are identical.

use candle_core::{Result, Tensor};

/// Max-pooling of an `N × C × H × W` tensor with a square `kernel`, `stride` and `pad`, padding
/// with −∞ as PyTorch does; the output is `N × C × H' × W'` with
/// `H' = (H + 2·pad − kernel) / stride + 1`.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, pad: usize) -> Result<Tensor> {
    // As in PyTorch: a larger padding would make windows that hold padding only.
    if kernel == 0 || stride == 0 || 2 * pad > kernel {
        candle_core::bail!(
            "max-pool: kernel {kernel}, stride {stride}, padding {pad}: need kernel, stride ≥ 1 and padding ≤ kernel / 2"
        )
    }
    let y = max_pool1d(x, 2, kernel, stride, pad)?;
    max_pool1d(&y, 3, kernel, stride, pad)
}

/// Max-pooling along one dimension.
fn max_pool1d(x: &Tensor, dim: usize, kernel: usize, stride: usize, pad: usize) -> Result<Tensor> {
    let len = x.dim(dim)?;
    if len + 2 * pad < kernel {
        candle_core::bail!(
            "max-pool: size {len} with padding {pad} is smaller than the kernel {kernel}"
        )
    }
    let out = (len + 2 * pad - kernel) / stride + 1;
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
    use candle_core::Var;

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

    /// Values and input gradient equal the direct loop, for even and odd sizes and the
    /// padded-overlapping and plain cases; random inputs have no ties, so the argmax is unique.
    #[test]
    fn matches_a_direct_loop_forward_and_backward() {
        for (i, &(dims, ksp)) in [
            ((2, 3, 8, 8), (3, 2, 1)),
            ((1, 2, 7, 9), (3, 2, 1)),
            ((2, 1, 6, 5), (2, 2, 0)),
            ((1, 2, 5, 5), (3, 1, 1)),
        ]
        .iter()
        .enumerate()
        {
            let (n, c, h, w) = dims;
            let x = Var::from_tensor(&random(&[n, c, h, w], -1.0..1.0, i as u64)).unwrap();
            let y = max_pool2d(x.as_tensor(), ksp.0, ksp.1, ksp.2).unwrap();
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
            // Where windows overlap, a gradient is a sum whose order may differ.
            let g = grads.get(x.as_tensor()).unwrap();
            let g_ref = Tensor::from_vec(g_ref, g.dims(), g.device()).unwrap();
            assert!(max_rel(g, &g_ref) < 1e-6, "gradient, case {i}");
        }
    }

    /// Without padding and with kernel = stride, candle's own pooling gives the same values.
    #[test]
    fn equals_candle_without_padding() {
        let x = random(&[2, 3, 8, 6], -1.0..1.0, 9);
        let ours = max_pool2d(&x, 2, 2, 0).unwrap();
        let theirs = x.max_pool2d(2).unwrap();
        assert_eq!(
            ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert!(max_pool2d(&x, 3, 2, 2).is_err());
    }
}
