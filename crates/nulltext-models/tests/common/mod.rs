//! Shared helpers for the golden tests: fixture paths and error measures.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// The device the golden tests run on: `NULLTEXT_TEST_DEVICE=cuda` (in a build with the
/// `cuda` feature) runs them on the GPU with the same tolerances.
pub fn device() -> Device {
    match std::env::var("NULLTEXT_TEST_DEVICE").as_deref() {
        Ok("cuda") => nulltext_models::device::cuda(0)
            .expect("NULLTEXT_TEST_DEVICE=cuda needs a CUDA build and GPU"),
        Ok("metal") => {
            Device::new_metal(0).expect("NULLTEXT_TEST_DEVICE=metal needs a Metal build")
        }
        _ => Device::Cpu,
    }
}

/// Model loading options for the test device (f32 always: the tolerances are f32's).
pub fn load_options() -> nulltext_models::LoadOptions {
    nulltext_models::LoadOptions {
        device: device(),
        dtype: DType::F32,
        ..Default::default()
    }
}

/// A golden tensor on the test device.
pub fn on_device(t: &Tensor) -> Tensor {
    t.to_device(&device()).unwrap()
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn tiny_model() -> PathBuf {
    fixtures().join("models/tiny-sd15")
}

pub fn golden(name: &str) -> HashMap<String, Tensor> {
    let p = fixtures().join("golden").join(name);
    candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn golden_metadata(name: &str) -> HashMap<String, String> {
    let p = fixtures().join("golden").join(name);
    let bytes = std::fs::read(&p).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default()
}

pub fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// max |a − b|
pub fn max_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let b = b
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    max_abs(&(a - b).unwrap())
}

/// max |a − b| / max |b|
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    max_err(a, b) / max_abs(b).max(1e-30)
}

/// The cosine of the angle between `a` and `b` (flattened), in f64.
pub fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let dot = |x: &Tensor, y: &Tensor| {
        (x * y)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    dot(&a, &b) / (dot(&a, &a) * dot(&b, &b)).sqrt()
}

/// Asserts max |a − golden| ≤ tol × (1 + max |golden|) and returns the error.
pub fn assert_close(what: &str, got: &Tensor, golden: &Tensor, tol: f64) -> f64 {
    let err = max_err(got, golden);
    let bound = tol * (1.0 + max_abs(golden));
    eprintln!("{what}: max|err| = {err:.3e} (bound {bound:.3e})");
    assert!(err <= bound, "{what}: max|err| {err:e} > {bound:e}");
    err
}

/// mean (a − b)², in the tensors' f32.
pub fn mse(a: &Tensor, b: &Tensor) -> f32 {
    let m = (a - b).unwrap().sqr().unwrap().mean_all().unwrap();
    m.to_scalar::<f32>().unwrap()
}

/// Reproducible values in [−1, 1) (xorshift), on the CPU.
pub fn noise(seed: u64, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}
