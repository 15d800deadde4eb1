//! With the `cuda` feature, compiles `src/fused/kernels.cu` to PTX with the CUDA toolkit's
//! `nvcc` (found through `CUDA_ROOT`, `CUDA_PATH` or `PATH`); the PTX targets the virtual
//! architecture `compute_<CUDA_COMPUTE_CAP>` (default 80), which the driver compiles for
//! the GPU it runs on. CPU-only builds need no GPU toolchain.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let source = "src/fused/kernels.cu";
    println!("cargo::rerun-if-changed={source}");
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_COMPUTE_CAP", "NVCC_CCBIN"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let nvcc = ["CUDA_ROOT", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|root| PathBuf::from(root).join("bin/nvcc"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("fused.ptx");
    let mut cmd = Command::new(&nvcc);
    cmd.args(["--ptx", "-std=c++17", "-O3"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg(source);
    if let Some(ccbin) = std::env::var_os("NVCC_CCBIN") {
        cmd.arg("-ccbin").arg(ccbin);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("the cuda feature needs nvcc ({}): {e}", nvcc.display()));
    assert!(status.success(), "nvcc failed on {source}");
}
