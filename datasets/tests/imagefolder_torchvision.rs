//! ImageFolder images against torchvision: `fixtures/imagefolder/torchvision.json` holds what
//! torchvision's `ImageFolder` loader (Pillow's decoder, `convert("RGB")`) followed by
//! `Resize(size)` + `CenterCrop(size)` makes of each image file of that folder (JPEGs with 4:2:0,
//! 4:2:2 and 4:4:4 chroma, progressive, grey, CMYK and a tall one; a PNG with alpha), shrunk and
//! grown (`fixtures/imagefolder/make_fixture.py`). The prepare stage must pack the same bytes.

use datasets::imagefolder::{load, LoadScratch};
use serde_json::Value;

#[test]
fn packed_images_are_torchvisions_bytes() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/imagefolder");
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/torchvision.json")).unwrap())
            .unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 16);
    let mut scratch = LoadScratch::default();
    for case in cases {
        let file = case["file"].as_str().unwrap();
        let size = case["size"].as_u64().unwrap() as usize;
        let want: Vec<u8> = case["chw"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
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
