//! The model fingerprint of inversion files: which UNet weights an inversion belongs to.
//!
//! First 16 hex digits of SHA-256 over `conv_in.weight`, `conv_out.weight` and
//! `time_embedding.linear_1.weight`, in that order, as little-endian IEEE half-precision
//! values (rounded to nearest even). Identical for fp32 and fp16 copies and for diffusers
//! and single-file layouts of the same weights.

use candle_core::DType;
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::weights::WeightStore;

pub const FINGERPRINT_TENSORS: [&str; 3] = [
    "conv_in.weight",
    "conv_out.weight",
    "time_embedding.linear_1.weight",
];

/// Fingerprint of the UNet weights in `store` (diffusers names).
pub fn unet_fingerprint(store: &WeightStore) -> Result<String> {
    let mut h = Sha256::new();
    for name in FINGERPRINT_TENSORS {
        let t = store.get_cpu(name, DType::F16)?.flatten_all()?;
        let v: Vec<half::f16> = t.to_vec1()?;
        for x in v {
            h.update(x.to_le_bytes());
        }
    }
    let digest = h.finalize();
    Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
}
