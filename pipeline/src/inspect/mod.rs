//! `pipeline inspect PATH`: a quick look at a label store (`.parquet`), an evaluation's
//! `predictions.parquet`, a prepare stage's `records.parquet`, a packed split (`.pack`) or every
//! such file of a stage folder, in the terminal and without Python: schema, metadata,
//! row counts per source and the first rows with their most probable classes. A replay store's
//! folder shows its `replay.json` and its first epoch file; an epoch file its steps and first
//! rows.

use anyhow::{bail, Context as _, Result};
use arrow::array::{
    Array, FixedSizeListArray, Float32Array, RecordBatch, StringArray, UInt32Array,
};
use datasets::PackedStore;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::file::metadata::{FileMetaData, ParquetMetaData};
use parquet::file::reader::{FileReader, SerializedFileReader};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

/// `println!` that returns an error instead of panicking when standard output is closed
/// (`pipeline inspect … | head`): `main` ends such a run quietly.
macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*)?
    };
}

mod checkpoint;

/// Options of `pipeline inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// A label store (`.parquet`), a packed split (`.pack`), a model checkpoint (a `torch.save`
    /// file, a TorchScript archive, a `.safetensors` file) or a stage folder.
    pub path: std::path::PathBuf,
    /// Rows to show (label store, predictions, replay store), or classes to list for a packed
    /// split (at least 10).
    #[arg(long, default_value_t = 5)]
    pub rows: usize,
    #[command(flatten)]
    pub selection: Selection,
}

/// What an import stage would read of a checkpoint: the same keys, to try them before writing
/// the stage.
#[derive(clap::Args, Debug, Default)]
pub struct Selection {
    /// Checkpoint: the entry holding the network, as the import's `key` (dot-joined through
    /// nested dicts and list indices: `state.model`, `members.1`).
    #[arg(long)]
    pub key: Option<String>,
    /// Checkpoint: only the tensors whose names start with this, as the import's `prefix`.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Checkpoint: the model to check the tensors against, as the import's `model` (default:
    /// the one their names and shapes make).
    #[arg(long)]
    pub model: Option<String>,
}

/// Runs `pipeline inspect`.
pub fn inspect(args: &InspectArgs) -> Result<()> {
    let path = &args.path;
    if let Some(model) = &args.selection.model {
        engine::models::Arch::parse(model).map_err(|e| anyhow::anyhow!("--model: {e}"))?;
    }
    if path.join(stages::replay_store::META_FILE).exists() {
        return replay_folder(path, args.rows);
    }
    if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(ext(p), "parquet" | "pack" | "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!(
                "{}: no .parquet, .pack or .safetensors file to inspect",
                path.display()
            );
        }
        for (i, f) in files.iter().enumerate() {
            if i > 0 {
                outln!();
            }
            one(f, args)?;
        }
        return Ok(());
    }
    one(path, args)
}

fn ext(p: &Path) -> &str {
    p.extension().and_then(|e| e.to_str()).unwrap_or("")
}

/// Inspects one file, by its extension: a checkpoint unless it is a `.parquet` or `.pack`.
fn one(path: &Path, args: &InspectArgs) -> Result<()> {
    if !path.exists() {
        bail!("{}: no such file or folder", path.display());
    }
    let sel = &args.selection;
    let checkpoint_options = sel.key.is_some() || sel.prefix.is_some() || sel.model.is_some();
    match ext(path) {
        "parquet" | "pack" if checkpoint_options => bail!(
            "{}: --key, --prefix and --model apply to model checkpoints only",
            path.display()
        ),
        "parquet" => label_store(path, args.rows),
        "pack" => pack(path, args.rows),
        _ => checkpoint::checkpoint(path, sel).with_context(|| {
            format!(
                "{}: expected a label store (.parquet), a packed split (.pack), a model \
                 checkpoint (.pth, .pt, .safetensors) or a folder",
                path.display()
            )
        }),
    }
}

fn pack(path: &Path, rows: usize) -> Result<()> {
    let store = PackedStore::open(path)?;
    let info = store.info();
    let size = std::fs::metadata(path)?.len();
    outln!("{} — packed split, {} bytes", path.display(), size);
    let shape = if info.varying && info.n > 0 {
        let (mut hs, mut ws) = ((usize::MAX, 0), (usize::MAX, 0));
        for i in 0..info.n {
            let (h, w) = store.dims(i);
            hs = (hs.0.min(h), hs.1.max(h));
            ws = (ws.0.min(w), ws.1.max(w));
        }
        format!(
            "of varying sizes, C = {}, H {}..={}, W {}..={} (each at least {}×{})",
            info.c, hs.0, hs.1, ws.0, ws.1, info.h, info.w
        )
    } else {
        format!("shape C×H×W {}×{}×{}", info.c, info.h, info.w)
    };
    outln!(
        "  images {}  {shape}  classes K = {}",
        info.n,
        info.classes.len()
    );
    store.verify()?;
    outln!("  content hash (fingerprint) {} (verified)", store.hash());
    let mut counts = vec![0usize; info.k()];
    for l in store.labels() {
        counts[l as usize] += 1;
    }
    outln!("  images per class:");
    for (name, c) in info.classes.iter().zip(&counts).take(rows.max(10)) {
        outln!("    {name:<24} {c}");
    }
    if info.k() > rows.max(10) {
        outln!("    … {} more classes", info.k() - rows.max(10));
    }
    Ok(())
}

/// A label store (or one epoch file of a replay store): its Parquet layout, its `ldl.*`
/// metadata, the rows of each source and the first `rows` rows with their top classes.
fn label_store(path: &Path, rows: usize) -> Result<()> {
    // Refuses damaged footers before the parquet crate's reader (which panics on some).
    stages::label_store::open_parquet(path)?;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata()?.len();
    let reader = SerializedFileReader::new(file.try_clone()?)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
    let meta = reader.metadata();
    let fm = meta.file_metadata();
    outln!(
        "{} — Parquet, {} bytes, {} rows in {} row group(s), written by {}",
        path.display(),
        size,
        fm.num_rows(),
        meta.num_row_groups(),
        fm.created_by().unwrap_or("?")
    );
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
    print_columns(builder.schema(), meta)?;
    let classes = print_metadata(fm)?;
    let is_replay = fm
        .key_value_metadata()
        .is_some_and(|kv| kv.iter().any(|e| e.key == "ldl.replay.epoch"));
    // An evaluation's predictions: `probs` per image, and no `source`.
    let is_predictions = builder.schema().column_with_name("source").is_none()
        && builder.schema().column_with_name("probs").is_some();
    // A prepare stage's records.parquet: where each packed image came from.
    let is_records = builder.schema().column_with_name("record").is_some();
    let reader = builder
        .with_batch_size(8192)
        .build()
        .with_context(|| format!("{}: cannot read rows", path.display()))?;
    if is_replay {
        return replay_rows(path, reader, rows);
    }
    if is_predictions {
        return prediction_rows(path, reader, rows, &evaluation_classes(path));
    }
    if is_records {
        return record_rows(path, reader, rows);
    }
    label_rows(path, reader, rows, &classes)
}

/// Each column's type, with the codec and encodings of its first row group's chunk.
fn print_columns(schema: &arrow::datatypes::Schema, meta: &ParquetMetaData) -> Result<()> {
    outln!("  columns:");
    for f in schema.fields() {
        let chunk = meta.row_groups().first().and_then(|rg| {
            rg.columns()
                .iter()
                .find(|c| c.column_path().parts()[0] == *f.name())
        });
        let how = chunk
            .map(|c| {
                let enc: Vec<String> = c.encodings().map(|e| format!("{e}")).collect();
                // The level is not stored in the file: show the codec only.
                let codec = c.compression().to_string();
                let codec = codec.split('(').next().unwrap_or_default().to_owned();
                format!("  [{codec}; {}]", enc.join(", "))
            })
            .unwrap_or_default();
        outln!("    {:<10} {}{how}", f.name(), f.data_type());
    }
    Ok(())
}

/// The `ldl.*` key-value metadata, long values cut at 100 characters; returns the class names
/// of `ldl.classes` (empty without it).
fn print_metadata(fm: &FileMetaData) -> Result<Vec<String>> {
    let mut classes: Vec<String> = Vec::new();
    let Some(kv) = fm.key_value_metadata() else {
        return Ok(classes);
    };
    outln!("  metadata:");
    for e in kv {
        let v = e.value.clone().unwrap_or_default();
        if e.key == "ldl.classes" {
            classes = serde_json::from_str(&v).unwrap_or_default();
        }
        let shown = if v.chars().count() > 100 {
            format!(
                "{}… ({} chars)",
                v.chars().take(100).collect::<String>(),
                v.len()
            )
        } else {
            v
        };
        if e.key.starts_with("ldl.") {
            outln!("    {:<26} {shown}", e.key);
        }
    }
    Ok(classes)
}

/// A label store's rows: how many per source, and the first `rows` (source, index, label and
/// the three most probable classes, named by `classes` where it has them).
fn label_rows(
    path: &Path,
    reader: ParquetRecordBatchReader,
    rows: usize,
    classes: &[String],
) -> Result<()> {
    let mut per_source: BTreeMap<String, usize> = BTreeMap::new();
    let mut shown = Vec::new();
    let name = |c: usize| classes.get(c).cloned().unwrap_or_else(|| c.to_string());
    for batch in reader {
        let batch = batch.with_context(|| format!("{}: cannot read rows", path.display()))?;
        let (Some(src), Some(index), Some(label)) = (
            column::<StringArray>(&batch, "source"),
            column::<UInt32Array>(&batch, "index"),
            column::<UInt32Array>(&batch, "label"),
        ) else {
            bail!(
                "{}: not a label store (columns index, label, source)",
                path.display()
            );
        };
        let list = |name: &str| column::<FixedSizeListArray>(&batch, name).cloned();
        let (full, top) = (list("probs"), (list("topk_classes"), list("topk_probs")));
        for r in 0..batch.num_rows() {
            *per_source.entry(src.value(r).to_owned()).or_default() += 1;
            if shown.len() >= rows {
                continue;
            }
            let best = row_distribution(path, &full, &top, r)?;
            shown.push(format!(
                "    {:<14} {:>7} {:<14} {}",
                src.value(r),
                index.value(r),
                name(label.value(r) as usize),
                top_three(best, name)
            ));
        }
    }
    outln!("  rows per source:");
    for (s, n) in &per_source {
        outln!("    {s:<26} {n}");
    }
    if !shown.is_empty() {
        outln!("  first rows (source, index, label, top classes):");
        for l in shown {
            outln!("{l}");
        }
    }
    Ok(())
}

/// The three most probable classes of a row's (class, probability) pairs, named by `name`.
fn top_three(mut pairs: Vec<(usize, f32)>, name: impl Fn(usize) -> String) -> String {
    pairs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let best: Vec<String> = pairs
        .iter()
        .take(3)
        .map(|(c, v)| format!("{} {:.3}", name(*c), v))
        .collect();
    best.join(", ")
}

/// A prepare stage's `records.parquet`: images per split, and the first `rows` (split, index,
/// record, file).
fn record_rows(path: &Path, reader: ParquetRecordBatchReader, rows: usize) -> Result<()> {
    let mut per_split: Vec<(String, usize)> = Vec::new();
    let mut shown = Vec::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("{}: cannot read rows", path.display()))?;
        let (Some(split), Some(index), Some(record), Some(file)) = (
            column::<StringArray>(&batch, "split"),
            column::<UInt32Array>(&batch, "index"),
            column::<UInt32Array>(&batch, "record"),
            column::<StringArray>(&batch, "file"),
        ) else {
            bail!(
                "{}: not a records file (columns split, index, record, file)",
                path.display()
            );
        };
        for r in 0..batch.num_rows() {
            let s = split.value(r);
            match per_split.last_mut() {
                Some((name, n)) if name == s => *n += 1,
                _ => per_split.push((s.to_string(), 1)),
            }
            if shown.len() < rows {
                let f = if file.is_null(r) { "" } else { file.value(r) };
                shown.push(format!(
                    "    {s:<5} {:>7} {:>7}   {f}",
                    index.value(r),
                    record.value(r)
                ));
            }
        }
    }
    let counts: Vec<String> = per_split.iter().map(|(s, n)| format!("{s} {n}")).collect();
    outln!(
        "  source records of the packed images: {}",
        counts.join(", ")
    );
    if !shown.is_empty() {
        outln!("  first rows (split, index, record, file):");
        for l in shown {
            outln!("{l}");
        }
    }
    Ok(())
}

/// The class names of the evaluation beside `predictions` (its `metrics.json`); none when it is
/// missing or unreadable (the rows then show class indices).
fn evaluation_classes(predictions: &Path) -> Vec<String> {
    let metrics = predictions.with_file_name("metrics.json");
    std::fs::read(metrics)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| serde_json::from_value(v["classes"].clone()).ok())
        .unwrap_or_default()
}

/// An evaluate stage's `predictions.parquet`: how many rows, their accuracy and mean confidence,
/// and the first `rows` (index, label and the three most probable classes, named by `classes`
/// where known).
fn prediction_rows(
    path: &Path,
    reader: ParquetRecordBatchReader,
    rows: usize,
    classes: &[String],
) -> Result<()> {
    let name = |c: usize| classes.get(c).cloned().unwrap_or_else(|| c.to_string());
    let (mut n, mut correct, mut confidence) = (0usize, 0usize, 0f64);
    let mut shown = Vec::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("{}: cannot read rows", path.display()))?;
        let (Some(index), Some(label), Some(probs)) = (
            column::<UInt32Array>(&batch, "index"),
            column::<UInt32Array>(&batch, "label"),
            column::<FixedSizeListArray>(&batch, "probs"),
        ) else {
            bail!(
                "{}: not a label store (columns index, label, source) nor predictions \
                 (columns index, label, probs)",
                path.display()
            );
        };
        for r in 0..batch.num_rows() {
            let p = floats(probs.value(r).as_ref()).with_context(|| {
                format!(
                    "{}: row {}: probs: expected float32 or float16 values",
                    path.display(),
                    n
                )
            })?;
            let (top, max) = p
                .iter()
                .copied()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap_or((0, 0.0));
            n += 1;
            correct += usize::from(top == label.value(r) as usize);
            confidence += f64::from(max);
            if shown.len() < rows {
                let pairs = p.into_iter().enumerate().collect();
                shown.push(format!(
                    "    {:>7} {:<14} {}",
                    index.value(r),
                    name(label.value(r) as usize),
                    top_three(pairs, name)
                ));
            }
        }
    }
    let share = |x: f64| if n == 0 { 0.0 } else { x / n as f64 };
    outln!(
        "  {n} predictions: accuracy {:.2}%, mean confidence {:.4}",
        100.0 * share(correct as f64),
        share(confidence)
    );
    if !shown.is_empty() {
        outln!("  first rows (index, label, top classes):");
        for l in shown {
            outln!("{l}");
        }
    }
    Ok(())
}

/// Row `r`'s (class, probability) pairs: every class from the dense `probs` column, or the
/// stored ones from `topk_classes` and `topk_probs`.
fn row_distribution(
    path: &Path,
    full: &Option<FixedSizeListArray>,
    top: &(Option<FixedSizeListArray>, Option<FixedSizeListArray>),
    r: usize,
) -> Result<Vec<(usize, f32)>> {
    Ok(match (full, top) {
        (Some(p), _) => floats(p.value(r).as_ref())
            .context("probs: expected float32 or float16 values")?
            .into_iter()
            .enumerate()
            .collect(),
        (None, (Some(c), Some(p))) => {
            let c = c.value(r);
            let c = c
                .as_any()
                .downcast_ref::<arrow::array::UInt16Array>()
                .context("uint16 topk_classes")?;
            let p = floats(p.value(r).as_ref())
                .context("topk_probs: expected float32 or float16 values")?;
            c.values().iter().map(|&c| c as usize).zip(p).collect()
        }
        _ => bail!(
            "{}: not a label store (no `probs`, nor `topk_classes` and `topk_probs`)",
            path.display()
        ),
    })
}

/// A replay store's folder: its description, its epoch files, and the first of them.
fn replay_folder(dir: &Path, rows: usize) -> Result<()> {
    let meta = stages::replay_store::read_meta(dir)?;
    let mut epochs: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| ext(p) == "parquet")
        .collect();
    epochs.sort();
    let bytes: u64 = epochs
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let s = &meta.stream;
    outln!(
        "{} — replay store: {} of {} epochs stored, {bytes} bytes ({:.1} per view)",
        dir.display(),
        epochs.len(),
        meta.epochs,
        bytes as f64 / (epochs.len().max(1) * meta.images) as f64
    );
    outln!(
        "  stream: batch_size = {}, augment = {}, cutout = {}, mix = {}, data seed {}",
        s.batch_size,
        as_toml(&s.augment),
        s.cutout,
        as_toml(&s.mix),
        s.data_seed
    );
    if !s.view.is_whole() {
        outln!("  view: {:?}", s.view);
    }
    let teachers: Vec<&str> = meta.teachers.iter().map(|t| t.name.as_str()).collect();
    outln!(
        "  {} images, K = {}, teachers {}, teacher_mc = {}, {} stored as {}{}",
        meta.images,
        meta.classes,
        teachers.join(", "),
        meta.teacher_mc,
        as_toml(&meta.output).trim_matches('"'),
        as_toml(&meta.dtype).trim_matches('"'),
        meta.top_k.map_or(String::new(), |k| format!(", top-{k}"))
    );
    match epochs.first() {
        Some(first) => {
            outln!();
            label_store(first, rows)
        }
        None => Ok(()),
    }
}

/// A value as stages.toml writes it (`"crop-flip"`, `{ type = "cutmix", p = 1.0 }`), from its
/// serde form; `none` for a value TOML cannot hold.
fn as_toml<T: serde::Serialize>(v: &T) -> String {
    toml::Value::try_from(v).map_or_else(|_| "none".into(), |v| v.to_string())
}

/// The largest value of each row of a `FixedSizeList<float32|float16>` column, with its class.
fn row_max(list: &FixedSizeListArray, r: usize) -> Option<(usize, f32)> {
    floats(list.value(r).as_ref())?
        .into_iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

/// Column `name` of `batch` as an array of type `T`, if it has one of that type.
fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Option<&'a T> {
    batch.column_by_name(name)?.as_any().downcast_ref::<T>()
}

/// The values of one list row, from a float32 or a float16 column (stores written with
/// `dtype = "f16"`); `None` for any other type.
fn floats(v: &dyn Array) -> Option<Vec<f32>> {
    if let Some(f) = v.as_any().downcast_ref::<Float32Array>() {
        return Some(f.values().to_vec());
    }
    let h = v.as_any().downcast_ref::<arrow::array::Float16Array>()?;
    Some(h.values().iter().map(|x| x.to_f32()).collect())
}

/// An epoch file of a replay store: its steps, and its first rows with each teacher's largest
/// output (a logit, or a probability) and its class.
fn replay_rows(path: &Path, reader: ParquetRecordBatchReader, rows: usize) -> Result<()> {
    let (mut n, mut steps, mut shown) = (0usize, 0usize, 0usize);
    for batch in reader {
        let batch = batch.with_context(|| format!("{}: cannot read rows", path.display()))?;
        let col = |name: &str| column::<UInt32Array>(&batch, name).cloned();
        let (Some(step), Some(position), Some(index)) =
            (col("step"), col("position"), col("index"))
        else {
            bail!(
                "{}: not a replay epoch (columns step, position, index)",
                path.display()
            );
        };
        n += batch.num_rows();
        steps = steps.max(step.values().iter().max().map_or(0, |s| *s as usize + 1));
        for r in 0..batch.num_rows() {
            if shown >= rows {
                break;
            }
            shown += 1;
            let mut line = format!(
                "    step {:>5} position {:>4} index {:>7}",
                step.value(r),
                position.value(r),
                index.value(r)
            );
            for f in batch.schema().fields().iter().skip(3) {
                let list = column::<FixedSizeListArray>(&batch, f.name());
                let Some((at, v)) = list.and_then(|l| row_max(l, r)) else {
                    continue;
                };
                if let Some(teacher) = f.name().strip_suffix(".topk_probs") {
                    // A top-k row's class is in its `topk_classes` at the same position.
                    let class =
                        column::<FixedSizeListArray>(&batch, &format!("{teacher}.topk_classes"))
                            .and_then(|l| {
                                let v = l.value(r);
                                let v = v.as_any().downcast_ref::<arrow::array::UInt16Array>()?;
                                Some(v.value(at))
                            });
                    if let Some(class) = class {
                        line.push_str(&format!("  {teacher}: top {v:.4} at class {class}"));
                    }
                } else if !f.name().ends_with(".topk_classes") {
                    line.push_str(&format!("  {}: max {v:.4} at class {at}", f.name()));
                }
            }
            outln!("{line}");
        }
    }
    outln!("  {n} rows in {steps} steps");
    Ok(())
}
