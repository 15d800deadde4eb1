//! candle custom ops over nulltext's CPU kernels (f32): the layers' forward passes as
//! single graph nodes whose backward passes are the kernels' input gradients (and, when
//! training, the weights' gradients).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, D};

use super::attention::AttnDims;
use super::conv::{CpuConv, Nchw};

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
    crate::cpu::conv::matmul(
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
    crate::cpu::conv::matmul(
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
pub(crate) struct CpuLinear;

impl CpuLinear {
    /// `g W` `[rows, in]`.
    pub(crate) fn input_grad(w: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
        g.contiguous()?.apply_op2_no_bwd(w, &CpuLinearInputGrad)
    }
}

impl BiasedKernel for CpuLinear {
    const NAME: &'static str = "cpu-linear";

    fn run(&self, x: Arg, w: Arg, b: Option<Arg>) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, in_dim) = x.1.shape().dims2()?;
        let (out_dim, w_in) = w.1.shape().dims2()?;
        if in_dim != w_in {
            candle_core::bail!("linear: input width {in_dim}, weight expects {w_in}");
        }
        let bias = b.map(|(b, l)| f32_slice(b, l, "bias")).transpose()?;
        if let Some(bias) = bias.filter(|b| b.len() != out_dim) {
            candle_core::bail!("linear: bias of {} for {out_dim} outputs", bias.len());
        }
        let y = linear_f32(
            f32_slice(x.0, x.1, "input")?,
            rows,
            f32_slice(w.0, w.1, "weight")?,
            out_dim,
            bias,
        );
        Ok((CpuStorage::F32(y), Shape::from((rows, out_dim))))
    }

    fn dx(&self, _x: &Tensor, w: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
        Self::input_grad(w, g)
    }

    fn dw(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
        g.t()?.matmul(&x.detach().contiguous()?)
    }
}

/// `g W` for a [`CpuLinear`]: `g` `[rows, out]`, `W` `[out, in]`.
pub(crate) struct CpuLinearInputGrad;

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

/// A storage and its layout, as candle hands them to a custom op.
type Arg<'a> = (&'a CpuStorage, &'a Layout);

/// A kernel `f(x, W) (+ b)` with an optional bias ([`CpuLinear`], [`CpuConvForward`]): one
/// graph node of two arguments or three ([`Biased`]), whose backward gives the gradients of
/// whichever of `x`, `W` and `b` are being differentiated (the weights' only when training
/// them).
pub(crate) trait BiasedKernel {
    const NAME: &'static str;

    fn run(&self, x: Arg, w: Arg, b: Option<Arg>) -> candle_core::Result<(CpuStorage, Shape)>;

    /// The input gradient for the output gradient `g` (contiguous).
    fn dx(&self, x: &Tensor, w: &Tensor, g: &Tensor) -> candle_core::Result<Tensor>;

    /// The weight gradient for the output gradient `g` (contiguous).
    fn dw(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor>;
}

/// A [`BiasedKernel`] as a candle custom op: `CustomOp2` without a bias, `CustomOp3` with.
pub(crate) struct Biased<K>(pub(crate) K);

impl<K: BiasedKernel> Biased<K> {
    #[allow(clippy::type_complexity)]
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = x.track_op().then(|| self.0.dx(x, w, &g)).transpose()?;
        let dw = w.track_op().then(|| self.0.dw(x, &g)).transpose()?;
        let db = match b {
            Some(b) if b.track_op() => Some(channel_sums(&g, g.dim(1)?)?),
            _ => None,
        };
        Ok((dx, dw, db))
    }
}

impl<K: BiasedKernel + Send + Sync> candle_core::CustomOp2 for Biased<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.0.run((s1, l1), (s2, l2), None)
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

impl<K: BiasedKernel + Send + Sync> candle_core::CustomOp3 for Biased<K> {
    fn name(&self) -> &'static str {
        K::NAME
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
        self.0.run((s1, l1), (s2, l2), Some((s3, l3)))
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

pub(crate) fn nchw(l: &Layout) -> candle_core::Result<Nchw> {
    let (b, c, h, w) = l.shape().dims4()?;
    Ok(Nchw { b, c, h, w })
}

/// `conv2d(x, w) + b` on the CPU (f32).
pub(crate) struct CpuConvForward(pub(crate) CpuConv);

impl CpuConvForward {
    /// The gradient of the input.
    pub(crate) fn input_grad(
        &self,
        (h, wd): (usize, usize),
        w: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<Tensor> {
        g.contiguous()?
            .apply_op2_no_bwd(w, &CpuConvInputGrad(self.0, h, wd))
    }
}

impl BiasedKernel for CpuConvForward {
    const NAME: &'static str = "cpu-conv2d";

    fn run(&self, x: Arg, w: Arg, b: Option<Arg>) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = nchw(x.1)?;
        if s.c != self.0.c_in {
            candle_core::bail!(
                "conv2d: {} input channels, the kernel expects {}",
                s.c,
                self.0.c_in
            );
        }
        let bias = b.map(|(b, l)| f32_slice(b, l, "bias")).transpose()?;
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

    fn dx(&self, x: &Tensor, w: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, wd) = x.dims4()?;
        self.input_grad((h, wd), w, g)
    }

    fn dw(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
        x.detach()
            .contiguous()?
            .apply_op2_no_bwd(g, &CpuConvWeightGrad(self.0))
    }
}

/// The input gradient of a [`CpuConvForward`] for an input of height and width `(.1, .2)`.
pub(crate) struct CpuConvInputGrad(pub(crate) CpuConv, pub(crate) usize, pub(crate) usize);

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
pub(crate) struct CpuConvWeightGrad(pub(crate) CpuConv);

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

/// Per-channel sums of a contiguous `[outer, c, inner…]` f32 tensor (a bias's gradient).
pub(crate) fn channel_sums(g: &Tensor, c: usize) -> candle_core::Result<Tensor> {
    let v = host_f32(g)?;
    let inner = (v.len() / (g.dim(0)? * c).max(1)).max(1);
    let mut out = vec![0f64; c];
    for (k, chunk) in v.chunks(inner).enumerate() {
        out[k % c] += chunk.iter().map(|x| *x as f64).sum::<f64>();
    }
    let out: Vec<f32> = out.into_iter().map(|x| x as f32).collect();
    Tensor::from_vec(out, c, g.device())
}

/// Layer normalization on the CPU (f32): arguments `x`, γ, β; one graph node whose
/// backward is the input gradient (`crate::cpu::kernels::layer_norm_backward`).
pub(crate) struct CpuLayerNorm(pub(crate) f64);

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
            crate::cpu::kernels::layer_norm(f32_slice(s1, l1, "input")?, d, gamma, beta, self.0);
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
                let dx = crate::cpu::kernels::layer_norm_backward(
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

/// `softmax(scale · x)` over the last dimension in place (CPU, f32).
pub(crate) struct CpuScaledSoftmax(pub(crate) f32);

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
        crate::cpu::kernels::softmax_rows(&mut v, n, self.0);
        Ok((CpuStorage::F32(v), l.shape().clone()))
    }
}

/// [`attention`] on the CPU: forward and backward by `crate::cpu::attention`. The forward
/// keeps each query's log-sum-exp (`B·heads·Lq` values) for the backward.
pub(crate) struct CpuFusedAttention {
    pub(crate) scale: f32,
    pub(crate) lse: std::sync::Mutex<Option<Vec<f32>>>,
}

pub(crate) fn attn_dims(q: &[usize], k: &[usize], v: &[usize]) -> candle_core::Result<AttnDims> {
    match (q, k, v) {
        ([b, h, lq, d], [kb, kh, lk, kd], [vb, vh, vl, dv])
            if b == kb && b == vb && h == kh && h == vh && d == kd && lk == vl =>
        {
            Ok(AttnDims {
                bh: b * h,
                lq: *lq,
                lk: *lk,
                d: *d,
                dv: *dv,
            })
        }
        _ => candle_core::bail!("attention: q {q:?}, k {k:?}, v {v:?} do not fit"),
    }
}

impl candle_core::CustomOp3 for CpuFusedAttention {
    fn name(&self) -> &'static str {
        "cpu-fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let n = attn_dims(l1.dims(), l2.dims(), l3.dims())?;
        let (out, lse) = crate::cpu::attention::forward(
            f32_slice(s1, l1, "attention input")?,
            f32_slice(s2, l2, "attention input")?,
            f32_slice(s3, l3, "attention input")?,
            n,
            self.scale,
        );
        *self.lse.lock().unwrap() = Some(lse);
        let mut shape = l1.dims().to_vec();
        shape[3] = n.dv;
        Ok((candle_core::CpuStorage::F32(out), shape.into()))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = attn_dims(q.dims(), k.dims(), v.dims())?;
        let lse = self.lse.lock().unwrap();
        let Some(lse) = lse.as_ref() else {
            candle_core::bail!("attention backward before its forward");
        };
        let (dq, dk, dv) = crate::cpu::attention::backward(
            &host_f32(q)?,
            &host_f32(k)?,
            &host_f32(v)?,
            &host_f32(res)?,
            lse,
            &host_f32(g)?,
            n,
            self.scale,
        );
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.dims(), dev)?),
            Some(Tensor::from_vec(dk, k.dims(), dev)?),
            Some(Tensor::from_vec(dv, v.dims(), dev)?),
        ))
    }
}
