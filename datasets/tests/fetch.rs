//! The archive download against a tiny HTTP/1.1 server on 127.0.0.1: fresh fetch and offline
//! second fetch, resume after a dropped connection and from an existing partial file, a server
//! that ignores ranges, a wrong md5, a 404, and archives that try to write outside the cache.

use datasets::fetch::{fetch, Archive, MARKER};
use md5::{Digest, Md5};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const PATH: &str = "/archive.tar.gz";
const FOLDER: &str = "cifar-10-batches-bin";
const NAMES: &[u8] = b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n";

/// How the server answers.
#[derive(Clone, Copy, Default)]
struct Behaviour {
    /// Answer `Range: bytes=N-` with 206 (or 416 past the end); otherwise always 200 and the
    /// whole body.
    honour_range: bool,
    /// Close the connection after this many body bytes, having announced the full length ...
    cut_at: Option<usize>,
    /// ... on the first this many requests.
    cuts: usize,
}

/// A running server and the `Range` header (if any) of every request it saw, in order.
struct Server {
    url: String,
    seen: Arc<Mutex<Vec<Option<String>>>>,
}

impl Server {
    fn start(body: Vec<u8>, behaviour: Behaviour) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}{PATH}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        // Detached: it dies with the test process.
        std::thread::spawn(move || {
            for (i, stream) in listener.incoming().enumerate() {
                let cut = behaviour.cut_at.filter(|_| i < behaviour.cuts);
                let _ = answer(stream.unwrap(), &body, behaviour, cut, &log);
            }
        });
        Server { url, seen }
    }

    fn requests(&self) -> Vec<Option<String>> {
        self.seen.lock().unwrap().clone()
    }
}

fn answer(
    mut stream: TcpStream,
    body: &[u8],
    behaviour: Behaviour,
    cut: Option<usize>,
    log: &Mutex<Vec<Option<String>>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut range = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_owned());
            }
        }
    }
    log.lock().unwrap().push(range.clone());
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let len = body.len();
    let start = range
        .as_deref()
        .and_then(|r| {
            r.strip_prefix("bytes=")?
                .strip_suffix('-')?
                .parse::<usize>()
                .ok()
        })
        .filter(|_| behaviour.honour_range);
    let (head, sent) = if path != PATH {
        ("404 Not Found".to_owned(), &b"not found"[..])
    } else {
        match start {
            Some(s) if s >= len => (
                format!("416 Range Not Satisfiable\r\nContent-Range: bytes */{len}"),
                &b""[..],
            ),
            Some(s) => (
                format!(
                    "206 Partial Content\r\nContent-Range: bytes {s}-{}/{len}",
                    len - 1
                ),
                &body[s..],
            ),
            None => ("200 OK".to_owned(), body),
        }
    };
    write!(
        stream,
        "HTTP/1.1 {head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        sent.len()
    )?;
    stream.write_all(&sent[..cut.unwrap_or(sent.len()).min(sent.len())])?;
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Write)
}

/// A gzipped tar of `(name, contents)` files, names written raw into the header so that the test
/// can build entries the tar crate's builder would refuse (`..`, absolute paths).
fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut builder = tar::Builder::new(gz);
    let mut dir = tar::Header::new_gnu();
    dir.as_old_mut().name[..FOLDER.len() + 1].copy_from_slice(format!("{FOLDER}/").as_bytes());
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    dir.set_cksum();
    builder.append(&dir, &[][..]).unwrap();
    for (name, data) in files {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

/// 20 CIFAR-10 records of pseudo-random bytes, so that the archive does not compress to nothing.
fn batch() -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..20 * 3073)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 56) as u8
        })
        .collect()
}

fn good_archive() -> Vec<u8> {
    let batch = batch();
    tar_gz(&[
        (&format!("{FOLDER}/batches.meta.txt"), NAMES),
        (&format!("{FOLDER}/data_batch_1.bin"), &batch),
    ])
}

fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn archive(server: &Server, md5: &str) -> Archive {
    Archive {
        url: server.url.clone(),
        md5: md5.to_owned(),
        file_name: "test.tar.gz".to_owned(),
        folder: FOLDER.to_owned(),
    }
}

fn quiet(_: u64, _: Option<u64>) {}

/// Checks the unpacked folder byte for byte, marker included.
fn assert_unpacked(folder: &Path, md5: &str) {
    assert_eq!(
        std::fs::read(folder.join("batches.meta.txt")).unwrap(),
        NAMES
    );
    assert_eq!(
        std::fs::read(folder.join("data_batch_1.bin")).unwrap(),
        batch()
    );
    assert_eq!(
        std::fs::read_to_string(folder.join(MARKER)).unwrap().trim(),
        md5
    );
}

/// Every path under `root`, relative to it, sorted.
fn tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(root).unwrap().to_path_buf());
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn fresh_fetch_unpacks_exactly_and_a_second_fetch_stays_offline() {
    let body = good_archive();
    let md5 = md5_hex(&body);
    let server = Server::start(body.clone(), Behaviour::default());
    let cache = tempfile::tempdir().unwrap();
    let mut calls = Vec::new();
    let folder = fetch(&archive(&server, &md5), cache.path(), &mut |d, t| {
        calls.push((d, t))
    })
    .unwrap();
    assert_eq!(folder, cache.path().join(FOLDER));
    assert_unpacked(&folder, &md5);
    assert_eq!(
        std::fs::read(cache.path().join("test.tar.gz")).unwrap(),
        body
    );
    assert!(!cache.path().join("test.tar.gz.part").exists());
    let len = body.len() as u64;
    assert_eq!(calls.first(), Some(&(0, Some(len))));
    assert_eq!(calls.last(), Some(&(len, Some(len))));
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
    assert_eq!(server.requests(), vec![None]);

    let again = fetch(&archive(&server, &md5), cache.path(), &mut quiet).unwrap();
    assert_eq!(again, folder);
    assert_eq!(server.requests().len(), 1, "the second fetch went online");
}

#[test]
fn a_dropped_connection_is_resumed_with_a_range_request() {
    let body = good_archive();
    let md5 = md5_hex(&body);
    let half = body.len() / 2;
    let server = Server::start(
        body.clone(),
        Behaviour {
            honour_range: true,
            cut_at: Some(half),
            cuts: 1,
        },
    );
    let cache = tempfile::tempdir().unwrap();
    let folder = fetch(&archive(&server, &md5), cache.path(), &mut quiet).unwrap();
    assert_unpacked(&folder, &md5);
    assert_eq!(
        server.requests(),
        vec![None, Some(format!("bytes={half}-"))]
    );
}

#[test]
fn an_existing_part_file_is_resumed_from_its_length() {
    let body = good_archive();
    let md5 = md5_hex(&body);
    let server = Server::start(
        body.clone(),
        Behaviour {
            honour_range: true,
            ..Behaviour::default()
        },
    );
    let cache = tempfile::tempdir().unwrap();
    let k = 1000;
    std::fs::write(cache.path().join("test.tar.gz.part"), &body[..k]).unwrap();
    let folder = fetch(&archive(&server, &md5), cache.path(), &mut quiet).unwrap();
    assert_unpacked(&folder, &md5);
    assert_eq!(server.requests(), vec![Some(format!("bytes={k}-"))]);
}

#[test]
fn a_complete_part_file_answered_416_is_verified_and_used() {
    let body = good_archive();
    let md5 = md5_hex(&body);
    let server = Server::start(
        body.clone(),
        Behaviour {
            honour_range: true,
            ..Behaviour::default()
        },
    );
    let cache = tempfile::tempdir().unwrap();
    std::fs::write(cache.path().join("test.tar.gz.part"), &body).unwrap();
    let folder = fetch(&archive(&server, &md5), cache.path(), &mut quiet).unwrap();
    assert_unpacked(&folder, &md5);
    assert_eq!(
        server.requests(),
        vec![Some(format!("bytes={}-", body.len()))]
    );
}

#[test]
fn a_server_ignoring_ranges_restarts_from_zero() {
    let body = good_archive();
    let md5 = md5_hex(&body);
    let server = Server::start(body.clone(), Behaviour::default());
    let cache = tempfile::tempdir().unwrap();
    // Not a prefix of the archive: resuming onto it would fail the md5 check.
    std::fs::write(cache.path().join("test.tar.gz.part"), vec![0xAB; 777]).unwrap();
    let folder = fetch(&archive(&server, &md5), cache.path(), &mut quiet).unwrap();
    assert_unpacked(&folder, &md5);
    assert_eq!(server.requests(), vec![Some("bytes=777-".to_owned())]);
    assert_eq!(
        std::fs::read(cache.path().join("test.tar.gz")).unwrap(),
        body
    );
}

#[test]
fn repeated_drops_give_up_and_keep_the_part_file() {
    let body = good_archive();
    let half = body.len() / 2;
    let server = Server::start(
        body.clone(),
        Behaviour {
            honour_range: false,
            cut_at: Some(half),
            cuts: usize::MAX,
        },
    );
    let cache = tempfile::tempdir().unwrap();
    let err = fetch(&archive(&server, &md5_hex(&body)), cache.path(), &mut quiet)
        .unwrap_err()
        .to_string();
    let part = cache.path().join("test.tar.gz.part");
    assert!(err.contains(&server.url), "{err}");
    assert!(err.contains("gave up after 3 attempts"), "{err}");
    assert!(err.contains(&part.display().to_string()), "{err}");
    assert_eq!(std::fs::read(&part).unwrap(), &body[..half]);
    // One attempt that made progress, then three that did not.
    assert_eq!(server.requests().len(), 4);
    assert!(!cache.path().join(FOLDER).exists());
}

#[test]
fn a_wrong_md5_leaves_no_file_and_no_folder() {
    let body = good_archive();
    let actual = md5_hex(&body);
    let expected = "0123456789abcdef0123456789abcdef";
    let server = Server::start(body, Behaviour::default());
    let cache = tempfile::tempdir().unwrap();
    let err = fetch(&archive(&server, expected), cache.path(), &mut quiet)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&server.url), "{err}");
    assert!(err.contains(expected) && err.contains(&actual), "{err}");
    assert_eq!(tree(cache.path()), vec![PathBuf::from("test.tar.gz.lock")]);
}

#[test]
fn a_missing_archive_names_the_url_and_the_status() {
    let body = good_archive();
    let md5 = md5_hex(&body);
    let server = Server::start(body, Behaviour::default());
    let mut missing = archive(&server, &md5);
    missing.url = server.url.replace(PATH, "/nothing-here.tar.gz");
    let cache = tempfile::tempdir().unwrap();
    let err = fetch(&missing, cache.path(), &mut quiet)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&missing.url) && err.contains("404"), "{err}");
    assert_eq!(server.requests().len(), 1, "a 404 is not retried");
    assert_eq!(tree(cache.path()), vec![PathBuf::from("test.tar.gz.lock")]);
}

#[test]
fn entries_escaping_the_cache_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let absolute = root.path().join("absolute-evil");
    for evil in [
        "../evil".to_owned(),
        "../../evil".to_owned(),
        format!("{FOLDER}/../../../evil"),
        absolute.display().to_string(),
    ] {
        let body = tar_gz(&[
            (&format!("{FOLDER}/batches.meta.txt"), NAMES),
            (&evil, b"gotcha"),
        ]);
        let md5 = md5_hex(&body);
        let server = Server::start(body, Behaviour::default());
        let cache = root.path().join("cache");
        let err = fetch(&archive(&server, &md5), &cache, &mut quiet)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&evil) && err.contains("refused"), "{err}");
        assert_eq!(
            tree(root.path()),
            ["cache", "cache/test.tar.gz", "cache/test.tar.gz.lock"]
                .map(PathBuf::from)
                .to_vec(),
            "{evil}"
        );
        std::fs::remove_dir_all(&cache).unwrap();
    }
}

#[test]
fn a_folder_without_its_marker_is_unpacked_again_offline() {
    let body = good_archive();
    let md5 = md5_hex(&body);
    let server = Server::start(body, Behaviour::default());
    let cache = tempfile::tempdir().unwrap();
    let folder = fetch(&archive(&server, &md5), cache.path(), &mut quiet).unwrap();
    // What a copy interrupted by hand, or an unpack by another tool, would leave.
    std::fs::remove_file(folder.join(MARKER)).unwrap();
    std::fs::write(folder.join("data_batch_1.bin"), b"truncated").unwrap();
    std::fs::write(folder.join("stray"), b"x").unwrap();
    let again = fetch(&archive(&server, &md5), cache.path(), &mut quiet).unwrap();
    assert_unpacked(&again, &md5);
    assert!(!again.join("stray").exists());
    assert_eq!(
        server.requests().len(),
        1,
        "the kept archive was downloaded again"
    );
}

#[test]
fn official_archives_are_known_by_source_name() {
    let a = Archive::official("cifar100").unwrap();
    assert_eq!(
        a.url,
        "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
    );
    assert_eq!(a.file_name, "cifar-100-binary.tar.gz");
    assert_eq!(a.folder, "cifar-100-binary");
    assert_eq!(Archive::official("stl10").unwrap().folder, "stl10_binary");
    assert!(Archive::official("imagefolder").is_none());
}
