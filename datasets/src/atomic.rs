//! Crash-safe file writes: write to a temporary file beside the destination, fsync it, rename it
//! into place and fsync the folder, so a reader (or a process restarted after SIGKILL) only ever
//! sees the old complete file or the new complete file.

use crate::error::{DatasetError, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary path used while writing `path`.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Whether `name` is a temporary file of [`write_with`] (`.<name>.tmp-<pid>`).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.')
        && name
            .rsplit_once(".tmp-")
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes, under `dir` (recursively), the temporary files that a killed writer left behind, so
/// that a resumed folder never carries one into a final output. Returns how many it removed.
pub fn remove_stale_temps(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            removed += remove_stale_temps(&path)?;
        } else if is_temp_name(&entry.file_name().to_string_lossy()) {
            fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The environment variable of the fault-injection hook: `<text>@<bytes>` makes the process
/// abort (no destructors, no cleanup: to the file system, the same as SIGKILL) once `<bytes>`
/// bytes have reached the temporary file of a write whose final path contains `<text>`. The
/// kill-and-resume tests use it to stop a run inside a checkpoint or Parquet write
/// deterministically, which random kills only hit by chance.
pub const FAULT_ENV: &str = "LDL_FAULT_WRITE";

/// The temporary file of [`write_with`] and [`AtomicFile`], with the fault-injection hook of
/// [`FAULT_ENV`].
pub struct Sink {
    file: File,
    /// Bytes left before the injected abort, and the final path for the message.
    abort_after: Option<(u64, PathBuf)>,
}

impl Sink {
    fn new(file: File, path: &Path) -> Self {
        let abort_after = std::env::var(FAULT_ENV).ok().and_then(|spec| {
            let (text, bytes) = spec.rsplit_once('@')?;
            let bytes = bytes.parse::<u64>().ok()?;
            path.to_string_lossy()
                .contains(text)
                .then(|| (bytes, path.to_path_buf()))
        });
        Sink { file, abort_after }
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some((left, path)) = &mut self.abort_after else {
            return self.file.write(buf);
        };
        if (buf.len() as u64) < *left {
            let n = self.file.write(buf)?;
            *left -= n as u64;
            return Ok(n);
        }
        // Write exactly up to the limit, so the temporary file really holds a partial write.
        self.file.write_all(&buf[..*left as usize])?;
        eprintln!(
            "{FAULT_ENV}: aborting while writing {} (temporary file left partial)",
            path.display()
        );
        std::process::abort()
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// A file written piece by piece into a temporary file, then (in [`AtomicFile::finish`])
/// fsynced and renamed over its path: for contents too large to hold in memory. Dropped
/// unfinished (an error on the way), the temporary file is removed.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    w: Option<std::io::BufWriter<Sink>>,
}

impl AtomicFile {
    /// Starts writing `path` (at its temporary path).
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = temp_path(path);
        let file = File::create(&tmp).map_err(|e| DatasetError::io(path, e))?;
        Ok(AtomicFile {
            path: path.to_owned(),
            tmp,
            w: Some(std::io::BufWriter::with_capacity(
                1 << 20,
                Sink::new(file, path),
            )),
        })
    }

    /// The buffered writer of the temporary file.
    fn writer(&mut self) -> &mut std::io::BufWriter<Sink> {
        self.w.as_mut().expect("not finished")
    }

    /// Appends `bytes`.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let path = self.path.clone();
        self.writer()
            .write_all(bytes)
            .map_err(|e| DatasetError::io(&path, e))
    }

    /// Overwrites `bytes` at `offset` (within what was written), fsyncs the file and renames
    /// it into place: a header field known only at the end (a hash) goes in this way.
    pub fn finish(mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        let w = self.w.take().expect("finished once");
        let result = (|| {
            let sink = w.into_inner().map_err(|e| e.into_error())?;
            if !bytes.is_empty() {
                std::os::unix::fs::FileExt::write_all_at(&sink.file, bytes, offset)?;
            }
            sink.file.sync_all()?;
            fs::rename(&self.tmp, &self.path)?;
            sync_dir(self.path.parent().unwrap_or(Path::new(".")))
        })();
        // A failed finish (a full disk at the last flush) leaves no temporary file behind.
        if result.is_err() {
            let _ = fs::remove_file(&self.tmp);
        }
        result.map_err(|e| DatasetError::io(&self.path, e))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.w.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes a file atomically: `fill` writes the contents into a temporary file, which is then
/// fsynced and renamed over `path`. On error the temporary file is removed.
pub fn write_with<F>(path: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&mut std::io::BufWriter<Sink>) -> std::io::Result<()>,
{
    let mut file = AtomicFile::create(path)?;
    fill(file.writer()).map_err(|e| DatasetError::io(path, e))?;
    file.finish(0, &[])
}

/// Writes `bytes` to `path` atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |w| w.write_all(bytes))
}

/// The environment variable of the fault-injection hook of [`replace_dir`]: `unsupported` makes
/// its atomic exchange fail with EINVAL, as it does on NFS, so that the fallback runs;
/// `unsupported-abort` also aborts the process between the fallback's two renames (to the file
/// system, the same as SIGKILL there).
pub const FAULT_EXCHANGE_ENV: &str = "LDL_FAULT_EXCHANGE";

/// Moves folder `src` to `dst`, replacing `dst` if it exists. An existing `dst` is swapped with
/// `src` in one `renameat2(RENAME_EXCHANGE)`, so that a reader (or a process restarted after a
/// kill) sees the old complete folder or the new one, never a mix or nothing, and the old
/// contents, now at `src`, are moved to `.<name>.replaced` and deleted there (a run killed
/// meanwhile leaves them for the next call to delete). File systems without the exchange (NFS, and others that
/// refuse rename flags) get two renames instead: the old folder aside to `.<name>.replaced`,
/// then `src` into place; a kill between the two leaves no `dst` for the moment, with `src`
/// still complete for the caller to move again (the runner does, on its next run).
pub fn replace_dir(src: &Path, dst: &Path) -> Result<()> {
    let result = (|| {
        let aside = aside_path(dst);
        if aside.exists() {
            // Left by a run killed inside the fallback.
            fs::remove_dir_all(&aside)?;
        }
        if dst.exists() {
            match exchange(src, dst) {
                Ok(()) => {
                    // The old folder, now at `src`, is renamed aside before it is removed:
                    // killed while removing a large folder, it would otherwise be left
                    // complete at `src`, and a later run would take it for a finished one
                    // (`--force` would bring the old outputs back instead of running).
                    fs::rename(src, &aside)?;
                    fs::remove_dir_all(&aside)?;
                }
                Err(e) if exchange_unsupported(&e) => {
                    fs::rename(dst, &aside)?;
                    if std::env::var(FAULT_EXCHANGE_ENV).is_ok_and(|v| v == "unsupported-abort") {
                        eprintln!(
                            "{FAULT_EXCHANGE_ENV}: aborting between the renames of {}",
                            dst.display()
                        );
                        std::process::abort();
                    }
                    fs::rename(src, dst)?;
                    fs::remove_dir_all(&aside)?;
                }
                Err(e) => return Err(e),
            }
        } else {
            fs::rename(src, dst)?;
        }
        sync_dir(dst.parent().unwrap_or(Path::new(".")))
    })();
    result.map_err(|e| DatasetError::io(dst, e))
}

/// Where [`replace_dir`]'s fallback puts the old `dst` while it moves the new one in.
fn aside_path(dst: &Path) -> PathBuf {
    let name = dst.file_name().unwrap_or_default().to_string_lossy();
    dst.with_file_name(format!(".{name}.replaced"))
}

/// Swaps `src` and `dst` in one step (`renameat2(RENAME_EXCHANGE)`).
fn exchange(src: &Path, dst: &Path) -> std::io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    if std::env::var(FAULT_EXCHANGE_ENV).is_ok_and(|v| v.starts_with("unsupported")) {
        return Err(rustix::io::Errno::INVAL.into());
    }
    Ok(renameat_with(CWD, src, CWD, dst, RenameFlags::EXCHANGE)?)
}

/// Whether the file system refused the exchange itself (rather than failed it): NFS answers
/// EINVAL to any rename flag, other file systems and older kernels EOPNOTSUPP or ENOSYS.
fn exchange_unsupported(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    [Errno::INVAL, Errno::OPNOTSUPP, Errno::NOSYS]
        .iter()
        .any(|n| e.raw_os_error() == Some(n.raw_os_error()))
}

/// Fsyncs a folder so that a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let d = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(d)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_contents_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("ldl-atomic-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.txt");
        write_bytes(&p, b"one").unwrap();
        write_bytes(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let err = write_with(&p, |_| Err(std::io::Error::other("boom"))).unwrap_err();
        assert!(err.to_string().contains("boom"));
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_temporary_files_are_swept() {
        let dir = std::env::temp_dir().join(format!("ldl-sweep-{}", std::process::id()));
        fs::create_dir_all(dir.join("sub")).unwrap();
        for f in [
            ".a.json.tmp-123",
            "sub/.b.bin.tmp-9",
            "keep.json",
            ".hidden",
            "x.tmp-1",
            ".c.tmp-",
        ] {
            fs::write(dir.join(f), b"").unwrap();
        }
        assert_eq!(remove_stale_temps(&dir).unwrap(), 2);
        let mut left: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".c.tmp-", ".hidden", "keep.json", "sub", "x.tmp-1"]);
        assert_eq!(fs::read_dir(dir.join("sub")).unwrap().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn replace_dir_swaps_whole_folders() {
        let dir = std::env::temp_dir().join(format!("ldl-replace-{}", std::process::id()));
        let (a, b) = (dir.join("a"), dir.join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::write(a.join("x"), b"1").unwrap();
        replace_dir(&a, &b).unwrap();
        assert!(!a.exists() && fs::read(b.join("x")).unwrap() == b"1");
        fs::create_dir_all(&a).unwrap();
        fs::write(a.join("y"), b"2").unwrap();
        replace_dir(&a, &b).unwrap();
        assert!(!a.exists() && !b.join("x").exists() && fs::read(b.join("y")).unwrap() == b"2");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A finish that fails (here the rename: a folder holds the file's name) returns the error
    /// and leaves no temporary file.
    #[test]
    fn a_failed_finish_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pack");
        let mut f = AtomicFile::create(&path).unwrap();
        f.write_all(b"0123456789").unwrap();
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), b"keeps the folder non-empty").unwrap();
        assert!(f.finish(0, b"ab").is_err());
        assert!(!temp_path(&path).exists());
    }
}
