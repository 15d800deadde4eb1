//! Line charts as PNG: the paper's Figure 4 (reconstruction PSNR against null-text
//! iterations, one line per method) from traces.

use image::{Rgb, RgbImage};

use crate::render::draw_text_scaled;
use crate::trace::Trace;

/// A polyline with markers, or a horizontal dashed reference line when it has one point.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub color: Rgb<u8>,
    /// Drawn as a dashed horizontal line across the chart at its (single) y.
    pub reference: bool,
}

/// A chart: axes with ticks, a title, a legend.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub width: u32,
    pub height: u32,
}

const PALETTE: [Rgb<u8>; 6] = [
    Rgb([34, 139, 34]),  // green: the paper's full method
    Rgb([30, 100, 200]), // blue
    Rgb([220, 120, 0]),  // orange
    Rgb([200, 30, 30]),  // red
    Rgb([130, 60, 170]), // purple
    Rgb([0, 150, 150]),  // teal
];
const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
const GREY: Rgb<u8> = Rgb([225, 225, 225]);

/// What the PSNR of a Figure 4 is measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Against {
    /// The input image (the paper's choice), with the VAE round trip as the upper bound.
    #[default]
    Input,
    /// The VAE round trip of the input: how much of what the VAE can represent is recovered
    /// (for models whose VAE does not reproduce photos, such as random test models).
    Vae,
}

/// Figure 4 from traces: x = total null-text iterations, y = reconstruction PSNR; methods
/// without optimization (and, against the input, the VAE round trip: the upper bound) as
/// dashed reference lines.
pub fn figure4(traces: &[Trace], against: Against) -> Chart {
    let mut series = Vec::new();
    let order = |m: &str| match m {
        "null-text" => 0,
        "null-text-global" => 1,
        "negative-prompt" => 2,
        "ddim" => 3,
        _ => 4,
    };
    let mut traces: Vec<&Trace> = traces.iter().collect();
    traces.sort_by_key(|t| order(&t.method));
    for (k, t) in traces.iter().enumerate() {
        let color = match order(&t.method) {
            o @ 0..=3 => PALETTE[o],
            _ => PALETTE[4 + k % 2],
        };
        let points: Vec<(f64, f64)> = t
            .points
            .iter()
            .map(|p| {
                let y = match against {
                    Against::Input => p.psnr,
                    Against::Vae => p.psnr_vs_vae,
                };
                (p.iterations as f64, y)
            })
            .collect();
        let reference = t.points.len() == 1 && t.points[0].budget == 0;
        series.push(Series {
            label: t.method.clone(),
            points,
            color,
            reference,
        });
    }
    if let (Some(t), Against::Input) = (traces.first(), against) {
        series.push(Series {
            label: "VAE round trip (upper bound)".into(),
            points: vec![(0.0, t.vae_psnr)],
            color: Rgb([90, 90, 90]),
            reference: true,
        });
    }
    let title = match traces.first() {
        Some(t) => format!(
            "Reconstruction vs. optimization ({}, {} px, {} steps, w = {})",
            std::path::Path::new(&t.model)
                .file_name()
                .map_or(t.model.clone(), |n| n.to_string_lossy().into_owned()),
            t.size,
            t.steps,
            t.guidance
        ),
        None => "Reconstruction vs. optimization".into(),
    };
    Chart {
        title,
        x_label: "null-text iterations (all steps)".into(),
        y_label: match against {
            Against::Input => "PSNR vs input (dB)".into(),
            Against::Vae => "PSNR vs VAE round trip (dB)".into(),
        },
        series,
        width: 900,
        height: 560,
    }
}

/// The round step (1, 2, 2.5 or 5 × 10ᵏ) that cuts `lo..hi` into about `target` parts.
fn tick_step(lo: f64, hi: f64, target: usize) -> f64 {
    let span = (hi - lo).max(1e-9);
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

/// "Nice" tick positions covering [lo, hi], and their step.
fn ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, f64) {
    let step = tick_step(lo, hi, target);
    let first = (lo / step).ceil() * step;
    let at = (0..)
        .map(|i| first + i as f64 * step)
        .take_while(|v| *v <= hi + step * 1e-6)
        .collect();
    (at, step)
}

/// A tick label with as many decimals as the tick step needs.
fn fmt_tick(v: f64, step: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        return format!("{}", v.round() as i64);
    }
    let mut decimals = 0;
    while decimals < 6
        && ((step * 10f64.powi(decimals)).round() - step * 10f64.powi(decimals)).abs() > 1e-6
    {
        decimals += 1;
    }
    format!("{v:.*}", decimals as usize)
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb<u8>, dash: bool) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        if dash && (i / 6) % 2 == 1 {
            continue;
        }
        let t = i as f64 / n as f64;
        let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            let (px, py) = (x as i64 + dx, y as i64 + dy);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, c);
            }
        }
    }
}

fn marker(img: &mut RgbImage, (x, y): (f64, f64), c: Rgb<u8>) {
    for dy in -3i64..=3 {
        for dx in -3i64..=3 {
            let (px, py) = (x as i64 + dx, y as i64 + dy);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, c);
            }
        }
    }
}

/// Renders the chart.
pub fn render(chart: &Chart) -> RgbImage {
    let (w, h) = (chart.width.max(320), chart.height.max(240));
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let (left, right, top, bottom) = (80.0, 24.0, 48.0, 60.0);
    let (pw, ph) = (w as f64 - left - right, h as f64 - top - bottom);

    let all: Vec<(f64, f64)> = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let xmax = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let (ymin, ymax) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    // the data's range padded by 8 % and widened to whole tick steps (a flat series gets a
    // band around its value)
    let (ymin, ymax) = if ymin.is_finite() {
        let pad = ((ymax - ymin) * 0.08)
            .max(ymax.abs().max(ymin.abs()) * 0.05)
            .max(1e-6);
        let step = tick_step(ymin - pad, ymax + pad, 6);
        (
            ((ymin - pad) / step).floor() * step,
            ((ymax + pad) / step).ceil() * step,
        )
    } else {
        (0.0, 1.0)
    };
    let sx = |x: f64| left + x / xmax * pw;
    let sy = |y: f64| top + (ymax - y) / (ymax - ymin) * ph;

    // Grid, axes, ticks.
    let (x_ticks, x_step) = ticks(0.0, xmax, 8);
    for t in x_ticks {
        line(&mut img, (sx(t), top), (sx(t), top + ph), GREY, false);
        let s = fmt_tick(t, x_step);
        let tw = s.len() as f64 * 8.0;
        draw_text_scaled(
            &mut img,
            &s,
            (sx(t) - tw / 2.0).max(0.0) as u32,
            (top + ph + 8.0) as u32,
            BLACK,
            1,
        );
    }
    let (y_ticks, y_step) = ticks(ymin, ymax, 6);
    for t in y_ticks {
        line(&mut img, (left, sy(t)), (left + pw, sy(t)), GREY, false);
        let s = fmt_tick(t, y_step);
        let tw = s.len() as f64 * 8.0;
        draw_text_scaled(
            &mut img,
            &s,
            (left - 8.0 - tw).max(0.0) as u32,
            (sy(t) - 4.0) as u32,
            BLACK,
            1,
        );
    }
    line(&mut img, (left, top), (left, top + ph), BLACK, false);
    line(
        &mut img,
        (left, top + ph),
        (left + pw, top + ph),
        BLACK,
        false,
    );

    // Labels and title.
    let xl = &chart.x_label;
    draw_text_scaled(
        &mut img,
        xl,
        (left + pw / 2.0 - xl.len() as f64 * 8.0) as u32,
        (top + ph + 28.0) as u32,
        BLACK,
        2,
    );
    draw_text_scaled(&mut img, &chart.y_label, 8, (top - 22.0) as u32, BLACK, 1);
    let max_title = ((w as f64 - 16.0) / 8.0) as usize;
    let title: String = chart.title.chars().take(max_title).collect();
    draw_text_scaled(&mut img, &title, 8, 8, BLACK, 1);

    // Series.
    for s in &chart.series {
        if s.reference {
            if let Some(&(_, y)) = s.points.first() {
                if y.is_finite() {
                    line(&mut img, (left, sy(y)), (left + pw, sy(y)), s.color, true);
                }
            }
            continue;
        }
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| (sx(x), sy(y)))
            .collect();
        for pair in pts.windows(2) {
            line(&mut img, pair[0], pair[1], s.color, false);
        }
        for p in &pts {
            marker(&mut img, *p, s.color);
        }
    }

    // Legend: in the inner corner that covers the fewest data points.
    let rows = chart.series.len() as f64;
    let longest = chart
        .series
        .iter()
        .map(|s| s.label.chars().count())
        .max()
        .unwrap_or(0) as f64;
    let (lw, lh) = (longest * 8.0 + 48.0, rows * 16.0 + 8.0);
    let mut samples: Vec<(f64, f64)> = Vec::new();
    for s in &chart.series {
        let pts: Vec<(f64, f64)> = if s.reference {
            s.points
                .first()
                .map(|&(_, y)| (0..=20).map(|i| (xmax * i as f64 / 20.0, y)).collect())
                .unwrap_or_default()
        } else {
            s.points.clone()
        };
        for w in pts.windows(2) {
            for i in 0..=10 {
                let t = i as f64 / 10.0;
                samples.push((
                    sx(w[0].0 + t * (w[1].0 - w[0].0)),
                    sy(w[0].1 + t * (w[1].1 - w[0].1)),
                ));
            }
        }
        samples.extend(pts.iter().map(|&(x, y)| (sx(x), sy(y))));
    }
    let corners = [
        (left + pw - lw - 8.0, top + 8.0),
        (left + pw - lw - 8.0, top + ph - lh - 8.0),
        (left + 8.0, top + ph - lh - 8.0),
        (left + 8.0, top + 8.0),
    ];
    let covered = |&(x, y): &(f64, f64)| {
        samples
            .iter()
            .filter(|p| p.0 >= x && p.0 <= x + lw && p.1 >= y && p.1 <= y + lh)
            .count()
    };
    let (lx, ly) = corners
        .iter()
        .copied()
        .min_by_key(|c| covered(c))
        .unwrap_or(corners[0]);
    for y in ly as u32..(ly + lh) as u32 {
        for x in lx as u32..(lx + lw) as u32 {
            img.put_pixel(x, y, Rgb([255, 255, 255]));
        }
    }
    for (k, s) in chart.series.iter().enumerate() {
        let y = ly + 8.0 + k as f64 * 16.0;
        line(
            &mut img,
            (lx + 6.0, y + 4.0),
            (lx + 30.0, y + 4.0),
            s.color,
            s.reference,
        );
        if !s.reference {
            marker(&mut img, (lx + 18.0, y + 4.0), s.color);
        }
        draw_text_scaled(&mut img, &s.label, (lx + 38.0) as u32, y as u32, BLACK, 1);
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            ticks(0.0, 500.0, 5).0,
            vec![0.0, 100.0, 200.0, 300.0, 400.0, 500.0]
        );
        let t = ticks(17.3, 24.9, 6).0;
        assert_eq!(t, vec![18.0, 20.0, 22.0, 24.0]);
        assert_eq!(ticks(0.04, 0.16, 6).0.len(), 7);
        assert_eq!(fmt_tick(0.04, 0.02), "0.04");
        assert_eq!(fmt_tick(0.125, 0.025), "0.125");
        assert_eq!(fmt_tick(20.0, 2.0), "20");
        assert_eq!(fmt_tick(2.5, 2.5), "2.5");
    }

    #[test]
    fn lines_are_drawn_in_their_colours() {
        let chart = Chart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![
                Series {
                    label: "a".into(),
                    points: vec![(0.0, 10.0), (100.0, 20.0)],
                    color: PALETTE[1],
                    reference: false,
                },
                Series {
                    label: "b".into(),
                    points: vec![(0.0, 15.0)],
                    color: PALETTE[3],
                    reference: true,
                },
            ],
            width: 400,
            height: 300,
        };
        let img = render(&chart);
        let count = |c: Rgb<u8>| img.pixels().filter(|p| **p == c).count();
        assert!(count(PALETTE[1]) > 200);
        assert!(count(PALETTE[3]) > 100);
    }
}
