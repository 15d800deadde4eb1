//! The layers the networks are built of — linear, 2-D convolution, group norm, layer norm,
//! softmax — with frozen weights, fast on the forward pass and exact on the backward pass.
//!
//! Null-text inversion differentiates the UNet with respect to its text context only, so
//! the layers treat their weights as constants: their backward passes compute the gradient
//! of the input and nothing else. Each layer runs nulltext's CPU kernels (`crate::cpu`) on
//! f32 CPU tensors and candle's ops elsewhere, and owns its input-gradient formula
//! (`grads`, for candle's ops; the CPU kernels have their own). Where candle's fused kernels
//! record no backward op (softmax, layer norm) or their backward also computes unneeded
//! weight gradients (matmul, conv2d), the value is computed without a graph and re-attached
//! to the input with an explicit input-gradient-only backward (`autograd`).
//!
//! Training (`nulltext train`) loads the weights as variables: the CPU kernels of linear
//! layers, convolutions and layer norms then also return the weights' gradients, and group
//! norm runs on candle's differentiable ops.

mod autograd;
mod grads;
pub(crate) mod layout;

use std::sync::OnceLock;

use candle_core::{DType, Tensor, D};

use crate::cpu::conv::CpuConv;
use crate::cpu::ops::{Biased, CpuConvForward, CpuLayerNorm, CpuLinear, CpuScaledSoftmax};
use crate::error::Result;
use crate::fused;
use crate::weights::Vb;
pub use autograd::attach_grad;
use grads::{conv_input_grad, group_norm_input_grad, layer_norm_input_grad, normalized};

/// `y = x Wᵀ + b` with a frozen `W`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(vb: &Vb, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get(&[out_dim, in_dim], "weight")?;
        let bias = if bias {
            Some(vb.get(&[out_dim], "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// Loads a linear layer stored as a 1×1 convolution (`[out, in, 1, 1]`), or as a matrix.
    pub fn load_maybe_conv(vb: &Vb, in_dim: usize, out_dim: usize) -> Result<Self> {
        let weight = match vb.shape_of("weight") {
            Some([_, _, 1, 1]) => vb
                .get(&[out_dim, in_dim, 1, 1], "weight")?
                .reshape((out_dim, in_dim))?,
            _ => vb.get(&[out_dim, in_dim], "weight")?,
        };
        Ok(Self {
            weight,
            bias: Some(vb.get(&[out_dim], "bias")?),
        })
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    /// Whether the CPU f32 kernel ([`CpuLinear`]) applies.
    fn cpu_f32(&self, x: &Tensor) -> bool {
        x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && self.bias.as_ref().is_none_or(|b| b.dtype() == DType::F32)
    }

    fn value(&self, x2: &Tensor) -> candle_core::Result<Tensor> {
        if self.cpu_f32(x2) {
            // one graph node, bias fused, input-gradient-only backward
            let x2 = x2.contiguous()?;
            let w = self.weight.contiguous()?;
            return match &self.bias {
                Some(b) => x2.apply_op3(&w, &b.contiguous()?, Biased(CpuLinear)),
                None => x2.apply_op2(&w, Biased(CpuLinear)),
            };
        }
        let y = x2.matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap();
        let rows = x.elem_count() / in_dim.max(1);
        let x2 = x.reshape((rows, in_dim))?;
        let y = if x2.track_op() && !self.cpu_f32(&x2) {
            let value = self.value(&x2.detach())?;
            let this = self.clone();
            attach_grad(&x2, value, move |g, _| this.input_grad(g))?
        } else {
            self.value(&x2)?
        };
        let mut out = dims;
        *out.last_mut().unwrap() = self.out_dim();
        Ok(y.reshape(out)?)
    }

    /// The gradient of the input given the gradient `g` `[…, out]` of the output: `g W`.
    pub(crate) fn input_grad(&self, g: &Tensor) -> candle_core::Result<Tensor> {
        let mut dims = g.dims().to_vec();
        let out = dims.last().copied().unwrap_or(1);
        let g2 = g.reshape((g.elem_count() / out.max(1), out))?;
        let y = match self.cpu_f32(&g2) && !g2.track_op() {
            true => CpuLinear::input_grad(&self.weight.contiguous()?, &g2)?,
            false => g2.matmul(&self.weight)?,
        };
        *dims.last_mut().unwrap() = self.weight.dim(1)?;
        y.reshape(dims)
    }
}

/// 2-D convolution with a frozen kernel.
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
    /// The kernel transposed and flipped, for the input gradient of stride-1 convolutions.
    flipped: OnceLock<Tensor>,
}

impl Conv2d {
    pub fn load(
        vb: &Vb,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get(&[out_c, in_c, kernel, kernel], "weight")?;
        let bias = Some(vb.get(&[out_c], "bias")?);
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
            flipped: OnceLock::new(),
        })
    }

    /// The CPU f32 kernel (`crate::cpu::conv`) applies when the input, kernel and bias are
    /// f32 tensors on the CPU.
    fn cpu_geometry(&self, x: &Tensor) -> Option<CpuConv> {
        let (c_out, c_in, k, k2) = self.weight.dims4().ok()?;
        let ok = x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && self.bias.as_ref().is_none_or(|b| b.dtype() == DType::F32)
            && k == k2
            && x.rank() == 4;
        ok.then(|| CpuConv::new((c_out, c_in, k), self.stride, self.padding))
    }

    /// The CPU kernel as one graph node whose backward is the input gradient only.
    fn cpu_forward(&self, x: &Tensor, geometry: CpuConv) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        let w = self.weight.contiguous()?;
        let op = Biased(CpuConvForward(geometry));
        match &self.bias {
            Some(b) => x.apply_op3(&w, &b.contiguous()?, op),
            None => x.apply_op2(&w, op),
        }
    }

    fn value(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }

    fn flipped(&self) -> candle_core::Result<Tensor> {
        if let Some(f) = self.flipped.get() {
            return Ok(f.clone());
        }
        let (_, _, kh, kw) = self.weight.dims4()?;
        let dev = self.weight.device();
        let rh = Tensor::from_vec((0..kh as u32).rev().collect::<Vec<_>>(), kh, dev)?;
        let rw = Tensor::from_vec((0..kw as u32).rev().collect::<Vec<_>>(), kw, dev)?;
        let f = self
            .weight
            .transpose(0, 1)?
            .contiguous()?
            .index_select(&rh, 2)?
            .contiguous()?
            .index_select(&rw, 3)?
            .contiguous()?;
        let _ = self.flipped.set(f.clone());
        Ok(f)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(geometry) = self.cpu_geometry(x) {
            return Ok(self.cpu_forward(x, geometry)?);
        }
        if !x.track_op() {
            return Ok(self.value(x)?);
        }
        let value = self.value(&x.detach())?;
        let (_, _, in_h, in_w) = x.dims4()?;
        let (_, _, k, _) = self.weight.dims4()?;
        let (stride, padding) = (self.stride, self.padding);
        let flipped = self.flipped()?;
        Ok(attach_grad(x, value, move |g, _| {
            conv_input_grad(g, &flipped, k, stride, padding, (in_h, in_w))
        })?)
    }

    /// The gradient of the input (`in_hw` its height and width) given the gradient `g` of
    /// the output.
    pub(crate) fn input_grad(
        &self,
        g: &Tensor,
        in_hw: (usize, usize),
    ) -> candle_core::Result<Tensor> {
        if let Some(geometry) = self.cpu_geometry(g).filter(|_| !g.track_op()) {
            return CpuConvForward(geometry).input_grad(in_hw, &self.weight.contiguous()?, g);
        }
        let (_, _, k, _) = self.weight.dims4()?;
        conv_input_grad(g, &self.flipped()?, k, self.stride, self.padding, in_hw)
    }
}

/// Group normalization with frozen affine parameters.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f64,
    /// `[γ | β]`, for the fused kernels' input gradient.
    affine: OnceLock<Tensor>,
}

impl GroupNorm {
    pub fn load(vb: &Vb, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(crate::Error::Unsupported(format!(
                "{}: {channels} channels do not divide into {groups} groups",
                vb.prefix()
            )));
        }
        let weight = vb.get(&[channels], "weight")?;
        let bias = vb.get(&[channels], "bias")?;
        Ok(Self::new(weight, bias, groups, eps))
    }

    /// A group norm with `weight` (γ) and `bias` (β), `[C]` each, `C` a multiple of `groups`.
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Self {
        Self {
            weight,
            bias,
            groups,
            eps,
            affine: OnceLock::new(),
        }
    }

    /// `(x − μ)/σ` per group and `1/σ` ([`grads::normalized`]).
    fn normalized(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        normalized(x, self.groups, self.eps)
    }

    /// The gradient of the input `x` of `group_norm(x)` (with `silu`, of
    /// `silu(group_norm(x))`) given the gradient `g` of the output
    /// ([`grads::group_norm_input_grad`]).
    pub(crate) fn input_grad(
        &self,
        x: &Tensor,
        g: &Tensor,
        silu: bool,
    ) -> candle_core::Result<Tensor> {
        let (xn, rstd) = self.normalized(x)?;
        self.input_grad_saved(&(xn, rstd), g, silu)
    }

    /// [`Self::input_grad`] from the forward pass's `(x̂, 1/σ)`.
    pub(crate) fn input_grad_saved(
        &self,
        (xn, rstd): &(Tensor, Tensor),
        g: &Tensor,
        silu: bool,
    ) -> candle_core::Result<Tensor> {
        group_norm_input_grad((&self.weight, &self.bias), (xn, rstd), g, silu)
    }

    fn channel_shape(&self, dims: &[usize]) -> Vec<usize> {
        let mut wd = vec![1usize; dims.len()];
        wd[1] = dims[1];
        wd
    }

    /// The fused kernel ([`fused::GroupNormOp`]), where it runs `x` with these affine
    /// parameters: f32 on the CPU, or on a CUDA GPU when they are frozen (training there
    /// differentiates them through candle's ops).
    pub(crate) fn fused_op(&self, x: &Tensor, silu: bool) -> Option<fused::GroupNormOp> {
        let frozen = x.device().is_cpu() || !self.weight.is_variable();
        (frozen && fused::applies_with(x, &[&self.weight, &self.bias])).then_some(
            fused::GroupNormOp {
                groups: self.groups,
                eps: self.eps,
                silu,
            },
        )
    }

    fn apply_fused(&self, x: &Tensor, op: fused::GroupNormOp) -> Result<Tensor> {
        Ok(x.contiguous()?
            .apply_op3(&self.weight.contiguous()?, &self.bias.contiguous()?, op)?)
    }

    /// `[γ | β]` for the fused input gradient, made once for frozen weights.
    fn affine(&self) -> candle_core::Result<Tensor> {
        if let Some(a) = self.affine.get() {
            return Ok(a.clone());
        }
        let a = fused::stacked_affine(&self.weight.detach(), &self.bias.detach())?;
        if !self.weight.is_variable() && !self.bias.is_variable() {
            let _ = self.affine.set(a.clone());
        }
        Ok(a)
    }

    /// `silu(group_norm(x))`, one fused kernel where [`fused::applies`] (the pre-activation of
    /// every residual block).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        match self.fused_op(x, true) {
            Some(op) => self.apply_fused(x, op),
            None => Ok(self.forward(x)?.silu()?),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(op) = self.fused_op(x, false) {
            return self.apply_fused(x, op);
        }
        let value = |x: &Tensor| Ok::<_, candle_core::Error>(self.forward_saving(x, false)?.0);
        if !x.track_op() || self.weight.is_variable() {
            // training the affine parameters: candle's graph differentiates everything
            return Ok(value(x)?);
        }
        let xd = x.detach();
        let y = value(&xd)?;
        let this = self.clone();
        Ok(attach_grad(x, y, move |g, _| {
            this.input_grad(&xd, g, false)
        })?)
    }

    /// The value of `group_norm(x)` (with `silu`, of `silu(group_norm(x))`) computed with
    /// tensor ops, as the graph path computes it off the CPU, and `(x̂, 1/σ)` from
    /// [`Self::normalized`] for [`Self::input_grad_saved`].
    pub(crate) fn forward_saving(
        &self,
        x: &Tensor,
        silu: bool,
    ) -> candle_core::Result<(Tensor, (Tensor, Tensor))> {
        let saved = self.normalized(x)?;
        let wd = self.channel_shape(x.dims());
        let y = saved
            .0
            .to_dtype(x.dtype())?
            .reshape(x.dims())?
            .broadcast_mul(&self.weight.reshape(wd.clone())?)?
            .broadcast_add(&self.bias.reshape(wd)?)?;
        let y = if silu { y.silu()? } else { y };
        Ok((y, saved))
    }

    /// `group_norm(x)` (with `silu`, `silu(group_norm(x))`) and what [`Self::backward`]
    /// needs: the input for the fused kernel, `(x̂, 1/σ)` for the tensor formula.
    pub(crate) fn forward_recording(
        &self,
        x: &Tensor,
        silu: bool,
    ) -> candle_core::Result<(Tensor, NormRecord)> {
        match self.fused_op(x, silu).filter(|_| !x.track_op()) {
            Some(op) => {
                let x = x.contiguous()?;
                let (w, b) = (self.weight.contiguous()?, self.bias.contiguous()?);
                let y = x.apply_op3_no_bwd(&w, &b, &op)?;
                Ok((y, NormRecord::Input(x)))
            }
            None => {
                let (y, (xn, rstd)) = self.forward_saving(x, silu)?;
                Ok((y, NormRecord::Normalized(xn, rstd)))
            }
        }
    }

    /// The input gradient of [`Self::forward_recording`]'s value given its gradient `g`.
    pub(crate) fn backward(
        &self,
        record: &NormRecord,
        g: &Tensor,
        silu: bool,
    ) -> candle_core::Result<Tensor> {
        match record {
            NormRecord::Input(x) => {
                let op = self.fused_op(x, silu).filter(|_| g.dtype() == x.dtype());
                match op {
                    Some(op) => op.input_grad(x, g, &self.affine()?),
                    None => self.input_grad(x, g, silu),
                }
            }
            NormRecord::Normalized(xn, rstd) => {
                self.input_grad_saved(&(xn.clone(), rstd.clone()), g, silu)
            }
        }
    }
}

/// What a group norm keeps for its input gradient ([`GroupNorm::forward_recording`]).
pub(crate) enum NormRecord {
    /// The input, for the fused kernel (which recomputes the statistics).
    Input(Tensor),
    /// `x̂` and `1/σ`, for the tensor formula.
    Normalized(Tensor, Tensor),
}

/// Layer normalization over the last dimension, with frozen affine parameters.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(vb: &Vb, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(&[dim], "weight")?,
            bias: vb.get(&[dim], "bias")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        if x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && self.bias.dtype() == DType::F32
        {
            let (w, b) = (self.weight.contiguous()?, self.bias.contiguous()?);
            return Ok(x.apply_op3(&w, &b, CpuLayerNorm(self.eps))?);
        }
        if !x.track_op() {
            return Ok(self.value(&x)?);
        }
        // The fused kernel records no backward op: attach the input gradient
        // dx = (1/σ)(ĝ − mean(ĝ) − x̂·mean(ĝ x̂)), ĝ = g·γ, computed in f32 (f64 for f64 inputs).
        let xd = x.detach();
        let y = self.value(&xd)?;
        let this = self.clone();
        Ok(attach_grad(&x, y, move |g, _| this.input_grad(&xd, g))?)
    }

    /// The gradient of the input `x` given the gradient `g` of the output: the fused kernel
    /// ([`fused::LayerNormGrad`]) where it applies, else [`grads::layer_norm_input_grad`].
    pub(crate) fn input_grad(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
        if !x.track_op() && !g.track_op() && fused::applies_with(x, &[g, &self.weight]) {
            return x.contiguous()?.apply_op3_no_bwd(
                &g.contiguous()?,
                &self.weight.contiguous()?,
                &fused::LayerNormGrad(self.eps),
            );
        }
        layer_norm_input_grad(&self.weight, self.eps, x, g)
    }

    /// candle's fused kernel (f32, f16, bf16), or its definition in f64.
    fn value(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.dtype() != DType::F64 {
            return candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
        }
        let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let rstd = (xc.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        xc.broadcast_mul(&rstd)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// Softmax over the last dimension; differentiable (candle's fused kernel is not).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    scaled_softmax_last_dim(x, 1.0)
}

/// `softmax(scale · x)` over the last dimension; differentiable. On the CPU in f32 it is
/// one vectorized pass per row (candle's computes a scalar `expf` per element).
pub fn scaled_softmax_last_dim(x: &Tensor, scale: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let value = |x: &Tensor| -> candle_core::Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            x.apply_op1_no_bwd(&CpuScaledSoftmax(scale as f32))
        } else if scale == 1.0 {
            candle_nn::ops::softmax_last_dim(x)
        } else {
            candle_nn::ops::softmax_last_dim(&(x * scale)?)
        }
    };
    if !x.track_op() {
        return Ok(value(&x)?);
    }
    let y = value(&x.detach())?;
    // d softmax(s·x)/dx · g = s · y ⊙ (g − Σ g⊙y)
    Ok(attach_grad(&x, y, move |g, y| {
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        let d = (y * g.broadcast_sub(&dot)?)?;
        if scale == 1.0 {
            Ok(d)
        } else {
            d * scale
        }
    })?)
}
