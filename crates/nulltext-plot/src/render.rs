//! Pictures for people: captioned grids of results and Prompt-to-Prompt attention maps.
//!
//! Small images are enlarged by whole factors with nearest-neighbour sampling, so that a
//! 64 px result is shown at a readable size and every pixel (or attention cell) stays a
//! visible square; captions are set in whole words in the bundled font.

use image::{imageops, Rgb, RgbImage};

use crate::text;

/// The shorter side that grids enlarge images to, at least.
pub const MIN_TILE: u32 = 256;
/// Margin around and between tiles, and around captions.
pub const PAD: u32 = 8;
/// Caption size in pixels per em, and the smallest it shrinks to so that a long word fits.
const FONT_PX: f32 = 16.0;
const MIN_FONT_PX: f32 = 9.0;
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([20, 20, 20]);

/// `img` enlarged by the smallest whole factor that makes its shorter side at least `min`
/// pixels (nearest neighbour); a copy when it already is.
pub fn enlarge(img: &RgbImage, min: u32) -> RgbImage {
    let short = img.width().min(img.height()).max(1);
    let k = min.div_ceil(short).max(1);
    if k == 1 {
        return img.clone();
    }
    imageops::resize(
        img,
        img.width() * k,
        img.height() * k,
        imageops::FilterType::Nearest,
    )
}

/// Captions laid out in whole words within `width` pixels: the font size (the largest from
/// 16 px down at which every word fits) and each caption's lines.
pub fn caption_layout(captions: &[&str], width: u32) -> (f32, Vec<Vec<String>>) {
    let widest_word = captions
        .iter()
        .flat_map(|c| c.split_whitespace())
        .map(|w| text::width(w, FONT_PX))
        .fold(0.0, f32::max);
    let px = if widest_word > width as f32 {
        (FONT_PX * width as f32 / widest_word)
            .floor()
            .max(MIN_FONT_PX)
    } else {
        FONT_PX
    };
    let lines = captions
        .iter()
        .map(|c| text::wrap_words(c, width as f32, px))
        .collect();
    (px, lines)
}

/// The left edge of tile `k` in a row of tiles `tile_w` wide.
pub fn tile_x(k: usize, tile_w: u32) -> u32 {
    PAD + k as u32 * (tile_w + PAD)
}

/// Images side by side, each with its caption below, on a white background; images
/// smaller than [`MIN_TILE`] are enlarged.
pub fn captioned_row(items: &[(RgbImage, String)]) -> RgbImage {
    let items: Vec<(RgbImage, String)> = items
        .iter()
        .map(|(img, c)| (enlarge(img, MIN_TILE), c.clone()))
        .collect();
    row(&items)
}

/// Tiles as given, side by side, captions below.
fn row(items: &[(RgbImage, String)]) -> RgbImage {
    let tile_w = items.iter().map(|(i, _)| i.width()).max().unwrap_or(1);
    let tile_h = items.iter().map(|(i, _)| i.height()).max().unwrap_or(1);
    let captions: Vec<&str> = items.iter().map(|(_, c)| c.as_str()).collect();
    let (px, lines) = caption_layout(&captions, tile_w.saturating_sub(2 * PAD).max(1));
    let line_h = text::line_height(px).ceil() as u32;
    let n_lines = lines.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let caption_h = if n_lines == 0 {
        0
    } else {
        n_lines * line_h + PAD
    };
    let n = items.len() as u32;
    let mut out = RgbImage::from_pixel(
        n * tile_w + (n + 1) * PAD,
        PAD + tile_h + PAD + caption_h,
        WHITE,
    );
    for (k, ((img, _), lines)) in items.iter().zip(&lines).enumerate() {
        let x = tile_x(k, tile_w);
        imageops::overlay(
            &mut out,
            img,
            (x + (tile_w - img.width()) / 2) as i64,
            PAD as i64,
        );
        for (l, line) in lines.iter().enumerate() {
            let tx = x as f32 + (tile_w as f32 - text::width(line, px)).max(0.0) / 2.0;
            let ty = (PAD + tile_h + PAD + l as u32 * line_h) as f32;
            text::draw(&mut out, line, (tx, ty), px, INK);
        }
    }
    out
}

/// One prompt's cross-attention maps (`maps`: `[r_h][r_w][77]` row-major, as a flat slice)
/// for `tokens` (position, text) as a strip of grayscale heat maps `tile` pixels on their
/// longer side, each normalized by its maximum and captioned with its token (the
/// Prompt-to-Prompt visualization). Cells are enlarged as squares, not blurred: the picture
/// shows the resolution the maps have.
pub fn attention_strip(
    maps: &[f32],
    rh: usize,
    rw: usize,
    tokens: &[(usize, String)],
    tile: u32,
) -> RgbImage {
    let long = rh.max(rw).max(1) as u32;
    let (tw, th) = (tile * rw as u32 / long, tile * rh as u32 / long);
    let items: Vec<(RgbImage, String)> = tokens
        .iter()
        .map(|(pos, text)| {
            let vals: Vec<f32> = (0..rh * rw).map(|p| maps[p * 77 + pos]).collect();
            let max = vals.iter().cloned().fold(0f32, f32::max).max(1e-12);
            let small = RgbImage::from_fn(rw as u32, rh as u32, |x, y| {
                let v = (255.0 * vals[y as usize * rw + x as usize] / max).clamp(0.0, 255.0) as u8;
                Rgb([v, v, v])
            });
            let big = imageops::resize(&small, tw, th, imageops::FilterType::Nearest);
            (big, text.clone())
        })
        .collect();
    row(&items)
}

/// Stacks images vertically (left-aligned, white background).
pub fn stack_vertical(rows: &[RgbImage]) -> RgbImage {
    let w = rows.iter().map(|r| r.width()).max().unwrap_or(1);
    let h = rows.iter().map(|r| r.height()).sum::<u32>().max(1);
    let mut out = RgbImage::from_pixel(w, h, WHITE);
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

    /// The last row of `img` with ink (dark pixels) in it.
    fn last_inked_row(img: &RgbImage) -> u32 {
        (0..img.height())
            .rev()
            .find(|&y| (0..img.width()).any(|x| img.get_pixel(x, y).0[0] < 128))
            .unwrap_or(0)
    }

    fn assert_whole_words(captions: &[&str], lines: &[Vec<String>]) {
        for (c, l) in captions.iter().zip(lines) {
            // a word split across lines would join as two words
            assert_eq!(
                l.join(" "),
                c.split_whitespace().collect::<Vec<_>>().join(" ")
            );
        }
    }

    #[test]
    fn grids_of_64_px_images_are_enlarged_with_captions_in_words() {
        let img = RgbImage::from_pixel(64, 64, Rgb([200, 210, 230]));
        let captions = [
            "input",
            "reconstruction: a red circle on a blue background",
            "a green circle on a blue background",
        ];
        let items: Vec<_> = captions
            .iter()
            .map(|c| (img.clone(), c.to_string()))
            .collect();
        let grid = captioned_row(&items);
        assert_eq!(grid.width(), 3 * MIN_TILE + 4 * PAD);
        // every image pixel became a 4×4 square
        assert_eq!(
            *grid.get_pixel(tile_x(1, MIN_TILE) + 255, PAD + 255),
            Rgb([200, 210, 230])
        );

        let (px, lines) = caption_layout(&captions, MIN_TILE - 2 * PAD);
        assert_eq!(px, FONT_PX);
        assert_whole_words(&captions, &lines);
        assert!(lines.iter().all(|l| l.len() <= 3), "{lines:?}");
        // the captions end within three lines below the images
        let bound = 2 * PAD + MIN_TILE + PAD + 3 * text::line_height(px).ceil() as u32;
        assert!(
            last_inked_row(&grid) < bound,
            "{} ≥ {bound}",
            last_inked_row(&grid)
        );
        assert!(grid.height() <= bound + PAD);
    }

    #[test]
    fn attention_sheets_have_one_line_per_token() {
        let tokens: Vec<(usize, String)> = [
            "<start>",
            "a",
            "red",
            "circle",
            "on",
            "a",
            "blue",
            "background",
            "<end>",
        ]
        .iter()
        .enumerate()
        .map(|(i, t)| (i, t.to_string()))
        .collect();
        // 8×8 maps; token k peaks at cell (k, k)
        let mut maps = vec![0.1f32; 8 * 8 * 77];
        for k in 0..tokens.len().min(8) {
            maps[(k * 8 + k) * 77 + k] = 1.0;
        }
        let strip = attention_strip(&maps, 8, 8, &tokens, 128);
        let names: Vec<&str> = tokens.iter().map(|(_, t)| t.as_str()).collect();
        let (px, lines) = caption_layout(&names, 128 - 2 * PAD);
        assert_eq!(px, FONT_PX);
        assert!(lines.iter().all(|l| l.len() == 1));
        assert_whole_words(&names, &lines);
        let bound = PAD + 128 + PAD + text::line_height(px).ceil() as u32;
        assert!(last_inked_row(&strip) < bound);
        // cells stay square (16 px each) and sharp: token 3's peak fills cell (3, 3) exactly
        let (x, y) = (tile_x(3, 128), PAD);
        assert_eq!(strip.get_pixel(x + 3 * 16, y + 3 * 16).0, [255; 3]);
        assert_eq!(strip.get_pixel(x + 4 * 16 - 1, y + 4 * 16 - 1).0, [255; 3]);
        assert_eq!(strip.get_pixel(x + 4 * 16, y + 3 * 16).0, [25; 3]);
    }

    #[test]
    fn a_word_wider_than_the_tile_shrinks_the_font_but_stays_whole() {
        let long = "hippopotamus-shaped-background";
        let (px, lines) = caption_layout(&[long], 200);
        assert!(px < FONT_PX);
        assert_eq!(lines, [vec![long.to_string()]]);
        assert!(text::width(long, px) <= 200.0);
    }

    #[test]
    fn large_images_are_not_enlarged() {
        let img = RgbImage::new(512, 300);
        assert_eq!(enlarge(&img, MIN_TILE).dimensions(), (512, 300));
        assert_eq!(
            enlarge(&RgbImage::new(100, 64), MIN_TILE).dimensions(),
            (400, 256)
        );
    }
}
