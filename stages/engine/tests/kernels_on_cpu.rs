//! The CUDA kernels of `src/gpu/kernels.cu` checked on a machine without a GPU: compiled as host
//! C++ against `kernels_on_cpu/cuda_shim.h` (CUDA's thread model: a thread per GPU thread, block
//! barriers, warp shuffles) and compared by `kernels_on_cpu/check.cpp` with plain loops written
//! from each kernel's definition — both layouts (NCHW, NHWC) of the BatchNorm passes, the
//! option-A shortcut and the stem's max-pooling, the transposes, the KRSC weight copies and
//! gradients, the multi-tensor SGD.
//!
//! What this cannot see: the launches from Rust (argument lists, grid sizes), cuDNN, and the
//! GPU's memory model; `tests/gpu_ops.rs` checks those on a GPU. Needs a C++20 compiler (`c++`,
//! or `$CXX`).

use std::path::Path;
use std::process::Command;

#[test]
fn cuda_kernels_match_plain_loops_on_the_cpu() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kernels_on_cpu");
    let exe = std::env::temp_dir().join(format!("ldl-kernels-on-cpu-{}", std::process::id()));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let built = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-Wall", "-Werror"])
        .arg("-I")
        .arg(dir.join("include"))
        .arg("-I")
        .arg(&dir)
        .arg(dir.join("check.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("running the C++ compiler `{cxx}`: {e}"));
    assert!(
        built.status.success(),
        "compiling kernels.cu for the CPU failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let ran = Command::new(&exe)
        .output()
        .expect("running the kernel checks");
    let _ = std::fs::remove_file(&exe);
    let stdout = String::from_utf8_lossy(&ran.stdout);
    assert!(
        ran.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    // Every check prints a line; a count well short of the program's means checks were lost.
    let passed = stdout.lines().filter(|l| l.starts_with("ok ")).count();
    assert!(passed >= 80, "only {passed} kernel checks ran:\n{stdout}");
}
