//! ImageFolder images against torchvision: `fixtures/imagefolder/torchvision.json` holds what
//! torchvision's `ImageFolder` loader (Pillow's decoder, `convert("RGB")`) followed by
//! `Resize(size)` + `CenterCrop(size)` makes of each image file of that folder (JPEGs with 4:2:0,
//! 4:2:2 and 4:4:4 chroma, progressive, arithmetic-coded, with restart markers, grey, CMYK and a
//! tall one; PNGs with alpha, a palette, grey and a narrow one), shrunk and grown (`fixtures/imagefolder/make_fixture.py`),
//! and what `Resize(size)` alone makes of four (`keep_aspect`). The prepare stage must pack the
//! same bytes, and refuse the cut JPEGs Pillow refuses (the
//! fixture's `truncation`: each JPEG whole, with bytes after its end, without its end marker,
//! cut in half, its end marker replaced by 4 or 8 zero bytes).

use datasets::imagefolder::{load, load_shorter_side, LoadScratch};
use serde_json::Value;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/imagefolder");

fn fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/torchvision.json")).unwrap())
        .unwrap()
}

/// A fixture's array of byte values.
fn bytes(v: &Value) -> Vec<u8> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u8)
        .collect()
}

#[test]
fn packed_images_are_torchvisions_bytes() {
    let dir = DIR;
    let fixture = fixture();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 26);
    let mut scratch = LoadScratch::default();
    for case in cases {
        let file = case["file"].as_str().unwrap();
        let size = case["size"].as_u64().unwrap() as usize;
        let want = bytes(&case["chw"]);
        let mut got = vec![0u8; 3 * size * size];
        load(
            format!("{dir}/{file}").as_ref(),
            size,
            &mut got,
            &mut scratch,
        )
        .unwrap();
        let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        let most = got
            .iter()
            .zip(&want)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        assert_eq!(
            differ,
            0,
            "{file} at {size}: {differ} of {} bytes differ from torchvision's (by up to {most})",
            want.len()
        );
    }
}

/// `keep_aspect`: the image resized so its shorter side is `size`, nothing cut, is
/// torchvision's `Resize(size)` to the bit, of its size (landscape, portrait, and one taller
/// than 2:1, which Pillow 13 resamples vertically first when shrunk; shrunk, grown).
#[test]
fn images_kept_whole_are_torchvisions_resize() {
    let fixture = fixture();
    let cases = fixture["resize"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    let mut scratch = LoadScratch::default();
    for case in cases {
        let file = case["file"].as_str().unwrap();
        let size = case["size"].as_u64().unwrap() as usize;
        let hw = &case["hw"];
        let want_dims = (
            hw[0].as_u64().unwrap() as usize,
            hw[1].as_u64().unwrap() as usize,
        );
        let want = bytes(&case["chw"]);
        let (got, dims) =
            load_shorter_side(format!("{DIR}/{file}").as_ref(), size, &mut scratch).unwrap();
        assert_eq!(dims, want_dims, "{file} at {size}");
        let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            (differ, got.len()),
            (0, want.len()),
            "{file} at {size}: bytes differ from torchvision's"
        );
    }
}

#[test]
fn cut_jpegs_are_refused_as_pillow_refuses_them() {
    let fixture = fixture();
    let files = fixture["truncation"].as_object().unwrap();
    assert_eq!(files.len(), 9);
    let tmp = tempfile::tempdir().unwrap();
    let mut scratch = LoadScratch::default();
    let (mut refused, mut accepted) = (0, 0);
    for (file, expected) in files {
        let b = std::fs::read(format!("{DIR}/{file}")).unwrap();
        let n = b.len();
        let variants: [(&str, Vec<u8>); 6] = [
            ("whole", b.clone()),
            ("trailing", [&b[..], b"trailing bytes"].concat()),
            ("no_end", b[..n - 2].to_vec()),
            ("half", b[..n / 2].to_vec()),
            ("zeros4", [&b[..n - 2], &[0; 4]].concat()),
            ("zeros8", [&b[..n - 2], &[0; 8]].concat()),
        ];
        for (name, bytes) in variants {
            let path = tmp.path().join(format!("{name}-{file}"));
            std::fs::write(&path, bytes).unwrap();
            let mut out = vec![0u8; 3 * 20 * 20];
            let got = load(&path, 20, &mut out, &mut scratch);
            let pillow = expected[name].as_bool().unwrap();
            match got {
                Ok(()) => {
                    assert!(pillow, "{file} {name}: decoded, Pillow refuses it");
                    accepted += 1;
                }
                Err(e) => {
                    let e = e.to_string();
                    assert!(!pillow, "{file} {name}: refused ({e}), Pillow decodes it");
                    assert!(e.contains(&format!("{name}-{file}")), "{e}");
                    refused += 1;
                }
            }
        }
    }
    // Both outcomes are exercised, not only the whole files.
    assert!(
        refused >= 18 && accepted >= 18,
        "{refused} refused, {accepted} accepted"
    );
}
