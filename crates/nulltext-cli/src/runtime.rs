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

/// Makes the allocator keep freed memory for reuse instead of handing it back to the
/// operating system after 10 ms, unless the user set `MIMALLOC_PURGE_DELAY` /
/// `MIMALLOC_ARENA_EAGER_COMMIT`. A UNet pass frees and allocates tens of large activations;
/// returned memory comes back as fresh pages the kernel must zero, which took a quarter of
/// a null-text iteration's time. The process's peak stays what its largest pass needs.
///
/// A long-running process (the server) keeps mimalloc's defaults instead: it sits idle
/// between jobs, and memory a job or an upload used must go back to the system.
pub fn configure_allocator(long_running: bool) {
    if long_running {
        return;
    }
    // Indices of `mi_option_e` in the bundled mimalloc 3.x (`mimalloc.h`).
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: plain option setters of the allocator in use, called from the main thread.
    unsafe {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
        }
        if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_none() {
            libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 1);
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
