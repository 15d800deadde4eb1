//! The UNet differentiated with respect to its text context only, on the CPU in f32,
//! without a general autograd graph: the inner loop of null-text inversion.
//!
//! Null-text inversion runs the UNet forward and backward ten times per diffusion step
//! with the same latent and timestep and a new context each time. [`ContextTape`] does it
//! with the same kernels as the graph path (`crate::nn`, `crate::cpu_attention`), so the
//! forward pass gives the same numbers bit for bit, and adds what the structure allows:
//!
//! - everything before the first cross-attention (the input convolution, the first residual
//!   block, the first transformer's self-attention and its cross-attention's queries) does
//!   not depend on the context: it runs once per tape and is reused;
//! - the backward pass visits only what lies between the context and the output, keeps
//!   what each layer needs for its input gradient (nothing for convolutions and linear
//!   layers, whose weights are frozen) and accumulates the residual and skip gradients in
//!   place, where a general graph allocates, zeroes and adds a gradient for every node.
//!
//! Supported: every SD 1.x/2.x configuration the graph path loads, on the CPU with f32
//! weights. Elsewhere [`UNet2DConditionModel::context_tape`] gives the tensor-op tape
//! (`super::tensor_tape`), the same structure on any device and dtype.

use candle_core::{CpuStorage, DType, Storage, StorageRef, Tensor};
use rayon::prelude::*;

use super::tensor_tape::TensorTape;
use super::{DownBlock, MidBlock, UNet2DConditionModel, UpBlock};
use crate::attention::{Attention, BasicTransformerBlock, Projection, Transformer2DModel};
use crate::cpu_attention::{self, AttnDims};
use crate::cpu_conv::{CpuConv, Nchw};
use crate::cpu_kernels;
use crate::embeddings::timestep_embedding;
use crate::error::{Error, Result};
use crate::nn::{
    host_f32, linear_f32, linear_input_grad_f32, Conv2d, GroupNorm, LayerNorm, Linear,
};
use crate::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};

/// A contiguous f32 CPU tensor's data, borrowed for as long as the guard lives.
struct Host<'a> {
    storage: StorageRef<'a>,
    range: std::ops::Range<usize>,
}

impl Host<'_> {
    fn get(&self) -> &[f32] {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.range.clone()],
            _ => unreachable!("checked by host()"),
        }
    }
}

fn host(t: &Tensor) -> Result<Host<'_>> {
    let (storage, layout) = t.storage_and_layout();
    let range = match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(_)), Some((a, e))) => a..e,
        _ => {
            return Err(Error::Msg(
                "context tape: weights must be contiguous f32 on the CPU".into(),
            ))
        }
    };
    Ok(Host { storage, range })
}

fn add_into(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    dst.par_chunks_mut(1 << 14)
        .zip(src.par_chunks(1 << 14))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(a, b)| *a += *b));
}

fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    assert_eq!(a.len(), b.len());
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(1 << 14)
        .zip(a.par_chunks(1 << 14).zip(b.par_chunks(1 << 14)))
        .for_each(|(o, (x, y))| {
            for ((o, x), y) in o.iter_mut().zip(x).zip(y) {
                *o = *x + *y;
            }
        });
    out
}

/// `[n, rows, cols]` → `[n, cols, rows]`, in cache-sized tiles.
fn transpose(x: &[f32], n: usize, rows: usize, cols: usize) -> Vec<f32> {
    const T: usize = 32;
    assert_eq!(x.len(), n * rows * cols);
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(rows * T).enumerate().for_each(|(i, o)| {
        // output rows [c0, c0 + T) of matrix `m`
        let per = cols.div_ceil(T);
        let (m, c0) = (i / per, (i % per) * T);
        let src = &x[m * rows * cols..(m + 1) * rows * cols];
        let tc = o.len() / rows;
        for r0 in (0..rows).step_by(T) {
            for c in 0..tc {
                for r in r0..(r0 + T).min(rows) {
                    o[c * rows + r] = src[r * cols + c0 + c];
                }
            }
        }
    });
    out
}

/// [`transpose`] where its tiles of 32 output rows stay within one matrix (columns a
/// multiple of 32), else a plain loop.
fn transpose_any(x: &[f32], n: usize, rows: usize, cols: usize) -> Vec<f32> {
    if cols.is_multiple_of(32) {
        transpose(x, n, rows, cols)
    } else {
        let mut out = vec![0f32; x.len()];
        for m in 0..n {
            let src = &x[m * rows * cols..(m + 1) * rows * cols];
            let dst = &mut out[m * rows * cols..(m + 1) * rows * cols];
            for r in 0..rows {
                for c in 0..cols {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
        out
    }
}

/// `[B, L, heads·d]` → `[B, heads, L, d]`.
fn split_heads(x: &[f32], l: usize, heads: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(l * d).enumerate().for_each(|(bh, o)| {
        let (bi, h) = (bh / heads, bh % heads);
        for (i, row) in o.chunks_mut(d).enumerate() {
            let s = (bi * l + i) * heads * d + h * d;
            row.copy_from_slice(&x[s..s + d]);
        }
    });
    out
}

/// `[B, heads, L, d]` → `[B, L, heads·d]`.
fn merge_heads(x: &[f32], l: usize, heads: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(heads * d)
        .enumerate()
        .for_each(|(bl, o)| {
            let (bi, i) = (bl / l, bl % l);
            for (h, row) in o.chunks_mut(d).enumerate() {
                let s = ((bi * heads + h) * l + i) * d;
                row.copy_from_slice(&x[s..s + d]);
            }
        });
    out
}

fn linear(lin: &Linear, x: &[f32], rows: usize) -> Result<Vec<f32>> {
    let w = host(&lin.weight)?;
    let out_dim = lin.weight.dim(0)?;
    Ok(match &lin.bias {
        Some(b) => {
            let b = host(b)?;
            linear_f32(x, rows, w.get(), out_dim, Some(b.get()))
        }
        None => linear_f32(x, rows, w.get(), out_dim, None),
    })
}

/// `dst (+)= g W`: the input gradient of a linear layer.
fn linear_grad_into(
    lin: &Linear,
    g: &[f32],
    rows: usize,
    dst: &mut [f32],
    acc: bool,
) -> Result<()> {
    let w = host(&lin.weight)?;
    linear_input_grad_f32(g, rows, w.get(), dst, acc);
    Ok(())
}

fn linear_grad(lin: &Linear, g: &[f32], rows: usize) -> Result<Vec<f32>> {
    let in_dim = lin.weight.dim(1)?;
    let mut dx = vec![0f32; rows * in_dim];
    linear_grad_into(lin, g, rows, &mut dx, false)?;
    Ok(dx)
}

fn geometry(conv: &Conv2d) -> Result<CpuConv> {
    let (c_out, c_in, k, _) = conv.weight.dims4()?;
    Ok(CpuConv::new((c_out, c_in, k), conv.stride, conv.padding))
}

fn conv(conv: &Conv2d, x: &[f32], s: Nchw) -> Result<(Vec<f32>, Nchw)> {
    let g = geometry(conv)?;
    let w = host(&conv.weight)?;
    let out = match &conv.bias {
        Some(b) => {
            let b = host(b)?;
            g.forward(x, s, w.get(), Some(b.get()))
        }
        None => g.forward(x, s, w.get(), None),
    };
    let (h, wd) = g.out_hw(s.h, s.w);
    Ok((
        out,
        Nchw {
            b: s.b,
            c: g.c_out,
            h,
            w: wd,
        },
    ))
}

/// The input gradient of `conv` for an input of shape `s`.
fn conv_grad(conv: &Conv2d, g: &[f32], s: Nchw) -> Result<Vec<f32>> {
    let geo = geometry(conv)?;
    let w = host(&conv.weight)?;
    Ok(geo.input_grad(g, s, w.get()))
}

fn affine(norm: &GroupNorm) -> Result<&(Vec<f32>, Vec<f32>)> {
    norm.cpu_affine
        .as_deref()
        .ok_or_else(|| Error::Msg("context tape: group norm without f32 weights".into()))
}

fn group_norm(norm: &GroupNorm, x: &[f32], s: Nchw, silu: bool) -> Result<Vec<f32>> {
    let (gamma, beta) = affine(norm)?;
    Ok(cpu_kernels::group_norm(
        x,
        s.c,
        s.h * s.w,
        norm.groups,
        gamma,
        beta,
        norm.eps,
        silu,
    ))
}

fn group_norm_grad(
    norm: &GroupNorm,
    x: &[f32],
    g: &[f32],
    s: Nchw,
    silu: bool,
) -> Result<Vec<f32>> {
    let (gamma, beta) = affine(norm)?;
    Ok(cpu_kernels::group_norm_backward(
        x,
        g,
        s.c,
        s.h * s.w,
        norm.groups,
        (gamma, beta),
        norm.eps,
        silu,
    ))
}

fn layer_norm(norm: &LayerNorm, x: &[f32]) -> Result<Vec<f32>> {
    let (w, b) = (host(&norm.weight)?, host(&norm.bias)?);
    Ok(cpu_kernels::layer_norm(
        x,
        w.get().len(),
        w.get(),
        b.get(),
        norm.eps,
    ))
}

fn layer_norm_grad(norm: &LayerNorm, x: &[f32], g: &[f32]) -> Result<Vec<f32>> {
    let w = host(&norm.weight)?;
    Ok(cpu_kernels::layer_norm_backward(
        x,
        g,
        w.get().len(),
        w.get(),
        norm.eps,
    ))
}

/// Nearest-neighbour source indices of `dst` positions over `src` (candle's rule, which
/// the graph path uses).
fn nearest(src: usize, dst: usize) -> Vec<usize> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|i| usize::min(src - 1, (i as f64 * scale) as usize))
        .collect()
}

fn upsample(x: &[f32], s: Nchw, (th, tw): (usize, usize)) -> Vec<f32> {
    let (hi, wi) = (nearest(s.h, th), nearest(s.w, tw));
    let mut out = vec![0f32; s.b * s.c * th * tw];
    out.par_chunks_mut(th * tw)
        .zip(x.par_chunks(s.h * s.w))
        .for_each(|(o, p)| {
            for (r, &sr) in hi.iter().enumerate() {
                for (c, &sc) in wi.iter().enumerate() {
                    o[r * tw + c] = p[sr * s.w + sc];
                }
            }
        });
    out
}

/// The adjoint of [`upsample`]: each source pixel collects the gradients of its copies.
fn upsample_grad(g: &[f32], s: Nchw, (th, tw): (usize, usize)) -> Vec<f32> {
    let (hi, wi) = (nearest(s.h, th), nearest(s.w, tw));
    let mut out = vec![0f32; s.b * s.c * s.h * s.w];
    out.par_chunks_mut(s.h * s.w)
        .zip(g.par_chunks(th * tw))
        .for_each(|(o, p)| {
            for (r, &sr) in hi.iter().enumerate() {
                for (c, &sc) in wi.iter().enumerate() {
                    o[sr * s.w + sc] += p[r * tw + c];
                }
            }
        });
    out
}

/// `[B, C1, H, W]` and `[B, C2, H, W]` → `[B, C1 + C2, H, W]`.
fn cat_channels(a: &[f32], b: &[f32], batch: usize) -> Vec<f32> {
    let (na, nb) = (a.len() / batch, b.len() / batch);
    let mut out = Vec::with_capacity(a.len() + b.len());
    for i in 0..batch {
        out.extend_from_slice(&a[i * na..(i + 1) * na]);
        out.extend_from_slice(&b[i * nb..(i + 1) * nb]);
    }
    out
}

fn split_channels(g: &[f32], batch: usize, na: usize) -> (Vec<f32>, Vec<f32>) {
    let per = g.len() / batch;
    let mut a = Vec::with_capacity(batch * na);
    let mut b = Vec::with_capacity(g.len() - batch * na);
    for i in 0..batch {
        a.extend_from_slice(&g[i * per..i * per + na]);
        b.extend_from_slice(&g[i * per + na..(i + 1) * per]);
    }
    (a, b)
}

/// Values that do not depend on the context: computed by the first forward pass, reused
/// by the later ones in the same order (host vectors here, tensors in the tensor tape).
pub(super) struct Constants<T> {
    values: Vec<T>,
    pub(super) next: usize,
    /// A single pass: nothing to keep.
    once: bool,
}

impl<T> Default for Constants<T> {
    fn default() -> Self {
        Self {
            values: Vec::new(),
            next: 0,
            once: false,
        }
    }
}

impl<T: Clone> Constants<T> {
    pub(super) fn get(&mut self, compute: impl FnOnce() -> Result<T>) -> Result<T> {
        let v = match self.values.get(self.next) {
            Some(v) => v.clone(),
            None if self.once => compute()?,
            None => {
                let v = compute()?;
                self.values.push(v.clone());
                v
            }
        };
        self.next += 1;
        Ok(v)
    }
}

/// What one attention layer keeps for its backward pass.
struct AttnRecord {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    lse: Vec<f32>,
    dims: AttnDims,
    /// Whether the queries depend on the context (their gradient is needed).
    query_varies: bool,
}

struct BlockRecord {
    /// Inputs of the three layer norms (`None` where the block's input is a constant).
    x0: Option<Vec<f32>>,
    attn1: Option<AttnRecord>,
    x1: Option<Vec<f32>>,
    attn2: AttnRecord,
    x2: Vec<f32>,
    /// The feed-forward's projection (the GEGLU's input).
    ff: Vec<f32>,
}

struct TransformerRecord {
    /// The group norm's input, `None` when it is a constant.
    x: Option<Vec<f32>>,
    s: Nchw,
    blocks: Vec<BlockRecord>,
}

struct ResnetRecord {
    x: Vec<f32>,
    h: Vec<f32>,
    s_in: Nchw,
    s_out: Nchw,
}

enum Record {
    Resnet(ResnetRecord),
    Transformer(TransformerRecord),
    Down(Nchw),
    Up(Nchw, (usize, usize)),
    /// An up block's concatenation: the shape of its first part.
    Cat(Nchw),
    Out(Vec<f32>, Nchw),
}

/// An activation and whether it depends on the context.
struct Act {
    data: Vec<f32>,
    s: Nchw,
    varies: bool,
}

/// Forward-pass state: records, constants, the time-embedding biases in call order.
struct Pass<'t> {
    records: Vec<Record>,
    /// Whether to keep the records (a pass that will be differentiated).
    keep: bool,
    consts: &'t mut Constants<Vec<f32>>,
    temb: &'t [Vec<f32>],
    next_temb: usize,
    context: &'t [f32],
    ctx_rows: usize,
}

/// The CPU f32 tape (host vectors, the CPU kernels).
pub(crate) struct HostTape<'a> {
    unet: &'a UNet2DConditionModel,
    latent: Vec<f32>,
    s: Nchw,
    /// `time_emb_proj(silu(temb))` of every residual block, in call order, `[B, C]`.
    temb: Vec<Vec<f32>>,
    consts: Constants<Vec<f32>>,
    records: Option<Vec<Record>>,
    context_shape: (usize, usize, usize),
}

/// The UNet at one latent and timestep, differentiated with respect to its text context
/// only: the inner loop of null-text inversion, without candle's autograd graph.
///
/// On the CPU in f32 it runs the CPU kernels on host vectors (its forward values are the
/// graph path's bit for bit); on other devices and dtypes, candle's tensor ops with the
/// layers' input-gradient formulas (`super::tensor_tape`).
pub struct ContextTape<'a>(Kind<'a>);

enum Kind<'a> {
    Host(HostTape<'a>),
    Tensor(TensorTape<'a>),
}

impl UNet2DConditionModel {
    /// A [`ContextTape`] for latents `x` `[B, C, h, w]` at `timestep`: the CPU tape in f32
    /// on the CPU, the tensor tape elsewhere; `None` where neither supports the model or
    /// the size, or where this UNet runs on the graph ([`super::Execution::Graph`]): then
    /// the caller differentiates through the graph.
    pub fn context_tape(&self, x: &Tensor, timestep: f64) -> Result<Option<ContextTape<'_>>> {
        if self.execution == super::Execution::Graph {
            return Ok(None);
        }
        if let Some(t) = self.host_tape(x, timestep)? {
            return Ok(Some(ContextTape(Kind::Host(t))));
        }
        self.tensor_context_tape(x, timestep)
    }

    /// The tensor-op tape on any device and dtype (what [`Self::context_tape`] gives off the
    /// CPU or in half precision), also on the CPU in f32, to compare the two.
    pub fn tensor_context_tape(
        &self,
        x: &Tensor,
        timestep: f64,
    ) -> Result<Option<ContextTape<'_>>> {
        Ok(TensorTape::new(self, x, timestep)?.map(|t| ContextTape(Kind::Tensor(t))))
    }
}

impl ContextTape<'_> {
    /// The UNet's output `[B, C_out, h, w]` for `context` `[B, L, D]`, keeping what the
    /// backward pass needs.
    pub fn forward(&mut self, context: &Tensor) -> Result<Tensor> {
        match &mut self.0 {
            Kind::Host(t) => t.run(context, true),
            Kind::Tensor(t) => t.run(context, true),
        }
    }

    /// The UNet's output for `context` without keeping anything for a backward pass (the
    /// context-free prefix is shared with [`Self::forward`]).
    pub fn predict(&mut self, context: &Tensor) -> Result<Tensor> {
        match &mut self.0 {
            Kind::Host(t) => t.run(context, false),
            Kind::Tensor(t) => t.run(context, false),
        }
    }

    /// The gradient of the context given the gradient `grad` of the last forward pass's
    /// output. Consumes that pass's records.
    pub fn backward(&mut self, grad: &Tensor) -> Result<Tensor> {
        match &mut self.0 {
            Kind::Host(t) => t.backward(grad),
            Kind::Tensor(t) => t.backward(grad),
        }
    }

    /// Whether this is the CPU f32 tape (host kernels) rather than the tensor tape.
    pub fn is_host(&self) -> bool {
        matches!(self.0, Kind::Host(_))
    }
}

impl UNet2DConditionModel {
    /// The CPU f32 tape for latents `x` `[B, C, h, w]` at `timestep`, or `None` where it
    /// does not apply (weights or latents not f32 on the CPU).
    pub(crate) fn host_tape(&self, x: &Tensor, timestep: f64) -> Result<Option<HostTape<'_>>> {
        let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if !f32_cpu(x) || !f32_cpu(&self.conv_in.weight) {
            return Ok(None);
        }
        let (b, c, h, w) = x.dims4()?;
        if c != self.config.in_channels {
            return Err(Error::Msg(format!(
                "UNet expects {} latent channels, got {c}",
                self.config.in_channels
            )));
        }
        let resnets = self
            .down_blocks
            .iter()
            .flat_map(|d| d.resnets.iter())
            .chain(self.mid_block.iter().flat_map(|m| m.resnets.iter()))
            .chain(self.up_blocks.iter().flat_map(|u| u.resnets.iter()));
        let supported = self.conv_norm_out.cpu_affine.is_some()
            && self
                .down_blocks
                .iter()
                .all(|d| d.downsampler.as_ref().is_none_or(|d| !d.pad_bottom_right));
        if !supported {
            return Ok(None);
        }
        let ch0 = self.config.block_out_channels[0];
        let t = timestep_embedding(
            &vec![timestep; b],
            ch0,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            x.device(),
        )?;
        let temb = self.time_embedding.forward(&t)?.silu()?;
        let mut biases = Vec::new();
        for r in resnets {
            match &r.time_emb_proj {
                Some(p) => biases.push(host_f32(&p.forward(&temb)?)?),
                None => return Ok(None),
            }
        }
        Ok(Some(HostTape {
            unet: self,
            latent: host_f32(x)?,
            s: Nchw { b, c, h, w },
            temb: biases,
            consts: Constants::default(),
            records: None,
            context_shape: (b, 0, 0),
        }))
    }
}

impl HostTape<'_> {
    /// A single pass without records, nothing kept for later passes.
    pub(crate) fn predict_once(mut self, context: &Tensor) -> Result<Tensor> {
        self.consts.once = true;
        self.run(context, false)
    }

    fn run(&mut self, context: &Tensor, keep: bool) -> Result<Tensor> {
        let (b, l, d) = context.dims3()?;
        if b != self.s.b {
            return Err(Error::Msg(format!(
                "UNet: batch of {} latents but {b} contexts",
                self.s.b
            )));
        }
        let ctx = host_f32(&context.to_dtype(DType::F32)?)?;
        self.context_shape = (b, l, d);
        self.consts.next = 0;
        let unet = self.unet;
        self.records = None;
        let mut pass = Pass {
            records: Vec::new(),
            keep,
            consts: &mut self.consts,
            temb: &self.temb,
            next_temb: 0,
            context: &ctx,
            ctx_rows: b * l,
        };
        let (latent, s) = (&self.latent, self.s);
        let x = pass.consts.get(|| Ok(conv(&unet.conv_in, latent, s)?.0))?;
        let s0 = {
            let g = geometry(&unet.conv_in)?;
            let (h, w) = g.out_hw(s.h, s.w);
            Nchw {
                b,
                c: g.c_out,
                h,
                w,
            }
        };
        let mut x = Act {
            data: x,
            s: s0,
            varies: false,
        };
        let mut skips: Vec<(Vec<f32>, Nchw)> = vec![(x.data.clone(), x.s)];
        for block in &unet.down_blocks {
            x = pass.down(block, x, &mut skips)?;
        }
        if let Some(mid) = &unet.mid_block {
            x = pass.mid(mid, x)?;
        }
        let n = unet.up_blocks.len();
        for (i, block) in unet.up_blocks.iter().enumerate() {
            let k = block.resnets.len();
            let mine = skips.split_off(skips.len() - k);
            let size = if i + 1 < n {
                skips.last().map(|(_, s)| (s.h, s.w))
            } else {
                None
            };
            x = pass.up(block, x, mine, size)?;
        }
        let h = group_norm(&unet.conv_norm_out, &x.data, x.s, true)?;
        pass.push(Record::Out(x.data, x.s));
        let (out, so) = conv(&unet.conv_out, &h, x.s)?;
        self.records = keep.then_some(pass.records);
        Ok(Tensor::from_vec(
            out,
            (so.b, so.c, so.h, so.w),
            context.device(),
        )?)
    }

    fn backward(&mut self, grad: &Tensor) -> Result<Tensor> {
        let mut records = self
            .records
            .take()
            .ok_or_else(|| Error::Msg("context tape: backward without a forward pass".into()))?;
        let unet = self.unet;
        let (b, l, d) = self.context_shape;
        let mut dctx = vec![0f32; b * l * d];
        let g = host_f32(grad)?;
        let mut bw = Backward {
            records: &mut records,
            dctx: &mut dctx,
            ctx_rows: b * l,
        };
        let Some(Record::Out(x, s)) = bw.records.pop() else {
            return Err(Error::Msg("context tape: records out of order".into()));
        };
        let g = conv_grad(&unet.conv_out, &g, s)?;
        let mut g = group_norm_grad(&unet.conv_norm_out, &x, &g, s, true)?;
        drop(x);
        // gradients of the skip connections, by index in the order they were pushed
        let mut skip_grads: Vec<Option<Vec<f32>>> = Vec::new();
        let n_skips = 1 + unet
            .down_blocks
            .iter()
            .map(|d| d.resnets.len() + d.downsampler.is_some() as usize)
            .sum::<usize>();
        skip_grads.resize_with(n_skips, || None);
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
        Ok(Tensor::from_vec(dctx, (b, l, d), grad.device())?)
    }
}

impl Pass<'_> {
    fn push(&mut self, r: Record) {
        if self.keep {
            self.records.push(r);
        }
    }

    fn temb(&mut self) -> Result<&[f32]> {
        let t = self
            .temb
            .get(self.next_temb)
            .ok_or_else(|| Error::Msg("context tape: residual blocks out of order".into()))?;
        self.next_temb += 1;
        Ok(t)
    }

    fn resnet(&mut self, r: &ResnetBlock2D, x: Act) -> Result<Act> {
        let t = self.temb()?.to_vec();
        let c_out = r.conv1.weight.dim(0)?;
        let s_out = Nchw { c: c_out, ..x.s };
        let run = |x: &[f32], s: Nchw| -> Result<(Vec<f32>, Vec<f32>)> {
            let a = group_norm(&r.norm1, x, s, true)?;
            let (mut h, so) = conv(&r.conv1, &a, s)?;
            let hw = so.h * so.w;
            h.par_chunks_mut(hw).enumerate().for_each(|(i, p)| {
                let v = t[i];
                p.iter_mut().for_each(|e| *e += v);
            });
            let a = group_norm(&r.norm2, &h, so, true)?;
            let (y, _) = conv(&r.conv2, &a, so)?;
            let sc = match &r.conv_shortcut {
                Some(c) => conv(c, x, s)?.0,
                None => x.to_vec(),
            };
            Ok((add(&sc, &y), h))
        };
        if !x.varies {
            let out = self.consts.get(|| Ok(run(&x.data, x.s)?.0))?;
            return Ok(Act {
                data: out,
                s: s_out,
                varies: false,
            });
        }
        let (out, h) = run(&x.data, x.s)?;
        self.push(Record::Resnet(ResnetRecord {
            x: x.data,
            h,
            s_in: x.s,
            s_out,
        }));
        Ok(Act {
            data: out,
            s: s_out,
            varies: true,
        })
    }
}

/// One attention layer on `[B, L, C]` rows: self-attention, or cross-attention over
/// `ctx` (`[B, Lk, D]` rows and `Lk`); `query`, when given, replaces the queries' projection.
fn attend(
    a: &Attention,
    x: &[f32],
    rows_l: (usize, usize),
    ctx: Option<(&[f32], usize)>,
    query: Option<Vec<f32>>,
) -> Result<(Vec<f32>, AttnRecord)> {
    let (b, l) = rows_l;
    let inner = a.to_q.out_dim();
    let d = inner / a.heads;
    let q = match query {
        Some(q) => q,
        None => split_heads(&linear(&a.to_q, x, b * l)?, l, a.heads, d),
    };
    let (src, lk) = match ctx {
        Some((c, lk)) => (c, lk),
        None => (x, l),
    };
    let k = split_heads(&linear(&a.to_k, src, b * lk)?, lk, a.heads, d);
    let v = split_heads(&linear(&a.to_v, src, b * lk)?, lk, a.heads, d);
    let dims = AttnDims {
        bh: b * a.heads,
        lq: l,
        lk,
        d,
        dv: d,
    };
    let (o, lse) = cpu_attention::forward(&q, &k, &v, dims, a.scale as f32);
    let out = linear(&a.to_out, &merge_heads(&o, l, a.heads, d), b * l)?;
    Ok((
        out,
        AttnRecord {
            q,
            k,
            v,
            o,
            lse,
            dims,
            query_varies: true,
        },
    ))
}

impl Pass<'_> {
    fn block(
        &mut self,
        blk: &BasicTransformerBlock,
        x: Vec<f32>,
        varies: bool,
        rows_l: (usize, usize),
    ) -> Result<(Vec<f32>, BlockRecord)> {
        let (b, l) = rows_l;
        let ctx = (self.context, self.ctx_rows / b);
        let (x0, attn1, x1, attn2, x2) = if varies {
            let h = layer_norm(&blk.norm1, &x)?;
            let (y, r1) = attend(&blk.attn1, &h, rows_l, None, None)?;
            let x1 = add(&y, &x);
            let h = layer_norm(&blk.norm2, &x1)?;
            let (y, r2) = attend(&blk.attn2, &h, rows_l, Some(ctx), None)?;
            let x2 = add(&y, &x1);
            (Some(x), Some(r1), Some(x1), r2, x2)
        } else {
            // the self-attention and the cross-attention's queries do not depend on the
            // context
            let a2 = &blk.attn2;
            let d = a2.to_q.out_dim() / a2.heads;
            let x1 = self.consts.get(|| {
                let h = layer_norm(&blk.norm1, &x)?;
                let (y, _) = attend(&blk.attn1, &h, rows_l, None, None)?;
                Ok(add(&y, &x))
            })?;
            let q = self.consts.get(|| {
                let h = layer_norm(&blk.norm2, &x1)?;
                Ok(split_heads(&linear(&a2.to_q, &h, b * l)?, l, a2.heads, d))
            })?;
            let (y, mut r2) = attend(a2, &[], rows_l, Some(ctx), Some(q))?;
            r2.query_varies = false;
            let x2 = add(&y, &x1);
            (None, None, None, r2, x2)
        };
        let h = layer_norm(&blk.norm3, &x2)?;
        let ff = linear(&blk.ff.proj, &h, b * l)?;
        let inner = ff.len() / (b * l) / 2;
        let y = linear(&blk.ff.out, &cpu_kernels::geglu(&ff, inner), b * l)?;
        let out = add(&y, &x2);
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
        let s = x.s;
        let (b, c, hw) = (s.b, s.c, s.h * s.w);
        let proj_in = |x: &[f32]| -> Result<Vec<f32>> {
            let h = group_norm(&t.norm, x, s, false)?;
            Ok(match &t.proj_in {
                Projection::Conv(p) => {
                    let (y, so) = conv(p, &h, s)?;
                    transpose_any(&y, b, so.c, hw)
                }
                Projection::Linear(p) => linear(p, &transpose_any(&h, b, c, hw), b * hw)?,
            })
        };
        let mut seq = if x.varies {
            proj_in(&x.data)?
        } else {
            self.consts.get(|| proj_in(&x.data))?
        };
        let mut varies = x.varies;
        let mut blocks = Vec::new();
        for blk in &t.blocks {
            let (y, r) = self.block(blk, seq, varies, (b, hw))?;
            seq = y;
            varies = true;
            blocks.push(r);
        }
        let y = match &t.proj_out {
            Projection::Conv(p) => conv(p, &transpose_any(&seq, b, hw, c), s)?.0,
            Projection::Linear(p) => transpose_any(&linear(p, &seq, b * hw)?, b, hw, c),
        };
        let out = add(&y, &x.data);
        self.push(Record::Transformer(TransformerRecord {
            x: x.varies.then_some(x.data),
            s,
            blocks,
        }));
        Ok(Act {
            data: out,
            s,
            varies: true,
        })
    }

    fn down(
        &mut self,
        block: &DownBlock,
        mut x: Act,
        skips: &mut Vec<(Vec<f32>, Nchw)>,
    ) -> Result<Act> {
        for (i, r) in block.resnets.iter().enumerate() {
            x = self.resnet(r, x)?;
            if let Some(t) = block.attentions.get(i) {
                x = self.transformer(t, x)?;
            }
            skips.push((x.data.clone(), x.s));
        }
        if let Some(dn) = &block.downsampler {
            x = self.downsample(dn, x)?;
            skips.push((x.data.clone(), x.s));
        }
        Ok(x)
    }

    fn downsample(&mut self, dn: &Downsample2D, x: Act) -> Result<Act> {
        let (y, s) = conv(&dn.conv, &x.data, x.s)?;
        if x.varies {
            self.push(Record::Down(x.s));
        }
        Ok(Act {
            data: y,
            s,
            varies: x.varies,
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
        skips: Vec<(Vec<f32>, Nchw)>,
        size: Option<(usize, usize)>,
    ) -> Result<Act> {
        for (i, r) in block.resnets.iter().enumerate() {
            let (skip, ss) = &skips[skips.len() - 1 - i];
            let s = Nchw {
                c: x.s.c + ss.c,
                ..x.s
            };
            let data = cat_channels(&x.data, skip, x.s.b);
            self.push(Record::Cat(x.s));
            x = self.resnet(
                r,
                Act {
                    data,
                    s,
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
        let to = size.unwrap_or((2 * x.s.h, 2 * x.s.w));
        let up = upsample(&x.data, x.s, to);
        let su = Nchw {
            h: to.0,
            w: to.1,
            ..x.s
        };
        let (y, s) = conv(&u.conv, &up, su)?;
        self.push(Record::Up(x.s, to));
        Ok(Act {
            data: y,
            s,
            varies: true,
        })
    }
}

/// Backward-pass state: the forward's records (popped last-first) and the context's
/// gradient being accumulated.
struct Backward<'r> {
    records: &'r mut Vec<Record>,
    dctx: &'r mut [f32],
    ctx_rows: usize,
}

impl Backward<'_> {
    fn pop(&mut self) -> Result<Record> {
        self.records
            .pop()
            .ok_or_else(|| Error::Msg("context tape: records out of order".into()))
    }

    fn resnet(&mut self, r: &ResnetBlock2D, g: Vec<f32>) -> Result<Vec<f32>> {
        let Record::Resnet(rec) = self.pop()? else {
            return Err(Error::Msg("context tape: expected a residual block".into()));
        };
        let da = conv_grad(&r.conv2, &g, rec.s_out)?;
        let dh = group_norm_grad(&r.norm2, &rec.h, &da, rec.s_out, true)?;
        drop(rec.h);
        let da = conv_grad(&r.conv1, &dh, rec.s_in)?;
        let mut dx = group_norm_grad(&r.norm1, &rec.x, &da, rec.s_in, true)?;
        match &r.conv_shortcut {
            Some(c) => add_into(&mut dx, &conv_grad(c, &g, rec.s_in)?),
            None => add_into(&mut dx, &g),
        }
        Ok(dx)
    }

    /// Returns the gradient of the attention's input `x` (its queries, and its keys and
    /// values for self-attention); a cross-attention adds its keys' and values' share to
    /// the context's gradient.
    fn attention(
        &mut self,
        a: &Attention,
        rec: AttnRecord,
        g: &[f32],
        b: usize,
        cross: bool,
    ) -> Result<Option<Vec<f32>>> {
        let n = rec.dims;
        let (l, lk, d) = (n.lq, n.lk, n.d);
        let dout = linear_grad(&a.to_out, g, b * l)?;
        let dout = split_heads(&dout, l, a.heads, d);
        let (dq, dk, dv) = cpu_attention::backward(
            &rec.q,
            &rec.k,
            &rec.v,
            &rec.o,
            &rec.lse,
            &dout,
            n,
            a.scale as f32,
        );
        drop(rec.k);
        drop(rec.v);
        let dk = merge_heads(&dk, lk, a.heads, d);
        let dv = merge_heads(&dv, lk, a.heads, d);
        let mut dx = if rec.query_varies {
            Some(linear_grad(
                &a.to_q,
                &merge_heads(&dq, l, a.heads, d),
                b * l,
            )?)
        } else {
            None
        };
        if cross {
            linear_grad_into(&a.to_k, &dk, self.ctx_rows, self.dctx, true)?;
            linear_grad_into(&a.to_v, &dv, self.ctx_rows, self.dctx, true)?;
        } else if let Some(dx) = dx.as_mut() {
            linear_grad_into(&a.to_k, &dk, b * lk, dx, true)?;
            linear_grad_into(&a.to_v, &dv, b * lk, dx, true)?;
        }
        Ok(dx)
    }

    /// The gradient of the block's input, `None` when it is a constant.
    fn block(
        &mut self,
        blk: &BasicTransformerBlock,
        rec: BlockRecord,
        mut g: Vec<f32>,
        b: usize,
    ) -> Result<Option<Vec<f32>>> {
        let rows = g.len() / blk.norm3.weight.dim(0)?;
        // out = ff(ln3(x2)) + x2
        let dy = linear_grad(&blk.ff.out, &g, rows)?;
        let inner = dy.len() / rows;
        let dff = cpu_kernels::geglu_backward(&rec.ff, &dy, inner);
        drop(rec.ff);
        let dh = linear_grad(&blk.ff.proj, &dff, rows)?;
        drop(dff);
        add_into(&mut g, &layer_norm_grad(&blk.norm3, &rec.x2, &dh)?);
        drop(rec.x2);
        // x2 = attn2(ln2(x1), context) + x1
        let dh = self.attention(&blk.attn2, rec.attn2, &g, b, true)?;
        let (Some(dh), Some(x1)) = (dh, rec.x1) else {
            return Ok(None);
        };
        add_into(&mut g, &layer_norm_grad(&blk.norm2, &x1, &dh)?);
        drop(x1);
        // x1 = attn1(ln1(x0)) + x0
        let (Some(r1), Some(x0)) = (rec.attn1, rec.x0) else {
            return Ok(None);
        };
        let dh = self
            .attention(&blk.attn1, r1, &g, b, false)?
            .ok_or_else(|| Error::Msg("context tape: self-attention without queries".into()))?;
        add_into(&mut g, &layer_norm_grad(&blk.norm1, &x0, &dh)?);
        Ok(Some(g))
    }

    /// The gradient of the transformer's input, `None` when it is a constant.
    fn transformer(&mut self, t: &Transformer2DModel, g: Vec<f32>) -> Result<Option<Vec<f32>>> {
        let Record::Transformer(mut rec) = self.pop()? else {
            return Err(Error::Msg("context tape: expected a transformer".into()));
        };
        let s = rec.s;
        let (b, c, hw) = (s.b, s.c, s.h * s.w);
        let mut gs = match &t.proj_out {
            Projection::Conv(p) => transpose_any(&conv_grad(p, &g, s)?, b, c, hw),
            Projection::Linear(p) => linear_grad(p, &transpose_any(&g, b, c, hw), b * hw)?,
        };
        for blk in t.blocks.iter().rev() {
            let r = rec
                .blocks
                .pop()
                .ok_or_else(|| Error::Msg("context tape: transformer blocks".into()))?;
            match self.block(blk, r, gs, b)? {
                Some(d) => gs = d,
                None => return Ok(None),
            }
        }
        let Some(x) = rec.x else {
            return Ok(None);
        };
        let dh = match &t.proj_in {
            Projection::Conv(p) => conv_grad(p, &transpose_any(&gs, b, hw, c), s)?,
            Projection::Linear(p) => transpose_any(&linear_grad(p, &gs, b * hw)?, b, hw, c),
        };
        let mut dx = group_norm_grad(&t.norm, &x, &dh, s, false)?;
        add_into(&mut dx, &g);
        Ok(Some(dx))
    }

    fn up(
        &mut self,
        block: &UpBlock,
        mut g: Vec<f32>,
        skip_grads: &mut [Option<Vec<f32>>],
    ) -> Result<Vec<f32>> {
        if let Some(u) = &block.upsampler {
            let Record::Up(s, to) = self.pop()? else {
                return Err(Error::Msg("context tape: expected an upsampler".into()));
            };
            let su = Nchw {
                h: to.0,
                w: to.1,
                ..s
            };
            g = upsample_grad(&conv_grad(&u.conv, &g, su)?, s, to);
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
            let (dx, ds) = split_channels(&dcat, c.b, c.c * c.h * c.w);
            skip_grads[k - 1 - i] = Some(ds);
            g = dx;
        }
        Ok(g)
    }

    fn mid(&mut self, mid: &MidBlock, mut g: Vec<f32>) -> Result<Vec<f32>> {
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
        mut g: Vec<f32>,
        skip_grads: &mut [Option<Vec<f32>>],
    ) -> Result<Option<Vec<f32>>> {
        let mut k = skip_grads.len();
        if let Some(dn) = &block.downsampler {
            k -= 1;
            if let Some(s) = skip_grads[k].take() {
                add_into(&mut g, &s);
            }
            // a constant's producers are constants: no records left
            match self.records.pop() {
                Some(Record::Down(s)) => g = conv_grad(&dn.conv, &g, s)?,
                None => return Ok(None),
                Some(_) => return Err(Error::Msg("context tape: expected a downsampler".into())),
            }
        }
        for i in (0..block.resnets.len()).rev() {
            k -= 1;
            if let Some(s) = skip_grads[k].take() {
                add_into(&mut g, &s);
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
