//! Compiles the CUDA kernels of the GPU training path (src/gpu/kernels.cu) to PTX in a build
//! with the `cuda` feature, with the nvcc candle's own kernels are built with. `CUDA_COMPUTE_CAP`
//! (as for candle-kernels; default 90, the H100) selects the virtual architecture; the driver
//! compiles the PTX for the card it runs on.

fn main() {
    println!("cargo::rerun-if-changed=src/gpu/kernels.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let ptx = out.join("kernels.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&ptx)
        .arg("src/gpu/kernels.cu")
        .status()
        .unwrap_or_else(|e| panic!("running {nvcc} (needed by the `cuda` feature): {e}"));
    assert!(status.success(), "{nvcc} failed on src/gpu/kernels.cu");
}
