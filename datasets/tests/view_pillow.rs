//! Resized crops against Pillow: `fixtures/view/pillow_resized_crops.json` holds Pillow's own
//! `img.crop(box).resize((side, side), BILINEAR)` of an image both sides build from one formula
//! (`fixtures/view/make_fixture.py`), as torchvision's `RandomResizedCrop` runs it on the PIL
//! images of an ImageFolder. Our resampling must give the same bytes.
//!
//! `fixtures/view/pillow_centre_squares.json` holds torchvision's own `Resize(size)` +
//! `CenterCrop(size)` of images of several shapes (`fixtures/view/make_centre_squares.py`): what
//! the prepare stage packs an ImageFolder's images as.

use datasets::view::{CropBox, ViewScratch};
use serde_json::Value;

/// The fixture script's `pixel`.
fn pixel(c: usize, y: usize, x: usize) -> u8 {
    ((x * 37 + y * 91 + c * 53 + (x * y) % 17 + (x * x * 7 + y) % 29) % 256) as u8
}

/// The `h`×`w` image of [`pixel`], CHW.
fn image(h: usize, w: usize) -> Vec<u8> {
    let mut src = Vec::with_capacity(3 * h * w);
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                src.push(pixel(c, y, x));
            }
        }
    }
    src
}

/// A fixture file of this folder.
fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/view/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A case's expected bytes.
fn bytes(case: &Value) -> Vec<u8> {
    case["chw"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u8)
        .collect()
}

#[test]
fn resized_crops_are_pillows_bytes() {
    let fixture = fixture("pillow_resized_crops.json");
    let (h, w) = (
        fixture["height"].as_u64().unwrap() as usize,
        fixture["width"].as_u64().unwrap() as usize,
    );
    let src = image(h, w);
    let mut scratch = ViewScratch::default();
    let mut vertical_first = 0;
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 47);
    for case in cases {
        let get = |k: &str| case[k].as_u64().unwrap() as usize;
        let b = CropBox {
            top: get("top"),
            left: get("left"),
            height: get("height"),
            width: get("width"),
        };
        let side = get("side");
        // Pillow 13 runs the vertical pass first when the height shrinks by more than twice
        // what the width does: count those cases, so the fixture is seen to cover both orders.
        let (bh, bw, s) = (b.height as i64, b.width as i64, side as i64);
        vertical_first += usize::from(bh - s > 0 && bh - s > (bw - s) * 2);
        let want = bytes(case);
        let got = scratch.resize(&src, (3, h, w), b, side);
        assert_eq!(got.len(), want.len(), "{b:?} to {side}");
        let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ, 0,
            "{b:?} to {side}×{side}: {differ} of {} bytes differ from Pillow's (first: ours {:?}, Pillow's {:?})",
            want.len(),
            &got[..8.min(got.len())],
            &want[..8.min(want.len())]
        );
    }
    assert!(
        (5..=42).contains(&vertical_first),
        "{vertical_first} of 47 cases go vertical first: both orders must be covered"
    );
}

#[test]
fn centre_squares_are_torchvisions_bytes() {
    let fixture = fixture("pillow_centre_squares.json");
    let mut scratch = ViewScratch::default();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    let mut vertical_first = 0;
    for case in cases {
        let get = |k: &str| case[k].as_u64().unwrap() as usize;
        let (h, w, size) = (get("height"), get("width"), get("size"));
        // The resized image's sides, as torchvision computes them; count the cases Pillow 13
        // resamples vertically first, so both orders are seen covered.
        let (nh, nw) = if w <= h {
            (size * h / w, size)
        } else {
            (size, size * w / h)
        };
        let (dh, dw) = (h as i64 - nh as i64, w as i64 - nw as i64);
        vertical_first += usize::from(dh > 0 && dh > dw * 2);
        let want = bytes(case);
        let got = scratch.resize_centre_square(&image(h, w), (3, h, w), size);
        let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(got.len(), want.len(), "{h}×{w} to {size}");
        assert_eq!(
            differ,
            0,
            "{h}×{w} to {size}×{size}: {differ} of {} bytes differ from torchvision's",
            want.len()
        );
    }
    assert!(
        (1..=10).contains(&vertical_first),
        "{vertical_first} of 12 cases go vertical first: both orders must be covered"
    );
}
