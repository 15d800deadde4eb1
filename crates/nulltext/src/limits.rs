//! What nulltext accepts: one check per quantity (prompts, image and pixel sizes, steps,
//! guidance), shared by the command line, batch runs and the server, so that the same
//! input gets the same answer everywhere and is refused before any long work starts.

use std::path::Path;

use nulltext_models::{Ddim, SchedulerConfig};

use crate::error::{invalid, Error, Result};

/// Upper bounds on what one piece of work may ask for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Pixels of an input image (width × height as its header says, checked before any
    /// pixel is decoded).
    pub max_pixels: u64,
    /// Side of the square an image is resized to, whether asked for or the model's own.
    pub max_size: u32,
    /// Characters of a prompt or target caption.
    pub max_prompt_chars: usize,
}

/// 64 MP holds the photos of any current camera or phone.
pub const DEFAULT_MAX_PIXELS: u64 = 64_000_000;
/// Self-attention at the finest level grows with the fourth power of the side: at 2048 px
/// an SD 1.x UNet pass already needs tens of GB.
pub const DEFAULT_MAX_SIZE: u32 = 2048;
/// Long captions are allowed (CLIP reads their first 77 tokens, with a warning); this
/// only bounds the work of tokenizing them. The server sets its own, lower bound.
pub const DEFAULT_MAX_PROMPT_CHARS: usize = 10_000;
/// Classifier-free guidance beyond this only saturates the image.
pub const MAX_GUIDANCE: f64 = 50.0;
impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pixels: DEFAULT_MAX_PIXELS,
            max_size: DEFAULT_MAX_SIZE,
            max_prompt_chars: DEFAULT_MAX_PROMPT_CHARS,
        }
    }
}

impl Limits {
    /// A prompt or caption: not blank, no control characters, at most `max_prompt_chars`.
    /// `field` names it as the caller's user knows it (`--prompt`, `targets[0]`).
    pub fn check_prompt(&self, field: &str, s: &str) -> Result<()> {
        if s.trim().is_empty() {
            return Err(invalid(format!("`{field}` is empty")));
        }
        let n = s.chars().count();
        if n > self.max_prompt_chars {
            return Err(invalid(format!(
                "`{field}` has {n} characters; at most {} are allowed",
                self.max_prompt_chars
            )));
        }
        if s.chars().any(char::is_control) {
            return Err(invalid(format!("`{field}` contains control characters")));
        }
        Ok(())
    }

    /// An image's size from its header, before it is decoded.
    pub fn check_pixels(&self, path: &Path, width: u32, height: u32) -> Result<()> {
        let pixels = width as u64 * height as u64;
        if pixels > self.max_pixels {
            return Err(Error::TooManyPixels {
                path: path.to_path_buf(),
                width,
                height,
                max_pixels: self.max_pixels,
            });
        }
        Ok(())
    }

    /// The image side work runs at, asked for with `flag` (`requested`) or the model's
    /// (`default`, which comes from a config file and obeys the same bounds): a positive
    /// multiple of `multiple`, at most `max_size`.
    pub fn image_size(
        &self,
        flag: &str,
        requested: Option<u32>,
        default: usize,
        multiple: u32,
    ) -> Result<u32> {
        let (size, whence) = match requested {
            Some(s) => (s as u64, flag),
            None => (default as u64, "the model's sample size"),
        };
        if size > self.max_size as u64 {
            return Err(invalid(format!(
                "{whence} is {size} pixels; at most {} are allowed (--max-size)",
                self.max_size
            )));
        }
        let size = size as u32;
        if size == 0 || !size.is_multiple_of(multiple.max(1)) {
            return Err(invalid(format!(
                "{whence} must be a positive multiple of {multiple}, got {size}"
            )));
        }
        Ok(size)
    }
}

/// DDIM steps (`what`: the option or field that gave them) for `scheduler`: between 1 and
/// [`Ddim::max_steps`].
pub fn check_steps(what: &str, steps: usize, scheduler: &SchedulerConfig) -> Result<()> {
    scheduler.validate()?;
    let max = Ddim::max_steps(scheduler);
    if steps == 0 || steps > max {
        return Err(invalid(format!(
            "{what} must be between 1 and {max} for this model's scheduler, got {steps}"
        )));
    }
    Ok(())
}

/// A guidance scale: finite, 0 to [`MAX_GUIDANCE`].
pub fn check_guidance(what: &str, g: f64) -> Result<()> {
    // Written so that NaN is refused too.
    if !(0.0..=MAX_GUIDANCE).contains(&g) {
        return Err(invalid(format!(
            "{what} must be between 0 and {MAX_GUIDANCE}, got {g}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd_scheduler_takes_at_most_999_steps() {
        let s = SchedulerConfig::default();
        assert!(check_steps("--steps", 999, &s).is_ok());
        let e = check_steps("--steps", 1000, &s).unwrap_err().to_string();
        assert!(e.contains("between 1 and 999"), "{e}");
        assert!(check_steps("--steps", 0, &s).is_err());
    }

    #[test]
    fn sizes_from_configs_obey_the_limit() {
        let l = Limits::default();
        assert_eq!(l.image_size("--size", None, 512, 8).unwrap(), 512);
        assert_eq!(l.image_size("--size", Some(256), 512, 8).unwrap(), 256);
        let e = l
            .image_size("--size", None, 800_000, 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("the model's sample size is 800000"), "{e}");
        assert!(l.image_size("--size", Some(72), 512, 64).is_err());
        assert!(l.image_size("--size", Some(0), 512, 8).is_err());
    }

    #[test]
    fn prompts_and_guidance() {
        let l = Limits::default();
        assert!(l.check_prompt("--prompt", "a cat").is_ok());
        for bad in ["", "  ", "a\u{0}cat"] {
            assert!(l.check_prompt("--prompt", bad).is_err(), "{bad:?}");
        }
        assert!(l.check_prompt("--prompt", &"a ".repeat(5001)).is_err());
        for g in [f64::NAN, 1e308, -1.0, f64::INFINITY] {
            assert!(check_guidance("guidance", g).is_err(), "{g}");
        }
        assert!(check_guidance("guidance", 7.5).is_ok());
    }
}
