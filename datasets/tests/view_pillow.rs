//! Resized crops against Pillow: `fixtures/view/pillow_resized_crops.json` holds Pillow's own
//! `img.crop(box).resize((side, side), BILINEAR)` of an image both sides build from one formula
//! (`fixtures/view/make_fixture.py`), as torchvision's `RandomResizedCrop` runs it on the PIL
//! images of an ImageFolder. Our resampling must give the same bytes.

use datasets::view::{CropBox, ViewScratch};
use serde_json::Value;

/// The fixture script's `pixel`.
fn pixel(c: usize, y: usize, x: usize) -> u8 {
    ((x * 37 + y * 91 + c * 53 + (x * y) % 17 + (x * x * 7 + y) % 29) % 256) as u8
}

#[test]
fn resized_crops_are_pillows_bytes() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/view/pillow_resized_crops.json"
    );
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (h, w) = (
        fixture["height"].as_u64().unwrap() as usize,
        fixture["width"].as_u64().unwrap() as usize,
    );
    let mut src = Vec::with_capacity(3 * h * w);
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                src.push(pixel(c, y, x));
            }
        }
    }
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
        let want: Vec<u8> = case["chw"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
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
