//! The context tape with candle's tensor ops: the inner loop of null-text inversion on GPUs
//! and in half precision.
//!
//! The same structure as the CPU tape (`super::tape`): the context-free prefix (input
//! convolution, first residual block, first self-attention and the first cross-attention's
//! queries) is computed once per tape, and the backward pass walks from the output to the
//! context, keeping per layer only what its input gradient needs. It runs the layers' own
//! forward ops (the forward values are those of the graph path) and their input-gradient
//! formulas (`Conv2d::input_grad`, `GroupNorm::input_grad`, …), but without candle's
//! autograd: no copy of every attached value in the forward pass, no zero-filled gradient
//! and accumulating add per graph node in the backward pass, and no backward through
//! reshapes and layout copies. On a GPU, where every op costs a kernel launch and its
//! host-side bookkeeping, that is most of a null-text iteration.
//!
//! Attention keeps its probabilities (`[B, heads, Lq, Lk]` per layer, in the weights'
//! dtype; in f32 for models that upcast attention), as the graph path does.

use candle_core::{DType, Tensor, D};

use super::tape::Constants;
use super::{DownBlock, MidBlock, UNet2DConditionModel, UpBlock};
use crate::attention::{
    attention_probs, Attention, BasicTransformerBlock, Projection, Transformer2DModel,
};
use crate::embeddings::timestep_embedding;
use crate::error::{Error, Result};
use crate::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};

/// What one attention layer keeps: queries, keys, values `[B, heads, L, d]`, the
/// probabilities and the output before its projection.
struct AttnRecord {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    p: Tensor,
    o: Tensor,
    /// Whether the queries depend on the context (their gradient is needed).
    query_varies: bool,
}

struct BlockRecord {
    /// Inputs of the three layer norms (`None` where the block's input is a constant).
    x0: Option<Tensor>,
    attn1: Option<AttnRecord>,
    x1: Option<Tensor>,
    attn2: AttnRecord,
    x2: Tensor,
    /// The feed-forward's projection (the GEGLU's input).
    ff: Tensor,
}

/// A group norm's `(x̂, 1/σ)` (`GroupNorm::forward_saving`).
type Norm = (Tensor, Tensor);

struct ResnetRecord {
    /// The norms of the block's input and of its first convolution's output.
    norm1: Norm,
    norm2: Norm,
    /// The sizes of the input and of the first convolution's output.
    in_hw: (usize, usize),
    mid_hw: (usize, usize),
}

enum Record {
    Resnet(ResnetRecord),
    /// A transformer's input norm (`None` when the input is a constant) and its blocks.
    Transformer(Option<Norm>, Vec<BlockRecord>),
    /// A downsampler's input size.
    Down((usize, usize)),
    /// An upsampler's input size and output size.
    Up((usize, usize)),
    /// An up block's concatenation: the channels of its first part.
    Cat(usize),
    /// The output norm and its input's size.
    Out(Norm, (usize, usize)),
}

/// An activation and whether it depends on the context.
struct Act {
    x: Tensor,
    varies: bool,
}

struct Pass<'t> {
    records: Vec<Record>,
    keep: bool,
    consts: &'t mut Constants<Tensor>,
    temb: &'t [Tensor],
    next_temb: usize,
    context: &'t Tensor,
}

/// The UNet at one latent and timestep, differentiated with respect to its context with
/// tensor ops (any device, any dtype).
pub(crate) struct TensorTape<'a> {
    unet: &'a UNet2DConditionModel,
    latent: Tensor,
    /// `time_emb_proj(silu(temb))` of every residual block, in call order, `[B, C, 1, 1]`.
    temb: Vec<Tensor>,
    consts: Constants<Tensor>,
    records: Option<Vec<Record>>,
    /// The context's dtype, for its gradient.
    context_dtype: DType,
}

impl<'a> TensorTape<'a> {
    /// `None` where the structure is not supported (a residual block without time
    /// embedding, a VAE-style padded downsampler, latents that do not halve evenly).
    pub(crate) fn new(
        unet: &'a UNet2DConditionModel,
        x: &Tensor,
        timestep: f64,
    ) -> Result<Option<Self>> {
        let (b, c, h, w) = x.dims4()?;
        if c != unet.config.in_channels {
            return Err(Error::Msg(format!(
                "UNet expects {} latent channels, got {c}",
                unet.config.in_channels
            )));
        }
        let halvings = unet
            .down_blocks
            .iter()
            .filter(|d| d.downsampler.is_some())
            .count();
        let even = h % (1 << halvings) == 0 && w % (1 << halvings) == 0;
        let padded = unet
            .down_blocks
            .iter()
            .any(|d| d.downsampler.as_ref().is_some_and(|d| d.pad_bottom_right));
        if !even || padded {
            return Ok(None);
        }
        let dtype = unet.conv_in.weight.dtype();
        let ch0 = unet.config.block_out_channels[0];
        let t = timestep_embedding(
            &vec![timestep; b],
            ch0,
            unet.config.flip_sin_to_cos,
            unet.config.freq_shift,
            x.device(),
        )?
        .to_dtype(dtype)?;
        let temb = unet.time_embedding.forward(&t)?.silu()?;
        let resnets = unet
            .down_blocks
            .iter()
            .flat_map(|d| d.resnets.iter())
            .chain(unet.mid_block.iter().flat_map(|m| m.resnets.iter()))
            .chain(unet.up_blocks.iter().flat_map(|u| u.resnets.iter()));
        let mut biases = Vec::new();
        for r in resnets {
            match &r.time_emb_proj {
                Some(p) => biases.push(p.forward(&temb)?.unsqueeze(2)?.unsqueeze(3)?),
                None => return Ok(None),
            }
        }
        Ok(Some(Self {
            unet,
            latent: x.to_dtype(dtype)?.detach(),
            temb: biases,
            consts: Constants::default(),
            records: None,
            context_dtype: DType::F32,
        }))
    }

    pub(crate) fn run(&mut self, context: &Tensor, keep: bool) -> Result<Tensor> {
        let b = self.latent.dim(0)?;
        if context.dim(0)? != b {
            return Err(Error::Msg(format!(
                "UNet: batch of {b} latents but {} contexts",
                context.dim(0)?
            )));
        }
        let unet = self.unet;
        self.context_dtype = context.dtype();
        let ctx = context.detach().to_dtype(unet.conv_in.weight.dtype())?;
        self.consts.next = 0;
        self.records = None;
        let mut pass = Pass {
            records: Vec::new(),
            keep,
            consts: &mut self.consts,
            temb: &self.temb,
            next_temb: 0,
            context: &ctx,
        };
        let latent = &self.latent;
        let x = pass.consts.get(|| unet.conv_in.forward(latent))?;
        let mut skips = vec![x.clone()];
        let mut x = Act { x, varies: false };
        for block in &unet.down_blocks {
            x = pass.down(block, x, &mut skips)?;
        }
        if let Some(mid) = &unet.mid_block {
            x = pass.mid(mid, x)?;
        }
        for block in &unet.up_blocks {
            let mine = skips.split_off(skips.len() - block.resnets.len());
            x = pass.up(block, x, mine)?;
        }
        let (h, norm) = unet.conv_norm_out.forward_saving(&x.x, true)?;
        pass.push(Record::Out(norm, hw(&x.x)?));
        let out = unet.conv_out.forward(&h)?;
        self.records = keep.then_some(pass.records);
        Ok(out)
    }

    /// The context's gradient given the gradient of the last kept pass's output.
    pub(crate) fn backward(&mut self, grad: &Tensor) -> Result<Tensor> {
        let mut records = self
            .records
            .take()
            .ok_or_else(|| Error::Msg("context tape: backward without a forward pass".into()))?;
        let unet = self.unet;
        let mut bw = Backward {
            records: &mut records,
            dctx: None,
        };
        let Some(Record::Out(norm, size)) = bw.records.pop() else {
            return Err(Error::Msg("context tape: records out of order".into()));
        };
        let g = grad.to_dtype(unet.conv_out.weight.dtype())?;
        let g = unet.conv_out.input_grad(&g, size)?;
        let mut g = unet.conv_norm_out.input_grad_saved(&norm, &g, true)?;
        drop(norm);
        let n_skips = 1 + unet
            .down_blocks
            .iter()
            .map(|d| d.resnets.len() + d.downsampler.is_some() as usize)
            .sum::<usize>();
        let mut skip_grads: Vec<Option<Tensor>> = vec![None; n_skips];
        let mut first = 0;
        for block in unet.up_blocks.iter().rev() {
            let k = block.resnets.len();
            g = bw.up(block, g, &mut skip_grads[first..first + k])?;
            first += k;
        }
        if let Some(mid) = &unet.mid_block {
            g = bw.mid(mid, g)?;
        }
        let mut next = skip_grads.len();
        for block in unet.down_blocks.iter().rev() {
            let k = block.resnets.len() + block.downsampler.is_some() as usize;
            next -= k;
            match bw.down(block, g, &mut skip_grads[next..next + k])? {
                Some(d) => g = d,
                None => break,
            }
        }
        let dctx = bw
            .dctx
            .ok_or_else(|| Error::Msg("context tape: no cross-attention reached".into()))?;
        Ok(dctx.to_dtype(self.context_dtype)?)
    }
}

fn hw(x: &Tensor) -> Result<(usize, usize)> {
    let (_, _, h, w) = x.dims4()?;
    Ok((h, w))
}

/// `[B, C, H, W]` → `[B, H·W, C]`.
fn to_seq(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?)
}

/// `[B, H·W, C]` → `[B, C, H, W]`.
fn to_img(x: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
    let (b, _, c) = x.dims3()?;
    Ok(x.reshape((b, h, w, c))?
        .permute((0, 3, 1, 2))?
        .contiguous()?)
}

/// `[B, L, heads·d]` → `[B, heads, L, d]`.
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, inner) = x.dims3()?;
    Ok(x.reshape((b, l, heads, inner / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// `[B, heads, L, d]` → `[B, L, heads·d]`.
fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, _, l, _) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, l, ()))?)
}

fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a + b)?)
}

/// `h · gelu(gate)` for `ff = [h | gate]` on the last dimension.
fn geglu(ff: &Tensor) -> Result<Tensor> {
    let half = ff.dim(D::Minus1)? / 2;
    let (hidden, gate) = (ff.narrow(2, 0, half)?, ff.narrow(2, half, half)?);
    Ok((hidden * gate.gelu_erf()?)?)
}

fn geglu_grad(ff: &Tensor, g: &Tensor) -> Result<Tensor> {
    let half = ff.dim(D::Minus1)? / 2;
    let (hidden, gate) = (ff.narrow(2, 0, half)?, ff.narrow(2, half, half)?);
    let dh = (g * gate.gelu_erf()?)?;
    // gelu'(x) = Φ(x) + x φ(x)
    let cdf = (((&gate * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5)?;
    let pdf = ((gate.sqr()? * -0.5)?.exp()?
        * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2))?;
    let d = (cdf + (pdf * &gate)?)?;
    let dgate = ((g * hidden)? * d)?;
    Ok(Tensor::cat(&[dh, dgate], 2)?)
}

/// One attention layer on `[B, L, C]` rows: self-attention, or cross-attention over
/// `ctx`; `query`, when given, replaces the queries' projection of `x`.
fn attend(
    a: &Attention,
    x: &Tensor,
    ctx: Option<&Tensor>,
    query: Option<Tensor>,
) -> Result<(Tensor, AttnRecord)> {
    let dtype = x.dtype();
    let upcast = |t: Tensor| -> Result<Tensor> {
        Ok(match a.upcast && dtype != DType::F32 {
            true => t.to_dtype(DType::F32)?,
            false => t,
        })
    };
    let q = match query {
        Some(q) => q,
        None => upcast(split_heads(&a.to_q.forward(x)?, a.heads)?)?,
    };
    let src = ctx.unwrap_or(x);
    let k = upcast(split_heads(&a.to_k.forward(src)?, a.heads)?)?;
    let v = split_heads(&a.to_v.forward(src)?, a.heads)?;
    let p = attention_probs(&q, &k, a.scale)?;
    let o = p.to_dtype(dtype)?.matmul(&v)?;
    let out = a.to_out.forward(&merge_heads(&o)?)?;
    Ok((
        out,
        AttnRecord {
            q,
            k,
            v,
            p,
            o,
            query_varies: true,
        },
    ))
}

impl Pass<'_> {
    fn push(&mut self, r: Record) {
        if self.keep {
            self.records.push(r);
        }
    }

    fn temb(&mut self) -> Result<Tensor> {
        let t = self
            .temb
            .get(self.next_temb)
            .ok_or_else(|| Error::Msg("context tape: residual blocks out of order".into()))?;
        self.next_temb += 1;
        Ok(t.clone())
    }

    fn resnet(&mut self, r: &ResnetBlock2D, x: Act) -> Result<Act> {
        let t = self.temb()?;
        let run = |x: &Tensor| -> Result<(Tensor, ResnetRecord)> {
            let (a, norm1) = r.norm1.forward_saving(x, true)?;
            let h = r.conv1.forward(&a)?.broadcast_add(&t)?;
            let (a, norm2) = r.norm2.forward_saving(&h, true)?;
            let y = r.conv2.forward(&a)?;
            let sc = match &r.conv_shortcut {
                Some(c) => c.forward(x)?,
                None => x.clone(),
            };
            let rec = ResnetRecord {
                norm1,
                norm2,
                in_hw: hw(x)?,
                mid_hw: hw(&h)?,
            };
            Ok((add(&sc, &y)?, rec))
        };
        if !x.varies {
            let out = self.consts.get(|| Ok(run(&x.x)?.0))?;
            return Ok(Act {
                x: out,
                varies: false,
            });
        }
        let (out, rec) = run(&x.x)?;
        self.push(Record::Resnet(rec));
        Ok(Act {
            x: out,
            varies: true,
        })
    }

    fn block(
        &mut self,
        blk: &BasicTransformerBlock,
        x: Tensor,
        varies: bool,
    ) -> Result<(Tensor, BlockRecord)> {
        let ctx = self.context;
        let (x0, attn1, x1, attn2, x2) = if varies {
            let h = blk.norm1.forward(&x)?;
            let (y, r1) = attend(&blk.attn1, &h, None, None)?;
            let x1 = add(&y, &x)?;
            let h = blk.norm2.forward(&x1)?;
            let (y, r2) = attend(&blk.attn2, &h, Some(ctx), None)?;
            let x2 = add(&y, &x1)?;
            (Some(x), Some(r1), Some(x1), r2, x2)
        } else {
            // the self-attention and the cross-attention's queries do not depend on the
            // context
            let a2 = &blk.attn2;
            let x1 = self.consts.get(|| {
                let h = blk.norm1.forward(&x)?;
                add(&attend(&blk.attn1, &h, None, None)?.0, &x)
            })?;
            let q = self.consts.get(|| {
                let q = split_heads(&a2.to_q.forward(&blk.norm2.forward(&x1)?)?, a2.heads)?;
                Ok(match a2.upcast && q.dtype() != DType::F32 {
                    true => q.to_dtype(DType::F32)?,
                    false => q,
                })
            })?;
            let (y, mut r2) = attend(a2, &x1, Some(ctx), Some(q))?;
            r2.query_varies = false;
            let x2 = add(&y, &x1)?;
            (None, None, None, r2, x2)
        };
        let h = blk.norm3.forward(&x2)?;
        let ff = blk.ff.proj.forward(&h)?;
        let y = blk.ff.out.forward(&geglu(&ff)?)?;
        let out = add(&y, &x2)?;
        Ok((
            out,
            BlockRecord {
                x0,
                attn1,
                x1,
                attn2,
                x2,
                ff,
            },
        ))
    }

    fn transformer(&mut self, t: &Transformer2DModel, x: Act) -> Result<Act> {
        let size = hw(&x.x)?;
        let proj_in = |x: &Tensor| -> Result<(Tensor, Norm)> {
            let (h, norm) = t.norm.forward_saving(x, false)?;
            let seq = match &t.proj_in {
                Projection::Conv(p) => to_seq(&p.forward(&h)?)?,
                Projection::Linear(p) => p.forward(&to_seq(&h)?)?,
            };
            Ok((seq, norm))
        };
        let (mut seq, norm) = match x.varies {
            true => {
                let (seq, norm) = proj_in(&x.x)?;
                (seq, Some(norm))
            }
            false => (self.consts.get(|| Ok(proj_in(&x.x)?.0))?, None),
        };
        let mut varies = x.varies;
        let mut blocks = Vec::new();
        for blk in &t.blocks {
            let (y, r) = self.block(blk, seq, varies)?;
            seq = y;
            varies = true;
            blocks.push(r);
        }
        let y = match &t.proj_out {
            Projection::Conv(p) => p.forward(&to_img(&seq, size)?)?,
            Projection::Linear(p) => to_img(&p.forward(&seq)?, size)?,
        };
        let out = add(&y, &x.x)?;
        self.push(Record::Transformer(norm, blocks));
        Ok(Act {
            x: out,
            varies: true,
        })
    }

    fn down(&mut self, block: &DownBlock, mut x: Act, skips: &mut Vec<Tensor>) -> Result<Act> {
        for (i, r) in block.resnets.iter().enumerate() {
            x = self.resnet(r, x)?;
            if let Some(t) = block.attentions.get(i) {
                x = self.transformer(t, x)?;
            }
            skips.push(x.x.clone());
        }
        if let Some(dn) = &block.downsampler {
            x = self.downsample(dn, x)?;
            skips.push(x.x.clone());
        }
        Ok(x)
    }

    fn downsample(&mut self, dn: &Downsample2D, x: Act) -> Result<Act> {
        if !x.varies {
            let y = self.consts.get(|| dn.conv.forward(&x.x))?;
            return Ok(Act {
                x: y,
                varies: false,
            });
        }
        self.push(Record::Down(hw(&x.x)?));
        Ok(Act {
            x: dn.conv.forward(&x.x)?,
            varies: true,
        })
    }

    fn mid(&mut self, mid: &MidBlock, x: Act) -> Result<Act> {
        let mut x = self.resnet(&mid.resnets[0], x)?;
        for (t, r) in mid.attentions.iter().zip(&mid.resnets[1..]) {
            x = self.transformer(t, x)?;
            x = self.resnet(r, x)?;
        }
        Ok(x)
    }

    fn up(&mut self, block: &UpBlock, mut x: Act, skips: Vec<Tensor>) -> Result<Act> {
        for (i, r) in block.resnets.iter().enumerate() {
            let skip = &skips[skips.len() - 1 - i];
            self.push(Record::Cat(x.x.dim(1)?));
            let cat = Tensor::cat(&[&x.x, skip], 1)?;
            x = self.resnet(
                r,
                Act {
                    x: cat,
                    varies: true,
                },
            )?;
            if let Some(t) = block.attentions.get(i) {
                x = self.transformer(t, x)?;
            }
        }
        if let Some(u) = &block.upsampler {
            x = self.upsample(u, x)?;
        }
        Ok(x)
    }

    fn upsample(&mut self, u: &Upsample2D, x: Act) -> Result<Act> {
        let (h, w) = hw(&x.x)?;
        let y = u.conv.forward(&x.x.upsample_nearest2d(2 * h, 2 * w)?)?;
        self.push(Record::Up((h, w)));
        Ok(Act { x: y, varies: true })
    }
}

struct Backward<'r> {
    records: &'r mut Vec<Record>,
    /// The context's gradient so far.
    dctx: Option<Tensor>,
}

impl Backward<'_> {
    fn pop(&mut self) -> Result<Record> {
        self.records
            .pop()
            .ok_or_else(|| Error::Msg("context tape: records out of order".into()))
    }

    fn add_dctx(&mut self, d: Tensor) -> Result<()> {
        self.dctx = Some(match self.dctx.take() {
            Some(acc) => (acc + d)?,
            None => d,
        });
        Ok(())
    }

    fn resnet(&mut self, r: &ResnetBlock2D, g: Tensor) -> Result<Tensor> {
        let Record::Resnet(rec) = self.pop()? else {
            return Err(Error::Msg("context tape: expected a residual block".into()));
        };
        let da = r.conv2.input_grad(&g, rec.mid_hw)?;
        let dh = r.norm2.input_grad_saved(&rec.norm2, &da, true)?;
        drop(rec.norm2);
        let da = r.conv1.input_grad(&dh, rec.in_hw)?;
        let dx = r.norm1.input_grad_saved(&rec.norm1, &da, true)?;
        Ok(match &r.conv_shortcut {
            Some(c) => (dx + c.input_grad(&g, rec.in_hw)?)?,
            None => (dx + g)?,
        })
    }

    /// The gradient of the attention's input (its queries, and its keys and values for
    /// self-attention); a cross-attention adds its keys' and values' share to the
    /// context's gradient.
    fn attention(
        &mut self,
        a: &Attention,
        rec: AttnRecord,
        g: &Tensor,
        cross: bool,
    ) -> Result<Option<Tensor>> {
        let dtype = g.dtype();
        let d_o = split_heads(&a.to_out.input_grad(g)?, a.heads)?;
        let dv = merge_heads(&rec.p.to_dtype(dtype)?.t()?.matmul(&d_o)?)?;
        let dp = d_o.matmul(&rec.v.t()?)?;
        // softmax: dS = P ⊙ (dP − Σⱼ Pᵢⱼ dPᵢⱼ), and Σⱼ Pᵢⱼ dPᵢⱼ = dOᵢ · Oᵢ; in the
        // scores' dtype (f32 where the attention is upcast)
        let wide = rec.q.dtype();
        let dot = (&d_o * &rec.o)?.sum_keepdim(D::Minus1)?.to_dtype(wide)?;
        let dp = dp.to_dtype(wide)?.broadcast_sub(&dot)?;
        let ds = ((&rec.p * dp)? * a.scale)?;
        let dk = merge_heads(&ds.t()?.matmul(&rec.q)?)?.to_dtype(dtype)?;
        let dq = match rec.query_varies {
            true => Some(merge_heads(&ds.matmul(&rec.k)?)?.to_dtype(dtype)?),
            false => None,
        };
        let dkv = (a.to_k.input_grad(&dk)? + a.to_v.input_grad(&dv)?)?;
        if cross {
            self.add_dctx(dkv)?;
            return Ok(dq.map(|dq| a.to_q.input_grad(&dq)).transpose()?);
        }
        let dq =
            dq.ok_or_else(|| Error::Msg("context tape: self-attention without queries".into()))?;
        Ok(Some((a.to_q.input_grad(&dq)? + dkv)?))
    }

    /// The gradient of the block's input, `None` when it is a constant.
    fn block(
        &mut self,
        blk: &BasicTransformerBlock,
        rec: BlockRecord,
        g: Tensor,
    ) -> Result<Option<Tensor>> {
        // out = ff(ln3(x2)) + x2
        let dy = blk.ff.out.input_grad(&g)?;
        let dff = geglu_grad(&rec.ff, &dy)?;
        drop(rec.ff);
        let dh = blk.ff.proj.input_grad(&dff)?;
        let g = (g + blk.norm3.input_grad(&rec.x2, &dh)?)?;
        drop(rec.x2);
        // x2 = attn2(ln2(x1), context) + x1
        let dh = self.attention(&blk.attn2, rec.attn2, &g, true)?;
        let (Some(dh), Some(x1)) = (dh, rec.x1) else {
            return Ok(None);
        };
        let g = (g + blk.norm2.input_grad(&x1, &dh)?)?;
        drop(x1);
        // x1 = attn1(ln1(x0)) + x0
        let (Some(r1), Some(x0)) = (rec.attn1, rec.x0) else {
            return Ok(None);
        };
        let dh = self
            .attention(&blk.attn1, r1, &g, false)?
            .ok_or_else(|| Error::Msg("context tape: self-attention without queries".into()))?;
        Ok(Some((g + blk.norm1.input_grad(&x0, &dh)?)?))
    }

    /// The gradient of the transformer's input, `None` when it is a constant.
    fn transformer(&mut self, t: &Transformer2DModel, g: Tensor) -> Result<Option<Tensor>> {
        let Record::Transformer(norm, mut blocks) = self.pop()? else {
            return Err(Error::Msg("context tape: expected a transformer".into()));
        };
        let size = hw(&g)?;
        let mut gs = match &t.proj_out {
            Projection::Conv(p) => to_seq(&p.input_grad(&g, size)?)?,
            Projection::Linear(p) => p.input_grad(&to_seq(&g)?)?,
        };
        for blk in t.blocks.iter().rev() {
            let r = blocks
                .pop()
                .ok_or_else(|| Error::Msg("context tape: transformer blocks".into()))?;
            match self.block(blk, r, gs)? {
                Some(d) => gs = d,
                None => return Ok(None),
            }
        }
        let Some(norm) = norm else {
            return Ok(None);
        };
        let dh = match &t.proj_in {
            Projection::Conv(p) => p.input_grad(&to_img(&gs, size)?, size)?,
            Projection::Linear(p) => to_img(&p.input_grad(&gs)?, size)?,
        };
        Ok(Some((t.norm.input_grad_saved(&norm, &dh, false)? + g)?))
    }

    fn up(
        &mut self,
        block: &UpBlock,
        mut g: Tensor,
        skip_grads: &mut [Option<Tensor>],
    ) -> Result<Tensor> {
        if let Some(u) = &block.upsampler {
            let Record::Up((h, w)) = self.pop()? else {
                return Err(Error::Msg("context tape: expected an upsampler".into()));
            };
            let (b, c, _, _) = g.dims4()?;
            // nearest-neighbour 2×: each input pixel receives its four copies' gradients
            g = u
                .conv
                .input_grad(&g, (2 * h, 2 * w))?
                .reshape((b, c, h, 2, w, 2))?
                .sum((3, 5))?;
        }
        let k = block.resnets.len();
        for i in (0..k).rev() {
            if let Some(t) = block.attentions.get(i) {
                g = self
                    .transformer(t, g)?
                    .ok_or_else(|| Error::Msg("context tape: constant in the up path".into()))?;
            }
            let dcat = self.resnet(&block.resnets[i], g)?;
            let Record::Cat(c) = self.pop()? else {
                return Err(Error::Msg("context tape: expected a concatenation".into()));
            };
            let cs = dcat.dim(1)? - c;
            skip_grads[k - 1 - i] = Some(dcat.narrow(1, c, cs)?.contiguous()?);
            g = dcat.narrow(1, 0, c)?.contiguous()?;
        }
        Ok(g)
    }

    fn mid(&mut self, mid: &MidBlock, mut g: Tensor) -> Result<Tensor> {
        for (t, r) in mid.attentions.iter().zip(&mid.resnets[1..]).rev() {
            g = self.resnet(r, g)?;
            g = self
                .transformer(t, g)?
                .ok_or_else(|| Error::Msg("context tape: constant in the mid block".into()))?;
        }
        self.resnet(&mid.resnets[0], g)
    }

    /// `g`: the gradient of the block's output from the next block; `skip_grads`: those
    /// of the states it handed to the up path. `None` once the rest is constant.
    fn down(
        &mut self,
        block: &DownBlock,
        mut g: Tensor,
        skip_grads: &mut [Option<Tensor>],
    ) -> Result<Option<Tensor>> {
        let mut k = skip_grads.len();
        if let Some(dn) = &block.downsampler {
            k -= 1;
            if let Some(s) = skip_grads[k].take() {
                g = (g + s)?;
            }
            // a constant's producers are constants: no records left
            match self.records.pop() {
                Some(Record::Down(size)) => g = dn.conv.input_grad(&g, size)?,
                None => return Ok(None),
                Some(_) => return Err(Error::Msg("context tape: expected a downsampler".into())),
            }
        }
        for i in (0..block.resnets.len()).rev() {
            k -= 1;
            if let Some(s) = skip_grads[k].take() {
                g = (g + s)?;
            }
            if let Some(t) = block.attentions.get(i) {
                match self.transformer(t, g)? {
                    Some(d) => g = d,
                    None => return Ok(None),
                }
            }
            if self.records.is_empty() {
                return Ok(None);
            }
            g = self.resnet(&block.resnets[i], g)?;
        }
        Ok(Some(g))
    }
}
