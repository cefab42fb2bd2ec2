//! Every stage of every example experiment (and of the embedded default) keeps its fingerprint
//! and its recorded parameters: a refactoring that changed them would make every user's
//! finished run stale. `tests/fixtures/fingerprints.txt` was written by the code before the
//! stages crate was split into layers; a change that is meant to alter fingerprints rewrites it
//! with `LDL_BLESS=1 cargo test -p pipeline --test fingerprints` and says why in its commit.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The experiments checked: the embedded default, every example in name order, and a fixture
/// that sets every key of every kind to a value other than its default.
fn experiments() -> Vec<PathBuf> {
    let mut files = vec![root().join("stages.toml")];
    let mut examples: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .expect("examples/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    examples.sort();
    files.extend(examples);
    files.push(root().join("tests/fixtures/every-key.toml"));
    files
}

/// `file stage fingerprint params-blake3` for every stage.
fn table() -> String {
    let mut out = String::new();
    for file in experiments() {
        let config = pipeline::config::load(&file, None)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let fps = pipeline::runner::fingerprints(&config);
        let shown = file
            .strip_prefix(root())
            .unwrap_or(&file)
            .display()
            .to_string();
        for (s, fp) in config.stages.iter().zip(&fps) {
            let params = pipeline::runner::params_json(&s.params).to_string();
            let hash = blake3::hash(params.as_bytes()).to_hex();
            writeln!(out, "{shown} {} {fp} {hash}", s.name).expect("string");
        }
    }
    out
}

#[test]
fn every_example_keeps_its_fingerprints_and_parameters() {
    let fixture = root().join("tests/fixtures/fingerprints.txt");
    let now = table();
    if std::env::var_os("LDL_BLESS").is_some() {
        std::fs::write(&fixture, &now).expect("write the fixture");
        return;
    }
    let expected = std::fs::read_to_string(&fixture).expect("tests/fixtures/fingerprints.txt");
    let changed: Vec<String> = expected
        .lines()
        .zip(now.lines())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("  was {a}\n  now {b}"))
        .collect();
    assert!(
        changed.is_empty() && expected.lines().count() == now.lines().count(),
        "{} of {} stages changed (fixture {} lines, now {}):\n{}",
        changed.len(),
        expected.lines().count(),
        expected.lines().count(),
        now.lines().count(),
        changed.join("\n")
    );
}

/// The cells the paper reports in both Table 1 and Table 3 (the CIFAR-100 data, the teachers,
/// Vanilla, On-LDL with CutMix, On-LDL+) are the same runs in both examples: equal
/// fingerprints, so a user who ran one table has those cells of the other.
#[test]
fn cells_shared_by_tables_1_and_3_are_the_same_runs() {
    let fps = |name: &str| {
        let config = pipeline::config::load(&root().join("examples").join(name), None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let fps = pipeline::runner::fingerprints(&config);
        config
            .stages
            .iter()
            .zip(fps)
            .map(|(s, fp)| (s.name.clone(), fp))
            .collect::<std::collections::HashMap<_, _>>()
    };
    let (t1, t3) = (fps("cifar100-table1.toml"), fps("cifar100-table3.toml"));
    let mut pairs = vec![
        ("data".to_string(), "data".to_string()),
        ("teacher110".into(), "teacher110".into()),
        ("teacher200".into(), "teacher200".into()),
    ];
    for seed in 0..3 {
        for model in ["resnet20", "resnet56"] {
            pairs.push((
                format!("vanilla.mix=none.model={model}.seed={seed}"),
                format!("small.method=vanilla.model={model}.seed={seed}"),
            ));
            pairs.push((
                format!("on-small-long.model={model}.seed={seed}"),
                format!("small-online-long.model={model}.seed={seed}"),
            ));
        }
        for model in ["resnet18", "resnet50"] {
            pairs.push((
                format!("vanilla.mix=none.model={model}.seed={seed}"),
                format!("large.method=vanilla.model={model}.seed={seed}"),
            ));
            pairs.push((
                format!("on-large.mix=cutmix.model={model}.seed={seed}"),
                format!("large-online.model={model}.seed={seed}"),
            ));
            pairs.push((
                format!("on-large-long.model={model}.seed={seed}"),
                format!("large-online-long.model={model}.seed={seed}"),
            ));
        }
    }
    for seed in 0..3 {
        for teacher in ["110", "200"] {
            pairs.push((
                format!("replay{teacher}.mix=cutmix.seed={seed}"),
                format!("replay{teacher}.mix=cutmix.seed={seed}"),
            ));
        }
    }
    for (a, b) in pairs {
        let (x, y) = (&t1[&a], &t3[&b]);
        assert_eq!(x, y, "table 1 `{a}` and table 3 `{b}` differ");
    }
}

/// A key written at its default is the same stage as without it; another value is another
/// stage (an evaluation's `projection_classes`, whose default [0, 1, 2] was fingerprinted as
/// written, marking a finished evaluation stale).
#[test]
fn a_key_written_at_its_default_keeps_the_fingerprint() {
    let config = |extra: &str| {
        let src = format!(
            "[run]\noutput = \"out\"\n\n\
             [[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\n\n\
             [[stage]]\nname = \"m\"\nkind = \"train\"\nneeds = [\"data\"]\nmethod = \"vanilla\"\n\n\
             [[stage]]\nname = \"e\"\nkind = \"evaluate\"\nneeds = [\"data\", \"m\"]\n{extra}"
        );
        let c = pipeline::config::parse(std::path::Path::new("f.toml"), &src, None).unwrap();
        pipeline::runner::fingerprints(&c)[2].clone()
    };
    let plain = config("");
    assert_eq!(config("projection_classes = [0, 1, 2]\n"), plain);
    assert_ne!(config("projection_classes = [0, 1, 3]\n"), plain);

    // A prepare stage's `keep_aspect = false`: its packed images and all downstream.
    let folder = |extra: &str| {
        let src = format!(
            "[run]\noutput = \"out\"\n\n\
             [[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"imagefolder\"\n\
             path = \"missing\"\nimage_size = 32\n{extra}"
        );
        let c = pipeline::config::parse(std::path::Path::new("f.toml"), &src, None).unwrap();
        pipeline::runner::fingerprints(&c)[0].clone()
    };
    let plain = folder("");
    assert_eq!(folder("keep_aspect = false\n"), plain);
    assert_ne!(folder("keep_aspect = true\n"), plain);
}
