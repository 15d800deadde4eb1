//! Images in (PNG/JPEG/WebP, EXIF orientation honoured, alpha dropped, cropped to the centre
//! square, Lanczos-resized) and out (PNG, written atomically).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::{imageops::FilterType, DynamicImage, ImageDecoder, RgbImage};

use crate::atomic::write_atomic;
use crate::error::{Error, Result};

/// Pixels to cut from each side before the centre square is taken (the reference's
/// `load_512` offsets).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Crop {
    /// Pixels cut from the left edge.
    pub left: u32,
    /// Pixels cut from the right edge.
    pub right: u32,
    /// Pixels cut from the top edge.
    pub top: u32,
    /// Pixels cut from the bottom edge.
    pub bottom: u32,
}

impl std::str::FromStr for Crop {
    type Err = String;
    /// `LEFT,RIGHT,TOP,BOTTOM` in pixels.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let v: Vec<u32> = s
            .split(',')
            .map(|p| p.trim().parse::<u32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| format!("crop `{s}`: expected LEFT,RIGHT,TOP,BOTTOM in pixels"))?;
        match v.as_slice() {
            [left, right, top, bottom] => Ok(Crop {
                left: *left,
                right: *right,
                top: *top,
                bottom: *bottom,
            }),
            _ => Err(format!(
                "crop `{s}`: expected four numbers LEFT,RIGHT,TOP,BOTTOM"
            )),
        }
    }
}

/// The smallest side, after cropping, that nulltext accepts.
pub const MIN_SIDE: u32 = 8;

/// Decodes an image file (format from its content), applies its EXIF orientation and
/// drops any alpha channel; at most [`crate::limits::DEFAULT_MAX_PIXELS`].
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    read_rgb_limited(path, crate::limits::DEFAULT_MAX_PIXELS)
}

/// [`read_rgb`] of an image of at most `max_pixels`, as its header says before anything
/// is decoded.
pub fn read_rgb_limited(path: &Path, max_pixels: u64) -> Result<RgbImage> {
    let file = std::fs::File::open(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    decode(
        image::ImageReader::new(std::io::BufReader::new(file)),
        path,
        max_pixels,
    )
}

/// [`read_rgb_limited`] of an image held in memory (an upload); `name` names it in errors.
pub fn decode_rgb(bytes: &[u8], name: &Path, max_pixels: u64) -> Result<RgbImage> {
    decode(
        image::ImageReader::new(std::io::Cursor::new(bytes)),
        name,
        max_pixels,
    )
}

fn decode<R: std::io::BufRead + std::io::Seek>(
    reader: image::ImageReader<R>,
    path: &Path,
    max_pixels: u64,
) -> Result<RgbImage> {
    let err = |msg: String| Error::Image {
        path: path.to_path_buf(),
        msg,
    };
    let reader = reader
        .with_guessed_format()
        .map_err(|e| err(e.to_string()))?;
    if reader.format().is_none() {
        return Err(err(
            "not an image nulltext can read (PNG, JPEG or WebP)".into()
        ));
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| err(format!("cannot decode: {e}")))?;
    // The header's size is checked before any pixel is decoded: a few hundred bytes can
    // declare gigapixels. `from_decoder` allocates what the header says without the
    // crate's own limits, so the decoder is held to the size it declared.
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(err("the image is empty".into()));
    }
    crate::limits::Limits {
        max_pixels,
        ..Default::default()
    }
    .check_pixels(path, w, h)?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(w as u64 * h as u64 * 16 + (64 << 20));
    decoder
        .set_limits(limits)
        .map_err(|e| err(format!("cannot decode: {e}")))?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img =
        DynamicImage::from_decoder(decoder).map_err(|e| err(format!("cannot decode: {e}")))?;
    img.apply_orientation(orientation);
    Ok(img.to_rgb8())
}

/// Crops `crop` off the sides, then the centre square, then resizes to `size`×`size`
/// with Lanczos (an image already at that size is used as it is).
pub fn prepare(img: &RgbImage, crop: Crop, size: u32, path: &Path) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    let cw = w.saturating_sub(crop.left).saturating_sub(crop.right);
    let ch = h.saturating_sub(crop.top).saturating_sub(crop.bottom);
    if cw < MIN_SIDE || ch < MIN_SIDE {
        return Err(Error::Image {
            path: path.to_path_buf(),
            msg: format!(
                "{w}×{h} pixels{} leave{} {cw}×{ch}; at least {MIN_SIDE}×{MIN_SIDE} are needed",
                if crop == Crop::default() {
                    ""
                } else {
                    " cropped"
                },
                if crop == Crop::default() { "s" } else { "" },
            ),
        });
    }
    let side = cw.min(ch);
    let x = crop.left + (cw - side) / 2;
    let y = crop.top + (ch - side) / 2;
    let square = image::imageops::crop_imm(img, x, y, side, side).to_image();
    if side == size {
        return Ok(square);
    }
    Ok(image::imageops::resize(
        &square,
        size,
        size,
        FilterType::Lanczos3,
    ))
}

/// Reads and prepares an input image for a model working at `size` pixels.
pub fn load_image(path: &Path, crop: Crop, size: u32) -> Result<RgbImage> {
    prepare(&read_rgb(path)?, crop, size, path)
}

/// [`load_image`] of an image of at most `max_pixels`.
pub fn load_image_limited(path: &Path, crop: Crop, size: u32, max_pixels: u64) -> Result<RgbImage> {
    prepare(&read_rgb_limited(path, max_pixels)?, crop, size, path)
}

/// `[1, 3, H, W]` in [−1, 1]: p / 127.5 − 1.
pub fn image_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let t = Tensor::from_vec(
        img.as_raw().clone(),
        (h as usize, w as usize, 3),
        &Device::Cpu,
    )?
    .to_dtype(DType::F32)?;
    let t = ((t / 127.5)? - 1.0)?.permute((2, 0, 1))?.unsqueeze(0)?;
    Ok(t.to_device(device)?.contiguous()?)
}

/// `[B, 3, H, W]` in [0, 1] → images, pixels = ⌊255·x⌋ (as the reference truncates).
pub fn tensor_to_images(t: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = t.dims4()?;
    if c != 3 {
        return Err(Error::InvalidInput(format!("expected 3 channels, got {c}")));
    }
    let px = (t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .clamp(0f32, 1f32)?
        * 255.0)?
        .floor()?
        .to_dtype(DType::U8)?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    (0..b)
        .map(|i| {
            let v: Vec<u8> = px.get(i)?.flatten_all()?.to_vec1()?;
            RgbImage::from_raw(w as u32, h as u32, v)
                .ok_or_else(|| Error::InvalidInput("image buffer size".into()))
        })
        .collect()
}

/// Writes a PNG atomically.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    write_atomic(path, |w| {
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Png)
            .map_err(|e| Error::Image {
                path: path.to_path_buf(),
                msg: e.to_string(),
            })?;
        w.write_all(buf.get_ref()).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })
    })
}

/// Peak signal-to-noise ratio in dB between two equally sized 8-bit images.
pub fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    let mse = mse_u8(a, b);
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// Mean squared error of pixel values (0–255 scale).
pub fn mse_u8(a: &RgbImage, b: &RgbImage) -> f64 {
    let n = a.as_raw().len().max(1);
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| {
            let d = *x as f64 - *y as f64;
            d * d
        })
        .sum::<f64>()
        / n as f64
}

/// Decodes latents `[B, C, h, w]` with the model's VAE, one image at a time (bounded
/// memory), to 8-bit images.
pub fn decode_latents(
    sd: &nulltext_models::StableDiffusion,
    latents: &Tensor,
) -> Result<Vec<RgbImage>> {
    let mut out = Vec::new();
    for i in 0..latents.dim(0)? {
        let z = latents.narrow(0, i, 1)?.to_device(&sd.device)?;
        out.extend(tensor_to_images(&sd.latent_to_image(&z)?)?);
    }
    Ok(out)
}
