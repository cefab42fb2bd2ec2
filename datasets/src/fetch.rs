//! Downloading the official dataset archives (CIFAR-10 and CIFAR-100 binary, STL-10) into a cache
//! folder, so that `prepare` can start from a source name alone and later runs never touch the
//! network.
//!
//! Layout of the cache: `<file_name>.part` while downloading (a rerun resumes it with an HTTP
//! range request), `<file_name>` once its md5 matched, `<folder>/` once unpacked, and
//! `<folder>/.ldl-fetched` holding the archive's md5. The folder only appears, by one rename, with
//! its marker already inside, so a killed download or unpack never leaves a folder that looks
//! complete. `<file_name>.lock` serialises processes fetching the same archive into one cache.

use crate::atomic;
use crate::error::{DatasetError, Result};
use md5::{Digest, Md5};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// The file, inside the unpacked folder, whose presence (holding the archive's md5) marks the
/// folder as completely unpacked.
pub const MARKER: &str = ".ldl-fetched";

/// Attempts in a row that receive no new byte before a download gives up; an attempt that
/// extends the partial file resets the count, so a flaky link still finishes a 2.6 GB archive.
const ATTEMPTS: u32 = 3;
/// Waiting before a retry that follows an attempt without progress (times the failures so far).
const BACKOFF: Duration = Duration::from_millis(250);
/// Connect and per-read limit: a dead server fails the attempt instead of hanging forever.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes between progress reports: a few calls per MB at most.
const PROGRESS_STEP: u64 = 1 << 20;
const BUFFER: usize = 1 << 16;

/// An archive to download and unpack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archive {
    /// Where to download it from (http or https).
    pub url: String,
    /// Its md5, 32 hexadecimal digits.
    pub md5: String,
    /// The name it is stored under in the cache folder.
    pub file_name: String,
    /// The top folder the archive unpacks to; only this folder is kept.
    pub folder: String,
}

impl Archive {
    /// The official archive of a dataset source (`"cifar10"`, `"cifar100"` or `"stl10"`, as in
    /// stages.toml), or `None` for a source that has no download.
    ///
    /// The md5 values are the ones the dataset pages publish (CIFAR: cs.toronto.edu/~kriz/cifar.html,
    /// binary versions; STL-10: as torchvision checks it).
    pub fn official(source: &str) -> Option<Archive> {
        let (url, md5, folder) = match source {
            "cifar10" => (
                "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                "c32a1d4ab5d03f1284b67883e8d87530",
                "cifar-10-batches-bin",
            ),
            "cifar100" => (
                "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                "03b5dce01913d631647c71ecec9e9cb8",
                "cifar-100-binary",
            ),
            "stl10" => (
                "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
                "91f7769df0f17e558f3565bffb0c7dfb",
                "stl10_binary",
            ),
            _ => return None,
        };
        let file_name = url.rsplit('/').next().unwrap_or(url);
        Some(Archive {
            url: url.to_owned(),
            md5: md5.to_owned(),
            file_name: file_name.to_owned(),
            folder: folder.to_owned(),
        })
    }
}

/// The default cache folder: `$LDL_CACHE`, else `$XDG_CACHE_HOME/ldl`, else `~/.cache/ldl`;
/// `None` when none of these variables is set.
pub fn default_cache() -> Option<PathBuf> {
    cache_from(|name| std::env::var_os(name))
}

fn cache_from(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let var = |name| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("LDL_CACHE") {
        return Some(dir);
    }
    // The XDG spec says to ignore a relative value.
    if let Some(dir) = var("XDG_CACHE_HOME").filter(|d| d.is_absolute()) {
        return Some(dir.join("ldl"));
    }
    var("HOME").map(|home| home.join(".cache").join("ldl"))
}

/// Downloads `archive` into `cache` (resuming a partial download left by an earlier call),
/// verifies its md5, unpacks it and returns the unpacked folder `<cache>/<folder>`.
///
/// Idempotent: once the folder carries its marker, a call returns at once without network
/// access. A verified archive already in the cache is unpacked again without downloading when the
/// folder is missing or incomplete. `progress` receives (bytes downloaded, total if known), at
/// most a few times per MB. The downloaded archive is kept in the cache.
pub fn fetch(
    archive: &Archive,
    cache: &Path,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<PathBuf> {
    check(archive)?;
    fs::create_dir_all(cache).map_err(|e| DatasetError::io(cache, e))?;
    let _lock = lock(&cache.join(format!("{}.lock", archive.file_name)))?;
    let folder = cache.join(&archive.folder);
    if is_fetched(&folder, &archive.md5) {
        return Ok(folder);
    }
    let file = cache.join(&archive.file_name);
    // The file only ever appears after its md5 matched; a mismatch now means it was damaged since,
    // and downloading it again is the only repair.
    if file.exists() && !md5_file(&file)?.eq_ignore_ascii_case(&archive.md5) {
        fs::remove_file(&file).map_err(|e| DatasetError::io(&file, e))?;
    }
    if !file.exists() {
        let part = cache.join(format!("{}.part", archive.file_name));
        download(&archive.url, &part, progress)?;
        let actual = md5_file(&part)?;
        if !actual.eq_ignore_ascii_case(&archive.md5) {
            fs::remove_file(&part).map_err(|e| DatasetError::io(&part, e))?;
            return Err(DatasetError::format(
                &archive.url,
                "md5",
                format!(
                    "the download has md5 {actual}, expected {}; it was removed, so the next \
                     fetch downloads it afresh",
                    archive.md5
                ),
            ));
        }
        fs::rename(&part, &file).map_err(|e| DatasetError::io(&file, e))?;
        atomic::sync_dir(cache).map_err(|e| DatasetError::io(cache, e))?;
    }
    unpack(archive, &file, cache)?;
    Ok(folder)
}

/// Refuses names that would place files outside the cache and md5 values that can never match.
fn check(archive: &Archive) -> Result<()> {
    for (what, name) in [
        ("file_name", &archive.file_name),
        ("folder", &archive.folder),
    ] {
        let mut parts = Path::new(name).components();
        if !matches!(
            (parts.next(), parts.next()),
            (Some(Component::Normal(_)), None)
        ) {
            return Err(DatasetError::Param {
                name: "archive",
                message: format!("{what} `{name}` must be a plain file name, without `/` or `..`"),
            });
        }
    }
    if archive.md5.len() != 32 || !archive.md5.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(DatasetError::Param {
            name: "archive",
            message: format!("md5 `{}` must be 32 hexadecimal digits", archive.md5),
        });
    }
    Ok(())
}

fn lock(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| DatasetError::io(path, e))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| DatasetError::io(path, e.into()))?;
    Ok(file)
}

fn is_fetched(folder: &Path, md5: &str) -> bool {
    fs::read_to_string(folder.join(MARKER)).is_ok_and(|m| m.trim().eq_ignore_ascii_case(md5))
}

/// The md5 of a file as lowercase hex, streamed so that multi-GB archives need no memory.
fn md5_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| DatasetError::io(path, e))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DatasetError::io(path, e)),
        }
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Why one download attempt ended early.
enum Failure {
    /// Worth another attempt (a dropped connection, a timeout, a 5xx answer): the message says what
    /// happened.
    Retry(String),
    /// Another attempt would fail the same way (a 404, a full disk).
    Fatal(DatasetError),
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(TIMEOUT))
        .timeout_per_read(Some(TIMEOUT))
        // 206 and 416 are answers this code handles, not errors.
        .http_status_as_error(false)
        // A server that gzip-encodes the transfer of a .tar.gz would make ureq hand over the
        // decompressed tar, whose md5 and byte offsets are not the archive's.
        .accept_encoding("identity")
        .build()
        .into()
}

/// Downloads `url` into `part`, continuing from its current length, until the server has sent
/// everything; fsyncs it. On failure the partial file stays for the next call to resume.
fn download(url: &str, part: &Path, progress: &mut dyn FnMut(u64, Option<u64>)) -> Result<()> {
    let agent = agent();
    let mut buf = vec![0u8; BUFFER];
    let len = |part: &Path| fs::metadata(part).map_or(0, |m| m.len());
    let mut failures = 0;
    loop {
        let before = len(part);
        let message = match attempt(&agent, url, part, before, &mut buf, progress) {
            Ok(()) => break,
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(message)) => message,
        };
        if len(part) > before {
            failures = 0;
            continue;
        }
        failures += 1;
        if failures == ATTEMPTS {
            let kept = match len(part) {
                0 => "nothing was kept".to_owned(),
                n => format!(
                    "the {n} bytes received are kept in {} and the next fetch resumes from there",
                    part.display()
                ),
            };
            return Err(DatasetError::format(
                url,
                "download",
                format!("{message}; gave up after {ATTEMPTS} attempts without progress; {kept}"),
            ));
        }
        std::thread::sleep(BACKOFF * failures);
    }
    let file = File::open(part).map_err(|e| DatasetError::io(part, e))?;
    file.sync_all().map_err(|e| DatasetError::io(part, e))
}

/// One GET: resumes at byte `start` of `part` when it is not zero.
fn attempt(
    agent: &ureq::Agent,
    url: &str,
    part: &Path,
    start: u64,
    buf: &mut [u8],
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> std::result::Result<(), Failure> {
    let mut request = agent.get(url);
    if start > 0 {
        request = request.header("Range", format!("bytes={start}-"));
    }
    let mut response = request.call().map_err(|e| classify(url, e))?;
    let status = response.status().as_u16();
    let length = response.body().content_length();
    let fatal = |message: String| Failure::Fatal(DatasetError::format(url, "GET", message));
    let (offset, total) = match status {
        200 => (0, length),
        206 => {
            let range = response
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .and_then(content_range);
            match range {
                Some((first, _)) if first > start => {
                    return Err(fatal(format!(
                        "asked for the bytes from {start} on, the server sent them from {first}"
                    )))
                }
                Some((first, total)) => (first, total.or(length.map(|l| first + l))),
                None => (start, length.map(|l| start + l)),
            }
        }
        // The range starts at or past the end: the partial file already holds every byte, and the
        // md5 check that follows catches one that is too long.
        416 if start > 0 => {
            progress(start, Some(start));
            return Ok(());
        }
        500..=599 => return Err(Failure::Retry(format!("the server answered {status}"))),
        _ => {
            return Err(fatal(format!(
                "the server answered {status} {}, expected 200 or 206 with the archive; is the \
                 URL right?",
                response.status().canonical_reason().unwrap_or("")
            )))
        }
    };
    let io_fatal = |e: io::Error| Failure::Fatal(DatasetError::io(part, e));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(part)
        .map_err(io_fatal)?;
    // A 200 answer restarts from zero; a 206 answer may start before the end of the file.
    file.set_len(offset).map_err(io_fatal)?;
    file.seek(SeekFrom::Start(offset)).map_err(io_fatal)?;
    progress(offset, total);
    let mut reader = response.body_mut().as_reader();
    let (mut done, mut reported) = (offset, offset);
    loop {
        let n = match reader.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Failure::Retry(format!(
                    "the connection failed after byte {done}: {e}"
                )))
            }
        };
        file.write_all(&buf[..n]).map_err(io_fatal)?;
        done += n as u64;
        if done - reported >= PROGRESS_STEP {
            progress(done, total);
            reported = done;
        }
    }
    if reported != done {
        progress(done, total);
    }
    match total {
        Some(total) if done != total => Err(Failure::Retry(format!(
            "the connection closed after byte {done} of {total}"
        ))),
        _ => Ok(()),
    }
}

fn classify(url: &str, e: ureq::Error) -> Failure {
    use ureq::Error as E;
    match e {
        E::Io(_) | E::Timeout(_) | E::ConnectionFailed | E::HostNotFound | E::Protocol(_) => {
            Failure::Retry(e.to_string())
        }
        _ => Failure::Fatal(DatasetError::format(url, "GET", e.to_string())),
    }
}

/// Parses `bytes FIRST-LAST/TOTAL` (TOTAL may be `*`) into FIRST and TOTAL.
fn content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let (range, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (first, _) = range.split_once('-')?;
    Some((first.trim().parse().ok()?, total.trim().parse().ok()))
}

/// Unpacks `file` into a staging folder inside `cache`, writes the marker into `<folder>` and
/// renames it into place, replacing an incomplete folder left by an earlier run.
fn unpack(archive: &Archive, file: &Path, cache: &Path) -> Result<()> {
    let staging = cache.join(format!(".{}.unpack", archive.folder));
    // Left by a killed unpack; the lock guarantees no other process is using it.
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(|e| DatasetError::io(&staging, e))?;
    }
    fs::create_dir(&staging).map_err(|e| DatasetError::io(&staging, e))?;
    let result = (|| {
        extract(file, &staging)?;
        let unpacked = staging.join(&archive.folder);
        if !unpacked.is_dir() {
            return Err(DatasetError::format(
                file,
                "contents",
                format!(
                    "no top folder `{}`; expected the archive to unpack to it",
                    archive.folder
                ),
            ));
        }
        atomic::write_bytes(
            &unpacked.join(MARKER),
            format!("{}\n", archive.md5).as_bytes(),
        )?;
        atomic::replace_dir(&unpacked, &cache.join(&archive.folder))
    })();
    // Whatever the archive held outside its top folder goes with the staging folder.
    let cleanup = fs::remove_dir_all(&staging).map_err(|e| DatasetError::io(&staging, e));
    result.and(cleanup)
}

/// Extracts the regular files and folders of a tar.gz under `dest`, fsyncing them so that the
/// marker written afterwards never outlives their contents. Entries that could write outside
/// `dest` (absolute paths, `..`, links) are refused.
fn extract(file: &Path, dest: &Path) -> Result<()> {
    let bad = |place: String, e: io::Error| DatasetError::format(file, place, e.to_string());
    let reader = File::open(file).map_err(|e| DatasetError::io(file, e))?;
    let gz = flate2::read::GzDecoder::new(io::BufReader::with_capacity(1 << 20, reader));
    let mut tar = tar::Archive::new(gz);
    let mut buf = vec![0u8; BUFFER];
    let mut dirs = BTreeSet::new();
    for entry in tar.entries().map_err(|e| bad("tar header".into(), e))? {
        let mut entry = entry.map_err(|e| bad("tar entry".into(), e))?;
        let name = entry
            .path()
            .map_err(|e| bad("tar entry name".into(), e))?
            .into_owned();
        let place = || format!("entry `{}`", name.display());
        if name
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(DatasetError::format(
                file,
                place(),
                "an absolute path or `..` would write outside the cache folder; refused",
            ));
        }
        let kind = entry.header().entry_type();
        let target = dest.join(&name);
        if kind.is_pax_global_extensions() || target == dest {
            continue;
        }
        if kind.is_dir() {
            fs::create_dir_all(&target).map_err(|e| DatasetError::io(&target, e))?;
            dirs.insert(target);
            continue;
        }
        if !(kind.is_file() || kind.is_gnu_sparse()) {
            return Err(DatasetError::format(
                file,
                place(),
                format!("a {kind:?} entry; only files and folders are expected; refused"),
            ));
        }
        let parent = target.parent().unwrap_or(dest).to_path_buf();
        fs::create_dir_all(&parent).map_err(|e| DatasetError::io(&parent, e))?;
        dirs.insert(parent);
        let mut out = File::create(&target).map_err(|e| DatasetError::io(&target, e))?;
        loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(bad(place(), e)),
            };
            out.write_all(&buf[..n])
                .map_err(|e| DatasetError::io(&target, e))?;
        }
        out.sync_all().map_err(|e| DatasetError::io(&target, e))?;
    }
    for dir in &dirs {
        atomic::sync_dir(dir).map_err(|e| DatasetError::io(dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses_known_and_unknown_totals() {
        assert_eq!(content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(content_range("bytes */200"), None);
        assert_eq!(content_range("items 1-2/3"), None);
    }

    #[test]
    fn cache_folder_follows_the_variables_in_order() {
        fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
            move |name| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        }
        let all = [
            ("LDL_CACHE", "/c"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(cache_from(env(&all)), Some(PathBuf::from("/c")));
        assert_eq!(cache_from(env(&all[1..])), Some(PathBuf::from("/x/ldl")));
        assert_eq!(
            cache_from(env(&[("XDG_CACHE_HOME", "rel"), ("HOME", "/h")])),
            Some(PathBuf::from("/h/.cache/ldl"))
        );
        assert_eq!(
            cache_from(env(&[("LDL_CACHE", ""), ("HOME", "/h")])),
            Some(PathBuf::from("/h/.cache/ldl"))
        );
        assert_eq!(cache_from(env(&[])), None);
    }

    #[test]
    fn official_archives_and_name_checks() {
        let a = Archive::official("cifar10").unwrap();
        assert_eq!(a.file_name, "cifar-10-binary.tar.gz");
        assert_eq!(a.folder, "cifar-10-batches-bin");
        assert!(check(&a).is_ok());
        for s in ["cifar100", "stl10"] {
            assert!(check(&Archive::official(s).unwrap()).is_ok());
        }
        assert!(Archive::official("synthetic").is_none());
        let bad = Archive {
            folder: "../x".into(),
            ..a.clone()
        };
        assert!(check(&bad).unwrap_err().to_string().contains("../x"));
        let bad = Archive {
            md5: "abc".into(),
            ..a
        };
        assert!(check(&bad)
            .unwrap_err()
            .to_string()
            .contains("32 hexadecimal"));
    }
}
