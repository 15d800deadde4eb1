//! Layers fast on the forward pass and exact on the backward pass.
//!
//! Null-text inversion differentiates the UNet with respect to its text context only, so
//! the layers treat their weights as constants: the backward pass computes the gradient of
//! the input and nothing else. Where candle's fused kernels record no backward op (softmax,
//! layer norm) or its backward also computes unneeded weight gradients (matmul, conv2d), the
//! value is computed without a graph and re-attached to the input with an explicit
//! input-gradient-only backward ([`attach_grad`]).
//!
//! Training (`nulltext train`) loads the weights as variables: the CPU kernels of linear
//! layers, convolutions and layer norms then also return the weights' gradients, and group
//! norm runs on candle's differentiable ops.

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Layout, MetalStorage, Shape, Storage, Tensor, D,
};

use crate::cpu_conv::{CpuConv, Nchw};
use crate::error::Result;
use crate::weights::Vb;

type Bwd = dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync;

/// A custom op whose forward hands out a precomputed value and whose backward is `bwd`.
struct WithGrad {
    value: Mutex<Option<Tensor>>,
    bwd: Arc<Bwd>,
}

impl WithGrad {
    fn take(&self) -> candle_core::Result<Tensor> {
        self.value
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| candle_core::Error::Msg("attach_grad value used twice".into()))
    }
}

fn storage_copy(t: &Tensor) -> candle_core::Result<(Storage, Shape)> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let shape = layout.shape().clone();
    let owned = match (&*storage, layout.start_offset()) {
        (Storage::Cpu(s), 0) if s_len(s) == shape.elem_count() => Storage::Cpu(s.clone()),
        _ => {
            drop(storage);
            let c = t.copy()?;
            let (storage, _) = c.storage_and_layout();
            return Ok((storage.try_clone(c.layout())?, shape));
        }
    };
    Ok((owned, shape))
}

fn s_len(s: &CpuStorage) -> usize {
    match s {
        CpuStorage::F32(v) => v.len(),
        CpuStorage::F16(v) => v.len(),
        CpuStorage::BF16(v) => v.len(),
        CpuStorage::F64(v) => v.len(),
        _ => usize::MAX,
    }
}

impl CustomOp1 for WithGrad {
    fn name(&self) -> &'static str {
        "with-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        match storage_copy(&self.take()?)? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("attach_grad: value not on the cpu"),
        }
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let v = self.take()?.contiguous()?;
        let (storage, layout) = v.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("attach_grad: value not on the cuda device"),
        }
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        let v = self.take()?.contiguous()?;
        let (storage, layout) = v.storage_and_layout();
        match &*storage {
            Storage::Metal(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("attach_grad: value not on the metal device"),
        }
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some((self.bwd)(grad_res, res)?))
    }
}

/// Returns `value` (computed from `x` without a graph) as a function of `x` whose backward
/// is `bwd(grad_of_value, value)`. Without a graph on `x`, returns `value` as it is.
pub fn attach_grad(
    x: &Tensor,
    value: Tensor,
    bwd: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> candle_core::Result<Tensor> {
    if !x.track_op() {
        return Ok(value);
    }
    x.apply_op1(WithGrad {
        value: Mutex::new(Some(value)),
        bwd: Arc::new(bwd),
    })
}

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
                Some(b) => x2.apply_op3(&w, &b.contiguous()?, CpuLinear),
                None => x2.apply_op2(&w, CpuLinear),
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

/// `x Wᵀ (+ b)` for `x` `[rows, in]`, `W` `[out, in]` and `b` `[out]`, f32 on the CPU: one
/// matrix product writing onto the bias.
pub(crate) fn linear_f32(
    x: &[f32],
    rows: usize,
    w: &[f32],
    out_dim: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let in_dim = w.len() / out_dim.max(1);
    assert_eq!(x.len(), rows * in_dim);
    let mut y = vec![0f32; rows * out_dim];
    if let Some(bias) = bias {
        y.chunks_mut(out_dim.max(1))
            .for_each(|r| r.copy_from_slice(bias));
    }
    crate::cpu_conv::matmul(
        (rows, out_dim, in_dim),
        &mut y,
        out_dim,
        bias.is_some(),
        x,
        (in_dim, 1),
        w,
        (1, in_dim),
    );
    y
}

/// `dx (+)= g W` (`acc`: add to `dx`): the input gradient of [`linear_f32`] for `g`
/// `[rows, out]`, into `dx` `[rows, in]`.
pub(crate) fn linear_input_grad_f32(g: &[f32], rows: usize, w: &[f32], dx: &mut [f32], acc: bool) {
    let out_dim = g.len() / rows.max(1);
    let in_dim = w.len() / out_dim.max(1);
    assert_eq!(dx.len(), rows * in_dim);
    crate::cpu_conv::matmul(
        (rows, in_dim, out_dim),
        dx,
        in_dim,
        acc,
        g,
        (out_dim, 1),
        w,
        (in_dim, 1),
    );
}

/// `y = x Wᵀ + b` on the CPU (f32) for `x` `[rows, in]`, `W` `[out, in]`, `b` `[out]`:
/// one matrix product writing onto the bias; the backward gives the input gradient `g W`.
struct CpuLinear;

impl CpuLinear {
    fn run(
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, in_dim) = x.1.shape().dims2()?;
        let (out_dim, w_in) = w.1.shape().dims2()?;
        if in_dim != w_in {
            candle_core::bail!("linear: input width {in_dim}, weight expects {w_in}");
        }
        let xs = f32_slice(x.0, x.1, "input")?;
        let ws = f32_slice(w.0, w.1, "weight")?;
        let bias = match b {
            Some((b, l)) => {
                let bias = f32_slice(b, l, "bias")?;
                if bias.len() != out_dim {
                    candle_core::bail!("linear: bias of {} for {out_dim} outputs", bias.len());
                }
                Some(bias)
            }
            None => None,
        };
        let y = linear_f32(xs, rows, ws, out_dim, bias);
        Ok((CpuStorage::F32(y), Shape::from((rows, out_dim))))
    }

    /// `g W` `[rows, in]`.
    fn input_grad(w: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
        g.contiguous()?.apply_op2_no_bwd(w, &CpuLinearInputGrad)
    }

    /// The gradients of whichever of `x`, `W` and `b` are being differentiated: `g W`,
    /// `gᵀ x` and the column sums of `g` (the weights' only when training them).
    #[allow(clippy::type_complexity)]
    fn grads(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = match x.track_op() {
            true => Some(Self::input_grad(w, &g)?),
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(g.t()?.matmul(&x.detach().contiguous()?)?),
            false => None,
        };
        let db = match b {
            Some(b) if b.track_op() => Some(channel_sums(&g, g.dim(1)?)?),
            _ => None,
        };
        Ok((dx, dw, db))
    }
}

impl candle_core::CustomOp2 for CpuLinear {
    fn name(&self) -> &'static str {
        "cpu-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::run((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = Self::grads(x, w, None, g)?;
        Ok((dx, dw))
    }
}

impl candle_core::CustomOp3 for CpuLinear {
    fn name(&self) -> &'static str {
        "cpu-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::run((s1, l1), (s2, l2), Some((s3, l3)))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Self::grads(x, w, Some(b), g)
    }
}

/// `g W` for a [`CpuLinear`]: `g` `[rows, out]`, `W` `[out, in]`.
struct CpuLinearInputGrad;

impl candle_core::CustomOp2 for CpuLinearInputGrad {
    fn name(&self) -> &'static str {
        "cpu-linear-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, out_dim) = l1.shape().dims2()?;
        let (w_out, in_dim) = l2.shape().dims2()?;
        if out_dim != w_out {
            candle_core::bail!("linear backward: gradient width {out_dim}, weight has {w_out}");
        }
        let mut dx = vec![0f32; rows * in_dim];
        linear_input_grad_f32(
            f32_slice(s1, l1, "gradient")?,
            rows,
            f32_slice(s2, l2, "weight")?,
            &mut dx,
            false,
        );
        Ok((CpuStorage::F32(dx), Shape::from((rows, in_dim))))
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

    /// The CPU f32 kernel (`crate::cpu_conv`) applies when the input, kernel and bias are
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
        let op = CpuConvForward(geometry);
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

/// The input gradient of a `k`×`k` convolution: a stride-1 convolution of the output
/// gradient `g` — spread out by the stride with zeros in between — with the transposed,
/// flipped kernel.
fn conv_input_grad(
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

/// The data of a contiguous f32 CPU storage.
pub(crate) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, e))) => Ok(&v[a..e]),
        _ => candle_core::bail!("cpu kernel: {what} must be contiguous f32"),
    }
}

/// The data of an f32 CPU tensor as a contiguous host vector (for backward passes, which
/// receive tensors rather than storages).
pub(crate) fn host_f32(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

fn nchw(l: &Layout) -> candle_core::Result<Nchw> {
    let (b, c, h, w) = l.shape().dims4()?;
    Ok(Nchw { b, c, h, w })
}

/// `conv2d(x, w) + b` on the CPU (f32).
struct CpuConvForward(CpuConv);

impl CpuConvForward {
    /// The gradient of the input.
    fn input_grad(
        &self,
        (h, wd): (usize, usize),
        w: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<Tensor> {
        g.contiguous()?
            .apply_op2_no_bwd(w, &CpuConvInputGrad(self.0, h, wd))
    }

    /// The gradients of whichever of the input, kernel and bias are being differentiated
    /// (the kernel's and bias's only when training them).
    #[allow(clippy::type_complexity)]
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = match x.track_op() {
            true => {
                let (_, _, h, wd) = x.dims4()?;
                Some(self.input_grad((h, wd), w, &g)?)
            }
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(
                x.detach()
                    .contiguous()?
                    .apply_op2_no_bwd(&g, &CpuConvWeightGrad(self.0))?,
            ),
            false => None,
        };
        let db = match b {
            Some(b) if b.track_op() => Some(channel_sums(&g, g.dim(1)?)?),
            _ => None,
        };
        Ok((dx, dw, db))
    }

    fn run(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = nchw(x.1)?;
        if s.c != self.0.c_in {
            candle_core::bail!(
                "conv2d: {} input channels, the kernel expects {}",
                s.c,
                self.0.c_in
            );
        }
        let bias = match b {
            Some((b, l)) => Some(f32_slice(b, l, "bias")?),
            None => None,
        };
        let out = self.0.forward(
            f32_slice(x.0, x.1, "input")?,
            s,
            f32_slice(w.0, w.1, "kernel")?,
            bias,
        );
        let (oh, ow) = self.0.out_hw(s.h, s.w);
        Ok((
            CpuStorage::F32(out),
            Shape::from((s.b, self.0.c_out, oh, ow)),
        ))
    }
}

impl candle_core::CustomOp2 for CpuConvForward {
    fn name(&self) -> &'static str {
        "cpu-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.grads(x, w, None, g)?;
        Ok((dx, dw))
    }
}

impl candle_core::CustomOp3 for CpuConvForward {
    fn name(&self) -> &'static str {
        "cpu-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), Some((s3, l3)))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.grads(x, w, Some(b), g)
    }
}

/// The input gradient of a [`CpuConvForward`] for an input of height and width `(.1, .2)`.
struct CpuConvInputGrad(CpuConv, usize, usize);

impl candle_core::CustomOp2 for CpuConvInputGrad {
    fn name(&self) -> &'static str {
        "cpu-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c_out, oh, ow) = l1.shape().dims4()?;
        let s = Nchw {
            b,
            c: self.0.c_in,
            h: self.1,
            w: self.2,
        };
        if c_out != self.0.c_out || self.0.out_hw(s.h, s.w) != (oh, ow) {
            candle_core::bail!(
                "conv2d backward: gradient of shape {:?} does not fit",
                l1.dims()
            );
        }
        let dx = self.0.input_grad(
            f32_slice(s1, l1, "gradient")?,
            s,
            f32_slice(s2, l2, "kernel")?,
        );
        Ok((CpuStorage::F32(dx), Shape::from((s.b, s.c, s.h, s.w))))
    }
}

/// The kernel gradient of a [`CpuConvForward`]: arguments the input and the output gradient.
struct CpuConvWeightGrad(CpuConv);

impl candle_core::CustomOp2 for CpuConvWeightGrad {
    fn name(&self) -> &'static str {
        "cpu-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = nchw(l1)?;
        let (b, c_out, oh, ow) = l2.shape().dims4()?;
        if b != s.b || c_out != self.0.c_out || self.0.out_hw(s.h, s.w) != (oh, ow) {
            candle_core::bail!(
                "conv2d kernel gradient: gradient of shape {:?} does not fit",
                l2.dims()
            );
        }
        let dw = self.0.weight_grad(
            f32_slice(s1, l1, "input")?,
            s,
            f32_slice(s2, l2, "gradient")?,
        );
        let k = self.0.k;
        Ok((
            CpuStorage::F32(dw),
            Shape::from((self.0.c_out, self.0.c_in, k, k)),
        ))
    }
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
fn statistics(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// Group normalization with frozen affine parameters.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f64,
    /// γ and β as host vectors when the weights are f32 on the CPU (the fast kernel).
    pub(crate) cpu_affine: Option<Arc<(Vec<f32>, Vec<f32>)>>,
}

/// Group normalization on the CPU in two passes (`crate::cpu_kernels::group_norm`).
/// With `silu`, the SiLU after the normalization in the same pass. One graph node whose
/// backward is the input gradient (`crate::cpu_kernels::group_norm_backward`).
#[derive(Clone)]
struct CpuGroupNorm {
    groups: usize,
    eps: f64,
    affine: Arc<(Vec<f32>, Vec<f32>)>,
    silu: bool,
}

fn channels_and_plane(l: &Layout) -> candle_core::Result<(usize, usize)> {
    let dims = l.shape().dims();
    if dims.len() < 2 {
        candle_core::bail!("group norm: input of shape {dims:?}");
    }
    Ok((dims[1], dims[2..].iter().product()))
}

impl CustomOp1 for CpuGroupNorm {
    fn name(&self) -> &'static str {
        "cpu-group-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (c, hw) = channels_and_plane(l)?;
        let x = f32_slice(s, l, "group norm input")?;
        let (gamma, beta) = &*self.affine;
        let out =
            crate::cpu_kernels::group_norm(x, c, hw, self.groups, gamma, beta, self.eps, self.silu);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = g.contiguous()?;
        Ok(Some(
            x.apply_op2_no_bwd(&g, &CpuGroupNormGrad(self.clone()))?,
        ))
    }
}

/// The input gradient of a [`CpuGroupNorm`]: arguments `x` and the output gradient.
struct CpuGroupNormGrad(CpuGroupNorm);

impl candle_core::CustomOp2 for CpuGroupNormGrad {
    fn name(&self) -> &'static str {
        "cpu-group-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (c, hw) = channels_and_plane(l1)?;
        if l1.dims() != l2.dims() {
            candle_core::bail!("group norm backward: gradient shape {:?}", l2.dims());
        }
        let (gamma, beta) = &*self.0.affine;
        let dx = crate::cpu_kernels::group_norm_backward(
            f32_slice(s1, l1, "group norm input")?,
            f32_slice(s2, l2, "group norm gradient")?,
            c,
            hw,
            self.0.groups,
            (gamma, beta),
            self.0.eps,
            self.0.silu,
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// [`CpuGroupNorm`] whose γ and β are arguments (variables being trained): its backward
/// also gives their gradients (`crate::cpu_kernels::group_norm_affine_grads`).
#[derive(Clone, Copy)]
struct CpuGroupNormTrain {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl candle_core::CustomOp3 for CpuGroupNormTrain {
    fn name(&self) -> &'static str {
        "cpu-group-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (c, hw) = channels_and_plane(l1)?;
        let (gamma, beta) = (f32_slice(s2, l2, "γ")?, f32_slice(s3, l3, "β")?);
        if gamma.len() != c || beta.len() != c {
            candle_core::bail!(
                "group norm: {c} channels, γ/β of {}/{}",
                gamma.len(),
                beta.len()
            );
        }
        let x = f32_slice(s1, l1, "group norm input")?;
        let out =
            crate::cpu_kernels::group_norm(x, c, hw, self.groups, gamma, beta, self.eps, self.silu);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let affine = Arc::new((w.detach().to_vec1::<f32>()?, b.detach().to_vec1::<f32>()?));
        let op = CpuGroupNorm {
            groups: self.groups,
            eps: self.eps,
            affine: affine.clone(),
            silu: self.silu,
        };
        let dx = match x.track_op() {
            true => Some(x.detach().apply_op2_no_bwd(&g, &CpuGroupNormGrad(op))?),
            false => None,
        };
        let c = x.dim(1)?;
        let hw = x.elem_count() / (x.dim(0)? * c).max(1);
        let (dg, db) = crate::cpu_kernels::group_norm_affine_grads(
            &host_f32(x)?,
            &host_f32(&g)?,
            c,
            hw,
            self.groups,
            (&affine.0, &affine.1),
            self.eps,
            self.silu,
        );
        Ok((
            dx,
            Some(Tensor::from_vec(dg, c, x.device())?),
            Some(Tensor::from_vec(db, c, x.device())?),
        ))
    }
}

/// Per-channel sums of a contiguous `[outer, c, inner…]` f32 tensor (a bias's gradient).
fn channel_sums(g: &Tensor, c: usize) -> candle_core::Result<Tensor> {
    let v = host_f32(g)?;
    let inner = (v.len() / (g.dim(0)? * c).max(1)).max(1);
    let mut out = vec![0f64; c];
    for (k, chunk) in v.chunks(inner).enumerate() {
        out[k % c] += chunk.iter().map(|x| *x as f64).sum::<f64>();
    }
    let out: Vec<f32> = out.into_iter().map(|x| x as f32).collect();
    Tensor::from_vec(out, c, g.device())
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
        // trained weights change under the optimizer: no host copy of them
        let cpu_affine = if weight.device().is_cpu()
            && !weight.is_variable()
            && weight.dtype() == DType::F32
            && weight.dims() == [channels]
            && vb.store().recorded().is_empty()
        {
            match (weight.to_vec1::<f32>(), bias.to_vec1::<f32>()) {
                (Ok(w), Ok(b)) => Some(Arc::new((w, b))),
                _ => None,
            }
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
            cpu_affine,
        })
    }

    /// `(x − μ)/σ` per group, `[B, G, n]` in f32 (f64 for f64 inputs), and `1/σ` `[B, G, 1]`.
    fn normalized(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let b = x.dim(0)?;
        let n = x.elem_count() / (b * self.groups);
        let xs = x
            .reshape((b, self.groups, n))?
            .to_dtype(statistics(x.dtype()))?;
        let mean = (xs.sum_keepdim(2)? / n as f64)?;
        let xs = xs.broadcast_sub(&mean)?;
        let var = (xs.sqr()?.sum_keepdim(2)? / n as f64)?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        Ok((xs.broadcast_mul(&rstd)?, rstd))
    }

    fn channel_shape(&self, dims: &[usize]) -> Vec<usize> {
        let mut wd = vec![1usize; dims.len()];
        wd[1] = dims[1];
        wd
    }

    /// The CPU kernel, when the affine parameters and `x` are f32 on the CPU.
    fn cpu_op(&self, x: &Tensor, silu: bool) -> Option<CpuGroupNorm> {
        match (&self.cpu_affine, x.dtype(), x.device().is_cpu()) {
            (Some(affine), DType::F32, true) => Some(CpuGroupNorm {
                groups: self.groups,
                eps: self.eps,
                affine: affine.clone(),
                silu,
            }),
            _ => None,
        }
    }

    /// The CPU kernel with γ and β as graph inputs (training them).
    fn train_op(&self, x: &Tensor, silu: bool) -> Option<CpuGroupNormTrain> {
        (self.weight.is_variable()
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32)
            .then_some(CpuGroupNormTrain {
                groups: self.groups,
                eps: self.eps,
                silu,
            })
    }

    fn apply_train(&self, x: &Tensor, op: CpuGroupNormTrain) -> Result<Tensor> {
        Ok(x.contiguous()?
            .apply_op3(&self.weight.contiguous()?, &self.bias.contiguous()?, op)?)
    }

    /// `silu(group_norm(x))`, fused on the CPU (the pre-activation of every residual block).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(op) = self.train_op(x, true) {
            return self.apply_train(x, op);
        }
        match self.cpu_op(x, true) {
            Some(op) => Ok(x.contiguous()?.apply_op1(op)?),
            None => Ok(self.forward(x)?.silu()?),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(op) = self.train_op(x, false) {
            return self.apply_train(x, op);
        }
        if let Some(op) = self.cpu_op(x, false) {
            return Ok(x.contiguous()?.apply_op1(op)?);
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

    /// The gradient of the input `x` of `group_norm(x)` (with `silu`, of
    /// `silu(group_norm(x))`) given the gradient `g` of the output, computed in f32 (f64 for f64 inputs):
    /// `dx = (1/σ)(ĝ − mean(ĝ) − x̂·mean(ĝ x̂))` per group, with `ĝ = g·γ`.
    pub(crate) fn input_grad(
        &self,
        x: &Tensor,
        g: &Tensor,
        silu: bool,
    ) -> candle_core::Result<Tensor> {
        self.input_grad_saved(&self.normalized(x)?, g, silu)
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
    /// needs: the input for the CPU kernel, `(x̂, 1/σ)` for the tensor formula.
    pub(crate) fn forward_recording(
        &self,
        x: &Tensor,
        silu: bool,
    ) -> candle_core::Result<(Tensor, NormRecord)> {
        match self.cpu_op(x, silu).filter(|_| !x.track_op()) {
            Some(op) => {
                let x = x.contiguous()?;
                Ok((x.apply_op1_no_bwd(&op)?, NormRecord::Input(x)))
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
            NormRecord::Input(x) => match self.cpu_op(x, silu) {
                Some(op) => x.apply_op2_no_bwd(&g.contiguous()?, &CpuGroupNormGrad(op)),
                None => self.input_grad(x, g, silu),
            },
            NormRecord::Normalized(xn, rstd) => {
                self.input_grad_saved(&(xn.clone(), rstd.clone()), g, silu)
            }
        }
    }

    /// [`Self::input_grad`] from the forward pass's `(x̂, 1/σ)`.
    pub(crate) fn input_grad_saved(
        &self,
        (xn, rstd): &(Tensor, Tensor),
        g: &Tensor,
        silu: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, groups, n) = xn.dims3()?;
        let wd = self.channel_shape(g.dims());
        let gamma = self.weight.to_dtype(xn.dtype())?.reshape(wd.clone())?;
        let mut gf = g.to_dtype(xn.dtype())?;
        if silu {
            // d silu(y)/dy = σ(y)(1 + y(1 − σ(y))), y = x̂γ + β
            let y = xn
                .reshape(g.dims())?
                .broadcast_mul(&gamma)?
                .broadcast_add(&self.bias.to_dtype(xn.dtype())?.reshape(wd)?)?;
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
}

/// What a group norm keeps for its input gradient ([`GroupNorm::forward_recording`]).
pub(crate) enum NormRecord {
    /// The input, for the CPU kernel (which recomputes the statistics in one pass).
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

    /// The gradient of the input `x` given the gradient `g` of the output, computed in f32 (f64 for f64 inputs):
    /// `dx = (1/σ)(ĝ − mean(ĝ) − x̂·mean(ĝ x̂))`, `ĝ = g·γ`.
    pub(crate) fn input_grad(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
        let host = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op();
        if host(x) && host(g) && self.weight.dtype() == DType::F32 {
            let d = x.dim(D::Minus1)?;
            let dx = crate::cpu_kernels::layer_norm_backward(
                &host_f32(x)?,
                &host_f32(g)?,
                d,
                &self.weight.to_vec1::<f32>()?,
                self.eps,
            );
            return Tensor::from_vec(dx, x.dims(), x.device());
        }
        let xf = x.to_dtype(statistics(x.dtype()))?;
        let n = xf.dim(D::Minus1)? as f64;
        let mean = (xf.sum_keepdim(D::Minus1)? / n)?;
        let xc = xf.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / n)?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        let xn = xc.broadcast_mul(&rstd)?;
        let gg = g
            .to_dtype(xf.dtype())?
            .broadcast_mul(&self.weight.to_dtype(xf.dtype())?)?;
        let m1 = (gg.sum_keepdim(D::Minus1)? / n)?;
        let m2 = ((&gg * &xn)?.sum_keepdim(D::Minus1)? / n)?;
        let dx = gg
            .broadcast_sub(&m1)?
            .sub(&xn.broadcast_mul(&m2)?)?
            .broadcast_mul(&rstd)?;
        dx.to_dtype(g.dtype())
    }
}

/// Layer normalization on the CPU (f32): arguments `x`, γ, β; one graph node whose
/// backward is the input gradient (`crate::cpu_kernels::layer_norm_backward`).
struct CpuLayerNorm(f64);

impl candle_core::CustomOp3 for CpuLayerNorm {
    fn name(&self) -> &'static str {
        "cpu-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = l1.dims().last().copied().unwrap_or(1);
        let (gamma, beta) = (f32_slice(s2, l2, "γ")?, f32_slice(s3, l3, "β")?);
        if gamma.len() != d || beta.len() != d {
            candle_core::bail!(
                "layer norm: width {d}, γ/β of {}/{}",
                gamma.len(),
                beta.len()
            );
        }
        let out =
            crate::cpu_kernels::layer_norm(f32_slice(s1, l1, "input")?, d, gamma, beta, self.0);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)?;
        let dx = match x.track_op() {
            true => {
                let dx = crate::cpu_kernels::layer_norm_backward(
                    &host_f32(x)?,
                    &host_f32(g)?,
                    d,
                    &w.detach().to_vec1::<f32>()?,
                    self.0,
                );
                Some(Tensor::from_vec(dx, x.dims(), x.device())?)
            }
            false => None,
        };
        // γ and β (when training them): Σ g·x̂ and Σ g over every row
        let rows = x.elem_count() / d.max(1);
        let g2 = g.reshape((rows, d))?;
        let dw = match w.track_op() {
            true => {
                let x2 = x.detach().reshape((rows, d))?;
                let xc = x2.broadcast_sub(&x2.mean_keepdim(1)?)?;
                let rstd = (xc.sqr()?.mean_keepdim(1)? + self.0)?.sqrt()?.recip()?;
                Some((g2.clone() * xc.broadcast_mul(&rstd)?)?.sum(0)?)
            }
            false => None,
        };
        let db = match b.track_op() {
            true => Some(g2.sum(0)?),
            false => None,
        };
        Ok((dx, dw, db))
    }
}

/// Softmax over the last dimension; differentiable (candle's fused kernel is not).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    scaled_softmax_last_dim(x, 1.0)
}

/// `softmax(scale · x)` over the last dimension in place (CPU, f32).
struct CpuScaledSoftmax(f32);

impl CustomOp1 for CpuScaledSoftmax {
    fn name(&self) -> &'static str {
        "cpu-scaled-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = *l.shape().dims().last().unwrap_or(&1);
        let mut v = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, e))) => v[a..e].to_vec(),
            _ => candle_core::bail!("cpu-scaled-softmax: f32 contiguous input expected"),
        };
        crate::cpu_kernels::softmax_rows(&mut v, n, self.0);
        Ok((CpuStorage::F32(v), l.shape().clone()))
    }
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
