//! The library behind the `pipeline` binary: stages.toml parsing and validation (`config`), the
//! resumable stage runner (`runner`), per-stage claims (`claim`), `pipeline inspect`
//! (`inspect`) and `pipeline bench` (`bench`). It is a library so that the fuzz targets
//! (`fuzz/`) can drive the stages.toml loader directly.

pub mod bench;
pub mod claim;
pub mod config;
pub mod inspect;
pub mod jobs;
pub mod runner;
pub mod slurm;
