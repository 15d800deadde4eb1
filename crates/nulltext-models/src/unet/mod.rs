//! `UNet2DConditionModel` of Stable Diffusion 1.x/2.x, its structure read from the config.

mod blocks;
mod tape;
mod tensor_tape;

use candle_core::Tensor;

pub use blocks::{BlockAttention, BlockCommon, DownBlock, MidBlock, UpBlock, UpChannels};
pub use tape::ContextTape;

/// How a UNet runs its passes: chosen when it is loaded ([`crate::LoadOptions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Execution {
    /// The context tapes wherever they support the model, device and latent size — the
    /// host tape on the CPU in f32, the tensor tape elsewhere — for the context gradient
    /// and for passes no controller watches; candle's graph for the rest.
    #[default]
    Tapes,
    /// Candle's autograd graph for every pass: for comparison, or as a fallback.
    Graph,
}

impl std::str::FromStr for Execution {
    type Err = String;
    /// `tapes` (or `on`, `1`) and `graph` (or `off`, `0`), the values of
    /// `NULLTEXT_CONTEXT_TAPE`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tapes" | "tape" | "on" | "1" => Ok(Execution::Tapes),
            "graph" | "off" | "0" => Ok(Execution::Graph),
            other => Err(format!(
                "unknown UNet execution `{other}` (tapes or graph; on or off)"
            )),
        }
    }
}

use crate::config::UNetConfig;
use crate::control::{AttentionControl, AttentionSite, NoControl};
use crate::embeddings::{timestep_embedding, TimestepEmbedding};
use crate::error::{Error, Result};
use crate::nn::{Conv2d, GroupNorm};
use crate::weights::Vb;

pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNetConfig,
    execution: Execution,
}

impl UNet2DConditionModel {
    pub fn load(vb: &Vb, config: &UNetConfig) -> Result<Self> {
        config.validate()?;
        let c = config;
        let n = c.block_out_channels.len();
        let ch = &c.block_out_channels;
        let heads = c.heads_per_block()?;
        let layers = c.layers_per_block.expand(n, "layers_per_block")?;
        let tlayers = c
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        let temb = ch[0] * 4;
        let common = BlockCommon {
            temb_channels: temb,
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            context_dim: c.cross_attention_dim,
            linear_projection: c.use_linear_projection,
            upcast: c.upcast_attention,
        };
        let mut next_site = 0;
        let mut down_blocks = Vec::new();
        for i in 0..n {
            let in_c = if i == 0 { ch[0] } else { ch[i - 1] };
            let attn =
                (c.down_block_types[i] == "CrossAttnDownBlock2D").then_some(BlockAttention {
                    heads: heads[i],
                    transformer_layers: tlayers[i],
                });
            let downsample = (i + 1 < n).then_some(c.downsample_padding);
            down_blocks.push(DownBlock::load(
                &vb.pp(format!("down_blocks.{i}")),
                i,
                &common,
                in_c,
                ch[i],
                layers[i],
                attn,
                downsample,
                &mut next_site,
            )?);
        }
        let mid_block = match c.mid_block_type {
            Some(_) => Some(MidBlock::load(
                &vb.pp("mid_block"),
                &common,
                ch[n - 1],
                BlockAttention {
                    heads: heads[n - 1],
                    transformer_layers: tlayers[n - 1],
                },
                &mut next_site,
            )?),
            None => None,
        };
        let rev_ch: Vec<usize> = ch.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = heads.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = layers.iter().rev().copied().collect();
        let rev_tlayers: Vec<usize> = tlayers.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut out_c = rev_ch[0];
        for i in 0..n {
            let prev_out = out_c;
            out_c = rev_ch[i];
            let in_c = rev_ch[(i + 1).min(n - 1)];
            let attn = (c.up_block_types[i] == "CrossAttnUpBlock2D").then_some(BlockAttention {
                heads: rev_heads[i],
                transformer_layers: rev_tlayers[i],
            });
            up_blocks.push(UpBlock::load(
                &vb.pp(format!("up_blocks.{i}")),
                i,
                &common,
                UpChannels {
                    in_channels: in_c,
                    out_channels: out_c,
                    prev_out_channels: prev_out,
                },
                rev_layers[i] + 1,
                attn,
                i + 1 < n,
                &mut next_site,
            )?);
        }
        let kin = c.conv_in_kernel;
        let kout = c.conv_out_kernel;
        Ok(Self {
            conv_in: Conv2d::load(&vb.pp("conv_in"), c.in_channels, ch[0], kin, 1, kin / 2)?,
            time_embedding: TimestepEmbedding::load(&vb.pp("time_embedding"), ch[0], temb)?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(
                &vb.pp("conv_norm_out"),
                c.norm_num_groups,
                ch[0],
                c.norm_eps,
            )?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), ch[0], c.out_channels, kout, 1, kout / 2)?,
            execution: Execution::default(),
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    pub fn execution(&self) -> Execution {
        self.execution
    }

    /// Runs later passes as `execution` says.
    pub fn with_execution(mut self, execution: Execution) -> Self {
        self.execution = execution;
        self
    }

    /// Every attention layer, in the order one forward pass calls them.
    pub fn attention_sites(&self) -> Vec<&AttentionSite> {
        let mut v: Vec<&AttentionSite> = self
            .down_blocks
            .iter()
            .flat_map(|b| b.sites())
            .chain(self.mid_block.iter().flat_map(|m| m.sites()))
            .chain(self.up_blocks.iter().flat_map(|b| b.sites()))
            .collect();
        v.sort_by_key(|s| s.index);
        v
    }

    /// ε (or v) prediction for latents `x` `[B, C, h, w]` at `timestep`, with text
    /// `context` `[B, 77, D]`.
    pub fn forward(&self, x: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        self.forward_controlled(x, timestep, context, &mut NoControl, 0)
    }

    /// As [`Self::forward`], with one timestep per latent (training).
    pub fn forward_timesteps(
        &self,
        x: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
    ) -> Result<Tensor> {
        self.run(x, timesteps, context, &mut NoControl, 0)
    }

    /// As [`Self::forward_timesteps`], calling `control` at every attention layer (training
    /// terms on the attention maps).
    pub fn forward_timesteps_controlled(
        &self,
        x: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
        control: &mut dyn AttentionControl,
    ) -> Result<Tensor> {
        self.run(x, timesteps, context, control, 0)
    }

    /// As [`Self::forward`], calling `control` at every attention layer with `step`.
    pub fn forward_controlled(
        &self,
        x: &Tensor,
        timestep: f64,
        context: &Tensor,
        control: &mut dyn AttentionControl,
        step: usize,
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        self.run(x, &vec![timestep; b], context, control, step)
    }

    fn run(
        &self,
        x: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
        control: &mut dyn AttentionControl,
        step: usize,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if timesteps.len() != b {
            return Err(Error::Msg(format!(
                "UNet: batch of {b} latents but {} timesteps",
                timesteps.len()
            )));
        }
        if c != self.config.in_channels {
            return Err(Error::Msg(format!(
                "UNet expects {} latent channels, got {c}",
                self.config.in_channels
            )));
        }
        if context.dim(0)? != b {
            return Err(Error::Msg(format!(
                "UNet: batch of {b} latents but {} contexts",
                context.dim(0)?
            )));
        }
        let dtype = self.conv_in.weight.dtype();
        let x = x.to_dtype(dtype)?;
        let context = context.to_dtype(dtype)?;
        // Without hooks or gradients, on the CPU in f32: the context tape's forward pass
        // (the same kernels; layout changes, residuals and skips without graph copies).
        let no_grad = !x.track_op() && !context.track_op() && !self.conv_in.weight.track_op();
        let one_t = !timesteps.is_empty() && timesteps.windows(2).all(|w| w[0] == w[1]);
        if no_grad && one_t && !control.wants_any() && self.execution == Execution::Tapes {
            if let Some(tape) = self.host_tape(&x, timesteps[0])? {
                return tape.predict_once(&context);
            }
        }
        let ch0 = self.config.block_out_channels[0];
        let temb = timestep_embedding(
            timesteps,
            ch0,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            x.device(),
        )?
        .to_dtype(dtype)?;
        let temb = self.time_embedding.forward(&temb)?;

        let mut x = self.conv_in.forward(&x)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            let (y, states) = block.forward(&x, &temb, &context, control, step)?;
            x = y;
            skips.extend(states);
        }
        if let Some(mid) = &self.mid_block {
            x = mid.forward(&x, &temb, &context, control, step)?;
        }
        let n = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let k = block.num_resnets();
            let rest = skips.len() - k;
            let mine: Vec<Tensor> = skips.split_off(rest);
            // Upsample to the next skip's size, so odd sizes round-trip like diffusers.
            let size = if i + 1 < n {
                let s = skips
                    .last()
                    .ok_or_else(|| Error::Msg("UNet skip underflow".into()))?;
                Some((s.dim(2)?, s.dim(3)?))
            } else {
                None
            };
            x = block.forward(&x, &mine, &temb, &context, size, control, step)?;
        }
        let _ = (h, w);
        let x = self.conv_norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}
