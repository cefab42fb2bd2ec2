//! The stage kinds, one module each. A kind reads its inputs' folders through the
//! [`Context`](crate::context::Context) the runner hands it, and the artifact types of
//! [`artifacts`](crate::artifacts); it never imports another kind.

pub mod evaluate;
pub mod import;
pub mod label;
pub mod prepare;
pub mod replay;
pub mod report;
pub mod train;
