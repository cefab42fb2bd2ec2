//! Every stages.toml error is found before anything runs, exits non-zero, and names the file,
//! the line and column, and the key.

mod common;
use common::*;

const HEAD: &str = "[run]\noutput = \"out\"\n\n[[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\n";

/// Runs `pipeline run` on `text` and returns stderr, asserting failure with exit status 2 and
/// that nothing was written.
fn fails(text: &str) -> String {
    let dir = scratch();
    write(dir.path(), "bad.toml", text);
    let o = pipeline(dir.path(), &["run", "bad.toml"]);
    assert_eq!(o.status.code(), Some(2), "stderr: {}", stderr(&o));
    assert!(
        !dir.path().join("out").exists(),
        "nothing may run on a bad config"
    );
    stderr(&o)
}

fn assert_at(err: &str, line: usize, column: usize, needles: &[&str]) {
    let place = format!("bad.toml:{line}:{column}:");
    assert!(err.contains(&place), "expected {place} in: {err}");
    for n in needles {
        assert!(err.contains(n), "expected `{n}` in: {err}");
    }
}

#[test]
fn syntax_error() {
    let e = fails("[run\nseed = 1\n");
    assert_at(&e, 1, 5, &["syntax error"]);
}

#[test]
fn unknown_key_in_stage() {
    let e = fails(&format!("{HEAD}epochs = 3\n"));
    assert_at(&e, 8, 1, &["stage `data`", "unknown key `epochs`"]);
}

#[test]
fn unknown_key_in_run() {
    let e = fails(
        "[run]\nsed = 1\n[[stage]]\nname = \"d\"\nkind = \"prepare\"\nsource = \"synthetic\"\n",
    );
    assert_at(&e, 2, 1, &["[run]", "unknown key `sed`"]);
}

#[test]
fn unknown_top_level_key() {
    let e = fails(&format!("colour = 1\n{HEAD}"));
    assert_at(&e, 1, 1, &["unknown top-level key `colour`"]);
}

#[test]
fn wrong_type() {
    let e = fails(&format!("{HEAD}train_size = \"many\"\n"));
    assert_at(&e, 8, 14, &["stage `data`", "invalid type", "string"]);
    // The message names the key and the type in words.
    let e = fails(&format!("{HEAD}{STUDENT}epochs = \"ten\"\n"));
    assert_at(
        &e,
        14,
        10,
        &[
            "stage `s` (kind train): key `epochs`: invalid type: string \"ten\", expected a whole number",
        ],
    );
}

#[test]
fn wrong_type_of_seed() {
    let e = fails("[run]\nseed = \"zero\"\n[[stage]]\nname = \"d\"\nkind = \"prepare\"\nsource = \"synthetic\"\n");
    assert_at(&e, 2, 8, &["[run]", "invalid type"]);
}

#[test]
fn unknown_kind() {
    let e = fails("[[stage]]\nname = \"x\"\nkind = \"bake\"\n");
    assert_at(&e, 3, 8, &["key `kind`", "unknown stage kind `bake`"]);
}

#[test]
fn bad_device() {
    let e = fails(&HEAD.replace("[run]\n", "[run]\ndevice = \"tpu\"\n"));
    assert_at(
        &e,
        2,
        10,
        &["key `device`", "\"cpu\", \"cuda\" or \"cuda:N\""],
    );
}

#[test]
fn bf16_training_on_the_cpu() {
    let e = fails(&format!(
        "{HEAD}\n[[stage]]\nname = \"t\"\nkind = \"train\"\nneeds = [\"data\"]\nmethod = \"vanilla\"\ndtype = \"bf16\"\n"
    ));
    assert_at(&e, 14, 1, &["stage `t`", "key `dtype`", "CUDA"]);
}

#[test]
fn cuda_device_in_a_cpu_build() {
    let e = fails(&HEAD.replace("[run]\n", "[run]\ndevice = \"cuda:1\"\n"));
    assert_at(&e, 2, 10, &["key `device`", "cuda:1", "CPU only"]);
}

#[test]
fn duplicate_name() {
    let e = fails(&format!(
        "{HEAD}\n[[stage]]\nname = \"data\"\nkind = \"prepare\"\nsource = \"synthetic\"\n"
    ));
    assert_at(&e, 10, 8, &["duplicate stage name `data`", "line 5"]);
}

#[test]
fn missing_need() {
    let e = fails(&format!(
        "{HEAD}\n[[stage]]\nname = \"t\"\nkind = \"train\"\nneeds = [\"data\", \"nope\"]\nmethod = \"vanilla\"\n"
    ));
    assert_at(
        &e,
        12,
        18,
        &["stage `t`", "`needs` names `nope`", "not a stage"],
    );
}

#[test]
fn cycle() {
    let text =
        "[[stage]]\nname = \"a\"\nkind = \"train\"\nneeds = [\"b\"]\nmethod = \"vanilla\"\n\n\
                [[stage]]\nname = \"b\"\nkind = \"label\"\nneeds = [\"a\", \"d\"]\n\n\
                [[stage]]\nname = \"d\"\nkind = \"prepare\"\nsource = \"synthetic\"\n";
    // a (train) needs b (label) — allowed only for off-ldl, so declare a as off-ldl.
    let text = text.replace("method = \"vanilla\"", "method = \"off-ldl\"\nepochs = 1");
    let text = text.replace("needs = [\"b\"]", "needs = [\"b\", \"d\"]");
    let e = fails(&text);
    assert_at(&e, 2, 8, &["cycle", "a → b → a"]);
}

#[test]
fn need_of_the_wrong_kind() {
    // An evaluate stage cannot read a label store.
    let text = format!(
        "{HEAD}\n[[stage]]\nname = \"t\"\nkind = \"train\"\nneeds = [\"data\"]\nmethod = \"vanilla\"\n\n\
         [[stage]]\nname = \"l\"\nkind = \"label\"\nneeds = [\"data\", \"t\"]\n\n\
         [[stage]]\nname = \"e\"\nkind = \"evaluate\"\nneeds = [\"data\", \"l\"]\n"
    );
    let e = fails(&text);
    assert_at(
        &e,
        23,
        18,
        &[
            "stage `e` (kind evaluate)",
            "produces a label store",
            "a model",
        ],
    );
}

#[test]
fn missing_required_input() {
    // Off-LDL reads a label store; none is named.
    let text = format!("{HEAD}\n[[stage]]\nname = \"s\"\nkind = \"train\"\nneeds = [\"data\"]\nmethod = \"off-ldl\"\n");
    let e = fails(&text);
    assert_at(
        &e,
        10,
        8,
        &[
            "stage `s` (kind train)",
            "exactly one",
            "label store",
            "found 0",
        ],
    );
}

#[test]
fn bad_enum_value() {
    let text = format!("{HEAD}\n[[stage]]\nname = \"s\"\nkind = \"train\"\nneeds = [\"data\"]\nmethod = \"magic\"\n");
    let e = fails(&text);
    assert_at(
        &e,
        13,
        10,
        &["stage `s`", "unknown variant `magic`", "vanilla"],
    );
}

#[test]
fn missing_required_key() {
    let e = fails("[[stage]]\nname = \"d\"\nkind = \"prepare\"\n");
    assert_at(&e, 1, 1, &["stage `d`", "missing key `source`"]);
}

/// A train stage's keys have defaults, except its method.
#[test]
fn missing_method_of_a_train_stage() {
    let e = fails(&format!(
        "{HEAD}\n[[stage]]\nname = \"t\"\nkind = \"train\"\nneeds = [\"data\"]\nepochs = 1\n"
    ));
    assert_at(
        &e,
        9,
        1,
        &["stage `t` (kind train)", "missing key `method`"],
    );
    // Misspelt, it is an unknown key, with the keys expected.
    let e = fails(&format!(
        "{HEAD}\n[[stage]]\nname = \"t\"\nkind = \"train\"\nneeds = [\"data\"]\nmethd = \"vanilla\"\n"
    ));
    assert_at(
        &e,
        13,
        1,
        &["unknown key `methd`, expected one of", "`method`"],
    );
}

#[test]
fn unsupported_version() {
    let e = fails(&format!("version = 2\n{HEAD}"));
    assert_at(&e, 1, 11, &["key `version`", "version 1, found 2"]);
}

#[test]
fn missing_file() {
    let dir = scratch();
    let o = pipeline(dir.path(), &["run", "absent.toml"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("error: absent.toml: cannot read: No such file"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn out_of_range_values() {
    let e = fails(&format!("{HEAD}classes = 1\n"));
    assert_at(
        &e,
        8,
        1,
        &["stage `data`", "key `classes`", "outside 2..=1000"],
    );
    let train = |extra: &str| {
        format!("{HEAD}\n[[stage]]\nname = \"s\"\nkind = \"train\"\nneeds = [\"data\"]\nmethod = \"vanilla\"\n{extra}\n")
    };
    let e = fails(&train("model = \"resnet9\""));
    // The message lists the known models, the new families included.
    assert_at(
        &e,
        14,
        1,
        &[
            "key `model`",
            "unknown model `resnet9`",
            "resnext29_4x64d",
            "densenet121",
            "dla",
        ],
    );
    let e = fails(&train("lr = -0.1"));
    assert_at(&e, 14, 1, &["key `lr`", "positive"]);
    let e = fails(&train("batch_size = 0"));
    assert_at(&e, 14, 1, &["key `batch_size`", "at least 1"]);
    let e = fails(&train(
        "schedule = { type = \"multi-step\", milestones = [20, 10], gamma = 0.1 }",
    ));
    assert_at(
        &e,
        14,
        1,
        &[
            "key `schedule`",
            "`milestones` must increase, found [20, 10]",
        ],
    );
    let e = fails(&train(
        "schedule = { type = \"multi-step\", milestones = [10, 20], gamma = 0.0 }",
    ));
    assert_at(
        &e,
        14,
        1,
        &["key `schedule`", "`gamma` must be a number > 0, found 0"],
    );
    let e = fails(&train("nesterov = true\nmomentum = 0.0"));
    assert_at(&e, 14, 1, &["key `nesterov`", "needs `momentum` > 0"]);
    // A key of another schedule (cosine has no `gamma`) is refused at its table.
    let e = fails(&train("schedule = { type = \"cosine\", gamma = 0.1 }"));
    assert_at(
        &e,
        14,
        12,
        &["unknown key `gamma`: this `type` takes no other keys"],
    );
    let e = fails(&train("mix = { type = \"none\", p = 0.5 }"));
    assert_at(&e, 14, 7, &["unknown key `p`"]);
    // A random resized crop needs its output size; its ranges must be ranges.
    let e = fails(&train("augment = \"random-resized-crop\""));
    assert_at(
        &e,
        9,
        1,
        &[
            "key `crop_size`",
            "required with `augment = \"random-resized-crop\"`",
        ],
    );
    let e = fails(&train(
        "augment = \"random-resized-crop\"\ncrop_size = 24\ncrop_scale = [0.5, 0.2]",
    ));
    assert_at(
        &e,
        16,
        1,
        &["key `crop_scale`", "not a range within (0, 1]"],
    );
    let e = fails(&train("crop_size = 0"));
    assert_at(&e, 14, 1, &["key `crop_size`", "at least 1"]);
    let e = fails(&train("crop_size = 24\ncrop_ratio = [0.5, 2.0]"));
    assert_at(
        &e,
        15,
        1,
        &[
            "key `crop_ratio`",
            "only with `augment = \"random-resized-crop\"`",
        ],
    );
}

/// CRD without a teacher, on mixed batches or from a replay store (which holds no features), and
/// a key that does not apply to a Table 5 architecture: each refused at its line.
#[test]
fn crd_and_the_new_architectures_refuse_what_cannot_work() {
    let e = fails(&format!(
        "{HEAD}\n[[stage]]\nname = \"s\"\nkind = \"train\"\nneeds = [\"data\"]\nmethod = \"crd\"\n"
    ));
    assert_at(&e, 10, 8, &["stage `s` (kind train)", "model", "found 0"]);
    let student = |extra: &str| {
        format!(
            "{HEAD}\n[[stage]]\nname = \"s\"\nkind = \"train\"\nneeds = [\"data\", \"t\", \"r\"]\nmethod = \"crd-kd\"\n{extra}\n\n\
             [[stage]]\nname = \"t\"\nkind = \"train\"\nneeds = [\"data\"]\nmethod = \"vanilla\"\n\n\
             [[stage]]\nname = \"r\"\nkind = \"replay\"\nneeds = [\"data\", \"t\"]\n"
        )
    };
    let e = fails(&student("mix = { type = \"cutmix\", p = 1.0 }"));
    assert_at(
        &e,
        14,
        1,
        &["key `mix`", "`crd-kd` trains on unmixed batches"],
    );
    let e = fails(&student("replay = true"));
    assert_at(&e, 14, 1, &["key `replay`", "penultimate features"]);
    let train = |extra: &str| {
        format!("{HEAD}\n[[stage]]\nname = \"s\"\nkind = \"train\"\nneeds = [\"data\"]\nmethod = \"vanilla\"\n{extra}\n")
    };
    let e = fails(&train("model = \"dla\"\nstem = \"imagenet\""));
    assert_at(
        &e,
        15,
        1,
        &["key `stem`", "`dla`", "resnet18 … resnet200 only"],
    );
    let e = fails(&train("model = \"densenet121\"\nshortcut = \"A\""));
    assert_at(&e, 15, 1, &["key `shortcut`", "option A"]);
}

/// SSKD without a teacher, from a teacher that has no trained self-supervised head, on mixed
/// batches, from a replay store, and with a keep ratio out of range: each refused at its line.
#[test]
fn sskd_refuses_what_cannot_work() {
    let e = fails(&format!(
        "{HEAD}\n[[stage]]\nname = \"s\"\nkind = \"train\"\nneeds = [\"data\"]\nmethod = \"sskd\"\n"
    ));
    assert_at(&e, 10, 8, &["stage `s` (kind train)", "model", "found 0"]);
    let e = fails(&format!(
        "{HEAD}\n[[stage]]\nname = \"h\"\nkind = \"train\"\nneeds = [\"data\"]\nmethod = \"sskd-head\"\n"
    ));
    assert_at(&e, 10, 8, &["stage `h` (kind train)", "model", "found 0"]);
    // A plain teacher in place of the `sskd-head` stage: named at its entry in `needs`.
    let e = fails(&format!(
        "{HEAD}\n[[stage]]\nname = \"s\"\nkind = \"train\"\nneeds = [\"data\", \"t\"]\nmethod = \"sskd\"\n\n\
         [[stage]]\nname = \"t\"\nkind = \"train\"\nneeds = [\"data\"]\nmethod = \"vanilla\"\n"
    ));
    assert_at(
        &e,
        12,
        18,
        &[
            "key `needs` names `t`",
            "trained by `vanilla`",
            "method = \"sskd-head\"",
        ],
    );
    let student = |extra: &str| {
        format!(
            "{HEAD}\n[[stage]]\nname = \"s\"\nkind = \"train\"\nneeds = [\"data\", \"h\"]\nmethod = \"sskd\"\n{extra}\n\n\
             [[stage]]\nname = \"t\"\nkind = \"train\"\nneeds = [\"data\"]\nmethod = \"vanilla\"\n\n\
             [[stage]]\nname = \"h\"\nkind = \"train\"\nneeds = [\"data\", \"t\"]\nmethod = \"sskd-head\"\n"
        )
    };
    let e = fails(&student("mix = { type = \"mixup\", alpha = 0.2 }"));
    assert_at(
        &e,
        14,
        1,
        &["key `mix`", "`sskd` trains on unmixed batches"],
    );
    let e = fails(&student("replay = true"));
    assert_at(&e, 14, 1, &["key `replay`", "penultimate features"]);
    let e = fails(&student("sskd_ratio_ss = 1.5"));
    assert_at(
        &e,
        14,
        1,
        &["key `sskd_ratio_ss`", "must be in [0, 1], found 1.5"],
    );
    let e = fails(&student("sskd_ss_tau = 0.0"));
    assert_at(&e, 14, 1, &["key `sskd_ss_tau`"]);
    let e = fails(&format!(
        "{HEAD}\n[[stage]]\nname = \"h\"\nkind = \"train\"\nneeds = [\"data\", \"t\"]\nmethod = \"sskd-head\"\ntemperature_scaling = true\n\n\
         [[stage]]\nname = \"t\"\nkind = \"train\"\nneeds = [\"data\"]\nmethod = \"vanilla\"\n"
    ));
    assert_at(
        &e,
        14,
        1,
        &[
            "key `temperature_scaling`",
            "`sskd-head` trains a projection head",
        ],
    );
}

#[test]
fn keys_that_do_not_apply_to_the_source() {
    let e = fails("[[stage]]\nname = \"d\"\nkind = \"prepare\"\nsource = \"cifar10\"\npath = \"c\"\ntrain_size = 5\n");
    assert_at(
        &e,
        6,
        1,
        &["key `train_size`", "does not apply to source = \"cifar10\""],
    );
    let e = fails("[[stage]]\nname = \"d\"\nkind = \"prepare\"\nsource = \"cifar100\"\n");
    assert_at(&e, 1, 1, &["key `path`", "required"]);
    let e = fails("[[stage]]\nname = \"d\"\nkind = \"prepare\"\nsource = \"synthetic\"\nlimit = 10\nval = 10\n");
    assert_at(&e, 6, 1, &["key `val`", "leaves none to train on"]);
    let e = fails(
        "[[stage]]\nname = \"d\"\nkind = \"prepare\"\nsource = \"synthetic\"\nstratify = true\n",
    );
    assert_at(&e, 5, 1, &["key `stratify`", "neither is set"]);
    let e = fails("[[stage]]\nname = \"d\"\nkind = \"prepare\"\nsource = \"cifar10\"\npath = \"c\"\nbatches = [0]\n");
    assert_at(&e, 6, 1, &["key `batches`", "1..=5"]);
}

const STUDENT: &str =
    "\n[[stage]]\nname = \"s\"\nkind = \"train\"\nneeds = [\"data\"]\nmethod = \"vanilla\"\n";

#[test]
fn matrix_that_is_not_a_table() {
    let e = fails(&format!("{HEAD}{STUDENT}matrix = [1, 2]\n"));
    assert_at(&e, 14, 10, &["stage `s`", "key `matrix` must be a table"]);
}

#[test]
fn matrix_with_an_empty_list() {
    let e = fails(&format!("{HEAD}{STUDENT}matrix = {{ seed = [] }}\n"));
    assert_at(&e, 14, 19, &["stage `s`", "`matrix.seed` is empty"]);
}

#[test]
fn matrix_cells_that_are_the_same_run() {
    // Equal numbers written differently.
    let e = fails(&format!(
        "{HEAD}{STUDENT}model = \"resnet8\"\nmatrix = {{ lr = [0.1, 0.05, 1e-1] }}\n"
    ));
    // At the repeated value: `1e-1`, the third of `lr`.
    assert_at(
        &e,
        15,
        29,
        &[
            "cells `s.lr=0.1` and `s.lr=1e-1` are the same run",
            "`lr = 0.1` and `1e-1`",
        ],
    );
    // A method's key varied on a method that does not use it: `vanilla` has no `ls_alpha`.
    let e = fails(&format!(
        "{HEAD}\n[[stage]]\nname = \"s\"\nkind = \"train\"\nneeds = [\"data\"]\nmodel = \"resnet8\"\n\
         matrix = {{ method = [\"ls\", \"vanilla\"], ls_alpha = [0.1, 0.2] }}\n"
    ));
    // At the value that makes the second cell: `ls_alpha`'s `0.2`.
    assert_at(
        &e,
        14,
        57,
        &["cells `s.ls_alpha=0.1.method=vanilla` and `s.ls_alpha=0.2.method=vanilla` are the same run"],
    );
}

/// Tables of one `type` in a matrix list are named by the keys that tell them apart; a table
/// whose type is unique keeps its type alone (existing cells keep their names).
#[test]
fn matrix_tables_of_one_type_are_named_apart() {
    let text = format!(
        "{HEAD}{STUDENT}model = \"resnet8\"\nmatrix = {{ mix = [{{ type = \"cutmix\", p = 1.0 }}, \
         {{ type = \"cutmix\", p = 0.5 }}, {{ type = \"mixup\" }}] }}\n"
    );
    let c = pipeline::config::parse(std::path::Path::new("t.toml"), &text, None).unwrap();
    let names: Vec<&str> = c.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "data",
            "s.mix=cutmix_p1.0",
            "s.mix=cutmix_p0.5",
            "s.mix=mixup"
        ]
    );
    let e = fails(&format!(
        "{HEAD}{STUDENT}model = \"resnet8\"\nmatrix = {{ mix = [{{ type = \"cutmix\", p = 1.0 }}, \
         {{ type = \"cutmix\", p = 1.0 }}] }}\n"
    ));
    assert!(e.contains("`matrix.mix` lists `cutmix` twice"), "{e}");
}

#[test]
fn matrix_value_that_cannot_name_a_cell() {
    let e = fails(&format!(
        "{HEAD}{STUDENT}matrix = {{ mix = [{{ alpha = 1.0 }}] }}\n"
    ));
    assert_at(&e, 14, 19, &["`matrix.mix`", "needs a `type` string"]);
    let e = fails(&format!("{HEAD}{STUDENT}matrix = {{ seed = [1, 1] }}\n"));
    assert_at(&e, 14, 23, &["`matrix.seed` lists `1` twice"]);
}

#[test]
fn matrix_cell_with_a_bad_value_names_the_cell_and_the_value() {
    let e = fails(&format!(
        "{HEAD}{STUDENT}matrix = {{ model = [\"resnet20\", \"resnet21\"] }}\n"
    ));
    assert_at(
        &e,
        14,
        33,
        &["stage `s.model=resnet21`", "key `model`", "resnet21"],
    );
}

#[test]
fn matrix_cannot_vary_needs() {
    let e = fails(&format!(
        "{HEAD}{STUDENT}matrix = {{ needs = [[\"data\"]] }}\n"
    ));
    assert_at(&e, 14, 12, &["`needs` cannot vary in a grid"]);
}

/// A follower pairs with the cells of the grid it follows only on keys that mean the same in
/// both kinds: an evaluation's `batch_size` (its inference batch) and `seed` (its Monte-Carlo
/// seed) are not its model's, so it evaluates every cell; a replayed student with a `seed` that
/// no cell of its replay grid has is an error naming the stage, not a panic.
#[test]
fn a_follower_pairs_only_on_keys_of_the_same_meaning() {
    let grid = format!(
        "{HEAD}{STUDENT}matrix = {{ batch_size = [32, 64], seed = [0, 1] }}\n\n\
         [[stage]]\nname = \"eval\"\nkind = \"evaluate\"\nneeds = [\"data\", \"s\"]\nbatch_size = 64\nseed = 7\n\n\
         [[stage]]\nname = \"report\"\nkind = \"report\"\nneeds = [\"eval\"]\n"
    );
    let path = std::path::Path::new("grid.toml");
    let config = pipeline::config::parse(path, &grid, None).unwrap_or_else(|e| panic!("{e}"));
    let mut evals: Vec<&str> = config
        .stages
        .iter()
        .map(|s| s.name.as_str())
        .filter(|n| n.starts_with("eval"))
        .collect();
    evals.sort();
    assert_eq!(
        evals,
        [
            "eval.batch_size=32.seed=0",
            "eval.batch_size=32.seed=1",
            "eval.batch_size=64.seed=0",
            "eval.batch_size=64.seed=1"
        ]
    );
    // A replayed student pairs with the replay cell of its own `seed`: there is none.
    let e = fails(&format!(
        "{HEAD}\n[[stage]]\nname = \"s\"\nkind = \"train\"\nneeds = [\"data\"]\nmethod = \"vanilla\"\n\n\
         [[stage]]\nname = \"r\"\nkind = \"replay\"\nneeds = [\"data\", \"s\"]\nmatrix = {{ seed = [0, 1] }}\n\n\
         [[stage]]\nname = \"on\"\nkind = \"train\"\nneeds = [\"data\", \"s\", \"r\"]\nmethod = \"on-ldl\"\nreplay = true\nseed = 7\n"
    ));
    assert_at(
        &e,
        21,
        1,
        &[
            "stage `on` follows the grid `r`",
            "no cell of `r` has its `seed = 7`",
        ],
    );
}

/// What a stage reads from its inputs is checked with the file, not when the stage starts
/// (after days of upstream training in a grid): a validation split, a teacher's dropout, a
/// replay store's epochs, a held-out split the training set can afford.
#[test]
fn what_a_stage_reads_from_its_inputs_is_checked_before_anything_runs() {
    let teacher =
        "\n[[stage]]\nname = \"t\"\nkind = \"train\"\nneeds = [\"data\"]\nmethod = \"vanilla\"\n";
    let e = fails(&format!("{HEAD}{STUDENT}temperature_scaling = true\n"));
    assert_at(
        &e,
        12,
        10,
        &[
            "stage `s`: key `needs` names `data`",
            "no validation split",
            "`temperature_scaling`",
        ],
    );
    let e = fails(&format!(
        "{HEAD}{teacher}\n[[stage]]\nname = \"s\"\nkind = \"train\"\nneeds = [\"data\", \"t\"]\nmethod = \"on-ldl\"\nteacher_mc = 4\n"
    ));
    assert_at(
        &e,
        18,
        18,
        &[
            "stage `s`: key `needs` names `t`",
            "teacher_mc = 4 needs teachers trained with dropout",
        ],
    );
    let e = fails(&format!(
        "{HEAD}{teacher}\n[[stage]]\nname = \"e\"\nkind = \"evaluate\"\nneeds = [\"data\", \"t\"]\nmc_samples = 8\n"
    ));
    assert_at(
        &e,
        18,
        18,
        &[
            "names `t`",
            "mc_samples = 8 averages Monte-Carlo dropout passes",
        ],
    );
    let e = fails(&format!(
        "{HEAD}{teacher}\n[[stage]]\nname = \"r\"\nkind = \"replay\"\nneeds = [\"data\", \"t\"]\nepochs = 2\n\n\
         [[stage]]\nname = \"s\"\nkind = \"train\"\nneeds = [\"data\", \"t\", \"r\"]\nmethod = \"on-ldl\"\nreplay = true\nepochs = 3\n"
    ));
    assert_at(
        &e,
        24,
        23,
        &[
            "names `r`",
            "which stores 2 epochs, fewer than this stage's 3",
        ],
    );
    let e = fails(&format!("{HEAD}train_size = 100\nval = 100\n"));
    assert_at(
        &e,
        9,
        1,
        &["key `val`", "holding out 100 of the 100 training images"],
    );
}

/// An offline student reading a source its label store will not hold is refused with the file:
/// an unknown `label_source`, one teacher of several unnamed, the ensemble of one teacher,
/// Monte-Carlo labels of a teacher without dropout.
#[test]
fn a_label_source_the_store_will_not_hold_is_refused_before_anything_runs() {
    let teachers =
        "\n[[stage]]\nname = \"a\"\nkind = \"train\"\nneeds = [\"data\"]\nmethod = \"vanilla\"\n\n\
         [[stage]]\nname = \"b\"\nkind = \"train\"\nneeds = [\"data\"]\nmethod = \"vanilla\"\n";
    let labels = |needs: &str| {
        format!("\n[[stage]]\nname = \"l\"\nkind = \"label\"\nneeds = [\"data\", {needs}]\nmc_samples = 4\n")
    };
    let student = |extra: &str| {
        format!("\n[[stage]]\nname = \"s\"\nkind = \"train\"\nneeds = [\"data\", \"l\"]\n{extra}\n")
    };
    let e = fails(&format!(
        "{HEAD}{teachers}{}{}",
        labels("\"a\", \"b\""),
        student("method = \"off-ldl\"\nlabel_source = \"nope\"")
    ));
    assert_at(
        &e,
        30,
        18,
        &[
            "stage `s`: key `needs` names `l`",
            "[\"a\", \"b\", \"ensemble\"]",
            "not the `label_source = \"nope\"`",
        ],
    );
    let e = fails(&format!(
        "{HEAD}{teachers}{}{}",
        labels("\"a\", \"b\""),
        student("method = \"off-ldl\"")
    ));
    assert_at(
        &e,
        30,
        18,
        &["teachers [\"a\", \"b\"]: name the one to learn from"],
    );
    let e = fails(&format!(
        "{HEAD}{teachers}{}{}",
        labels("\"a\""),
        student("method = \"off-en-ldl\"")
    ));
    assert_at(&e, 30, 18, &["no `ensemble` source", "it has [\"a\"]"]);
    let e = fails(&format!(
        "{HEAD}{teachers}{}{}",
        labels("\"a\""),
        student("method = \"off-ldl\"\nlabel_source = \"a.mc\"")
    ));
    assert_at(&e, 30, 18, &["not the `label_source = \"a.mc\"`"]);
}

/// An imported model's normalisation in 0–255 units (mmcv's) is refused at its key.
#[test]
fn import_normalisation_in_other_units() {
    let checkpoint = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/import/resnet8.pth");
    let e = fails(&format!(
        "{HEAD}\n[[stage]]\nname = \"t\"\nkind = \"import\"\npath = \"{}\"\nmodel = \"resnet8\"\n\
         normalize = {{ mean = [123.675, 116.28, 103.53], std = [58.395, 57.12, 57.375] }}\n",
        checkpoint.display()
    ));
    assert_at(
        &e,
        14,
        1,
        &["key `normalize`", "[0, 1] units", "found 123.675"],
    );
}

/// `[slurm]` errors name the sub-table and point at the key; a grid cell's own table, which
/// its job array would ignore, is refused.
#[test]
fn slurm_errors_name_the_sub_table_and_key() {
    let slurm = |table: &str| format!("[slurm]\ntime = \"1:00:00\"\n\n{table}\n\n{HEAD}");
    let e = fails(&slurm("[slurm.kind.train]\ngpus = 1\nqueue = \"fast\""));
    assert_at(&e, 6, 1, &["[slurm.kind.train]: unknown key `queue`"]);
    let e = fails(&slurm("[slurm.kind.bake]\ngpus = 1"));
    assert_at(&e, 4, 13, &["[slurm.kind.bake]: unknown stage kind `bake`"]);
    let e = fails(&slurm("[slurm.stage.data]\ncpus = 2\nthrottle = 0"));
    assert_at(
        &e,
        6,
        12,
        &["[slurm.stage.data] key `throttle`: must be at least 1"],
    );
    let e = fails(&slurm("[slurm.stage.nope]\ncpus = 2"));
    assert_at(&e, 4, 14, &["no stage or grid named `nope`"]);
    let e = fails(&format!(
        "{}{STUDENT}matrix = {{ seed = [0, 1] }}\n",
        slurm("[slurm.stage.\"s.seed=1\"]\ngpus = 1")
    ));
    assert_at(
        &e,
        4,
        14,
        &["`s.seed=1` is a cell of grid `s`", "[slurm.stage.s]"],
    );
    // A time limit not longer than the signal lead (120 s unless set): at the time's key.
    let e = fails(&format!("[slurm]\ntime = \"00:02:00\"\n\n{HEAD}{STUDENT}"));
    assert_at(
        &e,
        2,
        8,
        &["[slurm]: `time` = \"00:02:00\" is not longer than `signal_lead` = 120 s for stage `data`"],
    );
    let e = fails(&format!(
        "[slurm]\ntime = \"01:00:00\"\n\n[slurm.kind.train]\nsignal_lead = 3600\n\n{HEAD}{STUDENT}"
    ));
    assert_at(&e, 5, 15, &["[slurm.kind.train]", "for stage `s`"]);
    let shorter = format!("[slurm]\ntime = \"00:02:00\"\nsignal_lead = 60\n\n{HEAD}{STUDENT}");
    pipeline::config::parse(std::path::Path::new("ok.toml"), &shorter, None)
        .unwrap_or_else(|e| panic!("{e}"));
    // The grid itself takes resources.
    let ok = format!(
        "{}{STUDENT}matrix = {{ seed = [0, 1] }}\n",
        slurm("[slurm.stage.s]\ngpus = 1")
    );
    let config = pipeline::config::parse(std::path::Path::new("ok.toml"), &ok, None)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.slurm.stage["s"].gpus, Some(1));
}
