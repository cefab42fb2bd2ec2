//! Per-operation timers for `pipeline bench train --profile`.
//!
//! The CPU kernels of the models (convolution, BatchNorm, ReLU fusions, the optimiser step)
//! charge their wall time to a [`Section`] while profiling is on; the benchmark prints the
//! totals next to the whole step's time, whose remainder is candle's own work (gradient
//! accumulation, the loss, the classifier head). Off by default: then a timer costs one relaxed
//! atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// What a timed stretch of work was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// Convolution forward (im2col + GEMM).
    ConvForward,
    /// Convolution backward: input and weight gradients.
    ConvBackward,
    /// BatchNorm (with its fused ReLU) forward, statistics included.
    BatchNormForward,
    /// BatchNorm backward.
    BatchNormBackward,
    /// Fused residual addition + ReLU, forward.
    AddReluForward,
    /// Fused residual addition + ReLU, backward.
    AddReluBackward,
    /// The optimiser's update of every parameter.
    OptimizerStep,
}

impl Section {
    /// Every section, in report order.
    pub const ALL: [Section; 7] = [
        Section::ConvForward,
        Section::BatchNormForward,
        Section::AddReluForward,
        Section::ConvBackward,
        Section::BatchNormBackward,
        Section::AddReluBackward,
        Section::OptimizerStep,
    ];

    /// Whether the section is part of the forward pass (else the backward pass or the step).
    pub fn is_forward(self) -> bool {
        matches!(
            self,
            Section::ConvForward | Section::BatchNormForward | Section::AddReluForward
        )
    }

    /// A short label for tables.
    pub fn label(self) -> &'static str {
        match self {
            Section::ConvForward => "convolution forward",
            Section::ConvBackward => "convolution backward (input + weight gradients)",
            Section::BatchNormForward => "BatchNorm (+ ReLU) forward",
            Section::BatchNormBackward => "BatchNorm (+ ReLU) backward",
            Section::AddReluForward => "residual add + ReLU forward",
            Section::AddReluBackward => "residual add + ReLU backward",
            Section::OptimizerStep => "SGD step",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
const N: usize = Section::ALL.len();
static NANOS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
static CALLS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];

/// Turns the timers on or off.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Zeroes every total.
pub fn reset() {
    for s in Section::ALL {
        NANOS[s as usize].store(0, Ordering::Relaxed);
        CALLS[s as usize].store(0, Ordering::Relaxed);
    }
}

/// `(section, seconds, calls)` for every section, in report order.
pub fn totals() -> Vec<(Section, f64, u64)> {
    Section::ALL
        .iter()
        .map(|&s| {
            (
                s,
                NANOS[s as usize].load(Ordering::Relaxed) as f64 * 1e-9,
                CALLS[s as usize].load(Ordering::Relaxed),
            )
        })
        .collect()
}

/// Charges the time until it is dropped to its section (when profiling is on).
pub struct Timer(Option<(Section, Instant)>);

/// Starts timing `section`.
#[inline]
pub fn timer(section: Section) -> Timer {
    Timer(
        ENABLED
            .load(Ordering::Relaxed)
            .then(|| (section, Instant::now())),
    )
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some((s, t0)) = self.0 {
            NANOS[s as usize].fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            CALLS[s as usize].fetch_add(1, Ordering::Relaxed);
        }
    }
}
