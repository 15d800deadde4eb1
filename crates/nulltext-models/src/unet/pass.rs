//! The UNet's one traversal: the forward pass of every block, with the attention controller
//! called at every site, and the backward pass to the text context.
//!
//! Every pass runs here, on any device and dtype: plain predictions, Prompt-to-Prompt edit
//! steps (the controller sees the probabilities of the sites it asks for), training (the
//! tensors carry candle's autograd graph, which differentiates the weights), and the inner
//! loop of null-text inversion, which differentiates the output with respect to the context
//! only. For that loop a pass *records* what each layer needs for its input gradient and
//! [`Backward`] walks the blocks in reverse, visiting only what lies between the context
//! and the output:
//!
//! - everything before the first cross-attention (the input convolution, the first residual
//!   block, the first transformer's self-attention and its cross-attention's queries) does
//!   not depend on the context: a [`Constants`] keeps it for the later passes of one tape;
//! - SDXL's null-text inversion also varies the pooled text embedding, which reaches every
//!   residual block through its time-embedding bias: then everything after the input
//!   convolution varies, and the backward pass also gives each bias's gradient;
//! - convolutions and linear layers keep nothing (their weights are constants); norms keep
//!   their input (group norms off the fused kernels: `x̂` and `1/σ`), attention its queries,
//!   keys, values, output and each query's log-sum-exp (its probabilities only where a
//!   controller edits them).
//!
//! Which kernels run is the tensors' business: on the CPU in f32 nulltext's own (`crate::nn`,
//! `crate::cpu::attention`, `crate::nn::layout`); for norms, GEGLU and the attention's
//! softmax steps on the CPU and CUDA GPUs its fused ones (`crate::fused`); elsewhere
//! candle's ops. The layers own their input-gradient formulas (`Conv2d::input_grad`,
//! `GroupNorm::backward`, …).

use candle_core::{DType, Tensor};

use super::blocks::{DownBlock, MidBlock, UpBlock};
use super::model::{AddedCond, UNet2DConditionModel};
use crate::attention::{Attention, AttnRecord, BasicTransformerBlock, FeedForward};
use crate::attention::{Projection, Transformer2DModel};
use crate::control::{AttentionCall, AttentionControl};
use crate::embeddings::timestep_embedding;
use crate::error::{Error, Result};
use crate::nn::layout as ops;
use crate::nn::{GroupNorm, NormRecord};
use crate::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};

/// Values that do not depend on the context, computed by a tape's first pass and reused by
/// the later ones in the same order.
#[derive(Default)]
pub(super) struct Constants {
    values: Vec<Tensor>,
    next: usize,
}

impl Constants {
    /// Starts a pass.
    pub(super) fn rewind(&mut self) {
        self.next = 0;
    }
}

pub(super) struct ResnetRecord {
    /// `None` where the block's input is a constant (its bias varies).
    norm1: Option<NormRecord>,
    norm2: NormRecord,
    /// The bias's index in call order, where it varies.
    bias: Option<usize>,
    /// The sizes of the input and of the first convolution's output.
    in_hw: (usize, usize),
    mid_hw: (usize, usize),
}

pub(super) struct BlockRecord {
    /// Inputs of the three layer norms (`None` where the block's input is a constant).
    x0: Option<Tensor>,
    attn1: Option<AttnRecord>,
    x1: Option<Tensor>,
    attn2: AttnRecord,
    x2: Tensor,
    /// The feed-forward's projection (the GEGLU's input).
    ff: Tensor,
}

pub(super) enum Record {
    Resnet(ResnetRecord),
    /// A transformer's input norm (`None` when the input is a constant), its blocks and
    /// its grid.
    Transformer(Option<NormRecord>, Vec<BlockRecord>, (usize, usize)),
    /// A downsampler's input size and the size its convolution saw (padded or not).
    Down((usize, usize), (usize, usize)),
    /// An upsampler's input and output sizes.
    Up((usize, usize), (usize, usize)),
    /// An up block's concatenation: the channels of its first part.
    Cat(usize),
    /// The output norm and its input's size.
    Out(NormRecord, (usize, usize)),
}

/// An activation and whether it depends on the context.
struct Act {
    x: Tensor,
    varies: bool,
}

fn hw(x: &Tensor) -> Result<(usize, usize)> {
    let (_, _, h, w) = x.dims4()?;
    Ok((h, w))
}

/// `group_norm(x)` (with `silu`, followed by SiLU), recorded or through the graph.
fn norm(
    n: &GroupNorm,
    x: &Tensor,
    silu: bool,
    record: bool,
) -> Result<(Tensor, Option<NormRecord>)> {
    if record {
        let (y, rec) = n.forward_recording(x, silu)?;
        return Ok((y, Some(rec)));
    }
    Ok((
        if silu {
            n.forward_silu(x)?
        } else {
            n.forward(x)?
        },
        None,
    ))
}

/// One forward pass.
pub(super) struct Pass<'a> {
    pub(super) records: Vec<Record>,
    /// Whether to record for a backward pass.
    record: bool,
    /// The tape's constants; `None` when nothing is reused (a single pass, or a controller
    /// that must see every pass).
    consts: Option<&'a mut Constants>,
    /// `time_emb_proj(silu(temb))` of every residual block, in call order, `[B, C, 1, 1]`.
    biases: &'a [Option<Tensor>],
    next_bias: usize,
    /// Whether the biases vary between passes (with SDXL's pooled text embedding).
    biases_vary: bool,
    context: &'a Tensor,
    control: &'a mut dyn AttentionControl,
    step: usize,
}

impl UNet2DConditionModel {
    /// Every residual block, in call order.
    pub(super) fn resnets(&self) -> impl Iterator<Item = &ResnetBlock2D> {
        self.down_blocks
            .iter()
            .flat_map(|d| d.resnets.iter())
            .chain(self.mid_block.iter().flat_map(|m| m.resnets.iter()))
            .chain(self.up_blocks.iter().flat_map(|u| u.resnets.iter()))
    }

    /// `time_emb_proj(silu(temb))` of every residual block in call order, `[B, C, 1, 1]`,
    /// for one timestep per latent; SDXL's `added` conditioning joins the time embedding
    /// here (diffusers: `emb = emb + aug_emb`).
    pub(super) fn time_biases(
        &self,
        timesteps: &[f64],
        added: Option<&AddedCond>,
        like: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let ch0 = self.config.block_out_channels[0];
        let dtype = self.conv_in.weight.dtype();
        let t = timestep_embedding(
            timesteps,
            ch0,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            like.device(),
        )?
        .to_dtype(dtype)?;
        let temb = self.time_embedding.forward(&t)?;
        let temb = match (&self.add_embedding, added) {
            (Some(e), Some(a)) => (temb + e.forward(&a.text_embeds, &a.time_ids, dtype)?)?,
            (None, None) => temb,
            (Some(_), None) => {
                return Err(Error::Msg(
                    "this UNet (SDXL) needs the pooled text embedding and the time ids beside \
                     the text context"
                        .into(),
                ))
            }
            (None, Some(_)) => {
                return Err(Error::Msg(
                    "this UNet (SD 1.x/2.x) takes no pooled text embedding or time ids".into(),
                ))
            }
        }
        .silu()?;
        self.resnets()
            .map(|r| match &r.time_emb_proj {
                Some(p) => Ok(Some(p.forward(&temb)?.unsqueeze(2)?.unsqueeze(3)?)),
                None => Ok(None),
            })
            .collect()
    }
}

impl<'a> Pass<'a> {
    pub(super) fn new(
        biases: &'a [Option<Tensor>],
        context: &'a Tensor,
        control: &'a mut dyn AttentionControl,
        step: usize,
    ) -> Self {
        Self {
            records: Vec::new(),
            record: false,
            consts: None,
            biases,
            next_bias: 0,
            biases_vary: false,
            context,
            control,
            step,
        }
    }

    /// Records for a backward pass.
    pub(super) fn recording(mut self, record: bool) -> Self {
        self.record = record;
        self
    }

    /// Treats the biases as varying (the pooled text embedding of SDXL's null-text
    /// inversion): only the input convolution's output is then a constant, and a recorded
    /// pass keeps what the biases' gradients need.
    pub(super) fn varying_biases(mut self, vary: bool) -> Self {
        self.biases_vary = vary;
        self
    }

    /// Reuses (and fills) `consts`.
    pub(super) fn reusing(mut self, consts: &'a mut Constants) -> Self {
        self.consts = Some(consts);
        self
    }

    /// Whether a controller asks to see some site (then a tape reuses nothing).
    pub(super) fn watched(&self) -> bool {
        self.control.wants_any()
    }

    fn push(&mut self, r: Record) {
        if self.record {
            self.records.push(r);
        }
    }

    /// The next constant, computed by `f` when this pass is the first to need it.
    fn constant(&mut self, f: impl FnOnce(&mut Self) -> Result<Tensor>) -> Result<Tensor> {
        if let Some(c) = self.consts.as_deref_mut() {
            if let Some(v) = c.values.get(c.next) {
                c.next += 1;
                return Ok(v.clone());
            }
        }
        let v = f(self)?;
        if let Some(c) = self.consts.as_deref_mut() {
            debug_assert_eq!(c.next, c.values.len(), "constants out of order");
            c.values.push(v.clone());
            c.next += 1;
        }
        Ok(v)
    }

    /// The UNet's output for `latent` (a constant of the pass).
    pub(super) fn unet(&mut self, unet: &UNet2DConditionModel, latent: &Tensor) -> Result<Tensor> {
        let x = self.constant(|_| unet.conv_in.forward(latent))?;
        let mut skips = vec![x.clone()];
        let mut x = Act { x, varies: false };
        for block in &unet.down_blocks {
            x = self.down(block, x, &mut skips)?;
        }
        if let Some(mid) = &unet.mid_block {
            x = self.mid(mid, x)?;
        }
        let n = unet.up_blocks.len();
        for (i, block) in unet.up_blocks.iter().enumerate() {
            let mine = skips.split_off(skips.len() - block.resnets.len());
            // upsample to the next skip's size, so odd sizes round-trip like diffusers
            let size = match (i + 1 < n, skips.last()) {
                (true, Some(s)) => Some(hw(s)?),
                _ => None,
            };
            x = self.up(block, x, mine, size)?;
        }
        let (h, rec) = norm(&unet.conv_norm_out, &x.x, true, self.record)?;
        if let Some(rec) = rec {
            self.push(Record::Out(rec, hw(&x.x)?));
        }
        unet.conv_out.forward(&h)
    }

    fn resnet(&mut self, r: &ResnetBlock2D, x: Act) -> Result<Act> {
        let index = self.next_bias;
        let bias = self.biases.get(index).cloned().flatten();
        self.next_bias += 1;
        let bias_varies = self.biases_vary && bias.is_some();
        // `record_input`: whether the input varies (its gradient is wanted)
        let run = |x: &Tensor,
                   record_input: bool,
                   record: bool|
         -> Result<(Tensor, Option<ResnetRecord>)> {
            let (a, norm1) = norm(&r.norm1, x, true, record_input)?;
            let h = r.conv1.forward(&a)?;
            let h = match &bias {
                Some(b) => ops::add_bias(&h, b)?,
                None => h,
            };
            let (a, norm2) = norm(&r.norm2, &h, true, record)?;
            let y = r.conv2.forward(&a)?;
            let shortcut = match &r.conv_shortcut {
                Some(c) => c.forward(x)?,
                None => x.clone(),
            };
            let rec = match norm2 {
                Some(norm2) => Some(ResnetRecord {
                    norm1,
                    norm2,
                    bias: bias_varies.then_some(index),
                    in_hw: hw(x)?,
                    mid_hw: hw(&h)?,
                }),
                None => None,
            };
            Ok((ops::add(&shortcut, &y)?, rec))
        };
        if !x.varies && !bias_varies {
            let y = self.constant(|_| Ok(run(&x.x, false, false)?.0))?;
            return Ok(Act {
                x: y,
                varies: false,
            });
        }
        let (y, rec) = run(&x.x, x.varies && self.record, self.record)?;
        if let Some(rec) = rec {
            self.push(Record::Resnet(rec));
        }
        Ok(Act { x: y, varies: true })
    }

    /// One attention layer on rows `x` `[B, L, C]` of an `(h, w)` grid: self-attention, or
    /// cross-attention to the context; `query`, when given, replaces the queries of `x`.
    fn attend(
        &mut self,
        a: &Attention,
        x: &Tensor,
        cross: bool,
        query: Option<Tensor>,
        (height, width): (usize, usize),
    ) -> Result<(Tensor, Option<AttnRecord>)> {
        let q = match query {
            Some(q) => q,
            None => a.queries(x)?,
        };
        let (k, v) = a.keys_values(if cross { self.context } else { x })?;
        let call = AttentionCall {
            site: &a.site,
            height,
            width,
            step: self.step,
        };
        let (o, rec) = match self.control.wants(&call) {
            true => {
                let control: &mut dyn AttentionControl = &mut *self.control;
                a.core((q, k, v), Some((control, &call)), self.record)?
            }
            false => a.core((q, k, v), None, self.record)?,
        };
        Ok((a.to_out.forward(&ops::merge_heads(&o)?)?, rec))
    }

    fn block(
        &mut self,
        blk: &BasicTransformerBlock,
        x: Tensor,
        varies: bool,
        grid: (usize, usize),
    ) -> Result<(Tensor, Option<BlockRecord>)> {
        let (x0, attn1, x1, attn2, x2) = if varies {
            let h = blk.norm1.forward(&x)?;
            let (y, r1) = self.attend(&blk.attn1, &h, false, None, grid)?;
            let x1 = ops::add(&y, &x)?;
            let h = blk.norm2.forward(&x1)?;
            let (y, r2) = self.attend(&blk.attn2, &h, true, None, grid)?;
            let x2 = ops::add(&y, &x1)?;
            (Some(x), r1, Some(x1), r2, x2)
        } else {
            // the self-attention and the cross-attention's queries do not depend on the
            // context
            let x1 = self.constant(|p| {
                let h = blk.norm1.forward(&x)?;
                ops::add(&p.attend(&blk.attn1, &h, false, None, grid)?.0, &x)
            })?;
            let q = self.constant(|_| blk.attn2.queries(&blk.norm2.forward(&x1)?))?;
            let (y, mut r2) = self.attend(&blk.attn2, &x1, true, Some(q), grid)?;
            if let Some(r) = r2.as_mut() {
                r.query_varies = false;
            }
            let x2 = ops::add(&y, &x1)?;
            (None, None, None, r2, x2)
        };
        let h = blk.norm3.forward(&x2)?;
        let ff = blk.ff.proj.forward(&h)?;
        let y = blk.ff.out.forward(&FeedForward::geglu(&ff)?)?;
        let out = ops::add(&y, &x2)?;
        let rec = attn2.map(|attn2| BlockRecord {
            x0,
            attn1,
            x1,
            attn2,
            x2,
            ff,
        });
        Ok((out, rec))
    }

    fn transformer(&mut self, t: &Transformer2DModel, x: Act) -> Result<Act> {
        let grid = hw(&x.x)?;
        let proj_in = |h: &Tensor| -> Result<Tensor> {
            match &t.proj_in {
                Projection::Conv(p) => ops::to_seq(&p.forward(h)?),
                Projection::Linear(p) => p.forward(&ops::to_seq(h)?),
            }
        };
        let (mut seq, norm_rec) = match x.varies {
            true => {
                let (h, rec) = norm(&t.norm, &x.x, false, self.record)?;
                (proj_in(&h)?, rec)
            }
            false => (self.constant(|_| proj_in(&t.norm.forward(&x.x)?))?, None),
        };
        let mut varies = x.varies;
        let mut blocks = Vec::new();
        for blk in &t.blocks {
            let (y, rec) = self.block(blk, seq, varies, grid)?;
            seq = y;
            varies = true;
            blocks.extend(rec);
        }
        let y = match &t.proj_out {
            Projection::Conv(p) => p.forward(&ops::to_img(&seq, grid)?)?,
            Projection::Linear(p) => ops::to_img(&p.forward(&seq)?, grid)?,
        };
        self.push(Record::Transformer(norm_rec, blocks, grid));
        Ok(Act {
            x: ops::add(&y, &x.x)?,
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
            let y = self.constant(|_| dn.forward(&x.x))?;
            return Ok(Act {
                x: y,
                varies: false,
            });
        }
        let in_hw = hw(&x.x)?;
        let seen = match dn.pad_bottom_right {
            true => (in_hw.0 + 1, in_hw.1 + 1),
            false => in_hw,
        };
        self.push(Record::Down(in_hw, seen));
        Ok(Act {
            x: dn.forward(&x.x)?,
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

    fn up(
        &mut self,
        block: &UpBlock,
        mut x: Act,
        skips: Vec<Tensor>,
        size: Option<(usize, usize)>,
    ) -> Result<Act> {
        for (i, r) in block.resnets.iter().enumerate() {
            let skip = &skips[skips.len() - 1 - i];
            self.push(Record::Cat(x.x.dim(1)?));
            let cat = ops::cat_channels(&x.x, skip)?;
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
            x = self.upsample(u, x, size)?;
        }
        Ok(x)
    }

    fn upsample(&mut self, u: &Upsample2D, x: Act, size: Option<(usize, usize)>) -> Result<Act> {
        let (h, w) = hw(&x.x)?;
        let to = size.unwrap_or((2 * h, 2 * w));
        self.push(Record::Up((h, w), to));
        Ok(Act {
            x: u.conv.forward(&ops::upsample(&x.x, to)?)?,
            varies: true,
        })
    }
}

/// The backward pass to the context: the forward pass's records, popped last-first, the
/// context's gradient so far, and the gradients of the biases that vary.
pub(super) struct Backward {
    records: Vec<Record>,
    dctx: Option<Tensor>,
    dbias: Vec<Option<Tensor>>,
}

impl Backward {
    fn pop(&mut self) -> Record {
        self.records
            .pop()
            .expect("the backward pass pops what the forward pass pushed")
    }

    fn add_dctx(&mut self, d: Tensor) -> Result<()> {
        self.dctx = Some(match self.dctx.take() {
            Some(acc) => ops::add(&acc, &d)?,
            None => d,
        });
        Ok(())
    }

    /// The context's gradient given the gradient `grad` of the output of the pass that
    /// made `records`, and each residual block's bias gradient `[B, C]` (in f32, or f64
    /// for f64 models) where its bias varied in that pass ([`Pass::varying_biases`]),
    /// `None` elsewhere.
    pub(super) fn unet(
        unet: &UNet2DConditionModel,
        records: Vec<Record>,
        grad: &Tensor,
    ) -> Result<(Tensor, Vec<Option<Tensor>>)> {
        let mut bw = Backward {
            records,
            dctx: None,
            dbias: vec![None; unet.resnets().count()],
        };
        let Record::Out(norm, size) = bw.pop() else {
            unreachable!("a pass ends with its output norm")
        };
        let g = unet.conv_out.input_grad(grad, size)?;
        let mut g = unet.conv_norm_out.backward(&norm, &g, true)?;
        drop(norm);
        // the skips' gradients, by index in the order the down path pushed them
        let n_skips = 1 + unet
            .down_blocks
            .iter()
            .map(|d| d.resnets.len() + d.downsampler.is_some() as usize)
            .sum::<usize>();
        let mut skip_grads: Vec<Option<Tensor>> = vec![None; n_skips];
        // the last up block took the first skips
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
            .expect("every UNet has a cross-attention, which the backward pass reaches");
        Ok((dctx, bw.dbias))
    }

    /// The gradient of the block's input, `None` when it is a constant; where the block's
    /// bias varies, its gradient joins `dbias`.
    fn resnet(&mut self, r: &ResnetBlock2D, g: Tensor) -> Result<Option<Tensor>> {
        let Record::Resnet(rec) = self.pop() else {
            unreachable!("records out of order: expected a residual block")
        };
        let da = r.conv2.input_grad(&g, rec.mid_hw)?;
        let dh = r.norm2.backward(&rec.norm2, &da, true)?;
        drop(rec.norm2);
        if let Some(i) = rec.bias {
            // h = conv1(…) + bias: the bias collects dh over the grid, [B, C, H, W] -> [B, C]
            let wide = match dh.dtype() {
                DType::F16 | DType::BF16 => dh.to_dtype(DType::F32)?,
                _ => dh.clone(),
            };
            self.dbias[i] = Some(wide.sum((2, 3))?);
        }
        let Some(norm1) = rec.norm1 else {
            return Ok(None);
        };
        let da = r.conv1.input_grad(&dh, rec.in_hw)?;
        let dx = r.norm1.backward(&norm1, &da, true)?;
        let shortcut = match &r.conv_shortcut {
            Some(c) => c.input_grad(&g, rec.in_hw)?,
            None => g,
        };
        Ok(Some(ops::add(&dx, &shortcut)?))
    }

    /// The gradient of the attention's input (its queries, and its keys and values for
    /// self-attention), `None` when it is a constant; a cross-attention adds its keys' and
    /// values' share to the context's gradient.
    fn attention(
        &mut self,
        a: &Attention,
        rec: AttnRecord,
        g: &Tensor,
        cross: bool,
    ) -> Result<Option<Tensor>> {
        let d_o = ops::split_heads(&a.to_out.input_grad(g)?, a.heads)?;
        let (dq, dk, dv) = a.core_backward(rec, &d_o)?;
        let dk = a.to_k.input_grad(&ops::merge_heads(&dk)?)?;
        let dkv = ops::add(&dk, &a.to_v.input_grad(&ops::merge_heads(&dv)?)?)?;
        let dx = match dq {
            Some(dq) => Some(a.to_q.input_grad(&ops::merge_heads(&dq)?)?),
            None => None,
        };
        if cross {
            self.add_dctx(dkv)?;
            return Ok(dx);
        }
        let dx = dx.expect("a self-attention's queries vary with its input");
        Ok(Some(ops::add(&dx, &dkv)?))
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
        let dff = FeedForward::geglu_grad(&rec.ff, &dy)?;
        drop(rec.ff);
        let dh = blk.ff.proj.input_grad(&dff)?;
        let g = ops::add(&g, &blk.norm3.input_grad(&rec.x2, &dh)?)?;
        drop(rec.x2);
        // x2 = attn2(ln2(x1), context) + x1
        let dh = self.attention(&blk.attn2, rec.attn2, &g, true)?;
        let (Some(dh), Some(x1)) = (dh, rec.x1) else {
            return Ok(None);
        };
        let g = ops::add(&g, &blk.norm2.input_grad(&x1, &dh)?)?;
        drop(x1);
        // x1 = attn1(ln1(x0)) + x0
        let (Some(r1), Some(x0)) = (rec.attn1, rec.x0) else {
            return Ok(None);
        };
        let dh = self
            .attention(&blk.attn1, r1, &g, false)?
            .expect("a self-attention's input gradient");
        Ok(Some(ops::add(&g, &blk.norm1.input_grad(&x0, &dh)?)?))
    }

    /// The gradient of the transformer's input, `None` when it is a constant.
    fn transformer(&mut self, t: &Transformer2DModel, g: Tensor) -> Result<Option<Tensor>> {
        let Record::Transformer(norm, mut blocks, grid) = self.pop() else {
            unreachable!("records out of order: expected a transformer")
        };
        let mut gs = match &t.proj_out {
            Projection::Conv(p) => ops::to_seq(&p.input_grad(&g, grid)?)?,
            Projection::Linear(p) => p.input_grad(&ops::to_seq(&g)?)?,
        };
        for blk in t.blocks.iter().rev() {
            let rec = blocks.pop().expect("one record per transformer block");
            match self.block(blk, rec, gs)? {
                Some(d) => gs = d,
                None => return Ok(None),
            }
        }
        let Some(norm) = norm else {
            return Ok(None);
        };
        let dh = match &t.proj_in {
            Projection::Conv(p) => p.input_grad(&ops::to_img(&gs, grid)?, grid)?,
            Projection::Linear(p) => ops::to_img(&p.input_grad(&gs)?, grid)?,
        };
        Ok(Some(ops::add(&t.norm.backward(&norm, &dh, false)?, &g)?))
    }

    fn up(
        &mut self,
        block: &UpBlock,
        mut g: Tensor,
        skip_grads: &mut [Option<Tensor>],
    ) -> Result<Tensor> {
        if let Some(u) = &block.upsampler {
            let Record::Up(from, to) = self.pop() else {
                unreachable!("records out of order: expected an upsampler")
            };
            g = ops::upsample_grad(&u.conv.input_grad(&g, to)?, from)?;
        }
        let k = block.resnets.len();
        for i in (0..k).rev() {
            if let Some(t) = block.attentions.get(i) {
                g = self
                    .transformer(t, g)?
                    .expect("the up path depends on the context");
            }
            let dcat = self
                .resnet(&block.resnets[i], g)?
                .expect("the up path depends on the context");
            let Record::Cat(c) = self.pop() else {
                unreachable!("records out of order: expected a concatenation")
            };
            let (dx, dskip) = ops::split_channels(&dcat, c)?;
            skip_grads[k - 1 - i] = Some(dskip);
            g = dx;
        }
        Ok(g)
    }

    fn mid(&mut self, mid: &MidBlock, mut g: Tensor) -> Result<Tensor> {
        let varies = "the mid block depends on the context";
        for (t, r) in mid.attentions.iter().zip(&mid.resnets[1..]).rev() {
            g = self.resnet(r, g)?.expect(varies);
            g = self.transformer(t, g)?.expect(varies);
        }
        Ok(self.resnet(&mid.resnets[0], g)?.expect(varies))
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
                g = ops::add(&g, &s)?;
            }
            // a constant's producers are constants: no records left
            match self.records.pop() {
                Some(Record::Down(in_hw, seen)) => {
                    g = dn.conv.input_grad(&g, seen)?;
                    if seen != in_hw {
                        g = g
                            .narrow(2, 0, in_hw.0)?
                            .narrow(3, 0, in_hw.1)?
                            .contiguous()?;
                    }
                }
                None => return Ok(None),
                Some(_) => unreachable!("records out of order: expected a downsampler"),
            }
        }
        for i in (0..block.resnets.len()).rev() {
            k -= 1;
            if let Some(s) = skip_grads[k].take() {
                g = ops::add(&g, &s)?;
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
            match self.resnet(&block.resnets[i], g)? {
                Some(d) => g = d,
                None => return Ok(None),
            }
        }
        Ok(Some(g))
    }
}
