//! Helpers shared by the crate's unit tests.

use candle_core::{DType, Device, Tensor};

/// `max |a − b|` over every element, in f64 on the CPU (the shapes must agree).
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let f64_cpu = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    (f64_cpu(a) - f64_cpu(b))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}
