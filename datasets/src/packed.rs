//! The packed image store: one memory-mappable file per split holding every image of the split
//! as `u8` pixels, the labels and the class names, behind a header with a content hash.
//!
//! Layout (all integers little-endian), format version 1:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `LDLPACK\0` |
//! | 8 | 4 | format version (`u32`, 1) |
//! | 12 | 4 | reserved (0) |
//! | 16 | 8 | N, the number of images (`u64`) |
//! | 24 | 4 × 4 | H, W, C, K (`u32` each) |
//! | 40 | 32 | blake3 hash of every byte of the file except these 32 |
//! | 72 | 4 | byte length L of the class-name block |
//! | 76 | L | class names, UTF-8, one per line (`\n`-separated, K lines) |
//! | aligned to 64 | 4·N | labels (`u32`) |
//! | aligned to 64 | N·C·H·W | pixels, image after image, each **CHW** (planar) |
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
/// The format version this code reads and writes.
pub const VERSION: u32 = 1;
const HASH_OFFSET: usize = 40;
const NAMES_OFFSET: usize = 72;

fn align64(x: usize) -> usize {
    x.div_ceil(64) * 64
}

/// Shape and classes of a packed split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreInfo {
    /// Number of images.
    pub n: usize,
    /// Height in pixels.
    pub h: usize,
    /// Width in pixels.
    pub w: usize,
    /// Channels (3 for RGB).
    pub c: usize,
    /// Class names; their count is K.
    pub classes: Vec<String>,
}

impl StoreInfo {
    /// Number of classes K.
    pub fn k(&self) -> usize {
        self.classes.len()
    }
    /// Bytes per image.
    pub fn image_len(&self) -> usize {
        self.c * self.h * self.w
    }
    fn layout(&self) -> (usize, usize, usize) {
        self.checked_layout()
            .expect("a store's layout fits in memory (checked when read)")
    }
    /// Where the labels and pixels start and the file's length, or `None` when a header's
    /// sizes overflow.
    fn checked_layout(&self) -> Option<(usize, usize, usize)> {
        let names_len = self.classes.join("\n").len();
        let labels_at = align64(NAMES_OFFSET + 4 + names_len);
        let labels_end = labels_at.checked_add(self.n.checked_mul(4)?)?;
        labels_end.checked_add(63)?; // room to round up
        let pixels_at = align64(labels_end);
        let image = self.c.checked_mul(self.h)?.checked_mul(self.w)?;
        let total = pixels_at.checked_add(self.n.checked_mul(image)?)?;
        Some((labels_at, pixels_at, total))
    }
}

/// Writes a packed store atomically (temporary file, fsync, rename).
pub struct PackedWriter;

impl PackedWriter {
    /// Writes `labels` and `pixels` (N images, CHW each) to `path`; returns the content hash.
    pub fn write(path: &Path, info: &StoreInfo, labels: &[u32], pixels: &[u8]) -> Result<String> {
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
    /// in any number of [`PackedStream::push`]es, so a split larger than memory is packed
    /// chunk by chunk.
    pub fn start(path: &Path, info: &StoreInfo, labels: &[u32]) -> Result<PackedStream> {
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
        let (labels_at, pixels_at, _) = info.layout();
        let names = info.classes.join("\n");
        let mut head = vec![0u8; labels_at];
        head[..8].copy_from_slice(MAGIC);
        head[8..12].copy_from_slice(&VERSION.to_le_bytes());
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
            left: info.n * info.image_len(),
            image_len: info.image_len(),
        })
    }
}

/// A packed store being written: its header and labels are written, its pixels come in
/// pieces of whole images.
pub struct PackedStream {
    path: PathBuf,
    file: atomic::AtomicFile,
    hasher: blake3::Hasher,
    /// Pixel bytes still to come.
    left: usize,
    image_len: usize,
}

impl PackedStream {
    /// Appends the pixels of the next images (whole CHW images, in the store's order).
    pub fn push(&mut self, pixels: &[u8]) -> Result<()> {
        if pixels.len() > self.left || !pixels.len().is_multiple_of(self.image_len.max(1)) {
            return Err(DatasetError::Param {
                name: "pixels",
                message: format!(
                    "{} pixel bytes are not whole images of {} bytes within the {} left for {}",
                    pixels.len(),
                    self.image_len,
                    self.left,
                    self.path.display()
                ),
            });
        }
        self.hasher.update(pixels);
        self.file.write_all(pixels)?;
        self.left -= pixels.len();
        Ok(())
    }

    /// Writes the hash into the header and puts the store in place; returns the hash. Every
    /// image must have been pushed.
    pub fn finish(self) -> Result<String> {
        if self.left != 0 {
            return Err(DatasetError::Param {
                name: "pixels",
                message: format!(
                    "{} pixel bytes of {} were never written",
                    self.left,
                    self.path.display()
                ),
            });
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
        let (labels_at, pixels_at, _) = info.layout();
        let store = PackedStore {
            path: path.to_owned(),
            map,
            info,
            labels_at,
            pixels_at,
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
    /// Pixels of image `i`, CHW.
    pub fn image(&self, i: usize) -> &[u8] {
        let len = self.info.image_len();
        let o = self.pixels_at + i * len;
        &self.map[o..o + len]
    }
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
    let u32_at = |o: usize| u32::from_le_bytes(map[o..o + 4].try_into().expect("4 bytes"));
    let version = u32_at(8);
    if version != VERSION {
        return Err(bad(
            "version (bytes 8..12)",
            format!("found version {version}, this program reads version {VERSION}"),
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
    };
    let expected = info.checked_layout().map(|l| l.2);
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
        };
        let pixels: Vec<u8> = (0..36).collect();
        (info, vec![0, 1, 1], pixels)
    }

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ldl-packed-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Pixels pushed in pieces make a store whose header hash is the blake3 of every other
    /// byte (computed here from the file) and whose images read back; pieces that are not
    /// whole images, too many bytes, or too few at the end are refused, and an unfinished
    /// store leaves neither a file nor a temporary one.
    #[test]
    fn a_store_streamed_in_pieces_has_its_hash_and_images() {
        let (info, labels, pixels) = sample();
        let d = dir();
        let p = d.join("streamed.pack");
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

        let q = d.join("refused.pack");
        let mut s = PackedWriter::start(&q, &info, &labels).unwrap();
        assert!(s.push(&pixels[..5]).is_err(), "not a whole image");
        s.push(&pixels[..24]).unwrap();
        assert!(s.push(&pixels[..24]).is_err(), "more than the store holds");
        let e = s.finish().unwrap_err().to_string();
        assert!(
            e.contains("12 pixel bytes") && e.contains("refused.pack"),
            "{e}"
        );
        assert!(!q.exists() && !atomic::temp_path(&q).exists());
        let s = PackedWriter::start(&q, &info, &labels).unwrap();
        assert!(atomic::temp_path(&q).exists());
        drop(s);
        assert!(!q.exists() && !atomic::temp_path(&q).exists());
    }

    #[test]
    fn round_trip() {
        let (info, labels, pixels) = sample();
        let p = dir().join("rt.pack");
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
        let p = dir().join("bad.pack");
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
}
