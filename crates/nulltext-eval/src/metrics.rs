//! Image quality metrics: PSNR, SSIM and MSE, computed as scikit-image computes them, over
//! the whole image or under a mask (PIE-Bench's background preservation: both images are
//! multiplied by the mask, then compared whole).
//!
//! All metrics work on intensities scaled to [0, 1]: MSE is in those units and PSNR uses a
//! data range of 1 (the same number as 255 on the 0–255 scale).

use std::path::Path;

use image::{GrayImage, RgbImage};
use nulltext::error::{invalid, Result};
use nulltext::image_io::{load_image_limited, Crop};

/// The window SSIM averages over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SsimWindow {
    /// A 7×7 box with sample covariances: scikit-image's `structural_similarity` default.
    #[default]
    Uniform7,
    /// A Gaussian with σ = 1.5 truncated at 3.5σ (11×11) and population covariances: the
    /// setting of Wang et al. (2004), scikit-image's `gaussian_weights=True`. Also
    /// torchmetrics' `StructuralSimilarityIndexMeasure` up to 1.4.1 (which PIE-Bench's
    /// published numbers used): it averages the same windows, those wholly inside the image.
    Gaussian,
    /// The same window over the whole image, reflect-padded by 5 pixels (the border's windows
    /// included): torchmetrics' `StructuralSimilarityIndexMeasure` since 1.4.2 (its #2721; negative
    /// variances clamped at 0, as since 1.4.0).
    GaussianPadded,
}

impl std::str::FromStr for SsimWindow {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "uniform" => Ok(Self::Uniform7),
            "gaussian" => Ok(Self::Gaussian),
            "gaussian-padded" => Ok(Self::GaussianPadded),
            _ => Err(format!(
                "unknown SSIM window `{s}` (uniform, gaussian, gaussian-padded)"
            )),
        }
    }
}

/// How similar a candidate image is to a reference.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageMetrics {
    /// Peak signal-to-noise ratio in dB (infinite for identical images; `null` in JSON).
    #[serde(with = "infinite_as_null")]
    pub psnr: f64,
    /// Mean structural similarity, averaged over the channels.
    pub ssim: f64,
    /// Mean squared error of intensities in [0, 1].
    pub mse: f64,
}

/// JSON has no infinity: identical images' PSNR is written as `null` and read back
/// (`#[serde(with = "crate::metrics::infinite_as_null")]`).
pub(crate) mod infinite_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
    }
}

/// Per-pixel weights in [0, 1] (white = 1), e.g. the background to preserve.
#[derive(Debug, Clone)]
pub struct Mask {
    width: u32,
    height: u32,
    weights: Vec<f64>,
}

impl Mask {
    /// A mask from a grayscale image: value / 255. `invert` takes the complement, for masks
    /// that mark the edited region (as PIE-Bench's do) when the background is wanted.
    pub fn from_gray(img: &GrayImage, invert: bool) -> Self {
        let weights = img
            .pixels()
            .map(|p| {
                let v = p.0[0] as f64 / 255.0;
                if invert {
                    1.0 - v
                } else {
                    v
                }
            })
            .collect();
        Self {
            width: img.width(),
            height: img.height(),
            weights,
        }
    }

    pub fn dimensions(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// 1 − this mask.
    pub fn complement(&self) -> Self {
        Self {
            width: self.width,
            height: self.height,
            weights: self.weights.iter().map(|w| 1.0 - w).collect(),
        }
    }

    /// The weights, row-major.
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// The fraction of the image the mask covers (its mean weight).
    pub fn coverage(&self) -> f64 {
        self.weights.iter().sum::<f64>() / self.weights.len().max(1) as f64
    }
}

/// A mask image (white = 1) prepared exactly as [`nulltext::image_io::load_image`] prepares
/// its photo: the same crop, centre square and resize, so that it lies on the photo pixel for
/// pixel.
pub fn load_mask(path: &Path, crop: Crop, size: u32, max_pixels: u64) -> Result<Mask> {
    let rgb = load_image_limited(path, crop, size, max_pixels)?;
    let gray = image::DynamicImage::ImageRgb8(rgb).to_luma8();
    Ok(Mask::from_gray(&gray, false))
}

/// One channel of an image as f64 in [0, 1], row-major.
struct Plane {
    w: usize,
    h: usize,
    v: Vec<f64>,
}

fn planes(img: &RgbImage, mask: Option<&Mask>) -> [Plane; 3] {
    let (w, h) = (img.width() as usize, img.height() as usize);
    std::array::from_fn(|c| {
        let v = img
            .pixels()
            .enumerate()
            .map(|(i, p)| {
                let x = p.0[c] as f64 / 255.0;
                match mask {
                    Some(m) => x * m.weights[i],
                    None => x,
                }
            })
            .collect();
        Plane { w, h, v }
    })
}

/// Refuses images of different sizes, or a mask of another size: every metric compares
/// pixel by pixel.
pub(crate) fn check_sizes(
    reference: &RgbImage,
    candidate: &RgbImage,
    mask: Option<&Mask>,
) -> Result<()> {
    if reference.dimensions() != candidate.dimensions() {
        return Err(invalid(format!(
            "the images differ in size: reference {}×{}, candidate {}×{}",
            reference.width(),
            reference.height(),
            candidate.width(),
            candidate.height()
        )));
    }
    if let Some(m) = mask {
        if m.dimensions() != reference.dimensions() {
            return Err(invalid(format!(
                "the mask is {}×{}, the images {}×{}",
                m.width,
                m.height,
                reference.width(),
                reference.height()
            )));
        }
    }
    Ok(())
}

/// PSNR, SSIM (with `window`) and MSE of `candidate` against `reference`, under `mask` if
/// given.
pub fn compare(
    reference: &RgbImage,
    candidate: &RgbImage,
    mask: Option<&Mask>,
    window: SsimWindow,
) -> Result<ImageMetrics> {
    check_sizes(reference, candidate, mask)?;
    let a = planes(reference, mask);
    let b = planes(candidate, mask);
    let mut sq = 0.0;
    let mut n = 0usize;
    for (pa, pb) in a.iter().zip(&b) {
        sq +=
            pa.v.iter()
                .zip(&pb.v)
                .map(|(x, y)| (x - y) * (x - y))
                .sum::<f64>();
        n += pa.v.len();
    }
    let mse = sq / n as f64;
    let ssim = a
        .iter()
        .zip(&b)
        .map(|(pa, pb)| ssim_plane(pa, pb, window))
        .collect::<Result<Vec<f64>>>()?
        .iter()
        .sum::<f64>()
        / 3.0;
    Ok(ImageMetrics {
        psnr: psnr_from_mse(mse),
        ssim,
        mse,
    })
}

/// Mean squared difference of two latents (any float dtype), e.g. a reconstruction's
/// against z₀.
pub fn latent_mse(a: &candle_core::Tensor, b: &candle_core::Tensor) -> Result<f64> {
    let d = (a.to_dtype(candle_core::DType::F32)? - b.to_dtype(candle_core::DType::F32)?)?;
    Ok(d.sqr()?.mean_all()?.to_scalar::<f32>()? as f64)
}

/// PSNR in dB for intensities in [0, 1] with mean squared error `mse`.
pub fn psnr_from_mse(mse: f64) -> f64 {
    if mse == 0.0 {
        f64::INFINITY
    } else {
        -10.0 * mse.log10()
    }
}

/// Normalized 1-D filter taps and the cropping margin of a window.
fn taps(window: SsimWindow) -> (Vec<f64>, bool) {
    match window {
        SsimWindow::Uniform7 => (vec![1.0 / 7.0; 7], true),
        SsimWindow::Gaussian | SsimWindow::GaussianPadded => {
            let sigma: f64 = 1.5;
            let radius = (3.5 * sigma + 0.5) as i64;
            let raw: Vec<f64> = (-radius..=radius)
                .map(|x| (-0.5 * (x * x) as f64 / (sigma * sigma)).exp())
                .collect();
            let s: f64 = raw.iter().sum();
            (raw.into_iter().map(|v| v / s).collect(), false)
        }
    }
}

/// Separable filtering of the valid region: output pixel (y, x) is the window centred at
/// (y + r, x + r) of the input. scikit-image filters the whole image with reflected borders
/// and then crops r pixels from each side; the cropped values are exactly these.
fn filter_valid(p: &[f64], w: usize, h: usize, k: &[f64]) -> Vec<f64> {
    let n = k.len();
    let (ow, oh) = (w + 1 - n, h + 1 - n);
    let mut rows = vec![0.0; ow * h];
    for y in 0..h {
        let row = &p[y * w..(y + 1) * w];
        for x in 0..ow {
            rows[y * ow + x] = k.iter().zip(&row[x..x + n]).map(|(a, b)| a * b).sum();
        }
    }
    let mut out = vec![0.0; ow * oh];
    for y in 0..oh {
        for (j, kj) in k.iter().enumerate() {
            let src = &rows[(y + j) * ow..(y + j + 1) * ow];
            for (o, s) in out[y * ow..(y + 1) * ow].iter_mut().zip(src) {
                *o += kj * s;
            }
        }
    }
    out
}

/// `p` (w × h) with `r` pixels mirrored on every side, the edge pixel not repeated (PyTorch's
/// `F.pad(mode="reflect")`): (w + 2r) × (h + 2r).
fn reflect_pad(p: &[f64], w: usize, h: usize, r: usize) -> Vec<f64> {
    let mirror = |i: isize, n: usize| -> usize {
        let n = n as isize;
        let j = if i < 0 {
            -i
        } else if i >= n {
            2 * (n - 1) - i
        } else {
            i
        };
        j as usize
    };
    let (pw, ph) = (w + 2 * r, h + 2 * r);
    let mut out = Vec::with_capacity(pw * ph);
    for y in 0..ph {
        let sy = mirror(y as isize - r as isize, h);
        for x in 0..pw {
            out.push(p[sy * w + mirror(x as isize - r as isize, w)]);
        }
    }
    out
}

fn ssim_plane(a: &Plane, b: &Plane, window: SsimWindow) -> Result<f64> {
    let (k, sample_cov) = taps(window);
    let n = k.len();
    if a.w < n || a.h < n {
        return Err(invalid(format!(
            "SSIM needs images of at least {n}×{n} pixels, got {}×{}",
            a.w, a.h
        )));
    }
    if window == SsimWindow::GaussianPadded {
        // 1. Pad, then the valid windows of the padded image are one per pixel.
        let r = n / 2;
        let pad = |p: &Plane| Plane {
            w: p.w + 2 * r,
            h: p.h + 2 * r,
            v: reflect_pad(&p.v, p.w, p.h, r),
        };
        return ssim_valid(&pad(a), &pad(b), &k, sample_cov, true);
    }
    ssim_valid(a, b, &k, sample_cov, false)
}

/// Mean SSIM over the windows wholly inside `a` and `b`; `clamp` sets negative variances
/// (rounding) to 0, as torchmetrics does.
fn ssim_valid(a: &Plane, b: &Plane, k: &[f64], sample_cov: bool, clamp: bool) -> Result<f64> {
    let n = k.len();
    let (w, h) = (a.w, a.h);
    let prod = |x: &[f64], y: &[f64]| -> Vec<f64> { x.iter().zip(y).map(|(p, q)| p * q).collect() };
    let ux = filter_valid(&a.v, w, h, k);
    let uy = filter_valid(&b.v, w, h, k);
    let uxx = filter_valid(&prod(&a.v, &a.v), w, h, k);
    let uyy = filter_valid(&prod(&b.v, &b.v), w, h, k);
    let uxy = filter_valid(&prod(&a.v, &b.v), w, h, k);
    let np = (n * n) as f64;
    let cov_norm = if sample_cov { np / (np - 1.0) } else { 1.0 };
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let mut sum = 0.0;
    for i in 0..ux.len() {
        let (mx, my) = (ux[i], uy[i]);
        let (mut vx, mut vy) = (cov_norm * (uxx[i] - mx * mx), cov_norm * (uyy[i] - my * my));
        if clamp {
            (vx, vy) = (vx.max(0.0), vy.max(0.0));
        }
        let vxy = cov_norm * (uxy[i] - mx * my);
        let num = (2.0 * mx * my + c1) * (2.0 * vxy + c2);
        let den = (mx * mx + my * my + c1) * (vx + vy + c2);
        sum += num / den;
    }
    Ok(sum / ux.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)))
    }

    #[test]
    fn identical_images_are_perfect() {
        let a = img(20, 16, |x, y| [(x * 12) as u8, (y * 15) as u8, 7]);
        let m = compare(&a, &a, None, SsimWindow::Uniform7).unwrap();
        assert_eq!(m.mse, 0.0);
        assert!(m.psnr.is_infinite());
        assert!((m.ssim - 1.0).abs() < 1e-12);
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"psnr\":null"), "{json}");
        let back: ImageMetrics = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn mse_and_psnr_of_a_constant_offset() {
        let a = img(16, 16, |_, _| [100, 100, 100]);
        let b = img(16, 16, |_, _| [110, 100, 100]);
        let m = compare(&a, &b, None, SsimWindow::Gaussian).unwrap();
        let want = (10.0f64 / 255.0).powi(2) / 3.0;
        assert!((m.mse - want).abs() < 1e-15);
        assert!((m.psnr - -10.0 * want.log10()).abs() < 1e-9);
    }

    #[test]
    fn a_zero_mask_sees_no_difference() {
        let a = img(16, 16, |x, _| [x as u8 * 9, 0, 0]);
        let b = img(16, 16, |_, y| [0, y as u8 * 9, 0]);
        let mask = Mask::from_gray(&GrayImage::new(16, 16), false);
        let m = compare(&a, &b, Some(&mask), SsimWindow::Uniform7).unwrap();
        assert_eq!(m.mse, 0.0);
        let inv = Mask::from_gray(&GrayImage::new(16, 16), true);
        assert_eq!(inv.coverage(), 1.0);
        assert!(
            compare(&a, &b, Some(&inv), SsimWindow::Uniform7)
                .unwrap()
                .mse
                > 0.0
        );
    }

    #[test]
    fn sizes_must_agree() {
        let a = img(16, 16, |_, _| [0, 0, 0]);
        let b = img(16, 17, |_, _| [0, 0, 0]);
        let e = compare(&a, &b, None, SsimWindow::Uniform7).unwrap_err();
        assert!(e.to_string().contains("16×17"), "{e}");
        let tiny = img(5, 5, |_, _| [0, 0, 0]);
        assert!(compare(&tiny, &tiny, None, SsimWindow::Uniform7).is_err());
    }
}
