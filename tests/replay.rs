//! Replayed online labels through the binary: a `replay` stage stores the teacher's outputs on
//! every batch of a batch stream; students reading it (`replay = true`) end bitwise equal to the
//! same students running the teacher online (dense f32), students of other seeds and models
//! share it through `data_seed`, and a store of another stream, teacher or length is refused
//! naming the key (another K or dataset: `replay_store`'s unit tests, as the runner's
//! fingerprints never pair such a store with a student).

mod common;
use common::*;
use std::path::Path;

const BASE: &str = r#"
[run]
output = "out"
seed = 3
threads = 2

[[stage]]
name = "data"
kind = "prepare"
source = "synthetic"
train_size = 160
test_size = 40
classes = 4
image_size = 12

[[stage]]
name = "teacher"
kind = "train"
needs = ["data"]
model = "resnet8"
width = 4
method = "vanilla"
epochs = 1
batch_size = 32

[[stage]]
name = "replay"
kind = "replay"
needs = ["data", "teacher"]
epochs = 2
batch_size = 32
mix = { type = "cutmix", p = 0.5 }
seed = 5
"#;

/// A student of the replay's stream: `method`, init `seed`, `extra` keys.
fn student(name: &str, method: &str, seed: u64, extra: &str) -> String {
    format!(
        r#"
[[stage]]
name = "{name}"
kind = "train"
needs = ["data", "teacher"{replay}]
model = "resnet8"
width = 4
method = "{method}"
epochs = 2
batch_size = 32
mix = {{ type = "cutmix", p = 0.5 }}
seed = {seed}
data_seed = 5
{extra}
"#,
        replay = if extra.contains("replay =") {
            ", \"replay\""
        } else {
            ""
        }
    )
}

fn read(out: &Path, file: &str) -> Vec<u8> {
    std::fs::read(out.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// The loss and accuracy columns of `train_log.csv` (the others are timings).
fn losses(out: &Path, stage: &str) -> String {
    String::from_utf8(read(out, &format!("{stage}/train_log.csv")))
        .unwrap()
        .lines()
        .map(|l| l.split(',').take(4).collect::<Vec<_>>().join(","))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn replayed_students_equal_online_ones_and_share_one_store() {
    let dir = scratch();
    let cfg = [
        BASE.to_string(),
        student("on-online", "on-ldl", 1, ""),
        student("on-replayed", "on-ldl", 1, "replay = true"),
        student("kd-online", "kd", 1, ""),
        student("kd-replayed", "kd", 1, "replay = true"),
        // Another initialisation seed and another width: the same batches, the same store.
        student("on-seed2", "on-ldl", 2, "replay = true").replace("width = 4", "width = 8"),
    ]
    .concat();
    write(dir.path(), "p.toml", &cfg);
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    for m in ["on", "kd"] {
        assert!(
            read(&out, &format!("{m}-online/model.safetensors"))
                == read(&out, &format!("{m}-replayed/model.safetensors")),
            "{m}: the replayed student's weights differ from the online one's"
        );
        assert_eq!(
            losses(&out, &format!("{m}-online")),
            losses(&out, &format!("{m}-replayed"))
        );
    }
    assert!(stderr(&o)
        .contains("on-seed2: reading the teachers' outputs from the replay store `replay`"));
    // The store: two epochs of 5 steps, 160 rows each, keyed by step and position.
    let meta: serde_json::Value =
        serde_json::from_slice(&read(&out, "replay/replay.json")).unwrap();
    assert_eq!(meta["output"], "logits");
    assert_eq!(meta["stream"]["data_seed"], 5);
    let rows: usize = parquet_batches(&out.join("replay/epoch-00001.parquet"))
        .iter()
        .map(|b| b.num_rows())
        .sum();
    assert_eq!(rows, 160);
    // `pipeline inspect` describes the store and its first epoch.
    let o = pipeline(dir.path(), &["inspect", "out/replay", "--rows", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("replay store: 2 of 2 epochs stored")
            && text.contains("160 images, K = 4, teachers teacher, teacher_mc = 0, logits stored as f32")
            && text.contains(
                "augment = \"crop-flip\", cutout = 0, mix = { beta = 1.0, p = 0.5, type = \"cutmix\" }"
            )
            && text.contains("160 rows in 5 steps")
            && text.contains("step     0 position    1"),
        "{text}"
    );
}

/// Each mismatch between a student and a store is refused before training, naming the key (a
/// store too short for the student already with the file).
#[test]
fn a_store_of_another_stream_teacher_or_length_is_refused() {
    let dir = scratch();
    let other_teacher = r#"
[[stage]]
name = "teacher2"
kind = "train"
needs = ["data"]
model = "resnet8"
width = 4
method = "vanilla"
epochs = 1
batch_size = 32
seed = 9
"#;
    let cases: [(&str, String, &str); 5] = [
        (
            "batch size",
            student("s", "on-ldl", 1, "replay = true")
                .replace("batch_size = 32\nmix", "batch_size = 16\nmix"),
            "key `stream.batch_size`",
        ),
        (
            "data seed",
            student("s", "on-ldl", 1, "replay = true").replace("data_seed = 5", "data_seed = 6"),
            "key `stream.data_seed`",
        ),
        (
            "mixing",
            student("s", "on-ldl", 1, "replay = true").replace("p = 0.5", "p = 1.0"),
            "key `stream.mix`",
        ),
        (
            "teacher",
            format!(
                "{other_teacher}{}",
                student("s", "on-ldl", 1, "replay = true").replace("\"teacher\"", "\"teacher2\"")
            ),
            "key `teachers`",
        ),
        (
            "teacher_mc",
            student("s", "on-ldl", 1, "replay = true\nteacher_mc = 2"),
            "key `teacher_mc`",
        ),
    ];
    for (what, stage, key) in cases {
        write(dir.path(), "p.toml", &format!("{BASE}{stage}"));
        let o = pipeline(dir.path(), &["run", "p.toml"]);
        assert!(!o.status.success(), "{what}: accepted");
        let e = stderr(&o);
        assert!(
            e.contains("replay/replay.json") && e.contains(key),
            "{what}: {e}"
        );
    }
    // More epochs than the store holds: refused with the file, before anything runs.
    let longer = student("s", "on-ldl", 1, "replay = true").replace("epochs = 2", "epochs = 3");
    write(dir.path(), "p.toml", &format!("{BASE}{longer}"));
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("names `replay`, which stores 2 epochs, fewer than this stage's 3"),
        "{}",
        stderr(&o)
    );
    // `replay = true` without a replay stage in `needs` is a config error.
    let bad = format!("{BASE}{}", student("s", "on-ldl", 1, "replay = true")).replace(
        "needs = [\"data\", \"teacher\", \"replay\"]",
        "needs = [\"data\", \"teacher\"]",
    );
    write(dir.path(), "p.toml", &bad);
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("must name exactly one stage producing a replay store"),
        "{}",
        stderr(&o)
    );
}

/// Teacher epochs of a config: each online student's epochs (one teacher each) unless it
/// replays, plus each replay stage's epochs.
fn teacher_epochs(config: &pipeline::config::Config) -> usize {
    use stages::StageParams;
    config
        .stages
        .iter()
        .map(|s| match &s.params {
            StageParams::Train(p) if p.method.uses_teachers() && !p.replay => p.epochs,
            StageParams::Replay(p) => p.epochs,
            _ => 0,
        })
        .sum()
}

/// In the Table 1 example, every online student reads the replay cell of its own teacher, seed
/// and mixing, and the teacher runs 6,300 epochs instead of 12,840: 2 teachers × (18 runs of
/// 240 epochs + 6 of 350) online, 2 × 3 seeds × 3 mixings × 350 replayed.
#[test]
fn table1_students_follow_the_replay_of_their_seed_and_mix() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let config = pipeline::config::load(&root.join("examples/cifar100-table1.toml"), None).unwrap();
    let mut students = 0;
    for s in &config.stages {
        let stages::StageParams::Train(p) = &s.params else {
            continue;
        };
        if !p.replay {
            continue;
        }
        students += 1;
        let replays: Vec<&String> = s.needs.iter().filter(|n| n.starts_with("replay")).collect();
        assert_eq!(replays.len(), 1, "{}: {:?}", s.name, s.needs);
        let r = config.stage(replays[0]).unwrap();
        let stages::StageParams::Replay(rp) = &r.params else {
            panic!("{} is not a replay stage", r.name)
        };
        assert_eq!(rp.stream(), p.stream(), "{} reads {}", s.name, r.name);
        assert!(rp.epochs >= p.epochs);
        let teacher = if s.name.starts_with("on-small") {
            "teacher110"
        } else {
            "teacher200"
        };
        assert!(s.needs.iter().any(|n| n == teacher) && r.needs.iter().any(|n| n == teacher));
    }
    assert_eq!(students, 48);
    assert_eq!(teacher_epochs(&config), 6_300);
    // Without replay: the same students running their teachers.
    let text = std::fs::read_to_string(root.join("examples/cifar100-table1.toml"))
        .unwrap()
        .replace("replay = true\n", "");
    let online = pipeline::config::parse(&root.join("examples/cifar100-table1.toml"), &text, None);
    let online = online.unwrap_or_else(|e| panic!("{e}"));
    let dropped: usize = teacher_epochs(&online) - 18 * 350;
    assert_eq!(dropped, 12_840);
}

/// An ensemble's store: `on-en-ldl` and `on-mt-ldl` students reading it equal the online ones,
/// and an `on-ldl` student reads its first teacher from it.
#[test]
fn an_ensembles_store_serves_the_ensemble_methods_and_its_first_teacher() {
    let dir = scratch();
    let two = BASE
        .replace(
            "[[stage]]\nname = \"replay\"",
            "[[stage]]\nname = \"teacher2\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\nwidth = 4\nmethod = \"vanilla\"\nepochs = 1\nbatch_size = 32\nseed = 8\n\n[[stage]]\nname = \"replay\"",
        )
        .replace(
            "needs = [\"data\", \"teacher\"]\nepochs = 2",
            "needs = [\"data\", \"teacher\", \"teacher2\"]\nepochs = 2",
        );
    let with2 = |s: String| s.replace("\"teacher\"", "\"teacher\", \"teacher2\"");
    let cfg = [
        two,
        with2(student("en-online", "on-en-ldl", 1, "")),
        with2(student("en-replayed", "on-en-ldl", 1, "replay = true")),
        with2(student("mt-online", "on-mt-ldl", 1, "")),
        with2(student("mt-replayed", "on-mt-ldl", 1, "replay = true")),
        student("on-online", "on-ldl", 1, ""),
        with2(student("on-first", "on-ldl", 1, "replay = true")),
    ]
    .concat();
    write(dir.path(), "p.toml", &cfg);
    let o = pipeline(dir.path(), &["run", "p.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    for (a, b) in [
        ("en-online", "en-replayed"),
        ("mt-online", "mt-replayed"),
        ("on-online", "on-first"),
    ] {
        assert!(
            read(&out, &format!("{a}/model.safetensors"))
                == read(&out, &format!("{b}/model.safetensors")),
            "{b} differs from {a}"
        );
    }
}

/// In every example, each replaying student reads one replay stage of its own stream, with
/// enough epochs, whose teachers are the first of the student's.
#[test]
fn every_examples_replaying_students_read_a_store_of_their_stream() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut checked = 0;
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let config = pipeline::config::load(&path, None).unwrap();
        let kind = |n: &str| config.stage(n).unwrap().params.kind();
        for s in &config.stages {
            let stages::StageParams::Train(p) = &s.params else {
                continue;
            };
            if !(p.replay && p.method.uses_teachers()) {
                continue;
            }
            let replays: Vec<&String> = s
                .needs
                .iter()
                .filter(|n| kind(n) == stages::Kind::Replay)
                .collect();
            assert_eq!(replays.len(), 1, "{}: {}", path.display(), s.name);
            let r = config.stage(replays[0]).unwrap();
            let stages::StageParams::Replay(rp) = &r.params else {
                unreachable!()
            };
            assert_eq!(
                rp.stream(),
                p.stream(),
                "{}: {} reads {}",
                path.display(),
                s.name,
                r.name
            );
            assert!(rp.epochs >= p.epochs, "{}: {}", path.display(), s.name);
            let models = |d: &pipeline::config::StageDecl| -> Vec<String> {
                d.needs
                    .iter()
                    .filter(|n| matches!(kind(n), stages::Kind::Train | stages::Kind::Import))
                    .cloned()
                    .collect()
            };
            let (mine, theirs) = (models(s), models(r));
            let used = if matches!(p.method.as_str(), "on-en-ldl" | "on-mt-ldl") {
                mine.len()
            } else {
                1
            };
            assert!(
                theirs.starts_with(&mine[..used]),
                "{}: {} {mine:?} vs {} {theirs:?}",
                path.display(),
                s.name,
                r.name
            );
            checked += 1;
        }
    }
    // Table 1: 48 online; Table 3: 2 × 18 kd/wsl + 27 online; Table 2 (CIFAR-10, STL-10): 6 kd
    // + 36 online each; Table 5: 9 kd + 9 online. (CRD students run their teachers.)
    assert_eq!(checked, 48 + 63 + 2 * 42 + 18);
}

/// A teacher named like a key column of the store (`index`) is refused before anything is
/// replayed: its outputs' column would take the key's name.
#[test]
fn a_teacher_named_like_a_key_column_is_refused() {
    let dir = scratch();
    let cfg = BASE
        .replace("name = \"teacher\"", "name = \"index\"")
        .replace(
            "needs = [\"data\", \"teacher\"]",
            "needs = [\"data\", \"index\"]",
        );
    assert!(cfg.contains("[\"data\", \"index\"]"), "BASE changed: {cfg}");
    write(dir.path(), "r.toml", &cfg);
    let o = pipeline(dir.path(), &["run", "r.toml"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("replay: teacher `index` has the name of a key column"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.path().join("out/replay").exists());
}
