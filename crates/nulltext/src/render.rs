//! Pictures for people: captioned grids of results and Prompt-to-Prompt attention maps.

use font8x8::UnicodeFonts;
use image::{imageops, Rgb, RgbImage};

const SCALE: u32 = 2;
const GLYPH: u32 = 8 * SCALE;
const PAD: u32 = 6;

/// Draws `text` at (x, y) in an 8×8 bitmap font scaled ×2 (non-ASCII glyphs become `?`).
fn draw_text(img: &mut RgbImage, text: &str, x: u32, y: u32, color: Rgb<u8>) {
    draw_text_scaled(img, text, x, y, color, SCALE);
}

/// Draws `text` at (x, y) in the 8×8 bitmap font scaled ×`scale`.
pub(crate) fn draw_text_scaled(
    img: &mut RgbImage,
    text: &str,
    x: u32,
    y: u32,
    color: Rgb<u8>,
    scale: u32,
) {
    let glyph_w = 8 * scale;
    for (k, c) in text.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS
            .get(c)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        let gx = x + k as u32 * glyph_w;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8u32 {
                if bits >> col & 1 == 1 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let (px, py) = (gx + col * scale + dx, y + row as u32 * scale + dy);
                            if px < img.width() && py < img.height() {
                                img.put_pixel(px, py, color);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Splits `text` into lines of at most `width` characters, at spaces where possible.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let mut word = word.to_string();
        while word.chars().count() > width {
            if !line.is_empty() {
                lines.push(std::mem::take(&mut line));
            }
            let head: String = word.chars().take(width).collect();
            word = word.chars().skip(width).collect();
            lines.push(head);
        }
        if line.is_empty() {
            line = word;
        } else if line.chars().count() + 1 + word.chars().count() <= width {
            line.push(' ');
            line.push_str(&word);
        } else {
            lines.push(std::mem::replace(&mut line, word));
        }
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// Images side by side, each with its caption below, on a white background.
pub fn captioned_row(items: &[(RgbImage, String)]) -> RgbImage {
    let tile_w = items.iter().map(|(i, _)| i.width()).max().unwrap_or(1);
    let tile_h = items.iter().map(|(i, _)| i.height()).max().unwrap_or(1);
    let chars = ((tile_w.saturating_sub(2 * PAD)) / GLYPH).max(1) as usize;
    let wrapped: Vec<Vec<String>> = items.iter().map(|(_, c)| wrap(c, chars)).collect();
    let lines = wrapped.iter().map(|l| l.len()).max().unwrap_or(0) as u32;
    let caption_h = if lines == 0 {
        0
    } else {
        lines * (GLYPH + 4) + 2 * PAD
    };
    let n = items.len() as u32;
    let mut out = RgbImage::from_pixel(
        n * tile_w + (n + 1) * PAD,
        tile_h + caption_h + 2 * PAD,
        Rgb([255, 255, 255]),
    );
    for (k, ((img, _), lines)) in items.iter().zip(&wrapped).enumerate() {
        let x = PAD + k as u32 * (tile_w + PAD);
        imageops::overlay(&mut out, img, x as i64, PAD as i64);
        for (l, text) in lines.iter().enumerate() {
            let tx = x + (tile_w.saturating_sub(text.chars().count() as u32 * GLYPH)) / 2;
            let ty = PAD + tile_h + PAD + l as u32 * (GLYPH + 4);
            draw_text(&mut out, text, tx, ty, Rgb([0, 0, 0]));
        }
    }
    out
}

/// One prompt's cross-attention maps (`maps`: `[r_h][r_w][77]` row-major, as a flat slice)
/// for `tokens` (position, text) as a strip of grayscale heat maps, each normalized by its
/// maximum and captioned with its token (the Prompt-to-Prompt visualization).
pub fn attention_strip(
    maps: &[f32],
    rh: usize,
    rw: usize,
    tokens: &[(usize, String)],
    tile: u32,
) -> RgbImage {
    let items: Vec<(RgbImage, String)> = tokens
        .iter()
        .map(|(pos, text)| {
            let vals: Vec<f32> = (0..rh * rw).map(|p| maps[p * 77 + pos]).collect();
            let max = vals.iter().cloned().fold(0f32, f32::max).max(1e-12);
            let small = RgbImage::from_fn(rw as u32, rh as u32, |x, y| {
                let v = (255.0 * vals[y as usize * rw + x as usize] / max).clamp(0.0, 255.0) as u8;
                Rgb([v, v, v])
            });
            let big = imageops::resize(&small, tile, tile, imageops::FilterType::Triangle);
            (big, text.clone())
        })
        .collect();
    captioned_row(&items)
}

/// Stacks images vertically (left-aligned, white background).
pub fn stack_vertical(rows: &[RgbImage]) -> RgbImage {
    let w = rows.iter().map(|r| r.width()).max().unwrap_or(1);
    let h = rows.iter().map(|r| r.height()).sum::<u32>().max(1);
    let mut out = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let mut y = 0;
    for r in rows {
        imageops::overlay(&mut out, r, 0, y as i64);
        y += r.height();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_and_draws() {
        assert_eq!(
            wrap("a close up photo of a cat", 10),
            vec!["a close up", "photo of a", "cat"]
        );
        let img = RgbImage::from_pixel(64, 64, Rgb([10, 20, 30]));
        let row = captioned_row(&[(img.clone(), "input".into()), (img, "a tiger".into())]);
        assert_eq!(row.width(), 2 * 64 + 3 * PAD);
        // some caption pixels are black
        assert!(row.pixels().any(|p| *p == Rgb([0, 0, 0])));
    }
}
