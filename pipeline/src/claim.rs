//! Per-stage claims: any number of `pipeline` processes, on one machine or on several sharing a
//! file system, can work on one output root, and each stage is run by exactly one of them at a
//! time.
//!
//! A claim is an exclusive advisory `flock` on `<output>/.locks/<stage>.lock`, held for the
//! stage's whole run; the kernel releases it when the holder exits, however it exits (a
//! SIGKILL, a preempted job), so a claim is never stale and there is nothing to unlock. The file
//! records the holder (host, PID, start time) for messages, and is never deleted: deleting it
//! would let two processes lock two different inodes.
//!
//! flock(2) over NFS: Linux emulates `flock` with POSIX byte-range locks on NFS (since 2.6.12),
//! which the server shares between clients when it supports locking (NLM for NFSv3, built into
//! NFSv4). A mount with `local_lock=flock` or `local_lock=all` keeps flocks local to each client:
//! two machines could then both claim a stage. [`check_root`] warns about that case, and about
//! `nolock` mounts.

use anyhow::{bail, Context as _, Result};
use rustix::fs::{flock, FlockOperation};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// A held claim on one stage; released when dropped or when the process exits.
pub struct StageClaim {
    file: File,
}

fn lock_path(root: &Path, stage: &str) -> PathBuf {
    root.join(".locks").join(format!("{stage}.lock"))
}

fn open(root: &Path, stage: &str) -> Result<(File, PathBuf)> {
    let dir = root.join(".locks");
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the claims folder {}", dir.display()))?;
    let path = lock_path(root, stage);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open claim file {}", path.display()))?;
    Ok((file, path))
}

impl StageClaim {
    /// Claims `stage` of output root `root`; `None` when another process holds it.
    pub fn try_claim(root: &Path, stage: &str) -> Result<Option<StageClaim>> {
        let (mut file, path) = open(root, stage)?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => return Ok(None),
            Err(e) => bail!("cannot lock {}: {e}", path.display()),
        }
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        writeln!(
            file,
            "host={} pid={} started={}",
            hostname(),
            std::process::id(),
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        )?;
        file.flush()?;
        Ok(Some(StageClaim { file }))
    }

    /// Who holds the claim on `stage`, as its file records it (for messages).
    pub fn holder(root: &Path, stage: &str) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(lock_path(root, stage)) {
            let _ = f.read_to_string(&mut text);
        }
        let field = |key: &str| {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap_or("?")
                .to_string()
        };
        format!(
            "PID {} on {}, since {}",
            field("pid="),
            field("host="),
            field("started=")
        )
    }

    /// Who holds the claim on `stage` now ([`StageClaim::holder`]), or `None` when no process
    /// does; creates nothing. Probed with a shared lock taken and dropped at once, as
    /// [`StageClaim::wait_released`] does: a process claiming the stage within those
    /// microseconds finds it held (`run` logs that another process has it, then claims it;
    /// `clean` refuses once; a moved stage's record is rewritten at the next run instead).
    pub fn held(root: &Path, stage: &str) -> Option<String> {
        let file = File::open(lock_path(root, stage)).ok()?;
        match flock(&file, FlockOperation::NonBlockingLockShared) {
            Ok(()) => {
                let _ = flock(&file, FlockOperation::Unlock);
                None
            }
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => Some(Self::holder(root, stage)),
            Err(_) => None,
        }
    }

    /// Waits until no process holds the claim on `stage` (`Ok(true)`), or until `stop` is set
    /// (`Ok(false)`): a stop request must not wait for another process's training to end.
    pub fn wait_released(root: &Path, stage: &str, stop: &AtomicBool) -> Result<bool> {
        let (file, path) = open(root, stage)?;
        // A shared lock is granted once the exclusive holder is gone; it is dropped at once.
        loop {
            match flock(&file, FlockOperation::NonBlockingLockShared) {
                Ok(()) => break,
                Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot wait for the claim {}", path.display()))
                }
            }
            if stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        flock(&file, FlockOperation::Unlock)?;
        Ok(true)
    }
}

impl Drop for StageClaim {
    fn drop(&mut self) {
        // The flock goes with the descriptor; the file keeps the last holder's line for no one.
        let _ = self.file.set_len(0);
    }
}

fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// Warns when claims on `root` would not be seen by other machines: an NFS mount whose flocks
/// are local to this client (`local_lock=flock|all`) or that has no locking at all (`nolock`).
/// A local file system is fine for processes on this machine.
pub fn check_root(root: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let Ok(root) = root.canonicalize() else {
        return;
    };
    if let Some(warning) = lock_warning(&info, &root) {
        tracing::warn!("{warning}");
    }
}

/// The warning for `root` given the text of /proc/self/mountinfo, if any.
fn lock_warning(mountinfo: &str, root: &Path) -> Option<String> {
    // Fields: id parent major:minor root mount-point options … - fstype source super-options.
    let mount = mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split_whitespace().nth(4)?.replace("\\040", " ");
            let mut r = right.split_whitespace();
            let fstype = r.next()?.to_string();
            let _source = r.next();
            let options = r.next().unwrap_or_default().to_string();
            root.starts_with(&point).then_some((point, fstype, options))
        })
        .max_by_key(|(point, _, _)| point.len())?;
    let (point, fstype, options) = mount;
    if !fstype.starts_with("nfs") {
        return None;
    }
    let opts: Vec<&str> = options.split(',').collect();
    let local = opts
        .iter()
        .any(|o| *o == "local_lock=flock" || *o == "local_lock=all");
    let none = opts.contains(&"nolock");
    (local || none).then(|| {
        format!(
            "{} is on an NFS mount ({point}, {}) whose flocks are local to this machine: \
             pipeline processes on other machines will not see this one's stage claims, and \
             two machines could run the same stage; run all processes on one machine, or \
             remount without `local_lock=flock|all`/`nolock` (see docs/stages-toml.md)",
            root.display(),
            opts.iter()
                .filter(|o| o.starts_with("local_lock") || **o == "nolock")
                .copied()
                .collect::<Vec<_>>()
                .join(",")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:50 / /shared rw,relatime shared:20 - nfs4 server:/export rw,vers=4.2,local_lock=none,addr=10.0.0.1
41 22 0:51 / /scratch rw,relatime shared:21 - nfs server:/scratch rw,vers=3,nolock,local_lock=all
42 22 0:52 / /shared/fast rw - nfs4 server:/fast rw,vers=4.1,local_lock=flock
";

    #[test]
    fn warns_only_for_nfs_mounts_with_local_or_no_locks() {
        let w = |p: &str| lock_warning(MOUNTINFO, Path::new(p));
        assert_eq!(w("/home/me/outputs"), None, "ext4");
        assert_eq!(w("/shared/outputs"), None, "NFSv4 with server locks");
        let scratch = w("/scratch/run").expect("nolock, local_lock=all");
        assert!(scratch.contains("nolock,local_lock=all"), "{scratch}");
        // The deepest mount point decides.
        let fast = w("/shared/fast/run").expect("local_lock=flock");
        assert!(fast.contains("/shared/fast") && fast.contains("local_lock=flock"));
    }

    #[test]
    fn a_claim_excludes_a_second_one_until_it_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let a = StageClaim::try_claim(dir.path(), "s")
            .unwrap()
            .expect("free");
        // flock locks belong to open file descriptions: a second open, even in this process,
        // is refused while the first is held.
        assert!(StageClaim::try_claim(dir.path(), "s").unwrap().is_none());
        assert!(StageClaim::try_claim(dir.path(), "t").unwrap().is_some());
        assert!(
            StageClaim::holder(dir.path(), "s").contains(&format!("PID {}", std::process::id()))
        );
        // Waiting on a held claim ends with a stop request, not with the claim.
        let stop = AtomicBool::new(true);
        assert!(!StageClaim::wait_released(dir.path(), "s", &stop).unwrap());
        drop(a);
        stop.store(false, Ordering::Relaxed);
        assert!(StageClaim::wait_released(dir.path(), "s", &stop).unwrap());
        assert!(StageClaim::try_claim(dir.path(), "s").unwrap().is_some());
    }
}
