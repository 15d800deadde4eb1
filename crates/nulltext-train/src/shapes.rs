//! Procedural captioned shapes: a synthetic text-to-image dataset generated on the fly, and a
//! pixel-statistics classifier that reads a (possibly generated) image back into its caption.
//!
//! Each [`Scene`] is one flat-coloured shape (circle, square, triangle or 5-pointed star) on a
//! flat background of a different named [`Colour`], anti-aliased by 4×4 supersampling. The
//! shape's width is 35–65% of the image side; it is rotated by up to ±15° (circles are not
//! rotated) and placed anywhere it fits wholly inside the image with a 4% margin.
//!
//! Caption grammar: `a <colour> <shape> on a <background> background`, e.g.
//! `a red circle on a blue background`. Every colour name starts with a consonant, so the
//! article is always `a`.
//!
//! Split rule: numbering shapes (circle 0, square 1, triangle 2, star 3) and colours (red 0,
//! green 1, blue 2, yellow 3, white 4, black 5, purple 6), the combination
//! `(shape, colour, background)` is held out when `(shape + colour + background) % 9 == 3`.
//! That holds out 16 of the 168 valid combinations (9.5%), four per shape and two or three per
//! colour on either side, and never two that share a (shape, colour), (shape, background) or
//! (colour, background) pair, so every such pair is still seen in training: the held-out
//! set tests composition, not unseen words. [`sample`] draws uniformly among the combinations
//! of its [`Split`], then size, angle and position; it depends only on the seed, the index and
//! the split, through the module's own SplitMix64 generator.
//!
//! Classifier ([`classify`]): the background is the named colour nearest the per-channel median
//! of the border pixels. Pixels far from that background vote for their nearest named colour,
//! weighted by how close they are to it, so that blurred edges (mixtures of the two colours)
//! barely count; the winner is the shape's colour. A pixel belongs to the shape when it is
//! closer to the shape's measured colour than to the background's; a despeckling pass and the
//! largest 4-connected component then discard isolated noise. Three scale-free features
//! of that mask decide the shape: solidity (area / convex hull) singles out the star, fill
//! (area / minimum-area enclosing rectangle) the triangle among the convex shapes, and
//! roundness (area / π·r_max², r_max the largest distance from the centroid) against fill
//! tells the circle from the square. The classifier is reliable from about 48 px up; below
//! that, blur rounds the star's tips away.

use std::f32::consts::PI;
use std::fmt;

use image::{Rgb, RgbImage};

/// Smallest and largest shape width, as fractions of the image side.
pub const MIN_SIZE: f32 = 0.35;
pub const MAX_SIZE: f32 = 0.65;
/// Largest rotation of squares, triangles and stars, in radians (15°).
pub const MAX_ANGLE: f32 = PI / 12.0;
/// Smallest gap between the shape and the image edge, as a fraction of the image side.
pub const MARGIN: f32 = 0.04;

/// Supersampling factor per axis when rendering.
const SUPERSAMPLE: usize = 4;
/// Inner radius of the star as a fraction of its outer radius.
const STAR_INNER: f32 = 0.45;

/// SplitMix64 (Steele, Lea & Flood, 2014): a tiny generator whose output is fixed by its
/// definition, so a seed names the same dataset whatever version of `rand` is in use.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from the top 24 bits so that every value is exact in `f32`.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u32 << 24) as f32
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.next_f32()
    }

    /// Uniform integer in [0, n), by multiply-shift (bias below n / 2⁶⁴).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Standard normal deviate (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        // 1 - u lies in (0, 1], keeping the logarithm finite.
        let u1 = 1.0 - self.next_f32();
        let u2 = self.next_f32();
        (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
    }
}

/// One SplitMix64 step as a hash: a bijection of u64 that scrambles every bit.
fn mix(x: u64) -> u64 {
    SplitMix64::new(x).next_u64()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
}

impl Shape {
    pub const ALL: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
        }
    }

    /// The outline of a shape of unit width (unrotated), centred on the origin, y pointing down;
    /// `None` for the circle, which is not a polygon.
    fn unit_polygon(self) -> Option<Vec<[f32; 2]>> {
        // Vertex k of a regular n-gon of circumradius r, the first pointing up.
        let vertex = |k: usize, n: usize, r: f32| {
            let a = -PI / 2.0 + 2.0 * PI * k as f32 / n as f32;
            [r * a.cos(), r * a.sin()]
        };
        match self {
            Shape::Circle => None,
            Shape::Square => Some(vec![[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]),
            // An equilateral triangle of unit side has circumradius 1/√3.
            Shape::Triangle => Some((0..3).map(|k| vertex(k, 3, 3f32.sqrt().recip())).collect()),
            // The star's width is the chord between two non-adjacent tips: 2·R·sin 72°.
            Shape::Star => {
                let outer = 0.5 / (0.4 * PI).sin();
                // Tips and inner corners alternate.
                let radii = [outer, outer * STAR_INNER];
                Some((0..10).map(|k| vertex(k, 10, radii[k % 2])).collect())
            }
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The named colours. Their RGB values are at least 135 apart (blue–purple; every other pair
/// is 150 or more), so nearest-colour decisions survive noise, blur and the colour drift of a
/// generative model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    White,
    Black,
    Purple,
}

impl Colour {
    pub const ALL: [Colour; 7] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::White,
        Colour::Black,
        Colour::Purple,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::White => "white",
            Colour::Black => "black",
            Colour::Purple => "purple",
        }
    }

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 30, 30],
            Colour::Green => [30, 170, 50],
            Colour::Blue => [30, 70, 220],
            Colour::Yellow => [240, 210, 30],
            Colour::White => [240, 240, 240],
            Colour::Black => [20, 20, 20],
            Colour::Purple => [160, 40, 200],
        }
    }

    /// Euclidean distance in RGB (0–255 scale).
    pub fn distance(self, rgb: [f32; 3]) -> f32 {
        distance(rgb_f32(self.rgb()), rgb)
    }

    /// The named colour nearest to `rgb` (0–255 scale).
    pub fn nearest(rgb: [f32; 3]) -> Colour {
        Self::ALL
            .into_iter()
            .min_by(|a, b| a.distance(rgb).total_cmp(&b.distance(rgb)))
            .expect("there are colours")
    }
}

impl fmt::Display for Colour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn rgb_f32(rgb: [u8; 3]) -> [f32; 3] {
    rgb.map(f32::from)
}

fn distance(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

/// One image: a shape of one colour on a background of another.
///
/// Geometry is resolution-free: `cx`, `cy` (the shape's centre: the centre of its circumscribed
/// circle) and `size` (the width of the unrotated shape: the circle's diameter, the square's
/// and the triangle's side, the distance between two non-adjacent tips of the star) are
/// fractions of the image side, x to the right and y down. `angle` is in radians, clockwise on
/// screen; unrotated, the triangle and the star point up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scene {
    pub shape: Shape,
    pub colour: Colour,
    pub background: Colour,
    pub cx: f32,
    pub cy: f32,
    pub size: f32,
    pub angle: f32,
}

impl Scene {
    /// The scene in the middle of the picture, 55 % of it wide, upright: the layout of the
    /// bundled examples and of the end-to-end tests' scenes.
    pub fn centred(shape: Shape, colour: Colour, background: Colour) -> Self {
        Self {
            shape,
            colour,
            background,
            cx: 0.5,
            cy: 0.5,
            size: 0.55,
            angle: 0.0,
        }
    }

    /// `a <colour> <shape> on a <background> background`.
    pub fn caption(&self) -> String {
        format!(
            "a {} {} on a {} background",
            self.colour.name(),
            self.shape.name(),
            self.background.name()
        )
    }

    /// The scene as a `size`×`size` image, edges anti-aliased by 4×4 supersampling. Panics
    /// when `size` does not fit in a `u32`.
    pub fn render(&self, size: usize) -> RgbImage {
        let side = u32::try_from(size).expect("image side fits in u32");
        let bg = rgb_f32(self.background.rgb());
        let fg = rgb_f32(self.colour.rgb());
        let mut img = RgbImage::from_pixel(side, side, Rgb(self.background.rgb()));
        let outline = self.outline(size as f32);
        let (xs, ys) = outline.pixel_range(size);
        let step = 1.0 / SUPERSAMPLE as f32;
        for y in ys {
            for x in xs.clone() {
                let mut hits = 0;
                for sy in 0..SUPERSAMPLE {
                    for sx in 0..SUPERSAMPLE {
                        let px = x as f32 + (sx as f32 + 0.5) * step;
                        let py = y as f32 + (sy as f32 + 0.5) * step;
                        hits += usize::from(outline.contains(px, py));
                    }
                }
                if hits > 0 {
                    let a = hits as f32 / (SUPERSAMPLE * SUPERSAMPLE) as f32;
                    let blend = |c: usize| (bg[c] + a * (fg[c] - bg[c])).round() as u8;
                    img.put_pixel(x as u32, y as u32, Rgb([blend(0), blend(1), blend(2)]));
                }
            }
        }
        img
    }

    /// Row-major `size`×`size` mask of the pixels whose centre lies inside the shape.
    pub fn mask(&self, size: usize) -> Vec<bool> {
        let outline = self.outline(size as f32);
        pixel_centres(size)
            .map(|(x, y)| outline.contains(x, y))
            .collect()
    }

    /// Row-major `cells`×`cells` fractions of each block of the `size`×`size` [`Self::mask`]
    /// that lies inside the shape (e.g. per latent cell: `coverage(64, 8)`). `cells` must
    /// divide `size`.
    pub fn coverage(&self, size: usize, cells: usize) -> Vec<f32> {
        let mask = self.mask(size);
        let block = size / cells;
        let mut out = vec![0f32; cells * cells];
        for (i, inside) in mask.iter().enumerate() {
            if *inside {
                out[(i / size / block) * cells + (i % size) / block] += 1.0;
            }
        }
        let area = (block * block) as f32;
        out.iter_mut().for_each(|c| *c /= area);
        out
    }

    /// Row-major `size`×`size` mask of the pixels whose centre lies more than `margin` pixels
    /// outside the shape: the background away from the anti-aliased (or, in a generated image,
    /// blurred) edge.
    pub fn background_mask(&self, size: usize, margin: f32) -> Vec<bool> {
        let outline = self.outline(size as f32);
        pixel_centres(size)
            .map(|(x, y)| !outline.contains(x, y) && outline.distance_outside(x, y) > margin)
            .collect()
    }

    /// The region an edit of the shape may change, as a picture: white within `margin`
    /// pixels of the shape (the complement of [`Self::background_mask`]), black elsewhere.
    pub fn region_image(&self, size: usize, margin: f32) -> RgbImage {
        let background = self.background_mask(size, margin);
        RgbImage::from_fn(size as u32, size as u32, |x, y| {
            let v = if background[y as usize * size + x as usize] {
                0
            } else {
                255
            };
            Rgb([v, v, v])
        })
    }

    /// The shape in pixel coordinates of a `side`-pixel image.
    fn outline(&self, side: f32) -> Outline {
        let (cx, cy, scale) = (self.cx * side, self.cy * side, self.size * side);
        match self.shape.unit_polygon() {
            None => Outline::Disc {
                cx,
                cy,
                r: 0.5 * scale,
            },
            Some(vertices) => Outline::Polygon(
                rotate(&vertices, self.angle)
                    .into_iter()
                    .map(|[x, y]| [cx + scale * x, cy + scale * y])
                    .collect(),
            ),
        }
    }
}

fn rotate(vertices: &[[f32; 2]], angle: f32) -> Vec<[f32; 2]> {
    let (s, c) = angle.sin_cos();
    vertices
        .iter()
        .map(|&[x, y]| [c * x - s * y, s * x + c * y])
        .collect()
}

/// `[x_min, y_min, x_max, y_max]` of a set of points.
fn bounds(points: &[[f32; 2]]) -> [f32; 4] {
    points.iter().fold(
        [
            f32::INFINITY,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
        ],
        |[x0, y0, x1, y1], &[x, y]| [x0.min(x), y0.min(y), x1.max(x), y1.max(y)],
    )
}

fn pixel_centres(size: usize) -> impl Iterator<Item = (f32, f32)> {
    (0..size).flat_map(move |y| (0..size).map(move |x| (x as f32 + 0.5, y as f32 + 0.5)))
}

enum Outline {
    Disc { cx: f32, cy: f32, r: f32 },
    Polygon(Vec<[f32; 2]>),
}

impl Outline {
    fn contains(&self, x: f32, y: f32) -> bool {
        match self {
            Outline::Disc { cx, cy, r } => (x - cx).powi(2) + (y - cy).powi(2) <= r * r,
            // Even-odd ray crossing, exact for the simple polygons used here.
            Outline::Polygon(v) => {
                let mut inside = false;
                let mut j = v.len() - 1;
                for (i, &[xi, yi]) in v.iter().enumerate() {
                    let [xj, yj] = v[j];
                    if (yi > y) != (yj > y) && x < xi + (y - yi) * (xj - xi) / (yj - yi) {
                        inside = !inside;
                    }
                    j = i;
                }
                inside
            }
        }
    }

    /// Distance from a point outside the shape to its boundary.
    fn distance_outside(&self, x: f32, y: f32) -> f32 {
        match self {
            Outline::Disc { cx, cy, r } => ((x - cx).hypot(y - cy) - r).max(0.0),
            Outline::Polygon(v) => (0..v.len())
                .map(|i| segment_distance([x, y], v[i], v[(i + 1) % v.len()]))
                .fold(f32::INFINITY, f32::min),
        }
    }

    /// The pixel columns and rows the shape can touch, clamped to the image.
    fn pixel_range(&self, size: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let [x0, y0, x1, y1] = match self {
            Outline::Disc { cx, cy, r } => [cx - r, cy - r, cx + r, cy + r],
            Outline::Polygon(v) => bounds(v),
        };
        let clamp = |v: f32| (v.max(0.0) as usize).min(size);
        (
            clamp(x0.floor())..clamp(x1.ceil() + 1.0),
            clamp(y0.floor())..clamp(y1.ceil() + 1.0),
        )
    }
}

fn segment_distance(p: [f32; 2], a: [f32; 2], b: [f32; 2]) -> f32 {
    let (dx, dy) = (b[0] - a[0], b[1] - a[1]);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 {
        (((p[0] - a[0]) * dx + (p[1] - a[1]) * dy) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    (p[0] - a[0] - t * dx).hypot(p[1] - a[1] - t * dy)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    HeldOut,
}

/// Whether a combination belongs to the held-out split (see the module documentation).
pub fn is_held_out(shape: Shape, colour: Colour, background: Colour) -> bool {
    (shape as usize + colour as usize + background as usize) % 9 == 3
}

/// All valid combinations (shape colour differs from background) of one split, in a fixed order.
fn combos(split: Split) -> Vec<(Shape, Colour, Colour)> {
    let held_out = split == Split::HeldOut;
    Shape::ALL
        .into_iter()
        .flat_map(|s| Colour::ALL.into_iter().map(move |c| (s, c)))
        .flat_map(|(s, c)| Colour::ALL.into_iter().map(move |b| (s, c, b)))
        .filter(|&(s, c, b)| c != b && is_held_out(s, c, b) == held_out)
        .collect()
}

/// The 16 held-out (shape, colour, background) combinations.
pub fn held_out_combos() -> Vec<(Shape, Colour, Colour)> {
    combos(Split::HeldOut)
}

/// The `index`-th scene of `split` for `seed`: a pure function of its arguments.
pub fn sample(seed: u64, index: u64, split: Split) -> Scene {
    let stream = match split {
        Split::Train => 0x7472_6169_6E00_0000,
        Split::HeldOut => 0x6865_6C64_6F75_7400,
    };
    // `mix` is a bijection, so distinct indices of one seed and split get distinct streams.
    let mut rng = SplitMix64::new(mix(mix(seed ^ stream) ^ index));
    let combos = combos(split);
    let (shape, colour, background) = combos[rng.below(combos.len() as u64) as usize];
    let size = rng.range(MIN_SIZE, MAX_SIZE);
    let angle = match shape {
        Shape::Circle => 0.0,
        _ => rng.range(-MAX_ANGLE, MAX_ANGLE),
    };
    // Extent of the rotated shape around its centre, so that it fits with the margin.
    let [x0, y0, x1, y1] = match shape.unit_polygon() {
        None => [-0.5, -0.5, 0.5, 0.5],
        Some(v) => bounds(&rotate(&v, angle)),
    }
    .map(|e| e * size);
    let cx = rng.range(MARGIN - x0, 1.0 - MARGIN - x1);
    let cy = rng.range(MARGIN - y0, 1.0 - MARGIN - y1);
    Scene {
        shape,
        colour,
        background,
        cx,
        cy,
        size,
        angle,
    }
}

/// `n` consecutive scenes of `split` from index `start`, rendered at `size`×`size`: the images
/// as one row-major `[n, 3, size, size]` buffer of f32 in [-1, 1] (channels R, G, B), and
/// their captions.
pub fn batch(
    seed: u64,
    start: u64,
    n: usize,
    size: usize,
    split: Split,
) -> (Vec<f32>, Vec<String>) {
    let mut pixels = Vec::with_capacity(n * 3 * size * size);
    let mut captions = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let scene = sample(seed, start + i, split);
        let img = scene.render(size);
        for c in 0..3 {
            pixels.extend(img.pixels().map(|p| f32::from(p[c]) / 127.5 - 1.0));
        }
        captions.push(scene.caption());
    }
    (pixels, captions)
}

/// What [`classify`] read from an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Classified {
    pub background: Colour,
    pub colour: Colour,
    pub shape: Shape,
    /// Shape area over its minimum-area enclosing rectangle (any rotation): square ≈ 1,
    /// circle ≈ π/4, triangle ≈ 0.5, star ≈ 0.38.
    pub fill: f32,
    /// Shape area over its convex hull: ≈ 1 for the convex shapes, ≈ 0.56 for the star.
    pub solidity: f32,
    /// Shape area over π·r_max², r_max its largest distance from the centroid: circle ≈ 1,
    /// square ≈ 2/π, triangle and star ≈ 0.41–0.42.
    pub roundness: f32,
    /// Fraction of the image's pixels that belong to the shape.
    pub foreground_fraction: f32,
}

/// Pixels farther than this from the background colour (0–255 RGB distance) vote for the
/// shape's colour; about half the closest pair of named colours.
const VOTE_DISTANCE: f32 = 60.0;
/// A vote's weight falls linearly from 1 for a pixel on its named colour to 0 at this distance,
/// so that mixtures at blurred edges, which lie between colours, carry little weight.
const VOTE_FALLOFF: f32 = 100.0;
/// Below this fraction of the image, there is no clear shape.
const MIN_FOREGROUND: f32 = 0.03;

/// Shape decision thresholds, each placed between the ranges its two sides take on scenes
/// rendered at 48 px and up, clean, noisy (σ = 12/255), 3×3 box-blurred and both. Below a
/// solidity of 0.82 the shape is a star (stars measure 0.56–0.78, convex shapes 0.86–1).
const STAR_SOLIDITY: f32 = 0.82;
/// A convex shape filling less than this of its enclosing rectangle is a triangle (triangles
/// 0.50–0.62, circles and squares 0.75–1).
const TRIANGLE_FILL: f32 = 0.68;
/// A circle's roundness exceeds its fill (by 0.05–0.2), a square's falls well short of it (by
/// 0.18–0.36).
const CIRCLE_ROUNDNESS_MINUS_FILL: f32 = -0.07;

/// Reads background colour, shape colour and shape type from an image of one shape on a flat
/// background; `None` when under 3% of the pixels form a shape. Tolerates mild blur, noise
/// and colour drift (see the module documentation for the method).
pub fn classify(img: &RgbImage) -> Option<Classified> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w < 3 || h < 3 {
        return None;
    }
    let px: Vec<[f32; 3]> = img.pixels().map(|p| rgb_f32(p.0)).collect();

    // The shape never reaches the border, so the border's median is the background even where
    // a few pixels are noisy.
    let ring = (w.min(h) / 64).max(1);
    let border: Vec<[f32; 3]> = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .filter(|&(x, y)| x < ring || y < ring || x >= w - ring || y >= h - ring)
        .map(|(x, y)| px[y * w + x])
        .collect();
    let bg_rgb: [f32; 3] = std::array::from_fn(|c| {
        let mut v: Vec<f32> = border.iter().map(|p| p[c]).collect();
        v.sort_by(f32::total_cmp);
        v[v.len() / 2]
    });
    let background = Colour::nearest(bg_rgb);

    let mut votes = [0f32; 7];
    let mut sums = [[0f32; 4]; 7]; // weighted R, G, B and weight, per colour
    for p in px.iter().filter(|p| distance(**p, bg_rgb) > VOTE_DISTANCE) {
        let c = Colour::nearest(*p);
        let weight = (1.0 - c.distance(*p) / VOTE_FALLOFF).max(0.0);
        if c != background && weight > 0.0 {
            votes[c as usize] += weight;
            for k in 0..3 {
                sums[c as usize][k] += weight * p[k];
            }
            sums[c as usize][3] += weight;
        }
    }
    let colour = Colour::ALL
        .into_iter()
        .filter(|c| votes[*c as usize] > 0.0)
        .max_by(|a, b| votes[*a as usize].total_cmp(&votes[*b as usize]))?;
    let s = sums[colour as usize];
    let fg_rgb = [s[0] / s[3], s[1] / s[3], s[2] / s[3]];

    let raw: Vec<bool> = px
        .iter()
        .map(|p| distance(*p, fg_rgb) < distance(*p, bg_rgb))
        .collect();
    let mask = largest_component(&despeckle(&raw, w, h), w, h);
    let area = mask.iter().filter(|&&m| m).count();
    let foreground_fraction = area as f32 / (w * h) as f32;
    if foreground_fraction < MIN_FOREGROUND {
        return None;
    }

    let [solidity, fill, roundness] = shape_features(&mask, w, area);
    let shape = if solidity < STAR_SOLIDITY {
        Shape::Star
    } else if fill < TRIANGLE_FILL {
        Shape::Triangle
    } else if roundness - fill > CIRCLE_ROUNDNESS_MINUS_FILL {
        Shape::Circle
    } else {
        Shape::Square
    };
    Some(Classified {
        background,
        colour,
        shape,
        fill,
        solidity,
        roundness,
        foreground_fraction,
    })
}

/// Removes speckle: a shape pixel with fewer than two shape neighbours (of eight) is dropped
/// and a background pixel with seven or more is filled. A plain majority filter would do the
/// same but also round off the star's tips, which are only a few pixels wide in small images.
fn despeckle(mask: &[bool], w: usize, h: usize) -> Vec<bool> {
    let mut out = vec![false; w * h];
    for y in 0..h {
        for x in 0..w {
            let mut n = 0;
            for yy in y.saturating_sub(1)..(y + 2).min(h) {
                for xx in x.saturating_sub(1)..(x + 2).min(w) {
                    n += usize::from(mask[yy * w + xx]);
                }
            }
            let i = y * w + x;
            // `n` counts the pixel itself.
            out[i] = if mask[i] { n > 2 } else { n >= 7 };
        }
    }
    out
}

/// The largest 4-connected component of a mask.
fn largest_component(mask: &[bool], w: usize, h: usize) -> Vec<bool> {
    let mut label = vec![0u32; w * h];
    let mut best = (0, 0); // (label, size)
    let mut next = 0;
    let mut stack = Vec::new();
    for start in 0..w * h {
        if !mask[start] || label[start] != 0 {
            continue;
        }
        next += 1;
        label[start] = next;
        stack.push(start);
        let mut count = 0;
        while let Some(i) = stack.pop() {
            count += 1;
            let (x, y) = (i % w, i / w);
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < w).then(|| i + 1),
                (y > 0).then(|| i - w),
                (y + 1 < h).then(|| i + w),
            ];
            for j in neighbours.into_iter().flatten() {
                if mask[j] && label[j] == 0 {
                    label[j] = next;
                    stack.push(j);
                }
            }
        }
        if count > best.1 {
            best = (next, count);
        }
    }
    label.iter().map(|&l| l != 0 && l == best.0).collect()
}

/// (solidity, fill, roundness) of a non-empty mask of `area` pixels.
///
/// Pixel centres sample the shape, so the shape is estimated as the convex hull of the centres
/// dilated by half a pixel; measuring either the centres' or the pixel squares' hull instead
/// would bias the features by the perimeter, which matters for small images.
fn shape_features(mask: &[bool], w: usize, area: usize) -> [f32; 3] {
    use std::f64::consts::PI;
    let area_f = area as f64;
    let (mut sx, mut sy) = (0f64, 0f64);
    // The hull only needs each row's outermost pixels.
    let mut extremes: Vec<[i64; 2]> = Vec::new();
    for (y, row) in mask.chunks_exact(w).enumerate() {
        let (Some(left), Some(right)) = (row.iter().position(|&m| m), row.iter().rposition(|&m| m))
        else {
            continue;
        };
        for (x, _) in row.iter().enumerate().filter(|(_, &m)| m) {
            sx += x as f64;
            sy += y as f64;
        }
        extremes.extend([[left as i64, y as i64], [right as i64, y as i64]]);
    }
    let (cx, cy) = (sx / area_f, sy / area_f);
    let r_max = mask
        .iter()
        .enumerate()
        .filter(|(_, &m)| m)
        .map(|(i, _)| ((i % w) as f64 - cx).hypot((i / w) as f64 - cy))
        .fold(0.0, f64::max)
        // Pixel centres stop half a pixel short of the shape's edge.
        + 0.5;

    let hull = convex_hull(extremes);
    // Steiner's formula: dilating a convex set by r adds perimeter·r + π·r².
    let hull_area = polygon_area(&hull) + 0.5 * polygon_perimeter(&hull) + 0.25 * PI;
    // Dilation by r widens every enclosing rectangle by 2r in both directions.
    let rect_area = min_rect_area(&hull, 0.5);
    [
        (area_f / hull_area) as f32,
        (area_f / rect_area) as f32,
        (area_f / (PI * r_max * r_max)) as f32,
    ]
}

/// Counter-clockwise convex hull (Andrew's monotone chain) of integer points.
fn convex_hull(mut points: Vec<[i64; 2]>) -> Vec<[i64; 2]> {
    points.sort_unstable();
    points.dedup();
    if points.len() < 3 {
        return points;
    }
    let cross = |o: [i64; 2], a: [i64; 2], b: [i64; 2]| {
        (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
    };
    let chain = |ordered: &mut dyn Iterator<Item = [i64; 2]>| {
        let mut half: Vec<[i64; 2]> = Vec::new();
        for p in ordered {
            while half.len() >= 2 && cross(half[half.len() - 2], half[half.len() - 1], p) <= 0 {
                half.pop();
            }
            half.push(p);
        }
        // The last point starts the other half.
        half.pop();
        half
    };
    let mut hull = chain(&mut points.iter().copied());
    hull.extend(chain(&mut points.iter().rev().copied()));
    hull
}

fn polygon_area(v: &[[i64; 2]]) -> f64 {
    let twice: i64 = (0..v.len())
        .map(|i| {
            let (a, b) = (v[i], v[(i + 1) % v.len()]);
            a[0] * b[1] - a[1] * b[0]
        })
        .sum();
    twice.abs() as f64 / 2.0
}

fn polygon_perimeter(v: &[[i64; 2]]) -> f64 {
    (0..v.len())
        .map(|i| {
            let (a, b) = (v[i], v[(i + 1) % v.len()]);
            ((b[0] - a[0]) as f64).hypot((b[1] - a[1]) as f64)
        })
        .sum()
}

/// Area of the smallest rectangle enclosing a convex polygon dilated by `r`. Such a rectangle
/// has a side along one of the polygon's edges; a polygon without edges is a point, whose
/// dilation fits a 2r square.
fn min_rect_area(hull: &[[i64; 2]], r: f64) -> f64 {
    let best = (0..hull.len())
        .filter_map(|i| {
            let (a, b) = (hull[i], hull[(i + 1) % hull.len()]);
            let (dx, dy) = ((b[0] - a[0]) as f64, (b[1] - a[1]) as f64);
            let len = dx.hypot(dy);
            if len == 0.0 {
                return None;
            }
            let (ux, uy) = (dx / len, dy / len);
            let (mut lo_u, mut hi_u, mut lo_n, mut hi_n) = (0f64, 0f64, 0f64, 0f64);
            for p in hull {
                let (px, py) = ((p[0] - a[0]) as f64, (p[1] - a[1]) as f64);
                let (u, n) = (px * ux + py * uy, py * ux - px * uy);
                (lo_u, hi_u) = (lo_u.min(u), hi_u.max(u));
                (lo_n, hi_n) = (lo_n.min(n), hi_n.max(n));
            }
            Some((hi_u - lo_u + 2.0 * r) * (hi_n - lo_n + 2.0 * r))
        })
        .fold(f64::INFINITY, f64::min);
    if best.is_finite() {
        best
    } else {
        4.0 * r * r
    }
}

/// Mean absolute difference, averaged over R, G and B on the 0–255 scale, between the pixels of
/// `img` under the row-major `mask` and `colour`; `None` when the mask selects no pixel.
/// Panics when the mask's length is not the image's pixel count.
pub fn colour_error(img: &RgbImage, mask: &[bool], colour: Colour) -> Option<f32> {
    assert_eq!(
        mask.len(),
        img.width() as usize * img.height() as usize,
        "mask and image sizes differ"
    );
    let target = rgb_f32(colour.rgb());
    let (sum, count) =
        img.pixels()
            .zip(mask)
            .filter(|(_, &m)| m)
            .fold((0f64, 0usize), |(sum, n), (p, _)| {
                let d: f32 = (0..3).map(|c| (f32::from(p[c]) - target[c]).abs()).sum();
                (sum + f64::from(d) / 3.0, n + 1)
            });
    (count > 0).then(|| (sum / count as f64) as f32)
}

#[cfg(test)]
mod tests {
    use std::f32::consts::FRAC_PI_4;

    use super::*;

    /// Adds N(0, σ²) noise (σ on the 0–255 scale) to every channel.
    fn add_noise(img: &RgbImage, sigma: f32, seed: u64) -> RgbImage {
        let mut rng = SplitMix64::new(seed);
        let mut out = img.clone();
        for p in out.pixels_mut() {
            for c in 0..3 {
                p[c] = (f32::from(p[c]) + sigma * rng.normal())
                    .round()
                    .clamp(0.0, 255.0) as u8;
            }
        }
        out
    }

    /// A per-channel gain of 0.9–1.1 and offset of ±20, as a generative model's colours drift.
    fn drift_colours(img: &RgbImage, seed: u64) -> RgbImage {
        let mut rng = SplitMix64::new(seed);
        let gain: [f32; 3] = std::array::from_fn(|_| rng.range(0.9, 1.1));
        let offset: [f32; 3] = std::array::from_fn(|_| rng.range(-20.0, 20.0));
        let mut out = img.clone();
        for p in out.pixels_mut() {
            for c in 0..3 {
                p[c] = (f32::from(p[c]) * gain[c] + offset[c])
                    .round()
                    .clamp(0.0, 255.0) as u8;
            }
        }
        out
    }

    /// 3×3 box blur with clamped edges.
    fn box_blur(img: &RgbImage) -> RgbImage {
        let (w, h) = (img.width() as i64, img.height() as i64);
        RgbImage::from_fn(img.width(), img.height(), |x, y| {
            let mut sum = [0u32; 3];
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let xx = (i64::from(x) + dx).clamp(0, w - 1) as u32;
                    let yy = (i64::from(y) + dy).clamp(0, h - 1) as u32;
                    let p = img.get_pixel(xx, yy);
                    for c in 0..3 {
                        sum[c] += u32::from(p[c]);
                    }
                }
            }
            Rgb(sum.map(|s| ((s as f32) / 9.0).round() as u8))
        })
    }

    #[test]
    fn sampling_and_rendering_are_deterministic() {
        for split in [Split::Train, Split::HeldOut] {
            for i in 0..50 {
                let a = sample(42, i, split);
                assert_eq!(a, sample(42, i, split));
                assert_eq!(a.render(48), sample(42, i, split).render(48));
            }
        }
        let (a, ca) = batch(3, 10, 4, 32, Split::Train);
        let (b, cb) = batch(3, 10, 4, 32, Split::Train);
        assert_eq!((a, ca), (b, cb));
        // Different seeds and indices give different scenes.
        assert_ne!(sample(1, 0, Split::Train), sample(2, 0, Split::Train));
        assert_ne!(sample(1, 0, Split::Train), sample(1, 1, Split::Train));
        // Pinned values: a change here changes every dataset drawn from a seed.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn scenes_respect_their_documented_ranges() {
        for split in [Split::Train, Split::HeldOut] {
            for i in 0..2000 {
                let s = sample(9, i, split);
                assert_ne!(s.colour, s.background);
                assert!((MIN_SIZE..MAX_SIZE).contains(&s.size), "{s:?}");
                assert!(s.angle.abs() <= MAX_ANGLE);
                // The shape stays inside, clear of the border.
                let mask = s.mask(100);
                for (k, &m) in mask.iter().enumerate() {
                    let (x, y) = (k % 100, k / 100);
                    if m {
                        assert!((3..97).contains(&x) && (3..97).contains(&y), "{s:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn held_out_combinations_never_reach_training() {
        let held = held_out_combos();
        assert_eq!(held.len(), 16);
        let total = Shape::ALL.len() * Colour::ALL.len() * (Colour::ALL.len() - 1);
        assert_eq!(combos(Split::Train).len() + held.len(), total);
        for &(s, c, b) in &held {
            assert_ne!(c, b);
            assert!(is_held_out(s, c, b));
        }
        // Every pair within a held-out triple is still seen in training.
        let train = combos(Split::Train);
        for &(s, c, b) in &held {
            assert!(train.iter().any(|t| t.0 == s && t.1 == c));
            assert!(train.iter().any(|t| t.0 == s && t.2 == b));
            assert!(train.iter().any(|t| t.1 == c && t.2 == b));
        }

        let mut shapes = std::collections::HashSet::new();
        let mut colours = std::collections::HashSet::new();
        let mut backgrounds = std::collections::HashSet::new();
        let mut seen = std::collections::HashSet::new();
        for i in 0..5000 {
            let s = sample(1234, i, Split::Train);
            assert!(!is_held_out(s.shape, s.colour, s.background), "{s:?}");
            shapes.insert(s.shape);
            colours.insert(s.colour);
            backgrounds.insert(s.background);
            seen.insert((s.shape, s.colour, s.background));
        }
        assert_eq!(shapes.len(), 4);
        assert_eq!(colours.len(), 7);
        assert_eq!(backgrounds.len(), 7);
        assert_eq!(
            seen.len(),
            train.len(),
            "5000 draws cover all 152 training combinations"
        );

        let mut seen = std::collections::HashSet::new();
        for i in 0..500 {
            let s = sample(1234, i, Split::HeldOut);
            assert!(is_held_out(s.shape, s.colour, s.background), "{s:?}");
            seen.insert((s.shape, s.colour, s.background));
        }
        assert_eq!(seen.len(), held.len());
    }

    #[test]
    fn named_colours_are_far_apart() {
        for (i, a) in Colour::ALL.into_iter().enumerate() {
            for b in Colour::ALL.into_iter().skip(i + 1) {
                assert!(a.distance(rgb_f32(b.rgb())) > 134.0, "{a} {b}");
            }
            assert_eq!(Colour::nearest(rgb_f32(a.rgb())), a);
        }
    }

    #[test]
    fn captions_follow_the_grammar() {
        let s = Scene {
            shape: Shape::Circle,
            colour: Colour::Red,
            background: Colour::Blue,
            cx: 0.5,
            cy: 0.5,
            size: 0.5,
            angle: 0.0,
        };
        assert_eq!(s.caption(), "a red circle on a blue background");
        let (_, captions) = batch(5, 0, 200, 8, Split::Train);
        for (i, caption) in captions.iter().enumerate() {
            let s = sample(5, i as u64, Split::Train);
            let words: Vec<&str> = caption.split(' ').collect();
            assert_eq!(
                words,
                [
                    "a",
                    s.colour.name(),
                    s.shape.name(),
                    "on",
                    "a",
                    s.background.name(),
                    "background"
                ]
            );
        }
    }

    #[test]
    fn batch_layout_is_chw_in_unit_range() {
        let size = 16;
        let (pixels, captions) = batch(8, 3, 2, size, Split::HeldOut);
        assert_eq!(pixels.len(), 2 * 3 * size * size);
        assert_eq!(captions.len(), 2);
        assert!(pixels.iter().all(|v| (-1.0..=1.0).contains(v)));
        let img = sample(8, 4, Split::HeldOut).render(size);
        let (x, y) = (5, 7);
        for c in 0..3 {
            let v = pixels[((3 + c) * size + y) * size + x];
            let expected = f32::from(img.get_pixel(x as u32, y as u32)[c]) / 127.5 - 1.0;
            assert_eq!(v, expected);
        }
    }

    #[test]
    fn mask_matches_rendered_foreground() {
        for i in 0..200 {
            let s = sample(77, i, Split::Train);
            let size = 64;
            let img = s.render(size);
            let mask = s.mask(size);
            // Each rendered pixel's coverage, read back from its blend of the two colours.
            let (fg, bg) = (rgb_f32(s.colour.rgb()), rgb_f32(s.background.rgb()));
            let span: f32 = (0..3).map(|c| (fg[c] - bg[c]).powi(2)).sum();
            let rendered: f32 = img
                .pixels()
                .map(|p| {
                    (0..3)
                        .map(|c| (f32::from(p[c]) - bg[c]) * (fg[c] - bg[c]))
                        .sum::<f32>()
                        / span
                })
                .sum();
            let masked = mask.iter().filter(|&&m| m).count();
            let diff = (rendered / masked as f32 - 1.0).abs();
            assert!(diff < 0.03, "{s:?}: rendered {rendered}, mask {masked}");
            // Away from the anti-aliased edge the background is untouched.
            assert_eq!(
                colour_error(&img, &s.background_mask(size, 1.0), s.background),
                Some(0.0)
            );
            // Shoelace area of the unit-width shape.
            let full = s.shape.unit_polygon().map_or(FRAC_PI_4, |v| {
                let twice: f32 = (0..v.len())
                    .map(|k| {
                        let (a, b) = (v[k], v[(k + 1) % v.len()]);
                        a[0] * b[1] - a[1] * b[0]
                    })
                    .sum();
                twice.abs() / 2.0
            });
            let expected = full * (s.size * size as f32).powi(2);
            assert!(
                (masked as f32 / expected - 1.0).abs() < 0.08,
                "{s:?}: {masked} vs {expected}"
            );
        }
    }

    #[test]
    fn colour_error_measures_noise() {
        let s = sample(2, 0, Split::Train);
        let img = add_noise(&s.render(64), 12.0, 1);
        let err = colour_error(&img, &s.background_mask(64, 1.0), s.background).unwrap();
        // E|N(0, σ²)| = σ·√(2/π) ≈ 9.6, less where clamping at 0 or 255 cuts the noise.
        assert!((4.0..11.0).contains(&err), "{err}");
        assert_eq!(
            colour_error(&img, &vec![false; 64 * 64], s.background),
            None
        );
    }

    #[test]
    fn classifier_returns_none_without_a_shape() {
        let blank = RgbImage::from_pixel(64, 64, Rgb(Colour::Green.rgb()));
        assert_eq!(classify(&blank), None);
        assert_eq!(classify(&add_noise(&blank, 12.0, 3)), None);
    }

    fn check_classifier(split: Split, size: usize, n: u64) {
        type Degrade = fn(&RgbImage, u64) -> RgbImage;
        let variants: [(&str, Degrade); 5] = [
            ("clean", |img, _| img.clone()),
            ("noisy", |img, seed| add_noise(img, 12.0, seed)),
            ("blurred", |img, _| box_blur(img)),
            ("blurred+noisy", |img, seed| {
                add_noise(&box_blur(img), 12.0, seed)
            }),
            ("drifted+blurred+noisy", |img, seed| {
                add_noise(&box_blur(&drift_colours(img, seed)), 12.0, seed)
            }),
        ];
        let mut failures = Vec::new();
        for i in 0..n {
            let s = sample(2024, i, split);
            let img = s.render(size);
            for (name, degrade) in variants {
                let got = classify(&degrade(&img, i));
                let ok = got.is_some_and(|g| {
                    (g.shape, g.colour, g.background) == (s.shape, s.colour, s.background)
                });
                if !ok {
                    failures.push(format!("{name} {s:?} -> {got:?}"));
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    #[test]
    fn classifier_reads_training_scenes() {
        check_classifier(Split::Train, 64, 500);
    }

    #[test]
    fn classifier_reads_held_out_scenes() {
        check_classifier(Split::HeldOut, 64, 500);
    }

    #[test]
    fn classifier_reads_small_and_large_images() {
        check_classifier(Split::Train, 48, 300);
        check_classifier(Split::Train, 256, 20);
    }
}
