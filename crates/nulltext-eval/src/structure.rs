//! PIE-Bench's structure distance (Ju et al., ICLR 2024; after Tumanyan et al.'s Splice
//! loss): the mean squared difference of the self-similarity matrices of the keys of DINO
//! ViT-B/8's last block, as cure-lab/PnPInversion `evaluation/matrics_calculator.py`
//! (`LossG.calculate_global_ssim_loss`) computes it.
//!
//! Its preprocessing, kept exactly: intensities on the 0–255 scale (not 0–1), resized to
//! 224 pixels bilinearly *without* antialiasing (torchvision 0.13's `Resize` on a tensor, the
//! published environment; torchvision ≥ 0.17 antialiases by default, which moves the
//! distance by several percent), then ImageNet's mean and std applied to those 0–255 values.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;
use nulltext::error::{invalid, Result};
use nulltext_models::dino::{cosine_self_similarity, DinoVit, IMAGENET_MEAN, IMAGENET_STD};

use crate::metrics::Mask;

/// The block whose keys are compared (`layer_num=11`: ViT-B's last).
pub const KEYS_BLOCK: usize = 11;
/// `Resize(224)` of `LossG`'s global transform.
pub const SIZE: usize = 224;

/// The structure distance with a loaded DINO ViT.
pub struct StructureDistance {
    vit: DinoVit,
}

impl StructureDistance {
    /// Loads a DINO ViT state dict (safetensors, DINO's own tensor names; see
    /// docs/evaluation.md for converting the released `dino_vitb8` checkpoint).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let vit = DinoVit::load(path, device, None)?;
        if vit.depth() <= KEYS_BLOCK || vit.image_size() != SIZE {
            return Err(invalid(format!(
                "{}: a ViT with {} blocks for {}-pixel images; the structure distance needs block {KEYS_BLOCK} and {SIZE}-pixel inputs (dino_vitb8 has 12 blocks, 224 pixels)",
                path.display(),
                vit.depth(),
                vit.image_size()
            )));
        }
        Ok(Self { vit })
    }

    /// The network's input for `img` (multiplied by `mask` first, if any): `[1, 3, 224, 224]`.
    pub fn pixels(&self, img: &RgbImage, mask: Option<&Mask>) -> Result<Tensor> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        if w != h {
            return Err(invalid(format!(
                "the structure distance needs square images, got {w}×{h}"
            )));
        }
        let mut v = Vec::with_capacity(3 * SIZE * SIZE);
        for c in 0..3 {
            let plane: Vec<f32> = img
                .pixels()
                .enumerate()
                .map(|(i, p)| {
                    let x = p.0[c] as f32;
                    match mask {
                        Some(m) => x * m.weights()[i] as f32,
                        None => x,
                    }
                })
                .collect();
            let resized = resize_bilinear(&plane, w, h, SIZE, SIZE);
            v.extend(
                resized
                    .iter()
                    .map(|x| (x - IMAGENET_MEAN[c]) / IMAGENET_STD[c]),
            );
        }
        Ok(Tensor::from_vec(v, (1, 3, SIZE, SIZE), &self.vit.device)?)
    }

    /// The self-similarity of the keys of `img`: `[N, N]`, N = 785.
    pub fn self_similarity(&self, img: &RgbImage, mask: Option<&Mask>) -> Result<Tensor> {
        let keys = self.vit.keys(&self.pixels(img, mask)?, KEYS_BLOCK)?;
        Ok(cosine_self_similarity(&keys, 1e-8)?)
    }

    /// The structure distance of two images of the same size (under `mask`, if any).
    pub fn distance(&self, a: &RgbImage, b: &RgbImage, mask: Option<&Mask>) -> Result<f64> {
        crate::metrics::check_sizes(a, b, mask)?;
        let d = (self.self_similarity(a, mask)? - self.self_similarity(b, mask)?)?;
        Ok(d.sqr()?.mean_all()?.to_scalar::<f32>()? as f64)
    }
}

/// Bilinear resampling of one plane (w × h → ow × oh) with half-pixel centres and no
/// antialiasing: PyTorch's `interpolate(mode="bilinear", align_corners=False)`.
pub fn resize_bilinear(p: &[f32], w: usize, h: usize, ow: usize, oh: usize) -> Vec<f32> {
    // Source coordinate of output index i: (i + ½)·in/out − ½, clamped at 0.
    let taps = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f32)> {
        let scale = n_in as f32 / n_out as f32;
        (0..n_out)
            .map(|i| {
                let src = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(n_in - 1);
                let i1 = (i0 + 1).min(n_in - 1);
                (i0, i1, src - i0 as f32)
            })
            .collect()
    };
    let (xs, ys) = (taps(w, ow), taps(h, oh));
    let mut out = Vec::with_capacity(ow * oh);
    for &(y0, y1, ly) in &ys {
        for &(x0, x1, lx) in &xs {
            let top = (1.0 - lx) * p[y0 * w + x0] + lx * p[y0 * w + x1];
            let bottom = (1.0 - lx) * p[y1 * w + x0] + lx * p[y1 * w + x1];
            out.push((1.0 - ly) * top + ly * bottom);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_matches_half_pixel_centres() {
        // 4 → 2: each output is the mean of two inputs (source 0.5 and 2.5).
        let p = [0.0, 2.0, 4.0, 6.0];
        assert_eq!(resize_bilinear(&p, 4, 1, 2, 1), vec![1.0, 5.0]);
        // 2 → 4: sources −0.25 (clamped to 0), 0.25, 0.75, 1.25 (edge repeated).
        let up = resize_bilinear(&[0.0, 4.0], 2, 1, 4, 1);
        assert_eq!(up, vec![0.0, 1.0, 3.0, 4.0]);
    }
}
