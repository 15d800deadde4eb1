//! Process-wide setup: thread counts, the compute device, model loading.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use nulltext::models::{LoadOptions, StableDiffusion};

/// Sets the thread counts candle reads, unless the user did. On CPUs, candle otherwise
/// re-detects the core count on every matrix product, and its element-wise pool and rayon
/// compete for the same cores.
pub fn configure_threads() {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    // SAFETY: called at the start of main, before any other thread exists.
    unsafe {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
        }
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", cores.to_string());
        }
    }
}

/// `cpu`, `cuda`, `cuda:N`, `metal` or `auto` (the best this build supports).
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                Ok(nulltext::models::device::cuda(0)?)
            } else if candle_core::utils::metal_is_available() {
                Ok(Device::new_metal(0)?)
            } else {
                Ok(Device::Cpu)
            }
        }
        "metal" => {
            if !candle_core::utils::metal_is_available() {
                bail!("this nulltext was built without Metal support (rebuild with `--features metal`)");
            }
            Ok(Device::new_metal(0)?)
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "this nulltext was built without CUDA support (rebuild with `--features cuda`)"
                );
            }
            let n: usize = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .with_context(|| format!("device `{s}`: bad GPU index"))?,
                None => 0,
            };
            nulltext::models::device::cuda(n)
                .with_context(|| format!("cannot open CUDA device {n}"))
        }
        s => bail!("unknown device `{s}` (cpu, cuda, cuda:N, metal, auto)"),
    }
}

/// `f32`, `f16`, `bf16` or `auto` (f32 on CPU, f16 on GPUs).
pub fn parse_dtype(spec: &str, device: &Device) -> Result<DType> {
    Ok(match spec {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        "auto" => {
            if device.is_cpu() {
                DType::F32
            } else {
                DType::F16
            }
        }
        s => bail!("unknown dtype `{s}` (f32, f16, bf16, auto)"),
    })
}

pub fn load_model(spec: &str, opts: &LoadOptions, quiet: bool) -> Result<StableDiffusion> {
    let sp = crate::progress::spinner(quiet, &format!("loading {spec}"));
    let sd =
        StableDiffusion::load(spec, opts).with_context(|| format!("cannot load model `{spec}`"))?;
    if let Some(s) = sp {
        s.finish_and_clear();
    }
    Ok(sd)
}
