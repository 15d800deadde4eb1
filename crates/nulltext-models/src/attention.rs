//! Attention in the UNet (diffusers `Attention`, `BasicTransformerBlock`,
//! `Transformer2DModel`), with the attention-control hook at every site.

use candle_core::{DType, Tensor};

use crate::control::{AttentionCall, AttentionControl, AttentionKind, AttentionSite, Place};
use crate::cpu_attention::AttnDims;
use crate::error::Result;
use crate::nn::{f32_slice, host_f32, Conv2d, GroupNorm, LayerNorm, Linear};
use crate::weights::Vb;

/// `softmax(q kᵀ · scale) v` for `[B, heads, L, d]` inputs, never handing out the
/// probabilities. This is the path every layer takes when no controller asks for them.
///
/// On the CPU in f32 it is one fused kernel (`crate::cpu_attention`): blocks of queries
/// whose scores stay in cache, and a backward pass that recomputes each block's
/// probabilities instead of keeping them (flash-attention style), so memory stays bounded
/// during null-text optimization (SD's full-resolution self-attention at 512 px has
/// 8 × 4096 × 4096 scores).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let cpu_f32 = [q, k, v]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() == 4);
    if cpu_f32 {
        return Ok(q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            CpuFusedAttention {
                scale: scale as f32,
                lse: std::sync::Mutex::new(None),
            },
        )?);
    }
    let probs = attention_probs(q, k, scale)?;
    Ok(probs.matmul(v)?)
}

/// [`attention`] on the CPU: forward and backward by `crate::cpu_attention`. The forward
/// keeps each query's log-sum-exp (`B·heads·Lq` values) for the backward.
struct CpuFusedAttention {
    scale: f32,
    lse: std::sync::Mutex<Option<Vec<f32>>>,
}

fn attn_dims(q: &[usize], k: &[usize], v: &[usize]) -> candle_core::Result<AttnDims> {
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
        let (out, lse) = crate::cpu_attention::forward(
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
        let (dq, dk, dv) = crate::cpu_attention::backward(
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(seed: u64, shape: (usize, usize, usize, usize)) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The fused CPU attention equals the plain one (candle's ops and autograd), forward
    /// and backward, through the graph.
    #[test]
    fn fused_attention_matches_plain() {
        let (q, k, v) = (
            rand(1, (2, 3, 50, 8)),
            rand(2, (2, 3, 40, 8)),
            rand(3, (2, 3, 40, 8)),
        );
        let w = rand(4, (2, 3, 50, 8));
        let grads = |fused: bool| {
            let (qv, kv, vv) = (
                Var::from_tensor(&q).unwrap(),
                Var::from_tensor(&k).unwrap(),
                Var::from_tensor(&v).unwrap(),
            );
            let out = if fused {
                attention(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), 0.35).unwrap()
            } else {
                let scores = qv.as_tensor().matmul(&kv.as_tensor().t().unwrap()).unwrap();
                // candle's own differentiable ops: exp / sum
                let s = (scores * 0.35).unwrap();
                let s = s
                    .broadcast_sub(&s.max_keepdim(candle_core::D::Minus1).unwrap())
                    .unwrap()
                    .exp()
                    .unwrap();
                let p = s
                    .broadcast_div(&s.sum_keepdim(candle_core::D::Minus1).unwrap())
                    .unwrap();
                p.matmul(vv.as_tensor()).unwrap()
            };
            let loss = (&out * &w).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            [
                out,
                g.get(qv.as_tensor()).unwrap().clone(),
                g.get(kv.as_tensor()).unwrap().clone(),
                g.get(vv.as_tensor()).unwrap().clone(),
            ]
        };
        let (a, b) = (grads(false), grads(true));
        for (x, y) in a.iter().zip(&b) {
            let e: f32 = (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(e < 1e-5, "{e}");
        }
    }
}

/// `softmax(q kᵀ · scale)` over the keys: `[B, heads, Lq, Lk]`.
pub fn attention_probs(q: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = q.matmul(&k.t()?)?;
    crate::nn::scaled_softmax_last_dim(&scores, scale)
}

/// Multi-head attention, self or cross, as diffusers' `Attention` with the default processor.
pub struct Attention {
    pub(crate) to_q: Linear,
    pub(crate) to_k: Linear,
    pub(crate) to_v: Linear,
    pub(crate) to_out: Linear,
    pub(crate) heads: usize,
    pub(crate) scale: f64,
    pub(crate) upcast: bool,
    pub site: AttentionSite,
}

impl Attention {
    pub fn load(
        vb: &Vb,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        dim_head: usize,
        upcast: bool,
        site: AttentionSite,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        Ok(Self {
            to_q: Linear::load(&vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::load(&vb.pp("to_k"), context_dim, inner, false)?,
            to_v: Linear::load(&vb.pp("to_v"), context_dim, inner, false)?,
            to_out: Linear::load(&vb.pp("to_out.0"), inner, query_dim, true)?,
            heads,
            scale: (dim_head as f64).powf(-0.5),
            upcast,
            site,
        })
    }

    /// `x`: `[B, H·W, C]` on an `height`×`width` grid; `context`: `[B, 77, D]` for
    /// cross-attention, `None` for self-attention.
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        height: usize,
        width: usize,
        control: &mut dyn AttentionControl,
        step: usize,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let ctx = context.unwrap_or(x);
        let split = |t: Tensor| -> Result<Tensor> {
            let (b, l, inner) = t.dims3()?;
            // (B, L, heads·d) -> (B, heads, L, d)
            Ok(t.reshape((b, l, self.heads, inner / self.heads))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.to_q.forward(x)?)?;
        let k = split(self.to_k.forward(ctx)?)?;
        let v = split(self.to_v.forward(ctx)?)?;
        let dtype = q.dtype();
        let (q, k) = if self.upcast && dtype != DType::F32 {
            (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
        } else {
            (q, k)
        };
        let call = AttentionCall {
            site: &self.site,
            height,
            width,
            step,
        };
        let out = if control.wants(&call) {
            let probs = attention_probs(&q, &k, self.scale)?.to_dtype(dtype)?;
            let probs = control.edit(&call, probs)?;
            probs.matmul(&v)?
        } else if self.upcast && dtype != DType::F32 {
            attention_probs(&q, &k, self.scale)?
                .to_dtype(dtype)?
                .matmul(&v)?
        } else {
            attention(&q, &k, &v, self.scale)?
        };
        // (B, heads, L, d) -> (B, L, heads·d)
        let out = out.transpose(1, 2)?.reshape((b, l, ()))?;
        self.to_out.forward(&out)
    }
}

/// GEGLU feed-forward: `Linear(dim, 2·inner)` → `h · gelu(gate)` → `Linear(inner, dim)`.
pub(crate) struct FeedForward {
    pub(crate) proj: Linear,
    pub(crate) out: Linear,
}

impl FeedForward {
    fn load(vb: &Vb, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: Linear::load(&vb.pp("net.0.proj"), dim, inner * 2, true)?,
            out: Linear::load(&vb.pp("net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(x)?;
        if h.device().is_cpu() && h.dtype() == DType::F32 {
            return self.out.forward(&h.contiguous()?.apply_op1(CpuGeglu)?);
        }
        let half = h.dim(candle_core::D::Minus1)? / 2;
        let (hidden, gate) = (h.narrow(2, 0, half)?, h.narrow(2, half, half)?);
        self.out.forward(&(hidden * gate.gelu_erf()?)?)
    }
}

/// `a · gelu(b)` for `h = [a | b]` on the CPU (f32), one pass each way
/// (`crate::cpu_kernels::geglu`).
struct CpuGeglu;

impl candle_core::CustomOp1 for CpuGeglu {
    fn name(&self) -> &'static str {
        "cpu-geglu"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let mut dims = l.dims().to_vec();
        let width = dims.last().copied().unwrap_or(0);
        if width % 2 != 0 {
            candle_core::bail!("geglu: odd width {width}");
        }
        let out = crate::cpu_kernels::geglu(f32_slice(s, l, "attention input")?, width / 2);
        *dims.last_mut().unwrap() = width / 2;
        Ok((candle_core::CpuStorage::F32(out), dims.into()))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let inner = g.dim(candle_core::D::Minus1)?;
        let dh = crate::cpu_kernels::geglu_backward(&host_f32(h)?, &host_f32(g)?, inner);
        Ok(Some(Tensor::from_vec(dh, h.dims(), h.device())?))
    }
}

/// Self-attention, cross-attention and feed-forward, each with a pre-norm and a residual.
pub struct BasicTransformerBlock {
    pub(crate) norm1: LayerNorm,
    pub(crate) attn1: Attention,
    pub(crate) norm2: LayerNorm,
    pub(crate) attn2: Attention,
    pub(crate) norm3: LayerNorm,
    pub(crate) ff: FeedForward,
}

/// Where a `Transformer2DModel` sits: place, block and index within the block.
#[derive(Debug, Clone, Copy)]
pub struct TransformerPlace {
    pub place: Place,
    pub block: usize,
    pub transformer: usize,
}

impl BasicTransformerBlock {
    #[allow(clippy::too_many_arguments)]
    fn load(
        vb: &Vb,
        dim: usize,
        heads: usize,
        dim_head: usize,
        context_dim: usize,
        upcast: bool,
        at: TransformerPlace,
        layer: usize,
        next_index: &mut usize,
    ) -> Result<Self> {
        let mut site = |kind: AttentionKind, name: &str| {
            let s = AttentionSite {
                place: at.place,
                block: at.block,
                transformer: at.transformer,
                layer,
                kind,
                index: *next_index,
                path: vb.pp(name).prefix().to_string(),
            };
            *next_index += 1;
            s
        };
        let s1 = site(AttentionKind::SelfAttention, "attn1");
        let s2 = site(AttentionKind::CrossAttention, "attn2");
        Ok(Self {
            norm1: LayerNorm::load(&vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&vb.pp("attn1"), dim, dim, heads, dim_head, upcast, s1)?,
            norm2: LayerNorm::load(&vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(
                &vb.pp("attn2"),
                dim,
                context_dim,
                heads,
                dim_head,
                upcast,
                s2,
            )?,
            norm3: LayerNorm::load(&vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(&vb.pp("ff"), dim)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        height: usize,
        width: usize,
        control: &mut dyn AttentionControl,
        step: usize,
    ) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let x = (self.attn1.forward(&h, None, height, width, control, step)? + x)?;
        let h = self.norm2.forward(&x)?;
        let x = (self
            .attn2
            .forward(&h, Some(context), height, width, control, step)?
            + x)?;
        let h = self.norm3.forward(&x)?;
        Ok((self.ff.forward(&h)? + x)?)
    }

    pub fn sites(&self) -> [&AttentionSite; 2] {
        [&self.attn1.site, &self.attn2.site]
    }
}

pub(crate) enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel` for continuous inputs: norm, project in, transformer blocks,
/// project out, residual.
pub struct Transformer2DModel {
    pub(crate) norm: GroupNorm,
    pub(crate) proj_in: Projection,
    pub(crate) blocks: Vec<BasicTransformerBlock>,
    pub(crate) proj_out: Projection,
}

/// Shape parameters of a `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct TransformerShape {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
    pub upcast: bool,
}

impl Transformer2DModel {
    pub fn load(
        vb: &Vb,
        s: TransformerShape,
        at: TransformerPlace,
        next_index: &mut usize,
    ) -> Result<Self> {
        let c = s.channels;
        if s.heads == 0 || !c.is_multiple_of(s.heads) {
            return Err(crate::Error::Unsupported(format!(
                "{}: {c} channels do not divide into {} heads",
                vb.prefix(),
                s.heads
            )));
        }
        let dim_head = c / s.heads;
        let proj = |name: &str| -> Result<Projection> {
            Ok(if s.linear_projection {
                Projection::Linear(Linear::load_maybe_conv(&vb.pp(name), c, c)?)
            } else {
                Projection::Conv(Conv2d::load(&vb.pp(name), c, c, 1, 1, 0)?)
            })
        };
        let blocks = (0..s.layers)
            .map(|i| {
                BasicTransformerBlock::load(
                    &vb.pp(format!("transformer_blocks.{i}")),
                    c,
                    s.heads,
                    dim_head,
                    s.context_dim,
                    s.upcast,
                    at,
                    i,
                    next_index,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::load(&vb.pp("norm"), s.groups, c, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        control: &mut dyn AttentionControl,
        step: usize,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let residual = x;
        let x = self.norm.forward(x)?;
        // (B, C, H, W) -> (B, H·W, C)
        let to_seq =
            |t: Tensor| -> Result<Tensor> { Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, ()))?) };
        let mut x = match &self.proj_in {
            Projection::Conv(p) => to_seq(p.forward(&x)?)?,
            Projection::Linear(p) => p.forward(&to_seq(x)?)?,
        };
        for block in &self.blocks {
            x = block.forward(&x, context, h, w, control, step)?;
        }
        // (B, H·W, C) -> (B, C, H, W)
        let to_img = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, h, w, c))?
                .permute((0, 3, 1, 2))?
                .contiguous()?)
        };
        let x = match &self.proj_out {
            Projection::Conv(p) => p.forward(&to_img(x)?)?,
            Projection::Linear(p) => to_img(p.forward(&x)?)?,
        };
        Ok((x + residual)?)
    }

    pub fn sites(&self) -> impl Iterator<Item = &AttentionSite> {
        self.blocks.iter().flat_map(|b| b.sites())
    }
}
