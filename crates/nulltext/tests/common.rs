//! Shared helpers for the golden tests: fixture paths, models and error measures.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn tiny_model() -> PathBuf {
    fixtures().join("models/tiny-sd15")
}

pub fn golden(name: &str) -> HashMap<String, Tensor> {
    let p = fixtures().join("golden").join(name);
    candle_core::safetensors::load(&p, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
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
    let a = a.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
    let b = b.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
    max_abs(&(a - b).unwrap())
}

/// Asserts max |a − golden| ≤ tol × (1 + max |golden|) and returns the error.
pub fn assert_close(what: &str, got: &Tensor, golden: &Tensor, tol: f64) -> f64 {
    let err = max_err(got, golden);
    let bound = tol * (1.0 + max_abs(golden));
    eprintln!("{what}: max|err| = {err:.3e} (bound {bound:.3e})");
    assert!(err <= bound, "{what}: max|err| {err:e} > {bound:e}");
    err
}

pub fn load_tiny() -> nulltext::StableDiffusion {
    nulltext::StableDiffusion::load(tiny_model().to_str().unwrap(), &Default::default()).unwrap()
}

pub fn chelsea_latent(sd: &nulltext::StableDiffusion) -> Tensor {
    let img = nulltext::image_io::load_image(&fixtures().join("inputs/chelsea256.png"), Default::default(), 256).unwrap();
    let x = nulltext::image_io::image_to_tensor(&img, &Device::Cpu).unwrap();
    sd.image_to_latent(&x).unwrap()
}
