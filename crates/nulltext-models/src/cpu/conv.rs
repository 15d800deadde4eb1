//! 2-D convolution on the CPU (f32) as one matrix product per tile of output rows.
//!
//! The kernel `[C_out, C_in, k, k]` is used as stored, a `[C_out, C_in·k·k]` matrix; the
//! input patches are gathered straight from the NCHW tensor (rows ordered channel, kernel
//! row, kernel column) in parallel over channels, and the product writes into the output
//! with the bias already in place. The input gradient is the transposed product followed by
//! the scatter-add of the patches (col2im), for any stride, with the same cost as the
//! forward pass. Tiles bound the patch buffer to `TILE_BYTES`.

use gemm::Parallelism;
use rayon::prelude::*;

use super::winograd;

/// Upper bound of the patch buffer of one tile.
const TILE_BYTES: usize = 32 << 20;
/// Upper bound of the patch buffer of a group of small images (tiny in the unit tests, so
/// that they cover groups and a short last group).
const GROUP_BYTES: usize = if cfg!(test) { 1 << 14 } else { TILE_BYTES };

/// The geometry of a convolution (square kernel, symmetric zero padding, no dilation or
/// groups). Its kernel is passed as `[c_out, c_in·k·k]` row-major (the `[c_out, c_in, k, k]`
/// tensor as stored), its bias as `[c_out]`.
#[derive(Debug, Clone, Copy)]
pub struct CpuConv {
    pub c_out: usize,
    pub c_in: usize,
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
}

/// Shape of an NCHW input.
#[derive(Debug, Clone, Copy)]
pub struct Nchw {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

fn parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `dst[m×n] (row stride dst_rs) ← (accumulate ? dst : 0) + lhs·rhs`, with explicit strides
/// `(row, column)` for the operands, on all of rayon's threads.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
) {
    gemm_f32(
        mnk,
        (dst, dst_rs, accumulate),
        (lhs, lhs_strides),
        (rhs, rhs_strides),
        parallelism(),
    )
}

/// [`matmul`] on the calling thread only (for work that is already parallel).
pub(crate) fn matmul_serial(
    mnk: (usize, usize, usize),
    dst: (&mut [f32], usize, bool),
    lhs: (&[f32], (usize, usize)),
    rhs: (&[f32], (usize, usize)),
) {
    gemm_f32(mnk, dst, lhs, rhs, Parallelism::None)
}

fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, accumulate): (&mut [f32], usize, bool),
    (lhs, (lhs_rs, lhs_cs)): (&[f32], (usize, usize)),
    (rhs, (rhs_rs, rhs_cs)): (&[f32], (usize, usize)),
    parallelism: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= (m - 1) * dst_rs + n);
    assert!(k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(k == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the asserts above keep every index gemm touches inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The patch buffer of the calling thread, kept between calls: every element a tile uses
/// is written (patches, zeros for the padding, or the product) before it is read, so it is
/// neither zeroed nor freed — a fresh 32 MiB buffer per call cost page faults and a memset.
pub(super) struct Scratch(pub(super) Vec<f32>);

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Scratch {
    pub(super) fn take(len: usize) -> Self {
        let mut v = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        if v.len() < len {
            v.resize(len, 0.0);
        }
        Scratch(v)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        SCRATCH.with(|s| *s.borrow_mut() = v);
    }
}

impl CpuConv {
    pub fn new((c_out, c_in, k): (usize, usize, usize), stride: usize, padding: usize) -> Self {
        assert!(stride >= 1 && k >= 1);
        Self {
            c_out,
            c_in,
            k,
            stride,
            padding,
        }
    }

    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let o = |n: usize| (n + 2 * self.padding).saturating_sub(self.k) / self.stride + 1;
        (o(h), o(w))
    }

    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.padding == 0
    }

    /// Output rows per tile so that a tile's patches stay within [`TILE_BYTES`].
    fn tile_rows(&self, ow: usize, oh: usize) -> usize {
        let row_bytes = self.c_in * self.k * self.k * ow * 4;
        (TILE_BYTES / row_bytes.max(1)).clamp(1, oh.max(1))
    }

    /// The convolution of `x` (`[B, C_in, H, W]`, contiguous) plus the bias.
    pub fn forward(&self, x: &[f32], s: Nchw, weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        assert_eq!(s.c, self.c_in);
        assert_eq!(weight.len(), self.c_out * self.c_in * self.k * self.k);
        assert!(bias.is_none_or(|b| b.len() == self.c_out));
        assert_eq!(x.len(), s.b * s.c * s.h * s.w);
        if winograd::applies(self.k, self.stride, self.padding, s) {
            return winograd::forward(x, s, weight, self.c_out, bias);
        }
        self.forward_direct(x, s, weight, bias)
    }

    /// [`Self::forward`] as products of the kernel with the input's patches.
    pub(crate) fn forward_direct(
        &self,
        x: &[f32],
        s: Nchw,
        weight: &[f32],
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let (oh, ow) = self.out_hw(s.h, s.w);
        let n = oh * ow;
        let kk = self.c_in * self.k * self.k;
        let mut out = vec![0f32; s.b * self.c_out * n];
        let g = self.group(s, n);
        if g > 1 {
            self.forward_grouped(x, s, weight, bias, g, &mut out);
            return out;
        }
        if let Some(bias) = bias {
            // every output row starts as its bias
            out.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
                row.fill(bias[i % self.c_out]);
            });
        }
        let accumulate = bias.is_some();
        let rows = self.tile_rows(ow, oh);
        let mut scratch = Scratch::take(if self.is_pointwise() {
            0
        } else {
            kk * rows * ow
        });
        let col = &mut scratch.0;
        for bi in 0..s.b {
            let xb = &x[bi * s.c * s.h * s.w..(bi + 1) * s.c * s.h * s.w];
            let ob = &mut out[bi * self.c_out * n..(bi + 1) * self.c_out * n];
            if self.is_pointwise() {
                matmul(
                    (self.c_out, n, kk),
                    ob,
                    n,
                    accumulate,
                    weight,
                    (kk, 1),
                    xb,
                    (n, 1),
                );
                continue;
            }
            for oy0 in (0..oh).step_by(rows) {
                let oy1 = (oy0 + rows).min(oh);
                let tn = (oy1 - oy0) * ow;
                let col = &mut col[..kk * tn];
                self.im2col(xb, s, (oy0, oy1), ow, col);
                matmul(
                    (self.c_out, tn, kk),
                    &mut ob[oy0 * ow..],
                    n,
                    accumulate,
                    weight,
                    (kk, 1),
                    col,
                    (tn, 1),
                );
            }
        }
        out
    }

    /// The gradient of the input `[B, C_in, H, W]` given the gradient `g` of the output.
    pub fn input_grad(&self, g: &[f32], s: Nchw, weight: &[f32]) -> Vec<f32> {
        assert_eq!(s.c, self.c_in);
        assert_eq!(weight.len(), self.c_out * self.c_in * self.k * self.k);
        let (oh, ow) = self.out_hw(s.h, s.w);
        let n = oh * ow;
        assert_eq!(g.len(), s.b * self.c_out * n);
        if winograd::applies(self.k, self.stride, self.padding, s) {
            // the adjoint of a 3×3 convolution of padding 1 is the convolution of the
            // output gradient with the flipped, transposed kernel
            let flipped = winograd::flip_transposed(weight, self.c_out, self.c_in);
            let gs = Nchw { c: self.c_out, ..s };
            return winograd::forward(g, gs, &flipped, self.c_in, None);
        }
        let kk = self.c_in * self.k * self.k;
        let plane = s.c * s.h * s.w;
        let mut dx = vec![0f32; s.b * plane];
        let gr = self.group(s, n);
        if gr > 1 {
            self.input_grad_grouped(g, s, weight, gr, &mut dx);
            return dx;
        }
        let rows = self.tile_rows(ow, oh);
        let mut scratch = Scratch::take(if self.is_pointwise() {
            0
        } else {
            kk * rows * ow
        });
        let col = &mut scratch.0;
        for bi in 0..s.b {
            let gb = &g[bi * self.c_out * n..(bi + 1) * self.c_out * n];
            let db = &mut dx[bi * plane..(bi + 1) * plane];
            if self.is_pointwise() {
                // dx = Wᵀ g
                matmul(
                    (kk, n, self.c_out),
                    db,
                    n,
                    false,
                    weight,
                    (1, kk),
                    gb,
                    (n, 1),
                );
                continue;
            }
            for oy0 in (0..oh).step_by(rows) {
                let oy1 = (oy0 + rows).min(oh);
                let tn = (oy1 - oy0) * ow;
                let col = &mut col[..kk * tn];
                // patches' gradient = Wᵀ g[:, tile]
                matmul(
                    (kk, tn, self.c_out),
                    col,
                    tn,
                    false,
                    weight,
                    (1, kk),
                    &gb[oy0 * ow..],
                    (n, 1),
                );
                self.col2im(col, s, (oy0, oy1), ow, db);
            }
        }
        dx
    }

    /// The gradient of the kernel `[C_out, C_in·k·k]` given the input `x` and the gradient
    /// `g` of the output: `Σ g · patchesᵀ` over the images and tiles of output rows.
    pub fn weight_grad(&self, x: &[f32], s: Nchw, g: &[f32]) -> Vec<f32> {
        assert_eq!(s.c, self.c_in);
        assert_eq!(x.len(), s.b * s.c * s.h * s.w);
        let (oh, ow) = self.out_hw(s.h, s.w);
        let n = oh * ow;
        assert_eq!(g.len(), s.b * self.c_out * n);
        let kk = self.c_in * self.k * self.k;
        let mut dw = vec![0f32; self.c_out * kk];
        let gr = self.group(s, n);
        if gr > 1 {
            self.weight_grad_grouped(x, s, g, gr, &mut dw);
            return dw;
        }
        let rows = self.tile_rows(ow, oh);
        let mut scratch = Scratch::take(if self.is_pointwise() {
            0
        } else {
            kk * rows * ow
        });
        let col = &mut scratch.0;
        let plane = s.c * s.h * s.w;
        for bi in 0..s.b {
            let xb = &x[bi * plane..(bi + 1) * plane];
            let gb = &g[bi * self.c_out * n..(bi + 1) * self.c_out * n];
            if self.is_pointwise() {
                // dW += g xᵀ
                matmul(
                    (self.c_out, kk, n),
                    &mut dw,
                    kk,
                    true,
                    gb,
                    (n, 1),
                    xb,
                    (1, n),
                );
                continue;
            }
            for oy0 in (0..oh).step_by(rows) {
                let oy1 = (oy0 + rows).min(oh);
                let tn = (oy1 - oy0) * ow;
                let col = &mut col[..kk * tn];
                self.im2col(xb, s, (oy0, oy1), ow, col);
                matmul(
                    (self.c_out, kk, tn),
                    &mut dw,
                    kk,
                    true,
                    &gb[oy0 * ow..],
                    (n, 1),
                    col,
                    (1, tn),
                );
            }
        }
        dw
    }

    /// For each input position a patch row `(c, i, j)` reads, the range of output columns
    /// `ox` with `ox·stride + j − padding` inside `[0, w)`.
    fn valid_cols(&self, j: usize, w: usize, ow: usize) -> (usize, usize) {
        let (st, p) = (self.stride, self.padding);
        // ox·st + j ≥ p  ⇔  ox ≥ ceil((p − j)/st)
        let lo = if j >= p { 0 } else { (p - j).div_ceil(st) };
        // ox·st + j − p ≤ w − 1  ⇔  ox ≤ (w − 1 + p − j)/st
        let hi = if w + p > j {
            ((w - 1 + p - j) / st + 1).min(ow)
        } else {
            0
        };
        (lo.min(hi), hi)
    }

    /// Patches of output rows `[oy0, oy1)` into `col` `[C_in·k·k, (oy1−oy0)·ow]`.
    fn im2col(&self, xb: &[f32], s: Nchw, rows: (usize, usize), ow: usize, col: &mut [f32]) {
        let tn = (rows.1 - rows.0) * ow;
        self.im2col_at(xb, s, rows, ow, (col, tn, 0));
    }

    /// As [`Self::im2col`], into the columns from `offset` of rows `stride` apart.
    fn im2col_at(
        &self,
        xb: &[f32],
        s: Nchw,
        (oy0, oy1): (usize, usize),
        ow: usize,
        (col, stride, offset): (&mut [f32], usize, usize),
    ) {
        let (k, st, p) = (self.k, self.stride, self.padding);
        let tn = (oy1 - oy0) * ow;
        col.par_chunks_mut(k * k * stride)
            .enumerate()
            .for_each(|(c, rows)| {
                let xc = &xb[c * s.h * s.w..(c + 1) * s.h * s.w];
                for i in 0..k {
                    for j in 0..k {
                        let r0 = (i * k + j) * stride + offset;
                        let row = &mut rows[r0..r0 + tn];
                        let (lo, hi) = self.valid_cols(j, s.w, ow);
                        for (t, oy) in (oy0..oy1).enumerate() {
                            let seg = &mut row[t * ow..(t + 1) * ow];
                            let iy = (oy * st + i) as isize - p as isize;
                            if iy < 0 || iy >= s.h as isize {
                                seg.fill(0.0);
                                continue;
                            }
                            let xr = &xc[iy as usize * s.w..(iy as usize + 1) * s.w];
                            seg[..lo].fill(0.0);
                            seg[hi..].fill(0.0);
                            let x0 = lo * st + j - p;
                            if st == 1 {
                                seg[lo..hi].copy_from_slice(&xr[x0..x0 + (hi - lo)]);
                            } else {
                                for (d, ox) in seg[lo..hi].iter_mut().zip((x0..).step_by(st)) {
                                    *d = xr[ox];
                                }
                            }
                        }
                    }
                }
            });
    }

    /// Adds the patch gradients `col` of output rows `[oy0, oy1)` into `db` `[C_in, H, W]`.
    fn col2im(&self, col: &[f32], s: Nchw, rows: (usize, usize), ow: usize, db: &mut [f32]) {
        let tn = (rows.1 - rows.0) * ow;
        self.col2im_at((col, tn, 0), s, rows, ow, db);
    }

    /// As [`Self::col2im`], from the columns at `offset` of rows `stride` apart.
    fn col2im_at(
        &self,
        (col, stride, offset): (&[f32], usize, usize),
        s: Nchw,
        (oy0, oy1): (usize, usize),
        ow: usize,
        db: &mut [f32],
    ) {
        let (k, st, p) = (self.k, self.stride, self.padding);
        let tn = (oy1 - oy0) * ow;
        db.par_chunks_mut(s.h * s.w)
            .zip(col.par_chunks(k * k * stride))
            .for_each(|(dc, rows)| {
                for i in 0..k {
                    for j in 0..k {
                        let r0 = (i * k + j) * stride + offset;
                        let row = &rows[r0..r0 + tn];
                        let (lo, hi) = self.valid_cols(j, s.w, ow);
                        for (t, oy) in (oy0..oy1).enumerate() {
                            let iy = (oy * st + i) as isize - p as isize;
                            if iy < 0 || iy >= s.h as isize || lo >= hi {
                                continue;
                            }
                            let seg = &row[t * ow + lo..t * ow + hi];
                            let dr = &mut dc[iy as usize * s.w..(iy as usize + 1) * s.w];
                            let x0 = lo * st + j - p;
                            if st == 1 {
                                for (d, v) in dr[x0..x0 + (hi - lo)].iter_mut().zip(seg) {
                                    *d += v;
                                }
                            } else {
                                for (v, ox) in seg.iter().zip((x0..).step_by(st)) {
                                    dr[ox] += v;
                                }
                            }
                        }
                    }
                }
            });
    }

    /// Images per group when whole images are small: a batch of small images is convolved
    /// as one product over all their positions (one product per image would be too small
    /// to run well). 1 when an image alone fills a tile.
    fn group(&self, s: Nchw, n: usize) -> usize {
        let kk = self.c_in * self.k * self.k;
        if s.b < 2 || n >= 1024 {
            return 1;
        }
        (GROUP_BYTES / (kk.max(self.c_out) * n * 4).max(1)).clamp(1, s.b)
    }

    /// `dst` `[rows, nb·n]` ← images `[b0, b0 + nb)` of `src` `[B, rows, n]` side by side.
    fn gather(src: &[f32], rows: usize, n: usize, (b0, nb): (usize, usize), dst: &mut [f32]) {
        dst.par_chunks_mut(nb * n).enumerate().for_each(|(r, d)| {
            for j in 0..nb {
                let o = ((b0 + j) * rows + r) * n;
                d[j * n..(j + 1) * n].copy_from_slice(&src[o..o + n]);
            }
        });
    }

    /// The inverse of [`Self::gather`].
    fn scatter(src: &[f32], rows: usize, n: usize, (b0, nb): (usize, usize), dst: &mut [f32]) {
        let img = rows * n;
        dst[b0 * img..(b0 + nb) * img]
            .par_chunks_mut(n)
            .enumerate()
            .for_each(|(k, d)| {
                let (j, r) = (k / rows, k % rows);
                d.copy_from_slice(&src[r * nb * n + j * n..r * nb * n + (j + 1) * n]);
            });
    }

    /// The patches of images `[b0, b0 + nb)` side by side: `[C_in·k·k, nb·n]`.
    fn group_patches(&self, x: &[f32], s: Nchw, (b0, nb): (usize, usize), col: &mut [f32]) {
        let (oh, ow) = self.out_hw(s.h, s.w);
        let n = oh * ow;
        let plane = s.c * s.h * s.w;
        if self.is_pointwise() {
            Self::gather(x, s.c, n, (b0, nb), col);
            return;
        }
        for j in 0..nb {
            let xb = &x[(b0 + j) * plane..(b0 + j + 1) * plane];
            self.im2col_at(xb, s, (0, oh), ow, (col, nb * n, j * n));
        }
    }

    /// [`Self::forward`] for groups of small images.
    fn forward_grouped(
        &self,
        x: &[f32],
        s: Nchw,
        weight: &[f32],
        bias: Option<&[f32]>,
        g: usize,
        out: &mut [f32],
    ) {
        let (oh, ow) = self.out_hw(s.h, s.w);
        let n = oh * ow;
        let kk = self.c_in * self.k * self.k;
        let mut scratch = Scratch::take((kk + self.c_out) * g * n);
        let (col, tmp) = scratch.0.split_at_mut(kk * g * n);
        for b0 in (0..s.b).step_by(g) {
            let nb = g.min(s.b - b0);
            let tn = nb * n;
            let (col, tmp) = (&mut col[..kk * tn], &mut tmp[..self.c_out * tn]);
            self.group_patches(x, s, (b0, nb), col);
            if let Some(bias) = bias {
                tmp.par_chunks_mut(tn)
                    .zip(bias.par_iter())
                    .for_each(|(r, b)| r.fill(*b));
            }
            matmul(
                (self.c_out, tn, kk),
                tmp,
                tn,
                bias.is_some(),
                weight,
                (kk, 1),
                col,
                (tn, 1),
            );
            Self::scatter(tmp, self.c_out, n, (b0, nb), out);
        }
    }

    /// [`Self::input_grad`] for groups of small images.
    fn input_grad_grouped(&self, gr: &[f32], s: Nchw, weight: &[f32], g: usize, dx: &mut [f32]) {
        let (oh, ow) = self.out_hw(s.h, s.w);
        let n = oh * ow;
        let kk = self.c_in * self.k * self.k;
        let plane = s.c * s.h * s.w;
        let mut scratch = Scratch::take((kk + self.c_out) * g * n);
        let (col, tmp) = scratch.0.split_at_mut(kk * g * n);
        for b0 in (0..s.b).step_by(g) {
            let nb = g.min(s.b - b0);
            let tn = nb * n;
            let (col, tmp) = (&mut col[..kk * tn], &mut tmp[..self.c_out * tn]);
            Self::gather(gr, self.c_out, n, (b0, nb), tmp);
            // patches' gradient = Wᵀ G
            matmul(
                (kk, tn, self.c_out),
                col,
                tn,
                false,
                weight,
                (1, kk),
                tmp,
                (tn, 1),
            );
            if self.is_pointwise() {
                Self::scatter(col, s.c, n, (b0, nb), dx);
                continue;
            }
            for j in 0..nb {
                let db = &mut dx[(b0 + j) * plane..(b0 + j + 1) * plane];
                self.col2im_at((col, tn, j * n), s, (0, oh), ow, db);
            }
        }
    }

    /// [`Self::weight_grad`] for groups of small images.
    fn weight_grad_grouped(&self, x: &[f32], s: Nchw, gr: &[f32], g: usize, dw: &mut [f32]) {
        let (oh, ow) = self.out_hw(s.h, s.w);
        let n = oh * ow;
        let kk = self.c_in * self.k * self.k;
        let mut scratch = Scratch::take((kk + self.c_out) * g * n);
        let (col, tmp) = scratch.0.split_at_mut(kk * g * n);
        for b0 in (0..s.b).step_by(g) {
            let nb = g.min(s.b - b0);
            let tn = nb * n;
            let (col, tmp) = (&mut col[..kk * tn], &mut tmp[..self.c_out * tn]);
            self.group_patches(x, s, (b0, nb), col);
            Self::gather(gr, self.c_out, n, (b0, nb), tmp);
            matmul(
                (self.c_out, kk, tn),
                dw,
                kk,
                true,
                tmp,
                (tn, 1),
                col,
                (1, tn),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// Direct definition of the convolution, in f64.
    fn reference(
        conv: &CpuConv,
        x: &[f32],
        s: Nchw,
        weight: &[f32],
        bias: Option<&[f32]>,
    ) -> Vec<f64> {
        let (oh, ow) = conv.out_hw(s.h, s.w);
        let k = conv.k;
        let mut out = vec![0f64; s.b * conv.c_out * oh * ow];
        for b in 0..s.b {
            for o in 0..conv.c_out {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bias.map_or(0.0, |b| b[o] as f64);
                        for c in 0..s.c {
                            for i in 0..k {
                                for j in 0..k {
                                    let iy =
                                        (oy * conv.stride + i) as isize - conv.padding as isize;
                                    let ix =
                                        (ox * conv.stride + j) as isize - conv.padding as isize;
                                    if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize
                                    {
                                        continue;
                                    }
                                    let xv =
                                        x[((b * s.c + c) * s.h + iy as usize) * s.w + ix as usize];
                                    let wv = weight[((o * s.c + c) * k + i) * k + j];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out[((b * conv.c_out + o) * oh + oy) * ow + ox] = acc;
                    }
                }
            }
        }
        out
    }

    fn cases() -> Vec<(usize, usize, usize, usize, Nchw)> {
        // (c_out, k, stride, padding, input)
        vec![
            // small images in groups of two, the last group short
            (
                5,
                3,
                1,
                1,
                Nchw {
                    b: 3,
                    c: 4,
                    h: 7,
                    w: 7,
                },
            ),
            (
                5,
                3,
                1,
                1,
                Nchw {
                    b: 2,
                    c: 3,
                    h: 7,
                    w: 6,
                },
            ),
            (
                4,
                3,
                2,
                1,
                Nchw {
                    b: 1,
                    c: 3,
                    h: 8,
                    w: 7,
                },
            ),
            (
                4,
                3,
                2,
                0,
                Nchw {
                    b: 2,
                    c: 2,
                    h: 9,
                    w: 9,
                },
            ),
            (
                6,
                1,
                1,
                0,
                Nchw {
                    b: 2,
                    c: 4,
                    h: 5,
                    w: 3,
                },
            ),
            (
                3,
                1,
                2,
                0,
                Nchw {
                    b: 1,
                    c: 2,
                    h: 6,
                    w: 6,
                },
            ),
            (
                2,
                5,
                1,
                2,
                Nchw {
                    b: 1,
                    c: 2,
                    h: 4,
                    w: 11,
                },
            ),
        ]
    }

    #[test]
    fn forward_matches_the_definition() {
        for (n, (c_out, k, stride, padding, s)) in cases().into_iter().enumerate() {
            let w = lcg(c_out * s.c * k * k, 1 + n as u64);
            let bias = (n % 2 == 0).then(|| lcg(c_out, 100 + n as u64));
            let conv = CpuConv::new((c_out, s.c, k), stride, padding);
            let x = lcg(s.b * s.c * s.h * s.w, 200 + n as u64);
            let got = conv.forward(&x, s, &w, bias.as_deref());
            let want = reference(&conv, &x, s, &w, bias.as_deref());
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-5, "case {n}: {g} vs {w}");
            }
        }
    }

    /// dW[o, c, i, j] = Σ g[o, y, x] · x[c, y·s + i − p, x·s + j − p], from the definition.
    #[test]
    fn weight_grad_matches_the_definition() {
        for (n, (c_out, k, stride, padding, s)) in cases().into_iter().enumerate() {
            let conv = CpuConv::new((c_out, s.c, k), stride, padding);
            let x = lcg(s.b * s.c * s.h * s.w, 500 + n as u64);
            let (oh, ow) = conv.out_hw(s.h, s.w);
            let g = lcg(s.b * c_out * oh * ow, 600 + n as u64);
            let dw = conv.weight_grad(&x, s, &g);
            // ⟨conv_W(x), g⟩ is linear in W: its gradient is the response to each unit kernel
            for (i, got) in dw.iter().enumerate() {
                let mut e = vec![0f32; dw.len()];
                e[i] = 1.0;
                let y = reference(&conv, &x, s, &e, None);
                let want: f64 = y.iter().zip(&g).map(|(a, b)| a * *b as f64).sum();
                assert!(
                    (*got as f64 - want).abs() < 1e-4,
                    "case {n}, weight {i}: {got} vs {want}"
                );
            }
        }
    }

    /// ⟨conv(x), g⟩ = ⟨x, input_grad(g)⟩ for the bias-free convolution (its adjoint).
    #[test]
    fn input_grad_is_the_adjoint() {
        for (n, (c_out, k, stride, padding, s)) in cases().into_iter().enumerate() {
            let w = lcg(c_out * s.c * k * k, 11 + n as u64);
            let conv = CpuConv::new((c_out, s.c, k), stride, padding);
            let x = lcg(s.b * s.c * s.h * s.w, 300 + n as u64);
            let y = reference(&conv, &x, s, &w, None);
            let g = lcg(y.len(), 400 + n as u64);
            let dx = conv.input_grad(&g, s, &w);
            let lhs: f64 = y.iter().zip(&g).map(|(a, b)| a * *b as f64).sum();
            let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!(
                (lhs - rhs).abs() < 1e-4 * (1.0 + lhs.abs()),
                "case {n}: {lhs} vs {rhs}"
            );
            // and element by element: dx[i] = ⟨conv(e_i), g⟩
            for i in (0..x.len()).step_by(7) {
                let mut e = vec![0f32; x.len()];
                e[i] = 1.0;
                let yi = reference(&conv, &e, s, &w, None);
                let want: f64 = yi.iter().zip(&g).map(|(a, b)| a * *b as f64).sum();
                assert!((dx[i] as f64 - want).abs() < 1e-5, "case {n}, input {i}");
            }
        }
    }
}
