//! nulltext's CPU kernels, f32: GEMM and convolution (`conv`, with 3×3 convolutions by
//! Winograd's F(2×2, 3×3) in `winograd`), attention without
//! materialized probabilities (`attention`), norms, softmax and GEGLU (`kernels`), and the
//! candle custom ops that run them inside candle's graph (`ops`; those of group norm, layer
//! norm's gradient and GEGLU are in `crate::fused`, beside their CUDA kernels).

pub mod attention;
pub mod conv;
pub mod kernels;
pub(crate) mod ops;
pub(crate) mod winograd;
