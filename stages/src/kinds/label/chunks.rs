//! The label stage's unit of resumption: a chunk, a run of consecutive inference batches of one
//! split, holding every teacher's outputs on its images. Each chunk is written atomically into
//! the stage's folder as `chunks/<split>-b<first>-<end>.safetensors` (batches `first..end`),
//! with its own fingerprint in the file's metadata, so that a killed stage redoes at most the
//! chunk it was computing; the folder is removed once the stage's label stores are written.
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

    /// The number of images of chunk `c`.
    pub fn images_of(&self, c: usize) -> usize {
        let b = self.batches_of(c);
        (b.end * self.batch_size).min(self.images) - b.start * self.batch_size
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
    pub teachers: &'a [String],
    /// Whether each teacher has a Monte-Carlo summary.
    pub mc: &'a [bool],
    /// Classes.
    pub k: usize,
}

/// The folder of the chunks in the stage folder `dir`.
pub fn folder(dir: &Path) -> PathBuf {
    dir.join("chunks")
}

/// The file of chunk `c` of `split`.
pub fn path(dir: &Path, split: &str, plan: &Plan, c: usize) -> PathBuf {
    let b = plan.batches_of(c);
    folder(dir).join(format!("{split}-b{}-{}.safetensors", b.start, b.end))
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

fn bytes_of(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The tensors of a chunk, by name: `<teacher>.probs`, and `<teacher>.mc.mean`, `.mc.std`
/// (`n × K`), `.mc.entropy`, `.mc.mutual_information` (`n`) for a dropout teacher.
fn tensors(e: &Expect, chunk: &Chunk, n: usize) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let mut out = Vec::new();
    for (t, name) in e.teachers.iter().enumerate() {
        out.push((
            format!("{name}.probs"),
            vec![n, e.k],
            bytes_of(&chunk.probs[t]),
        ));
        if let Some(m) = &chunk.mc[t] {
            out.push((format!("{name}.mc.mean"), vec![n, e.k], bytes_of(&m.mean)));
            out.push((format!("{name}.mc.std"), vec![n, e.k], bytes_of(&m.std)));
            out.push((format!("{name}.mc.entropy"), vec![n], bytes_of(&m.entropy)));
            out.push((
                format!("{name}.mc.mutual_information"),
                vec![n],
                bytes_of(&m.mutual_information),
            ));
        }
    }
    out
}

/// Writes chunk `c` atomically (temporary file, fsync, rename).
pub fn write(dir: &Path, e: &Expect, plan: &Plan, c: usize, chunk: &Chunk) -> Result<()> {
    let file = path(dir, e.split, plan, c);
    let n = plan.images_of(c);
    let owned = tensors(e, chunk, n);
    let mut hasher = blake3::Hasher::new();
    for (_, _, data) in &owned {
        hasher.update(data);
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(name, shape, data)| {
            let view =
                TensorView::new(Dtype::F32, shape.clone(), data).expect("the shape holds the data");
            (name.clone(), view)
        })
        .collect();
    let meta = HashMap::from([
        ("fingerprint".to_string(), fingerprint(e, plan, c)),
        ("blake3".to_string(), hasher.finalize().to_hex().to_string()),
    ]);
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

/// Reads chunk `c`, checking its fingerprint, every tensor's name and shape, and its data's
/// hash.
pub fn read(dir: &Path, e: &Expect, plan: &Plan, c: usize) -> Result<Chunk> {
    let file = path(dir, e.split, plan, c);
    let bytes = std::fs::read(&file).map_err(|err| StageError::io(&file, err))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|err| {
        damaged(
            &file,
            "safetensors header",
            &format!("cannot parse ({err})"),
        )
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|err| {
        damaged(
            &file,
            "safetensors header",
            &format!("cannot parse ({err})"),
        )
    })?;
    let meta = header.metadata().clone().unwrap_or_default();
    let want = fingerprint(e, plan, c);
    if meta.get("fingerprint") != Some(&want) {
        return Err(damaged(
            &file,
            "metadata `fingerprint`",
            &format!("{:?}, expected {want}", meta.get("fingerprint")),
        ));
    }
    let n = plan.images_of(c);
    let mut hasher = blake3::Hasher::new();
    let mut get = |name: String, shape: Vec<usize>| -> Result<Vec<f32>> {
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
        hasher.update(view.data());
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    };
    let mut chunk = Chunk {
        probs: Vec::new(),
        mc: Vec::new(),
    };
    for (t, name) in e.teachers.iter().enumerate() {
        chunk
            .probs
            .push(get(format!("{name}.probs"), vec![n, e.k])?);
        chunk.mc.push(if e.mc[t] {
            Some(McSummary {
                mean: get(format!("{name}.mc.mean"), vec![n, e.k])?,
                std: get(format!("{name}.mc.std"), vec![n, e.k])?,
                entropy: get(format!("{name}.mc.entropy"), vec![n])?,
                mutual_information: get(format!("{name}.mc.mutual_information"), vec![n])?,
            })
        } else {
            None
        });
    }
    let hash = hasher.finalize().to_hex().to_string();
    if meta.get("blake3") != Some(&hash) {
        return Err(damaged(
            &file,
            "data",
            &format!("blake3 {hash}, the chunk recorded {:?}", meta.get("blake3")),
        ));
    }
    Ok(chunk)
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

    fn expect<'a>(teachers: &'a [String], mc: &'a [bool]) -> Expect<'a> {
        Expect {
            stage: "fp",
            split: "train",
            teachers,
            mc,
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
        assert!(err.contains("data: blake3"), "{err}");

        std::fs::write(&file, &good).unwrap();
        let other = Expect {
            stage: "another",
            ..expect(&teachers, &mc)
        };
        let err = read(dir.path(), &other, &plan, 1).unwrap_err().to_string();
        assert!(err.contains("metadata `fingerprint`"), "{err}");
        let no_mc = [false, false];
        let three = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let err = read(dir.path(), &expect(&three, &[false, true, false]), &plan, 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tensor `c.probs`") && err.contains("missing"),
            "{err}"
        );
        // Reading with fewer expectations still checks what it reads.
        assert!(read(dir.path(), &expect(&teachers, &no_mc), &plan, 1).is_err());
    }
}
