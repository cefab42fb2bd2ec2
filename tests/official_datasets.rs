//! Preparing the official dataset layouts (fixtures written here) through the binary: CIFAR-10
//! byte-exactly and trained on (with Cutout and CutMix), a damaged CIFAR file refused, STL-10's
//! column-major planes, an ImageFolder tree, and CIFAR-10 fetched from a local HTTP server.

mod common;
use common::*;
use datasets::PackedStore;

/// Writes a CIFAR-10 fixture: `n` records per file, record i of file f labelled (f + i) mod 10,
/// pixel p of it equal to (7·i + p) mod 256.
fn fixture(dir: &std::path::Path, n: usize) {
    let names: String = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    .iter()
    .map(|c| format!("{c}\n"))
    .collect();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("batches.meta.txt"), names).unwrap();
    for (f, file) in ["data_batch_1.bin", "test_batch.bin"].iter().enumerate() {
        let mut bytes = Vec::new();
        for i in 0..n {
            bytes.push(((f + i) % 10) as u8);
            bytes.extend((0..3072).map(|p| ((7 * i + p) % 256) as u8));
        }
        std::fs::write(dir.join(file), bytes).unwrap();
    }
}

const CONFIG: &str = r#"
[run]
output = "out"

[[stage]]
name = "cifar"
kind = "prepare"
source = "cifar10"
path = "cifar-10-batches-bin"
batches = [1]

[[stage]]
name = "model"
kind = "train"
needs = ["cifar"]
model = "resnet8"
width = 4
method = "vanilla"
epochs = 1
batch_size = 16
cutout = 16
mix = { type = "cutmix", p = 1.0 }
"#;

#[test]
fn prepares_cifar10_byte_exactly_and_trains_on_it() {
    let dir = scratch();
    fixture(&dir.path().join("cifar-10-batches-bin"), 40);
    write(dir.path(), "c.toml", CONFIG);
    let o = pipeline(dir.path(), &["run", "c.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let train = PackedStore::open(&dir.path().join("out/cifar/train.pack")).unwrap();
    assert_eq!(
        (
            train.len(),
            train.info().k(),
            train.info().h,
            train.info().w
        ),
        (40, 10, 32, 32)
    );
    assert_eq!(train.info().classes[9], "truck");
    assert_eq!(train.label(13), 3);
    // Record 13: R plane (row 1, col 2) is byte 32 + 2; B plane byte 2048 + 5.
    assert_eq!(train.image(13)[32 + 2], (7 * 13 + 34) as u8); // 125 < 256: no wrap
    assert_eq!(train.image(13)[2048 + 5], ((7 * 13 + 2053) % 256) as u8);
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out/cifar/dataset.json")).unwrap())
            .unwrap();
    assert_eq!(
        info["normalize"]["mean"][0].as_f64().unwrap() as f32,
        0.4914
    );
    assert_eq!(
        info["train"]["class_counts"],
        serde_json::json!(vec![4; 10])
    );
    assert!(dir.path().join("out/model/model.safetensors").exists());
}

#[test]
fn a_damaged_cifar_file_is_refused_with_its_name_and_record() {
    let dir = scratch();
    let data = dir.path().join("cifar-10-batches-bin");
    fixture(&data, 5);
    let mut bytes = std::fs::read(data.join("data_batch_1.bin")).unwrap();
    bytes[2 * 3073] = 12;
    std::fs::write(data.join("data_batch_1.bin"), &bytes).unwrap();
    write(dir.path(), "c.toml", CONFIG);
    let o = pipeline(dir.path(), &["run", "c.toml"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("data_batch_1.bin")
            && e.contains("record 2 (byte 6146)")
            && e.contains("label 12 is outside 0..10"),
        "{e}"
    );
    assert!(
        !dir.path().join("out/cifar").exists() && !dir.path().join("out/.cifar.partial").exists()
    );
}

#[test]
fn a_moved_dataset_reruns_nothing_and_one_changed_in_place_reruns_its_stages() {
    let dir = scratch();
    fixture(&dir.path().join("cifar-10-batches-bin"), 20);
    write(dir.path(), "c.toml", CONFIG);
    let o = pipeline(dir.path(), &["run", "c.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let state = |name: &str| {
        let o = pipeline(dir.path(), &["status", "c.toml"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        let line = out
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .to_string();
        line
    };
    // Moved to another folder (and renamed): both stages stay up to date.
    std::fs::rename(
        dir.path().join("cifar-10-batches-bin"),
        dir.path().join("moved"),
    )
    .unwrap();
    let moved = CONFIG.replace("cifar-10-batches-bin", "moved");
    write(dir.path(), "c.toml", &moved);
    assert!(state("cifar").contains("up to date"), "{}", state("cifar"));
    assert!(state("model").contains("up to date"), "{}", state("model"));
    let record = |stage: &str| -> serde_json::Value {
        let p = dir.path().join("out").join(stage).join("stage.json");
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    // While another process holds the stage's claim (it may be re-running it with --force),
    // the record is left to that process.
    let claim = std::fs::File::open(dir.path().join("out/.locks/cifar.lock")).unwrap();
    claim.lock().unwrap();
    let o = pipeline(dir.path(), &["run", "c.toml"]);
    assert!(stderr(&o).contains("0 stage(s) run"), "{}", stderr(&o));
    assert_eq!(record("cifar")["params"]["path"], "cifar-10-batches-bin");
    drop(claim);
    // A run skips both, and the record names where the data is now.
    let o = pipeline(dir.path(), &["run", "c.toml"]);
    assert!(stderr(&o).contains("0 stage(s) run"), "{}", stderr(&o));
    assert_eq!(record("cifar")["params"]["path"], "moved");
    // One pixel changed in place, length unchanged: the source's digest says so.
    let file = dir.path().join("moved/data_batch_1.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let cifar = state("cifar");
    assert!(
        cifar.contains("stale") && cifar.contains("`source_digest`") && !cifar.contains("`path`"),
        "{cifar}"
    );
    assert!(state("model").contains("stale"), "{}", state("model"));
    let o = pipeline(dir.path(), &["run", "c.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("2 stage(s) run"), "{}", stderr(&o));
    let train = PackedStore::open(&dir.path().join("out/cifar/train.pack")).unwrap();
    assert_eq!(train.image(0)[99], bytes[100]);
    // The digests a `--jobs` parent or a Slurm script hands down are used as given (the
    // sbatch script exports them), and a prepare stage checks them against its files.
    pipeline(dir.path(), &["clean", "c.toml", "model"]);
    let o = pipeline(dir.path(), &["submit", "c.toml", "--slurm", "--dry-run"]);
    let script = stdout(&o);
    assert!(
        script.contains("export LDL_SOURCE_DIGESTS='{\"cifar\":\"blake3:"),
        "{script}"
    );
    let bogus = format!("{{\"cifar\": \"blake3:{}\"}}", "0".repeat(64));
    let handed = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
            .args(args)
            .current_dir(dir.path())
            .env("LDL_CACHE", dir.path().join(".ldl-cache"))
            .env("LDL_SOURCE_DIGESTS", &bogus)
            .output()
            .unwrap()
    };
    let o = handed(&["status", "c.toml"]);
    assert!(stdout(&o).contains("`source_digest`"), "{}", stdout(&o));
    let o = handed(&["run", "c.toml", "--only", "cifar"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("changed since stages.toml was read"),
        "{}",
        stderr(&o)
    );
    assert!(state("cifar").contains("up to date"), "{}", state("cifar"));
    let o = pipeline(dir.path(), &["run", "c.toml"]);
    assert!(
        stderr(&o).contains("1 stage(s) run, 1 up to date"),
        "{}",
        stderr(&o)
    );
    // Gone (deleted after packing, or not visible from this node): the digest its last run
    // recorded for this `path` is kept, so nothing is stale; a forced run fails naming the file.
    std::fs::remove_dir_all(dir.path().join("moved")).unwrap();
    assert!(state("cifar").contains("up to date"), "{}", state("cifar"));
    assert!(state("model").contains("up to date"), "{}", state("model"));
    let o = pipeline(dir.path(), &["run", "c.toml", "--force", "cifar"]);
    let e = stderr(&o);
    assert!(e.contains("keeps the digest its last run recorded"), "{e}");
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("moved/batches.meta.txt"), "{e}");
    assert!(dir.path().join("out/cifar/train.pack").exists());
    // Unreadable at another `path`: identified by that path, so stale, and failing if run.
    write(
        dir.path(),
        "c.toml",
        &CONFIG.replace("cifar-10-batches-bin", "elsewhere"),
    );
    assert!(state("cifar").contains("stale"), "{}", state("cifar"));
    let o = pipeline(dir.path(), &["run", "c.toml"]);
    let e = stderr(&o);
    assert!(e.contains("identified by its `path`"), "{e}");
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("elsewhere/batches.meta.txt"), "{e}");
}

/// A prepare stage finished before source digests existed (its record identifies it by `path`,
/// without `source_digest`) stays up to date, and so does what follows it: upgrading reruns
/// nothing. Its records are rewritten here as that version wrote them.
#[test]
fn a_prepare_finished_before_source_digests_stays_up_to_date() {
    let dir = scratch();
    fixture(&dir.path().join("cifar-10-batches-bin"), 20);
    let file = write(dir.path(), "c.toml", CONFIG);
    let o = pipeline(dir.path(), &["run", "c.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The fingerprints the earlier version computed: `path` in place of the digest.
    let mut config = pipeline::config::load(&file, None).unwrap();
    if let stages::StageParams::Prepare(p) = &mut config.stages[0].params {
        assert!(p.source_digest.starts_with("blake3:"));
        p.source_digest.clear();
    }
    let fps = pipeline::runner::fingerprints(&config);
    let out = dir.path().join("out");
    let edit = |stage: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let p = out.join(stage).join("stage.json");
        let mut r: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        f(&mut r);
        std::fs::write(&p, serde_json::to_vec_pretty(&r).unwrap()).unwrap();
    };
    edit("cifar", &|r| {
        r["params"].as_object_mut().unwrap().remove("source_digest");
        r["fingerprint"] = fps[0].clone().into();
    });
    edit("model", &|r| {
        r["fingerprint"] = fps[1].clone().into();
        r["inputs"]["cifar"] = fps[0].clone().into();
    });
    let o = pipeline(dir.path(), &["status", "c.toml", "--exit-code"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    // Forced, it packs again under the same identity: what follows stays up to date.
    let o = pipeline(dir.path(), &["run", "c.toml", "--force", "cifar"]);
    assert!(
        stderr(&o).contains("1 stage(s) run, 1 up to date"),
        "{}",
        stderr(&o)
    );
    assert!(out.join("cifar/records.parquet").exists());
    // Cleaned, it is identified by its digest: it and what follows run again.
    let o = pipeline(dir.path(), &["clean", "c.toml", "cifar"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = pipeline(dir.path(), &["status", "c.toml"]);
    assert!(stdout(&o).contains("stale"), "{}", stdout(&o));
}

#[test]
fn prepares_stl10_transposing_its_column_major_planes() {
    let dir = scratch();
    let data = dir.path().join("stl10_binary");
    std::fs::create_dir_all(&data).unwrap();
    let names: String = (0..10).map(|i| format!("class{i}\n")).collect();
    std::fs::write(data.join("class_names.txt"), names).unwrap();
    for (split, n) in [("train", 2usize), ("test", 1)] {
        // Byte at column x, row y of plane c of image i (column-major) = (i + c + 2y + x) mod 256.
        let mut x = vec![0u8; n * 3 * 96 * 96];
        for i in 0..n {
            for c in 0..3 {
                for col in 0..96 {
                    for row in 0..96 {
                        x[((i * 3 + c) * 96 + col) * 96 + row] =
                            ((i + c + 2 * row + col) % 256) as u8;
                    }
                }
            }
        }
        std::fs::write(data.join(format!("{split}_X.bin")), x).unwrap();
        std::fs::write(data.join(format!("{split}_y.bin")), vec![10u8; n]).unwrap();
    }
    write(
        dir.path(),
        "s.toml",
        "[run]\noutput = \"out\"\n[[stage]]\nname = \"stl\"\nkind = \"prepare\"\nsource = \"stl10\"\npath = \"stl10_binary\"\n",
    );
    let o = pipeline(dir.path(), &["run", "s.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let train = PackedStore::open(&dir.path().join("out/stl/train.pack")).unwrap();
    assert_eq!(
        (train.len(), train.info().h, train.info().w, train.label(1)),
        (2, 96, 96, 9)
    );
    // Image 1, channel 2, row 40, column 3, read row-major from the store.
    assert_eq!(
        train.image(1)[2 * 9216 + 40 * 96 + 3],
        (1 + 2 + 80 + 3) as u8 // 86 < 256: no wrap
    );
}

#[test]
fn prepares_an_image_folder_in_sorted_class_order() {
    use image::{Rgb, RgbImage};
    let dir = scratch();
    let root = dir.path().join("images");
    let save = |rel: &str, img: &RgbImage| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        img.save(&p).unwrap();
    };
    // 8×6 images: the shorter side 6 becomes 4 (8 becomes 5), then the centre 4×4 is kept.
    let solid = |v: u8| RgbImage::from_pixel(8, 6, Rgb([v, 255 - v, 9]));
    save("train/cat/1.png", &solid(10));
    save("train/cat/2.png", &solid(20));
    save("train/ant/1.PNG", &solid(30));
    save("val/ant/1.png", &solid(40));
    write(
        dir.path(),
        "f.toml",
        "[run]\noutput = \"out\"\n[[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"imagefolder\"\npath = \"images\"\nimage_size = 4\n",
    );
    let o = pipeline(dir.path(), &["run", "f.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let train = PackedStore::open(&dir.path().join("out/data/train.pack")).unwrap();
    assert_eq!(train.info().classes, ["ant", "cat"]);
    assert_eq!((train.len(), train.info().h, train.info().w), (3, 4, 4));
    assert_eq!(
        (0..3).map(|i| train.label(i)).collect::<Vec<_>>(),
        [0, 1, 1]
    );
    // Solid colours survive resizing exactly: R, G and B planes of image 1 (cat/1.png).
    let img = train.image(1);
    assert!(img[..16].iter().all(|p| *p == 10), "{img:?}");
    assert!(img[16..32].iter().all(|p| *p == 245));
    assert!(img[32..].iter().all(|p| *p == 9));
    let test = PackedStore::open(&dir.path().join("out/data/test.pack")).unwrap();
    assert_eq!((test.len(), test.label(0), test.image(0)[0]), (1, 0, 40));
    // records.parquet names each packed image's file.
    let rows = records(&dir.path().join("out/data/records.parquet"));
    let named: Vec<(&str, u32, u32, Option<&str>)> = rows
        .iter()
        .map(|(s, i, r, f)| (s.as_str(), *i, *r, f.as_deref()))
        .collect();
    assert_eq!(
        named,
        [
            ("train", 0, 0, Some("train/ant/1.PNG")),
            ("train", 1, 1, Some("train/cat/1.png")),
            ("train", 2, 2, Some("train/cat/2.png")),
            ("test", 0, 0, Some("val/ant/1.png")),
        ]
    );
}

/// Serves `body` at any path over HTTP/1.1 on 127.0.0.1, counting the requests.
fn serve(body: Vec<u8>) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            counter.fetch_add(1, Ordering::SeqCst);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    (format!("http://{addr}/cifar-10-binary.tar.gz"), hits)
}

#[test]
fn fetches_cifar10_from_a_mirror_once_and_prepares_it() {
    use md5::Digest;
    use std::sync::atomic::Ordering;
    let dir = scratch();
    let src = dir.path().join("src/cifar-10-batches-bin");
    fixture(&src, 6);
    let mut archive = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    archive
        .append_dir_all("cifar-10-batches-bin", &src)
        .unwrap();
    let body = archive.into_inner().unwrap().finish().unwrap();
    let md5: String = md5::Md5::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (url, hits) = serve(body);
    let config = |out: &str, md5: &str| {
        format!(
            "[run]\noutput = \"{out}\"\n[[stage]]\nname = \"cifar\"\nkind = \"prepare\"\nsource = \"cifar10\"\nbatches = [1]\nfetch = true\ncache = \"cache\"\nurl = \"{url}\"\nmd5 = \"{md5}\"\n"
        )
    };
    write(dir.path(), "a.toml", &config("out-a", &md5));
    let o = pipeline(dir.path(), &["run", "a.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let train = PackedStore::open(&dir.path().join("out-a/cifar/train.pack")).unwrap();
    assert_eq!((train.len(), train.label(3)), (6, 3));
    assert_eq!(train.image(3)[100], (7 * 3 + 100) as u8); // 121 < 256: no wrap
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // Another output root reuses the unpacked archive: no second download.
    write(dir.path(), "b.toml", &config("out-b", &md5));
    let o = pipeline(dir.path(), &["run", "b.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // A wrong checksum is refused, naming the address and both sums.
    let wrong = "0123456789abcdef0123456789abcdef";
    write(
        dir.path(),
        "c.toml",
        &config("out-c", wrong).replace("cache = \"cache\"", "cache = \"cache2\""),
    );
    let o = pipeline(dir.path(), &["run", "c.toml"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains(&url) && e.contains(wrong) && e.contains(&md5),
        "{e}"
    );
    assert!(!dir.path().join("out-c/cifar").exists());
}
