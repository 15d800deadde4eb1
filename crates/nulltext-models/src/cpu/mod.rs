//! nulltext's CPU kernels, f32: GEMM and convolution (`conv`), attention without
//! materialized probabilities (`attention`), norms, softmax and GEGLU (`kernels`), and the
//! candle custom ops that run them inside candle's graph (`ops`).

pub mod attention;
pub mod conv;
pub mod kernels;
pub(crate) mod ops;
