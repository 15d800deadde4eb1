//! 3×3 convolutions of stride 1 and padding 1 by Winograd's minimal filtering F(2×2, 3×3)
//! (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016).
//!
//! Each 4×4 input tile `d` and each 3×3 kernel `g` are transformed (`V = Bᵀ d B`,
//! `U = G g Gᵀ`) so that a 2×2 block of the output, `Y = Aᵀ (U ⊙ V) A`, costs 16
//! multiplications instead of 36. Summed over the input channels, the element-wise
//! products become 16 matrix products `M[ξ] = U[ξ] V[ξ]` (`[C_out, C_in] · [C_in, tiles]`),
//! one per position ξ of the 4×4 transformed tile: 2.25× fewer multiply-adds than the
//! direct product, which is most of a UNet's work. The transforms' entries are 0, ±1 and
//! ±½, so the result differs from the direct sum only by rounding.

use rayon::prelude::*;

use super::conv::{matmul, Nchw, Scratch};

/// Transformed positions of a tile.
const XI: usize = 16;

/// The smallest image (height × width) worth the transforms: below it, the direct product
/// is as fast and the kernel transform is not repaid.
pub(crate) const MIN_PLANE: usize = 32 * 32;

/// `U` `[C_out][ξ][C_in]`: `G g Gᵀ` for each kernel `g` = `weight[co][ci]` (3×3, row-major).
fn transform_kernels(weight: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let mut u = vec![0f32; c_out * XI * c_in];
    u.par_chunks_mut(XI * c_in)
        .enumerate()
        .for_each(|(co, u_co)| {
            for ci in 0..c_in {
                let g = &weight[(co * c_in + ci) * 9..(co * c_in + ci + 1) * 9];
                // G g: rows g₀, (g₀+g₁+g₂)/2, (g₀−g₁+g₂)/2, g₂ of the kernel's rows
                let mut gg = [[0f32; 3]; 4];
                for j in 0..3 {
                    let (a, b, c) = (g[j], g[3 + j], g[6 + j]);
                    gg[0][j] = a;
                    gg[1][j] = 0.5 * (a + b + c);
                    gg[2][j] = 0.5 * (a - b + c);
                    gg[3][j] = c;
                }
                // (G g) Gᵀ: the same on the columns
                for (i, row) in gg.iter().enumerate() {
                    let [a, b, c] = *row;
                    let out = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                    for (j, v) in out.into_iter().enumerate() {
                        u_co[(i * 4 + j) * c_in + ci] = v;
                    }
                }
            }
        });
    u
}

/// `Bᵀ d B` in place for a 4×4 tile `d` (row-major).
fn transform_tile(d: &mut [f32; 16]) {
    for j in 0..4 {
        let (a, b, c, e) = (d[j], d[4 + j], d[8 + j], d[12 + j]);
        d[j] = a - c;
        d[4 + j] = b + c;
        d[8 + j] = c - b;
        d[12 + j] = b - e;
    }
    for i in 0..4 {
        let r = &mut d[i * 4..i * 4 + 4];
        let (a, b, c, e) = (r[0], r[1], r[2], r[3]);
        r[0] = a - c;
        r[1] = b + c;
        r[2] = c - b;
        r[3] = b - e;
    }
}

/// `Aᵀ m A`: the 2×2 output block of a transformed 4×4 tile `m`.
fn output_block(m: &[f32; 16]) -> [[f32; 2]; 2] {
    let mut t = [[0f32; 4]; 2];
    for j in 0..4 {
        let (a, b, c, e) = (m[j], m[4 + j], m[8 + j], m[12 + j]);
        t[0][j] = a + b + c;
        t[1][j] = b - c - e;
    }
    t.map(|[a, b, c, e]| [a + b + c, b - c - e])
}

/// `W'[ci][co] = flip(W[co][ci])` (both kernel axes reversed) for `W` `[C_out, C_in, 3, 3]`:
/// the kernel whose convolution is the adjoint of `W`'s.
pub(crate) fn flip_transposed(weight: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let mut f = vec![0f32; weight.len()];
    f.par_chunks_mut(c_out * 9)
        .enumerate()
        .for_each(|(ci, f_ci)| {
            for co in 0..c_out {
                let g = &weight[(co * c_in + ci) * 9..(co * c_in + ci + 1) * 9];
                for (k, slot) in f_ci[co * 9..(co + 1) * 9].iter_mut().enumerate() {
                    *slot = g[8 - k];
                }
            }
        });
    f
}

/// Whether [`forward`] computes this convolution.
pub(crate) fn applies(k: usize, stride: usize, padding: usize, s: Nchw) -> bool {
    k == 3 && stride == 1 && padding == 1 && s.h * s.w >= MIN_PLANE
}

/// The convolution (3×3, stride 1, padding 1) of `x` `[B, C_in, H, W]` with `weight`
/// `[C_out, C_in, 3, 3]`, plus `bias`: `[B, C_out, H, W]`. Bands of tile rows bound the
/// transformed tiles to [`BAND_BYTES`].
pub(crate) fn forward(
    x: &[f32],
    s: Nchw,
    weight: &[f32],
    c_out: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let (c_in, h, w) = (s.c, s.h, s.w);
    assert_eq!(x.len(), s.b * c_in * h * w);
    assert_eq!(weight.len(), c_out * c_in * 9);
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let band_rows = (BAND_BYTES / (XI * tw * (c_in + c_out) * 4).max(1)).clamp(1, th);
    let u = transform_kernels(weight, c_out, c_in);
    let mut out = vec![0f32; s.b * c_out * h * w];
    let mut scratch = Scratch::take(XI * band_rows * tw * (c_in + c_out));
    for bi in 0..s.b {
        let xb = &x[bi * c_in * h * w..(bi + 1) * c_in * h * w];
        let ob = &mut out[bi * c_out * h * w..(bi + 1) * c_out * h * w];
        for ty0 in (0..th).step_by(band_rows) {
            let band = Band {
                rows: (ty0, (ty0 + band_rows).min(th)),
                tw,
                h,
                w,
            };
            let n = band.tiles();
            let (v, m) = scratch.0[..XI * n * (c_in + c_out)].split_at_mut(XI * n * c_in);
            band.transform_input(xb, v);
            // M[ξ] = U[ξ] V[ξ]: [C_out][ξ][tiles]
            for xi in 0..XI {
                matmul(
                    (c_out, n, c_in),
                    &mut m[xi * n..],
                    XI * n,
                    false,
                    &u[xi * c_in..],
                    (XI * c_in, 1),
                    &v[xi * n..],
                    (XI * n, 1),
                );
            }
            band.write_output(m, bias, ob);
        }
    }
    out
}

/// Upper bound of the transformed tiles (input and product) of one band of tile rows (tiny
/// in the unit tests, so that they cover several bands and a short last one).
const BAND_BYTES: usize = if cfg!(test) { 1 << 12 } else { 64 << 20 };

/// Tile rows `[rows.0, rows.1)` of an `h × w` image with `tw` tiles per row.
struct Band {
    rows: (usize, usize),
    tw: usize,
    h: usize,
    w: usize,
}

impl Band {
    fn tiles(&self) -> usize {
        (self.rows.1 - self.rows.0) * self.tw
    }

    /// `V` `[C_in][ξ][tiles]`: `Bᵀ d B` of every 4×4 input tile `d` of the band (zeros
    /// outside the image) of `xb` `[C_in, H, W]`.
    fn transform_input(&self, xb: &[f32], v: &mut [f32]) {
        let (h, w, n) = (self.h, self.w, self.tiles());
        v.par_chunks_mut(XI * n).enumerate().for_each(|(ci, v_ci)| {
            let plane = &xb[ci * h * w..(ci + 1) * h * w];
            for (t, (ty, tx)) in self.positions().enumerate() {
                let mut d = [0f32; 16];
                for r in 0..4 {
                    let Some(iy) = (2 * ty + r).checked_sub(1).filter(|&y| y < h) else {
                        continue;
                    };
                    for c in 0..4 {
                        if let Some(ix) = (2 * tx + c).checked_sub(1).filter(|&x| x < w) {
                            d[r * 4 + c] = plane[iy * w + ix];
                        }
                    }
                }
                transform_tile(&mut d);
                for (xi, val) in d.into_iter().enumerate() {
                    v_ci[xi * n + t] = val;
                }
            }
        });
    }

    /// The band's output rows of `ob` `[C_out, H, W]`: `Aᵀ m A` of every tile of `m`
    /// `[C_out][ξ][tiles]`, plus the bias.
    fn write_output(&self, m: &[f32], bias: Option<&[f32]>, ob: &mut [f32]) {
        let (h, w, n) = (self.h, self.w, self.tiles());
        ob.par_chunks_mut(h * w).enumerate().for_each(|(co, y)| {
            let m_co = &m[co * XI * n..(co + 1) * XI * n];
            let b = bias.map_or(0.0, |b| b[co]);
            for (t, (ty, tx)) in self.positions().enumerate() {
                let mut mt = [0f32; 16];
                for (xi, slot) in mt.iter_mut().enumerate() {
                    *slot = m_co[xi * n + t];
                }
                for (r, row) in output_block(&mt).iter().enumerate() {
                    let oy = 2 * ty + r;
                    if oy >= h {
                        break;
                    }
                    for (c, val) in row.iter().enumerate() {
                        let ox = 2 * tx + c;
                        if ox < w {
                            y[oy * w + ox] = b + val;
                        }
                    }
                }
            }
        });
    }

    /// `(tile row, tile column)` of the band's tiles in order.
    fn positions(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (self.rows.0..self.rows.1).flat_map(move |ty| (0..self.tw).map(move |tx| (ty, tx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.731 + seed).sin()).collect()
    }

    /// The definition: `y[b][co][oy][ox] = bias[co] + Σ w[co][ci][i][j] x[b][ci][oy+i−1][ox+j−1]`.
    fn direct(x: &[f32], s: Nchw, w: &[f32], c_out: usize, bias: &[f32]) -> Vec<f64> {
        let mut y = vec![0f64; s.b * c_out * s.h * s.w];
        for b in 0..s.b {
            for co in 0..c_out {
                for oy in 0..s.h {
                    for ox in 0..s.w {
                        let mut acc = bias[co] as f64;
                        for ci in 0..s.c {
                            for i in 0..3 {
                                for j in 0..3 {
                                    let (iy, ix) = (oy + i, ox + j);
                                    if iy < 1 || ix < 1 || iy > s.h || ix > s.w {
                                        continue;
                                    }
                                    let xv = x[((b * s.c + ci) * s.h + iy - 1) * s.w + ix - 1];
                                    acc += w[((co * s.c + ci) * 3 + i) * 3 + j] as f64 * xv as f64;
                                }
                            }
                        }
                        y[((b * c_out + co) * s.h + oy) * s.w + ox] = acc;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn forward_matches_the_definition_on_odd_and_even_sizes() {
        for (b, c_in, c_out, h, w) in [(2, 5, 7, 17, 19), (1, 3, 4, 16, 16), (1, 2, 3, 1, 5)] {
            let s = Nchw { b, c: c_in, h, w };
            let x = values(b * c_in * h * w, 0.3);
            let wt = values(c_out * c_in * 9, 1.7);
            let bias = values(c_out, 2.9);
            let y = forward(&x, s, &wt, c_out, Some(&bias));
            let want = direct(&x, s, &wt, c_out, &bias);
            let err = y
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(err < 2e-5, "{b}×{c_in}→{c_out} at {h}×{w}: {err}");
        }
    }

    #[test]
    fn the_flipped_transposed_kernel_gives_the_adjoint() {
        // ⟨conv(x), g⟩ = ⟨x, conv′(g)⟩
        let (b, c_in, c_out, h, w) = (2, 4, 6, 9, 11);
        let x = values(b * c_in * h * w, 0.1);
        let g = values(b * c_out * h * w, 0.5);
        let wt = values(c_out * c_in * 9, 0.9);
        let y = forward(&x, Nchw { b, c: c_in, h, w }, &wt, c_out, None);
        let flipped = flip_transposed(&wt, c_out, c_in);
        let dx = forward(&g, Nchw { b, c: c_out, h, w }, &flipped, c_in, None);
        let dot = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(p, q)| *p as f64 * *q as f64)
                .sum::<f64>()
        };
        let (lhs, rhs) = (dot(&y, &g), dot(&x, &dx));
        assert!(
            (lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }
}
