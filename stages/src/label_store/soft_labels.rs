//! One source's soft labels in memory, as the store holds them: full vectors, or the top-k
//! classes with the remaining mass, expanded one row at a time.

use super::LabelMeta;

/// Soft labels of one source, indexed by sample position, held as the store holds them: full
/// vectors, or (top-k stores) k classes, k probabilities and the remaining mass per sample.
#[derive(Debug, Clone)]
pub struct SoftLabels {
    /// Number of classes.
    pub k: usize,
    /// The store's metadata.
    pub meta: LabelMeta,
    pub(super) rows: Rows,
}

#[derive(Debug, Clone)]
pub(super) enum Rows {
    /// `N × K` probabilities.
    Full(Vec<f32>),
    /// `N × t` classes and probabilities, `N` remaining masses.
    TopK {
        t: usize,
        classes: Vec<u16>,
        probs: Vec<f32>,
        rest: Vec<f32>,
    },
}

impl SoftLabels {
    /// Number of samples.
    pub fn len(&self) -> usize {
        match &self.rows {
            Rows::Full(p) => p.len() / self.k,
            Rows::TopK { rest, .. } => rest.len(),
        }
    }
    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Writes sample `i`'s full distribution into `out` (length K); a top-k row is expanded by
    /// [`expand_top_k`].
    pub fn row_into(&self, i: usize, out: &mut [f32]) {
        let k = self.k;
        match &self.rows {
            Rows::Full(p) => out.copy_from_slice(&p[i * k..(i + 1) * k]),
            Rows::TopK {
                t,
                classes,
                probs,
                rest,
            } => expand_top_k(
                &classes[i * t..(i + 1) * t],
                &probs[i * t..(i + 1) * t],
                rest[i],
                out,
            ),
        }
    }
    /// All distributions as one `N × K` array (for inspection and tests; training uses
    /// [`SoftLabels::row_into`]).
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len() * self.k];
        for (i, row) in out.chunks_exact_mut(self.k).enumerate() {
            self.row_into(i, row);
        }
        out
    }
    /// Bytes the labels occupy in memory.
    pub fn heap_bytes(&self) -> usize {
        match &self.rows {
            Rows::Full(p) => p.len() * 4,
            Rows::TopK {
                classes,
                probs,
                rest,
                ..
            } => classes.len() * 2 + probs.len() * 4 + rest.len() * 4,
        }
    }
}

/// Rebuilds a full distribution from its top-k part: the listed classes get their stored
/// probabilities, and the remaining mass `rest` is spread evenly over the other K − k classes.
pub fn expand_top_k(classes: &[u16], probs: &[f32], rest: f32, out: &mut [f32]) {
    let others = out.len() - classes.len();
    out.fill(if others == 0 {
        0.0
    } else {
        rest / others as f32
    });
    for (&c, &p) in classes.iter().zip(probs) {
        out[c as usize] = p;
    }
}
