//! The label stage's unit of resumption: a chunk, a run of consecutive inference batches of one
//! split, holding every teacher's outputs on its images. Each chunk is written atomically into
//! the stage's folder as `chunks/<split>-b<first>-<end>.safetensors` (batches `first..end`),
//! with its own fingerprint and a blake3 hash of each tensor in the file's metadata, so that a
//! killed stage redoes at most the chunk it was computing; the folder is removed once the
//! stage's label stores are written. The stores are assembled from the chunks one source and
//! one chunk at a time (each tensor read from the mapped file is checked against its hash), so
//! memory holds a chunk's rows, not a split's (a full-vector chunk of ImageNet's 1000 classes
//! is 40 MB a teacher at the default 10,000 images; the split is 5 GB a source).
//!
//! The chunk size rule: a chunk is `chunk_size` images rounded down to a whole number of
//! inference batches (at least one batch). Batches are numbered across the whole split and the
//! Monte-Carlo masks drawn from the batch number, so the chunks hold exactly the rows an
//! unchunked pass computes, whatever the chunk size: the final store does not depend on it, or
//! on where a run was killed.

use crate::error::{Result, StageError};
use engine::inference::McSummary;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// How a split of `images` images in batches of `batch_size` is cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    images: usize,
    batch_size: usize,
    chunk_batches: usize,
}

impl Plan {
    /// The plan of the chunk size rule (see the module's documentation).
    pub fn new(images: usize, batch_size: usize, chunk_size: usize) -> Plan {
        let batch_size = batch_size.max(1);
        Plan {
            images,
            batch_size,
            chunk_batches: (chunk_size / batch_size).max(1),
        }
    }

    /// Batches in the split.
    fn batches(&self) -> usize {
        self.images.div_ceil(self.batch_size)
    }

    /// Number of chunks.
    pub fn count(&self) -> usize {
        self.batches().div_ceil(self.chunk_batches)
    }

    /// The batches of chunk `c`.
    pub fn batches_of(&self, c: usize) -> Range<usize> {
        let first = c * self.chunk_batches;
        first..(first + self.chunk_batches).min(self.batches())
    }

    /// The images of chunk `c`, by position in the split.
    pub fn images_of_range(&self, c: usize) -> Range<usize> {
        let b = self.batches_of(c);
        b.start * self.batch_size..(b.end * self.batch_size).min(self.images)
    }

    /// The number of images of chunk `c`.
    pub fn images_of(&self, c: usize) -> usize {
        self.images_of_range(c).len()
    }
}

/// One chunk's outputs, by teacher in the order of `needs`.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// Each teacher's softmax, `n × K` row-major.
    pub probs: Vec<Vec<f32>>,
    /// Each teacher's Monte-Carlo dropout summary, for the teachers trained with dropout.
    pub mc: Vec<Option<McSummary>>,
}

/// What a chunk must hold to be reused: which split and batches, the stage's fingerprint, the
/// teachers and which of them have a Monte-Carlo summary, the number of classes.
pub struct Expect<'a> {
    /// The stage's fingerprint (its parameters and inputs).
    pub stage: &'a str,
    /// The split's name.
    pub split: &'a str,
    /// The teachers' names.
    pub teachers: Vec<String>,
    /// Whether each teacher has a Monte-Carlo summary.
    pub mc: Vec<bool>,
    /// The blake3 of each teacher's `model.safetensors`, in order: a teacher trained again
    /// (`--force`) to other weights keeps its fingerprint, and the chunks of its old weights
    /// are not reused.
    pub weights: Vec<String>,
    /// Classes.
    pub k: usize,
}

/// The metadata key of the teachers' weight hashes a chunk was computed from.
const WEIGHTS: &str = "teacher_weights";

/// The folder of the chunks in the stage folder `dir`.
pub fn folder(dir: &Path) -> PathBuf {
    dir.join("chunks")
}

/// The file of chunk `c` of `split`.
pub fn path(dir: &Path, split: &str, plan: &Plan, c: usize) -> PathBuf {
    let b = plan.batches_of(c);
    folder(dir).join(format!("{split}-b{}-{}.safetensors", b.start, b.end))
}

/// The chunk files of the plan of `batch_size` and `chunk_size` that the folder `dir` holds, of
/// any split, for `pipeline status`. Chunks stored under another `chunk_size` (which a run does not
/// reuse) are not counted, nor files being written. The split's length is not known here, so
/// a chunk shorter than the plan's is taken for the split's last when it starts after every
/// full one of its split.
pub fn stored(dir: &Path, batch_size: usize, chunk_size: usize) -> Vec<PathBuf> {
    let per = Plan::new(0, batch_size, chunk_size).chunk_batches;
    let Ok(entries) = std::fs::read_dir(folder(dir)) else {
        return Vec::new();
    };
    // (split, first batch, end) of a file named as a chunk starting where the plan's do.
    let chunk = |name: &str| -> Option<(String, usize, usize)> {
        let (split, range) = name.strip_suffix(".safetensors")?.rsplit_once("-b")?;
        let (first, end) = range.split_once('-')?;
        let (first, end): (usize, usize) = (first.parse().ok()?, end.parse().ok()?);
        (first % per == 0 && end > first && end - first <= per)
            .then(|| (split.to_owned(), first, end))
    };
    let found: Vec<(String, usize, usize, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let (split, first, end) = chunk(&e.file_name().to_string_lossy())?;
            Some((split, first, end, e.path()))
        })
        .collect();
    let full = |(_, first, end, _): &&(String, usize, usize, PathBuf)| end - first == per;
    // The first batch of each split's last full chunk.
    let mut last_full: HashMap<&str, usize> = HashMap::new();
    for (split, first, _, _) in found.iter().filter(full) {
        let f = last_full.entry(split.as_str()).or_insert(*first);
        *f = (*f).max(*first);
    }
    found
        .iter()
        .filter(|c| full(c) || last_full.get(c.0.as_str()).is_none_or(|&f| f < c.1))
        .map(|c| c.3.clone())
        .collect()
}

/// The fingerprint of chunk `c`: the stage's, the split and the batches.
fn fingerprint(e: &Expect, plan: &Plan, c: usize) -> String {
    let b = plan.batches_of(c);
    let doc = format!(
        "{}\n{}\n{}..{}\n{}",
        e.stage, e.split, b.start, b.end, plan.batch_size
    );
    blake3::hash(doc.as_bytes()).to_hex().to_string()
}

/// The little-endian bytes of `v`: a view of it on a little-endian machine (a chunk's outputs
/// are hundreds of MB at K = 1000; a copy would double them), a copy elsewhere.
fn bytes_of(v: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(v))
    } else {
        std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

/// The tensors of a chunk, by name: `<teacher>.probs`, and `<teacher>.mc.mean`, `.mc.std`
/// (`n × K`), `.mc.entropy`, `.mc.mutual_information` (`n`) for a dropout teacher.
fn tensors<'c>(
    e: &Expect,
    chunk: &'c Chunk,
    n: usize,
) -> Vec<(String, Vec<usize>, std::borrow::Cow<'c, [u8]>)> {
    let mut data = Vec::new();
    for (t, probs) in chunk.probs.iter().enumerate() {
        data.push(bytes_of(probs));
        debug_assert_eq!(chunk.mc[t].is_some(), e.mc[t]);
        if let Some(m) = &chunk.mc[t] {
            data.extend([&m.mean, &m.std, &m.entropy, &m.mutual_information].map(|v| bytes_of(v)));
        }
    }
    shapes(e, n)
        .into_iter()
        .zip(data)
        .map(|((name, shape), data)| (name, shape, data))
        .collect()
}

/// The value of a chunk's `format` metadata. Chunks of an older format (a whole-file hash, not
/// one per tensor) are computed again rather than read.
const FORMAT: &str = "2";

/// The metadata key of a tensor's blake3 hash.
fn hash_key(name: &str) -> String {
    format!("blake3:{name}")
}

/// Writes chunk `c` atomically (temporary file, fsync, rename).
pub fn write(dir: &Path, e: &Expect, plan: &Plan, c: usize, chunk: &Chunk) -> Result<()> {
    let file = path(dir, e.split, plan, c);
    let n = plan.images_of(c);
    let owned = tensors(e, chunk, n);
    let mut meta = HashMap::from([
        ("fingerprint".to_string(), fingerprint(e, plan, c)),
        ("format".to_string(), FORMAT.to_string()),
        (WEIGHTS.to_string(), e.weights.join(",")),
    ]);
    // A hash per tensor, so that the store is assembled reading one teacher's rows at a time.
    for (name, _, data) in &owned {
        meta.insert(hash_key(name), blake3::hash(data).to_hex().to_string());
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(name, shape, data)| {
            let view =
                TensorView::new(Dtype::F32, shape.clone(), data).expect("the shape holds the data");
            (name.clone(), view)
        })
        .collect();
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|err| StageError::numeric(format!("{}: {err}", file.display())))?;
    std::fs::create_dir_all(folder(dir)).map_err(|err| StageError::io(folder(dir), err))?;
    datasets::atomic::write_bytes(&file, &bytes)?;
    Ok(())
}

/// A damaged chunk: an error that keeps the stage folder, saying which file to remove.
fn damaged(file: &Path, place: impl Into<String>, what: &str) -> StageError {
    StageError::Damaged {
        path: file.to_owned(),
        place: place.into(),
        message: format!(
            "{what}: a chunk written by this stage is damaged; remove the file and run again to \
             recompute only it"
        ),
    }
}

/// What the chunk file of a chunk holds.
pub enum State {
    /// No file: the chunk is to be computed.
    Missing,
    /// A chunk of an older format, or of other teacher weights: to be computed again.
    Stale(&'static str),
    /// A chunk to reuse, its header checked (its data is checked as it is read).
    Ready(ChunkFile),
}

/// Opens chunk `c` if its file exists, checking its header: fingerprint, every tensor's
/// presence and shape. A damaged header is an error naming the file.
pub fn open(dir: &Path, e: &Expect, plan: &Plan, c: usize) -> Result<State> {
    let file = path(dir, e.split, plan, c);
    let handle = match std::fs::File::open(&file) {
        Ok(f) => f,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(State::Missing),
        Err(err) => return Err(StageError::io(&file, err)),
    };
    // SAFETY: the chunks are this stage's own files, written once by rename and not modified
    // while the stage runs; a truncated file fails the header's checks below.
    let map = unsafe { memmap2::Mmap::map(&handle) }.map_err(|err| StageError::io(&file, err))?;
    let header = |err: safetensors::SafeTensorError| {
        damaged(
            &file,
            "safetensors header",
            &format!("cannot parse ({err})"),
        )
    };
    let (_, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(header)?;
    let st = safetensors::SafeTensors::deserialize(&map).map_err(header)?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Ok(State::Stale(
            "was written by an older version of this program",
        ));
    }
    match meta.get(WEIGHTS) {
        None => {
            return Ok(State::Stale(
                "was written by an older version of this program",
            ))
        }
        Some(w) if *w != e.weights.join(",") => {
            return Ok(State::Stale(
                "was computed from other teacher weights (a teacher trained again)",
            ))
        }
        Some(_) => {}
    }
    let want = fingerprint(e, plan, c);
    if meta.get("fingerprint") != Some(&want) {
        return Err(damaged(
            &file,
            "metadata `fingerprint`",
            &format!("{:?}, expected {want}", meta.get("fingerprint")),
        ));
    }
    let expected = shapes(e, plan.images_of(c));
    let count = expected.len();
    for (name, shape) in expected {
        let view = st
            .tensor(&name)
            .map_err(|_| damaged(&file, format!("tensor `{name}`"), "missing"))?;
        if view.dtype() != Dtype::F32 || view.shape() != shape.as_slice() {
            return Err(damaged(
                &file,
                format!("tensor `{name}`"),
                &format!(
                    "{:?} {:?}, expected F32 {shape:?}",
                    view.dtype(),
                    view.shape()
                ),
            ));
        }
        if !meta.contains_key(&hash_key(&name)) {
            return Err(damaged(
                &file,
                format!("metadata `{}`", hash_key(&name)),
                "missing",
            ));
        }
    }
    if st.len() != count {
        return Err(damaged(
            &file,
            "tensors",
            &format!("{} tensors, expected {count}", st.len()),
        ));
    }
    drop(st);
    Ok(State::Ready(ChunkFile { file, map, meta }))
}

/// The names and shapes of the tensors of a chunk of `n` images (as [`tensors`] writes them).
fn shapes(e: &Expect, n: usize) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for (t, name) in e.teachers.iter().enumerate() {
        out.push((format!("{name}.probs"), vec![n, e.k]));
        if e.mc[t] {
            out.push((format!("{name}.mc.mean"), vec![n, e.k]));
            out.push((format!("{name}.mc.std"), vec![n, e.k]));
            out.push((format!("{name}.mc.entropy"), vec![n]));
            out.push((format!("{name}.mc.mutual_information"), vec![n]));
        }
    }
    out
}

/// A chunk file, mapped, its header checked by [`open`].
pub struct ChunkFile {
    file: PathBuf,
    map: memmap2::Mmap,
    meta: HashMap<String, String>,
}

impl ChunkFile {
    /// The values of tensor `name`, checked against the hash the chunk recorded for it.
    fn tensor(&self, name: &str) -> Result<Vec<f32>> {
        let missing = |_| damaged(&self.file, format!("tensor `{name}`"), "missing");
        let st = safetensors::SafeTensors::deserialize(&self.map).map_err(missing)?;
        let data = st.tensor(name).map_err(missing)?.data();
        let hash = blake3::hash(data).to_hex().to_string();
        let recorded = self.meta.get(&hash_key(name)).map_or("", String::as_str);
        if hash != recorded {
            return Err(damaged(
                &self.file,
                format!("tensor `{name}`"),
                &format!("blake3 {hash}, the chunk recorded {recorded}"),
            ));
        }
        Ok(data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// Teacher `name`'s softmax, `n × K`.
    pub fn probs(&self, name: &str) -> Result<Vec<f32>> {
        self.tensor(&format!("{name}.probs"))
    }

    /// Teacher `name`'s Monte-Carlo dropout summary (the teacher must have one).
    pub fn mc(&self, name: &str) -> Result<McSummary> {
        Ok(McSummary {
            mean: self.tensor(&format!("{name}.mc.mean"))?,
            std: self.tensor(&format!("{name}.mc.std"))?,
            entropy: self.tensor(&format!("{name}.mc.entropy"))?,
            mutual_information: self.tensor(&format!("{name}.mc.mutual_information"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule: whole batches, at least one; the last chunk and batch may be short.
    #[test]
    fn chunks_are_whole_batches_covering_the_split() {
        let p = Plan::new(1000, 64, 300);
        // 300 images → 4 batches of 64 per chunk; 1000 images → 16 batches → 4 chunks.
        assert_eq!(p.count(), 4);
        assert_eq!(p.batches_of(0), 0..4);
        assert_eq!(p.batches_of(3), 12..16);
        assert_eq!(p.images_of(0), 256);
        assert_eq!(p.images_of(3), 1000 - 768);
        let tiny = Plan::new(10, 64, 1);
        assert_eq!(
            (tiny.count(), tiny.batches_of(0), tiny.images_of(0)),
            (1, 0..1, 10)
        );
    }

    /// Chunk `c` whole, as the label stage reads it.
    fn read(dir: &Path, e: &Expect, plan: &Plan, c: usize) -> Result<Chunk> {
        let State::Ready(file) = open(dir, e, plan, c)? else {
            panic!("chunk {c} is missing or stale");
        };
        let mut chunk = Chunk {
            probs: Vec::new(),
            mc: Vec::new(),
        };
        for (t, name) in e.teachers.iter().enumerate() {
            chunk.probs.push(file.probs(name)?);
            chunk
                .mc
                .push(if e.mc[t] { Some(file.mc(name)?) } else { None });
        }
        Ok(chunk)
    }

    fn expect(teachers: &[String], mc: &[bool]) -> Expect<'static> {
        Expect {
            stage: "fp",
            split: "train",
            teachers: teachers.to_vec(),
            mc: mc.to_vec(),
            weights: teachers.iter().map(|t| format!("w-{t}")).collect(),
            k: 3,
        }
    }

    /// A chunk comes back as written; a truncated one, one with a flipped data byte, or
    /// another stage's, is refused naming the file.
    #[test]
    fn chunks_round_trip_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let teachers = vec!["a".to_string(), "b".to_string()];
        let mc = [false, true];
        let e = expect(&teachers, &mc);
        let plan = Plan::new(5, 2, 4);
        // Chunk 1: batch 2, one image.
        let chunk = Chunk {
            probs: vec![vec![0.2, 0.3, 0.5], vec![0.1, 0.1, 0.8]],
            mc: vec![
                None,
                Some(McSummary {
                    mean: vec![0.1, 0.2, 0.7],
                    std: vec![0.01, 0.02, 0.03],
                    entropy: vec![0.8],
                    mutual_information: vec![0.05],
                }),
            ],
        };
        write(dir.path(), &e, &plan, 1, &chunk).unwrap();
        assert_eq!(read(dir.path(), &e, &plan, 1).unwrap(), chunk);

        let file = path(dir.path(), "train", &plan, 1);
        assert!(
            file.ends_with("chunks/train-b2-3.safetensors"),
            "{}",
            file.display()
        );
        let good = std::fs::read(&file).unwrap();
        std::fs::write(&file, &good[..good.len() - 7]).unwrap();
        let err = read(dir.path(), &e, &plan, 1).unwrap_err().to_string();
        assert!(
            err.contains("train-b2-3.safetensors") && err.contains("remove the file"),
            "{err}"
        );

        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x40;
        std::fs::write(&file, &flipped).unwrap();
        let err = read(dir.path(), &e, &plan, 1).unwrap_err().to_string();
        assert!(
            err.contains("tensor `") && err.contains("the chunk recorded"),
            "{err}"
        );

        std::fs::write(&file, &good).unwrap();
        let other = Expect {
            stage: "another",
            ..expect(&teachers, &mc)
        };
        let err = read(dir.path(), &other, &plan, 1).unwrap_err().to_string();
        assert!(err.contains("metadata `fingerprint`"), "{err}");
        let no_mc = [false, false];
        let three = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let more = Expect {
            teachers: three,
            mc: vec![false, true, false],
            ..expect(&teachers, &mc)
        };
        let err = read(dir.path(), &more, &plan, 1).unwrap_err().to_string();
        assert!(
            err.contains("tensor `c.probs`") && err.contains("missing"),
            "{err}"
        );
        // A chunk holding more than expected is refused too.
        let err = read(dir.path(), &expect(&teachers, &no_mc), &plan, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("6 tensors, expected 2"), "{err}");
    }

    /// A chunk written by the previous format (one hash of the whole file, no `format` key) is
    /// stale, to be labelled again, not an error; no file is missing.
    #[test]
    fn a_chunk_of_the_previous_format_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let teachers = vec!["a".to_string()];
        let e = expect(&teachers, &[false]);
        let plan = Plan::new(2, 2, 2);
        assert!(matches!(open(dir.path(), &e, &plan, 0), Ok(State::Missing)));
        let data = bytes_of(&[0.5, 0.25, 0.25, 0.1, 0.1, 0.8]);
        let view = TensorView::new(Dtype::F32, vec![2, 3], &data).unwrap();
        let meta = HashMap::from([
            ("fingerprint".to_string(), fingerprint(&e, &plan, 0)),
            (
                "blake3".to_string(),
                blake3::hash(&data).to_hex().to_string(),
            ),
        ]);
        let bytes = safetensors::serialize([("a.probs", view)], Some(meta)).unwrap();
        std::fs::create_dir_all(folder(dir.path())).unwrap();
        std::fs::write(path(dir.path(), "train", &plan, 0), bytes).unwrap();
        assert!(matches!(
            open(dir.path(), &e, &plan, 0),
            Ok(State::Stale(_))
        ));
    }

    /// A chunk computed from other teacher weights (the teacher trained again, its
    /// fingerprint unchanged) is stale, to be labelled again.
    #[test]
    fn a_chunk_of_other_teacher_weights_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let teachers = vec!["a".to_string()];
        let e = expect(&teachers, &[false]);
        let plan = Plan::new(2, 2, 2);
        let chunk = Chunk {
            probs: vec![vec![0.5, 0.25, 0.25, 0.1, 0.1, 0.8]],
            mc: vec![None],
        };
        write(dir.path(), &e, &plan, 0, &chunk).unwrap();
        assert!(matches!(
            open(dir.path(), &e, &plan, 0),
            Ok(State::Ready(_))
        ));
        let retrained = Expect {
            weights: vec!["w-a-retrained".into()],
            ..expect(&teachers, &[false])
        };
        assert!(matches!(
            open(dir.path(), &retrained, &plan, 0),
            Ok(State::Stale(why)) if why.contains("other teacher weights")
        ));
    }

    /// Of the files in `chunks/`, those of the plan are counted, of every split: a last chunk
    /// shorter than the rest too, not a chunk of another `chunk_size` nor a file being written.
    #[test]
    fn stored_chunks_are_those_of_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        let names = |batch_size, chunk_size| -> Vec<String> {
            let mut v: Vec<String> = stored(dir.path(), batch_size, chunk_size)
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert!(names(100, 1000).is_empty());
        let chunks = folder(dir.path());
        std::fs::create_dir_all(&chunks).unwrap();
        for name in [
            "train-b0-10.safetensors",
            "train-b10-20.safetensors",
            "test-b0-4.safetensors",
            "train-b5-10.safetensors",
            "train-b0-20.safetensors",
            ".train-b20-30.safetensors.tmp-123",
            "notes.txt",
        ] {
            std::fs::write(chunks.join(name), b"").unwrap();
        }
        // 1000 images a chunk in batches of 100: 10 batches a chunk.
        assert_eq!(
            names(100, 1000),
            [
                "test-b0-4.safetensors",
                "train-b0-10.safetensors",
                "train-b10-20.safetensors"
            ]
        );
        // 20 batches a chunk: only `train-b0-20`, and `test-b0-4` (a last chunk).
        assert_eq!(
            names(100, 2000),
            ["test-b0-4.safetensors", "train-b0-20.safetensors"]
        );
    }
}
