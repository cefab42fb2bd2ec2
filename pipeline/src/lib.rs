//! The library behind the `pipeline` binary: stages.toml parsing and validation (`config`), the
//! resumable stage runner (`runner`), per-stage claims (`claim`), `pipeline inspect`
//! (`inspect`) and `pipeline bench` (`bench`). It is a library so that the fuzz targets
//! (`fuzz/`) can drive the stages.toml loader directly.

pub mod bench;
pub mod claim;
pub mod config;
pub mod export;
pub mod inspect;
pub mod jobs;
pub mod runner;
pub mod slurm;

/// A command-line option that cannot be honoured (a device or dtype this build lacks, a Slurm
/// time limit no longer than its signal lead): exit status 2, as a bad stages.toml.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}
