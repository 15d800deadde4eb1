//! Line charts: titled axes (linear or log x), named series of (x, y) points with optional
//! markers, dashed horizontal reference lines and a legend, drawn by plotters as PNG or SVG.
//!
//! ```
//! use nulltext_plot::{Chart, Format, Series};
//! let chart = Chart::new("PSNR against UNet passes", "UNet passes", "PSNR (dB)")
//!     .log_x()
//!     .series(Series::line("null-text", vec![(100.0, 24.0), (600.0, 27.5)]).markers())
//!     .series(Series::reference("VAE round trip", 28.3));
//! let svg = chart.render(Format::Svg).unwrap();
//! assert!(svg.starts_with(b"<svg"));
//! ```

use std::ops::Range;
use std::path::Path;
use std::sync::Once;

use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::text::FAMILY;
use crate::{Error, Result};

/// Series colours in order (Tableau 10's first eight: distinct, and readable in grey).
pub const PALETTE: [[u8; 3]; 8] = [
    [31, 119, 180],  // blue
    [255, 127, 14],  // orange
    [44, 160, 44],   // green
    [214, 39, 40],   // red
    [148, 103, 189], // purple
    [140, 86, 75],   // brown
    [227, 119, 194], // pink
    [127, 127, 127], // grey
];

/// How the x axis maps values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scale {
    #[default]
    Linear,
    /// Logarithmic; points with x ≤ 0 are left out.
    Log,
}

/// What a chart is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Svg,
}

impl Format {
    /// The format a file's extension names (`.png` or `.svg`).
    pub fn from_path(path: &Path) -> Result<Self> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
        {
            Some(e) if e == "png" => Ok(Format::Png),
            Some(e) if e == "svg" => Ok(Format::Svg),
            _ => Err(Error::Format(path.to_path_buf())),
        }
    }
}

/// One named line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// A marker on every point: for a few measured points, not for a curve of thousands.
    pub markers: bool,
    /// A dashed horizontal line across the whole chart at the first point's y (a bound, or
    /// a method that has a single value).
    pub reference: bool,
    /// `None`: the palette's colour for the series' position.
    pub color: Option<[u8; 3]>,
}

impl Series {
    /// A polyline through `points`, in the order given.
    pub fn line(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: label.into(),
            points,
            markers: false,
            reference: false,
            color: None,
        }
    }

    /// A dashed horizontal line at `y`.
    pub fn reference(label: impl Into<String>, y: f64) -> Self {
        Self {
            reference: true,
            ..Self::line(label, vec![(f64::NAN, y)])
        }
    }

    pub fn markers(mut self) -> Self {
        self.markers = true;
        self
    }

    pub fn color(mut self, rgb: [u8; 3]) -> Self {
        self.color = Some(rgb);
        self
    }
}

/// A line chart; build it with [`Chart::new`] and [`Chart::series`], write it with
/// [`Chart::render`].
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_scale: Scale,
    pub series: Vec<Series>,
    /// Pixels (PNG) or SVG units.
    pub width: u32,
    pub height: u32,
}

impl Chart {
    /// An empty 900×560 chart with a linear x axis.
    pub fn new(
        title: impl Into<String>,
        x_label: impl Into<String>,
        y_label: impl Into<String>,
    ) -> Self {
        Self {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            x_scale: Scale::Linear,
            series: Vec::new(),
            width: 900,
            height: 560,
        }
    }

    pub fn log_x(mut self) -> Self {
        self.x_scale = Scale::Log;
        self
    }

    pub fn series(mut self, s: Series) -> Self {
        self.series.push(s);
        self
    }

    pub fn size(mut self, width: u32, height: u32) -> Self {
        (self.width, self.height) = (width, height);
        self
    }

    /// The chart as a PNG or SVG file's bytes.
    pub fn render(&self, format: Format) -> Result<Vec<u8>> {
        match format {
            Format::Png => {
                let img = self.to_image()?;
                let mut out = std::io::Cursor::new(Vec::new());
                img.write_to(&mut out, image::ImageFormat::Png)
                    .map_err(|e| Error::Draw(e.to_string()))?;
                Ok(out.into_inner())
            }
            Format::Svg => {
                let mut svg = String::new();
                self.draw(SVGBackend::with_string(&mut svg, self.size_px()).into_drawing_area())?;
                Ok(svg.into_bytes())
            }
        }
    }

    /// The chart as pixels.
    pub fn to_image(&self) -> Result<image::RgbImage> {
        let (w, h) = self.size_px();
        let mut buf = vec![0u8; w as usize * h as usize * 3];
        self.draw(BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area())?;
        image::RgbImage::from_raw(w, h, buf).ok_or_else(|| Error::Draw("pixel buffer size".into()))
    }

    fn size_px(&self) -> (u32, u32) {
        (self.width.max(320), self.height.max(240))
    }

    /// The drawable points of series `s` (finite, and x > 0 on a log axis).
    fn points<'a>(&self, s: &'a Series) -> impl Iterator<Item = (f64, f64)> + 'a {
        let log = self.x_scale == Scale::Log;
        s.points
            .iter()
            .copied()
            .filter(move |(x, y)| x.is_finite() && y.is_finite() && (!log || *x > 0.0))
    }

    /// The data's x and y ranges, padded; reference lines count for y only.
    fn ranges(&self) -> (Range<f64>, Range<f64>) {
        let lines = self.series.iter().filter(|s| !s.reference);
        let xs: Vec<f64> = lines.flat_map(|s| self.points(s).map(|p| p.0)).collect();
        let ys: Vec<f64> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1).filter(|y| y.is_finite()))
            .collect();
        let span = |v: &[f64]| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if lo.is_finite() {
                (lo, hi)
            } else {
                (0.0, 1.0)
            }
        };
        let (x0, x1) = span(&xs);
        let x = match self.x_scale {
            Scale::Linear => {
                let pad = ((x1 - x0) * 0.02).max(1e-9);
                (x0 - pad)..(x1 + pad)
            }
            Scale::Log => (x0 / 1.6)..(x1.max(x0 * 1.01) * 1.6),
        };
        // a flat series gets a band around its value
        let (y0, y1) = span(&ys);
        let pad = ((y1 - y0) * 0.08)
            .max(y1.abs().max(y0.abs()) * 0.02)
            .max(1e-9);
        (x, (y0 - pad)..(y1 + pad))
    }

    fn color(&self, k: usize) -> RGBColor {
        let [r, g, b] = self.series[k].color.unwrap_or(PALETTE[k % PALETTE.len()]);
        RGBColor(r, g, b)
    }

    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> Result<()> {
        register_font();
        let (x, y) = self.ranges();
        let drawn = root.fill(&WHITE).and_then(|()| {
            let body = root.titled(&self.title, (FAMILY, TITLE_PX))?;
            // The legend stands to the right of the plot, where it hides no data; a chart of
            // one series is named by its title.
            let legend_w = match self.series.len() {
                0 | 1 => 0,
                _ => {
                    let widest = self.series.iter().map(|s| text_width(&s.label, LEGEND_PX));
                    widest.fold(0.0, f32::max).ceil() as u32 + 64
                }
            };
            let (w, _) = body.dim_in_pixel();
            let (plot, legend) = body.split_horizontally(w.saturating_sub(legend_w));
            match self.x_scale {
                Scale::Linear => self.draw_plot(&plot, x.clone(), x, y)?,
                Scale::Log => self.draw_plot(&plot, x.clone().log_scale(), x, y)?,
            }
            if legend_w > 0 {
                self.draw_legend(&legend)?;
            }
            root.present()
        });
        drawn.map_err(|e| Error::Draw(e.to_string()))
    }

    fn draw_plot<DB, X>(
        &self,
        area: &DrawingArea<DB, Shift>,
        x_axis: X,
        x: Range<f64>,
        y: Range<f64>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
    where
        DB: DrawingBackend,
        X: AsRangedCoord<Value = f64>,
        X::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
    {
        let mut chart = ChartBuilder::on(area)
            .margin(16)
            .x_label_area_size(56)
            .y_label_area_size(72)
            .build_cartesian_2d(x_axis, y)?;
        // A log axis labels a few round values per decade; more would run together.
        let x_labels = match self.x_scale {
            Scale::Linear => 10,
            Scale::Log => 4,
        };
        chart
            .configure_mesh()
            .x_labels(x_labels)
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .x_label_formatter(&|v| tick(*v))
            .y_label_formatter(&|v| tick(*v))
            .label_style((FAMILY, LABEL_PX))
            .axis_desc_style((FAMILY, AXIS_PX))
            .bold_line_style(RGBColor(215, 215, 215))
            .light_line_style(RGBColor(240, 240, 240))
            .draw()?;
        for (k, s) in self.series.iter().enumerate() {
            let color = self.color(k);
            let stroke = color.stroke_width(2);
            if s.reference {
                let yv = s.points.first().map_or(f64::NAN, |p| p.1);
                if yv.is_finite() {
                    let ends = [(x.start, yv), (x.end, yv)];
                    chart.draw_series(DashedLineSeries::new(ends, 10, 6, stroke))?;
                }
                continue;
            }
            chart.draw_series(LineSeries::new(self.points(s), stroke))?;
            if s.markers {
                chart.draw_series(self.points(s).map(|p| Circle::new(p, 4, color.filled())))?;
            }
        }
        Ok(())
    }

    /// A key per series: its line (dashed for references, with a marker where the series
    /// has them) and its label.
    fn draw_legend<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        let row = (LEGEND_PX * 1.5) as i32;
        for (k, s) in self.series.iter().enumerate() {
            let (color, y) = (self.color(k), 24 + k as i32 * row);
            let stroke = color.stroke_width(2);
            if s.reference {
                for x0 in [4, 16, 28] {
                    area.draw(&PathElement::new(vec![(x0, y), (x0 + 8, y)], stroke))?;
                }
            } else {
                area.draw(&PathElement::new(vec![(4, y), (36, y)], stroke))?;
            }
            if s.markers && !s.reference {
                area.draw(&Circle::new((20, y), 4, color.filled()))?;
            }
            let style = TextStyle::from((FAMILY, LEGEND_PX).into_font())
                .pos(Pos::new(HPos::Left, VPos::Center));
            area.draw(&Text::new(s.label.clone(), (46, y), style))?;
        }
        Ok(())
    }
}

/// Font sizes: ascent to descent in pixels, as `text` and plotters' ab_glyph backend count
/// them (an SVG's font-size, counted in ems, is 1/1.24 of these).
const TITLE_PX: f64 = 22.0;
const AXIS_PX: f64 = 19.0;
const LABEL_PX: f64 = 17.0;
const LEGEND_PX: f64 = 18.0;

fn text_width(label: &str, px: f64) -> f32 {
    crate::text::width(label, px as f32)
}

/// A tick label without trailing zeros: 50, 2.5, 0.025.
fn tick(v: f64) -> String {
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// Gives plotters the bundled font (it has no fonts of its own without the system's).
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are the ones `text::font` parses, tested there.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, crate::text::FONT_BYTES);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart() -> Chart {
        Chart::new("t", "x", "y")
            .size(400, 300)
            .series(
                Series::line("a", vec![(1.0, 10.0), (100.0, 20.0)])
                    .markers()
                    .color(PALETTE[0]),
            )
            .series(Series::reference("b", 15.0).color(PALETTE[3]))
    }

    #[test]
    fn lines_are_drawn_in_their_colours() {
        for c in [chart(), chart().log_x()] {
            let img = c.to_image().unwrap();
            let count = |[r, g, b]: [u8; 3]| img.pixels().filter(|p| p.0 == [r, g, b]).count();
            assert!(count(PALETTE[0]) > 200, "{}", count(PALETTE[0]));
            assert!(count(PALETTE[3]) > 100, "{}", count(PALETTE[3]));
            // text in the bundled font: dark pixels besides the axes
            assert!(img.pixels().filter(|p| p.0[0] < 80 && p.0[2] < 80).count() > 100);
        }
    }

    #[test]
    fn the_extension_picks_the_format() {
        assert_eq!(Format::from_path(Path::new("f.PNG")).unwrap(), Format::Png);
        assert_eq!(
            Format::from_path(Path::new("a/f.svg")).unwrap(),
            Format::Svg
        );
        assert!(Format::from_path(Path::new("f.pdf")).is_err());
        let svg = String::from_utf8(chart().render(Format::Svg).unwrap()).unwrap();
        assert!(svg.contains("<svg") && svg.contains("\na\n") && svg.contains("sans-serif"));
        let png = chart().render(Format::Png).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }

    #[test]
    fn ticks_have_no_trailing_zeros() {
        assert_eq!(tick(50.0), "50");
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(0.025), "0.025");
        assert_eq!(tick(0.1 + 0.2), "0.3");
        assert_eq!(tick(-0.0000001), "0");
    }

    #[test]
    fn ranges_cover_the_data_and_reference_lines() {
        let (x, y) = chart().ranges();
        assert!(x.start < 1.0 && x.end > 100.0);
        assert!(y.start < 10.0 && y.end > 20.0);
        let (x, _) = chart().log_x().ranges();
        assert!(x.start > 0.0);
        let flat = Chart::new("", "", "").series(Series::line("c", vec![(0.0, 5.0), (1.0, 5.0)]));
        let (_, y) = flat.ranges();
        assert!(y.start < 5.0 && y.end > 5.0);
    }
}
