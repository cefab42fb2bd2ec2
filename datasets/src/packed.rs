//! The packed image store: one memory-mappable file per split holding every image of the split
//! as `u8` pixels, the labels and the class names, behind a header with a content hash.
//!
//! Layout (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `LDLPACK\0` |
//! | 8 | 4 | format version (`u32`): 1, images of one size; 2, images of varying sizes |
//! | 12 | 4 | reserved (0) |
//! | 16 | 8 | N, the number of images (`u64`) |
//! | 24 | 4 × 4 | H, W, C, K (`u32` each) |
//! | 40 | 32 | blake3 hash of every byte of the file except these 32 |
//! | 72 | 4 | byte length L of the class-name block |
//! | 76 | L | class names, UTF-8, one per line (`\n`-separated, K lines) |
//! | aligned to 64 | 4·N | labels (`u32`) |
//! | aligned to 64 | N·C·H·W (v1), Σ C·hᵢ·wᵢ (v2) | pixels, image after image, each **CHW** (planar) |
//! | aligned to 64 | 8·N | version 2 only: each image's height and width (`u32` each) |
//!
//! In version 1 every image is H×W (N·C·H·W pixel bytes). In version 2 (ImageFolder images
//! packed with their aspect ratio kept) image i is hᵢ×wᵢ, given by the table that ends the file,
//! and H×W is a bound every image reaches (hᵢ ≥ H, wᵢ ≥ W): a crop of that size fits them all.
//! Version-2 images are not padded (image i starts at the sum of C·hⱼ·wⱼ over j < i from the
//! pixels' start); zero bytes pad the pixels' end to 64, and the table is the file's last 8·N
//! bytes, hashed as the rest.
//!
//! Pixels are stored CHW because the models take NCHW input: the loader's random crop then
//! copies contiguous row segments of each plane straight into the batch, with no transpose in
//! the hot loop, and the CIFAR and STL-10 binaries are planar already. The hash doubles as the
//! dataset's fingerprint.

use crate::atomic;
use crate::error::{DatasetError, Result};
use memmap2::Mmap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The magic bytes at the start of every packed store.
pub const MAGIC: &[u8; 8] = b"LDLPACK\0";
/// The format version of stores whose images share one size.
pub const VERSION: u32 = 1;
/// The format version of stores whose images vary in size.
pub const VERSION_VARYING: u32 = 2;
const HASH_OFFSET: usize = 40;
const NAMES_OFFSET: usize = 72;
/// Bytes per image in a version-2 size table.
const SIZE_ENTRY: usize = 8;

fn align64(x: usize) -> usize {
    x.div_ceil(64) * 64
}

/// The little-endian `u32` at byte `o` of `map`.
fn u32_at(map: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(map[o..o + 4].try_into().expect("4 bytes"))
}

/// Shape and classes of a packed split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreInfo {
    /// Number of images.
    pub n: usize,
    /// Height in pixels (with `varying`: a bound every image's height reaches).
    pub h: usize,
    /// Width in pixels (with `varying`: a bound every image's width reaches).
    pub w: usize,
    /// Channels (3 for RGB).
    pub c: usize,
    /// Class names; their count is K.
    pub classes: Vec<String>,
    /// Images differ in size (format version 2): each one's is [`PackedStore::dims`], and
    /// `h`×`w` is a bound they all reach.
    pub varying: bool,
}

impl StoreInfo {
    /// Number of classes K.
    pub fn k(&self) -> usize {
        self.classes.len()
    }
    /// Bytes per image (with `varying`: per image of the bound's size, `h`×`w`).
    pub fn image_len(&self) -> usize {
        self.c * self.h * self.w
    }
    /// Where the labels and pixels start.
    fn layout(&self) -> (usize, usize) {
        self.checked_layout()
            .map(|l| (l.0, l.1))
            .expect("a store's layout fits in memory (checked when read)")
    }
    /// Where the labels and pixels start and, for images of one size, the file's length; or
    /// `None` when a header's sizes overflow.
    fn checked_layout(&self) -> Option<(usize, usize, Option<usize>)> {
        let names_len = self.classes.join("\n").len();
        let labels_at = align64(NAMES_OFFSET + 4 + names_len);
        let labels_end = labels_at.checked_add(self.n.checked_mul(4)?)?;
        labels_end.checked_add(63)?; // room to round up
        let pixels_at = align64(labels_end);
        let image = self.c.checked_mul(self.h)?.checked_mul(self.w)?;
        let total = if self.varying {
            None
        } else {
            Some(pixels_at.checked_add(self.n.checked_mul(image)?)?)
        };
        Some((labels_at, pixels_at, total))
    }
}

/// Writes a packed store atomically (temporary file, fsync, rename).
pub struct PackedWriter;

impl PackedWriter {
    /// Writes `labels` and `pixels` (N images of one size, CHW each) to `path`; returns the
    /// content hash.
    pub fn write(path: &Path, info: &StoreInfo, labels: &[u32], pixels: &[u8]) -> Result<String> {
        if info.varying {
            return Err(DatasetError::Param {
                name: "pixels",
                message: format!(
                    "{}: images of varying sizes are written with start and push_sized",
                    path.display()
                ),
            });
        }
        if pixels.len() != info.n * info.image_len() {
            return Err(DatasetError::Param {
                name: "pixels",
                message: format!(
                    "{} pixel bytes do not make {} images of {}x{}x{}",
                    pixels.len(),
                    info.n,
                    info.c,
                    info.h,
                    info.w
                ),
            });
        }
        let mut stream = PackedWriter::start(path, info, labels)?;
        stream.push(pixels)?;
        stream.finish()
    }

    /// Starts writing a store of `info.n` images labelled `labels` to `path`; the pixels follow
    /// in any number of [`PackedStream::push`]es (images of one size) or one
    /// [`PackedStream::push_sized`] per image (`info.varying`), so a split larger than memory
    /// is packed chunk by chunk.
    pub fn start(path: &Path, info: &StoreInfo, labels: &[u32]) -> Result<PackedStream> {
        check_labels(info, labels)?;
        let k = info.k();
        let (labels_at, pixels_at) = info.layout();
        let names = info.classes.join("\n");
        let version = if info.varying {
            VERSION_VARYING
        } else {
            VERSION
        };
        let mut head = vec![0u8; labels_at];
        head[..8].copy_from_slice(MAGIC);
        head[8..12].copy_from_slice(&version.to_le_bytes());
        head[16..24].copy_from_slice(&(info.n as u64).to_le_bytes());
        for (i, v) in [info.h, info.w, info.c, k].iter().enumerate() {
            head[24 + 4 * i..28 + 4 * i].copy_from_slice(&(*v as u32).to_le_bytes());
        }
        head[NAMES_OFFSET..NAMES_OFFSET + 4].copy_from_slice(&(names.len() as u32).to_le_bytes());
        head[NAMES_OFFSET + 4..NAMES_OFFSET + 4 + names.len()].copy_from_slice(names.as_bytes());
        let mut label_bytes = vec![0u8; pixels_at - labels_at];
        for (i, l) in labels.iter().enumerate() {
            label_bytes[4 * i..4 * i + 4].copy_from_slice(&l.to_le_bytes());
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&head[..HASH_OFFSET]);
        hasher.update(&head[HASH_OFFSET + 32..]);
        hasher.update(&label_bytes);
        // The hash's place holds zeros until `finish` writes it.
        let mut file = atomic::AtomicFile::create(path)?;
        file.write_all(&head)?;
        file.write_all(&label_bytes)?;
        Ok(PackedStream {
            path: path.to_owned(),
            file,
            hasher,
            left: info.n,
            at: pixels_at,
            shape: (info.c, info.h, info.w),
            sizes: info.varying.then(Vec::new),
        })
    }
}

/// Refuses labels that do not match `info` (count, range) and class names that cannot be
/// written.
fn check_labels(info: &StoreInfo, labels: &[u32]) -> Result<()> {
    let k = info.k();
    if labels.len() != info.n {
        return Err(DatasetError::Param {
            name: "labels",
            message: format!("{} labels for {} images", labels.len(), info.n),
        });
    }
    if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= k) {
        return Err(DatasetError::Param {
            name: "labels",
            message: format!("label {l} of image {i} is outside 0..{k}"),
        });
    }
    if info
        .classes
        .iter()
        .any(|c| c.contains('\n') || c.is_empty())
    {
        return Err(DatasetError::Param {
            name: "classes",
            message: "class names must be non-empty and contain no newline".into(),
        });
    }
    Ok(())
}

/// A packed store being written: its header and labels are written, its pixels come in
/// pieces of whole images.
pub struct PackedStream {
    path: PathBuf,
    file: atomic::AtomicFile,
    hasher: blake3::Hasher,
    /// Images still to come.
    left: usize,
    /// Bytes written so far.
    at: usize,
    /// C, H, W of the store (with `sizes`: H×W the bound every image must reach).
    shape: (usize, usize, usize),
    /// Varying sizes: the size table so far.
    sizes: Option<Vec<u8>>,
}

impl PackedStream {
    /// Appends the pixels of the next images (whole CHW images, in the store's order) of a
    /// store whose images share one size.
    pub fn push(&mut self, pixels: &[u8]) -> Result<()> {
        let (c, h, w) = self.shape;
        let len = c * h * w;
        let whole = len > 0 && pixels.len().is_multiple_of(len);
        if self.sizes.is_some() || !whole || pixels.len() / len.max(1) > self.left {
            return Err(DatasetError::Param {
                name: "pixels",
                message: format!(
                    "{} pixel bytes are not whole images of {len} bytes within the {} images \
                     left for {}{}",
                    pixels.len(),
                    self.left,
                    self.path.display(),
                    if self.sizes.is_some() {
                        " (its images vary in size: push_sized)"
                    } else {
                        ""
                    }
                ),
            });
        }
        self.append(pixels)?;
        self.left -= pixels.len() / len;
        Ok(())
    }

    /// Appends the next image, `h`×`w` (CHW), of a store whose images vary in size.
    pub fn push_sized(&mut self, pixels: &[u8], (h, w): (usize, usize)) -> Result<()> {
        let (c, min_h, min_w) = self.shape;
        let refuse = |message: String| {
            Err(DatasetError::Param {
                name: "pixels",
                message,
            })
        };
        let path = self.path.display();
        let Some(sizes) = self.sizes.as_mut() else {
            return refuse(format!(
                "{path} holds images of one size: use push, not push_sized"
            ));
        };
        if self.left == 0 {
            return refuse(format!("{path} holds no more images"));
        }
        if h < min_h || w < min_w || h > u32::MAX as usize || w > u32::MAX as usize {
            return refuse(format!(
                "an image of {h}x{w} cannot go in {path}, whose images are each at least \
                 {min_h}x{min_w} (and at most 2^32 - 1 on a side)"
            ));
        }
        if c.checked_mul(h).and_then(|l| l.checked_mul(w)) != Some(pixels.len()) {
            return refuse(format!(
                "{} pixel bytes are not a {c}x{h}x{w} image",
                pixels.len()
            ));
        }
        sizes.extend_from_slice(&(h as u32).to_le_bytes());
        sizes.extend_from_slice(&(w as u32).to_le_bytes());
        self.append(pixels)?;
        self.left -= 1;
        Ok(())
    }

    /// Writes `bytes` at the end of the file so far, and hashes them.
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.file.write_all(bytes)?;
        self.at += bytes.len();
        Ok(())
    }

    /// Writes the size table (images of varying sizes) and the hash into the header and puts
    /// the store in place; returns the hash. Every image must have been pushed.
    pub fn finish(mut self) -> Result<String> {
        if self.left != 0 {
            return Err(DatasetError::Param {
                name: "pixels",
                message: format!(
                    "{} is missing {} of its images",
                    self.path.display(),
                    self.left
                ),
            });
        }
        if let Some(sizes) = self.sizes.take() {
            self.append(&vec![0u8; align64(self.at) - self.at])?;
            self.append(&sizes)?;
        }
        let hash = self.hasher.finalize();
        self.file.finish(HASH_OFFSET as u64, hash.as_bytes())?;
        Ok(hash.to_hex().to_string())
    }
}

/// A packed split opened read-only through a memory map.
pub struct PackedStore {
    path: PathBuf,
    map: Mmap,
    info: StoreInfo,
    labels_at: usize,
    pixels_at: usize,
    /// Images of varying sizes: where the size table starts and where each image starts (N + 1
    /// offsets, the last one the pixels' end).
    varying: Option<(usize, Vec<usize>)>,
}

impl std::fmt::Debug for PackedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedStore")
            .field("path", &self.path)
            .field("info", &self.info)
            .finish()
    }
}

impl PackedStore {
    /// Opens and structurally validates a store: magic, version, sizes, class names, labels.
    /// The content hash is checked by [`PackedStore::verify`].
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| DatasetError::io(path, e))?;
        // SAFETY: the store is written once by an atomic rename and never modified in place;
        // a concurrent truncation by another program is outside what we can guard against.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| DatasetError::io(path, e))?;
        let info = read_header(&map, path)?;
        let (n, k) = (info.n, info.k());
        let (labels_at, pixels_at) = info.layout();
        let varying = if info.varying {
            Some(read_sizes(&map, &info, pixels_at, path)?)
        } else {
            None
        };
        let store = PackedStore {
            path: path.to_owned(),
            map,
            info,
            labels_at,
            pixels_at,
            varying,
        };
        for i in 0..n {
            let l = store.label(i);
            if l as usize >= k {
                return Err(DatasetError::format(
                    path,
                    format!("label of record {i}"),
                    format!("label {l} is outside 0..{k}"),
                ));
            }
        }
        Ok(store)
    }

    /// Recomputes the content hash and compares it with the one in the header.
    pub fn verify(&self) -> Result<()> {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.map[..HASH_OFFSET]);
        hasher.update(&self.map[HASH_OFFSET + 32..]);
        let actual = hasher.finalize();
        if actual.as_bytes() != &self.map[HASH_OFFSET..HASH_OFFSET + 32] {
            return Err(DatasetError::format(
                &self.path,
                "content hash (bytes 40..72)",
                format!(
                    "header says {}, contents hash to {} (file corrupted)",
                    self.hash(),
                    actual.to_hex()
                ),
            ));
        }
        Ok(())
    }

    /// The content hash recorded in the header, hex-encoded: the split's fingerprint.
    pub fn hash(&self) -> String {
        let bytes: [u8; 32] = self.map[HASH_OFFSET..HASH_OFFSET + 32]
            .try_into()
            .expect("32 bytes");
        blake3::Hash::from_bytes(bytes).to_hex().to_string()
    }

    /// The file this store was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Shape and classes.
    pub fn info(&self) -> &StoreInfo {
        &self.info
    }
    /// Number of images.
    pub fn len(&self) -> usize {
        self.info.n
    }
    /// Whether the split holds no image.
    pub fn is_empty(&self) -> bool {
        self.info.n == 0
    }
    /// Label of image `i`.
    pub fn label(&self, i: usize) -> u32 {
        let o = self.labels_at + 4 * i;
        u32::from_le_bytes(self.map[o..o + 4].try_into().expect("4 bytes"))
    }
    /// All labels, in order.
    pub fn labels(&self) -> Vec<u32> {
        (0..self.len()).map(|i| self.label(i)).collect()
    }
    /// Pixels of image `i`, CHW, of [`dims`](Self::dims)`(i)`.
    pub fn image(&self, i: usize) -> &[u8] {
        match &self.varying {
            Some((_, offsets)) => {
                &self.map[self.pixels_at + offsets[i]..self.pixels_at + offsets[i + 1]]
            }
            None => {
                let len = self.info.image_len();
                let o = self.pixels_at + i * len;
                &self.map[o..o + len]
            }
        }
    }
    /// Height and width of image `i`.
    pub fn dims(&self, i: usize) -> (usize, usize) {
        match &self.varying {
            Some((table, _)) => {
                let o = table + SIZE_ENTRY * i;
                (
                    u32_at(&self.map, o) as usize,
                    u32_at(&self.map, o + 4) as usize,
                )
            }
            None => (self.info.h, self.info.w),
        }
    }
}

/// The size table of a store whose images vary in size (its `info`, read from its header; its
/// pixels starting at `pixels_at`): where the table starts and each image's offset from the
/// pixels' start, every size checked against the header's bound and the file's length.
fn read_sizes(
    map: &[u8],
    info: &StoreInfo,
    pixels_at: usize,
    path: &Path,
) -> Result<(usize, Vec<usize>)> {
    let bad = |place: String, msg: String| DatasetError::format(path, place, msg);
    let table = info
        .n
        .checked_mul(SIZE_ENTRY)
        .and_then(|t| map.len().checked_sub(t))
        .filter(|&at| at >= pixels_at && at % 64 == 0)
        .ok_or_else(|| {
            bad(
                "size table".into(),
                format!(
                    "a {}-byte file cannot end in the sizes of N={} images after its pixels \
                     (truncated or corrupt)",
                    map.len(),
                    info.n
                ),
            )
        })?;
    let mut offsets = Vec::with_capacity(info.n + 1);
    let mut end = 0usize;
    offsets.push(0);
    for i in 0..info.n {
        let o = table + SIZE_ENTRY * i;
        let (h, w) = (u32_at(map, o) as usize, u32_at(map, o + 4) as usize);
        if h < info.h || w < info.w {
            return Err(bad(
                format!("size of record {i}"),
                format!(
                    "{h}x{w} is smaller than the {}x{} every image has (header)",
                    info.h, info.w
                ),
            ));
        }
        end = info
            .c
            .checked_mul(h)
            .and_then(|l| l.checked_mul(w))
            .and_then(|l| l.checked_add(end))
            .filter(|&e| e <= table - pixels_at)
            .ok_or_else(|| {
                bad(
                    format!("size of record {i}"),
                    format!("{h}x{w}: the images run past the size table at byte {table}"),
                )
            })?;
        offsets.push(end);
    }
    if align64(pixels_at + end) != table {
        return Err(bad(
            "size table".into(),
            format!(
                "the images end at byte {}, but the table starts at byte {table} (truncated or \
                 corrupt)",
                pixels_at + end
            ),
        ));
    }
    Ok((table, offsets))
}

/// The header of a mapped store (`map`, read from `path`): magic, version, sizes and class names,
/// checked against each other and against the file's length.
fn read_header(map: &[u8], path: &Path) -> Result<StoreInfo> {
    let bad = |place: &str, msg: String| DatasetError::format(path, place, msg);
    if map.len() < NAMES_OFFSET + 4 {
        return Err(bad(
            "header",
            format!(
                "file is {} bytes, shorter than the {}-byte header",
                map.len(),
                NAMES_OFFSET + 4
            ),
        ));
    }
    if &map[..8] != MAGIC {
        return Err(bad(
            "magic (bytes 0..8)",
            format!("found {:?}, expected {:?}", &map[..8], MAGIC),
        ));
    }
    let u32_at = |o: usize| u32_at(map, o);
    let version = u32_at(8);
    if version != VERSION && version != VERSION_VARYING {
        return Err(bad(
            "version (bytes 8..12)",
            format!(
                "found version {version}, this program reads versions {VERSION} and \
                 {VERSION_VARYING}"
            ),
        ));
    }
    let n = u64::from_le_bytes(map[16..24].try_into().expect("8 bytes")) as usize;
    let (h, w, c, k) = (
        u32_at(24) as usize,
        u32_at(28) as usize,
        u32_at(32) as usize,
        u32_at(36) as usize,
    );
    let names_len = u32_at(NAMES_OFFSET) as usize;
    if NAMES_OFFSET + 4 + names_len > map.len() {
        return Err(bad(
            "class names (byte 72)",
            format!(
                "block of {names_len} bytes runs past the end of the {}-byte file",
                map.len()
            ),
        ));
    }
    let names = std::str::from_utf8(&map[NAMES_OFFSET + 4..NAMES_OFFSET + 4 + names_len])
        .map_err(|e| bad("class names (byte 76)", format!("not UTF-8: {e}")))?;
    let classes: Vec<String> = if names.is_empty() {
        Vec::new()
    } else {
        names.split('\n').map(str::to_owned).collect()
    };
    if classes.len() != k || k == 0 {
        return Err(bad(
            "class names (byte 76)",
            format!(
                "{} names for K = {k} classes (expected K ≥ 1 names)",
                classes.len()
            ),
        ));
    }
    if h == 0 || w == 0 || c == 0 {
        return Err(bad(
            "image shape (bytes 24..36)",
            format!("H={h}, W={w}, C={c}: every side must be at least 1"),
        ));
    }
    let info = StoreInfo {
        n,
        h,
        w,
        c,
        classes,
        varying: version == VERSION_VARYING,
    };
    // Images of varying sizes are checked against the file's length by `read_sizes`.
    let expected = info.checked_layout().map(|l| l.2.unwrap_or(map.len()));
    if expected != Some(map.len()) {
        return Err(bad(
            "size",
            format!(
                "file is {} bytes, but N={n}, H={h}, W={w}, C={c}, K={k} need {} bytes (truncated or corrupt)",
                map.len(),
                expected.map_or("an impossible number of".into(), |e| e.to_string())
            ),
        ));
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (StoreInfo, Vec<u32>, Vec<u8>) {
        let info = StoreInfo {
            n: 3,
            h: 2,
            w: 2,
            c: 3,
            classes: vec!["a".into(), "b".into()],
            varying: false,
        };
        let pixels: Vec<u8> = (0..36).collect();
        (info, vec![0, 1, 1], pixels)
    }

    /// A folder per test (they run in parallel), removed when dropped.
    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    /// Pixels pushed in pieces make a store whose header hash is the blake3 of every other
    /// byte (computed here from the file) and whose images read back; pieces that are not
    /// whole images, too many bytes, or too few at the end are refused, and an unfinished
    /// store leaves neither a file nor a temporary one.
    #[test]
    fn a_store_streamed_in_pieces_has_its_hash_and_images() {
        let (info, labels, pixels) = sample();
        let d = dir();
        let p = d.path().join("streamed.pack");
        let mut s = PackedWriter::start(&p, &info, &labels).unwrap();
        s.push(&pixels[..12]).unwrap();
        s.push(&pixels[12..]).unwrap();
        let hash = s.finish().unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let mut h = blake3::Hasher::new();
        h.update(&bytes[..40]);
        h.update(&bytes[72..]);
        assert_eq!(hash, h.finalize().to_hex().to_string());
        assert_eq!(&bytes[40..72], h.finalize().as_bytes());
        let store = PackedStore::open(&p).unwrap();
        store.verify().unwrap();
        assert_eq!(store.image(1), &pixels[12..24]);
        assert_eq!(store.label(2), 1);

        let q = d.path().join("refused.pack");
        let mut s = PackedWriter::start(&q, &info, &labels).unwrap();
        assert!(s.push(&pixels[..5]).is_err(), "not a whole image");
        s.push(&pixels[..24]).unwrap();
        assert!(s.push(&pixels[..24]).is_err(), "more than the store holds");
        let e = s.finish().unwrap_err().to_string();
        assert!(e.contains("refused.pack is missing 1 of its images"), "{e}");
        assert!(!q.exists() && !atomic::temp_path(&q).exists());
        let s = PackedWriter::start(&q, &info, &labels).unwrap();
        assert!(atomic::temp_path(&q).exists());
        drop(s);
        assert!(!q.exists() && !atomic::temp_path(&q).exists());
    }

    #[test]
    fn round_trip() {
        let (info, labels, pixels) = sample();
        let d = dir();
        let p = d.path().join("rt.pack");
        let hash = PackedWriter::write(&p, &info, &labels, &pixels).unwrap();
        let s = PackedStore::open(&p).unwrap();
        s.verify().unwrap();
        assert_eq!(s.hash(), hash);
        assert_eq!(s.info(), &info);
        assert_eq!(s.labels(), labels);
        assert_eq!(s.image(1), &pixels[12..24]);
    }

    #[test]
    fn rejects_corruption() {
        let (info, labels, pixels) = sample();
        let d = dir();
        let p = d.path().join("bad.pack");
        PackedWriter::write(&p, &info, &labels, &pixels).unwrap();
        let good = std::fs::read(&p).unwrap();

        let mut b = good.clone();
        b[0] = b'X';
        std::fs::write(&p, &b).unwrap();
        let e = PackedStore::open(&p).unwrap_err().to_string();
        assert!(e.contains("magic") && e.contains("bad.pack"), "{e}");

        let mut b = good.clone();
        b[8] = 9;
        std::fs::write(&p, &b).unwrap();
        let e = PackedStore::open(&p).unwrap_err().to_string();
        assert!(e.contains("found version 9"), "{e}");

        std::fs::write(&p, &good[..good.len() - 1]).unwrap();
        let e = PackedStore::open(&p).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");

        let mut b = good.clone();
        *b.last_mut().unwrap() ^= 1;
        std::fs::write(&p, &b).unwrap();
        let e = PackedStore::open(&p)
            .unwrap()
            .verify()
            .unwrap_err()
            .to_string();
        assert!(e.contains("content hash"), "{e}");

        // C = 0 with N = 2⁶²: the sizes, once multiplied, would wrap to the file's length.
        let mut b = good.clone();
        b[16..24].copy_from_slice(&(1u64 << 62).to_le_bytes());
        b[32..36].copy_from_slice(&0u32.to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        let e = PackedStore::open(&p).unwrap_err().to_string();
        assert!(e.contains("image shape") && e.contains("C=0"), "{e}");
        // N = 2⁶² with a real shape: too large, refused rather than overflowing.
        let mut b = good.clone();
        b[16..24].copy_from_slice(&(1u64 << 62).to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        let e = PackedStore::open(&p).unwrap_err().to_string();
        assert!(e.contains("an impossible number of"), "{e}");
    }

    /// Images of three sizes round-trip through a version-2 store: each one's pixels and size
    /// read back, the header bound and flag too, and the file is laid out as documented (size
    /// table at the end, 64-aligned, after zero padding), its hash the blake3 of every other
    /// byte.
    #[test]
    fn images_of_varying_sizes_round_trip() {
        let info = StoreInfo {
            n: 3,
            h: 2,
            w: 2,
            c: 3,
            classes: vec!["a".into(), "b".into()],
            varying: true,
        };
        let sizes = [(2, 3), (4, 2), (2, 2)];
        let images: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, (h, w))| (0..3 * h * w).map(|p| (p * 7 + i * 50) as u8).collect())
            .collect();
        let d = dir();
        let p = d.path().join("varying.pack");
        let mut s = PackedWriter::start(&p, &info, &[1, 0, 1]).unwrap();
        assert!(s.push(&images[2]).is_err(), "sizes vary: push_sized only");
        assert!(
            s.push_sized(&images[0], (3, 2)).is_ok(),
            "18 bytes are also 3x2"
        );
        let e = s.push_sized(&images[1], (1, 8)).unwrap_err().to_string();
        assert!(e.contains("at least 2x2"), "{e}");
        drop(s);

        let mut s = PackedWriter::start(&p, &info, &[1, 0, 1]).unwrap();
        for (img, &hw) in images.iter().zip(&sizes) {
            s.push_sized(img, hw).unwrap();
        }
        let hash = s.finish().unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 2);
        // Header 76 + 3 bytes of names → labels at 128, pixels at 192, 18 + 24 + 12 = 54
        // pixel bytes → table at 256, 24 bytes.
        assert_eq!(bytes.len(), 256 + 24);
        assert_eq!(&bytes[192..210], &images[0][..]);
        assert!(bytes[246..256].iter().all(|&b| b == 0));
        assert_eq!(&bytes[256..264], &[2, 0, 0, 0, 3, 0, 0, 0]);
        let mut h = blake3::Hasher::new();
        h.update(&bytes[..40]);
        h.update(&bytes[72..]);
        assert_eq!(hash, h.finalize().to_hex().to_string());

        let store = PackedStore::open(&p).unwrap();
        store.verify().unwrap();
        assert_eq!(store.info(), &info);
        for (i, (img, &hw)) in images.iter().zip(&sizes).enumerate() {
            assert_eq!((store.image(i), store.dims(i)), (&img[..], hw), "image {i}");
        }
        assert_eq!(store.labels(), vec![1, 0, 1]);
    }

    /// A version-2 store whose size table disagrees with its pixels or its header's bound,
    /// or that lost bytes, is refused naming the record or the table.
    #[test]
    fn varying_sizes_are_checked_when_opened() {
        let info = StoreInfo {
            n: 2,
            h: 2,
            w: 2,
            c: 1,
            classes: vec!["a".into()],
            varying: true,
        };
        let d = dir();
        let p = d.path().join("varying-bad.pack");
        let mut s = PackedWriter::start(&p, &info, &[0, 0]).unwrap();
        s.push_sized(&[1; 6], (2, 3)).unwrap();
        s.push_sized(&[2; 64], (8, 8)).unwrap();
        s.finish().unwrap();
        let good = std::fs::read(&p).unwrap();
        let table = good.len() - 16;
        let open = |b: &[u8]| {
            std::fs::write(&p, b).unwrap();
            PackedStore::open(&p).unwrap_err().to_string()
        };

        let mut b = good.clone();
        b[table..table + 4].copy_from_slice(&1u32.to_le_bytes());
        let e = open(&b);
        assert!(
            e.contains("size of record 0") && e.contains("1x3 is smaller"),
            "{e}"
        );
        let mut b = good.clone();
        b[table + 12..table + 16].copy_from_slice(&200u32.to_le_bytes());
        let e = open(&b);
        assert!(
            e.contains("size of record 1") && e.contains("run past"),
            "{e}"
        );
        // Pixels at 192, 70 bytes → table at 320; both images 1×1 would end at 194.
        let mut b = good.clone();
        for at in [table, table + 4, table + 8, table + 12] {
            b[at..at + 4].copy_from_slice(&1u32.to_le_bytes());
        }
        b[24..28].copy_from_slice(&1u32.to_le_bytes());
        b[28..32].copy_from_slice(&1u32.to_le_bytes());
        let e = open(&b);
        assert!(e.contains("size table") && e.contains("end at byte"), "{e}");
        let e = open(&good[..good.len() - 8]);
        assert!(e.contains("size table") && e.contains("truncated"), "{e}");
    }
}
