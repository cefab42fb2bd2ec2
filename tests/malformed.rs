//! The malformed-input suite: damaged dataset files, packed stores, label stores, checkpoints,
//! an output root that cannot be written and a disk that fills mid-write. Each case runs the
//! binary and asserts a non-zero exit, a message naming the file, the place and what was
//! expected, and that every output that existed before is byte-for-byte unchanged. (The
//! stages.toml cases are in config_errors.rs; malformed label-store rows, which the runner's
//! checks keep from reaching a student, in stages' label_store tests.)

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

/// Every file under `dir` (but the lock), with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.unwrap().path();
            // `.locks/` holds the stage claims' lock files, bookkeeping rather than output.
            if p.is_dir() && p.file_name().unwrap() != ".locks" {
                walk(root, &p, out);
            } else if !p.is_dir() {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Asserts that `o` failed with exit status 1 and that its stderr names every needle.
fn refused(o: &Output, needles: &[&str]) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {e}");
    for n in needles {
        assert!(e.contains(n), "expected `{n}` in: {e}");
    }
}

/// Runs `args` in `dir`, asserting refusal (see [`refused`]) and that nothing under `out`
/// changed.
fn refused_unchanged(dir: &Path, args: &[&str], needles: &[&str]) {
    let out = dir.join("out");
    let before = snapshot(&out);
    let o = pipeline(dir, args);
    refused(&o, needles);
    let after = snapshot(&out);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "files appeared or vanished"
    );
    for (k, v) in &before {
        assert!(after[k] == *v, "{k} changed");
    }
}

// ---------------------------------------------------------------------------------------------
// Dataset files

const CIFAR: &str = "[run]\noutput = \"out\"\n[[stage]]\nname = \"cifar\"\nkind = \"prepare\"\nsource = \"cifar10\"\npath = \"c10\"\nbatches = [1, 2]\n";

/// A CIFAR-10 folder with `n` records in data_batch_1, data_batch_2 and test_batch.
fn cifar(dir: &Path, n: usize) {
    let c = dir.join("c10");
    std::fs::create_dir_all(&c).unwrap();
    let names: String = (0..10).map(|i| format!("class{i}\n")).collect();
    std::fs::write(c.join("batches.meta.txt"), names).unwrap();
    for file in ["data_batch_1.bin", "data_batch_2.bin", "test_batch.bin"] {
        let mut bytes = Vec::new();
        for i in 0..n {
            bytes.push((i % 10) as u8);
            bytes.extend((0..3072).map(|p| ((i + p) % 256) as u8));
        }
        std::fs::write(c.join(file), bytes).unwrap();
    }
    write(dir, "c.toml", CIFAR);
}

#[test]
fn cifar_file_truncated_mid_record() {
    let dir = scratch();
    cifar(dir.path(), 4);
    let p = dir.path().join("c10/data_batch_2.bin");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..3073 * 3 + 100]).unwrap();
    refused_unchanged(
        dir.path(),
        &["run", "c.toml"],
        &[
            "data_batch_2.bin",
            "not a whole number of 3073-byte records",
        ],
    );
}

#[test]
fn cifar_label_out_of_range() {
    let dir = scratch();
    cifar(dir.path(), 4);
    let p = dir.path().join("c10/test_batch.bin");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[3 * 3073] = 200;
    std::fs::write(&p, &bytes).unwrap();
    refused_unchanged(
        dir.path(),
        &["run", "c.toml"],
        &["test_batch.bin", "record 3", "label 200 is outside 0..10"],
    );
}

#[test]
fn cifar_missing_file() {
    let dir = scratch();
    cifar(dir.path(), 2);
    std::fs::remove_file(dir.path().join("c10/data_batch_2.bin")).unwrap();
    refused_unchanged(dir.path(), &["run", "c.toml"], &["data_batch_2.bin"]);
}

#[test]
fn stl10_file_of_the_wrong_size() {
    let dir = scratch();
    let s = dir.path().join("stl");
    std::fs::create_dir_all(&s).unwrap();
    let names: String = (0..10).map(|i| format!("c{i}\n")).collect();
    std::fs::write(s.join("class_names.txt"), names).unwrap();
    let image = 96 * 96 * 3;
    // Two training images, but the test images are 64 × 64.
    std::fs::write(s.join("train_X.bin"), vec![7u8; 2 * image]).unwrap();
    std::fs::write(s.join("train_y.bin"), [1u8, 2]).unwrap();
    std::fs::write(s.join("test_X.bin"), vec![7u8; 2 * 64 * 64 * 3]).unwrap();
    std::fs::write(s.join("test_y.bin"), [1u8, 2]).unwrap();
    write(
        dir.path(),
        "s.toml",
        "[run]\noutput = \"out\"\n[[stage]]\nname = \"stl\"\nkind = \"prepare\"\nsource = \"stl10\"\npath = \"stl\"\n",
    );
    refused_unchanged(dir.path(), &["run", "s.toml"], &["test_X.bin", "27648"]);
}

fn folder(dir: &Path) {
    for (split, class) in [("train", "a"), ("train", "b"), ("val", "a"), ("val", "b")] {
        let d = dir.join("imgs").join(split).join(class);
        std::fs::create_dir_all(&d).unwrap();
        image::RgbImage::from_pixel(10, 8, image::Rgb([9, 99, 200]))
            .save(d.join("x.png"))
            .unwrap();
    }
    write(
        dir,
        "f.toml",
        "[run]\noutput = \"out\"\n[[stage]]\nname = \"f\"\nkind = \"prepare\"\nsource = \"imagefolder\"\npath = \"imgs\"\nimage_size = 8\n",
    );
}

#[test]
fn image_folder_with_an_empty_class() {
    let dir = scratch();
    folder(dir.path());
    std::fs::create_dir_all(dir.path().join("imgs/train/c")).unwrap();
    refused_unchanged(
        dir.path(),
        &["run", "f.toml"],
        &["imgs/train/c", "holds no image (.jpg, .jpeg, .png"],
    );
}

#[test]
fn image_folder_with_an_undecodable_jpeg() {
    let dir = scratch();
    folder(dir.path());
    std::fs::write(
        dir.path().join("imgs/val/b/broken.jpg"),
        b"\xff\xd8\xff\xe0 not a jpeg",
    )
    .unwrap();
    refused_unchanged(dir.path(), &["run", "f.toml"], &["imgs/val/b/broken.jpg"]);
}

#[test]
fn image_folder_without_its_split() {
    let dir = scratch();
    folder(dir.path());
    std::fs::remove_dir_all(dir.path().join("imgs/val")).unwrap();
    refused_unchanged(dir.path(), &["run", "f.toml"], &["imgs/val"]);
}

// ---------------------------------------------------------------------------------------------
// Packed stores, label stores and checkpoints of a completed run

/// TINY run to completion in `dir/out`.
fn tiny(dir: &Path) {
    write(dir, "tiny.toml", TINY);
    let o = pipeline(dir, &["run", "tiny.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Damages byte range `at` of `file` by `f`, keeping its size.
fn damage(file: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(file).unwrap();
    let n = bytes.len();
    f(&mut bytes);
    assert_eq!(bytes.len(), n);
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn packed_store_cases_are_refused_by_inspect() {
    let dir = scratch();
    tiny(dir.path());
    let pack = dir.path().join("out/data/test.pack");
    let original = std::fs::read(&pack).unwrap();
    for (what, edit, needles) in [
        (
            "bad magic",
            Box::new(|b: &mut Vec<u8>| b[0] = b'X') as Box<dyn Fn(&mut Vec<u8>)>,
            vec!["test.pack", "magic (bytes 0..8)"],
        ),
        (
            "wrong version",
            Box::new(|b: &mut Vec<u8>| b[8] = 9),
            vec!["test.pack", "version (bytes 8..12)", "found version 9"],
        ),
        (
            "truncated",
            Box::new(|b: &mut Vec<u8>| b.truncate(b.len() - 100)),
            vec!["test.pack"],
        ),
        (
            "damaged pixel",
            Box::new(|b: &mut Vec<u8>| {
                let n = b.len();
                b[n - 5] ^= 0xff
            }),
            vec!["test.pack", "content hash (bytes 40..72)", "file corrupted"],
        ),
    ] {
        let mut bytes = original.clone();
        edit(&mut bytes);
        std::fs::write(&pack, &bytes).unwrap();
        let o = pipeline(dir.path(), &["inspect", "out/data/test.pack"]);
        assert!(!o.status.success(), "{what}: accepted");
        let e = stderr(&o);
        for n in needles {
            assert!(e.contains(n), "{what}: expected `{n}` in {e}");
        }
    }
}

#[test]
fn a_damaged_pixel_in_a_packed_split_is_refused_before_training() {
    let dir = scratch();
    tiny(dir.path());
    // Same size, so the runner's record still matches: the content hash must catch it.
    damage(&dir.path().join("out/data/train.pack"), |b| {
        let n = b.len();
        b[n - 1] ^= 1
    });
    let cfg = format!(
        "{TINY}\n[[stage]]\nname = \"extra\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\nwidth = 4\nmethod = \"vanilla\"\nepochs = 1\n"
    );
    write(dir.path(), "tiny2.toml", &cfg);
    refused_unchanged(
        dir.path(),
        &["run", "tiny2.toml"],
        &["train.pack", "content hash", "file corrupted"],
    );
}

#[test]
fn a_label_store_of_other_classes_is_refused() {
    let dir = scratch();
    tiny(dir.path());
    // A second dataset with 3 classes; the student reads the 4-class teacher's labels.
    let cfg = format!(
        "{TINY}\n[[stage]]\nname = \"data3\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 160\ntest_size = 80\nclasses = 3\nimage_size = 16\n\n\
         [[stage]]\nname = \"student3\"\nkind = \"train\"\nneeds = [\"data3\", \"labels\"]\nmodel = \"resnet8\"\nwidth = 4\nmethod = \"off-ldl\"\nepochs = 1\n"
    );
    write(dir.path(), "tiny3.toml", &cfg);
    let o = pipeline(dir.path(), &["run", "tiny3.toml"]);
    refused(
        &o,
        &[
            "labels.parquet",
            "ldl.classes",
            "K = 4 classes",
            "K = 3 classes",
        ],
    );
    assert!(!dir.path().join("out/student3").exists());
}

/// A `label_source` the label stage's store does not hold is refused with the file (exit 2),
/// from the label stage's teachers, before anything runs or changes (the store's own check,
/// `no rows for source`, is tested in `label_store::tests`).
#[test]
fn a_label_source_that_is_not_in_the_store_is_refused() {
    let dir = scratch();
    tiny(dir.path());
    let cfg = TINY.replacen(
        "method = \"off-ldl\"",
        "method = \"off-ldl\"\nlabel_source = \"nobody\"",
        1,
    );
    write(dir.path(), "src.toml", &cfg);
    let out = dir.path().join("out");
    let before = snapshot(&out);
    let o = pipeline(dir.path(), &["run", "src.toml"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(
            "names `labels`, whose store will hold the sources [\"teacher\"], not the `label_source = \"nobody\"`"
        ),
        "{}",
        stderr(&o)
    );
    assert!(snapshot(&out) == before, "outputs changed");
}

/// A training killed after its first checkpoint: returns the newest checkpoint folder.
fn killed_training(dir: &Path) -> std::path::PathBuf {
    let cfg = "[run]\noutput = \"out\"\nseed = 2\n[[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 64\ntest_size = 16\nclasses = 3\nimage_size = 12\n\n\
               [[stage]]\nname = \"model\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\nwidth = 4\nmethod = \"vanilla\"\nepochs = 200\nbatch_size = 16\ncheckpoint_every = 1\n";
    write(dir, "k.toml", cfg);
    let mut child = run_until_checkpoint(dir, "k.toml", "model");
    child.kill().unwrap();
    child.wait().unwrap();
    // The checkpoint the resume will pick: the newest one left.
    newest_checkpoint(&dir.join("out/.model.partial/checkpoints")).expect("a checkpoint")
}

/// model.safetensors of a model trained with `model`/`width` in a scratch run.
fn weights_of(model: &str, width: usize) -> Vec<u8> {
    let dir = scratch();
    let cfg = format!(
        "[run]\noutput = \"out\"\n[[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 16\ntest_size = 8\nclasses = 3\nimage_size = 12\n\n\
         [[stage]]\nname = \"m\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"{model}\"\nwidth = {width}\nmethod = \"vanilla\"\nepochs = 1\nbatch_size = 16\n"
    );
    write(dir.path(), "w.toml", &cfg);
    let o = pipeline(dir.path(), &["run", "w.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::read(dir.path().join("out/m/model.safetensors")).unwrap()
}

#[test]
fn damaged_checkpoints_are_refused_naming_the_file() {
    let wider = weights_of("resnet8", 8);
    let deeper = weights_of("resnet14", 4);
    for (what, needles) in [
        (
            "truncated",
            vec!["model.safetensors", "safetensors header", "cannot parse"],
        ),
        (
            "wider",
            vec!["model.safetensors", "shape [8", "the model expects [4"],
        ),
        (
            "deeper",
            vec!["model.safetensors", "not a resnet8 model", "layer1.1"],
        ),
    ] {
        let dir = scratch();
        let ck = killed_training(dir.path());
        let file = ck.join("model.safetensors");
        match what {
            "truncated" => {
                let b = std::fs::read(&file).unwrap();
                std::fs::write(&file, &b[..b.len() / 2]).unwrap();
            }
            "wider" => std::fs::write(&file, &wider).unwrap(),
            _ => std::fs::write(&file, &deeper).unwrap(),
        }
        // `data` is complete and must stay as it is.
        let data_before = snapshot(&dir.path().join("out/data"));
        let o = pipeline(dir.path(), &["run", "k.toml"]);
        refused(&o, &needles);
        assert!(
            snapshot(&dir.path().join("out/data")) == data_before,
            "{what}"
        );
        assert!(!dir.path().join("out/model").exists(), "{what}");
    }
}

// ---------------------------------------------------------------------------------------------
// The output root

#[test]
fn an_output_root_that_cannot_be_created_is_refused() {
    let dir = scratch();
    std::fs::write(dir.path().join("blocker"), b"a file, not a folder").unwrap();
    let cfg = TINY.replacen("output = \"out\"", "output = \"blocker/out\"", 1);
    write(dir.path(), "b.toml", &cfg);
    let o = pipeline(dir.path(), &["run", "b.toml"]);
    assert_ne!(o.status.code(), Some(0));
    let e = stderr(&o);
    assert!(
        e.contains("blocker/out") && e.contains("Not a directory"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("blocker")).unwrap(),
        b"a file, not a folder"
    );
}

#[test]
fn a_disk_that_fills_mid_write_leaves_the_previous_output_intact() {
    let dir = scratch();
    let small = "[run]\noutput = \"out\"\n[[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\ntrain_size = 64\ntest_size = 16\nimage_size = 16\n";
    write(dir.path(), "d.toml", small);
    let o = pipeline(dir.path(), &["run", "d.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A bigger dataset under a 256 KiB file-size limit (`ulimit -f` counts 512-byte blocks);
    // SIGXFSZ ignored, so the write fails with EFBIG instead of killing the process.
    write(
        dir.path(),
        "d.toml",
        &small.replace("train_size = 64", "train_size = 4000"),
    );
    let before = snapshot(&dir.path().join("out"));
    let o = std::process::Command::new("sh")
        .args([
            "-c",
            "trap '' XFSZ; ulimit -f 512; exec \"$0\" run d.toml",
            env!("CARGO_BIN_EXE_pipeline"),
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    refused(&o, &["train.pack", "File too large"]);
    let after = snapshot(&dir.path().join("out"));
    assert!(before == after, "the previous dataset changed");
    // With room again the run completes.
    let o = pipeline(dir.path(), &["run", "d.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A model whose output is not finite (NaN weights, as a diverged or damaged import gives) is
/// refused by the evaluation, naming the model and the first image, instead of a finite NLL.
#[test]
fn an_evaluation_of_a_model_with_nan_outputs_is_refused() {
    let dir = scratch();
    tiny(dir.path());
    // fc.bias's floats set to NaN, in place (same size).
    damage(&dir.path().join("out/vanilla/model.safetensors"), |b| {
        let len = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&b[8..8 + len]).unwrap();
        let at = &header["fc.bias"]["data_offsets"];
        let (lo, hi) = (
            at[0].as_u64().unwrap() as usize,
            at[1].as_u64().unwrap() as usize,
        );
        for chunk in b[8 + len + lo..8 + len + hi].chunks_exact_mut(4) {
            chunk.copy_from_slice(&f32::NAN.to_le_bytes());
        }
    });
    let cfg = format!(
        "{TINY}\n[[stage]]\nname = \"eval-nan\"\nkind = \"evaluate\"\nneeds = [\"data\", \"vanilla\"]\n"
    );
    write(dir.path(), "tiny2.toml", &cfg);
    refused_unchanged(
        dir.path(),
        &["run", "tiny2.toml", "--only", "eval-nan"],
        &["vanilla/model.safetensors", "test image 0", "not finite"],
    );
}

/// `pipeline inspect … | head` ends quietly with status 0 when its reader stops reading: it
/// panicked ("failed printing to stdout: Broken pipe", status 101). The reader here closes its
/// end before the child writes.
#[test]
fn inspect_into_a_closed_pipe_ends_quietly() {
    let dir = scratch();
    tiny(dir.path());
    for _ in 0..3 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
            .args(["inspect", "out/data/train.pack"])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
}
