//! Reader of the ImageFolder layout (`root/<split>/<class>/**/<image file>`, as torchvision's
//! `ImageFolder` and the ImageNet and Tiny-ImageNet downloads use): images are decoded in
//! parallel, converted to RGB, resized so the shorter side is `size` and centre-cropped to
//! `size × size`, giving the bytes of torchvision's `Resize(size)` + `CenterCrop(size)` on the
//! PIL images of its `ImageFolder`; or, for `keep_aspect`, only resized, the aspect ratio kept
//! ([`load_shorter_side`], torchvision's `Resize(size)`). JPEGs are decoded by libjpeg-turbo (what Pillow links), the
//! resize is Pillow's (`view.rs`), checked in `tests/imagefolder_torchvision.rs`.
//!
//! Classes are the split's sub-folders in sorted order (their names become the class names);
//! files are taken in the order of torchvision's `make_dataset`, so that an image's index is its
//! index in torchvision's `ImageFolder` and the packed result is the same on every machine.
//! Class folders are searched recursively (Tiny-ImageNet's train split keeps its images in
//! `<class>/images/`); files with other extensions than torchvision's `IMG_EXTENSIONS` are
//! skipped. Unlike torchvision, names starting with `.` are skipped too: a `.ipynb_checkpoints`
//! folder is not a class and a macOS `._x.jpg` is not an image.
//!
//! A split folder holding `val_annotations.txt` is Tiny-ImageNet's official validation layout
//! instead: every image flat in `images/`, its class named by that file (`<file>\t<class>\t<box>`),
//! taken in the file's order.

use crate::cifar::Split;
use crate::error::{DatasetError, Result};
use crate::packed::StoreInfo;
use crate::view::ViewScratch;
use image::ImageDecoder;
use rayon::prelude::*;
use std::cell::Cell;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

/// torchvision's `IMG_EXTENSIONS`, compared without case.
const EXTENSIONS: [&str; 9] = [
    "jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp",
];

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// The order of Python's `sorted` over names read by `os` functions on Linux: by code point, an
/// undecodable byte b counting as the code point U+DC00 + b (`surrogateescape`).
fn python_order(name: &OsStr) -> Vec<u32> {
    let mut key = Vec::new();
    for chunk in name.as_encoded_bytes().utf8_chunks() {
        key.extend(chunk.valid().chars().map(u32::from));
        key.extend(chunk.invalid().iter().map(|&b| 0xDC00 + u32::from(b)));
    }
    key
}

/// The entries of `dir` but hidden ones (name, path, whether a folder), in Python's order.
fn entries(dir: &Path) -> Result<Vec<(OsString, PathBuf, bool)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DatasetError::io(dir, e))? {
        let entry = entry.map_err(|e| DatasetError::io(dir, e))?;
        let name = entry.file_name();
        if name.as_encoded_bytes().starts_with(b".") {
            continue;
        }
        // Follows symbolic links, as torchvision does.
        let path = entry.path();
        let is_dir = path.is_dir();
        out.push((name, path, is_dir));
    }
    out.sort_by_cached_key(|e| python_order(&e.0));
    Ok(out)
}

/// The image files under `dir` in torchvision's order: `sorted(os.walk(dir))` sorts folders by
/// their path as a string, so a folder's own files come before its sub-folders' and `a b/`
/// before `a/x/` (a space sorts before `/`); each folder's files are sorted by name.
fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut folders = Vec::new();
    walk(dir, &mut folders)?;
    folders.sort_by_cached_key(|f| python_order(f.0.as_os_str()));
    out.extend(folders.into_iter().flat_map(|f| f.1));
    Ok(())
}

/// Every folder under `dir` (itself included) with its image files, sorted by name.
fn walk(dir: &Path, folders: &mut Vec<(PathBuf, Vec<PathBuf>)>) -> Result<()> {
    let mut images = Vec::new();
    for (_, path, is_dir) in entries(dir)? {
        if is_dir {
            walk(&path, folders)?;
        } else if is_image(&path) {
            images.push(path);
        }
    }
    folders.push((dir.to_path_buf(), images));
    Ok(())
}

/// The class folders of `root/<split>`, sorted: the class names.
pub fn classes(root: &Path, split: &str) -> Result<Vec<String>> {
    let dir = root.join(split);
    let mut classes = Vec::new();
    for (name, path, is_dir) in entries(&dir)? {
        if is_dir {
            // Class names are text (dataset.json, the label store, figures).
            classes.push(name.into_string().map_err(|_| {
                DatasetError::format(&path, "class folder", "name is not valid UTF-8: rename it")
            })?);
        }
    }
    if classes.is_empty() {
        return Err(DatasetError::format(
            &dir,
            "split folder",
            "holds no class folder: expected <split>/<class>/<image files>",
        ));
    }
    Ok(classes)
}

/// Decodes one image file into CHW `u8` pixels of `size × size`: torchvision's `Resize(size)` +
/// `CenterCrop(size)` of the RGB image its `ImageFolder` loads, resampled bitwise as Pillow's
/// bilinear filter (see [`ViewScratch::resize_centre_square`]). `scratch` holds the buffers,
/// reused image to image.
pub fn load(path: &Path, size: usize, out: &mut [u8], scratch: &mut LoadScratch) -> Result<()> {
    let (h, w) = decode_file(path, scratch)?;
    out.copy_from_slice(
        scratch
            .view
            .resize_centre_square(&scratch.chw, (3, h, w), size),
    );
    Ok(())
}

/// Decodes one image file into CHW `u8` pixels whose shorter side is `size`, its aspect ratio
/// kept: torchvision's `Resize(size)` of the RGB image its `ImageFolder` loads (see
/// [`ViewScratch::resize_shorter_side`]). Returns the pixels (in `scratch`) and their height
/// and width.
pub fn load_shorter_side<'a>(
    path: &Path,
    size: usize,
    scratch: &'a mut LoadScratch,
) -> Result<(&'a [u8], (usize, usize))> {
    let (h, w) = decode_file(path, scratch)?;
    // A long, thin image grows with its shorter side: the result gets the source's limit.
    let (nh, nw) = crate::view::shorter_side_dims((h, w), size);
    if nh.saturating_mul(nw) > MOST_PIXELS {
        return Err(DatasetError::format(
            path,
            "image",
            format!(
                "{w}×{h} resized to a shorter side of {size} is {nw}×{nh}, more than \
                 {MOST_PIXELS} pixels: too long and thin to keep whole (prepare without \
                 `keep_aspect`)"
            ),
        ));
    }
    Ok(scratch
        .view
        .resize_shorter_side(&scratch.chw, (3, h, w), size))
}

/// Decodes the image at `path` into `scratch.chw` (planar RGB); returns its height and width.
fn decode_file(path: &Path, scratch: &mut LoadScratch) -> Result<(usize, usize)> {
    let bytes = std::fs::read(path).map_err(|e| DatasetError::io(path, e))?;
    let (h, w) = if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        decode_jpeg(&bytes, scratch)
    } else {
        decode_other(&bytes, scratch)
    }
    .map_err(|e| DatasetError::format(path, "image", format!("cannot decode: {e}")))?;
    if w == 0 || h == 0 {
        return Err(DatasetError::format(path, "image", "has no pixels"));
    }
    Ok((h, w))
}

/// Decodes a JPEG file into `scratch.chw` (planar RGB) with libjpeg-turbo's decoder and
/// settings, as Pillow does (integer IDCT, fancy upsampling), so the pixels are Pillow's to
/// the bit; four-channel (CMYK, YCCK) files are converted to RGB by Pillow's formula.
/// Returns the height and width.
fn decode_jpeg(
    bytes: &[u8],
    scratch: &mut LoadScratch,
) -> std::result::Result<(usize, usize), String> {
    let hwc = &mut scratch.hwc;
    let ran_out = Cell::new(false);
    let source = Source {
        bytes,
        ran_out: &ran_out,
    };
    // libjpeg reports fatal errors by unwinding out of its error handler.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let d = mozjpeg::Decompress::new_reader(source)?;
        let (h, w) = (d.height(), d.width());
        check_pixels(h, w).map_err(std::io::Error::other)?;
        let cmyk = d.components().len() == 4;
        let mut image = if cmyk {
            d.to_colorspace(mozjpeg::ColorSpace::JCS_CMYK)?
        } else {
            d.rgb()?
        };
        hwc.resize(h * w * if cmyk { 4 } else { 3 }, 0);
        image.read_scanlines_into::<u8>(hwc)?;
        // Past the last row, a missing end marker is no matter (Pillow stops here too).
        if ran_out.get() {
            return Err(std::io::Error::other(
                "truncated: the image data ends before its last row",
            ));
        }
        image.finish()?;
        std::io::Result::Ok((h, w, cmyk))
    }));
    let (h, w, cmyk) = match decoded {
        Ok(Ok(dims)) => dims,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(panic) => {
            return Err(panic
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "libjpeg failed".into()))
        }
    };
    if cmyk {
        planar_from_cmyk(hwc, h * w, &mut scratch.chw);
    } else {
        planar_from_rgb(hwc, h * w, &mut scratch.chw);
    }
    Ok((h, w))
}

/// A JPEG file's bytes as libjpeg reads them, noting whether it asked for more than there are:
/// libjpeg alone would fill the missing rows grey, where Pillow (so torchvision's loader)
/// refuses the file as truncated.
struct Source<'a> {
    bytes: &'a [u8],
    ran_out: &'a Cell<bool>,
}

impl Read for Source<'_> {
    // mozjpeg reads through `fill_buf`; a direct read follows the same rule.
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.bytes.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.ran_out.set(true);
        }
        Ok(n)
    }
}

impl BufRead for Source<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.bytes.is_empty() {
            self.ran_out.set(true);
        }
        Ok(self.bytes)
    }

    fn consume(&mut self, n: usize) {
        self.bytes = &self.bytes[n..];
    }
}

/// Pillow's limit on an image's pixels (twice `Image.MAX_IMAGE_PIXELS`, where it raises
/// `DecompressionBombError`): a larger image is refused before anything is allocated for it.
const MOST_PIXELS: usize = 2 * 89_478_485;

/// Why an `h`×`w` image is refused, if it is.
fn check_pixels(h: usize, w: usize) -> std::result::Result<(), String> {
    if h.saturating_mul(w) > MOST_PIXELS {
        Err(format!(
            "{w}×{h} is more than {MOST_PIXELS} pixels (Pillow refuses it as a decompression bomb)"
        ))
    } else {
        Ok(())
    }
}

/// Decodes any other format the `image` crate reads into `scratch.chw` (planar RGB, as
/// Pillow's `convert("RGB")`: grey replicated, alpha dropped). Returns the height and width.
fn decode_other(
    bytes: &[u8],
    scratch: &mut LoadScratch,
) -> std::result::Result<(usize, usize), String> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    // Pillow's pixel limit instead of the crate's allocation limit, checked from the header.
    reader.no_limits();
    let decoder = reader.into_decoder().map_err(|e| e.to_string())?;
    let (w, h) = decoder.dimensions();
    let (h, w) = (h as usize, w as usize);
    check_pixels(h, w)?;
    let img = image::DynamicImage::from_decoder(decoder)
        .map_err(|e| e.to_string())?
        .to_rgb8();
    planar_from_rgb(img.as_raw(), h * w, &mut scratch.chw);
    Ok((h, w))
}

/// `n` interleaved RGB pixels into three planes.
fn planar_from_rgb(hwc: &[u8], n: usize, chw: &mut Vec<u8>) {
    chw.resize(3 * n, 0);
    let (r, rest) = chw.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    for (i, p) in hwc.chunks_exact(3).take(n).enumerate() {
        (r[i], g[i], b[i]) = (p[0], p[1], p[2]);
    }
}

/// `n` CMYK pixels as libjpeg decodes them (Adobe's inverted values) into three RGB planes, by
/// Pillow's `CMYK;I` unpacking and its `cmyk2rgb`: with `nk` = 255 − k, each channel is
/// `nk − nk·x/255`, the product rounded as Pillow's `MULDIV255`.
fn planar_from_cmyk(hwc: &[u8], n: usize, chw: &mut Vec<u8>) {
    fn muldiv255(a: u32, b: u32) -> u32 {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    }
    chw.resize(3 * n, 0);
    for (i, p) in hwc.chunks_exact(4).take(n).enumerate() {
        // Pillow's `CMYK;I` inverts each byte; its `k` is then 255 − p[3], so `nk` is p[3].
        let nk = u32::from(p[3]);
        for c in 0..3 {
            chw[c * n + i] = (nk - muldiv255(255 - u32::from(p[c]), nk)) as u8;
        }
    }
}

/// A decoding thread's buffers for [`load`].
#[derive(Debug, Default)]
pub struct LoadScratch {
    /// The decoder's output, interleaved.
    hwc: Vec<u8>,
    /// The decoded image, planar.
    chw: Vec<u8>,
    /// The resampler's buffers.
    view: ViewScratch,
}

/// The image files of split `split` of the ImageFolder at `root` with their labels, in the
/// order [`read`] packs them; `classes` are the training split's class folders, so every split
/// shares one class order.
pub fn split_files(root: &Path, split: &str, classes: &[String]) -> Result<Vec<(PathBuf, u32)>> {
    let dir = root.join(split);
    if let Some(files) = annotated(&dir, classes)? {
        return Ok(files);
    }
    let here = self::classes(root, split)?;
    if let Some(extra) = here.iter().find(|c| !classes.contains(c)) {
        return Err(DatasetError::format(
            dir.join(extra),
            "class folder",
            format!(
                "class `{extra}` is not among the {} classes of the training split",
                classes.len()
            ),
        ));
    }
    let mut files: Vec<(PathBuf, u32)> = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let class_dir = dir.join(class);
        if !class_dir.is_dir() {
            continue; // a split may lack a class (e.g. a small test split)
        }
        let mut images = Vec::new();
        collect_images(&class_dir, &mut images)?;
        if images.is_empty() {
            return Err(DatasetError::format(
                &class_dir,
                "class folder",
                "holds no image (.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff or .webp)",
            ));
        }
        files.extend(images.into_iter().map(|p| (p, label as u32)));
    }
    Ok(files)
}

/// The file naming the classes of Tiny-ImageNet's validation images.
const ANNOTATIONS: &str = "val_annotations.txt";

/// The images of a split folder in Tiny-ImageNet's official validation layout (`images/` and
/// [`ANNOTATIONS`], one `<file>\t<class>\t…` line per image) with their labels among
/// `classes`, in the file's order; `None` for a folder without the file.
fn annotated(dir: &Path, classes: &[String]) -> Result<Option<Vec<(PathBuf, u32)>>> {
    let list = dir.join(ANNOTATIONS);
    if !list.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(&list).map_err(|e| DatasetError::io(&list, e))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| DatasetError::format(&list, "contents", format!("not UTF-8: {e}")))?;
    let mut files = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let place = format!("line {}", i + 1);
        let mut fields = line.split('\t');
        let (Some(name), Some(class)) = (fields.next(), fields.next()) else {
            return Err(DatasetError::format(
                &list,
                place,
                "expected `<image file>\t<class>\t…`",
            ));
        };
        let Some(label) = classes.iter().position(|c| c == class) else {
            return Err(DatasetError::format(
                &list,
                place,
                format!(
                    "class `{class}` is not among the {} classes of the training split",
                    classes.len()
                ),
            ));
        };
        let path = dir.join("images").join(name);
        if !path.is_file() {
            return Err(DatasetError::format(
                &list,
                place,
                format!("lists `{name}`, but {} is not a file", path.display()),
            ));
        }
        files.push((path, label as u32));
    }
    if files.is_empty() {
        return Err(DatasetError::format(&list, "contents", "lists no image"));
    }
    Ok(Some(files))
}

/// Every file a `prepare` of the ImageFolder at `root` reads: the training split's images, then
/// the test split's (and its [`ANNOTATIONS`], which label them), for [`crate::digest`].
pub fn files(root: &Path, train_split: &str, test_split: &str) -> Result<Vec<PathBuf>> {
    let classes = classes(root, train_split)?;
    let mut out = Vec::new();
    for split in [train_split, test_split] {
        let list = root.join(split).join(ANNOTATIONS);
        if list.is_file() {
            out.push(list);
        }
        out.extend(split_files(root, split, &classes)?.into_iter().map(|f| f.0));
    }
    Ok(out)
}

/// Reads split `split` of the ImageFolder at `root`, labelled by `classes` (the training split's
/// class folders, so every split shares one class order); every image becomes `3 × size × size`.
pub fn read(root: &Path, split: &str, classes: &[String], size: usize) -> Result<Split> {
    read_listed(&split_files(root, split, classes)?, classes, size)
}

/// Decodes the images `files[i]` for each `i` of `indices`, in that order, into `out`, each
/// `3 × size × size` (CHW), in parallel: a split too large for memory is packed a chunk of
/// images at a time.
pub fn decode(
    files: &[(PathBuf, u32)],
    indices: &[usize],
    size: usize,
    out: &mut [u8],
) -> Result<()> {
    let len = 3 * size * size;
    assert_eq!(out.len(), indices.len() * len, "one image's room per index");
    out.par_chunks_mut(len)
        .zip(indices.par_iter())
        .try_for_each_init(LoadScratch::default, |scratch, (o, &i)| {
            load(&files[i].0, size, o, scratch)
        })
}

/// An image's CHW pixels with its height and width.
pub type SizedImage = (Vec<u8>, (usize, usize));

/// Decodes the images `files[i]` for each `i` of `indices`, in that order, each resized so its
/// shorter side is `size` ([`load_shorter_side`]), in parallel; returns each one's CHW pixels
/// with its height and width.
pub fn decode_shorter_side(
    files: &[(PathBuf, u32)],
    indices: &[usize],
    size: usize,
) -> Result<Vec<SizedImage>> {
    indices
        .par_iter()
        .map_init(LoadScratch::default, |scratch, &i| {
            load_shorter_side(&files[i].0, size, scratch).map(|(px, dims)| (px.to_vec(), dims))
        })
        .collect()
}

/// Decodes `files` (a [`split_files`] list: paths and labels) into a split of `classes`, every
/// image `3 × size × size`.
pub fn read_listed(files: &[(PathBuf, u32)], classes: &[String], size: usize) -> Result<Split> {
    if size == 0 {
        return Err(DatasetError::Param {
            name: "image_size",
            message: "must be at least 1, found 0".into(),
        });
    }
    let info = StoreInfo {
        n: files.len(),
        h: size,
        w: size,
        c: 3,
        classes: classes.to_vec(),
        varying: false,
    };
    let mut pixels = vec![0u8; files.len() * info.image_len()];
    let all: Vec<usize> = (0..files.len()).collect();
    decode(files, &all, size, &mut pixels)?;
    let labels = files.iter().map(|f| f.1).collect();
    Ok((info, labels, pixels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    fn write(path: &Path, img: &RgbImage) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        img.save(path).unwrap();
    }

    #[test]
    fn reads_classes_in_sorted_order_with_exact_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // PNG is lossless: pixels must come back exactly, in CHW order.
        let img = RgbImage::from_fn(4, 4, |x, y| Rgb([x as u8 * 10, y as u8 * 10, 7]));
        write(&root.join("train/zebra/b.png"), &img);
        write(&root.join("train/zebra/nested/a.PNG"), &img);
        write(&root.join("train/ant/x.png"), &RgbImage::new(4, 4));
        std::fs::write(root.join("train/ant/notes.txt"), "skipped").unwrap();
        let classes = classes(root, "train").unwrap();
        assert_eq!(classes, ["ant", "zebra"]);
        let (info, labels, pixels) = read(root, "train", &classes, 4).unwrap();
        assert_eq!((info.n, info.c, info.h, info.w), (3, 3, 4, 4));
        assert_eq!(labels, [0, 1, 1]);
        assert!(pixels[..48].iter().all(|p| *p == 0));
        let second = &pixels[48..96];
        for y in 0..4 {
            for x in 0..4 {
                assert_eq!(second[y * 4 + x], x as u8 * 10);
                assert_eq!(second[16 + y * 4 + x], y as u8 * 10);
                assert_eq!(second[32 + y * 4 + x], 7);
            }
        }
    }

    #[test]
    fn files_come_in_torchvision_order() {
        // torchvision's make_dataset walks `sorted(os.walk(class_dir))`: the folder `c` first,
        // then `c/a`, `c/a b` (a space sorts before `/`) and `c/a/deep`; by name within each.
        // (Checked with Python's own `sorted(os.walk(...))` on this tree.)
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let tiny = RgbImage::new(2, 2);
        for f in [
            "z.png",
            "b.bmp",
            "a/y.png",
            "a b/x.png",
            "a/deep/w.png",
            "a/v.tiff",
        ] {
            write(&root.join("train/c").join(f), &tiny);
        }
        write(&root.join("train/c/q.ppm"), &tiny);
        std::fs::create_dir_all(root.join("train/.ipynb_checkpoints")).unwrap();
        std::fs::write(root.join("train/c/._z.png"), b"macOS metadata").unwrap();
        let classes = classes(root, "train").unwrap();
        assert_eq!(classes, ["c"]);
        let files = split_files(root, "train", &classes).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|(p, _)| {
                p.strip_prefix(root.join("train/c"))
                    .unwrap()
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "b.bmp",
                "q.ppm",
                "z.png",
                "a/v.tiff",
                "a/y.png",
                "a b/x.png",
                "a/deep/w.png"
            ]
        );
        let (info, _, _) = read_listed(&files, &classes, 2).unwrap();
        assert_eq!(info.n, 7);
    }

    #[test]
    fn names_that_are_not_utf8_sort_as_python_sorts_them() {
        use std::os::unix::ffi::OsStrExt;
        // Python reads byte 0x80 as U+DC80, after `ü` (U+00FC), though its byte sorts first:
        // sorted(os.walk(...)) lists a.png, ü.png, \udc80.png, üd/y.png, \udc80d/x.png.
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("train/c");
        let tiny = RgbImage::new(2, 2);
        let raw = |b: &[u8]| c.join(OsStr::from_bytes(b));
        for p in [
            c.join("a.png"),
            c.join("ü.png"),
            raw(b"\x80.png"),
            c.join("üd/y.png"),
            raw(b"\x80d").join("x.png"),
        ] {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            tiny.save_with_format(&p, image::ImageFormat::Png).unwrap();
        }
        let files = split_files(dir.path(), "train", &["c".to_string()]).unwrap();
        let got: Vec<Vec<u8>> = files
            .iter()
            .map(|(p, _)| p.strip_prefix(&c).unwrap().as_os_str().as_bytes().to_vec())
            .collect();
        let want: [&[u8]; 5] = [
            b"a.png",
            "ü.png".as_bytes(),
            b"\x80.png",
            "üd/y.png".as_bytes(),
            b"\x80d/x.png",
        ];
        assert_eq!(got, want);
        // A class name must be text: a folder whose name is not is refused, naming it.
        std::fs::create_dir_all(dir.path().join("train").join(OsStr::from_bytes(b"b\xff")))
            .unwrap();
        let err = classes(dir.path(), "train").unwrap_err().to_string();
        assert!(err.contains("not valid UTF-8"), "{err}");
    }

    #[test]
    fn resizes_the_shorter_side_and_crops_the_centre() {
        let dir = tempfile::tempdir().unwrap();
        // 20 wide, 4 high: red, green and blue vertical bands.
        let img = RgbImage::from_fn(20, 4, |x, _| {
            if x < 6 {
                Rgb([255, 0, 0])
            } else if x < 14 {
                Rgb([0, 255, 0])
            } else {
                Rgb([0, 0, 255])
            }
        });
        let path = dir.path().join("a.png");
        img.save(&path).unwrap();
        let mut out = vec![0u8; 3 * 4];
        // Shorter side 4 → 2: 10 × 2; the centre 2 × 2 (source columns 8..12) is all green.
        load(&path, 2, &mut out, &mut LoadScratch::default()).unwrap();
        assert!(out[..4].iter().all(|p| *p < 40), "{out:?}");
        assert!(out[4..8].iter().all(|p| *p > 215), "{out:?}");
        assert!(out[8..].iter().all(|p| *p < 40), "{out:?}");
    }

    /// Tiny-ImageNet's official validation folder (`images/` + `val_annotations.txt`) is read
    /// in the annotations' order with their classes, and its annotations are digested; a class
    /// the training split lacks, or a missing image, is refused naming the line.
    #[test]
    fn tiny_imagenet_validation_annotations_label_a_flat_folder() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let img = |v: u8| RgbImage::from_pixel(4, 4, Rgb([v, v, v]));
        write(&root.join("train/n02/images/a.png"), &img(1));
        write(&root.join("train/n01/images/b.png"), &img(2));
        write(&root.join("val/images/val_0.png"), &img(10));
        write(&root.join("val/images/val_1.png"), &img(11));
        write(&root.join("val/images/val_10.png"), &img(12));
        let list =
            "val_1.png\tn02\t0\t0\t3\t3\nval_10.png\tn01\t0\t0\t3\t3\nval_0.png\tn02\t1\t1\t2\t2\n";
        std::fs::write(root.join("val/val_annotations.txt"), list).unwrap();
        let classes = classes(root, "train").unwrap();
        assert_eq!(classes, ["n01", "n02"]);
        let (info, labels, pixels) = read(root, "val", &classes, 4).unwrap();
        assert_eq!(info.n, 3);
        assert_eq!(labels, [1, 0, 1]);
        let first: Vec<u8> = (0..3).map(|i| pixels[i * 48]).collect();
        assert_eq!(first, [11, 12, 10]);
        let digested = files(root, "train", "val").unwrap();
        assert!(digested.contains(&root.join("val/val_annotations.txt")));
        let bad = list.replace("val_0.png\tn02", "val_0.png\tn03");
        std::fs::write(root.join("val/val_annotations.txt"), bad).unwrap();
        let e = read(root, "val", &classes, 4).unwrap_err().to_string();
        assert!(
            e.contains("line 3") && e.contains("class `n03` is not among"),
            "{e}"
        );
        let missing = list.replace("val_10.png", "val_11.png");
        std::fs::write(root.join("val/val_annotations.txt"), missing).unwrap();
        let e = read(root, "val", &classes, 4).unwrap_err().to_string();
        assert!(
            e.contains("line 2") && e.contains("lists `val_11.png`"),
            "{e}"
        );
    }

    /// The crop offset is Python's `round`, halves to even, as torchvision's `CenterCrop`:
    /// `int(round((9 - 4) / 2.0)) == 2` and `int(round((11 - 4) / 2.0)) == 4`, so a 9 × 4
    /// image keeps columns 2..6 (not 3..7) and an 11 × 4 image columns 4..8.
    #[test]
    fn the_centre_crop_rounds_half_offsets_to_even() {
        let dir = tempfile::tempdir().unwrap();
        for (width, first) in [(9u32, 2u8), (11, 4), (10, 3)] {
            // Already 4 high: no resize, each pixel holds its column.
            let img = RgbImage::from_fn(width, 4, |x, y| Rgb([x as u8, y as u8, 0]));
            let path = dir.path().join(format!("w{width}.png"));
            img.save(&path).unwrap();
            let mut out = vec![0u8; 3 * 16];
            load(&path, 4, &mut out, &mut LoadScratch::default()).unwrap();
            let columns: Vec<u8> = out[..4].to_vec();
            assert_eq!(columns, [first, first + 1, first + 2, first + 3], "{width}");
            assert_eq!(
                out[16..32].iter().step_by(4).copied().collect::<Vec<_>>(),
                [0, 1, 2, 3]
            );
        }
    }

    /// An image over Pillow's decompression-bomb limit is refused from its header, naming the
    /// file: a JPEG whose frame header claims 20000×10000 (200 M pixels; the limit is
    /// 178,956,970), before anything is allocated for its pixels.
    #[test]
    fn images_over_pillows_pixel_limit_are_refused() {
        let good = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/imagefolder/rgb420.jpg"
        ))
        .unwrap();
        // The baseline frame header: FF C0, length (2), precision (1), height (2), width (2).
        let sof = good.windows(2).position(|m| m == [0xFF, 0xC0]).unwrap();
        let with_size = |h: u16, w: u16| {
            let mut b = good.clone();
            b[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
            b[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
            b
        };
        let dir = tempfile::tempdir().unwrap();
        let mut out = vec![0u8; 3 * 4 * 4];
        let mut scratch = LoadScratch::default();
        let path = dir.path().join("bomb.jpg");
        std::fs::write(&path, with_size(10_000, 20_000)).unwrap();
        let err = load(&path, 4, &mut out, &mut scratch)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bomb.jpg") && err.contains("20000×10000 is more than 178956970 pixels"),
            "{err}"
        );
        assert!(
            scratch.hwc.capacity() < 1 << 20,
            "allocated before refusing"
        );
        // The boundary: 10,000 rows of 17,895 pixels are 178,950,000, of 17,896 178,960,000.
        assert!(check_pixels(10_000, 17_895).is_ok());
        assert!(check_pixels(10_000, 17_896).is_err());
    }

    #[test]
    fn malformed_folders_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(&root.join("train/a/x.png"), &RgbImage::new(2, 2));
        std::fs::create_dir_all(root.join("train/b/sub")).unwrap();
        let classes = classes(root, "train").unwrap();
        let err = read(root, "train", &classes, 2).unwrap_err().to_string();
        assert!(
            err.contains("train/b") && err.contains("holds no image (.jpg"),
            "{err}"
        );

        std::fs::write(root.join("train/b/broken.jpg"), b"not a jpeg").unwrap();
        let err = read(root, "train", &classes, 2).unwrap_err().to_string();
        assert!(
            err.contains("broken.jpg") && err.contains("cannot decode"),
            "{err}"
        );

        write(&root.join("test/c/x.png"), &RgbImage::new(2, 2));
        let err = read(root, "test", &classes, 2).unwrap_err().to_string();
        assert!(err.contains("test/c") && err.contains("not among"), "{err}");

        let err = classes_err(root, "missing");
        assert!(err.contains("missing"), "{err}");
        std::fs::create_dir_all(root.join("flat")).unwrap();
        std::fs::write(root.join("flat/x.png"), b"").unwrap();
        let err = classes_err(root, "flat");
        assert!(
            err.contains("flat") && err.contains("no class folder"),
            "{err}"
        );
    }

    fn classes_err(root: &Path, split: &str) -> String {
        classes(root, split).unwrap_err().to_string()
    }
}
