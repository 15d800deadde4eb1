//! What clients send, checked before anything is queued or written: the inversion form
//! (an uploaded photo and its settings) and the edit request, turned into the library's
//! options. Every refusal names the field at fault.

use image::{ImageFormat, RgbImage};
use nulltext::edit::{EditOptions, EditSpec};
use nulltext::image_io::Crop;
use nulltext::{InvertOptions, Method};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// What one request may ask for.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bytes of a request body.
    pub max_body_bytes: usize,
    /// Pixels of an uploaded image (width × height, before it is resized).
    pub max_pixels: u64,
    /// Characters of a prompt or target.
    pub max_prompt_chars: usize,
    /// Targets of one edit.
    pub max_targets: usize,
    /// DDIM steps of an inversion.
    pub max_steps: usize,
    /// Adam iterations per step.
    pub max_inner_steps: usize,
    /// Side of the square an image is resized to.
    pub max_size: u32,
}

/// Image sides are multiples of this: SD's VAE halves the side three times and its UNet
/// three more.
pub const SIZE_MULTIPLE: u32 = 64;

/// A checked inversion request.
#[derive(Debug, Clone)]
pub struct InvertParams {
    pub prompt: String,
    pub options: InvertOptions,
    pub size: u32,
    pub crop: Crop,
}

impl Limits {
    /// The library's bounds that these limits set: the same checks as the command line's.
    pub fn library(&self) -> nulltext::Limits {
        nulltext::Limits {
            max_pixels: self.max_pixels,
            max_size: self.max_size,
            max_prompt_chars: self.max_prompt_chars,
        }
    }
}

pub fn check_prompt(field: &str, s: &str, limits: &Limits) -> Result<(), ApiError> {
    Ok(limits.library().check_prompt(field, s)?)
}

fn number<T: std::str::FromStr>(field: &str, v: &str) -> Result<T, ApiError> {
    v.trim()
        .parse()
        .map_err(|_| ApiError::bad_request(format!("`{field}` = `{v}` is not a valid number")))
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    field: &str,
    v: T,
    lo: T,
    hi: T,
) -> Result<T, ApiError> {
    // Written so that NaN is refused too.
    if !(v >= lo && v <= hi) {
        return Err(ApiError::bad_request(format!(
            "`{field}` must be between {lo} and {hi}, got {v}"
        )));
    }
    Ok(v)
}

/// The text fields of the inversion form (everything but the image).
pub fn invert_params(
    fields: &[(String, String)],
    limits: &Limits,
    default_size: u32,
) -> Result<InvertParams, ApiError> {
    let mut prompt = None;
    let mut o = InvertOptions::default();
    let mut size = None;
    let mut crop = Crop::default();
    for (name, v) in fields {
        match name.as_str() {
            "prompt" => {
                check_prompt("prompt", v, limits)?;
                prompt = Some(v.clone());
            }
            "method" => {
                o.method = v
                    .trim()
                    .parse::<Method>()
                    .map_err(|e| ApiError::bad_request(format!("`method`: {e}")))?
            }
            "steps" => o.num_steps = in_range("steps", number(name, v)?, 1, limits.max_steps)?,
            "inner_steps" => {
                o.inner_steps =
                    in_range("inner_steps", number(name, v)?, 1, limits.max_inner_steps)?
            }
            "guidance" => o.guidance = in_range("guidance", number(name, v)?, 0.0, 50.0)?,
            "early_stop" => {
                o.early_stop = number(name, v)?;
                if !o.early_stop.is_finite() {
                    return Err(ApiError::bad_request("`early_stop` must be finite"));
                }
            }
            "size" => size = Some(number(name, v)?),
            "crop" if v.trim().is_empty() => {}
            "crop" => {
                crop = v
                    .parse()
                    .map_err(|e| ApiError::bad_request(format!("`crop`: {e}")))?
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown field `{}`",
                    other.chars().take(64).collect::<String>()
                )))
            }
        }
    }
    let prompt = prompt.ok_or_else(|| ApiError::bad_request("the field `prompt` is missing"))?;
    // The model's own size obeys the same bound as one asked for.
    let size = limits
        .library()
        .image_size("`size`", size, default_size as usize, SIZE_MULTIPLE)?;
    Ok(InvertParams {
        prompt,
        options: o,
        size,
        crop,
    })
}

/// Decodes an uploaded photo: the format from its content (PNG, JPEG or WebP, whatever
/// its name says), its size checked from the header before any pixel is decoded, EXIF
/// orientation applied, alpha dropped.
pub fn decode_image(bytes: &[u8], limits: &Limits) -> Result<RgbImage, ApiError> {
    // Sniffed here as well, for the status: what is not an image at all is a 415.
    match image::guess_format(bytes).ok() {
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) => {}
        Some(f) => {
            return Err(ApiError::unsupported_media(format!(
                "the upload is a {} image; nulltext reads PNG, JPEG and WebP",
                f.extensions_str().first().unwrap_or(&"other")
            )))
        }
        None => {
            return Err(ApiError::unsupported_media(
                "the upload is not an image nulltext can read (PNG, JPEG or WebP)",
            ))
        }
    }
    nulltext::image_io::decode_rgb(bytes, std::path::Path::new("the image"), limits.max_pixels)
        .map_err(|e| match e {
            nulltext::Error::TooManyPixels {
                width,
                height,
                max_pixels,
                ..
            } => ApiError::too_large(format!(
                "the image has {width}×{height} = {} pixels; this server takes at most \
                 {max_pixels}",
                width as u64 * height as u64
            )),
            nulltext::Error::Image { msg, .. } => {
                ApiError::bad_request(format!("the image cannot be decoded: {msg}"))
            }
            e => e.into(),
        })
}

/// A fraction of the sampling process: a number, or the command line's text form
/// (`"0.8"`, `"0.1:0.8"`, `"0.8,tiger=0.4"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Schedule {
    Number(f64),
    Text(String),
}

impl Schedule {
    fn text(&self) -> Option<String> {
        match self {
            Schedule::Number(x) => Some(x.to_string()),
            Schedule::Text(s) if s.trim().is_empty() => None,
            Schedule::Text(s) => Some(s.trim().to_string()),
        }
    }
}

/// The body of `POST /v1/inversions/{id}/edits`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditRequest {
    /// Target captions, one image each.
    pub targets: Vec<String>,
    /// auto, replace or refine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_replace: Option<Schedule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_replace: Option<Schedule>,
    /// `SOURCE_WORDS:TARGET_WORDS`, e.g. `"cat:tiger"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blend: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blend_threshold: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blend_subtract: Option<String>,
    /// Blend masks and attention maps from the layers at 1/N of the latent size (1, 2, 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_downscale: Option<usize>,
    /// `"tiger=2"` or `"fluffy=2,cat=0.5"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reweight: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdedit: Option<f64>,
    #[serde(default)]
    pub attention_maps: bool,
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

impl EditRequest {
    /// Checks the request on its own and turns it into the library's options; the words
    /// it names are checked against the prompts later, with the tokenizer.
    pub fn options(&self, limits: &Limits) -> Result<EditOptions, ApiError> {
        let n = self.targets.len();
        if n == 0 {
            return Err(ApiError::bad_request(
                "`targets` is empty: give at least one",
            ));
        }
        if n > limits.max_targets {
            return Err(ApiError::bad_request(format!(
                "{n} targets; at most {} are allowed",
                limits.max_targets
            )));
        }
        for (k, t) in self.targets.iter().enumerate() {
            check_prompt(&format!("targets[{k}]"), t, limits)?;
        }
        let text = |s: &Option<String>| nonempty(s).map(String::from);
        let spec = EditSpec {
            target: String::new(),
            mode: text(&self.mode),
            cross_replace: self.cross_replace.as_ref().and_then(Schedule::text),
            self_replace: self.self_replace.as_ref().and_then(Schedule::text),
            blend: text(&self.blend),
            blend_threshold: self.blend_threshold,
            blend_subtract: text(&self.blend_subtract),
            attention_downscale: self.attention_downscale,
            reweight: text(&self.reweight),
            sdedit: self.sdedit,
        };
        let mut o = spec.options()?;
        o.record_attention = self.attention_maps;
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nulltext::edit::Window;
    use std::io::Cursor;

    fn limits() -> Limits {
        Limits {
            max_body_bytes: 1 << 20,
            max_pixels: 1000,
            max_prompt_chars: 20,
            max_targets: 2,
            max_steps: 100,
            max_inner_steps: 10,
            max_size: 512,
        }
    }

    fn fields(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn inversion_fields() {
        let p = invert_params(
            &fields(&[("prompt", "a cat"), ("steps", "4"), ("size", "64")]),
            &limits(),
            256,
        )
        .unwrap();
        assert_eq!((p.options.num_steps, p.size), (4, 64));
        assert_eq!(p.options.inner_steps, 10);
        let p = invert_params(
            &fields(&[("prompt", "a cat"), ("method", "direct")]),
            &limits(),
            256,
        )
        .unwrap();
        assert_eq!(p.options.method, nulltext::Method::Direct);
        for (f, msg) in [
            (vec![("steps", "4")], "`prompt` is missing"),
            (vec![("prompt", " ")], "`prompt` is empty"),
            (
                vec![("prompt", "a very long caption of a cat")],
                "at most 20",
            ),
            (vec![("prompt", "a\u{0}cat")], "control"),
            (vec![("prompt", "a"), ("steps", "0")], "between 1 and 100"),
            (vec![("prompt", "a"), ("steps", "x")], "not a valid number"),
            (vec![("prompt", "a"), ("size", "72")], "multiple of 64"),
            (vec![("prompt", "a"), ("size", "1024")], "at most 512"),
            (vec![("prompt", "a"), ("guidance", "NaN")], "between"),
            (vec![("prompt", "a"), ("method", "magic")], "unknown method"),
            (
                vec![("prompt", "a"), ("path", "../x")],
                "unknown field `path`",
            ),
        ] {
            let e = invert_params(&fields(&f), &limits(), 256).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains(msg), "{f:?}: {}", e.message);
        }
    }

    #[test]
    fn edit_requests() {
        let r: EditRequest = serde_json::from_str(
            r#"{"targets":["a dog"],"cross_replace":0.6,"self_replace":"0.1:0.4","blend":"cat:dog","reweight":"dog=2","attention_downscale":2}"#,
        )
        .unwrap();
        let o = r.options(&limits()).unwrap();
        assert_eq!(o.cross_replace.default, Window::until(0.6));
        assert_eq!(
            o.self_replace,
            Window {
                start: 0.1,
                end: 0.4
            }
        );
        assert_eq!(o.blend.unwrap().target_words, vec!["dog"]);
        assert_eq!(o.reweight, vec![("dog".to_string(), 2.0)]);
        assert_eq!(o.attention_downscale, 2);
        for (body, msg) in [
            (r#"{"targets":[]}"#, "at least one"),
            (r#"{"targets":["a","b","c"]}"#, "at most 2"),
            (r#"{"targets":["a"],"mode":"swap"}"#, "unknown edit mode"),
            (r#"{"targets":["a"],"reweight":"dog"}"#, "WORD=SCALE"),
            (r#"{"targets":["a"],"sdedit":2}"#, "(0, 1]"),
            (r#"{"targets":["a"],"blend_subtract":"x"}"#, "needs `blend`"),
            (r#"{"targets":["a"],"cross_replace":"x"}"#, "cross_replace"),
            (r#"{"targets":["a"],"attention_downscale":3}"#, "1, 2 or 4"),
        ] {
            let r: EditRequest = serde_json::from_str(body).unwrap();
            let e = r.options(&limits()).unwrap_err();
            assert!(e.message.contains(msg), "{body}: {}", e.message);
        }
        assert!(serde_json::from_str::<EditRequest>(r#"{"targets":["a"],"file":"/etc"}"#).is_err());
    }

    #[test]
    fn images_are_sniffed_and_sized() {
        let e = decode_image(b"just some text, named .png", &limits()).unwrap_err();
        assert_eq!(e.status, 415);
        let mut png = Vec::new();
        RgbImage::new(40, 30)
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let e = decode_image(&png, &limits()).unwrap_err();
        assert_eq!(e.status, 413, "{}", e.message);
        let mut small = limits();
        small.max_pixels = 1200;
        assert_eq!(decode_image(&png, &small).unwrap().dimensions(), (40, 30));
        let e = decode_image(&png[..png.len() / 2], &small).unwrap_err();
        assert_eq!(e.status, 400);
    }
}
