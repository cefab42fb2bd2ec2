//! Content digests of a dataset's source files, so that a `prepare` stage is identified by what
//! it reads rather than by where the files live: moving or copying a dataset reruns nothing,
//! and a file changed in place reruns what depends on it.
//!
//! A digest is blake3 over, for each file in the reader's order, its path relative to the
//! dataset's root, its length and its own blake3. Hashing a large tree (an ImageNet-sized
//! ImageFolder) at every read of stages.toml would take minutes, so a digest is remembered in a
//! cache folder under the files' *stat signature* (relative path, length, modification and
//! status-change times, device and inode of each file), as DVC and make decide what changed: a
//! file rewritten to the same length within one timestamp tick (a few milliseconds on Linux)
//! would go unnoticed. As git does for its index ("racy git"), a digest is cached only when
//! every file was [`SETTLED`] old before it was looked at and its stat is unchanged after it
//! was read: a file rewritten in the tick it was hashed in is hashed again.
//! One cache entry is one small file named by the signature, written atomically, so that
//! concurrent processes (Slurm tasks, `--jobs` children) never conflict.

use crate::error::{DatasetError, Result};
use rayon::prelude::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The version of the digest's definition, part of every signature and digest.
const VERSION: &[u8] = b"ldl-source-digest-1";

/// The digest cache: `digests/` in the download cache ([`crate::fetch::default_cache`]).
pub fn default_cache() -> Option<PathBuf> {
    crate::fetch::default_cache().map(|c| c.join("digests"))
}

/// How long ago every file must have been modified for its digest to be cached.
pub const SETTLED: std::time::Duration = std::time::Duration::from_secs(2);

/// What [`digest`] found: the content digest and how it was obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceDigest {
    /// The content digest (`blake3:` and 64 hex digits).
    pub hex: String,
    /// Number of files.
    pub files: usize,
    /// Their total size in bytes.
    pub bytes: u64,
    /// Whether the digest came from the cache (no file was read).
    pub cached: bool,
}

/// The content digest of `files` (each under `root`, in the order the reader takes them),
/// looked up in (and added to) `cache` when given. A file that cannot be read is an error
/// naming it; a cache that cannot be written is skipped, as a cache.
pub fn digest(root: &Path, files: &[PathBuf], cache: Option<&Path>) -> Result<SourceDigest> {
    let before = std::time::SystemTime::now();
    let stat = signature(root, files)?;
    let entry = cache.map(|c| c.join(&stat.hex));
    if let Some(hex) = entry.as_deref().and_then(read_entry) {
        return Ok(SourceDigest {
            hex,
            files: files.len(),
            bytes: stat.bytes,
            cached: true,
        });
    }
    let hex = hash_contents(root, files)?;
    // Cached only when every file was already SETTLED old before it was looked at (a file
    // rewritten in the tick it was read keeps its timestamp), and unchanged while it was read.
    let settled = before
        .duration_since(stat.newest)
        .is_ok_and(|age| age >= SETTLED);
    if let (Some(entry), true) = (&entry, settled) {
        if signature(root, files).is_ok_and(|again| again.hex == stat.hex) {
            // A read-only or full cache only costs the next read of stages.toml a rehash.
            let _ = write_entry(entry, &hex);
        }
    }
    Ok(SourceDigest {
        hex,
        files: files.len(),
        bytes: stat.bytes,
        cached: false,
    })
}

/// The files' stat signature, their total size and newest modification time.
struct Signature {
    hex: String,
    bytes: u64,
    newest: std::time::SystemTime,
}

/// Relative path, length, modification and status-change times, device and inode of every
/// file: a rewrite, a restored modification time (`touch -r`, `cp -p` over it, `tar`) or a copy
/// onto another file system gives another signature.
fn signature(root: &Path, files: &[PathBuf]) -> Result<Signature> {
    let mut h = blake3::Hasher::new();
    h.update(VERSION);
    let (mut bytes, mut newest) = (0u64, std::time::SystemTime::UNIX_EPOCH);
    for file in files {
        let meta = std::fs::metadata(file).map_err(|e| DatasetError::io(file, e))?;
        h.update(relative(root, file).as_bytes());
        h.update(&[0]);
        for v in [
            meta.len(),
            meta.mtime() as u64,
            meta.mtime_nsec() as u64,
            meta.ctime() as u64,
            meta.ctime_nsec() as u64,
            meta.dev(),
            meta.ino(),
        ] {
            h.update(&v.to_le_bytes());
        }
        bytes += meta.len();
        newest = newest.max(meta.modified().map_err(|e| DatasetError::io(file, e))?);
    }
    Ok(Signature {
        hex: h.finalize().to_hex().to_string(),
        bytes,
        newest,
    })
}

/// Reads every file (in parallel) and combines their hashes in order.
fn hash_contents(root: &Path, files: &[PathBuf]) -> Result<String> {
    let hashes: Vec<(u64, blake3::Hash)> = files
        .par_iter()
        .map(|file| {
            let mut h = blake3::Hasher::new();
            let f = std::fs::File::open(file).map_err(|e| DatasetError::io(file, e))?;
            h.update_reader(f).map_err(|e| DatasetError::io(file, e))?;
            Ok((h.count(), h.finalize()))
        })
        .collect::<Result<_>>()?;
    let mut all = blake3::Hasher::new();
    all.update(VERSION);
    for (file, (len, hash)) in files.iter().zip(&hashes) {
        all.update(relative(root, file).as_bytes());
        all.update(&[0]);
        all.update(&len.to_le_bytes());
        all.update(hash.as_bytes());
    }
    Ok(format!("blake3:{}", all.finalize().to_hex()))
}

/// `file`'s path below `root` with `/` separators (the whole path if it is not below): how a
/// digest and `records.parquet` name a source file.
pub fn relative(root: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(root).unwrap_or(file);
    let parts: Vec<_> = rel.iter().map(|p| p.to_string_lossy()).collect();
    parts.join("/")
}

fn read_entry(entry: &Path) -> Option<String> {
    let text = std::fs::read_to_string(entry).ok()?;
    let hex = text.trim();
    let ok = hex.len() == 71
        && hex.starts_with("blake3:")
        && hex[7..].bytes().all(|b| b.is_ascii_hexdigit());
    ok.then(|| hex.to_string())
}

fn write_entry(entry: &Path, hex: &str) -> Result<()> {
    let dir = entry.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| DatasetError::io(dir, e))?;
    crate::atomic::write_bytes(entry, format!("{hex}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = root.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Dates `file`'s modification an hour back, as if written long before it is hashed.
    fn age(file: &Path) {
        let f = std::fs::File::options().write(true).open(file).unwrap();
        let then = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        f.set_modified(then).unwrap();
    }

    /// The digest recomputed by hand from its definition.
    fn expected(entries: &[(&str, &[u8])]) -> String {
        let mut all = blake3::Hasher::new();
        all.update(VERSION);
        for (name, bytes) in entries {
            all.update(name.as_bytes());
            all.update(&[0]);
            all.update(&(bytes.len() as u64).to_le_bytes());
            all.update(blake3::hash(bytes).as_bytes());
        }
        format!("blake3:{}", all.finalize().to_hex())
    }

    #[test]
    fn the_digest_follows_content_and_names_not_location() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let files_a = [
            write(a.path(), "x/one.bin", b"first"),
            write(a.path(), "two.bin", b"second file"),
        ];
        let d = digest(a.path(), &files_a, None).unwrap();
        assert_eq!(
            d.hex,
            expected(&[("x/one.bin", b"first"), ("two.bin", b"second file")])
        );
        assert_eq!((d.files, d.bytes, d.cached), (2, 16, false));
        // The same files elsewhere: the same digest.
        let files_b = [
            write(b.path(), "x/one.bin", b"first"),
            write(b.path(), "two.bin", b"second file"),
        ];
        assert_eq!(digest(b.path(), &files_b, None).unwrap().hex, d.hex);
        // One byte changed, or a file renamed: another digest.
        write(b.path(), "two.bin", b"second filE");
        assert_ne!(digest(b.path(), &files_b, None).unwrap().hex, d.hex);
        let renamed = [
            files_a[0].clone(),
            write(a.path(), "three.bin", b"second file"),
        ];
        assert_ne!(digest(a.path(), &renamed, None).unwrap().hex, d.hex);
        // A missing file is named.
        let gone = [a.path().join("absent.bin")];
        let e = digest(a.path(), &gone, None).unwrap_err().to_string();
        assert!(e.contains("absent.bin"), "{e}");
    }

    #[test]
    fn the_cache_answers_until_a_file_changes() {
        let (root, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let files = [write(root.path(), "a.bin", b"aaaa")];
        // Just written: hashed, and not cached, so a rewrite within the same tick is seen.
        let fresh = digest(root.path(), &files, Some(cache.path())).unwrap();
        assert!(!fresh.cached);
        std::fs::write(&files[0], b"abcd").unwrap();
        let rewritten = digest(root.path(), &files, Some(cache.path())).unwrap();
        assert!(!rewritten.cached);
        assert_eq!(rewritten.hex, expected(&[("a.bin", b"abcd")]));
        assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
        age(&files[0]);
        let first = digest(root.path(), &files, Some(cache.path())).unwrap();
        assert!(!first.cached);
        let again = digest(root.path(), &files, Some(cache.path())).unwrap();
        assert!(again.cached);
        assert_eq!(again.hex, first.hex);
        // A damaged entry is not believed: the files are read again.
        for e in std::fs::read_dir(cache.path()).unwrap() {
            std::fs::write(e.unwrap().path(), "blake3:not-hex").unwrap();
        }
        let reread = digest(root.path(), &files, Some(cache.path())).unwrap();
        assert!(!reread.cached);
        assert_eq!(reread.hex, first.hex);
        // Rewritten with other content of another length: a new signature, read again.
        write(root.path(), "a.bin", b"bbbbb");
        age(&files[0]);
        let changed = digest(root.path(), &files, Some(cache.path())).unwrap();
        assert!(!changed.cached);
        assert_eq!(changed.hex, expected(&[("a.bin", b"bbbbb")]));
    }
}
