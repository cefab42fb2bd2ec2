//! The checks every stored row passes when it is read: probabilities finite, non-negative and
//! summing to 1 (within the dtype's tolerance, [`super::StoreDtype::sum_tolerance`]); top-k
//! classes distinct and in range; the remaining mass finite, non-negative, and zero when
//! top_k = K. Errors name the file, the row, the column and (for a value) the class.

use crate::error::{Result, StageError};
use std::path::Path;

/// The row checks of one store.
pub struct RowCheck<'a> {
    /// The store, for errors.
    pub path: &'a Path,
    /// How far from 1 a row may sum.
    pub tolerance: f32,
    /// Before the column names in errors (a replay store's `<teacher>.`; empty for a label
    /// store, whose columns are named alone).
    pub prefix: &'a str,
}

impl RowCheck<'_> {
    /// Row `at`'s `values` in `column` (with `rest`, the mass of the classes not stored) must
    /// be finite and non-negative and sum to 1; returns the sum. `of`: the class of each value
    /// (top-k rows), else a value's position is its class.
    pub fn distribution(
        &self,
        at: usize,
        column: &str,
        values: &[f32],
        of: &[u16],
        rest: f32,
    ) -> Result<f32> {
        let mut sum = rest;
        for (c, &v) in values.iter().enumerate() {
            if !v.is_finite() || v < 0.0 {
                return Err(StageError::invalid(
                    self.path,
                    format!(
                        "row {at}, column `{column}`, class {}",
                        of.get(c).map_or(c, |&c| c as usize)
                    ),
                    format!("value {v}: probabilities must be finite and non-negative"),
                ));
            }
            sum += v;
        }
        if (sum - 1.0).abs() > self.tolerance {
            return Err(StageError::invalid(
                self.path,
                format!("row {at}, column `{column}`"),
                format!("sums to {sum}, expected 1 within {}", self.tolerance),
            ));
        }
        Ok(sum)
    }

    /// Row `at`'s top-k classes `cs` must be distinct classes in 0..k; `dup` is K flags of
    /// scratch.
    pub fn top_k_classes(&self, at: usize, cs: &[u16], k: usize, dup: &mut [bool]) -> Result<()> {
        dup.fill(false);
        for &c in cs {
            if c as usize >= k || std::mem::replace(&mut dup[c as usize], true) {
                return Err(StageError::invalid(
                    self.path,
                    format!("row {at}, column `{}topk_classes`", self.prefix),
                    format!("{cs:?} must be distinct classes in 0..{k}"),
                ));
            }
        }
        Ok(())
    }

    /// Row `at`'s remaining mass must be finite and non-negative, and (nearly) zero when every
    /// class is stored.
    pub fn rest(&self, at: usize, rest: f32, all_classes: bool) -> Result<()> {
        if !rest.is_finite() || rest < 0.0 {
            return Err(StageError::invalid(
                self.path,
                format!("row {at}, column `{}rest`", self.prefix),
                format!("value {rest}: the remaining mass must be finite and non-negative"),
            ));
        }
        if all_classes && rest > self.tolerance {
            return Err(StageError::invalid(
                self.path,
                format!("row {at}, column `{}rest`", self.prefix),
                format!("value {rest}: with top_k = K no mass can remain"),
            ));
        }
        Ok(())
    }
}
