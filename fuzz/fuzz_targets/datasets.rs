//! The dataset readers on damaged files: the first byte picks which file of which layout gets
//! the rest of the input; every reader must return an error or data, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("ldl-fuzz-datasets-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn record(label: u8) -> Vec<u8> {
    let mut r = vec![label];
    r.extend(std::iter::repeat(7u8).take(3072));
    r
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let d = scratch();
    let names10: String = (0..10).map(|i| format!("c{i}\n")).collect();
    match which % 6 {
        0 | 1 => {
            std::fs::write(d.join("batches.meta.txt"), &names10).unwrap();
            std::fs::write(d.join("data_batch_1.bin"), record(1)).unwrap();
            std::fs::write(d.join("test_batch.bin"), record(2)).unwrap();
            let target = if which % 6 == 0 { "data_batch_1.bin" } else { "batches.meta.txt" };
            std::fs::write(d.join(target), rest).unwrap();
            let _ = datasets::cifar::cifar10(&d, Some(&[1]));
        }
        2 => {
            let fine: String = (0..100).map(|i| format!("f{i}\n")).collect();
            let coarse: String = (0..20).map(|i| format!("c{i}\n")).collect();
            std::fs::write(d.join("fine_label_names.txt"), fine).unwrap();
            std::fs::write(d.join("coarse_label_names.txt"), coarse).unwrap();
            std::fs::write(d.join("test.bin"), [vec![0u8], record(3)].concat()).unwrap();
            std::fs::write(d.join("train.bin"), rest).unwrap();
            let _ = datasets::cifar::cifar100(&d, datasets::cifar::Cifar100Label::Fine);
        }
        3 | 4 => {
            std::fs::write(d.join("class_names.txt"), &names10).unwrap();
            std::fs::write(d.join("train_X.bin"), vec![5u8; 96 * 96 * 3]).unwrap();
            std::fs::write(d.join("train_y.bin"), [1u8]).unwrap();
            std::fs::write(d.join("test_X.bin"), vec![5u8; 96 * 96 * 3]).unwrap();
            std::fs::write(d.join("test_y.bin"), [2u8]).unwrap();
            let target = if which % 6 == 3 { "train_X.bin" } else { "train_y.bin" };
            std::fs::write(d.join(target), rest).unwrap();
            let _ = datasets::stl10::stl10(&d);
        }
        _ => {
            // An image file of any format the ImageFolder reader accepts.
            let p = d.join("x.png");
            std::fs::write(&p, rest).unwrap();
            let mut out = vec![0u8; 3 * 8 * 8];
            let _ = datasets::imagefolder::load(&p, 8, &mut out, &mut Default::default());
        }
    }
    let _ = std::fs::remove_dir_all(&d);
});
