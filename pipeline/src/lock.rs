//! The output root's lock: one `pipeline run` (or `clean`) per output folder at a time.
//!
//! The lock is an advisory `flock` on `<output>/.pipeline.lock`, which the kernel releases when
//! the holder dies, however it dies; the file records the holder's PID for the error message.
//! A file whose recorded holder is gone is simply taken over. The file is never deleted (deleting
//! it would let two processes lock two different inodes).

use anyhow::{bail, Context as _, Result};
use rustix::fs::{flock, FlockOperation};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// A held lock; released when dropped or when the process exits.
pub struct OutputLock {
    file: File,
    path: PathBuf,
}

impl OutputLock {
    /// Takes the lock of output root `root`, or fails at once naming the holder.
    pub fn acquire(root: &Path) -> Result<OutputLock> {
        std::fs::create_dir_all(root)
            .with_context(|| format!("cannot create output folder {}", root.display()))?;
        let path = root.join(".pipeline.lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        let mut previous = String::new();
        let _ = file.read_to_string(&mut previous);
        if let Err(e) = flock(&file, FlockOperation::NonBlockingLockExclusive) {
            if e == rustix::io::Errno::WOULDBLOCK {
                bail!(
                    "output folder {} is in use by another pipeline process ({}); wait for it to finish or stop it",
                    root.display(),
                    holder(&previous)
                );
            }
            bail!("cannot lock {}: {e}", path.display());
        }
        if !previous.trim().is_empty() {
            tracing::warn!(
                "taking over the lock of {} left by a process that is no longer running ({})",
                root.display(),
                holder(&previous)
            );
        }
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        writeln!(
            file,
            "pid={} started={}",
            std::process::id(),
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        )?;
        file.sync_all()?;
        Ok(OutputLock { file, path })
    }
}

fn holder(contents: &str) -> String {
    let pid = contents
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .unwrap_or("unknown");
    let started = contents
        .split_whitespace()
        .find_map(|w| w.strip_prefix("started="))
        .unwrap_or("unknown");
    format!("PID {pid}, started {started}")
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Empty the file so the next holder does not report a takeover; the flock goes with the fd.
        if self.file.set_len(0).is_err() {
            tracing::debug!("could not clear {}", self.path.display());
        }
    }
}
