//! The layers' input-gradient formulas with candle's tensor ops (the GPU's and half
//! precision's path; the CPU kernels have their own in `crate::cpu`).

use candle_core::{DType, Tensor, D};

/// The input gradient of a `k`×`k` convolution: a stride-1 convolution of the output
/// gradient `g` — spread out by the stride with zeros in between — with the transposed,
/// flipped kernel.
pub(super) fn conv_input_grad(
    g: &Tensor,
    flipped: &Tensor,
    k: usize,
    stride: usize,
    padding: usize,
    (in_h, in_w): (usize, usize),
) -> candle_core::Result<Tensor> {
    let g = if stride == 1 {
        g.clone()
    } else {
        dilate(g, stride)?
    };
    let left = k - 1 - padding;
    let (_, _, gh, gw) = g.dims4()?;
    let right_h = (in_h + k - 1).saturating_sub(gh + left);
    let right_w = (in_w + k - 1).saturating_sub(gw + left);
    let (g, pad) = if stride == 1 && right_h == left && right_w == left {
        (g, left)
    } else {
        let g = g
            .pad_with_zeros(2, left, right_h)?
            .pad_with_zeros(3, left, right_w)?;
        (g, 0)
    };
    g.conv2d(flipped, pad, 1, 1, 1)?
        .narrow(2, 0, in_h)?
        .narrow(3, 0, in_w)
}

/// Spreads `g` `[B, C, H, W]` to `[B, C, sH, sW]` with `g` at multiples of `s`, zeros elsewhere.
fn dilate(g: &Tensor, s: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = g.dims4()?;
    let mut parts = vec![g.clone()];
    let z = g.zeros_like()?;
    parts.extend(std::iter::repeat_n(z, s - 1));
    // (B, C, H, s, W) -> (B, C, sH, W)
    let rows = Tensor::stack(&parts, 3)?.reshape((b, c, h * s, w))?;
    let mut parts = vec![rows.clone()];
    let z = rows.zeros_like()?;
    parts.extend(std::iter::repeat_n(z, s - 1));
    // (B, C, sH, W, s) -> (B, C, sH, sW)
    Tensor::stack(&parts, 4)?.reshape((b, c, h * s, w * s))
}

/// The dtype norms compute their statistics in: f32, or f64 for f64 inputs.
pub(super) fn statistics(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// `(x − μ)/σ` per group, `[B, G, n]` in f32 (f64 for f64 inputs), and `1/σ` `[B, G, 1]`.
pub(super) fn normalized(
    x: &Tensor,
    groups: usize,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let b = x.dim(0)?;
    let n = x.elem_count() / (b * groups);
    let xs = x.reshape((b, groups, n))?.to_dtype(statistics(x.dtype()))?;
    let mean = (xs.sum_keepdim(2)? / n as f64)?;
    let xs = xs.broadcast_sub(&mean)?;
    let var = (xs.sqr()?.sum_keepdim(2)? / n as f64)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    Ok((xs.broadcast_mul(&rstd)?, rstd))
}

/// The gradient of the input of `group_norm(x)` with affine `γ`, `β` (with `silu`, of
/// `silu(group_norm(x))`) given the gradient `g` of the output and the forward pass's
/// `(x̂, 1/σ)` from [`normalized`], computed in their dtype:
/// `dx = (1/σ)(ĝ − mean(ĝ) − x̂·mean(ĝ x̂))` per group, with `ĝ = g·γ`.
pub(super) fn group_norm_input_grad(
    (gamma, beta): (&Tensor, &Tensor),
    (xn, rstd): (&Tensor, &Tensor),
    g: &Tensor,
    silu: bool,
) -> candle_core::Result<Tensor> {
    let (b, groups, n) = xn.dims3()?;
    let mut wd = vec![1usize; g.rank()];
    wd[1] = g.dim(1)?;
    let gamma = gamma.to_dtype(xn.dtype())?.reshape(wd.clone())?;
    let mut gf = g.to_dtype(xn.dtype())?;
    if silu {
        // d silu(y)/dy = σ(y)(1 + y(1 − σ(y))), y = x̂γ + β
        let y = xn
            .reshape(g.dims())?
            .broadcast_mul(&gamma)?
            .broadcast_add(&beta.to_dtype(xn.dtype())?.reshape(wd)?)?;
        let sig = candle_nn::ops::sigmoid(&y)?;
        let d = ((&y * (1.0 - &sig)?)? + 1.0)?.mul(&sig)?;
        gf = (gf * d)?;
    }
    let gg = gf.broadcast_mul(&gamma)?.reshape((b, groups, n))?;
    let m1 = (gg.sum_keepdim(2)? / n as f64)?;
    let m2 = ((&gg * xn)?.sum_keepdim(2)? / n as f64)?;
    let dx = gg
        .broadcast_sub(&m1)?
        .sub(&xn.broadcast_mul(&m2)?)?
        .broadcast_mul(rstd)?;
    dx.reshape(g.dims())?.to_dtype(g.dtype())
}

/// The gradient of the input `x` of a layer norm with scale `γ` given the gradient `g` of
/// the output, computed in f32 (f64 for f64 inputs):
/// `dx = (1/σ)(ĝ − mean(ĝ) − x̂·mean(ĝ x̂))`, `ĝ = g·γ`.
pub(super) fn layer_norm_input_grad(
    gamma: &Tensor,
    eps: f64,
    x: &Tensor,
    g: &Tensor,
) -> candle_core::Result<Tensor> {
    let xf = x.to_dtype(statistics(x.dtype()))?;
    let n = xf.dim(D::Minus1)? as f64;
    let mean = (xf.sum_keepdim(D::Minus1)? / n)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / n)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    let xn = xc.broadcast_mul(&rstd)?;
    let gg = g
        .to_dtype(xf.dtype())?
        .broadcast_mul(&gamma.to_dtype(xf.dtype())?)?;
    let m1 = (gg.sum_keepdim(D::Minus1)? / n)?;
    let m2 = ((&gg * &xn)?.sum_keepdim(D::Minus1)? / n)?;
    let dx = gg
        .broadcast_sub(&m1)?
        .sub(&xn.broadcast_mul(&m2)?)?
        .broadcast_mul(&rstd)?;
    dx.to_dtype(g.dtype())
}
