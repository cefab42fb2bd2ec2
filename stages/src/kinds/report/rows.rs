//! The rows of a report: which evaluations are seeds of one run (equal settings, see
//! [`crate::StageParams::settings`]), and what each row is called: the method's paper name, `+`
//! for the longer of two schedules, the augmentation by name, and only as many other settings as
//! it takes to tell that report's rows apart (`KD (kd_tau=2)`, `Off-LDL (labels.teacher.model=
//! resnet56)`); a train stage's `label` overrides it.

use crate::artifacts::Evaluation;
use crate::context::Settings;
use crate::science::methods::Method;

/// The evaluations of one cell of the tables: one distinct run (a row) on one model (a column),
/// one evaluation per seed.
#[derive(Debug, Clone)]
pub struct Group {
    /// Row label.
    pub method: String,
    /// Column: the model.
    pub model: String,
    /// One evaluation per seed.
    pub evals: Vec<Evaluation>,
    /// The run's settings (with `ts` = `true` for temperature-scaled metrics).
    pub settings: Settings,
}

/// The settings key that holds a train stage's `label`, seen from an evaluation.
const LABEL_KEY: &str = "model.label";

/// Groups evaluations (each with its run's settings) into distinct runs, in first-seen order,
/// and names them; a calibrated evaluation also makes a `+ TS` group.
pub fn group(evals: &[(Evaluation, Settings)]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for (e, settings) in evals {
        let mut rows = vec![(settings.clone(), e.clone())];
        if let Some(c) = &e.calibrated {
            let mut ts = settings.clone();
            ts.insert("ts".into(), "true".into());
            let calibrated = Evaluation {
                metrics: c.metrics.clone(),
                calibrated: None,
                ..e.clone()
            };
            rows.push((ts, calibrated));
        }
        for (settings, e) in rows {
            let same = |g: &&mut Group| {
                g.settings == settings
                    && g.model == e.model
                    && g.evals[0].method == e.method
                    && g.evals[0].variant == e.variant
            };
            match groups.iter_mut().find(same) {
                Some(g) => g.evals.push(e),
                None => groups.push(Group {
                    method: String::new(),
                    model: e.model.clone(),
                    evals: vec![e],
                    settings,
                }),
            }
        }
    }
    name_rows(&mut groups);
    groups
}

/// The part of a label fixed by the method alone: paper name, variant tags, `+ TS`.
#[derive(Debug, Clone, PartialEq)]
struct Base {
    name: String,
    tags: Vec<String>,
    ts: bool,
}

fn base(g: &Group) -> Base {
    let e = &g.evals[0];
    let name = Method::parse(&e.method).map_or(e.method.clone(), |m| m.paper_name().into());
    let tags = e
        .variant
        .split(", ")
        .filter(|t| !t.is_empty())
        .map(|t| match t {
            "cutmix" => "CutMix".to_string(),
            "ricap" => "RICAP".into(),
            "cutout" => "Cutout".into(),
            other => other.into(),
        })
        .collect();
    Base {
        name,
        tags,
        ts: g.settings.contains_key("ts"),
    }
}

/// Names every group: its base (an explicit `label`, or the method's paper name and tags) and
/// the settings that tell it apart from the groups of the same base in the same column — so two
/// runs given one `label` are still told apart, by what differs between them.
fn name_rows(groups: &mut [Group]) {
    let bases: Vec<Base> = groups
        .iter()
        .map(|g| match g.settings.get(LABEL_KEY) {
            Some(label) => Base {
                name: label.clone(),
                tags: Vec::new(),
                ts: g.settings.contains_key("ts"),
            },
            None => base(g),
        })
        .collect();
    let mut done = vec![false; groups.len()];
    for i in 0..groups.len() {
        if done[i] {
            continue;
        }
        let members: Vec<usize> = (i..groups.len())
            .filter(|&j| !done[j] && bases[j] == bases[i])
            .collect();
        let mut picked = distinguishing_keys(groups, &same_model_pairs(groups, &members), |_| true);
        if bases[i] != bases[i].trained() {
            // Evaluations by MC dropout also show the training settings that tell their
            // trainings apart from the method's other trainings, as those rows show them.
            let trained = bases[i].trained();
            let plain: Vec<usize> = (0..groups.len()).filter(|&t| bases[t] == trained).collect();
            let pairs: Vec<(usize, usize)> = members
                .iter()
                .flat_map(|&m| plain.iter().map(move |&t| (m, t)))
                .filter(|&(m, t)| groups[m].model == groups[t].model)
                .collect();
            let training = |k: &str| k.starts_with("model.");
            for k in distinguishing_keys(groups, &pairs, training) {
                if !picked.contains(&k) {
                    picked.push(k);
                }
            }
            picked.sort_by_key(|k| priority(&display_key(k)));
        }
        for &j in &members {
            groups[j].method = label(&bases[j], &picked, groups, &members, j);
            done[j] = true;
        }
    }
    // A temperature-scaled row is its training's row, scaled: named after that row, so it
    // keeps the settings that tell the training apart (`KD (kd_tau=4) + TS`).
    for i in 0..groups.len() {
        if !bases[i].ts {
            continue;
        }
        let mut own = groups[i].settings.clone();
        own.remove("ts");
        let unscaled = groups
            .iter()
            .find(|g| g.settings == own && g.model == groups[i].model);
        if let Some(name) = unscaled.map(|g| g.method.clone()) {
            groups[i].method = format!("{name} + TS");
        }
    }
}

/// The tag of an evaluation by Monte-Carlo dropout, a way of evaluating a training rather than
/// another training.
const EVALUATED_BY_MC: &str = "MCDO-S";

impl Base {
    /// The base of the training: without the tag of how it was evaluated.
    fn trained(&self) -> Base {
        Base {
            tags: self
                .tags
                .iter()
                .filter(|t| *t != EVALUATED_BY_MC)
                .cloned()
                .collect(),
            ..self.clone()
        }
    }
}

/// Rank of a displayed key: what the paper's labels show first (the schedule's length, the
/// mixing, the method's keys), then teachers, then the rest.
fn priority(key: &str) -> (u8, usize, String) {
    let rank = if key == "epochs" {
        0
    } else if key.starts_with("mix.") || key == "cutout" {
        1
    } else if [
        "ls_",
        "kd_",
        "wsl_",
        "mt_",
        "teacher_mc",
        "ogr_",
        "label_source",
        "temperature",
    ]
    .iter()
    .any(|p| key.starts_with(p))
    {
        2
    } else if key.starts_with("teacher") || key.starts_with("labels.") {
        3
    } else if key.starts_with("data.") {
        5
    } else if key.starts_with("eval.") {
        6
    } else {
        4
    };
    (rank, key.len(), key.to_string())
}

/// A settings key as shown in a label: the evaluated model's own keys without their `model.`
/// prefix, the evaluation's own keys with an `eval.` prefix.
fn display_key(key: &str) -> String {
    match key.strip_prefix("model.") {
        Some(rest) => rest.to_string(),
        None => format!("eval.{key}"),
    }
}

fn value<'a>(g: &'a Group, key: &str) -> &'a str {
    g.settings.get(key).map_or("none", String::as_str)
}

/// Every two `members` in the same column.
fn same_model_pairs(groups: &[Group], members: &[usize]) -> Vec<(usize, usize)> {
    let mut pairs = Vec::new();
    for (a, &i) in members.iter().enumerate() {
        for &j in &members[a + 1..] {
            if groups[i].model == groups[j].model {
                pairs.push((i, j));
            }
        }
    }
    pairs
}

/// The fewest settings keys among those `keep`s, in [`priority`] order, that tell apart the
/// two groups of every pair that some of them can tell apart (distinct runs of one base always
/// differ in some key).
fn distinguishing_keys(
    groups: &[Group],
    pairs: &[(usize, usize)],
    keep: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut candidates: Vec<String> = Vec::new();
    for &(i, j) in pairs {
        let keys = groups[i].settings.keys().chain(groups[j].settings.keys());
        for k in keys {
            if k != LABEL_KEY
                && keep(k)
                && value(&groups[i], k) != value(&groups[j], k)
                && !candidates.contains(k)
            {
                candidates.push(k.clone());
            }
        }
    }
    candidates.sort_by_key(|k| priority(&display_key(k)));
    let mut picked: Vec<String> = Vec::new();
    let apart = |picked: &[String], i: usize, j: usize| {
        picked
            .iter()
            .any(|k| value(&groups[i], k) != value(&groups[j], k))
    };
    for k in candidates {
        let needed = pairs
            .iter()
            .any(|&(i, j)| !apart(&picked, i, j) && value(&groups[i], &k) != value(&groups[j], &k));
        if needed {
            picked.push(k);
        }
    }
    picked
}

/// The label of group `j`: base name, `+` when `epochs` tells the rows apart and takes exactly
/// two values (the longer gets the `+`), then the tags and the other picked settings.
fn label(base: &Base, picked: &[String], groups: &[Group], members: &[usize], j: usize) -> String {
    let mut name = base.name.clone();
    let mut tags = base.tags.clone();
    for k in picked {
        let shown = display_key(k);
        let v = value(&groups[j], k);
        if shown == "epochs" {
            let mut values: Vec<u64> = members
                .iter()
                .filter_map(|&m| value(&groups[m], k).parse().ok())
                .collect();
            values.sort_unstable();
            values.dedup();
            if values.len() == 2 {
                if v.parse::<u64>().ok() == values.last().copied() {
                    name.push('+');
                }
                continue;
            }
        }
        tags.push(format!("{shown}={v}"));
    }
    if !tags.is_empty() {
        name = format!("{name} ({})", tags.join(", "));
    }
    if base.ts {
        name.push_str(" + TS");
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::science::metrics::compute;

    fn eval(method: &str, variant: &str, model: &str, seed: u64) -> Evaluation {
        Evaluation {
            model_stage: format!("{method}-{model}-{seed}"),
            model: model.into(),
            method: method.into(),
            variant: variant.into(),
            seed,
            metrics: compute(&[0.9, 0.1], &[0], 2, 10),
            calibrated: None,
            classes: vec!["a".into(), "b".into()],
            parameters: 0,
            stage: String::new(),
        }
    }

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn labels(groups: &[Group]) -> Vec<(String, String, usize)> {
        groups
            .iter()
            .map(|g| (g.method.clone(), g.model.clone(), g.evals.len()))
            .collect()
    }

    #[test]
    fn seeds_of_one_run_share_a_row_and_epochs_split_with_a_plus() {
        let short = settings(&[
            ("model.epochs", "240"),
            ("model.schedule.milestones", "[150,180,210]"),
            ("model.method", "on-ldl"),
        ]);
        let long = settings(&[
            ("model.epochs", "350"),
            ("model.schedule.milestones", "[150,200,250,300]"),
            ("model.method", "on-ldl"),
        ]);
        let evals = vec![
            (eval("on-ldl", "cutmix", "resnet20", 0), short.clone()),
            (eval("on-ldl", "cutmix", "resnet20", 1), short.clone()),
            (eval("on-ldl", "cutmix", "resnet20", 0), long.clone()),
            (eval("on-ldl", "cutmix", "resnet20", 1), long.clone()),
            (eval("on-ldl", "cutmix", "resnet20", 2), long),
            (eval("vanilla", "", "resnet20", 0), settings(&[])),
        ];
        // The schedule's milestones change with the epochs: the `+` alone tells the rows apart.
        assert_eq!(
            labels(&group(&evals)),
            [
                ("On-LDL (CutMix)".to_string(), "resnet20".to_string(), 2),
                ("On-LDL+ (CutMix)".into(), "resnet20".into(), 3),
                ("Vanilla".into(), "resnet20".into(), 1),
            ]
        );
    }

    #[test]
    fn only_the_keys_that_tell_rows_apart_are_shown() {
        let kd = |tau: &str, teacher: &str| {
            settings(&[
                ("model.kd_tau", tau),
                ("model.teacher.model", teacher),
                ("model.teacher.epochs", "240"),
                ("model.lr", "0.05"),
            ])
        };
        let evals = vec![
            (eval("kd", "", "resnet20", 0), kd("4", "resnet110")),
            (eval("kd", "", "resnet20", 0), kd("2", "resnet110")),
            (eval("kd", "", "resnet20", 0), kd("2", "resnet56")),
            (eval("kd", "", "resnet20", 1), kd("2", "resnet56")),
            // Another column: differs from the resnet20 runs by its teacher, but no two
            // resnet56 runs need telling apart, so only the keys picked for the row set apply.
            (eval("kd", "", "resnet56", 0), kd("4", "resnet110")),
        ];
        assert_eq!(
            labels(&group(&evals)),
            [
                (
                    "KD (kd_tau=4, teacher.model=resnet110)".to_string(),
                    "resnet20".to_string(),
                    1
                ),
                (
                    "KD (kd_tau=2, teacher.model=resnet110)".into(),
                    "resnet20".into(),
                    1
                ),
                (
                    "KD (kd_tau=2, teacher.model=resnet56)".into(),
                    "resnet20".into(),
                    2
                ),
                (
                    "KD (kd_tau=4, teacher.model=resnet110)".into(),
                    "resnet56".into(),
                    1
                ),
            ]
        );
    }

    #[test]
    fn three_epoch_counts_are_named_and_labels_override() {
        let e = |n: &str| settings(&[("model.epochs", n)]);
        let mut named = e("5");
        named.insert(LABEL_KEY.into(), "my run".into());
        let mut cal = eval("vanilla", "", "resnet8", 0);
        cal.calibrated = Some(crate::artifacts::evaluation::Calibrated {
            temperature: 1.5,
            metrics: cal.metrics.clone(),
        });
        let evals = vec![
            (eval("vanilla", "", "resnet8", 0), e("1")),
            (eval("vanilla", "", "resnet8", 0), e("2")),
            (eval("vanilla", "", "resnet8", 0), e("3")),
            (cal, named),
        ];
        assert_eq!(
            labels(&group(&evals)),
            [
                ("Vanilla (epochs=1)".to_string(), "resnet8".to_string(), 1),
                ("Vanilla (epochs=2)".into(), "resnet8".into(), 1),
                ("Vanilla (epochs=3)".into(), "resnet8".into(), 1),
                ("my run".into(), "resnet8".into(), 1),
                ("my run + TS".into(), "resnet8".into(), 1),
            ]
        );
    }

    /// Two runs given one `label` (a grid over `lr` with a label on its stage) stay two rows,
    /// told apart by what differs; a label alone in its column stays as written.
    #[test]
    fn runs_sharing_a_label_are_told_apart() {
        let run = |lr: &str, label: &str| {
            let mut s = settings(&[("model.lr", lr)]);
            s.insert(LABEL_KEY.into(), label.into());
            s
        };
        let evals = vec![
            (eval("vanilla", "", "resnet8", 0), run("0.1", "ours")),
            (eval("vanilla", "", "resnet8", 1), run("0.1", "ours")),
            (eval("vanilla", "", "resnet8", 0), run("0.05", "ours")),
            (eval("vanilla", "", "resnet20", 0), run("0.1", "ours")),
        ];
        assert_eq!(
            labels(&group(&evals)),
            [
                ("ours (lr=0.1)".to_string(), "resnet8".to_string(), 2),
                ("ours (lr=0.05)".into(), "resnet8".into(), 1),
                ("ours (lr=0.1)".into(), "resnet20".into(), 1),
            ]
        );
    }

    /// A temperature-scaled row is named after its training's row: with two KD temperatures,
    /// `KD (kd_tau=4) + TS`, not a bare `KD + TS`.
    #[test]
    fn a_temperature_scaled_row_keeps_its_trainings_name() {
        let kd = |tau: &str| settings(&[("model.kd_tau", tau)]);
        let mut scaled = eval("kd", "", "resnet8", 0);
        scaled.calibrated = Some(crate::artifacts::evaluation::Calibrated {
            temperature: 1.5,
            metrics: scaled.metrics.clone(),
        });
        let evals = vec![(scaled, kd("4")), (eval("kd", "", "resnet8", 0), kd("2"))];
        assert_eq!(
            labels(&group(&evals)),
            [
                ("KD (kd_tau=4)".to_string(), "resnet8".to_string(), 1),
                ("KD (kd_tau=4) + TS".into(), "resnet8".into(), 1),
                ("KD (kd_tau=2)".into(), "resnet8".into(), 1),
            ]
        );
    }

    /// An MCDO-S row keeps the settings that tell its training apart from the other rows of
    /// its method (`KD (MCDO-S, kd_tau=4)`, not a bare `KD (MCDO-S)`), and MCDO-S rows are
    /// still told apart among themselves; how they were evaluated is not shown twice.
    #[test]
    fn an_mcdo_s_row_keeps_its_trainings_name() {
        let kd = |tau: &str, mc: Option<&str>| {
            let mut s = settings(&[("model.kd_tau", tau), ("model.dropout", "0.2")]);
            if let Some(n) = mc {
                s.insert("mc_samples".into(), n.into());
            }
            s
        };
        let evals = vec![
            (eval("kd", "", "resnet8", 0), kd("2", None)),
            (eval("kd", "", "resnet8", 0), kd("4", None)),
            (eval("kd", "MCDO-S", "resnet8", 0), kd("4", Some("20"))),
        ];
        assert_eq!(
            labels(&group(&evals)),
            [
                ("KD (kd_tau=2)".to_string(), "resnet8".to_string(), 1),
                ("KD (kd_tau=4)".into(), "resnet8".into(), 1),
                ("KD (MCDO-S, kd_tau=4)".into(), "resnet8".into(), 1),
            ]
        );
        // Two MCDO-S evaluations of one training with other passes: told apart by them.
        let evals = vec![
            (eval("kd", "MCDO-S", "resnet8", 0), kd("4", Some("20"))),
            (eval("kd", "MCDO-S", "resnet8", 0), kd("4", Some("50"))),
            (eval("kd", "", "resnet8", 0), kd("4", None)),
        ];
        assert_eq!(
            labels(&group(&evals)),
            [
                (
                    "KD (MCDO-S, eval.mc_samples=20)".to_string(),
                    "resnet8".to_string(),
                    1
                ),
                (
                    "KD (MCDO-S, eval.mc_samples=50)".into(),
                    "resnet8".into(),
                    1
                ),
                ("KD".into(), "resnet8".into(), 1),
            ]
        );
    }
}
