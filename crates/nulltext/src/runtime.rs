//! Process-wide setup and the compute device, as every front end (the command line, the
//! Python module) chooses them: thread counts, the allocator's options, `--device` and
//! `--dtype` specifications.

use candle_core::{DType, Device};
use nulltext_models::Execution;

use crate::error::{invalid, Result};

/// Sets the thread counts candle reads, unless the user did. On CPUs, candle otherwise
/// re-detects the core count on every matrix product, and its element-wise pool and rayon
/// compete for the same cores.
///
/// Call it before any other thread reads the environment (at the start of `main`, or while
/// a Python module is being imported).
pub fn configure_threads() {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            // SAFETY: the caller runs this before other threads read the environment.
            unsafe { std::env::set_var(var, cores.to_string()) };
        }
    }
}

/// Makes mimalloc keep freed memory for reuse instead of handing it back to the operating
/// system after 10 ms, unless the user set `MIMALLOC_PURGE_DELAY` /
/// `MIMALLOC_ARENA_EAGER_COMMIT`. A UNet pass frees and allocates tens of large activations;
/// returned memory comes back as fresh pages the kernel must zero, which took a quarter of
/// a null-text iteration's time. The process's peak stays what its largest pass needs.
///
/// For processes whose global allocator is mimalloc. A long-running process that idles
/// between jobs (the server) keeps mimalloc's defaults instead, so that memory a job used
/// goes back to the system.
#[cfg(feature = "mimalloc")]
pub fn configure_allocator() {
    // Indices of `mi_option_e` in the bundled mimalloc 3.x (`mimalloc.h`).
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: plain option setters of the allocator in use.
    unsafe {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
        }
        if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_none() {
            libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 1);
        }
    }
}

/// Runs `load` (a model's weights being read into memory) with mimalloc's transparent huge
/// pages off, unless the user set `MIMALLOC_ALLOW_THP`.
///
/// Eagerly committed arenas (`configure_allocator`) are backed by 2 MiB pages, which
/// speeds up the passes that allocate and read activations, but rounds the thousands of
/// weight tensors up to whole huge pages: half a GiB more resident for SDXL. Arenas
/// reserved while the weights load get ordinary pages; the ones reserved later, for
/// activations, huge pages again.
pub fn load_weights<T>(load: impl FnOnce() -> T) -> T {
    #[cfg(feature = "mimalloc")]
    {
        // Index of `mi_option_allow_thp` in the bundled mimalloc 3.x (`mimalloc.h`).
        const ALLOW_THP: libmimalloc_sys::mi_option_t = 43;
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
            // SAFETY: plain option getters and setters of the allocator in use.
            let was = unsafe { libmimalloc_sys::mi_option_get(ALLOW_THP) };
            unsafe { libmimalloc_sys::mi_option_set(ALLOW_THP, 0) };
            let out = load();
            unsafe { libmimalloc_sys::mi_option_set(ALLOW_THP, was) };
            return out;
        }
    }
    load()
}

/// `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N` or `auto` (the best this build supports).
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                Ok(nulltext_models::device::cuda(0)?)
            } else if candle_core::utils::metal_is_available() {
                Ok(Device::new_metal(0)?)
            } else {
                Ok(Device::Cpu)
            }
        }
        s if s == "metal" || s.starts_with("metal:") => {
            if !candle_core::utils::metal_is_available() {
                return Err(invalid(
                    "this nulltext was built without Metal support (rebuild with `--features metal`)",
                ));
            }
            Ok(Device::new_metal(gpu_index(s, "metal:")?)?)
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            if !candle_core::utils::cuda_is_available() {
                return Err(invalid(
                    "this nulltext was built without CUDA support (rebuild with `--features cuda`)",
                ));
            }
            Ok(nulltext_models::device::cuda(gpu_index(s, "cuda:")?)?)
        }
        s => Err(invalid(format!(
            "unknown device `{s}` (cpu, cuda, cuda:N, metal, metal:N, auto)"
        ))),
    }
}

/// N of `cuda:N` / `metal:N`; 0 without it.
fn gpu_index(spec: &str, prefix: &str) -> Result<usize> {
    match spec.strip_prefix(prefix) {
        Some(n) => n
            .parse()
            .map_err(|_| invalid(format!("device `{spec}`: bad GPU index"))),
        None => Ok(0),
    }
}

/// How the UNet runs, as `NULLTEXT_CONTEXT_TAPE` overrides it: `off` (or `graph`, `0`) runs
/// every pass through candle's graph, for comparison or as a fallback; unset, `on` (or
/// `tapes`, `1`): the context tapes where they apply. Front ends read it once, when they
/// load a model.
pub fn execution_from_env() -> Result<Execution> {
    match std::env::var("NULLTEXT_CONTEXT_TAPE") {
        Ok(v) => v
            .parse()
            .map_err(|e: String| invalid(format!("NULLTEXT_CONTEXT_TAPE: {e}"))),
        Err(_) => Ok(Execution::default()),
    }
}

/// `f32`, `f16`, `bf16` or `auto` (f32 on CPU, f16 on GPUs).
pub fn parse_dtype(spec: &str, device: &Device) -> Result<DType> {
    Ok(match spec.trim().to_ascii_lowercase().as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        "auto" if device.is_cpu() => DType::F32,
        "auto" => DType::F16,
        s => {
            return Err(invalid(format!(
                "unknown dtype `{s}` (f32, f16, bf16, auto)"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_dtypes_parse_or_say_what_is_accepted() {
        assert!(parse_device(" CPU ").unwrap().is_cpu());
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(
            e.contains("unknown device `tpu`") && e.contains("cuda:N"),
            "{e}"
        );
        assert_eq!(parse_dtype("auto", &Device::Cpu).unwrap(), DType::F32);
        assert_eq!(parse_dtype("BF16", &Device::Cpu).unwrap(), DType::BF16);
        let e = parse_dtype("f64", &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("unknown dtype `f64`"), "{e}");
    }
}
