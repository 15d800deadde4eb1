//! Text in the bundled DejaVu Sans, measured and drawn anti-aliased with ab_glyph: image
//! labels here, chart text through plotters (which gets the same font as "sans-serif").

use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use image::{Rgb, RgbImage};

/// DejaVu Sans 2.37 (Bitstream Vera licence, `fonts/LICENSE`): no system fonts needed.
pub const FONT_BYTES: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

/// The name charts use for the font (an SVG names it; viewers substitute their own sans).
pub(crate) const FAMILY: &str = "sans-serif";

pub(crate) fn font() -> &'static FontRef<'static> {
    static FONT: OnceLock<FontRef<'static>> = OnceLock::new();
    // The file is compiled in; `font_parses` tests it.
    FONT.get_or_init(|| FontRef::try_from_slice(FONT_BYTES).expect("bundled font"))
}

/// Width in pixels of `text` set at `px` pixels per em, kerned.
pub fn width(text: &str, px: f32) -> f32 {
    let f = font().as_scaled(PxScale::from(px));
    let mut w = 0.0;
    let mut prev = None;
    for c in text.chars() {
        let id = f.glyph_id(c);
        if let Some(p) = prev {
            w += f.kern(p, id);
        }
        w += f.h_advance(id);
        prev = Some(id);
    }
    w
}

/// Distance between baselines of consecutive lines at `px`.
pub fn line_height(px: f32) -> f32 {
    let f = font().as_scaled(PxScale::from(px));
    f.height() + f.line_gap()
}

/// Draws `text` with the top of its line box at (`x`, `y`), blended over the image.
pub fn draw(img: &mut RgbImage, text: &str, (x, y): (f32, f32), px: f32, color: Rgb<u8>) {
    let scale = PxScale::from(px);
    let f = font().as_scaled(scale);
    let baseline = y + f.ascent();
    let mut caret = x;
    let mut prev = None;
    for c in text.chars() {
        let id = f.glyph_id(c);
        if let Some(p) = prev {
            caret += f.kern(p, id);
        }
        prev = Some(id);
        let glyph = id.with_scale_and_position(scale, point(caret, baseline));
        caret += f.h_advance(id);
        let Some(outline) = font().outline_glyph(glyph) else {
            continue; // a space
        };
        let origin = outline.px_bounds().min;
        outline.draw(|gx, gy, coverage| {
            let (px, py) = (origin.x as i64 + gx as i64, origin.y as i64 + gy as i64);
            if px < 0 || py < 0 || px >= img.width() as i64 || py >= img.height() as i64 {
                return;
            }
            let a = coverage.clamp(0.0, 1.0);
            let dst = img.get_pixel_mut(px as u32, py as u32);
            for (d, s) in dst.0.iter_mut().zip(color.0) {
                *d = (*d as f32 * (1.0 - a) + s as f32 * a).round() as u8;
            }
        });
    }
}

/// `text` in lines of whole words, each at most `max_width` pixels wide at `px` — except a
/// single word wider than that, which gets a line of its own (words are never split).
pub fn wrap_words(text: &str, max_width: f32, px: f32) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let candidate = if line.is_empty() {
            word.to_string()
        } else {
            format!("{line} {word}")
        };
        if line.is_empty() || width(&candidate, px) <= max_width {
            line = candidate;
        } else {
            lines.push(std::mem::replace(&mut line, word.to_string()));
        }
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn font_parses() {
        assert!(FontRef::try_from_slice(FONT_BYTES).is_ok());
        // a proportional font: "i" is narrower than "m", and widths scale with the size
        assert!(width("i", 16.0) < width("m", 16.0));
        assert!((width("circle", 32.0) - 2.0 * width("circle", 16.0)).abs() < 0.5);
    }

    #[test]
    fn wraps_whole_words_within_the_width() {
        let text = "reconstruction: a red circle on a blue background";
        let lines = wrap_words(text, 120.0, 16.0);
        assert!(lines.len() > 1);
        assert_eq!(lines.join(" "), text);
        for l in &lines {
            assert!(width(l, 16.0) <= 120.0 || !l.contains(' '), "{l}");
        }
        // a word longer than the width stays whole, on its own line
        assert_eq!(
            wrap_words("a reconstruction b", 20.0, 16.0),
            ["a", "reconstruction", "b"]
        );
    }

    #[test]
    fn draws_dark_antialiased_text() {
        let mut img = RgbImage::from_pixel(80, 24, Rgb([255, 255, 255]));
        draw(&mut img, "circle", (2.0, 2.0), 16.0, Rgb([0, 0, 0]));
        let dark = img.pixels().filter(|p| p.0[0] < 64).count();
        let grey = img.pixels().filter(|p| (64..192).contains(&p.0[0])).count();
        assert!(dark > 30 && grey > 10, "{dark} dark, {grey} grey pixels");
        // nothing drawn beyond the measured width
        let right = (2.0 + width("circle", 16.0)).ceil() as u32 + 1;
        assert!((right..80).all(|x| (0..24).all(|y| img.get_pixel(x, y).0[0] == 255)));
    }
}
