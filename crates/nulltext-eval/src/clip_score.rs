//! CLIP score of an image and a caption (torchmetrics' `CLIPScore`, as PIE-Bench reports
//! edit fidelity): 100 · max(cos(image, text), 0) with a user-supplied CLIP model.

use candle_core::Tensor;
use image::{imageops::FilterType, RgbImage};
use nulltext::error::Result;
use nulltext_models::clip_score::{ClipScorer, CLIP_MEAN, CLIP_STD};

use crate::metrics::Mask;

/// CLIPImageProcessor's preprocessing: the shortest side resized to the model's size
/// (bicubic), the centre square, CLIP's mean and std. With a mask, the image is multiplied
/// by it first (PIE-Bench's convention).
pub fn clip_pixels(scorer: &ClipScorer, img: &RgbImage, mask: Option<&Mask>) -> Result<Tensor> {
    let img = match mask {
        Some(m) => {
            let mut out = img.clone();
            for (p, w) in out.pixels_mut().zip(m.weights()) {
                for c in p.0.iter_mut() {
                    *c = (*c as f64 * w) as u8;
                }
            }
            out
        }
        None => img.clone(),
    };
    let s = scorer.image_size() as u32;
    let (w, h) = img.dimensions();
    let resized = if w.min(h) == s {
        img
    } else {
        let (nw, nh) = if w <= h {
            (s, (s as u64 * h as u64 / w as u64) as u32)
        } else {
            ((s as u64 * w as u64 / h as u64) as u32, s)
        };
        image::imageops::resize(&img, nw, nh, FilterType::CatmullRom)
    };
    let (rw, rh) = resized.dimensions();
    let (x0, y0) = ((rw - s) / 2, (rh - s) / 2);
    let mut v = Vec::with_capacity((3 * s * s) as usize);
    for c in 0..3 {
        for y in 0..s {
            for x in 0..s {
                let p = resized.get_pixel(x0 + x, y0 + y).0[c] as f32 / 255.0;
                v.push((p - CLIP_MEAN[c]) / CLIP_STD[c]);
            }
        }
    }
    Ok(Tensor::from_vec(
        v,
        (1, 3, s as usize, s as usize),
        &scorer.device,
    )?)
}

/// The CLIP score of `img` (under `mask`) and `caption`.
pub fn clip_score(
    scorer: &ClipScorer,
    img: &RgbImage,
    caption: &str,
    mask: Option<&Mask>,
) -> Result<f64> {
    Ok(scorer.score(&clip_pixels(scorer, img, mask)?, caption)?)
}
