//! Batched products `w · v` whose left factor `w` is a constant, differentiated for `v` alone.
//!
//! candle's matmul backward computes the gradients of both factors whether or not they are
//! recorded: for CRD's scores (`b × (1 + K) × dim` rows gathered from a memory bank, times each
//! anchor) the constant's gradient is as large as the gathered rows (537 MB a side at batch 64
//! with K = 16,384), made with a zero tensor of that size and a sum, and then never used.
//! [`matmul_const_lhs`] computes the product without a graph and attaches the gradient of `v`
//! only, `wᵀ · grad` — the same product candle's matmul backward forms for its right factor, so
//! the values and `v`'s gradient are bitwise those of `w.matmul(v)`. A `w` with a graph gets no
//! gradient through it either: it is for constants.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `w.matmul(v)` for `w` (`… × m × k`, no gradient wanted) and `v` (`… × k × n`); when `v` is
/// recorded, the result is too, and its backward gives `v` its gradient and `w` none.
pub fn matmul_const_lhs(w: &Tensor, v: &Tensor) -> Result<Tensor> {
    let value = w.detach().matmul(&v.detach())?;
    if !v.track_op() {
        return Ok(value);
    }
    v.apply_op2(&value, ConstLhs { w: w.detach() })
}

/// The op: its forward hands on the product computed outside (the second argument), its
/// backward differentiates it for the first.
struct ConstLhs {
    w: Tensor,
}

/// The product's storage, which must be a whole buffer (a fresh matmul output is).
fn whole(layout: &Layout) -> Result<()> {
    if layout.is_contiguous() && layout.start_offset() == 0 {
        Ok(())
    } else {
        candle_core::bail!("matmul_const_lhs: the product is not a contiguous buffer")
    }
}

impl CustomOp2 for ConstLhs {
    fn name(&self) -> &'static str {
        "matmul-const-lhs"
    }

    fn cpu_fwd(
        &self,
        _v: &CpuStorage,
        _lv: &Layout,
        value: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        whole(l)?;
        Ok((value.try_clone(l)?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _v: &candle_core::CudaStorage,
        _lv: &Layout,
        value: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        whole(l)?;
        Ok((value.try_clone(l)?, l.shape().clone()))
    }

    fn bwd(
        &self,
        _v: &Tensor,
        _value: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let rank = self.w.rank();
        Ok((
            Some(self.w.transpose(rank - 2, rank - 1)?.matmul(grad)?),
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::testing::random;
    use candle_core::Var;

    /// Values and `v`'s gradient equal candle's `w.matmul(v)` bitwise (with `w` a constant:
    /// gathered rows, as CRD scores them), no gradient is made for `w`, and a `v` without a
    /// graph gives a product without one.
    #[test]
    fn equals_candles_matmul_and_leaves_the_constant_alone() {
        let w = random(&[3, 5, 4], -1.0..1.0, 1);
        let v = Var::from_tensor(&random(&[3, 4, 1], -1.0..1.0, 2)).unwrap();
        let weights = random(&[3, 5, 1], -1.0..1.0, 3);
        let loss = |y: &Tensor| (y * &weights).unwrap().sqr().unwrap().sum_all().unwrap();
        let ours = matmul_const_lhs(&w, v.as_tensor()).unwrap();
        let theirs = w.matmul(v.as_tensor()).unwrap();
        let flat = |t: &Tensor| -> Vec<u32> {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.into_iter().map(f32::to_bits).collect()
        };
        assert_eq!(flat(&ours), flat(&theirs));
        let (g1, g2) = (
            loss(&ours).backward().unwrap(),
            loss(&theirs).backward().unwrap(),
        );
        assert_eq!(
            flat(g1.get(v.as_tensor()).unwrap()),
            flat(g2.get(v.as_tensor()).unwrap())
        );
        assert!(
            g2.get(&w).is_some(),
            "candle's own backward makes w's gradient"
        );
        assert!(g1.get(&w).is_none(), "a gradient was made for the constant");
        let plain = matmul_const_lhs(&w, &v.as_tensor().detach()).unwrap();
        assert!(!plain.track_op());
        assert_eq!(flat(&plain), flat(&theirs));
    }
}
