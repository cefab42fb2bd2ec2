//! The paper's science: how each training method supervises a student ([`methods`],
//! [`supervision`], [`ogr`], [`crd`], [`sskd`]), how a model is judged ([`metrics`], [`calibration`]) and the
//! figures that show it ([`figures`]). Every formula is written out in docs/methods.md and
//! docs/metrics.md.

pub mod calibration;
pub mod crd;
pub mod figures;
pub mod methods;
pub mod metrics;
pub mod ogr;
#[cfg(test)]
mod reference_values;
pub mod sskd;
pub mod supervision;
