//! Evaluation-mode passes that record no autograd graph, like PyTorch's `torch.no_grad()` for a
//! pass over plain images.
//!
//! Candle records an op whenever one of its inputs is a variable or was computed from one, and
//! every recorded output keeps its inputs alive until it is dropped itself. A model's weights
//! are variables, so an evaluation-mode pass through layers (the backbones without a planned
//! program: DenseNet, DLA) kept every activation of the pass until its logits were dropped:
//! the memory of a training step, for a pass that is never differentiated (DenseNet-121 at
//! batch 256: 10 GiB where the activations alive at any one time take well under 1 GiB). Inside
//! a [`NoGrad`] scope the layers read their parameters through [`param`], which detaches them
//! (the same storage, no copy). Unlike `torch.no_grad()` the scope freezes only the
//! parameters: a pass whose input is itself recorded (computed from a variable) still records,
//! and gradients still reach that input; over plain images nothing is recorded, and each
//! activation is freed as soon as the next layer has read it. A pass inside the scope gives its
//! parameters no gradient, so nothing may train through one.

use candle_core::Tensor;
use std::cell::Cell;
use std::marker::PhantomData;

thread_local! {
    /// Whether this thread is inside a [`NoGrad`] scope. Per thread: a pass's ops are issued
    /// from the thread that runs it (the kernels' own worker threads read no parameters).
    static OFF: Cell<bool> = const { Cell::new(false) };
}

/// A scope in which the layers read their parameters detached on this thread; the previous
/// state comes back when it is dropped (scopes nest, and are dropped innermost first, as locals
/// are). Not `Send`: it must end on the thread it began on.
#[must_use = "the scope ends when this guard is dropped"]
pub struct NoGrad {
    before: bool,
    _this_thread: PhantomData<*const ()>,
}

impl NoGrad {
    /// Enters a scope without parameter gradients.
    pub fn enter() -> NoGrad {
        NoGrad {
            before: OFF.with(|o| o.replace(true)),
            _this_thread: PhantomData,
        }
    }
}

impl Drop for NoGrad {
    fn drop(&mut self) {
        OFF.with(|o| o.set(self.before));
    }
}

/// Whether this thread records autograd graphs (it is outside every [`NoGrad`] scope).
pub fn enabled() -> bool {
    !OFF.with(Cell::get)
}

/// A layer's parameter as a pass uses it: itself, or detached inside a [`NoGrad`] scope.
pub fn param(t: &Tensor) -> Tensor {
    if enabled() {
        t.clone()
    } else {
        t.detach()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Scopes nest and restore the state they found; parameters are detached inside one only,
    /// sharing the variable's storage (a later update is seen through them).
    #[test]
    fn scopes_nest_and_detach_parameters() {
        let v = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        assert!(enabled() && param(v.as_tensor()).is_variable());
        {
            let _outer = NoGrad::enter();
            {
                let _inner = NoGrad::enter();
                assert!(!enabled());
            }
            assert!(!enabled(), "the inner scope ended the outer one");
            let p = param(v.as_tensor());
            assert!(!p.is_variable() && !p.track_op());
            v.set(&Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap())
                .unwrap();
            assert_eq!(p.to_vec1::<f32>().unwrap(), [3.0, 4.0]);
        }
        assert!(enabled());
        assert!(param(v.as_tensor()).is_variable());
    }
}
